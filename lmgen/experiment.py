"""One run, end to end: data → tokenizer (stage 1) → token cache → Llama (stage 2) → samples.

``run_experiment(cfg)`` is what ``lmgen run`` calls; a sweep runs it once per point.
``eval_run(run_id, overrides)`` (``lmgen eval``) re-evaluates a finished run from its
checkpoint — more samples, other sampling settings — into a child run. The path is the
same for every tokenizer: nothing here looks at a tokenizer's name.
"""

from __future__ import annotations

import functools
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lmgen.ar_module import ARModule, OptimConfig, SpeedConfig, position_loss_csv
from lmgen.budget import Budget, resolve_budget, world_size
from lmgen.checkpointing import AtomicCheckpointIO, Preemption, previous_checkpoint, usable_checkpoint
from lmgen.concurrency import is_global_zero, share_from_rank_zero
from lmgen.config import (
    ConfigError,
    ExperimentConfig,
    LMConfig,
    MetricsConfig,
    TrainConfig,
    load_config,
    run_config_hash,
    to_dict,
)
from lmgen.curves import GenerationCurve
from lmgen.data import SequenceLayout, TokenDataModule
from lmgen.datasets import build_dataset, frame_view, load_batch
from lmgen.evaluate import Generator, Scoring, evaluate_model, frame_batch
from lmgen.files import safe_load
from lmgen.llama import Llama, LlamaConfig, llama_config
from lmgen.metrics.probe import Probe, ProbeConfig, load_or_train_probe
from lmgen.perf import resolve_precision
from lmgen.progress import StepProgress
from lmgen.run_page import Filing, dataset_inputs, display_name, eval_description, lm_description, lm_params
from lmgen.stage1 import (
    Stage1Job,
    Stage1Result,
    load_tokenizer_state,
    prepare_tokenizer,
    tokenizer_key,
    tokenizer_state_path,
)
from lmgen.tokenizers import ImageTokenizer, tokenizer_for
from lmgen.tracking import (
    MlflowMetricLogger,
    Tracker,
    check_tracking,
    fetch_artifact,
    lmgen_home,
    owner_tags,
    resolve_tracking_uri,
)

log = logging.getLogger(__name__)

SUMMARY_KEYS = ("tok/tokens_per_image", "tok/bits_per_image", "tok/psnr", "tok/rfid_probe", "tok/rfid",
                "lm/params", "lm/train_loss", "lm/val_loss", "lm/val_bits_per_image", "lm/val_label_bits",
                "lm/tokens_per_s", "lm/mfu",
                "gen/decode_valid_rate", "gen/fd_probe", "gen/fid", "gen/class_accuracy", "gen/images_per_s",
                "gen/prefix_r25/fd_probe", "gen/prefix_r50/fd_probe", "gen/prefix_r75/fd_probe", "gen/eval_seconds")
# What `lmgen eval` may change: how the trained model is sampled and scored, never what was trained.
EVAL_SECTIONS = ("sample", "metrics", "tracking", "seed")


@dataclass(frozen=True)
class RunSummary:
    """Where a finished run lives and its key numbers."""

    run_id: str
    run_name: str
    experiment: str
    tracking_uri: str
    tokenizer_run_id: str
    artifact_uri: str
    wall_time_s: float
    metrics: dict[str, float] = field(default_factory=dict)

    def format(self) -> str:
        """The one-screen summary ``lmgen run`` prints."""
        lines = [f"run        {self.run_name}  ({self.run_id})",
                 f"experiment {self.experiment}",
                 f"tracking   {self.tracking_uri}",
                 f"artifacts  {self.artifact_uri}",
                 f"stage 1    tokenizer run {self.tokenizer_run_id}",
                 f"wall time  {self.wall_time_s:.1f} s"]
        for key in SUMMARY_KEYS:
            if key in self.metrics:
                lines.append(f"  {key:<24} {self.metrics[key]:.4g}")
        return "\n".join(lines)


def run_experiment(cfg: ExperimentConfig, resume: bool = False) -> RunSummary:
    """Train and sample one (dataset, tokenizer, LM, seed) point, logging everything to MLflow.

    ``resume`` (what ``lmgen sweep`` asks for): a FINISHED LM run with this config hash is
    returned as it is, without compute; an unfinished one (FAILED, KILLED, or RUNNING with its
    process gone) with an intact ``last.ckpt`` (or ``last.prev.ckpt``) is reopened and its
    training continues from that checkpoint. Without ``resume`` every call trains a new run. In
    a distributed run every rank calls this; only rank 0 logs, writes and evaluates.

    SIGTERM (preemption) ends the run KILLED, after writing ``last.ckpt`` if training had begun,
    and raises ``Preempted`` (exit status 143); a failure ends it FAILED with tag ``lmgen.error``.
    """
    preemption = Preemption(None)
    with preemption.armed():
        return _run_experiment(cfg, resume, preemption)


