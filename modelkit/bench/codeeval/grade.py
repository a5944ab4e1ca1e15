"""Grade code samples against problems in the sandbox: per-sample status, pass@1, self-check.

``grade(problems, samples)`` runs every sample (``task_id`` + ``completion``, or the full
``solution`` of an EvalPlus sample) once, in parallel workers, and returns a
:class:`GradeReport`: one row per sample with ``status`` in pass / fail / timeout / error
and the first lines of what went wrong, pass@1, and the isolation that was in force.
``error`` is the harness failing (the sandbox could not start), never the program: it is
not counted as a failure, and a report with errors says it is incomplete.

``self_check(problems)`` refuses a problem set whose canonical solutions do not all pass,
or where an empty completion passes anything (results cached per problem file, limits
and interpreter).
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from modelkit.bench.codeeval.problems import (
    Problem,
    ProblemFileError,
    ProblemSet,
    load_problems,
    read_jsonl,
)
from modelkit.bench.codeeval.sandbox import (
    RUNNER_SOURCE,
    STATUSES,
    Limits,
    RunOutcome,
    Sandbox,
)
from modelkit.errors import ModelkitError

SELF_CHECK_VERSION = 1


class GradingError(ModelkitError):
    """Grading could not be done as asked (harness failures, a problem set that fails its self-check)."""


@dataclass(frozen=True)
class Sample:
    """One model answer: ``completion`` (continues the prompt) or ``solution`` (full code)."""

    task_id: str
    completion: str | None = None
    solution: str | None = None

    def program(self, problem: Problem) -> str:
        return problem.program(completion=self.completion, solution=self.solution)


@dataclass
class SampleResult:
    task_id: str
    index: int                     # position in the samples file
    status: str
    detail: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "pass"


@dataclass
class GradeReport:
    """Per-sample outcomes of one problems file, pass@1 and the isolation in force."""

    problems: str
    samples: str
    results: list[SampleResult]
    isolation: dict
    limits: dict
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.counts = {s: sum(r.status == s for r in self.results) for s in STATUSES}

    @property
    def complete(self) -> bool:
        """False when the harness failed on some sample (those are not counted as fails)."""
        return self.counts.get("error", 0) == 0

    @property
    def pass_at_1(self) -> float | None:
        """Mean over tasks of the fraction of its graded samples that pass (errors left out);
        None when nothing could be graded."""
        per_task: dict[str, list[bool]] = {}
        for r in self.results:
            if r.status != "error":
                per_task.setdefault(r.task_id, []).append(r.passed)
        if not per_task:
            return None
        return sum(sum(v) / len(v) for v in per_task.values()) / len(per_task)

    def summary(self, all_rows: bool = False) -> str:
        p = self.pass_at_1
        head = (f"pass@1 {p:.4f}" if p is not None else "pass@1 not measured") + \
               f" on {self.problems} ({len(self.results)} samples: " + \
               ", ".join(f"{self.counts[s]} {s}" for s in STATUSES) + f"; {self.seconds:.1f} s)"
        if not self.complete:
            head += f"\nINCOMPLETE: the harness failed on {self.counts['error']} sample(s); they are not counted as fails"
        lines = [head, self.isolation.get("statement", "")]
        for r in self.results:
            if all_rows or r.status != "pass":
                first = r.detail.strip().splitlines()[-1] if r.detail.strip() else ""
                lines.append(f"  {r.task_id:<24} {r.status:<8} {first[:160]}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"problems": self.problems, "samples": self.samples, "pass_at_1": self.pass_at_1,
                "complete": self.complete, "counts": self.counts, "seconds": self.seconds,
                "isolation": self.isolation, "limits": self.limits, "results": [asdict(r) for r in self.results]}

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), **kw)


# --------------------------------------------------------------------------- samples


def read_samples(path: str | Path) -> list[Sample]:
    """Samples in the human-eval / EvalPlus JSON-lines form (``task_id`` and ``completion``
    or ``solution``); a malformed line is a ProblemFileError naming the file and line."""
    path = Path(path).expanduser()
    out = []
    for lineno, row in read_jsonl(path):
        task_id = row.get("task_id")
        if isinstance(task_id, int) and not isinstance(task_id, bool):
            task_id = str(task_id)
        if not isinstance(task_id, str) or not task_id:
            raise ProblemFileError(f"line {lineno}: no task_id", path)
        completion, solution = row.get("completion"), row.get("solution")
        if completion is None and solution is None:
            raise ProblemFileError(f"line {lineno} ({task_id}): neither 'completion' nor 'solution'", path)
        for key, value in (("completion", completion), ("solution", solution)):
            if value is not None and not isinstance(value, str):
                raise ProblemFileError(f"line {lineno} ({task_id}): {key!r} must be a string", path)
        out.append(Sample(task_id, completion, solution if completion is None else None))
    if not out:
        raise ProblemFileError("holds no samples", path)
    return out


# --------------------------------------------------------------------------- grading


def default_workers() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def run_all(problems: ProblemSet, samples: Sequence[Sample], *, sandbox: Sandbox, workers: int,
            progress: bool = False) -> list[SampleResult]:
    """Each sample once in ``sandbox`` (``workers`` at a time), in the samples' order."""
    from tqdm.auto import tqdm

    index = problems.by_id()
    unknown = sorted({s.task_id for s in samples} - set(index))
    if unknown and problems.whole:
        raise ProblemFileError(f"samples name task ids the problems file does not hold: {', '.join(unknown[:10])}"
                               + (" ..." if len(unknown) > 10 else ""), problems.source)

    chosen = [i for i, s in enumerate(samples) if s.task_id in index]   # a subset skips other tasks' samples

    def one(i: int) -> SampleResult:
        s = samples[i]
        p = index[s.task_id]
        try:
            o = sandbox.run(s.program(p), p.test, p.entry_point, p.calls_check)
        except Exception as e:  # the harness itself failed: an error, never a fail
            o = RunOutcome("error", f"harness failure: {type(e).__name__}: {e}", None, 0.0)
        return SampleResult(s.task_id, i, o.status, o.detail, round(o.seconds, 4))

    workers = max(1, int(workers))
    with sandbox.slots(workers), ThreadPoolExecutor(workers, thread_name_prefix="modelkit-grade") as pool:
        it = pool.map(one, chosen)
        return list(tqdm(it, total=len(chosen), desc="grading", unit="program", disable=not progress))


