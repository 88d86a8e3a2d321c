"""Image and video datasets, selected by name from ``DATASETS``.

Image datasets (``frames == 0``: ``shapes``, ``imagefolder``) yield ``(uint8 (3, H, W) image
in [0, 255], int label)``; video datasets (``frames = T > 0``: ``moving_shapes``,
``videofolder``) yield ``(uint8 (T, 3, H, W) clip, int label)`` and ``frame(i, t)``; either
gives ``None`` for an unreadable file. All expose ``frames``, ``fps``, ``num_classes``,
``class_names``, ``image_size``, ``class_counts()``, ``labels()``, ``attributes(i)`` and
``fingerprint()`` (see ``ImageDataset``); the class attribute ``video`` says which kind a
class is. ``frame_view`` makes an image dataset of a video one; ``iter_batches`` walks
either in index order and counts skipped files.
"""

from __future__ import annotations

from typing import Any

from lmgen.datasets.base import (
    FrameView,
    ImageBatch,
    ImageBatchIterator,
    ImageDataset,
    collate_images,
    config_value,
    frame_view,
    iter_batches,
    load_batch,
    load_images,
)
from lmgen.datasets.folder import ImageFolderDataset
from lmgen.datasets.moving_shapes import MOTIONS, MovingShapesDataset
from lmgen.datasets.shapes import CLASS_NAMES, ShapesDataset
from lmgen.datasets.videofolder import VideoFolderDataset

DATASETS: dict[str, type] = {
    "shapes": ShapesDataset,
    "imagefolder": ImageFolderDataset,
    "moving_shapes": MovingShapesDataset,
    "videofolder": VideoFolderDataset,
}
SPLITS: tuple[str, ...] = ("train", "val")


def build_dataset(cfg: Any, split: str) -> ImageDataset:
    """The ``split`` ("train" | "val") of the dataset named ``cfg.name``.

    ``cfg`` is the dataset config block (dataclass or OmegaConf node) with ``name``,
    ``image_size``, ``train_size``, ``val_size``, ``seed``, ``root``, ``val_fraction``,
    ``frames``, ``fps``, ``shapes.*`` and ``motion.*``; each dataset class reads what it needs
    in ``from_config``.
    """
    name = config_value(cfg, "name")
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid: {sorted(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {list(SPLITS)}")
    return DATASETS[name].from_config(cfg, split)


__all__ = [
    "CLASS_NAMES",
    "DATASETS",
    "MOTIONS",
    "FrameView",
    "ImageBatch",
    "ImageBatchIterator",
    "ImageDataset",
    "ImageFolderDataset",
    "MovingShapesDataset",
    "ShapesDataset",
    "VideoFolderDataset",
    "build_dataset",
    "collate_images",
    "frame_view",
    "iter_batches",
    "load_batch",
    "load_images",
]
