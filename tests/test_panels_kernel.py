"""Every panel in a LIVE ipykernel, success and error paths, as a researcher meets it.

A small driver notebook is executed by nbclient (the machinery JupyterLab and papermill
use): each cell builds a panel, clicks it and prints what it shows. In a kernel,
``ipywidgets.Output`` behaves differently from a plain process (its ``__exit__`` prints a
traceback and swallows the exception), so only here can "one clean line, no traceback"
be checked. Asserted on the saved widget state (what the browser would render: every
Output widget's outputs and the HTML widgets' values) and on the cells' own outputs.
"""
from __future__ import annotations

import html
import json
import re

import nbformat
import pytest

pytestmark = pytest.mark.slow

DRIVER = '''
import json
from modelkit.ui.widgets import output_text

def shown(panel):
    """What the panel shows, by area, plus its verdict and error lines."""
    r = panel.runner
    return {"exception": type(r.exception).__name__ if r.exception else None,
            "status": r.status.value, "verdict": r.verdict.value, "error": r.error.value,
            "log": r.library_log.value, "text": output_text(panel), "progress": r.progress.text(),
            "results_hidden": r.results is not None and r.results.layout.display == "none",
            "extra": globals().pop("EXTRA", None)}
'''


def _visible(html_text: str) -> str:
    """What a reader sees before opening any "details" disclosure, tags stripped."""
    text = re.sub(r"<details.*?</details>", "", html_text, flags=re.DOTALL)
    return html.unescape(re.sub(r"<[^>]+>", "", text)).strip()


