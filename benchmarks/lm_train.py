"""Stage-2 training step: our Llama beside Hugging Face's, and beside the machine's matmul ceiling.

    python benchmarks/lm_train.py [--repeats 5] [--threads N] [--precision auto] [--sizes nano,micro,mini,small]

Table 1 — one training step (forward, loss, backward, gradient clipping, AdamW) at the shapes
the quickstart trains (micro Llama: a 64-token VQ grid at batch 32, 1024 palette pixels at
batch 16). Ours is ``ARModule.loss`` with the optimiser of ``ARModule.configure_optimizers``,
eager and with ``train.compile``; the peer is ``transformers.LlamaForCausalLM`` built by
``lmgen.hf_export.to_hf`` from the same weights (so the same config), its logits through the
same cross-entropy and a default ``torch.optim.AdamW``, eager and compiled. Arms are timed in
turns (median of ``--repeats``), so a busy machine slows them alike; the ratio is the figure.

Table 2 — achieved training FLOP/s (``Llama.flops_per_token`` × tokens/s, the numerator of
``lm/mfu``) per named size, as a share of a dense matmul in the training dtype measured in the
same run (``lmgen.perf.matmul_ceiling``, the practical peak of this device).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lmgen.ar_module import ARModule, OptimConfig, SpeedConfig
from lmgen.data import SequenceBatch, SequenceLayout
from lmgen.hf_export import to_hf
from lmgen.llama import llama_config
from lmgen.perf import ceiling_size, interleaved, markdown_table, matmul_ceiling, precision_dtype, resolve_precision

SHAPES = [  # (label, size, image vocab, tokens per image, batch) — the quickstart's stage 2
    ("micro, VQ 1k 8×8 grid", "micro", 1024, 64, 32),
    ("micro, pixels palette 64, 32×32", "micro", 64, 1024, 16),
]


def batch_of(layout: SequenceLayout, batch: int, device: torch.device) -> SequenceBatch:
    """Random image ids in the layout (class token first): the step's cost does not depend on the values."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, layout.vocab_size, (batch, layout.max_tokens), generator=g)
    labels = torch.randint(0, layout.num_classes, (batch,), generator=g)
    seq = layout.sequences(ids, torch.full((batch,), layout.max_tokens), labels)
    return SequenceBatch(seq[:, :-1].to(device), seq[:, 1:].to(device), labels.to(device))


