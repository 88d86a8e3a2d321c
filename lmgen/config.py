"""Typed configuration: dataclass schema + OmegaConf strict merge.

Every default lives here. An experiment YAML holds only the deltas; the CLI adds dotlist
overrides (``lmgen run experiments/x.yaml lm.size=mini``). The merge runs in struct mode, so
an unknown key or a wrong type fails *before any compute* with a ``ConfigError`` that names
the key and the valid choices.

The ``tokenizer`` block is polymorphic: its schema is the ``Config`` dataclass of the
tokenizer named by ``tokenizer.name`` in ``lmgen.tokenizers.TOKENIZERS``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

PRECISIONS = ("auto", "32", "32-true", "bf16-mixed", "16-mixed", "bf16-true")
CFG_SCHEDULES = ("constant", "linear")


class ConfigError(ValueError):
    """A configuration problem, raised before any compute; the message names the key."""


def choices(*values: str) -> dict[str, Any]:
    """Field metadata listing the valid values of a string option (checked by ``validate``)."""
    return {"choices": tuple(values)}


@dataclass
class ShapesConfig:
    """Knobs of the procedural ``shapes`` dataset (lmgen.datasets.shapes)."""

    num_classes: int = 10
    tail_alpha: float = 1.5  # Zipf exponent of class frequencies: rarest of 10 classes ≈ 1.6%
    min_objects: int = 2
    max_objects: int = 5


@dataclass
class MotionConfig:
    """Motion of the ``moving_shapes`` main object (lmgen.datasets.moving_shapes)."""

    # outline speed, fraction of the image side per second, uniform per clip:
    # ~1 px per frame at 32 px and 3 fps; the same clip at any image_size
    min_speed: float = 0.04
    max_speed: float = 0.12


@dataclass
class DataConfig:
    name: str = "shapes"  # a key of lmgen.datasets.DATASETS
    image_size: int = 32
    train_size: int = 4000  # folders: 0 = every file
    val_size: int = 500
    seed: int = 0  # the dataset's own seed (content), separate from the run seed
    root: str | None = None  # folder datasets; use ${oc.env:VAR} rather than relative hops
    val_fraction: float = 0.05  # folders without train/ and val/ subfolders
    shapes: ShapesConfig = field(default_factory=ShapesConfig)
    frames: int = 0  # frames per clip; 0 = still images. Video datasets need > 0; AVC-LM: 15
    fps: float = 3.0  # clip frame rate; AVC-LM: 3
    motion: MotionConfig = field(default_factory=MotionConfig)  # moving_shapes
    encode_batch_size: int = 256  # images per tokenizer.encode call when filling the cache
    num_workers: int = 0  # DataLoader workers for reading images and token batches
    fit_images: int = 2000  # train images a non-learned tokenizer fits on (palette, BPE)


@dataclass
class LMConfig:
    size: str = "micro"  # a key of lmgen.llama.LLAMA_SIZES
    class_conditional: bool = True  # position 0 holds the class token (else BOS)
    # Sub-code tokenizers (ELM n-c, MAGVIT-v2): one embedding per sub-code, summed or
    # concatenated then projected (ELM); one output head per sub-code either way.
    subcode_embed: str = field(default="sum", metadata=choices("sum", "concat"))


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-4  # JPEG-LM: 3e-4
    weight_decay: float = 0.05  # ELM/LlamaGen: 0.05, off norms and embeddings
    beta1: float = 0.9
    beta2: float = 0.95  # ELM: (0.9, 0.95)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr·min_lr_ratio
    grad_clip: float = 1.0
    class_dropout: float = 0.1  # ELM/LlamaGen: 10% label dropout for classifier-free guidance
    val_every: int = 250  # steps between validations (and one at the end)
    val_batches: int = 0  # 0 = the whole val split
    log_every: int = 10
    # auto: bf16-mixed where bf16 matmuls are fast (CUDA, or a CPU with AMX/AVX512-BF16),
    # else 32-true — on an AVX2-only CPU bf16 matmuls are ~40x slower than fp32.
    precision: str = field(default="auto", metadata=choices(*PRECISIONS))
    accelerator: str = field(default="auto", metadata=choices("auto", "cpu", "gpu", "cuda", "mps"))
    devices: int = 1
    num_nodes: int = 1
    strategy: str = field(default="auto", metadata=choices("auto", "ddp", "fsdp", "ddp_spawn"))
    checkpoint: bool = True  # write last.ckpt under $LMGEN_HOME/checkpoints/<run_id>
    # Speed switches (never change results beyond float noise; benchmarks/lm_train.py measures them):
    compile: bool = False  # torch.compile forward + loss; needs a C++ compiler on CPU, ~10-60 s to compile
    fused_adamw: bool = True  # torch's fused AdamW kernel (CPU and CUDA)
    peak_flops: float = 0.0  # per-device FLOP/s for lm/mfu; 0 = lmgen.perf.PEAK_FLOPS (GPU) or measured (CPU)
    max_bad_steps: int = 0  # steps with a non-finite loss/gradient skipped (weights untouched) before the run fails


@dataclass
class SampleConfig:
    num_samples: int = 64  # 0 = skip sampling
    batch_size: int = 64
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    cfg_scale: float = 1.0  # 1.0 = no classifier-free guidance
    cfg_schedule: str = field(default="constant", metadata=choices(*CFG_SCHEDULES))


@dataclass
class MetricsConfig:
    """Evaluation (DESIGN §7): offline probe metrics always; Inception where weights exist."""

    probe: bool = True  # train/load the dataset's probe classifier: gen/fd_probe, tok/rfid_probe, ...
    inception_weights: str = "auto"  # auto: torch-fidelity's cache/download; none: skip; or a file path
    num_reference: int = 0  # val images used as the reference set (0 = the whole val split)
    # Prefix completion (JPEG-LM): the first prefix_samples val images are cut at the top r of
    # their tokens (a grid row / JPEG restart marker), completed by the LM, scored against the
    # originals: gen/prefix_r{100r}/fd_probe. 0 samples or no ratios = off.
    prefix_samples: int = 64
    prefix_ratios: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])


@dataclass
class TrackingConfig:
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite under $LMGEN_HOME
    experiment: str | None = None  # None: the experiment's `name`
    run_name: str | None = None  # None: "<tokenizer>-<lm.size>-s<seed>"
    parent_run_id: str | None = None  # set by `lmgen sweep`: the sweep's parent run (mlflow.parentRunId)
    sweep: str | None = None  # set by `lmgen sweep`: tag lmgen.sweep


@dataclass
class ExperimentConfig:
    name: str = "default"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: Any = None  # filled with TOKENIZERS[name].Config by load_config
    lm: LMConfig = field(default_factory=LMConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


DEFAULT_TOKENIZER = "pixels"

# The interval (lmgen.tokenizers.base.check_interval) each numeric field must lie in: "[" and "]"
# closed ends, "(" and ")" open ones. Checked by ``validate``, so a bad value fails before compute.
RANGES: dict[str, str] = {
    "seed": "[0, 4294967295]",  # Lightning's seed_everything raises outside uint32 — after stage 1
    "data.image_size": "[1, inf)", "data.seed": "[0, inf)", "data.val_fraction": "[0, 1)",
    "data.encode_batch_size": "[1, inf)", "data.num_workers": "[0, inf)", "data.fit_images": "[0, inf)",
    "train.max_steps": "[1, inf)", "train.batch_size": "[1, inf)", "train.lr": "(0, inf)",
    "train.weight_decay": "[0, inf)", "train.beta1": "[0, 1)", "train.beta2": "[0, 1)",
    "train.warmup_steps": "[0, inf)", "train.min_lr_ratio": "[0, 1]", "train.grad_clip": "[0, inf)",
    "train.class_dropout": "[0, 1)", "train.val_every": "[1, inf)", "train.val_batches": "[0, inf)",
    "train.log_every": "[1, inf)", "train.num_nodes": "[1, inf)", "train.max_bad_steps": "[0, inf)",
    "sample.num_samples": "[0, inf)", "sample.batch_size": "[1, inf)", "sample.temperature": "[0, inf)",
    "sample.top_k": "[0, inf)", "sample.top_p": "(0, 1]",
    "metrics.num_reference": "[0, inf)", "metrics.prefix_samples": "[0, inf)",
}


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Schema defaults ← YAML deltas at ``path`` ← dotlist ``overrides``, strictly.

    Returns a read-only struct ``DictConfig``. Raises ``ConfigError`` naming the offending
    key (with valid keys or choices) for unknown keys, wrong types and invalid choices.
    """
    from lmgen.tokenizers import TOKENIZERS

    layers = []
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"config file not found: {path}")
        layers.append(OmegaConf.load(path))
    try:
        layers.append(OmegaConf.from_dotlist([_quote_sexagesimal(o) for o in overrides]))
    except OmegaConfBaseException as err:
        raise ConfigError(f"bad override in {list(overrides)}: {err}") from None
    unset = _unset_required(layers)
    if unset:
        raise ConfigError(f"{unset[0]} is ??? (a required value) and nothing sets it; give it on the command "
                          f"line: {unset[0]}=<value>" + (f" (also unset: {', '.join(unset[1:])})" if unset[1:] else ""))
    loose = OmegaConf.merge(*layers) if layers else OmegaConf.create()
    name = OmegaConf.select(loose, "tokenizer.name", default=DEFAULT_TOKENIZER)
    if name not in TOKENIZERS:
        raise ConfigError(_choice_message("tokenizer.name", name, TOKENIZERS))
    schema = OmegaConf.structured(ExperimentConfig(tokenizer=TOKENIZERS[name].Config()))
    try:
        cfg = OmegaConf.merge(schema, *layers)
    except ConfigKeyError as err:
        raise ConfigError(_unknown_key_message(err)) from None
    except ValidationError as err:
        raise ConfigError(_type_message(err)) from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{err.full_key or '?'}: {err.msg}") from None
    _check_resolves(cfg)
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _unset_required(layers: Sequence[DictConfig]) -> list[str]:
    """Dotted keys some layer sets to ``???`` (OmegaConf's "required") that no later layer sets.

    A plain merge would keep the schema default under a ``???`` and run with it silently.
    """
    unset: set[str] = set()
    for layer in layers:
        tree = flatten(OmegaConf.to_container(layer, resolve=False))  # type: ignore[arg-type]
        unset = (unset - tree.keys()) | {k for k, v in tree.items() if v == "???"}
    return sorted(unset)


