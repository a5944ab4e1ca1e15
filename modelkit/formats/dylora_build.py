"""DyLoRA-MoE's routed model built from an opened artifact: the format's
:meth:`~modelkit.formats.base.Artifact.build_model` for a routed load.

The module itself (:class:`~modelkit.models.dylora.DyLoRAMoEForCausalLM`) knows no
artifact; this fills it: the base model through transformers' loading path, each expert
through PEFT, the router, and a check that every stored tensor was used.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from modelkit.errors import LoadError
from modelkit.formats.base import BuiltModel
from modelkit.io.tensors import StoredTensor
from modelkit.models.dylora import DyLoRAMoEConfig, DyLoRAMoEForCausalLM
from modelkit.models.dylora_config import TARGET_MODULES, describe_routing, parse_routing

if TYPE_CHECKING:  # pragma: no cover
    from modelkit.formats.dylora import DyLoRAArtifact as Artifact


def _few(items: Sequence[str], n: int = 4) -> str:
    items = list(items)
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")




def build_routed(artifact: "Artifact", base: "Artifact | None", *, dtype: Any, allow_untrained: bool,
                 routing: str = "router", router_pass: str = "base") -> BuiltModel:
    """:func:`build_dylora_model` with what the load report records about it."""
    model = build_dylora_model(artifact, base, routing=routing, dtype=dtype,
                               allow_empty_experts=allow_untrained, router_pass=router_pass)
    options = {"routing": routing} | ({"router_pass": router_pass} if router_pass != "base" else {})
    return BuiltModel(model, "routed", options, dict(model.origins),
                      notes=[f"routing={routing}: {describe_routing(routing)}"])


def build_dylora_model(artifact: "Artifact", base_artifact: "Artifact | None" = None, routing: str = "router",
                       dtype: "torch.dtype | str | None" = None, *,
                       allow_empty_experts: bool = False, router_pass: str = "base") -> DyLoRAMoEForCausalLM:
    """The routed module filled from a DyLoRA-MoE artifact (``formats.dylora``).

    Base weights come from the artifact's view (the artifact itself in layout a, else
    ``base_artifact``), experts from ``artifact.experts()``, the router from
    ``artifact.router()``. Raises LoadError when routing needs the router and it is
    missing, when anything does not fit, and when a stored tensor is not consumed (a second
    copy of the router is consumed by checking that it equals the one loaded). An expert
    with no stored tensors at all is refused unless ``allow_empty_experts`` (it then
    stays zero: the base model).
    """
    from modelkit.architecture.bridge import disk_to_model
    from modelkit.io.tensors import torch_dtype

    kind, k = _checked_routing(routing, artifact)
    artifact.raise_file_errors()
    experts = sorted(artifact.experts(), key=lambda e: e.index)
    if not experts:
        raise LoadError("the artifact holds no experts", artifact.folder)
    if [e.index for e in experts] != list(range(len(experts))):
        raise LoadError(f"experts {[e.index for e in experts]} are not numbered 0..{len(experts) - 1}",
                        artifact.folder)
    if kind == "expert" and k >= len(experts):
        raise LoadError(f"routing={routing!r}: there is no expert {k} (experts 0..{len(experts) - 1})",
                        artifact.folder)
    router = artifact.router()
    if router is None and kind != "expert":
        raise LoadError(f"routing={routing!r} needs the trained router, which the artifact does not "
                        "hold (missing-router); only routing='expert:K' can load it", artifact.folder)

    # 1. the base model, through transformers' own loading path
    view = artifact.view(base_artifact)
    if view.unplaced:
        names = [f"{t.file}:{t.key}" for t in view.unplaced]
        raise LoadError(f"{len(names)} stored tensor(s) have no place in the model and would be dropped: "
                        f"{_few(names)}", artifact.folder)
    config = artifact.config()
    if "lm_head.weight" in view.tensors and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False  # DyLoRA-MoE unties the head (a stored copy of embed_tokens)
    dtype = torch_dtype(dtype)
    dtype = dtype or config.dtype or torch.float32
    producers = {n: t.produce for n, t in view.tensors.items()}
    base_model, info = disk_to_model(config, producers, dtype, shapes={n: t.shape for n, t in view.tensors.items()})
    if not info.ok:
        raise LoadError(f"the base model did not load completely: {info.summary()} "
                        f"(missing: {_few(info.missing)}; unexpected: {_few(info.unexpected)})", artifact.folder)

    # 2. the module, experts and router
    lora = [_lora_kwargs(e, experts, artifact) for e in experts]
    dcfg = DyLoRAMoEConfig(
        text_config=base_model.config, num_experts=len(experts), lora_r=lora[0]["r"],
        lora_alpha=lora[0]["lora_alpha"], lora_dropout=_declared_dropout(artifact),
        target_modules=list(lora[0]["target_modules"]), expert_configs=lora, routing=routing,
        base_model_name_or_path=artifact.base_name())
    model = DyLoRAMoEForCausalLM(dcfg, base_model)
    consumed: set[tuple[str, str]] = set()
    for e in experts:
        if not e.modules:
            if not allow_empty_experts:
                raise LoadError(f"{e.name} has no stored tensors (empty or missing expert files): it would "
                                "be the base model; pass allow_empty_experts=True to load it anyway",
                                artifact.folder)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if f".lora_B.{e.name}." in n:
                        p.zero_()
            continue
        model.load_expert(e.index, e.tensors())
        consumed |= {(t.file, t.key) for m in e.modules.values() for t in m.stored}
    if router is not None:
        dense = _router_dense(artifact, consumed)
        settings = _router_settings(artifact, router)
        model.load_router(router["weight"], router.get("bias"), settings["temperature"], settings["top_k"],
                          dense or settings["dense"])
        consumed |= _router_copies(artifact, model)
    consumed |= _base_entries(artifact, view)
    consumed |= _trainer_copy(artifact, base_artifact)
    left = [t for t in artifact.stored() if (t.file, t.key) not in consumed]
    if left:
        raise LoadError(f"{len(left)} stored tensor(s) are not used by the model and would be dropped: "
                        f"{_few([f'{t.file}:{t.key}' for t in left])}", artifact.folder)
    model.origins = _origins(model, view, experts, router)
    model.foundation_model.to(dtype)
    try:
        model.set_routing(routing, router_pass)
    except (ValueError, LoadError) as e:
        raise LoadError(str(e), artifact.folder) from None
    return model.eval()


def _checked_routing(routing: str, artifact: "Artifact") -> tuple[str, int | None]:
    try:
        return parse_routing(routing)
    except ValueError as e:
        raise LoadError(str(e), artifact.folder) from None


def _declared_dropout(artifact: "Artifact") -> float:
    """The recorded lora_dropout (inactive at inference; kept for the record)."""
    cfg = artifact.cfg
    value = cfg.get("lora_dropout", cfg.get("_dylora_lora_dropout"))
    return float(value) if isinstance(value, (int, float)) else 0.0


def _origins(model: DyLoRAMoEForCausalLM, view: Any, experts: Sequence[Any],
             router: Mapping[str, Any] | None) -> dict[str, str]:
    """Parameter name -> where its values came from (the view's origins, expert files, router file)."""
    from modelkit.formats.lora import base_layer_name

    sources = {e.name: f"stored:{e.source}" if e.modules else "zero (empty expert)" for e in experts}
    prefix = "foundation_model.base_model.model."
    out = {}
    for name, _ in model.named_parameters():
        if name.startswith("router."):
            out[name] = f"stored:{router.get('source')}" if router is not None else "absent (no router)"
            continue
        inner = name[len(prefix):] if name.startswith(prefix) else name
        lora = re.search(r"\.lora_[AB]\.(expert_\d+)\.", inner)
        if lora:
            out[name] = sources.get(lora.group(1), "?")
        else:
            t = view.tensors.get(base_layer_name(inner))
            out[name] = t.origin if t is not None else "tied"
    return out


def _lora_kwargs(e: Any, experts: Sequence[Any], artifact: "Artifact") -> dict[str, Any]:
    """``peft.LoraConfig`` kwargs of expert ``e`` (an empty expert borrows the others' targets)."""
    cfg = e.peft_config()
    if cfg.get("use_dora"):
        raise LoadError(f"{e.name} is a DoRA adapter; PEFT's per-sequence routing does not support DoRA",
                        artifact.folder)
    if "lora_alpha" not in cfg:
        raise LoadError(f"{e.name}: lora_alpha is recorded nowhere, so its scale alpha/r is unknown",
                        artifact.folder)
    if not cfg.get("target_modules"):
        others = sorted({t for x in experts for t in x.targets})
        cfg["target_modules"] = others or list(TARGET_MODULES)
    if isinstance(cfg["target_modules"], (set, tuple)):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    return cfg


def _router_settings(artifact: "Artifact", router: Mapping[str, Any]) -> dict[str, Any]:
    """Temperature and top-k from the router state; where it stores none, from the config's
    ``router_*`` fields (written by ``DyLoRAMoEForCausalLM.save_pretrained``), else DyLoRA's defaults."""
    cfg = artifact.cfg
    assumed = set(router.get("assumed", ()))
    out = {"temperature": router.get("temperature", 2.0), "top_k": router.get("top_k", 1),
           "dense": bool(cfg.get("router_dense", False))}
    for key in ("temperature", "top_k"):
        if key in assumed and isinstance(cfg.get(f"router_{key}"), (int, float)):
            out[key] = cfg[f"router_{key}"]
    return out


def _router_dense(artifact: "Artifact", consumed: set[tuple[str, str]]) -> bool:
    """Older DyLoRA routers store ``expert_maturity``: with an immature (0) expert the router
    stays dense (softmax) at inference. Consumes the stored maturity vector."""
    dense = False
    for t in artifact.stored():
        if t.key.endswith("expert_maturity"):
            maturity = artifact.file(t.file).read(t.key)
            dense = dense or bool((maturity == 0).any())
            consumed.add((t.file, t.key))
    return dense


_ROUTER_KEYS = {"router.gate.weight": "weight", "router.gate.bias": "bias", "gate.weight": "weight",
                "gate.bias": "bias", "gate_state_dict.weight": "weight", "gate_state_dict.bias": "bias"}


def _router_copies(artifact: "Artifact", model: DyLoRAMoEForCausalLM) -> set[tuple[str, str]]:
    """Every stored router tensor, checked equal to the router loaded (layout a stores two copies)."""
    out = set()
    gate = model.router.gate
    for t in artifact.stored():
        part = _ROUTER_KEYS.get(t.key)
        if part is None:
            continue
        stored = artifact.file(t.file).read(t.key)
        loaded = getattr(gate, part).detach()
        if tuple(stored.shape) != tuple(loaded.shape) or not torch.equal(stored.to(loaded.dtype), loaded):
            raise LoadError(f"two copies of the router disagree: {t.file}:{t.key} differs from the "
                            "router loaded; which one was trained is unknown", artifact.folder)
        out.add((t.file, t.key))
    return out


def _trainer_copy(artifact: "Artifact", base_artifact: "Artifact | None") -> set[tuple[str, str]]:
    """The Trainer's second copy (middle era), consumed once each expert and router tensor is
    checked equal to the one loaded (its base weights are compared by ``check(deep=True)``)."""
    out = set()
    for t, other in artifact.trainer_copy_pairs(base_artifact):
        if isinstance(other, StoredTensor):   # a stored expert / router tensor (else a base LazyTensor)
            a, b = artifact.file(t.file).read(t.key), artifact.file(other.file).read(other.key)
            if tuple(a.shape) != tuple(b.shape) or not torch.equal(a.to(b.dtype), b):
                raise LoadError(f"the Trainer's copy {t.file}:{t.key} differs from {other.file}:{other.key}; "
                                "which one was trained is unknown", artifact.folder)
        out.add((t.file, t.key))
    return out


def _base_entries(artifact: "Artifact", view: Any) -> set[tuple[str, str]]:
    """Stored tensors the base part of the view reads (layout a keeps the base inside)."""
    from modelkit.formats.lora import (
        PEFT_PREFIX,
        base_layer_name,
        parse_lora_key,
        strip_prefix,
    )

    wrapper = "foundation_model."
    out = set()
    for t in artifact.stored():
        if not t.key.startswith(wrapper) or parse_lora_key(t.key) is not None:
            continue
        if base_layer_name(strip_prefix(t.key, wrapper, PEFT_PREFIX)) in view.tensors:
            out.add((t.file, t.key))
    return out
