"""Verification of an exported folder: stock transformers vs an independent reference of the source.

The exported folder is reloaded with plain ``AutoModelForCausalLM.from_pretrained`` (no
modelkit code on its path) and its logits on fixed prompts are compared with a reference
of the source built through an independent path where there is one (which, the format
says: :meth:`~modelkit.formats.base.Artifact.export_targets`): a format's own
``Artifact.reference_model`` (compressed MoE: the stored low-rank form materialised in
float64 from plain ``torch.load`` reads, never through the view the export used), a
DyLoRA expert K through the routed module with ``routing="expert:K"``, a PEFT adapter
unmerged through PEFT's own forward; else :func:`modelkit.load`. The export computes in
float32; the reference in float32, or float64 when it is built in float64 (the
difference is then measured in float64).

Cost: the source (and its base) is opened once, for the reference; the reference's logits
are computed (and, for a low-precision export, its weights are compared with the stored
ones), the reference is freed, and only then is the export loaded. So a verified export
costs one load of the source's reference and its forward plus one load of the export, and
holds one of the two at a time.

Tolerances on the max absolute logit difference:

* float32 export: ``1e-5`` absolute. The weights are the same numbers; only the order of
  floating-point operations differs (a merged ``W + s·BA`` against ``Wx + s·B(Ax)``).
* float32 export against a float64 reference (measured in float64): only float32 roundoff
  separates them, so the bf16 rule below with float32's unit roundoff ``u = 2^-24``:
  ``tol = 2^5·u·max|logits| = 1.9e-6·max|logits|`` (floor ``1e-7``). On the compressed
  fixtures the correct export stays below ``0.3·tol``; one whose experts were rounded to bf16
  on the way is ``7x`` over it (an absolute ``1e-5`` would have passed it).
* bfloat16 / float16 export, two checks:

  1. against the float32 source: every weight is rounded to an 8-bit (bf16) or 11-bit
     (fp16) significand, a relative error of up to ``u = 2^-8`` / ``2^-11``. Normalised
     blocks keep those errors proportional to the logits' scale, growing with depth (and
     with MoE top-k choices that flip), so the bound is ``tol = 2^5·u·max|logits|``:
     ``0.125·max|logits|`` (bf16), ``0.0156·max|logits|`` (fp16). The tiny fixtures stay
     below ``3.2·u``; the margin is for deep models.
  2. against the same reference made dense by its own code (an adapter's weights as PEFT's
     LoRA merge makes them, ``W + get_delta_weight``, tensor by tensor without merging:
     :mod:`modelkit.models.peft_dense`; a DyLoRA expert's likewise), weight by weight:
     every stored tensor must be the reference's weight of the same name correctly rounded
     to the nearest value of the export's dtype (a tie either way). A stored value that is not counts as
     misrounded unless it is within half a unit in the last place of that weight, plus, for a
     weight merged from a base weight ``W`` and a delta ``d``, ``2^-17·(|W| + |d| + max|d|)``
     (float32 roundoff of a merge computed in another order: ``2^7 x 2^-24`` of the terms
     added; an unmerged delta is off by ``|d|`` itself, far outside it); any misrounded
     weight fails. A weight nothing was merged into gets no slack. A reference weight the
     export does not store because its config ties it (a DyLoRA module's own copy of a tied
     Gemma head) is held against the stored tensor stock loading fills it from (transformers'
     tie map of the exported config). The same rounding of the same
     numbers, reached by a second path (PEFT's merge; the export read back with
     ``safetensors``): this catches what the loose bound cannot, e.g. a small LoRA delta
     that was not merged, or weights truncated instead of rounded. Where the reference's
     parameter names are not the stored ones (an MoE whose experts transformers fuses in
     memory), its merge is more than adding deltas (DoRA, LoRA biases, ``modules_to_save``)
     or the reference is float64, the reference is merged by its own ``merge_and_unload``,
     rounded, and its logits are compared instead, at ``1e-5`` absolute.
"""
from __future__ import annotations

import contextlib
import gc
import math
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from modelkit import collector
from modelkit.architecture.prompts import prompt_ids
from modelkit.collector import release_free_heap

