"""Tokenization speed: every tokenizer's encode/decode, the token cache written with and without
DataLoader workers, and the LM's cache reads batch by batch vs item by item.

    python benchmarks/tokenization.py [--images 1024] [--learned-images 256] [--clips 256]
        [--size 32] [--frames 8] [--workers 2] [--cache-batch 64] [--read-items 1024]
        [--read-batches 300] [--batch 32] [--threads 0]

Table 1, one row per tokenizer of ``lmgen.tokenizers.TOKENIZERS`` at its default config (the
learned ones randomly initialised: speed needs no training), on `shapes` images (h264:
`moving_shapes` clips of ``--frames`` frames): encode and decode items/s on items already in
memory (the tokenizer alone, 256 per call like the cache writer), then items/s of the whole
token-cache build (``TokenCache.build_or_load`` into a temp dir: render, encode, write shards,
``--cache-batch`` items per batch so that every worker gets batches) with ``num_workers=0``; with ``--workers`` workers that only read images while the main process
encodes (how every tokenizer was cached before ``encode_in_workers``, the peer); and with the
workers encoding too (codec and pixel tokenizers, ``encode_in_workers``; learned ones always
encode in the main process). Ratios: workers encoding vs the peer, and best vs 0 workers. The
three caches must be byte-identical (checked).

Table 2: the LM's train DataLoader (batch ``--batch``, seeded shuffle, ``drop_last``) over real
caches of ``--read-items`` images — pixels with a 16-colour palette (1024 ids per 32×32 image),
vq's 8×8 grid (64 ids), JPEG bytes (variable length) — read the old way (one ``__getitem__``
per item, then stacking and ``torch.where`` sequences: reimplemented below as the peer) and
through ``TokenDataModule`` (``TokenCache.__getitems__`` + the batch collator). Batches/s and
tokens/s (LM input positions), median of three rounds each, and the ratio. Both paths must
yield the same first batch (checked).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from lmgen.data import EpochSampler, SequenceBatch, SequenceLayout, TokenCache, TokenDataModule
from lmgen.datasets import MovingShapesDataset, ShapesDataset, load_images
from lmgen.tokenizers import TOKENIZERS, build_tokenizer

CALL = 256  # items per encode/decode call: the cache writer's default data.encode_batch_size
READ_CASES = [  # (label, tokenizer fields) of the caches table 2 reads
    ("pixels palette16", {"name": "pixels", "palette_size": 16}),
    ("vq (8×8 grid)", {"name": "vq"}),
    ("jpeg q25 (bytes)", {"name": "jpeg"}),
]


def rate(n: int, seconds: float) -> float:
    return n / max(seconds, 1e-9)


def timed(fn, *args, **kwargs) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def dataset_and_tokenizer(fields: dict, n: int, args: argparse.Namespace):
    """(a train split of n items, the tokenizer for it, fitted where it fits anything)."""
    if TOKENIZERS[fields["name"]].video:
        dataset = MovingShapesDataset("train", n, seed=0, image_size=args.size, frames=args.frames)
        tok = build_tokenizer(fields, args.size, frames=args.frames, fps=dataset.fps)
    else:
        dataset = ShapesDataset("train", n, seed=0, image_size=args.size)
        tok = build_tokenizer(fields, args.size)
    if not tok.learned:
        tok.fit(load_images(dataset, min(n, CALL)))
    return dataset, tok


class EncodeInMain:
    """A tokenizer that keeps ``encode`` in the main process (``encode_in_workers`` False)."""

    encode_in_workers = False

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __getattr__(self, name: str):
        return getattr(self.tokenizer, name)


def cache_files(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())}


def codec_speed(name: str, args: argparse.Namespace, root: Path) -> dict[str, float]:
    """Encode/decode items/s of one tokenizer; cache-build items/s with 0 workers ("0"),
    ``--workers`` reading while the main process encodes ("main") and workers encoding ("workers")."""
    cls = TOKENIZERS[name]
    n = args.clips if cls.video else args.learned_images if cls.learned else args.images
    dataset, tok = dataset_and_tokenizer({"name": name}, n, args)
    items = load_images(dataset)
    chunks = list(torch.split(items, CALL))
    tokens, enc_s = timed(lambda: [tok.encode(c) for c in chunks])
    _, dec_s = timed(lambda: [tok.decode(t) for t in tokens])
    row = {"items": n, "encode": rate(n, enc_s), "decode": rate(n, dec_s)}
    builds = [("0", 0, EncodeInMain(tok)), ("main", args.workers, EncodeInMain(tok))]
    if cls.encode_in_workers:
        builds.append(("workers", args.workers, tok))
    for key, workers, tokenizer in builds:
        _, build_s = timed(TokenCache.build_or_load, root, f"{name}-{key}", dataset, tokenizer,
                           batch_size=args.cache_batch, num_workers=workers)
        row[key] = rate(n, build_s)
    files = [cache_files(root / f"{name}-{key}") for key, _, _ in builds]
    assert all(f == files[0] for f in files), f"{name}: caches written in different places differ"
    return row


# --------------------------------------------------------------------------- the old read path


class ItemByItem(Dataset):
    """The cache as the LM read it before ``__getitems__``: one memmap row per index, each
    converted to int64 on its own (``TokenCache.__getitem__``)."""

    def __init__(self, cache: TokenCache) -> None:
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int):
        return self.cache[i]


class StackingCollator:
    """The old collate: stack the items' rows trimmed to the longest, then build sequences
    with a full PAD tensor and ``torch.where``."""

    def __init__(self, layout: SequenceLayout) -> None:
        self.layout = layout

    def __call__(self, items: list) -> SequenceBatch:
        lengths = torch.tensor([length for _, length, _ in items], dtype=torch.int64)
        width = int(lengths.max())
        ids = torch.stack([ids[:width] for ids, _, _ in items])
        labels = torch.tensor([label for _, _, label in items], dtype=torch.int64)
        lay, batch = self.layout, len(items)
        seq = torch.full((batch, 1 + width + int(lay.variable_length)), lay.pad, dtype=torch.int64)
        seq[:, :1] = lay.cond_tokens(labels, batch)
        inside = torch.arange(width).view(1, -1) < lengths.view(-1, 1)
        seq[:, 1 : 1 + width] = torch.where(inside, ids, torch.full_like(ids, lay.pad))
        if lay.variable_length:
            seq[torch.arange(batch), 1 + lengths] = lay.eos
        return SequenceBatch(inputs=seq[:, :-1], targets=seq[:, 1:], labels=labels)


def read_rate(loader: DataLoader, batches: int) -> tuple[float, float]:
    """(batches/s, LM input tokens/s) over ``batches`` batches, cycling epochs; one warm-up batch."""
    next(iter(loader))
    count = tokens = 0
    start = time.perf_counter()
    while count < batches:
        for batch in loader:
            count, tokens = count + 1, tokens + batch.inputs.numel()
            if count == batches:
                break
    seconds = time.perf_counter() - start
    return rate(count, seconds), rate(tokens, seconds)


def read_speed(fields: dict, args: argparse.Namespace, root: Path) -> dict[str, float]:
    dataset, tok = dataset_and_tokenizer(fields, args.read_items, args)
    cache = TokenCache.build_or_load(root, f"read-{fields['name']}", dataset, tok, num_workers=args.workers)
    layout = SequenceLayout(tok.vocab_size, tok.max_tokens, dataset.num_classes, tok.variable_length)
    new = TokenDataModule(cache, cache, layout, args.batch, seed=0).train_dataloader()
    # the same order (the LM's EpochSampler): only the read path differs
    old = DataLoader(ItemByItem(cache), batch_size=args.batch, sampler=EpochSampler(len(cache), 0, shuffle=True),
                     drop_last=True, collate_fn=StackingCollator(layout))
    a, b = next(iter(new)), next(iter(old))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets), "the read paths disagree"
    rounds = {"old": [], "new": []}
    for _ in range(3):  # alternate, so a busy moment of a shared machine hits both
        rounds["old"].append(read_rate(old, args.read_batches))
        rounds["new"].append(read_rate(new, args.read_batches))
    row = {"tokens": float(a.inputs.shape[1])}
    for path, results in rounds.items():
        row[f"{path} batches"] = statistics.median(r[0] for r in results)
        row[f"{path} tokens"] = statistics.median(r[1] for r in results)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024, help="images per codec/pixel tokenizer")
    parser.add_argument("--learned-images", type=int, default=256, help="images per learned tokenizer")
    parser.add_argument("--clips", type=int, default=256, help="clips for h264")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--frames", type=int, default=8, help="frames per h264 clip")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the cache build")
    parser.add_argument("--cache-batch", type=int, default=64, help="items per batch of the cache build")
    parser.add_argument("--read-items", type=int, default=1024, help="images in each cache table 2 reads")
    parser.add_argument("--read-batches", type=int, default=300, help="batches per timed read round")
    parser.add_argument("--batch", type=int, default=32, help="LM batch size (train.batch_size)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads of the main process (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    w = args.workers
    with tempfile.TemporaryDirectory(prefix="lmgen-bench-") as tmp:
        root = Path(tmp)
        print(f"## Tokenizers at {args.size}×{args.size}, default configs (learned: random init), "
              f"{torch.get_num_threads()} torch threads\n")
        print(f"| tokenizer | unit | items | encode /s | decode /s | cache /s, 0 workers | cache /s, {w} workers, "
              f"main encodes (peer) | cache /s, {w} workers encode | × peer | × 0 workers |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, cls in TOKENIZERS.items():
            r = codec_speed(name, args, root)
            best = r.get("workers", r["main"])
            ours = f"{r['workers']:.0f} | {r['workers'] / r['main']:.2f}" if "workers" in r else "— | —"
            print(f"| {name} | {'clips' if cls.video else 'images'} | {r['items']} | {r['encode']:.0f} | "
                  f"{r['decode']:.0f} | {r['0']:.0f} | {r['main']:.0f} | {ours} | {best / r['0']:.2f} |", flush=True)
        print(f"\n## LM train DataLoader over a token cache (batch {args.batch}, no workers, "
              f"{torch.get_num_threads()} torch threads): item by item (old) vs whole batches (new)\n")
        print("| cache | LM inputs/row | old batches/s | new batches/s | old Mtok/s | new Mtok/s | × |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for label, fields in READ_CASES:
            r = read_speed(fields, args, root)
            print(f"| {label} | {r['tokens']:.0f} | {r['old batches']:.0f} | {r['new batches']:.0f} | "
                  f"{r['old tokens'] / 1e6:.2f} | {r['new tokens'] / 1e6:.2f} | "
                  f"{r['new batches'] / r['old batches']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
