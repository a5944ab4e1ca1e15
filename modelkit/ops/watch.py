"""``watch``: evaluate every new complete checkpoint of a training run as it lands.

A run folder holds checkpoints of any format modelkit reads, as trainers write them:
``checkpoint-N/``, ``checkpoints/checkpoint-N/`` and ``best_model/``. The watcher polls
it and, for each checkpoint:

1. waits until it is **complete**: its files (names, sizes, mtimes) unchanged over
   ``settle`` seconds (or queued by :class:`modelkit.ops.watch_callback.AuditCallback` after the
   trainer finished saving it), and ``inspect`` gives no error finding (else it is
   *rejected* with the findings);
2. keys it by its content fingerprint and the evaluation settings, so a copy
   (``best_model/`` of ``checkpoint-N/``) is evaluated once, and a restarted watcher
   knows what is done;
3. evaluates it with ``evaluator(job)``, one model in memory at a time (the default,
   :func:`evaluate_in_process`, is :func:`modelkit.ops.compare.evaluate_model`); a failure
   is retried up to ``attempts`` times, then recorded with its error; a checkpoint
   deleted under the watcher (rotation by ``save_total_limit``) is recorded as skipped.

The baseline (``baseline=``, or the base an adapter checkpoint names) is evaluated once,
first. Everything is recorded in a :class:`~modelkit.ops.watch_ledger.Ledger` outside the run folder
(``$MODELKIT_CACHE/watch/...`` or ``state_dir``); nothing is ever written into the run.
Results pair each checkpoint with the baseline sample by sample, exactly as ``compare``
does (:class:`modelkit.ops.compare.CompareResult` computes the statistics).
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from modelkit.errors import CompareError, ModelkitError
from modelkit.io.checkpoints import checkpoint_folders, checkpoint_step
from modelkit.ops.watch_ledger import Ledger, default_state_dir
from modelkit.verdicts import Verdict, of_watch

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from matplotlib.figure import Figure

    from modelkit.ops.compare import CompareResult

SETTLE_SECONDS = 5.0       # files unchanged this long (and inspect clean): the checkpoint is complete
INTERVAL_SECONDS = 30.0    # between polls of the run folder
ATTEMPTS = 3               # evaluations of one checkpoint before it is recorded as failed
DEEP_BELOW_BYTES = 1 << 30  # audit() reads tensor data (all-zero LoRA B...) of checkpoints this small
TRAINER_STATE_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "training_args.bin", "trainer_state.json")


class WatchError(ModelkitError):
    """The run cannot be watched (no such folder, no baseline, the baseline fails)."""


# --------------------------------------------------------------------------- finding checkpoints


@dataclass(frozen=True)
class Candidate:
    """A checkpoint folder of the run: ``name`` relative to the run folder."""

    name: str
    path: Path
    step: int | None

    @property
    def order(self) -> tuple:
        return (self.step is None, self.step or 0, self.name)


def find_checkpoints(run_dir: str | Path) -> list[Candidate]:
    """``checkpoint-N/``, ``checkpoints/checkpoint-N/`` and ``best_model/`` under ``run_dir``,
    in step order (``best_model`` takes the ``global_step`` of its ``trainer_state.json``
    when it has one, else comes last)."""
    run = Path(run_dir)
    found: list[Candidate] = []
    for folder in (run, run / "checkpoints"):
        found += [Candidate(p.relative_to(run).as_posix(), p, checkpoint_step(p)) for p in checkpoint_folders(folder)]
    best = run / "best_model"
    if best.is_dir():
        found.append(Candidate("best_model", best, _trainer_step(best)))
    return sorted(found, key=lambda c: c.order)


def _trainer_step(folder: Path) -> int | None:
    from modelkit.errors import ModelkitError
    from modelkit.io.files import read_json

    try:  # confined, regular, size-capped: a FIFO named trainer_state.json must not hang a watch
        step = read_json(folder / "trainer_state.json").get("global_step")
    except (ModelkitError, AttributeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def snapshot(folder: Path) -> tuple | None:
    """Every file's relative name, size and mtime (ns) under ``folder``; None when the
    folder is gone (or vanishes while being listed)."""
    out = []
    try:
        for p in sorted(folder.rglob("*")):
            st = p.lstat()
            if not p.is_dir():
                out.append((p.relative_to(folder).as_posix(), st.st_size, st.st_mtime_ns))
    except FileNotFoundError:
        return None
    if not folder.is_dir():
        return None
    return tuple(out)


def snapshot_digest(snap: tuple | None) -> str:
    return hashlib.sha256(json.dumps(snap).encode()).hexdigest()[:16]


def audit(folder: str | Path, base: str | Path | None = None, deep: bool | None = None):
    """``inspect`` of a checkpoint as the watcher and the training callback use it:
    ``deep=None`` reads tensor data (finding untrained adapters) when the checkpoint's
    weights (the Trainer's optimizer and RNG files aside) are under DEEP_BELOW_BYTES."""
    from modelkit.ops.inspect import inspect

    if deep is None:
        deep = _weight_bytes(Path(folder)) < DEEP_BELOW_BYTES
    return inspect(folder, base=base, deep=deep)


def _weight_bytes(folder: Path) -> int:
    total = 0
    for p in folder.rglob("*"):
        if p.is_file() and p.name not in TRAINER_STATE_FILES and not p.name.startswith("rng_state"):
            total += p.stat().st_size
    return total


# --------------------------------------------------------------------------- evaluating one


@dataclass
class CheckpointJob:
    """Everything needed to evaluate one model, as plain data (so an executor can ship it
    to another process or machine). ``scratch`` is an empty folder the evaluator may use
    (e.g. for a temporary export); the watcher removes it after the call."""

    ref: str
    role: str                    # "baseline" or "checkpoint"
    label: str
    tasks: list[str]
    limit: int | float | None = None
    num_fewshot: int | None = None
    batch_size: int = 8
    include_path: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    engine: str | None = None            # "inprocess" (default) or "lm-eval" (modelkit.bench.engines)
    engine_options: dict[str, Any] = field(default_factory=dict)
    scratch: str | None = None


Evaluator = Callable[[CheckpointJob], dict]


def evaluate_in_process(job: CheckpointJob) -> dict[str, Any]:
    """The default evaluator: :func:`modelkit.ops.compare.evaluate_model` in this process,
    as ``compare`` evaluates each model (same cache, same engines: in process by default;
    with ``engine="lm-eval"`` the lm-eval CLI, its temporary export in ``job.scratch``,
    which the watcher removes). ``{"model": ModelInfo fields, "runs": {task: run}}``, JSON."""
    from modelkit.ops.compare import evaluate_model

    engine_options = dict(job.engine_options)
    if job.engine == "lm-eval" and job.scratch and "work_dir" not in engine_options:
        engine_options["work_dir"] = job.scratch
    info, runs = evaluate_model(job.ref, job.tasks, role="base" if job.role == "baseline" else "trained",
                                label=job.label, options=job.options, include_path=job.include_path,
                                limit=job.limit, num_fewshot=job.num_fewshot, batch_size=job.batch_size,
                                progress=False, engine=job.engine, engine_options=engine_options or None)
    return {"model": asdict(info), "runs": runs}


def evaluate_quietly(job: CheckpointJob) -> dict[str, Any]:
    """:func:`evaluate_in_process` with what the libraries print (lm-eval's progress bars,
    ``git`` complaints) captured (:func:`modelkit.quiet.captured`): the watcher's own
    lines stay readable. The capture is this context's; it also takes what any
    subprocess writes to the process's stderr meanwhile (file descriptor 2)."""
    from modelkit.quiet import captured

    with captured():
        return evaluate_in_process(job)


# --------------------------------------------------------------------------- the watcher


@dataclass
class Entry:
    """What the watcher concluded about one checkpoint."""

    name: str
    step: int | None
    status: str                          # done, failed, rejected, skipped, pending
    key: str | None = None
    attempts: int = 0
    detail: str = ""
    findings: list[dict] = field(default_factory=list)
    same_as: str | None = None           # a copy of this already evaluated checkpoint
    result: dict | None = field(default=None, repr=False)


class Watcher:
    """Polls ``run_dir`` and evaluates new complete checkpoints (see module docstring).

    ``poll()`` does one pass; ``run()`` polls until ``stop`` is set (or, with ``once``,
    after one pass). ``on_event(entry)`` is called after each settled checkpoint (the
    notebook panel and the CLI print from it). ``evaluator`` evaluates one :class:`CheckpointJob`
    (default :func:`evaluate_in_process`, or :func:`evaluate_quietly` with ``quiet``; an
    executor's submit-and-wait fits here: ``isolated`` runs each evaluation in a fresh
    process through :func:`modelkit.bench.executors.evaluator_on`, which a watcher thread in a
    notebook kernel needs so that the libraries' output and memory stay out of the kernel).
    """

    def __init__(self, run_dir: str | Path, tasks: str | Sequence[str], baseline: str | Path | None = None, *,
                 limit: int | float | None = None, num_fewshot: int | None = None, batch_size: int = 8,
                 include_path: str | Path | None = None, options: dict | None = None,
                 state_dir: str | Path | None = None, settle: float = SETTLE_SECONDS,
                 interval: float = INTERVAL_SECONDS, attempts: int = ATTEMPTS,
                 evaluator: Evaluator | None = None, on_event: Callable[[Entry], None] | None = None,
                 quiet: bool = False, isolated: bool = False, wandb: bool = False,
                 wandb_project: str = "modelkit-watch",
                 engine: str | None = None, engine_options: dict | None = None):
        from modelkit.bench.engines import get_engine
        from modelkit.bench.evaluation import find_tasks
        from modelkit.ops.compare import _check_settings, _task_names, result_settings

        self.run_dir = Path(run_dir).expanduser().absolute()
        if not self.run_dir.is_dir():
            raise WatchError("no such run folder", self.run_dir)
        self.tasks = _task_names(tasks)
        _check_settings((run_dir,), limit, num_fewshot, batch_size)
        if not isinstance(attempts, int) or attempts < 1:
            raise WatchError(f"attempts must be an integer >= 1; got {attempts!r}")
        self.catalog = find_tasks(self.tasks, include_path)    # unknown tasks refused before any work
        runner = get_engine(engine, **(engine_options or {}))     # a bad engine refused before any work
        self.settings = result_settings(self.catalog, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size,
                                        engine=runner)
        self.job_defaults = {"tasks": self.tasks, "limit": limit, "num_fewshot": num_fewshot,
                             "batch_size": batch_size, "options": dict(options or {}),
                             "include_path": str(include_path) if include_path else None,
                             "engine": engine, "engine_options": dict(engine_options or {})}
        self.baseline_ref = str(baseline) if baseline is not None else None
        self.ledger = Ledger.open(state_dir or default_state_dir(self.run_dir), run_dir=self.run_dir)
        self.settle, self.interval, self.attempts = float(settle), float(interval), attempts
        if evaluator is None and isolated:      # each evaluation in a fresh process: its memory and output stay there
            from modelkit.bench.executors import LocalPool, evaluator_on

            evaluator = evaluator_on(LocalPool(max_workers=1), evaluate_quietly)
        self.evaluator = evaluator or (evaluate_quietly if quiet else evaluate_in_process)
        self.on_event = on_event
        self.stop_event = threading.Event()
        self.baseline: Entry | None = None
        self.entries: dict[str, Entry] = {}
        self._seen: dict[str, tuple[tuple, float]] = {}     # name -> (snapshot, monotonic time first seen so)
        self._keys: dict[tuple[str, str], str] = {}          # (name, snapshot digest) -> ledger key
        self._queue: tuple[int, dict[str, str]] = (-1, {})   # queue.jsonl size when read, its entries
        self._aliases = {(r["key"], r["name"]) for r in self.ledger.records if r["event"] == "same"}
        self._settings_hash = hashlib.sha256(json.dumps(
            {"tasks": self.tasks, "hashes": self.catalog.hashes, "limit": limit, "num_fewshot": num_fewshot,
             "options": self.job_defaults["options"], "engine": runner.identity()},
            sort_keys=True, default=str).encode()).hexdigest()[:12]
        self.wandb, self.wandb_run = None, None
        if wandb:
            from modelkit.present.watch import WandbLog

            self.wandb = WandbLog(project=wandb_project, config={"run_dir": str(self.run_dir), "tasks": self.tasks,
                                                                  **self.settings})

    # -- loop -------------------------------------------------------------------------
    def run(self, once: bool = False, timeout: float | None = None) -> "WatchResult":
        """Poll until stopped (``stop()``, Ctrl-C), ``timeout`` seconds, or, with ``once``,
        until what is there now has been seen twice ``settle`` seconds apart and evaluated."""
        t0 = time.monotonic()
        with self.ledger.locked():
            try:
                self.poll()
                if once and any(e.status == "pending" for e in self.entries.values()):
                    self.stop_event.wait(self.settle)
                    self.poll(final=True)
                while not once and not self.stop_event.is_set():
                    if timeout is not None and time.monotonic() - t0 >= timeout:
                        break
                    wait = self.interval if timeout is None else min(self.interval, max(0.0, timeout - (time.monotonic() - t0)))
                    if self.stop_event.wait(wait):
                        break
                    self.poll()
            finally:
                if self.wandb is not None:
                    self.wandb_run = self.wandb.finish(self.result())
        return self.result()

    def stop(self) -> None:
        """Ask a running ``run()`` to return after the current evaluation."""
        self.stop_event.set()

    def poll(self, final: bool = False) -> list[Entry]:
        """One pass: note changes, then evaluate every checkpoint complete now, in step
        order. With ``final``, checkpoints still changing are reported as pending."""
        if self.baseline is None or self.baseline.status != "done":
            self._evaluate_baseline()
        now = time.monotonic()
        found = find_checkpoints(self.run_dir)
        queued = self._queued()
        ready = []
        for c in found:
            snap = snapshot(c.path)
            if snap is None:
                continue                      # gone while listing: handled below as vanished
            before = self._seen.get(c.name)
            if before is None or before[0] != snap:
                self._seen[c.name] = (snap, now)
                if queued.get(c.name) == snapshot_digest(snap):
                    ready.append((c, snap))   # the trainer said the save is finished
                elif final or before is None:
                    self._pending(c, "still being written" if before is not None else "seen once")
                continue
            if now - before[1] >= self.settle or queued.get(c.name) == snapshot_digest(snap):
                ready.append((c, snap))
            elif final:
                self._pending(c, "still being written")
        names = {c.name for c in found}
        for name in [n for n in self._seen if n not in names]:
            self._vanished(name)
        done = []
        for c, snap in ready:
            if self.stop_event.is_set():
                break
            entry = self._process(c, snap)
            if entry is not None:
                done.append(entry)
        return done

    # -- one checkpoint ---------------------------------------------------------------
    def _process(self, c: Candidate, snap: tuple) -> Entry | None:
        from modelkit.io.sources import fingerprint_folder

        digest = snapshot_digest(snap)
        key = self._keys.get((c.name, digest))
        if key is None:
            try:
                fp = fingerprint_folder(c.path)
            except OSError:
                return self._skip_deleted(c, None, "deleted before it was evaluated")
            key = f"{self._settings_hash}-{fp}"
            self._keys[(c.name, digest)] = key
        known = self.entries.get(c.name)
        if known is not None and known.key == key and known.status != "pending":
            return None                                   # already settled in this process
        record = self.ledger.final(key)
        if record is not None:
            return self._settled(c, key, record)
        findings = self._inspect(c)
        if findings is None:
            return self._skip_deleted(c, key, "deleted while being inspected")
        errors = [f for f in findings if f["severity"] == "error"]
        if errors:
            codes = ", ".join(sorted({f["code"] for f in errors}))
            self.ledger.append("rejected", key, name=c.name, step=c.step, findings=errors,
                               detail=f"inspect: {codes}")
            return self._settled(c, key, self.ledger.final(key))
        if snapshot(c.path) != snap:                      # changed while inspected: wait again
            self._seen.pop(c.name, None)
            return None
        return self._evaluate(c, key, snap)

    def _inspect(self, c: Candidate) -> list[dict] | None:
        """Inspect findings as dicts; None when the folder went away meanwhile."""
        try:
            report = audit(c.path)
        except ModelkitError as e:
            if not c.path.is_dir():
                return None
            return [{"severity": "error", "code": "unreadable", "message": f"{type(e).__name__}: {e}"}]
        if not c.path.is_dir():
            return None
        return [f.to_dict() for f in report.findings]

    def _evaluate(self, c: Candidate, key: str, snap: tuple) -> Entry | None:
        job = CheckpointJob(ref=str(c.path), role="checkpoint", label=c.name, **self.job_defaults)

        def moved() -> str | None:
            now = snapshot(c.path)
            return "deleted" if now is None else "changed" if now != snap else None

        outcome = self._attempt(job, key, name=c.name, step=c.step, moved=moved)
        if outcome == "deleted":
            return self._skip_deleted(c, key, "deleted while being evaluated")
        if outcome == "changed":                          # rewritten meanwhile: a new checkpoint, wait again
            self._seen.pop(c.name, None)
            return None
        return self._settled(c, key, self.ledger.final(key))

    def _attempt(self, job: CheckpointJob, key: str, *, name: str, step: int | None,
                 moved: Callable[[], str | None]) -> str:
        """Evaluate ``job`` within the attempts left for ``key`` and record the outcome:
        "done" or "failed"; or "deleted" / "changed" (what ``moved()`` says happened to the
        files meanwhile), for which nothing is recorded: the result would not be theirs."""
        error = ""
        started = self.ledger.attempts(key)
        if started >= self.attempts:
            error = f"started {started} times without finishing (the watcher was killed during each)"
        while started < self.attempts:
            started += 1
            self.ledger.append("started", key, name=name, step=step, attempt=started)
            scratch = self.ledger.folder / "scratch" / f"{key}-{started}"
            scratch.mkdir(parents=True, exist_ok=True)
            job.scratch = str(scratch)
            t0 = time.perf_counter()
            try:
                result = self.evaluator(job)
                _check_result(result, job)
            except Exception as e:  # the evaluator's failure is recorded, the watcher goes on
                why = moved()
                if why is not None:
                    return why
                error = f"{type(e).__name__}: {e}"
                continue
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            why = moved()
            if why is not None:
                return why
            self.ledger.save_result(key, result)
            self.ledger.append("done", key, name=name, step=step, attempt=started,
                               seconds=round(time.perf_counter() - t0, 3))
            return "done"
        self.ledger.append("failed", key, name=name, step=step, attempt=started, detail=error)
        return "failed"

    def _evaluate_baseline(self) -> None:
        ref = self.baseline_ref or self._adapter_base()
        from modelkit.io.sources import fingerprint_folder, resolve

        try:
            folder = resolve(ref).folder
            fp = fingerprint_folder(folder)
        except (ModelkitError, OSError) as e:
            raise WatchError(f"cannot read the baseline {ref!r}: {e}") from None
        key = f"{self._settings_hash}-baseline-{fp}"
        if self.ledger.final(key) is None:
            job = CheckpointJob(ref=ref, role="baseline", label="baseline", **self.job_defaults)
            self._attempt(job, key, name="baseline", step=None,
                          moved=lambda: None if folder.is_dir() else "deleted")
        record = self.ledger.final(key)
        entry = Entry("baseline", None, record["event"] if record else "failed", key,
                      self.ledger.attempts(key), record.get("detail", "") if record else "deleted")
        if entry.status != "done":
            raise WatchError(f"the baseline {ref!r} could not be evaluated ({entry.detail}); nothing "
                             "to compare the checkpoints with")
        entry.result = self.ledger.load_result(key)
        self.baseline = entry
        if self.wandb is not None:
            self.wandb.baseline(self.result())

    def _adapter_base(self) -> str:
        """The base model the run's first checkpoint names (adapters: their base)."""
        from modelkit.formats.open import open_artifact

        for c in find_checkpoints(self.run_dir):
            try:
                base = open_artifact(c.path).base
            except (ModelkitError, OSError):
                continue
            if base is not None and base.path is not None:
                return str(base.path)
        raise WatchError("give the baseline (--baseline REF): the run's checkpoints name no base model "
                         "found locally", self.run_dir)

    # -- bookkeeping ------------------------------------------------------------------
    def _settled(self, c: Candidate, key: str, record: dict) -> Entry:
        same_as = record.get("name") if record.get("name") != c.name else None
        if same_as and (key, c.name) not in self._aliases:
            self.ledger.append("same", key, name=c.name, step=c.step, same_as=same_as)
            self._aliases.add((key, c.name))
        entry = Entry(c.name, c.step, record["event"], key, self.ledger.attempts(key), record.get("detail", ""),
                      record.get("findings", []), same_as)
        if entry.status == "done":
            entry.result = self.ledger.load_result(key)
        previous = self.entries.get(c.name)
        self.entries[c.name] = entry
        if previous is None or previous.key != key or previous.status != entry.status:
            if entry.status == "done" and self.wandb is not None:
                self.wandb.checkpoint(self.result(), c.name)
            if self.on_event is not None:
                self.on_event(entry)
        return entry

    def _pending(self, c: Candidate, why: str) -> None:
        if c.name not in self.entries or self.entries[c.name].status == "pending":
            self.entries[c.name] = Entry(c.name, c.step, "pending", detail=why)

    def _skip_deleted(self, c: Candidate, key: str | None, why: str) -> Entry:
        key = key or f"{self._settings_hash}-deleted-{c.name}"
        if self.ledger.final(key) is None:
            self.ledger.append("skipped", key, name=c.name, step=c.step, detail=why)
        self._seen.pop(c.name, None)
        return self._settled(c, key, self.ledger.final(key))

    def _vanished(self, name: str) -> None:
        snap, _ = self._seen.pop(name)
        entry = self.entries.get(name)
        if entry is not None and entry.status != "pending":
            return                                        # settled before rotation removed it
        c = Candidate(name, self.run_dir / name, checkpoint_step(name))
        self._skip_deleted(c, f"{self._settings_hash}-deleted-{name}-{snapshot_digest(snap)}",
                           "deleted before it was complete")

    def _queued(self) -> dict[str, str]:
        """``{checkpoint name: snapshot digest}`` the training callback queued for this run."""
        try:
            size = self.ledger.queue_path.stat().st_size
        except FileNotFoundError:
            return {}
        if self._queue[0] == size:
            return self._queue[1]
        out = {}
        for q in self.ledger.queued():
            try:
                name = Path(q["path"]).resolve().relative_to(self.run_dir.resolve()).as_posix()
            except (KeyError, ValueError, OSError):
                continue
            out[name] = q.get("snapshot")
        self._queue = (size, out)
        return out

    def result(self) -> "WatchResult":
        entries = sorted(self.entries.values(), key=lambda e: Candidate(e.name, Path(), e.step).order)
        return WatchResult(str(self.run_dir), self.tasks, self.baseline, entries, dict(self.settings),
                           str(self.ledger.folder), self.wandb_run)


def _check_result(result: Any, job: CheckpointJob) -> None:
    """An evaluator's answer must hold the model's provenance and a run per task."""
    if not isinstance(result, dict) or "model" not in result or "runs" not in result:
        raise CompareError(f"the evaluator returned {type(result).__name__}, not {{'model': ..., 'runs': ...}}")
    missing = [t for t in job.tasks if t not in result["runs"]]
    if missing:
        raise CompareError(f"the evaluator returned no run for task(s) {missing}")


# --------------------------------------------------------------------------- results

STATUS_COLUMNS = ["checkpoint", "step", "status", "attempts", "detail", "same_as"]


@dataclass
class WatchResult:
    """What a watch found: the baseline, one :class:`Entry` per checkpoint (step order).

    ``to_frame()`` one row per evaluated checkpoint, task and metric with the paired
    statistics against the baseline; ``status_frame()`` one row per checkpoint;
    ``plot()`` score vs step with CI bands; ``summary()``, ``to_json()``.
    """

    run_dir: str
    tasks: list[str]
    baseline: Entry | None
    entries: list[Entry]
    settings: dict[str, Any]
    state_dir: str
    wandb_run: str | None = None             # the W&B run's local folder (``--wandb``)
    _frame: Any = field(default=None, repr=False)

    @property
    def evaluated(self) -> list[Entry]:
        return [e for e in self.entries if e.status == "done" and e.result is not None]

    def comparison(self) -> "CompareResult | None":
        """Baseline and every evaluated checkpoint as one CompareResult (its statistics)."""
        from modelkit.ops.compare import CompareResult, ModelInfo

        if self.baseline is None or self.baseline.result is None:
            return None
        base = ModelInfo(**self.baseline.result["model"])
        models, runs = [base], {base.label: self.baseline.result["runs"]}
        for e in self.evaluated:
            m = ModelInfo(**{**e.result["model"], "label": e.name, "role": "trained"})
            models.append(m)
            runs[e.name] = e.result["runs"]
        return CompareResult(models, list(self.tasks), runs, dict(self.settings))

    def to_frame(self) -> "pd.DataFrame":
        """One row per evaluated checkpoint, task and metric: ``step``, ``checkpoint`` and
        the columns of ``CompareResult.to_frame()`` (``base`` is the baseline)."""
        import pandas as pd

        from modelkit.ops.compare import TABLE_COLUMNS

        if self._frame is None:
            cmp = self.comparison()
            frame = cmp.to_frame() if cmp is not None and len(cmp.models) > 1 else pd.DataFrame(columns=TABLE_COLUMNS)
            steps = {e.name: e.step for e in self.entries}
            frame.insert(0, "step", [steps.get(m) for m in frame["model"]])
            frame = frame.rename(columns={"model": "checkpoint"})
            self._frame = frame.reset_index(drop=True)
        return self._frame.copy()

    def status_frame(self) -> "pd.DataFrame":
        import pandas as pd

        rows = [{"checkpoint": e.name, "step": e.step, "status": e.status, "attempts": e.attempts,
                 "detail": e.detail, "same_as": e.same_as} for e in self.entries]
        return pd.DataFrame(rows, columns=STATUS_COLUMNS)

    def plot(self, path: str | Path | None = None) -> "Figure":
        """Score vs training step per task and metric, with the paired CI band."""
        from modelkit.present.watch import watch_figure

        fig = watch_figure(self.to_frame(), title=Path(self.run_dir).name)
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.entries:
            out[e.status] = out.get(e.status, 0) + 1
        return out

    @property
    def exit_code(self) -> int:
        """1 when a checkpoint failed or was rejected, else 0."""
        return 1 if any(e.status in ("failed", "rejected") for e in self.entries) else 0

    def outcome(self) -> Verdict:
        """The verdict every view opens with (the rule: :func:`modelkit.verdicts.of_watch`)."""
        return of_watch(self)

    def summary(self) -> str:
        counts = self.counts()   # the verdict (OK / PROBLEMS / NOTHING YET) is modelkit.verdicts'
        head = ((", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no checkpoint found")
                + f" — watch of {self.run_dir}; tasks {', '.join(self.tasks)}, limit {self.settings.get('limit')}")
        lines = [head, f"  state   {self.state_dir}"]
        if self.wandb_run:
            from modelkit.present.compare import wandb_run_line

            lines.append(f"  W&B run {wandb_run_line(self.wandb_run)}")
        if self.baseline is not None and self.baseline.result:
            lines.append(f"  baseline {self.baseline.result['model']['ref']} "
                         f"(fingerprint {self.baseline.result['model']['fingerprint']})")
        cmp = self.comparison()
        lines += cmp.context_lines() if cmp is not None else []
        frame = self.to_frame()
        for e in self.entries:
            what = e.status + (f" (same as {e.same_as})" if e.same_as else "") + (f": {e.detail}" if e.detail else "")
            lines.append(f"  {e.name:<28} step {'-' if e.step is None else e.step:<7} {what}")
            if e.status == "done":
                for r in frame[frame["checkpoint"] == e.name].itertuples(index=False):
                    lines.append(f"      {r.task} {r.metric}: {_num(r.trained)} vs {_num(r.base)} "
                                 f"delta {_num(r.delta, True)} {_ci(r.ci_low, r.ci_high)} {r.verdict}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        from modelkit.ops.compare import _records

        return {"run_dir": self.run_dir, "tasks": self.tasks, "settings": self.settings,
                "state_dir": self.state_dir, "wandb_run": self.wandb_run,
                "baseline": None if self.baseline is None or not self.baseline.result else self.baseline.result["model"],
                "checkpoints": [{k: v for k, v in asdict(e).items() if k != "result"} for e in self.entries],
                "table": _records(self.to_frame())}

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), default=str, **kw)


