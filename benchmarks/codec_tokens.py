"""Codec streams with and without byte-level BPE, side by side: tokens per item and speed.

    python benchmarks/codec_tokens.py [--fit 2000] [--held-out 500]

For JPEG (32 and 64 px `shapes` images) and H.264 (8-frame 32×32 `moving_shapes` clips):
each BPE vocabulary is fitted (stage 1's ``fit``) on ``--fit`` train items and measured on
``--held-out`` val items against the raw-byte tokenizer of the same settings encoding the
same items in the same process. Prints raw bytes per item, BPE tokens per item, their ratio
(JPEG-LM's vocabulary: JPEG 320, AVC 1024), fit seconds, and encode/decode items per second
of each arm.
"""

from __future__ import annotations

import argparse
import time

import torch

from lmgen.datasets import build_dataset, load_images
from lmgen.tokenizers import build_tokenizer

CASES = [  # (label, tokenizer fields, dataset overrides)
    ("jpeg q25, 32 px", {"name": "jpeg"}, {"name": "shapes", "image_size": 32, "frames": 0}),
    ("jpeg q25, 64 px", {"name": "jpeg"}, {"name": "shapes", "image_size": 64, "frames": 0}),
    ("h264 qp37, 8×32×32", {"name": "h264"}, {"name": "moving_shapes", "image_size": 32, "frames": 8}),
]
VOCABS = {"jpeg": (320, 1024), "h264": (320, 1024)}


def items(data: dict, split: str, n: int) -> torch.Tensor:
    """The first n readable items of a split: uint8 images (N, 3, H, W) or clips (N, T, 3, H, W)."""
    cfg = {k: v for k, v in data.items() if k != "frames" or v} | {"train_size": n, "val_size": n}
    return load_images(build_dataset(cfg, split), n)


def timed(fn, *args) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit", type=int, default=2000, help="train items the BPE is fitted on")
    parser.add_argument("--held-out", type=int, default=500, help="val items measured")
    args = parser.parse_args()
    print(f"{'case':<22}{'vocab':>7}{'tokens/item':>13}{'raw/BPE':>9}{'fit s':>8}{'enc items/s':>13}{'dec items/s':>13}")
    for label, fields, data in CASES:
        frames = data["frames"]
        train, held_out = items(data, "train", args.fit), items(data, "val", args.held_out)
        raw = build_tokenizer(fields, data["image_size"], frames=frames)
        raw_tokens, enc_s = timed(raw.encode, held_out)
        decoded, dec_s = timed(raw.decode, raw_tokens)
        raw_mean = float(raw_tokens.lengths.float().mean())
        n = len(held_out)
        print(f"{label:<22}{256:>7}{raw_mean:>13.1f}{1.0:>9.2f}{'—':>8}{n / enc_s:>13.0f}{n / dec_s:>13.0f}")
        for vocab in VOCABS[fields["name"]]:
            bpe = build_tokenizer({**fields, "bpe_vocab": vocab}, data["image_size"], frames=frames)
            _, fit_s = timed(bpe.fit, train)
            tokens, enc_s = timed(bpe.encode, held_out)
            same, dec_s = timed(bpe.decode, tokens)
            assert torch.equal(same.images, decoded.images), "BPE must decode to exactly what raw bytes decode to"
            mean = float(tokens.lengths.float().mean())
            print(f"{'':<22}{vocab:>7}{mean:>13.1f}{raw_mean / mean:>9.2f}{fit_s:>8.1f}{n / enc_s:>13.0f}"
                  f"{n / dec_s:>13.0f}")


if __name__ == "__main__":
    main()
