"""What a run needs from $LMGEN_HOME and the machine, proved on the real thing (issue 24, items
8-10): two processes opening a fresh home's tracking store at once, names that would escape
the home, a home that cannot be written, a disk that fills up, input paths that do not exist.

A read-only home and a full disk are real: a read-only or tiny tmpfs mounted for the test
where this process may mount one (root with CAP_SYS_ADMIN; a read-only home is also a folder
without write permission for anyone else), else the test is skipped.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from lmgen.cli import main
from lmgen.config import load_config
from lmgen.datasets import build_dataset
from lmgen.datasets.shapes import ShapesConfig
from lmgen.paths import DiskFull, file_slug
from lmgen.run_page import dataset_inputs
from lmgen.sweep import expand, load_sweep, plan_sweep, point_log
from lmgen.tracking import Tracker, filter_literal, resolve_tracking_uri

ROOT = Path(__file__).resolve().parents[1]
BASE = str(ROOT / "experiments/base.yaml")
TINY = ["tokenizer=jpeg_q25", "data.train_size=16", "data.val_size=8", "data.image_size=16", "lm.size=nano",
        "train.budget=steps", "train.max_steps=2", "train.batch_size=8", "train.warmup_steps=1",
        "sample.num_samples=0", "metrics.probe=false", "metrics.prefix_samples=0"]


def _one_error_line(err: str) -> str:
    """The single line ``err`` holds (stderr of a failed command): no traceback, nothing else."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- item 8: runs started together on a fresh home ---------------------------------------------


def _open_tracker(home: str, barrier, experiment: str) -> None:
    os.environ["LMGEN_HOME"] = home
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    barrier.wait(timeout=120)  # both create the store at the same moment
    Tracker(resolve_tracking_uri(None), experiment)


@pytest.fixture()
def memory_dir(tmp_path: Path) -> Iterator[Path]:
    """A fresh folder in memory (/dev/shm) where there is one, else ``tmp_path``: creating an
    MLflow store there takes ~1 s instead of ~6 s of fsyncs."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="lmgen-test-", dir=shm))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_runs_started_together_on_a_fresh_home_both_open_its_store(memory_dir):
    """Two real processes open the tracking store of one fresh $LMGEN_HOME (and the same
    experiment) at the same moment: both succeed, the store holds that experiment once. Without
    the lock the second died in MLflow's migration ("table ... already exists") every time."""
    MlflowClient(tracking_uri=f"sqlite:///{memory_dir / 'warm.db'}")
    context = multiprocessing.get_context("fork")  # ... and carried over: what the processes race is the store
    for attempt in range(3):
        home = memory_dir / f"home{attempt}"
        barrier = context.Barrier(2)
        processes = [context.Process(target=_open_tracker, args=(str(home), barrier, "race")) for _ in range(2)]
        for p in processes:
            p.start()
        for p in processes:
            p.join(timeout=240)
        assert [p.exitcode for p in processes] == [0, 0], f"attempt {attempt}: a process failed to open the store"
        client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
        assert [e.name for e in client.search_experiments()].count("race") == 1


def _log_dataset(home: str, barrier, train_size: int) -> None:
    os.environ["LMGEN_HOME"] = home
    tracker = Tracker(resolve_tracking_uri(None), "race")
    run_id = tracker.start_run("point", {})
    data = ShapesConfig(image_size=8, train_size=train_size, val_size=4)
    splits = {"training": build_dataset(data, "train"), "validation": build_dataset(data, "val")}
    barrier.wait(timeout=120)  # every run logs the same dataset at the same moment
    tracker.log_inputs(run_id, dataset_inputs(data, "tiny", splits))


def test_parallel_points_log_one_dataset_together(memory_dir):
    """A sweep's parallel points log the same dataset into one experiment at once. MLflow's SQL
    store looks the dataset up, then inserts it: the loser of that race failed with "UNIQUE
    constraint failed: datasets..." and its whole point FAILED (seen in the quickstart)."""
    home = memory_dir / "home"
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ["LMGEN_HOME"] = str(home)
    Tracker(resolve_tracking_uri(None), "race")  # the store and experiment exist: what races is the dataset
    context = multiprocessing.get_context("fork")
    for attempt in range(4):  # a new dataset (digest) each time
        barrier = context.Barrier(3)
        processes = [context.Process(target=_log_dataset, args=(str(home), barrier, 16 + attempt)) for _ in range(3)]
        for p in processes:
            p.start()
        for p in processes:
            p.join(timeout=240)
        assert [p.exitcode for p in processes] == [0, 0, 0], f"attempt {attempt}: a run failed to log its dataset"
    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert len(runs) == 12 and all(len(r.inputs.dataset_inputs) == 2 for r in runs)


# --- item 9: names stay inside $LMGEN_HOME; any name is found in MLflow ------------------------


