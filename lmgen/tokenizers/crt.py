"""``crt``: causally regularised tokenization (CRT, "When Worse is Better", Ramanujan et al. 2024).

A VQ (or LFQ) tokenizer plus a small causal transformer that reads the encoder's
pre-quantisation latents in raster order and predicts the next one. Its loss, weighted by
λ (``crt_weight``, ramped linearly from 0 over ``crt_ramp_steps``), joins the stage-1
loss, so the encoder learns latent sequences that are easier to predict left to right —
what the stage-2 LM must do. CRT reports slightly worse reconstruction and better
generation at every LM size. The paper has no public code; these switches are the ones
its ablations need:

- ``crt_weight`` (λ, 4), ``crt_ramp_steps`` (1000), ``crt_layers`` (2 was best), ``crt_width``,
  ``crt_heads``;
- ``crt_target``: ``pre`` = predict the next pre-quantisation latent (the paper), ``post`` =
  the next quantized latent (straight-through, so gradient still reaches the encoder);
- ``crt_stop_grad``: detach the target (gradient reaches the encoder only through the
  predictor's inputs) — the paper does not say which it used;
- ``crt_loss``: ``l2`` (the paper) or ``ce`` = cross-entropy on the next code id.

The regulariser reads latents as the quantizer sees them (l2-normalised in VQ's
``l2_norm`` mode). At λ = 0 it is skipped, so the tokenizer is exactly plain VQ/LFQ. It
costs little: ``tok/crt_flops_share`` (logged with stage 1) is its share of a forward
pass's FLOPs, counted by ``torch.utils.flop_counter``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .learned import LearnedTokenizer, split_bits
from .lfq import LFQConfig, lookup_free_quantizer
from .quantizers import QuantizerOutput
from .transformer import Transformer, check_width, sincos_2d
from .vq import VQConfig, vector_quantizer

QUANTIZERS = ("vq", "lfq")
TARGETS = ("pre", "post")
LOSSES = ("l2", "ce")
MAX_CE_VOCAB = 2**16  # a softmax head over more codes than this is not "small"


@dataclass
class CRTConfig(VQConfig, LFQConfig):
    """VQ's fields (codebook_size, codebook_dim, beta, ...) for ``quantizer: vq``, LFQ's (bits,
    entropy_weight, ...) for ``quantizer: lfq``, and the causal regulariser's ``crt_*``."""

    name: str = "crt"
    quantizer: str = field(default="vq", metadata={"choices": QUANTIZERS})
    crt_weight: float = 4.0  # CRT: λ = 4
    crt_ramp_steps: int = 1000  # CRT: λ ramped linearly from 0 over the first 1k steps
    crt_layers: int = 2  # CRT: 2 layers best
    crt_width: int = 64  # CRT: the regulariser costs ~5% of tokenizer compute
    crt_heads: int = 4
    crt_target: str = field(default="pre", metadata={"choices": TARGETS})
    crt_stop_grad: bool = False
    crt_loss: str = field(default="l2", metadata={"choices": LOSSES})

    def label(self) -> str:
        """Short preset-style name for plots and tables: the quantizer's label plus λ."""
        base = VQConfig.label(self) if self.quantizer == "vq" else LFQConfig.label(self)
        return f"{base.replace(self.name, f'{self.name} {self.quantizer}', 1)} λ{self.crt_weight:g}"


class CausalPredictor(nn.Module):
    """Latents (B, D, h, w) read in raster order → (B, h·w, out) predictions; output t sees
    latents 0..t only, so output t is the prediction of latent t + 1."""

    def __init__(self, in_dim: int, out_dim: int, width: int, heads: int, layers: int) -> None:
        super().__init__()
        self.width = width
        self.inp = nn.Linear(in_dim, width)
        self.body = Transformer(width, heads, layers, causal=True)
        self.head = nn.Linear(width, out_dim)

    def forward(self, latents: Tensor) -> Tensor:
        b, d, h, w = latents.shape
        x = self.inp(latents.flatten(2).transpose(1, 2))  # (B, N, width)
        x = x + sincos_2d(h, w, self.width, latents.device).to(x.dtype)  # row and column of each latent
        return self.head(self.body(x))


