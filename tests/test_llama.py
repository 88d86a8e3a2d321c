"""Contract tests for lmgen.llama: causality, KV-cache parity, GQA, sizes, FLOPs, learning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmgen.llama import LLAMA_SIZES, Llama, LlamaConfig, llama_config

V = 50


def tiny(**overrides) -> Llama:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, n_layers=2, n_heads=4, dim=32, max_seq_len=64, **overrides)
    return Llama(cfg).eval()


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
def test_causal(n_kv_heads: int | None) -> None:
    model = tiny(n_kv_heads=n_kv_heads)
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    t = 7
    changed = ids.clone()
    changed[:, t] = (ids[:, t] + 1) % V
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert a.shape == (2, 12, V) and a.dtype == torch.float32
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=0)
    assert (a[:, t:] - b[:, t:]).abs().amax(dim=-1).min() > 1e-4  # every later position moved


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_kv_cache_matches_full_forward(n_kv_heads: int | None) -> None:
    model = tiny(n_kv_heads=n_kv_heads)
    ids = torch.randint(0, V, (3, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        # prompt prefill, then one token per step
        cache = model.new_cache(3, 20)
        steps = [model(ids[:, :5], cache)]
        steps += [model(ids[:, i : i + 1], cache) for i in range(5, 20)]
        assert cache.length == 20
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)
        # chunks of several tokens at non-zero offsets need the shifted causal mask
        cache = model.new_cache(3, 24)
        chunks = [model(ids[:, a:b], cache) for a, b in [(0, 4), (4, 11), (11, 12), (12, 20)]]
        torch.testing.assert_close(torch.cat(chunks, 1), full, rtol=0, atol=1e-5)


def test_cache_overflow_and_config_errors() -> None:
    model = tiny()
    cache = model.new_cache(1, 4)
    with pytest.raises(ValueError, match="exceed"):
        model(torch.zeros(1, 5, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model.new_cache(1, 65)
    with pytest.raises(ValueError, match="n_kv_heads"):
        LlamaConfig(vocab_size=V, n_layers=1, n_heads=4, dim=32, n_kv_heads=3)
    with pytest.raises(ValueError, match="nano"):
        llama_config("huge", vocab_size=V, max_seq_len=16)


def test_gqa_has_fewer_kv_params() -> None:
    mha, gqa = tiny(), tiny(n_kv_heads=1)
    assert gqa.layers[0].attn.wk.weight.shape == (8, 32)  # 1 kv head of head_dim 8
    assert gqa.num_params() < mha.num_params()
    assert tuple(gqa.new_cache(2, 10).k[0].shape) == (2, 1, 10, 8)  # (B, K, max_len, Hd)


def meta_model(size: str, vocab_size: int) -> Llama:
    with torch.device("meta"):  # counts without allocating XL's 775M weights
        return Llama(llama_config(size, vocab_size=vocab_size, max_seq_len=1024))


@pytest.mark.parametrize("size, expected", [("B", 111e6), ("L", 343e6), ("XL", 775e6)])
def test_llamagen_sizes(size: str, expected: float) -> None:
    # LlamaGen GPT-B/L/XL (Table 1) at vocab 16384; theirs also has a ~1k class embedding.
    n = meta_model(size, 16384).num_params()
    assert abs(n - expected) / expected < 0.1


def test_cpu_sizes_and_ffn_rule() -> None:
    non_emb = {s: meta_model(s, 272).num_params(non_embedding=True) for s in LLAMA_SIZES}
    assert 0.05e6 < non_emb["nano"] < 0.2e6
    assert 0.5e6 < non_emb["micro"] < 1.2e6
    assert 3e6 < non_emb["mini"] < 6e6
    assert 15e6 < non_emb["small"] < 25e6
    assert list(non_emb.values()) == sorted(non_emb.values())
    assert llama_config("L", 16384, 256).ffn_dim == 2816  # 2/3*4*1024 rounded up to 256
    assert llama_config("nano", 16384, 256, ffn_dim=100).ffn_dim == 100


def test_flops_per_token() -> None:
    model = meta_model("micro", 272)
    f256, f512 = model.flops_per_token(256), model.flops_per_token(512)
    n = model.num_params(non_embedding=True) + model.head.weight.numel()
    assert f256 == 6 * n + 12 * 4 * 128 * 256
    assert f512 - f256 == 12 * 4 * 128 * 256  # attention term is linear in seq_len
    assert meta_model("mini", 272).flops_per_token(256) > f256


def test_overfits_a_fixed_sequence() -> None:
    model = tiny().train()
    ids = torch.randint(0, V, (4, 33), generator=torch.Generator().manual_seed(3))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 3.5  # ~ln(50) at init
    assert losses[-1] < 0.3 * losses[0]


def test_bf16_autocast_close_to_fp32() -> None:
    model = tiny()
    ids = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids)
            cache = model.new_cache(2, 16)
            assert cache.k[0].dtype == torch.bfloat16
            cached = torch.cat([model(ids[:, :8], cache), model(ids[:, 8:], cache)], 1)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    assert (cached - ref).abs().max() < 0.05 * ref.abs().max()


def test_rope_tables_stay_fp32() -> None:
    model = tiny().to(torch.bfloat16)
    assert model.rope.cos.dtype == torch.float32
    assert model.head.weight.dtype == torch.bfloat16
    assert "rope.cos" not in model.state_dict()


def test_rope_uses_hf_split_halves() -> None:
    # HF rotate_half pairs dim i with dim i + Hd/2 (not 2i with 2i+1), so weights map to
    # transformers.LlamaForCausalLM without a q/k permutation.
    rope = tiny().rope
    x = torch.zeros(1, 1, 1, 8)
    x[..., 0] = 1.0  # frequency 0 has inv_freq 1: angle = position
    out = rope(x, torch.tensor([3]))[0, 0, 0]
    expected = torch.zeros(8)
    expected[0], expected[4] = torch.tensor(3.0).cos(), torch.tensor(3.0).sin()
    torch.testing.assert_close(out, expected)
