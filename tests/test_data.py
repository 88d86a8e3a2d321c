"""Sequence layout and token cache contracts."""

from __future__ import annotations

import functools
import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import lmgen.files
from lmgen.config import load_config
from lmgen.data import SequenceCollator, SequenceLayout, TokenCache, TokenDataModule, TokenRows
from lmgen.datasets import MovingShapesDataset, ShapesDataset
from lmgen.experiment import run_experiment
from lmgen.progress import CountProgress
from lmgen.tokenizers import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_layout_specials_sit_past_the_vocabulary():
    layout = SequenceLayout(vocab_size=256, max_tokens=10, num_classes=10, variable_length=True)
    specials = [layout.bos, layout.eos, layout.pad, *range(layout.class_offset, layout.null_class + 1)]
    assert min(specials) == 256 and len(set(specials)) == len(specials)
    assert layout.total_vocab == max(specials) + 1 == 256 + 3 + 10 + 1
    assert layout.seq_len == 12


def test_variable_length_sequences_end_with_eos_then_pad():
    layout = SequenceLayout(vocab_size=256, max_tokens=4, num_classes=3, variable_length=True)
    ids = torch.tensor([[5, 6, 7, 0], [9, 0, 0, 0]])
    seq = layout.sequences(ids, torch.tensor([3, 1]), torch.tensor([2, 0]))
    p, e = layout.pad, layout.eos
    assert seq.tolist() == [[layout.class_offset + 2, 5, 6, 7, e, p],
                            [layout.class_offset + 0, 9, e, p, p, p]]
    assert layout.allowed()[e] and not layout.allowed()[layout.pad] and layout.allowed()[:256].all()


def test_fixed_length_sequences_have_no_eos_and_bos_when_unconditional():
    layout = SequenceLayout(vocab_size=8, max_tokens=3, num_classes=2, variable_length=False,
                            class_conditional=False)
    seq = layout.sequences(torch.tensor([[1, 2, 3]]), torch.tensor([3]), torch.tensor([1]))
    assert seq.tolist() == [[layout.bos, 1, 2, 3]]
    assert not layout.allowed()[layout.eos]
    assert layout.null_tokens(2).flatten().tolist() == [layout.bos, layout.bos]


@pytest.mark.parametrize("variable_length", [True, False])
def test_sequences_match_the_masked_reference(variable_length):
    """Random ids and lengths: PAD exactly past each length, EOS right after it for streams."""
    layout = SequenceLayout(vocab_size=50, max_tokens=9, num_classes=4, variable_length=variable_length)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (6, 9), generator=g)
    lengths = torch.randint(1, 10, (6,), generator=g) if variable_length else torch.full((6,), 9)
    labels = torch.randint(0, 4, (6,), generator=g)
    expected = torch.full((6, 10 + int(variable_length)), layout.pad)
    expected[:, 0] = labels + layout.class_offset
    for i, n in enumerate(lengths.tolist()):
        expected[i, 1 : 1 + n] = ids[i, :n]
        if variable_length:
            expected[i, 1 + n] = layout.eos
    assert torch.equal(layout.sequences(ids, lengths, labels), expected)


def test_collator_trims_and_shifts():
    layout = SequenceLayout(vocab_size=256, max_tokens=6, num_classes=3, variable_length=True)
    items = [(torch.tensor([1, 2, 3, 0, 0, 0]), 3, 1), (torch.tensor([4, 0, 0, 0, 0, 0]), 1, 2)]
    batch = SequenceCollator(layout)(items)
    assert batch.inputs.shape == batch.targets.shape == (2, 4)  # cond + 3 tokens + EOS - 1
    assert batch.targets[0].tolist() == [1, 2, 3, layout.eos]
    assert batch.targets[1].tolist() == [4, layout.eos, layout.pad, layout.pad]
    assert batch.inputs[:, 0].tolist() == [layout.class_offset + 1, layout.class_offset + 2]


class CorruptEvery3rd(torch.utils.data.Dataset):
    """A dataset whose every third item is unreadable (None), like a folder with bad files."""

    def __init__(self, n: int = 20) -> None:
        self.inner = ShapesDataset("train", n, seed=3)

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i):
        return None if i % 3 == 0 else self.inner[i]


