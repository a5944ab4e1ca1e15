"""Weight-by-weight diff of two artifacts, in the standard on-disk key space.

Each side is seen through its format's view (:mod:`modelkit.formats.view`), after the merge or
materialization that view performs, so a DyLoRA-MoE expert, a PEFT adapter or a
compressed MoE compares directly against its base or its original dense model.

Streaming: one tensor pair at a time, reduced chunk by chunk in a working precision
(float32; float64 for float64 and integer tensors) by :mod:`modelkit.ops.diff_stats`. A
tensor stored as is in a safetensors file is read with plain file reads (no memory map);
a computed one (LoRA merge, compressed expert) comes from its view's producer, and the
files the producer memory-mapped are closed after every tensor. Peak memory is one
produced pair plus a few chunk buffers, whatever the checkpoint size.

Per tensor (see :data:`COLUMNS`): status, norms of A, B and B-A, relative change
``||B-A|| / ||A||``, cosine similarity, max abs difference, fraction of elements changed,
identical flag, non-finite counts, and with ``rank=True`` the effective rank of 2-D
deltas (:func:`effective_rank`). Non-finite values are counted; every statistic is then
taken over the positions finite on both sides (a changed NaN/inf still counts as changed).
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from modelkit import collector
from modelkit.errors import guarded
from modelkit.formats import Artifact
from modelkit.formats.view import TensorView
from modelkit.ops.diff_stats import (
    RANK_MAX_ELEMENTS,
    PairSums,
    Source,
    Workers,
    compare_pair,
    effective_rank,
    open_source,
    single_norm,
)
from modelkit.formats.open import open_artifact, open_base, split_facts
from modelkit.verdicts import Verdict, of_diff

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import torch
    from matplotlib.figure import Figure

STATUSES = ("compared", "dtype-changed", "shape-changed", "added", "removed", "unreadable")
COLUMNS = (
    "name", "status", "role", "layer", "expert", "module", "shape_a", "shape_b", "dtype_a",
    "dtype_b", "numel", "norm_a", "norm_b", "norm_diff", "rel_change", "cosine", "max_abs_diff",
    "changed", "frac_changed", "identical", "nonfinite_a", "nonfinite_b", "effective_rank",
    "numerical_rank", "note",
)
ROLE_ORDER = ("embedding", "attention", "mlp", "expert", "router", "norm", "lm_head", "lora", "other")
OVERLAP_WARNING = 0.5           # key sets sharing less than this fraction: "barely overlap"


# --------------------------------------------------------------------------- sides


@dataclass
class _Side:
    """One side of a diff: its view, the artifacts whose files it reads, facts to report."""

    view: TensorView
    artifacts: list[Artifact]
    info: dict[str, Any]


def _open_side(x: "str | Path | Artifact | TensorView", base: "str | Path | Artifact | None",
               options: Mapping[str, Any] | None) -> _Side:
    facts, options = split_facts(options)
    if isinstance(x, TensorView):
        return _Side(x, [], {"label": "<view>", "options": options,
                             "unplaced": [t.name for t in x.unplaced], "notes": list(x.notes)})
    base_ref = None if isinstance(base, Artifact) else base
    art = x if isinstance(x, Artifact) else open_artifact(x, base=base_ref, facts=facts)
    if facts and isinstance(x, Artifact):
        art.supply(**facts)
    if isinstance(base, Artifact):
        base_art = base
    elif base_ref is not None and isinstance(x, Artifact):
        base_art = open_artifact(base_ref)
    else:
        base_art = open_base(art)
    view = art.view(base_art, **options)
    label = str(x) if not isinstance(x, Artifact) else str(art.folder)
    if options:
        label += " [" + ", ".join(f"{k}={v}" for k, v in options.items()) + "]"
    info: dict[str, Any] = {"label": label, "folder": str(art.folder), "format": art.format,
                            "layout": art.layout, "options": options,
                            "base": str(base_art.folder) if base_art is not None else None,
                            "unplaced": [t.name for t in view.unplaced], "notes": list(view.notes),
                            "unreadable_files": [str(e) for a in (art, base_art) if a is not None
                                                 for e in a.file_errors]}
    return _Side(view, [a for a in (art, base_art) if a is not None], info)


def _model_type(art: Artifact) -> str | None:
    try:
        return getattr(art.config(), "model_type", None)
    except Exception:  # an unreadable or absent config only costs this hint
        return None


def _release(artifacts: Iterable[Artifact]) -> None:
    """Close every open file handle, unmapping the pages read so far (safetensors and
    torch pickles are memory-mapped; resident pages count until the mapping goes)."""
    for art in artifacts:
        art.release()


# --------------------------------------------------------------------------- per tensor


def _module(name: str) -> str:
    """The module a parameter belongs to: ``...experts.3.gate_proj.weight`` -> ``gate_proj``."""
    parts = name.split(".")
    for p in reversed(parts[:-1] if len(parts) > 1 else parts):
        if not p.isdigit():
            return p
    return name


def _row(name: str) -> dict[str, Any]:
    from modelkit.architecture.bridge import classify

    role = classify(name)
    row = dict.fromkeys(COLUMNS)
    row.update(name=name, role=role.role, layer=role.layer, expert=role.expert,
               module=_module(name), identical=False, nonfinite_a=0, nonfinite_b=0, note="")
    return row


def _fill_compared(row: dict, acc: PairSums, numel: int) -> None:
    na, nb, nd = math.sqrt(acc.sq_a), math.sqrt(acc.sq_b), math.sqrt(acc.sq_d)
    if na > 0:
        rel = nd / na
    else:
        rel = 0.0 if nd == 0 else math.inf
    if acc.sq_d == 0.0:
        cos = 1.0  # equal values (not 1 - epsilon from rounding)
    elif na > 0 and nb > 0:
        cos = max(-1.0, min(1.0, acc.dot / (na * nb)))
    else:
        cos = 1.0 if na == nb == 0 else None
    row.update(numel=numel, norm_a=na, norm_b=nb, norm_diff=nd, rel_change=rel, cosine=cos,
               max_abs_diff=acc.max_abs, changed=acc.changed,
               frac_changed=acc.changed / numel if numel else 0.0,
               nonfinite_a=acc.nonfinite_a, nonfinite_b=acc.nonfinite_b)
    row["identical"] = row["status"] == "compared" and acc.changed == 0


def _diff_tensor(name: str, a: Any, b: Any, workers: Workers,
                 rank: bool) -> dict[str, Any]:
    """One row: ``a``/``b`` are LazyTensors (or None when absent on that side). Whatever
    fails while producing or reading (corrupt shard, a merge that does not fit) becomes
    an ``unreadable`` row naming the side and the error."""
    from modelkit.io.tensors import dtype_name

    row = _row(name)
    side = "a"
    try:
        src = {}
        for side, lazy in (("a", a), ("b", b)):
            if lazy is not None:
                src[side] = open_source(lazy)
                row[f"shape_{side}"] = list(src[side].shape)
                row[f"dtype_{side}"] = dtype_name(src[side].dtype)
        side = "a and b"
        _fill_row(row, src, workers)
    except Exception as e:  # reported in the result, never raised from deep inside torch
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        row.update(status="unreadable", identical=False,
                   note=f"{side.upper() if len(side) == 1 else side}: {type(e).__name__}: {first}")
        return row
    if rank and row["changed"] and len(src["a"].shape) == 2:
        _add_rank(row, src, a, b)
    return row


def _fill_row(row: dict[str, Any], src: dict[str, Source], workers: Workers) -> None:
    if len(src) == 1:
        side = next(iter(src))
        norm, bad = single_norm(src[side], workers)
        row.update(status="added" if side == "b" else "removed", numel=src[side].numel,
                   **{f"norm_{side}": norm, f"nonfinite_{side}": bad})
        return
    sa, sb = src["a"], src["b"]
    if sa.shape != sb.shape:
        (na, ba), (nb, bb) = single_norm(sa, workers), single_norm(sb, workers)
        row.update(status="shape-changed", norm_a=na, norm_b=nb, nonfinite_a=ba, nonfinite_b=bb,
                   note=f"{list(sa.shape)} -> {list(sb.shape)}")
        return
    row["status"] = "compared" if sa.dtype == sb.dtype else "dtype-changed"
    if row["status"] == "dtype-changed":
        row["note"] = f"{row['dtype_a']} -> {row['dtype_b']}"
    _fill_compared(row, compare_pair(sa, sb, workers), sa.numel)


def _add_rank(row: dict[str, Any], src: dict[str, Source], a: Any, b: Any) -> None:
    """The delta's effective rank (whole tensors in memory: only up to RANK_MAX_ELEMENTS)."""
    numel = src["a"].numel
    if numel > RANK_MAX_ELEMENTS:
        note = f"rank skipped: {numel:,} elements > RANK_MAX_ELEMENTS"
    else:
        try:
            ta, tb = (s.tensor if s.tensor is not None else lazy.produce()
                      for s, lazy in ((src["a"], a), (src["b"], b)))
            row["effective_rank"], row["numerical_rank"] = effective_rank(tb.float() - ta.float())
            return
        except Exception as e:  # e.g. an SVD that does not converge: the other numbers stand
            note = f"rank not estimated: {type(e).__name__}: {e}"
    row["note"] = f"{row['note']}; {note}" if row["note"] else note


