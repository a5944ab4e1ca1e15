"""Inspect panel: pick an artifact, click, see its findings, groups and tensors."""
from __future__ import annotations

from pathlib import Path

import ipywidgets as widgets

import modelkit

from ._base import InvalidInput, Panel, RunButton, optional, show, tabs
from .picker import ArtifactPicker


class InspectPanel(Panel):
    """:func:`modelkit.inspect` as a widget; the last report is ``result``."""

    def __init__(self, root: str | Path | None = None, ref: str | Path | None = None,
                 base: str | Path | None = None, deep: bool = False):
        self.picker = ArtifactPicker(root, ref)
        self.base = widgets.Text(value=str(base or ""), description="base",
                                 placeholder="optional: base model folder or ref (overrides the recorded one)",
                                 layout=widgets.Layout(width="60%"))
        self.deep = widgets.Checkbox(value=deep, description="deep (also read tensor data)")
        self.summary = widgets.Output()
        self.summary.add_class("mk-summary")
        self.findings = widgets.Output()
        self.findings.add_class("mk-findings")
        self.groups = widgets.Output()
        self.tensors = widgets.Output()
        self.runner = RunButton("Inspect", self._inspect, self._show, icon="search",
                                tooltip="inspect the picked artifact (headers only unless deep)")
        super().__init__([self.picker, self.base, self.deep, self.runner,
                          tabs(findings=self.findings, summary=self.summary, groups=self.groups,
                               tensors=self.tensors)])
        self.add_class("mk-inspect")

    def _inspect(self) -> "modelkit.InspectionReport":
        for out in (self.summary, self.findings, self.groups, self.tensors):
            out.outputs = ()
        ref = self.picker.value
        if ref is None:
            raise InvalidInput("pick an artifact from the list or type a ref")
        return modelkit.inspect(ref, base=optional(self.base.value), deep=self.deep.value)

    def _show(self, report: "modelkit.InspectionReport") -> None:
        show(self.summary, report.summary())
        show(self.findings, report.findings_frame())
        show(self.groups, report.groups_frame())
        show(self.tensors, report.to_frame())
