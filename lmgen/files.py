"""Reading back what lmgen wrote, safely: states, checkpoints and cache files hold plain data.

``torch.load`` unpickles, and an unpickler can be made to run any code: a file placed in a
shared ``$LMGEN_HOME`` (a tokenizer ``state.pt``, a ``last.ckpt``, a reference-statistics
entry) or handed over by path (``tokenizer.checkpoint``, Inception weights) would run as
whoever reads it next. lmgen writes only tensors and plain data, so it reads with
``weights_only=True`` and refuses anything else unread.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

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