if TYPE_CHECKING:  # pragma: no cover
    from modelkit.formats.base import Artifact, ExportTarget

UNIT_ROUNDOFF = {"float32": 0.0, "bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}
FP32_TOLERANCE = 1e-5
FP32_UNIT_ROUNDOFF = 2.0 ** -24
FP64_REFERENCE_FLOOR = 1e-7
GROWTH = 2.0 ** 5
CHECK_CHUNK = 1 << 22           # elements compared at a time: the rounded chunk stays in cache (30% faster)
MERGE_ORDER_SLACK = 2.0 ** -17   # x (|W| + |delta| + max|delta|): float32 roundoff of a merge in another order


@dataclass
class Verification:
    """The outcome of comparing an export with its source."""

    ok: bool
    max_abs_diff: float
    tolerance: float
    rule: str                  # how the tolerance was chosen
    dtype: str                 # the exported dtype
    reference: str             # how the source side was loaded
    prompts: int
    tokens: int
    argmax_agreement: float    # fraction of positions whose top token agrees
    max_abs_logit: float
    rounded_max_abs_diff: float | None = None   # low-precision exports: vs the source in that dtype
    rounded_tolerance: float | None = None
    rounded_reference: str | None = None        # how the rounded reference was made
    problems: dict[str, Any] | None = None      # what stock loading reported (missing keys, ...)
    weights_compared: int | None = None         # low-precision exports checked weight by weight: tensors
    weights_misrounded: int | None = None       # stored values that are not the reference's weight rounded
    weights_max_abs_diff: float | None = None   # max |stored - reference rounded| over the weights

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        text = (f"verify {verdict}: max |logit diff| {self.max_abs_diff:.3g} "
                f"(tolerance {self.tolerance:.3g}, {self.rule})")
        if self.rounded_max_abs_diff is not None:
            text += (f"; vs the source in {self.dtype}: {self.rounded_max_abs_diff:.3g} "
                     f"(tolerance {self.rounded_tolerance:.3g})")
        if self.weights_compared is not None:
            text += (f"; stored weights vs the source's rounded to {self.dtype}: "
                     + (f"all {self.weights_compared} tensors correctly rounded" if not self.weights_misrounded
                        else f"{self.weights_misrounded} values misrounded (max |diff| "
                             f"{self.weights_max_abs_diff:.3g})"))
        return text + (f"; top-1 agreement {self.argmax_agreement:.1%} over {self.tokens} tokens; "
                       f"reference: {self.reference}")


def tolerance_for(dtype: str, max_abs_logit: float, wide_reference: bool = False) -> tuple[float, str]:
    """(tolerance, rule) against the source for an export stored in ``dtype``; the source is
    float32, or float64 with ``wide_reference`` (an independent float64 reference)."""
    u = UNIT_ROUNDOFF.get(dtype)
    if u is None:
        raise ValueError(f"no verification tolerance for dtype {dtype!r}")
    if u == 0.0 and wide_reference:
        return (max(GROWTH * FP32_UNIT_ROUNDOFF * max_abs_logit, FP64_REFERENCE_FLOOR),
                "float32 vs a float64 reference: 2^5 x unit roundoff 2^-24 x max|logit|")
    if u == 0.0:
        return FP32_TOLERANCE, "float32: 1e-5 absolute"
    return (max(GROWTH * u * max_abs_logit, FP32_TOLERANCE),
            f"{dtype}: 2^5 x unit roundoff {u:.3g} x max|logit|")


def load_stock(folder: Path):
    """``(model, loading report)`` of ``folder`` by plain ``AutoModelForCausalLM``, float32."""
    import torch
    from transformers import AutoModelForCausalLM

    with _quiet_transformers():
        model, info = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch.float32, trust_remote_code=False, output_loading_info=True)
    return model.eval(), info


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' logging and progress bars off (the loading report is checked, not printed)."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def folder_prompt_ids(folder: Path) -> list:
    """The fixed prompts as token ids of ``folder``'s tokenizer and vocabulary (read without
    loading its weights)."""
    from transformers import AutoConfig, AutoTokenizer

    with _quiet_transformers():
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
        except Exception:  # no tokenizer exported: fall back to fixed ids
            tokenizer = None
    return prompt_ids(tokenizer, config.get_text_config().vocab_size)


