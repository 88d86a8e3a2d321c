"""Stage 1: get a tokenizer ready, encode the splits once, and record ``tok/*`` metrics.

Every tokenizer passes through here alike. Learned ones (vq, lfq, bae, ...) train by
gradient in ``lmgen.tokenizer_module``; non-learned ones (pixels, codecs) ``fit`` what they
have (a palette, BPE merges, or nothing) on the train split. The resulting state is stored
under ``<home>/tokenizers/<key>/state.pt`` and reused by every later run with the same key;
then every tokenizer is measured the same way on the val split's token cache.
Stage 1 is its own MLflow run (tag ``lmgen.stage=tokenizer``); LM runs point at it through
the tag ``lmgen.tokenizer_run_id``, and a second LM run with the same tokenizer reuses it. Made
by a sweep's point, it is tagged with the sweep and nested under the sweep's parent run; its
description links the LM runs on its tokens (``lmgen.run_page``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.utils import make_grid

from lmgen.checkpointing import intact
from lmgen.concurrency import barrier, file_lock
from lmgen.config import ExperimentConfig, MetricsConfig, TrainConfig, config_hash, to_dict, without_added_defaults
from lmgen.data import CACHE_FORMAT, TokenCache
from lmgen.datasets import DataConfig, ImageDataset, load_images
from lmgen.files import atomic_write, safe_load
from lmgen.metrics import code_metrics, psnr, rate_metrics, ssim, token_statistics
from lmgen.metrics.bootstrap import bootstrap_fd
from lmgen.metrics.fidelity import FidelityResult, rfid_metrics
from lmgen.metrics.probe import Probe
from lmgen.paths import writing
from lmgen.perf import resolve_precision
from lmgen.run_page import Filing, dataset_inputs, eval_params, stage1_description, stage1_name, stage1_params
from lmgen.tokenizers import ImageTokenizer, TokenBatch
from lmgen.tracking import MlflowMetricLogger, Tracker

log = logging.getLogger(__name__)

RECON_IMAGES = 32  # originals and reconstructions shown in recon.png


@dataclass(frozen=True)
class Stage1Result:
    tokenizer: ImageTokenizer
    key: str  # hash of everything that determines the tokens
    run_id: str  # the MLflow run holding tok/* metrics
    metrics: dict[str, float]
    train: TokenCache
    val: TokenCache


@dataclass(frozen=True)
class Stage1Job:
    """One tokenizer's stage 1: the tokenizer, the data it sees and how it is read, where its
    state and caches live, how a learned one trains (``trainer``: the run's accelerator,
    devices, nodes and strategy), how its reconstructions are scored (``metrics``, ``seed``)
    and where a new stage-1 run is filed (``filing``: its sweep, the command, the presets)."""

    tokenizer: ImageTokenizer
    config: Any  # the tokenizer's resolved config block (a learned one's recipe filled in)
    data: DataConfig
    train_ds: ImageDataset
    val_ds: ImageDataset
    home: Path
    trainer: TrainConfig
    metrics: MetricsConfig
    seed: int
    filing: Filing = Filing()
    log_state: bool = True  # state.pt as the stage-1 run's artifact tokenizer/state.pt (tracking.log_weights)

    @classmethod
    def for_run(cls, cfg: ExperimentConfig, tokenizer: ImageTokenizer, train_ds: ImageDataset, val_ds: ImageDataset,
                home: Path) -> Stage1Job:
        """The stage 1 of an experiment's tokenizer."""
        return cls(tokenizer, cfg.tokenizer, cfg.data, train_ds, val_ds, home, cfg.train, cfg.metrics, cfg.seed,
                   Filing.for_run(cfg), cfg.tracking.log_weights)

    @functools.cached_property
    def key(self) -> str:
        """``tokenizer_key`` of this job."""
        return tokenizer_key(self.config, self.data.image_size, self.train_ds)

    @property
    def directory(self) -> Path:
        return tokenizer_state_path(self.home, self.key).parent


