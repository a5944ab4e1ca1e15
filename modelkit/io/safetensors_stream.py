"""A safetensors file written tensor by tensor, in an order planned beforehand.

Why not safetensors' own ``save_file``: it takes every tensor of a file at once, so a writer
streaming shards holds a whole shard in memory (two, to overlap computing with writing). The
format itself allows streaming: an 8-byte little-endian header length, a JSON header giving
each tensor's dtype, shape and byte range, then the raw bytes. An export knows every shard's
names, shapes and dtypes before it produces anything, so the header goes first and each
tensor's bytes follow as soon as the tensor exists, written straight from its memory (no
copy, no one-storage-per-tensor rule). What is written is read back by safetensors itself
(tests and the export benchmark). A tensor stored unchanged in a safetensors source is
copied file to file instead (:meth:`StreamedSafetensors.copy`): its bytes are the export's.
"""
from __future__ import annotations

import errno
import json
import math
import os
import struct
from pathlib import Path
from typing import Any

from modelkit.errors import CorruptFileError
from modelkit.io.tensors import DTYPE_BYTES, SAFETENSORS_DTYPES, dtype_name

_CODES = {name: code for code, name in SAFETENSORS_DTYPES.items()}
CHUNK = 64 << 20  # bytes per write call: large writes, bounded pages in flight


def write_all(fd: int, data: memoryview) -> None:
    """``os.write`` until every byte is written (a module attribute so tests can fail it)."""
    while data:
        data = data[os.write(fd, data[:CHUNK]):]


def copy_range(src: int, dst: int, offset: int, length: int) -> int:
    """Copy ``length`` bytes at ``offset`` of file ``src`` to the end of ``dst``; the bytes
    copied (fewer only when ``src`` ends first). In the kernel (``os.copy_file_range``)
    where the filesystems allow it, so the bytes never enter this process's memory; else
    through a bounded buffer (``os.pread``). A module attribute so tests can fail it."""
    done = 0
    fast = hasattr(os, "copy_file_range")
    while done < length:
        n = min(CHUNK, length - done)
        if fast:
            try:
                got = os.copy_file_range(src, dst, n, offset + done)
            except OSError as e:  # another filesystem, or a kernel without it: copy by hand
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                    raise
                fast = False
                continue
        else:
            data = os.pread(src, n, offset + done)
            write_all(dst, memoryview(data))
            got = len(data)
        if got == 0:
            break
        done += got
    return done


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
        self._check_next(name, dtype_name(tensor.dtype), tuple(tensor.shape))
        if not tensor.is_contiguous():
            raise ValueError(f"{self.path.name}: {name} is not contiguous")
        self._open()
        if tensor.numel():
            # the tensor's own bytes, whatever its dtype (numpy has no bfloat16)
            write_all(self._fd, memoryview(tensor.reshape(-1).view(_U8()).numpy()).cast("B"))
        self._next += 1

    def copy(self, name: str, dtype: str, shape: tuple[int, ...], source: Path, offset: int, length: int) -> None:
        """Append a tensor stored unchanged in ``source`` (``length`` bytes at ``offset``: a
        validated safetensors span) as the next tensor of the layout, copied file to file.
        ValueError on a layout mismatch; CorruptFileError when ``source`` cannot be reopened
        or holds fewer bytes than the span (it shrank since its header was read)."""
        self._check_next(name, dtype, tuple(shape))
        if length != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise ValueError(f"{self.path.name}: {name} spans {length} bytes, its shape needs "
                             f"{math.prod(shape) * DTYPE_BYTES[dtype]}")
        try:
            src = os.open(source, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise CorruptFileError(f"cannot reopen the file to copy {name} ({e.strerror or e})", source) from None
        try:
            self._open()
            got = copy_range(src, self._fd, offset, length)
        finally:
            os.close(src)
        if got != length:
            raise CorruptFileError(f"the file ended {length - got} bytes early while {name} was copied "
                                   "(it changed after its header was read)", source)
        self._next += 1

    def _check_next(self, name: str, dtype: str, shape: tuple[int, ...]) -> None:
        if self._next >= len(self.layout):
            raise ValueError(f"{self.path.name}: {name} is one tensor more than planned")
        want, want_dtype, want_shape = self.layout[self._next]
        if (name, dtype, shape) != (want, want_dtype, tuple(want_shape)):
            raise ValueError(f"{self.path.name}: got {(name, dtype, shape)}, the plan says "
                             f"{(want, want_dtype, tuple(want_shape))}")

    def _open(self) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            write_all(self._fd, memoryview(self._head))

    def close(self) -> None:
        """fsync and close; ValueError when tensors of the layout were not written."""
        if self._next != len(self.layout):
            self.abandon()
            raise ValueError(f"{self.path.name}: {self._next} of {len(self.layout)} tensors written")
        self._open()  # (a file of no tensors has only its header)
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
