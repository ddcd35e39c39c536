"""**Upsample Anything** dock widget: features -> kernel fit -> HR PCA of an image layer.

Pick an image layer (2D gray, RGB, multichannel with a chosen channel axis, or a z/t stack:
the current slice or all slices), a backbone and its options, and press Run. The
computation (:func:`._pipeline.run_pipeline`) runs in a napari ``thread_worker``: one yield
per ViT window, optimisation step and render tile, shown in napari's activity dock and in
the widget's status line; Cancel stops it before the next step or tile. Results appear as
layers aligned with the source (see :mod:`._frame`; added by :mod:`._result_layers`):

``<name> HR PCA``
    RGB, full resolution: the first three principal components of the upsampled features.
``<name> LR PCA``
    RGB on the patch grid (the ViT's own resolution), same colours; hidden at first.
``<name> memory``
    Per LR cell, the peak memory (MiB) of the engine tiles that covered it; hidden at first,
    managed by the Memory monitor.

The HR feature array (C x H x W) is kept in memory, or memory-mapped in a temporary file
when large, for the other widgets and for "Save HR features".
"""

from __future__ import annotations

import functools
import weakref
from pathlib import Path
from typing import Optional

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QWidget,
)

from ..core.published import PUBLISHED_STEPS
from ._base import CollapsibleSection, RunWidget, status_label
from ._estimate import format_seconds
from ._frame import Frame, SelectionError, full_res_data, layer_kind
from ._messages import gui_error_message
from ._pickers import LayerPicker
from ._pipeline import (
    PRECISIONS,
    Outcome,
    RunConfig,
    run_pipeline,
    save_hr_features,
    save_kernels,
)
from ._registry import FitResult, get_state, remove_result_layers, result_label, unwrap_viewer
from ._result_layers import add_result_layers
from ._threads import SHUTDOWN_TIMEOUT, BackgroundTask, Runner, call_with_threads, release_memory, threads_spinbox, torch_loaded

#: Short backbone names offered in the combo box (any timm ViT name can be typed).
BACKBONES = (
    "dinov2_vits14",
    "dinov2_vitb14",
    "dinov2_vitl14",
    "dinov2_vitg14",
    "dinov2_vits14_reg",
    "dinov2_vitb14_reg",
    "dinov2_vitl14_reg",
    "dinov2_vitg14_reg",
)
HR_FEATURE_CHOICES = (
    ("keep (in memory; memory-mapped when large)", "auto"),
    ("keep in memory", "memory"),
    ("keep memory-mapped (temporary file)", "memmap"),
    ("don't compute (PCA only)", "none"),
)
#: Milliseconds without an option change before the cost estimate is recomputed.
ESTIMATE_DEBOUNCE_MS = 600


