"""Batched expert materialisation (the export's arithmetic) gives the experts the
per-expert formula and the dense identity-plus-low-rank product give."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import modelkit
from modelkit.formats.open import open_artifact
from modelkit.formats.compressed_moe import materialize
from modelkit.formats.compressed_moe.lowrank import ExpertBatches, batched_experts, materialize_experts
from modelkit.testing import naive_expert


def wrappers(k: int, d_out: int, d_in: int, r: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    core = torch.randn(d_out, d_in, generator=g)
    parts = [0.1 * torch.randn(k, d, r, generator=g) for d in (d_in, d_in, d_out, d_out)]
    return core, parts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_batch_equals_one_by_one_and_the_dense_product(dtype):
    core, (u_in, v_in, u_out, v_out) = wrappers(5, 24, 40, 3)
    batch = materialize_experts(core, u_in, v_in, u_out, v_out, dtype=dtype)
    assert batch.shape == (5, 24, 40) and batch.dtype == dtype
    for e in range(5):
        one = materialize(core, u_in[e], v_in[e], u_out[e], v_out[e], dtype=dtype)
        dense = naive_expert(core.double(), {"U_in": u_in[e], "V_in": v_in[e], "U_out": u_out[e], "V_out": v_out[e]})
        tol = {torch.bfloat16: 1e-2, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
        assert torch.allclose(batch[e].double(), one.double(), rtol=tol, atol=tol)
        assert torch.allclose(batch[e].double(), dense.double(), rtol=tol, atol=tol * 10)


def test_batches_hand_out_each_expert_once_in_any_order():
    core, parts = wrappers(10, 8, 12, 2)
    loads = []

    def load(experts):
        loads.append(list(experts))
        return (core, *(p[experts] for p in parts))

    batches = ExpertBatches(list(range(10)), load, batch=4)
    for e in [0, 1, 2, 3, 4, 9, 5, 6, 7, 8]:
        want = materialize(core, *(p[e] for p in parts))
        assert torch.allclose(batches.get(e, torch.float32), want, atol=1e-6)
    assert loads[:2] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert not batches._ready  # nothing left behind


def test_export_in_batches_writes_the_views_experts(catalog, tmp_path):
    src = catalog["compressed-checkpoint-N"]
    out = tmp_path / "out"
    modelkit.export(src, out, max_shard_size="40KB", progress=False)
    view = open_artifact(src).view(None)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    experts = [n for n in index if ".experts." in n]
    assert experts
    for name in experts:
        with safe_open(str(out / index[name]), "pt") as f:
            written = f.get_tensor(name)
        alone = view[name].produce_as(written.dtype)  # outside the export: one expert at a time
        assert torch.allclose(written.float(), alone.float(), rtol=1e-5, atol=1e-6), name


def test_batch_with_one_core_per_expert():
    core, (u_in, v_in, u_out, v_out) = wrappers(4, 16, 20, 2)
    cores = torch.stack([core + i for i in range(4)])
    batch = materialize_experts(cores, u_in, v_in, u_out, v_out)
    for e in range(4):
        assert torch.allclose(batch[e], materialize(cores[e], u_in[e], v_in[e], u_out[e], v_out[e]), atol=1e-5)
