"""The Feature explorer dock widget in a real (hidden) napari window under Xvfb.

A randomly initialised ViT-S/14 (the main widget's ``Random weights``) on a small picture,
2 optimisation steps: no network, no pretrained weights.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import two_region_picture

pytestmark = [
    pytest.mark.usefixtures("offline"),
    pytest.mark.gui,
    pytest.mark.filterwarnings("ignore:.*random weights:UserWarning"),
]

RUN_TIMEOUT_MS = 180_000


def _fit(viewer, qtbot, layer_data, at=None, **kw):
    from napari_upsample_anything.widgets._main import UpsampleAnythingWidget

    src = viewer.add_image(layer_data, name="img", **kw)
    if at is not None:  # the slice the main widget fits (mode "current")
        viewer.dims.set_point(0, at)
    w = UpsampleAnythingWidget(viewer)
    viewer.window.add_dock_widget(w, name="Upsample Anything")
    w.random_check.setChecked(True)
    w.steps_spin.setValue(2)
    w.device_combo.setCurrentText("cpu")
    with qtbot.waitSignal(w.runner.finished, timeout=RUN_TIMEOUT_MS) as blocker:
        assert w.run(), w.last_message
    assert blocker.args[0].status == "done", w.last_message
    return src, w


def _explorer(viewer):
    from napari_upsample_anything.widgets._explorer import FeatureExplorerWidget

    w = FeatureExplorerWidget(viewer)
    viewer.window.add_dock_widget(w, name="Feature explorer")
    return w


def _wait(qtbot, widget):
    """Wait until the widget's run (and anything it queued) is finished."""
    qtbot.waitUntil(lambda: not widget.runner.running and not widget._queued, timeout=RUN_TIMEOUT_MS)


def _role(viewer, role):
    from napari_upsample_anything.widgets._registry import tag_of

    found = [l for l in viewer.layers if tag_of(l).get("role") == role]
    assert len(found) <= 1
    return found[0] if found else None


def test_explorer_opens_through_the_manifest(make_napari_viewer):
    from napari_upsample_anything.widgets._explorer import FeatureExplorerWidget

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-upsample-anything", "Feature explorer")
    assert isinstance(widget, FeatureExplorerWidget)
    assert not widget.run_similarity() and "no fitted image" in widget.last_message.lower()


