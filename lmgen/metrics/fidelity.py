"""Generation and reconstruction fidelity through torch-fidelity: probe metrics offline, Inception where possible.

Two feature spaces, one code path (torch-fidelity's ``calculate_metrics`` on in-memory uint8
tensors, no PNG round trip):

- the probe (``lmgen.metrics.probe``): ``{prefix}/fd_probe``, ``precision_probe``,
  ``recall_probe``, ``kid_probe``. Always available: the suite trains it.
- Inception-v3 (torch-fidelity's ``inception-v3-compat``, which resizes every image to
  299×299 itself, TF1-compatible bilinear): ``{prefix}/fid``, ``is``, ``kid``, ``precision``,
  ``recall``. Needs the weights file; when it cannot be had (offline), each key lands in
  ``FidelityResult.skipped`` with the reason, and nothing raises: a run that trained for hours
  must not crash in its evaluation.

Convention (torch-fidelity's): input 1 is generated, input 2 the reference, so precision is
the fraction of generated samples on the reference manifold and recall the converse.

Every result records ``{prefix}.reference_sha``, the digest of the exact reference images. With
``cache_dir``, the reference side's features and FID statistics are cached there under that
digest and the feature space, and reused by every later call on the same images
(``lmgen.metrics.refcache``); the generated side is always extracted afresh.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import threading
import time
import urllib.request
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
import torch_fidelity
from torch import Tensor
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

from lmgen.files import atomic_write, plain_data
from lmgen.metrics.probe import EXTRACTOR_NAME, FEATURE_LAYER, Probe, per_class_accuracy, registered_probe
from lmgen.metrics.refcache import ReferenceCache, inception_space_id, probe_space_id, reference_digest

log = logging.getLogger(__name__)

INCEPTION_EXTRACTOR = "inception-v3-compat"
INCEPTION_URL = URL_INCEPTION_V3  # a module attribute so tests can point it at an unreachable host
DOWNLOAD_TIMEOUT_S = 10.0  # per socket operation and for the DNS lookup: offline must fail in seconds
_FAILED_DOWNLOADS: dict[tuple[str, str], str] = {}  # (url, destination) -> why it failed, in this process
_WARNED: set[str] = set()  # reasons for skipping Inception already logged as warnings
KINDS = ("fd", "kid", "prc", "is")  # what fidelity_metrics can compute; "is" only in Inception space
_TF_METRICS = {"fd": "fid", "kid": "kid", "prc": "prc", "is": "isc"}  # kind -> torch-fidelity's metric name
_TF_KEYS = {  # torch-fidelity result key -> (probe metric, Inception metric)
    torch_fidelity.KEY_METRIC_FID: ("fd_probe", "fid"),
    torch_fidelity.KEY_METRIC_KID_MEAN: ("kid_probe", "kid"),
    torch_fidelity.KEY_METRIC_KID_STD: ("kid_probe_std", "kid_std"),
    torch_fidelity.KEY_METRIC_PRECISION: ("precision_probe", "precision"),
    torch_fidelity.KEY_METRIC_RECALL: ("recall_probe", "recall"),
    torch_fidelity.KEY_METRIC_ISC_MEAN: (None, "is"),
    torch_fidelity.KEY_METRIC_ISC_STD: (None, "is_std"),
}
_KIND_KEYS = {  # kind -> (probe metrics, Inception metrics) it yields
    "fd": (("fd_probe",), ("fid",)),
    "kid": (("kid_probe", "kid_probe_std"), ("kid", "kid_std")),
    "prc": (("precision_probe", "recall_probe"), ("precision", "recall")),
    "is": ((), ("is", "is_std")),
}


@dataclass(frozen=True)
class FidelityResult:
    """metrics: MLflow metric key -> value. params: what to log as params/tags (sample counts,
    feature extractors and layers, reference set, weights). skipped: metric key -> why it is absent."""

    metrics: dict[str, float]
    params: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


class InceptionUnavailable(RuntimeError):
    """The Inception weights cannot be had; the message says why and what to set instead."""


class _UInt8Images(Dataset):
    """Items of a uint8 (N, 3, H, W) tensor, as torch-fidelity wants them: uint8 (3, H, W)."""

    def __init__(self, images: Tensor) -> None:
        self.images = images.cpu()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> Tensor:
        return self.images[index]


# --- Inception weights ------------------------------------------------------------------------


def inception_cache_path() -> Path:
    """Where torch-fidelity's own download (``torch.hub.load_state_dict_from_url``) keeps the weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(INCEPTION_URL).path)


