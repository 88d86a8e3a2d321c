"""Intervals and tests for comparing arms: pure functions on arrays, no pandas, no MLflow.

- ``t_interval``: mean and Student-t interval of one arm's values over seeds.
- ``paired_difference`` (arms share their seeds), ``welch_difference`` (they do not),
  ``single_case_difference`` (one run against several: Crawford & Howell 1998) and
  ``interval_difference`` (one run each, each with its own sampling interval, e.g. a
  bootstrap over its generated samples): the difference a − b with its interval and a
  two-sided p-value, as a ``Difference``.
- ``holm``: Holm's (1979) step-down adjustment of a family of p-values.

Every interval is two-sided at ``confidence`` (default 0.95). Undefined quantities are NaN,
never an exception: one run has a mean but no interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """One arm's value of one metric.

    mean: over the arm's runs; low/high: the interval (NaN when there is none); n: runs;
    source: "seeds" (Student t over the n runs), "bootstrap" (one run's own sampling
    interval, logged by the run) or "none" (one run, no interval).
    """

    mean: float
    low: float
    high: float
    n: int
    source: str

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    @property
    def has_interval(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)


@dataclass(frozen=True)
class Difference:
    """a − b with its interval and two-sided p-value (H0: no difference).

    test: which test gave it ("paired t", "Welch t", "Crawford–Howell t", "normal, from
    intervals" or "none"; "… (no spread)" where the values had none, so any difference is
    called — a constant difference of a coarse metric over few seeds); df: its degrees of freedom (inf for the normal approximation, NaN
    for none); n_a, n_b: runs on each side. low/high/p_value are NaN when ``test`` is "none".
    """

    estimate: float
    low: float
    high: float
    p_value: float
    test: str
    df: float
    n_a: int
    n_b: int

    @property
    def tested(self) -> bool:
        return math.isfinite(self.p_value)


def _finite(values: Sequence[float] | np.ndarray) -> np.ndarray:
    v = np.asarray(values, dtype=float).ravel()
    return v[np.isfinite(v)]


def _sd(v: np.ndarray) -> float:
    """Sample standard deviation; exactly 0 for values equal up to float rounding (a difference
    of accuracies 0.15 − 0.1 and 0.25 − 0.2 is not a spread of 1e-17)."""
    return 0.0 if v.max() - v.min() <= 1e-12 * np.abs(v).max() else float(v.std(ddof=1))


def _t_quantile(confidence: float, df: float) -> float:
    return float(stats.t.ppf(0.5 + confidence / 2, df))


def t_interval(values: Sequence[float] | np.ndarray, confidence: float = CONFIDENCE) -> Estimate:
    """Mean of ``values`` (NaNs dropped) ± t_{df=n−1} · s / √n; no interval below n = 2."""
    v = _finite(values)
    n = len(v)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, "none")
    mean = float(v.mean())
    if n == 1:
        return Estimate(mean, math.nan, math.nan, 1, "none")
    half = _t_quantile(confidence, n - 1) * _sd(v) / math.sqrt(n)
    return Estimate(mean, mean - half, mean + half, n, "seeds")


def _t_difference(estimate: float, se: float, df: float, confidence: float, test: str, n_a: int,
                  n_b: int) -> Difference:
    """Interval and p-value of a t statistic; zero spread gives a zero-width interval and p = 0 (or 1 at 0)."""
    if se == 0:  # every pair differs by the same amount (or not at all): no noise to test against
        return Difference(estimate, estimate, estimate, 1.0 if estimate == 0 else 0.0, f"{test} (no spread)", df,
                          n_a, n_b)
    half = _t_quantile(confidence, df) * se
    p = float(2 * stats.t.sf(abs(estimate) / se, df))
    return Difference(estimate, estimate - half, estimate + half, p, test, df, n_a, n_b)


def paired_difference(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray,
                      confidence: float = CONFIDENCE) -> Difference:
    """Paired t on a[i] − b[i] (the same seed i on both arms); pairs with a NaN are dropped."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired values need equal shapes, got {a.shape} and {b.shape}")
    d = (a - b)[np.isfinite(a - b)]
    n = len(d)
    if n < 2:
        return _untested(float(d.mean()) if n else math.nan, n, n)
    return _t_difference(float(d.mean()), _sd(d) / math.sqrt(n), n - 1, confidence, "paired t", n, n)


