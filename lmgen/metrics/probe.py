"""The offline feature space: a small classifier ("probe") trained on the dataset's train split.

Inception weights cannot be fetched everywhere, so the suite trains its own feature
extractor: ``ProbeNet``, a 4-block CNN whose global-average-pooled last block (``feature_dim``
channels, like Inception's pool3) is the feature vector and whose linear head predicts the
class. ``gen/fd_probe`` is the Fréchet distance in that space; ``gen/class_accuracy`` uses the
head. A probe is cached per (train fingerprint, val fingerprint, ``ProbeConfig``), so every
run on the same data shares one, and runs compare.

The probe is served to torch-fidelity as the feature extractor ``"lmgen-probe"``
(``ProbeFeatureExtractor``). torch-fidelity builds extractors itself, from a registered class
and the keyword ``feature_extractor_weights_path`` (a string it forwards untouched), so that
string names the probe: either an id handed out by ``registered_probe(probe)`` for an
in-memory probe (removed again when the ``with`` block ends), or the path of a probe file
written by ``Probe.save``.
"""

from __future__ import annotations

import copy
import logging
import pickle
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset
from torch_fidelity import register_feature_extractor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from lmgen.concurrency import file_lock
from lmgen.datasets import iter_batches
from lmgen.datasets.base import short_hash
from lmgen.files import atomic_write
from lmgen.progress import phase

log = logging.getLogger(__name__)

PROBE_VERSION = 1  # bump when ProbeNet or the training recipe changes: invalidates caches
EXTRACTOR_NAME = "lmgen-probe"
FEATURE_LAYER = "probe"  # (N, feature_dim) pooled features: FD, KID, precision/recall
LOGITS_LAYER = "logits"  # (N, num_classes): an Inception-Score-style use, if wanted
_MEMORY_PREFIX = "lmgen-probe-memory:"


@dataclass(frozen=True)
class ProbeConfig:
    """How the probe is trained. Defaults: ~50 s and ~0.9 val accuracy on 4000 32×32 ``shapes`` images, 2 CPU cores.

    ``max_train_images`` / ``max_val_images`` cap the (seeded, random) subsets read from
    each split; images larger than ``max_image_size`` are downscaled to it (area-like,
    antialiased), which keeps CPU training cheap on 256-px datasets. ``augment`` adds random
    horizontal flips and translations by up to 1/16 of the side.
    """

    epochs: int = 20
    batch_size: int = 64  # at equal time, more and smaller steps win on shapes (val acc 0.89 vs 0.79 at 128)
    lr: float = 6e-3
    weight_decay: float = 5e-4
    feature_dim: int = 128
    width: int = 16  # channels of the first block, then 2x, 4x, feature_dim; narrower + more epochs won at equal time
    seed: int = 0
    max_train_images: int = 20000
    max_val_images: int = 5000
    max_image_size: int = 64
    augment: bool = True


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class ProbeNet(nn.Module):
    """4 conv blocks (3×3 conv, BatchNorm, ReLU; 2×2 max-pool between), global average pool, linear head.

    Any input size works (adaptive pooling); the probe feeds it one fixed ``image_size``.
    """

    def __init__(self, num_classes: int, feature_dim: int = 128, width: int = 16) -> None:
        super().__init__()
        self.num_classes, self.feature_dim = num_classes, feature_dim
        self.trunk = nn.Sequential(
            _block(3, width), nn.MaxPool2d(2),
            _block(width, 2 * width), nn.MaxPool2d(2),
            _block(2 * width, 4 * width), nn.MaxPool2d(2),
            _block(4 * width, feature_dim),
        )  # fmt: skip
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """x: float (B, 3, H, W) in [0, 1] -> (B, feature_dim) float, non-negative (post-ReLU means)."""
        x = (x - 0.5) / 0.25  # centre the pixels; BatchNorm follows, so the scale is not critical
        return self.trunk(x).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        """x: float (B, 3, H, W) in [0, 1] -> logits (B, num_classes)."""
        return self.head(self.features(x))


