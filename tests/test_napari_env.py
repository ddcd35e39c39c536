"""Smoke test of the GUI test environment: napari + PyQt6 + vispy drawing on an X display.

This checks the machine, not the plugin: that the Qt binding is PyQt6, that Qt runs on a
real (virtual) X display through the xcb platform plugin, and that napari actually draws
an image layer with OpenGL (Mesa's software renderer under Xvfb).  Run it through
``bash scripts/test.sh`` (pytest-xvfb provides the virtual display).

``QT_QPA_PLATFORM=offscreen`` is refused on purpose: vispy crashes the whole process
there as soon as a layer is drawn, which would hide every other test result.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gui

# Platform plugins on which napari's vispy canvas is known to draw.
_DRAWING_PLATFORMS = {"xcb", "wayland", "cocoa", "windows"}


# The display guard for every `gui` test is in conftest.py (pytest_runtest_setup).


def test_qt_binding_and_platform(qapp):
    import qtpy

    assert qtpy.API_NAME == "PyQt6", f"napari/qtpy picked {qtpy.API_NAME}, expected PyQt6"
    assert qapp.platformName() in _DRAWING_PLATFORMS, qapp.platformName()


def _bright_square(size: int = 64) -> np.ndarray:
    """A dark float image with a bright centred square covering the middle half."""
    img = np.zeros((size, size), dtype=np.float32)
    q = size // 4
    img[q : size - q, q : size - q] = 1.0
    return img


def test_viewer_draws_image_layer(make_napari_viewer):
    viewer = make_napari_viewer(show=True)
    layer = viewer.add_image(_bright_square(), colormap="gray", contrast_limits=(0.0, 1.0), name="square")
    assert len(viewer.layers) == 1 and viewer.layers[0] is layer
    viewer.reset_view()

    shot = viewer.screenshot(canvas_only=True, flash=False)

    # An RGBA uint8 picture of the canvas with a sensible size.
    assert shot.ndim == 3 and shot.shape[2] == 4, shot.shape
    assert shot.dtype == np.uint8
    height, width = shot.shape[:2]
    assert min(height, width) >= 64, shot.shape

    rgb = shot[..., :3].astype(np.int16)
    luma = rgb.mean(axis=2)

    # Not blank: the picture has contrast at all.
    assert luma.max() - luma.min() > 150, (luma.min(), luma.max())

    # The bright square appears bright and grey (gray colormap) at the canvas centre.
    cy, cx = height // 2, width // 2
    centre = rgb[cy - 2 : cy + 3, cx - 2 : cx + 3].reshape(-1, 3)
    assert centre.min() > 200, centre.tolist()
    assert np.ptp(centre, axis=1).max() < 20, centre.tolist()  # grey, not tinted

    # The bright region is a centred, roughly square patch well inside the canvas:
    # the image was drawn where it belongs, not a uniformly white canvas.
    ys, xs = np.nonzero(luma > 128)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    box_h, box_w = y1 - y0 + 1, x1 - x0 + 1
    assert y0 > 0 and x0 > 0 and y1 < height - 1 and x1 < width - 1, (y0, y1, x0, x1)
    assert abs((y0 + y1) / 2 - cy) <= 3 and abs((x0 + x1) / 2 - cx) <= 3, (y0, y1, x0, x1)
    assert abs(box_h - box_w) <= 3, (box_h, box_w)
    # The square is half the image's side; the image fills most of the shorter side.
    assert 0.25 * min(height, width) < box_h < 0.6 * min(height, width), (box_h, shot.shape)
    # Everything bright lies inside that box (a solid square, no stray bright pixels).
    assert (luma[y0 : y1 + 1, x0 : x1 + 1] > 128).mean() > 0.95

    # The dark part of the image next to the square is dark.
    ring = rgb[cy, x1 + 3 : x1 + 3 + box_w // 4]
    assert ring.size and ring.max() < 60, ring.tolist()
