"""``imagefolder``: an ImageNet-style tree of labelled images on disk.

Layout: ``root/<class_name>/**/*.{jpg,jpeg,png,bmp,webp,...}`` (extensions case-insensitive,
hidden files and folders ignored); classes are the sorted subfolder names. Splits:

- if ``root/train`` and ``root/val`` both exist, they are the split roots (classes = sorted
  union of their subfolders, so labels agree across splits);
- otherwise each class is split deterministically by a hash of the file's path relative to
  ``root``: the ``round(val_fraction * n)`` files of a class with the smallest hash form val.
  The split does not depend on the seed; adding files can move a few files across the
  boundary, so freeze a benchmark with explicit ``train/`` and ``val/`` folders.

Links and special files: the listing follows a directory link once per real directory, and
never into the dataset's own tree (a loop, or a second way to files listed anyway); it never
opens what is not a regular file. Passed over, each logged once with its path and counted in
``skipped_files`` (so in ``data/skipped``): a link that cannot be resolved (dangling, or to
itself) named like an image or with no extension (it may have been a directory), an image-named
FIFO, socket or device, a directory link passed over as above, a directory that cannot be read.
Without ``train/`` and ``val/``, each such path is counted in one split (by a hash of it).

``max_items > 0`` keeps the first ``max_items`` files of a fixed hash-shuffled order (again
seed-independent), listed in path order. Items are opened with Pillow, converted to 8-bit RGB
(16-bit greyscale scaled, not clipped: ``to_rgb``), centre-cropped to a square and resized with
bicubic (antialiased) filtering. A file that cannot be decoded (corrupt, truncated, empty)
yields ``None`` and one logged warning with its path; it still counts in ``class_counts``
(which comes from the listing). A split with no decodable file at all is a ``ValueError``
naming the root, raised by the constructor.

The listing helpers (``list_folder``, ``cap_order``) and the transform (``square_resize``)
are shared with ``videofolder``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from lmgen.datasets.base import DataConfig

log = logging.getLogger(__name__)

FOLDER_VERSION = 1
SPLITS = ("train", "val")
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}
)
TRANSFORM = "rgb>center_crop>resize_bicubic"  # part of the fingerprint


@dataclass(frozen=True)
class FileEntry:
    """One listed image: path relative to the dataset root (POSIX), label, size, mtime."""

    relpath: str
    label: int
    size: int
    mtime_ns: int


def _hash_unit(text: str, salt: str) -> float:
    """A uniform-looking number in [0, 1) determined by ``text`` (and ``salt``) only."""
    digest = hashlib.sha1(f"{salt}:{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _subdirs(directory: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))


@dataclass(frozen=True)
class SkippedPath:
    """A path the listing passed over (module docstring): relative to the root, POSIX, and why."""

    relpath: str
    reason: str


def _is_dir(entry: os.DirEntry) -> bool:
    """Whether ``entry`` is a directory or a link to one; False for a link that cannot be
    resolved (dangling: ``is_dir`` says False; to itself: it raises)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _inside(path: str, tree: str) -> bool:
    return path == tree or path.startswith(tree.rstrip(os.sep) + os.sep)


