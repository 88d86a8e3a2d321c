"""Stage 1 for learned tokenizers: the Lightning system that trains them by gradient.

The tokenizers themselves (``lmgen.tokenizers.vq/lfq/bae``) are plain ``nn.Module``s; this
module owns their losses, optimiser, schedule and logging:

    loss = l1·|x − x̂| + l2·(x − x̂)² + quantizer loss + tokenizer aux loss (CRT)
           [+ perceptual·VGG16 feature distance] [+ adversarial·PatchGAN hinge]

The perceptual term needs pretrained VGG16 weights, which cannot be fetched offline: it is
off by default and switches on where a weights file exists (``tokenizer.perceptual_weights``).
The adversarial term (a PatchGAN discriminator trained from scratch, hinge loss, as in
VQGAN) is off by default because it roughly doubles stage-1 compute.

Curves go to the stage-1 MLflow run: ``tok/train_loss``, ``tok/recon_loss``,
``tok/quant_loss``, ``tok/train_<quantizer stat>`` every few steps, and ``tok/val_psnr``,
``tok/val_loss``, ``tok/val_codebook_usage``, ``tok/val_perplexity`` every ``val_every``
steps on a fixed val subset. Final ``tok/*`` figures are computed by ``lmgen.stage1`` on the
token cache, the same way for every tokenizer.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lmgen.ar_module import OptimConfig, lr_lambda
from lmgen.checkpointing import AtomicCheckpointIO, previous_checkpoint, usable_checkpoint
from lmgen.metrics import psnr
from lmgen.perf import resolve_precision
from lmgen.progress import StepProgress
from lmgen.tokenizers.autoencoder import to_uint8, to_unit
from lmgen.tokenizers.learned import LearnedConfig, LearnedTokenizer
from lmgen.tokenizers.quantizers import code_stats

log = logging.getLogger(__name__)

# torchvision's file name for ImageNet VGG16 weights in torch's hub cache.
VGG16_FILE = "vgg16-397923af.pth"


def resolve_vgg_weights(setting: str) -> Path | None:
    """The VGG16 state_dict file for the perceptual loss: a path, or "auto" = torch's hub cache."""
    if setting in ("", "none"):
        return None
    if setting == "auto":
        path = Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE
        return path if path.is_file() else None
    path = Path(setting).expanduser()
    if not path.is_file():
        raise ValueError(f"tokenizer.perceptual_weights: no file at {path}")
    return path


