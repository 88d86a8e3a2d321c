"""Residual VQ: parity with vector-quantize-pytorch's ``ResidualVQ``, and its two layouts for the LM."""

from __future__ import annotations

import pytest
import torch

from lmgen.llama import split_subcodes
from lmgen.tokenizers import TokenBatch, build_tokenizer
from lmgen.tokenizers.base import kept_rows
from lmgen.tokenizers.quantizers import VQOptions
from lmgen.tokenizers.rvq import ResidualVectorQuantizer

TINY = {"name": "rvq", "channels": 8, "codebook_size": 16, "codebook_dim": 4, "depth": 3}


@pytest.mark.parametrize("flat", [False, True], ids=["subcodes", "flat"])
@pytest.mark.parametrize("shared", [False, True], ids=["per-depth", "shared"])
def test_rvq_assigns_residuals_as_the_reference_given_the_same_codebooks(shared: bool, flat: bool) -> None:
    """With the reference's codebooks set to ours (and nothing learning: eval mode), every depth
    picks the same code for the same residual, and the sums of the codes agree."""
    vqp = pytest.importorskip("vector_quantize_pytorch")
    torch.manual_seed(0)
    k, c, depth = 64, 6, 3
    ours = ResidualVectorQuantizer(k, c, depth, shared=shared, flat=flat, options=VQOptions()).eval()
    reference = vqp.ResidualVQ(dim=c, num_quantizers=depth, codebook_size=k, shared_codebook=shared).eval()
    for d in range(depth):
        reference.layers[d]._codebook.embed.data.copy_(ours.at_depth(d).codebook.data[None])
        reference.layers[d]._codebook.initted.data.fill_(True)
    z = 1.5 * torch.randn(4, c, 5, 7)
    quantized_ref, indices_ref, _ = reference(z.flatten(2).transpose(1, 2))  # (B, h·w, C), (B, h·w, D)
    out = ours(z)
    assert torch.equal(ours.digits(out.indices).flatten(1, 2), indices_ref.long())
    assert len(indices_ref[..., 1].unique()) > 10  # deeper depths really use their codebooks
    torch.testing.assert_close(out.quantized.flatten(2).transpose(1, 2), quantized_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.lookup(out.indices), out.quantized, atol=1e-5, rtol=1e-5)


def test_rvq_commits_the_encoder_to_every_partial_sum() -> None:
    """RQ-VAE's commitment Σ_d ||z − sg(Σ_{k≤d} e_k)||²: the loss's gradient to z is β·Σ_d 2(z − ẑ_d)/n."""
    torch.manual_seed(0)
    rvq = ResidualVectorQuantizer(8, 3, 2, options=VQOptions(beta=0.25, restart_every=0)).train()
    for q in rvq.quantizers:
        q.initialised.fill_(True)
    z = torch.randn(1, 3, 2, 2).requires_grad_(True)
    out = rvq(z)
    out.loss.backward()
    digits = rvq.digits(out.indices)
    e0, e1 = rvq.at_depth(0).lookup(digits[..., 0]), rvq.at_depth(1).lookup(digits[..., 1])
    n = z.numel()
    expected = 0.25 * (2 * (z.detach() - e0) / n + 2 * (z.detach() - e0 - e1) / n)
    torch.testing.assert_close(z.grad, expected, atol=1e-6, rtol=1e-5)


def test_subcodes_layout_is_the_llamas_sub_code_order() -> None:
    tok = build_tokenizer(TINY, (32, 24)).eval()
    assert tok.subcodes == (16, 16, 16) and tok.vocab_size == 16**3 and tok.max_tokens == 8 * 6
    images = torch.randint(0, 256, (2, 3, 32, 24), dtype=torch.uint8)
    ids = tok.encode(images).ids
    with torch.no_grad():
        composite = tok.quantizer(tok.encoder(images.float() / 127.5 - 1)).indices
    per_depth = torch.stack([tok.quantizer.at_depth(d)(r).indices.flatten(1) for d, r in
                             enumerate(_residuals(tok, images))], -1)  # (B, h·w, D), depth by depth
    assert torch.equal(split_subcodes(ids, tok.subcodes), per_depth)  # sub-code j is depth j
    assert torch.equal(ids, composite.flatten(1))
    assert tok.cfg.label() == "rvq 3×16 f4"


def _residuals(tok, images: torch.Tensor) -> list[torch.Tensor]:
    """The D residuals (B, C, h, w) the depths of an eval-mode rvq tokenizer quantize."""
    with torch.no_grad():
        r = tok.encoder(images.float() / 127.5 - 1)
        out = []
        for d in range(tok.cfg.depth):
            out.append(r)
            q = tok.quantizer.at_depth(d)
            r = r - q.lookup(q(r).indices)
    return out


def test_flat_layout_writes_depth_first_and_cuts_after_whole_rows() -> None:
    sub = build_tokenizer(TINY, (32, 24))
    flat = build_tokenizer({**TINY, "layout": "flat"}, (32, 24))
    flat.load_state_dict(sub.state_dict())  # the same weights: the layout changes only the ids' order
    assert flat.subcodes == () and flat.vocab_size == 16 and flat.max_tokens == 8 * 6 * 3
    images = torch.randint(0, 256, (3, 3, 32, 24), dtype=torch.uint8)
    a, b = sub.encode(images), flat.encode(images)
    depth_first = split_subcodes(a.ids, sub.subcodes).flatten(1)  # position 0: d0 d1 d2, position 1: ...
    assert torch.equal(b.ids, depth_first)
    assert torch.equal(flat.decode(b).images, sub.decode(a).images) and bool(flat.decode(b).valid.all())
    for ratio in (0.25, 0.5, 0.75):
        cut = flat.prefix_lengths(b, ratio)
        assert (cut == kept_rows(8, ratio) * 6 * 3).all() and (cut % 3 == 0).all()  # whole rows, whole positions
    short = TokenBatch(ids=b.ids[:, :-1], lengths=b.lengths - 1)  # one depth missing
    assert not bool(flat.decode(short).valid.any())
    assert flat.cfg.label() == "rvq 3×16 flat f4"


def test_rvq_config_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match="rvq.layout=flat"):
        build_tokenizer({"name": "rvq", "codebook_size": 1024, "depth": 4}, 32)  # 2^40 sub-code vocabulary
    assert build_tokenizer({"name": "rvq", "codebook_size": 1024, "depth": 4, "layout": "flat"}, 32).vocab_size == 1024
    with pytest.raises(ValueError, match="rvq.l2_norm"):
        build_tokenizer({"name": "rvq", "l2_norm": True}, 32)
    with pytest.raises(ValueError, match="rvq.depth"):
        build_tokenizer({"name": "rvq", "depth": 0}, 32)
    with pytest.raises(ValueError, match="rvq.layout"):
        build_tokenizer({"name": "rvq", "layout": "sideways"}, 32)
    with pytest.raises(ValueError, match="rvq.restart_every"):
        build_tokenizer({"name": "rvq", "simvq": True}, 32)
    one = build_tokenizer({"name": "rvq", "depth": 1}, 32)
    assert one.subcodes == () and one.vocab_size == 1024  # depth 1 is plain VQ


def test_shared_codebook_is_one_module_for_every_depth() -> None:
    shared = build_tokenizer({**TINY, "shared_codebook": True}, 32)
    per_depth = build_tokenizer(TINY, 32)
    assert len(shared.quantizer.quantizers) == 1 and len(per_depth.quantizer.quantizers) == 3
    assert shared.quantizer.at_depth(2) is shared.quantizer.at_depth(0)
    assert shared.cfg.label() == "rvq 3×16 shared f4"
