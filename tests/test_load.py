"""``modelkit.load``: every artifact as a working model, tokenizer and load report."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import modelkit
from modelkit.errors import BaseModelUnavailableError, LoadError, UnknownOptionError

PROMPT = "def add(a, b):\n    return a + b"


def logits(model, tokenizer, text: str = PROMPT) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def stock(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


# --------------------------------------------------------------------------- plain


def test_plain_load_is_transformers_load(catalog):
    result = modelkit.load(catalog["plain-sharded"])
    model, tok, report = result  # a LoadResult unpacks
    assert result.model is model and result.report is report
    assert torch.equal(logits(model, tok), logits(stock(catalog["plain-sharded"]), tok))
    assert report.mode == "dense" and report.format == "plain-hf" and report.dtype == "float32"
    assert set(report.origin_counts()) == {"stored"}
    assert len(report.consumed) == len(report.origins) == 21
    assert report.tokenizer_from == str(catalog["plain-sharded"])
    assert "21 stored" in report.summary()


def test_tied_embeddings_load(catalog):
    model, tok, report = modelkit.load(catalog["plain-gemma-tied"])
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert "lm_head.weight" not in report.origins
    assert torch.equal(logits(model, tok), logits(stock(catalog["plain-gemma-tied"]), tok))


def test_dtype_and_device(catalog):
    model, _, report = modelkit.load(catalog["plain-llama"], dtype="bfloat16", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert report.dtype == "bfloat16" and not model.training


def _edit_safetensors(folder: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_stored_tensor_without_a_place_is_an_error(catalog, tmp_path):
    src = shutil.copytree(catalog["plain-llama"], tmp_path / "extra")
    _edit_safetensors(src, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.ones(2)}))
    with pytest.raises(LoadError, match="no place in the model.*model.layers.0.mlp.extra.weight"):
        modelkit.load(src)


def test_missing_tensor_is_an_error(catalog, tmp_path):
    src = shutil.copytree(catalog["plain-llama"], tmp_path / "missing")
    _edit_safetensors(src, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(LoadError, match="not provided.*k_proj"):
        modelkit.load(src)


def test_wrong_options_are_refused(catalog):
    with pytest.raises(UnknownOptionError, match="routing=.*plain-hf artifact; it accepts: no options"):
        modelkit.load(catalog["plain-llama"], routing="router")
    with pytest.raises(UnknownOptionError, match="merge=.*it accepts: no options"):
        modelkit.load(catalog["plain-llama"], merge=False)
    with pytest.raises(UnknownOptionError, match="merge=.*it accepts: expert=.*routing="):
        modelkit.load(catalog["dylora-b"], merge=False)
    with pytest.raises(LoadError, match="not both"):
        modelkit.load(catalog["dylora-b"], routing="expert:0", expert=0)


def test_load_is_callable_whatever_was_imported_first():
    import importlib

    module = importlib.import_module("modelkit.ops.load")  # binds modelkit.ops.load, not modelkit.load
    assert callable(modelkit.load) and modelkit.load is module.load
    assert module.LoadResult is modelkit.LoadResult


# --------------------------------------------------------------------------- PEFT


def test_peft_merged_equals_peft_forward(catalog):
    from peft import PeftModel

    model, tok, report = modelkit.load(catalog["peft-lora"])
    reference = PeftModel.from_pretrained(stock(catalog["plain-llama"]), str(catalog["peft-lora"])).eval()
    torch.testing.assert_close(logits(model, tok), logits(reference, tok), rtol=0, atol=1e-5)
    assert report.origin_counts().get("merged", 0) > 0 or any("lora" in o for o in report.origins.values())
    assert report.tokenizer_from == str(catalog["plain-llama"])  # the adapter has none: its base's
    assert report.base["path"] == str(catalog["plain-llama"])


def test_peft_unmerged_is_a_peft_model(catalog):
    from peft import PeftModel

    model, tok, report = modelkit.load(catalog["peft-lora-bin"], merge=False)
    assert isinstance(model, PeftModel) and report.mode == "peft-unmerged"
    merged, _, _ = modelkit.load(catalog["peft-lora-bin"])
    torch.testing.assert_close(logits(model, tok), logits(merged, tok), rtol=0, atol=1e-5)
    assert any(o.startswith("stored:adapter_model") for o in report.origins.values())


def test_untrained_adapter_is_loud(catalog):
    with pytest.raises(LoadError, match="(?s)untrained-adapter.*allow_untrained"):
        modelkit.load(catalog["peft-lora-untrained"])
    model, tok, report = modelkit.load(catalog["peft-lora-untrained"], allow_untrained=True)
    assert any("untrained-adapter" in w for w in report.warnings)
    assert torch.equal(logits(model, tok), logits(stock(catalog["plain-llama"]), tok))  # it IS the base


def test_missing_base(catalog):
    with pytest.raises(BaseModelUnavailableError, match="tiny-base-not-downloaded"):
        modelkit.load(catalog["peft-lora-base-unavailable"])


def test_base_with_mismatching_shapes(catalog):
    with pytest.raises(LoadError, match="shape"):
        modelkit.load(catalog["peft-lora"], base=catalog["plain-gemma-tied"])


# --------------------------------------------------------------------------- compressed MoE


def test_compressed_moe_materializes_experts_and_keeps_router(catalog):
    from modelkit.architecture.bridge import model_to_disk
    from modelkit.io.tensors import load_pickle
    from modelkit.testing import naive_expert

    src = catalog["compressed-checkpoint-N"]
    model, tok, report = modelkit.load(src)
    disk = dict(model_to_disk(model))
    layer = load_pickle(src / "layer_1" / "up_proj.pt")
    expected = naive_expert(layer["core"], layer["wrappers"][2])
    torch.testing.assert_close(disk["model.layers.1.mlp.experts.2.up_proj.weight"], expected, rtol=0, atol=1e-5)
    router = load_pickle(src / "non_moe_weights.pt")["model.layers.0.mlp.gate.weight"]
    assert torch.equal(disk["model.layers.0.mlp.gate.weight"], router)  # the distilled router
    assert report.origins["model.layers.1.mlp.experts.2.up_proj.weight"].startswith("compressed:")
    assert report.origins["model.layers.0.mlp.gate.weight"].startswith("stored:non_moe_weights.pt")
    assert torch.isfinite(logits(model, tok)).all()


def test_compressed_checkpoint_0_takes_non_experts_from_base(catalog):
    model, tok, report = modelkit.load(catalog["compressed-checkpoint-0"])
    original = catalog["original-qwen3-moe"]
    assert report.tokenizer_from == str(original)
    attn = report.origins["model.layers.0.self_attn.q_proj.weight"]
    assert "model.safetensors" in attn
    assert report.origins["model.layers.0.mlp.experts.0.down_proj.weight"].startswith("compressed:")


@pytest.mark.parametrize("name,match", [
    ("compressed-no-non-moe", "missing-tensors"),
    ("compressed-missing-projection", "missing-tensors"),
    ("dylora-adapter-name-twice", "unexpected-tensors"),
    ("dylora-config-rewritten", "inconsistent-config"),
])
def test_partial_or_dropping_loads_are_refused(catalog, name, match):
    with pytest.raises(LoadError, match=match):
        modelkit.load(catalog[name])


# --------------------------------------------------------------------------- DyLoRA-MoE


def test_dylora_expert_routing_equals_dense_merge(catalog):
    routed, tok, report = modelkit.load(catalog["dylora-b"], routing="expert:1")
    dense, _, dense_report = modelkit.load(catalog["dylora-b"], expert=1)
    torch.testing.assert_close(logits(routed, tok), logits(dense, tok), rtol=0, atol=1e-5)
    assert report.mode == "routed" and dense_report.mode == "dense"
    assert any("expert 1" in n for n in report.notes)
    assert any("other experts and the router" in n for n in dense_report.notes)
    assert not any("expert_0" in c for c in dense_report.consumed)


def test_dylora_router_routing_is_the_default(catalog):
    model, tok, report = modelkit.load(catalog["dylora-c"])
    assert report.options == {"routing": "router"} and report.mode == "routed"
    assert report.tokenizer_from == str(catalog["base-gemma"])  # layout c saves none
    out = logits(model, tok)
    choices = [logits(modelkit.load(catalog["dylora-c"], routing=f"expert:{k}").model, tok) for k in (0, 1)]
    assert any(torch.allclose(out, c, atol=1e-5) for c in choices)  # one expert runs the sequence
    assert any(o.startswith("stored:router") for o in report.origins.values())


def test_dylora_missing_router(catalog):
    with pytest.raises(LoadError, match="router"):
        modelkit.load(catalog["dylora-missing-router"])
    model, _, _ = modelkit.load(catalog["dylora-missing-router"], routing="expert:0")
    assert model is not None


def test_dylora_empty_or_untrained_experts_are_loud(catalog):
    for name in ("dylora-empty-expert", "dylora-untrained"):
        with pytest.raises(LoadError, match="allow_untrained"):
            modelkit.load(catalog[name])
    model, _, report = modelkit.load(catalog["dylora-untrained"], allow_untrained=True, routing="expert:0")
    assert any("untrained-adapter" in w for w in report.warnings)


def test_dylora_remote_code_is_never_run(catalog):
    src = catalog["dylora-remote-code"]
    modelkit.load(src, routing="expert:0")
    assert not list(src.rglob("REMOTE_CODE_EXECUTED"))


# --------------------------------------------------------------------------- tokenizer, lm-eval


def test_pad_token_is_set_when_missing(catalog, tmp_path):
    src = shutil.copytree(catalog["plain-llama"], tmp_path / "nopad")
    config = json.loads((src / "tokenizer_config.json").read_text())
    config.pop("pad_token")
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    _, tok, report = modelkit.load(src)
    assert tok.pad_token == "<eos>"
    assert any("pad_token" in n for n in report.notes)


def test_works_with_lm_eval_hflm_in_process(catalog):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tok, _ = modelkit.load(catalog["dylora-b"], routing="expert:0")
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=2, device="cpu")
    requests = [Instance("loglikelihood", {}, ("def f(x):\n    return x *", c), i) for i, c in enumerate((" 1", " 2"))]
    scores = lm.loglikelihood(requests)
    assert len(scores) == 2 and all(s[0] < 0 for s in scores)


@pytest.mark.parametrize("name", ["plain-llama", "peft-lora", "dylora-b", "compressed-checkpoint-N"])
def test_an_unknown_option_is_refused_with_the_accepted_ones(catalog, name):
    from modelkit.errors import UnknownOptionError

    accepted = modelkit.open_artifact(catalog[name]).options
    with pytest.raises(UnknownOptionError, match="unknown option.* colour=") as caught:
        modelkit.load(catalog[name], colour="blue")
    for option in accepted:  # the message lists what the format takes instead
        assert f"{option.name}=" in caught.value.problem
    if not accepted:
        assert "no options" in caught.value.problem
    report = modelkit.inspect(catalog[name])  # and inspect says which options load takes
    assert [o["name"] for o in report.options] == [o.name for o in accepted]
    assert "options " in report.summary()


def test_a_plain_folder_refuses_a_mixture_option(catalog):
    from modelkit.errors import UnknownOptionError

    with pytest.raises(UnknownOptionError, match="expert=.*plain-hf artifact; it accepts: no options"):
        modelkit.load(catalog["plain-llama"], expert=0)
