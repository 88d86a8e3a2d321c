"""`lmgen run` end to end on tiny configs: a real MLflow store, real training, real decoding."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from proctools import alive, descendants

from lmgen.cli import main

ROOT = Path(__file__).resolve().parents[1]
BASE = str(ROOT / "experiments/base.yaml")
VIDEO = str(ROOT / "experiments/video.yaml")
TINY = ["data.train_size=48", "data.val_size=16", "data.image_size=16", "lm.size=nano", "train.budget=steps",
        "train.max_steps=6", "train.val_every=4", "train.batch_size=8", "train.warmup_steps=2", "sample.num_samples=10",
        "sample.batch_size=10", "train.log_every=1"]
LM_KEYS = {"lm/train_loss", "lm/val_loss", "lm/val_bits_per_image", "lm/val_label_bits", "lm/params", "lm/flops",
           "lm/tokens_per_s", "lm/mfu", "lm/peak_flops", "lm/train_seconds"}
TOK_KEYS = {"tok/tokens_per_image", "tok/bits_per_image", "tok/psnr", "tok/ssim"}
GEN_KEYS = {"gen/decode_valid_rate", "gen/num_invalid", "gen/images_per_s"}
PROBE_KEYS = {"gen/fd_probe", "gen/precision_probe", "gen/recall_probe", "tok/rfid_probe", "tok/class_accuracy"}


def _runs(home: Path, experiment: str = "base"):
    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id])


def _artifacts(client: MlflowClient, run_id: str) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id)}


# Stage 1 of the learned tokenizers, cut to a few steps of a narrow autoencoder (the shared
# recipe: codec and pixel arms ignore it).
LEARNED_TINY = ["stage1.steps=4", "stage1.channels=8", "stage1.batch_size=8", "stage1.val_every=2",
                "stage1.val_images=8"]
LEARNED = ("vq_1k", "lfq_10bit", "bae_16bit", "crt_vq_1k", "causal1d_32")


@pytest.mark.parametrize("preset", ["pixels_palette64", "jpeg_q25", *LEARNED])
def test_lmgen_run_writes_a_complete_mlflow_run(lmgen_home, preset, capsys):
    extra = LEARNED_TINY if preset in LEARNED else []
    if preset == "causal1d_32":  # 16 px at downsample 4: 16 feature positions for its pooled queries
        extra = [*extra, "tokenizer.num_tokens=16"]
    assert main(["run", BASE, f"tokenizer={preset}", *TINY, *extra]) == 0
    assert "lm/val_bits_per_image" in capsys.readouterr().out  # the one-screen summary
    client, runs = _runs(lmgen_home)
    lm = [r for r in runs if r.data.tags["lmgen.stage"] == "lm"]
    tok = [r for r in runs if r.data.tags["lmgen.stage"] == "tokenizer"]
    assert len(lm) == 1 and len(tok) == 1
    run = lm[0]
    assert run.info.status == "FINISHED"
    assert LM_KEYS | TOK_KEYS | GEN_KEYS <= set(run.data.metrics)
    assert run.data.metrics["lm/val_bits_per_image"] > 0
    assert 0.0 <= run.data.metrics["gen/decode_valid_rate"] <= 1.0
    assert run.data.params["tokenizer.name"] == run.data.tags["lmgen.tokenizer"]
    assert run.data.params["lm.size"] == "nano"
    _check_composition(run, preset)
    assert run.data.tags["lmgen.tokenizer_run_id"] == tok[0].info.run_id
    assert {"lmgen.git_sha", "lmgen.config_hash"} <= set(run.data.tags)
    assert {"config.yaml", "samples.png"} <= _artifacts(client, run.info.run_id)
    valid = round(run.data.metrics["gen/decode_valid_rate"] * 10)
    assert run.data.metrics["gen/num_invalid"] == 10 - valid  # counted, not replaced
    if valid >= 1:  # the probe scores decodable class-conditional samples, per class too
        assert "gen/class_accuracy" in run.data.metrics
        assert "per_class.csv" in _artifacts(client, run.info.run_id)
        rows = Path(client.download_artifacts(run.info.run_id, "per_class.csv")).read_text().splitlines()
        assert rows[0] == "class,name,train_frequency,num_samples,class_accuracy,fd_probe,num_reference"
    if valid >= 2:  # fidelity needs >= 2 decodable samples, and has this run's own bootstrap interval
        assert PROBE_KEYS <= set(run.data.metrics)
        assert _json(client, run.info.run_id, "gen_fidelity.json")["gen"]["reference"] == "val"  # how it was computed
        m = run.data.metrics
        for key in ("gen/fd_probe", "gen/kid_probe", "gen/precision_probe", "tok/rfid_probe"):
            assert m[f"{key}_ci_low"] <= m[f"{key}_ci_high"], key
        assert run.data.params["metrics.bootstrap_resamples"] == "200"
    if "gen/fid" not in run.data.metrics:  # offline: Inception skipped with a reason, never a crash
        assert "gen_metrics_skipped.json" in _artifacts(client, run.info.run_id)
    assert tok[0].info.status == "FINISHED" and TOK_KEYS <= set(tok[0].data.metrics)
    assert "recon.png" in _artifacts(client, tok[0].info.run_id)
    _check_run_page(client, run, tok[0])
    assert {"tok/codebook_usage", "tok/perplexity", "tok/unigram_kl_uniform", "tok/bigram_kl_uniform"} <= set(tok[0].data.metrics)
    if preset in LEARNED:  # trained by gradient: its curves are in the stage-1 run
        history = client.get_metric_history(tok[0].info.run_id, "tok/train_loss")
        assert len(history) >= 2 and "tok/val_psnr" in tok[0].data.metrics
        assert tok[0].data.params["tokenizer.steps"] == "4"  # the shared recipe, filled in
        assert tok[0].data.params["resolved.precision"] == "32-true"
    if preset == "crt_vq_1k":  # the regulariser's loss curve and cost sit in the stage-1 run
        assert len(client.get_metric_history(tok[0].info.run_id, "tok/crt_loss")) >= 2
        assert 0 < tok[0].data.metrics["tok/crt_flops_share"] < 1
    assert (lmgen_home / "checkpoints" / run.info.run_id / "last.ckpt").is_file()
    _check_position_loss(client, run)
    _check_prefix_completion(client, run)


def _check_composition(run, preset: str) -> None:
    """The preset the run was composed from, on the run and in its name; what its budget resolved to."""
    params = run.data.params
    assert params["preset.tokenizer"] == run.data.tags["lmgen.tokenizer_preset"] == preset
    assert run.info.run_name == f"{preset} · nano · s0"
    assert {"resolved.steps": "6", "resolved.images": "48", "resolved.precision": "32-true"}.items() <= params.items()
    assert float(params["resolved.flops"]) > 0 and float(params["resolved.tokens"]) > 0


def _json(client: MlflowClient, run_id: str, path: str):
    import json

    return json.loads(Path(client.download_artifacts(run_id, path)).read_text())


def _check_run_page(client: MlflowClient, run, tok) -> None:
    """How the runs read in the MLflow UI: curated params (what a researcher filters by, each setting
    once; the whole config in config.yaml), a description on both runs, the dataset, the source,
    the tables and image charts; the stage-1 run's description links the LM runs on its tokens."""
    import json
    import re
    from collections import Counter
    from urllib.parse import unquote

    import pandas as pd
    import yaml

    params, m = run.data.params, run.data.metrics
    assert len(params) <= 40, sorted(params)
    leaves = Counter((re.split(r"[./]", k)[-1], v) for k, v in params.items())
    assert [k for k, n in leaves.items() if n > 1] == []  # no setting twice (per prefix ratio, copies)
    assert all("/" not in k for k in params)  # one separator: dots
    config = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config.yaml")).read_text())
    assert config["train"]["warmup_steps"] == 2 and "train.warmup_steps" not in params  # not a param, not lost
    assert not any(k.startswith("data/") for k in run.data.metrics)  # on the stage-1 run: gen/* opens the charts
    note, tok_note = run.data.tags["mlflow.note.content"], tok.data.tags["mlflow.note.content"]
    headline = note.splitlines()[0]  # what the Description column shows: the finished run's headline
    assert " · nano (" in headline and "bits/image" in headline and ("FD probe" in headline) == ("gen/fd_probe" in m)
    assert f"runs/{tok.info.run_id}?" in note and "Budget" in note and "48 images" in note  # stage 1 linked
    assert "Results" in note and "written here when" not in note
    assert "lmgen.tokenizer_run_id" in unquote(tok_note) and tok.info.run_id in tok_note  # its LM runs, linked
    assert tok_note.startswith("Stage 1 of") and "Reconstruction" in tok_note
    for r in (run, tok):
        splits = {i.tags[0].value: i.dataset for i in r.inputs.dataset_inputs}
        assert sorted(splits) == ["training", "validation"] and {d.name for d in splits.values()} == {"shapes32"}
        assert len(splits["training"].digest) == 16 != splits["validation"].digest  # the splits' fingerprints
        assert r.data.tags["mlflow.source.name"] == "lmgen run base" and r.data.tags["mlflow.source.type"] == "LOCAL"
    assert run.data.tags["mlflow.source.git.commit"] in run.data.tags["lmgen.git_sha"]
    if "gen_fidelity.json" in _artifacts(client, run.info.run_id):  # the feature space, once, as a param
        assert params["eval.probe"] == _json(client, run.info.run_id, "gen_fidelity.json")["gen"]["probe.space_id"]
    tables = {t["path"] for t in json.loads(run.data.tags["mlflow.loggedArtifacts"]) if t["type"] == "table"}
    for table in ("val_loss_per_position", "per_class"):  # the CSVs analysis reads, also as MLflow tables
        if f"{table}.csv" in _artifacts(client, run.info.run_id):  # (client.load_table searches the global store)
            assert f"{table}.json" in tables
            csv = pd.read_csv(client.download_artifacts(run.info.run_id, f"{table}.csv"))
            assert _json(client, run.info.run_id, f"{table}.json")["columns"] == list(csv.columns)
    images = {Path(a.path).name.split("+")[0] for a in client.list_artifacts(run.info.run_id, "images")}
    assert "gen~samples" in images and run.data.tags["mlflow.loggedImages"] == "True"


