"""Preemption and hard kills, with real processes and real signals.

SIGTERM (what SLURM, Kubernetes and `kill` send) during training: the step finishes, last.ckpt
is written, the MLflow run ends KILLED (never FINISHED, never left RUNNING) and the process
exits 143; `lmgen run --resume` (what a sweep rerun runs per point) continues it. SIGKILL
cannot be caught: the run is left RUNNING, and the next rerun reconciles it (its process is
gone) before resuming — while a run whose process is alive is never taken over.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

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
