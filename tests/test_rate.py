"""Token statistics (ELM Table 1): unigram and bigram KL to uniform, against cases with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from lmgen.metrics import token_statistics


def _one(ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(ids[None], torch.tensor([len(ids)]))]


def test_unigram_kl_known_values() -> None:
    uniform = torch.arange(64).repeat(100)
    out = token_statistics(_one(uniform), 64)
    assert out["tok/unigram_kl_uniform"] == pytest.approx(0.0, abs=0.01)  # Miller–Madow adds 63/12800
    assert out["tok/unigram_tokens_per_cell"] == 100
    half = torch.arange(32).repeat(200)  # half the vocabulary, evenly: KL = log 2
    assert token_statistics(_one(half), 64)["tok/unigram_kl_uniform"] == pytest.approx(math.log(2), abs=0.01)


def test_bigram_kl_iid_uniform_is_near_zero() -> None:
    ids = torch.randint(0, 16, (2000, 64), generator=torch.Generator().manual_seed(0))
    out = token_statistics([(ids, torch.full((2000,), 64))], 16)
    assert abs(out["tok/bigram_kl_uniform"]) < 2e-3  # Miller–Madow removes the plug-in bias
    assert out["tok/bigram_pairs_per_cell"] == pytest.approx(2000 * 63 / 256)


def test_bigram_kl_deterministic_chain_is_log_vocab() -> None:
    start = torch.randint(0, 16, (500, 1), generator=torch.Generator().manual_seed(1))
    chain = (start + torch.arange(40)) % 16  # the next token is fixed by the previous one
    out = token_statistics([(chain, torch.full((500,), 40))], 16)
    assert out["tok/bigram_kl_uniform"] == pytest.approx(math.log(16))


def test_bigram_pairs_stay_inside_each_image() -> None:
    start = torch.randint(0, 16, (500, 1), generator=torch.Generator().manual_seed(2))
    chain = (start + torch.arange(40)) % 16
    noisy = chain.clone()
    noisy[:, 20:] = torch.randint(0, 16, (500, 20), generator=torch.Generator().manual_seed(3))  # padding
    lengths = torch.full((500,), 20)
    split = [(noisy[:250], lengths[:250]), (noisy[250:], lengths[250:])]  # batches never pair across
    out = token_statistics(split, 16)
    assert out["tok/bigram_kl_uniform"] == pytest.approx(math.log(16))
    assert out["tok/bigram_pairs_per_cell"] == pytest.approx(500 * 19 / 256)
    assert token_statistics([], 16) == {}
    assert out["tok/unigram_tokens_per_cell"] == pytest.approx(500 * 20 / 16)  # padding never counted
