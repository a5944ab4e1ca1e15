"""The notebooks as products: papermill runs each one unattended on the demo artifacts and
the results it records are checked; nbval runs the committed notebooks as they are; the
committed files carry no volatile output. The kernel is this interpreter, through a
``python3`` kernelspec written into a temp folder put first on ``$JUPYTER_PATH``; every other
Jupyter/IPython directory is a temp one already (tests/conftest.py).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from modelkit.ui.cli import main as cli
from modelkit.ui.demo import main as demo_main
from modelkit.ui.demo import notebook_parameters, write_demo
from modelkit.ui.notebooks import CHECK_OUTPUT, strip_volatile

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]-*.ipynb"))
NAMES = [p.stem for p in NOTEBOOKS]
slow = pytest.mark.slow


@pytest.fixture(scope="module")
def kernel(tmp_path_factory) -> str:
    """``python3`` resolved to this interpreter, whatever kernelspecs the machine has:
    written into a temp folder put first on the Jupyter path (``$JUPYTER_PATH``)."""
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager

    path = tmp_path_factory.mktemp("jupyter-path")
    write_kernel_spec(path / "kernels" / "python3")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(path))
        assert KernelSpecManager().get_kernel_spec("python3").argv[0] == sys.executable
        yield "python3"


@pytest.fixture(scope="module")
def demo_root(catalog) -> Path:
    root = catalog["plain-llama"].parent
    write_demo(root)          # the catalog is already there: only what the demo adds
    return root


def _outputs_text(cell) -> str:
    parts = []
    for o in cell.get("outputs", []):
        parts.append(o.get("text", "") if o.output_type == "stream" else o.get("data", {}).get("text/plain", ""))
    return "".join(parts)


def _checked_text(nb) -> str:
    return "".join(_outputs_text(c) for c in nb.cells if c.cell_type == "code" and CHECK_OUTPUT in c.source)


def _widget_models(nb) -> list[dict]:
    state = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    return [m["state"] for m in state.values()]


def test_there_is_a_notebook_per_operation():
    assert NAMES == ["01-inspect", "02-export", "03-diff", "04-compare", "05-watch"]
    assert set(NAMES) == set(notebook_parameters("demo"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_committed_notebooks_carry_no_volatile_output(path):
    nb = nbformat.read(path, as_version=4)
    assert nb == strip_volatile(path, write=False), "run modelkit.ui.notebooks.strip_volatile on it"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", []), "first code cell must be tagged parameters"
    assert "output_dir" in code[0].source
    for i, cell in enumerate(code, 1):
        if CHECK_OUTPUT in cell.source:   # nbval compares these: they hold the expected text
            assert cell.outputs and all(o.output_type == "stream" for o in cell.outputs)
            assert "/" not in _outputs_text(cell), "no paths in checked output"
            assert cell.execution_count == i
        else:
            assert cell.execution_count is None and cell.outputs == []
    assert max(len(c.source.splitlines()) for c in code) <= 12, "cells stay short: logic lives in modelkit"
    assert nb.metadata.kernelspec.name == "python3"


def test_demo_prints_one_line_per_artifact(demo_root, capsys):
    assert demo_main(demo_root, notebooks=False) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert "error missing-router" in lines["dylora-missing-router"]
    assert "dylora-moe" in lines["dylora-missing-router"]
    assert lines["plain-llama"].rstrip().endswith("ok")
    assert "cannot be opened: UnsafePathError" in lines["bad-escaping-symlink"]
    assert "peft-lora" in lines["pair/lora"] and lines["pair/base"].rstrip().endswith("ok")


# -- papermill: every notebook on the demo parameters, results checked ----------------------

def _check_01_inspect(out: Path, nb) -> None:
    rec = json.loads((out / "01-inspect.json").read_text())
    assert rec["format"] == "compressed-moe"
    assert {"severity": "error", "code": "missing-tensors"}.items() <= \
        next(f for f in rec["findings"] if f["code"] == "missing-tensors").items()
    assert "errors: ['missing-tensors']" in _checked_text(nb)
    # the picker was built over the demo root: its options were saved with the widget state
    pickers = [m for m in _widget_models(nb) if "mk-picker" in m.get("_dom_classes", [])]
    assert pickers and "dylora-missing-router" in pickers[0]["_options_labels"]


def _check_02_export(out: Path, nb) -> None:
    rec = json.loads((out / "02-export.json").read_text())
    assert rec["written"] and rec["ok"]
    # the default on a mixture: one verified folder per expert
    assert rec["options"]["expert"] == "all" and len(rec["experts"]) == 2
    assert all(e["verification"]["ok"] and e["origins"].get("lora-merge", 0) > 0 for e in rec["experts"])
    assert "written: True | verified: True" in _checked_text(nb)
    loaded = "".join(_outputs_text(c) for c in nb.cells if "from_pretrained" in c.source)
    assert "ForCausalLM" in loaded        # stock transformers loaded the export
    # the report keeps the record, never a copy of the model; the temporary export is gone
    assert not list(out.rglob("*.safetensors")) and not Path(rec["out"]).exists()
    assert json.loads((out / "02-export.verdict.json").read_text())["label"] == "EXPORTED"


def _check_03_diff(out: Path, nb) -> None:
    rec = json.loads((out / "03-diff.json").read_text())
    assert rec["verdict"] == "different"
    changed = [t for t in rec["tensors"] if t["changed"]]
    # compression rebuilds the experts (and keeps a distilled router); nothing else moves
    assert changed and {t["role"] for t in changed} == {"expert", "router"}
    assert all(0 < p["rel_change"] < 2 for p in rec["by_projection"])
    assert (out / "03-diff.png").stat().st_size > 10_000
    assert "verdict: different" in _checked_text(nb)


def _check_04_compare(out: Path, nb) -> None:
    rec = json.loads((out / "04-compare.json").read_text())
    assert rec["tasks"] == ["mk_topic", "mk_count"] and rec["settings"]["limit"] == 20
    rows = {(r["task"], r["metric"]): r for r in rec["table"]}
    topic, count = rows[("mk_topic", "acc")], rows[("mk_count", "acc")]
    # the fine-tune learned the topic task (paired test), and left the control task alone
    assert topic["verdict"] == "better" and topic["delta"] > 0.3 and topic["p_mcnemar"] < 0.01
    assert topic["n"] == 20 and count["verdict"] == "no significant change"
    assert rec["n_disagreements"] > 0
    assert (out / "04-compare.png").stat().st_size > 10_000
    assert "mk_topic   acc       n=20   better" in _checked_text(nb)


def _check_05_watch(out: Path, nb) -> None:
    rec = json.loads((out / "05-watch.json").read_text())
    status = {c["name"]: c["status"] for c in rec["checkpoints"]}
    assert status == {"checkpoint-10": "done", "checkpoint-20": "done", "checkpoint-30": "done",
                      "checkpoint-40": "done", "checkpoint-60": "rejected", "best_model": "done"}
    acc = {r["checkpoint"]: r for r in rec["table"] if r["metric"] == "acc"}
    assert acc["checkpoint-30"]["verdict"] == "better" and acc["checkpoint-30"]["n"] == 20
    assert [acc[c]["step"] for c in ("checkpoint-10", "checkpoint-20", "checkpoint-30", "checkpoint-40")] == [10, 20, 30, 40]
    assert (out / "05-watch.png").stat().st_size > 10_000
    assert "checkpoint-30 mk_topic acc: better" in _checked_text(nb)
    # its verdict is recorded like every notebook's: the demo run has a rejected checkpoint
    verdict = json.loads((out / "05-watch.verdict.json").read_text())
    assert verdict["label"] == "PROBLEMS" and verdict["exit_code"] == 1 and "checkpoint-60" in verdict["detail"]
    # the live panel was built over the demo root: its run picker lists the demo run
    pickers = [m for m in _widget_models(nb) if "mk-run-picker" in m.get("_dom_classes", [])]
    assert pickers and "pair/run" in pickers[0]["_options_labels"]


CHECKS = {"01-inspect": _check_01_inspect, "02-export": _check_02_export, "03-diff": _check_03_diff,
          "04-compare": _check_04_compare, "05-watch": _check_05_watch}


@slow
@pytest.mark.parametrize("name", NAMES)
def test_papermill_runs_the_notebook_and_records_its_results(name, demo_root, kernel, tmp_path, monkeypatch):
    from modelkit.ui.notebooks import run_notebook

    monkeypatch.chdir(os.path.commonpath([demo_root, tmp_path]))   # where a user would type the command
    params = notebook_parameters(demo_root, tmp_path)[name]
    paths = run_notebook(ROOT / "notebooks" / f"{name}.ipynb", parameters=params,
                         output_dir=tmp_path, kernel=kernel)
    assert [p.name for p in paths] == [f"{name}.ipynb", f"{name}.html"]
    nb = nbformat.read(paths[0], as_version=4)
    assert _widget_models(nb), "widget state saved in the executed notebook"
    assert not [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    _check_shareable_html(paths[1], name)
    first_checked = next(line for line in _checked_text(nb).splitlines() if line.strip())
    assert first_checked not in paths[1].read_text(), "nbval's lines stay in the executed notebook, out of the report"
    CHECKS[name](tmp_path, nb)


def _check_shareable_html(page: Path, name: str) -> None:
    """Opens offline and reads as a report: titled, verdict first, no code, no CDN, no
    absolute paths, no tracebacks or library noise."""
    import re

    text = page.read_text()
    title = re.search(r"<title>(.*?)</title>", text, re.S).group(1)
    assert title != "Notebook" and title.split(" — ")[0] in {
        "01-inspect": "Inspect an artifact", "02-export": "Export to a standard Hugging Face folder",
        "03-diff": "Diff two artifacts weight by weight",
        "04-compare": "Compare base vs trained on lm-evaluation-harness tasks",
        "05-watch": "Watch a training run: evaluate every new checkpoint as it lands"}[name]
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text), "nothing loaded from the network"
    assert "require.js" not in text and "widget-state+json" not in text
    assert "import modelkit" not in text and 'class="jp-InputPrompt' not in text   # code hidden
    assert "mk-verdict" in text                                   # the coloured verdict line
    assert "/tmp/" not in text and str(Path.home()) + "/" not in text     # no absolute paths
    assert "Traceback" not in text and "fatal: not a git repository" not in _visible_html(text)
    if name != "02-export":   # its summary is its only detail; elsewhere the tables say it first
        folded = re.search(r"<details class=.mk-text-summary.>.*?<pre[^>]*>(.*?)</pre>", text, re.S)
        assert folded and len(folded.group(1).splitlines()) > 3 and folded.group(1) not in _visible_html(text)


def _visible_html(text: str) -> str:
    import re

    return re.sub(r"<details.*?</details>", "", text, flags=re.S)


@slow
def test_report_cli_takes_parameters_relative_to_the_current_folder(demo_root, kernel, tmp_path,
                                                                    monkeypatch, capsys):
    monkeypatch.chdir(demo_root)
    code = cli(["report", str(ROOT / "notebooks" / "01-inspect.ipynb"), "-p", "artifact",
                "dylora-missing-router", "-p", "deep", "true", "--output-dir", str(tmp_path)])
    assert code == 1                       # the verdict: an error finding (missing-router)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("ERRORS: missing-router")   # the verdict first, then the files
    assert lines[1:3] == [str(tmp_path / "01-inspect.ipynb"), str(tmp_path / "01-inspect.html")]
    rec = json.loads((tmp_path / "01-inspect.json").read_text())
    assert rec["folder"].startswith(str(demo_root / "dylora-missing-router"))
    assert "missing-router" in {f["code"] for f in rec["findings"]}


@slow
def test_a_failing_notebook_is_reported_with_its_cell_and_kept(demo_root, kernel, tmp_path, capsys):
    code = cli(["report", str(ROOT / "notebooks" / "01-inspect.ipynb"), "-p", "artifact",
                str(demo_root / "no-such-artifact"), "--output-dir", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "NotebookError" in err and "RefNotFoundError" in err
    assert (tmp_path / "01-inspect.ipynb").exists() and (tmp_path / "01-inspect.html").exists()


@pytest.mark.parametrize("content", [b"not json", b"\xff\xfe", b'{"a": 1}', b"[1, 2]",
                                     b'{"nbformat": 4, "nbformat_minor": 5, "cells": "x", "metadata": []}'],
                         ids=["text", "binary", "no-cells", "a-list", "wrong-types"])
def test_a_file_that_is_not_a_notebook_is_a_typed_error_naming_it(content, tmp_path, capsys):
    bad = tmp_path / "results.ipynb"
    bad.write_bytes(content)
    for argv in (["report", str(bad)], ["report", str(bad), "a", "b"]):   # one run, and a batch
        assert cli([*argv, "--output-dir", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert f"NotebookError: {bad}: not a readable notebook" in err and "internal error" not in err
    assert not (tmp_path / "out").exists()


def test_a_misspelt_parameter_is_refused_before_anything_runs(tmp_path, capsys):
    # papermill alone warns and runs on the defaults: a report on the demo artifact, named
    # after the one you meant
    inspect_nb = str(ROOT / "notebooks" / "01-inspect.ipynb")
    out = tmp_path / "out"
    for argv in (["-p", "artifcat", "runs/x"], ["runs/x", "runs/y", "--over", "artifcat"]):
        assert cli(["report", inspect_nb, *argv, "--output-dir", str(out)]) == 2
        err = capsys.readouterr().err
        assert "no parameter 'artifcat' (did you mean 'artifact'?)" in err and "it has: artifact, base" in err
    assert not out.exists()
    (tmp_path / "taken").write_text("a file where the reports would go")
    assert cli(["report", inspect_nb, "--output-dir", str(tmp_path / "taken")]) == 2
    assert "cannot create the output folder" in capsys.readouterr().err


@slow
def test_a_batch_kernel_talks_over_private_unix_sockets_that_are_removed(kernel, tmp_path, capfd):
    # a notebook with no kernel or language metadata (as some tools write them): Python assumed
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "import json\nfrom ipykernel import get_connection_file\n"
        "info = json.load(open(get_connection_file()))\nprint(info['transport'], info['ip'])")])
    nbformat.write(nb, tmp_path / "where.ipynb")
    from modelkit.ui.notebooks import run_notebook

    paths = run_notebook(tmp_path / "where.ipynb", output_dir=tmp_path / "out", html=False)
    transport, ip = _outputs_text(nbformat.read(paths[0], as_version=4).cells[-1]).split()
    assert transport == "ipc"
    assert not Path(ip).parent.exists()          # the socket folder went with the kernel
    assert "without encryption" not in capfd.readouterr().err   # ipykernel's TCP warning


# -- nbval: the committed notebooks, as committed ---------------------------------------------

@slow
def test_nbval_runs_the_committed_notebooks(demo_root, kernel, tmp_path):
    # the repository layout the defaults expect (../demo, ../reports), with the test's demo
    (tmp_path / "notebooks").mkdir()
    for p in NOTEBOOKS:
        shutil.copy(p, tmp_path / "notebooks" / p.name)
    (tmp_path / "demo").symlink_to(demo_root, target_is_directory=True)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-kernel-name", kernel, "-p", "no:cacheprovider",
         "-q", "-c", str(tmp_path / "pytest.ini"), "--rootdir", str(tmp_path), "notebooks"],
        cwd=tmp_path, env=os.environ.copy(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    cells = sum(len([c for c in nbformat.read(p, as_version=4).cells if c.cell_type == "code"]) for p in NOTEBOOKS)
    assert f"{cells} passed" in proc.stdout
    assert (tmp_path / "reports" / "01-inspect.json").exists()
