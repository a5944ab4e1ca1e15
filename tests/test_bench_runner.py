"""`make bench` (benchmarks/run_all.py): every benchmark runs even after one misses or
crashes, one summary table and one JSON record come out, and the exit status says whether
any target was missed. The real benchmarks run in quick mode (small sizes) so the runner
and every benchmark's correctness checks are exercised in `make test`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"

FAKE = """
import sys
sys.path.insert(0, {bench!r})
from summary import agrees, at_most, finish, info
{body}
"""


def fake(tmp_path: Path, name: str, body: str) -> Path:
    p = tmp_path / f"{name}.py"
    p.write_text(FAKE.format(bench=str(BENCH), body=body))
    return p


def run_all(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / "run_all.py"), *map(str, args)],
                          capture_output=True, text=True, env={**os.environ, **(env or {})})


def test_every_benchmark_runs_and_a_miss_or_crash_fails_the_run(tmp_path):
    missing = fake(tmp_path, "bench_misses", "sys.exit(finish('bench_misses', ["
                   "at_most('export time', 2.0, 1.0, 's', baseline='seed', baseline_value=4.0, on_ratio=False),"
                   "agrees('outputs agree', True)]))")
    crash = fake(tmp_path, "bench_crashes", "raise RuntimeError('boom')")
    good = fake(tmp_path, "bench_meets", "sys.exit(finish('bench_meets', ["
                "at_most('memory ratio', 100.0, 0.4, 'MB', baseline='peft', baseline_value=400.0, on_ratio=True),"
                "info('throughput', 250.0, 'MB/s')]))")
    results = tmp_path / "results"
    out = run_all(missing, crash, good, "--results", results)
    assert out.returncode == 1, out.stdout + out.stderr
    # all three ran, in order, after the first one missed
    assert out.stdout.index("== bench_misses.py") < out.stdout.index("== bench_crashes.py") \
        < out.stdout.index("== bench_meets.py")
    summary = out.stdout[out.stdout.index("Summary"):]
    assert "| bench_misses | export time | 2 s | seed 4 s | 0.5 | <= 1 s | MISSED |" in summary
    assert "| bench_meets | memory ratio | 100 MB | peft 400 MB | 0.25 | ratio <= 0.4 | met |" in summary
    assert "| bench_crashes | benchmark ran to the end |" in summary
    [record_file] = results.glob("bench-*.json")
    record = json.loads(record_file.read_text())
    assert record["missed"] == 2
    assert [r["bench"] for r in record["runs"]] == ["bench_misses", "bench_crashes", "bench_meets"]
    assert record["runs"][1]["exit"] != 0
    by = {(f["bench"], f["name"]): f for f in record["figures"]}
    assert by[("bench_meets", "memory ratio")]["met"] is True
    assert by[("bench_meets", "throughput")]["met"] is None
    assert by[("bench_crashes", "benchmark ran to the end")]["met"] is False
    assert "load_before" in record["machine"]


def test_all_targets_met_exits_zero(tmp_path):
    good = fake(tmp_path, "bench_meets", "sys.exit(finish('bench_meets', [agrees('same output', True)]))")
    out = run_all(good, "--results", tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 missed" in out.stdout


def test_a_wrong_answer_is_a_miss(tmp_path):
    wrong = fake(tmp_path, "bench_wrong", "sys.exit(finish('bench_wrong', [agrees('exports agree', False)]))")
    out = run_all(wrong, "--results", tmp_path)
    assert out.returncode == 1
    assert "| bench_wrong | exports agree |" in out.stdout and "MISSED" in out.stdout


@pytest.mark.slow
def test_real_benchmarks_in_quick_mode_run_and_agree_with_their_baselines(tmp_path):
    # every benchmark `make bench` runs, each reporting through benchmarks/summary.py
    scripts = sorted(BENCH.glob("bench_*.py"))
    out = run_all(*scripts, "--quick", "--results", tmp_path, env={"PYTHONPATH": str(ROOT)})
    [record_file] = tmp_path.glob("bench-*-quick.json")
    record = json.loads(record_file.read_text())
    benches = [p.stem for p in scripts]
    assert {"bench_diff", "bench_export", "bench_inspect", "bench_grade", "bench_watch"} <= set(benches)
    assert [r["bench"] for r in record["runs"]] == benches
    for bench in benches:
        figures = [f for f in record["figures"] if f["bench"] == bench]
        assert figures, bench
        assert not any(f["name"] == "benchmark ran to the end" for f in figures), (bench, out.stdout[-3000:])
        # correctness holds at any size; the speed targets mean nothing at quick sizes
        wrong = [f["name"] for f in figures if f["target"] == "outputs agree" and not f["met"]]
        assert not wrong, (bench, wrong)
    assert out.returncode == (1 if record["missed"] else 0)


def test_markdown_renders_a_results_record_as_the_readme_table(tmp_path):
    record = {"started": "2026-12-02T14:50:07.5+00:00", "commit": "abc1234", "quick": False,
              "machine": {"cpus": 2, "load_before": "3.10 2.00 1.50", "load_after": "2.20 2.10 1.60"},
              "runs": [{"bench": "bench_diff", "exit": 1, "seconds": 60.0}], "missed": 1,
              "figures": [
                  {"name": "diff throughput", "value": 6.0, "unit": "GB/s", "baseline": "floor",
                   "baseline_value": 8.0, "ratio": 0.75, "target": "ratio >= 0.8", "met": False,
                   "note": "best of 3", "bench": "bench_diff"},
                  {"name": "diff agrees", "value": None, "unit": "", "baseline": "", "baseline_value": None,
                   "ratio": None, "target": "outputs agree", "met": True, "note": "", "bench": "bench_diff"}]}
    path = tmp_path / "bench-x.json"
    path.write_text(json.dumps(record))
    out = run_all("--markdown", path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("Run of 2026-12-02 14:50 UTC, commit abc1234, 2 cores, load average "
                               "3.10 2.00 1.50 before / 2.20 2.10 1.60 after, full size")
    assert "| benchmark | figure | value | baseline (same run) | ratio | target | met? |" in lines
    assert "| bench_diff | diff throughput | 6 GB/s | floor 8 GB/s | 0.75 | ratio >= 0.8 | MISSED |" in lines
    assert "| bench_diff | diff agrees |  |  |  | outputs agree | met |" in lines
    assert "- diff throughput: best of 3" in lines
    record["quick"] = True
    path.write_text(json.dumps(record))
    assert "quick mode" in run_all("--markdown", path).stdout.splitlines()[0]
    path.write_text("not json")
    bad = run_all("--markdown", path)
    assert bad.returncode == 2 and "cannot render" in bad.stderr and "Traceback" not in bad.stderr
