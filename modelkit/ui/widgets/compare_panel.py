"""Compare panel: base vs trained on lm-evaluation-harness tasks, with paired statistics.

Compare works in a worker thread with a Cancel button (as export): a Cancel stops it at the
next lm-eval batch or between two models; no result is shown and no partial evaluation is
cached (a model evaluated to its end before the Cancel stays cached, and is reused)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import ipywidgets as widgets

import modelkit
from modelkit.present import tables as table
from modelkit.ui.widgets._base import (
    OPTIONS_HELP,
    InvalidInput,
    Panel,
    RunButton,
    optional,
    options_text,
    parse_options,
    show,
    tabs,
)
from modelkit.ui.widgets.picker import ArtifactPicker
from modelkit.verdicts import verdict_of


CANCELLED_HINT = ("No result was recorded and no evaluation cut short was cached; a model evaluated "
                  "to its end before the Cancel stays cached and is not evaluated again.")


class ComparePanel(Panel):
    """:func:`modelkit.compare` (base vs one trained artifact) as a widget; the last
    CompareResult is ``result``."""

    def __init__(self, root: str | Path | None = None, base: str | Path | None = None,
                 trained: str | Path | None = None, tasks: Sequence[str] | str = (),
                 limit: int | None = 20, include_path: str | Path | None = None,
                 base_options: dict | None = None, trained_options: dict | None = None):
        wide = widgets.Layout(width="60%")

        def options_field(label: str, given: dict | None) -> widgets.Text:
            field = widgets.Text(value=options_text(given),
                                 description=label, layout=wide,
                                 placeholder=f"optional: base=FOLDER, {OPTIONS_HELP}")
            field.add_class("mk-options")
            return field

        self.picker_base = ArtifactPicker(root, base, description="base")
        self.options_base = options_field("options", base_options)
        self.picker_trained = ArtifactPicker(value=trained, description="trained", root_from=self.picker_base)
        self.options_trained = options_field("options", trained_options)
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
        self.winner = widgets.ToggleButtons(options=[("both", ""), ("base right", "base"),
                                                     ("trained right", "trained")], value="",
                                            description="show", style={"button_width": "auto"})
        self.task_filter = widgets.Dropdown(options=[("every task", "")], value="", description="task")
        for w in (self.search, self.winner, self.task_filter):
            w.observe(lambda _: self._show_disagreements(), names="value")
        self.disagreement_table = widgets.Output()
        self.disagreements = widgets.VBox([self.search, widgets.HBox([self.winner, self.task_filter]),
                                           self.disagreement_table])
        self.plot = widgets.Output()
        results = tabs(results=self.table, plot=self.plot, disagreements=self.disagreements,
                       markdown=self.markdown, summary=self.summary)
        self.runner = RunButton("Compare", self._evaluate, self._show, icon="balance-scale",
                                tooltip="evaluate base and trained on the tasks", verdict=verdict_of,
                                results=results, cancellable=True, cancelled_hint=CANCELLED_HINT)
        super().__init__([self.picker_base, self.options_base, self.picker_trained, self.options_trained, self.tasks,
                          self.limit, self.include_path, self.runner, results])
        self.add_class("mk-compare")

    def _evaluate(self) -> "modelkit.CompareResult":
        self._result = None
        base, trained = self.picker_base.value, self.picker_trained.value
        tasks = [t.strip() for t in self.tasks.value.split(",") if t.strip()]
        if base is None or trained is None or not tasks:
            raise InvalidInput("Pick a base and a trained artifact and name at least one task.")
        return modelkit.compare(base, trained, tasks=tasks, limit=self.limit.value or None,
                                include_path=optional(self.include_path.value),
                                base_options=parse_options(self.options_base.value),
                                trained_options=parse_options(self.options_trained.value))

    def _show(self, result: "modelkit.CompareResult") -> None:
        show(self.summary, result.summary())
        show(self.table, table.compare_table(result))
        show(self.markdown, table.markdown_table(result))
        show(self.plot, result.plot())              # a pyplot-free Figure: nothing to close
        self._result = result
        tasks = sorted(set(result.to_frame().task)) if len(result.to_frame()) else []
        self.task_filter.options = [("every task", "")] + [(t, t) for t in tasks]
        self._show_disagreements()

    def _show_disagreements(self) -> None:
        result = getattr(self, "_result", None)
        if result is not None:
            show(self.disagreement_table, table.disagreements_table(
                result, self.search.value, winner=self.winner.value or None, task=self.task_filter.value or None))
