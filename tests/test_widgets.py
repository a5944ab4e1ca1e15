"""What a click computes and displays, without a browser: each panel's button is clicked
(``button.click()`` runs the same handler the browser triggers) and its Output areas are
read back. Errors must be shown in the panel, never lost in a callback."""
from __future__ import annotations

import html
from pathlib import Path

import pytest

import modelkit
from modelkit.ui.widgets import ArtifactPicker, ComparePanel, DiffPanel, ExportPanel, InspectPanel, discover, mime_bundle, output_text


@pytest.fixture(scope="module")
def root(catalog):
    return catalog["plain-llama"].parent


def test_discover_lists_every_artifact_under_the_root_and_nothing_else(root, catalog):
    found = discover(root)
    # each catalog artifact is listed once, by the folder a user would point at (a run
    # folder whose best_model/ or checkpoint the format opens, or the artifact itself)
    for name, path in catalog.items():
        holders = [k for k, v in found.items() if path == Path(v) or Path(v) in path.parents]
        assert len(holders) == 1, (name, holders)
    # nothing else, except the demo pair other tests may have written under the same root
    others = {k for k in found if k not in ("pair/base", "pair/lora", "pair/run")}
    assert len(others) == len(catalog)
    assert found["dylora-missing-router"] == str(root / "dylora-missing-router")
    assert found["bad-truncated/model"] == str(catalog["bad-truncated"])
    # a folder a format claims but cannot read is offered: inspecting it says what is wrong
    assert "bad-malformed-config/model" in found
    # a W&B artifact root is one artifact; the checkpoints beside best_model/ are not listed
    assert not any("/checkpoint" in k or k.endswith("best_model") for k in found)


def test_picker_value_is_the_typed_ref_else_the_listed_choice(root, catalog):
    assert ArtifactPicker(root).value is None               # nothing picked until asked
    picker = ArtifactPicker(root, value=root / "dylora-b")
    assert picker.dropdown.value == str(root / "dylora-b") and picker.ref.value == ""
    # a folder that is not listed as such (best_model/ inside a listed run) goes to the ref field
    picker.value = catalog["dylora-b"]
    assert picker.ref.value == str(catalog["dylora-b"]) == picker.value
    picker.value = "wandb:me/proj/model:v3"
    assert picker.value == "wandb:me/proj/model:v3"       # typed refs win over the list
    picker.select("plain-llama")
    assert picker.value == str(catalog["plain-llama"])
    other = ArtifactPicker(value="hf:org/model", root_from=picker)
    assert other.choices == picker.choices and other.value == "hf:org/model"


def test_inspect_click_shows_the_findings_table_with_the_error_code(root):
    panel = InspectPanel(root=root)
    panel.picker.select("dylora-missing-router")
    panel.button.click()
    assert panel.runner.exception is None, panel.runner.error.value
    findings = output_text(panel.findings)
    assert "<table" in findings and "missing-router" in findings and "error" in findings
    assert panel.result.format == "dylora-moe" and "missing-router" in panel.result.codes
    assert "dylora-moe" in output_text(panel.summary)
    assert "<table" in output_text(panel.groups) and "<table" in output_text(panel.tensors)
    assert panel.runner.status.value.startswith("done") and not panel.button.disabled


def test_inspect_error_is_shown_in_the_panel_and_clears_the_old_result(root):
    panel = InspectPanel(root=root)
    panel.picker.select("compressed-no-non-moe")
    panel.run()
    assert "missing-tensors" in output_text(panel.findings)
    panel.picker.select("bad-malformed-config/model")
    panel.button.click()
    assert isinstance(panel.runner.exception, modelkit.errors.ConfigError)
    assert "ConfigError" in panel.runner.error.value and "config.json" in panel.runner.error.value
    assert "Traceback" not in _visible(panel.runner.error.value)   # one line; details collapsed
    assert panel.result is None and panel.findings.outputs == ()
    assert "failed" in panel.runner.status.value and not panel.button.disabled
    panel.picker.value = "hf:nobody/not-in-the-cache"
    panel.run()
    assert "RefNotFoundError" in panel.runner.error.value