def _run_experiment(cfg: ExperimentConfig, resume: bool, preemption: Preemption) -> RunSummary:
    start = time.perf_counter()
    uri = resolve_tracking_uri(cfg.tracking.uri)
    check_tracking(uri)  # before any compute: never fail after hours of training
    home = lmgen_home()
    lead = is_global_zero()
    tracker = Tracker(uri, cfg.tracking.experiment or cfg.name, writes=lead)
    run_hash = run_config_hash(cfg)
    if resume and lead:
        done = tracker.find_finished({"lmgen.stage": "lm", "lmgen.config_hash": run_hash})
        if done is not None:
            log.info("run %s: a FINISHED run with config hash %s exists; nothing to do", done, run_hash)
            return _summary(tracker, done, time.perf_counter() - start)
    train_ds = build_dataset(cfg.data, "train")
    val_ds = build_dataset(cfg.data, "val")
    tokenizer = tokenizer_for(cfg)
    probe = _probe(cfg.metrics, train_ds, val_ds, home)
    stage1 = prepare_tokenizer(Stage1Job.for_run(cfg, tokenizer, train_ds, val_ds, home), tracker, probe)

    layout = sequence_layout(cfg.lm, tokenizer, train_ds.num_classes)
    t = cfg.train
    model_cfg = model_config(cfg.lm, tokenizer, layout)
    # loss-bearing tokens per image: the train split's mean length, plus EOS for codec streams
    budget = arm_budget(t, float(stage1.train.lengths.double().mean()) + int(layout.variable_length), model_cfg)
    # Seed here, after stage 1 and the probe: whether those were cached or trained must not
    # change the LM's initialisation or data order.
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    speed = SpeedConfig(compile=t.compile, fused_adamw=t.fused_adamw, peak_flops=t.peak_flops)
    module = ARModule(model_cfg, layout, _optim(t, budget, cfg.seed), speed)
    datamodule = TokenDataModule(stage1.train, stage1.val, layout, t.batch_size,
                                 num_workers=cfg.data.num_workers, seed=cfg.seed)

    run_id, resume_from = None, ""
    if lead:
        run_id, resume_from = _open_lm_run(cfg, tracker, stage1, run_hash, home, resume)
    run_id, resume_from = share_from_rank_zero("LMGEN_LM_RUN", f"{run_id}\n{resume_from}" if lead else None).split("\n")
    resolved = {**budget.params(), "resolved.precision": resolve_precision(t.precision, t.accelerator)}
    # what the description says before the run has metrics of its own: stage 1's, and the Llama's size
    known = {**stage1.metrics, "lm/params": float(module.model.num_params())}
    describe = functools.partial(lm_description, cfg, resolved, tracker.experiment_id, stage1.run_id)
    with tracker.ending(run_id):  # KILLED on Ctrl-C or SIGTERM (Preempted, Lightning's SIGTERMException)
        if not resume_from:
            tracker.log_config(run_id, to_dict(cfg), lm_params(cfg, resolved))
            tracker.log_inputs(run_id, dataset_inputs(cfg.data, cfg.preset.data,
                                                      {"training": train_ds, "validation": val_ds}))
            tracker.set_description(run_id, describe(known))
        # tok/* only: data/* stay on the stage-1 run (and in the description), so the LM run's charts open on gen/*
        tracker.log_metrics(run_id, {k: v for k, v in stage1.metrics.items() if k.startswith("tok/")})
        spill = checkpoint_path(home, run_id).parent / "pending_metrics.jsonl" if lead else None  # outage's keep
        curve = _curve(cfg, module, layout, tokenizer, probe, val_ds) if lead else None
        _train(t, budget, module, datamodule, MlflowMetricLogger(tracker, run_id, spill),
               checkpoint_path(home, run_id) if t.checkpoint else None, preemption, resume_from or None,
               [curve] if curve is not None else [])
        if not lead:  # the other ranks' part ends with training; rank 0 evaluates
            return RunSummary(run_id, display_name(cfg), tracker.experiment, uri, stage1.run_id, "",
                              time.perf_counter() - start)
        position_loss = position_loss_csv(module.val_loss_per_position)
        tracker.log_text(run_id, position_loss, "val_loss_per_position.csv")
        tracker.log_table(run_id, position_loss, "val_loss_per_position.json")
        if cfg.tracking.log_weights:
            _log_weights(tracker, run_id, module)
        evaluate_model(Generator.for_run(cfg, module.model, layout, tokenizer),
                       Scoring.for_run(cfg, train_ds, val_ds, probe, tracker, run_id, home, step=budget.steps))
        tracker.set_description(run_id, describe({**known, **tracker.metrics(run_id)}))
    return _summary(tracker, run_id, time.perf_counter() - start)


