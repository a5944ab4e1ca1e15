"""What every benchmark reports: figures with their baseline from the same run, a target and
whether it was met; shared by the ``bench_*.py`` scripts and ``run_all.py``.

A benchmark builds a list of :class:`Figure` and ends with ``sys.exit(finish(NAME, figures))``:
its own table is printed, the figures go to the JSON file named by ``$MODELKIT_BENCH_JSON``
(set by the runner), and the exit status is 1 when any target was missed. Correctness checks
("outputs agree with the baseline's") are figures too, so a wrong answer is a miss.

``$MODELKIT_BENCH_QUICK=1`` (``run_all.py --quick``) asks for small sizes: a smoke test of the
machinery, whose timings mean nothing.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

QUICK_ENV = "MODELKIT_BENCH_QUICK"
JSON_ENV = "MODELKIT_BENCH_JSON"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (the machine may be shared: say how busy it was)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def quick() -> bool:
    """Whether this run is the small smoke-test size."""
    return os.environ.get(QUICK_ENV, "").strip().lower() not in ("", "0", "false", "no")


@dataclass
class Figure:
    """One measured figure. ``met`` is None for figures shown for information only."""

    name: str
    value: float | None
    unit: str = ""
    baseline: str = ""                 # what it is compared with (measured in the same run)
    baseline_value: float | None = None
    ratio: float | None = None         # value / baseline_value, or a ratio the target is on
    target: str = ""                   # e.g. "<= 0.3 s", "ratio <= 0.33"
    met: bool | None = None
    note: str = ""
    bench: str = ""

    def row(self) -> list[str]:
        return [self.name, _num(self.value, self.unit),
                (f"{self.baseline} {_num(self.baseline_value, self.unit)}".strip() if self.baseline else ""),
                "" if self.ratio is None else f"{self.ratio:.3g}", self.target,
                {True: "met", False: "MISSED", None: ""}[self.met]]


def _num(v, unit: str) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    text = f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return f"{text} {unit}".strip()


def at_most(name: str, value: float, limit: float, unit: str = "", *, baseline: str = "",
            baseline_value: float | None = None, on_ratio: bool = False, note: str = "") -> Figure:
    """A figure whose target is ``value <= limit`` (``on_ratio``: value / baseline <= limit)."""
    ratio = value / baseline_value if baseline_value else None
    x = ratio if on_ratio else value
    return Figure(name, value, unit, baseline, baseline_value, ratio,
                  f"{'ratio ' if on_ratio else ''}<= {limit:.3g}{'' if on_ratio else ' ' + unit}".strip(),
                  x is not None and x <= limit, note)


def at_least(name: str, value: float, limit: float, unit: str = "", *, baseline: str = "",
             baseline_value: float | None = None, on_ratio: bool = False, note: str = "") -> Figure:
    """A figure whose target is ``value >= limit`` (``on_ratio``: value / baseline >= limit)."""
    ratio = value / baseline_value if baseline_value else None
    x = ratio if on_ratio else value
    return Figure(name, value, unit, baseline, baseline_value, ratio,
                  f"{'ratio ' if on_ratio else ''}>= {limit:.3g}{'' if on_ratio else ' ' + unit}".strip(),
                  x is not None and x >= limit, note)


def agrees(name: str, ok: bool, note: str = "", target: str = "outputs agree") -> Figure:
    """A correctness check (by default: the outputs agree with the baseline's)."""
    return Figure(name, None, "", target=target, met=bool(ok), note=note)


def info(name: str, value: float | None, unit: str = "", *, baseline: str = "",
         baseline_value: float | None = None, note: str = "") -> Figure:
    """A figure shown without a target."""
    ratio = value / baseline_value if (baseline_value and value is not None) else None
    return Figure(name, value, unit, baseline, baseline_value, ratio, note=note)


HEADER = ["figure", "value", "baseline (same run)", "ratio", "target", "met?"]


def table(figures: list[Figure], with_bench: bool = False) -> str:
    """A Markdown table of ``figures`` (notes listed under it)."""
    head = (["benchmark"] if with_bench else []) + HEADER
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for f in figures:
        lines.append("| " + " | ".join(([f.bench] if with_bench else []) + f.row()) + " |")
    notes = [f"- {f.name}: {f.note}" for f in figures if f.note]
    return "\n".join(lines + ([""] + notes if notes else []))


def finish(bench: str, figures: list[Figure]) -> int:
    """Print the table, write the JSON the runner reads, return the exit status."""
    for f in figures:
        f.bench = bench
    print(f"\n{bench}{' (quick mode: sizes too small for the timings to mean anything)' if quick() else ''}")
    print(table(figures))
    out = os.environ.get(JSON_ENV)
    if out:
        Path(out).write_text(json.dumps({"bench": bench, "quick": quick(),
                                         "figures": [asdict(f) for f in figures]}, indent=1))
    return 1 if any(f.met is False for f in figures) else 0