def _scan_files(directory: Path, root: Path, extensions: frozenset[str],
                walked: set[str]) -> tuple[list[FileEntry], list[SkippedPath]]:
    """Every regular file below ``directory`` (recursive) with one of ``extensions``, as
    label-less ``FileEntry``s sorted by relative path, and the paths passed over. ``walked``: the
    real paths of directories already reached through a link (shared by a listing's classes)."""
    entries, skipped, stack = [], [], [directory]
    real_root = os.path.realpath(root)

    def skip(path: str, reason: str) -> None:
        skipped.append(SkippedPath(Path(path).relative_to(root).as_posix(), reason))

    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                found = sorted(it, key=lambda e: e.name)  # of two links to one directory, the first by name is followed
        except OSError as err:
            skip(str(folder), f"unreadable directory ({err.strerror or err})")
            continue
        for e in found:
            if e.name.startswith("."):
                continue
            if _is_dir(e):  # follows links
                real = os.path.realpath(e.path)
                if e.is_symlink():
                    if _inside(real, real_root) or real in walked:
                        skip(e.path, f"directory link to {real}: inside the dataset or already listed (a loop)")
                        continue
                    walked.add(real)
                stack.append(Path(e.path))
                continue
            ext = os.path.splitext(e.name)[1].lower()
            if ext not in extensions and not (ext == "" and e.is_symlink()):
                continue
            try:
                st = os.stat(e.path)  # follows links: a dangling or looping one raises here
            except OSError as err:
                skip(e.path, f"broken link ({err.strerror or err})" if e.is_symlink() else str(err))
                continue
            if ext not in extensions:  # an extension-less link that resolves: not an image file
                continue
            if not stat.S_ISREG(st.st_mode):  # never opened: reading a FIFO blocks until a writer comes
                skip(e.path, "not a regular file (a FIFO, socket or device)")
                continue
            entries.append(FileEntry(Path(e.path).relative_to(root).as_posix(), -1, st.st_size, st.st_mtime_ns))
    return sorted(entries, key=lambda f: f.relpath), skipped


@dataclass(frozen=True)
class FolderListing:
    """The files of one split of a class-folder tree (before any cap).

    ``split_dirs``: the tree has ``train/`` and ``val/``; ``files`` are ordered by (label, relpath).
    ``skipped``: the split's paths passed over (links, special files; module docstring).
    """

    root: Path
    split_dirs: bool
    class_names: list[str]
    files: list[FileEntry]
    skipped: list[SkippedPath] = dataclasses.field(default_factory=list)


