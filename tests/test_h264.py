"""The h264 tokenizer (AVC-LM): real libx264 streams via PyAV, checked against PyAV's own decoder."""

from __future__ import annotations

import dataclasses
import io
import subprocess
import sys
import time

import av
import numpy as np
import pytest
import torch

from lmgen.config import ConfigError, load_config
from lmgen.tokenizers import TokenBatch, build_tokenizer
from lmgen.tokenizers.h264 import (
    NAL_PPS,
    NAL_SEI,
    NAL_SPS,
    H264Tokenizer,
    encode_clip,
    frame_starts,
    split_nals,
)

T, H, W = 6, 32, 48  # non-square on purpose: width and height must not be swapped anywhere


def moving_disc_clips(n: int, frames: int = T, height: int = H, width: int = W, seed: int = 0) -> torch.Tensor:
    """(n, frames, 3, H, W) uint8: a disc sliding over a gradient, a different colour/speed per clip."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / np.float64(height)
    clips = []
    for _ in range(n):
        base = np.stack([60 + 120 * xx / xx.max(), 50 + 90 * yy, np.full_like(xx, rng.uniform(60, 200))], -1)
        colour, speed, y0 = rng.integers(0, 256, 3), rng.uniform(0.03, 0.08), rng.uniform(0.3, 0.7)
        frames_ = []
        for t in range(frames):
            img = base.copy()
            img[(xx - 0.3 - speed * t) ** 2 + (yy - y0) ** 2 < 0.05] = colour
            frames_.append(img.round().clip(0, 255).astype(np.uint8))
        clips.append(np.stack(frames_))
    return torch.from_numpy(np.stack(clips)).permute(0, 1, 4, 2, 3).contiguous()


def pyav_frames(stream: bytes) -> list[np.ndarray]:
    """What PyAV's demuxer + decoder make of a raw H.264 elementary stream, independently of lmgen."""
    with av.open(io.BytesIO(stream), format="h264") as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def tokenizer(**fields) -> H264Tokenizer:
    return build_tokenizer({"name": "h264", **fields}, (H, W), frames=T, fps=3.0)


@pytest.fixture(scope="module")
def clips() -> torch.Tensor:
    return moving_disc_clips(4)


def test_decode_matches_pyav_on_the_unstripped_x264_stream(clips: torch.Tensor) -> None:
    tok = tokenizer()
    decoded = tok.decode(tok.encode(clips))
    assert decoded.images.shape == (4, T, 3, H, W) and decoded.images.dtype == torch.uint8
    assert decoded.valid.all() and (decoded.frames == T).all()
    for i in range(len(clips)):
        raw = encode_clip(clips[i].permute(0, 2, 3, 1).numpy(), tok.options, tok.fps)  # SEI and SPS/PPS in place
        reference = pyav_frames(raw)
        assert len(reference) == T
        assert torch.equal(decoded.images[i], torch.from_numpy(np.stack(reference)).permute(0, 3, 1, 2))
    error = (decoded.images.float() - clips.float()).abs().mean()
    assert 1.0 < error < 20.0  # lossy at QP 37, yet the same picture


def test_sei_is_removed_and_the_stream_still_decodes(clips: torch.Tensor) -> None:
    tok = tokenizer(header="inline")
    raw = encode_clip(clips[0].permute(0, 2, 3, 1).numpy(), tok.options, tok.fps)
    assert b"x264" in raw and any(n.type == NAL_SEI for n in split_nals(raw))
    data = tok.clip_bytes(clips[0].permute(0, 2, 3, 1).numpy())
    assert b"x264" not in data and not any(n.type == NAL_SEI for n in split_nals(data))
    assert len(raw) - len(data) > 300  # the options string is most of a small clip's bytes
    assert len(pyav_frames(data)) == T
    kept = tokenizer(header="inline", strip_sei=False).clip_bytes(clips[0].permute(0, 2, 3, 1).numpy())
    assert kept == raw


def test_fixed_header_is_stored_once_and_put_back(clips: torch.Tensor) -> None:
    fixed, inline = tokenizer(), tokenizer(header="inline")
    a, b = fixed.encode(clips), inline.encode(clips)
    header = {n.type for n in split_nals(fixed.header)}
    assert header == {NAL_SPS, NAL_PPS}
    assert torch.equal(b.lengths - a.lengths, torch.full((4,), len(fixed.header)))
    for i in range(4):
        assert not {n.type for n in split_nals(bytes(a.item(i).tolist()))} & {NAL_SPS, NAL_PPS}
    assert torch.equal(fixed.decode(a).images, inline.decode(b).images)
    restored = tokenizer()
    restored.load_state_dict(fixed.state_dict())
    assert restored.header == fixed.header