def test_similarity_points_layers_and_threshold(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    src, main = _fit(viewer, qtbot, two_region_picture(), scale=(0.5, 0.5), translate=(4.0, -2.0))
    w = _explorer(viewer)
    points = w.add_points_layer()
    assert points is not None and _role(viewer, "explore_points") is points
    # a click at HR pixel (35, 63) (inside the red disc): world = translate + scale * pixel
    with qtbot.waitSignal(w.runner.finished, timeout=RUN_TIMEOUT_MS):
        points.add([4.0 + 0.5 * 35, -2.0 + 0.5 * 63])
    _wait(qtbot, w)
    sim_layer = _role(viewer, "explore_similarity")
    bil_layer = _role(viewer, "explore_similarity_bilinear")
    assert sim_layer is not None and bil_layer is not None
    sim = np.asarray(sim_layer.data)
    assert sim.shape == (70, 84) and tuple(sim_layer.scale) == (0.5, 0.5) and tuple(sim_layer.translate) == (4.0, -2.0)
    assert sim[35, 63] == pytest.approx(1.0, abs=1e-4)
    assert np.asarray(bil_layer.data)[35, 63] == pytest.approx(1.0, abs=1e-4)
    # the HR features the main widget kept give the same numbers as the streamed render
    from napari_upsample_anything.explore import similarity_map

    plane = w.similarity["plane"]
    streamed = similarity_map(plane.features, [(35, 63)], plane.guide, plane.field, device="cpu")
    assert np.abs(streamed - sim).max() < 1e-4
    # threshold slider: the mask follows, without recomputing
    mask = _role(viewer, "explore_similar")
    w.threshold_slider.setValue(90)
    assert np.array_equal(np.asarray(mask.data), (sim >= 0.9).astype(np.uint8))
    w.threshold_slider.setValue(-100)
    assert np.asarray(_role(viewer, "explore_similar").data).all()
    # the source image was not touched
    assert np.array_equal(np.asarray(src.data), two_region_picture())


def test_segmentation_never_changes_the_users_labels(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    _fit(viewer, qtbot, two_region_picture())
    user = np.zeros((70, 84), np.int32)
    user[10:14, 5:30] = 1  # dark side
    user[50:54, 50:80] = 2  # bright side
    user[33:37, 56:76] = 2  # and the red disc on it
    user_layer = viewer.add_labels(user.copy(), name="my scribbles")
    before = np.array(user_layer.data, copy=True)
    meta_before = dict(user_layer.metadata)
    w = _explorer(viewer)
    w.scribble_picker.set_layer(user_layer)
    w.prob_check.setChecked(True)  # the per-class probability layers are added on request
    for route in ("hr", "lr"):
        w.route_combo.setCurrentIndex([w.route_combo.itemData(i) for i in range(w.route_combo.count())].index(route))
        with qtbot.waitSignal(w.runner.finished, timeout=RUN_TIMEOUT_MS) as blocker:
            assert w.request("segment"), w.last_message
        assert blocker.args[0].status == "done", w.last_message
        seg = _role(viewer, "explore_segmentation")
        assert seg is not None and seg.data.shape == (70, 84)
        labels = np.asarray(seg.data)
        assert set(np.unique(labels)) <= {1, 2}
        assert np.mean(labels[:, :30] == 1) > 0.9 and np.mean(labels[:, 56:] == 2) > 0.9
        p1, p2 = _role(viewer, "explore_probability_1"), _role(viewer, "explore_probability_2")
        assert p1 is not None and p2 is not None
        assert np.allclose(np.asarray(p1.data) + np.asarray(p2.data), 1.0, atol=1e-4)
        assert np.array_equal(np.asarray(user_layer.data), before) and user_layer.data.dtype == before.dtype
        assert dict(user_layer.metadata) == meta_before
        assert w.scribble_picker.layer() is user_layer  # not the segmentation napari made active
    path = w.save_classifier(tmp_path / "clf.npz")
    from napari_upsample_anything.core.feature_queries import ScribbleClassifier

    assert list(ScribbleClassifier.load(path).classes) == [1, 2]


def test_own_scribbles_live_update_and_close_stops_worker(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    _fit(viewer, qtbot, two_region_picture())
    w = _explorer(viewer)
    layer = w.add_scribble_layer()
    assert _role(viewer, "explore_scribbles") is layer and w.scribble_picker.layer() is layer
    w.live_check.setChecked(True)
    data = np.array(layer.data)
    data[10:14, 5:30] = 1
    data[50:54, 50:80] = 2
    with qtbot.waitSignal(w.runner.finished, timeout=RUN_TIMEOUT_MS):
        layer.data = data  # set_data event -> live re-segmentation
    _wait(qtbot, w)
    assert _role(viewer, "explore_segmentation") is not None
    assert w.scribble_picker.layer() is layer
    assert w.scribble_picker.count() == 1  # the plugin's outputs are not offered as scribbles
    # a run in flight is cancelled and joined when the widget closes
    assert w.request("segment")
    assert w.runner.running
    handle = w.runner.handle
    w.close()
    assert handle.cancelled and handle.join(0)


def test_stack_works_plane_by_plane(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    stack = np.stack([two_region_picture(seed=0), two_region_picture(seed=1)[:, ::-1]])  # (2, H, W, 3): the second one mirrored
    _fit(viewer, qtbot, stack, at=1)
    w = _explorer(viewer)
    points = w.add_points_layer()
    with qtbot.waitSignal(w.runner.finished, timeout=RUN_TIMEOUT_MS):
        points.add([1, 35, 20])  # on slice 1 the disc is on the left
    _wait(qtbot, w)
    sim_layer = _role(viewer, "explore_similarity")
    assert sim_layer.data.shape == (1, 70, 84) and sim_layer.translate[0] == 1.0
    assert np.asarray(sim_layer.data)[0, 35, 20] == pytest.approx(1.0, abs=1e-4)
    assert w.similarity["plane"].index == (1,)


def test_blocks_field_parsing_names_the_field_and_the_form():
    from napari_upsample_anything.widgets._explore_compute import ExplorerInputError, FeatureSource, parse_blocks
    from napari_upsample_anything.widgets._pipeline import RunConfig

    assert parse_blocks("") is None and parse_blocks("  ") is None  # the fitted image's own features
    assert parse_blocks("-1") == (-1,) and parse_blocks(" -1, -4 ") == (-1, -4) and parse_blocks("3,-1") == (3, -1)
    for bad, why in (("-1,x", "'x' is not a whole number"), ("-1,,-4", "'' is not a whole number"), ("-1,-1", "listed twice")):
        with pytest.raises(ExplorerInputError) as info:
            parse_blocks(bad)
        assert str(info.value).startswith(f"Blocks {bad!r}") and why in str(info.value) and "-1,-4" in str(info.value)
    # the fitted block itself is the fit's features (and its kept HR features), not a second extraction
    assert FeatureSource(RunConfig(layer=-1), (-1,)).blocks is None
    assert FeatureSource(RunConfig(layer=-4), (-1,)).blocks == (-1,)
    assert FeatureSource(RunConfig(layer=-1), (-1, -4)).layers == [-1, -4]
    assert FeatureSource(RunConfig(layer=-2), None).layers == [-2]


def test_scribble_examples_of_a_stack_every_fitted_slice_with_strokes():
    """Which (plane, scribbles) pairs train: every fitted slice with strokes, the current one first."""
    from types import SimpleNamespace

    from napari_upsample_anything.widgets._explore_compute import scribble_examples
    from napari_upsample_anything.widgets._frame import Frame

    class Labels(SimpleNamespace):  # what layer_kind reads: the class name
        pass

    H, W = 6, 8
    frame = Frame("img", (4, H, W), False, None, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), "all", ((0,), (1,), (3,)))
    planes = [SimpleNamespace(index=(z,), hr_shape=(H, W)) for z in (0, 1, 3)]  # slice 2 was not fitted
    result = SimpleNamespace(frame=frame, planes=planes)
    data = np.zeros((4, H, W), np.int32)
    data[1, 0, :2] = 1
    data[2, 1, :2] = 2  # not fitted: reported, not used
    data[3, 2, :2] = 2
    layer = Labels(data=data, name="s", multiscale=False)
    examples, unfitted = scribble_examples(layer, result, planes[2])
    assert [p.index for p, _ in examples] == [(3,), (1,)] and unfitted == [(2,)]
    assert np.array_equal(examples[0][1], data[3]) and np.array_equal(examples[1][1], data[1])
    # a 2D scribble layer on a stack: the current plane's strokes only
    flat = Labels(data=data[1], name="flat", multiscale=False)
    examples, unfitted = scribble_examples(flat, result, planes[0])
    assert [p.index for p, _ in examples] == [(0,)] and unfitted == []
