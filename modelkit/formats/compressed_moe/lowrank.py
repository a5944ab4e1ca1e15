"""Compressed-MoE experts materialised many at a time: the arithmetic behind a fast export.

Every expert of one (layer, projection) shares the core ``C [d_out, d_in]`` and has its
own rank-r wrappers; ``W_e = (I + U_out V_out^T) C (I + U_in V_in^T)``. Materialising
experts one by one spends half the FLOPs in skinny ``[d_out, d_in] x [d_in, r]`` products.
:func:`materialize_experts` does the two products that touch ``C`` for all experts of a
batch as two wide matrix products (``C @ [U_in_1 ... U_in_k]`` and
``[V_out_1 ... V_out_k]^T @ C``), then one batched ``baddbmm`` of inner size ``2r``:
the same FLOPs as the per-expert formula, at the speed of large GEMMs.

:class:`ExpertBatches` serves a stream of single-expert requests (an export walks experts
in order, the three projections interleaved) from batches of ``batch`` experts, keeping
the not yet requested ones; it is switched on only inside :func:`batched_experts` (the
export's writer), so a load or a diff that asks for one expert computes just that one.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
from concurrent.futures import Future
from collections.abc import Callable, Iterator, Sequence
from typing import Any

BATCH = 8   # experts materialised together: 8 x [768 x 2048] fp32 = 50 MB for Qwen3-30B-A3B

_enabled: contextvars.ContextVar[bool] = contextvars.ContextVar("modelkit_batched_experts", default=False)


@contextlib.contextmanager
def batched_experts() -> Iterator[None]:
    """Within this block, expert producers that use :class:`ExpertBatches` compute their
    experts in batches (for a consumer that asks for every expert in order)."""
    token = _enabled.set(True)
    try:
        yield
    finally:
        _enabled.reset(token)


def batching() -> bool:
    return _enabled.get()


def materialize_experts(core, u_in, v_in, u_out, v_out, dtype=None):
    """``[k, d_out, d_in]``: ``(I + U_out V_out^T) C (I + U_in V_in^T)`` for k experts.

    ``core`` is ``[d_out, d_in]`` (shared) or ``[k, d_out, d_in]`` (one each); ``u_in, v_in`` are ``[k, d_in, r]``, ``u_out,
    v_out`` ``[k, d_out, r]``. Computed in float32 (float64 when ``dtype`` is float64) as
    ``C + [U_out, C U_in] @ [A + (A U_in) V_in^T ; V_in^T]`` with ``A = V_out^T C`` (the
    per-expert formula of ``compressed_moe.materialize``, batched), returned in ``dtype``
    (default: the core's).
    """
    import torch

    work = torch.float64 if dtype == torch.float64 else torch.float32
    c = core.to(work)
    u_in, v_in, u_out, v_out = (t.to(work) for t in (u_in, v_in, u_out, v_out))
    k, d_out, r = u_out.shape
    d_in = c.shape[-1]
    if c.dim() == 3:  # one core per expert (the per-expert copies a Trainer save holds)
        cu, a = torch.bmm(c, u_in), torch.bmm(v_out.transpose(1, 2), c)
    else:  # the two products with the shared C, as two wide GEMMs over all k experts
        cu = (c @ u_in.permute(1, 0, 2).reshape(d_in, k * r)).reshape(d_out, k, r).permute(1, 0, 2)
        a = (v_out.permute(0, 2, 1).reshape(k * r, d_out) @ c).reshape(k, r, d_in)
    a = a + torch.bmm(torch.bmm(a, u_in), v_in.transpose(1, 2))       # A (I + U_in V_in^T)
    left = torch.cat([u_out, cu], dim=2)                               # [k, d_out, 2r]
    right = torch.cat([a, v_in.transpose(1, 2)], dim=1)                # [k, 2r, d_in]
    out = torch.baddbmm(c if c.dim() == 3 else c.expand(k, d_out, d_in), left, right)
    return out.to(dtype or core.dtype)


class ExpertBatches:
    """Single-expert requests of one group (a layer's projection) served from batches.

    ``load(experts) -> (core, u_in, v_in, u_out, v_out)`` reads the stored tensors of the
    listed experts (stacked); ``order`` is every expert index of the group, in the order a
    full walk asks for them. Thread-safe, and a batch is computed outside the lock (two
    export workers compute two batches at once; one asking for an expert of a batch being
    computed waits for it); a computed expert is handed out once."""

    def __init__(self, order: Sequence[int], load: Callable[[list[int]], tuple], batch: int = BATCH):
        self.order = list(order)
        self.load = load
        self.batch = batch
        self._ready: dict[tuple[int, Any], tuple[Future, int]] = {}  # (expert, dtype) -> (its batch, index)
        self._given: set[tuple[int, Any]] = set()
        self._lock = threading.Lock()

    def get(self, expert: int, dtype) -> Any:
        with self._lock:
            self._given.add((expert, dtype))
            hit = self._ready.pop((expert, dtype), None)
            if hit is None:
                at = self.order.index(expert)
                later = [e for e in self.order[at + 1:]
                         if (e, dtype) not in self._ready and (e, dtype) not in self._given]
                chosen = [expert] + later[:self.batch - 1]
                mine: Future = Future()
                for i, e in enumerate(chosen[1:], start=1):
                    self._ready[(e, dtype)] = (mine, i)
        if hit is not None:
            batch, i = hit
            return batch.result()[i]
        try:
            weights = materialize_experts(*self.load(chosen), dtype=dtype)
        except BaseException as e:
            mine.set_exception(e)
            raise
        mine.set_result(weights)
        return weights[0]
