"""**Memory monitor** dock widget: live device memory during runs, and the per-tile memory map.

Live numbers
------------
A QTimer samples the memory of the device in use (every 0.2 s during a run of any of the
plugin's widgets, every second otherwise):

* CUDA: ``torch.cuda.memory_allocated`` (tensors alive), ``memory_reserved`` (held by
  PyTorch's caching allocator) and the driver's free / total memory;
* CPU (and MPS): the resident set size (RSS) of the napari process, and available RAM.

"Peak" is the largest sample since the current (or last) run started. The history is drawn
as a small plot in the dock and, with "Show on canvas", written into napari's text overlay.
Sampling never imports torch: without torch loaded, the device is the CPU.

Memory map
----------
``<name> memory`` is an image on the LR grid (aligned with the source, like ``LR PCA``):
each LR cell holds the peak memory, in MiB, of the engine tiles that covered it (the
largest over the chosen stage: fit steps, renders, or all). ``<name> memory tiles``
outlines the distinct tiles (rectangles on the LR grid, labelled with their MiB when there
are few). On CUDA the measured peak
(allocator statistics above the level before the tile) is shown by default; on the CPU
the engine cannot sample memory inside a tile, so the default is the **planned** working
set of the tile (what the memory planner budgeted), and "measured" shows the process RSS
after each tile.
"""

from __future__ import annotations

import os
import sys
import time
import weakref
from typing import Dict, List, Optional, Tuple

import numpy as np
from qtpy.QtCore import QPointF, QRectF, Qt, QTimer
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSizePolicy,
    QWidget,
)

from ..core.units import format_bytes
from ._base import PluginWidget
from ._pickers import ResultPicker
from ._registry import FitResult, get_state, put_layer, remove_own_layer, unwrap_viewer

MIB = 2.0**20
RUN_INTERVAL_MS = 200
IDLE_INTERVAL_MS = 1000
HISTORY = 3000  # samples kept for the plot; a longer run is kept whole, at half the time resolution each time it fills up
OVERLAY_INTERVAL_S = 1.0  # each overlay change redraws the canvas: at most once a second
STAGES = ("all", "fit", "render")
VALUES = ("auto", "measured", "planned", "allocated")


def fmt_bytes(n: Optional[float]) -> str:
    """``1.5 GiB``-style size (``-`` for None)."""
    return "-" if n is None else format_bytes(n)


# ---------------------------------------------------------------------------------- sampling
def _rss() -> Tuple[int, int]:
    try:
        import psutil

        return int(psutil.Process(os.getpid()).memory_info().rss), int(psutil.virtual_memory().available)
    except Exception:  # pragma: no cover - psutil is a dependency; never fail on a reading
        return 0, 0


def resolve_monitor_device(device: Optional[str]) -> str:
    """The device to sample for a run's device string, without importing torch."""
    device = (device or "auto").lower()
    torch = sys.modules.get("torch")
    if device.startswith("cuda"):
        return device
    if device == "auto" and torch is not None:
        try:
            if torch.cuda.is_available():
                return "cuda"
        except Exception:  # noqa: BLE001
            pass
    return "cpu" if device in ("auto", "mps") or not device else device


def sample_memory(device: Optional[str] = "cpu") -> Dict[str, Optional[int]]:
    """Current memory figures of ``device``: ``current`` plus the device-specific details.

    CUDA: the allocator's ``allocated``, ``reserved``, ``peak``, ``peak_reserved`` and the driver's
    ``free``, ``total`` (``current`` = allocated; :func:`..core.memory.sample_device_memory`).
    CPU: ``rss``, ``available`` (``current`` = rss). ``rss`` is always present.
    """
    dev = resolve_monitor_device(device)
    rss, avail = _rss()
    out: Dict[str, Optional[int]] = {"rss": rss, "available": avail, "current": rss}
    torch = sys.modules.get("torch")
    if dev.startswith("cuda") and torch is not None:
        try:
            if torch.cuda.is_available():
                from ..core.memory import sample_device_memory  # torch is loaded already

                out.update(sample_device_memory(dev))  # the allocator's statistics, peaks included
        except Exception:  # noqa: BLE001 - a failed reading is not an error
            pass
    out["device"] = dev  # type: ignore[assignment]
    return out


