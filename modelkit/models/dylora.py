"""DyLoRA-MoE as a real transformers model: base causal LM + PEFT LoRA experts + router.

``DyLoRAMoEForCausalLM`` holds the base causal LM wrapped by PEFT with one LoRA adapter
``expert_{k}`` per expert (``foundation_model``, a ``PeftModelForCausalLM``) and the
router ``router.gate = nn.Linear(hidden, E, bias=True)``; its parameter names are those of
the DyLoRA-MoE training wrapper (layout a). Routing is decided once per sequence
(docs/dylora-routing.md has the exact definition):

* ``"router"``: the router reads the base model's last-layer hidden state (after the final
  norm, adapters off); its inference-mode weights (top-k softmax per token, one-hot for
  top-1) are averaged over the sequence's real tokens; the argmax expert runs the sequence;
* ``"expert:K"``: expert K runs every sequence (equal to the dense merge of expert K);
* ``"mean"``: every expert runs, weighted by the sequence-mean of the training-mode router
  weights ``softmax(logits / temperature)``.

One-hot routes go through PEFT's mixed-batch inference (``adapter_names=``, one adapter per
sequence); the weighted mixture adds ``sum_i w_i * scaling_i * B_i A_i x`` to each adapted
layer with forward hooks on PEFT's own LoRA layers.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from modelkit.errors import ConfigError, LoadError

from modelkit.models.dylora_config import (
    MODEL_TYPE,
    ROUTER_PASSES,
    ROUTING_NOTES,
    ROUTINGS,
    TARGET_MODULES,
    DyLoRAMoEConfig,
    _base_type,
    describe_routing,
    expert_name,
    parse_router_pass,
    parse_routing,
)

# --------------------------------------------------------------------------- module


class DyLoRARouter(nn.Module):
    """DyLoRA-MoE's router: one linear gate over the last hidden state."""

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        self.gate = nn.Linear(hidden_size, num_experts, bias=True)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Router logits ``[..., E]`` computed in the gate's dtype."""
        return self.gate(hidden.to(self.gate.weight.dtype))


@dataclass
class Routing:
    """A routing decision for a batch: ``weights[b, i]`` is expert i's LoRA weight for sequence b."""

    weights: torch.Tensor                    # [B, E]: one-hot ("router", "expert:K"), a mixture ("mean",
                                             # "vote": of logits); [B, T, E] per token ("token")
    router_weights: torch.Tensor | None = None  # [B, E]: sequence-mean router weights the choice came from
    mask: torch.Tensor | None = None         # [B, T]: the tokens averaged over

    @property
    def experts(self) -> list[int]:
        """The expert with the largest weight, per sequence."""
        return self.weights.argmax(-1).tolist()