def test_a_foreign_parameter_set_is_invalid_not_decoded(clips: torch.Tensor) -> None:
    """A generated stream may declare another frame size in its own SPS: refused before FFmpeg allocates it."""
    tok = tokenizer(header="inline")
    other = build_tokenizer({"name": "h264", "header": "inline"}, (64, 64), frames=T, fps=3.0)
    big = other.encode(moving_disc_clips(1, height=64, width=64))
    assert not tok.decode(big).valid.any()


def test_prefix_cuts_at_a_frame_boundary(clips: torch.Tensor) -> None:
    tok = tokenizer()
    tokens = tok.encode(clips)
    full = tok.decode(tokens)
    for ratio, kept in ((0.25, 2), (0.5, 3), (0.75, 5)):  # ratio · 6 frames, rounded half up
        cuts = tok.prefix_lengths(tokens, ratio)
        prompt = tok.decode(TokenBatch(tokens.ids, cuts))
        assert (prompt.frames == kept).all()
        assert torch.equal(prompt.images[:, :kept], full.images[:, :kept])
        assert (prompt.images[:, kept:] == prompt.images[:, kept - 1 : kept]).all()  # padded with the last frame
        for i in range(4):
            data = bytes(tokens.item(i).tolist())
            assert int(cuts[i]) == frame_starts(data)[kept]


