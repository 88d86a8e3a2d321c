"""Pixel tokenizers: raw 8-bit channel values, or a k-means colour palette (ImageGPT).

Two arms of the comparison share this file because they differ only in the alphabet:

- ``palette_size == 0``: every channel value is a token (vocab 256), ``3·H·W`` tokens per
  image in raster order with RGB interleaved per pixel (r, g, b of pixel 0, then pixel 1 ...)
  as in ImageGPT's raw-pixel ablation. Lossless.
- ``palette_size > 0``: every pixel is replaced by the index of its nearest colour in a
  palette fitted by k-means on the train split (ImageGPT: 512 colours), ``H·W`` tokens.
  The palette is stored as uint8, so nearest-colour distances are exact integers and
  encoding is exactly reproducible (ties go to the lowest index).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .base import Decoded, TokenBatch, grey_images, row_prefix_lengths

log = logging.getLogger(__name__)

# Pixels per chunk of the (pixels × palette) distance matrix: 8192 × 512 floats = 16 MiB.
_CHUNK = 8192


@dataclass
class PixelsConfig:
    """Configuration of the pixel tokenizer (see module docstring)."""

    name: str = "pixels"
    # 0 = raw 8-bit value per channel (vocab 256, 3·H·W tokens); >0 = k-means palette
    # fitted on the train split (vocab = palette_size, H·W tokens). ImageGPT: 512.
    palette_size: int = 0
    kmeans_iters: int = 20
    # Pixels subsampled (fixed seed) from the train split to fit the palette.
    kmeans_samples: int = 200_000
    seed: int = 0

    def label(self) -> str:
        """Short preset-style name for plots and tables."""
        return f"pixels palette{self.palette_size}" if self.palette_size else "pixels raw"


def _check_images(images: Tensor, image_size: tuple[int, int]) -> None:
    h, w = image_size
    if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != (3, h, w):
        raise ValueError(f"expected uint8 images of shape (B, 3, {h}, {w}), got {images.dtype} "
                         f"{tuple(images.shape)}")


def nearest_colour(pixels: Tensor, palette: Tensor) -> Tensor:
    """Index of the nearest palette colour (squared Euclidean RGB distance, ties → lowest index).

    pixels: (N, 3) any numeric dtype in [0, 255]; palette: (K, 3) uint8.
    Returns (N,) int64 in [0, K). Computed in chunks so memory stays O(_CHUNK · K).
    """
    # Exact in float32: pixel and palette values are integers ≤ 255 (exact even in TF32's
    # 11-bit significand), products and sums stay integers below 2²⁴. Autocast is switched
    # off so a caller's bf16 region cannot round the distances and flip near-ties.
    pal = palette.to(device=pixels.device, dtype=torch.float32)
    pal_sq = (pal * pal).sum(1)                                     # (K,)
    out = torch.empty(pixels.shape[0], dtype=torch.int64, device=pixels.device)
    with torch.autocast(pixels.device.type, enabled=False):
        for start in range(0, pixels.shape[0], _CHUNK):
            x = pixels[start:start + _CHUNK].to(torch.float32)      # (n, 3)
            # ||x||² is constant per row, so argmin of ||c||² − 2 x·c suffices.
            d = torch.addmm(pal_sq[None, :], x, pal.T, alpha=-2.0)  # (n, K)
            out[start:start + _CHUNK] = d.argmin(1)
    return out


def _kmeans_pp_init(points: Tensor, weights: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """Weighted k-means++ seeding. points: (M, 3) float32, weights: (M,) float32 > 0."""
    first = int(torch.multinomial(weights, 1, generator=gen))
    centres = [points[first]]
    d2 = ((points - points[first]) ** 2).sum(1)                     # (M,) distance² to nearest centre
    for _ in range(1, k):
        p = d2 * weights
        if float(p.sum()) <= 0:                                     # every point already a centre
            break
        idx = int(torch.multinomial(p, 1, generator=gen))
        centres.append(points[idx])
        d2 = torch.minimum(d2, ((points - points[idx]) ** 2).sum(1))
    return torch.stack(centres)


def kmeans_palette(points: Tensor, weights: Tensor, k: int, iters: int, seed: int) -> Tensor:
    """Weighted Lloyd k-means with k-means++ init on distinct colours.

    points: (M, 3) uint8 distinct colours; weights: (M,) their pixel counts.
    Returns (k, 3) uint8. If M ≤ k the palette holds every colour exactly (padded with
    copies of the first colour, which ``nearest_colour``'s lowest-index tie-break never picks).
    """
    if points.shape[0] <= k:
        pad = points[:1].expand(k - points.shape[0], 3)
        return torch.cat([points, pad]).to(torch.uint8)
    gen = torch.Generator().manual_seed(seed)
    x = points.to(torch.float32)
    w = weights.to(torch.float32)
    centres = _kmeans_pp_init(x, w, k, gen)
    if centres.shape[0] < k:                                        # cannot happen when M > k
        centres = torch.cat([centres, centres[:1].expand(k - centres.shape[0], 3)])
    for _ in range(iters):
        assign = nearest_colour(x, centres.round().clamp(0, 255).to(torch.uint8))
        sums = torch.zeros(k, 3).index_add_(0, assign, x * w[:, None])
        mass = torch.zeros(k).index_add_(0, assign, w)
        empty = mass == 0
        centres = torch.where(empty[:, None], centres, sums / mass.clamp_min(1e-12)[:, None])
        if empty.any():
            # Re-seed dead centres at the worst-served colours, so no palette entry is wasted.
            err = ((x - centres[assign]) ** 2).sum(1) * w
            far = err.topk(int(empty.sum())).indices
            centres[empty.nonzero().squeeze(1)] = x[far]
    return centres.round().clamp(0, 255).to(torch.uint8)


class PixelTokenizer:
    """Raw-pixel or palette tokenizer. Fixed length: ``max_tokens`` ids per image.

    encode: (B, 3, H, W) uint8 → TokenBatch ids (B, max_tokens) int64 in [0, vocab_size).
    decode: TokenBatch → Decoded (B, 3, H, W) uint8; an item with the wrong length or any
    id outside [0, vocab_size) is grey and ``valid=False``.
    """

    Config = PixelsConfig
    variable_length = False
    learned = False
    encode_in_workers = True  # CPU-bound per image: the cache writer's DataLoader workers encode
    video = False  # still images only
    frames = 0
    subcodes: tuple[int, ...] = ()

    def __init__(self, cfg: PixelsConfig, image_size: tuple[int, int]) -> None:
        if cfg.palette_size < 0:
            raise ValueError(f"pixels.palette_size must be >= 0, got {cfg.palette_size}")
        if cfg.kmeans_iters < 0 or cfg.kmeans_samples < 1:
            raise ValueError("pixels.kmeans_iters must be >= 0 and pixels.kmeans_samples >= 1")
        self.cfg = cfg
        self.image_size = (int(image_size[0]), int(image_size[1]))
        h, w = self.image_size
        self.palette: Tensor | None = None                          # (K, 3) uint8 once fitted
        if cfg.palette_size == 0:
            self.vocab_size, self.max_tokens = 256, 3 * h * w
        else:
            self.vocab_size, self.max_tokens = cfg.palette_size, h * w

    def _require_palette(self) -> Tensor:
        if self.palette is None:
            raise RuntimeError(f"PixelTokenizer(palette_size={self.cfg.palette_size}) has no palette: "
                               "call fit(train_images) or load_state_dict() before encode/decode")
        return self.palette

    def fit(self, images: Tensor) -> dict[str, float]:
        """Fit the palette on train images (N, 3, H, W) uint8; raw mode fits nothing.

        Returns ``tok/palette_mse`` (mean squared error per channel, in 0..255² units, over
        the fitting sample) and ``tok/codebook_usage`` (fraction of palette entries used).
        """
        if self.cfg.palette_size == 0:
            return {}
        _check_images(images, self.image_size)
        if images.shape[0] == 0:
            raise ValueError("pixels: fit() needs at least one image")
        pixels = images.permute(0, 2, 3, 1).reshape(-1, 3).cpu()   # (N·H·W, 3) uint8
        gen = torch.Generator().manual_seed(self.cfg.seed)
        if pixels.shape[0] > self.cfg.kmeans_samples:
            idx = torch.randperm(pixels.shape[0], generator=gen)[: self.cfg.kmeans_samples]
            sample = pixels[idx.sort().values]
        else:
            sample = pixels
        # k-means on distinct colours weighted by their counts: same optimum, fewer points.
        colours, counts = torch.unique(sample, dim=0, return_counts=True)
        self.palette = kmeans_palette(colours, counts, self.cfg.palette_size, self.cfg.kmeans_iters,
                                      self.cfg.seed)
        assign = nearest_colour(sample, self.palette)
        err = (sample.float() - self.palette[assign].float()).pow(2).mean()
        used = torch.unique(assign).numel()
        log.info("pixels: fitted %d-colour palette on %d pixels (%d distinct), mse %.2f",
                 self.cfg.palette_size, sample.shape[0], colours.shape[0], float(err))
        return {"tok/palette_mse": float(err), "tok/codebook_usage": used / self.cfg.palette_size}

    def encode(self, images: Tensor) -> TokenBatch:
        """(B, 3, H, W) uint8 → TokenBatch of (B, max_tokens) int64 ids (raster, RGB interleaved)."""
        _check_images(images, self.image_size)
        b = images.shape[0]
        hwc = images.permute(0, 2, 3, 1)                            # (B, H, W, 3)
        if self.cfg.palette_size == 0:
            ids = hwc.reshape(b, -1).to(torch.int64)                # (B, 3·H·W)
        else:
            ids = nearest_colour(hwc.reshape(-1, 3), self._require_palette()).view(b, -1)
        lengths = torch.full((b,), self.max_tokens, dtype=torch.int64, device=ids.device)
        return TokenBatch(ids=ids, lengths=lengths)

    def decode(self, tokens: TokenBatch) -> Decoded:
        """TokenBatch → Decoded images (B, 3, H, W) uint8 and valid (B,) bool. Never raises
        on a bad stream (wrong length, out-of-range ids)."""
        h, w = self.image_size
        ids, lengths = tokens.ids, tokens.lengths.to(tokens.ids.device)
        b, n = ids.shape[0], self.max_tokens
        if ids.shape[1] < n:                                        # too short for anyone: pad
            ids = torch.cat([ids, ids.new_zeros(b, n - ids.shape[1])], 1)
        ids = ids[:, :n]
        in_range = ((ids >= 0) & (ids < self.vocab_size)).all(1)
        valid = (lengths == n) & in_range                           # (B,)
        safe = torch.where(valid[:, None], ids, torch.zeros_like(ids))
        if self.cfg.palette_size == 0:
            hwc = safe.to(torch.uint8).view(b, h, w, 3)
        else:
            hwc = self._require_palette().to(ids.device)[safe].view(b, h, w, 3)
        images = hwc.permute(0, 3, 1, 2).contiguous()
        grey = grey_images(b, h, w).to(images.device)
        images = torch.where(valid[:, None, None, None], images, grey)
        return Decoded(images=images, valid=valid)

    def prefix_lengths(self, tokens: TokenBatch, ratio: float) -> Tensor:
        """Ids of the top round(ratio·H) pixel rows (3·W ids per row raw, W with a palette)."""
        h, w = self.image_size
        return row_prefix_lengths(tokens, h, self.max_tokens // h, ratio)

    def state_dict(self) -> dict[str, Any]:
        """``{"palette": (K, 3) uint8}`` in palette mode once fitted, else ``{}``."""
        return {} if self.palette is None else {"palette": self.palette.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (the palette, shape-checked)."""
        palette = state.get("palette")
        if palette is None:
            if self.cfg.palette_size > 0:
                raise ValueError("pixels: state has no 'palette' but palette_size > 0")
            return
        palette = torch.as_tensor(palette)
        if self.cfg.palette_size == 0 or tuple(palette.shape) != (self.cfg.palette_size, 3):
            raise ValueError(f"pixels: palette of shape {tuple(palette.shape)} does not match "
                             f"palette_size={self.cfg.palette_size}")
        self.palette = palette.to(torch.uint8).cpu().clone()