def _check_resolves(cfg: DictConfig) -> None:
    """ConfigError naming the key of the first interpolation that does not resolve (an unset
    ``${oc.env:VAR}``, a reference to no key) — now, rather than when a run first reads it."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        first_line = str(err.msg).splitlines()[0] if err.msg else type(err).__name__
        raise ConfigError(f"{err.full_key or '?'}: cannot resolve its value: {first_line}") from None


def _quote_sexagesimal(override: str) -> str:
    """``k=4:2:0`` → ``k="4:2:0"``: YAML 1.1 would read 4:2:0 as the base-60 integer 15120."""
    key, sep, value = override.partition("=")
    if sep and re.fullmatch(r"\d+(:\d+)+", value.strip()):
        return f'{key}="{value.strip()}"'
    return override


def validate(cfg: DictConfig) -> None:
    """Check registry names, string choices, numeric ``RANGES``, the data block against its
    dataset and the tokenizer block against the tokenizer (built here, cheaply, so its own
    checks run); raises ``ConfigError`` naming the key."""
    from lmgen.datasets import DATASETS
    from lmgen.llama import LLAMA_SIZES
    from lmgen.tokenizers.base import check_interval

    if cfg.data.name not in DATASETS:
        raise ConfigError(_choice_message("data.name", cfg.data.name, DATASETS))
    if cfg.lm.size not in LLAMA_SIZES:
        raise ConfigError(_choice_message("lm.size", cfg.lm.size, LLAMA_SIZES))
    for key, value, valid in _choice_fields(cfg):
        if value not in valid:
            raise ConfigError(_choice_message(key, value, valid))
    for key, interval in RANGES.items():
        try:
            check_interval(key, OmegaConf.select(cfg, key), interval)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if cfg.train.devices < 1 and cfg.train.devices != -1:
        raise ConfigError(f"train.devices must be >= 1, or -1 for every device, got {cfg.train.devices}")
    _check_data(cfg.data, DATASETS[cfg.data.name])
    bad = [r for r in cfg.metrics.prefix_ratios if not 0.0 < r < 1.0]
    if bad:
        raise ConfigError(f"metrics.prefix_ratios must lie in (0, 1), got {bad}")
    _check_tokenizer(cfg)


def _check_data(data: DictConfig, dataset_cls: type) -> None:
    """The data block against its dataset class's plain attributes ``procedural`` (generated,
    no root) and ``video`` (clips: needs ``frames > 0``)."""
    procedural, video = getattr(dataset_cls, "procedural", False), getattr(dataset_cls, "video", False)
    if not procedural and not data.root:
        raise ConfigError(f"data.root is required for data.name={data.name!r}")
    for key in ("train_size", "val_size"):  # folders: 0 = every file
        if data[key] < 0:
            raise ConfigError(f"data.{key} must be >= 0, got {data[key]}")
        if procedural and data[key] == 0:  # generated data has no "all"
            raise ConfigError(f"data.{key} must be positive for data.name={data.name!r}")
    if video and data.frames <= 0:
        raise ConfigError(f"data.frames must be > 0 for the video dataset data.name={data.name!r}, got {data.frames}")
    if not video and data.frames != 0:
        raise ConfigError(f"data.frames must be 0 for the image dataset data.name={data.name!r}, got {data.frames}")
    if not data.fps > 0:
        raise ConfigError(f"data.fps must be > 0, got {data.fps}")
    if procedural:
        _check_scene(data)
    if not 0 <= data.motion.min_speed <= data.motion.max_speed or data.motion.max_speed <= 0:
        raise ConfigError(f"data.motion: need 0 <= min_speed <= max_speed and max_speed > 0, "
                          f"got {data.motion.min_speed}, {data.motion.max_speed}")


def _check_scene(data: DictConfig) -> None:
    """The ``data.shapes`` scene knobs the procedural datasets (shapes, moving_shapes) render with."""
    from lmgen.datasets.shapes import CLASS_NAMES

    if data.image_size < 4:  # the renderer's smallest canvas
        raise ConfigError(f"data.image_size must be >= 4 for data.name={data.name!r}, got {data.image_size}")
    if not 2 <= data.shapes.num_classes <= len(CLASS_NAMES):
        raise ConfigError(f"data.shapes.num_classes must be in [2, {len(CLASS_NAMES)}] (the shapes drawn), "
                          f"got {data.shapes.num_classes}")
    if not 1 <= data.shapes.min_objects <= data.shapes.max_objects:
        raise ConfigError(f"data.shapes: need 1 <= min_objects <= max_objects, got {data.shapes.min_objects}, "
                          f"{data.shapes.max_objects}")


def _check_tokenizer(cfg: DictConfig) -> None:
    """Construct the tokenizer (cheap) so its own checks fail now, keyed ``tokenizer.<field>``."""
    from lmgen.tokenizers import tokenizer_for
    from lmgen.tokenizers.base import MAX_VOCAB_SIZE

    try:
        tokenizer = tokenizer_for(cfg)
    except (ValueError, RuntimeError) as err:
        message = re.sub(rf"\b{re.escape(cfg.tokenizer.name)}\.", "tokenizer.", str(err))
        named = message.startswith(("tokenizer.", "data."))
        raise ConfigError(message if named else f"tokenizer: {message}") from None
    # The protocol's promises every tokenizer's own checks should already keep (a backstop):
    vocab, subcodes = int(tokenizer.vocab_size), tuple(tokenizer.subcodes)
    if not 1 <= vocab <= MAX_VOCAB_SIZE:
        raise ConfigError(f"tokenizer: vocab_size={vocab} must be in [1, 2^31]: the token cache stores ids as int32")
    if subcodes and math.prod(subcodes) != vocab:
        raise ConfigError(f"tokenizer: subcodes {subcodes} multiply to {math.prod(subcodes)}, not vocab_size={vocab}")


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain containers."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]


def config_hash(*parts: Any) -> str:
    """Short stable hash of configs/fingerprints (DictConfig, dataclass, dict or str)."""
    norm = [to_dict(p) if isinstance(p, DictConfig) else p for p in parts]
    blob = json.dumps(norm, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


# Keys that change how fast a run computes, or when it gives up, never what a finished run
# computed: left out of the run's config hash, so a point trained without torch.compile is the
# same point with it (and adding such a key does not orphan the runs logged before it existed).
# A run that FINISHED under max_bad_steps=0 met no bad step, so any limit would give it again.
SPEED_KEYS = ("train.compile", "train.fused_adamw", "train.peak_flops", "train.max_bad_steps")


def run_config_hash(cfg: DictConfig) -> str:
    """``lmgen.config_hash`` of a run: everything but ``tracking`` (where a run is logged does not
    change what it computes) and ``SPEED_KEYS``, so a sweep rerun finds the run of the same point."""
    tree = {k: v for k, v in to_dict(cfg).items() if k != "tracking"}
    for key in SPEED_KEYS:
        section, _, leaf = key.partition(".")
        tree[section] = {k: v for k, v in tree[section].items() if k != leaf}
    return config_hash(tree)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} → {"a.b": 1} (lists stay values)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{full}."))
        else:
            out[full] = value
    return out


def _choice_fields(cfg: DictConfig) -> list[tuple[str, Any, tuple[str, ...]]]:
    """(key, value, valid) for every dataclass field declaring ``choices`` metadata."""
    found = []

    def walk(node: DictConfig, prefix: str) -> None:
        schema = OmegaConf.get_type(node)
        if schema is None or not is_dataclass(schema):
            return
        for f in fields(schema):
            value = node[f.name]
            if "choices" in f.metadata:
                found.append((f"{prefix}{f.name}", value, f.metadata["choices"]))
            if isinstance(value, DictConfig):
                walk(value, f"{prefix}{f.name}.")

    walk(cfg, "")
    return found


def _choice_message(key: str, value: Any, valid: Any) -> str:
    names = sorted(map(str, valid))
    hint = difflib.get_close_matches(str(value), names, n=1)
    did = f" (did you mean {hint[0]!r}?)" if hint else ""
    return f"{key}: {value!r} is not a valid choice{did}; valid choices: {', '.join(names)}"


def _unknown_key_message(err: ConfigKeyError) -> str:
    full_key = err.full_key or str(err.key)
    parent, _, leaf = full_key.rpartition(".")
    valid: list[str] = []
    schema = getattr(err, "object_type", None)
    if schema is not None and is_dataclass(schema):
        valid = [f.name for f in fields(schema)]
    hint = difflib.get_close_matches(leaf, valid, n=1)
    did = f" (did you mean {(parent + '.' if parent else '') + hint[0]!r}?)" if hint else ""
    where = f"under {parent!r}" if parent else "at the top level"
    return f"unknown config key {full_key!r}{did}; valid keys {where}: {', '.join(valid)}"


def _type_message(err: ValidationError) -> str:
    first_line = str(err.msg).splitlines()[0]
    return f"{err.full_key}: {first_line}"


def resolve_precision(precision: str, accelerator: str) -> str:
    """Lightning precision for ``train.precision``; ``auto`` picks bf16 only where it is fast."""
    if precision != "auto":
        return precision
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if _cpu_has_fast_bf16() else "32-true"


def _cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return torch.backends.cpu.get_cpu_capability().upper().startswith("AMX")
    return "amx_bf16" in flags or "avx512_bf16" in flags