def grade(problems: ProblemSet | str | Path | None, samples: Sequence[Sample] | str | Path, *,
          workers: int | None = None, timeout: float | None = None, limits: Limits | None = None,
          isolation: str = "auto", check_problems: bool = True, progress: bool = False) -> GradeReport:
    """Grade ``samples`` against ``problems`` (a ProblemSet, a problems file, or None for
    HumanEval). ``check_problems`` runs :func:`self_check` first (cached)."""
    import time

    pset = problems if isinstance(problems, ProblemSet) else load_problems(problems)
    sample_src = str(samples) if isinstance(samples, (str, Path)) else "<samples>"
    items = read_samples(samples) if isinstance(samples, (str, Path)) else list(samples)
    limits = _limits(limits, timeout)
    workers = workers or default_workers()
    t0 = time.perf_counter()
    with Sandbox(limits, isolation=isolation) as sandbox:
        if check_problems:
            self_check(pset, sandbox=sandbox, workers=workers, progress=progress)
        results = run_all(pset, items, sandbox=sandbox, workers=workers, progress=progress)
        iso = {"statement": sandbox.isolation.statement(), **sandbox.isolation.to_dict(),
               "uids": sorted(sandbox.used_uids), "scratch": sandbox.scratch_dirs}
    return GradeReport(pset.source, sample_src, results, iso, asdict(limits), seconds=time.perf_counter() - t0)


def _limits(limits: Limits | None, timeout: float | None) -> Limits:
    limits = limits or Limits()
    if timeout is not None:
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
            raise GradingError(f"timeout must be a positive number of seconds; got {timeout!r}")
        limits = Limits(**{**asdict(limits), "timeout": float(timeout)})
    return limits


# --------------------------------------------------------------------------- self-check


def self_check(problems: ProblemSet, *, sandbox: Sandbox | None = None, workers: int | None = None,
               progress: bool = False, use_cache: bool = True) -> dict:
    """Canonical solutions must all pass, an empty completion must fail every problem;
    else a GradingError naming the failing task ids. Returns the (cached) check record."""
    own = sandbox is None
    sandbox = sandbox or Sandbox()
    try:
        key = _check_key(problems, sandbox.limits, sandbox.python)
        path = _check_path(key)
        if use_cache:
            try:
                record = json.loads(path.read_text())
                if record.get("key") == key and record.get("ok"):
                    return record
            except (OSError, ValueError):
                pass
        samples = [Sample(p.task_id, solution=p.canonical_program()) for p in problems]
        samples += [Sample(p.task_id, completion="") if p.kind == "humaneval" else Sample(p.task_id, solution="")
                    for p in problems]
        results = run_all(problems, samples, sandbox=sandbox, workers=workers or default_workers(), progress=progress)
        n = len(problems)
        errors = [r for r in results if r.status == "error"]
        if errors:
            raise GradingError(f"self-check could not run: the harness failed on {len(errors)} program(s) "
                               f"({errors[0].task_id}: {errors[0].detail})", problems.source)
        bad_canonical = [r for r in results[:n] if r.status != "pass"]
        empty_passes = [r for r in results[n:] if r.status == "pass"]
        if bad_canonical or empty_passes:
            parts = []
            if bad_canonical:
                parts.append("canonical solution does not pass: " + ", ".join(
                    f"{r.task_id} ({r.status}: {_last(r.detail)})" for r in bad_canonical[:20]))
            if empty_passes:
                parts.append("an empty completion passes: " + ", ".join(r.task_id for r in empty_passes[:20]))
            raise GradingError("problem set refused by its self-check; " + "; ".join(parts), problems.source)
        record = {"key": key, "ok": True, "problems": problems.source, "n": n,
                  "isolation": sandbox.isolation.statement()}
        _write_record(path, record)
        return record
    finally:
        if own:
            sandbox.close()


def _last(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:120] if lines else ""


def _check_key(problems: ProblemSet, limits: Limits, python: str) -> str:
    h = hashlib.sha256()
    h.update(f"{SELF_CHECK_VERSION}\0{python}\0{json.dumps(asdict(limits), sort_keys=True)}\0".encode())
    h.update(RUNNER_SOURCE.encode())
    for p in problems:
        h.update(json.dumps(asdict(p), sort_keys=True, default=str).replace(p.source, "").encode())
    return h.hexdigest()[:24]


def _check_path(key: str) -> Path:
    from modelkit.cache import cache_dir

    return cache_dir() / "codeeval" / f"self-check-{key}.json"


def _write_record(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


