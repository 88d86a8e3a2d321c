"""Bootstrap intervals of one run's sample metrics (issue 20) against known answers: the
point estimates are torch-fidelity's, and over many draws the intervals hold the true value
(FD of a Gaussian pair in closed form, KID = 0 between one distribution and itself, a known
accuracy) at about the nominal rate."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, kid_features_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

from lmgen.metrics.bootstrap import (
    BootstrapConfig,
    bootstrap_accuracy,
    bootstrap_fd,
    bootstrap_kid,
    bootstrap_precision_recall,
    interval_metrics,
)


def _band(p: float, n: int, k: float = 3.5) -> tuple[float, float]:
    sd = math.sqrt(p * (1 - p) / n)
    return p - k * sd, p + k * sd


def _gaussian_pair(rng: np.random.Generator, d: int, n: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Samples of N(0, I) and N(μ, 1.2² I) with |μ| = 1, and their Fréchet distance in closed
    form: |μ|² + Σ (σ1 − σ2)² for diagonal covariances."""
    mu, scale = np.full(d, 1 / math.sqrt(d)), 1.2
    fd = float(mu @ mu + d * (1 - scale) ** 2)
    return rng.normal(size=(n, d)), rng.normal(mu, scale, size=(n, d)), fd


def test_point_estimates_are_torch_fidelitys():
    rng = np.random.default_rng(0)
    g, r, _ = _gaussian_pair(rng, 6, 40)
    tg, tr = torch.from_numpy(g), torch.from_numpy(r)
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

    fd = fid_statistics_to_metric(fid_features_to_statistics(tg), fid_features_to_statistics(tr), False)
    assert bootstrap_fd(g, r, n_resamples=2).estimate == pytest.approx(fd[KEY_METRIC_FID], rel=1e-9)
    kid = kid_features_to_metric(tg, tr, kid_subsets=1, kid_subset_size=40, verbose=False)  # one subset: all
    assert bootstrap_kid(g, r, n_resamples=2).estimate == pytest.approx(kid[KEY_METRIC_KID_MEAN], rel=1e-9)
    prc = prc_features_to_metric(tg.float(), tr.float(), prc_neighborhood=3, prc_batch_size=1000, save_cpu_ram=False,
                                 verbose=False)
    ours = bootstrap_precision_recall(g, r, n_resamples=2)
    assert (ours.precision.estimate, ours.recall.estimate) == pytest.approx((prc[KEY_METRIC_PRECISION],
                                                                            prc[KEY_METRIC_RECALL]))


def test_fd_intervals_cover_the_true_distance_at_the_nominal_rate():
    """200 draws of an 8-d Gaussian pair, 200 samples a side, 150 resamples: FD's bias here is
    larger than its spread, and the basic interval still holds the true FD ≈ 95% of the time
    (a plain percentile interval: ≈ 27%)."""
    rng = np.random.default_rng(1)
    draws, covered, above = 200, 0, 0
    for i in range(draws):
        g, r, fd = _gaussian_pair(rng, 8, 200)
        interval = bootstrap_fd(g, r, n_resamples=150, seed=i)
        covered += interval.covers(fd)
        above += interval.estimate > fd
    low, high = _band(0.95, draws)
    assert low <= covered / draws <= high, covered / draws
    assert above / draws >= 0.8  # the estimate itself is mostly biased high: the interval corrects for it


def test_fd_interval_is_bias_corrected_where_the_estimate_is_far_off():
    g, r, fd = _gaussian_pair(np.random.default_rng(2), 32, 150)
    interval = bootstrap_fd(g, r, n_resamples=100)
    assert interval.method == "basic" and interval.covers(fd)
    assert interval.estimate > interval.high  # biased upward by O(D/N): beyond the interval
    fixed = bootstrap_fd(g, r, n_resamples=100, resample_reference=False)
    assert fixed.high - fixed.low < interval.high - interval.low  # the reference's own noise left out


def test_kid_intervals_hold_zero_between_one_distribution_and_itself():
    rng = np.random.default_rng(3)
    draws = 200
    covered = sum(bootstrap_kid(rng.normal(size=(80, 4)), rng.normal(size=(80, 4)), seed=i).covers(0.0)
                  for i in range(draws))
    low, high = _band(0.95, draws)
    assert low <= covered / draws <= high, covered / draws


