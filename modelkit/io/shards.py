"""Shard planning and writing: lazy tensors streamed into ``model-0000i-of-0000N.safetensors``
plus ``model.safetensors.index.json``, the layout stock transformers loads.

Boundaries are planned from the tensors' shapes with huggingface_hub's splitter before any
tensor is produced; each shard's header is written from that plan, then its tensors are
produced one at a time and appended by a writer thread as they come
(:mod:`modelkit.io.safetensors_stream`). Peak memory is a few tensors (``QUEUE``) plus the
inputs of the ones being computed, whatever ``max_shard_size``. Inside
:func:`parallel_production` (a format whose tensors are computed asks for it) up to
``workers`` tensors are computed at once, each worker with one torch thread. Knows no format and no
model: a tensor is anything with the :class:`Producer` shape (a
:class:`~modelkit.formats.view.LazyTensor`).
"""
from __future__ import annotations

import contextlib
import contextvars
import json
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Protocol

from modelkit.errors import ExportError, ModelkitError
from modelkit.io.safetensors_stream import StreamedSafetensors
from modelkit.io.tensors import DTYPE_BYTES, FLOAT_DTYPES, dtype_name, release_all, torch_dtype
from modelkit.progress import phase
from modelkit.units import human_bytes

INDEX = "model.safetensors.index.json"
PATTERN = "model{suffix}.safetensors"
QUEUE = 4  # tensors produced ahead of the writer thread: the memory it may hold beyond the sources'
MAX_WORKERS = 4  # tensors computed at once inside parallel_production (each holds its inputs and output)

_workers: contextvars.ContextVar[int] = contextvars.ContextVar("modelkit_production_workers", default=1)


@contextlib.contextmanager
def parallel_production(workers: int | None = None):
    """Within this block :func:`write_weights` computes up to ``workers`` tensors at once
    (default: torch's intra-op thread count, at most :data:`MAX_WORKERS`), each in a worker
    thread with one torch thread. Why: the products of one computed tensor (a compressed
    expert, ``[768 x 2048] x [2048 x 64]``) are too small to split across threads, and on a
    shared machine a split product waits for its slowest thread (measured on 2 cores: 4x the
    wall time of two single-threaded workers); independent tensors keep every core busy."""
    if workers is None:
        import torch

        workers = torch.get_num_threads()
    token = _workers.set(max(1, min(int(workers), MAX_WORKERS)))
    try:
        yield
    finally:
        _workers.reset(token)


def production_workers() -> int:
    """Tensors :func:`write_weights` computes at once here (1 outside :func:`parallel_production`)."""
    return _workers.get()


class Producer(Protocol):
    """What the writer needs of a tensor not yet produced."""

    shape: tuple[int, ...]
    dtype: str                                   # torch dtype name of what it produces
    origin: str                                  # where it comes from, for error messages
    compute: Callable[[Any], Any] | None         # set for computed tensors (overlap their writes)

    @property
    def numel(self) -> int: ...

    def produce_as(self, dtype: Any) -> Any: ...

    def stored_span(self, dtype: str) -> tuple[Path, int, int] | None:
        """(file, offset, length) of bytes stored exactly as the export writes them in
        ``dtype`` (copied file to file), or None: produce it."""


def check_size(size: int | str) -> None:
    """ExportError for a shard size huggingface_hub's splitter would not accept."""
    from huggingface_hub.serialization._base import (
        parse_size_to_int,  # the splitter's own parser
    )

    try:
        value = parse_size_to_int(size) if isinstance(size, str) else int(size)
    except (TypeError, ValueError):
        value = 0
    if value <= 0:
        raise ExportError(f"max_shard_size {size!r} is not a size; use e.g. '2GB', '500MB' or a byte count")


def plan_shards(tensors: dict[str, Producer], out_dtype, max_shard_size: int | str):
    """huggingface_hub's split of the (not yet produced) tensors into shard files; names
    always carry ``-0000i-of-0000N`` (also for a single shard)."""
    from huggingface_hub import split_state_dict_into_shards_factory

    split = split_state_dict_into_shards_factory(
        tensors, get_storage_size=lambda lt: lt.numel * DTYPE_BYTES[_target_dtype(lt, out_dtype)],
        filename_pattern=PATTERN, max_shard_size=max_shard_size)
    files = dict(split.filename_to_tensors)
    if len(files) == 1:
        files = {PATTERN.format(suffix="-00001-of-00001"): next(iter(files.values()))}
    return files, split.metadata["total_size"]


