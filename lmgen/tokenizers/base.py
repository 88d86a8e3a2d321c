"""The tokenizer contract: what every arm of the comparison must provide.

Tokenizers are the variable under study. Everything downstream (token cache, sequence
layout, Llama, sampler, metrics) sees only this protocol, never a tokenizer's name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from lmgen.checks import check_interval  # noqa: F401  (tokenizer modules check their fields with it)

# Ids one vocabulary may hold: the token cache (lmgen.data.RowEncoder) stores ids as uint16 up to
# 2^16 and as int32 above, so ids past 2^31 - 1 would wrap negative there. Tokenizers refuse a
# larger vocabulary when they are built (ELM's 32-bit BAE needs an int64 cache first).
MAX_VOCAB_SIZE = 1 << 31


@dataclass(frozen=True)
class TokenBatch:
    """Token ids of a batch of images.

    ids: (B, L) int64 in [0, vocab_size), right-padded with 0 past ``lengths``.
    lengths: (B,) int64, number of valid ids per item (== L for fixed-length tokenizers).
    """

    ids: Tensor
    lengths: Tensor

    def __post_init__(self) -> None:
        if self.ids.dim() != 2 or self.lengths.dim() != 1 or self.ids.shape[0] != self.lengths.shape[0]:
            raise ValueError(f"TokenBatch: ids (B, L) and lengths (B,) expected, got {tuple(self.ids.shape)} "
                             f"and {tuple(self.lengths.shape)}")

    def __len__(self) -> int:
        return self.ids.shape[0]

    def item(self, i: int) -> Tensor:
        """The valid ids of item ``i`` as a 1-D int64 tensor."""
        return self.ids[i, : int(self.lengths[i])]


@dataclass(frozen=True)
class Decoded:
    """Images decoded from token streams.

    images: (B, 3, H, W) uint8 (video: (B, T, 3, H, W)).
    valid: (B,) bool, False where a stream could not be decoded (its image is grey).
    frames: video only, (B,) int64 frames really decoded; a clip with fewer than T repeats
        its last frame (a partial decode: counted, not hidden). None for images.
    """

    images: Tensor
    valid: Tensor
    frames: Tensor | None = None


@runtime_checkable
class ImageTokenizer(Protocol):
    """What every tokenizer in ``lmgen.tokenizers.TOKENIZERS`` implements.

    - ``vocab_size``: ids the LM must predict (specials excluded; the sequence layout
      offsets BOS/EOS/PAD/class ids past it).
    - ``max_tokens``: upper bound on tokens per image.
    - ``variable_length``: True for codec streams (they end with EOS in the layout).
    - ``subcodes``: () unless a position's code is split into sub-tokens (ELM, MAGVIT-v2).
    - ``video``: True for clip tokenizers (h264): ``encode`` takes (B, T, 3, H, W) uint8
      clips and ``decode`` returns them; ``frames`` is T (0 for image tokenizers).
    - ``learned``: True for tokenizers trained by gradient in stage 1
      (``lmgen.tokenizer_module``); they are ``nn.Module``s and their ``fit`` raises.
    - ``encode_in_workers``: True where ``encode`` is CPU-bound per-image work (a codec, a
      palette lookup) that the token-cache writer may run inside its DataLoader workers, one
      batch per worker in parallel (``data.num_workers`` > 0). Such a tokenizer must pickle
      (workers may be spawned) and encode a batch the same whatever process and torch thread
      count run it — a cache must not depend on where it was written. False (the default for
      learned tokenizers) keeps ``encode`` in the main process, in big batches, on the
      tokenizer's device.
    - ``fit(images)``: stage 1 for non-learned tokenizers (a palette, BPE merges, or
      nothing), given (N, 3, H, W) uint8 train images; returns ``tok/*``-style stats.
    - ``state_dict()/load_state_dict()``: whatever ``fit`` learned, so a token cache can
      restore the exact tokenizer that wrote it.
    - ``decode`` never raises on a bad stream: it marks it ``valid=False``.
    - ``prefix_lengths(tokens, ratio)``: (B,) int64, how many leading ids of each stream
      form a prompt that shows the top ``ratio`` of the image, cut where the stream can be
      continued (a row of the token grid, a JPEG restart marker); prefix completion
      (JPEG-LM's protocol) prompts the LM with them. ValueError where the tokenizer has no
      such boundary (e.g. JPEG without restart markers).
    """

    vocab_size: int
    max_tokens: int
    variable_length: bool
    subcodes: tuple[int, ...]
    learned: bool
    encode_in_workers: bool
    video: bool
    frames: int

    def fit(self, images: Tensor) -> dict[str, float]: ...

    def encode(self, images: Tensor) -> TokenBatch: ...

    def decode(self, tokens: TokenBatch) -> Decoded: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...

    def prefix_lengths(self, tokens: TokenBatch, ratio: float) -> Tensor: ...


def count_label(n: int) -> str:
    """1024 → "1k", 16384 → "16k", 1000 → "1000": vocabulary sizes as papers write them."""
    return f"{n >> 10}k" if n >= 1024 and n % 1024 == 0 else str(n)


def grey_images(n: int, height: int, width: int) -> Tensor:
    """(n, 3, H, W) uint8 mid-grey: what an undecodable stream decodes to."""
    return torch.full((n, 3, height, width), 128, dtype=torch.uint8)


def pad_token_lists(streams: list[Tensor]) -> TokenBatch:
    """Right-pad a list of 1-D int64 id tensors into a ``TokenBatch``."""
    lengths = torch.tensor([len(s) for s in streams], dtype=torch.int64)
    width = int(lengths.max()) if len(streams) else 0
    ids = torch.zeros(len(streams), width, dtype=torch.int64)
    for i, s in enumerate(streams):
        ids[i, : len(s)] = s
    return TokenBatch(ids=ids, lengths=lengths)


def kept_rows(rows: int, ratio: float) -> int:
    """Rows of a ``rows``-row raster a prompt of the top ``ratio`` keeps: ratio·rows rounded
    half up, at least 1 and at most rows − 1, so there is always a prompt and something to complete."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"a prefix ratio must be in (0, 1), got {ratio}")
    if rows < 2:
        raise ValueError(f"a prefix needs at least 2 rows to cut between, got {rows}")
    return min(max(math.floor(ratio * rows + 0.5), 1), rows - 1)


def row_prefix_lengths(tokens: TokenBatch, rows: int, row_tokens: int, ratio: float) -> Tensor:
    """``prefix_lengths`` of a fixed raster of ``rows`` rows of ``row_tokens`` ids each: the
    ids of the top ``kept_rows(rows, ratio)`` rows, the same for every item. (B,) int64."""
    return torch.full((len(tokens),), kept_rows(rows, ratio) * row_tokens, dtype=torch.int64)
