"""``modelkit watch`` on a simulated training run (modelkit.testing.training_run): the demo
pair's base as the baseline, checkpoints of several formats, one written slowly, one
deleted half-way, one whose save dropped weights, and a best_model/ copy.

Exactly the complete checkpoints are evaluated, each once, in step order, with one model
in memory at a time; a watcher killed with SIGKILL and restarted loses and repeats nothing.
"""
from __future__ import annotations

import gc
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest

from modelkit.ops.watch_ledger import Ledger, LedgerError, read_jsonl
from modelkit.testing.training_run import EXPECTED, write_run
from modelkit.ops.watch import WatchError, evaluate_in_process, find_checkpoints, snapshot, watch

TASKS = ["mk_topic"]
LIMIT = 8
EVALUATED = ["checkpoint-10", "checkpoint-20", "checkpoint-30", "checkpoint-40"]   # step order
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def pair(demo_pair) -> dict[str, Path]:
    return demo_pair


@pytest.fixture
def finished_run(training_run) -> Path:
    return training_run


@pytest.fixture
def run(finished_run, tmp_path) -> Path:
    """A private copy of the finished run (tests may delete from it)."""
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


class Recorder:
    """The default evaluator, counting its calls and the models alive at each load."""

    def __init__(self, monkeypatch, fail: dict[str, int] | None = None, before=None):
        import modelkit.ops.load as loading

        self.calls: list[str] = []
        self.fail = dict(fail or {})
        self.before = before
        self.alive: list[weakref.ref] = []
        self.peak = 0
        real = loading.load

        def load(*a, **k):
            result = real(*a, **k)
            self.alive = [r for r in self.alive if r() is not None]
            self.alive.append(weakref.ref(result.model))
            self.peak = max(self.peak, len(self.alive))
            return result

        monkeypatch.setattr(loading, "load", load)

    def __call__(self, job):
        self.calls.append(job.label)
        if self.before is not None:
            self.before(job)
        if self.fail.get(job.label, 0) > 0:
            self.fail[job.label] -= 1
            raise RuntimeError(f"engine crashed on {job.label}")
        return evaluate_in_process(job)


def statuses(result) -> dict[str, str]:
    return {e.name: e.status for e in result.entries}


def test_checkpoints_are_found_in_step_order(finished_run):
    names = [c.name for c in find_checkpoints(finished_run)]
    assert names == ["checkpoint-10", "checkpoint-20", "checkpoint-30", "checkpoint-40", "checkpoint-60", "best_model"]
    nested = finished_run.parent / "nested"
    (nested / "checkpoints" / "checkpoint-5").mkdir(parents=True)
    (nested / "checkpoint-7").mkdir()
    (nested / "tmp-checkpoint-9").mkdir()                     # not a checkpoint name
    assert [(c.name, c.step) for c in find_checkpoints(nested)] == [("checkpoints/checkpoint-5", 5),
                                                                    ("checkpoint-7", 7)]


def test_once_evaluates_exactly_the_complete_checkpoints_each_once_in_step_order(run, tmp_path, monkeypatch):
    monkeypatch.setenv("MODELKIT_CACHE", str(tmp_path / "cache"))      # nothing cached: real evaluations
    before = tree(run)
    rec = Recorder(monkeypatch)
    seen = []
    result = watch(run, TASKS, limit=LIMIT, once=True, settle=0.3, evaluator=rec, on_event=seen.append)

    assert rec.calls == ["baseline", *EVALUATED]              # baseline first, then step order, each once
    assert rec.peak == 1                                      # one model in memory at a time
    assert statuses(result) == {k: v for k, v in EXPECTED.items() if k != "checkpoint-50"}
    assert [e.name for e in seen] == [*EVALUATED, "checkpoint-60", "best_model"]
    by_name = {e.name: e for e in result.entries}
    assert by_name["best_model"].same_as == "checkpoint-30"   # a copy: same fingerprint, evaluated once
    assert "missing-tensors" in by_name["checkpoint-60"].detail

    frame = result.to_frame()
    topic = frame[(frame["metric"] == "acc")].set_index("checkpoint")
    assert list(topic.index) == [*EVALUATED, "best_model"] and list(topic["step"][:4]) == [10, 20, 30, 40]
    assert topic.loc["checkpoint-30", "verdict"] == "better" and topic.loc["checkpoint-30", "ci_low"] > 0
    assert topic.loc["checkpoint-40", "trained"] == topic.loc["checkpoint-30", "trained"]   # merged = adapter
    assert (topic["n"] == LIMIT).all() and (topic["base"] == topic["base"].iloc[0]).all()

    assert tree(run) == before                                 # nothing written into the run
    state = Path(result.state_dir)
    assert run not in state.parents and (state / "ledger.jsonl").is_file()
    data = json.loads(result.to_json())
    assert [c["name"] for c in data["checkpoints"]] == [*EVALUATED, "checkpoint-60", "best_model"]
    assert {r["checkpoint"] for r in data["table"]} == {*EVALUATED, "best_model"}


