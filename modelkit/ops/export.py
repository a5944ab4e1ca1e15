"""``export``: any artifact as a standard Hugging Face folder, streamed, atomic and verified.

The folder holds what stock transformers needs and nothing of modelkit's: ``config.json``
of the base architecture (no ``_dylora_*`` fields, no ``auto_map``), ``generation_config.json``
when the source has one, the tokenizer files, ``model-0000i-of-0000N.safetensors`` +
``model.safetensors.index.json`` in the on-disk key space (per-expert names for MoE), and
``modelkit_export.json`` recording source, fingerprint, options, what was merged or
materialized and the verification result, and a ``README.md`` model card whose metadata
names the base model (``base_model``: the lineage the Hub shows; :mod:`modelkit.ops.model_card`).

Streaming: shard boundaries are planned from the view's shapes with huggingface_hub's
splitter before any tensor is produced; each shard's header is written from that plan, then
its tensors are produced one at a time and appended by a writer thread as they come. Peak
memory is a few tensors (``QUEUE``) plus the inputs of the ones being computed, whatever
``max_shard_size``.

Atomic: everything is written into a temporary folder beside OUT (see
:mod:`modelkit.io.atomic`), fsynced, verified when asked, and renamed to OUT at the end.
"""
from __future__ import annotations

import errno
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from modelkit import schemas
from modelkit.errors import ExportError, ModelkitError, guarded
from modelkit.formats import Artifact
from modelkit.formats.view import LazyTensor
from modelkit.io import files
from modelkit.io.atomic import atomic_folder
from modelkit.io.safetensors_stream import StreamedSafetensors
from modelkit.io.tensors import dtype_name, release_all, torch_dtype
from modelkit.ops.load import (
    check_artifact,
    dense_view,
    is_dylora,
    is_peft,
    open_for_load,
    recording_reads,
    split_consumed,
    tokenizer_folder,
)
from modelkit.ops.model_card import CARD, mixture_card_text, write_model_card
from modelkit.ops.open import split_facts
from modelkit.progress import phase
from modelkit.units import human_bytes

RECORD = "modelkit_export.json"
INDEX = "model.safetensors.index.json"
PATTERN = "model{suffix}.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "spiece.model",
    "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json",
)
DROPPED_CONFIG_PREFIXES = ("_dylora",)


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
    t0 = time.perf_counter()
    facts, format_options = split_facts(format_options)
    artifact, base_art = open_for_load(ref, base, facts)
    result = ExportResult(ref=str(ref), out=str(Path(out).expanduser().absolute()),
                          format=artifact.format, layout=artifact.layout, layout_label=artifact.layout_label)
    targets = _targets(artifact, expert)
    if expert is not None:
        format_options = {**format_options, "expert": expert}
    out_dtype = torch_dtype(dtype, floating=True)
    _check_size(max_shard_size)
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
    views = {}
    for sub, k in targets:
        opts = {**format_options, "expert": k} if k is not None else format_options
        views[sub] = (k, dense_view(artifact, base_art, **opts))
    try:
        with atomic_folder(Path(out), force=force, protect=protect) as tmp:
            parts = []
            for sub, (k, dv) in views.items():
                folder = tmp / sub if sub else tmp
                folder.mkdir(parents=True, exist_ok=True)
                part = ExportResult(ref=str(ref), out=str(Path(result.out) / sub) if sub else result.out,
                                    format=artifact.format, layout=artifact.layout,
                                    source_fingerprint=result.source_fingerprint,
                                    options={**result.options, "expert": k} if k is not None else result.options)
                _write_folder(folder, artifact, base_art, dv, out_dtype, max_shard_size, part, progress,
                              desc=" ".join(("write", sub)).strip())
                if verify:
                    with phase(" ".join(("verify", sub)).strip(), total=VERIFY_STEPS, unit="steps",
                               show=progress) as bar:
                        _verify(folder, ref, base, k, artifact, part, tolerance, allow_untrained,
                                {**format_options, **facts}, step=bar.update)
                part.seconds = time.perf_counter() - t0
                _write_record(folder, part, artifact, k)
                parts.append(part)
            if len(targets) > 1:
                result.experts = parts
                result.notes.append(f"one folder per expert: {', '.join(s for s, _ in targets)}")
                _write_summary_record(tmp, result, parts, artifact)
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