def memory_layer_data(result: FitResult, stage: str = "all", value: str = "auto") -> Tuple[np.ndarray, str]:
    """The ``<name> memory`` array (MiB on the LR grid, stacked like the source) and the value kind used."""
    on_cuda = str(result.pipeline.device).startswith("cuda")
    if value == "auto":
        value = "measured" if on_cuda else "allocated"
    if value not in VALUES[1:]:
        raise ValueError(f"value={value!r}: use one of {', '.join(VALUES)}")
    if value == "measured" and not on_cuda:
        # the CPU has no per-tile measurement (the process RSS after a tile is the same for every
        # tile): the engine's own accounting of what the tile allocated is what a map can show
        value = "allocated"
    st = None if stage in (None, "all") else stage
    maps = [(p.memlog.tile_map(p.lr_shape, stage=st, value=value) / MIB).astype(np.float32) for p in result.planes]
    return result.frame.stack(maps), value


#: Tile outlines are drawn (as Shapes rectangles) up to this many distinct tiles.
MAX_TILE_OUTLINES = 2000
#: ... and labelled with their MiB up to this many.
MAX_TILE_LABELS = 150


def tile_rectangles(result: FitResult, stage: str = "all", value: str = "planned"):
    """Distinct engine tiles of a result as napari rectangles on the LR grid.

    Returns ``(rectangles, mib)``: one ``[4, ndim]`` corner array per tile (LR-cell edges,
    leading axes placed like the memory map) and the tile's largest value in MiB; or None
    when there are more than :data:`MAX_TILE_OUTLINES` distinct tiles.
    """
    from ..core.memory import tile_bytes  # a result exists: torch is loaded already

    st = None if stage in (None, "all") else stage
    best: Dict[tuple, float] = {}
    for p in result.planes:
        for t in p.memlog.tiles:
            if st is not None and t.stage != st:
                continue
            key = (tuple(p.index), t.i0, t.i1, t.j0, t.j1)
            v = float(tile_bytes(t, value))
            best[key] = max(best.get(key, 0.0), v)
    if len(best) > MAX_TILE_OUTLINES:
        return None
    rects, mib = [], []
    for (index, i0, i1, j0, j1), v in best.items():
        lead = list(result.frame.position(index))
        y0, y1, x0, x1 = i0 - 0.5, i1 - 0.5, j0 - 0.5, j1 - 0.5
        rects.append(np.array([lead + [y0, x0], lead + [y0, x1], lead + [y1, x1], lead + [y1, x0]], float))
        mib.append(v / MIB)
    return rects, np.asarray(mib, float)


def budget_mib(result: FitResult) -> float:
    """The run's memory budget in MiB (the top of the memory map's fixed colour scale)."""
    budget = max((p.memlog.budget_bytes for p in result.planes), default=0)
    if not budget:  # no budget recorded: the largest tile (never an empty scale)
        budget = max((t.planned_bytes for p in result.planes for t in p.memlog.tiles), default=MIB)
    return max(float(budget) / MIB, 1e-3)


def label_positions(rects: List[np.ndarray], mib: np.ndarray, min_gap: float = 2.0) -> np.ndarray:
    """Which tiles get a MiB label: the largest first, then any whose centre is at least ``min_gap``
    LR cells (and half its own size) from every label already placed, so labels never overlap."""
    if not rects:
        return np.zeros(0, bool)
    centres = np.array([r[:, -2:].mean(0) for r in rects])
    sizes = np.array([np.ptp(r[:, -2:], axis=0).min() for r in rects])
    leads = [tuple(r[0, :-2]) for r in rects]
    keep = np.zeros(len(rects), bool)
    placed: List[int] = []
    for k in np.argsort(-np.asarray(mib), kind="stable"):
        gap = max(min_gap, sizes[k] / 2)
        if all(leads[q] != leads[k] or np.abs(centres[q] - centres[k]).max() >= gap for q in placed):
            keep[k] = True
            placed.append(k)
    return keep


def memory_summary(result: FitResult) -> str:
    logs = [p.memlog for p in result.planes]
    tiles = sum(len(l.tiles) for l in logs)
    budget = max((l.budget_bytes for l in logs), default=0)
    planned = max((l.peak_planned_bytes for l in logs), default=0)
    measured = max((l.peak_measured_bytes for l in logs), default=0)
    working = max((l.working_bytes for l in logs), default=0)
    if str(result.pipeline.device).startswith("cuda"):
        measured_text = f", largest measured (allocator peak) {fmt_bytes(measured)}"
    else:
        measured_text = " (the CPU has no per-tile measurement: the map shows what the engine allocated)"
    return (
        f"{tiles} tile records on {result.pipeline.device}; budget {fmt_bytes(budget)}, "
        f"largest planned tile {fmt_bytes(planned)}, working set {fmt_bytes(working)} "
        f"(kept across tiles + largest tile allocated){measured_text}"
    )