# --------------------------------------------------------------------------- the result


def _natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _aggregate(frame: "pd.DataFrame", keys: list[str]) -> "pd.DataFrame":
    """Pooled statistics per group: relative change ``sqrt(sum ||B-A||^2) / sqrt(sum ||A||^2)``
    over the group's compared tensors, their max, and counts of each status."""
    import numpy as np
    import pandas as pd

    cols = ["tensors", "compared", "changed", "added", "removed", "shape_changed", "dtype_changed",
            "unreadable", "numel", "rel_change", "max_rel_change", "cosine", "max_abs_diff",
            "frac_changed", "nonfinite"]
    if frame.empty:
        return pd.DataFrame(columns=[*keys, *cols]).set_index(keys)
    rows = []
    for key, g in frame.groupby(keys, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        c = g[g.status.isin(["compared", "dtype-changed"])]
        sq_a = float((c.norm_a.astype(float) ** 2).sum())
        sq_b = float((c.norm_b.astype(float) ** 2).sum())
        sq_d = float((c.norm_diff.astype(float) ** 2).sum())
        dot = float((c.cosine.astype(float).fillna(0.0) * c.norm_a.astype(float)
                     * c.norm_b.astype(float)).sum())
        numel = int(c.numel.sum()) if len(c) else 0
        rel = (math.sqrt(sq_d / sq_a) if sq_a > 0 else (0.0 if sq_d == 0 else math.inf)) if len(c) else np.nan
        rows.append({
            **{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in zip(keys, key)},
            "tensors": len(g), "compared": len(c),
            "changed": int((c.changed.fillna(0) > 0).sum()),   # values differ (as DiffResult.changed)
            "added": int((g.status == "added").sum()), "removed": int((g.status == "removed").sum()),
            "shape_changed": int((g.status == "shape-changed").sum()),
            "dtype_changed": int((g.status == "dtype-changed").sum()),
            "unreadable": int((g.status == "unreadable").sum()), "numel": numel,
            "rel_change": rel,
            "max_rel_change": float(c.rel_change.astype(float).max()) if len(c) else np.nan,
            "cosine": dot / math.sqrt(sq_a * sq_b) if sq_a > 0 and sq_b > 0 else np.nan,
            "max_abs_diff": float(c.max_abs_diff.astype(float).max()) if len(c) else np.nan,
            "frac_changed": float(c.changed.sum()) / numel if numel else np.nan,
            "nonfinite": int(g.nonfinite_a.sum() + g.nonfinite_b.sum()),
        })
    out = pd.DataFrame(rows, columns=[*keys, *cols])
    for k in keys:
        if k in ("layer", "expert"):
            out[k] = out[k].astype("Int64")
    return out.set_index(keys)


def _json_safe(x: Any) -> Any:
    """Non-finite floats become None (strict JSON); numpy scalars become Python ones."""
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        try:
            x = x.item()
        except (ValueError, AttributeError):
            pass
    if isinstance(x, float) and not math.isfinite(x):
        return None
    try:
        import pandas as pd

        if x is pd.NA:
            return None
    except ImportError:  # pragma: no cover
        pass
    return x


def _fmt(x: Any, spec: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return format(x, spec)


@dataclass
class DiffResult:
    """What :func:`diff` found: one row per tensor name in either side (``rows``)."""

    a: dict[str, Any]
    b: dict[str, Any]
    rows: list[dict[str, Any]]
    warnings: list[str] = field(default_factory=list)   # what may make the comparison misleading
    rank: bool = False
    seconds: float = 0.0
    bytes_read: int = 0
    parts: dict[str, "DiffResult"] = field(default_factory=dict)  # a mixture: one diff per expert

    # -- verdict ----------------------------------------------------------------------
    def count(self, status: str) -> int:
        return sum(r["status"] == status for r in (self.all_rows() if self.parts else self.rows))

    def all_rows(self) -> list[dict[str, Any]]:
        """Every row: a mixture's per-expert rows (``expert`` set to the part's expert), then
        its own rows (the router)."""
        out = []
        for label, part in self.parts.items():
            k = _part_expert(label)
            out += [{**r, "expert": k if k is not None else r["expert"]} for r in part.rows]
        return out + list(self.rows)

    @property
    def changed(self) -> list[str]:
        """Names whose values differ (compared or dtype-changed with a non-zero change);
        for a mixture ``expert_K:name``."""
        if self.parts:
            return [f"{label}:{n}" for label, part in self.parts.items() for n in part.changed]
        return [r["name"] for r in self.rows
                if r["status"] in ("compared", "dtype-changed") and r["changed"]]

    @property
    def unreadable(self) -> int:
        """Tensors and files that could not be read (either side)."""
        if self.parts:
            return sum(p.unreadable for p in self.parts.values()) + sum(
                r["status"] == "unreadable" for r in self.rows)
        return self.count("unreadable") + sum(len(s.get("unreadable_files") or []) for s in (self.a, self.b))

    @property
    def identical(self) -> bool:
        """Same names, shapes, dtypes and values on both sides (NaN equals NaN), every file
        read, and something compared. A mixture: every expert's view equals the other side
        (its router, which the other side lacks, cannot make it differ)."""
        if self.parts:
            return all(_part_status(p) == "unchanged" for p in self.parts.values())
        return bool(self.rows) and not self.unreadable and all(r["identical"] for r in self.rows)

    @property
    def verdict(self) -> str:
        """``identical``, ``different``, or ``incomplete`` (no difference seen, but nothing
        compared or something unreadable)."""
        if self.identical:
            return "identical"
        if self.parts:
            return ("different" if any(_part_status(p) == "changed" for p in self.parts.values())
                    else "incomplete")
        if all(r["identical"] or r["status"] == "unreadable" for r in self.rows):
            return "incomplete"
        return "different"

    def outcome(self) -> Verdict:
        """The verdict every view opens with (the rule: :func:`modelkit.verdicts.of_diff`)."""
        return of_diff(self)

    def by_expert(self) -> "pd.DataFrame":
        """A mixture: one row per expert (its dense view against the other side) plus the
        router; empty for a plain diff."""
        import pandas as pd

        rows = []
        for label, part in self.parts.items():
            both = [r for r in part.rows if r["status"] in ("compared", "dtype-changed")]
            rows.append({"part": label, "verdict": _part_status(part), "tensors": len(part.rows),
                         "changed": len(part.changed),
                         "rel_change": part.overall_rel_change if both else math.nan})
        for r in self.rows:
            status = (("changed" if r["changed"] else "unchanged")
                      if r["status"] in ("compared", "dtype-changed") else r["status"])
            rows.append({"part": r["name"], "verdict": status, "tensors": 1,
                         "changed": int(bool(r["changed"])) if r["changed"] is not None else 0,
                         "rel_change": r["rel_change"] if r["rel_change"] is not None else math.nan})
        if self.parts and not any(r["role"] == "router" for r in self.rows):
            rows.append({"part": "router", "verdict": "not stored", "tensors": 0, "changed": 0,
                         "rel_change": math.nan})   # neither side has one: say so, do not leave it out
        return pd.DataFrame(rows, columns=["part", "verdict", "tensors", "changed", "rel_change"])

    @property
    def overall_rel_change(self) -> float:
        """``sqrt(sum ||B-A||^2) / sqrt(sum ||A||^2)`` over every compared tensor."""
        agg = _aggregate(self.to_frame().assign(all=""), ["all"])
        return float(agg.rel_change.iloc[0]) if len(agg) else math.nan

    # -- tables -----------------------------------------------------------------------
    def to_frame(self) -> "pd.DataFrame":
        """One row per tensor (columns :data:`COLUMNS`), in natural name order; a mixture's
        rows for every expert (``expert`` = the expert the row's view merged)."""
        import pandas as pd

        frame = pd.DataFrame(self.all_rows() if self.parts else self.rows, columns=list(COLUMNS))
        for col in ("layer", "expert", "numel", "changed", "numerical_rank"):
            frame[col] = frame[col].astype("Int64")
        for col in ("norm_a", "norm_b", "norm_diff", "rel_change", "cosine", "max_abs_diff",
                    "frac_changed", "effective_rank"):
            frame[col] = frame[col].astype(float)
        return frame

    def by_layer(self) -> "pd.DataFrame":
        """Pooled change per decoder layer (``<NA>``: tensors outside the layers)."""
        return _aggregate(self.to_frame(), ["layer"])

    def by_role(self) -> "pd.DataFrame":
        """Pooled change per role (embedding, attention, mlp, expert, router, norm, ...)."""
        return _aggregate(self.to_frame(), ["role"])

    def by_projection(self, role: str | None = "expert") -> "pd.DataFrame":
        """Pooled change per (layer, module) among ``role`` tensors (all when None).

        For a compressed MoE against its original model this is the reconstruction error
        of each layer's ``gate_proj`` / ``up_proj`` / ``down_proj`` over its experts:
        ``sqrt(sum_e ||W_e' - W_e||^2) / sqrt(sum_e ||W_e||^2)``.
        """
        frame = self.to_frame()
        if role is not None:
            frame = frame[frame.role == role]
        return _aggregate(frame, ["layer", "module"])

    def layer_role_matrix(self) -> "pd.DataFrame":
        """Pooled relative change, layers x roles (the heatmap's data); NaN: no such tensors."""
        import pandas as pd

        agg = _aggregate(self.to_frame(), ["layer", "role"])
        if agg.empty:
            return pd.DataFrame()
        matrix = agg["rel_change"].unstack("role")
        layers = sorted(matrix.index, key=lambda x: (pd.isna(x), 0 if pd.isna(x) else x))
        roles = sorted(matrix.columns, key=lambda r: ROLE_ORDER.index(r) if r in ROLE_ORDER else len(ROLE_ORDER))
        return matrix.loc[layers, roles]

    # -- output -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        def records(df):
            return df.reset_index().to_dict(orient="records")

        return _json_safe({
            "verdict": self.verdict, "identical": self.identical, "a": self.a, "b": self.b,
            "counts": {s: self.count(s) for s in STATUSES} | {"changed": len(self.changed),
                                                               "tensors": len(self.rows)},
            "overall_rel_change": self.overall_rel_change, "warnings": self.warnings,
            "rank": self.rank, "seconds": self.seconds, "bytes_read": self.bytes_read,
            "tensors": self.to_frame().to_dict(orient="records"),
            "by_layer": records(self.by_layer()), "by_role": records(self.by_role()),
            "by_projection": records(self.by_projection()),
            "by_expert": self.by_expert().to_dict(orient="records"),
        })

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), allow_nan=False, **kw)

    def summary(self, top: int = 10) -> str:
        """Readable text, leading with the verdict (what the CLI prints)."""
        if self.parts:
            return self._mixture_summary(top)
        n = len(self.rows)
        both = [r for r in self.rows if r["status"] in ("compared", "dtype-changed")]
        lines = []
        if self.verdict == "identical":
            lines.append(f"IDENTICAL: all {n} tensors have the same names, shapes, dtypes and values")
        elif self.verdict == "incomplete":
            lines.append(f"INCOMPLETE: no difference found in {n} tensors, but "
                         + (f"{self.unreadable} tensor(s) or file(s) could not be read"
                            if self.unreadable else "there was nothing to compare"))
        else:
            parts = [f"{len(self.changed)} of {len(both)} shared tensors changed"]
            parts += [f"{self.count(s)} {s}" for s in ("added", "removed", "shape-changed",
                                                       "dtype-changed", "unreadable") if self.count(s)]
            lines.append("DIFFERENT: " + ", ".join(parts))
        for tag, side in (("A", self.a), ("B", self.b)):
            desc = ", ".join(str(x) for x in (side.get("format"), side.get("layout"),
                                              side.get("model_type")) if x)
            lines.append(f"  {tag}  {side['label']}" + (f"  ({desc})" if desc else "")
                         + (f"  on base {side['base']}" if side.get("base") else ""))
        if both:
            lines.append(f"  overall relative change ||B-A||/||A|| = {_fmt(self.overall_rel_change)} "
                         f"over {len(both)} shared tensors ({self.seconds:.1f} s, "
                         f"{self.bytes_read / 1e9:.2f} GB read)")
        lines += [f"  WARNING {w}" for w in self.warnings]
        lines += [f"  NOTE {tag}: {note}" for tag, side in (("A", self.a), ("B", self.b))
                  for note in side.get("notes") or []]
        if self.identical and (self.a.get("base") or self.b.get("base")):
            which = "B" if self.b.get("base") else "A"
            side = self.b if which == "B" else self.a
            lines.append(f"  NOTE {which} is a {side.get('format')} artifact applied to its base, yet its "
                         "weights equal the other side's: whatever it stores changes nothing "
                         "(dropped, empty or untrained adapters?)")
        if not self.identical:
            lines += self._tables(top)
        return "\n".join(lines)

    def _mixture_summary(self, top: int) -> str:
        n = len(self.parts)
        moving = [label for label, p in self.parts.items() if _part_status(p) == "changed"]
        if self.verdict == "identical":
            head = (f"IDENTICAL: none of the {n} experts changes anything: each expert's dense view equals "
                    "the other side (empty, dropped or untrained experts); the mixture is that model")
        elif self.verdict == "incomplete":
            head = f"INCOMPLETE: no expert differs, but {self.unreadable} tensor(s) or file(s) could not be read"
        else:
            head = f"DIFFERENT: {len(moving)} of {n} experts differ ({', '.join(moving)})"
        lines = [head + "; a routed mixture is diffed per expert (one dense view each), plus the router"]
        for tag, side in (("A", self.a), ("B", self.b)):
            desc = ", ".join(str(x) for x in (side.get("format"), side.get("layout")) if x)
            lines.append(f"  {tag}  {side['label']}" + (f"  ({desc})" if desc else ""))
        lines += ["", f"    {'part':<22}{'verdict':>12}{'tensors':>9}{'changed':>9}{'rel_change':>12}"]
        for r in self.by_expert().itertuples():
            lines.append(f"    {r.part:<22}{r.verdict:>12}{r.tensors:>9}{r.changed:>9}{_fmt(r.rel_change):>12}")
        lines += [f"  WARNING {w}" for w in self.warnings]
        for label, part in self.parts.items():
            if _part_status(part) != "unchanged":
                lines += ["", f"  -- {label} --"] + part._tables(top)
        return "\n".join(lines)

    def _tables(self, top: int) -> list[str]:
        import pandas as pd

        frame = self.to_frame()
        lines = []
        role = self.by_role()
        role = role[(role.changed > 0) | (role.tensors > role.compared)]
        if len(role):
            lines += ["", "  by role (pooled ||B-A||/||A|| over compared tensors):",
                      f"    {'role':<10}{'tensors':>8}{'changed':>8}{'uncompared':>11}{'rel_change':>12}{'cosine':>10}"]
            for g in role.itertuples():
                lines.append(f"    {g.Index:<10}{g.tensors:>8}{g.changed:>8}{g.tensors - g.compared:>11}"
                             f"{_fmt(g.rel_change):>12}{_fmt(g.cosine, '.6f'):>10}")
        experts = self.by_projection("expert")
        if len(experts) and (experts.changed > 0).any():
            pivot = experts["rel_change"].unstack("module")
            lines += ["", "  experts, relative change per layer and projection "
                      "(reconstruction error for a compressed MoE):",
                      "    layer " + "".join(f"{c:>12}" for c in pivot.columns)]
            for layer, r in pivot.iterrows():
                lines.append(f"    {'-' if pd.isna(layer) else layer!s:<6}" + "".join(f"{_fmt(v):>12}" for v in r))
        layers = self.by_layer()
        layers = layers[layers.changed > 0]
        if len(layers):
            cells = [f"{'-' if pd.isna(layer) else layer}: {_fmt(g.rel_change)}"
                     for layer, g in zip(layers.index, layers.itertuples())]
            lines += ["", "  by layer, pooled relative change (changed layers; '-': outside the layers):"]
            lines += ["    " + "  ".join(cells[i:i + 8]) for i in range(0, len(cells), 8)]
        changed = frame[frame.status.isin(["compared", "dtype-changed"]) & (frame.changed > 0)]
        if len(changed):
            changed = changed.sort_values("rel_change", ascending=False).head(top)
            lines += ["", f"  most changed tensors (top {len(changed)}):",
                      f"    {'rel_change':>10}{'cosine':>10}{'frac':>7}{'max_abs':>10}"
                      + ("  rank" if self.rank else "") + "  name"]
            for _, r in changed.iterrows():
                rk = f"  {_fmt(r.effective_rank, '.1f'):>4}" if self.rank else ""
                lines.append(f"    {_fmt(r.rel_change):>10}{_fmt(r.cosine, '.6f'):>10}"
                             f"{_fmt(r.frac_changed, '.2f'):>7}{_fmt(r.max_abs_diff):>10}{rk}  {r['name']}")
        for status in ("added", "removed", "shape-changed", "dtype-changed", "unreadable"):
            names = frame[frame.status == status]
            if len(names):
                shown = [f"{r['name']}" + (f" ({r.note})" if r.note else "")
                         for _, r in names.head(top).iterrows()]
                more = f" (+{len(names) - top} more)" if len(names) > top else ""
                lines += ["", f"  {status} ({len(names)}): " + "; ".join(shown) + more]
        return lines

    def plot(self, path: str | Path | None = None) -> "Figure":
        """A layer x role heatmap of relative change beside the most-changed tensors;
        saved to ``path`` when given (format from the suffix)."""
        from modelkit.present.figures import diff_figure

        frame = self.to_frame()
        top = frame[frame.status.isin(["compared", "dtype-changed"]) & (frame.changed > 0)]
        top = top.sort_values("rel_change", ascending=False).head(20)
        title = f"{self.verdict.upper()}: A = {self.a['label']}  vs  B = {self.b['label']}"
        fig = diff_figure(self.layer_role_matrix(), top[["name", "rel_change"]], title)
        if path is not None:
            fig.savefig(path, dpi=110, bbox_inches="tight")
        return fig

    def _repr_html_(self) -> str:  # notebooks: the summary, preformatted
        import html

        return f"<pre>{html.escape(self.summary())}</pre>"


