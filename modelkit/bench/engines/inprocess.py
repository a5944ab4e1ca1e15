"""The ``inprocess`` engine: :func:`modelkit.load` the model and run lm-eval on it in this
process. The default; the only engine for formats no other engine can open (a routed
DyLoRA-MoE mixture) and the cheapest for small models."""
from __future__ import annotations

import gc
import time
from typing import Any

from modelkit.bench.engines.base import Engine, EngineRun, EvalJob
from modelkit.errors import CompareError, ModelkitError, about_model

GC_ABOVE_BYTES = 1 << 30             # gc.collect() (~0.25 s) only after models this large


class InProcessEngine(Engine):
    name = "inprocess"

    def evaluate(self, job: EvalJob, catalog: Any = None) -> EngineRun:
        from modelkit.bench.evaluation import evaluate, find_tasks, lm_eval_version

        catalog = catalog if catalog is not None else find_tasks(job.tasks, job.include_path or None)
        model, tokenizer, report = load_model(job.role, job.ref, job.options)
        t0 = time.perf_counter()
        try:
            runs = evaluate(model, tokenizer, catalog, job.tasks, limit=job.limit, num_fewshot=job.num_fewshot,
                            batch_size=job.batch_size)
        except CompareError as e:  # a task this model cannot run (e.g. no room to generate): say which model
            raise CompareError(f"the {job.role} model {job.ref!r}: {e.problem}", e.path) from None
        seconds = time.perf_counter() - t0
        load = {k: getattr(report, k) for k in ("format", "layout", "mode", "dtype", "base", "options",
                                                "tokenizer_from", "notes", "warnings")}
        big = sum(p.numel() * p.element_size() for p in model.parameters()) > GC_ABOVE_BYTES
        del model, tokenizer
        if big:             # free a large model's reference cycles before loading the next
            gc.collect()
        return EngineRun(runs=runs, dtype=str(report.dtype), load=load, seconds=seconds,
                         provenance={"engine": self.name, "version": lm_eval_version(),
                                     "command": f"lm_eval.simple_evaluate(HFLM(modelkit.load({job.ref!r}, "
                                                f"**{job.options!r})))"})


def load_model(role: str, ref: str, options: dict):
    """:func:`modelkit.load` with errors that say which model they are about."""
    from modelkit.ops.load import (
        load,  # resolved per call: a test may replace modelkit.ops.load.load
    )

    try:
        result = load(ref, **options)
    except ModelkitError as e:
        raise about_model(e, role, ref) from None
    except Exception as e:  # torch / transformers failures while building the model
        raise CompareError(f"cannot load the {role} model {ref!r} ({type(e).__name__}: {e})") from e
    if result.tokenizer is None:
        raise CompareError(f"the {role} model {ref!r} has no tokenizer (in the artifact or its base); "
                           "lm-eval needs one", ref)
    return result.model, result.tokenizer, result.report
