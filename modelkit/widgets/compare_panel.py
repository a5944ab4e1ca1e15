"""Compare panel: base vs trained on lm-evaluation-harness tasks, with paired statistics."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import ipywidgets as widgets

import modelkit

from ._base import InvalidInput, Panel, RunButton, optional, show, tabs
from .picker import ArtifactPicker


class ComparePanel(Panel):
    """:func:`modelkit.compare` (base vs one trained artifact) as a widget; the last
    CompareResult is ``result``."""

    def __init__(self, root: str | Path | None = None, base: str | Path | None = None,
                 trained: str | Path | None = None, tasks: Sequence[str] | str = (),
                 limit: int | None = 20, include_path: str | Path | None = None):
        self.picker_base = ArtifactPicker(root, base, description="base")
        self.picker_trained = ArtifactPicker(value=trained, description="trained", root_from=self.picker_base)
        self.tasks = widgets.Text(value=tasks if isinstance(tasks, str) else ",".join(tasks),
                                  description="tasks", placeholder="comma-separated lm-eval task names",
                                  layout=widgets.Layout(width="60%"))
        self.limit = widgets.IntText(value=limit or 0, description="limit",
                                     tooltip="examples per task (0: all)")
        self.include_path = widgets.Text(value=str(include_path or ""), description="task dir",
                                         placeholder="optional: folder of your own task YAMLs",
                                         layout=widgets.Layout(width="60%"))
        self.summary = widgets.Output()
        self.summary.add_class("mk-summary")
        self.table = widgets.Output()
        self.disagreements = widgets.Output()
        self.plot = widgets.Output()
        self.runner = RunButton("Compare", self._evaluate, self._show, icon="balance-scale",
                                tooltip="evaluate base and trained on the tasks")
        super().__init__([self.picker_base, self.picker_trained, self.tasks,
                          self.limit, self.include_path, self.runner,
                          tabs(results=self.table, plot=self.plot, disagreements=self.disagreements,
                               summary=self.summary)])
        self.add_class("mk-compare")

    def _evaluate(self) -> "modelkit.CompareResult":
        for out in (self.summary, self.table, self.disagreements, self.plot):
            out.outputs = ()
        base, trained = self.picker_base.value, self.picker_trained.value
        tasks = [t.strip() for t in self.tasks.value.split(",") if t.strip()]
        if base is None or trained is None or not tasks:
            raise InvalidInput("pick a base and a trained artifact and name at least one task")
        return modelkit.compare(base, trained, tasks=tasks, limit=self.limit.value or None,
                                include_path=optional(self.include_path.value))

    def _show(self, result: "modelkit.CompareResult") -> None:
        show(self.summary, result.summary())
        show(self.table, result.to_frame())
        show(self.disagreements, result.disagreements())
        show(self.plot, result.plot())
