"""Autoregressive sampling from the Llama: KV cache, temperature, top-k/top-p, batched CFG.

One code path for every tokenizer arm: the caller's sequence layout supplies the prompt
(BOS/class ids), the ids that may be sampled (`allowed`) and the EOS id of codec streams.
Sub-code models (`model.cfg.subcodes`, ELM / MAGVIT-v2) sample each head independently and
join the sub-codes into the composite id.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lmgen.llama import KVCache, Llama, join_subcodes

CFG_SCHEDULES = ("constant", "linear")


@dataclass(frozen=True)
class Generation:
    """Sampled continuations of B prompts.

    tokens: (B, max budget) int64, row i's new ids from column 0 (right after its own
        prompt); a finished row holds its EOS at index lengths[i] and pad_id after it (pad_id
        also past a row's budget, and at the tail when generation stopped early for all rows).
    lengths: (B,) int64, generated tokens before EOS (EOS excluded); the row's budget if none.
    finished: (B,) bool, True where EOS was produced.
    """

    tokens: Tensor
    lengths: Tensor
    finished: Tensor


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Top-k, then nucleus (top-p) filtering; dropped ids get -inf.

    logits: (B, V) float, returned as float32. top_k=0 and top_p=1.0 switch a filter off.
    The top token always survives; ties with the k-th logit are kept. Top-p keeps the
    smallest set of highest-probability ids whose mass reaches top_p (Holtzman et al. 2020).
    """
    if top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1, got {top_k}, {top_p}")
    logits = logits.float()
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly better ids
        drop_sorted = mass_before >= top_p  # the first id has 0 before it: always kept
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocab order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def cfg_scale_at(step: int, max_new_tokens: int, cfg_scale: float, schedule: str) -> float:
    """Guidance scale for 0-based step `step`. "linear" ramps from ~1 to cfg_scale as in ELM
    (Xiong et al. 2024, "Elucidating the design space of language models for image
    generation"): s_t = 1 + (s - 1)(t + 1)/N, so early tokens, which fix the layout, are
    guided less."""
    if schedule == "constant":
        return cfg_scale
    if schedule == "linear":
        return 1.0 + (cfg_scale - 1.0) * (step + 1) / max_new_tokens
    raise ValueError(f"unknown cfg_schedule {schedule!r}; choose one of {CFG_SCHEDULES}")


def _sample(logits: Tensor, temperature: float, top_k: int, top_p: float,
            generator: torch.Generator | None) -> Tensor:
    """(B, V) fp32 logits -> (B,) int64 ids; temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    if temperature != 1.0:  # x / 1 == x exactly: skip the op
        logits = logits / temperature
    probs = filter_logits(logits, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _sample_subcodes(logits: Tensor, subcodes: tuple[int, ...], temperature: float, top_k: int,
                     top_p: float, generator: torch.Generator | None) -> Tensor:
    """(B, sum c_j) fp32 logits of n heads -> (B,) int64 composite ids. Each head is tempered,
    filtered and sampled on its own, as ELM samples sub-codes independently."""
    heads = logits.split(list(subcodes), dim=-1)  # n x (B, c_j)
    parts = [_sample(head, temperature, top_k, top_p, generator) for head in heads]
    return join_subcodes(torch.stack(parts, dim=-1), subcodes)  # (B, n) -> (B,)


def _check_subcode_args(model: Llama, allowed: Tensor | None, eos_id: int | None) -> None:
    """Sub-code heads emit image ids only: no EOS, and no mask narrower than every image id."""
    if eos_id is not None:
        raise ValueError(f"eos_id must be None for a sub-code model (subcodes={model.cfg.subcodes}): "
                         "its heads cannot produce EOS")
    if allowed is not None and not bool(allowed[: model.cfg.image_vocab].all()):
        raise ValueError("a sub-code model samples every image id; `allowed` must allow all of "
                         f"[0, {model.cfg.image_vocab}) (masking composite ids is not supported)")


def _guide(logits: Tensor, step: Tensor, budget: Tensor, cfg_scale: float, cfg_schedule: str) -> Tensor:
    """(2B, C) cond-then-uncond logits → (B, C) guided u + s·(c − u), s per row from its own
    0-based new-token index ``step`` (B,) and budget (B,)."""
    cond, uncond = logits.chunk(2)
    if cfg_schedule == "constant":  # a Python scale: no per-step host-to-device tensor (same fp32 product)
        return uncond + cfg_scale * (cond - uncond)
    scale = cfg_scale_at(step, budget, cfg_scale, cfg_schedule).to(logits.dtype)  # (B,)
    return uncond + scale[:, None] * (cond - uncond)


def _check_args(prompt: Tensor, max_new_tokens: int | Tensor, prompt_lengths: Tensor | None,  # noqa: PLR0913
                temperature: float, cfg_schedule: str, uncond_prompt: Tensor | None) -> tuple[Tensor, Tensor]:
    """ValueError for arguments `generate` cannot honour; else the (B,) int64 budgets and prompt lengths."""
    B, P = prompt.shape
    budget = torch.as_tensor(max_new_tokens, dtype=torch.long, device=prompt.device).expand(B).clone()
    if B == 0 or int(budget.min()) < 1 or temperature < 0:
        raise ValueError(f"need a non-empty prompt, max_new_tokens >= 1 and temperature >= 0, got "
                         f"{B} rows, {max_new_tokens}, {temperature}")
    if cfg_schedule not in CFG_SCHEDULES:
        raise ValueError(f"unknown cfg_schedule {cfg_schedule!r}; choose one of {CFG_SCHEDULES}")
    if uncond_prompt is not None and uncond_prompt.shape != prompt.shape:
        raise ValueError(f"uncond_prompt {tuple(uncond_prompt.shape)} != prompt {tuple(prompt.shape)}")
    if prompt_lengths is None:
        return budget, torch.full((B,), P, dtype=torch.long, device=prompt.device)
    plen = prompt_lengths.to(device=prompt.device, dtype=torch.long)
    if plen.shape != (B,) or int(plen.min()) < 1 or int(plen.max()) > P:
        raise ValueError(f"prompt_lengths must be (B,) = ({B},) values in [1, {P}], got {prompt_lengths}")
    return budget, plen


def _write(tokens: Tensor, nxt: Tensor, new: Tensor, out: Tensor) -> None:
    """tokens[i, new[i]] = nxt[i] in place for the rows where out[i]; (B, W), (B,), (B,), (B,) bool.
    A gather/scatter pair instead of boolean indexing, which waits for the device to count rows."""
    col = new.clamp(0, tokens.shape[1] - 1)[:, None]  # (B, 1): rows outside `tokens` write back what is there
    tokens.scatter_(1, col, torch.where(out[:, None], nxt[:, None], tokens.gather(1, col)))


@torch.no_grad()
def generate(  # noqa: PLR0913 -- keyword-only knobs, one per sampling config field
    model: Llama,
    prompt: Tensor,
    max_new_tokens: int | Tensor,
    *,
    prompt_lengths: Tensor | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    cfg_scale: float = 1.0,
    uncond_prompt: Tensor | None = None,
    cfg_schedule: str = "constant",
    allowed: Tensor | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Generation:
    """Sample up to `max_new_tokens` ids after each prompt row.

    prompt: (B, P) int64, e.g. [BOS, class id], or [class id, first image ids] for prefix
    completion. prompt_lengths: (B,) int64 in [1, P] when rows have prompts of different
    lengths (row i's prompt is prompt[i, :prompt_lengths[i]], right-padded with anything);
    None means every row's prompt is all P columns. max_new_tokens: an int, or (B,) int64
    per-row budgets (>= 1) counted after each row's own prompt.

    uncond_prompt: (B, P) int64, the same layout with the null class, used for
    classifier-free guidance when cfg_scale != 1; it shares `prompt_lengths`. Cond and
    uncond rows run as one 2B batch (LlamaGen) and both are fed the sampled token; the
    guided logits are u + s * (c - u). allowed: (V,) bool, ids outside it are never sampled
    (masked to -inf before filtering; so EOS is only produced if allowed). With use_cache,
    the shortest prompt is prefilled in one forward and each step feeds one token to a
    cache of max(P_i + budget_i); rows whose prompt is longer are fed their own prompt ids
    (teacher forcing) until it ends, then sample. use_cache=False recomputes the full
    sequence every step (reference path). Softmax and filters run in fp32, so the call
    works under bf16 autocast. The linear CFG schedule counts each row's own new tokens.

    Sub-code models: guidance mixes the concatenated logits of the n heads, then each head is
    sampled independently (temperature 0: argmax per head; top-k/top-p per head) and the
    composite id is fed back and returned. `allowed` must then allow every image id (as
    `layout.allowed()` of a fixed grid does) and is otherwise unused; eos_id must be None.

    Block-causal models (``model.cfg.blocks``, VAR) sample a whole block per forward: every row's
    prompt must be the same whole number of blocks, and ``_generate_blocks`` runs instead.

    Returns tokens (B, max budget) aligned at each row's prompt end.
    """
    B = prompt.shape[0]
    device = prompt.device
    budget, plen = _check_args(prompt, max_new_tokens, prompt_lengths, temperature, cfg_schedule, uncond_prompt)
    if model.cfg.blocks:
        return _generate_blocks(model, prompt, budget, plen, temperature=temperature, top_k=top_k, top_p=top_p,
                                cfg_scale=cfg_scale, uncond_prompt=uncond_prompt, cfg_schedule=cfg_schedule,
                                allowed=allowed, eos_id=eos_id, pad_id=pad_id, generator=generator,
                                use_cache=use_cache)
    subcodes = model.cfg.subcodes
    if subcodes:
        _check_subcode_args(model, allowed, eos_id)
        allowed = None  # every image id is allowed, and the heads cannot emit specials
    guided = cfg_scale != 1.0 and uncond_prompt is not None
    full = torch.cat([prompt, uncond_prompt]) if guided else prompt  # (B or 2B, P): forced ids
    copies = 2 if guided else 1
    start = int(plen.min())  # positions < start are prefilled together
    prompt_end = int(plen.max())  # positions >= prompt_end feed sampled ids in every row
    end = int((plen + budget).max())  # one past the last position any row fills
    width = int(budget.max())
    # Per-step work stays on the device: the mask is moved and inverted once, tokens are written
    # by a scatter (`_write`), and without EOS no row can stop early (every row runs to `end`),
    # so the early-stop test, a host sync, runs only with an EOS.
    banned = None if allowed is None else ~allowed.to(device)

    tokens = torch.full((B, width), pad_id, dtype=torch.long, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    seq = full[:, :start]
    cache: KVCache | None = model.new_cache(seq.shape[0], end) if use_cache else None
    logits = model(seq, cache)[:, -1]  # (B or 2B, C) fp32: prefill
    for pos in range(start, end):
        new = pos - plen  # (B,) index of this position among each row's new tokens (< 0: prompt)
        out = (new >= 0) & (new < budget)  # rows whose position lands in `tokens` (pad after EOS)
        sampling = out & ~finished  # rows that sample at this position
        if guided:
            logits = _guide(logits, new.clamp(min=0), budget, cfg_scale, cfg_schedule)  # (B, C)
        if banned is not None:
            logits = logits.masked_fill(banned, float("-inf"))
        if subcodes:
            nxt = _sample_subcodes(logits, subcodes, temperature, top_k, top_p, generator)  # (B,)
        else:
            nxt = _sample(logits, temperature, top_k, top_p, generator)  # (B,)
        nxt = torch.where(sampling, nxt, pad_id)
        _write(tokens, nxt, new, out)
        is_eos = sampling & (nxt == (-1 if eos_id is None else eos_id))  # ids are >= 0: never -1
        lengths += (sampling & ~is_eos).long()
        finished |= is_eos
        if pos == end - 1 or (eos_id is not None and bool((finished | (new + 1 >= budget)).all())):
            break
        feed = nxt.repeat(copies)  # (B or 2B,): cond rows, then uncond rows
        if pos < prompt_end:  # rows still inside their own prompt are fed its next id (teacher forcing)
            feed = torch.where((new < 0).repeat(copies), full[:, pos], feed)
        if cache is not None:
            logits = model(feed[:, None], cache)[:, -1]
        else:
            seq = torch.cat([seq, feed[:, None]], dim=1)
            logits = model(seq)[:, -1]
    return Generation(tokens=tokens, lengths=lengths, finished=finished)


def _generate_blocks(  # noqa: PLR0913 -- generate's knobs
    model: Llama, prompt: Tensor, budget: Tensor, plen: Tensor, *, temperature: float, top_k: int, top_p: float,
    cfg_scale: float, uncond_prompt: Tensor | None, cfg_schedule: str, allowed: Tensor | None, eos_id: int | None,
    pad_id: int, generator: torch.Generator | None, use_cache: bool,
) -> Generation:
    """``generate`` for a block-causal model (VAR's next-scale prediction): one forward per block
    samples all of its positions at once (each position's logits guided, masked and sampled as a
    token of ``generate``), then the next block's inputs are gathered from what was sampled.

    Every row's prompt is the cond token plus the same whole blocks' ids (prefix completion cuts
    after whole scales); the rest of the sequence is sampled, so each row's budget must cover it.
    """
    if eos_id is not None:
        raise ValueError("a block-causal model writes fixed-length blocks: eos_id must be None")
    B, device = prompt.shape[0], prompt.device
    blocks, positions = model.cfg.blocks, len(model.cfg.parents)
    starts = [sum(blocks[:k]) for k in range(len(blocks))]  # first input position of each block
    p = int(plen[0])
    if bool((plen != p).any()) or p - 1 not in starts:
        raise ValueError(f"a block-causal model needs every row's prompt to end after the same whole block: "
                         f"prompt lengths {sorted(set(plen.tolist()))}, allowed {[s + 1 for s in starts]}")
    new = positions + 1 - p  # the ids still to sample
    if int(budget.min()) < new:
        raise ValueError(f"max_new_tokens {int(budget.min())} < the {new} ids the remaining blocks hold")
    guided = cfg_scale != 1.0 and uncond_prompt is not None
    seq = torch.full((2 * B if guided else B, positions + 1), pad_id, dtype=torch.long, device=device)
    seq[:B, :p] = prompt[:, :p]
    if guided:
        seq[B:, :p] = uncond_prompt[:, :p]
    banned = None if allowed is None else ~allowed.to(device)
    cache = model.new_cache(seq.shape[0], positions) if use_cache else None
    first = starts.index(p - 1)
    if cache is not None and starts[first]:  # the prompt's own blocks, prefilled in one forward
        model(model.block_inputs(seq, 0, starts[first]), cache)
    for k in range(first, len(blocks)):
        a, b = starts[k], starts[k] + blocks[k]
        logits = model(model.block_inputs(seq, a, b), cache) if cache is not None else model(seq[:, :b])[:, a:b]
        n, width = b - a, logits.shape[-1]
        if guided:  # (2B, n, C) → (B·n, C), each position's scale from its own index among the new ids
            cond, uncond = logits.chunk(2)
            step = (torch.arange(a, b, device=device) - (p - 1)).repeat(B)
            logits = _guide(torch.cat([cond.reshape(-1, width), uncond.reshape(-1, width)]), step,
                            torch.full_like(step, new), cfg_scale, cfg_schedule)
        else:
            logits = logits.reshape(-1, width)
        if banned is not None and not model.cfg.subcodes:
            logits = logits.masked_fill(banned, float("-inf"))
        if model.cfg.subcodes:
            nxt = _sample_subcodes(logits, model.cfg.subcodes, temperature, top_k, top_p, generator)
        else:
            nxt = _sample(logits, temperature, top_k, top_p, generator)
        seq[:, 1 + a : 1 + b] = nxt.view(B, n).repeat(seq.shape[0] // B, 1)
    tokens = torch.full((B, int(budget.max())), pad_id, dtype=torch.long, device=device)
    tokens[:, :new] = seq[:B, p:]
    return Generation(tokens=tokens, lengths=torch.full((B,), new, dtype=torch.long, device=device),
                      finished=torch.zeros(B, dtype=torch.bool, device=device))
