"""lm-eval plumbing for ``compare``: find tasks by name, hash their configs and data,
check their data offline, and run one loaded model in process, keeping every per-sample
score as plain JSON (so paired statistics can be computed later, from a cache).

Only shipped tasks (plus ``include_path``) are indexed with
``TaskManager(include_path=..., include_defaults=False)``; lm-eval's own index, which
costs seconds to build, is read only when a name is not found there.
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import importlib.metadata
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from modelkit.bench.tasks import TASKS_DIR
from modelkit.errors import CompareError, ModelkitError

STDERR_BOOTSTRAP_ITERS = 1000   # lm-eval's bootstrap stderr (median, perplexity, ...); 100000 by default
EXCERPT_CHARS = 300
_QUIET = ("lm_eval", "lm-eval", "datasets", "transformers", "accelerate", "evaluate")


def lm_eval_version() -> str:
    return importlib.metadata.version("lm_eval")


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """Silence lm-eval / datasets / transformers log chatter (warnings stay for errors)."""
    saved = {}
    for name in _QUIET:
        logger = logging.getLogger(name)
        saved[name] = logger.level
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


# --------------------------------------------------------------------------- tasks


@dataclass
class TaskCatalog:
    """Task names resolved against an lm-eval TaskManager, with their config hashes."""

    manager: Any
    names: list[str]
    include_path: list[str]
    defaults: bool                                  # lm-eval's own tasks indexed too
    hashes: dict[str, str] = field(default_factory=dict)
    _built: dict[str, dict] = field(default_factory=dict, repr=False)

    def build(self, names: list[str] | None = None) -> dict[str, dict]:
        """``TaskManager.load`` each name (this reads its data): ``{name: task dict}``.
        A task whose data cannot be read offline is a CompareError naming it."""
        for name in names if names is not None else self.names:
            if name in self._built:
                continue
            try:
                with quiet_logs():
                    self._built[name] = self.manager.load([name])
            except ModelkitError:       # a task's own loader refusing its data (e.g. a code self-check)
                raise
            except Exception as e:  # datasets / lm-eval raise many types for missing data
                raise CompareError(
                    f"task {name!r} cannot be prepared: its data are not available offline or "
                    f"its config is broken ({type(e).__name__}: {_first_line(e)}). modelkit never "
                    "downloads; put the dataset in the local Hugging Face cache, or use a task "
                    "with local data files (see modelkit.bench.tasks)") from None
        return {n: self._built[n] for n in (names if names is not None else self.names)}


def find_tasks(names: list[str], include_path: str | Path | list | None = None) -> TaskCatalog:
    """Resolve ``names`` (shipped tasks, ``include_path`` YAMLs, then lm-eval's own).
    Unknown names are a CompareError listing close matches."""
    paths = [str(TASKS_DIR)]
    for p in ([] if include_path is None else include_path if isinstance(include_path, (list, tuple)) else [include_path]):
        folder = Path(p).expanduser()
        if not folder.exists():
            raise CompareError("include path does not exist", folder)
        paths.append(str(folder.resolve()))
    manager = _manager(tuple(paths), False, _signature(paths[1:]))
    defaults = False
    if any(n not in manager.task_index for n in names):
        manager = _manager(tuple(paths), True, _signature(paths[1:]))
        defaults = True
    unknown = [n for n in names if n not in manager.task_index]
    if unknown:
        lines = []
        for n in unknown:
            close = difflib.get_close_matches(n, manager.all_tasks, n=5, cutoff=0.6)
            lines.append(f"  {n!r}: " + (f"did you mean {', '.join(close)}?" if close else "no close match"))
        raise CompareError("unknown lm-eval task name(s):\n" + "\n".join(lines) +
                           "\nList tasks with `lm-eval ls tasks`; shipped with modelkit: " +
                           ", ".join(_shipped()))
    catalog = TaskCatalog(manager, list(names), paths[1:], defaults)
    catalog.hashes = {n: config_hash(manager, n) for n in names}
    return catalog


def _shipped() -> list[str]:
    from modelkit.bench.tasks import shipped_task_names

    return shipped_task_names()


@functools.lru_cache(maxsize=8)
def _manager(paths: tuple[str, ...], defaults: bool, signature: str):
    """A TaskManager, reused while the include paths' YAML files are unchanged."""
    with quiet_logs():
        from lm_eval.tasks import TaskManager

        return TaskManager(include_path=list(paths), include_defaults=defaults)


def _signature(paths: list[str]) -> str:
    """Names, sizes and mtimes of the YAML files under ``paths`` (index cache key)."""
    h = hashlib.sha256()
    for root in paths:
        for p in sorted(Path(root).rglob("*.y*ml")):
            st = p.stat()
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()


def config_hash(manager: Any, name: str) -> str:
    """Hash of a task's resolved YAML config, the local files it reads (data files,
    ``!function`` modules), and, for groups and tags, of every member."""
    h = hashlib.sha256()
    _feed_task(manager, name, h, set())
    return h.hexdigest()[:16]


def _feed_task(manager: Any, name: str, h: "hashlib._Hash", seen: set[str]) -> None:
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    if name in seen:
        return
    seen.add(name)
    entry = manager.task_index.get(name)
    h.update(f"task\0{name}\0{entry.kind.name if entry else 'missing'}\0".encode())
    if entry is None:
        return
    if entry.kind == Kind.TAG:
        for child in sorted(n for n, e in manager.task_index.items() if name in (e.tags or ())):
            _feed_task(manager, child, h, seen)
        return
    if entry.yaml_path is None:
        h.update(json.dumps(entry.cfg, sort_keys=True, default=str).encode())
        return
    cfg = load_yaml(entry.yaml_path, resolve_func=False, recursive=True)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for path in _local_files(cfg, Path(entry.yaml_path).parent):
        h.update(f"file\0{path.name}\0".encode())
        h.update(_file_digest(path).encode())
    if entry.kind == Kind.GROUP:
        for child in cfg.get("task") or []:
            ref = child if isinstance(child, str) else child.get("task") if isinstance(child, dict) else None
            if isinstance(ref, str) and ref in manager.task_index:
                _feed_task(manager, ref, h, seen)


def _local_files(cfg: dict, base_dir: Path) -> list[Path]:
    """Local files a task config reads: data files, a local dataset path, function modules."""
    found: list[Path] = []
    kwargs = cfg.get("dataset_kwargs") or {}
    data_files = kwargs.get("data_files") if isinstance(kwargs, dict) else None
    for rel in _strings(data_files):
        for cand in (Path(rel), base_dir / rel):
            if cand.is_file():
                found.append(cand)
                break
    dpath = cfg.get("dataset_path")
    if isinstance(dpath, str) and (Path(dpath).is_dir() or Path(dpath).is_file()):
        p = Path(dpath)
        found += sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    for text in _strings(cfg):
        # unresolved `!function utils.fn` reads as "<yaml dir>/utils.fn"
        module = Path(text.rsplit(".", 1)[0] + ".py") if "/" in text and "." in text else None
        if module is not None and module.is_file():
            found.append(module)
    return sorted(set(found))


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def _file_digest(path: Path, whole_below: int = 64 << 20) -> str:
    """sha256 of the file (of size + first and last 1 MiB above ``whole_below`` bytes)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= whole_below:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(str(size).encode())
            h.update(f.read(1 << 20))
            f.seek(size - (1 << 20))
            h.update(f.read(1 << 20))
    return h.hexdigest()


# --------------------------------------------------------------------------- running


def evaluate(model: Any, tokenizer: Any, catalog: TaskCatalog, names: list[str], *, limit: int | float | None,
             num_fewshot: int | None, batch_size: int) -> dict[str, dict]:
    """Evaluate a loaded model on ``names`` in process: ``{task name: run}``, where a run
    is JSON-able (per-sample scores included, see :func:`_leaf_run`)."""
    from lm_eval import simple_evaluate

    from modelkit.bench.context_fit import check_generation_room, truncated_requests
    from modelkit.progress import phase

    built = catalog.build(names)
    with quiet_logs(), phase("lm-eval", unit="batches", show=False) as bar:
        lm = stepwise_hflm()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        lm.on_batch = lambda: bar.update(1)      # a panel's Cancel stops lm-eval between two batches
        check_generation_room(lm, {leaf: t for loaded in built.values() for leaf, t in loaded["tasks"].items()})
        objects: list[Any] = []
        for name, loaded in built.items():
            objects += _top_level(name, loaded)
        results = simple_evaluate(model=lm, tasks=objects, task_manager=catalog.manager, limit=limit,
                                  num_fewshot=num_fewshot, log_samples=True,
                                  bootstrap_iters=STDERR_BOOTSTRAP_ITERS)
    if results is None:
        raise CompareError("lm-eval returned no results (not rank 0 of a distributed run)")
    runs = runs_from(built, results)
    for run in runs.values():  # what lm-eval cut from the left to fit the model's context
        for leaf, r in run["leaves"].items():
            r["context"] = truncated_requests(lm, results.get("samples", {}).get(leaf, []), r["output_type"])
    return runs


@functools.lru_cache(maxsize=None)
def stepwise_hflm() -> type:
    """lm-eval's HFLM with a hook, ``on_batch()``, called before every batch it sends
    through the model (loglikelihood and generation alike). :func:`evaluate` makes each
    batch a progress step, so a Cancel (:func:`modelkit.progress.check_cancelled`) stops
    an evaluation between two batches; lm-eval itself has no such hook.

    It also keeps, for each (context, continuation) pair lm-eval encodes for a
    log-likelihood request, how many tokens the pair came to (``pair_tokens``): the
    truncation check (:func:`~modelkit.bench.context_fit.truncated_requests`) reads lm-eval's
    own encoding instead of encoding every request a second time."""
    from lm_eval.models.huggingface import HFLM

    class StepwiseHFLM(HFLM):
        def on_batch(self) -> None:
            pass

        def _encode_pair(self, context: str, continuation: str) -> Any:
            encoded = super()._encode_pair(context, continuation)
            self.__dict__.setdefault("pair_tokens", {})[(context, continuation)] = len(encoded[0]) + len(encoded[1])
            return encoded

        def _model_call(self, *args: Any, **kwargs: Any) -> Any:
            self.on_batch()
            return super()._model_call(*args, **kwargs)

        def _model_generate(self, *args: Any, **kwargs: Any) -> Any:
            self.on_batch()
            return super()._model_generate(*args, **kwargs)

    return StepwiseHFLM


def runs_from(built: dict[str, dict], results: dict) -> dict[str, dict]:
    """``{task name: run}`` from lm-eval results (``simple_evaluate``'s, or a
    ``--log_samples`` folder read back) for the tasks ``built`` by a TaskCatalog."""
    runs = {}
    for name, loaded in built.items():
        leaves = {leaf: _leaf_run(leaf, task, results) for leaf, task in loaded["tasks"].items()}
        groups = {g: {"metrics": _metric_values(results["results"].get(g, {}),
                                                results.get("higher_is_better", {}).get(g, {}))}
                  for g in loaded.get("groups", {})}
        runs[name] = {"task": name, "leaves": leaves, "groups": groups}
    return runs


def _top_level(name: str, loaded: dict) -> list[Any]:
    if name in loaded.get("groups", {}):
        return [loaded["groups"][name]]
    if name in loaded["tasks"]:
        return [loaded["tasks"][name]]
    return list(loaded["tasks"].values())      # a tag: its tasks


def _metric_values(row: dict, hib: dict) -> dict[str, dict]:
    out = {}
    for key, value in row.items():
        if "," not in key:
            continue
        metric, filt = key.split(",", 1)
        if metric.endswith("_stderr"):
            continue
        out[key] = {"metric": metric, "filter": filt, "value": _number(value),
                    "stderr": _number(row.get(f"{metric}_stderr,{filt}")),
                    "higher_is_better": hib.get(metric)}
    return out


def _leaf_run(leaf: str, task: Any, results: dict) -> dict:
    """One leaf task's run from an lm-eval task object and ``simple_evaluate``'s results."""
    aggregations = task.aggregation() if hasattr(task, "aggregation") else {}
    output_type = getattr(task, "OUTPUT_TYPE", None) or task.config.output_type
    names = {metric: _aggregation_name(fn) for metric, fn in aggregations.items()}
    return leaf_run(leaf, results.get("samples", {}).get(leaf, []), results, names, output_type)


def leaf_run(leaf: str, samples: list[dict], results: dict, aggregations: dict[str, str | None],
             output_type: str) -> dict:
    """One leaf task's aggregate metrics, per-sample scores (aligned with ``doc_ids``) and
    a short excerpt of each document (prompt, target, response, log-likelihoods, doc hash)
    for disagreements. ``samples`` are lm-eval's per-sample records (in process, or read
    back from ``--log_samples`` files by :mod:`modelkit.bench.sample_logs`); ``aggregations``
    the registered lm-eval aggregation name of each metric."""
    samples = sorted(samples, key=lambda s: s["doc_id"])
    hib = results.get("higher_is_better", {}).get(leaf, {})
    metrics = _metric_values(results["results"].get(leaf, {}), hib)
    doc_ids = sorted({s["doc_id"] for s in samples})
    for key, m in metrics.items():
        per_doc = {s["doc_id"]: _jsonable(s.get(m["metric"])) for s in samples if s.get("filter") == m["filter"]}
        m["samples"] = [per_doc.get(d) for d in doc_ids]
        m["aggregation"] = aggregations.get(m["metric"])
    docs, seen = [], set()
    for s in samples:
        if s["doc_id"] in seen:
            continue
        seen.add(s["doc_id"])
        docs.append(_excerpt(s, output_type))
    return {"task": leaf, "output_type": output_type, "n": len(doc_ids),
            "n_shot": results.get("n-shot", {}).get(leaf), "doc_ids": doc_ids, "metrics": metrics, "docs": docs}


def _aggregation_name(fn: Any) -> str | None:
    """The registered lm-eval name of an aggregation function (None for custom ones)."""
    if fn is None:
        return None
    from lm_eval.api.registry import get_aggregation

    name = getattr(fn, "__name__", None)
    with quiet_logs():
        return name if name and get_aggregation(name) is fn else None


def _excerpt(sample: dict, output_type: str) -> dict:
    args = sample.get("arguments") or []
    prompt = str(args[0][0]) if args and isinstance(args[0], (list, tuple)) and args[0] else ""
    target, response = sample.get("target"), ""
    resps = sample.get("filtered_resps")
    if output_type == "multiple_choice":
        choices = [str(a[1]).strip() for a in args if isinstance(a, (list, tuple)) and len(a) > 1]
        if isinstance(target, int) and 0 <= target < len(choices):
            target = choices[target]
        try:
            lls = [float(r[0]) if isinstance(r, (list, tuple)) else float(r) for r in resps]
            response = choices[max(range(len(lls)), key=lls.__getitem__)]
        except (TypeError, ValueError, IndexError):
            response = ""
    elif output_type == "generate_until" and resps:
        response = str(resps[0] if isinstance(resps, list) else resps)
    elif output_type == "loglikelihood" and resps:
        r = resps[0] if isinstance(resps, list) else resps
        response = f"loglikelihood {float(r[0]):.3f}, greedy {bool(r[1])}" if isinstance(r, (list, tuple)) else str(r)
    out = {"doc_id": sample["doc_id"], "prompt": _clip(prompt), "target": _clip(str(target)),
           "response": _clip(response)}
    lls = _loglikelihoods(resps, output_type)
    if lls is not None:
        out["loglikelihoods"] = lls
    if sample.get("doc_hash"):
        out["doc_hash"] = sample["doc_hash"]
    return out


def _loglikelihoods(resps: Any, output_type: str) -> list[float] | None:
    """The per-request log-likelihoods of a log-likelihood task's sample (None otherwise)."""
    if output_type not in ("multiple_choice", "loglikelihood", "loglikelihood_rolling") or not resps:
        return None
    try:
        return [float(r[0]) if isinstance(r, (list, tuple)) else float(r) for r in resps]
    except (TypeError, ValueError, IndexError):
        return None


def _clip(text: str, n: int = EXCERPT_CHARS) -> str:
    """The last ``n`` characters (few-shot prompts end with the question)."""
    return text if len(text) <= n else "…" + text[-(n - 1):]


def _number(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool):
        return float(value)
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""
