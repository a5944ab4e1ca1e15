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
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from summary import agrees, at_most, finish, info, quick  # noqa: E402

TASKS = ["mk_topic", "mk_topic_gen", "mk_count", "mk_text"]


def direct(paths: dict, limit: int | None, batch_size: int) -> tuple[float, float]:
    """The same evaluation written by hand with lm-eval; (wall, CPU) seconds."""
    import modelkit
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from modelkit.bench.evaluation import STDERR_BOOTSTRAP_ITERS, quiet_logs
    from modelkit.bench.tasks import TASKS_DIR

    t0, c0, scores = time.perf_counter(), time.process_time(), []
    with quiet_logs():
        manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
        for ref in (paths["base"], paths["trained"]):
            model, tok, _ = modelkit.load(ref)
            out = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size), tasks=TASKS,
                                  task_manager=manager, limit=limit, log_samples=True,
                                  bootstrap_iters=STDERR_BOOTSTRAP_ITERS)
            scores.append({(task, key): v for task, row in out["results"].items() for key, v in row.items()
                           if "," in key and "_stderr" not in key and isinstance(v, (int, float))})
    return time.perf_counter() - t0, time.process_time() - c0, scores


def via_compare(paths: dict, limit: int | None, batch_size: int, use_cache: bool) -> tuple[float, float]:
    from modelkit.ops.compare import compare

    t0, c0 = time.perf_counter(), time.process_time()
    result = compare(paths["base"], paths["trained"], tasks=TASKS, limit=limit, batch_size=batch_size,
                     use_cache=use_cache, progress=False)
    result.summary()          # the table: bootstrap + McNemar on every row
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    scores = [{(leaf, key): m["value"] for run in result.runs[info.label].values()
               for leaf, lr in run["leaves"].items() for key, m in lr["metrics"].items()}
              for info in result.models]
    return seconds, cpu, scores


def cold_cached(paths: dict, limit: int | None) -> float:
    code = ("import sys, time; t=time.perf_counter(); from modelkit.ui.cli import main; "
            f"main(['compare', {str(paths['base'])!r}, {str(paths['trained'])!r}, '--tasks', {','.join(TASKS)!r}"
            + (f", '--limit', '{limit}'" if limit else "") + "]); "
            "print('SECONDS', time.perf_counter()-t, file=sys.stderr)")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(out.stderr[-2000:])
    return wall


def main() -> int:
    small = quick()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=5 if small else 100, help="samples per task")
    ap.add_argument("--repeats", type=int, default=1 if small else 5)
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
    from modelkit.ui.demo_pair import write_demo_pair

    try:
        paths = write_demo_pair(args.root or work / "pair")
        direct(paths, 5, args.batch_size)                      # warm-up: imports, first-call costs
        via_compare(paths, 5, args.batch_size, use_cache=False)
        d, c = [], []
        for _ in range(args.repeats):
            d.append(direct(paths, args.limit, args.batch_size))
            c.append(via_compare(paths, args.limit, args.batch_size, use_cache=False))
        via_compare(paths, args.limit, args.batch_size, use_cache=True)          # fills the cache
        hot = [via_compare(paths, args.limit, args.batch_size, use_cache=True) for _ in range(5)]
        cold = cold_cached(paths, args.limit)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    # best-of-N wall time and median CPU time: both robust to other jobs on the machine
    md, mc = min(x[0] for x in d), min(x[0] for x in c)
    cd, cc = statistics.median(x[1] for x in d), statistics.median(x[1] for x in c)
    ref = d[-1][2]
    same = [all(math.isclose(run[2][m][k], v, rel_tol=1e-9, abs_tol=1e-12) for k, v in ref[m].items()
                if k in run[2][m]) and len(set(ref[m]) & set(run[2][m])) > 0
            for run in c + hot for m in range(2)]
    what = f"2 models x {len(TASKS)} tasks, limit {args.limit}, best of {args.repeats}"
    figs = [
        at_most(f"compare, no cache ({what})", mc, 1.10, "s", baseline="lm_eval.simple_evaluate direct",
                baseline_value=md, on_ratio=True, note="wall runs: direct " + ", ".join(f"{x[0]:.2f}" for x in d)
                + "; compare " + ", ".join(f"{x[0]:.2f}" for x in c)),
        at_most("compare CPU, no cache (median)", cc, 1.10, "s", baseline="direct", baseline_value=cd, on_ratio=True),
        at_most("cached re-run, same process", statistics.median(x[0] for x in hot), 2.0, "s"),
        info("cached re-run, fresh CLI process (imports included)", cold, "s"),
        agrees("compare's scores equal lm-eval's direct ones (fresh and cached)", all(same),
               note=f"{len(ref[0])} scores per model"),
    ]
    return finish("bench_compare", figs)


if __name__ == "__main__":
    sys.exit(main())
