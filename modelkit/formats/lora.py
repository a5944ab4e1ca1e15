"""LoRA adapters as data: their key names, scaling, and the merge into base tensors.

Shared by the PEFT LoRA and DyLoRA-MoE formats. PEFT stores an adapted module ``M`` as
``base_model.model.M.lora_A.weight`` ``[r, in]`` and ``base_model.model.M.lora_B.weight``
``[out, r]``, without the adapter name. Merged, ``M.weight`` becomes
``W + scaling * B @ A`` with ``scaling = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA),
transposed for ``fan_in_fan_out`` (GPT-2 ``Conv1D``) and for embeddings
(``lora_embedding_A [r, vocab]``, ``lora_embedding_B [dim, r]``). DoRA's magnitude vector
``m`` rescales each output row: ``m / ||W + delta||_row * (W + delta)``.

Nothing here reads tensor data until a producer runs.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from modelkit.errors import LoadError, MissingFactError
from modelkit.formats.view import LazyTensor
from modelkit.io.tensors import StoredTensor

PEFT_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+?)\.(?P<part>lora_(?:A|B|embedding_A|embedding_B|magnitude_vector))"
                  r"(?:\.(?P<rest>.+))?$")
_EMBEDDING_PARTS = ("lora_embedding_A", "lora_embedding_B")


@dataclass(frozen=True)
class LoraKey:
    """A LoRA tensor name taken apart."""

    module: str                 # the adapted module, e.g. ``model.layers.0.self_attn.q_proj``
    part: str                   # lora_A, lora_B, lora_embedding_A/B or lora_magnitude_vector
    param: str                  # "weight", "bias", or "" (embedding and DoRA parts are bare in PEFT files)
    adapters: tuple[str, ...]   # adapter names inside the key (none in a PEFT file)


def parse_lora_key(name: str) -> LoraKey | None:
    """``model.layers.0.self_attn.q_proj.lora_A.expert_1.weight`` ->
    ``LoraKey(module=..., part="lora_A", param="weight", adapters=("expert_1",))``;
    None for a name that is not a LoRA tensor."""
    m = _KEY.match(name)
    if m is None:
        return None
    rest = m["rest"].split(".") if m["rest"] else []
    param = ""
    if m["part"] not in _EMBEDDING_PARTS and rest and rest[-1] in ("weight", "bias"):
        param = rest.pop()
    return LoraKey(m["module"], m["part"], param, tuple(rest))


def strip_prefix(name: str, *prefixes: str) -> str:
    """``name`` without each of ``prefixes`` in turn (each only when present)."""
    for p in prefixes:
        if name.startswith(p):
            name = name[len(p):]
    return name


def base_layer_name(name: str) -> str:
    """PEFT's wrapped weight ``q_proj.base_layer.weight`` -> the plain ``q_proj.weight``."""
    return name.replace(".base_layer.", ".")


@dataclass
class LoraModule:
    """The stored tensors of one adapted module."""

    module: str
    A: StoredTensor | None = None
    B: StoredTensor | None = None
    bias: StoredTensor | None = None        # lora_B.bias (PEFT ``lora_bias=True``)
    magnitude: StoredTensor | None = None   # DoRA's magnitude vector
    embedding: bool = False                 # lora_embedding_A/B of an nn.Embedding

    @property
    def rank(self) -> int | None:
        """The rank the stored A matrix has (None without A)."""
        return self.A.shape[0] if self.A is not None and self.A.shape else None

    @property
    def leaf(self) -> str:
        """``model.layers.0.self_attn.q_proj`` -> ``q_proj``."""
        return self.module.rsplit(".", 1)[-1]

    @property
    def stored(self) -> list[StoredTensor]:
        return [t for t in (self.A, self.B, self.bias, self.magnitude) if t is not None]

    def peft_names(self) -> dict[str, StoredTensor]:
        """PEFT file names (``base_model.model.M.lora_A.weight``...) of the stored tensors."""
        p = f"{PEFT_PREFIX}{self.module}."
        a, b = ("lora_embedding_A", "lora_embedding_B") if self.embedding else ("lora_A.weight", "lora_B.weight")
        names = {p + a: self.A, p + b: self.B, p + "lora_B.bias": self.bias,
                 p + "lora_magnitude_vector": self.magnitude}  # PEFT writes DoRA's as a bare name
        return {n: t for n, t in names.items() if t is not None}


