"""FSQ against vector-quantize-pytorch's reference ``FSQ``, plus its code space and config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from lmgen.tokenizers import build_tokenizer
from lmgen.tokenizers.fsq import FiniteScalarQuantizer

ROOT = Path(__file__).resolve().parents[1]
# The FSQ paper's recommended levels (its Table 1) and the presets that use them.
RECOMMENDED = {"fsq_1k": ([8, 5, 5, 5], 2**10), "fsq_4k": ([7, 5, 5, 5, 5], 2**12),
               "fsq_16k": ([8, 8, 8, 6, 5], 2**14), "fsq_64k": ([8, 8, 8, 5, 5, 5], 2**16)}
LEVELS = [[8, 6, 5], *(levels for levels, _ in RECOMMENDED.values()), [3, 4], [9, 3]]


def _latents(levels: list[int], seed: int = 0) -> torch.Tensor:
    """(3·6, d, 16, 16): Gaussians at three scales (saturated tanh included) and values sitting on
    the rounding boundaries of every channel."""
    g = torch.Generator().manual_seed(seed)
    d = len(levels)
    z = torch.cat([torch.randn(6, d, 16, 16, generator=g) * s for s in (0.2, 1.0, 4.0)])
    fsq = FiniteScalarQuantizer(levels)
    # z where bounded = k + 0.5 exactly: ties of round(), the harshest test of the bounding arithmetic.
    ties = (torch.arange(16).float() - 8 + 0.5).view(1, 1, 1, 16).expand(1, d, 16, 16)
    inside = ((ties + fsq._offset) / fsq._half).clamp(-0.999, 0.999)
    z[0] = (torch.atanh(inside) - fsq._shift)[0]
    return z


@pytest.mark.parametrize("levels", LEVELS, ids=lambda v: "-".join(map(str, v)))
def test_fsq_matches_the_reference_fsq(levels: list[int]) -> None:
    """Same levels, same latents → the same partition of latent space (indices equal up to a fixed
    bijection — here the identity, both orders put channel 0 least significant), the same
    quantized values bit for bit, the same straight-through gradients, the same decode."""
    reference = pytest.importorskip("vector_quantize_pytorch").FSQ(levels=levels).eval()
    ours = FiniteScalarQuantizer(levels)
    assert ours.codebook_size == reference.codebook_size
    z = _latents(levels)
    z_ref, z_ours = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    quantized_ref, indices_ref = reference(z_ref)
    out = ours(z_ours)
    mine, theirs = out.indices.flatten(), indices_ref.long().flatten()
    pairs = torch.unique(torch.stack([mine, theirs]), dim=1)  # the map between the two codes
    assert len(pairs[0].unique()) == len(pairs[1].unique()) == pairs.shape[1], "not a bijection"
    assert torch.equal(mine, theirs)
    assert len(mine.unique()) >= min(ours.codebook_size, 40)  # the latents really spread over codes
    assert torch.equal(out.quantized, quantized_ref)
    g = torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
    (quantized_ref * g).sum().backward()
    (out.quantized * g).sum().backward()
    torch.testing.assert_close(z_ours.grad, z_ref.grad, rtol=0, atol=0)
    assert torch.equal(ours.lookup(out.indices), reference.indices_to_codes(indices_ref))


@pytest.mark.parametrize("levels", [[8, 6, 5], [7, 5, 5, 5, 5], [3, 4]], ids=lambda v: "-".join(map(str, v)))
def test_every_fsq_code_is_reachable_and_decodes_to_itself(levels: list[int]) -> None:
    fsq = FiniteScalarQuantizer(levels)
    k = fsq.codebook_size
    every = torch.arange(k).view(1, 1, k)
    values = fsq.lookup(every)  # (1, d, 1, K) in [-1, 1]
    assert values.min() >= -1 and values.max() <= 1
    assert torch.unique(values.view(len(levels), k).T, dim=0).shape[0] == k  # K distinct codes
    # The latent that lands exactly on each level (inverse of the bounding): back to its own index.
    bounded = values * fsq._half_width
    z = torch.atanh((bounded + fsq._offset) / fsq._half) - fsq._shift
    out = fsq(z)
    assert torch.equal(out.indices, every)
    assert float(out.stats["codebook_usage"]) == 1.0 and float(out.stats["level_usage"]) == 1.0
    assert torch.equal(fsq.levels_of(every), ((every.unsqueeze(1) // fsq._basis) % fsq._levels))


def test_fsq_tokenizer_vocab_label_and_bad_levels() -> None:
    tok = build_tokenizer({"name": "fsq", "levels": [8, 8, 8, 6, 5], "channels": 8}, (32, 24))
    assert tok.vocab_size == 15360 and tok.max_tokens == 8 * 6 and tok.subcodes == ()
    assert tok.quantizer.in_channels == 5 and tok.cfg.label() == "fsq 8-8-8-6-5 f4"
    assert not list(tok.quantizer.parameters()) and not tok.quantizer.state_dict()  # no codebook at all
    with pytest.raises(ValueError, match="fsq.levels"):
        build_tokenizer({"name": "fsq", "levels": [8, 2, 5]}, 32)
    with pytest.raises(ValueError, match="fsq.levels"):
        build_tokenizer({"name": "fsq", "levels": []}, 32)
    with pytest.raises(ValueError, match="2\\^31"):
        build_tokenizer({"name": "fsq", "levels": [1000] * 4}, 32)


def test_fsq_presets_use_the_papers_levels() -> None:
    for stem, (levels, nominal) in RECOMMENDED.items():
        block = yaml.safe_load((ROOT / f"experiments/tokenizers/{stem}.yaml").read_text())["tokenizer"]
        assert block["name"] == "fsq" and block["levels"] == levels, stem
        vocab = build_tokenizer(block, 32).vocab_size
        assert 0.9 < vocab / nominal < 1.1, (stem, vocab)  # "near 2^n" codes
