"""Per-position loss (CRT Fig. 7): validation loss at each token position, at the end of
training, one line per tokenizer. CRT's claim: its tokens are easier to predict at every
position than plain VQ's, most at late positions. Positions are shown as a fraction of the
sequence so grids of different lengths share an axis; late positions that few val streams
reach (variable-length codecs) are left out. With several seeds per arm, the line is the mean
over seeds and the band its 95% interval (Student t) at each position."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from analysis.arms import arms_of, interval_frame
from analysis.style import FigureSkipped, band, label_colors, new_figure, outside_legends, size_rank

TITLE = "Per-position validation loss"
MIN_SHARE = 0.25  # keep positions reached by ≥ this share of the val streams
MAX_PANELS = 3


def final_positions(positions: pd.DataFrame) -> pd.DataFrame:
    """The last validation of every run, positions reached by ≥ MIN_SHARE of its streams,
    with ``fraction`` = (position + 0.5) / positions kept."""
    last = positions[positions["step"] == positions.groupby("run_id")["step"].transform("max")]
    last = last[last["count"] >= MIN_SHARE * last.groupby("run_id")["count"].transform("max")].dropna(subset=["bits"])
    order = pd.Categorical(last["run_id"], categories=list(dict.fromkeys(positions["run_id"])))  # the runs' order
    last = last.assign(_order=order).sort_values(["_order", "position"], kind="stable").drop(columns="_order")
    last["fraction"] = (last["position"] + 0.5) / last.groupby("run_id")["position"].transform("count")
    return last.assign(arm=arms_of(last))


def position_loss_figure(positions: pd.DataFrame) -> Figure:
    """``positions``: ``load_table(runs, "val_loss_per_position.csv")``; one panel per LM size (largest 3)."""
    if positions.empty or "bits" not in positions:
        raise FigureSkipped("no run logged val_loss_per_position.csv")
    last = final_positions(positions)
    if last["run_id"].nunique() < 1 or last.groupby("run_id")["position"].count().max() < 2:
        raise FigureSkipped("no run has per-position losses at ≥2 positions")
    sizes = sorted(last["lm_size"].unique(), key=size_rank)[-MAX_PANELS:]
    colors = label_colors(last.drop_duplicates("run_id"))
    fig, axes = new_figure(len(sizes), width=4.6, height=3.8)
    for ax, size in zip(axes, sizes):
        at_size = last[last["lm_size"] == size]
        for _, runs in at_size.groupby("arm", sort=False):
            curve = interval_frame(runs, ["position"], "bits").sort_values("position")
            curve["fraction"] = (curve["position"] + 0.5) / len(curve)
            label, color = runs["tokenizer_label"].iloc[0], colors[runs["tokenizer_label"].iloc[0]]
            window = max(1, len(curve) // 32)  # light smoothing for long sequences (pixels: 1024 positions)
            smooth = {c: curve[c].rolling(window, center=True, min_periods=1).mean() for c in ("mean", "low", "high")}
            seeds = runs["run_id"].nunique()
            ax.plot(curve["fraction"], smooth["mean"], color=color, lw=1.3,
                    label=f"{label} ({len(curve)} positions{f', {seeds} seeds' if seeds > 1 else ''})")
            band(ax, curve["fraction"], smooth["low"], smooth["high"], color)
        ax.set_yscale("log")
        ax.set_xlabel("token position / tokens per image")
        ax.set_ylabel("validation loss, bits per token ↓")
        ax.set_title(f"LM {size}", fontsize=10)
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3, which="both")
    for ax in axes[len(sizes):]:
        ax.set_visible(False)
    outside_legends(fig, last.drop_duplicates("run_id"), sizes=False)
    fig.suptitle(f"{TITLE} (final validation)")
    return fig


