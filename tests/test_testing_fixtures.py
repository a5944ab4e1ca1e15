"""The fixture writers themselves: every artifact matches FORMATS.md and its fault is real."""
from __future__ import annotations

import json
import pickletools
import re
import time
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

import modelkit.errors
from modelkit.findings import CODES
from modelkit.testing import ENTRIES, build_dylora, build_tiny_model, expected_expert_weights, load_catalog, naive_expert, reconstruct_expert, tiny_config, tiny_tokenizer, write_catalog, write_compressed_moe, write_dylora, write_plain_hf, write_tokenizer
from modelkit.testing.tokenizer import VOCAB_SIZE

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_PROJ = ("gate_proj", "up_proj", "down_proj")
IDS = torch.tensor([[2, 40, 41, 300, 7, 99, 120, 1]])



def stored(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file or of a sharded folder."""
    path = Path(path)
    if path.is_file():
        return load_file(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        out = {}
        for name in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            out.update(load_file(path / name))
        return out
    return load_file(path / "model.safetensors")


def load_pt(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def from_pretrained(path: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True)
    return model.eval(), info


# --- tokenizer and configs ------------------------------------------------------------------

def test_tokenizer_is_deterministic_and_has_special_tokens(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(write_tokenizer(tmp_path / "tok"))
    assert len(tok) == VOCAB_SIZE
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tiny_tokenizer().backend_tokenizer.to_str() == tiny_tokenizer().backend_tokenizer.to_str()
    ids = tok("def f(x):\n    return x * 2")["input_ids"]
    assert ids[0] == tok.bos_token_id and max(ids) < VOCAB_SIZE
    assert tok.decode(ids, skip_special_tokens=True) == "def f(x):\n    return x * 2"


@pytest.mark.parametrize("family", ["llama", "gemma", "qwen3_moe"])
def test_tiny_config(family):
    config = tiny_config(family)
    assert config.model_type == family
    assert config.vocab_size == VOCAB_SIZE and config.hidden_size == 32 and config.num_hidden_layers == 2
    assert config.head_dim == 8
    assert tiny_config(family, hidden_size=64).hidden_size == 64


def test_qwen3_moe_config_is_sparse_everywhere():
    config = tiny_config("qwen3_moe")
    assert (config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size) == (4, 2, 16)
    assert config.decoder_sparse_step == 1 and config.mlp_only_layers == []


# --- plain HF -----------------------------------------------------------------------------

PLAIN = ["plain-llama", "plain-sharded", "plain-bin", "plain-bin-sharded", "plain-gemma-tied",
         "base-gemma", "original-qwen3-moe", "plain-qwen3-moe-sharded"]
FAMILY_OF = {"plain-gemma-tied": ("gemma", None), "base-gemma": ("gemma", False),
             "original-qwen3-moe": ("qwen3_moe", None), "plain-qwen3-moe-sharded": ("qwen3_moe", None)}


@pytest.mark.parametrize("name", PLAIN)
def test_plain_loads_without_missing_keys(catalog, name):
    model, info = from_pretrained(catalog[name])
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    family, tie = FAMILY_OF.get(name, ("llama", None))
    reference = build_tiny_model(family, seed=0, tie=tie)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, reference(IDS).logits)
    assert (catalog[name] / "tokenizer.json").exists()


def test_sharded_safetensors_index(catalog):
    folder = catalog["plain-sharded"]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index) >= {"metadata", "weight_map"} and "total_size" in index["metadata"]
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert not (folder / "model.safetensors").exists()
    sizes = sum(t.numel() * t.element_size() for t in stored(folder).values())
    assert index["metadata"]["total_size"] == sizes


def test_legacy_bin(catalog):
    assert sorted(p.name for p in catalog["plain-bin"].glob("*.bin")) == ["pytorch_model.bin"]
    assert not list(catalog["plain-bin"].glob("*.safetensors"))
    folder = catalog["plain-bin-sharded"]
    index = json.loads((folder / "pytorch_model.bin.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [
        "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    state = load_pt(catalog["plain-bin"] / "pytorch_model.bin")
    assert state.keys() == stored(catalog["plain-llama"]).keys()


def test_gemma_tied_head_absent_and_dylora_base_untied(catalog):
    assert "lm_head.weight" not in stored(catalog["plain-gemma-tied"])
    base = stored(catalog["base-gemma"])
    assert json.loads((catalog["base-gemma"] / "config.json").read_text())["tie_word_embeddings"] is False
    torch.testing.assert_close(base["lm_head.weight"], base["model.embed_tokens.weight"])
    assert base["lm_head.weight"].data_ptr() != base["model.embed_tokens.weight"].data_ptr()


def test_qwen3_moe_experts_are_per_expert_on_disk(catalog):
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    keys = set(stored(catalog["original-qwen3-moe"]))
    for i in range(2):
        for e in range(4):
            for proj, shape in (("gate_proj", [16, 32]), ("up_proj", [16, 32]), ("down_proj", [32, 16])):
                key = f"model.layers.{i}.mlp.experts.{e}.{proj}.weight"
                assert key in keys
        assert f"model.layers.{i}.mlp.gate.weight" in keys
    assert not [k for k in keys if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    sources = [p for rule in get_checkpoint_conversion_mapping("qwen3_moe") for p in rule.source_patterns]
    assert "mlp.experts.*.gate_proj.weight" in sources and "mlp.experts.*.down_proj.weight" in sources
    model, _ = from_pretrained(catalog["original-qwen3-moe"])
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape == (4, 32, 32)  # fused in memory
    with safe_open(catalog["original-qwen3-moe"] / "model.safetensors", "pt") as f:
        shape = f.get_slice("model.layers.0.mlp.experts.3.down_proj.weight").get_shape()
    assert shape == [32, 16]


def test_write_plain_hf_options(tmp_path):
    out = write_plain_hf(tmp_path / "bf16", dtype=torch.bfloat16, tokenizer=False)
    assert {t.dtype for t in stored(out).values()} == {torch.bfloat16}
    assert not (out / "tokenizer.json").exists()
    assert write_plain_hf(out, shards=2) == out  # rewrites the folder in place
    assert not (out / "model.safetensors").exists() and (out / "model.safetensors.index.json").exists()


# --- PEFT LoRA ------------------------------------------------------------------------------

def lora_pairs(weights: dict[str, torch.Tensor], adapter: str = "") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    tag = f".{adapter}" if adapter else ""
    return {k[: -len(f".lora_A{tag}.weight")]: (weights[k], weights[k.replace(".lora_A", ".lora_B")])
            for k in weights if k.endswith(f".lora_A{tag}.weight")}


def test_peft_lora_files_and_keys(catalog):
    folder = catalog["peft-lora"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(catalog["plain-llama"])
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 8, False)
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert config["fan_in_fan_out"] is False and config["modules_to_save"] is None
    weights = load_file(folder / "adapter_model.safetensors")
    assert all(re.fullmatch(r"base_model\.model\.model\.layers\.\d\.self_attn\.[qv]_proj\.lora_[AB]\.weight", k)
               for k in weights)
    pairs = lora_pairs(weights)
    assert len(pairs) == 4
    for name, (a, b) in pairs.items():
        out = 32 if name.endswith("q_proj") else 16
        assert a.shape == (4, 32) and b.shape == (out, 4)
        assert b.abs().sum() > 0


def test_peft_lora_untrained_has_zero_b(catalog):
    for _, (a, b) in lora_pairs(load_file(catalog["peft-lora-untrained"] / "adapter_model.safetensors")).items():
        assert a.abs().sum() > 0 and not b.any()


def test_peft_lora_variants(catalog):
    rs = json.loads((catalog["peft-lora-rslora"] / "adapter_config.json").read_text())
    assert rs["use_rslora"] is True and (rs["r"], rs["lora_alpha"]) == (8, 16)
    assert (catalog["peft-lora-bin"] / "adapter_model.bin").exists()
    assert not (catalog["peft-lora-bin"] / "adapter_model.safetensors").exists()
    assert load_pt(catalog["peft-lora-bin"] / "adapter_model.bin").keys() == \
        load_file(catalog["peft-lora"] / "adapter_model.safetensors").keys()
    cfg = json.loads((catalog["peft-lora-base-unavailable"] / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "modelkit-fixtures/tiny-base-not-downloaded"


@pytest.mark.parametrize("name,scaling", [("peft-lora", 8 / 4), ("peft-lora-rslora", 16 / 8 ** 0.5)])
def test_peft_merged_delta_is_scaling_b_a(catalog, name, scaling):
    """FORMATS §2: merged delta = scaling * B @ A, checked against PEFT's own merge."""
    from peft import PeftModel

    base, _ = from_pretrained(catalog["plain-llama"])
    original = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, str(catalog[name])).merge_and_unload().state_dict()
    for prefix, (a, b) in lora_pairs(load_file(catalog[name] / "adapter_model.safetensors")).items():
        key = prefix.removeprefix("base_model.model.") + ".weight"
        torch.testing.assert_close(merged[key] - original[key], scaling * b @ a, atol=1e-6, rtol=1e-5)


