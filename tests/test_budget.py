"""Matched budgets (lmgen.budget): what a comparison holds equal across arms of different
sequence lengths — images seen, tokens seen or training FLOPs — becomes each arm's step count."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from lmgen.budget import resolve_budget
from lmgen.config import TrainConfig, load_config
from lmgen.experiment import arm_budget, model_config, sequence_layout
from lmgen.tokenizers import tokenizer_for

ROOT = Path(__file__).resolve().parents[1]
# fixed-grid arms of very different lengths: 64 VQ codes, 32 causal tokens, 1024 palette pixels
ARMS = ("vq_1k", "causal1d_32", "pixels_palette64")


def arms(*overrides: str) -> dict[str, tuple]:
    """(train config, tokens per image, Llama config) of each arm on the base recipe."""
    out = {}
    for arm in ARMS:
        cfg = load_config(ROOT / "experiments/base.yaml", [f"tokenizer={arm}", *overrides])
        tokenizer = tokenizer_for(cfg)
        layout = sequence_layout(cfg.lm, tokenizer, cfg.data.num_classes)
        out[arm] = (cfg.train, float(tokenizer.max_tokens), model_config(cfg.lm, tokenizer, layout))
    return out


def test_the_images_budget_gives_every_arm_the_same_images_and_steps():
    budgets = {arm: arm_budget(*args) for arm, args in arms("train.images=6400", "train.batch_size=32").items()}
    assert {b.images for b in budgets.values()} == {6400} and {b.steps for b in budgets.values()} == {200}
    assert budgets["pixels_palette64"].tokens == 16 * budgets["vq_1k"].tokens  # 1024 vs 64 tokens per image
    assert budgets["pixels_palette64"].flops > 16 * budgets["vq_1k"].flops  # attention grows with the length


@pytest.mark.parametrize("budget", ["tokens", "flops"])
def test_token_and_flop_budgets_are_met_within_one_step(budget):
    target = {"tokens": 3e6, "flops": 2e12}[budget]
    budgets = {arm: arm_budget(*args) for arm, args in arms(f"train.budget={budget}", f"train.{budget}={target}").items()}
    for arm, b in budgets.items():
        per_step = getattr(b, budget) / b.steps
        assert abs(getattr(b, budget) - target) <= per_step / 2 + 1e-6 * target, arm  # the nearest whole step
    steps = {arm: b.steps for arm, b in budgets.items()}
    assert steps["causal1d_32"] > steps["vq_1k"] > steps["pixels_palette64"]  # shorter sequences, more steps


def test_the_steps_budget_is_the_step_count_and_validations_spread_evenly():
    train = TrainConfig(budget="steps", max_steps=103, val_points=5)
    b = resolve_budget(train, tokens_per_image=64.0, flops_per_token=1e6)
    assert (b.steps, b.images, b.val_every) == (103, 103 * 32, 21)  # ceil(103 / 5)
    assert resolve_budget(dataclasses.replace(train, val_every=50), 64.0, 1e6).val_every == 50
    # a budget smaller than one step still trains one step
    assert resolve_budget(TrainConfig(images=1, batch_size=32), 64.0, 1e6).steps == 1
    # more processes: the same images in fewer steps
    assert resolve_budget(TrainConfig(images=6400, batch_size=32), 64.0, 1e6, processes=2).steps == 100