def _check_size(size: int | str) -> None:
    """ExportError for a shard size huggingface_hub's splitter would not accept."""
    from huggingface_hub.serialization._base import (
        parse_size_to_int,  # the splitter's own parser
    )

    try:
        value = parse_size_to_int(size) if isinstance(size, str) else int(size)
    except (TypeError, ValueError):
        value = 0
    if value <= 0:
        raise ExportError(f"max_shard_size {size!r} is not a size; use e.g. '2GB', '500MB' or a byte count")


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


def _targets(artifact: Artifact, expert: int | str | None) -> list[tuple[str, int | None]]:
    """``[(subfolder, expert)]``: one dense model per entry."""
    if not is_dylora(artifact):
        if expert is not None:
            raise ExportError(f"--expert applies to DyLoRA-MoE artifacts only (this is {artifact.format})",
                              artifact.folder)
        return [("", None)]
    count = len(artifact.variants())  # one dense view per expert
    if expert is None:
        raise ExportError(
            f"this is a DyLoRA-MoE mixture of {count} LoRA experts chosen per sequence by a "
            "router; a routed mixture is not one dense model, so it has no single standard "
            f"export. Pass expert=K (--expert K, 0 <= K < {count}) for the exact merge of one "
            "expert, or expert='all' (--expert all) for one folder per expert. "
            "To run the mixture itself, use modelkit.load(ref, routing='router')", artifact.folder)
    if expert == "all":
        return [(f"expert_{k}", k) for k in range(count)]
    try:
        k = int(expert)
    except (TypeError, ValueError):
        raise ExportError(f"expert must be an integer or 'all', not {expert!r}", artifact.folder) from None
    if not 0 <= k < count:
        raise ExportError(f"expert {k} does not exist: the artifact has experts 0..{count - 1}",
                          artifact.folder)
    return [("", k)]


# --------------------------------------------------------------------------- writing


def plan_shards(tensors: dict[str, LazyTensor], out_dtype, max_shard_size: int | str):
    """huggingface_hub's split of the (not yet produced) tensors into shard files; names
    always carry ``-0000i-of-0000N`` (also for a single shard)."""
    from huggingface_hub import split_state_dict_into_shards_factory

    split = split_state_dict_into_shards_factory(
        tensors, get_storage_size=lambda lt: lt.numel * _itemsize(_target_dtype(lt, out_dtype)),
        filename_pattern=PATTERN, max_shard_size=max_shard_size)
    files = dict(split.filename_to_tensors)
    if len(files) == 1:
        files = {PATTERN.format(suffix="-00001-of-00001"): next(iter(files.values()))}
    return files, split.metadata["total_size"]


def _itemsize(dtype_name: str) -> int:
    from modelkit.io.tensors import DTYPE_BYTES

    return DTYPE_BYTES[dtype_name]


def _target_dtype(lt: LazyTensor, out_dtype) -> str:
    from modelkit.io.tensors import FLOAT_DTYPES

    if out_dtype is not None and lt.dtype in FLOAT_DTYPES:
        return dtype_name(out_dtype)
    return lt.dtype


def default_dtype(tensors: dict[str, LazyTensor]):
    """The floating dtype holding most bytes of the view (the export's dtype by default)."""
    from modelkit.io.tensors import FLOAT_DTYPES

    weight: Counter = Counter()
    for lt in tensors.values():
        if lt.dtype in FLOAT_DTYPES:
            weight[lt.dtype] += lt.numel * _itemsize(lt.dtype)
    name = weight.most_common(1)[0][0] if weight else "float32"
    return torch_dtype(name, floating=True)


def produce(name: str, lt: LazyTensor, out_dtype):
    """Produce one tensor, checked against the view's promise, cast and contiguous."""
    import torch

    try:
        t = lt.produce_as(out_dtype)
    except ModelkitError:
        raise
    except Exception as e:  # a merge whose shapes do not fit, a read that fails, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"cannot produce {name} from {lt.origin}: {first}") from None
    if not isinstance(t, torch.Tensor):
        raise ExportError(f"{name} from {lt.origin} is a {type(t).__name__}, not a tensor")
    if tuple(t.shape) != tuple(lt.shape):
        raise ExportError(f"{name} from {lt.origin} has shape {list(t.shape)}, expected {list(lt.shape)}")
    if out_dtype is not None and t.is_floating_point() and t.dtype != out_dtype:
        t = t.to(out_dtype)
    return t.detach().to("cpu").contiguous()


QUEUE = 4  # tensors produced ahead of the writer thread: the memory it may hold beyond the sources'


