"""Sequence layout and token cache contracts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmgen.data import SequenceCollator, SequenceLayout, TokenCache, TokenDataModule
from lmgen.datasets import ShapesDataset
from lmgen.tokenizers import build_tokenizer


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
