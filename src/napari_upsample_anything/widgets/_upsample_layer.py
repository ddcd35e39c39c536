"""**Upsample a layer with fitted kernels**: the "upsample anything" part of the method.

Any low-resolution map that covers the fitted image -- a probability map, a depth map, a
multi-channel prediction, or a Labels layer -- is upsampled to the image's full resolution
with the kernels fitted on that image (:func:`._pipeline.upsample_planes`).

* **Image layers**: every value is upsampled. Leading axes are channels (``(C, h, w)``),
  an RGB layer's colours too; for a result fitted on all slices of a stack, the map must
  carry the same slice axes right before ``(h, w)`` (e.g. ``(Z, h, w)``).
* **Labels layers**: one-hot encoded (one channel per label value), upsampled, and turned
  back into labels by argmax: ``<name> upsampled`` (Labels), plus optionally the class
  probabilities ``<name> upsampled probabilities`` (an image with one leading class axis).

The map is taken to cover the whole image: LR cell ``(i, j)`` of an ``h x w`` map is the
image region ``[i H/h, (i+1) H/h) x [j W/w, (j+1) W/w)``, whatever the layer's own scale.
If its grid is not the fitted one (the ViT patch grid), kernels are fitted for its grid on
the same image first (same number of steps; kept for the next time). Outputs are aligned
with the fitted image's HR layers.
"""

from __future__ import annotations

import weakref
from typing import List, Optional, Tuple

import numpy as np
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QLabel,
    QLineEdit,
    QMessageBox,
    QWidget,
)

from ._base import RunWidget, status_label
from ._frame import full_res_data, layer_kind
from ._messages import gui_error_message
from ._pickers import LayerPicker, ResultPicker
from ._pipeline import (
    Outcome,
    UpsampleRequest,
    upsample_planes,
)
from ._registry import FitResult, get_state, put_layer, unwrap_viewer
from ._threads import BackgroundTask, Runner, call_with_threads, threads_spinbox

MAX_CHANNELS = 4096
#: A refit estimated to take longer than this (seconds) asks for confirmation first.
CONFIRM_FIT_SECONDS = 60.0


class InputError(ValueError):
    """The chosen LR layer does not fit the chosen result (the message says why)."""


def prepare_maps(layer, result: FitResult) -> Tuple[List[np.ndarray], dict]:
    """Per-plane LR maps for ``result`` from an Image or Labels layer, and how to rebuild the output.

    Returns ``(maps, info)``: ``maps[k]`` is ``(C, h, w)`` float (image) or ``(h, w)`` int
    (labels) for ``result.planes[k]``; ``info`` has ``labels``, ``rgb``, ``chan_shape`` and
    the layer's scale/translate of the channel axes.
    """
    kind = layer_kind(layer)
    if kind not in ("image", "labels"):
        raise InputError(f"Layer '{layer.name}' is a {kind} layer; pick an Image (values) or Labels layer.")
    data = full_res_data(layer)
    rgb = bool(getattr(layer, "rgb", False))
    arr = data
    shape = tuple(int(n) for n in arr.shape)
    if rgb:
        shape = shape[:-1]
    if len(shape) < 2:
        raise InputError(f"Layer '{layer.name}' has shape {shape}; a map needs at least 2 dimensions (h, w).")
    frame = result.frame
    multi = len(result.planes) > 1
    S = frame.slice_shape if multi else ()
    lead = shape[:-2]
    if multi:
        if len(lead) < len(S) or tuple(lead[len(lead) - len(S) :]) != tuple(S):
            raise InputError(
                f"'{result.label}' was fitted on {len(result.planes)} slices (slice axes of size {S}); "
                f"layer '{layer.name}' of shape {shape} must end with those axes then (h, w), e.g. {S + ('h', 'w')}."
            )
        chan = lead[: len(lead) - len(S)]
    else:
        chan = lead
    labels = kind == "labels"
    if labels and chan:
        raise InputError(
            f"Labels layer '{layer.name}' has shape {shape}; use a 2D labels map (h, w)"
            + (f" or one with the stack's slice axes {S}" if multi else "")
            + "."
        )
    if rgb and chan:
        raise InputError(f"RGB layer '{layer.name}' of shape {shape} has extra axes; use a 2D RGB map.")
    C = int(np.prod(chan)) if chan else (shape_rgb(data) if rgb else 1)
    if C > MAX_CHANNELS:
        raise InputError(f"Layer '{layer.name}' has {C} channels; at most {MAX_CHANNELS} are upsampled at once.")
    H, W = result.planes[0].hr_shape
    h, w = shape[-2:]
    if h > H or w > W:
        raise InputError(
            f"Layer '{layer.name}' is {h} x {w}, larger than the fitted image ({H} x {W}): it is not a low-resolution map of it."
        )
    maps: List[np.ndarray] = []
    for plane in result.planes:
        key = tuple([slice(None)] * len(chan)) + (tuple(plane.index) if multi else ())
        m = np.asarray(arr[key]) if key else np.asarray(arr)
        if labels:
            maps.append(np.asarray(m))
        elif rgb:
            maps.append(np.moveaxis(m, -1, 0).astype(np.float32))
        else:
            maps.append(m.reshape((C, h, w)).astype(np.float32))
    scale = tuple(float(s) for s in layer.scale)
    translate = tuple(float(t) for t in layer.translate)
    info = {
        "labels": labels,
        "rgb": rgb,
        "chan_shape": tuple(chan),
        "chan_scale": scale[: len(chan)],
        "chan_translate": translate[: len(chan)],
        "grid": (h, w),
        "dtype": np.dtype(getattr(arr, "dtype", np.int32)) if labels else np.dtype(np.float32),
    }
    return maps, info


