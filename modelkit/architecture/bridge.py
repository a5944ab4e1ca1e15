"""The bridge between a model config and the tensors a checkpoint of it holds.

Everything here speaks the **on-disk** key space: the names transformers 5
``save_pretrained`` writes (per-expert ``mlp.experts.{e}.gate_proj.weight`` for MoE
models, although transformers 5 fuses experts into ``mlp.experts.gate_up_proj`` in
memory). The translation between the two spaces is never re-derived here: it is
transformers' own conversion mapping, applied by transformers' own functions
(``revert_weight_conversion`` for saving, ``from_pretrained`` for loading).

Public API:

* :func:`load_config`, :func:`config_from_dict`, :func:`split_config_dict`
* :func:`expected_tensors` -> {name: :class:`ExpectedTensor`}, :func:`tied_tensors`,
  :func:`load_targets` (meta device; cached in memory and on disk), :func:`meta_model`
* :func:`fit_tensors` -> :class:`TensorFit` (missing / unexpected / mis-shaped: the one check)
* :func:`disk_to_model` -> (model, :class:`LoadInfo`), :func:`model_to_disk`
* :func:`classify` -> :class:`TensorRole`

Importing this module costs only the standard library; torch and transformers are
imported on first use, and :func:`expected_tensors` of a config file or dict whose
answer is in the on-disk cache never imports them at all.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import os
import re
import tempfile
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from modelkit.errors import ConfigError, LoadError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PretrainedConfig, PreTrainedModel

__all__ = [
    "ExpectedTensor", "LoadInfo", "TensorFit", "TensorRole", "classify", "config_from_dict",
    "disk_to_model", "expected_tensors", "fit_tensors", "load_config", "load_targets", "meta_model", "model_to_disk",
    "split_config_dict", "tied_tensors",
]

CACHE_FORMAT = 1          # bump when the cached JSON layout or its meaning changes
_MEMORY_CACHE_SIZE = 32   # configs whose expected tensors stay in memory


# --------------------------------------------------------------------------- configs


def load_config(path: Path | str, *, model_type: str | None = None,
                strip_unknown: bool = False) -> "PretrainedConfig":
    """The transformers config in ``path`` (a ``config.json`` or a folder holding one).

    Hub-style (transformers 4.x) field names are accepted; ``auto_map`` is never
    honoured. ``model_type`` overrides the file's own (e.g. ``"gemma"`` for a DyLoRA
    config whose ``model_type`` is ``"dylora-moe"``). Raises ConfigError naming the file.
    """
    file = _config_file(Path(path))
    return config_from_dict(_read_config_json(file), str(file), model_type=model_type,
                            strip_unknown=strip_unknown)


def config_from_dict(d: Mapping[str, Any], source: str, *, model_type: str | None = None,
                     strip_unknown: bool = True) -> "PretrainedConfig":
    """A transformers config from a dict assembled in memory; ``source`` names it in errors.

    ``model_type`` overrides ``d["model_type"]``. With ``strip_unknown`` (default), custom
    fields (``_dylora_*``, ``saved_at``, ...: declared nowhere, read by no modeling code)
    are dropped; :func:`split_config_dict` tells which.
    """
    known, _ = split_config_dict(d, source, model_type=model_type, strip_unknown=strip_unknown)
    cls = _config_class(known, source)
    config = _build_config(cls, known, source)
    if len(_SOURCES) > 4096:
        for key in [k for k, (ref, _) in _SOURCES.items() if ref() is None]:
            del _SOURCES[key]
    _SOURCES[id(config)] = (weakref.ref(config), source)
    return config


# config object -> the file it was read from, so later errors can name it (configs are
# unhashable, hence id() and a weak reference that proves the id was not reused)
_SOURCES: dict[int, tuple[Any, str]] = {}


def config_source(config) -> str | None:
    """The file (or description) a config built here came from, if known."""
    entry = _SOURCES.get(id(config))
    if entry is None or entry[0]() is not config:
        return None
    return entry[1]


def split_config_dict(d: Mapping[str, Any], source: str = "<config>", *,
                      model_type: str | None = None,
                      strip_unknown: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(fields transformers uses, dropped fields)`` of a raw config dict.

    ``auto_map`` (remote code) is always dropped; unknown custom fields only with
    ``strip_unknown``.
    """
    if not isinstance(d, Mapping):
        raise ConfigError(f"config is a JSON {type(d).__name__}, not an object", source)
    d = copy.deepcopy(dict(d))
    dropped: dict[str, Any] = {}
    if "auto_map" in d:  # never run code shipped with an artifact
        dropped["auto_map"] = d.pop("auto_map")
    if model_type is not None:
        if d.get("model_type") not in (None, model_type):
            dropped["model_type"] = d["model_type"]
        d["model_type"] = model_type
    if strip_unknown:
        cls = _config_class(d, source)
        for key in _unknown_fields(cls, d, source):
            dropped[key] = d.pop(key)
    return d, dropped


