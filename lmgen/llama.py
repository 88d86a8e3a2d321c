"""The one Llama that every tokenizer arm trains (stage 2).

A decoder-only Llama (RMSNorm, RoPE, SwiGLU, no biases, untied head), written to be read in
one sitting. Parameter names and the rotary convention follow Hugging Face's
`LlamaForCausalLM` (rotate_half over split halves, not interleaved pairs), so exporting to
`transformers` (`lmgen.hf_export.to_hf`) is a renaming of keys with no weight permutation:

    embed            -> model.embed_tokens
    layers.i.attn_norm / ffn_norm -> model.layers.i.input_layernorm / post_attention_layernorm
    layers.i.attn.{wq,wk,wv,wo}   -> model.layers.i.self_attn.{q,k,v,o}_proj
    layers.i.mlp.{w1,w3,w2}       -> model.layers.i.mlp.{gate,up,down}_proj
    norm, head       -> model.norm, lm_head

Sub-code vocabularies (ELM's "n-c" bits, MAGVIT-v2's 2 x 2^9): with `subcodes = (c_1..c_n)`
an image id is composite, id = sum_j s_j * prod_{k<j} c_k (sub-code 0 = least significant
digit), and still takes ONE transformer position. It is embedded as the sum of n per-sub-code
embeddings ("sum") or their concatenation projected back to D ("concat", as ELM); special ids
(>= prod c_j) keep the ordinary `embed` table. The output is n independent heads stored as one
Linear(D, C): logits are the n heads' logits side by side, and `token_nll` sums the heads'
cross-entropies, so bits per image compare with ordinary vocabularies. (Such models have no
`LlamaForCausalLM` equivalent.)

Block-causal attention (VAR's next-scale prediction; ``blocks``/``parents`` set): the input
positions form blocks of ``blocks`` lengths (a tokenizer written in blocks, e.g. one per scale
of ``multiscale``), a position attends to every position of its own and earlier blocks, and the
id embedded at position p is not the sequence's id at p but the one at ``parents[p]`` (VAR's
input for scale k: the coarser scale k−1, brought to scale k's grid), so block k predicts all of
its targets at once from what precedes it. Without a cache, ``forward`` takes the sequence's own
ids and gathers the parents itself; with a cache (generation, block by block) it takes the
gathered inputs of the new positions, ``block_inputs(seq, start, end)``.

Shapes: B batch, T time (tokens in this call), S keys attended (cache length + T),
D model dim, H query heads, K key/value heads, Hd head dim, F ffn dim, V vocab (all ids),
n sub-codes, C = out_dim (V, or sum_j c_j with sub-codes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Named sizes. The GPU sizes are LlamaGen's GPT-B/L/XL (Sun et al. 2024, Table 1: 111M /
# 343M / 775M at vocab 16384); LlamaGen rounds the SwiGLU width to a multiple of 256, which
# is what puts the counts on theirs. The CPU sizes are for tests and laptop sweeps.
LLAMA_SIZES: dict[str, dict] = {
    "nano": dict(n_layers=2, n_heads=2, dim=64),  # ~0.1M non-embedding
    "micro": dict(n_layers=4, n_heads=4, dim=128),  # ~0.8M
    "mini": dict(n_layers=6, n_heads=8, dim=256),  # ~4.8M
    "small": dict(n_layers=12, n_heads=6, dim=384),  # ~21M
    "B": dict(n_layers=12, n_heads=12, dim=768, multiple_of=256),  # ~111M at V=16384
    "L": dict(n_layers=24, n_heads=16, dim=1024, multiple_of=256),  # ~343M
    "XL": dict(n_layers=36, n_heads=20, dim=1280, multiple_of=256),  # ~775M
}
SUBCODE_EMBEDS = ("sum", "concat")


@dataclass
class LlamaConfig:
    """Architecture of one Llama; `vocab_size` includes the sequence layout's specials."""

    vocab_size: int
    n_layers: int
    n_heads: int
    dim: int
    n_kv_heads: int | None = None  # grouped-query attention; None = n_heads (plain MHA)
    ffn_dim: int | None = None  # None = Llama rule: 2/3 * 4 * dim rounded up to multiple_of
    multiple_of: int = 32
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    subcodes: tuple[int, ...] = ()  # () = ordinary vocabulary; else image ids split into these
    subcode_embed: str = "sum"  # how a position's n sub-code embeddings combine: SUBCODE_EMBEDS
    # Block-causal attention (module docstring): lengths of the attention blocks over the input
    # positions, and for each input position the position whose id it embeds. () = causal.
    blocks: tuple[int, ...] = ()
    parents: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.subcodes = tuple(int(c) for c in self.subcodes)  # OmegaConf hands over a list
        self.blocks, self.parents = tuple(int(b) for b in self.blocks), tuple(int(p) for p in self.parents)
        if self.blocks or self.parents:
            starts = [sum(self.blocks[:k]) for k in range(len(self.blocks))]
            if any(b < 1 for b in self.blocks) or sum(self.blocks) != len(self.parents) \
                    or len(self.parents) > self.max_seq_len:
                raise ValueError(f"blocks {self.blocks} must be lengths >= 1 that sum to len(parents) = "
                                 f"{len(self.parents)} <= max_seq_len = {self.max_seq_len}")
            # A parent must be known before its block is predicted: at or before the block's start
            # (the block's first input position holds the last id of the previous block).
            late = [p for k, start in enumerate(starts) for p in range(start, start + self.blocks[k])
                    if not 0 <= self.parents[p] <= start]
            if late:
                raise ValueError(f"parents of positions {late[:5]} lie inside their own block or later: "
                                 "block-causal inputs must come from earlier blocks")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.ffn_dim is None:
            hidden = int(2 * 4 * self.dim / 3)
            self.ffn_dim = self.multiple_of * math.ceil(hidden / self.multiple_of)
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"dim={self.dim} must split into {self.n_heads} heads of even size")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.subcode_embed not in SUBCODE_EMBEDS:
            raise ValueError(f"unknown subcode_embed {self.subcode_embed!r}; choose one of {SUBCODE_EMBEDS}")
        if any(c < 2 for c in self.subcodes):
            raise ValueError(f"every sub-code needs >= 2 values, got subcodes={self.subcodes}")
        if self.subcodes and self.image_vocab >= self.vocab_size:
            raise ValueError(f"prod(subcodes)={self.image_vocab} must be < vocab_size={self.vocab_size}, "
                             "which also counts the layout's special ids")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def image_vocab(self) -> int:
        """Ids that are image tokens: prod(subcodes), or vocab_size without sub-codes."""
        return math.prod(self.subcodes) if self.subcodes else self.vocab_size

    @property
    def out_dim(self) -> int:
        """Width C of the logits: sum(subcodes) (n heads side by side), or vocab_size."""
        return sum(self.subcodes) if self.subcodes else self.vocab_size


