"""modelkit.architecture.bridge, used the way the rest of the kit uses it.

Every fixture is a tiny model that transformers itself saves; the kit's answers are held
against what ``save_pretrained`` wrote and what ``from_pretrained`` loads.
"""
from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from transformers import (AutoModelForCausalLM, GemmaConfig, LlamaConfig, MixtralConfig,
                          Qwen3MoeConfig)
from transformers.core_model_loading import dot_natural_key

from modelkit.architecture import bridge as arch
from modelkit.architecture.bridge import ExpectedTensor, TensorRole, classify, config_from_dict, disk_to_model, expected_tensors, load_config, model_to_disk, tied_tensors
from modelkit.errors import ConfigError, LoadError
from modelkit.io.tensors import SafetensorsFile

TINY = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=4, max_position_embeddings=64)


def tiny_configs() -> dict:
    return {
        "llama": LlamaConfig(**TINY, intermediate_size=24, tie_word_embeddings=False),
        # gemma: head_dim set explicitly (hidden / heads would be 4 too, so make it differ)
        # and embeddings tied, as in google/gemma-2b
        "gemma": GemmaConfig(**{**TINY, "head_dim": 8}, intermediate_size=24,
                             tie_word_embeddings=True),
        "qwen3_moe": Qwen3MoeConfig(**TINY, intermediate_size=24, moe_intermediate_size=8,
                                    num_experts=4, num_experts_per_tok=2),
        "mixtral": MixtralConfig(**TINY, intermediate_size=8, num_local_experts=4,
                                 num_experts_per_tok=2),
    }


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Each test gets its own on-disk cache and an empty in-memory one."""
    monkeypatch.setenv("MODELKIT_CACHE", str(tmp_path / "cache"))
    arch._memory_cache.clear()
    yield tmp_path / "cache"
    arch._memory_cache.clear()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """One folder per architecture, written by transformers' own save_pretrained."""
    out = {}
    for name, config in tiny_configs().items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = folder
    return out


