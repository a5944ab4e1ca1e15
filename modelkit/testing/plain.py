"""Plain Hugging Face checkpoints: one file, sharded, legacy ``.bin``, tied or untied."""
from __future__ import annotations

import functools
import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from modelkit.testing._files import fresh_dir, quiet, seeded, write_json
from modelkit.testing.configs import default_tie, tiny_config
from modelkit.testing.tokenizer import write_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def build_tiny_model(
    family: str = "llama", seed: int = 0, tie: bool | None = None, dtype: torch.dtype = torch.float32, **overrides: Any
) -> "PreTrainedModel":
    """A fresh tiny ``AutoModelForCausalLM`` built from ``tiny_config`` under ``seed``.

    ``tie=False`` on a family that ties by default (gemma) unties the head the way DyLoRA's
    base is untied: ``lm_head`` becomes a copy of ``embed_tokens``.
    """
    from transformers import AutoModelForCausalLM

    natural = default_tie(family)
    tie = natural if tie is None else tie
    config = tiny_config(family, tie_word_embeddings=tie, **overrides)
    with seeded(seed), quiet():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if natural and not tie:
        with torch.no_grad():
            model.lm_head.weight.copy_(model.get_input_embeddings().weight)
    model = model.to(dtype)
    model.config.dtype = dtype
    return model.eval()


@functools.lru_cache(maxsize=16)
def _cached_model(family: str, seed: int, tie: bool | None, dtype: torch.dtype, overrides: str):
    return build_tiny_model(family, seed, tie, dtype, **json.loads(overrides))


def tiny_model(family: str = "llama", seed: int = 0, tie: bool | None = None, dtype: torch.dtype = torch.float32,
               **overrides: Any) -> "PreTrainedModel":
    """Like ``build_tiny_model`` but shared across calls: treat the result as read-only."""
    return _cached_model(family, seed, tie, dtype, json.dumps(overrides, sort_keys=True))


def write_plain_hf(
    out: Path,
    family: str = "llama",
    shards: int = 1,
    bin: bool = False,
    seed: int = 0,
    tie: bool | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    tokenizer: bool = True,
    **overrides: Any,
) -> Path:
    """Write a tiny plain HF checkpoint with ``save_pretrained`` into ``out`` (replaced if
    it exists) with the tokenizer beside it; returns ``out``.

    ``shards > 1`` writes ``model-0000i-of-0000N.safetensors`` plus the index (via
    ``max_shard_size``); ``bin=True`` rewrites the same tensors, under the same on-disk
    names, as legacy ``pytorch_model.bin`` (``pytorch_model-0000i-of-0000N.bin`` and
    ``pytorch_model.bin.index.json`` when sharded) with ``torch.save``.
    """
    out = fresh_dir(Path(out))
    model = tiny_model(family, seed, tie, dtype, **overrides)
    with quiet():
        _save_sharded(model, out, shards)
    if bin:
        _safetensors_to_bin(out)
    if tokenizer:
        write_tokenizer(out)
    return out


def _save_sharded(model, out: Path, shards: int) -> None:
    if shards <= 1:
        model.save_pretrained(out)
        return
    total = _stored_bytes(model)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        best: tuple[Path, int] | None = None
        for step in range(60):  # grow the shard size until the greedy split gives `shards`
            trial = Path(tmp) / str(step)
            model.save_pretrained(trial, max_shard_size=int(total / shards * (1 + step / 40)) + 1)
            count = len(list(trial.glob("model-*.safetensors")))
            if count > 1 and (best is None or abs(count - shards) < abs(best[1] - shards)):
                best = (trial, count)
            if count <= shards:
                break
        if best is None:
            raise ValueError(f"cannot split this tiny model into {shards} shards")
        for item in best[0].iterdir():
            shutil.move(str(item), out / item.name)


def _stored_bytes(model) -> int:
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def _safetensors_to_bin(folder: Path) -> None:
    """Replace the safetensors weights in ``folder`` by torch pickles of the same tensors."""
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if not index.exists():
        torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
        return
    data = json.loads(index.read_text())
    renamed = {}
    for name in sorted(set(data["weight_map"].values())):
        new = name.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
        torch.save(load_file(folder / name), folder / new)
        (folder / name).unlink()
        renamed[name] = new
    data["weight_map"] = {k: renamed[v] for k, v in data["weight_map"].items()}
    write_json(folder / "pytorch_model.bin.index.json", data)
    index.unlink()
