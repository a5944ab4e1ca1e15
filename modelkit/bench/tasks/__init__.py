"""lm-eval tasks shipped with modelkit (YAML + JSONL, no download).

=================  =====================  ===============================================
task               output type            what it measures
=================  =====================  ===============================================
``mk_topic``       multiple_choice        kind of the thing a sentence names (4 choices)
``mk_topic_gen``   generate_until         the same, answered by greedy generation
``mk_count``       multiple_choice        next digit of a counting line (control task)
``mk_text``        loglikelihood_rolling  perplexity of held-out synthetic sentences
=================  =====================  ===============================================

The demo pair (:mod:`modelkit.ui.demo_pair`) is trained on this synthetic world: its LoRA
fine-tune learns ``mk_topic``; ``mk_count`` is what neither should change.
Use them by name with :func:`modelkit.compare` or point lm-eval's
``--include_path`` at :data:`TASKS_DIR`.
"""
from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
TRAINED_TASK = "mk_topic"
CONTROL_TASK = "mk_count"


def shipped_task_names() -> list[str]:
    """Names of the shipped tasks (one YAML each)."""
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))
