"""Per-sample logs produced anywhere, read back into the runs ``compare`` pairs.

Four producers are understood:

* lm-eval ``--log_samples`` output: a folder holding ``results_<time>.json`` and one
  ``samples_<task>_<time>.jsonl`` per leaf task (lm-eval writes them under
  ``<output_path>/<model name>/``), or that results file itself;
* EvalPlus ``*eval_results.json`` (``{"hash", "eval": {task_id: [per-sample status]}}``):
  pass@1 per problem, on the base tests and on base + extra tests;
* ``modelkit grade --json`` reports: pass@1 per problem (a report with harness errors
  is refused: those samples were not graded);
* the folder ``modelkit compare --engine lm-eval --samples-dir`` keeps: lm-eval's own
  output plus ``modelkit_run.json``, the engine's provenance (what was evaluated, its
  fingerprint, the exact command).

A :class:`SampleLog` carries the runs in the structure :func:`modelkit.bench.evaluation.evaluate`
returns in process (so :mod:`modelkit.bench.paired_stats` applies unchanged), plus what two logs must
share to be paired: per-document hashes, each task's config (hashed without the model
arguments lm-eval copies into its metadata) and the limit.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelkit.errors import CompareError

RUN_RECORD = "modelkit_run.json"
_RESULTS = re.compile(r"^results_(?P<stamp>.+)\.json$")
_LL_TYPES = ("multiple_choice", "loglikelihood", "loglikelihood_rolling")
_MODEL_METADATA = ("version",)     # the only metadata keys that belong to the task, not the model
EVALPLUS_PASS = "pass"


@dataclass
class SampleLog:
    """One model's per-sample results on some tasks, read from a log."""

    path: str                                   # the file or folder read
    kind: str                                   # "lm-eval" or "evalplus"
    model: dict[str, Any]                       # name, args, fingerprint (None: not checked), record
    leaves: dict[str, dict]                     # leaf task -> leaf run (evaluation.leaf_run)
    groups: dict[str, dict] = field(default_factory=dict)        # group -> {"metrics": ...}
    group_members: dict[str, list[str]] = field(default_factory=dict)
    config_hashes: dict[str, str] = field(default_factory=dict)  # leaf -> task config hash
    limit: Any = None
    engine_version: str | None = None
    results: dict[str, Any] = field(default_factory=dict, repr=False)   # lm-eval's results JSON
    samples: dict[str, list[dict]] = field(default_factory=dict, repr=False)

    @property
    def label(self) -> str:
        """modelkit's label of the model when recorded, else the evaluated folder's name
        (the adapter's for ``peft=``), else the log's."""
        if self.model.get("label"):
            return str(self.model["label"])
        args = self.model.get("args") or {}
        name = args.get("peft") or args.get("pretrained") or self.model.get("name")
        return Path(str(name)).name if name else Path(self.path).stem

    def runs(self) -> dict[str, dict]:
        """``{top-level task: run}``: each outermost group with its leaves, each leaf alone."""
        inner = {m for members in self.group_members.values() for m in members}
        runs: dict[str, dict] = {}
        for group in self.group_members:
            if group in inner:
                continue
            leaves = _leaves_under(group, self.group_members)
            runs[group] = {"task": group, "leaves": {n: self.leaves[n] for n in leaves if n in self.leaves},
                           "groups": {g: self.groups[g] for g in [group, *_groups_under(group, self.group_members)]
                                      if g in self.groups}}
        for leaf, run in self.leaves.items():
            if leaf not in inner:
                runs[leaf] = {"task": leaf, "leaves": {leaf: run}, "groups": {}}
        return runs


# --------------------------------------------------------------------------- reading


