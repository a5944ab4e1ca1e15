"""Executors: where many evaluations run, one evaluation per task.

Every executor has one method, ``map(fn, jobs) -> list`` (results in the order of
``jobs``; the first failure is raised), and holds no scheduling logic of modelkit's:

* ``local`` (:class:`LocalPool`): a ``concurrent.futures`` process pool on this machine
  (``spawn`` start method: torch and forked threads do not mix);
* ``ray`` (:class:`RayExecutor`): one Ray task per job, each asking for ``num_gpus``
  (logical resources: Ray places them, ``CUDA_VISIBLE_DEVICES`` is set per task);
* ``slurm`` (:class:`SubmititExecutor`): one SLURM array task per job through submitit
  (``cluster="local"`` runs the same jobs as local processes, for testing).

``fn`` and the jobs must pickle (top-level functions, plain data): e.g.
``functools.partial(modelkit.bench.engines.run_job, engine)`` over :class:`~modelkit.bench.engines.EvalJob`,
or ``watch``'s "evaluate one checkpoint" callable over checkpoint paths.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

from modelkit.errors import CompareError

EXECUTORS = ("local", "ray", "slurm")


class Executor(Protocol):
    def map(self, fn: Callable[[Any], Any], jobs: Iterable[Any]) -> list[Any]:
        """``[fn(job) for job in jobs]``, each call one task of the executor."""


@dataclass
class Sequential:
    """Each job in this process, one after another (no pickling): the reference."""

    def map(self, fn: Callable[[Any], Any], jobs: Iterable[Any]) -> list[Any]:
        return [fn(job) for job in jobs]


@dataclass
class LocalPool:
    """A process pool on this machine: ``max_workers`` processes (default: 1 per job, at
    most the CPU count)."""

    max_workers: int | None = None

    def map(self, fn: Callable[[Any], Any], jobs: Iterable[Any]) -> list[Any]:
        import multiprocessing
        import os
        from concurrent.futures import ProcessPoolExecutor

        jobs = list(jobs)
        if not jobs:
            return []
        workers = self.max_workers or min(len(jobs), os.cpu_count() or 1)
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            return list(pool.map(fn, jobs))


@dataclass
class RayExecutor:
    """One Ray task per job with ``num_gpus`` / ``num_cpus`` resources each. Connects to
    ``address`` (``"auto"``: a running cluster) or uses the Ray session already
    initialised in this process; with neither, starts a local one for the call."""

    num_gpus: float = 1
    num_cpus: float = 1
    address: str | None = None
    runtime_env: dict[str, Any] = field(default_factory=dict)
    placements: list[dict[str, Any]] = field(default_factory=list, repr=False)   # per job: GPUs Ray gave it

    def map(self, fn: Callable[[Any], Any], jobs: Iterable[Any]) -> list[Any]:
        ray = _import("ray", "pip install 'ray[default]'")
        jobs = list(jobs)
        started = False
        if not ray.is_initialized():
            ray.init(address=self.address, runtime_env=self.runtime_env or None, include_dashboard=False,
                     log_to_driver=False)
            started = True
        try:
            task = ray.remote(num_gpus=self.num_gpus, num_cpus=self.num_cpus)(_call_placed)
            done = ray.get([task.remote(fn, job) for job in jobs])
            self.placements = [placed for _, placed in done]
            return [result for result, _ in done]
        finally:
            if started:
                ray.shutdown()


@dataclass
class SubmititExecutor:
    """One SLURM array task per job through submitit, logs and pickles under ``folder``.
    ``cluster=None`` lets submitit pick SLURM when available; ``"local"`` runs local
    processes; ``parameters`` go to ``update_parameters`` (e.g. ``gpus_per_node=1``,
    ``timeout_min=240``, ``slurm_partition="gpu"``)."""

    folder: str = "modelkit-submitit"
    cluster: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    def map(self, fn: Callable[[Any], Any], jobs: Iterable[Any]) -> list[Any]:
        submitit = _import("submitit", "pip install submitit")
        jobs = list(jobs)
        if not jobs:
            return []
        executor = submitit.AutoExecutor(folder=str(Path(self.folder).expanduser()), cluster=self.cluster)
        if self.parameters:
            executor.update_parameters(**self.parameters)
        submitted = executor.map_array(fn, jobs)
        return [j.result() for j in submitted]


def get_executor(name: str | Executor | None = None, **options: Any) -> Executor:
    """An executor by name: ``local`` (default), ``ray``, ``slurm`` (see module docstring)."""
    if name is not None and not isinstance(name, str):
        return name
    kinds = {"local": LocalPool, "ray": RayExecutor, "slurm": SubmititExecutor, "sequential": Sequential}
    if (name or "local") not in kinds:
        raise CompareError(f"unknown executor {name!r}; use one of {', '.join(EXECUTORS)}")
    try:
        return kinds[name or "local"](**options)
    except TypeError as e:
        raise CompareError(f"bad option for the {name} executor: {e}") from None


def _call_placed(fn: Callable[[Any], Any], job: Any) -> tuple[Any, dict[str, Any]]:
    """``fn(job)`` in a Ray task, with the GPUs Ray assigned to it."""
    import os

    import ray

    placed = {"gpu_ids": [str(g) for g in ray.get_gpu_ids()], "pid": os.getpid(),
              "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}
    return fn(job), placed


def _import(name: str, hint: str) -> Any:
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise CompareError(f"this executor needs {name}, which is not installed ({hint})") from None


def evaluator_on(executor: Executor, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``fn`` run as one task of ``executor`` per call (submit and wait): for callers that
    hand over one evaluation at a time, e.g. ``modelkit.watch``'s ``evaluator=``."""
    def evaluate(job: Any) -> Any:
        return executor.map(fn, [job])[0]

    return evaluate