@pytest.mark.parametrize("name", ["jpeg", "pixels"])
def test_token_cache_roundtrip_reuse_and_skips(tmp_path, name):
    dataset = CorruptEvery3rd(20)
    tokenizer = build_tokenizer({"name": name}, 32)
    cache = TokenCache.build_or_load(tmp_path, "k1", dataset, tokenizer, batch_size=8, shard_size=5)
    good = [i for i in range(20) if i % 3]
    assert len(cache) == len(good) and cache.skipped == 20 - len(good)
    assert len(cache.meta["shards"]) > 1  # several memory-mapped shards
    assert cache.indices.tolist() == good
    for row, index in enumerate(good):
        image, label = dataset[index]
        ids, length, cached_label = cache[row]
        expected = tokenizer.encode(image[None])
        assert length == int(expected.lengths[0]) and cached_label == label
        assert torch.equal(ids[:length], expected.item(0))
    # A second build with the same key reads the files instead of encoding again.
    mtime = (tmp_path / "k1" / "meta.json").stat().st_mtime_ns
    again = TokenCache.build_or_load(tmp_path, "k1", dataset, tokenizer)
    assert (tmp_path / "k1" / "meta.json").stat().st_mtime_ns == mtime and len(again) == len(cache)
    assert isinstance(again._ids[0], np.memmap)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_token_cache_with_no_usable_items_fails_clearly(tmp_path):
    class AllBad(CorruptEvery3rd):
        def __getitem__(self, i):
            return None

    with pytest.raises(ValueError, match="no usable items"):
        TokenCache.build_or_load(tmp_path, "bad", AllBad(6), build_tokenizer({"name": "pixels"}, 32))
    assert not (tmp_path / "bad").exists()


def test_datamodule_batches(tmp_path):
    tokenizer = build_tokenizer({"name": "jpeg"}, 32)
    cache = TokenCache.build_or_load(tmp_path, "dm", ShapesDataset("train", 12, seed=0), tokenizer)
    layout = SequenceLayout(256, tokenizer.max_tokens, 10, True)
    dm = TokenDataModule(cache, cache, layout, batch_size=4)
    batch = next(iter(dm.train_dataloader()))
    assert batch.inputs.shape[0] == 4 and batch.inputs.shape[1] <= layout.seq_len - 1
    assert (batch.targets == layout.eos).sum() == 4


class PerItem(torch.utils.data.Dataset):
    """A token cache read the old way: no ``__getitems__``, so the DataLoader fetches one item
    at a time and the collator stacks (ids, length, label) tuples."""

    def __init__(self, cache: TokenCache) -> None:
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int):
        return self.cache[i]


def _epochs(loader, n: int = 2) -> list:
    return [batch for _ in range(n) for batch in loader]


@pytest.mark.parametrize(("name", "workers", "shard_size"),
                         [("pixels", 0, 7), ("pixels", 0, 1000), ("jpeg", 0, 7), ("jpeg", 2, 1000)])
