"""A finding's runs and its verdicts, as CSVs: one setting's two levels compared within each
level of another (CRT's λ 4 vs 0 within each LM size), paired over the LM seeds, and whether
the difference itself differs between two of those (the interaction: is the gain largest for
the smallest LM?).

    python docs/findings/contrasts.py findings_crt --factor tokenizer.crt_weight --levels 4.0 0.0 \
        --within lm_size --out docs/findings/findings_crt [--uri URI]

Writes ``runs.csv`` (one row per finished LM run: its settings, seed and measurements) and
``contrasts.csv``: for every level of ``--within`` that ran both levels and every metric,
Δ = first level − second with the paired-t 95% interval over the seeds both ran (a level run
with one seed against one with several: Crawford–Howell's single-case t, n_seeds "1 vs 3"), the
p-value, its Holm adjustment over every row of the file (one family) and the verdict ("better",
"worse" — knowing which way each metric is better — or "no detectable difference"); then, per metric, the interaction
Δ(first ``--within`` level) − Δ(second), paired over seeds, tested the same way (within = ``interaction``).
Every number in docs/findings.md's finding tables comes from these two files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from analysis.arms import Metric
from analysis.compare import SAME, flipped, verdict
from analysis.runs import load_runs
from analysis.stats import Difference, holm, paired_difference, single_case_difference

# (MLflow key, column, lower is better; None: no better direction, described only in runs.csv)
METRICS = [("gen/fd_probe", "fd_probe", True), ("gen/kid_probe", "kid_probe", True),
           ("gen/class_accuracy", "class_accuracy", False), ("gen/precision_probe", "precision", False),
           ("gen/recall_probe", "recall", False), ("gen/decode_valid_rate", "decode_valid_rate", False),
           ("lm/val_bits_per_image", "val_bits_per_image", True), ("lm/val_loss", "val_loss_nats_per_token", True),
           ("lm/val_label_bits", "label_bits", False), ("tok/psnr", "recon_psnr", False),
           ("tok/rfid_probe", "rfd_probe", True), ("tok/class_accuracy", "recon_class_accuracy", False),
           ("tok/codebook_usage", "code_use", False), ("tok/unigram_kl_uniform", "unigram_kl_uniform", None),
           ("tok/bigram_kl_uniform", "bigram_kl_uniform", None)]
SETTINGS = {"run_name": "run", "tokenizer_preset": "preset", "tokenizer_label": "tokenizer", "tokenizer": "family",
            "lm_size": "lm_size", "seed": "seed", "tok/tokens_per_image": "tokens_per_image",
            "tok/bits_per_image": "bits_per_image", "resolved.images": "images", "resolved.steps": "steps",
            "resolved.flops": "flops"}
# Compared: generation and LM metrics. Reconstruction metrics are one stage-1 tokenizer per level
# (the same for every LM seed), so a paired t over LM seeds would test nothing: they are in runs.csv.
COMPARED = ("fd_probe", "kid_probe", "class_accuracy", "val_bits_per_image", "label_bits")


def run_table(runs: pd.DataFrame, extra: list[str]) -> pd.DataFrame:
    """runs.csv: settings (plus the ``extra`` param columns), then every metric logged."""
    columns = {**SETTINGS, **{c: c for c in extra}, **{key: name for key, name, _ in METRICS}}
    table = runs.reindex(columns=list(columns)).rename(columns=columns)
    table.insert(table.columns.get_loc("bits_per_image") + 1, "log2_vocab",
                 (table["bits_per_image"] / table["tokens_per_image"]).round(2))
    table["lm_minutes"] = runs["lm/train_seconds"].to_numpy() / 60
    return table


def _is_level(values: pd.Series, level: str) -> pd.Series:
    """Which values are ``level``: as numbers where both are numbers (4 is "4.0"), else as text."""
    try:
        return pd.to_numeric(values, errors="raise") == float(level)
    except (ValueError, TypeError):
        return values.astype(str) == level


def _row(within: str, metric: str, a: str, b: str, x: pd.Series, y: pd.Series) -> tuple[dict, Difference]:
    """One contrasts.csv row: a − b of ``metric`` paired over the seeds x and y share, and its
    Difference; a level run once against one run with ≥ 2 seeds (an arm too costly for three),
    single run − mean by Crawford–Howell's t, n_seeds "1 vs n"."""
    xs, ys = x.dropna(), y.dropna()
    if min(len(xs), len(ys)) == 1 and max(len(xs), len(ys)) >= 2:
        d = single_case_difference(float(xs.iloc[0]), ys.to_numpy(float)) if len(xs) == 1 else \
            flipped(single_case_difference(float(ys.iloc[0]), xs.to_numpy(float)))
        means, n_seeds = (xs.mean(), ys.mean()), f"{len(xs)} vs {len(ys)}"
    else:
        seeds = sorted(set(x.index) & set(y.index))
        d = paired_difference(x[seeds].to_numpy(float), y[seeds].to_numpy(float))
        means, n_seeds = (x[seeds].mean(), y[seeds].mean()), len(seeds)
    return ({"within": within, "metric": metric, "a": a, "b": b, "mean_a": means[0], "mean_b": means[1],
             "delta": d.estimate, "low": d.low, "high": d.high, "p": d.p_value, "n_seeds": n_seeds, "test": d.test},
            d)


def contrasts(table: pd.DataFrame, factor: str, levels: tuple, within: str) -> pd.DataFrame:
    """contrasts.csv rows (see the module docstring)."""
    directions = {name: Metric(key, name, lower) for key, name, lower in METRICS}
    a_level, b_level = (str(level) for level in levels)
    rows, deltas, groups = [], {}, []
    for group, runs in table.groupby(within, sort=False):
        a = runs[_is_level(runs[factor], a_level)].set_index("seed")
        b = runs[_is_level(runs[factor], b_level)].set_index("seed")
        if a.empty or b.empty:  # a group that did not run both levels (FSQ has no 2^14 exactly)
            continue
        groups.append(group)
        for metric in COMPARED:
            deltas[(group, metric)] = a[metric].astype(float) - b[metric].astype(float)  # aligned on seed
            rows.append(_row(group, metric, f"{factor}={a_level}", f"{factor}={b_level}", a[metric], b[metric]))
    if len(groups) >= 2:  # Δ(first group) − Δ(second): does the effect depend on the group?
        for metric in COMPARED:
            rows.append(_row("interaction", metric, f"Δ at {groups[0]}", f"Δ at {groups[1]}",
                             deltas[(groups[0], metric)].dropna(), deltas[(groups[1], metric)].dropna()))
    out = pd.DataFrame([row for row, _ in rows])
    result = holm(out["p"].tolist())
    out["p_holm"] = result.adjusted
    out["verdict"] = [("differs" if rej else SAME) if row["within"] == "interaction"
                      else verdict(d, bool(rej), directions[row["metric"]])
                      for (row, d), rej in zip(rows, result.reject)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", help="the sweep's MLflow experiment, e.g. findings_crt")
    parser.add_argument("--factor", required=True, help="the compared setting: a param or a runs.csv column")
    parser.add_argument("--levels", nargs=2, required=True, help="its two levels, a then b (Δ = a − b)")
    parser.add_argument("--within", default="lm_size", help="compare within each level of this column")
    parser.add_argument("--out", type=Path, required=True, help="folder for runs.csv and contrasts.csv")
    parser.add_argument("--uri", help="tracking URI (default: $LMGEN_HOME's store)")
    parser.add_argument("--contrasts", default="contrasts.csv", help="file name of the contrasts, in --out")
    args = parser.parse_args()
    runs = load_runs(args.experiment, args.uri)
    extra = [c for c in (args.factor, args.within) if c in runs.columns and c not in SETTINGS.values()]
    table = run_table(runs, extra)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "runs.csv", index=False, float_format="%.5g")
    out = contrasts(table, args.factor, tuple(args.levels), args.within)
    out.to_csv(args.out / args.contrasts, index=False, float_format="%.4g")
    print(f"{len(table)} runs -> {args.out / 'runs.csv'}\n{len(out)} contrasts -> {args.out / args.contrasts}")
    print(out[["within", "metric", "mean_a", "mean_b", "delta", "low", "high", "p_holm", "verdict"]].to_string(
        index=False, float_format=lambda v: f"{v:.4g}"))


if __name__ == "__main__":
    main()