PREFIX_KEYS = [f"gen/prefix_r{p}/{k}" for p in (25, 50, 75) for k in ("decode_valid_rate", "num_invalid")]


def _check_prefix_completion(client: MlflowClient, run, originals: int = 16) -> None:
    """Every ratio completed and counted — or skipped with the tokenizer's reason (16-px JPEG
    has a single MCU row of 4:2:0 patches: nothing to cut between)."""
    import json

    metrics, artifacts = run.data.metrics, _artifacts(client, run.info.run_id)
    skipped = {}
    if "gen_prefix_skipped.json" in artifacts:
        skipped = json.loads(Path(client.download_artifacts(run.info.run_id, "gen_prefix_skipped.json")).read_text())
    for p in (25, 50, 75):
        key = f"gen/prefix_r{p}"
        if f"{key}/*" in skipped:
            assert "rows" in skipped[f"{key}/*"] or "restart" in skipped[f"{key}/*"]
            continue
        assert {f"{key}/decode_valid_rate", f"{key}/num_invalid", f"{key}/prompt_fraction"} <= set(metrics)
        if metrics[f"{key}/decode_valid_rate"] * originals >= 2:  # TINY: 16 val images completed, FD against them
            assert f"{key}/fd_probe" in metrics
            assert _json(client, run.info.run_id, "gen_prefix_fidelity.json")[key]["reference"] == "prefix originals"
        if f"{key}/fid" not in metrics:  # offline: Inception skipped with its reason (or nothing to score)
            assert "Inception" in skipped.get(f"{key}/fid", "") or "decodable" in skipped[f"{key}/fd_probe"]
        assert "prefix_completion.png" in artifacts
    assert metrics["gen/eval_seconds"] > 0