def resize_uint8(images: Tensor, size: int) -> Tensor:
    """(B, 3, H, W) uint8 -> (B, 3, size, size) uint8; antialiased bilinear, identity if already that size.

    Used identically when training and when extracting features, so both see the same pixels.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 (B, 3, H, W) images, got {images.dtype} {tuple(images.shape)}")
    if images.shape[-2:] == (size, size):
        return images
    x = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


def _to_input(images: Tensor, size: int, device: torch.device) -> Tensor:
    """uint8 (B, 3, H, W) -> float (B, 3, size, size) in [0, 1] on ``device``."""
    return resize_uint8(images, size).to(device=device, dtype=torch.float32) / 255.0


@dataclass(frozen=True)
class ProbeInfo:
    """What a trained probe is: where it came from and how good it is.

    per_class_val_accuracy: one float per class, NaN for a class absent from the val subset.
    """

    num_classes: int
    image_size: int
    feature_dim: int
    width: int
    val_accuracy: float
    per_class_val_accuracy: tuple[float, ...]
    train_fingerprint: str
    val_fingerprint: str
    key: str
    config: dict[str, Any]


class Probe:
    """A trained ``ProbeNet`` in eval mode plus its ``ProbeInfo``; all inputs are uint8 images."""

    def __init__(self, net: ProbeNet, info: ProbeInfo) -> None:
        self.net = net.eval().requires_grad_(False)
        self.info = info
        self.num_classes, self.image_size, self.val_accuracy = info.num_classes, info.image_size, info.val_accuracy

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.no_grad()
    def _apply(self, images: Tensor, fn: Any, batch_size: int) -> Tensor:
        out = [fn(_to_input(chunk, self.image_size, self.device)).float().cpu() for chunk in images.split(batch_size)]
        return torch.cat(out) if out else torch.empty(0)

    def features(self, images: Tensor, batch_size: int = 256) -> Tensor:
        """images: uint8 (N, 3, H, W) in [0, 255] (resized to ``image_size``) -> float32 (N, feature_dim) on CPU."""
        return self._apply(images, self.net.features, batch_size).reshape(len(images), self.info.feature_dim)

    def logits(self, images: Tensor, batch_size: int = 256) -> Tensor:
        """images: uint8 (N, 3, H, W) -> float32 (N, num_classes) on CPU."""
        return self._apply(images, self.net, batch_size).reshape(len(images), self.num_classes)

    def predict(self, images: Tensor, batch_size: int = 256) -> Tensor:
        """images: uint8 (N, 3, H, W) -> int64 (N,) predicted class."""
        return self.logits(images, batch_size).argmax(dim=1)

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors, numbers and strings only, so ``torch.load(weights_only=True)`` reads it."""
        info = asdict(self.info)
        info["per_class_val_accuracy"] = list(self.info.per_class_val_accuracy)
        return {"version": PROBE_VERSION, "net": {k: v.cpu() for k, v in self.net.state_dict().items()}, "info": info}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Probe:
        if state.get("version") != PROBE_VERSION:
            raise ValueError(f"probe state version {state.get('version')} != {PROBE_VERSION}: retrain the probe")
        raw = dict(state["info"])
        raw["per_class_val_accuracy"] = tuple(float(a) for a in raw["per_class_val_accuracy"])
        info = ProbeInfo(**raw)
        net = ProbeNet(info.num_classes, info.feature_dim, info.width)
        net.load_state_dict(state["net"])
        return cls(net, info)

    def save(self, path: Path) -> None:
        """Write atomically (``lmgen.files.atomic_write``): readers never see half a file."""
        with atomic_write(path) as out:
            torch.save(self.state_dict(), out)

    @classmethod
    def load(cls, path: Path) -> Probe:
        return cls.from_state(torch.load(Path(path), map_location="cpu", weights_only=True))


# --- training -------------------------------------------------------------------------------


def _read_split(ds: Dataset, max_images: int, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """A seeded random subset of at most ``max_images`` readable items -> uint8 (N, 3, s, s), int64 (N,).

    A random subset, not the first items: folder datasets are sorted by class.
    """
    n = len(ds)  # type: ignore[arg-type]
    if n > max_images:
        picked = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_images].sort().values
        ds = Subset(ds, picked.tolist())
    images, labels = [], []
    for batch in iter_batches(ds, batch_size=256):
        images.append(resize_uint8(batch.images, size))
        labels.append(batch.labels)
    if not images:
        raise ValueError("probe: the dataset has no readable images")
    return torch.cat(images), torch.cat(labels)


