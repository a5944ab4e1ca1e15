"""Compressed-MoE saves as every version of the compression project's own code writes them
(FORMATS.md section 4.1), used the way the researcher does: inspect a checkpoint or the
experiment folder, load it, export it with --verify, and check the export in a fresh
process with stock transformers against an independent float64 reference."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import modelkit
from modelkit.ui.cli import main
from modelkit.errors import BaseModelUnavailableError, ConfigError
from modelkit.formats.compressed_moe import read_settings_yaml
from modelkit.formats.compressed_moe.reference import reference_model
from modelkit.testing import write_compressed_moe, write_plain_hf
from modelkit.testing.compressed import expert_key, naive_expert, trained_expert_weights
from modelkit.architecture.prompts import prompt_ids
from modelkit.ops.verify import tolerance_for

BF16 = torch.bfloat16
# (name, layout, writer options): every era of the real code, clean
CLEAN = {
    "trainer-5x": ("checkpoint-N", {}),
    "trainer-4x-bf16": ("checkpoint-N", {"dtype": BF16, "transformers_version": "4"}),
    "final-save": ("checkpoint-N", {"final_save": True}),
    "zero-shot": ("checkpoint-0", {}),
    "early-compressed": ("early-compressed", {}),
}


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Path:
    return write_plain_hf(tmp_path_factory.mktemp("orig") / "original", family="qwen3_moe")


@pytest.fixture(scope="module")
def made(tmp_path_factory, original):
    cache: dict = {}

    def make(layout: str, fault: str | None = None, **kw) -> Path:
        key = (layout, fault, tuple(sorted((k, str(v)) for k, v in kw.items())))
        if key not in cache:
            cache[key] = write_compressed_moe(tmp_path_factory.mktemp("exp") / "experiment", layout, original,
                                              fault=fault, **kw)
        return cache[key]
    return make


def loud(report) -> list[str]:
    return [f"{f.code}: {f.message}" for f in report.errors + report.warnings]


def experts_of(model, layer: int, e: int) -> dict[str, torch.Tensor]:
    """An expert's three projections as the loaded (transformers 5, fused) model holds them."""
    experts = model.model.layers[layer].mlp.experts
    gate, up = experts.gate_up_proj[e].chunk(2, dim=0)
    return {"gate_proj": gate, "up_proj": up, "down_proj": experts.down_proj[e]}


def logits(model, ids) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(input_ids=x).logits.double() for x in ids]


def max_diff_and_tolerance(reference: list[torch.Tensor], other: list[torch.Tensor]) -> tuple[float, float]:
    """Max |logit diff| and the float32-vs-float64 tolerance of modelkit.ops.verify for it."""
    diff = max((a - b).abs().max().item() for a, b in zip(reference, other))
    return diff, tolerance_for("float32", max(a.abs().max().item() for a in reference), wide_reference=True)[0]


# --------------------------------------------------------------------------- what the fixtures hold


def test_trainer_checkpoint_holds_what_the_real_trainer_writes(made):
    from safetensors import safe_open

    ckpt = made("checkpoint-N")
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
                 "training_args.bin", "generation_config.json", "non_moe_weights.pt", "compressed_metadata.json"):
        assert (ckpt / name).is_file(), name
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.shared_core_layers.up_proj.core" in keys
    assert "model.layers.0.mlp.shared_core_layers.up_proj.experts.3.core" in keys      # one copy per expert
    assert not any("rotary" in k for k in keys)
    non_moe = torch.load(ckpt / "non_moe_weights.pt", weights_only=True)
    assert {non_moe[f"model.rotary_emb.{k}"].dtype for k in ("inv_freq", "original_inv_freq")} == {torch.float32}
    with pytest.raises(Exception):  # a pickle of a Python object: a safe reader refuses it
        torch.load(ckpt / "training_args.bin", weights_only=True)


def test_config_field_names_follow_the_transformers_version_that_ran(made):
    five = json.loads((made("checkpoint-N") / "config.json").read_text())
    four = json.loads((made("checkpoint-N", dtype=BF16, transformers_version="4") / "config.json").read_text())
    assert {"num_local_experts", "rope_parameters", "dtype"} <= set(five)
    assert {"num_experts", "rope_theta", "torch_dtype"} <= set(four) and four["torch_dtype"] == "bfloat16"
    assert not {"num_local_experts", "rope_parameters", "dtype"} & set(four)


# --------------------------------------------------------------------------- inspect: right findings, no false alarm


