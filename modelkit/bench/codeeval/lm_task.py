"""The lm-eval side of code evaluation: ``mk_humaneval`` and user code tasks in ``compare``.

lm-eval's own ``humaneval`` task loads HF ``evaluate``'s ``code_eval`` (which needs the
network) and runs programs unsandboxed; these tasks instead

* read problems with :func:`modelkit.bench.codeeval.load_problems` (``custom_dataset``) and run
  the self-check there, i.e. when ``compare`` prepares its tasks, before any model loads;
* generate with ``generate_until`` (greedy, the stop sequences of lm-eval's humaneval /
  mbpp tasks);
* grade all of a model's completions at once in the sandbox (a ``custom`` filter, parallel
  workers): each filtered response is the completion followed by one status line
  ``# modelkit-grade: <status> | <what went wrong> | <isolation>``, which the disagreement
  table shows (its ``target`` column is the ``task_id``);
* score ``pass_at_1`` 1.0 / 0.0 per problem (``process_results``), so ``compare`` pairs the
  problems and applies McNemar's test. A harness failure stops the evaluation with a
  GradingError naming the task ids: it is never scored as a fail.

A user problem file becomes a task with :func:`write_task_yaml` (then ``--include-path``).
"""
from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from modelkit.bench.codeeval.grade import (
    GradingError,
    Sample,
    default_workers,
    run_all,
    self_check,
)
from modelkit.bench.codeeval.problems import Problem, ProblemSet, load_problems
from modelkit.bench.codeeval.sandbox import Limits, Sandbox

STATUS_MARK = "# modelkit-grade: "
HUMANEVAL_STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]     # lm-eval's humaneval.yaml
MBPP_STOP = ["[DONE]"]                                                # lm-eval's mbpp.yaml
_FIELDS = [f.name for f in fields(Problem)]


def load(data_files: dict[str, str] | str | None = None, task_ids: Any = None, limit: int | None = None,
         timeout: float | None = None, **_: Any):
    """``custom_dataset``: the problems of ``data_files["test"]`` ("humaneval" for HumanEval)
    as a ``datasets.DatasetDict``, after their self-check."""
    import datasets

    source = data_files.get("test") if isinstance(data_files, dict) else data_files
    problems = load_problems(_resolve(source or "humaneval")).select(limit=limit, task_ids=task_ids)
    with Sandbox(_limits(timeout)) as sandbox:
        self_check(problems, sandbox=sandbox)
    rows = [{**asdict(p), "test_list": list(p.test_list), "generation_prompt": p.generation_prompt(),
             "timeout": timeout or 0.0} for p in problems]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def grade_responses(resps: list[list[str]], docs: list[dict]) -> list[str]:
    """``custom`` filter: every response graded in the sandbox; each document keeps its
    first response (greedy: one per document), completed by its status line (see the
    module docstring)."""
    problems = [_problem(doc) for doc in docs]
    samples, owners = [], []
    for i, (p, rs) in enumerate(zip(problems, resps)):
        for r in rs[:1]:
            samples.append(Sample(p.task_id, completion=r) if p.kind == "humaneval" else Sample(p.task_id, solution=r))
            owners.append(i)
    unique = ProblemSet(list({p.task_id: p for p in problems}.values()), problems[0].source if problems else "",
                        problems[0].kind if problems else "humaneval")
    timeout = next((float(d.get("timeout") or 0) for d in docs), 0.0) or None
    with Sandbox(_limits(timeout)) as sandbox:
        results = run_all(unique, samples, sandbox=sandbox, workers=default_workers())
        isolation = "+".join(layer.split(" ")[0] for layer in sandbox.isolation.layers)
    errors = [r for r in results if r.status == "error"]
    if errors:
        raise GradingError(f"the grading harness failed on {len(errors)} program(s) "
                           f"({', '.join(r.task_id for r in errors[:10])}): {errors[0].detail}; "
                           "nothing was scored", unique.source)
    out = [""] * len(docs)
    for sample, owner, result in zip(samples, owners, results):
        detail = " ".join(result.detail.strip().splitlines()[-1:])[:200]
        text = sample.completion if sample.completion is not None else sample.solution
        out[owner] = f"{text}\n{STATUS_MARK}{result.status} | {detail} | sandbox {isolation}"
    return out


def status_of(response: str) -> str:
    """The status a filtered response carries (``"missing"`` when it has none)."""
    tail = response.rsplit(STATUS_MARK, 1)
    return tail[1].split(" ", 1)[0].strip() if len(tail) == 2 else "missing"


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """``pass_at_1`` of one problem: 1.0 when its (first) response passed."""
    status = status_of(results[0]) if results else "missing"
    if status not in ("pass", "fail", "timeout"):
        raise GradingError(f"{doc.get('task_id')}: the response carries no grading status ({status}); "
                           "the modelkit-grade filter did not run")
    return {"pass_at_1": 1.0 if status == "pass" else 0.0}


