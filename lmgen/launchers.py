"""How sweep points run: ``local_launcher`` (processes on this machine) and ``slurm_launcher``
(one job per point, a job array, through submitit).

A launcher takes ``(point name, lmgen run argv, log path)`` jobs and returns each point's exit
code; every point runs as ``lmgen run --resume`` in a fresh interpreter (``run_point_process``).

The SLURM launcher:

Each job runs the point as ``lmgen run --resume`` in a fresh interpreter, so a job that is
preempted or runs out of time is requeued (submitit's ``Checkpointable``) and the rerun
resumes from the run's ``last.ckpt``. GPUs, nodes and time come from the sweep file's
``slurm`` block; ``tasks_per_node`` = ``gpus_per_node`` so Lightning's SLURM environment gives
one rank per GPU. ``cluster="local"`` runs the same jobs through submitit's local executor
(subprocesses on this machine): how the plumbing is tested without a cluster.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import submitit

from lmgen.processes import PARENT_ENV, child_env

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_MIN = 24 * 60

Launch = Callable[..., dict[str, int]]  # (jobs, events) -> exit code by point


class PointEvents:
    """What a launcher reports as it goes: a point started (with its log), a point ended (its
    exit code; None where the launcher could not tell). The default reports nothing."""

    def started(self, name: str, log_path: Path) -> None:
        pass

    def ended(self, name: str, code: int | None) -> None:
        pass


def run_command(argv: Sequence[str]) -> list[str]:
    """The command line of ``lmgen run --resume`` with ``argv`` in a fresh interpreter."""
    return [sys.executable, "-m", "lmgen", "run", "--resume", *argv]


def _header(argv: Sequence[str]) -> bytes:
    return f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(run_command(argv))}\n".encode()


def run_point_process(argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> int:
    """Run one point as ``lmgen run --resume`` in its own process; stdout/stderr go to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        out.write(_header(argv))
        out.flush()
        env = {k: v for k, v in (os.environ if env is None else env).items() if k != PARENT_ENV}  # a job outlives us
        return subprocess.call(run_command(argv), stdout=out, stderr=subprocess.STDOUT, env=env)


class LocalLauncher:
    """At most ``max_parallel`` points at once, each ``lmgen run --resume`` in a process of its
    own; returns exit codes by point (a point never started has none).

    Points side by side share the cores: each gets ``cpu_count // max_parallel`` intra-op threads
    (``OMP_NUM_THREADS``, unless the caller set it), since oversubscribed BLAS threads make the
    whole sweep several times slower than running the points one by one.

    ``stop()`` (the sweep got SIGTERM or Ctrl-C) starts no more points and passes SIGTERM to the
    running ones, which finish their step, write their checkpoint and end their runs KILLED, as
    ``lmgen run`` does; ``stop(force=True)`` (a second signal) SIGKILLs them. Each point runs in
    a session of its own, so a terminal's Ctrl-C reaches it only this way, and ends itself
    should the sweep die without a word (``lmgen.processes.die_with_parent``).
    """

    def __init__(self, max_parallel: int) -> None:
        self.max_parallel = max(1, max_parallel)
        env = os.environ.copy()
        if self.max_parallel > 1 and "OMP_NUM_THREADS" not in env:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.max_parallel))
        self.env = child_env(env)
        self.stopped = False
        self._running: dict[str, subprocess.Popen] = {}
        self._lock = threading.RLock()

    def _start(self, argv: Sequence[str], log_path: Path) -> subprocess.Popen:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as out:
            out.write(_header(argv))
            out.flush()
            return subprocess.Popen(run_command(argv), stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                    start_new_session=True)

    def _run(self, job: tuple[str, list[str], Path], events: PointEvents) -> int | None:
        name, argv, log_path = job
        with self._lock:
            if self.stopped:
                return None
            proc = self._running[name] = self._start(argv, log_path)
        events.started(name, log_path)
        code = proc.wait()
        with self._lock:
            del self._running[name]
        events.ended(name, code)
        return code

    def __call__(self, jobs: list[tuple[str, list[str], Path]], events: PointEvents | None = None) -> dict[str, int]:
        events = events or PointEvents()
        with ThreadPoolExecutor(max_workers=self.max_parallel) as pool:
            codes = pool.map(lambda job: self._run(job, events), jobs)
            return {name: code for (name, _, _), code in zip(jobs, codes, strict=True) if code is not None}

    def stop(self, force: bool = False) -> None:
        with self._lock:
            self.stopped = True
            running = list(self._running.values())
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL if force else signal.SIGTERM)


def local_launcher(max_parallel: int) -> LocalLauncher:
    """``LocalLauncher(max_parallel)``."""
    return LocalLauncher(max_parallel)


class PointJob(submitit.helpers.Checkpointable):
    """One sweep point as a submitit job. On preemption or timeout submitit calls ``checkpoint``,
    which (``Checkpointable``'s default) resubmits this same call: ``--resume`` continues the run."""

    def __init__(self, argv: list[str], log_path: Path) -> None:
        self.argv, self.log_path = list(argv), Path(log_path)

    def __call__(self) -> int:
        return run_point_process(self.argv, self.log_path)


def executor_parameters(slurm: dict[str, Any]) -> dict[str, Any]:
    """submitit ``update_parameters`` keywords from a sweep file's ``slurm`` block."""
    gpus = int(slurm.get("gpus_per_node") or 0)
    params: dict[str, Any] = {"timeout_min": int(slurm.get("timeout_min") or DEFAULT_TIMEOUT_MIN),
                              "nodes": int(slurm.get("nodes") or 1), "tasks_per_node": max(gpus, 1)}
    if gpus:
        params["gpus_per_node"] = gpus
    for ours, theirs in (("cpus_per_task", "cpus_per_task"), ("mem_gb", "mem_gb"), ("partition", "slurm_partition"),
                         ("account", "slurm_account"), ("constraint", "slurm_constraint")):
        if slurm.get(ours) is not None:
            params[theirs] = slurm[ours]
    return params


def slurm_launcher(slurm: dict[str, Any], folder: Path, cluster: str = "slurm") -> Launch:
    """A launcher submitting every point as one job of a job array; waits for all and returns
    exit codes by point (a job that failed in SLURM counts as exit code 1)."""

    def launch(jobs: list[tuple[str, list[str], Path]], events: PointEvents | None = None) -> dict[str, int]:
        events = events or PointEvents()
        kwargs = {"slurm_max_num_timeout": int(slurm["max_num_timeout"])} if slurm.get("max_num_timeout") else {}
        executor = submitit.AutoExecutor(folder=folder, cluster=None if cluster == "slurm" else cluster, **kwargs)
        executor.update_parameters(**executor_parameters(slurm))
        with executor.batch():
            submitted = [executor.submit(PointJob(argv, log_path)) for _, argv, log_path in jobs]
        for name, _, log_path in jobs:
            events.started(name, log_path)  # submitted: queued or running, as SLURM decides
        codes = {}
        for (name, _, _), job in zip(jobs, submitted, strict=True):
            try:
                codes[name] = int(job.result())
            except Exception as err:  # submitit's FailedJobError / UncompletedJobError: the point failed
                log.error("sweep point %s (job %s) failed: %s", name, job.job_id, err)
                codes[name] = 1
            events.ended(name, codes[name])
        return codes

    return launch
