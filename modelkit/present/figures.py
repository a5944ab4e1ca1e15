"""Matplotlib figures for diff results, built on ``matplotlib.figure.Figure``.

No pyplot: nothing touches global figure state, so the figures work headless (CLI,
papermill) and display in notebooks as any returned Figure does.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from matplotlib.figure import Figure

ANNOTATE_MAX_CELLS = 400   # heatmaps larger than this get no numbers in the cells


def short_name(name: str, width: int = 48) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``L3.self_attn.q_proj.weight`` (clipped)."""
    s = name.removeprefix("model.").replace("layers.", "L", 1)
    return s if len(s) <= width else "…" + s[-(width - 1):]


def diff_figure(matrix: "pd.DataFrame", top: "pd.DataFrame", title: str = "") -> "Figure":
    """Heatmap of ``matrix`` (layers x roles, relative change; NaN = no tensors) on the
    left, horizontal bars of ``top`` (columns ``name``, ``rel_change``) on the right."""
    from matplotlib.figure import Figure

    rows = max(len(matrix.index), 1)
    height = min(max(3.5, 0.28 * rows + 1.8), 24.0)
    fig = Figure(figsize=(13.5, height), layout="constrained")
    ax_heat, ax_bar = fig.subplots(1, 2, width_ratios=[1.0, 1.25])
    _heatmap(fig, ax_heat, matrix)
    _bars(ax_bar, top)
    if title:
        fig.suptitle(title if len(title) < 150 else title[:147] + "…", fontsize=10)
    return fig


def _heatmap(fig, ax, matrix: "pd.DataFrame") -> None:
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm

    ax.set_title("relative change ||B-A|| / ||A|| by layer and role", fontsize=9)
    if matrix.empty:
        ax.text(0.5, 0.5, "no shared tensors", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    values = matrix.to_numpy(dtype=float)
    finite = values[np.isfinite(values) & (values > 0)]
    # grey: no tensors of that role in that layer; white: unchanged; red: infinite (A all zeros)
    cmap = colormaps["viridis"].with_extremes(bad="#dddddd", under="white", over="red")
    if finite.size:
        vmax = float(finite.max())
        vmin = min(float(finite.min()), vmax / 100)   # at least two decades: similar looks similar
        norm = LogNorm(vmin=vmin, vmax=vmax)
        shown = np.where(values == 0, vmin / 10, np.where(np.isinf(values), vmax * 10, values))
    else:
        norm = LogNorm(vmin=1e-8, vmax=1.0)
        shown = np.where(values == 0, 1e-9, values)
    image = ax.imshow(np.ma.masked_invalid(shown), aspect="auto", cmap=cmap, norm=norm,
                      interpolation="nearest")
    ax.set_xticks(range(len(matrix.columns)), [str(c) for c in matrix.columns], rotation=45,
                  ha="right", fontsize=8)
    labels = ["-" if _missing(i) else str(i) for i in matrix.index]
    ax.set_yticks(range(len(labels)), labels, fontsize=7 if len(labels) > 30 else 8)
    ax.set_ylabel("layer ('-': outside the layers)", fontsize=8)
    if values.size <= ANNOTATE_MAX_CELLS:
        for (i, j), v in np.ndenumerate(values):
            if math.isnan(v):
                continue
            text = "0" if v == 0 else ("inf" if math.isinf(v) else f"{v:.2g}")
            ax.text(j, i, text, ha="center", va="center", fontsize=6,
                    color="black" if v == 0 or not finite.size or v > math.sqrt(norm.vmin * norm.vmax) else "white")
    fig.colorbar(image, ax=ax, shrink=0.8, extend="both")


def _bars(ax, top: "pd.DataFrame") -> None:
    ax.set_title(f"most changed tensors (top {len(top)})", fontsize=9)
    if top.empty:
        ax.text(0.5, 0.5, "no tensor changed", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    top = top.iloc[::-1]
    values = [v if math.isfinite(v) else float("nan") for v in top.rel_change.astype(float)]
    ax.barh(range(len(top)), values, height=0.6, color="#3b75af")
    ax.margins(y=0.3 if len(top) < 4 else 0.02)
    ax.set_yticks(range(len(top)), [short_name(n) for n in top["name"]], fontsize=7)
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    if positive and max(positive) / min(positive) > 100:
        ax.set_xscale("log")
    ax.set_xlabel("||B-A|| / ||A||", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)


def _missing(x) -> bool:
    try:
        import pandas as pd

        return bool(pd.isna(x))
    except (TypeError, ValueError):
        return x is None
