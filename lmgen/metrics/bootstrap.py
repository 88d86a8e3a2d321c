"""Bootstrap intervals of one run's sample metrics: where FD, KID, precision/recall and class
accuracy could lie given that they were measured on a finite draw of generated (and reference)
samples — what ``analysis`` shows for a configuration run with a single seed.

Pure functions on feature arrays (numpy or torch, (N, D) float) and labels; no MLflow, no
images. The evaluation extracts the features once, as torch-fidelity does internally:

    gen = probe.features(generated_images)          # float32 (N, feature_dim): FEATURE_LAYER
    ref = probe.features(reference_images)          # float32 (M, feature_dim), or the refcache's
    config = BootstrapConfig(n_resamples=200, seed=cfg.seed)
    metrics = interval_metrics(gen, ref, config, prefix="gen", space="probe",
                               predictions=probe.predict(images), labels=asked_classes)
    tracker.log_metrics(run_id, metrics)           # gen/fd_probe_ci_low, gen/fd_probe_ci_high, ...
    tracker.log_params(run_id, {"metrics.bootstrap_resamples": config.n_resamples})

    # reconstructions: pairs of one image, resampled together
    rfd = bootstrap_fd(recon_features, original_features, n_resamples=200, seed=cfg.seed, paired=True)
    tracker.log_metrics(run_id, rfd.ci_metrics("tok/rfid_probe"))  # tok/rfid_probe_ci_low, _ci_high

Each resample draws the generated set with replacement and, by default
(``resample_reference=True``), the reference set too: the reference is itself a sample of
the data, and holding it fixed under-covers (KID, N = M = 150, D = 4: 58% of 95% intervals
held the expected value with the reference fixed, 95% with both resampled). The point
estimate is the statistic on the samples as given. Intervals per statistic (coverage of the
true value by 95% intervals in simulation, both sets resampled):

- FD (torch-fidelity's own ``fid_features_to_statistics`` / ``fid_statistics_to_metric``):
  the *basic* (reverse-percentile) interval [2·FD − q_high, 2·FD − q_low], clipped at 0.
  FD is biased upward by O(D/N) and a resample adds that bias again, so the plain percentile
  interval sits above the estimate and seldom holds the true distance (0 of 60 at D = 64,
  N = M = 500; 27% at D = 8, N = 200), while the basic interval corrects the bias to first
  order (93% and 94% there). It can therefore lie wholly below the logged FD: read it as
  where the true distance is, and the logged value as biased high at small N.
- KID (percentile; 95% at N = M = 150, D = 4): the unbiased MMD² with torch-fidelity's
  polynomial kernel (``kernel_poly``: degree 3, gamma 1/D, coef0 1) on all pairs; a resample
  leaves out the pairs of an image with its own copies, so duplicates do not bias it.
  torch-fidelity's ``gen/kid_probe`` averages the same estimator over random subsets: the
  same expectation, not the same number unless one subset is all of both sets.
- precision / recall (percentile; 99% and 93% of their expected values at N = M = 150,
  D = 4; Kynkäänniemi et al. 2019 in torch-fidelity's convention: a generated sample is
  precise if it lies in some reference sample's k-NN ball, a reference sample is recalled if
  it lies in some generated sample's ball): the balls are built on the distinct samples a
  resample holds (a copy adds no new point to a manifold estimate), the fractions count
  every draw.
- class accuracy (percentile): the mean of per-sample hits, resampled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import kernel_poly

DEFAULT_RESAMPLES = 200
CONFIDENCE = 0.95
PRC_NEIGHBORHOOD = 3  # torch-fidelity's default k, as lmgen.metrics.fidelity uses
ArrayLike = np.ndarray | Tensor
CI_LOW, CI_HIGH = "_ci_low", "_ci_high"  # metric key suffixes: gen/fd_probe_ci_low
# statistic -> metric name per feature space, as lmgen.metrics.fidelity names the values
METRIC_NAMES = {
    "probe": {"fd": "fd_probe", "kid": "kid_probe", "precision": "precision_probe", "recall": "recall_probe"},
    "inception": {"fd": "fid", "kid": "kid", "precision": "precision", "recall": "recall"},
}


@dataclass(frozen=True)
class BootstrapInterval:
    """A statistic on the samples as given (``estimate``) and its bootstrap interval [``low``,
    ``high``] at ``confidence`` over ``n_resamples`` resamples (those the statistic was defined
    on: a resample of copies of too few images is left out); ``method`` "percentile" or
    "basic" (reverse percentile, bias-corrected: FD)."""

    estimate: float
    low: float
    high: float
    n_resamples: int
    confidence: float = CONFIDENCE
    method: str = "percentile"

    def ci_metrics(self, key: str) -> dict[str, float]:
        """``{key_ci_low: low, key_ci_high: high}``: the MLflow metrics the analysis reads beside
        ``key`` (the point value stays the one torch-fidelity logged under ``key``)."""
        return {key + CI_LOW: self.low, key + CI_HIGH: self.high}

    def covers(self, value: float) -> bool:
        return self.low <= value <= self.high


@dataclass(frozen=True)
class PrecisionRecallIntervals:
    """Precision and recall, each with its interval (from the same resamples)."""

    precision: BootstrapInterval
    recall: BootstrapInterval


def _features(x: ArrayLike, name: str) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    if a.ndim != 2 or len(a) < 2 or not np.isfinite(a).all():
        raise ValueError(f"{name} features must be a finite (N, D) array with N >= 2, got shape {a.shape}")
    return a.astype(np.float64)


def _pair(generated: ArrayLike, reference: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    g, r = _features(generated, "generated"), _features(reference, "reference")
    if g.shape[1] != r.shape[1]:
        raise ValueError(f"generated features are {g.shape[1]}-d, reference {r.shape[1]}-d")
    return g, r


def _counts(rng: np.random.Generator, n: int, n_resamples: int) -> np.ndarray:
    """(n_resamples, n) int64: how often each sample is drawn in each resample (sums to n)."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_resamples)


