"""One of everything: every clean layout and every fault, under stable names, with the
finding codes a correct inspector must report for each (``catalog.json``).

``expected_codes`` lists the codes that must appear (info-level ones such as
``base-required`` included); an entry with no codes must yield no error or warning.
``raises`` names the ``modelkit.errors`` class that opening or loading it must raise.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable, Iterator

from modelkit.io.tensors import torch_dtype
from modelkit.testing import compressed, dylora, faults
from modelkit.testing._files import one_thread
from modelkit.testing.peft_lora import write_peft_lora
from modelkit.testing.plain import write_plain_hf

GROUPS = ("plain", "peft", "dylora", "compressed", "bad")
CATALOG_FILE = "catalog.json"
UNAVAILABLE_BASE = "modelkit-fixtures/tiny-base-not-downloaded"

Writer = Callable[[Path, dict[str, Path]], Path]


@dataclasses.dataclass(frozen=True)
class Entry:
    """One catalog artifact: how to write it and what inspecting it must report."""

    name: str
    group: str
    format: str
    layout: str
    write: Writer = dataclasses.field(repr=False, compare=False)
    expected_codes: tuple[str, ...] = ()
    fault: str | None = None
    base: str | None = None
    raises: str | None = None
    notes: str = ""

    def describe(self, root: Path, path: Path) -> dict:
        return {
            "path": str(path.relative_to(root)),
            "format": self.format,
            "layout": self.layout,
            "fault": self.fault,
            "expected_codes": list(self.expected_codes),
            "raises": self.raises,
            "base": self.base,
            "notes": self.notes,
        }


def _plain(name: str, layout: str, notes: str = "", **kw) -> Entry:
    return Entry(name, "plain", "plain-hf", layout, lambda d, _: write_plain_hf(d, **kw), notes=notes)


def _peft(name: str, codes: tuple[str, ...], fault: str | None = None, notes: str = "", **kw) -> Entry:
    return Entry(name, "peft", "peft-lora", "bin" if kw.get("bin") else "safetensors",
                 lambda d, p: write_peft_lora(d, p["plain-llama"], **kw),
                 ("base-required", *codes), fault, "plain-llama", notes=notes)


def _dylora(name: str, layout: str, codes: tuple[str, ...] = (), fault: str | None = None, notes: str = "") -> Entry:
    partial = layout not in ("a-tiny-config", "a-full-config")
    return Entry(name, "dylora", "dylora-moe", layout,
                 lambda d, p: dylora.write_dylora(d, layout, p["base-gemma"], fault=fault),
                 (("base-required",) if partial else ()) + codes, fault, "base-gemma", notes=notes)


def _dylora_run(name: str, era: str, folder: str, codes: tuple[str, ...] = (), fault: str | None = None,
                base: str = "base-gemma-tied", notes: str = "", label: str | None = None) -> Entry:
    """One folder of a whole DyLoRA-MoE training run as one era of the real code leaves it."""
    recorded = folder == "best_model"   # checkpoints of the early and middle eras name no base
    partial = not (era.startswith("early") and folder == "best_model")
    return Entry(name, "dylora", "dylora-moe", f"{era}:{folder}",
                 lambda d, p: dylora.write_dylora_run(d, era, p[base], fault=fault) / folder,
                 (("base-required",) if partial and recorded else ()) + codes, label or fault, base, notes=notes)


def _compressed(name: str, layout: str, codes: tuple[str, ...] = (), fault: str | None = None,
                notes: str = "", label: str | None = None, **kw) -> Entry:
    partial = layout in ("checkpoint-0", "early-compressed", "tmp")
    return Entry(name, "compressed", "compressed-moe", layout,
                 lambda d, p: compressed.write_compressed_moe(d, layout, p["original-qwen3-moe"], fault=fault, **kw),
                 (("base-required",) if partial else ()) + codes, label or fault, "original-qwen3-moe", notes=notes)


def _bad(name: str, write: Callable[[Path], Path], codes: tuple[str, ...], raises: str, fault: str,
         notes: str = "") -> Entry:
    def writer(d: Path, _: dict[str, Path]) -> Path:
        path = write(d / "model")
        return path if path.is_dir() else path.parent
    return Entry(name, "bad", "plain-hf", "safetensors", writer, codes, fault, None, raises, notes)


ENTRIES: tuple[Entry, ...] = (
    # bases first: other entries point at them
    _plain("plain-llama", "safetensors", notes="also the base of every peft-lora entry"),
    _plain("base-gemma", "safetensors", family="gemma", tie=False,
           notes="DyLoRA base: untied gemma, lm_head a copy of embed_tokens"),
    _plain("base-gemma-tied", "safetensors", family="gemma", dtype=torch_dtype("bfloat16"),
           notes="the real DyLoRA base's properties: lm_head tied to embed_tokens, config in bfloat16"),
    _plain("original-qwen3-moe", "safetensors", family="qwen3_moe",
           notes="compressed-MoE original; experts stored per expert (mlp.experts.{e}.*_proj.weight)"),
    _plain("plain-sharded", "sharded-safetensors", shards=3),
    _plain("plain-bin", "bin", bin=True),
    _plain("plain-bin-sharded", "sharded-bin", shards=2, bin=True),
    _plain("plain-gemma-tied", "safetensors", family="gemma",
           notes="tied embeddings: lm_head.weight absent on disk, which is not a fault"),
    _plain("plain-qwen3-moe-sharded", "sharded-safetensors", family="qwen3_moe", shards=2),
    _peft("peft-lora", ()),
    _peft("peft-lora-rslora", (), r=8, alpha=16, use_rslora=True, notes="scaling = alpha / sqrt(r)"),
    _peft("peft-lora-bin", (), bin=True, notes="legacy adapter_model.bin"),
    _peft("peft-lora-untrained", ("untrained-adapter",), "untrained", trained=False),
    _peft("peft-lora-base-unavailable", ("base-unavailable",), "base-unavailable", base_name=UNAVAILABLE_BASE,
          notes="base_model_name_or_path is a hub name that is not in any local cache"),
    _dylora("dylora-a-tiny", "a-tiny-config", notes="full wrapper state dict; router also in sibling dylo_moe_state/"),
    _dylora("dylora-a-full", "a-full-config"),
    _dylora("dylora-b", "b"),
    _dylora("dylora-c", "c", notes="experts nested twice: peft_adapters/expert_k/expert_k/"),
    _dylora("dylora-d", "d", notes="W&B artifact root: best_model/ (layout b) + checkpoint-50/ + checkpoint-100/"),
    _dylora("dylora-adapter-name-twice", "b", ("unexpected-tensors",), "adapter-name-twice",
            notes="expert_1.pt keys read lora_A.expert_1.expert_1.weight"),
    _dylora("dylora-empty-expert", "b", ("empty-adapter",), "empty-expert", notes="expert_1.pt is {}"),
    _dylora("dylora-missing-router", "b", ("missing-router",), "missing-router",
            notes="dylo_moe_state/router.pt absent"),
    _dylora("dylora-inconsistent-config", "b", ("inconsistent-config",), "inconsistent-config",
            notes="num_experts = 3 but _dylora_num_experts = 2 (and two expert files)"),
    _dylora("dylora-untrained", "c", ("untrained-adapter",), "untrained", notes="every lora_B is zero"),
    _dylora("dylora-config-rewritten", "a-full-config", ("inconsistent-config",), "config-rewritten",
            notes="config.json is the plain gemma base config (no _dylora_*), weights are the wrapper's"),
    _dylora("dylora-remote-code", "b", ("remote-code",), "remote-code",
            notes="auto_map in config.json; importing modeling_dylora.py would create REMOTE_CODE_EXECUTED"),
    _dylora_run("dylora-early-best", "early", "best_model",
                notes="tied base; whole wrapper incl. lm_head = embed_tokens; dylo_moe_state/ beside it"),
    _dylora_run("dylora-early-checkpoint", "early", "checkpoint-100", ("inconsistent-config", "base-unavailable"),
                label="facts-not-recorded",
                notes="Trainer-only checkpoint: no config.json, no dylo_moe_state/; alpha and base recorded nowhere"),
    _dylora_run("dylora-middle-checkpoint", "middle", "checkpoint-100", ("inconsistent-config", "base-unavailable"),
                label="facts-not-recorded",
                notes="flat peft_adapters/expert_k.pt + own dylo_moe_state/ + the Trainer's model.safetensors"),
    _dylora_run("dylora-late-best", "late", "best_model", notes="layout b over the tied bf16 base"),
    _dylora_run("dylora-late-checkpoint", "late", "checkpoint-100",
                notes="layout c with README.md per expert, training_args.bin listed"),
    _dylora_run("dylora-loader-rewrote-config", "late", "best_model", ("inconsistent-config",),
                "loader-rewrote-config",
                notes="config.json as the real evaluation loader rewrites it: model_type gemma, "
                      "_dylora_original_type, lora_r/lora_alpha null"),
    _compressed("compressed-checkpoint-N", "checkpoint-N"),
    _compressed("compressed-checkpoint-0", "checkpoint-0"),
    _compressed("compressed-documented", "documented"),
    _compressed("compressed-no-non-moe", "checkpoint-N", ("missing-tensors",), "no-non-moe",
                notes="non_moe_weights.pt absent: attention, norms, embeddings, router missing"),
    _compressed("compressed-missing-projection", "checkpoint-N", ("missing-tensors",), "missing-projection",
                notes="layer_1/down_proj.pt absent"),
    _compressed("compressed-duplicated-buffers", "checkpoint-N", ("duplicated-buffers",), "duplicated-buffers",
                notes="non_moe_weights.pt also holds model.layers.{i}.mlp.experts.{e}.{proj}.core copies"),
    _compressed("compressed-dtype-mismatch", "checkpoint-N", ("dtype-mismatch",), "dtype-mismatch",
                notes="non-MoE weights bf16, compressed tensors fp32"),
    _compressed("compressed-checkpoint-N-bf16-t4", "checkpoint-N", dtype=torch_dtype("bfloat16"),
                transformers_version="4",
                notes="as transformers 4.x wrote it: num_experts/rope_theta/torch_dtype; bf16 model, fp32 rotary buffers"),
    _compressed("compressed-final-save", "checkpoint-N", final_save=True,
                notes="the final save written into checkpoints/ itself, beside checkpoint-10/"),
    _compressed("compressed-early", "early-compressed",
                notes="earlier version: settings yaml with !!python/object tags inside, extracted_weights/ kept"),
    _compressed("compressed-tmp", "tmp", ("incomplete-checkpoint",), label="tmp",
                notes="latest version: SharedCoreLayer state dicts in tmp/, checkpoint-0/ left empty"),
    _compressed("compressed-trained-copies-differ", "checkpoint-N", ("trained-form-differs",),
                "trained-copies-differ", dtype=torch_dtype("bfloat16"),
                notes="the per-expert core copies (what the forward used) differ from the saved shared core"),
    _compressed("compressed-crashed-checkpoint", "checkpoint-0", ("incomplete-checkpoint",), "crashed-checkpoint",
                notes="experiment folder: checkpoint-0/ plus a crashed checkpoint-2/ holding only config.json"),
    _compressed("compressed-base-unavailable", "checkpoint-0", ("base-unavailable",), label="base-unavailable",
                model_name="Qwen/Qwen3-30B-A3B", notes="compression_config.yaml names a model not available locally"),
    _bad("bad-truncated", faults.write_truncated_safetensors, ("corrupt-file",), "CorruptFileError", "truncated"),
    _bad("bad-absurd-header", faults.write_absurd_header, ("corrupt-file",), "CorruptFileError", "absurd-header"),
    _bad("bad-offsets-outside", faults.write_offsets_outside, ("corrupt-file",), "CorruptFileError",
         "offsets-outside"),
    _bad("bad-overlapping-offsets", faults.write_overlapping_offsets, ("corrupt-file",), "CorruptFileError",
         "overlapping-offsets"),
    _bad("bad-malformed-config", faults.write_malformed_config, (), "ConfigError", "malformed-config",
         notes="config.json is cut off mid-object"),
    _bad("bad-evil-pickle", faults.write_evil_pickle, ("unsafe-pickle",), "UnsafePickleError", "evil-pickle",
         notes="pytorch_model.bin calls posix.system when unpickled; PWNED beside it would prove it ran"),
    _bad("bad-escaping-symlink", faults.write_escaping_symlink, (), "UnsafePathError", "escaping-symlink",
         notes="model.safetensors -> ../model-outside/model.safetensors"),
    _bad("bad-index-outside", faults.write_index_outside, (), "UnsafePathError", "index-outside",
         notes="weight_map names ../outside.safetensors"),
)
BY_NAME = {e.name: e for e in ENTRIES}


def write_catalog(root: Path, families: Iterable[str] = GROUPS) -> dict[str, Path]:
    """Write every entry of the requested groups (and the bases they need) under ``root``.

    Idempotent: entries already written by the same fixture code are reused, so repeated
    calls (or several test sessions sharing ``root``) cost only a JSON read. Returns the
    absolute path of each requested entry and base; ``root/catalog.json`` describes them.
    """
    root = Path(root).absolute()
    families = tuple(families)
    unknown = set(families) - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown catalog groups {sorted(unknown)}; expected some of {GROUPS}")
    wanted = [e for e in ENTRIES if e.group in families]
    needed = {e.base for e in wanted if e.base} | {e.name for e in wanted}
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root), one_thread():
        catalog = _load_valid(root)
        paths = {name: root / info["path"] for name, info in catalog["entries"].items()}
        for entry in ENTRIES:  # in order: bases before the entries that use them
            if entry.name in needed and entry.name not in paths:
                path = Path(entry.write(root / entry.name, paths)).absolute()
                paths[entry.name] = path
                catalog["entries"][entry.name] = entry.describe(root, path)
                _save(root, catalog)
    return {name: paths[name] for name in BY_NAME if name in needed}


def load_catalog(root: Path) -> dict:
    """The parsed ``catalog.json`` of ``root``."""
    return json.loads((Path(root) / CATALOG_FILE).read_text())


def fingerprint() -> str:
    """Changes whenever the fixture code or the libraries that write the files change."""
    import peft
    import safetensors
    import tokenizers
    import torch
    import transformers

    digest = hashlib.sha256()
    for source in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(source.name.encode() + source.read_bytes())
    for module in (torch, transformers, peft, safetensors, tokenizers):
        digest.update(f"{module.__name__}={module.__version__}".encode())
    return digest.hexdigest()[:16]


def _load_valid(root: Path) -> dict:
    """The existing catalog if written by this code, minus entries whose files are gone."""
    fresh = {"fingerprint": fingerprint(), "entries": {}}
    try:
        catalog = load_catalog(root)
    except (OSError, ValueError):
        return fresh
    if catalog.get("fingerprint") != fresh["fingerprint"]:
        for name in catalog.get("entries", {}):
            if name in BY_NAME or (root / name).is_dir():
                shutil.rmtree(root / name, ignore_errors=True)
        return fresh
    catalog["entries"] = {n: i for n, i in catalog["entries"].items() if n in BY_NAME and (root / i["path"]).exists()}
    return catalog


def _save(root: Path, catalog: dict) -> None:
    tmp = root / f".{CATALOG_FILE}.tmp"
    ordered = {n: catalog["entries"][n] for n in BY_NAME if n in catalog["entries"]}
    tmp.write_text(json.dumps({**catalog, "entries": ordered}, indent=2) + "\n")
    os.replace(tmp, root / CATALOG_FILE)


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Serialize writers (e.g. pytest-xdist workers) sharing one catalog root."""
    with open(root / ".catalog.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