def _resolve_host(host: str, timeout: float) -> None:
    """DNS lookup bounded by ``timeout``: socket timeouts do not cover ``getaddrinfo``, which can hang offline."""
    errors: list[OSError] = []

    def lookup() -> None:
        try:
            socket.getaddrinfo(host, 443)
        except OSError as err:
            errors.append(err)

    worker = threading.Thread(target=lookup, daemon=True)  # daemon: a hung lookup must not block exit
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise OSError(f"DNS lookup of {host} timed out after {timeout:.0f} s")
    if errors:
        raise errors[0]


def _download(url: str, dst: Path, timeout: float) -> None:
    """Fetch ``url`` to ``dst`` atomically, checking the SHA-256 prefix in the file name (torch.hub's convention)."""
    _resolve_host(urlparse(url).hostname or "", timeout)
    digest = hashlib.sha256()
    with atomic_write(dst) as out, urllib.request.urlopen(url, timeout=timeout) as response:
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
        match = re.search(r"-([a-f0-9]+)\.", dst.name)
        if match and not digest.hexdigest().startswith(match.group(1)):  # raising here leaves dst untouched
            raise OSError(f"checksum mismatch for {url}: got {digest.hexdigest()[:16]}, expected {match.group(1)}")


def _plain(path: Path) -> Path:
    """``path`` if it holds plain tensors: torch-fidelity unpickles the weights with
    ``weights_only=False``, so anything else is refused before it can run."""
    if not plain_data(path):
        raise InceptionUnavailable(f"Inception weights file {str(path)!r} refused: it does not read as plain "
                                   "tensors (it is truncated or not a torch file, or holds objects whose loading "
                                   "could run code)")
    return path


def resolve_inception_weights(spec: str) -> Path:
    """The Inception weights file for ``spec``: "auto" (torch-fidelity's cache, else a quick download) or a path.

    Raises ``InceptionUnavailable`` (with the reason) for "none", a missing file, or a
    failed download; "auto" never waits on the network for more than ``DOWNLOAD_TIMEOUT_S``
    per step.
    """
    if spec == "none":
        raise InceptionUnavailable("Inception metrics disabled (inception_weights='none')")
    if spec != "auto":
        path = Path(spec).expanduser()
        if not path.is_file():
            raise InceptionUnavailable(f"Inception weights file {str(path)!r} does not exist")
        return _plain(path)
    cached = inception_cache_path()
    if cached.is_file():
        return _plain(cached)
    failed = _FAILED_DOWNLOADS.get((INCEPTION_URL, str(cached)))
    if failed is not None:  # one evaluation makes several fidelity calls: try the network once per process
        raise InceptionUnavailable(failed)
    start = time.perf_counter()
    try:
        log.info("Inception weights not in %s; downloading %s", cached, INCEPTION_URL)
        _download(INCEPTION_URL, cached, DOWNLOAD_TIMEOUT_S)
    except OSError as err:  # URLError, timeouts, refused connections and DNS failures are all OSErrors
        reason = (f"Inception weights are not in {cached} and downloading {INCEPTION_URL} failed after "
                  f"{time.perf_counter() - start:.1f} s ({err}); set metrics.inception_weights=PATH to a local copy")
        _FAILED_DOWNLOADS[(INCEPTION_URL, str(cached))] = reason
        raise InceptionUnavailable(reason) from err
    return _plain(cached)


