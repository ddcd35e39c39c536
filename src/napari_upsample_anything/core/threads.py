"""Thread policy of the engine: how many CPU threads torch uses for one call.

Default (``threads=None``): leave torch alone, i.e. what ``torch.get_num_threads()`` says
(``OMP_NUM_THREADS`` if set, else the number of cores). docs/benchmarks.md records the
measurement behind this default (1 vs 2 threads on the project's 2-core CPU).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

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
