"""One verdict per result: the line every view opens with, and the exit code that follows it.

The CLI, the panels, ``modelkit report`` and its index page all read a result's outcome
from here, so "what happened" is decided in one place:

=================  =========================================  =========
result             verdict                                    exit code
=================  =========================================  =========
InspectionReport   OK / WARNINGS / ERRORS                     0 / 0 / 1
ExportResult       EXPORTED (verified) / EXPORTED / FAILED    0 / 0 / 1
DiffResult         IDENTICAL / DIFFERENT / INCOMPLETE         0 / 1 / 2
CompareResult      BETTER / WORSE / MIXED / NO CHANGE         0 / 1 / 1 / 0
WatchResult        OK / PROBLEMS / NOTHING YET                0 / 1 / 0
=================  =========================================  =========

A diff exits like ``diff(1)`` (0 same, 1 different, 2 could not tell); a comparison exits
1 when any trained model got significantly worse on any metric (a regression gate); a
watch exits 1 when a checkpoint was rejected (``inspect`` found an error) or failed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

LEVELS = ("ok", "warning", "error", "neutral")


@dataclass(frozen=True)
class Verdict:
    """``label`` (upper case word), ``level`` (ok / warning / error / neutral: the colour),
    ``detail`` (one line saying why) and the ``exit_code`` a batch run returns."""

    label: str
    level: str
    detail: str
    exit_code: int

    def line(self) -> str:
        return f"{self.label}: {self.detail}" if self.detail else self.label

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def verdict_of(result: Any) -> Verdict:
    """The verdict of an inspect, export, diff, compare or watch result: each result class
    says its own through ``outcome()``, which applies one of the ``of_*`` rules below."""
    if not callable(getattr(result, "outcome", None)):
        raise TypeError(f"no verdict for a {type(result).__name__}")
    return result.outcome()


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def of_inspection(r: Any) -> Verdict:
    """An InspectionReport's verdict: its worst finding."""
    what = f"{r.format} ({r.layout_label or r.layout}), {_plural(len(r.tensors), 'tensor')}"
    if r.errors:
        codes = ", ".join(sorted({f.code for f in r.errors}))
        return Verdict("ERRORS", "error", f"{codes} — {what}", 1)
    if r.warnings:
        codes = ", ".join(sorted({f.code for f in r.warnings}))
        return Verdict("WARNINGS", "warning", f"{codes} — {what}", 0)
    return Verdict("OK", "ok", f"no findings — {what}", 0)


def of_export(r: Any) -> Verdict:
    """An ExportResult's verdict: written, and whether the logits were checked."""
    parts = r.experts or [r]
    n = sum(p.tensors for p in parts)
    where = f"{_plural(len(parts), 'folder')}, {_plural(n, 'tensor')}"
    if not r.ok:
        return Verdict("FAILED", "error", "verification failed: logits differ from the source; nothing written", 1)
    if not r.written:
        return Verdict("NOT WRITTEN", "error", "nothing was written", 1)
    checked = [p.verification for p in parts if p.verification]
    if checked and len(checked) == len(parts):
        worst = max(v.get("max_abs_diff", 0.0) or 0.0 for v in checked)
        return Verdict("EXPORTED", "ok", f"{where}; verified: logits match the source "
                                         f"(max |diff| {worst:.2g})", 0)
    return Verdict("EXPORTED", "warning", f"{where}; logits not checked (verify was off)", 0)


def of_diff(r: Any) -> Verdict:
    """A DiffResult's verdict, exiting like ``diff(1)``."""
    n = len(r.rows)
    if r.verdict == "identical" and r.parts:
        return Verdict("IDENTICAL", "warning", f"none of the {_plural(len(r.parts), 'expert')} changes "
                                               "anything: each expert's view equals the other side", 0)
    if r.verdict == "identical":
        return Verdict("IDENTICAL", "ok", f"all {_plural(n, 'tensor')} equal", 0)
    if r.verdict == "incomplete":
        why = (f"{r.unreadable} tensor(s) or file(s) unreadable" if r.unreadable
               else "nothing to compare")
        return Verdict("INCOMPLETE", "warning", f"no difference seen, but {why}", 2)
    if r.parts:   # a mixture: one dense view per expert
        moving = [label for label, v in r.by_expert().set_index("part").verdict.items()
                  if label in r.parts and v == "changed"]
        return Verdict("DIFFERENT", "neutral", f"{len(moving)} of {_plural(len(r.parts), 'expert')} differ "
                                               f"({', '.join(moving)}), {len(r.changed)} tensors in all", 1)
    return Verdict("DIFFERENT", "neutral", f"{len(r.changed)} of {_plural(n, 'tensor')} changed, "
                                           f"overall ||B-A||/||A|| {r.overall_rel_change:.3g}", 1)


def of_compare(r: Any) -> Verdict:
    """A CompareResult's verdict: any significantly worse row fails the gate."""
    frame = r.to_frame()
    verdicts = list(frame["verdict"]) if len(frame) else []
    better = sum(v == "better" for v in verdicts)
    worse = sum(v == "worse" for v in verdicts)
    detail = f"{better} better, {worse} worse, {len(verdicts) - better - worse} no significant change (task × metric rows)"
    cut = r.truncated() if callable(getattr(r, "truncated", None)) else []
    if cut:  # the scores stand, but some measure prompts cut to fit a model's context
        detail += "; prompts cut to fit the context: " + ", ".join(f"{leaf} [{label}] {c['truncated']}/{c['of']}"
                                                                   for label, leaf, c in cut)
    if worse and better:
        return Verdict("MIXED", "warning", detail, 1)
    if worse:
        return Verdict("WORSE", "error", detail, 1)
    if better:
        return Verdict("BETTER", "warning" if cut else "ok", detail, 0)
    return Verdict("NO CHANGE", "warning" if cut else "neutral", detail, 0)


def of_watch(r: Any) -> Verdict:
    """A WatchResult's verdict: a rejected or failed checkpoint fails it."""
    counts = r.counts()
    tally = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no checkpoint found"
    bad = [e.name for e in r.entries if e.status in ("failed", "rejected")]
    if bad:
        return Verdict("PROBLEMS", "error", f"{tally} — not evaluated: {', '.join(bad)}", 1)
    if not r.evaluated:
        return Verdict("NOTHING YET", "neutral", tally, 0)
    latest = r.evaluated[-1]
    frame = r.to_frame()
    verdicts = list(frame[frame["checkpoint"] == latest.name]["verdict"])
    better, worse = verdicts.count("better"), verdicts.count("worse")
    return Verdict("OK", "warning" if worse else "ok",
                   f"{tally}; latest {latest.name} vs the baseline: {better} better, {worse} worse, "
                   f"{len(verdicts) - better - worse} no significant change (task × metric rows)", 0)
