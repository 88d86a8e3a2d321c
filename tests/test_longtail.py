"""The long-tail view: per-class probe FD, rank correlation with class frequency, the metric keys.

An untrained (seeded) probe suffices: FD(A, A) ≈ 0 and "noise raises FD" hold for any fixed
feature map, and it costs nothing to build.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from lmgen.datasets import ShapesDataset, iter_batches
from lmgen.datasets.shapes import SceneParams
from lmgen.evaluate import _per_class_csv
from lmgen.metrics.fidelity import fidelity_metrics
from lmgen.metrics.longtail import PerClassFD, longtail_metrics, per_class_fd, rank_correlation
from lmgen.metrics.probe import Probe, ProbeInfo, ProbeNet

NUM_CLASSES = 10
LONGTAIL_KEYS = {"gen/longtail_spearman_fd", "gen/longtail_pvalue_fd",
                 "gen/longtail_spearman_accuracy", "gen/longtail_pvalue_accuracy"}


@pytest.fixture(scope="module")
def probe() -> Probe:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = ProbeNet(NUM_CLASSES, feature_dim=32, width=8)
    info = ProbeInfo(num_classes=NUM_CLASSES, image_size=16, feature_dim=32, width=8, val_accuracy=math.nan,
                     per_class_val_accuracy=(), train_fingerprint="", val_fingerprint="", key="untrained-test",
                     config={})
    return Probe(net, info)


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    """300 shapes images at 16 px with their Zipf-distributed labels (rare classes have 0-1 images)."""
    batches = list(iter_batches(ShapesDataset("val", 300, seed=0, image_size=16), batch_size=300))
    return torch.cat([b.images for b in batches]), torch.cat([b.labels for b in batches])


def _counts(labels: torch.Tensor) -> torch.Tensor:
    return torch.bincount(labels, minlength=NUM_CLASSES)


def test_per_class_fd_of_a_set_against_itself_is_zero(probe, data):
    images, labels = data
    result = per_class_fd(probe, images, labels, images, labels, NUM_CLASSES)
    assert isinstance(result, PerClassFD) and result.fd.dtype == torch.float64 and result.fd.shape == (NUM_CLASSES,)
    measured = _counts(labels) >= 2
    assert measured.sum() >= 4  # the data has enough classes for the test to mean something
    assert torch.all(result.fd[measured].abs() < 1e-3)
    assert torch.equal(result.num_generated, _counts(labels)) and torch.equal(result.num_reference, _counts(labels))


def test_classes_with_fewer_than_two_images_are_nan_and_counted(probe, data):
    images, labels = data
    gen_labels = labels.clone()
    gen_labels[gen_labels == 1] = 0  # class 1: no generated images
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[torch.nonzero(labels == 2).flatten()[1:]] = False  # class 2: one reference image
    result = per_class_fd(probe, images, gen_labels, images[keep], labels[keep], NUM_CLASSES)
    assert result.num_generated[1] == 0 and result.num_reference[2] == 1
    assert math.isnan(result.fd[1]) and math.isnan(result.fd[2])
    assert torch.equal(torch.isnan(result.fd), (result.num_generated < 2) | (result.num_reference < 2))
    assert torch.equal(result.num_reference, _counts(labels[keep]))


def test_noise_in_one_class_raises_only_that_class_fd(probe, data):
    images, labels = data
    generated, reference = images[::2], images[1::2]  # disjoint halves of one distribution
    gen_labels, ref_labels = labels[::2], labels[1::2]
    clean = per_class_fd(probe, generated, gen_labels, reference, ref_labels, NUM_CLASSES)
    target = 1  # the second most frequent class: plenty of images in both halves
    assert clean.num_generated[target] >= 10 and clean.num_reference[target] >= 10
    noisy = generated.clone()
    pick = gen_labels == target
    noisy[pick] = torch.randint(0, 256, noisy[pick].shape, generator=torch.Generator().manual_seed(0),
                                dtype=torch.uint8)
    dirty = per_class_fd(probe, noisy, gen_labels, reference, ref_labels, NUM_CLASSES)
    others = ~torch.isnan(clean.fd)
    others[target] = False
    assert dirty.fd[target] > 5 * clean.fd[target]  # measured ~11x with this seed
    torch.testing.assert_close(dirty.fd[others], clean.fd[others])  # untouched classes: same features, same FD


def test_per_class_fd_is_the_formula_of_gen_fd_probe(probe, data):
    """One class holding every image: the per-class FD equals fidelity_metrics' gen/fd_probe."""
    images, _ = data
    generated, reference = images[:150], images[150:]
    zeros = torch.zeros(150, dtype=torch.int64)
    ours = per_class_fd(probe, generated, zeros, reference, zeros, NUM_CLASSES).fd[0]
    theirs = fidelity_metrics(generated, reference, probe=probe, inception_weights="none", kinds=("fd",))
    assert float(ours) == pytest.approx(theirs.metrics["gen/fd_probe"], rel=1e-3)


