"""Compression–generation trade-off (CRT Fig. 1): generation quality against the rate of the
code (bits per image) and against reconstruction quality, one point per arm (its mean over
seeds, with 95% error bars where it has several seeds or its own sampling interval), one
series per LM size, with each size's Pareto front drawn through the means. A point off the
front whose interval overlaps a better point's is within noise of it and is not called
dominated: it stays filled; only a point that another beats on both axes even at the ends of
both intervals is drawn hollow (dominated). A point without an interval (one run that logged
no sampling interval) is never called dominated: its noise is unknown."""

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


def _bounds(mean: np.ndarray, low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Interval bounds, the mean itself where a point has none."""
    has = np.isfinite(low) & np.isfinite(high)
    return np.where(has, low, mean), np.where(has, high, mean)


def dominated(points: pd.DataFrame, x_lower_is_better: bool = True) -> np.ndarray:
    """(N,) bool: is each point beaten by another on both axes even at the ends of both points'
    intervals (lower y is better; x as ``x_lower_is_better``)? ``points``: ``arm_points`` rows.
    Only points with a y interval are judged, against points with one: without an interval
    the noise is unknown, and a point is not called dominated on its value alone. An x
    without an interval (bits per image: a property of the code) is read at its value."""
    x_lo, x_hi = _bounds(*(points[c].to_numpy(float) for c in ("x", "x_low", "x_high")))
    y_lo, y_hi = _bounds(*(points[c].to_numpy(float) for c in ("y", "y_low", "y_high")))
    known = np.isfinite(points["y_low"].to_numpy(float)) & np.isfinite(points["y_high"].to_numpy(float))
    if not x_lower_is_better:  # flip x so that lower is better
        x_lo, x_hi = -x_hi, -x_lo
    # q beats p beyond noise: q's worst x no worse than p's best, q's worst y better than p's best
    beats = (x_hi[:, None] <= x_lo[None, :]) & (y_hi[:, None] < y_lo[None, :]) & known[:, None] & known[None, :]
    np.fill_diagonal(beats, False)  # [q, p]
    return beats.any(axis=0)


def _panel(ax, runs: pd.DataFrame, x_col: str, x_label: str, y_col: str, y_label: str, lower_better: bool) -> None:
    colors = label_colors(runs)
    sizes = list(runs["lm_size"].unique())
    for size, group in runs.groupby("lm_size", sort=False):
        points = arm_points(group, x_col, y_col)
        x, y = points["x"].to_numpy(float), points["y"].to_numpy(float)
        error_bars(ax, points, colors=colors)
        face = [colors[label] for label in points["tokenizer_label"]]
        hollow = dominated(points, lower_better)
        ax.scatter(x, y, marker=size_marker(size), c=["none" if h else f for f, h in zip(face, hollow)], s=46,
                   zorder=3, edgecolors=[f if h else "black" for f, h in zip(face, hollow)],
                   linewidths=[1.4 if h else 0.4 for h in hollow])
        if len(points) >= 2:
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
    runs = with_arms(runs)
    if len(runs) < 2 or runs["tokenizer_label"].nunique() < 2:
        raise FigureSkipped(f"needs runs of ≥2 tokenizers with {y_col} and tok/bits_per_image; found {len(runs)} run(s)")
    r_col, r_label = reconstruction_metric(runs)
    fig, (left, right) = new_figure(2)
    _panel(left, runs, "tok/bits_per_image", "rate: bits per image (tokens × log2 vocab)", y_col, y_label, True)
    _panel(right, runs.dropna(subset=[r_col]), r_col, r_label, y_col, y_label, not r_label.endswith("↑"))
    outside_legends(fig, runs)
    fig.suptitle(f"{TITLE} (lines: Pareto fronts of the means;\nhollow: dominated beyond the 95% intervals)",
                 fontsize=10)
    return fig
