"""DyLoRA-MoE as every era of the real training code leaves it (FORMATS.md §3.1), over the
real base's properties: a TIED gemma whose config says bfloat16.

``modelkit.testing.write_dylora_run`` writes the trainer's whole ``output_dir`` per era:
``best_model/`` plus ``checkpoint-50/`` and ``checkpoint-100/``, each from its own model.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import modelkit
from modelkit.errors import ConfigError, ModelkitError
from modelkit.testing import write_dylora, write_dylora_run, write_plain_hf

ALPHA = 8  # what the fixtures trained with; early checkpoints record it nowhere


@pytest.fixture(scope="module")
def tied(tmp_path_factory) -> Path:
    """The real base's shape: gemma with lm_head tied to embed_tokens, config in bfloat16."""
    base = write_plain_hf(tmp_path_factory.mktemp("tied") / "gemma", "gemma", dtype=torch.bfloat16)
    cfg = json.loads((base / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["dtype"] == "bfloat16"
    return base


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tied) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    eras = ("early", "middle", "middle-config", "middle-peft-only", "late")
    return {era: write_dylora_run(root / era, era, tied) for era in eras}


def loud(report) -> set[str]:
    return {f.code for f in report.errors + report.warnings}


# -- item 1: routed loads over a tied base ---------------------------------------------------
@pytest.mark.parametrize("layout", ["a-tiny-config", "b", "c"])
@pytest.mark.parametrize("routing", ["router", "mean", "expert:1"])
def test_routed_load_over_a_tied_base(tmp_path_factory, tied, layout, routing):
    folder = write_dylora(tmp_path_factory.mktemp(layout), layout, tied)
    model, _, report = modelkit.load(folder, routing=routing, dtype="float32")
    dense = modelkit.load(folder, expert=1, dtype="float32").model
    ids = torch.tensor([[2, 5, 9, 14, 7, 3]])
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all() and report.mode == "routed"
    if routing == "expert:1":
        torch.testing.assert_close(logits, dense(ids).logits, atol=1e-5, rtol=0)


def test_auto_from_pretrained_over_a_tied_base(tmp_path, tied):
    folder = write_dylora(tmp_path / "b", "b", tied)
    code = ("import modelkit, torch\nfrom transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(folder)!r}, routing='expert:0', dtype=torch.float32)\n"
            "print(type(m).__name__, m(torch.tensor([[2, 5, 9]])).logits.shape[-1])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[0] == "DyLoRAMoEForCausalLM"


# -- every era: the right findings, no false alarm ---------------------------------------------
@pytest.mark.parametrize("era", ["early", "middle", "middle-config", "middle-peft-only", "late"])
def test_best_model_of_every_era_is_clean(runs, era):
    report = modelkit.inspect(runs[era] / "best_model", deep=True)
    assert loud(report) == set(), report.summary()


def test_late_checkpoints_are_clean(runs):
    report = modelkit.inspect(runs["late"] / "checkpoint-100", deep=True)
    assert loud(report) == set(), report.summary()
    assert "training_args.bin" in report.details["trainer files"]


@pytest.mark.parametrize("era", ["early", "middle", "middle-config"])
def test_checkpoints_that_record_no_alpha_and_no_base_say_so_and_nothing_else(runs, era):
    report = modelkit.inspect(runs[era] / "checkpoint-100")
    assert loud(report) == {"inconsistent-config", "base-unavailable"}, report.summary()
    assert any("lora_alpha is recorded nowhere" in f.message for f in report.warnings)
    supplied = modelkit.inspect(runs[era] / "checkpoint-100", deep=True, facts={"lora_alpha": ALPHA})
    assert "base-unavailable" in loud(supplied) and "lora_alpha=8" in supplied.details["supplied by the user"]


def test_training_args_is_listed_never_loaded(runs, monkeypatch):
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: calls.append(str(f)) or real(f, *a, **k))
    report = modelkit.inspect(runs["early"] / "checkpoint-100", deep=True, facts={"lora_alpha": ALPHA})
    assert "training_args.bin" in report.details["trainer files"]
    assert not [c for c in calls if "training_args" in c]
    assert not [t for t in report.tensors if t["file"] == "training_args.bin"]


# -- item 6: layout-a checkpoints keep their own router ------------------------------------------
def test_layout_a_checkpoint_uses_its_own_router(runs, tied):
    best = modelkit.open_artifact(runs["early"] / "best_model")
    ckpt = modelkit.open_artifact(runs["early"] / "checkpoint-100", base=tied, facts={"lora_alpha": ALPHA})
    assert best.state_dir == "../dylo_moe_state" and ckpt.state_dir is None
    assert ckpt.router()["source"] == "model.safetensors"
    assert not torch.equal(ckpt.router()["weight"], best.router()["weight"])
    files = {t.file for t in ckpt.stored()}
    assert not any("dylo_moe_state" in f for f in files)


# -- item 7: early checkpoints open with the facts the user supplies -----------------------------
def test_early_checkpoint_loads_with_supplied_facts(runs, tied):
    ckpt = runs["early"] / "checkpoint-100"
    with pytest.raises(ModelkitError):
        modelkit.load(ckpt, expert=1)
    model, _, report = modelkit.load(ckpt, expert=1, base=tied, lora_alpha=ALPHA, dtype="float32")
    assert report.options["supplied"] == {"lora_alpha": ALPHA, "base": str(tied)}
    routed = modelkit.load(ckpt, base=tied, lora_alpha=ALPHA, routing="expert:1", dtype="float32").model
    ids = torch.tensor([[2, 6, 11, 4]])
    with torch.no_grad():
        torch.testing.assert_close(routed(ids).logits, model(ids).logits, atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="records"):
        modelkit.load(runs["early"] / "best_model", lora_alpha=ALPHA + 1)


def test_cli_takes_the_missing_facts(runs, tied, capsys):
    from modelkit.ui.cli import main

    ckpt = str(runs["early"] / "checkpoint-100")
    assert main(["inspect", ckpt, "--base", str(tied), "--lora-alpha", str(ALPHA), "--json"]) == 0
    details = json.loads(capsys.readouterr().out)["details"]
    assert "lora_alpha=8" in details["supplied by the user"] and "base=" in details["supplied by the user"]
    out = runs["early"].parent / "cli-export"
    assert main(["export", ckpt, str(out), "--base", str(tied), "--lora-alpha", str(ALPHA), "--expert", "1"]) == 0
    assert json.loads((out / "modelkit_export.json").read_text())["options"]["supplied"]["lora_alpha"] == ALPHA


# -- item 5: the middle era's second copy -------------------------------------------------------
def test_middle_checkpoint_lists_and_reconciles_the_trainer_copy(runs, tied):
    ckpt = runs["middle"] / "checkpoint-100"
    report = modelkit.inspect(ckpt, base=tied, deep=True, facts={"lora_alpha": ALPHA})
    assert {t["file"] for t in report.tensors} >= {"model.safetensors", "peft_adapters/expert_0.pt"}
    assert loud(report) == set(), report.summary()
    copy = [f for f in report.findings if f.code == "duplicated-buffers"]
    assert copy and "equal their counterpart" in copy[0].message


def test_middle_checkpoint_without_base_uses_the_trainer_copy(runs, tied):
    ckpt = runs["middle"] / "checkpoint-100"
    without = modelkit.load(ckpt, expert=0, lora_alpha=ALPHA, dtype="float32").model
    with_base = modelkit.load(ckpt, expert=0, base=tied, lora_alpha=ALPHA, dtype="float32").model
    ids = torch.tensor([[2, 8, 3, 12]])
    with torch.no_grad():
        torch.testing.assert_close(without(ids).logits, with_base(ids).logits, atol=1e-6, rtol=0)


def test_a_trainer_copy_that_differs_is_an_error(tmp_path, tied):
    root = write_dylora_run(tmp_path / "run", "middle", tied, fault="trainer-copy-differs")
    report = modelkit.inspect(root / "checkpoint-100", base=tied, deep=True, facts={"lora_alpha": ALPHA})
    errors = [f for f in report.errors if f.code == "inconsistent-config"]
    assert errors and "differs" in errors[0].message and "lora_B.expert_0" in errors[0].message
    with pytest.raises(ModelkitError, match="differs"):
        modelkit.load(root / "checkpoint-100", base=tied, lora_alpha=ALPHA)


# -- item 4: the real loader's rewrite ------------------------------------------------------------
def test_config_rewritten_by_the_real_loader_is_an_error(tmp_path, tied):
    root = write_dylora_run(tmp_path / "run", "late", tied, fault="loader-rewrote-config")
    cfg = json.loads((root / "best_model" / "config.json").read_text())
    assert cfg["model_type"] == "gemma" and cfg["_dylora_original_type"] == "dylora-moe"
    report = modelkit.inspect(root / "best_model")
    assert any(f.code == "inconsistent-config" and "rewritten" in f.message for f in report.errors)


# -- items 2 and 3: diff of a mixture ---------------------------------------------------------
def test_diff_of_a_mixture_is_per_expert(tmp_path, tied):
    trained = write_dylora(tmp_path / "trained", "c", tied)
    empty = write_dylora(tmp_path / "empty", "c", tied, fault="untrained")
    t = modelkit.diff(tied, trained, progress=False)
    e = modelkit.diff(tied, empty, progress=False)
    assert t.verdict == "different" and e.verdict == "identical"
    table = t.by_expert().set_index("part")
    assert list(table.index) == ["expert_0", "expert_1", "router.gate.weight", "router.gate.bias"]
    assert (table.loc[["expert_0", "expert_1"], "verdict"] == "changed").all()
    assert (table.loc[["expert_0", "expert_1"], "rel_change"] > 0.01).all()
    assert (e.by_expert().set_index("part").loc[["expert_0", "expert_1"], "verdict"] == "unchanged").all()
    assert t.summary().startswith("DIFFERENT: 2 of 2 experts differ")
    assert e.summary().startswith("IDENTICAL: none of the 2 experts changes anything")
    frame = t.to_frame()
    assert set(frame.expert.dropna()) == {0, 1}
    json.loads(t.to_json())  # serialisable


def test_cli_diff_of_a_mixture(tmp_path, tied, capsys):
    from modelkit.ui.cli import main

    trained = write_dylora(tmp_path / "trained", "b", tied)
    main(["diff", str(tied), str(trained)])
    out = capsys.readouterr().out
    assert "expert_0" in out and "expert_1" in out and "router.gate.weight" in out and "IDENTICAL" not in out


def test_a_stored_head_equal_to_the_embeddings_is_a_tied_duplicate_in_diff(tmp_path, tied):
    folder = write_dylora(tmp_path / "a", "a-full-config", tied)
    result = modelkit.diff(tied, folder, options_b={"expert": 0}, progress=False)
    head = next(r for r in result.rows if r["name"] == "lm_head.weight")
    assert head["status"] in ("compared", "dtype-changed") and not head["changed"]
    assert "tied duplicate" in head["note"]
    assert result.count("added") == 0


# -- export --expert K --verify over the tied base, loaded by stock transformers --------------------
def test_export_expert_verify_over_a_tied_base_loads_in_stock_transformers(tmp_path, tied, runs):
    for i, (src, extra) in enumerate(((write_dylora(tmp_path / "c", "c", tied), {}),
                                      (runs["early"] / "checkpoint-100", {"base": tied, "lora_alpha": ALPHA}))):
        out = tmp_path / f"export-{i}"
        result = modelkit.export(src, out, expert=1, verify=True, progress=False, dtype="float32", **extra)
        assert result.ok and result.written, result.summary()
        if extra:
            record = json.loads((out / "modelkit_export.json").read_text())
            assert record["options"]["supplied"] == {"lora_alpha": ALPHA, "base": str(tied)}
        reference = modelkit.load(src, expert=1, dtype="float32", **extra).model
        ids = [[2, 7, 9, 4, 11]]
        code = ("import json, sys, torch\nfrom transformers import AutoModelForCausalLM\n"
                f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, dtype=torch.float32)\n"
                f"print(json.dumps(m(torch.tensor({ids})).logits.tolist()))")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                              env={**__import__("os").environ, "PYTHONPATH": ""})
        assert proc.returncode == 0, proc.stderr[-2000:]
        with torch.no_grad():
            torch.testing.assert_close(torch.tensor(json.loads(proc.stdout)), reference(torch.tensor(ids)).logits,
                                       atol=1e-5, rtol=0)


