"""PEFT LoRA adapters written by ``PeftModel.save_pretrained`` on top of a tiny base."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from modelkit.testing._files import fresh_dir, quiet, seeded, write_json

B_SCALE = 0.1  # keeps a "trained" adapter's delta small next to the base weights


def load_base(base_dir: Path):
    """The base model as a training script would load it (``name_or_path`` = ``base_dir``)."""
    from transformers import AutoModelForCausalLM

    with quiet():
        return AutoModelForCausalLM.from_pretrained(str(Path(base_dir).absolute()), dtype=torch.float32).eval()


def lora_config(r: int, alpha: int, target_modules: Sequence[str], *, trained: bool, use_rslora: bool = False,
                dropout: float = 0.05, **kwargs):
    """A causal-LM ``LoraConfig``; ``trained=True`` asks PEFT for random (non-zero) B."""
    from peft import LoraConfig

    return LoraConfig(
        r=r, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=dropout,
        use_rslora=use_rslora, init_lora_weights=not trained, task_type="CAUSAL_LM", **kwargs,
    )


def shrink_lora_b(model, adapter: str) -> None:
    """Scale an adapter's random B down so the adapted model stays close to its base."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f".lora_B.{adapter}." in name:
                param.mul_(B_SCALE)


def write_peft_lora(
    out: Path,
    base_dir: Path,
    r: int = 4,
    alpha: int = 8,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    use_rslora: bool = False,
    seed: int = 1,
    trained: bool = True,
    *,
    base_name: str | None = None,
    bin: bool = False,
) -> Path:
    """Write a LoRA adapter for the model in ``base_dir`` into ``out`` (replaced if it
    exists) with PEFT's ``save_pretrained``; returns ``out``.

    ``trained=False`` keeps PEFT's initialisation (every B zero: the untrained-adapter
    fault). ``base_name`` replaces ``base_model_name_or_path`` (e.g. a hub name that is
    not available offline); ``bin=True`` writes legacy ``adapter_model.bin``.
    """
    from peft import get_peft_model

    out = fresh_dir(Path(out))
    base = load_base(base_dir)
    with seeded(seed), quiet():
        model = get_peft_model(base, lora_config(r, alpha, target_modules, trained=trained, use_rslora=use_rslora))
        if trained:
            shrink_lora_b(model, "default")
        model.save_pretrained(out, safe_serialization=not bin)
    if base_name is not None:
        config = json.loads((out / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = base_name
        write_json(out / "adapter_config.json", config)
    return out
