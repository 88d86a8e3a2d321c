"""Regenerate the README's screenshots from a finished quickstart, in headless Chromium:

    LMGEN_HOME=lmgen-runs .venv/bin/python docs/screenshots/take.py lmgen-runs quickstart docs/screenshots

Starts ``lmgen ui`` on the store, opens the runs table (sweep expanded, Description and four
metric columns picked), the compare view of the LM runs (axes picked) and ``report.html``, and
stops the server. The clicks follow MLflow 3.17's UI; another version may need new selectors.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from mlflow.tracking import MlflowClient
from playwright.sync_api import Page, sync_playwright

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PORT = 5079
TABLE_COLUMNS = ["Models", "gen/fd_probe", "gen/class_accuracy", "lm/val_bits_per_image", "tok/bits_per_image",
                 "Description"]  # Models off, the rest on
COMPARE_AXES = (["preset.tokenizer", "resolved.tokens"], ["tok/bits_per_image", "lm/val_bits_per_image", "gen/fd_probe"])


def _close_assistant(page: Page) -> None:
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()
        page.wait_for_timeout(800)


def _runs_table(page: Page, url: str, sweep: str, out: Path) -> None:
    page.goto(url + "&searchFilter=" + urllib.parse.quote("tags.`lmgen.stage` = 'lm'"))
    page.wait_for_timeout(8000)
    _close_assistant(page)
    box = page.get_by_text(f"sweep-{sweep}", exact=True).first.bounding_box()
    page.mouse.click(box["x"] - 28, box["y"] + box["height"] / 2)  # the parent run's expand toggle
    page.wait_for_timeout(2000)
    page.get_by_text("Columns", exact=True).first.click()
    for column in TABLE_COLUMNS:
        page.get_by_placeholder("Search columns").fill(column)
        page.wait_for_timeout(800)
        matches = page.get_by_text(column, exact=True)  # a metric: its highlighted name, first; an attribute: last
        (matches.first if "/" in column else matches.last).click()
        page.wait_for_timeout(500)
    page.keyboard.press("Escape")
    page.wait_for_timeout(1000)
    page.screenshot(path=out / "mlflow_runs_table.png")


def _compare(page: Page, url: str, out: Path) -> None:
    page.goto(url)
    page.wait_for_timeout(8000)
    _close_assistant(page)
    page.get_by_text("Clear All", exact=True).click()
    selects = page.locator("[role=combobox]")
    for i, keys in enumerate(COMPARE_AXES):  # parameters, then metrics
        for key in keys:
            selects.nth(i).click()
            page.keyboard.type(key)
            page.wait_for_timeout(600)
            page.keyboard.press("Enter")
            page.wait_for_timeout(600)
        page.keyboard.press("Escape")
    page.wait_for_timeout(1500)
    page.screenshot(path=out / "mlflow_compare.png")


def main(home: str, experiment: str, out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(f"sqlite:///{home}/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    lm_runs = [r.info.run_id for r in client.search_runs([exp.experiment_id], "tags.`lmgen.stage` = 'lm'")]
    ui = subprocess.Popen([sys.executable, "-m", "lmgen", "ui", "--port", str(PORT), "--experiment", experiment],
                          env={**os.environ, "LMGEN_HOME": home}, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        site = f"http://127.0.0.1:{PORT}/#"
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 2200, "height": 760})
            _runs_table(page, f"{site}/experiments/{exp.experiment_id}/runs?workflowType=machine_learning",
                        experiment, out)
            _compare(page, f"{site}/compare-runs?runs={json.dumps(lm_runs)}&experiments={json.dumps([exp.experiment_id])}",
                     out)
            page.goto(f"file://{home}/reports/{experiment}/report.html")
            page.wait_for_timeout(1500)
            page.screenshot(path=out / "report_html.png")
            browser.close()
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(30)


if __name__ == "__main__":
    main(*sys.argv[1:4])