@dataclass
class LoraAdapter:
    """One LoRA adapter: its settings and its modules, readable on demand.

    ``r`` and ``alpha`` are the recorded values (None when the artifact records none);
    ``rank_pattern`` / ``alpha_pattern`` override them per module as in PEFT.
    """

    name: str
    modules: dict[str, LoraModule]
    read: Callable[[StoredTensor], LazyTensor] = field(repr=False)
    r: int | None = None
    alpha: float | None = None
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    target_modules: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    replaced: dict[str, StoredTensor] = field(default_factory=dict)  # base name -> whole tensor (modules_to_save)
    unplaced: list[StoredTensor] = field(default_factory=list)       # names no loader can place
    files: list[str] = field(default_factory=list)

    # -- settings ---------------------------------------------------------------------
    def rank_of(self, module: str) -> int | None:
        """The rank PEFT gives ``module``: rank_pattern, else ``r``, else the stored A's."""
        key = _pattern_key(self.rank_pattern, module)
        if key is not None:
            return int(self.rank_pattern[key])
        if self.r is not None:
            return int(self.r)
        m = self.modules.get(module)
        return m.rank if m is not None else None

    def alpha_of(self, module: str) -> float | None:
        key = _pattern_key(self.alpha_pattern, module)
        return float(self.alpha_pattern[key]) if key is not None else self.alpha

    def scaling_of(self, module: str) -> float:
        """``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA) for ``module``; LoadError
        when the artifact records no alpha (the merge would be a guess)."""
        alpha, r = self.alpha_of(module), self.rank_of(module)
        if alpha is None:
            raise MissingFactError(f"{self.name}: lora_alpha is recorded nowhere in the artifact, so "
                            "the merge scale alpha/r is unknown; give it (lora_alpha=<value>, --lora-alpha)")
        if not r:
            raise LoadError(f"{self.name}: no rank for {module} (no lora_A, no r in the config)")
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    @property
    def scaling(self) -> float | None:
        """The scaling shared by every module, or None when unknown or not uniform."""
        try:
            values = {self.scaling_of(m) for m in self.modules}
        except LoadError:
            return None
        return values.pop() if len(values) == 1 else None

    @property
    def ranks(self) -> list[int]:
        """Distinct ranks of the stored A matrices."""
        return sorted({m.rank for m in self.modules.values() if m.rank is not None})

    @property
    def targets(self) -> list[str]:
        """Module leaf names adapted (``q_proj``...), as recorded or else as found."""
        if isinstance(self.target_modules, (list, tuple, set)) and self.target_modules:
            return sorted(self.target_modules)
        return sorted({m.leaf for m in self.modules.values()})

    # -- tensors ----------------------------------------------------------------------
    def tensors(self) -> dict[str, LazyTensor]:
        """The adapter's tensors in PEFT file naming (no adapter name), lazily read; load
        them with ``peft.set_peft_model_state_dict(model, ..., adapter_name=...)``."""
        out = {}
        for m in self.modules.values():
            for name, t in m.peft_names().items():
                out[name] = self.read(t)
        for name, t in self.replaced.items():
            out[PEFT_PREFIX + name] = self.read(t)
        return out

    def state_dict(self) -> dict[str, Any]:
        """:meth:`tensors`, produced (reads the data)."""
        return {n: t.produce() for n, t in self.tensors().items()}

    def peft_config(self) -> dict[str, Any]:
        """Keyword arguments for ``peft.LoraConfig`` describing this adapter."""
        cfg: dict[str, Any] = {
            "r": self.r if self.r is not None else (self.ranks[0] if len(self.ranks) == 1 else 8),
            "target_modules": self.target_modules or self.targets,
            "use_rslora": self.use_rslora, "fan_in_fan_out": self.fan_in_fan_out,
        }
        if self.alpha is not None:
            cfg["lora_alpha"] = self.alpha
        if self.rank_pattern:
            cfg["rank_pattern"] = dict(self.rank_pattern)
        if self.alpha_pattern:
            cfg["alpha_pattern"] = dict(self.alpha_pattern)
        if any(m.magnitude is not None for m in self.modules.values()):
            cfg["use_dora"] = True
        if any(m.bias is not None for m in self.modules.values()):
            cfg["lora_bias"] = True
        return cfg

    def norms(self) -> dict[str, float]:
        """Frobenius norms pooled over the modules (reads every A and B, in float64):
        ``B`` = sqrt(sum ||B||^2), zero exactly when every B is all zeros, and ``BA`` =
        sqrt(sum ||B A||^2), the size of the unscaled update. ``||BA||^2`` is taken as
        ``sum((B^T B) * (A A^T))`` over r x r Gram matrices, so the out x in product is never
        formed; NaN for a module whose A and B do not multiply."""
        sq_b = sq_ba = 0.0
        for m in self.modules.values():
            if m.B is None:
                continue
            b = self.read(m.B).produce().double()
            b = b.reshape(b.shape[0], -1)
            sq_b += float((b * b).sum())
            if m.A is None:
                sq_ba = math.nan
                continue
            a = self.read(m.A).produce().double()
            a = a.reshape(a.shape[0], -1)
            sq_ba += float(((b.T @ b) * (a @ a.T)).sum()) if b.shape[1] == a.shape[0] else math.nan
        return {"B": math.sqrt(sq_b), "BA": math.sqrt(max(sq_ba, 0.0)) if not math.isnan(sq_ba) else math.nan}

    def all_b_zero(self) -> bool:
        """True when every stored LoRA B is all zeros (reads every B)."""
        bs = [m.B for m in self.modules.values() if m.B is not None]
        return bool(bs) and all(not bool(self.read(b).produce().any()) for b in bs)


