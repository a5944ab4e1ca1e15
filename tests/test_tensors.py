"""Header-only listing of torch pickles agrees with torch.load, and never runs code."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from modelkit.errors import UnsafePickleError
from modelkit.io.tensors import PickleFile, flatten_scalars, flatten_tensors, load_pickle


def _pickles(root: Path) -> list[Path]:
    """Tensor pickles of the catalog (training_args.bin pickles a Python object: listed, never loaded)."""
    return sorted(p for p in root.rglob("*") if p.suffix in (".pt", ".bin") and p.is_file()
                  and "evil" not in str(p) and p.name != "training_args.bin")


def test_skeleton_lists_the_same_tensors_and_scalars_as_torch_load(catalog):
    files = _pickles(catalog["plain-llama"].parent)
    assert len(files) > 20  # layer files, non_moe_weights, routers, experts, .bin checkpoints
    for path in files:
        f = PickleFile(path)
        obj = load_pickle(path)
        truth = {k: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for k, t in flatten_tensors(obj)}
        assert f.skeleton is not None, path
        assert {k: (t.shape, t.dtype) for k, t in f.entries.items()} == truth, path
        assert f.scalars() == dict(flatten_scalars(obj)), path
        assert "obj" not in f.__dict__, "listing must not torch.load the file"


def test_skeleton_refuses_what_is_not_a_plain_tensor_pickle(catalog):
    evil = next(catalog["bad-evil-pickle"].rglob("*.bin"))
    f = PickleFile(evil)
    assert f.skeleton is None  # not plain: left to torch.load(weights_only=True)...
    with pytest.raises(UnsafePickleError):
        f.entries  # ...which refuses it
    assert not any(p.name == "PWNED" for p in evil.parent.parent.rglob("*"))


def test_a_large_layer_file_is_listed_from_its_structure_alone(tmp_path):
    layer = {"core": torch.zeros(64, 64), "metadata": {"num_experts": 128, "rank": 4},
             "wrappers": [{k: torch.zeros(64, 4) for k in ("U_in", "V_in", "U_out", "V_out")}
                          for _ in range(128)]}
    path = tmp_path / "gate_proj.pt"
    torch.save(layer, path)
    t = time.perf_counter()
    entries = PickleFile(path).entries
    skeleton = time.perf_counter() - t
    t = time.perf_counter()
    load_pickle(path)
    full = time.perf_counter() - t
    assert len(entries) == 1 + 4 * 128 and entries["wrappers.5.U_in"].shape == (64, 4)
    print(f"skeleton {skeleton * 1e3:.1f} ms, torch.load {full * 1e3:.1f} ms")
