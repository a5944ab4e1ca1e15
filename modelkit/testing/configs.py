"""Tiny configs of the three families the fixtures use: llama, gemma and qwen3_moe."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from modelkit.testing.tokenizer import MAX_LENGTH, SPECIAL_IDS, vocab_size

if TYPE_CHECKING:
    from transformers import PretrainedConfig

FAMILIES = ("llama", "gemma", "qwen3_moe")

_COMMON: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": MAX_LENGTH,
    "rms_norm_eps": 1e-6,
    "pad_token_id": SPECIAL_IDS["pad"],
    "bos_token_id": SPECIAL_IDS["bos"],
    "eos_token_id": SPECIAL_IDS["eos"],
}

_FAMILY: dict[str, dict[str, Any]] = {
    "llama": {"tie_word_embeddings": False},
    # Gemma ties its head to the embeddings by default; head_dim is always explicit.
    "gemma": {"num_key_value_heads": 1, "tie_word_embeddings": True},
    # Every layer sparse: 4 experts, 2 per token.
    "qwen3_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "tie_word_embeddings": False,
    },
}


def default_tie(family: str) -> bool:
    """Whether ``family`` ties ``lm_head`` to ``embed_tokens`` by default."""
    return bool(_FAMILY[_check(family)]["tie_word_embeddings"])


def tiny_config(family: str, **overrides: Any) -> "PretrainedConfig":
    """A ``PretrainedConfig`` of ``family`` with hidden 32, 2 layers and the tiny vocab."""
    from transformers import AutoConfig

    kwargs = {**_COMMON, "vocab_size": vocab_size(), **_FAMILY[_check(family)], **overrides}
    kwargs.setdefault("dtype", "float32")
    return AutoConfig.for_model(family, **kwargs)


def _check(family: str) -> str:
    if family not in _FAMILY:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    return family
