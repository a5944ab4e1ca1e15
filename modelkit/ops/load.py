"""``load``: any artifact as a working transformers model, its tokenizer and a load report.

An artifact goes through its :class:`~modelkit.formats.view.TensorView` into transformers'
own loading path (:func:`modelkit.architecture.bridge.disk_to_model`), unless its format builds
the model itself for the options given (:meth:`~modelkit.formats.base.Artifact.build_model`:
DyLoRA-MoE's routed mixture, a PEFT adapter with ``merge=False``). This module knows no format.

Nothing is dropped silently: a stored tensor the load does not consume, a tensor the
model needs that nobody provides, a shape that does not fit, or an adapter that changes
nothing (unless ``allow_untrained=True``) is a :class:`~modelkit.errors.LoadError`.
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

from modelkit.errors import BaseModelUnavailableError, LoadError, guarded
from modelkit.findings import LOAD_TOLERATES, UNTRAINED_CODES, Finding, Severity
from modelkit.formats import Artifact
from modelkit.formats.base import BuiltModel
from modelkit.formats.view import LazyTensor, TensorView
from modelkit.io.files import check_files
from modelkit.io.tensors import dtype_name, recording_reads, torch_dtype
from modelkit.formats.open import open_artifact, open_base, split_facts

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "spiece.model", "vocab.txt")


# --------------------------------------------------------------------------- results


@dataclass
class LoadReport:
    """Where every tensor of a loaded model came from, and what was consumed."""

    ref: str
    folder: str
    format: str
    layout: str
    mode: str                                   # "dense", "peft-unmerged" or "routed"
    dtype: str
    base: dict[str, Any] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)     # model tensor -> origin
    consumed: list[str] = field(default_factory=list)         # stored tensors read into the model ("file:key")
    unused: list[str] = field(default_factory=list)           # stored tensors the format leaves out (see notes)
    tied: list[str] = field(default_factory=list)             # stored tied duplicates (not loaded)
    tokenizer_from: str | None = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    layout_label: str = ""        # the layout as summaries show it (``layout``: the stable code)

    def origin_counts(self) -> dict[str, int]:
        """How many model tensors each kind of origin supplied (``stored``, ``merged``, ...)."""
        return dict(Counter(o.split(":", 1)[0] for o in self.origins.values()))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), default=str, **kw)

    def to_frame(self):
        """One row per model tensor: name, origin."""
        import pandas as pd

        return pd.DataFrame(sorted(self.origins.items()), columns=["tensor", "origin"])

    def summary(self) -> str:
        lines = [f"{self.ref}", f"  format  {self.format} ({self.layout_label or self.layout}), loaded {self.mode} as {self.dtype}"]
        if self.base:
            lines.append(f"  base    {self.base.get('name')} -> {self.base.get('path')}")
        if self.options:
            lines.append(f"  options {self.options}")
        counts = ", ".join(f"{n} {k}" for k, n in sorted(self.origin_counts().items()))
        lines.append(f"  tensors {len(self.origins)} ({counts}); consumed {len(self.consumed)} stored tensor(s)"
                     + (f", {len(self.unused)} left out (see notes): {_few(self.unused, 3)}" if self.unused else ""))
        if self.tied:
            lines.append(f"  tied    {len(self.tied)} stored duplicate(s) replaced by their source: {', '.join(self.tied)}")
        lines.append(f"  tokenizer from {self.tokenizer_from or 'nowhere (none found)'}")
        lines += [f"  note    {n}" for n in self.notes]
        lines += [f"  WARNING {w}" for w in self.warnings]
        return "\n".join(lines)


@dataclass
class LoadResult:
    """``model, tokenizer, report = load(...)``."""

    model: Any
    tokenizer: Any
    report: LoadReport

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.tokenizer, self.report))


# --------------------------------------------------------------------------- preparation


def open_for_load(ref: Any, base: Any = None, facts: dict[str, Any] | None = None
                  ) -> tuple[Artifact, Artifact | None]:
    """Open ``ref`` and its base; BaseModelUnavailableError when a needed base is missing.
    ``facts``: what the artifact does not record, supplied by the user (``lora_alpha``, ...)."""
    artifact = open_artifact(ref, base=base, facts=facts)
    base_art = None
    if artifact.base is not None:
        if not artifact.base.available:
            raise BaseModelUnavailableError(
                f"needs the {artifact.base.needs} of its base model {artifact.base.name!r}, "
                f"which cannot be found: {artifact.base.how}", artifact.folder)
        base_art = open_base(artifact)
        if base_art is not None:
            base_art.raise_file_errors()
    artifact.raise_file_errors()
    return artifact, base_art


def check_artifact(artifact: Artifact, base_art: Artifact | None, *,
                   allow_untrained: bool = False) -> list[Finding]:
    """The format's own findings; error-severity ones raise LoadError.

    Empty or all-zero adapters (a "trained" model that is its base) raise unless
    ``allow_untrained``; the codes in :data:`~modelkit.findings.LOAD_TOLERATES` are left to
    the model builder (it refuses what the model it builds needs). Returns the warnings (and
    tolerated errors) for the report.
    """
    findings = artifact.check(base_art, deep=artifact.family != "dense")  # adapter data is small: read it
    artifact.raise_file_errors()
    fatal, kept = [], []
    for f in findings:
        if f.severity != Severity.ERROR:
            if f.severity == Severity.WARNING:
                kept.append(f)
            continue
        if f.code in UNTRAINED_CODES and allow_untrained:
            kept.append(f)
        elif f.code in LOAD_TOLERATES:
            kept.append(f)
        else:
            fatal.append(f)
    if fatal:
        lines = "\n".join(f"  {f.code}: {f.message}" + (f" [{', '.join(f.tensors[:3])}"
                                                        f"{' ...' if len(f.tensors) > 3 else ''}]"
                                                        if f.tensors else "") for f in fatal)
        hint = ("\n(pass allow_untrained=True to load an untrained or empty adapter anyway)"
                if any(f.code in UNTRAINED_CODES for f in fatal) else "")
        raise LoadError(f"cannot load this artifact faithfully:\n{lines}{hint}", artifact.folder)
    return kept


@dataclass
class DenseView:
    """A checked dense view: tensors in the model's on-disk order, nothing left over.

    ``config`` (the transformers config object) is built on first use: the check itself
    needs only the cached architecture, and building the config imports seconds of
    transformers that an export can overlap with writing the weights."""

    build_config: Callable[[], Any] = field(repr=False)
    tensors: dict[str, LazyTensor]
    tied: list[str]                     # tied duplicates present in the view, left out
    notes: list[str]
    architecture: Any = None            # the raw input ``config`` is built from (None: not raw)

    @cached_property
    def config(self) -> Any:
        return self.build_config()


def dense_view(artifact: Artifact, base_art: Artifact | None, **options) -> DenseView:
    """The artifact's view held against its architecture: LoadError on anything left over,
    missing or mis-shaped. Reads no tensor data."""
    from modelkit.architecture.bridge import fit_tensors

    view: TensorView = artifact.view(base_art, **options)
    # the raw architecture (a config.json, a dict) is checked from the on-disk cache of
    # expected tensors without importing transformers (a cache miss builds and validates it)
    architecture = artifact.architecture()
    if view.unplaced:
        names = [f"{t.file}:{t.key}" for t in view.unplaced]
        raise LoadError(f"{len(names)} stored tensor(s) have no place in the model and would be "
                        f"dropped: {_few(names)}", artifact.folder)
    fit = fit_tensors(architecture, {n: tuple(t.shape) for n, t in view.tensors.items()})
    problems = []
    if fit.missing:
        problems.append(f"{len(fit.missing)} tensor(s) the model needs are not provided: {_few(fit.missing)}")
    if fit.unexpected:
        problems.append(f"{len(fit.unexpected)} tensor(s) have no place in the model: {_few(fit.unexpected)}")
    if fit.mismatched:
        problems.append(f"{len(fit.mismatched)} tensor(s) have the wrong shape: {_few(fit.mismatch_lines())}")
    if problems:
        raise LoadError("; ".join(problems), artifact.folder)
    ordered = {n: view.tensors[n] for n in fit.expected}
    raw = isinstance(architecture, (str, Path, Mapping))
    return DenseView(artifact.config if raw else (lambda: architecture), ordered, fit.tied_given,
                     list(view.notes), architecture if raw else None)


def _few(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def split_consumed(artifact: Artifact, seen: set[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """(stored tensors of ``artifact`` that were read, those that were not) as ``file:key``."""
    used, unused = [], []
    for t in artifact.stored():
        (used if (str(artifact.folder / t.file), t.key) in seen else unused).append(f"{t.file}:{t.key}")
    return used, unused


# --------------------------------------------------------------------------- load


@guarded()
def load(ref: Any, base: Any = None, dtype: Any = None, device: str | None = None, *,
         merge: bool = True, routing: str | None = None, allow_untrained: bool = False,
         tokenizer: bool = True, **format_options: Any) -> LoadResult:
    """Load ``ref`` as a transformers model with its tokenizer and a :class:`LoadReport`.

    * plain HF, compressed MoE, PEFT (merged): the dense view loaded by transformers;
    * PEFT with ``merge=False``: a ``PeftModel`` applied to its base;
    * DyLoRA-MoE: the routed module, ``routing="router"`` (default), ``"expert:K"`` or
      ``"mean"``; with ``expert=K`` instead, the dense merge of expert K.

    ``tokenizer=False`` skips the tokenizer (``LoadResult.tokenizer`` is None; for callers
    that only run the model, e.g. export verification's reference).

    ``format_options`` go to the format's view (e.g. ``expert=0``). Never runs remote
    code. ``lora_alpha=`` / ``lora_r=`` supply what an early DyLoRA-MoE checkpoint does
    not record (the report's ``options["supplied"]`` says so). Raises LoadError (or
    another ModelkitError) instead of loading something partial.
    """
    facts, format_options = split_facts(format_options)
    artifact, base_art = open_for_load(ref, base, facts)
    if routing is not None:
        format_options["routing"] = routing
    if not merge:
        format_options["merge"] = False
    options = artifact.accept_options(format_options)  # typed error listing what this format accepts
    tdtype = torch_dtype(dtype, floating=True)
    findings = check_artifact(artifact, base_art, allow_untrained=allow_untrained)

    def load_dense(art: Artifact) -> BuiltModel:  # what a format building on a base loads it with
        checked = check_artifact(art, None)
        return replace(_dense(art, None, tdtype), findings=checked)

    with recording_reads() as seen:
        built = (artifact.build_model(base_art, dtype=tdtype, allow_untrained=allow_untrained,
                                      load_dense=load_dense, **options)
                 or _dense(artifact, base_art, tdtype, **options))
    model = built.model
    report = LoadReport(ref=str(ref), folder=str(artifact.folder), format=artifact.format,
                        layout=artifact.layout, layout_label=artifact.layout_label, mode=built.mode,
                        dtype=dtype_name(tdtype or model.dtype),
                        base=artifact.base.record() if artifact.base else None, options=dict(built.options), origins=dict(built.origins),
                        tied=list(built.tied), notes=list(built.notes),
                        warnings=[f"{f.code}: {f.message}" for f in findings + list(built.findings)])
    report.consumed, report.unused = split_consumed(artifact, seen)
    supplied = _supplied(artifact, base)
    if supplied:
        report.options["supplied"] = supplied
        report.notes.append("supplied by the user, not recorded in the artifact: "
                            + ", ".join(f"{k}={v}" for k, v in supplied.items()))
    if device is not None:
        model = model.to(device)
    model.eval()
    tok, tok_from, tok_note = (load_tokenizer(artifact, base_art) if tokenizer
                               else (None, None, "tokenizer not loaded (tokenizer=False)"))
    report.tokenizer_from = tok_from
    if tok_note:
        report.notes.append(tok_note)
    return LoadResult(model, tok, report)


def _supplied(artifact: Artifact, base: Any) -> dict[str, Any]:
    """Facts the user gave that the artifact does not record (the base included)."""
    out = dict(artifact.supplied)
    if base is not None and artifact.base_name() is None:
        out["base"] = str(base)
    return out


def load_dense_model(dv: DenseView, dtype, device: str | None = None):
    """``disk_to_model`` over a checked dense view; LoadError unless every tensor landed."""
    from modelkit.architecture.bridge import disk_to_model
    from modelkit.progress import check_cancelled, phase

    # computed tensors (compressed experts) are produced in the dtype asked for, never
    # rounded to a lower declared dtype first
    def producer(t, bar):
        def produce():
            out = t.produce_as(dtype)
            bar.update(1, check=False)   # inside transformers' loading: cancelled after it
            return out
        return produce

    shapes = {n: tuple(t.shape) for n, t in dv.tensors.items()}
    # progress only where a display asks for it (a panel): load is a step of many callers
    with phase("load", total=len(dv.tensors), unit="tensors", show=False) as bar:
        producers = {n: producer(t, bar) for n, t in dv.tensors.items()}
        model, info = disk_to_model(dv.config, producers, dtype, device=device, shapes=shapes)
        check_cancelled()
    if not info.ok:
        details = [f"{k}: {_few([str(x) for x in v])}" for k, v in (
            ("missing", info.missing), ("unexpected", info.unexpected), ("mismatched", info.mismatched),
            ("skipped", info.skipped), ("model_missing", info.model_missing),
            ("model_unexpected", info.model_unexpected), ("model_mismatched", info.model_mismatched),
            ("conversion_errors", list(info.conversion_errors)), ("errors", info.error_msgs)) if v]
        raise LoadError("transformers did not load every tensor: " + "; ".join(details))
    return model


def _dense(artifact: Artifact, base_art: Artifact | None, dtype, **options) -> BuiltModel:
    """The artifact's checked dense view filled into its standard model."""
    dv = dense_view(artifact, base_art, **options)
    if dtype is None:
        dtype = torch_dtype(getattr(dv.config, "dtype", None) or "float32", floating=True)
    model = load_dense_model(dv, dtype)
    return BuiltModel(model, "dense", dict(options), {n: t.origin for n, t in dv.tensors.items()},
                      notes=list(dv.notes), tied=list(dv.tied))


# --------------------------------------------------------------------------- tokenizer


def tokenizer_folder(artifact: Artifact, base_art: Artifact | None) -> Path | None:
    """The first folder holding tokenizer files: the artifact, its source root, its base."""
    candidates = [artifact.folder]
    if artifact.source is not None:
        candidates.append(artifact.source.root)
    if base_art is not None:
        candidates.append(base_art.folder)
    for folder in candidates:
        if any((Path(folder) / f).is_file() for f in TOKENIZER_FILES):
            return Path(folder)
    return None


def load_tokenizer(artifact: Artifact, base_art: Artifact | None) -> tuple[Any, str | None, str | None]:
    """(tokenizer or None, folder it came from, note). ``pad_token`` is set for lm-eval
    (to eos, else unk) when the tokenizer has none. Never runs remote code."""
    from transformers import AutoTokenizer

    folder = tokenizer_folder(artifact, base_art)
    if folder is None:
        return None, None, "no tokenizer files in the artifact or its base"
    owner = base_art if base_art is not None and folder == Path(base_art.folder) else artifact
    check_files(folder, TOKENIZER_FILES + ("config.json",), owner.trust_root)  # nothing from outside it
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as e:  # transformers raises many types for unreadable tokenizers
        raise LoadError(f"cannot load the tokenizer ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})", folder) from None
    note = None
    if tok.pad_token is None:
        fill = tok.eos_token or tok.unk_token
        if fill is not None:
            tok.pad_token = fill
            note = f"tokenizer had no pad_token; set to {fill!r} (lm-eval pads batches)"
    return tok, str(folder), note
