"""Where lmgen writes: names that become paths stay inside ``$LMGEN_HOME``, and a write that
cannot happen says which path and why.

- ``safe_component``: the one rule for a name that becomes one path component (an
  experiment's artifact folder, a sweep's log folder, a report folder): no separator, not
  ``.`` or ``..``, no NUL or control character, at most ``MAX_COMPONENT_BYTES``. A name that
  breaks it is refused, naming its key, before anything runs. ``printable`` is the weaker rule
  for names that are only shown (run names, which MLflow stores by run id).
- ``file_slug``: a file name made from free text (a sweep point's name holds its grid values,
  ``root=/data/a``): the characters a file name may hold, plus a hash of the original
  whenever anything had to change, so distinct names stay distinct.
- ``check_writable``: ``$LMGEN_HOME`` (created if missing) takes a file, checked in well
  under a second before a run or sweep starts, instead of after the tracking store has retried.
  ``check_inputs``: the folder and files a config names exist, checked before anything is
  created (no empty tracking store left behind by a run that could never start).
- ``writing``: a write that runs out of disk (``ENOSPC``, ``EDQUOT``, or torch's short-write
  "unexpected pos") raises ``DiskFull`` naming the file.

The lowest layer: it imports nothing from the package (errors are ``ValueError``s that callers
turn into config errors).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MAX_COMPONENT_BYTES = 255  # a file name's limit on Linux, macOS and Windows filesystems
_SLUG_CHARS = re.compile(r"[^A-Za-z0-9._,=+@-]")
_SLUG_LENGTH = 120  # characters kept from the name before the hash
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# torch.save to a path reports a failed write without errno: "[enforce fail at
# inline_container.cc:...] . unexpected pos N vs M", "PytorchStreamWriter failed writing file
# ...", or, on a disk with no byte left, "basic_ios::clear: iostream error".
_TORCH_SHORT_WRITE = re.compile(r"unexpected pos|PytorchStreamWriter failed|file write failed|iostream error")
_FULL = (errno.ENOSPC, errno.EDQUOT)


def printable(key: str, name: str) -> None:
    """ValueError naming ``key`` if ``name`` holds a NUL or another control character."""
    bad = _CONTROL.search(name)
    if bad:
        raise ValueError(f"{key}: {name!r} holds the control character {bad.group()!r}; names are printable text")


def safe_component(key: str, name: str) -> None:
    """ValueError naming ``key`` unless ``name`` can be exactly one path component under
    ``$LMGEN_HOME``: non-empty, not ``.`` or ``..``, no ``/`` or ``\\``, no control character,
    at most ``MAX_COMPONENT_BYTES`` bytes of UTF-8."""
    printable(key, name)
    if name in ("", ".", ".."):
        raise ValueError(f"{key}: {name!r} cannot name a folder; give a name such as 'quickstart'")
    if "/" in name or "\\" in name:
        raise ValueError(f"{key}: {name!r} holds a path separator; it names a folder under $LMGEN_HOME, "
                         "so it must be one path component (no '/' or '\\')")
    if len(name.encode()) > MAX_COMPONENT_BYTES:
        raise ValueError(f"{key}: {len(name.encode())} bytes is longer than a file name may be "
                         f"({MAX_COMPONENT_BYTES}): {name[:40]!r}...")


def file_slug(name: str) -> str:
    """``name`` as a file name: unchanged when it is already safe (``size=nano,seed=0``), else
    every other character as ``_``, cut to a length, a leading dot dropped, and ``-`` plus 8 hex
    digits of its hash appended (``root=_data_a-1f2e3d4c``)."""
    slug = _SLUG_CHARS.sub("_", name)[:_SLUG_LENGTH].lstrip(".")
    if slug == name:
        return name
    return f"{slug}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def check_writable(home: Path, key: str = "LMGEN_HOME") -> Path:
    """``home``, created if missing, once a file could be created and removed in it; else
    ValueError naming ``key`` and the path (read-only filesystem, no permission, a file in the
    way) — at once, before a tracking store or cache is opened there."""
    try:
        home.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=home, prefix=".lmgen-write-check-"):
            pass
    except OSError as err:
        raise ValueError(f"{key}: {home} is not writable ({err.strerror or err}); lmgen keeps its tracking "
                         f"store, caches and checkpoints there: point {key} at a writable folder") from None
    return home


def check_inputs(data: Any, tokenizer: Any) -> None:
    """ValueError naming the key of an input a run's config names that is not there: ``data.root``
    (a folder, for the datasets read from one) and ``tokenizer.checkpoint`` (a file, for a
    learned tokenizer given one). ``data`` and ``tokenizer`` are the config's blocks."""
    root = getattr(data, "root", None)
    if root and not Path(root).expanduser().is_dir():
        raise ValueError(f"data.root: {root} is not a folder (no such directory); the {data.name} dataset reads its "
                         "images from there")
    checkpoint = getattr(tokenizer, "checkpoint", None)
    if checkpoint and not Path(checkpoint).expanduser().is_file():
        raise ValueError(f"tokenizer.checkpoint: no file at {checkpoint}")


class DiskFull(OSError):
    """A write ran out of disk space (or quota): ``path`` is the file (or folder) being written."""

    def __init__(self, path: Path, detail: str) -> None:
        super().__init__(errno.ENOSPC, detail, str(path))
        self.path, self.detail = Path(path), detail

    def __str__(self) -> str:
        return f"disk full writing {self.path} ({self.detail}); free space there and run again"

    def __reduce__(self):  # a DiskFull raised in a DataLoader worker pickles back as itself
        return type(self), (self.path, self.detail)


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Raise ``DiskFull`` naming ``path`` when the block's write fails for want of space: an
    ``OSError`` with ``ENOSPC``/``EDQUOT``, or torch's short-write ``RuntimeError`` while the
    filesystem holding ``path`` has (almost) no space left. Anything else goes on unchanged."""
    try:
        yield
    except DiskFull:
        raise
    except OSError as err:
        if err.errno in _FULL:
            raise DiskFull(path, err.strerror or os.strerror(err.errno)) from None
        raise
    except RuntimeError as err:
        if _TORCH_SHORT_WRITE.search(str(err)) and _nearly_full(Path(path)):
            raise DiskFull(path, f"torch: {str(err).splitlines()[0][-80:].strip()}") from None
        raise


def as_disk_full(err: OSError, where: Path) -> DiskFull | None:
    """``err`` as a ``DiskFull`` (naming its file, else ``where``) if it is one, else None: for a
    write no ``writing`` block names (a library's own, such as MLflow's artifacts)."""
    if isinstance(err, DiskFull):
        return err
    if err.errno in _FULL:
        return DiskFull(Path(err.filename) if err.filename else where, err.strerror or os.strerror(err.errno))
    return None


def _nearly_full(path: Path) -> bool:
    """Whether the filesystem holding ``path`` (its nearest existing folder) has under 1 MiB free."""
    for folder in (path, *path.parents):
        if folder.is_dir():
            return shutil.disk_usage(folder).free < 2**20
    return False
