"""Byte-level BPE over codec streams (JPEG-LM's vocabulary extension) and its JPEG integration."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lmgen.config import ConfigError, load_config
from lmgen.datasets import build_dataset, load_images
from lmgen.tokenizers import TokenBatch, build_tokenizer
from lmgen.tokenizers.bpe import ByteBPE
from lmgen.tokenizers.jpeg import restart_prefix_length

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32


def shapes(split: str, n: int, size: int = SIZE) -> torch.Tensor:
    """(n, 3, size, size) uint8 images of the procedural ``shapes`` dataset."""
    cfg = {"name": "shapes", "image_size": size, "train_size": n, "val_size": n}
    return load_images(build_dataset(cfg, split), n)


def stream_bytes(tokens: TokenBatch) -> list[bytes]:
    """The byte streams of a raw-byte (vocab 256) TokenBatch."""
    return [tokens.item(i).to(torch.uint8).numpy().tobytes() for i in range(len(tokens))]


@pytest.fixture(scope="module")
def data() -> dict:
    """JPEG q25 streams of 300 train and 64 held-out 32×32 shapes images, plus a BPE-320 fit on the train ones."""
    raw = build_tokenizer({"name": "jpeg"}, SIZE)
    train_images, val_images = shapes("train", 300), shapes("val", 64)
    train, val = stream_bytes(raw.encode(train_images)), stream_bytes(raw.encode(val_images))
    bpe = ByteBPE(320)
    stats = bpe.fit(train)
    return {"raw": raw, "train_images": train_images, "val_images": val_images, "train": train, "val": val,
            "bpe": bpe, "stats": stats}


def edge_streams() -> list[bytes]:
    rng = np.random.default_rng(0)
    return [b"", b"\x00", b"\xff", bytes(range(256)), bytes(range(255, -1, -1)), b"\x00" * 3000, b"\xff" * 2500,
            rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(), "é ünïcode\n\t ".encode(), b"\x80\xc3(\xed\xa0\x80"]


# --- round trips --------------------------------------------------------------------------


@pytest.mark.parametrize("fitted", [True, False], ids=["bpe320", "raw256"])
def test_round_trip_is_exact(data: dict, fitted: bool) -> None:
    bpe = data["bpe"] if fitted else ByteBPE(256)
    streams = edge_streams() + data["val"][:8]
    encoded = bpe.encode_batch(streams)
    for s, ids in zip(streams, encoded):
        assert ids.dtype == np.int64 and ids.ndim == 1 and len(ids) <= len(s)
        assert np.array_equal(ids, bpe.encode(s))
        assert ((ids >= 0) & (ids < bpe.vocab_size)).all()
        assert bpe.decode(ids) == s
        assert bpe.decode(torch.from_numpy(ids)) == s and bpe.decode(ids.tolist()) == s
        assert int(bpe.token_lengths(ids).sum()) == len(s)
    if not fitted:
        assert all(np.array_equal(ids, np.frombuffer(s, np.uint8)) for s, ids in zip(streams, encoded))


def test_first_256_ids_are_the_bytes(data: dict) -> None:
    bpe = data["bpe"]
    assert bpe.vocab_size == 320 and bpe.num_merges == 64
    assert all(bpe.decode([b]) == bytes([b]) for b in range(256))
    assert all(len(bpe.decode([i])) >= 2 for i in range(256, 320))
    text = ByteBPE(300)
    text.fit([b"the cat sat on the mat " * 20, b"a cat and a hat " * 20])
    assert text.num_merges > 0
    stream = b"\x00\xff\x00\xffthe cat\x80\x81" + bytes(range(256))      # mostly bytes never seen in training
    ids = text.encode(stream)
    assert ids[:4].tolist() == [0, 255, 0, 255] and ids[-256:].tolist() == list(range(256))
    assert int(ids.max()) >= 256 and text.decode(ids) == stream


def test_bpe_shortens_held_out_jpeg_streams(data: dict) -> None:
    bpe, val = data["bpe"], data["val"]
    ratio = sum(map(len, val)) / sum(len(ids) for ids in bpe.encode_batch(val))
    assert ratio > 1.3, ratio                            # measured 1.6 (32×32 q25, 300 train streams)
    assert data["stats"]["tok/bpe_merges"] == 64
    assert data["stats"]["tok/bpe_bytes_per_token"] > 1.3


# --- determinism and state ----------------------------------------------------------------


def _state_digest(bpe: ByteBPE) -> str:
    buf = io.BytesIO()
    torch.save({k: bpe.state_dict()[k] for k in ("vocab_size", "token_bytes", "token_lengths", "merges")}, buf)
    return hashlib.sha256(buf.getvalue()).hexdigest()


def test_fit_is_deterministic_within_and_across_processes(data: dict, tmp_path: Path) -> None:
    again = ByteBPE(320)
    again.fit(data["train"])
    assert _state_digest(again) == _state_digest(data["bpe"])
    np.save(tmp_path / "train.npy", np.array(data["train"], dtype=object), allow_pickle=True)
    script = ("import hashlib, io, sys, numpy as np, torch\n"
              "from lmgen.tokenizers.bpe import ByteBPE\n"
              f"streams = list(np.load(r'{tmp_path / 'train.npy'}', allow_pickle=True))\n"
              "b = ByteBPE(320); b.fit(streams); buf = io.BytesIO()\n"
              "torch.save({k: b.state_dict()[k] for k in ('vocab_size', 'token_bytes', 'token_lengths', 'merges')}, "
              "buf)\n"
              "sys.stdout.write(hashlib.sha256(buf.getvalue()).hexdigest())\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out == _state_digest(data["bpe"])


def test_state_round_trip_through_torch_save(data: dict, tmp_path: Path) -> None:
    bpe = data["bpe"]
    torch.save(bpe.state_dict(), tmp_path / "bpe.pt")
    restored = ByteBPE(320)
    with pytest.raises(RuntimeError, match="fit"):
        restored.encode(b"\xff\xd8")
    restored.load_state_dict(torch.load(tmp_path / "bpe.pt", weights_only=False))
    assert restored.num_merges == bpe.num_merges
    streams = data["val"] + edge_streams()
    assert all(np.array_equal(a, b) for a, b in zip(restored.encode_batch(streams), bpe.encode_batch(streams)))
    ids = bpe.encode(data["val"][0])
    assert restored.decode(ids) == data["val"][0]
    with pytest.raises(ValueError, match="vocab_size"):
        ByteBPE(1024).load_state_dict(bpe.state_dict())
    bad = dict(bpe.state_dict(), token_lengths=bpe.state_dict()["token_lengths"] + 1)
    with pytest.raises(ValueError, match="inconsistent"):
        ByteBPE(320).load_state_dict(bad)


def test_identity_and_bad_sizes() -> None:
    raw = ByteBPE()
    assert raw.vocab_size == 256 and raw.num_merges == 0 and raw.fit([b"abcabc"]) == {}
    restored = ByteBPE(256)
    restored.load_state_dict(raw.state_dict())
    assert np.array_equal(restored.encode(b"\x00\xff"), [0, 255])
    with pytest.raises(ValueError, match="bpe_vocab"):
        ByteBPE(255)


def test_few_learnable_merges_keep_vocab_size(caplog: pytest.LogCaptureFixture) -> None:
    bpe = ByteBPE(1000)
    stats = bpe.fit([b"abab" * 4])               # pairs: ab, then abab, ... far fewer than 744
    assert bpe.vocab_size == 1000 and 0 < bpe.num_merges < 10 and stats["tok/bpe_merges"] == bpe.num_merges
    assert "learned" in caplog.text
    assert bpe.decode([256 + bpe.num_merges]) is None and bpe.decode([999]) is None   # never learned
    assert bpe.decode(bpe.encode(b"abababab\x00")) == b"abababab\x00"


# --- untrusted ids ------------------------------------------------------------------------


@pytest.mark.parametrize("ids", [[-1], [0, 320], [2**31], [2**63 - 1], [2**70], [-(2**70)], np.array([2**64 - 1],
                                 dtype=np.uint64), torch.tensor([5, -3]), torch.tensor([1.0, 2.0]), [[1, 2]], "ab",
                                 None, 3, [1.5], object()])
def test_decode_rejects_bad_ids_without_raising(data: dict, ids: object) -> None:
    assert data["bpe"].decode(ids) is None
    assert ByteBPE(256).decode(ids) is None


def test_decode_random_ids_never_raises(data: dict) -> None:
    g = np.random.default_rng(1)
    for bpe in (data["bpe"], ByteBPE(256)):
        for _ in range(50):
            ids = g.integers(-5, 400, g.integers(0, 300))
            out = bpe.decode(ids)
            assert (out is None) == bool(((ids < 0) | (ids >= 256 + bpe.num_merges)).any())


# --- offsets ------------------------------------------------------------------------------


def test_tokens_within_known_answers(data: dict) -> None:
    bpe = data["bpe"]
    two = next(i for i in range(256, 320) if len(bpe.decode([i])) == 2)
    ids = np.array([65, two, 66, two])                 # token byte lengths 1, 2, 1, 2 → ends 1, 3, 4, 6
    assert bpe.token_lengths(ids).tolist() == [1, 2, 1, 2]
    assert [bpe.tokens_within(ids, c) for c in range(8)] == [0, 1, 1, 2, 3, 3, 4, 4]
    assert ByteBPE(256).tokens_within([1, 2, 3], 2) == 2 and bpe.tokens_within([], 5) == 0
    with pytest.raises(ValueError):
        bpe.token_lengths([400])


# --- the JPEG tokenizer ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def jpeg_bpe(data: dict) -> dict:
    tok = build_tokenizer({"name": "jpeg", "bpe_vocab": 320}, SIZE)
    stats = tok.fit(data["train_images"])
    return {"tok": tok, "stats": stats}


def test_jpeg_bpe_decodes_what_raw_bytes_decode(data: dict, jpeg_bpe: dict) -> None:
    tok, raw, images = jpeg_bpe["tok"], data["raw"], data["val_images"][:16]
    assert tok.vocab_size == 320 and raw.vocab_size == 256 and tok.max_tokens == raw.max_tokens
    assert jpeg_bpe["stats"]["tok/bpe_merges"] == 64
    a, b = raw.encode(images), tok.encode(images)
    assert (b.lengths < a.lengths).all() and int(b.ids.max()) < 320 and int(b.ids.max()) >= 256
    decoded_raw, decoded_bpe = raw.decode(a), tok.decode(b)
    assert decoded_bpe.valid.all() and torch.equal(decoded_raw.images, decoded_bpe.images)
    assert all(tok.bpe.decode(b.item(i).numpy()) == s for i, s in enumerate(stream_bytes(a)))
    bad = TokenBatch(ids=torch.tensor([[0xFF, 0xD8, 320, 5]]), lengths=torch.tensor([4]))
    assert not bool(tok.decode(bad).valid[0])          # out of vocabulary: invalid, no exception


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_jpeg_bpe_prefix_ends_at_or_before_the_restart_marker(data: dict, jpeg_bpe: dict, ratio: float) -> None:
    tok, raw, images = jpeg_bpe["tok"], data["raw"], data["val_images"][:16]
    tokens, raw_tokens = tok.encode(images), raw.encode(images)
    cuts, byte_cuts = tok.prefix_lengths(tokens, ratio), raw.prefix_lengths(raw_tokens, ratio)
    for i, stream in enumerate(stream_bytes(raw_tokens)):
        assert int(byte_cuts[i]) == restart_prefix_length(stream, ratio)
        prompt = tok.bpe.decode(tokens.item(i)[: int(cuts[i])].numpy())
        assert stream.startswith(prompt) and len(prompt) <= int(byte_cuts[i])
        nxt = tok.bpe.decode(tokens.item(i)[: int(cuts[i]) + 1].numpy())
        assert len(nxt) > int(byte_cuts[i])            # the largest such prefix


def test_jpeg_bpe_state_and_label(data: dict, jpeg_bpe: dict, tmp_path: Path) -> None:
    tok = jpeg_bpe["tok"]
    torch.save(tok.state_dict(), tmp_path / "state.pt")
    fresh = build_tokenizer({"name": "jpeg", "bpe_vocab": 320}, SIZE)
    fresh.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=False))
    images = data["val_images"][:8]
    assert torch.equal(fresh.encode(images).ids, tok.encode(images).ids)
    with pytest.raises(ValueError, match="bpe"):
        fresh.load_state_dict(data["raw"].state_dict())               # a raw-byte state has no merges
    with pytest.raises(ValueError, match="bpe_vocab=0"):
        build_tokenizer({"name": "jpeg"}, SIZE).load_state_dict(tok.state_dict())
    assert "bpe" not in data["raw"].state_dict()                      # raw states are unchanged
    assert tok.cfg.label() == "jpeg q25 bpe320" and data["raw"].cfg.label() == "jpeg q25"


@pytest.mark.parametrize("bad", [1, 100, 256, -5])
def test_jpeg_bad_bpe_vocab_is_named(bad: int) -> None:
    with pytest.raises(ValueError, match=r"^jpeg\.bpe_vocab"):
        build_tokenizer({"name": "jpeg", "bpe_vocab": bad}, SIZE)


def test_config_error_names_tokenizer_bpe_vocab() -> None:
    with pytest.raises(ConfigError, match=r"tokenizer\.bpe_vocab"):
        load_config(None, ["tokenizer.name=jpeg", "tokenizer.bpe_vocab=100"])
    cfg = load_config(ROOT / "experiments/tokenizers/jpeg_q25_bpe320.yaml")
    assert cfg.tokenizer.bpe_vocab == 320
