"""``compare``: does the trained model beat its base? lm-eval scores with paired statistics.

Every model is loaded with :func:`modelkit.load` (any format) and evaluated in process by
lm-evaluation-harness with per-sample logs; the result pairs the models document by
document (bootstrap interval of the delta, McNemar's exact test for 0/1 scores) and
records where each number came from (artifact, fingerprint, options, dtype, lm-eval
version, task config hash).

Per-model results are cached under ``cache_dir()/compare/<key>.json``, the key being the
model's fingerprint (with its base's), load options, task name and config hash, limit,
few-shot, lm-eval and modelkit versions: a re-run with nothing new loads no model at all.
lm-eval's own response cache is never used, so no cache is ever shared between models.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from modelkit.bench import paired_stats as stats
from modelkit.bench.evaluation import TaskCatalog, find_tasks, lm_eval_version
from modelkit.errors import CompareError, ModelkitError, about_model
from modelkit.cache import cache_dir, cache_root
from modelkit.present.compare import metric_label, wandb_run_line
from modelkit.verdicts import Verdict, of_compare

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from matplotlib.figure import Figure

CACHE_VERSION = 1
NOT_IDENTITY = ("base", "device")   # load options that do not change what the model is


@dataclass
class ModelInfo:
    """Provenance of one compared model."""

    role: str                              # "base" or "trained"
    label: str
    ref: str
    folder: str
    format: str
    fingerprint: str                       # artifact (+ its base): identity for cache and refusal
    artifact_fingerprint: str
    base_fingerprint: str | None
    base_folder: str | None
    options: dict[str, Any]
    dtype: str | None = None
    lm_eval_version: str = ""
    task_hashes: dict[str, str] = field(default_factory=dict)
    cache_keys: dict[str, str] = field(default_factory=dict)
    cached: dict[str, bool] = field(default_factory=dict)
    eval_seconds: float | None = None
    load: dict[str, Any] | None = None     # LoadReport facts (mode, tokenizer, notes)
    engine: dict[str, Any] | None = None   # which engine evaluated it: name, version, exact command

    @property
    def identity_options(self) -> dict[str, Any]:
        return {k: v for k, v in sorted(self.options.items()) if k not in NOT_IDENTITY}


def compare(base: str | Path, *trained: str | Path, tasks: str | Sequence[str],
            include_path: str | Path | None = None, limit: int | float | None = None,
            num_fewshot: int | None = None, batch_size: int = 8, log_to_wandb: bool = False,
            use_cache: bool = True, base_options: dict | None = None, trained_options: dict | None = None,
            progress: bool = True, wandb_project: str = "modelkit-compare", engine: Any = None,
            engine_options: dict | None = None, executor: Any = None) -> "CompareResult":
    """Evaluate ``base`` and each of ``trained`` on ``tasks`` and compare them pairwise.

    ``*_options`` go to :func:`modelkit.load` (``dtype``, ``base``, ``routing``, ``expert``,
    ``merge``, ``device``). Bad input (no trained model, limit 0, unknown task, missing
    data, an unopenable artifact, a model compared with itself) is refused before any
    model is loaded. ``use_cache=False`` evaluates again (and refreshes the cache).
    ``log_to_wandb`` logs the table, disagreements and plot to a W&B run (offline unless
    logged in; ``wandb sync`` uploads later). ``engine`` ("inprocess", the default, or
    "lm-eval", see :mod:`modelkit.bench.engines`) with ``engine_options`` evaluates each model;
    ``executor`` (see :mod:`modelkit.bench.executors`) runs one evaluation per task, in parallel.
    """
    from modelkit.bench.engines import get_engine

    names = _task_names(tasks)
    _check_settings(trained, limit, num_fewshot, batch_size)
    runner = get_engine(engine, **(engine_options or {}))
    catalog = find_tasks(names, include_path)
    models = [_identify("base", base, base_options)]
    models += [_identify("trained", t, trained_options) for t in trained]
    _refuse_self_compare(models)
    _assign_labels(models)

    runs: dict[str, dict[str, dict]] = {m.label: {} for m in models}
    todo = _from_cache(models, names, catalog, runs, limit=limit, num_fewshot=num_fewshot, use_cache=use_cache,
                       engine=runner)
    _evaluate_missing(models, todo, runs, catalog, limit=limit, num_fewshot=num_fewshot,
                      batch_size=batch_size, progress=progress, engine=runner, executor=executor)
    settings = result_settings(catalog, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size,
                               engine=runner)
    result = CompareResult(models, names, runs, settings)
    if log_to_wandb:
        result.log_to_wandb(project=wandb_project)
    return result


def evaluate_model(ref: str | Path, tasks: str | Sequence[str], *, role: str = "trained", label: str | None = None,
                   options: dict | None = None, include_path: str | Path | None = None,
                   limit: int | float | None = None, num_fewshot: int | None = None, batch_size: int = 8,
                   use_cache: bool = True, progress: bool = False, engine: Any = None,
                   engine_options: dict | None = None) -> tuple[ModelInfo, dict[str, dict]]:
    """One model of a comparison on its own, as :func:`compare` evaluates each of its
    models (same cache, same provenance): ``(ModelInfo, {task: run})``. Pair it with
    another model's runs in a :class:`CompareResult` for the statistics (``modelkit.watch``
    evaluates a baseline once and each checkpoint as it lands this way). ``engine`` and
    ``engine_options`` as for :func:`compare`."""
    from modelkit.bench.engines import get_engine

    runner = get_engine(engine, **(engine_options or {}))
    names = _task_names(tasks)
    _check_settings((ref,), limit, num_fewshot, batch_size)
    catalog = find_tasks(names, include_path)
    m = _identify(role, ref, options)
    if label:
        m.label = label
    else:
        _assign_labels([m])
    runs: dict[str, dict[str, dict]] = {m.label: {}}
    todo = _from_cache([m], names, catalog, runs, limit=limit, num_fewshot=num_fewshot, use_cache=use_cache,
                       engine=runner)
    _evaluate_missing([m], todo, runs, catalog, limit=limit, num_fewshot=num_fewshot,
                      batch_size=batch_size, progress=progress, engine=runner)
    return m, runs[m.label]


def result_settings(catalog: TaskCatalog, *, limit: Any, num_fewshot: Any, batch_size: int,
                    engine: Any = None) -> dict[str, Any]:
    """The settings a CompareResult records (and its statistics use)."""
    return {"limit": limit, "num_fewshot": num_fewshot, "batch_size": batch_size,
            "engine": engine.describe() if engine is not None else "inprocess",
            "include_path": catalog.include_path, "lm_eval_defaults_indexed": catalog.defaults,
            "n_resamples": stats.N_RESAMPLES, "seed": stats.SEED, "level": stats.LEVEL}


# --------------------------------------------------------------------------- input


def _task_names(tasks: str | Sequence[str]) -> list[str]:
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = list(dict.fromkeys(t.strip() for t in items if t and t.strip()))
    if not names:
        raise CompareError("no tasks given; name at least one lm-eval task (e.g. mk_topic)")
    return names


def _check_settings(trained: tuple, limit: Any, num_fewshot: Any, batch_size: Any) -> None:
    if not trained:
        raise CompareError("give the base model and at least one trained model")
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0 \
                or (isinstance(limit, float) and limit > 1):
            raise CompareError(f"limit must be a positive number of samples per task (or a fraction "
                               f"in (0, 1]); got {limit!r}")
    if num_fewshot is not None and (not isinstance(num_fewshot, int) or num_fewshot < 0):
        raise CompareError(f"num_fewshot must be an integer >= 0; got {num_fewshot!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise CompareError(f"batch_size must be an integer >= 1; got {batch_size!r}")


def _identify(role: str, ref: str | Path, options: dict | None) -> ModelInfo:
    """Open the artifact (and its base) and fingerprint it; no weights are read."""
    from modelkit.ops.load import open_for_load
    from modelkit.formats.open import split_facts

    opts = dict(options or {})
    try:
        # facts (lora_alpha=, ...) are supplied now: a bad one is refused before any model loads
        artifact, base_art = open_for_load(ref, opts.get("base"), split_facts(opts)[0])
    except ModelkitError as e:
        raise about_model(e, role, ref) from None
    afp = artifact.fingerprint
    bfp = base_art.fingerprint if base_art is not None else None
    fp = afp if bfp is None else hashlib.sha256(f"{afp}+{bfp}".encode()).hexdigest()[:16]
    return ModelInfo(role=role, label="", ref=str(ref), folder=str(artifact.folder), format=artifact.format,
                     fingerprint=fp, artifact_fingerprint=afp, base_fingerprint=bfp,
                     base_folder=str(base_art.folder) if base_art is not None else None,
                     options=opts, dtype=str(opts["dtype"]) if opts.get("dtype") else None)


def _refuse_self_compare(models: list[ModelInfo]) -> None:
    seen: dict[tuple, ModelInfo] = {}
    for m in models:
        ident = (m.fingerprint, json.dumps(m.identity_options, sort_keys=True, default=str))
        if ident in seen:
            other = seen[ident]
            raise CompareError(
                f"refusing to compare a model with itself: the {m.role} model {m.ref!r} and the "
                f"{other.role} model {other.ref!r} have the same fingerprint {m.fingerprint} and the "
                f"same load options {m.identity_options}. Check that the trained ref points at the "
                "trained weights (not the base), or pass different options (e.g. expert=, routing=)")
        seen[ident] = m


GENERIC_FOLDERS = re.compile(r"^(checkpoint-\d+|best_model|final_model|final|latest|model|checkpoints)$")


def _folder_label(folder: str, parents: int = 0) -> str:
    """A model's folder as a label: ``checkpoint-10`` and ``best_model`` say nothing
    without their run, so they get its name (``run-a/checkpoint-10``), as do names that
    would repeat another model's (``parents`` more folders)."""
    parts = Path(folder).parts
    keep = 1
    while keep < len(parts) and GENERIC_FOLDERS.match(parts[-keep]):
        keep += 1
    keep = min(keep + parents, len(parts))
    return "/".join(p for p in parts[-keep:] if p != "/")


