"""``export``: any artifact as a standard Hugging Face folder, streamed, atomic and verified.

The folder holds what stock transformers needs and nothing of modelkit's: ``config.json``
of the base architecture (no custom fields, no ``auto_map``), ``generation_config.json``
when the source has one, the tokenizer files, ``model-0000i-of-0000N.safetensors`` +
``model.safetensors.index.json`` in the on-disk key space (per-expert names for MoE), and
``modelkit_export.json`` recording source, fingerprint, options, what was merged or
materialized and the verification result, and a ``README.md`` model card whose metadata
names the base model (``base_model``: the lineage the Hub shows; :mod:`modelkit.ops.model_card`).

This module orchestrates; each job lives with its layer: the dense models to write are the
format's (:meth:`~modelkit.formats.base.Artifact.export_targets`), shards are planned and
streamed by :mod:`modelkit.io.shards` (peak memory about one shard), the config is cleaned by
:mod:`modelkit.architecture.standard_config`, tokenizer, record and model card are
:mod:`modelkit.ops.export_files`, the comparison with the source is
:mod:`modelkit.ops.verify` (its reference chosen by the target). Atomic: everything is written into a temporary
folder beside OUT (:mod:`modelkit.io.atomic`), fsynced, verified when asked, and renamed to
OUT at the end.
"""
from __future__ import annotations

import errno
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from modelkit.errors import ExportError, guarded
from modelkit.formats import Artifact
from modelkit.io import shards
from modelkit.io.atomic import atomic_folder
from modelkit.io.tensors import dtype_name, recording_reads, torch_dtype
from modelkit.ops.export_files import (
    copy_generation_config,
    copy_tokenizer,
    write_record,
    write_summary_record,
)
from modelkit.ops.load import DenseView, check_artifact, dense_view, open_for_load, split_consumed
from modelkit.progress import phase
from modelkit.units import human_bytes
from modelkit.verdicts import Verdict, of_export
from modelkit.formats.open import split_facts


# --------------------------------------------------------------------------- result


@dataclass
class ExportResult:
    """What :func:`export` wrote (or why not); ``ok`` is False only for a failed verification."""

    ref: str
    out: str
    ok: bool = True
    written: bool = False
    format: str = ""
    layout: str = ""
    source_fingerprint: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    dtype: str = ""
    tensors: int = 0
    bytes: int = 0
    shards: list[str] = field(default_factory=list)
    origins: dict[str, int] = field(default_factory=dict)   # origin kind -> tensor count
    cast: dict[str, int] = field(default_factory=dict)      # "bfloat16->float32" -> count
    verification: dict[str, Any] | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    consumed: list[str] = field(default_factory=list)      # stored tensors read ("file:key")
    left_out: list[str] = field(default_factory=list)      # stored tensors not read (see notes)
    experts: list["ExportResult"] = field(default_factory=list)
    layout_label: str = ""        # the layout as summaries show it (``layout``: the stable code)

    def outcome(self) -> Verdict:
        """The verdict every view opens with (the rule: :func:`modelkit.verdicts.of_export`)."""
        return of_export(self)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["experts"] = [e.to_dict() for e in self.experts]
        return d

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), default=str, **kw)

    def summary(self) -> str:
        head = "exported" if self.written else "NOT written"
        lines = [f"{head}: {self.ref} -> {self.out}",
                 f"  source  {self.format} ({self.layout_label or self.layout}), fingerprint {self.source_fingerprint}"]
        parts = self.experts or [self]
        for r in parts:
            prefix = f"  [{Path(r.out).name}] " if self.experts else "  "
            origins = ", ".join(f"{n} {k}" for k, n in sorted(r.origins.items()))
            lines.append(f"{prefix}{r.tensors} tensors ({origins}), {human_bytes(r.bytes)} as {r.dtype} "
                         f"in {len(r.shards)} shard(s); read {len(r.consumed)} stored tensor(s)"
                         + (f", left out {len(r.left_out)} (see notes)" if r.left_out else ""))
            if r.cast:
                lines.append(f"{prefix}cast: " + ", ".join(f"{n} {k}" for k, n in r.cast.items()))
            if r.verification:
                lines.append(f"{prefix}{_verification_line(r.verification)}")
        lines += [f"  note    {n}" for n in self.notes]
        lines.append(f"  time    {self.seconds:.1f}s")
        return "\n".join(lines)


