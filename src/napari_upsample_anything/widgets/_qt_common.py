"""Qt helpers shared by the dock widgets: layer / result pickers, notifications, the run driver."""

from __future__ import annotations

import functools
import sys
import threading
import time
import weakref
from typing import Any, Callable, List, Optional, Sequence

from qtpy.QtCore import QEvent, QObject, Qt, QThreadPool, QTimer, Signal, qInstallMessageHandler
from qtpy.QtWidgets import (
    QApplication,
    QComboBox,
    QFrame,
    QHBoxLayout,
    QLabel,
    QLayout,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

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
#: ids of PluginWidgets whose ``__init__`` is running (see ``PluginWidget.__init_subclass__``).
_INITIALISING: set = set()


# ---------------------------------------------------------------------------------- messages
#: API argument names in error messages, and the widget fields that set them.
GUI_FIELDS = {
    "max_memory": "Memory budget",
    "input_size": "Input size",
    "guide_smoothing": "Guide smoothing",
    "fit_downsample": "Fit input",
    "fit_fraction": "Pixels per step",
    "hr_features": "HR features",
    "channel_axis": "Channel axis",
}
_FIELD_PATTERN = None


def gui_error_message(exc: BaseException) -> str:
    """:func:`._pipeline.error_message` with API argument names replaced by the widget fields' names.

    ``max_memory=1024: ... raise max_memory or lower input_size`` reads
    ``'Memory budget'=1024: ... raise 'Memory budget' or lower 'Input size'`` in the GUI.
    """
    import re

    global _FIELD_PATTERN
    if _FIELD_PATTERN is None:
        names = sorted(GUI_FIELDS, key=len, reverse=True)
        _FIELD_PATTERN = re.compile(r"(?<![\w'])(" + "|".join(re.escape(n) for n in names) + r")(?![\w'])")
    text = error_message(exc)
    return _FIELD_PATTERN.sub(lambda m: f"'{GUI_FIELDS[m.group(1)]}'", text)


#: Milliseconds a plugin toast stays on the canvas (napari starts its own 4 s timer only while its
#: window is the active one; otherwise a toast stays until hovered). The text stays in the status line.
TOAST_MS = {"error": 15_000, "warning": 10_000, "info": 6_000}


def notify(severity: str, message: str) -> None:
    """A napari notification (``"error"``, ``"warning"`` or ``"info"``); never a traceback; its toast expires."""
    from napari.utils.notifications import show_error, show_info, show_warning

    {"error": show_error, "warning": show_warning}.get(severity, show_info)(message)
    QTimer.singleShot(TOAST_MS.get(severity, 6_000), functools.partial(_expire_toasts, message))


def _expire_toasts(message: str) -> None:
    """Fade out napari's toasts of ``message`` (napari's own class; nothing happens if it changes)."""
    try:
        from napari._qt.dialogs.qt_notification import NapariQtNotification

        for toast in list(getattr(NapariQtNotification, "_instances", [])):
            if toast.message.text() == message:
                toast.close_with_fade()
    except Exception:  # noqa: BLE001 - a toast already gone, or another napari: leave it
        pass


class _WindowCloseWatcher(QObject):
    """Runs a widget's cleanup when the napari window it lives in closes.

    napari closes its main window without closing the dock widgets in it; a computation
    still running in a worker thread then outlives the Qt objects it reports to, and the
    process aborts at exit. A programmatic close (``viewer.close()``) is never refused, so
    cleanup runs at once; a close from the window's own button may still be refused by
    napari's confirmation dialog, so cleanup then waits until the window is really hidden.
    """

    def __init__(self, widget: PluginWidget):
        super().__init__(widget)
        self._widget_ref = weakref.ref(widget)
        self._closing = False

    def eventFilter(self, obj, ev) -> bool:  # noqa: N802 - Qt API
        kind = ev.type()
        if kind == QEvent.Type.Close:
            if ev.spontaneous():
                self._closing = True
            else:
                self._fire()
        elif kind == QEvent.Type.Hide and self._closing:
            self._fire()
        elif kind == QEvent.Type.Show:
            self._closing = False
        return False

    def _fire(self) -> None:
        self._closing = False
        widget = self._widget_ref()
        if widget is not None:
            widget._cleanup_once()


class PluginWidget(QWidget):
    """Base of the dock widgets: messages, a scrolling body, and cleanup however the widget goes away.

    Subclasses put their fields into :attr:`body`, a widget inside a :class:`QScrollArea`, so
    that several widgets docked on a small screen each scroll instead of being clipped.

    :meth:`cleanup` (stop computations, timers, mouse callbacks; free memory) runs once when
    the widget is closed, **or** when napari's dock "x" button removes it: napari then only
    detaches the widget from its dock (``setParent(None)``), without closing or deleting it,
    **or** when the napari window closes (:meth:`watch_viewer`), **or** when the application quits.
    """

    last_message: str = ""
    last_severity: str = ""
    #: The scroll area never shrinks below this height (px): a docked widget always shows a few rows.
    MIN_VISIBLE_HEIGHT = 60

    def __init_subclass__(cls, **kwargs):
        """Every subclass's ``__init__`` ends with :meth:`check_layout_owner` (once, after the outermost one)."""
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return

        @functools.wraps(init)
        def checked_init(self, *args, **kw):
            key = id(self)
            outermost = key not in _INITIALISING
            if not outermost:
                return init(self, *args, **kw)
            _INITIALISING.add(key)
            warnings: List[str] = []
            previous = None

            def catch(mode, context, message):  # Qt only warns about a second layout
                if "already has a layout" in str(message):
                    warnings.append(str(message))
                elif previous is not None:
                    previous(mode, context, message)
                else:
                    sys.stderr.write(f"{message}\n")

            previous = qInstallMessageHandler(catch)
            try:
                init(self, *args, **kw)
            finally:
                qInstallMessageHandler(previous)
                _INITIALISING.discard(key)
            self.check_layout_owner(warnings)

        cls.__init__ = checked_init

    def __init__(self, parent: Optional[QWidget] = None):
        super().__init__(parent)
        self._docked = False
        self._cleaned = False
        self._outer = outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.setSpacing(2)
        self.scroll = QScrollArea(self)
        self.scroll.setWidgetResizable(True)
        self.scroll.setFrameShape(QFrame.Shape.NoFrame)
        self.scroll.setMinimumHeight(self.MIN_VISIBLE_HEIGHT)
        self.body = QWidget()
        #: The one layout subclasses put their fields into (inside the scroll area).
        self.body_layout = QVBoxLayout(self.body)
        self.scroll.setWidget(self.body)
        outer.addWidget(self.scroll, 1)
        #: Always visible under the scroll area: Run / Cancel and the status line go here.
        self.footer = QWidget(self)
        self.footer_layout = QVBoxLayout(self.footer)
        self.footer_layout.setContentsMargins(6, 2, 6, 2)
        self.footer_layout.setSpacing(2)
        outer.addWidget(self.footer, 0)
        app = QApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self._cleanup_once)

    def check_layout_owner(self, qt_warnings: Sequence[str] = ()) -> None:
        """Raise when a subclass gave this widget (or its body) a second layout.

        Qt only warns ("... which already has a layout") and leaves every control put into
        the second layout without a parent, i.e. invisible: the dock shows an empty panel.
        Fields go into :attr:`body_layout`; Run / Cancel / status into :attr:`footer_layout`.
        """
        direct = Qt.FindChildOption.FindDirectChildrenOnly
        for owner, mine in ((self, self._outer), (self.body, self.body_layout), (self.footer, self.footer_layout)):
            extra = [lay for lay in owner.findChildren(QLayout, options=direct) if lay is not mine]
            if extra or owner.layout() is not mine or qt_warnings:
                raise RuntimeError(
                    f"{type(self).__name__}: a second layout was set on a widget that already has one; "
                    "put the fields into self.body_layout (and Run/status into self.footer_layout)"
                )

    #: Combo boxes are at least this many characters wide, and no wider by themselves (long item texts are elided).
    COMBO_CHARS = 14

    def showEvent(self, event) -> None:  # noqa: N802 - Qt API
        if not getattr(self, "_fitted_width", False):
            self._fitted_width = True
            self.fit_width()
        super().showEvent(event)

    def fit_width(self) -> None:
        """Scroll vertically only: the dock is as wide as the fields need (combo boxes kept compact)."""
        for combo in self.body.findChildren(QComboBox):
            if combo.sizeAdjustPolicy() != QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon:
                combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
                combo.setMinimumContentsLength(self.COMBO_CHARS)
        self.scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        layout = self.body.layout()
        if layout is not None:  # never squeeze the fields: scroll instead
            layout.setSizeConstraint(QLayout.SizeConstraint.SetMinimumSize)
            layout.activate()
        bar = max(self.scroll.verticalScrollBar().sizeHint().width(), 16)
        self.scroll.setMinimumWidth(self.body.minimumSizeHint().width() + bar + 4)

    def watch_viewer(self, viewer) -> None:
        """Clean up when ``viewer``'s window closes (see :class:`_WindowCloseWatcher`)."""
        window = getattr(getattr(viewer, "window", None), "_qt_window", None)
        if window is not None:
            self._close_watcher = _WindowCloseWatcher(self)
            window.installEventFilter(self._close_watcher)

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


