"""``vq``: the conv autoencoder with a vector-quantised bottleneck (VQ-VAE/VQGAN, LlamaGen).

The baseline of JPEG-LM's comparison and of MAGVIT-v2's Fig. 1: a codebook of
``codebook_size`` learned ``codebook_dim``-dimensional codes, one id per latent position.
Two codebook-collapse fixes are switches of it (``simvq``, ``rotation_trick``), off by default.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .base import MAX_VOCAB_SIZE, count_label
from .learned import LearnedConfig, LearnedTokenizer
from .quantizers import VectorQuantizer, VQOptions


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
    # Restart from the last restart_pool × K training latents rather than the current batch's alone
    # (0): at 2^14 codes one batch has fewer latents than there are dead codes.
    restart_pool: int = 0
    # Codebook-collapse fixes, off by default. SimVQ (Zhu et al. 2024): frozen random codes through
    # one learned linear map (needs restart_every: 0, excludes ema). Rotation trick (Fifty et al.
    # 2024): the encoder's gradient through the rotation onto its code, not straight through.
    simvq: bool = False
    rotation_trick: bool = False

    def label(self) -> str:
        """Short preset-style name for plots and tables: codebook size, downsampling factor and
        the collapse fixes switched on (``vq 16k f4 simvq``)."""
        return f"{self.name} {count_label(self.codebook_size)} f{self.downsample}{fixes_label(self)}"


def fixes_label(cfg: VQConfig) -> str:
    """The collapse fixes a VQ config switches on, as a label suffix in this order: " l2" (LlamaGen's
    cosine codes), " simvq", " rot", " pool" (restarts from the restart pool); "" for none."""
    switches = (("l2", cfg.l2_norm), ("simvq", cfg.simvq), ("rot", cfg.rotation_trick), ("pool", cfg.restart_pool))
    return "".join(f" {tag}" for tag, on in switches if on)


class VQTokenizer(LearnedTokenizer):
    """vocab_size = codebook_size; tokens per image = (H/downsample)·(W/downsample)."""

    Config = VQConfig

    def build_quantizer(self, cfg: VQConfig) -> nn.Module:
        return vector_quantizer(cfg)


def vector_quantizer(cfg: VQConfig) -> VectorQuantizer:
    """The ``VectorQuantizer`` a VQ config describes (also crt's with ``quantizer: vq``)."""
    check_codebook(cfg)
    return VectorQuantizer(cfg.codebook_size, cfg.codebook_dim, vq_options(cfg))


def check_codebook(cfg: VQConfig) -> None:
    """ValueError naming ``<name>.<field>`` for a codebook that cannot be built or cached: checked
    before the (codebook_size, codebook_dim) codebook is allocated."""
    if not 2 <= cfg.codebook_size <= MAX_VOCAB_SIZE:
        raise ValueError(f"{cfg.name}.codebook_size must be in [2, 2^31] (token ids are cached as int32), "
                         f"got {cfg.codebook_size}")
    if cfg.codebook_dim < 1:
        raise ValueError(f"{cfg.name}.codebook_dim must be >= 1, got {cfg.codebook_dim}")


def vq_options(cfg: VQConfig) -> VQOptions:
    """The ``VQOptions`` of a VQ config; ValueError naming ``<name>.<field>`` for switches that
    exclude each other (simvq with ema or with restarts)."""
    if cfg.simvq and cfg.ema:
        raise ValueError(f"{cfg.name}.simvq learns its linear map by the codebook loss: set {cfg.name}.ema=false")
    if cfg.simvq and cfg.restart_every:
        raise ValueError(f"{cfg.name}.simvq keeps its random codebook frozen: set {cfg.name}.restart_every=0 "
                         f"(got {cfg.restart_every})")
    if cfg.restart_pool < 0 or (cfg.restart_pool and not cfg.restart_every):
        raise ValueError(f"{cfg.name}.restart_pool must be >= 0 and needs dead-code restarts ({cfg.name}.restart_every "
                         f"> 0), got restart_pool={cfg.restart_pool}, restart_every={cfg.restart_every}")
    options = VQOptions(beta=cfg.beta, l2_norm=cfg.l2_norm, ema=cfg.ema, ema_decay=cfg.ema_decay,
                        restart_every=cfg.restart_every, restart_threshold=cfg.restart_threshold,
                        restart_pool=cfg.restart_pool,
                        simvq=cfg.simvq, rotation_trick=cfg.rotation_trick)
    options.check()
    return options