def _assign_labels(models: list[ModelInfo]) -> None:
    def names(parents: int) -> list[str]:
        out = []
        for m in models:
            name = _folder_label(m.folder, parents) if Path(m.folder).name else m.ref
            if m.identity_options:
                name += "[" + ",".join(f"{k}={v}" for k, v in m.identity_options.items()) + "]"
            out.append(name)
        return out

    chosen = names(0)
    for parents in range(1, 4):   # two runs' checkpoint-10: told apart by their run folders
        if len(set(chosen)) == len(chosen):
            break
        longer = names(parents)
        chosen = [longer[i] if chosen.count(c) > 1 else c for i, c in enumerate(chosen)]
    used: set[str] = set()
    for m, name in zip(models, chosen):
        label, i = name, 2
        while label in used:   # the same folder twice (e.g. with different options): numbered
            label, i = f"{name}#{i}", i + 1
        used.add(label)
        m.label = label


# --------------------------------------------------------------------------- cache


def cache_key(m: ModelInfo, task: str, task_hash: str, limit: Any, num_fewshot: Any, version: str,
              engine: dict | None = None) -> str:
    """Key of one model's results on one task (see module docstring); ``engine`` is the
    engine's identity (absent for the in-process default, so its keys stay as they were)."""
    from modelkit import __version__

    fields = {"v": CACHE_VERSION, "fingerprint": m.fingerprint, "options": m.identity_options, "task": task,
              "task_hash": task_hash, "limit": limit, "num_fewshot": num_fewshot, "lm_eval": version,
              "modelkit": __version__}
    if engine and engine.get("engine") != "inprocess":
        fields["engine"] = engine
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cache_path(key: str) -> Path:
    return cache_dir() / "compare" / f"{key}.json"


