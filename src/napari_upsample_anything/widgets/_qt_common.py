"""Qt helpers shared by the dock widgets: layer / result pickers, notifications, the run driver."""

from __future__ import annotations

import functools
import sys
import time
import weakref
from typing import Callable, List, Optional, Sequence

from qtpy.QtCore import QEvent, QObject, Signal
from qtpy.QtWidgets import QComboBox, QLabel, QWidget

from ._frame import layer_kind
from ._pipeline import (
    Outcome,
    Progress,
    RunHandle,
    error_message,
    free_device_memory,
    guarded,
)
from ._registry import FitResult, emit, get_state, is_own, result_label

#: Seconds a closing widget waits for its computation to stop (it stops within one step).
SHUTDOWN_TIMEOUT = 60.0


# ---------------------------------------------------------------------------------- messages
def notify(severity: str, message: str) -> None:
    """A napari notification (``"error"``, ``"warning"`` or ``"info"``); never a traceback."""
    from napari.utils.notifications import show_error, show_info, show_warning

    {"error": show_error, "warning": show_warning}.get(severity, show_info)(message)


class PluginWidget(QWidget):
    """Base of the dock widgets: messages, and cleanup however the widget goes away.

    :meth:`cleanup` (stop computations, timers, mouse callbacks; free memory) runs once when
    the widget is closed, **or** when napari's dock "x" button removes it: napari then only
    detaches the widget from its dock (``setParent(None)``), without closing or deleting it.
    """

    last_message: str = ""
    last_severity: str = ""

    def __init__(self, parent: Optional[QWidget] = None):
        super().__init__(parent)
        self._docked = False
        self._cleaned = False

    def _message(self, severity: str, message: str, label: Optional[QLabel] = None) -> None:
        """Show ``message`` as a napari notification (and its first line in ``label``)."""
        self.last_message, self.last_severity = message, severity
        if label is not None:
            first = message.strip().splitlines()[0] if message.strip() else ""
            label.setText(first if severity == "info" else f"{severity}: {first}")
            label.setToolTip(message)
        notify(severity, message)

    def cleanup(self) -> None:  # pragma: no cover - overridden
        """Release what the widget holds; called at most once."""

    def _cleanup_once(self) -> None:
        if not self._cleaned:
            self._cleaned = True
            self.cleanup()

    def event(self, ev) -> bool:  # noqa: D401 - Qt API
        if ev.type() == QEvent.Type.ParentChange:
            if self.parent() is not None:
                self._docked = True
            elif self._docked:  # taken out of its dock: napari's "x" button
                self._cleanup_once()
        return super().event(ev)

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt API
        self._cleanup_once()
        super().closeEvent(event)