# ---------------------------------------------------------------------------------- plot
def downsample_samples(samples: List[Tuple[float, float]]) -> List[Tuple[float, float]]:
    """Halve a ``(time, value)`` history: pairs merge into their larger value (peaks survive), at the later time.

    The first sample is kept as it is, so the plot still starts where the run started.
    """
    head, rest = samples[:1], samples[1:]
    merged = [max(rest[k : k + 2], key=lambda s: s[1]) for k in range(0, len(rest), 2)]
    return head + [(rest[min(k + 1, len(rest) - 1)][0], v) for k, (_, v) in zip(range(0, len(rest), 2), merged)]


class Sparkline(QWidget):
    """A small line plot of memory over time (QPainter; no plotting library needed)."""

    def __init__(self, parent: Optional[QWidget] = None):
        super().__init__(parent)
        self.samples: List[Tuple[float, float]] = []
        self.peak: float = 0.0
        self.budget: Optional[float] = None
        self.setMinimumHeight(90)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)

    def clear(self) -> None:
        self.samples.clear()
        self.peak = 0.0
        self.update()

    def add(self, t: float, value: float) -> None:
        self.samples.append((t, float(value)))
        if len(self.samples) > HISTORY:
            self.samples = downsample_samples(self.samples)
        self.peak = max(self.peak, float(value))
        self.update()

    def paintEvent(self, event) -> None:  # noqa: N802 - Qt API
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        r = QRectF(self.rect()).adjusted(1, 1, -1, -1)
        p.fillRect(r, QColor(30, 30, 34))
        p.setPen(QPen(QColor(90, 90, 100), 1))
        p.drawRect(r)
        if len(self.samples) >= 1:
            t0 = self.samples[0][0]
            t1 = max(self.samples[-1][0], t0 + 1e-6)
            vmax = max(self.peak, 1.0) * 1.15
            lo = min(v for _, v in self.samples) * 0.9
            lo = min(lo, self.peak * 0.5)
            span = max(vmax - lo, 1.0)

            def pt(t: float, v: float) -> QPointF:
                x = r.left() + 4 + (r.width() - 8) * (t - t0) / (t1 - t0)
                y = r.bottom() - 14 - (r.height() - 20) * (v - lo) / span
                return QPointF(x, y)

            y_peak = pt(t0, self.peak).y()
            p.setPen(QPen(QColor(255, 140, 60), 1, Qt.PenStyle.DashLine))
            p.drawLine(QPointF(r.left() + 2, y_peak), QPointF(r.right() - 2, y_peak))
            poly = QPolygonF([pt(t, v) for t, v in self.samples])
            p.setPen(QPen(QColor(80, 200, 255), 2))
            p.drawPolyline(poly)
            p.setPen(QColor(220, 220, 220))
            p.drawText(
                QRectF(r.left() + 6, r.top() + 2, r.width() - 12, 14), Qt.AlignmentFlag.AlignLeft, f"peak {fmt_bytes(self.peak)}"
            )
            p.drawText(
                QRectF(r.left() + 6, r.bottom() - 14, r.width() - 12, 14),
                Qt.AlignmentFlag.AlignRight,
                f"{t1 - t0:.0f} s",
            )
        else:
            p.setPen(QColor(160, 160, 160))
            p.drawText(r, Qt.AlignmentFlag.AlignCenter, "no samples yet")
        p.end()


# ---------------------------------------------------------------------------------- widget
def text_overlay(viewer):
    """napari's canvas text overlay (``viewer.canvas.overlays.text`` since 0.9, else ``viewer.text_overlay``)."""
    canvas = getattr(viewer, "canvas", None)
    overlays = getattr(canvas, "overlays", None)
    if overlays is not None and hasattr(overlays, "text"):
        return overlays.text
    return viewer.text_overlay


