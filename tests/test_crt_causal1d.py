"""The stage-2-aware tokenizers: CRT's causal regulariser and SEED-style 1-D causal tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_tokenizers import make_images

from lmgen.config import ConfigError, load_config
from lmgen.tokenizer_module import TokenizerModule
from lmgen.tokenizers import build_tokenizer
from lmgen.tokenizers.autoencoder import to_unit

ROOT = Path(__file__).resolve().parents[1]
TINY = {"channels": 8, "codebook_size": 64, "codebook_dim": 8, "seed": 3}


def _x(n: int = 4, size: int = 32) -> torch.Tensor:
    return to_unit(make_images(n, size, size, seed=7))


def _encoder_grad_norm(tok) -> float:
    grads = [p.grad for p in tok.encoder.parameters() if p.grad is not None]
    return float(sum(g.norm() for g in grads)) if grads else 0.0


def test_crt_at_lambda_zero_is_plain_vq() -> None:
    """λ = 0: the same initial weights and, on the same batch, exactly VQ's stage-1 loss."""
    x = _x()
    vq = build_tokenizer({"name": "vq", **TINY}, 32)
    crt = build_tokenizer({"name": "crt", **TINY, "crt_weight": 0.0}, 32)
    crt_on = build_tokenizer({"name": "crt", **TINY, "crt_weight": 4.0, "crt_ramp_steps": 0}, 32)
    for tok in (crt, crt_on):
        shared = {k: v for k, v in tok.state_dict().items() if not k.startswith("predictor.")}
        assert shared.keys() == vq.state_dict().keys()
        assert all(torch.equal(v, vq.state_dict()[k]) for k, v in shared.items())
    losses = []
    for tok in (vq, crt, crt_on):
        torch.manual_seed(0)  # the codebook's data init samples latents from the global RNG
        losses.append(TokenizerModule(tok.train())._losses(x, step=5))
    (loss_vq, _, _), (loss_crt, parts, _), (loss_on, _, _) = losses
    assert torch.equal(loss_vq, loss_crt)
    assert float(parts["aux_loss"]) == 0.0 and "crt_loss" not in parts
    assert float(loss_on.detach()) > float(loss_vq.detach())  # the regulariser adds a positive term


@pytest.mark.parametrize("switches", [
    {},  # the paper: L2 to the next pre-quantisation latent
    {"crt_stop_grad": True},
    {"crt_target": "post"},
    {"crt_target": "post", "crt_stop_grad": True},
    {"crt_loss": "ce"},
    {"quantizer": "lfq", "bits": 6},
    {"codebook_size": 64, "l2_norm": True},
])
def test_crt_regulariser_sends_gradient_to_the_encoder(switches: dict) -> None:
    tok = build_tokenizer({"name": "crt", **TINY, "crt_weight": 4.0, **switches}, 32).train()
    out = tok(_x(), step=None)
    assert out.aux_loss.requires_grad and float(out.aux_loss.detach()) > 0
    assert {"crt_loss", "crt_weight", "crt_latent_rms"} <= set(out.aux_stats)
    out.aux_loss.backward()
    assert _encoder_grad_norm(tok) > 0
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in tok.decoder.parameters())
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in tok.predictor.parameters())


def test_crt_stop_grad_changes_the_encoder_gradient() -> None:
    """The switch matters: detaching the target removes the target-side gradient."""
    grads = []
    for stop in (False, True):
        tok = build_tokenizer({"name": "crt", **TINY, "crt_stop_grad": stop}, 32).train()
        tok(_x(), step=None).aux_loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in tok.encoder.parameters()]))
    assert not torch.allclose(grads[0], grads[1])


def test_crt_lambda_ramps_linearly() -> None:
    tok = build_tokenizer({"name": "crt", **TINY, "crt_weight": 4.0, "crt_ramp_steps": 100}, 32)
    assert [tok.crt_lambda(s) for s in (0, 25, 100, 5000, None)] == [0.0, 1.0, 4.0, 4.0, 4.0]
    out = tok.train()(_x(), step=0)  # λ = 0 at the first step: no regulariser, no gradient
    assert float(out.aux_loss) == 0.0 and not out.aux_loss.requires_grad


def test_crt_flops_share_and_lfq_subcodes() -> None:
    tok = build_tokenizer({"name": "crt", "channels": 32, "downsample": 4}, 32)  # the crt_vq_1k shape
    metrics = tok.stage1_metrics()
    assert 0.01 < metrics["tok/crt_flops_share"] < 0.10  # CRT: ~5% of tokenizer compute
    assert metrics["tok/crt_params"] == sum(p.numel() for p in tok.predictor.parameters())
    assert build_tokenizer({"name": "crt", **TINY, "crt_weight": 0.0}, 32).stage1_metrics()["tok/crt_flops_share"] == 0
    lfq = build_tokenizer({"name": "crt", "channels": 8, "quantizer": "lfq", "bits": 12, "num_subcodes": 2}, 32)
    assert lfq.vocab_size == 4096 and lfq.subcodes == (64, 64)


