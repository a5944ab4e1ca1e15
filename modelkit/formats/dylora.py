"""DyLoRA-MoE: a frozen base, ``num_experts`` PEFT LoRA experts and a router (FORMATS.md §3).

Layouts (``kind``):

* ``a``: ``model.safetensors`` holds the whole training wrapper: ``foundation_model.*``
  (base weights as ``...q_proj.base_layer.weight``, experts as ``lora_A.expert_k.weight``)
  and ``router.gate.*``; ``dylo_moe_state/`` lies beside it or beside its folder.
* ``b``: ``peft_adapters/expert_k.pt`` pickles (keys carry the adapter name) and
  ``dylo_moe_state/router.pt``; the base weights come from the base model.
* ``c``: a trainer checkpoint: ``peft_adapters/expert_k/expert_k/`` PEFT folders (keys
  without the adapter name) and ``router.safetensors``; no base weights.
* ``d``: a W&B artifact root; its ``best_model/`` (else the newest ``checkpoint-*/``) is opened.

No dense model equals the routed mixture. The view is the base model, or with ``expert=K``
the base with expert K merged; :meth:`DyLoRAArtifact.experts` and
:meth:`DyLoRAArtifact.router` hand the parts to whoever builds the routed module.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from modelkit.errors import (
    BaseModelUnavailableError,
    ConfigError,
    ExportError,
    FactError,
    LoadError,
    ModelkitError,
    UnknownFormatError,
)
from modelkit.findings import Finding, error, info, warning
from modelkit.formats import register
from modelkit.formats.base import EXPERT_COLUMNS, Artifact, BuiltModel, ExportTarget, Format, Option
from modelkit.formats.lora import (
    PEFT_PREFIX,
    LoraAdapter,
    base_layer_name,
    collect_adapter,
    merge_adapter,
    parse_lora_key,
    plan_merge,
    strip_prefix,
)
from modelkit.formats.peft_lora import (
    adapter_findings,
    fit_findings,
    not_checked_finding,
)
from modelkit.formats.view import TensorView, stored_tensor
from modelkit.io import files
from modelkit.io.checkpoints import checkpoint_folders, checkpoint_step
from modelkit.io.tensors import PickleFile, StoredTensor, check_inside, safetensors_header

MODEL_TYPE = "dylora-moe"
WRAPPER_PREFIX = "foundation_model."
STATE_DIR = "dylo_moe_state"
ADAPTERS_DIR = "peft_adapters"
WRAPPER_FILES = ("model.safetensors", "pytorch_model.bin")
WRAPPER_INDEX = "model.safetensors.index.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
SIBLING_CONFIG = "../best_model/config.json"
TRAINER_FILES = ("training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json")
ROUTER_DEFAULTS = {"temperature": 2.0, "top_k": 1}  # DyLoRA-MoE's training temperature; top-1 at evaluation
_EXPERT = re.compile(r"^expert_(\d+)$")
_EXPERT_FILE = re.compile(r"^expert_(\d+)\.(?:pt|bin)$")


@dataclass
class ExpertAdapter(LoraAdapter):
    """One DyLoRA expert: a PEFT LoRA adapter named ``expert_{index}``.

    ``r``, ``alpha``, :attr:`scaling`, :attr:`targets`; :meth:`tensors` gives its A/B in
    PEFT file naming (no adapter name), read lazily; :meth:`peft_config` its LoraConfig.
    """

    index: int = 0
    source: str | None = None   # the file (or folder) it was read from; None when not found


# -- detection (cheap: config, directory listing, safetensors header keys) ------------------
def _json_or_empty(path: Path) -> dict[str, Any]:
    try:
        data = files.read_json(path)  # confined, regular, size-capped (modelkit.io.files)
    except ModelkitError:
        return {}
    return data if isinstance(data, dict) else {}


def _header_keys(path: Path) -> list[str]:
    """Tensor names in a safetensors header, or [] when it cannot be read."""
    try:
        header, _, _ = safetensors_header(path)
    except ModelkitError:
        return []
    return [k for k in header if k != "__metadata__"]


def _wrapper_keys(folder: Path) -> list[str]:
    if (folder / WRAPPER_INDEX).is_file():
        wm = _json_or_empty(folder / WRAPPER_INDEX).get("weight_map")
        return list(wm) if isinstance(wm, dict) else []
    return _header_keys(folder / "model.safetensors") if (folder / "model.safetensors").is_file() else []


def is_dylora_config(cfg: dict[str, Any]) -> bool:
    """Whether a config.json carries DyLoRA-MoE fields."""
    return cfg.get("model_type") == MODEL_TYPE or any(str(k).startswith("_dylora_") for k in cfg)


def detect_kind(folder: Path) -> str | None:
    """``"a"``, ``"b"`` or ``"c"`` for a DyLoRA-MoE folder, else None (reads no tensor data)."""
    if not folder.is_dir():
        return None
    adapters = folder / ADAPTERS_DIR
    if adapters.is_dir():
        names = [p for p in adapters.iterdir()]
        if any(p.is_dir() and _EXPERT.match(p.name) for p in names):
            return "c"
        if any(p.is_file() and _EXPERT_FILE.match(p.name) for p in names):
            return "b"
    if any(k.startswith(WRAPPER_PREFIX) for k in _wrapper_keys(folder)):
        return "a"  # even when a loader rewrote config.json to the base model_type
    cfg = _json_or_empty(folder / "config.json")
    if not (is_dylora_config(cfg) or adapters.is_dir() or (folder / STATE_DIR).is_dir()
            or (folder / "router.safetensors").is_file()):
        return None
    if cfg.get("checkpoint_type") == "peft_only" or "_dylora_checkpoint_step" in cfg \
            or (folder / "router.safetensors").is_file():
        return "c"
    if cfg.get("_dylora_format") == "peft_separated" or adapters.is_dir():
        return "b"
    return "a"


def _state_prefix(rel: str) -> str:
    """``dylo_moe_state/router.pt`` tensors are named ``router.*`` (so their role is router)."""
    return "router." if rel.endswith("/router.pt") else ""


def _expert_of(t: StoredTensor) -> int | None:
    """The expert a wrapper LoRA key names first (``lora_A.expert_2...`` -> 2), else None."""
    lk = parse_lora_key(t.key)
    m = _EXPERT.match(lk.adapters[0]) if lk is not None and lk.adapters else None
    return int(m.group(1)) if m else None


def inner_folder(root: Path) -> tuple[Path, str] | None:
    """In a W&B artifact root: ``best_model/`` or else the newest DyLoRA ``checkpoint-*/``."""
    if not root.is_dir():
        return None
    candidates = [root / "best_model"] + checkpoint_folders(root)[::-1]
    for p in candidates:
        kind = detect_kind(p)
        if kind is not None:
            return p, kind
    return None


# -- the artifact -------------------------------------------------------------------------
class DyLoRAArtifact(Artifact):
    format = "dylora-moe"
    family = "mixture"
    options = (
        Option("expert", "int", None, "the dense model of expert K merged into the base (else the routed "
               "mixture, see routing=)"),
        Option("alpha", "float", None, "the LoRA alpha when the checkpoint does not record it (same as lora_alpha=)",
               fact="lora_alpha"),
        Option("routing", "str", "router", "how the routed mixture picks its expert per sequence: router, "
               "expert:K or mean (docs/dylora-routing.md)"),
        Option("router_pass", "str", "base", "which forward feeds the router of a routed load: base or expert:K"),
    )

    def __init__(self, folder: Path, layout: str, source=None, kind: str | None = None,
                 root: Path | None = None):
        super().__init__(folder, layout, source)
        self.kind = kind or layout[0]   # "a", "b" or "c": how the files lie
        self.root = root             # the W&B artifact root this was opened from (layout d)

    def path(self, rel: str | Path) -> Path:
        """Files inside the artifact, plus layout a's documented sibling ``../dylo_moe_state/``."""
        if str(rel).startswith(f"../{STATE_DIR}/"):
            p = self.folder / rel
            check_inside(self.folder.parent, p)
            return p
        return super().path(rel)

    # -- config ---------------------------------------------------------------------------
    @cached_property
    def cfg(self) -> dict[str, Any]:
        """config.json as stored ({} when absent)."""
        return self.read_json("config.json") if (self.folder / "config.json").exists() else {}

    @cached_property
    def run_config(self) -> dict[str, Any] | None:
        """A checkpoint's architecture from its run: ``../best_model/config.json`` when that is a
        full DyLoRA base config (the same run wrote both); used only when the base is unavailable."""
        if checkpoint_step(self.folder) is None or not (self.folder / SIBLING_CONFIG).is_file():
            return None
        check_inside(self.folder.parent, self.folder / SIBLING_CONFIG)
        cfg = _json_or_empty(self.folder / SIBLING_CONFIG)
        return cfg if is_dylora_config(cfg) and "hidden_size" in cfg else None

    @property
    def full_config(self) -> bool:
        """Whether config.json is a whole base-model config (not DyLoRA's tiny one)."""
        return "hidden_size" in self.cfg or "num_hidden_layers" in self.cfg

    def _claims(self, *fields: str) -> dict[str, Any]:
        return {f"config.json {f}": self.cfg[f] for f in fields if self.cfg.get(f) is not None}

    def _declared(self, *fields: str) -> Any:
        return next(iter(self._claims(*fields).values()), None)

    @property
    def declared_r(self) -> int | None:
        recorded = self._declared("lora_r", "_dylora_lora_r")
        return recorded if recorded is not None else self.supplied.get("lora_r")

    @property
    def declared_alpha(self) -> float | None:
        recorded = self._declared("lora_alpha", "_dylora_lora_alpha")
        return recorded if recorded is not None else self.supplied.get("lora_alpha")

    def supply(self, lora_alpha: float | None = None, lora_r: int | None = None, **facts: Any) -> None:
        """What an early-era checkpoint does not record: ``lora_alpha`` and ``lora_r`` (r is
        otherwise read from the LoRA shapes). A fact the artifact does record must agree."""
        super().supply(**facts)
        for field, value, cast in (("lora_alpha", lora_alpha, float), ("lora_r", lora_r, int)):
            if value is None:
                continue
            try:
                number = cast(value)
            except (TypeError, ValueError):
                raise FactError(f"{field}={value!r} is not a number", self.folder) from None
            if number <= 0 or (cast is int and number != value):
                raise FactError(f"{field}={value!r} must be a positive {cast.__name__}", self.folder)
            recorded = self._declared(field, f"_dylora_{field}")
            if recorded is not None and float(recorded) != float(number):
                raise FactError(f"{field}={value} was given, but the artifact records {field}={recorded}",
                                  self.folder / "config.json")
            if recorded is None:
                self.supplied[field] = int(number) if cast is int else (int(number) if number == int(number) else number)
        self.__dict__.pop("_experts", None)

    def _supplied_text(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.supplied.items())

    def base_name(self) -> str | None:
        if self.kind == "a" and self.full_config:
            return None  # base weights and full config are both inside
        for key in ("base_model_name_or_path", "_dylora_base_model_name_or_path", "_dylora_base_model"):
            if self.cfg.get(key):
                return str(self.cfg[key])
        for cfg in self.adapter_configs.values():
            if cfg.get("base_model_name_or_path"):
                return str(cfg["base_model_name_or_path"])
        return self.cfg.get("_name_or_path") or None

    def base_needs(self) -> str:
        return "config" if self.kind == "a" else "weights"

    def base_type(self) -> str:
        """The base architecture's model_type (``gemma``), whatever config.json claims."""
        mt = self.cfg.get("model_type")
        if mt and mt != MODEL_TYPE:
            return mt
        from modelkit.architecture.facts import (
            causal_lm_type,  # transformers' own mapping, cached on disk
        )

        for arch in self.cfg.get("architectures") or []:
            if isinstance(arch, str) and causal_lm_type(arch):
                return causal_lm_type(arch)
        if self.base is not None and self.base.path is not None:
            mt = _json_or_empty(self.base.path / "config.json").get("model_type")
            if mt:
                return mt
        raise ConfigError(f"config.json has model_type {MODEL_TYPE!r} and no `architectures` naming the "
                          "base architecture, and the base model is not available; pass --base FOLDER",
                          self.folder / "config.json")

    def config(self):
        """The base model's config: config.json when it is a full one, else the base's."""
        from modelkit.architecture.bridge import config_from_dict, load_config

        if self.full_config:
            return config_from_dict(self.cfg, str(self.folder / "config.json"), model_type=self.base_type())
        if (self.base is None or self.base.path is None) and self.run_config is not None:
            return config_from_dict(self.run_config, str(self.folder / SIBLING_CONFIG),
                                    model_type=DyLoRAArtifact(self.folder / "../best_model", "b").base_type())
        return load_config(self.architecture())

    def architecture(self):
        """config() as raw input (a dict, or the base's config.json): a cached audit of it
        imports no transformers."""
        if self.full_config:
            return {**self.cfg, "model_type": self.base_type()}
        if (self.base is None or self.base.path is None) and self.run_config is not None:
            return {**self.run_config,
                    "model_type": DyLoRAArtifact(self.folder / "../best_model", "b").base_type()}
        if self.base is None or self.base.path is None:
            raise BaseModelUnavailableError(
                f"config.json only names the base model ({self.base_name()!r}), which is not "
                "available for its architecture; pass --base FOLDER", self.folder)
        return self.base.path / "config.json"

    # -- files ----------------------------------------------------------------------------
    @cached_property
    def state_dir(self) -> str | None:
        """``dylo_moe_state`` here, or (layout a) beside this folder.

        In layout a the trainer writes ``dylo_moe_state/`` into the results root after
        reloading the best model, so the sibling belongs to ``best_model/`` only: a
        ``checkpoint-N/`` beside it has its own ``router.gate.*`` (FORMATS.md §3.1)."""
        sibling = self.kind == "a" and checkpoint_step(self.folder) is None
        options = [STATE_DIR] + ([f"../{STATE_DIR}"] if sibling else [])
        return next((rel for rel in options if (self.folder / rel).is_dir()), None)

    @cached_property
    def trainer_copy(self) -> list[str]:
        """Layouts b/c: the Trainer's own ``model.safetensors`` (the whole wrapper: base, every
        expert, router) kept beside ``peft_adapters/`` by middle-era checkpoints."""
        if self.kind == "a" or not any(k.startswith(WRAPPER_PREFIX) for k in _wrapper_keys(self.folder)):
            return []
        return self._wrapper_file_list()

    @cached_property
    def trainer_files(self) -> list[str]:
        """Files of the Trainer that hold no model tensors, listed and never loaded
        (``training_args.bin`` pickles a Python object)."""
        return [f for f in TRAINER_FILES if (self.folder / f).is_file()]

    @cached_property
    def wrapper_files(self) -> list[str]:
        """Layout a: the files of the whole-wrapper state dict."""
        return self._wrapper_file_list() if self.kind == "a" else []

    def _wrapper_file_list(self) -> list[str]:
        if (self.folder / WRAPPER_INDEX).exists():
            wm = self.read_json(WRAPPER_INDEX).get("weight_map")
            if not isinstance(wm, dict):
                raise ConfigError("index has no `weight_map` object", self.folder / WRAPPER_INDEX)
            files = sorted(set(map(str, wm.values())))
            for rel in files:
                self.path(rel)  # refuses entries leaving the artifact
            return [rel for rel in files if (self.folder / rel).exists()]
        return [f for f in WRAPPER_FILES if (self.folder / f).exists()][:1]

    @cached_property
    def expert_sources(self) -> dict[int, str | None]:
        """Expert index -> its weight file (layouts b and c); None when its files are not found.

        Layout c looks where PEFT's ``save_pretrained`` puts a named adapter
        (``expert_k/expert_k/``) and, failing that, in ``expert_k/`` itself.
        """
        folder = self.folder / ADAPTERS_DIR
        if self.kind == "a" or not folder.is_dir():
            return {}
        out: dict[int, str | None] = {}
        for p in sorted(folder.iterdir()):
            if self.kind == "b" and p.is_file() and _EXPERT_FILE.match(p.name):
                out[int(_EXPERT_FILE.match(p.name).group(1))] = f"{ADAPTERS_DIR}/{p.name}"
            elif self.kind == "c" and p.is_dir() and _EXPERT.match(p.name):
                k = int(_EXPERT.match(p.name).group(1))
                dirs = [f"{ADAPTERS_DIR}/{p.name}/{p.name}", f"{ADAPTERS_DIR}/{p.name}"]
                out[k] = next((f"{d}/{f}" for d in dirs for f in ADAPTER_FILES
                               if (self.folder / d / f).is_file()), None)
        return dict(sorted(out.items()))

    def _prefix(self, rel: str) -> str:
        """Layout c names each expert's tensors by its folder, so the inventory shows which."""
        return rel.rsplit("/", 1)[0] + "/" if self.kind == "c" else ""

    @cached_property
    def adapter_configs(self) -> dict[int, dict[str, Any]]:
        """Layout c: each expert's adapter_config.json (when present)."""
        out = {}
        for k, rel in self.expert_sources.items():
            if rel is not None and (self.folder / rel).with_name("adapter_config.json").is_file():
                out[k] = self.read_json(rel.rsplit("/", 1)[0] + "/adapter_config.json")
        return out

    @cached_property
    def state_files(self) -> list[str]:
        """Weight-bearing pickles in dylo_moe_state/ (router.pt, skill_library.pt)."""
        if self.state_dir is None:
            return []
        return sorted(f"{self.state_dir}/{p.name}" for p in (self.folder / self.state_dir).iterdir()
                      if p.suffix in (".pt", ".bin") and p.is_file())

    def stored(self) -> list[StoredTensor]:
        out = []
        for rel in self.wrapper_files:
            out += self.entries_of(rel)
        for rel in self.expert_sources.values():
            if rel is not None:
                out += self.entries_of(rel, self._prefix(rel))
        if (self.folder / "router.safetensors").is_file():
            out += self.entries_of("router.safetensors")
        for rel in self.state_files:
            out += self.entries_of(rel, _state_prefix(rel))
        for rel in self.trainer_copy:
            out += self.entries_of(rel)
        return out

    def _read(self, t: StoredTensor):
        return stored_tensor(self.file(t.file), t)

    # -- layout a: the wrapper's state dict split by role ---------------------------------------
    @cached_property
    def _wrapper(self) -> dict[str, Any]:
        """Layout a: {"base": {on-disk name: t}, "lora": [t], "router": [t], "other": [t]}."""
        parts: dict[str, Any] = {"base": {}, "lora": [], "router": [], "other": []}
        for rel in self.wrapper_files or self.trainer_copy:
            for t in self.entries_of(rel):
                if t.key.startswith("router."):
                    parts["router"].append(t)
                elif not t.key.startswith(WRAPPER_PREFIX):
                    parts["other"].append(t)
                elif parse_lora_key(t.key) is not None:
                    parts["lora"].append(t)
                else:
                    name = base_layer_name(strip_prefix(t.key, WRAPPER_PREFIX, PEFT_PREFIX))
                    if name in parts["base"]:
                        parts["other"].append(t)
                    else:
                        parts["base"][name] = t
        return parts

    # -- experts --------------------------------------------------------------------------
    def experts(self, alpha: float | None = None) -> list[ExpertAdapter]:
        """The experts found, by index (an expert whose files are empty or missing has no
        modules). ``alpha`` overrides the recorded lora_alpha."""
        experts = list(self._experts.values())
        return [replace(e, alpha=alpha) for e in experts] if alpha is not None else experts

    def expert(self, index: int, alpha: float | None = None) -> ExpertAdapter:
        """Expert ``index``; LoadError when there is no such expert."""
        found = {e.index: e for e in self.experts(alpha)}
        if isinstance(index, bool) or not isinstance(index, int) or index not in found:
            hint = (" (the experts' mean is not offered: the routed model never computes it)"
                    if index == "mean" else "")
            raise LoadError(f"no expert {index!r}{hint}; this artifact has experts {sorted(found)}",
                            self.folder)
        return found[index]

    @cached_property
    def _experts(self) -> dict[int, ExpertAdapter]:
        settings = {"r": self.declared_r, "alpha": self.declared_alpha, "cls": ExpertAdapter,
                    "prefixes": (WRAPPER_PREFIX, PEFT_PREFIX)}
        out: dict[int, ExpertAdapter] = {}
        if self.kind == "a":
            groups: dict[int, list[StoredTensor]] = {}
            for t in self._wrapper["lora"]:
                k = _expert_of(t)
                if k is not None:  # without an expert name it stays unplaced (see _stray_lora)
                    groups.setdefault(k, []).append(t)
            for k, entries in sorted(groups.items()):
                name = f"expert_{k}"
                out[k] = collect_adapter(entries, name, self._read, adapters=(name,), index=k,
                                         source=self.wrapper_files[0], **settings)
            return out
        configs = self.adapter_configs
        for k, rel in self.expert_sources.items():
            name = f"expert_{k}"
            entries = self.entries_of(rel, self._prefix(rel)) if rel is not None else []
            extra: dict[str, Any] = {}
            ac = configs.get(k)
            if ac is not None:
                extra = {"r": ac.get("r", self.declared_r), "alpha": ac.get("lora_alpha", self.declared_alpha),
                         "use_rslora": bool(ac.get("use_rslora")), "fan_in_fan_out": bool(ac.get("fan_in_fan_out")),
                         "target_modules": ac.get("target_modules"),
                         "rank_pattern": ac.get("rank_pattern") or {}, "alpha_pattern": ac.get("alpha_pattern") or {}}
            out[k] = collect_adapter(entries, name, self._read, adapters=(name,) if self.kind == "b" else (),
                                     index=k, source=rel, files=[rel] if rel else [], **{**settings, **extra})
        return out

    @property
    def _stray_lora(self) -> list[StoredTensor]:
        """Layout a: LoRA tensors in the wrapper that name no expert."""
        return [t for t in self._wrapper["lora"] if _expert_of(t) is None]

    # -- router ---------------------------------------------------------------------------
    @cached_property
    def _router_parts(self) -> dict[str, Any] | None:
        """Where the router lies: {"file", "weight", "bias", "scalars", "scalars_file"} (metadata)."""
        scalars, scalars_file, candidates = {}, None, []
        pt = f"{self.state_dir}/router.pt" if self.state_dir else None
        if pt and (self.folder / pt).is_file():
            entries = {t.key: t for t in self.entries_of(pt, _state_prefix(pt))}
            f = self.file(pt)
            if entries and isinstance(f, PickleFile):
                scalars = {k: v for k, v in f.scalars().items() if k in (
                    "num_experts", "input_size", "top_k", "temperature")}
                scalars_file = pt
            candidates.append((pt, entries, "gate_state_dict."))
        if self.kind == "a":
            candidates.insert(0, (self.wrapper_files[0] if self.wrapper_files else None,
                                  {t.key: t for t in self._wrapper["router"]}, "router.gate."))
        if (self.folder / "router.safetensors").is_file():
            candidates.insert(0, ("router.safetensors", {t.key: t for t in self.entries_of("router.safetensors")},
                                  "gate."))
        for rel, entries, prefix in candidates:
            if f"{prefix}weight" in entries:
                return {"file": rel, "weight": entries[f"{prefix}weight"], "bias": entries.get(f"{prefix}bias"),
                        "scalars": scalars, "scalars_file": scalars_file}
        return None

    def router(self) -> dict[str, Any] | None:
        """The trained router (reads its tensors), or None when the artifact has none.

        ``{"weight" [E, H], "bias" [E] or None, "temperature", "top_k", "num_experts",
        "source", "assumed"}``; ``assumed`` lists settings not stored, for which DyLoRA-MoE's
        defaults (temperature 2.0, top-1) are given.
        """
        parts = self._router_parts
        if parts is None:
            return None
        scalars = parts["scalars"]
        return {
            "weight": self._read(parts["weight"]).produce(),
            "bias": self._read(parts["bias"]).produce() if parts["bias"] is not None else None,
            "temperature": float(scalars.get("temperature", ROUTER_DEFAULTS["temperature"])),
            "top_k": int(scalars.get("top_k", ROUTER_DEFAULTS["top_k"])),
            "num_experts": parts["weight"].shape[0],
            "source": parts["file"],
            "assumed": [k for k in ROUTER_DEFAULTS if k not in scalars],
        }

    # -- the mixture, part by part ---------------------------------------------------------
    def variants(self) -> dict[str, dict[str, Any]]:
        """One dense view per expert: the routed mixture is none of them, all of them together."""
        return {f"expert_{e.index}": {"expert": e.index} for e in self.experts()}

    def export_targets(self, choice: Any = None) -> list[ExportTarget]:
        """One dense folder per chosen expert (``choice``: K or ``"all"``); the routed mixture
        itself is not one dense model, so no choice is refused."""
        count = len(self.variants())
        if choice is None:
            raise ExportError(
                f"this is a DyLoRA-MoE mixture of {count} LoRA experts chosen per sequence by a "
                "router; a routed mixture is not one dense model, so it has no single standard "
                f"export. Pass expert=K (--expert K, 0 <= K < {count}) for the exact merge of one "
                "expert, or expert='all' (--expert all) for one folder per expert. "
                "To run the mixture itself, use modelkit.load(ref, routing='router')", self.folder)
        if choice == "all":
            return [self._expert_target(f"expert_{k}", k) for k in range(count)]
        try:
            k = int(choice)
        except (TypeError, ValueError):
            raise ExportError(f"expert must be an integer or 'all', not {choice!r}", self.folder) from None
        if not 0 <= k < count:
            raise ExportError(f"expert {k} does not exist: the artifact has experts 0..{count - 1}", self.folder)
        return [self._expert_target("", k)]

    def _expert_target(self, subfolder: str, k: int) -> ExportTarget:
        return ExportTarget(subfolder, {"expert": k},
                            merged=f"DyLoRA-MoE expert {k} merged into the base (router not used by a dense model)",
                            reference={"routing": f"expert:{k}"},
                            reference_how=f"modelkit.load(routing='expert:{k}')")

    def build_model(self, base: Artifact | None, *, dtype: Any, allow_untrained: bool, load_dense: Any,
                    expert: int | None = None, routing: str | None = None, router_pass: str | None = None,
                    **options: Any) -> BuiltModel | None:
        """The routed module (:mod:`modelkit.formats.dylora_build`) unless ``expert=K`` asks for
        the dense merge of one expert (then None: the view is loaded)."""
        if routing is not None and expert is not None:
            raise LoadError("give routing='expert:K' (the routed module) or expert=K (the dense merge), "
                            "not both", self.folder)
        if expert is not None:
            return None
        from modelkit.formats.dylora_build import build_routed

        return build_routed(self, base, dtype=dtype, allow_untrained=allow_untrained,
                            routing=routing or "router", router_pass=router_pass or "base")

    def unviewed(self) -> dict[str, Any]:
        """The router (no dense model has a place for it), as ``router.gate.*``."""
        parts = self._router_parts
        if parts is None:
            return {}
        out = {"router.gate.weight": self._read(parts["weight"])}
        if parts["bias"] is not None:
            out["router.gate.bias"] = self._read(parts["bias"])
        return out

    # -- the view -------------------------------------------------------------------------
    def view(self, base: Artifact | None = None, *, expert: int | None = None,
             alpha: float | None = None, **options) -> TensorView:
        """The base model's tensors (from the artifact in layout a, else from ``base``);
        ``expert=K`` merges expert K (``alpha`` overrides an unrecorded lora_alpha).
        The router has no place in a dense model and is left out."""
        self.check_options(options)
        if self.kind == "a":
            tensors = {n: self._read(t) for n, t in self._wrapper["base"].items()}
            unplaced, notes = self._wrapper["other"] + self._stray_lora, []
        elif base is None and self.trainer_copy:
            tensors = {n: self._read(t) for n, t in self._wrapper["base"].items()}
            unplaced = list(self._wrapper["other"])
            notes = [f"the base model is not available: its weights are read from the Trainer's copy "
                     f"{self.trainer_copy[0]} (checked against {ADAPTERS_DIR}/ by inspect)"]
        else:
            if base is None:
                raise BaseModelUnavailableError(
                    f"the experts apply to the base model {self.base_name()!r}, which is not "
                    "available; pass --base FOLDER", self.folder)
            base_view = base.view()
            tensors, unplaced, notes = dict(base_view.tensors), list(base_view.unplaced), list(base_view.notes)
        shapes = {n: t.shape for n, t in tensors.items()}
        plans = {e.index: plan_merge(e, shapes) for e in self.experts()}
        for k, plan in plans.items():
            if plan.mismatches:
                raise LoadError(f"expert_{k} does not fit the base model: {plan.mismatches[0]}", self.folder)
            unplaced += plan.unplaced
        if expert is None:
            notes.append(f"DyLoRA-MoE routes each sequence to one of {len(plans)} experts, so no single "
                         "dense model equals it: this view is the base model (expert=K merges expert K)")
        else:
            chosen = self.expert(expert, alpha)
            tensors = merge_adapter(tensors, chosen, plans[chosen.index])
            notes.append(f"expert_{chosen.index} merged (scaling {chosen.scaling}); the other experts and "
                         "the router are not part of this one-expert dense model")
        return TensorView(tensors, unplaced, notes)

    # -- the Trainer's second copy (middle era) ----------------------------------------------
    def trainer_copy_pairs(self, base: Artifact | None) -> list[tuple[StoredTensor, Any]]:
        """(tensor of the Trainer's copy, what it must equal: a StoredTensor of the expert
        files / router, or a LazyTensor of the base model) for every tensor of the copy that
        has a counterpart here."""
        if not self.trainer_copy:
            return []
        lora = {}
        for e in self.experts():
            for m in e.modules.values():
                for t in m.stored:
                    lora[strip_prefix(t.key, WRAPPER_PREFIX, PEFT_PREFIX)] = t
        parts = self._router_parts
        router = {}
        if parts is not None and parts["file"] not in self.trainer_copy:
            router = {"router.gate.weight": parts["weight"], "router.gate.bias": parts["bias"]}
        base_tensors = dict(base.view().tensors) if base is not None else {}
        if base is not None:  # a stored head equal to the embeddings is a tied duplicate
            from modelkit.architecture.bridge import tied_tensors

            for target, source in tied_tensors(base.config()).items():
                if target not in base_tensors and source in base_tensors:
                    base_tensors[target] = base_tensors[source]
        pairs = []
        for t in self.entries_of(self.trainer_copy[0]) if len(self.trainer_copy) == 1 else [
                t for rel in self.trainer_copy for t in self.entries_of(rel)]:
            key = strip_prefix(t.key, WRAPPER_PREFIX, PEFT_PREFIX)
            if key in lora:
                pairs.append((t, lora[key]))
            elif router.get(t.key) is not None:
                pairs.append((t, router[t.key]))
            elif t.key.startswith(WRAPPER_PREFIX) and parse_lora_key(t.key) is None:
                name = base_layer_name(key)
                if name in base_tensors:
                    pairs.append((t, base_tensors[name]))
        return pairs

    def _trainer_copy_findings(self, base: Artifact | None, deep: bool) -> list[Finding]:
        if not self.trainer_copy:
            return []
        copy = self.trainer_copy[0]
        pairs = self.trainer_copy_pairs(base)
        n_stored = sum(len(self.entries_of(rel)) for rel in self.trainer_copy)
        differ, reads = [], 0
        for t, other in pairs:
            shape = tuple(getattr(other, "shape", ()))
            if tuple(t.shape) != shape:
                differ.append((t.key, f"shape {list(t.shape)} vs {list(shape)}"))
                continue
            if deep:
                import torch

                a = self._read(t).produce().float()
                b = (self._read(other) if isinstance(other, StoredTensor) else other).produce().float()
                reads += 1
                if not torch.equal(a, b):
                    differ.append((t.key, f"max |diff| {float((a - b).abs().max()):.3g}"))
        unmatched = n_stored - len(pairs)
        if differ:
            return [error("inconsistent-config",
                          f"the Trainer's {copy} (a second complete copy: base, experts, router) differs from "
                          f"{ADAPTERS_DIR}/ and the router state in {len(differ)} tensor(s), e.g. {differ[0][0]} "
                          f"({differ[0][1]}): which one was trained is unknown", [k for k, _ in differ], file=copy)]
        what = (f"{len(pairs)} of its {n_stored} tensors equal their counterpart" if deep else
                f"its {len(pairs)} tensor(s) with a counterpart have the same shapes; values are not checked "
                "(--deep reads them)")
        rest = (f"; {unmatched} base tensor(s) have no counterpart (the base model is not available)"
                if unmatched else "")
        return [info("duplicated-buffers" if deep else "not-checked",
                     f"the Trainer's {copy} is a second complete copy of the model: {what}{rest}", file=copy)]

    # -- checks ---------------------------------------------------------------------------
    def check(self, base: Artifact | None, deep: bool = False) -> list[Finding]:
        experts = self.experts()
        findings = self._config_findings() + self._count_findings(experts) + self._router_findings(experts)
        findings += self._trainer_copy_findings(base, deep)
        findings += self._expert_findings(experts, deep)
        shapes = ({n: t.shape for n, t in self._wrapper["base"].items()} if self.kind == "a"
                  else {n: t.shape for n, t in base.view().tensors.items()} if base is not None else None)
        if shapes is not None:
            for e in experts:
                findings += fit_findings(e, plan_merge(e, shapes), e.name)
        if self.base is None and (self.kind != "a" or not self.full_config):
            findings.append(warning("base-unavailable", "the artifact records no base model name "
                                    "(base_model_name_or_path); pass --base FOLDER to check it against its base"
                                    + ("" if self.kind != "a" else " (its architecture config is needed)")))
        return findings

    def _config_findings(self) -> list[Finding]:
        findings = []
        if self.cfg.get("_dylora_original_type") and self.cfg.get("model_type") != MODEL_TYPE:
            nulls = [k for k in ("num_experts", "lora_r", "lora_alpha") if k in self.cfg and self.cfg[k] is None]
            findings.append(error(
                "inconsistent-config",
                f"config.json was rewritten by DyLoRA-MoE's evaluation loader: model_type "
                f"{self.cfg.get('model_type')!r} (originally {self.cfg['_dylora_original_type']!r}, per "
                "_dylora_original_type)" + (f", {', '.join(nulls)} null" if nulls else "") + ": transformers now "
                "loads this folder as the plain base model and drops every expert and the router, so 'trained' "
                "scores of that load are the base model's. Restore the config.json the training code wrote "
                "(model_type dylora-moe) before loading or exporting",
                file=str(self.folder / "config.json")))
        elif not self.cfg:
            findings.append(info(
                "not-checked", "there is no config.json (a Trainer checkpoint of the early or middle era): the "
                "base model, lora_alpha and (unless the shapes tell) lora_r are recorded nowhere"
                + (f"; supplied by the user: {self._supplied_text()}" if self.supplied else ""),
                file=str(self.folder / "config.json")))
        elif not is_dylora_config(self.cfg) and self.cfg.get("model_type") is not None:
            what = (f"config.json describes the plain base model (model_type {self.cfg.get('model_type')!r}, "
                    "no DyLoRA-MoE fields)")
            findings.append(error(
                "inconsistent-config",
                f"{what}, but the folder holds a DyLoRA-MoE ({self._evidence()}): a loader that trusts "
                "config.json builds the base model and drops the experts, so 'trained' scores are the "
                "base model's; the settings num_experts, lora_r and lora_alpha are lost",
                file=str(self.folder / "config.json")))
        for label, claims in (("lora_r", self._claims("lora_r", "_dylora_lora_r")),
                              ("lora_alpha", self._claims("lora_alpha", "_dylora_lora_alpha"))):
            if len(set(claims.values())) > 1:
                findings.append(error("inconsistent-config", f"{label} is given twice, differently: "
                                      + ", ".join(f"{k}={v}" for k, v in claims.items())))
        for k, ac in self.adapter_configs.items():
            for field, mine in (("r", self.declared_r), ("lora_alpha", self.declared_alpha)):
                if mine is not None and ac.get(field) is not None and ac[field] != mine:
                    findings.append(error(
                        "inconsistent-config",
                        f"expert_{k}'s adapter_config.json has {field}={ac[field]} but config.json says "
                        f"{mine}; PEFT uses the adapter's value", file=self.expert_sources[k]))
        trained = [e for e in self.experts() if e.modules]
        if self.supplied:
            findings.append(info("not-checked", f"supplied by the user, not recorded in the artifact: "
                                 f"{self._supplied_text()}"))
        if any(e.alpha is None for e in trained):
            findings.append(warning(
                "inconsistent-config",
                "lora_alpha is recorded nowhere (no lora_alpha / _dylora_lora_alpha in config.json"
                + (", none in adapter_config.json" if self.kind == "c" else "") + "): the experts' scale "
                "alpha/r is unknown: give it (lora_alpha=, --lora-alpha) to merge or route the experts"))
        if trained and all(e.r is None for e in trained):
            ranks = sorted({r for e in trained for r in e.ranks})
            findings.append(info("inconsistent-config", f"lora_r is not recorded; the rank is read from "
                                 f"the lora_A shapes (r={', '.join(map(str, ranks))})"))
        return findings

    def _evidence(self) -> str:
        signs = []
        if self.kind == "a" and self._wrapper["lora"]:
            signs.append("foundation_model.* LoRA keys in model.safetensors")
        if self.expert_sources:
            signs.append(f"{ADAPTERS_DIR}/")
        if self.state_dir:
            signs.append(f"{self.state_dir}/")
        return ", ".join(signs) or "DyLoRA-MoE files"

    def _count_claims(self) -> dict[str, int]:
        """Every statement of the number of experts, by where it is made."""
        claims = self._claims("_dylora_num_experts")
        if self.cfg.get("model_type") == MODEL_TYPE and not self._base_owns("num_experts"):
            claims = {**self._claims("num_experts"), **claims}
        parts = self._router_parts
        if parts is not None:
            if "num_experts" in parts["scalars"]:
                claims[f"{parts['scalars_file']} num_experts"] = parts["scalars"]["num_experts"]
            claims[f"router rows ({parts['file']})"] = parts["weight"].shape[0]
        return claims

    def _base_owns(self, field: str) -> bool:
        """Whether ``field`` of a full config belongs to the base architecture (an MoE base's
        own num_experts), not to DyLoRA."""
        if not self.full_config:
            return False
        from modelkit.architecture.facts import declares_field

        try:
            return declares_field(self.base_type(), field)
        except ConfigError:  # unknown architecture: the field is DyLoRA's
            return False

    def _expected_count(self, experts: list[ExpertAdapter]) -> int:
        """How many experts there should be: the one number every claim agrees on, else as
        many as the highest stored index implies."""
        values = set(self._count_claims().values())
        found = [e.index for e in experts]
        return values.pop() if len(values) == 1 else (max(found) + 1 if found else 0)

    def _count_findings(self, experts: list[ExpertAdapter]) -> list[Finding]:
        claims = self._count_claims()
        found = sorted(e.index for e in experts)
        values = set(claims.values())
        findings = []
        if len(values) > 1:
            findings.append(error("inconsistent-config", "the number of experts is given differently: "
                                  + ", ".join(f"{k}={v}" for k, v in claims.items())
                                  + f"; {len(found)} expert(s) are stored"))
        n = self._expected_count(experts)
        absent = [k for k in range(n) if k not in found]
        if absent:
            findings.append(error("missing-tensors",
                                  f"{len(found)} of {n} experts are stored; "
                                  + ", ".join(f"expert_{k}" for k in absent) + " absent: a loader "
                                  "leaves them at their initialisation (LoRA B zero)"))
        extra = [k for k in found if k >= n]
        if extra and len(claims) and len(set(claims.values())) == 1:
            findings.append(error("inconsistent-config", f"{len(found)} experts are stored but the "
                                  f"artifact declares {n}: " + ", ".join(f"expert_{k}" for k in extra)
                                  + " would never be routed to"))
        return findings

    def _router_findings(self, experts: list[ExpertAdapter]) -> list[Finding]:
        parts = self._router_parts
        if parts is None:
            where = {"a": f"no router.gate.* in model.safetensors and no {STATE_DIR}/router.pt",
                     "b": f"no {STATE_DIR}/router.pt with a gate_state_dict",
                     "c": "no router.safetensors"}[self.kind]
            return [error("missing-router", f"the trained router is not in the artifact ({where}): "
                          "a loader starts from an untrained gate, so which expert handles a sequence "
                          "is arbitrary and scores measure that, not the trained model")]
        findings = []
        w, b = parts["weight"], parts["bias"]
        hidden = self.cfg.get("hidden_size") if self.full_config else (
            _json_or_empty(self.base.path / "config.json").get("hidden_size")
            if self.base is not None and self.base.path is not None else None)
        size = parts["scalars"].get("input_size")
        if len(w.shape) != 2 or (hidden is not None and w.shape[1] != hidden) \
                or (size is not None and w.shape[-1] != size) or (b is not None and tuple(b.shape) != w.shape[:1]):
            findings.append(error("inconsistent-config",
                                  f"router gate weight {list(w.shape)}"
                                  + (f", bias {list(b.shape)}" if b is not None else "")
                                  + f" does not fit hidden_size={hidden}" + (f", input_size={size}" if size else ""),
                                  [w.name] + ([b.name] if b is not None else []), file=parts["file"]))
        return findings

    def _expert_findings(self, experts: list[ExpertAdapter], deep: bool) -> list[Finding]:
        findings = []
        for e in experts:
            if e.source is None:
                name = f"expert_{e.index}"
                findings.append(error(
                    "missing-tensors",
                    f"{ADAPTERS_DIR}/{name}/ holds no adapter files: neither in {ADAPTERS_DIR}/{name}/{name}/ "
                    f"(where PEFT's save_pretrained nests a named adapter) nor in {ADAPTERS_DIR}/{name}/; "
                    "a loader that misses them leaves this expert's LoRA B at zero"))
            elif not e.modules and not e.unplaced and self.kind != "a":
                if not any(x.path and x.path.endswith(e.source) for x in self.file_errors):
                    findings.append(error("empty-adapter", f"{e.source} holds no tensors (only "
                                          "requires_grad tensors were saved, and this expert had none): "
                                          f"{e.name} is untrained", file=e.source))
            else:
                findings += adapter_findings(e, e.name, False, (e.name,) if self.kind in ("a", "b") else (),
                                             alone=False)
        stray = self._stray_lora if self.kind == "a" else []
        if stray:
            findings.append(error("unexpected-tensors", f"{len(stray)} LoRA tensor(s) in the wrapper name no "
                                  "expert_k adapter: a loader drops them", [t.name for t in stray]))
        findings += self._coverage_findings(experts)
        trained = [e for e in experts if e.modules]
        if deep:
            zero = [e for e in trained if self.norms(e)["B"] == 0]
            if zero:
                # all untrained: the "trained" mixture is the base model (error). Some untrained is
                # how the real code usually ends (the optimizer only held expert_0): the mixture is
                # still what was trained, but sequences routed there get the base model (warning)
                everything = len(zero) == len(trained)
                findings.append((error if everything else warning)(
                    "untrained-adapter",
                    f"every LoRA B matrix of {', '.join(e.name for e in zero)} is zero: "
                    + ("no expert changes the base, so the routed model is the base model" if everything
                       else "those experts change nothing (the real training code often leaves every "
                       "expert but the first untrained): sequences the router sends there get the base model"),
                    [m.B.name for e in zero for m in e.modules.values() if m.B is not None]))
        elif trained:
            findings.append(not_checked_finding("each expert"))
        return findings

    def _coverage_findings(self, experts: list[ExpertAdapter]) -> list[Finding]:
        """An expert adapting fewer modules than the others (all experts share one config)."""
        union = set().union(*(e.modules for e in experts))
        findings = []
        for e in experts:
            if not e.modules:
                continue  # empty or missing: reported already
            covered = set(e.modules) | {
                lk.module for t in e.unplaced
                if (lk := parse_lora_key(strip_prefix(t.key, WRAPPER_PREFIX, PEFT_PREFIX))) is not None}
            lacking = sorted(union - covered)
            if lacking:
                findings.append(error(
                    "missing-tensors",
                    f"{e.name} has no lora_A/lora_B for {len(lacking)} module(s) the other experts adapt "
                    f"(e.g. {lacking[0]}): a loader leaves them at zero for this expert",
                    [f"{m}.lora_A.{e.name}" for m in lacking]))
        return findings

    def norms(self, expert: ExpertAdapter) -> dict[str, float]:
        """``expert.norms()`` (reads its A and B), once per expert: the untrained check and the
        per-expert table share the reads."""
        cache = self.__dict__.setdefault("_norms", {})
        key = (expert.index, expert.alpha)
        if key not in cache:
            cache[key] = expert.norms()
        return cache[key]

    def _unreadable(self, expert: ExpertAdapter) -> bool:
        return expert.source is not None and any(
            x.path and str(x.path).endswith(expert.source) for x in self.file_errors)

    def expert_rows(self, deep: bool = False) -> list[dict[str, Any]]:
        """One row per expert the artifact declares or stores, then the router (columns
        ``formats.base.EXPERT_COLUMNS``). ``present`` and the structural ``no`` of ``trained``
        (nothing stored, files not found, empty, unplaceable) come from the listing; whether a
        stored expert changes the base needs its data: ``deep`` reads every A and B."""
        experts = {e.index: e for e in self.experts()}
        union = set().union(*(e.modules for e in experts.values())) if experts else set()
        rows = []
        for k in sorted(set(range(self._expected_count(list(experts.values())))) | set(experts)):
            e = experts.get(k)
            row: dict[str, Any] = dict.fromkeys(EXPERT_COLUMNS)
            row.update(expert=f"expert_{k}", tensors=0, parameters=0, bytes=0)
            if e is None:
                rows.append({**row, "present": "MISSING (not stored)", "trained": "no (nothing stored)"})
                continue
            stored = [t for m in e.modules.values() for t in m.stored] + list(e.unplaced) + list(e.replaced.values())
            row.update(tensors=len(stored), parameters=sum(t.numel for t in stored),
                       bytes=sum(t.nbytes for t in stored), file=e.source,
                       rank=", ".join(map(str, e.ranks)) or None, scaling=e.scaling)
            if e.source is None:
                row.update(present=f"MISSING (no adapter files in {ADAPTERS_DIR}/expert_{k}/)",
                           trained="no (nothing stored)")
            elif self._unreadable(e):
                row.update(present="unreadable (see the findings)", trained="not checked (file unreadable)")
            elif not e.modules and e.unplaced:
                row.update(present=f"unplaceable ({len(e.unplaced)} tensor(s) no loader places)",
                           trained="no (a loader drops its tensors)")
            elif not e.modules:
                row.update(present="MISSING (empty file)", trained="no (nothing stored)")
            else:
                row["present"] = ("yes" if len(e.modules) >= len(union)
                                  else f"partial ({len(e.modules)} of {len(union)} modules)")
                if deep:
                    norms = self.norms(e)
                    row.update(norm_B=norms["B"], norm_BA=None if math.isnan(norms["BA"]) else norms["BA"],
                               trained="yes" if norms["B"] > 0 else "no (every LoRA B is zero)")
                else:
                    row["trained"] = "not checked (deep off)"
            rows.append(row)
        router: dict[str, Any] = dict.fromkeys(EXPERT_COLUMNS)
        router.update(expert="router", tensors=0, parameters=0, bytes=0,
                      trained="not checked (weights cannot tell trained from initial)")
        parts = self._router_parts
        if parts is None:
            router["present"] = "MISSING (no trained router in the artifact)"
        else:
            gate = [t for t in (parts["weight"], parts["bias"]) if t is not None]
            router.update(present="yes", tensors=len(gate), parameters=sum(t.numel for t in gate),
                          bytes=sum(t.nbytes for t in gate), file=parts["file"],
                          shape=list(parts["weight"].shape))
        return rows + [router]

    # -- summary --------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        experts = self.experts()
        trained = [e for e in experts if e.modules]
        ranks = sorted({r for e in trained for r in e.ranks})
        alphas = sorted({e.alpha for e in trained if e.alpha is not None})
        scalings = sorted({e.scaling for e in trained if e.scaling is not None})
        out: dict[str, Any] = {
            "experts": len(experts),
            "r": ranks[0] if len(ranks) == 1 else ranks,
            "alpha": alphas[0] if len(alphas) == 1 else (alphas or None),
            "scaling": scalings[0] if len(scalings) == 1 else (scalings or None),
            "targets": ", ".join(sorted({t for e in trained for t in e.targets})),
        }
        parts = self._router_parts
        if parts is None:
            out["router"] = "MISSING"
        else:
            s = parts["scalars"]
            out["router"] = (f"{parts['file']} (gate {'x'.join(map(str, parts['weight'].shape))}, "
                             f"temperature {s.get('temperature', str(ROUTER_DEFAULTS['temperature']) + ' assumed')}, "
                             f"top_k {s.get('top_k', str(ROUTER_DEFAULTS['top_k']) + ' assumed')})")
        step = self.step
        if step is not None:
            out["step"] = step
        out["config"] = ("tiny dylora-moe config" if is_dylora_config(self.cfg) and not self.full_config
                         else "full base config" + (" with DyLoRA fields" if is_dylora_config(self.cfg)
                                                    else ", DyLoRA fields LOST") if self.cfg else "absent")
        if self.trainer_copy:
            out["trainer copy"] = f"{', '.join(self.trainer_copy)} (whole wrapper: base, experts, router)"
        if self.trainer_files:
            out["trainer files"] = ", ".join(self.trainer_files) + " (listed, not loaded)"
        supplied = dict(self.supplied)
        if self.base is not None and self.base_name() is None:
            supplied["base"] = self.base.name
        if supplied:
            out["supplied by the user"] = ", ".join(f"{k}={v}" for k, v in supplied.items())
        out = {k: v for k, v in out.items() if v not in (None, [], "")}
        if self.root is not None:
            out["opened"] = f"{self.folder.relative_to(self.root)}/ of the artifact root {self.root}"
        return out

    @property
    def layout_label(self) -> str:
        """``layout b`` or, opened from a W&B artifact root (code ``d``), ``layout b in a
        W&B artifact root``: one label for both facts."""
        return f"layout {self.kind}" + (" in a W&B artifact root" if self.root is not None else "")

    @property
    def step(self) -> int | None:
        """The training step this was saved at, when recorded."""
        if isinstance(self.cfg.get("_dylora_checkpoint_step"), int):
            return self.cfg["_dylora_checkpoint_step"]
        if checkpoint_step(self.folder) is not None:
            return checkpoint_step(self.folder)
        state = _json_or_empty(self.folder / "trainer_state.json")
        return state.get("global_step") if isinstance(state.get("global_step"), int) else None