class PerceptualLoss(nn.Module):
    """Distance between VGG16 features of two image batches (LPIPS without its learned weights).

    Features after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 are unit-normalised over
    channels; the loss is the sum over layers of their mean squared difference. Inputs are
    (B, 3, H, W) float in [-1, 1]. The network is frozen and kept in eval mode.
    """

    CUTS = (4, 9, 16, 23, 30)  # indices after each block's last ReLU in torchvision's vgg16.features

    def __init__(self, weights: Path) -> None:
        super().__init__()
        from torchvision.models import vgg16

        features = vgg16().features[: self.CUTS[-1]]
        state = torch.load(weights, map_location="cpu", weights_only=True)
        # A full torchvision vgg16 state_dict, or only its "features." part (the classifier is unused).
        wanted = {k: v for k, v in state.items() if k.startswith("features.")}
        missing = sorted(f"features.{k}" for k in features.state_dict() if f"features.{k}" not in wanted)
        if missing:
            raise ValueError(f"tokenizer.perceptual_weights: {weights} is not a VGG16 state_dict (missing {missing[:3]})")
        features.load_state_dict({k.removeprefix("features."): v for k, v in wanted.items()
                                  if k.removeprefix("features.") in features.state_dict()})
        self.features = features.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def train(self, mode: bool = True) -> PerceptualLoss:
        return super().train(False)  # frozen: never leave eval mode

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        h = torch.cat([x, y]).add(1).div(2).sub(self.mean).div(self.std)  # (2B, 3, H, W) ImageNet-normalised
        loss = torch.zeros((), device=x.device)
        start = 0
        for cut in self.CUTS:
            h = self.features[start:cut](h)
            start = cut
            fx, fy = F.normalize(h, dim=1).chunk(2)
            loss = loss + (fx - fy).pow(2).sum(1).mean()
        return loss


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017, as in VQGAN): (B, 3, H, W) → (B, 1, H/4, W/4) real/fake logits."""

    def __init__(self, channels: int = 32) -> None:
        super().__init__()
        c = channels
        self.net = nn.Sequential(
            nn.Conv2d(3, c, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(c, 2 * c, 4, 2, 1), nn.GroupNorm(8, 2 * c), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * c, 4 * c, 3, 1, 1), nn.GroupNorm(8, 4 * c), nn.LeakyReLU(0.2),
            nn.Conv2d(4 * c, 1, 3, 1, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class TokenizerModule(L.LightningModule):
    """Trains one ``LearnedTokenizer`` on batches of uint8 images (B, 3, H, W)."""

    def __init__(self, tokenizer: LearnedTokenizer, perceptual: nn.Module | None = None) -> None:
        super().__init__()
        cfg: LearnedConfig = tokenizer.cfg
        self.tokenizer, self.cfg = tokenizer, cfg
        self.perceptual = perceptual
        self.discriminator = PatchDiscriminator() if cfg.adversarial_weight > 0 else None
        self.automatic_optimization = False  # generator and discriminator alternate
        self._disc_opt: torch.optim.Optimizer | None = None
        self._val: list[tuple[Tensor, Tensor, Tensor]] = []

    def configure_optimizers(self) -> dict:
        c = self.cfg
        opt = torch.optim.AdamW(self.tokenizer.parameters(), lr=c.lr, betas=(c.beta1, c.beta2),
                                weight_decay=c.weight_decay)
        # The LM's schedule: linear warm-up, cosine decay to 10% of the peak.
        shape = OptimConfig(warmup_steps=c.warmup_steps, max_steps=c.steps, min_lr_ratio=0.1)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, shape))
        if self.discriminator is not None:
            # A plain optimiser outside Lightning's bookkeeping, so global_step counts tokenizer
            # steps only (max_steps = tokenizer.steps). VQGAN: Adam (0.5, 0.9) for the critic.
            self._disc_opt = torch.optim.Adam(self.discriminator.parameters(), lr=c.lr, betas=(0.5, 0.9))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def _recon_loss(self, recon: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean L1, mean L2 and their weighted sum (l1_weight, l2_weight) between (B, 3, H, W) images."""
        l1, l2 = (recon - x).abs().mean(), (recon - x).pow(2).mean()
        return l1, l2, self.cfg.l1_weight * l1 + self.cfg.l2_weight * l2

    def _losses(self, x: Tensor, step: int) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """Total generator loss, detached parts for logging, and the reconstruction."""
        c = self.cfg
        out = self.tokenizer(x, step=step)
        recon = out.recon.float()
        l1, l2, recon_loss = self._recon_loss(recon, x)
        loss = recon_loss + out.quant.loss + out.aux_loss
        parts = {"recon_l1": l1, "recon_l2": l2, "recon_loss": recon_loss,
                 "quant_loss": out.quant.loss, "aux_loss": out.aux_loss}
        if self.perceptual is not None and c.perceptual_weight > 0:
            parts["perceptual_loss"] = self.perceptual(recon, x)
            loss = loss + c.perceptual_weight * parts["perceptual_loss"]
        if self.discriminator is not None and step >= c.adversarial_start:
            parts["gen_adv_loss"] = -self.discriminator(recon).mean()
            loss = loss + c.adversarial_weight * parts["gen_adv_loss"]
        parts.update({f"train_{k}": v for k, v in out.quant.stats.items()})
        parts.update(out.aux_stats)
        return loss, {k: v.detach().float() for k, v in parts.items()}, recon

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        x = to_unit(batch[0])
        opt = self.optimizers()
        step = self.global_step
        loss, parts, recon = self._losses(x, step)
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.cfg.grad_clip:
            self.clip_gradients(opt, gradient_clip_val=self.cfg.grad_clip, gradient_clip_algorithm="norm")
        opt.step()
        self.lr_schedulers().step()
        if self.discriminator is not None and step >= self.cfg.adversarial_start:
            # Hinge loss (Lim & Ye 2017), as VQGAN's discriminator.
            d_loss = F.relu(1 - self.discriminator(x)).mean() + F.relu(1 + self.discriminator(recon.detach())).mean()
            self._disc_opt.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            self._disc_opt.step()
            parts["disc_loss"] = d_loss.detach()
        batch_size = x.shape[0]
        self.log("tok/train_loss", loss.detach(), prog_bar=True, batch_size=batch_size)
        self.log("tok/lr", self.lr_schedulers().get_last_lr()[0], batch_size=batch_size)
        self.log_dict({f"tok/{k}": v for k, v in parts.items()}, batch_size=batch_size)
        return loss.detach()

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> None:
        images = batch[0]
        x = to_unit(images)
        out = self.tokenizer(x)
        loss = self._recon_loss(out.recon.float(), x)[2]
        self._val.append((psnr(images, to_uint8(out.recon)).clamp(max=100.0).cpu(), out.quant.indices.flatten().cpu(),
                          loss.detach().cpu().expand(len(images))))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        psnrs, indices, losses = (torch.cat(parts) for parts in zip(*self._val, strict=True))
        self._val.clear()
        stats = code_stats(indices, self.tokenizer.vocab_size)
        self.log_dict({"tok/val_psnr": psnrs.mean(), "tok/val_loss": losses.mean(),
                       "tok/val_codebook_usage": stats["codebook_usage"], "tok/val_perplexity": stats["perplexity"]},
                      rank_zero_only=True, sync_dist=False)


