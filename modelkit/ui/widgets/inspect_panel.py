"""Inspect panel: pick an artifact, click, see the verdict, then its findings, experts
(mixtures), groups, tensors (searchable, per-dtype totals), the parameter tree and the summary."""
from __future__ import annotations

from pathlib import Path

import ipywidgets as widgets

import modelkit
from modelkit.present import tables as table
from modelkit.ui.widgets._base import (
    FACTS_HELP,
    InvalidInput,
    Panel,
    RunButton,
    optional,
    options_text,
    parse_facts,
    show,
    tabs,
)
from modelkit.ui.widgets.picker import ArtifactPicker
from modelkit.verdicts import verdict_of


class InspectPanel(Panel):
    """:func:`modelkit.inspect` as a widget; the last report is ``result``."""

    def __init__(self, root: str | Path | None = None, ref: str | Path | None = None,
                 base: str | Path | None = None, deep: bool = False, facts: dict | None = None):
        self.picker = ArtifactPicker(root, ref)
        self.base = widgets.Text(value=str(base or ""), description="base",
                                 placeholder="optional: base model folder or ref (overrides the recorded one)",
                                 layout=widgets.Layout(width="60%"))
        self.facts = widgets.Text(value=options_text(facts),
                                  description="facts", placeholder=f"optional: {FACTS_HELP}",
                                  layout=widgets.Layout(width="60%"))
        self.facts.add_class("mk-facts")
        self.deep = widgets.Checkbox(value=deep, description="deep (also read tensor data: finds untrained adapters)",
                                     layout=widgets.Layout(width="60%"))
        self.summary = widgets.Output()
        self.summary.add_class("mk-summary")
        self.findings = widgets.Output()
        self.findings.add_class("mk-findings")
        self.experts = widgets.Output()
        self.experts.add_class("mk-experts")
        self.groups = widgets.Output()
        self.search = widgets.Text(description="search", placeholder="words in the name, file, role or dtype",
                                   continuous_update=False, layout=widgets.Layout(width="60%"))
        self.search.add_class("mk-search")
        self.search.observe(lambda _: self._show_tensors(), names="value")
        self.dtypes = widgets.Output()
        self.tensor_table = widgets.Output()
        self.tensor_table.add_class("mk-tensors")
        self.tree = widgets.Output()
        self.tree.add_class("mk-tree-area")
        self.tensors = widgets.VBox([self.search, self.dtypes, self.tensor_table])
        results = tabs(findings=self.findings, experts=self.experts, groups=self.groups,
                       tensors=self.tensors, tree=self.tree, summary=self.summary)
        self.runner = RunButton("Inspect", self._inspect, self._show, icon="search",
                                tooltip="inspect the picked artifact (headers only unless deep)",
                                verdict=verdict_of, results=results)
        super().__init__([self.picker, self.base, self.facts, self.deep, self.runner, results])
        self.add_class("mk-inspect")

    def _inspect(self) -> "modelkit.InspectionReport":
        self._report = None
        ref = self.picker.value
        if ref is None:
            raise InvalidInput("Pick an artifact from the list or type a ref.")
        return modelkit.inspect(ref, base=optional(self.base.value), deep=self.deep.value,
                                facts=parse_facts(self.facts.value))

    def _show(self, report: "modelkit.InspectionReport") -> None:
        show(self.summary, report.summary())
        show(self.findings, table.findings_table(report))
        show(self.experts, table.experts_table(report))
        show(self.groups, table.groups_table(report))
        show(self.dtypes, table.dtype_table(report))
        self._report = report
        self._show_tensors()

    def _show_tensors(self) -> None:
        report = getattr(self, "_report", None)
        if report is not None:
            show(self.tensor_table, table.tensors_table(report, self.search.value))
            show(self.tree, table.dtype_table(report), table.parameter_tree(report, self.search.value))
