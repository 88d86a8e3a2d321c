"""Contract tests for lmgen.sampling: greedy/cache parity, filters, masks, EOS, CFG, seeds, sub-codes."""

from __future__ import annotations

import copy

import pytest
import torch

from lmgen.data import SequenceLayout
from lmgen.llama import Llama, LlamaConfig
from lmgen.sampling import Generation, cfg_scale_at, filter_logits, generate

V = 40
EOS, PAD = 38, 39


@pytest.fixture(scope="module")
def model() -> Llama:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, n_layers=2, n_heads=4, dim=32, n_kv_heads=2, max_seq_len=64)
    model = Llama(cfg).eval()
    with torch.no_grad():  # sharper than init so sampled streams differ from run to run
        model.head.weight.mul_(20)
    return model


def prompts(b: int = 3, p: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V - 2, (b, p), generator=torch.Generator().manual_seed(seed))


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_greedy_equals_argmax_of_full_forward(model: Llama) -> None:
    prompt = prompts()
    out = generate(model, prompt, 10, temperature=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(10):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out.tokens, seq[:, 2:])
    assert out.tokens.dtype == torch.long and out.tokens.shape == (3, 10)
    assert torch.equal(out.lengths, torch.full((3,), 10)) and not out.finished.any()


@pytest.mark.parametrize("kwargs", [{}, {"top_k": 5, "top_p": 0.9, "temperature": 0.8},
                                    {"cfg_scale": 3.0}])
def test_cache_and_no_cache_agree(model: Llama, kwargs: dict) -> None:
    prompt = prompts()
    if "cfg_scale" in kwargs:
        kwargs = {**kwargs, "uncond_prompt": torch.full_like(prompt, 37)}
    a = generate(model, prompt, 12, generator=seeded(1), **kwargs)
    b = generate(model, prompt, 12, generator=seeded(1), use_cache=False, **kwargs)
    assert torch.equal(a.tokens, b.tokens)


def test_top_k_1_is_greedy(model: Llama) -> None:
    prompt = prompts()
    greedy = generate(model, prompt, 8, temperature=0).tokens
    assert torch.equal(generate(model, prompt, 8, top_k=1, generator=seeded()).tokens, greedy)


def test_filter_logits_top_k_and_top_p() -> None:
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0, 0.0]])
    kept = filter_logits(logits, top_k=2).isfinite()
    assert kept.tolist() == [[False, True, True, False, False]]
    # sorted probabilities 0.5, 0.25, 0.15, 0.1: cumulative 0.5, 0.75, 0.9, 1.0
    probs = torch.tensor([[0.1, 0.5, 0.15, 0.25]])
    logits = probs.log()
    assert filter_logits(logits, top_p=0.45).isfinite().tolist() == [[False, True, False, False]]
    assert filter_logits(logits, top_p=0.7).isfinite().tolist() == [[False, True, False, True]]
    assert filter_logits(logits, top_p=0.8).isfinite().tolist() == [[False, True, True, True]]
    assert filter_logits(logits, top_p=0.01).isfinite().tolist() == [[False, True, False, False]]
    assert filter_logits(logits, top_p=1.0).isfinite().all()
    both = filter_logits(logits, top_k=3, top_p=0.99).isfinite()  # top-k first, then nucleus
    assert both.tolist() == [[False, True, True, True]]
    assert filter_logits(logits.bfloat16()).dtype == torch.float32
    with pytest.raises(ValueError):
        filter_logits(logits, top_p=0.0)


def test_allowed_is_respected(model: Llama) -> None:
    allowed = torch.zeros(V, dtype=torch.bool)
    allowed[[3, 7, 20]] = True
    out = generate(model, prompts(8), 16, temperature=2.0, allowed=allowed, generator=seeded())
    assert set(out.tokens.unique().tolist()) <= {3, 7, 20}
    assert len(out.tokens.unique()) > 1  # really sampled, not collapsed


