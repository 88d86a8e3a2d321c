"""How a run reads in the MLflow UI (lmgen.run_page): names lead with what varies, params are
few and each setting once, for every tokenizer preset and sweep point. Pure: configs only, no
runs (tests/test_e2e.py and tests/test_sweep.py check the logged runs)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from lmgen.config import load_config, preset_names
from lmgen.run_page import PARAM_BUDGET, display_name, lm_params, point_labels
from lmgen.sweep import expand, load_sweep, point_config

ROOT = Path(__file__).resolve().parents[1]
RESOLVED = {"resolved.steps": 300, "resolved.images": 9600, "resolved.tokens": 614400, "resolved.flops": 1.2e12,
            "resolved.val_every": 60, "resolved.precision": "32-true"}
EVAL = {"eval.probe": "probe0123-w4567", "eval.inception": "unavailable"}  # what evaluation adds


def _repeated(params: dict) -> list:
    """(leaf, value) pairs held by more than one param: a setting logged twice."""
    counts = Counter((re.split(r"[./]", k)[-1], str(v)) for k, v in params.items())
    return [pair for pair, n in counts.items() if n > 1]


@pytest.mark.parametrize("preset", preset_names("tokenizer"))
def test_every_preset_logs_few_params_each_setting_once(preset):
    experiment = ROOT / ("experiments/video.yaml" if preset.startswith("h264") else "experiments/base.yaml")
    cfg = load_config(experiment, [f"tokenizer={preset}"])
    params = {**lm_params(cfg, RESOLVED), **EVAL}
    assert len(params) <= PARAM_BUDGET, sorted(params)
    assert _repeated(params) == [] and all("/" not in k for k in params)
    assert params["preset.tokenizer"] == preset and params["tokenizer.name"] == cfg.tokenizer.name
    assert "resolved.val_every" not in params and "train.images" not in params  # follow from what is there
    assert display_name(cfg) == f"{preset} · {cfg.lm.size} · s0"


def test_a_run_outside_a_sweep_keeps_the_name_it_is_given():
    base = ROOT / "experiments/base.yaml"
    assert display_name(load_config(base, ["lm.size=micro", "seed=3"])) == "vq_1k · micro · s3"
    assert display_name(load_config(base, ["tracking.run_name=my try"])) == "my try"


@pytest.mark.parametrize(("sweep", "point", "name", "axis"), [
    ("codec", "quality=10,restart_markers=false", "jpeg_q25 · nano · s0 · quality=10, restart_markers=false",
     "tokenizer.restart_markers"),
    ("vocab", "vq_1k,codebook_size=64", "vq_1k · micro · s0 · codebook_size=64", "tokenizer.codebook_size"),
    ("vocab", "fsq_4k", "fsq_4k · micro · s0", "tokenizer.levels"),
    ("seeds", "vq_1k,seed=2", "vq_1k · nano · s2", "seed"),
    ("crt_lambda", "crt_weight=4.0,size=micro", "crt_vq_1k · micro · s0 · crt_weight=4.0", "tokenizer.crt_weight"),
])
def test_sweep_points_are_named_lead_first_and_their_axes_are_params(sweep, point, name, axis):
    """The lead (preset, size, seed) first, then only the axes it does not say; every axis a param,
    even one at its default (crt_weight=4.0), so the compare view can plot it."""
    spec = load_sweep(ROOT / "sweeps" / f"{sweep}.yaml")
    (found,) = [p for p in expand(spec) if p.name == point]
    cfg = load_config(found.experiment, point_config(spec, found))
    assert display_name(cfg) == name
    params = lm_params(cfg, RESOLVED)
    assert axis in params and _repeated(params) == []


def test_an_axis_a_learned_tokenizer_copies_is_one_param():
    """A stage1.* axis is also in the tokenizer block (the recipe filled in): one param, not two."""
    cfg = load_config(ROOT / "experiments/base.yaml", ["stage1.steps=7", "tracking.sweep=s", "tracking.run_name=steps=7"])
    params = lm_params(cfg, RESOLVED)
    assert params["stage1.steps"] == 7 and "tokenizer.steps" not in params and _repeated(params) == []
    assert display_name(cfg) == "vq_1k · nano · s0 · steps=7"


def test_point_labels_split_outside_brackets():
    assert point_labels("vq_1k,prefix_ratios=[0.25,0.5],seed=1") == ["vq_1k", "prefix_ratios=[0.25,0.5]", "seed=1"]
    assert point_labels("") == []
