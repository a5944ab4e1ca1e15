"""The weight-by-weight check of a low-precision export: a stored tensor passes when it is the
reference weight rounded to nearest even, and every value that is not counts."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from modelkit.ops.verify import CHECK_CHUNK, check_stored_weights


def _check(folder: Path, reference: dict[str, torch.Tensor], stored: dict[str, torch.Tensor], dtype: str,
           base: dict[str, torch.Tensor] | None = None):
    """``reference``: the dense weights; ``base``: what they were merged from (else nothing was)."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    save_file(stored, str(folder / "model.safetensors"))
    weights = [(n, tuple(t.shape), (lambda t=t, n=n: (t, (base or {}).get(n)))) for n, t in reference.items()]
    return check_stored_weights(weights, folder, dtype)


finite = st.floats(width=32, allow_nan=False, allow_infinity=False, min_value=-1e4, max_value=1e4)


@settings(max_examples=60, deadline=None)
@given(values=st.lists(finite, min_size=1, max_size=64), dtype=st.sampled_from(["bfloat16", "float16"]))
def test_the_correct_rounding_passes_bit_for_bit(tmp_path_factory, values, dtype):
    reference = torch.tensor(values, dtype=torch.float32)
    result = _check(tmp_path_factory.mktemp("w"), {"w": reference}, {"w": reference.to(getattr(torch, dtype))}, dtype)
    assert result.tensors == 1 and result.misrounded == 0 and result.max_abs_diff == 0.0


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.floats(width=32, min_value=2.0 ** -10, max_value=2.0 ** 10), min_size=2, max_size=64),
       where=st.integers(min_value=0))
def test_a_value_one_unit_off_is_misrounded(tmp_path_factory, values, where):
    reference = torch.tensor(values, dtype=torch.float32)
    stored = reference.to(torch.bfloat16)
    i = where % len(values)
    stored[i] = torch.nextafter(stored[i:i + 1], torch.tensor([float("inf")], dtype=torch.bfloat16))[0]
    result = _check(tmp_path_factory.mktemp("w"), {"w": reference}, {"w": stored}, "bfloat16")
    assert result.misrounded == 1 and result.max_abs_diff > 0


def test_truncation_instead_of_rounding_is_misrounded_in_every_chunk(tmp_path):
    reference = torch.randn(CHECK_CHUNK + 1000)
    truncated = (reference.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)
    differs = truncated != reference.to(torch.bfloat16)
    tie = (reference.view(torch.int32) & 0xFFFF) == 0x8000  # exactly halfway: either neighbour is nearest
    result = _check(tmp_path, {"w": reference}, {"w": truncated}, "bfloat16")
    assert result.misrounded == int((differs & ~tie).sum()) > 0
    assert differs[CHECK_CHUNK:].any()  # the test reaches the second chunk too


def test_nan_wrong_dtype_missing_names_and_shapes(tmp_path):
    reference = torch.ones(8)
    with_nan = reference.to(torch.bfloat16)
    with_nan[3] = float("nan")
    assert _check(tmp_path, {"w": reference}, {"w": with_nan}, "bfloat16").misrounded == 1
    assert _check(tmp_path, {"w": reference}, {"w": reference}, "bfloat16").misrounded == 8  # stored float32
    assert _check(tmp_path, {"w": reference}, {"other": reference.bfloat16()}, "bfloat16") is None
    assert _check(tmp_path, {"w": reference}, {"w": torch.ones(4, 2).bfloat16()}, "bfloat16") is None


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_float32_roundoff_of_another_merge_order_is_not_a_misrounding(tmp_path, dtype):
    """A merge computed in another order can land on the other side of a rounding tie: one
    float32 ulp across it is within the stated slack for a merged weight, and an error for a
    weight nothing was merged into."""
    low = getattr(torch, dtype)
    tie = torch.full((4,), 1.0 + torch.finfo(low).eps / 2)
    below = torch.nextafter(tie, torch.tensor(0.0))   # PEFT's merge: rounds down to 1.0
    above = torch.nextafter(tie, torch.tensor(2.0))   # the export's merge, one float32 ulp away: rounds up
    assert not torch.equal(below.to(low), above.to(low))
    merged = _check(tmp_path, {"w": below}, {"w": above.to(low)}, dtype, base={"w": torch.ones(4)})
    assert merged.misrounded == 0 and merged.max_abs_diff > 0
    assert _check(tmp_path, {"w": below}, {"w": above.to(low)}, dtype).misrounded == 4


def test_an_unmerged_delta_is_outside_the_merge_slack(tmp_path):
    base = torch.randn(1000)
    delta = 1e-3 * torch.randn(1000)  # a small LoRA delta: under the loose logit bound
    reference = base + delta
    result = _check(tmp_path, {"w": reference}, {"w": base.bfloat16()}, "bfloat16", base={"w": base})
    assert result.misrounded > 100


def _write_tied_config(folder: Path) -> None:
    from modelkit.testing.configs import tiny_config

    folder.mkdir(parents=True, exist_ok=True)
    tiny_config("gemma").save_pretrained(str(folder))  # ties lm_head.weight to model.embed_tokens.weight


def test_a_head_the_export_ties_is_checked_against_the_stored_embeddings(tmp_path):
    _write_tied_config(tmp_path)
    embed = torch.randn(16, 8)
    stored = {"model.embed_tokens.weight": embed.bfloat16()}
    same = _check(tmp_path, {"model.embed_tokens.weight": embed, "lm_head.weight": embed.clone()}, stored, "bfloat16")
    assert same.tensors == 2 and same.misrounded == 0
    trained_head = embed + 0.5  # an untied, trained head the export would lose by tying it
    lost = _check(tmp_path, {"model.embed_tokens.weight": embed, "lm_head.weight": trained_head}, stored, "bfloat16")
    assert lost.misrounded == embed.numel()


def test_a_missing_name_the_config_does_not_tie_falls_back(tmp_path):
    from modelkit.testing.configs import tiny_config

    tmp_path.mkdir(exist_ok=True)
    tiny_config("llama").save_pretrained(str(tmp_path))  # llama: untied
    embed = torch.randn(16, 8)
    assert _check(tmp_path, {"model.embed_tokens.weight": embed, "lm_head.weight": embed},
                  {"model.embed_tokens.weight": embed.bfloat16()}, "bfloat16") is None
