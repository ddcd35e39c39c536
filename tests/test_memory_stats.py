"""CUDA allocator statistics for the memory monitor, through a fake statistics source (no GPU)."""

from __future__ import annotations

import torch

from napari_upsample_anything.core.memory import MemoryLog, TileMeter, TileRecord, device_memory, sample_device_memory


class FakeAllocator:
    """Mimics torch's CUDA caching allocator: tensors alive, reserved segments and their peaks."""

    def __init__(self, total: int = 24 * 2**30):
        self.total = total
        self.allocated = 0
        self.reserved = 0
        self.peak_allocated = 0
        self.peak_reserved = 0
        self.resets = 0

    def alloc(self, n: int) -> None:
        self.allocated += n
        if self.allocated > self.reserved:  # the allocator grows its segments in 2 MiB steps
            self.reserved = -(-self.allocated // 2**21) * 2**21
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        self.peak_reserved = max(self.peak_reserved, self.reserved)

    def free(self, n: int) -> None:
        self.allocated -= n  # reserved stays: cached for reuse

    def memory_stats(self, device):
        return {
            "allocated_bytes.all.current": self.allocated,
            "allocated_bytes.all.peak": self.peak_allocated,
            "reserved_bytes.all.current": self.reserved,
            "reserved_bytes.all.peak": self.peak_reserved,
        }

    def mem_get_info(self, device):
        return self.total - self.reserved - 300 * 2**20, self.total  # the CUDA context takes some too

    def reset_peak_memory_stats(self, device):
        self.resets += 1
        self.peak_allocated = self.allocated
        self.peak_reserved = self.reserved


def test_device_memory_reads_allocated_reserved_and_peaks():
    fake = FakeAllocator()
    fake.alloc(100 * 2**20)
    fake.alloc(50 * 2**20 + 1)
    fake.free(100 * 2**20)
    m = device_memory("cuda:0", fake)
    assert m.device == "cuda:0"
    assert m.allocated == 50 * 2**20 + 1 and m.current == m.allocated
    assert m.peak_allocated == 150 * 2**20 + 1
    assert m.reserved == 152 * 2**20 and m.peak_reserved == m.reserved  # 2 MiB segments, cached after the free
    assert m.total == 24 * 2**30 and m.free == m.total - m.reserved - 300 * 2**20


def test_monitor_sample_from_a_fake_source_has_the_allocator_figures():
    fake = FakeAllocator()
    fake.alloc(7 * 2**20)
    s = sample_device_memory("cuda", fake)
    assert s["allocated"] == s["current"] == 7 * 2**20
    assert s["reserved"] == 8 * 2**20 and s["peak"] == 7 * 2**20
    assert s["rss"] > 0 and s["available"] > 0  # the process figures are there too
    cpu = sample_device_memory("cpu")
    assert cpu["current"] == cpu["rss"] > 0 and "allocated" not in cpu


def test_tile_meter_measures_the_peak_above_the_level_before_the_tile():
    fake = FakeAllocator()
    fake.alloc(1000)  # inputs alive before the tile
    fake.alloc(5000)
    fake.free(5000)  # an earlier peak that is not this tile's
    log = MemoryLog(device="cuda")
    with TileMeter(torch.device("cuda"), source=fake) as meter:
        fake.alloc(300)
        fake.alloc(200)
        fake.free(500)
    assert fake.resets == 1
    assert meter.peak == 500  # not 5000, not including the 1000 of inputs
    assert meter.peak_reserved == 2**21
    log.add(TileRecord("fit", 0, 1, 0, 1, 600, meter.peak, 0.0))
    assert log.peak_measured_bytes == 500


def test_engine_tiles_are_measured_through_the_installed_source(monkeypatch):
    """The engine's own TileMeter calls go through ``TileMeter.source``: a fit on the CPU with a
    fake source installed records one allocator reading per tile and step."""
    import numpy as np

    import napari_upsample_anything as upa

    fake = FakeAllocator()
    monkeypatch.setattr(TileMeter, "source", fake)
    log = MemoryLog()
    upa.fit_kernels(np.random.default_rng(0).random((24, 24, 3)), (3, 3), steps=2, device="cpu", memory_log=log, backend="eager")
    assert fake.resets >= 2 and all(t.peak_bytes == 0 for t in log.tiles)  # nothing allocated on the fake device


def test_memory_monitor_shows_the_allocator_statistics_on_cuda(monkeypatch):
    """The monitor widget's sampler reads a CUDA device through core.memory (peaks included)."""
    import torch

    from napari_upsample_anything.core import memory
    from napari_upsample_anything.widgets import _memory

    fake = FakeAllocator()
    fake.alloc(3 * 2**20)
    fake.free(2**20)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_memory, "resolve_monitor_device", lambda device: "cuda:0")
    real = memory.sample_device_memory
    monkeypatch.setattr(memory, "sample_device_memory", lambda dev, source=None: real(dev, fake))
    got = _memory.sample_memory("cuda:0")
    assert got["device"] == "cuda:0"
    assert got["allocated"] == 2 * 2**20 == got["current"]
    assert got["peak"] == 3 * 2**20 and got["reserved"] >= got["allocated"]
    assert got["rss"] > 0