def _loader(images: Tensor, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(TensorDataset(images), batch_size=min(batch_size, len(images)), shuffle=shuffle,
                      drop_last=shuffle, generator=generator)


def resume_point(last: Path) -> str | None:
    """The checkpoint an interrupted stage 1 resumes from: ``last`` if intact, else ``last.prev.ckpt``
    (``lmgen.checkpointing.usable_checkpoint``), else None: train from the start. Torn checkpoints
    passed over are removed (with a warning), so the next save keeps an intact one as
    ``last.prev.ckpt``, never a torn one."""
    usable = usable_checkpoint(last)
    torn = [path for path in (last, previous_checkpoint(last))[: 1 if usable is not None else 2]
            if path != usable and path.exists()]
    for path in torn:
        path.unlink(missing_ok=True)
    if usable is not None:
        log.info("stage 1: resuming tokenizer training from %s", usable)
        return str(usable)
    if torn:
        log.warning("stage 1: no intact checkpoint in %s (truncated or corrupt, removed): training the tokenizer "
                    "from the start", last.parent)
    return None


def train_tokenizer(tokenizer: LearnedTokenizer, train_images: Tensor, val_images: Tensor,  # noqa: PLR0913
                    trainer_cfg, logger, checkpoint_dir: Path | None = None) -> dict[str, float]:
    """Train ``tokenizer`` for ``tokenizer.cfg.steps`` steps; returns ``tok/train_*`` timing figures.

    train_images / val_images: uint8 (N, 3, H, W) held in memory (a 32×32 split of 4000
    images is 12 MB; large datasets cap it with ``tokenizer.train_images``). trainer_cfg
    supplies accelerator/devices/num_nodes/strategy (the experiment's ``train`` block).
    With ``checkpoint_dir``, ``last.ckpt`` is written there (atomically, the one before kept as
    ``last.prev.ckpt``) every ``val_every`` steps and an interrupted stage 1 resumes from the newer
    intact one of the two (``resume_point``).
    """
    cfg: LearnedConfig = tokenizer.cfg
    if cfg.steps == 0:  # an untrained tokenizer: the random-init baseline
        tokenizer.eval()
        return {"tok/train_steps": 0.0}
    weights = resolve_vgg_weights(cfg.perceptual_weights) if cfg.perceptual_weight > 0 else None
    if cfg.perceptual_weight > 0 and weights is None:
        raise ValueError(f"tokenizer.perceptual_weight={cfg.perceptual_weight} needs VGG16 weights: set "
                         f"tokenizer.perceptual_weights to a torchvision vgg16 state_dict file "
                         f"(none in {torch.hub.get_dir()}/checkpoints)")
    precision = resolve_precision(cfg.precision, trainer_cfg.accelerator)
    if cfg.adversarial_weight > 0 and precision == "16-mixed":
        raise ValueError("tokenizer.adversarial_weight > 0 needs precision 32-true or bf16-mixed, not 16-mixed")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = TokenizerModule(tokenizer, PerceptualLoss(weights) if weights is not None else None)
    callbacks, resume = [StepProgress("stage 1", loss_key="tok/train_loss")], None
    if checkpoint_dir is not None:
        # No version counter: a restart from scratch over a torn last.ckpt must write last.ckpt, not last-v1.ckpt.
        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, save_last=True, save_top_k=0,
                                         every_n_train_steps=cfg.val_every, enable_version_counter=False))
        resume = resume_point(checkpoint_dir / "last.ckpt")
    trainer = L.Trainer(
        max_steps=cfg.steps, accelerator=trainer_cfg.accelerator, devices=trainer_cfg.devices,
        num_nodes=trainer_cfg.num_nodes, strategy=trainer_cfg.strategy, precision=precision,
        val_check_interval=min(cfg.val_every, cfg.steps), check_val_every_n_epoch=None, num_sanity_val_steps=0,
        log_every_n_steps=max(1, min(25, cfg.steps // 20)), logger=logger, callbacks=callbacks,
        enable_checkpointing=checkpoint_dir is not None,
        enable_model_summary=False, enable_progress_bar=False, default_root_dir=str(checkpoint_dir or "."),
        plugins=[AtomicCheckpointIO()])  # the LM's checkpoint IO: temp file + rename, last.prev.ckpt kept
    start = time.perf_counter()
    val = val_images[: cfg.val_images] if cfg.val_images else val_images
    # Lightning warns that a manual-optimisation checkpoint holds the weights *after* the
    # step's update: exactly what resuming needs (the step counter matches), so say nothing.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
        trainer.fit(module, train_dataloaders=_loader(train_images, cfg.batch_size, True, cfg.seed),
                    val_dataloaders=_loader(val, 256, False, cfg.seed), ckpt_path=resume, weights_only=True)
    seconds = time.perf_counter() - start
    tokenizer.eval()
    images = cfg.steps * cfg.batch_size * trainer.world_size
    return {"tok/train_steps": float(cfg.steps), "tok/train_seconds": seconds,
            "tok/train_images_per_s": images / max(seconds, 1e-9)}