def arm_budget(train: TrainConfig, per_image: float, model_cfg: LlamaConfig) -> Budget:
    """An arm's steps for ``train.budget``, given its loss-bearing tokens per image and its
    Llama, whose FLOPs per token at that length are counted on a weightless ``meta`` copy."""
    width = max(1, round(per_image))  # the model's input width for a fixed grid: exactly its tokens
    with torch.device("meta"):
        flops_per_token = Llama(model_cfg).flops_per_token(width)
    return resolve_budget(train, per_image, flops_per_token, world_size(train))


def _optim(train: TrainConfig, budget: Budget, seed: int) -> OptimConfig:
    return OptimConfig(lr=train.lr, weight_decay=train.weight_decay, betas=(train.beta1, train.beta2),
                       warmup_steps=train.warmup_steps, max_steps=budget.steps, min_lr_ratio=train.min_lr_ratio,
                       class_dropout=train.class_dropout, max_bad_steps=train.max_bad_steps, seed=seed)


def _open_lm_run(cfg: ExperimentConfig, tracker: Tracker, stage1: Stage1Result, run_hash: str,  # noqa: PLR0913
                 home: Path, resume: bool) -> tuple[str, str]:
    """(run id, checkpoint to resume from or ""): the unfinished run of this config reopened when
    ``resume`` finds one with a checkpoint, else a new run (child of ``tracking.parent_run_id``)."""
    if resume:
        point = {"lmgen.stage": "lm", "lmgen.config_hash": run_hash}
        for stale in tracker.reconcile(point):  # left RUNNING by a process that is gone (SIGKILL)
            log.warning("run %s was RUNNING but its process is gone: marked KILLED", stale)
        earlier = tracker.find_run(point)
        owner = tracker.live_owner(earlier) if earlier is not None else None
        if owner is not None:
            raise RuntimeError(f"run {earlier} of this point is being trained right now by {owner}; "
                               "wait for it (or stop it) before running the point again")
        ckpt = usable_checkpoint(checkpoint_path(home, earlier)) if earlier is not None else None
        if earlier is not None and ckpt is not None:
            log.info("run %s: resuming from %s", earlier, ckpt)
            tracker.reopen_run(earlier)
            tracker.set_tags(earlier, {**owner_tags(), "lmgen.resumed_from": ckpt.name})
            return earlier, str(ckpt)
    tags = {"lmgen.stage": "lm", "lmgen.tokenizer": cfg.tokenizer.name, "lmgen.config_hash": run_hash,
            "lmgen.tokenizer_run_id": stage1.run_id, "lmgen.tokenizer_hash": stage1.key, **owner_tags(),
            **Filing.for_run(cfg).tags()}  # sweep, parent run, source
    if cfg.preset.tokenizer:
        tags["lmgen.tokenizer_preset"] = cfg.preset.tokenizer
    return tracker.start_run(display_name(cfg), tags), ""


def _summary(tracker: Tracker, run_id: str, seconds: float) -> RunSummary:
    run = tracker.client.get_run(run_id)
    return RunSummary(run_id=run_id, run_name=run.info.run_name, experiment=tracker.experiment, tracking_uri=tracker.uri,
                      tokenizer_run_id=run.data.tags.get("lmgen.tokenizer_run_id", ""),
                      artifact_uri=run.info.artifact_uri, wall_time_s=seconds, metrics=dict(run.data.metrics))


def _curve(cfg: ExperimentConfig, module: ARModule, layout: SequenceLayout, tokenizer: ImageTokenizer,  # noqa: PLR0913
           probe: Probe | None, val_ds) -> GenerationCurve | None:
    """The generation learning curve (``metrics.curve_samples``), or None when it is off."""
    m = cfg.metrics
    if m.curve_samples == 0 or probe is None:  # validate() refuses curves without the probe
        return None
    with torch.random.fork_rng(devices=[]):  # a DataLoader draws its seed from the global RNG: keep training's
        reference = frame_batch(load_batch(val_ds, m.num_reference, cfg.data.encode_batch_size)).images
    return GenerationCurve(Generator.for_run(cfg, module.model, layout, tokenizer), probe, probe.features(reference),
                           m.curve_samples, cfg.train.batch_size * world_size(cfg.train), cfg.seed,
                           m.bootstrap_resamples)