def _pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first pattern matching the end of ``module``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def collect_adapter(entries: Iterable[StoredTensor], name: str, read: Callable[[StoredTensor], LazyTensor],
                    *, adapters: tuple[str, ...] = (), prefixes: tuple[str, ...] = (PEFT_PREFIX,),
                    cls: type[LoraAdapter] = LoraAdapter, **settings: Any) -> LoraAdapter:
    """Group stored tensors into a :class:`LoraAdapter`.

    Each key loses ``prefixes``; a LoRA key must carry exactly the adapter names
    ``adapters`` (none for a PEFT file), any other form (the adapter name twice, ...) goes
    to ``unplaced``. A non-LoRA key is a whole replacement tensor (``modules_to_save``).
    ``cls`` and ``settings`` build the adapter (a :class:`LoraAdapter` subclass may add fields).
    """
    adapter = cls(name, {}, read, **settings)
    for t in entries:
        key = strip_prefix(t.key, *prefixes)
        lk = parse_lora_key(key)
        if lk is None:
            adapter.replaced[base_layer_name(key)] = t
            continue
        if lk.adapters != adapters or (lk.part in ("lora_A", "lora_B") and not lk.param):
            adapter.unplaced.append(t)
            continue
        m = adapter.modules.setdefault(lk.module, LoraModule(lk.module))
        slot = {"lora_A": "A", "lora_embedding_A": "A", "lora_B": "B", "lora_embedding_B": "B",
                "lora_magnitude_vector": "magnitude"}[lk.part]
        if lk.part == "lora_B" and lk.param == "bias":
            slot = "bias"
        if getattr(m, slot) is not None:
            adapter.unplaced.append(t)  # the same tensor twice under two spellings
            continue
        setattr(m, slot, t)
        m.embedding = m.embedding or lk.part in _EMBEDDING_PARTS
    return adapter


# -- merging ------------------------------------------------------------------------------
@dataclass
class MergePlan:
    """Where an adapter's tensors land in a base's tensors (names and shapes only)."""

    merges: dict[str, LoraModule] = field(default_factory=dict)     # base weight name -> module
    biases: dict[str, LoraModule] = field(default_factory=dict)     # base bias name -> module
    replaces: dict[str, StoredTensor] = field(default_factory=dict)  # base name -> whole tensor
    unplaced: list[StoredTensor] = field(default_factory=list)      # nowhere to go in the base
    incomplete: list[LoraModule] = field(default_factory=list)      # lora_A without lora_B or vice versa
    mismatches: list[str] = field(default_factory=list)             # "name: base [..], adapter needs [..]"