def _config_file(path: Path) -> Path:
    if path.is_dir():
        file = path / "config.json"
        if not file.is_file():
            raise ConfigError("folder holds no config.json", path)
        return file
    if not path.is_file():
        raise ConfigError("config file does not exist", path)
    return path


def _read_config_json(file: Path) -> dict[str, Any]:
    """config.json read like every artifact file (confined, regular, size-capped; see
    modelkit.io.files) and checked against its schema (modelkit.schemas)."""
    from modelkit import schemas
    from modelkit.io import files

    d = files.read_json(file)
    if not isinstance(d, dict):
        raise ConfigError(f"config is a JSON {type(d).__name__}, not an object", file)
    return schemas.validate(d, file)


def _config_class(d: Mapping[str, Any], source: str):
    mt = d.get("model_type")
    if mt is None:
        raise ConfigError("config has no `model_type` (pass model_type= to name the architecture)",
                          source)
    if not isinstance(mt, str):
        raise ConfigError(f"`model_type` is {mt!r}, not a string", source)
    # transformers' own AutoConfig rule: a mistral config with layer_types is ministral
    if mt == "mistral" and "layer_types" in d:
        mt = "ministral"
    # CONFIG_MAPPING: transformers' own types plus any registered in-process with
    # AutoConfig.register (by this program, never by an artifact)
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if mt not in CONFIG_MAPPING:
        import difflib

        import transformers

        close = difflib.get_close_matches(mt, list(CONFIG_MAPPING.keys()), n=5, cutoff=0.5)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise ConfigError(
            f"model_type {mt!r} is unknown to transformers {transformers.__version__}{hint} "
            "(for a wrapper format, pass model_type= with the base architecture)", source)
    return CONFIG_MAPPING[mt]


def _build_config(cls, d: Mapping[str, Any], source: str):
    d = dict(copy.deepcopy(d))
    if cls.model_type != d.get("model_type"):  # mistral -> ministral
        d["model_type"] = cls.model_type
    # the same path AutoConfig takes after reading config.json
    d = cls._decode_special_floats(d) if hasattr(cls, "_decode_special_floats") else d
    try:
        return cls.from_dict(d)
    except Exception as e:  # strict dataclass validation raises several types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"invalid {cls.model_type} config: {first}", source) from None


def _unknown_fields(cls, d: Mapping[str, Any], source: str) -> list[str]:
    """Keys of ``d`` that are custom fields: neither declared, nor consumed by ``cls``, nor
    read by its modeling code (which may ``getattr`` undeclared fields such as qwen3_moe's
    ``head_dim``). Underscore keys (``_dylora_*``) count as custom whatever the code says."""
    import dataclasses

    known = {"model_type"} | set(getattr(cls, "attribute_map", {}) or {})
    if dataclasses.is_dataclass(cls):
        known |= {f.name for f in dataclasses.fields(cls)}
    known |= set(vars(_default_config(cls)))
    built = vars(_build_config(cls, d, source))
    # a key neither declared nor consumed (torch_dtype, rope_theta are consumed) ends up
    # as a plain attribute
    free = [k for k in d if k not in known and k in built]
    source_text = _modeling_source(cls)
    return [k for k in free if k.startswith("_") or (
        source_text is not None and re.search(rf"\b{re.escape(k)}\b", source_text) is None)]


_MODELING_SOURCES: dict[type, str | None] = {}


def _modeling_source(cls) -> str | None:
    """Text of the modeling module that goes with config class ``cls`` (not imported)."""
    if cls not in _MODELING_SOURCES:
        import importlib.util

        text = None
        name = cls.__module__.replace(".configuration_", ".modeling_")
        try:
            spec = importlib.util.find_spec(name)
            if spec is not None and spec.origin and name != cls.__module__:
                text = Path(spec.origin).read_text(encoding="utf-8")
        except (ImportError, OSError, ValueError):
            text = None
        _MODELING_SOURCES[cls] = text
    return _MODELING_SOURCES[cls]


