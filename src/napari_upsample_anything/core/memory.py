"""Memory: budgets, measurement, and a per-tile log.

One place for everything about bytes:

* :func:`parse_bytes` turns ``"2GB"`` / ``"512MiB"`` / ``2e9`` into an int.
* :func:`default_budget` is the working-memory budget when the user gives none: a safe
  fraction of what the device has free.
* :class:`MemoryLog` records, for every tile the engine processed, its rectangle (in LR
  cells), the bytes the planner accounted for it and the measured peak (CUDA allocator
  statistics on GPUs, the process resident set size on CPU). The napari memory layer and the
  CLI report are drawn from it.
* :func:`is_out_of_memory` recognises the allocation failures that trigger a retry with
  smaller tiles.
* :func:`device_memory` reads a CUDA device's allocator statistics (allocated, reserved,
  their peaks, driver free / total) from a *statistics source*: torch's allocator by default
  (:class:`TorchCudaStats`), any object with the same three methods in tests (a fake source
  needs no GPU). :class:`TileMeter` measures tile peaks through the same source. The memory
  monitor (widgets) samples :func:`sample_device_memory`.

The budget bounds the engine's *working* memory (tiles of weights, gathered neighbour
values, partial outputs). Inputs and the output array are not counted: the output is what
the user asked for and can be a memory-mapped file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Protocol, Tuple

import torch

from .units import format_bytes, parse_bytes  # noqa: F401  (re-exported)


def available_bytes(device: torch.device) -> int:
    """Bytes the device has free now (CUDA: driver free memory; CPU/MPS: available RAM)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def default_budget(device: torch.device) -> int:
    """Working-memory budget when the user gives none.

    CUDA: 60% of free device memory. CPU/MPS: 40% of available RAM, capped at 8 GiB (bigger
    tiles do not make the CPU faster; they only take memory from the rest of the machine).
    """
    free = available_bytes(device)
    if device.type == "cuda":
        return int(free * 0.6)
    return int(min(free * 0.4, 8 * 2**30))


def process_rss() -> int:
    """Resident set size of this process in bytes (0 when it cannot be read)."""
    try:
        import psutil

        return int(psutil.Process(os.getpid()).memory_info().rss)
    except Exception:  # pragma: no cover - psutil is a dependency, but never fail on a reading
        return 0


def is_out_of_memory(exc: BaseException) -> bool:
    """True for allocation failures worth retrying with a smaller tile."""
    if isinstance(exc, MemoryError):
        return True
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    if isinstance(exc, RuntimeError):
        msg = str(exc).lower()
        return "out of memory" in msg or "can't allocate memory" in msg or "not enough memory" in msg
    return False


# ---------------------------------------------------------------------------- allocator statistics
class StatsSource(Protocol):
    """Where CUDA allocator statistics come from (torch by default; a fake one in tests)."""

    def memory_stats(self, device: torch.device) -> Mapping[str, int]:
        """``torch.cuda.memory_stats``-style keys: ``allocated_bytes.all.current`` / ``.peak``,
        ``reserved_bytes.all.current`` / ``.peak``."""

    def mem_get_info(self, device: torch.device) -> Tuple[int, int]:
        """``(free, total)`` bytes of the device (the driver's view)."""

    def reset_peak_memory_stats(self, device: torch.device) -> None:
        """Start a new peak (the ``.peak`` keys restart from the current values)."""


class TorchCudaStats:
    """:class:`StatsSource` of torch's CUDA caching allocator."""

    def memory_stats(self, device: torch.device) -> Mapping[str, int]:
        return torch.cuda.memory_stats(device)

    def mem_get_info(self, device: torch.device) -> Tuple[int, int]:
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)

    def reset_peak_memory_stats(self, device: torch.device) -> None:
        torch.cuda.reset_peak_memory_stats(device)


_DEFAULT_SOURCE = TorchCudaStats()


@dataclass
class DeviceMemory:
    """One reading of a CUDA device's memory (bytes).

    ``allocated``: tensors alive; ``reserved``: held by the caching allocator (what the
    driver sees as used by this process, >= allocated); ``peak_allocated`` /
    ``peak_reserved``: their maxima since the last :meth:`StatsSource.reset_peak_memory_stats`
    (``peak_allocated`` is ``torch.cuda.max_memory_allocated``); ``free`` / ``total``: the driver's.
    """

    device: str
    allocated: int
    reserved: int
    peak_allocated: int
    peak_reserved: int
    free: int
    total: int

    @property
    def current(self) -> int:
        return self.allocated

    def as_dict(self) -> dict:
        return {
            "device": self.device,
            "allocated": self.allocated,
            "reserved": self.reserved,
            "peak": self.peak_allocated,
            "peak_reserved": self.peak_reserved,
            "free": self.free,
            "total": self.total,
            "current": self.allocated,
        }