def _check_position_loss(client: MlflowClient, run) -> None:
    """val_loss_per_position.csv: the final validation's per-position loss adds up to lm/val_bits_per_image."""
    path = Path(client.download_artifacts(run.info.run_id, "val_loss_per_position.csv"))
    rows = [line.split(",") for line in path.read_text().splitlines()]
    assert rows[0] == ["step", "position", "loss_nats", "bits", "count"]
    last = max(int(r[0]) for r in rows[1:])
    final = [r for r in rows[1:] if int(r[0]) == last and r[2]]
    assert [int(r[1]) for r in final] == list(range(len(final)))
    images = int(final[0][4])  # every val sequence has a first token
    bits = sum(float(r[3]) * int(r[4]) for r in final) / images
    assert bits == pytest.approx(run.data.metrics["lm/val_bits_per_image"], rel=1e-4)


@pytest.mark.parametrize("preset", ["jpeg_q25", "bae_16bit"])
def test_second_run_reuses_stage1_and_token_cache(lmgen_home, preset):
    extra = [f"tokenizer={preset}", *TINY, *LEARNED_TINY]
    experiment = BASE
    assert main(["run", experiment, *extra]) == 0
    caches = sorted(p.name for p in (lmgen_home / "cache").iterdir())
    # The second run also samples with classifier-free guidance (null-class rows in one batch)
    # and, for sub-code tokenizers, concatenated sub-code embeddings.
    assert main(["run", experiment, *extra, "seed=1", "train.max_steps=2", "sample.cfg_scale=2.0",
                 "sample.cfg_schedule=linear", "lm.subcode_embed=concat"]) == 0
    assert sorted(p.name for p in (lmgen_home / "cache").iterdir()) == caches
    _, runs = _runs(lmgen_home)
    lm = [r for r in runs if r.data.tags["lmgen.stage"] == "lm"]
    assert len(lm) == 2 and len({r.data.tags["lmgen.tokenizer_run_id"] for r in lm}) == 1
    assert sum(r.data.tags["lmgen.stage"] == "tokenizer" for r in runs) == 1


