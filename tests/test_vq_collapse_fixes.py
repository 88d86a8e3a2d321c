"""The codebook-collapse fixes as VQ switches: SimVQ, the rotation trick and the restart pool.

Off by default and then invisible (plain VQ as before, to the bit); SimVQ keeps its random
codebook frozen and learns the linear map; the rotation trick changes gradients only.
"""

from __future__ import annotations

import pytest
import torch

from lmgen.config import load_config, run_config_hash
from lmgen.datasets import build_dataset
from lmgen.stage1 import tokenizer_key
from lmgen.tokenizers import build_tokenizer
from lmgen.tokenizers.quantizers import VectorQuantizer, VQOptions
from lmgen.tokenizers.rotation_trick import rotate_onto, rotation_trick
from lmgen.tokenizers.rvq import ResidualVectorQuantizer
from lmgen.tokenizers.vq import VQConfig

# ------------------------------------------------------------------------------- defaults


def test_both_switches_default_off() -> None:
    assert not VQOptions().simvq and not VQOptions().rotation_trick
    assert not VQConfig().simvq and not VQConfig().rotation_trick
    tok = build_tokenizer({"name": "vq", "channels": 8}, 16)
    assert not tok.quantizer.options.simvq and not tok.quantizer.options.rotation_trick
    assert "codebook_map.weight" not in tok.state_dict() and tok.quantizer.codebook.requires_grad
    assert VQConfig().label() == "vq 1k f4"


