"""``lfq``: lookup-free quantisation (MAGVIT-v2): every latent channel is one bit.

``bits`` channels → codes in [0, 2^bits); no codebook to learn, so vocabularies of 2^16 and
more cost nothing in the tokenizer. For the LM such a code can be split into sub-codes
(MAGVIT-v2 factorises 2^18 into two 2^9 heads): ``num_subcodes=2``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .learned import LearnedConfig, LearnedTokenizer, bits_label, check_code_bits, split_bits
from .quantizers import LookupFreeQuantizer


@dataclass
class LFQConfig(LearnedConfig):
    name: str = "lfq"
    bits: int = 10  # vocab 2^bits
    commitment_weight: float = 0.25  # MAGVIT-v2
    entropy_weight: float = 0.1  # MAGVIT-v2
    entropy_temperature: float = 0.01  # MAGVIT-v2: τ
    max_entropy_group_bits: int = 12  # exact batch entropy up to 2^12 codes, grouped above
    num_subcodes: int = 1  # LM factorisation: n sub-codes of bits/n bits (1 = one vocabulary)

    def label(self) -> str:
        """Short preset-style name for plots and tables: code bits and downsampling factor."""
        return bits_label(self)


class LFQTokenizer(LearnedTokenizer):
    """vocab_size = 2^bits; id = Σ_i 2^i · 1[z_i > 0]."""

    Config = LFQConfig

    def build_quantizer(self, cfg: LFQConfig) -> nn.Module:
        return lookup_free_quantizer(cfg)

    def build_subcodes(self, cfg: LFQConfig) -> tuple[int, ...]:
        return split_bits(cfg.bits, cfg.num_subcodes, cfg.name)


def lookup_free_quantizer(cfg: LFQConfig) -> LookupFreeQuantizer:
    """The ``LookupFreeQuantizer`` an LFQ config describes (also crt's with ``quantizer: lfq``)."""
    check_code_bits(cfg)
    return LookupFreeQuantizer(cfg.bits, commitment_weight=cfg.commitment_weight,
                               entropy_weight=cfg.entropy_weight, entropy_temperature=cfg.entropy_temperature,
                               max_entropy_group_bits=cfg.max_entropy_group_bits)