def test_a_crash_marks_the_run_failed(lmgen_home, monkeypatch):
    import lmgen.experiment

    def boom(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(lmgen.experiment, "evaluate_model", boom)
    with pytest.raises(RuntimeError, match="injected"):
        main(["run", BASE, "tokenizer=jpeg_q25", *TINY, "train.max_steps=1"])
    _, runs = _runs(lmgen_home)
    assert [r.info.status for r in runs if r.data.tags["lmgen.stage"] == "lm"] == ["FAILED"]


def test_console_script_reports_config_errors_before_compute(lmgen_home):
    proc = subprocess.run([sys.executable, "-m", "lmgen", "run", BASE, "tokenizer=jpeg_q25", "train.max_stpes=3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "train.max_stpes" in proc.stderr and "train.max_steps" in proc.stderr
    assert not (lmgen_home / "mlflow.db").exists()  # nothing ran, nothing was written


def test_unreachable_tracking_server_fails_fast_naming_the_uri(lmgen_home):
    import time

    from lmgen.config import load_config
    from lmgen.experiment import run_experiment

    cfg = load_config(BASE, ["tokenizer=jpeg_q25", *TINY, "tracking.uri=http://127.0.0.1:9"])
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match=r"http://127\.0\.0\.1:9"):
        run_experiment(cfg)
    assert time.perf_counter() - start < 30
    assert not (lmgen_home / "cache").exists()  # failed before any compute


def test_lmgen_ui_serves_the_store(lmgen_home):
    """`lmgen ui` starts a real MLflow server on the SQLite store and prints the runs table of
    the experiment updated last, in the model-training view its experiment kind tag selects."""
    import socket
    import time
    import urllib.request

    from lmgen.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING, Tracker

    tracker = Tracker(f"sqlite:///{lmgen_home / 'mlflow.db'}", "uiexp")
    assert MlflowClient(tracker.uri).get_experiment(tracker.experiment_id).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = lmgen_home / "ui.out"
    with open(out, "w") as stdout:  # a file, not a pipe: the server's own output never blocks it
        proc = subprocess.Popen([sys.executable, "-m", "lmgen", "ui", "--port", str(port)], stdout=stdout,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                    assert reply.status == 200
                    break
            except OSError:
                assert proc.poll() is None, "lmgen ui exited early"
                time.sleep(1)
        else:
            pytest.fail("lmgen ui did not answer within 90 s")
        assert (lmgen_home / "mlflow.db").exists()
        url = f"http://127.0.0.1:{port}/#/experiments/{tracker.experiment_id}/runs?workflowType=machine_learning"
        assert url in out.read_text().splitlines()[0]
        server = descendants(proc.pid)
        assert server, "no MLflow server process under lmgen ui"
        proc.send_signal(signal.SIGTERM)  # to lmgen alone, as `kill PID` sends it: the server goes with it
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        deadline = time.time() + 15
        while time.time() < deadline and alive(server):
            time.sleep(0.2)
        assert not alive(server), "the MLflow server outlived lmgen ui"
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
            pass  # the port is free again
    finally:  # whatever happened above, leave no server behind
        for pid in [proc.pid, *descendants(proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)


def test_imagefolder_run_skips_and_counts_corrupt_files(lmgen_home, tmp_path):
    """A real folder of PNGs with one corrupt file: the run finishes and reports data/skipped."""
    import numpy as np
    from PIL import Image

    root = tmp_path / "folder"
    rng = np.random.default_rng(0)
    for c in ("cats", "dogs"):
        (root / c).mkdir(parents=True)
        for i in range(12):
            base = np.full((20, 24, 3), rng.integers(0, 256, 3), dtype=np.uint8)
            Image.fromarray(base + rng.integers(0, 20, base.shape, dtype=np.uint8)).save(root / c / f"{i}.png")
    (root / "dogs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    args = ["run", BASE, "tokenizer=jpeg_q25", *TINY, "data.name=imagefolder",
            f"data.root={root}", "data.train_size=0", "data.val_size=0", "data.val_fraction=0.25"]
    assert main(args) == 0
    _, runs = _runs(lmgen_home)
    lm = next(r for r in runs if r.data.tags["lmgen.stage"] == "lm")
    assert lm.info.status == "FINISHED"
    tok = next(r for r in runs if r.data.tags["lmgen.stage"] == "tokenizer")
    assert tok.data.metrics["data/skipped"] == 1.0
    assert tok.data.metrics["data/train_items"] + 1 + 6 == 25  # 25 files: 1 corrupt, 6 in val
    assert "18 train items, 1 unreadable skipped" in lm.data.tags["mlflow.note.content"]  # said on the LM run
    assert lm.inputs.dataset_inputs[0].dataset.source_type == "local"  # the folder


def test_unconditional_model_with_cfg_off(lmgen_home):
    """lm.class_conditional=false: BOS at position 0, no label dropout, sampling still decodes."""
    args = ["run", BASE, "tokenizer=jpeg_q25", *TINY, "lm.class_conditional=false",
            "train.class_dropout=0.0", "sample.top_p=0.9"]
    assert main(args) == 0
    _, runs = _runs(lmgen_home)
    lm = next(r for r in runs if r.data.tags["lmgen.stage"] == "lm")
    assert lm.info.status == "FINISHED" and "gen/decode_valid_rate" in lm.data.metrics


def test_same_seed_same_run_whether_stage1_and_probe_were_cached(lmgen_home):
    """The first run trains the probe and fits stage 1; the second finds both cached. The LM
    must not notice: identical losses (CPU, same seed)."""
    experiment = BASE
    assert main(["run", experiment, "tokenizer=pixels_palette64", *TINY, "sample.num_samples=0"]) == 0
    assert main(["run", experiment, "tokenizer=pixels_palette64", *TINY, "sample.num_samples=0"]) == 0
    client, runs = _runs(lmgen_home)
    lm = [r for r in runs if r.data.tags["lmgen.stage"] == "lm"]
    histories = [[m.value for m in client.get_metric_history(r.info.run_id, "lm/train_loss")] for r in lm]
    assert len(histories) == 2 and len(histories[0]) == 6
    assert histories[0] == histories[1]
    assert lm[0].data.metrics["lm/val_bits_per_image"] == lm[1].data.metrics["lm/val_bits_per_image"]


def test_lmgen_eval_rescores_a_run_into_a_child_run(lmgen_home, capsys):
    """`lmgen eval RUN_ID` reloads the LM from last.ckpt and the tokenizer from stage 1, samples
    again with more samples, and logs into a child run; the original run is left as it was."""
    assert main(["run", BASE, "tokenizer=jpeg_q25", *TINY, "data.image_size=32", "sample.num_samples=4",
                 "metrics.prefix_samples=0"]) == 0
    client, runs = _runs(lmgen_home)
    (run,) = [r for r in runs if r.data.tags["lmgen.stage"] == "lm"]
    before = (dict(run.data.params), dict(run.data.metrics))
    assert "gen/prefix_r50/decode_valid_rate" not in run.data.metrics  # prefix completion was off

    assert main(["eval", run.info.run_id, "sample.num_samples=12", "metrics.prefix_samples=6",
                 "metrics.prefix_ratios=[0.5]"]) == 0
    assert "gen/decode_valid_rate" in capsys.readouterr().out
    client, runs = _runs(lmgen_home)
    (child,) = [r for r in runs if r.data.tags["lmgen.stage"] == "eval"]
    assert child.info.status == "FINISHED"
    assert child.data.tags["mlflow.parentRunId"] == run.info.run_id == child.data.tags["lmgen.eval_of"]
    assert child.data.tags["lmgen.tokenizer_hash"] == run.data.tags["lmgen.tokenizer_hash"]
    assert child.data.params["sample.num_samples"] == "12"
    assert child.data.metrics["gen/num_invalid"] + child.data.metrics["gen/decode_valid_rate"] * 12 == 12
    # 32-px JPEG has two 16-px MCU rows: r = 0.5 cuts after the first, at a restart marker
    assert "gen/prefix_r50/decode_valid_rate" in child.data.metrics
    assert child.data.metrics["lm/val_bits_per_image"] == run.data.metrics["lm/val_bits_per_image"]
    assert {"samples.png", "prefix_completion.png"} <= _artifacts(client, child.info.run_id)
    (again,) = [r for r in runs if r.info.run_id == run.info.run_id]
    assert (dict(again.data.params), dict(again.data.metrics)) == before
    assert sum(r.data.tags["lmgen.stage"] == "tokenizer" for r in runs) == 1  # stage 1 restored, not retrained
    assert child.data.tags["lmgen.scored_checkpoint"] == "last.ckpt (step 6)"  # what was scored, on the run
    last = lmgen_home / "checkpoints" / run.info.run_id / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # torn: the previous checkpoint (step 4) is scored, and says so
    assert main(["eval", run.info.run_id, "sample.num_samples=4", "metrics.prefix_samples=0", "seed=1"]) == 0
    client, runs = _runs(lmgen_home)
    torn = next(r for r in runs if r.data.tags.get("lmgen.stage") == "eval" and r.data.params["seed"] == "1")
    assert torn.data.tags["lmgen.scored_checkpoint"] == "last.prev.ckpt (step 4)"


def test_lmgen_eval_refuses_what_it_cannot_do(lmgen_home, capsys):
    experiment = BASE
    assert main(["run", experiment, "tokenizer=pixels_palette64", *TINY, "sample.num_samples=0",
                 "train.checkpoint=false", "tracking.log_weights=false"]) == 0  # weights nowhere
    _, runs = _runs(lmgen_home)
    (run,) = [r for r in runs if r.data.tags["lmgen.stage"] == "lm"]
    assert main(["eval", run.info.run_id]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["run", experiment, "tokenizer=pixels_palette64", *TINY, "sample.num_samples=0", "seed=3"]) == 0
    _, runs = _runs(lmgen_home)
    trained = next(r for r in runs if r.data.tags["lmgen.stage"] == "lm" and r.data.params["seed"] == "3")
    assert main(["eval", trained.info.run_id, "lm.size=micro"]) == 2  # would evaluate another model
    assert "overrides change lm" in capsys.readouterr().err
    assert main(["eval", "0123456789abcdef"]) == 2
    assert "no run" in capsys.readouterr().err
    MlflowClient(f"sqlite:///{lmgen_home / 'mlflow.db'}").set_terminated(trained.info.run_id, "KILLED")
    assert main(["eval", trained.info.run_id]) == 2  # a half-trained model is not the run's model
    assert "not FINISHED" in capsys.readouterr().err


H264_TINY = [*TINY, "data.fit_images=48", "tokenizer.bpe_vocab=300", "metrics.prefix_samples=8"]


def test_h264_video_run_end_to_end(lmgen_home):
    """AVC-LM on moving_shapes clips: BPE fitted in stage 1, clips sampled, played and scored by frame."""
    from PIL import Image

    assert main(["run", VIDEO, *H264_TINY]) == 0
    client, runs = _runs(lmgen_home, "video")
    lm = next(r for r in runs if r.data.tags["lmgen.stage"] == "lm")
    tok = next(r for r in runs if r.data.tags["lmgen.stage"] == "tokenizer")
    assert lm.info.status == "FINISHED" and lm.data.params["data.frames"] == "8"
    assert LM_KEYS | TOK_KEYS | GEN_KEYS <= set(lm.data.metrics)
    assert {"gen/frames_per_clip", "gen/partial_decode_rate"} <= set(lm.data.metrics)
    assert 1 < tok.data.metrics["tok/bpe_bytes_per_token"] and tok.data.metrics["tok/vocab_size"] == 300
    assert tok.data.metrics["tok/decode_valid_rate"] == 1.0 and tok.data.metrics["tok/psnr"] > 20
    artifacts = _artifacts(client, lm.info.run_id)
    assert {"samples.png", "samples.gif", "prefix_completion.png", "val_loss_per_position.csv"} <= artifacts
    with Image.open(client.download_artifacts(lm.info.run_id, "samples.gif")) as gif:
        total = 0
        for i in range(gif.n_frames):  # Pillow merges identical consecutive frames, adding their durations
            gif.seek(i)
            total += gif.info["duration"]
    assert total == pytest.approx(8 * 1000 / 3, abs=8)  # 8 frames at 3 fps
    with Image.open(client.download_artifacts(lm.info.run_id, "samples.png")) as strip:
        assert strip.width > 7 * strip.height / 10  # a row of 8 frames per clip: wide, not square
    if lm.data.metrics["gen/decode_valid_rate"] * 10 >= 2:
        assert "gen/fd_probe" in lm.data.metrics
    _check_position_loss(client, lm)
    _check_prefix_completion(client, lm, originals=8)


def test_videofolder_h264_run_counts_unreadable_files(lmgen_home, tmp_path):
    """Real mp4 files cut into clips, one of them not a video: the run finishes and counts it."""
    import av
    import numpy as np

    root, rng = tmp_path / "videos", np.random.default_rng(0)
    files = [root / "train" / c / f"{i}.mp4" for c in ("left", "right") for i in range(3)]
    files += [root / "val" / c / "0.mp4" for c in ("left", "right")]
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        with av.open(str(path), "w") as out:
            stream = out.add_stream("libx264", rate=6)
            stream.width, stream.height, stream.pix_fmt = 24, 20, "yuv420p"
            base = rng.integers(0, 200, 3)
            for t in range(24):  # 4 s at 6 fps: three 4-frame clips at 3 fps
                frame = np.full((20, 24, 3), base, dtype=np.uint8)
                x = 2 + t // 2 if path.parent.name == "right" else 20 - t // 2
                frame[6:14, x - 2 : x + 2] = 255
                out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            out.mux(stream.encode(None))
    (root / "train" / "left" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    args = ["run", VIDEO, *H264_TINY, "data.name=videofolder",
            f"data.root={root}", "data.train_size=0", "data.val_size=0", "data.frames=4", "data.fit_images=0"]
    assert main(args) == 0
    _, runs = _runs(lmgen_home, "video")
    lm = next(r for r in runs if r.data.tags["lmgen.stage"] == "lm")
    assert lm.info.status == "FINISHED"
    tok = next(r for r in runs if r.data.tags["lmgen.stage"] == "tokenizer")
    assert tok.data.metrics["data/skipped"] == 1.0
    assert tok.data.metrics["data/train_items"] == 6 * 3  # 6 readable train files of 3 clips each


@pytest.fixture(scope="module")
def served_run(tmp_path_factory):
    """One `lmgen run` against a real `mlflow server` that is SIGKILLed while the Llama trains and
    then comes back on the same store: (uri, LM run id, its home, its console output, steps)."""
    import time
    from types import SimpleNamespace

    from proctools import free_port, start_mlflow_server, stop_mlflow_server

    tmp = tmp_path_factory.mktemp("served")
    home, port, steps = tmp / "home", free_port(), 150
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(tmp, port)
    env = {**os.environ, "LMGEN_HOME": str(home), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = tmp / "run.out"
    with open(out, "w") as stdout:
        run = subprocess.Popen([sys.executable, "-m", "lmgen", "run", BASE, "tokenizer=pixels_palette64", *TINY,
                                "data.train_size=256", f"train.max_steps={steps}", "train.val_every=50",
                                "train.val_batches=1", "sample.num_samples=0", "metrics.prefix_samples=0",
                                "metrics.probe=false", f"tracking.uri={uri}"], env=env, stdout=stdout,
                               stderr=subprocess.STDOUT)
    client = MlflowClient(uri)
    try:
        deadline = time.monotonic() + 240
        while True:  # until training has logged a few steps
            experiment = client.get_experiment_by_name("base")
            lm = client.search_runs([experiment.experiment_id], "tags.`lmgen.stage` = 'lm'") if experiment else []
            if lm and len(client.get_metric_history(lm[0].info.run_id, "lm/train_loss")) >= 5:
                break
            assert run.poll() is None and time.monotonic() < deadline, out.read_text()[-3000:]
            time.sleep(0.2)
        stop_mlflow_server(server, signal.SIGKILL)  # dead at once, mid-training
        time.sleep(2)
        assert run.poll() is None, out.read_text()[-3000:]  # training goes on without it
        server = start_mlflow_server(tmp, port)  # back, on the same store
        assert run.wait(timeout=300) == 0, out.read_text()[-3000:]
        yield SimpleNamespace(uri=uri, run_id=lm[0].info.run_id, home=home, output=out.read_text(), steps=steps)
    finally:
        if run.poll() is None:
            run.kill()
        stop_mlflow_server(server)


def test_a_tracking_server_that_dies_mid_run_costs_no_step(served_run):
    """Training goes on without the server (each log call tries once, briefly); the values
    logged meanwhile are kept and sent with their steps once it is back, and the run finishes
    with every step's loss logged once."""
    assert "did not take metrics" in served_run.output and "is back after" in served_run.output, served_run.output
    client = MlflowClient(served_run.uri)
    finished = client.get_run(served_run.run_id)
    logged = [m.step for m in client.get_metric_history(served_run.run_id, "lm/train_loss")]
    assert finished.info.status == "FINISHED" and sorted(logged) == list(range(served_run.steps))
    assert not (served_run.home / "checkpoints" / served_run.run_id / "pending_metrics.jsonl").exists()


def test_eval_and_export_from_another_home_against_the_same_server(served_run, lmgen_home, tmp_path):
    """A colleague's machine: an empty $LMGEN_HOME and the server's URI. The run's weights and its
    stage-1 tokenizer state travel as artifacts, so `lmgen eval` and `export-hf` work there."""
    assert not lmgen_home.exists()
    uri, run_id = served_run.uri, served_run.run_id
    assert main(["eval", run_id, "sample.num_samples=4", "--uri", uri]) == 0
    assert (lmgen_home / "checkpoints" / run_id / "weights.pt").is_file()  # fetched, kept for next time
    assert list((lmgen_home / "tokenizers").glob("*/state.pt"))
    client = MlflowClient(uri)
    (child,) = client.search_runs([client.get_run(run_id).info.experiment_id], f"tags.`lmgen.eval_of` = '{run_id}'")
    assert child.info.status == "FINISHED" and child.data.tags["lmgen.scored_checkpoint"] == (
        f"weights.pt (step {served_run.steps})")
    assert main(["export-hf", run_id, str(tmp_path / "hf"), "--uri", uri]) == 0
    assert (tmp_path / "hf" / "tokenizer_state.pt").is_file() and (tmp_path / "hf" / "config.json").is_file()
