"""**Kernel inspector** dock widget: the fitted kernels, and where a pixel's value comes from.

Kernels
-------
One ellipse per LR cell: centred on the cell centre, semi-axes ``n * sigma_x`` and
``n * sigma_y`` (HR pixels) along the kernel's own axes, rotated by ``theta``; coloured by
``sigma_r`` (the range sigma: small = the kernel follows edges of the guide strictly), the
anisotropy ``max(sigma) / min(sigma)``, a sigma, or theta. Drawn into ``<name> kernels`` as

* **vectors** (default): every kernel's outline as line segments of one Vectors layer (fast
  for tens of thousands of kernels; the stride is raised automatically past 200 000);
  outlines are clipped to the image, the only place where a kernel has weight;
* **shapes**: a regular subsample of at most 2 000 kernels as Shapes polygons (selectable,
  with their parameters in the layer's features table);
* **raster**: outlines drawn into an HR image whose pixels hold the colour value.

"Parameter map" shows one kernel parameter on the LR grid (``<name> <parameter>``).

Pixel weights
-------------
With "Pick a pixel" on, a click on the canvas computes the effective upsampling weights of
the HR pixel under the mouse over the LR grid (:func:`core.render.pixel_weight_map`): the
upsampled value of *any* LR map at that pixel is the weighted sum of the LR values with
these weights, which sum to one. They appear as ``<name> pixel weights`` (LR grid), the
kernels carrying 99 % of the weight as ``<name> contributing kernels`` (outlines coloured by
weight) and the pixel as ``<name> picked pixel``.
"""

from __future__ import annotations

import weakref
from typing import Optional, Sequence

import numpy as np
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ._base import PluginWidget, status_label
from ._kernels import (
    COLOR_BY,
    MAX_SHAPES,
    MAX_VECTOR_KERNELS,
    PARAMETER_MAPS,
    STYLES,
    cell_segments,
    clear_engine_cache,
    color_limits,
    contributing_cells,
    kernel_stride,
    lift,
    parameter_map,
    pixel_weights,
    plane_positions,
    raster_plane,
    shapes_data,
    vectors_data,
)
from ._pickers import ResultPicker
from ._registry import FitResult, get_state, put_layer, remove_own_layer, unwrap_viewer, update_layer

STYLE_LABELS = {
    "vectors": "vectors (all kernels)",
    "shapes": f"shapes (at most {MAX_SHAPES})",
    "raster": "raster image",
}
COLORMAPS = {"theta": "twilight", "anisotropy": "plasma"}
#: The default stride draws at most about this many kernels (more is an unreadable tangle).
DEFAULT_DRAWN_KERNELS = 1000


