"""Generation learning curves (``metrics.curve_samples``, ``lmgen.curves``): probe class accuracy
and probe FD of class-conditional samples against images seen, and beside them what the class
token is worth to the Llama on val images (``curve/label_bits``, ``lm/val_label_bits`` at the
curve's step: 0 while it ignores the label, and then its samples are at chance), one colour per
tokenizer and one line style per LM size. Images seen is the axis every arm of a comparison
shares (``train.budget = images``), so the curves show whether the budget lets the Llama learn
at all, and which arm learns first. With several seeds per arm the line is the mean over seeds
and the band its 95% interval (Student t) at each point; a single run's band is its own
bootstrap interval over its curve samples."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from analysis.arms import arms_of, interval_frame
from analysis.style import FigureSkipped, band, label_colors, log_if_wide, new_figure, outside_legends, size_linestyle

TITLE = "Generation learning curves"
PANELS = (("curve/class_accuracy", "probe class accuracy of samples ↑"), ("curve/fd_probe", "probe FD of samples ↓"),
          ("curve/label_bits", "bits/image the class token saves (val) ↑"))
KEYS = ("curve/images_seen", *(key for key, _ in PANELS),
        *(f"{key}{end}" for key, _ in PANELS for end in ("_ci_low", "_ci_high")))


def curve_table(histories: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, step) with images seen and every ``curve/*`` value (NaN where absent)."""
    curves = histories[histories["key"].isin(KEYS)] if "key" in histories else histories.iloc[:0]
    if curves.empty:
        return pd.DataFrame()
    wide = curves.pivot_table(index=["run_id", "step"], columns="key", values="value", aggfunc="last").reset_index()
    wide.columns.name = None
    ids = curves.drop(columns=["key", "value", "step"]).drop_duplicates("run_id")
    order = {run_id: i for i, run_id in enumerate(ids["run_id"])}  # the runs' order, as load_histories
    wide = ids.merge(wide, on="run_id").assign(_order=lambda f: f["run_id"].map(order))
    return wide.sort_values(["_order", "step"], kind="stable").drop(columns="_order").reset_index(drop=True)


def _arm_curve(runs: pd.DataFrame, key: str) -> pd.DataFrame:
    """x, mean, low, high of ``key`` over the arm's runs: seeds' t interval, or one run's bootstrap interval."""
    if runs["run_id"].nunique() > 1:
        curve = interval_frame(runs, ["curve/images_seen"], key)
    else:
        curve = runs.rename(columns={key: "mean", f"{key}_ci_low": "low", f"{key}_ci_high": "high"})
        for column in ("low", "high"):
            if column not in curve:
                curve[column] = float("nan")
    return curve.rename(columns={"curve/images_seen": "x"}).sort_values("x")[["x", "mean", "low", "high"]]


def gen_curves_figure(histories: pd.DataFrame) -> Figure:
    """``histories``: ``load_histories(runs, KEYS)``; needs a run with ≥2 curve points."""
    table = curve_table(histories)
    if table.empty or "curve/class_accuracy" not in table or table.groupby("run_id")["step"].nunique().max() < 2:
        raise FigureSkipped("no run has ≥2 generation-curve points (metrics.curve_samples=0, or one validation)")
    table = table.assign(arm=arms_of(table))
    colors, sizes = label_colors(table), list(table["lm_size"].unique())
    fig, axes = new_figure(len(PANELS))
    for (key, ylabel), ax in zip(PANELS, axes):
        if key not in table:
            continue
        for _, runs in table.dropna(subset=[key]).groupby("arm", sort=False):
            curve = _arm_curve(runs, key)
            label, size = runs["tokenizer_label"].iloc[0], runs["lm_size"].iloc[0]
            ax.plot(curve["x"], curve["mean"], size_linestyle(size, sizes), color=colors[label], lw=1.3, marker="o", ms=3)
            band(ax, curve["x"], curve["low"], curve["high"], colors[label])
        ax.set_xlabel("training images seen")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
    if "curve/fd_probe" in table:
        log_if_wide(axes[1], "y", table["curve/fd_probe"].dropna())
    outside_legends(fig, table.drop_duplicates("run_id"))
    fig.suptitle(TITLE)
    return fig
