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


class FitDivergedError(ValueError, FloatingPointError):
    """The kernel fit produced a non-finite loss or parameter.

    Raised instead of returning a field full of NaN. The message names the cause: a learning
    rate too large for the image (the loss or parameters blew up after some updates), or a
    degenerate guide normalisation (the loss is not finite before any update).
    """


def is_input_error(exc: BaseException) -> bool:
    """Whether ``exc`` says the input or the call is wrong (a bad array, file, axes or option).

    Such errors are deterministic: executors do not retry them (:mod:`..distributed`), and the
    CLI exits with code 2 for them, as for a bad flag. Running out of memory (including
    :class:`MemoryBudgetError`) and cancellation are not input errors.
    """
    return isinstance(exc, (ValueError, TypeError, FileNotFoundError)) and not isinstance(exc, (MemoryError, Cancelled))
