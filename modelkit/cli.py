"""``modelkit`` command line: a thin view over the public API.

Exit codes: 0 fine, 1 an error finding (or a failed verification / comparison), 2 the
input cannot be read at all (unknown ref or format, unreadable config, bad arguments).
Every error is one line on stderr, ``modelkit inspect: CorruptFileError: <file>: <problem>``
(``MODELKIT_DEBUG=1`` adds the traceback).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from .errors import translate

PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg", ".webp", ".eps", ".ps", ".tif", ".tiff")


def _inspect(args: argparse.Namespace) -> int:
    from .inspection import inspect

    report = inspect(args.ref, base=args.base, deep=args.deep)
    print(report.to_json(indent=1) if args.json else report.summary())
    return report.exit_code


def _export(args: argparse.Namespace) -> int:
    from .exporting import export

    result = export(args.ref, args.out, base=args.base, dtype=args.dtype,
                    max_shard_size=args.max_shard_size, expert=args.expert,
                    verify=args.verify, force=args.force)
    print(result.to_json(indent=1) if args.json else result.summary())
    return 0 if result.ok else 1


def _diff(args: argparse.Namespace) -> int:
    from .diffing import diff

    result = diff(args.a, args.b, base_a=args.base_a, base_b=args.base_b,
                  options_a=_options(args.option_a), options_b=_options(args.option_b),
                  rank=args.rank)
    if args.plot:
        result.plot(args.plot)
    print(result.to_json(indent=1) if args.json else result.summary())
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .comparison import compare

    result = compare(args.base, *args.trained, tasks=args.tasks.split(","),
                     include_path=args.include_path, limit=args.limit,
                     num_fewshot=args.num_fewshot, batch_size=args.batch_size,
                     log_to_wandb=args.wandb, use_cache=not args.no_cache,
                     base_options=_options(args.option_a), trained_options=_options(args.option_b))
    if args.plot:
        result.plot(args.plot)
    print(result.to_json(indent=1) if args.json else result.summary())
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import run_notebook

    params = {k: _parse_value(v) for k, v in args.parameter}
    paths = run_notebook(args.notebook, parameters=params, output_dir=args.output_dir)
    for p in paths:
        print(p)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    return demo_main(args.root, notebooks=not args.no_notebooks)


def _expert_arg(text: str) -> int | str:
    """``--expert``: a non-negative integer or ``all``."""
    if text == "all":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an expert index (an integer >= 0) or 'all'") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expert indices start at 0")
    return value


def _plot_arg(text: str) -> str:
    """``--plot FILE``: checked before any work, so a typo does not cost a whole diff."""
    path = Path(text).expanduser()
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise argparse.ArgumentTypeError(f"{text!r}: the figure needs a file name ending in one of "
                                         f"{', '.join(PLOT_SUFFIXES)}")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: the folder {str(path.parent)!r} does not exist")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give a file name")
    return str(path)


def _options(pairs: list[str] | None) -> dict:
    out = {}
    for item in pairs or []:
        key, _, value = item.partition("=")
        out[key] = _parse_value(value)
    return out


def _parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (``modelkit export: error: argument --expert: ...``)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="modelkit", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", help="what an artifact stores, needs and gets wrong")
    s.add_argument("ref", help="folder, wandb:entity/project/name:vN, or hf:org/name")
    s.add_argument("--base", help="base model folder or ref (overrides the recorded name)")
    s.add_argument("--deep", action="store_true", help="also read tensor data (e.g. all-zero LoRA B)")
    s.add_argument("--json", action="store_true", help="print the full report as JSON")
    s.set_defaults(func=_inspect)

    s = sub.add_parser("export", help="write a standard Hugging Face folder")
    s.add_argument("ref")
    s.add_argument("out")
    s.add_argument("--base")
    s.add_argument("--dtype", help="float32, bfloat16 or float16 (default: as stored)")
    s.add_argument("--max-shard-size", default="2GB")
    s.add_argument("--expert", type=_expert_arg,
                   help="DyLoRA-MoE: expert index to merge, or 'all' (one folder each)")
    s.add_argument("--verify", action="store_true", help="reload OUT and compare logits with the source")
    s.add_argument("--force", action="store_true", help="replace an existing OUT")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_export)

    s = sub.add_parser("diff", help="compare two artifacts weight by weight")
    s.add_argument("a")
    s.add_argument("b")
    s.add_argument("--base-a")
    s.add_argument("--base-b")
    s.add_argument("--option-a", action="append", metavar="KEY=VALUE", help="view option for A, e.g. expert=0")
    s.add_argument("--option-b", action="append", metavar="KEY=VALUE", help="view option for B, e.g. expert=0")
    s.add_argument("--rank", action="store_true", help="estimate the effective rank of 2-D deltas")
    s.add_argument("--plot", type=_plot_arg, help="save the heatmap/top-changes figure to this file")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_diff)

    s = sub.add_parser("compare", help="benchmark base vs trained with lm-evaluation-harness")
    s.add_argument("base")
    s.add_argument("trained", nargs="+")
    s.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    s.add_argument("--include-path", help="folder of your own lm-eval task YAMLs")
    s.add_argument("--limit", type=int)
    s.add_argument("--num-fewshot", type=int)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--option-a", action="append", metavar="KEY=VALUE", help="load option for the base")
    s.add_argument("--option-b", action="append", metavar="KEY=VALUE", help="load option for trained")
    s.add_argument("--no-cache", action="store_true")
    s.add_argument("--wandb", action="store_true", help="log table and plots to a W&B run")
    s.add_argument("--plot", type=_plot_arg)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_compare)

    s = sub.add_parser("report", help="run a notebook with papermill into reports/")
    s.add_argument("notebook")
    s.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    s.add_argument("--output-dir", default="reports")
    s.set_defaults(func=_report)

    s = sub.add_parser("demo", help="generate demo artifacts and run the notebooks on them")
    s.add_argument("--root", default="demo")
    s.add_argument("--no-notebooks", action="store_true")
    s.set_defaults(func=_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"modelkit {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line for anything; the traceback only on request
        if os.environ.get("MODELKIT_DEBUG"):
            raise
        err = translate(e)
        if err is None:
            print(f"modelkit {args.command}: internal error: {type(e).__name__}: {_one_line(str(e))} "
                  "(a modelkit bug; MODELKIT_DEBUG=1 shows the traceback)", file=sys.stderr)
        else:
            print(f"modelkit {args.command}: {type(err).__name__}: {_one_line(str(err))}", file=sys.stderr)
        return 2


def _one_line(text: str) -> str:
    out = ""
    for line in (x.strip() for x in text.strip().splitlines()):
        if line:
            out += ("" if not out else " " if out.endswith(":") else "; ") + line.removeprefix("- ")
    return out


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