class CRTTokenizer(LearnedTokenizer):
    """A VQ/LFQ tokenizer whose stage-1 loss adds λ · (next-latent prediction loss)."""

    Config = CRTConfig

    def __init__(self, cfg: CRTConfig, image_size: tuple[int, int]) -> None:
        _check(cfg)
        super().__init__(cfg, image_size)  # quantizer, encoder, decoder: the same weights as plain vq/lfq
        out_dim = self.vocab_size if cfg.crt_loss == "ce" else self.quantizer.in_channels
        if cfg.crt_loss == "ce" and self.vocab_size > MAX_CE_VOCAB:
            raise ValueError(f"crt.crt_loss='ce' needs a vocabulary <= {MAX_CE_VOCAB}, got {self.vocab_size}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed + 1)  # the recipe seed, filled in by LearnedTokenizer
            self.predictor = CausalPredictor(self.quantizer.in_channels, out_dim, cfg.crt_width, cfg.crt_heads,
                                             cfg.crt_layers)

    def build_quantizer(self, cfg: CRTConfig) -> nn.Module:
        return vector_quantizer(cfg) if cfg.quantizer == "vq" else lookup_free_quantizer(cfg)

    def build_subcodes(self, cfg: CRTConfig) -> tuple[int, ...]:
        return split_bits(cfg.bits, cfg.num_subcodes, cfg.name) if cfg.quantizer == "lfq" else ()

    def crt_lambda(self, step: int | None) -> float:
        """λ at training ``step``: linear ramp from 0 over ``crt_ramp_steps``; full λ when step is None."""
        c = self.cfg
        if step is None or c.crt_ramp_steps <= 0:
            return c.crt_weight
        return c.crt_weight * min(1.0, step / c.crt_ramp_steps)

    def _quantizer_view(self, latents: Tensor) -> Tensor:
        """The latents as the quantizer compares them to codes (B, D, h, w)."""
        if self.cfg.quantizer == "vq" and self.cfg.l2_norm:
            return F.normalize(latents.float(), dim=1)
        return latents

    def crt_loss(self, seq: Tensor, quant: QuantizerOutput) -> Tensor:
        """() float32: the unweighted next-latent prediction loss over positions 1..N-1, given the
        latents as the quantizer sees them (``_quantizer_view``), (B, D, h, w)."""
        c = self.cfg
        pred = self.predictor(seq)[:, :-1].float()  # (B, N-1, out): prediction of latents 1..N-1
        if c.crt_loss == "ce":
            targets = quant.indices.flatten(1)[:, 1:]  # (B, N-1) code ids
            return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), targets.reshape(-1))
        target = (seq if c.crt_target == "pre" else quant.quantized).flatten(2).transpose(1, 2)[:, 1:].float()
        if c.crt_stop_grad:
            target = target.detach()
        return F.mse_loss(pred, target)

    def aux_terms(self, latents: Tensor, quant: QuantizerOutput, step: int | None) -> tuple[Tensor, dict[str, Tensor]]:
        weight = self.crt_lambda(step)
        seq = self._quantizer_view(latents)
        stats = {"crt_weight": torch.tensor(weight, device=latents.device),
                 "crt_latent_rms": seq.detach().float().pow(2).mean().sqrt()}
        if weight == 0:  # exactly the plain tokenizer: no regulariser compute at all
            return torch.zeros((), device=latents.device), stats
        loss = self.crt_loss(seq, quant)
        stats["crt_loss"] = loss.detach()
        return weight * loss, stats

    def stage1_metrics(self) -> dict[str, float]:
        """``tok/crt_flops_share``: the regulariser's share of a forward pass's FLOPs (0 at λ = 0),
        and ``tok/crt_params``; training (forward + backward) has about the same share."""
        from torch.utils.flop_counter import FlopCounterMode

        x = torch.zeros(1, 3, *self.image_size, device=self._device())
        with self._eval_mode(), torch.no_grad():
            with FlopCounterMode(display=False) as base:
                latents = self.encoder(x)
                quant = self.quantizer(latents)
                self.decoder(quant.quantized)
            with FlopCounterMode(display=False) as reg:
                self.crt_loss(self._quantizer_view(latents), quant)
        share = reg.get_total_flops() / max(1, base.get_total_flops() + reg.get_total_flops())
        return {"tok/crt_flops_share": share if self.cfg.crt_weight > 0 else 0.0,
                "tok/crt_params": float(sum(p.numel() for p in self.predictor.parameters()))}


def _check(cfg: CRTConfig) -> None:
    """ValueError naming ``crt.<field>`` for an impossible regulariser."""
    if cfg.quantizer == "vq" and cfg.num_subcodes != 1:
        raise ValueError(f"{cfg.name}.num_subcodes={cfg.num_subcodes} splits LFQ bits; it needs quantizer='lfq'")
    if cfg.crt_weight < 0 or cfg.crt_ramp_steps < 0 or cfg.crt_layers < 1:
        raise ValueError(f"{cfg.name}: need crt_weight >= 0, crt_ramp_steps >= 0 and crt_layers >= 1")
    check_width(cfg.crt_width, cfg.crt_heads, f"{cfg.name}.crt_width")
