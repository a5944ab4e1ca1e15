"""A real browser over a real JupyterLab: open 01-inspect.ipynb, run all cells, pick a
faulty demo artifact in the widget, click Inspect, and see its error code in the findings
table. Saves reports/screenshots/inspect.png (the README shows it).

JupyterLab listens on 127.0.0.1 (random free port, token) with every Jupyter/IPython
directory in a temp folder; Debian's /usr/bin/chromium is driven headless through
Playwright's sync API. The server (and its kernels) are stopped in a ``finally``.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = ROOT / "reports" / "screenshots" / "inspect.png"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
                 "--no-first-run", "--disable-component-update", "--disable-sync"]
PICK, CODE = "dylora-missing-router", "missing-router"   # the notebook's own default is another one

pytestmark = [pytest.mark.slow, pytest.mark.browser,
              pytest.mark.skipif(not CHROMIUM.exists(),
                                 reason="/usr/bin/chromium is not installed (apt-get install chromium; .ci/run does)")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _settings(folder: Path) -> None:
    """No news/update pop-ups, no kernel dialog (start the notebook's own kernel), every cell
    rendered (widgets in far cells too)."""
    for plugin, values in {
        "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
        "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none", "autoStartDefaultKernel": True},
    }.items():
        path = folder / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))


def _wait_for_server(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"JupyterLab did not answer within {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def _stop(proc: subprocess.Popen, base: str, token: str) -> None:
    """Ask the server to shut down (kernels included), then end its process group."""
    try:
        req = urllib.request.Request(f"{base}/api/shutdown", method="POST",
                                     headers={"Authorization": f"token {token}"})
        urllib.request.urlopen(req, timeout=10).close()
        proc.wait(timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is None or _group_alive(proc.pid):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                continue


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture
def lab(catalog, tmp_path):
    """A running JupyterLab over a copy of notebooks/ beside the demo artifacts; yields its URL and token."""
    from ipykernel.kernelspec import write_kernel_spec

    work = tmp_path / "work"
    (work / "notebooks").mkdir(parents=True)
    shutil.copy(ROOT / "notebooks" / "01-inspect.ipynb", work / "notebooks")
    (work / "demo").symlink_to(catalog["plain-llama"].parent, target_is_directory=True)
    home = tmp_path / "jupyter"
    write_kernel_spec(home / "kernels" / "kernels" / "python3")   # python3 -> this interpreter
    _settings(home / "settings")
    env = {**os.environ,
           "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_DATA_DIR": str(home / "data"),
           "JUPYTER_RUNTIME_DIR": str(home / "runtime"), "IPYTHONDIR": str(home / "ipython"),
           "JUPYTER_PATH": str(home / "kernels"),
           "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
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
        yield base, token, work, log
    finally:
        _stop(proc, base, token)


def test_pick_a_faulty_artifact_click_inspect_see_its_error(lab):
    from playwright.sync_api import expect, sync_playwright

    base, token, work, log = lab
    t0 = time.perf_counter()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        try:
            page.goto(f"{base}/lab/tree/notebooks/01-inspect.ipynb?token={token}", timeout=120_000)
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
            expect(page.get_by_text("Python 3 (ipykernel) | Idle")).to_be_visible(timeout=120_000)
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()

            picker = page.locator(".mk-inspect .mk-picker select")
            expect(picker).to_be_visible(timeout=180_000)
            options = picker.locator("option").all_inner_texts()
            assert PICK in options and "compressed-no-non-moe" in options
            picker.select_option(label=PICK)
            page.locator(".mk-inspect button.mk-run").click()

            findings = page.locator(".mk-inspect .mk-findings")
            expect(findings.locator("table")).to_contain_text(CODE, timeout=120_000)
            assert "missing-tensors" not in findings.inner_text()   # the default's finding is gone
            expect(page.locator(".mk-inspect .mk-status")).to_contain_text("done")
            assert page.locator(".mk-inspect .mk-error").inner_text().strip() == ""
            summary = page.locator(".mk-inspect .mk-summary").text_content()
            assert PICK in summary and "dylora-moe" in summary

            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.keyboard.press("Escape")
            page.keyboard.press("Control+b")              # hide the file browser: room for the table
            page.locator(".mk-inspect").scroll_into_view_if_needed()
            page.screenshot(path=str(SCREENSHOT))
        except Exception:
            page.screenshot(path=str(log.with_name("failure.png")))
            print(log.read_text()[-4000:])
            raise
        finally:
            browser.close()
    assert SCREENSHOT.stat().st_size > 10_000
    print(f"browser part took {time.perf_counter() - t0:.1f} s")
