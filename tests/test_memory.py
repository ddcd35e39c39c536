"""Memory: budget parsing, tile planning, and the measured peak of a render under a budget."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from napari_upsample_anything.core.engine.blocks import BlockEngine, RenderOptions
from napari_upsample_anything.core.errors import MemoryBudgetError
from napari_upsample_anything.core.guide import Guide
from napari_upsample_anything.core.memory import (
    format_bytes,
    is_out_of_memory,
    parse_bytes,
)


@pytest.mark.parametrize(
    "text,value",
    [
        ("2GB", 2 * 10**9),
        ("512MiB", 512 * 2**20),
        ("1.5 GiB", int(1.5 * 2**30)),
        ("100", 100),
        (4096, 4096),
        (1e9, 10**9),
        ("auto", None),
        (None, None),
    ],
)
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("bad", ["lots", "-1GB", "2 parsecs", 0, -5, True, float("nan")])
def test_parse_bytes_rejects(bad):
    with pytest.raises(ValueError, match="max_memory"):
        parse_bytes(bad)


def test_format_bytes():
    assert format_bytes(512) == "512 B" and format_bytes(3 * 2**30) == "3.0 GiB"


def test_oom_recognition():
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 20.74 GiB"))
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: can't allocate memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_plan_respects_budget_and_covers_grid():
    engine = BlockEngine(Guide(torch.rand(140, 98, 3).numpy()), (10, 7), RenderOptions(), torch.device("cpu"))
    per_block = engine.bytes_per_block(64, 4, training=False)
    small_chunks = 4 * engine.P * engine.K * 4  # tight budgets use one-block chunks
    for budget in (small_chunks + per_block, small_chunks + 3 * per_block, 40 * 2**20, 10**9):
        tiles = engine.plan(per_block, budget)
        fixed = engine.tile_overhead()
        covered = torch.zeros(10, 7, dtype=torch.int32)
        for i0, i1, j0, j1 in tiles:
            assert fixed + (i1 - i0) * (j1 - j0) * per_block <= budget
            covered[i0:i1, j0:j1] += 1
        assert bool((covered == 1).all())
    assert len(engine.plan(per_block, small_chunks + per_block)) == 70  # one cell per tile
    with pytest.raises(MemoryBudgetError, match="too small"):
        engine.plan(per_block, small_chunks + per_block - 1)


def test_memory_log_records_every_tile():
    import numpy as np

    import napari_upsample_anything as upa

    rng = np.random.default_rng(0)
    guide = rng.random((70, 84, 3)).astype(np.float32)
    log = upa.MemoryLog()
    field = upa.KernelField.initial((5, 6))
    upa.render(rng.standard_normal((8, 5, 6)).astype(np.float32), guide, field, max_memory="3MB", memory_log=log)
    assert len(log.tiles) > 1 and all(t.stage == "render" for t in log.tiles)
    assert log.peak_planned_bytes <= 3 * 10**6
    tile_map = log.tile_map((5, 6), value="planned")
    assert tile_map.shape == (5, 6) and (tile_map > 0).all()
    assert log.to_dict()["budget_bytes"] == 3 * 10**6


_PEAK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import napari_upsample_anything as upa

    budget = sys.argv[1]
    rng = np.random.default_rng(0)
    H = W = 448; h = w = 32; C = 64
    guide = (rng.random((H, W, 3)) * 255).astype(np.uint8)
    lr = rng.standard_normal((C, h, w)).astype(np.float32)
    field = upa.KernelField.initial((h, w))
    out = np.ones((C, H, W), np.float32)               # output pages resident before measuring
    upa.render(lr[:, :4, :4], guide[:56, :56], upa.KernelField.initial((4, 4)))  # load BLAS etc.

    def rss_kib(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1])

    with open("/proc/self/clear_refs", "w") as f:   # reset the peak (VmHWM) to the current RSS
        f.write("5")
    base = rss_kib("VmRSS:")
    upa.render(lr, guide, field, out=out, max_memory=budget)
    peak = rss_kib("VmHWM:")
    print(json.dumps({"base_kib": base, "peak_kib": peak}))
    """
)


def _peak_above_base(budget: str) -> int:
    res = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, budget], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout.strip().splitlines()[-1])
    return (d["peak_kib"] - d["base_kib"]) * 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux) to measure the peak RSS")
def test_render_peak_memory_stays_under_a_small_budget():
    """448x448 with 64 channels: the dense published render would need 197*448^2*64*4 B = 10 GB.

    With max_memory=32MB the measured peak above the inputs and output stays under the budget
    (plus 16 MiB of allocator and interpreter slack); with a 2GB budget the same render uses
    far more, which shows that the measurement can see the difference.
    """
    small = _peak_above_base("32MB")
    large = _peak_above_base("2GB")
    assert small <= 32 * 10**6 + 16 * 2**20, format_bytes(small)
    assert large > 2 * small, (format_bytes(small), format_bytes(large))


def test_memory_log_merges_repeated_tiles():
    import napari_upsample_anything as upa

    rng = np.random.default_rng(1)
    log = upa.MemoryLog()
    upa.fit_kernels(rng.random((70, 84, 3)).astype(np.float32), (5, 6), steps=4, max_memory="3MB", memory_log=log)
    rects = [(t.i0, t.i1, t.j0, t.j1) for t in log.tiles]
    assert len(rects) == len(set(rects)) > 1  # one record per tile, not one per tile and step
    assert log.tile_map((5, 6), stage="fit", value="planned").min() > 0


def test_engine_accounts_for_what_each_path_allocates():
    """The memory log's *allocated* bytes per tile and *resident* bytes follow the path that ran
    (core.engine.footprint): the fused native kernels keep no [B, P, K] intermediates, so they
    account for far less than the planner's upper bound; the eager path's own figure is the
    planner's. (How close the accounting is to the process's real peak is measured by
    benchmarks/bench_estimate.py, docs/benchmarks_estimate.md.)"""
    import napari_upsample_anything as upa
    from napari_upsample_anything.core.engine import footprint
    from napari_upsample_anything.core.engine.backends import native_usable

    rng = np.random.default_rng(2)
    guide = rng.random((70, 84, 3)).astype(np.float32)
    P, G, n_cells = 14 * 14, 3, 5 * 6
    for backend in ("auto", "eager"):
        log = upa.MemoryLog()
        fld = upa.fit_kernels(guide, (5, 6), steps=2, backend=backend, memory_log=log)
        K = 197  # the published radius 8: offsets of the disk dy^2 + dx^2 <= 64
        blocks = [(t.i1 - t.i0) * (t.j1 - t.j0) for t in log.tiles]
        if fld.meta["kernel"] == "native":
            per_block = footprint.fused_fit_tile_per_block(P, K, G, kept_inputs=True, kernel="native")
            assert [t.allocated_bytes for t in log.tiles] == [per_block * b for b in blocks]
            assert log.resident_bytes == footprint.fit_resident_bytes(n_cells, P, K, G, kept_inputs=True)
            assert log.working_bytes < log.peak_planned_bytes / 4
        else:  # the eager path (or a compiler-less machine): the planner's figure is the path's own
            assert [t.allocated_bytes for t in log.tiles] == [t.planned_bytes for t in log.tiles]
            assert log.resident_bytes > 0  # the guide-only cache
        assert log.working_bytes == log.resident_bytes + log.peak_allocated_bytes
        assert log.to_dict()["peak_allocated_bytes"] == log.peak_allocated_bytes
        assert (log.tile_map((5, 6), value="allocated") > 0).all()

    # 16 channels: the native kernel aggregates them itself (no weights buffer); 64: a GEMM
    # after the native weights, written chunk by chunk into one workspace buffer
    for channels, backend in ((16, "auto"), (64, "auto"), (16, "eager")):
        values = rng.standard_normal((channels, 5, 6)).astype(np.float32)
        log = upa.MemoryLog()
        upa.render(values, guide, fld, backend=backend, memory_log=log)
        blocks = [(t.i1 - t.i0) * (t.j1 - t.j0) for t in log.tiles]
        native = backend == "auto" and native_usable(torch.device("cpu"), G)  # the C kernel's weights
        if native:
            per_block = footprint.native_render_per_block(P, 197, G, channels, fused=channels <= 16)
            assert [t.allocated_bytes for t in log.tiles] == [per_block * b for b in blocks]
            assert log.peak_allocated_bytes < log.peak_planned_bytes
            assert (log.resident_bytes == 0) == (channels <= 16)
        else:
            assert [t.allocated_bytes for t in log.tiles] == [t.planned_bytes for t in log.tiles]
            assert log.resident_bytes > 0  # the eager path's chunk buffers
    with pytest.raises(ValueError, match="value='peak'"):
        log.tile_map((5, 6), value="peak")


def test_one_memory_log_for_several_stages_counts_them_apart():
    """The pipeline logs a plane's fit, PCA render and feature render in one log: what a stage
    keeps counts with that stage's tiles only, and the working set is the largest stage's."""
    import napari_upsample_anything as upa

    rng = np.random.default_rng(4)
    guide = rng.random((70, 84, 3)).astype(np.float32)
    log = upa.MemoryLog()
    fld = upa.fit_kernels(guide, (5, 6), steps=1, memory_log=log)
    fit_only = log.working_bytes
    upa.render(rng.standard_normal((64, 5, 6)).astype(np.float32), guide, fld, memory_log=log)
    assert set(log.resident) == {"fit", "render"}
    per_stage = {s: log.resident[s] + max(t.allocated_bytes for t in log.tiles if t.stage == s) for s in ("fit", "render")}
    assert per_stage["fit"] == fit_only
    assert log.working_bytes == max(per_stage.values())
    assert log.to_dict()["resident_bytes"] == log.resident
