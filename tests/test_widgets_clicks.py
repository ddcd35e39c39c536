"""The widgets driven as a user drives them: buttons found by their text and clicked, canvas clicks (issue #19).

A shown napari window under Xvfb; a random-weight ViT-S/14 on a small RGB picture, 2 steps.
Buttons and check boxes are pressed with ``qtbot.mouseClick``; canvas clicks are mouse
events sent to napari's vispy canvas at the screen position of a pixel, so they go through
napari's own mouse handling (layers' and viewer's callbacks) as a real click does.
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

RUN_TIMEOUT_MS = 240_000


# ---------------------------------------------------------------------------------- helpers
def button(widget, text: str):
    """The one visible, enabled button / check box of ``widget`` whose text is ``text``."""
    from qtpy.QtWidgets import QAbstractButton

    found = [b for b in widget.findChildren(QAbstractButton) if b.text().replace("&", "") == text and b.isVisible()]
    assert len(found) == 1, f"{len(found)} visible buttons {text!r} in {type(widget).__name__}"
    assert found[0].isEnabled(), f"button {text!r} is disabled"
    return found[0]


def click(qtbot, widget, text: str) -> None:
    """Scroll the button into view and click it with the mouse."""
    from qtpy.QtCore import QPoint, Qt
    from qtpy.QtWidgets import QCheckBox, QScrollArea

    b = button(widget, text)
    for area in widget.findChildren(QScrollArea):
        if area.widget() is not None and area.widget().isAncestorOf(b):
            area.ensureWidgetVisible(b)
    # a check box reacts to its box and text only, not to the empty rest of its row: aim at the box
    pos = QPoint(8, b.height() // 2) if isinstance(b, QCheckBox) else b.rect().center()
    qtbot.mouseClick(b, Qt.MouseButton.LeftButton, pos=pos)


def canvas_point(viewer, layer, yx):
    """Screen position (canvas widget coordinates) of data pixel ``yx`` (all layer axes) of ``layer`` in a 2D view."""
    from qtpy.QtCore import QPoint

    canvas = viewer.window._qt_viewer.canvas.native
    world = np.asarray(layer.data_to_world(yx), float)[-2:]
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera  # napari >= 0.9: viewer.scene
    centre = np.asarray(camera.center, float)[-2:]
    zoom = float(camera.zoom)
    y = canvas.height() / 2 + (world[0] - centre[0]) * zoom
    x = canvas.width() / 2 + (world[1] - centre[1]) * zoom
    return QPoint(int(round(x)), int(round(y)))


def canvas_click(qtbot, viewer, layer, yx) -> None:
    from qtpy.QtCore import Qt

    canvas = viewer.window._qt_viewer.canvas.native
    pos = canvas_point(viewer, layer, yx)
    qtbot.mouseMove(canvas, pos)
    qtbot.mouseClick(canvas, Qt.MouseButton.LeftButton, pos=pos)


def settle(qtbot, n=3):
    from qtpy.QtWidgets import QApplication

    for _ in range(n):
        QApplication.processEvents()
        qtbot.wait(10)


def fit_by_clicking_run(viewer, qtbot, name="img"):
    """Dock the main widget, tick Random weights and click Run; returns the widget once the run is done."""
    from napari_upsample_anything.widgets._main import UpsampleAnythingWidget

    docked = [d for d in viewer.window.dock_widgets.values() if isinstance(d, UpsampleAnythingWidget)]
    if docked:
        w = docked[0]
    else:
        _dock, w = viewer.window.add_plugin_dock_widget("napari-upsample-anything", "Upsample Anything")
    settle(qtbot)
    click(qtbot, w, "Random weights (testing only)")
    assert w.random_check.isChecked()
    w.steps_spin.setValue(2)
    w.device_combo.setCurrentText("cpu")
    w.threads_spin.setValue(1)
    with qtbot.waitSignal(w.runner.finished, timeout=RUN_TIMEOUT_MS) as blocker:
        click(qtbot, w, "Run")
    assert blocker.args[0].status == "done", w.last_message
    return w


def own_layers(viewer, role):
    from napari_upsample_anything.widgets._registry import tag_of

    return [l for l in viewer.layers if tag_of(l).get("role") == role]


# ---------------------------------------------------------------------------------- tests
def test_run_by_click_then_pixel_picks_by_canvas_clicks_on_a_grid_with_borders(make_napari_viewer, qtbot, records):
    viewer = make_napari_viewer(show=True)
    src = viewer.add_image(two_region_picture(), name="img", scale=(0.5, 0.25), translate=(10.0, -3.0))
    main = fit_by_clicking_run(viewer, qtbot)
    for role in ("hr_pca", "lr_pca"):  # the run added its layers
        assert len(own_layers(viewer, role)) == 1, role
    assert own_layers(viewer, "hr_pca")[0].data.shape[:2] == (70, 84)
    assert "done in" in main.status.text()

    _dock, insp = viewer.window.add_plugin_dock_widget("napari-upsample-anything", "Kernel inspector")
    settle(qtbot)
    click(qtbot, insp, "Pick a pixel: click on the image")
    assert insp.pick_check.isChecked()
    viewer.layers.selection.active = src
    viewer.reset_view()
    settle(qtbot)

    H, W = 70, 84
    rows, cols = (0, 1, 35, H - 2, H - 1), (0, 1, 41, W - 2, W - 1)  # border rows / columns and corners
    errors_before = [r for r in records() if r.severity == "error"]
    for y in rows:
        for x in cols:
            canvas_click(qtbot, viewer, src, (y, x))
            settle(qtbot, 1)
            where = f"pick at (y {y}, x {x})"
            assert insp.last_pixel == ((), y, x), f"{where}: picked {insp.last_pixel}; status {insp.status.text()!r}"
            weights = own_layers(viewer, "pixel_weights")
            kernels = own_layers(viewer, "contributing")
            dot = own_layers(viewer, "picked_pixel")
            assert len(weights) == len(kernels) == len(dot) == 1, where
            for layer in (weights[0], kernels[0], dot[0]):  # every pick layer is this pixel's
                assert layer.metadata["upsample_anything"]["pixel"] == [y, x], f"{where}: {layer.name} is stale"
            assert weights[0].data.sum() == pytest.approx(1.0, abs=1e-4), where
            assert len(kernels[0].data) > 0, f"{where}: no contributing kernel drawn"
            assert np.allclose(dot[0].data[0][-2:], (y, x)), where
            assert "kernels carry 99%" in insp.pixel_label.text(), where
    assert [r for r in records() if r.severity == "error"] == errors_before, "a pick reported an error"


def test_a_failed_pick_says_why_and_leaves_no_stale_layer(make_napari_viewer, qtbot, monkeypatch):
    viewer = make_napari_viewer(show=True)
    src = viewer.add_image(two_region_picture(42, 56), name="img")
    fit_by_clicking_run(viewer, qtbot)
    _dock, insp = viewer.window.add_plugin_dock_widget("napari-upsample-anything", "Kernel inspector")
    settle(qtbot)
    click(qtbot, insp, "Pick a pixel: click on the image")
    viewer.layers.selection.active = src
    viewer.reset_view()
    settle(qtbot)
    canvas_click(qtbot, viewer, src, (10, 10))
    assert insp.last_pixel == ((), 10, 10) and len(own_layers(viewer, "contributing")) == 1

    from napari_upsample_anything.widgets import _inspector

    def broken(*args, **kwargs):
        raise ValueError("outline data refused")

    monkeypatch.setattr(_inspector, "cell_segments", broken)  # fails after the weights were computed
    canvas_click(qtbot, viewer, src, (20, 30))
    settle(qtbot, 1)
    assert insp.status.text().startswith("error: Pick another pixel") and "outline data refused" in insp.last_message
    for role in ("pixel_weights", "contributing", "picked_pixel"):
        assert own_layers(viewer, role) == [], f"stale {role} layer left after a failed pick"
    assert insp.last_pixel is None


def test_explorer_buttons_by_clicks_similarity_segmentation_save_load_apply_to_all_slices(
    make_napari_viewer, qtbot, tmp_path, monkeypatch
):
    from qtpy.QtWidgets import QFileDialog

    viewer = make_napari_viewer(show=True)
    H, W = 42, 56
    stack = np.stack([two_region_picture(H, W, seed=0), two_region_picture(H, W, seed=1)[:, ::-1]])  # slice 1 mirrored
    src = viewer.add_image(stack, name="img")
    dock, main = viewer.window.add_plugin_dock_widget("napari-upsample-anything", "Upsample Anything")
    main.slices_combo.setCurrentIndex(main.slices_combo.findData("all"))
    main.hr_combo.setCurrentIndex(main.hr_combo.findData("memory"))
    fit_by_clicking_run(viewer, qtbot)  # the dock is already there: the helper finds the same one
    _dock, w = viewer.window.add_plugin_dock_widget("napari-upsample-anything", "Feature explorer")
    viewer.dims.set_point(0, 0)
    viewer.reset_view()
    settle(qtbot)

    # similarity: "Add points", then a click on the red disc (right half of slice 0)
    click(qtbot, w, "Add points")
    points = own_layers(viewer, "explore_points")[0]
    assert points.mode == "add" and viewer.layers.selection.active is points
    with qtbot.waitSignal(w.runner.finished, timeout=RUN_TIMEOUT_MS):
        canvas_click(qtbot, viewer, src, (0, H // 2, int(0.75 * W)))
    qtbot.waitUntil(lambda: not w.runner.running and not w._queued, timeout=RUN_TIMEOUT_MS)
    assert len(points.data) == 1
    sim = own_layers(viewer, "explore_similarity")
    assert len(sim) == 1 and np.asarray(sim[0].data)[0, H // 2, int(0.75 * W)] == pytest.approx(1.0, abs=1e-3)
    assert len(own_layers(viewer, "explore_similar")) == 1

    # segmentation: "New scribbles", paint two classes with clicks (one brush dab each), "Segment"
    click(qtbot, w, "New scribbles")
    scribbles = own_layers(viewer, "explore_scribbles")[0]
    assert scribbles.mode == "paint" and viewer.layers.selection.active is scribbles
    scribbles.brush_size = 6
    for label, spots in ((1, [(8, 6), (30, 10), (20, 16)]), (2, [(8, 40), (34, 48), (12, 52)])):
        scribbles.selected_label = label
        for y, x in spots:
            canvas_click(qtbot, viewer, src, (0, y, x))
    painted = np.asarray(scribbles.data)
    assert set(np.unique(painted)) == {0, 1, 2}, "the clicks did not paint both classes"
    with qtbot.waitSignal(w.runner.finished, timeout=RUN_TIMEOUT_MS) as blocker:
        click(qtbot, w, "Segment")
    assert blocker.args[0].status == "done", w.last_message
    seg = own_layers(viewer, "explore_segmentation")
    assert len(seg) == 1 and seg[0].data.shape == (1, H, W)
    assert not [l for l in viewer.layers if "probability" in l.name], "per-class maps only on request"
    labels0 = np.asarray(seg[0].data)[0]
    top = slice(0, 10)  # above the red disc: the dark and the bright half only
    assert np.mean(labels0[top, : W // 3] == 1) > 0.8 and np.mean(labels0[top, -W // 3 :] == 2) > 0.8

    # save, load, apply to all slices
    saved = tmp_path / "scribbles.npz"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(saved), "Classifier (*.npz)"))
    click(qtbot, w, "Save classifier…")
    assert saved.is_file() and "Saved" in w.status.text()
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, **k: (str(saved), "Classifier (*.npz)"))
    click(qtbot, w, "Load classifier…")
    assert "loaded from scribbles.npz" in w.classifier_label.text(), w.last_message
    w.apply_combo.setCurrentIndex(w.apply_combo.findData("all"))
    with qtbot.waitSignal(w.runner.finished, timeout=RUN_TIMEOUT_MS) as blocker:
        click(qtbot, w, "Apply classifier")
    assert blocker.args[0].status == "done", w.last_message
    seg = own_layers(viewer, "explore_segmentation")
    assert len(seg) == 1 and seg[0].data.shape == (2, H, W)
    both = np.asarray(seg[0].data)
    assert np.array_equal(both[0], labels0), "the loaded classifier classifies slice 0 as the trained one did"
    # slice 1 is mirrored: its dark half is on the right
    assert np.mean(both[1][top, -W // 3 :] == 1) > 0.8 and np.mean(both[1][top, : W // 3] == 2) > 0.8


def type_into(qtbot, widget, label: str, text: str) -> None:
    """Replace the text of the line edit in the form row labelled ``label`` by typing ``text``."""
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QFormLayout, QLabel, QLineEdit

    edits = []
    for form in widget.findChildren(QFormLayout):
        for row in range(form.rowCount()):
            item = form.itemAt(row, QFormLayout.ItemRole.LabelRole)
            field = form.itemAt(row, QFormLayout.ItemRole.FieldRole)
            if item is not None and isinstance(item.widget(), QLabel) and item.widget().text() == label:
                if field is not None and isinstance(field.widget(), QLineEdit) and field.widget().isVisible():
                    edits.append(field.widget())
    assert len(edits) == 1, f"{len(edits)} visible text fields labelled {label!r}"
    qtbot.mouseClick(edits[0], Qt.MouseButton.LeftButton)
    edits[0].selectAll()
    qtbot.keyClicks(edits[0], text)
    assert edits[0].text() == text


def test_explorer_blocks_field_and_training_on_every_scribbled_slice_by_clicks(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    """#22 in the widget: features of blocks -1 and -4, one classifier from strokes on two slices of a stack."""
    from qtpy.QtWidgets import QFileDialog

    viewer = make_napari_viewer(show=True)
    H, W = 42, 56
    stack = np.stack([two_region_picture(H, W, seed=s) for s in range(3)])  # dark left, bright right on every slice
    src = viewer.add_image(stack, name="img")
    dock, main = viewer.window.add_plugin_dock_widget("napari-upsample-anything", "Upsample Anything")
    main.slices_combo.setCurrentIndex(main.slices_combo.findData("all"))
    fit_by_clicking_run(viewer, qtbot)
    _dock, w = viewer.window.add_plugin_dock_widget("napari-upsample-anything", "Feature explorer")
    viewer.reset_view()
    settle(qtbot)

    # a malformed "Blocks" is refused with the field's name and the expected form, before any run
    type_into(qtbot, w, "Blocks", "-1,x")
    click(qtbot, w, "New scribbles")
    scribbles = own_layers(viewer, "explore_scribbles")[0]
    assert scribbles.data.shape == (3, H, W)
    scribbles.brush_size = 6
    # class 1 only on slice 0 (dark half), class 2 only on slice 2 (bright half): no slice holds both
    for z, label, spots in ((0, 1, [(8, 6), (30, 10)]), (2, 2, [(8, 40), (12, 52)])):
        viewer.dims.set_point(0, z)
        settle(qtbot)
        scribbles.selected_label = label
        for y, x in spots:
            canvas_click(qtbot, viewer, src, (z, y, x))
    painted = np.asarray(scribbles.data)
    assert set(np.unique(painted[0])) == {0, 1} and set(np.unique(painted[2])) == {0, 2} and not painted[1].any()
    viewer.dims.set_point(0, 0)
    settle(qtbot)
    click(qtbot, w, "Segment")
    assert not w.runner.running and "Blocks '-1,x'" in w.last_message and "-1,-4" in w.last_message

    # a block the backbone (12 blocks) does not have: the run says so, naming the field
    type_into(qtbot, w, "Blocks", "-1,-40")
    with qtbot.waitSignal(w.runner.finished, timeout=RUN_TIMEOUT_MS) as blocker:
        click(qtbot, w, "Segment")
    assert blocker.args[0].status == "error" and own_layers(viewer, "explore_segmentation") == []
    assert w.last_message.startswith("Blocks -1,-40: layer=-40 is out of range") and "-12..-1" in w.last_message

    # only the slice shown: one class, nothing to train
    type_into(qtbot, w, "Blocks", "-1,-4")
    click(qtbot, w, "Train on every scribbled slice")
    assert not w.slices_check.isChecked()
    click(qtbot, w, "Segment")
    assert not w.runner.running and "at least two classes" in w.last_message

    # every scribbled slice: slices 0 and 2 train one classifier on blocks -1 and -4
    click(qtbot, w, "Train on every scribbled slice")
    with qtbot.waitSignal(w.runner.finished, timeout=RUN_TIMEOUT_MS) as blocker:
        click(qtbot, w, "Segment")
    assert blocker.args[0].status == "done", w.last_message
    clf = w.classifier
    one_block = w.result_picker.result().planes[0].features.shape[0]
    assert clf.n_features == 2 * one_block, "blocks -1 and -4: the summed channel count"
    assert clf.settings["layers"] == [-1, -4] and clf.meta["examples"] == 2
    assert "of 2 slices" in w.classifier_label.text() and "blocks -1,-4" in w.classifier_label.text()
    seg = own_layers(viewer, "explore_segmentation")
    assert len(seg) == 1 and seg[0].data.shape == (1, H, W)
    labels0 = np.asarray(seg[0].data)[0]
    top = slice(0, 10)  # above the red disc
    assert np.mean(labels0[top, : W // 3] == 1) > 0.8 and np.mean(labels0[top, -W // 3 :] == 2) > 0.8

    # saved and loaded, the classifier brings its blocks: applied with the field emptied, it still works
    saved = tmp_path / "two_slices.npz"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(saved), "Classifier (*.npz)"))
    click(qtbot, w, "Save classifier…")
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, **k: (str(saved), "Classifier (*.npz)"))
    click(qtbot, w, "Load classifier…")
    assert w.classifier is not clf and w.classifier.settings["layers"] == [-1, -4]
    w.blocks_edit.clear()
    w.apply_combo.setCurrentIndex(w.apply_combo.findData("all"))
    with qtbot.waitSignal(w.runner.finished, timeout=RUN_TIMEOUT_MS) as blocker:
        click(qtbot, w, "Apply classifier")
    assert blocker.args[0].status == "done", w.last_message
    both = np.asarray(own_layers(viewer, "explore_segmentation")[0].data)
    assert both.shape == (3, H, W) and np.array_equal(both[0], labels0)


