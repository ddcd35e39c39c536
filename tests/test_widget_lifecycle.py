"""Closing napari at any moment with the plugin's widgets docked exits cleanly (issue #9, item 1).

Each case runs a real napari window in a fresh Python process (on the Xvfb display that
pytest-xvfb started), docks widgets through the plugin manifest, and closes the viewer
with ``viewer.close()`` after some delay or while a run is in a given stage, then lets
the script end **without** napari's event loop: the interpreter tears Qt down right away,
which is when a worker still emitting signals used to abort the process
(``RuntimeError: wrapped C/C++ object of type WorkerBaseSignals has been deleted``,
``Aborted``, exit code 134).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import napari_upsample_anything

pytestmark = [pytest.mark.gui, pytest.mark.slow]

ALL_WIDGETS = (
    "Upsample Anything",
    "Kernel inspector",
    "Memory monitor",
    "Upsample a layer with fitted kernels",
)

SCRIPT = r"""
import json, sys, time
import numpy as np
import napari
from qtpy.QtWidgets import QApplication

args = json.loads(sys.argv[1])
viewer = napari.Viewer(show=True)
rng = np.random.default_rng(0)
# the last stages of a run must last long enough to be caught: a larger image for them
shape = (308, 336, 3) if args.get("stage") in ("render", "upsample") else (112, 126, 3)
viewer.add_image((rng.random(shape) * 255).astype(np.uint8), name="img")
app = QApplication.instance()


def spin(until, limit=240.0):
    t0 = time.time()
    while not until():
        if time.time() - t0 > limit:
            print("TIMEOUT", flush=True)
            break
        app.processEvents()
        time.sleep(0.005)


widgets = {}
for name in args["dock"]:
    _dock, widgets[name] = viewer.window.add_plugin_dock_widget("napari-upsample-anything", name)
main = widgets.get("Upsample Anything")
if main is not None:
    main.random_check.setChecked(True)
    main.device_combo.setCurrentText("cpu")
    main.threads_spin.setValue(1)
    main.steps_spin.setValue(2)
stage = args.get("stage")
if stage:
    runner = main.runner
    if args.get("upsample"):
        main.run()
        spin(lambda: not main.runner.running)
        if stage == "fit":  # a map on another grid: kernels are fitted for it first, with these steps
            main.result.pipeline.config.steps = 5000
            viewer.add_image(rng.random((10, 11)).astype(np.float32), name="map")
        else:  # the fitted grid: straight to the render, of many channels
            lr = main.result.planes[0].lr_shape
            viewer.add_image(rng.random((384,) + tuple(lr)).astype(np.float32), name="map")
        up = widgets["Upsample a layer with fitted kernels"]
        up.layer_picker.set_layer(viewer.layers["map"])
        up.confirm_slow_fit = False
        assert up.run(), up.last_message
        runner = up.runner
    else:
        if stage == "fit":
            main.steps_spin.setValue(5000)
        assert main.run(), main.last_message
    spin(lambda: (runner.last_event is not None and runner.last_event.stage == stage) or not runner.running)
    print("CLOSING", runner.last_event.stage if runner.last_event else None, runner.running, flush=True)
else:
    t0 = time.time()
    spin(lambda: time.time() - t0 >= args["delay"])
viewer.close()
print("CLOSED", flush=True)
"""


def _close_napari(tmp_path: Path, **args) -> subprocess.CompletedProcess:
    script = tmp_path / "close_napari.py"
    script.write_text(SCRIPT)
    src = str(Path(napari_upsample_anything.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", QT_API=env.get("QT_API", "pyqt6"))
    env.pop("QT_QPA_PLATFORM", None)
    assert env.get("DISPLAY"), "needs the Xvfb display started by pytest-xvfb"
    return subprocess.run([sys.executable, str(script), json.dumps(args)], env=env, capture_output=True, text=True, timeout=420)


def _assert_clean(proc: subprocess.CompletedProcess) -> None:
    report = f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, report
    assert "CLOSED" in proc.stdout and "TIMEOUT" not in proc.stdout, report
    for bad in ("Aborted", "has been deleted", "Traceback", "Segmentation"):
        assert bad not in proc.stderr, report


@pytest.mark.parametrize("delay", [0.0, 1.0, 3.0])
def test_close_viewer_soon_after_docking(tmp_path, delay):
    """All four widgets docked; the viewer closes 0, 1 or 3 s later (the device listing still importing torch)."""
    _assert_clean(_close_napari(tmp_path, dock=list(ALL_WIDGETS), delay=delay))


@pytest.mark.parametrize("stage", ["features", "fit", "pca", "render"])
def test_close_viewer_during_each_stage_of_a_run(tmp_path, stage):
    proc = _close_napari(tmp_path, dock=list(ALL_WIDGETS), stage=stage)
    _assert_clean(proc)
    assert f"CLOSING {stage} True" in proc.stdout, proc.stdout


@pytest.mark.parametrize("stage", ["fit", "upsample"])
def test_close_viewer_while_upsampling_a_layer(tmp_path, stage):
    """The upsample widget's own run (a refit for the map's grid, then the render)."""
    proc = _close_napari(tmp_path, dock=list(ALL_WIDGETS), stage=stage, upsample=True)
    _assert_clean(proc)
    assert f"CLOSING {stage} True" in proc.stdout, proc.stdout