def tokenizer_key(tokenizer_cfg: Any, image_size: int, train_ds: ImageDataset) -> str:
    """Hash of everything that determines a stage-1 tokenizer and its tokens (``lmgen.tokenizer_hash``):
    its resolved config block (a learned one's recipe included), the image size and the train
    split. The cache format is part of it so a layout change never reads stale caches. Keys added
    since (``ADDED_DEFAULTS``) count only away from their default, so old caches stay valid."""
    values = without_added_defaults("tokenizer", to_dict(tokenizer_cfg))
    return config_hash("tokenizer", CACHE_FORMAT, values, image_size, train_ds.fingerprint())


def tokenizer_state_path(home: Path, key: str) -> Path:
    """Where stage 1 stores the state of the tokenizer with ``tokenizer_key`` ``key``."""
    return home / "tokenizers" / key / "state.pt"


def reference_cache(home: Path) -> Path:
    """Where reference-set features are cached, keyed by a hash of the exact images (``lmgen.metrics.refcache``)."""
    return home / "fidelity"


def load_tokenizer_state(tokenizer: ImageTokenizer, state_path: Path) -> None:
    """Restore a stage-1 state; FileNotFoundError naming the path if it is not there."""
    if not state_path.is_file():
        raise FileNotFoundError(f"stage-1 tokenizer state {state_path} is missing: was the run made with another "
                                "LMGEN_HOME? (set LMGEN_HOME to the directory that holds tokenizers/)")
    tokenizer.load_state_dict(safe_load(state_path))


def prepare_tokenizer(job: Stage1Job, tracker: Tracker, probe: Probe | None = None) -> Stage1Result:
    """Fit/train (or restore) the job's tokenizer, build both token caches, log/reuse the stage-1 run.

    Reuse: when a FINISHED stage-1 run with the same key exists and its state file is on disk,
    nothing is trained or logged again. Otherwise a new stage-1 run is opened *before*
    training, so a learned tokenizer's curves land in it. With a ``probe``, reconstructions
    also get ``tok/rfid_probe`` (and ``tok/rfid`` where Inception weights exist) and the probe's
    accuracy on them, ``tok/class_accuracy``, on up to ``metrics.num_reference`` val images.
    """
    tags = {"lmgen.stage": "tokenizer", "lmgen.config_hash": job.key, "lmgen.tokenizer": job.config.name}
    if not tracker.writes:  # a non-zero rank of a distributed run
        return _follow_rank_zero(job, tracker, tags)
    # Sweep points that need the same tokenizer at once: the first builds it, the others wait and reuse it.
    with file_lock(job.directory.parent / f".{job.key}.lock"):
        result = _prepare(job, tracker, tags, probe)
    barrier()  # ranks that trained stage 1 with us wait here for the state and caches written above
    return result


def _follow_rank_zero(job: Stage1Job, tracker: Tracker, tags: dict[str, str]) -> Stage1Result:
    """Stage 1 on a non-zero rank: join rank 0's training of a learned tokenizer (its ``fit``
    needs every rank), then use the state and caches rank 0 wrote; log and write nothing."""
    if job.tokenizer.learned and not intact(job.directory / "state.pt"):  # missing, or torn: rank 0 makes it again
        _train_learned(job, None)
    barrier()
    load_tokenizer_state(job.tokenizer, job.directory / "state.pt")
    caches = _caches(job)
    return Stage1Result(job.tokenizer, job.key, tracker.find_finished(tags) or "", {}, caches["train"], caches["val"])


def _discard_if_damaged(state_path: Path) -> None:
    """Remove a tokenizer state that is not a whole ``torch.save`` archive (a truncated or
    garbled file would fail every rerun): stage 1 then makes it again — a learned tokenizer
    from its last intact checkpoint, which holds the final weights once training has ended."""
    if state_path.is_file() and not intact(state_path):
        log.warning("stage 1: tokenizer state %s is damaged (truncated or corrupt): discarded, made again", state_path)
        state_path.unlink(missing_ok=True)


