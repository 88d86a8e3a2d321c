"""The variable under study: one module per tokenizer, chosen by name from ``TOKENIZERS``.

``build_tokenizer({"name": "jpeg", "quality": 25}, image_size=256)`` builds one from its
config block; every tokenizer implements ``ImageTokenizer`` (see ``base.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .bae import BAETokenizer
from .base import Decoded, ImageTokenizer, TokenBatch
from .causal1d import Causal1DTokenizer
from .crt import CRTTokenizer
from .jpeg import JpegTokenizer
from .lfq import LFQTokenizer
from .pixels import PixelTokenizer
from .vq import VQTokenizer

TOKENIZERS: dict[str, type] = {"pixels": PixelTokenizer, "jpeg": JpegTokenizer, "vq": VQTokenizer,
                               "lfq": LFQTokenizer, "bae": BAETokenizer, "crt": CRTTokenizer,
                               "causal1d": Causal1DTokenizer}

__all__ = ["TOKENIZERS", "Decoded", "ImageTokenizer", "TokenBatch", "build_tokenizer",
           "tokenizer_config_class"]


def tokenizer_config_class(name: str) -> type:
    """The config dataclass of tokenizer ``name``; ValueError listing the valid names."""
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; valid choices: {sorted(TOKENIZERS)}")
    return TOKENIZERS[name].Config


def _as_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict from a config dataclass instance, Mapping or OmegaConf DictConfig."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    if type(cfg).__module__.startswith("omegaconf"):   # DictConfig without importing omegaconf eagerly
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(cfg, resolve=True)
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise TypeError(f"tokenizer config must be a dataclass, Mapping or DictConfig, got {type(cfg).__name__}")


def build_tokenizer(cfg: Any, image_size: int | tuple[int, int]) -> ImageTokenizer:
    """Build the tokenizer named by ``cfg["name"]`` for images of ``image_size`` (H or (H, W)).

    ``cfg`` is the tokenizer's config block (dataclass, Mapping or DictConfig); its fields
    must be fields of that tokenizer's ``Config`` dataclass, else ValueError naming the
    unknown field and the valid ones.
    """
    fields = _as_dict(cfg)
    name = fields.get("name")
    config_cls = tokenizer_config_class(name)
    valid = [f.name for f in dataclasses.fields(config_cls)]
    unknown = [k for k in fields if k not in valid]
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} for tokenizer {name!r}; valid fields: {valid}")
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2:
        raise ValueError(f"image_size must be an int or (H, W), got {image_size!r}")
    return TOKENIZERS[name](config_cls(**fields), (int(size[0]), int(size[1])))
