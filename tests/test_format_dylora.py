"""DyLoRA-MoE: every layout detected and viewed, experts and router exposed, each fault found.

Artifacts come from ``modelkit.testing.write_dylora``, which serialises a real PEFT model
(experts ``expert_0``, ``expert_1`` with r=4, alpha=8 on q/k/v/o_proj) and router the way
the DyLoRA-MoE training code did. A few faults are made here by editing a clean copy the
way the research code broke it (a deleted expert, a missing nested folder, ...).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from modelkit.formats.open import open_artifact, open_base
from modelkit.ui.cli import main
from modelkit.errors import LoadError
from modelkit.formats import detect
from modelkit.ops.inspect import inspect
from modelkit.testing import build_dylora, write_dylora, write_plain_hf

LAYOUTS = ("a-tiny-config", "a-full-config", "b", "c", "d")
FAULTS = (
    ("adapter-name-twice", "a-tiny-config", "unexpected-tensors"),
    ("adapter-name-twice", "b", "unexpected-tensors"),
    ("adapter-name-twice", "c", "unexpected-tensors"),
    ("empty-expert", "b", "empty-adapter"),
    ("empty-expert", "c", "empty-adapter"),
    ("missing-router", "a-tiny-config", "missing-router"),
    ("missing-router", "b", "missing-router"),
    ("missing-router", "c", "missing-router"),
    ("inconsistent-config", "b", "inconsistent-config"),
    ("inconsistent-config", "c", "inconsistent-config"),
    ("untrained", "c", "untrained-adapter"),
    ("untrained", "a-full-config", "untrained-adapter"),
    ("config-rewritten", "a-full-config", "inconsistent-config"),
    ("config-rewritten", "a-tiny-config", "inconsistent-config"),
)
Q = "model.layers.1.self_attn.q_proj"
SCALING = 8 / 4


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """DyLoRA's base: a tiny gemma with its head untied (a copy of the embeddings)."""
    return write_plain_hf(tmp_path_factory.mktemp("dylora-base") / "gemma", "gemma", tie=False)


@pytest.fixture(scope="module")
def clean(tmp_path_factory, base) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dylora")
    return {layout: write_dylora(root / layout, layout, base) for layout in LAYOUTS}


def copy_of(folder: Path, to: Path) -> Path:
    """A copy of a clean artifact's output directory, returning the same sub-folder in it."""
    out = folder.parent
    shutil.copytree(out, to)
    return to / folder.name


def codes(report, *severities: str) -> set[str]:
    return {f.code for f in report.findings if f.severity.value in severities}


def peft_model(base: Path):
    """The PEFT model the fixtures serialised (same seed, shared and read-only)."""
    return build_dylora(base).foundation_model


# -- detection -----------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_is_detected(clean, layout):
    fmt, found = detect(clean[layout])
    assert (fmt.name, found) == ("dylora-moe", layout)


def test_checkpoints_and_roots_are_detected(clean):
    root = clean["d"]
    assert detect(root / "checkpoint-100")[1] == "c" and detect(root / "checkpoint-50")[1] == "c"
    art = open_artifact(root)  # sources picks best_model/, which is layout b
    assert (art.layout, art.kind, art.folder.name) == ("d", "b", "best_model")
    assert art.describe()["opened"].startswith("best_model/ of the artifact root")
    # one label for both facts (the code "d" stays in records), and inspect shows only it
    assert art.layout_label == "layout b in a W&B artifact root"
    text = inspect(root).summary()
    assert "(layout b in a W&B artifact root)" in text and "(d)" not in text and "layout b)" not in text
    # the trainer's output dir of layout a: best_model/ with dylo_moe_state/ beside it
    assert detect(clean["a-tiny-config"].parent)[1] == "d"


