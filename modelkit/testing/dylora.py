"""DyLoRA-MoE artifacts in the four layouts of FORMATS.md §3, and their faults.

Everything is taken from a real model: the tiny untied gemma base, ``get_peft_model`` /
``add_adapter`` for ``expert_0 .. expert_{E-1}`` on q/k/v/o_proj, and a router
``gate = nn.Linear(hidden, E, bias=True)``; the files are then written the way the
DyLoRA-MoE training script wrote them.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelkit.testing._files import fresh_dir, quiet, read_json, seeded, write_json
from modelkit.testing.peft_lora import load_base, lora_config, shrink_lora_b
from modelkit.testing.tokenizer import write_tokenizer

LAYOUTS = ("a-tiny-config", "a-full-config", "b", "c", "d")
FAULTS = (
    "adapter-name-twice", "empty-expert", "missing-router", "inconsistent-config",
    "untrained", "config-rewritten", "remote-code",
)
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
ARTIFACT_NAME = "best-dylora-model-full:v3"
SAVED_AT = "2025-06-01 12:00:00"
TEMPERATURE = 2.0

_FAULT_LAYOUTS = {
    "adapter-name-twice": ("a-tiny-config", "a-full-config", "b", "c", "d"),
    "empty-expert": ("b", "c", "d"),
    "missing-router": LAYOUTS,
    "inconsistent-config": LAYOUTS,
    "untrained": LAYOUTS,
    "config-rewritten": ("a-tiny-config", "a-full-config"),
    "remote-code": LAYOUTS,
}


class Router(nn.Module):
    """DyLoRA's router: one linear gate over the last hidden state."""

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        self.gate = nn.Linear(hidden_size, num_experts, bias=True)


class DyLoRAMoE(nn.Module):
    """The training wrapper whose ``state_dict`` is layout a's ``model.safetensors``."""

    def __init__(self, foundation_model: nn.Module, router: Router):
        super().__init__()
        self.foundation_model = foundation_model
        self.router = router


def expert_name(k: int) -> str:
    return f"expert_{k}"


def build_dylora(base_dir: Path, num_experts: int = 2, r: int = 4, alpha: int = 8, seed: int = 2,
                 trained: bool = True, dropout: float = 0.05) -> DyLoRAMoE:
    """A real PEFT model with ``num_experts`` LoRA adapters and a router (shared; read-only)."""
    base_dir = Path(base_dir).absolute()
    stamp = tuple((p.name, p.stat().st_mtime_ns) for p in sorted(base_dir.glob("*.safetensors")))
    return _build(str(base_dir), stamp, num_experts, r, alpha, seed, trained, dropout)


@functools.lru_cache(maxsize=8)
def _build(base_dir: str, stamp: tuple, num_experts: int, r: int, alpha: int, seed: int, trained: bool,
           dropout: float) -> DyLoRAMoE:
    from peft import get_peft_model

    base = load_base(Path(base_dir))

    def config():
        return lora_config(r, alpha, TARGET_MODULES, trained=trained, dropout=dropout)

    with seeded(seed), quiet():
        model = get_peft_model(base, config(), adapter_name=expert_name(0))
        for k in range(1, num_experts):
            model.add_adapter(expert_name(k), config())
        if trained:
            for k in range(num_experts):
                shrink_lora_b(model, expert_name(k))
        router = Router(base.config.hidden_size, num_experts)
    head, embed = base.get_output_embeddings(), base.get_input_embeddings()
    if head is not None and head.weight is embed.weight:
        # the real wrapper holds the head as its own copy of embed_tokens (its state dict,
        # and so every Trainer save, stores lm_head.weight equal to embed_tokens.weight)
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
    return DyLoRAMoE(model, router).eval()


