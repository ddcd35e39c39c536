"""Screenshots of the napari widgets for docs/plugin.md, taken in a real napari window.

    xvfb-run -a -s "-screen 0 1920x1080x24" .venv/bin/python docs/make_screenshots.py [--pretrained]

Writes ``docs/img/*.png``. Without ``--pretrained`` the backbone has random weights (this
machine may be offline): the PCA colours then mean nothing, but the kernels, the pixel
weights, the memory map and the upsampled layers are real computations on the sample image.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
IMG = HERE / "img"
WINDOW = (1840, 1040)


def wait(runner, timeout=1800.0):
    from qtpy.QtWidgets import QApplication

    t0 = time.time()
    while runner.running:
        QApplication.processEvents()
        time.sleep(0.02)
        if time.time() - t0 > timeout:
            raise TimeoutError("run did not finish")
    for _ in range(20):
        QApplication.processEvents()
        time.sleep(0.01)


def settle(n=30):
    from qtpy.QtWidgets import QApplication

    for _ in range(n):
        QApplication.processEvents()
        time.sleep(0.02)


def crop_to_content(img, pad=6):
    """Crop a canvas screenshot to the part that is not background (black)."""
    mask = img[..., :3].max(axis=-1) > 10
    if not mask.any():
        return img
    ys, xs = np.nonzero(mask)
    return img[max(ys.min() - pad, 0) : ys.max() + pad + 1, max(xs.min() - pad, 0) : xs.max() + pad + 1]


def shot(viewer, name, canvas_only=False, crop=False):
    settle()
    img = viewer.screenshot(canvas_only=canvas_only, flash=False)
    if crop:
        img = crop_to_content(img)

    IMG.mkdir(parents=True, exist_ok=True)
    path = IMG / f"{name}.png"
    save_png(path, img[..., :3])
    print("wrote", path, img.shape)
    return path


def save_png(path, rgb, max_width=1600):
    """Write an RGB uint8 PNG: at most ``max_width`` pixels wide, 256 colours (small files)."""
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(rgb))
    if im.width > max_width:
        im = im.resize((max_width, round(im.height * max_width / im.width)), Image.LANCZOS)
    im = im.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    im.save(path, optimize=True)


def only_dock(viewer, keep):
    """Bring the (tabified) dock widget named ``keep`` to the front."""
    dock = viewer.window._wrapped_dock_widgets[keep]
    dock.setVisible(True)
    dock.raise_()
    settle()


def side_by_side(*paths, out, gap=8):
    from PIL import Image

    ims = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    h = min(i.shape[0] for i in ims)
    parts = []
    for k, im in enumerate(ims):
        if k:
            parts.append(np.full((h, gap, 3), 255, np.uint8))
        parts.append(im[:h])
    save_png(out, np.concatenate(parts, axis=1))
    for p in paths:
        Path(p).unlink()
    print("wrote", out)


def dab_labels(image, lr_shape):
    """A low-resolution 3-class map of the IHC sample: background / haematoxylin / DAB."""
    import torch
    import torch.nn.functional as F
    from skimage.color import rgb2hed

    hed = rgb2hed(image)
    maps = []
    for c in (0, 2):
        lo, hi = np.percentile(hed[..., c], [1, 99])
        maps.append(np.clip((hed[..., c] - lo) / (hi - lo), 0, 1))
    t = torch.from_numpy(np.stack(maps).astype(np.float32))[None]
    lr = F.adaptive_avg_pool2d(t, lr_shape)[0].numpy()  # (2, h, w) stain densities per token
    labels = np.zeros(lr_shape, np.int32)
    labels[lr[0] > 0.35] = 1
    labels[lr[1] > 0.3] = 2
    return labels, lr[1]


def docked_laptop(sample) -> None:
    """``docked_1366x768.png``: all five widgets docked at once in a laptop-sized window."""
    import napari

    viewer = napari.Viewer(title="napari: Upsample Anything")
    data, meta = sample
    viewer.add_image(data, **meta)
    widgets = []
    for name in (
        "Upsample Anything",
        "Kernel inspector",
        "Memory monitor",
        "Upsample a layer with fitted kernels",
        "Feature explorer",
    ):
        _dock, widget = viewer.window.add_plugin_dock_widget("napari-upsample-anything", name)
        widgets.append(widget)
    viewer.window._qt_window.resize(1366, 768)
    settle(60)  # the estimate's measurement and the device listing finish in the background
    t0 = time.time()
    while widgets[0].estimate is None and time.time() - t0 < 120:
        settle(5)
    shot(viewer, "docked_1366x768")
    viewer.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pretrained", action="store_true", help="use the pretrained DINOv2 weights (needs them cached)")
    ap.add_argument("--steps", type=int, default=51)
    ap.add_argument("--only-docked", action="store_true", help="only docked_1366x768.png (a minute)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", message=".*random weights.*")
    if args.only_docked:
        from napari_upsample_anything.widgets import _sample_data

        ((data, meta, _),) = _sample_data.histology()
        docked_laptop((data, meta))
        return 0

    import napari

    from napari_upsample_anything.widgets import _sample_data, get_results
    from napari_upsample_anything.widgets._inspector import KernelInspectorWidget
    from napari_upsample_anything.widgets._main import UpsampleAnythingWidget
    from napari_upsample_anything.widgets._memory import MemoryMonitorWidget
    from napari_upsample_anything.widgets._upsample_layer import UpsampleLayerWidget

    viewer = napari.Viewer(title="napari: Upsample Anything")
    qtwin = viewer.window._qt_window
    ((data, meta, _),) = _sample_data.histology()
    src = viewer.add_image(data, **meta)

    main_w = UpsampleAnythingWidget(viewer)
    mon = MemoryMonitorWidget(viewer)
    ins = KernelInspectorWidget(viewer)
    up = UpsampleLayerWidget(viewer)
    viewer.window.add_dock_widget(main_w, name="Upsample Anything", area="right")
    for w, name in ((ins, "Kernel inspector"), (mon, "Memory monitor"), (up, "Upsample a layer")):
        viewer.window.add_dock_widget(w, name=name, area="right", tabify=True)
    qtwin.resize(*WINDOW)
    settle()

    # ---- 1. main widget: during the run (activity dock) and after it
    only_dock(viewer, "Upsample Anything")
    main_w.random_check.setChecked(not args.pretrained)
    main_w.steps_spin.setValue(args.steps)
    main_w.device_combo.setCurrentText("cpu")
    main_w.threads_spin.setValue(1)
    main_w.memory_edit.setText("48MB")  # a small budget, so that the memory map shows the engine's tiles
    mon.overlay_check.setChecked(True)
    assert main_w.run(), main_w.last_message
    try:
        viewer.window._status_bar._toggle_activity_dock(True)
    except Exception:  # noqa: BLE001 - private napari API; this screenshot is a bonus
        pass
    t0 = time.time()
    while main_w.runner.running and not (
        main_w.runner.last_event is not None
        and main_w.runner.last_event.stage == "fit"
        and main_w.runner.last_event.done >= max(1, args.steps // 3)
    ):
        settle(1)
        if time.time() - t0 > 900:
            break
    shot(viewer, "main_running")
    wait(main_w.runner)
    try:
        viewer.window._status_bar._toggle_activity_dock(False)
    except Exception:  # noqa: BLE001
        pass
    mon.overlay_check.setChecked(False)
    res = get_results(viewer)[0]
    print("status:", main_w.status.text())
    name = res.name  # the short form of the source's name that prefixes the result layers
    viewer.layers.selection.active = viewer.layers[f"{name} HR PCA"]
    viewer.reset_view()
    shot(viewer, "main_widget")

    # ---- 2. image | LR PCA | HR PCA (canvas only, side by side)
    hr, lr = viewer.layers[f"{name} HR PCA"], viewer.layers[f"{name} LR PCA"]
    parts = []
    for k, layer in enumerate((src, lr, hr)):
        for l in viewer.layers:
            l.visible = l is layer
        parts.append(shot(viewer, f"_part{k}", canvas_only=True, crop=True))
    side_by_side(*parts, out=IMG / "pca_compare.png")

    # ---- 3. kernel inspector: ellipses, and a picked pixel's weights
    only_dock(viewer, "Kernel inspector")
    for l in viewer.layers:
        l.visible = l is src
    ins.sigma_spin.setValue(1.0)
    ins.stride_spin.setValue(2)
    ins.draw_kernels()
    viewer.layers[f"{name} kernels"].opacity = 0.5
    y, x = 250, 300
    ins.pick_check.setChecked(True)
    ins.inspect_pixel(src.data_to_world((y, x)))
    viewer.layers[f"{name} pixel weights"].opacity = 0.8
    viewer.camera.center = (y, x)
    viewer.camera.zoom = 2.4
    shot(viewer, "kernel_inspector")
    pixel_layers = [viewer.layers[f"{name} {n}"] for n in ("pixel weights", "pixel kernels", "picked pixel")]
    for l in pixel_layers:
        l.visible = False
    ins.set_picking(False)
    # kernels at half a sigma, every third, coloured by anisotropy | the sigma_r map
    ins.color_combo.setCurrentText("anisotropy")
    ins.sigma_spin.setValue(0.5)
    ins.stride_spin.setValue(3)
    kern = ins.draw_kernels()
    kern.opacity = 1.0
    viewer.reset_view()
    left = shot(viewer, "_part0", canvas_only=True, crop=True)
    kern.visible = False
    pm = ins.show_parameter_map("sigma_r")
    pm.opacity = 0.7
    right = shot(viewer, "_part1", canvas_only=True, crop=True)
    side_by_side(left, right, out=IMG / "kernel_maps.png")
    pm.visible = False

    # ---- 4. memory monitor: the run's memory plot, the text overlay, the per-tile map
    only_dock(viewer, "Memory monitor")
    mon.overlay_check.setChecked(True)
    mon.stage_combo.setCurrentText("fit")
    mon.value_combo.setCurrentText("auto")  # on the CPU: what the engine allocated per tile
    mon.show_memory_map()
    viewer.layers[f"{name} memory"].opacity = 0.7
    viewer.reset_view()
    shot(viewer, "memory_monitor")
    viewer.layers[f"{name} memory"].visible = False
    mon.overlay_check.setChecked(False)

    # ---- 5. upsample a layer: low-resolution stain classes -> full resolution
    only_dock(viewer, "Upsample a layer")
    h, w = res.planes[0].lr_shape
    labels, _ = dab_labels(data, (h, w))
    lr_lab = viewer.add_labels(labels, name="stain classes (LR)", opacity=0.55, **res.frame.transform(res.planes[0].factor))
    up.layer_picker.set_layer(lr_lab)
    up.device_combo.setCurrentText("cpu")
    assert up.run(), up.last_message
    wait(up.runner)
    print("upsample status:", up.status.text())
    hr_lab = viewer.layers["stain classes (LR) upsampled"]
    hr_lab.opacity = 0.55
    up.layer_picker.set_layer(lr_lab)
    for l in viewer.layers:
        l.visible = l in (src, hr_lab)
    viewer.reset_view()
    shot(viewer, "upsample_layer")
    viewer.camera.center = (300, 200)
    viewer.camera.zoom *= 2.0
    parts = []
    for k, layer in enumerate((lr_lab, hr_lab)):
        for l in viewer.layers:
            l.visible = l in (src, layer)
        parts.append(shot(viewer, f"_part{k}", canvas_only=True))
    side_by_side(*parts, out=IMG / "upsample_compare.png")

    for wdg in (main_w, mon, ins, up):
        wdg.close()
    viewer.close()
    docked_laptop((data, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
