"""Shared widget bits: a run button that shows its verdict, progress (one bar per phase,
see :mod:`modelkit.progress`), a Cancel button, errors (one line, details collapsed), a
collapsed library log and timing, and helpers that put tables, figures and text into
``Output`` areas.

Results are written with ``Output.outputs`` directly (not ``with out: display(...)``), so
what a click displays is the same in JupyterLab, in papermill's saved widget state and in
a plain pytest process without a kernel.
"""
from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import threading
import time
import traceback
from typing import Any, Callable, Iterator, Mapping

import ipywidgets as widgets

from modelkit.errors import Cancelled, ModelkitError

TEXT_WIDTH = 300   # characters of a table cell shown before "..."
LINE_WIDTH = 220   # characters of an error message shown on its line (all of it: under "details")


class InvalidInput(ModelkitError):
    """A panel's fields cannot be turned into a call (shown without a traceback)."""


def mime_bundle(obj: Any) -> dict[str, Any]:
    """A display_data output for ``obj``: DataFrames as HTML tables, matplotlib Figures as
    PNG, anything with ``_repr_html_`` as HTML, the rest as text."""
    import pandas as pd
    from matplotlib.figure import Figure

    if isinstance(obj, Figure):
        buf = io.BytesIO()
        obj.savefig(buf, format="png", dpi=90, bbox_inches="tight")
        data = {"image/png": base64.b64encode(buf.getvalue()).decode("ascii"),
                "text/plain": f"<Figure {obj.get_figwidth():g}x{obj.get_figheight():g} in>"}
    elif isinstance(obj, pd.DataFrame):
        with pd.option_context("display.max_colwidth", TEXT_WIDTH):   # findings' messages in full
            data = {"text/html": obj._repr_html_(), "text/plain": repr(obj)}
    elif hasattr(obj, "_repr_html_") and obj._repr_html_() is not None:
        data = {"text/html": obj._repr_html_(), "text/plain": repr(obj)}
    else:
        data = {"text/plain": repr(obj)}
    return {"output_type": "display_data", "data": data, "metadata": {}}


def show(out: widgets.Output, *objects: Any) -> None:
    """Replace what ``out`` shows with ``objects`` (str as text, others via :func:`mime_bundle`)."""
    outputs = []
    for obj in objects:
        if obj is None:
            continue
        if isinstance(obj, str) and not hasattr(obj, "_repr_html_"):
            outputs.append({"output_type": "stream", "name": "stdout",
                            "text": obj if obj.endswith("\n") else obj + "\n"})
        else:
            outputs.append(mime_bundle(obj))
    out.outputs = tuple(outputs)


def output_text(out: widgets.Widget) -> str:
    """Everything a widget shows, as text (HTML and plain text included; containers
    recursively, HTML widgets by value): for tests and logs."""
    if isinstance(out, widgets.Output):
        parts = []
        for o in out.outputs:
            if o.get("output_type") == "stream":
                parts.append(o.get("text", ""))
            else:
                data = o.get("data", {})
                parts.append(data.get("text/html") or data.get("text/plain", ""))
        return "\n".join(parts)
    if isinstance(out, (widgets.HTML, widgets.Label)):
        return out.value
    return "\n".join(output_text(c) for c in getattr(out, "children", ()))