class DyLoRA(Format):
    name = "dylora-moe"
    looks_for = ("DyLoRA-MoE: config.json with model_type dylora-moe or _dylora_* fields, peft_adapters/, "
                 "dylo_moe_state/, router.safetensors, or model.safetensors keys prefixed foundation_model. "
                 "(or a W&B artifact root holding best_model/ or checkpoint-*/ of these)")
    priority = 10
    layouts = ("a-tiny-config", "a-full-config", "b", "c", "d")

    def detect(self, folder: Path) -> str | None:
        folder = Path(folder)
        if detect_kind(folder / "best_model") is not None:
            return "d"  # a W&B artifact root (or the trainer's output_dir of layout a)
        kind = detect_kind(folder)
        if kind == "a":
            cfg = _json_or_empty(folder / "config.json")
            return "a-full-config" if "hidden_size" in cfg or "num_hidden_layers" in cfg else "a-tiny-config"
        if kind is not None:
            return kind
        return "d" if inner_folder(folder) is not None else None

    def open(self, folder: Path, layout: str, source=None) -> Artifact:
        folder = Path(folder)
        if layout != "d":
            root = source.root if source is not None and source.root != folder.resolve() else None
            # best_model/ chosen inside a W&B artifact root by sources.resolve: layout d
            return DyLoRAArtifact(folder, "d" if root is not None else layout, source,
                                  kind=layout[0], root=root)
        found = inner_folder(folder)
        if found is None:
            raise UnknownFormatError("no DyLoRA-MoE best_model/ or checkpoint-*/ inside", folder)
        inner, kind = found
        return DyLoRAArtifact(inner, "d", source, kind=kind, root=folder)


register(DyLoRA())
