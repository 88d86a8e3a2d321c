"""Contract tests for the video datasets: moving_shapes, videofolder (PyAV), frame_view."""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from lmgen.datasets import (
    DATASETS,
    MOTIONS,
    FrameView,
    ImageDataset,
    MovingShapesDataset,
    ShapesDataset,
    VideoFolderDataset,
    build_dataset,
    frame_view,
    iter_batches,
    load_batch,
    load_images,
)
from lmgen.datasets.shapes import SceneParams, zipf_probs

# --- helpers ----------------------------------------------------------------------------


def gray_frame(k: int, height: int = 32, width: int = 48) -> np.ndarray:
    """Frame ``k`` of a test video: flat grey 5·k, so the decoded value names the frame."""
    return np.full((height, width, 3), 5 * k % 256, dtype=np.uint8)


def write_video(
    path: Path,
    seconds: float,
    fps: int = 10,
    frame: Callable[[int], np.ndarray] = gray_frame,
    codec: str = "libx264",
    options: dict[str, str] | None = None,
) -> Path:
    """A real ``seconds``-long video of ``frame(k)`` images at ``fps`` (48x32 by default);
    ``options`` go to the encoder (e.g. ``{"g": "7"}``: a keyframe every 7 frames)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    first = frame(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps, options=options or {})
        stream.height, stream.width = first.shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 4_000_000  # near-lossless, so a decoded grey level names its frame (mpeg4)
        for k in range(round(seconds * fps)):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame(k), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def source_index(clip_frame: torch.Tensor) -> int:
    """Which ``gray_frame`` a decoded (3, S, S) frame shows."""
    return round(float(clip_frame.float().mean()) / 5)


# --- moving_shapes ----------------------------------------------------------------------


@pytest.mark.parametrize(("size", "frames"), [(16, 1), (32, 8), (24, 5)])
def test_moving_shapes_item_shape_dtype(size: int, frames: int) -> None:
    ds = MovingShapesDataset("train", 6, seed=0, image_size=size, frames=frames)
    assert ds.frames == frames and ds.fps == 3.0 and MovingShapesDataset.video
    for i in range(len(ds)):
        clip, label = ds[i]
        assert clip.shape == (frames, 3, size, size) and clip.dtype == torch.uint8 and clip.is_contiguous()
        assert isinstance(label, int) and 0 <= label < ds.num_classes


def test_moving_shapes_deterministic_and_frame_matches_clip() -> None:
    a, b = MovingShapesDataset("train", 12, seed=3), MovingShapesDataset("train", 12, seed=3)
    other_seed, val = MovingShapesDataset("train", 12, seed=4), MovingShapesDataset("val", 12, seed=3)
    still = ShapesDataset("train", 12, seed=3)
    for i in range(len(a)):
        clip, label = a[i]
        assert torch.equal(clip, b[i][0]) and label == b[i][1]
        assert not torch.equal(clip, other_seed[i][0]) and not torch.equal(clip, val[i][0])
        assert not torch.equal(clip[0], still[i][0])  # a salted stream, not shapes item i in motion
        for t in (0, 3, a.frames - 1, -1):
            image, frame_label = a.frame(i, t)
            assert torch.equal(image, clip[t]) and frame_label == label
    # a clip depends on neither the split size nor what was rendered before
    assert torch.equal(MovingShapesDataset("train", 500, seed=3)[7][0], a[7][0])
    with pytest.raises(IndexError):
        a[12]
    with pytest.raises(IndexError):
        a.frame(0, a.frames)


def _main_disc(attrs: dict, size: int, margin_px: float = 1.5) -> np.ndarray:
    """bool (size, size): pixels the main object's bounding circle touches in any frame."""
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size
    covered = np.zeros((size, size), dtype=bool)
    for f in attrs["trajectory"]:
        cx, cy = f["center"]
        covered |= np.hypot(xx - cx, yy - cy) <= f["size"] / 2 + margin_px / size
    return covered