_DEFAULT_CONFIGS: dict[type, Any] = {}


def _default_config(cls):
    if cls not in _DEFAULT_CONFIGS:
        _DEFAULT_CONFIGS[cls] = cls()
    return _DEFAULT_CONFIGS[cls]


# --------------------------------------------------------------------------- expected tensors


@dataclass(frozen=True)
class ExpectedTensor:
    """One tensor a complete on-disk checkpoint holds.

    ``dtype`` is the config's dtype (float32 when it names none), except for parameters
    ``from_pretrained`` keeps in float32 (``_keep_in_fp32_modules_strict``, e.g. DeepSeek's
    ``e_score_correction_bias``).
    """

    name: str                  # on-disk name
    shape: tuple[int, ...]
    dtype: str = "float32"     # torch dtype name

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


def expected_tensors(config: "PretrainedConfig | Mapping[str, Any] | Path | str", *,
                     model_type: str | None = None,
                     cache: bool = True) -> dict[str, ExpectedTensor]:
    """Every tensor a complete checkpoint of ``AutoModelForCausalLM.from_config(config)``
    holds on disk, by on-disk name (tied duplicates and non-persistent buffers excluded).

    ``config`` is a config object, a raw config dict, or a config.json path / folder. The
    model is built on the meta device; results are cached in memory and (``cache=True``)
    as JSON under ``$MODELKIT_CACHE/expected`` (default ``~/.cache/modelkit/expected``;
    ``MODELKIT_CACHE=off`` disables the disk cache).
    """
    return dict(_expected(config, model_type, cache)[0])


def tied_tensors(config: "PretrainedConfig | Mapping[str, Any] | Path | str", *,
                 model_type: str | None = None, cache: bool = True) -> dict[str, str]:
    """On-disk name of each tied (not stored) tensor -> the name it shares storage with."""
    return dict(_expected(config, model_type, cache)[1])


Mismatch = tuple[str, tuple[int, ...], tuple[int, ...]]  # (on-disk name, given shape, expected shape)


@dataclass
class TensorFit:
    """How given on-disk tensors fit an architecture: the one completeness check that
    ``inspect`` (findings), ``load`` / ``export`` (LoadError) and :func:`disk_to_model`
    (:class:`LoadInfo`) all report from."""

    expected: dict[str, ExpectedTensor]
    tied: dict[str, str]                                     # tied name -> its source
    missing: list[str] = field(default_factory=list)         # expected, not given (expected order)
    unexpected: list[str] = field(default_factory=list)      # given, no place, not a tied copy
    mismatched: list[Mismatch] = field(default_factory=list)  # expected order
    tied_given: list[str] = field(default_factory=list)      # given tied copies

    @property
    def ok(self) -> bool:
        """Nothing missing, left over or mis-shaped."""
        return not (self.missing or self.unexpected or self.mismatched)

    def mismatch_lines(self) -> list[str]:
        """``name: stored [..], model needs [..]`` for each mis-shaped tensor."""
        return [f"{n}: stored {list(got)}, model needs {list(exp)}" for n, got, exp in self.mismatched]


def fit_tensors(config: "PretrainedConfig | Mapping[str, Any] | Path | str",
                shapes: Mapping[str, "tuple[int, ...] | None"]) -> TensorFit:
    """Hold given tensors (on-disk name -> shape, None where the shape is not known
    cheaply; in the given order) against ``config``'s expected tensors. Reads no data."""
    expected = expected_tensors(config)
    tied = tied_tensors(config)
    fit = TensorFit(expected, tied)
    fit.missing = [n for n in expected if n not in shapes]
    fit.unexpected = [n for n in shapes if n not in expected and n not in tied]
    fit.tied_given = [n for n in shapes if n in tied]
    for n, e in expected.items():
        got = shapes.get(n)
        if got is not None and tuple(got) != e.shape:
            fit.mismatched.append((n, tuple(got), e.shape))
    return fit


