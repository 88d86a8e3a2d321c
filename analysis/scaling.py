"""Model scaling and compute (CRT Figs. 4–5): generation quality and validation bits per image
against LM parameters and against training FLOPs, one series per tokenizer, each with a fitted
power law y = a·x^b whose exponent b is printed in the legend (CRT: −0.65 → −0.73 with CRT).
Points are arm means over seeds with 95% error bars where an arm has several seeds (or one
run's own sampling interval); the fit uses every run."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.arms import arm_points, with_arms
from analysis.style import (
    FigureSkipped,
    error_bars,
    generation_metric,
    label_colors,
    log_axis,
    log_if_wide,
    new_figure,
    outside_legends,
    size_marker,
)

TITLE = "Model scaling and compute"


def power_law(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(a, b) of the least-squares fit of log y = log a + b log x; needs ≥2 distinct positive x."""
    keep = (x > 0) & (y > 0) & np.isfinite(x) & np.isfinite(y)
    if len(np.unique(x[keep])) < 2:
        raise ValueError("a power law needs ≥2 distinct positive x values")
    b, log_a = np.polyfit(np.log(x[keep]), np.log(y[keep]), 1)
    return float(np.exp(log_a)), float(b)


def _panel(ax, runs: pd.DataFrame, x_col: str, y_col: str) -> None:
    colors = label_colors(runs)
    for label, group in runs.groupby("tokenizer_label", sort=False):
        group = group.dropna(subset=[x_col, y_col])
        x, y = group[x_col].to_numpy(float), group[y_col].to_numpy(float)
        for size, at in group.groupby("lm_size", sort=False):
            points = arm_points(at, x_col, y_col)
            error_bars(ax, points, color=colors[label])
            ax.scatter(points["x"], points["y"], marker=size_marker(size), color=colors[label], s=40, zorder=3,
                       edgecolors="black", linewidths=0.4)
        try:
            a, b = power_law(x, y)
        except ValueError:
            continue
        grid = np.geomspace(x.min(), x.max(), 50)
        ax.plot(grid, a * grid**b, "-", color=colors[label], lw=1.2, label=f"{label}: b = {b:+.3f}")
    log_axis(ax, "x")
    log_if_wide(ax, "y", runs[y_col])
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(title="power-law fit y = a·x^b", fontsize=7, title_fontsize=7, ncol=2, loc="upper center",
                  bbox_to_anchor=(0.5, -0.2))


def scaling_figure(runs: pd.DataFrame) -> Figure:
    """Rows: generation quality, ``lm/val_bits_per_image``; columns: ``lm/params``, ``lm/flops``."""
    g_col, g_label = generation_metric(runs)
    needed = ["lm/params", "lm/flops", "lm/val_bits_per_image", g_col]
    if not all(c in runs for c in needed):
        raise FigureSkipped(f"needs {needed} on the runs")
    fitted = runs.dropna(subset=needed).groupby("tokenizer_label")["lm/params"].nunique()
    if not (fitted >= 2).any():
        raise FigureSkipped("no tokenizer has runs at ≥2 LM sizes (a sweep over lm.size, e.g. sweeps/tokens_per_image.yaml or sweeps/crt_lambda.yaml)")
    runs = with_arms(runs)
    fig, axes = new_figure(2, 2, width=5.0, height=4.4)
    for row, (y_col, y_label) in enumerate([(g_col, g_label), ("lm/val_bits_per_image", "validation bits per image ↓")]):
        for col, (x_col, x_label) in enumerate([("lm/params", "LM parameters"), ("lm/flops", "training FLOPs")]):
            ax = axes[2 * row + col]
            _panel(ax, runs, x_col, y_col)
            ax.set_xlabel(x_label)
            ax.set_ylabel(y_label)
    outside_legends(fig, runs)
    fig.suptitle(f"{TITLE}: power-law fits per tokenizer")
    return fig
