"""Config contract: strict merge, typos and bad values fail before compute naming the key."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from lmgen.config import ConfigError, config_hash, load_config

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "experiments").glob("*.yaml"))
PRESETS = sorted((ROOT / "experiments").glob("*/*.yaml"))


def test_defaults_load():
    cfg = load_config()
    assert cfg.tokenizer.name == "pixels"
    assert cfg.data.name == "shapes"
    assert cfg.lm.size == "micro"


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_experiment_yaml_validates(path):
    assert load_config(path).name == path.stem


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_preset_composes_by_name(path):
    """Every preset loads by name onto the base experiment (a clip tokenizer onto the video one),
    whole: the block is the preset's, and its name is recorded."""
    from omegaconf import OmegaConf

    from lmgen.tokenizers import TOKENIZERS

    group = {"tokenizers": "tokenizer", "data": "data"}[path.parent.name]
    block = OmegaConf.to_container(OmegaConf.load(path))[group]
    video = group == "tokenizer" and TOKENIZERS[block["name"]].video or "frames" in block
    cfg = load_config(ROOT / "experiments" / ("video.yaml" if video else "base.yaml"), [f"{group}={path.stem}"])
    assert getattr(cfg.preset, group) == path.stem
    resolved = dataclasses.asdict(getattr(cfg, group))
    assert {k: resolved[k] for k in block} == block


def test_a_preset_is_chosen_by_name_and_overrides_apply_on_top():
    base = ROOT / "experiments/base.yaml"
    cfg = load_config(base, ["tokenizer=lfq_10bit", "tokenizer.bits=12", "lm.size=micro"])
    assert (cfg.tokenizer.name, cfg.tokenizer.bits, cfg.preset.tokenizer, cfg.lm.size) == ("lfq", 12, "lfq_10bit", "micro")
    # the whole block is the preset's: nothing of the base's own tokenizer (vq_1k) survives
    assert not hasattr(cfg.tokenizer, "codebook_size")
    # ... and a later preset replaces an earlier one, with the overrides given after it
    cfg = load_config(base, ["tokenizer=jpeg_q25", "tokenizer.quality=50", "tokenizer=vq_4k"])
    assert (cfg.tokenizer.name, cfg.tokenizer.codebook_size, cfg.preset.tokenizer) == ("vq", 4096, "vq_4k")
    # setting another tokenizer's name keeps the fields both have, drops the rest, claims no preset
    cfg = load_config(base, ["tokenizer.downsample=8", "tokenizer.name=bae"])
    assert (cfg.tokenizer.name, cfg.tokenizer.downsample, cfg.preset.tokenizer) == ("bae", 8, None)
    cfg = load_config(base, ["data.image_size=16", "data.name=imagefolder", "data.root=/x"])
    assert (cfg.data.image_size, cfg.data.root) == (16, "/x") and not hasattr(cfg.data, "num_classes")
    # a data preset, the same way
    assert load_config(base, ["data=moving_shapes32", "tokenizer=h264_qp37"]).data.frames == 8


def test_an_unknown_preset_fails_listing_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "experiments/base.yaml", ["tokenizer=vq_1kk"])
    message = str(err.value)
    assert "tokenizer='vq_1kk'" in message and "did you mean 'vq_1k'" in message
    assert all(name in message for name in ("jpeg_q25", "lfq_10bit", "pixels_palette64"))


