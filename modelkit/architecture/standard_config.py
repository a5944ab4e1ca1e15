"""``config.json`` of a standard Hugging Face folder: the base architecture's config with
every custom field and ``auto_map`` (remote code) removed, naming the class stock
``AutoModelForCausalLM`` builds."""
from __future__ import annotations

import json
from pathlib import Path

from modelkit.errors import ExportError

DROPPED_KEYS = ("auto_map", "_name_or_path")


def write_standard_config(folder: Path, config, dtype: str) -> None:
    """Save ``config`` into ``folder`` as stock transformers expects it, in ``dtype``."""
    from modelkit.architecture.bridge import config_from_dict

    d = {k: v for k, v in config.to_dict().items() if k not in DROPPED_KEYS}
    d["dtype"] = dtype
    d.pop("torch_dtype", None)
    clean = config_from_dict(d, "<export config>", strip_unknown=True)  # custom fields dropped
    clean.architectures = [causal_lm_class_name(clean)]
    clean.save_pretrained(str(folder))
    written = json.loads((folder / "config.json").read_text())
    if "auto_map" in written:  # pragma: no cover - config_from_dict strips it
        raise ExportError("exported config still asks for remote code (auto_map)", folder)


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
