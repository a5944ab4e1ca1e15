"""Compressed MoE checkpoints: a shared core per expert projection plus per-expert
low-rank wrappers, ``W_e = (I + U_out V_out^T) C (I + U_in V_in^T)`` (FORMATS.md section 4).

Layouts (the folder opened is the checkpoint directory):

* ``checkpoint-N``: ``config.json`` (the original MoE config), ``non_moe_weights.pt``
  (every tensor but the experts, the distilled router included), ``compressed_metadata.json``
  and ``layer_{i}/{proj}.pt``; settings two levels up in the experiment directory
  (``compression_config.yaml``, ``compression_stats.yaml``);
* ``checkpoint-0`` (zero-shot): ``layer_{i}/{proj}.pt``, ``{proj}_metadata.json`` and
  ``extracted_weights/``, no config or non-expert tensors: the original model supplies them;
* ``documented``: like checkpoint-N with ``compression_config.json`` /
  ``compression_statistics.yaml`` in the checkpoint itself.

Pointed at the experiment directory ``models/<model>/<experiment>/``, the latest
``checkpoints/checkpoint-N/`` is opened and the others are listed as siblings.

**Stored names.** ``non_moe_weights.pt`` keys are listed as stored. Layer files get the
compressed model's in-memory names, so roles, layers and experts classify:
``model.layers.{i}.mlp.shared_core_layers.{proj}.core``,
``...shared_core_layers.{proj}.experts.{e}.{input,output}_wrapper.{U,V}`` (``U_in`` is
``input_wrapper.U``, ``V_out`` is ``output_wrapper.V``), ``...experts.{e}.bias``, a per-expert
core copy ``...experts.{e}.core``; any other key ``...shared_core_layers.{proj}.{key}``.
Extracted originals are ``extracted_weights.model.layers.{i}.mlp.experts.{e}.{proj}.weight``.
The same in-memory names found inside ``non_moe_weights.pt`` are understood too (a layer
with no file is built from them; copies and duplicates are reported).

**The view** (original model's on-disk names): each expert of a compressed (layer,
projection) is computed from its core and wrappers (fp32, cast to the model dtype: that of
the non-expert tensors); non-expert tensors (the trained router ``mlp.gate.weight``
included) come from ``non_moe_weights.pt``, or from the original model for checkpoint-0;
experts of (layer, projection)s that were never compressed come from the original model.
A projection listed as compressed whose file is missing is left missing, never filled from
the original, and checkpoint-N without ``non_moe_weights.pt`` is not filled either: both
are faults ``check`` reports. ``extracted_weights/`` (copies of the original experts the
compression was fit to) never enter the view. Rotary ``inv_freq`` buffers are dropped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from modelkit import schemas
from modelkit.errors import (
    BaseModelUnavailableError,
    ConfigError,
    ModelkitError,
    UnknownFormatError,
)
from modelkit.findings import Finding, error, info, warning
from modelkit.formats import register
from modelkit.formats.base import Artifact, Format, Option
from modelkit.formats.view import LazyTensor, TensorView, stored_tensor
from modelkit.io import files
from modelkit.io.checkpoints import checkpoint_folders, checkpoint_step
from modelkit.io.tensors import FLOAT_DTYPES, PickleFile, StoredTensor, torch_dtype
from modelkit.units import human_bytes

if TYPE_CHECKING:  # pragma: no cover
    import torch

NON_MOE = "non_moe_weights.pt"
METADATA = "compressed_metadata.json"
EXTRACTED = "extracted_weights"
DEFAULT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# settings files: (name, where: "." the checkpoint itself, "experiment" its experiment folder)
SETTINGS_FILES = (("compression_config.json", "."), ("compression_config.yaml", "."),
                  ("compression_config.yaml", "experiment"), ("compression_config.json", "experiment"))
STATS_FILES = (("compression_statistics.yaml", "."), ("compression_stats.yaml", "."),
               ("compression_stats.yaml", "experiment"), ("compression_statistics.yaml", "experiment"))
TRAINER_WEIGHTS = "model.safetensors"   # the HF Trainer's own save of the compressed model
TRAINER_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin")
ZERO_SHOT_LAYOUTS = ("checkpoint-0", "early-compressed", "tmp")
LOGIT_CHECK_MAX_PARAMS = 200_000_000   # inspect --deep measures the two forms' logits below this size
UNUSABLE = "unusable"   # detected so that opening it says why (a crashed or empty save), never a model
CORE_CHOICES = {"copies": "each expert's own core copy (the Trainer's model.safetensors): what the trained "
                          "forward multiplied by",
                "shared": "the saved shared core (layer_{i}/{proj}.pt) with each expert's wrappers"}
WRAPPER_PARTS = ("U_in", "V_in", "U_out", "V_out")

_LAYER_DIR = re.compile(r"^layer_(\d+)$")
_EXTRACTED_FILE = re.compile(r"^layer_(\d+)_(\w+)\.pt$")
_IN_MEMORY = {"input_wrapper.U": "U_in", "input_wrapper.V": "V_in",
              "output_wrapper.U": "U_out", "output_wrapper.V": "V_out"}
_ON_FILE = {v: k for k, v in _IN_MEMORY.items()}
_SHARED = re.compile(r"^(?:.*\.)?layers\.(?P<layer>\d+)\.mlp\.shared_core_layers\.(?P<proj>[^.]+)\."
                     r"(?:experts\.(?P<e>\d+)\.)?(?P<leaf>core|biases|bias|(?:input|output)_wrapper\.[UV])$")
_PER_EXPERT = re.compile(r"^(?:.*\.)?layers\.(?P<layer>\d+)\.mlp\.experts\.(?P<e>\d+)\.(?:(?P<proj>[^.]+)\.)?"
                         r"(?P<leaf>core|(?:input|output)_wrapper\.[UV])$")
_EXPERT_SLOT = re.compile(r"^.*\.layers\.(?P<layer>\d+)\.(?:.*\.)?experts\.(?P<e>\d+)\."
                          r"(?P<proj>[^.]+)\.(?P<kind>weight|bias)$")
_ROTARY = re.compile(r"(?:^|\.)rotary_emb\.(?:original_)?inv_freq$")


# --------------------------------------------------------------------------- settings YAML as plain data


def _plain_node(loader, suffix, node):
    """Any tagged node (``!!python/object:...``, ``!!python/name:...``, ``!custom``) as the
    plain mapping, sequence or string it is written as: nothing is imported or called."""
    import yaml

    if isinstance(node, yaml.MappingNode):
        data: dict = {}
        yield data
        data.update(loader.construct_mapping(node, deep=True))
    elif isinstance(node, yaml.SequenceNode):
        items: list = []
        yield items
        items.extend(loader.construct_sequence(node, deep=True))
    else:
        yield loader.construct_scalar(node)


@functools.lru_cache(maxsize=1)
def plain_data_loader():
    """PyYAML's SafeLoader reading every unknown tag as plain data (never constructing an
    object). Our own subclass, a few lines, because no library offers "safe, but tolerate
    tags": ``yaml.load(text, Loader=plain_data_loader())``."""
    import yaml

    class PlainDataLoader(yaml.SafeLoader):
        pass

    PlainDataLoader.add_multi_constructor("tag:yaml.org,2002:python/", _plain_node)
    PlainDataLoader.add_multi_constructor("!", _plain_node)
    return PlainDataLoader


def read_settings_yaml(text: str) -> Any:
    """A settings YAML as plain data (see :func:`plain_data_loader`, :func:`plain_settings`)."""
    import yaml

    return plain_settings(yaml.load(text, Loader=plain_data_loader()))


def plain_settings(data: Any, depth: int = 0) -> Any:
    """Settings read with :func:`plain_data_loader`, with omegaconf containers dumped as
    Python objects (``{_content: [...]}``, nodes ``{_val: x}``) reduced to their values;
    back-references to parent containers are dropped."""
    if depth > 20:
        return None
    if isinstance(data, dict):
        if "_content" in data:
            return plain_settings(data["_content"], depth + 1)
        if "_val" in data and "_metadata" in data:
            return plain_settings(data["_val"], depth + 1)
        return {k: plain_settings(v, depth + 1) for k, v in data.items()
                if not (isinstance(k, str) and k in ("_parent", "_metadata", "_flags_cache"))}
    if isinstance(data, list):
        return [plain_settings(v, depth + 1) for v in data]
    return data


# --------------------------------------------------------------------------- the maths