def test_eos_lengths_finished_and_pad(model: Llama) -> None:
    # Uniform logits over {1, 2, 3, EOS}: rows hit EOS at different steps, then emit PAD.
    uniform = copy.deepcopy(model)
    with torch.no_grad():
        uniform.head.weight.zero_()
    allowed = torch.zeros(V, dtype=torch.bool)
    allowed[[1, 2, 3, EOS]] = True
    out = generate(uniform, prompts(6), 30, allowed=allowed, eos_id=EOS, pad_id=PAD,
                   generator=seeded(2))
    assert out.finished.all() and len(set(out.lengths.tolist())) > 1
    for row, n in zip(out.tokens.tolist(), out.lengths.tolist()):
        assert set(row[:n]) <= {1, 2, 3} and row[n] == EOS and set(row[n + 1 :]) <= {PAD}
    # without EOS allowed nothing finishes and lengths are max_new_tokens
    allowed[EOS] = False
    out = generate(uniform, prompts(6), 30, allowed=allowed, eos_id=EOS, pad_id=PAD)
    assert not out.finished.any() and out.lengths.eq(30).all()
    # forcing EOS at once: every row finishes at step 0 and no step runs after the prefill
    only_eos = torch.zeros(V, dtype=torch.bool)
    only_eos[EOS] = True
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        out = generate(model, prompts(), 5, allowed=only_eos, eos_id=EOS, pad_id=PAD)
    finally:
        hook.remove()
    assert len(calls) == 1
    assert out.finished.all() and out.lengths.eq(0).all()
    assert out.tokens[:, 0].eq(EOS).all() and out.tokens[:, 1:].eq(PAD).all()


def test_cfg_scale_1_is_unguided(model: Llama) -> None:
    prompt = prompts()
    plain = generate(model, prompt, 8, generator=seeded(3))
    scaled = generate(model, prompt, 8, generator=seeded(3), cfg_scale=1.0,
                      uncond_prompt=torch.full_like(prompt, 37))
    assert torch.equal(plain.tokens, scaled.tokens)


def test_cfg_matches_manual_guidance(model: Llama) -> None:
    prompt, uncond, s = prompts(), torch.full((3, 2), 37), 4.0
    with torch.no_grad():
        c, u = model(prompt)[:, -1], model(uncond)[:, -1]
    guided = u + s * (c - u)
    out = generate(model, prompt, 1, temperature=0, cfg_scale=s, uncond_prompt=uncond)
    assert torch.equal(out.tokens[:, 0], guided.argmax(-1))
    assert not torch.equal(guided.argmax(-1), c.argmax(-1))  # guidance changed something
    # sampled: the same draws as multinomial over softmax(guided) with the same generator
    out = generate(model, prompt, 1, cfg_scale=s, uncond_prompt=uncond, generator=seeded(5))
    ref = torch.multinomial(guided.softmax(-1), 1, generator=seeded(5)).squeeze(-1)
    assert torch.equal(out.tokens[:, 0], ref)


def test_linear_cfg_schedule() -> None:
    assert cfg_scale_at(0, 4, 3.0, "constant") == 3.0
    assert [cfg_scale_at(t, 4, 3.0, "linear") for t in range(4)] == [1.5, 2.0, 2.5, 3.0]
    with pytest.raises(ValueError, match="linear"):
        cfg_scale_at(0, 4, 3.0, "cosine")


def test_seeded_reproducibility(model: Llama) -> None:
    prompt = prompts()
    a = generate(model, prompt, 16, top_p=0.95, generator=seeded(7))
    b = generate(model, prompt, 16, top_p=0.95, generator=seeded(7))
    c = generate(model, prompt, 16, top_p=0.95, generator=seeded(8))
    assert isinstance(a, Generation)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)


def test_under_bf16_autocast(model: Llama) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = generate(model, prompts(), 6, cfg_scale=2.0, uncond_prompt=torch.full((3, 2), 37),
                       top_k=10, generator=seeded())
    assert out.tokens.shape == (3, 6) and out.tokens.lt(V).all() and out.lengths.eq(6).all()


