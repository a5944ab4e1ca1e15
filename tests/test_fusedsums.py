"""Diff's fused one-pass sums agree with float64 and with the eager torch path they
replace; a machine without a compiler gets the same diff from the eager path."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from modelkit.ops import diff_sums as fusedsums
from modelkit.ops.diff import diff
from modelkit.testing import write_plain_hf

needs_kernel = pytest.mark.skipif(not fusedsums.available(), reason="no C compiler: eager path only")


def reference(a: torch.Tensor, b: torch.Tensor) -> tuple:
    a64, b64 = a.double(), b.double()
    d = (b.float() - a.float()).double()
    return (float(a64 @ a64), float(b64 @ b64), float(a64 @ b64), float(d @ d),
            float(d.abs().max()) if d.numel() else 0.0, int(torch.count_nonzero(d)))


@needs_kernel
@pytest.mark.parametrize("variant", fusedsums.LEVELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [1, 1000, 1025, 1 << 19])
def test_fused_sums_match_float64(dtype, n, variant):
    # every compiled variant this CPU runs (plain C, AVX2, AVX-512) gives the same answer
    if variant not in fusedsums.levels():
        pytest.skip(f"this CPU does not run the {variant} variant")
    g = torch.Generator().manual_seed(n)
    a = (torch.randn(n, generator=g) * 0.02).to(dtype)
    b = a.clone()
    b[::3] += (1e-3 * torch.randn(b[::3].shape, generator=g)).to(dtype)
    got, want = fusedsums.pair_sums(a, b, variant), reference(a, b)
    for x, y in zip(got[:4], want[:4]):
        assert math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-12), (got, want)
    assert got[4] == want[4] and got[5] == want[5]


@needs_kernel
def test_the_best_variant_the_cpu_runs_is_used_unless_one_is_named(monkeypatch):
    runs = fusedsums.levels()
    assert runs[0] == "base" and set(runs) <= set(fusedsums.LEVELS)
    assert fusedsums.level() == runs[-1]
    monkeypatch.setenv("MODELKIT_FUSED_SUMS", "base")
    assert fusedsums.level() == "base"
    monkeypatch.setenv("MODELKIT_FUSED_SUMS", "no-such-cpu")
    assert fusedsums.level() == runs[-1]


@needs_kernel
def test_identical_and_nonfinite_chunks():
    a = torch.randn(4096).bfloat16()
    same = fusedsums.pair_sums(a, a.clone())
    assert same[3] == 0.0 and same[4] == 0.0 and same[5] == 0
    b = a.clone()
    b[7] = float("nan")
    assert not math.isfinite(fusedsums.pair_sums(a, b)[1])  # the caller's careful path takes over


def test_what_the_kernel_does_not_take_is_left_to_torch():
    a = torch.randn(16).half()
    assert fusedsums.pair_sums(a, a) is None                      # float16
    assert fusedsums.pair_sums(a.float(), a.double()) is None     # mixed dtypes
    wide = torch.randn(4, 8).bfloat16()
    assert fusedsums.pair_sums(wide[:, ::2].reshape(-1)[:1].expand(4), wide[0, :4]) is None  # not contiguous


def test_diff_is_the_same_with_and_without_the_kernel(tmp_path):
    a = write_plain_hf(tmp_path / "a", "llama", seed=1)
    b = write_plain_hf(tmp_path / "b", "llama", seed=2)
    code = ("import json, sys; from modelkit.ops.diff import diff\n"
            "r = diff(sys.argv[1], sys.argv[2], progress=False)\n"
            "print(json.dumps({x['name']: [x['norm_diff'], x['changed'], x['max_abs_diff'], x['cosine']] for x in r.rows}))")
    runs = []
    for setting in ("on", "off"):
        env = {**os.environ, "MODELKIT_FUSED_SUMS": setting}
        out = subprocess.run([sys.executable, "-c", code, str(a), str(b)], env=env, check=True,
                             capture_output=True, text=True).stdout
        runs.append(__import__("json").loads(out.strip().splitlines()[-1]))
    fused, eager = runs
    assert fused.keys() == eager.keys() and fused
    for name in fused:
        f, e = fused[name], eager[name]
        assert f[1] == e[1] and f[2] == pytest.approx(e[2], rel=1e-6), name
        assert f[0] == pytest.approx(e[0], rel=1e-4) and f[3] == pytest.approx(e[3], abs=1e-6), name
    assert diff(a, a, progress=False).identical


@needs_kernel
def test_fused_size_chunks_with_non_finite_values_take_the_careful_path(monkeypatch):
    # a fused chunk larger than the eager path's working buffers: the careful float64 path
    # still gets all of it
    from modelkit.io.spans import produced_source
    from modelkit.ops import diff_stats

    monkeypatch.setattr(diff_stats, "CHUNK", 64)
    monkeypatch.setattr(diff_stats, "FUSED_CHUNK", 1024)
    a = torch.randn(4096, generator=torch.Generator().manual_seed(3)).bfloat16()
    b = a.clone()
    b[5], b[100] = float("nan"), b[100] + 1
    sources = [produced_source(a), produced_source(b)]
    assert diff_stats._chunk(sources, 2) == 1024
    acc = diff_stats.compare_pair(*sources, diff_stats.Workers(2))
    finite = torch.ones(4096, dtype=torch.bool)
    finite[5] = False
    want = reference(a[finite], b[finite])
    assert (acc.nonfinite_a, acc.nonfinite_b, acc.changed) == (0, 1, 2)
    assert acc.sq_a == pytest.approx(want[0], rel=1e-6) and acc.sq_d == pytest.approx(want[3], rel=1e-6)
    assert acc.max_abs == want[4]