def test_moving_shapes_object_moves_over_a_static_background() -> None:
    """Pixels away from the main object never change; frames differ where it moves."""
    ds = MovingShapesDataset("train", 42, seed=1, frames=6)
    for i in range(len(ds)):
        clip = ds[i][0].numpy()
        attrs = ds.attributes(i)
        still = ~_main_disc(attrs, ds.image_size)
        assert still.any() and (clip[:, :, still] == clip[:1, :, still]).all(), i
        main = next(o for o in attrs["objects"] if o["role"] == "main")
        # a spinning solid disc or ring shows no motion, in real video as here
        invisible = attrs["motion"].startswith("rotate") and main["shape"] in ("circle", "ring") and \
            main["texture"] == "solid"
        moved = [np.abs(clip[t].astype(int) - clip[0]).max() > 8 for t in range(1, ds.frames)]
        assert invisible or any(moved), (i, attrs["motion"], moved)


def test_moving_shapes_trajectory_stays_inside_and_follows_the_speed() -> None:
    ds = MovingShapesDataset("val", 300, seed=0, frames=15)
    lo, hi = ds.speed
    for i in range(len(ds)):
        attrs = ds.attributes(i)
        params, traj = attrs["motion_params"], attrs["trajectory"]
        assert len(traj) == ds.frames and lo <= params["speed"] <= hi
        for f in traj:
            r, (cx, cy) = f["size"] / 2, f["center"]
            assert r - 1e-9 <= min(cx, cy) and max(cx, cy) <= 1 - r + 1e-9, (i, f)
        centres = np.array([f["center"] for f in traj])
        step = np.linalg.norm(np.diff(centres, axis=0), axis=1).max()
        if attrs["motion"] == "shake":
            assert step <= 2 * math.sqrt(2) * params["amplitude"] + 1e-9
        else:  # moving by at most the outline speed, bounces and chords included
            assert step <= params["speed"] / ds.fps + 1e-9, (i, attrs["motion"], step)
        sizes = [f["size"] for f in traj]
        if attrs["motion"] in ("grow", "shrink"):
            assert sizes == sorted(sizes, reverse=attrs["motion"] == "shrink") and sizes[0] != sizes[-1]
        if attrs["motion"].startswith("rotate"):
            turn = traj[-1]["rotation"] - traj[0]["rotation"]
            assert (turn % 360 < 180) == (attrs["motion"] == "rotate_cw")


def test_moving_shapes_labels_long_tailed_and_motions_cover_motions() -> None:
    probe = MovingShapesDataset("train", 40, seed=2, frames=2)
    assert probe.labels().tolist() == [probe[i][1] for i in range(len(probe))]
    assert probe.motions().tolist() == [probe.attributes(i)["motion_id"] for i in range(len(probe))]
    assert all(probe.attributes(i)["motion"] == MOTIONS[int(m)] for i, m in enumerate(probe.motions()))
    ds = MovingShapesDataset("train", 20_000, seed=0)
    probs = torch.from_numpy(zipf_probs(10, 1.5))
    assert torch.allclose(ds.class_probs, probs) and ds.class_names == ShapesDataset("train", 1, 0).class_names
    counts = ds.class_counts()
    assert counts.dtype == torch.int64 and counts.shape == (10,) and int(counts.sum()) == len(ds)
    se = torch.sqrt(probs * (1 - probs) / len(ds))
    assert torch.all((counts.double() / len(ds) - probs).abs() < 5 * se)
    motions = MovingShapesDataset("val", 300, seed=0).motions()
    assert motions.dtype == torch.int64 and set(motions.tolist()) == set(range(len(MOTIONS)))
    assert 4 <= len(MOTIONS) <= 8


def test_moving_shapes_attributes_are_json_and_resolution_independent() -> None:
    small, large = MovingShapesDataset("train", 8, seed=0), MovingShapesDataset("train", 8, seed=0, image_size=64)
    for i in range(len(small)):
        attrs = small.attributes(i)
        assert json.loads(json.dumps(attrs)) == attrs == large.attributes(i)
        assert attrs["label"] == small.labels()[i] and attrs["class_name"] == small.class_names[attrs["label"]]
        assert attrs["motion"] in MOTIONS and attrs["fps"] == small.fps and attrs["index"] == i
        main = [o for o in attrs["objects"] if o["role"] == "main"]
        assert len(main) == 1 and main[0]["shape"] == attrs["class_name"]
        down = torch.nn.functional.avg_pool2d(large[i][0].float(), 2)
        assert (small[i][0].float() - down).abs().mean() < 6.0


