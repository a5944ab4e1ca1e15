"""``open_artifact``: from a reference to an opened, format-aware artifact (resolve the
source, detect its format, open it, find its base). In ``formats/`` because a format opens
its own base too (compressed MoE: the original model its non-experts come from)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from modelkit.errors import guarded
from modelkit.formats import Artifact, BaseRef, detect
from modelkit.io.files import trusting
from modelkit.io.sources import Source, resolve, resolve_base

FACTS = ("lora_alpha", "lora_r")  # what some artifacts do not record and users may supply


def split_facts(options: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(user-supplied facts, the remaining options)`` of a load / view option mapping."""
    options = dict(options or {})
    facts = {k: options.pop(k) for k in FACTS if k in options}
    return {k: v for k, v in facts.items() if v is not None}, options


@guarded()
def open_artifact(ref: str | Path | Source, base: str | Path | None = None, *,
                  facts: Mapping[str, Any] | None = None) -> Artifact:
    """Resolve ``ref`` (folder, ``wandb:...``, ``hf:...``), detect its format and open it.

    ``base`` overrides where the base model comes from (a folder or ref); otherwise the
    name the artifact records is looked up locally (path, then the HF cache).
    ``facts`` are what the artifact does not record, supplied by the user (DyLoRA-MoE:
    ``lora_alpha``, ``lora_r``); the report says which were supplied.
    Reads configs and file headers only.
    """
    source = ref if isinstance(ref, Source) else resolve(ref)
    with trusting(source.trust_root):  # detection reads files before any Artifact exists
        fmt, layout = detect(source.folder)
        artifact = fmt.open(source.folder, layout, source)
    artifact.supply(**dict(facts or {}))
    name = artifact.base_name()
    if name is not None or base is not None:
        path, how = resolve_base(name, explicit=base, relative_to=source.folder)
        artifact.base = BaseRef(name if name is not None else str(base), path,
                                artifact.base_needs(), how)
    return artifact


def open_base(artifact: Artifact) -> Artifact | None:
    """The opened base artifact of ``artifact``, or None when it needs none or it is unavailable."""
    if artifact.base is None or artifact.base.path is None:
        return None
    return open_artifact(artifact.base.path)
