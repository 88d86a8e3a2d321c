"""Quantizer contracts (VQ, LFQ, BAE) against brute-force references, plus a real 2-rank DDP run."""

from __future__ import annotations

import math
import os
import socket
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from lmgen.tokenizers.fsq import FiniteScalarQuantizer
from lmgen.tokenizers.quantizers import (
    BinaryQuantizer,
    LookupFreeQuantizer,
    QuantizerOutput,
    VectorQuantizer,
    VQOptions,
    bits_to_indices,
    code_stats,
    factorized_entropies,
    indices_to_bits,
)
from lmgen.tokenizers.rvq import ResidualVectorQuantizer

FACTORIES = {
    "vq": lambda: VectorQuantizer(16, 6, VQOptions(restart_every=2)),
    "vq_l2": lambda: VectorQuantizer(16, 6, VQOptions(l2_norm=True, restart_every=2)),
    "vq_ema": lambda: VectorQuantizer(16, 6, VQOptions(ema=True, restart_every=2)),
    "lfq": lambda: LookupFreeQuantizer(6),
    "lfq_grouped": lambda: LookupFreeQuantizer(9, max_entropy_group_bits=4),
    "bae": lambda: BinaryQuantizer(6, 5),
    "bae_deterministic": lambda: BinaryQuantizer(6, 5, deterministic=True),
    "vq_simvq": lambda: VectorQuantizer(16, 6, VQOptions(simvq=True, restart_every=0)),
    "vq_rotation": lambda: VectorQuantizer(16, 6, VQOptions(rotation_trick=True, restart_every=2)),
    "vq_restart_pool": lambda: VectorQuantizer(16, 6, VQOptions(restart_every=2, restart_pool=2)),
    "fsq": lambda: FiniteScalarQuantizer([5, 4, 3]),
    "rvq": lambda: ResidualVectorQuantizer(16, 6, 3, options=VQOptions(restart_every=2)),
    "rvq_flat_shared": lambda: ResidualVectorQuantizer(16, 6, 3, shared=True, flat=True,
                                                       options=VQOptions(restart_every=2, rotation_trick=True)),
}


def _latents(q, b: int = 2, h: int = 3, w: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, q.in_channels, h, w, generator=torch.Generator().manual_seed(seed))


def _brute_entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-30).log()).sum(-1)


def _all_codes(bits: int) -> torch.Tensor:
    """(2^bits, bits) ±1 codes, row k = code k (bit i of k = channel i)."""
    return indices_to_bits(torch.arange(2**bits).view(-1, 1, 1), bits).view(-1, bits) * 2 - 1


# --------------------------------------------------------------------------- shared contract


@pytest.mark.parametrize("name", FACTORIES)
def test_contract_shapes_loss_stats_and_gradients(name):
    torch.manual_seed(0)
    q = FACTORIES[name]()
    q.train()
    for _ in range(3):  # a few steps, so VQ restarts (restart_every=2) run too
        z = _latents(q).requires_grad_(True)
        out = q(z)
    assert isinstance(out, QuantizerOutput)
    assert out.quantized.shape == (2, q.out_channels, 3, 4) and out.quantized.dtype == z.dtype
    per_position = getattr(q, "tokens_per_position", 1)  # flat RVQ: D ids per position, side by side
    assert out.indices.shape == (2, 3, 4 * per_position) and out.indices.dtype == torch.int64
    assert int(out.indices.min()) >= 0 and int(out.indices.max()) < q.codebook_size
    assert out.loss.shape == () and out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert {"codebook_usage", "perplexity", "entropy"} <= set(out.stats)
    for key, value in out.stats.items():
        assert value.shape == () and value.dtype == torch.float32 and not value.requires_grad, key
        assert torch.isfinite(value), key
    assert 0 < float(out.stats["codebook_usage"]) <= 1
    assert 1 <= float(out.stats["perplexity"]) <= 24 + 1e-4
    g = torch.randn_like(out.quantized)
    ((out.quantized * g).sum() + out.loss).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


