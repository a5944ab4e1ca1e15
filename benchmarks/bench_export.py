"""Export speed and memory, each against its baseline in the same run.

1. A compressed MoE of ``--moe-gb`` materialized: ``modelkit.export`` vs the seed note's
   approach (load the whole compressed model, build a second full model, fill it,
   ``save_pretrained``). Targets: wall time <= 1/3, peak memory <= 1/4, throughput >= 50% of raw
   write speed.
2. A LoRA merge onto a base of ``--lora-gb``: ``modelkit.export`` vs PEFT
   ``merge_and_unload()`` + ``save_pretrained``, both float32 in 100 MB shards, both fsynced.
   Targets: peak memory <= 0.4, wall time <= 0.8, for the export of an architecture modelkit
   has seen before (its cache, empty at the start of the run, filled by a first export that
   is reported beside it: that one builds the config with transformers).
3. Export throughput as a fraction of this machine's raw write speed (``os.write`` of the
   same byte count + fsync), measured in the same run.
4. Qwen3-30B-A3B at real size: ``--real-layers`` decoder layers of the real shapes (128 experts,
   hidden 2048, moe_intermediate 768, 32 heads of 128, 4 KV heads; rank-64 wrappers in float32
   with each expert's core copy, as a distillation checkpoint holds them; the rest bfloat16, so
   the export is bfloat16 as the real one is) exported by ``modelkit.export``; the projected
   time of all 48 layers is 48 x the measured time per layer, plus the real embedding and
   ``lm_head`` (2 x 151,936 x 2,048 bf16, 1.24 GB) at the raw write speed of the same run.

Every side runs in its own fresh subprocess that imports only what it uses; peak memory
is that child's ``ru_maxrss`` (from ``os.wait4``), wall time is the child's whole life
(interpreter start and imports included). Both sides fsync their output (a durable export is
the job), so neither is credited for leaving dirty pages behind. An ``idle`` child (torch and
transformers imported, no work) shows the fixed floor every side pays.

Correctness: every tensor of each export equals the baseline's (relative max difference <= 1e-5).

    python benchmarks/bench_export.py                       # defaults of the issue (>= 1 GB)
    MODELKIT_BENCH_QUICK=1 python benchmarks/bench_export.py   # small: a smoke test
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from summary import agrees, at_least, at_most, finish, info, quick  # noqa: E402


# --------------------------------------------------------------------------- children


def _fsync_tree(folder: Path) -> None:
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


def child_setup_moe(work: Path, gb: float, hidden: int, experts: int, rank: int) -> dict:
    """An original qwen3_moe of about ``gb`` GB of experts, and its compressed checkpoint."""
    from modelkit.testing import write_compressed_moe, write_plain_hf

    inter = hidden // 2
    per_layer = 3 * experts * hidden * inter * 4
    layers = max(1, math.ceil(gb * 1e9 / per_layer))
    original = write_plain_hf(work / "original-moe", "qwen3_moe", hidden_size=hidden,
                              moe_intermediate_size=inter, intermediate_size=inter * 2,
                              num_experts=experts, num_experts_per_tok=2, num_hidden_layers=layers,
                              num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
                              head_dim=64 if hidden >= 64 else 8)
    ckpt = write_compressed_moe(work / "compressed", "checkpoint-N", original, rank=rank)
    return {"ckpt": str(ckpt), "layers": layers, "materialized_bytes": layers * per_layer}


QWEN3_30B_A3B = {"layers": 48, "hidden": 2048, "moe_intermediate": 768, "experts": 128, "heads": 32,
                 "kv_heads": 4, "head_dim": 128, "vocab": 151_936, "rank": 64}


def child_setup_real(work: Path, layers: int, experts: int, hidden: int, inter: int, rank: int) -> dict:
    """A compressed distillation checkpoint of ``layers`` Qwen3-30B-A3B-shaped decoder layers:
    wrappers and per-expert core copies in float32, everything else bfloat16."""
    import torch

    from modelkit.testing import write_compressed_moe, write_plain_hf

    q = QWEN3_30B_A3B
    heads = q["heads"] if hidden == q["hidden"] else max(1, hidden // 64)
    original = write_plain_hf(work / "original-real", "qwen3_moe", hidden_size=hidden,
                              moe_intermediate_size=inter, intermediate_size=inter * 8, num_experts=experts,
                              num_experts_per_tok=8, num_hidden_layers=layers, num_attention_heads=heads,
                              num_key_value_heads=max(1, heads // 8), head_dim=q["head_dim"] if hidden == q["hidden"]
                              else 64)
    ckpt = write_compressed_moe(work / "compressed-real", "checkpoint-N", original, rank=rank,
                                model_dtype=torch.bfloat16)
    shutil.rmtree(original)
    return {"ckpt": str(ckpt), "expert_bytes": layers * 3 * experts * hidden * inter * 2}


def child_setup_lora(work: Path, gb: float, hidden: int, r: int) -> dict:
    """A llama base of about ``gb`` GB and a trained LoRA adapter (r, alpha 2r) on q/k/v/o."""
    from modelkit.testing import write_peft_lora, write_plain_hf

    inter = int(hidden * 2.75) // 64 * 64 or 64
    per_layer = (4 * hidden * hidden + 3 * hidden * inter) * 4
    layers = max(1, math.ceil(gb * 1e9 / per_layer))
    heads = max(1, hidden // 64)
    base = write_plain_hf(work / "base-llama", "llama", hidden_size=hidden, intermediate_size=inter,
                          num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                          head_dim=hidden // heads)
    adapter = write_peft_lora(work / "adapter", base, r=r, alpha=2 * r,
                              target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    return {"base": str(base), "adapter": str(adapter), "layers": layers}


def child_ours(ref: str, out: str, base: str | None, shard: str) -> dict:
    import torch  # noqa: F401  (imported before the work clock starts, as the baselines do)

    import modelkit  # and whatever of transformers the export itself imports (on the work clock)
    from modelkit.io import shards as shards_module  # export calls shards.write_weights

    streaming = []  # seconds in write_weights: the part that grows with the model (the rest is fixed)
    write_weights = shards_module.write_weights

    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return write_weights(*a, **k)
        finally:
            streaming.append(time.perf_counter() - t)

    shards_module.write_weights = timed
    t = time.perf_counter()
    result = modelkit.export(ref, out, base=base, max_shard_size=shard, progress=False)
    return {"export_s": time.perf_counter() - t, "stream_s": sum(streaming), "bytes": result.bytes,
            "shards": len(result.shards)}


def child_baseline_moe(ckpt: str, out: str, math: str = "seed") -> dict:
    """The seed note's ``export_to_hf_format``: whole compressed model in memory, a second
    full model built and filled, ``save_pretrained``. ``math="seed"`` reconstructs each
    expert as the note writes it, ``(I + U_out V_out^T) · core · (I + U_in V_in^T)`` with the
    identity-plus-low-rank matrices formed; ``math="lowrank"`` uses modelkit's expression
    instead, so that only the pipelines are compared."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    t = time.perf_counter()
    ckpt_p = Path(ckpt)
    non_moe = torch.load(ckpt_p / "non_moe_weights.pt", weights_only=True)
    layers = {}
    for f in sorted(ckpt_p.glob("layer_*/*.pt")):
        data = torch.load(f, weights_only=True)
        layers[(data["layer_idx"], data["projection"])] = data
    config = AutoConfig.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    inter = config.moe_intermediate_size
    with torch.no_grad():
        for (layer, proj), data in layers.items():
            experts = model.model.layers[layer].mlp.experts
            c = data["core"].float()
            for e, w in enumerate(data["wrappers"]):
                u_in, v_in, u_out, v_out = (w[k].float() for k in ("U_in", "V_in", "U_out", "V_out"))
                if math == "seed":
                    left = torch.eye(c.shape[0]) + u_out @ v_out.T
                    right = torch.eye(c.shape[1]) + u_in @ v_in.T
                    weight = left @ c @ right
                else:
                    vc = v_out.T @ c
                    weight = c + u_out @ vc + (c @ u_in) @ v_in.T + u_out @ ((vc @ u_in) @ v_in.T)
                if proj == "down_proj":
                    experts.down_proj[e].copy_(weight)
                elif proj == "gate_proj":
                    experts.gate_up_proj[e, :inter].copy_(weight)
                else:
                    experts.gate_up_proj[e, inter:].copy_(weight)
        model.load_state_dict(non_moe, strict=False)
    model.save_pretrained(out)
    _fsync_tree(Path(out))
    return {"export_s": time.perf_counter() - t}


