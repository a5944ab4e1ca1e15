"""The raw chunk reader: a tensor's elements ``chunk`` at a time, in lockstep over sides.

A tensor stored as is in a safetensors file is read from its byte span with plain,
unbuffered file reads into buffers the caller reuses: no memory map, so no resident pages
pile up over a large checkpoint. A tensor already produced (a merge, a materialised
expert, a pickle) is sliced. The span comes from the file's validated header
(:meth:`modelkit.io.tensors.SafetensorsFile.span`).
"""
from __future__ import annotations

import contextlib
import math
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


def stream(sources: list[Source], starts: Sequence[int], chunk: int,
           raw: Callable[[int], tuple["torch.Tensor", memoryview]]) -> Iterator[list["torch.Tensor"]]:
    """The sources' chunks beginning at ``starts``, in lockstep, as 1-D tensors of at most
    ``chunk`` elements. Produced tensors are sliced; stored ones are read straight into
    ``raw(side)`` (a uint8 tensor and its memoryview, at least ``chunk`` elements of the
    widest dtype): valid until the next chunk is taken."""
    n = sources[0].numel
    flats = [src.tensor.reshape(-1) if src.tensor is not None else None for src in sources]
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(open(src.path, "rb", buffering=0)) if src.tensor is None else None
                 for src in sources]
        for i in starts:
            count = min(chunk, n - i)
            out = []
            for k, src in enumerate(sources):
                if flats[k] is not None:
                    out.append(flats[k][i:i + count])
                    continue
                size = src.dtype.itemsize
                buf, view = raw(k)
                read_into(files[k], view[:count * size], src.offset + i * size)
                out.append(buf[:count * size].view(src.dtype))
            yield out


def read_into(f: Any, view: memoryview, offset: int) -> None:
    """Fill ``view`` from ``f`` at ``offset``; CorruptFileError when the file ends first."""
    f.seek(offset)
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise CorruptFileError(f"file ends before its tensor data (read {done} of {len(view)} bytes "
                                   f"at offset {offset})", f.name)
        done += n
