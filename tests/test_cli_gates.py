"""The CLI as a CI gate: exit codes follow the result (diff like diff(1), compare fails on a
regression, report on its notebook's verdict), batch reports over many artifacts, and the
Markdown results table."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelkit.ui.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]


def test_diff_exits_like_diff1(catalog, capsys):
    same = cli(["diff", str(catalog["plain-llama"]), str(catalog["plain-llama"])])
    assert same == 0 and capsys.readouterr().out.startswith("IDENTICAL")
    different = cli(["diff", str(catalog["original-qwen3-moe"]), str(catalog["compressed-checkpoint-N"])])
    assert different == 1 and capsys.readouterr().out.startswith("DIFFERENT")


def test_inspect_prints_its_verdict_first_and_exits_1_on_an_error_finding(catalog, capsys):
    assert cli(["inspect", str(catalog["dylora-missing-router"])]) == 1
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("ERRORS: missing-router — dylora-moe")
    assert cli(["inspect", str(catalog["plain-llama"])]) == 0
    assert capsys.readouterr().out.startswith("OK: no findings — plain-hf")


def test_every_subcommand_explains_its_arguments_and_shows_an_example(capsys):
    for command in ("inspect", "export", "diff", "compare", "report"):
        with pytest.raises(SystemExit):
            cli([command, "--help"])
        text = capsys.readouterr().out
        assert "examples:" in text and f"modelkit {command} " in text and "exit code" in text, command
    with pytest.raises(SystemExit):
        cli(["export", "--help"])
    text = capsys.readouterr().out
    assert "--allow-untrained" in text and "folder to write" in text


def test_export_allow_untrained_flag_lets_an_untrained_adapter_through(catalog, tmp_path, capsys):
    ref = str(catalog["peft-lora-untrained"])
    assert cli(["export", ref, str(tmp_path / "refused")]) == 2
    assert "allow_untrained" in capsys.readouterr().err
    assert cli(["export", ref, str(tmp_path / "out"), "--allow-untrained"]) == 0
    assert (tmp_path / "out" / "config.json").exists()


@pytest.mark.slow
def test_compare_markdown_table_and_exit_code(catalog, capsys):
    from modelkit.ui.demo_pair import write_demo_pair

    pair = write_demo_pair(catalog["plain-llama"].parent / "pair")
    code = cli(["compare", str(pair["base"]), str(pair["trained"]), "--tasks", "mk_topic", "--limit", "8",
                "--markdown"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0                                   # better, not worse: the gate passes
    assert lines[0].startswith("|Model|Task|Metric|Base|Trained|")
    assert any(line.startswith("|lora|mk_topic|acc|") and line.endswith("|better|") for line in lines)
    # the same pair the other way round: the "trained" side got worse, the gate fails
    assert cli(["compare", str(pair["trained"]), str(pair["base"]), "--tasks", "mk_topic", "--limit", "8"]) == 1


@pytest.mark.slow
def test_report_batch_one_folder_per_artifact_an_index_and_the_worst_exit_code(catalog, tmp_path, capsys,
                                                                              monkeypatch):
    from ipykernel.kernelspec import write_kernel_spec

    write_kernel_spec(tmp_path / "kernels" / "kernels" / "python3")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "kernels"))
    monkeypatch.chdir(catalog["plain-llama"].parent)
    out = tmp_path / "reports"
    code = cli(["report", str(ROOT / "notebooks" / "01-inspect.ipynb"), "plain-llama", "dylora-missing-router",
                "--output-dir", str(out)])
    assert code == 1                                   # one artifact has an error finding
    index = json.loads((out / "index.json").read_text())
    verdicts = {e["folder"]: e["verdict"]["label"] for e in index["entries"]}
    assert verdicts == {"plain-llama": "OK", "dylora-missing-router": "ERRORS"}
    for folder in verdicts:                           # nothing overwrites anything
        assert (out / folder / "01-inspect.html").exists() and (out / folder / "01-inspect.json").exists()
    page = (out / "index.html").read_text()
    assert "plain-llama/01-inspect.html" in page and "ERRORS" in page and "exit code 1" in page
    report = (out / "dylora-missing-router" / "01-inspect.html").read_text()
    assert "<title>Inspect an artifact — dylora-missing-router</title>" in report
    printed = capsys.readouterr().out
    assert "OK" in printed and "ERRORS" in printed and "index.html" in printed


def test_a_reader_that_closes_the_pipe_early_ends_the_command_quietly(catalog):
    """``modelkit inspect REF | head -1``: the reader goes away before the output is written;
    the command exits like a pipeline's writer (141), with no error about a file."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "modelkit.ui.cli", "inspect", str(catalog["dylora-late-best"])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()                          # before the child has printed anything
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, stderr
    assert "Error" not in stderr


@pytest.mark.parametrize("command", ["compare base trained", "watch runs/x"])
def test_limit_is_a_sample_count_or_a_fraction_as_lm_eval_takes_it(command):
    from modelkit.ui.cli import build_parser

    parse = lambda limit: build_parser().parse_args([*command.split(), "--tasks", "t", "--limit", limit]).limit  # noqa: E731
    assert parse("20") == 20 and isinstance(parse("20"), int)
    assert parse("0.1") == 0.1 and parse("1.0") == 1.0 and isinstance(parse("1.0"), float)
    with pytest.raises(SystemExit):
        parse("ten")