@pytest.mark.parametrize("name", FACTORIES)
def test_eval_is_deterministic_stateless_and_lookup_matches(name):
    torch.manual_seed(0)
    q = FACTORIES[name]()
    q.train()
    q(_latents(q, seed=1))  # leave training state behind (EMA, usage, steps)
    q.eval()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    z = _latents(q, seed=2)
    first, second = q(z), q(z)
    assert torch.equal(first.indices, second.indices)
    assert torch.equal(first.quantized, second.quantized)
    assert torch.equal(first.loss, second.loss)
    for key, value in q.state_dict().items():
        assert torch.equal(value, before[key]), f"eval forward changed {key}"
    looked_up = q.lookup(first.indices)
    assert looked_up.dtype == torch.float32 and looked_up.shape == first.quantized.shape
    torch.testing.assert_close(looked_up, first.quantized, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", FACTORIES)
def test_bf16_autocast_gives_finite_loss_and_gradients(name):
    torch.manual_seed(0)
    q = FACTORIES[name]().train()
    z = _latents(q).to(torch.bfloat16).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z)
        total = out.quantized.float().sum() + out.loss
    assert out.quantized.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    assert torch.isfinite(out.loss)
    total.backward()
    assert torch.isfinite(z.grad.float()).all()


@pytest.mark.parametrize("name", ["vq", "vq_ema", "vq_simvq", "lfq", "rvq"])
def test_straight_through_passes_the_gradient_unchanged(name):
    q = FACTORIES[name]().train()
    z = _latents(q).requires_grad_(True)
    g = torch.randn(2, q.out_channels, 3, 4)
    (q(z).quantized * g).sum().backward()
    torch.testing.assert_close(z.grad, g)


# --------------------------------------------------------------------------- helpers


def test_bits_indices_round_trip_and_bit_order():
    bits = torch.tensor([1, 0, 1, 1], dtype=torch.bool).view(1, 4, 1, 1)  # channel 0 = LSB
    assert int(bits_to_indices(bits)) == 1 + 4 + 8
    for n in (1, 5, 62):
        idx = torch.randint(0, 2**n, (2, 3, 4), dtype=torch.int64)
        unpacked = indices_to_bits(idx, n)
        assert unpacked.shape == (2, n, 3, 4) and unpacked.dtype == torch.float32
        assert torch.equal(bits_to_indices(unpacked), idx)
        assert torch.equal(bits_to_indices(unpacked.bool()), idx)
    top = torch.full((1, 1, 1), 2**62 - 1, dtype=torch.int64)
    assert torch.equal(indices_to_bits(top, 62), torch.ones(1, 62, 1, 1))
    with pytest.raises(ValueError):
        indices_to_bits(top, 63)


def test_code_stats_counts_unique_codes():
    idx = torch.tensor([0, 0, 1, 3]).view(1, 2, 2)
    stats = code_stats(idx, 8)
    assert float(stats["codebook_usage"]) == pytest.approx(3 / 8)
    p = torch.tensor([0.5, 0.25, 0.25])
    assert float(stats["perplexity"]) == pytest.approx(math.exp(float(_brute_entropy(p))), rel=1e-6)
    huge = code_stats(torch.tensor([5, 2**61]).view(1, 1, 2), 2**62)  # no 2^62 histogram
    assert float(huge["codebook_usage"]) == pytest.approx(2 / 2**62)
    assert float(huge["perplexity"]) == pytest.approx(2.0)


# --------------------------------------------------------------------------- VQ


def test_vq_beta_sits_on_the_encoder_term():
    vq = VectorQuantizer(3, 4, VQOptions(beta=0.25, restart_every=0))
    codebook = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 0.0, -1.0], [5.0, 5.0, 5.0, 5.0]])
    vq.codebook.data.copy_(codebook)
    vq.initialised.fill_(True)
    z = torch.tensor([0.8, 1.5, 0.3, -0.2]).view(1, 4, 1, 1).requires_grad_(True)
    out = vq(z)
    assert int(out.indices) == 1
    e, zf = codebook[1], z.detach().view(4)
    assert float(out.loss.detach()) == pytest.approx(1.25 * float(((zf - e) ** 2).mean()), rel=1e-6)
    out.loss.backward()
    torch.testing.assert_close(z.grad.view(4), 2 * 0.25 * (zf - e) / 4)  # encoder: β
    torch.testing.assert_close(vq.codebook.grad[1], 2 * (e - zf) / 4)  # codebook: weight 1
    assert vq.codebook.grad[[0, 2]].abs().sum() == 0


