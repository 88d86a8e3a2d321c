"""The budget search of docs/findings.md as a table: every finished LM run of the experiment
`findings` in the store, the settings that were tried and what each reached.

    lmgen run experiments/findings.yaml ...   # the runs listed in docs/findings.md, "The budget"
    python docs/findings/budget_search.py [--uri URI ...] [--out docs/findings/budget_search.csv]

Columns: the settings (data preset, colour levels, tokenizer, its grid, stage-1 steps, LM size,
images seen, lr, sampling) and the measurements with their intervals (probe class accuracy of the
samples and its 95% bootstrap interval, probe FD and its interval, the probe's accuracy on the
tokenizer's reconstructions, the bits per image the class token saves, val bits per image, LM
training minutes). The data knobs an override can change without changing the preset's name
(``data.max_rotation``, ``data.tail_alpha``) come from each run's resolved config, which
``load_runs`` reads; runs logged before ``data.max_rotation`` existed drew at its default.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from analysis.runs import load_runs
from lmgen.datasets.shapes import ShapesConfig

SETTINGS = {"preset.data": "data", "data.color_levels": "color_levels", "data.max_rotation": "max_rotation",
            "data.tail_alpha": "tail_alpha", "preset.tokenizer": "tokenizer",
            "tok/tokens_per_image": "tokens_per_image", "stage1.steps": "stage1_steps", "lm.size": "lm",
            "resolved.images": "images", "train.lr": "lr", "sample.cfg_scale": "cfg_scale",
            "sample.temperature": "temperature", "sample.top_p": "top_p", "sample.num_samples": "samples"}
MEASURED = {"gen/class_accuracy": "class_accuracy", "gen/class_accuracy_ci_low": "class_accuracy_low",
            "gen/class_accuracy_ci_high": "class_accuracy_high", "gen/fd_probe": "fd_probe",
            "gen/fd_probe_ci_low": "fd_probe_low", "gen/fd_probe_ci_high": "fd_probe_high",
            "tok/class_accuracy": "recon_class_accuracy", "tok/psnr": "recon_psnr",
            "lm/val_label_bits": "label_bits", "lm/val_bits_per_image": "val_bits_per_image",
            "gen/decode_valid_rate": "decode_valid_rate"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uri", action="append", help="tracking URI, repeatable (default: $LMGEN_HOME's store)")
    parser.add_argument("--experiment", default="findings")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("budget_search.csv"))
    args = parser.parse_args()
    runs = pd.concat([load_runs(args.experiment, uri) for uri in args.uri or [None]]).sort_values("start_time")
    table = runs.reindex(columns=[*SETTINGS, *MEASURED]).rename(columns={**SETTINGS, **MEASURED})
    table.insert(0, "run", runs["run_name"].values)
    table.insert(1, "run_id", runs["run_id"].str[:8].values)
    table["max_rotation"] = table["max_rotation"].fillna(ShapesConfig.max_rotation)
    table["lm_minutes"] = (runs["lm/train_seconds"] / 60).values
    table.to_csv(args.out, index=False, float_format="%.4g")
    print(f"{len(table)} runs -> {args.out}")


if __name__ == "__main__":
    main()