def test_moving_shapes_fingerprint_stable_and_sensitive() -> None:
    base = dict(split="train", size=50, seed=0, image_size=32, frames=8, fps=3.0)
    fp = MovingShapesDataset(**base).fingerprint()
    assert fp == MovingShapesDataset(**base).fingerprint() and len(fp) == 16
    assert fp != ShapesDataset("train", 50, seed=0).fingerprint()
    variants = [
        dict(base, frames=9),
        dict(base, fps=5.0),
        dict(base, seed=1),
        dict(base, image_size=64),
        dict(base, split="val"),
        dict(base, size=51),
        dict(base, speed=(0.01, 0.02)),
        dict(base, scene=SceneParams(num_classes=12)),
    ]
    fps = {MovingShapesDataset(**v).fingerprint() for v in variants}
    assert len(fps) == len(variants) and fp not in fps


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(split="test"),
        dict(size=0),
        dict(seed=-1),
        dict(image_size=2),
        dict(frames=0),
        dict(fps=0.0),
        dict(speed=(0.2, 0.1)),
        dict(speed=(-0.1, 0.1)),
        dict(speed=(0.0, 0.0)),
        dict(scene=SceneParams(num_classes=13)),
        dict(scene=SceneParams(min_objects=3, max_objects=2)),
    ],
)
def test_moving_shapes_rejects_bad_parameters(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="moving_shapes"):
        MovingShapesDataset(**{**dict(split="train", size=4, seed=0), **kwargs})


def test_iter_batches_and_load_batch_stack_clips() -> None:
    ds = MovingShapesDataset("val", 5, seed=0, frames=4, image_size=16)
    it = iter_batches(ds, batch_size=2)
    batches = list(it)
    assert [b.images.shape for b in batches] == [(2, 4, 3, 16, 16)] * 2 + [(1, 4, 3, 16, 16)]
    assert it.skipped == 0 and it.seen == 5 and torch.equal(batches[1].images[0], ds[2][0])
    batch = load_batch(ds, limit=3)
    assert batch.images.shape == (3, 4, 3, 16, 16) and batch.labels.tolist() == ds.labels()[:3].tolist()
    assert load_images(ds).shape == (5, 4, 3, 16, 16)


def test_build_moving_shapes_from_config() -> None:
    from lmgen.datasets import MovingShapesConfig

    cfg = MovingShapesConfig(frames=5, fps=4.0, train_size=7)
    ds = build_dataset(cfg, "train")
    assert isinstance(ds, MovingShapesDataset) and isinstance(ds, ImageDataset)
    assert len(ds) == 7 and ds.frames == 5 and ds.fps == 4.0 and ds.speed == (cfg.min_speed, cfg.max_speed)
    assert len(build_dataset(cfg, "val")) == cfg.val_size


# --- frame_view -------------------------------------------------------------------------


def test_frame_view_of_clips_is_an_image_dataset() -> None:
    clips = MovingShapesDataset("train", 20, seed=0, frames=4)
    view = frame_view(clips)
    assert isinstance(view, FrameView) and isinstance(view, ImageDataset)
    assert view.frames == 0 and len(view) == len(clips) and view.image_size == clips.image_size
    assert view.num_classes == clips.num_classes and view.class_names == clips.class_names
    assert torch.equal(view.labels(), clips.labels()) and torch.equal(view.class_counts(), clips.class_counts())
    shown = set()
    for i in range(len(view)):
        image, label = view[i]
        t = view.attributes(i)["frame"]
        shown.add(t)
        assert image.shape == (3, 32, 32) and label == clips.labels()[i]
        assert torch.equal(image, clips[i][0][t])
        assert {k: v for k, v in view.attributes(i).items() if k != "frame"} == clips.attributes(i)
    assert shown == set(range(clips.frames))
    assert view.fingerprint() != clips.fingerprint() and view.fingerprint() == frame_view(clips).fingerprint()
    batch = next(iter(iter_batches(view, batch_size=8)))
    assert batch.images.shape == (8, 3, 32, 32)


def test_frame_view_is_identity_for_images() -> None:
    images = ShapesDataset("train", 4, seed=0)
    assert frame_view(images) is images
    with pytest.raises(ValueError, match="video"):
        FrameView(images)


# --- videofolder ------------------------------------------------------------------------

# (relative path, seconds) of the good files; at frames=4, fps=3 a file holds floor(3·s/4) clips
GOOD_VIDEOS = {"cat/a.mp4": 3.0, "cat/deep/b.mkv": 5.0, "dog/c.mp4": 1.0, "dog/d.avi": 2.0}
BAD_VIDEOS = ("cat/empty.mp4", "dog/truncated.mp4", "dog/notes.mp4")


