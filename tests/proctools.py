"""The process table, read from /proc: which processes a test's process started, and which still run."""

from __future__ import annotations

from pathlib import Path


def _processes() -> dict[int, tuple[int, str]]:
    """pid → (parent pid, state) of every process now, from /proc."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone while we looked
            continue
        found[int(stat.parent.name)] = (int(fields[1]), fields[0])
    return found


def descendants(pid: int) -> set[int]:
    table, found, todo = _processes(), set(), [pid]
    while todo:
        parent = todo.pop()
        children = [p for p, (ppid, _) in table.items() if ppid == parent and p not in found]
        found.update(children)
        todo += children
    return found


def alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` still running (zombies do not count)."""
    table = _processes()
    return {p for p in pids if p in table and table[p][1] != "Z"}
