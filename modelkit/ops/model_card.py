"""The ``README.md`` model card an export writes: lineage (``base_model``) in the Hub's
metadata, then what was exported, from what, and whether it was verified.

The metadata block is written by huggingface_hub's ``ModelCardData`` (the Hub's own schema),
so the Hub and ``huggingface_hub.ModelCard.load`` read it as they read any card. The card
names no local path: a base recorded as a folder is described in the text but kept out of
``base_model`` (the Hub takes model ids there), and the source is named by its last part.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from modelkit.formats import Artifact
    from modelkit.ops.export import ExportResult

CARD = "README.md"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")   # org/name, as the Hub spells model ids


def hub_id(name: str | None) -> str | None:
    """``name`` when it reads as a Hub model id (``org/name``) and is not an existing local
    folder, else None."""
    if not name or not _HUB_ID.match(name) or Path(name).expanduser().exists():
        return None
    return name


def _short(ref: str) -> str:
    """A ref without local directories: ``wandb:`` / ``hf:`` refs as given, folders by name."""
    return ref if ref.startswith(("wandb:", "hf:")) else Path(ref).name or ref


def card_text(part: "ExportResult", artifact: "Artifact", what: str) -> str:
    """The card of one exported folder (``what``: the one line saying what was merged or
    materialised)."""
    import modelkit
    from huggingface_hub import ModelCardData

    from modelkit.units import human_bytes

    base = artifact.base.name if artifact.base is not None else None
    lineage = hub_id(base)
    data = ModelCardData(library_name="transformers", tags=["modelkit-export", artifact.format],
                         base_model=lineage, base_model_relation="finetune" if lineage else None)
    if base is None:
        base_line = "not recorded by the artifact (self-contained)"
    elif lineage:
        base_line = f"`{lineage}` (in the metadata as `base_model`)"
    else:
        base_line = f"`{_short(base)}`, a local folder, not a Hub id: left out of the metadata"
    v = part.verification
    if v:
        checked = (f"yes: logits of this folder loaded by stock transformers match the source "
                   f"(max |diff| {v.get('max_abs_diff', float('nan')):.2g})" if v.get("ok")
                   else "FAILED: logits differ from the source")
    else:
        checked = "no (exported without verify)"
    supplied = part.options.get("supplied") or {}
    lines = [
        f"# {Path(part.out).name}", "",
        f"Exported by modelkit {modelkit.__version__} from `{_short(part.ref)}` "
        f"({artifact.format}, layout {artifact.layout}; source fingerprint `{part.source_fingerprint}`).", "",
        f"- **What**: {what}",
        f"- **Base model**: {base_line}",
        f"- **Weights**: {part.tensors} tensors, {part.dtype}, {human_bytes(part.bytes)} in "
        f"{len(part.shards)} file(s)",
        f"- **Verified**: {checked}",
    ]
    if supplied:
        lines.append("- **Supplied by the user** (not recorded in the artifact): "
                     + ", ".join(f"{k}={_short(str(v)) if k == 'base' else v}" for k, v in supplied.items()))
    lines += ["", "Load it with `transformers.AutoModelForCausalLM.from_pretrained(folder)`. "
              "The full record (options, what each tensor came from) is `modelkit_export.json`.", ""]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)


def write_model_card(folder: Path, part: "ExportResult", artifact: "Artifact", what: str) -> None:
    """Write :func:`card_text` to ``folder/README.md``."""
    (Path(folder) / CARD).write_text(card_text(part, artifact, what), encoding="utf-8")


def mixture_card_text(result: "ExportResult", parts: list["ExportResult"], artifact: "Artifact") -> str:
    """The card of a folder holding one exported folder per expert."""
    rows = "\n".join(f"- `{Path(p.out).name}/`: " + ("verified" if p.verification and p.ok
                                                     else "not verified" if not p.verification else "FAILED")
                     for p in parts)
    return (f"# {Path(result.out).name}\n\nA {artifact.format} mixture exported by modelkit from "
            f"`{_short(result.ref)}`: a routed mixture is not one dense model, so each expert is its "
            f"own standard folder (with its own model card):\n\n{rows}\n")

