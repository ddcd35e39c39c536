"""Message text for the widgets: API argument names turned into field names, and napari toasts that expire."""

from __future__ import annotations

import functools

from qtpy.QtCore import QTimer

from ._pipeline import error_message

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
