"""Export panel: pick an artifact, choose options, write a standard Hugging Face folder."""
from __future__ import annotations

from pathlib import Path

import ipywidgets as widgets

import modelkit
from modelkit.ui.widgets._base import (
    OPTIONS_HELP,
    InvalidInput,
    Panel,
    RunButton,
    optional,
    options_text,
    parse_options,
    show,
)
from modelkit.ui.widgets.picker import ArtifactPicker
from modelkit.verdicts import verdict_of

RESERVED = {"base": "base", "dtype": "dtype", "expert": "expert", "verify": "verify", "force": "replace",
            "allow_untrained": "allow untrained", "out": "out"}   # each has a field of its own
DTYPES = [("as stored", "as stored"), ("float32", "float32"), ("bfloat16", "bfloat16"), ("float16", "float16")]


def parse_expert(text: str) -> int | str | None:
    """The expert field: blank -> None, ``all`` -> ``"all"``, a number -> that int."""
    text = (text or "").strip()
    if not text:
        return None
    if text == "all":
        return "all"
    try:
        return int(text)
    except ValueError:
        raise InvalidInput(f"expert must be blank, an integer or 'all', not {text!r}") from None


class ExportPanel(Panel):
    """:func:`modelkit.export` as a widget; the last ExportResult is ``result``."""

    def __init__(self, root: str | Path | None = None, ref: str | Path | None = None,
                 out: str | Path | None = None, base: str | Path | None = None,
                 dtype: str | None = None, expert: int | str | None = None,
                 verify: bool = True, force: bool = False, allow_untrained: bool = False,
                 options: dict | None = None):
        wide = widgets.Layout(width="60%")
        self.picker = ArtifactPicker(root, ref)
        self.out = widgets.Text(value=str(out or ""), description="out", layout=wide,
                                placeholder="folder to write (must not exist unless 'replace')")
        self.base = widgets.Text(value=str(base or ""), description="base", layout=wide,
                                 placeholder="optional: base model folder or ref")
        self.dtype = widgets.Dropdown(options=DTYPES, value=dtype or "as stored", description="dtype")
        self.expert = widgets.Text(value="" if expert is None else str(expert), description="expert",
                                   placeholder="DyLoRA-MoE: K or all")
        self.options = widgets.Text(value=options_text(options),
                                    description="options", layout=wide,
                                    placeholder=f"optional: {OPTIONS_HELP}")
        self.options.add_class("mk-options")
        self.verify = widgets.Checkbox(value=verify, description="verify logits against the source",
                                      indent=False, layout=widgets.Layout(width="auto"))
        self.force = widgets.Checkbox(value=force, description="replace an existing out folder",
                                     indent=False, layout=widgets.Layout(width="auto"))
        self.allow_untrained = widgets.Checkbox(value=allow_untrained, description="allow untrained adapters",
                                                indent=False, layout=widgets.Layout(width="auto"),
                                                tooltip="export even when every LoRA B is zero (equals the base)")
        self.summary = widgets.Output()
        self.summary.add_class("mk-summary")
        self.runner = RunButton("Export", self._export, self._show, icon="download",
                                tooltip="write a standard Hugging Face folder", verdict=verdict_of,
                                results=self.summary, cancellable=True)
        super().__init__([self.picker, self.out, self.base,
                          widgets.HBox([self.dtype, self.expert]), self.options,
                          widgets.HBox([self.verify, self.force, self.allow_untrained]), self.runner, self.summary])
        self.add_class("mk-export")

    def _export(self) -> "modelkit.ExportResult":
        ref, out = self.picker.value, optional(self.out.value)
        if ref is None or out is None:
            raise InvalidInput("Pick an artifact and give an output folder (out).")
        options = parse_options(self.options.value, RESERVED)
        return modelkit.export(ref, out, base=optional(self.base.value), dtype=None if self.dtype.value == "as stored" else self.dtype.value,
                               expert=parse_expert(self.expert.value), verify=self.verify.value,
                               force=self.force.value, allow_untrained=self.allow_untrained.value, **options)

    def _show(self, result: "modelkit.ExportResult") -> None:
        show(self.summary, result.summary())
