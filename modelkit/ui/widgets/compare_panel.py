"""Compare panel: base vs trained on lm-evaluation-harness tasks, with paired statistics."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import ipywidgets as widgets

import modelkit
from modelkit.present import tables as table
from modelkit.ui.widgets._base import (
    InvalidInput,
    Panel,
    RunButton,
    optional,
    show,
    tabs,
)
from modelkit.ui.widgets.picker import ArtifactPicker
from modelkit.verdicts import verdict_of


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
        self.markdown = widgets.Output()
        self.markdown.add_class("mk-markdown")
        self.search = widgets.Text(description="search", placeholder="words in the prompt, target or responses",
                                   continuous_update=False, layout=widgets.Layout(width="60%"))
        self.search.add_class("mk-search")
        self.search.observe(lambda _: self._show_disagreements(), names="value")
        self.disagreement_table = widgets.Output()
        self.disagreements = widgets.VBox([self.search, self.disagreement_table])
        self.plot = widgets.Output()
        results = tabs(results=self.table, plot=self.plot, disagreements=self.disagreements,
                       markdown=self.markdown, summary=self.summary)
        self.runner = RunButton("Compare", self._evaluate, self._show, icon="balance-scale",
                                tooltip="evaluate base and trained on the tasks", verdict=verdict_of,
                                results=results)
        super().__init__([self.picker_base, self.picker_trained, self.tasks,
                          self.limit, self.include_path, self.runner, results])
        self.add_class("mk-compare")

    def _evaluate(self) -> "modelkit.CompareResult":
        self._result = None
        base, trained = self.picker_base.value, self.picker_trained.value
        tasks = [t.strip() for t in self.tasks.value.split(",") if t.strip()]
        if base is None or trained is None or not tasks:
            raise InvalidInput("Pick a base and a trained artifact and name at least one task.")
        return modelkit.compare(base, trained, tasks=tasks, limit=self.limit.value or None,
                                include_path=optional(self.include_path.value))

    def _show(self, result: "modelkit.CompareResult") -> None:
        import matplotlib.pyplot as plt

        show(self.summary, result.summary())
        show(self.table, table.compare_table(result))
        show(self.markdown, table.markdown_table(result))
        fig = result.plot()
        show(self.plot, fig)
        plt.close(fig)
        self._result = result
        self._show_disagreements()

    def _show_disagreements(self) -> None:
        result = getattr(self, "_result", None)
        if result is not None:
            show(self.disagreement_table, table.disagreements_table(result, self.search.value))
