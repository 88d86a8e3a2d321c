"""Config checks every layer shares: numeric intervals and string choices on dataclass fields.

The lowest layer of lmgen: it imports nothing from the package, so config schemas anywhere
(tokenizers, datasets, ``lmgen.config``) declare their checks next to their defaults and
check themselves the same way.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from typing import Any


def choices(*values: str) -> dict[str, Any]:
    """Field metadata listing the valid values of a string option (checked by ``check_choices``)."""
    return {"choices": tuple(values)}


def check_interval(key: str, value: float, interval: str) -> None:
    """ValueError naming ``key`` unless ``value`` lies in ``interval``: ``"[0, 1)"`` style, "[" and
    "]" closed ends, "(" and ")" open ones, ``inf`` unbounded. NaN lies in no interval."""
    low, high = (float(end) for end in interval[1:-1].split(","))
    above = value > low if interval[0] == "(" else value >= low
    below = value < high if interval[-1] == ")" else value <= high
    if not (above and below):
        raise ValueError(f"{key} must be {_interval_text(interval)}, got {value}")


def _interval_text(interval: str) -> str:
    """"(0, inf)" → "> 0", "[1, inf)" → ">= 1", anything bounded → "in [0, 1)"."""
    if interval.endswith("inf)"):
        return f"{'>' if interval[0] == '(' else '>='} {interval[1:].split(',')[0]}"
    return f"in {interval}"


def check_ranges(prefix: str, config: Any, ranges: Mapping[str, str]) -> None:
    """``check_interval`` for each ``field: interval`` of ``ranges`` on the dataclass ``config``,
    naming ``<prefix>.<field>``."""
    for key, interval in ranges.items():
        check_interval(f"{prefix}.{key}", getattr(config, key), interval)


def check_choices(prefix: str, config: Any) -> None:
    """ValueError naming ``<prefix>.<field>`` for a field of the dataclass ``config`` (nested ones
    included) outside the ``choices`` its metadata declares, or a float that is not finite."""
    for f in dataclasses.fields(config):
        value, key = getattr(config, f.name), f"{prefix}.{f.name}" if prefix else f.name
        valid = f.metadata.get("choices")
        if valid is not None and value not in valid:
            hint = difflib.get_close_matches(str(value), list(map(str, valid)), n=1)
            did = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ValueError(f"{key}: {value!r} is not a valid choice{did}; valid choices: {', '.join(map(str, valid))}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{key} must be a finite number, got {value}")
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_choices(key, value)