def _augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random horizontal flips and translations by up to 1/16 of the side (reflect padding). x: (B, 3, s, s)."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    pad = max(1, h // 16)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    offsets = torch.randint(0, 2 * pad + 1, (b, 2), generator=gen).tolist()
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])


def per_class_accuracy(pred: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """pred, labels: int64 (N,) -> float64 (num_classes,) accuracy per true class, NaN where a class has no item."""
    correct = (pred == labels).double()
    hits = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels, correct)
    counts = torch.bincount(labels, minlength=num_classes)
    return torch.where(counts > 0, hits / counts.clamp(min=1), torch.full_like(hits, float("nan")))


@torch.no_grad()
def _evaluate(net: ProbeNet, images: Tensor, labels: Tensor, num_classes: int) -> tuple[float, tuple[float, ...]]:
    """Overall and per-class (NaN where a class has no image) accuracy of ``net`` in eval mode."""
    net.eval()
    device = next(net.parameters()).device
    pred = torch.cat([net(_to_input(c, images.shape[-1], device)).argmax(1).cpu() for c in images.split(512)])
    per_class = per_class_accuracy(pred, labels, num_classes)
    return float((pred == labels).double().mean()), tuple(per_class.tolist())


def _fit(net: ProbeNet, images: Tensor, labels: Tensor, cfg: ProbeConfig, device: torch.device) -> None:
    """Train ``net`` in place: AdamW with a one-cycle schedule, cross-entropy, seeded shuffles and augmentation."""
    gen = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = -(-len(images) // cfg.batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    net.train()
    for epoch in range(cfg.epochs):
        total = 0.0
        for idx in torch.randperm(len(images), generator=gen).split(cfg.batch_size):
            x = images[idx].float() / 255.0
            if cfg.augment:
                x = _augment(x, gen)
            x = x.to(device).contiguous(memory_format=torch.channels_last)  # ~25% faster convs on CPU
            loss = F.cross_entropy(net(x), labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        log.debug("probe epoch %d/%d: train loss %.4f", epoch + 1, cfg.epochs, total / len(images))


def probe_key(train_ds: Any, val_ds: Any, cfg: ProbeConfig) -> str:
    """16-hex cache key over both splits' fingerprints, the config and ``PROBE_VERSION``."""
    return short_hash(
        {"version": PROBE_VERSION, "train": train_ds.fingerprint(), "val": val_ds.fingerprint(), "cfg": asdict(cfg)}
    )


def train_probe(train_ds: Any, val_ds: Any, cfg: ProbeConfig, device: str | torch.device = "cpu") -> Probe:
    """Train a probe on ``train_ds`` and measure it on ``val_ds`` (both ``ImageDataset``s).

    Deterministic given ``cfg.seed`` (and the thread count: CPU kernels may reduce in a
    different order). The global torch RNG is left untouched.
    """
    start = time.perf_counter()
    device = torch.device(device)
    num_classes = int(train_ds.num_classes)
    size = min(int(train_ds.image_size), cfg.max_image_size)
    images, labels = _read_split(train_ds, cfg.max_train_images, size, cfg.seed)
    val_images, val_labels = _read_split(val_ds, cfg.max_val_images, size, cfg.seed + 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = ProbeNet(num_classes, cfg.feature_dim, cfg.width)
    net = net.to(device=device, memory_format=torch.channels_last)
    with phase(f"probe: training on {len(images)} images"):
        _fit(net, images, labels, cfg, device)
    net = net.to(memory_format=torch.contiguous_format)
    accuracy, per_class = _evaluate(net, val_images, val_labels, num_classes)
    info = ProbeInfo(
        num_classes=num_classes,
        image_size=size,
        feature_dim=cfg.feature_dim,
        width=cfg.width,
        val_accuracy=accuracy,
        per_class_val_accuracy=per_class,
        train_fingerprint=train_ds.fingerprint(),
        val_fingerprint=val_ds.fingerprint(),
        key=probe_key(train_ds, val_ds, cfg),
        config=asdict(cfg),
    )
    log.info(
        "probe %s: %d train / %d val images at %d px, val accuracy %.4f, trained in %.1f s",
        info.key, len(images), len(val_images), size, accuracy, time.perf_counter() - start,
    )  # fmt: skip
    return Probe(net.cpu(), info)


def load_or_train_probe(
    train_ds: Any, val_ds: Any, cache_dir: Path, cfg: ProbeConfig, device: str | torch.device = "cpu"
) -> Probe:
    """The probe cached at ``cache_dir / f"probe-{key}.pt"``, training (and caching) it on a miss."""
    path = Path(cache_dir) / f"probe-{probe_key(train_ds, val_ds, cfg)}.pt"
    with file_lock(path.with_name(f".{path.stem}.lock")):  # sweep points at once: one trains, the others load
        return _load_or_train(path, train_ds, val_ds, cfg, device)


def _load_or_train(path: Path, train_ds: Any, val_ds: Any, cfg: ProbeConfig, device: str | torch.device) -> Probe:
    if path.is_file():
        try:
            probe = Probe.load(path)
            log.info("probe: loaded %s (val accuracy %.4f)", path, probe.val_accuracy)
            return probe
        except (OSError, EOFError, RuntimeError, ValueError, KeyError, TypeError, pickle.UnpicklingError) as err:
            # a cache file from another PROBE_VERSION or a damaged disk: retrain rather than fail the run
            log.warning("probe: cannot read %s (%s: %s); retraining", path, type(err).__name__, err)
    probe = train_probe(train_ds, val_ds, cfg, device)
    probe.save(path)
    return probe


# --- torch-fidelity feature extractor ---------------------------------------------------------

_LIVE_PROBES: dict[str, Probe] = {}


@contextmanager
def registered_probe(probe: Probe) -> Iterator[str]:
    """Make an in-memory probe reachable by torch-fidelity for the duration of the block.

    Yields the string to pass as ``feature_extractor_weights_path`` with
    ``feature_extractor="lmgen-probe"``; the entry is removed on exit, so nothing leaks.
    """
    key = f"{_MEMORY_PREFIX}{probe.info.key}-{uuid.uuid4().hex[:8]}"
    _LIVE_PROBES[key] = probe
    try:
        yield key
    finally:
        del _LIVE_PROBES[key]


def resolve_probe(spec: str | None) -> Probe:
    """The probe named by ``spec``: an id from ``registered_probe`` or the path of a probe file."""
    if spec is None:
        raise ValueError(
            f"feature extractor {EXTRACTOR_NAME!r} needs feature_extractor_weights_path: "
            "an id from lmgen.metrics.probe.registered_probe() or a probe file path"
        )
    if spec in _LIVE_PROBES:
        return _LIVE_PROBES[spec]
    if spec.startswith(_MEMORY_PREFIX):
        raise ValueError(f"probe {spec!r} is no longer registered (used outside its registered_probe block?)")
    if not Path(spec).is_file():
        raise ValueError(f"probe file {spec!r} does not exist")
    return Probe.load(Path(spec))


class ProbeFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor ``"lmgen-probe"``: uint8 (B, 3, H, W) -> ("probe", "logits") features.

    Holds a deep copy of the probe's net: torch-fidelity moves and re-modes its extractor
    (``.cuda()``, ``.eval()``), which must not change the caller's ``Probe``.
    """

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(name, features_list)
        probe = resolve_probe(feature_extractor_weights_path)
        self.net = copy.deepcopy(probe.net).eval()
        self.image_size = probe.image_size

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """x: uint8 (B, 3, H, W) -> tuple of float32 features, in ``features_list`` order."""
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"{EXTRACTOR_NAME}: expected uint8 (B, 3, H, W), got {x.dtype} {tuple(x.shape)}")
        device = next(self.net.parameters()).device
        feats = self.net.features(_to_input(x, self.image_size, device))
        out = {FEATURE_LAYER: feats.float(), LOGITS_LAYER: self.net.head(feats).float()}
        return tuple(out[name] for name in self.features_list)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return FEATURE_LAYER, LOGITS_LAYER

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return LOGITS_LAYER if metric == "isc" else FEATURE_LAYER

    @staticmethod
    def can_be_compiled() -> bool:
        return False  # a few ms per batch already; compiling would cost more than it saves

    @staticmethod
    def get_dummy_input_for_compile() -> Tensor:
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)


# torch-fidelity's registry refuses duplicates; the guard keeps a module reload harmless.
if EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(EXTRACTOR_NAME, ProbeFeatureExtractor)
