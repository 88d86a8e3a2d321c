"""Vocabulary scaling (MAGVIT-v2 Fig. 1): reconstruction (left axis, solid) and generation
(right axis, dashed) against vocabulary size, one colour per tokenizer family. MAGVIT-v2's
finding: VQ reconstructs better but generates worse past ~2^14 codes; LFQ improves both.
Each point is the mean over the runs at that size (seeds; reconstruction once per stage-1
tokenizer), with 95% error bars where there are several (or one run's own interval)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.arms import estimates_by
from analysis.style import (
    FigureSkipped,
    error_extent,
    family_color,
    generation_metric,
    largest_size,
    new_figure,
    reconstruction_metric,
)

TITLE = "Vocabulary scaling"


def label_vocab_ticks(ax, sizes: np.ndarray) -> None:
    """Every vocabulary size run, as an x tick: a power of two as 2^k on the first line, any other
    size (FSQ's 1,000 or 15,360 codes) as its number on a second line, so the two never overlap
    where the sizes sit close (1,000 beside 2^10)."""
    sizes = np.unique(sizes)
    exponents = np.log2(sizes)
    powers = np.isclose(exponents, np.round(exponents))
    ax.set_xticks(sizes[powers], [f"$2^{{{int(round(e))}}}$" for e in exponents[powers]])
    ax.set_xticks(sizes[~powers], [f"{int(round(v)):,}" for v in sizes[~powers]], minor=True)
    ax.tick_params(axis="x", which="minor", pad=18, labelsize=7)


def vocab_figure(runs: pd.DataFrame) -> Figure:
    """Families with runs at ≥2 values of ``tok/vocab_size``, each at its largest LM size."""
    if "tok/vocab_size" not in runs:
        raise FigureSkipped("no run logged tok/vocab_size")
    g_col, g_label = generation_metric(runs)
    r_col, r_label = reconstruction_metric(runs)
    families = [f for f, group in runs.groupby("tokenizer", sort=False) if group["tok/vocab_size"].nunique() >= 2]
    if not families:
        raise FigureSkipped("no tokenizer family has runs at ≥2 vocabulary sizes (sweeps/vocab.yaml runs VQ and LFQ "
                            "from 2^6 to 2^14)")
    fig, (ax,) = new_figure(1, width=7.0, height=4.4)
    twin = ax.twinx()
    for family in families:
        group = runs[runs["tokenizer"] == family]
        top = group[group["lm_size"].isin(largest_size(group)["lm_size"])]
        size, color = top["lm_size"].iloc[0], family_color(family)
        series = ((ax, r_col, "o-", "reconstruction"), (twin, g_col, "s--", f"generation ({size} LM)"))
        for axis, col, style, what in series:
            at = estimates_by(top, ["tok/vocab_size"], col).sort_values("tok/vocab_size")
            x = at["tok/vocab_size"].to_numpy(float)
            axis.plot(x, at["mean"], style, color=color, label=f"{family}: {what}")
            yerr = error_extent(at["mean"], at["low"], at["high"])
            if yerr is not None:
                axis.errorbar(x, at["mean"], yerr=yerr, fmt="none", ecolor=color, elinewidth=1.0, capsize=2.5)
    ax.set_xscale("log", base=2)
    label_vocab_ticks(ax, runs["tok/vocab_size"].dropna().to_numpy(float))
    ax.set_xlabel("vocabulary size (codes per token)")
    ax.set_ylabel(f"{r_label} (solid)")
    twin.set_ylabel(f"{g_label} (dashed)")
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)
    fig.suptitle(TITLE)
    return fig