def _prepare(job: Stage1Job, tracker: Tracker, tags: dict[str, str], probe: Probe | None) -> Stage1Result:
    tokenizer = job.tokenizer
    _discard_if_damaged(job.directory / "state.pt")
    run_id = tracker.find_finished(tags)
    if run_id is not None and (job.directory / "state.pt").is_file():
        log.info("stage 1: reusing tokenizer run %s", run_id)
        _fit_or_load(job, None)
        caches = _caches(job)
        return Stage1Result(tokenizer, job.key, run_id, tracker.metrics(run_id), caches["train"], caches["val"])
    run_id = tracker.start_run(stage1_name(job.config, job.key), {**tags, **job.filing.tags()})
    with tracker.ending(run_id):  # never left RUNNING
        tracker.log_config(run_id, {"tokenizer": to_dict(job.config), "data": to_dict(job.data)},
                           stage1_params(job.config, job.data, job.filing))
        describe = functools.partial(stage1_description, job.config, job.data, job.filing, tracker.experiment_id, run_id)
        tracker.set_description(run_id, describe({}))
        tracker.log_inputs(run_id, dataset_inputs(job.data, job.filing.data_preset,
                                                  {"training": job.train_ds, "validation": job.val_ds}))
        if tokenizer.learned:
            tracker.log_params(run_id, {"resolved.precision": resolve_precision(job.config.precision,
                                                                                job.trainer.accelerator)})
        fit_stats = _fit_or_load(job, (tracker, run_id))
        if job.log_state:  # for evaluations on machines that never made it
            tracker.log_file(run_id, job.directory / "state.pt", "tokenizer")
        caches = _caches(job)
        metrics = {**fit_stats, **_evaluate(job, caches["val"], tracker, run_id, probe)}
        if isinstance(tokenizer, nn.Module):
            metrics["tok/params"] = float(sum(p.numel() for p in tokenizer.parameters()))
        if tokenizer.learned:
            metrics.update(tokenizer.stage1_metrics())  # e.g. CRT's tok/crt_flops_share
        # KL to uniform needs many tokens per cell (V, and V² for bigrams): the train split has 16× the val's.
        metrics.update(token_statistics(caches["train"].batches(), tokenizer.vocab_size))
        metrics["data/train_items"] = float(len(caches["train"]))
        # unreadable items, and files a folder dataset could not even list (videofolder: no metadata)
        listed_out = sum(getattr(ds, "skipped_files", 0) for ds in (job.train_ds, job.val_ds))
        metrics["data/skipped"] = float(caches["train"].skipped + caches["val"].skipped + listed_out)
        tracker.log_metrics(run_id, metrics)
        tracker.set_description(run_id, describe(metrics))
    return Stage1Result(tokenizer, job.key, run_id, metrics, caches["train"], caches["val"])


def _caches(job: Stage1Job) -> dict[str, TokenCache]:
    """Both splits' token caches, keyed by the tokenizer key *and* a digest of its state file,
    so a retrained (or refitted) tokenizer never reads tokens written by its predecessor."""
    state_digest = hashlib.sha256((job.directory / "state.pt").read_bytes()).hexdigest()[:12]
    caches = {}
    for split, dataset in (("train", job.train_ds), ("val", job.val_ds)):
        cache_key = config_hash(job.key, state_digest, split, dataset.fingerprint())
        caches[split] = TokenCache.build_or_load(job.home / "cache", f"{split}-{cache_key}", dataset, job.tokenizer,
                                                 batch_size=job.data.encode_batch_size,
                                                 num_workers=job.data.num_workers)
    return caches


