"""``modelkit demo``: write the demo artifacts, inspect each one, run every notebook.

``make demo`` runs ``modelkit demo --root demo``: the fixture catalog (one tiny artifact of
every layout and fault, :func:`modelkit.testing.write_catalog`) and the compare pair (a
tiny base model and a LoRA fine-tune that learned ``mk_topic``,
:func:`modelkit.ui.demo_pair.write_demo_pair`, in ``demo/pair/``) are written, one line per
artifact is printed, then each ``notebooks/NN-*.ipynb`` is executed with papermill on the
demo parameters into ``reports/`` (executed notebook + HTML).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from modelkit.errors import ModelkitError

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


def write_demo(root: str | Path) -> dict[str, Path]:
    """Write the demo artifacts under ``root`` (idempotent: what exists is reused);
    ``{name: folder}``, the pair as ``pair/base`` and ``pair/lora``. The simulated training
    run of the pair (``pair/run``, for the watch notebook) is written too, not listed."""
    from modelkit.testing import write_catalog
    from modelkit.testing.training_run import write_demo_run
    from modelkit.ui.demo_pair import write_demo_pair

    paths = write_catalog(Path(root))
    pair = write_demo_pair(Path(root) / "pair")
    write_demo_run(Path(root) / "pair" / "run", pair["base"], pair["trained"])   # watched by 05-watch
    return {**paths, "pair/base": pair["base"], "pair/lora": pair["trained"]}


def notebook_parameters(root: str | Path, output_dir: str | Path = "reports") -> dict[str, dict[str, Any]]:
    """The papermill parameters that run each notebook on the demo under ``root``."""
    root = Path(root).expanduser().absolute()
    base = {"root": str(root), "output_dir": str(Path(output_dir).expanduser().absolute())}
    return {
        "01-inspect": {**base, "artifact": str(root / "compressed-no-non-moe")},
        "02-export": {**base, "artifact": str(root / "dylora-b")},
        "03-diff": {**base, "a": str(root / "original-qwen3-moe"), "b": str(root / "compressed-checkpoint-N")},
        "04-compare": {**base, "base": str(root / "pair" / "base"), "trained": str(root / "pair" / "lora"),
                       "tasks": ["mk_topic", "mk_count"], "limit": 20},
        "05-watch": {**base, "run_dir": str(root / "pair" / "run"), "baseline": str(root / "pair" / "base"),
                     "tasks": ["mk_topic"], "limit": 20},
    }


def describe(name: str, path: Path) -> str:
    """One line: name, format, layout and the error / warning codes inspect reports."""
    from modelkit.ops.inspect import inspect

    try:
        report = inspect(path)
    except ModelkitError as e:
        return f"{name:<30} cannot be opened: {type(e).__name__}: {e.problem}"
    codes = [f"error {c}" for c in sorted({f.code for f in report.errors})]
    codes += [f"warning {c}" for c in sorted({f.code for f in report.warnings})]
    return f"{name:<30} {report.format:<15} {report.layout:<20} {', '.join(codes) or 'ok'}"


def main(root: str | Path = "demo", notebooks: bool = True, output_dir: str | Path = "reports") -> int:
    """Write and inspect the demo artifacts, then run the notebooks into ``output_dir``.
    Returns 0, or 1 when a notebook failed."""
    t0 = time.perf_counter()
    print(f"writing demo artifacts under {Path(root).absolute()} ...", flush=True)
    paths = write_demo(root)
    for name, path in paths.items():
        print(describe(name, path), flush=True)
    print(f"{len(paths)} artifacts ({time.perf_counter() - t0:.0f} s)")
    if not notebooks:
        return 0
    if not NOTEBOOKS.is_dir():
        print(f"no notebooks at {NOTEBOOKS} (installed without the repository); skipped")
        return 0
    from modelkit.ui.notebooks import read_verdict, run_notebook

    print(f"running the notebooks into {Path(output_dir).absolute()} ...", flush=True)
    failed = 0
    for name, params in notebook_parameters(root, output_dir).items():
        t = time.perf_counter()
        try:
            outputs = run_notebook(NOTEBOOKS / f"{name}.ipynb", parameters=params, output_dir=output_dir)
        except ModelkitError as e:
            print(f"FAILED {name}: {e}", file=sys.stderr)
            failed += 1
            continue
        verdict = read_verdict(output_dir, name) or {"label": "DONE", "detail": "no verdict recorded"}
        print(f"{name:<12} {verdict['label']}: {verdict['detail']}", flush=True)
        print(f"{'':<12} {outputs[-1]} ({time.perf_counter() - t:.0f} s)", flush=True)
    return 1 if failed else 0
