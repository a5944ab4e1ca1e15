"""Readable tables for notebooks, panels and HTML reports: per table, the columns a reader
needs (headline metric first), number formats, human bytes, integer layers, full messages.

Built on pandas ``Styler`` (a well-kept library that renders to plain HTML, so the same
table reads the same in JupyterLab, in a widget's Output and in a report opened offline,
with no JavaScript). Every builder takes a result object and returns a ``Styler``; an
empty table becomes a one-line ``Note`` instead of a header row with nothing under it.
No ipywidgets here: the panels import this module, not the other way round.
"""
from __future__ import annotations

import html
import math
import re
from typing import TYPE_CHECKING, Any, Callable, Sequence

from modelkit.verdicts import Verdict

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from pandas.io.formats.style import Styler

COLOURS = {"ok": "#1b7f3b", "warning": "#a15c00", "error": "#b00020", "neutral": "#1f4e99"}
BACKGROUNDS = {"ok": "#e6f4ea", "warning": "#fff4e0", "error": "#fde7ea", "neutral": "#e8effa"}
SEVERITY_LEVEL = {"error": "error", "warning": "warning", "info": "neutral"}
COMPARE_LEVEL = {"better": "ok", "worse": "error"}
TABLE_CSS = [  # compact, left-aligned text, numbers right-aligned, no wrapping of short cells
    {"selector": "", "props": "border-collapse:collapse;font-size:12px;margin:4px 0"},
    {"selector": "th", "props": "text-align:left;padding:3px 8px;border-bottom:1px solid #999;"
                                "white-space:nowrap;background:#f5f5f5"},
    {"selector": "td", "props": "padding:2px 8px;border-bottom:1px solid #e4e4e4;vertical-align:top;text-align:left"},
]


class Note(str):
    """A line of text standing in for an empty table (renders as HTML and as text)."""

    def _repr_html_(self) -> str:
        return f"<p class='mk-note' style='margin:4px 0;color:#444'><i>{html.escape(self)}</i></p>"


def human_bytes(n: Any) -> str:
    """``1536`` -> ``"1.5 KB"``: the kit's one byte format (as every summary prints it);
    blank for missing."""
    from modelkit.units import human_bytes as fmt

    if n is None or (isinstance(n, float) and math.isnan(n)):
        return ""
    return fmt(float(n))


def _blank(fmt: Callable[[Any], str]) -> Callable[[Any], str]:
    def f(x: Any) -> str:
        try:
            import pandas as pd

            if x is None or pd.isna(x):
                return ""
        except (TypeError, ValueError):
            pass
        return fmt(x)
    return f


integer = _blank(lambda x: f"{int(x):,}")
number = _blank(lambda x: f"{float(x):.3g}")
cosine = _blank(lambda x: f"{float(x):.6f}")
fraction = _blank(lambda x: f"{float(x):.1%}")
signed = _blank(lambda x: f"{float(x):+.3f}")
score = _blank(lambda x: f"{float(x):.3f}")
pvalue = _blank(lambda x: "<0.001" if float(x) < 1e-3 else f"{float(x):.3f}")
size = _blank(human_bytes)
text = _blank(str)


def shape(x: Any) -> str:
    """``[4, 32]`` -> ``4×32`` (never wraps)."""
    if x is None or isinstance(x, float):
        return ""
    return "×".join(str(d) for d in x) if len(x) else "scalar"