def dense_rounded(model, dtype: str):
    """``model`` made dense by its own code and every weight rounded to ``dtype``, as a float32
    model (changed in place: ``model`` is consumed). A model with adapters is merged by its
    ``merge_and_unload`` (PEFT's, or a DyLoRA module's expert through PEFT's)."""
    import torch

    from modelkit.io.tensors import torch_dtype

    low = torch_dtype(dtype, floating=True)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.copy_(p.to(low))  # in place: never a second copy of the model
    return model.float().eval()


@dataclass
class WeightCheck:
    """Stored tensors of an export against a dense reference's weights rounded to its dtype."""

    tensors: int
    misrounded: int      # values beyond half an ulp (+ merge-order slack) of the reference's weight
    max_abs_diff: float  # max |stored - reference rounded| (0.0: bit for bit the correct rounding)


def _stored_names(folder: Path) -> dict[str, Path]:
    """tensor name -> safetensors file of an exported folder (its index, else every file)."""
    import json

    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    names: dict[str, Path] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as handle:
            names |= dict.fromkeys(handle.keys(), f)
    return names


def _as_words(t):
    """``t``'s bytes as the widest integers that tile it (an integer compare of 8-byte words
    is ~2.5x faster than one of bfloat16 values)."""
    import torch

    flat = t.reshape(-1).view(torch.uint8)
    for word in (torch.int64, torch.int32, torch.int16):
        if flat.numel() % word.itemsize == 0:
            return flat.view(word)
    return flat


def _misrounded(reference, stored, base, spread: float | None, low) -> int:
    """How many of ``stored`` (values that are not ``reference`` rounded to nearest even) are
    farther from ``reference`` than half an ulp, plus, for weights merged from ``base``, the
    merge-order slack ``2^-17 (|W| + |d| + spread)`` (see the module's check 2)."""
    import torch

    eps, smallest = torch.finfo(low).eps, torch.finfo(low).smallest_normal
    r, s = reference.double(), stored.double()
    half_ulp = torch.ldexp(torch.full_like(r, eps), torch.frexp(r).exponent - 2)
    bound = torch.where(r == 0, 0.0, half_ulp.clamp(min=eps * smallest / 2))
    if base is not None:  # merged here: float32 roundoff of another merge order
        w = base.double()
        bound = bound + MERGE_ORDER_SLACK * (w.abs() + (r - w).abs() + spread)
    return int((~((s - r).abs() <= bound)).sum())  # NaN compares false: misrounded


def _tied_in_export(folder: Path) -> dict[str, str]:
    """tied name -> the stored name stock transformers fills it from, for ``folder``'s
    config.json (transformers' own tie map, from the model class on the meta device); {}
    when the config cannot say."""
    from modelkit.architecture.bridge import tied_tensors

    try:
        return tied_tensors(folder / "config.json")
    except Exception:  # an architecture transformers cannot build: no tie is assumed
        return {}


