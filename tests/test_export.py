"""``modelkit.export``: standard folders stock transformers loads, streamed, atomic, verified."""
from __future__ import annotations

import errno
import hashlib
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import modelkit
from modelkit.errors import BaseModelUnavailableError, CorruptFileError, ExportError, LoadError, ModelkitError, OutputExistsError
from modelkit.units import human_bytes

PROMPT = "def add(a, b):\n    return a + b"

# every catalog entry that is a faithful model, with the export options it needs
EXPORTABLE = {
    "plain-llama": {},
    "base-gemma": {},
    "original-qwen3-moe": {},
    "plain-sharded": {},
    "plain-bin": {},
    "plain-bin-sharded": {},
    "plain-gemma-tied": {},
    "plain-qwen3-moe-sharded": {},
    "peft-lora": {},
    "peft-lora-rslora": {},
    "peft-lora-bin": {},
    "dylora-a-tiny": {"expert": 0},
    "dylora-a-full": {"expert": 1},
    "dylora-b": {"expert": 1},
    "dylora-c": {"expert": 0},
    "dylora-d": {"expert": 1},
    "dylora-missing-router": {"expert": 0},   # one expert needs no router
    "dylora-remote-code": {"expert": 0},      # auto_map ignored, never imported
    "dylora-early-best": {"expert": 1},       # tied bf16 base, stored lm_head = embed_tokens (tied duplicate)
    "dylora-late-best": {"expert": 0, "dtype": "float32"},        # over the bf16 base: 1e-5 needs fp32
    "dylora-late-checkpoint": {"expert": 1, "dtype": "float32"},
    "compressed-checkpoint-N": {},
    "compressed-checkpoint-0": {},
    "compressed-documented": {},
    "compressed-dtype-mismatch": {},
    "compressed-duplicated-buffers": {},      # per-expert core copies: redundant, checked
}

# every catalog entry that must be refused, and how
REFUSED = {
    "peft-lora-untrained": LoadError,
    "peft-lora-base-unavailable": BaseModelUnavailableError,
    "dylora-adapter-name-twice": LoadError,
    "dylora-empty-expert": LoadError,
    "dylora-inconsistent-config": LoadError,
    "dylora-untrained": LoadError,
    "dylora-config-rewritten": LoadError,
    "dylora-loader-rewrote-config": LoadError,
    "dylora-early-checkpoint": LoadError,     # alpha (and the base) recorded nowhere: --lora-alpha, --base
    "compressed-no-non-moe": LoadError,
    "compressed-missing-projection": LoadError,
    "compressed-base-unavailable": BaseModelUnavailableError,
    "bad-truncated": CorruptFileError,
    "bad-absurd-header": CorruptFileError,
    "bad-offsets-outside": CorruptFileError,
    "bad-overlapping-offsets": CorruptFileError,
    "bad-malformed-config": ModelkitError,
    "bad-evil-pickle": ModelkitError,
    "bad-escaping-symlink": ModelkitError,
    "bad-index-outside": ModelkitError,
}


