"""Paired statistics for two models scored on the same samples.

* :func:`paired_bootstrap`: a percentile confidence interval of ``stat(trained) -
  stat(base)``, resampling documents (the same resampled documents for both models),
  under a fixed seed, so the interval is reproducible.
* :func:`mcnemar_exact`: McNemar's exact test on 0/1 scores: the two-sided binomial test
  of the discordant pairs at 1/2, the value ``scipy.stats.binomtest(c, b + c).pvalue``
  gives, computed in exact integer arithmetic (importing ``scipy.stats`` costs more than
  a cached re-run's whole budget).

``stat`` is an lm-eval aggregation name: ``mean`` / ``nanmean`` over per-sample numbers,
``perplexity`` (``exp(-mean(loglikelihood))``), ``weighted_perplexity`` and
``bits_per_byte`` over per-sample ``(loglikelihood, weight)`` pairs, ``median``; or any
callable that aggregates a list of per-sample values (called once per resample).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any, Callable, Sequence

import numpy as np

N_RESAMPLES = 2000
SEED = 0
LEVEL = 0.95
VECTORIZED = ("mean", "nanmean", "perplexity", "weighted_perplexity", "bits_per_byte", "median")
_MAX_DRAWS = 4_000_000   # indices drawn per chunk (memory bound for long tasks)


@dataclass(frozen=True)
class McNemar:
    """Discordant pairs and the exact two-sided p-value."""

    base_only: int      # base right, trained wrong
    trained_only: int   # trained right, base wrong
    p_value: float


@dataclass(frozen=True)
class PairedBootstrap:
    """Observed delta, its percentile interval, and each model's bootstrap stderr."""

    delta: float
    low: float
    high: float
    base_stderr: float
    trained_stderr: float
    n: int
    n_resamples: int
    seed: int
    level: float

    def excludes_zero(self) -> bool:
        return bool(self.low > 0 or self.high < 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_binary(values: Sequence[Any]) -> bool:
    """True when every value is 0 or 1 (bools included): an accuracy-type score."""
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        return False
    return arr.ndim == 1 and arr.size > 0 and bool(np.all((arr == 0) | (arr == 1)))


def mcnemar_exact(base: Sequence[float], trained: Sequence[float]) -> McNemar:
    """McNemar's exact test on paired 0/1 scores (same documents, same order)."""
    b = np.asarray(base, dtype=float)
    t = np.asarray(trained, dtype=float)
    if b.shape != t.shape:
        raise ValueError(f"paired scores differ in length: {b.shape} vs {t.shape}")
    if not (is_binary(b) and is_binary(t)):
        raise ValueError("McNemar's test needs 0/1 scores")
    base_only = int(np.sum((b == 1) & (t == 0)))
    trained_only = int(np.sum((b == 0) & (t == 1)))
    return McNemar(base_only, trained_only, binomial_two_sided_half(trained_only, base_only + trained_only))


def binomial_two_sided_half(k: int, n: int) -> float:
    """Exact two-sided p-value of ``k`` successes in ``n`` fair trials: the probability of
    an outcome at most as likely as ``k`` (symmetric, so twice the smaller tail)."""
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1))
    return min(1.0, float(Fraction(2 * tail, 2**n)))


def aggregate(values: Sequence[Any], stat: str | Callable = "mean") -> float:
    """The aggregate of per-sample ``values`` (see module docstring for ``stat``)."""
    if callable(stat):
        return float(stat(list(values)))
    arr = _as_array(values, stat)
    return float(_vectorized(arr[None, ...], stat)[0])


def paired_bootstrap(base: Sequence[Any], trained: Sequence[Any], stat: str | Callable = "mean", *,
                     n_resamples: int = N_RESAMPLES, seed: int = SEED, level: float = LEVEL) -> PairedBootstrap:
    """Percentile interval of ``stat(trained) - stat(base)`` over paired document resamples."""
    n = len(base)
    if n != len(trained):
        raise ValueError(f"paired samples differ in length: {n} vs {len(trained)}")
    if n == 0:
        raise ValueError("no paired samples")
    rng = np.random.default_rng(seed)
    if callable(stat) or stat not in VECTORIZED:
        fn = stat if callable(stat) else _registry_aggregation(stat)
        base_l, trained_l = list(base), list(trained)
        observed = fn(trained_l) - fn(base_l)
        bs, ts = np.empty(n_resamples), np.empty(n_resamples)
        for i in range(n_resamples):
            idx = rng.integers(0, n, n)
            bs[i] = fn([base_l[j] for j in idx])
            ts[i] = fn([trained_l[j] for j in idx])
    else:
        b, t = _as_array(base, stat), _as_array(trained, stat)
        observed = float(_vectorized(t[None], stat)[0] - _vectorized(b[None], stat)[0])
        bs, ts = np.empty(n_resamples), np.empty(n_resamples)
        chunk = max(1, _MAX_DRAWS // n)
        for start in range(0, n_resamples, chunk):
            stop = min(n_resamples, start + chunk)
            idx = rng.integers(0, n, size=(stop - start, n))
            bs[start:stop] = _vectorized(b[idx], stat)
            ts[start:stop] = _vectorized(t[idx], stat)
    deltas = ts - bs
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(deltas, [alpha, 1.0 - alpha])
    return PairedBootstrap(float(observed), float(low), float(high), _std(bs), _std(ts),
                           n, n_resamples, seed, level)


def _std(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(np.std(x, ddof=1)) if x.size > 1 else math.nan


def _as_array(values: Sequence[Any], stat: str) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    want = 2 if stat in ("weighted_perplexity", "bits_per_byte") else 1
    if arr.ndim != want or (want == 2 and arr.shape[1] != 2):
        raise ValueError(f"aggregation {stat!r} expects per-sample "
                         f"{'(loglikelihood, weight) pairs' if want == 2 else 'numbers'}, got shape {arr.shape}")
    return arr


def _vectorized(x: np.ndarray, stat: str) -> np.ndarray:
    """Aggregate each row of ``x`` (rows = resamples)."""
    if stat == "mean":
        return x.mean(axis=1)
    if stat == "nanmean":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # all-NaN resamples -> NaN
            return np.nanmean(x, axis=1)
    if stat == "median":
        # lm-eval's median: sorted(arr)[len(arr) // 2]
        return np.sort(x, axis=1)[:, x.shape[1] // 2]
    if stat == "perplexity":
        return np.exp(-x.mean(axis=1))
    ll, w = x[..., 0].sum(axis=1), x[..., 1].sum(axis=1)
    if stat == "weighted_perplexity":
        return np.exp(-ll / w)
    if stat == "bits_per_byte":
        return -ll / w / math.log(2)
    raise ValueError(f"no vectorized aggregation {stat!r}")


def _registry_aggregation(name: str) -> Callable:
    """An lm-eval aggregation by registered name (``f1``, ``bleu``, ...)."""
    from lm_eval.api.registry import get_aggregation

    fn = get_aggregation(name)
    if fn is None:
        raise ValueError(f"unknown aggregation {name!r}")
    return fn