def styled(frame: "pd.DataFrame", formats: dict[str, Callable[[Any], str]] | None = None,
           columns: Sequence[str] | None = None, *, wrap: Sequence[str] = (),
           level: Callable[[Any], str | None] | None = None, level_column: str | None = None,
           caption: str | None = None, max_height: int | None = None) -> "Styler":
    """``frame`` with only ``columns`` (in that order), cells formatted by ``formats``,
    text in ``wrap`` columns allowed to wrap (the rest never does), rows coloured by
    ``level(row[level_column])`` and no index."""
    if columns is not None:
        frame = frame[[c for c in columns if c in frame.columns]]
    st = frame.style.hide(axis="index").format({k: v for k, v in (formats or {}).items() if k in frame.columns})
    styles = list(TABLE_CSS)
    styles += [{"selector": f"td.col{i}", "props": "white-space:nowrap"}
               for i, c in enumerate(frame.columns) if c not in wrap]
    styles += [{"selector": f"td.col{i}", "props": "white-space:normal;min-width:12em;max-width:50em"}
               for i, c in enumerate(frame.columns) if c in wrap]
    styles += [{"selector": f"td.col{i}", "props": "text-align:right"} for i, c in enumerate(frame.columns)
               if c in (formats or {}) and formats[c] not in (shape, text)]   # numbers: right-aligned
    st = st.set_table_styles(styles)
    if level is not None and level_column in frame.columns:
        def colour(row: "pd.Series") -> list[str]:
            lv = level(row[level_column])
            return [f"color:{COLOURS[lv]}" if lv else "" for _ in row]
        st = st.apply(colour, axis=1)
    if caption:
        st = st.set_caption(caption)
    if max_height:
        st = st.set_table_attributes(f"style='display:block;max-height:{max_height}px;overflow:auto'")
    return st


def verdict_html(v: Verdict) -> str:
    """The coloured verdict line every panel and report opens with."""
    return (f"<div class='mk-verdict mk-verdict-{v.level}' style='padding:6px 10px;margin:4px 0;"
            f"border-left:6px solid {COLOURS[v.level]};background:{BACKGROUNDS[v.level]};font-size:14px'>"
            f"<b style='color:{COLOURS[v.level]}'>{html.escape(v.label)}</b>"
            + (f" &nbsp;{html.escape(v.detail)}" if v.detail else "") + "</div>")


class VerdictLine:
    """A verdict that displays as its coloured line in notebooks and reports."""

    def __init__(self, verdict: Verdict):
        self.verdict = verdict

    def _repr_html_(self) -> str:
        return verdict_html(self.verdict)

    def __repr__(self) -> str:
        return self.verdict.line()


def verdict_line(result: Any) -> VerdictLine:
    """``display(verdict_line(result))``: the verdict of any result, coloured."""
    from modelkit.verdicts import verdict_of

    return VerdictLine(verdict_of(result))


# -- inspect ------------------------------------------------------------------------------

def findings_table(report: Any) -> "Styler | Note":
    frame = report.findings_frame()
    if frame.empty:
        return Note("No findings: nothing missing, unexpected or inconsistent.")
    return styled(frame, {"tensors": integer, "file": text}, ["severity", "code", "message", "tensors", "file"],
                  wrap=["message"], level=SEVERITY_LEVEL.get, level_column="severity")


def groups_table(report: Any) -> "Styler | Note":
    import pandas as pd

    frame = report.groups_frame()
    if frame.empty:
        return Note("No tensor groups (the model's expected tensors are unknown).")
    counts = ["expected", "present", "missing", "unexpected", "mismatched"]
    st = styled(frame, {c: integer for c in counts}, ["group", *counts])
    bad = [c for c in ("missing", "unexpected", "mismatched") if c in frame.columns]
    return st.map(lambda v: f"color:{COLOURS['error']};font-weight:bold"
                  if not pd.isna(v) and v else "", subset=bad)


TENSOR_COLUMNS = ["name", "shape", "dtype", "numel", "bytes", "role", "layer", "expert", "file"]
TENSOR_FORMATS = {"shape": shape, "numel": integer, "bytes": size, "layer": integer, "expert": integer}


def tensor_frame(report: Any, search: str = "") -> "pd.DataFrame":
    """The stored tensors whose name, file, role or dtype contains every word of ``search``."""
    frame = report.to_frame()
    for word in search.lower().split():
        hay = (frame["name"].astype(str) + " " + frame["file"].astype(str) + " " + frame["role"].astype(str)
               + " " + frame["dtype"].astype(str)).str.lower()
        frame = frame[hay.str.contains(word, regex=False)]
    return frame


def tensors_table(report: Any, search: str = "", max_height: int | None = 420) -> "Styler | Note":
    """Every stored tensor (all rows, scrollable), optionally filtered by ``search``."""
    frame = tensor_frame(report, search)
    if frame.empty:
        return Note(f"No stored tensor matches {search!r}." if search else "No stored tensors.")
    return styled(frame, TENSOR_FORMATS, TENSOR_COLUMNS, max_height=max_height,
                  caption=f"{len(frame)} of {len(report.tensors)} stored tensors")