class MemoryMonitorWidget(PluginWidget):
    """The memory monitor dock widget (see the module docstring)."""

    def __init__(self, napari_viewer, parent: Optional[QWidget] = None):
        super().__init__(parent)
        self.viewer = napari_viewer = unwrap_viewer(napari_viewer)
        self.state = get_state(napari_viewer)
        self.watch_viewer(napari_viewer)
        self.device = "cpu"
        self.last: Dict[str, Optional[int]] = {}
        self.peak = 0
        self.run_t0: Optional[float] = None
        self._overlay_saved: Optional[Tuple[bool, str]] = None
        self._overlay_t = 0.0
        self._build()
        self.timer = QTimer(self)
        self.timer.timeout.connect(self.poll)
        self.state.run_started.connect(self._on_run_started)
        self.state.run_finished.connect(self._on_run_finished)
        if self.state.running:  # opened during a run
            info = next(iter(self.state.active_runs.values()))
            self._on_run_started(info)
        else:
            self.timer.start(IDLE_INTERVAL_MS)
        self.poll()

    def _build(self) -> None:
        layout = self.body_layout
        live = QGroupBox("Live memory")
        form = QFormLayout(live)
        self.device_label = QLabel("cpu")
        self.current_label = QLabel("-")
        self.peak_label = QLabel("-")
        self.detail_label = QLabel("-")
        self.detail_label.setWordWrap(True)
        form.addRow("Device", self.device_label)
        form.addRow("Current", self.current_label)
        form.addRow("Peak (run)", self.peak_label)
        form.addRow("Details", self.detail_label)
        self.plot = Sparkline()
        form.addRow(self.plot)
        self.overlay_check = QCheckBox("Show on canvas (text overlay)")
        self.overlay_check.toggled.connect(self._toggle_overlay)
        form.addRow(self.overlay_check)
        layout.addWidget(live)

        box = QGroupBox("Memory map (per tile)")
        form2 = QFormLayout(box)
        self.result_picker = ResultPicker(self.viewer)
        form2.addRow("Fitted image", self.result_picker)
        self.stage_combo = QComboBox()
        self.stage_combo.addItems(STAGES)
        self.stage_combo.setToolTip("Tiles of the kernel fit, of the renders (PCA and HR features), or both")
        form2.addRow("Stage", self.stage_combo)
        self.value_combo = QComboBox()
        self.value_combo.addItems(VALUES)
        self.value_combo.setToolTip(
            "auto: measured on CUDA; on the CPU what the engine allocated per tile (its own accounting). "
            "planned: the planner's upper bound that sizes the tiles"
        )
        form2.addRow("Value", self.value_combo)
        self.outline_check = QCheckBox("Outline the tiles (with their MiB)")
        self.outline_check.setChecked(True)
        form2.addRow(self.outline_check)
        row = QHBoxLayout()
        self.show_button = QPushButton("Show memory map")
        self.show_button.clicked.connect(self.show_memory_map)
        row.addWidget(self.show_button)
        form2.addRow(row)
        self.summary_label = QLabel("")
        self.summary_label.setWordWrap(True)
        form2.addRow(self.summary_label)
        self.result_picker.currentIndexChanged.connect(self._update_summary)
        layout.addWidget(box)
        layout.addStretch(1)
        self._update_summary()

    # ------------------------------------------------------------------ live
    def _on_run_started(self, info: dict) -> None:
        self.device = resolve_monitor_device(info.get("device"))
        self.run_t0 = time.perf_counter()
        self.peak = 0
        self.plot.clear()
        self.timer.start(RUN_INTERVAL_MS)
        self._overlay_t = 0.0
        self.poll()

    def _on_run_finished(self, info: dict) -> None:
        self._overlay_t = 0.0
        self.poll(record=True)  # the run's last sample, even when it ended before the first timer tick
        if not self.state.running:
            self.timer.start(IDLE_INTERVAL_MS)
        self._update_summary()

    def poll(self, record: bool = False) -> Dict[str, Optional[int]]:
        """Take one sample, update the labels, the plot and the overlay; returns the sample.

        The plot records samples while a run is going (or ``record``); idle samples only
        update the labels, so the plot keeps showing the last run.
        """
        s = sample_memory(self.device)
        self.device = str(s.get("device", self.device))
        self.last = s
        cur = int(s.get("current") or 0)
        self.peak = max(self.peak, cur)
        t = time.perf_counter()
        if record or self.state.running or not self.plot.samples:
            self.plot.add(t, cur)
        self.device_label.setText(self.device + ("  (running)" if self.state.running else ""))
        self.current_label.setText(fmt_bytes(cur))
        self.peak_label.setText(fmt_bytes(self.peak))
        if "allocated" in s:
            self.detail_label.setText(
                f"allocated {fmt_bytes(s['allocated'])}, reserved {fmt_bytes(s['reserved'])}, "
                f"free {fmt_bytes(s['free'])} of {fmt_bytes(s['total'])}; process RSS {fmt_bytes(s['rss'])}"
            )
        else:
            self.detail_label.setText(f"process RSS {fmt_bytes(s['rss'])}, RAM available {fmt_bytes(s['available'])}")
        if self.overlay_check.isChecked() and t - self._overlay_t >= OVERLAY_INTERVAL_S:
            self._write_overlay()
        return s

    def overlay_text(self) -> str:
        s = self.last
        if "allocated" in s:
            text = f"{self.device}: allocated {fmt_bytes(s['allocated'])}, reserved {fmt_bytes(s['reserved'])}"
        else:
            text = f"{self.device}: RSS {fmt_bytes(s.get('rss'))}"
        return text + f" (peak {fmt_bytes(self.peak)})" + ("  running" if self.state.running else "")

    def _write_overlay(self) -> None:
        self._overlay_t = time.perf_counter()
        overlay = text_overlay(self.viewer)
        overlay.text = self.overlay_text()
        overlay.visible = True

    def _toggle_overlay(self, on: bool) -> None:
        overlay = text_overlay(self.viewer)
        if on:
            if self._overlay_saved is None:
                self._overlay_saved = (bool(overlay.visible), str(overlay.text))
            self._write_overlay()
        else:
            self._restore_overlay()

    def _restore_overlay(self) -> None:
        if self._overlay_saved is None:
            return
        visible, text = self._overlay_saved
        self._overlay_saved = None
        try:
            overlay = text_overlay(self.viewer)
            overlay.text = text
            overlay.visible = visible
        except Exception:  # noqa: BLE001 - the viewer may be closing
            pass

    # ------------------------------------------------------------------ map
    def _update_summary(self, *_args) -> None:
        result = self.result_picker.result()
        self.show_button.setEnabled(result is not None)
        self.summary_label.setText(memory_summary(result) if result is not None else "")

    def show_memory_map(self) -> None:
        """Create or update ``<name> memory`` for the chosen result, stage and value, and show it."""
        result = self.result_picker.result()
        if result is None:
            self._message("error", "No fitted image yet: run 'Upsample Anything' first.")
            return
        stage = self.stage_combo.currentText()
        data, kind = memory_layer_data(result, stage, self.value_combo.currentText())
        if not np.any(data):
            self._message("warning", f"No tiles recorded for stage '{stage}' of {result.label}.")
        factor = result.planes[0].factor
        with self.state.keep_results():
            layer = put_layer(
                self.viewer,
                data,
                "image",
                name=f"{result.name} memory",
                role="memory",
                owner=result.owner,
                result=result.key,
                colormap="inferno",
                contrast_limits=(0.0, budget_mib(result)),  # fixed: 0 .. the budget, comparable across tiles and runs
                opacity=0.8,
                visible=True,
                extra_tag={"unit": "MiB", "value": kind, "stage": stage},
                **result.frame.transform(factor),
            )
        result.layers["memory"] = weakref.ref(layer)
        tiles = tile_rectangles(result, stage, kind) if self.outline_check.isChecked() else None
        with self.state.keep_results():
            if tiles is not None and tiles[0]:
                rects, mib = tiles
                shown = label_positions(rects, mib) if len(rects) <= MAX_TILE_LABELS else np.zeros(len(rects), bool)
                labels = np.array([f"{v:.0f}" if on else "" for v, on in zip(mib, shown)], dtype=object)
                text = {"string": "{label}", "size": 8, "color": "white"} if shown.any() else None
                tl = put_layer(
                    self.viewer,
                    rects,
                    "shapes",
                    name=f"{result.name} memory tiles",
                    role="memory_tiles",
                    owner=result.owner,
                    result=result.key,
                    shape_type="rectangle",
                    face_color="transparent",
                    edge_color="white",
                    edge_width=0.08,
                    features={"MiB": mib, "label": labels},
                    text=text,
                    opacity=0.9,
                    extra_tag={"value": kind, "stage": stage},
                    **result.frame.transform(factor),
                )
                result.layers["memory_tiles"] = weakref.ref(tl)
            else:
                remove_own_layer(self.viewer, "memory_tiles", result.owner)
        ntiles = "" if tiles is None else f", {len(tiles[0])} distinct tiles outlined"
        self.summary_label.setText(memory_summary(result) + f". Showing {kind} MiB per LR cell, stage '{stage}'{ntiles}.")

    # ------------------------------------------------------------------ cleanup
    def cleanup(self) -> None:
        self.timer.stop()
        self._restore_overlay()
        try:
            self.state.run_started.disconnect(self._on_run_started)
            self.state.run_finished.disconnect(self._on_run_finished)
        except Exception:  # noqa: BLE001
            pass
