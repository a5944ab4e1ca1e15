"""A ``transformers.TrainerCallback`` that audits every checkpoint as the Trainer saves it.

The seeds' trainers saved incomplete or empty checkpoints for days before anyone looked:
adapters with no tensors or never trained, mixtures without their router, saves that
dropped whole layers, buffers stored once per expert. :class:`AuditCallback` runs
``inspect`` (the same findings) on each ``checkpoint-N/`` right after it is written and
either stops the run at once (``on_error="raise"``, the default) or logs the findings and
goes on (``on_error="log"``). With ``queue=True`` it also tells a ``modelkit watch`` of the
same run that the save is finished, so the watcher evaluates it without waiting for the
files to settle.

Imports only transformers and modelkit's core (no widgets, no plotting)::

    trainer = Trainer(..., callbacks=[AuditCallback()])
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from modelkit.errors import ModelkitError
from modelkit.findings import Severity

logger = logging.getLogger("modelkit.ops.watch_callback")


class CheckpointAuditError(ModelkitError):
    """A checkpoint the Trainer just saved has error findings (the run is stopped)."""


class AuditCallback(TrainerCallback):
    """Inspect each saved checkpoint; raise or log on findings (see module docstring).

    ``base``: the base model of an adapter run when the adapter's config does not name a
    local one. ``deep``: read tensor data too (catches all-zero LoRA B, the untrained
    adapter); ``None`` reads it when the checkpoint's weights are small (adapters), not
    for full models. ``fail_on``: ``"error"`` (default) or ``"warning"`` (also stop on
    warnings such as duplicated buffers). ``queue``: True (the watcher's default state
    folder for this run) or a state folder given to ``modelkit watch --state``.
    ``reports`` maps each saved step to its InspectionReport.
    """

    def __init__(self, on_error: str = "raise", *, base: str | Path | None = None, deep: bool | None = None,
                 fail_on: str = "error", queue: bool | str | Path = False):
        if on_error not in ("raise", "log"):
            raise ValueError(f"on_error must be 'raise' or 'log', not {on_error!r}")
        if fail_on not in ("error", "warning"):
            raise ValueError(f"fail_on must be 'error' or 'warning', not {fail_on!r}")
        self.on_error, self.base, self.deep, self.fail_on, self.queue = on_error, base, deep, fail_on, queue
        self.reports: dict[int, Any] = {}

    def on_save(self, args, state, control, **kwargs):
        from modelkit.ops.watch import audit

        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not folder.is_dir():          # saved elsewhere (hyper-parameter search trial folders)
            logger.warning("modelkit audit: no %s after the save; not checked", folder)
            return control
        report = audit(folder, base=self.base, deep=self.deep)
        self.reports[state.global_step] = report
        severities = {Severity.ERROR} | ({Severity.WARNING} if self.fail_on == "warning" else set())
        bad = [f for f in report.findings if f.severity in severities]
        if bad:
            lines = "; ".join(f"{f.code}: {f.message}" for f in bad)
            message = f"the checkpoint saved at step {state.global_step} is not sound: {lines}"
            if self.on_error == "raise":
                raise CheckpointAuditError(message + ". Training stopped (AuditCallback(on_error='log') "
                                           "logs instead)", folder)
            logger.warning("modelkit audit: %s (%s)", message, folder)
        elif report.warnings:
            logger.warning("modelkit audit of %s: %s", folder,
                           "; ".join(f"{f.code}: {f.message}" for f in report.warnings))
        if self.queue:
            self._enqueue(folder, state.global_step, report, args.output_dir)
        return control

    def _enqueue(self, folder: Path, step: int, report: Any, run_dir: str) -> None:
        from modelkit.ops.watch import snapshot, snapshot_digest
        from modelkit.ops.watch_ledger import append_jsonl, default_state_dir

        state = Path(self.queue) if not isinstance(self.queue, bool) else default_state_dir(run_dir)
        state.mkdir(parents=True, exist_ok=True)
        append_jsonl(state / "queue.jsonl", {"path": str(folder.resolve()), "step": step, "time": time.time(),
                                             "snapshot": snapshot_digest(snapshot(folder)),
                                             "codes": sorted(report.codes)})