def test_alpha_keyword_is_the_same_supplied_fact(runs, tied):
    ckpt = runs["early"] / "checkpoint-100"
    for kw in ({"expert": 1}, {"routing": "expert:1"}):
        report = modelkit.load(ckpt, base=tied, alpha=ALPHA, **kw).report
        assert report.options["supplied"]["lora_alpha"] == ALPHA


def test_two_mixtures_diff_expert_by_expert(tmp_path, tied, runs):
    a, b = runs["late"] / "checkpoint-50", runs["late"] / "checkpoint-100"
    result = modelkit.diff(a, b, progress=False)
    table = result.by_expert().set_index("part")
    assert list(table.index) == ["expert_0", "expert_1", "router.gate.weight", "router.gate.bias"]
    assert (table.verdict == "changed").all(), table   # each checkpoint its own experts and router
    three = write_dylora(tmp_path / "three", "c", tied, num_experts=3)
    with pytest.raises(ModelkitError, match="different experts"):
        modelkit.diff(a, three, progress=False)


def test_compare_over_a_tied_base_with_per_token_routing(tmp_path, tied):
    from modelkit.ops.compare import compare

    trained = write_dylora(tmp_path / "b", "b", tied)
    result = compare(tied, trained, tasks=["mk_count"], limit=8, progress=False, use_cache=False,
                     trained_options={"routing": "token"})
    frame = result.to_frame()
    assert len(frame) >= 1 and "routing=token" in " ".join(frame["model"].astype(str))


