"""Tiled kernel fits (:mod:`napari_upsample_anything.tiled_fit`): geometry, exactness, Dask."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import napari_upsample_anything.api as upa
from napari_upsample_anything.core.grid import AxisBlocks
from napari_upsample_anything.tiled_fit import (
    choose_tile_cells,
    fit_tile,
    fit_tiled,
    plan_fit_tiles,
    plan_tile_tasks,
    stitch,
)

FIT = dict(steps=2, device="cpu", max_memory="256MB")


def guide_image(shape=(56, 48), seed=0) -> np.ndarray:
    """A small uint8 RGB guide with edges (random blocks plus noise)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (shape[0] // 8 + 1, shape[1] // 8 + 1, 3))
    img = np.kron(coarse, np.ones((8, 8, 1)))[: shape[0], : shape[1]] + rng.normal(0, 10, shape + (3,))
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("hr, lr, tile, halo", [((56, 48), (7, 6), 3, 1), ((100, 70), (13, 9), 4, 2), ((31, 17), (31, 17), 5, 0)])
def test_plan_covers_every_cell_once_on_cell_edges(hr, lr, tile, halo):
    tiles = plan_fit_tiles(hr, lr, tile, halo)
    rows, cols = AxisBlocks.build(hr[0], lr[0]), AxisBlocks.build(hr[1], lr[1])
    cover = np.zeros(lr, int)
    for t in tiles:
        i0, i1, j0, j1 = t.cells
        a0, a1, b0, b1 = t.ext
        cover[i0:i1, j0:j1] += 1
        assert a0 == max(0, i0 - halo) and a1 == min(lr[0], i1 + halo)
        assert b0 == max(0, j0 - halo) and b1 == min(lr[1], j1 + halo)
        # the HR region is exactly the blocks of the extended cells (tile edges on cell edges)
        assert t.hr == (*rows.hr_range(a0, a1), *cols.hr_range(b0, b1))
    assert (cover == 1).all()


def test_stitched_field_shape_and_interiors(tmp_path):
    g = guide_image()
    lr = (7, 6)
    tasks = plan_tile_tasks(g, lr, tile_cells=3, halo=1, **FIT)
    results = [fit_tile(t) for t in tasks]
    field = stitch(lr, results)
    assert field.shape == lr
    field.validate(lr)
    for res in results:  # every cell comes from its own tile's interior
        i0, i1, j0, j1 = res["tile"].cells
        np.testing.assert_array_equal(field.sigma_x[i0:i1, j0:j1].numpy(), res["maps"]["sigma_x"])
    with pytest.raises(ValueError, match="3 cell\\(s\\) missing"):  # the last tile (1 x 3 cells) failed
        stitch(lr, results[:-1])
    with pytest.raises(ValueError, match="covered more than once"):
        stitch(lr, results + results[:1])
    hr = upa.render(np.random.default_rng(1).random((2, *lr)).astype(np.float32), g, field, device="cpu")
    assert hr.shape == (2, *g.shape[:2]) and np.isfinite(hr).all()


@pytest.mark.parametrize("hr, lr", [((56, 48), (7, 6)), ((50, 45), (9, 7))])  # integer and non-integer scale
def test_halo_covering_the_image_equals_the_whole_fit_exactly(hr, lr):
    # Every tile then fits the whole image with the same normalised pixels and options, so it
    # is the same computation as the whole fit; its interior is the whole fit's, bit for bit.
    g = guide_image(hr)
    whole = upa.fit_kernels(g, lr, **FIT)
    tiled = fit_tiled(g, lr, tile_cells=3, halo=max(lr), **FIT)
    assert tiled.meta["tiled"]["n_tiles"] == len(plan_fit_tiles(hr, lr, 3, max(lr))) > 1
    assert tiled.equal(whole)
    assert tiled.meta["guide_normalize"] == whole.meta["guide_normalize"] == "uint8/255"


def test_small_halo_is_an_approximation_that_differs():
    # The truncated dependency is real: without a halo the border cells of tiles change.
    g = guide_image()
    whole = upa.fit_kernels(g, (7, 6), **FIT)
    tiled = fit_tiled(g, (7, 6), tile_cells=3, halo=0, **FIT)
    assert not tiled.equal(whole)
    assert float((tiled.sigma_x / whole.sigma_x).log().abs().max()) < 1.0  # but stays close


def test_float_guide_uses_the_whole_image_normalisation():
    # Percentile normalisation computed per tile would differ; the planner computes it once.
    g = guide_image().astype(np.float32) * 3.0 + 7.0
    whole = upa.fit_kernels(g, (7, 6), **FIT)
    tiled = fit_tiled(g, (7, 6), tile_cells=4, halo=7, **FIT)
    assert tiled.equal(whole)
    assert tiled.meta["guide_normalize"] == "percentile"


def test_guide_smoothing_is_recorded_for_render():
    g = guide_image()
    tiled = fit_tiled(g, (7, 6), tile_cells=7, halo=0, guide_smoothing=1.0, **FIT)
    whole = upa.fit_kernels(g, (7, 6), guide_smoothing=1.0, **FIT)
    assert tiled.equal(whole)  # one tile covering everything: the whole fit
    assert upa.fitted_smoothing(tiled) == 1.0


def test_zarr_guide_reads_regions_and_matches_numpy(tmp_path):
    zarr = pytest.importorskip("zarr")
    g = guide_image()
    z = zarr.open_array(str(tmp_path / "guide.zarr"), mode="w", shape=g.shape, chunks=(16, 16, 3), dtype="u1")
    z[:] = g
    a = fit_tiled(g, (7, 6), tile_cells=3, halo=1, **FIT)
    b = fit_tiled(z, (7, 6), tile_cells=3, halo=1, **FIT)
    assert a.equal(b)


def test_whole_image_fit_is_the_default_when_it_fits_the_budget():
    assert choose_tile_cells((512, 512), (64, 64), 3, budget=2 * 2**30) is None
    cells = choose_tile_cells((8192, 8192), (1024, 1024), 3, budget=2 * 2**30, halo=8)
    assert cells is not None and 1 <= cells < 1024
    # the chosen tile (with its halo) fits half the budget
    side = (cells + 16) * 8
    assert side * side * (7 + 3 + 2 * 3 + 1 + 3) * 4 <= 2**30


def test_fit_tiled_without_tile_size_is_the_whole_fit_when_it_fits():
    g = guide_image()
    auto = fit_tiled(g, (7, 6), **FIT)
    assert auto.meta["tiled"]["n_tiles"] == 1
    assert auto.equal(upa.fit_kernels(g, (7, 6), **FIT))


def test_bad_tiling_arguments_are_typed_errors():
    with pytest.raises(ValueError, match="tile_cells"):
        plan_fit_tiles((64, 64), (8, 8), 0, 1)
    with pytest.raises(ValueError, match="halo"):
        plan_fit_tiles((64, 64), (8, 8), 4, -1)
    with pytest.raises(ValueError, match="lr_shape"):
        plan_fit_tiles((64, 64), (80, 8), 4, 1)
    with pytest.raises(TypeError, match="guide must be an array"):
        plan_tile_tasks([[1, 2]], (1, 1), 1)


def test_bad_fit_options_fail_once_before_any_tile_runs():
    g = guide_image()
    with pytest.raises(ValueError, match="steps"):
        fit_tiled(g, (7, 6), tile_cells=3, halo=1, steps=-1)
    with pytest.raises(ValueError, match="radius"):
        fit_tiled(g, (7, 6), tile_cells=3, halo=1, steps=1, radius=-1)
    with pytest.raises(TypeError, match="unexpected keyword"):
        fit_tiled(g, (7, 6), tile_cells=3, halo=1, steps=1, stepz=3)


def test_tiled_fit_on_two_worker_cluster_equals_serial_byte_for_byte():
    from napari_upsample_anything.distributed import start_local_cluster

    g = guide_image((64, 56), seed=3)
    lr = (8, 7)
    serial = fit_tiled(g, lr, tile_cells=3, halo=2, **FIT)
    client, cluster = start_local_cluster(n_workers=2, threads_per_worker=1)
    try:
        distributed = fit_tiled(g, lr, tile_cells=3, halo=2, client=client, **FIT)
        pids = set(distributed.meta["tiled"].get("pids", []))
    finally:
        client.close()
        cluster.close()
    for name in ("sigma_x", "sigma_y", "theta", "sigma_r"):
        assert getattr(distributed, name).numpy().tobytes() == getattr(serial, name).numpy().tobytes()
    assert len(pids) >= 1 and pids.isdisjoint({__import__("os").getpid()})
    assert torch.isfinite(distributed.sigma_x).all()
