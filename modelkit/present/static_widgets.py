"""Widgets as static HTML, from the widget state a notebook run saved.

An HTML report must open offline on a colleague's machine: the stock rendering of saved
widgets needs require.js and the widget manager from a CDN, and shows a blank area
without them. Here each widget view in an executed notebook becomes plain HTML: an
Output widget its outputs, an HTML widget its value, boxes and tabs their children (tab
pages as titled sections), a control its label and value. ipywidgets' own embedding
needs the JavaScript manager, hence this small renderer over the documented state
format (``application/vnd.jupyter.widget-state+json``).
"""
from __future__ import annotations

import html
from typing import Any

VIEW_MIME = "application/vnd.jupyter.widget-view+json"
STATE_MIME = "application/vnd.jupyter.widget-state+json"
PROGRESS = {"FloatProgressModel", "IntProgressModel"}
CONTROLS = {"TextModel", "TextareaModel", "IntTextModel", "FloatTextModel", "CheckboxModel", "DropdownModel",
            "SelectModel", "IntSliderModel", "FloatSliderModel", "ToggleButtonModel"}


def _models(nb: Any) -> dict[str, dict]:
    state = nb.metadata.get("widgets", {}).get(STATE_MIME, {}).get("state", {})
    return {k: v for k, v in state.items()}


def _ref(x: Any) -> str | None:
    return x[len("IPY_MODEL_"):] if isinstance(x, str) and x.startswith("IPY_MODEL_") else None


def output_html(output: dict) -> str:
    """One notebook output as HTML (HTML, then PNG, then text)."""
    kind = output.get("output_type")
    if kind == "stream":
        return f"<pre class='mk-stream'>{html.escape(output.get('text', ''))}</pre>"
    if kind == "error":
        return f"<pre class='mk-stream'>{html.escape(output.get('ename', ''))}: {html.escape(output.get('evalue', ''))}</pre>"
    data = output.get("data", {})
    if "text/html" in data:
        text = data["text/html"]
        return "".join(text) if isinstance(text, list) else text
    if "image/png" in data:
        return f"<img src='data:image/png;base64,{data['image/png']}'/>"
    if "text/plain" in data:
        text = data["text/plain"]
        return f"<pre>{html.escape(''.join(text) if isinstance(text, list) else text)}</pre>"
    return ""


def render(model_id: str, models: dict[str, dict], depth: int = 0) -> str:
    """The widget ``model_id`` and its children as static HTML."""
    model = models.get(model_id)
    if model is None or depth > 40:
        return ""
    name, state = model.get("model_name", ""), model.get("state", {})
    classes = " ".join(state.get("_dom_classes", []))
    if name == "OutputModel":
        inner = "".join(output_html(o) for o in state.get("outputs", []))
        return f"<div class='{classes}'>{inner}</div>" if inner else ""
    if name in ("HTMLModel", "LabelModel", "HTMLMathModel"):
        value = state.get("value", "")
        value = value if name != "LabelModel" else html.escape(value)
        return f"<div class='{classes}'>{value}</div>" if value else ""
    if name == "TabModel" or name == "AccordionModel":
        titles = state.get("titles") or []
        parts = []
        for i, child in enumerate(state.get("children", [])):
            body = render(_ref(child) or "", models, depth + 1)
            if body:
                title = titles[i] if i < len(titles) and titles[i] else f"page {i + 1}"
                parts.append(f"<section class='mk-tab'><h4 style='margin:10px 0 2px'>{html.escape(title)}</h4>{body}</section>")
        return f"<div class='{classes}'>{''.join(parts)}</div>"
    if name.endswith("BoxModel"):
        row = name in ("HBoxModel",)
        kinds = {models.get(_ref(c) or "", {}).get("model_name") for c in state.get("children", [])}
        if kinds & PROGRESS:
            return ""   # a progress bar (tqdm): a transient of the run, not a result
        parts = [render(_ref(c) or "", models, depth + 1) for c in state.get("children", [])]
        style = "display:flex;gap:12px;flex-wrap:wrap;align-items:center" if row else ""
        return f"<div class='{classes}' style='{style}'>{''.join(p for p in parts if p)}</div>"
    if name in CONTROLS:
        label = state.get("description", "")
        value = state.get("value")
        if name in ("DropdownModel", "SelectModel"):
            labels, index = state.get("_options_labels", []), state.get("index")
            value = labels[index] if isinstance(index, int) and index < len(labels) else ""
        if value in ("", None):
            return ""
        return (f"<span class='mk-control' style='font-size:12px;color:#444'>{html.escape(str(label))}: "
                f"<code>{html.escape(str(value))}</code></span>")
    if name == "ButtonModel":
        return ""    # nothing to click in a report
    return ""


def inline_widgets(nb: Any) -> Any:
    """Replace every widget view output of ``nb`` by its static HTML and drop the saved
    widget state (which would make nbconvert load the widget manager from a CDN).
    Modifies and returns ``nb``."""
    models = _models(nb)
    for cell in nb.cells:
        if cell.get("cell_type") != "code":
            continue
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if VIEW_MIME in data:
                body = render(data[VIEW_MIME].get("model_id", ""), models)
                out["data"] = {"text/html": f"<div class='mk-static-widget'>{body}</div>"}
    nb.metadata.pop("widgets", None)
    return nb
