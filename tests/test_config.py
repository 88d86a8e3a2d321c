"""Config contract: strict merge, typos and bad values fail before compute naming the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf.errors import ReadonlyConfigError

from lmgen.config import ConfigError, config_hash, load_config

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "experiments").rglob("*.yaml"))


def test_defaults_load():
    cfg = load_config()
    assert cfg.tokenizer.name == "pixels"
    assert cfg.data.name == "shapes"
    assert cfg.lm.size == "micro"


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_experiment_yaml_validates(path):
    """Every experiment validates as it is; a tokenizer preset on the default data, or for a clip
    tokenizer (video) on default video data."""
    from omegaconf import OmegaConf

    from lmgen.tokenizers import TOKENIZERS

    name = OmegaConf.load(path).get("tokenizer", {}).get("name", "pixels")
    preset_on_video = path.parent.name == "tokenizers" and TOKENIZERS[name].video
    cfg = load_config(path, ["data.name=moving_shapes", "data.frames=8"] if preset_on_video else [])
    assert cfg.tokenizer.name == name


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["train.lrr=0.1"], "train.lrr"),
        (["train.lrr=0.1"], "did you mean 'train.lr'"),
        (["trian.lr=0.1"], "trian"),
        (["train.max_steps=abc"], "train.max_steps"),
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
        (["data.name=moving_shapes"], "data.frames"),  # a video dataset needs frames > 0
        (["data.name=moving_shapes", "data.frames=-2"], "data.frames"),
        (["data.frames=8"], "data.frames"),  # shapes holds still images
        (["data.name=imagefolder", "data.root=/x", "data.frames=4"], "data.frames"),
        (["data.name=videofolder", "data.frames=15"], "data.root"),
        (["data.name=videofolder", "data.root=/x"], "data.frames"),
        (["data.name=moving_shapes", "data.frames=8", "data.train_size=0"], "data.train_size"),
        (["data.fps=0"], "data.fps"),
        (["data.name=moving_shapes", "data.frames=8", "data.fps=-3"], "data.fps"),
        (["data.motion.min_speed=0.5"], "data.motion"),
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
            assert not re.search(r"data\.\w+ (is required|must be)|data\.motion:", str(err)), err
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
                      ["tokenizer.subsampling=4:4:4", "train.max_steps=7"])
    assert cfg.tokenizer.subsampling == "4:4:4"  # YAML 1.1 would make this 14640
    assert cfg.train.max_steps == 7
    assert cfg.tokenizer.quality == 25


def test_config_is_read_only_and_hash_is_stable():
    a, b = load_config(None, ["seed=1"]), load_config(None, ["seed=1"])
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(load_config(None, ["seed=2"]))
    with pytest.raises(ReadonlyConfigError):
        a.seed = 3
