"""Architecture facts inspect needs, cached on disk so a warm inspect imports neither torch
nor transformers.

Importing transformers' config machinery costs 1.5-4 s and 250-450 MB (it pulls in
torch), far more than inspecting a checkpoint's headers. Inspect needs only a few facts
from it, and they change only with the transformers version or the config's content:

* :func:`config_facts`: the attributes of the config object transformers builds from a
  ``config.json`` (defaults filled in, aliases resolved), as a read-only
  :class:`ConfigFacts`. Cached under the same key scheme as
  :func:`modelkit.architecture.bridge.expected_tensors` (raw config content + transformers
  version), so an edited config.json or another transformers is a cache miss, never a
  stale answer.
* :func:`causal_lm_type`: which ``model_type`` an ``architectures`` class name belongs to.
* :func:`declares_field`: whether an architecture's config class has a field by default.

The first call for an unseen config or transformers version imports transformers once
and writes the answer to ``$MODELKIT_CACHE/expected`` (the disk cache of expected tensors);
``MODELKIT_CACHE=off`` disables it. Everything that builds a model still uses the real
config (:meth:`Artifact.config`).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from modelkit.architecture import bridge as _arch
from modelkit.io.tensors import dtype_name

__all__ = ["ConfigFacts", "causal_lm_type", "config_facts", "declares_field"]


class ConfigFacts:
    """Read-only attribute view of a transformers config's values (``config.to_dict()``
    plus its ``attribute_map`` aliases): ``facts.num_hidden_layers``, ``facts.dtype``
    (a dtype name such as ``"bfloat16"``, or None). No torch, no transformers."""

    __slots__ = ("_values", "_aliases", "_modelkit_facts_source")

    def __init__(self, values: Mapping[str, Any], aliases: Mapping[str, str] | None = None,
                 source: tuple[Any, str | None] | None = None):
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "_aliases", dict(aliases or {}))
        # (raw config, model_type): expected_tensors(facts) uses the raw config's cache key
        object.__setattr__(self, "_modelkit_facts_source", source)

    def __getattr__(self, name: str) -> Any:
        values = object.__getattribute__(self, "_values")
        aliases = object.__getattribute__(self, "_aliases")
        key = aliases.get(name, name)
        if key in values:
            return values[key]
        raise AttributeError(name)

    def __setattr__(self, name, value):  # pragma: no cover - read-only by design
        raise AttributeError("ConfigFacts is read-only")

    def to_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def __repr__(self) -> str:
        return f"ConfigFacts(model_type={self._values.get('model_type')!r})"


def _facts_of(config) -> tuple[dict[str, Any], dict[str, str]]:
    values = json.loads(json.dumps(config.to_dict(), default=str))
    for key in ("dtype", "torch_dtype"):
        v = getattr(config, key, None)
        if v is not None:
            values[key] = dtype_name(v)
    aliases = {k: v for k, v in (getattr(type(config), "attribute_map", None) or {}).items()
               if isinstance(k, str) and isinstance(v, str)}
    return values, aliases


def config_facts(config, *, model_type: str | None = None, cache: bool = True):
    """The config's attribute values without importing transformers on a warm cache.

    ``config`` is a config.json path or folder, or a raw config dict (as for
    :func:`~modelkit.architecture.bridge.expected_tensors`); a ready config object is returned
    as it is. Raises ConfigError (naming the file) when transformers rejects the config.
    """
    if not isinstance(config, (str, Path, Mapping)):
        return config
    values, aliases = _arch._cached(
        "facts", config, model_type, cache, _facts_of,
        lambda r: {"values": r[0], "aliases": r[1]},
        lambda d: (dict(d["values"]), dict(d["aliases"])))
    return ConfigFacts(values, aliases, (config, model_type))


# --------------------------------------------------------------------------- per-version facts


def _version_fact(name: str, compute):
    """``compute()`` (JSON-able), cached on disk per transformers version."""
    digest = hashlib.sha256(json.dumps([_arch.CACHE_FORMAT, _arch._transformers_version(), name])
                            .encode()).hexdigest()[:32]
    key = f"fact-{digest}"
    with _arch._cache_lock:
        if key in _arch._memory_cache:
            return _arch._memory_cache[key]
    data = _arch._read_disk_cache(key)
    if data is not None and "value" in data:
        value = data["value"]
    else:
        value = compute()
        _arch._write_disk_cache(key, {"value": value})
    with _arch._cache_lock:
        _arch._memory_cache[key] = value
    return value


def _causal_lm_classes() -> dict[str, str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out: dict[str, str] = {}
    for model_type, cls in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        for name in (cls if isinstance(cls, (list, tuple)) else [cls]):
            if isinstance(name, str) and (name not in out or (_names(name, model_type)
                                                           and not _names(name, out[name]))):
                out[name] = model_type   # several types reuse one class (exaone, llama: LlamaForCausalLM)
    return out


def _names(class_name: str, model_type: str) -> bool:
    """The class is named after the model type (``LlamaForCausalLM`` and ``llama``)."""
    def norm(text: str) -> str:
        return text.lower().replace("_", "").replace("-", "")

    return norm(class_name).startswith(norm(model_type))


def causal_lm_type(class_name: str) -> str | None:
    """The ``model_type`` whose causal-LM class is ``class_name`` (``GemmaForCausalLM`` ->
    ``gemma``), from transformers' own mapping; None when it names none."""
    return _version_fact("causal-lm-classes-v2", _causal_lm_classes).get(class_name)


def declares_field(model_type: str, field: str) -> bool:
    """Whether a default config of ``model_type`` has attribute ``field`` (an MoE base's own
    ``num_experts``). False for a model_type transformers does not know."""

    def compute():
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        try:
            return hasattr(CONFIG_MAPPING[model_type](), field)
        except Exception:  # unknown architecture
            return False

    return bool(_version_fact(f"config-has:{model_type}:{field}", compute))
