"""Inspect: lean whole commands for every format, and in-process speed at real size.

1. ``modelkit inspect`` of every readable artifact of ``modelkit.testing.write_catalog``
   (every layout of the four formats: plain HF, PEFT LoRA, DyLoRA-MoE eras, compressed-MoE
   eras; the bad-file group has no format of its own) as a whole command with a warm cache:
   wall time, CPU time, peak RSS, and whether torch / transformers were imported; the worst
   entry of each format counts. Warm: the architecture cache filled and the bytecode
   compiled by one earlier pass, as for a user after the first inspect. Target <= 0.3 s and <= 60 MB, no torch, no transformers.
   Baseline: the plain-HF inspect, same run.
2. In process, at real size: a checkpoint with the Qwen3-30B-A3B layout (48 layers x 128
   experts, per-expert keys, 16 safetensors shards, bf16; sparse files, so no disk is used)
   and a compressed-MoE checkpoint of the same model (48 x 3 = 144 layer files of 128 rank-64
   wrappers each, fp32, plus non_moe_weights.pt; sparse too). Targets <= 0.5 s and <= 1.5 s.
   Each is also written at 1/16 and 1/4 of its layers to show growth with tensor count (target:
   per-tensor CPU time at 16x within 1.5x of that at 1x; CPU, not wall, because the machine
   is shared and wall time at one size can catch a busy moment). Baselines: reading the
   safetensors headers alone (``safe_open``); listing the pickles with ``torch.load(mmap=True)``.

Correctness: every inspect must report the artifact complete (no error, no missing tensor)
with as many tensors as the baseline lists.

    python benchmarks/bench_inspect.py          # MODELKIT_BENCH_QUICK=1 for small sizes
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from summary import Figure, agrees, at_most, finish, info, load_average, quick  # noqa: E402

# Qwen3-30B-A3B's config.json (the fields that shape its tensors)
QWEN3_30B_A3B = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
    num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
    num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[],
    norm_topk_prob=True, tie_word_embeddings=False, max_position_embeddings=40960,
    rms_norm_eps=1e-6, dtype="bfloat16", architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe")
QUICK_SHAPE = dict(vocab_size=1024, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8,
                   num_experts_per_tok=2, num_hidden_layers=4)
RANK = 64

# ---------------------------------------------------------------------------- sparse writers


class SparseWriter:
    """A write-only file object that leaves a hole for every all-zero block written
    (torch.save writes each storage in one call), so real-size files cost no disk."""

    def __init__(self, path: Path):
        self.f = open(path, "wb")
        self.pos = 0

    def write(self, data) -> int:
        import numpy as np

        mv = memoryview(data).cast("B")
        n = len(mv)
        a = np.frombuffer(mv, np.uint8)
        k = n // 8 * 8
        if n >= 4096 and not a[:k].view(np.uint64).any() and not a[k:].any():
            self.f.seek(n, 1)
        else:
            self.f.write(mv)
        self.pos += n
        return n

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.f.truncate(self.pos)
        self.f.close()


def zeros(shape, dtype):
    """A zero tensor on untouched (calloc) pages: costs no memory until read."""
    import numpy as np
    import torch

    t = torch.from_numpy(np.zeros(shape, np.float32 if dtype == torch.float32 else np.uint16))
    return t if dtype == torch.float32 else t.view(dtype)


def save_sparse(obj, path: Path) -> None:
    import torch

    w = SparseWriter(path)
    try:
        torch.save(obj, w)
    finally:
        w.close()


def write_safetensors_sparse(path: Path, tensors: dict[str, tuple[tuple[int, ...], str]]) -> None:
    """A safetensors file of zeros: the header, then a hole as long as the data."""
    sizes = {"BF16": 2, "F32": 4}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, (shape, dt) in tensors.items():
        n = sizes[dt]
        for d in shape:
            n *= d
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + offset)


def model_config(layers: int):
    from transformers import AutoConfig

    d = dict(QWEN3_30B_A3B, num_hidden_layers=layers)
    if quick():
        d.update(QUICK_SHAPE, num_hidden_layers=layers)
    d.pop("model_type")
    return AutoConfig.for_model("qwen3_moe", **d)


def write_real_layout(folder: Path, layers: int, shards: int = 16) -> int:
    """A Qwen3-30B-A3B-layout checkpoint of ``layers`` layers; returns its tensor count."""
    from modelkit.architecture.bridge import expected_tensors

    folder.mkdir(parents=True, exist_ok=True)
    config = model_config(layers)
    config.save_pretrained(folder)
    expected = expected_tensors(config)
    names = list(expected)
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for s in range(shards):
        part = names[s * per:(s + 1) * per]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors_sparse(folder / fname, {n: (expected[n].shape, "BF16") for n in part})
        for n in part:
            weight_map[n] = fname
            total += 2 * expected[n].numel
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return len(names)


def write_real_compressed(base: Path, layers: int) -> tuple[Path, int]:
    """A checkpoint-N compressed MoE of the Qwen3-30B-A3B config at ``layers`` layers
    (fp32 rank-64 wrappers; bf16 non-MoE weights); returns its folder and the number of
    tensors the expanded model has."""
    import re

    import torch
    import yaml

    from modelkit.architecture.bridge import expected_tensors

    config = model_config(layers)
    ckpt = base / "checkpoints" / "checkpoint-100"
    ckpt.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(ckpt)
    (base / "compression_config.yaml").write_text(yaml.safe_dump(
        {"model_name": str(ckpt), "rank": RANK, "num_steps": 100, "lr": 1e-4,
         "projections": ["gate_proj", "up_proj", "down_proj"]}))
    (ckpt / "compressed_metadata.json").write_text(json.dumps(
        {"compressed_layer_indices": list(range(layers)), "num_compressed_layers": layers,
         "total_layers": layers}))
    expected = expected_tensors(config)
    expert = re.compile(r"\.mlp\.experts\.\d+\.")
    save_sparse({n: zeros(e.shape, torch.bfloat16) for n, e in expected.items() if not expert.search(n)},
                ckpt / "non_moe_weights.pt")
    h, m, experts = config.hidden_size, config.moe_intermediate_size, config.num_experts
    for layer in range(layers):
        (ckpt / f"layer_{layer}").mkdir(exist_ok=True)
        for proj, (d_out, d_in) in (("gate_proj", (m, h)), ("up_proj", (m, h)), ("down_proj", (h, m))):
            data = {"layer_idx": layer, "projection": proj, "core": zeros((d_out, d_in), torch.float32),
                    "wrappers": [{"U_in": zeros((d_in, RANK), torch.float32),
                                  "V_in": zeros((d_in, RANK), torch.float32),
                                  "U_out": zeros((d_out, RANK), torch.float32),
                                  "V_out": zeros((d_out, RANK), torch.float32)} for _ in range(experts)],
                    "metadata": {"num_experts": experts, "d_in": d_in, "d_out": d_out, "rank": RANK}}
            save_sparse(data, ckpt / f"layer_{layer}" / f"{proj}.pt")
    return ckpt, len(expected)


# ---------------------------------------------------------------------------- measurements

CLI_CHILD = r"""
import contextlib, io, json, resource, sys, time
t = time.perf_counter()
from modelkit.ui.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    rc = main(["inspect", sys.argv[1]])
print(json.dumps({"rc": rc, "wall": time.perf_counter() - t,
                  "heavy": sorted(m for m in ("torch", "transformers", "peft") if m in sys.modules)}))
