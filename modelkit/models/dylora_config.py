"""The ``dylora-moe`` config class and routing names, kept apart from the model so that
registering the type with transformers' AutoConfig costs no model imports."""
from __future__ import annotations

import re
from typing import Any, Sequence

from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec

from modelkit.errors import ConfigError

MODEL_TYPE = "dylora-moe"
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
ROUTINGS = ("router", "token", "vote", "mean", "expert:K")
ROUTER_PASSES = ("base", "expert:K")
_ROUTING = re.compile(r"^(router|token|vote|mean|expert:(\d+))$")
_ROUTER_PASS = re.compile(r"^(base|expert:(\d+))$")
# DyLoRA-MoE's own field names in config.json -> this config's fields
_DYLORA_FIELDS = {"_dylora_num_experts": "num_experts", "_dylora_lora_r": "lora_r",
                  "_dylora_lora_alpha": "lora_alpha", "_dylora_lora_dropout": "lora_dropout"}
# fields of DyLoRA's tiny / checkpoint configs that never belong to the base architecture
_DYLORA_EXTRAS = {"saved_at", "checkpoint_type", "_note", "auto_map", "model_type"}
ROUTING_NOTES = {
    "router": "the trained router picks one expert per sequence: argmax of its inference-mode "
              "weights averaged over the real tokens (as DyLoRA-MoE's generate() does)",
    "token": "each token runs the expert(s) the router gives it: every adapted layer adds "
             "sum_i r_t,i s_i B_i A_i x_t with the router's inference-mode weights r_t (the "
             "fork-era evaluation forward)",
    "vote": "every expert runs the whole sequence alone; the logits are mixed by each expert's "
            "share of the router's per-token votes (the pre-fork evaluation forward)",
    "mean": "every expert runs, weighted per sequence by the mean over real tokens of "
            "softmax(router logits / temperature)",
    "expert": "expert {k} runs every sequence (the dense merge of expert {k})",
}


def expert_name(k: int) -> str:
    """The PEFT adapter name of expert ``k``."""
    return f"expert_{k}"


def parse_routing(routing: str) -> tuple[str, int | None]:
    """``"router"`` / ``"mean"`` / ``"expert:K"`` -> (kind, K); ValueError otherwise."""
    m = _ROUTING.match(str(routing).strip())
    if m is None:
        raise ValueError(f"unknown routing {routing!r}; use one of {', '.join(ROUTINGS)}")
    return ("expert", int(m.group(2))) if m.group(2) is not None else (m.group(1), None)


def parse_router_pass(router_pass: str) -> int | None:
    """``"base"`` (adapters off) -> None; ``"expert:K"`` (expert K active) -> K; ValueError otherwise."""
    m = _ROUTER_PASS.match(str(router_pass).strip())
    if m is None:
        raise ValueError(f"unknown router_pass {router_pass!r}; use one of {', '.join(ROUTER_PASSES)}")
    return int(m.group(2)) if m.group(2) is not None else None


def describe_routing(routing: str) -> str:
    """One sentence saying what ``routing`` does (for load reports)."""
    kind, k = parse_routing(routing)
    return ROUTING_NOTES[kind].format(k=k)


class DyLoRAMoEConfig(PretrainedConfig):
    """The ``dylora-moe`` config: the base model's config (``text_config``) plus DyLoRA fields.

    Reads every form DyLoRA-MoE wrote: a tiny config (``base_model_name_or_path``,
    ``num_experts``, ``lora_r``, ``lora_alpha``: no architecture, ``text_config`` stays
    None), or a full base config whose ``model_type`` was overwritten, with ``_dylora_*``
    fields (the base architecture is recovered from ``architectures``). ``auto_map`` is
    dropped: no remote code.
    """

    model_type = MODEL_TYPE
    sub_configs_defaults = {"text_config": SubConfigSpec(AutoConfig, model_type="gemma", optional=True)}

    text_config: PretrainedConfig | dict | None = None
    num_experts: int = 4
    lora_r: int | None = 16
    lora_alpha: int | float | None = 32
    lora_dropout: int | float = 0.05
    target_modules: list[str] | None = None
    expert_configs: list[dict] | None = None      # LoraConfig kwargs per expert, when known
    router_temperature: int | float = 2.0
    router_top_k: int = 1
    router_dense: bool = False                    # an immature expert: the router stays dense at inference
    routing: str = "router"
    router_pass: str = "base"                     # adapters active while the router reads the hidden states
    base_model_name_or_path: str | None = None

    def __post_init__(self, **kwargs):
        for old, new in _DYLORA_FIELDS.items():
            if old in kwargs:
                setattr(self, new, kwargs.pop(old))
        kwargs.pop("auto_map", None)
        if self.text_config is None and "hidden_size" in kwargs:
            base_type = _base_type(self.architectures)
            if base_type is not None:
                fields = {k: v for k, v in kwargs.items()
                          if not k.startswith("_dylora_") and k not in _DYLORA_EXTRAS}
                for k in fields:
                    kwargs.pop(k)
                fields.update(architectures=self.architectures, dtype=self.dtype)
                self.text_config = AutoConfig.for_model(base_type, **fields)
        if self.target_modules is None:
            self.target_modules = list(TARGET_MODULES)
        parse_routing(self.routing)
        parse_router_pass(self.router_pass)
        if isinstance(self.text_config, PretrainedConfig):  # keep the base's attention / experts kernels
            for key in ("attn_implementation", "experts_implementation"):
                kwargs.setdefault(key, getattr(self.text_config, f"_{key}", None))
        super().__post_init__(**kwargs)

    def lora_kwargs(self, k: int) -> dict[str, Any]:
        """``peft.LoraConfig`` keyword arguments of expert ``k``."""
        if self.expert_configs is not None:
            return dict(self.expert_configs[k])
        if self.lora_r is None or self.lora_alpha is None:
            raise ConfigError("the config records no lora_r / lora_alpha; open the artifact with "
                              "modelkit.load, which reads them from the stored experts")
        return {"r": int(self.lora_r), "lora_alpha": self.lora_alpha,
                "target_modules": list(self.target_modules)}


def _base_type(architectures: Sequence[str] | None) -> str | None:
    """``["GemmaForCausalLM"]`` -> ``"gemma"`` (transformers' own causal-LM table)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    by_class = {cls: t for t, cls in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items() if isinstance(cls, str)}
    return next((by_class[a] for a in architectures or () if a in by_class), None)
