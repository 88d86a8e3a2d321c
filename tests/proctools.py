"""Real processes for tests: the process table (which processes a test started, which still run,
read from /proc) and a real ``mlflow server``."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def _processes() -> dict[int, tuple[int, str]]:
    """pid → (parent pid, state) of every process now, from /proc."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone while we looked
            continue
        found[int(stat.parent.name)] = (int(fields[1]), fields[0])
    return found


def descendants(pid: int) -> set[int]:
    table, found, todo = _processes(), set(), [pid]
    while todo:
        parent = todo.pop()
        children = [p for p, (ppid, _) in table.items() if ppid == parent and p not in found]
        found.update(children)
        todo += children
    return found


def alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` still running (zombies do not count)."""
    table = _processes()
    return {p for p in pids if p in table and table[p][1] != "Z"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(folder: Path, port: int, timeout: float = 120.0) -> subprocess.Popen:
    """A real ``mlflow server`` on 127.0.0.1:``port`` with its store (``server.db``) and artifacts
    in ``folder``, in a process group of its own; returns once /health answers."""
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{folder / 'server.db'}", "--artifacts-destination",
         str(folder / "server-artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                if reply.status == 200:
                    return server
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                stop_mlflow_server(server)
                raise RuntimeError("mlflow server did not come up") from None
            time.sleep(0.5)


def stop_mlflow_server(server: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop the server's whole process group (its workers too) and wait for it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, sig)
    server.wait(timeout=30)
