"""Inspect speed and memory vs `from_pretrained` and vs reading safetensors headers alone.

Generates a sharded qwen3_moe checkpoint (per-expert keys on disk, like transformers 5
save_pretrained writes) of at least --gb gigabytes, then measures in one run:

* in process, after imports (the notebook case): modelkit.inspect (audit included) vs
  AutoModelForCausalLM.from_pretrained + listing its parameters vs reading headers alone;
* as whole commands (the CLI case): `modelkit inspect` vs a `from_pretrained` process,
  wall time and peak resident memory (ru_maxrss of the child).

Usage: python benchmarks/bench_inspect.py [--gb 1.5] [--work benchmarks/_work]
"""
from __future__ import annotations

import argparse
import math
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def moe_config(gb: float):
    from transformers import AutoConfig

    # Qwen3-MoE shape scaled down: 16 experts, per-expert keys, ~gb GB in fp32.
    # ~113 MB a layer (16 experts of 3 x 512 x 1024, attention, norms) + 262 MB embeddings/head
    layers = max(2, math.ceil((gb * 1e9 - 2.63e8) / 1.13e8) + 1)
    return AutoConfig.for_model(
        "qwen3_moe", vocab_size=32000, hidden_size=1024, intermediate_size=2048,
        moe_intermediate_size=512, num_experts=16, num_experts_per_tok=2,
        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4, head_dim=128,
        decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False, dtype="float32")


def write_checkpoint(out: Path, gb: float) -> Path:
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    from modelkit.architectures import expected_tensors

    if (out / "model.safetensors.index.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = moe_config(gb)
    config.save_pretrained(out)
    expected = expected_tensors(config)
    meta = {n: torch.empty(e.shape, dtype=torch.float32, device="meta") for n, e in expected.items()}
    split = split_torch_state_dict_into_shards(meta, max_shard_size="500MB")
    for fname, names in split.filename_to_tensors.items():
        save_file({n: torch.zeros(expected[n].shape) for n in names}, str(out / fname),
                  metadata={"format": "pt"})
    total = sum(4 * _numel(e.shape) for e in expected.values())
    index = {"metadata": {"total_size": total}, "weight_map": split.tensor_to_filename}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return out


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def warm(folder: Path) -> None:
    subprocess.run(f"cat {folder}/*.safetensors > /dev/null", shell=True, check=True)


def in_process(folder: Path, repeats: int = 3) -> dict[str, float]:
    import torch  # noqa: F401  imports paid before timing: the notebook case
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import modelkit

    hf_logging.disable_progress_bar()

    modelkit.inspect(folder)  # first call builds the expected set (cached afterwards)

    def best(fn):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    def headers():
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                [h.get_slice(k).get_shape() for k in h.keys()]

    def hf():
        m = AutoModelForCausalLM.from_pretrained(folder, dtype="float32")
        [(n, p.shape) for n, p in m.named_parameters()]
        del m

    return {"modelkit.inspect": best(lambda: modelkit.inspect(folder)),
            "safetensors headers": best(headers),
            "from_pretrained + params": best(hf)}


_MEASURE = ("import resource,subprocess,sys,time\n"
            "t=time.perf_counter();subprocess.run(sys.argv[1:],stdout=subprocess.DEVNULL,check=True)\n"
            "print(time.perf_counter()-t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def run_child(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of one command, measured by a fresh wrapper process so
    each command's peak is its own."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], check=True,
                         capture_output=True, text=True).stdout.split()
    return float(out[0]), float(out[1]) / 1024


def whole_command(folder: Path) -> dict[str, tuple[float, float]]:
    py = sys.executable
    modelkit_bin = str(Path(py).parent / "modelkit")
    rows = {}
    rows["modelkit inspect (CLI)"] = run_child([modelkit_bin, "inspect", str(folder)])
    rows["safetensors headers (python)"] = run_child([py, "-c", (
        "import glob,sys;from safetensors import safe_open\n"
        f"for f in sorted(glob.glob('{folder}/*.safetensors')):\n"
        "  h=safe_open(f,'pt');[h.get_slice(k).get_shape() for k in h.keys()]")])
    rows["from_pretrained (python)"] = run_child([py, "-c", (
        "from transformers import AutoModelForCausalLM as A\n"
        f"m=A.from_pretrained('{folder}', dtype='float32');print(len(list(m.named_parameters())))")])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.5)
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "_work")
    args = ap.parse_args()
    folder = write_checkpoint(args.work / f"moe-{args.gb}gb", args.gb)
    size = folder_bytes(folder)
    n = len(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"])
    print(f"checkpoint: {folder} ({size / 1e9:.2f} GB, {n} tensors, per-expert keys)")
    warm(folder)
    ip = in_process(folder)
    print("\nIn process, after imports (best of 3):")
    print(f"| {'what':<28} | {'seconds':>8} | {'vs from_pretrained':>18} |")
    print(f"|{'-' * 30}|{'-' * 10}|{'-' * 20}|")
    for k, v in ip.items():
        print(f"| {k:<28} | {v:>8.3f} | {ip['from_pretrained + params'] / v:>17.1f}x |")
    wc = whole_command(folder)
    base_wall, base_rss = wc["from_pretrained (python)"]
    print("\nWhole command (cold process, warm page cache):")
    print(f"| {'command':<30} | {'wall s':>7} | {'peak RSS MB':>11} | {'wall ratio':>10} | {'RSS ratio':>9} |")
    print(f"|{'-' * 32}|{'-' * 9}|{'-' * 13}|{'-' * 12}|{'-' * 11}|")
    for k, (w, r) in wc.items():
        print(f"| {k:<30} | {w:>7.2f} | {r:>11.0f} | {w / base_wall:>10.2f} | {r / base_rss:>9.2f} |")
    ok_ip = ip["from_pretrained + params"] / ip["modelkit.inspect"] >= 20
    mk_wall, mk_rss = wc["modelkit inspect (CLI)"]
    ok_cmd = mk_wall <= base_wall / 2 and mk_rss <= base_rss / 5
    print(f"\ntargets: in-process >=20x: {'PASS' if ok_ip else 'FAIL'}; "
          f"CLI <=1/2 wall and <=1/5 RSS: {'PASS' if ok_cmd else 'FAIL'}")


if __name__ == "__main__":
    main()
