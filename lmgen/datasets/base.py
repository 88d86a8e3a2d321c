"""What every dataset provides, and batching that survives unreadable files.

Image datasets (``frames == 0``) yield ``(image, label)`` with ``image`` uint8 (3, H, W) in
[0, 255]; video datasets (``frames = T > 0``) yield ``(clip, label)`` with ``clip`` uint8
(T, 3, H, W), and ``frame_view`` turns one into an image dataset of single frames. An item
that cannot be read (folder datasets only) is ``None``. ``iter_batches`` walks a dataset in
index order through a torch ``DataLoader``, drops such items and counts them, so a corrupt
file costs one item, never a run. Its ``collate_fn`` may do more than stack (the token-cache
writer encodes there, so that DataLoader workers tokenize in parallel): whatever it returns
only needs ``skipped`` and ``__len__``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lmgen.checks import check_choices, check_ranges

log = logging.getLogger(__name__)

Item = tuple[Tensor, int] | None


@runtime_checkable
class ImageDataset(Protocol):
    """The interface shared by every entry of ``lmgen.datasets.DATASETS``.

    - ``frames``: frames per clip; 0 for still-image datasets. ``fps``: the clips' frame rate
      (0.0 for still images).
    - ``dataset[i]``: ``(uint8 (3, H, W), label)`` for images, ``(uint8 (frames, 3, H, W),
      label)`` for clips, or ``None`` if the file is unreadable.
    - video datasets only: ``frame(i, t)``: ``(uint8 (3, H, W), label)`` or ``None``, frame
      ``t`` of clip ``i``, without producing the rest of the clip.
    - ``class_counts()``: int64 (num_classes,), items per class, known without decoding.
    - ``labels()``: int64 (N,), every item's label, cheap.
    - ``attributes(i)``: JSON-serialisable per-item metadata for analysis.
    - ``fingerprint()``: short hash of everything that determines the split's content.
    """

    num_classes: int
    class_names: list[str]
    image_size: int
    frames: int
    fps: float

    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> Item: ...
    def class_counts(self) -> Tensor: ...
    def labels(self) -> Tensor: ...
    def attributes(self, index: int) -> dict[str, Any]: ...
    def fingerprint(self) -> str: ...


@dataclass
class DataConfig:
    """What every dataset's config has; each dataset class extends it as its ``Config`` (the
    way tokenizers do), and ``data.name`` picks the dataset, so the ``data`` block's schema is
    that dataset's own. ``check`` holds every rule a config must meet, written once here and in
    the subclasses, so ``load_config`` fails on a bad value before compute."""

    name: str = ""
    image_size: int = 32
    train_size: int = 4000  # folders: 0 = every file
    val_size: int = 500
    seed: int = 0  # the dataset's own seed (content), apart from the run's
    encode_batch_size: int = 256  # images per tokenizer.encode call when filling the token cache
    num_workers: int = 0  # DataLoader workers for reading images and token batches
    fit_images: int = 2000  # train images a non-learned tokenizer fits on (palette, BPE)

    RANGES: ClassVar[dict[str, str]] = {
        "image_size": "[1, inf)", "train_size": "[0, inf)", "val_size": "[0, inf)", "seed": "[0, inf)",
        "encode_batch_size": "[1, inf)", "num_workers": "[0, inf)", "fit_images": "[0, inf)",
    }

    def check(self) -> None:
        """ValueError naming ``data.<field>`` for a value this dataset cannot use."""
        check_choices("data", self)
        check_ranges("data", self, self.RANGES)


def check_clip(frames: int, fps: float, name: str) -> None:
    """ValueError naming ``data.frames`` / ``data.fps`` unless clips have >= 1 frame at fps > 0."""
    if frames < 1:
        raise ValueError(f"data.frames must be >= 1 for the video dataset {name!r}, got {frames}")
    if not fps > 0:
        raise ValueError(f"data.fps must be > 0 for the video dataset {name!r}, got {fps}")


def short_hash(payload: Any) -> str:
    """16 hex chars of SHA-256 over the canonical JSON of ``payload`` (stable across runs)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ImageBatch:
    """A batch of readable items.

    images: (B, 3, H, W) uint8 in [0, 255] — (B, T, 3, H, W) for a video dataset's clips;
    labels: (B,) int64; indices: (B,) int64, the dataset index of each item; skipped: number
    of unreadable items dropped from this batch.
    """

    images: Tensor
    labels: Tensor
    indices: Tensor
    skipped: int

    def __len__(self) -> int:
        return int(self.images.shape[0])


