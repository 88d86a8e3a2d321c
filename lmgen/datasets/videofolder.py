"""``videofolder``: labelled video files on disk, cut into fixed-length clips (PyAV).

Layout and split are ``imagefolder``'s (``lmgen.datasets.folder``), with video extensions
(``VIDEO_EXTENSIONS``): ``root/<class_name>/**/*.mp4`` etc., or ``root/train`` + ``root/val``;
otherwise a per-class hash split of the *files* by ``val_fraction``, so the clips of one
file never straddle train and val.

Clips: each file is cut into non-overlapping clips of ``frames`` frames sampled at ``fps``
(AVC-LM: 15 frames at 3 fps): clip ``c`` shows the decoded frames nearest the timestamps
``c·frames/fps + k/fps`` (seconds from the stream start, k < frames). A file holds
``floor(duration·fps / frames)`` whole clips, and at least one: a file shorter than a clip
gives one clip padded by repeating its last decoded frame (so every item has exactly
``frames`` frames; the same padding covers a file whose metadata overstates its length).
Frames are converted to RGB, centre-cropped to a square and resized with bicubic
(antialiased) filtering, like ``imagefolder``.

Listing reads only container metadata (stream duration, else the container's, else
frame count / rate): a file whose metadata cannot be read is skipped at listing, logged
once with its path and counted in ``skipped_files``. A file that lists fine but fails to
decode later yields ``None`` for its clips (one logged warning per file), which
``iter_batches`` drops and counts. ``max_items > 0`` takes files in a fixed hash-shuffled
order (seed-independent) until ``max_items`` clips are listed, so a cap probes only the
files it keeps. Decoding is single-threaded: DataLoader workers give the parallelism.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import av
import torch
from torch import Tensor

from lmgen.datasets.base import check_clip
from lmgen.datasets.folder import FileEntry, ImageFolderConfig, ListedFolder, cap_order, list_folder, square_resize

log = logging.getLogger(__name__)

VIDEOFOLDER_VERSION = 1
VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".3gp", ".ogv"}
)
TRANSFORM = "nearest_frame>rgb>center_crop>resize_bicubic"  # part of the fingerprint


@dataclass(frozen=True)
class VideoInfo:
    """Container metadata of one listed file: duration (s), source size, whole clips."""

    duration: float
    width: int
    height: int
    num_clips: int


@dataclass(frozen=True)
class ClipEntry:
    """Clip ``clip`` (0-based, in time order) of the listed ``file``."""

    file: FileEntry
    clip: int


def probe(path: str | Path, frames: int, fps: float) -> VideoInfo:
    """Read the metadata of ``path`` (no decoding); raises if it has no usable video stream."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]  # IndexError: no video stream
        if stream.duration is not None and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        elif stream.frames and stream.average_rate:
            duration = stream.frames / float(stream.average_rate)
        else:
            raise ValueError("no duration or frame count in the metadata")
        width, height = stream.codec_context.width, stream.codec_context.height
    if not duration > 0 or width <= 0 or height <= 0:
        raise ValueError(f"empty video stream (duration {duration} s, {width}x{height})")
    # the epsilon keeps 3.0 s x 3 fps / 9 frames from rounding down to 0 whole clips
    num_clips = max(1, math.floor(duration * fps / frames + 1e-9))
    return VideoInfo(duration, width, height, num_clips)


def decode_nearest(path: str | Path, times: Sequence[float], image_size: int) -> list[Tensor]:
    """The decoded frames nearest ``times`` (ascending seconds from the stream start), each
    uint8 (3, S, S) in [0, 255] after centre crop and resize. Targets past the last decoded
    frame repeat it. Raises if the file cannot be opened or yields no frame."""
    picked = _pick_frames(path, times, seek=times[0] > 0)
    if picked is None:  # the seek landed after the first target: decode from the start
        picked = _pick_frames(path, times, seek=False)
    assert picked is not None
    converted: dict[int, Tensor] = {}  # a frame picked for several targets is converted once
    out = []
    for frame in picked:
        if id(frame) not in converted:
            converted[id(frame)] = square_resize(frame.to_image(), image_size)
        out.append(converted[id(frame)])
    return out


