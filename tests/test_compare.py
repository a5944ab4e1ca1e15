"""``modelkit.compare`` on the demo pair: a base model and a LoRA fine-tune that learned
``mk_topic`` (shipped task) and should not have changed ``mk_count`` (control)."""
from __future__ import annotations

import importlib
import json
import shutil
import time
from pathlib import Path

import pytest

from modelkit.ops.compare import CompareResult, compare
from modelkit.errors import CompareError, ModelkitError

TASKS = ["mk_topic", "mk_topic_gen", "mk_count", "mk_text"]



@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, Path]:
    from modelkit.ui.demo_pair import write_demo_pair

    return write_demo_pair(tmp_path_factory.mktemp("demo-pair"))


@pytest.fixture(scope="module")
def result(pair) -> CompareResult:
    return compare(pair["base"], pair["trained"], tasks=TASKS, progress=False)


@pytest.fixture
def no_model_load(monkeypatch):
    """Any attempt to load a model fails the test."""
    def boom(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(importlib.import_module("modelkit.ops.load"), "load", boom)


def write_tiny_pair(root: Path, max_position_embeddings: int) -> dict[str, Path]:
    """Two tiny random llama folders (the second's weights scaled by 1.5) with a context of
    ``max_position_embeddings`` tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from modelkit.testing import tiny_config, write_tokenizer

    torch.manual_seed(0)
    folders = {}
    for name, scale in (("base", 1.0), ("trained", 1.5)):
        config = tiny_config("llama", max_position_embeddings=max_position_embeddings)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(scale)
        model.save_pretrained(root / name)
        write_tokenizer(root / name)
        folders[name] = root / name
    return folders


def row(frame, task, metric, model=None):
    sub = frame[(frame["task"] == task) & (frame["metric"] == metric)]
    if model is not None:
        sub = sub[sub["model"] == model]
    assert len(sub) == 1, sub
    return sub.iloc[0]


def test_lora_improves_the_trained_task_significantly_and_not_the_control(result):
    frame = result.to_frame()
    topic = row(frame, "mk_topic", "acc")
    assert topic["base"] < 0.4 and topic["trained"] > 0.9          # chance is 0.25
    assert topic["delta"] == pytest.approx(topic["trained"] - topic["base"])
    assert topic["ci_low"] > 0.3                                    # bootstrap CI excludes 0
    assert topic["p_mcnemar"] < 1e-6
    assert topic["n"] == 200 and topic["verdict"] == "better"
    assert topic["rel_delta"] == pytest.approx(topic["delta"] / topic["base"])

    gen = row(frame, "mk_topic_gen", "exact_match")                 # generate_until kind
    assert gen["base"] < 0.1 and gen["trained"] > 0.9 and gen["verdict"] == "better"

    control = row(frame, "mk_count", "acc")
    assert control["ci_low"] <= 0 <= control["ci_high"]
    assert control["p_mcnemar"] >= 0.05
    assert control["verdict"] == "no significant change"

    ppl = row(frame, "mk_text", "word_perplexity")                  # loglikelihood_rolling kind
    assert not ppl["higher_is_better"] and ppl["verdict"] in ("better", "worse", "no significant change")
    assert ppl["n"] == 100 and ppl["ci_low"] <= ppl["delta"] <= ppl["ci_high"]
    assert ppl["base_stderr"] > 0                                   # bootstrap stderr where lm-eval has none


def test_every_result_carries_its_provenance(result, pair):
    base, trained = result.models
    assert (base.role, trained.role) == ("base", "trained")
    assert base.format.startswith("plain") and trained.format.startswith("peft")
    assert trained.base_fingerprint == base.fingerprint != trained.fingerprint
    assert base.dtype == trained.dtype == "float32"
    assert base.lm_eval_version == "0.4.13"
    assert set(base.task_hashes) == set(TASKS) and len(set(base.task_hashes.values())) == 4
    data = json.loads(result.to_json())
    assert data["models"][1]["ref"] == str(pair["trained"])
    assert data["models"][1]["fingerprint"] == trained.fingerprint
    assert {r["task"] for r in data["table"]} == set(TASKS)
    text = result.summary()
    assert trained.fingerprint in text and "mk_topic" in text and "better" in text


def test_disagreements_are_the_discordant_samples(result):
    dis = result.disagreements()
    assert len(dis) and (dis["base_correct"] != dis["trained_correct"]).all()
    topic = dis[(dis["task"] == "mk_topic") & (dis["metric"] == "acc")]
    run = result.runs
    b = run["base"]["mk_topic"]["leaves"]["mk_topic"]["metrics"]["acc,none"]["samples"]
    t = run["lora"]["mk_topic"]["leaves"]["mk_topic"]["metrics"]["acc,none"]["samples"]
    assert len(topic) == sum(x != y for x, y in zip(b, t))
    first = topic.iloc[0]
    assert first["prompt"].startswith("Sentence:") and first["target"] in ("animal", "color", "food", "tool")
    assert first["trained_response"] == first["target"] if first["trained_correct"] else True


def test_plot_returns_a_figure_without_pyplot(result, tmp_path):
    from matplotlib.figure import Figure

    fig = result.plot(tmp_path / "compare.png")
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 2 * len(result.to_frame()[["task", "metric"]].drop_duplicates())
    assert (tmp_path / "compare.png").stat().st_size > 10_000


def test_rerun_comes_from_the_cache_without_loading_any_model(result, pair, no_model_load):
    t0 = time.perf_counter()
    again = compare(pair["base"], pair["trained"], tasks=TASKS, progress=False)
    seconds = time.perf_counter() - t0
    assert seconds < 2.0
    assert all(all(m.cached.values()) for m in again.models)
    assert again.to_frame().equals(result.to_frame())


def test_cache_key_covers_the_limit(pair, tmp_path, no_model_load):
    with pytest.raises(CompareError, match="a model was loaded"):
        compare(pair["base"], pair["trained"], tasks=["mk_topic"], limit=7, progress=False)


def test_user_task_from_include_path_and_its_data_hash(pair, tmp_path):
    tasks = _user_task(tmp_path, n=12)
    first = compare(pair["base"], pair["trained"], tasks=["my_topic"], include_path=tasks, progress=False)
    r = row(first.to_frame(), "my_topic", "acc")
    assert r["n"] == 12
    _write_docs(tasks, n=12, seed=100)
    second = compare(pair["base"], pair["trained"], tasks=["my_topic"], include_path=tasks, progress=False)
    assert second.base.task_hashes["my_topic"] != first.base.task_hashes["my_topic"]
    assert not any(second.base.cached.values())                     # new data: evaluated again


def test_more_than_two_models_base_first(pair, tmp_path):
    import modelkit

    model, tok, _ = modelkit.load(pair["base"], dtype="bfloat16")
    bf16 = tmp_path / "base-bf16"
    model.save_pretrained(bf16)
    tok.save_pretrained(bf16)
    res = compare(pair["base"], pair["trained"], bf16, tasks=["mk_topic", "mk_count"], limit=60, progress=False)
    frame = res.to_frame()
    assert [m.label for m in res.models] == ["base", "lora", "base-bf16"]
    assert set(frame["model"]) == {"lora", "base-bf16"}
    assert row(frame, "mk_topic", "acc", "lora")["verdict"] == "better"
    assert row(frame, "mk_topic", "acc", "base-bf16")["verdict"] == "no significant change"


def test_self_compare_is_refused_even_from_a_copy(pair, tmp_path, no_model_load):
    with pytest.raises(CompareError, match="with itself"):
        compare(pair["base"], pair["base"], tasks=["mk_topic"], progress=False)
    copy = tmp_path / "copy-of-base"
    shutil.copytree(pair["base"], copy)
    with pytest.raises(CompareError, match="same fingerprint"):
        compare(pair["base"], copy, tasks=["mk_topic"], progress=False)


def test_unknown_task_lists_close_matches(pair, no_model_load):
    with pytest.raises(CompareError, match="mk_topic") as err:
        compare(pair["base"], pair["trained"], tasks=["mk_topc"], progress=False)
    assert "did you mean" in str(err.value)


@pytest.mark.parametrize("limit", [0, -3, 1.5])
def test_bad_limit_is_refused_up_front(pair, limit, no_model_load):
    with pytest.raises(CompareError, match="limit"):
        compare(pair["base"], pair["trained"], tasks=["mk_topic"], limit=limit, progress=False)


def test_task_whose_data_are_missing_offline_is_refused_before_loading(pair, tmp_path, no_model_load):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "gone.yaml").write_text(
        "task: gone_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path}/nowhere.jsonl\noutput_type: multiple_choice\ntest_split: test\n"
        "doc_to_text: '{{q}}'\ndoc_to_choice: ['a', 'b']\ndoc_to_target: 0\n")
    (folder / "hub.yaml").write_text(
        "task: gone_hub\ndataset_path: no-such-org/no-such-dataset\noutput_type: multiple_choice\n"
        "test_split: test\ndoc_to_text: '{{q}}'\ndoc_to_choice: ['a', 'b']\ndoc_to_target: 0\n")
    for name in ("gone_local", "gone_hub"):
        with pytest.raises(CompareError, match=f"{name}.*not available offline"):
            compare(pair["base"], pair["trained"], tasks=[name], include_path=folder, progress=False)


def test_a_model_that_cannot_be_opened_is_named(pair, tmp_path, no_model_load):
    with pytest.raises(ModelkitError, match="trained model") as err:
        compare(pair["base"], tmp_path / "nowhere", tasks=["mk_topic"], progress=False)
    assert "nowhere" in str(err.value)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not a model")
    with pytest.raises(ModelkitError, match="trained model.*junk"):
        compare(pair["base"], junk, tasks=["mk_topic"], progress=False)


def test_wandb_offline_run_holds_the_table(result, capfd, monkeypatch):
    monkeypatch.delenv("WANDB_SILENT")      # what users have: modelkit itself keeps wandb quiet
    folder = Path(result.log_to_wandb(project="modelkit-tests"))
    assert "offline-run" in folder.name
    printed = capfd.readouterr()
    assert "wandb" not in printed.out + printed.err       # no banner, no run summary
    assert f"W&B run: {folder} (offline: `wandb sync {folder}` uploads it)" in result.summary()
    tables = list(folder.glob("files/media/table/compare/table_*.table.json"))
    assert tables, sorted(p.relative_to(folder) for p in folder.rglob("*"))
    data = json.loads(tables[0].read_text())
    assert "delta" in data["columns"] and len(data["data"]) == len(result.to_frame())
    assert list(folder.glob("files/media/table/compare/disagreements_*.table.json"))
    assert list(folder.glob("files/media/images/compare/plot_*.png"))


def test_cli_compare_json(pair, result, capsys, tmp_path):
    from modelkit.ui.cli import main

    code = main(["compare", str(pair["base"]), str(pair["trained"]), "--tasks", "mk_topic,mk_count",
                 "--json", "--plot", str(tmp_path / "p.png")])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    topic = next(r for r in data["table"] if r["task"] == "mk_topic" and r["metric"] == "acc")
    assert topic["verdict"] == "better" and topic["ci_low"] > 0
    assert (tmp_path / "p.png").exists()
    assert main(["compare", str(pair["base"]), str(pair["trained"]), "--tasks", "mk_topic", "--limit", "0"]) == 2


def _user_task(folder: Path, n: int) -> Path:
    """An lm-eval task of the user's own: local JSON lines, absolute data path."""
    from modelkit.bench.tasks.synthetic import LABELS

    tasks = folder / "my-tasks"
    tasks.mkdir()
    _write_docs(tasks, n, seed=99)
    (tasks / "my_topic.yaml").write_text(
        "task: my_topic\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tasks / 'docs.jsonl'}\noutput_type: multiple_choice\ntest_split: test\n"
        "doc_to_text: \"Sentence: {{text}}\\nTopic:\"\n"
        f"doc_to_choice: {json.dumps(list(LABELS))}\ndoc_to_target: label\ntarget_delimiter: ' '\n"
        "metric_list:\n  - metric: acc\n")
    return tasks


def _write_docs(tasks: Path, n: int, seed: int) -> None:
    from modelkit.bench.tasks.synthetic import topic_docs

    (tasks / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in topic_docs(n, seed=seed)))


