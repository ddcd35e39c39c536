"""napari and lazy data: pyramid / dask image layers are read plane by plane, and the
plugin's OME-Zarr results open as lazy (dask) layers through its npe2 reader.

Runs use a randomly initialised ViT-S/14 (``Random weights``), 64 x 64 planes and 2 steps.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = [
    pytest.mark.usefixtures("offline"),
    pytest.mark.gui,
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning"),
]

RUN_TIMEOUT_MS = 180_000


def _stack(n=3, h=64, w=64, seed=5):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    planes = [np.sin(yy / (3.0 + k)) * np.cos(xx / (4.0 + k)) + 0.2 * rng.random((h, w)) for k in range(n)]
    return np.stack(planes).astype(np.float32)


def _counting_dask(stack, reads):
    """A dask (n, h, w) array whose planes come from a loader that records the plane index."""
    import dask
    import dask.array as da

    def load(z):
        reads.append(z)
        return stack[z]

    return da.stack(
        [
            da.from_delayed(dask.delayed(load, pure=False)(z), shape=stack.shape[1:], dtype=stack.dtype)
            for z in range(stack.shape[0])
        ]
    )


def _main(viewer, layer):
    from napari_upsample_anything.widgets._main import UpsampleAnythingWidget

    w = UpsampleAnythingWidget(viewer)
    viewer.window.add_dock_widget(w, name="Upsample Anything")
    w.random_check.setChecked(True)
    w.steps_spin.setValue(2)
    w.device_combo.setCurrentText("cpu")
    w.layer_picker.set_layer(layer)
    return w


def _run_on(viewer, qtbot, layer):
    from napari_upsample_anything.widgets import get_results

    viewer.layers.selection.active = layer
    w = _main(viewer, layer)
    assert w.layer_picker.layer() is layer
    with qtbot.waitSignal(w.runner.finished, timeout=RUN_TIMEOUT_MS) as blocker:
        assert w.run(), w.last_message
    assert blocker.args[0].status == "done", blocker.args[0]
    (res,) = [r for r in get_results(viewer) if r.source_ref() is layer]
    w.close()
    return res


def test_pyramid_and_dask_layers_are_read_plane_by_plane(make_napari_viewer, qtbot):
    stack = _stack()
    reads_pyramid, reads_dask = [], []
    viewer = make_napari_viewer()
    pyramid = viewer.add_image([_counting_dask(stack, reads_pyramid), stack[:, ::2, ::2]], multiscale=True, name="pyramid")
    viewer.dims.set_point(0, 1.0)  # slice z = 1
    qtbot.wait(50)
    reads_pyramid.clear()  # napari may have drawn level 0 already: count the run's reads only
    res_pyramid = _run_on(viewer, qtbot, pyramid)
    assert 1 in reads_pyramid and set(reads_pyramid) == {1}, reads_pyramid  # only the current plane of level 0
    assert [p.index for p in res_pyramid.planes] == [(1,)]
    assert res_pyramid.planes[0].guide.shape == (64, 64)

    lazy = viewer.add_image(_counting_dask(stack, reads_dask), name="dask")
    viewer.dims.set_point(0, 1.0)
    qtbot.wait(50)
    reads_dask.clear()
    res_dask = _run_on(viewer, qtbot, lazy)
    assert 1 in reads_dask and set(reads_dask) == {1}, reads_dask

    memory = viewer.add_image(stack, name="numpy")
    viewer.dims.set_point(0, 1.0)
    res_np = _run_on(viewer, qtbot, memory)
    assert [p.index for p in res_np.planes] == [(1,)]
    for res in (res_pyramid, res_dask):
        a, b = res.planes[0], res_np.planes[0]
        assert np.array_equal(a.guide, b.guide)
        np.testing.assert_allclose(np.asarray(a.features), np.asarray(b.features), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(a.hr_rgb), np.asarray(b.hr_rgb), rtol=1e-4, atol=1e-5)


def test_ome_zarr_results_open_as_lazy_layers(make_napari_viewer, tmp_path):
    """A result written by the pipeline (OME-TIFF in, OME-Zarr out) opens through the plugin's
    reader as dask layers: the PCA as a 2-level pyramid, with the pixel sizes as scale."""
    import dask.array as da
    import tifffile

    from napari_upsample_anything.pipeline import PipelineOptions, plan_job, run_job
    from napari_upsample_anything.widgets._reader import get_reader

    src = tmp_path / "img.ome.tif"
    image = (_stack(1, 264, 264, seed=7)[0] * 1000 + 2000).astype(np.uint16)  # > 256 px: the PCA gets 2 levels
    tifffile.imwrite(src, image, ome=True, metadata={"axes": "YX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    opts = PipelineOptions(pretrained=False, steps=1, device="cpu", input_size=56, hr_features=False)
    out = tmp_path / "out"
    run_job(plan_job(src, opts, out, planes="all"))
    pca_path, kernels_path = out / "pca.ome.zarr", out / "kernels.ome.zarr"
    assert pca_path.is_dir() and kernels_path.is_dir()

    # Other OME-Zarr stores and other paths are left to napari's other readers.
    import zarr

    foreign = tmp_path / "foreign.ome.zarr"
    zarr.open_group(str(foreign), mode="w", zarr_format=3).create_array("0", shape=(4, 4), dtype="f4")
    assert get_reader(str(foreign)) is None
    assert get_reader(str(src)) is None
    assert get_reader([str(pca_path), str(kernels_path)]) is None
    assert get_reader(str(pca_path)) is not None

    viewer = make_napari_viewer()
    layers = viewer.open(str(pca_path), plugin="napari-upsample-anything")
    assert [ly.name for ly in layers] == ["pca PC1", "pca PC2", "pca PC3"]
    for ly in layers:
        assert ly.multiscale and len(ly.data) == 2
        assert all(isinstance(level, da.Array) for level in ly.data)
        assert tuple(ly.data[0].shape) == (264, 264) and tuple(ly.data[1].shape) == (132, 132)
        np.testing.assert_allclose(ly.scale, (0.5, 0.5))
    pc1 = np.asarray(zarr.open_group(str(pca_path), mode="r")["0"][0])
    np.testing.assert_array_equal(np.asarray(layers[0].data[0]), pc1)
    assert np.isfinite(pc1).all() and pc1.std() > 0

    kernels = viewer.open(str(kernels_path), plugin="napari-upsample-anything")
    assert len(kernels) == 4  # sigma_x, sigma_y, theta, sigma_r on the LR grid
    for ly in kernels:
        assert isinstance(ly.data, da.Array) and not ly.multiscale
        assert tuple(ly.data.shape) == (4, 4)
        np.testing.assert_allclose(ly.scale, (0.5 * 264 / 4, 0.5 * 264 / 4))
        lo, hi = ly.contrast_limits
        assert hi > lo and lo <= float(np.asarray(ly.data).min())  # a constant channel still gets a valid range