def dtype_table(report: Any) -> "Styler | Note":
    """Per-dtype totals (tensors, parameters, bytes), as the Hub's safetensors viewer shows."""
    frame = report.to_frame()
    if frame.empty:
        return Note("No stored tensors.")
    agg = frame.groupby("dtype").agg(tensors=("name", "size"), parameters=("numel", "sum"),
                                     bytes=("bytes", "sum")).reset_index()
    agg = agg.sort_values("bytes", ascending=False)
    return styled(agg, {"tensors": integer, "parameters": integer, "bytes": size},
                  ["dtype", "parameters", "bytes", "tensors"])


class Html(str):
    """A block of HTML (no script: it reads the same in a panel and in a report opened offline)."""

    def _repr_html_(self) -> str:
        return str(self)


def text_summary(result: Any, title: str = "the same as text (for a terminal, a log or an issue)") -> Html:
    """``result.summary()`` folded under one line: in a notebook or report that has shown the
    tables, the plain-text form is there to copy, not to read twice."""
    return Html(f"<details class='mk-text-summary'><summary style='color:#666;font-size:12px'>{html.escape(title)}"
                f"</summary><pre style='font-size:12px'>{html.escape(result.summary())}</pre></details>")


TREE_MAX_TENSORS = 5000   # a larger tree is cut (the table and the search still have every tensor)


def parameter_tree(report: Any, search: str = "") -> "Html | Note":
    """The stored tensors as a tree of their dotted names (``model`` > ``layers`` > ``0`` > ...),
    each node with its parameters, bytes and dtypes, as the Hub's safetensors viewer shows;
    collapsible ``<details>`` elements, opened down to the matches when ``search`` is given."""
    frame = tensor_frame(report, search)
    if frame.empty:
        return Note(f"No stored tensor matches {search!r}." if search else "No stored tensors.")
    cut = len(frame) > TREE_MAX_TENSORS
    frame = frame.head(TREE_MAX_TENSORS)
    root: dict[str, Any] = {}
    for r in frame.itertuples(index=False):
        node = root
        for part in str(r.name).split("."):
            node = node.setdefault(part, {})
        node[""] = r   # the tensor itself
    opened = bool(search.strip())

    def totals(node: dict[str, Any]) -> tuple[int, int, int, set[str]]:
        if "" in node:
            t = node[""]
            return 1, int(t.numel), int(t.bytes), {str(t.dtype)}
        k = n = b = 0
        dtypes: set[str] = set()
        for child in node.values():
            ck, cn, cb, cd = totals(child)
            k, n, b, dtypes = k + ck, n + cn, b + cb, dtypes | cd
        return k, n, b, dtypes

    def render(name: str, node: dict[str, Any], depth: int) -> str:
        k, n, b, dtypes = totals(node)
        facts = f"{n:,} params · {human_bytes(b)} · {', '.join(sorted(dtypes))}"
        if "" in node:
            t = node[""]
            return (f"<div class='mk-leaf' style='margin-left:1.2em;white-space:nowrap'><code>{html.escape(name)}</code> "
                    f"<span style='color:#555'>{shape(list(t.shape))} · {facts}</span></div>")
        children = sorted(node.items(), key=lambda kv: _natural(kv[0]))
        inner = "".join(render(k, v, depth + 1) for k, v in children)
        is_open = " open" if opened or depth == 0 else ""
        return (f"<details class='mk-node'{is_open} style='margin-left:{0 if depth == 0 else 1.2}em'>"
                f"<summary style='white-space:nowrap'><code>{html.escape(name)}</code> "
                f"<span style='color:#555'>{k} tensor{'s' if k != 1 else ''} · {facts}</span></summary>{inner}</details>")

    body = "".join(render(k, v, 0) for k, v in root.items())
    head = (f"<p style='margin:4px 0;color:#444'><i>{len(frame)} of {len(report.tensors)} stored tensors"
            + (f" (the first {TREE_MAX_TENSORS}: narrow the search for the rest)" if cut else "")
            + "; click a name to open it</i></p>")
    return Html(f"<div class='mk-tree' style='font-size:12px'>{head}{body}</div>")


