"""``config.json`` of a standard Hugging Face folder: the base architecture's config with
every custom field and ``auto_map`` (remote code) removed, naming the class stock
``AutoModelForCausalLM`` builds."""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from modelkit.errors import ExportError

DROPPED_KEYS = ("auto_map", "_name_or_path")


RECIPE = 1  # bump when what write_standard_config writes for a given config changes


def write_standard_config(folder: Path, config: Callable[[], Any], dtype: str,
                          architecture: Any = None) -> None:
    """Save the config ``config()`` builds into ``folder`` as stock transformers expects it,
    in ``dtype``.

    ``architecture``: the raw input the config is built from (the artifact's
    ``architecture()``, a config.json path or a dict), when it is raw. The text written is
    then cached on disk beside the expected tensors, keyed by that input, ``dtype`` and
    transformers' version (:func:`modelkit.architecture.bridge._cached`), and a later export
    of the same architecture writes it without building the config: building it imports
    seconds and ~80 MB of transformers that an export has no other use for."""
    if not isinstance(architecture, (str, Path, Mapping)):
        text = _standard_text(folder, config(), dtype)
    else:
        from modelkit.architecture import bridge

        text = bridge._cached(f"standard-config-{RECIPE}-{dtype}", architecture, None, True,
                              lambda _: _standard_text(folder, config(), dtype),
                              lambda t: {"config_json": t}, lambda d: str(d["config_json"]))
    (folder / "config.json").write_text(text)
    if "auto_map" in json.loads(text):  # pragma: no cover - config_from_dict strips it
        raise ExportError("exported config still asks for remote code (auto_map)", folder)


def _standard_text(folder: Path, config, dtype: str) -> str:
    """The text of ``config.json`` stock ``save_pretrained`` writes for the standard form of
    ``config`` in ``dtype`` (saved into ``folder``)."""
    from modelkit.architecture.bridge import config_from_dict

    d = {k: v for k, v in config.to_dict().items() if k not in DROPPED_KEYS}
    d["dtype"] = dtype
    d.pop("torch_dtype", None)
    clean = config_from_dict(d, "<export config>", strip_unknown=True)  # custom fields dropped
    clean.architectures = [causal_lm_class_name(clean)]
    clean.save_pretrained(str(folder))
    return (folder / "config.json").read_text()


def causal_lm_class_name(config) -> str:
    """The class stock ``AutoModelForCausalLM`` builds for ``config``, by name: transformers'
    name table, so the modeling code (seconds of imports) is not loaded just for a string."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    if names is None:
        raise ExportError(f"transformers has no causal-LM model for model_type {config.model_type!r}")
    if isinstance(names, (list, tuple)):
        wanted = [a for a in (getattr(config, "architectures", None) or []) if a in names]
        return wanted[0] if wanted else names[0]
    return names
