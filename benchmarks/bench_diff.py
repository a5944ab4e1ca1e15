"""Diff throughput against the honest floor: reading both checkpoints into memory.

Writes checkpoint A (random bf16 tensors of ``--tensor-mb`` each, sharded safetensors with
an index) and B (A with seven tensors in eight perturbed, as after fine-tuning). With the
page cache warm, in fresh processes, alternating:

* the floor: every tensor pair's bytes read into memory through diff's own read path
  (the views, ``modelkit.io.spans``' chunked unbuffered reads, the same worker threads),
  no arithmetic. (``cat`` to /dev/null is no floor: it moved 9-28 GB/s here.)
* ``modelkit.diff``: the same reads plus every statistic.

Targets: diff >= 0.8 x the floor's throughput; <= 0.15 s of CPU per GB read; peak RSS within
3 x the largest tensor + 500 MB. Correctness: ||B - A|| and the changed-element count of
every tensor agree with a float64 whole-tensor reference.

    python benchmarks/bench_diff.py                    # 1.5 GB each (the issue's size)
    MODELKIT_BENCH_QUICK=1 python benchmarks/bench_diff.py   # small: a smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from summary import agrees, at_least, at_most, finish, quick  # noqa: E402

MB = 1024 ** 2
GB = 1024 ** 3
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

CHILD = r"""
import json, resource, sys, time
import torch, tqdm.auto
import modelkit.formats
from modelkit.ops.diff import diff
modelkit.formats.formats()  # one-time imports of the format plugins: startup, not throughput
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t, c = time.perf_counter(), time.process_time()
r = diff(sys.argv[1], sys.argv[2], progress=False)
seconds, cpu = time.perf_counter() - t, time.process_time() - c
print(json.dumps({"seconds": seconds, "cpu": cpu, "threads": torch.get_num_threads(), "rss_before_kb": rss0,
                  "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "changed": len(r.changed), "tensors": len(r.rows), "bytes": r.bytes_read,
                  "rows": {row["name"]: [row["norm_diff"], row["changed"]] for row in r.rows}}))
"""

# The honest floor: both checkpoints' bytes read into memory through diff's own read path
# (same views, same chunked unbuffered reads into reusable buffers, same worker threads),
# with no arithmetic.
FLOOR = r"""
import json, resource, sys, time
import torch
import modelkit.formats
from modelkit.ops.open import open_artifact
from modelkit.ops.diff_stats import Workers, _stream, open_source
modelkit.formats.formats()
t, c = time.perf_counter(), time.process_time()
va, vb = (open_artifact(p).view() for p in sys.argv[1:3])
workers, total = Workers(), 0
def consume(sources, starts, bufs):
    n = 0
    for chunk in _stream(sources, starts, bufs):
        n += sum(x.numel() for x in chunk)
    return n
try:
    for name in va:
        if name in vb.tensors:
            total += sum(workers.map(consume, [open_source(va[name]), open_source(vb[name])]))
finally:
    workers.close()
print(json.dumps({"seconds": time.perf_counter() - t, "cpu": time.process_time() - c, "elements": total}))
"""

# The answer diff must give, computed independently: whole tensors in float64.
REFERENCE = r"""
import json, sys
import torch
from safetensors.torch import load_file
from pathlib import Path
out = {}
for fa in sorted(Path(sys.argv[1]).glob("*.safetensors")):
    a, b = load_file(fa), load_file(Path(sys.argv[2]) / fa.name)
    for k in a:
        d = b[k].double() - a[k].double()
        out[k] = [float(d.norm()), int(torch.count_nonzero(d))]
print(json.dumps(out))
"""


def tensor_names(count: int) -> list[str]:
    """Llama-style on-disk names, seven projections a layer."""
    return [f"model.layers.{i // len(PROJECTIONS)}."
            f"{'self_attn' if i % len(PROJECTIONS) < 4 else 'mlp'}.{PROJECTIONS[i % len(PROJECTIONS)]}.weight"
            for i in range(count)]


def write_pair(root: Path, size_gb: float, tensor_mb: float, shard_mb: float, seed: int = 0) -> tuple[Path, Path, int]:
    """Write checkpoints ``root/a`` and ``root/b``; returns them and the largest tensor's bytes."""
    import torch
    from safetensors.torch import save_file

    cols = 4096
    rows = max(1, int(tensor_mb * MB / 2 / cols))
    count = max(1, round(size_gb * GB / (rows * cols * 2)))
    names = tensor_names(count)
    per_shard = max(1, int(shard_mb * MB // (rows * cols * 2)))
    shards = [names[i:i + per_shard] for i in range(0, count, per_shard)]
    gen = torch.Generator().manual_seed(seed)
    a_dir, b_dir = root / "a", root / "b"
    for d in (a_dir, b_dir):
        d.mkdir(parents=True, exist_ok=True)
    maps: dict[str, dict[str, str]] = {"a": {}, "b": {}}
    k = 0
    for s, group in enumerate(shards):
        file = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        a_part, b_part = {}, {}
        for name in group:
            a = (torch.randn(rows, cols, generator=gen) * 0.02).to(torch.bfloat16)
            a_part[name] = a
            b_part[name] = (a + 1e-3 * torch.randn(rows, cols, generator=gen).to(torch.bfloat16)) if k % 8 else a
            k += 1
        save_file(a_part, a_dir / file, metadata={"format": "pt"})
        save_file(b_part, b_dir / file, metadata={"format": "pt"})
        for name in group:
            maps["a"][name] = maps["b"][name] = file
        del a_part, b_part
    total = count * rows * cols * 2
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": cols,
              "intermediate_size": cols, "num_hidden_layers": (count + 6) // 7,
              "num_attention_heads": 32, "vocab_size": 32000, "dtype": "bfloat16"}
    for side, d in (("a", a_dir), ("b", b_dir)):
        (d / "config.json").write_text(json.dumps(config, indent=1))
        (d / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": maps[side]}, indent=1))
    return a_dir, b_dir, rows * cols * 2


def files_of(*folders: Path) -> list[str]:
    return [str(p) for d in folders for p in sorted(d.glob("*.safetensors"))]


def _env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}


def run_child(code: str, a: Path, b: Path) -> dict:
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, str(a), str(b)], env=_env(), capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"benchmark subprocess failed:\n{out.stderr[-3000:]}")
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "wall": time.perf_counter() - t}


