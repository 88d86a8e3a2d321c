"""Files that matter, written whole and read back safely.

Writing: ``atomic_write`` is the one way lmgen writes a file another process (or a rerun after
a crash) may read — a tokenizer ``state.pt``, a checkpoint, a token-cache file, a probe, a
download: a temporary file next to it, fsynced, then one ``os.replace``. ``manifest`` records
the sizes and SHA-256s of a set of files (a token cache's), ``mismatch`` checks them: sizes
always, digests (``file_digest``) once per process for each version of a file.

Reading: states, checkpoints and cache files hold plain data.

``torch.load`` unpickles, and an unpickler can be made to run any code: a file placed in a
shared ``$LMGEN_HOME`` (a tokenizer ``state.pt``, a ``last.ckpt``, a reference-statistics
entry) or handed over by path (``tokenizer.checkpoint``, Inception weights) would run as
whoever reads it next. lmgen writes only tensors and plain data, so it reads with
``weights_only=True`` and refuses anything else unread.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch


class UnsafeFile(ValueError):
    """A file lmgen would read back holds more than tensors and plain data: it is refused unread."""


def safe_load(path: Path, numpy: bool = False) -> Any:
    """What ``torch.save`` wrote at ``path`` — tensors, numbers, strings, lists, tuples and dicts
    only (``torch.load(weights_only=True)``; with ``numpy``, numpy arrays too, as torch-fidelity
    stores its statistics), on the CPU. Every state, checkpoint and cache file lmgen reads back
    goes through here: a pickle that would run code when loaded (placed in a shared
    ``$LMGEN_HOME``, or handed over as ``tokenizer.checkpoint``) raises ``UnsafeFile`` naming
    the path instead of running; lmgen itself never writes anything else."""
    core = np._core if hasattr(np, "_core") else np.core  # numpy 2 / numpy 1
    arrays = [np.dtype, np.ndarray, core.multiarray._reconstruct,
              *{type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int32, np.int64, np.uint8, bool)}]
    try:
        with torch.serialization.safe_globals(arrays if numpy else []):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeFile(f"{path}: refused — it holds objects other than tensors and plain data, and loading it "
                         f"could run code ({str(err).splitlines()[0][:200]})") from None


_CHECKED: dict[tuple[str, int, int], bool] = {}


def plain_data(path: Path) -> bool:
    """Whether ``path`` reads through ``safe_load`` (remembered per path, size and mtime): for a
    file lmgen hands to a library that unpickles it itself (torch-fidelity's Inception weights)."""
    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _CHECKED:
        try:
            safe_load(path)
            _CHECKED[key] = True
        except Exception:  # refused, truncated or not a torch file at all: not plain data either way
            _CHECKED[key] = False
    return _CHECKED[key]


@contextlib.contextmanager
def atomic_write(path: str | Path, keep_previous: Path | None = None) -> Iterator[BinaryIO]:
    """``with atomic_write(path) as out: out.write(...)``: ``path`` gets all the bytes or none.

    They go to a temporary file next to ``path`` (the same filesystem), are flushed and
    fsynced, and replace ``path`` in one ``os.replace``: a reader, or a rerun after a crash, a
    kill or a full disk, finds the old file or the new one, never half of one. If the block
    raises, ``path`` is untouched and the temporary file removed. ``keep_previous``: the file
    being replaced is kept there first (a hard link, else a copy), so ``path`` exists at every
    instant (``last.ckpt`` → ``last.prev.ckpt``). The file gets ``open``'s permissions (0o666
    less the umask), not ``mkstemp``'s 0o600: a shared ``$LMGEN_HOME`` stays readable.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    kept = tmp.with_suffix(".keep")
    try:
        with open(tmp, "xb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        if keep_previous is not None and path.is_file():
            try:
                os.link(path, kept)
            except OSError:  # a filesystem without hard links
                shutil.copy2(path, kept)
            os.replace(kept, keep_previous)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        kept.unlink(missing_ok=True)


_DIGESTS: dict[tuple[int, int, int, int, int], str] = {}


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def file_digest(path: str | Path) -> str:
    """SHA-256 (64 hex) of a file's bytes (about 1 GB/s on one core), computed once per process
    for each version of the file: remembered by (device, inode, size, mtime, ctime), so a file
    rewritten, truncated or edited in place is hashed again (``os.utime`` can put mtime back,
    not ctime), and one whose directory was renamed is not (a token cache appearing atomically)."""
    stat = os.stat(path)
    key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = _hash_file(Path(path))
    return _DIGESTS[key]


def manifest(directory: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"bytes": size, "sha256": digest}}`` for the files ``names`` in ``directory``:
    what ``mismatch`` later checks them against."""
    return {name: {"bytes": (directory / name).stat().st_size, "sha256": file_digest(directory / name)}
            for name in names}


def mismatch(directory: Path, recorded: dict[str, dict[str, Any]]) -> str | None:
    """Why the files of ``directory`` no longer match ``recorded`` (a ``manifest``), or None: a file
    missing or of another size (a stat each, checked first), else one whose SHA-256 differs
    (``file_digest``: hashed once per process for each version of a file)."""
    for name, expected in recorded.items():
        try:
            size = (directory / name).stat().st_size
        except OSError as err:
            return f"{name}: {err.strerror or err}"
        if size != expected["bytes"]:
            return f"{name} is {size} bytes, {expected['bytes']} were written"
    for name, expected in recorded.items():
        if file_digest(directory / name) != expected["sha256"]:
            return f"{name} does not match its SHA-256 (garbled)"
    return None
