"""Compressed-MoE artifacts (shared core + per-expert low-rank wrappers, FORMATS.md §4).

The wrappers are computed from a real tiny qwen3_moe checkpoint: for every layer and
projection the core is the mean of the experts' weights and the wrappers are small random
low-rank factors, so each reconstructed expert differs from the core and from the others.
"""
from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml

from modelkit.io.tensors import dtype_name
from modelkit.testing._files import (
    fresh_dir,
    one_thread,
    quiet,
    read_json,
    seeded,
    write_json,
)
from modelkit.testing.tokenizer import write_tokenizer

LAYOUTS = ("checkpoint-N", "checkpoint-0", "documented", "early-compressed", "tmp")
FAULTS = ("no-non-moe", "missing-projection", "duplicated-buffers", "dtype-mismatch", "trained-copies-differ",
          "crashed-checkpoint")
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
WRAPPER_SCALE = 0.2
ROUTER_NOISE = 0.01
CORE_DRIFT = 2e-3       # how far the optimizer moved the shared core away from the copies the forward used
NUM_STEPS = 10
LR = 1e-4
TRAINER_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin")

_FAULT_LAYOUTS = {
    "no-non-moe": ("checkpoint-N", "documented"),
    "missing-projection": ("checkpoint-N", "checkpoint-0", "documented", "early-compressed"),
    "duplicated-buffers": ("checkpoint-N", "documented"),
    "dtype-mismatch": ("checkpoint-N", "documented"),
    "trained-copies-differ": ("checkpoint-N",),
    "crashed-checkpoint": ("checkpoint-N", "checkpoint-0"),
}


@dataclasses.dataclass
class TrainingArguments:
    """Stands in for ``transformers.TrainingArguments`` in ``training_args.bin``: a pickle of
    a Python object (never tensors), which no reader may unpickle."""

    output_dir: str
    learning_rate: float = LR
    max_steps: int = NUM_STEPS
    bf16: bool = True