def _quantiles(values: np.ndarray, confidence: float) -> tuple[float, float, int]:
    """The (1 ∓ confidence)/2 quantiles of the finite ``values`` (a resample too degenerate for
    the statistic is NaN and left out) and how many there were; NaN when none."""
    values = values[np.isfinite(values)]
    if not len(values):
        return math.nan, math.nan, 0
    tail = (1 - confidence) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return float(low), float(high), len(values)


def _interval(estimate: float, values: np.ndarray, confidence: float) -> BootstrapInterval:
    """Percentile interval of the resampled ``values``."""
    low, high, n = _quantiles(values, confidence)
    return BootstrapInterval(float(estimate), low, high, n, confidence)


def _basic_interval(estimate: float, values: np.ndarray, confidence: float, floor: float) -> BootstrapInterval:
    """Basic (reverse-percentile) interval [2θ − q_high, 2θ − q_low], not below ``floor``."""
    q_low, q_high, n = _quantiles(values, confidence)
    low, high = max(2 * estimate - q_high, floor), max(2 * estimate - q_low, floor)
    return BootstrapInterval(float(estimate), low, high, n, confidence, "basic")


def _check(n_resamples: int, confidence: float) -> None:
    if n_resamples < 1 or not 0 < confidence < 1:
        raise ValueError(f"need n_resamples >= 1 and 0 < confidence < 1, got {n_resamples}, {confidence}")


def _resampled(counts: np.ndarray) -> np.ndarray:
    """Indices of one resample from its counts."""
    return np.repeat(np.arange(len(counts)), counts)


def _fd(generated: np.ndarray, reference_stats: dict[str, np.ndarray]) -> float:
    stats = fid_features_to_statistics(torch.from_numpy(np.ascontiguousarray(generated)))
    return float(fid_statistics_to_metric(stats, reference_stats, verbose=False)[KEY_METRIC_FID])


def bootstrap_fd(generated: ArrayLike, reference: ArrayLike, *, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                 confidence: float = CONFIDENCE, resample_reference: bool = True,
                 paired: bool = False) -> BootstrapInterval:
    """Fréchet distance between ``generated`` (N, D) and ``reference`` (M, D) features, with its
    basic bootstrap interval (module doc). ``paired``: row i of both is one image (a
    reconstruction and its original, N = M): both sides are resampled with the same indices.
    About 0.5 s for N = M = 500, D = 128, 200 resamples on one core."""
    _check(n_resamples, confidence)
    g, r = _pair(generated, reference)
    if paired and len(g) != len(r):
        raise ValueError(f"paired features need one reference row per generated row, got {len(g)} and {len(r)}")
    rng = np.random.default_rng(seed)
    r_stats = fid_features_to_statistics(torch.from_numpy(r))
    point = _fd(g, r_stats)
    g_counts = _counts(rng, len(g), n_resamples)
    r_counts = g_counts if paired else _counts(rng, len(r), n_resamples) if resample_reference else None
    values = np.empty(n_resamples)
    for b in range(n_resamples):
        ref_stats = r_stats
        if r_counts is not None:
            ref_stats = fid_features_to_statistics(torch.from_numpy(r[_resampled(r_counts[b])]))
        values[b] = _fd(g[_resampled(g_counts[b])], ref_stats)
    return _basic_interval(point, values, confidence, floor=0.0)