def write_dylora(
    out: Path,
    layout: str,
    base_dir: Path,
    num_experts: int = 2,
    r: int = 4,
    alpha: int = 8,
    fault: str | None = None,
    seed: int = 2,
    *,
    dropout: float = 0.05,
    base_name: str | None = None,
    step: int = 100,
) -> Path:
    """Write a DyLoRA-MoE artifact under ``out`` (the trainer's ``output_dir``; replaced).

    Returns the directory a user would point modelkit at: ``out/best_model`` for layouts
    a and b (layout a's ``dylo_moe_state/`` is its sibling ``out/dylo_moe_state``),
    ``out/checkpoint-{step}`` for c, and ``out/artifacts/best-dylora-model-full:v3`` for d.
    ``base_name`` overrides the recorded ``base_model_name_or_path`` (default: ``base_dir``).
    In layout d the fault is applied to ``best_model/`` only.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown DyLoRA layout {layout!r}; expected one of {LAYOUTS}")
    if fault is not None and layout not in _FAULT_LAYOUTS.get(fault, ()):
        raise ValueError(f"fault {fault!r} does not apply to layout {layout!r}")
    out = fresh_dir(Path(out))
    model = build_dylora(base_dir, num_experts, r, alpha, seed, fault != "untrained", dropout)
    spec = _Spec(model, Path(base_dir).absolute(), base_name or str(Path(base_dir).absolute()),
                 num_experts, r, alpha, dropout, fault, seed)
    if layout.startswith("a-"):
        return _write_a(out, spec, layout == "a-full-config")
    if layout == "b":
        return _write_b(out / "best_model", spec)
    if layout == "c":
        return _write_c(out / f"checkpoint-{step}", spec, step)
    return _write_d(out / "artifacts" / ARTIFACT_NAME, spec, step)


@dataclasses.dataclass
class _Spec:
    """What every layout writer needs to know about the model it serializes."""

    model: DyLoRAMoE
    base_dir: Path
    base_name: str
    num_experts: int
    r: int
    alpha: int
    dropout: float
    fault: str | None
    seed: int

    def replace(self, **changes: Any) -> "_Spec":
        return dataclasses.replace(self, **changes)

    @property
    def bad_expert(self) -> int:
        """The expert a per-expert fault is applied to (the last one)."""
        return self.num_experts - 1

    def base_config(self) -> dict[str, Any]:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(self.base_dir)).to_dict()


# --- layout a: legacy full state dict -----------------------------------------------------

def _write_a(out: Path, spec: _Spec, full_config: bool) -> Path:
    from safetensors.torch import save_file

    best = out / "best_model"
    best.mkdir()
    state = _wrapper_state(spec.model)
    if spec.fault == "adapter-name-twice":
        state = _double_adapter_name(state, expert_name(spec.bad_expert))
    if spec.fault == "missing-router":
        state = {k: v for k, v in state.items() if not k.startswith("router.")}
    save_file(state, best / "model.safetensors", metadata={"format": "pt"})  # what Trainer._save writes
    if full_config:
        config = spec.base_config()
        config.update({"_dylora_num_experts": spec.num_experts, "_dylora_lora_r": spec.r,
                       "_dylora_lora_alpha": spec.alpha, "_dylora_lora_dropout": spec.dropout})
    else:
        config = {"model_type": "dylora-moe", "base_model_name_or_path": spec.base_name,
                  "num_experts": spec.num_experts, "lora_r": spec.r, "lora_alpha": spec.alpha,
                  "lora_dropout": spec.dropout, "saved_at": SAVED_AT}
    if spec.fault == "config-rewritten":  # the bad loader's "fix": the plain base config
        config = spec.base_config()
    _write_config(best, config, spec)
    write_tokenizer(best)
    _write_state_dir(out / "dylo_moe_state", spec, legacy=True)
    return best


# --- layout b: best_model with PEFT-separated experts --------------------------------------

def _write_b(best: Path, spec: _Spec) -> Path:
    best.mkdir(parents=True)
    adapters = best / "peft_adapters"
    adapters.mkdir()
    for k in range(spec.num_experts):
        name = expert_name(k)
        weights = _expert_weights(spec.model, name)
        if k == spec.bad_expert and spec.fault == "adapter-name-twice":
            weights = _double_adapter_name(weights, name)
        if k == spec.bad_expert and spec.fault == "empty-expert":
            weights = {}  # only requires_grad tensors were collected, and this expert had none
        torch.save(weights, adapters / f"{name}.pt")
    _write_state_dir(best / "dylo_moe_state", spec, legacy=False)
    write_tokenizer(best)
    config = spec.base_config()
    config.update({
        "model_type": "dylora-moe",
        "base_model_name_or_path": spec.base_name,
        "_dylora_num_experts": spec.num_experts,
        "_dylora_lora_r": spec.r,
        "_dylora_lora_alpha": spec.alpha,
        "_dylora_lora_dropout": spec.dropout,
        "_dylora_trained": True,
        "_dylora_saved_at": SAVED_AT,
        "_dylora_format": "peft_separated",
    })
    _write_config(best, config, spec)
    return best


def _expert_weights(model: DyLoRAMoE, adapter: str) -> dict[str, torch.Tensor]:
    """``ExpertManager.get_expert_weights``: full PEFT names that contain the adapter name."""
    return {n: p.detach().clone() for n, p in model.foundation_model.named_parameters() if f".{adapter}." in n}


# --- layout c: trainer checkpoint ----------------------------------------------------------

def _write_c(ckpt: Path, spec: _Spec, step: int) -> Path:
    from safetensors.torch import load_file, save_file

    ckpt.mkdir(parents=True)
    peft_model = spec.model.foundation_model
    for k in range(spec.num_experts):
        name = expert_name(k)
        with quiet():  # PEFT nests a non-default adapter: expert_k/expert_k/
            peft_model.save_pretrained(ckpt / "peft_adapters" / name, selected_adapters=[name])
        nested = ckpt / "peft_adapters" / name / name
        if spec.base_name != str(spec.base_dir):
            _set_base_name(nested / "adapter_config.json", spec.base_name)
        if k == spec.bad_expert and spec.fault in ("adapter-name-twice", "empty-expert"):
            weights = load_file(nested / "adapter_model.safetensors")
            weights = {} if spec.fault == "empty-expert" else _double_adapter_name(weights, name)
            save_file(weights, nested / "adapter_model.safetensors", metadata={"format": "pt"})
    if spec.fault != "missing-router":
        save_file({k: v.detach().contiguous() for k, v in spec.model.router.state_dict().items()},
                  ckpt / "router.safetensors")
    _write_config(ckpt, {
        "model_type": "dylora-moe",
        "_dylora_format": "peft_separated",
        "_dylora_checkpoint_step": step,
        "base_model_name_or_path": spec.base_name,
        "num_experts": spec.num_experts,
        "checkpoint_type": "peft_only",
        "_note": "This is a PEFT-only checkpoint. Full model weights are NOT saved to save disk space.",
    }, spec)
    _write_trainer_files(ckpt, spec, step)
    return ckpt


def _write_trainer_files(ckpt: Path, spec: _Spec, step: int) -> None:
    """``trainer_state.json``, ``optimizer.pt`` and ``scheduler.pt`` as the Trainer writes them."""
    from transformers.optimization import get_linear_schedule_with_warmup
    from transformers.trainer_callback import TrainerState

    params = [nn.Parameter(p.detach().clone()) for n, p in spec.model.named_parameters() if ".lora_" in n]
    params += [nn.Parameter(p.detach().clone()) for p in spec.model.router.parameters()]
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.05)
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=10, num_training_steps=1000)
    with seeded(step):
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        optimizer.step()
        scheduler.step()
    torch.save(optimizer.state_dict(), ckpt / "optimizer.pt")
    torch.save(scheduler.state_dict(), ckpt / "scheduler.pt")
    TrainerState(
        epoch=step / 100, global_step=step, max_steps=1000, logging_steps=50, eval_steps=50,
        save_steps=50, train_batch_size=4, num_train_epochs=10,
        log_history=[{"epoch": s / 100, "loss": round(2.5 - s / 1000, 4), "step": s} for s in range(50, step + 1, 50)],
        best_metric=None, best_model_checkpoint=None,
    ).save_to_json(str(ckpt / "trainer_state.json"))


# --- layout d: W&B artifact root -------------------------------------------------------------

def _write_d(root: Path, spec: _Spec, step: int) -> Path:
    """``best_model/`` in layout b plus two trainer checkpoints; the earlier one differs."""
    root.mkdir(parents=True)
    _write_b(root / "best_model", spec)
    trained = spec.fault != "untrained"
    for s, seed in ((step // 2, spec.seed + 1), (step, spec.seed)):
        model = build_dylora(spec.base_dir, spec.num_experts, spec.r, spec.alpha, seed, trained, spec.dropout)
        _write_c(root / f"checkpoint-{s}", spec.replace(model=model, fault=None), s)
    (root / "trainer_state.json").write_text((root / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return root


# --- shared pieces ---------------------------------------------------------------------------

def _write_state_dir(folder: Path, spec: _Spec, legacy: bool) -> None:
    """``dylo_moe_state/``: ``router.pt`` (unless the router is missing) and ``skill_library.pt``."""
    folder.mkdir(parents=True)
    gate = spec.model.router.gate
    if spec.fault != "missing-router":
        state: dict[str, Any] = {
            "gate_state_dict": {k: v.detach().clone() for k, v in gate.state_dict().items()},
            "num_experts": spec.num_experts,
            "input_size": gate.in_features,
            "top_k": 1,
            "temperature": TEMPERATURE,
        }
        if legacy:
            state["expert_maturity"] = torch.ones(spec.num_experts)
        torch.save(state, folder / "router.pt")
    torch.save({
        "num_skills": spec.num_experts,
        "skills": {expert_name(k): {"expert_id": k, "samples_seen": 1000 * (k + 1)} for k in range(spec.num_experts)},
    }, folder / "skill_library.pt")


def _write_config(folder: Path, config: dict[str, Any], spec: _Spec) -> None:
    config = dict(config)
    if spec.fault == "inconsistent-config":
        config["num_experts"] = spec.num_experts + 1
        config["_dylora_num_experts"] = spec.num_experts
    if spec.fault == "remote-code":
        config["auto_map"] = {
            "AutoConfig": "configuration_dylora.DyLoRAMoEConfig",
            "AutoModelForCausalLM": "modeling_dylora.DyLoRAMoEForCausalLM",
        }
        for module in ("configuration_dylora", "modeling_dylora"):
            (folder / f"{module}.py").write_text(_REMOTE_CODE.format(module=module))
    write_json(folder / "config.json", config)


_REMOTE_CODE = '''"""Remote code shipped with the artifact; modelkit must never import it."""
import pathlib

pathlib.Path(__file__).with_name("REMOTE_CODE_EXECUTED").write_text("{module}")
'''


def _double_adapter_name(weights: dict[str, torch.Tensor], adapter: str) -> dict[str, torch.Tensor]:
    """``lora_A.expert_k.weight`` (or PEFT's ``lora_A.weight``) -> ``lora_A.expert_k.expert_k.weight``."""
    out = {}
    for name, tensor in weights.items():
        for part in ("lora_A", "lora_B"):
            if f".{part}.{adapter}." in name:
                name = name.replace(f".{part}.{adapter}.", f".{part}.{adapter}.{adapter}.")
            elif f".{part}.weight" in name:
                name = name.replace(f".{part}.weight", f".{part}.{adapter}.{adapter}.weight")
        out[name] = tensor
    return out


def _set_base_name(adapter_config: Path, base_name: str) -> None:
    config = read_json(adapter_config)
    config["base_model_name_or_path"] = base_name
    write_json(adapter_config, config)


# --- whole training runs, era by era (FORMATS.md §3.1) ---------------------------------------

ERAS = ("early", "early-full-config", "middle", "middle-config", "middle-peft-only", "late")
RUN_FAULTS = ("loader-rewrote-config", "trainer-copy-differs")
RUN_STEPS = (50, 100)


def write_dylora_run(out: Path, era: str, base_dir: Path, num_experts: int = 2, r: int = 4, alpha: int = 8,
                     fault: str | None = None, seed: int = 2, *, dropout: float = 0.05,
                     base_name: str | None = None) -> Path:
    """The trainer's ``output_dir`` as one era of the real DyLoRA-MoE code leaves it (replaced).

    Every era has ``best_model/`` and ``checkpoint-50/``, ``checkpoint-100/`` (each written
    from its own model: checkpoints differ from each other and from the best model):

    * ``early`` / ``early-full-config``: ``best_model/`` in layout a (whole wrapper,
      ``lm_head.weight`` stored as a copy of ``embed_tokens``; tiny or full config,
      ``training_args.bin``); Trainer-only checkpoints (``model.safetensors``, optimizer,
      scheduler, ``rng_state.pth``, ``trainer_state.json``, ``training_args.bin``,
      tokenizer; no ``config.json``, no ``dylo_moe_state/``); ``dylo_moe_state/`` of
      ``best_model`` in the results root beside them.
    * ``middle`` (no config), ``middle-config`` (``{"num_experts"}`` only): ``best_model/`` in
      layout b; checkpoints with flat ``peft_adapters/expert_k.pt``, their own
      ``dylo_moe_state/`` and the Trainer's ``model.safetensors`` (a second complete copy).
      ``middle-peft-only``: the same without that copy.
    * ``late``: ``best_model/`` in layout b, checkpoints in layout c (with ``README.md``).

    Faults: ``loader-rewrote-config`` (``best_model/config.json`` as the real evaluation
    loader rewrites it: the base ``model_type``, ``_dylora_original_type``, r/alpha null);
    ``trainer-copy-differs`` (middle eras: the Trainer copy of ``checkpoint-100`` holds a
    different expert_0 than ``peft_adapters/``). Returns ``out``.
    """
    if era not in ERAS:
        raise ValueError(f"unknown DyLoRA era {era!r}; expected one of {ERAS}")
    if fault is not None and fault not in RUN_FAULTS:
        raise ValueError(f"unknown run fault {fault!r}; expected one of {RUN_FAULTS}")
    if fault == "trainer-copy-differs" and era not in ("middle", "middle-config"):
        raise ValueError("trainer-copy-differs applies to the middle eras that keep model.safetensors")
    out = fresh_dir(Path(out))
    base_dir = Path(base_dir).absolute()

    def spec_for(model_seed: int) -> _Spec:
        model = build_dylora(base_dir, num_experts, r, alpha, model_seed, True, dropout)
        return _Spec(model, base_dir, base_name or str(base_dir), num_experts, r, alpha, dropout, None, model_seed)

    best = spec_for(seed)
    if era.startswith("early"):
        # layout a's writer puts dylo_moe_state/ in the results root, beside best_model/
        _write_a(out, best, era == "early-full-config")
        _write_training_args(out / "best_model")
    else:
        _write_b(out / "best_model", best)
    for i, step in enumerate(RUN_STEPS):
        spec = spec_for(seed + 1 + i)
        ckpt = out / f"checkpoint-{step}"
        if era.startswith("early"):
            _write_trainer_checkpoint(ckpt, spec, step)
        elif era == "late":
            _write_c(ckpt, spec, step)
            for k in range(num_experts):
                (ckpt / "peft_adapters" / expert_name(k) / expert_name(k) / "README.md").write_text(
                    "---\nlibrary_name: peft\n---\n# Model Card\n")
            _write_training_args(ckpt)
        else:
            _write_middle_checkpoint(ckpt, spec, step, era, differs=fault == "trainer-copy-differs"
                                     and step == RUN_STEPS[-1])
    if fault == "loader-rewrote-config":
        _rewrite_like_the_real_loader(out / "best_model", best)
    return out


def _write_trainer_checkpoint(ckpt: Path, spec: _Spec, step: int) -> None:
    """What ``Trainer._save_checkpoint`` writes for a model that is not a PreTrainedModel."""
    from safetensors.torch import save_file

    ckpt.mkdir(parents=True)
    save_file(_wrapper_state(spec.model), ckpt / "model.safetensors", metadata={"format": "pt"})
    _write_trainer_files(ckpt, spec, step)
    torch.save({"python": [1, 2, 3], "numpy": None, "cpu": torch.get_rng_state()}, ckpt / "rng_state.pth")
    _write_training_args(ckpt)
    write_tokenizer(ckpt)


def _write_middle_checkpoint(ckpt: Path, spec: _Spec, step: int, era: str, differs: bool) -> None:
    """Flat expert pickles + the checkpoint's own dylo_moe_state/ (+ the Trainer's copy)."""
    from safetensors.torch import save_file

    ckpt.mkdir(parents=True)
    adapters = ckpt / "peft_adapters"
    adapters.mkdir()
    for k in range(spec.num_experts):
        torch.save(_expert_weights(spec.model, expert_name(k)), adapters / f"{expert_name(k)}.pt")
    _write_state_dir(ckpt / "dylo_moe_state", spec, legacy=False)
    if era != "middle-peft-only":
        state = _wrapper_state(spec.model)
        if differs:  # the Trainer saved after one more optimizer step than the expert files
            for name in state:
                if ".lora_B.expert_0." in name:
                    state[name] = state[name] + 0.01
        save_file(state, ckpt / "model.safetensors", metadata={"format": "pt"})
    if era == "middle-config":
        write_json(ckpt / "config.json", {"num_experts": spec.num_experts})
    _write_trainer_files(ckpt, spec, step)
    _write_training_args(ckpt)


def _wrapper_state(model: DyLoRAMoE) -> dict[str, torch.Tensor]:
    """The wrapper's state dict as the Trainer writes it (every tensor its own storage)."""
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _write_training_args(folder: Path) -> None:
    """``training_args.bin``: the Trainer pickles its TrainingArguments object (not tensors)."""
    args = _training_args()
    torch.save(args, folder / "training_args.bin")


@functools.lru_cache(maxsize=1)
def _training_args():
    from transformers import TrainingArguments

    with quiet():
        return TrainingArguments(output_dir="results", report_to=[], use_cpu=True, learning_rate=2e-4,
                                 num_train_epochs=10, save_steps=50, eval_steps=50)


def _rewrite_like_the_real_loader(folder: Path, spec: _Spec) -> None:
    """The real evaluation loader's "fix": base config, overlaid by the stored one, then the
    base model_type; ``_dylora_original_type`` and r/alpha copied from fields that layout b
    does not have (so null). Loading the folder then gives the base model."""
    existing = read_json(folder / "config.json")
    merged = {**spec.base_config(), **existing}
    merged["model_type"] = spec.base_config()["model_type"]
    merged["base_model_name_or_path"] = spec.base_name
    if existing.get("model_type") == "dylora-moe":
        merged["_dylora_original_type"] = "dylora-moe"
        for key in ("num_experts", "lora_r", "lora_alpha"):
            merged[key] = existing.get(key)
    write_json(folder / "config.json", merged)
