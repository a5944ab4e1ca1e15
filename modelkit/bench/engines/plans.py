"""The commands that run a comparison elsewhere: ``compare --engine lm-eval --print-commands``.

For a cluster node (or a GPU machine) where modelkit should not drive the run itself:
per model, the export (only when lm-eval cannot open the artifact as it is), the lm-eval
CLI run with ``--log_samples``, and at the end the ``modelkit compare-results`` that
pairs the logs. The models are opened and fingerprinted here, exactly as ``compare``
would; nothing is evaluated.
"""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, Sequence

from modelkit.bench.engines.lm_eval_cli import LmEvalEngine, _safe


def plan_commands(base: str | Path, *trained: str | Path, tasks: str | Sequence[str],
                  include_path: Any = None, limit: int | float | None = None, num_fewshot: int | None = None,
                  batch_size: int = 8, base_options: dict | None = None, trained_options: dict | None = None,
                  engine_options: dict | None = None) -> list[str]:
    """Shell lines (comments start with ``#``) that do what ``compare(engine="lm-eval")`` does."""
    from modelkit.bench.engines import EvalJob
    from modelkit.bench.evaluation import find_tasks
    from modelkit.ops.compare import (
        _assign_labels,
        _check_settings,
        _identify,
        _refuse_self_compare,
        _task_names,
    )

    opts = dict(engine_options or {})
    samples = opts.pop("samples_dir", None) or "modelkit-samples"
    work = opts.pop("work_dir", None) or "modelkit-exports"
    engine = LmEvalEngine(**opts)
    names = _task_names(tasks)
    _check_settings(trained, limit, num_fewshot, batch_size)
    catalog = find_tasks(names, include_path)
    models = [_identify("base", base, base_options)] + [_identify("trained", t, trained_options) for t in trained]
    _refuse_self_compare(models)
    _assign_labels(models)
    lines = [f"# modelkit compare plan: {engine.describe()}; tasks {', '.join(names)}; limit {limit}"]
    if catalog.include_path:
        lines.append(f"# tasks from {catalog.include_path[0]}: put modelkit's shipped task YAMLs beside them "
                     "if you use both")
    for m in models:
        job = EvalJob(role=m.role, label=m.label, ref=m.ref, options=dict(m.options), fingerprint=m.fingerprint,
                      artifact_fingerprint=m.artifact_fingerprint, base_fingerprint=m.base_fingerprint,
                      tasks=names, include_path=list(catalog.include_path), limit=limit, num_fewshot=num_fewshot,
                      batch_size=batch_size)
        lines.append(f"# {m.role} {m.label}: {m.ref} (fingerprint {m.fingerprint})")
        lines += engine.plan(job, work, samples)
    lines.append(shlex.join(["modelkit", "compare-results"] + [str(Path(samples) / _safe(m.label)) for m in models]))
    return lines


def print_plan(*args: Any, **kw: Any) -> str:
    """:func:`plan_commands` as one text."""
    return "\n".join(plan_commands(*args, **kw))
