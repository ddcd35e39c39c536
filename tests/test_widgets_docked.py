"""Every dock widget shows its controls as a user sees them: docked alone, together, tabified (issue #19).

A shown napari window under Xvfb; controls are found by their visible text (``isVisible()`` of
the real Qt widgets, which is False for a control left without a parent by a second layout).
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = [pytest.mark.usefixtures("offline"), pytest.mark.gui]

#: What a user must see in each dock (menu name -> texts of buttons, check boxes, labels, group titles).
EXPECTED = {
    "Upsample Anything": ("Image layer", "Backbone", "Random weights (testing only)", "Run", "Cancel"),
    "Kernel inspector": ("Fitted image", "Draw kernels", "Show map", "Pick a pixel: click on the image"),
    "Memory monitor": ("Live memory", "Show on canvas (text overlay)", "Show memory map"),
    "Upsample a layer with fitted kernels": ("Low-res layer", "Kernels of", "Upsample", "Cancel"),
    "Feature explorer": (
        "Fitted image",
        "Point similarity",
        "Add points",
        "Similarity",
        "Scribble segmentation",
        "New scribbles",
        "Segment",
        "Save classifier…",
        "Load classifier…",
        "Apply classifier",
        "Also add one probability layer per class",
    ),
}


def visible_texts(widget) -> set:
    """Texts of the visible buttons, check boxes, labels (incl. form labels) and group boxes inside ``widget``."""
    from qtpy.QtWidgets import QAbstractButton, QGroupBox, QLabel

    texts = set()
    for child in widget.findChildren((QAbstractButton, QLabel, QGroupBox)):
        if not child.isVisible() or child.width() < 4 or child.height() < 4:
            continue
        text = child.title() if isinstance(child, QGroupBox) else child.text()
        texts.add(text.replace("&", "").strip())
    return texts


def _settle(qtbot, n=5):
    from qtpy.QtWidgets import QApplication

    for _ in range(n):
        QApplication.processEvents()
        qtbot.wait(20)


def _viewer(make_napari_viewer):
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1366, 768)
    viewer.add_image(np.zeros((40, 50), np.float32), name="img")
    return viewer


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_widget_docked_alone_shows_its_controls(make_napari_viewer, qtbot, name):
    viewer = _viewer(make_napari_viewer)
    dock, widget = viewer.window.add_plugin_dock_widget("napari-upsample-anything", name)
    _settle(qtbot)
    missing = set(EXPECTED[name]) - visible_texts(widget)
    assert not missing, f"{name} docked alone: not visible: {sorted(missing)}"
    assert widget.width() >= 200, f"{name} docked alone is {widget.width()} px wide"


def test_all_five_docked_together_then_tabified_show_their_controls(make_napari_viewer, qtbot):
    viewer = _viewer(make_napari_viewer)
    docks = {name: viewer.window.add_plugin_dock_widget("napari-upsample-anything", name) for name in EXPECTED}
    _settle(qtbot)
    for name, (_dock, widget) in docks.items():
        missing = set(EXPECTED[name]) - visible_texts(widget)
        assert not missing, f"{name} docked with the others: not visible: {sorted(missing)}"
        # the Run / Cancel / status row lives outside the scroll area: never scrolled away
        assert widget.footer.isVisible() and widget.footer.height() >= widget.footer.minimumSizeHint().height()

    window = viewer.window._qt_window
    first = docks["Upsample Anything"][0]
    for dock, _widget in docks.values():
        if dock is not first:
            window.tabifyDockWidget(first, dock)
    _settle(qtbot)
    for name, (dock, widget) in docks.items():
        dock.raise_()
        _settle(qtbot, 3)
        missing = set(EXPECTED[name]) - visible_texts(widget)
        assert not missing, f"{name} tabified and raised: not visible: {sorted(missing)}"
        # Qt keeps the other tabs "visible" but moves them off screen: nothing of them is drawn
        assert not widget.visibleRegion().isEmpty(), f"{name} tabified and raised is not drawn"
        shown = [n for n, (_d, w) in docks.items() if n != name and not w.visibleRegion().isEmpty()]
        assert not shown, f"tabified docks: {name} raised, but {shown} are drawn too"


def test_a_second_layout_on_a_dock_widget_is_refused(qtbot):
    """The mistake that emptied the explorer dock cannot come back silently."""
    from qtpy.QtWidgets import QPushButton, QVBoxLayout

    from napari_upsample_anything.widgets._base import PluginWidget

    class TwoLayouts(PluginWidget):
        def __init__(self):
            super().__init__()
            QVBoxLayout(self).addWidget(QPushButton("lost"))

    class OneLayout(PluginWidget):
        def __init__(self):
            super().__init__()
            self.body_layout.addWidget(QPushButton("kept"))

    with pytest.raises(RuntimeError, match="body_layout"):
        TwoLayouts()
    ok = OneLayout()
    qtbot.addWidget(ok)
    ok.show()
    assert "kept" in visible_texts(ok)
