"""Block-causal attention (VAR's next-scale prediction) as a switch of the one Llama: what a block
sees, what it embeds, block-by-block generation, and the config switch."""

from __future__ import annotations

import pytest
import torch

from lmgen.config import ConfigError, load_config, run_config_hash
from lmgen.experiment import model_config, sequence_layout
from lmgen.llama import Llama, llama_config
from lmgen.sampling import generate
from lmgen.tokenizers import build_tokenizer

SCALES = {"name": "multiscale", "channels": 8, "codebook_size": 16, "codebook_dim": 4, "scales": [1, 2, 4]}


def block_model(seed: int = 0) -> tuple[Llama, list[int]]:
    """A nano block-causal Llama over a 1-2-4 multiscale tokenizer (16×16 images: a 4×4 latent,
    1 + 4 + 16 = 21 ids), vocab 16 + specials; and each block's first input position."""
    tok = build_tokenizer(SCALES, (16, 16))
    blocks, parents = tok.attention_blocks()
    torch.manual_seed(seed)
    model = Llama(llama_config("nano", 16 + 5, 22, blocks=blocks, parents=parents)).eval()
    return model, [sum(blocks[:k]) for k in range(len(blocks))]


def test_the_multiscale_plan_is_one_block_per_scale_with_the_covering_coarser_cell_as_parent() -> None:
    tok = build_tokenizer(SCALES, (16, 16))
    blocks, parents = tok.attention_blocks()
    assert blocks == (1, 4, 16)
    # Position 0 (the class token) predicts the 1×1 scale; the 2×2 scale's four positions all embed
    # the 1×1 id (sequence position 1); each 4×4 cell embeds the 2×2 cell that covers it (2..5).
    assert parents[:5] == (0, 1, 1, 1, 1)
    assert parents[5:] == (2, 2, 3, 3, 2, 2, 3, 3, 4, 4, 5, 5, 4, 4, 5, 5)
    with pytest.raises(ValueError, match="1×1 first scale"):
        build_tokenizer({**SCALES, "scales": [2, 4]}, (16, 16)).attention_blocks()


def test_a_block_sees_only_coarser_scales_and_predicts_from_its_parents() -> None:
    """Logits of the blocks up to scale k do not move when scale k's own ids change (no leak); the
    next block's logits do (it embeds them), at every one of its positions (they see each other)."""
    model, starts = block_model()
    seq = torch.randint(0, 16, (2, 22))
    seq[:, 0] = 16 + 3  # a class token
    with torch.no_grad():
        base = model(seq[:, :-1])
        for k in range(2):  # change scale k's ids: sequence positions 1 + starts[k] ... 1 + starts[k + 1] - 1
            changed = seq.clone()
            changed[:, 1 + starts[k] : 1 + starts[k + 1]] = (seq[:, 1 + starts[k] : 1 + starts[k + 1]] + 1) % 16
            out = model(changed[:, :-1])
            torch.testing.assert_close(out[:, : starts[k + 1]], base[:, : starts[k + 1]])  # blocks ≤ k untouched
            moved = (out[:, starts[k + 1] : starts[k + 1] + 4] - base[:, starts[k + 1] : starts[k + 1] + 4]).abs()
            assert bool((moved.amax(-1) > 1e-4).all())  # block k + 1 reads them
        # One 2×2 cell changed: the 4×4 positions it does not cover move too (a block attends within itself).
        changed = seq.clone()
        changed[:, 2] = (seq[:, 2] + 1) % 16
        out = model(changed[:, :-1])
        not_covered = [p for p in range(starts[2], 21) if model.cfg.parents[p] != 2]
        assert bool(((out - base)[:, not_covered].abs().amax(-1) > 1e-6).all())


