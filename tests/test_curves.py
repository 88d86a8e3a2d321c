"""Generation learning curves (``metrics.curve_samples``, ``lmgen.curves``): scored at every
validation, logged at its step, and free of side effects on training."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from lmgen.cli import main

BASE = str(Path(__file__).resolve().parents[1] / "experiments/base.yaml")
TINY = ["tokenizer=pixels_palette64", "data.train_size=48", "data.val_size=16", "data.image_size=16", "lm.size=nano",
        "train.budget=steps", "train.max_steps=6", "train.val_every=4", "train.batch_size=8", "train.warmup_steps=2",
        "sample.num_samples=10", "sample.batch_size=10", "metrics.prefix_samples=0", "train.log_every=1",
        "metrics.bootstrap_resamples=20"]


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_curves_are_scored_at_every_validation_and_leave_training_unchanged(lmgen_home):
    assert main(["run", BASE, *TINY, "metrics.curve_samples=20", "name=with"]) == 0
    assert main(["run", BASE, *TINY, "name=without"]) == 0
    client = MlflowClient(f"sqlite:///{lmgen_home / 'mlflow.db'}")
    runs = {name: client.search_runs([client.get_experiment_by_name(name).experiment_id],
                                     "tags.`lmgen.stage` = 'lm'")[0] for name in ("with", "without")}
    with_id, without_id = runs["with"].info.run_id, runs["without"].info.run_id
    # validations at step 4 and at the end (6): a curve point at each, images seen = steps × batch
    assert _history(client, with_id, "curve/images_seen") == [(4, 32.0), (6, 48.0)]
    accuracy = _history(client, with_id, "curve/class_accuracy")
    low, high = _history(client, with_id, "curve/class_accuracy_ci_low"), _history(client, with_id,
                                                                                   "curve/class_accuracy_ci_high")
    assert [s for s, _ in accuracy] == [4, 6]
    assert all(0 <= lo <= a <= hi <= 1 for (_, a), (_, lo), (_, hi) in zip(accuracy, low, high))
    fd = _history(client, with_id, "curve/fd_probe")
    fd_low, fd_high = (_history(client, with_id, f"curve/fd_probe_ci_{end}") for end in ("low", "high"))
    assert [s for s, _ in fd] == [4, 6] and all(lo <= v <= hi for (_, v), (_, lo), (_, hi) in zip(fd, fd_low, fd_high))
    assert [v for _, v in _history(client, with_id, "curve/decode_valid_rate")] == [1.0, 1.0]  # pixels always decode
    # what the class token is worth, at the curve's steps (gen_curves draws it against images seen)
    label_bits = _history(client, with_id, "curve/label_bits")
    assert [s for s, _ in label_bits] == [4, 6]
    assert [v for _, v in label_bits] == [v for _, v in _history(client, with_id, "lm/val_label_bits")]
    assert not _history(client, without_id, "curve/class_accuracy")
    # sampling for the curve drew from its own RNG: the same training, loss for loss, and the same final samples
    for key in ("lm/train_loss", "lm/val_loss"):
        assert _history(client, with_id, key) == _history(client, without_id, key), key
    for key in ("gen/fd_probe", "gen/class_accuracy"):  # reference statistics cached or not: float noise at most
        assert runs["with"].data.metrics[key] == pytest.approx(runs["without"].data.metrics[key], rel=1e-5), key
    assert runs["with"].data.params["metrics.curve_samples"] == "20"


def test_curves_need_a_class_conditional_model_and_the_probe(lmgen_home, capsys):
    for off in ("metrics.probe=false", "lm.class_conditional=false"):
        assert main(["run", BASE, *TINY, "metrics.curve_samples=8", off]) == 2  # before any compute
        assert "metrics.curve_samples needs the probe" in capsys.readouterr().err
    assert not (lmgen_home / "mlflow.db").exists()