def llama_config(size: str, vocab_size: int, max_seq_len: int, **overrides) -> LlamaConfig:
    """Build the config of a named size from `LLAMA_SIZES`; `overrides` replace any field."""
    if size not in LLAMA_SIZES:
        raise ValueError(f"unknown Llama size {size!r}; choose one of {sorted(LLAMA_SIZES)}")
    fields = {**LLAMA_SIZES[size], "vocab_size": vocab_size, "max_seq_len": max_seq_len}
    return LlamaConfig(**{**fields, **overrides})


def split_subcodes(ids: Tensor, subcodes: tuple[int, ...]) -> Tensor:
    """Composite ids (...) in [0, prod c_j) -> sub-codes (..., n) int64, s_j in [0, c_j).

    Mixed radix with the first sub-code least significant: s_j = (id // prod_{k<j} c_k) % c_j
    (for a binary code cut into groups of bits, sub-code 0 holds the low bits).
    """
    parts, rest = [], ids.long()
    for c in subcodes:
        parts.append(rest % c)
        rest = rest // c
    return torch.stack(parts, dim=-1)


def join_subcodes(parts: Tensor, subcodes: tuple[int, ...]) -> Tensor:
    """Sub-codes (..., n) -> composite ids (...) int64: sum_j s_j * prod_{k<j} c_k."""
    if parts.shape[-1] != len(subcodes):
        raise ValueError(f"parts have {parts.shape[-1]} sub-codes, subcodes={subcodes} has {len(subcodes)}")
    ids, stride = torch.zeros_like(parts[..., 0], dtype=torch.long), 1
    for j, c in enumerate(subcodes):
        ids = ids + parts[..., j].long() * stride
        stride *= c
    return ids


