"""What every figure shares: colours per tokenizer family, markers per LM size, metric
choices and axis labels, and the ``FigureSkipped`` signal for data a figure cannot use.

A family keeps its colour in every figure (its place in the ``TOKENIZERS`` registry picks
it); two presets of one family (``vq 1k f4``, ``vq 4k f4``) are shades of that colour.
"""

from __future__ import annotations

import colorsys
from collections.abc import Iterable

import numpy as np
import pandas as pd
from matplotlib import colors as mcolors
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from lmgen.llama import LLAMA_SIZES
from lmgen.tokenizers import TOKENIZERS

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
           "#bcbd22", "#7f7f7f", "#252525"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
LINESTYLES = ["-", "--", ":", "-."]


class FigureSkipped(Exception):
    """The runs cannot support this figure; the message says what is missing."""


def family_color(family: str) -> str:
    """A fixed colour per tokenizer family: registry order, then any other name by its hash."""
    names = list(TOKENIZERS)
    if family in names:
        return PALETTE[names.index(family) % len(PALETTE)]
    return PALETTE[(len(names) + sum(map(ord, str(family)))) % len(PALETTE)]


def label_colors(runs: pd.DataFrame) -> dict[str, str]:
    """tokenizer_label → colour: the family colour, in darker/lighter shades for each extra preset."""
    out: dict[str, str] = {}
    for family, group in runs.groupby("tokenizer", sort=False):
        labels = list(dict.fromkeys(group["tokenizer_label"]))
        h, lightness, s = colorsys.rgb_to_hls(*mcolors.to_rgb(family_color(family)))
        for i, label in enumerate(labels):
            shift = 0.0 if len(labels) == 1 else (i / (len(labels) - 1) - 0.5) * 0.4
            out[label] = mcolors.to_hex(colorsys.hls_to_rgb(h, min(max(lightness + shift, 0.15), 0.85), s))
    return out


def size_marker(size: str) -> str:
    names = list(LLAMA_SIZES)
    return MARKERS[names.index(size) % len(MARKERS)] if size in names else MARKERS[-1]


def size_linestyle(size: str, sizes: Iterable[str]) -> str:
    """Linestyles by rank among the sizes present, so two sizes are always solid and dashed."""
    ordered = sorted(set(sizes), key=size_rank)
    return LINESTYLES[ordered.index(size) % len(LINESTYLES)]


def size_rank(size: str) -> int:
    names = list(LLAMA_SIZES)
    return names.index(size) if size in names else len(names)


def present(runs: pd.DataFrame, column: str) -> bool:
    return column in runs.columns and runs[column].notna().any()


def generation_metric(runs: pd.DataFrame) -> tuple[str, str]:
    """(column, axis label) of generation quality: Inception gFID where every run has it, else probe FD."""
    if present(runs, "gen/fid") and runs["gen/fid"].notna().all():
        return "gen/fid", "gFID (Inception) ↓"
    if present(runs, "gen/fd_probe"):
        return "gen/fd_probe", "generation FD, probe features ↓"
    raise FigureSkipped("no run has gen/fid or gen/fd_probe (sample.num_samples=0, or every sample undecodable)")


def reconstruction_metric(runs: pd.DataFrame) -> tuple[str, str]:
    """(column, axis label) of reconstruction quality: rFID where every run has it, else probe rFD, else PSNR."""
    if present(runs, "tok/rfid") and runs["tok/rfid"].notna().all():
        return "tok/rfid", "rFID (Inception) ↓"
    if present(runs, "tok/rfid_probe"):
        return "tok/rfid_probe", "reconstruction FD, probe features ↓"
    if present(runs, "tok/psnr"):
        return "tok/psnr", "reconstruction PSNR (dB) ↑"
    raise FigureSkipped("no run has a reconstruction metric (tok/rfid, tok/rfid_probe or tok/psnr)")


def largest_size(runs: pd.DataFrame) -> pd.DataFrame:
    """Per tokenizer label, the runs of its largest LM size."""
    rank = runs["lm_size"].map(size_rank)
    top = rank.groupby(runs["tokenizer_label"]).transform("max")
    return runs[rank == top]