def _verification_line(v: dict[str, Any]) -> str:
    from modelkit.ops.verify import Verification

    return Verification(**v).line()


# --------------------------------------------------------------------------- export


@guarded()
def export(ref: Any, out: str | Path, base: Any = None, dtype: Any = None,
           max_shard_size: int | str = "2GB", expert: int | str | None = None,
           verify: bool = False, force: bool = False, *, allow_untrained: bool = False,
           tolerance: float | None = None, progress: bool = True,
           **format_options: Any) -> ExportResult:
    """Write ``ref`` to ``out`` as a standard Hugging Face folder.

    ``expert``: DyLoRA-MoE only, the expert to merge (an int) or ``"all"`` (one folder
    ``out/expert_K`` each); a routed mixture is not one dense model, so DyLoRA without
    ``expert`` is refused. ``dtype`` casts floating tensors (default: as stored).
    ``verify`` reloads the result with stock transformers and compares logits with
    :func:`modelkit.load` of the source; on failure nothing is written and ``ok`` is
    False. Raises ExportError (OutputExistsError for an existing ``out`` without
    ``force``) or another ModelkitError; a failure leaves neither ``out`` nor a
    temporary folder behind.
    """
    from modelkit.ops.verify import source_reference, verify_folder

    t0 = time.perf_counter()
    facts, format_options = split_facts(format_options)
    artifact, base_art = open_for_load(ref, base, facts)
    result = ExportResult(ref=str(ref), out=str(Path(out).expanduser().absolute()),
                          format=artifact.format, layout=artifact.layout, layout_label=artifact.layout_label)
    targets = artifact.export_targets(expert)  # the format says which dense models it is
    out_dtype = torch_dtype(dtype, floating=True)
    shards.check_size(max_shard_size)
    protect = [artifact.folder, artifact.trust_root] + ([base_art.folder] if base_art else [])
    result.source_fingerprint = artifact.fingerprint
    result.options = {"base": str(base) if base is not None else None,
                      "dtype": dtype_name(out_dtype) if out_dtype else None,
                      "max_shard_size": max_shard_size, "expert": expert, "verify": verify,
                      "allow_untrained": allow_untrained, **{k: v for k, v in format_options.items()
                                                            if k != "expert"}}
    supplied = {**artifact.supplied, **({"base": str(base)} if base is not None and artifact.base_name() is None
                                        else {})}
    if supplied:
        result.options["supplied"] = supplied  # facts the artifact does not record, given by the user
    # everything that can be refused is refused before OUT is touched
    check_artifact(artifact, base_art, allow_untrained=allow_untrained)
    views = [(t, dense_view(artifact, base_art, **{**format_options, **t.options})) for t in targets]
    try:
        with atomic_folder(Path(out), force=force, protect=protect) as tmp:
            parts = []
            for target, dv in views:
                folder = tmp / target.subfolder
                folder.mkdir(parents=True, exist_ok=True)
                part = ExportResult(ref=str(ref), out=str(Path(result.out) / target.subfolder),
                                    format=artifact.format, layout=artifact.layout,
                                    source_fingerprint=result.source_fingerprint,
                                    options={**result.options, **target.options})
                _write_folder(folder, artifact, base_art, dv, out_dtype, max_shard_size, part, progress,
                              desc=" ".join(("write", target.subfolder)).strip())
                if verify:
                    options = {"base": base, **format_options, **facts}
                    # three steps: the source's reference run, the export loaded, logits compared
                    with phase(" ".join(("verify", target.subfolder)).strip(), total=3, unit="steps",
                               show=progress) as bar:
                        bar.update(0, note="running the source")
                        v = verify_folder(folder, lambda: source_reference(ref, artifact, target,
                                                                           allow_untrained=allow_untrained, **options),
                                          dtype=part.dtype, tolerance=tolerance,
                                          step=lambda note: bar.update(1, note=note))
                        bar.update(1, note="logits match" if v.ok else "logits differ")
                    part.verification, part.ok = v.to_dict(), v.ok
                part.seconds = time.perf_counter() - t0
                write_record(folder, part, artifact, target)  # and the model card
                parts.append(part)
            if len(targets) > 1:
                result.experts = parts
                result.notes.append(f"one folder per expert: {', '.join(t.subfolder for t in targets)}")
                write_summary_record(tmp, result, parts, artifact)
            else:
                _adopt(result, parts[0])
            if not all(p.ok for p in parts):
                raise _VerificationFailed()
    except _VerificationFailed:
        result.ok = False
        result.written = False
        result.notes.append("verification failed: nothing was written to OUT")
        if len(targets) > 1:
            result.experts = parts
        result.seconds = time.perf_counter() - t0
        return result
    except OSError as e:
        raise _os_error(e, out) from None
    result.written = True
    result.seconds = time.perf_counter() - t0
    return result