def test_result_layers_short_names_no_hidden_active_advanced_section_and_remove_all(make_napari_viewer, qtbot, records):
    from napari_upsample_anything.widgets import get_results
    from napari_upsample_anything.widgets._registry import is_own

    viewer = make_napari_viewer(show=True)
    src = viewer.add_image(two_region_picture(42, 56), name="histology sample (IHC, 40x)")
    mine = viewer.add_labels(np.zeros((42, 56), np.uint8), name="my labels")
    viewer.layers.selection.active = src
    main = fit_by_clicking_run(viewer, qtbot)
    own = [l for l in viewer.layers if is_own(l)]
    assert sorted(l.name for l in own) == ["histology… HR PCA", "histology… LR PCA", "histology… memory"]
    # next to their source (not above the user's other layers), the visible HR PCA over the source
    names = [l.name for l in viewer.layers]
    assert names == [src.name, "histology… LR PCA", "histology… HR PCA", "histology… memory", "my labels"]
    assert viewer.layers.selection.active.visible, "a hidden layer was made active"
    assert not own_layers(viewer, "kernels"), "the kernels are drawn on request only"

    # the rarely changed fields are folded away until "Advanced" is clicked
    from test_widgets_docked import visible_texts

    assert "Input size" not in visible_texts(main) and "Memory budget" not in visible_texts(main)
    click(qtbot, main, "Advanced")
    settle(qtbot)
    assert {"Input size", "Memory budget", "Threads", "Pixels per step"} <= visible_texts(main)

    # the inspector adds its layers to the same result; one click removes them all, and only them
    _dock, insp = viewer.window.add_plugin_dock_widget("napari-upsample-anything", "Kernel inspector")
    settle(qtbot)
    click(qtbot, insp, "Draw kernels")
    assert len(own_layers(viewer, "kernels")) == 1
    click(qtbot, main, "Remove result layers")
    assert [l for l in viewer.layers if is_own(l)] == [] and list(viewer.layers) == [src, mine]
    assert get_results(viewer) == [] and "Removed 4 result layers" in main.status.text()
    assert not button_enabled(main, "Remove result layers")


def button_enabled(widget, text):
    from qtpy.QtWidgets import QAbstractButton

    return any(b.isEnabled() for b in widget.findChildren(QAbstractButton) if b.text() == text)


def test_plugin_toasts_fade_out_even_when_the_window_is_not_active(make_napari_viewer, qtbot, monkeypatch):
    """napari starts a toast's own timer only while its window is active; the plugin's fade out anyway."""
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    from napari_upsample_anything.widgets import _messages

    make_napari_viewer(show=True)
    monkeypatch.setattr(_messages, "TOAST_MS", {"error": 1500, "warning": 1500, "info": 1500})
    text = "Do this first: a test toast"

    def shown():
        return [t for t in NapariQtNotification._instances if t.message.text() == text and t.isVisible()]

    _messages.notify("warning", text)
    qtbot.waitUntil(lambda: bool(shown()), timeout=10_000)
    for toast in shown():
        toast.timer_stop()  # as when the napari window is not the active one
    qtbot.waitUntil(lambda: not shown(), timeout=10_000)