def log_if_wide(ax: Axes, axis: str, values: Iterable[float], base: float = 10) -> None:
    """Log scale on ``axis`` when positive values span at least a factor of 10."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if len(v) and (v > 0).all() and v.max() / v.min() >= 10:
        log_axis(ax, axis, base)


def _tick(x: float) -> str:
    """1-2-5 tick text: plain up to 10^4, else m×10^e."""
    if x <= 0:
        return ""
    if 1e-3 <= x < 1e5:
        return f"{x:g}"
    exponent = int(np.floor(np.log10(x) + 1e-9))
    mantissa = x / 10**exponent
    return f"$10^{{{exponent}}}$" if round(mantissa) == 1 else f"${mantissa:.0f}{{\\times}}10^{{{exponent}}}$"


def log_axis(ax: Axes, axis: str, base: float = 10) -> None:
    """Log scale with labelled 1-2-5 major ticks and bare minor ticks."""
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log", base=base)
    target = ax.xaxis if axis == "x" else ax.yaxis
    if base == 10:
        target.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        target.set_major_formatter(FuncFormatter(lambda x, _: _tick(x)))
    target.set_minor_formatter(NullFormatter())


def new_figure(ncols: int = 1, nrows: int = 1, width: float = 5.2, height: float = 4.0) -> tuple[Figure, np.ndarray]:
    """A pyplot-free figure (safe in any process, no display) and its axes as an array."""
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes.ravel()


def outside_legends(fig: Figure, runs: pd.DataFrame, sizes: bool = True) -> None:
    """Tokenizer colours (and LM-size markers) as legends to the right of the figure, off the data."""
    colors = label_colors(runs)
    handles = [Line2D([], [], marker="o", ls="", color=c, markeredgecolor="black", markeredgewidth=0.4, label=label)
               for label, c in colors.items()]
    first = fig.legend(handles=handles, title="tokenizer", loc="outside right upper", fontsize=8, title_fontsize=8)
    if sizes:
        marks = []
        for size in sorted(set(runs["lm_size"]), key=size_rank):
            params = runs.loc[runs["lm_size"] == size, "lm_params"].dropna() if "lm_params" in runs else []
            text = f"{size} ({params.median() / 1e6:.2g}M)" if len(params) else str(size)
            marks.append(Line2D([], [], marker=size_marker(size), ls=size_linestyle(size, runs["lm_size"]),
                                color="0.3", label=text))
        fig.add_artist(first)
        fig.legend(handles=marks, title="LM size", loc="outside right lower", fontsize=8, title_fontsize=8)


def error_extent(mean: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray | None:
    """matplotlib's (2, N) ``xerr``/``yerr`` from interval bounds (0 where a point has none);
    None when no point has an interval, so nothing is drawn."""
    mean, low, high = (np.asarray(a, dtype=float) for a in (mean, low, high))
    has = np.isfinite(low) & np.isfinite(high)
    if not has.any():
        return None
    return np.vstack([np.where(has, mean - low, 0.0), np.where(has, high - mean, 0.0)]).clip(min=0.0)


def error_bars(ax: Axes, points: pd.DataFrame, color: str | None = None, colors: dict[str, str] | None = None) -> bool:
    """95% error bars of ``analysis.arms.arm_points`` rows (x_low/x_high, y_low/y_high) in each
    point's colour (``color``, or ``colors[tokenizer_label]``); none where a point has no
    interval. True when any bar was drawn."""
    drawn = False
    for _, p in points.iterrows():
        xerr = error_extent([p["x"]], [p["x_low"]], [p["x_high"]])
        yerr = error_extent([p["y"]], [p["y_low"]], [p["y_high"]])
        if xerr is None and yerr is None:
            continue
        c = color or (colors or {}).get(p["tokenizer_label"], "0.3")
        ax.errorbar([p["x"]], [p["y"]], xerr=xerr, yerr=yerr, fmt="none", ecolor=c, elinewidth=1.0, capsize=2.5,
                    zorder=2.5)
        drawn = True
    return drawn


def band(ax: Axes, x: Iterable[float], low: Iterable[float], high: Iterable[float], color: str) -> bool:
    """A translucent 95% band between ``low`` and ``high`` where both are finite; True when drawn."""
    x, low, high = (np.asarray(list(a), dtype=float) for a in (x, low, high))
    has = np.isfinite(low) & np.isfinite(high)
    if not has.any():
        return False
    ax.fill_between(x, np.where(has, low, np.nan), np.where(has, high, np.nan), color=color, alpha=0.2, lw=0,
                    zorder=1)
    return True
