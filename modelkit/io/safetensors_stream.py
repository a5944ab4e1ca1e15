"""A safetensors file written tensor by tensor, in an order planned beforehand.

Why not safetensors' own ``save_file``: it takes every tensor of a file at once, so a writer
streaming shards holds a whole shard in memory (two, to overlap computing with writing). The
format itself allows streaming: an 8-byte little-endian header length, a JSON header giving
each tensor's dtype, shape and byte range, then the raw bytes. An export knows every shard's
names, shapes and dtypes before it produces anything, so the header goes first and each
tensor's bytes follow as soon as the tensor exists, written straight from its memory (no
copy, no one-storage-per-tensor rule). What is written is read back by safetensors itself
(tests and the export benchmark).
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

from modelkit.io.tensors import DTYPE_BYTES, SAFETENSORS_DTYPES, dtype_name

_CODES = {name: code for code, name in SAFETENSORS_DTYPES.items()}
CHUNK = 64 << 20  # bytes per write call: large writes, bounded pages in flight


def write_all(fd: int, data: memoryview) -> None:
    """``os.write`` until every byte is written (a module attribute so tests can fail it)."""
    while data:
        data = data[os.write(fd, data[:CHUNK]):]


def sync(fd: int) -> None:
    """``os.fsync`` (a module attribute so tests can fail it)."""
    os.fsync(fd)


class StreamedSafetensors:
    """One safetensors file: ``layout`` is ``[(name, dtype name, shape)]`` in file order.

    :meth:`write` the tensors in that order, then :meth:`close` (which fsyncs). The file
    is created at the first write; any dtype, shape or order other than the layout's is a
    ValueError, and closing before every tensor was written is one too."""

    def __init__(self, path: Path, layout: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.layout = list(layout)
        header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
        at = 0
        for name, dtype, shape in self.layout:
            end = at + math.prod(shape) * DTYPE_BYTES[dtype]
            header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [at, end]}
            at = end
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors pads it
        self._head = struct.pack("<Q", len(text)) + text
        self.size = len(self._head) + at
        self._next = 0
        self._fd: int | None = None

    def write(self, name: str, tensor) -> None:
        """Append ``tensor`` (contiguous, on the CPU) as the next tensor of the layout."""
        if self._next >= len(self.layout):
            raise ValueError(f"{self.path.name}: {name} is one tensor more than planned")
        want, dtype, shape = self.layout[self._next]
        got = (name, dtype_name(tensor.dtype), tuple(tensor.shape))
        if got != (want, dtype, tuple(shape)):
            raise ValueError(f"{self.path.name}: got {got}, the plan says {(want, dtype, tuple(shape))}")
        if not tensor.is_contiguous():
            raise ValueError(f"{self.path.name}: {name} is not contiguous")
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            write_all(self._fd, memoryview(self._head))
        if tensor.numel():
            # the tensor's own bytes, whatever its dtype (numpy has no bfloat16)
            write_all(self._fd, memoryview(tensor.reshape(-1).view(_U8()).numpy()).cast("B"))
        self._next += 1

    def close(self) -> None:
        """fsync and close; ValueError when tensors of the layout were not written."""
        if self._next != len(self.layout):
            self.abandon()
            raise ValueError(f"{self.path.name}: {self._next} of {len(self.layout)} tensors written")
        if self._fd is None:  # a file of no tensors
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            write_all(self._fd, memoryview(self._head))
        fd, self._fd = self._fd, None
        try:
            sync(fd)
        finally:
            os.close(fd)

    def abandon(self) -> None:
        """Close without finishing (after an error); the caller removes the folder."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def _U8():
    import torch

    return torch.uint8
