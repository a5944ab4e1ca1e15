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
# -- the per-expert view of a DyLoRA-MoE (one row per expert, then the router) -------------------

def _by_expert(report) -> dict:
    return {r["expert"]: r for r in report.experts}


def test_a_mixture_lists_every_expert_and_its_router_and_does_not_guess_training(catalog):
    report = modelkit.inspect(catalog["dylora-b"])
    rows = _by_expert(report)
    assert list(rows) == ["expert_0", "expert_1", "router"]
    for k in ("expert_0", "expert_1"):
        assert rows[k]["present"] == "yes" and rows[k]["tensors"] == 16 and rows[k]["rank"] == "4"
        assert rows[k]["trained"] == "not checked (deep off)" and rows[k]["norm_B"] is None
        assert rows[k]["file"] == f"peft_adapters/{k}.pt" and rows[k]["scaling"] == 2.0
    assert rows["router"]["present"] == "yes" and rows["router"]["shape"] == [2, 32]
    assert rows["router"]["file"] == "dylo_moe_state/router.pt"
    assert rows["router"]["trained"].startswith("not checked")
    frame = report.experts_frame()                             # the same rows as a DataFrame
    assert list(frame.expert) == ["expert_0", "expert_1", "router"]
    assert json.loads(report.to_json())["experts"][2]["shape"] == [2, 32]


def test_deep_measures_each_expert_against_an_independent_read_of_its_files(catalog):
    import torch
    from safetensors.torch import load_file

    folder = catalog["dylora-c"]                               # the late era: nested PEFT folders
    rows = _by_expert(modelkit.inspect(folder, deep=True))
    for k in (0, 1):
        sd = load_file(folder / f"peft_adapters/expert_{k}/expert_{k}/adapter_model.safetensors")
        pairs = [(sd[n].double(), sd[n.replace("lora_A", "lora_B")].double()) for n in sd if "lora_A" in n]
        norm_b = sum(float(b.norm() ** 2) for _, b in pairs) ** 0.5
        norm_ba = sum(float(torch.linalg.matrix_norm(b @ a) ** 2) for a, b in pairs) ** 0.5
        row = rows[f"expert_{k}"]
        assert row["trained"] == "yes"
        assert row["norm_B"] == pytest.approx(norm_b, rel=1e-12)
        assert row["norm_BA"] == pytest.approx(norm_ba, rel=1e-9)


@pytest.mark.parametrize("name,expert,present,trained", [
    ("dylora-untrained", "expert_1", "yes", "no (every LoRA B is zero)"),
    ("dylora-empty-expert", "expert_1", "MISSING (empty file)", "no (nothing stored)"),
    ("dylora-adapter-name-twice", "expert_1", "unplaceable (16 tensor(s) no loader places)",
     "no (a loader drops its tensors)"),
])
def test_the_per_expert_table_shows_each_dropped_or_untrained_expert(catalog, name, expert, present, trained):
    rows = _by_expert(modelkit.inspect(catalog[name], deep=True))
    assert rows[expert]["present"] == present and rows[expert]["trained"] == trained
    if name != "dylora-untrained":
        assert rows["expert_0"]["trained"] == "yes"            # the healthy expert beside it


def test_a_missing_router_is_a_row_not_a_silence(catalog):
    report = modelkit.inspect(catalog["dylora-missing-router"])
    router = _by_expert(report)["router"]
    assert router["present"].startswith("MISSING") and router["tensors"] == 0 and router["shape"] is None
    assert "router" in report.summary() and "MISSING (no trained router" in report.summary()


def test_only_expert_0_trained_the_normal_case_of_the_real_code(catalog, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "ckpt"
    shutil.copytree(catalog["dylora-c"], folder)
    f = folder / "peft_adapters/expert_1/expert_1/adapter_model.safetensors"
    sd = load_file(f)
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in sd.items()}, f)
    report = modelkit.inspect(folder, deep=True)
    rows = _by_expert(report)
    assert rows["expert_0"]["trained"] == "yes" and rows["expert_1"]["trained"] == "no (every LoRA B is zero)"
    assert rows["expert_1"]["norm_B"] == 0.0 and rows["expert_1"]["norm_BA"] == 0.0
    assert "untrained-adapter" in {w.code for w in report.warnings}    # a warning: the mixture still moved


@pytest.mark.parametrize("name", ["dylora-early-best", "dylora-late-best", "dylora-early-checkpoint"])
def test_every_save_era_gets_a_per_expert_table_over_the_tied_bf16_base(catalog, name):
    report = modelkit.inspect(catalog[name], deep=True)
    rows = _by_expert(report)
    assert [k for k in rows if k != "router"] == ["expert_0", "expert_1"]
    assert all(rows[k]["trained"] == "yes" and rows[k]["norm_BA"] > 0 for k in ("expert_0", "expert_1"))
    assert rows["router"]["present"] == "yes" and rows["router"]["shape"][0] == 2
    if name == "dylora-early-checkpoint":                       # alpha recorded nowhere: scale unknown
        assert rows["expert_0"]["scaling"] is None


def test_an_artifact_without_adapter_experts_has_no_expert_rows(catalog):
    for name in ("plain-llama", "plain-qwen3-moe-sharded"):
        report = modelkit.inspect(catalog[name])
        assert report.experts == [] and report.experts_frame().empty
        assert "present; trained" not in report.summary()


def test_cli_prints_the_per_expert_table(catalog, capsys):
    assert main(["inspect", str(catalog["dylora-untrained"]), "--deep"]) == 1
    out = capsys.readouterr().out
    assert "norm_BA" in out and "no (every LoRA B is zero)" in out
    assert main(["inspect", str(catalog["dylora-b"])]) == 0
    out = capsys.readouterr().out
    assert "not checked (deep off)" in out and "norm_BA" not in out


def test_the_parameter_tree_totals_each_node_and_follows_the_search(catalog):
    import html as html_module
    import re

    from modelkit.present.tables import parameter_tree

    report = modelkit.inspect(catalog["plain-qwen3-moe-sharded"])
    tree = parameter_tree(report)
    layer0 = [t for t in report.tensors if t["name"].startswith("model.layers.0.")]
    params = sum(t["numel"] for t in layer0)
    text = re.sub(r"\s+", " ", html_module.unescape(re.sub(r"<[^>]+>", " ", tree._repr_html_())))
    assert f"0 {len(layer0)} tensors · {params:,} params" in text           # the node of layer 0
    total = sum(t["numel"] for t in report.tensors if t["name"].startswith("model."))
    assert f"model {sum(t['name'].startswith('model.') for t in report.tensors)} tensors · {total:,} params" in text
    found = parameter_tree(report, "layers.1. q_proj")
    assert "1 of" in found and "<details class='mk-node' open" in found and "k_proj" not in found
    assert "No stored tensor matches" in parameter_tree(report, "no-such-tensor")