class KernelInspectorWidget(PluginWidget):
    """The kernel inspector dock widget (see the module docstring)."""

    def __init__(self, napari_viewer, parent: Optional[QWidget] = None):
        super().__init__(parent)
        self.viewer = napari_viewer = unwrap_viewer(napari_viewer)
        self.state = get_state(napari_viewer)
        self.watch_viewer(napari_viewer)
        self.last_weights: Optional[np.ndarray] = None
        self.last_pixel = None
        self.last_cells: Optional[np.ndarray] = None
        self._picking = False
        self._build()

    def _build(self) -> None:
        layout = self.body_layout
        form = QFormLayout()
        layout.addLayout(form)
        self.result_picker = ResultPicker(self.viewer)
        form.addRow("Fitted image", self.result_picker)

        box = QGroupBox("Kernels")
        kform = QFormLayout(box)
        self.sigma_spin = QDoubleSpinBox()
        self.sigma_spin.setRange(0.25, 5.0)
        self.sigma_spin.setSingleStep(0.25)
        self.sigma_spin.setValue(1.0)
        self.sigma_spin.setToolTip("Ellipse size in standard deviations (1 = the 1-sigma contour)")
        kform.addRow("Sigmas", self.sigma_spin)
        self.color_combo = QComboBox()
        self.color_combo.addItems(COLOR_BY)
        kform.addRow("Colour by", self.color_combo)
        self.style_combo = QComboBox()
        for s in STYLES:
            self.style_combo.addItem(STYLE_LABELS[s], s)
        kform.addRow("Draw as", self.style_combo)
        self.stride_spin = QSpinBox()
        self.stride_spin.setRange(1, 256)
        self.stride_spin.setValue(1)
        self.stride_spin.setToolTip(
            f"Draw every n-th kernel along each axis (set for at most about {DEFAULT_DRAWN_KERNELS} kernels "
            "when a fitted image is chosen)"
        )
        kform.addRow("Stride", self.stride_spin)
        self.draw_button = QPushButton("Draw kernels")
        self.draw_button.clicked.connect(self.draw_kernels)
        kform.addRow(self.draw_button)
        row = QHBoxLayout()
        self.param_combo = QComboBox()
        self.param_combo.addItems(PARAMETER_MAPS)
        self.param_button = QPushButton("Show map")
        self.param_button.clicked.connect(self._show_parameter_map_clicked)
        row.addWidget(self.param_combo)
        row.addWidget(self.param_button)
        kform.addRow("Parameter map", row)
        layout.addWidget(box)

        box2 = QGroupBox("Pixel weights")
        pform = QVBoxLayout(box2)
        self.pick_check = QCheckBox("Pick a pixel: click on the image")
        self.pick_check.setToolTip(
            "Shows the clicked pixel's upsampling weights over the LR grid and the kernels that contribute"
        )
        self.pick_check.toggled.connect(self.set_picking)
        pform.addWidget(self.pick_check)
        self.pixel_label = QLabel("")
        self.pixel_label.setWordWrap(True)
        pform.addWidget(self.pixel_label)
        layout.addWidget(box2)
        self.status = status_label()
        self.footer_layout.addWidget(self.status)
        layout.addStretch(1)
        self._stride_for = None
        self.result_picker.currentIndexChanged.connect(self._default_stride)
        self._default_stride()

    def _default_stride(self, *_args) -> None:
        """A new fitted image: the stride that draws at most about :data:`DEFAULT_DRAWN_KERNELS` kernels."""
        result = self.result_picker.result()
        key = result.key if result is not None else None
        if key == self._stride_for:
            return
        self._stride_for = key
        if result is not None:
            self.stride_spin.setValue(kernel_stride(result.planes, DEFAULT_DRAWN_KERNELS))

    # ------------------------------------------------------------------ helpers
    def _result(self) -> Optional[FitResult]:
        result = self.result_picker.result()
        if result is None:
            self._message("error", "No fitted image yet: run 'Upsample Anything' on an image first.", self.status)
        return result

    # ------------------------------------------------------------------ kernels
    def draw_kernels(self):
        """Draw ``<name> kernels`` with the chosen style, size, colour and stride; returns the layer."""
        result = self._result()
        if result is None:
            return None
        frame, planes = result.frame, result.planes
        n_sigma = float(self.sigma_spin.value())
        color_by = self.color_combo.currentText()
        style = self.style_combo.currentData()
        stride = max(int(self.stride_spin.value()), kernel_stride(planes, MAX_VECTOR_KERNELS))
        H = planes[0].hr_shape[0]
        common = dict(owner=result.owner, result=result.key, name=f"{result.name} kernels", role="kernels", **frame.transform())
        tag = {"n_sigma": n_sigma, "color_by": color_by, "style": style, "stride": stride}
        cmap = COLORMAPS.get(color_by, "viridis")
        with self.state.keep_results():
            if style == "vectors":
                data, feats, count = vectors_data(frame, plane_positions(frame, planes), n_sigma=n_sigma, stride=stride)
                layer = put_layer(
                    self.viewer,
                    data,
                    "vectors",
                    features=feats,
                    edge_color=color_by,
                    edge_colormap=cmap,
                    edge_contrast_limits=color_limits(feats[color_by]),
                    edge_width=max(0.5, H / 800),
                    vector_style="line",
                    opacity=0.9,
                    extra_tag=dict(tag, count=count),
                    **common,
                )
            elif style == "shapes":
                polys, feats = shapes_data(frame, plane_positions(frame, planes), n_sigma=n_sigma, max_count=MAX_SHAPES)
                count = len(polys)
                layer = put_layer(
                    self.viewer,
                    polys,
                    "shapes",
                    shape_type="polygon",
                    features=feats,
                    edge_color=color_by,
                    edge_colormap=cmap,
                    face_color="transparent",
                    edge_width=max(0.5, H / 500),
                    opacity=0.9,
                    extra_tag=dict(tag, count=count),
                    **common,
                )
                layer.refresh_colors()
            else:
                imgs = [raster_plane(p, color_by, n_sigma, stride) for p in planes]
                count = sum((p.lr_shape[0] + stride - 1) // stride * ((p.lr_shape[1] + stride - 1) // stride) for p in planes)
                vals = np.concatenate([i[i != 0] for i in imgs]) if imgs else np.zeros(1)
                layer = put_layer(
                    self.viewer,
                    frame.stack(imgs),
                    "image",
                    colormap=cmap,
                    blending="additive",
                    contrast_limits=color_limits(vals),
                    extra_tag=dict(tag, count=count),
                    **common,
                )
        layer.visible = True
        result.layers["kernels"] = weakref.ref(layer)
        self.status.setText(
            f"{count} kernels drawn as {style} at {n_sigma:g} sigma, coloured by {color_by}"
            + (f" (stride {stride})" if stride > 1 else "")
        )
        return layer

    def _show_parameter_map_clicked(self) -> None:
        self.show_parameter_map(self.param_combo.currentText())

    def show_parameter_map(self, name: str):
        """``<name> <parameter>``: one kernel parameter on the LR grid."""
        result = self._result()
        if result is None:
            return None
        frame, planes = result.frame, result.planes
        maps = [parameter_map(p, name) for p in planes]
        data = frame.stack(maps)
        with self.state.keep_results():
            layer = put_layer(
                self.viewer,
                data,
                "image",
                name=f"{result.name} {name}",
                role="parameter_map",
                owner=result.owner,
                result=result.key,
                colormap=COLORMAPS.get(name, "viridis"),
                contrast_limits=color_limits(data),
                extra_tag={"parameter": name},
                **frame.transform(planes[0].factor),
            )
        result.layers["parameter_map"] = weakref.ref(layer)
        return layer

    # ------------------------------------------------------------------ picking
    def set_picking(self, on: bool) -> None:
        callbacks = self.viewer.mouse_drag_callbacks
        if on and not self._picking:
            callbacks.append(self._on_click)
            self._picking = True
        elif not on and self._picking:
            if self._on_click in callbacks:
                callbacks.remove(self._on_click)
            self._picking = False
        if self.pick_check.isChecked() != on:
            self.pick_check.setChecked(on)

    def _on_click(self, viewer, event) -> None:
        if getattr(event, "type", "mouse_press") != "mouse_press":
            return
        try:
            self.inspect_pixel(event.position)
        except RuntimeError:  # the widget is being deleted
            pass

    def inspect_pixel(self, world_point: Sequence[float]) -> Optional[np.ndarray]:
        """Weights of the HR pixel under a world point; adds / replaces the three pixel layers.

        Returns the ``(h, w)`` weights (they sum to one), or None when the point is off the image.
        """
        result = self._result()
        if result is None:
            return None
        frame = result.frame
        _, y, x, inside = frame.pixel_at(world_point)
        if not inside:
            self.pixel_label.setText("Click inside the image.")
            return None
        try:
            plane = result.plane_at_world(world_point)
        except KeyError as exc:
            self._message("warning", str(exc), self.status)
            return None
        try:
            self._show_pixel(result, plane, y, x)
        except Exception as exc:  # noqa: BLE001 - a failed pick is reported, never raised into napari
            self.clear_pixel_layers()
            self.last_weights = self.last_pixel = self.last_cells = None
            self.pixel_label.setText("")
            self._message(
                "error",
                f"Pick another pixel: the weights of pixel (y {y}, x {x}) could not be shown ({type(exc).__name__}: {exc}).",
                self.status,
            )
            return None
        weights = self.last_weights
        cells = self.last_cells
        i, j = np.unravel_index(int(np.argmax(weights)), weights.shape)
        self.pixel_label.setText(
            f"pixel (y {y}, x {x}){' on slice ' + str(plane.index) if frame.is_stack else ''}: "
            f"{len(cells)} kernels carry 99% of the weight; largest {weights.max():.3f} from LR cell ({i}, {j}); "
            f"total {weights.sum():.4f}"
        )
        self.status.setText(f"Picked pixel (y {y}, x {x}): its weights and contributing kernels are shown.")
        return weights

    def _show_pixel(self, result: FitResult, plane, y: int, x: int) -> None:
        """Compute everything first, then add / replace the three pixel layers (all or none)."""
        frame = result.frame
        weights = pixel_weights(plane, y, x)
        cells = contributing_cells(weights)
        at = plane.index if frame.is_stack else None
        lead = frame.position(plane.index, at)
        factor = plane.factor
        H = plane.hr_shape[0]
        owner = result.owner
        vec, kernel_of = cell_segments(plane, cells, float(self.sigma_spin.value()))
        segments = np.stack([lift(vec[:, 0, :], lead), lift(vec[:, 1, :], [0] * len(lead))], axis=1)
        cell_weight = weights[cells[:, 0], cells[:, 1]]
        with self.state.keep_results():
            update_layer(
                self.viewer,
                frame.stack([weights.astype(np.float32)], at=at),
                "image",
                name=f"{result.name} pixel weights",
                role="pixel_weights",
                owner=owner,
                result=result.key,
                colormap="magma",
                blending="additive",
                contrast_limits=(0.0, float(max(weights.max(), 1e-12))),
                extra_tag={"pixel": [int(y), int(x)], "index": list(plane.index)},
                **frame.transform(factor, at=at),
            )
            update_layer(
                self.viewer,
                segments,
                "vectors",
                name=f"{result.name} pixel kernels",
                role="contributing",
                owner=owner,
                result=result.key,
                features={
                    "weight": cell_weight[kernel_of],
                    "cell_i": cells[kernel_of, 0],
                    "cell_j": cells[kernel_of, 1],
                },
                edge_color="weight",
                edge_colormap="plasma",
                edge_contrast_limits=(0.0, float(max(cell_weight.max(), 1e-12))),
                edge_width=max(0.75, H / 300),
                vector_style="line",
                extra_tag={"pixel": [int(y), int(x)], "kernels": int(len(cells))},
                **frame.transform(at=at),
            )
            update_layer(
                self.viewer,
                np.array([list(lead) + [y, x]], dtype=float),
                "points",
                name=f"{result.name} picked pixel",
                role="picked_pixel",
                owner=owner,
                result=result.key,
                face_color="cyan",
                size=max(3.0, H / 60),
                extra_tag={"pixel": [int(y), int(x)]},
                **frame.transform(at=at),
            )
        self.last_weights, self.last_pixel, self.last_cells = weights, (plane.index, y, x), cells

    def clear_pixel_layers(self) -> None:
        result = self.result_picker.result()
        if result is None:
            return
        with self.state.keep_results():
            for role in ("pixel_weights", "contributing", "picked_pixel"):
                remove_own_layer(self.viewer, role, result.owner)

    # ------------------------------------------------------------------ cleanup
    def cleanup(self) -> None:
        try:
            self.set_picking(False)
        except RuntimeError:
            pass
        clear_engine_cache()
