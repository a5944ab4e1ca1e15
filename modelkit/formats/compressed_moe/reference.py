"""An independent float64 reference of a compressed-MoE artifact, for ``export --verify``.

It shares nothing with the view that load and export go through (``CompressedMoEArtifact.view``,
:func:`~modelkit.formats.compressed_moe.materialize`, ``TensorFile`` reads and transformers'
checkpoint conversion in ``disk_to_model``):

* the files are read with plain ``torch.load(weights_only=True)`` and ``safetensors``;
* every expert is formed in float64 from the four terms of FORMATS.md section 4,
  ``C + U_out (V_out^T C) + (C U_in) V_in^T + U_out ((V_out^T C U_in) V_in^T)``;
* the model is stock transformers: ``from_config`` (or ``from_pretrained`` of the original
  for a zero-shot save) in float64; the experts are written straight into its in-memory
  parameters (the fused ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]`` of
  transformers 5, or per-expert ``Linear`` modules), and ``load_state_dict`` must account for
  every stored non-expert tensor.

Only the artifact's file discovery (which layer files exist, which core the trained forward
used) is taken from the format.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkit.errors import BaseModelUnavailableError, LoadError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from modelkit.formats.compressed_moe import CompressedMoEArtifact

_EXPERT_KEY = re.compile(r"^experts\.(\d+)\.(input_wrapper|output_wrapper)\.([UV])$")
_ROTARY = re.compile(r"(?:^|\.)rotary_emb\.")
_COMPRESSED_PART = re.compile(r"(?:\.shared_core_layers\.|_wrapper\.[UV]$|\.experts\.\d+\.(?:\w+\.)?core$)")
# the plain per-expert loop: grouped_mm kernels have no float64
EAGER = {"experts_implementation": "eager"}


def expert_float64(core: "torch.Tensor", u_in, v_in, u_out, v_out) -> "torch.Tensor":
    """``(I + U_out V_out^T) C (I + U_in V_in^T)`` in float64, as the four terms of FORMATS.md."""
    c, u_in, v_in, u_out, v_out = (t.double() for t in (core, u_in, v_in, u_out, v_out))
    vc = v_out.T @ c
    return c + u_out @ vc + (c @ u_in) @ v_in.T + u_out @ ((vc @ u_in) @ v_in.T)


def _layer_parts(data: Any, where: Path) -> tuple["torch.Tensor", dict[int, dict[str, "torch.Tensor"]]]:
    """(shared core, expert -> {U_in, V_in, U_out, V_out}) of one loaded layer file, in the
    ``save_compressed_model`` form or as a ``SharedCoreLayer.state_dict()``."""
    if not isinstance(data, dict) or "core" not in data:
        raise LoadError("not a compressed layer file (no core)", where)
    if data.get("biases") is not None or any(str(k).endswith(".bias") for k in data):
        raise LoadError("expert biases have no place in a stock qwen3_moe model", where)
    wrappers: dict[int, dict[str, Any]] = {}
    if isinstance(data.get("wrappers"), list):
        for e, w in enumerate(data["wrappers"]):
            wrappers[e] = {p: w[p] for p in ("U_in", "V_in", "U_out", "V_out")}
    else:
        names = {("input_wrapper", "U"): "U_in", ("input_wrapper", "V"): "V_in",
                 ("output_wrapper", "U"): "U_out", ("output_wrapper", "V"): "V_out"}
        for key, t in data.items():
            m = _EXPERT_KEY.match(str(key))
            if m:
                wrappers.setdefault(int(m[1]), {})[names[(m[2], m[3])]] = t
    return data["core"], wrappers


def _trainer_copies(path: Path) -> dict[tuple[int, str, int], "torch.Tensor"]:
    """(layer, projection, expert) -> the expert's own core copy in the Trainer's save."""
    from safetensors import safe_open

    pat = re.compile(r"^model\.layers\.(\d+)\.mlp\.shared_core_layers\.(\w+)\.experts\.(\d+)\.core$")
    out = {}
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            m = pat.match(key)
            if m:
                out[(int(m[1]), m[2], int(m[3]))] = f.get_tensor(key)
    return out


def _set_expert(experts_module, e: int, proj: str, weight: "torch.Tensor", where: str) -> None:
    """Write one expert projection into the stock model's in-memory parameters."""
    import torch

    with torch.no_grad():
        if hasattr(experts_module, "gate_up_proj") and proj in ("gate_proj", "up_proj"):
            fused = experts_module.gate_up_proj            # [E, 2I, H]: gate rows, then up rows
            half = fused.shape[1] // 2
            rows = slice(0, half) if proj == "gate_proj" else slice(half, 2 * half)
            target = fused[e, rows]
        elif hasattr(experts_module, "down_proj") and isinstance(experts_module.down_proj, torch.nn.Parameter):
            target = experts_module.down_proj[e]           # [H, I]
        elif isinstance(experts_module, torch.nn.ModuleList):
            target = getattr(experts_module[e], proj).weight
        else:
            raise LoadError(f"{where}: the stock model's experts ({type(experts_module).__name__}) have no "
                            f"{proj} the reference knows how to fill")
        if tuple(target.shape) != tuple(weight.shape):
            raise LoadError(f"{where}: expert {e} {proj} is {list(weight.shape)}, the model needs {list(target.shape)}")
        target.copy_(weight)


