"""Bad data is skipped and counted, never fatal and never hidden (issue 10, item 5): corrupt,
truncated and zero-byte files of a folder dataset, in either split, all reach the stage-1
MLflow run as ``data/skipped`` (which the LM run's description reports; tests/test_e2e.py checks that end) —
and so do the dangling, self and looping links and FIFOs the listing passes over (issue 24, item 6).

Unit of the count: an unreadable item (an image, or one clip of a video that broke after it was
listed) plus every path passed over when the folder was listed (links, special files) and every
video file whose metadata could not be read then.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import av
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from lmgen.config import load_config
from lmgen.datasets import build_dataset
from lmgen.stage1 import Stage1Job, prepare_tokenizer
from lmgen.tokenizers import tokenizer_for
from lmgen.tracking import Tracker


def _bad_files(directory: Path, suffix: str, good: bytes) -> list[Path]:
    """Write a corrupt (random bytes), a truncated (half of ``good``) and a zero-byte file."""
    rng = np.random.default_rng(1)
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"corrupt{suffix}", directory / f"truncated{suffix}", directory / f"empty{suffix}"]
    paths[0].write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    paths[1].write_bytes(good[: len(good) // 2])
    paths[2].write_bytes(b"")
    return paths


def _jpeg(rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _video(path: Path, seconds: float = 2.0, fps: int = 6) -> bytes:
    """A real 24x20 H.264 mp4 of ``seconds`` at ``fps`` (4 s hold three 4-frame clips at 3 fps); its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 24, 20, "yuv420p"
        for t in range(round(seconds * fps)):
            frame = np.full((20, 24, 3), 40 + 8 * t, dtype=np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode(None))
    return path.read_bytes()


def _stage1_metrics(overrides: list[str], home: Path, break_after_listing: Path | None = None) -> dict[str, float]:
    """Run stage 1 (fit + both token caches) of the config; the metrics its MLflow run holds."""
    cfg = load_config(None, ["data.train_size=0", "data.val_size=0", "data.image_size=16", *overrides])
    train_ds, val_ds = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "val")
    if break_after_listing is not None:  # listed fine, unreadable by the time its clips are read
        break_after_listing.write_bytes(b"\x00" * 100)
    uri = f"sqlite:///{home / 'mlflow.db'}"
    job = Stage1Job.for_run(cfg, tokenizer_for(cfg), train_ds, val_ds, home)
    result = prepare_tokenizer(job, Tracker(uri, "skips"))
    return MlflowClient(uri).get_run(result.run_id).data.metrics


def test_stage1_counts_every_skipped_image_in_mlflow(tmp_path: Path, lmgen_home: Path) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 1)):
        for c in ("cats", "dogs"):
            for i in range(n):
                (tmp_path / split / c).mkdir(parents=True, exist_ok=True)
                (tmp_path / split / c / f"{i}.jpg").write_bytes(_jpeg(rng))
    _bad_files(tmp_path / "train" / "cats", ".jpg", _jpeg(rng))
    _bad_files(tmp_path / "val" / "dogs", ".png", _jpeg(rng))
    metrics = _stage1_metrics(["data.name=imagefolder", f"data.root={tmp_path}", "tokenizer.name=pixels"], lmgen_home)
    assert metrics["data/skipped"] == 6.0  # 3 bad train files + 3 bad val files
    assert metrics["data/train_items"] == 6.0


@pytest.mark.timeout(120)  # a FIFO opened for reading would hang here
def test_stage1_counts_links_loops_and_fifos_in_mlflow(tmp_path: Path, lmgen_home: Path) -> None:
    """Before: a dangling link, a link to itself or a directory loop was a traceback while
    listing (after the MLflow store was made), a FIFO named ``.jpg`` hung stage 1. Now stage 1
    finishes and each is one ``data/skipped``."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("cats", "dogs"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(2):
                (tmp_path / split / c / f"{i}.jpg").write_bytes(_jpeg(rng))
    (tmp_path / "train" / "cats" / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    (tmp_path / "train" / "cats" / "self.jpg").symlink_to("self.jpg")
    (tmp_path / "train" / "dogs" / "loop").symlink_to("..")
    os.mkfifo(tmp_path / "val" / "dogs" / "fifo.jpg")
    metrics = _stage1_metrics(["data.name=imagefolder", f"data.root={tmp_path}", "tokenizer.name=pixels"], lmgen_home)
    assert metrics["data/skipped"] == 4.0 and metrics["data/train_items"] == 4.0


def test_stage1_counts_every_skipped_video_in_mlflow(tmp_path: Path, lmgen_home: Path) -> None:
    for split, n in (("train", 2), ("val", 1)):
        for c in ("left", "right"):
            for i in range(n):
                good = _video(tmp_path / split / c / f"{i}.mp4", seconds=4.0)
    _bad_files(tmp_path / "train" / "left", ".mp4", good)  # unreadable when listed: 3 files
    _bad_files(tmp_path / "val" / "right", ".mkv", good)
    overrides = ["data.name=videofolder", f"data.root={tmp_path}", "data.frames=4", "tokenizer.name=h264"]
    metrics = _stage1_metrics(overrides, lmgen_home, break_after_listing=tmp_path / "train" / "right" / "1.mp4")
    assert metrics["data/skipped"] == 3.0 + 3.0 + 3.0  # bad train files, bad val files, 3 clips of the broken one
    assert metrics["data/train_items"] == 3.0 * 3  # three readable train files of three clips each
