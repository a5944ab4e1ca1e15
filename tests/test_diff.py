"""``modelkit.diff``: weight-by-weight comparison of two artifacts, streamed, in any formats."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import modelkit
import modelkit.ops.diff  # noqa: F401  (imported first on purpose: modelkit.diff must stay callable)
import modelkit.ops.diff_stats as pairstats
from modelkit.ui.cli import main
from modelkit.testing import reconstruct_expert, write_compressed_moe, write_dylora, write_peft_lora, write_plain_hf

Q1 = "model.layers.1.self_attn.q_proj.weight"



@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return write_plain_hf(tmp_path_factory.mktemp("llama") / "llama", shards=2)


def edited_copy(src: Path, dest: Path, edit) -> Path:
    """A copy of a safetensors checkpoint after ``edit(tensors)`` changed its tensors in place
    (the index follows added and removed names)."""
    shutil.copytree(src, dest)
    shards = sorted(dest.glob("*.safetensors"))
    tensors = {}
    for shard in shards:
        tensors.update({k: (shard.name, v) for k, v in load_file(shard).items()})
    data = {k: v for k, (_, v) in tensors.items()}
    edit(data)
    home = {k: tensors[k][0] if k in tensors else shards[-1].name for k in data}
    for shard in shards:
        save_file({k: v.contiguous() for k, v in data.items() if home[k] == shard.name}, shard,
                  metadata={"format": "pt"})
    index = dest / "model.safetensors.index.json"
    if index.exists():
        meta = json.loads(index.read_text())
        meta["weight_map"] = home
        index.write_text(json.dumps(meta))
    return dest


def row(result, name: str) -> dict:
    return next(r for r in result.rows if r["name"] == name)


# --------------------------------------------------------------------------- plain checkpoints


def test_identical_copies_are_identical(llama, tmp_path):
    copy = shutil.copytree(llama, tmp_path / "copy")
    result = modelkit.diff(llama, copy, progress=False)

    assert result.identical and result.verdict == "identical"
    assert result.summary().startswith("IDENTICAL: all 21 tensors")
    assert result.changed == [] and result.overall_rel_change == 0.0
    frame = result.to_frame()
    assert len(frame) == 21 and frame.identical.all() and (frame.status == "compared").all()
    assert (frame.cosine == 1.0).all() and (frame.frac_changed == 0.0).all()


def test_a_perturbed_layer_shows_exactly_that_change(llama, tmp_path):
    delta = torch.zeros(32, 32)
    delta[:3] = torch.linspace(-0.05, 0.05, 96).view(3, 32)   # rows 0-2 change...
    delta[1, 5] = 0.0                                         # ...but for one element
    w = load_file(next(p for p in llama.glob("*.safetensors") if Q1 in load_file(p)))[Q1]
    b = edited_copy(llama, tmp_path / "b", lambda t: t.__setitem__(Q1, t[Q1] + delta))

    result = modelkit.diff(llama, b, progress=False)

    assert not result.identical and result.changed == [Q1]
    assert result.summary().startswith("DIFFERENT: 1 of 21 shared tensors changed")
    r = row(result, Q1)
    d = (w + delta).double() - w.double()        # by hand, in float64
    assert r["rel_change"] == pytest.approx(float(d.norm() / w.double().norm()), rel=1e-5)
    assert r["cosine"] == pytest.approx(float((w.double() * (w + delta).double()).sum()
                                              / (w.double().norm() * (w + delta).double().norm())), rel=1e-6)
    assert r["max_abs_diff"] == pytest.approx(float(d.abs().max()), rel=1e-6)
    assert r["changed"] == int((d != 0).sum()) and r["frac_changed"] == pytest.approx(int((d != 0).sum()) / w.numel())
    layers = result.by_layer()
    assert layers.loc[1, "changed"] == 1 and layers.changed.sum() == 1
    roles = result.by_role()
    assert roles.loc["attention", "changed"] == 1
    assert row(result, "model.layers.0.self_attn.q_proj.weight")["identical"]


def test_added_removed_shape_and_dtype_changes(llama, tmp_path):
    def edit(t):
        t.pop("model.layers.0.mlp.up_proj.weight")
        t["model.layers.0.mlp.extra.weight"] = torch.ones(4, 4)
        t["model.norm.weight"] = torch.ones(16)
        t[Q1] = t[Q1].to(torch.bfloat16)

    b = edited_copy(llama, tmp_path / "b", edit)
    result = modelkit.diff(llama, b, progress=False)

    status = {r["name"]: r["status"] for r in result.rows}
    assert status["model.layers.0.mlp.up_proj.weight"] == "removed"
    assert status["model.layers.0.mlp.extra.weight"] == "added"
    assert status["model.norm.weight"] == "shape-changed"
    assert status[Q1] == "dtype-changed"
    assert row(result, "model.layers.0.mlp.extra.weight")["norm_b"] == pytest.approx(4.0)
    assert row(result, "model.norm.weight")["note"] == "[32] -> [16]"
    assert row(result, Q1)["rel_change"] < 1e-2 and not row(result, Q1)["identical"]  # bf16 rounding
    text = result.summary()
    assert text.startswith("DIFFERENT:") and "1 added, 1 removed, 1 shape-changed, 1 dtype-changed" in text
    assert "removed (1): model.layers.0.mlp.up_proj.weight" in text


def test_non_finite_values_are_counted_not_raised(llama, tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"

    def edit(t):
        t[name] = t[name].clone()
        t[name][0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])

    b = edited_copy(llama, tmp_path / "b", edit)
    result = modelkit.diff(llama, b, progress=False)

    r = row(result, name)
    assert (r["nonfinite_a"], r["nonfinite_b"], r["changed"]) == (0, 3, 3)
    assert math.isfinite(r["rel_change"]) and r["rel_change"] == pytest.approx(0.0, abs=1e-12)
    assert "non-finite values (NaN/inf): 0 in A, 3 in B" in result.summary()
    json.loads(result.to_json())  # strict JSON: no NaN or Infinity

    same = modelkit.diff(b, b, progress=False)  # NaN at the same place on both sides
    assert same.identical and row(same, name)["nonfinite_a"] == 3


def test_mismatched_architectures_say_the_keys_barely_overlap(llama, tmp_path):
    moe = write_plain_hf(tmp_path / "moe", family="qwen3_moe")
    result = modelkit.diff(llama, moe, progress=False)

    assert "the key sets barely overlap: 15 of 51 names in common" in result.summary()
    assert "A is llama, B is qwen3_moe" in result.summary()
    assert result.count("added") == 30 and result.count("removed") == 6


def test_an_unreadable_shard_is_reported(llama, tmp_path):
    b = shutil.copytree(llama, tmp_path / "b")
    shard = sorted(b.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:1000])
    result = modelkit.diff(llama, b, progress=False)

    assert not result.identical and result.count("removed") > 0
    assert f"B: unreadable file {shard}" in result.summary()
    itself = modelkit.diff(b, b, progress=False)   # no difference seen, but not all was read
    assert itself.verdict == "incomplete" and not itself.identical
    assert itself.summary().startswith("INCOMPLETE: no difference found in")


def test_chunked_and_threaded_reduction_match_one_pass(llama, tmp_path, monkeypatch):
    b = edited_copy(llama, tmp_path / "b", lambda t: t.update(
        {k: v + 1e-3 * torch.randn_like(v) for k, v in t.items() if "mlp" in k}))
    whole = modelkit.diff(llama, b, progress=False, threads=1).to_frame()
    monkeypatch.setattr(pairstats, "CHUNK", 40)   # odd chunks, every tensor split, two workers
    monkeypatch.setattr(pairstats, "FUSED_CHUNK", 40)
    monkeypatch.setattr(pairstats, "WINDOW", 100)  # a mapped window per chunk, chunks across page edges
    split = modelkit.diff(llama, b, progress=False, threads=2).to_frame()

    cols = ["rel_change", "cosine", "max_abs_diff", "frac_changed", "norm_a", "norm_b"]
    assert (whole.changed == split.changed).all()
    assert ((whole[cols] - split[cols]).abs() <= 1e-5 * (whole[cols].abs() + 1e-9)).all().all()


def shifted_copy(src: Path, dest: Path) -> Path:
    """A copy whose safetensors headers end in one extra space: every tensor's bytes start
    at an odd offset (valid safetensors; writers pad, but need not)."""
    shutil.copytree(src, dest)
    for shard in dest.glob("*.safetensors"):
        raw = shard.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        shard.write_bytes((n + 1).to_bytes(8, "little") + raw[8:8 + n] + b" " + raw[8 + n:])
    return dest


@pytest.mark.parametrize("fused_chunk", [None, 1000])
def test_tensors_at_odd_offsets_read_the_same(llama, tmp_path, monkeypatch, fused_chunk):
    shifted = shifted_copy(llama, tmp_path / "shifted")
    if fused_chunk:  # fused chunks larger than the scratch buffers' first size: they grow
        monkeypatch.setattr(pairstats, "CHUNK", 40)
        monkeypatch.setattr(pairstats, "FUSED_CHUNK", fused_chunk)
    assert modelkit.diff(llama, shifted, progress=False).identical
    b = edited_copy(llama, tmp_path / "b", lambda t: t.__setitem__(Q1, t[Q1] * 2))
    assert row(modelkit.diff(shifted, b, progress=False), Q1)["rel_change"] == pytest.approx(1.0, rel=1e-6)


def test_file_pages_are_not_left_mapped(llama, tmp_path):
    b = edited_copy(llama, tmp_path / "b", lambda t: t.__setitem__(Q1, t[Q1] * 2))
    result = modelkit.diff(llama, b, progress=False, rank=True)

    maps = Path("/proc/self/maps").read_text()
    assert not any(str(p) in maps for d in (llama, b) for p in d.glob("*.safetensors"))
    assert row(result, Q1)["rel_change"] == pytest.approx(1.0, rel=1e-6)
    assert row(result, Q1)["numerical_rank"] == 32  # 2W - W = W, full rank


# --------------------------------------------------------------------------- formats


def test_peft_adapter_changes_only_its_target_modules(llama, tmp_path):
    adapter = write_peft_lora(tmp_path / "adapter", llama, r=4, alpha=8, target_modules=("q_proj", "v_proj"))
    result = modelkit.diff(llama, adapter, progress=False, rank=True)
    maps = Path("/proc/self/maps").read_text()   # the merges' memory-mapped reads were released
    assert not any(str(p) in maps for d in (llama, adapter) for p in d.glob("*.safetensors"))

    targeted = {f"model.layers.{i}.self_attn.{m}_proj.weight" for i in (0, 1) for m in "qv"}
    assert set(result.changed) == targeted and result.count("compared") == 21
    lora = load_file(adapter / "adapter_model.safetensors")
    base = {}
    for shard in llama.glob("*.safetensors"):
        base.update(load_file(shard))
    scaling = 8 / 4
    for name in targeted:
        module = name.removesuffix(".weight")
        delta = scaling * lora[f"base_model.model.{module}.lora_B.weight"].double() \
            @ lora[f"base_model.model.{module}.lora_A.weight"].double()
        r = row(result, name)
        assert r["rel_change"] == pytest.approx(float(delta.norm() / base[name].double().norm()), rel=1e-4)
        assert r["numerical_rank"] == 4 and 1.0 <= r["effective_rank"] <= 4.0


@pytest.fixture(scope="module")
def gemma(tmp_path_factory) -> Path:
    return write_plain_hf(tmp_path_factory.mktemp("gemma") / "gemma", family="gemma", tie=False)


@pytest.mark.parametrize("layout,fault", [("b", "adapter-name-twice"), ("b", "empty-expert"), ("c", "untrained")])
def test_a_dylora_expert_that_was_dropped_diffs_identical_to_its_base(gemma, tmp_path, layout, fault):
    trained = write_dylora(tmp_path / "run", layout, gemma, fault=fault)   # expert_1 is the faulty one
    result = modelkit.diff(gemma, trained, options_b={"expert": 1}, progress=False)

    text = result.summary()
    assert result.identical and text.startswith("IDENTICAL: all 21 tensors")
    assert "changes nothing" in text
    if fault == "adapter-name-twice":
        assert "B stores 16 tensor(s) its view cannot place" in text
        assert "lora_A.expert_1.expert_1.weight" in text
        healthy = modelkit.diff(gemma, trained, options_b={"expert": 0}, progress=False)
        assert len(healthy.changed) == 8   # q, k, v, o in both layers


def test_compressed_moe_shows_reconstruction_error_per_layer_and_projection(tmp_path):
    original = write_plain_hf(tmp_path / "original", family="qwen3_moe")
    ckpt = write_compressed_moe(tmp_path / "exp", "checkpoint-N", original)
    result = modelkit.diff(original, ckpt, progress=False)

    table = result.by_projection()
    weights = load_file(original / "model.safetensors")
    for layer in (0, 1):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            data = torch.load(ckpt / f"layer_{layer}" / f"{proj}.pt", weights_only=True)
            num = den = 0.0
            for e, wrapper in enumerate(data["wrappers"]):
                w = weights[f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"].double()
                num += float((reconstruct_expert(data["core"], wrapper).double() - w).norm() ** 2)
                den += float(w.norm() ** 2)
            assert table.loc[(layer, proj), "rel_change"] == pytest.approx(math.sqrt(num / den), rel=1e-5)
            assert table.loc[(layer, proj), "tensors"] == 4
    text = result.summary()
    assert "experts, relative change per layer and projection" in text
    assert result.by_role().loc["router", "changed"] == 2   # the distilled router moved
    assert result.by_role().loc["attention", "changed"] == 0


# --------------------------------------------------------------------------- outputs


def test_plot_writes_a_png(llama, tmp_path):
    b = edited_copy(llama, tmp_path / "b", lambda t: t.__setitem__(Q1, t[Q1] * 1.1))
    result = modelkit.diff(llama, b, progress=False)

    fig = result.plot(tmp_path / "diff.png")
    assert (tmp_path / "diff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert type(fig).__name__ == "Figure" and len(fig.axes) >= 2
    matrix = result.layer_role_matrix()
    assert matrix.loc[1, "attention"] > 0 and matrix.loc[0, "attention"] == 0
    modelkit.diff(llama, llama, progress=False).plot(tmp_path / "same.png")  # nothing changed: still a figure


def test_cli_diff_json_and_plot(llama, tmp_path, capsys):
    b = edited_copy(llama, tmp_path / "b", lambda t: t.__setitem__(Q1, t[Q1] * 1.1))

    assert main(["diff", str(llama), str(b), "--json", "--plot", str(tmp_path / "p.png")]) == 1  # 1 = different
    data = json.loads(capsys.readouterr().out)
    assert data["verdict"] == "different" and data["counts"]["changed"] == 1
    assert [t["name"] for t in data["tensors"] if not t["identical"]] == [Q1]
    assert {"by_layer", "by_role", "by_projection"} <= set(data) and (tmp_path / "p.png").exists()

    assert main(["diff", str(llama), str(llama)]) == 0
    assert capsys.readouterr().out.startswith("IDENTICAL")
