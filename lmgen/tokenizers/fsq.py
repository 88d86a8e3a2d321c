"""``fsq``: finite scalar quantization (Mentzer et al. 2023, "FSQ: VQ-VAE Made Simple").

The encoder's 1×1 projection gives d channels (d small: 3 to 6); channel i is bounded by a
tanh to L_i levels and rounded to them (straight-through), and the code is the mixed-radix
number of the d per-channel levels, so the implicit codebook has ∏ L_i codes. There is no
codebook to learn and no codebook or commitment loss, and the paper reports ~100% code use
at every size. Levels are the paper's recommendations (its Table 1):

    2^8 → [8, 6, 5]   2^10 → [8, 5, 5, 5]   2^12 → [7, 5, 5, 5, 5]
    2^14 → [8, 8, 8, 6, 5]   2^16 → [8, 8, 8, 5, 5, 5]

Shapes: B batch, d = len(levels) channels, h×w latent grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .base import MAX_VOCAB_SIZE
from .learned import LearnedConfig, LearnedTokenizer
from .quantizers import QuantizerOutput, check_latents, code_stats

# Widens the tanh's range by 0.1% so that its extreme levels are reached at finite inputs
# (vector-quantize-pytorch's FSQ: eps = 1e-3 on the half-width).
_BOUND_EPS = 1e-3


class FiniteScalarQuantizer(nn.Module):
    """FSQ: each channel rounded to its own number of levels; the code is their mixed-radix number.

    forward: z (B, d, h, w) float → quantized (B, d, h, w) (same dtype) in [−1, 1], indices
    (B, h, w) int64 in [0, ∏ L_i). In fp32 with autocast off, per channel i with L = L_i:

        half = (L − 1)(1 + ε)/2,  offset = 0.5 if L is even else 0,  shift = atanh(offset / half)
        bounded = tanh(z + shift) · half − offset
        level = round(bounded) + ⌊L/2⌋ ∈ [0, L)          (straight-through rounding)
        quantized = (level − ⌊L/2⌋) / ⌊L/2⌋

    The shift puts z = 0 on a level for even L too. index = Σ_i level_i · ∏_{j<i} L_j (channel 0
    the least significant digit), the same code order as vector-quantize-pytorch's FSQ.
    No loss of its own (the paper uses none). No parameters or state: eval and train agree.

    stats: codebook_usage, perplexity, entropy (0: the assignment is hard, there is no soft
    distribution over codes), level_usage (fraction of each channel's levels the batch hits,
    mean over channels).
    """

    def __init__(self, levels: Sequence[int]) -> None:
        super().__init__()
        levels = [int(v) for v in levels]
        if not levels or any(v < 3 for v in levels):
            # L = 2 would put z = 0 where tanh is saturated (shift = atanh(0.999)), starving the
            # gradient; a 1-bit channel is lfq's job.
            raise ValueError(f"FSQ levels must be a non-empty list of integers >= 3, got {levels}")
        self.levels = tuple(levels)
        self.codebook_size = math.prod(levels)
        self.in_channels = self.out_channels = len(levels)
        lv = torch.tensor(levels, dtype=torch.float32).view(1, -1, 1, 1)  # (1, d, 1, 1)
        half = (lv - 1) * (1 + _BOUND_EPS) / 2
        offset = torch.where(lv % 2 == 0, 0.5, 0.0)
        self.register_buffer("_half", half, persistent=False)
        self.register_buffer("_offset", offset, persistent=False)
        self.register_buffer("_shift", torch.atanh(offset / half), persistent=False)
        self.register_buffer("_half_width", torch.div(lv, 2, rounding_mode="floor"), persistent=False)
        basis = torch.cumprod(torch.tensor([1, *levels[:-1]], dtype=torch.int64), 0)
        self.register_buffer("_basis", basis.view(1, -1, 1, 1), persistent=False)  # (1, d, 1, 1) mixed radix
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.int64).view(1, -1, 1, 1), persistent=False)

    def levels_of(self, indices: Tensor) -> Tensor:
        """(B, h, w) int64 codes → (B, d, h, w) int64 per-channel levels in [0, L_i)."""
        return (indices.long().unsqueeze(1) // self._basis) % self._levels

    def lookup(self, indices: Tensor) -> Tensor:
        """(B, h, w) int64 in [0, ∏ L_i) → (B, d, h, w) float32 in [−1, 1] (eval-mode ``quantized``)."""
        return (self.levels_of(indices).float() - self._half_width) / self._half_width

    def forward(self, z: Tensor) -> QuantizerOutput:
        """z (B, d, h, w) float → QuantizerOutput (see class docstring)."""
        check_latents(z, self.in_channels, "FiniteScalarQuantizer")
        with torch.autocast(z.device.type, enabled=False):
            bounded = torch.tanh(z.float() + self._shift) * self._half - self._offset
            rounded = torch.round(bounded)  # half to even, as torch's (and the reference's) round
            quantized = (bounded + (rounded - bounded).detach()) / self._half_width  # straight-through
        levels = (rounded + self._half_width).long()  # (B, d, h, w) in [0, L_i)
        indices = (levels * self._basis).sum(1)
        used = [levels[:, i].unique().numel() / n for i, n in enumerate(self.levels)]
        stats = {**code_stats(indices, self.codebook_size),
                 "entropy": torch.zeros((), dtype=torch.float32, device=z.device),
                 "level_usage": torch.tensor(sum(used) / len(used), dtype=torch.float32, device=z.device)}
        loss = torch.zeros((), dtype=torch.float32, device=z.device)
        return QuantizerOutput(quantized=quantized.to(z.dtype), indices=indices, loss=loss, stats=stats)


@dataclass
class FSQConfig(LearnedConfig):
    name: str = "fsq"
    levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])  # FSQ Table 1: 1000 codes ≈ 2^10

    def label(self) -> str:
        """Short preset-style name for plots and tables: the levels and downsampling factor (``fsq 8-5-5-5 f4``)."""
        return f"{self.name} {'-'.join(str(v) for v in self.levels)} f{self.downsample}"


class FSQTokenizer(LearnedTokenizer):
    """vocab_size = ∏ levels; tokens per image = (H/downsample)·(W/downsample)."""

    Config = FSQConfig

    def build_quantizer(self, cfg: FSQConfig) -> nn.Module:
        levels = list(cfg.levels)
        if not levels or any(int(v) < 3 for v in levels):
            raise ValueError(f"{cfg.name}.levels must be a non-empty list of integers >= 3 (FSQ: e.g. [8, 5, 5, 5]), "
                             f"got {levels}")
        if math.prod(int(v) for v in levels) > MAX_VOCAB_SIZE:
            raise ValueError(f"{cfg.name}.levels {levels} make {math.prod(levels)} codes, more than 2^31 "
                             f"(token ids are cached as int32)")
        return FiniteScalarQuantizer(levels)