@pytest.fixture()
def memory_home(memory_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh $LMGEN_HOME in memory (its MLflow store is made in ~1 s), no outside server."""
    monkeypatch.setenv("LMGEN_HOME", str(memory_dir / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return memory_dir / "home"


def test_a_name_that_would_leave_the_home_is_refused_before_anything_is_written(lmgen_home, tmp_path, capsys):
    """``name=../../x`` named the experiment's artifact folder $LMGEN_HOME/mlartifacts/../../x."""
    assert main(["run", BASE, "name=../../escaped", *TINY]) == 2
    assert "config error: name: '../../escaped' holds a path separator" in _one_error_line(capsys.readouterr().err)
    assert main(["sweep", str(_sweep(tmp_path, "../../escaped", {"seed": [0]}))]) == 2
    assert "name: '../../escaped' holds a path separator" in _one_error_line(capsys.readouterr().err)
    assert not lmgen_home.exists() and not (tmp_path / "escaped").exists()


def _sweep(folder: Path, name: str, grid: dict, overrides: tuple[str, ...] = ()) -> Path:
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": name, "experiment": BASE, "overrides": [*TINY, *overrides],
                                    "grid": grid}, sort_keys=False))
    return path


@pytest.mark.parametrize("value", ["../../../../escaped", "/etc/passwd", "a\\b", ".hidden", "x" * 300, "é/ü"])
def test_a_point_log_stays_in_the_sweeps_folder_whatever_its_grid_values(tmp_path, value):
    """A point's name holds its grid values; its log file is that name made a file name, inside
    $LMGEN_HOME/sweeps/<sweep>, distinct for distinct names."""
    spec = load_sweep(_sweep(tmp_path, "logs", {"tracking.run_name": [value, "plain"]}))
    home = tmp_path / "home"
    logs = [point_log(home, spec, point) for point in expand(spec)]
    for log in logs:
        assert log.resolve().parent == (home / "sweeps" / "logs").resolve() and len(log.name.encode()) <= 255
    assert len(set(logs)) == 2 and logs[1].name == "run_name=plain.log"
    assert [file_slug(n) for n in ("size=nano,seed=0", "a/b", "a_b")] == ["size=nano,seed=0", "a_b-" + file_slug(
        "a/b").rsplit("-", 1)[1], "a_b"]


def test_a_sweep_named_with_quotes_finds_its_runs(memory_home, tmp_path, capsys):
    """``it's`` was pasted into an MLflow filter string unescaped: the sweep crashed. Its one
    point already FINISHED (a run of that config hash), so the sweep skips it; run again, it
    reopens the same parent run, found by its name."""
    name = "it's"
    path = _sweep(tmp_path, name, {"seed": [0]})
    _, points, hashes = plan_sweep(path)
    tracker = Tracker(resolve_tracking_uri(None), name)
    done = tracker.start_run("earlier", {"lmgen.stage": "lm", "lmgen.config_hash": hashes[points[0].name]})
    tracker.end_run(done)
    for _ in range(2):
        assert main(["sweep", str(path), "--no-plot"]) == 0
        assert "| it's | SKIPPED |" in capsys.readouterr().out  # one point: named by the sweep
    parents = [r for r in tracker.client.search_runs([tracker.experiment_id]) if r.data.tags["lmgen.stage"] == "sweep"]
    assert len(parents) == 1 and parents[0].data.tags["lmgen.sweep"] == name and parents[0].info.status == "FINISHED"


def test_runs_are_found_by_any_tag_value_the_filter_grammar_can_or_cannot_write(memory_home):
    """Quotes of either kind, both, a trailing backslash, LIKE wildcards: each value finds its run
    and only its run (values without a filter literal are matched in Python)."""
    tracker = Tracker(resolve_tracking_uri(None), "values")
    values = ["it's", 'say "hi"', "both ' and \"", "trailing\\", "a\\b", "100%_", "plain", ""]
    ids = {v: tracker.start_run("r", {"lmgen.sweep": v, "lmgen.stage": "lm"}) for v in values}
    for value, run_id in ids.items():
        assert tracker.find_run({"lmgen.sweep": value, "lmgen.stage": "lm"}) == run_id, value
        assert tracker.find_runs({"lmgen.sweep": value}, "RUNNING") == [run_id], value
    assert [filter_literal(v) for v in ("it's", 'say "hi"', "both ' and \"", "trailing\\")] == [
        "\"it's\"", "'say \"hi\"'", None, None]


# --- item 10: a home that cannot be written, a full disk, inputs that are not there --------------


@pytest.fixture()
def mount() -> Iterator:
    """``mount(folder, options)``: a tmpfs with ``options`` at ``folder`` (created), unmounted
    after the test; the test is skipped where this process may not mount one."""
    mounted: list[Path] = []

    def _mount(folder: Path, options: str) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN)")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True,
                              text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield _mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture()