def device_memory(device: torch.device | str, source: Optional[StatsSource] = None) -> DeviceMemory:
    """Allocator statistics of CUDA ``device`` from ``source`` (torch's allocator by default)."""
    dev = torch.device(device)
    src = _DEFAULT_SOURCE if source is None else source
    stats = src.memory_stats(dev)
    free, total = src.mem_get_info(dev)

    def get(key: str) -> int:
        return int(stats.get(key, 0))

    return DeviceMemory(
        device=str(dev),
        allocated=get("allocated_bytes.all.current"),
        reserved=get("reserved_bytes.all.current"),
        peak_allocated=get("allocated_bytes.all.peak"),
        peak_reserved=get("reserved_bytes.all.peak"),
        free=int(free),
        total=int(total),
    )


def sample_device_memory(device: torch.device | str, source: Optional[StatsSource] = None) -> dict:
    """What the memory monitor shows for ``device``, as a dict.

    CUDA (or any device when a ``source`` is given): :meth:`DeviceMemory.as_dict` (allocated,
    reserved, peak, peak_reserved, free, total; ``current`` = allocated). CPU / MPS: ``rss`` and
    ``available`` (``current`` = rss). ``rss`` / ``available`` (the process) are in both.
    """
    import psutil

    dev = torch.device(device)
    out = {"device": str(dev), "rss": process_rss(), "available": int(psutil.virtual_memory().available)}
    if dev.type == "cuda" or source is not None:
        out.update(device_memory(dev, source).as_dict())
    else:
        out["current"] = out["rss"]
    return out


@dataclass
class TileRecord:
    """One processed tile: LR-cell rectangle [i0, i1) x [j0, j1), bytes, and timing."""

    stage: str
    i0: int
    i1: int
    j0: int
    j1: int
    planned_bytes: int
    peak_bytes: int
    seconds: float
    #: bytes the path materialised for the tile by the engine's own accounting
    #: (:mod:`.engine.footprint`); the planner's upper bound for the eager path
    allocated_bytes: int = 0


@dataclass
class MemoryLog:
    """Per-tile memory records of one computation, and the overall peak.

    ``peak_bytes`` of a record is ``torch.cuda.max_memory_allocated`` above the level before
    the tile (CUDA), or the process RSS after the tile (CPU; RSS cannot be sampled inside a
    torch kernel, so the planned bytes are the better per-tile figure there).
    """

    device: str = "cpu"
    budget_bytes: int = 0
    #: per stage, the bytes it keeps across its tiles (a fit's prepared inputs and parameters)
    resident: Dict[str, int] = field(default_factory=dict)
    tiles: List[TileRecord] = field(default_factory=list)
    _index: dict = field(default_factory=dict, repr=False, compare=False)

    def add(self, record: TileRecord) -> None:
        """Record a tile. The same tile seen again (every fit step processes every tile)
        updates its record: peaks keep their maximum, seconds add up."""
        key = (record.stage, record.i0, record.i1, record.j0, record.j1)
        index = self._index.get(key)
        if index is None:
            self._index[key] = len(self.tiles)
            self.tiles.append(record)
            return
        old = self.tiles[index]
        old.planned_bytes = max(old.planned_bytes, record.planned_bytes)
        old.peak_bytes = max(old.peak_bytes, record.peak_bytes)
        old.allocated_bytes = max(old.allocated_bytes, record.allocated_bytes)
        old.seconds += record.seconds

    @property
    def peak_planned_bytes(self) -> int:
        return max((t.planned_bytes for t in self.tiles), default=0)

    @property
    def peak_measured_bytes(self) -> int:
        return max((t.peak_bytes for t in self.tiles), default=0)

    @property
    def peak_allocated_bytes(self) -> int:
        return max((t.allocated_bytes for t in self.tiles), default=0)

    def keep(self, stage: str, nbytes: int) -> None:
        """Record that ``stage`` keeps ``nbytes`` across its tiles (the largest figure stays)."""
        self.resident[stage] = max(self.resident.get(stage, 0), int(nbytes))

    @property
    def resident_bytes(self) -> int:
        """The most any one stage keeps across its tiles."""
        return max(self.resident.values(), default=0)

    @property
    def working_bytes(self) -> int:
        """The engine's working set by its own accounting: for the stage where it is largest,
        what the stage keeps plus its largest tile (stages run one after the other)."""
        stages = set(self.resident) | {t.stage for t in self.tiles}
        largest = {s: max((t.allocated_bytes for t in self.tiles if t.stage == s), default=0) for s in stages}
        return int(max((self.resident.get(s, 0) + largest[s] for s in stages), default=0))

    def tile_map(self, lr_shape: tuple[int, int], stage: Optional[str] = None, value: str = "measured"):
        """An (h, w) float array: for each LR cell, the bytes of the tile that covered it.

        ``value``: ``"measured"`` (the tile's measured peak), ``"planned"`` (the planner's bytes)
        or ``"allocated"`` (the engine's accounting of what the tile materialised). Several
        stages may cover the same cell; the largest value wins.
        """
        import numpy as np

        out = np.zeros(lr_shape, dtype=np.float64)
        for t in self.tiles:
            if stage is not None and t.stage != stage:
                continue
            block = out[t.i0 : t.i1, t.j0 : t.j1]
            np.maximum(block, tile_bytes(t, value), out=block)
        return out

    def to_dict(self) -> dict:
        return {
            "device": self.device,
            "budget_bytes": self.budget_bytes,
            "peak_planned_bytes": self.peak_planned_bytes,
            "peak_measured_bytes": self.peak_measured_bytes,
            "peak_allocated_bytes": self.peak_allocated_bytes,
            "resident_bytes": dict(self.resident),
            "working_bytes": self.working_bytes,
            "tiles": [t.__dict__ for t in self.tiles],
        }


