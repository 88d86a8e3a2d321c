"""``causal1d``: a 1-D causal tokenizer (SEED's structure, Ge et al. 2023), trained from pixels.

``num_tokens`` learned queries read the conv encoder's 2-D feature map through
cross-attention, with a *causal* mask among the queries: token i depends on the image and
on queries < i only, the order in which the stage-2 LM predicts them. Each query's output
is vector-quantised (VQ's fields: codebook_size, codebook_dim, ...). The decoder reads the
1-D code sequence: one query per latent position (a shared learned vector plus its 2-D
position) cross-attends to the tokens, and the conv decoder renders the map.

Tokens per image = ``num_tokens``, whatever the resolution: the axis is set directly
rather than through ``downsample`` (which only sizes the feature map the queries read).
SEED's semantic alignment came from frozen BLIP-2 / Stable Diffusion parts, which are not
available offline; lmgen keeps the causal 1-D structure. ``causal: false`` gives
bidirectional queries (TiTok-style 1-D tokens), the ablation of the causal mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .autoencoder import AutoencoderConfig, Decoder, Encoder
from .base import TokenBatch, count_label, row_prefix_lengths
from .learned import LearnedTokenizer
from .transformer import Transformer, check_width, sincos_1d, sincos_2d
from .vq import VQConfig, vector_quantizer

QUERY_INITS = ("pooled", "learned")


@dataclass
class Causal1DConfig(VQConfig):
    name: str = "causal1d"
    num_tokens: int = 32  # SEED: 32 tokens per image
    query_width: int = 128  # width of the query transformers (encoder and decoder)
    heads: int = 4
    encoder_layers: int = 2
    decoder_layers: int = 2
    causal: bool = True  # SEED: token i sees queries < i; False = bidirectional (TiTok-style)
    # "pooled": query i starts as its learned vector plus the mean feature of the i-th of
    # num_tokens equal raster chunks of the map, and each decoder position query gets the
    # token of its chunk; "learned": the learned vectors alone (SEED).
    query_init: str = field(default="pooled", metadata={"choices": QUERY_INITS})

    def label(self) -> str:
        """Short preset-style name for plots and tables: tokens per image × codebook size."""
        return f"{self.name} {self.num_tokens}×{count_label(self.codebook_size)}"


class QueryEncoder(nn.Module):
    """(B, 3, H, W) → (B, out_channels, 1, num_tokens): conv features read by learned queries."""

    def __init__(self, cfg: Causal1DConfig, out_channels: int) -> None:
        super().__init__()
        self.width, self.pooled = cfg.query_width, cfg.query_init == "pooled"
        self.features = Encoder(cfg, cfg.query_width)
        self.queries = nn.Parameter(0.02 * torch.randn(cfg.num_tokens, cfg.query_width))
        self.pool_proj = nn.Linear(cfg.query_width, cfg.query_width) if self.pooled else None
        self.body = Transformer(cfg.query_width, cfg.heads, cfg.encoder_layers, cross=True, causal=cfg.causal)
        self.out = nn.Linear(cfg.query_width, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        f = self.features(x)  # (B, width, h, w)
        b, d, h, w = f.shape
        context = f.flatten(2).transpose(1, 2) + sincos_2d(h, w, d, f.device).to(f.dtype)  # (B, h·w, width)
        queries = self.queries.expand(b, -1, -1).to(f.dtype)  # (B, Q, width)
        if self.pool_proj is not None:
            # Content from the first step: with learned queries alone, every query starts by
            # reading the same global average, and VQ turns that into position-only codes
            # (measured: 12.6 dB after 800 steps on `shapes`, the mean-colour level).
            chunks = F.adaptive_avg_pool1d(context.transpose(1, 2), queries.shape[1]).transpose(1, 2)
            queries = queries + self.pool_proj(chunks)
        tokens = self.out(self.body(queries, context))  # (B, Q, D)
        return tokens.transpose(1, 2).unsqueeze(2)  # (B, D, 1, Q): a 1×Q grid for the quantizer


class TokenDecoder(nn.Module):
    """(B, in_channels, 1, num_tokens) quantized tokens → (B, 3, H, W): position queries
    cross-attend to the tokens, then the conv decoder renders the (H/downsample)×(W/downsample) map."""

    def __init__(self, cfg: Causal1DConfig, in_channels: int, feature_grid: tuple[int, int]) -> None:
        super().__init__()
        self.width, self.feature_grid = cfg.query_width, feature_grid
        self.inp = nn.Linear(in_channels, cfg.query_width)
        self.query = nn.Parameter(torch.zeros(cfg.query_width))  # shared; positions come from sin-cos codes
        self.unpool_proj = nn.Linear(cfg.query_width, cfg.query_width) if cfg.query_init == "pooled" else None
        self.body = Transformer(cfg.query_width, cfg.heads, cfg.decoder_layers, cross=True)
        self.render = Decoder(cfg, cfg.query_width)

    def forward(self, z: Tensor) -> Tensor:
        b, _, _, q = z.shape
        h, w = self.feature_grid
        tokens = self.inp(z.flatten(2).transpose(1, 2))  # (B, Q, width)
        tokens = tokens + sincos_1d(q, self.width, z.device).to(tokens.dtype)
        queries = (self.query + sincos_2d(h, w, self.width, z.device)).expand(b, -1, -1).to(tokens.dtype)
        if self.unpool_proj is not None:  # the mirror of the encoder's pooling: token i → its raster chunk
            spread = F.interpolate(tokens.transpose(1, 2), size=h * w, mode="nearest").transpose(1, 2)
            queries = queries + self.unpool_proj(spread)
        y = self.body(queries, tokens)  # (B, h·w, width)
        return self.render(y.transpose(1, 2).reshape(b, self.width, h, w))


class Causal1DTokenizer(LearnedTokenizer):
    """vocab_size = codebook_size; tokens per image = num_tokens, in query order."""

    Config = Causal1DConfig

    def __init__(self, cfg: Causal1DConfig, image_size: tuple[int, int]) -> None:
        if cfg.num_tokens < 1:
            raise ValueError(f"{cfg.name}.num_tokens must be >= 1, got {cfg.num_tokens}")
        check_width(cfg.query_width, cfg.heads, f"{cfg.name}.query_width")
        if cfg.encoder_layers < 1 or cfg.decoder_layers < 1:
            raise ValueError(f"{cfg.name}.encoder_layers and {cfg.name}.decoder_layers must be >= 1")
        super().__init__(cfg, image_size)
        positions = (self.image_size[0] // cfg.downsample) * (self.image_size[1] // cfg.downsample)
        if cfg.query_init == "pooled" and cfg.num_tokens > positions:
            # Each pooled query starts from its own raster chunk of the feature map: with more
            # tokens than map positions the chunks overlap and tokens start as copies.
            raise ValueError(f"{cfg.name}.num_tokens={cfg.num_tokens} exceeds the {positions} positions of the "
                             f"feature map ({self.image_size[0]}×{self.image_size[1]} at downsample={cfg.downsample}) "
                             f"that pooled queries split; lower it, lower {cfg.name}.downsample or use query_init=learned")

    def token_grid(self, cfg: Causal1DConfig) -> tuple[int, int]:
        return 1, cfg.num_tokens

    def prefix_lengths(self, tokens: TokenBatch, ratio: float) -> Tensor:
        """The first round(ratio·num_tokens) tokens: a 1-D causal code has no rows, and any
        token is a place to continue from (what the prefix shows is the encoder's choice, not
        the top of the image)."""
        return row_prefix_lengths(tokens, self.max_tokens, 1, ratio)

    def build_quantizer(self, cfg: Causal1DConfig) -> nn.Module:
        return vector_quantizer(cfg)

    def build_encoder(self, cfg: AutoencoderConfig, out_channels: int) -> nn.Module:
        return QueryEncoder(cfg, out_channels)

    def build_decoder(self, cfg: AutoencoderConfig, in_channels: int) -> nn.Module:
        h, w = self.image_size
        return TokenDecoder(cfg, in_channels, (h // cfg.downsample, w // cfg.downsample))
