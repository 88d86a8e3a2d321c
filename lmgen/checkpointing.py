"""Checkpoints that survive crashes, and runs that survive preemption.

- ``AtomicCheckpointIO``: every checkpoint Lightning writes (the LM's and stage 1's) goes to a
  temporary file, is flushed to disk, and replaces ``last.ckpt`` in one rename
  (``lmgen.files.atomic_write``); the checkpoint it replaces is kept as ``last.prev.ckpt`` (a
  hard link, so ``last.ckpt`` exists at every instant). A crash while writing leaves no torn
  ``last.ckpt``.
- ``usable_checkpoint``: the newest intact checkpoint of the two (a zip archive whose every
  member passes its CRC) — a truncated or corrupt ``last.ckpt`` falls back to the previous one.
- ``Preemption``: SIGTERM (what SLURM, Kubernetes and ``kill`` send) during training lets the
  current step finish (Lightning's own handler), then writes ``last.ckpt``; outside training it
  interrupts at once. Either way the caller sees ``Preempted`` and marks the run KILLED; the
  process exits with ``PREEMPTED_EXIT`` (128 + SIGTERM), and a rerun resumes from the checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lmgen.files import atomic_write
from lmgen.paths import writing

log = logging.getLogger(__name__)

PREEMPTED_EXIT = 128 + signal.SIGTERM  # the shell's code for "terminated by SIGTERM": 143


class Preempted(SystemExit):
    """The run was asked to stop (SIGTERM); its checkpoint, if training had begun, is written."""

    def __init__(self) -> None:
        super().__init__(PREEMPTED_EXIT)


def previous_checkpoint(path: Path) -> Path:
    """``last.ckpt`` → ``last.prev.ckpt``: the checkpoint written before ``path``."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that never leaves a torn file at ``path`` (see the module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        path = Path(path)
        with writing(path), atomic_write(path, keep_previous=previous_checkpoint(path)) as out:  # full disk: DiskFull
            torch.save(checkpoint, out)


def intact(path: Path) -> bool:
    """True if ``path`` is a complete ``torch.save`` archive: a zip whose members all pass their CRC."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile, EOFError):
        return False


def usable_checkpoint(path: Path) -> Path | None:
    """``path`` if it is intact, else its intact predecessor (``last.prev.ckpt``), else None."""
    for candidate in (path, previous_checkpoint(path)):
        if not candidate.is_file():
            continue
        if intact(candidate):
            return candidate
        log.warning("checkpoint %s is damaged (truncated or corrupt); trying the one before it", candidate)
    return None


class Preemption(L.Callback):
    """SIGTERM handling for one run (see the module docstring); use ``with preemption.armed():``.

    While Lightning fits, its signal connector owns SIGTERM: it lets the current step finish,
    then raises ``SIGTERMException`` (at the batch's end, or inside the validation that follows).
    This callback writes ``checkpoint`` at the end of the training batch during which the signal
    came — where ModelCheckpoint writes too, so a restart resumes exactly as from a periodic
    checkpoint — or, if that moment has passed, when the exception arrives. The rest of the time
    the installed handler raises ``Preempted`` at once.
    """

    def __init__(self, checkpoint: Path | None) -> None:
        self.checkpoint = checkpoint
        self.fitting = False
        self.pending = False  # a SIGTERM came after fit began but before Lightning's handler was in place
        self._saved_step = -1

    def _handler(self, signum: int, frame: Any) -> None:
        if not self.fitting:  # during fit Lightning's own handler (which calls this one) takes over
            raise Preempted
        self.pending = True  # Lightning installs its handler after restoring a checkpoint: see on_train_start

    @contextlib.contextmanager
    def armed(self) -> Iterator[Preemption]:
        """Install the SIGTERM handler for the block (main thread only; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        before = signal.signal(signal.SIGTERM, self._handler)
        try:
            yield self
        except SIGTERMException:  # Lightning stopped fit after the step; the checkpoint is written
            raise Preempted from None
        finally:
            signal.signal(signal.SIGTERM, before)

    def _save(self, trainer: L.Trainer) -> None:
        if self.checkpoint is not None and self._saved_step != trainer.global_step:
            trainer.save_checkpoint(self.checkpoint)  # every rank takes part (the strategy syncs them)
            log.warning("SIGTERM: stopping after global step %d; checkpoint %s", trainer.global_step, self.checkpoint)

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.fitting = True

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.pending and not trainer.received_sigterm:  # came while fit restored: nothing trained since
            raise Preempted

    def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.fitting = False

    def on_save_checkpoint(self, trainer: L.Trainer, module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._saved_step = int(checkpoint.get("global_step", -1))

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        if trainer.received_sigterm:
            self._save(trainer)

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        self.fitting = False
        if isinstance(exception, SIGTERMException):
            self._save(trainer)
