"""Sweeps: pure expansion, validation before launch, failure isolation, idempotent reruns,
resume from a checkpoint, one stage 1 for concurrent points, the submitit launcher, DDP and a
real MLflow server. Points run as real `lmgen run` processes on tiny configs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from lmgen.cli import main
from lmgen.config import ConfigError, config_hash
from lmgen.sweep import expand, load_sweep

ROOT = Path(__file__).resolve().parents[1]
BASE = str(ROOT / "experiments/base.yaml")
PIXELS = BASE  # with tokenizer=pixels_palette64 first in TINY
TINY = ["tokenizer=pixels_palette64", "data.train_size=48", "data.val_size=16", "data.image_size=16",
        "train.budget=steps", "train.max_steps=4", "train.val_every=4", "train.batch_size=8", "train.warmup_steps=2",
        "sample.num_samples=4", "sample.batch_size=4", "metrics.prefix_samples=4", "train.log_every=1"]


def write_sweep(tmp_path: Path, body: dict, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def runs(uri: str, experiment: str) -> list:
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def sqlite(home: Path) -> str:
    return f"sqlite:///{home / 'mlflow.db'}"


# --- expansion (pure) ---------------------------------------------------------------------------


def test_expansion_is_deterministic_with_unique_readable_names(tmp_path):
    path = write_sweep(tmp_path, {
        "name": "grid", "experiment": PIXELS, "overrides": ["tokenizer=pixels_palette64"],
        "grid": {"lm.size": ["nano", "micro"], "seed": [0, 1], "sample.top_k": [40]},
        "zip": [{"tokenizer.palette_size": [16, 64], "train.lr": [1e-3, 1e-3]}]})
    points = expand(load_sweep(path))
    assert points == expand(load_sweep(path))  # same file, same points, same order
    assert len(points) == 2 * 2 * 2 and len({p.name for p in points}) == 8
    assert points[0].name == "size=nano,seed=0,palette_size=16,lr=0.001"  # only what varies, in file order
    assert points[0].overrides == ("tokenizer=pixels_palette64", "lm.size=nano", "seed=0", "sample.top_k=40",
                                   "tokenizer.palette_size=16", "train.lr=0.001")
    assert all(p.experiment == Path(PIXELS) for p in points)


def test_presets_blocks_and_experiment_axis_name_their_points(tmp_path):
    presets = write_sweep(tmp_path, {"name": "arms", "experiment": BASE,
                                     "grid": {"tokenizer": ["jpeg_q25", "vq_1k"], "seed": [0, 1]}}, "arms.yaml")
    points = expand(load_sweep(presets))
    assert [p.name for p in points] == ["jpeg_q25,seed=0", "jpeg_q25,seed=1", "vq_1k,seed=0", "vq_1k,seed=1"]
    assert points[0].overrides == ("tokenizer=jpeg_q25", "seed=0")
    blocks = write_sweep(tmp_path, {"name": "vocab", "experiment": BASE, "blocks": [
        {"overrides": ["tokenizer=vq_1k"], "grid": {"tokenizer.codebook_size": [64, 256]}},
        {"overrides": ["tokenizer=lfq_10bit"], "grid": {"tokenizer.bits": [6, 8]}}]})
    assert [p.name for p in expand(load_sweep(blocks))] == [
        "vq_1k,codebook_size=64", "vq_1k,codebook_size=256", "lfq_10bit,bits=6", "lfq_10bit,bits=8"]
    axis = write_sweep(tmp_path, {"name": "tok", "grid": {"experiment": [BASE, str(ROOT / "experiments/video.yaml")],
                                                          "lm.size": ["nano"]}}, "axis.yaml")
    assert [p.name for p in expand(load_sweep(axis))] == ["base", "video"]
    single = write_sweep(tmp_path, {"name": "elm", "experiment": BASE, "overrides": ["tokenizer=bae_16bit"], "blocks": [
        {"grid": {"seed": [0, 1], "tokenizer.num_subcodes": [2]}}, {"grid": {"seed": [0], "tokenizer.num_subcodes": [1]}}]},
        "single.yaml")
    assert [p.name for p in expand(load_sweep(single))] == ["seed=0", "seed=1", "seed=0,num_subcodes=1"]  # not "elm"


SHIPPED = sorted((ROOT / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_sweep_expands_validates_and_varies_only_what_it_declares(path):
    """The one-recipe invariant: every point's resolved config agrees with every other's outside
    the axes the sweep declares (a tokenizer axis covers the whole tokenizer block)."""
    from lmgen.sweep import recipe_differences, validate_points

    spec = load_sweep(path)
    points = expand(spec)
    assert len(points) >= 3 and len({p.name for p in points}) == len(points)
    configs = validate_points(spec, points)  # every point's config loads
    assert recipe_differences(spec, configs) == {}


def test_the_quickstart_is_every_image_tokenizer_under_one_recipe():
    from lmgen.sweep import validate_points
    from lmgen.tokenizers import TOKENIZERS

    spec = load_sweep(ROOT / "sweeps/quickstart.yaml")
    configs = validate_points(spec, expand(spec))
    still = {name for name, cls in TOKENIZERS.items() if not cls.video}
    assert {cfg.tokenizer.name for cfg in configs.values()} == still
    recipes = {config_hash(cfg.lm, cfg.train, cfg.sample, cfg.metrics, cfg.stage1, cfg.data, cfg.seed)
               for cfg in configs.values()}
    assert len(recipes) == 1


def _with_tokenizer(tmp_path: Path, name: str, tokenizer: str, extra: dict) -> str:
    """A copy of the base experiment with its own tokenizer and ``extra`` sections merged in."""
    body = yaml.safe_load(Path(BASE).read_text())
    body["tokenizer"] = tokenizer
    for section, values in extra.items():
        body.setdefault(section, {}).update(values)
    (tmp_path / "tokenizers").mkdir(exist_ok=True)
    for preset in (ROOT / "experiments/tokenizers").glob("*.yaml"):
        (tmp_path / "tokenizers" / preset.name).write_text(preset.read_text())
    (tmp_path / "data").mkdir(exist_ok=True)
    for preset in (ROOT / "experiments/data").glob("*.yaml"):
        (tmp_path / "data" / preset.name).write_text(preset.read_text())
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return str(path)


def test_a_sweep_that_changes_the_recipe_with_the_tokenizer_is_caught(tmp_path):
    """Arms as whole copies of an experiment (the old habit) that disagree on the LM recipe: the
    invariant names every key that differs; a preset grid on one base has none."""
    from lmgen.sweep import recipe_differences, validate_points

    jpeg = _with_tokenizer(tmp_path, "jpeg", "jpeg_q25", {"train": {"images": 6400}, "sample": {"top_k": 40}})
    vq = _with_tokenizer(tmp_path, "vq", "vq_1k", {"train": {"lr": 1e-3}})
    copies = load_sweep(write_sweep(tmp_path, {"name": "copies", "grid": {"experiment": [jpeg, vq]}}))
    found = recipe_differences(copies, validate_points(copies, expand(copies)))
    assert set(found) >= {"train.images", "train.lr", "sample.top_k"} and "tokenizer.name" in found
    assert found["train.lr"] == [0.002, 0.001]
    # one block setting its own lr is a confound too; the key every block sets (the tokenizer) is not
    blocks = load_sweep(write_sweep(tmp_path, {"name": "blocks", "experiment": BASE, "blocks": [
        {"overrides": ["tokenizer=vq_1k", "train.lr=1e-3"], "grid": {"seed": [0, 1]}},
        {"overrides": ["tokenizer=lfq_10bit"], "grid": {"seed": [0, 1]}}]}, "blocks.yaml"))
    assert set(recipe_differences(blocks, validate_points(blocks, expand(blocks)))) == {"train.lr"}
    grid = load_sweep(write_sweep(tmp_path, {"name": "grid", "experiment": BASE,
                                             "grid": {"tokenizer": ["jpeg_q25", "vq_1k", "causal1d_32"]}}, "grid.yaml"))
    assert recipe_differences(grid, validate_points(grid, expand(grid))) == {}


def test_a_speed_key_cannot_be_an_axis(tmp_path):
    path = write_sweep(tmp_path, {"name": "x", "experiment": BASE, "grid": {"train.compile": [True, False]}})
    with pytest.raises(ConfigError, match="train.compile"):
        load_sweep(path)


@pytest.mark.parametrize(("body", "needle"), [
    ({"name": "x", "experiment": PIXELS, "grid": {"seed": [1, 1]}}, "repeated values"),
    ({"name": "x", "experiment": PIXELS, "zip": [{"seed": [1, 2], "lm.size": ["nano"]}]}, "equal lengths"),
    ({"name": "x", "experiment": PIXELS, "grid": {"seed": [1]}, "zip": [{"seed": [2]}]}, "more than once"),
    ({"name": "x", "grid": {"seed": [1]}}, "experiment"),
    ({"name": "x", "experiment": PIXELS, "gird": {}}, "gird"),
    ({"experiment": PIXELS}, "name"),
    ({"name": "x", "experiment": PIXELS, "slurm": {"gpus": 2}}, "gpus"),
    # a key holding the wrong kind of value (issue 24, item 10): one line naming it, no traceback
    ({"name": "x", "experiment": PIXELS, "grid": 5}, "grid: must be a mapping"),
    ({"name": "x", "experiment": PIXELS, "zip": [5]}, r"zip: must be a list of mappings"),
    ({"name": "x", "blocks": 5}, "blocks: must be a list of mappings"),
    ({"name": "x", "blocks": [{"experiment": PIXELS, "overrides": 5}]}, r"blocks\[0\]\.overrides: must be a list"),
    ({"name": "x", "experiment": PIXELS, "overrides": {"lm.size": "nano"}}, "overrides: must be a list of text"),
    ({"name": "x", "experiment": PIXELS, "max_parallel": "many"}, "max_parallel: must be an integer"),
    ({"name": "x", "experiment": PIXELS, "slurm": 5}, "slurm: must be a mapping"),
    ({"name": ["x"], "experiment": PIXELS}, "name: must be text"),
    ({"name": "x", "experiment": [PIXELS]}, "experiment: must be text"),
    ({"name": "../x", "experiment": PIXELS}, "name: '../x' holds a path separator"),
])
def test_malformed_sweep_files_fail_naming_the_key(tmp_path, body, needle):
    with pytest.raises(ConfigError, match=needle):
        expand(load_sweep(write_sweep(tmp_path, body)))


def test_a_bad_point_fails_the_sweep_before_anything_runs(tmp_path, lmgen_home, capsys):
    path = write_sweep(tmp_path, {"name": "bad", "experiment": PIXELS, "grid": {"lm.size": ["nano", "gigantic"]}})
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert "size=gigantic" in err and "lm.size" in err
    assert not (lmgen_home / "mlflow.db").exists()  # validated first: nothing was launched or logged


def test_an_unreachable_tracking_server_fails_the_sweep_before_anything_runs(tmp_path, lmgen_home):
    from lmgen.sweep import run_sweep

    path = write_sweep(tmp_path, {"name": "offline", "experiment": PIXELS, "grid": {"lm.size": ["nano"]}})
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match=r"http://127\.0\.0\.1:9"):
        run_sweep(path, uri="http://127.0.0.1:9")
    assert time.perf_counter() - start < 30
    assert not (lmgen_home / "sweeps").exists() and not (lmgen_home / "cache").exists()  # no point launched


# --- running ------------------------------------------------------------------------------------


def test_concurrent_points_share_one_stage1_and_nest_under_the_sweep(tmp_path, lmgen_home, capsys):
    """Two points at once that need the same tokenizer: one stage-1 run (the other waited on the
    lock), two LM runs as children of the sweep's parent run, a summary on the parent. In the
    MLflow UI the stage-1 run sits under the parent too, the LM runs are named preset first, and
    every run has a description (the parent's: each point linked, with its results)."""
    path = write_sweep(tmp_path, {"name": "pair", "experiment": PIXELS, "overrides": TINY,
                                  "grid": {"lm.size": ["nano", "micro"]}, "max_parallel": 2})
    assert main(["sweep", str(path), "--no-plot"]) == 0
    assert "| size=nano | FINISHED |" in capsys.readouterr().out
    all_runs = runs(sqlite(lmgen_home), "pair")
    by_stage = {s: [r for r in all_runs if r.data.tags["lmgen.stage"] == s] for s in ("sweep", "tokenizer", "lm")}
    assert len(by_stage["tokenizer"]) == 1 and len(by_stage["sweep"]) == 1 and len(by_stage["lm"]) == 2
    parent = by_stage["sweep"][0]
    assert parent.info.status == "FINISHED" and parent.data.metrics["sweep/finished"] == 2
    assert parent.data.tags["mlflow.source.name"] == "lmgen sweep pair"
    for run in [*by_stage["lm"], *by_stage["tokenizer"]]:
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["lmgen.sweep"] == "pair" and run.data.tags["mlflow.source.name"] == "lmgen sweep pair"
        assert "Sweep**: `pair`" in run.data.tags["mlflow.note.content"]
    for run in by_stage["lm"]:
        assert run.info.run_name in ("pixels_palette64 · nano · s0", "pixels_palette64 · micro · s0")
        assert run.data.tags["lmgen.tokenizer_run_id"] == by_stage["tokenizer"][0].info.run_id
        point = f"[size={run.data.params['lm.size']}](#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}?"
        assert f"| {point}" in parent.data.tags["mlflow.note.content"]  # the parent's table links each point
    artifacts = {a.path for a in MlflowClient(sqlite(lmgen_home)).list_artifacts(parent.info.run_id)}
    assert {"summary.md", "summary.json"} <= artifacts
    assert (lmgen_home / "sweeps" / "pair" / "size=nano.log").is_file()


def _image_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(14):
            img = np.full((16, 16, 3), rng.integers(0, 256, 3), dtype=np.uint8) + rng.integers(0, 30, (16, 16, 3),
                                                                                                 dtype=np.uint8)
            Image.fromarray(img).save(root / c / f"{i}.png")


def test_a_failing_point_does_not_stop_the_others_and_a_rerun_runs_only_it(tmp_path, lmgen_home, capsys):
    folder = tmp_path / "images"  # empty on the first pass (no class folders): that point fails at run time
    folder.mkdir()  # (a missing root would fail the whole sweep before launching: tests/test_reliability_home.py)
    path = write_sweep(tmp_path, {"name": "mixed", "experiment": PIXELS, "overrides": TINY, "blocks": [
        {"overrides": ["data.name=shapes"]},
        {"overrides": ["data.name=imagefolder", f"data.root={folder}", "data.train_size=0", "data.val_size=0",
                       "data.val_fraction=0.25"]}]})
    assert main(["sweep", str(path), "--no-plot"]) == 1
    captured = capsys.readouterr()
    assert "FINISHED" in captured.out and "FAILED" in captured.out and "rerun" in captured.err
    first = runs(sqlite(lmgen_home), "mixed")
    parent = [r for r in first if r.data.tags["lmgen.stage"] == "sweep"]
    assert len(parent) == 1 and parent[0].info.status == "FAILED"
    assert [r.info.status for r in first if r.data.tags["lmgen.stage"] == "lm"] == ["FINISHED"]

    _image_folder(folder)  # the cause is fixed; the same command again
    assert main(["sweep", str(path), "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "| name=shapes | SKIPPED |" in out
    second = runs(sqlite(lmgen_home), "mixed")
    lm = [r for r in second if r.data.tags["lmgen.stage"] == "lm"]
    assert sorted(r.info.status for r in lm) == ["FINISHED", "FINISHED"]  # the finished point did not run again
    parents = [r for r in second if r.data.tags["lmgen.stage"] == "sweep"]
    assert [p.info.run_id for p in parents] == [parent[0].info.run_id] and parents[0].info.status == "FINISHED"


def test_resume_continues_an_interrupted_run_from_its_checkpoint(lmgen_home, monkeypatch):
    """A run that crashed after its step-4 checkpoint is reopened (same run id) by --resume and
    trains only steps 5-8; a resume of a FINISHED run computes nothing."""
    import lmgen.experiment
    from lmgen.ar_module import ARModule
    from lmgen.config import load_config
    from lmgen.experiment import run_experiment

    cfg = load_config(PIXELS, [*TINY, "train.max_steps=8", "train.val_every=4"])
    original = ARModule.training_step

    def crash_at_6(self, batch, batch_idx):
        if self.global_step == 6:
            raise RuntimeError("injected crash at step 6")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(ARModule, "training_step", crash_at_6)
    with pytest.raises(RuntimeError, match="step 6"):
        run_experiment(cfg)
    monkeypatch.setattr(ARModule, "training_step", original)
    (crashed,) = [r for r in runs(sqlite(lmgen_home), "base") if r.data.tags["lmgen.stage"] == "lm"]
    assert crashed.info.status == "FAILED"

    summary = run_experiment(cfg, resume=True)
    assert summary.run_id == crashed.info.run_id
    client = MlflowClient(sqlite(lmgen_home))
    steps = [m.step for m in client.get_metric_history(summary.run_id, "lm/train_loss")]
    # 0..5 before the crash, then 4..7 from the step-4 checkpoint: nothing before it is redone
    assert max(steps) == 7 and all(steps.count(s) == 1 for s in range(4)) and steps.count(4) == 2
    assert client.get_run(summary.run_id).info.status == "FINISHED"

    def no_training(*args, **kwargs):
        raise AssertionError("a FINISHED run must not train again")

    monkeypatch.setattr(lmgen.experiment, "_train", no_training)
    assert run_experiment(cfg, resume=True).run_id == summary.run_id


def test_slurm_launcher_through_submitits_local_executor(tmp_path, lmgen_home):
    """The slurm launcher's plumbing (job array, requeueable job, exit codes) with submitit's
    local executor standing in for a cluster."""
    path = write_sweep(tmp_path, {"name": "slurmish", "experiment": PIXELS, "overrides": TINY,
                                  "grid": {"seed": [0, 1]}, "slurm": {"timeout_min": 10, "nodes": 1}})
    assert main(["sweep", str(path), "--no-plot", "--launcher", "slurm", "--slurm-cluster", "local", "--max-parallel", "1"]) == 0
    lm = [r for r in runs(sqlite(lmgen_home), "slurmish") if r.data.tags["lmgen.stage"] == "lm"]
    assert sorted(r.info.status for r in lm) == ["FINISHED", "FINISHED"]
    job_files = list((lmgen_home / "sweeps" / "slurmish" / "slurm").iterdir())
    assert any(f.name.endswith("_submitted.pkl") for f in job_files)


def test_launcher_parameters_map_to_submitit():
    from lmgen.launchers import executor_parameters

    params = executor_parameters({"gpus_per_node": 8, "nodes": 2, "timeout_min": 60, "partition": "gpu"})
    assert params == {"timeout_min": 60, "nodes": 2, "tasks_per_node": 8, "gpus_per_node": 8,
                      "slurm_partition": "gpu"}  # one task (rank) per GPU for Lightning


# --- distribution and a real tracking server ------------------------------------------------------


def test_two_process_ddp_logs_one_run_with_the_single_process_keys(lmgen_home):
    """trainer.devices=2 on CPU: Lightning re-runs the command as rank 1 (gloo); only rank 0 logs."""
    base = [sys.executable, "-m", "lmgen", "run", PIXELS, *TINY, "train.accelerator=cpu"]
    alone = lmgen_home.parent / "single-process"  # its own home: both runs do all of stage 1
    subprocess.run(base, check=True, env={**os.environ, "LMGEN_HOME": str(alone)}, timeout=600, capture_output=True)
    proc = subprocess.run([*base, "train.devices=2", "train.strategy=ddp"], env={**os.environ, "LMGEN_HOME": str(lmgen_home)},
                          timeout=600, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = [r for r in runs(sqlite(alone), "base") if r.data.tags["lmgen.stage"] == "lm"]
    ddp = runs(sqlite(lmgen_home), "base")
    assert sorted(r.data.tags["lmgen.stage"] for r in ddp) == ["lm", "tokenizer"]  # exactly one LM run
    (lm,) = [r for r in ddp if r.data.tags["lmgen.stage"] == "lm"]
    assert len(single) == 1 and lm.info.status == "FINISHED"
    # the long-tail correlations are omitted when 4 samples give constant per-class scores: data, not ranks
    def keys(run):
        return {k for k in run.data.metrics if not k.startswith("gen/longtail_")}

    assert keys(lm) == keys(single[0])
    config = yaml.safe_load(Path(MlflowClient(sqlite(lmgen_home)).download_artifacts(lm.info.run_id, "config.yaml")).read_text())
    assert config["train"]["devices"] == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sweep_against_a_real_mlflow_server(tmp_path, lmgen_home):
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination",
         str(tmp_path / "server-artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "mlflow server did not come up"
                time.sleep(1)
        path = write_sweep(tmp_path, {"name": "served", "experiment": PIXELS, "overrides": TINY,
                                      "grid": {"seed": [0]}})
        assert main(["sweep", str(path), "--no-plot", "--uri", uri]) == 0
        served = runs(uri, "served")
        assert sorted(r.data.tags["lmgen.stage"] for r in served) == ["lm", "sweep", "tokenizer"]
        lm = next(r for r in served if r.data.tags["lmgen.stage"] == "lm")
        assert lm.info.status == "FINISHED" and "gen/fd_probe" in lm.data.metrics
        assert "samples.png" in {a.path for a in MlflowClient(uri).list_artifacts(lm.info.run_id)}
        assert not (lmgen_home / "mlflow.db").exists()  # nothing went to the embedded store
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