class CollapsibleSection(QWidget):
    """A titled section whose fields are hidden until its header button is clicked ("Advanced ▸")."""

    def __init__(self, title: str, expanded: bool = False, parent: Optional[QWidget] = None):
        super().__init__(parent)
        from qtpy.QtWidgets import QFormLayout, QToolButton

        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.toggle = QToolButton()
        self.toggle.setText(title)
        self.toggle.setCheckable(True)
        self.toggle.setChecked(expanded)
        self.toggle.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.toggle.setArrowType(Qt.ArrowType.DownArrow if expanded else Qt.ArrowType.RightArrow)
        self.toggle.toggled.connect(self.set_expanded)
        self.content = QWidget()
        self.form = QFormLayout(self.content)
        self.form.setContentsMargins(12, 0, 0, 0)
        self.content.setVisible(expanded)
        layout.addWidget(self.toggle)
        layout.addWidget(self.content)

    def set_expanded(self, on: bool) -> None:
        self.toggle.setArrowType(Qt.ArrowType.DownArrow if on else Qt.ArrowType.RightArrow)
        self.content.setVisible(on)
        if self.toggle.isChecked() != on:
            self.toggle.setChecked(on)


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

    def _add_run_row(self, layout, run_text: str, on_run: Callable[[], Any]) -> None:
        """The Run / Cancel pair (``run_button``, ``cancel_button``) as a row of ``layout``."""
        row = QHBoxLayout()
        self.run_button = QPushButton(run_text)
        self.run_button.clicked.connect(lambda *_: on_run())
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        row.addWidget(self.run_button)
        row.addWidget(self.cancel_button)
        layout.addLayout(row)

    def cancel(self) -> None:
        if self.runner.running:
            self.runner.cancel()
            self.status.setText("cancelling (stops before the next step)…")

    def _on_progress(self, event: Progress) -> None:
        if not self._cleaned:
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
            self._message("error", gui_error_message(outcome.error), self.status)
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

    The user's choice stays put: adding, renaming, moving or removing *other* layers keeps
    the picked layer, and a newly added layer is never picked by itself (napari makes it the
    active layer; only a layer the user activates afterwards is followed), unless nothing
    was picked before. :attr:`layer_changed` is emitted only when the picked layer itself
    changes, so dependent fields are rebuilt only then; ``currentIndexChanged`` likewise.
    :attr:`layers_changed` is emitted after every refresh of the list (for status lines).
    """

    layer_changed = Signal(object)
    layers_changed = Signal()

    def __init__(self, viewer, kinds: Sequence[str], include_own: bool = False, parent: Optional[QWidget] = None):
        super().__init__(parent)
        self._viewer_ref = weakref.ref(viewer)
        self._kinds = tuple(kinds)
        self._include_own = include_own
        self._layers: List[weakref.ReferenceType] = []
        self._picked: Optional[weakref.ReferenceType] = None
        self._fresh: List[weakref.ReferenceType] = []  # just added: their activation is napari's, not the user's
        self.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.setMinimumContentsLength(12)
        viewer.layers.events.inserted.connect(self._on_inserted)
        viewer.layers.events.removed.connect(self.refresh)
        viewer.layers.events.moved.connect(self.refresh)
        viewer.layers.selection.events.active.connect(self._follow_active)
        self.currentIndexChanged.connect(self._on_index_changed)
        self.refresh()

    def _on_inserted(self, event) -> None:
        layer = getattr(event, "value", None)
        if layer is not None:
            self._fresh.append(weakref.ref(layer))
            QTimer.singleShot(0, self._forget_fresh)
        self.refresh()

    def _forget_fresh(self) -> None:
        self._fresh = []

    def _on_index_changed(self, *_args) -> None:
        """The user picked an item (or :meth:`set_layer`): announce a change of layer."""
        layer = self.layer()
        if layer is not self._picked_layer():
            self._picked = weakref.ref(layer) if layer is not None else None
            self.layer_changed.emit(layer)

    def _picked_layer(self):
        return self._picked() if self._picked is not None else None

    def _candidates(self) -> List:
        viewer = self._viewer_ref()
        if viewer is None:
            return []
        return [l for l in viewer.layers if layer_kind(l) in self._kinds and (self._include_own or not is_own(l))]

    def refresh(self, *_args) -> None:
        try:
            current = self._picked_layer()
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
        if self.layer() is not current:
            self.currentIndexChanged.emit(self.currentIndex())  # -> _on_index_changed -> layer_changed
        self.layers_changed.emit()

    def _on_rename(self, *_args) -> None:
        try:
            self.refresh()
        except RuntimeError:
            pass

    def _follow_active(self, event) -> None:
        """Select the layer the user activates in the layer list, when it is a candidate."""
        try:
            layer = event.value
            viewer = self._viewer_ref()
            if viewer is not None and get_state(viewer).restoring_active:
                return  # the plugin gave the active layer back after adding a hidden one: not the user's choice
            if any(r() is layer for r in self._fresh) and self._picked_layer() is not None:
                return  # napari activates every layer it adds: not the user's choice
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


# ---------------------------------------------------------------------------------- threads
def status_label() -> QLabel:
    """The word-wrapped label a widget reports its state in."""
    label = QLabel("")
    label.setWordWrap(True)
    return label


def threads_spinbox(tooltip: str) -> QSpinBox:
    """The "Threads" field: 1-256, starting at :func:`default_threads`."""
    spin = QSpinBox()
    spin.setRange(1, 256)
    spin.setValue(default_threads())
    spin.setToolTip(tooltip)
    return spin


def default_threads() -> int:
    """Torch threads per run when the user does not choose: half the CPU cores, at least one.

    Measured (docs/plugin.md, "Threads"): on a busy 2-core machine a fit with torch's default
    (all cores) ran up to 10x slower than with one thread, because the cores were shared
    with other processes; half the cores leaves room for napari's own drawing thread.
    """
    import os

    return max(1, (os.cpu_count() or 2) // 2)


def call_with_threads(threads: Optional[int], fn: Callable[..., Any], *args, **kwargs) -> Any:
    """``fn(*args, **kwargs)`` with torch limited to ``threads`` intra-op threads, restored afterwards.

    The one place where the widgets set torch's thread count (``torch.set_num_threads`` is
    process-wide: the setting in force when a computation starts is the one it runs with).
    ``threads`` None or 0 leaves torch's setting alone.
    """
    if not threads:
        return fn(*args, **kwargs)
    from ..core.platform_fixes import preload_triton_safely

    preload_triton_safely()  # before anything imports torch
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------- background
class BackgroundTask(QObject):
    """A short computation (device listing, cost estimate) in a plain Python thread, owned by a widget.

    ``start(fn, *args)`` runs ``fn(*args, cancel=...)`` in a non-daemon thread that touches no
    Qt object; a timer on the GUI thread picks up the result and emits :attr:`done` (value)
    or :attr:`failed` (exception). A ``start`` while one is running cancels it and runs the
    new one afterwards (only the latest request counts). When the owning widget goes away
    the timer goes with it, so a late result is never delivered to deleted objects, and
    :meth:`shutdown` cancels and joins the thread.
    """

    done = Signal(object)
    failed = Signal(object)

    def __init__(self, parent: QObject, poll_ms: int = 50):
        super().__init__(parent)
        self._timer = QTimer(self)
        self._timer.setInterval(poll_ms)
        self._timer.timeout.connect(self._poll)
        self._thread: Optional[threading.Thread] = None
        self._box: dict = {}
        self._cancel = threading.Event()
        self._next: Optional[tuple] = None
        self._closed = False

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self, fn: Callable[..., Any], *args, **kwargs) -> None:
        if self._closed:
            return
        if self._thread is not None:
            self._next = (fn, args, kwargs)
            self._cancel.set()
            return
        box: dict = {}
        cancel = threading.Event()

        def target() -> None:
            try:
                box["value"] = fn(*args, cancel=cancel.is_set, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - handed to the GUI thread
                box["error"] = exc

        self._box, self._cancel = box, cancel
        self._thread = threading.Thread(target=target, name="upsample-anything-background", daemon=False)
        self._thread.start()
        self._timer.start()

    def _poll(self) -> None:
        thread = self._thread
        if thread is None or thread.is_alive():
            return
        self._thread = None
        self._timer.stop()
        box, cancelled = self._box, self._cancel.is_set()
        if self._next is not None:
            fn, args, kwargs = self._next
            self._next = None
            self.start(fn, *args, **kwargs)
            return
        if cancelled or self._closed:
            return
        if "error" in box:
            self.failed.emit(box["error"])
        else:
            self.done.emit(box.get("value"))

    def cancel(self) -> None:
        """Cancel the running job (and a queued one); nothing is delivered for it."""
        self._next = None
        self._cancel.set()

    def shutdown(self, timeout: float = 0.0) -> bool:
        """Cancel; wait up to ``timeout`` seconds for the thread; True when it has ended."""
        self._closed = True
        self._next = None
        self._cancel.set()
        try:
            self._timer.stop()
        except RuntimeError:  # the timer went with its widget
            pass
        thread = self._thread
        if thread is None:
            return True
        if timeout > 0:
            thread.join(timeout)
        return not thread.is_alive()


def _start_owned(worker, pool: QThreadPool) -> None:
    """Start a napari/superqt worker in ``pool`` (its owner's) instead of Qt's global pool.

    Same bookkeeping as ``WorkerBase.start`` (napari asks every worker to quit when the
    application quits), but the owner can wait for exactly its own workers.
    """
    registry = getattr(type(worker), "_worker_set", None)
    if registry is not None:
        registry.add(worker)
        try:
            worker._finished.connect(type(worker)._set_discard)
        except AttributeError:  # pragma: no cover - an older superqt without the private signal
            pass
    pool.start(worker)


# ---------------------------------------------------------------------------------- runner
class Runner(QObject):
    """Runs one computation at a time in a napari generator ``thread_worker``.

    ``start(fn, *args, **kwargs)`` runs ``fn(*args, progress=..., cancel=..., **kwargs)``
    (the :mod:`._pipeline` convention) through :func:`._pipeline.guarded`: every progress
    event is a yield of the worker (shown in napari's activity dock as a progress bar and
    re-emitted as :attr:`progressed`), and the run ends with :attr:`finished` carrying an
    :class:`~._pipeline.Outcome`. :meth:`cancel` sets the flag the core polls before every
    optimisation step and tile. :meth:`shutdown` cancels and waits (used when a widget closes).

    The worker runs in the runner's own thread pool, so that :meth:`shutdown` can wait until
    the worker has emitted its last signal: a worker still emitting when the interpreter
    tears Qt down aborts the process.
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
        self._pool = QThreadPool()
        self._pool.setMaxThreadCount(1)

    @property
    def running(self) -> bool:
        return self.worker is not None

    def start(
        self, fn: Callable, *args, device: str = "", budget=None, desc: str = "", threads: Optional[int] = None, **kwargs
    ) -> None:
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
        if threads:
            fn = functools.partial(call_with_threads, int(threads), fn)
        worker = create_worker(
            guarded, fn, self.handle, *args, _start_thread=False, _worker_class=_cancelling_worker_class(), **kwargs
        )
        worker.yielded.connect(self._on_yielded)
        worker.returned.connect(self._on_returned)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self._pbar = progress(total=0, desc=desc or self.what)
        self._info = {
            "id": Runner._next_id,
            "what": self.what,
            "device": device,
            "budget": budget,
            "threads": threads,
            "t0": time.time(),
        }
        viewer = self._viewer_ref()
        if viewer is not None:
            get_state(viewer).begin_run(self._info)
        _start_owned(worker, self._pool)

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
        # ... and the worker, until it has emitted its last signal
        stopped = self._pool.waitForDone(int(timeout * 1000)) and stopped
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