def reference_model(artifact: "CompressedMoEArtifact", base_path: Path | None, core: str | None = None):
    """(float64 stock model of the artifact, description), built as the module docstring says.

    ``core`` as in the view (``"copies"`` / ``"shared"``, default the artifact's). Raises
    LoadError when the artifact holds something the reference cannot place, and
    BaseModelUnavailableError when the original is needed but missing."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    core = core or artifact.default_core()
    folder = artifact.folder
    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        if artifact.non_experts_from_base or artifact._uncompressed_slots():
            if base_path is None:
                raise BaseModelUnavailableError("the reference needs the original model, which was not found", folder)
            model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float64,
                                                         trust_remote_code=False, **EAGER)
            how = f"the original {base_path} by stock from_pretrained in float64"
        else:
            model = AutoModelForCausalLM.from_config(artifact.config(), dtype=torch.float64, **EAGER)
            how = "stock from_config in float64"
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
    expert_param = re.compile(r"\.mlp\.experts\.")
    if artifact.has_non_moe:
        stored = torch.load(folder / "non_moe_weights.pt", map_location="cpu", weights_only=True)
        # rotary buffers are recomputed by the model; compressed parts stored here too (per-expert
        # core copies a device move left behind) are not the layer files' and are not used
        stored = {k: v for k, v in stored.items() if not _ROTARY.search(k) and not _COMPRESSED_PART.search(k)}
        result = model.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in stored.items()},
                                       strict=False)
        missing = [k for k in result.missing_keys if not expert_param.search(k)]
        if result.unexpected_keys or (missing and not artifact.non_experts_from_base):
            raise LoadError(f"non_moe_weights.pt does not fit the stock model: {len(result.unexpected_keys)} "
                            f"unexpected ({result.unexpected_keys[:3]}), {len(missing)} missing ({missing[:3]})",
                            folder / "non_moe_weights.pt")
        how += " + non_moe_weights.pt (torch.load)"
    copies = _trainer_copies(folder / "model.safetensors") if core == "copies" else {}
    layers = model.model.layers
    filled = 0
    for (layer, proj), rel in artifact.layer_files.items():
        data = torch.load(folder / rel, map_location="cpu", weights_only=True)
        shared, wrappers = _layer_parts(data, folder / rel)
        for e, w in sorted(wrappers.items()):
            c = copies.get((layer, proj, e), shared) if core == "copies" else shared
            if core == "copies" and (layer, proj, e) not in copies:
                raise LoadError(f"no core copy of expert {e} of layer {layer} {proj} in model.safetensors", folder)
            _set_expert(layers[layer].mlp.experts, e, proj,
                        expert_float64(c, w["U_in"], w["V_in"], w["U_out"], w["V_out"]), rel)
            filled += 1
    if filled == 0:
        raise LoadError("no layer_{i}/{proj}.pt files: no independent reference of this save", folder)
    how += (f" + {filled} experts formed in float64 from layer files"
            + (" with each expert's core copy (model.safetensors)" if core == "copies" else " (shared cores)"))
    return model.eval(), how