def load_targets(config: "PretrainedConfig | Mapping[str, Any] | Path | str", *,
                 model_type: str | None = None, cache: bool = True) -> dict[str, str]:
    """On-disk name -> the in-memory parameter ``from_pretrained`` loads it into
    (``...experts.3.up_proj.weight`` -> ``...experts.gate_up_proj``), found by transformers'
    own key renaming. Cached like :func:`expected_tensors`."""

    def compute(cfg):
        names = _expected(cfg, None, cache)[0]
        model = meta_model(cfg)
        state = model.state_dict()
        rename = _load_renamer(model)
        out = {}
        for name in names:
            target = name if name in state else rename(name)
            if target in state:
                out[name] = target
        return out

    return dict(_cached("targets", config, model_type, cache, compute,
                        lambda r: {"targets": r}, lambda d: dict(d["targets"])))


def _expected(config, model_type: str | None, use_disk: bool):
    def encode(result):
        tensors, tied = result
        return {"tensors": [[t.name, list(t.shape), t.dtype] for t in tensors.values()],
                "tied": tied}

    def decode(data):
        tensors = {n: ExpectedTensor(n, tuple(s), t) for n, s, t in data["tensors"]}
        return tensors, dict(data["tied"])

    return _cached("expected", config, model_type, use_disk, _compute_expected, encode, decode)


_memory_cache: OrderedDict[str, Any] = OrderedDict()
_cache_lock = threading.Lock()


def _cached(kind: str, config, model_type: str | None, use_disk: bool, compute, encode, decode):
    """``compute(config object)``, memoised in memory and (``use_disk``) as JSON on disk."""
    digest, loader = _cache_key(config, model_type)
    key = f"{kind}-{digest}"
    with _cache_lock:
        if key in _memory_cache:
            _memory_cache.move_to_end(key)
            return _memory_cache[key]
    result = None
    if use_disk:
        data = _read_disk_cache(key)
        if data is not None:
            try:
                result = decode(data)
            except (KeyError, TypeError, ValueError):
                result = None  # unreadable entry: recompute and overwrite
    if result is None:
        result = compute(loader())
        if use_disk:
            _write_disk_cache(key, encode(result))
    with _cache_lock:
        _memory_cache[key] = result
        while len(_memory_cache) > _MEMORY_CACHE_SIZE:
            _memory_cache.popitem(last=False)
    return result


def _cache_key(config, model_type: str | None):
    """(digest, thunk returning the config object); no transformers import for raw input."""
    source = getattr(config, "_modelkit_facts_source", None)  # an archfacts.ConfigFacts
    if source is not None:
        config, model_type = source
    if isinstance(config, (str, Path)):
        file = _config_file(Path(config))
        raw = _read_config_json(file)
        payload = {"raw": raw, "model_type": model_type, "source": "file"}
        loader = lambda: config_from_dict(raw, str(file), model_type=model_type,  # noqa: E731
                                          strip_unknown=False)
        version = _transformers_version()
    elif isinstance(config, Mapping):
        raw = dict(config)
        payload = {"raw": raw, "model_type": model_type, "source": "dict"}
        loader = lambda: config_from_dict(raw, "<config dict>", model_type=model_type)  # noqa: E731
        version = _transformers_version()
    else:
        import transformers

        if model_type is not None and model_type != getattr(config, "model_type", None):
            raise ConfigError(f"model_type={model_type!r} given with a ready "
                              f"{type(config).__name__}; build the config with it instead")
        payload = {"config": _canonical_config(config)}
        loader = lambda: config  # noqa: E731
        version = transformers.__version__
    blob = json.dumps({"v": CACHE_FORMAT, "transformers": version, **payload},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32], loader


def _canonical_config(config) -> dict[str, Any]:
    """The config's fields, less bookkeeping that does not change any tensor."""
    d = config.to_dict()
    return {k: v for k, v in d.items() if not k.startswith("_") and k != "transformers_version"}


_TF_VERSION: str | None = None


def _transformers_version() -> str:
    """transformers' version, without importing it when it is not imported yet."""
    global _TF_VERSION
    if _TF_VERSION is None:
        import sys

        if "transformers" in sys.modules:
            _TF_VERSION = sys.modules["transformers"].__version__
        else:
            from importlib.metadata import version

            _TF_VERSION = version("transformers")
    return _TF_VERSION


def _cache_dir() -> Path | None:
    from modelkit.cache import cache_root

    root = cache_root()
    return root / "expected" if root is not None else None