# ---------------------------------------------------------------------------------- pickers
class RunWidget(PluginWidget):
    """A dock widget with a Run / Cancel pair driving a :class:`Runner`.

    Subclasses create ``run_button``, ``cancel_button``, ``status`` (QLabel) and ``runner``,
    store their run's context in ``_pending`` when they start one, and implement
    :meth:`_publish`. Cancel, progress and the end of a run are handled here once.
    """

    #: shown when a run ends cancelled
    cancelled_text = "Cancelled; no layer was changed."

    def __init__(self, parent: Optional[QWidget] = None):
        super().__init__(parent)
        self._pending: Optional[dict] = None

    def cancel(self) -> None:
        if self.runner.running:
            self.runner.cancel()
            self.status.setText("cancelling (stops before the next step)…")

    def _on_progress(self, event: Progress) -> None:
        self.status.setText(event.text())

    def _on_finished(self, outcome: Outcome) -> None:
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        pending, self._pending = self._pending, None
        if self._cleaned:  # the widget was closed: nothing to show, nothing to add
            return
        if outcome.status == "cancelled":
            self._message("info", self.cancelled_text, self.status)
            return
        if outcome.status == "error":
            self._message("error", error_message(outcome.error), self.status)
            return
        if pending is None:  # pragma: no cover - a finished run always has its context
            return
        self._publish(outcome, pending)

    def _publish(self, outcome: Outcome, pending: dict) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class LayerPicker(QComboBox):
    """A combo box of the viewer's layers of some kinds, kept in sync with the layer list.

    Items are ``layer.name``; :meth:`layer` returns the selected layer object (or None).
    The plugin's own layers are left out unless ``include_own``.
    """

    def __init__(self, viewer, kinds: Sequence[str], include_own: bool = False, parent: Optional[QWidget] = None):
        super().__init__(parent)
        self._viewer_ref = weakref.ref(viewer)
        self._kinds = tuple(kinds)
        self._include_own = include_own
        self._layers: List[weakref.ReferenceType] = []
        self.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.setMinimumContentsLength(12)
        viewer.layers.events.inserted.connect(self.refresh)
        viewer.layers.events.removed.connect(self.refresh)
        viewer.layers.events.moved.connect(self.refresh)
        viewer.layers.selection.events.active.connect(self._follow_active)
        self.refresh()

    def _candidates(self) -> List:
        viewer = self._viewer_ref()
        if viewer is None:
            return []
        return [
            l for l in viewer.layers
            if layer_kind(l) in self._kinds and (self._include_own or not is_own(l))
        ]

    def refresh(self, *_args) -> None:
        try:
            current = self.layer()
        except RuntimeError:  # the Qt object is gone (viewer closing)
            return
        layers = self._candidates()
        for l in layers:  # follow renames
            try:
                l.events.name.disconnect(self._on_rename)
            except Exception:  # noqa: BLE001 - not connected yet
                pass
            l.events.name.connect(self._on_rename)
        self.blockSignals(True)
        self.clear()
        self._layers = [weakref.ref(l) for l in layers]
        for l in layers:
            self.addItem(f"{l.name}  [{layer_kind(l)}]" if len(self._kinds) > 1 else l.name)
        if current is not None and current in layers:
            self.setCurrentIndex(layers.index(current))
        elif layers:
            viewer = self._viewer_ref()
            active = viewer.layers.selection.active if viewer is not None else None
            self.setCurrentIndex(layers.index(active) if active in layers else len(layers) - 1)
        self.blockSignals(False)
        self.currentIndexChanged.emit(self.currentIndex())

    def _on_rename(self, *_args) -> None:
        try:
            self.refresh()
        except RuntimeError:
            pass

    def _follow_active(self, event) -> None:
        """Select the layer the user activates in the layer list, when it is a candidate."""
        try:
            layer = event.value
            refs = [r() for r in self._layers]
            if layer is not None and layer in refs:
                self.setCurrentIndex(refs.index(layer))
        except RuntimeError:
            pass

    def layer(self):
        i = self.currentIndex()
        if 0 <= i < len(self._layers):
            return self._layers[i]()
        return None

    def set_layer(self, layer) -> None:
        refs = [r() for r in self._layers]
        if layer in refs:
            self.setCurrentIndex(refs.index(layer))


class ResultPicker(QComboBox):
    """A combo box of the viewer's fitted results (newest selected by default)."""

    def __init__(self, viewer, parent: Optional[QWidget] = None):
        super().__init__(parent)
        self._state = get_state(viewer)
        self._keys: List[str] = []
        self.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.setMinimumContentsLength(12)
        self._state.results_changed.connect(self.refresh)
        self.refresh()

    def refresh(self) -> None:
        try:
            old_keys = list(self._keys)
            current = self.key()
        except RuntimeError:
            return
        results = list(self._state.results.values())
        self.blockSignals(True)
        self.clear()
        self._keys = [r.key for r in results]
        for r in results:
            self.addItem(result_label(r))
        if not results:
            self.addItem("(no fitted image yet: run 'Upsample Anything')")
        new = [k for k in self._keys if k not in old_keys]
        if new:  # a new result: select it
            self.setCurrentIndex(self._keys.index(new[-1]))
        elif current in self._keys:
            self.setCurrentIndex(self._keys.index(current))
        elif self._keys:
            self.setCurrentIndex(len(self._keys) - 1)
        self.blockSignals(False)
        self.currentIndexChanged.emit(self.currentIndex())

    def key(self) -> Optional[str]:
        i = self.currentIndex()
        return self._keys[i] if 0 <= i < len(self._keys) else None

    def result(self) -> Optional[FitResult]:
        k = self.key()
        return self._state.results.get(k) if k else None

    def set_result(self, key: str) -> None:
        if key in self._keys:
            self.setCurrentIndex(self._keys.index(key))