def _target_dtype(lt: Producer, out_dtype) -> str:
    if out_dtype is not None and lt.dtype in FLOAT_DTYPES:
        return dtype_name(out_dtype)
    return lt.dtype


def default_dtype(tensors: dict[str, Producer]):
    """The floating torch dtype holding most bytes of ``tensors`` (an export's dtype by default)."""
    weight: Counter = Counter()
    for lt in tensors.values():
        if lt.dtype in FLOAT_DTYPES:
            weight[lt.dtype] += lt.numel * DTYPE_BYTES[lt.dtype]
    return torch_dtype(weight.most_common(1)[0][0] if weight else "float32", floating=True)


def produce(name: str, lt: Producer, out_dtype):
    """Produce one tensor, checked against its promised shape, cast and contiguous."""
    import torch

    try:
        t = lt.produce_as(out_dtype)
    except ModelkitError:
        raise
    except Exception as e:  # a merge whose shapes do not fit, a read that fails, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"cannot produce {name} from {lt.origin}: {first}") from None
    if not isinstance(t, torch.Tensor):
        raise ExportError(f"{name} from {lt.origin} is a {type(t).__name__}, not a tensor")
    if tuple(t.shape) != tuple(lt.shape):
        raise ExportError(f"{name} from {lt.origin} has shape {list(t.shape)}, expected {list(lt.shape)}")
    if out_dtype is not None and t.is_floating_point() and t.dtype != out_dtype:
        t = t.to(out_dtype)
    return t.detach().to("cpu").contiguous()


def _one_torch_thread() -> None:
    import torch

    torch.set_num_threads(1)


class _Ahead:
    """Tensors produced in order by ``workers`` threads, at most ``workers`` ahead of the
    consumer (1 worker: produced in the caller's thread when asked, as before)."""

    def __init__(self, names: list[str], tensors: dict[str, Producer], out_dtype, workers: int):
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        self.names, self.tensors, self.out_dtype, self.workers = names, tensors, out_dtype, workers
        self.next = 0
        self.queue: deque = deque()
        self.pool = None
        if workers > 1:
            import torch

            self.saved_threads = torch.get_num_threads()
            self.pool = ThreadPoolExecutor(workers, thread_name_prefix="modelkit-compute",
                                           initializer=_one_torch_thread)

    def take(self, name: str):
        if self.pool is None:
            return produce(name, self.tensors[name], self.out_dtype)
        while self.next < len(self.names) and len(self.queue) < self.workers:
            n = self.names[self.next]
            self.next += 1
            # each task in a copy of this context: a format's producers read context variables
            ctx = contextvars.copy_context()
            self.queue.append((n, self.pool.submit(ctx.run, produce, n, self.tensors[n], self.out_dtype)))
        n, fut = self.queue.popleft()
        assert n == name, (n, name)  # taken in the planned order
        return fut.result()

    def close(self) -> None:
        if self.pool is None:
            return
        for _, fut in self.queue:
            fut.cancel()
        self.queue.clear()
        self.pool.shutdown(wait=True)
        import torch

        torch.set_num_threads(self.saved_threads)  # the workers' setting is also torch's default for new threads


def _close_after(barrier, out: StreamedSafetensors) -> None:
    """Close (fsync) ``out`` once the writer has done every write before ``barrier``."""
    barrier.result()
    out.close()


