"""The ``lm-eval`` engine: hand the model to the lm-eval CLI in a subprocess.

modelkit prepares what the CLI can open and checks what it evaluated; the CLI (and, on
GPUs, accelerate or vLLM) does the inference. Nothing of lm-eval's is re-implemented.

1. **Prepare** (:meth:`LmEvalEngine.prepare`): a folder already standard (every tensor
   stored under its standard name, nothing to compute) is passed as is; a PEFT adapter
   on such a base, with nothing to report, goes to the ``hf`` backend as ``peft=``;
   anything else (a compressed MoE, a DyLoRA expert, an adapter in an odd layout) is
   exported with :func:`modelkit.export` (``verify=True``: logits checked against
   :func:`modelkit.load` of the source) into a temporary folder.
2. **Run** ``python -m lm_eval run --log_samples`` (under ``accelerate launch`` for data
   parallel ``hf``; ``--model vllm`` with tensor / data parallel sizes), never with
   lm-eval's response cache (its key ignores which model answered).
3. **Check**: the run's recorded ``pretrained`` / ``peft`` are the prepared folders;
   those folders' fingerprints are unchanged since preparation and match the model
   ``compare`` identified (``modelkit_export.json`` records the source's fingerprint);
   the results were written by this run. Any mismatch is a CompareError: a cached or
   swapped run is never reported as the trained model.
4. **Read back** the per-sample logs (:mod:`modelkit.bench.sample_logs`) into the runs the
   in-process path produces; remove the temporary export.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from modelkit.bench.engines.base import Engine, EngineRun, EvalJob
from modelkit.errors import CompareError, ModelkitError
from modelkit.io.tensors import dtype_name

BACKENDS = ("hf", "vllm")
RESERVED_MODEL_ARGS = ("pretrained", "peft", "delta")   # modelkit decides what is evaluated
LOAD_ONLY_OPTIONS = ("dtype", "device", "base")          # load options that are not view options
LOG_TAIL_LINES = 20


@dataclass
class Prepared:
    """What the CLI is pointed at, and the fingerprints to hold it to afterwards."""

    how: str                                  # "as-is", "peft" or "export"
    pretrained: str
    peft: str | None = None
    dtype: str | None = None
    fingerprints: dict[str, str] = field(default_factory=dict)    # folder -> fingerprint at preparation
    export: dict[str, Any] | None = None      # modelkit_export.json of an export
    notes: list[str] = field(default_factory=list)


@dataclass
class LmEvalEngine(Engine):
    """lm-eval CLI in a subprocess. ``backend`` "hf" (with ``launcher="accelerate"`` and
    ``num_processes`` for data parallel) or "vllm" (``tensor_parallel_size``,
    ``data_parallel_size``). ``model_args`` pass through to ``--model_args``; ``device``,
    ``dtype``, ``batch_size`` override the defaults. ``samples_dir`` keeps each model's
    lm-eval output (and ``modelkit_run.json``) under ``samples_dir/<label>`` for
    ``modelkit compare-results``; ``work_dir`` is where temporary exports go.

    ``cpu=True`` with accelerate: the processes form a gloo group on CPUs. lm-eval 0.4.13's
    hf backend shares the documents out only when ``torch.cuda.device_count() > 1``, so
    CPU data parallel exercises the path (tests) rather than saving time."""

    name: ClassVar[str] = "lm-eval"
    backend: str = "hf"
    launcher: str | None = None
    num_processes: int | None = None
    cpu: bool = False
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    gpu_memory_utilization: float | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    device: str | None = None
    dtype: str | None = None
    batch_size: int | str | None = None
    samples_dir: str | None = None
    work_dir: str | None = None
    verify: bool = True
    python: str = sys.executable
    extra_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise CompareError(f"unknown lm-eval backend {self.backend!r}; use one of {', '.join(BACKENDS)}")
        if self.launcher not in (None, "accelerate"):
            raise CompareError(f"unknown launcher {self.launcher!r}; use 'accelerate' (hf data parallel)")
        if self.launcher and self.backend != "hf":
            raise CompareError("accelerate launch is for the hf backend; vLLM parallelises itself "
                               "(tensor_parallel_size, data_parallel_size)")
        bad = [k for k in self.model_args if k in RESERVED_MODEL_ARGS]
        if bad:
            raise CompareError(f"model_args may not set {', '.join(bad)}: modelkit chooses (and checks) what "
                               "is evaluated; pass the artifact as the model ref instead")
        for k in ("tensor_parallel_size", "data_parallel_size"):
            if not isinstance(getattr(self, k), int) or getattr(self, k) < 1:
                raise CompareError(f"{k} must be an integer >= 1")
        if self.num_processes is not None and (not isinstance(self.num_processes, int) or self.num_processes < 1):
            raise CompareError("num_processes must be an integer >= 1")

    def identity(self) -> dict[str, Any]:
        return {"engine": self.name, "backend": self.backend, "model_args": dict(sorted(self.model_args.items())),
                "dtype": self.dtype, "launcher": self.launcher}

    def describe(self) -> str:
        extra = f" under accelerate launch x{self.num_processes or 1}" if self.launcher else ""
        if self.backend == "vllm":
            extra = f" (tensor parallel {self.tensor_parallel_size}, data parallel {self.data_parallel_size})"
        return f"lm-eval CLI, {self.backend} backend{extra}"

    # -- 1. prepare ------------------------------------------------------------------
    def choose(self, job: EvalJob, workdir: Path) -> Prepared:
        """How the CLI will see ``job``'s model (nothing written yet; an export goes to
        ``workdir/model``)."""
        from modelkit.io.shards import default_dtype
        from modelkit.ops.load import check_artifact, dense_view, open_for_load

        opts = dict(job.options)
        view_opts = {k: v for k, v in opts.items() if k not in LOAD_ONLY_OPTIONS}
        try:
            artifact, base_art = open_for_load(job.ref, opts.get("base"))
        except ModelkitError as e:
            raise CompareError(f"cannot open the {job.role} model {job.ref!r}: {e}") from None
        if artifact.fingerprint != job.artifact_fingerprint:
            raise CompareError(f"the {job.role} model changed on disk since it was identified (fingerprint "
                               f"{artifact.fingerprint}, expected {job.artifact_fingerprint})", artifact.folder)
        if artifact.family == "mixture" and "expert" not in view_opts:
            raise CompareError(f"the {job.role} model is a routed DyLoRA-MoE mixture, which no lm-eval backend "
                               "can run: evaluate it with --engine inprocess, or one expert with expert=K "
                               "(exported and verified for the CLI)", artifact.folder)
        dtype = self.dtype or (str(opts["dtype"]) if opts.get("dtype") else None)

        def as_is(art) -> bool:
            """Every tensor of the standard model stored under its own name in safetensors."""
            if art.family != "dense":  # a view that merges or picks is not stored as-is
                return False
            try:
                dv = dense_view(art, None)
            except ModelkitError:
                return False
            return all(lt.stored is not None and lt.stored[1].key == n
                       and str(lt.stored[1].file).endswith(".safetensors") for n, lt in dv.tensors.items())

        if not view_opts and base_art is None and as_is(artifact):
            dtype = dtype or dtype_name(default_dtype(dense_view(artifact, None).tensors))
            return Prepared("as-is", str(artifact.folder), dtype=dtype,
                            fingerprints={str(artifact.folder): artifact.fingerprint})
        if (self.backend == "hf" and artifact.family == "adapter" and set(view_opts) <= {"merge"} and base_art is not None
                and as_is(base_art) and not check_artifact(artifact, base_art)):
            dtype = dtype or dtype_name(default_dtype(dense_view(base_art, None).tensors))
            return Prepared("peft", str(base_art.folder), peft=str(artifact.folder), dtype=dtype,
                            fingerprints={str(base_art.folder): base_art.fingerprint,
                                          str(artifact.folder): artifact.fingerprint})
        return Prepared("export", str(workdir / "model"), dtype=dtype,
                        notes=[f"export options: {self._export_options(job)}"])

    def check(self, job: EvalJob) -> None:
        self.choose(job, Path(tempfile.gettempdir()))

    def _export_options(self, job: EvalJob) -> dict[str, Any]:
        return {k: v for k, v in job.options.items() if k not in LOAD_ONLY_OPTIONS and k != "merge"}

    def prepare(self, job: EvalJob, workdir: Path) -> Prepared:
        """:meth:`choose`, then the export (verified) when one is needed."""
        from modelkit.io.sources import fingerprint_folder
        from modelkit.ops.export import export

        prepared = self.choose(job, workdir)
        if prepared.how != "export":
            return prepared
        out = Path(prepared.pretrained)
        try:
            result = export(job.ref, out, base=job.options.get("base"), dtype=prepared.dtype, verify=self.verify,
                            progress=False, **self._export_options(job))
        except ModelkitError as e:
            raise CompareError(f"cannot export the {job.role} model {job.ref!r} for lm-eval: {e}") from None
        if not result.ok:
            raise CompareError(f"the export of the {job.role} model {job.ref!r} failed its verification "
                               f"({result.verification}); nothing was evaluated")
        record = json.loads((out / "modelkit_export.json").read_text())
        if record["source"]["fingerprint"] != job.artifact_fingerprint:
            raise CompareError(f"the export records source fingerprint {record['source']['fingerprint']}, "
                               f"not the {job.role} model's {job.artifact_fingerprint}", out)
        notes = [f"exported to a temporary standard folder ({result.tensors} tensors, {result.dtype})"
                 + (", verified: " + _verification_line(result.verification) if result.verification else "")]
        return Prepared("export", str(out), dtype=result.dtype, export=record, notes=notes,
                        fingerprints={str(out): fingerprint_folder(out)})

    def plan(self, job: EvalJob, workdir: str | Path, samples_dir: str | Path) -> list[str]:
        """The shell commands that do what :meth:`evaluate` does, for running elsewhere
        (a cluster node): export when needed, the lm-eval run, removing the export."""
        workdir = Path(workdir) / _safe(job.label)
        prepared = self.choose(job, workdir)
        lines = []
        if prepared.how == "export":
            cmd = ["modelkit", "export", job.ref, prepared.pretrained, "--verify"]
            opts = self._export_options(job)
            if "expert" in opts:
                cmd += ["--expert", str(opts.pop("expert"))]
            if job.options.get("base"):
                cmd += ["--base", str(job.options["base"])]
            if prepared.dtype:
                cmd += ["--dtype", prepared.dtype]
            lines.append(shlex.join(cmd) + (f"   # options {opts}" if opts else ""))
        argv = self.command(job, prepared, Path(samples_dir) / _safe(job.label), _include_path(job.include_path, None))
        argv[0] = "python"
        if self.launcher == "accelerate":
            argv = ["accelerate", "launch"] + argv[3:]
        lines.append(" ".join([f"{k}={v}" for k, v in self.launch_env().items()] + [shlex.join(argv)]))
        if prepared.how == "export":   # keep the export's record beside the log, then remove the export
            lines.append(shlex.join(["cp", str(Path(prepared.pretrained) / "modelkit_export.json"),
                                     str(Path(samples_dir) / _safe(job.label))]))
            lines.append(shlex.join(["rm", "-rf", prepared.pretrained]))
        return lines

    # -- 2. the command ---------------------------------------------------------------
    def command(self, job: EvalJob, prepared: Prepared, output_path: str | Path,
                include_path: str | None = None, port: int | None = None) -> list[str]:
        """The exact argv run (``python -m lm_eval run ...``, maybe under accelerate)."""
        from modelkit.bench.engines.vllm import vllm_model_args

        args: dict[str, Any] = {"pretrained": prepared.pretrained}
        if prepared.peft:
            args["peft"] = prepared.peft
        if prepared.dtype:
            args["dtype"] = prepared.dtype
        if self.backend == "vllm":
            args.update(vllm_model_args(self.tensor_parallel_size, self.data_parallel_size,
                                        self.gpu_memory_utilization))
        args.update(self.model_args)
        argv: list[str] = []
        if self.launcher == "accelerate":
            # --multi_gpu: torchrun starts the processes (accelerate's --cpu would start one);
            # on CPUs ACCELERATE_USE_CPU=true (see launch_env) makes them a gloo group
            argv = [self.python, "-m", "accelerate.commands.launch"]
            if (self.num_processes or 1) > 1:
                argv.append("--multi_gpu")
            argv += ["--num_processes", str(self.num_processes or 1), "--num_machines", "1",
                     "--mixed_precision", "no", "--dynamo_backend", "no"]
            if port is not None:
                argv += ["--main_process_port", str(port)]
            argv += ["-m", "lm_eval", "run"]
        else:
            argv = [self.python, "-m", "lm_eval", "run"]
        argv += ["--model", self.backend, "--model_args", format_model_args(args),
                 "--tasks", ",".join(job.tasks), "--log_samples", "--output_path", str(output_path),
                 "--batch_size", str(self.batch_size if self.batch_size is not None else job.batch_size)]
        if include_path:
            argv += ["--include_path", include_path]
        if job.limit is not None:
            argv += ["--limit", str(job.limit)]
        if job.num_fewshot is not None:
            argv += ["--num_fewshot", str(job.num_fewshot)]
        device = self.device or ("cpu" if self.cpu else None)
        if device and self.backend == "hf":
            argv += ["--device", device]
        return argv + list(self.extra_args)

    def launch_env(self) -> dict[str, str]:
        """Environment variables the command needs beyond the caller's."""
        return {"ACCELERATE_USE_CPU": "true"} if self.launcher == "accelerate" and self.cpu else {}

    # -- 3 + 4. run, check, read back ---------------------------------------------------
    def evaluate(self, job: EvalJob, catalog: Any = None) -> EngineRun:
        from modelkit.bench.evaluation import find_tasks, lm_eval_version, runs_from
        from modelkit.bench.sample_logs import read_lm_eval

        catalog = catalog if catalog is not None else find_tasks(job.tasks, job.include_path or None)
        built = catalog.build(job.tasks)          # data checked before anything is exported
        if self.backend == "vllm":
            from modelkit.bench.engines.vllm import require_vllm

            require_vllm()
        root = Path(self.work_dir).expanduser() if self.work_dir else None
        if root is not None:
            root.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="modelkit-lm-eval-", dir=root))
        try:
            prepared = self.prepare(job, workdir)
            include = _include_path(job.include_path, workdir)
            out = workdir / "lm-eval-output"
            argv = self.command(job, prepared, out, include,
                                port=_free_port() if self.launcher == "accelerate" else None)
            t0 = time.time()
            _run(argv, workdir / "lm-eval.log", self.launch_env())
            seconds = time.time() - t0
            log = read_lm_eval(out)
            checks = check_run(log, prepared, job, started=t0)
            runs = runs_from(built, {**log.results, "samples": log.samples})
            provenance = {"engine": self.name, "backend": self.backend, "version": lm_eval_version(),
                          "backend_version": _backend_version(self.backend),
                          "command": " ".join([f"{k}={v}" for k, v in self.launch_env().items()] + [shlex.join(argv)]),
                          "prepared": prepared.how, "evaluated": {"pretrained": prepared.pretrained,
                                                                   "peft": prepared.peft, "dtype": prepared.dtype},
                          "checks": checks, "notes": prepared.notes}
            if prepared.export:
                provenance["export"] = {k: prepared.export.get(k) for k in ("source", "options", "dtype", "merged",
                                                                           "verification")}
            if self.samples_dir:
                provenance["samples_dir"] = str(self._keep(out, job, provenance))
            load = {"prepared": prepared.how, "dtype": prepared.dtype, "notes": prepared.notes}
            return EngineRun(runs=runs, dtype=prepared.dtype, load=load, seconds=seconds, provenance=provenance)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _keep(self, out: Path, job: EvalJob, provenance: dict) -> Path:
        """Copy lm-eval's output to ``samples_dir/<label>`` with ``modelkit_run.json``."""
        from modelkit.bench.sample_logs import RUN_RECORD

        dest = Path(self.samples_dir).expanduser().absolute() / _safe(job.label)
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(out, dest)
        record = {"model": asdict(job), "engine": provenance, "fingerprint_checked": True}
        (dest / RUN_RECORD).write_text(json.dumps(record, indent=1, default=str) + "\n")
        return dest


