"""Contract tests for lmgen.ar_module with a sub-code vocabulary: the loss is the summed NLL of
independent heads, training lowers it, and lm/val_bits_per_image is that NLL in bits."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lmgen.ar_module import ARModule, OptimConfig
from lmgen.data import SequenceBatch, SequenceCollator, SequenceLayout, TokenDataModule
from lmgen.llama import llama_config

SUB = (4, 4)  # composite image ids in [0, 16)
LAYOUT = SequenceLayout(vocab_size=16, max_tokens=8, num_classes=2, variable_length=False)


def items(n: int, labelled: bool = True) -> list[tuple[torch.Tensor, int, int]]:
    """(ids, length, label) like TokenCache: class c's grid is a fixed pattern, 1 id in 10 noisy;
    ``labelled=False`` gives every item a label drawn independently of its pattern."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        label = i % 2
        ids = (label * 5 + 3 * torch.arange(8)) % 16
        noisy = torch.rand(8, generator=g) < 0.1
        ids = torch.where(noisy, torch.randint(0, 16, (8,), generator=g), ids)
        out.append((ids, 8, label if labelled else int(torch.randint(0, 2, (), generator=g))))
    return out


def module(mode: str = "sum", **optim) -> ARModule:
    torch.manual_seed(0)
    cfg = llama_config("nano", LAYOUT.total_vocab, LAYOUT.seq_len, subcodes=SUB, subcode_embed=mode)
    return ARModule(cfg, LAYOUT, OptimConfig(**{"lr": 1e-2, "warmup_steps": 1, "max_steps": 40, **optim}))


def loader(n: int) -> DataLoader:
    return DataLoader(items(n), batch_size=16, collate_fn=SequenceCollator(LAYOUT))


def bits_by_hand(model: ARModule, data: DataLoader) -> float:
    """Mean over images of sum_t sum_heads -log2 p(sub-code), straight from the logits."""
    per_image = []
    with torch.no_grad():
        for batch in data:
            logits = model.model(batch.inputs)  # (B, T, 8): head 0 then head 1
            lp0, lp1 = logits[..., :4].log_softmax(-1), logits[..., 4:].log_softmax(-1)
            t = batch.targets  # fixed grid: every target is an image id
            nats = -(lp0.gather(-1, (t % 4)[..., None]) + lp1.gather(-1, (t // 4)[..., None]))[..., 0]
            per_image.append(nats.sum(1) / math.log(2))
    return float(torch.cat(per_image).mean())


@pytest.mark.parametrize("mode", ["sum", "concat"])
def test_subcode_training_lowers_bits_per_image(mode: str) -> None:
    ar = module(mode)
    data = TokenDataModule(items(64), items(32), LAYOUT, batch_size=16)  # as experiment.py, lists for caches
    val = data.val_dataloader()
    trainer = L.Trainer(max_steps=40, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    before = trainer.validate(ar, datamodule=data, verbose=False)[0]["lm/val_bits_per_image"]
    assert before == pytest.approx(bits_by_hand(ar, val), rel=1e-5)
    assert before > 0.8 * 8 * 4  # ~ 8 tokens x log2(16) bits at init
    trainer.fit(ar, datamodule=data)
    after = trainer.validate(ar, datamodule=data, verbose=False)[0]
    assert after["lm/val_bits_per_image"] == pytest.approx(bits_by_hand(ar, val), rel=1e-5)
    assert after["lm/val_bits_per_image"] < 0.5 * before
    # per token is per image / 8 tokens; val_loss is the same in nats
    assert after["lm/val_bits_per_token"] == pytest.approx(after["lm/val_bits_per_image"] / 8, rel=1e-5)
    assert after["lm/val_loss"] == pytest.approx(after["lm/val_bits_per_token"] * math.log(2), rel=1e-5)


def test_subcode_token_nll_uses_model_and_masks_pad() -> None:
    ar = module()
    batch = next(iter(loader(4)))
    nll, mask = ar.token_nll(batch)
    assert nll.shape == mask.shape == batch.targets.shape and mask.all()  # fixed grid: no PAD
    with torch.no_grad():
        ref = ar.model.token_nll(ar.model(batch.inputs), batch.targets, ignore_index=LAYOUT.pad)
    torch.testing.assert_close(nll.detach(), ref)


def test_subcode_models_need_a_fixed_grid_of_matching_vocab() -> None:
    streams = SequenceLayout(vocab_size=16, max_tokens=8, num_classes=2, variable_length=True)
    with pytest.raises(ValueError, match="fixed-length"):
        ARModule(llama_config("nano", streams.total_vocab, streams.seq_len, subcodes=SUB), streams, OptimConfig())
    wider = SequenceLayout(vocab_size=20, max_tokens=8, num_classes=2, variable_length=False)
    with pytest.raises(ValueError, match="prod"):
        ARModule(llama_config("nano", wider.total_vocab, wider.seq_len, subcodes=SUB), wider, OptimConfig())


def test_subcode_embeddings_are_not_decayed() -> None:
    ar = module("concat")
    decay, no_decay = ar.configure_optimizers()["optimizer"].param_groups
    assert decay["weight_decay"] > 0 and no_decay["weight_decay"] == 0
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert all(id(table.weight) in no_decay_ids for table in ar.model.subcode_embeds)
    assert id(ar.model.embed.weight) in no_decay_ids
    assert id(ar.model.subcode_proj.weight) not in no_decay_ids  # a matmul: decays like the others
    assert id(ar.model.head.weight) not in no_decay_ids


@pytest.mark.parametrize("labelled", [True, False])
def test_label_bits_are_what_the_class_token_is_worth(labelled: bool) -> None:
    """lm/val_label_bits = mean log2 p(image | class) / p(image | null class), the NLL by hand with the
    null class as the prompt minus the NLL with the class: clearly positive when the class picks one of
    two patterns (1 bit of class, more while the null prompt, trained on the dropped labels alone, still
    lags), about 0 when the label says nothing about the image."""
    ar = module(class_dropout=0.25)
    data = TokenDataModule(items(64, labelled), items(32, labelled), LAYOUT, batch_size=16)
    trainer = L.Trainer(max_steps=60, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(ar, datamodule=data)
    after = trainer.validate(ar, datamodule=data, verbose=False)[0]
    val = data.val_dataloader()
    collate = SequenceCollator(LAYOUT)

    def unlabelled(rows: list) -> SequenceBatch:
        batch = collate(rows)
        return SequenceBatch(ar._unlabelled(batch.inputs), batch.targets, batch.labels)

    with_null = DataLoader(items(32, labelled), batch_size=16, collate_fn=unlabelled)
    assert after["lm/val_label_bits"] == pytest.approx(bits_by_hand(ar, with_null) - bits_by_hand(ar, val), abs=1e-4)
    if labelled:
        assert after["lm/val_label_bits"] > 0.6, after
    else:
        assert abs(after["lm/val_label_bits"]) < 0.25, after