def test_rows_are_labelled_by_what_tells_the_models_apart():
    from modelkit.ops.compare import ModelInfo, _assign_labels

    def model(folder, **options):
        return ModelInfo(role="trained", label="", ref=folder, folder=folder, format="plain-hf", fingerprint=folder,
                         artifact_fingerprint=folder, base_fingerprint=None, base_folder=None, options=options)

    models = [model("/m/base"), model("/runs/lr-1e-4/checkpoint-10"), model("/runs/lr-3e-4/checkpoint-10"),
              model("/x/a/run/checkpoints/checkpoint-20"), model("/x/b/run/checkpoints/checkpoint-20"),
              model("/runs/lr-1e-4/best_model"), model("/m/base", expert=1)]
    _assign_labels(models)
    assert [m.label for m in models] == [
        "base", "lr-1e-4/checkpoint-10", "lr-3e-4/checkpoint-10",       # the run's name + the step
        "a/run/checkpoints/checkpoint-20", "b/run/checkpoints/checkpoint-20",   # as far up as needed
        "lr-1e-4/best_model", "base[expert=1]"]


def test_a_generation_task_longer_than_the_model_context_is_refused_naming_both(tmp_path):
    pair = write_tiny_pair(tmp_path, max_position_embeddings=64)
    with pytest.raises(CompareError, match=r"the base model .*: mk_humaneval generates up to 1024 tokens, "
                                           r"but the model holds 64 positions"):
        compare(pair["base"], pair["trained"], tasks="mk_humaneval", limit=1, progress=False)


