"""Stage 2: the Lightning system that trains the shared Llama on token sequences.

The loss is next-token cross-entropy on image tokens (and EOS for codec streams) only: the
class/BOS position is never a target and PAD is ignored. Metrics are reported per image
(``lm/val_bits_per_image`` = summed NLL in bits over an image's tokens) so tokenizers with
different sequence lengths and vocabularies compare on one axis. With sub-code vocabularies
(ELM, MAGVIT-v2) a target's NLL is the sum of its sub-code heads' NLLs (``Llama.token_nll``),
so the per-image bits stay on that axis.

Each validation also records the loss at every token position (``val_loss_per_position``;
the run logs it as ``val_loss_per_position.csv``): CRT's claim is lower loss at every
position, most at late ones.

Speed (``SpeedConfig``): ``compile`` runs the forward and the loss through ``torch.compile``
(one graph: embedding, blocks, head and cross-entropy, so the elementwise work fuses);
AdamW is the fused kernel wherever torch has one (CPU and CUDA). ``lm/tokens_per_s`` counts
training time only (validation excluded) and ``lm/mfu`` divides the achieved training
FLOP/s by the device's peak (``lmgen.perf.device_peak``). Tokens, FLOPs and training time
travel in the checkpoint, so a resumed run keeps counting from where it stopped.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import lightning as L
import torch
from torch import Tensor

from lmgen.data import SequenceBatch, SequenceLayout
from lmgen.llama import Llama, LlamaConfig
from lmgen.perf import Peak, device_peak, precision_dtype

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptimConfig:
    """What the optimiser and schedule need (a view of ``TrainConfig``)."""

    lr: float = 3e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 100
    max_steps: int = 1000
    min_lr_ratio: float = 0.1
    class_dropout: float = 0.1
    max_bad_steps: int = 0  # non-finite losses/gradients skipped before the run fails (0: fail at the first)
    seed: int = 0  # seeds the module's own generator (label dropout)


class NonFiniteLossError(RuntimeError):
    """Training met a non-finite loss or gradient more often than ``max_bad_steps`` allows."""


@dataclass(frozen=True)
class SpeedConfig:
    """Switches that change speed, never results (a view of ``TrainConfig``)."""

    compile: bool = False  # torch.compile the forward + loss
    fused_adamw: bool = True  # torch's fused AdamW kernel where the device has one
    peak_flops: float = 0.0  # FLOP/s per device for lm/mfu; 0 = PEAK_FLOPS table (GPU) or measured (CPU)


def position_loss_csv(history: list[tuple[int, Tensor, Tensor]]) -> str:
    """``ARModule.val_loss_per_position`` as CSV: step, position, loss_nats, bits, count.

    position 0 is the first image token (predicted from the class/BOS token); ``count`` is how
    many val targets sit at that position (fewer at late positions of variable-length streams);
    positions no val sequence reaches have an empty loss.
    """
    rows = ["step,position,loss_nats,bits,count"]
    for step, loss, count in history:
        for pos, (nats, n) in enumerate(zip(loss.tolist(), count.tolist(), strict=True)):
            value = "" if n == 0 else f"{nats:.6g},{nats / math.log(2):.6g}"
            rows.append(f"{step},{pos},{value or ','},{n}")
    return "\n".join(rows) + "\n"


def lr_lambda(step: int, cfg: OptimConfig) -> float:
    """Linear warm-up then cosine decay to ``min_lr_ratio`` (multiplier of ``cfg.lr``)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class ARModule(L.LightningModule):
    """Next-token training of ``Llama`` over a ``SequenceLayout``."""

    def __init__(self, model_cfg: LlamaConfig, layout: SequenceLayout, optim: OptimConfig,
                 speed: SpeedConfig | None = None) -> None:
        super().__init__()
        if model_cfg.subcodes and layout.variable_length:
            raise ValueError(f"subcodes={model_cfg.subcodes} need a fixed-length layout: sub-code heads "
                             "cannot predict EOS, so variable-length (codec) streams cannot use them")
        if model_cfg.subcodes and layout.vocab_size != model_cfg.image_vocab:
            raise ValueError(f"layout.vocab_size={layout.vocab_size} != prod(subcodes)={model_cfg.image_vocab} "
                             f"for subcodes={model_cfg.subcodes}")
        self.model = Llama(model_cfg)
        self.layout, self.optim, self.speed = layout, optim, speed or SpeedConfig()
        # A compiled *function* (not module): the state dict keeps the plain model's keys.
        # Codec batches change width (trimmed to their longest stream): compile for dynamic shapes
        # at once rather than once static and again dynamic.
        dynamic = True if layout.variable_length else None
        self._nll = torch.compile(self._forward_nll, dynamic=dynamic) if self.speed.compile else self._forward_nll
        self.tokens_seen = 0  # target tokens, all ranks
        self.flops = 0.0  # training FLOPs so far, all ranks, at each batch's real length
        self.train_seconds = 0.0  # wall time of training so far, validation excluded
        self._clock = 0.0  # perf_counter at the start of the current stretch of training
        self._peak: Peak | None = None
        self.bad_steps = 0  # steps skipped for a non-finite loss or gradient
        # Label dropout draws from the module's own generator, saved in checkpoints: a resumed
        # run draws what the uninterrupted one would, whatever else used the global RNG.
        self._generator: torch.Generator | None = None
        self._generator_state: Tensor | None = None
        self._val_nll_bits: list[Tensor] = []
        self._val_tokens: list[Tensor] = []
        self._val_label_bits: list[Tensor] = []
        positions = layout.seq_len - 1  # target positions: image token 0 .. last (EOS for codec streams)
        self._val_position_nll = torch.zeros(positions, dtype=torch.float64)
        self._val_position_count = torch.zeros(positions, dtype=torch.int64)
        # One row per validation: (global step, (P,) mean NLL in nats at each target position,
        # (P,) targets scored there). CRT plots the last one: loss vs token position.
        self.val_loss_per_position: list[tuple[int, Tensor, Tensor]] = []

    # ---- losses -------------------------------------------------------------------------

    def token_nll(self, batch: SequenceBatch) -> tuple[Tensor, Tensor]:
        """(B, T) NLL in nats per target (0 where masked) and the (B, T) bool target mask."""
        try:
            return self._nll(batch.inputs, batch.targets)
        except torch._dynamo.exc.TorchDynamoException as err:
            if self._nll == self._forward_nll:  # not a compile failure: eager code raised it
                raise
            # A machine without a working C++ compiler (CPU inductor), or a graph the compiler
            # cannot handle: a speed switch must not cost the run, so go on eagerly.
            log.warning("train.compile: torch.compile failed (%s); continuing without it",
                        str(err).strip().splitlines()[0])
            self._nll = self._forward_nll
            return self._nll(batch.inputs, batch.targets)

    def _forward_nll(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.model(inputs)  # (B, T, C) float32
        mask = targets != self.layout.pad
        nll = self.model.token_nll(logits, targets, ignore_index=self.layout.pad)  # (B, T)
        return nll * mask, mask

    def loss(self, batch: SequenceBatch) -> tuple[Tensor, Tensor]:
        """Training loss (mean NLL per target, label dropout applied) and the target count."""
        batch = SequenceBatch(self.drop_labels(batch.inputs), batch.targets, batch.labels)
        nll, mask = self.token_nll(batch)
        count = mask.sum()
        return nll.sum() / count.clamp(min=1), count

    def drop_labels(self, inputs: Tensor) -> Tensor:
        """Replace the class token by the null class with p = class_dropout (CFG training)."""
        if not self.layout.class_conditional or self.optim.class_dropout <= 0:
            return inputs
        drop = torch.rand(inputs.shape[0], device=inputs.device, generator=self.generator(inputs.device))
        drop = drop < self.optim.class_dropout
        inputs = inputs.clone()
        inputs[drop, 0] = self.layout.null_class
        return inputs

    def generator(self, device: torch.device) -> torch.Generator:
        """The module's generator on ``device``: seeded from ``optim.seed`` (and the rank, so DDP
        ranks drop different labels), or a checkpoint's state."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device).manual_seed(self.optim.seed + 7919 * self.global_rank)
            if self._generator_state is not None:
                try:
                    self._generator.set_state(self._generator_state)
                except RuntimeError:  # saved on another device type (CPU vs CUDA state layouts)
                    log.warning("label-dropout generator state from another device type: reseeded")
        return self._generator

    def _skip_or_fail(self, what: str) -> None:
        """A non-finite ``what`` at this step: count it, say where, and raise past ``max_bad_steps``."""
        self.bad_steps += 1
        where = (f"non-finite {what} at global step {self.global_step} (epoch {self.current_epoch}, "
                 f"batch {self.trainer.fit_loop.epoch_loop.batch_progress.current.ready - 1})")
        self.log("lm/bad_steps", float(self.bad_steps), batch_size=1)
        if self.bad_steps > self.optim.max_bad_steps:
            raise NonFiniteLossError(f"{where}; the weights were not updated. {self.bad_steps} bad step(s) "
                                     f"> train.max_bad_steps={self.optim.max_bad_steps} (raise it to skip such steps, "
                                     "or lower train.lr / use train.precision=32-true)")
        log.warning("%s: step skipped (%d of train.max_bad_steps=%d)", where, self.bad_steps, self.optim.max_bad_steps)

    # ---- Lightning hooks ----------------------------------------------------------------

    def on_fit_start(self) -> None:
        self._clock = time.perf_counter()
        self._peak = device_peak(self.device, precision_dtype(str(self.trainer.precision)), self.speed.peak_flops)
        if self.logger is not None:  # logger.log_metrics is rank-zero only
            self.logger.log_metrics({"lm/params": float(self.model.num_params()),
                                     "lm/params_non_embedding": float(self.model.num_params(non_embedding=True)),
                                     "lm/peak_flops": self._peak.flops}, step=0)

    # Training time = fit time minus validations: each validation inside fit ends a stretch of
    # training and starts the next; a standalone trainer.validate() afterwards counts nothing.
    def on_validation_start(self) -> None:
        if self.trainer.state.fn == "fit":
            self.train_seconds += time.perf_counter() - self._clock

    def on_validation_end(self) -> None:
        self._clock = time.perf_counter()

    def on_train_end(self) -> None:
        self.train_seconds += time.perf_counter() - self._clock
        self._clock = time.perf_counter()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["lmgen_counters"] = {"tokens_seen": self.tokens_seen, "flops": self.flops,
                                        "train_seconds": self.train_seconds, "bad_steps": self.bad_steps}
        # Every rank's generator (on_save_checkpoint runs on all ranks; rank 0 writes): (world, N) uint8.
        state = self.generator(self.device).get_state().to(self.device)
        states = self.all_gather(state) if self.trainer.world_size > 1 else state[None]
        checkpoint["lmgen_generator"] = states.cpu()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        counters = checkpoint.get("lmgen_counters", {})
        self.tokens_seen = int(counters.get("tokens_seen", 0))
        self.flops = float(counters.get("flops", 0.0))
        self.train_seconds = float(counters.get("train_seconds", 0.0))
        self.bad_steps = int(counters.get("bad_steps", 0))
        states = checkpoint.get("lmgen_generator")  # (world, N): this rank's row (or rank 0's, if the world grew)
        self._generator = None
        self._generator_state = None if states is None else states[min(self.global_rank, len(states) - 1)].clone()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # A finite loss can still give inf/NaN gradients (an overflow in backward). Dropping the
        # gradients makes AdamW skip every parameter: no update, no weight decay, no moment change.
        # 16-mixed is left to its GradScaler, which skips its own overflowing steps.
        if self._precision() == "16-mixed":
            return
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        finite = torch.stack([g.isfinite().all() for g in grads]).all() if grads else torch.tensor(True)
        if not self.trainer.strategy.reduce_boolean_decision(bool(finite), all=True):
            optimizer.zero_grad(set_to_none=True)
            self._skip_or_fail("gradient")

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        # Lightning's mixed-precision plugin refuses to clip for any optimizer that unscales in its
        # own step (fused AdamW), bf16 included, where there is no scaler and nothing to unscale:
        # clip here then. 16-mixed (plain AdamW, see configure_optimizers) keeps Lightning's path,
        # which unscales before it clips.
        if gradient_clip_val and self._precision() != "16-mixed" and gradient_clip_algorithm in (None, "norm"):
            torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _precision(self) -> str | None:
        """The trainer's precision ("bf16-mixed", "32-true", ...), None outside a trainer."""
        return None if self._trainer is None else str(self._trainer.precision)

    def training_step(self, batch: SequenceBatch, batch_idx: int) -> Tensor | None:
        loss, count = self.loss(batch)
        # Every rank must agree, or DDP's all-reduce would wait for a backward that never runs.
        if not self.trainer.strategy.reduce_boolean_decision(bool(loss.isfinite()), all=True):
            self._skip_or_fail(f"loss ({float(loss)})")
            return None  # Lightning skips backward and the optimizer step
        self.tokens_seen += int(count) * self.trainer.world_size
        self.flops += self.model.flops_per_token(batch.inputs.shape[1]) * int(count) * self.trainer.world_size
        self.log("lm/train_loss", loss, prog_bar=True, batch_size=len(batch))
        self.log("lm/lr", self.lr_schedulers().get_last_lr()[0], batch_size=len(batch))
        return loss

    def validation_step(self, batch: SequenceBatch, batch_idx: int) -> None:
        nll, mask = self.token_nll(batch)
        self._val_nll_bits.append(nll.sum(1).double() / math.log(2))
        self._val_tokens.append(mask.sum(1))
        width = nll.shape[1]  # codec batches are padded to their longest stream only
        self._val_position_nll = self._val_position_nll.to(nll.device)
        self._val_position_count = self._val_position_count.to(nll.device)
        self._val_position_nll[:width] += nll.sum(0).double()
        self._val_position_count[:width] += mask.sum(0)
        if self.layout.class_conditional:  # what the class token is worth: the same images, prompted unconditionally
            null_nll, _ = self.token_nll(SequenceBatch(self._unlabelled(batch.inputs), batch.targets, batch.labels))
            self._val_label_bits.append((null_nll.sum(1) - nll.sum(1)).double() / math.log(2))

    def _unlabelled(self, inputs: Tensor) -> Tensor:
        """``inputs`` with every class token replaced by the null class (the CFG prompt)."""
        inputs = inputs.clone()
        inputs[:, 0] = self.layout.null_class
        return inputs

    def on_validation_epoch_end(self) -> None:
        if not self._val_nll_bits:
            return
        bits = self.all_gather(torch.cat(self._val_nll_bits)).flatten()
        tokens = self.all_gather(torch.cat(self._val_tokens)).flatten()
        self._val_nll_bits.clear()
        self._val_tokens.clear()
        self._record_position_loss()
        metrics = {
            "lm/val_loss": float(bits.sum() * math.log(2) / tokens.sum()),  # nats per token
            "lm/val_bits_per_image": float(bits.mean()),
            "lm/val_bits_per_token": float(bits.sum() / tokens.sum()),
            "lm/tokens_seen": float(self.tokens_seen),
            "lm/flops": self.flops,
        }
        if self._val_label_bits:
            # bits per image the class token saves: mean log2 p(image | class) / p(image | null class);
            # 0 while the model ignores the label (then class-conditional samples are at chance), about
            # the class's entropy once the null prompt has learnt the marginal (more while it lags)
            metrics["lm/val_label_bits"] = float(self.all_gather(torch.cat(self._val_label_bits)).flatten().mean())
            self._val_label_bits.clear()
        if self.train_seconds > 0:  # a validation after training steps: their speed so far
            metrics["lm/train_seconds"] = self.train_seconds
            metrics["lm/tokens_per_s"] = self.tokens_seen / self.train_seconds
            if self._peak is not None:
                metrics["lm/mfu"] = self.flops / self.train_seconds / (self._peak.flops * self.trainer.world_size)
        self.log_dict(metrics, rank_zero_only=True, sync_dist=False)

    def _record_position_loss(self) -> None:
        """Append this validation's per-position mean NLL (summed over ranks) and reset the sums."""
        positions = self._val_position_nll.shape[0]
        nll = self.all_gather(self._val_position_nll).reshape(-1, positions).sum(0).cpu()
        count = self.all_gather(self._val_position_count).reshape(-1, positions).sum(0).cpu()
        mean = torch.where(count > 0, nll / count.clamp(min=1), torch.full_like(nll, float("nan")))
        self.val_loss_per_position.append((int(self.global_step), mean, count))
        self._val_position_nll.zero_()
        self._val_position_count.zero_()

    def configure_optimizers(self) -> dict:
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            # Matrices decay; norms and embeddings (sub-code tables included) do not (LlamaGen/ELM).
            is_embedding = "embed" in name
            (decay if param.dim() >= 2 and not is_embedding else no_decay).append(param)
        groups = [{"params": decay, "weight_decay": self.optim.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        # The fused kernel (one launch for every tensor) exists for CPU and CUDA parameters. Under
        # 16-mixed it would unscale inside its step, after the clipping: the plain kernel there.
        fused = self.speed.fused_adamw and self.device.type in ("cpu", "cuda") and self._precision() != "16-mixed"
        optimizer = torch.optim.AdamW(groups, lr=self.optim.lr, betas=self.optim.betas, fused=fused)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, self.optim))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