def test_only_the_first_expert_trained_is_a_warning_and_loads(tmp_path, tied):
    """The real code's optimizer held only expert_0: experts 1.. keep B = 0. Faithful to load
    (the mixture is what was trained), loud in inspect; all experts untrained stays an error."""
    best = write_dylora(tmp_path / "b", "b", tied)
    path = best / "peft_adapters" / "expert_1.pt"
    state = torch.load(path, weights_only=True)
    torch.save({k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in state.items()}, path)
    report = modelkit.inspect(best, deep=True)
    assert [f.code for f in report.warnings] == ["untrained-adapter"] and not report.errors
    assert "expert_1" in report.warnings[0].message
    model, _, load_report = modelkit.load(best, routing="token", dtype="float32")
    assert any("untrained-adapter" in w for w in load_report.warnings)


def test_per_expert_diff_matches_an_independent_merge_of_the_files(runs, tied):
    """by_expert() of the late era's checkpoint against its tied bf16 base, against the merge
    done here from the safetensors files: W' = bf16(W + alpha/r * B @ A) (fp32 compute, as
    FORMATS.md's merge rule), pooled ||W' - W|| / ||W|| over every base tensor."""
    from safetensors.torch import load_file

    ckpt = runs["late"] / "checkpoint-100"
    base = load_file(tied / "model.safetensors")
    table = modelkit.diff(tied, ckpt, progress=False).by_expert().set_index("part")
    for k in (0, 1):
        lora = load_file(ckpt / f"peft_adapters/expert_{k}/expert_{k}/adapter_model.safetensors")
        cfg = json.loads((ckpt / f"peft_adapters/expert_{k}/expert_{k}/adapter_config.json").read_text())
        scale = cfg["lora_alpha"] / cfg["r"]
        num = den = 0.0
        for name, w in base.items():
            a = lora.get("base_model.model." + name.replace(".weight", ".lora_A.weight"))
            merged = w if a is None else (w.float() + scale * (
                lora["base_model.model." + name.replace(".weight", ".lora_B.weight")].float() @ a.float())).to(w.dtype)
            num += float((merged.double() - w.double()).norm() ** 2)
            den += float(w.double().norm() ** 2)
        assert table.loc[f"expert_{k}", "verdict"] == "changed"
        assert table.loc[f"expert_{k}", "rel_change"] == pytest.approx((num / den) ** 0.5, rel=1e-5)
    assert table.loc["router.gate.weight", "verdict"] == "added"


