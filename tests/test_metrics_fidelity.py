"""The offline fidelity metrics: probe training and caching, probe FD/KID/PR through torch-fidelity, Inception skips,
and the reference-feature cache (``lmgen.metrics.refcache``).

One probe is trained per session (~25 s on one thread) on 2000 ``shapes`` images; every
other test reuses it, or its cache file.
"""

from __future__ import annotations

import copy
import dataclasses
import multiprocessing
import queue
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
from lmgen.metrics.probe import EXTRACTOR_NAME, Probe, ProbeConfig, load_or_train_probe, registered_probe
from lmgen.metrics.refcache import ReferenceCache, file_digest, inception_space_id, probe_space_id, reference_digest

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
    torch.save({"conv.weight": torch.zeros(1)}, cached)  # plain tensors, as the real weights are

    def no_download(*args, **kwargs):
        raise AssertionError("must not download when the weights are cached")

    monkeypatch.setattr(fidelity, "_download", no_download)
    assert resolve_inception_weights("auto") == cached


def test_failed_download_is_tried_once_per_process(tmp_path, monkeypatch):
    """An evaluation makes several fidelity calls; offline, only the first one touches the network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(fidelity, "_FAILED_DOWNLOADS", {})
    calls = []

    def refused(*args, **kwargs):
        calls.append(args)
        raise ConnectionRefusedError("refused")

    monkeypatch.setattr(fidelity, "_download", refused)
    reasons = []
    for _ in range(3):
        with pytest.raises(fidelity.InceptionUnavailable, match="refused") as err:
            resolve_inception_weights("auto")
        reasons.append(str(err.value))
    assert len(calls) == 1 and len(set(reasons)) == 1
    fidelity.inception_cache_path().parent.mkdir(parents=True)
    torch.save({"conv.weight": torch.zeros(1)}, fidelity.inception_cache_path())  # placed by hand: found again
    assert resolve_inception_weights("auto") == fidelity.inception_cache_path()


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
    refs = tmp_path / "refs"  # cached: the entry is named by the weights file's content, not its extractor name
    result = fidelity_metrics(halves[0][:5], halves[1][:5], probe=probe, inception_weights=str(weights), cache_dir=refs)
    assert set(INCEPTION_KEYS) <= set(result.metrics), result.skipped
    assert all(np.isfinite(result.metrics[k]) for k in INCEPTION_KEYS)
    assert result.params["gen.inception.weights"] == str(weights) and not result.skipped
    space = inception_space_id(weights)
    assert result.params["gen.inception.space_id"] == space
    cache = ReferenceCache(refs, reference_digest(halves[1][:5]))
    entry = cache.files(space, "inception-v3-compat", [fidelity._TF_METRICS[k] for k in fidelity.KINDS])
    assert len(entry) == 3 and all((refs / f).is_file() for f in entry), entry  # 2048, logits_unbiased, FID stats


def test_inception_bad_paths_are_skipped_with_the_path(probe, halves, tmp_path):
    missing = tmp_path / "nowhere" / "inception.pth"
    result = fidelity_metrics(*halves, probe=probe, inception_weights=str(missing))
    assert set(INCEPTION_KEYS) <= set(result.skipped) and str(missing) in result.skipped["gen/fid"]
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    result = fidelity_metrics(halves[0][:8], halves[1][:8], probe=None, inception_weights=str(garbage))
    assert str(garbage) in result.skipped["gen/fid"] and "refused" in result.skipped["gen/fid"]
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    result = fidelity_metrics(halves[0][:8], halves[1][:8], probe=None, inception_weights=str(empty))
    assert str(empty) in result.skipped["gen/fid"] and "truncated" in result.skipped["gen/fid"]
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


# --- reference cache --------------------------------------------------------------------------


def _count_extracted(monkeypatch) -> list[int]:
    """Records the batch size of every forward of the probe's torch-fidelity extractor (all its copies)."""
    seen: list[int] = []
    forward = probe_mod.ProbeFeatureExtractor.forward

    def counting(self, x):
        seen.append(len(x))
        return forward(self, x)

    monkeypatch.setattr(probe_mod.ProbeFeatureExtractor, "forward", counting)
    return seen


