"""``rvq``: residual vector quantization (RQ-VAE, Lee et al. 2022).

D VQ codebooks in sequence, each quantizing what the previous ones left over (the residual),
so every latent position gets D ids, coarse to fine in magnitude, and its code is their sum.
The D ids reach the Llama in one of two layouts (``layout``):

- ``subcodes``: one position, D sub-codes (the Llama's per-sub-code embeddings and heads, as
  ELM's n-c bits): vocab K^D (≤ 2^31), tokens per image h·w.
- ``flat``: depth-first, D consecutive tokens per position (RQ-Transformer's order, without its
  depth transformer): vocab K, tokens per image h·w·D; a prompt is cut after whole rows.

Codebooks are one per depth, or one shared by all depths (``shared_codebook``). Each depth is a
``VectorQuantizer`` with the VQ tokenizer's options (EMA, restarts, SimVQ, ...).

Shapes: B batch, C channels (codebook_dim), h×w latent grid, D depth, K codes per codebook.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .base import MAX_VOCAB_SIZE, count_label
from .learned import LearnedTokenizer
from .quantizers import QuantizerOutput, VectorQuantizer, VQOptions, check_latents, combined_stats
from .rotation_trick import rotation_trick
from .vq import VQConfig, check_codebook, fixes_label, vq_options

LAYOUTS = ("subcodes", "flat")


class ResidualVectorQuantizer(nn.Module):
    """RQ-VAE's residual quantizer: depth d quantizes r_d = z − Σ_{k<d} e_k with its own (or the
    shared) codebook.

    forward: z (B, C, h, w) float → quantized (B, C, h, w) = Σ_d e_d (same dtype, straight-through
    on the sum: z + sg(Σ e − z), or the rotation trick's gradient with ``options.rotation_trick``).
    indices: (B, h, w) composite ids Σ_d c_d · K^d (depth 0 the least significant digit, the
    Llama's sub-code order), codebook_size K^D; with ``flat``, (B, h, w·D) with the D ids of
    position x at [x·D, (x+1)·D) and codebook_size K (``tokens_per_position`` = D).

    Loss: Σ_d of each depth's VQ loss. Depth d's commitment term is ||z − sg(Σ_{k≤d} e_k)||²,
    RQ-VAE's commitment to every partial sum, since the residual r_d keeps z's gradient and
    only the earlier codes are detached; its codebook term pulls e_d toward r_d.
    A shared codebook is one ``VectorQuantizer`` called D times per step: its data init sees
    depth 0's latents, and its restart and usage counters advance D times per training step.

    stats: the depths' mean codebook_usage, perplexity, entropy, batch_entropy, commitment (and
    codebook_loss), their summed dead_codes and restarted_codes, ``depth<d>_usage`` per depth,
    and residual_error = ||z − Σ e||² / ||z||² (what the D codes leave unexplained).
    """

    def __init__(self, codebook_size: int, dim: int, depth: int, *, shared: bool = False, flat: bool = False,
                 options: VQOptions | None = None) -> None:
        super().__init__()
        options = options or VQOptions()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if options.l2_norm:
            raise ValueError("residual VQ needs unnormalised codes: l2_norm would quantize every residual to unit norm")
        if not flat and codebook_size**depth > 2**62:
            raise ValueError(f"{depth} composite ids of {codebook_size} codes pass int64; use flat ids")
        self.depth, self.shared, self.flat, self.rotation = depth, shared, flat, options.rotation_trick
        # The trick acts on the sum of the codes, so the depths themselves pass the gradient straight.
        per_depth = dataclasses.replace(options, rotation_trick=False)
        self.quantizers = nn.ModuleList(VectorQuantizer(codebook_size, dim, per_depth)
                                        for _ in range(1 if shared else depth))
        self.codes_per_depth = codebook_size
        self.codebook_size = codebook_size if flat else codebook_size**depth
        self.tokens_per_position = depth if flat else 1
        self.in_channels = self.out_channels = dim

    def at_depth(self, d: int) -> VectorQuantizer:
        """The quantizer of depth ``d`` (the shared one for every depth)."""
        return self.quantizers[0 if self.shared else d]

    def digits(self, indices: Tensor) -> Tensor:
        """Index grid (B, h, w) composite or (B, h, w·D) flat → (B, h, w, D) per-depth ids in [0, K)."""
        if self.flat:
            b, h, n = indices.shape
            return indices.long().view(b, h, n // self.depth, self.depth)
        k = self.codes_per_depth
        return torch.stack([(indices.long() // k**d) % k for d in range(self.depth)], -1)

    def lookup(self, indices: Tensor) -> Tensor:
        """Index grid (see ``digits``) → (B, C, h, w) float32 Σ_d e_d (eval-mode ``quantized``)."""
        digits = self.digits(indices)
        out = self.at_depth(0).lookup(digits[..., 0])
        for d in range(1, self.depth):
            out = out + self.at_depth(d).lookup(digits[..., d])
        return out

    def forward(self, z: Tensor) -> QuantizerOutput:
        """z (B, C, h, w) float → QuantizerOutput (see class docstring)."""
        check_latents(z, self.in_channels, "ResidualVectorQuantizer")
        b, _, h, w = z.shape
        with torch.autocast(z.device.type, enabled=False):
            x = z.float()
            partial = torch.zeros_like(x)  # Σ_{k<d} e_k, no gradient
            outs: list[QuantizerOutput] = []
            for d in range(self.depth):
                outs.append(self.at_depth(d)(x - partial))
                partial = partial + outs[-1].quantized.detach()  # e_d (its straight-through value)
            quantized = x + (partial - x).detach()  # straight-through on the sum
            if self.rotation:
                quantized = rotation_trick(x, partial, quantized)
            loss = torch.stack([o.loss for o in outs]).sum()
            error = ((x - partial).pow(2).sum() / x.pow(2).sum().clamp_min(1e-12)).detach()
        digits = torch.stack([o.indices for o in outs], -1)  # (B, h, w, D)
        if self.flat:
            indices = digits.view(b, h, w * self.depth)
        else:
            powers = self.codes_per_depth ** torch.arange(self.depth, device=z.device)
            indices = (digits * powers).sum(-1)
        return QuantizerOutput(quantized=quantized.to(z.dtype), indices=indices, loss=loss,
                               stats=self._stats(outs, error))

    def _stats(self, outs: list[QuantizerOutput], error: Tensor) -> dict[str, Tensor]:
        """``combined_stats`` over depths, the dead codes of each distinct codebook summed, and the residual error."""
        stats = combined_stats(outs, "depth")
        stats["dead_codes"] = torch.stack([o.stats["dead_codes"] for o in outs[: len(self.quantizers)]]).sum()
        stats["residual_error"] = error
        return stats


@dataclass
class RVQConfig(VQConfig):
    """VQ's fields (codebook_size and codebook_dim of each depth's codebook, beta, ema, restarts,
    simvq, rotation_trick) plus the depth and how the D ids are laid out for the LM."""

    name: str = "rvq"
    depth: int = 2  # codes per position (RQ-VAE: 4 at 256×256 with an 8×8×4 code map)
    shared_codebook: bool = False  # one codebook for every depth (RQ-VAE shares it)
    layout: str = field(default="subcodes", metadata={"choices": LAYOUTS})

    def label(self) -> str:
        """Short preset-style name for plots and tables: ``rvq 2×1k f4``, ``rvq 4×1k shared flat f4``."""
        shared = " shared" if self.shared_codebook else ""
        flat = " flat" if self.layout == "flat" else ""
        return f"{self.name} {self.depth}×{count_label(self.codebook_size)}{shared}{flat} f{self.downsample}" \
               f"{fixes_label(self)}"


class RVQTokenizer(LearnedTokenizer):
    """layout subcodes: vocab_size = K^D, subcodes (K,)·D, h·w tokens; flat: vocab_size = K,
    h·w·D tokens (token grid h × w·D, so a prompt of whole grid rows is whole positions)."""

    Config = RVQConfig

    def token_grid(self, cfg: RVQConfig) -> tuple[int, int]:
        h, w = super().token_grid(cfg)
        return (h, w * cfg.depth) if cfg.layout == "flat" else (h, w)

    def build_quantizer(self, cfg: RVQConfig) -> nn.Module:
        if cfg.depth < 1:
            raise ValueError(f"{cfg.name}.depth must be >= 1, got {cfg.depth}")
        if cfg.l2_norm:
            raise ValueError(f"{cfg.name}.l2_norm must be false: residuals are not unit vectors")
        check_codebook(cfg)
        if cfg.layout == "subcodes" and cfg.codebook_size**cfg.depth > MAX_VOCAB_SIZE:
            raise ValueError(f"{cfg.name}: {cfg.depth} sub-codes of {cfg.codebook_size} make a vocabulary past 2^31 "
                             f"(token ids are cached as int32): lower {cfg.name}.depth or codebook_size, or set "
                             f"{cfg.name}.layout=flat")
        return ResidualVectorQuantizer(cfg.codebook_size, cfg.codebook_dim, cfg.depth, shared=cfg.shared_codebook,
                                       flat=cfg.layout == "flat", options=vq_options(cfg))

    def build_subcodes(self, cfg: RVQConfig) -> tuple[int, ...]:
        return (cfg.codebook_size,) * cfg.depth if cfg.layout == "subcodes" and cfg.depth > 1 else ()
