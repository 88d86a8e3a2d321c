"""The offline fidelity metrics: probe training and caching, probe FD/KID/PR through torch-fidelity, Inception skips.

One probe is trained per session (~25 s on one thread) on 2000 ``shapes`` images; every
other test reuses it, or its cache file.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch
import torch_fidelity
from scipy import linalg

import lmgen.metrics.fidelity as fidelity
import lmgen.metrics.probe as probe_mod
from lmgen.datasets import ShapesDataset, iter_batches
from lmgen.metrics.fidelity import class_accuracy, fidelity_metrics, resolve_inception_weights, rfid_metrics
from lmgen.metrics.probe import Probe, ProbeConfig, load_or_train_probe, registered_probe

# 2000 images x 15 epochs measured 0.655 val accuracy (majority class: ~0.5 of val); the
# assertion keeps ~0.07 of margin for other CPUs / BLAS builds.
TEST_CFG = ProbeConfig(epochs=15, batch_size=64, lr=6e-3, seed=0)
MIN_VAL_ACCURACY = 0.58
INCEPTION_KEYS = ("gen/fid", "gen/is", "gen/kid", "gen/precision", "gen/recall")
PROBE_KEYS = ("gen/fd_probe", "gen/precision_probe", "gen/recall_probe", "gen/kid_probe")


@pytest.fixture(scope="module")
def splits():
    return ShapesDataset("train", 2000, seed=0), ShapesDataset("val", 600, seed=0)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("probe-cache")


@pytest.fixture(scope="module")
def probe(splits, cache_dir) -> Probe:
    return load_or_train_probe(*splits, cache_dir, TEST_CFG)


@pytest.fixture(scope="module")
def val_data(splits):
    batches = list(iter_batches(splits[1], batch_size=256))
    return torch.cat([b.images for b in batches]), torch.cat([b.labels for b in batches])


@pytest.fixture(scope="module")
def halves(val_data):
    """Two disjoint halves (300 / 300) of the val split: same distribution, different images."""
    images = val_data[0]
    return images[:300], images[300:]


def _noisy(images: torch.Tensor, std: float, seed: int = 0) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)) * std
    return (images.float() + noise).round().clamp(0, 255).to(torch.uint8)


def _same_info(a: Probe, b: Probe) -> bool:
    """ProbeInfo equality where NaN (a class absent from val) equals NaN."""
    nan_free = [dataclasses.replace(p.info, per_class_val_accuracy=()) for p in (a, b)]
    return nan_free[0] == nan_free[1] and np.array_equal(
        a.info.per_class_val_accuracy, b.info.per_class_val_accuracy, equal_nan=True
    )


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Independent reference: FD = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 sqrtm(S_a S_b)), in float64."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s_a @ s_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean))


def test_probe_learns_the_classes(probe, splits, val_data):
    majority = float(splits[1].class_counts().max()) / len(splits[1])
    assert probe.val_accuracy >= MIN_VAL_ACCURACY > majority + 0.05, (probe.val_accuracy, majority)
    assert probe.num_classes == 10 and probe.image_size == 32
    assert len(probe.info.per_class_val_accuracy) == 10
    images = val_data[0][:50]
    feats = probe.features(images)
    assert feats.shape == (50, TEST_CFG.feature_dim) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all() and feats.std(0).sum() > 0
    pred = probe.predict(images)
    assert pred.shape == (50,) and pred.dtype == torch.int64
    assert pred.min() >= 0 and pred.max() < 10


def test_probe_cache_hit_loads_without_training(probe, splits, cache_dir, monkeypatch, val_data):
    files = list(cache_dir.glob("probe-*.pt"))
    assert [f.name for f in files] == [f"probe-{probe.info.key}.pt"]  # one file, no temp left over
    mtime = files[0].stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("cache hit expected, but the probe was retrained")

    monkeypatch.setattr(probe_mod, "train_probe", no_training)
    again = load_or_train_probe(*splits, cache_dir, TEST_CFG)
    assert files[0].stat().st_mtime_ns == mtime
    assert _same_info(again, probe)
    assert torch.equal(again.features(val_data[0][:64]), probe.features(val_data[0][:64]))
    # a different config is a different probe: the cache must miss
    with pytest.raises(AssertionError, match="cache hit expected"):
        load_or_train_probe(*splits, cache_dir, ProbeConfig(epochs=1))


def test_probe_training_is_deterministic(splits, val_data):
    cfg = ProbeConfig(epochs=1, max_train_images=200, max_val_images=100, seed=3)
    first, second = (probe_mod.train_probe(*splits, cfg) for _ in range(2))
    assert _same_info(first, second)
    assert torch.equal(first.features(val_data[0][:32]), second.features(val_data[0][:32]))


def test_damaged_cache_file_is_retrained(splits, tmp_path):
    cfg = ProbeConfig(epochs=1, max_train_images=100, max_val_images=50)
    path = tmp_path / f"probe-{probe_mod.probe_key(*splits, cfg)}.pt"
    path.write_bytes(b"half a file")
    probe = load_or_train_probe(*splits, tmp_path, cfg)
    assert _same_info(Probe.load(path), probe)


def test_probe_state_round_trip(probe, val_data):
    restored = Probe.from_state(probe.state_dict())
    assert torch.equal(restored.features(val_data[0][:32]), probe.features(val_data[0][:32]))


def test_fd_real_vs_real_small_noise_large(probe, halves):
    real_a, real_b = halves
    same = fidelity_metrics(real_a, real_b, probe=probe, inception_weights="none")
    noise = torch.randint(0, 256, real_a.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    far = fidelity_metrics(noise, real_b, probe=probe, inception_weights="none")
    fd_same, fd_far = same.metrics["gen/fd_probe"], far.metrics["gen/fd_probe"]
    assert 0 <= fd_same < 5.0 and fd_far > 50 * fd_same, (fd_same, fd_far)
    assert same.metrics["gen/kid_probe"] < 0.05 * far.metrics["gen/kid_probe"]
    for result in (same, far):
        assert set(PROBE_KEYS) <= set(result.metrics)
        assert all(0.0 <= result.metrics[k] <= 1.0 for k in ("gen/precision_probe", "gen/recall_probe"))
        assert result.metrics["gen/num_samples"] == 300 and result.metrics["gen/num_reference"] == 300
    assert same.metrics["gen/recall_probe"] >= 0.7 and same.metrics["gen/precision_probe"] >= 0.7
    assert far.metrics["gen/precision_probe"] <= 0.1
    assert same.params["gen.probe.extractor"] == "lmgen-probe" and same.params["gen.reference"] == "val"
    assert not probe_mod._LIVE_PROBES  # the in-memory registration is gone after the call


def test_fd_grows_with_corruption(probe, halves):
    real_a, real_b = halves
    fds = [fidelity_metrics(_noisy(real_a, std), real_b, probe=probe, inception_weights="none").metrics["gen/fd_probe"]
           for std in (12.0, 32.0, 80.0)]  # fmt: skip
    assert fds[0] < fds[1] < fds[2], fds


def test_fd_matches_independent_frechet_distance(probe, halves):
    """The features torch-fidelity sees are the probe's: our FD equals scipy's on Probe.features."""
    real_a, real_b = halves
    for generated in (real_a, _noisy(real_a, 32.0)):
        ours = fidelity_metrics(generated, real_b, probe=probe, inception_weights="none", kinds=("fd",))
        ref = _frechet(probe.features(generated).numpy(), probe.features(real_b).numpy())
        assert ours.metrics["gen/fd_probe"] == pytest.approx(ref, rel=1e-3), (ours.metrics, ref)


def test_extractor_reads_a_probe_file(probe, halves, cache_dir):
    """The registered "lmgen-probe" extractor also takes a probe file path, as torch-fidelity's own kwargs allow."""
    real_a, real_b = halves
    kwargs = dict(input1=fidelity._UInt8Images(real_a), input2=fidelity._UInt8Images(real_b), fid=True, cuda=False,
                  cache=False, verbose=False, save_cpu_ram=True, feature_extractor="lmgen-probe")  # fmt: skip
    from_file = torch_fidelity.calculate_metrics(
        feature_extractor_weights_path=str(cache_dir / f"probe-{probe.info.key}.pt"), **kwargs
    )
    with registered_probe(probe) as probe_id:
        from_memory = torch_fidelity.calculate_metrics(feature_extractor_weights_path=probe_id, **kwargs)
    assert from_file == from_memory
    with pytest.raises(ValueError, match="no longer registered"):
        torch_fidelity.calculate_metrics(feature_extractor_weights_path=probe_id, **kwargs)