def collate_images(items: Sequence[tuple[int, Item]]) -> ImageBatch:
    """Collate ``(index, item)`` pairs, dropping and counting ``None`` items.

    Items are stacked as they are: images (3, H, W) give (B, 3, H, W), clips (T, 3, H, W)
    give (B, T, 3, H, W). A batch whose items are all unreadable has ``images`` of shape
    (0, 3, 0, 0) (``iter_batches`` never yields one).
    """
    good = [(i, item) for i, item in items if item is not None]
    skipped = len(items) - len(good)
    if not good:
        empty = torch.empty(0, dtype=torch.int64)
        return ImageBatch(torch.empty(0, 3, 0, 0, dtype=torch.uint8), empty, empty.clone(), skipped)
    return ImageBatch(
        images=torch.stack([item[0] for _, item in good]),
        labels=torch.tensor([item[1] for _, item in good], dtype=torch.int64),
        indices=torch.tensor([i for i, _ in good], dtype=torch.int64),
        skipped=skipped,
    )


class _Indexed(Dataset):
    """Yields ``(index, dataset[index])`` so batches know which items they hold."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[int, Item]:
        return index, self.dataset[index]


class CountedBatch(Protocol):
    """What a collate function given to ``iter_batches`` returns: ``len`` readable items, and
    ``skipped`` unreadable ones it dropped (``ImageBatch``, or a batch already encoded)."""

    skipped: int

    def __len__(self) -> int: ...


BatchT = TypeVar("BatchT", bound=CountedBatch)
Collate = Callable[[Sequence[tuple[int, Item]]], BatchT]


class ImageBatchIterator(Iterator[BatchT], Generic[BatchT]):
    """Iterates the batches of a dataset in index order; counts what was dropped.

    Batches are ``ImageBatch``es unless another ``collate_fn`` (given ``(index, item)`` pairs,
    run inside the DataLoader's workers when ``num_workers`` > 0) makes something else of
    them. After (or during) a pass, ``skipped`` is the number of unreadable items dropped and
    ``seen`` the number of items visited. Re-iterating starts a new pass and resets both.
    Batches that lost every item are not yielded (only counted).
    """

    def __init__(self, dataset: Dataset, batch_size: int, num_workers: int = 0,
                 collate_fn: Collate = collate_images) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        self.loader = DataLoader(
            _Indexed(dataset),
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            collate_fn=collate_fn,
        )
        self.skipped = 0
        self.seen = 0
        self._it: Iterator[BatchT] | None = None
        self._done = False

    def __iter__(self) -> ImageBatchIterator[BatchT]:
        self.skipped, self.seen, self._done = 0, 0, False
        self._it = iter(self.loader)
        return self

    def __next__(self) -> BatchT:
        if self._it is None:
            iter(self)
        assert self._it is not None
        while not self._done:
            try:
                batch = next(self._it)
            except StopIteration:
                self._done = True
                if self.skipped:
                    log.warning("skipped %d unreadable of %d items", self.skipped, self.seen)
                break
            self.skipped += batch.skipped
            self.seen += len(batch) + batch.skipped
            if len(batch):
                return batch
        raise StopIteration


def iter_batches(dataset: Dataset, batch_size: int, num_workers: int = 0,
                 collate_fn: Collate = collate_images) -> ImageBatchIterator:
    """Batches of ``dataset`` in index order; unreadable items are dropped and counted.

    ``collate_fn`` turns ``(index, item)`` pairs into a batch (default ``collate_images``:
    an ``ImageBatch``); it must drop unreadable items and count them in ``skipped``. The
    returned iterator exposes ``.skipped`` (and ``.seen``) once iterated; each unreadable
    file is logged with its path by the dataset itself.
    """
    return ImageBatchIterator(dataset, batch_size, num_workers, collate_fn)


def load_batch(dataset: Dataset, limit: int = 0, batch_size: int = 256, num_workers: int = 0) -> ImageBatch:
    """The first ``limit`` readable items (0 = all) in index order, as one ``ImageBatch``
    (images — or clips — with their labels and dataset indices; ``skipped`` counts what was
    dropped)."""
    batches, count = [], 0
    it = iter_batches(dataset, batch_size, num_workers=num_workers)
    for batch in it:
        batches.append(batch)
        count += len(batch)
        if limit and count >= limit:
            break
    # the iterator's count: a batch that lost every item is counted there but never yielded
    if not batches:
        return dataclasses.replace(collate_images([]), skipped=it.skipped)
    cut = slice(limit or None)
    return ImageBatch(images=torch.cat([b.images for b in batches])[cut],
                      labels=torch.cat([b.labels for b in batches])[cut],
                      indices=torch.cat([b.indices for b in batches])[cut],
                      skipped=it.skipped)


def load_images(dataset: Dataset, limit: int = 0, batch_size: int = 256, num_workers: int = 0) -> Tensor:
    """uint8 (M, 3, H, W): the first ``limit`` readable images in index order (0 = all);
    (M, T, 3, H, W) clips for a video dataset (``frame_view`` gives its frames instead)."""
    return load_batch(dataset, limit, batch_size, num_workers).images


class FrameView(Dataset):
    """One frame per clip of a video dataset, as an image dataset (``frames == 0``).

    Item ``i`` is ``clips.frame(i, i % clips.frames)``: ``(uint8 (3, H, W), label)`` or
    ``None``. The frame index cycles so the view sees every time step (a probe trained on
    it meets early and late frames alike) while staying deterministic. Labels, classes and
    ``image_size`` are the clips'; ``attributes(i)`` adds ``"frame"``.
    """

    frames = 0
    fps = 0.0
    video = False

    def __init__(self, clips: Any) -> None:  # Any: a video dataset, which adds ``frame`` to ImageDataset
        if int(getattr(clips, "frames", 0)) <= 0:
            raise ValueError("frame_view: needs a video dataset (frames > 0)")
        self.clips = clips
        self.num_classes: int = clips.num_classes
        self.class_names: list[str] = list(clips.class_names)
        self.image_size: int = clips.image_size

    def __len__(self) -> int:
        return len(self.clips)

    def frame_index(self, index: int) -> int:
        """Which frame of clip ``index`` item ``index`` shows."""
        return (index % len(self)) % self.clips.frames

    def __getitem__(self, index: int) -> Item:
        return self.clips.frame(index, self.frame_index(index))

    def labels(self) -> Tensor:
        """int64 (N,): the clips' labels."""
        return self.clips.labels()

    def class_counts(self) -> Tensor:
        """int64 (num_classes,): the clips' class counts."""
        return self.clips.class_counts()

    def attributes(self, index: int) -> dict[str, Any]:
        """The clip's attributes plus ``"frame"``, the frame this item shows."""
        return {**self.clips.attributes(index), "frame": self.frame_index(index)}

    def fingerprint(self) -> str:
        """A hash of the clips' fingerprint and the view (differs from the clips')."""
        return short_hash({"clips": self.clips.fingerprint(), "view": "frame_view"})


def frame_view(dataset: ImageDataset) -> ImageDataset:
    """An image dataset for ``dataset``: itself if it holds images (``frames == 0``), else a
    ``FrameView`` with one frame of each clip (what the offline probe classifier trains on)."""
    return dataset if int(getattr(dataset, "frames", 0)) == 0 else FrameView(dataset)
