"""Sampling speed: lmgen's KV-cache sampler vs Hugging Face `generate` on the same weights.

    python benchmarks/sampling.py [--size micro] [--batch 16] [--tokens 256] [--repeats 5]
        [--cache-tokens 256,1024] [--cache-batch 16] [--threads N] [--device cuda|cpu] [--bf16]

One random-init Llama of a named size (`LLAMA_SIZES`) over ``--vocab`` image ids plus a
class-conditional fixed-grid layout's specials, and its `to_hf` twin (same weights). Every
arm starts from the same prompt, one class token per row, and produces exactly ``--tokens``
new ids per row (no EOS: HF gets ``min_new_tokens = max_new_tokens``; both mask the layout's
specials, ours through ``allowed``, HF's through ``suppress_tokens``), with the same
temperature and top-k. Rows of the table:

- lmgen ``generate`` vs HF ``generate(do_sample=True)``, without CFG and with CFG (ours: the
  cond and null-class rows as one batch of 2B; HF: ``guidance_scale`` + ``negative_prompt_ids``,
  its UnbatchedClassifierFreeGuidanceLogitsProcessor, a second forward of B rows per step).
  HF's guidance mixes log-softmaxed scores, ours raw logits: the same work, not the same law.
- lmgen's KV-cache path vs its ``use_cache=False`` reference path (full recompute every step)
  at each of ``--cache-tokens``; the no-cache arm grows as tokens², so on a CPU give it a
  small ``--cache-batch`` (2 cores, micro: ~1 min per 1024-token repeat at batch 2).

Tokens/s counts new ids of the B output rows (not CFG's extra rows). Arms are interleaved
within each repeat, after one warm-up call each, so a shared machine's noise hits them alike;
the figure is the median over ``--repeats``, and the ratio (ours / peer) is the result.
Before timing, greedy decoding of both models is compared token for token. fp32 by default;
``--bf16`` runs both under bf16 autocast (slow on CPUs without AMX / AVX512-BF16).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import torch

from lmgen.data import SequenceLayout
from lmgen.hf_export import to_hf
from lmgen.llama import LLAMA_SIZES, Llama, llama_config
from lmgen.perf import interleaved, resolve_precision
from lmgen.sampling import generate


def build(size: str, vocab: int, max_len: int, device: torch.device) -> tuple[Llama, object, SequenceLayout]:
    """(our Llama, its LlamaForCausalLM twin, the layout): random init, eval mode, fp32, on device."""
    layout = SequenceLayout(vocab, max_len, num_classes=10, variable_length=False)
    torch.manual_seed(0)
    model = Llama(llama_config(size, layout.total_vocab, 1 + max_len)).to(device).eval()
    hf = to_hf(model, bos_token_id=layout.bos, eos_token_id=layout.eos, pad_token_id=layout.pad)
    return model, hf, layout


def ours(model: Llama, layout: SequenceLayout, batch: int, tokens: int, args, *, cfg_scale: float = 1.0,
         use_cache: bool = True) -> Callable[[], None]:
    """One call of lmgen's sampler: ``tokens`` new ids for each of ``batch`` class prompts."""
    device = model.head.weight.device
    prompt = layout.cond_tokens(torch.arange(batch) % layout.num_classes, batch).to(device)  # (B, 1)
    uncond = layout.null_tokens(batch).to(device) if cfg_scale != 1.0 else None
    allowed = layout.allowed().to(device)

    def run() -> None:
        out = generate(model, prompt, tokens, temperature=args.temperature, top_k=args.top_k, cfg_scale=cfg_scale,
                       uncond_prompt=uncond, allowed=allowed, pad_id=layout.pad, use_cache=use_cache,
                       generator=torch.Generator(device).manual_seed(0))
        assert out.tokens.shape == (batch, tokens)

    return run


def peer(hf, layout: SequenceLayout, batch: int, tokens: int, args, *, cfg_scale: float = 1.0) -> Callable[[], None]:
    """One call of HF generate on the same prompts; checks it produced exactly ``tokens`` ids."""
    device = hf.device
    prompt = layout.cond_tokens(torch.arange(batch) % layout.num_classes, batch).to(device)
    banned = (~layout.allowed()).nonzero().flatten().tolist()
    extra = {}
    if cfg_scale != 1.0:
        extra = dict(guidance_scale=cfg_scale, negative_prompt_ids=layout.null_tokens(batch).to(device))

    def run() -> None:
        torch.manual_seed(0)
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=args.temperature,
                          top_k=args.top_k, top_p=1.0, max_new_tokens=tokens, min_new_tokens=tokens,
                          suppress_tokens=banned, pad_token_id=layout.pad, eos_token_id=layout.eos, **extra)
        if out.shape != (batch, 1 + tokens):
            raise RuntimeError(f"HF generate returned {tuple(out.shape)}, expected ({batch}, {1 + tokens})")

    return run


