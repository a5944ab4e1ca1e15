"""A simulated training run: checkpoints of several formats landing in a run folder over
time, the way a Trainer writes them (in place, file after file), with the accidents of
real runs: one written slowly, one deleted half-way (``save_total_limit`` rotation), one
whose save dropped weights, and a ``best_model/`` copy of an earlier checkpoint.

``python -m modelkit.testing.training_run RUN_DIR --base BASE --adapter ADAPTER --pace S``
runs it as its own process (``S`` seconds between saves). Built on the demo pair
(:mod:`modelkit.ui.demo_pair`): every complete checkpoint is a real model of its base.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# what a watcher must conclude about each checkpoint of the run
EXPECTED = {
    "checkpoint-10": "done",        # PEFT adapter, safetensors (a lightly trained one)
    "checkpoint-20": "done",        # PEFT adapter, legacy adapter_model.bin
    "checkpoint-30": "done",        # the demo's trained adapter, written slowly
    "checkpoint-40": "done",        # a full model (base + adapter merged), sharded safetensors
    "checkpoint-50": "skipped",     # deleted while being written (rotation)
    "checkpoint-60": "rejected",    # a save that dropped a layer's weights: missing-tensors
    "best_model": "done",           # a copy of checkpoint-30: evaluated once, as checkpoint-30
}


def copy_slowly(src: Path, dst: Path, seconds: float, pieces: int = 8) -> None:
    """Copy ``src`` file by file into ``dst``, each file in ``pieces`` chunks spread over
    ``seconds`` in all (sizes and mtimes change throughout, as a slow disk makes them)."""
    dst.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    pause = seconds / max(1, len(files) * pieces)
    for p in files:
        data = p.read_bytes()
        target = dst / p.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        step = max(1, -(-len(data) // pieces))
        with open(target, "wb") as f:
            for i in range(0, max(len(data), 1), step):
                f.write(data[i:i + step])
                f.flush()
                time.sleep(pause)


def land(src: Path, dst: Path) -> None:
    """Put a copy of checkpoint ``src`` at ``dst`` in one step (copied beside the run
    folder, then renamed in): a watcher never sees it half-written, however slow the
    machine (:func:`copy_slowly` is the way to show it one being written)."""
    staging = Path(tempfile.mkdtemp(prefix=".landing-", dir=Path(dst).parent.parent))
    try:
        shutil.copytree(src, staging / "checkpoint")
        os.rename(staging / "checkpoint", dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _merged(base: Path, adapter: Path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload()


def write_run(run_dir: str | Path, base: str | Path, adapter: str | Path, pace: float = 0.0,
              slow: float | None = None) -> dict[str, str]:
    """Write the simulated run into ``run_dir`` (``pace`` seconds between saves; the slow
    checkpoint takes ``slow`` seconds, default ``4 * pace``). Returns :data:`EXPECTED`."""
    from modelkit.testing.peft_lora import write_peft_lora
    from modelkit.testing.tokenizer import write_tokenizer

    run, base, adapter = Path(run_dir), Path(base), Path(adapter)
    run.mkdir(parents=True, exist_ok=True)
    slow = 4 * pace if slow is None else slow
    write_peft_lora(run / "checkpoint-10", base, r=8, alpha=16, target_modules=("q_proj", "v_proj"), seed=10)
    time.sleep(pace)
    write_peft_lora(run / "checkpoint-20", base, r=8, alpha=16, target_modules=("q_proj", "v_proj"), seed=20,
                    bin=True)
    time.sleep(pace)
    copy_slowly(adapter, run / "checkpoint-30", slow)
    time.sleep(pace)
    merged = _merged(base, adapter)
    merged.save_pretrained(run / "checkpoint-40", max_shard_size="200KB")
    write_tokenizer(run / "checkpoint-40")
    time.sleep(pace)
    copy_slowly(adapter, run / "checkpoint-50", slow / 2)
    shutil.rmtree(run / "checkpoint-50")                      # rotation, before it was complete
    time.sleep(pace)
    kept = {k: v for k, v in merged.state_dict().items() if ".layers.1." not in k}
    merged.save_pretrained(run / "checkpoint-60", state_dict=kept)
    write_tokenizer(run / "checkpoint-60")
    time.sleep(pace)
    shutil.copytree(run / "checkpoint-30", run / "best_model")
    return dict(EXPECTED)


def write_demo_run(folder: str | Path, base: str | Path, adapter: str | Path) -> Path:
    """The simulated run, written once into ``folder`` for the demo (built beside it,
    then renamed: a folder with ``best_model/`` is complete and reused)."""
    folder = Path(folder)
    if (folder / "best_model").is_dir():
        return folder
    staging = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        write_run(staging, base, adapter)
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m modelkit.testing.training_run", description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--base", required=True)
    p.add_argument("--adapter", required=True)
    p.add_argument("--pace", type=float, default=1.0)
    p.add_argument("--slow", type=float)
    args = p.parse_args(argv)
    from modelkit.testing._files import one_thread

    with one_thread():
        write_run(args.run_dir, args.base, args.adapter, pace=args.pace, slow=args.slow)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