@pytest.mark.parametrize("l2_norm", [False, True])
def test_vq_indices_are_the_true_nearest_codes(l2_norm):
    torch.manual_seed(0)
    vq = VectorQuantizer(64, 8, VQOptions(l2_norm=l2_norm)).eval()
    z = torch.randn(3, 8, 5, 5)
    out = vq(z)
    rows = z.permute(0, 2, 3, 1).reshape(-1, 8)
    codes = vq.codebook.detach()
    if l2_norm:
        rows, codes = F.normalize(rows, dim=1), F.normalize(codes, dim=1)
    dist2 = ((rows[:, None, :] - codes[None]) ** 2).sum(-1)  # (N, K) brute force
    assert torch.equal(out.indices.reshape(-1), dist2.argmin(1))
    p = torch.softmax(-dist2, dim=1)
    assert float(out.stats["entropy"]) == pytest.approx(float(_brute_entropy(p).mean()), rel=1e-4)
    assert float(out.stats["batch_entropy"]) == pytest.approx(float(_brute_entropy(p.mean(0))), rel=1e-4)


def test_vq_l2_norm_returns_unit_norm_codes():
    vq = VectorQuantizer(32, 6, VQOptions(l2_norm=True)).train()
    z = 3 * torch.randn(2, 6, 4, 4)
    for out in (vq(z), vq.eval()(z)):
        torch.testing.assert_close(out.quantized.norm(dim=1), torch.ones(2, 4, 4))
        torch.testing.assert_close(vq.lookup(out.indices).norm(dim=1), torch.ones(2, 4, 4))


def test_vq_ema_moves_the_used_code_to_the_latent_mean_without_gradient():
    vq = VectorQuantizer(2, 2, VQOptions(ema=True, ema_decay=0.5, restart_every=0)).train()
    vq.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    vq.ema_sum.copy_(vq.codebook)
    vq.initialised.fill_(True)
    assert not list(vq.parameters()) and "codebook" in vq.state_dict()
    mean = torch.tensor([1.0, 2.0])
    z = (mean.view(1, 2, 1, 1) + 0.1 * torch.randn(1, 2, 4, 4)).requires_grad_(True)
    n = 16
    out = vq(z)
    assert torch.equal(out.indices, torch.zeros(1, 4, 4, dtype=torch.int64))
    batch_mean = z.detach().mean((0, 2, 3))
    # ema_count = 0.5·1 + 0.5·n, ema_sum = 0.5·0 + 0.5·n·mean (Laplace smoothing: ~1e-5).
    torch.testing.assert_close(vq.codebook[0], batch_mean * n / (n + 1), atol=1e-3, rtol=0)
    torch.testing.assert_close(vq.codebook[1], torch.tensor([10.0, 10.0]), atol=1e-3, rtol=0)
    assert float(out.loss.detach()) == pytest.approx(0.25 * float(out.stats["commitment"]))
    out.loss.backward()
    assert z.grad is not None and not vq.codebook.requires_grad


def test_vq_dead_code_restart_replaces_an_unused_code_with_a_batch_latent():
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 2, VQOptions(restart_every=3, restart_threshold=1e-3)).train()
    vq.codebook.data.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [-1.0, 1.0], [50.0, 50.0]]))
    vq.initialised.fill_(True)
    centres = vq.codebook.detach()[:3].clone()
    restarted = []
    for step in range(3):
        pick = torch.randint(0, 3, (24,))
        rows = centres[pick] + 0.05 * torch.randn(24, 2)
        z = rows.view(1, 4, 6, 2).permute(0, 3, 1, 2)  # (1, 2, 4, 6)
        out = vq(z)
        restarted.append(float(out.stats["restarted_codes"]))
        if step < 2:
            assert torch.equal(vq.codebook.detach()[3], torch.tensor([50.0, 50.0]))
            assert float(out.stats["dead_codes"]) >= 1
    assert restarted == [0.0, 0.0, 1.0]
    new_code = vq.codebook.detach()[3]
    assert (rows - new_code).abs().sum(1).min() < 1e-6, "restarted code is not a latent of the batch"
    assert (vq.codebook.detach()[:3] == centres).all(), "a used code was restarted"
    assert float(out.stats["dead_codes"]) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_run(rank: int, ema: bool, pool: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)  # same initial codebook on every rank (as DDP's initial broadcast)
    vq = VectorQuantizer(8, 4, VQOptions(ema=ema, ema_decay=0.9, restart_every=2, restart_threshold=1e-3,
                                         restart_pool=pool)).train()
    with torch.no_grad():
        vq.codebook[7] = 100.0  # never used: must be restarted, identically on both ranks
        if ema:
            vq.ema_sum[7] = 100.0
        vq.initialised.fill_(True)
    torch.manual_seed(10 + rank)  # different latents and restart picks per rank
    for _ in range(5):  # restarts at calls 2 and 4; call 5 is a plain (EMA) update
        vq(torch.randn(2, 4, 3, 3) + rank)
    return {k: v.clone() for k, v in vq.state_dict().items()}


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        states = {"ema": _ddp_run(rank, ema=True), "grad": _ddp_run(rank, ema=False),
                  "pool": _ddp_run(rank, ema=False, pool=2)}
        torch.save(states, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_vq_ddp_ema_and_restarts_keep_codebooks_identical(tmp_path):
    """Each rank sees different latents; all-reduced statistics and rank-0 broadcasts after
    restarts must leave both ranks with the same codebook (a peer bug: desync across ranks)."""
    # Fork on Linux: the children inherit the imported torch. A spawned child re-imports torch
    # and this module (3-10 s on a loaded 2-core box) for a 0.5 s test; elsewhere, spawn.
    method = "fork" if sys.platform == "linux" else "spawn"
    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method=method)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert not torch.equal(r0["pool"]["pool"], r1["pool"]["pool"])  # each rank keeps its own latents
    for mode in ("ema", "grad", "pool"):
        for key, value in r0[mode].items():
            assert key == "pool" or torch.equal(value, r1[mode][key]), f"{mode}: {key} differs across ranks"
        code = r0[mode]["codebook"][7]
        assert code.abs().max() < 10, f"{mode}: the dead code was not restarted to a latent"


