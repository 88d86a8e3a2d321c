"""Samples sheet: the first row of each run's ``samples.png`` (class-conditional runs: one
sample per class, in class order), one row per tokenizer at its largest LM size."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.style import FigureSkipped, family_color, largest_size

TITLE = "Samples"
PAD_VALUE = 255  # lmgen's image grids are padded with white lines (lmgen.stage1.to_grid)


def first_grid_row(grid: np.ndarray) -> np.ndarray:
    """The first row of tiles of a white-padded grid image (H, W, 3) uint8; the whole image
    when no padding line can be found."""
    white = (grid == PAD_VALUE).all(axis=(1, 2))  # (H,) rows that are padding
    content = np.flatnonzero(~white)
    if len(content) == 0:
        return grid
    start = content[0]
    gaps = np.flatnonzero(white[start:])
    stop = start + gaps[0] if len(gaps) else grid.shape[0]
    return grid[max(start - 2, 0) : min(stop + 2, grid.shape[0])]


def samples_figure(samples: pd.DataFrame) -> Figure:
    """``samples``: ``load_images(runs, "samples.png")``."""
    if samples.empty:
        raise FigureSkipped("no run logged samples.png (sample.num_samples=0)")
    rows = largest_size(samples).drop_duplicates("tokenizer_label")
    strips = [first_grid_row(image) for image in rows["image"]]
    width = max(s.shape[1] for s in strips)
    fig = Figure(figsize=(min(12.0, 2.0 + width / 70), 0.35 + sum(s.shape[0] for s in strips) / 70),
                 layout="constrained")
    axes = fig.subplots(len(strips), 1, squeeze=False)[:, 0]
    for ax, strip, (_, run) in zip(axes, strips, rows.iterrows()):
        padded = np.full((strip.shape[0], width, 3), PAD_VALUE, dtype=np.uint8)
        padded[:, : strip.shape[1]] = strip
        ax.imshow(padded, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(f"{run['tokenizer_label']}\n({run['lm_size']})", rotation=0, ha="right", va="center",
                      fontsize=9, color=family_color(run["tokenizer"]))
        for side in ax.spines.values():
            side.set_visible(False)
    fig.suptitle(f"{TITLE}: one row per tokenizer (largest LM size)")
    return fig