def _plain_vq_run() -> tuple[list[float], list[float], list[int], float]:
    """Four SGD steps of a default VectorQuantizer(32, 6) with restarts every 2 calls."""
    torch.manual_seed(0)
    vq = VectorQuantizer(32, 6, VQOptions(restart_every=2)).train()
    opt = torch.optim.SGD(vq.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    losses, grads = [], []
    for _ in range(4):
        z = (torch.randn(2, 6, 4, 4, generator=g) * 2 + 1).requires_grad_(True)
        out = vq(z)
        w = torch.randn(out.quantized.shape, generator=g)
        ((out.quantized * w).sum() + out.loss).backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
        grads.append(z.grad.double().pow(2).sum().item())
    return losses, grads, out.indices.flatten().tolist(), vq.codebook.detach().double().sum().item()


def test_plain_vq_is_unchanged_by_the_switches() -> None:
    """Golden values of the VectorQuantizer before SimVQ and the rotation trick existed (the same
    run of commit 9df236a's quantizers.py gave these, bit for bit): data init, restarts, losses,
    straight-through gradients and codebook updates must not move when both switches are off."""
    losses, grads, indices, codebook_sum = _plain_vq_run()
    assert losses == pytest.approx([0.0, 2.3377513885498047, 3.037144184112549, 2.11263108253479], rel=1e-6)
    assert grads == pytest.approx([204.37916185840444, 215.71655784381915, 229.62359136328345,
                                   184.03707325623043], rel=1e-6)
    assert indices == [22, 20, 22, 3, 4, 7, 1, 12, 14, 6, 23, 23, 28, 12, 24, 17, 4, 8, 3, 29, 19, 31, 1, 2, 0,
                       11, 13, 4, 13, 21, 28, 5]
    assert codebook_sum == pytest.approx(178.95406495197676, rel=1e-6)


# ---------------------------------------------------------------------------------- SimVQ


def test_simvq_keeps_the_codebook_frozen_and_learns_the_map() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(64, 4, VQOptions(simvq=True, restart_every=0)).train()
    frozen = vq.codebook.clone()
    assert not vq.codebook.requires_grad and "codebook" in dict(vq.named_buffers())
    assert [name for name, _ in vq.named_parameters()] == ["codebook_map.weight"]
    assert bool(vq.initialised)  # never data-initialised
    w0 = vq.codebook_map.weight.detach().clone()
    opt = torch.optim.Adam(vq.parameters(), lr=3e-2)
    z = torch.randn(8, 4, 4, 4) * 0.3 + 3.0  # latents far from the N(0, 1/D) basis
    first = None
    for _ in range(150):
        out = vq(z)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = float(out.stats["codebook_loss"]) if first is None else first
    assert torch.equal(vq.codebook, frozen), "the SimVQ basis moved"
    assert not torch.allclose(vq.codebook_map.weight, w0)
    assert float(out.stats["codebook_loss"]) < 0.1 * first  # the map moved the codes onto the latents
    torch.testing.assert_close(vq.lookup(out.indices), vq.eval()(z).quantized, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="frozen"):
        vq.init_codebook(z.flatten(2).transpose(1, 2).reshape(-1, 4))


def test_simvq_moves_every_code_with_one_gradient_step() -> None:
    """All codes share W: the codebook loss of one latent moves every code (none is left dead),
    where plain VQ moves only the code that latent picked."""
    torch.manual_seed(0)
    plain = VectorQuantizer(16, 4, VQOptions(restart_every=0)).train()
    plain.initialised.fill_(True)
    sim = VectorQuantizer(16, 4, VQOptions(simvq=True, restart_every=0)).train()
    every_code = torch.arange(16).view(1, 4, 4)
    moved = []
    for vq in (plain, sim):
        before = vq.lookup(every_code)
        vq(torch.randn(1, 4, 1, 1)).loss.backward()
        torch.optim.SGD(vq.parameters(), lr=0.1).step()
        moved.append(int(((vq.lookup(every_code) - before).abs().sum(1) > 0).sum()))
    assert moved == [1, 16]


def test_simvq_rejects_restarts_and_ema_naming_the_key() -> None:
    with pytest.raises(ValueError, match="vq.restart_every"):
        build_tokenizer({"name": "vq", "simvq": True}, 16)
    with pytest.raises(ValueError, match="vq.ema"):
        build_tokenizer({"name": "vq", "simvq": True, "ema": True, "restart_every": 0}, 16)
    tok = build_tokenizer({"name": "vq", "simvq": True, "restart_every": 0, "codebook_size": 64}, 16)
    assert tok.cfg.label() == "vq 64 f4 simvq" and "quantizer.codebook_map.weight" in tok.state_dict()


# -------------------------------------------------------------------------- rotation trick


def test_rotate_onto_is_a_rotation_and_rescale_onto_the_code() -> None:
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(50, 7, generator=g), 3 * torch.randn(50, 7, generator=g)
    torch.testing.assert_close(rotate_onto(x, e), e, atol=1e-5, rtol=1e-5)
    for i in range(3):  # the explicit matrix λR, its orthogonality and the gradient it gives
        xi, ei = x[i], e[i]
        u, q = xi / xi.norm(), ei / ei.norm()
        w = (u + q) / (u + q).norm()
        r = torch.eye(7) - 2 * torch.outer(w, w) + 2 * torch.outer(q, u)
        torch.testing.assert_close(r.T @ r, torch.eye(7), atol=1e-5, rtol=0)
        torch.testing.assert_close(r @ u, q, atol=1e-6, rtol=0)
        xg = xi.clone().requires_grad_(True)
        grad = torch.randn(7, generator=g)
        (rotate_onto(xg[None], ei[None])[0] * grad).sum().backward()
        torch.testing.assert_close(xg.grad, ei.norm() / xi.norm() * r.T @ grad, atol=1e-5, rtol=1e-5)
        assert float(xg.grad.norm()) == pytest.approx(float(ei.norm() / xi.norm() * grad.norm()), rel=1e-5)


def test_rotation_trick_keeps_the_forward_output_and_changes_the_gradient() -> None:
    torch.manual_seed(0)
    plain = VectorQuantizer(32, 6, VQOptions(restart_every=0)).train()
    rotated = VectorQuantizer(32, 6, VQOptions(restart_every=0, rotation_trick=True)).train()
    rotated.load_state_dict(plain.state_dict())
    plain.initialised.fill_(True)
    rotated.initialised.fill_(True)
    z1 = torch.randn(2, 6, 3, 5).requires_grad_(True)
    z2 = z1.detach().clone().requires_grad_(True)
    a, b = plain(z1), rotated(z2)
    assert torch.equal(a.quantized, b.quantized) and torch.equal(a.indices, b.indices)
    assert torch.equal(a.loss, b.loss)
    g = torch.randn_like(a.quantized)
    (a.quantized * g).sum().backward()
    (b.quantized * g).sum().backward()
    torch.testing.assert_close(z1.grad, g)  # straight-through: the gradient copied
    assert not torch.allclose(z2.grad, g, atol=1e-3)
    # per position, the rotated gradient is λRᵀg: its norm is ||e||/||z|| times g's
    e = plain.lookup(a.indices)
    expected = (e.norm(dim=1) / z1.detach().norm(dim=1)) * g.norm(dim=1)
    torch.testing.assert_close(z2.grad.norm(dim=1), expected, atol=1e-4, rtol=1e-4)


def test_rotation_trick_value_is_the_straight_through_value_bit_for_bit() -> None:
    g = torch.Generator().manual_seed(2)
    x, e = torch.randn(64, 5, generator=g).requires_grad_(True), torch.randn(64, 5, generator=g)
    straight = x + (e - x).detach()
    assert torch.equal(rotation_trick(x, e, straight), straight)
    zero = torch.zeros(2, 5, requires_grad=True)  # a zero latent has no direction: finite, no NaN
    out = rotation_trick(zero, torch.ones(2, 5), zero + (torch.ones(2, 5) - zero).detach())
    out.sum().backward()
    assert torch.isfinite(zero.grad).all()


def test_rvq_rotation_trick_rotates_onto_the_sum_of_the_codes() -> None:
    torch.manual_seed(0)
    plain = ResidualVectorQuantizer(16, 4, 3, options=VQOptions(restart_every=0)).eval()
    rotated = ResidualVectorQuantizer(16, 4, 3, options=VQOptions(restart_every=0, rotation_trick=True)).eval()
    rotated.load_state_dict(plain.state_dict())
    z1 = (2 * torch.randn(2, 4, 3, 3)).requires_grad_(True)
    z2 = z1.detach().clone().requires_grad_(True)
    a, b = plain(z1), rotated(z2)
    assert torch.equal(a.quantized, b.quantized) and torch.equal(a.indices, b.indices)
    g = torch.randn_like(a.quantized)
    (a.quantized * g).sum().backward()
    (b.quantized * g).sum().backward()
    torch.testing.assert_close(z1.grad, g)
    assert not torch.allclose(z2.grad, g, atol=1e-3)


def test_vq_tokenizer_switches_reach_the_quantizer_and_the_label() -> None:
    tok = build_tokenizer({"name": "vq", "rotation_trick": True, "codebook_size": 16384}, 16)
    assert tok.quantizer.options.rotation_trick and tok.cfg.label() == "vq 16k f4 rot"
    crt = build_tokenizer({"name": "crt", "simvq": True, "restart_every": 0}, 16)  # crt's VQ has them too
    assert crt.quantizer.options.simvq and "simvq" in crt.cfg.label()


# ---------------------------------------------------------------------------- restart pool


def _restarted_codes(pool: int) -> tuple[torch.Tensor, torch.Tensor, VectorQuantizer]:
    """One live code at the origin and 15 dead ones far away; three training calls of 8 distinct
    latents each, a restart at the third. Returns the 15 codes after it, every latent seen, and
    the quantizer."""
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 2, VQOptions(restart_every=3, restart_pool=pool)).train()
    vq.codebook.data.fill_(50.0)
    vq.codebook.data[0] = 0.0
    vq.initialised.fill_(True)
    seen = torch.arange(24.0).view(3, 8, 1) * 0.01 * torch.tensor([1.0, -1.0])  # (3 calls, 8, 2) distinct
    for rows in seen:
        out = vq(rows.T.reshape(1, 2, 2, 4))
    assert float(out.stats["restarted_codes"]) == 15
    return vq.codebook.detach()[1:], seen.reshape(-1, 2), vq