@pytest.mark.parametrize("name", CLEAN)
@pytest.mark.parametrize("deep", [False, True])
def test_clean_saves_of_every_era_raise_no_alarm(made, name, deep):
    layout, kw = CLEAN[name]
    report = modelkit.inspect(made(layout, **kw), deep=deep)
    assert report.format == "compressed-moe"
    assert loud(report) == [], report.summary()
    assert report.exit_code == 0


def test_float32_rotary_buffers_beside_a_bf16_model_are_no_dtype_fault(made):
    report = modelkit.inspect(made("checkpoint-N", dtype=BF16, transformers_version="4"))
    assert "dtype-mismatch" not in report.codes
    # the real fault is still seen: fp32 compressed tensors beside a bf16 model
    assert "dtype-mismatch" in modelkit.inspect(made("checkpoint-N", fault="dtype-mismatch")).codes


def test_trainer_copy_is_listed_and_checked_only_under_deep(made):
    ckpt = made("checkpoint-N")
    report = modelkit.inspect(ckpt)
    files = {t["file"] for t in report.tensors}
    assert "model.safetensors" in files and "non_moe_weights.pt" in files
    assert not {"optimizer.pt", "rng_state.pth", "training_args.bin"} & files     # listed as files, never read
    assert "training_args.bin" in report.details["trainer"]
    assert any(f.code == "not-checked" and "--deep" in f.message for f in report.findings)
    deep = modelkit.inspect(ckpt, deep=True)
    assert "equals its shared core (checked)" in deep.details["core"]


def test_trained_copies_that_differ_are_reported_with_the_measured_difference(made):
    ckpt = made("checkpoint-N", fault="trained-copies-differ")
    assert "trained-form-differs" not in {f.code for f in modelkit.inspect(ckpt).warnings}  # needs the data
    report = modelkit.inspect(ckpt, deep=True)
    [finding] = [f for f in report.warnings if f.code == "trained-form-differs"]
    assert "24 of 24 copies differ" in finding.message and "core='copies'" in finding.message
    # the number reported is the real difference between the two forms (test-side float64 truth)
    trained = trained_expert_weights(ckpt)
    shared = {}
    for layer in range(2):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            data = torch.load(ckpt / f"layer_{layer}" / f"{proj}.pt", weights_only=True)
            for e, w in enumerate(data["wrappers"]):
                shared[expert_key(layer, e, proj)] = naive_expert(data["core"], w, torch.float64)
    worst = max((trained[k] - shared[k]).abs().max().item() for k in trained)
    assert f"by up to {worst:.3g}" in finding.message
    # and the logits of the two forms, measured with two float64 references
    ids = prompt_ids(None, 384)
    art = modelkit.open_artifact(ckpt)
    a = logits(reference_model(art, None, core="copies")[0], ids)
    b = logits(reference_model(art, None, core="shared")[0], ids)
    assert f"the logits by up to {max((x - y).abs().max().item() for x, y in zip(a, b)):.3g}" in finding.message


def test_zero_shot_save_whose_original_is_named_nowhere_is_an_error(made, tmp_path):
    import shutil

    folder = shutil.copytree(made("early-compressed"), tmp_path / "compressed")
    (folder / "compression_config.yaml").unlink()
    report = modelkit.inspect(folder)
    assert [f.code for f in report.errors] == ["base-unavailable"] and report.exit_code == 1
    assert main(["inspect", str(folder)]) == 1


def test_settings_yaml_with_python_object_tags_is_read_as_plain_data(made, tmp_path):
    art = modelkit.open_artifact(made("early-compressed"))
    assert art.settings["projections"] == ["gate_proj", "up_proj", "down_proj"] and art.settings["rank"] == 2
    assert art.base is not None and art.base.available            # the original is found from model_name
    # never constructed: a tag that would run a command is read as data
    marker = tmp_path / "EXECUTED"
    text = f"model_name: x\nrank: !!python/object/apply:os.system ['touch {marker}']\n"
    assert read_settings_yaml(text) == {"model_name": "x", "rank": [f"touch {marker}"]}
    assert not marker.exists()


# --------------------------------------------------------------------------- experiment folders


def test_experiment_folder_names_every_save_and_the_crashed_one(made):
    experiment = made("checkpoint-0", fault="crashed-checkpoint")
    report = modelkit.inspect(experiment)
    assert Path(report.folder).name == "checkpoint-0"
    saves = report.details["saves"]
    assert "checkpoint-0/ OPENED (the newest usable checkpoint (newer checkpoint-2/ cannot be used))" in saves
    assert "checkpoint-2/: holds only config.json and generation_config.json: a Trainer save that crashed" in saves
    [w] = [f for f in report.warnings if f.code == "incomplete-checkpoint"]
    assert w.file.endswith("checkpoint-2")
    # opened directly, checkpoint-0 still says a newer save crashed
    direct = modelkit.inspect(experiment / "checkpoints" / "checkpoint-0")
    assert "incomplete-checkpoint" in direct.codes


def test_final_save_in_checkpoints_itself_is_chosen_with_its_settings(made):
    folder = made("checkpoint-N", final_save=True)
    experiment = folder.parent
    art = modelkit.open_artifact(experiment)
    assert art.folder == folder.resolve() and art.layout == "checkpoint-N"
    assert art.settings_file == experiment.resolve() / "compression_config.yaml"   # one level up
    assert "final save" in art.chosen_why and [p.name for p in art.source.checkpoints] == ["checkpoint-10"]


def test_latest_versions_tmp_layout_is_opened_when_checkpoint_0_is_empty(made, original):
    experiment = made("tmp")
    art = modelkit.open_artifact(experiment)
    assert (art.folder.name, art.layout) == ("tmp", "tmp")
    assert art.base.path == original.resolve()
    names = {t.name for t in art.stored()}
    assert "model.layers.1.mlp.shared_core_layers.down_proj.experts.3.input_wrapper.U" in names
    report = modelkit.inspect(experiment)
    assert [f.code for f in report.warnings] == ["incomplete-checkpoint"]
    assert "checkpoint-0/ is empty" in report.warnings[0].message
    assert not report.errors


# --------------------------------------------------------------------------- load: dtype and which core


def test_float32_load_keeps_experts_in_float32(made):
    # bf16 parts: the float32 product of them is not a bf16 number; rounding it would be a 1e-3 error
    ckpt = made("checkpoint-N", dtype=BF16, transformers_version="4")
    truth = trained_expert_weights(ckpt)
    model, _, report = modelkit.load(ckpt, dtype="float32")
    assert report.dtype == "float32"
    worst = max((experts_of(model, layer, e)[proj].double() - truth[expert_key(layer, e, proj)]).abs().max().item()
                for layer in range(2) for e in range(4) for proj in ("gate_proj", "up_proj", "down_proj"))
    rounded = max((truth[k].to(BF16).double() - truth[k]).abs().max().item() for k in truth)
    assert worst < 1e-6 < rounded / 10, (worst, rounded)


def test_load_matches_the_independent_float64_reference(made):
    ckpt = made("checkpoint-N", dtype=BF16, transformers_version="4")
    art = modelkit.open_artifact(ckpt)
    ref, how = reference_model(art, None)
    assert "float64" in how and next(ref.parameters()).dtype == torch.float64
    model, tok, _ = modelkit.load(ckpt, dtype="float32")
    ids = prompt_ids(tok, model.config.vocab_size)
    diff, tol = max_diff_and_tolerance(logits(ref, ids), logits(model, ids))
    assert diff <= tol, (diff, tol)


def test_reference_experts_equal_the_dense_formula(made):
    ckpt = made("checkpoint-N", fault="trained-copies-differ")
    ref, _ = reference_model(modelkit.open_artifact(ckpt), None)
    truth = trained_expert_weights(ckpt)          # dense (I + U V^T) C (I + U V^T), test side
    for layer in range(2):
        for e in range(4):
            for proj, w in experts_of(ref, layer, e).items():
                torch.testing.assert_close(w, truth[expert_key(layer, e, proj)], atol=1e-12, rtol=0)


def test_the_trained_copies_are_the_default_and_the_shared_core_an_option(made):
    ckpt = made("checkpoint-N", fault="trained-copies-differ")
    truth = trained_expert_weights(ckpt, torch.float32)
    model, _, report = modelkit.load(ckpt, dtype="float32")
    assert report.options == {}
    assert any("core='copies' (default: the trained forward used the copies)" in n for n in report.notes)
    torch.testing.assert_close(experts_of(model, 1, 2)["down_proj"], truth[expert_key(1, 2, "down_proj")])

    shared, _, report = modelkit.load(ckpt, dtype="float32", core="shared")
    assert report.options == {"core": "shared"}
    assert not torch.allclose(experts_of(shared, 1, 2)["down_proj"], truth[expert_key(1, 2, "down_proj")])
    result = modelkit.diff(ckpt, ckpt, options_a={"core": "copies"}, options_b={"core": "shared"}, progress=False)
    frame = result.to_frame()
    changed = set(frame[frame["changed"].astype(bool)]["name"])
    assert result.verdict == "different" and len(changed) == 2 * 3 * 4       # every expert, nothing else
    assert all(".mlp.experts." in n for n in changed)