def test_a_compressed_moe_distillation_run_is_watched_against_the_original(catalog, tmp_path):
    # the compressed-MoE researcher's layout: <experiment>/checkpoints/checkpoint-N/, settings
    # two levels up; one save without non_moe_weights.pt, one with per-expert core copies
    exp = tmp_path / "experiment"
    shutil.copytree(catalog["compressed-checkpoint-N"].parent.parent, exp)
    shutil.copytree(catalog["compressed-no-non-moe"], exp / "checkpoints" / "checkpoint-20")
    shutil.copytree(catalog["compressed-duplicated-buffers"], exp / "checkpoints" / "checkpoint-30")
    before = tree(exp)
    result = watch(exp, TASKS, catalog["original-qwen3-moe"], limit=4, once=True, settle=0.1)
    assert statuses(result) == {"checkpoints/checkpoint-10": "done", "checkpoints/checkpoint-20": "rejected",
                                "checkpoints/checkpoint-30": "done"}      # a warning does not block evaluation
    assert "missing-tensors" in result.entries[1].detail
    frame = result.to_frame()
    assert set(frame["checkpoint"]) == {"checkpoints/checkpoint-10", "checkpoints/checkpoint-30"}
    assert list(frame.drop_duplicates("checkpoint")["step"]) == [10, 30] and (frame["n"] == 4).all()
    assert tree(exp) == before


def test_statistics_are_those_of_compare(run, pair):
    from modelkit.ops.compare import compare

    result = watch(run, TASKS, limit=LIMIT, once=True, settle=0.1)
    mine = result.to_frame().set_index(["checkpoint", "metric"])
    theirs = compare(pair["base"], run / "checkpoint-30", tasks=TASKS, limit=LIMIT, progress=False).to_frame()
    for r in theirs.itertuples(index=False):
        row = mine.loc[("checkpoint-30", r.metric)]
        assert (row["delta"], row["ci_low"], row["ci_high"], row["verdict"]) == (r.delta, r.ci_low, r.ci_high, r.verdict)


def test_a_restarted_watcher_evaluates_nothing_again(run, monkeypatch):
    first = watch(run, TASKS, limit=LIMIT, once=True, settle=0.1)
    rec = Recorder(monkeypatch)
    again = watch(run, TASKS, limit=LIMIT, once=True, settle=0.1, evaluator=rec)
    assert rec.calls == []
    assert statuses(again) == statuses(first)
    assert again.to_frame().equals(first.to_frame())


def test_failures_are_retried_then_recorded_and_the_watcher_goes_on(run, monkeypatch):
    rec = Recorder(monkeypatch, fail={"checkpoint-10": 1, "checkpoint-20": 99})
    result = watch(run, TASKS, limit=LIMIT, once=True, settle=0.1, attempts=3, evaluator=rec)
    assert rec.calls == ["baseline", "checkpoint-10", "checkpoint-10", "checkpoint-20", "checkpoint-20",
                         "checkpoint-20", "checkpoint-30", "checkpoint-40"]
    by_name = {e.name: e for e in result.entries}
    assert (by_name["checkpoint-10"].status, by_name["checkpoint-10"].attempts) == ("done", 2)
    assert (by_name["checkpoint-20"].status, by_name["checkpoint-20"].attempts) == ("failed", 3)
    assert "RuntimeError: engine crashed on checkpoint-20" in by_name["checkpoint-20"].detail
    assert by_name["checkpoint-40"].status == "done" and result.exit_code == 1
    # a failure is final: a restart does not try again
    rec2 = Recorder(monkeypatch)
    assert statuses(watch(run, TASKS, limit=LIMIT, once=True, settle=0.1, evaluator=rec2)) == statuses(result)
    assert rec2.calls == []