def test_root_without_best_model_opens_the_newest_checkpoint(clean, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(clean["d"], root)
    shutil.rmtree(root / "best_model")
    art = open_artifact(root)
    assert (detect(root)[1], art.layout, art.kind, art.folder.name) == ("d", "d", "c", "checkpoint-100")
    assert not codes(inspect(root), "error", "warning")


@pytest.mark.parametrize("layout", ["a-tiny-config", "a-full-config", "b"])
def test_detected_when_a_loader_rewrote_the_config_to_the_base(clean, base, tmp_path, layout):
    folder = copy_of(clean[layout], tmp_path / "x")
    (folder / "config.json").write_text((base / "config.json").read_text())
    fmt, found = detect(folder)
    assert fmt.name == "dylora-moe" and found[0] == layout[0]
    assert "inconsistent-config" in codes(inspect(folder), "error")


def test_dylora_has_priority_over_peft_and_plain_hf():
    from modelkit.formats import formats
    from modelkit.formats.plain_hf import PlainHF

    order = [f.name for f in formats()]
    assert order.index("dylora-moe") < order.index("peft-lora") < order.index(PlainHF.name)


# -- inventory -----------------------------------------------------------------------------
def test_stored_layout_a_lists_the_wrapper_and_the_state_dir(clean):
    report = inspect(clean["a-tiny-config"])
    roles = {row["name"]: row["role"] for row in report.tensors}
    # router.pt's tensors are named router.* so the inventory gives them the router role
    assert roles["router.gate.weight"] == roles["router.gate_state_dict.weight"] == "router"
    assert roles["router.expert_maturity"] == "router"
    names = set(roles)
    assert f"foundation_model.base_model.model.{Q}.base_layer.weight" in names
    assert f"foundation_model.base_model.model.{Q}.lora_A.expert_1.weight" in names


def test_stored_layout_c_names_expert_tensors_by_folder(clean):
    stored = {t.name: t for t in open_artifact(clean["c"]).stored()}
    name = f"peft_adapters/expert_1/expert_1/base_model.model.{Q}.lora_B.weight"
    assert stored[name].shape == (32, 4) and stored[name].key == f"base_model.model.{Q}.lora_B.weight"
    assert {"gate.weight", "gate.bias"} <= set(stored)
    assert not any("exp_avg" in n for n in stored)  # optimizer.pt is not model state


def test_describe_and_base(clean):
    facts = open_artifact(clean["c"]).describe()
    assert (facts["experts"], facts["r"], facts["alpha"], facts["scaling"], facts["step"]) == (2, 4, 8, SCALING, 100)
    assert facts["targets"] == "k_proj, o_proj, q_proj, v_proj" and facts["router"].startswith("router.safetensors")
    tiny, full = open_artifact(clean["a-tiny-config"]), open_artifact(clean["a-full-config"])
    assert (tiny.base_needs(), tiny.base_name() is not None) == ("config", True)
    assert full.base_name() is None  # weights and full config are inside
    assert open_artifact(clean["b"]).base_needs() == "weights"


# -- the view ------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
def test_view_has_the_base_on_disk_names_and_no_router(clean, base, layout):
    from modelkit.architecture.bridge import expected_tensors

    art = open_artifact(clean[layout])
    view = art.view(open_base(art))
    assert set(view) == set(expected_tensors(art.config()))
    assert art.config().model_type == "gemma"
    assert not view.unplaced and not any("router" in n or "gate.bias" in n for n in view)
    assert "no single dense model" in view.notes[-1]
    W = open_artifact(base).view().produce(f"{Q}.weight")
    assert torch.equal(view.produce(f"{Q}.weight"), W)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_expert_merge_is_w_plus_scaling_b_a(clean, base, layout):
    art = open_artifact(clean[layout])
    expert = art.expert(1)
    A = expert.tensors()[f"base_model.model.{Q}.lora_A.weight"].produce()
    B = expert.tensors()[f"base_model.model.{Q}.lora_B.weight"].produce()
    W = open_artifact(base).view().produce(f"{Q}.weight")
    merged = art.view(open_base(art), expert=1).produce(f"{Q}.weight")
    assert torch.allclose(merged, W + SCALING * B @ A, atol=1e-6)
    assert not torch.equal(merged, W)
    if layout != "d":  # d's best_model is the same model; its checkpoints differ
        layer = peft_model(base).base_model.model.model.layers[1].self_attn.q_proj
        assert torch.allclose(merged, W + layer.get_delta_weight("expert_1"), atol=1e-6)


def test_expert_options_are_checked(clean):
    art = open_artifact(clean["b"])
    with pytest.raises(LoadError, match="mean"):
        art.view(open_base(art), expert="mean")
    with pytest.raises(LoadError, match=r"experts \[0, 1\]"):
        art.view(open_base(art), expert=5)


def test_experts_load_into_peft_and_router_is_the_trained_one(clean, base):
    from peft import set_peft_model_state_dict

    model = build_dylora(base, seed=99)  # same shapes, other values
    for expert in open_artifact(clean["c"]).experts():
        assert (expert.index, expert.r, expert.alpha, expert.scaling) == (expert.index, 4, 8, SCALING)
        assert expert.targets == ["k_proj", "o_proj", "q_proj", "v_proj"]
        result = set_peft_model_state_dict(model.foundation_model, expert.state_dict(), adapter_name=expert.name)
        assert not result.unexpected_keys
    trained = dict(peft_model(base).named_parameters())
    for name, p in model.foundation_model.named_parameters():
        if ".lora_" in name:
            assert torch.equal(p, trained[name]), name
    router = open_artifact(clean["b"]).router()
    gate = build_dylora(base).router.gate
    assert torch.equal(router["weight"], gate.weight) and torch.equal(router["bias"], gate.bias)
    assert (router["temperature"], router["top_k"], router["num_experts"], router["assumed"]) == (2.0, 1, 2, [])
    assert open_artifact(clean["c"]).router()["assumed"] == ["temperature", "top_k"]


def test_base_with_other_shapes_is_refused(clean, tmp_path):
    wide = write_plain_hf(tmp_path / "wide", "gemma", tie=False, num_attention_heads=8)
    art = open_artifact(clean["b"], base=wide)
    with pytest.raises(LoadError, match=r"q_proj\.weight: base \[64, 32\], adapter needs \[32, 32\]"):
        art.view(open_base(art))
    assert "shape-mismatch" in codes(inspect(clean["b"], base=wide), "error")


# -- findings ------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
def test_clean_layouts_have_no_errors_or_warnings(clean, layout):
    report = inspect(clean[layout], deep=True)
    assert not codes(report, "error", "warning"), report.summary()
    assert report.exit_code == 0


@pytest.mark.parametrize("fault,layout,code", FAULTS, ids=[f"{f}-{l}" for f, l, _ in FAULTS])
def test_each_fault_is_reported(tmp_path, base, fault, layout, code):
    folder = write_dylora(tmp_path / "x", layout, base, fault=fault)
    report = inspect(folder, deep=True)
    assert code in codes(report, "error"), report.summary()


def test_adapter_name_twice_explains_the_drop(tmp_path, base):
    folder = write_dylora(tmp_path / "x", "b", base, fault="adapter-name-twice")
    art = open_artifact(folder)
    view = art.view(open_base(art), expert=0)
    assert len(view.unplaced) == 16 and all(".expert_1.expert_1." in t.name for t in view.unplaced)
    [finding] = [f for f in inspect(folder).findings if f.code == "unexpected-tensors"]
    assert "drops them" in finding.message and "base model" in finding.message


def test_untrained_needs_deep(tmp_path, base):
    folder = write_dylora(tmp_path / "x", "c", base, fault="untrained")
    shallow = inspect(folder)
    assert not codes(shallow, "error") and "not-checked" in codes(shallow, "info")


def test_missing_nested_expert_folder(clean, tmp_path):
    folder = copy_of(clean["c"], tmp_path / "x")
    shutil.rmtree(folder / "peft_adapters" / "expert_1" / "expert_1")
    report = inspect(folder)
    [finding] = [f for f in report.findings if f.code == "missing-tensors"]
    assert "expert_1/expert_1/" in finding.message and finding.severity.value == "error"


def test_expert_count_below_num_experts(clean, tmp_path):
    folder = copy_of(clean["b"], tmp_path / "x")
    (folder / "peft_adapters" / "expert_1.pt").unlink()
    report = inspect(folder)
    assert any(f.code == "missing-tensors" and "expert_1 absent" in f.message for f in report.findings)


def test_expert_lacking_modules_the_others_have(clean, tmp_path):
    folder = copy_of(clean["b"], tmp_path / "x")
    path = folder / "peft_adapters" / "expert_1.pt"
    weights = torch.load(path, weights_only=True)
    torch.save({k: v for k, v in weights.items() if ".layers.0.self_attn.q_proj." not in k}, path)
    [finding] = [f for f in inspect(folder).findings if f.code == "missing-tensors"]
    assert "expert_1" in finding.message and "layers.0.self_attn.q_proj" in finding.message


def test_rank_and_alpha_against_the_config(clean, tmp_path):
    folder = copy_of(clean["c"], tmp_path / "r")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "lora_r": 8}))
    assert "inconsistent-config" in codes(inspect(folder), "error")
    folder = copy_of(clean["a-tiny-config"], tmp_path / "alpha")
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["lora_alpha"]
    (folder / "config.json").write_text(json.dumps(cfg))
    assert "inconsistent-config" in codes(inspect(folder), "warning")
    art = open_artifact(folder)
    with pytest.raises(LoadError, match="alpha"):
        art.view(open_base(art), expert=0)
    assert art.view(open_base(art), expert=0, alpha=8).produce(f"{Q}.weight") is not None


def test_cli_exit_codes(clean, tmp_path, base, capsys):
    assert main(["inspect", str(clean["c"])]) == 0
    broken = write_dylora(tmp_path / "x", "c", base, fault="missing-router")
    assert main(["inspect", str(broken)]) == 1
    assert "missing-router" in capsys.readouterr().out
