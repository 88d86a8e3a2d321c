"""Codebook collapse at 2^14 codes: plain VQ against SimVQ, the rotation trick and FSQ.

    python benchmarks/codebook_collapse.py [--steps 250] [--batch 32] [--channels 16] [--val 4096]
    python benchmarks/codebook_collapse.py --arms all      # also the other issue-23 presets
    python benchmarks/codebook_collapse.py --only pool --seed 1   # the arms whose label has "pool"

Every arm is a tokenizer preset of ``experiments/tokenizers/`` trained by the real stage 1
(``lmgen.tokenizer_module.train_tokenizer``) with one identical small recipe (steps, batch, lr,
warm-up, seed, fp32, and the autoencoder width ``--channels`` for all arms, so it fits one CPU
core) on the procedural ``shapes`` data at 32×32. Each then encodes ``--val`` held-out images:
4096 × 64 positions = 262k latents, 16 per code, so a uniform use of 16384 codes would hit all
but e^-16 of them and the figure measures the tokenizer, not the sample. Columns: code use
(fraction of the codebook the held-out ids hit; rvq: each depth's codebook, mean over depths),
perplexity of the held-out ids, PSNR of their reconstructions, bits per image (tokens × log2
vocab) and stage-1 training seconds.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

from lmgen.datasets import build_dataset, load_images
from lmgen.metrics import psnr
from lmgen.tokenizer_module import train_tokenizer
from lmgen.tokenizers import build_tokenizer
from lmgen.tokenizers.quantizers import code_stats
from lmgen.tokenizers.rvq import ResidualVectorQuantizer

PRESETS = Path(__file__).resolve().parents[1] / "experiments" / "tokenizers"
# (row label, preset, overrides). Plain VQ twice: without dead-code restarts (the textbook layer)
# and with them (the suite's default, itself a collapse fix; vq_16k_rotation keeps them too).
COLLAPSE = [
    ("vq 16k, no restarts", "vq_16k", {"restart_every": 0}),
    ("vq 16k", "vq_16k", {}),
    ("vq 16k rot", "vq_16k_rotation", {}),
    ("vq 16k simvq", "vq_16k_simvq", {}),
    ("vq 16k simvq rot", "vq_16k_simvq_rotation", {}),
    ("fsq 8-8-8-6-5", "fsq_16k", {}),
    ("vq 16k l2 rot pool", "vq_16k_l2_rotation_pool", {}),
]
OTHERS = [("vq 16k rot, no restarts", "vq_16k_rotation", {"restart_every": 0}),
          # LlamaGen's codes: l2-normalised, 8-d (cosine lookup in a low-dimensional space)
          ("vq 16k l2 d8", "vq_16k", {"l2_norm": True, "codebook_dim": 8}),
          ("vq 16k l2 d8 rot", "vq_16k", {"l2_norm": True, "codebook_dim": 8, "rotation_trick": True}),
          ("vq 16k simvq rot l2 d8", "vq_16k_simvq_rotation", {"l2_norm": True, "codebook_dim": 8}),
          # the suite's restarts, aggressive: every 10 steps, codes under 10% of the uniform share
          ("vq 16k restarts 10/0.1", "vq_16k", {"restart_every": 10, "restart_threshold": 0.1}),
          ("vq 16k l2 d8 rot 10/0.1", "vq_16k", {"l2_norm": True, "codebook_dim": 8, "rotation_trick": True,
                                                  "restart_every": 10, "restart_threshold": 0.1}),
          # the same restarts from the last 4·K latents, without and with l2 8-d codes + rotation
          ("vq 16k 10/0.1 pool", "vq_16k", {"restart_every": 10, "restart_threshold": 0.1, "restart_pool": 4}),
          *((stem, stem, {}) for stem in ("fsq_1k", "fsq_4k", "fsq_64k", "rvq_1k_d2", "rvq_1k_d2_flat",
                                           "rvq_1k_d4_flat"))]


def images(split: str, n: int) -> torch.Tensor:
    """The first n ``shapes`` images of a split, (n, 3, 32, 32) uint8."""
    cfg = {"name": "shapes", "image_size": 32, "train_size": max(n, 1), "val_size": max(n, 1)}
    return load_images(build_dataset(cfg, split), n)


def code_use(tok, ids: torch.Tensor) -> float:
    """Fraction of the codebook the held-out ids hit; rvq: each depth's codebook, mean over depths."""
    quantizer = tok.quantizer
    if isinstance(quantizer, ResidualVectorQuantizer):  # ids → (N, D) per-depth codes
        grid = ids.view(ids.shape[0], tok.grid[0], tok.grid[1])
        digits = quantizer.digits(grid).flatten(0, 2)
        k = quantizer.codes_per_depth
        return sum(float(code_stats(digits[:, d], k)["codebook_usage"]) for d in range(digits.shape[1])) / digits.shape[1]
    return float(code_stats(ids, tok.vocab_size)["codebook_usage"])


