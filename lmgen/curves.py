"""Generation learning curves: how well the Llama writes images as training goes on.

``lm/val_loss`` falls long before samples look like their class, and a loss is not comparable
across tokenizers in the way a sample is. With ``metrics.curve_samples = N`` every validation
also samples N class-conditional images (classes round-robin), decodes them and scores them with
the dataset's probe, logged at that training step:

- ``curve/class_accuracy`` (with ``_ci_low`` / ``_ci_high``): how often the probe recognises the
  class asked for, over the decodable samples (as ``gen/class_accuracy``);
- ``curve/fd_probe`` (with its interval): probe-space Fréchet distance to the val images;
- ``curve/decode_valid_rate``: decodable streams (a codec's bytes can fail to decode);
- ``curve/label_bits``: ``lm/val_label_bits`` of the same validation, the bits per val image the class
  token saves the Llama (0 while it ignores the label, when no sample can be of the asked class);
- ``curve/images_seen``: the x axis that compares arms at one budget (``lmgen plot gen_curves``).

Sampling draws from its own generator (seeded by the run's seed and the step) inside a forked
RNG, so a run with curves trains exactly as it would without them. Intervals are bootstrap
intervals over the N samples (``metrics.bootstrap_resamples``, at least 50 here).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import lightning as L
import torch
from torch import Tensor

from lmgen.evaluate import Generator, sample_and_decode
from lmgen.metrics.bootstrap import bootstrap_accuracy, bootstrap_fd
from lmgen.metrics.probe import Probe

log = logging.getLogger(__name__)

CURVE_PREFIX = "curve"
MIN_RESAMPLES = 50  # a curve point's interval, even when the run's own bootstrap is off


@dataclass
class GenerationCurve(L.Callback):
    """Scores ``num_samples`` class-conditional samples at the end of every validation (rank 0).

    ``generator``: the run's sampler over the model being trained; ``reference``: the probe's
    features of the val images (M, D), computed once; ``batch_size``: images per training step
    (for ``curve/images_seen``)."""

    generator: Generator
    probe: Probe
    reference: Tensor
    num_samples: int
    batch_size: int
    seed: int = 0
    n_resamples: int = 200

    def __post_init__(self) -> None:
        super().__init__()
        if not self.generator.layout.class_conditional:  # config.validate refuses it first
            raise ValueError("metrics.curve_samples needs a class-conditional model (the curve scores class accuracy)")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        step = int(trainer.global_step)
        metrics = self.score(step)
        label_bits = trainer.callback_metrics.get("lm/val_label_bits")  # this validation's, beside its curve point
        if label_bits is not None:
            metrics[f"{CURVE_PREFIX}/label_bits"] = float(label_bits)
        if trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=step)
        nan = float("nan")
        log.info("curve at step %d: class accuracy %.3f, probe FD %.2f, %d/%d decodable (%.1f s)", step,
                 metrics.get(f"{CURVE_PREFIX}/class_accuracy", nan), metrics.get(f"{CURVE_PREFIX}/fd_probe", nan),
                 round(metrics[f"{CURVE_PREFIX}/decode_valid_rate"] * self.num_samples), self.num_samples,
                 metrics[f"{CURVE_PREFIX}/seconds"])

    @torch.no_grad()
    def score(self, step: int) -> dict[str, float]:
        """The ``curve/*`` metrics of a fresh sample set at ``step``."""
        start = time.perf_counter()
        labels = torch.arange(self.num_samples) % self.generator.layout.num_classes
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):  # training's RNG streams stay untouched
            torch.manual_seed(self.seed * 1_000_003 + step)
            samples = sample_and_decode(self.generator, labels, None)
        good, asked = samples.good_frames()  # clips: the frames their decoder produced
        p = CURVE_PREFIX
        resamples = max(MIN_RESAMPLES, self.n_resamples)
        metrics = {f"{p}/images_seen": float(step * self.batch_size),
                   f"{p}/decode_valid_rate": float(samples.valid.float().mean())}
        if len(good):  # over the decodable samples, as gen/class_accuracy
            acc = bootstrap_accuracy(self.probe.predict(good), asked, n_resamples=resamples, seed=self.seed)
            metrics[f"{p}/class_accuracy"] = acc.estimate
            metrics.update(acc.ci_metrics(f"{p}/class_accuracy"))
        if len(good) >= 2:
            fd = bootstrap_fd(self.probe.features(good), self.reference, n_resamples=resamples, seed=self.seed)
            metrics[f"{p}/fd_probe"] = fd.estimate
            metrics.update(fd.ci_metrics(f"{p}/fd_probe"))
        metrics[f"{p}/seconds"] = time.perf_counter() - start
        return metrics