@pytest.mark.parametrize(("override", "key"), [
    ("tokenizer.crt_target=mid", "tokenizer.crt_target"),
    ("tokenizer.crt_loss=l1", "tokenizer.crt_loss"),
    ("tokenizer.quantizer=fsq", "tokenizer.quantizer"),
    ("tokenizer.crt_width=30", "tokenizer.crt_width"),
    ("tokenizer.crt_wieght=2", "crt_wieght"),
    ("tokenizer.num_subcodes=2", "tokenizer.num_subcodes"),
])
def test_crt_bad_config_fails_before_compute_naming_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_config(ROOT / "experiments/base.yaml", ["tokenizer=crt_vq_1k", override])


def test_crt_ce_refuses_huge_vocabularies() -> None:
    with pytest.raises(ValueError, match="crt_loss"):
        build_tokenizer({"name": "crt", "quantizer": "lfq", "bits": 18, "crt_loss": "ce"}, 32)


# ---- causal1d -------------------------------------------------------------------------------

C1D = {"name": "causal1d", "channels": 8, "codebook_size": 64, "codebook_dim": 8, "num_tokens": 12,
       "query_width": 32}


@pytest.mark.parametrize("query_init", ["pooled", "learned"])
@pytest.mark.parametrize("causal", [True, False])
def test_causal1d_token_i_ignores_queries_after_i(causal: bool, query_init: str) -> None:
    """Perturb learned query j: with the causal mask, no latent or token i < j changes (and the
    bidirectional ablation shows the check can fail)."""
    tok = build_tokenizer({**C1D, "causal": causal, "query_init": query_init}, 32).eval()
    images = make_images(6, 32, 32, seed=1)
    with torch.no_grad():
        before = tok.encoder(to_unit(images))  # (B, D, 1, Q)
        ids_before = tok.encode(images).ids
        j = 7
        tok.encoder.queries[j] += 3.0 * torch.randn(tok.encoder.queries.shape[1])
        after = tok.encoder(to_unit(images))
        ids_after = tok.encode(images).ids
    assert not torch.equal(before[..., j], after[..., j])  # the perturbation did something
    if causal:
        assert torch.equal(before[..., :j], after[..., :j])
        assert torch.equal(ids_before[:, :j], ids_after[:, :j])
    else:
        assert not torch.allclose(before[..., :j], after[..., :j])


def test_causal1d_tokens_per_image_is_the_number_of_queries() -> None:
    for size in ((32, 32), (24, 40), (64, 64)):
        tok = build_tokenizer(C1D, size)
        assert tok.max_tokens == 12 and tok.grid == (1, 12)
        batch = tok.encode(make_images(2, *size))
        assert batch.ids.shape == (2, 12) and batch.lengths.tolist() == [12, 12]
        decoded = tok.decode(batch)
        assert decoded.images.shape == (2, 3, *size) and decoded.valid.all()
    small, big = build_tokenizer(C1D, 32), build_tokenizer(C1D, 64)
    big.load_state_dict(small.state_dict())  # no size-dependent parameters: weights fit every resolution


def test_causal1d_bad_config() -> None:
    with pytest.raises(ConfigError, match="tokenizer.num_tokens"):
        load_config(ROOT / "experiments/base.yaml", ["tokenizer=causal1d_32", "tokenizer.num_tokens=0"])
    with pytest.raises(ConfigError, match="query_width"):
        load_config(ROOT / "experiments/base.yaml", ["tokenizer=causal1d_32", "tokenizer.query_width=30"])
    with pytest.raises(ConfigError, match="tokenizer.query_init"):
        load_config(ROOT / "experiments/base.yaml", ["tokenizer=causal1d_32", "tokenizer.query_init=random"])


@pytest.mark.parametrize(("cfg", "key"), [
    ({"name": "causal1d", "query_init": "random"}, "causal1d.query_init"),
    ({"name": "crt", "crt_target": "mid"}, "crt.crt_target"),
    ({"name": "vq", "precision": "64-true"}, "vq.precision"),
])
def test_choices_are_checked_without_load_config(cfg: dict, key: str) -> None:
    """build_tokenizer alone (no YAML schema) still refuses a value outside a field's choices."""
    with pytest.raises(ValueError, match=key):
        build_tokenizer(cfg, 32)