def check_stored_weights(weights: list, folder: Path, dtype: str) -> WeightCheck | None:
    """Each dense reference weight ``(name, shape, produce)`` (see
    :func:`modelkit.models.peft_dense.dense_weights`) against the tensor of that name stored
    in ``folder``, read with ``safetensors``: the stored value must be the weight rounded to
    ``dtype`` (the module's check 2). A weight the export does not store because its
    config ties it (a Gemma head a DyLoRA module holds as its own parameter) is checked
    against the stored tensor stock loading ties it to. One weight and one shard in memory
    at a time. None when a weight has no stored tensor of its name (or tie) and shape (the
    caller compares rounded logits instead)."""
    import torch
    from safetensors import safe_open

    from modelkit.io.tensors import torch_dtype

    low = torch_dtype(dtype, floating=True)
    where = _stored_names(folder)
    if not weights:
        return None
    stored_as = {name: name for name, _, _ in weights if name in where}
    if len(stored_as) < len(weights):  # some not stored under their own name: tied in the export?
        tied = _tied_in_export(folder)
        stored_as |= {name: tied[name] for name, _, _ in weights
                      if name not in where and tied.get(name) in where}
        if len(stored_as) < len(weights):
            return None
    by_file: dict[Path, list] = {}
    for name, shape, produce in weights:
        by_file.setdefault(where[stored_as[name]], []).append((stored_as[name], shape, produce))
    buffer = torch.empty(min(CHECK_CHUNK, max(math.prod(shape) for _, shape, _ in weights)), dtype=low)
    misrounded, worst = 0, 0.0
    merged: dict[tuple[int, ...], Any] = {}
    for f, group in by_file.items():
        with safe_open(str(f), "pt") as handle:
            if any(tuple(handle.get_slice(name).get_shape()) != shape for name, shape, _ in group):
                return None
            for name, shape, produce in group:
                stored = handle.get_tensor(name).reshape(-1)
                if stored.dtype != low:  # not the export's dtype at all
                    misrounded += stored.numel()
                    continue
                if getattr(produce, "merges", False):  # one float32 buffer per shape for the merges
                    out = merged.get(shape)
                    if out is None:
                        out = merged[shape] = torch.empty(shape, dtype=torch.float32)
                    reference, base = produce(out=out)
                else:
                    reference, base = produce()
                reference = reference.reshape(-1)
                spread = None
                for start in range(0, stored.numel(), CHECK_CHUNK):  # chunks that stay in cache
                    r, st = reference[start:start + CHECK_CHUNK], stored[start:start + CHECK_CHUNK]
                    rounded = buffer[:r.numel()]
                    rounded.copy_(r)  # round to nearest even, as .to(dtype)
                    if torch.equal(_as_words(rounded), _as_words(st)):  # bit for bit
                        continue
                    off = rounded != st  # NaN != NaN: a NaN lands here and fails below
                    if base is not None and spread is None:
                        spread = float((reference - base.reshape(-1)).abs().max())
                    b = None if base is None else base.reshape(-1)[start:start + CHECK_CHUNK][off]
                    misrounded += _misrounded(r[off], st[off], b, spread, low)
                    worst = max(worst, float((st[off].double() - rounded[off].double()).abs().max()))
    return WeightCheck(len(weights), misrounded, worst)


def verify_folder(folder: Path, make_reference: Callable[[], tuple[Any, str]], *, dtype: str,
                  tolerance: float | None = None, step: Callable[[str], None] = lambda note: None) -> Verification:
    """Compare ``folder`` (stock transformers) with the reference ``make_reference()`` returns
    (``(model, how it was made)``: the float32 source, or an independent float64 one) and, for
    a low-precision export, with that reference made dense and rounded to ``dtype`` (weight by
    weight against the stored tensors, else by its logits).

    The reference is built, run and freed before the export is loaded (a callable, so that
    nothing else holds it): one of the two models is in memory at a time. ``step(note)``
    once the reference has run and once the export is loaded (progress).

    The cyclic collector is paused throughout (:func:`modelkit.collector.paused`): the imports
    and loads make many objects but few cycles, and each full collection would walk every
    object the export before it left alive (0.3 s of the step on the 0.6 GB benchmark); the
    one cycle that matters, a reference model held by one, is collected explicitly."""
    with collector.paused():
        return _verify_folder(folder, make_reference, dtype=dtype, tolerance=tolerance, step=step)