def plan_merge(adapter: LoraAdapter, shapes: Mapping[str, tuple[int, ...]]) -> MergePlan:
    """Hold ``adapter`` against base tensor ``shapes`` (by on-disk name). Reads nothing."""
    plan = MergePlan(unplaced=list(adapter.unplaced))
    for m in adapter.modules.values():
        if m.A is None or m.B is None:
            plan.incomplete.append(m)
            plan.unplaced += m.stored
            continue
        weight = f"{m.module}.weight"
        if len(m.A.shape) != 2 or len(m.B.shape) != 2 or weight not in shapes \
                or (m.magnitude is not None and m.embedding):
            plan.unplaced += m.stored  # conv LoRA, DoRA on embeddings, or a module the base lacks
            continue
        (r_a, n_in), (n_out, r_b) = m.A.shape, m.B.shape
        need = (n_in, n_out) if m.embedding or adapter.fan_in_fan_out else (n_out, n_in)
        if r_a != r_b:
            plan.mismatches.append(f"{weight}: lora_A {list(m.A.shape)} and lora_B {list(m.B.shape)} "
                                   "disagree in rank")
            continue
        if tuple(shapes[weight]) != need:
            plan.mismatches.append(f"{weight}: base {list(shapes[weight])}, adapter needs {list(need)} "
                                   f"(lora_A {list(m.A.shape)}, lora_B {list(m.B.shape)})")
            continue
        if m.magnitude is not None and tuple(m.magnitude.shape) != (n_out,):
            plan.mismatches.append(f"{weight}: DoRA magnitude {list(m.magnitude.shape)}, needs [{n_out}]")
            continue
        plan.merges[weight] = m
        if m.bias is not None:
            bias = f"{m.module}.bias"
            if bias in shapes and tuple(shapes[bias]) == (n_out,):
                plan.biases[bias] = m
            else:
                plan.unplaced.append(m.bias)
    for name, t in adapter.replaced.items():
        if name not in shapes:
            plan.unplaced.append(t)
        elif tuple(shapes[name]) != tuple(t.shape):
            plan.mismatches.append(f"{name}: base {list(shapes[name])}, adapter stores {list(t.shape)}")
        else:
            plan.replaces[name] = t
    return plan


def merge_adapter(tensors: Mapping[str, LazyTensor], adapter: LoraAdapter,
                  plan: MergePlan | None = None) -> dict[str, LazyTensor]:
    """``tensors`` with ``adapter`` merged in (lazily): each adapted weight becomes
    ``W + scaling * B @ A`` computed in fp32 and cast back to W's dtype. Raises LoadError
    naming the tensor and both shapes when the base does not fit the adapter."""
    plan = plan or plan_merge(adapter, {n: t.shape for n, t in tensors.items()})
    if plan.mismatches:
        more = f" (and {len(plan.mismatches) - 1} more)" if len(plan.mismatches) > 1 else ""
        raise LoadError(f"adapter {adapter.name} does not fit its base model: {plan.mismatches[0]}{more}")
    out = dict(tensors)
    for name, t in plan.replaces.items():  # first: PEFT loads a saved base layer, then adds LoRA
        out[name] = adapter.read(t)
    for name, m in plan.merges.items():
        out[name] = _merged_weight(out[name], m, adapter.scaling_of(m.module), adapter)
    for name, m in plan.biases.items():
        out[name] = _merged_bias(out[name], m, adapter.scaling_of(m.module), adapter)
    return out


def _merged_weight(w: LazyTensor, m: LoraModule, scaling: float, adapter: LoraAdapter) -> LazyTensor:
    read, transpose = adapter.read, m.embedding or adapter.fan_in_fan_out

    def compute(dtype):
        import torch

        base = w.produce_once()  # read once, never written to (it may be the file's memory map)
        # PEFT's arithmetic, step for step (``W + transpose(B @ A) * scaling`` in float32), so
        # the merge equals PEFT's merge_and_unload bit for bit; in place where the operands are
        # ours: one tensor of W's size is held besides W itself
        delta = read(m.B).produce().float() @ read(m.A).produce().float()
        delta.mul_(scaling)
        if transpose:
            merged = base.float() + delta.T
        else:  # W of a lower precision is widened exactly by the in-place add
            merged = delta.add_(base.float() if base.dtype == torch.float64 else base)
        del delta
        if m.magnitude is not None:  # DoRA: rescale each output row to the stored magnitude
            rows = merged.T if adapter.fan_in_fan_out else merged
            factor = read(m.magnitude).produce().float() / torch.linalg.norm(rows, dim=1)
            merged.mul_(factor.view(1, -1) if adapter.fan_in_fan_out else factor.view(-1, 1))
        return merged.to(dtype or base.dtype)

    # computed in float32 and cast once: to W's dtype by default, to the dtype a load or
    # export asks for through produce_as (a float32 load over a bf16 base is not rounded to bf16)
    return LazyTensor(w.shape, w.dtype, f"lora-merge:{adapter.name}:{m.A.file}", lambda: compute(None),
                      compute=compute)


def _merged_bias(b: LazyTensor, m: LoraModule, scaling: float, adapter: LoraAdapter) -> LazyTensor:
    def produce():
        base = b.produce()
        return (base.float() + adapter.read(m.bias).produce().float() * scaling).to(base.dtype)

    return LazyTensor(b.shape, b.dtype, f"lora-merge:{adapter.name}:{m.bias.file}", produce)
