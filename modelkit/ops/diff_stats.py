"""Streamed statistics of tensor pairs: chunked reads, a few threads, exact bookkeeping.

A tensor is reduced ``CHUNK`` elements at a time (``FUSED_CHUNK`` where the fused kernel
takes the pair), read by :mod:`modelkit.io.spans`: one
stored as is in a safetensors file is memory-mapped ``WINDOW`` bytes at a time (no copy
out of the page cache: a read() into a buffer cost as much CPU as the statistics
themselves); a computed one (a LoRA merge, a compressed expert) is sliced. Each of a few threads takes a
contiguous run of chunks (torch kernels and the fused C loop release the GIL) while
torch's own intra-op threads are held at 1, and the per-chunk sums are accumulated in
Python floats (float64).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

from modelkit.io.spans import Source, produced_source, stored_source, stream

if TYPE_CHECKING:  # pragma: no cover
    import torch

CHUNK = 1 << 19                 # elements reduced at a time (2 MiB per float32 buffer: cache-sized)
FUSED_CHUNK = 1 << 22           # elements per chunk of a pair the fused kernel takes (see _chunk)
WINDOW = 16 << 20               # bytes of a stored tensor mapped at a time, per side and thread
MAX_THREADS = 8                 # reduction threads; beyond this memory bandwidth is the limit
RANK_MAX_ELEMENTS = 1 << 24     # larger 2-D deltas get no rank estimate (svd cost and memory)
RANK_RTOL = 1e-3                # numerical rank: singular values above RANK_RTOL * largest


def _stored_read(lazy: Any) -> tuple[Any, str] | None:
    """``(SafetensorsFile, key)`` when ``lazy`` reads one stored safetensors tensor
    unchanged (see :func:`modelkit.formats.view.stored_tensor`), else None (a computed tensor)."""
    from modelkit.io.tensors import SafetensorsFile

    stored = getattr(lazy, "stored", None)
    if stored is None or not isinstance(stored[0], SafetensorsFile):
        return None
    return stored[0], stored[1].key


def open_source(lazy: Any) -> Source:
    """A LazyTensor ready for chunked reading: its file span when it is a plain stored
    safetensors read, else the tensor its producer computes."""
    stored = _stored_read(lazy) if sys.byteorder == "little" else None  # safetensors is little-endian
    if stored is not None:
        return stored_source(*stored)
    return produced_source(lazy.produce())


def _fused(sources: list[Source]) -> bool:
    """Whether the fused kernel takes every chunk pair of ``sources``."""
    import torch

    from modelkit.ops import diff_sums

    return (len(sources) == 2 and sources[0].dtype == sources[1].dtype
            and sources[0].dtype in (torch.bfloat16, torch.float32) and diff_sums.available())


def _chunk(sources: list[Source], threads: int) -> int:
    """Elements per chunk. CHUNK keeps the eager path's working buffers cache-sized. A pair
    the fused kernel takes needs no buffers, and each chunk costs some 20-30 us of Python
    holding the GIL between kernel calls (about half the kernel's time on a 1 MB chunk), so
    its chunks are up to FUSED_CHUNK, but no larger than an even share of the tensor, so
    that every thread still gets work."""
    if not _fused(sources):
        return CHUNK
    share = -(-sources[0].numel // max(1, threads))
    return max(CHUNK, min(FUSED_CHUNK, share))


def _stream(sources: list[Source], starts: range, bufs: "_Buffers") -> Iterator[list["torch.Tensor"]]:
    """:func:`modelkit.io.spans.stream` in chunks of ``starts.step`` elements and WINDOW-byte
    mappings (``starts``: a run of the chunk starts :meth:`Workers.map` hands out)."""
    return stream(sources, starts, starts.step, WINDOW, bufs.raw)


# --------------------------------------------------------------------------- statistics


class _Buffers:
    """One worker's reusable buffers: raw bytes per side, working copies per dtype."""

    def __init__(self) -> None:
        self._raw: dict[int, Any] = {}
        self._work: dict[Any, tuple] = {}

    def raw(self, side: int, nbytes: int) -> "torch.Tensor":
        """A byte buffer of ``nbytes`` or more for one side's chunk (allocated on first use:
        misaligned files only)."""
        import torch

        if side not in self._raw or self._raw[side].numel() < nbytes:
            self._raw[side] = torch.empty(max(nbytes, CHUNK * 8), dtype=torch.uint8)
        return self._raw[side]

    def work(self, dtype) -> tuple:
        import torch

        if dtype not in self._work:
            self._work[dtype] = tuple(torch.empty(CHUNK, dtype=dtype) for _ in range(3))
        return self._work[dtype]


class Workers:
    """Chunk reduction split over ``n`` threads (torch kernels and file reads release the
    GIL), each with its own buffers. Torch's own intra-op threads are held at 1 meanwhile,
    so the two kinds of threads never oversubscribe the cores."""

    def __init__(self, threads: int | None = None) -> None:
        if threads is None:  # as many as torch would use, up to MAX_THREADS
            import torch

            threads = min(torch.get_num_threads(), MAX_THREADS)
        self.n = max(1, threads)
        self.buffers = [_Buffers() for _ in range(self.n)]
        self._pool = None

    def map(self, fn, sources: list[Source]) -> list:
        """``fn(sources, starts, buffers)`` for every worker's share of the chunks."""
        import torch

        starts = range(0, sources[0].numel, _chunk(sources, self.n))
        n = min(self.n, len(starts)) or 1
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            if n == 1:
                return [fn(sources, starts, self.buffers[0])]
            from concurrent.futures import ThreadPoolExecutor, wait

            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.n, thread_name_prefix="modelkit-diff")
            runs = [starts[len(starts) * k // n:len(starts) * (k + 1) // n] for k in range(n)]  # each maps its own windows
            futures = [self._pool.submit(fn, sources, run, self.buffers[k]) for k, run in zip(range(n), runs)]
            wait(futures)  # all done before any error surfaces: the buffers are reused next
            return [f.result() for f in futures]
        finally:
            torch.set_num_threads(threads)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def _same_bits(x: "torch.Tensor", y: "torch.Tensor") -> bool:
    """Bitwise equality of two chunks of one dtype (memcmp speed; stops at the first difference)."""
    import torch

    if x.dtype != y.dtype:
        return False
    x8, y8 = x.view(torch.uint8), y.view(torch.uint8)
    try:
        return torch.equal(x8.view(torch.int64), y8.view(torch.int64))
    except RuntimeError:  # length or offset not a multiple of 8 bytes
        return torch.equal(x8, y8)


@dataclass
class PairSums:
    """Running sums over chunks (Python floats: float64 accumulation)."""

    sq_a: float = 0.0
    sq_b: float = 0.0
    dot: float = 0.0
    sq_d: float = 0.0
    max_abs: float = 0.0
    changed: int = 0
    nonfinite_a: int = 0
    nonfinite_b: int = 0

    def add(self, sq_a: float, sq_b: float, dot: float, sq_d: float, max_abs: float, changed: float,
            nonfinite_a: int = 0, nonfinite_b: int = 0) -> None:
        self.sq_a += sq_a
        self.sq_b += sq_b
        self.dot += dot
        self.sq_d += sq_d
        self.max_abs = max(self.max_abs, max_abs)
        self.changed += int(changed)
        self.nonfinite_a += nonfinite_a
        self.nonfinite_b += nonfinite_b

    @staticmethod
    def merge(parts: list["PairSums"]) -> "PairSums":
        out = PairSums()
        for p in parts:
            out.add(p.sq_a, p.sq_b, p.dot, p.sq_d, p.max_abs, p.changed, p.nonfinite_a, p.nonfinite_b)
        return out


def _work_dtype(*dtypes):
    import torch

    if any(d == torch.float64 or not d.is_floating_point for d in dtypes):
        return torch.float64
    return torch.float32


def _as_work(chunk, buf, work):
    """``chunk`` in the working dtype: itself when it already is, else copied into ``buf``
    (a new tensor when ``buf`` is too small: a fused-size chunk taking the careful path)."""
    if chunk.dtype == work:
        return chunk
    if chunk.numel() > buf.numel():
        return chunk.to(work)
    out = buf[: chunk.numel()]
    out.copy_(chunk)
    return out


def _compare_chunks(sources: list[Source], starts: range, bufs: _Buffers) -> PairSums:
    """Running sums of a same-shape pair over the chunks at ``starts``.

    bfloat16 and float32 pairs take one fused pass (:mod:`modelkit.ops.diff_sums`). Otherwise a chunk equal bit for bit needs only ``A.A``. Otherwise: A in the working dtype,
    ``D = B - A``, then ``A.A``, ``A.B`` (taken directly: derived from ``A.D`` it loses
    the cosine of nearly orthogonal tensors to cancellation), ``A.D``, ``D.D``; ``B.B``
    follows exactly from them unless B is much smaller than A, when it is taken directly.
    Changed elements are counted as ``sign(D).sign(D)`` (exact, cheaper than count_nonzero).
    """
    import torch

    from modelkit.ops import diff_sums as fusedsums

    work = _work_dtype(sources[0].dtype, sources[1].dtype)
    abuf, bbuf, dbuf = bufs.work(work)
    acc = PairSums()
    for ra, rb in _stream(sources, starts, bufs):
        fused = fusedsums.pair_sums(ra, rb)  # one pass, all sums (None: not for these dtypes)
        if fused is not None:
            sq_a, sq_b, dot, sq_d, mx, changed = fused
            if all(map(math.isfinite, fused[:5])):
                acc.add(sq_a, sq_b, dot, sq_d, mx, changed)
            else:  # non-finite values, or float32 overflow: exact bookkeeping in float64
                acc.add(*_careful_chunk(_as_work(ra, abuf, work), _as_work(rb, bbuf, work)))
            continue
        a = _as_work(ra, abuf, work)
        if _same_bits(ra, rb):
            sq = float(torch.dot(a, a))
            if math.isfinite(sq):
                acc.add(sq, sq, sq, 0.0, 0.0, 0)
                continue
        b = _as_work(rb, bbuf, work)
        d = torch.sub(b, a, out=dbuf[: a.numel()])
        sq_a, dot, ad, sq_d = torch.stack([torch.dot(a, a), torch.dot(a, b), torch.dot(a, d),
                                           torch.dot(d, d)]).tolist()
        if not all(map(math.isfinite, (sq_a, dot, ad, sq_d))):
            # non-finite values, or float32 overflow: exact bookkeeping in float64
            acc.add(*_careful_chunk(a, b))
            continue
        sq_b = sq_a + 2 * ad + sq_d
        if sq_b < 1e-2 * sq_a:  # B much smaller than A: avoid cancellation
            sq_b = float(torch.dot(b, b))
        if sq_d == 0.0:
            acc.add(sq_a, sq_b, dot, 0.0, 0.0, 0)
            continue
        lo, hi = torch.aminmax(d)
        sign = torch.sign(d, out=bbuf[: d.numel()])
        mx, changed = torch.stack([torch.maximum(-lo, hi), torch.dot(sign, sign)]).tolist()
        acc.add(sq_a, sq_b, dot, sq_d, mx, changed)
    return acc


def _careful_chunk(a: "torch.Tensor", b: "torch.Tensor") -> tuple:
    """Sums over positions finite on both sides (float64), changes (a NaN/inf position is
    unchanged only when both sides hold the same value or NaN), non-finite counts."""
    import torch

    fa, fb = torch.isfinite(a), torch.isfinite(b)
    both = fa & fb
    a64, b64 = a[both].double(), b[both].double()
    d = b64 - a64
    mx = float(d.abs().max()) if d.numel() else 0.0
    changed = int(torch.count_nonzero(d))
    rest = ~both
    ar, br = a[rest], b[rest]
    same = (ar == br) | (torch.isnan(ar) & torch.isnan(br))
    changed += int((~same).sum())
    return (float(a64 @ a64), float(b64 @ b64), float(a64 @ b64), float(d @ d), mx, changed,
            int((~fa).sum()), int((~fb).sum()))


def _norm_chunks(sources: list[Source], starts: range, bufs: _Buffers) -> tuple[float, int]:
    """(sum of squares over finite values, non-finite count) of one tensor's chunks."""
    import torch

    work = _work_dtype(sources[0].dtype)
    buf = bufs.work(work)[0]
    sq, bad = 0.0, 0
    for (raw,) in _stream(sources, starts, bufs):
        x = _as_work(raw, buf, work)
        s = float(torch.dot(x, x))
        if not math.isfinite(s):
            ok = torch.isfinite(x)
            bad += int((~ok).sum())
            x64 = x[ok].double()
            s = float(x64 @ x64)
        sq += s
    return sq, bad


def single_norm(src: Source, workers: Workers) -> tuple[float, int]:
    """(norm over finite values, non-finite count) of a one-sided tensor."""
    parts = workers.map(_norm_chunks, [src])
    return math.sqrt(sum(p[0] for p in parts)), sum(p[1] for p in parts)


def compare_pair(sa: Source, sb: Source, workers: Workers) -> PairSums:
    """Sums of a same-shape pair (see :func:`_compare_chunks`), chunks shared by ``workers``."""
    return PairSums.merge(workers.map(_compare_chunks, [sa, sb]))


def effective_rank(delta: "torch.Tensor") -> tuple[float, int]:
    """``(entropy rank, numerical rank)`` of a 2-D delta, from ``torch.linalg.svdvals`` in float32.

    Entropy (effective) rank, Roy & Vetterli 2007: ``exp(-sum p_i log p_i)`` with
    ``p_i = s_i / sum(s)``: 1.0 for a rank-1 delta, ``r`` for ``r`` equal singular values,
    a real number in between otherwise. Numerical rank: the count of singular values above
    ``RANK_RTOL`` times the largest. Non-finite entries are zeroed first. A zero delta has
    rank 0. Callers skip deltas above ``RANK_MAX_ELEMENTS`` elements.
    """
    import torch

    d = torch.nan_to_num(delta.float(), nan=0.0, posinf=0.0, neginf=0.0)
    s = torch.linalg.svdvals(d).double()
    total = float(s.sum())
    if total == 0.0:
        return 0.0, 0
    p = s[s > 0] / total
    entropy = float(-(p * p.log()).sum())
    return math.exp(entropy), int((s > RANK_RTOL * s[0]).sum())