# --- DyLoRA-MoE -----------------------------------------------------------------------------

WRAP = "foundation_model.base_model.model."


def test_dylora_a_full_state_dict(catalog):
    best = catalog["dylora-a-tiny"]
    weights = load_file(best / "model.safetensors")
    base = stored(catalog["base-gemma"])
    for i in range(2):
        for proj in PROJ:
            stem = f"{WRAP}model.layers.{i}.self_attn.{proj}"
            torch.testing.assert_close(weights[f"{stem}.base_layer.weight"], base[f"model.layers.{i}.self_attn.{proj}.weight"])
            for k in range(2):
                a, b = weights[f"{stem}.lora_A.expert_{k}.weight"], weights[f"{stem}.lora_B.expert_{k}.weight"]
                assert a.shape[0] == 4 and b.shape[1] == 4 and b.abs().sum() > 0
    torch.testing.assert_close(weights[f"{WRAP}lm_head.weight"], base["model.embed_tokens.weight"])
    assert weights["router.gate.weight"].shape == (2, 32) and weights["router.gate.bias"].shape == (2,)
    state = best.parent / "dylo_moe_state"
    router = load_pt(state / "router.pt")
    assert set(router) == {"gate_state_dict", "num_experts", "input_size", "top_k", "temperature", "expert_maturity"}
    torch.testing.assert_close(router["gate_state_dict"]["weight"], weights["router.gate.weight"])
    assert isinstance(load_pt(state / "skill_library.pt"), dict)