CASES = {
    "inspect-ok": ("from modelkit.ui.widgets import InspectPanel\n"
                   "p = InspectPanel(root=ROOT, ref=ROOT + '/dylora-missing-router', deep=True); p.run()"),
    "inspect-bad-config": ("p = InspectPanel(root=ROOT, ref=ROOT + '/bad-malformed-config/model'); p.run()"),
    "inspect-typo": "p = InspectPanel(root=ROOT, ref=ROOT + '/plain-lama'); p.run()",
    "inspect-wandb": "p = InspectPanel(root=ROOT, ref='wandb:me/proj/model:v1'); p.run()",
    "export-ok": ("from modelkit.ui.widgets import ExportPanel\n"
                  "p = ExportPanel(root=ROOT, ref=ROOT + '/plain-llama', out=OUT + '/plain', verify=True); p.run()"),
    "export-untrained": ("p = ExportPanel(root=ROOT, ref=ROOT + '/peft-lora-untrained', out=OUT + '/untrained');"
                         " p.run()"),
    # a click starts the export in a thread; the kernel is free, the Cancel click lands.
    # The export waits at its first 'write' step until the Cancel (held_at), so the Cancel
    # lands mid-write on a machine of any speed (a sleep-timed one missed it on a fast one)
    "export-cancel": ("import os\n"
                      "from modelkit.testing.steps import held_at\n"
                      "p = ExportPanel(root=ROOT, ref=ROOT + '/plain-sharded', out=OUT + '/cancelled', verify=True)\n"
                      "with held_at('write', until=p.runner.cancel_event) as writing:\n"
                      "    p.button.click()\n"
                      "    EXTRA = {'reached': writing.wait(120)}\n"
                      "    p.runner.cancel_button.click(); p.runner.join(120)\n"
                      "EXTRA.update(out=os.path.exists(OUT + '/cancelled'),"
                      " left=sorted(n for n in os.listdir(OUT) if 'cancelled' in n))"),
    # an error after a success: the previous result's tabs are emptied and hidden
    "inspect-error-after-ok": ("p = InspectPanel(root=ROOT, ref=ROOT + '/plain-llama'); p.run()\n"
                               "EXTRA = {'shown_before': 'model.embed_tokens' in output_text(p.children[-1])}\n"
                               "p.picker.ref.value = ROOT + '/plain-lama'; p.run()"),
    "diff-ok": ("from modelkit.ui.widgets import DiffPanel\n"
                "p = DiffPanel(root=ROOT, a=ROOT + '/original-qwen3-moe', b=ROOT + '/compressed-checkpoint-N');"
                " p.run()"),
    "diff-bad-option": ("p = DiffPanel(root=ROOT, a=ROOT + '/base-gemma', b=ROOT + '/dylora-b');"
                        " p.options_b.value = 'expert'; p.run()"),
    "inspect-facts-bad": ("p = InspectPanel(root=ROOT, ref=ROOT + '/dylora-early-checkpoint/checkpoint-100');"
                          " p.facts.value = 'lora_alpha=-2'; p.run()"),
    "diff-mixture": ("p = DiffPanel(root=ROOT, a=ROOT + '/base-gemma-tied',"
                     " b=ROOT + '/dylora-early-checkpoint/checkpoint-100', options_b={'lora_alpha': 8}); p.run()"),
    "diff-fact-missing": ("p = DiffPanel(root=ROOT, a=ROOT + '/base-gemma-tied',"
                          " b=ROOT + '/dylora-early-checkpoint/checkpoint-100'); p.run()"),
    "export-facts": ("p = ExportPanel(root=ROOT, ref=ROOT + '/dylora-early-checkpoint/checkpoint-100',"
                     " out=OUT + '/early', base=ROOT + '/base-gemma-tied', expert=1, verify=True);"
                     " p.options.value = 'lora_alpha=8'; p.run()"),
    "compare-ok": ("from modelkit.ui.widgets import ComparePanel\n"
                   "p = ComparePanel(root=ROOT, base=PAIR + '/base', trained=PAIR + '/lora', tasks='mk_topic',"
                   " limit=8); p.run()"),
    # Cancel mid-evaluation: held at the base model's first lm-eval batch (own cache: the
    # compare-ok results of the same pair must not make the evaluation unnecessary)
    "compare-cancel": ("import os\n"
                       "from modelkit.testing.steps import held_at\n"
                       "saved, os.environ['MODELKIT_CACHE'] = os.environ['MODELKIT_CACHE'], OUT + '/compare-cache'\n"
                       "p = ComparePanel(root=ROOT, base=PAIR + '/base', trained=PAIR + '/lora', tasks='mk_topic',"
                       " limit=8)\n"
                       "with held_at('lm-eval', until=p.runner.cancel_event) as there:\n"
                       "    p.button.click()\n"
                       "    EXTRA = {'reached': there.wait(120)}\n"
                       "    p.runner.cancel_button.click(); p.runner.join(120)\n"
                       "os.environ['MODELKIT_CACHE'] = saved\n"
                       "EXTRA['cached'] = sorted(os.listdir(OUT + '/compare-cache/compare'))"
                       " if os.path.isdir(OUT + '/compare-cache/compare') else []"),
    # an export works in its thread (held at its first write step) while the next cell runs
    "export-held": ("import logging, threading\n"
                    "release = threading.Event()\n"
                    "hold = held_at('write', until=release)\n"
                    "writing = hold.__enter__()\n"
                    "p = ExportPanel(root=ROOT, ref=ROOT + '/plain-llama', out=OUT + '/during-a-cell', verify=False)\n"
                    "p.button.click()\n"
                    "EXTRA = {'reached': writing.wait(120)}"),
    "cell-during-export": ("print('printed by a cell during the export')\n"
                           "logging.getLogger('some.library').warning('logged by a library in that cell')\n"
                           "release.set(); p.runner.join(120); hold.__exit__(None, None, None)"),
    "compare-unknown-task": ("p = ComparePanel(root=ROOT, base=PAIR + '/base', trained=PAIR + '/lora',"
                             " tasks='mk_topc', limit=8); p.run()"),
}