HINTS = {  # what to do about each kind of error (the message says what is wrong)
    "RefNotFoundError": "Check the path, or give wandb:entity/project/name:vN, or hf:org/name "
                        "for a model in the local Hugging Face cache.",
    "UnknownFormatError": "Point at the folder holding the checkpoint's config and weight files.",
    "ConfigError": "Fix or restore the named config file (valid JSON of the model's config).",
    "CorruptFileError": "The file is damaged or truncated: copy or download it again.",
    "UnsafePickleError": "Not loaded on purpose: convert it to safetensors where you trust its origin.",
    "UnsafePathError": "A link or index entry points outside the artifact: copy the real files in.",
    "BaseModelUnavailableError": "Give the base model's folder or ref in the 'base' field.",
    "OutputExistsError": "Choose another output folder, or tick 'replace'.",
    "CompareError": "Check the task names (lm-eval tasks, or YAMLs in 'task dir') and the models.",
    "FactError": "Correct the value in the facts / options field (lora_alpha=NUMBER, lora_r=INTEGER), "
                 "or leave it out.",
    "MissingFactError": "Give the value the run was trained with in the facts / options field "
                        "(e.g. lora_alpha=16), or --lora-alpha on the CLI.",
    "UnknownOptionError": "Remove it, or use one of the options the message lists.",
    "LoadError": "Inspect the artifact (deep) to see what it lacks.",
    "Cancelled": "Nothing was kept from this run: the out folder is as it was before (absent, or the "
                 "previous export when replacing), and no temporary files are left.",
}
UNTRAINED_HINT = "Tick 'allow untrained' to use it anyway (its scores would be the base model's)."


def hint_for(exc: BaseException) -> str:
    """What the user can do about ``exc``: its own ``hint`` if it has one, else by class."""
    own = getattr(exc, "hint", None)
    if isinstance(own, str) and own:
        return own
    if "allow_untrained" in str(exc):
        return UNTRAINED_HINT
    if str(getattr(exc, "path", "") or "").startswith(("wandb:", "hf:")):   # its message says how
        return ""
    for cls in type(exc).__mro__:
        if cls.__name__ in HINTS:
            return HINTS[cls.__name__]
    if isinstance(exc, KeyboardInterrupt):
        return "Interrupted: nothing was kept from this run."
    if not isinstance(exc, ModelkitError):
        return "This looks like a bug in modelkit or a library: the details below help a bug report."
    return ""


def error_line(exc: BaseException) -> str:
    """The one line a user reads: the error class and its message (without the path it
    names, shown beside it), cut at :data:`LINE_WIDTH` characters (all of it: "details")."""
    if isinstance(exc, (KeyboardInterrupt, Cancelled)):
        return "Cancelled"
    message = exc.problem if isinstance(exc, ModelkitError) and exc.path else str(exc)
    first = " ".join(line.strip() for line in message.strip().splitlines() if line.strip())
    if len(first) > LINE_WIDTH:
        first = first[:LINE_WIDTH - 1] + "…"
    name = type(exc).__name__
    if isinstance(exc, InvalidInput):
        return first
    return f"{name}: {first}" if isinstance(exc, ModelkitError) else f"Unexpected {name}: {first}"


def error_html(exc: BaseException, hint: str | None = None) -> str:
    """An exception as HTML: one line (class and message), the file it is about, what to
    do about it (``hint``, else :func:`hint_for`), and the whole message and the traceback
    behind a closed "details"."""
    head = html.escape(error_line(exc))
    hint = hint if hint is not None else hint_for(exc)
    where = getattr(exc, "path", None) if isinstance(exc, ModelkitError) else None
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    more = f"{html.escape(str(exc).strip())}\n\n{html.escape(tb)}"
    return (f"<div class='mk-error-box' style='color:#b00020;border-left:6px solid #b00020;"
            f"background:#fde7ea;padding:6px 10px;margin:4px 0'>"
            f"<div class='mk-error-line'>✖ {head}</div>"
            + (f"<div class='mk-where' style='color:#555;font-size:12px'>in {html.escape(where)}</div>" if where else "")
            + (f"<div class='mk-hint' style='color:#333'>{html.escape(hint)}</div>" if hint else "")
            + f"<details class='mk-details'><summary style='color:#666;font-size:12px'>details</summary>"
            f"<pre style='font-size:11px;white-space:pre-wrap;color:#333'>{more}</pre></details></div>")