def _verify_folder(folder: Path, make_reference: Callable[[], tuple[Any, str]], *, dtype: str,
                   tolerance: float | None, step: Callable[[str], None]) -> Verification:
    import torch

    release_free_heap()  # heap the caller freed (an export's merge buffers) is not held beside the reference
    ids = folder_prompt_ids(folder)
    reference_model, reference = make_reference()
    # a float64 reference (an independent one, see Artifact.reference_model) stays float64
    wide = next(reference_model.parameters()).dtype == torch.float64
    reference_model = reference_model.eval() if wide else reference_model.float().eval()
    rounded, rounded_how, weights = None, None, None
    with torch.no_grad():
        expected = [reference_model(input_ids=x).logits.double() for x in ids]
        if UNIT_ROUNDOFF.get(dtype):
            from modelkit.models.peft_dense import dense_weights

            dense = None if wide else dense_weights(reference_model)
            weights = check_stored_weights(dense, folder, dtype) if dense else None
            if weights is not None:
                rounded_how = (f"each weight of the reference made dense as its own merge makes it, rounded to "
                               f"{dtype}, against the stored tensor of its name")
            else:  # names not the stored ones, another merge, or a float64 reference: the rounded model's logits
                reference_model = dense_rounded(reference_model, dtype)
                rounded = [reference_model(input_ids=x).logits.float() for x in ids]
                rounded_how = f"the reference made dense by its own merge, weights rounded to {dtype}"
            del dense
    alive = weakref.ref(reference_model)
    del reference_model
    if alive() is not None:  # held by a reference cycle: collect it
        # the young generation (what was made since the collector was paused) holds the
        # cycle: an import's frames pin the frames that imported them, with their locals
        # (torch.fx.wrap keeps inspect.currentframe() while torch._dynamo is imported);
        # the collection the paused block would end with anyway, done here, not twice
        gc.collect(0)
        if alive() is not None:
            gc.collect()
    release_free_heap()  # the reference's memory is free before the export is loaded
    step("loading the export with stock transformers")

    exported, info = load_stock(folder)
    step("comparing logits")
    problems = {k: v for k, v in info.items() if v and k != "error_msgs"}
    max_diff, max_logit, rounded_diff, agree, tokens = 0.0, 0.0, 0.0, 0, 0
    with torch.no_grad():
        for i, x in enumerate(ids):
            a = expected[i]
            b = exported(input_ids=x).logits.double()
            max_diff = max(max_diff, (a - b).abs().max().item())
            max_logit = max(max_logit, a.abs().max().item())
            agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
            tokens += x.shape[-1]
            if rounded is not None:
                rounded_diff = max(rounded_diff, (rounded[i] - b).abs().max().item())
    del exported
    tol, rule = tolerance_for(dtype, max_logit, wide_reference=wide)
    if tolerance is not None:
        tol, rule = tolerance, "given by the caller"
    ok = max_diff <= tol and not problems and max_diff == max_diff  # NaN fails
    if rounded is not None:
        ok = ok and rounded_diff <= FP32_TOLERANCE
    if weights is not None:
        ok = ok and weights.misrounded == 0
    return Verification(ok, max_diff, tol, rule, dtype, reference, len(ids), tokens,
                        agree / max(tokens, 1), max_logit,
                        rounded_diff if rounded is not None else None,
                        FP32_TOLERANCE if rounded is not None else None, rounded_how, problems or None,
                        weights.tensors if weights else None, weights.misrounded if weights else None,
                        weights.max_abs_diff if weights else None)


def source_reference(ref: Any, artifact: "Artifact", target: "ExportTarget", *, allow_untrained: bool,
                     **options: Any) -> tuple[Any, str]:
    """``(model, how it was made)``: the reference of the source :func:`verify_folder` compares
    an export with, by the most independent path the artifact offers: the export target's
    own (:attr:`~modelkit.formats.base.ExportTarget.reference`, load keywords of a second
    path: PEFT unmerged, one DyLoRA expert through the routed module), else the format's
    float64 :meth:`~modelkit.formats.base.Artifact.reference_model`, else :func:`modelkit.load`.
    ``options``: ``base=`` and the format's options, as given to the export."""
    import torch

    from modelkit.ops.load import load

    fmt = {k: v for k, v in options.items() if k != "base" and k not in target.options}
    # tokenizer=False: verify takes its prompt from the export folder, never this tokenizer
    common = {"allow_untrained": allow_untrained, "tokenizer": False, **{k: v for k, v in options.items() if k not in target.options}}
    if target.reference is not None:
        return load(ref, dtype=torch.float32, **common, **target.reference).model, target.reference_how
    independent = artifact.reference_model(**fmt)
    if independent is not None:  # the stored form by a second path, in float64
        model, how = independent
        return model, f"independent float64 reference: {how}"
    return load(ref, dtype=torch.float32, **common, **target.options).model, "modelkit.load()"
