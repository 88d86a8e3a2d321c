"""Token statistics (ELM Table 1): unigram and bigram KL to uniform, against cases with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from lmgen.metrics import bigram_metrics, code_metrics


def test_unigram_kl_known_values() -> None:
    uniform = torch.arange(64).repeat(10)
    assert code_metrics(uniform, 64)["tok/unigram_kl_uniform"] == pytest.approx(0.0, abs=1e-12)
    half = torch.arange(32).repeat(10)  # half the vocabulary, evenly: KL = log 2
    assert code_metrics(half, 64)["tok/unigram_kl_uniform"] == pytest.approx(math.log(2))


def test_bigram_kl_iid_uniform_is_near_zero() -> None:
    ids = torch.randint(0, 16, (2000, 64), generator=torch.Generator().manual_seed(0))
    out = bigram_metrics([(ids, torch.full((2000,), 64))], 16)
    assert abs(out["tok/bigram_kl_uniform"]) < 2e-3  # Miller–Madow removes the plug-in bias
    assert out["tok/bigram_pairs_per_cell"] == pytest.approx(2000 * 63 / 256)


def test_bigram_kl_deterministic_chain_is_log_vocab() -> None:
    start = torch.randint(0, 16, (500, 1), generator=torch.Generator().manual_seed(1))
    chain = (start + torch.arange(40)) % 16  # the next token is fixed by the previous one
    out = bigram_metrics([(chain, torch.full((500,), 40))], 16)
    assert out["tok/bigram_kl_uniform"] == pytest.approx(math.log(16))


def test_bigram_pairs_stay_inside_each_image() -> None:
    start = torch.randint(0, 16, (500, 1), generator=torch.Generator().manual_seed(2))
    chain = (start + torch.arange(40)) % 16
    noisy = chain.clone()
    noisy[:, 20:] = torch.randint(0, 16, (500, 20), generator=torch.Generator().manual_seed(3))  # padding
    lengths = torch.full((500,), 20)
    split = [(noisy[:250], lengths[:250]), (noisy[250:], lengths[250:])]  # batches never pair across
    out = bigram_metrics(split, 16)
    assert out["tok/bigram_kl_uniform"] == pytest.approx(math.log(16))
    assert out["tok/bigram_pairs_per_cell"] == pytest.approx(500 * 19 / 256)
    assert bigram_metrics([], 16) == {}
