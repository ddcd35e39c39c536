"""Argument validation shared by the API and the core: one rule per kind of value.

Every check raises a TypeError (wrong kind: None, a string, a bool where a number is
expected) or a ValueError (right kind, bad value) whose message names the argument and
says what to give instead. ``bool`` is never accepted as a number (``steps=True`` is a
mistake, not one step).
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple

import numpy as np
import torch


def _describe(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_int(value, name: str, *, minimum: Optional[int] = None, maximum: Optional[int] = None, hint: str = "") -> int:
    """``value`` as an int: Python/numpy integers, or floats with an integral value (``51.0``).

    Raises TypeError for None, bool, strings and other non-numbers, ValueError for
    non-integral or non-finite floats and values outside ``[minimum, maximum]``.
    """
    suffix = f" ({hint})" if hint else ""
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_complex() and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={_describe(value)}: give an int{suffix}")
    if isinstance(value, numbers.Integral):
        out = int(value)
    else:
        as_float = float(value)
        if not math.isfinite(as_float) or as_float != math.floor(as_float):
            raise ValueError(f"{name}={_describe(value)}: give a whole number (an int){suffix}")
        out = int(as_float)
    if minimum is not None and out < minimum:
        raise ValueError(f"{name}={_describe(value)}: must be >= {minimum}{suffix}")
    if maximum is not None and out > maximum:
        raise ValueError(f"{name}={_describe(value)}: must be <= {maximum}{suffix}")
    return out


def check_float(
    value,
    name: str,
    *,
    minimum: Optional[float] = None,
    maximum: Optional[float] = None,
    positive: bool = False,
    hint: str = "",
) -> float:
    """``value`` as a finite float (ints accepted, bool and strings refused).

    ``positive`` requires ``> 0``; ``minimum`` / ``maximum`` are inclusive bounds.
    """
    suffix = f" ({hint})" if hint else ""
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_complex() and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={_describe(value)}: give a number{suffix}")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name}={_describe(value)}: must be a finite number{suffix}")
    if positive and not out > 0:
        raise ValueError(f"{name}={_describe(value)}: must be positive{suffix}")
    if minimum is not None and out < minimum:
        raise ValueError(f"{name}={_describe(value)}: must be >= {minimum:g}{suffix}")
    if maximum is not None and out > maximum:
        raise ValueError(f"{name}={_describe(value)}: must be <= {maximum:g}{suffix}")
    return out


def check_int_pair(value, name: str, *, minimum: int = 1) -> Tuple[int, int]:
    """``(a, b)`` of ints (each checked by :func:`check_int`) from a length-2 sequence."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray, torch.Size, torch.Tensor)):
        raise TypeError(f"{name}={_describe(value)}: give a pair of ints (h, w)")
    items = list(value)
    if len(items) != 2:
        raise ValueError(f"{name}={_describe(value)}: give a pair of ints (h, w), got {len(items)} values")
    return tuple(check_int(v, f"{name}[{i}]", minimum=minimum) for i, v in enumerate(items))  # type: ignore[return-value]


def check_choice(value, name: str, choices: Sequence[str]) -> str:
    """``value`` lower-cased if it is one of ``choices`` (strings only)."""
    options = ", ".join(repr(c) for c in choices)
    if not isinstance(value, str):
        raise TypeError(f"{name}={_describe(value)}: use one of {options}")
    key = value.lower()
    if key not in choices:
        raise ValueError(f"{name}={_describe(value)}: use one of {options}")
    return key


def check_tensor_usable(t: torch.Tensor, name: str) -> None:
    """Refuse tensors without data (``device='meta'``) and complex tensors."""
    if t.device.type == "meta":
        raise TypeError(f"{name} is a tensor on the 'meta' device, which holds no values; give real data")
    if t.is_complex():
        raise TypeError(f"{name} has dtype {t.dtype}; give a real-valued array")


def check_finite_array(a, name: str) -> None:
    """ValueError if a float array or tensor holds NaN or Inf (call it after every dtype cast)."""
    if isinstance(a, torch.Tensor):
        finite = not a.dtype.is_floating_point or bool(torch.isfinite(a).all())
    else:
        arr = np.asarray(a)
        finite = not np.issubdtype(arr.dtype, np.inexact) or bool(np.isfinite(arr).all())
    if not finite:
        raise ValueError(
            f"{name} contains NaN or Inf values (after conversion to float32: values beyond "
            "+-3.4e38 become Inf); replace or rescale them (e.g. np.nan_to_num) first"
        )
