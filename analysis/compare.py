"""Paired verdicts (``lmgen compare``, and the report's "Paired verdicts"): each arm against a
reference tokenizer at the same LM size (and any other setting), metric by metric.

For every headline metric (``analysis.arms.HEADLINE``) both arms have, Δ = arm − reference
with its 95% interval, from the test the runs allow:

- both arms ran the same seeds (n ≥ 2): paired t over the seeds;
- n ≥ 2 each, different seeds: Welch's t;
- one run against n ≥ 2: Crawford & Howell's t (the single run read against the other
  arm's spread over seeds);
- one run each: a normal approximation from each run's own sampling interval
  (``<metric>_ci_low`` / ``_ci_high``, a bootstrap over its generated samples) where both
  logged one; otherwise "inconclusive (one run each, no interval)".

Verdicts are "better" / "worse" (knowing for each metric which direction is better) where
the difference survives Holm's step-down correction over every tested comparison of the
table (family-wise error ``alpha`` = 5%), else "no detectable difference".
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from analysis.arms import (
    HEADLINE,
    Measurements,
    Metric,
    estimate,
    fmt_estimate,
    fmt_number,
    markdown_table,
    measurements,
)
from analysis.runs import SEED_COLUMNS, assign_arms, load_runs
from analysis.stats import (
    CONFIDENCE,
    Difference,
    Estimate,
    holm,
    interval_difference,
    paired_difference,
    single_case_difference,
    welch_difference,
)

DEFAULT_REFERENCE = "vq"  # the baseline: a VQ tokenizer, as in JPEG-LM and CRT
BETTER, WORSE, SAME = "better", "worse", "no detectable difference"
INCONCLUSIVE = "inconclusive (one run each, no interval)"
_TOKENIZER_SEEDS = ("stage1.seed", "tokenizer.seed")


@dataclass(frozen=True)
class Verdict:
    """One arm against its reference on one metric. ``difference`` is arm − reference;
    ``p_holm`` is NaN where nothing could be tested."""

    arm: str
    reference: str
    metric: Metric
    arm_estimate: Estimate
    reference_estimate: Estimate
    difference: Difference
    p_holm: float
    verdict: str


@dataclass(frozen=True)
class Comparison:
    """Every verdict of one table. reference: the reference tokenizer; tests: how many
    comparisons entered Holm's correction; notes: arms that had no reference to meet."""

    experiment: str
    reference: str
    confidence: float
    alpha: float
    tests: int
    verdicts: tuple[Verdict, ...]
    notes: tuple[str, ...] = ()


def resolve_reference(runs: pd.DataFrame, reference: str | None = None) -> str:
    """The ``arm_tokenizer`` that ``reference`` names: a preset (``vq_1k``), a tokenizer label
    (``vq 1k f4``), a family (``vq``: its first arm) or a whole arm label (``vq_1k · micro``).
    Default: the first arm of family ``vq``, else the first arm. ValueError when nothing matches."""
    order = list(dict.fromkeys(runs["arm_tokenizer"]))
    if not order:
        raise ValueError("no runs to compare")
    spec = DEFAULT_REFERENCE if reference is None else reference
    for column in ("arm_tokenizer", "tokenizer_label", "tokenizer", "arm"):
        for value, tokenizer in zip(runs[column], runs["arm_tokenizer"]):
            if str(value) == spec:
                return str(tokenizer)
    if reference is None:
        return order[0]
    raise ValueError(f"no arm matches reference {reference!r}; valid: {order} (or a family: "
                     f"{sorted(set(runs['tokenizer'].astype(str)))})")


def _pairing(a: Measurements, b: Measurements, key: str) -> tuple[list[float], list[float]] | None:
    """a's and b's values matched by seed, or None when the two arms did not run the same seeds.

    Matched on every seed column both arms have everywhere (the tokenizer's for ``tok/*``);
    failing that, on the LM ``seed`` alone (one arm varies its stage-1 seed, the other
    cannot: a codec). Each seed tuple must occur once per arm."""
    names = _TOKENIZER_SEEDS if key.startswith("tok/") else SEED_COLUMNS
    shared = [c for c in names if c in a.seeds and c in b.seeds
              and all(v is not None for v in (*a.seeds[c], *b.seeds[c]))]
    for columns in (shared, ["seed"] if "seed" in shared and len(shared) > 1 else []):
        if not columns:
            continue
        xa, xb = _by_seed(a, columns), _by_seed(b, columns)
        if xa is not None and xb is not None and set(xa) == set(xb):
            order = sorted(xa)
            return [xa[k] for k in order], [xb[k] for k in order]
    return None


def _by_seed(m: Measurements, columns: list[str]) -> dict[tuple, float] | None:
    """value per seed tuple, None when two replicates share one."""
    keys = list(zip(*(map(str, m.seeds[c]) for c in columns)))
    return dict(zip(keys, m.value)) if len(set(keys)) == len(keys) else None


def flipped(d: Difference) -> Difference:
    """b − a from a − b."""
    return Difference(-d.estimate, -d.high, -d.low, d.p_value, d.test, d.df, d.n_b, d.n_a)


def difference(a: Measurements, b: Measurements, key: str, confidence: float = CONFIDENCE) -> Difference:
    """Δ = a − b of metric ``key`` between two arms' measurements, by the test they allow (module doc)."""
    na, nb = len(a), len(b)
    if na >= 2 and nb >= 2:
        pairs = _pairing(a, b, key)
        if pairs is not None:
            return paired_difference(*pairs, confidence)
        return welch_difference(a.value, b.value, confidence)
    if na == 1 and nb >= 2:
        return single_case_difference(float(a.value[0]), b.value, confidence)
    if na >= 2 and nb == 1:
        return flipped(single_case_difference(float(b.value[0]), a.value, confidence))
    return interval_difference(estimate(a, confidence), estimate(b, confidence), confidence)


def verdict(d: Difference, significant: bool, metric: Metric) -> str:
    """better / worse / no detectable difference / inconclusive, from arm − reference."""
    if not d.tested:
        return INCONCLUSIVE
    if not significant or d.estimate == 0:
        return SAME
    return BETTER if (d.estimate < 0) == metric.lower_is_better else WORSE


def _pairs(runs: pd.DataFrame, reference: str) -> tuple[list[tuple[str, str]], list[str]]:
    """(arm, reference arm) pairs at equal ``arm_context``, and a note per arm without one."""
    arms = dict.fromkeys(zip(runs["arm"], runs["arm_tokenizer"], runs["arm_context"]))  # unique, in order
    refs = {context: arm for arm, tokenizer, context in arms if tokenizer == reference}
    pairs, notes = [], []
    for arm, tokenizer, context in arms:
        if tokenizer == reference:
            continue
        if context in refs:
            pairs.append((arm, refs[context]))
        else:
            notes.append(f"{arm}: no run of the reference {reference} at {context}")
    return pairs, notes


def compare_runs(runs: pd.DataFrame, reference: str | None = None, *, metrics: Sequence[Metric] = HEADLINE,
                 confidence: float = CONFIDENCE, experiment: str = "") -> Comparison:
    """Every arm of ``runs`` (``load_runs`` rows) against the ``reference`` tokenizer at the same
    context, on every metric of ``metrics`` both have; Holm over the table's tested rows."""
    if "arm" not in runs:
        runs = assign_arms(runs)
    alpha = 1 - confidence
    ref = resolve_reference(runs, reference)
    pairs, notes = _pairs(runs, ref)
    if reference is None and DEFAULT_REFERENCE not in set(runs["tokenizer"].astype(str)):
        notes.insert(0, f"no {DEFAULT_REFERENCE} arm: the first arm's tokenizer, {ref}, is the reference")
    groups = dict(tuple(runs.groupby("arm", sort=False)))
    rows = []
    for arm, ref_arm in pairs:
        for metric in metrics:
            if metric.key not in runs:
                continue
            a, b = measurements(groups[arm], metric.key), measurements(groups[ref_arm], metric.key)
            if len(a) and len(b):
                rows.append((arm, ref_arm, metric, estimate(a, confidence), estimate(b, confidence),
                             difference(a, b, metric.key, confidence)))
    adjusted = holm([d.p_value for *_, d in rows], alpha)
    verdicts = tuple(Verdict(arm, ref_arm, m, ea, eb, d, p, verdict(d, reject, m))
                     for (arm, ref_arm, m, ea, eb, d), p, reject in zip(rows, adjusted.adjusted, adjusted.reject))
    return Comparison(experiment, ref, confidence, alpha, adjusted.m, verdicts, tuple(notes))