def list_folder(root: str | Path, split: str, val_fraction: float, extensions: frozenset[str], name: str) -> FolderListing:
    """List ``split`` of the class-folder tree at ``root`` (layout and split: module docstring).

    ``name`` (the dataset's registry name) prefixes error messages. Raises ``ValueError``
    naming the path for a missing root, no class folders, or no file with ``extensions``.
    """
    if split not in SPLITS:
        raise ValueError(f"{name}: unknown split {split!r}; valid: {list(SPLITS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"{name}: val_fraction must be in [0, 1), got {val_fraction}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ValueError(f"{name}: root {root} does not exist or is not a directory")
    split_dirs = (root / "train").is_dir() and (root / "val").is_dir()
    class_roots = [root / s for s in SPLITS] if split_dirs else [root]
    class_names = sorted({c for d in class_roots for c in _subdirs(d)})
    if not class_names:
        raise ValueError(f"{name}: no class subfolders in {root} (expected root/<class_name>/<files>)")
    split_root = root / split if split_dirs else root
    per_class, skipped, walked = [], [], set()
    for label, c in enumerate(class_names):
        files, passed = _scan_files(split_root / c, root, extensions, walked) if (split_root / c).is_dir() else ([], [])
        per_class.append([dataclasses.replace(f, label=label) for f in files])
        # without split folders both splits list every class: each passed-over path counts in one
        skipped += [p for p in passed if split_dirs or (_hash_unit(p.relpath, "split") < val_fraction) == (split == "val")]
    for p in skipped:
        log.warning("%s: skipping %s: %s", name, root / p.relpath, p.reason)
    if not any(per_class):
        raise ValueError(f"{name}: no files ({', '.join(sorted(extensions))}) in the class folders of {split_root}")
    if split_dirs:
        return FolderListing(root, split_dirs, class_names, [f for files in per_class for f in files], skipped)
    out = []
    for files in per_class:
        ranked = sorted(files, key=lambda f: _hash_unit(f.relpath, "split"))
        n_val = int(round(val_fraction * len(files)))
        chosen = ranked[:n_val] if split == "val" else ranked[n_val:]
        out.extend(sorted(chosen, key=lambda f: f.relpath))
    return FolderListing(root, split_dirs, class_names, out, skipped)


def cap_order(files: list[FileEntry]) -> list[FileEntry]:
    """``files`` in a fixed hash-shuffled order (seed-independent): what a size cap keeps first."""
    return sorted(files, key=lambda f: _hash_unit(f.relpath, "order"))


def square_resize(im: Image.Image, image_size: int) -> Tensor:
    """Centre-crop an RGB image to a square and resize it (bicubic, antialiased): uint8 (3, S, S)."""
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    im = im.crop((left, top, left + side, top + side))
    im = im.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow image → 8-bit RGB. Pillow's own ``convert`` clips 16-bit greyscale at 255, so a
    16-bit PNG (mode "I;16") comes out nearly all white; here 16-bit values v become v >> 8
    (65535 → 255). Mode "I" is taken as 16-bit too: Pillow opens 16-bit PGMs so (scaled to
    65535). 48-bit RGB and 16-bit LA/RGBA PNGs Pillow already reads as 8-bit RGB(A), correctly."""
    if im.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(im).astype(np.int64)  # decodes; "I;16B" arrives big-endian, "I" as int32
        im = Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8))  # mode "L"
    return im.convert("RGB")


def load_image(path: str | Path, image_size: int) -> Tensor:
    """Decode, convert to 8-bit RGB, centre-crop, resize: uint8 (3, S, S) in [0, 255]. Raises on
    bad files, and on what is not a regular file (a FIFO swapped in after listing) before opening it."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(f"not a regular file (a FIFO, socket or device): {path}")
    with Image.open(path) as im:
        im = to_rgb(im)  # forces a full decode: truncation and corruption raise here
    return square_resize(im, image_size)


@dataclass
class ImageFolderConfig(DataConfig):
    """``data`` block of ``imagefolder`` (and, extended, ``videofolder``): where the tree is."""

    name: str = "imagefolder"
    root: str | None = None  # use ${oc.env:VAR} rather than relative hops
    val_fraction: float = 0.05  # share of each class held out when root has no train/ and val/
    LAYOUT: ClassVar[str] = "root/<class_name>/<images>"  # what root must hold, for the error message

    RANGES: ClassVar[dict[str, str]] = {**DataConfig.RANGES, "val_fraction": "[0, 1)"}

    def check(self) -> None:
        super().check()
        if not self.root:
            raise ValueError(f"data.root is required for data.name={self.name!r}: it must point at {self.LAYOUT}")


class ListedFolder(torch.utils.data.Dataset):
    """What the folder datasets share: items listed once from ``root`` (``entries``), labels
    from the listing (``_labels``, ``num_classes``), and an unreadable file warned about once."""

    entries: list
    _labels: Tensor
    num_classes: int

    def __len__(self) -> int:
        return len(self.entries)

    def labels(self) -> Tensor:
        """Every item's label from the listing, int64 (N,)."""
        return self._labels

    def class_counts(self) -> Tensor:
        """Listed items per class in this split, int64 (num_classes,) (unreadable ones included)."""
        return torch.bincount(self._labels, minlength=self.num_classes)

    @classmethod
    def folder_args(cls, cfg: ImageFolderConfig, split: str) -> dict[str, Any]:
        """The constructor arguments every folder dataset reads from its ``data`` block: root,
        split, image_size, val_fraction and ``{split}_size`` as ``max_items`` (0 = all).
        ValueError on an unknown split or a missing root."""
        if split not in SPLITS:
            raise ValueError(f"{cls.__name__}: unknown split {split!r}; valid: {list(SPLITS)}")
        cfg.check()
        return {"root": str(cfg.root), "split": split, "image_size": cfg.image_size, "val_fraction": cfg.val_fraction,
                "max_items": getattr(cfg, f"{split}_size")}

    def _skip(self, relpath: str, what: str, err: Exception) -> None:
        """Log an unreadable file once (by its path), however many items it holds."""
        if relpath not in self._warned:
            self._warned.add(relpath)
            log.warning("%s: skipping %s %s (%s: %s)", type(self).__name__, what, self.root / relpath,
                        type(err).__name__, err)


class ImageFolderDataset(ListedFolder):
    """Labelled images from ``root``; items are ``(uint8 (3, S, S), label)`` or ``None``.

    See the module docstring for layout, split and transform.
    """

    frames = 0  # still images (see ImageDataset)
    fps = 0.0
    video = False
    procedural = False  # read from data.root
    Config = ImageFolderConfig

    def __init__(
        self,
        root: str | Path,
        split: str,
        image_size: int = 32,
        val_fraction: float = 0.1,
        max_items: int = 0,
    ) -> None:
        listing = list_folder(root, split, float(val_fraction), IMAGE_EXTENSIONS, "imagefolder")
        self.root, self.split_dirs = listing.root, listing.split_dirs
        self.split, self.image_size = split, int(image_size)
        self.val_fraction, self.max_items = float(val_fraction), int(max_items)
        self.class_names: list[str] = listing.class_names
        self.num_classes = len(self.class_names)
        entries = listing.files
        if self.max_items > 0 and len(entries) > self.max_items:
            entries = sorted(cap_order(entries)[: self.max_items], key=lambda f: (f.label, f.relpath))
        if not entries:
            raise ValueError(f"imagefolder: split {split!r} of {self.root} is empty (val_fraction={self.val_fraction})")
        self.entries: list[FileEntry] = entries
        self.skipped_files = len(listing.skipped)  # links and special files passed over when listing
        self._labels = torch.tensor([f.label for f in entries], dtype=torch.int64)
        self._warned: set[str] = set()
        self._fingerprint: str | None = None
        # Fail now, naming the root, rather than after the listing has reached the token cache:
        # decodes files in order up to the first good one (one file, for a healthy folder).
        if not any(self[i] is not None for i in range(len(entries))):
            raise ValueError(f"imagefolder: no readable image in split {split!r} of {self.root}: all "
                             f"{len(entries)} files are corrupt, truncated or empty (warned above, one by one)")

    @classmethod
    def from_config(cls, cfg: ImageFolderConfig, split: str) -> ImageFolderDataset:
        """The ``split`` of the tree a ``data`` block names; ``{split}_size > 0`` caps the item count."""
        return cls(**cls.folder_args(cfg, split))

    def __getitem__(self, index: int) -> tuple[Tensor, int] | None:
        entry = self.entries[index]
        try:
            image = load_image(self.root / entry.relpath, self.image_size)
        # Pillow signals bad data with many exception types (OSError, SyntaxError,
        # DecompressionBombError, ValueError ...): one bad file must never stop a run.
        except Exception as err:
            self._skip(entry.relpath, "unreadable image", err)
            return None
        return image, entry.label

    def attributes(self, index: int) -> dict[str, Any]:
        """JSON-serialisable listing metadata of item ``index`` (no decoding)."""
        e = self.entries[index]
        return {
            "index": index % len(self),
            "path": e.relpath,
            "label": e.label,
            "class_name": self.class_names[e.label],
            "bytes": e.size,
            "mtime_ns": e.mtime_ns,
        }

    def fingerprint(self) -> str:
        """16 hex chars over sorted relative paths, sizes, mtimes, split and transform settings."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            header = (
                f"imagefolder|v{FOLDER_VERSION}|{self.split}|split_dirs={self.split_dirs}|"
                f"val_fraction={self.val_fraction}|max_items={self.max_items}|"
                f"size={self.image_size}|{TRANSFORM}|classes={self.class_names}\n"
            )
            h.update(header.encode())
            # streamed, so a million-file listing never becomes one giant string
            for e in sorted(self.entries, key=lambda f: f.relpath):
                h.update(f"{e.relpath}\t{e.size}\t{e.mtime_ns}\n".encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint
