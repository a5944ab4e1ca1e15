"""A real browser over a real JupyterLab: open 05-watch.ipynb, run all cells, type a run
folder that is still empty into the live panel, click Watch, let a checkpoint land, see
it in the table and the plot, click Stop. The screenshot is kept in the test's temp folder
(``watch.png``; look at it when the panel changes).

The JupyterLab server and the browser are the ones of tests/test_browser.py (same helpers).
"""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from modelkit.testing.training_run import land
from test_browser import CHROMIUM, CHROMIUM_ARGS, ROOT, _free_port, _settings, _stop, _wait_for_server

pytestmark = [pytest.mark.slow, pytest.mark.browser,
              pytest.mark.skipif(not CHROMIUM.exists(),
                                 reason="/usr/bin/chromium is not installed (apt-get install chromium; .ci/run does)")]


@pytest.fixture
def lab(catalog, tmp_path):
    from ipykernel.kernelspec import write_kernel_spec

    from modelkit.ui.demo import write_demo

    root = catalog["plain-llama"].parent
    write_demo(root)                                   # the demo pair and its simulated run
    work = tmp_path / "work"
    (work / "notebooks").mkdir(parents=True)
    shutil.copy(ROOT / "notebooks" / "05-watch.ipynb", work / "notebooks")
    (work / "demo").symlink_to(root, target_is_directory=True)
    home = tmp_path / "jupyter"
    write_kernel_spec(home / "kernels" / "kernels" / "python3")
    _settings(home / "settings")
    env = {**os.environ,
           "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_DATA_DIR": str(home / "data"),
           "JUPYTER_RUNTIME_DIR": str(home / "runtime"), "IPYTHONDIR": str(home / "ipython"),
           "JUPYTER_PATH": str(home / "kernels"), "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"), "JUPYTER_PLATFORM_DIRS": "1"}
    port, token = _free_port(), secrets.token_hex(16)
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "jupyterlab.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
             f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
             f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}",
             "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
             *(["--allow-root"] if os.geteuid() == 0 else [])],
            cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_server(f"{base}/api/status?token={token}", proc, log)
        yield base, token, root, tmp_path, log
    finally:
        _stop(proc, base, token)


def test_watch_a_run_live_see_the_checkpoint_land_then_stop(lab):
    from playwright.sync_api import expect, sync_playwright

    base, token, root, tmp_path, log = lab
    growing = tmp_path / "growing-run"
    growing.mkdir()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1100})
        try:
            page.goto(f"{base}/lab/tree/notebooks/05-watch.ipynb?token={token}", timeout=120_000)
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
            expect(page.get_by_text("Python 3 (ipykernel) | Idle")).to_be_visible(timeout=120_000)
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()

            panel = page.locator(".mk-watch")
            expect(panel).to_be_visible(timeout=300_000)
            assert "pair/run" in panel.locator(".mk-run-picker select option").all_inner_texts()
            folder = panel.locator(".mk-run-folder input")
            folder.fill(str(growing))
            folder.press("Enter")
            panel.locator("button.mk-run").click()
            expect(panel.locator(".mk-live")).to_contain_text("watching", timeout=60_000)
            assert panel.locator(".mk-stop").is_enabled()

            land(root / "pair" / "run" / "checkpoint-30", growing / "checkpoint-30")   # a save lands, in one step
            expect(panel.locator(".mk-watch-table table")).to_contain_text("checkpoint-30", timeout=240_000)
            expect(panel.locator(".mk-watch-table table")).to_contain_text("done")
            expect(panel.locator(".mk-live")).to_contain_text("1 done")
            panel.locator(".lm-TabBar-tab", has_text="plot").click()
            expect(panel.locator(".mk-watch-plot img")).to_be_visible(timeout=30_000)

            page.keyboard.press("Control+b")              # hide the file browser: room for the panel
            panel.scroll_into_view_if_needed()
            page.screenshot(path=str(tmp_path / "watch.png"))
            panel.locator(".mk-stop").click()
            expect(panel.locator(".mk-live")).to_contain_text("stopped", timeout=120_000)
            assert panel.locator("button.mk-run").is_enabled()
            assert panel.locator(".mk-error").first.inner_text().strip() == ""
        except Exception:
            page.screenshot(path=str(log.with_name("failure.png")))
            print(log.read_text()[-4000:])
            raise
        finally:
            browser.close()
    assert (tmp_path / "watch.png").stat().st_size > 10_000
    assert [p.name for p in growing.iterdir()] == ["checkpoint-30"]       # nothing written into the run
