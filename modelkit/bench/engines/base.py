"""What every engine is given and gives back.

An :class:`EvalJob` names one model (a ref with its load options and the fingerprints
``compare`` identified it by) and the tasks and settings to evaluate it on; it is plain
data, so executors can send it to another process, a Ray worker or a SLURM job. An
engine returns an :class:`EngineRun`: the per-sample runs in the structure
:func:`modelkit.bench.evaluation.evaluate` produces, and the provenance of how they were made.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any


@dataclass
class EvalJob:
    """One evaluation: one model on some tasks ("one evaluation per executor task")."""

    role: str
    label: str
    ref: str
    options: dict[str, Any]
    fingerprint: str
    artifact_fingerprint: str
    base_fingerprint: str | None
    tasks: list[str]
    include_path: list[str] = field(default_factory=list)
    limit: int | float | None = None
    num_fewshot: int | None = None
    batch_size: int = 8


@dataclass
class EngineRun:
    """The runs of one job and where they came from."""

    runs: dict[str, dict]                  # task name -> run (per-sample scores)
    dtype: str | None
    load: dict[str, Any] | None            # LoadReport facts (in process) or what was prepared
    seconds: float
    provenance: dict[str, Any]             # engine, version, command, checks


class Engine(ABC):
    """Evaluates one job; holds only plain, picklable settings."""

    name: str = ""

    @abstractmethod
    def evaluate(self, job: EvalJob, catalog: Any = None) -> EngineRun:
        """Evaluate ``job``; ``catalog`` is the caller's TaskCatalog when in the same process."""

    def check(self, job: EvalJob) -> None:
        """CompareError when this engine cannot evaluate ``job`` (cheap: nothing is loaded)."""

    def identity(self) -> dict[str, Any]:
        """What in the engine's settings can change per-sample results (part of cache keys)."""
        return {"engine": self.name}

    def describe(self) -> str:
        return self.name


def run_job(engine: Engine, job: EvalJob) -> EngineRun:
    """``engine.evaluate(job)``: a top-level function, so executors can pickle it."""
    return engine.evaluate(job)