def write_task_yaml(problems_file: str | Path, folder: str | Path, name: str | None = None, *,
                    max_gen_toks: int = 1024, timeout: float | None = None) -> Path:
    """Write an lm-eval task YAML for a problem file (HumanEval or MBPP form) into
    ``folder`` (give it to ``compare(..., include_path=folder)``); returns its path."""
    import yaml

    pset = load_problems(problems_file)
    path_text = str(Path(problems_file).expanduser().resolve())
    name = name or "mk_code_" + "".join(c if c.isalnum() else "_" for c in Path(problems_file).stem.split(".")[0]).lower()
    config = task_config(name, path_text, pset.kind, max_gen_toks=max_gen_toks, timeout=timeout)
    out = Path(folder) / f"{name}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config, sort_keys=False)
    for key in ("custom_dataset", "filter_fn", "process_results"):     # lm-eval's `!function` tag
        text = text.replace(f"{key}: FUNCTION_", f"{key}: !function ")
    out.write_text(text)
    return out


def task_config(name: str, problems: str, kind: str, *, max_gen_toks: int = 1024, timeout: float | None = None) -> dict:
    kwargs: dict[str, Any] = {"data_files": {"test": problems}}
    if timeout is not None:
        kwargs["timeout"] = timeout
    return {
        "task": name,
        "custom_dataset": "FUNCTION_modelkit.bench.codeeval.lm_task.load",
        "dataset_kwargs": kwargs,
        "output_type": "generate_until",
        "test_split": "test",
        "doc_to_text": "{{generation_prompt}}",
        "doc_to_target": "{{task_id}}",
        "generation_kwargs": {"until": HUMANEVAL_STOP if kind == "humaneval" else MBPP_STOP,
                              "max_gen_toks": max_gen_toks, "do_sample": False},
        "repeats": 1,
        "num_fewshot": 0,
        "filter_list": [{"name": "sandbox", "filter": [
            {"function": "custom", "filter_fn": "FUNCTION_modelkit.bench.codeeval.lm_task.grade_responses"}]}],
        "process_results": "FUNCTION_modelkit.bench.codeeval.lm_task.process_results",
        "metric_list": [{"metric": "pass_at_1", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


def _resolve(source: str) -> str:
    """A shipped task's data file (relative to modelkit/bench/tasks), else the path as given."""
    from modelkit.bench.tasks import TASKS_DIR

    if source != "humaneval" and not Path(source).is_absolute() and (TASKS_DIR / source).is_file():
        return str(TASKS_DIR / source)
    return source


def _problem(doc: dict) -> Problem:
    values = {k: doc[k] for k in _FIELDS if k in doc}
    values["test_list"] = tuple(values.get("test_list") or ())
    return Problem(**values)


def _limits(timeout: float | None) -> Limits:
    return Limits(timeout=float(timeout)) if timeout else Limits()


# --------------------------------------------------------------------------- compare view


def problem_changes(disagreements: "Any") -> "Any":
    """The code-task rows of ``CompareResult.disagreements()`` as per-problem changes:
    ``model, task, task_id, change`` ("newly solved" / "broken"), each side's grading
    status and what went wrong, and the isolation the grading ran under."""
    import pandas as pd

    rows = []
    for r in disagreements.to_dict("records"):
        b, t = _status_line(r["base_response"]), _status_line(r["trained_response"])
        if b is None or t is None:
            continue
        rows.append({"model": r["model"], "task": r["task"], "task_id": r["target"],
                     "change": "newly solved" if r["winner"] == "trained" else "broken",
                     "base_status": b[0], "trained_status": t[0], "base_detail": b[1], "trained_detail": t[1],
                     "sandbox": t[2] or b[2]})
    return pd.DataFrame(rows, columns=["model", "task", "task_id", "change", "base_status", "trained_status",
                                       "base_detail", "trained_detail", "sandbox"])


def summary_lines(disagreements: "Any") -> list[str]:
    """One line per (model, code task): which problems were newly solved or broken."""
    changes = problem_changes(disagreements)
    lines = []
    for (model, task), group in changes.groupby(["model", "task"], sort=False):
        parts = []
        for change in ("newly solved", "broken"):
            ids = group.loc[group["change"] == change, "task_id"].tolist()
            parts.append(f"{change} {len(ids)}" + (f" ({', '.join(ids[:8])}{', ...' if len(ids) > 8 else ''})" if ids else ""))
        lines.append(f"code {task} [{model}]: " + "; ".join(parts) + f"; graded in sandbox {group['sandbox'].iloc[0]}")
    return lines


def _status_line(response: str) -> tuple[str, str, str] | None:
    tail = str(response).rsplit(STATUS_MARK, 1)
    if len(tail) != 2:
        return None
    status, _, rest = tail[1].partition(" | ")
    detail, _, sandbox = rest.rpartition(" | ")
    return status.strip(), detail.strip(), sandbox.replace("sandbox ", "", 1).strip()
