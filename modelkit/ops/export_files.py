"""The files of an exported folder beside its weights: the generation config and the
tokenizer (copied, confined to whoever holds them, remote code removed) and
``modelkit_export.json``, the record of what was written from what."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from modelkit import schemas
from modelkit.formats import Artifact
from modelkit.formats.base import ExportTarget
from modelkit.io import files
from modelkit.ops.load import tokenizer_folder
from modelkit.ops.model_card import CARD, mixture_card_text, write_model_card

if TYPE_CHECKING:  # pragma: no cover
    from modelkit.ops.export import ExportResult

RECORD = "modelkit_export.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "spiece.model",
    "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json",
)


def copy_generation_config(folder: Path, artifact: Artifact, base_art: Artifact | None) -> list[str]:
    """The artifact's (else its base's) ``generation_config.json``; the notes to record."""
    for art in [artifact] + ([base_art] if base_art else []):
        p = Path(art.folder) / "generation_config.json"
        if os.path.lexists(p):  # a FIFO or an escaping symlink is refused, not skipped
            files.copy_confined(p, folder / p.name, art.trust_root)
            return [f"generation_config.json from {art.folder}"]
    return []


def copy_tokenizer(folder: Path, artifact: Artifact, base_art: Artifact | None) -> list[str]:
    """The tokenizer files load would use, ``auto_map`` removed; the notes to record."""
    src = tokenizer_folder(artifact, base_art)
    if src is None:
        return ["no tokenizer found in the artifact or its base: none exported"]
    # every file read or copied is confined to the trust root of whoever holds it
    root = base_art.trust_root if base_art is not None and src == Path(base_art.folder) else artifact.trust_root
    notes = []
    for name in TOKENIZER_FILES:
        p = src / name
        if not os.path.lexists(p):
            continue
        if name == "tokenizer_config.json":
            data = schemas.validate(files.read_json(p, root), p)
            if data.pop("auto_map", None) is not None:
                notes.append("tokenizer_config.json: auto_map (remote code) removed")
            (folder / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        else:
            files.copy_confined(p, folder / name, root)
    return notes + [f"tokenizer from {src}"]


def write_record(folder: Path, part: "ExportResult", artifact: Artifact, target: ExportTarget) -> None:
    """``modelkit_export.json`` and the ``README.md`` model card of one exported folder."""
    import modelkit

    record = {
        "modelkit_version": modelkit.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": {"ref": part.ref, "folder": str(artifact.folder), "format": artifact.format,
                   "layout": artifact.layout, "fingerprint": part.source_fingerprint,
                   "base": artifact.base.record() if artifact.base else None},
        "options": part.options,
        "expert": target.options.get("expert"),
        "dtype": part.dtype,
        "tensors": part.tensors,
        "total_size": part.bytes,
        "shards": part.shards,
        "produced": part.origins,
        "cast": part.cast,
        "consumed": len(part.consumed),
        "left_out": part.left_out,
        "merged": target.merged or "tensors by origin: " + ", ".join(
            f"{n} {k}" for k, n in sorted(part.origins.items())),
        "notes": part.notes,
        "verification": part.verification,
    }
    (folder / RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n")
    write_model_card(folder, part, artifact, record["merged"])


def write_summary_record(folder: Path, result: "ExportResult", parts: list["ExportResult"],
                         artifact: Artifact) -> None:
    """``modelkit_export.json`` and the model card of a folder holding one exported folder per part."""
    import modelkit

    record = {"modelkit_version": modelkit.__version__,
              "source": {"ref": result.ref, "folder": str(artifact.folder), "format": artifact.format,
                         "layout": artifact.layout, "fingerprint": result.source_fingerprint},
              "options": result.options,
              "experts": {Path(p.out).name: {"ok": p.ok, "verification": p.verification} for p in parts},
              "note": "a routed mixture is not one dense model: one standard folder per expert"}
    (folder / RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n")
    (folder / CARD).write_text(mixture_card_text(result, parts, artifact), encoding="utf-8")
