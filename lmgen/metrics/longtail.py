"""The long-tail view: per-class probe FD and class accuracy against class frequency in the train split.

JPEG-LM (Han et al. 2024, Fig. 4) plots per-class FID against class frequency and finds the
codec-byte LM's advantage grows for rare classes (p = 0.0002). ``shapes`` has Zipf class
frequencies known exactly (``train_ds.class_counts()``), so the same question has ground
truth here: is a class's sample quality rank-correlated with how often it was seen?

- ``per_class_fd``: Fréchet distance in the probe's feature space, one per class, computed
  with torch-fidelity's own statistics and distance functions (the formula of
  ``gen/fd_probe``, restricted to one class of generated and one class of reference images).
- ``rank_correlation``: Spearman's rho with its two-sided p-value, NaN pairs ignored.
- ``longtail_metrics``: ``{prefix}/longtail_spearman_{fd,accuracy}`` and
  ``{prefix}/longtail_pvalue_{fd,accuracy}``. On a long tail, FD should be worse (higher) for
  rare classes, i.e. rho(frequency, FD) < 0; accuracy should be lower, i.e. rho > 0.

Noise caveat: samples are drawn class-balanced (round-robin), so each class gets
``num_samples / num_classes`` samples, and a Fréchet distance estimated from a handful of
images in a 128-d feature space is dominated by estimator bias (rank-deficient covariances).
Per-class FD compares classes fairly only when they have equal sample counts (they do, up to
one), and is meaningful only with tens of samples per class or more. With 10 classes the
rank correlation rests on 10 points: read its p-value, not just rho.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from scipy import stats
from torch import Tensor
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

from lmgen.metrics.probe import Probe

log = logging.getLogger(__name__)

MIN_IMAGES_PER_CLASS = 2  # a covariance needs two images
MIN_PAIRS = 3  # fewer (frequency, score) pairs make a rank correlation meaningless


@dataclass(frozen=True)
class PerClassFD:
    """fd: float64 (C,) probe Fréchet distance per class, NaN where a class has fewer than 2
    generated or 2 reference images; num_generated, num_reference: int64 (C,) images per class."""

    fd: Tensor
    num_generated: Tensor
    num_reference: Tensor


class RankCorrelation(NamedTuple):
    """Spearman's rho in [-1, 1] and its two-sided p-value; both NaN when undefined."""

    rho: float
    p_value: float


def _labels(labels: Tensor, n: int, num_classes: int, name: str) -> Tensor:
    labels = torch.as_tensor(labels).to(torch.int64).cpu()
    if labels.shape != (n,):
        raise ValueError(f"need one {name} label per image: {n} images, labels of shape {tuple(labels.shape)}")
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{name} labels must lie in [0, {num_classes})")
    return labels


def per_class_fd(
    probe: Probe, generated: Tensor, generated_labels: Tensor, reference: Tensor, reference_labels: Tensor,
    num_classes: int,
) -> PerClassFD:
    """Probe Fréchet distance between each class's generated and reference images.

    generated: uint8 (N, 3, H, W) with generated_labels int (N,) (the class asked for);
    reference: uint8 (M, 3, H, W) with reference_labels int (M,) (true labels); labels in
    [0, num_classes). Features are extracted once per set (``probe.features``, float32, the
    space of ``gen/fd_probe``), then split by class; statistics and distance are
    torch-fidelity's ``fid_features_to_statistics`` / ``fid_statistics_to_metric``.

    With few images per class the estimate is biased upwards and noisy (see the module
    docstring): compare classes at equal sample counts only.
    """
    gen_labels = _labels(generated_labels, len(generated), num_classes, "generated")
    ref_labels = _labels(reference_labels, len(reference), num_classes, "reference")
    gen_feats, ref_feats = probe.features(generated), probe.features(reference)  # float32 (N, D), (M, D)
    num_gen = torch.bincount(gen_labels, minlength=num_classes)
    num_ref = torch.bincount(ref_labels, minlength=num_classes)
    fd = torch.full((num_classes,), float("nan"), dtype=torch.float64)
    for c in range(num_classes):
        if num_gen[c] < MIN_IMAGES_PER_CLASS or num_ref[c] < MIN_IMAGES_PER_CLASS:
            continue
        stat_gen = fid_features_to_statistics(gen_feats[gen_labels == c])
        stat_ref = fid_features_to_statistics(ref_feats[ref_labels == c])
        fd[c] = fid_statistics_to_metric(stat_gen, stat_ref, verbose=False)[KEY_METRIC_FID]
    return PerClassFD(fd=fd, num_generated=num_gen, num_reference=num_ref)


def rank_correlation(x: Tensor | np.ndarray, y: Tensor | np.ndarray) -> RankCorrelation:
    """Spearman rank correlation of two (C,) sequences, pairs with a NaN in either left out.

    Returns ``(rho, p_value)`` (two-sided p, ``scipy.stats.spearmanr``); both NaN with fewer
    than 3 valid pairs or when either side is constant over them.
    """
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same length, got {x.shape[0]} and {y.shape[0]}")
    keep = ~(np.isnan(x) | np.isnan(y))
    if keep.sum() < MIN_PAIRS:
        return RankCorrelation(math.nan, math.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)  # constant side: NaN is the answer
        result = stats.spearmanr(x[keep], y[keep])
    return RankCorrelation(float(result.statistic), float(result.pvalue))


def longtail_metrics(
    train_frequency: Tensor | np.ndarray,
    per_class_fd: Tensor | np.ndarray,
    per_class_accuracy: Tensor | np.ndarray,
    prefix: str = "gen",
) -> dict[str, float]:
    """Rank correlations of per-class scores with train-split class frequency, for MLflow.

    All inputs are (C,) per class (NaN = not measured). Keys: ``{prefix}/longtail_spearman_fd``,
    ``{prefix}/longtail_pvalue_fd`` (negative rho: rare classes are generated worse),
    ``{prefix}/longtail_spearman_accuracy``, ``{prefix}/longtail_pvalue_accuracy`` (positive
    rho: rare classes are recognised less often). A key whose value is NaN is omitted (MLflow
    would store NaN, but a NaN here only means "too few classes measured") and the reason logged.
    """
    out: dict[str, float] = {}
    for name, scores in (("fd", per_class_fd), ("accuracy", per_class_accuracy)):
        rho, p_value = rank_correlation(train_frequency, scores)
        keys = {f"{prefix}/longtail_spearman_{name}": rho, f"{prefix}/longtail_pvalue_{name}": p_value}
        kept = {k: v for k, v in keys.items() if not math.isnan(v)}
        if len(kept) < len(keys):
            valid = int((~np.isnan(np.asarray(scores, dtype=np.float64))).sum())
            log.info("omitting %s: per-class %s is measured for %d classes (needs %d, not all equal)",
                     ", ".join(sorted(keys.keys() - kept.keys())), name, valid, MIN_PAIRS)
        out.update(kept)
    return out