def read_samples(path: str | Path) -> SampleLog:
    """Read a per-sample log of any known producer (see module docstring)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CompareError("no such samples file or folder", p)
    if p.is_file() and p.suffix == ".json" and not _RESULTS.match(p.name):
        data = _json(p)
        if isinstance(data, dict) and isinstance(data.get("eval"), dict):
            return read_evalplus(p, data)
        if isinstance(data, dict) and isinstance(data.get("results"), list) and "pass_at_1" in data:
            return read_grade_report(p, data)
    return read_lm_eval(p)


def find_results(path: Path) -> Path:
    """The one lm-eval ``results_*.json`` in ``path`` (a folder, searched recursively, or
    the file). Several runs in one folder are refused: pairing must not guess."""
    if path.is_file():
        if not _RESULTS.match(path.name):
            raise CompareError("not an lm-eval results_<time>.json file", path)
        return path
    found = sorted(q for q in path.rglob("results_*.json") if _RESULTS.match(q.name))
    if not found:
        raise CompareError("no lm-eval results_*.json here: pass the --output_path folder of an "
                           "lm-eval run made with --log_samples (or an EvalPlus eval_results.json)", path)
    if len(found) > 1:
        listed = ", ".join(str(q.relative_to(path)) for q in found[:4])
        raise CompareError(f"{len(found)} lm-eval runs here ({listed}{' ...' if len(found) > 4 else ''}); "
                           "pass the results_<time>.json of the one to compare", path)
    return found[0]


def read_lm_eval(path: str | Path) -> SampleLog:
    """An lm-eval ``--log_samples`` run: results, per-sample records, model identity."""
    from modelkit.bench.evaluation import _metric_values, leaf_run

    results_file = find_results(Path(path).expanduser())
    results = _json(results_file)
    if not isinstance(results, dict) or not isinstance(results.get("results"), dict) \
            or not isinstance(results.get("configs"), dict):
        raise CompareError("not an lm-eval results file (no 'results' and 'configs')", results_file)
    stamp = _RESULTS.match(results_file.name)["stamp"]
    configs: dict[str, dict] = results["configs"]
    samples: dict[str, list[dict]] = {}
    for leaf in configs:
        f = results_file.parent / f"samples_{leaf}_{stamp}.jsonl"
        if not f.is_file():
            raise CompareError(f"no per-sample file for task {leaf!r} ({f.name}): the run was made without "
                               "--log_samples, or the folder is incomplete", results_file.parent)
        samples[leaf] = [_normalized(s, configs[leaf].get("output_type")) for s in _jsonl(f)]
    results_like = {**results, "samples": samples}
    leaves = {}
    for leaf, cfg in configs.items():
        leaves[leaf] = leaf_run(leaf, samples[leaf], results_like, _aggregations(cfg), cfg.get("output_type"))
    members = {g: list(m) for g, m in (results.get("group_subtasks") or {}).items() if m}
    groups = {g: {"metrics": _metric_values(results["results"].get(g, {}),
                                            results.get("higher_is_better", {}).get(g, {}))}
              for g in members}
    config = results.get("config") or {}
    log = SampleLog(path=str(results_file), kind="lm-eval", model=_lm_eval_model(results_file, results),
                    leaves=leaves, groups=groups, group_members=members,
                    config_hashes={leaf: _config_hash(cfg, results, leaf) for leaf, cfg in configs.items()},
                    limit=config.get("limit"), engine_version=results.get("lm_eval_version"),
                    results=results, samples=samples)
    return log


def _normalized(sample: dict, output_type: str | None) -> dict:
    """A logged sample in the shape ``simple_evaluate`` returns it in process: arguments
    as tuples, log-likelihood responses as numbers (lm-eval writes them as strings)."""
    s = dict(sample)
    args = s.get("arguments")
    if isinstance(args, dict):   # {"gen_args_0": {"arg_0": ..., "arg_1": ...}, ...}
        s["arguments"] = [tuple(v[k] for k in sorted(v, key=_index)) if isinstance(v, dict) else v
                          for _, v in sorted(args.items(), key=lambda kv: _index(kv[0]))]
    if output_type in _LL_TYPES:
        for key in ("resps", "filtered_resps"):
            if key in s:
                s[key] = _numbers(s[key])
    return s


def _index(name: str) -> int:
    digits = re.findall(r"\d+", name)
    return int(digits[-1]) if digits else 0


def _numbers(value: Any) -> Any:
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    if value in ("True", "False"):
        return value == "True"
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _aggregations(cfg: dict) -> dict[str, str | None]:
    """Each metric's registered aggregation name from a task config's ``metric_list``
    (lm-eval's default aggregation of the metric when the config names none)."""
    from modelkit.bench.evaluation import _aggregation_name, quiet_logs

    out: dict[str, str | None] = {}
    for entry in cfg.get("metric_list") or []:
        if not isinstance(entry, dict) or "metric" not in entry:
            continue
        agg = entry.get("aggregation")
        out[str(entry["metric"])] = agg if isinstance(agg, str) and _registered(agg) else None
    if out:
        return out
    try:
        from lm_eval.api.registry import DEFAULT_METRIC_REGISTRY, get_metric_aggregation

        with quiet_logs():
            for metric in DEFAULT_METRIC_REGISTRY.get(cfg.get("output_type"), []):
                out[metric] = _aggregation_name(get_metric_aggregation(metric))
    except (ImportError, KeyError, AttributeError):
        pass
    return out


def _registered(name: str) -> bool:
    from modelkit.bench.evaluation import quiet_logs

    try:
        from lm_eval.api.registry import get_aggregation

        with quiet_logs():
            return get_aggregation(name) is not None
    except Exception:  # lm-eval raises KeyError or returns None, by version
        return False


def _config_hash(cfg: dict, results: dict, leaf: str) -> str:
    """A task's identity: its logged config without the model arguments lm-eval copies into
    ``metadata`` (and without where the YAML lay), plus its version and few-shot count."""
    clean = dict(cfg)
    meta = clean.get("metadata")
    if isinstance(meta, dict):
        clean["metadata"] = {k: v for k, v in meta.items() if k in _MODEL_METADATA}
    ident = {"config": clean, "version": (results.get("versions") or {}).get(leaf),
             "n_shot": (results.get("n-shot") or {}).get(leaf)}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _lm_eval_model(results_file: Path, results: dict) -> dict[str, Any]:
    """What model the run evaluated, as lm-eval recorded it; with modelkit's own record
    (``modelkit_run.json`` beside the run, or ``modelkit_export.json`` in the evaluated
    folder) when there is one."""
    config = results.get("config") or {}
    args = config.get("model_args")
    if isinstance(args, str):
        args = dict(kv.split("=", 1) for kv in args.split(",") if "=" in kv)
    args = dict(args or {})
    model: dict[str, Any] = {"name": results.get("model_name") or args.get("pretrained"), "backend": config.get("model"),
                             "args": args, "fingerprint": None, "fingerprint_checked": False,
                             "use_cache": config.get("use_cache")}
    for folder in (results_file.parent, results_file.parent.parent):
        record = folder / RUN_RECORD
        if record.is_file():
            data = _json(record)
            if isinstance(data, dict) and isinstance(data.get("model"), dict):
                model.update({"label": data["model"].get("label"), "ref": data["model"].get("ref"),
                              "role": data["model"].get("role"),
                              "fingerprint": data["model"].get("fingerprint"),
                              "artifact_fingerprint": data["model"].get("artifact_fingerprint"),
                              "base_fingerprint": data["model"].get("base_fingerprint"),
                              "fingerprint_checked": bool(data.get("fingerprint_checked")),
                              "engine": data.get("engine"), "record": str(record)})
                return model
    pretrained = args.get("pretrained")
    candidates = [Path(str(pretrained))] if pretrained else []
    candidates += [results_file.parent, results_file.parent.parent]   # a copy kept beside the log
    export = next((c / "modelkit_export.json" for c in candidates if (c / "modelkit_export.json").is_file()), None)
    if export is not None:
        data = _json(export)
        source = data.get("source", {}) if isinstance(data, dict) else {}
        model.update({"ref": source.get("ref"), "artifact_fingerprint": source.get("fingerprint"),
                      "fingerprint": source.get("fingerprint"), "record": str(export)})
    return model


# --------------------------------------------------------------------------- EvalPlus


def read_evalplus(path: Path, data: dict | None = None) -> SampleLog:
    """EvalPlus ``eval_results.json``: per problem, the fraction of its samples passing
    (pass@1), on the base tests (``evalplus_base``) and base + extra tests (``evalplus_plus``)."""
    data = _json(path) if data is None else data
    evals = data.get("eval")
    if not isinstance(evals, dict) or not evals:
        raise CompareError("not an EvalPlus result file (no 'eval' mapping of problems)", path)
    ids = sorted(evals)
    base, plus, docs = [], [], []
    for tid in ids:
        rows = evals[tid]
        if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
            raise CompareError(f"EvalPlus problem {tid!r} has no per-sample results", path)
        base.append(sum(r.get("base_status") == EVALPLUS_PASS for r in rows) / len(rows))
        has_plus = any(r.get("plus_status") is not None for r in rows)
        plus.append(sum(r.get("base_status") == r.get("plus_status") == EVALPLUS_PASS for r in rows) / len(rows)
                    if has_plus else None)
        solution = str(rows[0].get("solution", ""))
        docs.append({"doc_id": tid, "prompt": "", "target": "", "response": solution[-300:],
                     "doc_hash": hashlib.sha256(tid.encode()).hexdigest()})
    leaves = {}
    for name, values in (("evalplus_base", base), ("evalplus_plus", plus)):
        if all(v is None for v in values):
            continue
        kept = [v for v in values if v is not None]
        mean = sum(kept) / len(kept)
        leaves[name] = {"task": name, "output_type": "generate_until", "n": len(ids), "n_shot": 0, "doc_ids": ids,
                        "metrics": {"pass@1,none": {"metric": "pass@1", "filter": "none", "value": mean,
                                                    "stderr": None, "higher_is_better": True,
                                                    "samples": values, "aggregation": "mean"}},
                        "docs": docs}
    n_samples = sorted({len(evals[t]) for t in ids})
    ident = hashlib.sha256(json.dumps({"hash": data.get("hash"), "n_samples": n_samples}).encode()).hexdigest()[:16]
    return SampleLog(path=str(path), kind="evalplus", model={"name": path.stem, "fingerprint": None,
                                                             "fingerprint_checked": False},
                     leaves=leaves, config_hashes={n: ident for n in leaves}, limit=None,
                     engine_version=None, results=data)


# --------------------------------------------------------------------------- modelkit grade


def read_grade_report(path: Path, data: dict | None = None) -> SampleLog:
    """``modelkit grade --json`` output: per problem, the fraction of its samples passing
    (pass@1). A report with harness errors is refused (those samples were not graded)."""
    data = _json(path) if data is None else data
    rows = data.get("results")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) and "task_id" in r for r in rows):
        raise CompareError("not a modelkit grade report (no per-sample 'results')", path)
    if not data.get("complete", True) or any(r.get("status") == "error" for r in rows):
        raise CompareError("the grade report is incomplete: the harness failed on some samples, which were "
                           "not graded; grade them again before comparing", path)
    by_task: dict[str, list[bool]] = {}
    for r in rows:
        by_task.setdefault(str(r["task_id"]), []).append(r.get("status") == "pass")
    ids = sorted(by_task)
    name = "grade_" + Path(str(data.get("problems") or "problems")).name.split(".")[0]
    values = [sum(v) / len(v) for v in (by_task[t] for t in ids)]
    docs = [{"doc_id": t, "prompt": "", "target": "", "response": "", "doc_hash": hashlib.sha256(t.encode()).hexdigest()}
            for t in ids]
    leaf = {"task": name, "output_type": "generate_until", "n": len(ids), "n_shot": 0, "doc_ids": ids,
            "metrics": {"pass@1,none": {"metric": "pass@1", "filter": "none", "value": sum(values) / len(values),
                                        "stderr": None, "higher_is_better": True, "samples": values,
                                        "aggregation": "mean"}},
            "docs": docs}
    ident = {"problems": Path(str(data.get("problems"))).name, "limits": data.get("limits"),
             "samples_per_task": sorted({len(v) for v in by_task.values()})}
    config = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return SampleLog(path=str(path), kind="modelkit-grade",
                     model={"name": Path(str(data.get("samples") or path)).stem, "fingerprint": None,
                            "fingerprint_checked": False},
                     leaves={name: leaf}, config_hashes={name: config}, limit=None, results=data)