def _visible(html_text: str) -> str:
    """What a reader sees without opening the "details" disclosure."""
    import re

    return re.sub(r"<details.*?</details>", "", html_text, flags=re.S)


def test_unexpected_exceptions_are_shown_with_their_traceback(root, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("bug inside inspect")

    monkeypatch.setattr(modelkit, "inspect", broken)
    panel = InspectPanel(root=root, ref=root / "plain-llama")
    panel.button.click()
    error = panel.runner.error.value
    assert "Unexpected RuntimeError: bug inside inspect" in _visible(error)
    assert "bug report" in _visible(error)                    # what to do about it
    assert "Traceback" not in _visible(error) and "Traceback" in error   # behind "details"


def test_export_click_writes_the_folder_and_shows_the_summary(root, tmp_path):
    out = tmp_path / "expert0"
    panel = ExportPanel(root=root, ref=root / "dylora-b", out=out, expert=0, verify=True)
    panel.button.click()                                   # export works in a thread: Cancel stays live
    panel.runner.join()
    assert panel.runner.exception is None, panel.runner.error.value
    summary = output_text(panel.summary)
    assert "exported:" in summary and "verify OK" in summary
    assert (out / "config.json").exists() and panel.result.written
    # one bar per phase, at its end: tensors written (with shard and bytes), then verify's steps
    progress = html.unescape(panel.runner.progress.text())
    assert "write: 21/21 tensors · shard 1/1, 164.6 KB of 164.6 KB" in progress, progress
    assert "verify: 3/3 steps · logits match" in progress
    assert ".partial-" not in progress                    # never the temporary folder's name
    panel.button.click()                                   # out exists, 'replace' is off
    panel.runner.join()
    assert "OutputExistsError" in panel.runner.error.value and panel.summary.outputs == ()
    assert panel.summary.layout.display == "none" and panel.result is None   # no stale summary
    panel.expert.value = "first"
    panel.button.click()
    panel.runner.join()
    assert "expert must be blank, an integer or 'all'" in html.unescape(panel.runner.error.value)


def test_cancel_stops_the_export_and_leaves_nothing(root, tmp_path):
    from modelkit.testing.steps import held_at

    out = tmp_path / "cancelled"
    panel = ExportPanel(root=root, ref=root / "plain-sharded", out=out, verify=True)
    # the export waits at its first 'write' step until Cancel: the click lands mid-write
    # on a machine of any speed (a sleep-timed click missed it on a fast one)
    with held_at("write", until=panel.runner.cancel_event) as writing:
        panel.button.click()
        assert writing.wait(120), panel.runner.error.value
        panel.runner.cancel_button.click()
        panel.runner.join(120)
    assert not panel.runner.running
    assert type(panel.runner.exception).__name__ == "Cancelled"
    assert "cancelled after" in panel.runner.status.value
    assert "✖ Cancelled<" in _visible(panel.runner.error.value) and "Traceback" not in _visible(panel.runner.error.value)
    assert panel.summary.outputs == () and panel.runner.verdict.value == ""
    assert "write: 0/" in html.unescape(panel.runner.progress.text())          # the bar says where it stopped
    assert "— cancelled" in html.unescape(panel.runner.progress.text())
    assert not out.exists() and list(tmp_path.iterdir()) == []            # no OUT, no temporary folder


def test_diff_click_shows_verdict_tables_and_plot(root):
    panel = DiffPanel(root=root, a=root / "original-qwen3-moe", b=root / "compressed-checkpoint-N")
    panel.button.click()
    assert panel.runner.exception is None, panel.runner.error.value
    assert output_text(panel.summary).startswith("DIFFERENT")
    assert "expert" in output_text(panel.by_role) and "<table" in output_text(panel.by_layer)
    assert "image/png" in panel.plot.outputs[0]["data"]
    panel.options_b.value = "expert"
    panel.button.click()
    assert "not KEY=VALUE" in panel.runner.error.value
    # the error stands alone: the previous result's tabs are emptied and hidden
    assert panel.result is None and panel.runner.verdict.value == ""
    assert all(out.outputs == () for out in (panel.summary, panel.by_role, panel.plot, panel.tensor_table))
    assert panel.children[-1].layout.display == "none"


def test_diff_panel_passes_view_options(root):
    panel = DiffPanel(root=root, a=root / "base-gemma", b=root / "dylora-b", options_b={"expert": 1})
    assert panel.options_b.value == "expert=1"
    result = panel.run()
    assert result is not None, panel.runner.error.value
    assert "expert=1" in result.b["label"]


def test_inspect_panel_shows_each_expert_and_a_missing_router(root):
    panel = InspectPanel(root=root, ref=root / "dylora-missing-router", deep=True)
    panel.run()
    text = html.unescape(output_text(panel.experts))
    assert "expert_0" in text and "expert_1" in text and "norm_BA" in text
    assert "MISSING (no trained router in the artifact)" in text
    assert "mk-tree" in output_text(panel.tree) and "lora_B" in output_text(panel.tree)
    panel.deep.value = False
    panel.run()
    text = html.unescape(output_text(panel.experts))
    assert "not checked (deep off)" in text and "norm_BA" not in text
    panel = InspectPanel(root=root, ref=root / "plain-llama")
    panel.run()
    assert "Not a mixture of adapters" in output_text(panel.experts)


def test_fact_fields_are_validated_before_anything_runs(root):
    panel = InspectPanel(root=root, ref=root / "dylora-b")
    for text, line in (("lora_alpha=abc", "lora_alpha='abc' is not a number"),
                       ("alpha=3", "unknown fact alpha=; the facts an artifact may lack are lora_alpha=, lora_r="),
                       ("lora_r=4.5", "FactError: lora_r=4.5 must be a positive int"),
                       ("lora_alpha=9", "FactError: lora_alpha=9 was given, but the artifact records lora_alpha=8")):
        panel.facts.value = text
        assert panel.run() is None and line in html.unescape(panel.runner.error.value), text
    panel.facts.value = "lora_alpha=8"                        # the recorded value: agreed, accepted
    assert panel.run() is not None, panel.runner.error.value
    export = ExportPanel(root=root, ref=root / "compressed-checkpoint-N", out=root / "never-written")
    for text, line in (("dtype=float32", "give dtype in the 'dtype' field"),
                       ("core=bogus", "core='bogus': expected one of ['copies', 'shared']")):
        export.options.value = text
        assert export.run() is None and line in html.unescape(export.runner.error.value), text
    assert not (root / "never-written").exists()


def test_compare_panel_passes_load_options(root):
    panel = ComparePanel(root=root, base=root / "base-gemma", trained=root / "dylora-b", tasks="mk_count",
                         trained_options={"lora_alpha": 3})
    assert panel.options_trained.value == "lora_alpha=3"
    assert panel.run() is None                                 # refused before any model loads
    assert "lora_alpha=3 was given, but the artifact records lora_alpha=8" in html.unescape(panel.runner.error.value)


def test_compare_click_shows_the_table_disagreements_and_plot(root):
    from modelkit.ui.demo_pair import write_demo_pair

    pair = write_demo_pair(root / "pair")
    panel = ComparePanel(root=root, base=pair["base"], trained=pair["trained"], tasks="mk_topic", limit=8)
    assert panel.picker_base.dropdown.label == "pair/base" and panel.picker_trained.dropdown.label == "pair/lora"
    panel.button.click()                                   # compare works in a thread: Cancel stays live
    panel.runner.join()
    assert panel.runner.exception is None, panel.runner.error.value
    assert "mk_topic" in output_text(panel.table) and "<table" in output_text(panel.disagreements)
    dis = panel.result.disagreements()
    for who in ("base", "trained"):                            # the per-sample view, filtered by who is right
        panel.winner.value = who
        text = output_text(panel.disagreement_table)
        n = int((dis.winner == who).sum())
        assert (f"{n} of {n} disagreeing samples" in text) if n else "No disagreement matches" in text
    panel.winner.value = ""
    assert [t for _, t in panel.task_filter.options] == ["", "mk_topic"]
    assert "modelkit compare" in output_text(panel.summary)
    assert "image/png" in panel.plot.outputs[0]["data"]
    panel.tasks.value = " "
    panel.button.click()
    panel.runner.join()
    assert "name at least one task" in panel.runner.error.value and panel.table.outputs == ()
    panel.tasks.value = "no_such_task"
    panel.button.click()
    panel.runner.join()
    assert isinstance(panel.runner.exception, modelkit.ModelkitError), panel.runner.error.value


@pytest.mark.parametrize("where,after,cached", [
    ("lm-eval", 0, 0),        # at the base model's first lm-eval batch: nothing evaluated
    ("evaluate", 2, 1),       # between the two models: the base was evaluated to its end
])
def test_cancel_stops_the_comparison_and_records_nothing_partial(root, tmp_path, monkeypatch, where, after, cached):
    from modelkit.testing.steps import held_at
    from modelkit.ui.demo_pair import write_demo_pair

    monkeypatch.setenv("MODELKIT_CACHE", str(tmp_path / "cache"))       # nothing cached yet
    pair = write_demo_pair(root / "pair")
    panel = ComparePanel(root=root, base=pair["base"], trained=pair["trained"], tasks="mk_topic", limit=8)
    assert "interrupt the kernel" not in panel.runner.status.value
    with held_at(where, until=panel.runner.cancel_event, after=after) as there:
        panel.button.click()
        assert there.wait(120), panel.runner.error.value
        assert panel.runner.cancel_button.layout.display != "none"         # the user sees a Cancel
        panel.runner.cancel_button.click()
        panel.runner.join(120)
    assert not panel.runner.running and type(panel.runner.exception).__name__ == "Cancelled"
    assert "cancelled after" in panel.runner.status.value
    visible = _visible(panel.runner.error.value)
    assert "✖ Cancelled" in visible and "Traceback" not in visible and "No result was recorded" in visible
    assert panel.result is None and panel.runner.verdict.value == "" and panel.table.outputs == ()
    assert f"{where}: " in html.unescape(panel.runner.progress.text())
    assert "cancelled" in html.unescape(panel.runner.progress.text())    # the bar says where it stopped
    entries = list((tmp_path / "cache").glob("compare/*.json"))
    assert len(entries) == cached, entries                               # no evaluation cut short was cached


def test_mime_bundle_renders_tables_and_figures():
    import pandas as pd
    from matplotlib.figure import Figure

    assert "<table" in mime_bundle(pd.DataFrame({"code": ["x"]}))["data"]["text/html"]
    fig = Figure()
    fig.subplots().plot([0, 1])
    assert mime_bundle(fig)["data"]["image/png"]


def test_a_cancel_between_two_steps_is_shown_on_the_last_bar():
    # a Cancel that lands after one phase completed and before the next began: no phase
    # was stopped midway, yet the bars must not read as a finished run
    from modelkit.errors import Cancelled
    from modelkit.progress import phase, reporting
    from modelkit.ui.widgets._base import PhaseBars

    bars = PhaseBars()
    with reporting(bars):
        with phase("write", total=3, unit="tensors") as bar:
            bar.update(3)
    bars.stopped("cancelled")
    assert bars.text().endswith("write: 3/3 tensors — cancelled after this step</span>"), bars.text()

    bars.clear()                                     # stopped midway: said once, by the phase itself
    with pytest.raises(Cancelled), reporting(bars):
        with phase("verify", total=3, unit="steps"):
            raise Cancelled("cancelled by the user")
    bars.stopped("cancelled")
    assert bars.text().count("cancelled") == 1 and "verify: 0/3 steps — cancelled" in bars.text()
