"""Prefix completion (JPEG-LM's protocol): where tokenizers cut a prompt, and the completions the LM makes."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from test_tokenizers import CASE_IDS, CASES, build, make_images, make_inputs

from lmgen.config import load_config
from lmgen.data import SequenceLayout
from lmgen.datasets import ImageBatch
from lmgen.evaluate import Generator, Scoring, complete_prefixes, evaluate_prefixes, prefix_key
from lmgen.llama import Llama, llama_config
from lmgen.tokenizers import TOKENIZERS, build_tokenizer
from lmgen.tokenizers.base import kept_rows
from lmgen.tracking import Tracker

RATIOS = (0.25, 0.5, 0.75)


def test_kept_rows_rounds_half_up_and_leaves_something_on_both_sides() -> None:
    assert [kept_rows(8, r) for r in RATIOS] == [2, 4, 6]
    assert [kept_rows(5, r) for r in RATIOS] == [1, 3, 4]  # 1.25, 2.5 (half up, not to even), 3.75
    assert [kept_rows(2, r) for r in (0.01, 0.5, 0.99)] == [1, 1, 1]
    for bad in (0.0, 1.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="ratio"):
            kept_rows(8, bad)
    with pytest.raises(ValueError, match="2 rows"):
        kept_rows(1, 0.5)


@pytest.mark.parametrize(("name", "extra"), CASES, ids=CASE_IDS)
def test_contract_prefix_lengths(name: str, extra: dict) -> None:
    """Every tokenizer cuts every stream inside it, later for a larger ratio — or says why it cannot."""
    tok = build(name, extra, (32, 32), fit=not TOKENIZERS[name].learned)  # cuts need no trained weights
    tokens = tok.encode(make_inputs(tok, 4, 32, 32, seed=3))
    if name == "jpeg" and extra.get("restart_markers") is False:
        with pytest.raises(ValueError, match="restart_markers"):
            tok.prefix_lengths(tokens, 0.5)
        return
    cuts = torch.stack([tok.prefix_lengths(tokens, r) for r in RATIOS])  # (3, B)
    assert cuts.dtype == torch.int64 and cuts.shape == (3, 4)
    assert (cuts >= 1).all() and (cuts < tokens.lengths).all()
    assert (cuts[1:] >= cuts[:-1]).all()


def test_grid_cuts_are_whole_rows() -> None:
    images = make_images(2, 32, 24)
    raw = build_tokenizer({"name": "pixels"}, (32, 24))
    assert raw.prefix_lengths(raw.encode(images), 0.25).tolist() == [8 * 24 * 3] * 2  # 8 of 32 pixel rows, RGB
    vq = build_tokenizer({"name": "vq", "downsample": 4, "codebook_size": 16, "codebook_dim": 4}, (32, 24))
    assert vq.prefix_lengths(vq.encode(images), 0.75).tolist() == [6 * 6] * 2  # 6 of 8 grid rows of 6
    c1d = build_tokenizer({"name": "causal1d", "num_tokens": 12, "codebook_size": 16, "codebook_dim": 4}, (32, 24))
    assert c1d.prefix_lengths(c1d.encode(images), 0.5).tolist() == [6, 6]  # 1-D: half of the tokens


def _share_top(height: int, width: int, rows: int) -> torch.Tensor:
    """Two images equal in their top ``rows`` pixel rows and different below."""
    a, b = make_images(1, height, width, seed=1), make_images(1, height, width, seed=2)
    b[:, :, :rows] = a[:, :, :rows]
    return torch.cat([a, b])


def _common_prefix(x: torch.Tensor, y: torch.Tensor) -> int:
    n = min(len(x), len(y))
    differ = (x[:n] != y[:n]).nonzero()
    return int(differ[0]) if len(differ) else n


@pytest.mark.parametrize(("subsampling", "mcu"), [("4:4:4", 8), ("4:2:0", 16), ("4:2:2", 8)])
def test_jpeg_cut_ends_a_restart_interval_at_an_mcu_row(subsampling: str, mcu: int) -> None:
    """The cut is the last restart marker of the kept MCU rows: two images that agree in exactly
    those rows have identical streams up to the cut and part right after it."""
    h, w = 48, 40
    tok = build_tokenizer({"name": "jpeg", "subsampling": subsampling}, (h, w))
    for ratio in RATIOS:
        kept = kept_rows(h // mcu, ratio) * mcu
        tokens = tok.encode(_share_top(h, w, kept))
        cuts = tok.prefix_lengths(tokens, ratio)
        a, b = tokens.item(0), tokens.item(1)
        assert cuts[0] == cuts[1], "images agreeing in the kept rows must be cut at the same byte"
        cut = int(cuts[0])
        assert a[cut - 2] == 0xFF and 0xD0 <= int(a[cut - 1]) <= 0xD7  # right after an RST marker
        assert cut <= _common_prefix(a, b) < cut + 8  # the streams part within the first MCU after it


@pytest.mark.parametrize(("subsampling", "exact_rows"), [("4:4:4", 0), ("4:2:0", 1)])
def test_jpeg_prefix_alone_decodes_to_the_top_rows(subsampling: str, exact_rows: int) -> None:
    """The prompt plus EOI is a JPEG whose kept rows match the full image's (4:2:0's chroma
    upsampling blends the last pixel row with the next MCU row: that one row may differ)."""
    h, w = 48, 40
    tok = build_tokenizer({"name": "jpeg", "subsampling": subsampling}, (h, w))
    tokens = tok.encode(make_images(1, h, w, seed=5))
    full = tok.decode(tokens).images[0].permute(1, 2, 0).numpy()
    for ratio in RATIOS:
        cut = int(tok.prefix_lengths(tokens, ratio)[0])
        data = tok.to_jpeg_bytes(torch.cat([tokens.item(0)[:cut], torch.tensor([0xFF, 0xD9])]))
        with Image.open(io.BytesIO(data)) as im:
            part = np.asarray(im.convert("RGB"))
        mcu = 8 if subsampling == "4:4:4" else 16
        rows = kept_rows(h // mcu, ratio) * mcu - exact_rows
        assert np.array_equal(part[:rows], full[:rows])
        assert not np.array_equal(part[rows + exact_rows :], full[rows + exact_rows :])  # the rest is not there


# --- completions by a real (untrained) Llama ---------------------------------------------------


def _setup(tokenizer, num_classes: int = 3, **overrides) -> Generator:
    layout = SequenceLayout(tokenizer.vocab_size, tokenizer.max_tokens, num_classes, tokenizer.variable_length)
    torch.manual_seed(0)
    model = Llama(llama_config("nano", layout.total_vocab, layout.seq_len)).eval()
    cfg = load_config(None, ["train.precision=32-true", "sample.batch_size=3",
                             *[f"{k}={v}" for k, v in overrides.items()]])
    return Generator.for_run(cfg, model, layout, tokenizer), cfg


def _scoring(cfg, tracker: Tracker, run_id: str) -> Scoring:
    """Scoring without a probe (so without data): prefix completion counts and shows only."""
    return Scoring(cfg.metrics, cfg.seed, None, None, None, tracker, run_id)


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_completions_keep_the_prompt_and_sample_the_rest(cfg_scale: float) -> None:
    """Raw pixels are lossless, so the decoded completion shows the prompt's rows exactly."""
    tok = build_tokenizer({"name": "pixels"}, (8, 8))
    gen, _ = _setup(tok, **{"sample.cfg_scale": cfg_scale})
    images = make_images(5, 8, 8, seed=2)
    originals = ImageBatch(images=images, labels=torch.tensor([0, 1, 2, 0, 1]), indices=torch.arange(5), skipped=0)
    torch.manual_seed(1)
    done = complete_prefixes(gen, originals, 0.5)
    assert done.images.shape == images.shape and done.valid.all()
    assert torch.equal(done.lengths, torch.full((5,), 8 * 8 * 3))
    assert torch.equal(done.images[:, :, :4], images[:, :, :4])  # the prompt: the top 4 of 8 rows
    assert not torch.equal(done.images[:, :, 4:], images[:, :, 4:])  # sampled, not copied
    assert torch.equal(done.labels, originals.labels)