def read_cache(key: str) -> dict | None:
    """A cached entry, or None (missing or unreadable: then it is recomputed)."""
    try:
        data = json.loads(cache_path(key).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("v") == CACHE_VERSION and "run" in data else None


def write_cache(key: str, entry: dict) -> None:
    path = cache_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"v": CACHE_VERSION, **entry}, default=str))
    os.replace(tmp, path)


def _from_cache(models: list[ModelInfo], names: list[str], catalog: TaskCatalog, runs: dict, *, limit: Any,
                num_fewshot: Any, use_cache: bool, engine: Any = None) -> dict[str, list[str]]:
    """Fill ``runs`` from the cache; the tasks still to evaluate per model label (their
    data checked before any model is loaded)."""
    version = lm_eval_version()
    todo: dict[str, list[str]] = {}
    for m in models:
        m.lm_eval_version, m.task_hashes = version, dict(catalog.hashes)
        for name in names:
            key = cache_key(m, name, catalog.hashes[name], limit, num_fewshot, version,
                            engine.identity() if engine is not None else None)
            m.cache_keys[name] = key
            hit = read_cache(key) if use_cache and cache_root() is not None else None
            m.cached[name] = hit is not None
            if hit is None:
                todo.setdefault(m.label, []).append(name)
                continue
            runs[m.label][name] = hit["run"]
            m.dtype = m.dtype or hit["model"].get("dtype")
            m.load = m.load or hit["model"].get("load")
            m.engine = m.engine or hit["model"].get("engine")
    if todo:
        catalog.build(sorted({n for ns in todo.values() for n in ns}))
    return todo