def reconstruct_expert(core: torch.Tensor, w: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``W_e = (I + U_out V_out^T) C (I + U_in V_in^T)`` without forming a d x d matrix.

    Computed in float32 as ``C + U_out(V_out^T C) + (C U_in)V_in^T + U_out((V_out^T C U_in) V_in^T)``
    and returned in ``core``'s dtype.
    """
    c = core.float()
    u_in, v_in, u_out, v_out = (w[k].float() for k in ("U_in", "V_in", "U_out", "V_out"))
    vc = v_out.T @ c
    out = c + u_out @ vc + (c @ u_in) @ v_in.T + u_out @ ((vc @ u_in) @ v_in.T)
    return out.to(core.dtype)


def naive_expert(core: torch.Tensor, w: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    """The same expert through the dense identity-plus-low-rank matrices, in float64
    (for tests), returned in ``dtype`` (default: the core's)."""
    c = core.double()
    eye_out = torch.eye(c.shape[0], dtype=c.dtype)
    eye_in = torch.eye(c.shape[1], dtype=c.dtype)
    left = eye_out + w["U_out"].double() @ w["V_out"].double().T
    right = eye_in + w["U_in"].double() @ w["V_in"].double().T
    return (left @ c @ right).to(dtype or core.dtype)


def expert_key(layer: int, expert: int, proj: str) -> str:
    """The on-disk (per-expert) name of one expert projection in a plain HF checkpoint."""
    return f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"


def expected_expert_weights(layer_files: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Materialize every expert of loaded ``layer_i/{proj}.pt`` dicts under on-disk names."""
    out = {}
    for data in layer_files.values():
        for e, wrapper in enumerate(data["wrappers"]):
            out[expert_key(data["layer_idx"], e, data["projection"])] = reconstruct_expert(data["core"], wrapper)
    return out


def trained_expert_weights(ckpt: Path, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """The experts the trained forward used, in ``dtype``: each expert's own ``core`` copy
    from the Trainer's ``model.safetensors`` with its wrappers (read with plain
    safetensors, reconstructed densely): the ground truth for tests."""
    from safetensors.torch import load_file

    state = load_file(str(Path(ckpt) / "model.safetensors"))
    out = {}
    pat = re.compile(r"model\.layers\.(\d+)\.mlp\.shared_core_layers\.(\w+)\.experts\.(\d+)\.core")
    for key, copy in state.items():
        m = pat.fullmatch(key)
        if m:
            pre = key.removesuffix(".core")
            w = {"U_in": state[f"{pre}.input_wrapper.U"], "V_in": state[f"{pre}.input_wrapper.V"],
                 "U_out": state[f"{pre}.output_wrapper.U"], "V_out": state[f"{pre}.output_wrapper.V"]}
            out[expert_key(int(m[1]), int(m[3]), m[2])] = naive_expert(copy, w, dtype)
    return out


def write_compressed_moe(
    out: Path,
    layout: str,
    original_dir: Path,
    rank: int = 2,
    fault: str | None = None,
    seed: int = 3,
    dtype: torch.dtype = torch.float32,
    *,
    biases: bool = False,
    model_name: str | None = None,
    step: int = 10,
    trainer: bool = True,
    transformers_version: str = "5",
    final_save: bool = False,
    model_dtype: torch.dtype | None = None,
) -> Path:
    """Write a compressed-MoE artifact of the qwen3_moe checkpoint in ``original_dir`` the way
    the compression project's own code writes it (FORMATS.md section 4.1).

    ``out`` is the experiment's base directory (replaced if it exists). Layouts:

    * ``checkpoint-N`` (distillation): ``out/compression_config.yaml`` + ``compression_stats.yaml``;
      ``out/checkpoints/checkpoint-{step}/`` with the compressed save (config.json, tokenizer,
      ``non_moe_weights.pt`` incl. float32 rotary buffers, ``compressed_metadata.json``,
      ``layer_{i}/{proj}.pt``) and, with ``trainer`` (default), the HF Trainer's own save:
      ``model.safetensors`` under the compressed in-memory names plus one ``core`` copy per
      expert (what the trained forward multiplied by), optimizer, scheduler, RNG state,
      ``trainer_state.json``, ``training_args.bin``, ``generation_config.json``. ``final_save``
      also writes the final compressed save into ``out/checkpoints/`` itself (returned);
    * ``checkpoint-0`` (zero-shot): ``layer_{i}/{proj}.pt`` + ``{proj}_metadata.json`` +
      ``extracted_weights/``, settings two levels up;
    * ``early-compressed`` (an earlier version): ``out`` itself holds the layer files,
      ``extracted_weights/``, ``compression_config.yaml`` dumped with ``!!python/object`` tags
      (an omegaconf ListConfig inside a dataclass) and ``compression_statistics.yaml``;
    * ``tmp`` (the latest version's zero-shot run): ``out/tmp/layer_{i}/{proj}.pt`` holding
      ``SharedCoreLayer.state_dict()`` (``core``, ``experts.{e}.{input,output}_wrapper.{U,V}``),
      ``out/tmp/extracted_weights/``, an empty ``out/checkpoints/checkpoint-0/``; returns ``out``;
    * ``documented``: ``out`` with ``compression_config.json`` + ``compression_statistics.yaml``.

    ``dtype``: the compressed tensors'; ``model_dtype``: the non-expert tensors' (default: the
    same, or bfloat16 for the ``dtype-mismatch`` fault). ``transformers_version`` "4" writes
    config.json with 4.x field names (``num_experts``, ``rope_theta``, ``torch_dtype``).
    Faults: ``trained-copies-differ`` (the optimizer moved the shared core away from the
    per-expert copies the forward used), ``crashed-checkpoint`` (a newer ``checkpoint-{2*step or 2}/``
    with only ``config.json`` + ``generation_config.json``; returns the experiment folder).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown compressed layout {layout!r}; expected one of {LAYOUTS}")
    if fault is not None and layout not in _FAULT_LAYOUTS.get(fault, ()):
        raise ValueError(f"fault {fault!r} does not apply to layout {layout!r}")
    if model_dtype is None:
        model_dtype = torch.bfloat16 if fault == "dtype-mismatch" else dtype
    with one_thread():
        return _write(Path(out), layout, Path(original_dir), rank, fault, seed, dtype, biases, model_name, step,
                      trainer, transformers_version, final_save, model_dtype)


def _write(out: Path, layout: str, original_dir: Path, rank: int, fault: str | None, seed: int,
           dtype: torch.dtype, biases: bool, model_name: str | None, step: int, trainer: bool,
           transformers_version: str, final_save: bool, model_dtype: torch.dtype) -> Path:
    original_dir = Path(original_dir).absolute()
    out = fresh_dir(Path(out))
    experts, config = _original_experts(original_dir)
    layers = _compress(experts, config, rank, seed, dtype, biases)
    if fault == "missing-projection":
        del layers[(config["num_hidden_layers"] - 1, "down_proj")]
    settings = {"model_name": model_name or str(original_dir), "rank": rank, "num_steps": NUM_STEPS,
                "lr": LR, "projections": list(PROJECTIONS)}
    stats = _stats(experts, layers, config, dtype)

    if layout == "tmp":
        return _write_latest_zero_shot(out, experts, layers, settings)
    if layout == "early-compressed":
        _write_layer_files(out, layers)
        _write_zero_shot_extras(out, experts, layers)
        (out / "compression_config.yaml").write_text(_tagged_settings_yaml(settings, out))
        (out / "compression_statistics.yaml").write_text(yaml.dump(stats, default_flow_style=False, sort_keys=False))
        return out
    if layout == "documented":
        ckpt = out
        write_json(ckpt / "compression_config.json", settings)
        (ckpt / "compression_statistics.yaml").write_text(yaml.safe_dump(stats, sort_keys=False))
    else:
        ckpt = out / "checkpoints" / ("checkpoint-0" if layout == "checkpoint-0" else f"checkpoint-{step}")
        ckpt.mkdir(parents=True)
        (out / "compression_config.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
        (out / "compression_stats.yaml").write_text(yaml.safe_dump(stats, sort_keys=False))

    copies = {key: data["core"].clone() for key, data in layers.items()}
    if fault == "trained-copies-differ":  # the optimizer moved the shared core; the forward used the copies
        with seeded(seed + 2):
            for data in layers.values():
                data["core"] = (data["core"].float() + CORE_DRIFT * torch.randn(data["core"].shape)).to(dtype)
    _write_layer_files(ckpt, layers)
    if layout == "checkpoint-0":
        _write_zero_shot_extras(ckpt, experts, layers)
        if fault == "crashed-checkpoint":
            _write_crashed(out / "checkpoints" / "checkpoint-2", original_dir, transformers_version)
            return out
        return ckpt

    non_moe = None
    if fault != "no-non-moe":
        non_moe = _non_moe_weights(original_dir, seed, model_dtype)
        if fault == "duplicated-buffers":
            non_moe.update(_core_copies(layers, config["num_experts"]))
    _write_compressed_save(ckpt, original_dir, config, layers, non_moe, transformers_version, model_dtype)
    if trainer and layout == "checkpoint-N":
        _write_trainer_save(ckpt, layers, copies, non_moe if non_moe is not None
                            else _non_moe_weights(original_dir, seed, model_dtype), step)
        shutil.copy(original_dir / "generation_config.json", ckpt / "generation_config.json")
    if final_save:
        _write_compressed_save(out / "checkpoints", original_dir, config, layers, non_moe, transformers_version,
                               model_dtype)
        _write_layer_files(out / "checkpoints", layers)
        ckpt = out / "checkpoints"
    if fault == "crashed-checkpoint":
        _write_crashed(out / "checkpoints" / f"checkpoint-{2 * step}", original_dir, transformers_version)
        return out
    return ckpt


def _write_layer_files(folder: Path, layers) -> None:
    """``layer_{i}/{proj}.pt`` as ``save_compressed_model`` writes them."""
    for (layer, proj), data in sorted(layers.items()):
        (folder / f"layer_{layer}").mkdir(parents=True, exist_ok=True)
        torch.save(data, folder / f"layer_{layer}" / f"{proj}.pt")


def _write_compressed_save(folder: Path, original_dir: Path, config, layers, non_moe, transformers_version: str,
                           model_dtype: torch.dtype) -> None:
    """The rest of ``save_compressed_model``: config, tokenizer, non-MoE weights, metadata."""
    _write_config(folder / "config.json", original_dir, transformers_version, model_dtype)
    write_tokenizer(folder)
    compressed = sorted({layer for layer, _ in layers})
    write_json(folder / "compressed_metadata.json", {
        "compressed_layer_indices": compressed,
        "num_compressed_layers": len(compressed),
        "total_layers": config["num_hidden_layers"],
    })
    if non_moe is not None:
        torch.save(non_moe, folder / "non_moe_weights.pt")


def _write_config(path: Path, original_dir: Path, transformers_version: str, model_dtype: torch.dtype) -> None:
    """The original config as ``config.save_pretrained`` of transformers 4.x or 5.x writes it."""
    config = read_json(original_dir / "config.json")
    name = dtype_name(model_dtype)
    if transformers_version.startswith("4"):
        config = dict(config)
        config["num_experts"] = config.pop("num_local_experts", config.get("num_experts"))
        rope = config.pop("rope_parameters", None) or {}
        config["rope_theta"] = rope.get("rope_theta", 10000.0)
        config.pop("dtype", None)
        config["torch_dtype"] = name
        config["transformers_version"] = "4.57.1"
    elif name != config.get("dtype"):
        config = {**config, "dtype": name}
    write_json(path, config)


def _write_trainer_save(ckpt: Path, layers, copies, non_moe, step: int) -> None:
    """What the HF Trainer itself writes into checkpoint-N: ``model.safetensors`` of the
    compressed model's state dict (in-memory names; each expert's ``core`` buffer, a separate
    copy after the device move), optimizer, scheduler, RNG state, trainer state, args."""
    import random

    import numpy as np
    from safetensors.torch import save_file

    state = {n: t.clone() for n, t in non_moe.items() if "rotary_emb" not in n}  # rotary buffers: not persistent
    for (layer, proj), data in sorted(layers.items()):
        pre = f"model.layers.{layer}.mlp.shared_core_layers.{proj}"
        state[f"{pre}.core"] = data["core"].clone()
        for e, w in enumerate(data["wrappers"]):
            state[f"{pre}.experts.{e}.core"] = copies[(layer, proj)].clone()
            state[f"{pre}.experts.{e}.input_wrapper.U"] = w["U_in"].clone()
            state[f"{pre}.experts.{e}.input_wrapper.V"] = w["V_in"].clone()
            state[f"{pre}.experts.{e}.output_wrapper.U"] = w["U_out"].clone()
            state[f"{pre}.experts.{e}.output_wrapper.V"] = w["V_out"].clone()
            if "biases" in data:
                state[f"{pre}.experts.{e}.bias"] = data["biases"][e].clone()
    save_file(state, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    trainable = [t for n, t in state.items() if "wrapper" in n][:4]
    torch.save({"state": {i: {"step": torch.tensor(float(step)), "exp_avg": torch.zeros_like(t),
                              "exp_avg_sq": torch.zeros_like(t)} for i, t in enumerate(trainable)},
                "param_groups": [{"lr": LR, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
                                  "params": list(range(len(trainable)))}]}, ckpt / "optimizer.pt")
    torch.save({"base_lrs": [LR], "last_epoch": step, "_step_count": step + 1, "_last_lr": [LR]},
               ckpt / "scheduler.pt")
    torch.save({"python": random.Random(step).getstate(), "numpy": np.random.RandomState(step).get_state(),
                "cpu": torch.random.get_rng_state()}, ckpt / "rng_state.pth")
    write_json(ckpt / "trainer_state.json", {
        "best_metric": None, "best_model_checkpoint": None, "epoch": 0.01, "global_step": step,
        "is_hyper_param_search": False, "is_local_process_zero": True, "is_world_process_zero": True,
        "log_history": [{"epoch": 0.01, "loss": 1.5, "step": step, "learning_rate": LR}],
        "max_steps": NUM_STEPS * 10, "save_steps": step, "train_batch_size": 1})
    torch.save(TrainingArguments(output_dir=str(ckpt.parent)), ckpt / "training_args.bin")


def _write_crashed(folder: Path, original_dir: Path, transformers_version: str) -> None:
    """A Trainer save that crashed after writing the config (nothing else)."""
    folder.mkdir(parents=True)
    _write_config(folder / "config.json", original_dir, transformers_version, torch.float32)
    shutil.copy(original_dir / "generation_config.json", folder / "generation_config.json")


def _write_latest_zero_shot(out: Path, experts, layers, settings) -> Path:
    """The latest version: ``SharedCoreLayer.state_dict()`` files in ``tmp/``, the extracted
    originals beside them, and the ``checkpoint-0/`` it never fills (it crashes first)."""
    tmp = out / "tmp"
    for (layer, proj), data in sorted(layers.items()):
        state = {"core": data["core"].clone()}
        for e, w in enumerate(data["wrappers"]):
            state[f"experts.{e}.input_wrapper.U"] = w["U_in"].clone()
            state[f"experts.{e}.input_wrapper.V"] = w["V_in"].clone()
            state[f"experts.{e}.output_wrapper.U"] = w["U_out"].clone()
            state[f"experts.{e}.output_wrapper.V"] = w["V_out"].clone()
            if "biases" in data:
                state[f"experts.{e}.bias"] = data["biases"][e].clone()
        (tmp / f"layer_{layer}").mkdir(parents=True, exist_ok=True)
        torch.save(state, tmp / f"layer_{layer}" / f"{proj}.pt")
    extracted = tmp / "extracted_weights"
    extracted.mkdir()
    for (layer, proj), weights in sorted(experts.items()):
        torch.save({"expert_weights": [w.clone() for w in weights], "num_experts": len(weights),
                    "d_out": weights[0].shape[0], "d_in": weights[0].shape[1]},
                   extracted / f"layer_{layer}_{proj}.pt")
    (out / "checkpoints" / "checkpoint-0").mkdir(parents=True)
    latest = {k: v for k, v in settings.items() if k != "projections"}
    latest.update({"output_dir": str(out / "checkpoints" / "checkpoint-0"), "config_dir": str(out),
                   "temp_dir": str(tmp)})
    (out / "compression_config.yaml").write_text(yaml.safe_dump(latest, sort_keys=False))  # OmegaConf.save: plain
    return out


def _tagged_settings_yaml(settings: dict[str, Any], out: Path) -> str:
    """``compression_config.yaml`` as the earlier version wrote it: ``yaml.dump(asdict(config))``
    where ``projections`` was still an omegaconf ``ListConfig``, so PyYAML emitted Python
    object tags, anchors and a back-reference to the parent container (omegaconf is not
    installed here: the text is PyYAML's output for it, reproduced)."""
    items = "".join(
        f"  - !!python/object:omegaconf.nodes.AnyNode\n"
        f"    _metadata: !!python/object:omegaconf.base.Metadata\n"
        f"      flags: {{}}\n      flags_root: false\n      key: {i}\n      object_type: null\n"
        f"      optional: true\n      ref_type: !!python/name:typing.Any ''\n"
        f"      resolver_cache: !!python/object/apply:collections.defaultdict\n"
        f"      - !!python/name:builtins.dict ''\n"
        f"    _parent: *id001\n    _val: {p}\n" for i, p in enumerate(settings["projections"]))
    return (f"lr: {settings['lr']}\n"
            f"model_name: {settings['model_name']}\n"
            f"num_steps: {settings['num_steps']}\n"
            f"output_dir: {out}\n"
            f"projections: &id001 !!python/object:omegaconf.listconfig.ListConfig\n"
            f"  _content:\n{items}"
            f"  _metadata: !!python/object:omegaconf.base.ContainerMetadata\n"
            f"    element_type: !!python/name:typing.Any ''\n    flags: {{}}\n    flags_root: false\n"
            f"    key: projections\n    key_type: !!python/name:builtins.int ''\n    object_type: !!python/name:builtins.list ''\n"
            f"    optional: true\n    ref_type: !!python/name:typing.Any ''\n"
            f"    resolver_cache: !!python/object/apply:collections.defaultdict\n"
            f"    - !!python/name:builtins.dict ''\n"
            f"  _parent: null\n"
            f"rank: {settings['rank']}\n")


def _original_experts(original_dir: Path) -> tuple[dict[tuple[int, str], list[torch.Tensor]], dict]:
    """Per-layer, per-projection expert weights read under their on-disk names."""
    from safetensors import safe_open

    config = read_json(original_dir / "config.json")
    num_experts = config.get("num_experts", config.get("num_local_experts"))
    config = {**config, "num_experts": num_experts}
    index = original_dir / "model.safetensors.index.json"
    files = sorted(set(read_json(index)["weight_map"].values())) if index.exists() else ["model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(original_dir / name, "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys() if ".mlp.experts." in k})
    experts = {}
    for layer in range(config["num_hidden_layers"]):
        for proj in PROJECTIONS:
            keys = [expert_key(layer, e, proj) for e in range(num_experts)]
            if all(k in tensors for k in keys):
                experts[(layer, proj)] = [tensors[k] for k in keys]
    return experts, config


def _compress(experts, config, rank: int, seed: int, dtype: torch.dtype, biases: bool) -> dict[tuple[int, str], dict]:
    layers = {}
    with seeded(seed):
        for (layer, proj), weights in sorted(experts.items()):
            d_out, d_in = weights[0].shape
            core = torch.stack([w.float() for w in weights]).mean(0)
            wrappers = [{
                "U_in": torch.randn(d_in, rank) * WRAPPER_SCALE,
                "V_in": torch.randn(d_in, rank) * WRAPPER_SCALE,
                "U_out": torch.randn(d_out, rank) * WRAPPER_SCALE,
                "V_out": torch.randn(d_out, rank) * WRAPPER_SCALE,
            } for _ in weights]
            data: dict[str, Any] = {
                "layer_idx": layer,
                "projection": proj,
                "core": core.to(dtype),
                "wrappers": [{k: v.to(dtype) for k, v in w.items()} for w in wrappers],
                "metadata": {"num_experts": len(weights), "d_in": d_in, "d_out": d_out, "rank": rank},
            }
            if biases:
                data["biases"] = [(torch.randn(d_out) * WRAPPER_SCALE).to(dtype) for _ in weights]
            layers[(layer, proj)] = data
    return layers


def _non_moe_weights(original_dir: Path, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the original except the experts; the router distilled."""
    from transformers import AutoModelForCausalLM

    with quiet():
        model = AutoModelForCausalLM.from_pretrained(str(original_dir), dtype=torch.float32)
    out = {n: p.detach().clone() for n, p in model.named_parameters() if "experts." not in n}
    out.update({n: b.detach().clone() for n, b in model.named_buffers() if "experts." not in n})
    with seeded(seed + 1):
        for name in sorted(out):
            if name.endswith(".mlp.gate.weight"):
                out[name] = out[name] + ROUTER_NOISE * torch.randn_like(out[name])
    # the rotary buffers stay float32 beside a bf16 model, by design
    return {n: t.to(dtype) if t.is_floating_point() and "rotary_emb" not in n else t for n, t in out.items()}


def _core_copies(layers, num_experts: int) -> dict[str, torch.Tensor]:
    """The per-expert ``core`` buffer copies a device move leaves in the state dict."""
    return {f"model.layers.{layer}.mlp.experts.{e}.{proj}.core": data["core"].clone()
            for (layer, proj), data in layers.items() for e in range(num_experts)}


def _write_zero_shot_extras(ckpt: Path, experts, layers) -> None:
    extracted = ckpt / "extracted_weights"
    extracted.mkdir()
    for (layer, proj), data in sorted(layers.items()):
        meta = data["metadata"]
        write_json(ckpt / f"layer_{layer}" / f"{proj}_metadata.json", {
            "layer_idx": layer, "projection": proj, **meta,
            "reconstruction_error": _relative_error(experts[(layer, proj)], data),
        })
        torch.save({"expert_weights": [w.clone() for w in experts[(layer, proj)]],
                    "num_experts": meta["num_experts"], "d_out": meta["d_out"], "d_in": meta["d_in"]},
                   extracted / f"layer_{layer}_{proj}.pt")


def _relative_error(weights, data) -> float:
    num = sum(float((reconstruct_expert(data["core"], w).float() - x.float()).norm() ** 2)
              for w, x in zip(data["wrappers"], weights))
    den = sum(float(x.float().norm() ** 2) for x in weights)
    return round((num / den) ** 0.5, 6)


def _stats(experts, layers, config, dtype: torch.dtype) -> dict[str, Any]:
    """Parameter counts and sizes, as ``compression_stats.yaml`` records them."""
    size = torch.tensor([], dtype=dtype).element_size()
    per_tok = config.get("num_experts_per_tok", 2)
    original = sum(w.numel() for ws in experts.values() for w in ws)
    active_original = sum(ws[0].numel() * per_tok for ws in experts.values())
    cores = sum(d["core"].numel() for d in layers.values())
    wrappers = sum(t.numel() for d in layers.values() for w in d["wrappers"] for t in w.values())
    per_expert = sum(sum(t.numel() for t in d["wrappers"][0].values()) for d in layers.values())
    return {
        "original_expert_params": original,
        "compressed_expert_params": cores + wrappers,
        "compression_fraction": round((cores + wrappers) / original, 6),
        "original_active_expert_params": active_original,
        "compressed_active_expert_params": cores + per_expert * per_tok,
        "storage_mb_original": round(original * size / 2**20, 6),
        "storage_mb_compressed": round((cores + wrappers) * size / 2**20, 6),
        "num_compressed_layers": len({layer for layer, _ in layers}),
    }