def shape_rgb(data) -> int:
    return int(data.shape[-1])


def assemble(result: FitResult, per_plane: List[np.ndarray], chan_shape: Tuple[int, ...] = ()) -> np.ndarray:
    """Stack per-plane outputs ``(C, H, W)`` (or ``(H, W)``) into ``chan + leading + (H, W)``."""
    frame = result.frame
    lead = frame.leading_shape()
    H, W = result.planes[0].hr_shape
    out = np.zeros(tuple(chan_shape) + lead + (H, W), dtype=per_plane[0].dtype)
    nchan = len(chan_shape)
    for plane, arr in zip(result.planes, per_plane):
        pos = frame.position(plane.index)
        out[(slice(None),) * nchan + pos] = arr.reshape(tuple(chan_shape) + (H, W))
    return out


def output_transform(result: FitResult, chan_scale=(), chan_translate=()) -> dict:
    t = result.frame.transform()
    return {
        "scale": tuple(chan_scale) + tuple(t["scale"]),
        "translate": tuple(chan_translate) + tuple(t["translate"]),
    }


class UpsampleLayerWidget(RunWidget):
    """The upsample-a-layer dock widget (see the module docstring)."""

    #: Ask before a refit estimated to take longer than :data:`CONFIRM_FIT_SECONDS` (tests switch it off).
    confirm_slow_fit = True

    def __init__(self, napari_viewer, parent: Optional[QWidget] = None):
        super().__init__(parent)
        self.viewer = napari_viewer = unwrap_viewer(napari_viewer)
        self.state = get_state(napari_viewer)
        self.watch_viewer(napari_viewer)
        self.runner = Runner(napari_viewer, "Upsample layer", self)
        self.runner.progressed.connect(self._on_progress)
        self.runner.finished.connect(self._on_finished)
        self.runner.finished.connect(self._after_run)
        self._pending: Optional[dict] = None
        self.outputs: dict = {}
        self._status_kind, self._status_layer = "hint", None
        self._rates_task = BackgroundTask(self)  # measures this machine when a refit's cost is to be told
        self._rates_task.done.connect(self._update_info)
        self._build()

    def _build(self) -> None:
        layout = self.body_layout
        form = QFormLayout()
        layout.addLayout(form)
        self.layer_picker = LayerPicker(self.viewer, ("image", "labels"), parent=self)
        self.layer_picker.setToolTip("The low-resolution map to upsample (it is never modified)")
        form.addRow("Low-res layer", self.layer_picker)
        self.result_picker = ResultPicker(self.viewer)
        self.result_picker.setToolTip("The image whose fitted kernels are used")
        form.addRow("Kernels of", self.result_picker)
        self.info_label = QLabel("")
        self.info_label.setWordWrap(True)
        form.addRow("", self.info_label)
        self.prob_check = QCheckBox("Labels: also add class probabilities")
        self.prob_check.setToolTip("One image with a leading class axis (adds a slider to a 2D viewer)")
        self.prob_check.setChecked(False)
        form.addRow(self.prob_check)
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cpu", "cuda", "mps"])
        form.addRow("Device", self.device_combo)
        self.memory_edit = QLineEdit()
        self.memory_edit.setPlaceholderText("auto  (e.g. 2GB)")
        form.addRow("Memory budget", self.memory_edit)
        self.threads_spin = threads_spinbox("CPU threads torch uses for this run (default: half the cores)")
        form.addRow("Threads", self.threads_spin)
        self._add_run_row(self.footer_layout, "Upsample", self.run)
        self.status = status_label()
        self.footer_layout.addWidget(self.status)
        layout.addStretch(1)
        self.layer_picker.layer_changed.connect(self._update_info)
        self.layer_picker.layers_changed.connect(self._update_info)
        self.result_picker.currentIndexChanged.connect(self._update_info)
        self.threads_spin.valueChanged.connect(self._update_info)
        self._update_info()

    def _after_run(self, outcome: Outcome) -> None:
        if outcome.status != "done":  # an error or a cancel: replaced once the choice changes
            self._status_kind, self._status_layer = "error", self.layer_picker.layer()

    def _needs_refit(self, layer, result) -> bool:
        """True when the layer's grid is not one the result has kernels for (a fit comes first)."""
        shape = tuple(full_res_data(layer).shape)
        if getattr(layer, "rgb", False):
            shape = shape[:-1]
        grid = tuple(int(n) for n in shape[-2:])
        plane = result.planes[0]
        return grid != tuple(plane.lr_shape) and grid not in plane.extra_fields

    def refit_seconds(self, layer, result, measure: bool = False) -> Optional[float]:
        """Estimated seconds of the refit this layer needs (0 when none); None when not measured yet.

        ``measure`` runs the quick measurement now (a few seconds, once per device/threads).
        """
        if not self._needs_refit(layer, result):
            return 0.0
        from ._estimate import cached_rates, estimate_fit, measure_rates

        device, precision = self.device_combo.currentText(), result.pipeline.config.precision
        threads = int(self.threads_spin.value())
        rates = cached_rates(device, precision, threads)
        if rates is None and measure:
            rates = call_with_threads(threads, measure_rates, device, precision, threads)
        if rates is None:
            return None
        steps = int(result.pipeline.config.steps)
        return len(result.planes) * estimate_fit(rates, result.planes[0].hr_shape, steps)

    def _update_info(self, *_args) -> None:
        layer, result = self.layer_picker.layer(), self.result_picker.result()
        if not self.runner.running and not self._cleaned:  # the status line follows the current choice
            if self._status_kind == "error" or (self._status_kind == "done" and layer is not self._status_layer):
                self.status.setText("")
                self.status.setToolTip("")
                self._status_kind = "hint"
        if layer is None or result is None:
            self.info_label.setText(
                "no fitted image yet: run 'Upsample Anything' on the image first"
                if result is None
                else "no low-resolution layer: add an Image or Labels layer to upsample"
            )
            return
        try:
            maps, info = prepare_maps(layer, result)
        except (InputError, ValueError) as exc:
            self.info_label.setText(str(exc))
            return
        h, w = info["grid"]
        H, W = result.planes[0].hr_shape
        what = "labels (one-hot)" if info["labels"] else f"{maps[0].shape[0]} channel(s)"
        refit = ""
        if self._needs_refit(layer, result):
            seconds = self.refit_seconds(layer, result)
            from ._estimate import format_seconds

            if seconds is None and not self._rates_task.running:  # measure in the background, then update this line
                device, precision = self.device_combo.currentText(), result.pipeline.config.precision
                threads = int(self.threads_spin.value())
                self._rates_task.start(_measure, device, precision, threads)
            cost = f" (about {format_seconds(seconds)})" if seconds is not None else " (estimating the time…)"
            refit = f"; kernels will be fitted for this grid first{cost}"
        self.info_label.setText(f"{what}, {h} x {w} -> {H} x {W}{refit}")

    def _confirm_refit(self, layer, result) -> bool:
        """Ask before a long refit (estimated > :data:`CONFIRM_FIT_SECONDS`); True to go on."""
        if not self.confirm_slow_fit or not self._needs_refit(layer, result):
            return True
        try:
            seconds = self.refit_seconds(layer, result, measure=True)
        except Exception:  # noqa: BLE001 - no estimate is no reason to refuse the run
            return True
        if seconds is None or seconds <= CONFIRM_FIT_SECONDS:
            return True
        from ._estimate import format_seconds

        h, w = (int(n) for n in full_res_data(layer).shape[-2:])
        answer = QMessageBox.question(
            self,
            "Fit kernels for another grid?",
            f"'{layer.name}' is on a {h} x {w} grid; the kernels of '{result.label}' were fitted for "
            f"{result.planes[0].lr_shape[0]} x {result.planes[0].lr_shape[1]}. Upsampling it fits new kernels first "
            f"({result.pipeline.config.steps} steps), estimated at {format_seconds(seconds)} on this machine. Go on?",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
            QMessageBox.StandardButton.No,
        )
        return answer == QMessageBox.StandardButton.Yes

    def run(self) -> bool:
        """Start upsampling; False (with a notification) when the selection does not work."""
        if self.runner.running:
            self._message("info", "An upsampling is already running; cancel it first.", self.status)
            return False
        layer = self.layer_picker.layer()
        result = self.result_picker.result()
        self._status_kind, self._status_layer = "error", layer
        if layer is None:
            self._message("error", "No low-resolution layer: add an Image or Labels layer to upsample.", self.status)
            return False
        if result is None:
            self._message("error", "No fitted image yet: run 'Upsample Anything' on the image first.", self.status)
            return False
        try:
            maps, info = prepare_maps(layer, result)
        except (InputError, ValueError) as exc:
            self._message("error", gui_error_message(exc), self.status)
            return False
        if not self._confirm_refit(layer, result):
            self._message("info", "Not upsampled: the fit for the layer's grid was declined.", self.status)
            return False
        request = UpsampleRequest(
            maps=maps,
            planes=list(result.planes),
            labels=info["labels"],
            device=self.device_combo.currentText(),
            precision=result.pipeline.config.precision,
            max_memory=self.memory_edit.text().strip() or None,
            refit_steps=int(result.pipeline.config.steps),
        )
        self._pending = {
            "layer_ref": weakref.ref(layer),
            "name": layer.name,
            "uid": str(layer.unique_id),
            "result": result,
            "info": info,
        }
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.status.setText(f"upsampling '{layer.name}'…")
        self._status_kind = "running"
        self.runner.start(
            upsample_planes,
            request,
            device=request.device,
            budget=request.max_memory,
            threads=int(self.threads_spin.value()),
            desc=f"Upsample {layer.name}",
        )
        return True

    cancelled_text = "Upsampling cancelled; no layer was changed."

    def _publish(self, outcome: Outcome, pending: dict) -> None:
        self._add_outputs(outcome.value, pending)
        self.status.setText(f"done in {outcome.seconds:.1f} s")
        self._status_kind, self._status_layer = "done", self.layer_picker.layer()

    def _add_outputs(self, outputs: List[dict], pending: dict) -> None:
        result: FitResult = pending["result"]
        info = pending["info"]
        name = pending["name"]
        owner = f"lr:{pending['uid']}"
        tag = {"source_map": name, "fitted": result.label}
        self.outputs = {}
        with self.state.keep_results():
            if info["labels"]:
                labels = assemble(result, [o["labels"] for o in outputs])
                layer = put_layer(
                    self.viewer,
                    labels.astype(info["dtype"], copy=False),
                    "labels",
                    name=f"{name} upsampled",
                    role="upsampled",
                    owner=owner,
                    result=result.key,
                    extra_tag=tag,
                    **result.frame.transform(),
                )
                self.outputs["labels"] = layer
                if self.prob_check.isChecked():
                    K = outputs[0]["probabilities"].shape[0]
                    probs = assemble(result, [o["probabilities"] for o in outputs], (K,))
                    player = put_layer(
                        self.viewer,
                        probs,
                        "image",
                        name=f"{name} upsampled probabilities",
                        role="upsampled_probabilities",
                        owner=owner,
                        result=result.key,
                        colormap="magma",
                        visible=False,
                        contrast_limits=(0.0, 1.0),
                        extra_tag=dict(tag, classes=[int(c) for c in outputs[0]["classes"]]),
                        **output_transform(result, (1.0,), (0.0,)),
                    )
                    self.outputs["probabilities"] = player
            else:
                values = [o["values"] for o in outputs]
                if info["rgb"]:
                    data = result.frame.stack([np.moveaxis(v, 0, -1) for v in values])
                    layer = put_layer(
                        self.viewer,
                        data,
                        "image",
                        name=f"{name} upsampled",
                        role="upsampled",
                        owner=owner,
                        result=result.key,
                        rgb=True,
                        extra_tag=tag,
                        **result.frame.transform(),
                    )
                else:
                    data = assemble(result, values, info["chan_shape"])
                    src = pending["layer_ref"]()
                    kwargs = {}
                    if src is not None and layer_kind(src) == "image":
                        kwargs["colormap"] = src.colormap.name
                        kwargs["contrast_limits"] = tuple(src.contrast_limits)
                    layer = put_layer(
                        self.viewer,
                        data,
                        "image",
                        name=f"{name} upsampled",
                        role="upsampled",
                        owner=owner,
                        result=result.key,
                        extra_tag=tag,
                        **output_transform(result, info["chan_scale"], info["chan_translate"]),
                        **kwargs,
                    )
                self.outputs["values"] = layer

    def cleanup(self) -> None:
        self._rates_task.shutdown(timeout=60.0)
        self.runner.shutdown()


def _measure(device, precision, threads, cancel=None):
    from ._estimate import measure_rates

    return call_with_threads(threads, measure_rates, device, precision, threads, cancel)
