"""What the console says while lmgen works: plain lines, no control characters, so that a
sweep point's log file reads as well as a terminal.

- ``StepProgress``: a Lightning callback printing, every ``every_s`` seconds and at the end,
  ``<label>: step 120/300 (40%) · loss 2.71 · 9.5 steps/s · about 19s left`` — steps counted
  to ``max_steps`` (not batches of an epoch), on rank 0.
- ``CountProgress``: the same for a loop over a known number of items (the token-cache writer);
- ``phase(label)``: a line as a long phase starts and one with its wall time as it ends
  (probe training, sampling, prefix completion).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from typing import Any

import lightning as L

log = logging.getLogger(__name__)


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class StepProgress(L.Callback):
    """One line every ``every_s`` seconds of training, and one at its last step (see module docstring)."""

    def __init__(self, label: str, every_s: float = 10.0, loss_key: str | None = None) -> None:
        self.label, self.every_s, self.loss_key = label, every_s, loss_key
        self._start = self._last = 0.0
        self._first_step = 0

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._start = self._last = time.perf_counter()
        self._first_step = trainer.global_step  # a resumed run counts its pace from where it resumed

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, *args: Any) -> None:
        now, step, total = time.perf_counter(), trainer.global_step, trainer.max_steps
        if not trainer.is_global_zero or (now - self._last < self.every_s and step < total):
            return
        self._last = now
        rate = (step - self._first_step) / max(now - self._start, 1e-9)
        loss = _loss(trainer, outputs, self.loss_key)
        parts = [f"{self.label}: step {step}/{total}" + (f" ({100 * step // total}%)" if total > 0 else "")]
        if loss is not None:
            parts.append(f"loss {loss:.4g}")
        parts.append(f"{rate:.1f} steps/s")
        if total > step and rate > 0:
            parts.append(f"about {duration((total - step) / rate)} left")
        log.info(" · ".join(parts))


def _loss(trainer: L.Trainer, outputs: Any, key: str | None) -> float | None:
    value = trainer.callback_metrics.get(key) if key else None
    if value is None and isinstance(outputs, dict):
        value = outputs.get("loss")
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


class CountProgress:
    """``<label>: 4096/20000 images (20%) · 1500 images/s · about 11s left``, every ``every_s``
    seconds of a loop over a known count of items (``update`` after each batch)."""

    def __init__(self, label: str, total: int, unit: str = "images", every_s: float = 10.0) -> None:
        self.label, self.total, self.unit, self.every_s = label, int(total), unit, every_s
        self.done = 0
        self._start = self._last = time.perf_counter()

    def update(self, count: int) -> None:
        self.done += int(count)
        now = time.perf_counter()
        if now - self._last < self.every_s or self.done >= self.total:
            return
        self._last = now
        rate = self.done / max(now - self._start, 1e-9)
        parts = [f"{self.label}: {self.done}/{self.total} {self.unit}"
                 + (f" ({100 * self.done // self.total}%)" if self.total > 0 else ""), f"{rate:.0f} {self.unit}/s"]
        if self.total > self.done and rate > 0:
            parts.append(f"about {duration((self.total - self.done) / rate)} left")
        log.info(" · ".join(parts))


@contextlib.contextmanager
def phase(label: str) -> Iterator[None]:
    """``<label>…`` as the block starts, ``<label>: done in 12s`` as it ends."""
    start = time.perf_counter()
    log.info("%s…", label)
    yield
    log.info("%s: done in %s", label, duration(time.perf_counter() - start))