def test_accuracy_intervals_cover_the_true_accuracy():
    rng = np.random.default_rng(4)
    draws, p, n = 400, 0.7, 200
    labels = np.arange(n) % 10
    covered = 0
    for i in range(draws):
        predictions = np.where(rng.random(n) < p, labels, (labels + 1) % 10)
        covered += bootstrap_accuracy(torch.from_numpy(predictions), labels, seed=i).covers(p)
    low, high = _band(0.95, draws)
    assert low <= covered / draws <= high, covered / draws


def test_precision_recall_intervals_bracket_their_estimates_and_move_with_the_data():
    rng = np.random.default_rng(5)
    g, r, _ = _gaussian_pair(rng, 4, 120)
    near = bootstrap_precision_recall(g, r, seed=0)
    far = bootstrap_precision_recall(g + 3.0, r, seed=0)
    for interval in (near.precision, near.recall):
        assert 0 <= interval.low <= interval.estimate <= interval.high <= 1
    assert far.precision.high < near.precision.low and far.recall.high < near.recall.low


def test_interval_metrics_are_the_keys_the_analysis_reads_and_are_reproducible():
    rng = np.random.default_rng(6)
    g, r, _ = _gaussian_pair(rng, 5, 60)
    labels = rng.integers(0, 3, 60)
    config = BootstrapConfig(n_resamples=50, seed=7)
    metrics = interval_metrics(g, r, config, predictions=labels, labels=labels)
    names = ["fd_probe", "kid_probe", "precision_probe", "recall_probe", "class_accuracy"]
    assert set(metrics) == {f"gen/{n}_ci_{side}" for n in names for side in ("low", "high")}
    assert metrics["gen/class_accuracy_ci_low"] == metrics["gen/class_accuracy_ci_high"] == 1.0
    assert metrics == interval_metrics(g, r, config, predictions=labels, labels=labels)  # the seed fixes it
    as_probe_gives_them = interval_metrics(torch.from_numpy(g).float(), torch.from_numpy(r).float(), config,
                                           predictions=torch.from_numpy(labels), labels=labels)
    assert as_probe_gives_them == pytest.approx(metrics, rel=1e-5)  # float32 tensors, as probe.features returns
    assert metrics != interval_metrics(g, r, BootstrapConfig(n_resamples=50, seed=8), predictions=labels,
                                       labels=labels)
    assert set(interval_metrics(g[:3], r[:3], config, prefix="gen/prefix_r50")) == {  # too few for a k-NN ball
        "gen/prefix_r50/fd_probe_ci_low", "gen/prefix_r50/fd_probe_ci_high", "gen/prefix_r50/kid_probe_ci_low",
        "gen/prefix_r50/kid_probe_ci_high"}
    inception = interval_metrics(g, r, config, space="inception")
    assert {"gen/fid_ci_low", "gen/kid_ci_high", "gen/precision_ci_low", "gen/recall_ci_high"} <= set(inception)


def test_paired_reconstructions_resample_pairs_together():
    """rFD: a reconstruction and its original move together; their FD's interval is narrower
    than if the two sets were drawn independently (the pairs' shared image cancels)."""
    rng = np.random.default_rng(8)
    originals = rng.normal(size=(150, 4)) * np.array([3.0, 2.0, 1.0, 0.5])
    reconstructions = 0.9 * originals + 0.1 * rng.normal(size=(150, 4))
    paired = bootstrap_fd(reconstructions, originals, paired=True)
    independent = bootstrap_fd(reconstructions, originals)
    assert paired.estimate == independent.estimate
    assert paired.high - paired.low < 0.5 * (independent.high - independent.low)
    assert paired.ci_metrics("tok/rfid_probe") == {"tok/rfid_probe_ci_low": paired.low,
                                                   "tok/rfid_probe_ci_high": paired.high}
    with pytest.raises(ValueError, match="one reference row per generated row"):
        bootstrap_fd(reconstructions[:10], originals, paired=True)


def test_bad_inputs_fail_with_a_reason():
    with pytest.raises(ValueError, match="4-d"):
        bootstrap_fd(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="N >= 2"):
        bootstrap_kid(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="one prediction per label"):
        bootstrap_accuracy(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="valid"):
        interval_metrics(np.zeros((5, 3)), np.zeros((5, 3)), space="clip")