# ---- sub-code models: independent heads, composite ids -------------------------------------

SUB = (4, 8)  # composite image ids in [0, 32)
LAYOUT = SequenceLayout(vocab_size=32, max_tokens=10, num_classes=1, variable_length=False)
CLASS, NULL = LAYOUT.class_offset, LAYOUT.null_class


@pytest.fixture(scope="module")
def sub_model() -> Llama:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=LAYOUT.total_vocab, n_layers=2, n_heads=4, dim=32, max_seq_len=64,
                      subcodes=SUB, subcode_embed="concat")
    model = Llama(cfg).eval()
    with torch.no_grad():
        model.head.weight.mul_(20)
    return model


def sub_prompts(b: int = 4, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, 32, (b, 2), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = CLASS
    return ids


def head_argmax(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, :4].argmax(-1) + 4 * logits[:, 4:].argmax(-1)


def test_subcode_generation_returns_composite_ids(sub_model: Llama) -> None:
    out = generate(sub_model, sub_prompts(8), 10, temperature=1.5, allowed=LAYOUT.allowed(),
                   generator=seeded())
    assert out.tokens.shape == (8, 10) and out.tokens.lt(32).all() and out.tokens.ge(0).all()
    assert out.lengths.eq(10).all() and not out.finished.any()
    assert len((out.tokens % 4).unique()) > 1 and len((out.tokens // 4).unique()) > 1  # both heads sample


def test_subcode_greedy_is_per_head_argmax(sub_model: Llama) -> None:
    prompt = sub_prompts()
    out = generate(sub_model, prompt, 6, temperature=0)
    with torch.no_grad():
        first = sub_model(prompt)[:, -1]
        assert torch.equal(out.tokens[:, 0], head_argmax(first))
        seq = prompt
        for _ in range(6):
            seq = torch.cat([seq, head_argmax(sub_model(seq)[:, -1])[:, None]], 1)
    assert torch.equal(out.tokens, seq[:, 2:])
    # argmax per head is not the argmax over the concatenated logits
    assert not torch.equal(head_argmax(first), first.argmax(-1))


@pytest.mark.parametrize("kwargs", [{}, {"top_k": 3, "top_p": 0.9, "temperature": 0.8}, {"cfg_scale": 3.0}])
def test_subcode_cache_and_no_cache_agree(sub_model: Llama, kwargs: dict) -> None:
    prompt = sub_prompts()
    if "cfg_scale" in kwargs:
        kwargs = {**kwargs, "uncond_prompt": torch.full_like(prompt, NULL)}
    a = generate(sub_model, prompt, 10, generator=seeded(1), **kwargs)
    b = generate(sub_model, prompt, 10, generator=seeded(1), use_cache=False, **kwargs)
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, generate(sub_model, prompt, 10, generator=seeded(2), **kwargs).tokens)


def test_subcode_forced_head_fixes_that_subcode(sub_model: Llama) -> None:
    forced = copy.deepcopy(sub_model)
    # a huge logit on id 5 of head 1 (column 4 + 5): every sample has sub-code 1 == 5
    forced.register_forward_hook(lambda _m, _i, out: out + 1e4 * torch.eye(12)[4 + 5])
    out = generate(forced, sub_prompts(8), 10, temperature=2.0, generator=seeded(3))
    assert (out.tokens // 4).eq(5).all()
    assert len((out.tokens % 4).unique()) > 1  # head 0 still sampled freely


def test_subcode_cfg_matches_manual_guidance(sub_model: Llama) -> None:
    prompt, s = sub_prompts(), 4.0
    uncond = torch.full_like(prompt, NULL)
    with torch.no_grad():
        c, u = sub_model(prompt)[:, -1], sub_model(uncond)[:, -1]
    guided = u + s * (c - u)  # (B, 12)
    out = generate(sub_model, prompt, 1, temperature=0, cfg_scale=s, uncond_prompt=uncond)
    assert torch.equal(out.tokens[:, 0], head_argmax(guided))
    assert not torch.equal(head_argmax(guided), head_argmax(c))  # guidance changed something
    # sampled: head 0 then head 1, each a multinomial over its own softmax, one generator
    out = generate(sub_model, prompt, 1, cfg_scale=s, uncond_prompt=uncond, generator=seeded(5))
    g = seeded(5)
    s0 = torch.multinomial(guided[:, :4].softmax(-1), 1, generator=g).squeeze(-1)
    s1 = torch.multinomial(guided[:, 4:].softmax(-1), 1, generator=g).squeeze(-1)
    assert torch.equal(out.tokens[:, 0], s0 + 4 * s1)


def test_subcode_rejects_eos_and_narrow_masks(sub_model: Llama) -> None:
    with pytest.raises(ValueError, match="eos_id"):
        generate(sub_model, sub_prompts(), 2, eos_id=LAYOUT.eos)
    narrow = LAYOUT.allowed()
    narrow[3] = False
    with pytest.raises(ValueError, match="allowed"):
        generate(sub_model, sub_prompts(), 2, allowed=narrow)


# --- prompts of different lengths (prefix completion) and per-row budgets ----------------------


def test_ragged_prompts_match_one_row_at_a_time(model: Llama) -> None:
    """Rows fed their own longer prompts (teacher forcing past the shortest) continue exactly as
    each row alone would, greedy, with and without CFG and with and without the cache."""
    prompt, plen, budget = prompts(4, 7, seed=3), torch.tensor([2, 7, 4, 5]), torch.tensor([6, 3, 5, 1])
    uncond = torch.cat([torch.full((4, 1), 37), prompt[:, 1:]], 1)
    for kwargs in ({}, {"cfg_scale": 3.0, "uncond_prompt": uncond, "cfg_schedule": "linear"}):
        for use_cache in (True, False):
            out = generate(model, prompt, budget, prompt_lengths=plen, temperature=0, use_cache=use_cache, **kwargs)
            assert out.tokens.shape == (4, 6)
            assert torch.equal(out.lengths, budget) and not out.finished.any()
            for i in range(4):
                p, n = int(plen[i]), int(budget[i])
                one = {k: (v[i : i + 1, :p] if k == "uncond_prompt" else v) for k, v in kwargs.items()}
                alone = generate(model, prompt[i : i + 1, :p], n, temperature=0, **one)
                assert torch.equal(out.tokens[i, :n], alone.tokens[0]), (i, kwargs, use_cache)
                assert out.tokens[i, n:].eq(0).all()  # pad past the row's budget


def test_ragged_prompts_with_eos_and_seeded_sampling(model: Llama) -> None:
    prompt, plen = prompts(5, 6, seed=4), torch.tensor([6, 2, 3, 6, 4])
    allowed = torch.ones(V, dtype=torch.bool)
    allowed[PAD] = False
    a = generate(model, prompt, 20, prompt_lengths=plen, allowed=allowed, eos_id=EOS, pad_id=PAD,
                 temperature=2.0, generator=seeded(2))
    b = generate(model, prompt, 20, prompt_lengths=plen, allowed=allowed, eos_id=EOS, pad_id=PAD,
                 temperature=2.0, generator=seeded(2), use_cache=False)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths)
    for i in range(5):
        n = int(a.lengths[i])
        assert not a.tokens[i, :n].eq(EOS).any() and not a.tokens[i, :n].eq(PAD).any()
        if a.finished[i]:
            assert a.tokens[i, n] == EOS and a.tokens[i, n + 1 :].eq(PAD).all()


def test_prompt_lengths_and_budgets_are_checked(model: Llama) -> None:
    prompt = prompts(3, 4)
    for plen in (torch.tensor([0, 2, 3]), torch.tensor([5, 2, 3]), torch.tensor([1, 2])):
        with pytest.raises(ValueError, match="prompt_lengths"):
            generate(model, prompt, 3, prompt_lengths=plen)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, prompt, torch.tensor([2, 0, 1]))
