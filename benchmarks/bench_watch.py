"""Benchmark ``modelkit.watch``: what the watcher adds (finding checkpoints, the settle
check, ``inspect``, fingerprints, the ledger's fsynced appends and result files) against
the evaluations themselves, for runs of N = 1, 4 and 16 checkpoints (distinct PEFT adapters
of the demo pair's base, every one evaluated on ``mk_topic``).

The evaluation time is measured inside the evaluator (the default in-process one, the
compare cache empty for each N); the watcher's overhead is the rest of the wall time, less
the settle wait (a deliberate delay, set to 0.05 s here). Then the cost of one idle poll of
the finished 16-checkpoint run with 5,000 unrelated records already in its ledger: a
watcher's bookkeeping must not grow with its history.

    python benchmarks/bench_watch.py [--limit 20]

Targets: overhead <= 25 % of the evaluation time per checkpoint at N = 16; overhead per
checkpoint at N = 16 <= 1.5 x that at N = 4 (linear in checkpoints, not worse); an idle
poll of 16 settled checkpoints with a 5,000-record ledger <= 0.5 s.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from summary import agrees, at_most, finish, info, quick  # noqa: E402

SETTLE = 0.05


def make_run(folder: Path, base: Path, n: int) -> Path:
    from modelkit.testing import write_peft_lora

    for i in range(1, n + 1):
        write_peft_lora(folder / f"checkpoint-{i * 10}", base, r=8, alpha=16, seed=100 + i)
    return folder


def measure(run: Path, base: Path, limit: int, cache: Path) -> dict:
    """Watch ``run`` once; wall time, evaluation time, number of evaluations."""
    from modelkit.ops.watch import evaluate_in_process, watch

    os.environ["MODELKIT_CACHE"] = str(cache)           # nothing cached: every evaluation runs
    spent = {"eval": 0.0, "n": 0}

    def timed(job):
        t = time.perf_counter()
        try:
            return evaluate_in_process(job)
        finally:
            spent["eval"] += time.perf_counter() - t
            spent["n"] += 1

    t0 = time.perf_counter()
    result = watch(run, ["mk_topic"], base, limit=limit, once=True, settle=SETTLE, evaluator=timed,
                   state_dir=cache / "state", quiet=False)
    wall = time.perf_counter() - t0
    t1 = time.perf_counter()
    frame = result.to_frame()                            # the paired statistics of every checkpoint
    table = time.perf_counter() - t1
    return {"wall": wall, "eval": spent["eval"], "n": spent["n"], "table": table,
            "done": sum(e.status == "done" for e in result.entries), "rows": len(frame)}


def idle_poll(run: Path, base: Path, limit: int, state: Path, extra: int) -> float:
    """One poll of a settled run whose ledger holds ``extra`` other records."""
    from modelkit.ops.watch_ledger import Ledger
    from modelkit.ops.watch import Watcher

    import json

    ledger = Ledger.open(state)
    with open(ledger.path, "a") as f:          # one write: fsyncing each record is not what is measured
        for i in range(extra):
            f.write(json.dumps({"event": "skipped", "key": f"other-{i}", "name": f"elsewhere-{i}",
                                "detail": "unrelated history"}) + "\n")

    def refuse(job):
        raise AssertionError("an idle poll evaluated something")

    watcher = Watcher(run, ["mk_topic"], base, limit=limit, settle=0.0, state_dir=state, evaluator=refuse)
    watcher.poll()                                       # first sighting (snapshots taken)
    t = time.perf_counter()
    watcher.poll()                                       # everything settled: bookkeeping only
    return time.perf_counter() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=4 if quick() else 20)
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    from modelkit.ui.demo_pair import write_demo_pair

    sizes = (1, 2) if quick() else (1, 4, 16)
    tmp = Path(tempfile.mkdtemp(prefix="modelkit-bench-watch-"))
    try:
        pair = write_demo_pair(tmp / "pair")
        # warm-up (discarded): imports, lm-eval's task index, the first model load
        measure(make_run(tmp / "warm-up", pair["base"], 1), pair["base"], args.limit, tmp / "cache-warm-up")
        results = {}
        for n in sizes:
            run = make_run(tmp / f"run-{n}", pair["base"], n)
            results[n] = measure(run, pair["base"], args.limit, tmp / f"cache-{n}")
            r = results[n]
            print(f"N={n}: wall {r['wall']:.2f} s, evaluations {r['n']} in {r['eval']:.2f} s, "
                  f"table {r['table']:.2f} s", flush=True)
        big = sizes[-1]
        poll = idle_poll(tmp / f"run-{big}", pair["base"], args.limit, tmp / f"cache-{big}" / "state",
                         200 if quick() else 5000)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def overhead(n: int) -> float:
        r = results[n]
        return max(0.0, r["wall"] - r["eval"] - SETTLE)

    figs = []
    for n in sizes:
        r = results[n]
        per_eval = r["eval"] / r["n"]
        figs.append(info(f"N={n}: wall time (baseline + {n} checkpoints)", r["wall"], "s"))
        figs.append(info(f"N={n}: watcher overhead per checkpoint", overhead(n) / n, "s",
                         baseline="evaluation per model", baseline_value=per_eval))
    big, mid = sizes[-1], sizes[-2]
    r = results[big]
    figs += [
        at_most(f"N={big}: overhead per checkpoint vs its evaluation", overhead(big) / big, 0.25, "s",
                baseline="evaluation per model", baseline_value=r["eval"] / r["n"], on_ratio=True),
        at_most(f"overhead per checkpoint, N={big} vs N={mid}", overhead(big) / big, 1.5, "s",
                baseline=f"N={mid}", baseline_value=overhead(mid) / mid, on_ratio=True,
                note="bookkeeping grows with the checkpoints, not faster"),
        info(f"N={big}: paired-statistics table of every checkpoint", r["table"], "s"),
        at_most(f"idle poll of {big} settled checkpoints, ledger + {200 if quick() else 5000} records", poll, 0.5, "s"),
        agrees("every checkpoint evaluated exactly once (and the baseline once)",
               all(results[n]["n"] == n + 1 and results[n]["done"] == n for n in sizes), target="exact"),
    ]
    return finish("bench_watch", figs)


if __name__ == "__main__":
    sys.exit(main())
