"""Bad configs fail before compute, naming the key (issue 10, "Nothing lost", item 4).

One table: overrides → the full dotted key the ``ConfigError`` must name. Unknown keys, wrong
types, missing required values and impossible combinations all fail inside ``load_config``,
before a dataset is read or a tokenizer trained. tests/test_config.py holds the older cases
(typos with suggestions, choices, data-block checks); tests/test_sweep.py shows a sweep
validating every point before it launches any.
"""

from __future__ import annotations

import os
import resource
import traceback
from pathlib import Path

import numpy as np
import pytest

from lmgen.cli import main
from lmgen.config import ConfigError, load_config
from lmgen.tokenizers.base import MAX_VOCAB_SIZE

BASE = str(Path(__file__).resolve().parents[1] / "experiments/base.yaml")

VIDEO = ["data.name=moving_shapes", "data.frames=4"]
BAD = [
    # unknown keys, at every depth
    (["trainn.lr=0.1"], "trainn"),
    (["data.num_clases=3"], "data.num_clases"),
    (["stage1.stepz=3"], "stage1.stepz"),
    (["tokenizer.name=vq", "tokenizer.codebook=64"], "tokenizer.codebook"),
    # wrong types
    (["train.batch_size=3.5"], "train.batch_size"),
    (["train.lr=fast"], "train.lr"),
    (["lm.class_conditional=maybe"], "lm.class_conditional"),
    (["metrics.prefix_ratios=0.5"], "metrics.prefix_ratios"),
    # missing required values: a dataset root, an OmegaConf ??? nobody set, an unset env variable
    (["data.name=imagefolder"], "data.root"),
    (["data.name=imagefolder", "data.root=???"], "data.root"),
    (["train.lr=???"], "train.lr"),
    (["tokenizer.name=jpeg", "tokenizer.quality=???"], "tokenizer.quality"),
    (["data.name=imagefolder", "data.root=${oc.env:LMGEN_TEST_SURELY_UNSET}"], "data.root"),
    (["tracking.uri=${oc.env:LMGEN_TEST_SURELY_UNSET}"], "tracking.uri"),
    (["train.lr=${train.no_such_key}"], "train.lr"),
    # impossible combinations: a token grid the image size and downsampling cannot produce
    (["tokenizer.name=vq", "data.image_size=30"], "tokenizer.downsample"),
    (["tokenizer.name=lfq", "data.image_size=32", "tokenizer.downsample=64"], "tokenizer.downsample"),  # < 1×1
    (["tokenizer.name=bae", "tokenizer.downsample=3"], "tokenizer.downsample"),
    (["tokenizer.name=causal1d", "tokenizer.num_tokens=0"], "tokenizer.num_tokens"),
    (["tokenizer.name=causal1d", "tokenizer.num_tokens=65"], "tokenizer.num_tokens"),  # 8×8 map, pooled queries
    # ... a vocabulary the quantizer cannot index or the int32 token cache cannot store
    (["tokenizer.name=vq", "tokenizer.codebook_size=1"], "tokenizer.codebook_size"),
    (["tokenizer.name=vq", f"tokenizer.codebook_size={MAX_VOCAB_SIZE + 1}"], "tokenizer.codebook_size"),
    (["tokenizer.name=lfq", "tokenizer.bits=32"], "tokenizer.bits"),
    (["tokenizer.name=lfq", "tokenizer.bits=63"], "tokenizer.bits"),
    (["tokenizer.name=bae", "tokenizer.bits=40", "tokenizer.num_subcodes=2"], "tokenizer.bits"),
    (["tokenizer.name=crt", "tokenizer.quantizer=lfq", "tokenizer.bits=36"], "tokenizer.bits"),
    (["tokenizer.name=lfq", "tokenizer.bits=10", "tokenizer.num_subcodes=3"], "tokenizer.num_subcodes"),
    (["tokenizer.name=bae", "tokenizer.num_subcodes=0"], "tokenizer.num_subcodes"),
    # ... codec settings the codec cannot honour
    (["tokenizer.name=jpeg", "tokenizer.bpe_vocab=256"], "tokenizer.bpe_vocab"),
    (["tokenizer.name=h264", *VIDEO, "data.image_size=33"], "data.image_size"),
    (["tokenizer.name=h264", *VIDEO, "tokenizer.qp=52"], "tokenizer.qp"),
    (["tokenizer.name=h264", "data.frames=0"], "data.frames"),
    (["tokenizer.name=jpeg", *VIDEO], "data.frames"),  # still-image tokenizer on clips
    # ... scene knobs the procedural datasets cannot draw
    (["data.num_classes=1"], "data.num_classes"),
    (["data.min_objects=4", "data.max_objects=2"], "min_objects"),
    (["data.image_size=2"], "data.image_size"),
    # batch sizes of 0, negative steps and other numbers outside their range
    (["train.batch_size=0"], "train.batch_size"),
    (["sample.batch_size=0"], "sample.batch_size"),
    (["data.encode_batch_size=0"], "data.encode_batch_size"),
    (["tokenizer.name=vq", "tokenizer.batch_size=0"], "tokenizer.batch_size"),
    (["train.budget=steps", "train.max_steps=-5"], "train.max_steps"),
    (["train.images=0"], "train.images"),
    (["train.budget=tokens", "train.tokens=-1"], "train.tokens"),
    (["train.budget=flops", "train.flops=inf"], "train.flops"),
    (["train.warmup_steps=-1"], "train.warmup_steps"),
    (["tokenizer.name=lfq", "tokenizer.steps=-1"], "tokenizer.steps"),
    (["stage1.steps=-1"], "stage1.steps"),
    (["stage1.batch_size=0"], "stage1.batch_size"),
    (["tokenizer.name=vq", "tokenizer.val_every=0"], "tokenizer.val_every"),
    (["tokenizer.name=bae", "tokenizer.lr=0"], "tokenizer.lr"),
    (["train.lr=0"], "train.lr"),
    (["train.lr=nan"], "train.lr"),
    (["train.beta2=1.0"], "train.beta2"),
    (["train.min_lr_ratio=1.5"], "train.min_lr_ratio"),
    (["train.val_batches=-1"], "train.val_batches"),
    (["train.devices=0"], "train.devices"),
    (["seed=-1"], "seed"),  # Lightning would raise on it only after stage 1
    (["sample.temperature=-0.5"], "sample.temperature"),
    (["sample.top_k=-1"], "sample.top_k"),
    (["sample.cfg_scale=nan"], "sample.cfg_scale"),  # found before training, not after it
    (["sample.cfg_scale=-1"], "sample.cfg_scale"),
    (["train.peak_flops=nan"], "train.peak_flops"),
    (["tokenizer.name=crt", "tokenizer.crt_weight=nan"], "tokenizer.crt_weight"),
    (["data.num_workers=-2"], "data.num_workers"),
    (["data.val_fraction=1.0"], "data.val_fraction"),
    # names that become folders under $LMGEN_HOME are one path component (issue 24, item 9) ...
    (["name=../../x"], "name"),
    (["name=.."], "name"),
    (["name=" + "x" * 256], "name"),  # past a file name's 255 bytes
    (["tracking.experiment=a/b"], "tracking.experiment"),
    (["tracking.experiment=a\\b"], "tracking.experiment"),
    # ... and every name is printable: no NUL or control character
    (["name=a\tb"], "name"),
    (["tracking.run_name=a\tb"], "tracking.run_name"),
    (["name=a\x00b"], "name=a"),  # YAML refuses it in the override itself
    # values of the wrong shape: a section set to a value, a name that is a list, a list that is a mapping ...
    (["train=5"], "train"),
    (["train=null"], "train"),
    (["tokenizer=null"], "tokenizer"),
    (["data=null"], "data"),
    (["tokenizer.name=[vq]"], "tokenizer.name"),
    (["data.name={a: 1}"], "data.name"),
    (["tokenizer=bae_16bit", "tokenizer.name=[vq]"], "tokenizer.name"),  # switching from a preset's tokenizer
    (["metrics.prefix_ratios={a: 1}"], "metrics.prefix_ratios"),
    (["metrics.prefix_ratios=[[0.5]]"], "metrics.prefix_ratios"),
    (["tokenizer=fsq_16k", "tokenizer.levels={a: 1}"], "tokenizer.levels"),
    (["tokenizer=fsq_16k", "tokenizer.levels=[[8]]"], "tokenizer.levels"),
    # ... and sizes past any use, which were found only by a MemoryError or an overflow
    (["data.image_size=100000"], "data.image_size"),
    (["data.image_size=4097"], "data.image_size"),
    (["tokenizer.name=h264", *VIDEO, "data.fps=1e300"], "data.fps"),
    (["tokenizer.name=h264", "data.name=moving_shapes", "data.frames=100000"], "data.frames"),
]


