"""PEFT LoRA adapters: detection, inventory, the merged view, and the findings of each fault.

Every adapter is written by PEFT's own ``save_pretrained`` on a tiny base; faults are made
the way they happen in the wild (keys saved with the adapter name, an empty file, ...).
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelkit.formats.open import open_artifact, open_base
from modelkit.ui.cli import main
from modelkit.errors import BaseModelUnavailableError, LoadError
from modelkit.formats import detect
from modelkit.formats.plain_hf import PlainHF
from modelkit.ops.inspect import inspect
from modelkit.testing import write_peft_lora, write_plain_hf
from modelkit.testing._files import quiet
from modelkit.testing.peft_lora import load_base, lora_config, shrink_lora_b

Q = "model.layers.1.self_attn.q_proj"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny llama base and a trained adapter (r=4, alpha=8 on q/v_proj) on it."""
    root = tmp_path_factory.mktemp("peft")
    base = write_plain_hf(root / "base", "llama")
    return {"root": root, "base": base, "adapter": write_peft_lora(root / "adapter", base)}


def copy_of(folder: Path, to: Path) -> Path:
    shutil.copytree(folder, to)
    return to


def peft_written(out: Path, base: Path, **lora) -> tuple[Path, dict[str, torch.Tensor]]:
    """An adapter saved by PEFT with ``lora`` options, and PEFT's own merged state dict."""
    from peft import get_peft_model

    torch.manual_seed(0)
    with quiet():
        model = get_peft_model(load_base(base), lora_config(4, 8, lora.pop("targets", ("q_proj", "v_proj")),
                                                           trained=True, dropout=0.0, **lora))
    shrink_lora_b(model, "default")
    with torch.no_grad():  # "train" what PEFT initialises to the base: DoRA magnitude, saved modules
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name or "modules_to_save" in name:
                p.mul_(1.5)
    with quiet():
        model.save_pretrained(out)
    return out, {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


def codes(report, *severities: str) -> set[str]:
    return {f.code for f in report.findings if f.severity.value in severities}


# -- detection and inventory ---------------------------------------------------------------
def test_detects_adapter_folders_and_leaves_the_base_to_plain_hf(tiny, tmp_path):
    fmt, layout = detect(tiny["adapter"])
    assert (fmt.name, layout) == ("peft-lora", "safetensors")
    assert detect(write_peft_lora(tmp_path / "bin", tiny["base"], bin=True))[1] == "bin"
    assert detect(tiny["base"])[0].name == PlainHF.name


def test_stored_lists_lora_tensors_as_named_in_the_file(tiny):
    art = open_artifact(tiny["adapter"])
    stored = {t.name: t for t in art.stored()}
    assert set(stored) == set(load_file(tiny["adapter"] / "adapter_model.safetensors"))
    a = stored[f"base_model.model.{Q}.lora_A.weight"]
    b = stored[f"base_model.model.{Q}.lora_B.weight"]
    assert (a.shape, b.shape) == ((4, 32), (32, 4))
    assert art.base_name() == str(tiny["base"].absolute()) and art.base_needs() == "weights"
    assert art.describe()["targets"] == "q_proj, v_proj" and art.describe()["scaling"] == 2.0


# -- the merged view -----------------------------------------------------------------------
def test_view_has_the_base_on_disk_names(tiny):
    from modelkit.architecture.bridge import expected_tensors

    art = open_artifact(tiny["adapter"])
    view = art.view(open_base(art))
    assert set(view) == set(expected_tensors(art.config()))
    assert not view.unplaced


def test_merged_q_proj_is_w_plus_scaling_b_a(tiny):
    art = open_artifact(tiny["adapter"])
    base = open_base(art)
    lora = load_file(tiny["adapter"] / "adapter_model.safetensors")
    A, B = lora[f"base_model.model.{Q}.lora_A.weight"], lora[f"base_model.model.{Q}.lora_B.weight"]
    W = base.view().produce(f"{Q}.weight")
    view = art.view(base)
    assert torch.allclose(view.produce(f"{Q}.weight"), W + (8 / 4) * B @ A, atol=1e-6)
    untouched = "model.layers.1.self_attn.k_proj.weight"
    assert torch.equal(view.produce(untouched), base.view().produce(untouched))


def test_rslora_scales_by_alpha_over_sqrt_r(tiny, tmp_path):
    folder = write_peft_lora(tmp_path / "rs", tiny["base"], r=8, alpha=16, use_rslora=True)
    art = open_artifact(folder)
    lora = load_file(folder / "adapter_model.safetensors")
    A, B = lora[f"base_model.model.{Q}.lora_A.weight"], lora[f"base_model.model.{Q}.lora_B.weight"]
    W = open_base(art).view().produce(f"{Q}.weight")
    assert art.adapter().scaling == pytest.approx(16 / math.sqrt(8))
    assert torch.allclose(art.view(open_base(art)).produce(f"{Q}.weight"), W + 16 / math.sqrt(8) * B @ A, atol=1e-6)


@pytest.mark.parametrize("options", [
    {}, {"use_rslora": True}, {"use_dora": True}, {"modules_to_save": ["lm_head"]},
    {"targets": ("q_proj", "embed_tokens")},
], ids=["plain", "rslora", "dora", "modules-to-save", "embedding"])
def test_view_equals_peft_merge_and_unload(tiny, tmp_path, options):
    folder, merged = peft_written(tmp_path / "a", tiny["base"], **options)
    art = open_artifact(folder)
    view = art.view(open_base(art))
    assert not view.unplaced
    for name in view:
        assert torch.allclose(view.produce(name), merged[name], atol=1e-5), name


def test_fan_in_fan_out_transposes_the_delta(tmp_path):
    from peft import get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16))
    base.save_pretrained(tmp_path / "gpt2")
    with quiet():
        model = get_peft_model(base, lora_config(4, 8, ["c_attn"], trained=True, fan_in_fan_out=True))
        model.save_pretrained(tmp_path / "adapter")
    with open(tmp_path / "adapter" / "adapter_config.json") as f:
        assert json.load(f)["fan_in_fan_out"] is True
    merged = model.merge_and_unload().state_dict()
    view = open_artifact(tmp_path / "adapter", base=tmp_path / "gpt2")
    view = view.view(open_base(view))
    name = "transformer.h.0.attn.c_attn.weight"
    assert view[name].shape == (32, 96)
    assert torch.allclose(view.produce(name), merged[name], atol=1e-6)


