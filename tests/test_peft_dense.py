"""Dense weights of a PEFT model without merging it: equal, bit for bit, to what PEFT's own
``merge_and_unload`` makes; None wherever PEFT's merge is more than adding the deltas."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import modelkit
from modelkit.models.peft_dense import dense_weights
from modelkit.testing.configs import tiny_config


def _as_dict(weights, into_buffers: bool = False) -> dict[str, torch.Tensor]:
    """Each dense weight; ``into_buffers``: merges written into a float32 tensor given as ``out``."""
    return {name: produce(out=torch.full(shape, float("nan")))[0] if into_buffers else produce()[0]
            for name, shape, produce in weights}


def _assert_same_as_merge(model, weights):
    produced, into = _as_dict(weights), _as_dict(weights, into_buffers=True)
    merged = model.merge_and_unload()
    expected = {n: p for n, p in merged.named_parameters() if p.is_floating_point()}
    assert produced.keys() == expected.keys() == into.keys()
    for name, tensor in produced.items():
        assert tuple(tensor.shape) == next(s for n, s, _ in weights if n == name)
        assert torch.equal(tensor, expected[name]), name  # bit for bit: the same additions
        assert torch.equal(into[name], expected[name]), name  # and so when written into a buffer


def test_a_peft_adapter_gives_what_peft_merge_and_unload_makes(catalog):
    model = modelkit.load(catalog["peft-lora"], dtype=torch.float32, merge=False, tokenizer=False).model
    weights = dense_weights(model)
    assert weights is not None
    adapted = [n for n, _, produce in weights if produce()[1] is not None]  # merged from a base weight
    assert adapted and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in adapted)
    assert not [n for n, _, _ in weights if "lora_" in n or "base_layer" in n]
    _, shape, produce = next(w for w in weights if getattr(w[2], "merges", False))
    buffer = torch.empty(shape)
    assert produce(out=buffer)[0] is buffer           # a float32 Linear's merge fills the given buffer
    _assert_same_as_merge(model, weights)


def test_an_rslora_adapter_merged_into_buffers_is_what_peft_makes(catalog):
    model = modelkit.load(catalog["peft-lora-rslora"], dtype=torch.float32, merge=False, tokenizer=False).model
    _assert_same_as_merge(model, dense_weights(model))


def test_a_dylora_expert_gives_what_its_peft_merge_makes(catalog):
    model = modelkit.load(catalog["dylora-b"], dtype=torch.float32, routing="expert:1", tokenizer=False).model
    weights = dense_weights(model)
    assert weights is not None and not [n for n, _, _ in weights if "router" in n]
    _assert_same_as_merge(model, weights)


def test_a_mixture_routing_has_no_dense_weights(catalog):
    model = modelkit.load(catalog["dylora-b"], dtype=torch.float32, routing="mean", tokenizer=False).model
    assert dense_weights(model) is None


def test_a_model_without_adapters_is_its_own_parameters():
    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    weights = _as_dict(dense_weights(model))
    assert weights.keys() == {n for n, _ in model.named_parameters()}


@pytest.mark.filterwarnings("ignore")  # PEFT and transformers deprecation notes on building these
@pytest.mark.parametrize("settings", [{"use_dora": True}, {"lora_bias": True}, {"modules_to_save": ["lm_head"]}])
def test_merges_that_are_more_than_adding_deltas_are_left_to_peft(settings):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_config(tiny_config("llama", tie_word_embeddings=False))
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **settings))
    assert dense_weights(model) is None
