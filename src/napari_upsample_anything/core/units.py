"""Byte counts: parse ``"2GB"``-style budgets and format sizes (no torch import, so the
widgets can use it before torch is loaded)."""

from __future__ import annotations

import re
from typing import Optional

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


MAX_BYTES = 1e18  # an exabyte: anything above is a typo (and 1e400 is infinity)


def parse_bytes(value: int | float | str | None, name: str = "max_memory") -> Optional[int]:
    """Parse a byte count: an int/float, or a string like ``"2GB"``, ``"1.5 GiB"``, ``"512MB"``.

    GB/MB/kB are powers of ten, GiB/MiB/KiB powers of two. None and ``"auto"`` return None
    (meaning: use :func:`default_budget`).
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r}: give a number of bytes or a string like '2GB'")
    if isinstance(value, (int, float)):
        if not (value > 0) or value != value or value == float("inf"):
            raise ValueError(f"{name}={value!r}: the memory budget must be a positive number of bytes")
        if value > MAX_BYTES:
            raise ValueError(f"{name}={value!r}: more than {MAX_BYTES:.0e} bytes; give a real budget such as '8GB'")
        return int(value)
    text = str(value).strip().lower()
    if text == "auto":
        return None
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)", text)
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"{name}={value!r} is not a size; use bytes or a string like '2GB', '512MiB', '1.5GiB'")
    amount = float(m.group(1)) * _UNITS[m.group(2)]
    if not amount < MAX_BYTES:  # also catches '1e400' (inf)
        raise ValueError(f"{name}={value!r}: more than {MAX_BYTES:.0e} bytes; give a real budget such as '8GB'")
    nbytes = int(amount)
    if nbytes <= 0:
        raise ValueError(f"{name}={value!r}: the memory budget must be positive")
    return nbytes


def no_budget(value) -> bool:
    """True when ``value`` asks for no memory budget (the default one): None, ``""`` or
    ``"auto"`` -- the one place this rule is written (:func:`parse_bytes` maps ``"auto"``
    to None too, but refuses ``""``, which the widgets' empty field gives)."""
    return value is None or (isinstance(value, str) and value.lower() in ("", "auto"))


def budget_or_none(value):
    """``value`` unless it asks for no budget (:func:`no_budget`), then None."""
    return None if no_budget(value) else value


def format_bytes(n: float) -> str:
    """Human-readable size with binary units (``1.5 GiB``)."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover
