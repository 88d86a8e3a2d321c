"""What a run needs from $LMGEN_HOME and the machine, proved on the real thing (issue 24, items
8-10): two processes opening a fresh home's tracking store at once, names that would escape
the home, a home that cannot be written, a disk that fills up, input paths that do not exist.

A read-only home and a full disk are real: a read-only or tiny tmpfs mounted for the test
where this process may mount one (root with CAP_SYS_ADMIN; a read-only home is also a folder
without write permission for anyone else), else the test is skipped.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from lmgen.tracking import Tracker, resolve_tracking_uri

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
