"""fp32 beside bf16 autocast on this machine: why ``train.precision=auto`` trains in fp32 on a CPU.

    python benchmarks/precision.py [--repeats 5] [--threads N]

Three workloads, each timed in fp32 and under bf16 autocast in turns (median of ``--repeats``,
so a busy machine slows both alike): a 2048³ matmul, a 4096×512 @ 512×512 linear layer (the
shape of a Llama projection at batch × tokens = 4096), and one training step (forward, loss,
backward, AdamW) of the nano (the quickstart's), micro and small Llamas on a 64-token VQ grid
at batch 32.
The ratio column is bf16 time ÷ fp32 time: above 1, bf16 is slower. Where bf16 dot products
are native (AVX512-BF16, AMX) a large matmul can run faster in bf16, while a small model's
step, dominated by autocast's casts and elementwise work, runs slower.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch

from lmgen.ar_module import ARModule, OptimConfig
from lmgen.data import SequenceBatch, SequenceLayout
from lmgen.llama import llama_config
from lmgen.perf import interleaved, markdown_table, resolve_precision


def cpu_flags() -> str:
    """The bf16-related instruction sets the CPU reports (AMX, AVX512-BF16), or "none"."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    found = sorted(f for f in flags if f in ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2"))
    return ", ".join(found) or "none"


def lm_step(size: str, bf16: bool) -> callable:
    """One training step of the ``size`` Llama on random VQ-grid sequences (64 tokens, batch 32)."""
    layout = SequenceLayout(vocab_size=1024, max_tokens=64, num_classes=10, variable_length=False)
    torch.manual_seed(0)
    module = ARModule(llama_config(size, layout.total_vocab, layout.seq_len), layout, OptimConfig())
    optimizer = module.configure_optimizers()["optimizer"]
    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(0, 1024, (32, 64), generator=g), torch.randint(0, 10, (32,), generator=g)
    seq = layout.sequences(ids, torch.full((32,), 64), labels)
    batch = SequenceBatch(seq[:, :-1], seq[:, 1:], labels)

    def step() -> None:
        with autocast(bf16):
            loss, _ = module.loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def autocast(bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2048, 2048, generator=g), torch.randn(2048, 2048, generator=g)
    x, linear = torch.randn(4096, 512, generator=g), torch.nn.Linear(512, 512)

    def under(bf16: bool, fn: callable) -> callable:
        def run() -> None:
            with torch.no_grad(), autocast(bf16):
                fn()
        return run

    arms = {"matmul 2048³ fp32": under(False, lambda: a @ b), "matmul 2048³ bf16": under(True, lambda: a @ b),
            "linear 4096×512×512 fp32": under(False, lambda: linear(x)),
            "linear 4096×512×512 bf16": under(True, lambda: linear(x)),
            **{f"{size} step, VQ 8×8, batch 32 {p}": lm_step(size, p == "bf16")
               for size in ("nano", "micro", "small") for p in ("fp32", "bf16")}}
    seconds = interleaved(arms, torch.device("cpu"), repeats=args.repeats)
    rows = []
    for name in list(arms)[::2]:
        label = name.removesuffix(" fp32")
        fp32, bf16 = seconds[name], seconds[f"{label} bf16"]
        rows.append([label, f"{fp32 * 1e3:.1f}", f"{bf16 * 1e3:.1f}", f"{bf16 / fp32:.2f}"])
    print(f"CPU flags: {cpu_flags()}; {torch.get_num_threads()} threads; train.precision=auto picks "
          f"{resolve_precision('auto', 'cpu')} here")
    print(markdown_table(["workload", "fp32 ms", "bf16 autocast ms", "bf16 ÷ fp32"], rows))


if __name__ == "__main__":
    main()
