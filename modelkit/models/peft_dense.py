"""The weights a PEFT model would have after ``merge_and_unload``, one tensor at a time,
without merging it.

PEFT's merge writes into the base weights in place; on a base mapped from its files that
is a copy-on-write page fault per 4 KiB page (0.7 s for 200 MB on this machine), and the
model is consumed. Here each dense weight is computed on its own, as PEFT's vanilla LoRA
merge computes it (``LoraLayer.merge``: ``base.weight + get_delta_weight(adapter)`` for
each adapter in order, with PEFT's own ``get_delta_weight``), and freed after use: export
verification compares them with the stored tensors one by one (``modelkit.ops.verify``).
For a float32 ``Linear`` the caller may give a buffer: ``get_delta_weight``'s arithmetic
(``(B @ A) * scaling``, then ``+ W``) is written into it instead of two new tensors of the
weight's size, bit for bit the same (tests hold it to PEFT's merge); every input (A, B, the
scaling, which adapters) is still PEFT's.
What that rule does not describe (DoRA and the other LoRA variants, LoRA biases,
``modules_to_save`` copies, other tuners, a LoRA weight shared with another parameter)
gives None, and the caller merges with PEFT itself.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

# (name, shape, produce): produce(out=None) -> (the dense weight, the weight before the merge or
# None when nothing was merged into it). ``out``, a float32 tensor of the weight's shape, may
# receive a merged weight (valid until it is written again); a weight may also be returned as
# it is, or in a new tensor. ``produce.merges`` is True where a merge is computed
DenseWeight = tuple[str, tuple[int, ...], Callable[..., tuple[torch.Tensor, torch.Tensor | None]]]


def dense_weights(model: nn.Module) -> list[DenseWeight] | None:
    """``(name, shape, produce)`` for every floating weight of ``model`` made dense by its own
    merge (``produce() -> (tensor, base weight it was merged from, or None)``): a model's own ``dense_weights()`` (DyLoRA-MoE: one expert's), a PEFT model's
    (:func:`peft_dense_weights`), a model without adapters' own parameters. None when only
    a merge of the model itself can say."""
    own = getattr(model, "dense_weights", None)
    if callable(own):
        return own()
    if hasattr(model, "get_base_model"):  # a peft.PeftModel
        return peft_dense_weights(model)
    if hasattr(model, "merge_and_unload"):
        return None
    return [(n, tuple(p.shape), _same(p)) for n, p in model.named_parameters() if p.is_floating_point()]


def peft_dense_weights(peft_model: nn.Module, adapters: Sequence[str] | None = None) -> list[DenseWeight] | None:
    """``(name, shape, produce)`` for every floating weight of ``peft_model`` merged with
    ``adapters`` (default: each layer's active adapters), named as in the merged model
    (``P.base_layer.weight`` is ``P.weight``); ``produce()`` computes ``(tensor, base weight it
    was merged from, or None)``. None when
    the merge is not plain LoRA addition (see the module docstring)."""
    from peft.tuners.lora.layer import Embedding, Linear
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    inner = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    out: list[DenseWeight] = []
    adapted: list[str] = []   # module paths whose weight is base + deltas
    shared = _shared_storage(inner)
    for path, module in inner.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            return None
        if not isinstance(module, BaseTunerLayer):
            continue
        if type(module) not in (Linear, Embedding):
            return None
        names = [a for a in (adapters if adapters is not None else module.active_adapters)
                 if a in module.lora_A or a in module.lora_embedding_A]
        if module.merged or any(a in module.lora_variant or module.lora_bias.get(a, False) for a in names):
            return None
        base = module.get_base_layer()
        if base.weight.data_ptr() in shared:
            return None
        adapted.append(path)
        out.append((f"{path}.weight", tuple(base.weight.shape), _merge(module, base.weight, names)))
        if getattr(base, "bias", None) is not None:
            out.append((f"{path}.bias", tuple(base.bias.shape), _same(base.bias)))
    prefixes = tuple(f"{p}." for p in adapted)
    out += [(n, tuple(p.shape), _same(p)) for n, p in inner.named_parameters()
            if p.is_floating_point() and not n.startswith(prefixes)]
    return out


def _merge(layer: Any, weight: torch.Tensor, adapters: list[str]) -> Callable[..., tuple]:
    def produce(out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        with torch.no_grad():
            dense = None
            for a in adapters:  # LoraLayer.merge: weight += get_delta_weight(a).to(weight.dtype)
                if dense is None and _into(out, layer, a, weight):
                    # get_delta_weight's arithmetic for a float32 Linear, written into ``out``:
                    # the same product and the same rounding, no new tensor of the weight's size
                    torch.matmul(layer.lora_B[a].weight, layer.lora_A[a].weight, out=out)
                    dense = out.mul_(layer.scaling[a]).add_(weight)
                    continue
                delta = layer.get_delta_weight(a).to(weight.dtype)  # a new tensor: added to in place
                dense = delta.add_(weight) if dense is None else dense.add_(delta)  # W + d == d + W exactly
            return (weight.detach(), None) if dense is None else (dense, weight.detach())
    produce.merges = True  # type: ignore[attr-defined]
    return produce


def _into(out: torch.Tensor | None, layer: Any, adapter: str, weight: torch.Tensor) -> bool:
    """Whether PEFT's ``get_delta_weight(adapter)`` of ``layer`` is ``(B @ A) * scaling``
    computed in float32 (a float32 Linear on the CPU, not fan-in-fan-out) and ``out`` a
    float32 tensor of the weight's shape to write the dense weight into."""
    from peft.tuners.lora.layer import Linear

    if out is None or type(layer) is not Linear or layer.fan_in_fan_out or adapter not in layer.lora_A:
        return False
    a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    return (out.shape == weight.shape and out.is_contiguous()
            and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in (out, weight, a, b)))


def _same(p: torch.Tensor) -> Callable[..., tuple]:
    return lambda out=None: (p.detach(), None)


def _shared_storage(model: nn.Module) -> set[int]:
    """Data pointers held by more than one parameter name (tied weights)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[p.data_ptr()] = seen.get(p.data_ptr(), 0) + 1
    return {ptr for ptr, n in seen.items() if n > 1}
