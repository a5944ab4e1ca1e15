"""Views of a :class:`~modelkit.ops.watch.WatchResult`: the score-vs-step figure (matplotlib
``Figure``, no pyplot) built from its table, and its W&B run, where every score is logged
against the training step (``define_metric``), so results that finish out of order land
on the right step."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from modelkit.present.compare import _plain, _png, metric_label, start_wandb_run

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from matplotlib.figure import Figure

    from modelkit.ops.watch import WatchResult

MAX_PANELS = 12
STEP_METRIC = "trainer/global_step"


def watch_figure(frame: "pd.DataFrame", title: str = "") -> "Figure":
    """One panel per (task, metric) of ``frame`` (``WatchResult.to_frame()``): each
    checkpoint's score against its step, the band its paired 95% interval (baseline +
    the delta's bootstrap CI), and the baseline as a dashed line with its stderr."""
    from matplotlib.figure import Figure

    keys = list(dict.fromkeys(zip(frame["task"], frame["metric"])))[:MAX_PANELS]
    cols = 1 if len(keys) <= 1 else 2
    rows = max(1, math.ceil(len(keys) / cols))
    fig = Figure(figsize=(6.0 * cols, 1.2 + 2.8 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    if not keys:
        axes[0].text(0.5, 0.5, "no checkpoint evaluated yet", ha="center", va="center",
                     transform=axes[0].transAxes)
        axes[0].set_axis_off()
    for ax, (task, metric) in zip(axes, keys):
        sub = frame[(frame["task"] == task) & (frame["metric"] == metric)]
        stepped = sub[sub["step"].notna()].sort_values("step")
        base, base_se = float(sub["base"].iloc[0]), sub["base_stderr"].iloc[0]
        ax.axhline(base, color="#7f8c8d", linestyle="--", linewidth=1, label="baseline")
        if _finite(base_se):
            ax.axhspan(base - base_se, base + base_se, color="#7f8c8d", alpha=0.12, linewidth=0)
        if len(stepped):
            x = stepped["step"].astype(float).to_numpy()
            y = stepped["trained"].astype(float).to_numpy()
            lo = base + stepped["ci_low"].astype(float).to_numpy()
            hi = base + stepped["ci_high"].astype(float).to_numpy()
            ax.fill_between(x, lo, hi, color="#3478b5", alpha=0.2, linewidth=0, label="paired 95% CI")
            ax.errorbar(x, y, yerr=[abs(y - lo), abs(hi - y)], fmt="o-", color="#3478b5", capsize=3,
                        label="checkpoint")   # the bars show the interval of a lone checkpoint too
        hib = {True: " (higher is better)", False: " (lower is better)"}.get(sub["higher_is_better"].iloc[0], "")
        ax.set_title(f"{task} · {metric}{hib}", fontsize=9, loc="left")
        ax.set_xlabel("training step", fontsize=8)
        ax.tick_params(labelsize=8)
        unstepped = sub[sub["step"].isna()]["checkpoint"].tolist()
        if unstepped:
            ax.annotate("no step: " + ", ".join(unstepped), (0.99, 0.02), xycoords="axes fraction",
                        ha="right", fontsize=7, color="#555555")
        ax.legend(fontsize=7, loc="best")
    for ax in axes[len(keys):]:
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


class WandbLog:
    """One W&B run for a watch: each checkpoint's scores logged as it is evaluated, against
    ``trainer/global_step``; the baseline in the summary; the table and figure at the end."""

    def __init__(self, project: str = "modelkit-watch", config: dict | None = None, run: Any = None):
        self.own = run is None
        self.run = run or start_wandb_run(project, "watch", config or {},
                                          f"watch {config.get('run_dir', '') if config else ''}"[-100:])
        self.run.define_metric(STEP_METRIC)
        self.run.define_metric("watch/*", step_metric=STEP_METRIC)
        self.logged: set[str] = set()

    def baseline(self, result: "WatchResult") -> None:
        run = result.baseline.result["runs"] if result.baseline and result.baseline.result else {}
        for task, r in run.items():
            for leaf, data in r["leaves"].items():
                for m in data["metrics"].values():
                    if m["value"] is not None:
                        self.run.summary[f"baseline/{leaf}/{metric_label(m)}"] = m["value"]

    def checkpoint(self, result: "WatchResult", name: str) -> None:
        """Log ``name``'s rows of the result's table (once per checkpoint)."""
        if name in self.logged:
            return
        self.logged.add(name)
        frame = result.to_frame()
        rows = frame[frame["checkpoint"] == name]
        if not len(rows):
            return
        step = rows["step"].iloc[0]
        data = {}
        for r in rows.itertuples(index=False):
            prefix = f"watch/{r.task}/{r.metric}"
            for key, value in (("", r.trained), ("/delta", r.delta), ("/ci_low", r.ci_low), ("/ci_high", r.ci_high)):
                if _finite(value):
                    data[prefix + key] = float(value)
        if step is None or (isinstance(step, float) and math.isnan(step)):
            for k, v in data.items():                 # no training step (best_model): summary only
                self.run.summary[f"{name}/{k}"] = v
            return
        self.run.log({STEP_METRIC: int(step), **data})

    def finish(self, result: "WatchResult") -> str:
        """Log the table, statuses and figure; close the run if it is ours. Its folder."""
        import os

        import wandb

        self.run.log({"watch_final/table": wandb.Table(dataframe=_plain(result.to_frame())),
                      "watch_final/status": wandb.Table(dataframe=_plain(result.status_frame())),
                      "watch_final/plot": wandb.Image(_png(result.plot()))})
        folder = str(getattr(self.run, "dir", "") or "")
        if self.own:
            self.run.finish()
        return os.path.dirname(folder) if folder.endswith("files") else folder
