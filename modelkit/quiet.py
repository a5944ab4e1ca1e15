"""Quiet output: what libraries print while modelkit works (lm-eval's progress bars and
INFO logs, transformers' warnings, ``fatal: not a git repository`` from a subprocess) goes
into a :class:`CapturedLog` instead of the notebook, the panel or the shared report.

``with captured() as log: ...`` captures, for the duration of the block, what the code
running in the block writes to Python's ``sys.stdout``/``sys.stderr``, through every
logging ``StreamHandler`` writing to them, and as warnings (shown on ``sys.stderr``); plus the process's file
descriptor 2 (subprocesses such as ``git``). modelkit's own progress bars (``tqdm.auto``
widgets in a kernel) are displayed, not printed, so they stay visible. A log displays as
a collapsed "log (N lines)" disclosure in HTML.

The capture belongs to the block's context (a :mod:`contextvars` variable), not to the
process: while a panel's worker thread exports with its output captured, a cell run
meanwhile in the kernel's own thread prints to its cell as usual. The streams are
replaced, while any capture is active, by routers that write to the capture of the
writing context, if any, and else where they wrote before. Threads a library starts
inside the block begin with an empty context: what they print is not captured. File
descriptor 2 cannot be told apart by thread: while a capture is active, what any
subprocess of the process writes to stderr goes into every active capture's log.
"""
from __future__ import annotations

import contextlib
import contextvars
import html
import io
import logging
import os
import sys
import tempfile
import threading
from typing import Iterator


class CapturedLog:
    """Text captured by :func:`captured` (``text``); renders collapsed in HTML."""

    def __init__(self) -> None:
        self.text = ""

    @property
    def lines(self) -> list[str]:
        return [line for line in self.text.splitlines() if line.strip()]

    def html(self) -> str:
        if not self.lines:
            return ""
        return (f"<details class='mk-log'><summary style='color:#666;font-size:12px'>log ({len(self.lines)} "
                f"line{'s' if len(self.lines) != 1 else ''} from the libraries)</summary>"
                f"<pre style='font-size:11px;max-height:300px;overflow:auto;white-space:pre-wrap'>"
                f"{html.escape(self.text)}</pre></details>")

    def _repr_html_(self) -> str:
        return self.html() or "<span></span>"

    def __repr__(self) -> str:
        return f"<log: {len(self.lines)} lines>"



def _stream_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger()] + [l for l in logging.root.manager.loggerDict.values()
                                       if isinstance(l, logging.Logger)]
    std = {id(sys.stdout), id(sys.stderr), id(sys.__stdout__), id(sys.__stderr__)}
    return [h for lg in loggers for h in lg.handlers
            if type(h) is logging.StreamHandler and id(getattr(h, "stream", None)) in std]


_CAPTURE: contextvars.ContextVar[io.StringIO | None] = contextvars.ContextVar("modelkit_capture", default=None)


class _Router:
    """A stream that writes to the current context's capture, else to ``target``
    (other attributes: those of the stream written to)."""

    def __init__(self, target) -> None:
        self.target = target

    def _stream(self):
        buf = _CAPTURE.get()
        return buf if buf is not None else self.target

    def write(self, text: str) -> int:
        return self._stream().write(text)

    def flush(self) -> None:
        self._stream().flush()

    def __getattr__(self, name: str):
        return getattr(self._stream(), name)


class _Routing:
    """The routers, in place while at least one capture is active (reference counted:
    captures in several threads begin and end in any order)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0
        self.placed: list[tuple[object, str, _Router]] = []   # (owner, attribute, router)
        self.fd2: tuple[int, object] | None = None            # saved fd 2, the file it points at

    def enter(self, fd: bool) -> int | None:
        """Put the routers in place (first capture); the fd-2 file's offset, when ``fd``."""
        with self.lock:
            if self.users == 0:
                self._place()
            self.users += 1
            if not fd:
                return None
            if self.fd2 is None:
                self._redirect_fd2()
            return os.lseek(self.fd2[1].fileno(), 0, os.SEEK_END) if self.fd2 is not None else None

    def exit(self, offset: int | None) -> str:
        """What fd 2 received since ``offset``; the routers are removed by the last capture."""
        with self.lock:
            text = ""
            if offset is not None and self.fd2 is not None:
                _flush_stderr()
                tmp = self.fd2[1]
                end = os.lseek(tmp.fileno(), 0, os.SEEK_END)
                text = os.pread(tmp.fileno(), end - offset, offset).decode("utf-8", "replace")
            self.users -= 1
            if self.users == 0:
                self._restore()
            return text

    def _place(self) -> None:
        for h in _stream_handlers():
            router = _Router(h.stream)
            h.setStream(router)
            self.placed.append((h, "stream", router))
        for name in ("stdout", "stderr"):
            router = _Router(getattr(sys, name))
            setattr(sys, name, router)
            self.placed.append((sys, name, router))

    def _restore(self) -> None:
        for owner, name, router in reversed(self.placed):
            if getattr(owner, name, None) is router:      # else replaced since: leave it
                if isinstance(owner, logging.StreamHandler):
                    owner.setStream(router.target)
                else:
                    setattr(owner, name, router.target)
        self.placed = []
        if self.fd2 is not None:
            saved, tmp = self.fd2
            _flush_stderr()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.close()
            self.fd2 = None

    def _redirect_fd2(self) -> None:
        try:
            saved = os.dup(2)
        except OSError:   # no fd 2 (some embedded interpreters): nothing to capture
            return
        tmp = tempfile.TemporaryFile(mode="w+b")
        _flush_stderr()
        os.dup2(tmp.fileno(), 2)
        self.fd2 = (saved, tmp)


def _flush_stderr() -> None:
    try:
        sys.__stderr__.flush()
    except (AttributeError, ValueError, OSError):
        pass


_ROUTING = _Routing()


@contextlib.contextmanager
def captured(fd: bool = True) -> Iterator[CapturedLog]:
    """Capture what the block prints, logs and warns (and, with ``fd``, what subprocesses
    write to stderr meanwhile); the log's ``text`` is filled on exit."""
    log, buf = CapturedLog(), io.StringIO()
    token = _CAPTURE.set(buf)
    offset = _ROUTING.enter(fd)
    fd_text = ""
    try:
        yield log
    finally:
        try:
            fd_text = _ROUTING.exit(offset)
        finally:
            _CAPTURE.reset(token)
            log.text = buf.getvalue() + fd_text
