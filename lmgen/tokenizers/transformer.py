"""Small pre-norm transformer blocks for the stage-2-aware tokenizers (crt, causal1d).

CRT's regulariser is a causal transformer over the latent sequence; causal1d's encoder is
a stack of query blocks (causal self-attention among learned queries + cross-attention to
the image's feature map) and its decoder the same blocks without the causal mask. Positions
are fixed sin-cos encodings (no learned tables), so trained weights fit every image size,
as the conv autoencoder's do.

Shapes: B batch, N sequence length, M context length, D width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Attention(nn.Module):
    """Multi-head attention (SDPA). x (B, N, D), context (B, M, D) or None (self-attention) → (B, N, D)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} must be divisible by heads {heads}")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor | None = None, causal: bool = False) -> Tensor:
        b, n, d = x.shape
        src = x if context is None else context
        q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2)  # (B, H, N, D/H)
        k, v = self.kv(src).view(b, src.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)  # (B, H, M, D/H) each
        # is_causal masks key j > query i: query i sees only positions <= i.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """x + self-attn(norm x) [+ cross-attn(norm x, context)] + MLP(norm x), all pre-norm.

    ``causal`` masks the self-attention so position i reads positions <= i only; the cross
    attention and the MLP act per position, so causality holds for the whole block.
    """

    def __init__(self, dim: int, heads: int, cross: bool = False, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm_cross = nn.LayerNorm(dim) if cross else None
        self.cross = Attention(dim, heads) if cross else None
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: Tensor, context: Tensor | None = None, causal: bool = False) -> Tensor:
        x = x + self.attn(self.norm1(x), causal=causal)
        if self.cross is not None:
            if context is None:
                raise ValueError("a cross-attention block needs a context")
            x = x + self.cross(self.norm_cross(x), context)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """``layers`` blocks then a final LayerNorm: (B, N, D) [, context (B, M, D)] → (B, N, D)."""

    def __init__(self, dim: int, heads: int, layers: int, cross: bool = False, causal: bool = False) -> None:
        super().__init__()
        self.causal = causal
        self.blocks = nn.ModuleList(Block(dim, heads, cross) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        for block in self.blocks:
            x = block(x, context, causal=self.causal)
        return self.norm(x)


def check_width(width: int, heads: int, key: str) -> None:
    """ValueError naming ``key`` unless ``width`` suits these blocks: divisible by ``heads``
    (attention) and by 4 (2-D sin-cos positions)."""
    if heads < 1 or width < 4 or width % 4 or width % heads:
        raise ValueError(f"{key}={width} must be a positive multiple of 4 and of the number of heads ({heads})")


def sincos_1d(n: int, dim: int, device: torch.device | None = None) -> Tensor:
    """(n, dim) float32 fixed sinusoidal encodings of positions 0..n-1 (Vaswani et al. 2017)."""
    if dim % 2:
        raise ValueError(f"sin-cos encodings need an even width, got {dim}")
    pos = torch.arange(n, dtype=torch.float32, device=device)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
    return torch.cat([torch.sin(pos * freq), torch.cos(pos * freq)], 1)


def sincos_2d(h: int, w: int, dim: int, device: torch.device | None = None) -> Tensor:
    """(h·w, dim) float32 raster-order encodings: half the channels encode the row, half the column (MAE)."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos encodings need a width divisible by 4, got {dim}")
    rows = sincos_1d(h, dim // 2, device)[:, None].expand(h, w, dim // 2)
    cols = sincos_1d(w, dim // 2, device)[None].expand(h, w, dim // 2)
    return torch.cat([rows, cols], 2).reshape(h * w, dim)
