"""Typed configuration: a dataclass schema, composed from a base experiment, presets and overrides.

A run's config is composed in layers, later ones winning:

1. the schema's defaults (the dataclasses below; every default lives in one of them);
2. the experiment YAML (``experiments/base.yaml``), holding only deltas;
3. dotlist overrides from the command line or a sweep point, one at a time, in order.

A layer that sets a *preset group* (``tokenizer``, ``data``) to a name instead of a mapping —
``tokenizer=vq_1k`` on the command line, ``tokenizer: vq_1k`` in YAML — takes that whole block
from the preset file ``<experiment's folder>/tokenizers/vq_1k.yaml`` (``PRESET_GROUPS``; the
shipped ``experiments/`` folder when the experiment has none); later ``tokenizer.*`` overrides
apply on top. A layer that changes ``tokenizer.name`` (or ``data.name``) keeps only the fields
set so far that the new tokenizer (dataset) also has. The chosen preset names are recorded in
the ``preset`` section.

The ``tokenizer`` and ``data`` blocks are polymorphic: their schema is the ``Config``
dataclass of the tokenizer (``lmgen.tokenizers.TOKENIZERS``) or dataset
(``lmgen.datasets.DATASETS``) they name. Learned tokenizers take whatever recipe field they
leave unset from the shared ``stage1`` section. The merge is strict, so an unknown key, a
wrong type, a bad choice or a value outside its range fails *before any compute* with a
``ConfigError`` naming the key. ``load_config`` returns the typed tree (``ExperimentConfig``).
"""

from __future__ import annotations

import dataclasses
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
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from lmgen.checks import check_choices, check_interval, choices
from lmgen.paths import printable, safe_component
from lmgen.perf import PRECISIONS
from lmgen.sampling import CFG_SCHEDULES
from lmgen.tokenizers.learned import Stage1Config
from lmgen.yamlfile import YamlFileError, read_mapping

BUDGETS = ("images", "tokens", "flops", "steps")
DEFAULT_TOKENIZER = "pixels"
DEFAULT_DATASET = "shapes"
# Sections a layer may set to a preset's name, and the folder (beside the experiment file)
# that holds one YAML per preset, each a single block of that section.
PRESET_GROUPS = {"tokenizer": "tokenizers", "data": "data"}
SHIPPED_EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"  # a source checkout's presets


class ConfigError(ValueError):
    """A configuration problem, raised before any compute; the message names the key."""


@dataclass(frozen=True)
class LMConfig:
    size: str = "micro"  # a key of lmgen.llama.LLAMA_SIZES
    class_conditional: bool = True  # position 0 holds the class token (else BOS)
    # Sub-code tokenizers (ELM n-c, MAGVIT-v2): one embedding per sub-code, summed or
    # concatenated then projected (ELM); one output head per sub-code either way.
    subcode_embed: str = field(default="sum", metadata=choices("sum", "concat"))
    # How positions attend: causal (every tokenizer), or block_causal (VAR: the tokens of one scale of a
    # tokenizer written in blocks, ``multiscale``, see each other and every earlier scale, and are
    # predicted together from the coarser scale; lmgen.llama's module docstring).
    attention: str = field(default="causal", metadata=choices("causal", "block_causal"))


@dataclass(frozen=True)
class TrainConfig:
    """Stage 2: how the Llama is trained. ``budget`` says what a comparison holds equal across
    its arms — images seen, tokens seen or training FLOPs — and the step count is derived from
    it per arm (``lmgen.budget``); ``budget=steps`` gives ``max_steps`` directly."""

    budget: str = field(default="images", metadata=choices(*BUDGETS))
    images: int = 32000  # budget=images: images seen in training, all devices together
    tokens: float = 0.0  # budget=tokens: training tokens seen (the positions that carry a loss), e.g. 3e6
    flops: float = 0.0  # budget=flops: training FLOPs (Llama.flops_per_token × tokens)
    max_steps: int = 0  # budget=steps: the step count; otherwise derived (0 here)
    batch_size: int = 32  # per device
    lr: float = 3e-4  # JPEG-LM: 3e-4
    weight_decay: float = 0.05  # ELM/LlamaGen: 0.05, off norms and embeddings
    beta1: float = 0.9
    beta2: float = 0.95  # ELM: (0.9, 0.95)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr·min_lr_ratio
    grad_clip: float = 1.0
    class_dropout: float = 0.1  # ELM/LlamaGen: 10% label dropout for classifier-free guidance
    val_every: int = 0  # steps between validations (and one at the end); 0 = val_points evenly spaced
    val_points: int = 5  # validations per run when val_every = 0 (lmgen plot: loss_curves)
    val_batches: int = 0  # 0 = the whole val split
    log_every: int = 10
    # auto: bf16-mixed on a CUDA GPU, 32-true on a CPU (lmgen.perf.resolve_precision says why)
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