# --- metrics ----------------------------------------------------------------------------------


def _check_images(generated: Tensor, reference: Tensor) -> None:
    for name, x in (("generated", generated), ("reference", reference)):
        if not isinstance(x, Tensor) or x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} images must be uint8 (N, 3, H, W), got {getattr(x, 'dtype', '')} {shape}")
        if x.shape[0] < 2:
            raise ValueError(f"fidelity metrics need at least 2 {name} images (a covariance), got {x.shape[0]}")
    if generated.shape[2:] != reference.shape[2:]:
        raise ValueError(
            f"generated images are {tuple(generated.shape[2:])} but reference images {tuple(reference.shape[2:])}: "
            "compare images of one size"
        )


def _calculate(
    generated: Tensor,
    reference: Tensor,
    kinds: Collection[str],
    cache: ReferenceCache | None,
    space_id: str,
    **options: Any,
) -> dict[str, float]:
    """One ``torch_fidelity.calculate_metrics`` call on in-memory images; returns torch-fidelity's keys.

    With ``cache``, the reference side is read from (or written to) its entry for ``space_id``.
    """

    def run(**cache_options: Any) -> dict[str, float]:
        return torch_fidelity.calculate_metrics(
            input1=_UInt8Images(generated),
            input2=_UInt8Images(reference),
            fid="fd" in kinds,
            kid="kid" in kinds,
            prc="prc" in kinds,
            isc="is" in kinds,
            isc_splits=min(10, len(generated)),
            batch_size=64,
            save_cpu_ram=True,  # DataLoader without worker processes: the images are already in memory
            verbose=False,
            **options,
            **cache_options,
        )

    if cache is None:
        return run(cache=False)
    return cache.calculate(run, space_id, options["feature_extractor"], [_TF_METRICS[k] for k in kinds])


def _rename(raw: dict[str, float], prefix: str, space: int) -> dict[str, float]:
    """torch-fidelity keys -> ``{prefix}/...`` keys; ``space`` 0 = probe, 1 = Inception."""
    out = {}
    for key, value in raw.items():
        name = _TF_KEYS.get(key, (None, None))[space]
        if name is not None:
            out[f"{prefix}/{name}"] = float(value)
    return out


def _keys(kinds: Collection[str], space: int, prefix: str) -> list[str]:
    return [f"{prefix}/{name}" for kind in kinds for name in _KIND_KEYS[kind][space]]


def fidelity_keys(prefix: str, kinds: Collection[str] = KINDS) -> list[str]:
    """Every metric key ``fidelity_metrics`` can report for ``kinds``: probe, then Inception."""
    return _keys(kinds, 0, prefix) + _keys(kinds, 1, prefix)


def _inception_metrics(
    generated: Tensor,
    reference: Tensor,
    kinds: Collection[str],
    weights: str,
    prefix: str,
    options: dict[str, Any],
    cache: ReferenceCache | None,
) -> FidelityResult:
    keys = _keys(kinds, 1, prefix)
    if not keys:
        return FidelityResult({})
    try:
        path = resolve_inception_weights(weights)
    except InceptionUnavailable as err:
        # asked-for "none" is routine; anything else is a metric the user expected and will miss (said once)
        routine = weights == "none" or str(err) in _WARNED
        _WARNED.add(str(err))
        log.log(logging.INFO if routine else logging.WARNING, "skipping %s: %s", ", ".join(keys), err)
        return FidelityResult({}, {f"{prefix}.inception.weights": "unavailable"}, dict.fromkeys(keys, str(err)))
    params = {
        f"{prefix}.inception.extractor": INCEPTION_EXTRACTOR,
        f"{prefix}.inception.layer": "2048 (fid, kid, prc); logits_unbiased (is)",
        f"{prefix}.inception.weights": str(path),
    }
    try:
        space_id = inception_space_id(path)  # inside the try: an unreadable file is a skip, not a crash
        params[f"{prefix}.inception.space_id"] = space_id
        raw = _calculate(generated, reference, kinds, cache, space_id, feature_extractor=INCEPTION_EXTRACTOR,
                         feature_extractor_weights_path=str(path), **options)  # fmt: skip
    except Exception as err:  # broad on purpose: a bad weights file must not crash a finished run (DESIGN §7)
        log.warning("Inception metrics failed with weights %s; skipping them", path, exc_info=True)
        reason = f"Inception metrics failed with weights {str(path)!r}: {type(err).__name__}: {err}"
        return FidelityResult({}, params, dict.fromkeys(keys, reason))
    return FidelityResult(_rename(raw, prefix, 1), params, {})