# --------------------------------------------------------------------------- diff


@guarded()
def diff(a: "str | Path | Artifact | TensorView", b: "str | Path | Artifact | TensorView",
         base_a: "str | Path | Artifact | None" = None, base_b: "str | Path | Artifact | None" = None,
         options_a: Mapping[str, Any] | None = None, options_b: Mapping[str, Any] | None = None,
         rank: bool = False, progress: bool = True, threads: int | None = None) -> DiffResult:
    """Compare ``a`` and ``b`` weight by weight in the standard on-disk key space.

    ``a``/``b``: refs (folder, ``wandb:``, ``hf:``), opened Artifacts or TensorViews.
    ``base_*`` override each side's base model; ``options_*`` go to each side's
    ``view()`` (e.g. ``{"expert": 1}`` for a DyLoRA-MoE expert). ``rank=True`` adds an
    effective-rank estimate of each changed 2-D delta (see :func:`effective_rank`).
    ``threads``: reduction threads (default: torch's intra-op thread count, at most
    ``pairstats.MAX_THREADS``).
    Streams one tensor pair at a time; a tensor that cannot be read becomes an
    ``unreadable`` row, non-finite values are counted, never raised.
    """
    with collector.paused():  # a full collection (torch's 170k objects) costs 0.1 s of CPU
        return _diff(a, b, base_a, base_b, options_a, options_b, rank, progress, threads)


