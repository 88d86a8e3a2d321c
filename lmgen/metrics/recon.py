"""Reconstruction quality between uint8 image batches: PSNR and SSIM (per image)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def psnr(reference: Tensor, reconstruction: Tensor) -> Tensor:
    """(B,) PSNR in dB of (B, 3, H, W) uint8 images; identical images give +inf."""
    ref = reference.to(torch.float64)
    rec = reconstruction.to(torch.float64)
    mse = (ref - rec).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(255.0**2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(reference: Tensor, reconstruction: Tensor) -> Tensor:
    """(B,) mean SSIM (Wang et al. 2004: 11×11 Gaussian σ=1.5, K1=0.01, K2=0.03) over channels.

    Inputs are (B, 3, H, W) uint8; the window shrinks to the image for images under 11 px.
    """
    ref = reference.to(torch.float64)
    rec = reconstruction.to(torch.float64)
    size = min(11, ref.shape[-1], ref.shape[-2])
    channels = ref.shape[1]
    window = _gaussian_window(size).expand(channels, 1, size, size)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def blur(x: Tensor) -> Tensor:
        return F.conv2d(x, window, groups=channels)

    mu_x, mu_y = blur(ref), blur(rec)
    var_x = blur(ref * ref) - mu_x**2
    var_y = blur(rec * rec) - mu_y**2
    cov = blur(ref * rec) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return (num / den).flatten(1).mean(1)
