"""``AuditCallback`` in a real (tiny) ``Trainer.train()``: a save that drops weights stops
the run at that save; a sound run trains to the end and queues its checkpoints for the
watcher, which evaluates them without waiting for their files to settle."""
from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

from modelkit.ops.watch_callback import AuditCallback, CheckpointAuditError

MAX_STEPS, SAVE_STEPS = 6, 2


class Lines(torch.utils.data.Dataset):
    def __init__(self, tokenizer, n: int = 24):
        from modelkit.bench.tasks.synthetic import pretraining_text

        self.rows = [tokenizer(t, truncation=True, max_length=24)["input_ids"] for t in pretraining_text(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        ids = torch.tensor(self.rows[i])
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def trainer_for(out, callback, drop: str | None = None):
    """A tiny llama Trainer; ``drop`` names a tensor prefix its saves leave out (the bug)."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from modelkit.testing import tiny_config, tiny_tokenizer

    torch.manual_seed(0)
    tok = tiny_tokenizer()
    model = AutoModelForCausalLM.from_config(tiny_config("llama"))

    class DroppingTrainer(Trainer):
        def _save(self, output_dir=None, state_dict=None):
            state_dict = {k: v for k, v in self.model.state_dict().items() if not k.startswith(drop)}
            return super()._save(output_dir, state_dict=state_dict)

    args = TrainingArguments(output_dir=str(out), max_steps=MAX_STEPS, save_steps=SAVE_STEPS, save_strategy="steps",
                             per_device_train_batch_size=1, learning_rate=1e-3, report_to=[], use_cpu=True,
                             logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    cls = DroppingTrainer if drop else Trainer
    return cls(model=model, args=args, train_dataset=Lines(tok), processing_class=tok, callbacks=[callback])


def test_a_save_that_drops_weights_stops_the_run_at_that_save(tmp_path):
    trainer = trainer_for(tmp_path / "out", AuditCallback(), drop="model.layers.1.")
    with pytest.raises(CheckpointAuditError, match="step 2 is not sound: missing-tensors") as err:
        trainer.train()
    assert trainer.state.global_step == SAVE_STEPS < MAX_STEPS      # stopped at the first bad save
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["checkpoint-2"]
    assert "checkpoint-2" in str(err.value)


def test_log_mode_keeps_training_and_logs_the_findings(tmp_path, caplog):
    callback = AuditCallback(on_error="log")
    trainer = trainer_for(tmp_path / "out", callback, drop="model.layers.1.")
    with caplog.at_level(logging.WARNING, logger="modelkit.ops.watch_callback"):
        trainer.train()
    assert trainer.state.global_step == MAX_STEPS
    assert sorted(callback.reports) == [2, 4, 6]
    assert all("missing-tensors" in {f.code for f in r.errors} for r in callback.reports.values())
    assert caplog.text.count("missing-tensors") == 3


def test_a_sound_run_is_clean_and_queued_for_the_watcher(tmp_path, monkeypatch):
    from modelkit.ops.watch import Watcher

    state = tmp_path / "state"
    callback = AuditCallback(queue=state)
    trainer = trainer_for(tmp_path / "out", callback)
    baseline = tmp_path / "initial"
    trainer.model.save_pretrained(baseline)
    trainer.processing_class.save_pretrained(baseline)
    trainer.train()
    # a Trainer's own saves (optimizer, RNG state, training_args.bin...) are sound: no warning
    assert [(s, r.errors, r.warnings) for s, r in callback.reports.items()] == [(2, [], []), (4, [], []), (6, [], [])]

    calls = []

    def evaluator(job):
        from modelkit.ops.watch import evaluate_in_process

        calls.append(job.label)
        return evaluate_in_process(job)

    # settle = one hour: only what the callback queued is known to be complete now
    watcher = Watcher(tmp_path / "out", ["mk_topic"], baseline, limit=4, settle=3600, state_dir=state,
                      evaluator=evaluator)
    watcher.poll()
    assert calls == ["baseline", "checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert {e.name: e.status for e in watcher.result().entries} == {f"checkpoint-{s}": "done" for s in (2, 4, 6)}


def test_the_callback_imports_no_ui_libraries():
    code = ("import sys, modelkit.ops.watch_callback; bad = [m for m in ('ipywidgets', 'matplotlib', 'IPython') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
