"""Image datasets, selected by name from ``DATASETS``.

Every dataset yields ``(uint8 (3, H, W) image in [0, 255], int label)`` (``None`` for an
unreadable file) and exposes ``num_classes``, ``class_names``, ``image_size``,
``class_counts()``, ``labels()``, ``attributes(i)`` and ``fingerprint()`` (see
``ImageDataset``). ``iter_batches`` walks one in index order and counts skipped files.
"""

from __future__ import annotations

from typing import Any

from lmgen.datasets.base import (
    ImageBatch,
    ImageBatchIterator,
    ImageDataset,
    collate_images,
    config_value,
    iter_batches,
    load_batch,
    load_images,
)
from lmgen.datasets.folder import ImageFolderDataset
from lmgen.datasets.shapes import CLASS_NAMES, ShapesDataset

DATASETS: dict[str, type] = {"shapes": ShapesDataset, "imagefolder": ImageFolderDataset}
SPLITS: tuple[str, ...] = ("train", "val")


def build_dataset(cfg: Any, split: str) -> ImageDataset:
    """The ``split`` ("train" | "val") of the dataset named ``cfg.name``.

    ``cfg`` is the dataset config block (dataclass or OmegaConf node) with ``name``,
    ``image_size``, ``train_size``, ``val_size``, ``seed``, ``root``, ``val_fraction`` and
    ``shapes.*``; each dataset class reads what it needs in ``from_config``.
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
    "ImageBatch",
    "ImageBatchIterator",
    "ImageDataset",
    "ImageFolderDataset",
    "ShapesDataset",
    "build_dataset",
    "collate_images",
    "iter_batches",
    "load_batch",
    "load_images",
]