def _num(x: Any, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:+.4g}" if signed else f"{x:.4g}"


def _ci(lo: Any, hi: Any) -> str:
    return "" if lo is None or (isinstance(lo, float) and math.isnan(lo)) else f"[{lo:+.3g}, {hi:+.3g}]"


# --------------------------------------------------------------------------- entry point


def watch(run_dir: str | Path, tasks: str | Sequence[str], baseline: str | Path | None = None, *,
          once: bool = False, interval: float = INTERVAL_SECONDS, settle: float = SETTLE_SECONDS,
          timeout: float | None = None, quiet: bool = True, **options: Any) -> WatchResult:
    """Watch ``run_dir`` and evaluate each new complete checkpoint against ``baseline``
    (see :class:`Watcher` for ``options``: ``limit``, ``num_fewshot``, ``batch_size``,
    ``include_path``, ``options`` (load options), ``state_dir``, ``attempts``, ``evaluator``,
    ``on_event``, ``wandb``). ``once``: evaluate what is there, then return; otherwise
    poll every ``interval`` seconds until Ctrl-C or ``timeout``. ``quiet``: what the
    libraries print while evaluating is captured, not shown."""
    watcher = Watcher(run_dir, tasks, baseline, settle=settle, interval=interval, quiet=quiet, **options)
    try:
        return watcher.run(once=once, timeout=timeout)
    except KeyboardInterrupt:
        return watcher.result()
