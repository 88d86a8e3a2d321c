"""Multi-scale residual VQ (VAR): the residual each scale quantizes, coarse-to-fine token order,
decoding from any complete prefix of scales, prompts cut after whole scales, bad configs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from test_tokenizers import make_images

from lmgen.metrics import psnr
from lmgen.tokenizers import TokenBatch, build_tokenizer
from lmgen.tokenizers.base import kept_rows
from lmgen.tokenizers.multiscale import MultiScaleQuantizer, scale_grids
from lmgen.tokenizers.quantizers import VQOptions

TINY = {"name": "multiscale", "channels": 8, "codebook_size": 64, "codebook_dim": 8}


def nearest(codes: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Ids of the nearest rows of codes (K, C) to each position of x (B, C, h, w), (B, h, w)."""
    rows = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    return torch.cdist(rows, codes).argmin(1).view(x.shape[0], *x.shape[2:])


def test_each_scale_quantizes_the_downsampled_residual_of_the_coarser_ones() -> None:
    """By hand: map k is the nearest codes of area-downsample(f − Σ_{j<k} bicubic-up(e_j)), and the
    quantized latent is the sum of the upsampled maps (= lookup of the ids)."""
    torch.manual_seed(0)
    q = MultiScaleQuantizer(32, 4, [1, 2, 4, 8], (8, 8), VQOptions(restart_every=0)).eval()
    q.quantizer.initialised.fill_(True)
    z = torch.randn(3, 4, 8, 8)
    out = q(z)
    assert out.indices.shape == (3, 1, 1 + 4 + 16 + 64)
    codes, f_hat, start = q.quantizer.codebook.detach(), torch.zeros_like(z), 0
    for side in (1, 2, 4, 8):
        residual = F.interpolate(z - f_hat, size=(side, side), mode="area") if side < 8 else z - f_hat
        ids = nearest(codes, residual)
        assert torch.equal(out.indices[:, 0, start : start + side * side], ids.flatten(1)), f"scale {side}"
        e = codes[ids].permute(0, 3, 1, 2)
        f_hat = f_hat + (F.interpolate(e, size=(8, 8), mode="bicubic", align_corners=False) if side < 8 else e)
        start += side * side
    torch.testing.assert_close(out.quantized, f_hat, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q.lookup(out.indices), f_hat, atol=1e-5, rtol=1e-5)
    # With every scale the residual is smaller than the latent (random codes: not scale by scale).
    assert float((z - f_hat).pow(2).mean()) < 0.7 * float(z.pow(2).mean())


def test_the_encoder_gets_the_straight_through_gradient_of_the_sum_and_the_codebook_learns() -> None:
    torch.manual_seed(0)
    q = MultiScaleQuantizer(16, 3, [1, 2], (2, 2), VQOptions(restart_every=0)).train()
    q.quantizer.initialised.fill_(True)
    z = torch.randn(2, 3, 2, 2, requires_grad=True)
    out = q(z)
    (out.quantized * torch.arange(24.0).view(2, 3, 2, 2)).sum().backward(retain_graph=True)
    torch.testing.assert_close(z.grad, torch.arange(24.0).view(2, 3, 2, 2))  # straight through
    z.grad = None
    out.loss.backward()
    assert q.quantizer.codebook.grad is not None and q.quantizer.codebook.grad.abs().sum() > 0
    assert z.grad.abs().sum() > 0  # commitment to every scale's code


def test_the_codebook_is_data_initialised_from_the_full_latent_not_the_1x1_map() -> None:
    torch.manual_seed(0)
    q = MultiScaleQuantizer(16, 2, [1, 4], (4, 4), VQOptions(restart_every=0)).train()
    z = torch.randn(1, 2, 4, 4) + 100.0  # 16 full-map rows, one 1×1 row
    q(z)
    rows = z.permute(0, 2, 3, 1).reshape(-1, 2)
    assert torch.cdist(q.quantizer.codebook.detach(), rows).min(1).values.max() < 1e-6  # every code is a row