def test_dylora_a_configs(catalog):
    tiny = json.loads((catalog["dylora-a-tiny"] / "config.json").read_text())
    assert tiny["model_type"] == "dylora-moe" and tiny["base_model_name_or_path"] == str(catalog["base-gemma"])
    assert {k: tiny[k] for k in ("num_experts", "lora_r", "lora_alpha")} == {"num_experts": 2, "lora_r": 4, "lora_alpha": 8}
    assert {"lora_dropout", "saved_at"} <= set(tiny)
    full = json.loads((catalog["dylora-a-full"] / "config.json").read_text())
    assert full["model_type"] == "gemma" and full["head_dim"] == 8
    assert (full["_dylora_num_experts"], full["_dylora_lora_r"], full["_dylora_lora_alpha"]) == (2, 4, 8)
    assert "_dylora_lora_dropout" in full and (catalog["dylora-a-full"].parent / "dylo_moe_state" / "router.pt").exists()


def test_dylora_b_peft_separated(catalog):
    best = catalog["dylora-b"]
    config = json.loads((best / "config.json").read_text())
    assert config["model_type"] == "dylora-moe" and config["_dylora_format"] == "peft_separated"
    assert config["_dylora_num_experts"] == 2 and "num_experts" not in config and "lora_r" not in config
    assert config["base_model_name_or_path"] == str(catalog["base-gemma"]) and config["hidden_size"] == 32
    full = load_file(catalog["dylora-a-tiny"] / "model.safetensors")
    for k in range(2):
        expert = load_pt(best / "peft_adapters" / f"expert_{k}.pt")
        assert len(expert) == 2 * 2 * len(PROJ)
        for name, tensor in expert.items():
            assert re.fullmatch(rf"base_model\.model\.model\.layers\.\d\.self_attn\.[qkvo]_proj\.lora_[AB]\.expert_{k}\.weight", name)
            torch.testing.assert_close(tensor, full["foundation_model." + name])  # same model as layout a
    router = load_pt(best / "dylo_moe_state" / "router.pt")
    assert set(router) == {"gate_state_dict", "num_experts", "input_size", "top_k", "temperature"}
    assert router["gate_state_dict"]["weight"].shape == (2, 32) and router["gate_state_dict"]["bias"].shape == (2,)
    assert (router["num_experts"], router["input_size"], router["temperature"]) == (2, 32, 2.0)


