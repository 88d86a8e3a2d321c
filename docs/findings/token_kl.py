"""ELM's Table 1 at our scale: how far image tokens and text tokens are from uniform.

    python docs/findings/token_kl.py docs/findings/findings_elm/runs.csv docs/findings/findings_vocab/runs.csv \
        [--text /usr/share/common-licenses] [--out docs/findings/token_kl.csv]

Image rows: ``tok/unigram_kl_uniform`` and ``tok/bigram_kl_uniform`` of the finished runs in the
given runs.csv files (``contrasts.py`` writes them; the statistics are the train split's tokens,
one stage-1 tokenizer per row, so seeds repeat the same value and are dropped). Text rows: the
same statistics (``lmgen.metrics.rate.token_statistics``, nats, Miller–Madow corrected) of English
prose — the licence texts every Debian system ships, ~260 KB — written by the suite's byte-level
BPE (``lmgen.tokenizers.bpe.ByteBPE``, the tokenizer JPEG-LM extends bytes with) at 256 (bytes),
1,024, 4,096 and 16,384 tokens, cut into 64-token "documents" as an image is 64 tokens.
Columns: source, tokenizer, vocab, tokens, tokens_per_cell, unigram_kl_uniform, bigram_kl_uniform.
ELM's figures (Table 1, nats): BAE 0.24, VQGAN 1.00, text 3.25.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch

from lmgen.metrics.rate import token_statistics
from lmgen.tokenizers.bpe import ByteBPE

TEXT_VOCABS = (256, 1024, 4096, 16384)
DOCUMENT = 64  # tokens per text "document", as one 8×8 image


def text_rows(folder: Path) -> list[dict]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.is_symlink())
    corpus = b"\n".join(p.read_bytes() for p in files)
    rows = []
    for vocab in TEXT_VOCABS:
        bpe = ByteBPE(vocab)
        if vocab > 256:
            bpe.fit([corpus[i : i + 4096] for i in range(0, len(corpus), 4096)])
        ids = torch.from_numpy(bpe.encode(corpus).astype("int64"))
        n = len(ids) // DOCUMENT * DOCUMENT
        docs = ids[:n].view(-1, DOCUMENT)
        stats = token_statistics([(docs, torch.full((len(docs),), DOCUMENT))], vocab)
        rows.append({"source": f"text ({folder}, {len(corpus) // 1000} KB)", "tokenizer": f"byte BPE {vocab}",
                     "vocab": vocab, "tokens": n, "tokens_per_cell": n / vocab,
                     "unigram_kl_uniform": stats["tok/unigram_kl_uniform"],
                     "bigram_kl_uniform": stats["tok/bigram_kl_uniform"]})
    return rows


def image_rows(tables: list[Path]) -> list[dict]:
    rows = []
    for path in tables:
        runs = pd.read_csv(path).dropna(subset=["unigram_kl_uniform"]).drop_duplicates("tokenizer")
        for run in runs.itertuples():
            vocab = round(2**run.log2_vocab)
            tokens = 20000 * run.tokens_per_image  # the train split of shapes32_plain8
            rows.append({"source": f"image ({path.parent.name})", "tokenizer": run.tokenizer, "vocab": vocab,
                         "tokens": tokens, "tokens_per_cell": tokens / vocab,
                         "unigram_kl_uniform": run.unigram_kl_uniform, "bigram_kl_uniform": run.bigram_kl_uniform})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", type=Path, help="runs.csv files of image-token sweeps")
    parser.add_argument("--text", type=Path, default=Path("/usr/share/common-licenses"))
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("token_kl.csv"))
    args = parser.parse_args()
    table = pd.DataFrame(image_rows(args.runs) + text_rows(args.text))
    table.to_csv(args.out, index=False, float_format="%.4g")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))


if __name__ == "__main__":
    main()
