"""Combo boxes that follow the viewer: its layers of some kinds, and the fitted results."""

from __future__ import annotations

import weakref
from typing import List, Optional, Sequence

from qtpy.QtCore import QTimer, Signal
from qtpy.QtWidgets import QComboBox, QWidget

from ._frame import layer_kind
from ._registry import FitResult, get_state, is_own, result_label


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
