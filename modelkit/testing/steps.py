"""Hold a running operation at a chosen progress step, so that a test's Cancel (or any
other action) lands exactly there, on a machine of any speed::

    with held_at("write", until=panel.runner.cancel_event) as reached:
        panel.button.click()                       # the export starts in its worker thread
        assert reached.wait(120)                   # it is at its first 'write' step, waiting
        panel.runner.cancel_button.click()         # sets the event: the step goes on, and raises Cancelled

Timing a Cancel with sleeps cannot do this: a fast machine finishes the phase before the
click, a loaded one may not have begun it.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

from modelkit import progress


@contextlib.contextmanager
def held_at(name: str, until: threading.Event, *, after: int = 0, timeout: float = 120.0) -> Iterator[threading.Event]:
    """While in the block, the progress step number ``after`` (0: the first) of the first
    phase whose name starts with ``name`` waits for ``until`` (at most ``timeout`` seconds)
    before it goes on; the yielded event is set once a step waits there."""
    reached = threading.Event()
    real = progress.Phase.update
    seen = [0]

    def update(self: progress.Phase, *args, **kwargs) -> None:
        if not reached.is_set() and self.name.startswith(name):
            seen[0] += 1
            if seen[0] > after:
                reached.set()
                until.wait(timeout)
        real(self, *args, **kwargs)

    progress.Phase.update = update
    try:
        yield reached
    finally:
        progress.Phase.update = real