def write_weights(folder: Path, tensors: dict[str, Producer], out_dtype, max_shard_size: int | str,
                  progress: bool = True, desc: str = "write") -> dict[str, Any]:
    """Stream ``tensors`` into shards in ``folder``; returns the files, total size and a cast tally.

    Each shard's header is written from the plan (names, shapes, dtypes known before any
    tensor exists), then every tensor is produced and handed to a writer thread that
    appends its bytes straight from its memory (file writes and ``os.fsync`` release the
    GIL), so computing and writing overlap and memory is about ``QUEUE`` tensors, whatever
    the shard size. Inside :func:`parallel_production` several tensors are computed at once,
    in order, at most as many ahead as there are workers. A shard is fsynced by a second
    thread once its last tensor is written
    (the writer goes on with the next); the source files' memory maps are dropped
    (``release_all``) after each shard. Every write
    and fsync has finished, its errors raised, before this returns. Progress is one phase
    ``desc`` counting tensors (its note: the shard and the bytes produced); a cancel stops
    it at the next tensor."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    files, total = plan_shards(tensors, out_dtype, max_shard_size)
    outs = {filename: StreamedSafetensors(folder / filename,
                                          [(n, _target_dtype(tensors[n], out_dtype), tuple(tensors[n].shape))
                                           for n in names], metadata={"format": "pt"})
            for filename, names in files.items()}
    weight_map, cast, params = {}, Counter(), 0
    pending: deque = deque()   # writes in flight (each holds its tensor)
    closing: list = []         # shards being fsynced (they hold no tensor)

    def settle(limit: int) -> None:  # wait for the oldest writes (raising their errors)
        while len(pending) > limit:
            pending.popleft().result()
        if any(f.done() and f.exception() is not None for f in closing):  # stop at an fsync error,
            for f in [*pending, *closing]:  # raising a failed write first (it failed its shard's close)
                if f.done():
                    f.result()

    order = [n for names in files.values() for n in names]
    # tensors stored unchanged are copied file to file; only the others are produced (ahead)
    spans = {}
    for n in order:
        span = tensors[n].stored_span(_target_dtype(tensors[n], out_dtype))
        if span is not None:
            spans[n] = span
    ahead = _Ahead([n for n in order if n not in spans], tensors, out_dtype, production_workers())
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="modelkit-write") as writer, \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="modelkit-sync") as syncer, \
                phase(desc, total=len(tensors), unit="tensors", show=progress) as bar:
            done_bytes = 0
            for i, (filename, names) in enumerate(files.items(), 1):
                where = f"shard {i}/{len(files)}"
                bar.update(0, note=f"{where}, {human_bytes(done_bytes)} of {human_bytes(total)}")
                out = outs[filename]
                for name in names:
                    lt = tensors[name]
                    planned = _target_dtype(lt, out_dtype)
                    span = spans.get(name)
                    if span is not None:  # stored as written: the writer copies its bytes
                        pending.append(writer.submit(out.copy, name, planned, tuple(lt.shape), *span))
                        params += lt.numel
                        done_bytes += span[2]
                    else:
                        t = ahead.take(name)
                        got = dtype_name(t.dtype)
                        if got != planned:
                            raise ExportError(f"{name} from {lt.origin} is {got}, the view promised {planned}")
                        if lt.dtype != got:
                            cast[f"{lt.dtype}->{got}"] += 1
                        params += t.numel()
                        done_bytes += t.numel() * t.element_size()
                        pending.append(writer.submit(out.write, name, t))
                        del t
                    weight_map[name] = filename
                    bar.update(1, note=f"{where}, {human_bytes(done_bytes)} of {human_bytes(total)}")
                    settle(QUEUE)
                # the shard is fsynced by a second thread once its writes are done, while the
                # writer goes on with the next shard: the disk flushes one shard as the next
                # one is copied into the page cache (fsync in line would leave it idle)
                barrier = writer.submit(lambda: None)  # done when every write before it is
                closing.append(syncer.submit(_close_after, barrier, out))
                release_all()  # unmap the source pages this shard consumed
            settle(0)
            for f in closing:  # raises the last fsync error (EIO)
                f.result()
    except BaseException:
        for out in outs.values():  # the writer has stopped: close what it left open
            out.abandon()
        raise
    finally:
        ahead.close()  # the compute workers stopped, torch's thread count restored
    index = {"metadata": {"total_parameters": params, "total_size": total}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return {"files": list(files), "total_size": total, "cast": dict(cast)}


__all__ = ["INDEX", "MAX_WORKERS", "PATTERN", "QUEUE", "Producer", "check_size", "default_dtype",
           "parallel_production", "plan_shards", "produce", "production_workers", "write_weights"]