def child_baseline_lora(base: str, adapter: str, out: str, shard: str) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.save_pretrained(out, max_shard_size=shard)  # the same shard size as modelkit's
    _fsync_tree(Path(out))
    return {"export_s": time.perf_counter() - t}


def child_idle() -> dict:
    """The floor: an interpreter with torch and transformers' modeling code imported, idle."""
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401
    from transformers.modeling_utils import PreTrainedModel  # noqa: F401

    return {}


CHILDREN = {"setup_moe": child_setup_moe, "setup_real": child_setup_real, "setup_lora": child_setup_lora, "ours": child_ours,
            "baseline_moe": child_baseline_moe, "baseline_lora": child_baseline_lora, "idle": child_idle}


def _child_main(role: str, args: str, children: dict | None = None) -> None:
    kwargs = json.loads(args)
    for k in ("work",):
        if k in kwargs:
            kwargs[k] = Path(kwargs[k])
    out = (children or CHILDREN)[role](**kwargs)
    print("RESULT " + json.dumps(out), flush=True)


# --------------------------------------------------------------------------- parent


def run_child(role: str, *, script: Path = HERE, env: dict | None = None, **kwargs) -> dict:
    """Run one side in a fresh interpreter (``script _child ROLE ARGS``, this file by
    default; ``env``: variables set for it); its result plus wall seconds and peak RSS."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    os.sync()  # the child starts with no earlier writes left to flush (a benchmark before this one
    #            leaves GBs dirty: flushing them under a child's fsync cost it up to 2 s)
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(script), "_child", role, json.dumps(kwargs, default=str)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{role} failed ({proc.returncode}):\n{stderr[-4000:]}")
    line = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return {**json.loads(line[7:]), "wall_s": wall, "peak_mb": usage.ru_maxrss / 1024,
            "cpu_s": usage.ru_utime + usage.ru_stime}


def raw_write_seconds(folder: Path, nbytes: int, chunk: int = 8 << 20) -> float:
    """Seconds to ``os.write`` ``nbytes`` to a new file and fsync it."""
    buf = os.urandom(chunk)
    path = folder / "raw-write.bin"
    os.sync()  # as run_child: nothing earlier left to flush
    t = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = nbytes
        while left > 0:
            left -= os.write(fd, buf[:min(chunk, left)])
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - t
    path.unlink()
    return seconds


def same_tensors(a: Path, b: Path) -> tuple[float, int, int]:
    """(max |a - b| / max |b| over every tensor, tensors compared, names only on one side)."""
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        idx = folder / "model.safetensors.index.json"
        if idx.exists():
            return {k: folder / v for k, v in json.loads(idx.read_text())["weight_map"].items()}
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            return {k: folder / "model.safetensors" for k in f.keys()}

    ia, ib = index(a), index(b)
    worst = 0.0
    for n in sorted(set(ia) & set(ib)):
        with safe_open(str(ia[n]), "pt") as fa, safe_open(str(ib[n]), "pt") as fb:
            x, y = fa.get_tensor(n).float(), fb.get_tensor(n).float()
            scale = max(float(y.abs().max()), 1e-30) if y.numel() else 1.0
            if x.shape != y.shape:
                return float("inf"), 0, 0
            worst = max(worst, float((x - y).abs().max()) / scale if x.numel() else 0.0)
    return worst, len(set(ia) & set(ib)), len(set(ia) ^ set(ib))


def main(argv: list[str] | None = None) -> int:
    small = quick()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--moe-gb", type=float, default=0.02 if small else 1.0,
                   help="materialized expert size of the compressed MoE")
    p.add_argument("--moe-hidden", type=int, default=256 if small else 1024)
    p.add_argument("--moe-experts", type=int, default=16)
    p.add_argument("--rank", type=int, default=8 if small else 64, help="compressed wrapper rank")
    p.add_argument("--baseline-math", choices=("seed", "lowrank"), default="seed",
                   help="seed: the note's (I + UV^T) C (I + UV^T) with the matrices formed; "
                        "lowrank: modelkit's expression (compares the pipelines only)")
    p.add_argument("--lora-gb", type=float, default=0.02 if small else 1.0, help="size of the LoRA base model")
    p.add_argument("--lora-hidden", type=int, default=256 if small else 2048)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--max-shard-size", default="100MB", help="modelkit's shard size")
    p.add_argument("--real-shard-size", default="2GB", help="shard size of the real-size export (modelkit's default)")
    p.add_argument("--workdir", help="where artifacts and exports go (default: a temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--real-layers", type=int, default=1,
                   help="Qwen3-30B-A3B-sized decoder layers exported for the full-model projection (0: skip)")
    p.add_argument("--only", choices=("moe", "real", "lora"), help="run one scenario")
    args = p.parse_args(argv)

    scratch = HERE.parent / "_work"
    work = Path(args.workdir or tempfile.mkdtemp(prefix="modelkit-bench-",
                                                 dir=scratch if scratch.is_dir() else None)).absolute()
    work.mkdir(parents=True, exist_ok=True)
    rows, figs = [], []
    try:
        idle = run_child("idle")
        rows.append(("floor", "idle: interpreter + imports", idle, None, None))
        figs.append(info("idle child (torch + transformers imported)", idle["peak_mb"], "MB",
                         note=f"{idle['wall_s']:.1f} s: the floor every side pays"))
        if args.only in (None, "moe"):
            setup = run_child("setup_moe", work=work, gb=args.moe_gb, hidden=args.moe_hidden,
                              experts=args.moe_experts, rank=args.rank)
            ours = run_child("ours", ref=setup["ckpt"], out=str(work / "moe-ours"), base=None,
                             shard=args.max_shard_size)
            base = run_child("baseline_moe", ckpt=setup["ckpt"], out=str(work / "moe-baseline"),
                             math=args.baseline_math)
            worst, n, odd = same_tensors(work / "moe-ours", work / "moe-baseline")
            raw = raw_write_seconds(work, ours["bytes"])
            what = (f"{setup['layers']} layers x {args.moe_experts} experts, hidden {args.moe_hidden}, "
                    f"rank {args.rank} -> {ours['bytes'] / 1e9:.2f} GB")
            figs += [
                at_most(f"compressed-MoE export time ({what})", ours["wall_s"], 1 / 3, "s",
                        baseline="seed approach", baseline_value=base["wall_s"], on_ratio=True,
                        note="seed: load compressed, build a second full model, save_pretrained "
                             f"({args.baseline_math} math); whole child processes, both fsync"),
                at_most("compressed-MoE export peak RSS", ours["peak_mb"], 1 / 4, "MB",
                        baseline="seed approach", baseline_value=base["peak_mb"], on_ratio=True),
                at_least("compressed-MoE export throughput", ours["bytes"] / ours["export_s"] / 1e6, 0.5,
                         "MB/s", baseline="raw write", baseline_value=ours["bytes"] / raw / 1e6, on_ratio=True,
                         note="raw write: os.write + fsync of the same byte count, same run"),
                info("compressed-MoE export CPU (child, all threads)", ours["cpu_s"], "s", baseline="seed approach",
                     baseline_value=base["cpu_s"], note="load-independent, unlike the wall-clock ratios"),
                agrees("compressed-MoE export equals the seed approach's", worst <= 1e-5 and n > 0 and not odd,
                       note=f"{n} tensors, max |diff| / max |seed| = {worst:.1e}"
                            + (f", {odd} names on one side only" if odd else "")),
            ]
            rows.append(("moe", f"baseline (seed note, {args.baseline_math} math)", base, None, None))
            rows.append(("moe", "modelkit export", ours, (1 / 3, 1 / 4), base))
            for d in ("moe-ours", "moe-baseline", "original-moe", "compressed"):
                shutil.rmtree(work / d, ignore_errors=True)
        if args.only in (None, "real") and args.real_layers > 0:
            q = QWEN3_30B_A3B
            shape = ({"experts": 8, "hidden": 256, "inter": 96, "rank": 8} if small else
                     {"experts": q["experts"], "hidden": q["hidden"], "inter": q["moe_intermediate"], "rank": q["rank"]})
            setup = run_child("setup_real", work=work, layers=args.real_layers, **shape)
            ours = run_child("ours", ref=setup["ckpt"], out=str(work / "real-ours"), base=None,
                             shard=args.real_shard_size)
            raw = raw_write_seconds(work, ours["bytes"])
            per_layer = ours["stream_s"] / args.real_layers
            fixed = ours["export_s"] - ours["stream_s"]
            embed_bytes = 2 * q["vocab"] * q["hidden"] * 2
            projected = fixed + q["layers"] * per_layer + embed_bytes / (ours["bytes"] / raw)
            what = (f"{args.real_layers} layer(s) x {shape['experts']} experts, hidden {shape['hidden']}, "
                    f"moe_intermediate {shape['inter']}, rank {shape['rank']}, bf16 -> {ours['bytes'] / 1e9:.2f} GB"
                    + (" (quick: not the real size)" if small else ""))
            figs += [
                info(f"real-size layer export time ({what})", per_layer, "s/layer",
                     baseline="raw write", baseline_value=ours["bytes"] / args.real_layers / (ours["bytes"] / raw),
                     note=f"child CPU {ours['cpu_s']:.0f} s in all (load-independent); "
                          f"streaming {ours['bytes'] / ours['stream_s'] / 1e6:.0f} MB/s vs raw write "
                          f"{ours['bytes'] / raw / 1e6:.0f} MB/s; peak RSS {ours['peak_mb']:.0f} MB; "
                          f"shards {args.real_shard_size}"),
                info("projected full Qwen3-30B-A3B export (48 layers + embeddings, bf16)", projected / 60, "min",
                     note=f"fixed {fixed:.1f} s (open, plan, config, tokenizer) + 48 x {per_layer:.1f} s per layer "
                          f"(streaming, measured) + embed/lm_head {embed_bytes / 1e9:.2f} GB at the raw write speed"),
            ]
            rows.append(("real", f"modelkit export, {args.real_layers} real-size layer(s)", ours, None, None))
            for d in ("real-ours", "compressed-real"):
                shutil.rmtree(work / d, ignore_errors=True)
        if args.only in (None, "lora"):
            setup = run_child("setup_lora", work=work, gb=args.lora_gb, hidden=args.lora_hidden, r=args.lora_r)
            # modelkit's cache of what it learnt about an architecture (expected tensors, the
            # standard config.json) starts empty in this run: the first export of the base's
            # architecture fills it (and imports transformers for it), the second is the
            # export of an architecture seen before, the figure the targets are held to
            cache = {"MODELKIT_CACHE": str(work / "lora-cache")}
            cold = run_child("ours", ref=setup["adapter"], out=str(work / "lora-cold"), base=setup["base"],
                             shard=args.max_shard_size, env=cache)
            shutil.rmtree(work / "lora-cold", ignore_errors=True)
            ours = run_child("ours", ref=setup["adapter"], out=str(work / "lora-ours"), base=setup["base"],
                             shard=args.max_shard_size, env=cache)
            base = run_child("baseline_lora", base=setup["base"], adapter=setup["adapter"],
                             out=str(work / "lora-baseline"), shard=args.max_shard_size)
            worst, n, odd = same_tensors(work / "lora-ours", work / "lora-baseline")
            raw = raw_write_seconds(work, ours["bytes"])
            what = (f"llama {setup['layers']} layers, hidden {args.lora_hidden}, r {args.lora_r} on q/k/v/o "
                    f"-> {ours['bytes'] / 1e9:.2f} GB, shards {args.max_shard_size}")
            figs += [
                at_most(f"LoRA merge export peak RSS ({what})", ours["peak_mb"], 0.4, "MB",
                        baseline="PEFT merge_and_unload + save_pretrained", baseline_value=base["peak_mb"],
                        on_ratio=True),
                at_most("LoRA merge export time", ours["wall_s"], 0.8, "s", baseline="PEFT",
                        baseline_value=base["wall_s"], on_ratio=True,
                        note=f"whole child processes; export call {ours['export_s']:.1f} s vs PEFT's "
                             f"{base['export_s']:.1f} s; both save {args.max_shard_size} shards and fsync"),
                info("LoRA merge export CPU (child, all threads)", ours["cpu_s"], "s", baseline="PEFT",
                     baseline_value=base["cpu_s"], note="load-independent, unlike the wall-clock ratios"),
                info("LoRA merge export, first of its architecture (empty modelkit cache)", cold["wall_s"], "s",
                     baseline="PEFT", baseline_value=base["wall_s"],
                     note=f"peak RSS {cold['peak_mb']:.0f} MB ({cold['peak_mb'] / base['peak_mb']:.2f} of PEFT's), "
                          f"CPU {cold['cpu_s']:.1f} s: builds the config and the expected tensors with "
                          "transformers once, cached for every later export of the architecture"),
                info("LoRA merge export throughput", ours["bytes"] / ours["export_s"] / 1e6, "MB/s",
                     baseline="raw write", baseline_value=ours["bytes"] / raw / 1e6),
                agrees("LoRA merge export equals PEFT's", worst <= 1e-5 and n > 0 and not odd,
                       note=f"{n} tensors, max |diff| / max |peft| = {worst:.1e}"
                            + (f", {odd} names on one side only" if odd else "")),
            ]
            rows.append(("lora", "baseline (PEFT merge_and_unload + save_pretrained)", base, None, None))
            rows.append(("lora", "modelkit export, first of its architecture", cold, None, None))
            rows.append(("lora", "modelkit export", ours, (0.8, 0.4), base))
            for d in ("lora-ours", "lora-baseline", "base-llama", "adapter", "lora-cache"):
                shutil.rmtree(work / d, ignore_errors=True)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(table(rows, args.max_shard_size))
    return finish("bench_export", figs)


def table(rows, shard: str) -> str:
    head = (f"| scenario | side | wall s | work s | peak RSS MB | memory vs baseline | time vs baseline |\n"
            f"|---|---|---:|---:|---:|---:|---:|")
    lines = [head]
    for scenario, side, m, targets, base in rows:
        wall = f"{m['wall_s']:.1f}" if "wall_s" in m else ""
        work = f"{m['export_s']:.1f}" if "export_s" in m else ""
        peak = f"{m['peak_mb']:.0f}" if "peak_mb" in m else ""
        mem = tim = ""
        if targets and base:
            rm, rt = m["peak_mb"] / base["peak_mb"], m["wall_s"] / base["wall_s"]
            mem = f"{rm:.2f} (target <= {targets[1]:.2f})"
            tim = f"{rt:.2f} (target <= {targets[0]:.2f})"
        lines.append(f"| {scenario} | {side} | {wall} | {work} | {peak} | {mem} | {tim} |")
    lines.append(f"\nmodelkit --max-shard-size {shard}; wall = whole child process (imports included); "
                 "work = the export call itself; both sides fsync their output.")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        _child_main(sys.argv[2], sys.argv[3])
    else:
        sys.exit(main())
