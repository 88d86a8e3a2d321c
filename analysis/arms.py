"""Arms: the runs of one configuration over seeds, summarised as mean, 95% interval and n.

``load_runs`` gives every run an ``arm`` (runs that differ only in their seeds); this module
turns an arm's runs into an ``Estimate`` per metric:

- n ≥ 2 runs: mean ± Student-t interval over the runs (``analysis.stats.t_interval``);
- one run that logged ``<metric>_ci_low`` / ``<metric>_ci_high`` (its own 95% sampling
  interval, e.g. a bootstrap over its generated samples, ``lmgen.metrics.bootstrap``): that
  interval;
- one run without: its value, no interval.

Stage-1 metrics (``tok/*``) belong to a tokenizer, not to an LM run: runs that share one
stage-1 tokenizer (``tokenizer_hash``) count once, so three LM seeds on one tokenizer are one
measurement of its reconstruction, not three.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.runs import SEED_COLUMNS, assign_arms
from analysis.stats import CONFIDENCE, Estimate, t_interval

CI_LOW, CI_HIGH = "_ci_low", "_ci_high"  # suffixes of a run's own interval: gen/fd_probe_ci_low


@dataclass(frozen=True)
class Metric:
    """A headline metric: MLflow key, short column name, and which direction is better."""

    key: str
    short: str
    lower_is_better: bool


# The metrics every verdict and results table speaks of, in table order (DESIGN §5 keys).
HEADLINE = (
    Metric("gen/fid", "gFID", True),
    Metric("gen/fd_probe", "FD probe", True),
    Metric("gen/kid_probe", "KID probe", True),
    Metric("gen/class_accuracy", "class acc", False),
    Metric("lm/val_bits_per_image", "val bits/img", True),
    Metric("tok/rfid", "rFID", True),
    Metric("tok/rfid_probe", "rFD probe", True),
)


def with_arms(runs: pd.DataFrame) -> pd.DataFrame:
    """A run table (``load_runs`` rows) with its ``arm`` columns, assigned from its params if missing."""
    return runs if "arm" in runs else assign_arms(runs)


def arms_of(frame: pd.DataFrame) -> pd.Series:
    """The ``arm`` of each row of a tidy frame (histories, per-class or per-position tables);
    where a frame has none, its tokenizer label and LM size (its params are not at hand)."""
    if "arm" in frame:
        return frame["arm"]
    return frame["tokenizer_label"].astype(str) + " · " + frame["lm_size"].astype(str)


@dataclass(frozen=True)
class Measurements:
    """One arm's measurements of one metric, one entry per replicate: value, the run's own
    interval bounds (NaN where it logged none) and the values of the seed columns it has."""

    value: np.ndarray  # float64 (k,)
    ci_low: np.ndarray  # float64 (k,)
    ci_high: np.ndarray  # float64 (k,)
    seeds: dict[str, np.ndarray]  # seed column -> (k,) values (None where a run lacks it)

    def __len__(self) -> int:
        return len(self.value)


def _numbers(runs: pd.DataFrame, column: str) -> np.ndarray:
    if column not in runs:
        return np.full(len(runs), math.nan)
    return pd.to_numeric(runs[column], errors="coerce").to_numpy(dtype=float, na_value=math.nan)


def measurements(runs: pd.DataFrame, key: str) -> Measurements:
    """One arm's ``Measurements`` of ``key``: runs without a value left out, ``tok/*``
    deduplicated to one per stage-1 tokenizer (``tokenizer_hash``)."""
    if key.startswith("tok/") and "tokenizer_hash" in runs and runs["tokenizer_hash"].notna().all():
        runs = runs.drop_duplicates("tokenizer_hash")
    value = _numbers(runs, key)
    keep = np.isfinite(value)
    seeds = {c: np.asarray(runs[c].astype(object).where(runs[c].notna(), None))[keep]
             for c in SEED_COLUMNS if c in runs}
    return Measurements(value[keep], _numbers(runs, key + CI_LOW)[keep], _numbers(runs, key + CI_HIGH)[keep], seeds)


def estimate(m: Measurements, confidence: float = CONFIDENCE) -> Estimate:
    """``Measurements`` → an ``Estimate``: t over n ≥ 2, else the one run's own interval if logged."""
    if len(m) == 1 and math.isfinite(m.ci_low[0]) and math.isfinite(m.ci_high[0]):
        return Estimate(float(m.value[0]), float(m.ci_low[0]), float(m.ci_high[0]), 1, "bootstrap")
    return t_interval(m.value, confidence)


def arm_estimate(runs: pd.DataFrame, key: str, confidence: float = CONFIDENCE) -> Estimate:
    """The ``Estimate`` of ``key`` over ``runs`` (one arm's runs)."""
    return estimate(measurements(runs, key), confidence)


@dataclass(frozen=True)
class ArmSummary:
    """One arm: its label parts, its run ids, and an ``Estimate`` per metric key it has."""

    arm: str
    tokenizer: str  # the arm's tokenizer: preset name, else tokenizer_label
    family: str  # tokenizer registry name
    context: str  # LM size and any other varying param
    run_ids: tuple[str, ...]
    estimates: dict[str, Estimate]


def summarize(runs: pd.DataFrame, keys: Iterable[str], confidence: float = CONFIDENCE) -> list[ArmSummary]:
    """One ``ArmSummary`` per arm, in the runs' order, with estimates of the ``keys`` present."""
    runs = with_arms(runs)
    keys = [k for k in keys if k in runs]
    out = []
    for arm, group in runs.groupby("arm", sort=False):
        first = group.iloc[0]
        estimates = {k: e for k in keys if (e := arm_estimate(group, k, confidence)).n > 0}
        out.append(ArmSummary(str(arm), str(first["arm_tokenizer"]), str(first["tokenizer"]),
                              str(first["arm_context"]), tuple(group["run_id"]), estimates))
    return out


def fmt_number(value: object, digits: int = 3) -> str:
    """A table cell: ``digits`` significant digits, scientific outside [1e-2, 1e5), "–" for missing."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-2):
            return f"{value:.2e}"
        return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:.0f}"
    return str(value)


def markdown_table(table: pd.DataFrame) -> str:
    """A frame as a markdown table, every cell through ``fmt_number``."""
    header = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "| " + " | ".join("---" for _ in table.columns) + " |"
    rows = ["| " + " | ".join(fmt_number(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def fmt_estimate(e: Estimate | None) -> str:
    """``mean ± half-width (n)`` over seeds; ``value [low, high] (1)`` for one run's own interval;
    ``value (1)`` for one run without; "–" for none."""
    if e is None or e.n == 0:
        return "–"
    if e.source == "seeds":
        return f"{fmt_number(e.mean)} ± {fmt_number(e.half_width, 2)} ({e.n})"
    if e.source == "bootstrap":
        return f"{fmt_number(e.mean)} [{fmt_number(e.low)}, {fmt_number(e.high)}] ({e.n})"
    return f"{fmt_number(e.mean)} ({e.n})"


def interval_frame(frame: pd.DataFrame, by: Sequence[str], value: str,
                   confidence: float = CONFIDENCE) -> pd.DataFrame:
    """Per group of ``by``: mean, low, high (t interval; NaN below 2 rows) and n of ``value``,
    groups in order of first appearance."""
    rows = []
    for key, group in frame.groupby(list(by), sort=False, dropna=False):
        e = t_interval(pd.to_numeric(group[value], errors="coerce").to_numpy(float), confidence)
        rows.append({**dict(zip(by, key)), "mean": e.mean, "low": e.low, "high": e.high, "n": e.n})
    return pd.DataFrame(rows, columns=[*by, "mean", "low", "high", "n"])


def estimates_by(runs: pd.DataFrame, by: Sequence[str], key: str, confidence: float = CONFIDENCE) -> pd.DataFrame:
    """Per group of ``by`` in a run table: the ``Estimate`` of metric ``key`` (mean, low, high,
    n, as ``arm_estimate``: ``tok/*`` once per tokenizer, a lone run's own interval)."""
    rows = []
    for group_key, group in runs.groupby(list(by), sort=False, dropna=False):
        e = arm_estimate(group, key, confidence)
        if e.n:
            rows.append({**dict(zip(by, group_key)), "mean": e.mean, "low": e.low, "high": e.high, "n": e.n})
    return pd.DataFrame(rows, columns=[*by, "mean", "low", "high", "n"])


def arm_points(runs: pd.DataFrame, x: str, y: str, confidence: float = CONFIDENCE) -> pd.DataFrame:
    """One row per arm for a scatter: arm, tokenizer, tokenizer_label, lm_size, lm_params, n and
    the mean, low and high of ``x`` and ``y`` (each an ``Estimate``; NaN bounds without an interval)."""
    rows = []
    for arm, group in with_arms(runs).groupby("arm", sort=False):
        ex, ey = arm_estimate(group, x, confidence), arm_estimate(group, y, confidence)
        if ex.n == 0 or ey.n == 0:
            continue
        first = group.iloc[0]
        params = group["lm_params"].dropna() if "lm_params" in group else pd.Series(dtype=float)
        rows.append({"arm": arm, "tokenizer": first["tokenizer"], "tokenizer_label": first["tokenizer_label"],
                     "lm_size": first["lm_size"], "lm_params": float(params.mean()) if len(params) else math.nan,
                     "n": len(group), "x": ex.mean, "x_low": ex.low, "x_high": ex.high,
                     "y": ey.mean, "y_low": ey.low, "y_high": ey.high})
    return pd.DataFrame(rows, columns=["arm", "tokenizer", "tokenizer_label", "lm_size", "lm_params", "n", "x",
                                       "x_low", "x_high", "y", "y_low", "y_high"])