# --------------------------------------------------------------------------- evaluation


def _evaluate_missing(models: list[ModelInfo], todo: dict[str, list[str]], runs: dict, catalog: TaskCatalog,
                      *, limit: Any, num_fewshot: Any, batch_size: int, progress: bool, engine: Any,
                      executor: Any = None) -> None:
    """Evaluate every model with tasks still to do: here one after another, or one
    evaluation per task of ``executor``; results are cached here, as they arrive."""
    from functools import partial

    from modelkit.bench.engines import EvalJob, run_job
    from modelkit.progress import phase

    pending = [m for m in models if m.label in todo]
    jobs = [EvalJob(role=m.role, label=m.label, ref=m.ref, options=dict(m.options), fingerprint=m.fingerprint,
                    artifact_fingerprint=m.artifact_fingerprint, base_fingerprint=m.base_fingerprint,
                    tasks=todo[m.label], include_path=list(catalog.include_path), limit=limit,
                    num_fewshot=num_fewshot, batch_size=batch_size) for m in pending]
    for job in jobs:          # everything the engine can refuse is refused before anything runs
        engine.check(job)
    if executor is not None and jobs:
        for m, done in zip(pending, executor.map(partial(run_job, engine), jobs)):
            _record(m, done, runs)
        return
    if not pending:
        return
    with phase("evaluate", total=len(pending), unit="models", show=progress) as bar:
        for m, job in zip(pending, jobs):
            bar.update(0, note=f"{m.role} {m.label}: loading, then {', '.join(job.tasks)}")
            _record(m, engine.evaluate(job, catalog), runs)
            bar.update(1, note=f"{m.role} {m.label}: done")


def _record(m: ModelInfo, done: Any, runs: dict) -> None:
    """Take one engine run into ``m`` and ``runs``, and cache it."""
    m.eval_seconds = done.seconds
    m.dtype = done.dtype
    m.load = done.load
    m.engine = done.provenance
    for name, run in done.runs.items():
        runs[m.label][name] = run
        write_cache(m.cache_keys[name], {"key": m.cache_keys[name], "ref": m.ref, "task": name,
                                         "model": {"dtype": m.dtype, "load": m.load, "engine": m.engine,
                                                   "fingerprint": m.fingerprint},
                                         "seconds": m.eval_seconds, "created": time.time(), "run": run})


# --------------------------------------------------------------------------- result


TABLE_COLUMNS = ["model", "task", "metric", "base", "base_stderr", "trained", "trained_stderr", "delta",
                 "rel_delta", "ci_low", "ci_high", "p_mcnemar", "n", "higher_is_better", "verdict"]
DISAGREEMENT_COLUMNS = ["model", "task", "metric", "doc_id", "prompt", "target", "base_response",
                        "trained_response", "base_correct", "trained_correct", "winner"]
ALPHA = 0.05