def _within_mean(kernel: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per resample: mean of k(x_i, x_j) over the drawn pairs i ≠ j of distinct originals.
    kernel: (n, n); counts: (B, n) → (B,)."""
    total = np.einsum("bi,ij,bj->b", counts, kernel, counts)
    same = (counts.astype(np.float64) ** 2) @ np.diag(kernel)  # an image with itself or its copies
    pairs = counts.sum(1).astype(np.float64) ** 2 - (counts.astype(np.float64) ** 2).sum(1)
    # a resample of copies of one image has no pair: NaN, left out of the interval
    return np.divide(total - same, pairs, out=np.full(len(pairs), np.nan), where=pairs > 0)


def _kid(k_gg: np.ndarray, k_rr: np.ndarray, k_gr: np.ndarray, g_counts: np.ndarray,
         r_counts: np.ndarray) -> np.ndarray:
    """Unbiased MMD² per resample (counts (B, n) and (B, m))."""
    cross = np.einsum("bi,ij,bj->b", g_counts, k_gr, r_counts) / (g_counts.sum(1) * r_counts.sum(1))
    return _within_mean(k_gg, g_counts) + _within_mean(k_rr, r_counts) - 2 * cross


def bootstrap_kid(generated: ArrayLike, reference: ArrayLike, *, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                  confidence: float = CONFIDENCE, resample_reference: bool = True) -> BootstrapInterval:
    """Kernel distance (unbiased MMD², torch-fidelity's polynomial kernel) between ``generated``
    (N, D) and ``reference`` (M, D) features, with its bootstrap interval (module doc)."""
    _check(n_resamples, confidence)
    g, r = _pair(generated, reference)
    rng = np.random.default_rng(seed)
    k_gg, k_rr, k_gr = kernel_poly(g, g), kernel_poly(r, r), kernel_poly(g, r)
    ones_g, ones_r = np.ones((1, len(g)), dtype=np.int64), np.ones((1, len(r)), dtype=np.int64)
    point = float(_kid(k_gg, k_rr, k_gr, ones_g, ones_r)[0])
    g_counts = _counts(rng, len(g), n_resamples)
    r_counts = _counts(rng, len(r), n_resamples) if resample_reference else np.repeat(ones_r, n_resamples, 0)
    return _interval(point, _kid(k_gg, k_rr, k_gr, g_counts, r_counts), confidence)


def _radii(distances: np.ndarray, support: np.ndarray, k: int) -> np.ndarray:
    """k-NN radius of each sample in ``support`` among the samples in ``support`` (itself at
    distance 0 counts as its own first neighbour, as in torch-fidelity)."""
    within = distances[np.ix_(support, support)]
    return np.partition(within, k, axis=1)[:, k]


def _coverage(cross: np.ndarray, support: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """(rows,) bool: is row i within some ball of the ``support`` columns of ``cross``?"""
    return (cross[:, support] <= radii[None, :]).any(axis=1)


def _prc(d_gg: np.ndarray, d_rr: np.ndarray, d_gr: np.ndarray, g_counts: np.ndarray, r_counts: np.ndarray,
         k: int) -> tuple[float, float]:
    g_support, r_support = np.flatnonzero(g_counts), np.flatnonzero(r_counts)
    if min(len(g_support), len(r_support)) <= k:
        return np.nan, np.nan  # fewer distinct samples than a ball needs
    precise = _coverage(d_gr, r_support, _radii(d_rr, r_support, k))  # (n,)
    recalled = _coverage(d_gr.T, g_support, _radii(d_gg, g_support, k))  # (m,)
    return float(g_counts @ precise / g_counts.sum()), float(r_counts @ recalled / r_counts.sum())


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return torch.cdist(torch.from_numpy(a), torch.from_numpy(b)).numpy()


def bootstrap_precision_recall(generated: ArrayLike, reference: ArrayLike, *, n_resamples: int = DEFAULT_RESAMPLES,
                               seed: int = 0, confidence: float = CONFIDENCE, resample_reference: bool = True,
                               neighborhood: int = PRC_NEIGHBORHOOD) -> PrecisionRecallIntervals:
    """Precision and recall (k = ``neighborhood``) of ``generated`` (N, D) against ``reference``
    (M, D) features, each with its bootstrap interval (module doc); N, M > ``neighborhood``."""
    _check(n_resamples, confidence)
    g, r = _pair(generated, reference)
    if min(len(g), len(r)) <= neighborhood:
        raise ValueError(f"precision/recall need more than neighborhood={neighborhood} samples per set")
    rng = np.random.default_rng(seed)
    d_gg, d_rr, d_gr = _distances(g, g), _distances(r, r), _distances(g, r)
    ones_g, ones_r = np.ones(len(g), dtype=np.int64), np.ones(len(r), dtype=np.int64)
    point = _prc(d_gg, d_rr, d_gr, ones_g, ones_r, neighborhood)
    g_counts = _counts(rng, len(g), n_resamples)
    r_counts = _counts(rng, len(r), n_resamples) if resample_reference else np.repeat(ones_r[None], n_resamples, 0)
    values = np.array([_prc(d_gg, d_rr, d_gr, gc, rc, neighborhood) for gc, rc in zip(g_counts, r_counts)])
    return PrecisionRecallIntervals(_interval(point[0], values[:, 0], confidence),
                                    _interval(point[1], values[:, 1], confidence))


def bootstrap_accuracy(predictions: ArrayLike, labels: ArrayLike, *, n_resamples: int = DEFAULT_RESAMPLES,
                       seed: int = 0, confidence: float = CONFIDENCE) -> BootstrapInterval:
    """Class accuracy of ``predictions`` (N,) int against ``labels`` (N,) int (the probe's
    ``predict`` on class-conditional samples and the classes asked for), with its interval."""
    _check(n_resamples, confidence)
    pred, true = (np.asarray(x.cpu() if isinstance(x, Tensor) else x).ravel() for x in (predictions, labels))
    if pred.shape != true.shape or len(pred) == 0:
        raise ValueError(f"need one prediction per label, got {pred.shape} and {true.shape}")
    hits = (pred == true).astype(np.float64)
    counts = _counts(np.random.default_rng(seed), len(hits), n_resamples)
    return _interval(float(hits.mean()), counts @ hits / len(hits), confidence)


@dataclass(frozen=True)
class BootstrapConfig:
    """How ``interval_metrics`` resamples: ``n_resamples`` draws (logged as the param
    ``metrics.bootstrap_resamples``), its ``seed``, the interval's ``confidence``, whether the
    reference set is resampled too, and precision/recall's k."""

    n_resamples: int = DEFAULT_RESAMPLES
    seed: int = 0
    confidence: float = CONFIDENCE
    resample_reference: bool = True
    neighborhood: int = PRC_NEIGHBORHOOD


def interval_metrics(generated: ArrayLike, reference: ArrayLike, config: BootstrapConfig = BootstrapConfig(), *,
                     prefix: str = "gen", space: str = "probe", predictions: ArrayLike | None = None,
                     labels: ArrayLike | None = None) -> dict[str, float]:
    """Every interval the analysis reads, as MLflow metrics named as ``lmgen.metrics.fidelity``
    names the values: ``{prefix}/fd_probe_ci_low`` / ``_ci_high``, and the same for
    ``kid_probe``, ``precision_probe`` and ``recall_probe`` (``space="inception"``: ``fid``,
    ``kid``, ``precision``, ``recall``), plus ``{prefix}/class_accuracy_ci_low`` / ``_ci_high``
    with ``predictions`` and ``labels``.

    generated: (N, D), reference: (M, D) float features from the probe's feature layer, as
    torch-fidelity sees them (``probe.features(images)``); predictions, labels: int (K,).
    Only the interval bounds: the point values stay those torch-fidelity logged. Each
    statistic gets its own stream of ``config.seed``; precision/recall are left out when a
    set has ≤ ``config.neighborhood`` samples.
    """
    if space not in METRIC_NAMES:
        raise ValueError(f"unknown feature space {space!r}; valid: {sorted(METRIC_NAMES)}")
    g, r = _pair(generated, reference)
    c, names = config, METRIC_NAMES[space]
    sides = {"n_resamples": c.n_resamples, "confidence": c.confidence, "resample_reference": c.resample_reference}
    out = {**bootstrap_fd(g, r, seed=c.seed, **sides).ci_metrics(f"{prefix}/{names['fd']}"),
           **bootstrap_kid(g, r, seed=c.seed + 1, **sides).ci_metrics(f"{prefix}/{names['kid']}")}
    if min(len(g), len(r)) > c.neighborhood:
        prc = bootstrap_precision_recall(g, r, seed=c.seed + 2, neighborhood=c.neighborhood, **sides)
        out.update(prc.precision.ci_metrics(f"{prefix}/{names['precision']}"))
        out.update(prc.recall.ci_metrics(f"{prefix}/{names['recall']}"))
    if predictions is not None and labels is not None:
        accuracy = bootstrap_accuracy(predictions, labels, n_resamples=c.n_resamples, seed=c.seed + 3,
                                      confidence=c.confidence)
        out.update(accuracy.ci_metrics(f"{prefix}/class_accuracy"))
    return out