class UpsampleAnythingWidget(RunWidget):
    """The main dock widget (see the module docstring)."""

    def __init__(self, napari_viewer, parent: Optional[QWidget] = None):
        super().__init__(parent)
        self.viewer = napari_viewer = unwrap_viewer(napari_viewer)
        self.state = get_state(napari_viewer)
        self.watch_viewer(napari_viewer)
        self.runner = Runner(napari_viewer, "Upsample Anything", self)
        self.runner.progressed.connect(self._on_progress)
        self.runner.finished.connect(self._on_finished)
        self.runner.finished.connect(self._after_run)
        self._pending: Optional[dict] = None
        self.result: Optional[FitResult] = None  # the latest result of this widget
        self._probe: Optional[BackgroundTask] = None
        self._status_kind, self._status_layer = "hint", None
        self._build()
        self._probe_devices()

    # ------------------------------------------------------------------ UI
    def _build(self) -> None:
        layout = self.body_layout
        form = QFormLayout()
        layout.addLayout(form)

        self.layer_picker = LayerPicker(self.viewer, ("image", "labels"), parent=self)
        self.layer_picker.setToolTip("The image to fit the kernels on (its own layer is never modified)")
        form.addRow("Image layer", self.layer_picker)
        self.layer_info = QLabel("")
        self.layer_info.setWordWrap(True)
        form.addRow("", self.layer_info)

        self.channel_combo = QComboBox()
        self.channel_combo.setToolTip(
            "A leading axis holding the channels of one image (fluorescence channels). Other leading axes are slices (z, t)."
        )
        form.addRow("Channel axis", self.channel_combo)
        self.slices_combo = QComboBox()
        self.slices_combo.addItem("current slice", "current")
        self.slices_combo.addItem("all slices", "all")
        self.slices_combo.setToolTip("For stacks: process the slice shown, or every slice (one kernel field each)")
        form.addRow("Slices", self.slices_combo)

        self.advanced = CollapsibleSection("Advanced")
        self.advanced.setToolTip("Rarely changed options: backbone layer, input size, fit details, memory, threads")
        adv = self.advanced.form
        self.backbone_combo = QComboBox()
        self.backbone_combo.setEditable(True)
        self.backbone_combo.addItems(BACKBONES)
        self.backbone_combo.setToolTip("DINOv2 size (S/B/L/g, _reg = with registers) or any timm ViT name")
        form.addRow("Backbone", self.backbone_combo)
        self.block_spin = QSpinBox()
        self.block_spin.setRange(-64, 63)
        self.block_spin.setValue(-1)
        self.block_spin.setToolTip("Transformer block whose patch tokens are used; -1 = last")
        adv.addRow("Layer", self.block_spin)
        self.input_spin = QSpinBox()
        self.input_spin.setRange(0, 16384)
        self.input_spin.setSingleStep(14)
        self.input_spin.setSpecialValueText("image size")
        self.input_spin.setToolTip("Working resolution of the backbone (long side, pixels); 'image size' = tokens of ~14 px")
        adv.addRow("Input size", self.input_spin)
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(0, 100000)
        self.steps_spin.setValue(PUBLISHED_STEPS)
        self.steps_spin.setToolTip(f"Adam steps of the kernel fit (published: {PUBLISHED_STEPS})")
        form.addRow("Steps", self.steps_spin)
        self.smoothing_spin = QDoubleSpinBox()
        self.smoothing_spin.setRange(0.0, 50.0)
        self.smoothing_spin.setSingleStep(0.5)
        self.smoothing_spin.setDecimals(1)
        self.smoothing_spin.setSuffix(" px")
        self.smoothing_spin.setSpecialValueText("off")
        self.smoothing_spin.setToolTip(
            "Gaussian sigma applied to the image before the kernel fit and render. Off = published. "
            "For noisy images (e.g. 2 px): noise makes the kernels follow the speckle (docs/quality_options.md)"
        )
        adv.addRow("Guide smoothing", self.smoothing_spin)
        self.fit_input_combo = QComboBox()
        self.fit_input_combo.addItem("bicubic (published)", "bicubic")
        self.fit_input_combo.addItem("cell averages", "area")
        self.fit_input_combo.setToolTip(
            "How the fit makes its low-resolution input from the image: published bicubic resize, or the "
            "average of each cell (closer to how a ViT token summarises its patch)"
        )
        adv.addRow("Fit input", self.fit_input_combo)
        self.fraction_spin = QSpinBox()
        self.fraction_spin.setRange(1, 100)
        self.fraction_spin.setValue(100)
        self.fraction_spin.setSuffix(" %")
        self.fraction_spin.setToolTip(
            "Pixels each fit step uses (fresh random cells every step). 100 % = the exact, published fit; "
            "less is a faster, approximate fit (docs/quality_stochastic.md)"
        )
        adv.addRow("Pixels per step", self.fraction_spin)
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cpu"])
        self.device_combo.setToolTip("auto = CUDA, then Apple MPS, then CPU")
        form.addRow("Device", self.device_combo)
        self.precision_combo = QComboBox()
        self.precision_combo.addItems(PRECISIONS)
        self.precision_combo.setToolTip("Aggregation dtype; auto = fp16 on CUDA, fp32 elsewhere")
        adv.addRow("Precision", self.precision_combo)
        self.memory_edit = QLineEdit()
        self.memory_edit.setPlaceholderText("auto  (e.g. 2GB, 512MiB)")
        self.memory_edit.setToolTip("Working-memory budget; auto = 60% of free GPU memory, or 40% of RAM (max 8 GiB) on CPU")
        adv.addRow("Memory budget", self.memory_edit)
        self.threads_spin = threads_spinbox(
            "CPU threads torch uses for this run (default: half the cores). More threads than free cores "
            "make a run much slower on a busy machine (see the user guide)"
        )
        adv.addRow("Threads", self.threads_spin)

        self.random_check = QCheckBox("Random weights (testing only)")
        self.random_check.setToolTip(
            "A randomly initialised backbone: runs offline, but the features and PCA colours are meaningless"
        )
        form.addRow("Weights", self.random_check)
        row = QHBoxLayout()
        self.weights_edit = QLineEdit()
        self.weights_edit.setPlaceholderText("pretrained, from the Hugging Face cache")
        self.weights_edit.setToolTip("A local weights file (.safetensors, .pth, .bin) for the chosen backbone")
        self.weights_button = QPushButton("…")
        self.weights_button.setMaximumWidth(32)
        self.weights_button.clicked.connect(self._browse_weights)
        row.addWidget(self.weights_edit)
        row.addWidget(self.weights_button)
        form.addRow("Weights file", row)
        self.hr_combo = QComboBox()
        for text, value in HR_FEATURE_CHOICES:
            self.hr_combo.addItem(text, value)
        self.hr_combo.setToolTip("The full-resolution feature array (C x H x W), kept for saving and scripting")
        adv.addRow("HR features", self.hr_combo)

        form.addRow(self.advanced)
        self._add_run_row(self.footer_layout, "Run", self.run)
        self.estimate_label = status_label()
        self.estimate_label.setToolTip(
            "Estimated from a quick measurement of the fit and render on a small crop on this machine "
            "(device, precision and threads as set), scaled to the image; model loading not included"
        )
        self.footer_layout.addWidget(self.estimate_label)
        self.status = status_label()
        self.footer_layout.addWidget(self.status)
        saves = QHBoxLayout()
        self.save_features_button = QPushButton("Save HR features…")
        self.save_features_button.clicked.connect(self._save_features_dialog)
        self.save_kernels_button = QPushButton("Save kernels…")
        self.save_kernels_button.clicked.connect(self._save_kernels_dialog)
        for b in (self.save_features_button, self.save_kernels_button):
            b.setEnabled(False)
            saves.addWidget(b)
        layout.addLayout(saves)
        self.remove_button = QPushButton("Remove result layers")
        self.remove_button.setToolTip(
            "Remove every layer of the latest result at once (PCA, memory, kernels, picks, explorer layers); your own layers stay"
        )
        self.remove_button.setEnabled(False)
        self.remove_button.clicked.connect(self.remove_result_layers)
        layout.addWidget(self.remove_button)
        layout.addStretch(1)

        self.layer_picker.layer_changed.connect(self._on_layer_changed)
        self.layer_picker.layers_changed.connect(self._update_status)
        self.channel_combo.currentIndexChanged.connect(self._update_layer_info)
        self._estimate_timer = QTimer(self)
        self._estimate_timer.setSingleShot(True)
        self._estimate_timer.setInterval(ESTIMATE_DEBOUNCE_MS)
        self._estimate_timer.timeout.connect(self.update_estimate)
        self._estimator = BackgroundTask(self)
        self._estimator.done.connect(self._show_estimate)
        self._estimator.failed.connect(self._estimate_failed)
        self.estimate = None  # the latest CostEstimate shown
        self.estimate_key = self._estimating_for = None  # the run (image size, planes, options) it is for
        for signal in (
            self.channel_combo.currentIndexChanged,
            self.slices_combo.currentIndexChanged,
            self.backbone_combo.currentTextChanged,
            self.input_spin.valueChanged,
            self.steps_spin.valueChanged,
            self.fraction_spin.valueChanged,
            self.device_combo.currentTextChanged,
            self.precision_combo.currentTextChanged,
            self.memory_edit.textChanged,
            self.threads_spin.valueChanged,
            self.hr_combo.currentIndexChanged,
        ):
            signal.connect(self._schedule_estimate)
        self._on_layer_changed()

    # ------------------------------------------------------------------ layer choice
    def _on_layer_changed(self, *_args) -> None:
        layer = self.layer_picker.layer()
        self.channel_combo.blockSignals(True)
        self.channel_combo.clear()
        self.channel_combo.addItem("none", None)
        if layer is not None and layer_kind(layer) == "image" and not getattr(layer, "rgb", False):
            shape = full_res_data(layer).shape
            for a in range(len(shape) - 2):
                self.channel_combo.addItem(f"axis {a} ({shape[a]})", a)
        self.channel_combo.setEnabled(self.channel_combo.count() > 1)
        self.channel_combo.blockSignals(False)
        self._update_layer_info()
        self._schedule_estimate()

    def _update_layer_info(self, *_args) -> None:
        layer = self.layer_picker.layer()
        self._update_status()
        if layer is None:
            self.layer_info.setText("no image layer (File > Open Sample > Upsample Anything)")
            self.slices_combo.setEnabled(False)
            return
        try:
            frame = Frame.from_layer(layer, channel_axis=self.channel_combo.currentData())
        except (SelectionError, ValueError) as exc:
            self.layer_info.setText(str(exc).split(";")[0])
            self.slices_combo.setEnabled(False)
            return
        self.layer_info.setText(frame.describe())
        self.slices_combo.setEnabled(frame.is_stack)

    # ------------------------------------------------------------------ status and estimate
    def _update_status(self, *_args) -> None:
        """The idle status line, derived from the current choice (a run's own messages stay until the choice changes)."""
        if self.runner.running or self._cleaned:
            return
        if self._status_kind in ("done", "message") and self.layer_picker.layer() is self._status_layer:
            return
        layer = self.layer_picker.layer()
        if layer is None:
            text = "No image layer: open an image (or File > Open Sample > Upsample Anything)."
        elif layer_kind(layer) != "image":
            text = f"'{layer.name}' is a {layer_kind(layer).capitalize()} layer: pick an Image layer to fit on."
        else:
            text = f"Ready: Run fits '{layer.name}'."
        self.status.setText(text)
        self.status.setToolTip("")
        self._status_kind, self._status_layer = "hint", layer

    def _set_status(self, text: str, kind: str = "message") -> None:
        self.status.setText(text)
        self._status_kind, self._status_layer = kind, self.layer_picker.layer()

    def _after_run(self, outcome: Outcome) -> None:
        if self._cleaned:
            return
        if outcome.status != "done":
            self._status_kind, self._status_layer = "message", self.layer_picker.layer()
        self._schedule_estimate()

    def _schedule_estimate(self, *_args) -> None:
        if not self._cleaned:
            self._estimate_timer.start()

    def _planned_run(self):
        """``(hr_shape, n_planes, config)`` of the run the fields describe, or None when it cannot start."""
        layer = self.layer_picker.layer()
        if layer is None:
            return None
        try:
            frame = Frame.from_layer(
                layer,
                channel_axis=self.channel_combo.currentData(),
                mode=self.slices_combo.currentData() or "current",
                current=self.viewer.dims.point,
            )
            config = self.config()
            config.validate()
        except (SelectionError, ValueError, TypeError, FileNotFoundError):
            return None
        return frame.plane_shape, len(frame.indices), config

    def update_estimate(self) -> None:
        """Recompute the cost estimate in the background (the measurement is cached per device/threads)."""
        if self._cleaned:
            return
        if self.runner.running:  # a measurement now would compete with the run (and its thread setting)
            return
        planned = self._planned_run()
        if planned is None:
            self.estimate_label.setText("")
            self.estimate = None
            return
        hr_shape, n_planes, config = planned
        threads = int(self.threads_spin.value())
        if self.estimate is None:
            self.estimate_label.setText("estimating the cost on this machine…")
        self._estimating_for = _run_key(hr_shape, n_planes, config, threads)
        self._estimator.start(_estimate, hr_shape, n_planes, config, threads)

    def _show_estimate(self, estimate) -> None:
        if self._cleaned:
            return
        self.estimate = estimate
        self.estimate_key = self._estimating_for
        self.estimate_label.setText(f"Estimate: {estimate.text()}")

    def _estimate_failed(self, exc) -> None:
        if self._cleaned:
            return
        self.estimate = None
        self.estimate_label.setText(f"no estimate: {gui_error_message(exc)}")

    def _browse_weights(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Backbone weights", "", "Weights (*.safetensors *.pth *.pt *.bin *.ckpt);;All files (*)"
        )
        if path:
            self.weights_edit.setText(path)
            self.random_check.setChecked(False)

    def _probe_devices(self) -> None:
        """List CUDA / MPS devices in the background (this imports torch off the GUI thread)."""
        self._probe = BackgroundTask(self)
        self._probe.done.connect(self._set_devices)
        self._probe.start(_list_devices)

    def _set_devices(self, devices) -> None:
        current = self.device_combo.currentText()
        self.device_combo.blockSignals(True)
        self.device_combo.clear()
        self.device_combo.addItems(list(devices))
        if current in devices:
            self.device_combo.setCurrentText(current)
        self.device_combo.blockSignals(False)

    # ------------------------------------------------------------------ run
    def config(self) -> RunConfig:
        """The :class:`RunConfig` the fields describe."""
        weights = self.weights_edit.text().strip() or None
        return RunConfig(
            backbone=self.backbone_combo.currentText().strip() or "dinov2_vits14",
            layer=int(self.block_spin.value()),
            steps=int(self.steps_spin.value()),
            device=self.device_combo.currentText(),
            precision=self.precision_combo.currentText(),
            max_memory=self.memory_edit.text().strip() or None,
            pretrained=not self.random_check.isChecked(),
            weights=None if self.random_check.isChecked() else weights,
            input_size=int(self.input_spin.value()) or None,
            hr_features=self.hr_combo.currentData(),
            guide_smoothing=float(self.smoothing_spin.value()),
            fit_downsample=self.fit_input_combo.currentData(),
            fit_fraction=self.fraction_spin.value() / 100.0,
        )

    def run(self) -> bool:
        """Start a run on the selected layer; False (with a notification) when it cannot start."""
        if self.runner.running:
            self._message("info", "A run is already in progress; cancel it first.", self.status)
            return False
        layer = self.layer_picker.layer()
        if layer is None:
            self._message(
                "error",
                "No image layer to work on: open an image (or File > Open Sample > Upsample Anything) and select it.",
                self.status,
            )
            return False
        try:
            frame = Frame.from_layer(
                layer,
                channel_axis=self.channel_combo.currentData(),
                mode=self.slices_combo.currentData() or "current",
                current=self.viewer.dims.point,
            )
            config = self.config()
            config.validate()
        except (SelectionError, ValueError, FileNotFoundError) as exc:
            self._message("error", gui_error_message(exc), self.status)
            self._status_kind, self._status_layer = "error", layer
            return False
        data = full_res_data(layer)
        planes = [(idx, functools.partial(_plane_copy, frame, data, idx)) for idx in frame.indices]
        threads = int(self.threads_spin.value())
        key = _run_key(frame.plane_shape, len(frame.indices), config, threads)
        self._pending = {
            "frame": frame,
            "source_ref": weakref.ref(layer),
            "source_id": str(layer.unique_id),
            "config": config,
            # shown next to the measured time, when it was made for exactly this run
            "estimate": self.estimate if self.estimate is not None and self.estimate_key == key else None,
        }
        self._estimate_timer.stop()
        self._estimator.cancel()  # a measurement now would compete with the run for the CPU
        if self.estimate is None:  # the cancelled one will not arrive; a new one follows the run
            self.estimate_label.setText("")
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self._set_status(f"starting on '{layer.name}' ({frame.describe()})…", "running")
        self.runner.start(
            _run_planes,
            planes,
            config,
            channel_axis=frame.feature_channel_axis,
            device=config.device,
            budget=config.budget,
            threads=threads,
            desc=f"Upsample Anything: {layer.name}",
        )
        return True

    cancelled_text = "Upsample Anything: cancelled; no layer was changed."

    def _publish(self, outcome: Outcome, pending: dict) -> None:
        pipeline = outcome.value
        frame: Frame = pending["frame"]
        owner = f"source:{pending['source_id']}"
        old = self.state.result_for_source(pending["source_id"])
        key = self.state.new_key()
        result = FitResult(
            key=key,
            frame=frame,
            pipeline=pipeline,
            source_id=pending["source_id"],
            source_ref=pending["source_ref"],
            owner=owner,
        )
        result.label = result_label(result)
        with self.state.keep_results():
            add_result_layers(self.viewer, result)
        if old is not None:
            self.state.drop_result(old.key)
        self.state.add_result(result)
        self.result = result
        p0 = pipeline.planes[0]
        psnr = p0.field.meta.get("psnr")
        random = " — random weights: the PCA colours are meaningless" if pipeline.weights_source == "random-init" else ""
        estimate = pending.get("estimate")
        told = f" (estimated {format_seconds(estimate.total_seconds)})" if estimate is not None else ""
        self._set_status(
            f"done in {outcome.seconds:.1f} s{told}: {len(pipeline.planes)} plane(s), LR {p0.lr_shape[0]} x {p0.lr_shape[1]}"
            f" -> HR {p0.hr_shape[0]} x {p0.hr_shape[1]}, {p0.features.shape[0]} channels"
            + (f", fit PSNR {psnr:.1f} dB" if psnr is not None else "")
            + random,
            "done",
        )
        self.save_features_button.setEnabled(p0.hr_features is not None)
        self.save_kernels_button.setEnabled(True)
        self.remove_button.setEnabled(True)

    def remove_result_layers(self) -> int:
        """Remove all layers of the latest result (and the result itself); returns how many layers went."""
        if self.result is None:
            return 0
        n = remove_result_layers(self.viewer, self.result.key)
        self.result = None
        for b in (self.save_features_button, self.save_kernels_button, self.remove_button):
            b.setEnabled(False)
        self._set_status(f"Removed {n} result layers; Run fits the image again.")
        return n

    # ------------------------------------------------------------------ saving
    def save_hr_features(self, path) -> Path:
        """Write the latest result's HR features to ``path`` (``.npy``)."""
        if self.result is None:
            raise ValueError("nothing to save yet: run first")
        return save_hr_features(
            self.result.pipeline, path, self.result.frame.leading_shape() if len(self.result.planes) > 1 else ()
        )

    def save_kernels(self, path):
        """Write the latest result's kernel field(s) to ``path`` (``.npz``)."""
        if self.result is None:
            raise ValueError("nothing to save yet: run first")
        return save_kernels(self.result.pipeline, path)

    def _save_features_dialog(self) -> None:
        self._save_dialog("features")

    def _save_kernels_dialog(self) -> None:
        self._save_dialog("kernels")

    def _save_dialog(self, what: str) -> None:
        if self.result is None:
            return
        name = self.result.name.replace(" ", "_")
        if what == "features":
            path, _ = QFileDialog.getSaveFileName(self, "Save HR features", f"{name}_hr_features.npy", "NumPy array (*.npy)")
        else:
            path, _ = QFileDialog.getSaveFileName(self, "Save kernels", f"{name}_kernels.npz", "Kernel field (*.npz)")
        if not path:
            return
        try:
            out = self.save_hr_features(path) if what == "features" else self.save_kernels(path)
        except (OSError, ValueError) as exc:
            self._message("error", f"Could not save: {exc}", self.status)
            return
        self._message("info", f"Saved {out if not isinstance(out, list) else ', '.join(map(str, out))}", self.status)

    # ------------------------------------------------------------------ cleanup
    def cleanup(self) -> None:
        """Stop the computation (within one step), drop cached models, free device memory."""
        if self._probe is not None:  # its thread touches no Qt object: no need to wait for torch's import
            self._probe.shutdown()
        self._estimate_timer.stop()
        self._estimator.shutdown(timeout=SHUTDOWN_TIMEOUT)
        self.runner.shutdown()
        if torch_loaded():
            try:
                from ..core.features import clear_model_cache

                clear_model_cache()
            except Exception:  # noqa: BLE001 - never fail while closing
                pass
        release_memory()