def test_dylora_c_trainer_checkpoint(catalog):
    from peft import PeftModel

    ckpt = catalog["dylora-c"]
    assert re.fullmatch(r"checkpoint-\d+", ckpt.name)
    config = json.loads((ckpt / "config.json").read_text())
    assert config["model_type"] == "dylora-moe" and config["checkpoint_type"] == "peft_only"
    assert config["num_experts"] == 2 and "lora_r" not in config and config["_dylora_checkpoint_step"] == 100
    assert set(load_file(ckpt / "router.safetensors")) == {"gate.weight", "gate.bias"}
    assert not (ckpt / "model.safetensors").exists()
    b_expert = load_pt(catalog["dylora-b"] / "peft_adapters" / "expert_1.pt")
    for k in range(2):
        nested = ckpt / "peft_adapters" / f"expert_{k}" / f"expert_{k}"
        adapter = json.loads((nested / "adapter_config.json").read_text())
        assert adapter["base_model_name_or_path"] == str(catalog["base-gemma"])
        assert sorted(adapter["target_modules"]) == sorted(PROJ) and adapter["r"] == 4
        weights = load_file(nested / "adapter_model.safetensors")
        assert not [n for n in weights if "expert_" in n]
        if k == 1:
            for name, tensor in weights.items():
                torch.testing.assert_close(tensor, b_expert[name.replace(".weight", ".expert_1.weight")])
    base, _ = from_pretrained(catalog["base-gemma"])
    PeftModel.from_pretrained(base, str(ckpt / "peft_adapters" / "expert_0" / "expert_0"))
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["global_step"] == 100
    assert "param_groups" in load_pt(ckpt / "optimizer.pt") and "base_lrs" in load_pt(ckpt / "scheduler.pt")


def test_dylora_d_artifact_root(catalog):
    root = catalog["dylora-d"]
    assert root.name == "best-dylora-model-full:v3" and root.parent.name == "artifacts"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["best_model", "checkpoint-100", "checkpoint-50"]
    assert (root / "best_model" / "peft_adapters" / "expert_0.pt").exists()
    early, late = (load_file(root / f"checkpoint-{s}" / "peft_adapters" / "expert_0" / "expert_0" /
                             "adapter_model.safetensors") for s in (50, 100))
    assert early.keys() == late.keys() and any(not torch.equal(early[k], late[k]) for k in early)


def test_dylora_faults(catalog):
    twice = load_pt(catalog["dylora-adapter-name-twice"] / "peft_adapters" / "expert_1.pt")
    assert twice and all(".expert_1.expert_1." in k for k in twice)
    assert not any(".expert_0.expert_0." in k for k in load_pt(catalog["dylora-adapter-name-twice"] / "peft_adapters" / "expert_0.pt"))
    assert load_pt(catalog["dylora-empty-expert"] / "peft_adapters" / "expert_1.pt") == {}
    assert load_pt(catalog["dylora-empty-expert"] / "peft_adapters" / "expert_0.pt")
    assert not (catalog["dylora-missing-router"] / "dylo_moe_state" / "router.pt").exists()
    bad = json.loads((catalog["dylora-inconsistent-config"] / "config.json").read_text())
    assert bad["num_experts"] != bad["_dylora_num_experts"]
    for k in range(2):
        weights = load_file(catalog["dylora-untrained"] / "peft_adapters" / f"expert_{k}" / f"expert_{k}" / "adapter_model.safetensors")
        assert all(not t.any() for n, t in weights.items() if "lora_B" in n)
        assert all(t.any() for n, t in weights.items() if "lora_A" in n)
    rewritten = catalog["dylora-config-rewritten"]
    config = json.loads((rewritten / "config.json").read_text())
    assert config["model_type"] == "gemma" and not [k for k in config if k.startswith("_dylora")]
    assert any(k.startswith(WRAP) for k in load_file(rewritten / "model.safetensors"))
    remote = catalog["dylora-remote-code"]
    assert "AutoModelForCausalLM" in json.loads((remote / "config.json").read_text())["auto_map"]
    assert (remote / "modeling_dylora.py").exists()


