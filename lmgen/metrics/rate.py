"""Rate: how many tokens, and how many bits, a tokenizer spends per image."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def rate_metrics(lengths: Tensor, vocab_size: int) -> dict[str, float]:
    """``tok/tokens_per_image`` (mean), ``tok/tokens_per_image_p95`` and ``tok/bits_per_image``.

    lengths: (N,) tokens per image. Bits per image = tokens × log2(vocab_size): the size of
    the code before any entropy model, the axis on which codecs, pixels and quantizers meet.
    """
    lengths = lengths.to(torch.float64)
    mean = float(lengths.mean())
    return {
        "tok/tokens_per_image": mean,
        "tok/tokens_per_image_p95": float(torch.quantile(lengths, 0.95)),
        "tok/bits_per_image": mean * math.log2(vocab_size),
    }
