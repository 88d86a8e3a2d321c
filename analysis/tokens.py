"""Tokens per image (CRT Fig. 6): generation quality and validation bits per image against the
number of tokens an image costs, one series per LM size; points of one tokenizer family at one
LM size are joined (a ``downsample`` sweep), so the trend within a family reads as a line.
Points are arm means over seeds, with 95% error bars where an arm has several seeds (or one
run's own sampling interval)."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from analysis.arms import arm_points, with_arms
from analysis.style import (
    FigureSkipped,
    error_bars,
    generation_metric,
    label_colors,
    log_axis,
    new_figure,
    outside_legends,
    size_linestyle,
    size_marker,
)

TITLE = "Tokens per image"


def _panel(ax, runs: pd.DataFrame, y_col: str, y_label: str) -> None:
    colors, sizes = label_colors(runs), list(runs["lm_size"].unique())
    for (_family, size), group in runs.groupby(["tokenizer", "lm_size"], sort=False):
        points = arm_points(group, "tok/tokens_per_image", y_col).sort_values("x", kind="stable")
        error_bars(ax, points, colors=colors)
        ax.scatter(points["x"], points["y"], marker=size_marker(size), s=44, zorder=3,
                   c=[colors[label] for label in points["tokenizer_label"]], edgecolors="black", linewidths=0.4)
        if points["x"].nunique() >= 2:
            ax.plot(points["x"], points["y"], size_linestyle(size, sizes),
                    color=colors[points["tokenizer_label"].iloc[0]], lw=1.2)
    log_axis(ax, "x", base=2)
    ax.set_xlabel("tokens per image (mean over val)")
    ax.set_ylabel(y_label)
    ax.grid(alpha=0.3, which="both")


def tokens_figure(runs: pd.DataFrame) -> Figure:
    """Needs runs at ≥2 distinct ``tok/tokens_per_image``."""
    g_col, g_label = generation_metric(runs)
    needed = ["tok/tokens_per_image", g_col]
    runs = runs.dropna(subset=needed) if all(c in runs for c in needed) else runs.iloc[:0]
    if runs["tok/tokens_per_image"].round().nunique() < 2:
        raise FigureSkipped("every run has the same tokens per image (sweeps/tokens_per_image.yaml varies "
                            "tokenizer.downsample)")
    runs = with_arms(runs)
    fig, (left, right) = new_figure(2)
    _panel(left, runs, g_col, g_label)
    if "lm/val_bits_per_image" in runs:
        _panel(right, runs.dropna(subset=["lm/val_bits_per_image"]), "lm/val_bits_per_image",
               "validation bits per image ↓")
    outside_legends(fig, runs)
    fig.suptitle(f"{TITLE} (lines join one family at one LM size)")
    return fig