"""

MEASURE = ("import json,os,subprocess,sys,time\n"
           "t=time.perf_counter();p=subprocess.run(sys.argv[1:],capture_output=True,text=True)\n"
           "w=time.perf_counter()-t\n"
           "import resource;u=resource.getrusage(resource.RUSAGE_CHILDREN)\n"
           "print(json.dumps({'wall':w,'cpu':u.ru_utime+u.ru_stime,'rss_kb':u.ru_maxrss,'out':p.stdout,"
           "'err':p.stderr[-2000:],'rc':p.returncode}))")


def whole_command(path: Path, env: dict) -> dict:
    """Wall time (interpreter start included) and peak RSS of `modelkit inspect PATH` run
    the way the console script runs it (``modelkit.ui.cli.main``), in a fresh process that is
    the only child of its measuring wrapper."""
    out = subprocess.run([sys.executable, "-c", MEASURE, sys.executable, "-c", CLI_CHILD, str(path)],
                         capture_output=True, text=True, env=env, check=True)
    m = json.loads(out.stdout)
    if m["rc"] != 0 and not m["out"].strip():
        raise SystemExit(f"inspect of {path} failed:\n{m['err']}")
    child = json.loads(m["out"].strip().splitlines()[-1])
    return {"wall": m["wall"], "cpu": m["cpu"], "rss_mb": m["rss_kb"] / 1024, "heavy": child["heavy"],
            "rc": child["rc"]}


WARM_UP = r"""
import contextlib, io, sys
from modelkit.ui.cli import main
for path in sys.argv[1:]:
    with contextlib.redirect_stdout(io.StringIO()):
        main(["inspect", path])