def read_only_home(tmp_path: Path, mount, monkeypatch: pytest.MonkeyPatch) -> Path:
    """$LMGEN_HOME on a read-only folder: a read-only tmpfs (root ignores permission bits), or a
    folder without write permission for a user that is not root."""
    home = tmp_path / "read-only-home"
    if os.geteuid() != 0:
        home.mkdir()
        home.chmod(0o555)
    else:
        mount(home, "ro,size=64k")
    monkeypatch.setenv("LMGEN_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield home
    if os.geteuid() != 0:
        home.chmod(0o755)  # so that pytest can remove it


def _fill(folder: Path) -> None:
    """Write to ``folder``'s filesystem until it has no byte left (a real ENOSPC)."""
    fd = os.open(folder / ".filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as err:
        assert err.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_a_read_only_home_fails_at_once_naming_the_path(read_only_home, tmp_path, capsys):
    """It used to take 112 s of the tracking store's retries, then a traceback without the path."""
    for argv in (["run", BASE, *TINY], ["sweep", str(_sweep(tmp_path, "ro", {"seed": [0]}))]):
        start = time.perf_counter()
        assert main(argv) == 2
        assert time.perf_counter() - start < 1.0
        line = _one_error_line(capsys.readouterr().err)
        assert f"config error: LMGEN_HOME: {read_only_home} is not writable" in line, line
    import lmgen.experiment  # noqa: F401  (eval's and export-hf's own imports are not the store's retries)
    import lmgen.hf_export  # noqa: F401

    for command in (["eval", "0" * 32], ["export-hf", "0" * 32, str(tmp_path / "hf")]):  # they open the store too
        start = time.perf_counter()
        assert main(command) == 2
        assert time.perf_counter() - start < 10.0  # the store's first retry alone waits ~50 s
        line = _one_error_line(capsys.readouterr().err)
        assert f"lmgen {command[0]}: LMGEN_HOME: {read_only_home} is not writable" in line, line
    assert list(read_only_home.iterdir()) == []


def test_inputs_that_are_not_there_fail_before_the_store_is_created(lmgen_home, tmp_path, capsys):
    """A missing data.root (or tokenizer.checkpoint) left a traceback and an empty mlflow.db."""
    missing = tmp_path / "no-such-folder"
    cases = [(["data.name=imagefolder", f"data.root={missing}"], f"data.root: {missing} is not a folder"),
             (["tokenizer=vq_1k", f"tokenizer.checkpoint={missing}.ckpt"], f"tokenizer.checkpoint: no file at {missing}")]
    for overrides, message in cases:
        assert main(["run", BASE, *TINY, *overrides]) == 2
        assert f"config error: {message}" in _one_error_line(capsys.readouterr().err)
        sweep = _sweep(tmp_path, "inputs", {"seed": [0, 1]}, tuple(overrides))
        assert main(["sweep", str(sweep)]) == 2
        assert f"point 'seed=0': {message}" in _one_error_line(capsys.readouterr().err)
    assert not lmgen_home.exists()


def test_a_full_disk_fails_a_checkpoint_write_naming_it_and_keeps_the_last_one(tmp_path, mount):
    from lmgen.checkpointing import AtomicCheckpointIO, intact

    folder = mount(tmp_path / "checkpoints", "size=256k")
    last = folder / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.zeros(1000)}, last)
    with pytest.raises(DiskFull, match=rf"disk full writing {last}"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(100_000)}, last)  # 400 kB on a 256 kB disk
    assert intact(last) and torch.load(last, weights_only=True)["step"] == 1


def test_a_full_disk_fails_a_token_cache_write_naming_it(tmp_path, mount):
    from lmgen.data import TokenCache
    from lmgen.datasets import build_dataset
    from lmgen.tokenizers import tokenizer_for

    cfg = load_config(BASE, TINY)
    caches = mount(tmp_path / "cache", "size=64k")
    _fill(caches)
    with pytest.raises(DiskFull, match=rf"disk full writing {caches / 'val-key'}"):
        TokenCache.build_or_load(caches, "val-key", build_dataset(cfg.data, "val"), tokenizer_for(cfg))
    assert [p.name for p in caches.iterdir()] == [".filler"]  # the half-written cache was removed


def test_a_full_disk_fails_the_run_in_one_line_naming_the_file(memory_home, mount, capsys):
    """torch.save of the stage-1 state onto a full disk said only "unexpected pos N vs M"."""
    _fill(mount(memory_home / "tokenizers", "size=64k"))
    assert main(["run", BASE, *TINY]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"lmgen: disk full writing {memory_home / 'tokenizers'}/") and "state.pt (" in line
    client = MlflowClient(tracking_uri=resolve_tracking_uri(None))
    (stage1,) = client.search_runs([client.get_experiment_by_name("base").experiment_id])
    assert stage1.info.status == "FAILED" and "DiskFull: disk full writing" in stage1.data.tags["lmgen.error"]
