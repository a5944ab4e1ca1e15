"""The pydantic schemas of every JSON / YAML file modelkit reads from an artifact (see
:mod:`modelkit.schemas`, which validates with them and remembers what passed).

pydantic (not hand-written ``isinstance`` chains) does the checking; the schemas only
constrain the fields modelkit uses and accept every other field as it is (``extra="allow"``),
so a newer transformers or PEFT field never makes a good artifact invalid. Strict types:
``"5"`` is not an int, ``true`` is not a number, ``"yes"`` is not a bool.
Sizes have upper bounds far above any real model (the largest public configs have
~130 layers, 256k vocabularies, 512 experts) so a hostile config cannot make modelkit
build something enormous.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
    TypeAdapter,
    ValidationError,
)

from modelkit.errors import ConfigError

# -- building blocks -------------------------------------------------------------------
Int = Annotated[int, Strict()]
Count = Annotated[int, Strict(), Field(ge=0, le=2**40)]


def _size(upper: int):
    return Annotated[int, Strict(), Field(ge=1, le=upper)]


Finite = Annotated[float, Strict(), Field(allow_inf_nan=False)]   # ints accepted, bools and strings not
Probability = Annotated[float, Strict(), Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Positive = Annotated[float, Strict(), Field(gt=0.0, allow_inf_nan=False)]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
Name = Annotated[str, Strict(), StringConstraints(min_length=1, max_length=4096, pattern=r"^[^\x00]*$")]

LAYERS = _size(4096)
WIDTH = _size(2**20)          # hidden / intermediate sizes
VOCAB = _size(2**23)
HEADS = _size(4096)
EXPERTS = _size(65536)
RANK = _size(65536)
POSITIONS = _size(2**28)

# torch dtype names transformers writes (``torch_dtype`` / ``dtype``)
DTYPES = ("float32", "float16", "bfloat16", "float64", "float8_e4m3fn", "float8_e5m2",
          "int8", "uint8", "int16", "int32", "int64", "bool", "auto")
DType = Literal[DTYPES]  # type: ignore[valid-type]


class _Open(BaseModel):
    """Known fields typed, any other field accepted as is."""

    model_config = ConfigDict(extra="allow", strict=True, populate_by_name=True, protected_namespaces=())


# -- config.json (transformers) including DyLoRA-MoE's fields ----------------------------------
class ModelConfig(_Open):
    model_type: Str | None = None
    architectures: list[Str] | None = None
    torch_dtype: DType | None = None
    dtype: DType | None = None
    num_hidden_layers: LAYERS | None = None
    hidden_size: WIDTH | None = None
    intermediate_size: WIDTH | None = None
    moe_intermediate_size: WIDTH | None = None
    vocab_size: VOCAB | None = None
    num_attention_heads: HEADS | None = None
    num_key_value_heads: HEADS | None = None
    head_dim: WIDTH | None = None
    num_experts: EXPERTS | None = None
    num_local_experts: EXPERTS | None = None
    num_experts_per_tok: EXPERTS | None = None
    max_position_embeddings: POSITIONS | None = None
    tie_word_embeddings: Bool | None = None
    rms_norm_eps: Positive | None = None
    layer_norm_eps: Positive | None = None
    base_model_name_or_path: Str | None = None
    # DyLoRA-MoE (FORMATS.md §3.1): the wrapper's own fields
    lora_r: RANK | None = None
    lora_alpha: Finite | None = None
    lora_dropout: Probability | None = None
    top_k: EXPERTS | None = None
    dylora_num_experts: EXPERTS | None = Field(None, alias="_dylora_num_experts")
    dylora_lora_r: RANK | None = Field(None, alias="_dylora_lora_r")
    dylora_lora_alpha: Finite | None = Field(None, alias="_dylora_lora_alpha")
    dylora_lora_dropout: Probability | None = Field(None, alias="_dylora_lora_dropout")
    dylora_checkpoint_step: Count | None = Field(None, alias="_dylora_checkpoint_step")
    dylora_format: Str | None = Field(None, alias="_dylora_format")
    dylora_base_model: Str | None = Field(None, alias="_dylora_base_model")
    dylora_base_model_name_or_path: Str | None = Field(None, alias="_dylora_base_model_name_or_path")
    name_or_path: Str | None = Field(None, alias="_name_or_path")
    auto_map: dict[Str, Any] | None = None


# -- adapter_config.json (PEFT LoRA; also each DyLoRA expert's) --------------------------
class AdapterConfig(_Open):
    peft_type: Str | None = None
    task_type: Str | None = None
    base_model_name_or_path: Str | None = None
    r: RANK | None = None
    lora_alpha: Finite | None = None
    lora_dropout: Probability | None = None
    use_rslora: Bool | None = None
    use_dora: Bool | None = None
    fan_in_fan_out: Bool | None = None
    inference_mode: Bool | None = None
    bias: Literal["none", "all", "lora_only"] | None = None
    target_modules: list[Name] | Name | None = None
    modules_to_save: list[Name] | None = None
    layers_to_transform: list[Count] | Count | None = None
    rank_pattern: dict[Str, RANK] | None = None
    alpha_pattern: dict[Str, Finite] | None = None


# -- model.safetensors.index.json / pytorch_model.bin.index.json ------------------------------
class WeightIndex(_Open):
    metadata: dict[Str, Any] | None = None
    weight_map: dict[Name, Name]


# -- compressed MoE (FORMATS.md §4.1) -------------------------------------------------
class CompressionSettings(_Open):
    model_name: Str | None = None
    rank: RANK | None = None
    num_steps: Count | None = None
    projections: list[Name] | None = None


class CompressedMetadata(_Open):
    compressed_layer_indices: list[Count] | None = None
    num_compressed_layers: Count | None = None
    total_layers: LAYERS | None = None


class ProjectionSidecar(_Open):
    num_experts: EXPERTS | None = None
    d_in: WIDTH | None = None
    d_out: WIDTH | None = None
    rank: RANK | None = None


class AnyMapping(_Open):
    """Files modelkit reads but does not interpret field by field: a JSON object."""


_ADAPTERS: dict[type, TypeAdapter] = {}


def check(data: dict[str, Any], path: str | Path, schema: type[BaseModel]) -> None:
    """ConfigError (naming ``path`` and up to three offending fields) unless ``data``
    matches ``schema``."""
    adapter = _ADAPTERS.get(schema)
    if adapter is None:
        adapter = _ADAPTERS[schema] = TypeAdapter(schema)
    try:
        adapter.validate_python(data)
    except ValidationError as e:
        raise ConfigError(f"does not match its schema: {describe(e)}", path) from None
    except RecursionError:
        raise ConfigError("nested too deeply", path) from None


_TYPE_TAG = re.compile(r"^(?:[a-z]+\[.*\]|constrained-str|str|int|float|bool|literal\[.*\])$")


def describe(e: ValidationError, limit: int = 3) -> str:
    """The first ``limit`` problems of a ValidationError, one phrase each."""
    parts, seen = [], set()
    for err in e.errors(include_url=False)[:limit]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if not _TYPE_TAG.match(str(x))) or "(top level)"
        if loc in seen:
            continue
        seen.add(loc)
        value = err.get("input")
        shown = repr(value)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        parts.append(f"{loc}: {err.get('msg')} (got {shown})")
    more = e.error_count() - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


__all__ = ["AdapterConfig", "AnyMapping", "CompressedMetadata", "CompressionSettings", "ModelConfig",
           "ProjectionSidecar", "WeightIndex", "check", "describe"]
