"""Batch runs of the notebooks: papermill executes a notebook with parameters into an
output folder (the executed ``.ipynb``, widget state saved, plus a shareable HTML report:
titled, code hidden, widgets rendered statically so it opens offline). A notebook
:func:`record` s its result and verdict; ``modelkit report`` exits with the verdict's
code, and over many artifacts (:func:`run_batch`) writes one folder each plus an index.

The notebook runs in its own folder, as in JupyterLab. String parameters that name an
existing path relative to the current directory are made absolute first, so
``modelkit report notebooks/01-inspect.ipynb -p artifact demo/plain-llama`` means the
``demo/plain-llama`` you see from where you typed it. The notebook also receives
``output_dir`` (absolute) so it writes its files next to the report.
"""
from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from modelkit.errors import ModelkitError

CHECK_OUTPUT = "# NBVAL_CHECK_OUTPUT"


class NotebookError(ModelkitError):
    """A notebook cell failed; the executed notebook (with the error) and its HTML are kept."""


INTERACTIVE = "interactive"      # cell tag: for a live kernel only, left out of HTML reports
TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{% block jupyter_widgets %}{% endblock jupyter_widgets %}
"""


def run_notebook(notebook: str | Path, parameters: Mapping[str, Any] | None = None,
                 output_dir: str | Path = "reports", kernel: str = "python3", *,
                 name: str | None = None, html: bool = True, title: str | None = None,
                 start_timeout: int = 120) -> list[Path]:
    """Execute ``notebook`` with papermill into ``output_dir``; returns the written paths
    (``NAME.ipynb`` and, with ``html``, ``NAME.html``; NAME defaults to the notebook's).

    Raises NotebookError when a cell fails (the failed run is still written, to read).
    """
    import papermill

    from jupyter_client.kernelspec import NoSuchKernel
    from nbclient.exceptions import DeadKernelError

    notebook = Path(notebook).expanduser().absolute()
    language = None if notebook_language(notebook) else "python"  # as JupyterLab assumes
    declared = check_parameters(notebook, parameters or {})
    out_dir = Path(output_dir).expanduser().absolute()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = "a file is there" if out_dir.is_file() else e.strerror or str(e)
        raise NotebookError(f"cannot create the output folder {out_dir} ({why})", notebook) from None
    params = {k: _absolute(v) for k, v in (parameters or {}).items()}
    if "output_dir" in declared:
        params.setdefault("output_dir", str(out_dir))
    executed = out_dir / f"{name or notebook.stem}.ipynb"
    failure = None
    with _quiet_papermill(), _private_kernel_sockets() as kernel_manager_class:
        try:
            papermill.execute_notebook(str(notebook), str(executed), parameters=params,
                                       kernel_name=kernel, cwd=str(notebook.parent),
                                       progress_bar=False, start_timeout=start_timeout,
                                       kernel_manager_class=kernel_manager_class, language=language)
        except papermill.PapermillExecutionError as e:
            failure = e
        except NoSuchKernel:
            raise NotebookError(f"no Jupyter kernel named {kernel!r} here (`jupyter kernelspec list` "
                                "shows those installed)", notebook) from None
        except DeadKernelError as e:  # killed: out of memory, a crash in native code
            failure = e
    paths = [executed]
    if html and executed.exists():
        paths.append(to_html(executed, title=title or default_title(notebook, parameters or {})))
    if isinstance(failure, DeadKernelError):
        raise NotebookError(f"the kernel died while running it ({failure}; out of memory?); "
                            f"what it ran is in {_display_path(paths[-1])}", notebook)
    if failure is not None:
        raise NotebookError(f"cell {failure.exec_count} failed with {failure.ename}: {failure.evalue} "
                            f"(see {_display_path(paths[-1])})", notebook)
    return paths


def check_parameters(notebook: Path, parameters: Mapping[str, Any]) -> set[str]:
    """The names ``notebook``'s parameters cell declares; NotebookError when ``parameters``
    names one it does not. papermill only warns and runs the notebook on its defaults, so
    ``-p artifcat runs/x`` would report on the default artifact, under the name you gave."""
    import difflib

    import papermill

    try:
        declared = set(papermill.inspect_notebook(str(notebook)))
    except Exception as e:  # papermill's own parse of the parameters cell
        raise NotebookError(f"cannot read its parameters cell ({type(e).__name__}: {str(e)[:200]})", notebook) from None
    unknown = sorted(set(parameters) - declared)
    if unknown:
        hints = [f"{u!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(u, declared, n=1)) else repr(u)
                 for u in unknown]
        has = ", ".join(sorted(declared)) or "none: it has no cell tagged 'parameters'"
        raise NotebookError(f"no parameter {', '.join(hints)} in its parameters cell (it has: {has})", notebook)
    return declared


def notebook_language(notebook: Path) -> str | None:
    """The language ``notebook`` declares (kernelspec or language_info), None when it
    declares none; NotebookError when it is not a file or not a notebook nbformat reads."""
    import nbformat

    if not notebook.is_file():
        raise NotebookError("no such notebook", notebook)
    try:
        with warnings.catch_warnings():  # cells without ids: nbformat's warning, not ours
            warnings.simplefilter("ignore")
            nb = nbformat.read(notebook, as_version=4)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, nbformat.ValidationError) as e:
        raise NotebookError(f"not a readable notebook ({type(e).__name__}: {str(e)[:200]})", notebook) from None
    meta = nb.get("metadata", {})
    return meta.get("kernelspec", {}).get("language") or meta.get("language_info", {}).get("name")


def default_title(notebook: str | Path, parameters: Mapping[str, Any]) -> str:
    """``"Inspect an artifact — dylora-b"``: the notebook's heading and what it ran on."""
    import nbformat

    heading = Path(notebook).stem
    try:
        for cell in nbformat.read(notebook, as_version=4).cells:
            if cell.cell_type == "markdown" and cell.source.lstrip().startswith("# "):
                heading = cell.source.lstrip()[2:].splitlines()[0].strip()
                break
    except (OSError, ValueError):
        pass
    subject = [_label(parameters[k]) for k in SUBJECTS if parameters.get(k)]
    return heading + (f" — {' vs '.join(subject)}" if subject else "")


SUBJECTS = ("artifact", "a", "b", "base", "trained")


def _label(value: Any) -> str:
    text = str(value).rstrip("/")
    if text.startswith(("wandb:", "hf:")):
        return text
    p = Path(text)
    return f"{p.parent.name}/{p.name}" if p.name in ("best_model", "model", "base", "lora") else p.name


def to_html(executed: str | Path, title: str | None = None) -> Path:
    """Render an executed notebook to a shareable HTML report beside it: titled, code
    hidden, widgets rendered statically (no CDN, opens offline), cells tagged
    ``interactive`` and the lines nbval checks (:data:`CHECK_OUTPUT`) left out, and paths
    under the current folder or home shown relative."""
    import jinja2
    import nbformat
    from nbconvert import HTMLExporter

    from modelkit.present.static_widgets import inline_widgets

    executed = Path(executed)
    nb = nbformat.read(executed, as_version=4)
    nb.cells = [c for c in nb.cells if INTERACTIVE not in c.metadata.get("tags", [])
                and not c.source.startswith(CHECK_OUTPUT)]  # nbval's lines: the verdict says it
    inline_widgets(nb)
    exporter = HTMLExporter(template_name="lab", exclude_input=True, exclude_input_prompt=True,
                            exclude_output_prompt=True,
                            extra_loaders=[jinja2.DictLoader({"modelkit-report.html.j2": TEMPLATE})],
                            template_file="modelkit-report.html.j2")
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": title or executed.stem}})
    out = executed.with_suffix(".html")
    out.write_text(relative_paths(body), encoding="utf-8")
    return out


SCRATCH_PREFIX = "modelkit-scratch-"   # tempfile prefix of folders a notebook removes when done


def scratch_folder() -> str:
    """A temporary folder for a notebook's by-products (reports show it as such)."""
    import tempfile

    return tempfile.mkdtemp(prefix=SCRATCH_PREFIX)


def relative_paths(text: str) -> str:
    """Absolute paths under the current folder shown relative to it, under home as ``~``,
    a :func:`scratch_folder` as ``(temporary folder)``, modelkit's cache (a watch's
    ledger) as ``(modelkit cache)``."""
    import re
    import tempfile

    from modelkit.cache import cache_dir

    text = re.sub(re.escape(tempfile.gettempdir().rstrip("/") + "/" + SCRATCH_PREFIX) + r"[\w-]+",
                  "(temporary folder)", text)
    text = text.replace(str(cache_dir()) + "/", "(modelkit cache)/")
    cwd, home = str(Path.cwd()), str(Path.home())
    if cwd not in ("/", ""):
        text = text.replace(cwd + "/", "")
    if home not in ("/", ""):
        text = text.replace(home + "/", "~/")
    return text


def _display_path(p: Path) -> str:
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


# AF_UNIX socket paths are limited to 107 bytes (Linux; 103 on macOS): keep a margin
SOCKET_PATH_LIMIT = 100


@contextmanager
def _private_kernel_sockets() -> Iterator[type]:
    """A kernel manager class whose kernel talks over Unix sockets in a private temporary
    folder (mode 0700, removed afterwards) instead of localhost TCP ports: no other user of
    a shared node can listen in, and ipykernel (>= 7.4) has nothing to warn about on every
    run. On Windows, or where the folder's path would be too long for a socket, the stock
    TCP manager.

    A subclass rather than jupyter_client's own switch (``KernelManager.transport = "ipc"``)
    alone: that puts the sockets beside the connection file, whose path (the Jupyter runtime
    folder, often deep under a home or a test's temporary folder) can exceed the limit."""
    import shutil
    import tempfile

    from jupyter_client import AsyncKernelManager
    from traitlets import default

    folder = tempfile.mkdtemp(prefix="modelkit-kernel-")
    ip = str(Path(folder) / "k")
    try:
        if os.name == "nt" or len(os.fsencode(ip)) + len("-65535") > SOCKET_PATH_LIMIT:
            yield AsyncKernelManager
            return

        class PrivateSocketKernelManager(AsyncKernelManager):
            @default("transport")
            def _transport_default(self) -> str:
                return "ipc"

            @default("ip")
            def _ip_default(self) -> str:
                return ip

        yield PrivateSocketKernelManager
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class _quiet_papermill:
    """papermill logs every cell at INFO and warns about kernels: keep the CLI to results."""

    def __enter__(self):
        import logging

        self.logger = logging.getLogger("papermill")
        self.level = self.logger.level
        self.logger.setLevel(logging.WARNING)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


# -- results: what a notebook run concluded ---------------------------------------------

def record(result: Any, output_dir: str | Path, name: str) -> Path:
    """Write ``NAME.json`` (the result) and ``NAME.verdict.json`` (its verdict and exit
    code, which ``modelkit report`` exits with) into ``output_dir``; the JSON's path."""
    import json

    from modelkit.verdicts import verdict_of

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(result.to_json(indent=1))
    (out / f"{name}.verdict.json").write_text(json.dumps(verdict_of(result).to_dict(), indent=1))
    return out / f"{name}.json"


def read_verdict(output_dir: str | Path, name: str) -> dict[str, Any] | None:
    """What :func:`record` wrote for ``name`` in ``output_dir`` (None: nothing recorded)."""
    import json

    path = Path(output_dir) / f"{name}.verdict.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# -- batch: one notebook over many artifacts ---------------------------------------------

def subject_parameter(notebook: str | Path) -> str:
    """The parameter a batch run varies: the first of artifact / trained / b the notebook has."""
    import papermill

    names = set(papermill.inspect_notebook(str(notebook)))
    for name in ("artifact", "trained", "b"):
        if name in names:
            return name
    raise NotebookError(f"no artifact, trained or b parameter to vary (has {', '.join(sorted(names))})",
                        notebook)


def folder_names(refs: list[str]) -> list[str]:
    """One distinct, readable folder name per ref (``dylora-b``, ``pair-lora``, ``name-v3``)."""
    import re

    names, seen = [], set()
    for ref in refs:
        text = str(ref).rstrip("/")
        if text.startswith(("wandb:", "hf:")):
            base = text.split(":", 1)[1].replace(":", "-").split("/")[-1]
        else:
            base = _label(text).replace("/", "-")
        base = re.sub(r"[^\w.-]+", "-", base).strip("-.") or "artifact"
        name, i = base, 2
        while name in seen:
            name, i = f"{base}-{i}", i + 1
        seen.add(name)
        names.append(name)
    return names


def run_batch(notebook: str | Path, refs: list[str], parameters: Mapping[str, Any] | None = None,
              output_dir: str | Path = "reports", *, over: str | None = None,
              kernel: str = "python3") -> tuple[int, list[dict[str, Any]]]:
    """Run ``notebook`` once per ref (as parameter ``over``, default
    :func:`subject_parameter`), each into ``output_dir/<ref name>/``, then write
    ``output_dir/index.html`` and ``index.json``. Returns (worst exit code, entries)."""
    import json

    notebook = Path(notebook).expanduser().absolute()
    notebook_language(notebook)  # an unreadable notebook, or a wrong parameter name, fails once
    over = over or subject_parameter(notebook)
    check_parameters(notebook, {**(parameters or {}), over: None})
    out_dir = Path(output_dir).expanduser().absolute()
    entries = []
    for ref, folder in zip(refs, folder_names(refs)):
        params = {**(parameters or {}), over: ref}
        entry: dict[str, Any] = {"ref": str(ref), "folder": folder}
        try:
            paths = run_notebook(notebook, params, out_dir / folder, kernel=kernel)
            verdict = read_verdict(out_dir / folder, notebook.stem) or \
                {"label": "DONE", "level": "neutral", "detail": "the notebook recorded no verdict", "exit_code": 0}
        except NotebookError as e:
            paths = sorted((out_dir / folder).glob(f"{notebook.stem}.*"))
            verdict = {"label": "FAILED", "level": "error", "detail": e.problem.split(" (see ")[0], "exit_code": 2}
        entry.update(verdict=verdict, report=f"{folder}/{notebook.stem}.html",
                     files=[str(p.relative_to(out_dir)) for p in paths])
        entries.append(entry)
        print(f"{verdict['label']:<12} {ref}  ->  {_display_path(out_dir / entry['report'])}", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "index.json").write_text(json.dumps({"notebook": notebook.name, "over": over,
                                                    "entries": entries}, indent=1))
    (out_dir / "index.html").write_text(index_html(default_title(notebook, {}), entries))
    return max((e["verdict"]["exit_code"] for e in entries), default=0), entries


def index_html(title: str, entries: list[dict[str, Any]]) -> str:
    """The batch's index page: one row per artifact, verdict coloured, linking its report."""
    import html as h

    from modelkit.present.tables import verdict_html
    from modelkit.verdicts import Verdict

    rows = "".join(
        f"<tr><td><a href='{h.escape(e['report'])}'>{h.escape(relative_paths(e['ref']))}</a></td>"
        f"<td>{verdict_html(Verdict(**e['verdict']))}</td></tr>" for e in entries)
    worst = max((e["verdict"]["exit_code"] for e in entries), default=0)
    counts = {}
    for e in entries:
        counts[e["verdict"]["label"]] = counts.get(e["verdict"]["label"], 0) + 1
    tally = ", ".join(f"{n} {label}" for label, n in counts.items())
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{h.escape(title)}: "
            f"{len(entries)} artifacts</title></head><body style='font-family:sans-serif;margin:24px'>"
            f"<h1>{h.escape(title)}</h1><p>{len(entries)} artifacts: {h.escape(tally)} "
            f"(exit code {worst})</p><table style='border-collapse:collapse'>"
            f"<tr><th style='text-align:left'>artifact</th><th style='text-align:left'>verdict</th></tr>"
            f"{rows}</table></body></html>")


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
