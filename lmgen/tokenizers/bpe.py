"""Byte-level BPE over codec byte streams: JPEG-LM's vocabulary extension (Han et al. 2024,
arXiv 2408.08459: 256 byte values + merges, 320 tokens for JPEG, 1024 for AVC).

Training and encoding use Hugging Face ``tokenizers`` (Rust, parallel); decoding is a numpy
table lookup and never touches it. Our ids: 0..255 are the byte values in byte order, then
the learned tokens in the order the trainer created them.

How bytes reach a text tokenizer unchanged: byte b becomes the character U+0100 + b (one
printable code point per byte, none of them whitespace, no normalizer), and the trainer gets
all 256 characters as its initial alphabet, so every byte — 0x00, 0xFF, invalid UTF-8, long
runs — is a token even if it never occurs in the training streams.

Chunking: a stream is split into ``CHUNK``-byte pieces before BPE (a ``Split`` pre-tokenizer),
so no merge crosses a chunk boundary (at most one lost merge per ``CHUNK`` bytes, < 0.1% of
tokens). Why: the trainer's merge update rescans every word that holds the pair, so its cost
grows with word length; on 500 skewed-random 20 KB streams (an H.264-sized case) 1024 tokens
took 40 s as whole-stream words and 17-20 s in 64..1024-byte chunks (2 cores), with the same
bytes per token (1.22). JPEG streams of 32..256 px images fit equally fast either way.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

CHUNK = 1024                         # bytes per pre-tokenized piece (see module docstring)
_OFFSET = 0x100                      # byte b <-> chr(0x100 + b): Latin Extended-A/B, all printable
_MIN_FREQUENCY = 2                   # a pair seen once in the training streams is not worth an id


def _to_text(data: bytes) -> str:
    """Bytes → the str of one U+0100+b character per byte (vectorised via UTF-16)."""
    return (np.frombuffer(data, dtype=np.uint8).astype("<u2") + _OFFSET).tobytes().decode("utf-16-le")


def _to_bytes(text: str) -> bytes:
    """Inverse of ``_to_text``; ValueError on a character outside U+0100..U+01FF."""
    codes = np.frombuffer(text.encode("utf-16-le"), dtype="<u2").astype(np.int64) - _OFFSET
    if codes.size and (codes.min() < 0 or codes.max() > 255):
        raise ValueError(f"bpe: token {text!r} is not a byte string")
    return codes.astype(np.uint8).tobytes()


def _id_array(ids: Any) -> np.ndarray | None:
    """Any 1-D integer sequence/array/tensor as a numpy integer array; None where it is not one."""
    try:
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        arr = np.asarray(ids)
    except (TypeError, ValueError, OverflowError, RuntimeError):
        return None
    if arr.ndim != 1:
        return None
    if arr.size == 0:
        return arr.astype(np.int64)
    return arr if arr.dtype.kind in "iu" else None


class ByteBPE:
    """Byte-level BPE over codec byte streams.

    ids 0..255 are the raw byte values, ids 256..vocab_size-1 are merges in the order learned.
    ``vocab_size == 256`` means raw bytes (identity, nothing to fit). ``vocab_size`` is what
    the LM predicts and stays as configured even when the training streams allowed fewer
    merges (``num_merges`` < vocab_size - 256, logged); unused ids then never appear.
    """

    def __init__(self, vocab_size: int = 256) -> None:
        if int(vocab_size) < 256:
            raise ValueError(f"bpe_vocab must be >= 256 (the byte values), got {vocab_size}")
        self.vocab_size = int(vocab_size)
        self.fitted = self.vocab_size == 256
        self._install([], [])

    @property
    def num_merges(self) -> int:
        """Learned tokens beyond the 256 bytes (0 before ``fit`` and for vocab 256)."""
        return len(self._lengths) - 256

    # --- tables ---------------------------------------------------------------------------
    def _install(self, tokens: list[bytes], merges: list[tuple[int, int]]) -> None:
        """Set the learned tokens (bytes of ids 256.., in id order) and the merge list (pairs of
        our ids, in rank order): numpy tables for decode, a Hugging Face encoder for encode."""
        table = [bytes([b]) for b in range(256)] + list(tokens)
        self._lengths = np.array([len(t) for t in table], dtype=np.int64)          # (n_ids,) bytes per id
        self._starts = np.concatenate([[0], np.cumsum(self._lengths)[:-1]]).astype(np.int64)
        self._table = np.frombuffer(b"".join(table), dtype=np.uint8)                 # (sum lengths,) uint8
        self._merges = list(merges)
        self._hf = None
        if tokens:
            from tokenizers import Regex, Tokenizer, models, pre_tokenizers

            vocab = {_to_text(t): i for i, t in enumerate(table)}
            pairs = [(_to_text(table[a]), _to_text(table[b])) for a, b in merges]
            hf = Tokenizer(models.BPE(vocab=vocab, merges=pairs))
            hf.pre_tokenizer = _chunker(pre_tokenizers, Regex)
            self._hf = hf

    def _check_ids(self, ids: Any) -> np.ndarray:
        """ids as an int64 array; ValueError unless all are learned ids."""
        arr = _id_array(ids)
        if arr is None or (arr.size and (arr.min() < 0 or arr.max() >= len(self._lengths))):
            raise ValueError(f"bpe: ids must be a 1-D integer sequence in [0, {len(self._lengths)})")
        return arr.astype(np.int64)

    # --- fit --------------------------------------------------------------------------------
    def fit(self, streams: Sequence[bytes]) -> dict[str, float]:
        """Learn ``vocab_size - 256`` merges on ``streams`` (deterministic: the same streams give
        the same merges). Returns ``{"tok/bpe_merges", "tok/bpe_bytes_per_token"}`` measured on
        ``streams``; {} for vocab 256."""
        if self.vocab_size == 256:
            self.fitted = True
            return {}
        from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

        hf = Tokenizer(models.BPE())
        hf.pre_tokenizer = _chunker(pre_tokenizers, Regex)
        trainer = trainers.BpeTrainer(vocab_size=self.vocab_size, min_frequency=_MIN_FREQUENCY,
                                      show_progress=False, special_tokens=[], limit_alphabet=256,
                                      initial_alphabet=[chr(_OFFSET + b) for b in range(256)])
        hf.train_from_iterator((_to_text(s) for s in streams), trainer=trainer, length=len(streams))
        model = json.loads(hf.to_str())["model"]
        by_id = sorted(model["vocab"].items(), key=lambda kv: kv[1])
        tokens = [t for t in (_to_bytes(s) for s, _ in by_id) if len(t) > 1]       # learned order
        ours = {t: i for i, t in enumerate([bytes([b]) for b in range(256)] + tokens)}
        merges = [(ours[_to_bytes(a)], ours[_to_bytes(b)]) for a, b in (_merge_pair(m) for m in model["merges"])]
        self._install(tokens, merges)
        self.fitted = True
        if self.num_merges < self.vocab_size - 256:
            log.warning("bpe: learned %d of %d merges (no pair left with count >= %d); ids %d..%d stay unused",
                        self.num_merges, self.vocab_size - 256, _MIN_FREQUENCY, 256 + self.num_merges,
                        self.vocab_size - 1)
        total_bytes = sum(len(s) for s in streams)
        total_tokens = sum(len(ids) for ids in self.encode_batch(streams))
        return {"tok/bpe_merges": float(self.num_merges),
                "tok/bpe_bytes_per_token": total_bytes / max(total_tokens, 1)}

    # --- encode / decode --------------------------------------------------------------------
    def encode(self, data: bytes) -> np.ndarray:
        """One stream → (L,) int64 ids in [0, vocab_size); L <= len(data)."""
        return self.encode_batch([data])[0]

    def encode_batch(self, streams: Sequence[bytes]) -> list[np.ndarray]:
        """Streams → a list of (L_i,) int64 id arrays (Hugging Face's parallel ``encode_batch``)."""
        if not self.fitted:
            raise RuntimeError(f"bpe: call fit() before encoding (vocab_size={self.vocab_size})")
        if self._hf is None:
            return [np.frombuffer(bytes(s), dtype=np.uint8).astype(np.int64) for s in streams]
        encodings = self._hf.encode_batch([_to_text(bytes(s)) for s in streams], add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encodings]

    def decode(self, ids: np.ndarray | Sequence[int] | torch.Tensor) -> bytes | None:
        """(L,) ids → the bytes they stand for; exact inverse of ``encode``. None (never an
        exception) if ``ids`` is not a 1-D integer sequence or holds an id outside
        [0, vocab_size) or one never learned."""
        arr = _id_array(ids)
        if arr is None:
            return None
        if arr.size == 0:
            return b""
        if arr.min() < 0 or arr.max() >= len(self._lengths):
            return None
        if self.num_merges == 0:
            return arr.astype(np.uint8).tobytes()
        lengths = self._lengths[arr]
        # Gather: token j's bytes sit at starts[id_j] .. +length_j; out position p of token j is
        # p - (bytes before j) + starts[id_j].
        shift = np.repeat(self._starts[arr] - (np.cumsum(lengths) - lengths), lengths)
        return self._table[shift + np.arange(int(lengths.sum()))].tobytes()

    def token_lengths(self, ids: np.ndarray | Sequence[int] | torch.Tensor) -> np.ndarray:
        """(L,) int64 bytes per token of ``ids``; ValueError on an id ``decode`` rejects."""
        return self._lengths[self._check_ids(ids)]

    def tokens_within(self, ids: np.ndarray | Sequence[int] | torch.Tensor, byte_cut: int) -> int:
        """The largest k such that ``ids[:k]`` decodes to at most ``byte_cut`` bytes (a byte
        offset, e.g. just past a restart marker, mapped to a token offset)."""
        return int(np.searchsorted(np.cumsum(self.token_lengths(ids)), int(byte_cut), side="right"))

    # --- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``vocab_size``, ``fitted``, ``token_bytes`` (sum,) uint8 and ``token_lengths`` (n,)
        int64 of ids 256.., ``merges`` (m, 2) int64 pairs of ids in rank order."""
        return {"vocab_size": self.vocab_size, "fitted": self.fitted,
                "token_bytes": torch.from_numpy(self._table[256:].copy()),
                "token_lengths": torch.from_numpy(self._lengths[256:].copy()),
                "merges": torch.tensor(self._merges, dtype=torch.int64).reshape(-1, 2)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``; ValueError if its vocab_size differs or it is inconsistent."""
        if int(state.get("vocab_size", -1)) != self.vocab_size:
            raise ValueError(f"bpe: state has vocab_size {state.get('vocab_size')}, this BPE {self.vocab_size}")
        data = torch.as_tensor(state["token_bytes"]).to(torch.uint8).cpu().numpy().tobytes()
        lengths = torch.as_tensor(state["token_lengths"]).to(torch.int64).cpu().tolist()
        merges = [tuple(p) for p in torch.as_tensor(state["merges"]).to(torch.int64).reshape(-1, 2).tolist()]
        if sum(lengths) != len(data) or any(n < 2 for n in lengths) or 256 + len(lengths) > self.vocab_size:
            raise ValueError("bpe: token_bytes/token_lengths of the state are inconsistent")
        ends = np.cumsum(lengths)
        tokens = [data[e - n : e] for e, n in zip(ends.tolist(), lengths)]
        n_ids = 256 + len(tokens)
        table = {t: i for i, t in enumerate([bytes([b]) for b in range(256)] + tokens)}
        if len(table) != n_ids or any(not (0 <= a < n_ids and 0 <= b < n_ids) for a, b in merges):
            raise ValueError("bpe: the state has a repeated token or a merge of an unknown id")
        if any(_token(tokens, a) + _token(tokens, b) not in table for a, b in merges):
            raise ValueError("bpe: a merge of the state makes a token it does not list")
        self._install(tokens, merges)
        self.fitted = bool(state.get("fitted", True))


def _chunker(pre_tokenizers: Any, regex: Any) -> Any:
    """The pre-tokenizer cutting a stream into ``CHUNK``-character pieces (bytes unchanged; ``.``
    matches every character we use, none of them a newline)."""
    return pre_tokenizers.Split(regex(f".{{1,{CHUNK}}}"), behavior="isolated")


def _token(tokens: list[bytes], i: int) -> bytes:
    """The bytes of our id ``i`` given the learned tokens (ids 256..)."""
    return bytes([i]) if i < 256 else tokens[i - 256]


def _merge_pair(merge: Any) -> tuple[str, str]:
    """A merge as serialized by ``tokenizers``: ``[a, b]`` (>= 0.20) or ``"a b"`` (older)."""
    if isinstance(merge, str):
        a, b = merge.split(" ")
        return a, b
    return merge[0], merge[1]