def our_step(module: ARModule, batch: SequenceBatch, autocast: torch.autocast) -> Callable[[], None]:
    """What Lightning runs per batch for ARModule: loss, backward, clip at 1.0, AdamW, zero grads."""
    optimizer = module.configure_optimizers()["optimizer"]

    def step() -> None:
        with autocast:
            loss, _ = module.loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def hf_step(hf: torch.nn.Module, batch: SequenceBatch, pad: int, autocast: torch.autocast,
            compiled: bool) -> Callable[[], None]:
    """The peer: LlamaForCausalLM logits, the same cross-entropy, a default torch AdamW."""
    optimizer = torch.optim.AdamW(hf.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.05)

    def loss_fn(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = hf(input_ids=inputs).logits.float()  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=pad)
    loss_of = torch.compile(loss_fn) if compiled else loss_fn

    def step() -> None:
        with autocast:
            loss = loss_of(batch.inputs, batch.targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def module_for(size: str, layout: SequenceLayout, compile: bool, device: torch.device) -> ARModule:
    torch.manual_seed(0)
    module = ARModule(llama_config(size, layout.total_vocab, layout.seq_len), layout,
                      OptimConfig(class_dropout=0.0), SpeedConfig(compile=compile))
    return module.to(device)


def versus_hf(args: argparse.Namespace, device: torch.device, precision: str) -> str:
    autocast = torch.autocast(device.type, dtype=precision_dtype(precision), enabled=precision.startswith("bf16"))
    rows = []
    for label, size, vocab, tokens, batch_size in SHAPES:
        layout = SequenceLayout(vocab, tokens, num_classes=10, variable_length=False)
        batch = batch_of(layout, batch_size, device)
        eager, compiled = module_for(size, layout, False, device), module_for(size, layout, True, device)
        arms = {"ours": our_step(eager, batch, autocast), "ours, compiled": our_step(compiled, batch, autocast),
                "HF": hf_step(to_hf(eager.model).to(device), batch, layout.pad, autocast, compiled=False),
                "HF, compiled": hf_step(to_hf(eager.model).to(device), batch, layout.pad, autocast, compiled=True)}
        for step in arms.values():  # compile, and let every arm settle
            step()
        seconds = interleaved(arms, device, repeats=args.repeats, inner=args.inner)
        tokens_per_step = batch_size * (layout.seq_len - 1)
        for name, s in seconds.items():
            rows.append([label if name == "ours" else "", name, f"{s * 1e3:.1f}", f"{tokens_per_step / s:,.0f}",
                         f"{seconds['HF'] / s:.2f}×"])
    return markdown_table(["shape", "arm", "ms/step", "tokens/s", "÷ HF eager"], rows)


def versus_ceiling(args: argparse.Namespace, device: torch.device, precision: str) -> str:
    autocast = torch.autocast(device.type, dtype=precision_dtype(precision), enabled=precision.startswith("bf16"))
    ceiling = matmul_ceiling(device, precision_dtype(precision))
    rows = []
    for size in args.sizes.split(","):
        layout = SequenceLayout(1024, args.tokens, num_classes=10, variable_length=False)
        batch = batch_of(layout, args.batch, device)
        arms = {"eager": our_step(module_for(size, layout, False, device), batch, autocast),
                "compiled": our_step(module_for(size, layout, True, device), batch, autocast)}
        for step in arms.values():
            step()
        seconds = interleaved(arms, device, repeats=args.repeats, inner=args.inner)
        model = module_for(size, layout, False, device).model
        flops = model.flops_per_token(layout.seq_len - 1) * args.batch * (layout.seq_len - 1)
        row = [size, f"{model.num_params(non_embedding=True) / 1e6:.2f}"]
        for name in arms:
            achieved = flops / seconds[name]
            row += [f"{achieved / 1e9:.1f}", f"{achieved / ceiling:.0%}"]
        rows.append(row)
    header = ["size", "params (M, non-emb.)", "eager GFLOP/s", "eager ÷ ceiling", "compiled GFLOP/s",
              "compiled ÷ ceiling"]
    side = ceiling_size(device)
    return (f"dense {precision_dtype(precision)} matmul ceiling ({side}³, same run): {ceiling / 1e9:.1f} GFLOP/s; "
            f"batch {args.batch} × {layout.seq_len - 1} tokens\n\n" + markdown_table(header, rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed turns per arm (median reported)")
    parser.add_argument("--inner", type=int, default=2, help="steps per timed turn")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument("--precision", default="auto", help="auto | 32-true | bf16-mixed (auto: bf16 where it is fast)")
    parser.add_argument("--sizes", default="nano,micro,mini,small", help="LLAMA_SIZES for table 2")
    parser.add_argument("--batch", type=int, default=8, help="table 2 batch")
    parser.add_argument("--tokens", type=int, default=512, help="table 2 tokens per sequence")
    parser.add_argument("--skip-hf", action="store_true", help="table 2 only")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(args.precision, "auto")
    name = torch.cuda.get_device_name() if device.type == "cuda" else torch.backends.cpu.get_cpu_capability()
    print(f"device {device} ({name}), {torch.get_num_threads()} threads, precision {precision}, "
          f"torch {torch.__version__}\n")
    if not args.skip_hf:
        print(versus_hf(args, device, precision) + "\n")
    print(versus_ceiling(args, device, precision))


if __name__ == "__main__":
    main()