def test_base_with_other_shapes_is_refused_naming_the_tensor(tiny, tmp_path):
    wide = write_plain_hf(tmp_path / "wide", "llama", num_attention_heads=8)  # q_proj [64, 32]
    art = open_artifact(tiny["adapter"], base=wide)
    with pytest.raises(LoadError, match=r"q_proj\.weight: base \[64, 32\], adapter needs \[32, 32\]"):
        art.view(open_base(art))
    report = inspect(tiny["adapter"], base=wide)
    assert "shape-mismatch" in codes(report, "error") and report.exit_code == 1


def test_missing_base_raises_base_unavailable(tiny, tmp_path):
    folder = write_peft_lora(tmp_path / "a", tiny["base"], base_name="nobody/not-downloaded")
    art = open_artifact(folder)
    with pytest.raises(BaseModelUnavailableError):
        art.view(open_base(art))
    assert "base-unavailable" in codes(inspect(folder), "warning")


# -- findings --------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [{}, {"bin": True}, {"r": 8, "alpha": 16, "use_rslora": True}],
                         ids=["safetensors", "bin", "rslora"])
def test_clean_adapters_have_no_errors_or_warnings(tiny, tmp_path, options):
    report = inspect(write_peft_lora(tmp_path / "a", tiny["base"], **options), deep=True)
    assert not codes(report, "error", "warning"), report.summary()
    assert "base-required" in report.codes


def test_untrained_adapter_needs_deep(tiny, tmp_path):
    folder = write_peft_lora(tmp_path / "a", tiny["base"], trained=False)
    assert "untrained-adapter" in codes(inspect(folder, deep=True), "error")
    shallow = inspect(folder)
    assert not codes(shallow, "error") and "not-checked" in codes(shallow, "info")


def test_empty_adapter_file(tiny, tmp_path):
    folder = copy_of(tiny["adapter"], tmp_path / "a")
    save_file({}, folder / "adapter_model.safetensors")
    assert "empty-adapter" in codes(inspect(folder), "error")


def test_keys_with_the_adapter_name_are_unplaced_and_reported(tiny, tmp_path):
    folder = copy_of(tiny["adapter"], tmp_path / "a")
    lora = load_file(folder / "adapter_model.safetensors")
    save_file({k.replace(".weight", ".default.weight"): v for k, v in lora.items()},
              folder / "adapter_model.safetensors")
    art = open_artifact(folder)
    view = art.view(open_base(art))
    assert len(view.unplaced) == len(lora)
    assert torch.equal(view.produce(f"{Q}.weight"), open_base(art).view().produce(f"{Q}.weight"))
    report = inspect(folder)
    found = [f for f in report.findings if f.code == "unexpected-tensors"]
    assert len(found) == 1 and "base model" in found[0].message and len(found[0].tensors) == len(lora)


def test_lora_a_without_b_is_missing_tensors(tiny, tmp_path):
    folder = copy_of(tiny["adapter"], tmp_path / "a")
    lora = load_file(folder / "adapter_model.safetensors")
    del lora[f"base_model.model.{Q}.lora_B.weight"]
    save_file(lora, folder / "adapter_model.safetensors")
    assert "missing-tensors" in codes(inspect(folder), "error")


def test_rank_contradicting_the_config(tiny, tmp_path):
    folder = copy_of(tiny["adapter"], tmp_path / "a")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "r": 16}))
    assert "inconsistent-config" in codes(inspect(folder), "error")


def test_cli_exit_codes(tiny, tmp_path, capsys):
    assert main(["inspect", str(tiny["adapter"])]) == 0
    untrained = write_peft_lora(tmp_path / "u", tiny["base"], trained=False)
    assert main(["inspect", str(untrained), "--deep"]) == 1
    assert "untrained-adapter" in capsys.readouterr().out
