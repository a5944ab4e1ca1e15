"""Progress of long operations, one bar per phase, and cooperative cancellation.

An operation says what it is doing and how far it is, never how that is shown::

    with phase("write", total=len(names), unit="tensors") as bar:
        for name in names:
            ...
            bar.update(1, note=f"shard {i}/{n}")

Who shows it is the caller's choice: by default a tqdm bar (stderr in a terminal, a
widget in a notebook), off with ``show=False``; a panel installs its own display and a
cancel event with :func:`reporting`. Every :meth:`Phase.update` (and
:func:`check_cancelled`) raises :class:`~modelkit.errors.Cancelled` once the event is
set, so a cancelled operation stops at its next step and unwinds like after any other
error (an export's temporary folder is removed, OUT is never created).

The display and the event live in a context variable: a panel's worker thread installs
them for itself, and other threads (the notebook's own cells) are not affected.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

from modelkit.errors import Cancelled
from modelkit.units import human_count


@dataclass
class Phase:
    """One step of an operation: ``done`` of ``total`` ``unit`` (total None: unknown)
    and a short ``note`` (e.g. the shard being written)."""

    name: str
    total: float | None = None
    unit: str = ""
    done: float = 0
    note: str = ""
    state: str = "running"          # running / done / failed / cancelled
    started: float = field(default_factory=time.perf_counter)
    _display: Any = field(default=None, repr=False)

    def update(self, n: float = 1, note: str | None = None, *, check: bool = True) -> None:
        """``n`` more units done; raises Cancelled when the user cancelled (unless
        ``check`` is False: inside a library that must not see the exception)."""
        if check:
            check_cancelled()
        self.done += n
        if note is not None:
            self.note = note
        if self._display is not None:
            self._display.update(self)

    @property
    def fraction(self) -> float | None:
        return min(1.0, self.done / self.total) if self.total else None

    def text(self) -> str:
        """``"write: 12/21 tensors · shard 1/2"`` (sizes and counts by :mod:`modelkit.units`)."""
        amount = human_count(self.done, self.unit)
        if self.total is not None:
            amount = f"{human_count(self.done)}/{human_count(self.total, self.unit)}" if self.unit != "B" \
                else f"{human_count(self.done, 'B')} of {human_count(self.total, 'B')}"
        return f"{self.name}: {amount}" + (f" · {self.note}" if self.note else "")


class Display(Protocol):
    """What shows phases (a tqdm bar, a panel's bars)."""

    def start(self, phase: Phase) -> None: ...
    def update(self, phase: Phase) -> None: ...
    def close(self, phase: Phase) -> None: ...


class TqdmDisplay:
    """The default display: one tqdm bar per phase, counts in the kit's units, left at
    its final state (100 % when the phase completed)."""

    # seconds between two redraws: in a terminal or a notebook widget every update is drawn
    # (a step's new note shows at once, however long the step then takes); into a log file
    # (stderr not a terminal: a batch job, CI) at most one per 10 s, so that a loop over
    # thousands of tensors writes a few lines, not thousands (the final state always)
    INTERVAL, LOG_INTERVAL = 0.0, 10.0

    def __init__(self) -> None:
        self._bars: dict[int, Any] = {}
        self._drawn: dict[int, float] = {}

    def start(self, phase: Phase) -> None:
        from tqdm.auto import tqdm

        bar = tqdm(total=phase.total, desc=phase.name, leave=True, dynamic_ncols=True,
                   bar_format=self._format(phase))
        self._bars[id(phase)], self._drawn[id(phase)] = bar, time.monotonic()
        widget = getattr(bar, "container", None) is not None   # tqdm.notebook: its fp is the kernel's stdout
        self._interval = self.INTERVAL if widget or _isatty(getattr(bar, "fp", None)) else self.LOG_INTERVAL

    @staticmethod
    def _format(phase: Phase) -> str:
        """tqdm's layout around the kit's own text (tqdm's units would say 169kB for 164.6 KB)."""
        text = phase.text().partition(": ")[2].replace("{", "{{").replace("}", "}}")
        return ("{desc}: {percentage:3.0f}%|{bar}| " if phase.total else "{desc}: ") + text + " [{elapsed}]"

    def update(self, phase: Phase) -> None:
        bar = self._bars.get(id(phase))
        now = time.monotonic()
        if bar is not None and now - self._drawn.get(id(phase), 0.0) >= self._interval:
            bar.bar_format = self._format(phase)
            bar.n = phase.done
            bar.refresh()
            self._drawn[id(phase)] = now

    def close(self, phase: Phase) -> None:
        bar = self._bars.pop(id(phase), None)
        self._drawn.pop(id(phase), None)
        if bar is not None:   # tqdm's close draws the final state, however recent the last redraw
            bar.bar_format = self._format(phase)
            bar.n = phase.done
            bar.close()


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, OSError, ValueError):   # no stream, or closed or detached
        return False


_REPORTING: contextvars.ContextVar[tuple[Display | None, threading.Event | None]] = \
    contextvars.ContextVar("modelkit_progress", default=(None, None))


@contextlib.contextmanager
def reporting(display: Display | None = None, cancel: threading.Event | None = None) -> Iterator[None]:
    """Show the phases started in this block on ``display`` (instead of tqdm), and stop
    them with Cancelled once ``cancel`` is set."""
    token = _REPORTING.set((display, cancel))
    try:
        yield
    finally:
        _REPORTING.reset(token)


def check_cancelled() -> None:
    """Raise Cancelled when the caller's cancel event is set."""
    event = _REPORTING.get()[1]
    if event is not None and event.is_set():
        raise Cancelled("cancelled by the user; nothing was kept from this run")


@contextlib.contextmanager
def phase(name: str, total: float | None = None, unit: str = "", *, show: bool = True) -> Iterator[Phase]:
    """A phase of the running operation, shown on the installed display (or a tqdm bar
    when ``show``); completed phases end at their total."""
    check_cancelled()
    installed = _REPORTING.get()[0]
    display = installed if installed is not None else (TqdmDisplay() if show else None)
    p = Phase(name, total, unit, _display=display)
    if display is not None:
        display.start(p)
    try:
        yield p
    except Cancelled:
        p.state = "cancelled"
        raise
    except BaseException:
        p.state = "failed"
        raise
    else:
        p.state = "done"
        if p.total is not None:
            p.done = p.total
    finally:
        if display is not None:
            display.close(p)
