"""Evaluation metrics: reconstruction (recon) and rate (rate); fidelity/probe metrics build on these."""

from lmgen.metrics.rate import code_metrics, rate_metrics
from lmgen.metrics.recon import psnr, ssim

__all__ = ["code_metrics", "psnr", "rate_metrics", "ssim"]