def test_a_checkpoint_deleted_during_its_evaluation_is_skipped(run, monkeypatch):
    def rotate(job):
        if job.label == "checkpoint-20":
            shutil.rmtree(job.ref)                  # save_total_limit removes it under the watcher

    rec = Recorder(monkeypatch, before=rotate)
    result = watch(run, TASKS, limit=LIMIT, once=True, settle=0.1, evaluator=rec)
    by_name = {e.name: e for e in result.entries}
    assert by_name["checkpoint-20"].status == "skipped"
    assert "deleted while being evaluated" in by_name["checkpoint-20"].detail
    assert by_name["checkpoint-30"].status == "done"


def test_a_checkpoint_still_being_written_is_not_evaluated(run, pair, monkeypatch, tmp_path):
    import modelkit.ops.watch as watching
    from modelkit.testing import write_peft_lora

    new = write_peft_lora(tmp_path / "new", pair["base"], seed=70)
    files = sorted(p for p in new.rglob("*") if p.is_file())
    target = run / "checkpoint-70"
    target.mkdir()
    real_snapshot = watching.snapshot

    def snapshot_while_writing(folder):
        # the writer adds one more file each time the watcher looks: it always finds it
        # changed, on a machine of any speed (a writer timed by sleeps raced the watcher)
        if folder.name == target.name and writing and files:
            f = files.pop(0)
            (target / f.relative_to(new)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target / f.relative_to(new))
        return real_snapshot(folder)

    monkeypatch.setattr(watching, "snapshot", snapshot_while_writing)
    writing = True
    rec = Recorder(monkeypatch)
    result = watch(run, TASKS, limit=LIMIT, once=True, settle=0.2, evaluator=rec)
    assert "checkpoint-70" not in rec.calls
    assert statuses(result)["checkpoint-70"] == "pending"
    assert files, "the writer finished while the watcher looked: the test proved nothing"
    writing = False
    for f in files:                                      # the save completes
        (target / f.relative_to(new)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, target / f.relative_to(new))
    later = watch(run, TASKS, limit=LIMIT, once=True, settle=0.2, evaluator=rec)
    assert statuses(later)["checkpoint-70"] == "done" and rec.calls.count("checkpoint-70") == 1


def test_the_state_is_kept_outside_the_run_and_locked(run, tmp_path):
    with pytest.raises(LedgerError, match="inside the watched run folder"):
        watch(run, TASKS, limit=LIMIT, once=True, state_dir=run / ".watch")
    ledger = Ledger.open(tmp_path / "state")
    with ledger.locked():
        with pytest.raises(LedgerError, match="another watcher"):
            watch(run, TASKS, limit=LIMIT, once=True, state_dir=tmp_path / "state")
    with pytest.raises(WatchError, match="no such run folder"):
        watch(tmp_path / "nowhere", TASKS)


def test_wandb_logs_each_checkpoint_against_its_training_step(run):
    from modelkit.testing.wandb_offline import history, metrics, wait_until_written

    result = watch(run, TASKS, limit=LIMIT, once=True, settle=0.1, wandb=True)
    folder = Path(result.wandb_run)
    assert "offline-run" in folder.name
    wait_until_written(folder)
    assert {"name": "", "glob_name": "watch/*", "step_metric": "trainer/global_step"} in metrics(folder)
    rows = [r for r in history(folder) if "trainer/global_step" in r]
    frame = result.to_frame()
    acc = frame[frame["metric"] == "acc"].set_index("checkpoint")
    # one row per evaluated checkpoint with a step, each carrying its own step: a result
    # that finishes out of order still lands on its step
    assert [r["trainer/global_step"] for r in rows] == [10, 20, 30, 40]
    for r in rows:
        name = f"checkpoint-{r['trainer/global_step']}"
        assert r["watch/mk_topic/acc"] == acc.loc[name, "trained"]
        assert r["watch/mk_topic/acc/delta"] == pytest.approx(acc.loc[name, "delta"])
    assert list(folder.glob("files/media/table/watch_final/table_*.table.json"))
    assert list(folder.glob("files/media/images/watch_final/plot_*.png"))