def _entry_files(root, probe: Probe, reference: torch.Tensor, kinds=fidelity.KINDS) -> set[str]:
    """The files one complete probe entry consists of, its lock file included."""
    cache = ReferenceCache(root, reference_digest(reference))
    space = probe_space_id(probe)
    metrics = [fidelity._TF_METRICS[k] for k in kinds if k != "is"]  # no probe IS
    return {*cache.files(space, EXTRACTOR_NAME, metrics), f".{cache.entry(space)}.lock"}


def test_reference_digest_is_exact(halves):
    images = halves[1][:8]
    digest = reference_digest(images)
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert reference_digest(images.clone()) == digest
    strided = images.transpose(2, 3).contiguous().transpose(2, 3)  # equal values, another memory layout
    assert not strided.is_contiguous() and reference_digest(strided) == digest
    pixel = images.clone()
    pixel[3, 1, 5, 7] ^= 1
    assert not torch.equal(images[0], images[1])
    swapped = images[[1, 0, *range(2, 8)]]
    resized = images.reshape(8, 3, 16, 64)  # the same bytes in another shape
    digests = {digest, reference_digest(pixel), reference_digest(swapped), reference_digest(resized)}
    assert len(digests) == 4
    with pytest.raises(ValueError, match="uint8"):
        reference_digest(images.float())


def test_reference_sha_is_always_a_param(probe, halves):
    gen, ref = halves[0][:16], halves[1][:16]
    expected = reference_digest(ref)[:16]
    result = fidelity_metrics(gen, ref, probe=probe, inception_weights="none", kinds=("fd",))
    assert result.params["gen.reference_sha"] == expected
    assert result.params["gen.probe.space_id"] == probe_space_id(probe)
    assert rfid_metrics(gen, ref, None, "none").params["tok.reference_sha"] == expected


@pytest.mark.parametrize("kinds", [fidelity.KINDS, ("fd",)])  # ("fd",) alone takes torch-fidelity's statistics path
def test_reference_cache_reuses_only_the_exact_reference(probe, halves, tmp_path, monkeypatch, kinds):
    gen, ref, other_gen = halves[0][:64], halves[1][:64], _noisy(halves[0][:64], 32.0)
    kw = dict(probe=probe, inception_weights="none", kinds=kinds)
    plain = fidelity_metrics(gen, ref, **kw).metrics
    seen = _count_extracted(monkeypatch)
    first = fidelity_metrics(gen, ref, cache_dir=tmp_path, **kw).metrics
    assert sum(seen) == 128  # miss: generated and reference
    seen.clear()
    second = fidelity_metrics(gen, ref, cache_dir=tmp_path, **kw).metrics
    assert sum(seen) == 64  # hit: the generated images only
    assert first == plain and second == plain  # bitwise: the cached features are the ones computed
    # the generated side is never served from the cache: another sample set gets its own value
    seen.clear()
    fresh = fidelity_metrics(other_gen, ref, **kw).metrics
    assert fidelity_metrics(other_gen, ref, cache_dir=tmp_path, **kw).metrics == fresh
    assert sum(seen) == 128 + 64
    # one entry, written atomically: nothing else (no temp files, nothing about input 1)
    assert {p.name for p in tmp_path.iterdir()} == _entry_files(tmp_path, probe, ref, kinds)
    # one changed pixel is another reference: extracted again, a second entry
    changed = ref.clone()
    changed[10, 0, 3, 3] ^= 1
    seen.clear()
    fidelity_metrics(gen, changed, cache_dir=tmp_path, **kw)
    assert sum(seen) == 128
    assert {p.name for p in tmp_path.iterdir()} == _entry_files(tmp_path, probe, ref, kinds) | _entry_files(
        tmp_path, probe, changed, kinds
    )


def test_reference_cache_keeps_probes_apart(probe, halves, tmp_path, monkeypatch):
    """A probe with another key, or the same key and other weights, never reads this probe's entry."""
    gen, ref = halves[0][:32], halves[1][:32]
    renamed = Probe(copy.deepcopy(probe.net), dataclasses.replace(probe.info, key="0" * 16))
    net = copy.deepcopy(probe.net)
    with torch.no_grad():
        net.trunk[0][0].weight[0, 0, 0, 0] += 0.5  # the features change; the key does not
    retrained = Probe(net, probe.info)
    kw = dict(inception_weights="none", kinds=("fd", "kid"), cache_dir=tmp_path)
    fidelity_metrics(gen, ref, probe=probe, **kw)
    seen = _count_extracted(monkeypatch)
    for other in (renamed, retrained):
        seen.clear()
        cached = fidelity_metrics(gen, ref, probe=other, **kw).metrics
        assert sum(seen) == 64, "the reference must be extracted again in another feature space"
        assert cached == fidelity_metrics(gen, ref, probe=other, inception_weights="none", kinds=("fd", "kid")).metrics
    assert len({probe_space_id(p) for p in (probe, renamed, retrained)}) == 3
    assert len({p.name for p in tmp_path.glob("*-features-*.pt")}) == 3


