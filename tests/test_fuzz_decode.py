"""Fuzzing the codec decoders (issue 10, "Nothing lost", item 7): JPEG and H.264 ``decode`` on
10,000 random and mutated token streams per codec never raises, never hangs and never leaks.

The streams are deterministic from ``SEED``: random ids of random lengths in [0, max_tokens],
and mutations of real streams (JPEG of ``shapes`` images, raw bytes and BPE-320; H.264 of
``moving_shapes`` clips, raw bytes and BPE): id flips, truncations, insertions, deletions,
duplicated and swapped chunks, splices of two streams, all zeros, codec markers (JPEG
``FF xx`` markers, H.264 start codes with every kind of NAL header), ids past the vocabulary
(the layout's BOS/EOS/PAD sit at vocab_size..vocab_size+2) and lengths past the ids.

Each stream is decoded alone and timed; one block of 200 streams in every 1,000 is decoded
again in one call and must give the same result (decode is per item, padding included). Resident memory is read after a
warm-up and at the end. Measured on a 2-core CPU (Pillow 13, PyAV 18, three runs): the slowest
stream took 5-70 ms for JPEG (70 once: a pause, not a stream) and 20-35 ms for H.264, RSS grew
by 0.4-4 MiB (flat over 40,000 streams: allocator pools, not a leak); 40% of the JPEG and 24%
of the H.264 streams decoded. The bounds below leave room for a slow, busy CI machine while
still catching a hang or a per-stream leak (1 KiB per stream would be ~10 MiB).
"""

from __future__ import annotations

import resource
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from lmgen.datasets import build_dataset, load_images
from lmgen.tokenizers import Decoded, ImageTokenizer, TokenBatch, build_tokenizer
from lmgen.tokenizers.base import pad_token_lists

SEED = 10
STREAMS_PER_CODEC = 10_000       # split evenly between the raw-byte and the BPE tokenizer of a codec
WARMUP = 500                     # streams decoded before the RSS baseline (allocator pools, lazy imports)
MAX_STREAM_SECONDS = 0.5         # the slowest single decode (measured: <= 70 ms)
MAX_RSS_GROWTH_MIB = 24.0        # RSS after all streams minus RSS after the warm-up (measured: <= 4 MiB)
BATCH_CHECK = 200                # streams in each batched re-decode ...
BATCH_EVERY = 5                  # ... of every 5th block of them (re-decoding all would double the time)
SIZE, FRAMES = 32, 4

# Marker-like id runs a decoder parses specially. JPEG: FF followed by SOI, EOI, SOS, SOF0/1/2/3,
# DHT, DQT, DRI, RST0..7, APP0, APP14, COM, DNL, EXP. H.264: a start code and the NAL header
# of every unit type (0x65 IDR, 0x41 slice, 0x67 SPS, 0x68 PPS, 0x06 SEI, 0x09 AUD, 0x0B end
# of stream, 0x6F subset SPS ...), some with the forbidden bit set.
JPEG_MARKERS = [[0xFF, m] for m in (0xD8, 0xD9, 0xDA, 0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xDB, 0xDD, *range(0xD0, 0xD8),
                                    0xE0, 0xEE, 0xFE, 0xDC, 0xDF, 0x00, 0xFF)]
H264_MARKERS = [[0, 0, 1, (ref << 5) | t] for t in range(32) for ref in (0, 3)] + [[0, 0, 0, 1, 0x67], [0, 0, 1, 0x87]]