def _diff(a, b, base_a, base_b, options_a, options_b, rank: bool, progress: bool, threads: int | None) -> DiffResult:
    from modelkit.progress import phase
    from modelkit.units import human_bytes

    side_a = _open_side(a, base_a, options_a)
    side_b = _open_side(b, base_b, options_b)
    if _variants(side_a, options_a) or _variants(side_b, options_b):
        return _diff_mixture(a, b, base_a, base_b, options_a, options_b, side_a, side_b,
                             rank=rank, progress=progress, threads=threads)
    va, vb = side_a.view, side_b.view
    names = list(va) + [n for n in vb if n not in va.tensors]
    twins = _tied_twins(side_a, side_b)
    warnings = _warnings(side_a, side_b)
    total = sum(_nbytes(v[n]) for v in (va, vb) for n in v)
    workers = Workers(threads)
    rows = []
    start = time.perf_counter()
    try:
        with phase("diff", total=len(names), unit="tensors", show=progress) as bar:
            done = 0
            for name in names:
                la, lb = va.tensors.get(name), vb.tensors.get(name)
                twin = twins.get(name)
                if twin is not None:  # a stored copy of a tensor the other side ties
                    la, lb = (la, vb.tensors[twin[1]]) if twin[0] == "b" else (va.tensors[twin[1]], lb)
                row = _diff_tensor(name, la, lb, workers, rank)
                if twin is not None:
                    row["note"] = (f"{twin[0].upper()} ties {name} to {twin[1]}: compared with it "
                                   + ("(a tied duplicate)" if row["status"] in ("compared", "dtype-changed") and not row["changed"]
                                      else "(NOT equal: not a tied duplicate)"))
                rows.append(row)
                _release(side_a.artifacts + side_b.artifacts)
                done += sum(_nbytes(x) for x in (la, lb) if x is not None)
                bar.update(1, note=f"{human_bytes(done)} of {human_bytes(total)} read")
    finally:
        workers.close()
    seconds = time.perf_counter() - start
    rows.sort(key=lambda r: _natural_key(r["name"]))
    bad = [r["name"] for r in rows if r["nonfinite_a"] or r["nonfinite_b"]]
    if bad:
        na = sum(r["nonfinite_a"] for r in rows)
        nb = sum(r["nonfinite_b"] for r in rows)
        warnings.append(f"non-finite values (NaN/inf): {na:,} in A, {nb:,} in B, in {len(bad)} "
                        f"tensor(s): {_names(bad)}; statistics use the finite positions")
    return DiffResult(side_a.info, side_b.info, rows, warnings, rank, seconds, total)