@dataclass
class DyLoRAMoECausalLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus the routing that produced it."""

    routing_weights: torch.FloatTensor | None = None   # [B, E] as applied
    router_weights: torch.FloatTensor | None = None    # [B, E] sequence-mean router weights


class DyLoRAMoEForCausalLM(PreTrainedModel, GenerationMixin):
    """Base causal LM + ``num_experts`` PEFT LoRA experts on q/k/v/o_proj + router.

    ``forward`` routes each sequence (see the module docstring; ``routing_weights=`` [B, E]
    overrides); ``generate`` decides the routing once from the prompt and keeps it for
    every generated token. Inference only (PEFT's mixed-batch path refuses training mode).
    """

    config_class = DyLoRAMoEConfig
    base_model_prefix = "foundation_model"
    main_input_name = "input_ids"
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _keep_in_fp32_modules = ["router"]

    def __init__(self, config: DyLoRAMoEConfig, base_model: PreTrainedModel | None = None):
        from peft import LoraConfig, get_peft_model

        if base_model is None:
            if config.text_config is None:
                raise ConfigError("this dylora-moe config names no base architecture (a tiny config); "
                                  "open the artifact with modelkit.load or from_pretrained(folder)")
            base_model = AutoModelForCausalLM.from_config(config.text_config)
        config.text_config = base_model.config
        super().__init__(config)

        def lora(k: int):
            return LoraConfig(**{"lora_dropout": config.lora_dropout, **config.lora_kwargs(k),
                                 "task_type": "CAUSAL_LM", "inference_mode": True})

        with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            self.foundation_model = get_peft_model(base_model, lora(0), adapter_name=expert_name(0))
        for k in range(1, config.num_experts):
            self.foundation_model.add_adapter(expert_name(k), lora(k))
        self.router = DyLoRARouter(base_model.config.get_text_config().hidden_size, config.num_experts)
        self.router_loaded = False        # set by load_router; "router" / "mean" need it
        self.origins: dict[str, str] = {}  # parameter -> where it came from (modelkit.formats.dylora_build)
        self.post_init()

    # -- parts ------------------------------------------------------------------------------
    @property
    def all_tied_weights_keys(self) -> dict[str, str]:
        """The base LM's tied weights under their names in this module.

        transformers prefixes each child's mapping with the child's name, but PEFT's
        wrapper forwards the attribute to the base LM, whose names sit two levels deeper
        (``foundation_model.base_model.model.``): a tied base (Gemma) then failed in
        ``post_init``. The mapping is derived here instead of stored."""
        lm = self.__dict__.get("_modules", {}).get("foundation_model")
        inner = getattr(lm.get_base_model(), "all_tied_weights_keys", None) if lm is not None else None
        prefix = f"{self.base_model_prefix}.base_model.model."
        return {prefix + k: prefix + v for k, v in (inner or {}).items()}

    @all_tied_weights_keys.setter
    def all_tied_weights_keys(self, value: dict[str, str]) -> None:
        """Ignored: ``post_init`` assigns a mapping computed with the wrong prefix."""

    @property
    def lm(self) -> PreTrainedModel:
        """The base causal LM with PEFT's LoRA layers injected."""
        return self.foundation_model.get_base_model()

    @property
    def expert_names(self) -> list[str]:
        return [expert_name(k) for k in range(self.config.num_experts)]

    @property
    def routing(self) -> str:
        return self.config.routing

    def set_routing(self, routing: str, router_pass: str | None = None) -> None:
        """Switch between ``"router"``, ``"token"``, ``"vote"``, ``"mean"`` and ``"expert:K"``;
        ``router_pass``: ``"base"`` (adapters off) or ``"expert:K"`` (expert K active while
        the router reads the hidden states, as the original did with whatever was active)."""
        if router_pass is not None:
            k_pass = parse_router_pass(router_pass)
            if k_pass is not None and not 0 <= k_pass < self.config.num_experts:
                raise ValueError(f"router_pass={router_pass!r}: no expert {k_pass}")
            self.config.router_pass = router_pass
        kind, k = parse_routing(routing)
        if kind == "expert" and not 0 <= k < self.config.num_experts:
            raise ValueError(f"no expert {k}: this model has {self.config.num_experts}")
        if kind != "expert" and not self.router_loaded:
            raise LoadError(f"routing={routing!r} needs the trained router, which this model "
                            "does not have; use routing='expert:K'")
        self.config.routing = routing

    def merge_and_unload(self) -> PreTrainedModel:
        """The base LM with the expert of ``routing="expert:K"`` merged into its weights by
        PEFT's own ``merge_and_unload`` (the other experts and the router dropped): the dense
        model a one-expert export stands for. Consumes this module (its weights are changed)."""
        kind, k = parse_routing(self.routing)
        if kind != "expert":
            raise ValueError(f"routing={self.routing!r} is a mixture, not one dense model: set routing='expert:K'")
        return self.foundation_model.merge_and_unload(adapter_names=[expert_name(k)])

    def dense_weights(self) -> list | None:
        """What :meth:`merge_and_unload` would make, weight by weight and without merging
        (:func:`modelkit.models.peft_dense.peft_dense_weights` of the expert of
        ``routing="expert:K"``); None for a mixture routing."""
        from modelkit.models.peft_dense import peft_dense_weights

        kind, k = parse_routing(self.routing)
        return peft_dense_weights(self.foundation_model, [expert_name(k)]) if kind == "expert" else None

    def get_input_embeddings(self) -> nn.Module:
        return self.lm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.lm.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.lm.get_output_embeddings()

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing to initialise: every weight is loaded (modelkit.formats.dylora_build)."""

    # -- filling ----------------------------------------------------------------------------
    def load_expert(self, k: int, tensors: Mapping[str, Any]) -> None:
        """Fill expert ``k`` from PEFT-file-named tensors (``base_model.model.M.lora_A.weight``,
        no adapter name; tensors or zero-argument producers / LazyTensors). LoadError unless
        every tensor lands and every LoRA weight of the expert is given."""
        from peft import set_peft_model_state_dict

        name = expert_name(k)
        state = {n: _tensor(v) for n, v in tensors.items()}
        try:
            result = set_peft_model_state_dict(self.foundation_model, state, adapter_name=name)
        except RuntimeError as e:  # size mismatch
            raise LoadError(f"{name} does not fit the model: {str(e).strip().splitlines()[-1]}") from None
        own = f".{name}."
        missing = [m for m in result.missing_keys if ".lora_" in m and own in m]
        unexpected = list(result.unexpected_keys)
        if missing or unexpected:
            raise LoadError(f"{name} does not fit the model: " + "; ".join(p for p in (
                f"{len(unexpected)} tensor(s) have no place: {_few(unexpected)}" if unexpected else "",
                f"{len(missing)} LoRA weight(s) not provided: {_few(missing)}" if missing else "") if p))

    def load_router(self, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float = 2.0,
                    top_k: int = 1, dense: bool = False) -> None:
        """Fill the router gate and its settings; LoadError when the shapes do not fit."""
        gate = self.router.gate
        if tuple(weight.shape) != tuple(gate.weight.shape) or (
                bias is not None and tuple(bias.shape) != tuple(gate.bias.shape)):
            raise LoadError(f"router gate weight {list(weight.shape)}"
                            + (f", bias {list(bias.shape)}" if bias is not None else "")
                            + f" does not fit {self.config.num_experts} experts x hidden {gate.in_features}")
        if not 1 <= int(top_k) <= self.config.num_experts:
            raise LoadError(f"router top_k={top_k} is not between 1 and {self.config.num_experts}")
        with torch.no_grad():
            gate.weight.copy_(weight)
            if bias is not None:
                gate.bias.copy_(bias)
            else:
                gate.bias.zero_()
        self.config.router_temperature = float(temperature)
        self.config.router_top_k = int(top_k)
        self.config.router_dense = bool(dense)
        self.router_loaded = True

    # -- routing ----------------------------------------------------------------------------
    def route(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
              position_ids: torch.LongTensor | None = None, inputs_embeds: torch.Tensor | None = None,
              routing: str | None = None) -> Routing:
        """The routing of a batch of whole sequences under ``routing`` (default: the model's)."""
        kind, k = parse_routing(routing or self.routing)
        ref = input_ids if input_ids is not None else inputs_embeds
        if ref is None:
            raise ValueError("route() needs input_ids or inputs_embeds")
        batch, device = ref.shape[0], ref.device
        if kind == "expert":
            if not 0 <= k < self.config.num_experts:
                raise ValueError(f"no expert {k}: this model has {self.config.num_experts}")
            return Routing(F.one_hot(torch.full((batch,), k, device=device), self.config.num_experts).float())
        if not self.router_loaded:
            raise LoadError(f"routing={kind!r} needs the trained router, which this model does not have")
        mask = real_tokens(input_ids, attention_mask, self._pad_id(), ref.shape[:2], device)
        logits = self.router_logits(input_ids, attention_mask, position_ids, inputs_embeds)  # [B, T, E]
        dense = kind == "mean" or self.config.router_dense
        per_token = (F.softmax(logits / self.config.router_temperature, dim=-1) if dense
                     else _top_k_weights(logits, self.config.router_top_k))
        if kind == "token":
            return Routing(per_token * mask.to(per_token.dtype).unsqueeze(-1), None, mask)
        m = mask.to(per_token.dtype).unsqueeze(-1)
        seq = (per_token * m).sum(1) / m.sum(1).clamp(min=1.0)                    # [B, E]
        if kind in ("mean", "vote"):
            return Routing(seq, seq, mask)
        choice = seq.argmax(-1)                                                    # first index on ties
        return Routing(F.one_hot(choice, self.config.num_experts).to(seq.dtype), seq, mask)

    def router_logits(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.LongTensor | None = None,
                      inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, T, E]`` float32 router logits from the last hidden state (after the final
        norm) of the router pass: the base model (``router_pass="base"``) or the base with
        expert K active (``"expert:K"``)."""
        k = parse_router_pass(self.config.router_pass)
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      inputs_embeds=inputs_embeds, use_cache=False)
        if k is None:
            with self.foundation_model.disable_adapter():
                hidden = self.lm.base_model(**inputs).last_hidden_state
        else:
            batch = (input_ids if input_ids is not None else inputs_embeds).shape[0]
            out = self.foundation_model(adapter_names=[expert_name(k)] * batch, output_hidden_states=True, **inputs)
            hidden = out.hidden_states[-1]
        return self.router(hidden).float()

    def _pad_id(self) -> int:
        pad = self.config.get_text_config().pad_token_id
        return int(pad) if isinstance(pad, int) else 0

    # -- forward / generate -----------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        routing_weights: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> DyLoRAMoECausalLMOutput:
        """The base LM's forward with each sequence's experts applied.

        Without ``routing_weights`` the routing is computed from these inputs, which must
        then be whole sequences (a forward continuing a cache needs the prompt's routing:
        ``generate`` passes it; pass ``routing_weights=previous_output.routing_weights``).
        """
        ref = input_ids if input_ids is not None else inputs_embeds
        return_dict = kwargs.pop("return_dict", None)
        past_key_values = kwargs.pop("cache", past_key_values)   # transformers 5 name (past_key_values is deprecated)
        router_weights = None
        if routing_weights is None:
            if _cache_length(past_key_values) > 0 and parse_routing(self.routing)[0] != "expert":
                raise ValueError("this forward continues a cache, so it does not see the whole sequence "
                                 "the router must read: pass routing_weights= from the forward (or "
                                 "route()) of the prompt; generate() does this itself")
            r = self.route(input_ids, attention_mask, position_ids, inputs_embeds)
            routing_weights, router_weights = r.weights, r.router_weights
        weights = _expand(routing_weights.to(ref.device), ref.shape[0])
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      cache=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
                      use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)
        kind = parse_routing(self.routing)[0]
        if weights.dim() == 3 and weights.shape[1] != ref.shape[1]:
            raise ValueError(f"per-token routing_weights cover {weights.shape[1]} tokens, the input has "
                             f"{ref.shape[1]}")
        if kind == "vote" and weights.dim() == 2 and not _is_one_hot(weights):
            out = self._vote(weights, inputs)
        elif weights.dim() == 2 and _is_one_hot(weights):
            names = [self.expert_names[i] for i in weights.argmax(-1).tolist()]
            out = self.foundation_model(adapter_names=names, **inputs)   # PEFT mixed-batch inference
        else:
            with self.foundation_model.disable_adapter(), _mixture(self.lm, self.expert_names, weights):
                out = self.lm(**inputs)
        output = DyLoRAMoECausalLMOutput(
            loss=out.loss, logits=out.logits, cache=out.cache,
            hidden_states=out.hidden_states, attentions=out.attentions,
            routing_weights=weights, router_weights=router_weights)
        return output.to_tuple() if return_dict is False else output

    def _vote(self, weights: torch.Tensor, inputs: dict[str, Any]):
        """Every expert with a share runs the sequence alone; logits (and loss) mixed by share."""
        out = None
        for i, name in enumerate(self.expert_names):
            w = weights[:, i]
            if not bool((w != 0).any()):
                continue
            o = self.foundation_model(adapter_names=[name] * weights.shape[0], **inputs)
            shape = (-1,) + (1,) * (o.logits.dim() - 1)
            if out is None:
                out, logits = o, o.logits * w.to(o.logits.dtype).view(shape)
            else:
                logits = logits + o.logits * w.to(o.logits.dtype).view(shape)
        out.logits = logits
        if inputs.get("labels") is not None:
            out.loss = self.lm.loss_function(logits, inputs["labels"], vocab_size=logits.shape[-1])
        return out

    def generate(self, inputs: torch.Tensor | None = None, generation_config: Any = None, **kwargs: Any):
        """``GenerationMixin.generate`` with the routing decided once, from the prompt
        (``"token"`` and ``"vote"`` re-route the whole sequence at every step, without a cache)."""
        if parse_routing(self.routing)[0] in ("token", "vote"):
            kwargs["use_cache"] = False
            kwargs.pop("routing_weights", None)
            return super().generate(inputs, generation_config, **kwargs)
        if kwargs.get("routing_weights") is None:
            ids = inputs if inputs is not None else kwargs.get("input_ids")
            embeds = kwargs.get("inputs_embeds")
            if ids is None and embeds is None:
                raise ValueError("DyLoRA-MoE routing reads the prompt: pass input_ids (or inputs_embeds)")
            if ids is not None and ids.dtype.is_floating_point:
                ids, embeds = None, ids
            mask = kwargs.get("attention_mask")
            positions = kwargs.get("position_ids")
            if positions is None and mask is not None and mask.dim() == 2:
                positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as generate() does
            with torch.no_grad():
                kwargs["routing_weights"] = self.route(ids, mask, positions, embeds).weights
        return super().generate(inputs, generation_config, **kwargs)

    # -- loading ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *model_args: Any,
                        config: Any = None, **kwargs: Any) -> "DyLoRAMoEForCausalLM":
        """Open a DyLoRA-MoE artifact (any layout) with modelkit: what
        ``AutoModelForCausalLM.from_pretrained(folder)`` calls for ``model_type: "dylora-moe"``.

        Keywords: ``routing`` (else ``config.routing``), ``base`` (a base model folder when
        the artifact's recorded one is not found), ``dtype`` / ``torch_dtype``,
        ``device_map`` (one device), ``allow_untrained``. Never runs remote code.
        """
        from modelkit.models.loader_slot import artifact_loader

        load = artifact_loader()
        routing = kwargs.pop("routing", None) or getattr(config, "routing", None) or "router"
        router_pass = kwargs.pop("router_pass", None) or getattr(config, "router_pass", None) or "base"
        dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
        if dtype == "auto":
            dtype = None
        device = kwargs.pop("device_map", None)
        if isinstance(device, dict):
            devices = set(device.values())
            device = devices.pop() if len(devices) == 1 else _refuse(f"device_map={device} (one device only)")
        if device == "auto":
            device = None
        unknown = sorted(k for k in kwargs if k not in _IGNORED_LOAD_KWARGS)
        if model_args or unknown:
            raise LoadError(f"a DyLoRA-MoE folder is opened by modelkit, which does not take "
                            f"{', '.join(unknown) or 'positional model arguments'}", pretrained_model_name_or_path)
        result = load(str(pretrained_model_name_or_path), base=kwargs.pop("base", None), dtype=dtype,
                      device=device, routing=routing, allow_untrained=kwargs.pop("allow_untrained", False),
                      router_pass=router_pass)
        model = result.model
        model.load_report = result.report
        return model


# hub and Auto-class bookkeeping from_pretrained receives and has no use for (trust_remote_code
# included: the module is modelkit's own, nothing from the folder is ever imported)
_IGNORED_LOAD_KWARGS = {"cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder",
                        "token", "_from_auto", "_from_pipeline", "trust_remote_code", "adapter_kwargs",
                        "code_revision", "low_cpu_mem_usage", "use_safetensors"}


# --------------------------------------------------------------------------- helpers


def real_tokens(input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, pad_id: int,
                shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """``[B, T]`` bool: the tokens routing averages over.

    A 2-D ``attention_mask`` decides. Without one (lm-eval's HFLM right-pads with 0 and
    passes no mask), a trailing run of ``pad_id`` is padding; the first token always counts.
    """
    if attention_mask is not None and attention_mask.dim() == 2:
        return attention_mask.to(device).bool()
    if input_ids is None:
        return torch.ones(tuple(shape), dtype=torch.bool, device=device)
    trailing = (input_ids == pad_id).flip(-1).long().cumprod(-1).flip(-1).bool()
    mask = ~trailing
    mask[:, 0] = True
    return mask


def _top_k_weights(logits: torch.Tensor, k: int) -> torch.Tensor:
    """DyLoRA's inference-mode router output: softmax over the top-k logits, zero elsewhere."""
    values, index = torch.topk(logits, k, dim=-1)
    return torch.zeros_like(logits).scatter(-1, index, F.softmax(values, dim=-1))


def _is_one_hot(w: torch.Tensor) -> bool:
    return bool(((w == 0) | (w == 1)).all() and (w.sum(-1) == 1).all())


def _expand(weights: torch.Tensor, batch: int) -> torch.Tensor:
    """``[B, E]`` (or per token ``[B, T, E]``) -> ``[batch, ...]`` when generate() repeats
    each sequence (beams, samples)."""
    if weights.dim() not in (2, 3):
        raise ValueError(f"routing_weights must be [batch, num_experts] or [batch, tokens, num_experts], "
                         f"got {list(weights.shape)}")
    n = weights.shape[0]
    if n == batch:
        return weights
    if n and batch % n == 0:
        return weights.repeat_interleave(batch // n, dim=0)
    raise ValueError(f"routing_weights has {n} rows for a batch of {batch}")


def _cache_length(cache: Any) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    try:
        return int(cache[0][0].shape[-2])
    except (TypeError, IndexError, AttributeError):
        return 0


@contextlib.contextmanager
def _mixture(lm: nn.Module, names: list[str], weights: torch.Tensor) -> Iterator[None]:
    """While active, every PEFT LoRA layer of ``lm`` adds ``sum_i w[b, i] * scaling_i * B_i A_i x``
    (per token, ``w[b, t, i]``, for ``[B, T, E]`` weights) to its (adapters-off) output, using
    its own lora_A / lora_B / scaling / dropout."""
    from peft.tuners.lora import LoraLayer

    def hook(module, args, output):
        x = args[0]
        for i, name in enumerate(names):
            if name not in module.lora_A:
                continue
            a, b = module.lora_A[name], module.lora_B[name]
            delta = b(a(module.lora_dropout[name](x.to(a.weight.dtype)))) * module.scaling[name]
            w = weights[..., i].to(output.dtype)
            w = w.reshape(w.shape + (1,) * (output.dim() - w.dim()))
            output = output + w * delta.to(output.dtype)
        return output

    handles = [m.register_forward_hook(hook) for m in lm.modules() if isinstance(m, LoraLayer)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    produce = getattr(value, "produce", None)
    return produce() if produce is not None else value()


def _few(items: Sequence[str], n: int = 4) -> str:
    items = list(items)
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def _refuse(message: str):
    raise LoadError(message)


def _register() -> None:
    """Importing this module puts the real class in the Auto mapping (replacing the stand-in;
    :func:`modelkit.models.register_model` finds it in ``sys.modules`` from then on)."""
    from transformers import AutoConfig

    AutoConfig.register(MODEL_TYPE, DyLoRAMoEConfig, exist_ok=True)
    AutoModelForCausalLM.register(DyLoRAMoEConfig, DyLoRAMoEForCausalLM, exist_ok=True)


_register()
