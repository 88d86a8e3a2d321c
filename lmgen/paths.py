"""Where lmgen writes: names that become paths stay inside ``$LMGEN_HOME``.

- ``safe_component``: the one rule for a name that becomes one path component (an
  experiment's artifact folder, a sweep's log folder, a report folder): no separator, not
  ``.`` or ``..``, no NUL or control character, at most ``MAX_COMPONENT_BYTES``. A name that
  breaks it is refused, naming its key, before anything runs. ``printable`` is the weaker rule
  for names that are only shown (run names, which MLflow stores by run id).
- ``file_slug``: a file name made from free text (a sweep point's name holds its grid values,
  ``root=/data/a``): the characters a file name may hold, plus a hash of the original
  whenever anything had to change, so distinct names stay distinct.

The lowest layer: it imports nothing from the package (errors are ``ValueError``s that callers
turn into config errors).
"""

from __future__ import annotations

import hashlib
import re

MAX_COMPONENT_BYTES = 255  # a file name's limit on Linux, macOS and Windows filesystems
_SLUG_CHARS = re.compile(r"[^A-Za-z0-9._,=+@-]")
_SLUG_LENGTH = 120  # characters kept from the name before the hash
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


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