def materialize(core: "torch.Tensor", u_in: "torch.Tensor", v_in: "torch.Tensor", u_out: "torch.Tensor",
                v_out: "torch.Tensor", dtype: "torch.dtype | None" = None) -> "torch.Tensor":
    """``(I + U_out V_out^T) C (I + U_in V_in^T)`` without a d x d matrix.

    Computed in float32 (float64 when ``dtype`` is float64) as ``B + (B U_in) V_in^T`` with
    ``B = C + U_out (V_out^T C)`` (the four terms of FORMATS.md in four rank-r products, no
    concatenation: 10-20% less CPU than the stacked form, measured), returned in ``dtype``
    (default: the core's).
    """
    import torch

    work = torch.float64 if dtype == torch.float64 else torch.float32
    c = core.to(work)
    u_in, v_in, u_out, v_out = (t.to(work) for t in (u_in, v_in, u_out, v_out))
    b = torch.addmm(c, u_out, v_out.T @ c)           # B = (I + U_out V_out^T) C
    return b.addmm_(b @ u_in, v_in.T).to(dtype or core.dtype)  # B (I + U_in V_in^T)


def parse_compressed_name(name: str) -> tuple[int, str | None, int | None, str] | None:
    """``(layer, projection, expert, part)`` of an in-memory compressed-MoE name, else None.

    ``part`` is ``core``, ``U_in``, ``V_in``, ``U_out``, ``V_out``, ``bias`` or ``biases``
    (a ``[E, d_out]`` matrix); ``expert`` is None for the shared core; ``projection`` is None
    when the name does not say (``...mlp.experts.{e}.input_wrapper.U``).
    """
    m = _SHARED.match(name) or _PER_EXPERT.match(name)
    if m is None:
        return None
    e = m.group("e")
    leaf = m.group("leaf")
    part = _IN_MEMORY.get(leaf, leaf)
    if part in WRAPPER_PARTS + ("bias",) and e is None:
        return None
    return int(m.group("layer")), m.group("proj"), int(e) if e is not None else None, part


def _layer_name(layer: int, proj: str, key: str) -> str:
    """The stored (in-memory style) name of key ``key`` of ``layer_{layer}/{proj}.pt``."""
    return f"{_layer_prefix(layer, proj)}{_key_suffix(key)}"