def test_a_torn_last_ledger_line_is_ignored(tmp_path):
    ledger = Ledger.open(tmp_path / "s")
    ledger.append("started", "k1", name="checkpoint-1")
    ledger.append("done", "k1", name="checkpoint-1")
    with open(ledger.path, "ab") as f:
        f.write(b'{"event":"done","key":"k2"')          # killed mid-write
    again = Ledger.open(tmp_path / "s")
    assert again.final("k1")["event"] == "done" and again.final("k2") is None
    assert [r["key"] for r in read_jsonl(ledger.path)] == ["k1", "k1"]


def test_cli_watch_once_json(run, capsys):
    from modelkit.ui.cli import main

    code = main(["watch", str(run), "--tasks", "mk_topic", "--limit", str(LIMIT), "--once", "--settle", "0.1",
                 "--json"])
    captured = capsys.readouterr()
    assert code == 1                                          # checkpoint-60 was rejected
    data = json.loads(captured.out)
    assert {c["name"]: c["status"] for c in data["checkpoints"]}["checkpoint-60"] == "rejected"
    assert "checkpoint-30 (step 30): done" in captured.err
    assert main(["watch", str(run), "--tasks", "no_such_task", "--once"]) == 2


# -- real processes: a run being written, a watcher killed -----------------------------------

