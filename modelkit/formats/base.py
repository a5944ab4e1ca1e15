"""The format plugin protocol and the opened-artifact base class.

A format is one module under ``modelkit/formats/`` that defines a :class:`Format` and
registers it (``register(MyFormat())``). It answers three questions:

* ``detect(folder)``: is this folder mine, and in which layout?
* ``open(folder, layout, source)``: an :class:`Artifact` that lists what is stored
  (metadata only), names its base model, and builds a :class:`~modelkit.formats.view.TensorView`;
* ``Artifact.check(...)``: findings only this format can make.

What an artifact offers is declared, so operations ask the protocol instead of testing a
format's name:

* ``family``: ``"dense"`` (a view is the model), ``"adapter"`` (a view merges it into its
  base) or ``"mixture"`` (no single dense view is the model);
* ``options``: every keyword :func:`modelkit.load` / ``view()`` accepts for it, with type,
  default and help; anything else is refused by :meth:`Artifact.check_options`;
* :meth:`Artifact.export_targets`: the dense models an export writes (one, or one per
  expert of a mixture), each with what it merged and what verification compares it with;
* :meth:`Artifact.build_model`: the model for load options no dense view expresses (a
  routed mixture, an adapter left unmerged on its base); ``None`` means "load the view";
* :meth:`Artifact.bulk_production`: a context in which producing every tensor of a view
  in a row is cheaper (compressed MoE computes its experts in batches).
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, ContextManager

from modelkit import schemas
from modelkit.errors import (
    CorruptFileError,
    ExportError,
    FactError,
    ModelkitError,
    UnknownOptionError,
    UnsafePickleError,
)
from modelkit.io import files
from modelkit.io.tensors import StoredTensor, TensorFile, check_inside

if TYPE_CHECKING:  # pragma: no cover
    from modelkit.findings import Finding
    from modelkit.formats.view import LazyTensor, TensorView
    from modelkit.io.sources import Source


@dataclass
class BaseRef:
    """The base model an artifact needs: how it names it and where it was found."""

    name: str | None                 # as written in the artifact (hub id or path)
    path: Path | None = None         # resolved local folder, None when unavailable
    needs: str = "weights"           # "weights" (adapter, partial save) or "config"
    how: str = ""                    # how it was resolved, or why not

    @property
    def available(self) -> bool:
        return self.path is not None

    def record(self) -> dict[str, Any]:
        """What inspect, load and export record of the base: its name, the folder it was
        found at (None when not found), how it was resolved and what is needed of it."""
        return {"name": self.name, "path": str(self.path) if self.path else None, "how": self.how,
                "needs": self.needs}


@dataclass(frozen=True)
class Option:
    """One keyword a format's load / view accepts (shown by ``modelkit inspect``)."""

    name: str
    type: str                        # as shown to the user: "int", "float", "str"
    default: Any
    help: str
    fact: str | None = None          # the user-supplied fact it is another name for (Artifact.supply)

    def describe(self) -> str:
        return f"{self.name}= ({self.type}, default {self.default!r}): {self.help}"


FAMILIES = ("dense", "adapter", "mixture")
EXPERT_COLUMNS = (  # Artifact.expert_rows(): one row per expert, then the router
    "expert",      # expert_K, or "router"
    "present",     # "yes", "partial (...)", "MISSING (...)", "unplaceable (...)", "unreadable (...)"
    "trained",     # "yes", "no (why)", "not checked (why)"
    "tensors", "parameters", "bytes",
    "rank",        # LoRA rank(s) as stored
    "scaling",     # alpha / r (None: lora_alpha recorded nowhere)
    "norm_B",      # deep only: sqrt(sum ||B||^2) over the expert's modules
    "norm_BA",     # deep only: sqrt(sum ||B A||^2), the unscaled update
    "shape",       # the router's gate weight shape
    "file",        # where it is stored
)


@dataclass(frozen=True)
class ExportTarget:
    """One standard folder an export writes: where, from which view, and how it is checked."""

    subfolder: str                            # "" for OUT itself, "expert_1" for one of several
    options: dict[str, Any]                   # the view options that give this dense model
    merged: str | None = None                 # what was merged, for the record (None: by origin)
    reference: dict[str, Any] | None = None   # modelkit.load keywords of the model verify compares with
    reference_how: str = ""                   # that reference in words (None reference: the format's own)


@dataclass
class BuiltModel:
    """A model a format built itself (see :meth:`Artifact.build_model`), with what the load
    report records about it."""

    model: Any
    mode: str                                      # "routed", "peft-unmerged", ...
    options: dict[str, Any]                        # the load options as recorded
    origins: dict[str, str]                        # model tensor -> where its values came from
    notes: list[str] = field(default_factory=list)
    tied: list[str] = field(default_factory=list)  # stored tied duplicates not loaded
    findings: list["Finding"] = field(default_factory=list)  # warnings beyond the artifact's own