def _layer_prefix(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.shared_core_layers.{proj}."


# Every layer file of a checkpoint holds the same few hundred keys (``wrappers.{e}.{part}``):
# what a key becomes is worked out once per distinct key, not once per tensor (10^5 in a
# real checkpoint). Bounded, so a hostile file of many distinct keys costs no memory.
@functools.lru_cache(maxsize=1 << 14)
def _key_suffix(key: str) -> str:
    """The part of :func:`_layer_name` after the layer file's prefix."""
    parts = key.split(".")
    if len(parts) == 3 and parts[0] == "wrappers" and parts[1].isdigit():
        leaf = {"core": "core", "bias": "bias"}.get(parts[2]) or _ON_FILE.get(parts[2])
        if leaf:
            return f"experts.{parts[1]}.{leaf}"
    if len(parts) == 2 and parts[0] == "biases" and parts[1].isdigit():
        return f"experts.{parts[1]}.bias"
    return key


_FILE_PARTS = frozenset(("core", "bias") + WRAPPER_PARTS)


def _layer_file_part(layer: int, proj: str, key: str) -> tuple[int, str | None, int | None, str] | None:
    """``parse_compressed_name(_layer_name(layer, proj, key))``, without building and
    matching the name for the keys torch.save writes (``core``, ``biases``,
    ``wrappers.{e}.{part}``, ``biases.{e}``): a real checkpoint has 10^5 of them."""
    if "." not in proj:
        known = _file_key_part(key)
        if known is not None:
            return layer, proj, known[0], known[1]
    return parse_compressed_name(_layer_name(layer, proj, key))


@functools.lru_cache(maxsize=1 << 14)  # once per distinct key, as _key_suffix
def _file_key_part(key: str) -> tuple[int | None, str] | None:
    """``(expert, part)`` of a key torch.save writes in a layer file, else None."""
    parts = key.split(".")
    if len(parts) == 1 and parts[0] in ("core", "biases"):
        return None, parts[0]
    if len(parts) >= 2 and parts[1].isascii() and parts[1].isdigit():
        if len(parts) == 3 and parts[0] == "wrappers" and parts[2] in _FILE_PARTS:
            return int(parts[1]), parts[2]
        if len(parts) == 2 and parts[0] == "biases":
            return int(parts[1]), "bias"
    return None


# --------------------------------------------------------------------------- one compressed projection


@dataclass
class CompressedLayer:
    """One compressed (layer, projection): its stored parts, metadata only."""

    layer: int
    proj: str
    file: str | None = None                      # layer_{i}/{proj}.pt, None: from in-memory names
    core: StoredTensor | None = None
    wrappers: dict[int, dict[str, StoredTensor]] = field(default_factory=dict)
    biases: dict[int, StoredTensor] = field(default_factory=dict)
    bias_matrix: StoredTensor | None = None      # ``biases`` stored as one [E, d_out] tensor
    copies: list[StoredTensor] = field(default_factory=list)      # per-expert core buffers
    duplicates: list[StoredTensor] = field(default_factory=list)  # parts stored twice
    other: list[StoredTensor] = field(default_factory=list)       # tensors the format does not know
    meta: dict[str, Any] = field(default_factory=dict)            # scalars of the layer file
    # rank and per-expert problems, asked for several times per inspect (10^4 experts in a
    # real checkpoint); emptied by add(), the one way parts are filed
    _memo: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_experts(self) -> int:
        return len(self.wrappers)

    @property
    def shape(self) -> tuple[int, ...] | None:
        """The expert weight shape ``(d_out, d_in)`` (the core's)."""
        return tuple(self.core.shape) if self.core is not None else None

    @property
    def rank(self) -> int | None:
        if "rank" not in self._memo:
            ranks = {t.shape[1] for w in self.wrappers.values() for t in w.values() if len(t.shape) == 2}
            self._memo["rank"] = ranks.pop() if len(ranks) == 1 else None
        return self._memo["rank"]

    @property
    def dtypes(self) -> set[str]:
        if "dtypes" not in self._memo:  # those of tensors(), without building its list
            found = {t.dtype for w in self.wrappers.values() for t in w.values()}
            found.update(t.dtype for t in self.biases.values())
            found.update(t.dtype for t in (self.core, self.bias_matrix) if t is not None)
            self._memo["dtypes"] = frozenset(d for d in found if d in FLOAT_DTYPES)
        return set(self._memo["dtypes"])

    def tensors(self) -> list[StoredTensor]:
        """Every part the view uses (core, wrappers, biases)."""
        out = [self.core] if self.core is not None else []
        for w in self.wrappers.values():
            out += w.values()
        out += self.biases.values()
        return out + ([self.bias_matrix] if self.bias_matrix is not None else [])

    def expert_parts(self, e: int) -> list[StoredTensor]:
        return list(self.wrappers.get(e, {}).values()) + ([self.biases[e]] if e in self.biases else [])

    def expert_problem(self, e: int) -> str | None:
        """Why expert ``e`` cannot be built from its parts, or None."""
        key = ("problem", e)
        if key not in self._memo:
            self._memo[key] = self._expert_problem(e)
        return self._memo[key]

    def _expert_problem(self, e: int) -> str | None:
        if self.core is None:
            return "no shared core"
        if len(self.core.shape) != 2:
            return f"core has shape {list(self.core.shape)}, not [d_out, d_in]"
        d_out, d_in = self.core.shape
        w = self.wrappers.get(e, {})
        # the usual case first, every part there with the right shape, without building lists
        u_in, v_in, u_out, v_out = w.get("U_in"), w.get("V_in"), w.get("U_out"), w.get("V_out")
        if u_in is not None and v_in is not None and u_out is not None and v_out is not None \
                and len(u_in.shape) == 2:
            want_in, want_out = (d_in, u_in.shape[1]), (d_out, u_in.shape[1])
            if (u_in.shape == want_in and v_in.shape == want_in and u_out.shape == want_out
                    and v_out.shape == want_out and (e not in self.biases or self.biases[e].shape == (d_out,))):
                return None
        absent = [p for p in WRAPPER_PARTS if p not in w]
        if absent:
            return f"expert {e} lacks {', '.join(absent)}"
        r = w["U_in"].shape[1] if len(w["U_in"].shape) == 2 else None
        want = {"U_in": (d_in, r), "V_in": (d_in, r), "U_out": (d_out, r), "V_out": (d_out, r)}
        bad = [f"{p} {list(w[p].shape)} (needs {list(want[p])})" for p in WRAPPER_PARTS
               if tuple(w[p].shape) != want[p]]
        if e in self.biases and tuple(self.biases[e].shape) != (d_out,):
            bad.append(f"bias {list(self.biases[e].shape)} (needs [{d_out}])")
        if bad:
            return f"expert {e}: {'; '.join(bad)} for a core of [{d_out}, {d_in}]"
        return None

    def add(self, t: StoredTensor, e: int | None, part: str) -> None:
        """File one stored part (a second copy of a part goes to ``duplicates``)."""
        if self._memo:
            self._memo.clear()
        if part in WRAPPER_PARTS:  # the common case first (four per expert, one core per file)
            w = self.wrappers.get(e)
            if w is None:
                w = self.wrappers[e] = {}
            if part in w:
                self.duplicates.append(t)
            else:
                w[part] = t
        elif part == "core" and e is not None:
            self.copies.append(t)
        elif part == "core":
            self._set(t, "core")
        elif part == "biases":
            self._set(t, "bias_matrix")
        elif part == "bias":
            self._put(self.biases, e, t)
        else:
            self.other.append(t)

    def _set(self, t: StoredTensor, attr: str) -> None:
        if getattr(self, attr) is None:
            setattr(self, attr, t)
        else:
            self.duplicates.append(t)

    def _put(self, d: dict, key, t: StoredTensor) -> None:
        if key in d:
            self.duplicates.append(t)
        else:
            d[key] = t


# --------------------------------------------------------------------------- the artifact


class CompressedMoEArtifact(Artifact):
    format = "compressed-moe"
    options = (Option("core", "str", None, "which core each expert is materialised from: " + " or ".join(
        CORE_CHOICES) + " (default: the copies when present)"),)
    survey: list["CheckpointState"] = []   # every save of the experiment folder (set by open)
    chosen_why: str = ""                   # why this save was opened, when the experiment was given
    reconciled: str = ""                   # set by check(deep=True) when both forms agree

    # -- files -------------------------------------------------------------------------
    @cached_property
    def layer_files(self) -> dict[tuple[int, str], str]:
        """(layer, projection) -> ``layer_{i}/{proj}.pt`` for every file present."""
        out = {}
        for d in sorted(p for p in self.folder.iterdir() if p.is_dir() and _LAYER_DIR.match(p.name)):
            for f in sorted(d.glob("*.pt")):
                out[(int(_LAYER_DIR.match(d.name).group(1)), f.stem)] = f"{d.name}/{f.name}"
        return dict(sorted(out.items()))

    @cached_property
    def extracted_files(self) -> dict[tuple[int, str], str]:
        folder = self.folder / EXTRACTED
        if not folder.is_dir():
            return {}
        out = {}
        for f in sorted(folder.glob("*.pt")):
            m = _EXTRACTED_FILE.match(f.name)
            if m:
                out[(int(m.group(1)), m.group(2))] = f"{EXTRACTED}/{f.name}"
        return dict(sorted(out.items()))

    @property
    def has_non_moe(self) -> bool:
        return (self.folder / NON_MOE).is_file()

    @property
    def has_trainer_weights(self) -> bool:
        """The HF Trainer's own ``model.safetensors`` (compressed in-memory names) is here."""
        return (self.folder / TRAINER_WEIGHTS).is_file()

    @cached_property
    def trainer_parts(self) -> tuple[dict[tuple[int, str, int | None, str], StoredTensor], dict[str, StoredTensor]]:
        """The Trainer's ``model.safetensors``: (compressed parts by (layer, projection,
        expert, part), every other tensor by name). Per-expert ``core`` entries are the
        copies the trained forward multiplied by."""
        parts, dense = {}, {}
        if not self.has_trainer_weights:
            return parts, dense
        for t in self.entries_of(TRAINER_WEIGHTS):
            parsed = parse_compressed_name(t.name)
            if parsed is None or parsed[1] is None:
                dense[t.name] = t
            else:
                parts[parsed] = t
        return parts, dense

    def core_copies(self) -> dict[tuple[int, str], dict[int, StoredTensor]]:
        """(layer, projection) -> expert -> its own core copy in the Trainer's save."""
        out: dict[tuple[int, str], dict[int, StoredTensor]] = {}
        for (layer, proj, e, part), t in self.trainer_parts[0].items():
            if part == "core" and e is not None:
                out.setdefault((layer, proj), {})[e] = t
        return out

    def default_core(self) -> str:
        """``"copies"`` when every compressed expert has its own core copy (the trained
        forward multiplied by those), else ``"shared"``."""
        copies = self.core_copies()
        layers = self.compressed_layers()
        if layers and all(set(g.wrappers) <= set(copies.get(k, {})) for k, g in layers.items()):
            return "copies"
        return "shared"

    @property
    def non_experts_from_base(self) -> bool:
        """True for a zero-shot save: the original supplies every non-expert tensor."""
        return not self.has_non_moe and self.layout in ZERO_SHOT_LAYOUTS

    @property
    def experiment_dir(self) -> Path:
        """The experiment's base directory ``models/<model>/<experiment>/`` (where the
        settings live): two levels above ``checkpoints/checkpoint-N/``, one above a final
        save written into ``checkpoints/`` itself or the latest version's ``tmp/``."""
        if self.folder.name in ("checkpoints", "tmp"):
            return self.folder.parent
        return self.folder.parent.parent

    # -- settings ----------------------------------------------------------------------
    def _find(self, candidates) -> Path | None:
        """The first candidate file present inside the artifact's trust root."""
        for name, where in candidates:
            p = (self.folder if where == "." else self.experiment_dir) / name
            if p.is_file():
                try:
                    self.path(os.path.relpath(p, self.folder))
                except ModelkitError:
                    continue
                return p
        return None

    def _read_settings(self, candidates) -> tuple[dict[str, Any], Path | None, str | None]:
        """(content, file, problem) of the first settings file found (JSON or safe YAML)."""
        import yaml

        p = self._find(candidates)
        if p is None:
            return {}, None, None
        try:  # confined, regular, size-capped (modelkit.io.files); then checked against its schema
            text = files.read_text(p, self.trust_root)
            if p.suffix != ".json":
                files.check_yaml_expansion(text, p)  # aliases: bounded expansion
            data = json.loads(text) if p.suffix == ".json" else read_settings_yaml(text)
            if isinstance(data, dict):
                data = schemas.validate(data, p)
        except ModelkitError as e:
            return {}, p, f"cannot use {p.name} ({e.problem})"
        except (ValueError, RecursionError, yaml.YAMLError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return {}, p, f"cannot parse {p.name} ({first})"
        if not isinstance(data, dict):
            return {}, p, f"{p.name} is not a mapping"
        return data, p, None

    @cached_property
    def _settings(self) -> tuple[dict[str, Any], Path | None, str | None]:
        return self._read_settings(SETTINGS_FILES)

    @property
    def settings(self) -> dict[str, Any]:
        """The compression settings (``model_name``, ``rank``, ``projections``, ...)."""
        return self._settings[0]

    @property
    def settings_file(self) -> Path | None:
        return self._settings[1]

    @cached_property
    def statistics(self) -> dict[str, Any]:
        """``compression_stats.yaml`` / ``compression_statistics.yaml`` ({} when absent)."""
        return self._read_settings(STATS_FILES)[0]

    @cached_property
    def _metadata(self) -> tuple[dict[str, Any], str | None]:
        if not (self.folder / METADATA).is_file():
            return {}, None
        try:
            return self.read_json(METADATA), None
        except ConfigError as e:
            return {}, e.problem

    @property
    def metadata(self) -> dict[str, Any]:
        """``compressed_metadata.json`` ({} when absent or unreadable)."""
        return self._metadata[0]

    @property
    def projections(self) -> list[str]:
        """Projections compressed in every listed layer: the settings' ``projections``, else
        every projection file found, else gate/up/down."""
        named = self.settings.get("projections")
        if isinstance(named, list) and named and all(isinstance(p, str) for p in named):
            return [p if p.endswith("_proj") else f"{p}_proj" for p in named]
        found = sorted({p for _, p in self.layer_files} | {p for _, p in self.groups if p})
        return found or list(DEFAULT_PROJECTIONS)

    @property
    def listed_layers(self) -> list[int]:
        """Layers ``compressed_metadata.json`` names as compressed."""
        idx = self.metadata.get("compressed_layer_indices")
        return sorted({int(i) for i in idx if isinstance(i, int)}) if isinstance(idx, list) else []

    @property
    def compressed_targets(self) -> dict[tuple[int, str], str]:
        """(layer, projection) that must come from compressed tensors -> why it is expected."""
        out = {}
        for layer in self.listed_layers:
            for proj in self.projections:
                out[(layer, proj)] = METADATA
        for layer, proj in list(self.layer_files) + [k for k in self.groups if k[1] is not None]:
            for p in self.projections:
                out.setdefault((layer, p), f"layer_{layer}/")
            out.setdefault((layer, proj), f"layer_{layer}/")
        return dict(sorted(out.items()))

    # -- stored tensors ----------------------------------------------------------------
    @cached_property
    def _stored(self) -> list[StoredTensor]:
        out: list[StoredTensor] = []
        if self.has_non_moe:
            out += self.entries_of(NON_MOE)
        if self.has_trainer_weights:
            out += self.entries_of(TRAINER_WEIGHTS)
        for (layer, proj), rel in self.layer_files.items():
            # the constructor, not dataclasses.replace: 10^5 wrapper tensors in a real checkpoint
            pre, suffix = _layer_prefix(layer, proj), _key_suffix
            out += [StoredTensor(pre + suffix(t.key), t.shape, t.dtype, t.file, t.key)
                    for t in self.entries_of(rel)]
        for (layer, proj), rel in self.extracted_files.items():
            for t in self.entries_of(rel):
                parts = t.key.split(".")
                if len(parts) == 2 and parts[0] == "expert_weights" and parts[1].isdigit():
                    name = f"{EXTRACTED}.model.layers.{layer}.mlp.experts.{parts[1]}.{proj}.weight"
                else:
                    name = f"{EXTRACTED}.layer_{layer}.{proj}.{t.key}"
                out.append(dataclasses.replace(t, name=name))
        return out

    def stored(self) -> list[StoredTensor]:
        return list(self._stored)

    @cached_property
    def groups(self) -> dict[tuple[int, str | None], CompressedLayer]:
        """Every compressed part found (layer files first, then in-memory names in
        ``non_moe_weights.pt``), grouped by (layer, projection)."""
        out: dict[tuple[int, str | None], CompressedLayer] = {}
        by_file = {rel: key for key, rel in self.layer_files.items()}
        extracted = EXTRACTED + "."
        last, known_keys, file_group = None, False, None   # the layer file of the tensors just seen
        for t in self._stored:
            file = t.file
            if file == TRAINER_WEIGHTS or t.name.startswith(extracted):
                continue  # the Trainer's second copy: see trainer_parts
            from_file = file != NON_MOE
            if from_file:
                if file != last:
                    last, file_group = file, None
                    layer0, proj0 = by_file[file]
                    known_keys = "." not in proj0
                # the keys torch.save writes, straight to the file's group (_layer_file_part's fast case)
                known = _file_key_part(t.key) if known_keys else None
                if known is not None:
                    if file_group is None:
                        file_group = self._group(out, layer0, proj0, file)
                    file_group.add(t, known[0], known[1])
                    continue
                layer, proj = layer0, proj0
                parsed = _layer_file_part(layer, proj, t.key)
            else:
                parsed = parse_compressed_name(t.name)
            if parsed is None:
                if from_file:  # an unknown key of a layer file
                    self._group(out, layer, proj, file).other.append(t)
                continue
            layer, proj, e, part = parsed
            self._group(out, layer, proj, file if from_file else None).add(t, e, part)
        for key, g in out.items():
            if g.file is not None:
                g.meta = self._scalars(g.file)
        return out

    @staticmethod
    def _group(out, layer, proj, file) -> CompressedLayer:
        g = out.get((layer, proj))
        if g is None:  # not setdefault: that would build a CompressedLayer per tensor
            g = out[(layer, proj)] = CompressedLayer(layer, proj)
        if file is not None and g.file is None:
            g.file = file
        return g

    def _scalars(self, rel: str) -> dict[str, Any]:
        try:
            f = self.file(rel)
            return f.scalars() if isinstance(f, PickleFile) else {}
        except ModelkitError:
            return {}

    def compressed_layers(self) -> dict[tuple[int, str], CompressedLayer]:
        """(layer, projection) -> its parts, for every compressed projection that has a core."""
        return {k: g for k, g in self.groups.items() if k[1] is not None and g.core is not None}

    def missing_projections(self) -> dict[tuple[int, str], str]:
        """(layer, projection) expected as compressed but not stored -> who expects it."""
        have = self.compressed_layers()
        return {k: why for k, why in self.compressed_targets.items() if k not in have}

    # -- base and config ---------------------------------------------------------------
    def original_name(self) -> str | None:
        """The original model as the settings name it (``model_name``), located relative to
        the settings file when it is not a folder relative to the working directory."""
        name = self.settings.get("model_name")
        if not isinstance(name, str) or not name.strip():
            return None
        return self._locate(name.strip())

    def base_name(self) -> str | None:
        """The original model, only when the view needs it (checkpoint-0, never-compressed
        projections, no config.json): a complete checkpoint-N stands alone."""
        if (self.folder / "config.json").is_file() and self.base_needs() == "config":
            return None
        return self.original_name()

    def _locate(self, name: str) -> str:
        """``name``, or the folder it names relative to the settings file (or one of its
        parents) when it is not a folder relative to the working directory."""
        p = Path(name).expanduser()
        if p.is_absolute() or (p / "config.json").is_file() or self.settings_file is None:
            return name
        here = self.settings_file.parent
        for d in [here, *list(here.parents)[:4]]:
            if (d / p / "config.json").is_file():
                return str((d / p).resolve())
        return name

    def base_needs(self) -> str:
        if self.non_experts_from_base or self._uncompressed_slots():
            return "weights"
        return "config"

    def config(self):
        """The original MoE config: the checkpoint's ``config.json``, else the original's."""
        from modelkit.architecture.bridge import load_config

        return load_config(self.architecture())

    def architecture(self):
        """config()'s config.json (a cached audit of it imports no transformers)."""
        if (self.folder / "config.json").is_file():
            return self.path("config.json")
        if self.base is not None and self.base.path is not None:
            return self.base.path / "config.json"
        name = self.base.name if self.base is not None else self.original_name()
        why = self.base.how if self.base is not None else "not looked up"
        raise BaseModelUnavailableError(
            f"this {self.layout} checkpoint has no config.json; the original model "
            f"{name!r} supplies it and was not found ({why}). Pass --base FOLDER", self.folder)

    def config_sources(self) -> list[Path]:
        return [p for p in [self.folder / "config.json", self.settings_file]
                if p is not None and p.exists() and p.suffix == ".json"]

    def _slots(self, config=None) -> dict[tuple[int, str, int, str], str]:
        """(layer, projection, expert, weight|bias) -> on-disk name in the original model."""
        from modelkit.architecture.bridge import expected_tensors

        names = tuple(expected_tensors(config if config is not None else self.config_facts()))
        # inspect asks three times (view, check, uncompressed slots) for the same 10^4 names
        memo = self.__dict__.get("_slots_memo")
        if memo is not None and memo[0] == names:
            return dict(memo[1])
        out = {}
        for name in names:
            m = _EXPERT_SLOT.match(name)
            if m:
                out[(int(m["layer"]), m["proj"], int(m["e"]), m["kind"])] = name
        self.__dict__["_slots_memo"] = (names, out)
        return dict(out)

    def _uncompressed_slots(self, slots=None) -> list[str]:
        """On-disk expert names of (layer, projection)s that were never compressed."""
        if slots is None:
            try:
                slots = self._slots()
            except BaseModelUnavailableError:
                return []
        targets = self.compressed_targets
        return [n for (layer, proj, _, _), n in slots.items() if (layer, proj) not in targets]

    # -- the view ----------------------------------------------------------------------
    def view(self, base: Artifact | None = None, **options) -> TensorView:
        """``core``: which core each expert is materialised from, ``"copies"`` (each
        expert's own copy in the Trainer's ``model.safetensors``: what the trained forward
        used) or ``"shared"`` (the saved shared core); default: the copies when present."""
        self.check_options(options)
        core = options.pop("core", None)
        default = self.default_core()
        if core is None:
            core = default
        if core not in CORE_CHOICES:
            raise ConfigError(f"core={core!r}: expected one of {sorted(CORE_CHOICES)}", self.folder)
        if core == "copies" and default != "copies":
            raise ConfigError("core='copies': this save has no per-expert core copies (no Trainer "
                              f"{TRAINER_WEIGHTS} with them); use core='shared'", self.folder)
        copies = self.core_copies() if core == "copies" else {}
        from modelkit.architecture.bridge import expected_tensors

        config = self.config_facts()
        expected = expected_tensors(config)
        slots = self._slots(config)
        targets = self.compressed_targets
        uncompressed = self._uncompressed_slots(slots)
        tensors: dict[str, LazyTensor] = {}
        unplaced: list[StoredTensor] = []
        notes: list[str] = []

        base_view = None
        if self.non_experts_from_base or uncompressed:
            base_view = self._base_view(base, uncompressed)
        if self.has_non_moe:
            f = self.file(NON_MOE)
            rotary = []
            for t in self.entries_of(NON_MOE):
                if parse_compressed_name(t.name) is not None:
                    continue  # compressed parts under in-memory names: see groups
                if _ROTARY.search(t.name):
                    rotary.append(t.name)
                    continue
                tensors[t.name] = stored_tensor(f, t)
            if rotary:
                notes.append(f"{NON_MOE} also holds the rotary buffer(s) {', '.join(rotary)}, which the model "
                             "recomputes; left out")
        elif self.non_experts_from_base:
            compressed_slot_names = {n for (layer, proj, _, _), n in slots.items() if (layer, proj) in targets}
            tensors.update({n: lt for n, lt in base_view.items() if n not in compressed_slot_names})
            notes.append("zero-shot checkpoint: every non-expert tensor (router included) is the original model's")
        if base_view is not None:
            tensors.update({n: base_view[n] for n in uncompressed if n in base_view})
            if uncompressed:
                notes.append(f"{len(uncompressed)} expert tensor(s) of never-compressed layers come from "
                             "the original model")

        dtype = self._model_dtype(tensors, config)
        for (layer, proj), g in self.compressed_layers().items():
            for e in sorted(g.wrappers):
                name = slots.get((layer, proj, e, "weight"))
                if name is None or g.expert_problem(e):
                    unplaced += g.expert_parts(e)
                    continue
                core_t = copies[(layer, proj)][e] if copies else g.core
                produce_as = self._expert_producer(g, e, core_t)
                tensors[name] = LazyTensor(tuple(g.core.shape), dtype,
                                           f"compressed:{g.file or NON_MOE}[expert {e}"
                                           + (", own core copy]" if copies else "]"),
                                           # the dtype resolved when producing: a view costs no torch import
                                           functools.partial(_produce_in, produce_as, dtype),
                                           compute=produce_as)
                if e in g.biases or g.bias_matrix is not None:
                    bias_name = slots.get((layer, proj, e, "bias"))
                    if bias_name is None:
                        continue  # reported below, once per stored bias tensor
                    tensors[bias_name] = LazyTensor((g.core.shape[0],), dtype,
                                                    f"compressed:{g.file or NON_MOE}[bias {e}]",
                                                    self._bias_producer(g, e, dtype))
            if not any((layer, proj, e, "bias") in slots for e in g.wrappers):
                unplaced += list(g.biases.values()) + ([g.bias_matrix] if g.bias_matrix is not None else [])
            unplaced += g.other
        redundant = 0
        compressed = self.compressed_layers()
        for key, g in self.groups.items():
            redundant += len(g.copies) + len(g.duplicates)
            if key not in compressed:
                unplaced += g.tensors() + g.other
        chosen = "default: " + ("the trained forward used the copies" if core == default == "copies"
                                else "no per-expert copies stored" if default == "shared" else "copies available")
        notes.append(f"experts materialised with core={core!r} ({chosen}): {CORE_CHOICES[core]}")
        if self.has_trainer_weights:
            notes.append(f"the Trainer's {TRAINER_WEIGHTS} (a second copy under in-memory names) is read only "
                         "for the per-expert core copies" if copies else
                         f"the Trainer's {TRAINER_WEIGHTS} (a second copy under in-memory names) is not used")
        if redundant:
            notes.append(f"{redundant} redundant copies of compressed tensors (per-expert core buffers, "
                         "parts stored twice) are ignored: the view uses each shared core once")
        if self.extracted_files:
            notes.append(f"{len(self.extracted_files)} {EXTRACTED}/ file(s) hold the original experts the "
                         "compression was fit to; they are not part of the compressed model")
        order = {n: i for i, n in enumerate(expected)}
        ordered = dict(sorted(tensors.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))
        return TensorView(ordered, unplaced, notes)

    def _base_view(self, base: Artifact | None, needed: list[str]) -> TensorView:
        if base is None:
            from modelkit.formats.open import open_base

            base = open_base(self)
        if base is None:
            name = self.base.name if self.base is not None else self.original_name()
            why = self.base.how if self.base is not None else "not looked up"
            what = ("every non-expert tensor" if self.non_experts_from_base
                    else f"the experts of {len(needed)} never-compressed projection tensor(s)")
            raise BaseModelUnavailableError(
                f"{what} come(s) from the original model {name!r}, which was not found ({why}). "
                "Pass --base FOLDER", self.folder)
        return base.view()

    def _model_dtype(self, tensors: dict[str, LazyTensor], config) -> str:
        """The dtype experts are cast to: the most common floating dtype of the non-expert
        tensors, else the config's, else float32."""
        counts = Counter(t.dtype for t in tensors.values() if t.dtype in FLOAT_DTYPES)
        if counts:
            return counts.most_common(1)[0][0]
        from modelkit.io.tensors import dtype_name

        declared = getattr(config, "dtype", None)
        return dtype_name(declared) if declared is not None else "float32"

    def _read(self, t: StoredTensor):
        return self.file(t.file).read(t.key)

    def _expert_producer(self, g: CompressedLayer, e: int, core: StoredTensor) -> Callable[[Any], Any]:
        """``produce(dtype)``: expert ``e`` materialised from ``core`` and its wrappers,
        computed in float32 (float64 when asked for) and returned in ``dtype``."""
        w = g.wrappers[e]

        def produce(dtype):
            from modelkit.formats.compressed_moe.lowrank import batching

            if core is not g.core:  # the expert's own core copy: no product to share, read once
                return materialize(self.file(core.file).read_unmapped(core.key),
                                   *(self._read(w[p]) for p in WRAPPER_PARTS), dtype=dtype)
            if batching():  # an export walking every expert: batches of them
                return self._batches(g).get(e, dtype)
            return materialize(self._read(core), *(self._read(w[p]) for p in WRAPPER_PARTS), dtype=dtype)
        return produce

    @contextlib.contextmanager
    def bulk_production(self):
        """Experts computed in batches while a consumer walks every expert in order (export),
        several at once (:func:`modelkit.io.shards.parallel_production`)."""
        from modelkit.formats.compressed_moe.lowrank import batched_experts
        from modelkit.io.shards import parallel_production

        with batched_experts(), parallel_production():
            yield

    def _batches(self, g: CompressedLayer):
        """The group's :class:`~modelkit.formats.compressed_moe.lowrank.ExpertBatches`: experts
        from the shared core, whose two products with the wrappers are shared by a batch.
        (Experts with their own core copy share no product: they are formed one by one.)"""
        from modelkit.formats.compressed_moe.lowrank import ExpertBatches

        cache = self.__dict__.setdefault("_expert_batches", {})
        key = (g.layer, g.proj)
        if key not in cache:
            def load(experts):
                import torch

                return (self._read(g.core),
                        *(torch.stack([self._read(g.wrappers[e][p]) for e in experts]) for p in WRAPPER_PARTS))
            cache[key] = ExpertBatches([e for e in sorted(g.wrappers) if not g.expert_problem(e)], load)
        return cache[key]

    def _bias_producer(self, g: CompressedLayer, e: int, dtype: str) -> Callable[[], Any]:
        def produce():
            b = self._read(g.biases[e]) if e in g.biases else self._read(g.bias_matrix)[e]
            return b.to(torch_dtype(dtype))
        return produce

    def reference_model(self, **options) -> tuple[Any, str] | None:
        """The stored low-rank form materialised in float64 by
        :mod:`modelkit.formats.compressed_moe.reference` (``core`` as in the view)."""
        from modelkit.formats.compressed_moe.reference import reference_model

        if not self.layer_files:
            return None  # compressed parts only under in-memory names: no second path
        return reference_model(self, self.base.path if self.base is not None else None, core=options.get("core"))

    # -- checks ------------------------------------------------------------------------
    def check(self, base: Artifact | None, deep: bool = False) -> list[Finding]:
        findings = self._settings_findings()
        try:
            config = self.config_facts()
            slots = self._slots(config)
        except BaseModelUnavailableError:
            config, slots = None, None
        findings += self._base_findings()
        findings += self._survey_findings()
        findings += self._missing_findings(slots, config)
        findings += self._duplicate_findings(deep)
        findings += self._trainer_findings(deep)
        findings += self._dtype_findings(base, config)
        findings += self._shape_findings(slots, config)
        return findings

    def _base_findings(self) -> list[Finding]:
        """A zero-shot save is only experts: without the original nothing can be built."""
        if not self.non_experts_from_base:
            return []
        if self.base is None:
            where = self.settings_file.name if self.settings_file else "no compression_config.yaml was found"
            return [error("base-unavailable",
                          f"this zero-shot save holds only the compressed experts; every other tensor comes from "
                          f"the original model, which is named nowhere ({where} gives no model_name). "
                          "Pass --base FOLDER")]
        if not self.base.available:
            return [error("base-unavailable",
                          f"this zero-shot save holds only the compressed experts; every other tensor (router "
                          f"included) comes from the original model {self.base.name!r}, which cannot be found "
                          f"({self.base.how}): it cannot be loaded or exported"
                          + ("" if "--base" in self.base.how else ". Pass --base FOLDER"))]
        return []

    def _survey_findings(self) -> list[Finding]:
        """What is wrong with the other saves of the experiment folder."""
        out = []
        for st in self.survey:
            if st.problem:
                opened = checkpoint_step(self.folder)
                newer = st.step is not None and opened is not None and st.step > opened
                out.append(warning("incomplete-checkpoint",
                                   f"{st.label} {st.problem}; not usable"
                                   + (f": {self.folder.name}/ (older) was opened instead" if newer else
                                      f"; {self._label()} was opened"), file=str(st.path)))
        return out

    def _label(self) -> str:
        return "checkpoints/ (final save)" if self.folder.name == "checkpoints" else f"{self.folder.name}/"

    def _trainer_findings(self, deep: bool) -> list[Finding]:
        """The Trainer's ``model.safetensors`` held against the compressed save: the per-expert
        core copies (what the trained forward used) against the shared core, and the
        second copy of every other tensor against ``non_moe_weights.pt`` / the layer files."""
        if not self.has_trainer_weights:
            return []
        copies = self.core_copies()
        if not deep:
            what = (f"its {sum(len(c) for c in copies.values())} per-expert core copies (what the trained "
                    "forward multiplied by; the view uses them, core='copies')" if copies else "it")
            return [info("not-checked",
                         f"the Trainer's {TRAINER_WEIGHTS} is a second complete copy of the model; {what} were "
                         "not compared with the saved shared cores and non_moe_weights.pt (run with --deep)",
                         file=str(self.folder / TRAINER_WEIGHTS))]
        out = []
        worst = self._measure_copies(copies)
        if worst is not None:
            dw, rel, core_diff, n_diff, n = worst
            if n_diff:
                logit = self._logit_difference()
                out.append(warning(
                    "trained-form-differs",
                    f"the saved compressed form (shared core + wrappers) is not the model that was trained: the "
                    f"trained forward multiplied by each expert's own core copy ({TRAINER_WEIGHTS}), and {n_diff} "
                    f"of {n} copies differ from their shared core (by up to {core_diff:.3g}); the experts differ "
                    f"by up to {dw:.3g} (max |dW|, {rel:.3g} of max |W|), {logit}. Load, export and diff use "
                    "the copies by default (core='copies'); core='shared' gives the saved shared core",
                    [t.name for c in copies.values() for t in c.values()], file=str(self.folder / TRAINER_WEIGHTS)))
            else:
                self.reconciled = (f"every per-expert core copy in {TRAINER_WEIGHTS} equals its shared core "
                                   "(checked): the saved compressed form is the trained model")
        disagree = self._second_copy_differences()
        if disagree:
            out.append(warning("trained-form-differs",
                               f"the Trainer's {TRAINER_WEIGHTS} and the compressed save disagree on "
                               f"{len(disagree)} tensor(s) (max |diff| {max(d for _, d in disagree):.3g}); "
                               "the compressed save's are used", [n for n, _ in disagree]))
        return out

    def _logit_difference(self) -> str:
        """How far the two forms' logits are apart on verify's fixed prompts (both float64
        references), or why that was not measured."""
        import torch

        from modelkit.architecture.bridge import expected_tensors
        from modelkit.formats.compressed_moe.reference import reference_model
        from modelkit.architecture.prompts import prompt_ids

        params = sum(t.numel for t in expected_tensors(self.config_facts()).values())
        if params > LOGIT_CHECK_MAX_PARAMS:
            return (f"logits not checked ({params / 1e9:.1f}B parameters: two float64 forwards would need "
                    f"{2 * 8 * params / 2**30:.0f} GiB; compare exports made with core='copies' and 'shared')")
        base = self.base.path if self.base is not None else None
        try:
            trained, _ = reference_model(self, base, core="copies")
            shared, _ = reference_model(self, base, core="shared")
        except ModelkitError as e:
            return f"logits not checked ({e.problem})"
        ids = prompt_ids(None, trained.config.get_text_config().vocab_size)
        with torch.no_grad():
            diff = max((trained(input_ids=x).logits - shared(input_ids=x).logits).abs().max().item() for x in ids)
        return f"the logits by up to {diff:.3g} (float64, {len(ids)} fixed prompts)"

    def _measure_copies(self, copies):
        """(max |dW| between the two forms, relative to max |W|, max |copy - core|, copies that
        differ, copies) over every expert with a copy, computed in float64; None without copies."""
        import torch

        if not copies:
            return None
        dw = wmax = core_diff = 0.0
        n = n_diff = 0
        for key, g in self.compressed_layers().items():
            shared = self._read(g.core).double()
            for e, t in sorted(copies.get(key, {}).items()):
                if e not in g.wrappers or g.expert_problem(e):
                    continue
                copy = self._read(t).double()
                n += 1
                if copy.shape != shared.shape:
                    n_diff += 1
                    continue
                diff = (copy - shared).abs().max().item()
                if diff == 0:
                    continue
                n_diff += 1
                core_diff = max(core_diff, diff)
                w = [self._read(g.wrappers[e][p]) for p in WRAPPER_PARTS]
                a = materialize(copy, *w, dtype=torch.float64)
                b = materialize(shared, *w, dtype=torch.float64)
                dw = max(dw, (a - b).abs().max().item())
                wmax = max(wmax, a.abs().max().item())
        return dw, dw / wmax if wmax else 0.0, core_diff, n_diff, n

    def _second_copy_differences(self) -> list[tuple[str, float]]:
        """(name, max |diff|) of Trainer tensors that differ from the compressed save's."""
        import torch

        parts, dense = self.trainer_parts
        pairs: list[tuple[str, StoredTensor, StoredTensor]] = []
        if self.has_non_moe:
            mine = {t.name: t for t in self.entries_of(NON_MOE)}
            pairs += [(n, t, mine[n]) for n, t in dense.items() if n in mine]
        for (layer, proj, e, part), t in parts.items():
            g = self.groups.get((layer, proj))
            if g is None or (part == "core" and e is not None):
                continue
            ours = (g.core if part == "core" else g.wrappers.get(e, {}).get(part) if part in WRAPPER_PARTS
                    else g.biases.get(e) if part == "bias" else None)
            if ours is not None:
                pairs.append((t.name, t, ours))
        out = []
        for name, a, b in pairs:
            x, y = self._read(a), self._read(b)
            if x.shape != y.shape:
                out.append((name, float("inf")))
            elif not torch.equal(x.double(), y.double()):
                out.append((name, (x.double() - y.double()).abs().max().item()))
        return out

    def _settings_findings(self) -> list[Finding]:
        out = []
        for problem, file in ((self._settings[2], self._settings[1]), (self._metadata[1], self.folder / METADATA)):
            if problem:
                out.append(warning("inconsistent-config", f"{problem}; its settings are ignored", file=str(file)))
        return out

    def _missing_findings(self, slots, config) -> list[Finding]:
        out = []
        if not self.has_non_moe and self.layout not in ZERO_SHOT_LAYOUTS:
            names = []
            if config is not None:
                from modelkit.architecture.bridge import expected_tensors

                names = [n for n in expected_tensors(config) if n not in set(slots.values())]
            out.append(error(
                "missing-tensors",
                f"no {NON_MOE}: this save holds only the compressed experts. A model built from it has "
                "randomly initialised attention, norms and embeddings, and the distilled router is lost "
                "(the view does not substitute the original model's)", names, file=str(self.folder / NON_MOE)))
        for (layer, proj), why in self.missing_projections().items():
            names = sorted((n for (l_, p, _, _), n in (slots or {}).items() if (l_, p) == (layer, proj)),
                           key=_natural)
            if slots is not None and not names:
                continue  # the model has no such experts: the stored ones are reported as misplaced
            listed = (f"{METADATA} lists it" if why == METADATA
                      else f"the other projections of layer_{layer}/ are stored")
            rel = f"layer_{layer}/{proj}.pt"
            absent = "holds no shared core" if (layer, proj) in self.layer_files else "is missing"
            out.append(error(
                "missing-tensors",
                f"layer {layer} {proj} is compressed ({listed}) but {rel} {absent}: a loader "
                "that skips missing files (load_state_dict(strict=False)) keeps randomly initialised experts "
                "there and looks fine; the view leaves them missing", names,
                file=str(self.folder / f"layer_{layer}" / f"{proj}.pt")))
        return out

    def _duplicate_findings(self, deep: bool) -> list[Finding]:
        copies = [(g, t) for g in self.groups.values() for t in g.copies]
        dups = [t for g in self.groups.values() for t in g.duplicates]
        out = []
        if copies:
            wasted = sum(t.nbytes for _, t in copies)
            files = sorted({t.file for _, t in copies})
            msg = (f"{len(copies)} per-expert copies of the shared cores are stored ({', '.join(files)}), "
                   f"{human_bytes(wasted)} wasted: each expert's `core` buffer, left in the state dict after a "
                   "device move. The view uses the shared core and ignores them")
            if deep:
                differ = self._differing_copies(copies)
                msg += (f"; {len(differ)} of them differ from their shared core, so which core the trained "
                        "model used is ambiguous" if differ else "; every copy equals its shared core")
            out.append(warning("duplicated-buffers", msg, [t.name for _, t in copies]))
        if dups:
            wasted = human_bytes(sum(t.nbytes for t in dups))
            out.append(warning("duplicated-buffers",
                               f"{len(dups)} compressed tensor(s) are stored twice (a layer file and in-memory "
                               f"names in {NON_MOE}); the layer file's are used, {wasted} wasted",
                               [t.name for t in dups]))
        return out

    def _differing_copies(self, copies) -> list[str]:
        import torch

        out = []
        for g, t in copies:
            if g.core is None:
                continue
            a, b = self._read(t), self._read(g.core)
            if a.shape != b.shape or not torch.equal(a, b.to(a.dtype)):
                out.append(t.name)
        return out

    def _dtype_findings(self, base: Artifact | None, config) -> list[Finding]:
        from modelkit.formats.plain_hf import mixed_dtype_findings

        out = []
        groups = list(self.compressed_layers().values())
        if self.has_non_moe:
            # the rotary buffers are float32 beside a bf16 model by design (and recomputed)
            rest = [t for t in self.entries_of(NON_MOE)
                    if parse_compressed_name(t.name) is None and not _ROTARY.search(t.name)]
            where = NON_MOE
            out += mixed_dtype_findings(rest, NON_MOE)
        elif base is not None:
            names = set(self._slots(config).values()) if config is not None else set()
            rest = [t for t in base.stored() if t.name not in names]
            where = "the original model's non-expert tensors"
        else:
            rest, where = [], ""
        counts = Counter(t.dtype for t in rest if t.dtype in FLOAT_DTYPES)
        if not counts or not any(g.tensors() for g in groups):
            return out
        main = counts.most_common(1)[0][0]
        # only the groups holding another float dtype are scanned (their dtypes are known)
        odd = [t for g in groups if not g.dtypes <= {main}
               for t in g.tensors() if t.dtype in FLOAT_DTYPES and t.dtype != main]
        if odd:
            kinds = sorted({t.dtype for t in odd})
            out.append(warning(
                "dtype-mismatch",
                f"{len(odd)} compressed tensor(s) are {'/'.join(kinds)} while {where} are {main}: a loader that "
                f"keeps the compressed modules runs the experts in {'/'.join(kinds)} beside {main} (and holds "
                f"them at that size); the view computes each expert in float32 and casts it to {main}",
                [t.name for t in odd]))
        return out

    def _shape_findings(self, slots, config) -> list[Finding]:
        out: list[Finding] = []
        warn, err = [], []   # (message, tensors)
        meta = self.metadata
        listed = self.listed_layers
        if meta:
            n = meta.get("num_compressed_layers")
            if isinstance(n, int) and n != len(listed):
                warn.append((f"{METADATA}: num_compressed_layers is {n} but compressed_layer_indices "
                             f"lists {len(listed)}", []))
            total = meta.get("total_layers")
            layers = getattr(config, "num_hidden_layers", None) if config is not None else None
            if isinstance(total, int) and layers is not None and total != layers:
                warn.append((f"{METADATA}: total_layers is {total} but config.json has {layers} layers", []))
            unlisted = sorted({layer for layer, _ in self.layer_files} - set(listed))
            if unlisted:
                warn.append((f"layer folder(s) {', '.join(f'layer_{i}/' for i in unlisted)} are not listed in "
                             f"{METADATA}: a loader that follows the metadata keeps the original experts there, one "
                             "that globs layer_*/ loads them (the view does)", []))
        rank = self.settings.get("rank")
        num_experts = _num_experts(config) if config is not None else None
        for (layer, proj), g in self.compressed_layers().items():
            where = g.file or f"{NON_MOE} (in-memory names)"
            m = g.meta
            if "layer_idx" in m and m["layer_idx"] != layer:
                warn.append((f"{where}: layer_idx is {m['layer_idx']}, the folder says {layer}", []))
            if "projection" in m and m["projection"] != proj:
                warn.append((f"{where}: projection is {m['projection']!r}, the file name says {proj!r}", []))
            facts = {"num_experts": g.num_experts, "d_out": g.shape[0] if g.shape else None,
                     "d_in": g.shape[1] if g.shape and len(g.shape) > 1 else None, "rank": g.rank}
            for key, actual in facts.items():
                claimed = m.get(f"metadata.{key}")
                if claimed is not None and actual is not None and claimed != actual:
                    warn.append((f"{where}: metadata says {key} = {claimed}, the tensors have {actual}", []))
            sidecar = self._sidecar(layer, proj)
            for key, actual in facts.items():
                claimed = sidecar.get(key)
                if claimed is not None and actual is not None and claimed != actual:
                    warn.append((f"layer_{layer}/{proj}_metadata.json says {key} = {claimed}, "
                                 f"the tensors have {actual}", []))
            if isinstance(rank, int) and g.rank is not None and g.rank != rank:
                warn.append((f"{where}: wrappers have rank {g.rank}, the compression settings say {rank}", []))
            if num_experts is not None and g.num_experts != num_experts:
                err.append((f"{where}: {g.num_experts} expert wrappers, the model has {num_experts} experts",
                            [t.name for e in g.wrappers if e >= num_experts for t in g.expert_parts(e)]))
            for e in sorted(g.wrappers):
                problem = g.expert_problem(e)
                if problem:
                    err.append((f"{where}: {problem}; the expert cannot be built", [t.name for t in g.expert_parts(e)]))
            if slots is not None and not any((layer, proj, e, "weight") in slots for e in g.wrappers):
                err.append((f"{where}: the model has no experts' {proj} in layer {layer} (not an MoE layer, or "
                            "another projection name); these tensors have no place", [t.name for t in g.tensors()]))
            extracted = self.extracted_files.get((layer, proj))
            if extracted is not None and g.shape is not None:
                shapes = {tuple(t.shape) for t in self.entries_of(extracted) if t.key.startswith("expert_weights.")}
                if shapes and shapes != {g.shape}:
                    warn.append((f"{extracted}: original experts of shape {sorted(map(list, shapes))}, "
                                 f"the core is {list(g.shape)}", []))
        if warn:
            out.append(warning("inconsistent-config", "; ".join(m for m, _ in warn),
                               [t for _, ts in warn for t in ts]))
        for msg, tensors in err:
            out.append(error("inconsistent-config", msg, tensors))
        return out

    def _sidecar(self, layer: int, proj: str) -> dict[str, Any]:
        """``layer_{i}/{proj}_metadata.json`` of a zero-shot checkpoint ({} when absent)."""
        rel = f"layer_{layer}/{proj}_metadata.json"
        if not (self.folder / rel).is_file():
            return {}
        try:
            return self.read_json(rel)
        except ConfigError:
            return {}

    # -- summary -----------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        name = self.settings.get("model_name")
        if name is not None:
            where = self.settings_file.name if self.settings_file else "settings"
            located = self.original_name()
            out["original"] = f"{name} (from {where})" + (f", found at {located}" if located != name else "")
        layers = self.compressed_layers()
        if layers:
            g = next(iter(layers.values()))
            dtypes = sorted(set().union(*(x.dtypes for x in layers.values())))
            total = self.metadata.get("total_layers")
            out["experts"] = (f"{len({k[0] for k in layers})}" + (f" of {total}" if total else "")
                              + f" layers compressed ({', '.join(_proj_sorted({k[1] for k in layers}))}), "
                              f"{g.num_experts} experts, rank {g.rank}, {'/'.join(dtypes)}")
        if self.has_non_moe:
            out["router"] = f"trained, from {NON_MOE}"
        elif self.non_experts_from_base:
            out["router"] = "the original model's (zero-shot compression)"
        else:
            out["router"] = f"MISSING (no {NON_MOE})"
        if layers:
            core = self.default_core()
            out["core"] = (f"{core} by default: {CORE_CHOICES[core]}"
                           + (f"; {self.reconciled}" if self.reconciled else ""))
        if self.has_trainer_weights:
            present = [f for f in TRAINER_FILES if (self.folder / f).is_file()]
            out["trainer"] = (f"{TRAINER_WEIGHTS} (the Trainer's second copy, in-memory names, one core copy per "
                              f"expert)" + (f"; {', '.join(present)} listed, never read" if present else ""))
        if self.survey:
            out["saves"] = "; ".join(
                st.label + (" OPENED" + (f" ({self.chosen_why})" if self.chosen_why else "")
                            if st.path == self.folder else f": {st.problem}" if st.problem else "")
                for st in self.survey)
        stats = {k: v for k, v in self.statistics.items() if isinstance(v, (int, float)) and "fraction" in k}
        if stats:
            out["stats"] = ", ".join(f"{k} {v}" for k, v in stats.items())
        if checkpoint_step(self.folder) is not None:
            out["step"] = checkpoint_step(self.folder)
        return out


def _produce_in(produce_as: Callable[[Any], Any], dtype: str):
    return produce_as(torch_dtype(dtype))


def _num_experts(config) -> int | None:
    for attr in ("num_experts", "num_local_experts", "n_routed_experts"):
        v = getattr(config, attr, None)
        if isinstance(v, int):
            return v
    return None


def _proj_sorted(projs) -> list[str]:
    known = {p: i for i, p in enumerate(DEFAULT_PROJECTIONS)}
    return sorted(projs, key=lambda p: (known.get(p, len(known)), p))


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in name.split(".")]


# --------------------------------------------------------------------------- detection


def layout_of(folder: Path) -> str | None:
    """The compressed layout of a checkpoint folder, or None (no tensor is read)."""
    if not folder.is_dir():
        return None
    marked = (folder / METADATA).is_file() or (folder / NON_MOE).is_file()
    if not marked:
        for d in folder.iterdir():
            if _LAYER_DIR.match(d.name) and d.is_dir() and any(f.name.endswith("_proj.pt") for f in d.iterdir()):
                marked = True
                break
    if not marked and (folder / EXTRACTED).is_dir():
        marked = any(_EXTRACTED_FILE.match(f.name) for f in (folder / EXTRACTED).iterdir())
    if not marked:
        return None
    if (folder / "compression_config.json").is_file():
        return "documented"
    if (folder / "config.json").is_file():
        return "checkpoint-N"
    if folder.name == "tmp":
        return "tmp"
    if (folder / "compression_config.yaml").is_file():
        return "early-compressed"
    return "checkpoint-0"


@dataclass(frozen=True)
class CheckpointState:
    """One save found in an experiment folder, and whether it can be opened."""

    path: Path
    step: int | None          # None: the final save in checkpoints/ itself, or tmp/
    layout: str | None        # None: not a usable compressed save
    problem: str = ""         # why it cannot be used

    @property
    def label(self) -> str:
        if self.path.name == "checkpoints":
            return "checkpoints/ (final save)"
        return f"{self.path.name}/"


def _problem_of(folder: Path) -> str:
    """Why a ``checkpoint-N/`` folder holds no usable compressed save."""
    try:
        names = sorted(p.name for p in folder.iterdir())
    except OSError as e:
        return f"cannot be listed ({e.strerror})"
    if not names:
        return "is empty (the latest version's zero-shot run crashes before writing it; see tmp/)"
    if set(names) <= {"config.json", "generation_config.json"}:
        return f"holds only {' and '.join(names)}: a Trainer save that crashed"
    return f"holds no compressed layers ({', '.join(names[:5])}{' ...' if len(names) > 5 else ''})"


def survey_experiment(base: Path) -> list[CheckpointState]:
    """Every save of an experiment folder: ``checkpoints/checkpoint-N/`` (oldest first), a
    final save written into ``checkpoints/`` itself, and the latest version's ``tmp/``."""
    out = []
    folder = base / "checkpoints"
    if folder.is_dir():
        for p in checkpoint_folders(folder):
            layout = layout_of(p)
            out.append(CheckpointState(p, checkpoint_step(p), layout,
                                       "" if layout else _problem_of(p)))
        layout = layout_of(folder)
        if layout is not None:
            out.append(CheckpointState(folder, None, layout))
    if (base / "tmp").is_dir() and layout_of(base / "tmp") is not None:
        out.append(CheckpointState(base / "tmp", None, "tmp"))
    return out


def choose_checkpoint(states: list[CheckpointState]) -> tuple[CheckpointState | None, str]:
    """(the save to open, why): the final save in ``checkpoints/`` (written after training),
    else the newest usable ``checkpoint-N/``, else ``tmp/`` (the latest version's zero-shot
    layers when its ``checkpoint-0/`` was never written)."""
    final = [s for s in states if s.path.name == "checkpoints"]
    if final:
        return final[0], "the final save, written into checkpoints/ itself after training"
    usable = [s for s in states if s.step is not None and s.layout]
    if usable:
        newer = [s for s in states if s.step is not None and s.step > usable[-1].step]
        why = "the newest usable checkpoint"
        if newer:
            why += f" (newer {', '.join(s.label for s in newer)} cannot be used)"
        return usable[-1], why
    tmp = [s for s in states if s.path.name == "tmp"]
    if tmp:
        return tmp[0], "no checkpoint-N/ holds a compressed save; tmp/ holds the zero-shot layers"
    return None, "no usable compressed save"


def _unusable_checkpoint(folder: Path) -> bool:
    """A ``checkpoints/checkpoint-N/`` without a compressed save, in an experiment folder
    that has compression settings or other compressed saves (a crashed Trainer save)."""
    if not (checkpoint_step(folder) is not None and folder.parent.name == "checkpoints" and folder.is_dir()):
        return False
    experiment = folder.parent.parent
    return _has_settings(experiment) or any(s.layout for s in survey_experiment(experiment))


def _has_settings(experiment: Path) -> bool:
    """The experiment folder holds the compression settings (or statistics)."""
    return any((experiment / n).is_file() for n, where in SETTINGS_FILES + STATS_FILES if where != ".")


def experiment_checkpoints(base: Path) -> list[Path]:
    """``base/checkpoints/checkpoint-N/`` folders in a compressed layout, oldest first."""
    return [s.path for s in survey_experiment(base) if s.step is not None and s.layout]


class CompressedMoE(Format):
    name = "compressed-moe"
    looks_for = ("layer_*/{gate,up,down}_proj.pt, compressed_metadata.json, non_moe_weights.pt or "
                 "extracted_weights/ (or an experiment folder with checkpoints/checkpoint-N/ or tmp/ of them)")
    priority = 30
    layouts = ("checkpoint-N", "checkpoint-0", "documented", "early-compressed", "tmp")

    def detect(self, folder: Path) -> str | None:
        folder = Path(folder)
        layout = layout_of(folder)
        if layout is None:
            states = survey_experiment(folder)
            chosen, _ = choose_checkpoint(states)
            layout = chosen.layout if chosen else UNUSABLE if states and _has_settings(folder) else None
        if layout is None and _unusable_checkpoint(folder):
            layout = UNUSABLE
        return layout

    def open(self, folder: Path, layout: str, source=None) -> Artifact:
        from modelkit.io.sources import Source

        folder = Path(folder).resolve()
        if layout == UNUSABLE:
            experiment = folder if (folder / "checkpoints").is_dir() else folder.parent.parent
            states = survey_experiment(experiment)
            listing = "; ".join(f"{s.label} {s.problem or 'usable'}" for s in states)
            raise UnknownFormatError(f"no usable compressed-MoE save here ({listing})", folder)
        if source is None:
            source = Source(str(folder), "local", folder, folder)
        experiment, chosen_why = None, ""
        if layout_of(folder) is None:  # an experiment folder: open its chosen save
            experiment = folder
            chosen, chosen_why = choose_checkpoint(survey_experiment(folder))
            folder = chosen.path
        elif folder.parent.name == "checkpoints" or folder.name in ("checkpoints", "tmp"):
            experiment = folder.parent if folder.name in ("checkpoints", "tmp") else folder.parent.parent
        states = survey_experiment(experiment) if experiment is not None else []
        changes: dict[str, Any] = {"checkpoints": [s.path for s in states if s.step is not None and s.layout
                                                   and s.path != folder]}
        if chosen_why:
            changes["folder"] = folder
            changes["note"] = f"opened {folder.relative_to(experiment)}/: {chosen_why}"
        if experiment is not None and source.kind == "local" and source.root in (folder, experiment):
            settings = [n for n, where in SETTINGS_FILES + STATS_FILES if where != "."]
            if source.root == folder and any((experiment / n).is_file() for n in settings):
                changes["root"] = experiment  # the settings in the experiment folder belong to the artifact
        source = dataclasses.replace(source, **changes)
        art = CompressedMoEArtifact(folder, layout_of(folder) or layout, source)
        art.survey = states
        art.chosen_why = chosen_why
        return art


register(CompressedMoE())