# --------------------------------------------------------------------------- LFQ


def test_lfq_indices_match_the_sign_pattern():
    lfq = LookupFreeQuantizer(10)
    z = torch.randn(2, 10, 4, 5)
    out = lfq(z)
    powers = torch.tensor([2**i for i in range(10)]).view(1, 10, 1, 1)
    assert torch.equal(out.indices, ((z > 0).long() * powers).sum(1))
    torch.testing.assert_close(lfq.lookup(out.indices), torch.where(z > 0, 1.0, -1.0))


@pytest.mark.parametrize(("scale", "tau"), [(0.01, 0.01), (1.0, 1.0)])
def test_lfq_exact_entropy_matches_brute_force_over_all_codes(scale, tau):
    bits = 4
    lfq = LookupFreeQuantizer(bits, entropy_temperature=tau)
    z = (scale * torch.randn(3, bits, 4, 4)).requires_grad_(True)
    out = lfq(z)
    rows = z.permute(0, 2, 3, 1).reshape(-1, bits)
    codes = _all_codes(bits)  # (16, 4)
    p = torch.softmax(-((rows[:, None, :] - codes[None]) ** 2).sum(-1) / tau, dim=1)  # (N, 16)
    per_sample, batch = _brute_entropy(p).mean(), _brute_entropy(p.mean(0))
    commitment = ((z - torch.where(z > 0, 1.0, -1.0)) ** 2).mean()
    expected = 0.25 * commitment + 0.1 * (per_sample - batch)
    assert float(out.stats["entropy"]) == pytest.approx(float(per_sample.detach()), rel=1e-4, abs=1e-6)
    assert float(out.stats["batch_entropy"]) == pytest.approx(float(batch.detach()), rel=1e-4)
    assert float(out.loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-4)
    (got,) = torch.autograd.grad(out.loss, z)
    (want,) = torch.autograd.grad(expected, z)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)


def test_grouped_batch_entropy_is_the_sum_of_exact_group_entropies():
    logits = 2 * torch.randn(200, 7)
    probs = torch.sigmoid(logits)

    def brute_batch_entropy(cols: slice) -> float:
        p1 = probs[:, cols]
        bits = (_all_codes(p1.shape[1]) + 1) / 2  # (2^g, g) 0/1
        joint = torch.where(bits[None] > 0, p1[:, None, :], 1 - p1[:, None, :]).prod(-1)  # (N, 2^g)
        return float(_brute_entropy(joint.mean(0)))

    exact = factorized_entropies(logits, max_group_bits=7)[1]
    assert float(exact) == pytest.approx(brute_batch_entropy(slice(0, 7)), rel=1e-5)
    grouped = factorized_entropies(logits, max_group_bits=3)[1]  # groups: bits 0-2, 3-5, 6
    parts = sum(brute_batch_entropy(s) for s in (slice(0, 3), slice(3, 6), slice(6, 7)))
    assert float(grouped) == pytest.approx(parts, rel=1e-5)
    assert float(grouped) >= float(exact) - 1e-5  # subadditivity: an upper bound of the joint


