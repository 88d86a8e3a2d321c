"""What the learned tokenizers (vq, lfq, bae, crt, causal1d) share.

A learned tokenizer is an ``nn.Module``: the conv encoder of ``autoencoder.py``, one
quantizer from ``quantizers.py``, and the mirrored decoder. Subclasses say which
quantizer (``build_quantizer``) and, where a code is split into sub-codes, how
(``subcodes``); stage-2-aware ones also replace the encoder/decoder and token grid
(causal1d) or add a stage-1 loss term (``aux_terms``, CRT). Stage 1 trains them by gradient in ``lmgen.tokenizer_module`` (which owns
the losses, optimiser and logging); this module imports neither Lightning nor MLflow.

Token ids are the quantizer's indices in raster order (row by row, left to right), so a
32×32 image at ``downsample=4`` is 64 ids in ``[0, codebook_size)``.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lmgen.checks import check_choices, check_ranges, choices
from lmgen.perf import PRECISIONS

from .autoencoder import AutoencoderConfig, Decoder, Encoder, to_uint8, to_unit
from .base import MAX_VOCAB_SIZE, Decoded, TokenBatch, grey_images, row_prefix_lengths
from .quantizers import QuantizerOutput

# The interval (lmgen.checks.check_interval) each numeric stage-1 recipe field must lie in, checked
# on the experiment's ``stage1`` section and on every learned tokenizer when it is built, so a bad
# value fails in load_config, before stage 1 trains anything.
STAGE1_RANGES = {
    "channels": "[1, inf)", "res_blocks": "[0, inf)", "max_channel_mult": "[1, inf)",
    "steps": "[0, inf)", "batch_size": "[1, inf)", "lr": "(0, inf)", "beta1": "[0, 1)", "beta2": "[0, 1)",
    "weight_decay": "[0, inf)", "warmup_steps": "[0, inf)", "grad_clip": "[0, inf)", "l1_weight": "[0, inf)",
    "l2_weight": "[0, inf)", "perceptual_weight": "[0, inf)", "adversarial_weight": "[0, inf)",
    "adversarial_start": "[0, inf)", "train_images": "[0, inf)", "val_every": "[1, inf)", "val_images": "[0, inf)",
    "seed": "[0, 4294967295]",  # Lightning's seed_everything raises outside uint32, when training starts
}


@dataclass(frozen=True)
class Stage1Config:
    """The recipe every learned tokenizer (vq, lfq, bae, crt, causal1d, ...) shares: the
    autoencoder's width and its stage-1 training.

    It is the experiment's ``stage1`` section, so one recipe serves every learned arm of a
    comparison; a tokenizer preset that truly needs its own value of a field sets it in its
    ``tokenizer`` block (with the reason beside it), which wins for that tokenizer. Codec and
    pixel tokenizers have no use for it and are not keyed by it.
    """

    # ---- the conv autoencoder (lmgen.tokenizers.autoencoder; ``downsample`` is the tokenizer's) ----
    channels: int = 32
    res_blocks: int = 1
    max_channel_mult: int = 4
    # ---- training (lmgen.tokenizer_module) ----
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.99
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    # Perceptual (VGG16 feature distance) and adversarial (PatchGAN, hinge) terms: off by
    # default. The perceptual network needs pretrained VGG16 weights, which cannot be
    # fetched offline: give a torchvision vgg16 state_dict file, or "auto" to use one already
    # in torch's hub cache. The discriminator trains from scratch but costs ~2× compute.
    perceptual_weight: float = 0.0
    perceptual_weights: str = "auto"
    adversarial_weight: float = 0.0
    adversarial_start: int = 0  # generator steps before the adversarial term switches on
    train_images: int = 0  # train images used by stage 1 (0 = the whole train split)
    val_every: int = 500
    val_images: int = 256  # val images behind the in-training tok/val_* curves
    precision: str = field(default="auto", metadata=choices(*PRECISIONS))
    seed: int = 0  # the tokenizer's own seed (initial weights, data order), apart from the LM's

    def check(self, prefix: str = "stage1") -> None:
        """ValueError naming ``<prefix>.<field>`` for a value outside its range or choices."""
        check_choices(prefix, self)
        check_ranges(prefix, self, STAGE1_RANGES)


RECIPE_FIELDS = tuple(f.name for f in dataclasses.fields(Stage1Config))


@dataclass
class LearnedConfig(AutoencoderConfig):
    """Fields every learned tokenizer has: the autoencoder's and its stage-1 training recipe.

    Every ``Stage1Config`` field is here too, ``None`` by default: ``None`` takes the
    experiment's ``stage1`` value (``with_recipe``; ``load_config`` does it), a value set in a
    preset or override is this tokenizer's own. The resolved fields are part of the stage-1
    hash, so changing one retrains stage 1 and changing the LM never does.
    """

    channels: int | None = None
    res_blocks: int | None = None
    max_channel_mult: int | None = None
    name: str = ""
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    beta1: float | None = None
    beta2: float | None = None
    weight_decay: float | None = None
    warmup_steps: int | None = None
    grad_clip: float | None = None
    l1_weight: float | None = None
    l2_weight: float | None = None
    perceptual_weight: float | None = None
    perceptual_weights: str | None = None
    adversarial_weight: float | None = None
    adversarial_start: int | None = None
    train_images: int | None = None
    val_every: int | None = None
    val_images: int | None = None
    precision: str | None = field(default=None, metadata=choices(*PRECISIONS))
    seed: int | None = None
    # A state_dict saved by an earlier stage 1 (``<home>/tokenizers/<key>/state.pt``): load it
    # instead of training. "" = train.
    checkpoint: str = ""

    def with_recipe(self, recipe: Stage1Config) -> LearnedConfig:
        """This config with every recipe field it leaves ``None`` taken from ``recipe``."""
        unset = {key: getattr(recipe, key) for key in RECIPE_FIELDS if getattr(self, key) is None}
        return dataclasses.replace(self, **unset) if unset else self


@dataclass(frozen=True)
class AutoencoderOutput:
    """One pass of a learned tokenizer in training.

    recon: (B, 3, H, W) float ≈ [-1, 1]; quant: the quantizer's output; aux_loss: () float32,
    extra tokenizer-specific regularisers (0 for vq/lfq/bae; CRT's causal loss); aux_stats:
    detached scalars to log as ``tok/<key>``.
    """

    recon: Tensor
    quant: QuantizerOutput
    aux_loss: Tensor
    aux_stats: dict[str, Tensor]


class LearnedTokenizer(nn.Module, abc.ABC):
    """Encoder → quantizer → decoder. Fixed length: ``max_tokens`` ids per image.

    encode: (B, 3, H, W) uint8 → TokenBatch (B, h·w) int64 in [0, vocab_size), raster order.
    decode: TokenBatch → Decoded (B, 3, H, W) uint8; an item with the wrong length or an id
    outside [0, vocab_size) is grey and ``valid=False``. Neither changes the train/eval mode.
    """

    Config: type = LearnedConfig
    learned = True
    encode_in_workers = False  # big batches in the main process, on the tokenizer's device
    video = False  # still images only
    frames = 0
    variable_length = False

    def __init__(self, cfg: LearnedConfig, image_size: tuple[int, int]) -> None:
        super().__init__()
        cfg = cfg.with_recipe(Stage1Config())  # built outside load_config: the schema's recipe
        check_choices(cfg.name, cfg)
        check_ranges(cfg.name, cfg, STAGE1_RANGES)
        cfg.check(cfg.name)
        h, w = image_size
        if h % cfg.downsample or w % cfg.downsample:
            raise ValueError(f"{cfg.name}.downsample={cfg.downsample} must divide the image size {h}×{w}")
        self.cfg = cfg
        self.image_size = (int(h), int(w))
        self.grid = self.token_grid(cfg)
        # Initial weights depend on the tokenizer's own seed only, never on what ran before:
        # the stage-1 hash must determine the trained tokenizer.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.quantizer = self.build_quantizer(cfg)
            self.encoder = self.build_encoder(cfg, self.quantizer.in_channels)
            self.decoder = self.build_decoder(cfg, self.quantizer.out_channels)
        self.vocab_size = int(self.quantizer.codebook_size)
        self.max_tokens = self.grid[0] * self.grid[1]
        self.subcodes: tuple[int, ...] = self.build_subcodes(cfg)

    # ---- what subclasses provide --------------------------------------------------------

    @abc.abstractmethod
    def build_quantizer(self, cfg: LearnedConfig) -> nn.Module:
        """The quantizer (lmgen.tokenizers.quantizers) this tokenizer puts between encoder and decoder."""

    def build_subcodes(self, cfg: LearnedConfig) -> tuple[int, ...]:
        """() by default: one id per position from one vocabulary."""
        return ()

    def token_grid(self, cfg: LearnedConfig) -> tuple[int, int]:
        """(h, w) of the quantizer's index grid; tokens per image = h·w, read in raster order.
        The conv latent grid by default; causal1d's is (1, num_tokens)."""
        h, w = self.image_size
        return h // cfg.downsample, w // cfg.downsample

    def build_encoder(self, cfg: LearnedConfig, out_channels: int) -> nn.Module:
        """(B, 3, H, W) → latents (B, out_channels, *grid): the conv encoder by default."""
        return Encoder(cfg, out_channels)

    def build_decoder(self, cfg: LearnedConfig, in_channels: int) -> nn.Module:
        """Quantized latents (B, in_channels, *grid) → (B, 3, H, W): the conv decoder by default."""
        return Decoder(cfg, in_channels)

    def aux_terms(self, latents: Tensor, quant: QuantizerOutput, step: int | None) -> tuple[Tensor, dict[str, Tensor]]:
        """Extra stage-1 loss (() float32) and detached stats on top of reconstruction + quantizer
        loss, given the pre-quantisation ``latents`` and the quantizer's output at training
        ``step`` (None outside training). None by default; CRT's causal regulariser."""
        return torch.zeros((), device=latents.device), {}

    def stage1_metrics(self) -> dict[str, float]:
        """Constant figures of this tokenizer logged with the stage-1 run (``tok/*``); none by default."""
        return {}

    # ---- training-time pass (used by TokenizerModule) -----------------------------------

    def forward(self, x: Tensor, step: int | None = None) -> AutoencoderOutput:
        """x: (B, 3, H, W) float in [-1, 1] → reconstruction, quantizer output, aux terms.
        ``step``: the stage-1 training step (schedules of the aux terms); None = fully on."""
        latents = self.encoder(x)
        quant = self.quantizer(latents)
        aux_loss, aux_stats = self.aux_terms(latents, quant, step)
        return AutoencoderOutput(recon=self.decoder(quant.quantized), quant=quant, aux_loss=aux_loss,
                                 aux_stats=aux_stats)

    # ---- the ImageTokenizer protocol ----------------------------------------------------

    def fit(self, images: Tensor) -> dict[str, float]:
        """Learned tokenizers have nothing to fit without gradients: stage 1 trains them in
        ``lmgen.tokenizer_module``. Kept so every tokenizer satisfies one protocol."""
        raise TypeError(f"{self.cfg.name} is learned: train it with lmgen.tokenizer_module.train_tokenizer")

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        """Eval mode (deterministic quantizers, no state updates) for one call, then back."""
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    @torch.no_grad()
    def encode(self, images: Tensor) -> TokenBatch:
        """(B, 3, H, W) uint8 → TokenBatch (B, h·w) int64 on the images' device."""
        h, w = self.image_size
        if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != (3, h, w):
            raise ValueError(f"expected uint8 images of shape (B, 3, {h}, {w}), got {images.dtype} "
                             f"{tuple(images.shape)}")
        with self._eval_mode():
            x = to_unit(images.to(self._device()))
            indices = self.quantizer(self.encoder(x)).indices  # (B, h, w)
        ids = indices.flatten(1).to(images.device)
        lengths = torch.full((ids.shape[0],), self.max_tokens, dtype=torch.int64, device=ids.device)
        return TokenBatch(ids=ids, lengths=lengths)

    @torch.no_grad()
    def decode(self, tokens: TokenBatch) -> Decoded:
        """TokenBatch → Decoded (B, 3, H, W) uint8 + valid (B,) bool; never raises on bad ids."""
        return self._decode_ids(tokens, self.max_tokens, True,
                                lambda ids: self.quantizer.lookup(ids.view(ids.shape[0], *self.grid)))

    def _decode_ids(self, tokens: TokenBatch, n: int, exact: bool, latents: Callable[[Tensor], Tensor]) -> Decoded:
        """The images of the first ``n`` ids of each stream: ``latents`` (B, n) int64 in range → the
        decoder's input. A stream is valid when its length is ``n`` (``exact``) or at least ``n``
        and its first n ids are in the vocabulary; an invalid one is grey. Never raises on bad ids."""
        ids, lengths = tokens.ids, tokens.lengths.to(tokens.ids.device)
        b = ids.shape[0]
        if ids.shape[1] < n:
            ids = torch.cat([ids, ids.new_zeros(b, n - ids.shape[1])], 1)
        ids = ids[:, :n]
        valid = (lengths == n if exact else lengths >= n) & ((ids >= 0) & (ids < self.vocab_size)).all(1)
        safe = torch.where(valid[:, None], ids, torch.zeros_like(ids))
        with self._eval_mode():
            images = to_uint8(self.decoder(latents(safe.to(self._device())))).to(ids.device)
        grey = grey_images(b, *self.image_size).to(images.device)
        return Decoded(images=torch.where(valid[:, None, None, None], images, grey), valid=valid)

    # nn.Module's state_dict / load_state_dict are the protocol's: the weights are the state.

    def prefix_lengths(self, tokens: TokenBatch, ratio: float) -> Tensor:
        """Ids of the top round(ratio·h) rows of the (h, w) token grid."""
        return row_prefix_lengths(tokens, self.grid[0], self.grid[1], ratio)

    def extra_repr(self) -> str:
        return f"grid={self.grid}, vocab_size={self.vocab_size}, subcodes={self.subcodes}"


def bits_label(cfg: LearnedConfig) -> str:
    """Label of a code of ``cfg.bits`` bits in ``cfg.num_subcodes`` sub-codes (LFQ, BAE): ``bae 16-bit 2×8 f4``."""
    split = f" {cfg.num_subcodes}×{cfg.bits // cfg.num_subcodes}" if cfg.num_subcodes > 1 else ""
    return f"{cfg.name} {cfg.bits}-bit{split} f{cfg.downsample}"


def check_code_bits(cfg: LearnedConfig) -> None:
    """ValueError naming ``<name>.bits`` unless the 2^bits codes of a binary code (LFQ, BAE) fit
    the token cache: bits in [1, 31] (the quantizers index up to 62 bits; the cache's int32 ids
    stop at 31, ``base.MAX_VOCAB_SIZE``)."""
    limit = MAX_VOCAB_SIZE.bit_length() - 1
    if not 1 <= cfg.bits <= limit:
        raise ValueError(f"{cfg.name}.bits must be in [1, {limit}] (token ids are cached as int32), got {cfg.bits}")


def split_bits(bits: int, num_subcodes: int, name: str) -> tuple[int, ...]:
    """ELM's n-c split of a ``bits``-bit code into ``num_subcodes`` equal sub-codes.

    1 → () (one vocabulary of 2^bits); n → (2^(bits/n),) * n, e.g. 16 bits, n=2 → (256, 256).
    """
    if num_subcodes < 1 or bits % num_subcodes:
        raise ValueError(f"{name}.num_subcodes={num_subcodes} must be >= 1 and divide bits={bits}")
    if num_subcodes == 1:
        return ()
    return (2 ** (bits // num_subcodes),) * num_subcodes
