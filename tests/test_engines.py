"""``compare --engine lm-eval``: the lm-eval CLI in a subprocess gives the per-sample results
of the in-process path, on the shipped log-likelihood tasks, for a plain model, a PEFT
adapter and an exported DyLoRA expert; ``compare-results`` on the logs it keeps equals
``compare``; runs that do not match what was identified are refused.

lm-eval subprocesses take ~10 s each here: the fixtures are module-scoped and small.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from modelkit.ops.compare import compare
from modelkit.errors import CompareError

TASKS = ["mk_topic", "mk_count", "mk_text"]      # multiple_choice x2, loglikelihood_rolling
LIMIT = 12
TOL = 1e-5
# The table's statistics are functions of the per-sample values (which agree to TOL): a
# perplexity-type aggregate (exp of a mean over words) and its interval amplify that; one
# machine measured a ci_low 1.06e-5 apart, relative, between the CLI and in-process runs.
TABLE_TOL = 1e-4


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, Path]:
    from modelkit.ui.demo_pair import write_demo_pair

    return write_demo_pair(tmp_path_factory.mktemp("demo-pair"))


@pytest.fixture(scope="module")
def inproc(pair):
    return compare(pair["base"], pair["trained"], tasks=TASKS, limit=LIMIT, progress=False)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("engine")
    return {"samples": root / "samples", "work": root / "work"}


@pytest.fixture(scope="module")
def via_cli(pair, dirs):
    return compare(pair["base"], pair["trained"], tasks=TASKS, limit=LIMIT, progress=False, engine="lm-eval",
                   engine_options={"samples_dir": str(dirs["samples"]), "work_dir": str(dirs["work"])})


def assert_same_samples(a: dict, b: dict) -> None:
    """Two runs of one model on one task: same documents, same scores, same log-likelihoods."""
    for leaf, ra in a["leaves"].items():
        rb = b["leaves"][leaf]
        assert ra["doc_ids"] == rb["doc_ids"] and ra["n"] == LIMIT
        assert [d["doc_hash"] for d in ra["docs"]] == [d["doc_hash"] for d in rb["docs"]]
        for da, db in zip(ra["docs"], rb["docs"]):
            assert len(da["loglikelihoods"]) == len(db["loglikelihoods"]) >= 1
            for x, y in zip(da["loglikelihoods"], db["loglikelihoods"]):
                assert math.isclose(x, y, rel_tol=TOL, abs_tol=TOL), (leaf, da["doc_id"], x, y)
        assert set(ra["metrics"]) == set(rb["metrics"])
        for key, ma in ra["metrics"].items():
            mb = rb["metrics"][key]
            assert ma["aggregation"] == mb["aggregation"] is not None
            for x, y in zip(ma["samples"], mb["samples"]):
                xs, ys = (x, y) if isinstance(x, list) else ([x], [y])
                assert all(math.isclose(p, q, rel_tol=TOL, abs_tol=TOL) for p, q in zip(xs, ys)), (leaf, key, x, y)


def assert_same_table(a, b) -> None:
    import pandas as pd

    fa = a.to_frame().sort_values(["task", "metric"]).reset_index(drop=True)
    fb = b.to_frame().sort_values(["task", "metric"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(fa, fb, check_exact=False, rtol=TABLE_TOL, atol=TOL)


def test_lm_eval_cli_gives_the_in_process_per_sample_results(inproc, via_cli):
    assert [m.label for m in via_cli.models] == [m.label for m in inproc.models] == ["base", "lora"]
    for m in inproc.models:
        for name in TASKS:
            assert_same_samples(inproc.runs[m.label][name], via_cli.runs[m.label][name])
    assert_same_table(inproc, via_cli)
    topic = via_cli.to_frame().query("task == 'mk_topic' and metric == 'acc'").iloc[0]
    assert topic["verdict"] == "better"


def test_provenance_records_engine_version_exact_command_and_checks(via_cli, pair, dirs):
    base, lora = via_cli.models
    assert base.engine["engine"] == "lm-eval" and base.engine["version"] == "0.4.13"
    assert base.engine["prepared"] == "as-is"            # a standard folder goes to lm-eval as it is
    assert f"pretrained={pair['base']}" in base.engine["command"]
    assert lora.engine["prepared"] == "peft"             # a clean adapter: lm-eval's own peft= path
    assert f"peft={pair['trained']}" in lora.engine["command"]
    for m in (base, lora):
        assert "--log_samples" in m.engine["command"] and "--use_cache" not in m.engine["command"]
        assert any(m.artifact_fingerprint in c for c in m.engine["checks"])
    assert "engine lm-eval CLI, hf backend" in via_cli.summary()
    assert list(dirs["work"].iterdir()) == []            # nothing left behind


def test_compare_results_on_the_kept_logs_equals_compare(inproc, via_cli, dirs, capsys):
    from modelkit.ui.cli import main
    from modelkit.ops.compare_results import compare_results

    logged = compare_results(dirs["samples"] / "base", dirs["samples"] / "lora")
    assert_same_table(inproc, logged)
    assert logged.trained[0].fingerprint == inproc.trained[0].fingerprint   # from modelkit_run.json
    assert main(["compare-results", str(dirs["samples"] / "base"), str(dirs["samples"] / "lora"), "--json"]) == 0
    table = json.loads(capsys.readouterr().out)["table"]
    assert {r["task"] for r in table} == set(TASKS)


def test_a_plain_lm_eval_folder_is_read_with_the_fingerprint_not_checked(inproc, dirs, tmp_path):
    from modelkit.ops.compare_results import compare_results

    for label in ("base", "lora"):
        shutil.copytree(dirs["samples"] / label, tmp_path / label)
        (tmp_path / label / "modelkit_run.json").unlink()
    logged = compare_results(tmp_path / "base", tmp_path / "lora")
    assert [m.label for m in logged.models] == ["base", "lora"]   # the evaluated folder, the adapter
    assert logged.base.fingerprint == "not checked"
    assert_same_table(inproc, logged)


def _copy_log(src: Path, dest: Path) -> tuple[Path, Path]:
    shutil.copytree(src, dest)
    return next(dest.rglob("results_*.json")), dest


def test_mismatched_documents_configs_and_limits_are_refused(dirs, tmp_path):
    from modelkit.ops.compare_results import compare_results

    base = dirs["samples"] / "base"
    results, fewer = _copy_log(dirs["samples"] / "lora", tmp_path / "fewer")
    samples = next(fewer.rglob("samples_mk_topic_*.jsonl"))
    samples.write_text("".join(samples.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(CompareError, match="different documents"):
        compare_results(base, fewer)

    results, swapped = _copy_log(dirs["samples"] / "lora", tmp_path / "swapped")
    samples = next(swapped.rglob("samples_mk_count_*.jsonl"))
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    rows[0]["doc_hash"] = "0" * 64                          # another document under the same doc_id
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(CompareError, match="document.*differ"):
        compare_results(base, swapped)

    results, other = _copy_log(dirs["samples"] / "lora", tmp_path / "config")
    data = json.loads(results.read_text())
    data["configs"]["mk_topic"]["doc_to_text"] = "Q: {{text}}\nA:"
    results.write_text(json.dumps(data))
    with pytest.raises(CompareError, match="different configs"):
        compare_results(base, other)

    results, limited = _copy_log(dirs["samples"] / "lora", tmp_path / "limit")
    data = json.loads(results.read_text())
    data["config"]["limit"] = 100.0
    results.write_text(json.dumps(data))
    with pytest.raises(CompareError, match="different limits"):
        compare_results(base, limited)

    with pytest.raises(CompareError, match="with itself"):
        compare_results(base, base)


def test_a_run_that_is_not_what_was_prepared_is_refused(pair, dirs, via_cli):
    from modelkit.bench.engines.base import EvalJob
    from modelkit.bench.engines.lm_eval_cli import Prepared, check_run
    from modelkit.bench.sample_logs import read_lm_eval

    lora = via_cli.trained[0]
    log = read_lm_eval(dirs["samples"] / "lora")
    job = EvalJob(role="trained", label="lora", ref=str(pair["trained"]), options={}, fingerprint=lora.fingerprint,
                  artifact_fingerprint=lora.artifact_fingerprint, base_fingerprint=lora.base_fingerprint,
                  tasks=TASKS, limit=LIMIT)
    from modelkit.io.sources import fingerprint_folder

    prints = {str(pair["base"]): fingerprint_folder(pair["base"]), str(pair["trained"]): fingerprint_folder(pair["trained"])}
    ok = Prepared("peft", str(pair["base"]), peft=str(pair["trained"]), fingerprints=prints)
    assert check_run(log, ok, job, started=0)
    # lm-eval evaluated the base alone (no peft=): the seeds' failure, refused
    with pytest.raises(CompareError, match="peft"):
        check_run(log, Prepared("peft", str(pair["base"]), peft="/elsewhere/adapter", fingerprints=prints), job, 0)
    with pytest.raises(CompareError, match="not the prepared"):
        check_run(log, Prepared("as-is", "/some/other/model", fingerprints={}), job, 0)
    # the adapter identified is not the one evaluated
    wrong = EvalJob(**{**job.__dict__, "artifact_fingerprint": "0123456789abcdef"})
    with pytest.raises(CompareError, match="fingerprint"):
        check_run(log, ok, wrong, started=0)
    # an old results file
    with pytest.raises(CompareError, match="predates"):
        check_run(log, ok, job, started=log.results["date"] + 3600)
    log.model["use_cache"] = "/tmp/lm-eval-cache"
    with pytest.raises(CompareError, match="response cache"):
        check_run(log, ok, job, started=0)


def test_an_exported_dylora_expert_matches_in_process(pair, dirs, tmp_path):
    from modelkit.testing import write_dylora

    dylora = write_dylora(tmp_path / "dylora", "b", base_dir=pair["base"])
    kw = dict(tasks=["mk_topic"], limit=LIMIT, progress=False, trained_options={"expert": 1})
    here = compare(pair["base"], dylora, **kw)
    there = compare(pair["base"], dylora, engine="lm-eval", engine_options={"work_dir": str(dirs["work"])}, **kw)
    label = here.trained[0].label
    assert_same_samples(here.runs[label]["mk_topic"], there.runs[label]["mk_topic"])
    prov = there.trained[0].engine
    assert prov["prepared"] == "export" and prov["export"]["verification"]["ok"]
    assert prov["export"]["source"]["fingerprint"] == there.trained[0].artifact_fingerprint
    assert "expert 1" in prov["export"]["merged"]
    assert list(dirs["work"].iterdir()) == []            # the temporary export is gone


def test_a_routed_mixture_is_refused_before_anything_runs(pair, tmp_path):
    from modelkit.testing import write_dylora

    dylora = write_dylora(tmp_path / "dylora", "b", base_dir=pair["base"])
    with pytest.raises(CompareError, match="routed DyLoRA-MoE mixture"):
        compare(pair["base"], dylora, tasks=["mk_topic"], limit=2, progress=False, engine="lm-eval")


def test_accelerate_data_parallel_gives_the_one_process_results(pair, via_cli, tmp_path, monkeypatch):
    """Two processes under ``accelerate launch`` (gloo on CPUs), the documents shared out
    between them by lm-eval and gathered on rank 0, read back as one run."""
    from modelkit.ops.compare import _identify
    from modelkit.bench.engines import EvalJob, LmEvalEngine

    # lm-eval 0.4.13 shares documents out only when it counts more than one CUDA device:
    # each process counts its world size, so its real data-parallel path runs on CPUs
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "import os\nif os.environ.get('WORLD_SIZE'):\n    import torch\n"
        "    torch.cuda.device_count = lambda: int(os.environ['WORLD_SIZE'])\n")
    import os

    monkeypatch.setenv("PYTHONPATH", f"{shim}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    m = _identify("base", pair["base"], None)
    job = EvalJob(role="base", label="base", ref=m.ref, options={}, fingerprint=m.fingerprint,
                  artifact_fingerprint=m.artifact_fingerprint, base_fingerprint=None, tasks=["mk_topic", "mk_text"],
                  limit=LIMIT)
    engine = LmEvalEngine(launcher="accelerate", num_processes=2, cpu=True, work_dir=str(tmp_path / "work"))
    done = engine.evaluate(job)
    assert "accelerate.commands.launch --multi_gpu --num_processes 2" in done.provenance["command"]
    assert done.provenance["command"].startswith("ACCELERATE_USE_CPU=true ")
    for name in ("mk_topic", "mk_text"):
        assert_same_samples(via_cli.runs["base"][name], done.runs[name])


def test_the_vllm_command_carries_the_parallel_sizes_and_an_exported_adapter(pair, tmp_path):
    """vLLM cannot run on this machine: the command modelkit would run is checked instead."""
    from modelkit.ops.compare import _identify
    from modelkit.bench.engines import EvalJob, LmEvalEngine
    from modelkit.bench.engines.plans import plan_commands

    engine = LmEvalEngine(backend="vllm", tensor_parallel_size=4, data_parallel_size=2, gpu_memory_utilization=0.85,
                          model_args={"max_model_len": 2048}, dtype="bfloat16", batch_size="auto")
    m = _identify("trained", pair["trained"], None)
    job = EvalJob(role="trained", label="lora", ref=m.ref, options={}, fingerprint=m.fingerprint,
                  artifact_fingerprint=m.artifact_fingerprint, base_fingerprint=m.base_fingerprint,
                  tasks=["mk_topic"], limit=LIMIT)
    prepared = engine.choose(job, tmp_path)
    assert prepared.how == "export" and prepared.peft is None      # vLLM gets a merged, verified folder
    argv = engine.command(job, prepared, tmp_path / "out", "/tasks")
    assert argv[1:4] == ["-m", "lm_eval", "run"]
    args = dict(kv.split("=", 1) for kv in argv[argv.index("--model_args") + 1].split(","))
    assert argv[argv.index("--model") + 1] == "vllm"
    assert args == {"pretrained": str(tmp_path / "model"), "dtype": "bfloat16", "tensor_parallel_size": "4",
                    "data_parallel_size": "2", "gpu_memory_utilization": "0.85", "max_model_len": "2048"}
    assert argv[argv.index("--batch_size") + 1] == "auto" and "--log_samples" in argv and "--device" not in argv
    with pytest.raises(CompareError, match="vLLM, which is not installed"):
        engine.evaluate(job)
    lines = plan_commands(pair["base"], pair["trained"], tasks=["mk_topic"], limit=LIMIT,
                          engine_options={"backend": "vllm", "tensor_parallel_size": 4})
    assert [line.split()[0] for line in lines if not line.startswith("#")] == \
        ["python", "modelkit", "python", "cp", "rm", "modelkit"]
    assert lines[-1].startswith("modelkit compare-results modelkit-samples/base modelkit-samples/lora")
    with pytest.raises(CompareError, match="may not set pretrained"):
        LmEvalEngine(model_args={"pretrained": "/elsewhere"})
    with pytest.raises(CompareError, match="vLLM parallelises itself"):
        LmEvalEngine(backend="vllm", launcher="accelerate")


def _grade_report(path: Path, passed: dict[str, list[bool]], problems: str = "HumanEval.jsonl.gz",
                  error: bool = False) -> Path:
    """A ``modelkit grade --json`` report, written by codeeval's own GradeReport."""
    from modelkit.bench.codeeval.grade import GradeReport, SampleResult

    rows = [SampleResult(task_id=t, index=i, status="pass" if ok else "fail", detail="", seconds=0.1)
            for t, oks in passed.items() for i, ok in enumerate(oks)]
    if error:
        rows[0].status = "error"
    report = GradeReport(problems=problems, samples=str(path.with_suffix(".jsonl")), results=rows,
                         isolation={}, limits={"timeout": 10})
    path.write_text(report.to_json())
    return path


