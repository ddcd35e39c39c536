"""The dock widgets' base classes: one layout owner, a scrolling body, cleanup however a widget goes away.

:class:`PluginWidget` (layouts, messages, cleanup), :class:`RunWidget` (a Run / Cancel pair
driving a :class:`._threads.Runner`) and :class:`CollapsibleSection` ("Advanced ▸").
"""

from __future__ import annotations

import functools
import sys
import weakref
from typing import Any, Callable, List, Optional, Sequence

from qtpy.QtCore import QEvent, QObject, Qt, qInstallMessageHandler
from qtpy.QtWidgets import (
    QApplication,
    QComboBox,
    QFrame,
    QHBoxLayout,
    QLabel,
    QLayout,
    QPushButton,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

from ._messages import gui_error_message, notify
from ._pipeline import Outcome, Progress

#: ids of PluginWidgets whose ``__init__`` is running (see ``PluginWidget.__init_subclass__``).
_INITIALISING: set = set()


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


def status_label() -> QLabel:
    """The word-wrapped label a widget reports its state in."""
    label = QLabel("")
    label.setWordWrap(True)
    return label
