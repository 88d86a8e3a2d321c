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

import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import submitit

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_MIN = 24 * 60

Launch = Callable[[list[tuple[str, list[str], Path]]], dict[str, int]]


def run_command(argv: Sequence[str]) -> list[str]:
    """The command line of ``lmgen run --resume`` with ``argv`` in a fresh interpreter."""
    return [sys.executable, "-m", "lmgen", "run", "--resume", *argv]


def run_point_process(argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> int:
    """Run one point as ``lmgen run --resume`` in its own process; stdout/stderr go to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(run_command(argv))}\n".encode())
        out.flush()
        return subprocess.call(run_command(argv), stdout=out, stderr=subprocess.STDOUT, env=env)


def local_launcher(max_parallel: int) -> Launch:
    """At most ``max_parallel`` points at once, each a subprocess; returns exit codes by point.

    Points side by side share the cores: each gets ``cpu_count // max_parallel`` intra-op threads
    (``OMP_NUM_THREADS``, unless the caller set it), since oversubscribed BLAS threads make the
    whole sweep several times slower than running the points one by one.
    """
    env = os.environ.copy()
    if max_parallel > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max_parallel))

    def launch(jobs: list[tuple[str, list[str], Path]]) -> dict[str, int]:
        with ThreadPoolExecutor(max_workers=max_parallel) as pool:
            codes = pool.map(lambda job: run_point_process(job[1], job[2], env), jobs)
            return {name: code for (name, _, _), code in zip(jobs, codes, strict=True)}

    return launch


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

    def launch(jobs: list[tuple[str, list[str], Path]]) -> dict[str, int]:
        kwargs = {"slurm_max_num_timeout": int(slurm["max_num_timeout"])} if slurm.get("max_num_timeout") else {}
        executor = submitit.AutoExecutor(folder=folder, cluster=None if cluster == "slurm" else cluster, **kwargs)
        executor.update_parameters(**executor_parameters(slurm))
        with executor.batch():
            submitted = [executor.submit(PointJob(argv, log_path)) for _, argv, log_path in jobs]
        codes = {}
        for (name, _, _), job in zip(jobs, submitted, strict=True):
            try:
                codes[name] = int(job.result())
            except Exception as err:  # submitit's FailedJobError / UncompletedJobError: the point failed
                log.error("sweep point %s (job %s) failed: %s", name, job.job_id, err)
                codes[name] = 1
        return codes

    return launch
