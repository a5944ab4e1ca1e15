"""Watch panel: pick a training run folder, watch it, and see each checkpoint's scores
against the baseline land in a live table and a score-vs-step plot; stop when done.

The watcher (:class:`modelkit.ops.watch.Watcher`) runs in a background thread, so the
notebook stays usable, and evaluates each checkpoint in a fresh process (``isolated``):
the model's memory and the libraries' output never reach the kernel. Every settled
checkpoint refreshes the table and the plot.
**Stop** lets the current evaluation finish, then ends the thread. The ledger is the
watcher's own (outside the run folder): stopping and watching again resumes.
"""
from __future__ import annotations

import html
import os
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import ipywidgets as widgets

from modelkit.ui.widgets._base import (
    InvalidInput,
    Panel,
    RunButton,
    error_html,
    optional,
    show,
    tabs,
)
from modelkit.ui.widgets.picker import find_folders


def discover_runs(root: str | Path, depth: int = 3) -> dict[str, str]:
    """Run folders under ``root`` (folders holding ``checkpoint-N/``, ``checkpoints/checkpoint-N/``
    or ``best_model/``): ``{path relative to root: absolute path}``, sorted (see
    :func:`modelkit.ui.widgets.picker.find_folders`)."""
    from modelkit.ops.watch import find_checkpoints

    return find_folders(root, lambda folder: bool(find_checkpoints(folder)), depth)


class RunFolderPicker(widgets.VBox):
    """The run folders found under ``root``, or a typed folder; ``value`` is the folder."""

    def __init__(self, root: str | Path | None = None, value: str | Path | None = None):
        self.root = widgets.Text(value=str(root or ""), description="root", continuous_update=False,
                                 placeholder="folder to search for training runs", layout=widgets.Layout(width="60%"))
        self.scan_button = widgets.Button(description="rescan", icon="refresh", layout=widgets.Layout(width="auto"))
        self.dropdown = widgets.Dropdown(description="run", options=[], layout=widgets.Layout(width="60%"))
        self.dropdown.add_class("mk-run-picker")
        self.typed = widgets.Text(description="or folder", continuous_update=False,
                                  placeholder="a run folder (overrides the list)", layout=widgets.Layout(width="60%"))
        self.typed.add_class("mk-run-folder")
        self.root.observe(lambda _: self.scan(), "value")
        self.scan_button.on_click(lambda _: self.scan())
        super().__init__([widgets.HBox([self.root, self.scan_button]), self.dropdown, self.typed])
        self.scan()
        if value is not None:
            self.value = value

    def scan(self) -> dict[str, str]:
        root = self.root.value.strip()
        found = discover_runs(root) if root else {}
        keep = self.dropdown.value
        self.dropdown.options = list(found.items())
        if keep in found.values():
            self.dropdown.value = keep
        return found

    @property
    def value(self) -> str | None:
        return self.typed.value.strip() or self.dropdown.value

    @value.setter
    def value(self, folder: str | Path) -> None:
        listed = {os.path.realpath(p): p for p in dict(self.dropdown.options).values()}.get(os.path.realpath(folder))
        if listed is not None:
            self.dropdown.value, self.typed.value = listed, ""
        else:
            self.typed.value = str(folder)


