"""Views of a comparison built from its tables (never from the result object, so this module
depends on nothing above it): the matplotlib figure (no pyplot global state) and the W&B run
(table, disagreements, figure)."""
from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from matplotlib.figure import Figure

MAX_PANELS = 24
COLORS = {"better": "#2a9d3f", "worse": "#c0392b"}
NEUTRAL = "#7f8c8d"


def compare_figure(frame: "pd.DataFrame", labels: list[str]) -> "Figure":
    """One row per (task, metric) of ``frame`` (``CompareResult.to_frame()``): values ± stderr
    per model (left; ``labels`` = base first, then each trained model), and each trained
    model's delta with its paired bootstrap interval (right)."""
    from matplotlib.figure import Figure

    keys = list(dict.fromkeys(zip(frame["task"], frame["metric"])))
    shown = keys[:MAX_PANELS]
    rows = max(len(shown), 1)
    fig = Figure(figsize=(11.0, 1.0 + 1.55 * rows), layout="constrained")
    axes = fig.subplots(rows, 2, squeeze=False, width_ratios=[1.0, 1.2])
    for (ax_val, ax_delta), (task, metric) in zip(axes, shown):
        sub = frame[(frame["task"] == task) & (frame["metric"] == metric)]
        first = sub.iloc[0]
        values = [first["base"]] + [_value(sub, m, "trained") for m in labels[1:]]
        errors = [first["base_stderr"]] + [_value(sub, m, "trained_stderr") for m in labels[1:]]
        ypos = list(range(len(labels)))
        ax_val.barh(ypos, [0 if _nan(v) else v for v in values],
                    xerr=[0 if _nan(e) else e for e in errors], color=["#95a5a6"] + ["#3478b5"] * (len(labels) - 1),
                    capsize=3)
        ax_val.set_yticks(ypos, [_short(x) for x in labels], fontsize=8)
        ax_val.invert_yaxis()
        arrow = {True: " (higher is better)", False: " (lower is better)"}.get(first["higher_is_better"], "")
        ax_val.set_title(f"{task} · {metric}{arrow}", fontsize=9, loc="left")
        ax_val.tick_params(axis="x", labelsize=8)
        for y, v in zip(ypos, values):
            if not _nan(v):
                ax_val.annotate(f"{v:.3g}", (v, y), xytext=(3, 0), textcoords="offset points",
                                va="center", fontsize=7)
        _delta_panel(ax_delta, sub)
    if len(keys) > len(shown):
        fig.suptitle(f"first {len(shown)} of {len(keys)} task/metric rows", fontsize=9)
    if frame.empty:
        axes[0][0].text(0.5, 0.5, "no comparable metrics", ha="center", va="center")
    return fig


def _delta_panel(ax, sub) -> None:
    ypos = list(range(len(sub)))
    for y, r in zip(ypos, sub.itertuples(index=False)):
        color = COLORS.get(r.verdict, NEUTRAL)
        if _nan(r.ci_low):
            ax.plot([r.delta], [y], "o", color=color)
        else:
            ax.errorbar([r.delta], [y], xerr=[[r.delta - r.ci_low], [r.ci_high - r.delta]], fmt="o",
                        color=color, capsize=4)
        p = "" if _nan(r.p_mcnemar) else f", McNemar p={r.p_mcnemar:.2g}"
        ax.annotate(f"{r.delta:+.3g} ({r.verdict}{p})", (r.delta, y), xytext=(0, 7), textcoords="offset points",
                    ha="center", fontsize=7, color=color)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(ypos, [_short(m) for m in sub["model"]], fontsize=8)
    ax.set_ylim(len(ypos) - 0.4, -0.8)
    ax.set_title("delta (trained - base) with paired 95% bootstrap CI", fontsize=8, loc="left")
    ax.tick_params(axis="x", labelsize=8)


def _value(sub, label: str, column: str) -> float:
    match = sub[sub["model"] == label]
    return float(match.iloc[0][column]) if len(match) else math.nan


def _nan(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _short(text: str, n: int = 22) -> str:
    return text if len(text) <= n else "…" + text[-(n - 1):]


# --------------------------------------------------------------------------- W&B


def wandb_mode() -> str:
    """``$WANDB_MODE`` when set; otherwise online only when an API key is configured."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        from wandb.sdk.lib.wbauth.wbnetrc import read_netrc_auth

        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
        return "online" if read_netrc_auth(host=host) else "offline"
    except Exception:  # older/newer wandb layouts: stay offline, `wandb sync` uploads later
        return "offline"


def start_wandb_run(project: str, job_type: str, config: dict[str, Any], name: str) -> Any:
    """A W&B run (offline unless an API key is configured; see :func:`wandb_mode`) that prints
    nothing: wandb's banner and run summary would bury the verdict line; modelkit says where
    the run is itself (:func:`wandb_run_line`)."""
    import wandb

    return wandb.init(project=project, job_type=job_type, config=config, mode=wandb_mode(), name=name[:100],
                      settings=wandb.Settings(silent=True))


def wandb_run_line(folder: str) -> str:
    """Where a logged run is: its local folder, and for an offline run how to upload it."""
    if os.path.basename(folder.rstrip("/")).startswith("offline-run-"):
        return f"{folder} (offline: `wandb sync {folder}` uploads it)"
    return folder


def log_to_wandb(frame: "pd.DataFrame", dis: "pd.DataFrame", fig: "Figure", config: dict[str, Any],
                 project: str = "modelkit-compare", run: Any = None) -> str:
    """Log the table ``frame``, the disagreements ``dis`` and the figure into ``run`` (or a
    new run in ``project`` recording ``config``: its ``models`` list of dicts with a
    ``label`` each, ``tasks`` and the settings); returns the run's local folder."""
    import wandb

    own = run is None
    if own:
        run = start_wandb_run(project, "compare", config, "compare " + " vs ".join(m["label"] for m in config["models"]))
    run.log({"compare/table": wandb.Table(dataframe=_plain(frame)),
             "compare/disagreements": wandb.Table(dataframe=_plain(dis)),
             "compare/plot": wandb.Image(_png(fig))})
    for r in frame.itertuples(index=False):
        run.summary[f"{r.model}/{r.task}/{r.metric}/delta"] = None if _nan(r.delta) else float(r.delta)
    folder = str(getattr(run, "dir", "") or "")
    if own:
        run.finish()
    return os.path.dirname(folder) if folder.endswith("files") else folder


def _png(fig):
    """The figure as a PIL image (wandb.Image of a Figure would import pyplot)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    buf.seek(0)
    return Image.open(buf)


def _plain(frame):
    """Columns W&B tables accept: None instead of NaN, plain Python scalars."""
    return frame.astype(object).where(frame.notna(), None)


def metric_label(m: dict) -> str:
    """A metric as tables name it: ``acc``, or ``exact_match (strict-match)`` for a filtered one."""
    return m["metric"] if m["filter"] in ("none", None) else f"{m['metric']} ({m['filter']})"