def _estimate(hr_shape, n_planes, config, threads, cancel=None):
    """The :class:`._estimate.CostEstimate` of a run (measuring this machine first when needed)."""
    from ..core.units import parse_bytes
    from ._estimate import estimate_run, measure_rates
    from ._pipeline import AUTO_IN_MEMORY_BYTES

    rates = call_with_threads(threads, measure_rates, config.device, config.precision, threads, cancel)
    budget = parse_bytes(config.budget, "memory budget") if config.budget else None
    return estimate_run(
        rates,
        hr_shape,
        n_planes=n_planes,
        backbone=config.backbone,
        input_size=config.input_size,
        steps=config.steps,
        fit_fraction=config.fit_fraction,
        hr_features=config.hr_features,
        budget_bytes=budget,
        auto_in_memory_bytes=AUTO_IN_MEMORY_BYTES,
        threads=threads,
    )


def _run_key(hr_shape, n_planes, config, threads) -> tuple:
    """What an estimate depends on: the image plane, the plane count, the options, the threads."""
    return (tuple(hr_shape), int(n_planes), repr(config), int(threads))


def _list_devices(cancel=None):
    from ._pipeline import available_devices

    return available_devices()


def _plane_copy(frame: Frame, data, index):
    """A copy of one plane (so later edits of the layer data do not change the fitted guide)."""
    return np.array(frame.plane(data, index), copy=True)


def _run_planes(planes, config, *, channel_axis=None, progress=None, cancel=None):
    """:func:`run_pipeline` on lazily read planes (read in the worker thread, not the GUI's)."""
    ready = [(idx, img() if callable(img) else img) for idx, img in planes]
    return run_pipeline(ready, config, channel_axis=channel_axis, progress=progress, cancel=cancel)


__all__ = ["UpsampleAnythingWidget", "add_result_layers", "BACKBONES"]