def check_run(log: Any, prepared: Prepared, job: EvalJob, started: float) -> list[str]:
    """CompareError unless the logged run evaluated exactly the prepared folders, unchanged
    and matching ``job``'s fingerprints, without a response cache, written by this run."""
    from modelkit.io.sources import fingerprint_folder

    args = log.model.get("args") or {}
    where = log.path
    if _same_path(args.get("pretrained"), prepared.pretrained) is False:
        raise CompareError(f"lm-eval evaluated pretrained={args.get('pretrained')!r}, not the prepared "
                           f"{prepared.pretrained!r}: refusing to report it as the {job.role} model", where)
    if (args.get("peft") or None) != (prepared.peft or None) and _same_path(args.get("peft"), prepared.peft) is not True:
        raise CompareError(f"lm-eval evaluated peft={args.get('peft')!r}, not {prepared.peft!r}", where)
    if log.model.get("use_cache"):
        raise CompareError(f"the run used lm-eval's response cache ({log.model['use_cache']}), whose key ignores "
                           "the model: refusing its results", where)
    date = log.results.get("date")
    if isinstance(date, (int, float)) and date < started - 1:
        raise CompareError("the results file predates this run: refusing a stale result", where)
    for folder, fp in prepared.fingerprints.items():
        now = fingerprint_folder(Path(folder))
        if now != fp:
            raise CompareError(f"{folder} changed while lm-eval ran (fingerprint {now}, was {fp})", folder)
    checks = ["pretrained/peft of the run are the prepared folders", "no response cache",
              "results written by this run", "prepared folders unchanged during the run"]
    if prepared.how == "as-is":
        _expect(prepared.fingerprints[prepared.pretrained], job.artifact_fingerprint, job, "evaluated folder")
        checks.append(f"evaluated folder has the {job.role} model's fingerprint {job.artifact_fingerprint}")
    elif prepared.how == "peft":
        _expect(prepared.fingerprints[prepared.peft], job.artifact_fingerprint, job, "adapter")
        _expect(prepared.fingerprints[prepared.pretrained], job.base_fingerprint, job, "adapter's base")
        checks.append(f"adapter {job.artifact_fingerprint} on base {job.base_fingerprint} as identified")
    else:
        record = prepared.export or {}
        _expect(record.get("source", {}).get("fingerprint"), job.artifact_fingerprint, job, "export's source")
        checks.append(f"modelkit_export.json records source fingerprint {job.artifact_fingerprint}")
    if job.limit is not None and log.limit is not None and float(log.limit) != float(job.limit):
        raise CompareError(f"the run's limit {log.limit} is not the requested {job.limit}", where)
    return checks