"""


def catalog_formats() -> dict[str, list[str]]:
    """format -> every readable catalog entry of it (all layouts and eras)."""
    from modelkit.testing.catalog import ENTRIES

    out: dict[str, list[str]] = {}
    for e in ENTRIES:
        if e.group != "bad" and e.raises is None:
            out.setdefault(e.format, []).append(e.name)
    return out


def lean_commands(work: Path) -> list:
    from modelkit.testing import write_catalog

    formats = catalog_formats()
    catalog = write_catalog(work / "catalog")
    env = {**os.environ, "MODELKIT_CACHE": str(work / "cache"), "PYTHONPATH": str(ROOT)
           + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""),
           # as after an install: bytecode compiled once (here under the work folder, not
           # beside the sources), not compiled again by every command
           "PYTHONPYCACHEPREFIX": str(work / "pycache")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    # cold, all in one process (torch imported once): fills the architecture and bytecode caches
    subprocess.run([sys.executable, "-c", WARM_UP, *(str(catalog[n]) for ns in formats.values() for n in ns)],
                   env=env, check=True, capture_output=True)
    reps = 1 if quick() else 2
    worst, per_entry = {}, []
    for fmt, names in formats.items():
        runs = []
        for n in names:
            tries = [whole_command(catalog[n], env) for _ in range(reps)]
            r = dict(min(tries, key=lambda r: r["wall"]), cpu=min(t["cpu"] for t in tries), entry=n)
            runs.append(r)
            per_entry.append((fmt, r))
        worst[fmt] = {"wall": max(r["wall"] for r in runs), "cpu": max(r["cpu"] for r in runs),
                      "rss_mb": max(r["rss_mb"] for r in runs),
                      "heavy": sorted({m for r in runs for m in r["heavy"]}),
                      "entry": max(runs, key=lambda r: r["wall"])["entry"],
                      "heavy_entries": [r["entry"] for r in runs if r["heavy"]]}
    print(f"whole `modelkit inspect`, warm cache, best of {reps} (load {load_average()})")
    print(f"{'format':<15} {'entry':<32} {'wall s':>7} {'cpu s':>6} {'RSS MB':>7}  imported")
    for fmt, r in per_entry:
        print(f"{fmt:<15} {r['entry']:<32} {r['wall']:>7.3f} {r['cpu']:>6.3f} {r['rss_mb']:>7.1f}  "
              f"{', '.join(r['heavy']) or '-'}", flush=True)
    base = worst["plain-hf"]
    figs = []
    for fmt, w in worst.items():
        figs.append(at_most(f"inspect CLI {fmt}: wall (warm cache)", w["wall"], 0.3, "s",
                            baseline="plain-hf", baseline_value=base["wall"],
                            note=f"slowest of the {len(formats[fmt])} {fmt} catalog entries: {w['entry']}"))
        figs.append(info(f"inspect CLI {fmt}: CPU (user + sys)", w["cpu"], "s",
                         baseline="plain-hf", baseline_value=base["cpu"]))
        figs.append(at_most(f"inspect CLI {fmt}: peak RSS", w["rss_mb"], 60, "MB",
                            baseline="plain-hf", baseline_value=base["rss_mb"]))
        figs.append(agrees(f"inspect CLI {fmt}: no torch/transformers imported", not w["heavy"],
                           note=f"imported {', '.join(w['heavy'])} ({', '.join(w['heavy_entries'])})"
                           if w["heavy"] else "", target="none imported"))
    return figs


def best(fn, reps: int) -> tuple[float, float]:
    """The best wall and the best CPU time (this process) of ``reps`` calls of ``fn``."""
    walls, cpus = [], []
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return min(walls), min(cpus)


def _growth(kind: str, rows: list) -> Figure:
    """Per-tensor CPU time at the largest size over that at the smallest."""
    (f1, _, n1, _, c1, _), (fk, _, nk, _, ck, _) = rows[0], rows[-1]
    return at_most(f"inspect growth, {kind}: per-tensor CPU time at {fk}x / at {f1}x", (ck / nk) / (c1 / n1), 1.5,
                   note="linear growth is 1.0; " + ", ".join(
                       f"{f}x {L}L {n} tensors: wall {w:.3f} s, CPU {c:.3f} s ({c / n * 1e6:.1f} us/tensor)"
                       for f, L, n, w, c, _ in rows))


def real_size(work: Path, only: set[str] = frozenset({"plain", "compressed"})) -> list:
    figs = []
    full = 4 if quick() else 48
    scales = [(1, full // 16 or 1), (4, full // 4), (16, full)]
    if quick():
        scales = [(1, 1), (2, 2), (4, 4)]
    reps = 1 if quick() else 3
    if "plain" in only:
        figs += _real_plain(work, scales, reps)
    if "compressed" in only:
        figs += _real_compressed(work, scales, reps)
    return figs


def _real_plain(work: Path, scales: list, reps: int) -> list:
    """The Qwen3-30B-A3B layout at each scale."""
    import modelkit

    figs, rows = [], []
    for factor, layers in scales:
        folder = work / f"qwen3-30b-a3b-layout-{layers}L"
        n = write_real_layout(folder, layers)
        r = modelkit.inspect(folder)  # warms the architecture cache
        ok = not r.errors and len(r.tensors) == n
        del r
        t, cpu = best(lambda: modelkit.inspect(folder), reps)
        rows.append((factor, layers, n, t, cpu, ok))
        if factor == scales[-1][0]:
            h, _ = best(lambda: _headers(folder), reps)
            figs.append(at_most(f"inspect Qwen3-30B-A3B layout ({layers} layers, {n} tensors, 16 shards)",
                                t, 0.5, "s", baseline="safetensors headers", baseline_value=h,
                                note=f"{_gb(folder):.1f} GB of sparse files; CPU {cpu:.3f} s"))
            figs.append(info("inspect Qwen3-30B-A3B layout: CPU", cpu, "s"))
            figs.append(agrees("inspect Qwen3-30B-A3B layout: complete, every tensor listed",
                               all(x[5] for x in rows)))
        shutil.rmtree(folder)
    figs.append(_growth("plain", rows))
    return figs


def _real_compressed(work: Path, scales: list, reps: int) -> list:
    """The compressed MoE of the same model at each scale."""
    import modelkit

    figs, rows = [], []
    for factor, layers in scales:
        base = work / f"compressed-{layers}L"
        ckpt, n = write_real_compressed(base, layers)
        r = modelkit.inspect(ckpt)
        ok = not r.errors and not any(f.code == "missing-tensors" for f in r.findings)
        stored = len(r.tensors)
        del r
        t, cpu = best(lambda: modelkit.inspect(ckpt), reps)
        rows.append((factor, layers, stored, t, cpu, ok))
        if factor == scales[-1][0]:
            files = sorted(ckpt.glob("layer_*/*.pt"))
            t0 = time.perf_counter()
            listed = _torch_list(files + [ckpt / "non_moe_weights.pt"])
            baseline = time.perf_counter() - t0
            experts = (QUICK_SHAPE if quick() else QWEN3_30B_A3B)["num_experts"]
            figs.append(at_most(f"inspect compressed MoE ({len(files)} layer files x {experts} wrappers)",
                                t, 1.5, "s", baseline="torch.load(mmap) listing", baseline_value=baseline,
                                note=f"{_gb(ckpt):.1f} GB of sparse files; {stored} stored tensors; CPU {cpu:.3f} s"))
            figs.append(info("inspect compressed MoE: CPU", cpu, "s"))
            figs.append(agrees("inspect compressed MoE: complete, every stored tensor listed",
                               all(x[5] for x in rows) and stored == listed,
                               note=f"{stored} stored tensors listed, torch.load lists {listed}"))
        shutil.rmtree(base)
    figs.append(_growth("compressed", rows))
    return figs


def _headers(folder: Path) -> int:
    from safetensors import safe_open

    n = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            n += len([h.get_slice(k).get_shape() for k in h.keys()])
    return n


def _torch_list(files: list[Path]) -> int:
    import torch

    def count(o) -> int:
        if isinstance(o, torch.Tensor):
            return 1
        if isinstance(o, dict):
            return sum(count(v) for v in o.values())
        if isinstance(o, (list, tuple)):
            return sum(count(v) for v in o)
        return 0

    return sum(count(torch.load(f, weights_only=True, mmap=True)) for f in files)


def _gb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e9


SCENARIOS = ("cli", "plain", "compressed")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, help="work folder (default: a temporary one, removed after)")
    p.add_argument("--only", action="append", choices=SCENARIOS,
                   help="run only this scenario (repeatable): cli (whole commands over the catalog), "
                   "plain (Qwen3-30B-A3B layout), compressed (real-size compressed MoE); default: all")
    args = p.parse_args(argv)
    only = set(args.only or SCENARIOS)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-inspect-", dir=ROOT / "benchmarks" / "_work"
                                              if (ROOT / "benchmarks" / "_work").is_dir() else None))
    os.environ.setdefault("MODELKIT_CACHE", str(work / "cache"))
    try:
        figs = lean_commands(work) if "cli" in only else []
        figs += real_size(work, only)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return finish("bench_inspect", figs)


if __name__ == "__main__":
    sys.exit(main())
