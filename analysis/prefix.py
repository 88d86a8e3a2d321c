"""Prefix completion (JPEG-LM Tables 1–2): FD of completions given the top r of a val image
against the originals, per tokenizer. Left: against r as asked; right: against the share of
the image's tokens the prompt held. A codec cuts at the end of an MCU row, so its real cut can
differ from r (32-px JPEG at 4:2:0 has two MCU rows: every r cuts after the first), and
its header and top rows can hold most of the bytes."""

from __future__ import annotations

import re

import pandas as pd
from matplotlib.figure import Figure

from analysis.style import FigureSkipped, label_colors, new_figure, outside_legends, size_linestyle, size_marker

TITLE = "Prefix completion"
_KEY = re.compile(r"^gen/prefix_r(\d+)/(fd_probe|fid)$")


def prefix_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Tidy rows (run, ratio, prompt_fraction, fd, metric) from ``gen/prefix_r{NN}/*`` columns.
    Inception FID where every prefix point has it, else probe FD."""
    found = [(m.group(1), m.group(2), c) for c in runs.columns if (m := _KEY.match(c))]
    fid = [c for _, m, c in found if m == "fid"]
    metric = "fid" if fid and all(runs[c].notna().all() for c in fid) else "fd_probe"
    rows = []
    for ratio, m, column in found:
        if m != metric:
            continue
        fraction = runs.get(f"gen/prefix_r{ratio}/prompt_fraction", pd.Series(int(ratio) / 100, index=runs.index))
        for i, run in runs.iterrows():
            if pd.notna(run[column]):
                rows.append({"run_id": run["run_id"], "tokenizer_label": run["tokenizer_label"],
                             "tokenizer": run["tokenizer"], "lm_size": run["lm_size"], "lm_params": run.get("lm_params"),
                             "ratio": int(ratio) / 100, "prompt_fraction": fraction[i], "fd": run[column],
                             "metric": metric})
    return pd.DataFrame(rows)


def prefix_figure(runs: pd.DataFrame) -> Figure:
    """FD vs prompt ratio and vs prompt token share; a line per (tokenizer, LM size)."""
    table = prefix_table(runs)
    if table.empty or table.groupby("run_id")["ratio"].nunique().max() < 2:
        raise FigureSkipped("no run has prefix-completion metrics at ≥2 prompt ratios (metrics.prefix_ratios)")
    colors, sizes = label_colors(table.drop_duplicates("run_id")), list(table["lm_size"].unique())
    fig, axes = new_figure(2)
    y_label = "completion FID ↓" if table["metric"].iloc[0] == "fid" else "completion FD, probe features ↓"
    for ax, x_col, x_label in zip(axes, ("ratio", "prompt_fraction"),
                                  ("prompt ratio r: top rows of the image asked for",
                                   "prompt share of the image's tokens (as cut)")):
        for _, curve in table.groupby("run_id", sort=False):
            curve = curve.sort_values("ratio")
            size = curve["lm_size"].iloc[0]
            ax.plot(curve[x_col], curve["fd"], size_linestyle(size, sizes), marker=size_marker(size),
                    color=colors[curve["tokenizer_label"].iloc[0]], lw=1.3, ms=5, markeredgecolor="black",
                    markeredgewidth=0.4)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
    outside_legends(fig, table.drop_duplicates("run_id"))
    fig.suptitle(f"{TITLE} against the originals")
    return fig