def test_jpeg_completions_start_with_the_prompt_bytes() -> None:
    """Variable-length streams: the completion is prompt bytes + sampled bytes (+ EOS); an
    untrained LM's bytes rarely decode, and that is counted, not hidden."""
    tok = build_tokenizer({"name": "jpeg"}, (32, 32))
    gen, _ = _setup(tok)
    images = make_images(3, 32, 32, seed=4)
    originals = ImageBatch(images=images, labels=torch.tensor([0, 1, 2]), indices=torch.arange(3), skipped=0)
    done = complete_prefixes(gen, originals, 0.5)
    cuts = tok.prefix_lengths(tok.encode(images), 0.5)
    assert (done.lengths > cuts).all() and (done.lengths <= tok.max_tokens).all()
    assert done.valid.dtype == torch.bool and done.images.dtype == torch.uint8


def test_evaluate_prefixes_logs_metrics_and_skips_with_a_reason(tmp_path) -> None:
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "prefix")
    images = make_images(4, 16, 16, seed=6)
    originals = ImageBatch(images=images, labels=torch.tensor([0, 1, 2, 0]), indices=torch.arange(4), skipped=0)

    tok = build_tokenizer({"name": "pixels"}, (16, 16))
    gen, cfg = _setup(tok, **{"metrics.prefix_ratios": "[0.25,0.75]"})
    run_id = tracker.start_run("pixels", {})
    metrics = evaluate_prefixes(gen, _scoring(cfg, tracker, run_id), originals)
    assert set(metrics) == {f"{prefix_key(r)}/{k}" for r in (0.25, 0.75)
                            for k in ("decode_valid_rate", "num_invalid", "images_per_s", "prompt_fraction")}
    assert metrics["gen/prefix_r25/decode_valid_rate"] == 1.0
    assert metrics["gen/prefix_r25/prompt_fraction"] == 0.25 and metrics["gen/prefix_r75/prompt_fraction"] == 0.75
    client = MlflowClient(tracker.uri)
    assert {a.path for a in client.list_artifacts(run_id)} == {"prefix_completion.png", "images"}  # + its chart
    assert "gen/prefix_r75/num_invalid" in client.get_run(run_id).data.metrics

    tok = build_tokenizer({"name": "jpeg", "restart_markers": False}, (16, 16))
    gen, cfg = _setup(tok)
    run_id = tracker.start_run("jpeg-no-rst", {})
    assert evaluate_prefixes(gen, _scoring(cfg, tracker, run_id), originals) == {}
    reasons = client.download_artifacts(run_id, "gen_prefix_skipped.json")
    assert "restart_markers" in open(reasons).read()
