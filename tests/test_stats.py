"""Intervals, tests and verdicts (issue 20) against known answers: scipy's own intervals on
synthetic run tables, Holm's textbook example, and calibration over many simulated draws —
two arms from one distribution read "no detectable difference" at the nominal rate, and a
real shift is found as often as the t distribution says it should be."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.arms import Metric, fmt_estimate, measurements, summarize
from analysis.compare import (
    BETTER,
    INCONCLUSIVE,
    SAME,
    WORSE,
    compare_runs,
    render,
    resolve_reference,
    verdict,
)
from analysis.runs import SEED_COLUMNS, assign_arms
from analysis.stats import (
    Estimate,
    holm,
    interval_difference,
    paired_difference,
    single_case_difference,
    t_interval,
    welch_difference,
)

FD = Metric("gen/fd_probe", "FD probe", True)
ACC = Metric("gen/class_accuracy", "class acc", False)


def _standardised(n: int, seed: int) -> np.ndarray:
    """n values with mean exactly 0 and sample standard deviation exactly 1."""
    z = np.random.default_rng(seed).normal(size=n)
    return (z - z.mean()) / z.std(ddof=1)


def _runs(arms: dict[str, dict[int, dict[str, float]]], size: str = "micro") -> pd.DataFrame:
    """A run table as ``load_runs`` makes it: arm tokenizer → {seed: metrics}."""
    rows = []
    for label, seeds in arms.items():
        family = label.split()[0]
        for seed, metrics in seeds.items():
            rows.append({"run_id": f"{label}-{size}-{seed}", "run_name": f"{label}-s{seed}", "tokenizer": family,
                         "tokenizer_label": label, "lm_size": size, "lm.size": size, "seed": seed,
                         "tokenizer.name": family, "tracking.run_name": f"{label}-s{seed}", **metrics})
    return assign_arms(pd.DataFrame(rows))


def _table(a: np.ndarray, b: np.ndarray, seeds_b: range | None = None, key: str = "gen/fd_probe") -> pd.DataFrame:
    seeds_b = seeds_b or range(len(b))
    return _runs({"jpeg q25": {s: {key: v} for s, v in enumerate(a)},
                  "vq 1k f4": {s: {key: v} for s, v in zip(seeds_b, b)}})


# --- intervals equal scipy's ---------------------------------------------------------------------


def test_t_interval_of_a_known_arm_is_scipys():
    mean, sd, n = 46.9, 4.0, 3
    values = mean + sd * _standardised(n, 0)
    runs = _runs({"vq 1k f4": {s: {"gen/fd_probe": v} for s, v in enumerate(values)}})
    (arm,) = summarize(runs, ["gen/fd_probe"])
    e = arm.estimates["gen/fd_probe"]
    low, high = stats.t.interval(0.95, n - 1, loc=mean, scale=sd / math.sqrt(n))
    assert (e.n, e.source) == (3, "seeds")
    assert e.mean == pytest.approx(mean) and e.low == pytest.approx(low) and e.high == pytest.approx(high)
    ci = stats.ttest_1samp(values, 0).confidence_interval(0.95)
    assert (e.low, e.high) == pytest.approx((ci.low, ci.high))
    assert fmt_estimate(e) == f"46.9 ± {(high - low) / 2:.2g} (3)"  # 9.9: t_{0.975, 2} · 4 / √3


def test_paired_welch_and_single_case_differences_are_scipys():
    rng = np.random.default_rng(1)
    a, b = 50 + 3 * rng.normal(size=5), 45 + 3 * rng.normal(size=5)
    same_seeds = compare_runs(_table(a, b), metrics=(FD,)).verdicts[0].difference
    ref = stats.ttest_rel(a, b)
    assert same_seeds.test == "paired t" and same_seeds.df == 4
    assert (same_seeds.low, same_seeds.high) == pytest.approx(tuple(ref.confidence_interval(0.95)))
    assert same_seeds.p_value == pytest.approx(ref.pvalue)

    other_seeds = compare_runs(_table(a, b[:4], range(10, 14)), metrics=(FD,)).verdicts[0].difference
    ref = stats.ttest_ind(a, b[:4], equal_var=False)
    assert other_seeds.test == "Welch t" and other_seeds.df == pytest.approx(ref.df)
    assert (other_seeds.low, other_seeds.high) == pytest.approx(tuple(ref.confidence_interval(0.95)))
    assert other_seeds.p_value == pytest.approx(ref.pvalue)

    # one run against several: Crawford–Howell's t is the pooled two-sample t with a group of one
    one = compare_runs(_table(a[:1], b), metrics=(FD,)).verdicts[0].difference
    ref = stats.ttest_ind(a[:1], b, equal_var=True)
    assert one.test == "Crawford–Howell t" and one.df == len(b) - 1
    assert (one.low, one.high) == pytest.approx(tuple(ref.confidence_interval(0.95)))
    assert one.p_value == pytest.approx(ref.pvalue)
    flipped = compare_runs(_table(b, a[:1]), metrics=(FD,)).verdicts[0].difference  # several against one
    assert (flipped.estimate, flipped.low, flipped.high) == pytest.approx((-one.estimate, -one.high, -one.low))


def test_pairing_needs_the_same_seeds_on_both_arms():
    a, b = np.arange(3.0), np.array([1.5, 1.7, 3.9])
    assert compare_runs(_table(a, b), metrics=(FD,)).verdicts[0].difference.test == "paired t"
    assert compare_runs(_table(a, b, range(1, 4)), metrics=(FD,)).verdicts[0].difference.test == "Welch t"
    # a stage-1 seed that varies on one arm only: the LM seeds still pair, the tokenizer seeds do not
    runs = _table(a, b)
    runs["stage1.seed"] = np.where(runs["tokenizer"] == "vq", runs["seed"], 0)
    assert compare_runs(assign_arms(runs), metrics=(FD,)).verdicts[0].difference.test == "paired t"
    assert set(SEED_COLUMNS) == {"seed", "stage1.seed", "tokenizer.seed"}


def test_zero_spread_gives_a_zero_width_interval_not_a_nan():
    d = paired_difference([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])  # every pair differs by exactly 1
    assert (d.estimate, d.low, d.high, d.p_value) == (1.0, 1.0, 1.0, 0.0) and d.test == "paired t (no spread)"
    assert paired_difference([1.0, 2.0], [1.0, 2.0]).p_value == 1.0
    rounded = paired_difference([0.3, 0.7, 0.15], [0.25, 0.65, 0.1])  # 0.05 each, up to float rounding
    assert rounded.low == rounded.high == rounded.estimate and rounded.p_value == 0.0
    assert t_interval([0.05, 0.05, 0.05]).half_width == 0.0
    assert not t_interval([5.0]).has_interval and t_interval([]).n == 0
    assert not welch_difference([1.0], [2.0, 3.0]).tested


# --- one run per arm: the runs' own intervals ----------------------------------------------------


def test_one_run_each_uses_the_runs_bootstrap_intervals_or_says_inconclusive():
    runs = _table(np.array([50.0]), np.array([40.0]))
    (v,) = compare_runs(runs, metrics=(FD,)).verdicts
    assert v.verdict == INCONCLUSIVE and math.isnan(v.p_holm)
    runs["gen/fd_probe_ci_low"] = runs["gen/fd_probe"] - 2.0
    runs["gen/fd_probe_ci_high"] = runs["gen/fd_probe"] + 2.0
    (v,) = compare_runs(runs, metrics=(FD,)).verdicts
    se = math.hypot(2.0, 2.0) / stats.norm.ppf(0.975)
    assert v.difference.test == "normal, from intervals"
    assert v.difference.p_value == pytest.approx(2 * stats.norm.sf(10 / se)) and v.verdict == WORSE
    assert fmt_estimate(v.arm_estimate) == "50 [48, 52] (1)" and v.arm_estimate.source == "bootstrap"


def test_stage1_metrics_count_each_tokenizer_once():
    runs = _runs({"vq 1k f4": {s: {"tok/rfid_probe": 10.0, "gen/fd_probe": 40.0 + s} for s in range(3)}})
    runs["tokenizer_hash"] = "one-tokenizer"  # three LM seeds on one stage-1 tokenizer
    assert len(measurements(runs, "tok/rfid_probe")) == 1 and len(measurements(runs, "gen/fd_probe")) == 3


# --- Holm ---------------------------------------------------------------------------------------


def test_holm_gives_the_textbook_decisions():
    # Holm (1979) as on Wikipedia: four tests at alpha 0.05; 0.005·4 and 0.01·3 reject, 0.03·2 stops
    result = holm([0.01, 0.04, 0.03, 0.005], alpha=0.05)
    assert result.reject == (True, False, False, True) and result.m == 4
    assert result.adjusted == pytest.approx((0.03, 0.06, 0.06, 0.02))
    # monotone: a later p-value is never adjusted below an earlier one; NaN is no test
    result = holm([0.01, 0.02, 0.03, 0.04, 0.05, math.nan], alpha=0.05)
    assert result.adjusted[:5] == pytest.approx((0.05, 0.08, 0.09, 0.09, 0.09)) and math.isnan(result.adjusted[5])
    assert result.reject == (True, False, False, False, False, False) and result.m == 5


def test_holm_is_applied_across_the_table_and_said_in_the_text():
    rng = np.random.default_rng(3)
    base = {s: {"gen/fd_probe": 40 + rng.normal(), "gen/class_accuracy": 0.5 + 0.01 * rng.normal()}
            for s in range(4)}
    shifted = {s: {"gen/fd_probe": m["gen/fd_probe"] - 10 + 0.1 * rng.normal(),
                   "gen/class_accuracy": m["gen/class_accuracy"] + 0.001 * rng.normal()} for s, m in base.items()}
    comparison = compare_runs(_runs({"jpeg q25": shifted, "vq 1k f4": base}), metrics=(FD, ACC))
    assert comparison.tests == 2 and comparison.reference == "vq 1k f4"
    fd, acc = comparison.verdicts
    raw = sorted([fd.difference.p_value, acc.difference.p_value])
    assert fd.p_holm == pytest.approx(min(1, 2 * raw[0])) and fd.verdict == BETTER  # lower FD is better
    assert acc.verdict == SAME
    text = render(comparison)
    assert "Holm's step-down correction over the 2 tested comparisons" in text
    assert "| jpeg q25 · micro | FD probe ↓ |" in text


def test_reference_defaults_to_vq_and_accepts_presets_labels_and_families():
    runs = _table(np.arange(3.0), np.arange(3.0))
    assert resolve_reference(runs) == "vq 1k f4" == resolve_reference(runs, "vq")
    assert resolve_reference(runs, "jpeg q25") == "jpeg q25" == resolve_reference(runs, "jpeg q25 · micro")
    runs["tokenizer_preset"] = np.where(runs["tokenizer"] == "vq", "vq_1k", "jpeg_q25")
    runs = assign_arms(runs)  # main's preset.tokenizer becomes the arm's name
    assert resolve_reference(runs) == "vq_1k" and set(runs["arm"]) == {"vq_1k · micro", "jpeg_q25 · micro"}
    with pytest.raises(ValueError, match="valid"):
        resolve_reference(runs, "lfq")


def test_arms_split_on_any_other_varying_param_and_never_on_seeds():
    runs = _table(np.arange(4.0), np.arange(4.0))
    runs["train.lr"] = [1e-3, 1e-3, 3e-4, 3e-4, 1e-3, 1e-3, 3e-4, 3e-4]
    runs["tokenizer.seed"] = range(8)  # varies on every run: still one arm per (tokenizer, lr)
    runs = assign_arms(runs)
    assert list(dict.fromkeys(runs["arm"])) == [
        "jpeg q25 · micro, train.lr=0.001", "jpeg q25 · micro, train.lr=0.0003",
        "vq 1k f4 · micro, train.lr=0.001", "vq 1k f4 · micro, train.lr=0.0003"]
    comparison = compare_runs(runs, metrics=(FD,))
    assert [v.reference for v in comparison.verdicts] == ["vq 1k f4 · micro, train.lr=0.001",
                                                          "vq 1k f4 · micro, train.lr=0.0003"]


# --- calibration and power ----------------------------------------------------------------------

DRAWS = 1000


def _binomial_band(p: float, n: int, k: float = 4.0) -> tuple[float, float]:
    sd = math.sqrt(p * (1 - p) / n)
    return p - k * sd, p + k * sd


def test_two_arms_from_one_distribution_read_no_difference_at_the_nominal_rate():
    """1000 draws of 2 arms × 4 shared seeds (a seed effect both arms share, plus noise),
    through the whole table: "no detectable difference" in 95% of draws, within 4 binomial sd."""
    rng = np.random.default_rng(20)
    runs = _table(np.zeros(4), np.zeros(4))
    same = 0
    for _ in range(DRAWS):
        seed_effect = 5 * rng.normal(size=4)
        values = np.concatenate([seed_effect + rng.normal(size=4), seed_effect + rng.normal(size=4)])
        draw = runs.assign(**{"gen/fd_probe": values})  # rows: jpeg seeds 0-3, then vq seeds 0-3
        same += compare_runs(draw, metrics=(FD,)).verdicts[0].verdict == SAME
    low, high = _binomial_band(0.95, DRAWS)
    assert low <= same / DRAWS <= high, same / DRAWS


@pytest.mark.parametrize("test", ["welch", "single case", "intervals"])
def test_every_other_test_is_calibrated_too(test):
    rng = np.random.default_rng(21)
    z = stats.norm.ppf(0.975)
    rejected = 0
    for _ in range(DRAWS):
        if test == "welch":  # 3 runs vs 5, unequal spreads
            d = welch_difference(rng.normal(0, 1, 3), rng.normal(0, 3, 5))
        elif test == "single case":
            d = single_case_difference(rng.normal(), rng.normal(size=4))
        else:  # one run each, each with an exact normal 95% interval of half-width z·se
            a, b = rng.normal(0, 1.0), rng.normal(0, 2.0)
            d = interval_difference(Estimate(a, a - z, a + z, 1, "bootstrap"),
                                    Estimate(b, b - 2 * z, b + 2 * z, 1, "bootstrap"))
        rejected += d.p_value <= 0.05
    low, high = _binomial_band(0.05, DRAWS)
    assert low <= rejected / DRAWS <= high, rejected / DRAWS


def test_a_real_shift_is_detected_as_often_as_the_t_distribution_predicts():
    """Paired t, 5 seeds, shift 2.2 σ_d: power from the noncentral t, and the verdict says which way."""
    n, shift, sd = 5, 2.2, 1.0
    df, nc = n - 1, shift / (sd / math.sqrt(n))
    crit = stats.t.ppf(0.975, df)
    power = stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc)
    rng = np.random.default_rng(22)
    verdicts = []
    for _ in range(DRAWS):
        b = rng.normal(size=n)
        a = b - shift + sd * rng.normal(size=n)  # the arm lowers FD by `shift`
        d = paired_difference(a, b)
        verdicts.append(verdict(d, d.p_value <= 0.05, FD))
    low, high = _binomial_band(power, DRAWS)
    assert power > 0.9 and low <= verdicts.count(BETTER) / DRAWS <= high, (power, verdicts.count(BETTER))
    assert verdicts.count(WORSE) <= 2  # the wrong sign is (almost) never called
    assert verdict(paired_difference([1.0, 2.0, 3.0], [0.0, 0.5, 1.0]), True, ACC) == BETTER  # higher is better
