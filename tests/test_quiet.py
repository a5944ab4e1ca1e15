"""Captured library output belongs to the code that runs in the capture: a panel's worker
thread exporting with its output captured does not swallow what a cell prints meanwhile."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import warnings

from modelkit.quiet import captured


def shown_on_stderr(message, category, filename, lineno, file=None, line=None):
    """How Python shows a warning outside pytest (which records them instead)."""
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def test_a_capture_in_a_worker_thread_leaves_the_cells_output_alone(capsys, monkeypatch):
    monkeypatch.setattr(warnings, "showwarning", shown_on_stderr)
    library = logging.getLogger("modelkit-test-library")
    library.addHandler(logging.StreamHandler(sys.stderr))     # the way libraries log to stderr
    library.setLevel(logging.INFO)
    library.propagate = False
    inside, cell_done, logs = threading.Event(), threading.Event(), []

    def export():                                             # what the worker runs
        with captured() as log:
            inside.set()
            assert cell_done.wait(30)
            print("from the export")
            library.info("export: library INFO")
            warnings.warn("export: a FutureWarning", FutureWarning)
        logs.append(log)

    worker = threading.Thread(target=export)
    try:
        worker.start()
        assert inside.wait(30)
        print("from the cell")                                # a cell run while the export works
        library.info("cell: library INFO")
        warnings.warn("cell: a UserWarning")
        cell_done.set()
        worker.join(30)
    finally:
        library.handlers.clear()
    text = logs[0].text
    assert "from the export" in text and "export: library INFO" in text and "export: a FutureWarning" in text
    assert "cell" not in text
    out, err = capsys.readouterr()
    assert "from the cell" in out and "cell: library INFO" in err and "cell: a UserWarning" in err
    assert "export" not in out + err


def test_captures_in_two_threads_end_in_any_order_and_restore_the_streams(capfd):
    stdout, stderr = sys.stdout, sys.stderr
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    logs = {}

    def first():
        with captured() as log:
            first_in.set()
            assert second_in.wait(30)
            print("first")
        logs["first"] = log
        first_out.set()

    worker = threading.Thread(target=first)
    worker.start()
    assert first_in.wait(30)
    with captured() as log:                                   # begins after, ends after the first
        second_in.set()
        assert first_out.wait(30)
        print("second")
        subprocess.run([sys.executable, "-c", "import sys; sys.stderr.write('fatal: from a subprocess\\n')"])
    worker.join(30)
    assert logs["first"].lines == ["first"]
    assert log.lines[0] == "second" and "fatal: from a subprocess" in log.text
    assert sys.stdout is stdout and sys.stderr is stderr      # nothing left routed
    print("after")
    os.write(2, b"fd 2 after\n")                              # fd 2 is the process's again
    out, err = capfd.readouterr()
    assert out == "after\n" and err == "fd 2 after\n"


def test_progress_into_a_log_file_is_a_few_lines_ending_at_the_total(capsys):
    # stderr here is not a terminal (as in a batch job or CI): a phase of a thousand quick
    # steps draws its start and its end, not a thousand redraws
    from modelkit.progress import phase

    with phase("diff", total=1000, unit="tensors") as bar:
        for _ in range(1000):
            bar.update(1)
    err = capsys.readouterr().err
    assert err.count("diff:") <= 3, err[:500]
    assert "1,000/1,000 tensors" in err.rsplit("diff:", 1)[-1]


def test_progress_in_a_notebook_widget_is_drawn_at_every_step(monkeypatch):
    # tqdm.notebook writes to the kernel's stdout, which is no terminal: the widget must
    # still redraw at once, not every 10 s like a log file
    import tqdm.auto
    import tqdm.notebook

    from modelkit.progress import TqdmDisplay, phase

    monkeypatch.setattr(tqdm.auto, "tqdm", tqdm.notebook.tqdm)
    display = TqdmDisplay()
    with phase("export", total=3, unit="tensors", show=False) as p:
        display.start(p)
        assert display._interval == TqdmDisplay.INTERVAL
        p.done = 2
        display.update(p)
        assert display._bars[id(p)].n == 2
        display.close(p)