def _expect(actual: Any, expected: Any, job: EvalJob, what: str) -> None:
    if actual != expected:
        raise CompareError(f"the {what} has fingerprint {actual}, not the {job.role} model's {expected}: "
                           "refusing to report this run for it")


def _same_path(a: Any, b: Any) -> bool | None:
    if a is None or b is None:
        return None if a is None and b is None else False
    try:
        return Path(str(a)).resolve() == Path(str(b)).resolve()
    except OSError:
        return str(a) == str(b)


def format_model_args(args: dict[str, Any]) -> str:
    """``key=value,...`` as lm-eval parses ``--model_args`` (values may not hold commas)."""
    parts = []
    for k, v in args.items():
        text = str(v).lower() if isinstance(v, bool) else str(v)
        if "," in text or "=" in str(k):
            raise CompareError(f"model argument {k}={text!r} cannot be passed to lm-eval (commas and '=' in "
                               "keys split --model_args); rename the path or value")
        parts.append(f"{k}={text}")
    return ",".join(parts)


def _include_path(paths: list[str], workdir: Path | None) -> str:
    """One ``--include_path`` for the shipped tasks plus the user's (the CLI takes one):
    the shipped folder alone, or a folder of links to each."""
    from modelkit.bench.tasks import TASKS_DIR

    if not paths:
        return str(TASKS_DIR)
    if workdir is None:          # a printed plan: the user's folder (copy the shipped tasks beside it)
        return str(paths[0])
    both = workdir / "tasks"
    both.mkdir()
    (both / "modelkit").symlink_to(TASKS_DIR, target_is_directory=True)
    for i, p in enumerate(paths):
        (both / f"include_{i}").symlink_to(Path(p).resolve(), target_is_directory=True)
    return str(both)


def _run(argv: list[str], log_file: Path, extra_env: dict[str, str] | None = None) -> None:
    """Run ``argv`` with its output in ``log_file``; CompareError with the tail on failure."""
    import subprocess

    env = {**os.environ, **(extra_env or {})}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    with open(log_file, "w") as f:
        proc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        tail = log_file.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        raise CompareError(f"lm-eval exited with status {proc.returncode}:\n  $ {shlex.join(argv)}\n"
                           + "\n".join("  | " + line for line in tail))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend_version(backend: str) -> str | None:
    import importlib.metadata

    name = {"hf": "transformers", "vllm": "vllm"}[backend]
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _verification_line(v: dict) -> str:
    from modelkit.ops.verify import Verification

    return Verification(**v).line()


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in label) or "model"