def write_weights(folder: Path, tensors: dict[str, LazyTensor], out_dtype, max_shard_size: int | str,
                  progress: bool = True, desc: str = "write") -> dict[str, Any]:
    """Stream ``tensors`` into shards in ``folder``; returns the index plus a cast tally.

    Each shard's header is written from the plan (names, shapes, dtypes known before any
    tensor exists, :mod:`modelkit.io.safetensors_stream`), then every tensor is produced
    and handed to a writer thread that appends its bytes straight from its memory (file
    writes and ``os.fsync`` release the GIL), so computing and writing overlap and memory
    is about ``QUEUE`` tensors, whatever the shard size. A shard is fsynced by the writer
    once its last tensor is written; the source files' memory maps are dropped
    (``release_all``) after each shard. Every write and fsync has finished, its errors
    raised, before this returns. Computed experts are produced in batches
    (:func:`modelkit.formats.compressed_moe.lowrank.batched_experts`). Progress is one
    phase ``desc`` counting tensors (its note: the shard and the bytes produced); a cancel
    stops it at the next tensor."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    from modelkit.formats.compressed_moe.lowrank import batched_experts

    files, total = plan_shards(tensors, out_dtype, max_shard_size)
    outs = {filename: StreamedSafetensors(folder / filename,
                                          [(n, _target_dtype(tensors[n], out_dtype), tuple(tensors[n].shape))
                                           for n in names], metadata={"format": "pt"})
            for filename, names in files.items()}
    weight_map, cast, params = {}, Counter(), 0
    pending: deque = deque()

    def settle(limit: int) -> None:  # wait for the oldest writes (raising their errors)
        while len(pending) > limit:
            pending.popleft().result()

    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="modelkit-write") as writer, \
                phase(desc, total=len(tensors), unit="tensors", show=progress) as bar, \
                batched_experts():
            done_bytes = 0
            for i, (filename, names) in enumerate(files.items(), 1):
                where = f"shard {i}/{len(files)}"
                bar.update(0, note=f"{where}, {human_bytes(done_bytes)} of {human_bytes(total)}")
                out = outs[filename]
                for name in names:
                    lt = tensors[name]
                    t = produce(name, lt, out_dtype)
                    got, planned = dtype_name(t.dtype), _target_dtype(lt, out_dtype)
                    if got != planned:
                        raise ExportError(f"{name} from {lt.origin} is {got}, the view promised {planned}")
                    if lt.dtype != got:
                        cast[f"{lt.dtype}->{got}"] += 1
                    params += t.numel()
                    weight_map[name] = filename
                    done_bytes += t.numel() * t.element_size()
                    bar.update(1, note=f"{where}, {human_bytes(done_bytes)} of {human_bytes(total)}")
                    pending.append(writer.submit(out.write, name, t))
                    del t
                    settle(QUEUE)
                pending.append(writer.submit(out.close))
                release_all()  # unmap the source pages this shard consumed
            settle(0)  # raises the last write or fsync error (EIO, ENOSPC)
    except BaseException:
        for out in outs.values():  # the writer has stopped: close what it left open
            out.abandon()
        raise
    index = {"metadata": {"total_parameters": params, "total_size": total}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return {"files": list(files), "total_size": total, "cast": dict(cast)}


def _write_folder(folder: Path, artifact: Artifact, base_art: Artifact | None, dv, out_dtype,
                  max_shard_size, part: ExportResult, progress: bool, desc: str = "write") -> None:
    tensors = dict(dv.tensors)
    dtype = out_dtype or default_dtype(tensors)
    with recording_reads() as seen:
        written = write_weights(folder, tensors, dtype, max_shard_size, progress, desc=desc)
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
    write_config(folder, dv.config, part.dtype)
    _copy_generation_config(folder, artifact, base_art, part)
    _copy_tokenizer(folder, artifact, base_art, part)


def write_config(folder: Path, config, dtype: str) -> None:
    """``config.json`` of the standard architecture: custom fields and ``auto_map`` removed."""
    from modelkit.architecture.bridge import config_from_dict

    d = config.to_dict()
    for key in list(d):
        if key.startswith(DROPPED_CONFIG_PREFIXES) or key in ("auto_map", "_name_or_path"):
            d.pop(key)
    d["dtype"] = dtype
    d.pop("torch_dtype", None)
    clean = config_from_dict(d, "<export config>", strip_unknown=True)
    clean.architectures = [causal_lm_class_name(clean)]
    clean.save_pretrained(str(folder))
    written = json.loads((folder / "config.json").read_text())
    bad = [k for k in written if k.startswith(DROPPED_CONFIG_PREFIXES) or k == "auto_map"]
    if bad:  # pragma: no cover - config_from_dict strips them
        raise ExportError(f"exported config still carries custom fields {bad}", folder)


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


def _copy_generation_config(folder: Path, artifact: Artifact, base_art: Artifact | None,
                            part: ExportResult) -> None:
    for art in [artifact] + ([base_art] if base_art else []):
        p = Path(art.folder) / "generation_config.json"
        if os.path.lexists(p):  # a FIFO or an escaping symlink is refused, not skipped
            files.copy_confined(p, folder / p.name, art.trust_root)
            part.notes.append(f"generation_config.json from {art.folder}")
            return


def _copy_tokenizer(folder: Path, artifact: Artifact, base_art: Artifact | None,
                    part: ExportResult) -> None:
    src = tokenizer_folder(artifact, base_art)
    if src is None:
        part.notes.append("no tokenizer found in the artifact or its base: none exported")
        return
    # every file read or copied is confined to the trust root of whoever holds it
    root = base_art.trust_root if base_art is not None and src == Path(base_art.folder) else artifact.trust_root
    for name in TOKENIZER_FILES:
        p = src / name
        if not os.path.lexists(p):
            continue
        if name == "tokenizer_config.json":
            data = schemas.validate(files.read_json(p, root), p)
            if data.pop("auto_map", None) is not None:
                part.notes.append("tokenizer_config.json: auto_map (remote code) removed")
            (folder / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        else:
            files.copy_confined(p, folder / name, root)
    part.notes.append(f"tokenizer from {src}")


VERIFY_STEPS = 3  # the source's reference run, the export loaded, logits compared


def _verify(folder: Path, ref: Any, base: Any, expert: int | None, artifact: Artifact,
            part: ExportResult, tolerance: float | None, allow_untrained: bool,
            format_options: dict[str, Any], step=lambda n=1, note=None: None) -> None:
    """Compare the written folder with the source (see :mod:`modelkit.ops.verify`);
    ``step(1, note)`` after each of the :data:`VERIFY_STEPS` (progress, and where a
    cancel takes effect)."""
    from modelkit.ops.verify import source_reference, verify_folder

    options = {"base": base, **{k: v for k, v in format_options.items() if k != "expert"}}
    step(0, note="running the source")
    v = verify_folder(folder, lambda: source_reference(ref, artifact, expert=expert,
                                                       allow_untrained=allow_untrained, **options),
                      dtype=part.dtype, tolerance=tolerance, step=lambda note: step(1, note=note))
    step(1, note="logits match" if v.ok else "logits differ")
    part.verification = v.to_dict()
    part.ok = v.ok


def _write_record(folder: Path, part: ExportResult, artifact: Artifact, expert: int | None) -> None:
    import modelkit

    record = {
        "modelkit_version": modelkit.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": {"ref": part.ref, "folder": str(artifact.folder), "format": artifact.format,
                   "layout": artifact.layout, "fingerprint": part.source_fingerprint,
                   "base": artifact.base.record() if artifact.base else None},
        "options": part.options,
        "expert": expert,
        "dtype": part.dtype,
        "tensors": part.tensors,
        "total_size": part.bytes,
        "shards": part.shards,
        "produced": part.origins,
        "cast": part.cast,
        "consumed": len(part.consumed),
        "left_out": part.left_out,
        "merged": _what_was_done(artifact, part, expert),
        "notes": part.notes,
        "verification": part.verification,
    }
    (folder / RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n")
    write_model_card(folder, part, artifact, record["merged"])


def _what_was_done(artifact: Artifact, part: ExportResult, expert: int | None) -> str:
    if is_dylora(artifact):
        return f"DyLoRA-MoE expert {expert} merged into the base (router not used by a dense model)"
    if is_peft(artifact):
        return "PEFT LoRA adapter merged into its base"
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(part.origins.items()))
    return f"tensors by origin: {kinds}"


def _write_summary_record(tmp: Path, result: ExportResult, parts: list[ExportResult],
                          artifact: Artifact) -> None:
    import modelkit

    record = {"modelkit_version": modelkit.__version__,
              "source": {"ref": result.ref, "folder": str(artifact.folder), "format": artifact.format,
                         "layout": artifact.layout, "fingerprint": result.source_fingerprint},
              "options": result.options,
              "experts": {Path(p.out).name: {"ok": p.ok, "verification": p.verification} for p in parts},
              "note": "a routed mixture is not one dense model: one standard folder per expert"}
    (tmp / RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n")
    (tmp / CARD).write_text(mixture_card_text(result, parts, artifact), encoding="utf-8")


__all__ = ["ExportResult", "export", "plan_shards", "write_weights", "write_config"]
