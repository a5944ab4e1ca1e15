"""modelkit: see what is in a checkpoint, load it, export it, diff it, benchmark it.

Public API (imported lazily, so ``import modelkit`` stays cheap)::

    open_artifact(ref, base=None)           -> Artifact
    inspect(ref, base=None, deep=False)     -> InspectionReport
    load(ref, base=None, dtype=None, ...)   -> LoadResult (model, tokenizer, report)
    export(ref, out, ...)                   -> ExportResult
    diff(a, b, ...)                         -> DiffResult
    compare(base, trained, tasks, ...)      -> CompareResult  (engine="lm-eval", executor=...)
    compare_results(base_log, trained_log)  -> CompareResult  (per-sample logs made anywhere)
    watch(run_dir, tasks, baseline, ...)    -> WatchResult

Importing ``modelkit`` also registers the ``dylora-moe`` model type with transformers'
Auto classes, so ``AutoModelForCausalLM.from_pretrained`` opens DyLoRA-MoE folders.
"""
from __future__ import annotations

import importlib
from typing import Any

from modelkit.errors import ModelkitError
from modelkit.models import install_auto_registration
from modelkit.models.loader_slot import set_artifact_loader

__version__ = "0.1.0"

# `dylora-moe` for AutoConfig / AutoModelForCausalLM: now if transformers is imported, else
# right after it is (never imported from here: `import modelkit` stays cheap)
install_auto_registration()


def _load_artifact(*args: Any, **kwargs: Any) -> Any:
    """:func:`modelkit.load`, imported on first use: how the Auto class opens DyLoRA-MoE folders."""
    return __getattr__("load")(*args, **kwargs)


set_artifact_loader(_load_artifact)

_LAZY = {
    "open_artifact": ("modelkit.formats.open", "open_artifact"),
    "inspect": ("modelkit.ops.inspect", "inspect"),
    "InspectionReport": ("modelkit.ops.inspect", "InspectionReport"),
    "load": ("modelkit.ops.load", "load"),
    "LoadResult": ("modelkit.ops.load", "LoadResult"),
    "export": ("modelkit.ops.export", "export"),
    "ExportResult": ("modelkit.ops.export", "ExportResult"),
    "diff": ("modelkit.ops.diff", "diff"),
    "DiffResult": ("modelkit.ops.diff", "DiffResult"),
    "compare": ("modelkit.ops.compare", "compare"),
    "CompareResult": ("modelkit.ops.compare", "CompareResult"),
    "compare_results": ("modelkit.ops.compare_results", "compare_results"),
    "watch": ("modelkit.ops.watch", "watch"),
    "WatchResult": ("modelkit.ops.watch", "WatchResult"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'modelkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))


__all__ = ["ModelkitError", *_LAZY]