def _evalplus(path: Path, passed: dict[str, list[tuple[str, str]]], dataset_hash: str = "hash-humaneval") -> Path:
    """An EvalPlus ``eval_results.json``: per problem, per sample base/plus status."""
    evals = {t: [{"task_id": t, "solution": "def f(): pass", "base_status": b, "plus_status": p,
                  "base_fail_tests": [], "plus_fail_tests": []} for b, p in rows] for t, rows in passed.items()}
    path.write_text(json.dumps({"date": "2026-12-01 12:00", "hash": dataset_hash, "eval": evals}))
    return path


def test_compare_results_pairs_code_grades_per_problem(tmp_path):
    from modelkit.ops.compare_results import compare_results

    tasks = [f"HumanEval/{i}" for i in range(30)]
    base = _grade_report(tmp_path / "base.json", {t: [i % 3 == 0] for i, t in enumerate(tasks)})
    trained = _grade_report(tmp_path / "trained.json", {t: [True] for t in tasks})
    row = compare_results(base, trained).to_frame().iloc[0]
    assert row["task"] == "grade_HumanEval" and row["metric"] == "pass@1" and row["n"] == 30
    assert row["base"] == pytest.approx(10 / 30) and row["trained"] == 1.0
    assert row["p_mcnemar"] < 1e-4 and row["verdict"] == "better"       # 20 problems only the trained solves
    fewer = _grade_report(tmp_path / "fewer.json", {t: [True] for t in tasks[:-1]})
    with pytest.raises(CompareError, match="different documents"):
        compare_results(base, fewer)
    broken = _grade_report(tmp_path / "broken.json", {t: [True] for t in tasks}, error=True)
    with pytest.raises(CompareError, match="incomplete"):
        compare_results(base, broken)
    mbpp = _grade_report(tmp_path / "mbpp.json", {t: [True] for t in tasks}, problems="Mbpp.jsonl")
    with pytest.raises(CompareError, match="different tasks"):
        compare_results(base, mbpp)


def test_compare_results_reads_evalplus_base_and_plus_tests(tmp_path):
    from modelkit.ops.compare_results import compare_results

    tasks = [f"HumanEval/{i}" for i in range(12)]
    base = _evalplus(tmp_path / "base_eval_results.json", {t: [("pass", "fail" if i % 2 else "pass")]
                                                            for i, t in enumerate(tasks)})
    trained = _evalplus(tmp_path / "trained_eval_results.json", {t: [("pass", "pass")] for t in tasks})
    frame = compare_results(base, trained).to_frame().set_index("task")
    assert frame.loc["evalplus_base", "delta"] == 0.0 and frame.loc["evalplus_base", "n"] == 12
    assert frame.loc["evalplus_plus", "base"] == 0.5 and frame.loc["evalplus_plus", "trained"] == 1.0
    other = _evalplus(tmp_path / "other_eval_results.json", {t: [("pass", "pass")] for t in tasks}, "hash-v2")
    with pytest.raises(CompareError, match="different configs"):
        compare_results(base, other)                                        # another dataset version
    with pytest.raises(CompareError, match="cannot pair"):
        compare_results(base, _grade_report(tmp_path / "g.json", {t: [True] for t in tasks}))