def test_per_class_fd_rejects_bad_labels(probe, data):
    images, labels = data
    with pytest.raises(ValueError, match="label"):
        per_class_fd(probe, images, labels[:-1], images, labels, NUM_CLASSES)
    with pytest.raises(ValueError, match="in \\[0, 10\\)"):
        per_class_fd(probe, images, labels + NUM_CLASSES, images, labels, NUM_CLASSES)


def test_rank_correlation_matches_hand_computed_spearman():
    assert rank_correlation([1, 2, 3, 4, 5], [10, 20, 30, 40, 50]).rho == pytest.approx(1.0)
    assert rank_correlation(torch.tensor([0.5, 0.3, 0.1, 0.05]), [1, 2, 3, 9]).rho == pytest.approx(-1.0)
    # no ties: rho = 1 - 6 sum(d^2) / (n (n^2 - 1)) = 1 - 6 * 4 / 120 = 0.8
    rho, p_value = rank_correlation([1, 2, 3, 4, 5], [2, 1, 4, 3, 5])
    assert rho == pytest.approx(0.8)
    t = rho * math.sqrt(3 / (1 - rho**2))  # scipy's two-sided p: Student t with n - 2 = 3 dof
    assert p_value == pytest.approx(2 * stats.t.sf(t, 3))


def test_rank_correlation_ignores_nan_pairs_and_needs_three():
    nan = math.nan
    rho, _ = rank_correlation([1, 2, nan, 3, 4, 5], [1, 2, 9, 3, nan, 0.5])  # valid: (1,1) (2,2) (3,3) (5,.5)
    assert rho == pytest.approx(stats.spearmanr([1, 2, 3, 5], [1, 2, 3, 0.5]).statistic)
    assert rho == pytest.approx(1 - 6 * (1 + 1 + 1 + 9) / (4 * 15))  # ranks (1,2,3,4) vs (2,3,4,1): -0.2
    assert all(math.isnan(v) for v in rank_correlation([1, 2, nan, 4], [1, 2, 3, nan]))
    assert all(math.isnan(v) for v in rank_correlation([1, 2, 3], [7, 7, 7]))  # constant: undefined, no warning
    with pytest.raises(ValueError, match="same length"):
        rank_correlation([1, 2, 3], [1, 2])


def test_longtail_metrics_keys_and_signs():
    freq = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    fd = torch.tensor([1.0, 2.0, 3.0, 5.0, 8.0, 13.0], dtype=torch.float64)  # rare classes generated worse
    acc = np.array([0.9, 0.8, 0.7, 0.5, 0.3, 0.1])  # and recognised less often
    metrics = longtail_metrics(freq, fd, acc, prefix="gen")
    assert set(metrics) == LONGTAIL_KEYS
    assert metrics["gen/longtail_spearman_fd"] == pytest.approx(-1.0)
    assert metrics["gen/longtail_spearman_accuracy"] == pytest.approx(1.0)
    assert 0.0 <= metrics["gen/longtail_pvalue_fd"] < 0.01
    assert set(longtail_metrics(freq, fd, acc, prefix="val")) == {k.replace("gen/", "val/") for k in LONGTAIL_KEYS}


def test_longtail_metrics_omits_nan(caplog):
    freq = torch.tensor([0.5, 0.3, 0.2])
    fd = torch.full((3,), math.nan, dtype=torch.float64)  # every class below 2 samples
    with caplog.at_level("INFO", logger="lmgen.metrics.longtail"):
        metrics = longtail_metrics(freq, fd, [1.0, 0.5, 0.0])
    assert set(metrics) == {"gen/longtail_spearman_accuracy", "gen/longtail_pvalue_accuracy"}
    assert "gen/longtail_spearman_fd" in caplog.text


def test_per_class_csv_has_fd_and_reference_columns():
    train = ShapesDataset("train", 200, seed=0, image_size=16, scene=SceneParams(num_classes=3))
    acc = {"per_class_count": np.array([2, 1, 0]), "per_class_accuracy": np.array([0.5, 1.0, math.nan])}
    fd = PerClassFD(fd=torch.tensor([1.25, math.nan, math.nan], dtype=torch.float64),
                    num_generated=torch.tensor([2, 1, 0]), num_reference=torch.tensor([7, 3, 0]))
    lines = _per_class_csv(train, acc, fd).splitlines()
    assert lines[0] == "class,name,train_frequency,num_samples,class_accuracy,fd_probe,num_reference"
    rows = [line.split(",") for line in lines[1:]]
    assert len(rows) == 3 and [r[5] for r in rows] == ["1.25", "", ""] and [r[6] for r in rows] == ["7", "3", "0"]
    assert sum(float(r[2]) for r in rows) == pytest.approx(1.0, abs=1e-5)
