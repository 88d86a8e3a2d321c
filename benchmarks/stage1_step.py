"""Stage-1 training step of the learned tokenizers, side by side with plain VQ.

    python benchmarks/stage1_step.py [--batch 64] [--steps 10] [--channels 16]

One table: forward FLOPs per image (torch.utils.flop_counter), seconds per training step
(forward + backward + AdamW) and images/s, each as a ratio to ``vq`` measured in the same
process — CRT's regulariser is ~5% of FLOPs in the paper; this shows what it costs here.
Shapes follow the quickstart configs (32×32 images, 8×8 latent grid).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from lmgen.tokenizer_module import TokenizerModule
from lmgen.tokenizers import build_tokenizer

ARMS = {
    "vq": {"name": "vq"},
    "crt": {"name": "crt", "crt_ramp_steps": 0},
    "crt (lfq)": {"name": "crt", "quantizer": "lfq", "crt_ramp_steps": 0},
    "causal1d (32 tokens)": {"name": "causal1d", "num_tokens": 32, "query_width": 64},
}


def measure(cfg: dict, batch: int, steps: int, channels: int) -> tuple[float, float]:
    """(forward FLOPs per image, seconds per training step) for one tokenizer config."""
    tok = build_tokenizer({"channels": channels, **cfg}, 32)
    module = TokenizerModule(tok.train())
    opt = torch.optim.AdamW(tok.parameters(), lr=1e-4)
    x = torch.rand(batch, 3, 32, 32) * 2 - 1
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        tok(x[:1], step=None)
    timings = []
    for i in range(steps + 2):  # two warm-up steps
        start = time.perf_counter()
        loss = module._losses(x, step=10_000)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 2:
            timings.append(time.perf_counter() - start)
    return counter.get_total_flops(), sorted(timings)[len(timings) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--channels", type=int, default=16)
    args = parser.parse_args()
    rows = {name: measure(cfg, args.batch, args.steps, args.channels) for name, cfg in ARMS.items()}
    base_flops, base_time = rows["vq"]
    print(f"stage-1 step, batch {args.batch}, channels {args.channels}, {torch.get_num_threads()} threads, "
          f"median of {args.steps} steps")
    print(f"{'tokenizer':<22} {'MFLOP/img':>10} {'× vq':>6} {'s/step':>8} {'img/s':>8} {'× vq time':>10}")
    for name, (flops, seconds) in rows.items():
        print(f"{name:<22} {flops / 1e6:>10.1f} {flops / base_flops:>6.2f} {seconds:>8.3f} "
              f"{args.batch / seconds:>8.0f} {seconds / base_time:>10.2f}")


if __name__ == "__main__":
    main()
