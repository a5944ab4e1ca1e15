"""PEFT LoRA adapters: ``adapter_config.json`` + ``adapter_model.safetensors`` (or ``.bin``).

The adapter stores only ``lora_A`` / ``lora_B`` (and ``modules_to_save`` copies); its view
is the base model's view with each adapted weight merged (see :mod:`.lora`).
"""
from __future__ import annotations

import warnings
from functools import cached_property
from pathlib import Path
from typing import Any

from modelkit.errors import BaseModelUnavailableError, LoadError, ModelkitError
from modelkit.findings import Finding, error, info
from modelkit.formats import register
from modelkit.formats.base import Artifact, BuiltModel, DenseLoader, ExportTarget, Format, Option
from modelkit.formats.lora import (
    LoraAdapter,
    MergePlan,
    collect_adapter,
    merge_adapter,
    parse_lora_key,
    plan_merge,
)
from modelkit.formats.view import TensorView, stored_tensor
from modelkit.io import files
from modelkit.io.tensors import StoredTensor

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_DEFAULT_R = 8        # peft.LoraConfig defaults, used when adapter_config.json omits them
PEFT_DEFAULT_ALPHA = 8


def _few(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


class PeftLoraArtifact(Artifact):
    format = "peft-lora"
    family = "adapter"
    options = (Option("merge", "bool", True, "False: a PeftModel with the adapter unmerged on its base "
                      "(PEFT's own forward) instead of the merged dense model"),)

    @cached_property
    def adapter_config(self) -> dict[str, Any]:
        return self.read_json("adapter_config.json")

    @property
    def weights_file(self) -> str | None:
        return next((f for f in WEIGHT_FILES if (self.folder / f).exists()), None)

    def stored(self) -> list[StoredTensor]:
        return self.entries_of(self.weights_file) if self.weights_file else []

    def base_name(self) -> str | None:
        return self.adapter_config.get("base_model_name_or_path") or None

    def base_needs(self) -> str:
        return "weights"

    def config(self):
        """The base model's config (an adapter has none of its own)."""
        from modelkit.architecture.bridge import load_config

        return load_config(self.architecture())

    def architecture(self):
        """The base model's config.json (a cached audit of it imports no transformers)."""
        if self.base is None or self.base.path is None:
            raise BaseModelUnavailableError(
                f"the adapter's architecture is its base model's ({self.base_name()!r}), "
                "which is not available; pass --base FOLDER", self.folder)
        return self.base.path / "config.json"

    def adapter(self) -> LoraAdapter:
        """The adapter as data: settings, modules, lazy access to A/B (PEFT naming)."""
        return self._adapter

    @cached_property
    def _adapter(self) -> LoraAdapter:
        cfg = self.adapter_config
        rel = self.weights_file
        read = (lambda t: stored_tensor(self.file(t.file), t))
        return collect_adapter(
            self.stored(), "default", read,
            r=cfg.get("r", PEFT_DEFAULT_R), alpha=cfg.get("lora_alpha", PEFT_DEFAULT_ALPHA),
            use_rslora=bool(cfg.get("use_rslora")), fan_in_fan_out=bool(cfg.get("fan_in_fan_out")),
            target_modules=cfg.get("target_modules"), rank_pattern=cfg.get("rank_pattern") or {},
            alpha_pattern=cfg.get("alpha_pattern") or {}, files=[rel] if rel else [])

    def view(self, base: Artifact | None = None, *, merge: bool = True, **options) -> TensorView:
        """The base's view with this adapter merged (the view is the merge: ``merge`` is
        load's choice, see :meth:`build_model`)."""
        self.check_options(options)
        if base is None:
            raise BaseModelUnavailableError(
                f"merging the adapter needs its base model {self.base_name()!r}; pass --base FOLDER",
                self.folder)
        base_view = base.view()
        adapter = self.adapter()
        plan = plan_merge(adapter, {n: t.shape for n, t in base_view.tensors.items()})
        tensors = merge_adapter(base_view.tensors, adapter, plan)
        return TensorView(tensors, base_view.unplaced + plan.unplaced, list(base_view.notes))

    def export_targets(self, choice: Any = None) -> list[ExportTarget]:
        """One folder: the adapter merged, verified against PEFT's own unmerged forward."""
        super().export_targets(choice)  # refuses a choice
        return [ExportTarget("", {}, merged="PEFT LoRA adapter merged into its base",
                             reference={"merge": False},
                             reference_how="modelkit.load(merge=False): PEFT's own forward on the base")]

    def build_model(self, base: Artifact | None, *, dtype: Any, allow_untrained: bool,
                    load_dense: DenseLoader, merge: bool = True, **options: Any) -> BuiltModel | None:
        """With ``merge=False``: a real ``peft.PeftModel`` on the base model (loaded by
        ``load_dense``), every stored adapter tensor placed by PEFT; LoadError when one does
        not fit. Else None (the merged view is the model)."""
        if merge:
            return None
        from peft import PeftConfig, PeftModel, set_peft_model_state_dict

        if base is None:
            raise BaseModelUnavailableError("a PEFT adapter needs its base model; pass base=", self.folder)
        dense = load_dense(base)
        config = PeftConfig.from_pretrained(str(self.folder))
        config.inference_mode = True
        with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
            warnings.simplefilter("ignore", FutureWarning)
            model = PeftModel(dense.model, config, adapter_name="default")
        stored = self.stored()
        weights = {t.name: self.file(t.file).read(t.key) for t in stored}
        result = set_peft_model_state_dict(model, weights, adapter_name="default")
        unexpected = list(result.unexpected_keys)
        missing = [k for k in result.missing_keys if ".lora_" in k and ".default" in k]
        if unexpected or missing:
            raise LoadError("the adapter does not fit its base: " + "; ".join(p for p in (
                f"{len(unexpected)} stored tensor(s) unused: {_few(unexpected)}" if unexpected else "",
                f"{len(missing)} LoRA tensor(s) not provided: {_few(missing)}" if missing else "") if p),
                self.folder)
        model = model.to(dtype if dtype is not None else dense.model.dtype)
        origins = {f"base_model.model.{n}": o for n, o in dense.origins.items()}
        origins |= {t.name: f"stored:{t.file}" for t in stored}
        return BuiltModel(model, "peft-unmerged", {"merge": False}, origins, tied=list(dense.tied),
                          findings=list(dense.findings))

    def check(self, base: Artifact | None, deep: bool = False) -> list[Finding]:
        if self.weights_file is None:
            return [error("missing-tensors", "adapter_config.json but no adapter_model.safetensors "
                          "or adapter_model.bin: there is nothing to apply", file=str(self.folder))]
        if not self.stored():
            if self.file_errors:
                return []  # reported as corrupt-file / unsafe-pickle
            return [error("empty-adapter", f"{self.weights_file} holds no tensors: loading it "
                          "changes nothing, the model is the base model", file=self.weights_file)]
        adapter = self.adapter()
        findings = adapter_findings(adapter, "the adapter", deep)
        if not deep:
            findings.append(not_checked_finding("the adapter"))
        findings += setting_findings(adapter, self.adapter_config, "adapter_config.json")
        if base is not None:
            findings += fit_findings(adapter, plan_merge(adapter, _shapes(base)), "the adapter")
        return findings

    def describe(self) -> dict[str, Any]:
        adapter = self.adapter()
        out: dict[str, Any] = {"r": adapter.r, "alpha": adapter.alpha, "scaling": adapter.scaling,
                               "targets": ", ".join(adapter.targets), "modules": len(adapter.modules)}
        if adapter.use_rslora:
            out["rslora"] = True
        if self.adapter_config.get("modules_to_save"):
            out["saved"] = ", ".join(self.adapter_config["modules_to_save"])
        return out

    def config_sources(self) -> list[Path]:
        return [p for p in [self.folder / "adapter_config.json"] if p.exists()]


def _shapes(base: Artifact) -> dict[str, tuple[int, ...]]:
    return {n: t.shape for n, t in base.view().tensors.items()}


# -- findings shared with DyLoRA-MoE -------------------------------------------------------
def adapter_findings(adapter: LoraAdapter, label: str, deep: bool,
                     expected_names: tuple[str, ...] = (), alone: bool = True) -> list[Finding]:
    """Findings from the adapter alone: misnamed keys, lone A/B, rank vs config, zero B.

    ``expected_names`` are the adapter names a key of this layout carries (none in a PEFT
    file, ``("expert_k",)`` in DyLoRA's full state dicts); ``alone`` is False for one
    expert of a mixture."""
    findings = []
    named, odd = [], []
    for t in adapter.unplaced:
        lk = parse_lora_key(t.key)
        (named if lk is not None and lk.adapters != expected_names else odd).append(t)
    if named:
        names = parse_lora_key(named[0].key).adapters
        twice = len(names) >= 2 and len(set(names)) == 1
        example = "lora_" + named[0].key.split("lora_", 1)[-1]
        dropped_all = not adapter.modules
        findings.append(error(
            "unexpected-tensors",
            f"{len(named)} tensor(s) of {label} carry the adapter name "
            f"{'twice' if twice else 'where the layout has none' if not expected_names else 'wrongly'} "
            f"(`{example}`): the model's parameter is `lora_A.{adapter.name}.weight` (PEFT's loader "
            "inserts the name itself), so a loader finds no parameter of that name and drops them; "
            "those modules keep their untrained weights"
            + ("" if not dropped_all else ": the 'trained' model is the base model" if alone
               else f": {label} stays at B = 0 and changes nothing (with every expert saved so, the "
                    "'trained' model is the base model)"),
            [t.name for t in named]))
    if odd:
        findings.append(error("unexpected-tensors",
                              f"{len(odd)} tensor(s) of {label} have names no loader can place "
                              "(malformed LoRA keys or the same tensor twice): they are dropped",
                              [t.name for t in odd]))
    lone = [m for m in adapter.modules.values() if m.A is None or m.B is None]
    if lone:
        findings.append(error(
            "missing-tensors",
            f"{len(lone)} module(s) of {label} have lora_A without lora_B or the reverse: "
            "a loader leaves the missing half at its initialisation",
            [t.name for m in lone for t in m.stored]))
    bad_rank = [m for m in adapter.modules.values()
                if m.rank is not None and adapter.rank_of(m.module) != m.rank]
    if bad_rank:
        m = bad_rank[0]
        findings.append(error(
            "inconsistent-config",
            f"{label}: the config gives rank {adapter.rank_of(m.module)} but lora_A of "
            f"{len(bad_rank)} module(s) has rank {m.rank} (e.g. {m.module}); PEFT cannot load it",
            [m.A.name for m in bad_rank]))
    if deep and adapter.modules and adapter.all_b_zero():
        findings.append(error(
            "untrained-adapter",
            f"every LoRA B matrix of {label} is zero: it changes nothing and the model is "
            "the base model (never trained, or the trained weights were not saved)",
            [m.B.name for m in adapter.modules.values() if m.B is not None]))
    return findings


def not_checked_finding(label: str) -> Finding:
    """The info that the untrained-adapter check needs ``--deep``."""
    return info("not-checked", f"whether {label} is trained (LoRA B not all zero) is not "
                "checked: --deep reads the LoRA B data")


def setting_findings(adapter: LoraAdapter, recorded: dict[str, Any], where: str) -> list[Finding]:
    """r / lora_alpha absent from ``recorded`` (PEFT then applies its defaults)."""
    missing = [k for k in ("r", "lora_alpha") if k not in recorded]
    if not missing:
        return []
    return [info("inconsistent-config",
                 f"{where} does not record {' or '.join(missing)}; PEFT's default "
                 f"({PEFT_DEFAULT_R}) applies (scaling {adapter.scaling})")]


def fit_findings(adapter: LoraAdapter, plan: MergePlan, label: str) -> list[Finding]:
    """Findings from holding the adapter against its base: shapes and absent modules."""
    findings = []
    if plan.mismatches:
        findings.append(error("shape-mismatch",
                              f"{len(plan.mismatches)} weight(s) of the base do not fit {label}: "
                              "merging or loading it fails", plan.mismatches))
    foreign = [t for t in plan.unplaced if t not in adapter.unplaced
               and all(t is not x for m in plan.incomplete for x in m.stored)]
    if foreign:
        findings.append(error("unexpected-tensors",
                              f"{len(foreign)} tensor(s) of {label} adapt modules the base model "
                              "does not have (or cannot be merged): a loader drops them",
                              [t.name for t in foreign]))
    return findings


class PeftLora(Format):
    name = "peft-lora"
    looks_for = "adapter_config.json (peft_type LORA) with adapter_model.safetensors or adapter_model.bin"
    priority = 30
    layouts = ("safetensors", "bin", "no-weights")

    def detect(self, folder: Path) -> str | None:
        cfg = folder / "adapter_config.json"
        if not cfg.is_file():
            return None
        try:
            data = files.read_json(cfg)  # confined, regular, size-capped (modelkit.io.files)
        except ModelkitError:
            data = {}
        if isinstance(data, dict) and str(data.get("peft_type", "LORA")).upper() != "LORA":
            return None
        if (folder / "adapter_model.safetensors").exists():
            return "safetensors"
        if (folder / "adapter_model.bin").exists():
            return "bin"
        return "no-weights"

    def open(self, folder: Path, layout: str, source=None) -> Artifact:
        return PeftLoraArtifact(folder, layout, source)


register(PeftLora())