def test_inception_none_is_skipped(probe, halves):
    result = fidelity_metrics(*halves, probe=probe, inception_weights="none")
    assert set(INCEPTION_KEYS) <= set(result.skipped)
    assert not set(INCEPTION_KEYS) & set(result.metrics)
    assert "disabled" in result.skipped["gen/fid"]


def test_inception_auto_offline_is_skipped_quickly(probe, halves, tmp_path, monkeypatch):
    # an empty torch hub cache and a refused connection: offline, whatever this machine's network
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(fidelity, "INCEPTION_URL", "http://127.0.0.1:9/weights-inception-2015-12-05-6726825d.pth")
    start = time.perf_counter()
    result = fidelity_metrics(*halves, probe=probe, inception_weights="auto")
    assert time.perf_counter() - start < 30
    assert set(INCEPTION_KEYS) <= set(result.skipped)
    assert "download" in result.skipped["gen/fid"] and "inception_weights=PATH" in result.skipped["gen/fid"]
    assert "gen/fd_probe" in result.metrics  # the probe metrics still arrive


def test_inception_auto_uses_the_cached_file_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = fidelity.inception_cache_path()
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not really weights")

    def no_download(*args, **kwargs):
        raise AssertionError("must not download when the weights are cached")

    monkeypatch.setattr(fidelity, "_download", no_download)
    assert resolve_inception_weights("auto") == cached


