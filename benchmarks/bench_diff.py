"""Benchmark ``modelkit diff`` against ``cat`` on two sharded plain checkpoints.

Writes checkpoint A (random bf16 tensors of ``--tensor-mb`` each, sharded safetensors
with an index) and B (A with seven tensors in eight perturbed, as after fine-tuning), then, with the page cache
warm, times ``cat`` over all their files and ``modelkit.diff`` in a fresh subprocess,
and prints a table:

* throughput: bytes of A + B per second, diff vs cat (target: at least 1/3 of cat);
* peak resident memory of the diff process (``ru_maxrss``, memory-mapped pages included)
  vs a budget of 3 x the largest tensor + 500 MB.

Generation runs in its own process and this one never imports torch, so the diff
process (whose ``ru_maxrss`` starts from its parent's at ``exec``) measures only itself.
Diff time is the ``diff()`` call after the one-time imports (torch, the format plugins);
the whole process's time is shown beside it.

    python benchmarks/bench_diff.py                    # 1.5 GB each (the issue's size)
    python benchmarks/bench_diff.py --size-gb 0.2 --tensor-mb 32   # a quick check
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

MB = 1024 ** 2
GB = 1024 ** 3
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

CHILD = r"""
import json, resource, sys, time
import torch, tqdm.auto
import modelkit.formats
from modelkit.diffing import diff
modelkit.formats.formats()  # one-time imports of the format plugins: startup, not throughput
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t, c = time.perf_counter(), time.process_time()
r = diff(sys.argv[1], sys.argv[2], progress=False)
seconds, cpu = time.perf_counter() - t, time.process_time() - c
print(json.dumps({"seconds": seconds, "cpu": cpu, "threads": torch.get_num_threads(), "rss_before_kb": rss0,
                  "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "changed": len(r.changed), "tensors": len(r.rows), "bytes": r.bytes_read}))
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


def time_cat(files: list[str], reps: int) -> tuple[float, float]:
    """Best of ``reps`` (wall, cpu) timings of ``cat FILES > /dev/null`` (after one warming run)."""
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    best = (float("inf"), float("inf"))
    for _ in range(reps):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
        wall = time.perf_counter() - t
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        best = min(best, (wall, cpu))
    return best


def _env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}


def time_diff(a: Path, b: Path, reps: int) -> dict:
    """The fastest of ``reps`` diff runs, each in a fresh Python process."""
    env = _env()
    best = None
    for _ in range(reps):
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", CHILD, str(a), str(b)], env=env,
                             capture_output=True, text=True)
        wall = time.perf_counter() - t
        if out.returncode != 0:
            raise SystemExit(f"diff subprocess failed:\n{out.stderr}")
        run = {**json.loads(out.stdout.strip().splitlines()[-1]), "wall": wall}
        if best is None or run["seconds"] < best["seconds"]:
            best = run
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-gb", type=float, default=1.5, help="size of each checkpoint (default 1.5)")
    p.add_argument("--tensor-mb", type=float, default=128, help="size of each bf16 tensor (default 128)")
    p.add_argument("--shard-mb", type=float, default=512, help="shard size (default 512)")
    p.add_argument("--reps", type=int, default=2, help="timed repetitions, best kept (default 2)")
    p.add_argument("--dir", help="work folder (default: a temporary folder, removed afterwards)")
    p.add_argument("--json", action="store_true", help="also print the numbers as JSON")
    p.add_argument("--write-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.write_only:  # the generation subprocess
        _, _, largest = write_pair(Path(args.dir), args.size_gb, args.tensor_mb, args.shard_mb)
        print(largest)
        return 0

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-diff-"))
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
        cat_s, cat_cpu = time_cat(files, args.reps)
        run = time_diff(a, b, args.reps)
        cat_gbs = total / cat_s / 1e9
        diff_gbs = total / run["seconds"] / 1e9
        ratio = diff_gbs / cat_gbs
        rss = run["max_rss_kb"] * 1024
        budget = 3 * largest + 500 * MB
        rows = [
            ("checkpoints", f"2 x {total / 2 / 1e9:.2f} GB, largest tensor {largest / 1e6:.0f} MB", ""),
            ("cat throughput", f"{cat_gbs:.2f} GB/s ({cat_s:.2f} s, {cat_cpu:.2f} s CPU)", ""),
            ("diff throughput", f"{diff_gbs:.2f} GB/s ({run['seconds']:.2f} s, {run['cpu']:.2f} s CPU, "
             f"{run['threads']} threads; whole process {run['wall']:.1f} s)",
             f"{ratio:.2f} x cat (target >= 0.33): {'PASS' if ratio >= 1 / 3 else 'FAIL'}"),
            ("CPU per GB", f"cat {cat_cpu / total * 1e9:.3f} s, diff {run['cpu'] / total * 1e9:.3f} s",
             "wall-clock ratios need an otherwise idle machine; CPU time does not"),
            ("diff peak RSS", f"{rss / 1e6:.0f} MB (imports alone {run['rss_before_kb'] * 1024 / 1e6:.0f} MB)",
             f"budget 3 x {largest / 1e6:.0f} MB + 500 MB = {budget / 1e6:.0f} MB: "
             f"{'PASS' if rss <= budget else 'FAIL'}"),
            ("tensors", f"{run['tensors']} compared, {run['changed']} changed", ""),
        ]
        print("| measure | value | verdict |\n|---|---|---|")
        for r in rows:
            print(f"| {r[0]} | {r[1]} | {r[2]} |")
        if args.json:
            print(json.dumps({"bytes": total, "largest_tensor": largest, "cat_s": cat_s, "cat_cpu": cat_cpu,
                              "cat_gbs": cat_gbs, "diff": run, "diff_gbs": diff_gbs, "ratio": ratio,
                              "max_rss": rss, "rss_budget": budget}))
        return 0 if ratio >= 1 / 3 and rss <= budget else 1
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
