"""Token statistics (ELM Table 1): how far each tokenizer's tokens are from uniform — unigram
KL (log V − H(x)) and bigram KL (log V − H(x_t+1 | x_t)), in nats. ELM: image tokens are near
uniform (unigram KL: BAE 0.24, VQGAN 1.00) where text is not (3.25), which is why image-token
loss plateaus high. Bars are hatched where the estimate had < 1 token per id (unigram) or
< 1 pair per id pair (bigram): there the KL is biased high by the sample size."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from analysis.style import FigureSkipped, label_colors, new_figure

TITLE = "Token statistics"
ELM_UNIGRAM = {"ELM text": 3.25, "ELM VQGAN": 1.00, "ELM BAE": 0.24}  # ELM Table 1, ImageNet tokens


def _sparse(tok: pd.DataFrame, column: str) -> list[bool]:
    """True where the estimate had < 1 sample per cell (unknown counts as enough)."""
    counts = tok[column] if column in tok else pd.Series(np.inf, index=tok.index)
    return list(counts.fillna(np.inf) < 1)


def token_stats_figure(runs: pd.DataFrame) -> Figure:
    """One group of bars per tokenizer (stage-1 metrics, so one per tokenizer config)."""
    if "tok/unigram_kl_uniform" not in runs or runs["tok/unigram_kl_uniform"].isna().all():
        raise FigureSkipped("no run has tok/unigram_kl_uniform")
    tok = runs.dropna(subset=["tok/unigram_kl_uniform"]).drop_duplicates("tokenizer_label")
    has_bigram = "tok/bigram_kl_uniform" in tok and tok["tok/bigram_kl_uniform"].notna().any()
    colors = label_colors(tok)
    fig, (ax,) = new_figure(1, width=max(6.0, 1.0 * len(tok) + 2.5), height=4.2)
    x = np.arange(len(tok))
    width = 0.38 if has_bigram else 0.6
    ax.bar(x - (width / 2 if has_bigram else 0), tok["tok/unigram_kl_uniform"], width,
           color=[colors[label] for label in tok["tokenizer_label"]], edgecolor="black", lw=0.5,
           hatch=["//" if s else "" for s in _sparse(tok, "tok/unigram_tokens_per_cell")])
    if has_bigram:
        ax.bar(x + width / 2, tok["tok/bigram_kl_uniform"].fillna(0), width, edgecolor="black", lw=0.5,
               color=[colors[label] for label in tok["tokenizer_label"]], alpha=0.55,
               hatch=["//" if s else "" for s in _sparse(tok, "tok/bigram_pairs_per_cell")])
    for name, value in ELM_UNIGRAM.items():
        ax.axhline(value, color="0.4", ls=":", lw=1)
        ax.text(len(tok) - 0.5, value, f" {name} unigram {value:.2f}", fontsize=7, va="bottom", ha="right",
                color="0.3")
    ax.set_xticks(x, tok["tokenizer_label"], rotation=25, ha="right")
    ax.set_xlabel("tokenizer")
    ax.set_ylabel("KL to uniform (nats) ↓ = closer to uniform")
    ax.grid(alpha=0.3, axis="y")
    legend = [Patch(facecolor="0.6", edgecolor="black", label="unigram: log V − H(x)")]
    if has_bigram:
        legend.append(Patch(facecolor="0.6", alpha=0.55, edgecolor="black", label="bigram: log V − H(x_t+1 | x_t)"))
    legend.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="< 1 token (pair) per id (pair): reads high"))
    ax.legend(handles=legend, fontsize=8, loc="upper left")
    fig.suptitle(TITLE + ("" if has_bigram else " (bigram KL not logged by these runs' stage 1)"))
    return fig
