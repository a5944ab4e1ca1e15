"""Real modules for artifacts no dense view can express (DyLoRA-MoE routing).

Importing this package costs only the standard library. :func:`register_auto` teaches
transformers' Auto classes the ``dylora-moe`` model type; :func:`install_auto_registration`
(called by ``import modelkit``) runs it now when transformers is already imported, else
right after ``import transformers`` finishes, so ``import modelkit`` never imports it.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings
from typing import Any

__all__ = ["build_dylora_model", "install_auto_registration", "register_auto"]

_registered = False


def register_auto() -> None:
    """``AutoConfig`` / ``AutoModelForCausalLM`` learn ``model_type: "dylora-moe"``. Idempotent."""
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    from .dylora import MODEL_TYPE, DyLoRAMoEConfig, DyLoRAMoEForCausalLM

    AutoConfig.register(MODEL_TYPE, DyLoRAMoEConfig, exist_ok=True)
    AutoModelForCausalLM.register(DyLoRAMoEConfig, DyLoRAMoEForCausalLM, exist_ok=True)
    _registered = True


def _register_quietly() -> None:
    module = sys.modules.get(f"{__name__}.dylora")
    if module is not None and not hasattr(module, "_register"):
        return  # transformers was imported by modelkit.models.dylora itself, which registers at its end
    try:
        register_auto()
    except Exception as e:  # never break the user's `import transformers`
        warnings.warn(f"modelkit could not register the dylora-moe model type with transformers: "
                      f"{type(e).__name__}: {e}", RuntimeWarning, stacklevel=2)


class _AfterTransformersImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of ``transformers`` so that :func:`register_auto`
    runs once the package has finished executing, then leaves ``sys.meta_path``."""

    def find_spec(self, name: str, path: Any = None, target: Any = None):
        if name != "transformers":
            return None
        _remove_finder()
        spec = importlib.util.find_spec(name)  # the finders after this one
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _register_quietly()

        spec.loader.exec_module = exec_module  # this loader instance serves this import only
        return spec


def _remove_finder() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _AfterTransformersImport)]


def install_auto_registration() -> None:
    """Register now if transformers is imported, else as soon as it is."""
    if "transformers" in sys.modules:
        _register_quietly()
    elif not any(isinstance(f, _AfterTransformersImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTransformersImport())


def __getattr__(name: str) -> Any:
    if name == "build_dylora_model":
        from .dylora import build_dylora_model

        return build_dylora_model
    raise AttributeError(f"module 'modelkit.models' has no attribute {name!r}")
