"""Contract tests for lmgen.llama: causality, KV-cache parity, GQA, sizes, FLOPs, learning, sub-codes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmgen.llama import LLAMA_SIZES, Llama, LlamaConfig, join_subcodes, llama_config, split_subcodes

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


# ---- sub-code vocabularies (ELM "n-c", MAGVIT-v2 2 x 2^9) ------------------------------------

SUB = (4, 8)  # image ids in [0, 32); 5 specials after them
SUB_V = 32 + 5


def tiny_sub(mode: str = "sum", subcodes: tuple[int, ...] = SUB) -> Llama:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=SUB_V, n_layers=2, n_heads=4, dim=32, max_seq_len=64,
                      subcodes=subcodes, subcode_embed=mode)
    return Llama(cfg).eval()


def test_split_and_join_subcodes_least_significant_first() -> None:
    ids = torch.arange(32)
    parts = split_subcodes(ids, SUB)
    assert parts.shape == (32, 2) and parts.dtype == torch.int64
    assert parts[13].tolist() == [1, 3]  # 13 = 1 + 3 * 4
    assert torch.equal(join_subcodes(parts, SUB), ids)
    # a 6-bit binary code cut into two groups of 3 bits: sub-code 0 holds the low bits
    bits = torch.tensor([0b101110])
    assert split_subcodes(bits, (8, 8)).tolist() == [[0b110, 0b101]]
    with pytest.raises(ValueError, match="sub-codes"):
        join_subcodes(parts, (4, 4, 2))


def test_subcode_config_fields_and_validation() -> None:
    cfg = LlamaConfig(vocab_size=SUB_V, n_layers=1, n_heads=4, dim=32, subcodes=[4, 8])  # OmegaConf list
    assert cfg.subcodes == SUB and cfg.image_vocab == 32 and cfg.out_dim == 12
    plain = LlamaConfig(vocab_size=SUB_V, n_layers=1, n_heads=4, dim=32)
    assert plain.subcodes == () and plain.image_vocab == SUB_V and plain.out_dim == SUB_V
    with pytest.raises(ValueError, match=r"'sum', 'concat'"):
        LlamaConfig(vocab_size=SUB_V, n_layers=1, n_heads=4, dim=32, subcodes=SUB, subcode_embed="mean")
    with pytest.raises(ValueError, match="vocab_size"):  # no room left for the specials
        LlamaConfig(vocab_size=32, n_layers=1, n_heads=4, dim=32, subcodes=SUB)
    with pytest.raises(ValueError, match=">= 2"):
        LlamaConfig(vocab_size=SUB_V, n_layers=1, n_heads=4, dim=32, subcodes=(32, 1))


def test_plain_model_keeps_hf_parameter_names() -> None:
    names = set(tiny().state_dict())
    assert {n for n in names if not n.startswith("layers.")} == {"embed.weight", "norm.weight", "head.weight"}
    assert tiny().head.weight.shape == (V, 32) and tiny().embed.weight.shape == (V, 32)


@pytest.mark.parametrize("mode", ["sum", "concat"])
def test_subcode_embedding_of_image_and_special_ids(mode: str) -> None:
    model = tiny_sub(mode)
    assert model.embed.weight.shape == (5, 32)  # specials only
    ids = torch.tensor([[13, 0, 31, 32, 36]])  # three image ids, BOS-like 32, last special 36
    with torch.no_grad():
        x = model.embed_ids(ids)  # (1, 5, D)
        a, b = model.subcode_embeds
        image = [a.weight[i % 4] + b.weight[i // 4] if mode == "sum" else
                 model.subcode_proj(torch.cat([a.weight[i % 4], b.weight[i // 4]])) for i in (13, 0, 31)]
        torch.testing.assert_close(x[0, :3], torch.stack(image))
        torch.testing.assert_close(x[0, 3:], model.embed.weight[[0, 4]])
        assert model(ids).shape == (1, 5, 12)  # one position per id; logits of 4 + 8 heads


@pytest.mark.parametrize("mode", ["sum", "concat"])
def test_subcode_token_nll_sums_head_cross_entropies(mode: str) -> None:
    model, pad = tiny_sub(mode), 34
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 32, (3, 10), generator=g)
    targets = torch.randint(0, 32, (3, 10), generator=g)
    targets[0, 7:] = pad
    with torch.no_grad():
        logits = model(ids)
        nll = model.token_nll(logits, targets, ignore_index=pad)
    assert nll.shape == (3, 10) and nll.dtype == torch.float32
    safe = targets.clamp(max=31)
    by_hand = (F.cross_entropy(logits[..., :4].transpose(1, 2), safe % 4, reduction="none")
               + F.cross_entropy(logits[..., 4:].transpose(1, 2), safe // 4, reduction="none"))
    torch.testing.assert_close(nll[targets != pad], by_hand[targets != pad])
    assert nll[0, 7:].eq(0).all() and nll[targets != pad].gt(0).all()
    # the sum is -log p(id) under the product of the heads: a proper distribution over 32 ids
    joint = (logits[..., :4].log_softmax(-1)[..., None, :] + logits[..., 4:].log_softmax(-1)[..., :, None])
    joint = joint.flatten(-2)  # (B, T, 32), index s0 + 4 * s1
    torch.testing.assert_close(joint.logsumexp(-1), torch.zeros(3, 10), atol=1e-5, rtol=0)
    torch.testing.assert_close(nll[1], -joint[1].gather(-1, targets[1, :, None])[:, 0])
    targets[1, 2] = 33  # EOS: not a sub-code target
    with pytest.raises(ValueError, match="specials"):
        model.token_nll(logits, targets, ignore_index=pad)


def test_plain_token_nll_is_cross_entropy() -> None:
    model = tiny()
    ids = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(6))
    targets = ids.roll(-1, 1)
    targets[:, -1] = 7
    with torch.no_grad():
        logits = model(ids)
        nll = model.token_nll(logits, targets, ignore_index=7)
    ref = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    torch.testing.assert_close(nll[:, :-1], ref[:, :-1])
    assert nll[:, -1].eq(0).all()


def test_subcode_param_count_and_flops() -> None:
    plain, summed, concat = tiny(), tiny_sub("sum"), tiny_sub("concat")
    core = plain.num_params(non_embedding=True)  # same blocks and norms everywhere
    assert summed.num_params(non_embedding=True) == core
    assert concat.num_params(non_embedding=True) == core + 2 * 32 * 32  # the (2D -> D) projection
    assert summed.num_params() == core + (5 + 4 + 8) * 32 + 12 * 32  # embed, sub-code tables, head
    seq = 16
    attn = 12 * 2 * 32 * seq
    assert summed.flops_per_token(seq) == 6 * (core + 12 * 32) + attn
    assert concat.flops_per_token(seq) == 6 * (core + 2 * 32 * 32 + 12 * 32) + attn


def test_subcode_kv_cache_matches_full_forward() -> None:
    model = tiny_sub("concat")
    ids = torch.randint(0, SUB_V, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 12)
        steps = [model(ids[:, :4], cache)] + [model(ids[:, i : i + 1], cache) for i in range(4, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)