@dataclass(frozen=True)
class SampleConfig:
    """How every arm is sampled (one block for all arms of a comparison)."""

    num_samples: int = 64  # 0 = skip sampling
    batch_size: int = 64
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    cfg_scale: float = 1.0  # 1.0 = no classifier-free guidance
    cfg_schedule: str = field(default="constant", metadata=choices(*CFG_SCHEDULES))


@dataclass(frozen=True)
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
    # Each run's own sampling uncertainty: 95% bootstrap intervals over its samples (and the
    # reference) of probe FD, KID, precision/recall and class accuracy, logged as
    # gen/<metric>_ci_low / _ci_high (lmgen.metrics.bootstrap). 0 = none.
    bootstrap_resamples: int = 200
    # Generation learning curves (lmgen.curves): at every validation, this many class-conditional
    # samples scored by the probe, logged as curve/class_accuracy, curve/fd_probe (with intervals)
    # at that step; sampling uses its own RNG, so training is unchanged. 0 = off.
    curve_samples: int = 0


@dataclass(frozen=True)
class TrackingConfig:
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite under $LMGEN_HOME
    experiment: str | None = None  # None: the experiment's `name`
    run_name: str | None = None  # `lmgen sweep`: the point (run_page.display_name); None: "<preset> · <size> · s<seed>"
    parent_run_id: str | None = None  # set by `lmgen sweep`: the sweep's parent run (mlflow.parentRunId)
    sweep: str | None = None  # set by `lmgen sweep`: tag lmgen.sweep
    # the LM's final weights (model/weights.pt) and a learned tokenizer's state (tokenizer/state.pt)
    # as run artifacts, so `lmgen eval` and `export-hf` work from any machine on the same server
    log_weights: bool = True


