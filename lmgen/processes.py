"""Child processes that end with whoever started them: no orphan keeps training, or holds a
port, after ``lmgen sweep`` or ``lmgen ui`` is stopped.

- ``stopping(on_stop)``: while the block runs, SIGTERM, SIGINT and SIGHUP call ``on_stop(signum)``
  instead of killing the process, so it can stop its children the way each should stop.
- ``die_with_parent(env)``: a child started with ``child_env()`` asks the kernel (Linux's
  ``PR_SET_PDEATHSIG``) for a SIGTERM when its parent dies — even by SIGKILL, which the parent
  cannot forward — and leaves at once if the parent is already gone.
- ``run_until_stopped(command)``: run a server in its own process group; a signal to lmgen
  stops the whole group (the server and its workers), SIGKILL after a grace period.

``python -m lmgen.processes COMMAND...`` is the trampoline that does ``die_with_parent`` and
then becomes COMMAND (the kernel keeps the death signal across ``exec``).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
PARENT_ENV = "LMGEN_PARENT_PID"  # set on a child that must not outlive the process that started it
_PR_SET_PDEATHSIG = 1


@contextlib.contextmanager
def stopping(on_stop: Callable[[int], None]) -> Iterator[None]:
    """Call ``on_stop(signum)`` on SIGTERM, SIGINT or SIGHUP during the block (main thread only;
    elsewhere the block runs with the handlers it has)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.signal(s, lambda signum, frame: on_stop(signum)) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def child_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) marked so that a child calling ``die_with_parent`` ends with us."""
    return {**(os.environ if env is None else env), PARENT_ENV: str(os.getpid())}


def die_with_parent(env: Mapping[str, str] | None = None) -> None:
    """If started by ``child_env``: SIGTERM to this process when its parent dies (Linux), and a
    SIGTERM now if that parent is already gone — it died before the kernel was asked."""
    parent = os.environ.pop(PARENT_ENV, None) if env is None else env.get(PARENT_ENV)  # not for grandchildren
    if not parent or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError) as err:  # no prctl in this libc: the parent's own forwarding still holds
        log.debug("prctl(PR_SET_PDEATHSIG) unavailable: %s", err)
        return
    if os.getppid() != int(parent):
        os.kill(os.getpid(), signal.SIGTERM)


def run_until_stopped(command: Sequence[str], env: Mapping[str, str] | None = None, grace: float = 10.0) -> int:
    """Run ``command`` in its own process group until it exits or lmgen gets a stop signal, which
    is passed to the whole group (SIGTERM; SIGKILL after ``grace`` seconds). Returns its exit
    status, or 128 + the signal lmgen got."""
    trampoline = [sys.executable, "-m", "lmgen.processes", *command]  # die_with_parent, then exec the command
    proc = subprocess.Popen(trampoline, env=child_env(env), start_new_session=True)
    got: list[int] = []

    def stop(signum: int) -> None:
        got.append(signum)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)

    with stopping(stop):
        while True:
            try:
                code = proc.wait(timeout=grace if got else None)
                break
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):  # its workers, should the server have left any
        os.killpg(proc.pid, signal.SIGKILL)
    return 128 + got[0] if got else code


if __name__ == "__main__":
    die_with_parent()
    os.execvp(sys.argv[1], sys.argv[1:])
