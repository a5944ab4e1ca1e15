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

__all__ = ["install_auto_registration", "register_auto", "register_config", "register_model"]

_CONFIG_MODULE = "transformers.models.auto.configuration_auto"
_MODEL_MODULE = "transformers.models.auto.modeling_auto"
_done: set[str] = set()


def register_config() -> None:
    """``AutoConfig`` learns ``model_type: "dylora-moe"`` (costs no model imports). Idempotent."""
    if "config" in _done:
        return
    from transformers import AutoConfig

    from modelkit.models.dylora_config import MODEL_TYPE, DyLoRAMoEConfig

    AutoConfig.register(MODEL_TYPE, DyLoRAMoEConfig, exist_ok=True)
    _done.add("config")


def register_model() -> None:
    """``AutoModelForCausalLM`` learns the DyLoRA-MoE model. The mapping first holds a
    stand-in that imports the real module (torch, generation code) on first use only."""
    if "model" in _done:
        return
    register_config()
    from transformers import AutoModelForCausalLM

    from modelkit.models.dylora_config import DyLoRAMoEConfig

    real = sys.modules.get(f"{__name__}.dylora")
    model_class = getattr(real, "DyLoRAMoEForCausalLM", None) or _deferred_model_class(DyLoRAMoEConfig)
    AutoModelForCausalLM.register(DyLoRAMoEConfig, model_class, exist_ok=True)
    _done.add("model")


def register_auto() -> None:
    """Both registrations, now."""
    register_config()
    register_model()


def _deferred_model_class(config_class: type) -> type:
    def real() -> type:
        from modelkit.models.dylora import (
            DyLoRAMoEForCausalLM,  # its import re-registers the real class
        )

        return DyLoRAMoEForCausalLM

    class DyLoRAMoEForCausalLM:  # noqa: D401 - stand-in, same name as the real class
        """Stand-in for :class:`modelkit.models.dylora.DyLoRAMoEForCausalLM` until first use."""

        @classmethod
        def from_pretrained(cls, *args: Any, **kwargs: Any):
            return real().from_pretrained(*args, **kwargs)

        @classmethod
        def _from_config(cls, *args: Any, **kwargs: Any):
            return real()._from_config(*args, **kwargs)

        from_config = _from_config

    DyLoRAMoEForCausalLM.config_class = config_class
    return DyLoRAMoEForCausalLM


def _quietly(register) -> None:
    try:
        register()
    except Exception as e:  # never break the user's own transformers import
        warnings.warn(f"modelkit could not register the dylora-moe model type with transformers: "
                      f"{type(e).__name__}: {e}", RuntimeWarning, stacklevel=2)


_HOOKS = {_CONFIG_MODULE: register_config, _MODEL_MODULE: register_model}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loaders of transformers' two Auto modules so each
    registration runs right after its module has finished executing."""

    def find_spec(self, name: str, path: Any = None, target: Any = None):
        if name not in _HOOKS or name in _done_modules:
            return None
        _done_modules.add(name)
        spec = importlib.util.find_spec(name)  # asks the finders after this one
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _quietly(_HOOKS[name])

        spec.loader.exec_module = exec_module  # this loader instance serves this import only
        return spec


_done_modules: set[str] = set()


def install_auto_registration() -> None:
    """Register with each Auto class now if transformers already imported it, else right
    after it does, so ``import modelkit`` itself never imports transformers."""
    for module, register in _HOOKS.items():
        if module in sys.modules:
            _quietly(register)
    if not all(m in sys.modules for m in _HOOKS) and \
            not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
