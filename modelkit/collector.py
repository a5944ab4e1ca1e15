"""Memory the process holds for nothing: CPython's cyclic collector, paused for a block of
work, and the C heap's free memory, handed back.

With torch imported a process holds some 170,000 objects the collector tracks; every full
collection walks all of them again: about 0.1 s of CPU here, whatever the block itself
allocates. A block that makes many objects but few reference cycles (inspect's 10^5 tensor
records; diff's chunk views) triggers such collections for nothing.
"""
from __future__ import annotations

import contextlib
import gc
from typing import Iterator


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Pause the collector for the block. Reference counting still frees what the block
    drops; only reference cycles made inside wait for the collector, which runs again when
    the block ends (a caller that had paused it keeps it paused)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def release_free_heap() -> None:
    """Hand the C heap's free memory back to the system (glibc ``malloc_trim``; elsewhere
    nothing). Tensors under glibc's mmap threshold (up to 32 MB) come from the heap, and
    what they free stays in the process's RSS until the heap is trimmed: verify trims before
    building the source's reference (what writing the export freed: 80 MB on the 0.63 GB
    benchmark) and after dropping it, so that loading the export does not count it twice."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
