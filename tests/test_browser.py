"""A real browser over a real JupyterLab: open 01-inspect.ipynb, run all cells, pick a
faulty demo artifact in the widget, click Inspect, and see its verdict and error code; a
typo'd path gives one clean error line. One error path each for the export, diff and
compare panels, and the HTML report opened offline. Nothing may leave 127.0.0.1 (every
other request is blocked and recorded). Screenshots go to a temp folder;
``make screenshots`` writes them to reports/screenshots/ (the README shows inspect.png).

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


PANELS = [  # one cell per panel (what a user builds in a cell)
    "from modelkit.testing.steps import held_at\n"
    "from modelkit.ui.widgets import ComparePanel, DiffPanel, ExportPanel",
    'export = ExportPanel(root="../demo", ref="../demo/peft-lora-untrained", out="../exports/untrained", verify=False)\n'
    "held_at('verify', until=export.runner.cancel_event).__enter__()   # the test's Cancel lands mid-verify\n"
    "export",
    'DiffPanel(root="../demo", a="../demo/original-qwen3-moe", b="../demo/compressed-checkpoint-N")',
    'ComparePanel(root="../demo", base="../demo/pair/base", trained="../demo/pair/lora", tasks="mk_topc", limit=4)',
]


def _panels_notebook(path: Path) -> None:
    """A notebook with one cell per remaining panel."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(cell) for cell in PANELS]
    nbformat.write(nb, path)


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    """Where screenshots go: a temp folder (``make screenshots`` points it at reports/screenshots)."""
    folder = Path(os.environ.get("MODELKIT_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def lab(catalog, tmp_path_factory):
    """A running JupyterLab over a copy of notebooks/ beside the demo artifacts; yields its URL and token."""
    from ipykernel.kernelspec import write_kernel_spec

    from modelkit.ui.demo_pair import write_demo_pair

    tmp_path = tmp_path_factory.mktemp("lab")
    write_demo_pair(catalog["plain-llama"].parent / "pair")
    work = tmp_path / "work"
    (work / "notebooks").mkdir(parents=True)
    shutil.copy(ROOT / "notebooks" / "01-inspect.ipynb", work / "notebooks")
    _panels_notebook(work / "notebooks" / "panels.ipynb")
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


class Offline:
    """Every request the page makes that is not local (127.0.0.1, file:, data:, blob:) is
    blocked and remembered: the test asserts there were none."""

    def __init__(self, page, allowed: str):
        self.blocked: list[str] = []
        self.allowed = allowed
        page.route("**/*", self._route)

    def _route(self, route) -> None:
        url = route.request.url
        if url.startswith((self.allowed, "file://", "data:", "blob:")):
            route.continue_()
        else:
            self.blocked.append(url)
            route.abort()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def _open_notebook(browser, lab, name: str, ready: str):
    from playwright.sync_api import expect

    base, token, work, log = lab
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    offline = Offline(page, base)
    page.goto(f"{base}/lab/tree/notebooks/{name}?token={token}", timeout=120_000)
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
    expect(page.get_by_text("Python 3 (ipykernel) | Idle")).to_be_visible(timeout=120_000)
    for attempt in range(3):   # a click that lands before the kernel is ready runs nothing: retry
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
        try:
            expect(page.locator(ready)).to_be_visible(timeout=120_000 if attempt < 2 else 180_000)
            break
        except AssertionError:
            if attempt == 2:
                raise
    return page, offline


def _shoot(page, panel: str, path: Path) -> None:
    page.keyboard.press("Escape")
    page.locator(panel).first.scroll_into_view_if_needed()
    page.screenshot(path=str(path))
    assert path.stat().st_size > 10_000


def _assert_one_line_error(page, panel: str, line: str) -> None:
    """The panel shows the error's line and what to do; the traceback stays folded away."""
    from playwright.sync_api import expect

    error = page.locator(f"{panel} .mk-error")
    expect(error.locator(".mk-error-line")).to_contain_text(line, timeout=180_000)
    visible = error.inner_text()
    assert len(error.locator(".mk-error-line").inner_text()) < 260
    assert "Traceback" not in visible and "UnboundLocalError" not in visible, visible
    assert error.locator("details").evaluate("d => d.open") is False
    assert page.locator(f"{panel} .mk-verdict-area").inner_text().strip() == ""
    expect(page.locator(f"{panel} .mk-status")).to_contain_text("failed")
    # nothing of it leaked into the notebook's own output as a traceback
    cell = page.locator(f".jp-Cell:has({panel})")
    assert cell.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']").count() == 0


def test_pick_a_faulty_artifact_click_inspect_see_its_error(lab, browser, shots):
    from playwright.sync_api import expect

    t0 = time.perf_counter()
    page, offline = _open_notebook(browser, lab, "01-inspect.ipynb", ".mk-inspect .mk-picker select")
    try:
        picker = page.locator(".mk-inspect .mk-picker select")
        expect(picker).to_be_visible(timeout=180_000)
        options = picker.locator("option").all_inner_texts()
        assert PICK in options and "compressed-no-non-moe" in options
        picker.select_option(label=PICK)
        page.locator(".mk-inspect button.mk-run").click()

        verdict = page.locator(".mk-inspect .mk-verdict-area")
        expect(verdict).to_contain_text("ERRORS", timeout=120_000)     # the verdict comes first
        assert CODE in verdict.inner_text()
        findings = page.locator(".mk-inspect .mk-findings")
        expect(findings.locator("table")).to_contain_text(CODE, timeout=60_000)
        assert "missing-tensors" not in findings.inner_text()   # the default's finding is gone
        expect(page.locator(".mk-inspect .mk-status")).to_contain_text("done")
        assert page.locator(".mk-inspect .mk-error").inner_text().strip() == ""
        summary = page.locator(".mk-inspect .mk-summary").text_content()
        assert PICK in summary and "dylora-moe" in summary
        page.keyboard.press("Escape")
        page.keyboard.press("Control+b")              # hide the file browser: room for the table
        _shoot(page, ".mk-inspect", shots / "inspect.png")

        # the experts tab: the router row says MISSING
        page.locator(".mk-inspect .lm-TabBar-tab", has_text="experts").click()
        expect(page.locator(".mk-inspect .mk-experts")).to_contain_text("MISSING")
        _shoot(page, ".mk-inspect", shots / "inspect-experts.png")

        # the parameter tree: per-dtype totals above it, nodes with their totals
        page.locator(".mk-inspect .lm-TabBar-tab", has_text="tree").click()
        expect(page.locator(".mk-inspect .mk-tree-area")).to_contain_text("tensors · ")
        _shoot(page, ".mk-inspect", shots / "inspect-tree.png")

        # error path: a typo'd path
        ref = page.locator(".mk-inspect .mk-ref input")
        ref.fill("../demo/plain-lama")
        ref.press("Enter")
        page.locator(".mk-inspect button.mk-run").click()
        _assert_one_line_error(page, ".mk-inspect", "RefNotFoundError")
        _shoot(page, ".mk-inspect", shots / "inspect-error.png")
        assert offline.blocked == [], offline.blocked
    except Exception:
        page.screenshot(path=str(shots / "failure-inspect.png"))
        print(lab[3].read_text()[-4000:])
        raise
    finally:
        page.close()
    print(f"browser part took {time.perf_counter() - t0:.1f} s")


def test_export_diff_compare_panels_show_their_verdict_or_one_line_error(lab, browser, shots):
    from playwright.sync_api import expect

    page, offline = _open_notebook(browser, lab, "panels.ipynb", ".mk-compare button.mk-run")
    try:
        expect(page.locator(".mk-compare button.mk-run")).to_be_visible(timeout=180_000)
        page.keyboard.press("Control+b")
        # export: an untrained adapter is refused, with the control that lets it through named
        page.locator(".mk-export button.mk-run").click()
        _assert_one_line_error(page, ".mk-export", "untrained-adapter")
        assert "allow untrained" in page.locator(".mk-export .mk-error").inner_text()
        _shoot(page, ".mk-export", shots / "export-error.png")
        # ...ticked, it exports: verdict first, one finished bar per phase
        page.locator(".mk-export .widget-checkbox", has_text="allow untrained").locator("input").check()
        page.locator(".mk-export button.mk-run").click()
        expect(page.locator(".mk-export .mk-verdict-area")).to_contain_text("EXPORTED", timeout=180_000)
        expect(page.locator(".mk-export .mk-status")).to_contain_text("done")
        expect(page.locator(".mk-export .mk-progress")).to_contain_text("write: ")
        assert page.locator(".mk-export .mk-error").inner_text().strip() == ""
        _shoot(page, ".mk-export", shots / "export.png")
        # again, verified, over the first: Cancel while it verifies (the cell holds the
        # export at its first verify step until the Cancel); the first export stays
        page.locator(".mk-export .widget-checkbox", has_text="verify logits").locator("input").check()
        page.locator(".mk-export .widget-checkbox", has_text="replace").locator("input").check()
        page.locator(".mk-export button.mk-run").click()
        cancel = page.locator(".mk-export button.mk-cancel")
        expect(cancel).to_be_visible(timeout=60_000)
        expect(page.locator(".mk-export .mk-progress")).to_contain_text("verify", timeout=180_000)
        cancel.click()
        expect(page.locator(".mk-export .mk-status")).to_contain_text("cancelled after", timeout=120_000)
        error = page.locator(".mk-export .mk-error")
        expect(error.locator(".mk-error-line")).to_contain_text("Cancelled")
        assert "Traceback" not in error.inner_text() and "Nothing was kept" in error.inner_text()
        expect(page.locator(".mk-export .mk-progress")).to_contain_text("cancelled")
        assert page.locator(".mk-export .mk-verdict-area").inner_text().strip() == ""
        assert (lab[2] / "exports" / "untrained" / "config.json").is_file()    # the first export is intact
        _shoot(page, ".mk-export", shots / "export-cancelled.png")
        # diff: success (verdict first), then a malformed view option
        page.locator(".mk-diff button.mk-run").click()
        expect(page.locator(".mk-diff .mk-verdict-area")).to_contain_text("DIFFERENT", timeout=180_000)
        page.locator(".mk-diff .lm-TabBar-tab", has_text="tensors").click()
        expect(page.locator(".mk-diff .mk-tensors table")).to_contain_text("rel_change")
        _shoot(page, ".mk-diff", shots / "diff.png")
        options = page.locator(".mk-diff .mk-options input").nth(1)        # options B
        options.fill("expert")
        options.press("Enter")
        page.locator(".mk-diff button.mk-run").click()
        _assert_one_line_error(page, ".mk-diff", "not KEY=VALUE")
        # compare: a typo'd task name
        page.locator(".mk-compare button.mk-run").click()
        _assert_one_line_error(page, ".mk-compare", "mk_topc")
        _shoot(page, ".mk-compare", shots / "compare-error.png")
        assert offline.blocked == [], offline.blocked
    except Exception:
        page.screenshot(path=str(shots / "failure-panels.png"))
        print(lab[3].read_text()[-4000:])
        raise
    finally:
        page.close()


def test_the_html_report_opens_offline_and_reads_as_a_report(catalog, browser, shots, tmp_path, monkeypatch):
    from ipykernel.kernelspec import write_kernel_spec
    from playwright.sync_api import expect

    from modelkit.ui.notebooks import run_notebook

    write_kernel_spec(tmp_path / "kernels" / "kernels" / "python3")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "kernels"))
    monkeypatch.chdir(catalog["plain-llama"].parent)
    paths = run_notebook(ROOT / "notebooks" / "01-inspect.ipynb", {"artifact": PICK, "root": "."},
                         tmp_path / "report")
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    offline = Offline(page, "file://")
    try:
        page.goto(paths[1].as_uri())
        assert page.title() == f"Inspect an artifact — {PICK}"
        verdict = page.locator(".mk-verdict").first
        expect(verdict).to_contain_text("ERRORS")
        assert verdict.bounding_box()["y"] < 600                  # near the top: verdict first
        expect(page.locator("table").first).to_contain_text(CODE)
        assert page.get_by_text("import modelkit").count() == 0   # code hidden
        page.screenshot(path=str(shots / "report.png"), full_page=True)
        assert offline.blocked == [], offline.blocked
    finally:
        page.close()
