"""``multiscale``: VAR's multi-scale residual quantization (Tian et al. 2024, "next-scale prediction").

The encoder's latent map f (h×w) is written as K token maps of growing size, coarse to fine: map
k quantizes the residual f − f̂_{k−1} area-downsampled to its own grid (1×1, 2×2, 4×4, 8×8 for
``scales: [1, 2, 4, 8]`` on an 8×8 latent) with one shared codebook, and f̂_k = f̂_{k−1} +
upsample(e_k) (bicubic, as VAR). The decoder sees f̂_K. The Llama reads the maps in that order,
each in raster order (1 + 4 + 16 + 64 = 85 tokens for the default), so the next-token Llama
predicts a coarse image first and refines it; ``lm.attention=block_causal`` is VAR's attention
for it (tokens of one scale see every earlier scale and each other).

- Any complete prefix of scales decodes: ``decode_scales(tokens, k)`` is the image of the first k
  maps (f̂_k through the decoder), the coarse image VAR draws first.
- A prefix-completion prompt is the first ``kept_rows(K, ratio)`` whole scales (``prefix_lengths``).
- Scales are side lengths on a square latent whose side is the last scale; on any other latent
  each map keeps the same fraction of it (rounded, at least 1), and the last map is the latent.
- Not VAR's: no φ convolutions after the upsampling (VAR's quant_resi), and the loss is each
  map's VQ loss (codebook + β·commitment to its downsampled residual), summed, as residual VQ's.
- The shared codebook is data-initialised from the full-resolution latents of the first training
  batch; its restart and usage counters advance K times per training step.

Shapes: B batch, C channels (codebook_dim), h×w latent grid, K scales, N = Σ_k h_k·w_k tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Decoded, TokenBatch, count_label, kept_rows
from .learned import LearnedTokenizer
from .quantizers import QuantizerOutput, VectorQuantizer, VQOptions, check_latents, combined_stats
from .rotation_trick import rotation_trick
from .vq import VQConfig, check_codebook, fixes_label, vq_options


def scale_grids(scales: list[int] | tuple[int, ...], h: int, w: int) -> list[tuple[int, int]]:
    """(h_k, w_k) of each scale's token map on an h×w latent: scale s keeps s/scales[-1] of each
    side, rounded, at least 1; the last map is (h, w)."""
    top = scales[-1]
    return [(max(1, round(h * s / top)), max(1, round(w * s / top))) for s in scales[:-1]] + [(h, w)]


def check_scales(scales: list[int], name: str) -> None:
    """ValueError naming ``<name>.scales`` unless they are ≥ 1 integers, strictly increasing."""
    if not scales or any(int(s) != s or s < 1 for s in scales) or list(scales) != sorted(set(scales)):
        raise ValueError(f"{name}.scales must be strictly increasing integers >= 1 (VAR: [1, 2, 4, 8] on an "
                         f"8×8 latent), got {list(scales)}")


class MultiScaleQuantizer(nn.Module):
    """Multi-scale residual VQ of an h×w latent (``latent``) with one shared codebook of
    ``codebook_size`` ``dim``-d codes.

    forward: z (B, C, h, w) float → quantized (B, C, h, w) = f̂_K (same dtype; straight-through on
    the sum, or the rotation trick's gradient with ``options.rotation_trick``), indices (B, 1, N)
    int64: the K maps' ids, scale by scale, each in raster order.
    lookup: indices (B, 1, N) → f̂_K (B, C, h, w) float32; ``lookup_scales(indices, k)`` → f̂_k.
    ``grids``: (h_k, w_k) of each map; ``lengths``: h_k·w_k of each.

    stats: the maps' mean codebook_usage, perplexity, entropy, commitment, codebook_loss; their
    summed restarted_codes; dead_codes; ``scale<k>_usage`` per map; residual_error = ||f − f̂_K||² / ||f||².
    """

    def __init__(self, codebook_size: int, dim: int, scales: list[int], latent: tuple[int, int],
                 options: VQOptions | None = None) -> None:
        super().__init__()
        options = options or VQOptions()
        check_scales(scales, "multiscale")
        self.latent = (int(latent[0]), int(latent[1]))
        if scales[-1] > max(self.latent):
            raise ValueError(f"scales end at {scales[-1]}, finer than the {self.latent[0]}×{self.latent[1]} latent "
                             f"(the last scale is the latent itself)")
        if options.l2_norm:
            raise ValueError("multi-scale residual VQ needs unnormalised codes: l2_norm would quantize every "
                             "residual to unit norm")
        self.scales = [int(s) for s in scales]
        self.grids = scale_grids(self.scales, *self.latent)
        self.lengths = [gh * gw for gh, gw in self.grids]
        self.rotation = options.rotation_trick
        # The trick acts on the sum of the upsampled codes; the maps themselves pass the gradient straight.
        self.quantizer = VectorQuantizer(codebook_size, dim, dataclasses.replace(options, rotation_trick=False))
        self.codebook_size = codebook_size
        self.in_channels = self.out_channels = dim

    def _up(self, x: Tensor) -> Tensor:
        """A (B, C, h_k, w_k) map brought to the latent's (B, C, h, w): bicubic, as VAR; identity at full size."""
        return x if tuple(x.shape[-2:]) == self.latent else F.interpolate(x, size=self.latent, mode="bicubic",
                                                                           align_corners=False)

    def lookup_scales(self, indices: Tensor, num_scales: int) -> Tensor:
        """f̂ of the first ``num_scales`` maps of indices (B, 1, ≥ their count) or (B, ≥ their count)
        as (B, C, h, w) float32."""
        flat = indices.reshape(indices.shape[0], -1).long()
        out = torch.zeros(indices.shape[0], self.out_channels, *self.latent, device=indices.device)
        start = 0
        for (gh, gw), n in list(zip(self.grids, self.lengths))[:num_scales]:
            out = out + self._up(self.quantizer.lookup(flat[:, start : start + n].reshape(-1, gh, gw)))
            start += n
        return out

    def lookup(self, indices: Tensor) -> Tensor:
        """indices (B, 1, N) → f̂_K (B, C, h, w) float32 (eval-mode ``quantized``)."""
        return self.lookup_scales(indices, len(self.scales))

    def forward(self, z: Tensor) -> QuantizerOutput:
        """z (B, C, h, w) float → QuantizerOutput (see class docstring)."""
        check_latents(z, self.in_channels, "MultiScaleQuantizer")
        if tuple(z.shape[-2:]) != self.latent:
            raise ValueError(f"MultiScaleQuantizer: expected a {self.latent} latent, got {tuple(z.shape[-2:])}")
        with torch.autocast(z.device.type, enabled=False):
            x = z.float()
            if self.training and not bool(self.quantizer.initialised):  # never for SimVQ (born initialised)
                rows = x.detach().permute(0, 2, 3, 1).reshape(-1, x.shape[1])
                self.quantizer.init_codebook(rows)  # from the full map, not from the 1×1 one
            f_hat = torch.zeros_like(x)  # Σ_{j<k} upsample(e_j), no gradient
            outs: list[QuantizerOutput] = []
            for grid in self.grids:
                residual = x - f_hat  # keeps z's gradient
                if grid != self.latent:
                    residual = F.interpolate(residual, size=grid, mode="area")
                outs.append(self.quantizer(residual))
                f_hat = f_hat + self._up(outs[-1].quantized.detach())
            quantized = x + (f_hat - x).detach()
            if self.rotation:
                quantized = rotation_trick(x, f_hat, quantized)
            loss = torch.stack([o.loss for o in outs]).sum()
            error = ((x - f_hat).pow(2).sum() / x.pow(2).sum().clamp_min(1e-12)).detach()
        indices = torch.cat([o.indices.flatten(1) for o in outs], 1)[:, None, :]
        stats = combined_stats(outs, "scale")
        stats["dead_codes"] = outs[-1].stats["dead_codes"]  # the one shared codebook, after every scale's update
        stats["residual_error"] = error
        return QuantizerOutput(quantized=quantized.to(z.dtype), indices=indices, loss=loss, stats=stats)


@dataclass
class MultiScaleConfig(VQConfig):
    """VQ's fields (the one shared codebook: codebook_size, codebook_dim, beta, restarts, simvq,
    rotation_trick) plus the scales of the token maps."""

    name: str = "multiscale"
    codebook_size: int = 1024
    scales: list[int] = field(default_factory=lambda: [1, 2, 4, 8])  # VAR at 256 px: 1,2,3,4,5,6,8,10,13,16

    def label(self) -> str:
        """Short preset-style name for plots and tables: ``multiscale 1k 1-2-4-8 f4``."""
        return f"{self.name} {count_label(self.codebook_size)} {'-'.join(map(str, self.scales))} " \
               f"f{self.downsample}{fixes_label(self)}"


class MultiScaleTokenizer(LearnedTokenizer):
    """vocab_size = codebook_size; tokens per image N = Σ_k h_k·w_k (85 for scales 1-2-4-8 on 8×8),
    scale by scale, coarse to fine. The token grid is (1, N): one row of scale maps."""

    Config = MultiScaleConfig

    def token_grid(self, cfg: MultiScaleConfig) -> tuple[int, int]:
        check_scales(cfg.scales, cfg.name)  # the first of this tokenizer's methods __init__ calls
        return 1, sum(gh * gw for gh, gw in scale_grids(cfg.scales, *self.latent_grid(cfg)))

    def latent_grid(self, cfg: MultiScaleConfig) -> tuple[int, int]:
        """(h, w) of the encoder's latent map (the last scale's token map)."""
        return self.image_size[0] // cfg.downsample, self.image_size[1] // cfg.downsample

    def build_quantizer(self, cfg: MultiScaleConfig) -> nn.Module:
        if cfg.l2_norm:
            raise ValueError(f"{cfg.name}.l2_norm must be false: residuals are not unit vectors")
        h, w = self.latent_grid(cfg)
        if cfg.scales[-1] > max(h, w):
            raise ValueError(f"{cfg.name}.scales end at {cfg.scales[-1]}, finer than the {h}×{w} latent: "
                             f"the last scale is the latent itself (downsample {cfg.downsample})")
        check_codebook(cfg)
        return MultiScaleQuantizer(cfg.codebook_size, cfg.codebook_dim, list(cfg.scales), (h, w), vq_options(cfg))

    @property
    def scale_lengths(self) -> list[int]:
        """Tokens of each scale's map, coarse to fine (their sum is ``max_tokens``)."""
        return list(self.quantizer.lengths)

    def attention_blocks(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """VAR's block-causal plan over the LM's input positions (0: the class token, then the ids):
        one block per scale, and each position's parent — for block 0 the class token, for a cell
        of scale k ≥ 1 the cell of scale k − 1 that covers it (nearest), at its sequence position.
        ValueError unless the first scale is one token (the class token alone predicts it)."""
        if self.scale_lengths[0] != 1:
            raise ValueError(f"block-causal attention needs a 1×1 first scale (the class token predicts it), got "
                             f"{self.cfg.name}.scales={list(self.cfg.scales)}")
        grids, starts = self.quantizer.grids, [1 + sum(self.scale_lengths[:k]) for k in range(len(self.scale_lengths))]
        parents = [0]
        for k in range(1, len(grids)):
            (ph, pw), (h, w) = grids[k - 1], grids[k]
            parents += [starts[k - 1] + (i * ph // h) * pw + j * pw // w for i in range(h) for j in range(w)]
        return tuple(self.scale_lengths), tuple(parents)

    def prefix_lengths(self, tokens: TokenBatch, ratio: float) -> Tensor:
        """The ids of the first ``kept_rows(K, ratio)`` whole scales (a coarse image to refine)."""
        kept = kept_rows(len(self.cfg.scales), ratio)
        return torch.full((len(tokens),), sum(self.scale_lengths[:kept]), dtype=torch.int64)

    @torch.no_grad()
    def decode_scales(self, tokens: TokenBatch, num_scales: int) -> Decoded:
        """The image of the first ``num_scales`` maps of each stream (the coarse image a prefix of
        scales shows); a stream shorter than those maps, or with an id outside the vocabulary
        among them, is grey and ``valid=False``. Never raises on bad ids."""
        if not 1 <= num_scales <= len(self.cfg.scales):
            raise ValueError(f"num_scales must be in [1, {len(self.cfg.scales)}], got {num_scales}")
        return self._decode_ids(tokens, sum(self.scale_lengths[:num_scales]), False,
                                lambda ids: self.quantizer.lookup_scales(ids, num_scales))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scales={self.scale_lengths}"
