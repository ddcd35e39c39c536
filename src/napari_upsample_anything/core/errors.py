"""Exceptions shared by the core, the API, the CLI and the widgets."""

from __future__ import annotations


class Cancelled(RuntimeError):
    """Raised inside a long computation when its ``cancel()`` predicate returned True.

    The computation stops at the next step or tile; nothing partial is returned.
    """


class MemoryBudgetError(MemoryError):
    """The memory budget (``max_memory``) cannot hold even the smallest tile.

    The message says how many bytes the smallest tile needs, so the caller can raise the
    budget (or lower the radius / number of channels).
    """