@pytest.fixture(scope="module")
def executed(catalog, tmp_path_factory):
    """The driver notebook, executed once in a real kernel; ``{case: (cell, shown)}``."""
    from ipykernel.kernelspec import write_kernel_spec
    from nbclient import NotebookClient

    from modelkit.ui.demo_pair import write_demo_pair

    root = catalog["plain-llama"].parent
    pair = write_demo_pair(root / "pair")["base"].parent
    work = tmp_path_factory.mktemp("kernel-driver")
    spec = tmp_path_factory.mktemp("jupyter-path")
    write_kernel_spec(spec / "kernels" / "python3")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(spec))
        mp.delenv("WANDB_API_KEY", raising=False)      # a user who never ran `wandb login`,
        mp.delenv("WANDB_MODE", raising=False)         # not offline: wandb itself would prompt
        mp.setenv("NETRC", str(work / "no-netrc"))
        nb = nbformat.v4.new_notebook()
        nb.cells.append(nbformat.v4.new_code_cell(
            DRIVER + f"ROOT, PAIR, OUT = {str(root)!r}, {str(pair)!r}, {str(work)!r}"))
        for name, code in CASES.items():
            nb.cells.append(nbformat.v4.new_code_cell(code + "\nprint('@@' + json.dumps(shown(p)))",
                                                      metadata={"case": name}))
        client = NotebookClient(nb, kernel_name="python3", timeout=600, allow_errors=True,
                                resources={"metadata": {"path": str(work)}})
        client.execute()
    results = {}
    for cell in nb.cells[1:]:
        text = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
        found = [json.loads(line[2:]) for line in text.splitlines() if line.startswith("@@")]
        results[cell.metadata["case"]] = (cell, found[0] if found else None)
    state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    return results, state


def _assert_clean_cell(cell, name):
    """The cell itself shows nothing but the driver's line: no traceback, no stderr noise."""
    assert not [o for o in cell.outputs if o.output_type == "error"], (name, cell.outputs)
    stdout = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")
    other = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name != "stdout")
    other += json.dumps([o.get("data", {}) for o in cell.outputs if o.output_type != "stream"])
    stray = "".join(line for line in stdout.splitlines(True) if not line.startswith("@@"))
    assert not stray.strip() and other == "[]", (name, (stray + other)[:3000])


def _ok(executed, name, label):
    results, _ = executed
    cell, shown = results[name]
    _assert_clean_cell(cell, name)
    assert shown is not None and shown["exception"] is None, (name, shown)
    assert shown["status"].startswith("done") and shown["error"] == ""
    assert f">{label}</b>" in shown["verdict"], shown["verdict"]     # the verdict line comes first
    return shown


def _failed(executed, name, line):
    results, _ = executed
    cell, shown = results[name]
    _assert_clean_cell(cell, name)
    assert shown is not None and shown["exception"], (name, shown)
    visible = _visible(shown["error"])
    assert line in visible, visible
    assert "Traceback" not in visible and "UnboundLocalError" not in visible
    assert len(visible.splitlines()) <= 3, visible                 # the line and what to do
    assert shown["verdict"] == "" and "<table" not in shown["text"]
    return visible


def test_every_output_widget_is_free_of_tracebacks(executed):
    _, state = executed
    outputs = [m["state"] for m in state.values() if m["model_name"] == "OutputModel"]
    assert outputs, "widget state was saved"
    for m in outputs:
        text = json.dumps(m["state"].get("outputs", []) if "state" in m else m.get("outputs", []))
        assert "Traceback" not in text and '"output_type": "error"' not in text, text[:2000]


def test_inspect_panel_in_a_kernel(executed):
    shown = _ok(executed, "inspect-ok", "ERRORS")
    assert "missing-router" in shown["verdict"]
    text = shown["text"]
    assert "router" in text and "MISSING" in text           # the per-expert table's router row
    assert " KB" in text and "no findings" not in text
    assert "bytes" not in _visible(shown["log"])             # libraries' noise, if any, is collapsed
    visible = _failed(executed, "inspect-bad-config", "ConfigError")
    assert "config" in visible
    assert "RefNotFoundError" in _failed(executed, "inspect-typo", "RefNotFoundError")


def test_a_wandb_ref_never_prompts_and_says_what_is_missing(executed):
    visible = _failed(executed, "inspect-wandb", "wandb")
    assert "KeyboardInterrupt" not in visible and "Cancelled" not in visible
    assert "no W&B API key" in visible and "WANDB_API_KEY" in visible, visible


def test_export_panel_in_a_kernel(executed):
    shown = _ok(executed, "export-ok", "EXPORTED")
    assert "verified" in shown["verdict"]
    visible = _failed(executed, "export-untrained", "untrained")
    assert "allow untrained" in visible                      # the control that lets it through


