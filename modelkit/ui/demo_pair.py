"""The demo pair: a tiny base model and a PEFT LoRA fine-tune of it that really learned a
shipped task.

* ``base/``: a llama-like model (hidden 64, 2 layers, the tiny tokenizer of
  :mod:`modelkit.testing`) trained briefly on the synthetic world of
  :mod:`modelkit.bench.tasks.synthetic` (sentences and counting lines), saved with
  ``save_pretrained`` together with its tokenizer;
* ``lora/``: a LoRA adapter (rank 8, every linear layer) trained on the ``train`` split
  of ``mk_topic`` with a third of plain pre-training lines replayed, saved with PEFT's
  ``save_pretrained``; its ``base_model_name_or_path`` is the absolute ``base/`` folder.

On ``mk_topic`` the adapter lifts accuracy from chance to well above it; on the control
task ``mk_count`` both models agree. Seeded and single-threaded (deterministic on one
machine); a few seconds of CPU on an idle machine.
"""
from __future__ import annotations

import json
import random
import shutil
import time
import warnings
from pathlib import Path

RECIPE = {
    "version": 2,
    "model": {"family": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16},
    "base": {"lines": 4000, "steps": 300, "lr": 3e-3, "batch": 16, "seed": 0},
    "lora": {"r": 8, "alpha": 16, "steps": 300, "lr": 1e-2, "batch": 16, "seed": 1, "replay": 0.33,
             "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
}
MARKER = ".modelkit-demo-pair.json"


def write_demo_pair(root: str | Path, *, progress: bool = False) -> dict[str, Path]:
    """Write (or reuse) ``root/base`` and ``root/lora``; ``{"base": ..., "trained": ...}``.

    A complete earlier write with the same recipe is reused without touching torch. The
    marker file is written last, so a half-written pair is rebuilt, never reused.
    """
    root = Path(root).expanduser().absolute()
    paths = {"base": root / "base", "trained": root / "lora"}
    marker = root / MARKER
    if marker.is_file() and all(p.is_dir() for p in paths.values()):
        try:
            if json.loads(marker.read_text()).get("recipe") == RECIPE:
                return paths
        except ValueError:
            pass
    root.mkdir(parents=True, exist_ok=True)
    from modelkit.testing._files import one_thread

    t0 = time.perf_counter()
    staging = root / f".demo-pair.partial-{int(time.time() * 1000)}"
    staging.mkdir()
    try:
        with one_thread():
            _build(staging / "base", staging / "lora", final_base=paths["base"], progress=progress)
        for key, name in (("base", "base"), ("trained", "lora")):
            if paths[key].exists():
                shutil.rmtree(paths[key])
            (staging / name).rename(paths[key])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    marker.write_text(json.dumps({"recipe": RECIPE, "seconds": round(time.perf_counter() - t0, 2),
                                  "base": str(paths["base"]), "trained": str(paths["trained"])}, indent=1))
    return paths


def _build(base_out: Path, lora_out: Path, *, final_base: Path, progress: bool) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from modelkit.bench.tasks import synthetic
    from modelkit.testing import tiny_config, tiny_tokenizer, write_tokenizer

    tok = tiny_tokenizer()
    spec = dict(RECIPE["model"])
    family = spec.pop("family")
    b, lo = RECIPE["base"], RECIPE["lora"]
    torch.manual_seed(b["seed"])
    model = AutoModelForCausalLM.from_config(tiny_config(family, **spec), dtype=torch.float32)
    corpus = synthetic.pretraining_text(b["lines"])
    _train(model, tok, corpus, [""] * len(corpus), b, "base", progress)
    model.save_pretrained(base_out)
    write_tokenizer(base_out)

    torch.manual_seed(lo["seed"])
    config = LoraConfig(r=lo["r"], lora_alpha=lo["alpha"], lora_dropout=0.0, target_modules=lo["target_modules"],
                        task_type="CAUSAL_LM")
    with warnings.catch_warnings():   # transformers deprecations raised inside PEFT
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, config)
    docs = [json.loads(line) for line in (synthetic.DATA_DIR / "topic_train.jsonl").read_text().splitlines() if line]
    prompts = [synthetic.topic_prompt(d["text"]) for d in docs]
    texts = [f"{p} {d['answer']}\n" for p, d in zip(prompts, docs)]
    replay = corpus[: int(len(texts) * lo["replay"])]
    _train(peft_model, tok, texts + replay, prompts + [""] * len(replay), lo, "lora", progress)
    peft_model.peft_config["default"].base_model_name_or_path = str(final_base)
    with warnings.catch_warnings():   # PEFT looks for the base's config, not moved in place yet
        warnings.simplefilter("ignore", UserWarning)
        peft_model.save_pretrained(lora_out)


def _train(model, tok, texts: list[str], prompts: list[str], hp: dict, name: str, progress: bool) -> None:
    """AdamW with warm-up and linear decay; loss on the text after its prompt (all of it
    when the prompt is empty)."""
    import torch
    from tqdm.auto import tqdm

    steps = hp["steps"]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=hp["lr"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.1, 1 - s / steps))
    rng = random.Random(hp["seed"])
    eos, pad = tok.eos_token_id, tok.pad_token_id
    enc = [tok(t)["input_ids"] + [eos] for t in texts]
    starts = [len(tok(p)["input_ids"]) if p else 1 for p in prompts]
    model.train()
    for _ in tqdm(range(steps), desc=f"demo pair: {name}", disable=not progress):
        idx = [rng.randrange(len(enc)) for _ in range(hp["batch"])]
        width = max(len(enc[i]) for i in idx)
        ids = torch.full((len(idx), width), pad)
        labels = torch.full((len(idx), width), -100)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            e = torch.tensor(enc[i])
            ids[row, : len(e)] = e
            mask[row, : len(e)] = 1
            labels[row, starts[i]: len(e)] = e[starts[i]:]
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    model.eval()