def test_dylora_rejects_fault_on_wrong_layout(tmp_path, catalog):
    with pytest.raises(ValueError):
        write_dylora(tmp_path / "x", "a-tiny-config", catalog["base-gemma"], fault="empty-expert")
    with pytest.raises(ValueError):
        write_dylora(tmp_path / "x", "z", catalog["base-gemma"])


def test_dylora_faults_in_other_layouts(tmp_path, catalog):
    base = catalog["base-gemma"]
    c = write_dylora(tmp_path / "c", "c", base, fault="adapter-name-twice", num_experts=3)
    keys = load_file(c / "peft_adapters" / "expert_2" / "expert_2" / "adapter_model.safetensors")
    assert keys and all(".expert_2.expert_2." in k for k in keys)
    a = write_dylora(tmp_path / "a", "a-tiny-config", base, fault="missing-router")
    assert not [k for k in load_file(a / "model.safetensors") if k.startswith("router.")]
    assert not (a.parent / "dylo_moe_state" / "router.pt").exists()
    hub = write_dylora(tmp_path / "h", "c", base, base_name="google/codegemma-2b")
    assert json.loads((hub / "config.json").read_text())["base_model_name_or_path"] == "google/codegemma-2b"
    nested = hub / "peft_adapters" / "expert_0" / "expert_0" / "adapter_config.json"
    assert json.loads(nested.read_text())["base_model_name_or_path"] == "google/codegemma-2b"


def test_build_dylora_is_a_real_peft_model(catalog):
    from peft import PeftModel

    model = build_dylora(catalog["base-gemma"])
    assert isinstance(model.foundation_model, PeftModel)
    assert set(model.foundation_model.peft_config) == {"expert_0", "expert_1"}
    assert model.router.gate.in_features == 32 and model.router.gate.out_features == 2


# --- compressed MoE -------------------------------------------------------------------------

def layer_files(ckpt: Path) -> dict[str, dict]:
    return {f"{p.parent.name}/{p.stem}": load_pt(p) for p in sorted(ckpt.glob("layer_*/*_proj.pt"))}


def test_compressed_checkpoint_n_layout(catalog):
    ckpt = catalog["compressed-checkpoint-N"]
    assert ckpt.name == "checkpoint-10" and ckpt.parent.name == "checkpoints"
    base_dir = ckpt.parent.parent
    settings = yaml.safe_load((base_dir / "compression_config.yaml").read_text())
    assert settings["model_name"] == str(catalog["original-qwen3-moe"])
    assert {"rank", "num_steps", "lr", "projections"} <= set(settings) and settings["rank"] == 2
    assert "compression_fraction" in yaml.safe_load((base_dir / "compression_stats.yaml").read_text())
    assert json.loads((ckpt / "config.json").read_text()) == json.loads((catalog["original-qwen3-moe"] / "config.json").read_text())
    assert (ckpt / "tokenizer.json").exists()
    assert json.loads((ckpt / "compressed_metadata.json").read_text()) == {
        "compressed_layer_indices": [0, 1], "num_compressed_layers": 2, "total_layers": 2}
    files = layer_files(ckpt)
    assert len(files) == 6
    for data in files.values():
        assert set(data) == {"layer_idx", "projection", "core", "wrappers", "metadata"}
        d_out, d_in = data["core"].shape
        assert data["metadata"] == {"num_experts": 4, "d_in": d_in, "d_out": d_out, "rank": 2}
        assert len(data["wrappers"]) == 4
        for w in data["wrappers"]:
            assert {k: tuple(v.shape) for k, v in w.items()} == {
                "U_in": (d_in, 2), "V_in": (d_in, 2), "U_out": (d_out, 2), "V_out": (d_out, 2)}


def test_compressed_non_moe_weights(catalog):
    from transformers import AutoModelForCausalLM

    non_moe = load_pt(catalog["compressed-checkpoint-N"] / "non_moe_weights.pt")
    original = stored(catalog["original-qwen3-moe"])
    dense = {k for k in original if ".mlp.experts." not in k}
    model = AutoModelForCausalLM.from_pretrained(str(catalog["original-qwen3-moe"]))
    buffers = {n for n, _ in model.named_buffers()}
    assert set(non_moe) == dense | buffers
    assert "model.rotary_emb.inv_freq" in non_moe and "lm_head.weight" in non_moe
    for key in dense:
        if key.endswith("mlp.gate.weight"):  # distilled router: close to, but not, the original
            assert not torch.equal(non_moe[key], original[key])
            torch.testing.assert_close(non_moe[key], original[key], atol=0.05, rtol=0)
        else:
            torch.testing.assert_close(non_moe[key], original[key])