def tree_hash(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (by relative path)."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def leftovers(out: Path) -> list[str]:
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def logits(model, tokenizer, text: str = PROMPT) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model.float()(input_ids=ids).logits


def stock_load(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(str(folder))


def source_reference(ref: Path, options: dict):
    """The source as modelkit loads it (a DyLoRA expert through the routed module)."""
    opts = {k: v for k, v in options.items() if k != "dtype"}
    if "expert" in opts:
        opts = {"routing": f"expert:{opts.pop('expert')}"}
    model, tok, _ = modelkit.load(ref, dtype=torch.float32, **opts)
    return model, tok


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", sorted(EXPORTABLE))
def test_round_trip(catalog, tmp_path, name):
    src = catalog[name]
    before = tree_hash(src.parent if name.startswith("dylora-a") else src)
    out = tmp_path / "out"
    result = modelkit.export(src, out, verify=True, progress=False, **EXPORTABLE[name])
    assert result.ok and result.written, result.summary()
    v = result.verification
    assert v["ok"] and v["max_abs_diff"] <= 1e-5
    # float32: 1e-5 absolute, or the tighter relative bound against an independent float64 reference
    assert v["tolerance"] == 1e-5 or v["dtype"] != "float32" or (
        v["reference"].startswith("independent float64") and v["tolerance"] < 1e-5)

    # the folder is what transformers 5 writes: on-disk names, index, clean config
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] != "dylora-moe" and "auto_map" not in config
    assert not [k for k in config if k.startswith("_dylora")]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert all(s.startswith("model-") and "-of-" in s for s in shards)
    from modelkit.architecture.bridge import expected_tensors

    assert set(index["weight_map"]) == set(expected_tensors(out / "config.json"))
    record = json.loads((out / "modelkit_export.json").read_text())
    assert record["source"]["fingerprint"] == result.source_fingerprint
    assert record["verification"]["ok"] is True
    assert record["modelkit_version"] == modelkit.__version__
    assert not leftovers(out)
    assert not list(src.rglob("REMOTE_CODE_EXECUTED"))

    # independent check: stock loading == modelkit.load of the source
    exported, tok = stock_load(out)
    reference, _ = source_reference(src, EXPORTABLE[name])
    diff = (logits(exported, tok) - logits(reference, tok)).abs().max().item()
    assert diff <= 1e-5, diff
    assert tree_hash(src.parent if name.startswith("dylora-a") else src) == before


def test_moe_export_uses_per_expert_names(catalog, tmp_path):
    out = tmp_path / "moe"
    modelkit.export(catalog["compressed-checkpoint-N"], out, progress=False)
    names = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"])
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in names
    assert "model.layers.0.mlp.gate.weight" in names
    assert not any("gate_up_proj" in n or "shared_core" in n for n in names)


def test_compressed_export_keeps_trained_router(catalog, tmp_path):
    from safetensors import safe_open

    from modelkit.io.tensors import load_pickle

    src = catalog["compressed-checkpoint-N"]
    out = tmp_path / "moe"
    modelkit.export(src, out, progress=False)
    router = load_pickle(src / "non_moe_weights.pt")["model.layers.1.mlp.gate.weight"]
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.gate.weight"
    with safe_open(str(out / index[name]), "pt") as f:
        assert torch.equal(f.get_tensor(name), router)


def test_dylora_expert_export_is_the_exact_merge(catalog, tmp_path):
    """Expert K's folder holds W + (alpha/r) B_K A_K for every adapted projection."""
    from safetensors import safe_open

    src = catalog["dylora-b"]
    out = tmp_path / "e1"
    modelkit.export(src, out, expert=1, progress=False)
    experts = torch.load(src / "peft_adapters" / "expert_1.pt", weights_only=True)
    base = catalog["base-gemma"]
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.0.self_attn.v_proj.weight"
    prefix = "base_model.model.model.layers.0.self_attn.v_proj"
    a = experts[f"{prefix}.lora_A.expert_1.weight"]
    b = experts[f"{prefix}.lora_B.expert_1.weight"]
    with safe_open(str(base / "model.safetensors"), "pt") as f:
        w = f.get_tensor(name)
    with safe_open(str(out / index[name]), "pt") as f:
        got = f.get_tensor(name)
    torch.testing.assert_close(got, w + (8 / 4) * b @ a, rtol=0, atol=1e-6)


def test_dylora_without_expert_is_refused(catalog, tmp_path):
    out = tmp_path / "mix"
    with pytest.raises(ExportError, match="routed mixture is not one dense model"):
        modelkit.export(catalog["dylora-b"], out, progress=False)
    with pytest.raises(ExportError, match="does not exist"):
        modelkit.export(catalog["dylora-b"], out, expert=7, progress=False)
    assert not out.exists() and not leftovers(out)


def test_dylora_expert_all(catalog, tmp_path):
    out = tmp_path / "all"
    result = modelkit.export(catalog["dylora-c"], out, expert="all", verify=True, progress=False)
    assert result.ok and [Path(e.out).name for e in result.experts] == ["expert_0", "expert_1"]
    assert all(e.verification["ok"] for e in result.experts)
    record = json.loads((out / "modelkit_export.json").read_text())
    assert set(record["experts"]) == {"expert_0", "expert_1"}
    m0, tok = stock_load(out / "expert_0")
    m1, _ = stock_load(out / "expert_1")
    assert not torch.allclose(logits(m0, tok), logits(m1, tok))  # different experts, different models
    assert json.loads((out / "expert_1" / "modelkit_export.json").read_text())["expert"] == 1


def test_bad_options_are_refused_before_writing(catalog, tmp_path):
    with pytest.raises(ExportError, match="mixture artifacts only"):
        modelkit.export(catalog["plain-llama"], tmp_path / "x", expert=0, progress=False)
    with pytest.raises(ExportError, match="not a size"):
        modelkit.export(catalog["plain-llama"], tmp_path / "x", max_shard_size="lots", progress=False)
    with pytest.raises(LoadError, match="unknown floating dtype"):
        modelkit.export(catalog["plain-llama"], tmp_path / "x", dtype="int8", progress=False)
    assert not (tmp_path / "x").exists() and not leftovers(tmp_path / "x")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_cast_with_looser_tolerance(catalog, tmp_path, dtype):
    from safetensors import safe_open

    out = tmp_path / dtype
    result = modelkit.export(catalog["peft-lora"], out, dtype=dtype, verify=True, progress=False)
    assert result.ok, result.summary()
    v = result.verification
    assert v["dtype"] == dtype and v["tolerance"] > 1e-5 and v["max_abs_diff"] <= v["tolerance"]
    # every stored tensor is the source's merged weight rounded to the dtype, bit for bit
    assert v["weights_compared"] == 21 and v["weights_misrounded"] == 0 and v["weights_max_abs_diff"] == 0.0
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype
    with safe_open(str(next(out.glob("model-*.safetensors"))), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {getattr(torch, dtype)}


def test_low_precision_verify_catches_a_dropped_merge(catalog, tmp_path, monkeypatch):
    """A bf16 export that silently skips one LoRA merge hides under the loose bound, but
    not under the comparison with the source rounded the same way."""
    from safetensors import safe_open

    ex = importlib.import_module("modelkit.io.shards")  # the shard writer export streams through
    name = "model.layers.0.self_attn.q_proj.weight"
    with safe_open(str(catalog["plain-llama"] / "model.safetensors"), "pt") as f:
        unmerged = f.get_tensor(name)
    real = ex.produce

    def produce(n, lt, dtype):
        return unmerged.to(dtype) if n == name else real(n, lt, dtype)

    monkeypatch.setattr(ex, "produce", produce)
    out = tmp_path / "bad"
    result = modelkit.export(catalog["peft-lora"], out, dtype="bfloat16", verify=True, progress=False)
    v = result.verification
    assert not result.ok and not out.exists()
    assert v["max_abs_diff"] <= v["tolerance"]  # the loose bound alone would have passed it
    assert v["weights_misrounded"] > 0 and "misrounded" in result.summary()


def test_low_precision_verify_catches_truncated_rounding(catalog, tmp_path, monkeypatch):
    """bf16 weights truncated instead of rounded to nearest are within the loose logit bound;
    the weight-by-weight check against the source names them."""
    ex = importlib.import_module("modelkit.io.shards")
    real = ex.produce

    def truncated(n, lt, dtype):
        x = real(n, lt, torch.float32)
        return (x.view(torch.int32) & -65536).view(torch.float32).to(dtype)  # drop the low 16 bits

    monkeypatch.setattr(ex, "produce", truncated)
    result = modelkit.export(catalog["peft-lora"], tmp_path / "bad", dtype="bfloat16", verify=True,
                             progress=False)
    v = result.verification
    assert not result.ok and v["max_abs_diff"] <= v["tolerance"]
    assert v["weights_misrounded"] > 0


@pytest.mark.parametrize("name,options,check", [
    ("dylora-b", {"expert": 1}, "weights"),          # PEFT's merge of one expert of the routed module
    ("plain-gemma-tied", {}, "weights"),             # the tied head is stored once, compared once
    ("plain-qwen3-moe-sharded", {}, "logits"),       # experts fused in memory: names are not the stored ones
    ("compressed-checkpoint-N", {}, "logits"),       # a float64 independent reference
])
def test_low_precision_verify_checks_each_kind_of_source(catalog, tmp_path, name, options, check):
    result = modelkit.export(catalog[name], tmp_path / "out", dtype="bfloat16", verify=True, progress=False,
                             **options)
    v = result.verification
    assert result.ok, result.summary()
    if check == "weights":
        assert v["weights_compared"] > 0 and v["weights_misrounded"] == 0 and v["rounded_max_abs_diff"] is None
    else:
        assert v["weights_compared"] is None and v["rounded_max_abs_diff"] <= 1e-5


def test_verify_reads_the_source_once_more_than_the_export(catalog, tmp_path, monkeypatch):
    """A verified bf16 export of an adapter reads each base tensor twice: once for the export,
    once for the reference (its rounded form is made from that same reference)."""
    from collections import Counter

    import modelkit.io.tensors as tensors

    reads, real = Counter(), tensors._note_read

    def note(path, key):
        reads[(str(path), key)] += 1
        real(path, key)

    monkeypatch.setattr(tensors, "_note_read", note)
    base = str(modelkit.open_artifact(catalog["peft-lora"]).base.path)
    result = modelkit.export(catalog["peft-lora"], tmp_path / "out", dtype="bfloat16", verify=True,
                             progress=False)
    assert result.ok and result.verification["weights_misrounded"] == 0
    per_tensor = Counter(n for (path, _), n in reads.items() if path.startswith(base))
    assert per_tensor and set(per_tensor) == {2}, per_tensor


def test_verify_frees_a_pinned_reference_before_loading_the_export_without_a_full_collection(
        catalog, tmp_path, monkeypatch):
    """The source's reference is gone before the export is loaded (one model at a time) even
    when a reference cycle holds it, as an import's frames hold the frames that imported them
    with their locals; and no full collection walks every object the caller holds (0.3 s of
    a 2.5 s verify step at 0.6 GB)."""
    import gc
    import weakref

    from modelkit.ops import verify

    references, generations, in_verify = [], [], []
    real_reference, real_load = verify.source_reference, verify.load_stock

    def pinned_reference(*args, **kwargs):
        model, how = real_reference(*args, **kwargs)
        cycle = {"model": model}
        cycle["itself"] = cycle
        references.append(weakref.ref(model))
        return model, how

    def load_stock(folder):
        assert references and references[0]() is None, "the reference is still in memory"
        return real_load(folder)

    def collections(phase, info):
        if phase == "start" and in_verify:
            generations.append(info["generation"])

    real_verify = verify.verify_folder

    def watched_verify(*args, **kwargs):
        in_verify.append(True)
        try:
            return real_verify(*args, **kwargs)
        finally:
            in_verify.clear()

    monkeypatch.setattr(verify, "source_reference", pinned_reference)
    monkeypatch.setattr(verify, "load_stock", load_stock)
    monkeypatch.setattr(verify, "verify_folder", watched_verify)
    gc.callbacks.append(collections)
    try:
        result = modelkit.export(catalog["peft-lora"], tmp_path / "out", dtype="bfloat16", verify=True,
                                 progress=False)
    finally:
        gc.callbacks.remove(collections)
    assert result.ok and result.verification["weights_misrounded"] == 0
    assert references and generations and 2 not in generations, generations


def test_failed_verification_writes_nothing(catalog, tmp_path):
    out = tmp_path / "strict"
    result = modelkit.export(catalog["peft-lora"], out, dtype="bfloat16", verify=True,
                             tolerance=1e-12, progress=False)
    assert not result.ok and not result.written
    assert "FAILED" in result.summary()
    assert not out.exists() and not leftovers(out)


# --------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("entry", ["compressed-checkpoint-N", "plain-sharded"])
def test_streams_tensor_by_tensor(catalog, tmp_path, monkeypatch, entry):
    """Each tensor is written as soon as it is produced: at most ``QUEUE`` tensors (plus
    one per compute worker) are produced ahead of the writer, whatever the shard size, and
    no shard is bigger than the shard size. Every shard reads back with safetensors itself, equal to the source's view."""
    from safetensors import safe_open

    ex = importlib.import_module("modelkit.io.shards")  # the shard writer export streams through
    stream = importlib.import_module("modelkit.io.safetensors_stream")

    produced, ahead, copied = [], [], []  # produced: tensors computed or read (in memory)
    real_produce = ex.produce
    real_write, real_copy = stream.StreamedSafetensors.write, stream.StreamedSafetensors.copy

    def produce(name, lt, dtype):
        produced.append(name)
        return real_produce(name, lt, dtype)

    def write(self, name, tensor):
        ahead.append(len(produced) - produced.index(name))
        real_write(self, name, tensor)

    def copy(self, name, *a):  # a stored tensor copied file to file: never in memory
        produced.append(name)
        ahead.append(1)
        copied.append(name)
        real_copy(self, name, *a)

    monkeypatch.setattr(ex, "produce", produce)
    monkeypatch.setattr(stream.StreamedSafetensors, "write", write)
    monkeypatch.setattr(stream.StreamedSafetensors, "copy", copy)
    out = tmp_path / "sharded"
    result = modelkit.export(catalog[entry], out, max_shard_size="40KB", verify=True, progress=False)
    assert len(ahead) == len(produced) == result.tensors
    # a compressed export computes as many experts at once as torch has threads (parallel_production)
    import torch

    workers = min(torch.get_num_threads(), ex.MAX_WORKERS) if entry.startswith("compressed") else 1
    assert 1 <= max(ahead) <= ex.QUEUE + max(workers, 1)
    # a plain folder's tensors are its stored bytes: copied file to file, none produced
    assert (len(copied) == result.tensors) if entry == "plain-sharded" else not copied
    index = json.loads((out / "model.safetensors.index.json").read_text())
    n = len(result.shards)
    assert n > 2 and sorted(set(index["weight_map"].values())) == [f"model-{i:05d}-of-{n:05d}.safetensors"
                                                                   for i in range(1, n + 1)]
    assert index["metadata"]["total_size"] == result.bytes
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(out / shard), "pt") as f:  # safetensors itself reads what was streamed
            assert f.metadata() == {"format": "pt"}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        assert sorted(tensors) == sorted(k for k, v in index["weight_map"].items() if v == shard)
        assert sum(t.numel() * t.element_size() for t in tensors.values()) <= 40_000 or len(tensors) == 1
    assert result.verification["ok"]  # the streamed bytes are the model: logits agree with the reference


def test_stored_tensors_are_copied_byte_for_byte_by_either_path(catalog, tmp_path, monkeypatch):
    """A plain folder's tensors are copied file to file (in the kernel, or through a buffer
    where ``copy_file_range`` is refused): the shards hold the source's bytes exactly."""
    from safetensors import safe_open

    stream = importlib.import_module("modelkit.io.safetensors_stream")
    src = catalog["plain-sharded"]

    def stored(folder):
        out = {}
        for f in sorted(Path(folder).glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                out.update({k: h.get_tensor(k) for k in h.keys()})
        return out

    want = stored(src)
    fast = modelkit.export(src, tmp_path / "fast", max_shard_size="60KB", progress=False)
    refused = []

    def no_copy_file_range(*a):
        refused.append(1)
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(stream.os, "copy_file_range", no_copy_file_range, raising=False)
    slow = modelkit.export(src, tmp_path / "slow", max_shard_size="60KB", progress=False)
    assert refused and fast.bytes == slow.bytes
    for out in ("fast", "slow"):
        got = stored(tmp_path / out)
        assert sorted(got) == sorted(want)
        assert all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)
    assert len(fast.consumed) == len(want) and not fast.left_out  # copies count as reads


def test_a_source_that_shrinks_during_the_copy_is_a_corrupt_file(catalog, tmp_path, monkeypatch):
    """The span was validated against the header read at open; a file cut since then ends the
    copy early: CorruptFileError naming it, nothing written."""
    stream = importlib.import_module("modelkit.io.safetensors_stream")
    src = tmp_path / "src"
    shutil.copytree(catalog["plain-llama"], src)
    real = stream.copy_range

    def cut(src_fd, dst, offset, length):
        os.truncate(src / "model.safetensors", offset + length // 2)
        return real(src_fd, dst, offset, length)

    monkeypatch.setattr(stream, "copy_range", cut)
    out = tmp_path / "out"
    with pytest.raises(CorruptFileError, match="ended .* bytes early"):
        modelkit.export(src, out, progress=False)
    assert not out.exists() and not leftovers(out)


def test_warm_export_writes_the_same_config_without_transformers(catalog, tmp_path):
    """config.json is cached per architecture and dtype: a second export of the same base imports
    no transformers at all and writes the same bytes."""
    env = {**os.environ, "MODELKIT_CACHE": str(tmp_path / "cache")}
    code = ("import sys, modelkit\n"
            "modelkit.export(sys.argv[1], sys.argv[2], base=sys.argv[3], dtype='bfloat16', progress=False)\n"
            "print('transformers' in sys.modules)")
    runs = [subprocess.run([sys.executable, "-c", code, str(catalog["peft-lora"]), str(tmp_path / f"out{i}"),
                            str(catalog["plain-llama"])], env=env, check=True, capture_output=True, text=True)
            for i in range(2)]
    assert [r.stdout.split()[-1] for r in runs] == ["True", "False"]
    first, second = ((tmp_path / f"out{i}" / "config.json").read_text() for i in range(2))
    assert first == second and json.loads(first)["dtype"] == "bfloat16"
    assert json.loads(first)["architectures"] == ["LlamaForCausalLM"]


@pytest.mark.parametrize("entry", ["compressed-checkpoint-N", "compressed-checkpoint-0"])
def test_parallel_production_writes_the_same_bytes(catalog, tmp_path, monkeypatch, entry):
    """With two torch threads a compressed export computes two experts at once (worker
    threads of one torch thread each; per-expert core copies, and shared-core batches):
    the shards hold the same bytes as the one-worker export, at most ``QUEUE + workers``
    tensors are produced ahead of the writer, and torch's thread count is as it was."""
    import threading

    import torch

    ex = importlib.import_module("modelkit.io.shards")
    stream = importlib.import_module("modelkit.io.safetensors_stream")
    real_produce, real_write = ex.produce, stream.StreamedSafetensors.write
    produced, ahead, threads = [], [], set()

    def produce(name, lt, dtype):
        threads.add(threading.current_thread().name.split("_")[0])
        produced.append(name)
        return real_produce(name, lt, dtype)

    def write(self, name, tensor):
        ahead.append(len(produced) - produced.index(name))
        real_write(self, name, tensor)

    one = tmp_path / "one"
    modelkit.export(catalog[entry], one, max_shard_size="40KB", progress=False)
    monkeypatch.setattr(ex, "produce", produce)
    monkeypatch.setattr(stream.StreamedSafetensors, "write", write)
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two = tmp_path / "two"
        modelkit.export(catalog[entry], two, max_shard_size="40KB", progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)
    assert "modelkit-compute" in threads
    assert 1 <= max(ahead) <= ex.QUEUE + 2
    shards = sorted(p.name for p in one.glob("*.safetensors"))
    assert shards == sorted(p.name for p in two.glob("*.safetensors")) and len(shards) > 2
    for shard in shards:
        assert (one / shard).read_bytes() == (two / shard).read_bytes(), shard


# --------------------------------------------------------------------------- no modelkit import

_STOCK_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    prompt = json.loads(sys.argv[2])
    out = {}
    for folder in sys.argv[3:]:
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out[folder] = model(input_ids=ids).logits.tolist()
            model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert not [m for m in sys.modules if m.split(".")[0] == "modelkit"], "modelkit was imported"
    json.dump(out, open(sys.argv[1], "w"))
""")


@pytest.mark.slow
def test_exported_folders_load_without_modelkit(catalog, tmp_path):
    cases = {"peft": ("peft-lora", {}), "dylora": ("dylora-b", {"expert": 0}),
             "moe": ("compressed-checkpoint-N", {}), "tied": ("plain-gemma-tied", {})}
    for key, (name, opts) in cases.items():
        modelkit.export(catalog[name], tmp_path / key, progress=False, **opts)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result_file = tmp_path / "logits.json"
    proc = subprocess.run([sys.executable, "-c", _STOCK_SCRIPT, str(result_file), json.dumps(PROMPT),
                           *[str(tmp_path / k) for k in cases]],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(result_file.read_text())
    for key, (name, opts) in cases.items():
        reference, tok = source_reference(catalog[name], opts)
        diff = (torch.tensor(got[str(tmp_path / key)]) - logits(reference, tok)).abs().max().item()
        assert diff <= 1e-5, (key, diff)


# --------------------------------------------------------------------------- lm-eval CLI

_TASK = """\
task: modelkit_export_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_tiny_task(folder: Path) -> Path:
    """A local multiple-choice lm-eval task read with ``dataset_path: json``."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": f"def f_{i}(x):\n    return x *", "choices": [" 1", " 2", " 3"], "label": i % 3}
            for i in range(6)]
    data = folder / "tiny.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "modelkit_export_tiny.yaml").write_text(_TASK.format(data=data))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("name,opts", [("dylora-b", {"expert": 1}), ("compressed-checkpoint-N", {})])
def test_lm_eval_cli_runs_on_export(catalog, tmp_path, name, opts):
    out = tmp_path / "exported"
    modelkit.export(catalog[name], out, progress=False, **opts)
    tasks = write_tiny_task(tmp_path / "tasks")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    env.pop("PYTHONPATH", None)
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf",
           "--model_args", f"pretrained={out},dtype=float32", "--tasks", "modelkit_export_tiny",
           "--include_path", str(tasks), "--limit", "4", "--device", "cpu",
           "--output_path", str(tmp_path / "results")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    results = list((tmp_path / "results").rglob("results*.json"))
    assert results, proc.stdout[-2000:]
    data = json.loads(results[0].read_text())
    assert "acc,none" in data["results"]["modelkit_export_tiny"]


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_entries_leave_nothing(catalog, tmp_path, name):
    src = catalog[name]
    before = tree_hash(src)
    out = tmp_path / "out"
    opts = {"expert": 0} if name.startswith("dylora") else {}
    with pytest.raises(REFUSED[name]) as info:
        modelkit.export(src, out, progress=False, **opts)
    assert str(info.value)  # names the problem
    assert not out.exists() and not leftovers(out)
    assert tree_hash(src) == before
    assert not list(src.parent.rglob("PWNED")) and not list(src.rglob("REMOTE_CODE_EXECUTED"))


def test_untrained_adapter_exports_when_allowed(catalog, tmp_path):
    with pytest.raises(LoadError, match="allow_untrained"):
        modelkit.export(catalog["peft-lora-untrained"], tmp_path / "u", progress=False)
    result = modelkit.export(catalog["peft-lora-untrained"], tmp_path / "u", allow_untrained=True,
                             progress=False)
    assert result.written


def test_missing_base(catalog, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(BaseModelUnavailableError, match="base"):
        modelkit.export(catalog["peft-lora-base-unavailable"], out, progress=False)
    assert not out.exists() and not leftovers(out)


def test_base_with_mismatching_shapes(catalog, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(LoadError, match="shape"):
        modelkit.export(catalog["peft-lora"], out, base=catalog["plain-gemma-tied"], progress=False)
    assert not out.exists() and not leftovers(out)


def test_truncated_shard(catalog, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(catalog["plain-sharded"], src)
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    out = tmp_path / "out"
    with pytest.raises(CorruptFileError, match=shard.name):
        modelkit.export(src, out, progress=False)
    assert not out.exists() and not leftovers(out)


def test_full_disk_leaves_nothing(catalog, tmp_path, monkeypatch):
    stream = importlib.import_module("modelkit.io.safetensors_stream")

    written = []

    def full(fd, data):  # a disk with 100 KB free: the second 60 KB shard does not fit
        if sum(written) + len(data) > 100_000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written.append(len(data))
        return real(fd, data)

    def full_copy(src, dst, offset, length):  # the same disk for stored tensors copied file to file
        if sum(written) + length > 100_000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written.append(length)
        return real_copy(src, dst, offset, length)

    real, real_copy = stream.write_all, stream.copy_range
    monkeypatch.setattr(stream, "write_all", full)
    monkeypatch.setattr(stream, "copy_range", full_copy)
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="no space left"):
        modelkit.export(catalog["plain-sharded"], out, max_shard_size="60KB", progress=False)
    assert 60_000 < sum(written) <= 100_000
    assert not out.exists() and not leftovers(out)


def test_failed_fsync_leaves_nothing(catalog, tmp_path, monkeypatch):
    """Shards are fsynced by the writer thread; an I/O error there still fails the export."""
    stream = importlib.import_module("modelkit.io.safetensors_stream")

    def broken(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(stream, "sync", broken)
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="cannot write the export"):
        modelkit.export(catalog["plain-sharded"], out, max_shard_size="60KB", progress=False)
    assert not out.exists() and not leftovers(out)


def test_out_inside_source_is_refused(catalog, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(catalog["plain-llama"], src)
    before = tree_hash(src)
    for out in (src / "exported", src):
        with pytest.raises(ExportError, match="inside the source"):
            modelkit.export(src, out, force=True, progress=False)
    with pytest.raises(ExportError, match="contains the source"):
        modelkit.export(src, tmp_path, force=True, progress=False)
    assert tree_hash(src) == before


def test_out_inside_base_is_refused(catalog, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(catalog["plain-llama"], base)
    with pytest.raises(ExportError, match="inside the source"):
        modelkit.export(catalog["peft-lora"], base / "merged", base=base, progress=False)
    assert not (base / "merged").exists()


def test_existing_out_needs_force(catalog, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="force"):
        modelkit.export(catalog["plain-llama"], out, progress=False)
    assert (out / "keep.txt").read_text() == "mine" and not leftovers(out)
    result = modelkit.export(catalog["plain-llama"], out, force=True, progress=False)
    assert result.written and not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert not leftovers(out)


def test_stale_partial_folders_are_swept(catalog, tmp_path):
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.partial-{dead.pid}-abc"
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"half")
    modelkit.export(catalog["plain-llama"], out, progress=False)
    assert not stale.exists() and (out / "config.json").exists()


# --------------------------------------------------------------------------- killed exports

_KILL_CHILD = textwrap.dedent('''
    import importlib, sys, time
    import modelkit
    at = importlib.import_module("modelkit.io.atomic")
    ex = importlib.import_module("modelkit.io.shards")  # the shard writer export streams through

    src, out, point, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    counts = {"produce": 0, "shard": 0}

    def pause():
        print("PAUSED", flush=True)
        time.sleep(600)

    stream = importlib.import_module("modelkit.io.safetensors_stream")
    real_produce, real_close, real_publish = ex.produce, stream.StreamedSafetensors.close, at._publish

    def produce(*a, **k):
        t = real_produce(*a, **k)
        counts["produce"] += 1
        if point == "produce" and counts["produce"] == n:
            pause()
        return t

    def close(*a, **k):  # a shard fully written and fsynced
        real_close(*a, **k)
        counts["shard"] += 1
        if point == "shard" and counts["shard"] == n:
            pause()

    def publish(*a, **k):
        if point == "publish":
            pause()
        real_publish(*a, **k)
        if point == "published":
            pause()

    ex.produce, stream.StreamedSafetensors.close, at._publish = produce, close, publish
    modelkit.export(src, out, max_shard_size="40KB", progress=False)
    print("DONE", flush=True)
    if point == "done":
        pause()
''')


def assert_absent_or_complete(out: Path, complete_expected: bool | None = None) -> bool:
    """OUT is absent, or complete: record, index, every shard, loadable by transformers."""
    if not out.exists():
        assert complete_expected in (None, False)
        return False
    assert complete_expected in (None, True)
    assert (out / "modelkit_export.json").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for shard in set(index["weight_map"].values()):
        assert (out / shard).is_file()
    stock_load(out)
    return True


@pytest.mark.slow
@pytest.mark.parametrize("point,n,complete", [
    ("produce", 3, False),     # mid-way through the first shard
    ("shard", 2, False),       # two shards on disk
    ("publish", 0, False),     # everything written and fsynced, not yet renamed
    ("published", 0, True),    # renamed, process not yet returned
    ("done", 0, True),
])
def test_sigkill_leaves_no_out_or_a_complete_one(catalog, tmp_path, point, n, complete):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, str(catalog["compressed-checkpoint-N"]),
                             str(out), point, str(n)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        line = ""
        while line.strip() not in ("PAUSED", "DONE"):
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                pytest.fail(f"export child ended early: {proc.stderr.read()[-3000:]}")
        if point == "done":
            while line.strip() != "PAUSED":
                line = proc.stdout.readline()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert_absent_or_complete(out, complete)
    # a later export cleans up after the dead one, and works
    result = modelkit.export(catalog["compressed-checkpoint-N"], out, force=True, progress=False)
    assert result.written and not leftovers(out)
    assert_absent_or_complete(out, True)


# --------------------------------------------------------------------------- CLI


def test_cli_export(catalog, tmp_path, capsys):
    from modelkit.ui.cli import main

    out = tmp_path / "cli"
    assert main(["export", str(catalog["dylora-b"]), str(out), "--expert", "0", "--verify", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] and data["verification"]["max_abs_diff"] <= 1e-5
    assert main(["export", str(catalog["dylora-b"]), str(out), "--expert", "0"]) == 2
    assert "OutputExistsError" in capsys.readouterr().err
    assert main(["export", str(catalog["dylora-b"]), str(tmp_path / "mix")]) == 2
    assert "routed mixture" in capsys.readouterr().err
    assert main(["export", str(catalog["peft-lora"]), str(tmp_path / "bf16"), "--dtype", "bfloat16",
                 "--max-shard-size", "50KB", "--verify"]) == 0
    text = capsys.readouterr().out
    assert "max |logit diff|" in text and "verify OK" in text


def test_progress_in_a_terminal_ends_at_100_percent_in_the_kits_units(catalog, tmp_path, capsys):
    out = tmp_path / "with-bars"
    result = modelkit.export(catalog["plain-sharded"], out, max_shard_size="40KB", verify=True)
    bars = capsys.readouterr().err.replace("\r", "\n")
    final = [line for line in bars.splitlines() if line.startswith(("write:", "verify:"))]
    n, shards = result.tensors, len(result.shards)

    assert any(line.startswith("write: 100%") and f"{n}/{n} tensors · shard {shards}/{shards}, "
               f"{human_bytes(result.bytes)} of {human_bytes(result.bytes)}" in line for line in final), final
    assert any(line.startswith("verify: 100%") and "3/3 steps · logits match" in line for line in final), final
    assert ".partial-" not in bars and out.name not in bars     # never the temporary folder
    assert "kB" not in bars                                     # one byte format: 164.6 KB, never 169kB


def test_exported_files_have_ordinary_permissions(catalog, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "perms"
        modelkit.export(catalog["peft-lora"], out, progress=False)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes and set(modes.values()) == {0o644}, modes
    assert out.stat().st_mode & 0o777 == 0o755
# -- the model card: lineage a Hub reader sees ----------------------------------------------------

@pytest.fixture(scope="module")
def tied_gemma(tmp_path_factory) -> Path:
    from modelkit.testing import write_plain_hf

    return write_plain_hf(tmp_path_factory.mktemp("tied") / "gemma", "gemma", dtype=torch.bfloat16)


def test_export_writes_a_model_card_naming_its_base_model(tmp_path, tied_gemma):
    from huggingface_hub import ModelCard

    from modelkit.testing import write_dylora

    src = write_dylora(tmp_path / "run", "c", tied_gemma, base_name="google/codegemma-2b")
    out = tmp_path / "expert1"
    result = modelkit.export(src, out, base=tied_gemma, expert=1, verify=True, progress=False)
    assert result.ok and result.written, result.summary()
    card = ModelCard.load(out / "README.md")                    # the Hub's own reader
    assert card.data.base_model == "google/codegemma-2b" and card.data.base_model_relation == "finetune"
    assert "modelkit-export" in card.data.tags and card.data.library_name == "transformers"
    assert "DyLoRA-MoE expert 1 merged into the base" in card.text
    assert "**Verified**: yes: logits" in card.text
    assert str(tmp_path) not in (out / "README.md").read_text()   # no local path in a shareable card


def test_a_base_recorded_as_a_folder_stays_out_of_the_card_metadata(tmp_path, tied_gemma):
    from huggingface_hub import ModelCard

    from modelkit.testing import write_dylora

    src = write_dylora(tmp_path / "run", "b", tied_gemma)      # records the base by its absolute path
    result = modelkit.export(src, tmp_path / "all", expert="all", progress=False)
    assert result.written
    for k in (0, 1):
        text = (tmp_path / "all" / f"expert_{k}" / "README.md").read_text()
        card = ModelCard(text)
        assert card.data.base_model is None and "a local folder, not a Hub id" in text
        assert "**Verified**: no (exported without verify)" in text and str(tmp_path) not in text
    top = (tmp_path / "all" / "README.md").read_text()
    assert "`expert_0/`: not verified" in top and "`expert_1/`" in top


def test_a_self_contained_checkpoint_gets_a_card_without_lineage(tmp_path):
    from huggingface_hub import ModelCard

    from modelkit.testing import write_plain_hf

    src = write_plain_hf(tmp_path / "plain")
    modelkit.export(src, tmp_path / "out", progress=False)
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model is None and "not recorded by the artifact" in card.text