def test_batch_reads_equal_per_item_reads(tmp_path, name, workers, shard_size):
    """``__getitems__`` + the batch collator give the very batches, order and shuffle of the
    per-item path: fixed grids and variable-length streams, several shards, the seeded train
    shuffle over two epochs with ``drop_last``, and the val loader; one shard or several."""
    tokenizer = build_tokenizer({"name": name, "palette_size": 16} if name == "pixels" else {"name": name}, 32)
    dataset = CorruptEvery3rd(38)
    if name == "pixels":
        tokenizer.fit(torch.stack([dataset.inner[i][0] for i in range(8)]))
    cache = TokenCache.build_or_load(tmp_path, name, dataset, tokenizer, batch_size=8, shard_size=shard_size)
    assert (len(cache.meta["shards"]) > 2) == (shard_size < len(cache)) and len(cache) % 4  # drop_last drops some
    layout = SequenceLayout(tokenizer.vocab_size, tokenizer.max_tokens, 10, tokenizer.variable_length)
    fast = TokenDataModule(cache, cache, layout, batch_size=4, seed=5, num_workers=workers)
    slow = TokenDataModule(PerItem(cache), PerItem(cache), layout, batch_size=4, seed=5, num_workers=workers)
    for new, old, n in [(fast.train_dataloader(), slow.train_dataloader(), len(cache) // 4),
                        (fast.val_dataloader(), slow.val_dataloader(), -(-len(cache) // 4))]:
        new_batches, old_batches = _epochs(new), _epochs(old)
        assert len(new_batches) == len(old_batches) == 2 * n
        for a, b in zip(new_batches, old_batches):
            assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
            assert torch.equal(a.labels, b.labels)
    rows = cache.__getitems__([9, 0, 9, len(cache) - 1])  # out of order, repeated, across shards
    assert isinstance(rows, TokenRows) and rows.ids.dtype == torch.int64
    items = [cache[i] for i in (9, 0, 9, len(cache) - 1)]
    assert rows.lengths.tolist() == [n for _, n, _ in items] and rows.labels.tolist() == [c for _, _, c in items]
    assert rows.ids.shape[1] == max(n for _, n, _ in items)
    assert all(torch.equal(rows.ids[j], ids[: rows.ids.shape[1]]) for j, (ids, _, _) in enumerate(items))


def test_token_cache_pickles_without_its_shards(tmp_path):
    cache = TokenCache.build_or_load(tmp_path, "p", ShapesDataset("train", 6, seed=0), build_tokenizer({"name": "pixels"}, 32))
    assert len(pickle.dumps(cache)) < cache._ids[0].nbytes  # the memmaps reopen, their bytes do not travel
    clone = pickle.loads(pickle.dumps(cache))
    assert isinstance(clone._ids[0], np.memmap) and torch.equal(clone[3][0], cache[3][0])


def _cache_files(root) -> dict[str, bytes]:
    (path,) = [p for p in root.iterdir() if not p.name.startswith(".")]
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())}


@pytest.mark.parametrize("case", ["pixels", "pixels-palette", "jpeg-bpe", "h264"])
def test_cache_encoded_in_workers_is_byte_identical(tmp_path, case):
    """Codec and pixel tokenizers encode in the DataLoader's workers (``encode_in_workers``):
    the cache they write is the one the main process writes, byte for byte, skips and all."""
    if case == "h264":
        dataset, tokenizer = MovingShapesDataset("train", 6, seed=0, frames=3), build_tokenizer({"name": "h264"}, 32, 3)
    else:
        dataset = CorruptEvery3rd(20)
        fields = {"pixels": {"name": "pixels"}, "pixels-palette": {"name": "pixels", "palette_size": 16},
                  "jpeg-bpe": {"name": "jpeg", "bpe_vocab": 300}}[case]
        tokenizer = build_tokenizer(fields, 32)
        tokenizer.fit(torch.stack([dataset.inner[i][0] for i in range(8)]))
    assert tokenizer.encode_in_workers
    files = {}
    for workers in (0, 2):
        # batch_size 2: a batch of two unreadable items meets the worker's empty-batch path
        TokenCache.build_or_load(tmp_path / str(workers), "k", dataset, tokenizer, batch_size=2,
                                 num_workers=workers, shard_size=5)
        files[workers] = _cache_files(tmp_path / str(workers))
    assert files[0] == files[2] and len(files[0]) > 4


# --- damaged caches (issue 24, item 5) ---------------------------------------------------


def _damage(cache_dir, how: str) -> None:
    """Damage a real cache the ways disks and crashes do: a file cut short, bytes garbled in
    place (same size), meta.json gone, or a cache written before lmgen kept checksums."""
    shard = cache_dir / "ids-00001.npy"
    if how == "truncated-shard":
        os.truncate(shard, shard.stat().st_size // 2)
    elif how in ("garbled-shard", "garbled-lengths"):
        path = shard if how == "garbled-shard" else cache_dir / "lengths.npy"
        data = bytearray(path.read_bytes())
        data[128:] = np.random.default_rng(0).integers(0, 256, len(data) - 128, dtype=np.uint8).tobytes()  # past the header
        path.write_bytes(bytes(data))
    elif how == "no-meta":
        (cache_dir / "meta.json").unlink()
    elif how == "no-checksums":
        meta = json.loads((cache_dir / "meta.json").read_text())
        del meta["files"]
        (cache_dir / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("how", ["truncated-shard", "garbled-shard", "garbled-lengths", "no-meta", "no-checksums"])
def test_a_damaged_token_cache_is_rebuilt_with_the_same_tokens(tmp_path, caplog, how):
    """Before: a truncated shard raised ``ValueError: mmap length ...`` on every rerun, a garbled
    one fed wrong ids (an IndexError at step 1, or silently wrong tokens), a missing meta.json
    crashed. Now the cache is checked against its manifest, discarded with a warning and encoded
    again: the same bytes as the clean cache, no temporary directory left."""
    dataset, tokenizer = CorruptEvery3rd(20), build_tokenizer({"name": "pixels"}, 32)
    clean = TokenCache.build_or_load(tmp_path, "k", dataset, tokenizer, batch_size=8, shard_size=5)
    before, rows = _cache_files(tmp_path), [clean[i] for i in range(len(clean))]
    _damage(tmp_path / "k", how)
    with caplog.at_level(logging.WARNING, logger="lmgen.data"):
        again = TokenCache.build_or_load(tmp_path, "k", dataset, tokenizer, batch_size=8, shard_size=5)
    assert any("damaged" in r.getMessage() for r in caplog.records)
    assert _cache_files(tmp_path) == before and list(tmp_path.iterdir()) == [tmp_path / "k"]
    assert all(torch.equal(a[0], b[0]) and a[1:] == b[1:] for a, b in zip(rows, (again[i] for i in range(len(again)))))


def test_token_cache_checks_cost_a_hash_once_per_process(tmp_path, monkeypatch):
    """A cache hit checks sizes always and each file's SHA-256 once per process: the process that
    wrote the cache hashed it then (no second hash), a new process hashes each file once."""
    hashed = []
    real = lmgen.files._hash_file
    monkeypatch.setattr(lmgen.files, "_hash_file", lambda path: hashed.append(path.name) or real(path))
    dataset, tokenizer = ShapesDataset("train", 12, seed=0), build_tokenizer({"name": "pixels"}, 32)
    TokenCache.build_or_load(tmp_path, "k", dataset, tokenizer, batch_size=5, shard_size=5)
    files = sorted(hashed)
    assert files == ["ids-00000.npy", "ids-00001.npy", "ids-00002.npy", "indices.npy", "labels.npy", "lengths.npy"]
    TokenCache.build_or_load(tmp_path, "k", dataset, tokenizer, shard_size=5)
    assert sorted(hashed) == files  # the hit: sizes only
    monkeypatch.setattr(lmgen.files, "_DIGESTS", {})  # what a new process starts with
    TokenCache.build_or_load(tmp_path, "k", dataset, tokenizer, shard_size=5)
    TokenCache.build_or_load(tmp_path, "k", dataset, tokenizer, shard_size=5)
    assert sorted(hashed) == sorted(files * 2)


def test_a_run_over_a_truncated_and_a_garbled_cache_rebuilds_them_and_finishes_as_on_a_clean_one(lmgen_home):
    """The whole run: a clean run; then its train cache's shard cut short (before: ``ValueError:
    mmap length is greater than file size`` at load, on every rerun) and its val cache's garbled
    in place (before: ids past the vocabulary, an ``IndexError`` in the first step's validation).
    The rerun rebuilds both caches and finishes with the clean run's tokens and losses."""
    cfg = load_config(ROOT / "experiments/base.yaml", [
        "tokenizer=pixels_palette64", "data.train_size=16", "data.val_size=8", "data.image_size=8", "lm.size=nano",
        "train.budget=steps", "train.max_steps=2", "train.val_every=2", "train.batch_size=8", "train.warmup_steps=1",
        "sample.num_samples=0", "metrics.prefix_samples=0", "metrics.probe=false", "train.precision=32-true",
        "train.checkpoint=false"])
    clean = run_experiment(cfg)
    shards = [next((lmgen_home / "cache").glob(f"{split}-*")) / "ids-00000.npy" for split in ("train", "val")]
    tokens = [shard.read_bytes() for shard in shards]
    os.truncate(shards[0], len(tokens[0]) - 100)
    shards[1].write_bytes(tokens[1][:128] + bytes([255]) * (len(tokens[1]) - 128))  # ids 65535: past the vocabulary
    rerun = run_experiment(cfg)
    assert [shard.read_bytes() for shard in shards] == tokens
    assert rerun.metrics["lm/val_loss"] == clean.metrics["lm/val_loss"] and rerun.run_id != clean.run_id


def test_writing_a_token_cache_says_what_it_encodes_as_it_goes(tmp_path, caplog, monkeypatch):
    """A line as the cache starts (key, items), a count line every ``every_s`` seconds (here every
    batch) and one with its wall time at the end; a cache hit says so in one line."""
    monkeypatch.setattr(CountProgress, "__init__", functools.partialmethod(CountProgress.__init__, every_s=0.0))
    dataset, tokenizer = ShapesDataset("train", 20, seed=0), build_tokenizer({"name": "pixels"}, 32)
    with caplog.at_level(logging.INFO):
        TokenCache.build_or_load(tmp_path, "train-abc", dataset, tokenizer, batch_size=8)
    lines = [r.getMessage() for r in caplog.records if "token cache" in r.getMessage()]
    assert lines[0] == "token cache train-abc: encoding 20 items…"
    assert "token cache train-abc: 8/20 items (40%)" in lines[1] and "left" in lines[1]
    assert "token cache train-abc: 16/20 items (80%)" in lines[2]
    assert lines[-2].startswith("token cache train-abc: encoding 20 items: done in")
    assert lines[-1] == f"token cache written: {tmp_path / 'train-abc'}"
    caplog.clear()
    with caplog.at_level(logging.INFO):
        TokenCache.build_or_load(tmp_path, "train-abc", dataset, tokenizer, batch_size=8)
    assert [r.getMessage() for r in caplog.records if "token cache" in r.getMessage()] == [
        f"token cache hit: {tmp_path / 'train-abc'}"]