def _env(tmp_path: Path) -> dict:
    env = os.environ.copy()
    env["MODELKIT_CACHE"] = str(tmp_path / "cache")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _watcher(run: Path, state: Path, env: dict, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "modelkit.ui.cli", "watch", str(run), "--tasks", "mk_topic",
                             "--limit", str(LIMIT), "--state", str(state), "--json", "--attempts", "9", *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _records(state: Path) -> int:
    path = state / "ledger.jsonl"
    return len(list(read_jsonl(path))) if path.exists() else 0


def _done_names(state: Path) -> list[str]:
    return [r["name"] for r in read_jsonl(state / "ledger.jsonl") if r["event"] == "done"]


@pytest.mark.slow
def test_continuous_watch_of_a_run_being_written(pair, tmp_path):
    run, state, env = tmp_path / "run", tmp_path / "state", _env(tmp_path)
    run.mkdir()
    watcher = _watcher(run, state, env, "--interval", "0.3", "--settle", "1.5", "--baseline", str(pair["base"]))
    writer = subprocess.Popen([sys.executable, "-m", "modelkit.testing.training_run", str(run), "--base",
                               str(pair["base"]), "--adapter", str(pair["trained"]), "--pace", "2", "--slow", "6"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert writer.wait(timeout=180) == 0
        deadline = time.monotonic() + 300          # bounded wait: ends as soon as all are settled
        while len({r["name"] for r in read_jsonl(state / "ledger.jsonl") if r["name"] != "baseline"
                   and r["event"] in ("done", "rejected", "skipped", "same")}) < len(EXPECTED) \
                and time.monotonic() < deadline:
            time.sleep(0.5)
        watcher.send_signal(signal.SIGINT)
        out, err = watcher.communicate(timeout=60)
    finally:
        for p in (writer, watcher):
            if p.poll() is None:
                p.kill()
    data = json.loads(out)
    assert {c["name"]: c["status"] for c in data["checkpoints"]} == EXPECTED, err[-3000:]
    records = list(read_jsonl(state / "ledger.jsonl"))
    started = [r["name"] for r in records if r["event"] == "started"]
    assert started == ["baseline", *EVALUATED]                 # never one being written, each once
    assert _done_names(state) == ["baseline", *EVALUATED]      # in step order
    skipped = next(c for c in data["checkpoints"] if c["name"] == "checkpoint-50")
    assert "deleted" in skipped["detail"]


@pytest.mark.slow
def test_kill_minus_9_at_random_points_loses_and_duplicates_nothing(finished_run, tmp_path):
    run, state, env = tmp_path / "run", tmp_path / "state", _env(tmp_path)
    shutil.copytree(finished_run, run)
    rng = random.Random(14)
    kills = 0
    for _ in range(4):
        # killed after a random number (1-3) of new ledger records, then a random instant
        # (mid-evaluation, mid-write): points in the watcher's work, not in wall-clock time,
        # which on a slow machine all fell in its imports and on a fast one after its end
        before = _records(state)
        wanted = before + rng.randint(1, 3)
        watcher = _watcher(run, state, env, "--once", "--settle", "0.3")
        deadline = time.monotonic() + 300
        while watcher.poll() is None and _records(state) < wanted and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.5))
        if watcher.poll() is None:
            watcher.send_signal(signal.SIGKILL)
            kills += 1
        watcher.communicate()
    assert kills >= 2, f"{kills} watcher(s) killed: the test proved little"
    final = _watcher(run, state, env, "--once", "--settle", "0.3")
    out, err = final.communicate(timeout=300)
    data = json.loads(out)
    assert {c["name"]: c["status"] for c in data["checkpoints"]} == \
        {k: v for k, v in EXPECTED.items() if k != "checkpoint-50"}, err[-3000:]
    records = list(read_jsonl(state / "ledger.jsonl"))
    done = [r for r in records if r["event"] == "done"]
    assert [r["name"] for r in done] == ["baseline", *EVALUATED]          # each exactly once, in order
    assert len({r["key"] for r in done}) == len(done)
    for r in done:                                                         # no result lost
        result = json.loads((state / "results" / f"{r['key']}.json").read_text())
        assert result["runs"]["mk_topic"]["leaves"]["mk_topic"]["n"] == LIMIT
    started = [r for r in records if r["event"] == "started"]
    assert len(started) <= len(done) + kills                                # only killed ones were redone
    assert {r["checkpoint"] for r in data["table"]} == {*EVALUATED, "best_model"}
    gc.collect()


@pytest.mark.slow
def test_the_lm_eval_engine_evaluates_checkpoints_and_leaves_no_export(finished_run, pair, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run / "checkpoint-30", run / "checkpoint-30")
    here = watch(run, TASKS, pair["base"], limit=LIMIT, once=True, settle=0.1, state_dir=tmp_path / "a")
    there = watch(run, TASKS, pair["base"], limit=LIMIT, once=True, settle=0.1, state_dir=tmp_path / "b",
                  engine="lm-eval", engine_options={"device": "cpu"})
    assert statuses(there) == {"checkpoint-30": "done"}
    assert there.evaluated[0].result["model"]["engine"]["engine"] == "lm-eval"
    cols = ["metric", "base", "trained", "delta", "verdict"]
    assert there.to_frame()[cols].equals(here.to_frame()[cols])     # two engines, one answer
    assert not any((tmp_path / "b" / "scratch").rglob("*"))          # temporary folders removed


def test_modelkit_watch_stays_the_function_once_every_module_is_imported():
    import modelkit
    import modelkit.ops.watch_callback  # noqa: F401
    import modelkit.ops.watch

    assert modelkit.watch is modelkit.ops.watch.watch and modelkit.WatchResult is modelkit.ops.watch.WatchResult


def test_prompts_cut_to_fit_a_checkpoint_context_are_said_in_the_watch_summary(tmp_path):
    import shutil

    from test_compare import write_tiny_pair

    pair = write_tiny_pair(tmp_path / "models", max_position_embeddings=8)
    shutil.copytree(pair["trained"], tmp_path / "run" / "checkpoint-1")
    result = watch(tmp_path / "run", ["mk_topic"], baseline=pair["base"], limit=4, once=True, settle=0.1,
                   state_dir=tmp_path / "state")
    assert [e.status for e in result.entries] == ["done"]
    assert "WARNING mk_topic [checkpoint-1]: lm-eval cut 4 of 4 documents' requests" in result.summary()