# what :meth:`Artifact.build_model` receives to load a dense artifact (the base of an adapter):
# ``load_dense(artifact) -> BuiltModel`` (mode "dense"), the operations' own checked path
DenseLoader = Callable[["Artifact"], BuiltModel]


class Artifact(ABC):
    """An artifact folder opened by its format. Reads metadata only until asked."""

    format: ClassVar[str] = ""
    family: ClassVar[str] = "dense"                  # one of FAMILIES
    options: ClassVar[tuple[Option, ...]] = ()       # the keywords load/view accept

    def check_options(self, given: Any) -> None:
        """UnknownOptionError (listing the accepted ones) for any keyword in ``given`` this
        format does not declare in :attr:`options`."""
        accepted = {o.name for o in self.options}
        unknown = sorted(set(given) - accepted)
        if unknown:
            listed = "; ".join(o.describe() for o in self.options) or "no options"
            raise UnknownOptionError(f"unknown option(s) {', '.join(f'{k}=' for k in unknown)} for a "
                                     f"{self.format} artifact; it accepts: {listed}", self.folder)

    def accept_options(self, given: Any) -> dict[str, Any]:
        """``given`` checked (:meth:`check_options`), less the options that are another name
        for a user-supplied fact (``Option.fact``): those are :meth:`supply`-ed, so the
        artifact records them as supplied, and removed."""
        self.check_options(given)
        options = dict(given)
        for o in self.options:
            if o.fact is not None and options.get(o.name) is not None:
                self.supply(**{o.fact: options.pop(o.name)})
            elif o.fact is not None:
                options.pop(o.name, None)
        return options

    def __init__(self, folder: Path, layout: str, source: "Source | None" = None):
        self.folder = Path(folder)
        self.layout = layout
        self.source = source
        self.base: BaseRef | None = None   # set by open_artifact once resolved
        self._files: dict[str, TensorFile] = {}
        self.file_errors: list[ModelkitError] = []  # unreadable files met while listing
        self.supplied: dict[str, Any] = {}          # facts the user gave that the artifact lacks

    @property
    def layout_label(self) -> str:
        """The layout as summaries show it (``layout`` is the stable code records keep)."""
        return self.layout

    def supply(self, **facts: Any) -> None:
        """Facts the artifact does not record, given by the user (e.g. DyLoRA's
        ``lora_alpha``); FactError for a fact this format has no use for."""
        facts = {k: v for k, v in facts.items() if v is not None}
        if facts:
            raise FactError(f"{self.format} artifacts take no user-supplied {', '.join(sorted(facts))}",
                              self.folder)

    # -- file access, confined to the artifact ---------------------------------------
    @property
    def trust_root(self) -> Path:
        """Files may live anywhere under this folder (an HF cache repo, a W&B root)."""
        return self.source.trust_root if self.source is not None else self.folder

    def path(self, rel: str | Path) -> Path:
        """``folder / rel``, refused when it (or a symlink on the way) leaves the artifact."""
        p = self.folder / rel
        check_inside(self.trust_root, p)
        return p

    def file(self, rel: str) -> TensorFile:
        """The (cached) TensorFile at ``rel`` inside the artifact folder."""
        if rel not in self._files:
            self._files[rel] = TensorFile.open(self.path(rel), rel)
        return self._files[rel]

    def entries_of(self, rel: str, prefix: str = "") -> list[StoredTensor]:
        """The tensors stored in ``rel`` (metadata). An unreadable file is recorded in
        ``file_errors`` (inspect reports it as a finding; load and export raise it) and
        contributes nothing."""
        try:
            return self.file(rel).stored(prefix)
        except (CorruptFileError, UnsafePickleError) as e:
            if not any(str(x) == str(e) for x in self.file_errors):
                self.file_errors.append(e)
            return []

    def release(self) -> None:
        """Close every weight file opened so far, unmapping the pages read (the metadata
        stays; a later read reopens the file)."""
        for f in list(self._files.values()):
            f.release()

    def raise_file_errors(self) -> None:
        """Raise the first unreadable-file error met so far (for load and export)."""
        self.stored()
        if self.file_errors:
            raise self.file_errors[0]

    def read_json(self, rel: str) -> dict[str, Any]:
        """A JSON file of the artifact: confined, regular, size-capped, parsed and checked
        against its schema (:mod:`modelkit.schemas`); ConfigError names the file."""
        p = self.path(rel)
        return schemas.validate(files.read_json(p, self.trust_root), p)

    def read_config(self, rel: str) -> dict[str, Any]:
        """:meth:`read_json` for JSON or YAML (by suffix)."""
        p = self.path(rel)
        return schemas.validate(files.read_config(p, self.trust_root), p)

    # -- what every format answers ----------------------------------------------------
    @abstractmethod
    def stored(self) -> list[StoredTensor]:
        """Every tensor the artifact stores (metadata only, no tensor data read)."""

    def base_name(self) -> str | None:
        """The base model this artifact needs, as it names it (None: self-contained)."""
        return None

    def base_needs(self) -> str:
        """What the base supplies: ``"weights"`` or only the ``"config"``."""
        return "weights"

    @abstractmethod
    def config(self):
        """The PretrainedConfig of the standard model this artifact is (or adapts)."""

    def architecture(self):
        """What ``architectures.expected_tensors`` needs: the config, or the path of a
        standard ``config.json`` (which lets a cached audit skip importing transformers)."""
        return self.config()

    def config_facts(self):
        """The config's values for checks and summaries: an ``archfacts.ConfigFacts`` (no
        transformers import on a warm cache) for formats whose ``architecture()`` is raw."""
        from modelkit.architecture.facts import config_facts

        return config_facts(self.architecture())

    @abstractmethod
    def view(self, base: "Artifact | None" = None, **options) -> "TensorView":
        """The artifact as on-disk-named lazy tensors of its standard model."""

    def reference_model(self, **options) -> "tuple[Any, str] | None":
        """``(float64 model, how it was built)``: the artifact's stored form materialised by a
        second path that shares nothing with :meth:`view` (what ``export --verify`` compares
        with), or None when the format has none (verify then loads through the view)."""
        return None

    def check(self, base: "Artifact | None", deep: bool = False) -> list["Finding"]:
        """Findings only this format can make (the generic audit does the rest)."""
        return []

    def variants(self) -> dict[str, dict[str, Any]]:
        """When no single dense view is the artifact: the view options that together are it,
        by label (DyLoRA-MoE: ``{"expert_0": {"expert": 0}, ...}``). ``{}``: ``view()`` is it."""
        return {}

    def export_targets(self, choice: Any = None) -> list[ExportTarget]:
        """The dense models ``export`` writes. ``choice`` is export's ``expert=`` (a part of a
        mixture, or ``"all"``); a format without parts refuses one with an ExportError."""
        if choice is not None:
            raise ExportError(f"expert= applies to mixture artifacts only (this is {self.format}, "
                              f"a {self.family} artifact)", self.folder)
        return [ExportTarget("", {})]

    def build_model(self, base: "Artifact | None", *, dtype: Any, allow_untrained: bool,
                    load_dense: DenseLoader, **options: Any) -> BuiltModel | None:
        """The model for load ``options`` that no dense view expresses, built by the format
        (a routed mixture, an unmerged adapter), or None: ``load`` fills the standard model
        from :meth:`view` (``options`` are then the view's). ``options`` are already
        checked against :attr:`options`."""
        return None

    def bulk_production(self) -> ContextManager[None]:
        """A context in which producing the view's tensors one after another is cheaper (a
        format computing tensors may batch them); export writes its shards inside it."""
        return contextlib.nullcontext()

    def expert_rows(self, deep: bool = False) -> list[dict[str, Any]]:
        """A mixture of adapters: one row per expert and one for its router (keys
        :data:`EXPERT_COLUMNS`): what is stored, and with ``deep`` whether each expert changes
        its base (``trained`` is ``"not checked"`` without it, never guessed). ``[]``: no experts."""
        return []

    def unviewed(self) -> dict[str, "LazyTensor"]:
        """Stored tensors that no view places (DyLoRA-MoE's router), by name."""
        return {}

    def describe(self) -> dict[str, Any]:
        """Format-specific facts worth showing (experts, rank, routing, ...)."""
        return {}

    def config_sources(self) -> list[Path]:
        """Config files read, for error messages and fingerprints."""
        return [p for p in [self.folder / "config.json"] if p.exists()]

    @cached_property
    def fingerprint(self) -> str:
        """A content fingerprint of the artifact folder (see sources.fingerprint_folder)."""
        from modelkit.io.sources import fingerprint_folder

        return fingerprint_folder(self.folder, self.trust_root)


class Format(ABC):
    """A format plugin: detection and opening."""

    name: ClassVar[str]
    looks_for: ClassVar[str]          # what detect() looks for, for "unknown folder" errors
    priority: ClassVar[int] = 50      # lower runs first (specific formats before plain HF)
    layouts: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def detect(self, folder: Path) -> str | None:
        """The layout name when ``folder`` is in this format, else None. Cheap: no tensors."""

    @abstractmethod
    def open(self, folder: Path, layout: str, source: "Source | None" = None) -> Artifact:
        """Open ``folder`` (already detected as ``layout``)."""