class KVCache:
    """Preallocated keys/values for incremental decoding; written in place, never concatenated.

    `k[i]`, `v[i]`: (B, K, max_len, Hd) for layer i. `length` counts the positions already
    written; `Llama.forward` writes its T new positions at [length, length + T) in every layer
    and then advances `length` by T.
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, max_len: int,
                 head_dim: int, device: torch.device | str | None, dtype: torch.dtype) -> None:
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, K, T, Hd) at the current length; return all keys/values (B, K, S, Hd)."""
        start, end = self.length, self.length + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:  # (B, T, D) -> (B, T, D), same dtype
        # fp32 statistics: a bf16 mean of squares loses the small activations (as HF Llama).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


class Rotary(nn.Module):
    """cos/sin tables (max_seq_len, Hd) in fp32, HF layout: the Hd/2 frequencies repeated twice."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        cos, sin = self._tables(torch.device("cpu"))
        # Non-persistent: derived from the config, so checkpoints stay free of them.
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, device: torch.device) -> tuple[Tensor, Tensor]:
        inv_freq = self.theta ** -(torch.arange(0, self.head_dim, 2, device=device,
                                                dtype=torch.float64) / self.head_dim)
        angles = torch.outer(torch.arange(self.max_seq_len, device=device, dtype=torch.float64),
                             inv_freq)
        angles = torch.cat([angles, angles], dim=-1)  # (max_seq_len, Hd)
        return angles.cos().float(), angles.sin().float()

    def _apply(self, fn, *args, **kwargs):
        # `model.to(torch.bfloat16)` would round the tables; positions in the thousands need
        # fp32 angles, so rebuild them in fp32 on whatever device the module moved to.
        super()._apply(fn, *args, **kwargs)
        if self.cos.dtype != torch.float32:
            self.cos, self.sin = self._tables(self.cos.device)
        return self

    def tables(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        """(cos, signed sin), each (T, Hd) fp32 at positions pos (T,), looked up once per forward.
        HF rotate_half(x) * sin == roll(x, Hd/2) * sin with its first half negated (bit for bit)."""
        half = self.head_dim // 2
        return self.cos[pos], torch.cat([-self.sin[pos, :half], self.sin[pos, half:]], dim=-1)

    @staticmethod
    def rotate(x: Tensor, tables: tuple[Tensor, Tensor]) -> Tensor:
        """Rotate x (B, H, T, Hd) by `tables(pos)`; computed in fp32, cast back."""
        cos, signed_sin = tables
        xf = x.float()
        return (xf * cos + xf.roll(x.shape[-1] // 2, dims=-1) * signed_sin).to(x.dtype)

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        """Rotate x (B, H, T, Hd) at absolute positions pos (T,)."""
        return self.rotate(x, self.tables(pos))


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], cache: KVCache | None, layer: int,
                mask: Tensor | None = None) -> Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, Hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, Hd)
        q, k = Rotary.rotate(q, rope), Rotary.rotate(k, rope)  # rope: Rotary.tables at these positions
        offset = 0
        if cache is not None:
            offset = cache.length
            k, v = cache.update(layer, k, v)  # (B, K, S, Hd), S = offset + T
            k, v = k.to(q.dtype), v.to(q.dtype)
        y = self._attend(q, k, v, offset, mask)  # (B, H, T, Hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, D)
        return self.wo(y)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, offset: int, mask: Tensor | None = None) -> Tensor:
        """Causal attention of queries (B, H, T, Hd) at positions [offset, offset + T) over keys
        and values (B, K, S, Hd), S = offset + T; query head h reads kv head h // n_rep (HF repeat_kv).
        ``mask`` (T, S) bool, True = may attend: replaces the causal mask (block-causal attention)."""
        B, _, T, _ = q.shape
        n_rep = self.n_heads // self.n_kv_heads
        if mask is not None:
            if n_rep > 1:
                k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if T == 1:  # a decoding step sees every key: no mask, so a kv head's n_rep queries go as one
            # group (B, K, n_rep, Hd); repeating the whole cache every step costs ~8x more under GQA.
            y = F.scaled_dot_product_attention(q.reshape(B, self.n_kv_heads, n_rep, self.head_dim), k, v)
            return y.view(B, self.n_heads, 1, self.head_dim)
        if n_rep > 1:
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        if offset == 0:  # keys == queries: plain causal
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        # A chunk at an offset: query i (absolute offset + i) sees keys j <= offset + i.
        # is_causal would align the mask top-left and hide the cache, hence explicit.
        mask = torch.ones(T, offset + T, dtype=torch.bool, device=q.device).tril(offset)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); w1/w3/w2 = HF gate/up/down."""

    def __init__(self, dim: int, ffn_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, ffn_dim, bias=False)
        self.w3 = nn.Linear(dim, ffn_dim, bias=False)
        self.w2 = nn.Linear(ffn_dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, D) -> (B, T, F) -> (B, T, D)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = FeedForward(cfg.dim, cfg.ffn_dim)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], cache: KVCache | None,
                layer: int, mask: Tensor | None = None) -> Tensor:  # (B, T, D) -> (B, T, D), pre-norm residuals
        x = x + self.attn(self.attn_norm(x), rope, cache, layer, mask)
        return x + self.mlp(self.ffn_norm(x))