def test_reconstruct_expert_matches_naive_formula(catalog):
    for data in layer_files(catalog["compressed-checkpoint-N"]).values():
        for w in data["wrappers"]:
            fast = reconstruct_expert(data["core"], w)
            torch.testing.assert_close(fast, naive_expert(data["core"], w), atol=1e-5, rtol=1e-5)
            assert (fast - data["core"]).norm() > 0.05 * data["core"].norm()


def test_expected_expert_weights_use_on_disk_names(catalog):
    experts = expected_expert_weights(layer_files(catalog["compressed-checkpoint-N"]))
    original = stored(catalog["original-qwen3-moe"])
    assert set(experts) == {k for k in original if ".mlp.experts." in k}
    assert all(experts[k].shape == original[k].shape for k in experts)


def test_compressed_checkpoint_0(catalog):
    ckpt = catalog["compressed-checkpoint-0"]
    assert ckpt.name == "checkpoint-0"
    assert not [p for p in ("config.json", "tokenizer.json", "non_moe_weights.pt") if (ckpt / p).exists()]
    assert (ckpt.parent.parent / "compression_config.yaml").exists()
    original = stored(catalog["original-qwen3-moe"])
    for i in range(2):
        for proj in EXPERT_PROJ:
            meta = json.loads((ckpt / f"layer_{i}" / f"{proj}_metadata.json").read_text())
            assert meta["num_experts"] == 4 and meta["rank"] == 2
            extracted = load_pt(ckpt / "extracted_weights" / f"layer_{i}_{proj}.pt")
            assert set(extracted) == {"expert_weights", "num_experts", "d_out", "d_in"}
            for e, weight in enumerate(extracted["expert_weights"]):
                torch.testing.assert_close(weight, original[f"model.layers.{i}.mlp.experts.{e}.{proj}.weight"])


def test_compressed_documented(catalog):
    ckpt = catalog["compressed-documented"]
    assert json.loads((ckpt / "compression_config.json").read_text())["model_name"] == str(catalog["original-qwen3-moe"])
    assert (ckpt / "compression_statistics.yaml").exists() and (ckpt / "non_moe_weights.pt").exists()
    assert len(layer_files(ckpt)) == 6


def test_compressed_faults(catalog):
    assert not (catalog["compressed-no-non-moe"] / "non_moe_weights.pt").exists()
    assert len(layer_files(catalog["compressed-no-non-moe"])) == 6
    assert not (catalog["compressed-missing-projection"] / "layer_1" / "down_proj.pt").exists()
    assert len(layer_files(catalog["compressed-missing-projection"])) == 5
    dup = catalog["compressed-duplicated-buffers"]
    non_moe, files = load_pt(dup / "non_moe_weights.pt"), layer_files(dup)
    copies = [k for k in non_moe if re.fullmatch(r"model\.layers\.\d\.mlp\.experts\.\d\.\w+_proj\.core", k)]
    assert len(copies) == 2 * 3 * 4
    for key in copies:
        i, e, proj = re.match(r"model\.layers\.(\d)\.mlp\.experts\.(\d)\.(\w+)\.core", key).groups()
        torch.testing.assert_close(non_moe[key], files[f"layer_{i}/{proj}"]["core"])
    mixed = catalog["compressed-dtype-mismatch"]
    mixed_non_moe = load_pt(mixed / "non_moe_weights.pt")
    assert {t.dtype for k, t in mixed_non_moe.items() if t.is_floating_point() and "rotary" not in k} == {torch.bfloat16}
    # the rotary buffers stay float32 beside the bf16 model, as the real save writes them
    assert {mixed_non_moe[f"model.rotary_emb.{k}"].dtype for k in ("inv_freq", "original_inv_freq")} == {torch.float32}
    assert {d["core"].dtype for d in layer_files(mixed).values()} == {torch.float32}
    settings = yaml.safe_load((catalog["compressed-base-unavailable"].parent.parent / "compression_config.yaml").read_text())
    assert settings["model_name"] == "Qwen/Qwen3-30B-A3B"


