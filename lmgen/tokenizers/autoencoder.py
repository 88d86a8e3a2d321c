"""The conv encoder/decoder shared by every learned tokenizer (vq, lfq, bae, crt, causal1d).

One architecture for all of them, so a comparison between quantizers is not a comparison
between autoencoders. It is a small VQGAN-style stack (Esser et al. 2021): a stem conv,
then per 2× downsampling stage some residual blocks and a strided conv, residual blocks at
the bottom, and a 1×1 projection to the quantizer's channels; the decoder mirrors it with
nearest-neighbour upsampling. ``downsample`` sets tokens per image: a 32×32 image with
``downsample=4`` is an 8×8 grid of 64 tokens (8 → 4×4, 2 → 16×16).

Shapes: B batch, C channels, H×W image, h×w = (H/downsample)×(W/downsample) latent grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class AutoencoderConfig:
    """Architecture of the encoder/decoder pair; every learned tokenizer's config extends it.

    channels: width of the full-resolution stage; each 2× downsampling doubles it, capped at
        ``channels · max_channel_mult``.
    downsample: spatial reduction factor, a power of two ≥ 1 (tokens per image = H·W / downsample²).
    res_blocks: residual blocks per stage (and in the bottleneck).
    """

    channels: int = 32
    downsample: int = 4  # 32×32 → 8×8 = 64 tokens per image
    res_blocks: int = 1
    max_channel_mult: int = 4

    def check(self, name: str) -> None:
        """ValueError naming ``<name>.<field>`` for an impossible architecture."""
        if self.downsample < 1 or self.downsample & (self.downsample - 1):
            raise ValueError(f"{name}.downsample must be a power of two >= 1, got {self.downsample}")
        if self.channels < 1 or self.res_blocks < 0 or self.max_channel_mult < 1:
            raise ValueError(f"{name}: need channels >= 1, res_blocks >= 0 and max_channel_mult >= 1")

    @property
    def stages(self) -> int:
        return int(math.log2(self.downsample))

    def width(self, stage: int) -> int:
        """Channels at ``stage`` (0 = full resolution)."""
        return self.channels * min(2**stage, self.max_channel_mult)


def _groups(channels: int) -> int:
    """GroupNorm groups: at most 32 (VQGAN) and at least 4 channels per group.

    GroupNorm removes each group's per-image mean: with one channel per group (instance norm)
    a flat colour region carries no signal past the norm, and narrow CPU-sized widths would
    learn colours very slowly. VQGAN's 32 groups of 128 channels are 4 per group.
    """
    cap = max(1, min(32, channels // 4))
    return max(g for g in range(1, cap + 1) if channels % g == 0)


class ResBlock(nn.Module):
    """GroupNorm → SiLU → 3×3 conv, twice, plus a (1×1 if widths differ) skip. (B, Ci, h, w) → (B, Co, h, w)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Encoder(nn.Module):
    """(B, 3, H, W) float in [-1, 1] → (B, out_channels, H/downsample, W/downsample)."""

    def __init__(self, spec: AutoencoderConfig, out_channels: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, spec.width(0), 3, padding=1)
        blocks: list[nn.Module] = []
        for stage in range(spec.stages):
            c_in, c_out = spec.width(stage), spec.width(stage + 1)
            blocks += [ResBlock(c_in, c_in) for _ in range(spec.res_blocks)]
            blocks.append(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1))  # 2× down
        bottom = spec.width(spec.stages)
        blocks += [ResBlock(bottom, bottom) for _ in range(spec.res_blocks)]
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.GroupNorm(_groups(bottom), bottom)
        self.out = nn.Conv2d(bottom, out_channels, 1)  # the quantizer's in_channels

    def forward(self, x: Tensor) -> Tensor:
        return self.out(F.silu(self.norm(self.blocks(self.stem(x)))))


class Upsample(nn.Module):
    """Nearest 2× upsampling then a 3×3 conv (no checkerboard artefacts of transposed convs)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    """(B, in_channels, h, w) → (B, 3, h·downsample, w·downsample) float, ≈ [-1, 1] (not clamped)."""

    def __init__(self, spec: AutoencoderConfig, in_channels: int) -> None:
        super().__init__()
        bottom = spec.width(spec.stages)
        self.stem = nn.Conv2d(in_channels, bottom, 3, padding=1)  # the quantizer's out_channels
        blocks: list[nn.Module] = [ResBlock(bottom, bottom) for _ in range(spec.res_blocks)]
        for stage in reversed(range(spec.stages)):
            c_in, c_out = spec.width(stage + 1), spec.width(stage)
            blocks.append(Upsample(c_in, c_out))
            blocks += [ResBlock(c_out, c_out) for _ in range(spec.res_blocks)]
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.GroupNorm(_groups(spec.width(0)), spec.width(0))
        self.out = nn.Conv2d(spec.width(0), 3, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        return self.out(F.silu(self.norm(self.blocks(self.stem(z)))))


def to_unit(images: Tensor) -> Tensor:
    """uint8 (B, 3, H, W) in [0, 255] → float32 in [-1, 1]."""
    return images.float().div(127.5).sub(1.0)


def to_uint8(x: Tensor) -> Tensor:
    """float (B, 3, H, W) ≈ [-1, 1] → uint8 in [0, 255] (clamped, rounded)."""
    return x.detach().float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)