#: The kinds of a tile's bytes and the :class:`TileRecord` field that holds each.
TILE_FIELDS = {"measured": "peak_bytes", "planned": "planned_bytes", "allocated": "allocated_bytes"}


def tile_bytes(record: TileRecord, value: str) -> int:
    """A tile's bytes of one kind: ``"measured"``, ``"planned"`` or ``"allocated"``."""
    if value not in TILE_FIELDS:
        raise ValueError(f"value={value!r}: use one of {', '.join(TILE_FIELDS)}")
    return getattr(record, TILE_FIELDS[value])


class TileMeter:
    """Context manager measuring one tile's peak on the device (see :class:`MemoryLog`).

    CUDA (or any device with a ``source``): the allocator's peak allocated bytes above the
    level before the tile; also ``peak_reserved``. CPU: the process RSS after the tile.
    """

    source: Optional[StatsSource] = None  # class-wide override (tests); None: torch's allocator

    def __init__(self, device: torch.device, source: Optional[StatsSource] = None):
        self.device = device
        self.base = 0
        self.peak = 0
        self.peak_reserved = 0
        self._source = source if source is not None else TileMeter.source
        self._allocator = device.type == "cuda" or self._source is not None

    def __enter__(self) -> TileMeter:
        if self._allocator:
            src = self._source or _DEFAULT_SOURCE
            src.reset_peak_memory_stats(self.device)
            self.base = device_memory(self.device, src).allocated
        return self

    def __exit__(self, *exc) -> None:
        if self._allocator:
            reading = device_memory(self.device, self._source or _DEFAULT_SOURCE)
            self.peak = max(0, reading.peak_allocated - self.base)
            self.peak_reserved = reading.peak_reserved
        else:
            self.peak = process_rss()


def release_cached_memory(device: torch.device) -> None:
    """Hand the caching allocator's free blocks back to the device (after an out-of-memory
    retry, so the smaller tiles that follow can use them). A no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def halve_tile(tile, exc: BaseException, what: str = "rendering"):
    """Split a tile ``(i0, i1, j0, j1)`` of LR cells in two after an out-of-memory error.

    Splits rows first, then columns. Returns the two halves; a single LR cell cannot be
    split, which raises :class:`~.errors.MemoryBudgetError` naming ``what`` and chaining ``exc``.
    """
    from .errors import MemoryBudgetError

    i0, i1, j0, j1 = tile
    if i1 - i0 > 1:
        mid = (i0 + i1) // 2
        return [(i0, mid, j0, j1), (mid, i1, j0, j1)]
    if j1 - j0 > 1:
        mid = (j0 + j1) // 2
        return [(i0, i1, j0, mid), (i0, i1, mid, j1)]
    raise MemoryBudgetError(
        f"out of memory while {what} even with one LR cell per tile: free device memory or lower "
        f"radius / the number of channels / max_memory ({exc})"
    ) from exc
