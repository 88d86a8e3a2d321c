"""``bae``: ELM's binary autoencoder: sigmoid → Bernoulli bits, straight-through.

The decoder reads a linear map of the bit vector (no codebook lookup), so every one of the
2^bits codes is usable by construction. ELM's "n-c" vocabulary decomposition splits each
position's code into n sub-codes of bits/n bits for the LM; two sub-codes worked best.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .learned import LearnedConfig, LearnedTokenizer, bits_label, check_code_bits, split_bits
from .quantizers import BinaryQuantizer


@dataclass
class BAEConfig(LearnedConfig):
    name: str = "bae"
    bits: int = 16  # ELM: D ∈ {16, 20, 24, 32}
    embed_dim: int = 32  # width of the linear embedding of the bit vector (decoder input)
    deterministic: bool = False  # ELM's deterministic variant: b = 1[σ > 0.5] also in training
    num_subcodes: int = 2  # ELM: two sub-codes is best

    def label(self) -> str:
        """Short preset-style name for plots and tables: code bits and downsampling factor."""
        return bits_label(self)


class BAETokenizer(LearnedTokenizer):
    """vocab_size = 2^bits; id = Σ_i 2^i · b_i."""

    Config = BAEConfig

    def build_quantizer(self, cfg: BAEConfig) -> nn.Module:
        check_code_bits(cfg)
        if cfg.embed_dim < 1:
            raise ValueError(f"{cfg.name}.embed_dim must be >= 1, got {cfg.embed_dim}")
        return BinaryQuantizer(cfg.bits, cfg.embed_dim, deterministic=cfg.deterministic)

    def build_subcodes(self, cfg: BAEConfig) -> tuple[int, ...]:
        return split_bits(cfg.bits, cfg.num_subcodes, cfg.name)