def _variants(side: _Side, options: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The parts a mixture side is diffed by (none when view options pick one already)."""
    if split_facts(options)[1] or not side.artifacts:
        return {}
    return side.artifacts[0].variants()


def _part_status(part: DiffResult) -> str:
    """One expert of a mixture: ``changed`` (some value differs), ``unchanged`` (every value
    equal: the expert is the other side; a merge held in float32 over a bf16 base still
    counts as unchanged when its values are), or ``incomplete`` (something unreadable)."""
    if part.changed:
        return "changed"
    if part.unreadable or any(r["status"] in ("shape-changed", "added", "removed") for r in part.rows):
        return "incomplete" if part.unreadable else "changed"
    return "unchanged"


def _part_expert(label: str) -> int | None:
    m = re.match(r"^expert_(\d+)$", label)
    return int(m.group(1)) if m else None


def _diff_mixture(a, b, base_a, base_b, options_a, options_b, side_a: _Side, side_b: _Side,
                  **kw: Any) -> DiffResult:
    """A routed mixture against anything: one diff per expert (its dense view), plus rows for
    the tensors no view places (the router). Two mixtures pair expert K with expert K."""
    va, vb = _variants(side_a, options_a), _variants(side_b, options_b)
    labels = list(vb or va) if not (va and vb) else [k for k in va if k in vb]
    if va and vb and set(va) != set(vb):
        from modelkit.errors import LoadError

        raise LoadError(f"the two mixtures have different experts ({sorted(va)} vs {sorted(vb)}); "
                        "pick one of each with options_a / options_b (e.g. expert=0)")
    start = time.perf_counter()
    parts = {}
    for label in labels:
        oa = {**dict(options_a or {}), **va[label]} if va else options_a
        ob = {**dict(options_b or {}), **vb[label]} if vb else options_b
        parts[label] = diff(a, b, base_a, base_b, oa, ob, **kw)
    ua = side_a.artifacts[0].unviewed() if va else {}
    ub = side_b.artifacts[0].unviewed() if vb else {}
    workers = Workers(kw.get("threads"))
    try:
        rows = [_diff_tensor(n, ua.get(n), ub.get(n), workers, False)
                for n in list(ua) + [n for n in ub if n not in ua]]
    finally:
        workers.close()
    first = next(iter(parts.values()), None)
    warnings = sorted({w for p in parts.values() for w in p.warnings})
    for tag, variants, unviewed in (("A", va, ua), ("B", vb, ub)):
        if variants and not unviewed:
            warnings.append(f"{tag} is a mixture without a stored router: which expert handles a sequence "
                            "is not recorded (see inspect: missing-router)")
    info_a, info_b = (first.a, first.b) if first is not None else (side_a.info, side_b.info)
    return DiffResult(side_a.info if va else info_a, side_b.info if vb else info_b, rows, warnings,
                      kw.get("rank", False), time.perf_counter() - start,
                      sum(p.bytes_read for p in parts.values()), parts)


def _tied_twins(a: _Side, b: _Side) -> dict[str, tuple[str, str]]:
    """Names stored on one side only that the other side's architecture ties to a tensor it
    has (a stored ``lm_head.weight`` against a tied base): name -> (side holding the source,
    source name). Compared with that source, so a copy equal to it is no added tensor."""
    out = {}
    for mine, other, tag in ((a, b, "b"), (b, a, "a")):
        extra = [n for n in mine.view if n not in other.view.tensors]
        if not extra or not other.artifacts:
            continue
        try:
            from modelkit.architecture.bridge import tied_tensors

            tied = tied_tensors(other.artifacts[0].config())
        except Exception:  # no config to tell: the name stays added / removed
            continue
        for n in extra:
            if n in tied and tied[n] in other.view.tensors:
                out[n] = (tag, tied[n])
    return out


def _nbytes(lazy: Any) -> int:
    from modelkit.io.tensors import DTYPE_BYTES

    return lazy.numel * DTYPE_BYTES.get(lazy.dtype, 4)


def _names(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def _warnings(a: _Side, b: _Side) -> list[str]:
    """Mismatched architectures and tensors a view could not place, before reading data."""
    out = []
    na, nb = set(a.view), set(b.view)
    union = na | nb
    common = na & nb
    if union and len(common) < OVERLAP_WARNING * len(union):
        types = ""
        for side in (a, b):
            side.info["model_type"] = _model_type(side.artifacts[0]) if side.artifacts else None
        ta, tb = a.info["model_type"], b.info["model_type"]
        if ta and tb and ta != tb:
            types = f" (A is {ta}, B is {tb})"
        out.append(f"the key sets barely overlap: {len(common)} of {len(union)} names in common "
                   f"(A {len(na)}, B {len(nb)}): different architectures{types}?")
    for tag, side in (("A", a), ("B", b)):
        unplaced = side.info.get("unplaced") or []
        if unplaced:
            out.append(f"{tag} stores {len(unplaced)} tensor(s) its view cannot place (a loader "
                       f"drops them, so they change nothing): {_names(unplaced)}")
        out += [f"{tag}: unreadable file {e}; its tensors are missing from the view"
                for e in side.info.get("unreadable_files") or []]
    return out