def compare_experiment(name: str, reference: str | None = None, tracking_uri: str | None = None,
                       confidence: float = CONFIDENCE) -> Comparison:
    """``compare_runs`` on the FINISHED LM runs of experiment (or sweep) ``name``."""
    return compare_runs(load_runs(name, tracking_uri), reference, confidence=confidence, experiment=name)


def _difference_cell(d: Difference) -> str:
    if not math.isfinite(d.estimate):
        return "–"
    if not d.tested:
        return f"{fmt_number(d.estimate)}"
    return f"{fmt_number(d.estimate)} [{fmt_number(d.low)}, {fmt_number(d.high)}]"


def _test_cell(d: Difference) -> str:
    return "–" if not d.tested else f"{d.test}, n={d.n_a}/{d.n_b}"


def comparison_table(comparison: Comparison) -> pd.DataFrame:
    """The verdicts as a table of strings, one row per (arm, metric)."""
    level = f"{comparison.confidence:.0%}"
    rows = [{"arm": v.arm, "metric": f"{v.metric.short} {'↓' if v.metric.lower_is_better else '↑'}",
             "arm value": fmt_estimate(v.arm_estimate), "reference value": fmt_estimate(v.reference_estimate),
             f"Δ arm − ref [{level}]": _difference_cell(v.difference), "test": _test_cell(v.difference),
             "p (Holm)": fmt_number(v.p_holm), "verdict": v.verdict} for v in comparison.verdicts]
    columns = ["arm", "metric", "arm value", "reference value", f"Δ arm − ref [{level}]", "test", "p (Holm)",
               "verdict"]
    return pd.DataFrame(rows, columns=columns)


def explanation(comparison: Comparison) -> str:
    """What the table shows and how its verdicts were reached, for the report and the console."""
    level = f"{comparison.confidence:.0%}"
    return (f"Each arm against the reference tokenizer **{comparison.reference}** at the same LM size (and "
            f"setting). Δ = arm − reference with its {level} interval: paired t where both arms ran the same "
            "seeds, Welch's t where they did not, Crawford–Howell t for one run against several, and a normal "
            "approximation from the runs' own bootstrap intervals for one run each (else inconclusive). Values "
            f"read `mean ± half-width (n)` over seeds, or `value [low, high] (1)` for one run's own interval. "
            f"Verdicts: better / worse only where the difference survives Holm's step-down correction over the "
            f"{comparison.tests} tested comparisons of this table (family-wise error {comparison.alpha:.0%}); "
            "the intervals are per comparison (unadjusted), so one that excludes 0 can still read "
            "'no detectable difference' after the correction.")


def render(comparison: Comparison, style: str = "markdown") -> str:
    """The comparison as a markdown table (``style="markdown"``) or aligned plain text ("text"),
    with its explanation and notes."""
    table = comparison_table(comparison)
    text = explanation(comparison)
    lines = [text if style == "markdown" else textwrap.fill(text.replace("**", ""), 100), ""]
    if table.empty:
        lines.append("No arm has a reference to be compared with.")
    elif style == "markdown":
        lines.append(markdown_table(table))
    else:
        widths = [max(len(str(c)), *(len(str(v)) for v in table[c])) for c in table.columns]
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(table.columns, widths)).rstrip())
        lines += ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip()
                  for row in table.itertuples(index=False)]
    lines += ["", *[f"- {note}" for note in comparison.notes]] if comparison.notes else []
    return "\n".join(lines)