def test_inception_metrics_with_a_weights_file(probe, halves, tmp_path, monkeypatch):
    """The Inception path end to end, with random weights (the real ones need a network): every key arrives."""
    from torch_fidelity import feature_extractor_inceptionv3 as inception

    monkeypatch.setattr(inception, "load_state_dict_from_url", lambda *a, **k: None)
    monkeypatch.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    weights = tmp_path / "inception.pth"
    torch.save({k: v.half() for k, v in model.state_dict().items()}, weights)  # half: a smaller temp file
    monkeypatch.undo()
    result = fidelity_metrics(halves[0][:5], halves[1][:5], probe=probe, inception_weights=str(weights))
    assert set(INCEPTION_KEYS) <= set(result.metrics), result.skipped
    assert all(np.isfinite(result.metrics[k]) for k in INCEPTION_KEYS)
    assert result.params["gen.inception.weights"] == str(weights) and not result.skipped


def test_inception_bad_paths_are_skipped_with_the_path(probe, halves, tmp_path):
    missing = tmp_path / "nowhere" / "inception.pth"
    result = fidelity_metrics(*halves, probe=probe, inception_weights=str(missing))
    assert set(INCEPTION_KEYS) <= set(result.skipped) and str(missing) in result.skipped["gen/fid"]
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    result = fidelity_metrics(halves[0][:8], halves[1][:8], probe=None, inception_weights=str(garbage))
    assert str(garbage) in result.skipped["gen/fid"] and "failed" in result.skipped["gen/fid"]
    assert result.skipped["gen/fd_probe"] == "no probe given"


def test_rejects_bad_inputs(probe, halves):
    real_a, real_b = halves
    with pytest.raises(ValueError, match="at least 2"):
        fidelity_metrics(real_a[:1], real_b, probe=probe, inception_weights="none")
    with pytest.raises(ValueError, match="one size"):
        fidelity_metrics(real_a[:, :, :16, :16].contiguous(), real_b, probe=probe, inception_weights="none")
    with pytest.raises(ValueError, match="uint8"):
        fidelity_metrics(real_a.float(), real_b, probe=probe, inception_weights="none")
    with pytest.raises(ValueError, match="unknown fidelity kinds"):
        fidelity_metrics(real_a, real_b, probe=probe, inception_weights="none", kinds=("fid",))


def test_few_samples_skip_precision_recall(probe, halves):
    result = fidelity_metrics(halves[0][:3], halves[1][:3], probe=probe, inception_weights="none")
    assert "gen/precision_probe" in result.skipped and "gen/recall_probe" in result.skipped
    assert np.isfinite(result.metrics["gen/fd_probe"]) and "gen/kid_probe" in result.metrics


def test_rfid_keys(probe, halves):
    result = rfid_metrics(halves[0], halves[0], probe, "none")
    assert abs(result.metrics["tok/rfid_probe"]) < 1e-6  # identical sets: zero distance
    assert "tok/rfid" in result.skipped and "tok/fd_probe" not in result.metrics
    noisy = rfid_metrics(_noisy(halves[0], 32.0), halves[0], probe, "none")
    assert noisy.metrics["tok/rfid_probe"] > 1.0


def test_class_accuracy_matches_probe_val_accuracy(probe, val_data):
    images, labels = val_data
    acc = class_accuracy(probe, images, labels)
    assert acc["accuracy"] == pytest.approx(probe.val_accuracy, abs=0.01)
    assert acc["per_class_accuracy"].shape == (10,) and acc["per_class_count"].sum() == len(labels)
    present = acc["per_class_count"] > 0
    assert np.allclose(acc["per_class_accuracy"][present], np.array(probe.info.per_class_val_accuracy)[present],
                       atol=0.05)  # fmt: skip
    with pytest.raises(ValueError, match="one label per image"):
        class_accuracy(probe, images, labels[:-1])
