"""Sizes, rates and intervals as users type them.

K, M, G and T are binary multiples, as qemu-img reads them, so ``4G`` and ``4GiB`` are the
same size; ``B`` or no suffix means bytes.
"""

from __future__ import annotations

import re
from fractions import Fraction

from deltavol.errors import InvalidSize, UsageError

_MULT = {"": 1, "B": 1}
for _i, _p in enumerate("KMGTP", start=1):
    _MULT[_p] = _MULT[_p + "B"] = _MULT[_p + "IB"] = 1024**_i

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(text: str | int) -> int:
    if isinstance(text, int):
        if text < 0:
            raise InvalidSize(size=text, why="must not be negative")
        return text
    m = _SIZE.match(text)
    if not m or m.group(2).upper() not in _MULT:
        raise InvalidSize(size=text, why="expected a number with an optional unit B K KiB M MiB G GiB T TiB")
    value = Fraction(m.group(1)) * _MULT[m.group(2).upper()]  # exact: a float rounds above 2**53
    if value.denominator != 1:
        raise InvalidSize(size=text, why="not a whole number of bytes")
    return int(value)


def parse_rate(text: str | int | None) -> int | None:
    """``100MiB/s`` -> bytes per second; None or 0 means unlimited."""
    if text is None:
        return None
    if isinstance(text, str):
        text = text.strip()
        if text.lower().endswith("/s"):
            text = text[:-2]
    rate = parse_size(text)
    return rate or None


_INTERVAL = re.compile(r"^\s*(\d+)\s*(s|m|h|d)?\s*$")


def parse_interval(text: str | int | None) -> int | None:
    """``15m`` -> seconds."""
    if text is None:
        return None
    if isinstance(text, int):
        return text
    m = _INTERVAL.match(text)
    if not m:
        raise UsageError(msg=f"invalid interval {text!r}: expected a number with s, m, h or d")
    seconds = int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2) or "s"]
    if seconds <= 0:
        raise UsageError(msg=f"invalid interval {text!r}: must be positive")
    return seconds


def format_size(n: int | float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