@dataclass
class CompareResult:
    """Scores of a base and trained models on the same tasks, paired per sample.

    ``to_frame()`` one row per (trained model, task, metric); ``disagreements()`` the
    samples where exactly one of the two is right; ``plot()``, ``summary()``,
    ``to_json()``; ``models`` the provenance of every number.
    """

    models: list[ModelInfo]
    tasks: list[str]
    runs: dict[str, dict[str, dict]]          # model label -> task -> lm-eval run (per-sample scores)
    settings: dict[str, Any]
    wandb_run: str | None = None
    _frame: Any = field(default=None, repr=False)

    @property
    def base(self) -> ModelInfo:
        return self.models[0]

    @property
    def trained(self) -> list[ModelInfo]:
        return self.models[1:]

    # -- table ------------------------------------------------------------------------
    def to_frame(self) -> "pd.DataFrame":
        """One row per trained model, task (leaf tasks, then groups) and metric."""
        import pandas as pd

        if self._frame is None:
            rows = [row for m in self.trained for name in self.tasks for row in self._rows(m, name)]
            self._frame = pd.DataFrame(rows, columns=TABLE_COLUMNS)
        return self._frame.copy()

    def _rows(self, m: ModelInfo, name: str) -> list[dict]:
        b_run, t_run = self.runs[self.base.label][name], self.runs[m.label][name]
        rows = []
        for leaf, b_leaf in b_run["leaves"].items():
            t_leaf = t_run["leaves"].get(leaf)
            if t_leaf is None:
                continue
            for key, bm in b_leaf["metrics"].items():
                tm = t_leaf["metrics"].get(key)
                if tm is not None:
                    rows.append(_paired_row(m.label, leaf, bm, tm, b_leaf["doc_ids"], t_leaf["doc_ids"], self.settings))
        for group, b_group in b_run.get("groups", {}).items():
            t_group = t_run.get("groups", {}).get(group, {"metrics": {}})
            for key, bm in b_group["metrics"].items():
                tm = t_group["metrics"].get(key)
                if tm is not None:
                    rows.append(_unpaired_row(m.label, group, bm, tm))
        return rows

    def disagreements(self) -> "pd.DataFrame":
        """Samples of 0/1 metrics where one model is right and the other wrong."""
        import pandas as pd

        rows = []
        for m in self.trained:
            for name in self.tasks:
                b_run, t_run = self.runs[self.base.label][name], self.runs[m.label][name]
                for leaf, b_leaf in b_run["leaves"].items():
                    t_leaf = t_run["leaves"].get(leaf)
                    if t_leaf is not None:
                        rows += _disagreeing(m.label, leaf, b_leaf, t_leaf)
        return pd.DataFrame(rows, columns=DISAGREEMENT_COLUMNS)

    # -- views ------------------------------------------------------------------------
    def plot(self, path: str | Path | None = None) -> "Figure":
        """Values with stderr bars per task and model, and each delta with its interval."""
        from modelkit.present.compare import compare_figure

        fig = compare_figure(self.to_frame(), [m.label for m in self.models])
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig

    def log_to_wandb(self, project: str = "modelkit-compare", run: Any = None) -> str:
        """Log table, disagreements and plot to W&B (offline unless logged in); the run's folder."""
        from modelkit.present.compare import log_to_wandb

        config = {"models": [{k: getattr(m, k) for k in ("role", "label", "ref", "format", "fingerprint",
                                                          "options", "dtype", "lm_eval_version", "task_hashes")}
                             for m in self.models],
                  "tasks": self.tasks, **self.settings}
        self.wandb_run = log_to_wandb(self.to_frame(), self.disagreements(), self.plot(), config,
                                      project=project, run=run)
        return self.wandb_run

    def summary(self) -> str:
        """The provenance of each model, then the table, one line per row."""
        frame = self.to_frame()
        s = self.settings
        lines = [f"modelkit compare: {len(self.models)} models, {len(self.tasks)} task(s), "
                 f"lm-eval {self.base.lm_eval_version}, limit {s['limit']}, "
                 f"few-shot {s['num_fewshot'] if s['num_fewshot'] is not None else 'task default'}"
                 + (f", engine {s['engine']}" if s.get("engine") else "")]
        for m in self.models:
            hits = sum(m.cached.values())
            lines.append(f"  {m.role:<8}{m.label}: {m.ref}")
            lines.append(f"          format {m.format}, fingerprint {m.fingerprint}"
                         + (f" (artifact {m.artifact_fingerprint} + base {m.base_fingerprint})" if m.base_fingerprint else "")
                         + f", dtype {m.dtype or 'as stored'}, options {m.identity_options or '{}'}"
                         + f", cached {hits}/{len(m.cached)} task(s)")
        lines.append("  tasks   " + ", ".join(f"{n} (config {h})" for n, h in self.base.task_hashes.items()))
        lines += self.context_lines()
        level = int(round(s["level"] * 100))
        head = (f"{'model':<18} {'task':<16} {'metric':<16} {'base':>16} {'trained':>16} {'delta':>9} "
                f"{f'{level}% CI':>20} {'McNemar p':>10} {'n':>5}  verdict")
        lines += ["", head, "-" * len(head)]
        for r in frame.itertuples(index=False):
            lines.append(f"{_cut(r.model, 18):<18} {_cut(r.task, 16):<16} {_cut(r.metric, 16):<16} "
                         f"{_pm(r.base, r.base_stderr):>16} {_pm(r.trained, r.trained_stderr):>16} "
                         f"{_num(r.delta, signed=True):>9} {_ci(r.ci_low, r.ci_high):>20} {_p(r.p_mcnemar):>10} "
                         f"{'' if _nan(r.n) else int(r.n):>5}  {r.verdict}")
        dis = self.disagreements()
        if len(dis):
            counts = dis.groupby(["model", "task", "metric", "winner"]).size()
            lines.append("")
            several = dis["model"].nunique() > 1
            lines.append("samples one model got right and the other wrong (0/1 metrics): " + "; ".join(
                f"{m + ' ' if several else ''}{t} {met}: {w} right {c}" for (m, t, met, w), c in counts.items()))
            from modelkit.bench.codeeval.lm_task import (
                summary_lines,  # code tasks: which problems changed
            )
            lines += summary_lines(dis)
        if self.wandb_run:
            lines.append(f"W&B run: {wandb_run_line(self.wandb_run)}")
        return "\n".join(lines)

    def truncated(self) -> list[tuple[str, str, dict]]:
        """``(model label, leaf task, cut)`` for every run in which lm-eval cut requests
        from the left to fit the model's context (``cut``: see
        :func:`modelkit.bench.context_fit.truncated_requests`)."""
        return [(label, leaf, r["context"]) for label, tasks in self.runs.items() for run in tasks.values()
                for leaf, r in run.get("leaves", {}).items() if (r.get("context") or {}).get("truncated")]

    def context_lines(self) -> list[str]:
        """The summary's lines on prompts cut to fit a model's context, and on runs where
        that was not checked (none when every prompt fitted)."""
        lines = []
        for label, leaf, cut in self.truncated():
            ids = ", ".join(map(str, cut["doc_ids"])) + (" ..." if cut["truncated"] > len(cut["doc_ids"]) else "")
            lines.append(f"  WARNING {leaf} [{label}]: lm-eval cut {cut['truncated']} of {cut['of']} documents' "
                         f"requests from the left to fit the model's context ({cut['limit']} tokens): their "
                         f"scores measure truncated prompts (doc ids {ids})")
        unchecked = self.context_not_checked()
        if unchecked:
            lines.append("  note    whether the prompts fit the model's context is not checked for "
                         + "; ".join(f"{label} ({', '.join(leaves)})" for label, leaves in unchecked.items())
                         + " (evaluated in another process, or cached before modelkit counted cut prompts)")
        return lines

    def context_not_checked(self) -> dict[str, list[str]]:
        """``{model label: leaf tasks}`` whose requests were not checked against the model's
        context (a run made by another engine's process, or cached before the check; an
        in-process run records the check, None for requests lm-eval never cuts)."""
        out: dict[str, list[str]] = {}
        for label, tasks in self.runs.items():
            for run in tasks.values():
                for leaf, r in run.get("leaves", {}).items():
                    if "context" not in r:
                        out.setdefault(label, []).append(leaf)
        return out

    def outcome(self) -> Verdict:
        """The verdict every view opens with (the rule: :func:`modelkit.verdicts.of_compare`)."""
        return of_compare(self)

    def to_dict(self, include_runs: bool = False) -> dict[str, Any]:
        out = {"models": [asdict(m) for m in self.models], "tasks": self.tasks, "settings": self.settings,
               "table": _records(self.to_frame()), "n_disagreements": int(len(self.disagreements())),
               "wandb_run": self.wandb_run}
        if include_runs:
            out["runs"] = self.runs
        return out

    def to_json(self, include_runs: bool = False, **kw: Any) -> str:
        return json.dumps(self.to_dict(include_runs), default=str, **kw)

    def __repr__(self) -> str:
        return f"CompareResult({', '.join(m.label for m in self.models)}; tasks {', '.join(self.tasks)})"