def _read_disk_cache(key: str) -> dict | None:
    d = _cache_dir()
    if d is None:
        return None
    try:
        data = json.loads((d / f"{key}.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == CACHE_FORMAT else None


def _write_disk_cache(key: str, data: dict) -> None:
    d = _cache_dir()
    if d is None:
        return
    tmp = None
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{key}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"format": CACHE_FORMAT, **data}, f, separators=(",", ":"))
        os.replace(tmp, d / f"{key}.json")
    except OSError:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)  # a cache that cannot be written only costs time


def _causal_lm_class(config):
    """The class ``AutoModelForCausalLM`` picks for ``config`` (never remote code)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        classes = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise ConfigError(f"transformers has no causal-LM model for model_type "
                          f"{config.model_type!r} ({type(config).__name__})") from None
    if not isinstance(classes, (list, tuple)):
        return classes
    by_name = {c.__name__: c for c in classes}
    for arch in getattr(config, "architectures", None) or []:
        if arch in by_name:
            return by_name[arch]
    return classes[0]


def _plain_config(config):
    """A private copy of ``config`` without remote-code hooks."""
    config = copy.deepcopy(config)
    if hasattr(config, "auto_map"):
        delattr(config, "auto_map")
    return config


def _as_config(config, model_type: str | None = None):
    """A config object from a config object, a raw dict or a config.json path."""
    if isinstance(config, (str, Path)):
        return load_config(config, model_type=model_type)
    if isinstance(config, Mapping):
        return config_from_dict(config, "<config dict>", model_type=model_type)
    return config


def meta_model(config: "PretrainedConfig | Mapping[str, Any] | Path | str") -> "PreTrainedModel":
    """``AutoModelForCausalLM``'s model for ``config``, on the meta device (no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    source = str(config) if isinstance(config, (str, Path)) else None
    config = _as_config(config)
    source = source or config_source(config) or getattr(config, "_name_or_path", None) or f"<{config.model_type} config>"
    config = _plain_config(config)
    cls = _causal_lm_class(config)  # a clear ConfigError for configs with no causal-LM class
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except Exception as e:  # a config that validates but describes no buildable model
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{cls.__name__} cannot be built from this config: "
                          f"{type(e).__name__}: {first}", source) from None


