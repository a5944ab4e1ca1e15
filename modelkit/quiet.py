"""Quiet output: what libraries print while modelkit works (lm-eval's progress bars and
INFO logs, transformers' warnings, ``fatal: not a git repository`` from a subprocess) goes
into a :class:`CapturedLog` instead of the notebook, the panel or the shared report.

``with captured() as log: ...`` redirects, for the duration of the block: Python's
``sys.stdout``/``sys.stderr``, every logging ``StreamHandler`` writing to them, the
process's file descriptor 2 (subprocesses) and warnings. modelkit's own progress bars
(``tqdm.auto`` widgets in a kernel) are displayed, not printed, so they stay visible.
A log displays as a collapsed "log (N lines)" disclosure in HTML.
"""
from __future__ import annotations

import contextlib
import html
import io
import logging
import os
import sys
import tempfile
import warnings
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


@contextlib.contextmanager
def _fd2_into(buf: io.StringIO) -> Iterator[None]:
    """File descriptor 2 into ``buf`` (what a subprocess such as git writes to stderr)."""
    try:
        saved = os.dup(2)
    except OSError:   # no fd 2 (some embedded interpreters): nothing to capture
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        try:
            sys.stderr.flush()
        except (AttributeError, ValueError, OSError):
            pass
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            buf.write(tmp.read().decode("utf-8", "replace"))


@contextlib.contextmanager
def captured(fd: bool = True) -> Iterator[CapturedLog]:
    """Capture library output for the block; the log's ``text`` is filled on exit."""
    log, buf = CapturedLog(), io.StringIO()
    handlers = _stream_handlers()
    streams = [h.stream for h in handlers]
    for h in handlers:
        h.setStream(buf)
    try:
        with warnings.catch_warnings(record=True) as caught, \
                contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf), \
                (_fd2_into(buf) if fd else contextlib.nullcontext()):
            warnings.simplefilter("default")
            yield log
    finally:
        for h, s in zip(handlers, streams):
            h.setStream(s)
        for w in locals().get("caught") or []:
            buf.write(warnings.formatwarning(w.message, w.category, w.filename, w.lineno))
        log.text = buf.getvalue()