def greedy_check(model: Llama, hf, layout: SequenceLayout, batch: int, tokens: int = 32) -> str:
    """Whether both models decode the same greedy tokens (fp32): a check that they share weights."""
    device = model.head.weight.device
    prompt = layout.cond_tokens(torch.arange(batch) % layout.num_classes, batch).to(device)
    a = generate(model, prompt, tokens, temperature=0, allowed=layout.allowed().to(device), pad_id=layout.pad).tokens
    b = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=tokens,
                    min_new_tokens=tokens, suppress_tokens=(~layout.allowed()).nonzero().flatten().tolist(),
                    pad_token_id=layout.pad, eos_token_id=layout.eos)[:, 1:]
    same = int((a == b).all(dim=1).sum())
    return f"greedy {tokens} tokens identical in {same}/{batch} rows"


def measure(arms: dict[str, Callable[[], None]], repeats: int, device: torch.device, bf16: bool) -> dict[str, float]:
    """Median seconds per call of each arm: one warm-up each, then ``repeats`` interleaved rounds."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16), torch.no_grad():
        return interleaved(arms, device, repeats=repeats)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="micro", choices=list(LLAMA_SIZES))
    parser.add_argument("--vocab", type=int, default=1024, help="image ids (the layout adds BOS/EOS/PAD/classes)")
    parser.add_argument("--batch", type=int, default=16, help="rows of the lmgen vs HF arms")
    parser.add_argument("--tokens", type=int, default=256, help="new ids per row of the lmgen vs HF arms")
    parser.add_argument("--cfg-scale", type=float, default=2.0)
    parser.add_argument("--cache-tokens", default="256,1024", help="comma-separated lengths of the cache vs no-cache rows")
    parser.add_argument("--cache-batch", type=int, default=None, help="rows of the cache vs no-cache arms (default --batch)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads (default: all cores)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for both (default fp32)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import transformers

    transformers.logging.set_verbosity_error()  # generation-flag notices, not results
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cache_tokens = [int(n) for n in args.cache_tokens.split(",") if n]
    cache_batch = args.cache_batch or args.batch
    model, hf, layout = build(args.size, args.vocab, max([args.tokens, *cache_tokens]), device)
    check = greedy_check(model, hf, layout, min(args.batch, 4))
    arms = {"ours": ours(model, layout, args.batch, args.tokens, args),
            "hf": peer(hf, layout, args.batch, args.tokens, args),
            "ours cfg": ours(model, layout, args.batch, args.tokens, args, cfg_scale=args.cfg_scale),
            "hf cfg": peer(hf, layout, args.batch, args.tokens, args, cfg_scale=args.cfg_scale)}
    for n in cache_tokens:
        arms[f"cache {n}"] = ours(model, layout, cache_batch, n, args)
        arms[f"no cache {n}"] = ours(model, layout, cache_batch, n, args, use_cache=False)
    seconds = measure(arms, args.repeats, device, args.bf16)

    precision = "bf16 autocast" if args.bf16 else "fp32"
    if args.bf16 and device.type == "cpu" and resolve_precision("auto", "cpu") != "bf16-mixed":
        precision += " (this CPU has no fast bf16)"
    print(f"sampling, Llama {args.size} ({model.num_params() / 1e6:.2f}M params, V={layout.total_vocab}), "
          f"{device.type}, {torch.get_num_threads()} threads, {precision}, transformers {transformers.__version__} "
          f"({hf.config._attn_implementation} attention), temperature {args.temperature}, top-k {args.top_k}, "
          f"median of {args.repeats}; {check}\n")
    print("| comparison | batch | new tokens | ours tok/s | peer tok/s | ours / peer |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    rows = [("lmgen vs HF generate", "ours", "hf", args.batch, args.tokens),
            (f"lmgen vs HF generate, CFG {args.cfg_scale:g}", "ours cfg", "hf cfg", args.batch, args.tokens)]
    rows += [("KV cache vs use_cache=False (lmgen)", f"cache {n}", f"no cache {n}", cache_batch, n) for n in cache_tokens]
    for label, a, b, batch, n in rows:
        tok_a, tok_b = batch * n / seconds[a], batch * n / seconds[b]
        print(f"| {label} | {batch} | {n} | {tok_a:,.0f} | {tok_b:,.0f} | {tok_a / tok_b:.2f} |")


if __name__ == "__main__":
    main()
