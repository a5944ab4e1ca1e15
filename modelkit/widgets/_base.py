"""Shared widget bits: a run button that shows progress, errors and timing, and helpers
that put tables, figures and text into ``Output`` areas.

Results are written with ``Output.outputs`` directly (not ``with out: display(...)``), so
what a click displays is the same in JupyterLab, in papermill's saved widget state and in
a plain pytest process without a kernel.
"""
from __future__ import annotations

import base64
import html
import io
import json
import time
import traceback
from typing import Any, Callable

import ipywidgets as widgets

from ..errors import ModelkitError

TEXT_WIDTH = 300   # characters of a table cell shown before "..."


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
        if isinstance(obj, str):
            outputs.append({"output_type": "stream", "name": "stdout",
                            "text": obj if obj.endswith("\n") else obj + "\n"})
        else:
            outputs.append(mime_bundle(obj))
    out.outputs = tuple(outputs)


def output_text(out: widgets.Output) -> str:
    """Everything ``out`` shows, as text (HTML and plain text included): for tests and logs."""
    parts = []
    for o in out.outputs:
        if o.get("output_type") == "stream":
            parts.append(o.get("text", ""))
        else:
            data = o.get("data", {})
            parts.append(data.get("text/html") or data.get("text/plain", ""))
    return "\n".join(parts)


def error_html(exc: BaseException) -> str:
    """An exception as HTML: a ModelkitError as its class and message (what the user needs),
    anything else with its traceback (a bug to report)."""
    head = f"<b>{html.escape(type(exc).__name__)}</b>: {html.escape(str(exc))}"
    body = ""
    if not isinstance(exc, ModelkitError):
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        body = f"<pre style='font-size:11px;white-space:pre-wrap'>{html.escape(tb)}</pre>"
    return f"<div style='color:#b00020'>{head}{body}</div>"


class RunButton(widgets.VBox):
    """A button that runs ``action()`` and hands its result to ``on_result(result)``.

    tqdm.auto progress bars that ``action`` creates appear in ``progress``; any exception
    (from ``action`` or ``on_result``) is shown in ``error`` and kept in ``exception``,
    never left to the callback machinery, which would hide it in the kernel log.
    """

    def __init__(self, description: str, action: Callable[[], Any],
                 on_result: Callable[[Any], None], icon: str = "play", tooltip: str = ""):
        self.action = action
        self.on_result = on_result
        self.button = widgets.Button(description=description, icon=icon, tooltip=tooltip,
                                     button_style="primary")
        self.button.add_class("mk-run")
        self.status = widgets.HTML()
        self.status.add_class("mk-status")
        self.progress = widgets.Output()
        self.error = widgets.HTML()
        self.error.add_class("mk-error")
        self.result: Any = None
        self.exception: BaseException | None = None
        self.button.on_click(lambda _: self.run())
        super().__init__([widgets.HBox([self.button, self.status]), self.progress, self.error])

    def run(self) -> Any:
        """Run the action now (what a click does); returns its result, None on failure."""
        self.button.disabled = True
        self.progress.outputs = ()
        self.error.value = ""
        self.exception = None
        self.status.value = "<i>running…</i>"
        t0 = time.perf_counter()
        try:
            with self.progress:
                result = self.action()
            self.result = result
            self.on_result(result)
        except Exception as e:  # shown in the widget: a callback must not swallow it
            self.result = None
            self.exception = e
            self.error.value = error_html(e)
            self.status.value = f"<span style='color:#b00020'>failed after {time.perf_counter() - t0:.1f} s</span>"
            return None
        finally:
            self.button.disabled = False
        self.status.value = f"done in {time.perf_counter() - t0:.1f} s"
        return result


def optional(text: str) -> str | None:
    """A text field's value, None when blank."""
    text = (text or "").strip()
    return text or None


def parse_options(text: str) -> dict[str, Any]:
    """``"expert=0, routing=mean"`` -> ``{"expert": 0, "routing": "mean"}`` (values as JSON when they parse)."""
    out: dict[str, Any] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InvalidInput(f"view option {item.strip()!r} is not KEY=VALUE")
        try:
            out[key.strip()] = json.loads(value.strip())
        except ValueError:
            out[key.strip()] = value.strip()
    return out


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
        """What a click does: compute and display (errors are shown in the panel)."""
        return self.runner.run()
