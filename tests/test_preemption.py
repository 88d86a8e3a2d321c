"""Preemption and hard kills, with real processes and real signals.

SIGTERM (what SLURM, Kubernetes and `kill` send) during training: the step finishes, last.ckpt
is written, the MLflow run ends KILLED (never FINISHED, never left RUNNING) and the process
exits 143; `lmgen run --resume` (what a sweep rerun runs per point) continues it. SIGKILL
cannot be caught: the run is left RUNNING, and the next rerun reconciles it (its process is
gone) before resuming — while a run whose process is alive is never taken over.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from proctools import alive, descendants

from lmgen.checkpointing import PREEMPTED_EXIT
from lmgen.config import load_config
from lmgen.experiment import run_experiment

ROOT = Path(__file__).resolve().parents[1]
PIXELS = ROOT / "experiments/base.yaml"
# Long enough (a few seconds of steps) to be caught mid-training; a checkpoint every 10 steps.
SLOW = ["tokenizer=pixels_palette64", "data.train_size=256", "data.val_size=16", "data.image_size=16", "lm.size=nano", "train.budget=steps", "train.max_steps=120",
        "train.val_every=10", "train.val_batches=1", "train.batch_size=8", "train.warmup_steps=2",
        "train.log_every=1", "sample.num_samples=0", "metrics.prefix_samples=0", "metrics.probe=false",
        "train.precision=32-true"]


def _start(home: Path) -> subprocess.Popen:
    env = {**os.environ, "LMGEN_HOME": str(home), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen([sys.executable, "-m", "lmgen", "run", "--resume", str(PIXELS), *SLOW], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_checkpoint(home: Path, proc: subprocess.Popen, timeout: float = 120.0) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list((home / "checkpoints").glob("*/last.ckpt")) if (home / "checkpoints").is_dir() else []
        if found:
            return found[0]
        if proc.poll() is not None:
            pytest.fail(f"the run ended before its first checkpoint:\n{proc.stdout.read()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("no checkpoint appeared")


def _lm_runs(home: Path):
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name("base")
    return client, client.search_runs([exp.experiment_id], "tags.`lmgen.stage` = 'lm'")


def _step(ckpt: Path) -> int:
    return int(torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"])


def test_sigterm_checkpoints_marks_killed_and_a_rerun_resumes(lmgen_home):
    proc = _start(lmgen_home)
    ckpt = _wait_for_checkpoint(lmgen_home, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT == 143, out[-2000:]
    client, (run,) = _lm_runs(lmgen_home)
    assert run.info.status == "KILLED"
    stopped = _step(ckpt)
    assert 10 <= stopped < 120  # written at SIGTERM, mid-training
    assert not [p for p in ckpt.parent.iterdir() if p.name.endswith(".tmp")]

    cfg = load_config(PIXELS, SLOW)
    summary = run_experiment(cfg, resume=True)  # what `lmgen sweep` runs again for this point
    assert summary.run_id == run.info.run_id
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "lm/train_loss")]
    assert sorted(steps) == list(range(120))  # every step logged once: none lost, none redone


def test_a_sigkilled_run_is_reconciled_and_resumed_but_a_live_one_is_left_alone(lmgen_home):
    proc = _start(lmgen_home)
    ckpt = _wait_for_checkpoint(lmgen_home, proc)
    cfg = load_config(PIXELS, SLOW)
    with pytest.raises(RuntimeError, match=f"being trained right now by process {proc.pid}"):
        run_experiment(cfg, resume=True)  # a second sweep over the same point, while the first runs
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    client, (run,) = _lm_runs(lmgen_home)
    assert run.info.status == "RUNNING"  # nobody could say otherwise: the process died at once

    summary = run_experiment(cfg, resume=True)
    assert summary.run_id == run.info.run_id
    after = client.get_run(run.info.run_id)
    assert after.info.status == "FINISHED"
    assert "was gone" in after.data.tags["lmgen.reconciled"]
    assert after.data.tags["lmgen.pid"] == str(os.getpid())  # the run now names the process that finished it
    assert _step(ckpt) == 120


def test_a_second_sweep_of_a_point_in_training_leaves_its_run_alone(lmgen_home, tmp_path):
    """Two sweeps of one file: the second's point is refused while the first trains it, and the
    second sweep must not end the first's live run — which a third rerun would then resume while
    it still trains (one run trained by two processes). The run stays its owner's to the end."""
    import yaml

    from lmgen.cli import main

    long = [*SLOW, "train.max_steps=5000"]  # still training when the others come
    path = tmp_path / "race.yaml"
    path.write_text(yaml.safe_dump({"name": "race", "experiment": str(PIXELS), "overrides": long,
                                    "grid": {"seed": [0]}}))
    env = {**os.environ, "LMGEN_HOME": str(lmgen_home), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    first = subprocess.Popen([sys.executable, "-m", "lmgen", "sweep", str(path), "--no-plot"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_checkpoint(lmgen_home, first, timeout=240)
        assert main(["sweep", str(path), "--no-plot"]) == 1  # the second sweep: its point is refused
        client = MlflowClient(f"sqlite:///{lmgen_home / 'mlflow.db'}")
        experiment = client.get_experiment_by_name("race").experiment_id
        (run,) = client.search_runs([experiment], "tags.`lmgen.stage` = 'lm'")
        assert run.info.status == "RUNNING" and "lmgen.reconciled" not in run.data.tags  # left to its owner
        cfg = load_config(PIXELS, [*long, "tracking.experiment=race", "tracking.sweep=race", "tracking.run_name=seed=0"])
        with pytest.raises(RuntimeError, match="being trained right now"):
            run_experiment(cfg, resume=True)  # a third process cannot take it over either
        os.kill(int(run.data.tags["lmgen.pid"]), signal.SIGTERM)  # stop the owner: it ends its own run
        out, _ = first.communicate(timeout=240)
    finally:
        if first.poll() is None:
            first.kill()
    after = client.get_run(run.info.run_id)
    assert after.info.status == "KILLED" and "lmgen.reconciled" not in after.data.tags, out[-2000:]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "lm/train_loss")]
    assert sorted(steps) == list(range(len(steps)))  # one process trained it: every step once, none twice


def test_a_reused_pid_is_not_taken_for_the_runs_owner(lmgen_home):
    """Containers reuse small pids and hostnames: a run whose recorded owner pid now belongs to
    another process (a different start time) is abandoned, not live; its own process is live."""
    import socket

    from lmgen.tracking import Tracker, owner_tags

    tracker = Tracker(f"sqlite:///{lmgen_home / 'mlflow.db'}", "pids")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        own = {"lmgen.stage": "lm", "lmgen.host": socket.gethostname(), "lmgen.pid": str(sleeper.pid)}
        started = {**own, "lmgen.pid_start": Path(f"/proc/{sleeper.pid}/stat").read_text().rsplit(") ", 1)[1].split()[19]}
        live = tracker.start_run("live", started)
        reused = tracker.start_run("reused", {**own, "lmgen.pid_start": "1"})  # that pid, another process
        assert tracker.live_owner(live) == f"process {sleeper.pid} on {socket.gethostname()}"
        assert tracker.live_owner(reused) is None
        assert not tracker.end_if_abandoned(live, "KILLED") and tracker.status(live) == "RUNNING"
        assert tracker.reconcile({"lmgen.stage": "lm"}) == [reused] and tracker.status(reused) == "KILLED"
    finally:
        sleeper.kill()
        sleeper.wait()
    assert owner_tags()["lmgen.pid_start"]  # every run records its process's start


def _sweep(home: Path, path: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "LMGEN_HOME": str(home), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(out, "w") as stdout:  # a file: a pipe nobody reads could block the sweep
        return subprocess.Popen([sys.executable, "-m", "lmgen", "sweep", str(path), "--no-plot"], env=env,
                                stdout=stdout, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_until_gone(pids: set[int], timeout: float = 60.0) -> set[int]:
    deadline = time.monotonic() + timeout
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive(pids)


def test_a_stopped_sweep_stops_its_points_leaves_nothing_running_and_a_rerun_finishes(lmgen_home, tmp_path):
    """SIGTERM to `lmgen sweep` (not to its points): the running point checkpoints and ends
    KILLED, the next never starts, the parent run ends KILLED and the sweep exits 143. SIGKILL,
    which the sweep cannot pass on, still takes its point down (the kernel's parent-death
    signal). Then a rerun resumes the killed run and finishes every point, each step once."""
    import yaml

    from lmgen.cli import main

    path = tmp_path / "stop.yaml"
    path.write_text(yaml.safe_dump({"name": "stop", "experiment": str(PIXELS), "max_parallel": 1, "overrides": SLOW,
                                    "zip": [{"seed": [0, 1], "train.max_steps": [150, 10]}]}))
    client = MlflowClient(f"sqlite:///{lmgen_home / 'mlflow.db'}")
    out = tmp_path / "sweep.out"
    sweep = _sweep(lmgen_home, path, out)
    try:
        _wait_for_checkpoint(lmgen_home, sweep, timeout=240)
        points = descendants(sweep.pid)
        assert points, "no point process under the sweep"
        sweep.send_signal(signal.SIGTERM)
        assert sweep.wait(timeout=180) == 143, out.read_text()[-3000:]
        assert not _wait_until_gone(points), "a point outlived its stopped sweep"
        text = out.read_text()
        assert "started seed=0," in text and "started seed=1," not in text and "NOT STARTED" in text, text[-3000:]
        experiment = client.get_experiment_by_name("stop").experiment_id
        runs = client.search_runs([experiment])
        assert "RUNNING" not in {r.info.status for r in runs}
        assert {(r.data.tags["lmgen.stage"], r.info.status) for r in runs
                if r.data.tags["lmgen.stage"] != "tokenizer"} == {("sweep", "KILLED"), ("lm", "KILLED")}
        (killed,) = [r for r in runs if r.data.tags["lmgen.stage"] == "lm"]

        sweep = _sweep(lmgen_home, path, out)  # the rerun, SIGKILLed this time: nothing can be forwarded
        deadline = time.monotonic() + 240
        while client.get_run(killed.info.run_id).info.status != "RUNNING" and time.monotonic() < deadline:
            assert sweep.poll() is None, out.read_text()[-3000:]
            time.sleep(0.05)
        points = descendants(sweep.pid)  # resuming, with well over 100 steps to go
        sweep.send_signal(signal.SIGKILL)
        sweep.wait(timeout=30)
        assert not _wait_until_gone(points), "a point outlived its SIGKILLed sweep"
        assert client.get_run(killed.info.run_id).info.status == "KILLED"  # the point ended its own run
    finally:
        for pid in [sweep.pid, *descendants(sweep.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    assert main(["sweep", str(path), "--no-plot"]) == 0  # the rerun resumes it and runs the other point
    runs = client.search_runs([experiment], "tags.`lmgen.stage` = 'lm'")
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"] and killed.info.run_id in {
        r.info.run_id for r in runs}
    steps = [m.step for m in client.get_metric_history(killed.info.run_id, "lm/train_loss")]
    assert sorted(steps) == list(range(150))  # stopped twice, resumed twice: every step once
