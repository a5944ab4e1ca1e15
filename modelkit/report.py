"""Batch runs of the notebooks: papermill executes a notebook with parameters into an
output folder (the executed ``.ipynb``, widget state saved, plus an HTML rendering).

The notebook runs in its own folder, as in JupyterLab. String parameters that name an
existing path relative to the current directory are made absolute first, so
``modelkit report notebooks/01-inspect.ipynb -p artifact demo/plain-llama`` means the
``demo/plain-llama`` you see from where you typed it. The notebook also receives
``output_dir`` (absolute) so it writes its files next to the report.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from .errors import ModelkitError

CHECK_OUTPUT = "# NBVAL_CHECK_OUTPUT"


class NotebookError(ModelkitError):
    """A notebook cell failed; the executed notebook (with the error) and its HTML are kept."""


def run_notebook(notebook: str | Path, parameters: Mapping[str, Any] | None = None,
                 output_dir: str | Path = "reports", kernel: str = "python3", *,
                 name: str | None = None, html: bool = True,
                 start_timeout: int = 120) -> list[Path]:
    """Execute ``notebook`` with papermill into ``output_dir``; returns the written paths
    (``NAME.ipynb`` and, with ``html``, ``NAME.html``; NAME defaults to the notebook's).

    Raises NotebookError when a cell fails (the failed run is still written, to read).
    """
    import papermill

    notebook = Path(notebook).expanduser().absolute()
    if not notebook.is_file():
        raise NotebookError("no such notebook", notebook)
    out_dir = Path(output_dir).expanduser().absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    params = {k: _absolute(v) for k, v in (parameters or {}).items()}
    params.setdefault("output_dir", str(out_dir))
    executed = out_dir / f"{name or notebook.stem}.ipynb"
    failure = None
    try:
        papermill.execute_notebook(str(notebook), str(executed), parameters=params,
                                   kernel_name=kernel, cwd=str(notebook.parent),
                                   progress_bar=False, start_timeout=start_timeout)
    except papermill.PapermillExecutionError as e:
        failure = e
    paths = [executed]
    if html and executed.exists():
        paths.append(to_html(executed))
    if failure is not None:
        raise NotebookError(f"cell {failure.exec_count} failed with {failure.ename}: {failure.evalue} "
                            f"(see {paths[-1]})", notebook)
    return paths


def to_html(executed: str | Path) -> Path:
    """Render an executed notebook to HTML beside it (widgets from their saved state)."""
    import nbformat
    from nbconvert import HTMLExporter

    executed = Path(executed)
    body, _ = HTMLExporter().from_notebook_node(nbformat.read(executed, as_version=4))
    out = executed.with_suffix(".html")
    out.write_text(body, encoding="utf-8")
    return out


def strip_volatile(notebook: str | Path, write: bool = True) -> Any:
    """Clear what changes from run to run: outputs and execution counts, widget state and
    papermill metadata. Cells marked ``# NBVAL_CHECK_OUTPUT`` keep their (stable) outputs,
    which nbval compares, and the execution count of a top-to-bottom run, without which
    nbval treats them as never run. Returns the notebook node; writes it back when ``write``."""
    import nbformat

    nb = nbformat.read(notebook, as_version=4)
    nb.metadata.pop("widgets", None)
    nb.metadata.pop("papermill", None)
    count = 0
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
        if cell.cell_type != "code":
            continue
        count += 1
        if CHECK_OUTPUT in cell.source and cell.outputs:
            cell.execution_count = count
            for out in cell.outputs:
                if out.get("output_type") == "execute_result":
                    out["execution_count"] = count
        else:
            cell.execution_count = None
            cell.outputs = []
    if write:
        nbformat.write(nb, notebook)
    return nb


def _absolute(value: Any) -> Any:
    if isinstance(value, str) and value and not value.startswith(("wandb:", "hf:")):
        p = Path(value).expanduser()
        if not p.is_absolute() and p.exists():
            return str(p.absolute())
    return value
