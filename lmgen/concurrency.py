"""Who does what once: ranks of one distributed run, and processes of one sweep.

- Ranks. Lightning's subprocess launcher (``trainer.devices=N``) re-runs the whole command in
  ranks 1..N-1 (``LOCAL_RANK`` set), torchrun sets ``RANK``, SLURM ``SLURM_PROCID``. Every rank
  walks the same code path, because they must meet in the same ``fit`` calls; only rank 0
  writes (MLflow, tokenizer state, token caches) and evaluates. ``share_from_rank_zero`` hands
  rank 0's decisions (the run id) to the others, ``barrier`` waits for its writes.
- Processes. Sweep points run side by side and may need the same stage-1 tokenizer or probe:
  ``file_lock`` (``fcntl.flock``, released by the kernel if the holder dies) makes the first one
  build it and the others wait, then find it built. Runs started together on a fresh
  ``$LMGEN_HOME`` create (and migrate) its SQLite tracking store the same way, one at a time
  (``lmgen.tracking.tracking_client``).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist

_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")


def is_global_zero() -> bool:
    """True unless this process is a non-zero rank of a distributed run."""
    return all(int(os.environ.get(k, "0") or 0) == 0 for k in _RANK_VARIABLES)


def _group_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def share_from_rank_zero(name: str, value: str | None) -> str:
    """Rank 0's ``value`` on every rank.

    Inside a process group (ranks already met in a ``fit``) it is broadcast; before one, rank 0
    puts it in the environment variable ``name``, which the ranks Lightning launches at the next
    ``fit`` inherit. RuntimeError on a non-zero rank that has neither.
    """
    if _group_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return str(box[0])
    if is_global_zero():
        if value is None:
            raise ValueError(f"rank 0 must supply {name}")
        os.environ[name] = value
        return value
    if name not in os.environ:
        raise RuntimeError(f"a non-zero rank started without rank 0's {name}: launch ranks through Lightning "
                           "(trainer.devices / num_nodes), torchrun or SLURM with rank 0 running the same command")
    return os.environ[name]


def barrier() -> None:
    """Wait for every rank, inside a process group; a no-op outside one."""
    if _group_size() > 1:
        dist.barrier()


@contextmanager
def file_lock(path: Path, optional: bool = False) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing, never truncated), blocking until it
    is ours. ``optional``: where the lock file cannot be created (a read-only folder, someone
    else's), the block runs unlocked — for work that writes nothing there either."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "ab")  # noqa: SIM115 -- closed below, after the lock is released
    except OSError:
        if not optional:
            raise
        f = None
    if f is None:
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
