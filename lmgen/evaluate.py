"""Everything after training: sample, decode, score. Shared by ``lmgen run`` and ``lmgen eval``.

- ``sample_images``: class-conditional (round-robin) or unconditional samples, decoded.
- ``complete_prefixes``: JPEG-LM's prefix completion — the LM is prompted with the first
  tokens of real val images (the top ``r`` of each image, cut where the tokenizer says a
  stream can be continued: a row of the token grid, a JPEG restart marker) and samples the
  rest; the completions are scored against the originals.
- ``evaluate_model``: both, with every ``gen/*`` metric, ``samples.png``,
  ``prefix_completion.png`` (each also an image chart, ``gen/samples`` and
  ``gen/prefix_completion`` at the run's step) and ``per_class.csv`` (also an MLflow table,
  ``per_class.json``) logged to one MLflow run.

Clips (video tokenizers) are scored frame by frame: probe FD, class accuracy and the
per-class view compare the frames a decoder really produced with the frames of val clips;
``samples.png`` shows a row of frames per clip and ``samples.gif`` plays them.
Undecodable streams are counted and left out of every fidelity metric, never replaced.
Nothing here looks at a tokenizer's name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lmgen.config import ExperimentConfig, MetricsConfig, SampleConfig
from lmgen.data import SequenceLayout
from lmgen.datasets import ImageBatch, ImageDataset, load_batch
from lmgen.llama import Llama
from lmgen.metrics.bootstrap import BootstrapConfig, bootstrap_fd, interval_metrics
from lmgen.metrics.fidelity import KINDS, FidelityResult, class_accuracy, fidelity_keys, fidelity_metrics
from lmgen.metrics.longtail import PerClassFD, longtail_metrics, per_class_fd
from lmgen.metrics.probe import Probe
from lmgen.perf import resolve_precision
from lmgen.progress import phase
from lmgen.sampling import generate
from lmgen.stage1 import as_frames, log_fidelity_context, log_fidelity_settings, reference_cache, to_grid
from lmgen.tokenizers import ImageTokenizer, TokenBatch
from lmgen.tracking import Tracker

log = logging.getLogger(__name__)

PREFIX_SHEET_IMAGES = 8  # originals (and their completions per ratio) shown in prefix_completion.png
SAMPLE_STRIP_CLIPS = 16  # clips shown (a row of frames each) in samples.png


@dataclass(frozen=True)
class SampleSet:
    """Decoded samples: images (N, 3, H, W) uint8 (clips: (N, T, 3, H, W)), valid (N,) bool,
    labels (N,) int64 (the class asked for), lengths (N,) int64 image tokens per stream,
    seconds spent sampling + decoding; for prefix completions, prompt_fraction (N,) float:
    prompt tokens / the original's tokens; for clips, frames (N,) int64 frames decoded and,
    for clip completions, first_frame (N,) int64 the first frame the LM generated (the
    frames before it are the prompt's)."""

    images: Tensor
    valid: Tensor
    labels: Tensor
    lengths: Tensor
    seconds: float
    prompt_fraction: Tensor | None = None
    frames: Tensor | None = None
    first_frame: Tensor | None = None

    def good_frames(self) -> tuple[Tensor, Tensor]:
        """(images (M, 3, H, W), labels (M,)) of the decodable samples. Clips give the frames
        their decoder produced that the LM generated: neither a partial decode's padding nor
        a completion's prompt frames are scored."""
        if self.frames is None:
            return self.images[self.valid], self.labels[self.valid]
        t = torch.arange(self.images.shape[1])
        start = torch.zeros_like(self.frames) if self.first_frame is None else self.first_frame
        keep = (t >= start.view(-1, 1)) & (t < self.frames.view(-1, 1)) & self.valid.view(-1, 1)  # (N, T)
        return self.images[keep], self.labels.view(-1, 1).expand_as(keep)[keep]


@dataclass(frozen=True)
class Generator:
    """A trained Llama ready to write images: its sequence layout, the tokenizer that decodes
    its ids, the sampling settings (one block for every arm) and whether it samples under
    bf16 autocast (as it trained)."""

    model: Llama
    layout: SequenceLayout
    tokenizer: ImageTokenizer
    sample: SampleConfig
    bf16: bool = False

    @classmethod
    def for_run(cls, cfg: ExperimentConfig, model: Llama, layout: SequenceLayout,
                tokenizer: ImageTokenizer) -> Generator:
        bf16 = resolve_precision(cfg.train.precision, cfg.train.accelerator).startswith("bf16")
        return cls(model, layout, tokenizer, cfg.sample, bf16)

    def autocast(self) -> contextlib.AbstractContextManager:
        device = next(self.model.parameters()).device
        return torch.autocast(device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()


@dataclass(frozen=True)
class Scoring:
    """What samples are scored with and where the scores go: the scoring settings, the run's
    seed, the data (val images are the reference; train class frequencies the long-tail axis),
    the probe, the MLflow run, the reference-statistics cache and the training step the model
    reached (the step of the run's image charts)."""

    metrics: MetricsConfig
    seed: int
    train_ds: ImageDataset
    val_ds: ImageDataset
    probe: Probe | None
    tracker: Tracker
    run_id: str
    cache_dir: Path | None = None
    encode_batch_size: int = 256
    fps: float = 3.0  # samples.gif of clips
    step: int = 0

    @classmethod
    def for_run(cls, cfg: ExperimentConfig, train_ds: ImageDataset, val_ds: ImageDataset, probe: Probe | None,  # noqa: PLR0913
                tracker: Tracker, run_id: str, home: Path, step: int = 0) -> Scoring:
        return cls(cfg.metrics, cfg.seed, train_ds, val_ds, probe, tracker, run_id, reference_cache(home),
                   cfg.data.encode_batch_size, getattr(cfg.data, "fps", 3.0), step)

    def bootstrap(self) -> BootstrapConfig:
        """How this run's bootstrap intervals resample (``metrics.bootstrap_resamples``, the run's seed)."""
        return BootstrapConfig(n_resamples=self.metrics.bootstrap_resamples, seed=self.seed)


def prefix_key(ratio: float) -> str:
    """Metric prefix of prefix completion at ``ratio``: 0.25 → ``gen/prefix_r25``."""
    return f"gen/prefix_r{round(ratio * 100):d}"


def _sample_chunk(gen: Generator, labels: Tensor, prefix: TokenBatch | None = None) -> TokenBatch:
    """Image tokens of one batch: sampled after the cond token, or after cond + ``prefix``.

    labels: (B,) int64. prefix: the first ids of each image (``lengths`` per row, at least
    1) or None. Returns the whole image streams (prefix included), clipped to ``max_tokens``,
    with ids outside the image vocabulary replaced by 0 (the decoder then judges them).
    """
    s, b, layout = gen.sample, len(labels), gen.layout
    device = next(gen.model.parameters()).device
    cond = layout.cond_tokens(labels, b)  # (B, 1)
    if prefix is None:
        kept = torch.zeros(b, dtype=torch.int64)
        prompt = cond
    else:
        kept = prefix.lengths.cpu()
        prompt = torch.cat([cond, prefix.ids[:, : int(kept.max())].cpu()], 1)  # (B, 1 + longest prefix)
    uncond = torch.cat([layout.null_tokens(b), prompt[:, 1:]], 1) if s.cfg_scale != 1.0 else None
    budget = layout.max_tokens + int(layout.variable_length) - kept  # room left for new ids (+ EOS)
    with gen.autocast():
        out = generate(gen.model, prompt.to(device), budget.to(device), prompt_lengths=(1 + kept).to(device),
                       temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, cfg_scale=s.cfg_scale,
                       cfg_schedule=s.cfg_schedule, uncond_prompt=None if uncond is None else uncond.to(device),
                       allowed=layout.allowed().to(device), eos_id=layout.eos if layout.variable_length else None,
                       pad_id=layout.pad)
    new, new_len = out.tokens.cpu(), out.lengths.cpu()
    ids = torch.zeros(b, layout.max_tokens, dtype=torch.int64)
    lengths = (kept + new_len).clamp(max=layout.max_tokens)
    for i in range(b):
        k = int(kept[i])
        if k:
            ids[i, :k] = prefix.ids[i, :k]
        ids[i, k : int(lengths[i])] = new[i, : int(lengths[i]) - k]
    ids = torch.where(ids < layout.vocab_size, ids, torch.zeros_like(ids))
    return TokenBatch(ids=ids, lengths=lengths)


@torch.no_grad()
def sample_images(gen: Generator) -> SampleSet:
    """``sample.num_samples`` images (classes round-robin, so per-class metrics are balanced), decoded."""
    labels = torch.arange(gen.sample.num_samples) % gen.layout.num_classes
    return sample_and_decode(gen, labels, None)


def sample_and_decode(gen: Generator, labels: Tensor, prefixes: TokenBatch | None) -> SampleSet:
    """One image per label (int64 (N,), the class asked for), after its prefix's ids where
    ``prefixes`` is given, sampled in chunks of ``sample.batch_size`` and decoded."""
    model = gen.model
    was_training = model.training
    model.eval()
    images, valid, lengths, frames = [], [], [], []
    start = time.perf_counter()
    try:
        for chunk in torch.arange(len(labels)).split(gen.sample.batch_size):
            prefix = None if prefixes is None else TokenBatch(prefixes.ids[chunk], prefixes.lengths[chunk])
            tokens = _sample_chunk(gen, labels[chunk], prefix)
            decoded = gen.tokenizer.decode(tokens)  # never raises: undecodable streams come back valid=False
            images.append(decoded.images.cpu())
            valid.append(decoded.valid.cpu())
            lengths.append(tokens.lengths)
            if decoded.frames is not None:
                frames.append(decoded.frames.cpu())
    finally:
        model.train(was_training)
    return SampleSet(torch.cat(images), torch.cat(valid), labels, torch.cat(lengths), time.perf_counter() - start,
                     frames=torch.cat(frames) if frames else None)


@torch.no_grad()
def complete_prefixes(gen: Generator, originals: ImageBatch, ratio: float) -> SampleSet:
    """Prompt with the top ``ratio`` of each original's tokens (``tokenizer.prefix_lengths``)
    and its class (BOS for an unconditional model), sample the rest, decode.

    originals: uint8 images with labels. Raises ValueError where the tokenizer cannot cut a
    prefix (e.g. JPEG without restart markers).
    """
    tokenizer = gen.tokenizer
    tokens = tokenizer.encode(originals.images)
    cuts = tokenizer.prefix_lengths(tokens, ratio).cpu()
    prefixes = TokenBatch(ids=tokens.ids.cpu(), lengths=cuts)
    done = sample_and_decode(gen, originals.labels.cpu(), prefixes)
    done = dataclasses.replace(done, prompt_fraction=cuts / tokens.lengths.cpu())
    if done.frames is None:
        return done
    # Clips: the prompt decodes to its first k frames; a completion is valid when the LM's
    # part adds at least one decodable frame, and only those frames are scored.
    given = tokenizer.decode(prefixes).frames.cpu()
    return dataclasses.replace(done, first_frame=given, valid=done.valid & (done.frames > given))


def frame_batch(batch: ImageBatch) -> ImageBatch:
    """The frames of a batch of clips as a batch of images (labels and indices repeated per
    frame); a batch of images as it is."""
    if batch.images.dim() == 4:
        return batch
    frames, labels = as_frames(batch.images, batch.labels)
    indices = batch.indices.view(-1, 1).expand(batch.images.shape[:2]).reshape(-1)
    return ImageBatch(images=frames, labels=labels, indices=indices, skipped=batch.skipped)


def _fidelity(scoring: Scoring, generated: Tensor, reference: ImageBatch, prefix: str, reference_name: str,
              kinds: tuple[str, ...] = KINDS) -> FidelityResult:
    """Fidelity of generated images (or frames) against ``reference`` (clips: scored by their frames)."""
    return fidelity_metrics(generated, frame_batch(reference).images, probe=scoring.probe,
                            inception_weights=scoring.metrics.inception_weights, prefix=prefix,
                            reference_name=reference_name, seed=scoring.seed, cache_dir=scoring.cache_dir, kinds=kinds)


def evaluate_samples(scoring: Scoring, samples: SampleSet, layout: SequenceLayout,
                     reference: ImageBatch) -> dict[str, float]:
    """gen/* metrics of the decodable samples against ``reference`` (val images); samples.png (and
    the image chart ``gen/samples``); per_class.csv.

    Undecodable samples are counted (``gen/num_invalid``) and left out of every fidelity
    metric — never replaced.
    """
    probe, tracker, run_id = scoring.probe, scoring.tracker, scoring.run_id
    good, good_labels = samples.good_frames()
    metrics = {"gen/decode_valid_rate": float(samples.valid.float().mean()),
               "gen/num_invalid": float((~samples.valid).sum()),
               "gen/images_per_s": len(samples.images) / samples.seconds,
               "gen/tokens_per_image": float(samples.lengths.float().mean())}
    if samples.frames is not None:  # clips: how much of each decodable clip its decoder produced
        t, decoded = samples.images.shape[1], samples.frames[samples.valid]
        metrics["gen/partial_decode_rate"] = float(((samples.frames > 0) & (samples.frames < t)).float().mean())
        metrics["gen/frames_per_clip"] = float(decoded.float().mean()) if len(decoded) else 0.0
    if probe is not None and len(good) >= 2:
        result = _fidelity(scoring, good, reference, "gen", "val")
        metrics.update(result.metrics)
        log_fidelity_context(tracker, run_id, result, "gen")
        if scoring.metrics.bootstrap_resamples:  # this run's own sampling uncertainty
            asked = good_labels if layout.class_conditional else None
            metrics.update(interval_metrics(probe.features(good), probe.features(frame_batch(reference).images),
                                            scoring.bootstrap(), prefix="gen", space="probe",
                                            predictions=None if asked is None else probe.predict(good), labels=asked))
    elif probe is not None:
        reason = f"{len(good)} decodable images (or clip frames) from {len(samples.images)} samples; fidelity needs 2"
        log.warning("gen fidelity metrics skipped: %s", reason)
        tracker.log_text(run_id, json.dumps(dict.fromkeys(fidelity_keys("gen"), reason), indent=1),
                         "gen_metrics_skipped.json")
    if probe is not None and layout.class_conditional and len(good) > 0:
        per_class = _per_class_metrics(scoring, good, good_labels, frame_batch(reference))
        metrics.update(per_class)
    tracker.log_metrics(run_id, metrics)
    nrow = min(layout.num_classes if layout.class_conditional else 8, len(samples.images))
    if samples.images.dim() == 5:  # clips: a row of frames per clip, and the whole set playing as a GIF
        strip = samples.images[:SAMPLE_STRIP_CLIPS]
        grid = to_grid(strip.flatten(0, 1), nrow=strip.shape[1])
        frames = np.stack([to_grid(samples.images[:, t], nrow=nrow) for t in range(samples.images.shape[1])])
        tracker.log_animation(run_id, frames, "samples.gif", fps=scoring.fps)
    else:
        grid = to_grid(samples.images, nrow=nrow)
    tracker.log_image(run_id, grid, "samples.png")  # what analysis reads
    tracker.log_image_at(run_id, grid, "gen/samples", scoring.step)  # what the compare view shows side by side
    return metrics


def evaluate_prefixes(gen: Generator, scoring: Scoring, originals: ImageBatch) -> dict[str, float]:
    """Prefix completion at every ``metrics.prefix_ratios``: ``gen/prefix_r{pct}/fd_probe``
    (and ``/fid`` with Inception weights) of the decodable completions against the
    originals, ``/decode_valid_rate``, ``/num_invalid``; ``prefix_completion.png`` shows
    originals then one row of completions per ratio. A ratio the tokenizer cannot cut is
    skipped with the reason in ``gen_prefix_skipped.json``; it never fails the run.
    """
    probe, tracker, run_id = scoring.probe, scoring.tracker, scoring.run_id
    metrics: dict[str, float] = {}
    params: dict[str, str] = {}
    skipped: dict[str, str] = {}
    rows = [_sheet_images(originals.images[:PREFIX_SHEET_IMAGES])]
    for ratio in scoring.metrics.prefix_ratios:
        key = prefix_key(ratio)
        try:
            done = complete_prefixes(gen, originals, ratio)
        except ValueError as err:
            skipped[f"{key}/*"] = str(err)
            continue
        good, _ = done.good_frames()
        metrics[f"{key}/decode_valid_rate"] = float(done.valid.float().mean())
        metrics[f"{key}/num_invalid"] = float((~done.valid).sum())
        metrics[f"{key}/images_per_s"] = len(done.images) / done.seconds
        metrics[f"{key}/prompt_fraction"] = float(done.prompt_fraction.mean())  # tokens given, not the ratio asked
        if probe is not None and len(good) >= 2:
            result = _fidelity(scoring, good, originals, key, "prefix originals", kinds=("fd",))
            metrics.update(result.metrics)
            if scoring.metrics.bootstrap_resamples:
                interval = bootstrap_fd(probe.features(good), probe.features(frame_batch(originals).images),
                                        n_resamples=scoring.metrics.bootstrap_resamples, seed=scoring.seed)
                metrics.update(interval.ci_metrics(f"{key}/fd_probe"))
            params.update(result.params)
            skipped.update(result.skipped)
        elif probe is not None:
            skipped[f"{key}/fd_probe"] = (f"{len(good)} decodable images (or generated clip frames) from "
                                          f"{len(done.images)} completions; FD needs 2")
        rows.append(_sheet_images(done.images[:PREFIX_SHEET_IMAGES]))
    if skipped:  # one file for every ratio: why a prefix metric is missing
        log.warning("prefix completion: %d metric(s) skipped (first: %s: %s)", len(skipped), *next(iter(skipped.items())))
        tracker.log_text(run_id, json.dumps(skipped, indent=1), "gen_prefix_skipped.json")
    log_fidelity_settings(tracker, run_id, params, "gen_prefix")  # once for every ratio
    tracker.log_metrics(run_id, metrics)
    if len(rows) > 1:
        sheet = to_grid(torch.cat(rows), nrow=len(rows[0]))
        tracker.log_image(run_id, sheet, "prefix_completion.png")
        tracker.log_image_at(run_id, sheet, "gen/prefix_completion", scoring.step)
    return metrics


def _sheet_images(images: Tensor) -> Tensor:
    """What prefix_completion.png shows of each item: the image, or a clip's last frame (the
    one farthest from the prompt)."""
    return images[:, -1] if images.dim() == 5 else images


def evaluate_model(gen: Generator, scoring: Scoring) -> dict[str, float]:
    """Samples (``sample.num_samples``) and prefix completions (``metrics.prefix_samples`` val
    images × ``metrics.prefix_ratios``), every gen/* metric logged to the scoring run;
    ``gen/eval_seconds`` is the wall time of it all."""
    start = time.perf_counter()
    metrics: dict[str, float] = {}
    settings = scoring.metrics
    if gen.sample.num_samples > 0:
        reference = load_batch(scoring.val_ds, settings.num_reference, scoring.encode_batch_size)
        with phase(f"sampling and scoring {gen.sample.num_samples} images"):
            metrics.update(evaluate_samples(scoring, sample_images(gen), gen.layout, reference))
    if settings.prefix_samples > 0 and settings.prefix_ratios:
        originals = load_batch(scoring.val_ds, settings.prefix_samples, scoring.encode_batch_size)
        with phase(f"prefix completion of {len(originals)} val images at ratios {list(settings.prefix_ratios)}"):
            metrics.update(evaluate_prefixes(gen, scoring, originals))
    metrics["gen/eval_seconds"] = time.perf_counter() - start
    scoring.tracker.log_metrics(scoring.run_id, {"gen/eval_seconds": metrics["gen/eval_seconds"]})
    return metrics


def _per_class_metrics(scoring: Scoring, images: Tensor, labels: Tensor, reference: ImageBatch) -> dict[str, float]:
    """Class accuracy and the long-tail view (per-class probe FD vs train frequency) of class-conditional samples.

    images: uint8 (N, 3, H, W) decodable samples; labels: int64 (N,) the class asked for.
    Samples are class-balanced (round-robin), so per-class FD rests on ~N / num_classes
    images per class: noisy and biased upwards with a handful (NaN below 2); the rank
    correlations with frequency are only worth reading with tens of samples per class.
    Logs ``per_class.csv`` (analysis reads it) and the same as the MLflow table ``per_class.json``;
    returns the ``gen/*`` metrics.
    """
    probe, train_ds = scoring.probe, scoring.train_ds
    acc = class_accuracy(probe, images, labels)
    fd = per_class_fd(probe, images, labels, reference.images, reference.labels, probe.num_classes)
    table = _per_class_csv(train_ds, acc, fd)
    scoring.tracker.log_text(scoring.run_id, table, "per_class.csv")
    scoring.tracker.log_table(scoring.run_id, table, "per_class.json")
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
