"""Loss curves (ELM Fig. 3): validation bits per image against training step, and the training
loss per token, one colour per tokenizer and one line style per LM size. Per image is the
axis on which tokenizers with different token counts compare; per token is what the
optimiser sees (ELM: image tokens plateau high, near uniform, yet the model learns). With
several seeds per arm, the line is the mean over seeds and the band its 95% interval (Student
t) at each step."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from analysis.arms import arms_of, interval_frame
from analysis.style import (
    FigureSkipped,
    band,
    label_colors,
    log_if_wide,
    new_figure,
    outside_legends,
    size_linestyle,
)

TITLE = "Loss curves"
KEYS = ("lm/val_bits_per_image", "lm/train_loss")
SMOOTH = 0.8  # EMA weight on the training-loss display (logged every train.log_every steps)


def _smoothed(curves: pd.DataFrame, key: str) -> pd.DataFrame:
    """``curves`` (one key) with ``y``: the value, the training loss as an EMA per run, and ``arm``."""
    curves = curves.sort_values(["run_id", "step"], kind="stable")
    y = curves.groupby("run_id", sort=False)["value"].transform(lambda v: v.ewm(alpha=1 - SMOOTH).mean())
    return curves.assign(y=y if key == "lm/train_loss" else curves["value"], arm=arms_of(curves))


def loss_curves_figure(histories: pd.DataFrame) -> Figure:
    """``histories``: ``load_histories(runs, KEYS)``; needs a run with ≥2 validation points."""
    val = histories[histories["key"] == "lm/val_bits_per_image"] if "key" in histories else histories.iloc[:0]
    if val.empty or val.groupby("run_id")["step"].nunique().max() < 2:
        raise FigureSkipped("no run has ≥2 validations (train.val_every ≥ its steps, resolved.steps)")
    colors, sizes = label_colors(histories), list(histories["lm_size"].unique())
    fig, (left, right) = new_figure(2)
    for key, ax in zip(KEYS, (left, right)):
        for _, runs in _smoothed(histories[histories["key"] == key], key).groupby("arm", sort=False):
            curve = interval_frame(runs, ["step"], "y").sort_values("step")
            label, size = runs["tokenizer_label"].iloc[0], runs["lm_size"].iloc[0]
            ax.plot(curve["step"], curve["mean"], size_linestyle(size, sizes), color=colors[label], lw=1.3,
                    marker="o" if key != "lm/train_loss" else None, ms=3)
            band(ax, curve["step"], curve["low"], curve["high"], colors[label])
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3, which="both")
    log_if_wide(left, "y", val["value"])
    left.set_ylabel("validation bits per image ↓")
    right.set_ylabel(f"training loss, nats per token (EMA {SMOOTH}) ↓")
    outside_legends(fig, histories.drop_duplicates("run_id"))
    fig.suptitle(TITLE)
    return fig