def welch_difference(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray,
                     confidence: float = CONFIDENCE) -> Difference:
    """Welch's unequal-variance t on mean(a) − mean(b), Welch–Satterthwaite df; needs ≥2 values each."""
    a, b = _finite(a), _finite(b)
    estimate = float(a.mean() - b.mean()) if len(a) and len(b) else math.nan
    if len(a) < 2 or len(b) < 2:
        return _untested(estimate, len(a), len(b))
    va, vb = _sd(a) ** 2 / len(a), _sd(b) ** 2 / len(b)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if se > 0 else len(a) + len(b) - 2.0
    return _t_difference(estimate, se, float(df), confidence, "Welch t", len(a), len(b))


def single_case_difference(single: float, sample: Sequence[float] | np.ndarray,
                           confidence: float = CONFIDENCE) -> Difference:
    """One run (``single``) against an arm of n ≥ 2 runs: single − mean(sample), Crawford & Howell's
    (1998) t = (x − m) / (s·√((n+1)/n)), df = n − 1, which assumes both arms share the sample's
    spread over seeds."""
    v = _finite(sample)
    n = len(v)
    if n < 2 or not math.isfinite(single):
        return _untested(single - float(v.mean()) if n else math.nan, 1, n)
    se = _sd(v) * math.sqrt((n + 1) / n)
    return _t_difference(single - float(v.mean()), se, n - 1, confidence, "Crawford–Howell t", 1, n)


def interval_difference(a: Estimate, b: Estimate, confidence: float = CONFIDENCE) -> Difference:
    """a − b for two single runs that each logged a sampling interval (e.g. a 95% bootstrap
    interval over their generated samples): each interval is read as ±z·se of a normal
    estimate at ``confidence``, se = √(se_a² + se_b²), and a z-test. An approximation: a
    percentile interval need not be symmetric, so its half-width stands in for z·se."""
    estimate = a.mean - b.mean
    if not (a.has_interval and b.has_interval):
        return _untested(estimate, a.n, b.n)
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    se = math.hypot(a.half_width, b.half_width) / z
    if se == 0:
        return Difference(estimate, estimate, estimate, 1.0 if estimate == 0 else 0.0, "normal, from intervals",
                          math.inf, a.n, b.n)
    p = float(2 * stats.norm.sf(abs(estimate) / se))
    return Difference(estimate, estimate - z * se, estimate + z * se, p, "normal, from intervals", math.inf, a.n, b.n)


def _untested(estimate: float, n_a: int, n_b: int) -> Difference:
    return Difference(estimate, math.nan, math.nan, math.nan, "none", math.nan, n_a, n_b)


@dataclass(frozen=True)
class HolmResult:
    """adjusted: Holm-adjusted p-values in the input order (NaN stays NaN and is not counted);
    reject: adjusted ≤ alpha; m: how many p-values made the family."""

    adjusted: tuple[float, ...]
    reject: tuple[bool, ...]
    m: int
    alpha: float


def holm(p_values: Sequence[float], alpha: float = 1 - CONFIDENCE) -> HolmResult:
    """Holm's step-down adjustment: sort the m finite p-values ascending, adjust the k-th
    (k = 1..m) to max over j ≤ k of min(1, (m − j + 1)·p_(j)), reject where that is ≤ alpha.
    Controls the family-wise error rate at ``alpha`` under any dependence."""
    p = np.asarray(p_values, dtype=float)
    finite = np.flatnonzero(np.isfinite(p))
    m = len(finite)
    adjusted = np.full(len(p), math.nan)
    if m:
        order = finite[np.argsort(p[finite], kind="stable")]
        scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
        adjusted[order] = np.maximum.accumulate(scaled)
    reject = tuple(bool(x <= alpha) for x in adjusted)  # NaN compares False
    return HolmResult(tuple(float(x) for x in adjusted), reject, m, alpha)
