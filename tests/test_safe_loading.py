"""Loading a file never runs code (issue 24, item 2).

A real malicious pickle — one whose unpickling would create a marker file — is planted in each
place lmgen reads a file back: ``tokenizer.checkpoint``, a stage-1 ``state.pt``, an LM run's
``last.ckpt`` (read by ``lmgen eval`` / ``export-hf`` and by Lightning's resume), the reference
statistics cache and an Inception weights file. Each is refused (or, for a cache entry,
recomputed) and the marker never appears.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmgen.files import UnsafeFile, safe_load


class Payload:
    """Unpickling this touches ``marker``: what an attacker's code would do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def plant(path: Path, marker: Path, wrap: bool = False) -> Path:
    """Write the payload at ``path`` with ``torch.save`` (inside a checkpoint-shaped dict with ``wrap``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": Payload(marker), "global_step": 1} if wrap else Payload(marker), path)
    return path


@pytest.fixture()
def marker(tmp_path: Path) -> Path:
    marker = tmp_path / "the-payload-ran"
    torch.load(plant(tmp_path / "check.pt", marker), weights_only=False)  # the payload is real: it runs
    assert marker.exists()
    marker.unlink()
    return marker


def test_safe_load_refuses_a_pickle_and_reads_plain_data(tmp_path, marker):
    with pytest.raises(UnsafeFile, match="refused"):
        safe_load(plant(tmp_path / "evil.pt", marker))
    assert not marker.exists()
    torch.save({"w": torch.ones(2), "n": 3, "names": ["a"]}, tmp_path / "plain.pt")
    assert safe_load(tmp_path / "plain.pt")["n"] == 3


def test_a_planted_tokenizer_checkpoint_or_state_is_refused(tmp_path, marker):
    from lmgen.config import load_config
    from lmgen.stage1 import Stage1Job, _train_learned, load_tokenizer_state
    from lmgen.tokenizers import build_tokenizer

    evil = plant(tmp_path / "evil.pt", marker)
    cfg = load_config(None, ["tokenizer.name=vq", "tokenizer.channels=8", f"tokenizer.checkpoint={evil}"])
    tok = build_tokenizer(cfg.tokenizer, 16)
    job = Stage1Job(tok, cfg.tokenizer, cfg.data, None, None, tmp_path, cfg.train, cfg.metrics, 0)
    with pytest.raises(UnsafeFile):
        _train_learned(job, None)  # tokenizer.checkpoint
    with pytest.raises(UnsafeFile):
        load_tokenizer_state(tok, evil)  # a state.pt in a shared $LMGEN_HOME
    assert not marker.exists()


def test_a_planted_last_ckpt_is_refused_by_eval_and_by_a_resume(lmgen_home, marker, capsys):
    from mlflow.tracking import MlflowClient

    from lmgen.cli import main

    root = Path(__file__).resolve().parents[1]
    tiny = ["tokenizer=pixels_palette64", "data.train_size=32", "data.val_size=8", "data.image_size=8",
            "lm.size=nano", "train.budget=steps", "train.max_steps=2", "train.val_every=2", "train.batch_size=8",
            "sample.num_samples=0", "metrics.prefix_samples=0", "metrics.probe=false", "data.fit_images=32"]
    assert main(["run", str(root / "experiments/base.yaml"), *tiny]) == 0
    client = MlflowClient(f"sqlite:///{lmgen_home / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("base").experiment_id], "tags.`lmgen.stage` = 'lm'")
    ckpt = lmgen_home / "checkpoints" / run.info.run_id / "last.ckpt"
    plant(ckpt, marker, wrap=True)
    assert main(["eval", run.info.run_id]) == 2  # lmgen eval (and export-hf: the same restore_run)
    assert "refused" in capsys.readouterr().err
    client.set_terminated(run.info.run_id, "KILLED")  # as if stopped: a rerun resumes from last.ckpt
    with pytest.raises(Exception, match="(?i)weights.only|unpickl|refused"):
        main(["run", "--resume", str(root / "experiments/base.yaml"), *tiny])  # Lightning's own load
    assert not marker.exists()


def test_a_planted_reference_cache_entry_is_recomputed_unread(tmp_path, marker):
    from lmgen.metrics.refcache import ReferenceCache

    cache = ReferenceCache(tmp_path / "fidelity", "0" * 64)
    space, extractor, metrics = "probeX-w0", "lmgen-probe", ["fid"]
    paths = [tmp_path / "fidelity" / name for name in cache.files(space, extractor, metrics)]
    for path in paths:
        plant(path, marker)
    calls = []

    def run(**options):
        calls.append(options)
        return {"frechet_inception_distance": 1.0}

    assert cache.calculate(run, space, extractor, metrics) == {"frechet_inception_distance": 1.0}
    assert not marker.exists() and len(calls) == 1  # recomputed by the library, never unpickled
    assert not any(p.exists() for p in paths)  # the planted files were removed, not read


def test_planted_inception_weights_are_refused(tmp_path, marker):
    from lmgen.metrics.fidelity import InceptionUnavailable, resolve_inception_weights

    evil = plant(tmp_path / "inception.pth", marker)
    with pytest.raises(InceptionUnavailable, match="refused"):
        resolve_inception_weights(str(evil))
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "plain.pth")
    assert resolve_inception_weights(str(tmp_path / "plain.pth")) == tmp_path / "plain.pth"
    assert not marker.exists()