def _probe_metrics(
    generated: Tensor,
    reference: Tensor,
    kinds: Collection[str],
    probe: Probe,
    prefix: str,
    options: dict[str, Any],
    cache: ReferenceCache | None,
) -> FidelityResult:
    probe_kinds = [k for k in kinds if _KIND_KEYS[k][0]]
    if not probe_kinds:
        return FidelityResult({})
    space_id = probe_space_id(probe)
    with registered_probe(probe) as probe_id:
        raw = _calculate(generated, reference, probe_kinds, cache, space_id, feature_extractor=EXTRACTOR_NAME,
                         feature_extractor_weights_path=probe_id, **options)  # fmt: skip
    params = {
        f"{prefix}.probe.extractor": EXTRACTOR_NAME,
        f"{prefix}.probe.layer": FEATURE_LAYER,
        f"{prefix}.probe.id": probe.info.key,
        f"{prefix}.probe.val_accuracy": f"{probe.val_accuracy:.4f}",
        f"{prefix}.probe.image_size": str(probe.image_size),
        f"{prefix}.probe.space_id": space_id,
    }
    return FidelityResult(_rename(raw, prefix, 0), params, {})


def fidelity_metrics(  # noqa: PLR0913 -- keyword-only knobs, each a torch-fidelity option
    generated: Tensor,
    reference: Tensor,
    *,
    probe: Probe | None,
    inception_weights: str = "auto",
    prefix: str = "gen",
    reference_name: str = "val",
    kid_subset_size: int | None = None,
    prc_neighborhood: int = 3,
    seed: int = 0,
    kinds: Collection[str] = KINDS,
    cuda: bool = False,
    cache_dir: Path | None = None,
) -> FidelityResult:
    """Fréchet distance, KID, precision/recall (and IS) of ``generated`` against ``reference``.

    generated: uint8 (N, 3, H, W), reference: uint8 (M, 3, H, W), N, M >= 2, same H, W.
    Probe metrics need ``probe``; Inception metrics need ``inception_weights`` ("auto" |
    "none" | a path). ``kid_subset_size`` defaults to min(1000, N, M); precision/recall need
    N, M > ``prc_neighborhood``. ``kinds`` picks among ``KINDS``; ``cuda`` runs the extractors
    on the default CUDA device (torch-fidelity moves its own copy of the probe). With
    ``cache_dir``, the reference side's features are cached there per (exact images, feature
    space) and reused (``lmgen.metrics.refcache``); never the generated side. Every requested
    key is either in ``metrics`` or, with a reason, in ``skipped``; ``params`` always holds
    ``{prefix}.reference_sha``, the first 16 hex of ``reference_digest(reference)``.
    """
    _check_images(generated, reference)
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown fidelity kinds {sorted(unknown)}; valid: {list(KINDS)}")
    n, m = len(generated), len(reference)
    kid_size = min(kid_subset_size or 1000, n, m)
    metrics = {f"{prefix}/num_samples": float(n), f"{prefix}/num_reference": float(m)}
    reference_sha = reference_digest(reference)
    params = {
        f"{prefix}.reference": reference_name,
        f"{prefix}.reference_sha": reference_sha[:16],
        f"{prefix}.num_samples": str(n),
        f"{prefix}.num_reference": str(m),
        f"{prefix}.image_size": f"{generated.shape[2]}x{generated.shape[3]}",
        f"{prefix}.kid_subset_size": str(kid_size),
        f"{prefix}.prc_neighborhood": str(prc_neighborhood),
    }
    skipped: dict[str, str] = {}
    kinds = [k for k in KINDS if k in kinds]
    if "prc" in kinds and min(n, m) <= prc_neighborhood:
        reason = f"precision/recall need more than prc_neighborhood={prc_neighborhood} images per set (got {n}, {m})"
        skipped.update(dict.fromkeys(_keys(["prc"], 0, prefix) + _keys(["prc"], 1, prefix), reason))
        kinds.remove("prc")
    # when a KID subset is all of both sets, every subset gives the same value: compute it once
    kid_subsets = 1 if kid_size == n == m else 100
    options = {"kid_subset_size": kid_size, "kid_subsets": kid_subsets, "prc_neighborhood": prc_neighborhood,
               "rng_seed": seed, "cuda": cuda}  # fmt: skip
    cache = None if cache_dir is None else ReferenceCache(Path(cache_dir), reference_sha)
    parts = [_inception_metrics(generated, reference, kinds, inception_weights, prefix, options, cache)]
    if probe is None:
        skipped.update(dict.fromkeys(_keys(kinds, 0, prefix), "no probe given"))
    else:
        parts.append(_probe_metrics(generated, reference, kinds, probe, prefix, options, cache))
    for part in parts:
        metrics.update(part.metrics)
        params.update(part.params)
        skipped.update(part.skipped)
    return FidelityResult(metrics, params, skipped)


