"""**Feature explorer**: ask a fitted image's HR features questions (point similarity, scribbles).

Works on a result of the main widget (picked in *Fitted image*), on the plane under the
viewer's slider for stacks. *Blocks* (empty, ``-1`` or ``-1,-4``) chooses the transformer
blocks whose features are explored (concatenated, each normalised); other blocks than the
fitted one run the backbone again on the image, once per plane, and reuse the fitted kernels.

* **Similarity**: *Add points* creates a Points layer (``<name> query points``); every point
  clicked on the image adds to the query (the mean HR feature of the points on the current
  plane). The cosine similarity of every pixel with it is shown as ``<name> similarity`` (HR
  features upsampled with the fitted kernels), next to ``<name> similarity (bilinear)``
  (bilinearly upsampled features, the usual comparison), and a Labels mask
  ``<name> similar`` of the pixels above the *Threshold* slider (moving the slider does not
  recompute anything).
* **Segmentation**: paint classes (1, 2, ...) into a Labels layer -- one the widget creates
  (*New scribbles*) or any Labels layer of the right size, which is only read, never
  changed -- and press *Segment* (or tick *Live*): a random forest is trained on the HR
  features at the scribbled pixels and classifies every pixel: ``<name> segmentation``
  (Labels), and on request one ``<name> probability <k>`` image per class. On a stack, *Train on
  every scribbled slice* trains one classifier on the strokes of every fitted slice (a class
  may be painted on one slice only). Route *HR pixels* classifies
  every HR pixel; *LR tokens* classifies the patch tokens and upsamples the class
  probabilities with the kernels (much cheaper). *Save classifier* writes the training
  samples to an ``.npz`` (no pickle; see :mod:`napari_upsample_anything.explore`) for batch use.

Computations run in napari's ``thread_worker`` through the shared :class:`._threads.Runner`
(progress bar, Cancel); HR features kept by the main widget are used directly, otherwise the
features are rendered tile by tile and never held whole.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSlider,
    QWidget,
)

from ._base import RunWidget, status_label
from ._explore_compute import (
    BLOCKS_HINT,
    ExplorerInputError,
    FeatureSource,
    compute_apply,
    compute_segmentation,
    compute_similarity,
    parse_blocks,
    plane_scribbles,
    scribble_examples,
)
from ._explore_layers import ExplorerOutputs
from ._pickers import LayerPicker, ResultPicker
from ._pipeline import Outcome
from ._registry import (
    FitResult,
    find_own_layer,
    get_state,
    is_own,
    put_layer,
    tag_of,
    unwrap_viewer,
)
from ._threads import Runner

ROUTES = (("HR pixels (every pixel's HR feature)", "hr"), ("LR tokens + kernels (cheaper)", "lr"))
#: Milliseconds to wait after the last edit before a live update starts (coalesces strokes).
LIVE_DELAY_MS = 400


# ---------------------------------------------------------------------------------- widget
class ScribblePicker(LayerPicker):
    """Labels layers to read scribbles from: the user's, and the explorer's own scribble layers
    (never the plugin's outputs, e.g. a segmentation it just added and napari made active)."""

    def _candidates(self):
        return [l for l in super()._candidates() if not is_own(l) or tag_of(l).get("role") == "explore_scribbles"]


class FeatureExplorerWidget(ExplorerOutputs, RunWidget):
    """The feature explorer dock widget (see the module docstring)."""

    cancelled_text = "Cancelled; no layer was changed."

    def __init__(self, napari_viewer, parent: Optional[QWidget] = None):
        super().__init__(parent)
        self.viewer = napari_viewer = unwrap_viewer(napari_viewer)
        self.state = get_state(napari_viewer)
        self.runner = Runner(napari_viewer, "Feature explorer", self)
        self.runner.progressed.connect(self._on_progress)
        self.runner.finished.connect(self._on_finished)
        self.similarity: Optional[dict] = None  # last result: {"kernels", "bilinear", "result", "plane"}
        self.segmentation: Optional[dict] = None
        self.outputs: dict = {}
        self._queued: list = []
        self._watched: list = []  # (layer ref, emitter name, callback)
        self._scribbles_ref = None  # the Labels layer the running segmentation reads
        self._classifier = None  # what "Apply classifier" and "Save classifier" use
        self._feature_cache: dict = {}  # result key -> FeatureSource cache (features of other blocks)
        self._build()
        self._live_timer = QTimer(self)
        self._live_timer.setSingleShot(True)
        self._live_timer.setInterval(LIVE_DELAY_MS)
        self._live_timer.timeout.connect(self._live_segment)
        self._points_timer = QTimer(self)
        self._points_timer.setSingleShot(True)
        self._points_timer.setInterval(50)
        self._points_timer.timeout.connect(lambda: self.request("similarity"))

    # ------------------------------------------------------------------ UI
    def _build(self) -> None:
        layout = self.body_layout
        form = QFormLayout()
        layout.addLayout(form)
        self.result_picker = ResultPicker(self.viewer)
        self.result_picker.setToolTip("The image whose HR features are explored (fitted by 'Upsample Anything')")
        form.addRow("Fitted image", self.result_picker)
        self.blocks_edit = QLineEdit()
        self.blocks_edit.setPlaceholderText("as fitted (e.g. -1 or -1,-4)")
        self.blocks_edit.setToolTip(
            "Transformer blocks whose features are explored, concatenated (each normalised); empty = the block "
            "the image was fitted with. Other blocks run the backbone again on the image (once per plane); "
            "the fitted kernels are reused. " + BLOCKS_HINT[0].upper() + BLOCKS_HINT[1:]
        )
        form.addRow("Blocks", self.blocks_edit)

        sim_box = QGroupBox("Point similarity")
        sim_form = QFormLayout(sim_box)
        row = QHBoxLayout()
        self.points_button = QPushButton("Add points")
        self.points_button.setToolTip("Create (or select) the query Points layer; click on the image to add points")
        self.points_button.clicked.connect(self.add_points_layer)
        self.similarity_button = QPushButton("Similarity")
        self.similarity_button.setToolTip("Compute the similarity to the mean feature of the points on this plane")
        self.similarity_button.clicked.connect(lambda: self.request("similarity"))
        row.addWidget(self.points_button)
        row.addWidget(self.similarity_button)
        sim_form.addRow(row)
        self.threshold_slider = QSlider(Qt.Orientation.Horizontal)
        self.threshold_slider.setRange(-100, 100)
        self.threshold_slider.setValue(50)
        self.threshold_slider.setToolTip("Pixels with a similarity at or above this value form the mask layer")
        self.threshold_label = QLabel("0.50")
        self.threshold_slider.valueChanged.connect(self._on_threshold)
        trow = QHBoxLayout()
        trow.addWidget(self.threshold_slider)
        trow.addWidget(self.threshold_label)
        sim_form.addRow("Threshold", trow)
        layout.addWidget(sim_box)

        seg_box = QGroupBox("Scribble segmentation")
        seg_form = QFormLayout(seg_box)
        self.scribble_picker = ScribblePicker(self.viewer, ("labels",), include_own=True, parent=self)
        self.scribble_picker.setToolTip("Labels layer with the scribbles (0 = unlabelled); it is only read")
        self.scribble_picker.currentIndexChanged.connect(self._watch_scribbles)
        srow = QHBoxLayout()
        srow.addWidget(self.scribble_picker, 1)
        self.new_scribbles_button = QPushButton("New scribbles")
        self.new_scribbles_button.setToolTip("Create an empty Labels layer on the fitted image to paint into")
        self.new_scribbles_button.clicked.connect(self.add_scribble_layer)
        srow.addWidget(self.new_scribbles_button)
        seg_form.addRow("Scribbles", srow)
        self.route_combo = QComboBox()
        for text, value in ROUTES:
            self.route_combo.addItem(text, value)
        seg_form.addRow("Classify", self.route_combo)
        self.image_check = QCheckBox("Also use the image's own channels")
        seg_form.addRow(self.image_check)
        self.slices_check = QCheckBox("Train on every scribbled slice")
        self.slices_check.setChecked(True)
        self.slices_check.setToolTip(
            "For a stack fitted on all slices: one classifier learns from the strokes of every slice; off: only the slice shown"
        )
        seg_form.addRow(self.slices_check)
        self.live_check = QCheckBox("Live: re-segment after each stroke")
        seg_form.addRow(self.live_check)
        self.prob_check = QCheckBox("Also add one probability layer per class")
        self.prob_check.setToolTip("Hidden images '<name> probability <k>' next to the segmentation (off: fewer layers)")
        seg_form.addRow(self.prob_check)
        files = QHBoxLayout()
        self.save_button = QPushButton("Save classifier…")
        self.save_button.setEnabled(False)
        self.save_button.setToolTip("Write the last trained classifier (its training samples, no pickle) to an .npz")
        self.save_button.clicked.connect(self._save_clicked)
        self.load_button = QPushButton("Load classifier…")
        self.load_button.setToolTip("Read a classifier saved here or by the Python API, to apply it to this image")
        self.load_button.clicked.connect(self._load_clicked)
        files.addWidget(self.save_button)
        files.addWidget(self.load_button)
        seg_form.addRow(files)
        arow = QHBoxLayout()
        self.apply_combo = QComboBox()
        self.apply_combo.addItem("current plane", "current")
        self.apply_combo.addItem("all slices", "all")
        self.apply_combo.setToolTip("For a stack fitted on all slices: classify the plane shown, or every plane")
        self.apply_button = QPushButton("Apply classifier")
        self.apply_button.setEnabled(False)
        self.apply_button.setToolTip("Classify with the loaded (or last trained) classifier, without new scribbles")
        self.apply_button.clicked.connect(lambda: self.request("apply"))
        arow.addWidget(self.apply_combo, 1)
        arow.addWidget(self.apply_button)
        seg_form.addRow("Apply to", arow)
        self.classifier_label = QLabel("no classifier yet")
        self.classifier_label.setWordWrap(True)
        seg_form.addRow(self.classifier_label)
        layout.addWidget(seg_box)

        self._add_run_row(self.footer_layout, "Segment", lambda: self.request("segment"))
        self.status = status_label()
        self.footer_layout.addWidget(self.status)
        layout.addStretch(1)
        self._watch_scribbles()

    # ------------------------------------------------------------------ helpers
    def _result(self) -> Optional[FitResult]:
        return self.result_picker.result()

    def _plane(self, result: FitResult):
        return result.plane_at_world(self.viewer.dims.point)

    def _device(self, result: FitResult) -> str:
        return str(getattr(result.pipeline, "device", "auto") or "auto")

    def _source(self, result: FitResult) -> FeatureSource:
        """The features of the "Blocks" field (raises :class:`ExplorerInputError` for a malformed one)."""
        blocks = parse_blocks(self.blocks_edit.text())
        for key in [k for k in self._feature_cache if k not in self.state.results]:
            del self._feature_cache[key]  # features of results that are gone
        return FeatureSource(result.pipeline.config, blocks, self._feature_cache.setdefault(result.key, {}))

    def _watch(self, layer, emitter: str, callback) -> None:
        getattr(layer.events, emitter).connect(callback)
        self._watched.append((weakref.ref(layer), emitter, callback))

    def _unwatch(self, emitters: Tuple[str, ...]) -> None:
        keep = []
        for ref, emitter, callback in self._watched:
            layer = ref()
            if emitter in emitters:
                if layer is not None:
                    try:
                        getattr(layer.events, emitter).disconnect(callback)
                    except Exception:  # noqa: BLE001 - already gone
                        pass
            else:
                keep.append((ref, emitter, callback))
        self._watched = keep

    # ------------------------------------------------------------------ layers the user works in
    def points_layer(self, result: Optional[FitResult] = None):
        result = result or self._result()
        return None if result is None else find_own_layer(self.viewer, "explore_points", result.owner)

    def add_points_layer(self):
        """Create (or select) the query Points layer of the picked result, in add mode."""
        result = self._result()
        if result is None:
            self._message("error", "No fitted image yet: run 'Upsample Anything' on the image first.", self.status)
            return None
        layer = self.points_layer(result)
        if layer is None:
            H = result.planes[0].hr_shape[0]
            scale = float(result.frame.scale[-2])
            layer = put_layer(
                self.viewer,
                np.zeros((0, result.frame.ndim)),
                "points",
                name=f"{result.name} query points",
                role="explore_points",
                owner=result.owner,
                result=result.key,
                face_color="red",
                size=max(3.0, H / 50) * scale,
                ndim=result.frame.ndim,
            )
        self._unwatch(("data",))
        self._watch(layer, "data", self._on_points_changed)
        self.viewer.layers.selection.active = layer
        layer.mode = "add"
        self.status.setText("Click on the image to add query points.")
        return layer

    def _on_points_changed(self, event=None) -> None:
        if self._cleaned:
            return
        self._points_timer.start()

    def query_points(self, result: FitResult, plane) -> np.ndarray:
        """``(N, 2)`` (y, x) HR pixels of the query points on ``plane`` (inside the image)."""
        layer = self.points_layer(result)
        if layer is None:
            return np.zeros((0, 2), np.int64)
        out = []
        for p in np.asarray(layer.data, float):
            world = layer.data_to_world(p)
            index, y, x, inside = result.frame.pixel_at(world)
            if inside and (not result.frame.is_stack or tuple(index) == tuple(plane.index)):
                out.append((y, x))
        return np.asarray(out, np.int64).reshape(-1, 2)

    def add_scribble_layer(self):
        """Create an empty Labels layer on the fitted image (the current plane) to paint scribbles into."""
        result = self._result()
        if result is None:
            self._message("error", "No fitted image yet: run 'Upsample Anything' on the image first.", self.status)
            return None
        frame = result.frame
        H, W = result.planes[0].hr_shape
        data = np.zeros(frame.leading_shape() + (H, W), np.uint8)
        layer = put_layer(
            self.viewer,
            data,
            "labels",
            name=f"{result.name} scribbles",
            role="explore_scribbles",
            owner=result.owner,
            result=result.key,
            **frame.transform(),
        )
        self.scribble_picker.set_layer(layer)
        self.viewer.layers.selection.active = layer
        layer.mode = "paint"
        layer.brush_size = max(2, H // 60)
        layer.selected_label = 1
        self.status.setText("Paint class 1, then switch the label to 2 (and more) and paint the other classes.")
        return layer

    def _watch_scribbles(self, *_args) -> None:
        self._unwatch(("paint", "set_data"))
        layer = self.scribble_picker.layer()
        if layer is None:
            return
        for name in ("paint", "set_data"):
            if hasattr(layer.events, name):
                self._watch(layer, name, self._on_scribbles_changed)

    def _on_scribbles_changed(self, event=None) -> None:
        if not self._cleaned and self.live_check.isChecked():
            self._live_timer.start()

    def _live_segment(self) -> None:
        if self.live_check.isChecked():
            self.request("segment", quiet=True)

    # ------------------------------------------------------------------ runs
    def request(self, kind: str, quiet: bool = False) -> bool:
        """Start a ``"similarity"`` or ``"segment"`` run now, or after the running one."""
        if self.runner.running:
            if kind not in self._queued:
                self._queued.append(kind)
            return True
        if kind == "apply":
            return self.run_apply()
        return self.run_similarity(quiet) if kind == "similarity" else self.run_segmentation(quiet)

    def run_apply(self) -> bool:
        """Classify the current plane (or every plane) with :attr:`classifier`, without new scribbles."""
        result = self._result()
        if result is None:
            self._message("error", "No fitted image yet: run 'Upsample Anything' on the image first.", self.status)
            return False
        if self.classifier is None:
            self._message("error", "Load a classifier (or press Segment) first.", self.status)
            return False
        if self.apply_combo.currentData() == "all":
            planes = list(result.planes)
        else:
            try:
                planes = [self._plane(result)]
            except KeyError as exc:
                self._message("warning", str(exc), self.status)
                return False
        try:
            source = self._source(result)
        except ExplorerInputError as exc:
            self._message("error", str(exc), self.status)
            return False
        self._pending = {"kind": "apply", "result": result, "planes": planes}
        self._set_running(True)
        self.status.setText("applying the classifier…")
        device = self._device(result)
        self.runner.start(compute_apply, planes, self.classifier, device, source, device=device, desc=f"classify {result.name}")
        return True

    def _set_running(self, running: bool) -> None:
        self.run_button.setEnabled(not running)
        self.similarity_button.setEnabled(not running)
        self.apply_button.setEnabled(not running and self.classifier is not None)
        self.cancel_button.setEnabled(running)

    def run_similarity(self, quiet: bool = False) -> bool:
        result = self._result()
        if result is None:
            self._message("error", "No fitted image yet: run 'Upsample Anything' on the image first.", self.status)
            return False
        try:
            plane = self._plane(result)
        except KeyError as exc:
            self._message("warning", str(exc), self.status)
            return False
        points = self.query_points(result, plane)
        if len(points) == 0:
            if not quiet:
                self.status.setText("Add query points on the image first ('Add points').")
            return False
        try:
            source = self._source(result)
        except ExplorerInputError as exc:
            self._message("error", str(exc), self.status)
            return False
        device = self._device(result)
        self._start("similarity", result, plane, compute_similarity, plane, points, device, source)
        return True

    def run_segmentation(self, quiet: bool = False) -> bool:
        result = self._result()
        layer = self.scribble_picker.layer()
        if result is None:
            self._message("error", "No fitted image yet: run 'Upsample Anything' on the image first.", self.status)
            return False
        if layer is None:
            self._message(
                "error", "No scribbles: press 'New scribbles' (or add a Labels layer) and paint two classes.", self.status
            )
            return False
        try:
            plane = self._plane(result)
            if self.slices_check.isChecked():
                examples, unfitted = scribble_examples(layer, result, plane)
            else:
                examples, unfitted = [(plane, plane_scribbles(layer, result, plane))], []
            source = self._source(result)
        except (KeyError, ExplorerInputError) as exc:
            self._message("error" if not quiet else "info", str(exc), self.status)
            return False
        found = np.unique(np.concatenate([s[s > 0] for _, s in examples])) if examples else np.zeros(0, int)
        if len(found) < 2:
            if not quiet:
                self._message("info", f"Paint at least two classes (found {found.tolist()}).", self.status)
            return False
        if unfitted and not quiet:  # said, not refused: the fitted slices still train
            self._message(
                "warning",
                f"Slices {unfitted} have strokes but were not fitted (run 'Upsample Anything' on all slices); "
                f"training on {len(examples)} slice(s).",
                self.status,
            )
        route = self.route_combo.currentData()
        self._scribbles_ref = weakref.ref(layer)
        device = self._device(result)
        args = (plane, examples, route, self.image_check.isChecked(), device, source)
        self._start("segment", result, plane, compute_segmentation, *args)
        return True

    def _start(self, kind: str, result: FitResult, plane, fn, *args) -> None:
        """Run ``fn(*args)`` on the result's device and show its outcome on ``plane``."""
        self._pending = {"kind": kind, "result": result, "plane": plane}
        self._set_running(True)
        self.status.setText(f"{kind}…")
        self.runner.start(fn, *args, device=self._device(result), desc=f"{kind} on {result.name}")

    def _on_finished(self, outcome: Outcome) -> None:
        super()._on_finished(outcome)
        if self._cleaned:
            return
        self._set_running(False)
        if self._queued and outcome.status == "done":
            kind = self._queued.pop(0)
            self.request(kind, quiet=True)
        else:
            self._queued.clear()

    def _publish(self, outcome: Outcome, pending: dict) -> None:
        if pending["kind"] == "similarity":
            self._show_similarity(outcome.value, pending)
        elif pending["kind"] == "apply":
            self._show_applied(outcome.value, pending)
        else:
            self._show_segmentation(outcome.value, pending)
        self.status.setText(f"{pending['kind']} done in {outcome.seconds:.1f} s")

    @property
    def classifier(self):
        """The classifier "Apply" uses: the one loaded last, or the last trained one, whichever came later."""
        return self._classifier

    def _set_classifier(self, clf, origin: str) -> None:
        self._classifier = clf
        self.save_button.setEnabled(True)
        self.apply_button.setEnabled(not self.runner.running)
        blocks = (getattr(clf, "settings", None) or {}).get("layers")
        self.classifier_label.setText(
            f"classifier: {origin}; classes {[int(c) for c in clf.classes]}, route {clf.route}, "
            + (f"blocks {','.join(map(str, blocks))}, " if blocks else "")
            + f"{clf.n_features} features per pixel"
        )

    def load_classifier(self, path):
        """Read a classifier file (``ScribbleClassifier.save``) for :meth:`run_apply`; returns it."""
        from ..explore import ScribbleClassifier

        clf = ScribbleClassifier.load(path)
        self._set_classifier(clf, f"loaded from {Path(path).name}")
        return clf

    def _load_clicked(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load classifier", "", "Classifier (*.npz)")
        if path:
            try:
                self.load_classifier(path)
                self._message("info", f"Loaded {path}: press 'Apply classifier'.", self.status)
            except (OSError, ValueError) as exc:
                self._message("error", f"Choose a classifier file saved by 'Save classifier': {exc}", self.status)

    def save_classifier(self, path) -> str:
        """Write the current classifier (training samples + parameters, no pickle) to ``path``."""
        if self.classifier is None:
            raise ValueError("no classifier yet: press Segment first")
        return str(self.classifier.save(path))

    def _save_clicked(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save classifier", "classifier.npz", "Classifier (*.npz)")
        if path:
            try:
                self._message("info", f"Saved {self.save_classifier(path)}", self.status)
            except (OSError, ValueError) as exc:
                self._message("error", str(exc), self.status)

    # ------------------------------------------------------------------ cleanup
    def cleanup(self) -> None:
        for timer in (self._live_timer, self._points_timer):
            timer.stop()
        self._unwatch(("data", "paint", "set_data"))
        self._queued.clear()
        self.runner.shutdown()
        self._feature_cache.clear()  # features of other blocks: after the worker has stopped using them
