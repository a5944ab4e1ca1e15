"""Benchmark ``modelkit.compare`` against calling ``lm_eval.simple_evaluate`` directly.

Both arms load the demo pair's two models with ``modelkit.load`` and evaluate the same
shipped tasks with the same settings (per-sample logs on, same stderr bootstrap); the
compare arm adds fingerprinting, task hashing, paired statistics and the cache write.
Runs alternate (direct, compare, direct, ...); the best wall time and the median CPU
time of each arm are reported, because the machine may be shared. Then the cached re-run: in the same process (a notebook cell run
again) and in a fresh process (the CLI, imports included).

    python benchmarks/bench_compare.py [--limit 100] [--repeats 3] [--threads 1]

Targets: overhead <= 10 %, cached re-run < 2 s.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASKS = ["mk_topic", "mk_topic_gen", "mk_count", "mk_text"]


def direct(paths: dict, limit: int | None, batch_size: int) -> tuple[float, float]:
    """The same evaluation written by hand with lm-eval; (wall, CPU) seconds."""
    import modelkit
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from modelkit.evaluation import STDERR_BOOTSTRAP_ITERS, quiet_logs
    from modelkit.tasks import TASKS_DIR

    t0, c0 = time.perf_counter(), time.process_time()
    with quiet_logs():
        manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
        for ref in (paths["base"], paths["trained"]):
            model, tok, _ = modelkit.load(ref)
            simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size), tasks=TASKS,
                            task_manager=manager, limit=limit, log_samples=True,
                            bootstrap_iters=STDERR_BOOTSTRAP_ITERS)
    return time.perf_counter() - t0, time.process_time() - c0


def via_compare(paths: dict, limit: int | None, batch_size: int, use_cache: bool) -> tuple[float, float]:
    from modelkit.comparison import compare

    t0, c0 = time.perf_counter(), time.process_time()
    result = compare(paths["base"], paths["trained"], tasks=TASKS, limit=limit, batch_size=batch_size,
                     use_cache=use_cache, progress=False)
    result.summary()          # the table: bootstrap + McNemar on every row
    return time.perf_counter() - t0, time.process_time() - c0


def cold_cached(paths: dict, limit: int | None) -> float:
    code = ("import sys, time; t=time.perf_counter(); from modelkit.cli import main; "
            f"main(['compare', {str(paths['base'])!r}, {str(paths['trained'])!r}, '--tasks', {','.join(TASKS)!r}"
            + (f", '--limit', '{limit}'" if limit else "") + "]); "
            "print('SECONDS', time.perf_counter()-t, file=sys.stderr)")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(out.stderr[-2000:])
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=100, help="samples per task (default 100)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared box)")
    ap.add_argument("--root", help="demo pair folder (default: a temporary one)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-compare-"))
    os.environ["MODELKIT_CACHE"] = str(work / "cache")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(args.threads)
    from modelkit.demo_pair import write_demo_pair

    t0 = time.perf_counter()
    paths = write_demo_pair(args.root or work / "pair")
    pair_s = time.perf_counter() - t0

    direct(paths, 5, args.batch_size)                      # warm-up: imports, first-call costs
    via_compare(paths, 5, args.batch_size, use_cache=False)
    d, c = [], []
    for _ in range(args.repeats):
        d.append(direct(paths, args.limit, args.batch_size))
        c.append(via_compare(paths, args.limit, args.batch_size, use_cache=False))
    via_compare(paths, args.limit, args.batch_size, use_cache=True)          # fills the cache
    hot = [via_compare(paths, args.limit, args.batch_size, use_cache=True)[0] for _ in range(5)]
    cold = cold_cached(paths, args.limit)

    # best-of-N wall time and median CPU time: both robust to other jobs on the machine
    md, mc = min(x[0] for x in d), min(x[0] for x in c)
    cd, cc = statistics.median(x[1] for x in d), statistics.median(x[1] for x in c)
    rows = [
        ("demo pair written (or reused)", f"{pair_s:.2f} s", ""),
        (f"lm_eval.simple_evaluate direct, 2 models x {len(TASKS)} tasks, limit {args.limit}",
         f"{md:.2f} s", f"best of {args.repeats}; CPU {cd:.2f} s; wall runs " + ", ".join(f"{x[0]:.2f}" for x in d)),
        ("modelkit.compare, no cache", f"{mc:.2f} s",
         f"best of {args.repeats}; CPU {cc:.2f} s; wall runs " + ", ".join(f"{x[0]:.2f}" for x in c)),
        ("compare overhead vs direct (best wall)", f"{(mc - md) / md * 100:+.1f} %", "target <= +10 %"),
        ("compare overhead vs direct (median CPU)", f"{(cc - cd) / cd * 100:+.1f} %", "target <= +10 %"),
        ("cached re-run, same process", f"{statistics.median(hot):.3f} s", "target < 2 s"),
        ("cached re-run, fresh CLI process (imports included)", f"{cold:.2f} s", ""),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"bench_compare (torch threads {args.threads}, batch {args.batch_size}, repeats {args.repeats})")
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:>10}  {note}")


if __name__ == "__main__":
    main()