def test_diff_panel_in_a_kernel(executed):
    shown = _ok(executed, "diff-ok", "DIFFERENT")
    assert "rel_change" in shown["text"]
    _failed(executed, "diff-bad-option", "not KEY=VALUE")


def test_facts_the_artifact_lacks_are_fields_with_a_one_line_error(executed):
    visible = _failed(executed, "inspect-facts-bad", "FactError: lora_alpha=-2 must be a positive")
    assert "facts / options field" in visible                          # what to do about it
    visible = _failed(executed, "diff-fact-missing", "lora_alpha is recorded nowhere")
    assert "lora_alpha=16" in visible
    shown = _ok(executed, "export-facts", "EXPORTED")
    assert "verified" in shown["verdict"]


def test_diff_panel_of_a_mixture_shows_one_row_per_expert_in_a_kernel(executed):
    shown = _ok(executed, "diff-mixture", "DIFFERENT")
    assert "2 of 2 experts differ" in shown["verdict"]
    text = _visible(shown["text"])
    assert "expert_0" in text and "expert_1" in text and "router.gate.weight" in text


def test_compare_panel_in_a_kernel(executed):
    shown = _ok(executed, "compare-ok", "BETTER")
    text = shown["text"]
    assert "mk_topic" in text and "|Model|Task|Metric|" in text        # table and its Markdown form
    assert "e-01" not in text                                          # scores as 0.xxx, not 3e-01
    _failed(executed, "compare-unknown-task", "mk_topc")


def _cancelled(executed, case: str, hint: str) -> tuple[dict, str]:
    """A cancelled run's panel: a clean cell, status "cancelled after", the one-line
    Cancelled error with its hint and no traceback; returns what was shown and the bars' text."""
    results, _ = executed
    cell, shown = results[case]
    _assert_clean_cell(cell, case)
    assert shown["exception"] == "Cancelled" and "cancelled after" in shown["status"], shown["status"]
    visible = _visible(shown["error"])
    assert visible.startswith("✖ Cancelled") and "Traceback" not in visible and hint in visible
    return shown, html.unescape(shown["progress"])


def test_cancel_in_a_kernel_stops_the_export_and_leaves_nothing(executed):
    shown, progress = _cancelled(executed, "export-cancel", "Nothing was kept")
    assert "write: 0/" in progress and "— cancelled" in progress     # the bar says where it stopped
    assert shown["verdict"] == "" and shown["results_hidden"]
    assert shown["extra"] == {"reached": True, "out": False, "left": []}   # no OUT, no temporary folder


def test_an_error_clears_the_previous_results_in_a_kernel(executed):
    results, _ = executed
    cell, shown = results["inspect-error-after-ok"]
    _assert_clean_cell(cell, "inspect-error-after-ok")
    assert shown["extra"] == {"shown_before": True}
    assert shown["exception"] == "RefNotFoundError" and shown["results_hidden"]
    assert "model.embed_tokens" not in shown["text"] and "<table" not in shown["text"] and shown["verdict"] == ""


def test_cancel_in_a_kernel_stops_the_comparison_and_records_nothing(executed):
    shown, progress = _cancelled(executed, "compare-cancel", "No result was recorded")
    assert "lm-eval: " in progress and "— cancelled" in progress      # stopped between two lm-eval batches
    assert shown["verdict"] == "" and shown["results_hidden"] and "<table" not in shown["text"]
    assert shown["extra"] == {"reached": True, "cached": []}          # nothing cut short was cached


def test_a_cell_run_during_an_export_prints_to_its_own_cell(executed):
    results, _ = executed
    assert results["export-held"][1]["extra"] == {"reached": True}    # the export was running meanwhile
    cell, shown = results["cell-during-export"]
    streams = {name: "".join(o.get("text", "") for o in cell.outputs if o.get("name") == name)
               for name in ("stdout", "stderr")}
    assert "printed by a cell during the export" in streams["stdout"]
    assert "logged by a library in that cell" in streams["stderr"]
    assert shown["exception"] is None and shown["status"].startswith("done"), shown   # the export went on
    assert "by a cell" not in shown["log"] and "in that cell" not in shown["log"]      # not in its log