def _paired_row(label: str, task: str, bm: dict, tm: dict, b_ids: list, t_ids: list, settings: dict) -> dict:
    t_index = {d: i for i, d in enumerate(t_ids)}
    pairs = [(bm["samples"][i], tm["samples"][t_index[d]]) for i, d in enumerate(b_ids)
             if d in t_index and bm["samples"][i] is not None and tm["samples"][t_index[d]] is not None]
    row = _unpaired_row(label, task, bm, tm)
    row["n"] = len(pairs)
    stat = bm.get("aggregation")
    if not pairs or stat is None:
        row["verdict"] = "no paired test" + ("" if pairs else " (no shared samples)")
        return row
    b_vals, t_vals = [p[0] for p in pairs], [p[1] for p in pairs]
    try:
        boot = stats.paired_bootstrap(b_vals, t_vals, stat, n_resamples=settings["n_resamples"],
                                      seed=settings["seed"], level=settings["level"])
    except (ValueError, TypeError, ZeroDivisionError) as e:
        row["verdict"] = f"no paired test ({e})"
        return row
    row.update(ci_low=boot.low, ci_high=boot.high)
    if row["base_stderr"] is None or _nan(row["base_stderr"]):
        row["base_stderr"] = boot.base_stderr
    if row["trained_stderr"] is None or _nan(row["trained_stderr"]):
        row["trained_stderr"] = boot.trained_stderr
    significant = boot.excludes_zero()
    if stat == "mean" and stats.is_binary(b_vals) and stats.is_binary(t_vals):
        row["p_mcnemar"] = stats.mcnemar_exact(b_vals, t_vals).p_value
        significant = significant and row["p_mcnemar"] < ALPHA
    row["verdict"] = _verdict(row["delta"], significant, row["higher_is_better"])
    return row


