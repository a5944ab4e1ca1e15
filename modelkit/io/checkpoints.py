"""Trainer checkpoint folders: ``checkpoint-N/`` named by their step, ordered by it.

The one place that says what a checkpoint folder is called and in which order a run's
checkpoints come (by step as a number: ``checkpoint-900`` before ``checkpoint-1000``).
"""
from __future__ import annotations

import re
from pathlib import Path

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_step(folder: Path | str) -> int | None:
    """N of a folder named ``checkpoint-N``, else None."""
    m = CHECKPOINT.match(Path(folder).name)
    return int(m.group(1)) if m else None


def checkpoint_folders(folder: Path) -> list[Path]:
    """The ``checkpoint-N/`` folders directly inside ``folder``, oldest (lowest N) first;
    [] when ``folder`` cannot be listed."""
    try:
        children = list(Path(folder).iterdir())
    except OSError:
        return []
    found = [(checkpoint_step(p), p) for p in children]
    return [p for step, p in sorted((s, p) for s, p in found if s is not None) if p.is_dir()]
