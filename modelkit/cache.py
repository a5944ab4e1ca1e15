"""The one reader of ``$MODELKIT_CACHE``: where modelkit keeps what outlives a run
(W&B downloads, evaluation results, watch ledgers, expected-tensor and schema memos).

Core (imports nothing of modelkit), so the schema memo in ``schemas`` and the layers
above read the same folder.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

CACHE_OFF = ("", "0", "off", "false", "none")


def cache_root() -> Path | None:
    """modelkit's cache folder (default ~/.cache/modelkit), or None when ``$MODELKIT_CACHE``
    is ``off`` (also ``0``/``false``/``none``/empty): nothing is then cached across runs."""
    root = os.environ.get("MODELKIT_CACHE")
    if root is not None and root.strip().lower() in CACHE_OFF:
        return None
    return Path(root).expanduser() if root else Path.home() / ".cache" / "modelkit"


def cache_dir() -> Path:
    """Where modelkit keeps downloads, results and ledgers: :func:`cache_root`, or with
    ``MODELKIT_CACHE=off`` a per-user scratch folder in the temp dir (a folder is still
    needed; never a folder literally named ``off``)."""
    return cache_root() or Path(tempfile.gettempdir()) / f"modelkit-nocache-{os.getuid()}"
