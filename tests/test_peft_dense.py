"""Dense weights of a PEFT model without merging it: equal, bit for bit, to what PEFT's own
``merge_and_unload`` makes; None wherever PEFT's merge is more than adding the deltas."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import modelkit
from modelkit.models.peft_dense import dense_weights
from modelkit.testing.configs import tiny_config


def _as_dict(weights) -> dict[str, torch.Tensor]:
    return {name: produce()[0] for name, _, produce in weights}


def _assert_same_as_merge(model, weights):
    produced = _as_dict(weights)
    merged = model.merge_and_unload()
    expected = {n: p for n, p in merged.named_parameters() if p.is_floating_point()}
    assert produced.keys() == expected.keys()
    for name, tensor in produced.items():
        assert tuple(tensor.shape) == next(s for n, s, _ in weights if n == name)
        assert torch.equal(tensor, expected[name]), name  # bit for bit: the same additions


def test_a_peft_adapter_gives_what_peft_merge_and_unload_makes(catalog):
    model = modelkit.load(catalog["peft-lora"], dtype=torch.float32, merge=False, tokenizer=False).model
    weights = dense_weights(model)
    assert weights is not None
    adapted = [n for n, _, produce in weights if produce()[1] is not None]  # merged from a base weight
    assert adapted and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in adapted)
    assert not [n for n, _, _ in weights if "lora_" in n or "base_layer" in n]
    _assert_same_as_merge(model, weights)


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