# ---------------------------------------------------------------------------------- runner
class Runner(QObject):
    """Runs one computation at a time in a napari generator ``thread_worker``.

    ``start(fn, *args, **kwargs)`` runs ``fn(*args, progress=..., cancel=..., **kwargs)``
    (the :mod:`._pipeline` convention) through :func:`._pipeline.guarded`: every progress
    event is a yield of the worker (shown in napari's activity dock as a progress bar and
    re-emitted as :attr:`progressed`), and the run ends with :attr:`finished` carrying an
    :class:`~._pipeline.Outcome`. :meth:`cancel` sets the flag the core polls before every
    optimisation step and tile. :meth:`shutdown` cancels and waits (used when a widget closes).
    """

    progressed = Signal(object)
    finished = Signal(object)

    _next_id = 0

    def __init__(self, viewer, what: str, parent: Optional[QObject] = None):
        super().__init__(parent)
        self._viewer_ref = weakref.ref(viewer)
        self.what = what
        self.worker = None
        self.handle: Optional[RunHandle] = None
        self._pbar = None
        self._info: Optional[dict] = None
        self._outcome: Optional[Outcome] = None
        self._stage = None
        self.last_event: Optional[Progress] = None
        self._in_yield = False
        self._finish_pending = False

    @property
    def running(self) -> bool:
        return self.worker is not None

    def start(self, fn: Callable, *args, device: str = "", budget=None, desc: str = "", **kwargs) -> None:
        from napari.qt.threading import create_worker
        from napari.utils import progress

        if self.running:
            raise RuntimeError("a computation is already running")
        Runner._next_id += 1
        self.handle = RunHandle()
        self._outcome = None
        self._stage = None
        self.last_event = None
        self._finish_pending = False
        worker = create_worker(
            guarded, fn, self.handle, *args, _start_thread=False, _worker_class=_cancelling_worker_class(), **kwargs
        )
        worker.yielded.connect(self._on_yielded)
        worker.returned.connect(self._on_returned)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self._pbar = progress(total=0, desc=desc or self.what)
        self._info = {"id": Runner._next_id, "what": self.what, "device": device, "budget": budget, "t0": time.time()}
        viewer = self._viewer_ref()
        if viewer is not None:
            get_state(viewer).begin_run(self._info)
        worker.start()

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()

    def _on_yielded(self, event: Progress) -> None:
        if self.worker is None:  # a late event of a finished run
            return
        self.last_event = event
        self.progressed.emit(event)
        viewer = self._viewer_ref()
        if viewer is not None:
            emit(get_state(viewer).run_progress, event)
        # napari's progress-bar widget calls QApplication.processEvents() when updated, so the
        # next events (even `finished`) can be delivered from inside this slot. Only the
        # outermost call touches the progress bar, always with the latest event, and a
        # `finished` that arrives meanwhile is handled once the bar update has returned.
        if self._in_yield:
            return
        self._in_yield = True
        try:
            shown = None
            while self._pbar is not None and shown is not self.last_event:
                shown = self.last_event
                self._show(shown)
        finally:
            self._in_yield = False
        if self._finish_pending:
            self._finish_pending = False
            self._finalize()

    def _show(self, event: Progress) -> None:
        pbar = self._pbar
        key = (event.stage, event.plane)
        if key != self._stage:
            self._stage = key
            pbar.set_description(
                f"{self.what}: {event.stage}" + (f" {event.plane + 1}/{event.n_planes}" if event.n_planes > 1 else "")
            )
        total = max(int(event.total), 0)
        if pbar.total != total:
            pbar.total = total
        pbar.n = int(event.done)
        pbar.update(0)

    def _on_returned(self, outcome: Outcome) -> None:
        self._outcome = outcome

    def _on_finished(self) -> None:
        if self._in_yield:
            self._finish_pending = True
            return
        self._finalize()

    def _finalize(self) -> None:
        outcome = self._outcome or Outcome("cancelled")
        if self._pbar is not None:
            pbar, self._pbar = self._pbar, None
            pbar.close()
        self.worker = None
        info = dict(self._info or {}, status=outcome.status)
        viewer = self._viewer_ref()
        if viewer is not None and self._info is not None:
            get_state(viewer).end_run(info)
        self._info = None
        self.finished.emit(outcome)

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT) -> bool:
        """Cancel the running computation and wait for it; True when nothing is left running."""
        handle = self.handle
        if handle is None:
            return True
        handle.cancel()
        stopped = handle.join(timeout)
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        if self._info is not None:
            viewer = self._viewer_ref()
            if viewer is not None:
                get_state(viewer).end_run(dict(self._info, status="cancelled"))
            self._info = None
        return stopped


@functools.lru_cache(maxsize=1)
def _cancelling_worker_class():
    """napari's GeneratorWorker whose ``quit()`` (napari calls it when the window closes with
    tasks running) also sets the computation's cancel flag, so the core stops within a step."""
    from napari.qt.threading import GeneratorWorker

    class CancellingGeneratorWorker(GeneratorWorker):
        def __init__(self, func, *args, **kwargs):
            super().__init__(func, *args, **kwargs)
            self.run_handle = next((a for a in args if isinstance(a, RunHandle)), None)

        def quit(self) -> None:
            if self.run_handle is not None:
                self.run_handle.cancel()
            super().quit()

    return CancellingGeneratorWorker


def describe_outcome(outcome: Outcome) -> str:
    if outcome.status == "error" and outcome.error is not None:
        return error_message(outcome.error)
    return outcome.status


def release_memory() -> None:
    """Collect garbage and release cached device memory (no-op without torch)."""
    import gc

    gc.collect()
    free_device_memory(None)


def torch_loaded() -> bool:
    return "torch" in sys.modules