def _pick_frames(path: str | Path, times: Sequence[float], seek: bool) -> list[av.VideoFrame] | None:
    """Decode forward and keep, per target time, the nearer of the frames around it.

    Returns None if ``seek`` was asked and the first frame after it lies after the first
    target (a demuxer that cannot seek backwards to a keyframe).
    """
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type, stream.thread_count = "NONE", 1  # deterministic, one core per reader
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        step = 1.0 / float(stream.average_rate) if stream.average_rate else 0.0
        want = [start + t for t in times]
        if seek:
            container.seek(int(want[0] / stream.time_base), stream=stream, backward=True, any_frame=False)
        picked: list[av.VideoFrame] = []
        prev, prev_t = None, -math.inf
        for frame in container.decode(stream):
            t = frame.time if frame.time is not None else prev_t + step
            if seek and prev is None and t > want[0] + step / 2:
                return None
            while len(picked) < len(want) and t >= want[len(picked)]:
                w = want[len(picked)]
                picked.append(prev if prev is not None and w - prev_t <= t - w else frame)
            if len(picked) == len(want):
                return picked
            prev, prev_t = frame, t
    if prev is None:
        raise ValueError("no frame could be decoded")
    return picked + [prev] * (len(want) - len(picked))  # a short file: repeat its last frame


@dataclass
class VideoFolderConfig(ImageFolderConfig):
    """``data`` block of ``videofolder``: the tree, then how clips are cut from its files."""

    name: str = "videofolder"
    frames: int = 15  # frames per clip (AVC-LM: 15)
    fps: float = 3.0  # the rate frames are taken at (AVC-LM: 3)
    LAYOUT: ClassVar[str] = "root/<class_name>/<video files>"

    def check(self) -> None:
        super().check()
        check_clip(self.frames, self.fps, self.name)