def _fit_or_load(job: Stage1Job, logging_to: tuple[Tracker, str] | None) -> dict[str, float]:
    """Restore the state in the job's directory, or produce it: learned tokenizers train by
    gradient (``lmgen.tokenizer_module``, curves logged to ``logging_to``), the others ``fit``
    on up to ``data.fit_images`` train images. The state is written atomically."""
    tokenizer, directory = job.tokenizer, job.directory
    state_path = directory / "state.pt"
    if state_path.is_file():
        load_tokenizer_state(tokenizer, state_path)
        return {}
    if tokenizer.learned:
        stats = _train_learned(job, logging_to)
    else:
        images = load_images(job.train_ds, job.data.fit_images, job.data.encode_batch_size, job.data.num_workers)
        stats = tokenizer.fit(images)
    with writing(state_path), atomic_write(state_path) as out:  # whole or not at all; a full disk: DiskFull
        torch.save(tokenizer.state_dict(), out)
    return dict(stats)


def _train_learned(job: Stage1Job, logging_to: tuple[Tracker, str] | None) -> dict[str, float]:
    """Stage 1 of a learned tokenizer: load ``tokenizer.checkpoint`` if given, else train it."""
    from lmgen.tokenizer_module import train_tokenizer  # Lightning system, only for learned arms

    tokenizer, data, t = job.tokenizer, job.data, job.config
    if t.checkpoint:
        path = Path(t.checkpoint).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer.checkpoint: no file at {path}")
        tokenizer.load_state_dict(safe_load(path))
        log.info("stage 1: loaded %s weights from %s", t.name, path)
        return {}
    train_images = load_images(job.train_ds, t.train_images, data.encode_batch_size, data.num_workers)
    val_images = load_images(job.val_ds, t.val_images, data.encode_batch_size, data.num_workers)
    logger = MlflowMetricLogger(*logging_to) if logging_to is not None else False
    return train_tokenizer(tokenizer, train_images, val_images, job.trainer, logger, job.directory / "checkpoints")