def test_the_stage1_recipe_is_shared_unless_a_preset_sets_its_own():
    base = ROOT / "experiments/base.yaml"
    vq = load_config(base, ["tokenizer=vq_1k", "stage1.steps=123"])
    assert (vq.tokenizer.steps, vq.tokenizer.lr, vq.tokenizer.channels) == (123, vq.stage1.lr, vq.stage1.channels)
    causal = load_config(base, ["tokenizer=causal1d_32"])  # its preset keeps its own lr, with the reason
    assert causal.tokenizer.lr == 5e-4 != causal.stage1.lr and causal.tokenizer.steps == causal.stage1.steps
    assert load_config(base, ["tokenizer=vq_1k", "tokenizer.steps=7"]).tokenizer.steps == 7  # one arm's own
    jpeg = load_config(base, ["tokenizer=jpeg_q25", "stage1.steps=123"])  # codecs have no stage-1 recipe
    assert not hasattr(jpeg.tokenizer, "steps")


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["train.lrr=0.1"], "train.lrr"),
        (["train.lrr=0.1"], "did you mean 'train.lr'"),
        (["trian.lr=0.1"], "trian"),
        (["train.max_steps=abc"], "train.max_steps"),
        (["train.max_steps=5"], "train.budget=steps"),  # derived from the budget unless budget=steps
        (["train.budget=steps"], "train.max_steps"),
        (["train.budget=epochs"], "train.budget"),
        (["train.budget=flops"], "train.flops"),
        (["train=5"], "train is a section"),
        (["tokenizer=7"], "tokenizer is a section"),
        (["stage1.lr=-1"], "stage1.lr"),
        (["stage1.precision=fp8"], "stage1.precision"),
        (["sample.cfg_scale=nan"], "sample.cfg_scale"),
        (["lm.size=huge"], "valid choices: B, L, XL, micro, mini, nano, small"),
        (["tokenizer.name=jpg"], "did you mean 'jpeg'"),
        (["tokenizer.name=jpeg", "tokenizer.qualty=10"], "tokenizer.qualty"),
        (["tokenizer.name=jpeg", "tokenizer.subsampling=4:1:1"], "tokenizer.subsampling"),
        (["tokenizer.name=jpeg", "tokenizer.quality=0"], "tokenizer.quality"),
        (["tokenizer.palette_size=-1"], "tokenizer.palette_size"),
        (["train.precision=fp8"], "train.precision"),
        (["data.name=cifar"], "data.name"),
        (["data.name=imagefolder"], "data.root"),
        (["train.batch_size=0"], "train.batch_size"),
        (["data.train_size=0"], "data.train_size"),
        (["data.name=imagefolder", "data.root=/x", "data.val_size=-1"], "data.val_size"),
        (["data.name=moving_shapes", "data.frames=0"], "data.frames"),  # a video dataset needs frames > 0
        (["data.name=moving_shapes", "data.frames=-2"], "data.frames"),
        (["data.frames=8"], "data.frames"),  # shapes holds still images: no such key
        (["data.name=imagefolder", "data.root=/x", "data.frames=4"], "data.frames"),
        (["data.name=videofolder", "data.frames=15"], "data.root"),
        (["data.name=videofolder", "data.root=/x", "data.frames=0"], "data.frames"),
        (["data.name=moving_shapes", "data.frames=8", "data.train_size=0"], "data.train_size"),
        (["data.fps=0"], "data.fps"),
        (["data.name=moving_shapes", "data.frames=8", "data.fps=-3"], "data.fps"),
        (["data.name=moving_shapes", "data.min_speed=0.5"], "min_speed"),
        (["sample.top_p=0"], "sample.top_p"),
        (["sample.num_samples=-1"], "sample.num_samples"),
        (["metrics.prefix_samples=-4"], "metrics.prefix_samples"),
        (["metrics.prefix_ratios=[0.5,1.0]"], "metrics.prefix_ratios"),
        (["metrics.prefix_ratios=[0]"], "metrics.prefix_ratios"),
        (["metrics.prefix_ratios=[half]"], "metrics.prefix_ratios"),
    ],
)
def test_bad_config_fails_naming_the_key(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert needle in str(err.value)


def test_video_data_keys_pass_their_checks():
    """moving_shapes is procedural (no root) and takes frames/fps; the data checks let it through."""
    for overrides in (["data.name=moving_shapes", "data.frames=15", "data.fps=3"],
                      ["data.name=videofolder", "data.root=/x", "data.frames=15"]):
        try:
            cfg = load_config(None, [*overrides, "tokenizer.name=pixels"])
        except ConfigError as err:  # the tokenizer side may refuse clips; the data keys may not
            assert not re.search(r"data\.\w+ (is required|must be)|data:", str(err)), err
        else:
            assert cfg.data.frames == 15 and cfg.data.fps == 3.0


def test_yaml_typo_is_named(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("lm:\n  szie: nano\n")
    with pytest.raises(ConfigError, match=r"lm\.szie.*did you mean 'lm\.size'"):
        load_config(path)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_win_and_sexagesimal_stays_text():
    cfg = load_config(ROOT / "experiments/tokenizers/jpeg_q25.yaml",
                      ["tokenizer.subsampling=4:4:4", "train.budget=steps", "train.max_steps=7"])
    assert cfg.tokenizer.subsampling == "4:4:4"  # YAML 1.1 would make this 14640
    assert cfg.train.max_steps == 7
    assert cfg.tokenizer.quality == 25


def test_config_is_typed_read_only_and_hash_is_stable():
    from lmgen.config import ExperimentConfig, TrainConfig
    from lmgen.datasets import ShapesConfig
    from lmgen.tokenizers.vq import VQConfig

    a, b = load_config(None, ["seed=1"]), load_config(None, ["seed=1"])
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(load_config(None, ["seed=2"]))
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.seed = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.train.lr = 3.0
    cfg = load_config(ROOT / "experiments/base.yaml")
    assert isinstance(cfg, ExperimentConfig) and isinstance(cfg.train, TrainConfig)
    assert isinstance(cfg.tokenizer, VQConfig) and isinstance(cfg.data, ShapesConfig)