class VideoFolderDataset(ListedFolder):
    """Labelled clips from video files under ``root``; items are ``(uint8 (frames, 3, S, S),
    label)`` or ``None`` for a file that fails to decode. See the module docstring."""

    Config = VideoFolderConfig
    video = True  # clips of data.frames frames
    procedural = False  # read from data.root

    def __init__(
        self,
        root: str | Path,
        split: str,
        image_size: int = 32,
        frames: int = 15,
        fps: float = 3.0,
        val_fraction: float = 0.1,
        max_items: int = 0,
    ) -> None:
        check_clip(frames, fps, "videofolder")
        listing = list_folder(root, split, float(val_fraction), VIDEO_EXTENSIONS, "videofolder")
        self.root, self.split_dirs, self.split = listing.root, listing.split_dirs, split
        self.image_size, self.frames, self.fps = int(image_size), int(frames), float(fps)
        self.val_fraction, self.max_items = float(val_fraction), int(max_items)
        self.class_names: list[str] = listing.class_names
        self.num_classes = len(self.class_names)
        self.info: dict[str, VideoInfo] = {}
        self.skipped_files = len(listing.skipped)  # paths passed over, then files whose metadata could not be read
        self.entries: list[ClipEntry] = self._list_clips(listing.files)
        if not self.entries:
            raise ValueError(
                f"videofolder: no readable video in split {split!r} of {self.root} ({len(listing.files)} files "
                f"in the split, {self.skipped_files} unreadable; val_fraction={self.val_fraction})"
            )
        self._labels = torch.tensor([c.file.label for c in self.entries], dtype=torch.int64)
        self._warned: set[str] = set()
        self._fingerprint: str | None = None

    def _list_clips(self, files: list[FileEntry]) -> list[ClipEntry]:
        """Probe ``files`` (capped: in hash order until ``max_items`` clips) into clips,
        ordered by (label, relpath, clip)."""
        clips: list[ClipEntry] = []
        for f in cap_order(files) if self.max_items > 0 else files:
            if 0 < self.max_items <= len(clips):
                break
            try:
                info = probe(self.root / f.relpath, self.frames, self.fps)
            # PyAV and FFmpeg signal bad data with several exception types (InvalidDataError,
            # OSError, IndexError for no video stream ...): one bad file must never stop a run.
            except Exception as err:
                self.skipped_files += 1
                log.warning("videofolder: skipping unreadable video %s (%s: %s)", self.root / f.relpath,
                            type(err).__name__, err)
                continue
            self.info[f.relpath] = info
            clips.extend(ClipEntry(f, k) for k in range(info.num_clips))
        if self.max_items > 0:
            clips = clips[: self.max_items]
        return sorted(clips, key=lambda c: (c.file.label, c.file.relpath, c.clip))

    @classmethod
    def from_config(cls, cfg: VideoFolderConfig, split: str) -> VideoFolderDataset:
        """The ``split`` of the tree a ``data`` block names; ``{split}_size > 0`` caps the clip count."""
        return cls(**cls.folder_args(cfg, split), frames=cfg.frames, fps=cfg.fps)

    def _decode(self, index: int, steps: Sequence[int]) -> list[Tensor] | None:
        """Frames ``steps`` of clip ``index``, or None (logged once per file) if decoding fails."""
        entry = self.entries[index]
        start = entry.clip * self.frames / self.fps
        path = self.root / entry.file.relpath
        try:
            return decode_nearest(path, [start + k / self.fps for k in steps], self.image_size)
        except Exception as err:  # as in listing: a bad file costs its clips, never a run
            self._skip(entry.file.relpath, "undecodable video", err)
            return None

    def __getitem__(self, index: int) -> tuple[Tensor, int] | None:
        frames = self._decode(index, range(self.frames))
        return None if frames is None else (torch.stack(frames), self.entries[index].file.label)

    def frame(self, index: int, t: int) -> tuple[Tensor, int] | None:
        """Frame ``t`` of clip ``index``: ``(uint8 (3, S, S), label)`` or None; decodes only up
        to that frame."""
        if not -self.frames <= t < self.frames:
            raise IndexError(f"videofolder: frame {t} out of range for {self.frames} frames")
        frames = self._decode(index, [t % self.frames])
        return None if frames is None else (frames[0], self.entries[index].file.label)

    def attributes(self, index: int) -> dict[str, Any]:
        """JSON-serialisable listing metadata of clip ``index`` (no decoding)."""
        e = self.entries[index]
        info = self.info[e.file.relpath]
        return {
            "index": index % len(self),
            "path": e.file.relpath,
            "label": e.file.label,
            "class_name": self.class_names[e.file.label],
            "clip": e.clip,
            "start": e.clip * self.frames / self.fps,
            "duration": info.duration,
            "source_size": [info.width, info.height],
            "clips_in_file": info.num_clips,
            "bytes": e.file.size,
            "mtime_ns": e.file.mtime_ns,
        }

    def fingerprint(self) -> str:
        """16 hex chars over the listed files (paths, sizes, mtimes, clip counts) and settings."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            header = (
                f"videofolder|v{VIDEOFOLDER_VERSION}|{self.split}|split_dirs={self.split_dirs}|"
                f"val_fraction={self.val_fraction}|max_items={self.max_items}|size={self.image_size}|"
                f"frames={self.frames}|fps={self.fps}|{TRANSFORM}|classes={self.class_names}\n"
            )
            h.update(header.encode())
            counts: dict[str, int] = {}
            files: dict[str, FileEntry] = {}
            for c in self.entries:
                counts[c.file.relpath] = counts.get(c.file.relpath, 0) + 1
                files[c.file.relpath] = c.file
            for rel in sorted(files):
                h.update(f"{rel}\t{files[rel].size}\t{files[rel].mtime_ns}\t{counts[rel]}\n".encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint
