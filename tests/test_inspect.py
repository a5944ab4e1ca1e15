"""`modelkit inspect` over one artifact of every layout and fault (modelkit.testing catalog).

Each faulty artifact must report its finding code; each clean one must report no error
and no warning (a false alarm is a bug); unreadable input raises a typed error naming the
file and leaves nothing behind.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import modelkit
from modelkit import errors
from modelkit.ui.cli import main
from modelkit.testing.catalog import ENTRIES

READABLE = [e for e in ENTRIES if e.raises is None or e.expected_codes]
RAISING = [e for e in ENTRIES if e.raises is not None and not e.expected_codes]


def _tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink():
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("entry", READABLE, ids=lambda e: e.name)
def test_inspect_reports_exactly_the_faults_of_each_artifact(catalog, entry):
    folder = catalog[entry.name]
    before = _tree_digest(folder.parent)
    # all-zero LoRA B can only be seen in the data: that check needs deep=True
    report = modelkit.inspect(folder, deep=bool({"untrained-adapter", "trained-form-differs"} & set(entry.expected_codes)))
    assert report.format == entry.format
    assert set(entry.expected_codes) <= report.codes, report.summary()
    # nothing beyond what the fixture reproduces is raised to warning or error
    loud = {f.code for f in report.errors + report.warnings}
    assert loud <= set(entry.expected_codes), report.summary()
    assert report.exit_code == (1 if report.errors else 0)
    assert _tree_digest(folder.parent) == before, "inspect must never write into the artifact"


def test_clean_artifacts_are_complete_and_list_every_tensor(catalog):
    report = modelkit.inspect(catalog["plain-sharded"])
    assert report.layout == "sharded-safetensors"
    assert report.errors == [] and report.warnings == []
    frame = report.to_frame()
    assert list(frame.columns) == ["name", "shape", "dtype", "numel", "bytes", "file", "role", "layer", "expert"]
    assert frame["file"].nunique() == 3  # three shards
    assert report.parameters == int(frame["numel"].sum()) > 0
    groups = {g["group"]: g for g in report.groups}
    assert groups["attention"]["missing"] == 0 and groups["attention"]["present"] > 0
    assert all(g["missing"] == g["unexpected"] == g["mismatched"] == 0 for g in report.groups)


def test_tied_head_is_not_reported_missing(catalog):
    report = modelkit.inspect(catalog["plain-gemma-tied"])
    assert "lm_head.weight" not in {t["name"] for t in report.tensors}
    assert "missing-tensors" not in report.codes


def test_moe_checkpoint_is_audited_in_the_per_expert_key_space(catalog):
    report = modelkit.inspect(catalog["plain-qwen3-moe-sharded"])
    experts = [t for t in report.tensors if t["role"] == "expert"]
    assert experts and {t["expert"] for t in experts} == {0, 1, 2, 3}
    assert not report.errors


def test_a_removed_tensor_is_reported_missing(tmp_path, catalog):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "partial"
    shutil.copytree(catalog["plain-llama"], folder)
    tensors = load_file(folder / "model.safetensors")
    gone = "model.layers.1.self_attn.k_proj.weight"
    del tensors[gone]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    report = modelkit.inspect(folder)
    missing = next(f for f in report.findings if f.code == "missing-tensors")
    assert missing.severity.value == "error" and missing.tensors == [gone]


@pytest.mark.parametrize("entry", RAISING, ids=lambda e: e.name)
def test_unreadable_input_raises_a_typed_error_naming_the_file(catalog, entry):
    folder = catalog[entry.name]
    with pytest.raises(getattr(errors, entry.raises)) as e:
        modelkit.inspect(folder)
    assert isinstance(e.value, errors.ModelkitError)
    assert str(folder) in str(e.value) or (e.value.path and Path(e.value.path).is_relative_to(folder.parent))


@pytest.mark.parametrize("name", ["bad-truncated", "bad-absurd-header", "bad-offsets-outside",
                                  "bad-overlapping-offsets", "bad-evil-pickle"])
def test_corrupt_files_become_findings_that_name_the_file(catalog, name):
    report = modelkit.inspect(catalog[name])
    bad = [f for f in report.errors if f.code in ("corrupt-file", "unsafe-pickle")]
    assert bad and bad[0].file and Path(bad[0].file).exists()
    if name == "bad-evil-pickle":
        assert not any(p.name == "PWNED" for p in catalog[name].parent.rglob("*")), "pickle code ran"


def test_cli_prints_a_summary_and_exits_by_severity(catalog, capsys):
    assert main(["inspect", str(catalog["plain-llama"])]) == 0
    out = capsys.readouterr().out
    assert "format  plain-hf (safetensors)" in out and "no findings" in out
    assert main(["inspect", str(catalog["dylora-missing-router"])]) == 1
    assert "missing-router" in capsys.readouterr().out
    assert main(["inspect", str(catalog["bad-malformed-config"])]) == 2
    err = capsys.readouterr().err
    assert "ConfigError" in err and "config.json" in err
    assert main(["inspect", "/no/such/artifact"]) == 2


def test_cli_json_has_the_documented_keys(catalog, capsys):
    assert main(["inspect", str(catalog["dylora-adapter-name-twice"]), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    for key in ("format", "layout", "base_model", "tensors", "parameters", "bytes", "groups", "findings"):
        assert key in data
    finding = next(f for f in data["findings"] if f["code"] == "unexpected-tensors")
    assert finding["severity"] == "error" and any("expert_1.expert_1" in t for t in finding["tensors"])


def test_deep_inspection_finds_untrained_adapters_that_headers_cannot(catalog):
    shallow = modelkit.inspect(catalog["peft-lora-untrained"])
    assert "untrained-adapter" not in shallow.codes and "not-checked" in shallow.codes
    deep = modelkit.inspect(catalog["peft-lora-untrained"], deep=True)
    assert "untrained-adapter" in {f.code for f in deep.errors}
    assert "untrained-adapter" not in modelkit.inspect(catalog["peft-lora"], deep=True).codes


def test_the_base_model_is_named_once(catalog):
    report = modelkit.inspect(catalog["peft-lora"])
    base = str(catalog["plain-llama"])
    line = next(l for l in report.summary().splitlines() if l.startswith("  base "))
    assert line.count(base) == 1 and line.endswith("(local folder)"), line