def test_a_causal_llama_is_unchanged_by_the_switch() -> None:
    torch.manual_seed(0)
    causal = Llama(llama_config("nano", 21, 22)).eval()
    ids = torch.randint(0, 21, (2, 21))
    with torch.no_grad():
        full = causal(ids)
        cache = causal.new_cache(2, 21)
        stepped = torch.cat([causal(ids[:, :5], cache), *(causal(ids[:, t : t + 1], cache) for t in range(5, 21))], 1)
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
@pytest.mark.parametrize("prompt_ids", [0, 5], ids=["class-only", "two-scales"])
def test_block_generation_with_a_cache_is_the_full_recompute_and_keeps_the_prompt(cfg_scale: float,
                                                                                  prompt_ids: int) -> None:
    model, _ = block_model()
    prompt = torch.cat([torch.full((3, 1), 16 + 3), torch.randint(0, 16, (3, prompt_ids))], 1)
    uncond = torch.cat([torch.full((3, 1), 16 + 4), prompt[:, 1:]], 1)
    runs = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(7)
        runs.append(generate(model, prompt, 21 - prompt_ids, cfg_scale=cfg_scale, uncond_prompt=uncond,
                             generator=g, use_cache=use_cache, allowed=torch.arange(21) < 16))
    cached, full = runs
    assert torch.equal(cached.tokens, full.tokens) and cached.tokens.shape == (3, 21 - prompt_ids)
    assert bool((cached.tokens < 16).all()) and cached.lengths.tolist() == [21 - prompt_ids] * 3


def test_block_generation_samples_each_block_from_its_own_logits() -> None:
    """Greedy generation equals, block by block, the argmax of the full pass over what was generated."""
    model, starts = block_model(seed=3)
    prompt = torch.full((2, 1), 16 + 1)
    out = generate(model, prompt, 21, temperature=0.0, allowed=torch.arange(21) < 16)
    seq = torch.cat([prompt, out.tokens], 1)
    with torch.no_grad():
        logits = model(seq[:, :-1])
    assert torch.equal(logits[..., :16].argmax(-1), out.tokens)


def test_block_prompts_must_be_whole_blocks_and_streams_fixed_length() -> None:
    model, _ = block_model()
    with pytest.raises(ValueError, match="whole block"):
        generate(model, torch.full((2, 4), 3), 18)  # class + 3 ids: inside the 2×2 scale
    with pytest.raises(ValueError, match="whole block"):
        generate(model, torch.full((2, 6), 3), 16, prompt_lengths=torch.tensor([2, 6]))
    with pytest.raises(ValueError, match="eos_id"):
        generate(model, torch.full((2, 1), 3), 21, eos_id=17)
    with pytest.raises(ValueError, match="remaining blocks"):
        generate(model, torch.full((2, 1), 3), 10)


def test_a_plan_whose_parents_lie_in_their_own_block_is_refused() -> None:
    with pytest.raises(ValueError, match="earlier blocks"):
        llama_config("nano", 21, 22, blocks=(1, 4), parents=(0, 1, 1, 3, 1))  # position 3 embeds position 3


def test_the_switch_is_an_lm_config_key_checked_before_compute() -> None:
    cfg = load_config("experiments/base.yaml", ["tokenizer=multiscale_1k", "lm.attention=block_causal"])
    tokenizer = build_tokenizer(cfg.tokenizer, cfg.data.image_size)
    layout = sequence_layout(cfg.lm, tokenizer, 10)
    model = model_config(cfg.lm, tokenizer, layout)
    assert model.blocks == (1, 4, 16, 64) and len(model.parents) == 85 == layout.seq_len - 1
    causal = load_config("experiments/base.yaml", ["tokenizer=multiscale_1k"])
    assert run_config_hash(cfg) != run_config_hash(causal)
    # Runs logged before lm.attention existed keep their hash (pinned from before the key).
    assert run_config_hash(load_config("experiments/base.yaml", [])) == "eb1561f76195"
    with pytest.raises(ConfigError, match="lm.attention=block_causal needs a tokenizer written in blocks"):
        load_config("experiments/base.yaml", ["tokenizer=vq_1k", "lm.attention=block_causal"])
    with pytest.raises(ConfigError, match="1×1 first scale"):
        load_config("experiments/base.yaml", ["tokenizer=multiscale_1k", "tokenizer.scales=[2,4,8]",
                                              "lm.attention=block_causal"])
    with pytest.raises(ConfigError, match="lm.attention"):
        load_config("experiments/base.yaml", ["lm.attention=bidirectional"])
