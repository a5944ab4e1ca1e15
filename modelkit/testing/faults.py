"""Bad inputs: small, otherwise-valid plain HF folders, each with exactly one defect.

Writers that take ``path`` write the defective weight file at ``path`` (a folder is taken
to mean ``folder/model.safetensors``, or ``folder/pytorch_model.bin`` for the pickle) and
the rest of a valid tiny llama checkpoint beside it; they return the file. Writers that take
``folder`` return the folder.
"""
from __future__ import annotations

import json
import os
import shlex
import struct
from pathlib import Path
from typing import Callable

import torch

from modelkit.testing._files import write_json
from modelkit.testing.plain import write_plain_hf

MARKER = "PWNED"  # the evil pickle's command would create this file beside it


def write_truncated_safetensors(path: Path, keep: float = 0.6) -> Path:
    """``model.safetensors`` cut to ``keep`` of its length: header intact, data short."""
    path = _plain_folder_for(path, "model.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def write_absurd_header(path: Path) -> Path:
    """``model.safetensors`` whose 8-byte header length claims about 1 EiB."""
    path = _plain_folder_for(path, "model.safetensors")
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 2**60) + data[8:])
    return path


def write_offsets_outside(path: Path) -> Path:
    """``model.safetensors`` where one tensor's ``data_offsets`` lie past the end of the file."""
    path = _plain_folder_for(path, "model.safetensors")

    def mutate(header: dict, data_len: int) -> None:
        name = _last_tensor(header)
        begin, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = [data_len + 4096, data_len + 4096 + (end - begin)]

    _rewrite_header(path, mutate)
    return path


def write_overlapping_offsets(path: Path) -> Path:
    """``model.safetensors`` where two same-sized tensors' byte ranges overlap."""
    path = _plain_folder_for(path, "model.safetensors")

    def mutate(header: dict, data_len: int) -> None:
        first = header["model.layers.0.input_layernorm.weight"]["data_offsets"]
        size = first[1] - first[0]
        start = first[0] + size // 2
        header["model.layers.0.post_attention_layernorm.weight"]["data_offsets"] = [start, start + size]

    _rewrite_header(path, mutate)
    return path


def write_malformed_config(folder: Path) -> Path:
    """A valid checkpoint whose ``config.json`` is cut off mid-object (not JSON)."""
    folder = write_plain_hf(folder)
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text[: len(text) // 2])
    return folder


def write_evil_pickle(path: Path, command: str | None = None) -> Path:
    """``pytorch_model.bin`` holding the real state dict plus an object whose unpickling
    calls ``os.system`` (the pickle names ``posix.system``). The default command creates
    ``PWNED`` beside the file; its absence proves nobody unpickled it.
    """
    path = _plain_folder_for(path, "pytorch_model.bin", bin=True)
    state = torch.load(path, weights_only=True)
    command = command or f"echo pwned > {shlex.quote(str(path.parent.absolute() / MARKER))}"
    state["_metadata_hook"] = _Evil(command)
    torch.save(state, path)
    return path


class _Evil:
    """Unpickles to ``os.system(command)``."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def write_escaping_symlink(folder: Path) -> Path:
    """``folder/model.safetensors`` is a relative symlink to a file outside ``folder``."""
    folder = write_plain_hf(folder)
    outside = folder.parent / f"{folder.name}-outside"
    outside.mkdir(exist_ok=True)
    os.replace(folder / "model.safetensors", outside / "model.safetensors")
    os.symlink(f"../{outside.name}/model.safetensors", folder / "model.safetensors")
    return folder


def write_index_outside(folder: Path) -> Path:
    """A sharded checkpoint whose index maps one shard to ``../outside.safetensors``."""
    folder = write_plain_hf(folder, shards=2)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    last = sorted(set(index["weight_map"].values()))[-1]
    os.replace(folder / last, folder.parent / "outside.safetensors")
    index["weight_map"] = {k: "../outside.safetensors" if v == last else v for k, v in index["weight_map"].items()}
    write_json(index_path, index)
    return folder


# --- helpers ---------------------------------------------------------------------------------

def _plain_folder_for(path: Path, default_name: str, bin: bool = False) -> Path:
    """Write a valid tiny llama folder around ``path`` and return the weight file's path."""
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / default_name
    folder = path.parent
    write_plain_hf(folder, bin=bin)
    written = folder / default_name
    if written != path:
        os.replace(written, path)
    return path


def _last_tensor(header: dict) -> str:
    names = [k for k in header if k != "__metadata__"]
    return max(names, key=lambda k: header[k]["data_offsets"][1])


def _rewrite_header(path: Path, mutate: Callable[[dict, int], None]) -> None:
    """Parse a safetensors file, let ``mutate`` edit its header, write it back padded to 8."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    data = raw[8 + length :]
    mutate(header, len(data))
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