def run_arm(preset: str, overrides: dict, recipe: dict, train: torch.Tensor, val: torch.Tensor) -> dict[str, float]:
    block = yaml.safe_load((PRESETS / f"{preset}.yaml").read_text())["tokenizer"]
    tok = build_tokenizer({**block, **overrides, **recipe}, 32)
    cpu = SimpleNamespace(accelerator="cpu", devices=1, num_nodes=1, strategy="auto")
    seconds = train_tokenizer(tok, train, val[:64], cpu, False)["tok/train_seconds"]
    with torch.no_grad():
        tokens = tok.encode(val)
        recon = tok.decode(tokens).images
    ids = tokens.ids
    return {"use": code_use(tok, ids), "perplexity": float(code_stats(ids, tok.vocab_size)["perplexity"]),
            "psnr": float(psnr(val, recon).clamp(max=100).mean()), "bits": tok.max_tokens * math.log2(tok.vocab_size),
            "vocab": tok.vocab_size, "tokens": tok.max_tokens, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--train", type=int, default=4000, help="train images")
    parser.add_argument("--val", type=int, default=4096, help="held-out images measured")
    parser.add_argument("--arms", choices=("collapse", "all"), default="collapse")
    parser.add_argument("--only", default="", help="run only the arms whose label contains this text")
    parser.add_argument("--seed", type=int, default=0, help="stage-1 seed (initialisation, batches, restarts)")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # the table, not Trainer banners
    start = time.perf_counter()
    recipe = {"steps": args.steps, "batch_size": args.batch, "lr": args.lr, "warmup_steps": args.steps // 10,
              "channels": args.channels, "val_every": args.steps, "val_images": 64, "seed": args.seed,
              "precision": "32-true"}
    train, val = images("train", args.train), images("val", args.val)
    arms = [arm for arm in COLLAPSE + (OTHERS if args.arms == "all" else []) if args.only in arm[0]]
    print(f"stage 1: {args.steps} steps × batch {args.batch}, lr {args.lr:g}, channels {args.channels}, "
          f"{args.train} train / {args.val} held-out shapes 32×32, seed {args.seed}, {torch.get_num_threads()} thread(s)")
    print(f"{'arm':<26}{'vocab':>8}{'tokens':>8}{'bits/img':>10}{'code use':>10}{'perplexity':>12}{'PSNR dB':>9}"
          f"{'seconds':>9}")
    for label, preset, overrides in arms:
        torch.manual_seed(args.seed)
        r = run_arm(preset, overrides, recipe, train, val)
        print(f"{label:<26}{r['vocab']:>8}{r['tokens']:>8}{r['bits']:>10.0f}{r['use']:>10.3f}{r['perplexity']:>12.0f}"
              f"{r['psnr']:>9.2f}{r['seconds']:>9.0f}", flush=True)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