def test_prompts_cut_to_fit_a_short_context_are_counted_and_said_first(tmp_path):
    """lm-eval cuts a request longer than the model's context from the left, without failing:
    the comparison says how many documents of each model were cut, and its verdict says so."""
    from modelkit.verdicts import verdict_of

    pair = write_tiny_pair(tmp_path, max_position_embeddings=8)
    res = compare(pair["base"], pair["trained"], tasks="mk_topic", limit=4, progress=False)
    cut = {(leaf, c["truncated"], c["of"], c["limit"]) for _, leaf, c in res.truncated()}
    assert cut == {("mk_topic", 4, 4, 9)}              # every prompt is longer than 8 + 1 tokens
    assert len(res.truncated()) == 2                    # base and trained
    verdict = verdict_of(res)
    assert verdict.level == "warning" and "prompts cut to fit the context: mk_topic [base] 4/4" in verdict.detail
    assert "WARNING mk_topic [base]: lm-eval cut 4 of 4 documents' requests" in res.summary()


def test_the_cut_count_reads_lm_evals_own_encoding_of_each_request(tmp_path, monkeypatch):
    """The truncation check counts the tokens lm-eval itself encoded for each request (it
    scored those): no request is encoded a second time for the check."""
    from collections import Counter

    from lm_eval.models.huggingface import HFLM

    encoded, real = Counter(), HFLM._encode_pair

    def counting(self, context, continuation):
        encoded[(context, continuation)] += 1
        return real(self, context, continuation)

    monkeypatch.setattr(HFLM, "_encode_pair", counting)
    pair = write_tiny_pair(tmp_path, max_position_embeddings=8)
    res = compare(pair["base"], pair["trained"], tasks="mk_topic", limit=4, use_cache=False, progress=False)
    assert {(leaf, c["truncated"], c["of"]) for _, leaf, c in res.truncated()} == {("mk_topic", 4, 4)}
    assert encoded and set(encoded.values()) == {2}, encoded   # once per model: base and trained


def test_a_comparison_whose_prompts_fit_has_no_truncation_warning(result):
    assert result.truncated() == []
    assert "cut" not in result.outcome().detail and "WARNING" not in result.summary()


def test_runs_made_elsewhere_say_whether_prompts_fit_was_not_checked(result):
    import copy

    runs = copy.deepcopy(result.runs)          # as read back from another process's sample logs
    for tasks in runs.values():
        for run in tasks.values():
            for leaf in run["leaves"].values():
                leaf.pop("context", None)
    elsewhere = CompareResult(result.models, result.tasks, runs, result.settings)
    assert set(elsewhere.context_not_checked()[result.base.label]) >= {"mk_topic", "mk_topic_gen"}
    assert (f"whether the prompts fit the model's context is not checked for {result.base.label} (mk_topic"
            in elsewhere.summary())
    assert result.context_not_checked() == {}