def test_compressed_options(tmp_path, catalog):
    ckpt = write_compressed_moe(tmp_path / "x", "checkpoint-N", catalog["original-qwen3-moe"], rank=3,
                                dtype=torch.bfloat16, biases=True)
    data = load_pt(ckpt / "layer_0" / "gate_proj.pt")
    assert data["core"].dtype == torch.bfloat16 and data["wrappers"][0]["U_in"].shape == (32, 3)
    assert len(data["biases"]) == 4 and data["biases"][0].shape == (16,)
    with pytest.raises(ValueError):
        write_compressed_moe(tmp_path / "y", "checkpoint-0", catalog["original-qwen3-moe"], fault="no-non-moe")


# --- bad inputs -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["bad-truncated", "bad-absurd-header", "bad-offsets-outside", "bad-overlapping-offsets"])
def test_corrupt_safetensors_are_rejected_by_safetensors(catalog, name):
    folder = catalog[name]
    json.loads((folder / "config.json").read_text())  # the rest of the folder is valid
    with pytest.raises(Exception):
        with safe_open(folder / "model.safetensors", "pt") as f:
            for key in f.keys():
                f.get_tensor(key)


def test_malformed_config(catalog):
    with pytest.raises(json.JSONDecodeError):
        json.loads((catalog["bad-malformed-config"] / "config.json").read_text())
    assert stored(catalog["bad-malformed-config"])


def test_evil_pickle_names_os_system_and_is_refused(catalog):
    path = catalog["bad-evil-pickle"] / "pytorch_model.bin"
    with zipfile.ZipFile(path) as archive:
        pickle_bytes = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    globals_ = [arg for op, arg, _ in pickletools.genops(pickle_bytes) if op.name == "GLOBAL"]
    assert "posix system" in globals_ or "nt system" in globals_
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)
    assert not (path.parent / "PWNED").exists()


def test_escaping_paths(catalog):
    link = catalog["bad-escaping-symlink"] / "model.safetensors"
    assert link.is_symlink()
    assert not link.resolve().is_relative_to(catalog["bad-escaping-symlink"].resolve())
    assert load_file(link)  # a naive loader would happily read it
    folder = catalog["bad-index-outside"]
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert "../outside.safetensors" in weight_map.values()
    assert (folder.parent / "outside.safetensors").exists()


# --- the catalog ----------------------------------------------------------------------------

def test_catalog_describes_every_entry(catalog):
    root = next(iter(catalog.values())).parent
    while not (root / "catalog.json").exists():
        root = root.parent
    described = load_catalog(root)["entries"]
    assert set(described) == set(catalog) == {e.name for e in ENTRIES}
    for name, info in described.items():
        assert (root / info["path"]).resolve() == catalog[name].resolve()
        assert set(info["expected_codes"]) <= set(CODES), name
        assert info["raises"] is None or issubclass(getattr(modelkit.errors, info["raises"]), modelkit.errors.ModelkitError)
        assert info["base"] is None or info["base"] in described
        assert {"format", "layout", "fault", "notes"} <= set(info)
        assert info["fault"] is None or info["expected_codes"] or info["raises"], name
    clean = [n for n, i in described.items() if i["fault"] is None]
    assert all(set(described[n]["expected_codes"]) <= {"base-required"} for n in clean)


def test_catalog_is_idempotent_and_incremental(tmp_path):
    first = write_catalog(tmp_path, families=("bad",))
    assert set(first) == {e.name for e in ENTRIES if e.group == "bad"}
    stamp = (tmp_path / "bad-truncated" / "model" / "model.safetensors").stat().st_mtime_ns
    started = time.perf_counter()
    assert write_catalog(tmp_path, families=("bad",)) == first
    assert time.perf_counter() - started < 2.0
    assert (tmp_path / "bad-truncated" / "model" / "model.safetensors").stat().st_mtime_ns == stamp
    more = write_catalog(tmp_path, families=("peft",))
    assert "plain-llama" in more and "peft-lora" in more
    assert set(load_catalog(tmp_path)["entries"]) >= set(first) | set(more)
    with pytest.raises(ValueError):
        write_catalog(tmp_path, families=("nope",))


def test_no_fixture_code_was_ever_executed(catalog):
    """Runs last in this module: nothing unpickled the evil pickle or imported remote code."""
    root = catalog["plain-llama"].parent
    assert not list(root.rglob("PWNED")) and not list(root.rglob("REMOTE_CODE_EXECUTED"))