def test_damaged_reference_entry_is_recomputed(probe, halves, tmp_path, caplog):
    gen, ref = halves[0][:32], halves[1][:32]
    kw = dict(probe=probe, inception_weights="none", kinds=("fd", "kid"))
    plain = fidelity_metrics(gen, ref, cache_dir=tmp_path, **kw).metrics
    (features,) = tmp_path.glob("*-features-*.pt")
    features.write_bytes(b"half a file")
    assert fidelity_metrics(gen, ref, cache_dir=tmp_path, **kw).metrics == plain
    assert "unreadable" in caplog.text
    assert torch.load(features, weights_only=False).shape == (32, TEST_CFG.feature_dim)


def test_inception_space_id_is_the_weights_content(tmp_path):
    a, same, other = tmp_path / "a.pth", tmp_path / "weights-6726825d.pth", tmp_path / "c.pth"
    a.write_bytes(b"weights one")
    same.write_bytes(b"weights one")
    other.write_bytes(b"weights two")
    assert inception_space_id(a) == inception_space_id(same) != inception_space_id(other)
    assert file_digest(a)[:16] in inception_space_id(a) and torch_fidelity.__version__ in inception_space_id(a)
    time.sleep(0.05)  # past the file system's timestamp granularity
    a.write_bytes(b"weights two")  # rewritten in place, same size: the remembered digest must not be reused
    assert inception_space_id(a) == inception_space_id(other)


def _cache_worker(probe_path, generated, reference, cache_dir, barrier, results) -> None:
    """One sweep point in its own process, started in step with the others; reports metrics and images extracted."""
    try:
        torch.set_num_threads(1)
        seen: list[int] = []
        forward = probe_mod.ProbeFeatureExtractor.forward
        probe_mod.ProbeFeatureExtractor.forward = lambda self, x: seen.append(len(x)) or forward(self, x)
        probe = Probe.load(probe_path)
        barrier.wait(timeout=60)
        result = fidelity_metrics(torch.from_numpy(generated), torch.from_numpy(reference), probe=probe,
                                  inception_weights="none", cache_dir=cache_dir)  # fmt: skip
        results.put((result.metrics, sum(seen)))
    except BaseException as err:  # the parent must hear of it, not time out
        results.put((repr(err), -1))
        raise


def test_concurrent_processes_compute_one_reference_entry(probe, halves, cache_dir, tmp_path, monkeypatch):
    """Two sweep points, this process and a spawned one, same reference, same moment: one extracts it, both are right."""
    ref, gens = halves[1], [halves[0][:64], _noisy(halves[0][64:128], 16.0)]
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    probe_path = cache_dir / f"probe-{probe.info.key}.pt"
    other = ctx.Process(
        target=_cache_worker, args=(probe_path, gens[1].numpy(), ref.numpy(), tmp_path, barrier, results)
    )
    other.start()
    try:
        seen = _count_extracted(monkeypatch)
        barrier.wait(timeout=60)
        mine = fidelity_metrics(gens[0], ref, probe=probe, inception_weights="none", cache_dir=tmp_path).metrics
        theirs, their_count = results.get(timeout=60)
    except queue.Empty:
        pytest.fail("the other process gave no result")
    finally:
        other.join(timeout=30)
    assert their_count >= 0, theirs
    monkeypatch.undo()
    expected = [fidelity_metrics(g, ref, probe=probe, inception_weights="none").metrics for g in gens]
    assert [mine, theirs] == expected
    assert sum(seen) + their_count == 64 + 64 + len(ref)  # the reference was extracted once, by one of the two
    assert {p.name for p in tmp_path.iterdir()} == _entry_files(tmp_path, probe, ref)
    assert other.exitcode == 0
