"""Reference-side fidelity features cached on disk, named by a hash of the exact reference images.

Two runs on the same reference set must compare against the same reference statistics, and
need not extract them twice. ``reference_digest`` hashes the exact uint8 pixels and shape;
``ReferenceCache.calculate`` runs a ``torch_fidelity.calculate_metrics`` call with torch-fidelity's
own cache switched on for input 2 (the reference) only.

What torch-fidelity (0.4, ``utils.py`` and ``metric_fid.py``) caches, under ``cache_root``, for an
input with a cache name NAME: the features of every requested layer,
``{NAME}-{extractor}-features-{layer}.pt`` (float (M, D) tensors; KID and precision/recall are
computed from these), and the FID statistics, ``{NAME}-{extractor}-stat-fid-{layer}.pt`` (mu,
sigma as numpy arrays). Those names hold the extractor's registered *name* and the layer, but
not its weights (``feature_extractor_weights_path``): every probe is "lmgen-probe". So NAME
(``ReferenceCache.entry``) carries the reference digest and the feature-space identity:
``probe_space_id`` (the probe's key and a digest of its weights) or ``inception_space_id`` (a
digest of the weights file and the torch-fidelity version, whose resize code shapes the features).

Input 1 (generated, new every run) is never cached: torch-fidelity caches an input only when it
has a cache name (``input1_cache_name``, or a registered dataset string); ours is an in-memory
dataset and ``input1_cache_name=None`` is passed explicitly.

Concurrency: torch-fidelity writes each file atomically (a temp file in the same folder, then
``os.rename``), so a reader never sees half a file, and a complete entry is read without any
lock: its files never change once renamed into place. What it does not do is keep two processes
from computing one entry at once. A call whose entry is incomplete therefore takes a per-entry
``fcntl.flock`` (``.{NAME}.lock``; released by the kernel if the process dies), looks again, and
computes (and writes) the entry while holding it; the others wait, find the entry complete, and
run in parallel on the cached features. The lock files stay (deleting a lock file races with its
waiters); they are empty.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch_fidelity
from torch import Tensor
from torch_fidelity.utils import resolve_feature_layer_for_metric

from lmgen.concurrency import file_lock
from lmgen.files import file_digest, safe_load
from lmgen.metrics.probe import Probe

log = logging.getLogger(__name__)

def reference_digest(images: Tensor) -> str:
    """SHA-256 (64 hex) of uint8 (N, 3, H, W) images: their shape and exact pixel bytes, in order.

    Any changed pixel, reordering or size change gives a new digest; equal tensors (on any
    device, contiguous or not) give the same one.
    """
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(
            f"reference_digest needs uint8 (N, 3, H, W) images, got {getattr(images, 'dtype', '')} {shape}"
        )
    digest = hashlib.sha256(f"uint8{tuple(images.shape)}:".encode())
    digest.update(images.detach().cpu().contiguous().numpy())  # the buffer itself: no extra copy of a large set
    return digest.hexdigest()


def probe_space_id(probe: Probe) -> str:
    """The probe's feature space: ``info.key`` (data, config, PROBE_VERSION) and a digest of its weights and input size.

    The weights digest keeps apart two probes with one key whose training differed (another
    device or thread count reduces in another order).
    """
    digest = hashlib.sha256(f"{probe.image_size}".encode())
    for name, value in sorted(probe.net.state_dict().items()):
        value = value.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}{tuple(value.shape)}:".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy())
    return f"probe{probe.info.key}-w{digest.hexdigest()[:16]}"


def inception_space_id(weights: Path) -> str:
    """Inception's feature space: a digest of the weights file's bytes (whatever its name) and torch-fidelity's version."""
    return f"inception{file_digest(weights)[:16]}-tf{torch_fidelity.__version__}"


def _loads(path: Path) -> bool:
    """Whether cache file ``path`` reads as plain tensors and numpy arrays, read safely (torch-fidelity
    reads it with ``weights_only=False``, so a planted pickle must never reach it)."""
    try:
        safe_load(path, numpy=True)
        return True
    except Exception:  # broad on purpose: any way of failing to read — or refusing to — is a damaged entry
        return False


@dataclass(frozen=True)
class ReferenceCache:
    """Reference-side features under ``root`` for the images whose ``reference_digest`` is ``reference_sha``."""

    root: Path
    reference_sha: str

    def entry(self, space_id: str) -> str:
        """torch-fidelity's ``input2_cache_name``: reference digest (128 bits) and feature space."""
        return f"ref{self.reference_sha[:32]}-{space_id}"

    def files(self, space_id: str, extractor: str, metrics: Collection[str]) -> list[str]:
        """The files a complete entry has for torch-fidelity ``metrics`` ("fid", "kid", "prc", "isc"), by its naming."""
        name = self.entry(space_id)
        layers = {m: resolve_feature_layer_for_metric(m, feature_extractor=extractor) for m in metrics}
        out = [f"{name}-{extractor}-features-{layer}.pt" for layer in sorted(set(layers.values()))]
        if "fid" in layers:
            out.append(f"{name}-{extractor}-stat-fid-{layers['fid']}.pt")
        return out

    def calculate(
        self, run: Callable[..., dict[str, Any]], space_id: str, extractor: str, metrics: Collection[str]
    ) -> dict[str, Any]:
        """``run(**cache_options)`` (a ``calculate_metrics`` call) reading, or computing and writing, the entry.

        Were torch-fidelity ever to name its files otherwise, ``files`` would never look complete:
        every call would take the lock, slower but still correct.
        """
        root = Path(self.root)
        root.mkdir(parents=True, exist_ok=True)
        name = self.entry(space_id)
        paths = [root / f for f in self.files(space_id, extractor, metrics)]
        options = {"cache": True, "cache_root": str(root), "input1_cache_name": None, "input2_cache_name": name}
        if all(p.is_file() for p in paths):
            # checked before torch-fidelity unpickles them: a damaged or planted file is recomputed.
            # Files are replaced by rename, so removing one cannot hurt a concurrent reader's open file.
            damaged = [p for p in paths if not _loads(p)]
            if not damaged:
                return run(**options)
            log.warning("reference cache: %s unreadable or unsafe; recomputing", ", ".join(p.name for p in damaged))
            for p in damaged:
                p.unlink(missing_ok=True)
        with file_lock(root / f".{name}.lock"):
            if not all(p.is_file() for p in paths):
                log.info("reference cache: computing %s in %s", name, root)
                return run(**options)
        return run(**options)  # another process wrote the entry while we waited: read it without the lock