def test_partial_decodes_are_padded_and_counted(clips: torch.Tensor) -> None:
    """Frames count up to the first one FFmpeg cannot decode cleanly: cut, broken or concealed."""
    tok = tokenizer()
    tokens = tok.encode(clips[:1])
    data = bytes(tokens.item(0).tolist())
    starts = frame_starts(data)
    full = tok.decode(tokens)
    for cut, frames in ((starts[3], 3), ((starts[3] + starts[4]) // 2, 3), (starts[5] - 1, 4)):
        out = tok.decode(TokenBatch(tokens.ids[:, :cut], torch.tensor([cut])))  # the frame being cut is concealed
        assert out.valid.all() and int(out.frames[0]) == frames
        assert torch.equal(out.images[0, :frames], full.images[0, :frames])
        assert (out.images[0, frames:] == out.images[0, frames - 1]).all()
    broken = tokens.ids.clone()
    broken[0, starts[2] + 6 : starts[2] + 12] ^= 0x5A  # slice data of frame 2 garbled: FFmpeg reports it
    assert int(tok.decode(TokenBatch(broken, tokens.lengths)).frames[0]) == 2
    idr_only_once = torch.tensor([list(data[: starts[0] + (starts[1] - starts[0]) // 2])])  # half an IDR frame
    assert not tok.decode(TokenBatch(idr_only_once, torch.tensor([idr_only_once.shape[1]]))).valid.any()
    empty = tok.decode(TokenBatch(torch.zeros(1, 4, dtype=torch.int64), torch.tensor([0])))
    assert not empty.valid.any() and int(empty.frames[0]) == 0 and (empty.images == 128).all()


def test_random_and_mutated_streams_never_raise(clips: torch.Tensor) -> None:
    tok = tokenizer()
    real = tok.encode(clips)
    rng = np.random.default_rng(0)
    streams = [rng.integers(0, 256, int(rng.integers(0, 600))) for _ in range(150)]
    streams += [np.tile([0, 0, 1, int(t)], 40) for t in range(0, 256, 8)]  # start codes with every NAL type
    for _ in range(150):  # real streams with bytes flipped, cut, or spliced
        s = real.item(int(rng.integers(4))).numpy().copy()
        hits = rng.integers(0, len(s), int(rng.integers(1, 20)))
        s[hits] = rng.integers(0, 256, len(hits))
        streams.append(s[: int(rng.integers(1, len(s) + 1))])
    streams += [np.array([-1, 3, 300]), np.array([2**40])]  # ids outside the byte range
    start = time.perf_counter()
    for s in streams:
        ids = torch.as_tensor(s, dtype=torch.int64).view(1, -1)
        out = tok.decode(TokenBatch(ids, torch.tensor([ids.shape[1]])))
        assert out.images.shape == (1, T, 3, H, W) and out.valid.dtype == torch.bool
    assert (time.perf_counter() - start) / len(streams) < 0.5  # bounded per stream (seconds)
    bad_length = tok.decode(TokenBatch(real.ids[:1], torch.tensor([10**6])))
    assert not bad_length.valid.any()


def test_encoding_is_deterministic_across_processes(clips: torch.Tensor, tmp_path) -> None:
    np.save(tmp_path / "clips.npy", clips.numpy())
    script = (
        "import sys, numpy as np, torch\n"
        "from lmgen.tokenizers import build_tokenizer\n"
        f"tok = build_tokenizer({{'name': 'h264'}}, ({H}, {W}), frames={T}, fps=3.0)\n"
        f"t = tok.encode(torch.from_numpy(np.load(r'{tmp_path / 'clips.npy'}')))\n"
        "sys.stdout.write(','.join(str(int(x)) for x in t.ids[t.ids.new_ones(t.ids.shape, dtype=torch.bool)]))\n"
    )
    runs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
            for _ in range(2)]
    here = tokenizer().encode(clips).ids.flatten().tolist()
    assert runs[0] == runs[1] == ",".join(map(str, here))


def test_bpe_shortens_clips_and_round_trips(clips: torch.Tensor) -> None:
    raw, bpe = tokenizer(), tokenizer(bpe_vocab=300)
    train = moving_disc_clips(24, seed=1)
    stats = bpe.fit(train)
    assert bpe.vocab_size == 300 and stats
    a, b = raw.encode(clips), bpe.encode(clips)
    assert (b.lengths < a.lengths).all() and int(b.ids.max()) < 300
    assert torch.equal(raw.decode(a).images, bpe.decode(b).images)
    cuts = bpe.prefix_lengths(b, 0.5)
    assert (bpe.decode(TokenBatch(b.ids, cuts)).frames <= 3).all()
    restored = tokenizer(bpe_vocab=300)
    restored.load_state_dict(bpe.state_dict())
    assert torch.equal(restored.encode(clips).ids, b.ids)


def test_max_tokens_bounds_natural_clips(clips: torch.Tensor) -> None:
    tok = tokenizer()
    assert int(tok.encode(clips).lengths.max()) < tok.max_tokens
    small = tokenizer(max_tokens=50)
    with pytest.raises(ValueError, match="max_tokens"):
        small.encode(clips)


def test_label_names_what_departs_from_avc_lm() -> None:
    assert tokenizer().cfg.label() == "h264 qp37"
    assert tokenizer(qp=30, bpe_vocab=1024, header="inline").cfg.label() == "h264 qp30 inline-SPS bpe1024"


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["tokenizer.name=h264"], "data.frames"),  # a clip tokenizer on still images
        (["tokenizer.name=h264", "data.name=moving_shapes", "data.frames=4", "tokenizer.qp=60"], "tokenizer.qp"),
        (["tokenizer.name=h264", "data.name=moving_shapes", "data.frames=4", "tokenizer.header=x"], "tokenizer.header"),
        (["tokenizer.name=h264", "data.name=moving_shapes", "data.frames=4", "data.image_size=33"], "data.image_size"),
        (["tokenizer.name=vq", "data.name=moving_shapes", "data.frames=4"], "data.frames"),  # an image tokenizer on clips
        (["tokenizer.name=h264", "data.name=moving_shapes", "data.frames=4", "tokenizer.bpe_vocab=100"],
         "tokenizer.bpe_vocab"),
    ],
)
def test_impossible_video_configs_fail_before_compute(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


def test_clip_samples_score_only_the_frames_the_lm_generated() -> None:
    """Padding of a partial decode and a completion's prompt frames never reach a fidelity metric."""
    from lmgen.evaluate import SampleSet

    images = torch.arange(3 * 4).view(3, 4, 1, 1, 1).expand(3, 4, 3, 2, 2).to(torch.uint8)  # frame value = 4·clip + t
    labels = torch.tensor([0, 1, 2])
    samples = SampleSet(images, torch.tensor([True, True, False]), labels, torch.tensor([9, 9, 9]), 1.0,
                        frames=torch.tensor([4, 2, 0]))
    frames, frame_labels = samples.good_frames()
    assert frames[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4, 5] and frame_labels.tolist() == [0, 0, 0, 0, 1, 1]
    completed = dataclasses.replace(samples, first_frame=torch.tensor([1, 1, 1]))
    frames, frame_labels = completed.good_frames()
    assert frames[:, 0, 0, 0].tolist() == [1, 2, 3, 5] and frame_labels.tolist() == [0, 0, 0, 1]
