"""The progress / cancel protocol that every long loop in ``core`` follows.

``progress(done, total, info)`` is called after each unit of work (an optimisation step,
a tile, a window) with ``info`` a small dict (for example ``{"stage": "fit", "loss": 0.01}``).
``cancel()`` is polled before each unit; when it returns True the loop raises
:class:`~napari_upsample_anything.core.errors.Cancelled`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from .errors import Cancelled

ProgressFn = Callable[[int, int, dict], Any]
CancelFn = Callable[[], bool]


def check_cancel(cancel: Optional[CancelFn], where: str) -> None:
    """Raise :class:`Cancelled` if ``cancel`` is given and returns True."""
    if cancel is not None and cancel():
        raise Cancelled(f"cancelled by the user during {where}")


def report(progress: Optional[ProgressFn], done: int, total: int, **info: Any) -> None:
    """Call ``progress(done, total, info)`` if a callback was given."""
    if progress is not None:
        progress(done, total, info)
