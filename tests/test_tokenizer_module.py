"""Learned tokenizers (vq, lfq, bae) and the stage-1 system that trains them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lmgen.config import ConfigError, load_config
from lmgen.tokenizer_module import PerceptualLoss, TokenizerModule, resolve_vgg_weights, train_tokenizer
from lmgen.tokenizers import build_tokenizer
from lmgen.tokenizers.autoencoder import AutoencoderConfig, Decoder, Encoder, to_uint8, to_unit

CPU = SimpleNamespace(accelerator="cpu", devices=1, num_nodes=1, strategy="auto")
TINY = {"channels": 16, "batch_size": 8, "lr": 2e-3, "warmup_steps": 2, "val_images": 8}


def images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 1, 1, generator=g) * 255
    ramp = torch.linspace(0, 60, size).view(1, 1, 1, size)
    return (base + ramp).clamp(0, 255).to(torch.uint8).expand(n, 3, size, size).contiguous()


@pytest.mark.parametrize(("downsample", "grid"), [(2, 16), (4, 8), (8, 4)])
def test_downsample_sets_tokens_per_image(downsample: int, grid: int) -> None:
    spec = AutoencoderConfig(channels=8, downsample=downsample)
    z = Encoder(spec, out_channels=5)(torch.zeros(2, 3, 32, 32))
    assert z.shape == (2, 5, grid, grid)
    assert Decoder(spec, in_channels=7)(torch.zeros(2, 7, grid, grid)).shape == (2, 3, 32, 32)
    for name in ("vq", "lfq", "bae"):
        tok = build_tokenizer({"name": name, "channels": 8, "downsample": downsample}, 32)
        assert tok.max_tokens == grid * grid


def test_unit_range_round_trip() -> None:
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    assert torch.equal(to_uint8(to_unit(x)), x)
    assert float(to_unit(x).min()) == -1.0 and float(to_unit(x).max()) == 1.0


def test_bad_learned_configs_fail_before_compute_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="tokenizer.downsample"):
        load_config(None, ["tokenizer.name=vq", "tokenizer.downsample=3"])
    with pytest.raises(ConfigError, match="tokenizer.downsample must be a power of two"):
        load_config(None, ["tokenizer.name=vq", "tokenizer.downsample=0"])
    with pytest.raises(ConfigError, match="tokenizer.num_subcodes"):
        load_config(None, ["tokenizer.name=bae", "tokenizer.bits=15", "tokenizer.num_subcodes=2"])
    with pytest.raises(ConfigError, match="tokenizer.codebok_size"):
        load_config(None, ["tokenizer.name=vq", "tokenizer.codebok_size=7"])
    with pytest.raises(ConfigError, match="tokenizer.precision"):
        load_config(None, ["tokenizer.name=lfq", "tokenizer.precision=fp8"])
    cfg = load_config(None, ["tokenizer.name=bae", "tokenizer.bits=20", "tokenizer.num_subcodes=2"])
    assert build_tokenizer(cfg.tokenizer, 32).subcodes == (1024, 1024)


def test_initial_weights_depend_only_on_the_tokenizer_seed() -> None:
    torch.manual_seed(1)
    a = build_tokenizer({"name": "vq", "channels": 8}, 16)
    torch.manual_seed(2)
    b = build_tokenizer({"name": "vq", "channels": 8}, 16)
    c = build_tokenizer({"name": "vq", "channels": 8, "seed": 1}, 16)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.encoder.stem.weight, c.encoder.stem.weight)


def test_encode_decode_keep_the_training_mode() -> None:
    tok = build_tokenizer({"name": "bae", "channels": 8, "bits": 8, "num_subcodes": 1}, 16)
    tok.train()
    x = images(4)
    first = tok.encode(x)
    assert tok.training
    assert torch.equal(tok.encode(x).ids, first.ids)  # eval-mode bits: deterministic threshold
    tok.decode(first)
    assert tok.training


@pytest.mark.parametrize("name", ["vq", "lfq", "bae"])
def test_stage1_training_reduces_reconstruction_error(name: str) -> None:
    x, val = images(64, seed=1), images(8, seed=2)
    extra = {"codebook_size": 64} if name == "vq" else {"bits": 8}
    tok = build_tokenizer({"name": name, **TINY, "steps": 120, **extra}, 16)

    def error() -> float:
        return float((tok.decode(tok.encode(val)).images.float() - val.float()).abs().mean())

    before = error()
    stats = train_tokenizer(tok, x, val, CPU, False)
    after = error()
    assert stats["tok/train_steps"] == 120 and stats["tok/train_images_per_s"] > 0
    assert after < 0.6 * before, (before, after)
    assert not tok.training


def test_zero_steps_is_the_untrained_baseline() -> None:
    tok = build_tokenizer({"name": "lfq", **TINY, "steps": 0}, 16)
    before = {k: v.clone() for k, v in tok.state_dict().items()}
    assert train_tokenizer(tok, images(8), images(4), CPU, False) == {"tok/train_steps": 0.0}
    assert all(torch.equal(before[k], v) for k, v in tok.state_dict().items())


def test_perceptual_hook_needs_weights_and_switches_on_with_them(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # an empty hub cache
    assert resolve_vgg_weights("auto") is None
    tok = build_tokenizer({"name": "vq", **TINY, "steps": 2, "perceptual_weight": 1.0}, 16)
    with pytest.raises(ValueError, match="tokenizer.perceptual_weights"):
        train_tokenizer(tok, images(16), images(4), CPU, False)
    with pytest.raises(ValueError, match="tokenizer.perceptual_weights"):
        resolve_vgg_weights(str(tmp_path / "missing.pth"))
    # A VGG16 feature stack saved as a torchvision state_dict stands in for the real weights.
    from torchvision.models import vgg16

    path = tmp_path / "vgg16.pth"
    torch.save({k: v for k, v in vgg16().state_dict().items() if k.startswith("features.")}, path)
    loss = PerceptualLoss(path)
    x = to_unit(images(2, size=32)).requires_grad_(True)
    y = to_unit(images(2, size=32, seed=5))
    assert float(loss(y, y)) == pytest.approx(0.0, abs=1e-6)
    value = loss(x, y)
    value.backward()
    assert float(value) > 0 and x.grad is not None and float(x.grad.abs().sum()) > 0
    assert not any(p.requires_grad for p in loss.parameters())
    module = TokenizerModule(tok, loss)
    _, parts, _ = module._losses(to_unit(images(4)), step=0)
    assert "perceptual_loss" in parts and float(parts["perceptual_loss"]) > 0


def test_adversarial_term_trains_a_discriminator(monkeypatch) -> None:
    tok = build_tokenizer({"name": "lfq", **TINY, "bits": 6, "steps": 4, "adversarial_weight": 0.1,
                           "adversarial_start": 1, "val_every": 4}, 16)
    seen = {}
    original = TokenizerModule.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen["module"] = self
        seen["initial"] = [p.detach().clone() for p in self.discriminator.parameters()]

    monkeypatch.setattr(TokenizerModule, "__init__", spy)
    train_tokenizer(tok, images(32), images(4), CPU, False)
    after = list(seen["module"].discriminator.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(seen["initial"], after, strict=True))
    assert seen["module"].global_step == 4  # tokenizer steps only: the critic's steps are not counted


def test_checkpoint_field_loads_weights_instead_of_training(tmp_path) -> None:
    from lmgen.stage1 import Stage1Job, _train_learned

    trained = build_tokenizer({"name": "vq", "channels": 8, "seed": 3}, 16)
    path = tmp_path / "state.pt"
    torch.save(trained.state_dict(), path)
    cfg = load_config(None, ["tokenizer.name=vq", "tokenizer.channels=8", f"tokenizer.checkpoint={path}"])
    tok = build_tokenizer(cfg.tokenizer, 16)
    job = Stage1Job(tok, cfg.tokenizer, cfg.data, None, None, tmp_path, cfg.train, cfg.metrics, cfg.seed)
    assert _train_learned(job, None) == {}  # no data touched, nothing trained
    assert all(torch.equal(a, b) for a, b in zip(tok.state_dict().values(), trained.state_dict().values(),
                                                 strict=True))
    cfg = load_config(None, ["tokenizer.name=vq", f"tokenizer.checkpoint={tmp_path / 'missing.pt'}"])
    with pytest.raises(FileNotFoundError, match="tokenizer.checkpoint"):
        missing = build_tokenizer(cfg.tokenizer, 16)
        _train_learned(Stage1Job(missing, cfg.tokenizer, cfg.data, None, None, tmp_path, cfg.train, cfg.metrics, 0), None)


def test_stage1_is_deterministic_given_the_tokenizer_config() -> None:
    """Same tokenizer block, same images → the same weights, whatever ran before (the stage-1
    hash must determine the tokenizer)."""
    states = []
    for noise in (0, 1):
        torch.manual_seed(noise)  # global RNG state left by earlier work must not matter
        tok = build_tokenizer({"name": "vq", **TINY, "steps": 6, "val_every": 3, "codebook_size": 32}, 16)
        train_tokenizer(tok, images(32, seed=1), images(4, seed=2), CPU, False)
        states.append(tok.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
