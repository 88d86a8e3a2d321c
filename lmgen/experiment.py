"""One run, end to end: data → tokenizer (stage 1) → token cache → Llama (stage 2) → samples.

``run_experiment(cfg)`` is what ``lmgen run`` calls; a sweep runs it once per point. The
path is the same for every tokenizer: nothing here looks at a tokenizer's name.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig

from lmgen.ar_module import ARModule, OptimConfig, position_loss_csv
from lmgen.config import config_hash, resolve_precision, to_dict
from lmgen.data import SequenceLayout, TokenDataModule
from lmgen.datasets import ImageBatch, build_dataset, load_batch
from lmgen.llama import Llama, llama_config
from lmgen.metrics.fidelity import class_accuracy, fidelity_keys, fidelity_metrics
from lmgen.metrics.longtail import PerClassFD, longtail_metrics, per_class_fd
from lmgen.metrics.probe import Probe, ProbeConfig, load_or_train_probe
from lmgen.sampling import generate
from lmgen.stage1 import log_fidelity_context, prepare_tokenizer, to_grid
from lmgen.tokenizers import ImageTokenizer, TokenBatch, build_tokenizer
from lmgen.tracking import MlflowMetricLogger, Tracker, check_tracking, lmgen_home, resolve_tracking_uri

log = logging.getLogger(__name__)

SUMMARY_KEYS = ("tok/tokens_per_image", "tok/bits_per_image", "tok/psnr", "tok/rfid_probe", "tok/rfid",
                "lm/params", "lm/train_loss", "lm/val_loss", "lm/val_bits_per_image", "lm/tokens_per_s",
                "gen/decode_valid_rate", "gen/fd_probe", "gen/fid", "gen/class_accuracy", "gen/images_per_s")


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


def run_experiment(cfg: DictConfig) -> RunSummary:
    """Train and sample one (dataset, tokenizer, LM, seed) point, logging everything to MLflow."""
    start = time.perf_counter()
    uri = resolve_tracking_uri(cfg.tracking.uri)
    check_tracking(uri)  # before any compute: never fail after hours of training
    home = lmgen_home()
    tracker = Tracker(uri, cfg.tracking.experiment or cfg.name)
    train_ds = build_dataset(cfg.data, "train")
    val_ds = build_dataset(cfg.data, "val")
    tokenizer = build_tokenizer(cfg.tokenizer, cfg.data.image_size)
    # The probe classifier behind the offline metrics: trained once per dataset, cached.
    probe = load_or_train_probe(train_ds, val_ds, home / "probes", ProbeConfig()) if cfg.metrics.probe else None
    stage1 = prepare_tokenizer(cfg, tokenizer, train_ds, val_ds, tracker, home, probe)

    layout = SequenceLayout(tokenizer.vocab_size, tokenizer.max_tokens, train_ds.num_classes,
                            tokenizer.variable_length, cfg.lm.class_conditional)
    optim = OptimConfig(lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                        betas=(cfg.train.beta1, cfg.train.beta2), warmup_steps=cfg.train.warmup_steps,
                        max_steps=cfg.train.max_steps, min_lr_ratio=cfg.train.min_lr_ratio,
                        class_dropout=cfg.train.class_dropout)
    # Seed here, after stage 1 and the probe: whether those were cached or trained must not
    # change the LM's initialisation or data order.
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model_cfg = llama_config(cfg.lm.size, layout.total_vocab, layout.seq_len, subcodes=tuple(tokenizer.subcodes),
                             subcode_embed=cfg.lm.subcode_embed)
    module = ARModule(model_cfg, layout, optim)
    datamodule = TokenDataModule(stage1.train, stage1.val, layout, cfg.train.batch_size,
                                 num_workers=cfg.data.num_workers, seed=cfg.seed)

    run_name = cfg.tracking.run_name or f"{cfg.tokenizer.name}-{cfg.lm.size}-s{cfg.seed}"
    tags = {"lmgen.stage": "lm", "lmgen.tokenizer": cfg.tokenizer.name,
            "lmgen.config_hash": config_hash({k: v for k, v in to_dict(cfg).items() if k != "tracking"}),
            "lmgen.tokenizer_run_id": stage1.run_id, "lmgen.tokenizer_hash": stage1.key}
    run_id = tracker.start_run(run_name, tags)
    try:
        tracker.log_config(run_id, to_dict(cfg))
        tracker.log_metrics(run_id, {k: v for k, v in stage1.metrics.items() if k.startswith(("tok/", "data/"))})
        _train(cfg, module, datamodule, tracker, run_id, home)
        tracker.log_text(run_id, position_loss_csv(module.val_loss_per_position), "val_loss_per_position.csv")
        if cfg.sample.num_samples > 0:
            samples = _generate(cfg, module.model, layout, tokenizer)
            _evaluate_samples(cfg, samples, layout, train_ds, val_ds, probe, tracker, run_id)
    except KeyboardInterrupt:
        tracker.end_run(run_id, "KILLED")
        raise
    except BaseException:
        tracker.end_run(run_id, "FAILED")
        raise
    tracker.end_run(run_id, "FINISHED")
    return RunSummary(run_id=run_id, run_name=run_name, experiment=tracker.experiment, tracking_uri=uri,
                      tokenizer_run_id=stage1.run_id, artifact_uri=tracker.artifact_dir(run_id),
                      wall_time_s=time.perf_counter() - start, metrics=tracker.metrics(run_id))


def _train(cfg: DictConfig, module: ARModule, datamodule: TokenDataModule, tracker: Tracker,
           run_id: str, home: Path) -> None:
    t = cfg.train
    callbacks = []
    if t.checkpoint:
        callbacks.append(ModelCheckpoint(dirpath=home / "checkpoints" / run_id, save_last=True,
                                         save_top_k=0, every_n_train_steps=t.val_every))
    trainer = L.Trainer(
        max_steps=t.max_steps, accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
        strategy=t.strategy, precision=resolve_precision(t.precision, t.accelerator), gradient_clip_val=t.grad_clip or None,
        val_check_interval=t.val_every, check_val_every_n_epoch=None,
        limit_val_batches=t.val_batches or 1.0, log_every_n_steps=t.log_every,
        logger=MlflowMetricLogger(tracker, run_id), callbacks=callbacks, num_sanity_val_steps=0,
        enable_model_summary=False, default_root_dir=str(home), enable_checkpointing=t.checkpoint)
    trainer.fit(module, datamodule=datamodule)
    if t.max_steps % t.val_every:  # always end on a validation of the final weights
        trainer.validate(module, datamodule=datamodule, verbose=False)


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision.startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class SampleSet:
    """Decoded samples: images (N, 3, H, W) uint8, valid (N,) bool, labels (N,) int64 (the
    class asked for), lengths (N,) int64 tokens generated, seconds spent sampling + decoding."""

    images: torch.Tensor
    valid: torch.Tensor
    labels: torch.Tensor
    lengths: torch.Tensor
    seconds: float


@torch.no_grad()
def _generate(cfg: DictConfig, model: Llama, layout: SequenceLayout, tokenizer: ImageTokenizer) -> SampleSet:
    """Sample ``sample.num_samples`` images (classes round-robin) and decode them."""
    s = cfg.sample
    model.eval()
    device = next(model.parameters()).device
    labels = torch.arange(s.num_samples) % layout.num_classes
    images, valid, lengths = [], [], []
    start = time.perf_counter()
    for chunk in labels.split(s.batch_size):
        prompt = layout.cond_tokens(chunk, len(chunk)).to(device)
        uncond = layout.null_tokens(len(chunk)).to(device) if s.cfg_scale != 1.0 else None
        with _autocast(resolve_precision(cfg.train.precision, cfg.train.accelerator), device):
            gen = generate(model, prompt, layout.max_tokens + int(layout.variable_length),
                           temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, cfg_scale=s.cfg_scale,
                           cfg_schedule=s.cfg_schedule, uncond_prompt=uncond, allowed=layout.allowed().to(device),
                           eos_id=layout.eos if layout.variable_length else None, pad_id=layout.pad)
        ids = gen.tokens[:, : layout.max_tokens].cpu()
        ids = torch.where(ids < layout.vocab_size, ids, torch.zeros_like(ids))
        tokens = TokenBatch(ids=ids, lengths=gen.lengths.clamp(max=layout.max_tokens).cpu())
        decoded = tokenizer.decode(tokens)  # never raises: undecodable streams come back valid=False
        images.append(decoded.images)
        valid.append(decoded.valid)
        lengths.append(tokens.lengths)
    model.train()
    return SampleSet(torch.cat(images), torch.cat(valid), labels, torch.cat(lengths), time.perf_counter() - start)


def _evaluate_samples(cfg: DictConfig, samples: SampleSet, layout: SequenceLayout, train_ds, val_ds,  # noqa: PLR0913
                      probe: Probe | None, tracker: Tracker, run_id: str) -> dict[str, float]:
    """gen/* metrics of the decodable samples against the val split; samples.png; per-class CSV.

    Undecodable samples are counted (``gen/num_invalid``) and left out of every fidelity
    metric — never replaced.
    """
    good = samples.images[samples.valid]
    metrics = {"gen/decode_valid_rate": float(samples.valid.float().mean()),
               "gen/num_invalid": float((~samples.valid).sum()),
               "gen/images_per_s": len(samples.images) / samples.seconds,
               "gen/tokens_per_image": float(samples.lengths.float().mean())}
    reference = None
    if probe is not None and len(good) >= 2:
        reference = load_batch(val_ds, cfg.metrics.num_reference, cfg.data.encode_batch_size)
        result = fidelity_metrics(good, reference.images, probe=probe, inception_weights=cfg.metrics.inception_weights,
                                  prefix="gen", seed=cfg.seed)
        metrics.update(result.metrics)
        log_fidelity_context(tracker, run_id, result, "gen")
    elif probe is not None:
        reason = f"{len(good)} of {len(samples.images)} samples decodable; fidelity needs at least 2"
        log.warning("gen fidelity metrics skipped: %s", reason)
        tracker.log_text(run_id, json.dumps(dict.fromkeys(fidelity_keys("gen"), reason), indent=1),
                         "gen_metrics_skipped.json")
    if probe is not None and layout.class_conditional and len(good) > 0:
        if reference is None:
            reference = load_batch(val_ds, cfg.metrics.num_reference, cfg.data.encode_batch_size)
        metrics.update(_per_class_metrics(probe, good, samples.labels[samples.valid], reference, train_ds,
                                          tracker, run_id))
    tracker.log_metrics(run_id, metrics)
    nrow = layout.num_classes if layout.class_conditional else 8
    tracker.log_image(run_id, to_grid(samples.images, nrow=min(nrow, len(samples.images))), "samples.png")
    return metrics


def _per_class_metrics(probe: Probe, images: torch.Tensor, labels: torch.Tensor, reference: ImageBatch,
                       train_ds, tracker: Tracker, run_id: str) -> dict[str, float]:
    """Class accuracy and the long-tail view (per-class probe FD vs train frequency) of class-conditional samples.

    images: uint8 (N, 3, H, W) decodable samples; labels: int64 (N,) the class asked for.
    Samples are class-balanced (round-robin), so per-class FD rests on ~N / num_classes
    images per class: noisy and biased upwards with a handful (NaN below 2); the rank
    correlations with frequency are only worth reading with tens of samples per class.
    Logs ``per_class.csv``; returns the ``gen/*`` metrics.
    """
    acc = class_accuracy(probe, images, labels)
    fd = per_class_fd(probe, images, labels, reference.images, reference.labels, probe.num_classes)
    tracker.log_text(run_id, _per_class_csv(train_ds, acc, fd), "per_class.csv")
    counts = train_ds.class_counts().double()
    return {"gen/class_accuracy": acc["accuracy"], "gen/class_accuracy_balanced": acc["balanced_accuracy"],
            **longtail_metrics(counts / counts.sum(), fd.fd, acc["per_class_accuracy"], prefix="gen")}


def _per_class_csv(train_ds, acc: dict, fd: PerClassFD) -> str:
    """class, name, train frequency, samples, probe accuracy, probe FD (empty where NaN), reference images:
    the long-tail view of the samples (JPEG-LM Fig. 4, with exact frequencies)."""
    counts = train_ds.class_counts().double()
    freq = counts / counts.sum()
    rows = ["class,name,train_frequency,num_samples,class_accuracy,fd_probe,num_reference"]
    for c, name in enumerate(train_ds.class_names):
        fd_c = float(fd.fd[c])
        rows.append(f"{c},{name},{freq[c]:.6f},{int(acc['per_class_count'][c])},{acc['per_class_accuracy'][c]:.4f},"
                    f"{'' if math.isnan(fd_c) else f'{fd_c:.6g}'},{int(fd.num_reference[c])}")
    return "\n".join(rows) + "\n"
