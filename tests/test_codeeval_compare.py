"""``modelkit compare BASE TRAINED --tasks <code task>``: greedy generation through lm-eval,
sandboxed grading, paired statistics and the problems the trained model newly solves."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from modelkit.bench.codeeval import GradingError, Sandbox
from modelkit.bench.codeeval.lm_task import problem_changes, write_task_yaml
from modelkit.ops.compare import compare
from test_notebooks import kernel  # noqa: F401  (the python3 kernelspec fixture)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, Path]:
    from modelkit.ui.demo_pair import write_demo_pair

    return write_demo_pair(tmp_path_factory.mktemp("demo-pair"))


@pytest.fixture(scope="module")
def result(pair):
    return compare(pair["base"], pair["trained"], tasks=["mk_code_topic"], progress=False)


@pytest.fixture
def no_model_load(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(importlib.import_module("modelkit.ops.load"), "load", boom)


def test_the_fine_tune_newly_solves_code_problems_with_mcnemar_significance(result):
    row = result.to_frame().iloc[0]
    assert (row["task"], row["metric"]) == ("mk_code_topic", "pass_at_1 (sandbox)")
    assert row["base"] == 0.0 and row["trained"] > 0.3 and row["n"] == 24
    assert row["p_mcnemar"] < 0.01 and row["verdict"] == "better"

    changes = problem_changes(result.disagreements())
    assert len(changes) == round(row["trained"] * 24)                 # every solved one is newly solved
    assert set(changes["change"]) == {"newly solved"}
    assert all(t.startswith("mk_code_topic/") for t in changes["task_id"])
    assert set(changes["trained_status"]) == {"pass"} and set(changes["base_status"]) <= {"fail", "timeout"}
    in_force = "+".join(layer.split(" ")[0] for layer in Sandbox().isolation.layers)
    assert set(changes["sandbox"]) == {in_force}                       # which isolation graded them

    text = result.summary()
    assert "code mk_code_topic [lora]: newly solved" in text and "broken 0" in text and "graded in sandbox" in text


def test_rerun_comes_from_the_cache_without_loading_or_grading(pair, result, no_model_load, monkeypatch):
    from modelkit.bench.codeeval import lm_task

    monkeypatch.setattr(lm_task, "grade_responses", lambda *a: (_ for _ in ()).throw(AssertionError("graded")))
    again = compare(pair["base"], pair["trained"], tasks=["mk_code_topic"], progress=False)
    assert again.to_frame().equals(result.to_frame())


def test_cli_compare_on_a_code_task(pair, result, capsys):
    from modelkit.ui.cli import main

    assert main(["compare", str(pair["base"]), str(pair["trained"]), "--tasks", "mk_code_topic", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["table"][0]["verdict"] == "better" and out["n_disagreements"] == len(result.disagreements())


def test_a_user_problem_file_whose_self_check_fails_is_refused_before_any_model_loads(pair, tmp_path, no_model_load):
    rows = [{"task_id": "u/0", "prompt": "def f():\n", "entry_point": "f", "canonical_solution": "    return 2\n",
             "test": "def check(candidate):\n    assert candidate() == 1\n"}]
    problems = tmp_path / "mine.jsonl"
    problems.write_text("".join(json.dumps(r) + "\n" for r in rows))
    yaml_path = write_task_yaml(problems, tmp_path / "tasks", name="my_code")
    assert "!function modelkit.bench.codeeval.lm_task.grade_responses" in yaml_path.read_text()
    with pytest.raises(GradingError, match=r"canonical solution does not pass: u/0"):
        compare(pair["base"], pair["trained"], tasks=["my_code"], include_path=tmp_path / "tasks", progress=False)


def test_mk_humaneval_runs_offline_through_compare(tmp_path):
    """The shipped HumanEval task on a tiny long-context pair (random weights: both fail)."""
    from test_compare import write_tiny_pair

    folders = write_tiny_pair(tmp_path, max_position_embeddings=2048)
    res = compare(folders["base"], folders["trained"], tasks="mk_humaneval", limit=2, progress=False)
    assert res.truncated() == []                        # every prompt fits 2048 - 1024 tokens
    row = res.to_frame().iloc[0]
    assert row["task"] == "mk_humaneval" and row["n"] == 2
    assert row["base"] == 0.0 and row["trained"] == 0.0 and row["p_mcnemar"] == 1.0
    docs = res.runs[res.base.label]["mk_humaneval"]["leaves"]["mk_humaneval"]["docs"]
    assert [d["target"] for d in docs] == ["HumanEval/0", "HumanEval/1"]
    assert all("# modelkit-grade: " in d["response"] for d in docs)


def test_an_mbpp_form_problem_file_becomes_a_compare_task(pair, tmp_path):
    from test_codeeval import MBPP_ROWS

    problems = tmp_path / "mbpp_mini.jsonl"
    problems.write_text("".join(json.dumps(r) + "\n" for r in MBPP_ROWS))
    yaml_path = write_task_yaml(problems, tmp_path / "tasks", max_gen_toks=8)
    text = yaml_path.read_text()
    assert yaml_path.stem == "mk_code_mbpp_mini" and "'[DONE]'" in text     # lm-eval mbpp's stop sequence
    res = compare(pair["base"], pair["trained"], tasks=["mk_code_mbpp_mini"], include_path=tmp_path / "tasks",
                  progress=False)
    row = res.to_frame().iloc[0]
    assert row["n"] == 2 and row["base"] == 0.0 and row["trained"] == 0.0   # neither writes Python
    docs = res.runs[res.base.label]["mk_code_mbpp_mini"]["leaves"]["mk_code_mbpp_mini"]["docs"]
    assert [d["target"] for d in docs] == ["11", "12"]
    assert "Your code should pass these tests" in docs[0]["prompt"] or "[BEGIN]" in docs[0]["prompt"]


@pytest.mark.slow
def test_the_compare_notebook_shows_the_problems_newly_solved(pair, result, kernel, tmp_path):
    """04-compare.ipynb run unattended on a code task (the models' results come from the cache)."""
    import nbformat

    from modelkit.ui.notebooks import run_notebook

    params = {"root": str(pair["base"].parent), "base": str(pair["base"]), "trained": str(pair["trained"]),
              "tasks": ["mk_code_topic"], "limit": None, "output_dir": str(tmp_path)}
    paths = run_notebook(Path(__file__).resolve().parents[1] / "notebooks" / "04-compare.ipynb", parameters=params,
                         output_dir=tmp_path, kernel=kernel)
    nb = nbformat.read(paths[0], as_version=4)
    assert not [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    text = "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") + o.get("data", {}).get("text/html", "")
                   for c in nb.cells for o in c.get("outputs", []))   # tables are Styler HTML
    assert "code mk_code_topic [lora]: newly solved" in text and "modelkit-grade: pass" in text
    rec = json.loads((tmp_path / "04-compare.json").read_text())
    assert rec["table"][0]["verdict"] == "better" and rec["n_disagreements"] == len(result.disagreements())