def _evaluate(job: Stage1Job, val_cache: TokenCache, tracker: Tracker, run_id: str, probe: Probe | None,
              batch_size: int = 256) -> dict[str, float]:
    """tok/psnr, tok/ssim, rFID, rate, code usage and decode validity on the val split; logs ``recon.png``."""
    tokenizer, val_ds = job.tokenizer, job.val_ds
    psnrs, ssims, valid, originals, recons, codes = [], [], [], [], [], []
    # Images held in memory: the rFID set with a probe, else only what recon.png shows.
    keep = (job.metrics.num_reference or len(val_cache)) if probe is not None else RECON_IMAGES
    for start in range(0, len(val_cache), batch_size):
        rows = range(start, min(start + batch_size, len(val_cache)))
        ids = torch.stack([val_cache[i][0] for i in rows])
        lengths = val_cache.lengths[start : rows.stop].clone()
        codes.append(ids[torch.arange(ids.shape[1]) < lengths[:, None]])
        decoded = tokenizer.decode(TokenBatch(ids=ids, lengths=lengths))
        real = torch.stack([val_ds[int(val_cache.indices[i])][0] for i in rows])
        psnrs.append(psnr(real, decoded.images).clamp(max=100.0))  # lossless → 100 dB, not inf; clips: all frames
        ssims.append(ssim(as_frames(real)[0], as_frames(decoded.images)[0]).view(len(real), -1).mean(1))
        valid.append(decoded.valid)
        if start < keep:
            originals.append(real[: keep - start])
            recons.append(decoded.images[: keep - start])
    originals_t, recons_t = torch.cat(originals), torch.cat(recons)
    metrics = {
        "tok/psnr": float(torch.cat(psnrs).mean()),
        "tok/ssim": float(torch.cat(ssims).mean()),
        "tok/decode_valid_rate": float(torch.cat(valid).float().mean()),
        "tok/vocab_size": float(tokenizer.vocab_size),
        "tok/max_tokens": float(tokenizer.max_tokens),
        **rate_metrics(val_cache.lengths, tokenizer.vocab_size),
        **code_metrics(torch.cat(codes), tokenizer.vocab_size, tuple(tokenizer.subcodes)),
    }
    if probe is not None and len(originals_t) >= 2:  # clips: the Fréchet distance of their frames
        recon_frames, original_frames = as_frames(recons_t)[0], as_frames(originals_t)[0]
        result = rfid_metrics(recon_frames, original_frames, probe, job.metrics.inception_weights,
                              seed=job.seed, cache_dir=reference_cache(job.home))
        metrics.update(result.metrics)
        # the probe's accuracy on reconstructions: the most a sampler of these codes can reach
        labels = val_cache.labels[: len(originals_t)].repeat_interleave(len(recon_frames) // len(originals_t))
        metrics["tok/class_accuracy"] = float((probe.predict(recon_frames) == labels).float().mean())
        log_fidelity_context(tracker, run_id, result, "tok")
        if job.metrics.bootstrap_resamples:  # each reconstruction resampled with its original
            interval = bootstrap_fd(probe.features(recon_frames), probe.features(original_frames), paired=True,
                                    n_resamples=job.metrics.bootstrap_resamples, seed=job.seed)
            metrics.update(interval.ci_metrics("tok/rfid_probe"))
    grid = _pairs_grid(originals_t[:RECON_IMAGES], recons_t[:RECON_IMAGES])
    tracker.log_image(run_id, grid, "recon.png")
    tracker.log_image_at(run_id, grid, "tok/recon", step=0)
    return metrics


def log_fidelity_context(tracker: Tracker, run_id: str, result: FidelityResult, prefix: str) -> None:
    """How a fidelity metric was computed (``<prefix>_fidelity.json``; the feature spaces as the
    ``eval.*`` params), and why any metric was skipped (``<prefix>_metrics_skipped.json``)."""
    log_fidelity_settings(tracker, run_id, result.params, prefix)
    if result.skipped:  # lmgen.metrics.fidelity has already logged each reason
        tracker.log_text(run_id, json.dumps(result.skipped, indent=1), f"{prefix}_metrics_skipped.json")


def log_fidelity_settings(tracker: Tracker, run_id: str, params: dict[str, str], scope: str) -> None:
    """``FidelityResult.params`` of one or more metric prefixes: the two every metric of a run
    shares as params (``run_page.eval_params``), all of them, by prefix, in ``<scope>_fidelity.json``."""
    if not params:
        return
    tracker.log_params(run_id, eval_params(params))
    by_prefix: dict[str, dict[str, str]] = {}
    for key, value in sorted(params.items()):
        prefix, _, setting = key.partition(".")
        by_prefix.setdefault(prefix, {})[setting] = value
    tracker.log_text(run_id, json.dumps(by_prefix, indent=1), f"{scope}_fidelity.json")


def as_frames(images: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Clips (N, T, 3, H, W) → (their frames (N·T, 3, H, W), each clip's label repeated (N·T,));
    images (N, 3, H, W) and labels pass through."""
    if images.dim() == 4:
        return images, labels
    n, t = images.shape[:2]
    return images.flatten(0, 1), None if labels is None else labels.view(-1, 1).expand(n, t).reshape(-1)


def _pairs_grid(originals: Tensor, recons: Tensor) -> np.ndarray:
    """recon.png: rows alternate originals / reconstructions, up to 8 images per row; clips:
    a row of frames per clip, each original above its reconstruction (the first 8 clips)."""
    if originals.dim() == 5:
        n = min(len(originals), 8)
        return to_grid(torch.stack([originals[:n], recons[:n]], 1).flatten(0, 2), nrow=originals.shape[1])
    per_row = min(8, len(originals))
    n = len(originals) - len(originals) % per_row
    interleaved = torch.stack([originals[:n].view(-1, per_row, *originals.shape[1:]),
                               recons[:n].view(-1, per_row, *recons.shape[1:])], 1).flatten(0, 2)
    return to_grid(interleaved, nrow=per_row)


def to_grid(images: Tensor, nrow: int, scale: int = 0) -> np.ndarray:
    """(N, 3, H, W) uint8 → (H', W', 3) uint8 grid, upscaled (nearest) to ≥ 64 px tiles."""
    scale = scale or max(1, 64 // images.shape[-1])
    big = images.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    return make_grid(big, nrow=nrow, padding=2, pad_value=255).permute(1, 2, 0).numpy()
