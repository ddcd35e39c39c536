"""Screenshots of the Feature explorer for docs/plugin.md, taken in a real napari window.

    xvfb-run -a -s "-screen 0 1920x1080x24" .venv/bin/python docs/make_explorer_screenshots.py [--pretrained]

Writes ``docs/img/explorer_*.png``. Without ``--pretrained`` the backbone has random
weights (this machine is offline): the similarity and the classes then reflect colour and
local structure more than meaning, but every layer is the widget's real computation on a
168 x 168 crop of the histology sample. The scribbles are painted by the script (strokes
inside stain masks), as a user would paint them.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from make_screenshots import IMG, WINDOW, settle, shot, side_by_side, wait  # noqa: E402


def wait_for(condition, timeout=1800.0):
    import time

    t0 = time.time()
    while not condition():
        settle(1)
        if time.time() - t0 > timeout:
            raise TimeoutError("the explorer did not finish")
    settle()


def stain_scribbles(image: np.ndarray, seed: int = 0) -> np.ndarray:
    """Strokes (0.6 % of the pixels) inside three stain masks: 1 DAB, 2 haematoxylin, 3 background."""
    from scipy.ndimage import binary_erosion
    from skimage.color import rgb2hed

    hed = rgb2hed(image)
    grey = image.mean(-1) / 255.0
    dab = hed[..., 2] > np.percentile(hed[..., 2], 85)
    hem = (hed[..., 0] > np.percentile(hed[..., 0], 80)) & ~dab
    bg = (grey > np.percentile(grey, 75)) & ~dab & ~hem
    rng = np.random.default_rng(seed)
    out = np.zeros(image.shape[:2], np.uint8)
    H, W = out.shape
    for c, mask in ((1, dab), (2, hem), (3, bg)):
        inner = binary_erosion(mask, iterations=2)
        ys, xs = np.nonzero(inner)
        painted = 0
        while len(ys) and painted < 0.002 * H * W:
            k = rng.integers(len(ys))
            for x in range(xs[k], min(xs[k] + 6, W)):
                if inner[ys[k], x] and not out[ys[k], x]:
                    out[ys[k], x] = c
                    painted += 1
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pretrained", action="store_true", help="use the pretrained DINOv2 weights (needs them cached)")
    ap.add_argument("--steps", type=int, default=25)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", message=".*random weights.*")

    import napari

    from napari_upsample_anything.widgets import _sample_data
    from napari_upsample_anything.widgets._explorer import FeatureExplorerWidget
    from napari_upsample_anything.widgets._main import UpsampleAnythingWidget

    viewer = napari.Viewer(title="napari: Upsample Anything")
    qtwin = viewer.window._qt_window
    ((data, meta, _),) = _sample_data.histology()
    crop = np.ascontiguousarray(data[200:368, 240:408])
    src = viewer.add_image(crop, name="histology", rgb=True)
    main_w = UpsampleAnythingWidget(viewer)
    explorer = FeatureExplorerWidget(viewer)
    viewer.window.add_dock_widget(main_w, name="Upsample Anything", area="right")
    viewer.window.add_dock_widget(explorer, name="Feature explorer", area="right", tabify=True)
    qtwin.resize(*WINDOW)
    settle()
    main_w.random_check.setChecked(not args.pretrained)
    main_w.steps_spin.setValue(args.steps)
    main_w.device_combo.setCurrentText("cpu")
    assert main_w.run(), main_w.last_message
    wait(main_w.runner)
    print("fit:", main_w.status.text())
    dock = viewer.window._wrapped_dock_widgets["Feature explorer"]
    dock.setVisible(True)
    dock.raise_()
    settle()

    # ---- 1. point similarity: two points on DAB-stained (brown) cells
    points = explorer.add_points_layer()
    from skimage.color import rgb2hed

    dab = rgb2hed(crop)[..., 2]
    y, x = np.unravel_index(int(np.argmax(dab)), dab.shape)
    points.add([float(y), float(x)])
    wait_for(lambda: explorer.similarity is not None and not explorer.runner.running)
    for layer in viewer.layers:
        layer.visible = layer is points or layer.name in ("histology similarity",)
    viewer.reset_view()
    shot(viewer, "explorer_similarity")
    parts = []
    for k, name in enumerate(("histology", "histology similarity", "histology similarity (bilinear)")):
        for layer in viewer.layers:
            layer.visible = layer.name == name or layer is points
        settle(60)
        parts.append(shot(viewer, f"_part{k}", canvas_only=True))
    side_by_side(*parts, out=IMG / "explorer_similarity_compare.png")

    # ---- 2. scribble segmentation
    scribbles = explorer.add_scribble_layer()
    scribbles.data = stain_scribbles(crop)
    assert explorer.request("segment"), explorer.last_message
    wait(explorer.runner)
    print("segment:", explorer.status.text())
    for layer in viewer.layers:
        layer.visible = layer is src or layer.name in ("histology segmentation", "histology scribbles")
    shot(viewer, "explorer_segmentation")
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
