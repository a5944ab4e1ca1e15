"""Diff panel: pick A and B, click, see the verdict, tables by role and layer, and the plot."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

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


class DiffPanel(Panel):
    """:func:`modelkit.diff` as a widget; the last DiffResult is ``result``."""

    def __init__(self, root: str | Path | None = None, a: str | Path | None = None,
                 b: str | Path | None = None, base_a: str | Path | None = None,
                 base_b: str | Path | None = None, options_a: Mapping[str, Any] | None = None,
                 options_b: Mapping[str, Any] | None = None, rank: bool = False):
        wide = widgets.Layout(width="60%")
        self.picker_a = ArtifactPicker(root, a, description="A")
        self.picker_b = ArtifactPicker(value=b, description="B", root_from=self.picker_a)
        self.base_a = widgets.Text(value=str(base_a or ""), description="base A", layout=wide,
                                   placeholder="optional: base model of A")
        self.base_b = widgets.Text(value=str(base_b or ""), description="base B", layout=wide,
                                   placeholder="optional: base model of B")
        self.options_a = widgets.Text(value=options_text(options_a), description="options A", layout=wide,
                                      placeholder=f"optional: {OPTIONS_HELP}")
        self.options_b = widgets.Text(value=options_text(options_b), description="options B", layout=wide,
                                      placeholder=f"optional: {OPTIONS_HELP}")
        for field in (self.options_a, self.options_b):
            field.add_class("mk-options")
        self.rank = widgets.Checkbox(value=rank, description="effective rank of 2-D deltas")
        self.summary = widgets.Output()
        self.summary.add_class("mk-summary")
        self.plot = widgets.Output()
        self.by_role = widgets.Output()
        self.by_layer = widgets.Output()
        self.by_projection = widgets.Output()
        self.changed_only = widgets.Checkbox(value=True, description="changed tensors only")
        self.search = widgets.Text(description="search", placeholder="words in the tensor name",
                                   continuous_update=False)
        self.search.add_class("mk-search")
        self.tensor_table = widgets.Output()
        self.tensor_table.add_class("mk-tensors")
        for w in (self.changed_only, self.search):
            w.observe(lambda _: self._show_tensors(), names="value")
        self.tensors = widgets.VBox([widgets.HBox([self.search, self.changed_only]), self.tensor_table])
        results = tabs(by_role=self.by_role, tensors=self.tensors, plot=self.plot,
                       by_layer=self.by_layer, experts=self.by_projection, summary=self.summary)
        self.runner = RunButton("Diff", self._diff, self._show, icon="exchange",
                                tooltip="compare A and B weight by weight", verdict=verdict_of, results=results)
        super().__init__([self.picker_a, self.base_a, self.options_a, self.picker_b, self.base_b,
                          self.options_b, self.rank, self.runner, results])
        self.add_class("mk-diff")

    def _diff(self) -> "modelkit.DiffResult":
        self._result = None
        a, b = self.picker_a.value, self.picker_b.value
        if a is None or b is None:
            raise InvalidInput("Pick both A and B (from the lists or as typed refs).")
        return modelkit.diff(a, b, base_a=optional(self.base_a.value), base_b=optional(self.base_b.value),
                             options_a=parse_options(self.options_a.value, {"base": "base A"}),
                             options_b=parse_options(self.options_b.value, {"base": "base B"}),
                             rank=self.rank.value)

    def _show(self, result: "modelkit.DiffResult") -> None:
        import matplotlib.pyplot as plt

        show(self.summary, result.summary())
        show(self.by_role, table.diff_groups_table(result.by_role(), "role"))
        show(self.by_layer, table.diff_groups_table(result.by_layer(), "layer"))
        show(self.by_projection, table.diff_experts_table(result))
        fig = result.plot()
        show(self.plot, fig)
        plt.close(fig)
        self._result = result
        self._show_tensors()

    def _show_tensors(self) -> None:
        result = getattr(self, "_result", None)
        if result is not None:
            show(self.tensor_table, table.diff_tensors_table(result, self.changed_only.value, self.search.value))