def _train(t: TrainConfig, budget: Budget, module: ARModule, datamodule: TokenDataModule,  # noqa: PLR0913
           logger: MlflowMetricLogger, checkpoint: Path | None, preemption: Preemption,
           resume_from: str | None = None, extra: list[L.Callback] | None = None) -> None:
    """Fit ``module`` for ``budget.steps``, validating every ``budget.val_every`` steps and at the
    end; with ``checkpoint``, ``last.ckpt`` is written there (atomically) along the way and
    holds the final weights at the end. ``extra``: callbacks of the run (its generation curve)."""
    callbacks: list[L.Callback] = [preemption, StepProgress("lm", loss_key="lm/train_loss"), *(extra or [])]
    if checkpoint is not None:
        preemption.checkpoint = checkpoint
        callbacks.append(ModelCheckpoint(dirpath=checkpoint.parent, save_last=True, save_top_k=0,
                                         every_n_train_steps=budget.val_every))
    # use_distributed_sampler=False: TokenDataModule shards (and resumes) its own order; the
    # checkpoint IO writes atomically and keeps the previous checkpoint.
    trainer = L.Trainer(use_distributed_sampler=False, plugins=[AtomicCheckpointIO()],
        max_steps=budget.steps, accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
        strategy=t.strategy, precision=resolve_precision(t.precision, t.accelerator), gradient_clip_val=t.grad_clip or None,
        val_check_interval=budget.val_every, check_val_every_n_epoch=None,
        limit_val_batches=t.val_batches or 1.0, log_every_n_steps=t.log_every,
        logger=logger, callbacks=callbacks, num_sanity_val_steps=0,
        enable_model_summary=False, default_root_dir=str(lmgen_home()), enable_checkpointing=checkpoint is not None,
        enable_progress_bar=False)  # StepProgress: plain lines, steps to max_steps, no control characters in logs
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)  # lmgen writes plain data
    if budget.steps % budget.val_every:  # always end on a validation of the final weights
        trainer.validate(module, datamodule=datamodule, verbose=False)
    if checkpoint is not None:  # last.ckpt holds the final weights whatever val_every was (lmgen eval reads it)
        trainer.save_checkpoint(checkpoint, weights_only=False)  # the whole state: weights, optimizer, loops


WEIGHTS_ARTIFACT = "model/weights.pt"  # the LM's final weights on its run (tracking.log_weights)