class Llama(nn.Module):
    """Decoder-only Llama over token ids; see the module docstring for the HF name mapping."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n = len(cfg.subcodes)
        # With sub-codes `embed` holds only the specials (id - image_vocab); image ids use one
        # table per sub-code. "concat" (ELM): n width-D parts, concatenated (nD) and projected
        # to D, so each sub-code keeps a full-width embedding before they mix.
        self.embed = nn.Embedding(cfg.vocab_size - (cfg.image_vocab if n else 0), cfg.dim)
        self.subcode_embeds = nn.ModuleList(nn.Embedding(c, cfg.dim) for c in cfg.subcodes)
        self.subcode_proj = (nn.Linear(n * cfg.dim, cfg.dim, bias=False)
                             if n and cfg.subcode_embed == "concat" else None)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # Untied head (as LlamaGen): input and output vocab roles differ for specials/classes.
        # With sub-codes: n independent heads as one matmul, output columns in sub-code order.
        self.head = nn.Linear(cfg.dim, cfg.out_dim, bias=False)
        self.rope = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        # Block-causal attention: each input position's block and parent (buffers, not weights).
        block_of = [k for k, length in enumerate(cfg.blocks) for _ in range(length)]
        self.register_buffer("block_of", torch.tensor(block_of, dtype=torch.long), persistent=False)  # (N,)
        self.register_buffer("parents", torch.tensor(cfg.parents, dtype=torch.long), persistent=False)  # (N,)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, init_std) for every matrix; GPT-2-style scaling of the residual projections
        (wo, w2) by 1/sqrt(2 * n_layers) so the residual stream's variance does not grow with
        depth (Radford et al. 2019). Norm gains start at 1."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:
                p.fill_(1.0)
            elif name.endswith(("attn.wo.weight", "mlp.w2.weight")):
                p.normal_(0.0, std / math.sqrt(2 * self.cfg.n_layers))
            else:
                p.normal_(0.0, std)

    def new_cache(self, batch_size: int, max_len: int, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        """An empty cache for `batch_size` streams of up to `max_len` positions.

        device defaults to the model's; dtype to the autocast dtype when autocast is on for
        that device (keys are produced in it), else the model's parameter dtype.
        """
        param = self.head.weight
        device = torch.device(device) if device is not None else param.device
        if dtype is None:
            dtype = (torch.get_autocast_dtype(device.type)
                     if torch.is_autocast_enabled(device.type) else param.dtype)
        if max_len > self.cfg.max_seq_len:
            raise ValueError(f"cache max_len={max_len} exceeds max_seq_len={self.cfg.max_seq_len}")
        return KVCache(self.cfg.n_layers, batch_size, self.cfg.n_kv_heads, max_len,
                       self.cfg.head_dim, device, dtype)

    def embed_ids(self, ids: Tensor) -> Tensor:
        """Input embeddings (B, T) int64 in [0, vocab_size) -> (B, T, D), one vector per id.

        With sub-codes, image ids (< image_vocab) combine their sub-code embeddings (sum, or
        concat + projection) and special ids read `embed` at row id - image_vocab.
        """
        if not self.cfg.subcodes:
            return self.embed(ids)
        image_vocab = self.cfg.image_vocab
        parts = split_subcodes(ids.clamp(max=image_vocab - 1), self.cfg.subcodes)  # (B, T, n)
        embs = [table(parts[..., j]) for j, table in enumerate(self.subcode_embeds)]  # n x (B, T, D)
        if self.subcode_proj is None:
            image = torch.stack(embs).sum(0)  # (B, T, D)
        else:
            image = self.subcode_proj(torch.cat(embs, dim=-1))  # (B, T, nD) -> (B, T, D)
        special = self.embed((ids - image_vocab).clamp(min=0))  # (B, T, D)
        return torch.where((ids < image_vocab)[..., None], image, special)

    def block_inputs(self, seq: Tensor, start: int, end: int) -> Tensor:
        """The ids a block-causal model embeds at positions [start, end): seq's ids at their
        parents, (B, end − start) int64; ``seq`` (B, ≥ parents' reach) holds the sequence so far."""
        return seq.gather(1, self.parents[start:end].to(seq.device).expand(seq.shape[0], -1))

    def _block_mask(self, start: int, end: int) -> Tensor:
        """(end − start, end) bool: positions [start, end) see every position of their own and earlier blocks."""
        return self.block_of[:end][None, :] <= self.block_of[start:end][:, None]

    def forward(self, ids: Tensor, cache: KVCache | None = None) -> Tensor:
        """Next-token logits.

        ids: (B, T) int64 in [0, vocab_size). Without a cache: a full causal pass over positions
        [0, T). With a cache: the ids continue the cached streams at positions
        [cache.length, cache.length + T) (a prompt prefill, then T=1 steps) and the cache
        advances by T. Returns (B, T, C) float32 logits, whatever the autocast dtype: C = V,
        or with sub-codes the n heads' logits concatenated in sub-code order (C = sum c_j).
        Block-causal models (``cfg.blocks``): the module docstring says what ids are then.
        """
        B, T = ids.shape
        start = cache.length if cache is not None else 0
        limit = cache.max_len if cache is not None else self.cfg.max_seq_len
        if start + T > limit:
            raise ValueError(f"positions up to {start + T} exceed the limit {limit}")
        mask = None
        if self.cfg.blocks:
            if start + T > len(self.cfg.parents):
                raise ValueError(f"positions up to {start + T} pass the {len(self.cfg.parents)} block-causal positions")
            if cache is None:
                ids = self.block_inputs(ids, 0, T)
            mask = self._block_mask(start, start + T)
        rope = self.rope.tables(torch.arange(start, start + T, device=ids.device))  # 2 x (T, Hd)
        x = self.embed_ids(ids)  # (B, T, D)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, cache, i, mask)  # (B, T, D)
        if cache is not None:
            cache.length += T
        return self.head(self.norm(x)).float()  # (B, T, C)

    def token_nll(self, logits: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
        """NLL in nats (B, T) float32 of targets (B, T) int64 under logits (B, T, C); 0 where
        targets == ignore_index.

        With sub-codes the targets are composite image ids: the NLL is the sum over heads of
        each head's cross-entropy on its sub-code (the heads are independent, so this is
        -log p(id)). Special targets are invalid then: sub-code grids have no EOS.
        """
        if not self.cfg.subcodes:
            return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none",
                                   ignore_index=ignore_index).view_as(targets)
        keep = targets != ignore_index  # (B, T)
        if bool((keep & ((targets < 0) | (targets >= self.cfg.image_vocab))).any()):
            raise ValueError(f"sub-code targets must be image ids in [0, {self.cfg.image_vocab}) or "
                             f"ignore_index={ignore_index}; specials (EOS ...) cannot be predicted")
        parts = split_subcodes(targets.masked_fill(~keep, 0), self.cfg.subcodes)  # (B, T, n)
        nll = torch.zeros(targets.shape, device=logits.device)
        for j, head in enumerate(logits.split(list(self.cfg.subcodes), dim=-1)):  # (B, T, c_j)
            nll += F.cross_entropy(head.flatten(0, 1).float(), parts[..., j].flatten(),
                                   reduction="none").view_as(targets)
        return nll.masked_fill(~keep, 0.0)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count. non_embedding=True leaves out the vocab-sized matrices (token and
        sub-code embeddings, output head), so sizes compare across tokenizers with different
        vocabs; the concat projection (nD x D) is kept, it is a matmul of the network."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            vocab_sized = [self.embed, *self.subcode_embeds, self.head]
            n -= sum(m.weight.numel() for m in vocab_sized)
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B / Chinchilla style:

            6 * (N_non_embedding + N_head) + 12 * n_layers * dim * seq_len

        6N counts every matmul weight once (2 forward + 4 backward FLOPs per weight; the head,
        C wide, is a matmul, and so is the concat projection of sub-code embeddings; embedding
        tables are lookups, so they are excluded). The second term is attention's
        QK^T and AV (2 * 2 * seq_len * dim per layer forward, x3 for backward), counted over
        the full seq_len x seq_len score matrix as PaLM's MFU does (no causal halving).
        """
        matmul_params = self.num_params(non_embedding=True) + self.head.weight.numel()
        return 6.0 * matmul_params + 12.0 * self.cfg.n_layers * self.cfg.dim * seq_len

