"""Binary codes, shared by the lookup-free (LFQ) and binary (BAE) quantizers.

One bit order for every binary code: channel i is bit i of the index, least significant
first (``bits_to_indices`` / ``indices_to_bits``), up to 62 bits in int64. And the entropies
of a code distribution that factorises over bits given the sample (LFQ's entropy penalty,
BAE's statistics), kept exact up to 2^12 codes without building (N, 2^n) tensors.

Shapes: B batch, h×w latent grid, N latent vectors, n bits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

MAX_BITS = 62  # 2^62 codes still index in int64 (and 2^62 itself fits as codebook_size)


def check_bits(bits: int) -> None:
    """ValueError unless a code of ``bits`` bits indexes in int64 (1 to 62 bits)."""
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in [1, {MAX_BITS}] (int64 indices), got {bits}")


def bits_to_indices(bits: Tensor) -> Tensor:
    """Pack bits into code indices: index = Σ_i 2^i · bit_i (channel 0 = least significant bit).

    bits: (B, n, h, w) bool or 0/1 numbers (any nonzero counts as 1), n ≤ 62.
    Returns (B, h, w) int64 in [0, 2^n).
    """
    n = bits.shape[1]
    check_bits(n)
    weights = torch.ones((), dtype=torch.int64, device=bits.device) << torch.arange(n, device=bits.device)
    return (bits.bool().to(torch.int64) * weights.view(1, n, 1, 1)).sum(1)


def indices_to_bits(indices: Tensor, n: int) -> Tensor:
    """Unpack code indices into bits, the inverse of ``bits_to_indices``.

    indices: (B, h, w) integer in [0, 2^n), n ≤ 62. Returns (B, n, h, w) float32 in {0, 1}.
    """
    check_bits(n)
    shifts = torch.arange(n, device=indices.device).view(1, n, 1, 1)
    return ((indices.to(torch.int64).unsqueeze(1) >> shifts) & 1).to(torch.float32)


def entropy(p: Tensor, dim: int = -1) -> Tensor:
    """Entropy (nats) of probabilities ``p`` along ``dim``; 0·log 0 = 0 with a finite gradient."""
    return -(p * p.clamp_min(1e-30).log()).sum(dim)


def _code_distribution(p1: Tensor) -> Tensor:
    """Per-sample distribution over the 2^m codes of m independent bits.

    p1: (N, m) float32, P(bit_i = 1). Returns (N, 2^m) with column k = Π_i P(bit_i = k_i),
    bit i of k least significant first (the ``bits_to_indices`` order). Built by doubling
    with products of probabilities, so no matmul (and no TF32) rounds it.
    """
    probs = p1.new_ones(p1.shape[0], 1)
    for i in range(p1.shape[1]):
        bit = p1[:, i : i + 1]
        # new index = b_i · 2^i + old index: the 1-half stacks after the 0-half.
        probs = torch.cat([probs * (1 - bit), probs * bit], dim=1)
    return probs


def _group_batchentropy(p1: Tensor) -> Tensor:
    """Exact entropy of the batch-mean code distribution of g = p1.shape[1] independent bits.

    The mean over samples of P(lo, hi | z) = P(lo | z)·P(hi | z) is the matrix product
    P_loᵀ P_hi / N, so the (N, 2^g) joint is never built: memory is O(N · 2^(g/2)).
    """
    half = p1.shape[1] // 2
    lo, hi = _code_distribution(p1[:, :half]), _code_distribution(p1[:, half:])
    mean = lo.T @ hi / p1.shape[0]  # (2^half, 2^(g-half)) (TF32, where enabled, only perturbs ~1e-3)
    return entropy(mean.reshape(-1))


def factorized_entropies(bit_logits: Tensor, max_group_bits: int = 12) -> tuple[Tensor, Tensor]:
    """Entropies of a distribution over binary codes that factorises over bits given the sample.

    bit_logits: (N, n) float, log P(bit_i = 1 | sample) / P(bit_i = 0 | sample).
    Returns two () tensors in nats, differentiable:
    - the mean per-sample entropy E_z[H(p(·|z))] — exact: the entropy of a product of
      independent bits is the sum of the per-bit Bernoulli entropies;
    - the batch ("codebook") entropy H(E_z[p(·|z)]) — exact when n ≤ max_group_bits; else
      the bits are split into consecutive groups of at most ``max_group_bits`` and the groups'
      exact batch entropies are summed. By subadditivity that is an upper bound of the joint
      entropy (equal when the groups are independent over the batch); maximising it still
      drives every group's marginal to uniform (Open-MAGVIT2 factorises likewise).
    Never materialises an (N, 2^n) tensor for n > max_group_bits.
    """
    if max_group_bits < 1:
        raise ValueError(f"max_group_bits must be >= 1, got {max_group_bits}")
    logits = bit_logits.float()
    p1 = torch.sigmoid(logits)
    # log-sigmoid keeps saturated bits (logits of ±1000 at τ = 0.01) finite.
    bernoulli = -(p1 * F.logsigmoid(logits) + (1 - p1) * F.logsigmoid(-logits))  # (N, n)
    per_sample = bernoulli.sum(1).mean()
    groups = [p1[:, s : s + max_group_bits] for s in range(0, p1.shape[1], max_group_bits)]
    batch = torch.stack([_group_batchentropy(g) for g in groups]).sum()
    return per_sample, batch