def _log_weights(tracker: Tracker, run_id: str, module: ARModule) -> None:
    """The final weights, without the optimizer's state, as the run's artifact ``WEIGHTS_ARTIFACT``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(WEIGHTS_ARTIFACT).name
        torch.save({"state_dict": module.state_dict(), "global_step": module.global_step}, path)
        tracker.log_file(run_id, path, str(Path(WEIGHTS_ARTIFACT).parent))


def checkpoint_path(home: Path, run_id: str) -> Path:
    """``last.ckpt`` of LM run ``run_id``: the final weights (and optimizer state) when ``train.checkpoint``."""
    return home / "checkpoints" / run_id / "last.ckpt"


def sequence_layout(lm: LMConfig, tokenizer: ImageTokenizer, num_classes: int) -> SequenceLayout:
    """The LM's sequence layout for ``tokenizer``'s ids over a dataset of ``num_classes`` classes."""
    return SequenceLayout(tokenizer.vocab_size, tokenizer.max_tokens, num_classes, tokenizer.variable_length,
                          lm.class_conditional)


def model_config(lm: LMConfig, tokenizer: ImageTokenizer, layout: SequenceLayout) -> LlamaConfig:
    """The Llama of ``lm.size`` over ``layout``'s vocabulary and length, with the tokenizer's sub-codes
    (and, with ``lm.attention=block_causal``, its blocks)."""
    blocks, parents = tokenizer.attention_blocks() if lm.attention == "block_causal" else ((), ())
    return llama_config(lm.size, layout.total_vocab, layout.seq_len, subcodes=tuple(tokenizer.subcodes),
                        subcode_embed=lm.subcode_embed, blocks=blocks, parents=parents)


def _probe(metrics: MetricsConfig, train_ds, val_ds, home: Path) -> Probe | None:
    """The probe classifier behind the offline metrics: trained once per dataset, cached; on
    video, trained on frames (one per clip) and applied frame by frame."""
    if not metrics.probe:
        return None
    return load_or_train_probe(frame_view(train_ds), frame_view(val_ds), home / "probes", ProbeConfig())


def _eval_config(client, run_id: str, overrides: list[str]) -> tuple[ExperimentConfig, ExperimentConfig]:
    """(the run's resolved config, the same with ``overrides``), both validated; ConfigError
    if an override reaches outside ``EVAL_SECTIONS``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(client.download_artifacts(run_id, "config.yaml", tmp))
        trained = load_config(path)
        cfg = load_config(path, overrides)
    before, after = to_dict(trained), to_dict(cfg)
    changed = sorted(k for k in set(before) | set(after) if k not in EVAL_SECTIONS and before.get(k) != after.get(k))
    if changed:
        raise ConfigError(f"lmgen eval re-evaluates the trained model: only {', '.join(EVAL_SECTIONS)} may change, "
                          f"but the overrides change {', '.join(changed)}")
    return trained, cfg


@dataclass(frozen=True)
class RestoredRun:
    """A finished LM run rebuilt from its ``last.ckpt``: where ``lmgen eval`` and ``lmgen export-hf`` start.

    ``run`` is the MLflow run (info, tags, metrics) and ``client`` the client that read it;
    ``trained`` its resolved config and ``cfg`` the same with the caller's overrides; the
    tokenizer carries its stage-1 state (read from ``tokenizer_state``); ``model`` is the
    trained Llama on the CPU, fp32, in eval mode.
    """

    run: Any
    client: Any
    uri: str
    home: Path
    trained: ExperimentConfig
    cfg: ExperimentConfig
    train_ds: Any
    val_ds: Any
    tokenizer: ImageTokenizer
    tokenizer_state: Path
    layout: SequenceLayout
    model: Llama
    checkpoint: Path  # the checkpoint the weights came from: last.ckpt, or last.prev.ckpt if it was torn
    step: int  # its global step


def restore_run(run_id: str, overrides: list[str] | None = None, uri: str | None = None) -> RestoredRun:
    """Config, stage-1 tokenizer, layout and Llama of finished LM run ``run_id``, never retrained.

    ``overrides`` may change ``EVAL_SECTIONS`` only (ConfigError otherwise). ValueError for an
    unknown run, a run that is not an LM run (tag ``lmgen.stage``) or a tokenizer whose
    config no longer hashes as it did; FileNotFoundError without ``last.ckpt`` or stage-1 state.
    """
    uri = resolve_tracking_uri(uri)
    check_tracking(uri)
    home = lmgen_home()
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    try:
        original = client.get_run(run_id)
    except MlflowException as err:
        raise ValueError(f"no run {run_id!r} in {uri} ({err.error_code})") from None
    tags = original.data.tags
    if tags.get("lmgen.stage") != "lm":
        raise ValueError(f"run {run_id} is not an lmgen LM run (lmgen.stage={tags.get('lmgen.stage')!r})")
    if original.info.status != "FINISHED":  # a KILLED or FAILED run's checkpoint is a half-trained model
        raise ValueError(f"run {run_id} is {original.info.status}, not FINISHED: its checkpoint is not the trained "
                         "model; finish it first (lmgen run --resume, or the sweep again)")
    ckpt = usable_checkpoint(checkpoint_path(home, run_id)) or fetch_artifact(
        client, run_id, WEIGHTS_ARTIFACT, checkpoint_path(home, run_id).parent / "weights.pt")  # trained elsewhere
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint for run {run_id} at {checkpoint_path(home, run_id)} and no "
                                f"{WEIGHTS_ARTIFACT} artifact: it was trained with train.checkpoint=false and "
                                "tracking.log_weights=false, or under another LMGEN_HOME")
    trained, cfg = _eval_config(client, run_id, overrides or [])
    train_ds, val_ds = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "val")
    tokenizer = tokenizer_for(cfg)
    key = tokenizer_key(cfg.tokenizer, cfg.data.image_size, train_ds)
    if key != tags.get("lmgen.tokenizer_hash", key):
        raise ValueError(f"run {run_id} used tokenizer {tags['lmgen.tokenizer_hash']} but its config now hashes to "
                         f"{key}: the dataset or lmgen's cache format changed since it was trained")
    state = tokenizer_state_path(home, key)
    if not state.is_file() and tags.get("lmgen.tokenizer_run_id"):  # made on another machine: its run has it
        fetch_artifact(client, tags["lmgen.tokenizer_run_id"], "tokenizer/state.pt", state)
    load_tokenizer_state(tokenizer, state)
    layout = sequence_layout(cfg.lm, tokenizer, train_ds.num_classes)
    module = ARModule(model_config(cfg.lm, tokenizer, layout), layout, OptimConfig())
    checkpoint = safe_load(ckpt)
    module.load_state_dict(checkpoint["state_dict"])
    if ckpt == previous_checkpoint(checkpoint_path(home, run_id)):
        log.warning("run %s: last.ckpt is damaged; restoring %s (step %s) instead, which the results will say",
                    run_id, ckpt.name, checkpoint.get("global_step"))
    return RestoredRun(run=original, client=client, uri=uri, home=home, trained=trained, cfg=cfg, train_ds=train_ds,
                       val_ds=val_ds, tokenizer=tokenizer, tokenizer_state=state, layout=layout,
                       model=module.model.eval(), checkpoint=ckpt, step=int(checkpoint.get("global_step", -1)))


