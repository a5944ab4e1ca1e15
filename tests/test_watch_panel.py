"""The watch panel without a browser: pick a run, click Watch, see the table and the plot
update as checkpoints land, click Stop. Errors are shown in the panel."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from modelkit.testing.training_run import land
from modelkit.ui.widgets import WatchPanel, discover_runs, output_text

TASKS = "mk_topic"


def wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the panel did not get there in time")
        time.sleep(0.1)


@pytest.fixture
def runs(training_run, tmp_path) -> Path:
    root = tmp_path / "experiments"
    (root / "empty").mkdir(parents=True)
    (root / "growing").mkdir()
    shutil.copytree(training_run, root / "done")
    return root


def test_the_picker_lists_run_folders(runs):
    assert discover_runs(runs) == {"done": str(runs / "done")}          # an empty folder is no run yet
    (runs / "growing" / "checkpoint-1").mkdir()
    assert list(discover_runs(runs)) == ["done", "growing"]


def test_table_and_plot_update_as_checkpoints_land_and_stop_ends_the_watch(runs, demo_pair, training_run):
    run = runs / "growing"
    panel = WatchPanel(root=runs, run_dir=run, baseline=demo_pair["base"], tasks=TASKS, limit=8, interval=0.2,
                       settle=0.4)
    assert panel.picker.value == str(run)
    panel.button.click()
    assert panel.runner.exception is None, panel.runner.error.value
    assert panel.running and not panel.stop_button.disabled
    for name in ("checkpoint-10", "checkpoint-30"):                     # the run saves a checkpoint
        land(training_run / name, run / name)                           # in one step: never seen half-copied
        wait_for(lambda: f"{name}" in output_text(panel.table) and "done" in output_text(panel.table))
        wait_for(lambda: name in output_text(panel.scores))
    scores = output_text(panel.scores)
    assert "<table" in scores and "better" in scores                    # checkpoint-30 learned the task
    assert any("image/png" in o["data"] for o in panel.plot.outputs)
    assert "watching" in panel.live.value
    verdict = panel.runner.verdict.value                                 # the verdict line so far, coloured
    assert ">OK</b>" in verdict and "2 done" in verdict and "latest checkpoint-30 vs the baseline: 2 better, 0 worse" in verdict
    panel.stop(wait=60)
    assert not panel.running and "stopped" in panel.live.value and panel.stop_button.disabled
    assert [e.name for e in panel.result.entries] == ["checkpoint-10", "checkpoint-30"]


def test_errors_are_shown_in_the_panel(runs, tmp_path):
    panel = WatchPanel(root=runs, run_dir=runs / "done", tasks="")
    panel.button.click()
    assert "pick a run folder and name at least one task" in panel.runner.error.value and not panel.running
    panel = WatchPanel(root=runs, run_dir=runs / "done", baseline=tmp_path / "no-such-model", tasks=TASKS,
                       limit=8, settle=0.1)
    panel.button.click()
    wait_for(lambda: not panel.running, 60)
    line = panel.thread_error.value.split("<details")[0]                # what the user reads first
    assert "WatchError" in line and "no-such-model" in line and "Traceback" not in line
    assert not panel.runner.button.disabled


@pytest.mark.slow
def test_in_a_live_kernel_the_panel_updates_from_its_thread_and_the_cells_stay_clean(runs, demo_pair, training_run,
                                                                                      tmp_path):
    """JupyterLab's machinery (nbclient, a real ipykernel): Watch is clicked in one cell, a
    checkpoint lands while the kernel is idle, later cells read what the panel shows."""
    import json

    import nbformat
    from ipykernel.kernelspec import write_kernel_spec
    from nbclient import NotebookClient

    run = runs / "growing"
    spec = tmp_path / "jupyter-path"
    write_kernel_spec(spec / "kernels" / "python3")
    cells = [
        "from modelkit.ui.widgets import WatchPanel, output_text\n"
        f"p = WatchPanel(root={str(runs)!r}, run_dir={str(run)!r}, baseline={str(demo_pair['base'])!r},"
        " tasks='mk_topic', limit=8, interval=0.2, settle=0.4)\np.button.click()\np",
        "import time\nfrom modelkit.testing.training_run import land\n"
        f"land({str(training_run / 'checkpoint-30')!r}, {str(run / 'checkpoint-30')!r})\n"
        "deadline = time.monotonic() + 240\n"
        "while 'better' not in output_text(p.scores) and time.monotonic() < deadline:\n    time.sleep(0.2)",
        "p.stop(wait=120)\nimport json\nprint('@@' + json.dumps({'live': p.live.value, 'table': output_text(p.table),"
        " 'scores': output_text(p.scores), 'error': p.thread_error.value, 'running': p.running}))",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(spec))
        NotebookClient(nb, kernel_name="python3", timeout=400, resources={"metadata": {"path": str(tmp_path)}}).execute()
    line = next(line for o in nb.cells[2].outputs if o.output_type == "stream" for line in o.text.splitlines()
                if line.startswith("@@"))
    shown = json.loads(line[2:])
    assert shown["error"] == "" and not shown["running"] and "stopped" in shown["live"]
    assert "checkpoint-30" in shown["table"] and "done" in shown["table"] and "better" in shown["scores"]
    # the evaluations ran in their own process: nothing of lm-eval's reached the cells
    for cell in nb.cells:
        noise = [o for o in cell.outputs if o.output_type == "stream" and o.name == "stderr"]
        assert not noise, noise
        assert not [o for o in cell.outputs if o.output_type == "error"]
    state = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    assert any("mk-watch" in m["state"].get("_dom_classes", []) for m in state.values())
