"""Compressed-MoE artifacts (shared core + per-expert low-rank wrappers, FORMATS.md §4).

The wrappers are computed from a real tiny qwen3_moe checkpoint: for every layer and
projection the core is the mean of the experts' weights and the wrappers are small random
low-rank factors, so each reconstructed expert differs from the core and from the others.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml

from ._files import fresh_dir, one_thread, quiet, read_json, seeded, write_json
from .tokenizer import write_tokenizer

LAYOUTS = ("checkpoint-N", "checkpoint-0", "documented")
FAULTS = ("no-non-moe", "missing-projection", "duplicated-buffers", "dtype-mismatch")
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
WRAPPER_SCALE = 0.2
ROUTER_NOISE = 0.01
NUM_STEPS = 10
LR = 1e-4

_FAULT_LAYOUTS = {
    "no-non-moe": ("checkpoint-N", "documented"),
    "missing-projection": LAYOUTS,
    "duplicated-buffers": ("checkpoint-N", "documented"),
    "dtype-mismatch": ("checkpoint-N", "documented"),
}


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


def naive_expert(core: torch.Tensor, w: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The same expert through the dense identity-plus-low-rank matrices (for tests)."""
    c = core.double()
    eye_out = torch.eye(c.shape[0], dtype=c.dtype)
    eye_in = torch.eye(c.shape[1], dtype=c.dtype)
    left = eye_out + w["U_out"].double() @ w["V_out"].double().T
    right = eye_in + w["U_in"].double() @ w["V_in"].double().T
    return (left @ c @ right).to(core.dtype)


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
) -> Path:
    """Write a compressed-MoE artifact of the qwen3_moe checkpoint in ``original_dir``.

    ``out`` is the experiment's base directory (replaced if it exists). ``checkpoint-N`` and ``checkpoint-0`` write
    ``out/compression_config.yaml`` + ``out/compression_stats.yaml`` and return
    ``out/checkpoints/checkpoint-{step}`` (or ``checkpoint-0``); ``documented`` returns ``out``
    itself with ``compression_config.json`` and ``compression_statistics.yaml`` inside.
    ``model_name`` overrides the recorded original model (default: ``original_dir``).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown compressed layout {layout!r}; expected one of {LAYOUTS}")
    if fault is not None and layout not in _FAULT_LAYOUTS.get(fault, ()):
        raise ValueError(f"fault {fault!r} does not apply to layout {layout!r}")
    with one_thread():
        return _write(Path(out), layout, Path(original_dir), rank, fault, seed, dtype, biases, model_name, step)


def _write(out: Path, layout: str, original_dir: Path, rank: int, fault: str | None, seed: int,
           dtype: torch.dtype, biases: bool, model_name: str | None, step: int) -> Path:
    original_dir = Path(original_dir).absolute()
    out = fresh_dir(Path(out))
    experts, config = _original_experts(original_dir)
    layers = _compress(experts, config, rank, seed, dtype, biases)
    if fault == "missing-projection":
        del layers[(config["num_hidden_layers"] - 1, "down_proj")]
    settings = {"model_name": model_name or str(original_dir), "rank": rank, "num_steps": NUM_STEPS,
                "lr": LR, "projections": list(PROJECTIONS)}
    stats = _stats(experts, layers, config, dtype)

    if layout == "documented":
        ckpt = out
        write_json(ckpt / "compression_config.json", settings)
        (ckpt / "compression_statistics.yaml").write_text(yaml.safe_dump(stats, sort_keys=False))
    else:
        ckpt = out / "checkpoints" / ("checkpoint-0" if layout == "checkpoint-0" else f"checkpoint-{step}")
        ckpt.mkdir(parents=True)
        (out / "compression_config.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
        (out / "compression_stats.yaml").write_text(yaml.safe_dump(stats, sort_keys=False))

    for (layer, proj), data in sorted(layers.items()):
        (ckpt / f"layer_{layer}").mkdir(exist_ok=True)
        torch.save(data, ckpt / f"layer_{layer}" / f"{proj}.pt")
    if layout == "checkpoint-0":
        _write_zero_shot_extras(ckpt, experts, layers)
        return ckpt

    shutil.copy(original_dir / "config.json", ckpt / "config.json")
    write_tokenizer(ckpt)
    compressed = sorted({layer for layer, _ in layers})
    write_json(ckpt / "compressed_metadata.json", {
        "compressed_layer_indices": compressed,
        "num_compressed_layers": len(compressed),
        "total_layers": config["num_hidden_layers"],
    })
    if fault != "no-non-moe":
        non_moe = _non_moe_weights(original_dir, seed, torch.bfloat16 if fault == "dtype-mismatch" else dtype)
        if fault == "duplicated-buffers":
            non_moe.update(_core_copies(layers, config["num_experts"]))
        torch.save(non_moe, ckpt / "non_moe_weights.pt")
    return ckpt


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
    return {n: t.to(dtype) if t.is_floating_point() else t for n, t in out.items()}


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