class PhaseBars(widgets.VBox):
    """A panel's progress display (a :class:`modelkit.progress.Display`): one bar and
    one line of text per phase name (a phase run again reuses its row), green when done,
    orange when cancelled, red when failed. Updated from the worker thread, at most
    every :attr:`INTERVAL` seconds per phase (and always at a phase's start and end)."""

    INTERVAL = 0.1
    STYLES = {"done": "success", "cancelled": "warning", "failed": "danger"}

    def __init__(self) -> None:
        super().__init__()
        self.add_class("mk-progress")
        self._rows: dict[str, tuple[widgets.FloatProgress, widgets.HTML]] = {}
        self._drawn: dict[str, float] = {}
        self._states: dict[str, str] = {}
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self.children, self._rows, self._drawn, self._states = (), {}, {}, {}

    def stopped(self, state: str) -> None:
        """The operation ended ``state`` (cancelled / failed) between two phases: the last
        bar says so, the way a phase stopped midway would (its text says where it stood)."""
        if not self._rows or state in self._states.values():
            return
        bar, label = self._rows[next(reversed(self._rows))]
        bar.bar_style = self.STYLES.get(state, "info")
        label.value = label.value.replace("</span>", html.escape(f" — {state} after this step") + "</span>")

    def text(self) -> str:
        """Every phase's line, for tests and logs."""
        return "\n".join(label.value for _, label in self._rows.values())

    def start(self, phase) -> None:
        with self._lock:
            if phase.name not in self._rows:
                bar = widgets.FloatProgress(min=0, max=1, layout=widgets.Layout(width="30%"))
                label = widgets.HTML()
                label.add_class("mk-phase-text")
                row = widgets.HBox([bar, label])
                row.add_class("mk-phase")
                self._rows[phase.name] = (bar, label)
                self.children = (*self.children, row)
        self._draw(phase, force=True)

    def update(self, phase) -> None:
        self._draw(phase)

    def close(self, phase) -> None:
        self._draw(phase, force=True)

    def _draw(self, phase, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._drawn.get(phase.name, 0.0) < self.INTERVAL:
            return
        self._drawn[phase.name] = now
        self._states[phase.name] = phase.state
        bar, label = self._rows[phase.name]
        bar.max = phase.total or 1
        bar.value = min(phase.done, bar.max) if phase.total else (1 if phase.state == "done" else 0)
        bar.bar_style = self.STYLES.get(phase.state, "info")
        suffix = "" if phase.state in ("running", "done") else f" — {phase.state}"
        label.value = f"<span style='font-size:12px'>{html.escape(phase.text() + suffix)}</span>"


def _outputs_under(widget: widgets.Widget) -> Iterator[widgets.Output]:
    if isinstance(widget, widgets.Output):
        yield widget
    for child in getattr(widget, "children", ()):
        yield from _outputs_under(child)


class RunButton(widgets.VBox):
    """A button that runs ``action()`` and hands its result to ``on_result(result)``.

    Shown top to bottom: the button (and, when ``cancellable``, a Cancel button) and its
    status, the coloured verdict line of the result (``verdict(result)``), the one-line
    error with what to do, one progress bar per phase of the work, and a collapsed log
    of what libraries printed meanwhile. ``results`` (the panel's tabs) is emptied and
    hidden when a run starts and shown again only when it succeeds: an error never sits
    beside the previous run's tables. Any exception (from ``action`` or ``on_result``, a
    kernel interrupt or a cancel included) is shown in ``error`` and kept in
    ``exception``, never left to the callback machinery or to ``Output.__exit__``, which
    in a live kernel prints a traceback and swallows it.

    A click on a ``cancellable`` button runs the action in a worker thread (:meth:`start`),
    so the kernel stays free to take the Cancel click; the action stops at its next
    progress step with :class:`~modelkit.errors.Cancelled` and unwinds like after an error;
    ``cancelled_hint`` says what a Cancel leaves behind (default: the hint for Cancelled).
    :meth:`run` always runs in the calling thread (tests, scripts).
    """

    def __init__(self, description: str, action: Callable[[], Any],
                 on_result: Callable[[Any], None], icon: str = "play", tooltip: str = "",
                 verdict: Callable[[Any], Any] | None = None, results: widgets.Widget | None = None,
                 cancellable: bool = False, cancelled_hint: str | None = None):
        self.action = action
        self.cancelled_hint = cancelled_hint
        self.on_result = on_result
        self.verdict_of = verdict
        self.results = results
        self.cancellable = cancellable
        self.button = widgets.Button(description=description, icon=icon, tooltip=tooltip,
                                     button_style="primary")
        self.button.add_class("mk-run")
        self.cancel_button = widgets.Button(description="Cancel", icon="stop", button_style="warning",
                                            tooltip="stop at the next step; nothing is kept",
                                            layout=widgets.Layout(display="none"))
        self.cancel_button.add_class("mk-cancel")
        self.cancel_button.on_click(lambda _: self.cancel())
        self.status = widgets.HTML()
        self.status.add_class("mk-status")
        self.verdict = widgets.HTML()
        self.verdict.add_class("mk-verdict-area")
        self.progress = PhaseBars()
        self.displays = widgets.Output()   # what a library display()s meanwhile (kept out of the cell)
        self.error = widgets.HTML()
        self.error.add_class("mk-error")
        self.library_log = widgets.HTML()
        self.library_log.add_class("mk-log-area")
        self.result: Any = None
        self.exception: BaseException | None = None
        self.thread: threading.Thread | None = None
        self._cancel = threading.Event()
        self._status_lock = threading.Lock()   # a Cancel's "cancelling…" never overwrites the end status
        self._active = False
        self.button.on_click(lambda _: self.start())
        if results is not None:
            results.layout.display = "none"   # nothing to show before the first run
        super().__init__([widgets.HBox([self.button, self.cancel_button, self.status]), self.verdict,
                          self.error, self.progress, self.library_log])

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    @property
    def cancel_event(self) -> threading.Event:
        """Set by Cancel; the running action's progress steps raise Cancelled once it is."""
        return self._cancel

    def start(self) -> None:
        """What a click does: :meth:`run` in a worker thread when ``cancellable``, else now."""
        if not self.cancellable:
            self.run()
            return
        if self.running:
            return
        self.button.disabled = True
        self.thread = threading.Thread(target=self.run, name="modelkit-panel", daemon=True)
        self.thread.start()

    def cancel(self) -> None:
        """What Cancel does: the running action stops at its next step."""
        with self._status_lock:
            if not self._active:
                return
            self.status.value = "<i>cancelling at the next step…</i>"
            self.cancel_button.disabled = True
            self._cancel.set()

    def _finish(self, status: str) -> None:
        with self._status_lock:
            self.status.value = status
            self._active = False

    def join(self, timeout: float | None = None) -> Any:
        """Wait for a run begun by :meth:`start`; its result (None on failure or while running)."""
        if self.thread is not None:
            self.thread.join(timeout)
        return self.result

    def _clear_results(self) -> None:
        if self.results is not None:
            self.results.layout.display = "none"
            for out in _outputs_under(self.results):
                out.outputs = ()

    def run(self) -> Any:
        """Run the action in this thread; returns its result, None on failure."""
        from modelkit.present.tables import verdict_html
        from modelkit.progress import reporting
        from modelkit.quiet import captured

        self.button.disabled = True
        with self._status_lock:
            self._cancel.clear()
            self._active = True
        self.cancel_button.disabled = False
        self.cancel_button.layout.display = "" if self.cancellable else "none"
        self.progress.clear()
        self._clear_results()
        self.error.value = self.verdict.value = self.library_log.value = ""
        self.exception = self.result = None
        self.status.value = ("<i>running…</i>" if self.cancellable
                             else "<i>running… (to cancel: interrupt the kernel, ■)</i>")
        t0 = time.perf_counter()
        failure: BaseException | None = None
        result = None
        # displays are caught by an Output context only in the kernel's own thread (an
        # Output captures by the message being handled; a worker thread has none)
        catch = self.displays if threading.current_thread() is threading.main_thread() else contextlib.nullcontext()
        log = None
        try:
            # the try is INSIDE the Output context: an exception must never reach
            # Output.__exit__, which in a kernel would print it and swallow it
            with catch:
                try:
                    with captured() as log, reporting(self.progress, self._cancel):
                        result = self.action()
                except (Exception, KeyboardInterrupt) as e:
                    failure = e
            self.library_log.value = log.html() if log is not None else ""
            if failure is None:
                self.on_result(result)
                if self.verdict_of is not None:
                    self.verdict.value = verdict_html(self.verdict_of(result))
                if self.results is not None:
                    self.results.layout.display = ""
        except (Exception, KeyboardInterrupt) as e:  # from on_result: shown like the rest
            failure = e
        finally:
            self.button.disabled = False
            self.cancel_button.layout.display = "none"
        seconds = time.perf_counter() - t0
        if failure is not None:
            self._clear_results()
            self.verdict.value = ""
            self.exception = failure
            cancelled = isinstance(failure, (KeyboardInterrupt, Cancelled))
            self.error.value = error_html(failure, self.cancelled_hint if cancelled else None)
            word = "cancelled" if cancelled else "failed"
            self.progress.stopped(word)
            self._finish(f"<span style='color:#b00020'>{word} after {seconds:.1f} s</span>")
            return None
        self.result = result
        self._finish(f"done in {seconds:.1f} s")
        return result


def optional(text: str) -> str | None:
    """A text field's value, None when blank."""
    text = (text or "").strip()
    return text or None


OPTIONS_HELP = "lora_alpha=16, lora_r=8 (unrecorded facts), core=shared, expert=0"
FACTS_HELP = "lora_alpha=16, lora_r=8: DyLoRA-MoE facts the artifact does not record"


def parse_options(text: str, reserved: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``"expert=0, routing=mean"`` -> ``{"expert": 0, "routing": "mean"}`` (values as JSON when
    they parse). ``reserved``: keys the panel has a field of its own for (key -> field name),
    refused here so that one value is never given twice. Unknown keys and bad values are the
    format's to refuse (UnknownOptionError, ConfigError: one line, naming what it accepts)."""
    out: dict[str, Any] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InvalidInput(f"view option {item.strip()!r} is not KEY=VALUE")
        key = key.strip()
        if reserved and key in reserved:
            raise InvalidInput(f"give {key} in the {reserved[key]!r} field, not as an option")
        try:
            out[key] = json.loads(value.strip())
        except ValueError:
            out[key] = value.strip()
    return out


def options_text(options: Mapping[str, Any] | None) -> str:
    """What an options or facts field shows for ``options`` (the inverse of :func:`parse_options`)."""
    return ", ".join(f"{k}={v}" for k, v in (options or {}).items())


def parse_facts(text: str) -> dict[str, Any]:
    """The facts field: ``"lora_alpha=16, lora_r=8"`` -> ``{"lora_alpha": 16, "lora_r": 8}``;
    InvalidInput for any other key or a value that is not a number (the artifact's format
    then checks the numbers: positive, r an integer, agreeing with what it records)."""
    from modelkit.formats.open import FACTS

    facts = parse_options(text)
    for key, value in facts.items():
        if key not in FACTS:
            raise InvalidInput(f"unknown fact {key}=; the facts an artifact may lack are "
                               + ", ".join(f"{f}=" for f in FACTS))
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidInput(f"{key}={value!r} is not a number")
    return facts


def tabs(**outputs: widgets.Widget) -> widgets.Tab:
    """A Tab with one titled page per keyword."""
    tab = widgets.Tab(children=list(outputs.values()))
    for i, title in enumerate(outputs):
        tab.set_title(i, title.replace("_", " "))
    return tab


class Panel(widgets.VBox):
    """A panel over one public function: its ``runner`` (a RunButton) does the work."""

    runner: RunButton

    @property
    def button(self) -> widgets.Button:
        return self.runner.button

    @property
    def result(self) -> Any:
        """The last successful result (None before the first run or after an error)."""
        return self.runner.result

    def run(self) -> Any:
        """Compute and display now, in this thread (errors are shown in the panel)."""
        return self.runner.run()

    def start(self) -> None:
        """What a click does (a cancellable panel works in a thread: see :meth:`RunButton.start`)."""
        self.runner.start()

    def cancel(self) -> None:
        """What the Cancel button does."""
        self.runner.cancel()