@pytest.mark.parametrize("bits", [24, 32])
def test_lfq_with_many_bits_never_builds_the_full_code_space(bits):
    lfq = LookupFreeQuantizer(bits).train()  # a (N, 2^24) float tensor alone would be 64 GiB
    z = torch.randn(2, bits, 8, 8, requires_grad=True)
    start = time.perf_counter()
    out = lfq(z)
    out.loss.backward()
    assert time.perf_counter() - start < 5.0
    assert torch.isfinite(out.loss) and torch.isfinite(z.grad).all()
    assert all(torch.isfinite(v) for v in out.stats.values())
    assert int(out.indices.min()) >= 0 and int(out.indices.max()) < 2**bits
    assert float(out.stats["codebook_usage"]) == pytest.approx(128 / 2**bits, rel=0.05)


# --------------------------------------------------------------------------- BAE


@pytest.mark.parametrize("train", [False, True])
def test_bae_uses_every_code_on_random_latents(train):
    torch.manual_seed(0)
    bae = BinaryQuantizer(8, 4).train(train)
    out = bae(torch.randn(4, 8, 32, 32))  # 4096 positions over 256 codes
    assert float(out.stats["codebook_usage"]) == 1.0
    assert float(out.stats["perplexity"]) > 240


def test_bae_eval_and_deterministic_mode_threshold_the_sigmoid():
    torch.manual_seed(0)
    z = torch.randn(2, 6, 8, 8)
    threshold = bits_to_indices(torch.sigmoid(z) > 0.5)
    bae = BinaryQuantizer(6, 3)
    assert torch.equal(bae.eval()(z).indices, threshold)
    assert torch.equal(BinaryQuantizer(6, 3, deterministic=True).train()(z).indices, threshold)
    assert not torch.equal(bae.train()(z).indices, threshold)  # training samples the bits


def test_bae_stochastic_bits_have_the_sigmoid_as_mean():
    torch.manual_seed(0)
    logits = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0])
    z = logits.view(1, 5, 1, 1).expand(1, 5, 40, 100).contiguous()
    out = BinaryQuantizer(5, 3).train()(z)
    means = indices_to_bits(out.indices, 5).mean((0, 2, 3))
    sigma = torch.sigmoid(logits)
    tolerance = 5 * (sigma * (1 - sigma) / 4000).sqrt()
    assert ((means - sigma).abs() < tolerance).all(), (means, sigma)
    assert float(out.stats["bit_balance"]) == pytest.approx(float(sigma.mean()), abs=0.02)
    bernoulli = -(sigma * sigma.log() + (1 - sigma) * (1 - sigma).log())
    assert float(out.stats["entropy"]) == pytest.approx(float(bernoulli.sum()), rel=1e-5)


def test_bae_straight_through_gradient_is_the_sigmoid_path():
    torch.manual_seed(0)
    bae = BinaryQuantizer(4, 3).train()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = bae(z)
    g = torch.randn_like(out.quantized)
    (out.quantized * g).sum().backward()
    weight = bae.embed.weight.detach().view(3, 4)  # (dim, bits)
    sigma = torch.sigmoid(z.detach())
    expected = torch.einsum("db,ndhw->nbhw", weight, g) * sigma * (1 - sigma)
    torch.testing.assert_close(z.grad, expected)
    assert float(out.loss) == 0.0


def test_vq_first_training_batch_initialises_the_codebook_from_latents():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 3).train()
    z = torch.randn(2, 3, 4, 4) * 0.01 + 5.0  # far from the N(0, 1) initial codes
    vq.eval()(z)
    assert not bool(vq.initialised)  # eval never initialises
    out = vq.train()(z)
    assert bool(vq.initialised)
    rows = z.permute(0, 2, 3, 1).reshape(-1, 3)
    # every code is one of the batch's latents, so all 16 codes are within reach
    assert (vq.codebook.detach()[:, None] - rows[None]).abs().sum(-1).min(1).values.max() < 1e-6
    assert float(out.stats["codebook_usage"]) > 0.5
    before = vq.codebook.detach().clone()
    vq(z * 2)  # later batches do not re-initialise
    assert torch.allclose(vq.codebook.detach(), before)

