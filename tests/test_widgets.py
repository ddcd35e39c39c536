"""The napari widgets end to end, in a real (hidden) napari window under Xvfb.

Runs use a randomly initialised ViT-S/14 (``Random weights``), small images and 2-3
optimisation steps, so they need neither the network nor pretrained weights. The backbone
is built once per session (timm model cache) and reused.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = [
    pytest.mark.usefixtures("offline"),
    pytest.mark.gui,
    pytest.mark.filterwarnings("ignore:.*random weights:UserWarning"),
]

RUN_TIMEOUT_MS = 180_000


# ---------------------------------------------------------------------------------- helpers
def _rgb(h=84, w=98, seed=0):
    """A small RGB picture with structure (blobs and edges), uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        img[..., c] = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (h / 4) ** 2))
    img[:, w // 2 :, 0] += 0.5
    img = np.clip(img + 0.05 * rng.standard_normal(img.shape), 0, 1)
    return (img * 255).astype(np.uint8)


def _main(viewer, steps=2, hr="auto"):
    from napari_upsample_anything.widgets._main import UpsampleAnythingWidget

    w = UpsampleAnythingWidget(viewer)
    viewer.window.add_dock_widget(w, name="Upsample Anything")
    w.random_check.setChecked(True)
    w.steps_spin.setValue(steps)
    w.device_combo.setCurrentText("cpu")
    w.hr_combo.setCurrentIndex([w.hr_combo.itemData(i) for i in range(w.hr_combo.count())].index(hr))
    return w


def _run(qtbot, widget, timeout=RUN_TIMEOUT_MS):
    """Press Run and wait for the worker to finish; returns the Outcome."""
    with qtbot.waitSignal(widget.runner.finished, timeout=timeout) as blocker:
        assert widget.run(), widget.last_message
    return blocker.args[0]


def _snapshot(layer):
    return {
        "data": np.array(layer.data, copy=True),
        "name": layer.name,
        "scale": tuple(layer.scale),
        "translate": tuple(layer.translate),
        "metadata": dict(layer.metadata),
        "visible": layer.visible,
    }


def _unchanged(layer, snap):
    assert layer.name == snap["name"]
    assert np.array_equal(np.asarray(layer.data), snap["data"])
    assert tuple(layer.scale) == snap["scale"] and tuple(layer.translate) == snap["translate"]
    assert dict(layer.metadata) == snap["metadata"]
    assert layer.visible == snap["visible"]


def _own(viewer):
    from napari_upsample_anything.widgets._registry import is_own

    return [l for l in viewer.layers if is_own(l)]


@pytest.fixture
def fitted(make_napari_viewer, qtbot):
    """A viewer with one RGB image fitted by the main widget (scale and translate set)."""
    viewer = make_napari_viewer()
    src = viewer.add_image(_rgb(), name="img", scale=(0.5, 0.25), translate=(10.0, -3.0))
    w = _main(viewer)
    out = _run(qtbot, w)
    assert out.status == "done", w.last_message
    return viewer, src, w


# ---------------------------------------------------------------------------------- plugin
def test_widgets_and_samples_open_through_napari(make_napari_viewer):
    """What the Plugins menu and File > Open Sample do: napari builds the widgets from the manifest."""
    from napari_upsample_anything.widgets._inspector import KernelInspectorWidget
    from napari_upsample_anything.widgets._main import UpsampleAnythingWidget
    from napari_upsample_anything.widgets._memory import MemoryMonitorWidget
    from napari_upsample_anything.widgets._upsample_layer import UpsampleLayerWidget

    viewer = make_napari_viewer()
    viewer.open_sample("napari-upsample-anything", "cells")
    assert viewer.layers[-1].name == "cells" and viewer.layers[-1].data.shape == (660, 550)
    expected = {
        "Upsample Anything": UpsampleAnythingWidget,
        "Kernel inspector": KernelInspectorWidget,
        "Memory monitor": MemoryMonitorWidget,
        "Upsample a layer with fitted kernels": UpsampleLayerWidget,
    }
    opened = {}
    for name, cls in expected.items():
        dock, widget = viewer.window.add_plugin_dock_widget("napari-upsample-anything", name)
        # napari hands plugin widgets a PublicOnlyProxy; the widgets keep the viewer itself,
        # so that all of them share one registry per viewer.
        assert isinstance(widget, cls) and widget.viewer is viewer
        opened[name] = (dock, widget)
    assert opened["Upsample Anything"][1].layer_picker.layer() is viewer.layers["cells"]
    assert opened["Kernel inspector"][1].state is opened["Upsample Anything"][1].state
    for dock, widget in opened.values():
        viewer.window.remove_dock_widget(dock)
        widget.deleteLater()


# ---------------------------------------------------------------------------------- main
def test_main_widget_end_to_end(fitted):
    from napari_upsample_anything.widgets import get_results

    viewer, src, w = fitted
    names = [l.name for l in viewer.layers]
    for suffix in ("HR PCA", "LR PCA", "memory"):
        assert f"img {suffix}" in names
    assert "img kernels" not in names  # drawn on request only (Kernel inspector)
    hr, lr = viewer.layers["img HR PCA"], viewer.layers["img LR PCA"]
    memory = viewer.layers["img memory"]
    assert viewer.layers.selection.active is hr  # not a hidden layer
    from napari_upsample_anything.widgets._kernels import plane_positions, vectors_data

    res0 = get_results(viewer)[0]
    data, _features, _count = vectors_data(res0.frame, plane_positions(res0.frame, res0.planes), n_sigma=1.0, segments=16)
    kernels = type("Drawn", (), {"data": data})

    # Shapes: 84 x 98 image, ViT patch 14 -> 6 x 7 tokens.
    assert hr.rgb and hr.data.shape == (84, 98, 3)
    assert lr.rgb and lr.data.shape == (6, 7, 3)
    assert memory.data.shape == (6, 7) and memory.data.max() > 0
    assert 0 < len(kernels.data) <= 6 * 7 * 16
    # Outlines are clipped to the image, so they do not inflate the view's extent.
    ends = np.concatenate([kernels.data[:, 0], kernels.data[:, 0] + kernels.data[:, 1]])
    assert ends.min(0).min() >= -0.5 and (ends.max(0) <= [83.5, 97.5]).all()

    # HR layers: the source's scale and translate. LR layers: scaled by the patch.
    assert np.allclose(hr.scale, src.scale) and np.allclose(hr.translate, src.translate)
    f = np.array([84 / 6, 98 / 7])
    s, t = np.asarray(src.scale), np.asarray(src.translate)
    for layer in (lr, memory):
        assert np.allclose(layer.scale, s * f)
        assert np.allclose(layer.translate, t + s * (f / 2 - 0.5))
    # Numerically: LR cell (i, j)'s centre lands on HR coordinate ((i + 0.5) f - 0.5).
    for i, j in [(0, 0), (5, 6), (2, 3)]:
        lr_world = np.asarray(lr.data_to_world((i, j)))
        hr_world = np.asarray(hr.data_to_world(((i + 0.5) * f[0] - 0.5, (j + 0.5) * f[1] - 0.5)))
        assert np.allclose(lr_world, hr_world)
    # The kernel ellipses are centred on the LR cell centres too (a small one is not clipped).
    from napari_upsample_anything.widgets._kernels import ellipses_of

    ell = ellipses_of(get_results(viewer)[0].planes[0], n_sigma=0.05)
    assert np.allclose(ell.outline(16).mean(axis=1)[0], [0.5 * f[0] - 0.5, 0.5 * f[1] - 0.5], atol=1e-6)
    assert np.allclose(lr.data_to_world(ell.cells[8]), hr.data_to_world(ell.centres[8]))

    # The result is registered, with the HR features kept.
    (res,) = get_results(viewer)
    plane = res.planes[0]
    assert plane.hr_features.shape == (384, 84, 98) and plane.hr_features.dtype == np.float32
    assert plane.field.shape == (6, 7) and plane.lr_shape == (6, 7)
    assert np.isfinite(plane.hr_features).all()
    assert "random weights" in w.status.text()
    assert w.save_features_button.isEnabled() and w.save_kernels_button.isEnabled()


def test_main_widget_fit_options_reach_the_run_config(make_napari_viewer):
    w = _main(make_napari_viewer())
    cfg = w.config()
    assert (cfg.guide_smoothing, cfg.fit_downsample, cfg.fit_fraction) == (0.0, "bicubic", 1.0)  # published by default
    assert w.smoothing_spin.text() == "off"
    w.smoothing_spin.setValue(2.0)
    w.fit_input_combo.setCurrentIndex(1)
    w.fraction_spin.setValue(25)
    cfg = w.config()
    assert (cfg.guide_smoothing, cfg.fit_downsample, cfg.fit_fraction) == (2.0, "area", 0.25)
    cfg.validate()


def test_user_layers_untouched_and_rerun_replaces_only_own(make_napari_viewer, qtbot):
    from napari_upsample_anything.widgets import get_results

    viewer = make_napari_viewer()
    src = viewer.add_image(_rgb(56, 70), name="img", scale=(2.0, 2.0), metadata={"mine": 1})
    decoy = viewer.add_image(np.ones((5, 5), np.float32), name="img HR PCA")  # a user's layer with our name
    labels = viewer.add_labels(np.zeros((56, 70), np.int32), name="mask")
    snaps = {l.name: _snapshot(l) for l in (src, decoy, labels)}
    w = _main(viewer)
    w.layer_picker.set_layer(src)
    assert _run(qtbot, w).status == "done"
    first = {l.metadata["upsample_anything"]["role"]: l for l in _own(viewer)}
    assert set(first) == {"hr_pca", "lr_pca", "memory"}
    assert first["hr_pca"].name != "img HR PCA"  # napari renamed ours, the user's keeps its name
    n_layers = len(viewer.layers)

    assert _run(qtbot, w).status == "done"
    second = {l.metadata["upsample_anything"]["role"]: l for l in _own(viewer)}
    assert len(viewer.layers) == n_layers and set(second) == set(first)
    assert all(second[r] is not first[r] for r in first)  # replaced, not duplicated
    assert len(get_results(viewer)) == 1  # the old result was dropped
    for layer in (src, decoy, labels):
        assert layer in viewer.layers
        _unchanged(layer, snaps[layer.name])


def test_save_features_and_kernels(fitted, tmp_path):
    from napari_upsample_anything.core.field import KernelField
    from napari_upsample_anything.widgets import get_results

    viewer, _, w = fitted
    path = w.save_hr_features(tmp_path / "feats")
    arr = np.load(path, mmap_mode="r")
    assert path.suffix == ".npy" and arr.shape == (384, 84, 98)
    assert np.array_equal(arr, get_results(viewer)[0].planes[0].hr_features)
    (kpath,) = w.save_kernels(tmp_path / "kernels.npz")
    assert KernelField.load(kpath).equal(get_results(viewer)[0].planes[0].field)


def test_memory_mapped_features_are_deleted_with_the_layers(make_napari_viewer, qtbot):
    from napari_upsample_anything.widgets import get_results

    viewer = make_napari_viewer()
    viewer.add_image(_rgb(56, 56), name="img")
    w = _main(viewer, hr="memmap")
    assert _run(qtbot, w).status == "done"
    (res,) = get_results(viewer)
    plane = res.planes[0]
    assert isinstance(plane.hr_features, np.memmap)
    folder = res.pipeline.storage.path
    assert folder.exists()
    for layer in _own(viewer):
        viewer.layers.remove(layer)
    assert get_results(viewer) == [] and not folder.exists()


def test_cancel_stops_within_a_step(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    src = viewer.add_image(_rgb(), name="img")
    snap = _snapshot(src)
    w = _main(viewer, steps=2000)
    events = []
    w.runner.progressed.connect(events.append)
    # The GUI thread stays responsive during the run: an idle timer (interval 0: it fires whenever the
    # event loop is free) fires between the run's progress events, i.e. while the run computes.
    from qtpy.QtCore import QTimer

    order = []
    w.runner.progressed.connect(lambda e: order.append("progress"))
    timer = QTimer()
    timer.timeout.connect(lambda: order.append("tick"))
    timer.start(0)
    with qtbot.waitSignal(w.runner.finished, timeout=RUN_TIMEOUT_MS) as blocker:
        assert w.run()
        assert w.cancel_button.isEnabled() and not w.run_button.isEnabled()
        qtbot.waitUntil(lambda: any(e.stage == "fit" and e.done >= 10 for e in events), timeout=RUN_TIMEOUT_MS)
        n_before = sum(e.stage == "fit" for e in events)
        w.cancel()
    timer.stop()
    assert blocker.args[0].status == "cancelled"
    first, last = order.index("progress"), len(order) - 1 - order[::-1].index("progress")
    assert "tick" in order[first:last], "the GUI thread processed no event while the run computed"
    assert sum(e.stage == "fit" for e in events) <= n_before + 1  # at most the step in flight
    assert max(e.done for e in events if e.stage == "fit") < 2000
    assert _own(viewer) == [] and list(viewer.layers) == [src]
    _unchanged(src, snap)
    assert "cancelled" in w.status.text()
    assert w.run_button.isEnabled() and not w.cancel_button.isEnabled()
    assert w.runner.handle.join(5)


def test_errors_become_notifications(make_napari_viewer, qtbot, records, monkeypatch, tmp_path):
    viewer = make_napari_viewer()
    w = _main(viewer)

    # No image layer at all.
    assert not w.run()
    assert records()[-1].severity == "error" and "No image layer" in records()[-1].message

    # A labels layer where an image is needed.
    lab = viewer.add_labels(np.zeros((56, 56), np.int32), name="mask")
    w.layer_picker.set_layer(lab)
    assert not w.run()
    assert "Labels layer" in records()[-1].message and "Image layer" in records()[-1].message

    # An image smaller than one patch: the worker reports it, no traceback.
    tiny = viewer.add_image(np.random.default_rng(0).random((10, 12)).astype(np.float32), name="tiny")
    w.layer_picker.set_layer(tiny)
    out = _run(qtbot, w)
    assert out.status == "error"
    assert "smaller than one 14 x 14 patch" in records()[-1].message and records()[-1].severity == "error"
    assert "Traceback" not in records()[-1].message

    # Missing pretrained weights (offline, empty cache): the notification says how to get them.
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    img = viewer.add_image(_rgb(42, 42), name="img")
    w.layer_picker.set_layer(img)
    w.random_check.setChecked(False)
    out = _run(qtbot, w)
    assert out.status == "error" and type(out.error).__name__ == "WeightsUnavailableError"
    msg = records()[-1].message
    assert "hf download" in msg and "Weights file" in msg and "Random weights" in msg
    first = msg.splitlines()[0]  # what the status line and the toast show: the remedy
    assert "'Weights file'" in first and "'Random weights (testing only)'" in first
    assert w.status.text() == f"error: {first}"

    # A weights file that does not exist: refused before starting.
    w.weights_edit.setText(str(tmp_path / "nope.safetensors"))
    assert not w.run()
    assert "does not exist" in records()[-1].message
    assert _own(viewer) == []


def test_nd_stack_current_and_all_slices(make_napari_viewer, qtbot):
    from napari_upsample_anything.widgets import get_results

    viewer = make_napari_viewer()
    rng = np.random.default_rng(1)
    stack = rng.random((3, 42, 56)).astype(np.float32)
    src = viewer.add_image(stack, name="stack", scale=(4.0, 1.0, 1.0), translate=(2.0, 0.0, 0.0))
    viewer.dims.set_point(0, 2.0 + 4.0 * 1)  # slice z = 1
    w = _main(viewer)
    assert w.slices_combo.isEnabled()
    assert _run(qtbot, w).status == "done"
    hr = viewer.layers["stack HR PCA"]
    assert hr.data.shape == (1, 42, 56, 3)
    assert np.allclose(hr.translate, (2.0 + 4.0, 0.0, 0.0)) and np.allclose(hr.scale, (4.0, 1.0, 1.0))
    lr = viewer.layers["stack LR PCA"]
    assert lr.data.shape == (1, 3, 4, 3) and np.isclose(lr.scale[0], 4.0) and np.isclose(lr.translate[0], 6.0)
    (res,) = get_results(viewer)
    assert [p.index for p in res.planes] == [(1,)]
    assert np.array_equal(res.planes[0].guide, stack[1])

    w.slices_combo.setCurrentIndex(1)  # all slices
    assert _run(qtbot, w).status == "done"
    hr = viewer.layers["stack HR PCA"]
    assert hr.data.shape == (3, 42, 56, 3) and np.allclose(hr.translate, src.translate)
    assert viewer.layers["stack memory"].data.shape == (3, 3, 4)
    (res,) = get_results(viewer)
    assert [p.index for p in res.planes] == [(0,), (1,), (2,)]

    # Kernels drawn on request: each slice's kernels on its slice.
    ins = _inspector(viewer)
    ins.stride_spin.setValue(1)
    kernels = ins.draw_kernels()
    assert kernels.name == "stack kernels"
    assert kernels.data.shape[1:] == (2, 3) and len(kernels.data) <= 3 * 12 * 24
    assert set(np.unique(kernels.data[:, 0, 0])) == {0.0, 1.0, 2.0}
    assert np.all(kernels.data[:, 1, 0] == 0)

    # A pixel picked on slice 2 uses slice 2's kernels, and its layers sit on slice 2 only.
    weights = ins.inspect_pixel(src.data_to_world((2, 20, 30)))
    heat = viewer.layers["stack pixel weights"]
    assert heat.data.shape == (1, 3, 4) and np.isclose(heat.data.sum(), 1.0, atol=1e-5)
    assert np.isclose(heat.translate[0], 2.0 + 4.0 * 2) and np.allclose(heat.data[0], weights)
    assert ins.last_pixel == ((2,), 20, 30)


def test_multichannel_channel_axis(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    rng = np.random.default_rng(2)
    src = viewer.add_image((rng.random((2, 42, 42)) * 4000).astype(np.uint16), name="fluo", scale=(1.0, 0.5, 0.5))
    w = _main(viewer)
    w.channel_combo.setCurrentIndex(1)  # axis 0 = channels
    assert "2 channels" in w.layer_info.text() and not w.slices_combo.isEnabled()
    assert _run(qtbot, w).status == "done"
    hr = viewer.layers["fluo HR PCA"]
    assert hr.data.shape == (1, 42, 42, 3)
    # The size-1 channel axis is stretched over both channels, so napari shows it on each.
    assert np.isclose(hr.scale[0], 2.0) and np.isclose(hr.translate[0], 0.5)
    from napari_upsample_anything.widgets import get_results

    assert get_results(viewer)[0].planes[0].guide.shape == (42, 42, 2)
    assert src.data.dtype == np.uint16


# ---------------------------------------------------------------------------------- inspector
def _inspector(viewer):
    from napari_upsample_anything.widgets._inspector import KernelInspectorWidget

    w = KernelInspectorWidget(viewer)
    viewer.window.add_dock_widget(w, name="Kernel inspector")
    return w


def test_kernel_inspector_draws_and_picks(fitted):
    viewer, src, main = fitted
    w = _inspector(viewer)
    assert w.result_picker.result() is not None

    layer = w.draw_kernels()
    assert type(layer).__name__ == "Vectors" and layer.name == "img kernels" and layer.visible
    assert 0 < len(layer.data) <= 42 * 24 and layer.metadata["upsample_anything"]["count"] == 42
    assert set(layer.features.columns) >= {"sigma_r", "anisotropy", "cell_i", "cell_j"}
    assert np.allclose(layer.scale, src.scale)

    w.color_combo.setCurrentText("anisotropy")
    w.style_combo.setCurrentIndex(1)  # shapes (subsample)
    layer = w.draw_kernels()
    assert type(layer).__name__ == "Shapes" and 0 < len(layer.data) <= 2000
    w.style_combo.setCurrentIndex(2)  # raster
    layer = w.draw_kernels()
    assert type(layer).__name__ == "Image" and layer.data.shape == (84, 98) and layer.data.max() > 0
    assert len([l for l in viewer.layers if l.name.startswith("img kernels")]) == 1

    pm = w.show_parameter_map("sigma_r")
    assert pm.data.shape == (6, 7) and np.allclose(pm.scale, viewer.layers["img LR PCA"].scale)

    # Click on a pixel (through the viewer's mouse callback, as napari delivers a click).
    w.pick_check.setChecked(True)
    assert w._on_click in viewer.mouse_drag_callbacks
    y, x = 40, 50
    world = src.data_to_world((y, x))

    class Click:
        type = "mouse_press"
        position = tuple(world)

    for cb in list(viewer.mouse_drag_callbacks):
        cb(viewer, Click())
    heat = viewer.layers["img pixel weights"]
    assert heat.data.shape == (6, 7)
    assert heat.data.sum() == pytest.approx(1.0, abs=1e-5) and heat.data.min() >= 0
    assert np.allclose(heat.scale, viewer.layers["img LR PCA"].scale)
    contributing = viewer.layers["img pixel kernels"]  # outlines as segments: no triangulation
    assert type(contributing).__name__ == "Vectors" and len(contributing.data) > 0
    assert 1 <= contributing.metadata["upsample_anything"]["kernels"] <= 42
    assert set(contributing.features.columns) >= {"weight", "cell_i", "cell_j"}
    assert w.last_pixel == ((), y, x)
    # The weights reproduce the HR features at that pixel (they are the render's weights).
    from napari_upsample_anything.widgets import get_results

    plane = get_results(viewer)[0].planes[0]
    pred = (plane.features * w.last_weights[None]).sum(axis=(1, 2))
    assert np.allclose(pred, plane.hr_features[:, y, x], atol=1e-4)
    assert "kernels carry 99%" in w.pixel_label.text()

    w.pick_check.setChecked(False)
    assert w._on_click not in viewer.mouse_drag_callbacks
    # Clicking outside the image does nothing.
    assert w.inspect_pixel(src.data_to_world((-50, -50))) is None


def test_inspector_without_results_notifies(make_napari_viewer, records):
    viewer = make_napari_viewer()
    w = _inspector(viewer)
    assert w.draw_kernels() is None
    assert records()[-1].severity == "error" and "No fitted image" in records()[-1].message


# ---------------------------------------------------------------------------------- memory
def test_memory_monitor_reports_numbers(make_napari_viewer, qtbot):
    from napari_upsample_anything.widgets._memory import (
        IDLE_INTERVAL_MS,
        RUN_INTERVAL_MS,
        MemoryMonitorWidget,
        text_overlay,
    )

    viewer = make_napari_viewer()
    viewer.add_image(_rgb(), name="img")
    mon = MemoryMonitorWidget(viewer)
    viewer.window.add_dock_widget(mon, name="Memory monitor")
    s = mon.poll()
    assert s["current"] > 0 and s["rss"] > 0 and mon.device == "cpu"
    assert "MiB" in mon.current_label.text() or "GiB" in mon.current_label.text()
    assert mon.timer.interval() == IDLE_INTERVAL_MS
    overlay = text_overlay(viewer)
    before = (overlay.visible, overlay.text)
    mon.overlay_check.setChecked(True)
    assert overlay.visible and "RSS" in overlay.text

    main = _main(viewer, steps=3)
    intervals = []
    main.runner.progressed.connect(lambda e: intervals.append(mon.timer.interval()))
    assert _run(qtbot, main).status == "done"
    assert intervals and all(i == RUN_INTERVAL_MS for i in intervals)  # fast polling during the run
    qtbot.waitUntil(lambda: mon.timer.interval() == IDLE_INTERVAL_MS, timeout=5000)
    assert mon.peak > 0 and len(mon.plot.samples) >= 2
    assert "peak" in overlay.text

    # The per-tile memory map: on the CPU, the bytes the engine allocated per LR cell.
    assert mon.result_picker.result() is not None and "tile records" in mon.summary_label.text()
    mon.stage_combo.setCurrentText("fit")
    mon.show_memory_map()
    mem = viewer.layers["img memory"]
    assert mem.visible and mem.data.shape == (6, 7) and (mem.data > 0).all()
    assert mem.metadata["upsample_anything"]["value"] == "allocated"
    tiles = viewer.layers["img memory tiles"]  # the engine's tiles, outlined on the LR grid
    assert type(tiles).__name__ == "Shapes" and len(tiles.data) >= 1
    assert np.allclose(tiles.scale, mem.scale) and np.allclose(tiles.translate, mem.translate)
    corners = np.concatenate(tiles.data)
    assert np.allclose(corners.min(0), [-0.5, -0.5]) and np.allclose(corners.max(0), [5.5, 6.5])
    assert (tiles.features["MiB"] > 0).all()
    # a fixed colour scale: 0 .. the run's budget (236 vs 254 MiB must not look like yellow vs purple)
    budget = max(p.memlog.budget_bytes for p in mon.result_picker.result().planes)
    assert mem.contrast_limits[0] == 0 and mem.contrast_limits[1] == pytest.approx(budget / 2**20)
    labelled = [t for t in tiles.features["label"] if t]
    assert 1 <= len(labelled) <= len(tiles.data)
    # "measured" on the CPU: no per-tile measurement there (the RSS after a tile is not the tile's):
    # what the engine allocated is shown, and the summary says so
    mon.value_combo.setCurrentText("measured")
    mon.show_memory_map()
    assert viewer.layers["img memory"].metadata["upsample_anything"]["value"] == "allocated"
    assert "no per-tile measurement" in mon.summary_label.text() and "working set" in mon.summary_label.text()
    allocated = viewer.layers["img memory"].data.copy()
    # the planner's upper bound, on request: never below what the fused native fit allocates
    mon.value_combo.setCurrentText("planned")
    mon.show_memory_map()
    assert viewer.layers["img memory"].metadata["upsample_anything"]["value"] == "planned"
    assert (viewer.layers["img memory"].data >= allocated).all()

    mon.overlay_check.setChecked(False)
    assert (overlay.visible, overlay.text) == before
    mon.close()
    assert not mon.timer.isActive()


# ---------------------------------------------------------------------------------- upsample a layer
def _upsampler(viewer):
    from napari_upsample_anything.widgets._upsample_layer import UpsampleLayerWidget

    w = UpsampleLayerWidget(viewer)
    viewer.window.add_dock_widget(w, name="Upsample a layer")
    w.device_combo.setCurrentText("cpu")
    return w


def test_upsample_probability_map_and_labels(fitted, qtbot):
    viewer, src, main = fitted
    rng = np.random.default_rng(3)
    prob = viewer.add_image(rng.random((6, 7)).astype(np.float32), name="prob")
    const = viewer.add_image(np.full((2, 6, 7), 0.25, np.float32), name="const")
    lab = np.zeros((6, 7), np.int32)
    lab[:, 3:] = 2
    lab[4:, :2] = 7
    labels = viewer.add_labels(lab, name="lab")
    snaps = {l.name: _snapshot(l) for l in (prob, const, labels, src)}
    w = _upsampler(viewer)

    w.layer_picker.set_layer(prob)
    assert "1 channel(s), 6 x 7 -> 84 x 98" in w.info_label.text()
    assert _run(qtbot, w).status == "done", w.last_message
    out = viewer.layers["prob upsampled"]
    assert out.data.shape == (84, 98) and out.data.dtype == np.float32
    assert np.allclose(out.scale, src.scale) and np.allclose(out.translate, src.translate)
    assert prob.data.min() - 1e-5 <= out.data.min() and out.data.max() <= prob.data.max() + 1e-5  # convex weights

    w.layer_picker.set_layer(const)
    assert _run(qtbot, w).status == "done"
    out = viewer.layers["const upsampled"]
    assert out.data.shape == (2, 84, 98) and np.allclose(out.data, 0.25, atol=1e-6)

    w.layer_picker.set_layer(labels)
    w.prob_check.setChecked(True)
    assert _run(qtbot, w).status == "done"
    up = viewer.layers["lab upsampled"]
    assert type(up).__name__ == "Labels" and up.data.shape == (84, 98) and up.data.dtype == np.int32
    assert set(np.unique(up.data)) <= {0, 2, 7}
    probs = viewer.layers["lab upsampled probabilities"]
    assert probs.data.shape == (3, 84, 98) and np.allclose(probs.data.sum(0), 1.0, atol=1e-5)
    assert np.allclose(up.scale, src.scale)

    for layer in (prob, const, labels, src):
        _unchanged(layer, snaps[layer.name])


def test_upsample_other_grid_refits(fitted, qtbot):
    from napari_upsample_anything.widgets import get_results

    viewer, src, main = fitted
    depth = viewer.add_image(np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4), name="depth")
    w = _upsampler(viewer)
    w.layer_picker.set_layer(depth)
    assert "fitted for this grid" in w.info_label.text()
    assert _run(qtbot, w).status == "done"
    assert viewer.layers["depth upsampled"].data.shape == (84, 98)
    assert (3, 4) in get_results(viewer)[0].planes[0].extra_fields


def test_upsample_layer_errors(fitted, records):
    viewer, src, main = fitted
    w = _upsampler(viewer)
    big = viewer.add_image(np.zeros((100, 120), np.float32), name="big")
    w.layer_picker.set_layer(big)
    assert not w.run()
    assert "larger than the fitted image" in records()[-1].message
    lab3 = viewer.add_labels(np.zeros((2, 6, 7), np.int32), name="lab3")
    w.layer_picker.set_layer(lab3)
    assert not w.run() and "2D labels map" in records()[-1].message


def test_upsample_stack_all_slices(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    rng = np.random.default_rng(4)
    viewer.add_image(rng.random((2, 42, 42)).astype(np.float32), name="stack")
    main = _main(viewer)
    main.slices_combo.setCurrentIndex(1)
    assert _run(qtbot, main).status == "done"
    lr = viewer.add_labels(np.stack([np.eye(3, dtype=np.int32), 2 * np.eye(3, dtype=np.int32)]), name="lr")
    w = _upsampler(viewer)
    w.layer_picker.set_layer(lr)
    assert _run(qtbot, w).status == "done"
    up = viewer.layers["lr upsampled"]
    assert up.data.shape == (2, 42, 42)
    assert set(np.unique(up.data[0])) <= {0, 1} and set(np.unique(up.data[1])) <= {0, 2}


# ---------------------------------------------------------------------------------- cleanup
def test_closing_widgets_stops_workers(make_napari_viewer, qtbot):
    from napari_upsample_anything.core import features

    viewer = make_napari_viewer()
    viewer.add_image(_rgb(), name="img")
    w = _main(viewer, steps=5000)
    events = []
    w.runner.progressed.connect(events.append)
    assert w.run()
    qtbot.waitUntil(lambda: any(e.stage == "fit" for e in events), timeout=RUN_TIMEOUT_MS)
    handle = w.runner.handle
    assert handle.thread.is_alive()
    w.close()  # cancels, waits for the computation, drops the cached backbone
    assert handle.cancelled and not handle.thread.is_alive()
    assert len(features._CACHE) == 0
    qtbot.waitUntil(lambda: not w.runner.running, timeout=10_000)
    assert _own(viewer) == []

    # The other widgets clean up too.
    from napari_upsample_anything.widgets._inspector import KernelInspectorWidget
    from napari_upsample_anything.widgets._memory import MemoryMonitorWidget

    mon = MemoryMonitorWidget(viewer)
    ins = KernelInspectorWidget(viewer)
    ins.pick_check.setChecked(True)
    mon.close()
    ins.close()
    assert not mon.timer.isActive() and ins._on_click not in viewer.mouse_drag_callbacks


def test_dock_close_button_cleans_up(make_napari_viewer, qtbot):
    """napari's dock "x" only detaches the widget (no closeEvent); the widgets still clean up."""
    from napari_upsample_anything.widgets._inspector import KernelInspectorWidget
    from napari_upsample_anything.widgets._memory import MemoryMonitorWidget

    viewer = make_napari_viewer()
    viewer.add_image(_rgb(), name="img")
    w = _main(viewer, steps=5000)  # docked by _main
    events = []
    w.runner.progressed.connect(events.append)
    assert w.run()
    qtbot.waitUntil(lambda: any(e.stage == "fit" for e in events), timeout=RUN_TIMEOUT_MS)
    handle = w.runner.handle
    viewer.window.remove_dock_widget(w)  # what the dock's "x" button does
    assert handle.cancelled and not handle.thread.is_alive()

    mon, ins = MemoryMonitorWidget(viewer), KernelInspectorWidget(viewer)
    viewer.window.add_dock_widget(mon, name="Memory monitor")
    viewer.window.add_dock_widget(ins, name="Kernel inspector")
    ins.pick_check.setChecked(True)
    assert mon.timer.isActive() and ins._on_click in viewer.mouse_drag_callbacks
    viewer.window.remove_dock_widget(mon)
    viewer.window.remove_dock_widget(ins)
    assert not mon.timer.isActive() and ins._on_click not in viewer.mouse_drag_callbacks
    for widget in (w, mon, ins):
        widget.deleteLater()