def _write_video_tree(root: Path) -> None:
    for rel, seconds in GOOD_VIDEOS.items():
        write_video(root / rel, seconds, codec="mpeg4" if rel.endswith(".avi") else "libx264")
    (root / BAD_VIDEOS[0]).write_bytes(b"")
    data = write_video(root / BAD_VIDEOS[1], 2.0).read_bytes()
    (root / BAD_VIDEOS[1]).write_bytes(data[: len(data) // 2])  # the index (moov) lives at the end
    (root / BAD_VIDEOS[2]).write_text("not a video")
    (root / "cat" / "readme.txt").write_text("ignored: not a video extension")


def test_videofolder_lists_clips_and_skips_bad_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _write_video_tree(tmp_path)
    with caplog.at_level(logging.WARNING, logger="lmgen.datasets.videofolder"):
        ds = VideoFolderDataset(tmp_path, "train", image_size=16, frames=4, fps=3.0, val_fraction=0.0)
    assert ds.skipped_files == 3 and ds.class_names == ["cat", "dog"] and VideoFolderDataset.video
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3 and all(any(str(tmp_path / b) in m for m in messages) for b in BAD_VIDEOS)
    per_file = {rel: max(1, math.floor(s * 3 / 4)) for rel, s in GOOD_VIDEOS.items()}
    listed = [(ds.attributes(i)["path"], ds.attributes(i)["clip"]) for i in range(len(ds))]
    assert listed == [(rel, c) for rel in sorted(per_file) for c in range(per_file[rel])]
    assert ds.class_counts().tolist() == [per_file["cat/a.mp4"] + per_file["cat/deep/b.mkv"],
                                          per_file["dog/c.mp4"] + per_file["dog/d.avi"]]
    assert ds.labels().tolist() == [ds.attributes(i)["label"] for i in range(len(ds))]
    for i in range(len(ds)):
        item = ds[i]
        assert item is not None
        clip, label = item
        assert clip.shape == (4, 3, 16, 16) and clip.dtype == torch.uint8 and label == ds.labels()[i]
        attrs = ds.attributes(i)
        n_source = round(GOOD_VIDEOS[attrs["path"]] * 10)
        # the source frame nearest each timestamp start + k/fps; past the end, the last one
        want = [min(round(10 * (attrs["start"] + k / 3)), n_source - 1) for k in range(4)]
        assert [source_index(f) for f in clip] == want, (attrs, want)
        assert torch.equal(ds.frame(i, 2)[0], clip[2]) and ds.frame(i, 2)[1] == label


@pytest.mark.parametrize(
    ("name", "codec", "options"),
    [("v.mp4", "libx264", {"g": "7", "bf": "2"}), ("v.mkv", "libx264", {"g": "7"}),
     ("v.avi", "mpeg4", {"g": "7"}), ("v.webm", "libvpx", {"g": "7"})],
)
def test_videofolder_seeks_to_the_nearest_frames(tmp_path: Path, name: str, codec: str, options: dict) -> None:
    """Later clips start with a seek to the keyframe before them (short GOPs, B-frames)."""
    path = write_video(tmp_path / "a" / name, 5.0, codec=codec, options=options)
    with av.open(str(path)) as container:
        assert sum(p.is_keyframe for p in container.demux(video=0)) > 3  # really seeking
    ds = VideoFolderDataset(tmp_path, "train", image_size=8, frames=4, fps=3.0, val_fraction=0.0)
    assert len(ds) == 3
    for i in range(len(ds)):
        want = [min(round(10 * (ds.attributes(i)["start"] + k / 3)), 49) for k in range(4)]
        assert [source_index(f) for f in ds[i][0]] == want
        assert source_index(ds.frame(i, 3)[0]) == want[3]


def test_videofolder_center_crop_and_resize(tmp_path: Path) -> None:
    def striped(k: int) -> np.ndarray:
        x = np.zeros((32, 64, 3), dtype=np.uint8)
        x[:, :16] = (255, 0, 0)
        x[:, 16:48] = (0, 200, 0)
        x[:, 48:] = (0, 0, 255)
        return x

    write_video(tmp_path / "a" / "wide.mp4", 1.0, frame=striped)
    clip, label = VideoFolderDataset(tmp_path, "train", image_size=8, frames=2, fps=3.0, val_fraction=0.0)[0]
    assert label == 0 and clip.shape == (2, 3, 8, 8)
    assert clip[:, 0].max() <= 30 and clip[:, 2].max() <= 30 and clip[:, 1].min() >= 170


def test_videofolder_file_broken_after_listing_gives_none(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for k in range(3):
        write_video(tmp_path / "a" / f"v{k}.mp4", 2.0)
    ds = VideoFolderDataset(tmp_path, "train", image_size=8, frames=3, fps=3.0, val_fraction=0.0)
    assert len(ds) == 6 and ds.skipped_files == 0
    (tmp_path / "a" / "v1.mp4").write_bytes(b"\x00" * 100)
    with caplog.at_level(logging.WARNING, logger="lmgen.datasets.videofolder"):
        assert ds[2] is None and ds[3] is None and ds.frame(2, 0) is None
    assert len([r for r in caplog.records if "v1.mp4" in r.getMessage()]) == 1
    it = iter_batches(ds, batch_size=4)
    batches = list(it)
    assert it.skipped == 2 and it.seen == 6
    assert torch.cat([b.indices for b in batches]).tolist() == [0, 1, 4, 5]
    assert torch.cat([b.images for b in batches]).shape == (4, 3, 3, 8, 8)
    lost = load_batch(ds, batch_size=2)  # the batch [2, 3] loses every clip: still counted
    assert lost.skipped == 2 and lost.indices.tolist() == [0, 1, 4, 5]
    view = frame_view(ds)
    assert view[2] is None and view[0] is not None and view[0][0].shape == (3, 8, 8)


def test_videofolder_hash_split_cap_and_fingerprint(tmp_path: Path) -> None:
    for k in range(10):
        write_video(tmp_path / ("a" if k < 6 else "b") / f"v{k}.mp4", 1.0)

    def files(split: str, **kw: float) -> list[str]:
        ds = VideoFolderDataset(tmp_path, split, frames=3, fps=3.0, val_fraction=0.5, **kw)
        return [ds.attributes(i)["path"] for i in range(len(ds))]

    train, val = files("train"), files("val")
    assert train == files("train") and val == files("val")
    assert not set(train) & set(val) and len(train) + len(val) == 10
    assert sum(p.startswith("a/") for p in val) == 3 and sum(p.startswith("b/") for p in val) == 2
    capped = files("train", max_items=3)
    assert len(capped) == 3 and capped == files("train", max_items=3) and set(capped) <= set(train)
    fp = VideoFolderDataset(tmp_path, "train", frames=3, fps=3.0).fingerprint()
    assert fp == VideoFolderDataset(tmp_path, "train", frames=3, fps=3.0).fingerprint()
    changed = [
        VideoFolderDataset(tmp_path, "train", frames=2, fps=3.0),
        VideoFolderDataset(tmp_path, "train", frames=3, fps=2.0),
        VideoFolderDataset(tmp_path, "train", frames=3, fps=3.0, image_size=16),
        VideoFolderDataset(tmp_path, "train", frames=3, fps=3.0, val_fraction=0.3),
        VideoFolderDataset(tmp_path, "val", frames=3, fps=3.0),
    ]
    assert len({d.fingerprint() for d in changed} | {fp}) == len(changed) + 1
    write_video(tmp_path / train[-1], 2.0)  # same name, new content
    assert VideoFolderDataset(tmp_path, "train", frames=3, fps=3.0).fingerprint() != fp


def test_videofolder_empty_or_all_bad_roots_raise_naming_the_root(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "readme.txt").write_text("no videos here")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
        VideoFolderDataset(tmp_path, "train", frames=4)
    (tmp_path / "a" / "empty.mp4").write_bytes(b"")
    (tmp_path / "a" / "text.mkv").write_text("not a video")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
        VideoFolderDataset(tmp_path, "train", frames=4, val_fraction=0.0)
    with pytest.raises(ValueError, match="missing"):
        VideoFolderDataset(tmp_path / "missing", "train", frames=4)
    with pytest.raises(ValueError, match="frames"):
        VideoFolderDataset(tmp_path, "train", frames=0)
    assert "videofolder" in DATASETS and "moving_shapes" in DATASETS
