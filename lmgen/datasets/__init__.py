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

import dataclasses
from collections.abc import Mapping
from typing import Any

from lmgen.datasets.base import (
    DataConfig,
    FrameView,
    ImageBatch,
    ImageBatchIterator,
    ImageDataset,
    collate_images,
    frame_view,
    iter_batches,
    load_batch,
    load_images,
)
from lmgen.datasets.folder import ImageFolderConfig, ImageFolderDataset
from lmgen.datasets.moving_shapes import MOTIONS, MovingShapesConfig, MovingShapesDataset
from lmgen.datasets.shapes import CLASS_NAMES, ShapesConfig, ShapesDataset
from lmgen.datasets.videofolder import VideoFolderConfig, VideoFolderDataset

DATASETS: dict[str, type] = {
    "shapes": ShapesDataset,
    "imagefolder": ImageFolderDataset,
    "moving_shapes": MovingShapesDataset,
    "videofolder": VideoFolderDataset,
}
SPLITS: tuple[str, ...] = ("train", "val")


def dataset_config(cfg: DataConfig | Mapping[str, Any]) -> DataConfig:
    """A ``data`` block as its dataset's typed ``Config`` (a Mapping is built into one; unknown
    fields and unknown dataset names are ValueErrors listing the valid ones), checked."""
    if isinstance(cfg, Mapping):
        name = cfg.get("name", "shapes")
        if name not in DATASETS:
            raise ValueError(f"unknown dataset {name!r}; valid: {sorted(DATASETS)}")
        valid = [f.name for f in dataclasses.fields(DATASETS[name].Config)]
        unknown = sorted(set(cfg) - set(valid))
        if unknown:
            raise ValueError(f"unknown field(s) {unknown} for dataset {name!r}; valid fields: {valid}")
        cfg = DATASETS[name].Config(**cfg)
    if cfg.name not in DATASETS:
        raise ValueError(f"unknown dataset {cfg.name!r}; valid: {sorted(DATASETS)}")
    cfg.check()
    return cfg


def build_dataset(cfg: DataConfig | Mapping[str, Any], split: str) -> ImageDataset:
    """The ``split`` ("train" | "val") of the dataset a ``data`` block names (``cfg.name``):
    its typed ``Config`` (``DATASETS[name].Config``) or a Mapping of the same fields."""
    cfg = dataset_config(cfg)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {list(SPLITS)}")
    return DATASETS[cfg.name].from_config(cfg, split)


__all__ = [
    "CLASS_NAMES",
    "DATASETS",
    "MOTIONS",
    "DataConfig",
    "FrameView",
    "ImageBatch",
    "ImageBatchIterator",
    "ImageDataset",
    "ImageFolderConfig",
    "ImageFolderDataset",
    "MovingShapesConfig",
    "MovingShapesDataset",
    "ShapesConfig",
    "ShapesDataset",
    "VideoFolderConfig",
    "VideoFolderDataset",
    "build_dataset",
    "dataset_config",
    "collate_images",
    "frame_view",
    "iter_batches",
    "load_batch",
    "load_images",
]