class WatchPanel(Panel):
    """:class:`modelkit.ops.watch.Watcher` as a widget: **Watch** starts it in a thread,
    **Stop** ends it; ``result`` is the live :class:`~modelkit.ops.watch.WatchResult`."""

    def __init__(self, root: str | Path | None = None, run_dir: str | Path | None = None,
                 baseline: str | Path | None = None, tasks: Sequence[str] | str = (), limit: int | None = 20,
                 interval: float = 10.0, settle: float = 5.0, isolated: bool = True, **watch_options: Any):
        self.picker = RunFolderPicker(root, run_dir)
        self.baseline = widgets.Text(value=str(baseline or ""), description="baseline",
                                     placeholder="optional: default is the base an adapter names",
                                     layout=widgets.Layout(width="60%"))
        self.tasks = widgets.Text(value=tasks if isinstance(tasks, str) else ",".join(tasks), description="tasks",
                                  placeholder="comma-separated lm-eval task names", layout=widgets.Layout(width="60%"))
        self.limit = widgets.IntText(value=limit or 0, description="limit", tooltip="examples per task (0: all)")
        self.interval = widgets.FloatText(value=interval, description="poll (s)")
        self.settle = widgets.FloatText(value=settle, description="settle (s)",
                                        tooltip="seconds a checkpoint's files must stay unchanged")
        self.stop_button = widgets.Button(description="Stop", icon="stop", button_style="warning", disabled=True)
        self.stop_button.add_class("mk-stop")
        self.stop_button.on_click(lambda _: self.stop())
        self.live = widgets.HTML()
        self.live.add_class("mk-live")
        self.thread_error = widgets.HTML()
        self.thread_error.add_class("mk-error")
        self.table = widgets.Output()
        self.table.add_class("mk-watch-table")
        self.scores = widgets.Output()
        self.scores.add_class("mk-watch-scores")
        self.plot = widgets.Output()
        self.plot.add_class("mk-watch-plot")
        self.summary = widgets.Output()
        self.watch_options = {"isolated": isolated, **watch_options}
        self.watcher = None
        self.thread: threading.Thread | None = None
        self.exception: BaseException | None = None
        self._lock = threading.Lock()
        results = tabs(checkpoints=self.table, scores=self.scores, plot=self.plot, summary=self.summary)
        self.runner = RunButton("Watch", self._start, self._started, icon="eye",
                                tooltip="evaluate each new complete checkpoint as it lands", results=results)
        super().__init__([self.picker, self.baseline, self.tasks, widgets.HBox([self.limit, self.interval, self.settle]),
                          widgets.HBox([self.runner, self.stop_button]), self.live, self.thread_error, results])
        self.add_class("mk-watch")

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    # -- start / stop -----------------------------------------------------------------
    def _start(self):
        from modelkit.ops.watch import Watcher

        if self.running:
            raise InvalidInput("already watching; press Stop first")
        self.live.value = self.thread_error.value = ""
        run_dir = self.picker.value
        tasks = [t.strip() for t in self.tasks.value.split(",") if t.strip()]
        if run_dir is None or not tasks:
            raise InvalidInput("pick a run folder and name at least one task")
        return Watcher(run_dir, tasks, optional(self.baseline.value), limit=self.limit.value or None,
                       interval=self.interval.value, settle=self.settle.value, on_event=lambda _: self.refresh(),
                       **self.watch_options)

    def _started(self, watcher) -> None:
        self.watcher, self.exception = watcher, None
        self.thread_error.value = ""
        self.thread = threading.Thread(target=self._loop, name="modelkit-watch", daemon=True)
        self.stop_button.disabled = False
        self.runner.button.disabled = True
        self.live.value = "<i>watching… (evaluating the baseline first)</i>"
        self.thread.start()

    def _loop(self) -> None:
        try:
            self.watcher.run()
        except Exception as e:  # shown in the panel, never lost in the thread
            self.exception = e
            self.thread_error.value = error_html(e)
        finally:
            self.refresh(final=True)
            self.stop_button.disabled = True
            self.runner.button.disabled = False

    def stop(self, wait: float | None = None) -> None:
        """Stop watching after the current evaluation (``wait``: seconds to wait for it)."""
        if self.watcher is not None:
            self.watcher.stop()
            self.live.value = "<i>stopping after the current evaluation…</i>"
        if self.thread is not None and wait:
            self.thread.join(wait)

    # -- display ----------------------------------------------------------------------
    @property
    def result(self):
        """The live WatchResult (None before the first Watch)."""
        return self.watcher.result() if self.watcher is not None else None

    def refresh(self, final: bool = False) -> None:
        """Show the watcher's state now (called after every settled checkpoint): the
        verdict line so far, then the tables."""
        from modelkit.present.tables import verdict_html
        from modelkit.verdicts import verdict_of

        result = self.result
        if result is None:
            return
        with self._lock:
            self.runner.status.value = ""       # "done in 0.0 s" of the start click says nothing
            self.runner.verdict.value = verdict_html(verdict_of(result))
            state = "stopped" if final else "watching"
            counts = ", ".join(f"{n} {s}" for s, n in sorted(result.counts().items())) or "no checkpoint yet"
            self.live.value = (f"<b>{state}</b> {html.escape(Path(result.run_dir).name)}: "
                               f"{html.escape(counts)} <small>({time.strftime('%H:%M:%S')})</small>")
            show(self.table, result.status_frame())
            show(self.scores, result.to_frame())
            show(self.plot, result.plot())
            show(self.summary, result.summary())
