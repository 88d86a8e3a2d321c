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
from .fsq import FSQTokenizer
from .h264 import H264Tokenizer
from .jpeg import JpegTokenizer
from .lfq import LFQTokenizer
from .multiscale import MultiScaleTokenizer
from .pixels import PixelTokenizer
from .rvq import RVQTokenizer
from .vq import VQTokenizer

# Order is the order of plots' colours and legends (analysis/style.py): add new arms at the end.
TOKENIZERS: dict[str, type] = {"pixels": PixelTokenizer, "jpeg": JpegTokenizer, "vq": VQTokenizer,
                               "lfq": LFQTokenizer, "bae": BAETokenizer, "crt": CRTTokenizer,
                               "causal1d": Causal1DTokenizer, "h264": H264Tokenizer, "fsq": FSQTokenizer,
                               "rvq": RVQTokenizer, "multiscale": MultiScaleTokenizer}

__all__ = ["TOKENIZERS", "Decoded", "ImageTokenizer", "TokenBatch", "build_tokenizer",
           "tokenizer_config_class", "tokenizer_for"]


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


def build_tokenizer(cfg: Any, image_size: int | tuple[int, int], frames: int = 0, fps: float = 3.0) -> ImageTokenizer:
    """Build the tokenizer named by ``cfg["name"]`` for images of ``image_size`` (H or (H, W)),
    or for clips of ``frames`` frames at ``fps`` (``frames`` 0 = still images).

    ``cfg`` is the tokenizer's config block (dataclass, Mapping or DictConfig); its fields
    must be fields of that tokenizer's ``Config`` dataclass, else ValueError naming the
    unknown field and the valid ones. A still-image tokenizer asked for clips, or a clip
    tokenizer (``video``) asked for still images, is a ValueError naming ``data.frames``.
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
    cls, size = TOKENIZERS[name], (int(size[0]), int(size[1]))
    if not cls.video:
        if frames:
            video = sorted(n for n, c in TOKENIZERS.items() if c.video)
            raise ValueError(f"data.frames={frames}: tokenizer {name!r} encodes still images; clips need one of {video}")
        return cls(config_cls(**fields), size)
    if frames <= 0:
        raise ValueError(f"data.frames must be > 0 for tokenizer {name!r}, which encodes clips (AVC-LM: 15)")
    return cls(config_cls(**fields), size, frames=frames, fps=fps)


def tokenizer_for(cfg: Any) -> ImageTokenizer:
    """The tokenizer of an experiment config: ``cfg.tokenizer`` for ``cfg.data``'s image size,
    and for a video dataset's frames per clip and frame rate (still-image datasets have none)."""
    data = cfg.data
    return build_tokenizer(cfg.tokenizer, data.image_size, getattr(data, "frames", 0), getattr(data, "fps", 3.0))