def _unpaired_row(label: str, task: str, bm: dict, tm: dict) -> dict:
    b, t = bm["value"], tm["value"]
    delta = t - b if b is not None and t is not None else math.nan
    rel = delta / abs(b) if b not in (None, 0) and not _nan(delta) else math.nan
    return {"model": label, "task": task, "metric": metric_label(bm), "base": _f(b), "base_stderr": _f(bm["stderr"]),
            "trained": _f(t), "trained_stderr": _f(tm["stderr"]), "delta": delta, "rel_delta": rel,
            "ci_low": math.nan, "ci_high": math.nan, "p_mcnemar": math.nan, "n": math.nan,
            "higher_is_better": bm.get("higher_is_better"), "verdict": "no paired test (group aggregate)"}


def _verdict(delta: float, significant: bool, higher_is_better: bool | None) -> str:
    if not significant:
        return "no significant change"
    if higher_is_better is None:
        return "changed"
    return "better" if (delta > 0) == bool(higher_is_better) else "worse"


def _disagreeing(label: str, task: str, b_leaf: dict, t_leaf: dict) -> list[dict]:
    rows = []
    b_docs = {d["doc_id"]: d for d in b_leaf["docs"]}
    t_docs = {d["doc_id"]: d for d in t_leaf["docs"]}
    t_index = {d: i for i, d in enumerate(t_leaf["doc_ids"])}
    for key, bm in b_leaf["metrics"].items():
        tm = t_leaf["metrics"].get(key)
        if tm is None or bm.get("aggregation") != "mean":
            continue
        b_all = [v for v in bm["samples"] if v is not None]
        t_all = [v for v in tm["samples"] if v is not None]
        if not (stats.is_binary(b_all) and stats.is_binary(t_all)):
            continue
        for i, doc_id in enumerate(b_leaf["doc_ids"]):
            if doc_id not in t_index:
                continue
            bv, tv = bm["samples"][i], tm["samples"][t_index[doc_id]]
            if bv is None or tv is None or bv == tv:
                continue
            bd, td = b_docs.get(doc_id, {}), t_docs.get(doc_id, {})
            rows.append({"model": label, "task": task, "metric": metric_label(bm), "doc_id": doc_id,
                         "prompt": bd.get("prompt", ""), "target": bd.get("target", ""),
                         "base_response": bd.get("response", ""), "trained_response": td.get("response", ""),
                         "base_correct": bool(bv), "trained_correct": bool(tv),
                         "winner": "trained" if tv else "base"})
    return rows


def _records(frame: "pd.DataFrame") -> list[dict]:
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
            for r in frame.to_dict("records")]


def _f(x: Any) -> float:
    return math.nan if x is None else float(x)


def _nan(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _num(x: Any, signed: bool = False) -> str:
    if _nan(x):
        return "-"
    return f"{x:+.4g}" if signed else f"{x:.4g}"


def _pm(v: Any, se: Any) -> str:
    return _num(v) if _nan(se) else f"{v:.4g} ± {se:.2g}"


def _ci(lo: Any, hi: Any) -> str:
    return "-" if _nan(lo) else f"[{lo:+.3g}, {hi:+.3g}]"


def _p(p: Any) -> str:
    return "-" if _nan(p) else f"{p:.2g}"


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"