# --------------------------------------------------------------------------- pairing


def check_pairable(base: SampleLog, trained: SampleLog) -> None:
    """CompareError unless the two logs scored the same documents of the same task
    configs under the same limit (and are not one model's run twice)."""
    where = f"{base.path} vs {trained.path}"
    if base.kind != trained.kind:
        raise CompareError(f"cannot pair a {base.kind} log with a {trained.kind} log ({where})")
    if Path(base.path).resolve() == Path(trained.path).resolve():
        raise CompareError("refusing to compare a log with itself", base.path)
    b_fp, t_fp = base.model.get("fingerprint"), trained.model.get("fingerprint")
    if b_fp and t_fp and b_fp == t_fp:
        raise CompareError(f"refusing to compare a model with itself: both logs evaluated fingerprint {b_fp} "
                           f"({where})")
    b_args, t_args = base.model.get("args"), trained.model.get("args")
    if b_args and b_args == t_args and not (b_fp and t_fp):
        raise CompareError(f"refusing to compare a model with itself: both logs evaluated the same model "
                           f"arguments {b_args} ({where})")
    if base.limit != trained.limit:
        raise CompareError(f"the logs were made with different limits ({base.limit} vs {trained.limit}): "
                           f"their documents are not the same ({where})")
    missing = sorted(set(base.leaves) ^ set(trained.leaves))
    if missing:
        raise CompareError(f"the logs cover different tasks (only in one: {', '.join(missing)}) ({where})")
    for leaf, b_run in base.leaves.items():
        t_run = trained.leaves[leaf]
        if base.config_hashes.get(leaf) != trained.config_hashes.get(leaf):
            raise CompareError(f"task {leaf!r} was run with different configs (config hash "
                               f"{base.config_hashes.get(leaf)} vs {trained.config_hashes.get(leaf)}) ({where})")
        b_docs = {d["doc_id"]: d.get("doc_hash") for d in b_run["docs"]}
        t_docs = {d["doc_id"]: d.get("doc_hash") for d in t_run["docs"]}
        if set(b_docs) != set(t_docs):
            only = sorted(set(b_docs) ^ set(t_docs))
            raise CompareError(f"task {leaf!r}: the logs scored different documents ({len(b_docs)} vs "
                               f"{len(t_docs)}; e.g. doc_id {only[:5]} only in one) ({where})")
        changed = [d for d in b_docs if b_docs[d] != t_docs[d]]
        if changed:
            raise CompareError(f"task {leaf!r}: {len(changed)} document(s) differ between the logs under the same "
                               f"doc_id (doc_hash), e.g. {changed[:5]} ({where})")


# --------------------------------------------------------------------------- helpers


def _leaves_under(group: str, members: dict[str, list[str]]) -> list[str]:
    out = []
    for m in members.get(group, []):
        out += _leaves_under(m, members) if m in members else [m]
    return out


def _groups_under(group: str, members: dict[str, list[str]]) -> list[str]:
    out = []
    for m in members.get(group, []):
        if m in members:
            out += [m, *_groups_under(m, members)]
    return out


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CompareError(f"cannot read JSON ({type(e).__name__}: {str(e)[:200]})", path) from None


def _jsonl(path: Path) -> list[dict]:
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict) or "doc_id" not in row:
                        raise ValueError(f"line {n} is not a sample record")
                    rows.append(row)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CompareError(f"cannot read per-sample records ({type(e).__name__}: {str(e)[:200]})", path) from None
    return rows