def rfid_metrics(
    reconstructions: Tensor, originals: Tensor, probe: Probe | None, inception_weights: str = "auto", **kwargs: Any
) -> FidelityResult:
    """Reconstruction FID: ``tok/rfid_probe`` (and ``tok/rfid`` with Inception weights) of decoded vs original images.

    reconstructions, originals: uint8 (N, 3, H, W), pairwise the same images. Only the
    Fréchet distance is computed; ``kwargs`` go to ``fidelity_metrics`` (``cache_dir`` caches
    the originals' side).
    """
    result = fidelity_metrics(
        reconstructions, originals, probe=probe, inception_weights=inception_weights, prefix="tok",
        reference_name="originals", kinds=("fd",), **kwargs,
    )  # fmt: skip
    rename = {"tok/fd_probe": "tok/rfid_probe", "tok/fid": "tok/rfid"}
    return FidelityResult(
        metrics={rename.get(k, k): v for k, v in result.metrics.items()},
        params=result.params,
        skipped={rename.get(k, k): v for k, v in result.skipped.items()},
    )


def class_accuracy(probe: Probe, images: Tensor, labels: Tensor) -> dict[str, Any]:
    """How often the probe recognises the intended class of (class-conditional) samples.

    images: uint8 (N, 3, H, W); labels: int (N,) in [0, num_classes). Returns ``accuracy``
    (float, logged as ``gen/class_accuracy``), ``balanced_accuracy`` (mean over classes that
    occur), ``per_class_accuracy`` (float64 (num_classes,), NaN for absent classes) and
    ``per_class_count`` (int64 (num_classes,)).
    """
    labels = torch.as_tensor(labels).to(torch.int64).cpu()
    if labels.shape != (len(images),):
        raise ValueError(f"need one label per image: {len(images)} images, labels of shape {tuple(labels.shape)}")
    if len(labels) == 0 or labels.min() < 0 or labels.max() >= probe.num_classes:
        raise ValueError(f"labels must be a non-empty set in [0, {probe.num_classes})")
    pred = probe.predict(images)
    per_class = per_class_accuracy(pred, labels, probe.num_classes).numpy()
    return {
        "accuracy": float((pred == labels).double().mean()),
        "balanced_accuracy": float(np.nanmean(per_class)),
        "per_class_accuracy": per_class,
        "per_class_count": torch.bincount(labels, minlength=probe.num_classes).numpy(),
    }
