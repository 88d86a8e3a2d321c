"""Compression–generation trade-off (CRT Fig. 1): generation quality against the rate of the
code (bits per image) and against reconstruction quality, one series per LM size, with each
size's Pareto front (no other run of that size is both cheaper/better-reconstructing and
better-generating)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.style import (
    FigureSkipped,
    generation_metric,
    label_colors,
    log_if_wide,
    new_figure,
    outside_legends,
    reconstruction_metric,
    size_linestyle,
    size_marker,
)

TITLE = "Compression–generation trade-off"


def pareto_front(x: np.ndarray, y: np.ndarray, x_lower_is_better: bool = True) -> np.ndarray:
    """Indices of the points no other point beats on both x and y (lower y is better), sorted by x."""
    sign = 1.0 if x_lower_is_better else -1.0
    order = np.lexsort((y, sign * x))
    front, best = [], np.inf
    for i in order:
        if y[i] < best:
            front.append(i)
            best = y[i]
    return np.asarray(front, dtype=int)


def _panel(ax, runs: pd.DataFrame, x_col: str, x_label: str, y_col: str, y_label: str, lower_better: bool) -> None:
    colors = label_colors(runs)
    sizes = list(runs["lm_size"].unique())
    for size, group in runs.groupby("lm_size", sort=False):
        x, y = group[x_col].to_numpy(float), group[y_col].to_numpy(float)
        ax.scatter(x, y, marker=size_marker(size), c=[colors[label] for label in group["tokenizer_label"]], s=46,
                   zorder=3, edgecolors="black", linewidths=0.4)
        if len(group) >= 2:
            front = pareto_front(x, y, lower_better)
            ax.plot(x[front], y[front], size_linestyle(size, sizes), color="0.35", lw=1.2, zorder=2,
                    drawstyle="steps-post" if lower_better else "steps-pre")
    log_if_wide(ax, "x", runs[x_col])
    log_if_wide(ax, "y", runs[y_col])
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.grid(alpha=0.3, which="both")


def tradeoff_figure(runs: pd.DataFrame) -> Figure:
    """Left: generation quality vs ``tok/bits_per_image``; right: vs reconstruction quality."""
    y_col, y_label = generation_metric(runs)
    runs = runs.dropna(subset=[y_col, "tok/bits_per_image"]) if "tok/bits_per_image" in runs else runs.iloc[:0]
    if len(runs) < 2 or runs["tokenizer_label"].nunique() < 2:
        raise FigureSkipped(f"needs runs of ≥2 tokenizers with {y_col} and tok/bits_per_image; found {len(runs)} run(s)")
    r_col, r_label = reconstruction_metric(runs)
    fig, (left, right) = new_figure(2)
    _panel(left, runs, "tok/bits_per_image", "rate: bits per image (tokens × log2 vocab)", y_col, y_label, True)
    _panel(right, runs.dropna(subset=[r_col]), r_col, r_label, y_col, y_label, not r_label.endswith("↑"))
    outside_legends(fig, runs)
    fig.suptitle(f"{TITLE} (lines: Pareto front per LM size)")
    return fig
