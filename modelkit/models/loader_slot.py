"""The function ``DyLoRAMoEForCausalLM.from_pretrained`` hands an artifact folder to.

``models/`` sits below :mod:`modelkit.ops.load` (which builds these models), so the loader is
injected here by ``import modelkit`` and never imported from ``models/``: no import cycle.
"""
from __future__ import annotations

from typing import Any, Callable

from modelkit.errors import LoadError

_loader: Callable[..., Any] | None = None


def set_artifact_loader(load: Callable[..., Any]) -> None:
    """Make ``load`` (:func:`modelkit.load`'s signature) what the Auto class opens folders with."""
    global _loader
    _loader = load


def artifact_loader() -> Callable[..., Any]:
    """The injected loader; a typed error if ``import modelkit`` has not set one."""
    if _loader is None:
        raise LoadError("no artifact loader is set: `import modelkit` sets modelkit.load as the "
                        "loader of DyLoRA-MoE folders")
    return _loader
