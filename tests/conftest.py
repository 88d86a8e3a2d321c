"""Shared fixtures: an isolated LMGEN_HOME/MLflow store per test, one torch thread."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # Tests are small: one intra-op thread avoids oversubscription on a 2-core CI box.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture()
def lmgen_home(tmp_path, monkeypatch):
    """A fresh $LMGEN_HOME (SQLite store + caches) with no outside tracking server."""
    home = tmp_path / "lmgen-home"
    monkeypatch.setenv("LMGEN_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return home


def pytest_configure(config):
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")  # mlflow imports gitpython