@dataclass(frozen=True)
class PresetConfig:
    """The presets a run was composed from (set by ``load_config``; a record, never read for compute)."""

    tokenizer: str | None = None
    data: str | None = None


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "default"
    seed: int = 0  # the LM's seed (initialisation, data order, label dropout, sampling)
    preset: PresetConfig = field(default_factory=PresetConfig)
    data: Any = None  # the dataset's Config (lmgen.datasets.DATASETS[data.name].Config)
    tokenizer: Any = None  # the tokenizer's Config (lmgen.tokenizers.TOKENIZERS[tokenizer.name].Config)
    stage1: Stage1Config = field(default_factory=Stage1Config)  # the learned tokenizers' shared recipe
    lm: LMConfig = field(default_factory=LMConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


_SECTIONS = tuple(f.name for f in fields(ExperimentConfig))
_SECTION_TYPES = {name for name in _SECTIONS if name not in ("name", "seed")}  # blocks of keys, never a value

# The interval (lmgen.checks.check_interval) each numeric field of the fixed sections must lie in:
# "[" and "]" closed ends, "(" and ")" open ones. The data, tokenizer and stage1 blocks check
# themselves (their Config's ``check``; ``DATA_RANGES`` adds the upper bounds the datasets share).
# Every float must also be finite (check_choices).
RANGES: dict[str, str] = {
    "seed": "[0, 4294967295]",  # Lightning's seed_everything raises outside uint32 — after stage 1
    "train.images": "[0, inf)", "train.tokens": "[0, inf)", "train.flops": "[0, inf)", "train.max_steps": "[0, inf)",
    "train.batch_size": "[1, inf)", "train.lr": "(0, inf)",
    "train.weight_decay": "[0, inf)", "train.beta1": "[0, 1)", "train.beta2": "[0, 1)",
    "train.warmup_steps": "[0, inf)", "train.min_lr_ratio": "[0, 1]", "train.grad_clip": "[0, inf)",
    "train.class_dropout": "[0, 1)", "train.val_every": "[0, inf)", "train.val_points": "[1, inf)",
    "train.val_batches": "[0, inf)", "train.log_every": "[1, inf)", "train.num_nodes": "[1, inf)",
    "train.max_bad_steps": "[0, inf)", "train.peak_flops": "[0, inf)",
    "sample.num_samples": "[0, inf)", "sample.batch_size": "[1, inf)", "sample.temperature": "[0, inf)",
    "sample.top_k": "[0, inf)", "sample.top_p": "(0, 1]", "sample.cfg_scale": "[0, inf)",
    "metrics.num_reference": "[0, inf)", "metrics.prefix_samples": "[0, inf)", "metrics.bootstrap_resamples": "[0, inf)",
    "metrics.curve_samples": "[0, inf)",
}
# Bounds every dataset with the field shares (its own check gives the lower ones): past them a
# value is a typo, not an experiment, and would be found only by a MemoryError or an overflow.
DATA_RANGES = {
    # 4096 px: past every AR image model here (LlamaGen, VAR: <= 512); one 4096² RGB image is
    # 48 MiB, and shapes renders float32 planes of it
    "image_size": "[1, 4096]",
    "frames": "[1, 1024]",  # 34 s at 30 fps (AVC-LM: 15 frames); H.264 encodes a probe clip of it when validating
    "fps": "(0, 1000]",  # a high-speed camera's; the codec's time base is its reciprocal
}


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Schema defaults ← the YAML at ``path`` ← each dotlist override in turn, strictly (see the
    module docstring). Returns the typed ``ExperimentConfig``; raises ``ConfigError`` naming the
    offending key (with the valid keys, choices or presets) before anything is computed."""
    from lmgen.datasets import DATASETS
    from lmgen.tokenizers import TOKENIZERS

    layers = _layers(path, overrides)
    loose, presets = _compose(layers, _preset_dirs(path))
    unset = sorted(k for k, v in flatten(OmegaConf.to_container(loose, resolve=False)).items() if v == "???")
    if unset:
        raise ConfigError(f"{unset[0]} is ??? (a required value) and nothing sets it; give it on the command "
                          f"line: {unset[0]}=<value>" + (f" (also unset: {', '.join(unset[1:])})" if unset[1:] else ""))
    name = OmegaConf.select(loose, "tokenizer.name", default=DEFAULT_TOKENIZER)
    if not isinstance(name, str) or name not in TOKENIZERS:  # a list or mapping there is no name either
        raise ConfigError(_choice_message("tokenizer.name", name, TOKENIZERS))
    dataset = OmegaConf.select(loose, "data.name", default=DEFAULT_DATASET)
    if not isinstance(dataset, str) or dataset not in DATASETS:
        raise ConfigError(_choice_message("data.name", dataset, DATASETS))
    schema = OmegaConf.structured(ExperimentConfig(tokenizer=TOKENIZERS[name].Config(),
                                                   data=DATASETS[dataset].Config()))
    try:
        cfg = OmegaConf.merge(schema, loose, {"preset": presets})
    except ConfigKeyError as err:
        raise ConfigError(_unknown_key_message(err)) from None
    except ValidationError as err:
        raise ConfigError(_type_message(err)) from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{err.full_key or '?'}: {err.msg}") from None
    except TypeError:  # OmegaConf cannot merge a mapping into a list (or a list into a mapping)
        raise ConfigError(_shape_message(schema, loose)) from None
    _check_resolves(cfg)
    typed: ExperimentConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    if hasattr(typed.tokenizer, "with_recipe"):  # a learned tokenizer: the shared stage-1 recipe
        typed = dataclasses.replace(typed, tokenizer=typed.tokenizer.with_recipe(typed.stage1))
    validate(typed)
    return typed


def _layers(path: str | Path | None, overrides: Sequence[str]) -> list[tuple[str, DictConfig]]:
    """(where, layer): the experiment file, then each override as its own layer, in order."""
    layers = []
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"config file not found: {path}")
        layers.append((str(path), read_yaml(path, f"a config is a mapping of sections ({', '.join(_SECTIONS)})")))
    for override in overrides:
        try:
            layers.append((override, OmegaConf.from_dotlist([_quote_sexagesimal(override)])))
        except Exception as err:  # OmegaConf's own errors, and YAML's (a NUL or control character in the value)
            raise ConfigError(f"bad override {override!r}: {_first_line(err)}") from None
    for where, layer in layers:
        if not isinstance(layer, DictConfig):
            raise ConfigError(f"{where}: a config is a mapping of sections ({', '.join(_SECTIONS)}), "
                              f"got {type(layer).__name__}")
    return layers


def read_yaml(path: str | Path, what: str) -> DictConfig:
    """``lmgen.yamlfile.read_mapping``, its refusals as ConfigErrors (they name the path)."""
    try:
        return read_mapping(path, what)
    except YamlFileError as err:
        raise ConfigError(str(err)) from None


def _compose(layers: Sequence[tuple[str, DictConfig]], preset_dirs: Sequence[Path]) -> tuple[DictConfig, dict]:
    """Merge the layers loosely (no schema yet), swapping in preset blocks; returns the merged
    tree and the preset names chosen ({group: name or None})."""
    loose: DictConfig = OmegaConf.create()
    presets: dict[str, str | None] = dict.fromkeys(PRESET_GROUPS)
    for where, layer in layers:
        layer = layer.copy()
        raw = OmegaConf.to_container(layer, resolve=False)
        for section, value in raw.items():
            if section in PRESET_GROUPS and isinstance(value, str) and not value.startswith("${"):
                loose[section] = _preset_block(section, value, preset_dirs)
                presets[section] = value
                del layer[section]
            elif section in PRESET_GROUPS and isinstance(value, dict) and "name" in value:
                before = OmegaConf.select(loose, f"{section}.name", default=None)
                if before is not None and value["name"] != before:  # another tokenizer/dataset
                    _keep_shared_fields(loose, section, value["name"])
                    presets[section] = None
            elif section in _SECTION_TYPES and not isinstance(value, dict):
                raise ConfigError(f"{where}: {section} is a section of keys ({section}.<key>=...), not a value: "
                                  f"got {section}={value!r}" + (f"; or name a preset: {section}=<name>"
                                                                if section in PRESET_GROUPS else ""))
        try:
            loose = OmegaConf.merge(loose, layer)
        except TypeError:  # a list where a mapping was set so far, or the reverse
            raise ConfigError(f"{where}: {_shape_message(loose, layer)}") from None
    return loose, presets


def _keep_shared_fields(loose: DictConfig, section: str, name: Any) -> None:
    """A layer switches ``section`` to another tokenizer or dataset ``name``: keep the fields set so
    far that its config also has (``downsample``, ``image_size`` ...), drop the rest."""
    from lmgen.datasets import DATASETS
    from lmgen.tokenizers import TOKENIZERS

    registry = {"tokenizer": TOKENIZERS, "data": DATASETS}[section]
    if not isinstance(name, str) or name not in registry:
        return  # the unknown name fails with its valid choices once the layers are merged
    valid = {f.name for f in fields(registry[name].Config)}
    loose[section] = {k: v for k, v in OmegaConf.to_container(loose[section], resolve=False).items() if k in valid}


def _preset_dirs(path: str | Path | None) -> list[Path]:
    """Where presets are looked up: beside the experiment file, then the shipped experiments/."""
    dirs = [Path(path).resolve().parent] if path is not None else []
    return [*dirs, SHIPPED_EXPERIMENTS] if SHIPPED_EXPERIMENTS not in dirs else dirs


def preset_names(group: str, preset_dirs: Sequence[Path] = (SHIPPED_EXPERIMENTS,)) -> list[str]:
    """The presets of ``group`` (e.g. ``tokenizer``) found in ``preset_dirs``, sorted."""
    return sorted({p.stem for d in preset_dirs for p in (d / PRESET_GROUPS[group]).glob("*.yaml")})


def _preset_block(group: str, name: str, preset_dirs: Sequence[Path]) -> DictConfig:
    """The ``group`` block of preset ``name``; ConfigError listing the valid presets if none."""
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        for directory in preset_dirs:
            candidate = directory / PRESET_GROUPS[group] / f"{name}.yaml"
            if candidate.is_file():
                doc = read_yaml(candidate, f"a preset holds exactly one '{group}:' block")
                if set(doc.keys()) != {group} or not isinstance(doc[group], DictConfig):
                    raise ConfigError(f"preset {candidate} must hold exactly one '{group}:' block")
                return doc[group]
    valid = preset_names(group, preset_dirs)
    hint = difflib.get_close_matches(name, valid, n=1)
    did = f" (did you mean {hint[0]!r}?)" if hint else ""
    where = ", ".join(str(d / PRESET_GROUPS[group]) for d in preset_dirs)
    raise ConfigError(f"{group}={name!r}: no such preset{did}; valid presets: {', '.join(valid) or 'none'} "
                      f"(in {where}); or set the block's keys: {group}.name=...")


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


def validate(cfg: ExperimentConfig) -> None:
    """Check names that become paths, registry names, string choices, finite floats, numeric ``RANGES``, the budget, the
    data block (its dataset's own ``check``), the stage-1 recipe and the tokenizer block (built
    here, cheaply, so its own checks run); raises ``ConfigError`` naming the key."""
    from lmgen.llama import LLAMA_SIZES

    if cfg.lm.size not in LLAMA_SIZES:
        raise ConfigError(_choice_message("lm.size", cfg.lm.size, LLAMA_SIZES))
    try:
        _check_names(cfg)
        check_choices("", cfg)  # every section, the data, tokenizer and stage1 blocks included
        for key, interval in RANGES.items():
            section, _, leaf = key.rpartition(".")
            check_interval(key, getattr(getattr(cfg, section) if section else cfg, leaf), interval)
        for leaf, interval in DATA_RANGES.items():
            if hasattr(cfg.data, leaf):
                check_interval(f"data.{leaf}", getattr(cfg.data, leaf), interval)
        _check_flat_lists("", cfg)
        cfg.stage1.check("stage1")
        cfg.data.check()
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if cfg.train.devices < 1 and cfg.train.devices != -1:
        raise ConfigError(f"train.devices must be >= 1, or -1 for every device, got {cfg.train.devices}")
    _check_budget(cfg.train)
    bad = [r for r in cfg.metrics.prefix_ratios if not isinstance(r, (int, float)) or not 0.0 < r < 1.0]
    if bad:
        raise ConfigError(f"metrics.prefix_ratios must lie in (0, 1), got {bad}")
    if cfg.metrics.curve_samples and not (cfg.metrics.probe and cfg.lm.class_conditional):
        raise ConfigError("metrics.curve_samples needs the probe (metrics.probe=true) and a class-conditional model "
                          "(lm.class_conditional=true): the curve scores class accuracy with the probe")
    _check_tokenizer(cfg)


def _check_flat_lists(prefix: str, node: Any) -> None:
    """ValueError naming the key of a list field (``metrics.prefix_ratios``, ``tokenizer.levels``)
    holding a list or mapping: OmegaConf lets ``[[1]]`` through a ``list[int]``."""
    for f in fields(node):
        value, key = getattr(node, f.name), f"{prefix}{f.name}"
        if isinstance(value, list) and any(isinstance(v, (list, dict)) for v in value):
            raise ValueError(f"{key}: a list of numbers or names, got {value!r}")
        if is_dataclass(value) and not isinstance(value, type):
            _check_flat_lists(f"{key}.", value)


def _check_names(cfg: ExperimentConfig) -> None:
    """Names that become folders under $LMGEN_HOME (the experiment's: its artifacts, its report)
    are one safe path component (``lmgen.paths.safe_component``: no ``/``, ``..`` or control
    characters); names only shown (a run's, which MLflow files by run id) are printable."""
    safe_component("name", cfg.name)
    if cfg.tracking.experiment is not None:
        safe_component("tracking.experiment", cfg.tracking.experiment)
    for key in ("run_name", "sweep", "parent_run_id"):
        if getattr(cfg.tracking, key) is not None:
            printable(f"tracking.{key}", getattr(cfg.tracking, key))


def _check_budget(train: TrainConfig) -> None:
    """The budget's amount is set (and only the step count is given when budget=steps)."""
    if train.budget == "steps":
        if train.max_steps < 1:
            raise ConfigError(f"train.max_steps must be >= 1 with train.budget=steps, got {train.max_steps}")
        return
    if train.max_steps:
        raise ConfigError(f"train.max_steps={train.max_steps} is derived from train.budget={train.budget} "
                          f"(train.{train.budget}); give the steps directly with train.budget=steps")
    if not getattr(train, train.budget) > 0:
        raise ConfigError(f"train.{train.budget} must be > 0 with train.budget={train.budget}, "
                          f"got {getattr(train, train.budget)}")


def _check_tokenizer(cfg: ExperimentConfig) -> None:
    """Construct the tokenizer so its own checks fail now, keyed ``tokenizer.<field>`` — on the
    ``meta`` device, so no weight is allocated (validation never builds the model)."""
    from lmgen.tokenizers import tokenizer_for
    from lmgen.tokenizers.base import MAX_VOCAB_SIZE

    try:
        with torch.device("meta"):  # weights without memory: a 2^31-code codebook is 137 GB, a check is not
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
    if cfg.lm.attention == "block_causal":
        plan = getattr(tokenizer, "attention_blocks", None)
        if plan is None:
            raise ConfigError(f"lm.attention=block_causal needs a tokenizer written in blocks (multiscale); "
                              f"{cfg.tokenizer.name} is read token by token: use lm.attention=causal")
        try:
            plan()
        except ValueError as err:
            raise ConfigError(f"lm.attention=block_causal: {err}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config (the typed tree, any section of it, or a DictConfig) as plain containers."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]
    return dataclasses.asdict(cfg)


def config_hash(*parts: Any) -> str:
    """Short stable hash of configs/fingerprints (config dataclasses, dicts or strings)."""
    norm = [to_dict(p) if is_dataclass(p) and not isinstance(p, type) else p for p in parts]
    blob = json.dumps(norm, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


# Keys that change how fast a run computes, or when it gives up, never what a finished run
# computed: left out of the run's config hash, so a point trained without torch.compile is the
# same point with it (and adding such a key does not orphan the runs logged before it existed).
# A run that FINISHED under max_bad_steps=0 met no bad step, so any limit would give it again.
SPEED_KEYS = ("train.compile", "train.fused_adamw", "train.peak_flops", "train.max_bad_steps")
# Sections that say where a run is logged and what it was composed from, never what it computes.
UNHASHED_SECTIONS = ("tracking", "preset")
# Keys added after runs were logged, left out of the hash at their default (what every earlier run
# did), so the runs logged before a key existed keep their hash and a sweep rerun still finds them.
ADDED_DEFAULTS = {"lm.attention": "causal", "tokenizer.restart_pool": 0, "data.max_rotation": 360.0}


def without_added_defaults(section: str, values: Any) -> Any:
    """One config section's values (a dict) less its ``ADDED_DEFAULTS`` keys at their default; a
    top-level value that is not a section (``seed``) as it is."""
    if not isinstance(values, dict):
        return values
    at_default = {leaf for key, default in ADDED_DEFAULTS.items()
                  for owner, _, leaf in [key.partition(".")]
                  if owner == section and leaf in values and values[leaf] == default}
    return {k: v for k, v in values.items() if k not in at_default}


def run_config_hash(cfg: ExperimentConfig) -> str:
    """``lmgen.config_hash`` of a run: everything but ``UNHASHED_SECTIONS`` and ``SPEED_KEYS``,
    so a sweep rerun finds the run of the same point."""
    tree = {k: v for k, v in to_dict(cfg).items() if k not in UNHASHED_SECTIONS}
    for key in SPEED_KEYS:
        section, _, leaf = key.partition(".")
        tree[section] = {k: v for k, v in tree[section].items() if k != leaf}
    tree = {section: without_added_defaults(section, values) for section, values in tree.items()}
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


def _first_line(err: BaseException) -> str:
    """An error's first line, or its class where it has no message."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


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


def _shape_message(base: DictConfig, layer: DictConfig, prefix: str = "") -> str:
    """Where merging ``layer`` into ``base`` (the schema, or the layers so far) meets a mapping
    where ``base`` has a list, or the reverse: the first such key, what it is and what it got."""
    for key in layer:
        mine, theirs = layer._get_node(key), base._get_node(key) if key in base else None
        full = f"{prefix}{key}"
        if isinstance(mine, DictConfig) and isinstance(theirs, ListConfig):
            return f"{full}: a list, got a mapping {OmegaConf.to_container(mine, resolve=False)!r}"
        if isinstance(mine, ListConfig) and isinstance(theirs, DictConfig):
            return f"{full}: a section of keys, got a list {OmegaConf.to_container(mine, resolve=False)!r}"
        if isinstance(mine, DictConfig) and isinstance(theirs, DictConfig):
            found = _shape_message(theirs, mine, f"{full}.")
            if found:
                return found
    return "" if prefix else "a list and a mapping do not merge (a key set to the wrong kind of value)"


def _type_message(err: ValidationError) -> str:
    first_line = str(err.msg).splitlines()[0]
    return f"{err.full_key}: {first_line}"
