"""``compare_results``: paired statistics from per-sample logs produced anywhere.

The hand-off boundary for runs made on a cluster (or by anyone): lm-eval
``--log_samples`` folders, EvalPlus result files, the folders ``compare --engine lm-eval
--samples-dir`` keeps. Each log is read by :mod:`modelkit.bench.sample_logs` into the runs the
in-process path produces, pairs whose documents, task configs or limits differ are
refused, and the same :class:`~modelkit.ops.compare.CompareResult` (same statistics, same
table) is built as ``compare`` builds.
"""
from __future__ import annotations

from pathlib import Path

from modelkit.bench import paired_stats as stats
from modelkit.bench.sample_logs import SampleLog, check_pairable, read_samples
from modelkit.errors import CompareError
from modelkit.ops.compare import CompareResult, ModelInfo


def compare_results(base: str | Path, *trained: str | Path) -> CompareResult:
    """Compare the per-sample log ``base`` with each of ``trained`` (see module docstring)."""
    if not trained:
        raise CompareError("give the base model's samples and at least one trained model's samples")
    logs = [read_samples(base)] + [read_samples(t) for t in trained]
    for other in logs[1:]:
        check_pairable(logs[0], other)
    models = [_model_info("base" if i == 0 else "trained", log) for i, log in enumerate(logs)]
    _unique_labels(models)
    runs = {m.label: log.runs() for m, log in zip(models, logs)}
    tasks = list(runs[models[0].label])
    settings = {"limit": logs[0].limit, "num_fewshot": None, "batch_size": None, "engine": f"{logs[0].kind} logs",
                "samples": [log.path for log in logs], "n_resamples": stats.N_RESAMPLES, "seed": stats.SEED,
                "level": stats.LEVEL}
    return CompareResult(models, tasks, runs, settings)


def _model_info(role: str, log: SampleLog) -> ModelInfo:
    m = log.model
    fp = m.get("fingerprint")
    checked = bool(m.get("fingerprint_checked"))
    return ModelInfo(role=role, label=log.label, ref=str(m.get("ref") or m.get("name") or log.path),
                     folder=str(Path(log.path).parent), format=f"{log.kind} log",
                     fingerprint=fp or "not checked", artifact_fingerprint=m.get("artifact_fingerprint") or "not checked",
                     base_fingerprint=m.get("base_fingerprint"), base_folder=None,
                     options={}, dtype=str((m.get("args") or {}).get("dtype") or "") or None,
                     lm_eval_version=log.engine_version or "", task_hashes=dict(log.config_hashes),
                     cached={t: False for t in log.runs()},
                     load={"samples": log.path, "model_args": m.get("args"), "fingerprint_checked": checked,
                           "record": m.get("record")},
                     engine=m.get("engine") or {"engine": log.kind, "version": log.engine_version,
                                                "backend": m.get("backend")})


def _unique_labels(models: list[ModelInfo]) -> None:
    used: set[str] = set()
    for m in models:
        label, i = m.label, 2
        while label in used:
            label, i = f"{m.label}#{i}", i + 1
        used.add(label)
        m.label = label
