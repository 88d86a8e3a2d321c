"""Nothing lost on interruption: resume equivalence, atomic checkpoints, non-finite steps.

A run stopped mid-epoch and resumed from ``last.ckpt`` must end where the uninterrupted run
ends — the same weights, bit for bit on the CPU, and the same loss at every step — because
the data order, the label-dropout generator and the loop counters travel in the checkpoint.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from lmgen.ar_module import ARModule, NonFiniteLossError, OptimConfig
from lmgen.checkpointing import AtomicCheckpointIO, intact, previous_checkpoint, usable_checkpoint
from lmgen.config import load_config
from lmgen.data import EpochSampler, SequenceLayout, TokenDataModule
from lmgen.datasets import build_dataset
from lmgen.experiment import checkpoint_path, run_experiment
from lmgen.llama import llama_config
from lmgen.stage1 import Stage1Job, prepare_tokenizer
from lmgen.tokenizer_module import TokenizerModule
from lmgen.tokenizers import tokenizer_for
from lmgen.tracking import Tracker

ROOT = Path(__file__).resolve().parents[1]
PIXELS = ROOT / "experiments/base.yaml"
# 48 train images in batches of 8: 6 batches an epoch, so 14 steps cross two epoch boundaries;
# checkpoints every 4 steps (4 = mid-epoch 0, 8 = mid-epoch 1, 12 = mid-epoch 2).
FAST = ["tokenizer=pixels_palette64", "data.train_size=48", "data.val_size=16", "data.image_size=8", "lm.size=nano", "train.budget=steps", "train.max_steps=14",
        "train.val_every=4", "train.batch_size=8", "train.warmup_steps=2", "train.log_every=1",
        "sample.num_samples=0", "metrics.prefix_samples=0", "metrics.probe=false", "train.precision=32-true"]


def _run(home: Path, experiment: str, crash_at: int | None = None, resume: bool = False, monkeypatch=None,  # noqa: PLR0913
         extra: tuple[str, ...] = ()):
    cfg = load_config(PIXELS, [*FAST, f"tracking.experiment={experiment}", *extra])
    if crash_at is None:
        return run_experiment(cfg, resume=resume)
    original = ARModule.training_step

    def crash(self, batch, batch_idx):
        if self.global_step == crash_at:
            raise RuntimeError(f"injected crash at step {crash_at}")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(ARModule, "training_step", crash)
    with pytest.raises(RuntimeError, match="injected crash"):
        run_experiment(cfg)
    monkeypatch.setattr(ARModule, "training_step", original)
    return None


def _history(client: MlflowClient, run_id: str, key: str) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for m in client.get_metric_history(run_id, key):
        out.setdefault(m.step, []).append(m.value)
    return out


def _weights(home: Path, run_id: str) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint_path(home, run_id), map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.parametrize(("crash_at", "extra"), [(6, ()), (10, ()), (9, ("train.val_every=6",))],
                         ids=["epoch0-after-step4-ckpt", "epoch1-after-step8-ckpt", "after-an-epoch-end-ckpt"])
def test_resumed_run_ends_with_the_uninterrupted_weights_and_losses(lmgen_home, monkeypatch, crash_at, extra):
    whole = _run(lmgen_home, "whole", extra=extra)
    _run(lmgen_home, "cut", crash_at=crash_at, monkeypatch=monkeypatch, extra=extra)
    resumed = _run(lmgen_home, "cut", resume=True, extra=extra)
    client = MlflowClient(f"sqlite:///{lmgen_home / 'mlflow.db'}")
    assert client.get_run(resumed.run_id).info.status == "FINISHED"

    a, b = _weights(lmgen_home, whole.run_id), _weights(lmgen_home, resumed.run_id)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run's"
    for key in ("lm/train_loss", "lm/val_bits_per_image"):
        full, cut = _history(client, whole.run_id, key), _history(client, resumed.run_id, key)
        assert full.keys() == cut.keys()
        for step, values in cut.items():  # steps redone after the crash log twice: the same value both times
            assert set(values) == set(full[step]), f"{key} at step {step}: {values} vs {full[step]}"
    counters = ("lm/tokens_seen", "lm/flops")
    assert all(client.get_run(resumed.run_id).data.metrics[k] == client.get_run(whole.run_id).data.metrics[k]
               for k in counters)


def test_epoch_sampler_is_a_function_of_seed_and_epoch_and_resumes_mid_epoch():
    sampler = EpochSampler(20, seed=3, shuffle=True, drop_last=True)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert sorted(epoch1) == list(range(20)) and epoch1 != list(range(20))
    sampler.set_epoch(0)
    assert list(sampler) != epoch1
    fresh = EpochSampler(20, seed=3, shuffle=True, drop_last=True)
    fresh.set_epoch(1)
    fresh.resume_after(8, epoch=1)
    assert list(fresh) == epoch1[8:] and list(fresh) == epoch1  # the skip applies to one pass only
    fresh.resume_after(8, epoch=0)  # the restored epoch had ended: the next pass (epoch 1) is whole
    assert list(fresh) == epoch1
    ranks = [EpochSampler(21, seed=3, shuffle=True, rank=r, world=2, drop_last=True) for r in range(2)]
    shards = [list(s) for s in ranks]
    assert len(shards[0]) == len(shards[1]) == 10 and not set(shards[0]) & set(shards[1])


def test_checkpoints_are_written_atomically_and_a_torn_one_falls_back(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.arange(1000)}, path)
    io.save_checkpoint({"step": 2, "w": torch.arange(1000)}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.prev.ckpt"]  # no temporary left
    assert torch.load(previous_checkpoint(path), weights_only=False)["step"] == 1
    assert usable_checkpoint(path) == path and intact(path)

    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # torn: a crash (or a full disk) mid-write
    assert not intact(path) and usable_checkpoint(path) == previous_checkpoint(path)
    path.write_bytes(data[:100] + bytes(len(data) - 100))  # corrupt: right length, zeroed payload
    assert usable_checkpoint(path) == previous_checkpoint(path)
    previous_checkpoint(path).write_bytes(b"")
    assert usable_checkpoint(path) is None

    # a crash while writing (here: torch.save itself fails) leaves the old file untouched
    io.save_checkpoint({"step": 3}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"step": 4, "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=False)["step"] == 3 and zipfile.is_zipfile(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.prev.ckpt"]


def test_a_resume_never_relogs_params_with_another_value(lmgen_home, monkeypatch):
    """Keys outside the config hash (speed switches) may differ on resume: the run keeps the
    config (config.yaml) and params it was started with, and MLflow never sees a second value for a key."""
    _run(lmgen_home, "params", crash_at=6, monkeypatch=monkeypatch)
    resumed = _run(lmgen_home, "params", resume=True, extra=("train.peak_flops=1e12", "train.fused_adamw=false"))
    client = MlflowClient(f"sqlite:///{lmgen_home / 'mlflow.db'}")
    run = client.get_run(resumed.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["lmgen.resumed_from"] == "last.ckpt"
    config = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config.yaml")).read_text())
    assert config["train"]["peak_flops"] == 0.0 and config["train"]["fused_adamw"] is True  # as it started


def test_resume_falls_back_to_the_previous_checkpoint_when_last_is_torn(lmgen_home, monkeypatch):
    _run(lmgen_home, "torn", crash_at=10, monkeypatch=monkeypatch)
    client = MlflowClient(f"sqlite:///{lmgen_home / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("torn").experiment_id], "tags.`lmgen.stage` = 'lm'")
    last = checkpoint_path(lmgen_home, run.info.run_id)
    last.write_bytes(last.read_bytes()[:1000])  # the step-8 checkpoint, torn; step 4's is intact
    resumed = _run(lmgen_home, "torn", resume=True)
    assert resumed.run_id == run.info.run_id
    steps = [m.step for m in client.get_metric_history(resumed.run_id, "lm/train_loss")]
    assert steps.count(4) == 2 and steps.count(3) == 1  # trained again from the step-4 checkpoint
    after = client.get_run(resumed.run_id)
    assert after.info.status == "FINISHED" and after.data.tags["lmgen.resumed_from"] == "last.prev.ckpt"


# ---- stage 1: torn checkpoints and states (issue 24, item 5) ---------------------------------

# A tiny VQ: 32 train images in batches of 8, 4 steps, a checkpoint after every step.
STAGE1 = ["tokenizer.name=vq", "tokenizer.codebook_size=16", "stage1.channels=8", "stage1.steps=4",
          "stage1.val_every=1", "stage1.batch_size=8", "stage1.warmup_steps=1", "stage1.train_images=32",
          "stage1.val_images=8", "data.train_size=32", "data.val_size=8", "data.image_size=16"]


TRAINING_STEP = TokenizerModule.training_step


def _stage1(home: Path, monkeypatch, crash_at: int | None = None) -> tuple[str, list[int]]:
    """Stage 1 of the tiny VQ: (its MLflow run id and status, the global steps it trained)."""
    cfg = load_config(None, STAGE1)
    job = Stage1Job.for_run(cfg, tokenizer_for(cfg), build_dataset(cfg.data, "train"), build_dataset(cfg.data, "val"),
                            home)
    steps: list[int] = []

    def step(self, batch, batch_idx):
        if self.global_step == crash_at:
            raise RuntimeError(f"injected crash at step {crash_at}")
        steps.append(self.global_step)
        return TRAINING_STEP(self, batch, batch_idx)

    monkeypatch.setattr(TokenizerModule, "training_step", step)
    tracker = Tracker(f"sqlite:///{home / 'mlflow.db'}", "stage1")
    if crash_at is not None:
        with pytest.raises(RuntimeError, match="injected crash"):
            prepare_tokenizer(job, tracker)
        return "", steps
    result = prepare_tokenizer(job, tracker)
    return tracker.client.get_run(result.run_id).info.status, steps


def _step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


@pytest.mark.parametrize("torn", ["last", "both"])
def test_a_torn_stage1_checkpoint_resumes_from_the_one_before_or_restarts(lmgen_home, monkeypatch, torn):
    """Before: stage 1 wrote its checkpoints in place and resumed from ``last.ckpt`` whatever it
    held, so a torn one failed every rerun (``PytorchStreamReader failed ...``: another FAILED
    stage-1 run per retry), and a torn ``state.pt`` too. Now stage 1 writes through the LM's
    atomic checkpoint IO and resumes from the newer intact checkpoint (``last.prev.ckpt`` when
    ``last.ckpt`` is torn), or trains from the start when both are torn — writing ``last.ckpt``
    again, not ``last-v1.ckpt``; a torn ``state.pt`` is made again from the final checkpoint."""
    _stage1(lmgen_home, monkeypatch, crash_at=3)  # checkpoints after steps 1, 2, 3; crash in the fourth
    (directory,) = (lmgen_home / "tokenizers").glob("*/checkpoints")
    last = directory / "last.ckpt"
    assert (_step(last), _step(previous_checkpoint(last))) == (3, 2)
    last.write_bytes(last.read_bytes()[:1000])
    if torn == "both":
        previous_checkpoint(last).write_bytes(previous_checkpoint(last).read_bytes()[:1000])
    status, steps = _stage1(lmgen_home, monkeypatch)
    assert status == "FINISHED" and steps == ([2, 3] if torn == "last" else [0, 1, 2, 3])
    assert sorted(p.name for p in directory.iterdir()) == ["last.ckpt", "last.prev.ckpt"] and _step(last) == 4
    if torn == "last":
        state = directory.parent / "state.pt"
        weights = torch.load(state, weights_only=True)
        state.write_bytes(state.read_bytes()[:1000])
        status, steps = _stage1(lmgen_home, monkeypatch)  # a new stage-1 run: the state, from last.ckpt, untrained
        assert status == "FINISHED" and steps == []
        again = torch.load(state, weights_only=True)
        assert weights.keys() == again.keys() and all(torch.equal(weights[k], again[k]) for k in weights)


# ---- non-finite losses -----------------------------------------------------------------------

LAYOUT = SequenceLayout(vocab_size=16, max_tokens=8, num_classes=2, variable_length=False)


def _items(n: int) -> list:
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 16, (8,), generator=g), 8, i % 2) for i in range(n)]


def _fit_with_nan_at(steps: set[int], max_bad_steps: int) -> tuple[ARModule, list[dict]]:
    """Train 8 steps, the loss made NaN at the global steps in ``steps``; records weights around each step."""
    L.seed_everything(0, verbose=False)
    module = ARModule(llama_config("nano", LAYOUT.total_vocab, LAYOUT.seq_len), LAYOUT,
                      OptimConfig(lr=1e-2, warmup_steps=1, max_steps=8, max_bad_steps=max_bad_steps))
    forward = module._forward_nll

    def poisoned(inputs, targets):
        nll, mask = forward(inputs, targets)
        return (nll * float("nan"), mask) if module.global_step in steps and module.training else (nll, mask)

    module._nll = poisoned
    snapshots: list[dict] = []

    class Snap(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            snapshots.append({k: v.clone() for k, v in pl_module.model.state_dict().items()})

    trainer = L.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        gradient_clip_val=1.0, callbacks=[Snap()])
    trainer.fit(module, TokenDataModule(_items(80), _items(8), LAYOUT, batch_size=8))
    return module, snapshots


def test_a_non_finite_loss_fails_before_the_optimizer_touches_the_weights():
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at global step 3 \(epoch 0, batch 3\)"):
        module, _ = _fit_with_nan_at({3}, max_bad_steps=0)


def test_bad_steps_are_skipped_up_to_the_limit_and_leave_the_weights_alone():
    module, snaps = _fit_with_nan_at({2, 5}, max_bad_steps=2)
    # Lightning still counts a skipped batch as a step (max_steps and the LR schedule move on)
    assert module.bad_steps == 2 and module.global_step == 8
    # weights before batch 2 (the bad one) == weights before batch 3; a good step changes them
    assert all(torch.equal(snaps[2][k], snaps[3][k]) for k in snaps[2])
    assert not all(torch.equal(snaps[1][k], snaps[2][k]) for k in snaps[1])
    assert all(torch.isfinite(p).all() for p in module.model.parameters())
    with pytest.raises(NonFiniteLossError, match="3 bad step"):
        _fit_with_nan_at({1, 2, 4}, max_bad_steps=2)


def test_a_non_finite_gradient_is_caught_even_when_the_loss_is_finite():
    L.seed_everything(0, verbose=False)
    module = ARModule(llama_config("nano", LAYOUT.total_vocab, LAYOUT.seq_len), LAYOUT,
                      OptimConfig(lr=1e-2, warmup_steps=1, max_steps=4))
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    module.model.norm.weight.register_hook(lambda g: g * float("inf"))  # an overflow in backward only
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    with pytest.raises(NonFiniteLossError, match="non-finite gradient at global step 0"):
        trainer.fit(module, TokenDataModule(_items(32), _items(8), LAYOUT, batch_size=8))
    assert all(torch.equal(before[k], v) for k, v in module.model.state_dict().items())