def test_restart_pool_gives_dead_codes_distinct_latents_of_earlier_batches() -> None:
    """From the current batch alone, 15 dead codes share its 8 latents (at least 7 exact copies,
    which can never win a latent); from a pool of the last 2·K = 32 latents they are 15 distinct
    latents, of all three calls."""
    batch_only, _, _ = _restarted_codes(pool=0)
    assert len(torch.unique(batch_only, dim=0)) <= 8
    pooled, seen, vq = _restarted_codes(pool=2)
    assert len(torch.unique(pooled, dim=0)) == 15
    match = (pooled[:, None, :] - seen[None]).abs().sum(-1) < 1e-6  # (15, 24)
    assert match.any(1).all(), "a restarted code is not a latent seen in training"
    assert match[:, :16].any(), "no restarted code came from an earlier batch"
    assert int(vq.pool_seen) == 24 and vq.pool.shape == (32, 2)


def test_restart_pool_is_a_ring_of_the_newest_latents_kept_in_the_state() -> None:
    vq = VectorQuantizer(4, 2, VQOptions(restart_every=100, restart_pool=2)).train()  # an 8-latent pool
    rows = torch.arange(20.0).view(10, 2)
    vq(rows[:6].T.reshape(1, 2, 1, 6))
    vq(rows[6:].T.reshape(1, 2, 1, 4))  # 10 latents written: the first two overwritten
    assert sorted(vq.pool[:, 0].tolist()) == rows[2:, 0].tolist()
    resumed = VectorQuantizer(4, 2, VQOptions(restart_every=100, restart_pool=2))
    resumed.load_state_dict(vq.state_dict())  # a resumed stage 1 restarts from the same latents
    assert torch.equal(resumed.pool, vq.pool) and int(resumed.pool_seen) == 10
    assert "quantizer.pool" not in build_tokenizer({"name": "vq", "channels": 8}, 16).state_dict()


def test_restart_pool_is_checked_naming_the_key_and_keeps_old_hashes() -> None:
    with pytest.raises(ValueError, match="vq.restart_pool"):
        build_tokenizer({"name": "vq", "restart_pool": -1}, 16)
    with pytest.raises(ValueError, match="vq.restart_pool"):
        build_tokenizer({"name": "vq", "restart_pool": 4, "restart_every": 0}, 16)
    tok = build_tokenizer({"name": "rvq", "restart_pool": 4, "codebook_size": 64}, 16)  # every VQ family has it
    assert all(q.options.restart_pool == 4 for q in tok.quantizer.quantizers)
    # Runs and stage-1 caches made before the key existed keep their hashes (pinned from before it).
    cfg = load_config("experiments/base.yaml", ["tokenizer=vq_16k"])
    assert run_config_hash(cfg) == "259ce92d8ec3"
    assert tokenizer_key(cfg.tokenizer, cfg.data.image_size, build_dataset(cfg.data, "train")) == "732e13171599"
    pooled = load_config("experiments/base.yaml", ["tokenizer=vq_16k", "tokenizer.restart_pool=4"])
    assert run_config_hash(pooled) != run_config_hash(cfg)