def test_view_option_errors_are_typed(made):
    with pytest.raises(ConfigError, match="core='bogus'"):
        modelkit.load(made("checkpoint-N"), core="bogus")
    with pytest.raises(ConfigError, match="no per-expert core copies"):
        modelkit.load(made("checkpoint-0"), core="copies")


def test_reference_needs_the_original_for_a_zero_shot_save(made):
    art = modelkit.open_artifact(made("checkpoint-0", model_name="Qwen/Qwen3-30B-A3B"))
    with pytest.raises(BaseModelUnavailableError):
        reference_model(art, None)


# --------------------------------------------------------------------------- export --verify, then a fresh process

_STOCK = """
import json, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
assert "modelkit" not in sys.modules
ids = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save([model(input_ids=x).logits.double() for x in ids], sys.argv[3])
"""


@pytest.mark.parametrize("name,core", [("trainer-4x-bf16", None), ("zero-shot", None), ("early-compressed", None),
                                       ("copies-differ", None), ("copies-differ", "shared")])
def test_export_verify_then_stock_transformers_in_a_fresh_process(made, tmp_path, name, core):
    ckpt = (made("checkpoint-N", fault="trained-copies-differ") if name == "copies-differ"
            else made(CLEAN[name][0], **CLEAN[name][1]))
    out = tmp_path / "export"
    options = ["--option", f"core={core}"] if core else []
    assert main(["export", str(ckpt), str(out), "--dtype", "float32", "--verify", *options]) == 0
    record = json.loads((out / "modelkit_export.json").read_text())
    assert record["verification"]["ok"] and "independent float64 reference" in record["verification"]["reference"]
    assert record["verification"]["max_abs_diff"] <= record["verification"]["tolerance"] < 1e-5
    assert any(f"core={core or modelkit.open_artifact(ckpt).default_core()!r}" in n for n in record["notes"])

    art = modelkit.open_artifact(ckpt)
    ref, _ = reference_model(art, art.base.path if art.base else None, core=core)
    ids = prompt_ids(None, ref.config.vocab_size)
    torch.save(ids, tmp_path / "ids.pt")
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", _STOCK, str(out), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
                   check=True, env=env, cwd=tmp_path)
    stock = torch.load(tmp_path / "out.pt")
    diff, tol = max_diff_and_tolerance(logits(ref, ids), stock)
    assert diff <= tol, (diff, tol)


def test_verify_fails_an_export_whose_experts_were_rounded(made, tmp_path, monkeypatch):
    # the old bug: experts rounded to the non-expert dtype on the way; the independent reference sees it
    from modelkit.formats.view import LazyTensor

    ckpt = made("checkpoint-N", dtype=BF16, transformers_version="4")
    original = LazyTensor.produce_as
    monkeypatch.setattr(LazyTensor, "produce_as", lambda self, dtype: original(self, None))
    result = modelkit.export(ckpt, tmp_path / "out", dtype="float32", verify=True, progress=False)
    assert not result.ok and not (tmp_path / "out").exists()
    assert result.verification["max_abs_diff"] > result.verification["tolerance"]


def test_a_crashed_save_opened_directly_says_why(made, tmp_path):
    import shutil

    from modelkit.errors import UnknownFormatError

    experiment = made("checkpoint-0", fault="crashed-checkpoint")
    with pytest.raises(UnknownFormatError, match="checkpoint-2/ holds only config.json .* crashed"):
        modelkit.open_artifact(experiment / "checkpoints" / "checkpoint-2")
    # an experiment whose only save crashed: named, never opened
    lone = tmp_path / "experiment"
    shutil.copytree(experiment / "checkpoints" / "checkpoint-2", lone / "checkpoints" / "checkpoint-2")
    shutil.copy(experiment / "compression_config.yaml", lone)
    with pytest.raises(UnknownFormatError, match="no usable compressed-MoE save"):
        modelkit.inspect(lone)
    assert main(["inspect", str(lone)]) != 0