def eval_run(run_id: str, overrides: list[str] | None = None, uri: str | None = None) -> RunSummary:
    """Recompute the gen/* metrics of finished LM run ``run_id`` from its ``last.ckpt``.

    ``overrides`` change sampling and scoring only (``sample.num_samples=1000``,
    ``metrics.prefix_samples=256``, ``seed=1`` ...). Results go to a new child run of
    ``run_id`` (tags ``lmgen.stage=eval``, ``lmgen.eval_of``; ``mlflow.parentRunId``), so the
    original run's params and metrics are never rewritten; the child also carries the
    original's tok/* and lm/* metrics and lmgen.* tags, so it reads on its own. The stage-1
    tokenizer is restored from ``$LMGEN_HOME/tokenizers/<lmgen.tokenizer_hash>`` — never retrained.
    """
    start = time.perf_counter()
    restored = restore_run(run_id, overrides, uri)
    cfg, original, tags = restored.cfg, restored.run, restored.run.data.tags
    model = restored.model.to(_eval_device(cfg.train))
    train_ds, val_ds = restored.train_ds, restored.val_ds
    probe = _probe(cfg.metrics, train_ds, val_ds, restored.home)

    tracker = Tracker(restored.uri, restored.client.get_experiment(original.info.experiment_id).name)
    name = cfg.tracking.run_name if cfg.tracking.run_name != restored.trained.tracking.run_name else None
    name = name or f"{original.info.run_name} · eval n{cfg.sample.num_samples} s{cfg.seed}"
    child_tags = {**{k: v for k, v in tags.items() if k.startswith("lmgen.")}, "lmgen.stage": "eval",
                  **Filing(command="lmgen eval").tags(),
                  "lmgen.eval_of": run_id, "mlflow.parentRunId": run_id,
                  # which weights were scored: last.ckpt, or the one before it where last.ckpt was torn
                  "lmgen.scored_checkpoint": f"{restored.checkpoint.name} (step {restored.step})"}
    eval_id = tracker.start_run(name, child_tags)
    tracker.set_description(eval_id, eval_description(original, restored.checkpoint.name, restored.step, cfg))
    with tracker.ending(eval_id):
        resolved = {k: v for k, v in original.data.params.items() if k.startswith("resolved.")}  # what was trained
        tracker.log_config(eval_id, to_dict(cfg), lm_params(cfg, resolved))
        tracker.log_metrics(eval_id, {k: v for k, v in original.data.metrics.items() if k.startswith(("tok/", "lm/"))})
        L.seed_everything(cfg.seed, verbose=False)
        evaluate_model(Generator.for_run(cfg, model, restored.layout, restored.tokenizer),
                       Scoring.for_run(cfg, train_ds, val_ds, probe, tracker, eval_id, restored.home, restored.step))
    return RunSummary(run_id=eval_id, run_name=name, experiment=tracker.experiment, tracking_uri=restored.uri,
                      tokenizer_run_id=tags.get("lmgen.tokenizer_run_id", ""), artifact_uri=tracker.artifact_dir(eval_id),
                      wall_time_s=time.perf_counter() - start, metrics=tracker.metrics(eval_id))


def _eval_device(train: TrainConfig) -> torch.device:
    use_cuda = train.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return torch.device("cuda" if use_cuda else "cpu")
