"""ipywidgets views over the public API, for JupyterLab.

Each panel is a thin view: controls -> one call of a top-level function
(``modelkit.inspect`` / ``export`` / ``diff`` / ``compare``) -> its tables, text and plot
in ``Output`` areas. A click runs ``panel.run()``; the last result is ``panel.result``;
errors are shown in the panel (``panel.runner.error``) and kept in ``panel.runner.exception``.
"""
from modelkit.ui.widgets._base import RunButton, mime_bundle, output_text, show
from modelkit.ui.widgets.compare_panel import ComparePanel
from modelkit.ui.widgets.diff_panel import DiffPanel
from modelkit.ui.widgets.export_panel import ExportPanel
from modelkit.ui.widgets.inspect_panel import InspectPanel
from modelkit.ui.widgets.picker import ArtifactPicker, discover, is_artifact
from modelkit.ui.widgets.watch_panel import RunFolderPicker, WatchPanel, discover_runs

__all__ = ["ArtifactPicker", "ComparePanel", "DiffPanel", "ExportPanel", "InspectPanel", "RunButton",
           "RunFolderPicker", "WatchPanel", "discover", "discover_runs", "is_artifact", "mime_bundle", "output_text",
           "show"]
