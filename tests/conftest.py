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


# Flags for headless Chromium on a machine with a closed network: without the background-
# networking ones it tries (and fails) to reach Google's hosts at every start.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def browser():
    """A real headless Chromium (Debian's ``chromium``) driven by Playwright; the test fails, not
    skips, where it is missing: ``.ci/run`` and the README's test command install it."""
    import shutil

    from playwright.sync_api import sync_playwright

    executable = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    assert executable, "no Chromium on PATH: install it (apt-get install chromium), as the README's test command does"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()
