"""Run every benchmark (``make bench``), even after one misses or fails, then print one
summary table (figure, value, baseline, ratio, target, met?), write it as JSON under
``benchmarks/results/`` and exit 1 if any target was missed or any benchmark failed.

    python benchmarks/run_all.py                 # every benchmarks/bench_*.py, full size
    python benchmarks/run_all.py --quick         # small sizes: a smoke test of the machinery
    python benchmarks/run_all.py bench_diff.py   # some of them
    python benchmarks/run_all.py --markdown benchmarks/results/bench-X.json   # a record as README Markdown

Each benchmark runs in its own process (a crash or a miss stops only that one) and reports
through ``summary.finish``; one that exits without a report counts as failed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from summary import JSON_ENV, QUICK_ENV, Figure, load_average, table  # noqa: E402


def _commit() -> str:
    out = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def run_one(script: Path, quick: bool, timeout: float) -> tuple[list[Figure], dict]:
    """Run one benchmark script; its figures (a failure figure when it left none)."""
    with tempfile.TemporaryDirectory(prefix="modelkit-bench-") as tmp:
        report = Path(tmp) / "figures.json"
        env = {**os.environ, JSON_ENV: str(report), QUICK_ENV: "1" if quick else "0"}
        t = time.perf_counter()
        try:
            rc = subprocess.run([sys.executable, str(script)], env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        seconds = time.perf_counter() - t
        figures = []
        if report.exists():
            data = json.loads(report.read_text())
            figures = [Figure(**f) for f in data["figures"]]
    bench = script.stem
    ran = {"bench": bench, "exit": rc, "seconds": round(seconds, 1)}
    if not figures or (rc != 0 and not any(f.met is False for f in figures)):
        figures.append(Figure("benchmark ran to the end", None, target="exit 0 with a report",
                              met=False, note=f"exit status {rc} after {seconds:.0f} s", bench=bench))
    for f in figures:
        f.bench = bench
    return figures, ran


def markdown(record: dict) -> str:
    """A results record (the JSON :func:`main` writes) as the README's Markdown table, under a
    header line saying when, at which commit, how loaded the machine was and whether quick."""
    m = record.get("machine", {})
    try:
        when = datetime.fromisoformat(record["started"]).astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    except (KeyError, TypeError, ValueError):
        when = "unknown date"
    head = (f"Run of {when}, commit {record.get('commit', 'unknown')}, "
            f"{m.get('cpus', '?')} cores, load average {m.get('load_before', 'unknown')} before / "
            f"{m.get('load_after', 'unknown')} after, "
            + ("**quick mode** (small sizes: the timings mean nothing)" if record.get("quick") else "full size")
            + f"; {record.get('missed', '?')} target(s) missed.")
    figures = [Figure(**f) for f in record.get("figures", [])]
    return head + "\n\n" + table(figures, with_bench=True)  # summary.table: one formatting for all


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("benchmarks", nargs="*", help="scripts to run (default: every benchmarks/bench_*.py)")
    p.add_argument("--markdown", type=Path, metavar="FILE.json",
                   help="run nothing: print this results record as the README's Markdown table")
    p.add_argument("--quick", action="store_true", help=f"small sizes (sets {QUICK_ENV}=1)")
    p.add_argument("--results", type=Path, default=HERE / "results", help="where the JSON goes")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per benchmark")
    args = p.parse_args(argv)
    if args.markdown:
        if args.benchmarks:
            p.error("--markdown renders a record; it runs no benchmarks")
        try:
            text = markdown(json.loads(args.markdown.read_text()))
        except (OSError, ValueError, TypeError, AttributeError) as e:  # not a record run_all wrote
            print(f"cannot render results record {args.markdown}: {e}", file=sys.stderr)
            return 2
        print(text)
        return 0
    scripts = ([Path(s) if Path(s).exists() else HERE / s for s in args.benchmarks]
               or sorted(HERE.glob("bench_*.py")))
    load_before = load_average()
    started = datetime.now(timezone.utc)
    figures, runs = [], []
    for script in scripts:
        print(f"== {script.name}", flush=True)
        f, ran = run_one(script, args.quick, args.timeout)
        figures += f
        runs.append(ran)
    missed = [f for f in figures if f.met is False]
    print(f"\nSummary ({len(scripts)} benchmarks, {sum(f.met is not None for f in figures)} targets, "
          f"{len(missed)} missed; load average {load_before} before, {load_average()} after"
          f"{'; QUICK MODE' if args.quick else ''})\n")
    print(table(figures, with_bench=True))
    args.results.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    record = {"started": started.isoformat(), "commit": _commit(), "quick": args.quick,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "load_before": load_before, "load_after": load_average()},
              "runs": runs, "missed": len(missed), "figures": [asdict(f) for f in figures]}
    out = args.results / f"bench-{stamp}{'-quick' if args.quick else ''}.json"
    out.write_text(json.dumps(record, indent=1))
    print(f"\nwritten {out}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
