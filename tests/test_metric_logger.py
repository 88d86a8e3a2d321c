"""The LM's metric logger against a store that does not answer: nothing raises into training,
nothing is lost — kept in memory and on disk, sent later with its own steps, by this process or
by the one that resumes the run."""

from __future__ import annotations

import time

from mlflow.tracking import MlflowClient

from lmgen.tracking import MlflowMetricLogger, Tracker


def test_values_a_dead_store_refused_are_kept_on_disk_and_sent_by_the_next_logger(lmgen_home, tmp_path, monkeypatch):
    uri = f"sqlite:///{lmgen_home / 'mlflow.db'}"
    lmgen_home.mkdir(parents=True)
    tracker = Tracker(uri, "outage")
    run_id = tracker.start_run("r", {"lmgen.stage": "lm"})
    spill = tmp_path / "ckpt" / "pending_metrics.jsonl"
    dead = Tracker(uri, "outage")
    dead.client = MlflowClient("http://127.0.0.1:9")  # nothing listens on the discard port: refused at once
    logger = MlflowMetricLogger(dead, run_id, spill, retry_every=3600)
    start = time.perf_counter()
    for step in range(5):
        logger.log_metrics({"lm/train_loss": 1.0 / (step + 1), "epoch": 0}, step=step)
    assert time.perf_counter() - start < 10  # one quick try, then kept until the next retry is due
    assert len(logger.pending) == 5 and len(spill.read_text().splitlines()) == 5
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # "full" retries, shortened for the test
    logger.finalize("success")  # still refused: the values stay on disk
    assert spill.is_file()
    assert tracker.client.get_metric_history(run_id, "lm/train_loss") == []

    resumed = MlflowMetricLogger(tracker, run_id, spill)  # the process that resumes the run
    resumed.log_metrics({"lm/train_loss": 0.1}, step=5)
    history = tracker.client.get_metric_history(run_id, "lm/train_loss")
    assert sorted((m.step, round(m.value, 3)) for m in history) == [(0, 1.0), (1, 0.5), (2, 0.333), (3, 0.25),
                                                                     (4, 0.2), (5, 0.1)]
    assert not spill.exists() and "epoch" not in tracker.client.get_run(run_id).data.metrics
