"""Sweeps: a base experiment plus a grid of overrides, expanded to runs (pure) and run by a launcher.

A sweep file (``sweeps/*.yaml``)::

    name: quickstart                       # MLflow experiment (and parent run) of the sweep
    experiment: ../experiments/base.yaml   # base experiment, relative to this file
    overrides: [lm.size=micro]             # applied to every point
    grid:                                  # cartesian product, in file order
      tokenizer: [jpeg_q25, vq_1k]         # a preset axis: the arms of a comparison
      seed: [0, 1, 2]
    zip:                                   # groups of axes that move together (equal lengths)
      - {tokenizer.downsample: [8, 4, 2], metrics.prefix_samples: [32, 64, 64]}
    max_parallel: 1                        # local launcher: points at once (default 1)
    slurm: {gpus_per_node: 1, nodes: 1, timeout_min: 240, partition: null}

Axes that only exist for some tokenizers (VQ's ``tokenizer.codebook_size``, LFQ's
``tokenizer.bits``) go in ``blocks``: a list of {experiment, overrides, grid, zip} whose points
are concatenated (the top-level ``overrides`` apply to every block; each block names its
preset in its own ``overrides``).

Every key is a dotlist override (a preset group such as ``tokenizer`` takes a preset's name);
an ``experiment`` axis swaps the base file itself. ``expand`` is a pure function of the file:
the same points in the same order with the same readable names every time (axes that vary,
``leaf=value`` joined by ``,``; a preset or experiment axis by its name; a point's log file
is its name made a safe file name, ``lmgen.paths.file_slug``). A key that only
changes speed (``config.SPEED_KEYS``) is refused as an axis. ``recipe_differences`` is the
one-recipe invariant: what differs between points outside the axes the sweep declares.

``run_sweep`` validates every point before launching any, opens (or reopens) the sweep's
parent MLflow run, skips points whose config hash already has a FINISHED LM run, and runs the
rest through a launcher (``lmgen.launchers``), each point in its own process (``lmgen run
--resume``: an unfinished run resumes from its ``last.ckpt``), printing a line as each point
starts and ends. A failing point is FAILED with its error and the others go on; a rerun runs
only what is not FINISHED. The end is a summary table. A signal stops the sweep cleanly
(``run_sweep``): no point is left training, no run RUNNING.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from lmgen.config import (
    PRESET_GROUPS,
    SPEED_KEYS,
    ConfigError,
    ExperimentConfig,
    config_hash,
    flatten,
    load_config,
    read_yaml,
    run_config_hash,
    to_dict,
)
from lmgen.launchers import LocalLauncher, PointEvents, local_launcher, slurm_launcher
from lmgen.paths import check_inputs, file_slug, safe_component
from lmgen.processes import stopping
from lmgen.progress import duration

log = logging.getLogger(__name__)

EXPERIMENT_AXIS = "experiment"
SWEEP_KEYS = ("name", "experiment", "overrides", "grid", "zip", "blocks", "max_parallel", "slurm")
BLOCK_KEYS = ("experiment", "overrides", "grid", "zip")
# What each key of a sweep file (and of a block) holds: a value of another kind is refused naming it.
SHAPES = {"name": "text", "experiment": "text", "overrides": "a list of text", "grid": "a mapping",
          "zip": "a list of mappings", "blocks": "a list of mappings", "max_parallel": "an integer", "slurm": "a mapping"}
SLURM_KEYS = ("gpus_per_node", "nodes", "timeout_min", "partition", "cpus_per_task", "mem_gb", "account",
              "constraint", "max_num_timeout")
SUMMARY_METRICS = ("tok/bits_per_image", "tok/psnr", "lm/params", "lm/val_bits_per_image", "gen/fd_probe",
                   "gen/decode_valid_rate")


@dataclass(frozen=True)
class SweepPoint:
    """One run of a sweep: its readable name, base experiment and dotlist overrides (sweep-wide first)."""

    name: str
    experiment: Path
    overrides: tuple[str, ...]

    def argv(self) -> list[str]:
        """``lmgen run`` arguments of this point (experiment file, then overrides)."""
        return [str(self.experiment), *self.overrides]


@dataclass(frozen=True)
class Block:
    """One grid of a sweep: a base experiment (or an experiment axis), overrides, grid axes, zip groups."""

    experiment: Path | None
    overrides: tuple[str, ...] = ()
    grid: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    zips: tuple[tuple[tuple[str, tuple[Any, ...]], ...], ...] = ()


@dataclass(frozen=True)
class SweepSpec:
    """A parsed sweep file: see the module docstring."""

    name: str
    path: Path
    blocks: tuple[Block, ...]
    overrides: tuple[str, ...] = ()
    max_parallel: int = 1
    slurm: dict[str, Any] = field(default_factory=dict)


def _values(key: str, raw: Any, where: str, unique: bool = True) -> tuple[Any, ...]:
    if not isinstance(raw, (list, ListConfig)) or len(raw) == 0:
        raise ConfigError(f"{where}.{key}: needs a non-empty list of values, got {raw!r}")
    values = tuple(OmegaConf.to_container(raw, resolve=True) if isinstance(raw, ListConfig) else raw)
    if unique and len(set(map(_render, values))) != len(values):
        raise ConfigError(f"{where}.{key}: repeated values {list(values)}")
    return values


def _block(raw: DictConfig, path: Path, where: str, default_experiment: Any = None) -> Block:
    grid = tuple((str(k), _values(str(k), v, f"{where}grid")) for k, v in (raw.get("grid") or {}).items())
    zips = []
    for i, group in enumerate(raw.get("zip") or []):
        axes = tuple((str(k), _values(str(k), v, f"{where}zip[{i}]", unique=False)) for k, v in group.items())
        if len({len(v) for _, v in axes}) > 1:
            raise ConfigError(f"{where}zip[{i}]: the axes {[k for k, _ in axes]} must have equal lengths, "
                              f"got {[len(v) for _, v in axes]}")
        rows = [tuple(_render(v[j]) for _, v in axes) for j in range(len(axes[0][1]))]
        if len(set(rows)) != len(rows):
            raise ConfigError(f"{where}zip[{i}]: repeated rows {rows}")
        zips.append(axes)
    keys = [k for k, _ in grid] + [k for axes in zips for k, _ in axes]
    speed = sorted(set(keys) & set(SPEED_KEYS))
    if speed:  # left out of the run's config hash: the points would be one run
        raise ConfigError(f"{path}: {where}{speed} change how fast a run computes, never what it computes, so the "
                          f"points would share one run; time them with benchmarks/ instead of sweeping them")
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ConfigError(f"{path}: {where}axis {repeated} appears more than once in grid/zip")
    base = raw.get("experiment", default_experiment)
    if base is None and EXPERIMENT_AXIS not in keys:
        raise ConfigError(f"{path}: {where}give a base 'experiment' file or an '{EXPERIMENT_AXIS}' axis")
    return Block(experiment=None if base is None else path.parent / str(base),
                 overrides=tuple(str(o) for o in (raw.get("overrides") or [])), grid=grid, zips=tuple(zips))


def _check_shapes(raw: DictConfig, path: Path, where: str) -> None:
    """ConfigError naming the key of ``raw`` whose value is not of its ``SHAPES`` kind (null = unset)."""
    for key in raw:
        node, kind = raw._get_node(key), SHAPES.get(str(key))
        if kind is None or node._is_none():
            continue
        items = [node._get_node(i) for i in range(len(node))] if isinstance(node, ListConfig) else []
        containers = (DictConfig, ListConfig)
        ok = {"text": not isinstance(node, containers), "a mapping": isinstance(node, DictConfig),
              "an integer": not isinstance(node, containers) and type(node._value()) is int,
              "a list of text": isinstance(node, ListConfig) and not any(isinstance(v, containers) for v in items),
              "a list of mappings": isinstance(node, ListConfig) and all(isinstance(v, DictConfig) for v in items)}[kind]
        if not ok:
            shown = OmegaConf.to_container(node, resolve=False) if isinstance(node, containers) else node._value()
            raise ConfigError(f"{path}: {where}{key}: must be {kind}, got {shown!r}")


def load_sweep(path: str | Path) -> SweepSpec:
    """Parse and check a sweep file; ConfigError naming the key for anything malformed."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    raw = read_yaml(path, f"a sweep file is a mapping with keys {', '.join(SWEEP_KEYS)}")
    unknown = sorted(set(raw) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown sweep key(s) {unknown}; valid keys: {', '.join(SWEEP_KEYS)}")
    _check_shapes(raw, path, "")
    for i, block in enumerate(raw.get("blocks") or []):
        _check_shapes(block, path, f"blocks[{i}].")
    if not raw.get("name"):
        raise ConfigError(f"{path}: 'name' is required (the MLflow experiment of the sweep)")
    try:  # it names the sweep's folder of point logs and its experiment's artifact folder
        safe_component("name", str(raw.name))
    except ValueError as err:
        raise ConfigError(f"{path}: {err}") from None
    if raw.get("blocks"):
        if raw.get("grid") or raw.get("zip"):
            raise ConfigError(f"{path}: use either top-level grid/zip or blocks, not both")
        blocks = []
        for i, block in enumerate(raw.blocks):
            bad = sorted(set(block) - set(BLOCK_KEYS))
            if bad:
                raise ConfigError(f"{path}: blocks[{i}]: unknown key(s) {bad}; valid keys: {', '.join(BLOCK_KEYS)}")
            blocks.append(_block(block, path, f"blocks[{i}].", raw.get("experiment")))
    else:
        blocks = [_block(OmegaConf.masked_copy(raw, [k for k in ("experiment", "grid", "zip") if k in raw]), path, "")]
    slurm = OmegaConf.to_container(raw.get("slurm") or OmegaConf.create({}), resolve=True)
    bad = sorted(set(slurm) - set(SLURM_KEYS))
    if bad:
        raise ConfigError(f"slurm: unknown key(s) {bad}; valid keys: {', '.join(SLURM_KEYS)}")
    max_parallel = int(raw.get("max_parallel") or 1)
    if max_parallel < 1:
        raise ConfigError(f"max_parallel must be >= 1, got {max_parallel}")
    return SweepSpec(name=str(raw.name), path=path, blocks=tuple(blocks),
                     overrides=tuple(str(o) for o in (raw.get("overrides") or [])), max_parallel=max_parallel,
                     slurm=slurm)


def _render(value: Any) -> str:
    """A value as a dotlist override writes it (lists in brackets, no spaces)."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_render(v) for v in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else str(value)


def _label(key: str, value: Any, leaves: dict[str, int]) -> str:
    if key == EXPERIMENT_AXIS:
        return Path(str(value)).stem
    if key in PRESET_GROUPS:  # a preset's name says what it is: vq_1k
        return _render(value)
    leaf = key.rsplit(".", 1)[-1]
    return f"{leaf if leaves[leaf] == 1 else key}={_render(value)}"


def _block_label(block: Block, experiment: Path) -> str:
    """What tells a block's points from another block's: its own overrides (``tokenizer=vq_1k`` →
    ``vq_1k``), else its experiment file's stem (left out of the names where the block's own
    axes already vary)."""
    if not block.overrides:
        return experiment.stem
    pairs = [o.partition("=")[::2] for o in block.overrides]
    leaves: dict[str, int] = {}
    for key, _ in pairs:
        leaves[key.rsplit(".", 1)[-1]] = leaves.get(key.rsplit(".", 1)[-1], 0) + 1
    return ",".join(_label(key, value, leaves) for key, value in pairs)


def _block_points(spec: SweepSpec, block: Block, name_experiment: bool) -> list[SweepPoint]:
    axes: list[list[tuple[tuple[str, Any], ...]]] = [[((k, v),) for v in values] for k, values in block.grid]
    for group in block.zips:
        axes.append([tuple((k, values[i]) for k, values in group) for i in range(len(group[0][1]))])
    varying = [k for k, values in block.grid if len(values) > 1]
    varying += [k for group in block.zips for k, values in group if len(values) > 1]
    if not varying and len(spec.blocks) > 1:  # a one-point block among several: named by what its
        varying = [k for k, _ in block.grid] + [k for group in block.zips for k, _ in group]  # axes set
    leaves: dict[str, int] = {}
    for key in varying:
        leaf = key.rsplit(".", 1)[-1]
        leaves[leaf] = leaves.get(leaf, 0) + 1
    points = []
    for combo in itertools.product(*axes):
        assignment = dict(pair for part in combo for pair in part)
        experiment = Path(os.path.normpath(spec.path.parent / str(assignment.pop(EXPERIMENT_AXIS))
                                           if EXPERIMENT_AXIS in assignment else block.experiment))
        block_label = _block_label(block, experiment) if name_experiment and EXPERIMENT_AXIS not in varying else ""
        labels = [block_label] if block_label and (block.overrides or not varying) else []
        labels += [_label(k, experiment if k == EXPERIMENT_AXIS else assignment[k], leaves) for k in varying]
        overrides = (*spec.overrides, *block.overrides, *(f"{k}={_render(v)}" for k, v in assignment.items()))
        points.append(SweepPoint(name=",".join(labels) or spec.name, experiment=experiment, overrides=overrides))
    return points


def expand(spec: SweepSpec) -> list[SweepPoint]:
    """Every point of the sweep, in a fixed order (blocks in order; in each, grid axes in file
    order, then zip groups); names say only what varies and are unique. Pure: no file besides
    the spec is read."""
    name_experiment = len(spec.blocks) > 1  # blocks differ by their experiment: say which
    points = [p for block in spec.blocks for p in _block_points(spec, block, name_experiment)]
    names = [p.name for p in points]
    if len(set(names)) != len(names):  # e.g. two blocks on one experiment with equal labels
        raise ConfigError(f"sweep {spec.name}: point names collide: {sorted({n for n in names if names.count(n) > 1})}")
    return points


def point_config(spec: SweepSpec, point: SweepPoint, parent_run_id: str | None = None) -> list[str]:
    """The full override list of a point as the runner launches it: the point's overrides plus
    where it is tracked (the sweep's experiment, its parent run, its readable run name)."""
    tracking = [f"tracking.experiment={spec.name}", f"tracking.run_name={point.name}", f"tracking.sweep={spec.name}"]
    if parent_run_id:
        tracking.append(f"tracking.parent_run_id={parent_run_id}")
    return [*point.overrides, *tracking]


def validate_points(spec: SweepSpec, points: Sequence[SweepPoint]) -> dict[str, ExperimentConfig]:
    """Load every point's config before anything runs; ConfigError naming the point and the key."""
    configs = {}
    for point in points:
        try:
            configs[point.name] = load_config(point.experiment, point_config(spec, point))
        except ConfigError as err:
            raise ConfigError(f"sweep {spec.name}, point {point.name!r}: {err}") from None
    return configs


def declared_axes(spec: SweepSpec) -> set[str]:
    """What the sweep says may differ between its points: every grid and zip axis, and each key
    that every one of several blocks sets in its own ``overrides`` (what tells the blocks apart,
    e.g. ``tokenizer``). A key only some blocks set is not declared: it is a confound."""
    axes = {k for block in spec.blocks for k, _ in block.grid}
    axes |= {k for block in spec.blocks for group in block.zips for k, _ in group}
    if len(spec.blocks) > 1:
        keys = [{o.partition("=")[0] for o in block.overrides} for block in spec.blocks]
        axes |= set.intersection(*keys)
    return axes


def _covered(key: str, axes: set[str]) -> bool:
    """Whether config key ``key`` may differ under ``axes``: it is an axis or lies under one; a
    preset group axis (``tokenizer``) covers its recorded name (``preset.tokenizer``); a
    ``stage1.*`` axis covers the copy a learned tokenizer's block carries (``tokenizer.*``)."""
    for axis in axes:
        if key == axis or key.startswith(axis + "."):
            return True
        if axis in PRESET_GROUPS and key == f"preset.{axis}":
            return True
        if axis.startswith("stage1.") and key == "tokenizer." + axis.removeprefix("stage1."):
            return True
    return False


def recipe_differences(spec: SweepSpec, configs: dict[str, ExperimentConfig]) -> dict[str, list[Any]]:
    """The one-recipe invariant: config keys whose resolved values differ between the sweep's
    points although no axis declares them (``declared_axes``), each with its distinct values.
    Empty for a sweep that varies only what it declares; anything here is a confound."""
    flat = {name: flatten({k: v for k, v in to_dict(cfg).items() if k != "tracking"}) for name, cfg in configs.items()}
    axes = declared_axes(spec)
    keys = sorted({k for tree in flat.values() for k in tree})
    missing = object()
    differences = {}
    for key in keys:
        if _covered(key, axes):
            continue
        values = [tree.get(key, missing) for tree in flat.values()]
        distinct = list({json.dumps(v, sort_keys=True, default=str): v for v in values if v is not missing}.values())
        if len(distinct) > 1 or (missing in values and distinct):
            differences[key] = distinct + (["<absent>"] if missing in values else [])
    return differences


# --- running ----------------------------------------------------------------------------------


@dataclass
class PointResult:
    """How one point ended: FINISHED | FAILED | SKIPPED (already FINISHED) | KILLED | NOT STARTED (the
    sweep was stopped first) | RUNNING (another process trains it), with its run id,
    key metrics, wall time (of its process, stage 1 and evaluation included; of its LM run for a
    point skipped as FINISHED) and, for a failure, the last lines of its log."""

    name: str
    status: str
    run_id: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    error: str = ""


def _tail(path: Path, lines: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def summary_table(results: Sequence[PointResult]) -> str:
    """A markdown table: point, status, key metrics, wall time."""
    head = ["point", "status", *SUMMARY_METRICS, "wall time (s)"]
    rows = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for r in results:
        values = [f"{r.metrics[k]:.4g}" if k in r.metrics else "" for k in SUMMARY_METRICS]
        rows.append("| " + " | ".join([r.name, r.status, *values, f"{r.seconds:.0f}"]) + " |")
    return "\n".join(rows)


def plan_sweep(path: str | Path) -> tuple[SweepSpec, list[SweepPoint], dict[str, str]]:
    """The sweep in ``path``, its points, and each point's run config hash; every point's config is
    validated here (ConfigError naming the point and the key), before anything runs. A point
    differing from another outside the declared axes (``recipe_differences``) is warned about."""
    spec, points, configs = _plan(path)
    return spec, points, {name: run_config_hash(cfg) for name, cfg in configs.items()}


def _plan(path: str | Path) -> tuple[SweepSpec, list[SweepPoint], dict[str, ExperimentConfig]]:
    spec = load_sweep(path)
    points = expand(spec)
    configs = validate_points(spec, points)
    confounds = recipe_differences(spec, configs)
    if confounds:
        log.warning("sweep %s varies more than its axes declare (a confound in a comparison): %s", spec.name,
                    "; ".join(f"{k}: {v}" for k, v in confounds.items()))
    return spec, points, configs


def _preflight(spec: SweepSpec, configs: dict[str, ExperimentConfig], launcher: str) -> Path:
    """``$LMGEN_HOME`` takes a file, and — for points run here (the local launcher) — each point's
    inputs exist (``lmgen.paths.check_inputs``); returns the home. ConfigError naming the point
    and the key otherwise, before the sweep's parent run or any point exists."""
    from lmgen.tracking import writable_home

    for name, cfg in configs.items() if launcher == "local" else ():
        try:
            check_inputs(cfg.data, cfg.tokenizer)
        except ValueError as err:
            raise ConfigError(f"sweep {spec.name}, point {name!r}: {err}") from None
    try:
        return writable_home()
    except ValueError as err:
        raise ConfigError(str(err)) from None


class SweepStopped(Exception):
    """The sweep was stopped by a signal: its points were stopped as ``lmgen run`` stops on
    SIGTERM (checkpoint, KILLED) and the parent run ended KILLED; a rerun resumes."""

    def __init__(self, signum: int, results: list[PointResult]) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum, self.results = signum, results


class Progress(PointEvents):
    """One console line as each point starts (with its log) and as it ends (status, wall time,
    headline metric, and the time the rest should take at the pace so far); its result is read
    from MLflow as it ends (``_result``)."""

    def __init__(self, tracker, hashes: dict[str, str], total: int, parallel: int) -> None:
        self.tracker, self.hashes, self.total, self.parallel = tracker, hashes, total, parallel
        self.results: dict[str, PointResult] = {}
        self.logs: dict[str, Path] = {}
        self.began: dict[str, float] = {}
        self.start = time.perf_counter()
        self._lock = threading.Lock()

    def started(self, name: str, log_path: Path) -> None:
        with self._lock:
            self.logs[name], self.began[name] = log_path, time.perf_counter()
            log.info("[%d/%d done] started %s  (log: %s)", len(self.results), self.total, name, log_path)

    def ended(self, name: str, code: int | None) -> None:
        with self._lock:  # one MLflow read at a time, and whole lines
            result = _result(self.tracker, name, self.hashes[name], code, self.logs[name])
            result.seconds = time.perf_counter() - self.began[name]  # the whole point, not only its LM run
            self.results[name] = result
            done, left = len(self.results), self.total - len(self.results)
            headline = next((f"{k} {result.metrics[k]:.4g}" for k in ("gen/fd_probe", "lm/val_bits_per_image")
                             if k in result.metrics), "")
            pace = (time.perf_counter() - self.start) / done
            eta = f"; {left} left, about {duration(pace * left)} more" if left else "; all done"
            log.info("[%d/%d done] %s %s in %s%s%s", done, self.total, result.status, name,
                     duration(result.seconds), "  " + headline if headline else "", eta)


def run_sweep(path: str | Path, launcher: str = "local", max_parallel: int | None = None,
              uri: str | None = None, slurm_cluster: str = "slurm") -> list[PointResult]:
    """Expand, validate, and run the sweep in ``path``; returns one result per point (see module
    docstring). SIGTERM, SIGINT or SIGHUP stops it: the running points stop as ``lmgen run`` does
    on SIGTERM (checkpoint, KILLED), no other point starts, the parent run ends KILLED, and
    ``SweepStopped`` carries the results; a second signal kills the points outright."""
    from lmgen.tracking import Tracker, check_tracking, resolve_tracking_uri

    if launcher not in ("local", "slurm"):
        raise ConfigError(f"unknown launcher {launcher!r}; valid choices: local, slurm")
    spec, points, configs = _plan(path)
    hashes = {name: run_config_hash(cfg) for name, cfg in configs.items()}
    home = _preflight(spec, configs, launcher)
    uri = resolve_tracking_uri(uri)
    check_tracking(uri)
    tracker, start = Tracker(uri, spec.name), time.perf_counter()
    parent = _parent_run(tracker, spec, points, hashes, launcher)
    results: dict[str, PointResult] = {}
    jobs = []
    for p in points:
        done = tracker.find_finished({"lmgen.stage": "lm", "lmgen.config_hash": hashes[p.name]})
        if done is not None:
            results[p.name] = PointResult(p.name, "SKIPPED", done, _pick(tracker.metrics(done)), _seconds(tracker, done))
            continue
        argv = [str(p.experiment), *point_config(spec, p, parent)]
        if uri != resolve_tracking_uri(None):
            argv.append(f"tracking.uri={uri}")
        jobs.append((p.name, argv, point_log(home, spec, p)))
    parallel = 1 if launcher == "slurm" else max_parallel or spec.max_parallel
    log.info("sweep %s: %d points, %d already FINISHED, %d to run (%s%s); logs in %s", spec.name, len(points),
             len(points) - len(jobs), len(jobs), launcher, f", {parallel} at a time" if launcher == "local" else "",
             home / "sweeps" / spec.name)
    if launcher == "slurm":
        launch = slurm_launcher(spec.slurm, home / "sweeps" / spec.name / "slurm", cluster=slurm_cluster)
    else:
        launch = local_launcher(parallel)
    progress = Progress(tracker, hashes, len(jobs), parallel)
    signals: list[int] = []

    def stop(signum: int) -> None:
        signals.append(signum)
        if not isinstance(launch, LocalLauncher):
            raise KeyboardInterrupt  # out of the wait for SLURM's jobs, which SLURM keeps running
        log.warning("sweep %s: %s — stopping the running points (%s)", spec.name, signal.Signals(signum).name,
                    "killing them" if len(signals) > 1 else "each checkpoints and ends KILLED; a rerun resumes")
        launch.stop(force=len(signals) > 1)

    with contextlib.suppress(KeyboardInterrupt), stopping(stop):
        if jobs:
            launch(jobs, progress)
    results.update(progress.results)
    for name, _, log_path in jobs:  # stopped before they started, or (SLURM) no longer waited for
        if name not in results:
            results[name] = (_result(tracker, name, hashes[name], None, log_path) if name in progress.logs
                             else PointResult(name, "NOT STARTED"))
    ordered = [results[p.name] for p in points]
    _finish(tracker, parent, ordered, time.perf_counter() - start, stopped=bool(signals))
    tracker.set_description(parent, _description(tracker, spec, points, ordered))
    if signals:
        raise SweepStopped(signals[0], ordered)
    return ordered


def point_log(home: Path, spec: SweepSpec, point: SweepPoint) -> Path:
    """The log file of ``point``: ``<home>/sweeps/<sweep name>/<point name as a file name>.log``.
    A point's name holds its grid values (``root=/data/a``), so it is made a safe file name
    (``lmgen.paths.file_slug``); the sweep's name was checked to be one path component."""
    return home / "sweeps" / spec.name / f"{file_slug(point.name)}.log"


def _parent_run(tracker, spec: SweepSpec, points: Sequence[SweepPoint], hashes: dict[str, str], launcher: str) -> str:
    """The sweep's parent run: the one of an earlier run of the same points (reopened), else a new one."""
    sweep_hash = config_hash("sweep", [(p.name, hashes[p.name]) for p in points])
    tags = {"lmgen.stage": "sweep", "lmgen.sweep": spec.name, "lmgen.sweep_hash": sweep_hash}
    parent = tracker.find_run(tags)
    if parent is not None:
        tracker.reopen_run(parent)
        return parent
    parent = tracker.start_run(f"sweep-{spec.name}", {**tags, "mlflow.source.name": f"lmgen sweep {spec.name}",
                                                     "mlflow.source.type": "LOCAL"})  # as its points (run_page.Filing)
    tracker.log_params(parent, {"sweep.file": str(spec.path), "sweep.points": len(points), "sweep.launcher": launcher})
    tracker.set_description(parent, _description(tracker, spec, points))
    return parent


def _description(tracker, spec: SweepSpec, points: Sequence[SweepPoint], results: Sequence[PointResult] = ()) -> str:
    """The parent run's description (``lmgen.run_page.sweep_description``): axes and points; the results once it ends."""
    from lmgen.run_page import sweep_description

    return sweep_description(spec.name, str(spec.path), sorted(declared_axes(spec)), [p.name for p in points],
                             tracker.experiment_id, results)


def _result(tracker, name: str, run_hash: str, code: int | None, log_path: Path) -> PointResult:
    """How a launched point ended, from its MLflow run and its process's exit code. A point whose
    process failed while its run is still RUNNING is FAILED only if no live process owns the run
    (``Tracker.end_if_abandoned``): a point refused because another sweep is training it leaves
    that run alone and reads RUNNING; a run some process FINISHED stays FINISHED. The result is
    the run's status, with the tail of the point's log whenever its process failed."""
    run_id = tracker.find_run({"lmgen.stage": "lm", "lmgen.config_hash": run_hash}) or ""
    status = tracker.status(run_id) if run_id else "FAILED"
    if code != 0 and status == "RUNNING" and tracker.end_if_abandoned(run_id, "FAILED"):
        status = "FAILED"  # the process died (or was killed) before its run could say so itself
    metrics = _pick(tracker.metrics(run_id)) if run_id else {}
    return PointResult(name, status, run_id, metrics, _seconds(tracker, run_id),
                       _tail(log_path) if code != 0 or status != "FINISHED" else "")


def _finish(tracker, parent: str, results: Sequence[PointResult], seconds: float, stopped: bool = False) -> None:
    """Summary table and counts on the parent run; it ends KILLED if the sweep was stopped, else
    FAILED if any point did not finish."""
    tracker.log_text(parent, summary_table(results) + "\n", "summary.md")
    tracker.log_text(parent, json.dumps([r.__dict__ for r in results], indent=1), "summary.json")
    ok = [r.status in ("FINISHED", "SKIPPED") for r in results]
    tracker.log_metrics(parent, {"sweep/finished": sum(ok), "sweep/failed": len(ok) - sum(ok),
                                 "sweep/wall_time_s": seconds})
    tracker.end_run(parent, "KILLED" if stopped else "FINISHED" if all(ok) else "FAILED")


def _pick(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k in SUMMARY_METRICS}


def _seconds(tracker, run_id: str) -> float:
    if not run_id:
        return 0.0
    info = tracker.client.get_run(run_id).info
    return ((info.end_time or info.start_time) - info.start_time) / 1000.0
