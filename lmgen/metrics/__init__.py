"""Evaluation metrics: reconstruction (recon) and rate (rate); fidelity/probe metrics build on these.

``fidelity`` (torch-fidelity FID/KID/PR), ``probe`` (the offline feature space) and ``longtail``
(per-class probe FD and accuracy against train class frequency) import torch-fidelity, so they
are imported from their modules rather than re-exported here.
"""

from lmgen.metrics.rate import code_metrics, rate_metrics, token_statistics
from lmgen.metrics.recon import psnr, ssim

__all__ = ["code_metrics", "psnr", "rate_metrics", "ssim", "token_statistics"]