@pytest.mark.parametrize(("overrides", "key"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_config_fails_in_load_config_naming_the_key(overrides: list[str], key: str, lmgen_home: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert key in str(err.value), str(err.value)
    assert not lmgen_home.exists()  # nothing was written: no store, no cache, no checkpoint


@pytest.mark.parametrize("overrides", [
    ["train.devices=-1"],  # Lightning: every device
    ["seed=4294967295", "train.warmup_steps=0", "train.grad_clip=0", "train.min_lr_ratio=1", "sample.temperature=0"],
    ["tokenizer.name=causal1d", "tokenizer.num_tokens=64"],  # one token per position of the 8×8 map
    ["tokenizer.name=causal1d", "tokenizer.num_tokens=65", "tokenizer.query_init=learned"],
    ["tokenizer.name=lfq", "tokenizer.bits=31"],
    ["tokenizer.name=vq", "data.image_size=32", "tokenizer.downsample=32"],  # a 1×1 grid
    ["data.name=imagefolder", "data.root=/data", "data.val_fraction=0"],  # a root need not exist to validate
    ["data.image_size=4096"],
    ["tokenizer.name=h264", *VIDEO, "data.fps=1000"],
    ["tokenizer=vq_1k", f"tokenizer.codebook_size={MAX_VOCAB_SIZE}"],  # validated without allocating 137 GB
], ids=lambda o: " ".join(o))
def test_the_edges_of_each_range_still_load(overrides: list[str]) -> None:
    """The checks are not tighter than the code needs: each boundary value loads."""
    load_config(None, overrides)


def test_a_required_value_in_yaml_is_satisfied_by_an_override(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text("data:\n  name: imagefolder\n  root: ???\ntrain:\n  lr: ???\n")
    with pytest.raises(ConfigError, match=r"data\.root is \?\?\?.*also unset: train\.lr"):
        load_config(path)
    cfg = load_config(path, ["data.root=/data", "train.lr=0.01"])
    assert cfg.data.root == "/data" and cfg.train.lr == 0.01


def test_the_token_cache_stores_every_id_of_the_largest_vocabulary() -> None:
    """MAX_VOCAB_SIZE is what lmgen.data's cache can hold: its dtype for that vocabulary reaches the
    last id (and the cast the cache does is exact for it)."""
    from lmgen.data import RowEncoder

    class Widest:
        vocab_size, max_tokens = MAX_VOCAB_SIZE, 1

    dtype = RowEncoder(Widest()).dtype
    assert np.iinfo(dtype).max >= MAX_VOCAB_SIZE - 1
    assert int(np.array([MAX_VOCAB_SIZE - 1]).astype(dtype)[0]) == MAX_VOCAB_SIZE - 1


def _validate_within(headroom: int, argvs: list[list[str]]) -> int:
    """Exit status of a forked child that runs ``lmgen`` on each of ``argvs`` with its address
    space capped at what it maps now plus ``headroom`` bytes: 0 when every one exits 0."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            mapped = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            resource.setrlimit(resource.RLIMIT_AS, (mapped + headroom, resource.RLIM_INFINITY))
            code = max(main(argv) for argv in argvs)
        except BaseException:  # an allocation refused past the cap, reported as a failure
            traceback.print_exc()
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="reads the address space from /proc")
def test_validation_builds_no_weights(lmgen_home: Path) -> None:
    """The tokenizer is built to run its own checks, on the meta device: a codebook of 2^31 codes
    (137 GB) or 2^24 (1 GB, which --print-config used to allocate) validates within 256 MiB."""
    big = [BASE, "tokenizer=vq_1k", f"tokenizer.codebook_size={MAX_VOCAB_SIZE}", "--print-config"]
    assert _validate_within(256 * 2**20, [["run", *big], ["run", *big[:2], "tokenizer.codebook_size=16777216",
                                                          "--print-config"]]) == 0
    assert not lmgen_home.exists()


# Malformed files, each as an experiment (`lmgen run FILE`) and as a sweep file (`lmgen sweep FILE`):
# (case, file bytes, what the one-line error says for run, for sweep).
BOMB = b"a: &a [x, x, x, x, x, x, x, x, x, x]\n" + b"".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n".encode() for p, c in zip("abcdefgh", "bcdefghi"))
BAD_FILES = [
    ("syntax error", b"train:\n  lr: [0.1\n", ":3:1: YAML: expected ',' or ']', but got '<stream end>'", None),
    ("duplicate key", b"train:\n  lr: 0.1\n  lr: 0.2\n", ":3:3: YAML: found duplicate key lr", None),
    ("not UTF-8", b"name: caf\xe9\n", ":1: not UTF-8 text (byte 0xe9)", None),
    ("binary file", bytes(range(256)) * 4, ": a binary or oversized file (1024 bytes)", None),
    ("top-level list", b"- train\n- seed\n", "a mapping", "a mapping"),
    ("top-level value", b"just text\n", "got the value 'just text'", None),
    ("unknown tag", b"train: !!python/object/apply:os.system ['echo pwned']\n",
     ":1:8: YAML: could not determine a constructor for the tag", None),
    ("recursive alias", b"train: &a\n  x: *a\n", ":1:8: YAML recursive aliases are not supported", None),
    ("alias bomb", BOMB, "YAML node expansion exceeds the configured limit", None),
    ("section set to a value", b"train: 5\n", "train is a section of keys", "unknown sweep key(s) ['train']"),
    ("section set to null", b"train:\n", "train is a section of keys", "unknown sweep key(s) ['train']"),
    ("sweep key of the wrong kind", b"name: x\nexperiment: base.yaml\ngrid: [seed]\n", "unknown config key 'experiment'",
     "grid: must be a mapping, got ['seed']"),
]


@pytest.mark.parametrize("command", ["run", "sweep"])
@pytest.mark.parametrize(("case", "body", "run_error", "sweep_error"), BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_a_malformed_file_is_one_line_naming_it(case: str, body: bytes, run_error: str, sweep_error: str | None,
                                                 command: str, tmp_path: Path, lmgen_home: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(body)
    assert main([command, str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"lmgen: config error: {path}") or case == "sweep key of the wrong kind", err
    assert (run_error if command == "run" or sweep_error is None else sweep_error) in err, err
    assert not lmgen_home.exists()


def test_a_malformed_preset_is_one_line_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "tokenizers").mkdir()
    (tmp_path / "tokenizers" / "broken.yaml").write_text("tokenizer:\n  name: vq\n  name: lfq\n")
    (tmp_path / "exp.yaml").write_text("name: x\n")
    assert main(["run", str(tmp_path / "exp.yaml"), "tokenizer=broken", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lmgen: config error: {tmp_path / 'tokenizers' / 'broken.yaml'}:3:3: YAML: found duplicate "
                          "key name") and err.count("\n") == 1
