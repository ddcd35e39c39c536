"""Thread policy of the engine: how many CPU threads torch uses for one call.

Default (``threads=None``): leave torch alone, i.e. what ``torch.get_num_threads()`` says
(``OMP_NUM_THREADS`` if set, else the number of cores). docs/benchmarks.md records the
measurement behind this default (1 vs 2 threads on the project's 2-core CPU).
"""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, TypeVar

import numpy as np
import torch


def check_threads(threads: Optional[int]) -> Optional[int]:
    """Validate a ``threads`` argument (None or a positive int)."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(
            f"threads={threads!r}: give a positive int, or None for torch's setting ({torch.get_num_threads()} here)"
        )
    return threads


@contextmanager
def torch_threads(threads: Optional[int]) -> Iterator[int]:
    """Run the block with ``torch.set_num_threads(threads)`` and restore the previous count.

    ``None`` changes nothing. Yields the thread count in effect.
    """
    threads = check_threads(threads)
    if threads is None:
        yield torch.get_num_threads()
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(previous)


def _flushing_denormals() -> bool:
    """Whether this thread already flushes subnormal floats to zero (FTZ/DAZ)."""
    tiny = np.array([1e-39], np.float32)  # a float32 subnormal
    return float((tiny * np.float32(1.0))[0]) == 0.0


@contextmanager
def flushed_denormals() -> Iterator[None]:
    """Flush subnormal floats to zero in this thread for the block, then restore the state.

    Softmax weights of far neighbours underflow into the subnormal range (below 1.2e-38),
    where CPU arithmetic is far slower (docs/engine.md, "Design measurements", has the
    render times with and without this). Such weights are far below anything a
    float32 sum of weights that add up to one can resolve, so flushing them changes no result
    the tests can see (all exactness tests run with it). The calling thread and torch's CPU
    worker threads (through :func:`.engine.native.team_flush_denormals`, when the native library
    builds) are changed only for the engine's own calls and restored after; the user's
    program keeps its floating-point state. The worker threads matter too: without them a
    multi-threaded render still computed subnormal weights there.
    """
    if _flushing_denormals() or not torch.set_flush_denormal(True):
        yield  # already flushing, or this CPU cannot (then nothing was changed)
        return
    from .engine import native

    team = native.team_flush_denormals(True)
    try:
        yield
    finally:
        if team:
            native.team_flush_denormals(False)
        torch.set_flush_denormal(False)


F = TypeVar("F", bound=Callable)


def engine_call(fn: F) -> F:
    """Decorator for the engine's entry points (fit, render): run ``fn`` with its ``threads``
    argument as torch's thread count (:func:`torch_threads`) and with subnormals flushed
    (:func:`flushed_denormals`), both restored after. One place for this per-call CPU state."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        threads = signature.bind(*args, **kwargs).arguments.get("threads")
        with torch_threads(threads), flushed_denormals():
            return fn(*args, **kwargs)

    return call  # type: ignore[return-value]