def best_of(code: str, a: Path, b: Path, reps: int) -> dict:
    """The fastest of ``reps`` runs, each in a fresh Python process."""
    return min((run_child(code, a, b) for _ in range(reps)), key=lambda r: r["seconds"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    small = quick()
    p.add_argument("--size-gb", type=float, default=0.05 if small else 1.5, help="size of each checkpoint")
    p.add_argument("--tensor-mb", type=float, default=4 if small else 128, help="size of each bf16 tensor")
    p.add_argument("--shard-mb", type=float, default=16 if small else 512, help="shard size")
    p.add_argument("--reps", type=int, default=1 if small else 2, help="timed repetitions, best kept")
    p.add_argument("--dir", help="work folder (default: a temporary folder, removed afterwards)")
    p.add_argument("--write-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.write_only:  # the generation subprocess
        _, _, largest = write_pair(Path(args.dir), args.size_gb, args.tensor_mb, args.shard_mb)
        print(largest)
        return 0

    work = Path(__file__).resolve().parent / "_work"
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-diff-", dir=work if work.is_dir() else None))
    try:
        t = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, "--write-only", "--dir", str(root),
                              "--size-gb", str(args.size_gb), "--tensor-mb", str(args.tensor_mb),
                              "--shard-mb", str(args.shard_mb)], capture_output=True, text=True, env=_env())
        if out.returncode != 0:
            raise SystemExit(f"writing the checkpoints failed:\n{out.stderr}")
        a, b, largest = root / "a", root / "b", int(out.stdout.split()[-1])
        files = files_of(a, b)
        total = sum(os.path.getsize(f) for f in files)
        print(f"wrote 2 x {total / 2 / GB:.2f} GB ({len(files)} shards, largest tensor "
              f"{largest / MB:.0f} MB) in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)  # page cache warm
        reference = run_child(REFERENCE, a, b)
        floor, run = None, None
        for _ in range(args.reps):  # alternate, so both see the same machine load
            f, r = run_child(FLOOR, a, b), run_child(CHILD, a, b)
            floor = f if floor is None or f["seconds"] < floor["seconds"] else floor
            run = r if run is None or r["seconds"] < run["seconds"] else run
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    gb = total / 1e9
    floor_gbs, diff_gbs = gb / floor["seconds"], gb / run["seconds"]
    rss = run["max_rss_kb"] * 1024
    budget = 3 * largest + 500 * MB
    worst = max(abs(run["rows"][k][0] - v[0]) / max(v[0], 1e-30) for k, v in reference.items() if k != "wall")
    same_counts = all(run["rows"][k][1] == v[1] for k, v in reference.items() if k != "wall")
    figs = [
        at_least(f"diff throughput (2 x {gb / 2:.2f} GB bf16, largest tensor {largest / 1e6:.0f} MB)",
                 diff_gbs, 0.8, "GB/s", baseline="read-both floor", baseline_value=floor_gbs, on_ratio=True,
                 note=f"diff {run['seconds']:.2f} s ({run['cpu']:.2f} s CPU, {run['threads']} threads), floor "
                      f"{floor['seconds']:.2f} s ({floor['cpu']:.2f} s CPU): both checkpoints' bytes read into "
                      "memory through diff's own read path, no arithmetic; best of "
                      f"{args.reps}, alternating"),
        at_most("diff CPU per GB read", run["cpu"] / gb, 0.15, "s/GB", baseline="floor",
                baseline_value=floor["cpu"] / gb),
        at_most("diff peak RSS", rss / 1e6, budget / 1e6, "MB",
                note=f"budget 3 x largest tensor + 500 MB; imports alone {run['rss_before_kb'] * 1024 / 1e6:.0f} MB"),
        agrees("diff agrees with a float64 whole-tensor reference", worst < 1e-4 and same_counts
               and len(run["rows"]) == len(reference) - 1,
               note=f"{run['tensors']} tensors, {run['changed']} changed; worst relative error of "
                    f"||B-A|| {worst:.1e}, changed counts {'equal' if same_counts else 'DIFFER'}"),
    ]
    return finish("bench_diff", figs)


if __name__ == "__main__":
    sys.exit(main())
