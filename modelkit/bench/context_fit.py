"""Whether each request of a benchmark fits the evaluated model's context.

lm-eval's HFLM leaves ``max_length - max_gen_toks`` tokens for a generation prompt and
``max_length + 1`` for a log-likelihood request (context + continuation). A longer one is
cut from the left without failing (one line in its log), so its score measures a truncated
prompt; a generation task that asks for ``max_gen_toks >= max_length`` fails with an
``AssertionError`` deep in the generation loop. :func:`check_generation_room` refuses the
second before anything runs; :func:`truncated_requests` counts the first over the requests
lm-eval logged. This is our own small code because lm-eval only logs the cut: it neither
counts it nor says which documents.
"""
from __future__ import annotations

from typing import Any

from modelkit.errors import CompareError

CHECKED_TYPES = ("generate_until", "loglikelihood", "multiple_choice")   # rolling windows never cut


def generation_budget(lm: Any, task: Any) -> int | None:
    """The ``max_gen_toks`` lm-eval gives a generation task's requests (None for other tasks)."""
    if (getattr(task, "OUTPUT_TYPE", None) or task.config.output_type) != "generate_until":
        return None
    return _max_gen_toks(lm, getattr(task.config, "generation_kwargs", None))


def _max_gen_toks(lm: Any, gen_kwargs: dict | None) -> int:
    """``max_gen_toks`` as lm-eval's HFLM reads it from a request's generation kwargs."""
    from lm_eval.models.utils import normalize_gen_kwargs

    return int(normalize_gen_kwargs({"do_sample": False, **(gen_kwargs or {})}, lm.max_gen_toks)["max_gen_toks"])


def check_generation_room(lm: Any, leaves: dict[str, Any]) -> None:
    """CompareError naming every generation task whose ``max_gen_toks`` leaves the model
    no room for a prompt (lm-eval would fail inside its generation loop)."""
    short = [(name, budget) for name, task in leaves.items()
             if (budget := generation_budget(lm, task)) is not None and budget >= lm.max_length]
    if short:
        listed = ", ".join(f"{name} generates up to {budget} tokens" for name, budget in short)
        raise CompareError(f"{listed}, but the model holds {lm.max_length} positions (its config's "
                           "max_position_embeddings or n_positions): no room is left for the prompt. Use a "
                           "model with a longer context, or a copy of the task with a smaller "
                           "generation_kwargs.max_gen_toks (--include-path)")


def truncated_requests(lm: Any, samples: list[dict], output_type: str) -> dict[str, Any] | None:
    """``{"truncated": documents with a request lm-eval cut from the left, "of": documents,
    "doc_ids": the first 20 cut, "limit": tokens a request could hold}`` for one leaf task's
    logged samples; None for a task whose requests are never cut (rolling log-likelihood)."""
    if output_type not in CHECKED_TYPES:
        return None
    cut: set[int] = set()
    limit = lm.max_length + 1
    encoded = getattr(lm, "pair_tokens", {})  # lm-eval's own encodings, kept as it made them
    for sample in samples:
        for context, second in (args[:2] for args in sample.get("arguments") or []):
            if output_type == "generate_until":
                limit = lm.max_length - _max_gen_toks(lm, second)
                over = len(lm.tok_encode(context)) > limit
            else:
                tokens = encoded.get((context, second))
                if tokens is None:  # lm-eval did not encode it as a pair (an empty context)
                    ctx, cont = lm._encode_pair(context, second) if context else ([0], lm.tok_encode(second))
                    tokens = len(ctx) + len(cont)
                over = tokens > limit
            if over:
                cut.add(sample["doc_id"])
                break
    docs = {s["doc_id"] for s in samples}
    return {"truncated": len(cut), "of": len(docs), "doc_ids": sorted(cut)[:20], "limit": limit}