def stored(folder: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, dtype) from the safetensors header, as inspect would read it."""
    entries = SafetensorsFile(folder / "model.safetensors").entries
    return {n: (t.shape, t.dtype) for n, t in entries.items()}


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    f = SafetensorsFile(folder / "model.safetensors")
    return {n: f.read(n) for n in f.entries}


# ----------------------------------------------------------------- expected tensors


@pytest.mark.parametrize("name", ["llama", "gemma", "qwen3_moe", "mixtral"])
def test_expected_tensors_are_what_save_pretrained_writes(saved, name):
    config = load_config(saved[name])
    expected = expected_tensors(config)
    assert {n: (t.shape, t.dtype) for n, t in expected.items()} == stored(saved[name])


def test_moe_experts_are_expected_per_expert_on_disk():
    expected = expected_tensors(tiny_configs()["qwen3_moe"])
    assert expected["model.layers.1.mlp.experts.3.gate_proj.weight"] == ExpectedTensor(
        "model.layers.1.mlp.experts.3.gate_proj.weight", (8, 16), "float32")
    assert expected["model.layers.0.mlp.experts.0.down_proj.weight"].shape == (16, 8)
    assert not any("gate_up_proj" in n for n in expected)
    # mixtral keeps its classic block_sparse_moe / w1 w2 w3 names on disk
    mixtral = expected_tensors(tiny_configs()["mixtral"])
    assert "model.layers.0.block_sparse_moe.experts.2.w3.weight" in mixtral
    assert "model.layers.0.block_sparse_moe.gate.weight" in mixtral


def test_tied_and_non_persistent_tensors_are_not_expected():
    gemma = tiny_configs()["gemma"]
    expected = expected_tensors(gemma)
    assert "lm_head.weight" not in expected
    assert expected["model.layers.0.self_attn.q_proj.weight"].shape == (32, 16)  # 4 heads x 8
    assert tied_tensors(gemma) == {"lm_head.weight": "model.embed_tokens.weight"}
    assert not any("inv_freq" in n for n in expected)
    assert tied_tensors(tiny_configs()["llama"]) == {}


def test_dtype_comes_from_the_config():
    config = tiny_configs()["llama"]
    config.dtype = torch.bfloat16
    assert {t.dtype for t in expected_tensors(config).values()} == {"bfloat16"}
    assert {t.dtype for t in expected_tensors(tiny_configs()["llama"]).values()} == {"float32"}


def hub_style_qwen3_moe() -> dict:
    """A config.json as the hub serves Qwen3-30B-A3B (transformers 4.x names), made tiny."""
    return {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "torch_dtype": "bfloat16", "transformers_version": "4.51.0",
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8,
        "rope_theta": 1000000.0, "rope_scaling": None, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "norm_topk_prob": True, "output_router_logits": False,
        "router_aux_loss_coef": 0.001, "use_sliding_window": False, "sliding_window": None,
        "max_window_layers": 2, "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "initializer_range": 0.02,
        "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "use_cache": True,
        "intermediate_size": 24, **TINY,
    }


def test_hub_style_config_gives_the_same_expected_tensors(saved, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(hub_style_qwen3_moe()))
    config = load_config(tmp_path)
    assert config.num_experts == 4 and config.dtype == torch.bfloat16
    assert config.rope_parameters["rope_theta"] == 1000000.0
    hub = expected_tensors(config)
    written = stored(saved["qwen3_moe"])
    assert {n: t.shape for n, t in hub.items()} == {n: shape for n, (shape, _) in written.items()}
    assert {t.dtype for t in hub.values()} == {"bfloat16"}
    # the raw dict and the file give the same answer without building a config first
    assert expected_tensors(hub_style_qwen3_moe()) == hub
    assert expected_tensors(tmp_path / "config.json") == hub


def test_hub_style_mixtral_and_llama_rope_scaling(saved):
    mixtral = {"model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2,
               "intermediate_size": 8, "rope_theta": 1e6, "torch_dtype": "float32",
               "sliding_window": None, **TINY}
    assert expected_tensors(mixtral) == expected_tensors(load_config(saved["mixtral"]))
    llama = {"model_type": "llama", "intermediate_size": 24, "tie_word_embeddings": False,
             "rope_theta": 500000.0, "torch_dtype": "float32",
             "rope_scaling": {"type": "linear", "factor": 2.0}, **TINY}
    config = config_from_dict(llama, "hub llama")
    assert config.rope_parameters["rope_type"] == "linear"
    assert expected_tensors(config) == expected_tensors(load_config(saved["llama"]))


def test_undeclared_fields_the_model_reads_are_kept():
    # Qwen3MoeConfig declares no head_dim, but the attention reads it with getattr: like
    # Qwen3-30B-A3B (hidden 2048, 32 heads, head_dim 128) it must not fall back to 16 / 4
    d = {**hub_style_qwen3_moe(), "head_dim": 8, "_dylora_format": "x", "saved_at": "today"}
    known, dropped = arch.split_config_dict(d)
    assert known["head_dim"] == 8 and "head_dim" not in dropped
    # custom fields go, and so does max_window_layers, which qwen3_moe's code never reads
    assert set(dropped) == {"_dylora_format", "saved_at", "max_window_layers"}
    expected = expected_tensors(d)
    assert expected["model.layers.0.self_attn.q_proj.weight"].shape == (32, 16)
    assert expected["model.layers.0.self_attn.k_norm.weight"].shape == (8,)


def test_expected_tensors_are_cached_on_disk(private_cache, monkeypatch):
    raw = hub_style_qwen3_moe()
    first = expected_tensors(raw)
    assert len(list((private_cache / "expected").glob("expected-*.json"))) == 1
    arch._memory_cache.clear()

    def must_not_build(config):
        raise AssertionError("rebuilt a meta model although the answer was cached")

    monkeypatch.setattr(arch, "_compute_expected", must_not_build)
    assert expected_tensors(raw) == first
    # a damaged cache entry is recomputed, never trusted
    monkeypatch.undo()
    monkeypatch.setenv("MODELKIT_CACHE", str(private_cache))
    for f in (private_cache / "expected").glob("expected-*.json"):
        f.write_text("{not json")
    arch._memory_cache.clear()
    assert expected_tensors(raw) == first


def test_import_is_light():
    code = ("import sys, modelkit.architecture.bridge; "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# ----------------------------------------------------------------- configs


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.json"
    path.write_text(text)
    return path


def test_load_config_errors_name_the_file_and_the_problem(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.json: malformed JSON at line 1"):
        load_config(write(tmp_path, '{"model_type": "llama",'))
    with pytest.raises(ConfigError, match="JSON list, not an object"):
        load_config(write(tmp_path, "[1, 2]"))
    with pytest.raises(ConfigError, match="no `model_type`"):
        load_config(write(tmp_path, '{"hidden_size": 8}'))
    with pytest.raises(ConfigError, match="'qwen3-moe' is unknown .*close matches: qwen3_moe"):
        load_config(write(tmp_path, '{"model_type": "qwen3-moe"}'))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no config.json"):
        load_config(tmp_path / "empty")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nowhere.json")
    with pytest.raises(ConfigError, match="num_hidden_layers: Input should be a valid integer"):
        load_config(write(tmp_path, '{"model_type": "llama", "num_hidden_layers": "two"}'))
    with pytest.raises(ConfigError, match="invalid llama config"):  # transformers' own validation
        load_config(write(tmp_path, '{"model_type": "llama", "rope_parameters": "two"}'))
    err = pytest.raises(ConfigError, load_config, write(tmp_path, "{")).value
    assert err.path == str(tmp_path / "config.json")
    # valid field by field, but no model can be built from it
    with pytest.raises(ConfigError, match="LlamaForCausalLM cannot be built from this config"):
        expected_tensors(LlamaConfig(**TINY, intermediate_size=24, pad_token_id=100))


def test_auto_map_is_never_honoured(tmp_path):
    d = {**hub_style_qwen3_moe(),
         "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.Evil"}}
    config = load_config(write(tmp_path, json.dumps(d)))
    assert type(config) is Qwen3MoeConfig and not hasattr(config, "auto_map")


def test_dylora_config_assembled_in_memory():
    gemma = tiny_configs()["gemma"].to_dict()
    d = {**gemma, "model_type": "dylora-moe", "_dylora_num_experts": 4, "_dylora_lora_r": 16,
         "_dylora_lora_alpha": 32, "_dylora_format": "peft_separated", "saved_at": "2024-05-01"}
    with pytest.raises(ConfigError, match="'dylora-moe-v0' is unknown .*pass model_type="):
        config_from_dict({**d, "model_type": "dylora-moe-v0"}, "best_model/config.json")
    config = config_from_dict(d, "best_model/config.json", model_type="gemma")
    assert type(config) is GemmaConfig and config.head_dim == 8
    assert not hasattr(config, "_dylora_num_experts") and not hasattr(config, "saved_at")
    known, dropped = arch.split_config_dict(d, model_type="gemma")
    assert set(dropped) == {"model_type", "_dylora_num_experts", "_dylora_lora_r",
                            "_dylora_lora_alpha", "_dylora_format", "saved_at"}
    assert expected_tensors(config) == expected_tensors(tiny_configs()["gemma"])


# ----------------------------------------------------------------- load and save


class LazyCheckpoint(Mapping):
    """A view that reads each tensor from the file only when asked (counting reads)."""

    def __init__(self, folder: Path):
        self.file = SafetensorsFile(folder / "model.safetensors")
        self.reads: dict[str, int] = {}

    def __getitem__(self, name):
        self.reads[name] = self.reads.get(name, 0) + 1
        return self.file.read(name)

    def __iter__(self):
        return iter(self.file.entries)

    def __len__(self):
        return len(self.file.entries)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([[1, 5, 9, 2, 7, 3]])).logits


def test_disk_to_model_matches_from_pretrained(saved):
    folder = saved["qwen3_moe"]
    reference = AutoModelForCausalLM.from_pretrained(folder)
    view = LazyCheckpoint(folder)
    model, info = disk_to_model(load_config(folder), view)
    assert info.ok, info
    assert torch.allclose(logits(model), logits(reference), atol=1e-6, rtol=0)
    assert set(view.reads) == set(view) and set(view.reads.values()) == {1}


def test_disk_to_model_reports_missing_and_unexpected(saved):
    folder = saved["qwen3_moe"]
    tensors = read_all(folder)
    del tensors["model.norm.weight"]
    tensors["model.layers.0.mlp.experts.9.up_proj.bias"] = torch.zeros(8)
    model, info = disk_to_model(load_config(folder), tensors)
    assert info.missing == ["model.norm.weight"]
    assert info.unexpected == ["model.layers.0.mlp.experts.9.up_proj.bias"]
    assert "model.norm.weight" in info.model_missing and not info.ok
    assert "model.norm.weight" in info.report  # transformers' own report, kept not printed
    with pytest.raises(LoadError, match="1 missing, 1 unexpected"):
        disk_to_model(load_config(folder), tensors, strict=True)


def test_disk_to_model_never_half_loads_a_fused_expert_group(saved):
    folder = saved["qwen3_moe"]
    tensors = read_all(folder)
    gone = "model.layers.1.mlp.experts.2.up_proj.weight"
    del tensors[gone]
    tensors["model.layers.0.mlp.experts.1.down_proj.weight"] = torch.zeros(16, 5)
    model, info = disk_to_model(load_config(folder), tensors)
    assert info.missing == [gone]
    assert info.mismatched == [("model.layers.0.mlp.experts.1.down_proj.weight", (16, 5), (16, 8))]
    # the rest of each broken group is reported, not silently loaded or dropped
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in info.skipped
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in info.skipped
    assert {"model.layers.1.mlp.experts.gate_up_proj",
            "model.layers.0.mlp.experts.down_proj"} <= set(info.model_missing)


def test_disk_to_model_lazy_view_with_a_misshaped_expert(saved):
    folder = saved["qwen3_moe"]
    view = LazyCheckpoint(folder)
    bad = "model.layers.0.mlp.experts.1.down_proj.weight"
    original = view.file.read

    def read(name):
        return torch.zeros(16, 5) if name == bad else original(name)

    view.file.read = read
    # a lazy view gives no shapes up front: transformers fails, and says where
    with pytest.raises(LoadError, match="(?s)could not build Qwen3Moe.*experts.down_proj"):
        disk_to_model(load_config(folder), view)
    # with the shapes from the file headers the broken group is left out and reported
    shapes = {n: t.shape for n, t in view.file.entries.items()} | {bad: (16, 5)}
    model, info = disk_to_model(load_config(folder), view, shapes=shapes)
    assert info.mismatched == [(bad, (16, 5), (16, 8))]
    assert "model.layers.0.mlp.experts.down_proj" in info.model_missing


def test_disk_to_model_tied_gemma(saved):
    folder = saved["gemma"]
    model, info = disk_to_model(load_config(folder), read_all(folder))
    assert info.ok, info
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    reference = AutoModelForCausalLM.from_pretrained(folder)
    assert torch.allclose(logits(model), logits(reference), atol=1e-6, rtol=0)


def test_disk_to_model_dtype(saved):
    folder = saved["llama"]
    model, info = disk_to_model(folder, read_all(folder), dtype="bfloat16")  # config by path
    assert info.ok and model.dtype == torch.bfloat16
    # the dtype parser every entry point shares: aliases, and a typed error naming a bad value
    assert disk_to_model(folder, read_all(folder), dtype="bf16")[0].dtype == torch.bfloat16
    with pytest.raises(LoadError, match="unknown dtype 'evil'"):
        disk_to_model(folder, read_all(folder), dtype="evil")


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral", "gemma", "llama"])
def test_model_to_disk_is_what_save_pretrained_writes(saved, name):
    folder = saved[name]
    model = AutoModelForCausalLM.from_pretrained(folder)
    written = read_all(folder)
    pairs = list(model_to_disk(model))
    assert [n for n, _ in pairs] == sorted((n for n, _ in pairs), key=dot_natural_key)
    produced = dict(pairs)
    assert produced.keys() == written.keys()
    for n, t in produced.items():
        assert t.dtype == written[n].dtype and torch.equal(t, written[n]), n


def test_model_to_disk_of_a_fresh_model_streams_per_expert():
    model = AutoModelForCausalLM.from_config(tiny_configs()["qwen3_moe"])
    stream = model_to_disk(model)
    first = next(stream)  # lazily, one tensor at a time
    assert isinstance(first[1], torch.Tensor)
    rest = dict(stream)
    fused = model.model.layers[1].mlp.experts.gate_up_proj
    assert torch.equal(rest["model.layers.1.mlp.experts.3.gate_proj.weight"], fused[3, :8])
    assert torch.equal(rest["model.layers.1.mlp.experts.3.up_proj.weight"], fused[3, 8:])
    assert {first[0], *rest} == set(expected_tensors(model.config))


# ----------------------------------------------------------------- classify


@pytest.mark.parametrize("name, role", [
    ("model.layers.3.mlp.experts.7.up_proj.weight", TensorRole("expert", 3, 7)),
    ("model.layers.3.mlp.gate.weight", TensorRole("router", 3)),
    ("model.layers.0.block_sparse_moe.gate.weight", TensorRole("router", 0)),
    ("model.layers.0.block_sparse_moe.experts.5.w2.weight", TensorRole("expert", 0, 5)),
    ("model.layers.2.mlp.experts.gate_up_proj", TensorRole("expert", 2)),
    ("model.layers.2.mlp.shared_expert.up_proj.weight", TensorRole("expert", 2)),
    ("model.layers.2.mlp.shared_expert_gate.weight", TensorRole("router", 2)),
    ("model.layers.4.mlp.gate_proj.weight", TensorRole("mlp", 4)),
    ("model.layers.4.self_attn.q_proj.weight", TensorRole("attention", 4)),
    ("model.layers.4.self_attn.q_norm.weight", TensorRole("norm", 4)),
    ("model.layers.4.input_layernorm.weight", TensorRole("norm", 4)),
    ("model.norm.weight", TensorRole("norm")),
    ("model.embed_tokens.weight", TensorRole("embedding")),
    ("lm_head.weight", TensorRole("lm_head")),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", TensorRole("lora", 0)),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", TensorRole("lora", 0)),
    ("foundation_model.base_model.model.model.layers.5.self_attn.v_proj.lora_A.expert_2.weight",
     TensorRole("lora", 5, 2)),
    ("foundation_model.base_model.model.model.layers.5.self_attn.v_proj.base_layer.weight",
     TensorRole("attention", 5)),
    ("foundation_model.base_model.model.lm_head.weight", TensorRole("lm_head")),
    ("router.gate.weight", TensorRole("router")),
    ("router.gate.bias", TensorRole("router")),
    ("model.layers.1.mlp.shared_core_layers.gate_proj.core", TensorRole("expert", 1)),
    ("model.layers.1.mlp.experts.3.input_wrapper.U", TensorRole("expert", 1, 3)),
    ("model.layers.1.mlp.experts.3.output_wrapper.V", TensorRole("expert", 1, 3)),
    ("model.layers.1.mlp.experts.3.core", TensorRole("expert", 1, 3)),
    ("model.rotary_emb.inv_freq", TensorRole("other")),
])
def test_classify(name, role):
    assert classify(name) == role
