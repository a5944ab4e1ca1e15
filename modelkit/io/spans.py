"""The raw chunk reader: a tensor's elements ``chunk`` at a time, in lockstep over sides.

A tensor stored as is in a safetensors file is memory-mapped a window at a time from its
byte span, each window unmapped once its chunks are dropped: no copy out of the page cache
and no more than two windows per side resident at once. A tensor already produced (a
merge, a materialised expert, a pickle) is sliced. The span comes from the file's
validated header (:meth:`modelkit.io.tensors.SafetensorsFile.span`).
"""
from __future__ import annotations

import math
import mmap
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from modelkit.errors import CorruptFileError
from modelkit.io.tensors import SafetensorsFile, torch_dtype

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass
class Source:
    """One side's tensor, ready to be read in chunks: its span in a safetensors file
    (``path``, ``offset``) or the produced ``tensor``."""

    shape: tuple[int, ...]
    dtype: Any                       # torch dtype
    tensor: Any = None               # the produced tensor, or None
    path: str | None = None          # safetensors file holding the raw bytes
    offset: int = 0                  # absolute byte offset of the first element

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def stored_source(file: SafetensorsFile, key: str) -> Source:
    """The span of tensor ``key`` in ``file`` (its header validated first: CorruptFileError
    naming the file)."""
    t = file.entries[key]
    offset, _ = file.span(key)
    return Source(tuple(t.shape), torch_dtype(t.dtype), path=str(file.path), offset=offset)


def produced_source(tensor: "torch.Tensor") -> Source:
    """A tensor already in memory, read by slicing."""
    return Source(tuple(tensor.shape), tensor.dtype, tensor=tensor)


def stream(sources: list[Source], starts: Sequence[int], chunk: int, window: int,
           scratch: Callable[[int, int], "torch.Tensor"]) -> Iterator[list["torch.Tensor"]]:
    """The sources' chunks beginning at ``starts``, in lockstep, as 1-D tensors of at most
    ``chunk`` elements. Produced tensors are sliced; stored ones are views of a mapped
    window of ``window`` bytes of their file (see :class:`MappedSpan`), valid until the next
    chunk is taken. ``scratch(side, nbytes)``: a byte buffer of at least ``nbytes``, used only
    for a tensor placed off its dtype's alignment."""
    n = sources[0].numel
    flats = [src.tensor.reshape(-1) if src.tensor is not None else None for src in sources]
    maps: list[MappedSpan | None] = []
    try:
        for src in sources:
            maps.append(MappedSpan(src, window) if src.tensor is None else None)
        for i in starts:
            count = min(chunk, n - i)
            yield [flats[k][i:i + count] if flats[k] is not None else maps[k].chunk(i, count, scratch, k)
                   for k in range(len(sources))]
    finally:
        for m in maps:
            if m is not None:
                m.close()


class MappedSpan:
    """A stored tensor's bytes, mapped ``window`` bytes at a time (copy-on-write, so the
    file can never be written through it). The file's size is checked first: one shorter
    than the tensor's span is a CorruptFileError naming it, never a SIGBUS (a file cut
    short by another process *while* it is mapped still ends this one: the price of not
    copying, as for every memory-mapped read). A window is unmapped when the last chunk
    viewing it is dropped."""

    def __init__(self, src: Source, window: int) -> None:
        self.src, self.itemsize, self.window_bytes = src, src.dtype.itemsize, window
        self.end = src.offset + src.numel * self.itemsize
        self.file = open(src.path, "rb", buffering=0)
        size = os.fstat(self.file.fileno()).st_size
        if size < self.end:
            self.file.close()
            raise CorruptFileError(f"file ends before its tensor data ({size} bytes, the tensor "
                                   f"ends at byte {self.end})", src.path)
        self.lo = self.hi = 0
        self.window: "torch.Tensor | None" = None

    def chunk(self, i: int, count: int, scratch: Callable[[int, int], "torch.Tensor"], side: int) -> "torch.Tensor":
        """Elements ``i .. i + count`` (copied into ``scratch(side, nbytes)`` only when the file
        places them off their dtype's alignment)."""
        import torch

        start = self.src.offset + i * self.itemsize
        stop = start + count * self.itemsize
        if self.window is None or start < self.lo or stop > self.hi:
            self.lo = start - start % mmap.ALLOCATIONGRANULARITY
            self.hi = min(self.end, max(stop, self.lo + self.window_bytes))
            self.window = None  # drop the old window first: at most two per side stay resident
            mapped = mmap.mmap(self.file.fileno(), self.hi - self.lo, access=mmap.ACCESS_COPY, offset=self.lo)
            self.window = torch.frombuffer(mapped, dtype=torch.uint8)  # holds the mapping until the last view goes
        raw = self.window[start - self.lo:stop - self.lo]
        if (start - self.lo) % self.itemsize:  # misaligned in the file: a copy, aligned
            raw = scratch(side, stop - start)[:stop - start].copy_(raw)
        return raw.view(self.src.dtype)

    def close(self) -> None:
        self.window = None
        self.file.close()