def test_scale_grids_end_at_the_latent_and_keep_their_share_of_it() -> None:
    assert scale_grids([1, 2, 4, 8], 8, 8) == [(1, 1), (2, 2), (4, 4), (8, 8)]
    assert scale_grids([1, 2, 4, 8], 6, 10) == [(1, 1), (2, 2), (3, 5), (6, 10)]
    assert scale_grids([2, 4], 16, 16) == [(8, 8), (16, 16)]  # scales are shares of the last


def test_tokens_are_written_coarse_to_fine_and_prompts_are_whole_scales() -> None:
    tok = build_tokenizer(TINY, (32, 32))
    assert tok.max_tokens == 85 and tok.vocab_size == 64 and tok.scale_lengths == [1, 4, 16, 64]
    tokens = tok.encode(make_images(2, 32, 32))
    assert [int(tok.prefix_lengths(tokens, r)[0]) for r in (0.25, 0.5, 0.75)] == [1, 5, 21]
    assert [sum(tok.scale_lengths[: kept_rows(4, r)]) for r in (0.25, 0.5, 0.75)] == [1, 5, 21]
    assert tok.cfg.label() == "multiscale 64 1-2-4-8 f4"


@pytest.fixture(scope="module")
def trained():
    """A tiny multi-scale tokenizer trained by the real stage 1 on the test images."""
    from lmgen.tokenizer_module import train_tokenizer

    tok = build_tokenizer({**TINY, "steps": 200, "batch_size": 16, "lr": 1e-2, "warmup_steps": 10, "val_every": 1000,
                           "val_images": 8}, (32, 32))
    cpu = SimpleNamespace(accelerator="cpu", devices=1, num_nodes=1, strategy="auto")
    train_tokenizer(tok, make_images(64, 32, 32, seed=100), make_images(8, 32, 32, seed=101), cpu, False)
    return tok


def test_any_complete_prefix_of_scales_decodes_to_a_coarser_image(trained) -> None:
    images = make_images(16, 32, 32, seed=9)
    tokens = trained.encode(images)
    quality = []
    for k in range(1, 5):
        cut = sum(trained.scale_lengths[:k])
        prefix = TokenBatch(ids=tokens.ids[:, :cut], lengths=torch.full((16,), cut))
        decoded = trained.decode_scales(prefix, k)
        assert bool(decoded.valid.all())
        quality.append(float(psnr(images, decoded.images).mean()))
    assert quality == sorted(quality) and quality[-1] > quality[0] + 1.0  # finer scales, sharper images
    assert torch.equal(trained.decode_scales(tokens, 4).images, trained.decode(tokens).images)
    # The 1×1 map alone is one code for the whole image: a smooth image, far from the original.
    coarse = trained.decode_scales(tokens, 1).images.float()
    assert coarse.std((2, 3)).mean() < images.float().std((2, 3)).mean()


def test_a_short_or_bad_prefix_decodes_grey_and_invalid_never_raising(trained) -> None:
    tokens = trained.encode(make_images(3, 32, 32))
    ids = tokens.ids[:, :5].clone()
    ids[1, 2] = 10_000
    short = TokenBatch(ids=ids, lengths=torch.tensor([5, 5, 3]))
    decoded = trained.decode_scales(short, 2)  # needs 1 + 4 ids
    assert decoded.valid.tolist() == [True, False, False] and bool((decoded.images[1:] == 128).all())
    assert not bool(trained.decode(short).valid.any())  # a full decode needs all 85
    with pytest.raises(ValueError, match="num_scales"):
        trained.decode_scales(short, 5)


@pytest.mark.parametrize(("extra", "match"), [
    ({"scales": [1, 4, 2]}, "multiscale.scales must be strictly increasing"),
    ({"scales": []}, "multiscale.scales"),
    ({"scales": [1, 2, 16]}, "finer than the 8×8 latent"),
    ({"l2_norm": True}, "multiscale.l2_norm"),
    ({"simvq": True}, "multiscale.simvq"),
])
def test_bad_configs_fail_naming_the_key(extra: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_tokenizer({**TINY, **extra}, (32, 32))