class _VerificationFailed(Exception):
    """Internal: abort the atomic folder (nothing written) but still return a result."""


def _os_error(e: OSError, out: Any) -> ExportError:
    if e.errno == errno.ENOSPC:
        return ExportError("no space left on the device while writing the export; nothing "
                           "was left behind. Free space or choose another OUT", out)
    return ExportError(f"cannot write the export ({e.strerror or e}); nothing was left behind", out)


def _adopt(result: ExportResult, part: ExportResult) -> None:
    for name in ("ok", "dtype", "tensors", "bytes", "shards", "origins", "cast", "verification",
                 "consumed", "left_out"):
        setattr(result, name, getattr(part, name))
    result.notes += part.notes


def _write_folder(folder: Path, artifact: Artifact, base_art: Artifact | None, dv: DenseView, out_dtype,
                  max_shard_size, part: ExportResult, progress: bool, desc: str = "write") -> None:
    """One standard folder from a checked dense view: weights, config, generation config, tokenizer."""
    from concurrent.futures import ThreadPoolExecutor

    from modelkit.architecture.standard_config import write_standard_config

    tensors = dict(dv.tensors)
    dtype = out_dtype or shards.default_dtype(tensors)
    # config.json is written beside the weights: building the config object (on a cache miss,
    # see write_standard_config) imports seconds of transformers (Python, holding the GIL)
    # while the weights' merges and writes mostly release it
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="modelkit-config") as side:
        config_written = side.submit(lambda: write_standard_config(folder, lambda: dv.config, dtype_name(dtype),
                                                                   dv.architecture))
        with recording_reads() as seen, artifact.bulk_production():
            written = shards.write_weights(folder, tensors, dtype, max_shard_size, progress, desc=desc)
        config_written.result()  # its error (a config transformers rejects) is raised here
    part.consumed, part.left_out = split_consumed(artifact, seen)
    part.dtype = dtype_name(dtype)
    part.tensors = len(tensors)
    part.bytes = written["total_size"]
    part.shards = written["files"]
    part.cast = written["cast"]
    part.origins = dict(Counter(lt.origin.split(":", 1)[0] for lt in tensors.values()))
    part.notes += dv.notes
    if dv.tied:
        part.notes.append(f"tied duplicate(s) not written (transformers re-ties them): {', '.join(dv.tied)}")
    part.notes += copy_generation_config(folder, artifact, base_art)
    part.notes += copy_tokenizer(folder, artifact, base_art)


__all__ = ["ExportResult", "export"]