def rss_mib() -> float:
    """Resident set size of this process in MiB (Linux /proc; else the peak from getrusage)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass(frozen=True)
class Fuzzed:
    """One fuzzed stream: ``ids`` (L,) int64, ``length`` given to decode (may exceed L), its kind."""

    kind: str
    ids: np.ndarray
    length: int


def _chunk(rng: np.random.Generator, n: int) -> tuple[int, int]:
    """A random [start, end) range of a length-n stream (n >= 1)."""
    start = int(rng.integers(0, n))
    return start, start + int(rng.integers(1, max(2, n // 4) + 1))


def _mutations(vocab: int, max_tokens: int, markers: list[list[int]]) -> dict[str, Callable]:
    """kind → f(rng, stream, other_stream) → ids. Streams are (L,) int64 numpy arrays, L >= 1."""

    def flip(rng, s, _):
        s = s.copy()
        s[rng.integers(0, len(s), int(rng.integers(1, 9)))] = rng.integers(0, vocab, 1)
        return s

    def insert(rng, s, _):
        pos = int(rng.integers(0, len(s) + 1))
        return np.concatenate([s[:pos], rng.integers(0, vocab, int(rng.integers(1, 17))), s[pos:]])

    def delete(rng, s, _):
        a, b = _chunk(rng, len(s))
        return np.concatenate([s[:a], s[b:]])

    def duplicate(rng, s, _):
        a, b = _chunk(rng, len(s))
        pos = int(rng.integers(0, len(s) + 1))
        return np.concatenate([s[:pos], s[a:b], s[pos:]])

    def swap(rng, s, _):
        n = int(rng.integers(1, max(2, len(s) // 3)))
        a, b = sorted(int(x) for x in rng.integers(0, max(1, len(s) - n), 2))
        s = s.copy()
        if b >= a + n:
            s[a : a + n], s[b : b + n] = s[b : b + n].copy(), s[a : a + n].copy()
        return s

    def add_markers(rng, s, _):
        for _ in range(int(rng.integers(1, 7))):
            pos = int(rng.integers(0, len(s) + 1))
            s = np.concatenate([s[:pos], markers[int(rng.integers(len(markers)))], s[pos:]])
        return s

    def out_of_range(rng, s, _):
        s = s.copy()
        bad = [-1, vocab, vocab + 1, vocab + 2, vocab + 1000, 2**40, -(2**40)]  # EOS/BOS/PAD-like, wild
        s[rng.integers(0, len(s), int(rng.integers(1, 4)))] = bad[int(rng.integers(len(bad)))]
        return s

    return {
        "random": lambda rng, s, o: rng.integers(0, vocab, int(rng.integers(0, max_tokens + 1))),
        "random_markers": lambda rng, s, o: add_markers(rng, rng.integers(0, vocab, int(rng.integers(1, max_tokens))), o),
        "zeros": lambda rng, s, o: np.zeros(int(rng.integers(0, max_tokens + 1)), dtype=np.int64),
        "valid": lambda rng, s, o: s,
        "flip": flip, "truncate": lambda rng, s, o: s[: int(rng.integers(0, len(s)))],
        "insert": insert, "delete": delete, "duplicate": duplicate, "swap": swap, "markers": add_markers,
        "splice": lambda rng, s, o: np.concatenate([s[: int(rng.integers(0, len(s)))], o[int(rng.integers(0, len(o))):]]),
        "out_of_range": out_of_range,
        "bad_length": lambda rng, s, o: s,  # the stream is fine; the length given with it is not
    }


def fuzz_streams(tok: ImageTokenizer, real: TokenBatch, n: int, seed: int) -> Iterator[Fuzzed]:
    """``n`` fuzzed streams for ``tok``, cycling through the kinds of ``_mutations``; deterministic."""
    rng = np.random.default_rng(seed)
    markers = H264_MARKERS if tok.video else JPEG_MARKERS
    kinds = _mutations(tok.vocab_size, tok.max_tokens, markers)
    pool = [real.item(i).cpu().numpy().astype(np.int64) for i in range(len(real))]
    names = list(kinds)
    for k in range(n):
        kind = names[k % len(names)]
        s, other = pool[int(rng.integers(len(pool)))], pool[int(rng.integers(len(pool)))]
        ids = np.asarray(kinds[kind](rng, s, other), dtype=np.int64)
        length = len(ids)
        if kind == "bad_length":
            length = int(rng.choice([len(ids) + int(rng.integers(1, 50)), -int(rng.integers(1, 50))]))
        yield Fuzzed(kind, ids, length)


def check_contract(tok: ImageTokenizer, out: Decoded, n: int) -> None:
    """``Decoded`` of ``n`` items with the tokenizer's image shape, uint8 images, bool valid, grey
    where invalid; video: ``frames`` in [0, T], valid exactly where a frame decoded."""
    h, w = tok.image_size
    shape = (n, tok.frames, 3, h, w) if tok.video else (n, 3, h, w)
    assert tuple(out.images.shape) == shape and out.images.dtype == torch.uint8
    assert tuple(out.valid.shape) == (n,) and out.valid.dtype == torch.bool
    assert bool((out.images[~out.valid] == 128).all())
    if tok.video:
        assert out.frames is not None and bool(((out.frames >= 0) & (out.frames <= tok.frames)).all())
        assert torch.equal(out.valid, out.frames > 0)


def one(stream: Fuzzed) -> TokenBatch:
    return TokenBatch(ids=torch.from_numpy(stream.ids).view(1, -1), lengths=torch.tensor([stream.length]))


def batch(streams: list[Fuzzed]) -> TokenBatch:
    """The streams right-padded into one batch. A length past a stream's own ids moves past the
    padded width too: within it, the padding zeros would be ids of that stream."""
    padded = pad_token_lists([torch.from_numpy(s.ids) for s in streams])
    width = padded.ids.shape[1]
    lengths = [s.length if s.length <= len(s.ids) else width + s.length - len(s.ids) for s in streams]
    return TokenBatch(ids=padded.ids, lengths=torch.tensor(lengths))


@dataclass(frozen=True)
class FuzzStats:
    """What a fuzz run saw: streams and valid decodes per kind, the slowest decode, RSS growth."""

    streams: Counter
    valid: Counter
    slowest_s: float
    slowest_kind: str
    rss_growth_mib: float
    seconds: float


def run_fuzz(tokenizers: list[tuple[ImageTokenizer, TokenBatch]], n: int, seed: int) -> FuzzStats:
    """Decode ``n`` fuzzed streams split evenly between ``tokenizers`` ((tokenizer, real streams)
    pairs), one stream per call, checking the contract of each; every ``BATCH_EVERY``-th block
    of ``BATCH_CHECK`` streams is also decoded in one call, which must agree item for item."""
    streams, valid = Counter(), Counter()
    slowest, slowest_kind, baseline, decoded = 0.0, "", None, 0
    start = time.perf_counter()
    for j, (tok, real) in enumerate(tokenizers):
        pending: list[tuple[Fuzzed, Decoded]] = []
        for stream in fuzz_streams(tok, real, n // len(tokenizers), seed + j):
            t0 = time.perf_counter()
            out = tok.decode(one(stream))
            took = time.perf_counter() - t0
            check_contract(tok, out, 1)
            if took > slowest:
                slowest, slowest_kind = took, stream.kind
            streams[stream.kind] += 1
            valid[stream.kind] += int(out.valid[0])
            if (decoded // BATCH_CHECK) % BATCH_EVERY == 0:
                pending.append((stream, out))
            if len(pending) == BATCH_CHECK:
                _check_batch_agrees(tok, pending)
                pending = []
            decoded += 1
            if decoded == WARMUP:
                baseline = rss_mib()
    assert baseline is not None, "fewer streams than the warm-up"
    return FuzzStats(streams, valid, slowest, slowest_kind, rss_mib() - baseline, time.perf_counter() - start)


def _check_batch_agrees(tok: ImageTokenizer, pending: list[tuple[Fuzzed, Decoded]]) -> None:
    """One call on every pending stream gives what the calls one at a time gave."""
    together = tok.decode(batch([s for s, _ in pending]))
    check_contract(tok, together, len(pending))
    alone = [out for _, out in pending]
    assert torch.equal(together.valid, torch.cat([o.valid for o in alone]))
    assert torch.equal(together.images, torch.cat([o.images for o in alone]))


# --- the tokenizers under fuzz ---------------------------------------------------------------


def _data(name: str, n: int, frames: int = 0) -> torch.Tensor:
    cfg = {"name": name, "image_size": SIZE, "train_size": n, "val_size": n, **({"frames": frames} if frames else {})}
    return load_images(build_dataset(cfg, "train"), n)


@pytest.fixture(scope="module")
def jpeg_pairs() -> list[tuple[ImageTokenizer, TokenBatch]]:
    images = _data("shapes", 64)
    raw = build_tokenizer({"name": "jpeg"}, SIZE)
    bpe = build_tokenizer({"name": "jpeg", "bpe_vocab": 320}, SIZE)
    bpe.fit(images)
    return [(tok, tok.encode(images[:16])) for tok in (raw, bpe)]


@pytest.fixture(scope="module")
def h264_pairs() -> list[tuple[ImageTokenizer, TokenBatch]]:
    clips = _data("moving_shapes", 24, frames=FRAMES)
    raw = build_tokenizer({"name": "h264"}, SIZE, frames=FRAMES)
    bpe = build_tokenizer({"name": "h264", "bpe_vocab": 320}, SIZE, frames=FRAMES)
    bpe.fit(clips)
    return [(tok, tok.encode(clips[:8])) for tok in (raw, bpe)]


@pytest.mark.timeout(180)  # a hang fails here, not at the suite's 15-minute limit
@pytest.mark.parametrize("codec", ["jpeg", "h264"])
def test_decode_survives_10k_fuzzed_streams(codec: str, request: pytest.FixtureRequest) -> None:
    pairs = request.getfixturevalue(f"{codec}_pairs")
    stats = run_fuzz(pairs, STREAMS_PER_CODEC, SEED)
    assert sum(stats.streams.values()) == STREAMS_PER_CODEC
    assert stats.slowest_s < MAX_STREAM_SECONDS, f"slowest decode {stats.slowest_s:.3f} s ({stats.slowest_kind})"
    assert stats.rss_growth_mib < MAX_RSS_GROWTH_MIB, f"RSS grew {stats.rss_growth_mib:.1f} MiB"
    # Not vacuous: real streams decode, mutants reach the decoder both ways, garbage never decodes.
    assert stats.valid["valid"] == stats.streams["valid"]
    assert 0 < stats.valid["flip"] < stats.streams["flip"]
    for kind in ("out_of_range", "bad_length", "zeros"):
        assert stats.valid[kind] == 0, kind


def test_fuzz_streams_are_deterministic_and_cover_every_kind(jpeg_pairs) -> None:
    tok, real = jpeg_pairs[0]
    a, b = list(fuzz_streams(tok, real, 300, SEED)), list(fuzz_streams(tok, real, 300, SEED))
    assert [(s.kind, s.length, s.ids.tolist()) for s in a] == [(s.kind, s.length, s.ids.tolist()) for s in b]
    kinds = Counter(s.kind for s in a)
    assert set(kinds) == set(_mutations(256, 10, JPEG_MARKERS)) and min(kinds.values()) >= 20
    assert all(s.kind == "bad_length" or s.length == len(s.ids) for s in a)
    assert max(len(s.ids) for s in a if s.kind == "random") <= tok.max_tokens
    assert any(s.kind != "valid" and not np.array_equal(s.ids, real.item(0).numpy()) for s in a)
