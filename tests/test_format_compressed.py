"""Compressed MoE checkpoints (FORMATS.md section 4), used the way a researcher would:
open a checkpoint (or its experiment folder), inspect it, look at its dense view."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modelkit.architecture.bridge import expected_tensors, load_config
from modelkit.formats.open import open_artifact, open_base
from modelkit.ui.cli import main
from modelkit.errors import BaseModelUnavailableError
from modelkit.formats import detect
from hypothesis import example, given, strategies as st

from modelkit.formats.compressed_moe import _layer_file_part, _layer_name, materialize, parse_compressed_name
from modelkit.ops.inspect import inspect
from modelkit.testing import naive_expert, write_compressed_moe, write_plain_hf

LAYOUTS = ("checkpoint-N", "checkpoint-0", "documented")
ROUTER = "model.layers.0.mlp.gate.weight"



@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Path:
    """The tiny qwen3_moe every compressed fixture was compressed from."""
    return write_plain_hf(tmp_path_factory.mktemp("orig") / "original", family="qwen3_moe")


@pytest.fixture(scope="module")
def made(tmp_path_factory, original):
    """``made(layout, fault=None, **kw)``: a compressed checkpoint, written once per module."""
    cache: dict = {}

    def make(layout: str, fault: str | None = None, **kw) -> Path:
        key = (layout, fault, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = write_compressed_moe(tmp_path_factory.mktemp("exp") / "experiment", layout,
                                              original, fault=fault, **kw)
        return cache[key]
    return make


def clone(ckpt: Path, dest: Path) -> Path:
    """A copy of the whole experiment folder (so edits never touch the shared fixture)."""
    root = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt
    shutil.copytree(root, dest / root.name)
    return dest / root.name / ckpt.relative_to(root)


def shapes(view) -> dict[str, tuple[int, ...]]:
    return {n: tuple(t.shape) for n, t in view.items()}


def problems(report) -> list[str]:
    return [f"{f.severity.value} {f.code}: {f.message}" for f in report.errors + report.warnings]


# --------------------------------------------------------------------------- detection and settings


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_is_detected(made, layout):
    fmt, found = detect(made(layout))
    assert (fmt.name, found) == ("compressed-moe", layout)


def test_experiment_folder_opens_its_latest_checkpoint(made, tmp_path):
    ckpt = clone(made("checkpoint-N"), tmp_path)          # .../experiment/checkpoints/checkpoint-10
    for step in (5, 20):
        shutil.copytree(ckpt, ckpt.parent / f"checkpoint-{step}")
    experiment = ckpt.parent.parent

    art = open_artifact(experiment)
    assert art.folder.name == "checkpoint-20"
    assert [p.name for p in art.source.checkpoints] == ["checkpoint-5", "checkpoint-10"]
    assert inspect(experiment).checkpoints[-1].endswith("checkpoint-10")

    # pointed at one checkpoint, its siblings are listed too
    direct = open_artifact(ckpt)
    assert sorted(p.name for p in direct.source.checkpoints) == ["checkpoint-20", "checkpoint-5"]


def test_settings_two_levels_up(made):
    art = open_artifact(made("checkpoint-N"))
    assert art.settings_file.name == "compression_config.yaml"
    assert art.settings_file.parent == art.folder.parent.parent
    assert art.settings["rank"] == 2 and art.settings["projections"] == ["gate_proj", "up_proj", "down_proj"]
    assert "compression_fraction" in art.statistics


def test_settings_in_the_checkpoint_itself(made, original):
    art = open_artifact(made("documented"))
    assert art.settings_file == art.folder / "compression_config.json"
    assert "compression_fraction" in art.statistics            # compression_statistics.yaml
    assert Path(art.original_name()) == original.absolute()
    assert art.describe()["original"].startswith(str(original.absolute()))


def test_complete_checkpoint_needs_no_base_but_zero_shot_does(made, original):
    full = open_artifact(made("checkpoint-N"))
    assert full.base is None and full.base_needs() == "config"
    zero = open_artifact(made("checkpoint-0"))
    assert zero.base.path == original.resolve() and zero.base_needs() == "weights"


def test_relative_model_name_is_found_beside_the_settings_file(made, original, tmp_path, monkeypatch):
    # the researcher ran from the repository root: model_name is relative to it, not to us
    repo = tmp_path / "repo"
    (repo / "models").mkdir(parents=True)
    (repo / "models" / "original").symlink_to(original, target_is_directory=True)
    ckpt = write_compressed_moe(repo / "models" / "qwen3" / "exp1", "checkpoint-0", original,
                                model_name="models/original")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    art = open_artifact(ckpt)
    assert art.settings["model_name"] == "models/original"
    assert art.base.path == original.resolve()
    assert not inspect(ckpt).errors


def test_zero_shot_save_whose_original_is_missing_is_an_error(made):
    # a zero-shot save is only experts: without its original nothing can be built
    ckpt = made("checkpoint-0", model_name="Qwen/Qwen3-30B-A3B")
    report = inspect(ckpt)
    assert {"base-required", "base-unavailable"} <= report.codes
    assert [f.code for f in report.errors] == ["base-unavailable"] and report.exit_code == 1
    assert "Qwen/Qwen3-30B-A3B" in report.errors[0].message
    with pytest.raises(BaseModelUnavailableError, match="Qwen/Qwen3-30B-A3B"):
        open_artifact(ckpt).view()


# --------------------------------------------------------------------------- stored tensors


def test_stored_names_are_the_compressed_models_in_memory_names(made):
    art = open_artifact(made("checkpoint-0"))
    names = {t.name: t for t in art.stored()}
    core = names["model.layers.1.mlp.shared_core_layers.up_proj.core"]
    assert (core.file, core.key) == ("layer_1/up_proj.pt", "core")
    u_in = names["model.layers.1.mlp.shared_core_layers.up_proj.experts.3.input_wrapper.U"]
    assert (u_in.file, u_in.key) == ("layer_1/up_proj.pt", "wrappers.3.U_in")
    assert parse_compressed_name(u_in.name) == (1, "up_proj", 3, "U_in")
    original = names["extracted_weights.model.layers.1.mlp.experts.3.up_proj.weight"]
    assert (original.file, original.key) == ("extracted_weights/layer_1_up_proj.pt", "expert_weights.3")
    roles = {r["role"] for r in inspect(made("checkpoint-0")).tensors}
    assert roles == {"expert"}


_KEY_PART = st.sampled_from(["wrappers", "biases", "core", "bias", "U_in", "V_in", "U_out", "V_out",
                             "0", "17", "007", "\u00b2", "\u0663", "x", "layers", "mlp",
                             "shared_core_layers", "experts", "input_wrapper", "U", ""])


@given(layer=st.integers(0, 99), proj=st.sampled_from(["gate_proj", "up_proj", "a.b", "x"]),
       key=st.lists(_KEY_PART, min_size=1, max_size=5).map(".".join))
@example(layer=3, proj="up_proj", key="wrappers.7.U_in")
@example(layer=3, proj="up_proj", key="wrappers.007.V_out")
@example(layer=3, proj="up_proj", key="wrappers.7.core")
@example(layer=3, proj="up_proj", key="wrappers.7.bias")
@example(layer=3, proj="up_proj", key="wrappers.\u00b2.U_in")
@example(layer=3, proj="up_proj", key="biases.4")
@example(layer=3, proj="up_proj", key="biases")
@example(layer=3, proj="up_proj", key="core")
@example(layer=3, proj="up_proj", key="bias")
@example(layer=3, proj="a.b", key="wrappers.7.U_in")
@example(layer=3, proj="up_proj", key="wrappers.7.U_in.x")
@example(layer=3, proj="up_proj", key="model.layers.5.mlp.shared_core_layers.gate_proj.core")
def test_layer_file_keys_parse_as_their_in_memory_names(layer, proj, key):
    # the shortcut for the keys torch.save writes gives what matching the name gives
    assert _layer_file_part(layer, proj, key) == parse_compressed_name(_layer_name(layer, proj, key))


# --------------------------------------------------------------------------- the dense view


@pytest.mark.parametrize("layout", LAYOUTS)
def test_view_is_exactly_the_original_checkpoints_key_space(made, original, layout):
    art = open_artifact(made(layout))
    view = art.view(open_base(art))
    want = {n: t.shape for n, t in expected_tensors(load_config(original)).items()}
    assert shapes(view) == want
    assert set(view) == set(load_file(original / "model.safetensors"))   # what save_pretrained wrote
    assert view.unplaced == []


def test_every_expert_equals_the_dense_formula(made):
    ckpt = made("checkpoint-N")
    view = open_artifact(ckpt).view()
    checked = 0
    for layer_file in sorted(ckpt.glob("layer_*/*.pt")):
        data = torch.load(layer_file, weights_only=True)
        for e, wrapper in enumerate(data["wrappers"]):
            name = f"model.layers.{data['layer_idx']}.mlp.experts.{e}.{data['projection']}.weight"
            got = view.produce(name)
            assert got.dtype == torch.float32 and view[name].dtype == "float32"
            torch.testing.assert_close(got, naive_expert(data["core"], wrapper), atol=1e-5, rtol=0)
            checked += 1
    assert checked == 2 * 3 * 4


def test_materialize_never_needs_the_identity():
    torch.manual_seed(0)
    d_out, d_in, r = 48, 80, 6
    core = torch.randn(d_out, d_in)
    w = {"U_in": torch.randn(d_in, r), "V_in": torch.randn(d_in, r),
         "U_out": torch.randn(d_out, r), "V_out": torch.randn(d_out, r)}
    dense = (torch.eye(d_out) + w["U_out"] @ w["V_out"].T) @ core @ (torch.eye(d_in) + w["U_in"] @ w["V_in"].T)
    got = materialize(core, w["U_in"], w["V_in"], w["U_out"], w["V_out"])
    torch.testing.assert_close(got, dense, atol=1e-3, rtol=1e-5)
    half = materialize(core.bfloat16(), *(w[k].bfloat16() for k in ("U_in", "V_in", "U_out", "V_out")),
                       dtype=torch.float32)
    assert half.dtype == torch.float32


def test_router_is_the_distilled_one_not_the_originals(made, original):
    ckpt = made("checkpoint-N")
    trained = torch.load(ckpt / "non_moe_weights.pt", weights_only=True)[ROUTER]
    before = load_file(original / "model.safetensors")[ROUTER]
    got = open_artifact(ckpt).view().produce(ROUTER)
    assert torch.equal(got, trained)
    assert not torch.equal(got, before)


def test_zero_shot_checkpoint_takes_non_experts_from_the_original(made, original):
    art = open_artifact(made("checkpoint-0"))
    view = art.view(open_base(art))
    before = load_file(original / "model.safetensors")
    non_experts = [n for n in view if ".experts." not in n]
    assert ROUTER in non_experts and "model.embed_tokens.weight" in non_experts
    for name in non_experts:
        assert torch.equal(view.produce(name), before[name]), name
    # while every expert is the compressed one, not the original's
    expert = "model.layers.0.mlp.experts.1.gate_proj.weight"
    assert view[expert].origin.startswith("compressed:")
    assert not torch.equal(view.produce(expert), before[expert])


def test_never_compressed_layers_come_from_the_original(made, original, tmp_path):
    ckpt = clone(made("checkpoint-N"), tmp_path)
    shutil.rmtree(ckpt / "layer_1")
    meta = json.loads((ckpt / "compressed_metadata.json").read_text())
    meta.update(compressed_layer_indices=[0], num_compressed_layers=1)
    (ckpt / "compressed_metadata.json").write_text(json.dumps(meta))

    art = open_artifact(ckpt)
    assert art.base_needs() == "weights" and art.base.path == original.resolve()
    view = art.view(open_base(art))
    before = load_file(original / "model.safetensors")
    name = "model.layers.1.mlp.experts.2.down_proj.weight"
    assert torch.equal(view.produce(name), before[name])
    assert view["model.layers.0.mlp.experts.2.down_proj.weight"].origin.startswith("compressed:")
    assert not inspect(ckpt).errors


def test_compressed_tensors_saved_under_in_memory_names_are_understood(made, tmp_path):
    ckpt = clone(made("checkpoint-N"), tmp_path)
    reference = open_artifact(made("checkpoint-N")).view()
    data = torch.load(ckpt / "layer_0" / "gate_proj.pt", weights_only=True)
    (ckpt / "layer_0" / "gate_proj.pt").unlink()
    non_moe = torch.load(ckpt / "non_moe_weights.pt", weights_only=True)
    pre = "model.layers.0.mlp.shared_core_layers.gate_proj"
    non_moe[f"{pre}.core"] = data["core"]
    for e, w in enumerate(data["wrappers"]):
        for key, leaf in (("U_in", "input_wrapper.U"), ("V_in", "input_wrapper.V"),
                          ("U_out", "output_wrapper.U"), ("V_out", "output_wrapper.V")):
            non_moe[f"{pre}.experts.{e}.{leaf}"] = w[key]
    torch.save(non_moe, ckpt / "non_moe_weights.pt")

    view = open_artifact(ckpt).view()
    name = "model.layers.0.mlp.experts.3.gate_proj.weight"
    torch.testing.assert_close(view.produce(name), reference.produce(name), atol=1e-6, rtol=0)
    assert set(view) == set(reference) and view.unplaced == []
    assert not problems(inspect(ckpt))


def test_stored_bias_without_a_slot_in_the_model_is_unplaced(made):
    ckpt = made("checkpoint-N", biases=True)          # qwen3_moe experts have no bias
    view = open_artifact(ckpt).view()
    assert len(view.unplaced) == 2 * 3 * 4
    assert all(t.name.endswith(".bias") for t in view.unplaced)
    report = inspect(ckpt)
    assert "unexpected-tensors" in {f.code for f in report.errors}


# --------------------------------------------------------------------------- findings


@pytest.mark.parametrize("layout", LAYOUTS)
def test_clean_checkpoints_have_no_error_and_no_warning(made, layout):
    report = inspect(made(layout))
    assert problems(report) == []
    assert report.exit_code == 0


@pytest.mark.parametrize("layout", ("checkpoint-N", "documented"))
def test_save_without_non_moe_weights(made, layout):
    report = inspect(made(layout, "no-non-moe"))
    missing = [f for f in report.errors if f.code == "missing-tensors"]
    assert any("random" in f.message and "router" in f.message for f in missing)
    assert ROUTER in missing[0].tensors and "model.embed_tokens.weight" in missing[0].tensors
    assert report.exit_code == 1
    assert "MISSING" in report.details["router"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_missing_projection_file_is_not_filled_from_the_original(made, layout):
    ckpt = made(layout, "missing-projection")
    art = open_artifact(ckpt)
    assert (1, "down_proj") in art.missing_projections()
    assert "model.layers.1.mlp.experts.0.down_proj.weight" not in art.view(open_base(art))
    report = inspect(ckpt)
    finding = next(f for f in report.errors if f.code == "missing-tensors" and "layer_1/down_proj.pt" in f.message)
    assert len(finding.tensors) == 4
    assert report.exit_code == 1


def test_per_expert_core_copies(made):
    ckpt = made("checkpoint-N", "duplicated-buffers")
    report = inspect(ckpt, deep=True)
    (finding,) = [f for f in report.findings if f.code == "duplicated-buffers"]
    assert finding.severity.value == "warning"
    assert len(finding.tensors) == 2 * 3 * 4 and "wasted" in finding.message
    assert "every copy equals its shared core" in finding.message
    assert not report.errors
    view = open_artifact(ckpt).view()                   # the copies are ignored, not dropped silently
    assert view.unplaced == [] and any("redundant" in n for n in view.notes)


def test_fp32_compressed_tensors_beside_bf16_weights(made):
    ckpt = made("checkpoint-N", "dtype-mismatch")
    report = inspect(ckpt)
    assert [f.code for f in report.warnings] == ["dtype-mismatch"]
    assert "float32" in report.warnings[0].message and "bfloat16" in report.warnings[0].message
    view = open_artifact(ckpt).view()
    expert = "model.layers.0.mlp.experts.0.up_proj.weight"
    assert view[expert].dtype == "bfloat16" and view.produce(expert).dtype == torch.bfloat16


def test_fp32_zero_shot_compression_of_a_bf16_original(tmp_path):
    original = write_plain_hf(tmp_path / "original-bf16", family="qwen3_moe", dtype=torch.bfloat16)
    ckpt = write_compressed_moe(tmp_path / "experiment", "checkpoint-0", original)   # fp32 tensors
    report = inspect(ckpt)
    assert [f.code for f in report.warnings] == ["dtype-mismatch"]
    assert "original model's non-expert tensors are bfloat16" in report.warnings[0].message
    art = open_artifact(ckpt)
    assert art.view(open_base(art))["model.layers.1.mlp.experts.0.down_proj.weight"].dtype == "bfloat16"


def test_metadata_that_contradicts_the_tensors(made, tmp_path):
    ckpt = clone(made("checkpoint-N"), tmp_path)
    meta = json.loads((ckpt / "compressed_metadata.json").read_text())
    meta.update(num_compressed_layers=5, total_layers=48)
    (ckpt / "compressed_metadata.json").write_text(json.dumps(meta))
    data = torch.load(ckpt / "layer_0" / "up_proj.pt", weights_only=True)
    data["metadata"]["rank"] = 64
    torch.save(data, ckpt / "layer_0" / "up_proj.pt")

    report = inspect(ckpt)
    (finding,) = [f for f in report.findings if f.code == "inconsistent-config"]
    assert finding.severity.value == "warning"
    for fact in ("num_compressed_layers is 5", "total_layers is 48", "rank = 64"):
        assert fact in finding.message


def test_fewer_expert_wrappers_than_the_model_has_experts(made, tmp_path):
    ckpt = clone(made("checkpoint-N"), tmp_path)
    data = torch.load(ckpt / "layer_1" / "gate_proj.pt", weights_only=True)
    data["wrappers"] = data["wrappers"][:3]
    torch.save(data, ckpt / "layer_1" / "gate_proj.pt")

    report = inspect(ckpt)
    assert any(f.code == "inconsistent-config" and "3 expert wrappers" in f.message for f in report.errors)
    assert "model.layers.1.mlp.experts.3.gate_proj.weight" in next(
        f for f in report.errors if f.code == "missing-tensors").tensors


def test_wrapper_of_the_wrong_shape(made, tmp_path):
    ckpt = clone(made("checkpoint-N"), tmp_path)
    data = torch.load(ckpt / "layer_0" / "down_proj.pt", weights_only=True)
    data["wrappers"][2]["V_out"] = torch.zeros(5, 2)
    torch.save(data, ckpt / "layer_0" / "down_proj.pt")

    view = open_artifact(ckpt).view()
    assert "model.layers.0.mlp.experts.2.down_proj.weight" not in view
    report = inspect(ckpt)
    bad = next(f for f in report.errors if f.code == "inconsistent-config")
    assert "V_out [5, 2]" in bad.message
    assert "unexpected-tensors" not in report.codes      # explained by the finding above


# --------------------------------------------------------------------------- command line


def test_cli_exit_codes(made, tmp_path, capsys):
    assert main(["inspect", str(made("checkpoint-N"))]) == 0
    out = capsys.readouterr().out
    assert "compressed-moe (checkpoint-N)" in out and "trained, from non_moe_weights.pt" in out
    assert main(["inspect", str(made("checkpoint-N", "missing-projection"))]) == 1
    assert "layer_1/down_proj.pt is missing" in capsys.readouterr().out
    assert main(["inspect", str(made("checkpoint-N", "no-non-moe")), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["format"] == "compressed-moe"
    assert main(["inspect", str(tmp_path / "nothing-here")]) == 2
    experiment = made("checkpoint-0").parent.parent
    assert main(["inspect", str(experiment)]) == 0
    assert "checkpoint-0" in capsys.readouterr().out
