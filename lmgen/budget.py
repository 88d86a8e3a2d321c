"""Matched training budgets: what a comparison holds equal across its arms, as a step count.

Arms of a tokenizer comparison differ in sequence length (64 VQ codes vs 1024 palette pixels
vs ~170 JPEG bytes per image), so "the same number of steps" is not the same training for
them. ``train.budget`` names what is held equal instead and each arm's steps follow from it:

- ``images`` (default): images seen. Every arm sees the same images the same number of
  times; the steps are ``images / images per step`` whatever the sequence length.
- ``tokens``: training tokens (positions that carry a loss: an image's ids, plus EOS for
  codec streams) — longer sequences get fewer steps.
- ``flops``: training FLOPs (``Llama.flops_per_token`` × tokens): longer sequences and
  larger models get fewer steps.
- ``steps``: ``train.max_steps`` as given (no matching).

The step count is the nearest whole step (at least one), so the achieved budget is within
half a step of the one asked for. Codec streams have variable length: their tokens and
FLOPs per image are the mean over the train split's token cache, so those two budgets
match in expectation; each run logs what it achieved (``lm/tokens_seen``, ``lm/flops``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from lmgen.config import TrainConfig


@dataclass(frozen=True)
class Budget:
    """One arm's resolved training budget: steps, and the images, tokens (expected) and FLOPs
    (expected) they amount to; ``val_every`` steps between validations."""

    steps: int
    images: int
    tokens: float
    flops: float
    val_every: int

    def params(self) -> dict[str, float]:
        """The ``resolved.*`` params every LM run logs."""
        return {"resolved.steps": self.steps, "resolved.images": self.images, "resolved.tokens": round(self.tokens),
                "resolved.flops": float(f"{self.flops:.6g}"), "resolved.val_every": self.val_every}


def world_size(train: TrainConfig) -> int:
    """Processes that train together: devices per node × nodes (``devices=-1``: every GPU, or
    one process per core on a CPU, as Lightning does)."""
    devices = train.devices
    if devices == -1:
        gpu = train.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        devices = torch.cuda.device_count() if gpu else os.cpu_count() or 1
    return devices * train.num_nodes


def resolve_budget(train: TrainConfig, tokens_per_image: float, flops_per_token: float,
                   processes: int = 1) -> Budget:
    """Steps for ``train.budget`` given an arm's mean loss-bearing tokens per image and the
    Llama's training FLOPs per token at that length; ``processes`` ranks of ``train.batch_size``."""
    if tokens_per_image <= 0 or flops_per_token <= 0:
        raise ValueError(f"tokens_per_image and flops_per_token must be > 0, got {tokens_per_image}, {flops_per_token}")
    per_step = train.batch_size * processes  # images per optimizer step
    per_unit = {"steps": None, "images": per_step, "tokens": per_step * tokens_per_image,
                "flops": per_step * tokens_per_image * flops_per_token}[train.budget]
    steps = train.max_steps if per_unit is None else max(1, round(getattr(train, train.budget) / per_unit))
    val_every = train.val_every or max(1, math.ceil(steps / train.val_points))
    images = steps * per_step
    return Budget(steps=steps, images=images, tokens=images * tokens_per_image,
                  flops=images * tokens_per_image * flops_per_token, val_every=val_every)