def test_a_mixture_without_router_says_so_in_its_per_expert_diff(tmp_path, tied):
    folder = write_dylora(tmp_path / "b", "b", tied, fault="missing-router")
    result = modelkit.diff(tied, folder, progress=False)
    table = result.by_expert().set_index("part")
    assert table.loc["router", "verdict"] == "not stored" and table.loc["router", "tensors"] == 0
    assert any("without a stored router" in w for w in result.warnings)
    assert "not stored" in result.summary()


def test_bf16_export_of_the_early_era_is_checked_weight_by_weight_through_its_tie(runs, tmp_path):
    """The early era's routed module holds the Gemma head as its own parameter; the export
    stores it once (tied). verify checks that head against the stored embeddings stock loading
    ties it to, instead of falling back to the rounded-logits comparison."""
    result = modelkit.export(runs["early"] / "best_model", tmp_path / "out", expert=1, dtype="bfloat16",
                             verify=True, progress=False)
    v = result.verification
    assert result.ok and v["ok"], result.summary()
    from safetensors import safe_open

    stored = set()
    for f in (tmp_path / "out").glob("*.safetensors"):
        with safe_open(str(f), "pt") as handle:
            stored |= set(handle.keys())
    assert "model.embed_tokens.weight" in stored and "lm_head.weight" not in stored
    assert v["weights_compared"] and v["weights_misrounded"] == 0 and v["rounded_max_abs_diff"] is None