def _savable_state(model, state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` less what ``save_pretrained`` never writes: ignored keys, tied duplicates."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state_dict.pop(key, None)
    return remove_tied_weights_from_state_dict(state_dict, model)


def _revert(model, state_dict: dict[str, Any]) -> dict[str, Any]:
    """In-memory names -> on-disk names: transformers' ``revert_weight_conversion``, the
    step ``save_pretrained`` applies (splits fused experts into per-expert tensors)."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, state_dict)


def _meta_copy(state: dict[str, Any]) -> dict[str, Any]:
    import torch

    return {k: (v if v.device.type == "meta" else torch.empty_like(v, device="meta"))
            for k, v in state.items()}


def _layer_groups(names) -> list[list[str]]:
    """Names grouped by their first numbered block (``model.layers.3.``), in natural order."""
    groups: dict[str, list[str]] = {}
    for name in names:
        m = re.match(r"(.*?\.\d+)\.", name)
        groups.setdefault(m.group(1) if m else name, []).append(name)
    return [groups[k] for k in _natural_sorted(groups)]


def _stream_groups(model, state: dict[str, Any]) -> list[list[str]]:
    """Groups of in-memory names that can be reverted one at a time with the same result
    as reverting all at once (checked on the meta device); else a single group."""
    meta = _meta_copy(state)
    whole = {k: tuple(v.shape) for k, v in _revert(model, dict(meta)).items()}
    groups = _layer_groups(state)
    parts: dict[str, tuple[int, ...]] = {}
    for group in groups:
        for k, v in _revert(model, {n: meta[n] for n in group}).items():
            if k in parts:
                return [list(state)]
            parts[k] = tuple(v.shape)
    return groups if parts == whole else [list(state)]


def _load_renamer(model):
    """``disk name -> in-memory name`` exactly as ``from_pretrained`` renames keys."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        rename_source_key,
    )

    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    keys = dict.fromkeys(model.state_dict(), True)

    def rename(name: str) -> str:
        return rename_source_key(name, renamings, converters, model.base_model_prefix, keys)[0]

    return rename


def _compute_expected(config) -> tuple[dict[str, ExpectedTensor], dict[str, str]]:
    from modelkit.io.tensors import dtype_name

    model = meta_model(config)
    full_state = model.state_dict()  # non-persistent buffers (rotary inv_freq) are not in it
    # parameters from_pretrained keeps in fp32 whatever the model dtype (its dtype_plan)
    plan = model._get_dtype_plan(model.dtype) if hasattr(model, "_get_dtype_plan") else {}
    if plan:
        from transformers.core_model_loading import build_glob_alternation

        alt, by_group, _ = build_glob_alternation(list(plan))
        for k, t in full_state.items():
            m = alt.search(k)
            if m is not None and t.is_floating_point():
                full_state[k] = t.to(plan[by_group[m.lastgroup]])
    state = _savable_state(model, dict(full_state))
    disk = _revert(model, dict(state))
    tensors = {name: ExpectedTensor(name, tuple(t.shape), dtype_name(t.dtype))
               for name, t in disk.items()}
    tied = {}
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if target in full_state and target not in state:
            tied[_disk_name(model, target, full_state)] = _disk_name(model, source, full_state)
    return tensors, tied


def _disk_name(model, name: str, state) -> str:
    """On-disk name of one in-memory tensor that no converter merges (e.g. a tied one)."""
    try:
        out = _revert(model, {name: state[name]})
    except Exception:
        return name
    return next(iter(out)) if len(out) == 1 else name


def _natural_sorted(names) -> list[str]:
    """Names in the order transformers walks a state dict (``layers.2`` before ``layers.10``)."""
    from transformers.core_model_loading import dot_natural_key

    return sorted(names, key=dot_natural_key)


# --------------------------------------------------------------------------- load / save


@dataclass
class LoadInfo:
    """What :func:`disk_to_model` did with each tensor, in on-disk names (plus
    transformers' own report in in-memory names, so nothing is hidden)."""

    # on-disk names
    missing: list[str] = field(default_factory=list)     # expected, not given
    unexpected: list[str] = field(default_factory=list)  # given, not in the architecture
    mismatched: list[Mismatch] = field(default_factory=list)  # (name, given, expected shape)
    skipped: list[str] = field(default_factory=list)     # given, unused: fused group incomplete
    tied: list[str] = field(default_factory=list)        # given tied copies: source used instead
    # transformers' report, in-memory names (missing ones were initialised randomly)
    model_missing: list[str] = field(default_factory=list)
    model_unexpected: list[str] = field(default_factory=list)
    model_mismatched: list[Mismatch] = field(default_factory=list)
    # transformers raises on conversion errors (disk_to_model turns that into LoadError),
    # so this stays empty in a returned LoadInfo; kept for report consumers
    conversion_errors: dict[str, str] = field(default_factory=dict)
    error_msgs: list[str] = field(default_factory=list)
    report: str = ""  # transformers' own load report (quiet=True), for the record

    @property
    def ok(self) -> bool:
        """True when every expected tensor was loaded and nothing was left over."""
        return not (self.missing or self.unexpected or self.mismatched or self.skipped
                    or self.model_missing or self.model_unexpected or self.model_mismatched
                    or self.conversion_errors or self.error_msgs)

    def summary(self) -> str:
        """One line: how many tensors of each kind of trouble."""
        parts = [f"{len(v)} {k}" for k, v in (
            ("missing", self.missing), ("unexpected", self.unexpected),
            ("mismatched", self.mismatched), ("skipped", self.skipped),
            ("model_missing", self.model_missing), ("model_unexpected", self.model_unexpected),
            ("model_mismatched", self.model_mismatched), ("errors", self.error_msgs)) if v]
        return ", ".join(parts) if parts else "all tensors loaded"


class _Deferred:
    """A tensor read only when transformers slices it (``t[...]``), like a safetensors slice."""

    __slots__ = ("source", "key")

    def __init__(self, source: Mapping[str, Any], key: str):
        self.source, self.key = source, key

    def __getitem__(self, index):
        value = self.source[self.key]
        if callable(value) and not hasattr(value, "shape"):
            value = value()
        return value[index]


def _shape_of(value) -> tuple[int, ...] | None:
    shape = getattr(value, "shape", None)
    if shape is None and hasattr(value, "get_shape"):
        shape = value.get_shape()
    return tuple(shape) if shape is not None else None


def disk_to_model(config: "PretrainedConfig | Mapping[str, Any] | Path | str",
                  tensors: Mapping[str, Any],
                  dtype: "torch.dtype | str | None" = None, *, device: str | None = None,
                  shapes: Mapping[str, tuple[int, ...]] | None = None, strict: bool = False,
                  quiet: bool = True) -> tuple["PreTrainedModel", LoadInfo]:
    """The transformers model for ``config`` filled from on-disk-named ``tensors``.

    ``tensors`` maps on-disk names to tensors, zero-argument producers, or anything
    sliceable with ``[...]``; a non-dict Mapping is read one key at a time while
    transformers loads. Given tensors already in the target dtype and device become the
    parameters themselves (shared storage, as with ``from_pretrained(state_dict=...)``). Loading is transformers' own ``from_pretrained`` path (its
    conversion mapping fuses experts). A fused group with a missing or mis-shaped member
    is not loaded (its given members are listed as ``skipped``). ``shapes`` gives cheap
    shapes for lazy mappings, whose mis-shaped experts otherwise make transformers fail
    (LoadError). ``quiet`` keeps transformers' report in ``LoadInfo.report`` instead of
    printing it. ``strict=True`` raises LoadError unless ``LoadInfo.ok``.
    """
    import torch

    from modelkit.io.tensors import torch_dtype

    config = _plain_config(_as_config(config))
    if dtype is None:
        dtype = config.dtype if config.dtype is not None else torch.float32
    dtype = torch_dtype(dtype)
    given = list(tensors.keys())
    given_set = set(given)

    def shape(name):
        if shapes is not None and name in shapes:
            return tuple(shapes[name])
        return _shape_of(tensors[name]) if isinstance(tensors, dict) else None

    fit = fit_tensors(config, {n: shape(n) for n in given})
    info = LoadInfo(missing=fit.missing, unexpected=fit.unexpected, mismatched=fit.mismatched,
                    tied=fit.tied_given)
    # members of one fused parameter must all be present and well-shaped, or transformers'
    # conversion ops fail; such a group is left out (transformers then reports it missing)
    groups: dict[str, list[str]] = {}
    for name, param in load_targets(config).items():
        groups.setdefault(param, []).append(name)
    bad = set(info.missing) | {m[0] for m in info.mismatched}
    skip: set[str] = set()
    for members in groups.values():
        if len(members) > 1 and any(m in bad for m in members):
            skip.update(m for m in members if m in given_set)
    info.skipped = [n for n in given if n in skip and n not in bad]

    state = {n: _Deferred(tensors, n) for n in given if n not in skip}
    cls = _causal_lm_class(config)
    kwargs: dict[str, Any] = {"device_map": {"": device}} if device is not None else {}
    with _transformers_log(quiet) as log:
        try:
            model, report = cls.from_pretrained(
                None, config=config, state_dict=state, dtype=dtype, output_loading_info=True,
                ignore_mismatched_sizes=True, trust_remote_code=False, **kwargs)
        except RuntimeError as e:
            detail = _tidy("\n".join(log))[:3000]
            raise LoadError(f"transformers could not build {cls.__name__} from the tensors "
                            f"({info.summary()}): {str(e).strip()}"
                            + (f"\n{detail}" if detail else "")) from e
    info.report = _tidy("\n".join(log))
    info.model_missing = sorted(report.get("missing_keys", ()))
    info.model_unexpected = sorted(report.get("unexpected_keys", ()))
    info.model_mismatched = sorted((k, tuple(a), tuple(b))
                                   for k, a, b in report.get("mismatched_keys", ()))
    info.error_msgs = list(report.get("error_msgs", ()))
    if strict and not info.ok:
        raise LoadError(f"incomplete load of {cls.__name__}: {info.summary()}")
    return model, info


def _tidy(report: str) -> str:
    """transformers' load report without table padding and rules."""
    lines = (re.sub(r" {2,}", " ", line).rstrip() for line in report.splitlines())
    return "\n".join(line for line in lines if line.strip(" -+|"))


@contextmanager
def _transformers_log(quiet: bool):
    """Collect transformers' warnings (its load report) instead of printing them, and hide
    its progress bars; yields the list the messages go to."""
    import logging

    from transformers.utils import logging as hf_logging

    lines: list[str] = []
    if not quiet:
        yield lines
        return

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage()))

    root = logging.getLogger("transformers")
    handler = Keep(logging.WARNING)
    level, bars, propagate = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(),
                              root.propagate)
    hf_logging.disable_default_handler()
    hf_logging.add_handler(handler)
    hf_logging.set_verbosity_warning()
    hf_logging.disable_progress_bar()
    root.propagate = False
    try:
        yield lines
    finally:
        root.propagate = propagate
        hf_logging.set_verbosity(level)
        hf_logging.remove_handler(handler)
        hf_logging.enable_default_handler()
        if bars:
            hf_logging.enable_progress_bar()


def model_to_disk(model: "PreTrainedModel") -> Iterator[tuple[str, "torch.Tensor"]]:
    """``(on-disk name, tensor)`` pairs exactly as ``save_pretrained`` writes them.

    Per-expert tensors for MoE, tied duplicates dropped. The conversion is reverted one
    layer at a time (when that gives the same names as reverting everything, checked on
    the meta device), so at most one layer's converted copies exist at once; tensors come
    in natural name order within a layer.
    """
    state = _savable_state(model, model.state_dict())
    for group in _stream_groups(model, state):
        disk = _revert(model, {n: state.pop(n) for n in group})
        for name in _natural_sorted(list(disk)):
            yield name, disk.pop(name).contiguous()


# --------------------------------------------------------------------------- classify


Role = Literal["embedding", "attention", "mlp", "expert", "router", "norm", "lm_head", "lora",
               "other"]


@dataclass(frozen=True)
class TensorRole:
    """What a tensor is for: ``role``, and its ``layer`` / ``expert`` index when it has one."""

    role: Role
    layer: int | None = None
    expert: int | None = None


_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
_EXPERT = re.compile(r"(?:^|\.)experts?\.(\d+)(?:\.|$)|(?:^|\.)expert_(\d+)(?:\.|$)")
_LORA = re.compile(r"(?:^|\.)lora_(?:A|B|embedding_A|embedding_B|magnitude_vector)(?:\.|$)")
_ROUTER = re.compile(
    r"(?:^|\.)(?:router|gate|shared_expert_gate|e_score_correction_bias)(?:\.|$)")
_EXPERTS = re.compile(
    r"(?:^|\.)(?:experts|shared_experts?|shared_core_layers)(?:\.|$)")
_NORM = re.compile(r"norm|(?:^|\.)ln_\w*(?:\.|$)")
_EMBED = re.compile(
    r"(?:^|\.)(?:embed_tokens|wte|wpe|embed_positions|word_embeddings|embeddings)(?:\.|$)")
_HEAD = re.compile(r"(?:^|\.)(?:lm_head|embed_out)(?:\.|$)")
_ATTN = re.compile(r"(?:^|\.)(?:self_attn|attn|attention|self_attention)(?:\.|$)")
_MLP = re.compile(r"(?:^|\.)(?:mlp|feed_forward|ffn|block_sparse_moe|moe)(?:\.|$)")


@functools.lru_cache(maxsize=1 << 18)  # inspect classifies each of 10^4-10^5 names 3 times
def classify(name: str) -> TensorRole:
    """The role of a tensor from its name: on-disk, in-memory, PEFT, DyLoRA or compressed.

    ``model.layers.3.mlp.experts.7.up_proj.weight`` -> expert (layer 3, expert 7);
    ``mlp.gate.weight`` / DyLoRA ``router.gate.weight`` -> router; ``lora_A``/``lora_B``
    -> lora (DyLoRA ``lora_A.expert_2`` has expert 2); shared experts and shared cores are
    experts without an index.
    """
    m = _LAYER.search(name)
    layer = int(m.group(1)) if m else None
    m = _EXPERT.search(name)
    expert = int(m.group(1) or m.group(2)) if m else None
    if _LORA.search(name):
        role: Role = "lora"
    elif _ROUTER.search(name) and not _EXPERTS.search(name):
        role = "router"
    elif _EXPERTS.search(name) or expert is not None and _MLP.search(name):
        role = "expert"
    elif _NORM.search(name):
        role = "norm"
    elif _EMBED.search(name):
        role = "embedding"
    elif _HEAD.search(name):
        role = "lm_head"
    elif _ATTN.search(name):
        role = "attention"
    elif _MLP.search(name):
        role = "mlp"
    else:
        role = "other"
    return TensorRole(role, layer, expert)
