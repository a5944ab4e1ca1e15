"""Engines that evaluate one model for ``compare`` (and ``watch``).

* ``inprocess`` (:class:`InProcessEngine`): :func:`modelkit.load` + lm-eval in this
  process; the default.
* ``lm-eval`` (:class:`LmEvalEngine`): the lm-eval CLI in a subprocess on a verified
  standard folder, with the ``hf`` backend (optionally under ``accelerate launch``) or
  ``vllm``; per-sample logs read back and checked against the model's fingerprint.

modelkit has no inference engine of its own: both hand the work to lm-eval.
"""
from __future__ import annotations

from typing import Any

from modelkit.bench.engines.base import Engine, EngineRun, EvalJob, run_job
from modelkit.bench.engines.inprocess import InProcessEngine
from modelkit.bench.engines.lm_eval_cli import LmEvalEngine
from modelkit.errors import CompareError

ENGINES = {"inprocess": InProcessEngine, "lm-eval": LmEvalEngine}


def get_engine(engine: str | Engine | None = None, **options: Any) -> Engine:
    """An engine by name (``options`` are its settings), or ``engine`` itself."""
    if isinstance(engine, Engine):
        if options:
            raise CompareError("engine options apply to an engine given by name")
        return engine
    name = engine or "inprocess"
    if name not in ENGINES:
        raise CompareError(f"unknown engine {name!r}; use one of {', '.join(ENGINES)}")
    if name == "inprocess" and options:
        raise CompareError(f"the inprocess engine takes no engine options (got {', '.join(options)}); "
                           "use --engine lm-eval for --model-args, --backend and the like")
    try:
        return ENGINES[name](**options)
    except TypeError as e:
        raise CompareError(f"bad option for the {name} engine: {e}") from None


__all__ = ["ENGINES", "Engine", "EngineRun", "EvalJob", "InProcessEngine", "LmEvalEngine", "get_engine", "run_job"]
