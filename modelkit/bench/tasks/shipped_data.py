"""Dataset loader for the shipped tasks (``custom_dataset`` in their YAML).

lm-eval resolves ``dataset_kwargs.data_files`` against the working directory; the shipped
YAMLs name files relative to this package instead, and this loader reads them (plain
JSON lines, no download, no Arrow cache).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TASKS_DIR = Path(__file__).parent


def load(data_files: dict[str, str] | None = None, **_: Any):
    """A ``datasets.DatasetDict`` with one split per entry of ``data_files``."""
    import datasets

    if not data_files:
        raise ValueError("shipped task YAML names no data_files")
    splits = {}
    for split, rel in data_files.items():
        path = TASKS_DIR / rel
        if not path.is_file():
            raise FileNotFoundError(f"{path}: data file of a shipped modelkit task is missing")
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        splits[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(splits)
