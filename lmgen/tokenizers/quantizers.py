"""The three quantizers the learned tokenizers compare: VQ, lookup-free (MAGVIT-v2), binary (ELM).

Each is a plain ``nn.Module`` with one contract, so the tokenizers around them differ only
in the bottleneck (FSQ and residual VQ keep the same contract in ``fsq.py`` and ``rvq.py``):

- ``forward(z)``: channel-first latents (B, in_channels, h, w) → ``QuantizerOutput``.
- ``lookup(indices)``: (B, h, w) int64 → (B, out_channels, h, w) float32, what ``forward``
  returns as ``quantized`` in eval mode (the decode path of a tokenizer). A quantizer that
  writes n > 1 tokens per position (residual VQ flattened depth-first) says so in
  ``tokens_per_position`` and uses index grids (B, h, n·w) instead.
- ``codebook_size``, ``in_channels``, ``out_channels``.

``forward`` in ``eval()`` mode is deterministic and updates no state. Distances, losses and
entropies are computed in fp32 with autocast off: a bf16 argmin flips near-ties and bf16
entropies of τ = 0.01 softmaxes overflow to NaN.

Binary codes (LFQ, BAE) share one bit order and their entropy helpers (``bit_codes.py``).

Shapes: B batch, h×w latent grid, N = B·h·w latent vectors, K codebook size, D channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lmgen.metrics.rate import unigram_stats

from .bit_codes import bits_to_indices, check_bits, entropy, factorized_entropies, indices_to_bits
from .rotation_trick import rotation_trick

# Rows per chunk of the (N, K) VQ distance matrix: 2^22 floats = 16 MiB whatever K is.
_CHUNK_ELEMENTS = 1 << 22

# Laplace smoothing of the EMA cluster sizes (VQ-VAE-2 / Sonnet's VectorQuantizerEMA epsilon).
_LAPLACE_EPS = 1e-5

# Decay of the per-code usage EMA that finds dead codes: a ~100-step window, so a code has to
# stay (nearly) unused for a few hundred steps before it is restarted.
_USAGE_DECAY = 0.99

# Bits per group of the batch-entropy statistic of BinaryQuantizer (same default as LFQ's loss).
_STATS_GROUP_BITS = 12


@dataclass(frozen=True)
class QuantizerOutput:
    """What every quantizer returns.

    quantized: (B, out_channels, h, w) float, same dtype as the input; straight-through, so
        gradients reach the latents.
    indices: (B, h, w) int64 in [0, codebook_size); (B, h, n·w) for n ``tokens_per_position``.
    loss: () float32, the quantizer's own weighted loss (0 if it has none).
    stats: detached () float32 scalars for logging; always "codebook_usage", "perplexity"
        and "entropy" (mean per-sample entropy of the soft assignment, nats), plus extras.
    """

    quantized: Tensor
    indices: Tensor
    loss: Tensor
    stats: dict[str, Tensor]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def check_latents(z: Tensor, channels: int, who: str) -> None:
    """ValueError naming ``who`` unless z is float latents (B, channels, h, w)."""
    if z.dim() != 4 or z.shape[1] != channels or not z.is_floating_point():
        raise ValueError(f"{who}: expected float latents (B, {channels}, h, w), got {z.dtype} {tuple(z.shape)}")


def _to_rows(z: Tensor) -> Tensor:
    """(B, D, h, w) → (N, D) with N = B·h·w in raster order of (b, y, x)."""
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def _from_rows(rows: Tensor, b: int, h: int, w: int) -> Tensor:
    """(N, D) → (B, D, h, w), the inverse of ``_to_rows``."""
    return rows.view(b, h, w, -1).permute(0, 3, 1, 2).contiguous()


def code_stats(indices: Tensor, codebook_size: int) -> dict[str, Tensor]:
    """Batch-level code statistics, from unique counts (never a codebook_size histogram).

    indices: any shape, int64 in [0, codebook_size). Returns detached () float32 tensors:
    "codebook_usage" (fraction of the codebook hit, in [0, 1]) and "perplexity"
    (exp of the entropy of the empirical code histogram, in [1, codebook_size]).
    """
    if indices.numel() == 0:
        zero = torch.zeros((), dtype=torch.float32, device=indices.device)
        return {"codebook_usage": zero, "perplexity": zero.clone()}
    distinct, entropy = unigram_stats(indices.detach())
    return {name: torch.tensor(value, dtype=torch.float32, device=indices.device)
            for name, value in (("codebook_usage", distinct / codebook_size), ("perplexity", math.exp(entropy)))}


def combined_stats(outs: list[QuantizerOutput], label: str) -> dict[str, Tensor]:
    """The stats of several quantizer calls that make one code (residual depths, scales): the mean of
    every stat all calls report, ``restarted_codes`` summed, and each call's ``codebook_usage`` as
    ``<label><k>_usage``. The caller adds what depends on how its codebooks are shared (``dead_codes``)."""
    shared_keys = set.intersection(*(set(o.stats) for o in outs))
    stats = {k: torch.stack([o.stats[k] for o in outs]).mean() for k in sorted(shared_keys)}
    stats["restarted_codes"] = torch.stack([o.stats["restarted_codes"] for o in outs]).sum()
    stats.update({f"{label}{k}_usage": o.stats["codebook_usage"] for k, o in enumerate(outs)})
    return stats


@dataclass(frozen=True)
class VQOptions:
    """How a ``VectorQuantizer`` learns its codes (each is described in its docstring). The
    defaults are the suite's plain VQ; the codebook-collapse fixes ``simvq`` and
    ``rotation_trick`` are off."""

    beta: float = 0.25  # VQ-VAE: commitment weight, on the encoder term
    l2_norm: bool = False
    ema: bool = False
    ema_decay: float = 0.99
    restart_every: int = 100  # 0 = never
    restart_threshold: float = 1e-2
    restart_pool: int = 0  # restart from the last restart_pool × K latents (0 = the current batch's)
    simvq: bool = False  # SimVQ, Zhu et al. 2024
    rotation_trick: bool = False  # Fifty et al. 2024

    def check(self) -> None:
        """ValueError for impossible values or switches that exclude each other."""
        if not 0.0 <= self.ema_decay < 1.0 or self.restart_every < 0 or self.restart_threshold < 0 \
                or self.restart_pool < 0:
            raise ValueError("need 0 <= ema_decay < 1 and restart_every, restart_threshold, restart_pool >= 0")
        if self.simvq and self.ema:
            raise ValueError("simvq learns its linear map by the codebook loss: it excludes ema")
        if self.simvq and self.restart_every:
            raise ValueError("simvq keeps its random codebook frozen: restart_every must be 0 (no restarts)")
        if self.restart_pool and not self.restart_every:
            raise ValueError("restart_pool keeps latents for dead-code restarts: it needs restart_every > 0")


class VectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantization (VQ-VAE; VQGAN / LlamaGen / SimVQ options).

    forward: z (B, dim, h, w) float → quantized (B, dim, h, w) (same dtype), indices (B, h, w).

    - Codes: argmin of squared L2 distance, in fp32 with autocast off (ties → lowest index).
    - Loss: ||sg(z) − e||² + β·||z − sg(e)||², means over elements. β weights the *encoder*
      (commitment) term as in VQ-VAE (van den Oord et al. 2017, β = 0.25); taming-transformers
      and SEED-Voken put β on the codebook term instead, which is a known bug.
    - ``l2_norm`` (LlamaGen): z and the codebook are l2-normalised over channels before
      distances and losses; ``quantized`` is the normalised code (cosine-similarity VQ).
    - ``ema`` (VQ-VAE-2 / Sonnet): the codebook is a buffer set to EMA(summed latents) /
      Laplace-smoothed EMA(counts) each training step, not learned by gradient; the loss is
      then only β·commitment.
    - Data init: the first training call sets the codebook to random latents of its batch
      (skipped once ``initialised`` is True, e.g. for a loaded or hand-set codebook).
    - Dead-code restart: a per-code usage EMA (fraction of assignments, decay 0.99) is kept;
      in training, every ``restart_every`` calls (0 = never) the codes whose usage is below
      ``restart_threshold`` × the uniform share 1/K are replaced, before quantizing, by random
      latents of the current batch — or, with ``restart_pool`` = P > 0, of a ring buffer of the
      last P·K training latents (this rank's), drawn without replacement: one batch holds fewer
      latents than a 2^14 codebook has dead codes, so restarts from it alone copy the same few
      thousand latents onto many codes, and all but one copy of each stays dead.
    - ``simvq`` (Zhu et al. 2024): ``codebook`` is a frozen (K, D) buffer of N(0, 1/D) codes and
      the codes are ``codebook_map(codebook)``, one learned D×D linear map (no bias; both as
      vector-quantize-pytorch's SimVQ), trained by the codebook loss; no data init, no restarts.
    - ``rotation_trick`` (Fifty et al. 2024): ``quantized`` has the straight-through value but
      the rotation trick's gradient (``rotation_trick.py``).
    - DDP: when torch.distributed is initialised, counts, sums and usage are all-reduced before
      every update and the codebook is broadcast from rank 0 after a restart, so every rank
      holds the same codes.

    stats: codebook_usage, perplexity, entropy (per-sample entropy of softmax(−distance)),
    batch_entropy (entropy of its batch mean), commitment, codebook_loss (not in EMA mode),
    dead_codes (codes below the restart threshold), restarted_codes (replaced by this call).
    """

    def __init__(self, codebook_size: int, dim: int, options: VQOptions | None = None) -> None:
        super().__init__()
        options = options or VQOptions()
        if codebook_size < 1 or dim < 1:
            raise ValueError(f"codebook_size and dim must be >= 1, got {codebook_size}, {dim}")
        options.check()
        self.codebook_size, self.dim, self.options = codebook_size, dim, options
        self.in_channels = self.out_channels = dim
        self.beta, self.l2_norm = options.beta, options.l2_norm
        self.ema, self.ema_decay = options.ema, options.ema_decay
        self.restart_every, self.restart_threshold = options.restart_every, options.restart_threshold
        # N(0, 1) codes: the scale of unit-variance encoder outputs; restarts fix what misses.
        init = torch.randn(codebook_size, dim)
        if options.simvq:
            self.register_buffer("codebook", init * dim**-0.5)  # (K, D) frozen: SimVQ's random basis
            self.codebook_map = nn.Linear(dim, dim, bias=False)  # the learned map W: codes = codebook Wᵀ
        elif self.ema:
            self.register_buffer("codebook", init)  # (K, D), set by the EMA, never by gradient
            self.register_buffer("ema_count", torch.ones(codebook_size))  # (K,) EMA assignment counts
            self.register_buffer("ema_sum", init.clone())  # (K, D) EMA summed latents; sum/count = code
        else:
            self.codebook = nn.Parameter(init)  # (K, D)
        # False until the first training batch replaces the N(0, 1) codes by its latents (data
        # init, as Jukebox / vector-quantize-pytorch): random codes far from the encoder's output
        # scale would otherwise collapse onto a handful of codes until the first restart.
        self.register_buffer("initialised", torch.tensor(options.simvq))  # SimVQ: never data-initialised
        self.register_buffer("usage", torch.zeros(codebook_size))  # (K,) EMA fraction of assignments
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))  # training calls, for restarts
        if options.restart_pool:  # in the state, so a resumed stage 1 restarts from the same latents
            self.register_buffer("pool", torch.zeros(options.restart_pool * codebook_size, dim))  # (P·K, D)
            self.register_buffer("pool_seen", torch.zeros((), dtype=torch.int64))  # latents written so far

    def _codes(self) -> Tensor:
        """The codebook as used for distances: (K, D) float32, mapped by W in simvq mode and
        l2-normalised in l2_norm mode."""
        codes = self.codebook.float()
        if self.options.simvq:
            with torch.autocast(codes.device.type, enabled=False):
                codes = F.linear(codes, self.codebook_map.weight.float())
        return F.normalize(codes, dim=1) if self.l2_norm else codes

    def lookup(self, indices: Tensor) -> Tensor:
        """(B, h, w) int64 in [0, K) → (B, dim, h, w) float32 codes (eval-mode ``quantized``)."""
        b, h, w = indices.shape
        return _from_rows(self._codes().detach()[indices.reshape(-1)], b, h, w)

    @torch.no_grad()
    def _assign(self, x: Tensor, codes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Nearest codes of x (N, D) among codes (K, D), both fp32, in row chunks.

        Returns indices (N,) int64, the mean per-sample entropy of softmax(−||x − c||²) and the
        entropy of its batch mean, () float32 each.
        """
        k = codes.shape[0]
        codes_sq = (codes * codes).sum(1)  # (K,)
        indices = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
        entropy_sum = x.new_zeros(())
        prob_sum = x.new_zeros(k)
        step = max(1, _CHUNK_ELEMENTS // k)
        for start in range(0, x.shape[0], step):
            rows = x[start : start + step]
            # −||x − c||² = 2 x·c − ||c||² − ||x||²; the last term is constant per row, so it
            # changes neither the argmax nor the softmax and is left out (no cancellation).
            logits = torch.addmm(-codes_sq[None, :], rows, codes.T, alpha=2.0)  # (n, K)
            indices[start : start + step] = logits.argmax(1)
            log_p = logits.log_softmax(1)
            entropy_sum += -(log_p.exp() * log_p).sum()
            prob_sum += log_p.exp().sum(0)
        n = max(x.shape[0], 1)
        return indices, entropy_sum / n, entropy(prob_sum / n)

    @torch.no_grad()
    def init_codebook(self, x: Tensor) -> None:
        """Set every code to a random row of x (N, D) fp32 (with replacement when N < K, plus a
        little noise so repeated rows differ); rank 0's choice under DDP. Not in simvq mode,
        whose random codebook stays frozen."""
        if self.options.simvq:
            raise RuntimeError("a SimVQ codebook is frozen random: it is never set from latents")
        k = self.codebook_size
        pick = torch.randperm(x.shape[0], device=x.device)[:k] if x.shape[0] >= k else \
            torch.randint(x.shape[0], (k,), device=x.device)
        new = x[pick] + (1e-3 * x.std() * torch.randn_like(x[pick]) if x.shape[0] < k else 0.0)
        self.codebook.data.copy_(new.to(self.codebook.dtype))
        if _distributed():
            dist.broadcast(self.codebook.data, src=0)
        if self.ema:
            self.ema_sum.copy_(self.codebook.data)
            self.ema_count.fill_(1.0)
        self.initialised.fill_(True)

    @torch.no_grad()
    def _remember(self, x: Tensor) -> Tensor:
        """Write latents x (N, D) fp32 into the restart pool (a ring buffer; the newest kept when N
        exceeds it) and return the pool's filled rows, x among them."""
        size = self.pool.shape[0]
        rows = x[-size:]
        where = (int(self.pool_seen) + torch.arange(rows.shape[0], device=x.device)) % size
        self.pool[where] = rows.to(self.pool.dtype)
        self.pool_seen += rows.shape[0]
        return self.pool[: min(int(self.pool_seen), size)]

    @torch.no_grad()
    def _restart_dead_codes(self, x: Tensor) -> int:
        """Every ``restart_every`` training calls, replace dead codes by random rows of x (N, D),
        or of the restart pool, which x joins first (``restart_pool`` > 0).

        Runs before the codebook enters this step's graph, so no saved tensor is modified.
        Returns the number of codes replaced (by rank 0's choice under DDP).
        """
        self.steps += 1
        if self.options.restart_pool:
            x = self._remember(x)
        if not self.restart_every or int(self.steps) % self.restart_every:
            return 0
        k = self.codebook_size
        dead = self.usage < self.restart_threshold / k  # identical on every rank: usage is all-reduced
        n_dead = int(dead.sum())
        if n_dead and x.shape[0]:
            if x.shape[0] >= n_dead:
                pick = torch.randperm(x.shape[0], device=x.device)[:n_dead]
            else:
                pick = torch.randint(x.shape[0], (n_dead,), device=x.device)
            new = x[pick].to(self.codebook.dtype)
            self.codebook.data[dead] = new
            self.usage[dead] = 1.0 / k  # a grace period: ~460 steps of disuse before the next restart
            if self.ema:
                self.ema_count[dead] = 1.0
                self.ema_sum[dead] = new
        if _distributed():
            # Every rank picked its own latents; rank 0's win. Always broadcast at a restart step
            # (even with nothing dead) so the collectives match on every rank.
            dist.broadcast(self.codebook.data, src=0)
            if self.ema:
                dist.broadcast(self.ema_sum, src=0)
        return n_dead

    @torch.no_grad()
    def _update_statistics(self, x: Tensor, indices: Tensor) -> None:
        """Usage EMA and, in EMA mode, the codebook, from latents x (N, D) fp32 and their codes (N,)."""
        k = self.codebook_size
        counts = torch.bincount(indices, minlength=k).to(torch.float32)[:, None]  # (K, 1)
        if self.ema:
            sums = torch.zeros(k, self.dim, device=x.device).index_add_(0, indices, x)  # (K, D)
            counts = torch.cat([counts, sums], dim=1)  # one all-reduce for both
        if _distributed():
            dist.all_reduce(counts)  # global statistics, so the codebooks of all ranks stay equal
        counts, sums = counts[:, 0], counts[:, 1:]
        self.usage.mul_(_USAGE_DECAY).add_(counts / counts.sum().clamp_min(1.0), alpha=1 - _USAGE_DECAY)
        if self.ema:
            self.ema_count.mul_(self.ema_decay).add_(counts, alpha=1 - self.ema_decay)
            self.ema_sum.mul_(self.ema_decay).add_(sums, alpha=1 - self.ema_decay)
            total = self.ema_count.sum()
            # Laplace smoothing keeps an unused code's divisor away from 0 (VQ-VAE-2 / Sonnet).
            smoothed = (self.ema_count + _LAPLACE_EPS) / (total + k * _LAPLACE_EPS) * total
            self.codebook.copy_(self.ema_sum / smoothed[:, None])

    def forward(self, z: Tensor) -> QuantizerOutput:
        """z (B, dim, h, w) float → QuantizerOutput (see class docstring)."""
        check_latents(z, self.dim, "VectorQuantizer")
        b, _, h, w = z.shape
        with torch.autocast(z.device.type, enabled=False):
            x = _to_rows(z).float()  # (N, D)
            if self.l2_norm:
                x = F.normalize(x, dim=1)
            if self.training and not bool(self.initialised) and x.shape[0]:
                self.init_codebook(x.detach())
            restarted = self._restart_dead_codes(x.detach()) if self.training else 0
            codes = self._codes()  # (K, D)
            indices, entropy, batch_entropy = self._assign(x.detach(), codes.detach())
            e = codes[indices]  # (N, D); gradient reaches the codebook unless it is an EMA buffer
            commitment = F.mse_loss(x, e.detach())  # encoder term: pulls z toward its code
            loss = self.beta * commitment
            stats = {"commitment": commitment.detach()}
            if not self.ema:
                codebook_loss = F.mse_loss(x.detach(), e)  # codebook term: pulls the code toward z
                loss = loss + codebook_loss
                stats["codebook_loss"] = codebook_loss.detach()
            quantized = x + (e - x).detach()  # straight-through estimator
            if self.options.rotation_trick:
                quantized = rotation_trick(x, e, quantized)  # same value, rotated gradient
        if self.training:
            self._update_statistics(x.detach(), indices)
        dead = (self.usage < self.restart_threshold / self.codebook_size).sum()
        stats.update(code_stats(indices, self.codebook_size), entropy=entropy, batch_entropy=batch_entropy,
                     dead_codes=dead.to(torch.float32),
                     restarted_codes=torch.tensor(float(restarted), device=z.device))
        return QuantizerOutput(quantized=_from_rows(quantized, b, h, w).to(z.dtype), indices=indices.view(b, h, w),
                               loss=loss, stats=stats)


class LookupFreeQuantizer(nn.Module):
    """Lookup-free quantization (MAGVIT-v2, Yu et al. 2023): every channel is one bit.

    forward: z (B, bits, h, w) float → quantized (B, bits, h, w) in {−1, +1} (same dtype,
    straight-through), indices (B, h, w) = Σ_i 2^i · 1[z_i > 0] (channel 0 least significant).
    codebook_size = 2^bits; there is no codebook to learn or to look up.

    Loss = commitment_weight · ||z − sg(q)||² + entropy_weight · (E[H(p(·|z))] − H(E[p(·|z)])),
    p(c|z) = softmax_c(−||z − c||²/τ) over c ∈ {−1, +1}^bits, in fp32 with autocast off.
    Because the distance is a sum over channels, p factorises over bits with
    p(c_i = +1 | z_i) = sigmoid(4 z_i / τ); see ``factorized_entropies`` for how the batch
    entropy is kept exact up to ``max_entropy_group_bits`` bits and grouped beyond.

    stats: codebook_usage, perplexity, entropy (mean per-sample entropy), batch_entropy,
    entropy_penalty (their difference, unweighted), commitment (unweighted).
    """

    def __init__(self, bits: int, *, commitment_weight: float = 0.25, entropy_weight: float = 0.1,
                 entropy_temperature: float = 0.01, max_entropy_group_bits: int = 12) -> None:
        super().__init__()
        check_bits(bits)
        if entropy_temperature <= 0 or max_entropy_group_bits < 1:
            raise ValueError("need entropy_temperature > 0 and max_entropy_group_bits >= 1")
        self.bits = bits
        self.codebook_size = 2**bits
        self.in_channels = self.out_channels = bits
        self.commitment_weight = commitment_weight  # MAGVIT-v2: 0.25
        self.entropy_weight = entropy_weight  # MAGVIT-v2: 0.1
        self.entropy_temperature = entropy_temperature  # MAGVIT-v2: τ ≈ 0.01
        # Exact joint batch entropy up to 2^12 codes (memory O(N·2^6)); grouped above.
        self.max_entropy_group_bits = max_entropy_group_bits

    def lookup(self, indices: Tensor) -> Tensor:
        """(B, h, w) int64 in [0, 2^bits) → (B, bits, h, w) float32 in {−1, +1}."""
        return indices_to_bits(indices, self.bits) * 2 - 1

    def forward(self, z: Tensor) -> QuantizerOutput:
        """z (B, bits, h, w) float → QuantizerOutput (see class docstring)."""
        check_latents(z, self.bits, "LookupFreeQuantizer")
        with torch.autocast(z.device.type, enabled=False):
            x = z.float()
            positive = x > 0
            q = positive.to(torch.float32) * 2 - 1  # (B, bits, h, w) in {−1, +1}
            commitment = F.mse_loss(x, q)  # q carries no gradient: no codebook term exists
            # log p(+1|z_i)/p(−1|z_i) = (−(z_i − 1)² + (z_i + 1)²)/τ = 4 z_i / τ
            bit_logits = _to_rows(x) * (4.0 / self.entropy_temperature)  # (N, bits)
            per_sample, batch = factorized_entropies(bit_logits, self.max_entropy_group_bits)
            penalty = per_sample - batch  # confident per sample, uniform over the batch
            loss = self.commitment_weight * commitment + self.entropy_weight * penalty
            quantized = x + (q - x).detach()  # straight-through estimator
        indices = bits_to_indices(positive)
        stats = {**code_stats(indices, self.codebook_size), "entropy": per_sample.detach(),
                 "batch_entropy": batch.detach(), "entropy_penalty": penalty.detach(),
                 "commitment": commitment.detach()}
        return QuantizerOutput(quantized=quantized.to(z.dtype), indices=indices, loss=loss, stats=stats)


class BinaryQuantizer(nn.Module):
    """Binary autoencoder bottleneck (ELM, Liu et al. 2024): bits from sigmoids, a linear decoder input.

    forward: z (B, bits, h, w) pre-sigmoid logits → quantized (B, dim, h, w) (same dtype),
    indices (B, h, w) = Σ_i 2^i · b_i (channel 0 least significant, as LFQ).

    σ = sigmoid(z). Training: b ~ Bernoulli(σ) (``deterministic``: b = 1[σ > 0.5]); eval:
    always b = 1[σ > 0.5] (computed as z > 0, exact where σ would round to 0.5).
    Straight-through b + σ − sg(σ); ``quantized`` = a learned 1×1 conv (bits → dim, with bias)
    of it, so the decoder reads a linear map of the bits — there is no codebook to collapse,
    and with spread logits every one of the 2^bits codes is reachable (ELM: 100% usage).
    No loss of its own (ELM uses none).

    stats: codebook_usage, perplexity, entropy (per-sample entropy of the factorised
    Bernoulli distribution: Σ_i H(σ_i), mean over positions), batch_entropy (grouped as in
    ``factorized_entropies``), bit_balance (mean of b).
    """

    def __init__(self, bits: int, dim: int, *, deterministic: bool = False) -> None:
        super().__init__()
        check_bits(bits)
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.bits, self.dim, self.deterministic = bits, dim, deterministic
        self.codebook_size = 2**bits
        self.in_channels, self.out_channels = bits, dim
        self.embed = nn.Conv2d(bits, dim, kernel_size=1, bias=True)  # bits (B, bits, h, w) → (B, dim, h, w)

    def _embed(self, bits: Tensor) -> Tensor:
        """Linear map of (B, bits, h, w) float32 bits → (B, dim, h, w) float32, autocast off."""
        with torch.autocast(bits.device.type, enabled=False):
            return F.conv2d(bits, self.embed.weight.float(), self.embed.bias.float())

    def lookup(self, indices: Tensor) -> Tensor:
        """(B, h, w) int64 in [0, 2^bits) → (B, dim, h, w) float32 (eval-mode ``quantized``)."""
        return self._embed(indices_to_bits(indices, self.bits))

    def forward(self, z: Tensor) -> QuantizerOutput:
        """z (B, bits, h, w) float logits → QuantizerOutput (see class docstring)."""
        check_latents(z, self.bits, "BinaryQuantizer")
        with torch.autocast(z.device.type, enabled=False):
            logits = z.float()
            sigma = torch.sigmoid(logits)
            if self.training and not self.deterministic:
                b = torch.bernoulli(sigma.detach())
            else:
                b = (logits > 0).to(torch.float32)
            quantized = self._embed(b + sigma - sigma.detach())  # straight-through: d/dz = σ'(z)
            with torch.no_grad():
                entropy, batch_entropy = factorized_entropies(_to_rows(logits), _STATS_GROUP_BITS)
        indices = bits_to_indices(b)
        stats = {**code_stats(indices, self.codebook_size), "entropy": entropy, "batch_entropy": batch_entropy,
                 "bit_balance": b.mean().detach()}
        loss = torch.zeros((), dtype=torch.float32, device=z.device)
        return QuantizerOutput(quantized=quantized.to(z.dtype), indices=indices, loss=loss, stats=stats)
