"""``vq``: the conv autoencoder with a vector-quantised bottleneck (VQ-VAE/VQGAN, LlamaGen).

The baseline of JPEG-LM's comparison and of MAGVIT-v2's Fig. 1: a codebook of
``codebook_size`` learned ``codebook_dim``-dimensional codes, one id per latent position.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .base import MAX_VOCAB_SIZE, count_label
from .learned import LearnedConfig, LearnedTokenizer
from .quantizers import VectorQuantizer


@dataclass
class VQConfig(LearnedConfig):
    name: str = "vq"
    codebook_size: int = 1024
    codebook_dim: int = 16  # LlamaGen: 8 with l2-normalised codes
    beta: float = 0.25  # commitment weight, on the encoder term (VQ-VAE)
    l2_norm: bool = False  # LlamaGen: cosine-similarity codes
    ema: bool = False  # EMA codebook updates instead of the codebook loss (VQ-VAE-2)
    ema_decay: float = 0.99
    restart_every: int = 100  # steps between dead-code restarts (0 = never)
    restart_threshold: float = 0.01  # restart codes used < this × the uniform share 1/K

    def label(self) -> str:
        """Short preset-style name for plots and tables: codebook size and downsampling factor."""
        return f"{self.name} {count_label(self.codebook_size)} f{self.downsample}"


class VQTokenizer(LearnedTokenizer):
    """vocab_size = codebook_size; tokens per image = (H/downsample)·(W/downsample)."""

    Config = VQConfig

    def build_quantizer(self, cfg: VQConfig) -> nn.Module:
        return vector_quantizer(cfg)


def vector_quantizer(cfg: VQConfig) -> VectorQuantizer:
    """The ``VectorQuantizer`` a VQ config describes (also crt's with ``quantizer: vq``)."""
    # Checked before the (codebook_size, codebook_dim) codebook is allocated.
    if not 2 <= cfg.codebook_size <= MAX_VOCAB_SIZE:
        raise ValueError(f"{cfg.name}.codebook_size must be in [2, 2^31] (token ids are cached as int32), "
                         f"got {cfg.codebook_size}")
    if cfg.codebook_dim < 1:
        raise ValueError(f"{cfg.name}.codebook_dim must be >= 1, got {cfg.codebook_dim}")
    return VectorQuantizer(cfg.codebook_size, cfg.codebook_dim, beta=cfg.beta, l2_norm=cfg.l2_norm,
                           ema=cfg.ema, ema_decay=cfg.ema_decay, restart_every=cfg.restart_every,
                           restart_threshold=cfg.restart_threshold)