def _natural(name: str) -> list:
    """``layers.10`` after ``layers.9``: digits compared as numbers."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name)]


def _expert_level(row_trained: Any) -> str | None:
    text = str(row_trained)
    if text.startswith("no"):
        return "error"
    if text.startswith("not checked"):
        return "warning"
    return None


def _present_level(value: Any) -> str:
    text = str(value)
    return "" if text == "yes" else f"color:{COLOURS['error']};font-weight:bold"


EXPERT_FORMATS = {"tensors": integer, "parameters": integer, "bytes": size, "scaling": number,
                  "norm_B": number, "norm_BA": number, "shape": shape, "rank": text, "file": text}


def experts_table(report: Any) -> "Styler | Note":
    """Per expert of a mixture (:meth:`InspectionReport.experts_frame`) and its router: a
    missing router, an empty or unplaceable expert and an all-zero B stand out in red;
    ``not checked`` (no ``deep``) in amber. The norms appear only when measured."""
    frame = report.experts_frame()
    if frame.empty:
        return Note("Not a mixture of adapters: no per-expert view.")
    cols = ["expert", "present", "trained", "tensors", "parameters", "bytes", "rank", "scaling",
            "norm_B", "norm_BA", "shape", "file"]
    cols = [c for c in cols if c in ("expert", "present", "trained") or frame[c].notna().any()]
    deep = frame["norm_B"].notna().any()
    st = styled(frame, EXPERT_FORMATS, cols, level=_expert_level, level_column="trained",
                caption=("norm_B = sqrt(Σ‖B‖²), norm_BA = sqrt(Σ‖BA‖²) over each expert's modules (unscaled)"
                         if deep else "trained needs the tensor data: tick deep to check it"))
    return st.map(_present_level, subset=["present"])


# -- diff ---------------------------------------------------------------------------------

DIFF_FORMATS = {"rel_change": number, "max_rel_change": number, "cosine": cosine, "max_abs_diff": number,
                "frac_changed": fraction, "numel": integer, "layer": integer, "expert": integer,
                "tensors": integer, "compared": integer, "changed": integer, "effective_rank": number,
                "shape_a": shape, "shape_b": shape}
DIFF_TENSOR_COLUMNS = ["name", "rel_change", "status", "cosine", "max_abs_diff", "frac_changed",
                       "role", "layer", "expert", "shape_a", "dtype_a", "dtype_b", "effective_rank", "note"]


def diff_tensors_table(result: Any, changed_only: bool = False, search: str = "",
                       max_height: int | None = 420) -> "Styler | Note":
    """One row per tensor, the relative change first, most changed first."""
    frame = result.to_frame()
    if changed_only:
        frame = frame[(frame.changed.fillna(0) > 0) | ~frame.status.isin(["compared", "dtype-changed"])]
    for word in search.lower().split():
        frame = frame[frame.name.str.lower().str.contains(word, regex=False)]
    if frame.empty:
        return Note("No tensor differs." if changed_only else "No tensors.")
    frame = frame.sort_values("rel_change", ascending=False, na_position="first")
    cols = [c for c in DIFF_TENSOR_COLUMNS if c != "effective_rank" or result.rank]
    if not frame.note.fillna("").astype(bool).any():
        cols.remove("note")
    return styled(frame, DIFF_FORMATS, cols, wrap=["note"], max_height=max_height,
                  caption=f"{len(frame)} of {len(result.rows)} tensors, most changed first")


def diff_groups_table(frame: "pd.DataFrame", what: str) -> "Styler | Note":
    """A pooled table (by role / layer / projection): relative change first, and of the
    count columns only those that are not all zero."""
    if frame.empty:
        return Note(f"No tensors to group by {what}.")
    frame = frame.reset_index()
    keys = [c for c in ("role", "layer", "module", "expert") if c in frame.columns]
    counts = [c for c in ("added", "removed", "shape_changed", "dtype_changed", "unreadable", "nonfinite")
              if c in frame.columns and frame[c].fillna(0).astype(bool).any()]
    cols = [*keys, "rel_change", "max_rel_change", "cosine", "changed", "compared", "tensors", *counts]
    return styled(frame, {**DIFF_FORMATS, **{c: integer for c in counts}}, cols)


def diff_experts_table(result: Any) -> "Styler | Note":
    """A mixture (DyLoRA-MoE): one row per expert (its dense view against the other side)
    and the router (:meth:`DiffResult.by_expert`); otherwise the pooled change per layer and
    projection of the MoE experts (a compressed MoE's reconstruction error)."""
    if not result.parts:
        return diff_groups_table(result.by_projection(), "layer and projection (MoE experts)")
    frame = result.by_expert()
    level = {"changed": "neutral", "unchanged": "warning", "not stored": "error", "incomplete": "warning"}
    return styled(frame, {"tensors": integer, "changed": integer, "rel_change": number},
                  ["part", "verdict", "rel_change", "changed", "tensors"], level=level.get, level_column="verdict",
                  caption="per expert: its dense view (expert merged into the base) against the other side; "
                          "'unchanged': the expert changes nothing")


# -- compare ------------------------------------------------------------------------------

COMPARE_COLUMNS = ["task", "metric", "verdict", "base", "trained", "delta", "ci_low", "ci_high",
                   "p_mcnemar", "n", "model"]


def compare_table(result: Any) -> "Styler | Note":
    """Task, metric and verdict first, then the scores (3 decimals), delta and interval."""
    frame = result.to_frame()
    if frame.empty:
        return Note("No scores.")
    if frame.model.nunique() == 1:
        frame = frame.drop(columns="model")
    fmts = {"base": score, "trained": score, "delta": signed, "ci_low": signed, "ci_high": signed,
            "p_mcnemar": pvalue, "n": integer}
    return styled(frame, fmts, COMPARE_COLUMNS, level=lambda v: COMPARE_LEVEL.get(v), level_column="verdict")


def disagreements_table(result: Any, search: str = "", max_rows: int = 200, *,
                        winner: str | None = None, task: str | None = None) -> "Styler | Note":
    """The samples where exactly one model is right (prompt and responses in full), those
    containing every word of ``search``, optionally only where ``winner`` (``"base"`` or
    ``"trained"``) is the one right, and only of ``task``."""
    frame = result.disagreements()
    if winner:
        frame = frame[frame.winner == winner]
    if task:
        frame = frame[frame.task == task]
    for word in search.lower().split():
        hay = frame[["prompt", "target", "base_response", "trained_response", "task"]].astype(str) \
            .agg(" ".join, axis=1).str.lower()
        frame = frame[hay.str.contains(word, regex=False)]
    if frame.empty:
        return Note("No sample where exactly one model is right." if not (search or winner or task)
                    else "No disagreement matches the filter.")
    cols = ["winner", "task", "doc_id", "prompt", "target", "base_response", "trained_response"]
    return styled(frame.head(max_rows), {"doc_id": integer}, cols,
                  wrap=["prompt", "target", "base_response", "trained_response"], max_height=480,
                  caption=f"{min(len(frame), max_rows)} of {len(frame)} disagreeing samples")


def markdown_table(result: Any) -> str:
    """The comparison as a Markdown table to paste into a paper or a PR (as lm-eval's
    ``make_table``): one row per model, task and metric."""
    frame = result.to_frame()
    level = int(round(result.settings.get("level", 0.95) * 100))
    head = ["Model", "Task", "Metric", "Base", "Trained", "Δ", f"{level}% CI", "McNemar p", "n", "Verdict"]
    lines = ["|" + "|".join(head) + "|", "|" + "|".join(["---", "---", "---"] + ["---:"] * 6 + ["---"]) + "|"]
    for r in frame.itertuples(index=False):
        def pm(v: Any, se: Any) -> str:
            return score(v) + (f" ± {float(se):.3f}" if se is not None and not _isnan(se) else "")
        ci = "" if _isnan(r.ci_low) else f"[{signed(r.ci_low)}, {signed(r.ci_high)}]"
        cells = [r.model, r.task, r.metric, pm(r.base, r.base_stderr), pm(r.trained, r.trained_stderr),
                 signed(r.delta), ci, pvalue(r.p_mcnemar), integer(r.n), r.verdict]
        lines.append("|" + "|".join(str(c).replace("|", "\\|") for c in cells) + "|")
    return "\n".join(lines)


def _isnan(x: Any) -> bool:
    try:
        return x is None or math.isnan(float(x))
    except (TypeError, ValueError):
        return False
