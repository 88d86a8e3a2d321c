"""Long tail (JPEG-LM Fig. 4): per class, the difference in generation quality between each
tokenizer and a reference tokenizer (VQ, JPEG-LM's baseline), against the class's train
frequency, with Spearman's ρ and its p-value. JPEG-LM: JPEG's advantage over VQ grows for
rare classes (p = 0.0002). ``shapes`` has a long-tailed class distribution for this.
With several seeds per tokenizer, each point is the mean difference over seeds with its 95%
interval (paired by seed where both ran the same seeds, else Welch) as an error bar, and ρ is
computed on the means."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy.stats import spearmanr

from analysis.arms import arms_of, measurements
from analysis.compare import difference
from analysis.style import FigureSkipped, error_extent, label_colors, log_axis, new_figure, size_rank

TITLE = "Long tail"
REFERENCE = "vq"  # JPEG-LM compares against a VQ transformer of the same size
METRICS = [("fd_probe", "Δ per-class probe FD ↓"), ("class_accuracy", "Δ per-class probe accuracy ↑")]


def _class_differences(arm: pd.DataFrame, ref: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per class both have: Δ = arm − reference of ``metric`` over their runs (paired by seed,
    else Welch, as ``analysis.compare.difference``), with its 95% interval where the runs allow."""
    ref_by = dict(tuple(ref.groupby("class", sort=False)))
    rows = []
    for c, group in arm.groupby("class", sort=True):
        if c not in ref_by:
            continue
        d = difference(measurements(group, metric), measurements(ref_by[c], metric), metric)
        rows.append({"class": c, f"d_{metric}": d.estimate, f"d_{metric}_low": d.low, f"d_{metric}_high": d.high})
    columns = ["class", f"d_{metric}", f"d_{metric}_low", f"d_{metric}_high"]
    return pd.DataFrame(rows, columns=columns).set_index("class")


def longtail_differences(per_class: pd.DataFrame, reference: str = REFERENCE) -> pd.DataFrame:
    """Per class: metric(arm) − metric(reference), over each arm's seeds, at the largest LM size
    the reference family has (its first arm there is the reference). Columns class,
    train_frequency, tokenizer_label, tokenizer, lm_size, reference, arm, n, n_reference and
    d_<metric> with d_<metric>_low / _high (NaN where the seeds give no interval)."""
    ref_rows = per_class[per_class["tokenizer"] == reference]
    if ref_rows.empty:
        raise FigureSkipped(f"no run of the reference tokenizer {reference!r} logged per_class.csv")
    size = max(ref_rows["lm_size"].unique(), key=size_rank)
    at_size = per_class[per_class["lm_size"] == size].assign(arm=lambda f: arms_of(f))
    ref_all = at_size[at_size["tokenizer"] == reference]
    ref = ref_all[ref_all["arm"] == ref_all["arm"].iloc[0]]
    frequency = ref.drop_duplicates("class").set_index("class")["train_frequency"]
    rows = []
    for arm, group in at_size[at_size["tokenizer"] != reference].groupby("arm", sort=False):
        diff = pd.concat([_class_differences(group, ref, metric) for metric, _ in METRICS], axis=1)
        diff = diff.reset_index()
        diff = diff.assign(train_frequency=diff["class"].map(frequency).to_numpy(),
                           tokenizer_label=group["tokenizer_label"].iloc[0], tokenizer=group["tokenizer"].iloc[0],
                           lm_size=size, reference=ref["tokenizer_label"].iloc[0], arm=arm,
                           n=group["run_id"].nunique(), n_reference=ref["run_id"].nunique())
        rows.append(diff)
    if not rows:
        raise FigureSkipped(f"only the reference tokenizer {reference!r} logged per_class.csv")
    return pd.concat(rows, ignore_index=True)


def longtail_figure(per_class: pd.DataFrame, reference: str = REFERENCE) -> Figure:
    """``per_class``: ``load_table(runs, "per_class.csv")``. Needs ≥3 classes with both values."""
    if per_class.empty or "train_frequency" not in per_class:
        raise FigureSkipped("no run logged per_class.csv")
    diffs = longtail_differences(per_class, reference)
    usable = diffs[diffs["train_frequency"] > 0].dropna(subset=["d_fd_probe"])
    if usable.empty or usable.groupby("tokenizer_label").size().max() < 3:
        raise FigureSkipped("fewer than 3 classes have probe FD for both tokenizers (per-class FD needs ≥2 "
                            "decodable samples of the class: raise sample.num_samples)")
    colors = label_colors(diffs)
    fig, axes = new_figure(2)
    for ax, (metric, y_label) in zip(axes, METRICS):
        for _, group in diffs.groupby("arm", sort=False):
            label = group["tokenizer_label"].iloc[0]
            group = group.dropna(subset=[f"d_{metric}"])
            group = group[group["train_frequency"] > 0]  # a class absent from train has no place on a log axis
            if len(group) < 3:
                continue
            if group[f"d_{metric}"].nunique() > 1:
                rho, p = spearmanr(group["train_frequency"], group[f"d_{metric}"])
                text = f"{label}: ρ = {rho:+.2f} (p = {p:.2g})"
            else:  # no spread: a rank correlation is undefined
                text = f"{label}: Δ constant"
            yerr = error_extent(group[f"d_{metric}"], group[f"d_{metric}_low"], group[f"d_{metric}_high"])
            if yerr is not None:
                ax.errorbar(group["train_frequency"], group[f"d_{metric}"], yerr=yerr, fmt="none", ecolor=colors[label],
                            elinewidth=0.9, capsize=2, alpha=0.8)
                text += f", n = {group['n'].iloc[0]} vs {group['n_reference'].iloc[0]}"
            ax.scatter(group["train_frequency"], group[f"d_{metric}"], color=colors[label], s=30,
                       edgecolors="black", linewidths=0.4, label=text)
            if group["train_frequency"].nunique() > 1:  # least-squares trend on log frequency
                slope, intercept = np.polyfit(np.log(group["train_frequency"]), group[f"d_{metric}"], 1)
                x = np.geomspace(group["train_frequency"].min(), group["train_frequency"].max(), 20)
                ax.plot(x, slope * np.log(x) + intercept, color=colors[label], lw=1, alpha=0.7)
        ax.axhline(0, color="0.3", lw=0.8)
        log_axis(ax, "x")
        ax.set_xlabel("class frequency in the train split")
        ax.set_ylabel(y_label)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, title="Spearman vs frequency", title_fontsize=7, loc="upper center",
                  bbox_to_anchor=(0.5, -0.18), ncol=2)
    fig.suptitle(f"{TITLE}: Δ = tokenizer − {diffs['reference'].iloc[0]}, per class, at LM {diffs['lm_size'].iloc[0]}")
    return fig
