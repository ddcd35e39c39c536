"""Per-viewer store of fitted results, and the plugin's own layers (no Qt, no torch).

Where results live
------------------
Large arrays (LR and HR features, kernel fields, guides, memory logs) are kept in a
:class:`ViewerState` per napari viewer (a weak-keyed dictionary: it disappears with the
viewer), never in ``layer.metadata``, which napari copies and may serialise. The plugin's
layers carry only a small JSON-friendly tag in ``layer.metadata["upsample_anything"]``:
``role`` (``"hr_pca"``, ``"lr_pca"``, ``"kernels"``, ``"memory"``, ...), ``owner`` (what
re-running replaces) and ``result`` (the key of the :class:`FitResult` they show).

Layer rules
-----------
* A user's layer is never modified or removed. The plugin only replaces layers that carry
  its tag with the same ``role`` and ``owner`` (e.g. re-running on the same source layer);
  if a user's layer already has the name, napari gives the new layer a numbered name.
* A result is dropped (and its memory-mapped files deleted) when the last of the plugin's
  layers showing it is removed from the viewer.
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional

from psygnal import Signal

from ._frame import Frame, Index
from ._pipeline import PipelineResult, PlaneResult

TAG = "upsample_anything"

_counter = itertools.count(1)


def emit(signal, *args) -> None:
    """Emit a psygnal signal; a failing listener (e.g. a widget being deleted) is reported, not raised."""
    try:
        signal.emit(*args)
    except Exception as exc:  # noqa: BLE001 - one broken listener must not break a run
        import warnings

        warnings.warn(f"napari-upsample-anything: a listener failed: {exc}", RuntimeWarning, stacklevel=2)


@dataclass(eq=False)
class FitResult:
    """One run of the main widget: the source layer's frame and the pipeline's result."""

    key: str
    frame: Frame
    pipeline: PipelineResult
    source_id: str
    source_ref: Any = None  # weakref to the source layer
    owner: str = ""  # tag owner of the result's layers (what a re-run replaces)
    label: str = ""
    layers: Dict[str, Any] = field(default_factory=dict)  # role -> weakref to the plugin's layer

    @property
    def name(self) -> str:
        """A short form of the source layer's name at fit time (the prefix of the result layers' names)."""
        return short_name(self.frame.source_name)

    @property
    def planes(self) -> List[PlaneResult]:
        return self.pipeline.planes

    @property
    def source_layer(self):
        return self.source_ref() if self.source_ref is not None else None

    def plane(self, index: Optional[Index] = None) -> PlaneResult:
        """The plane at slice ``index`` (the only plane when there is one)."""
        if index is None or len(self.planes) == 1:
            return self.planes[0]
        for p in self.planes:
            if tuple(p.index) == tuple(index):
                return p
        raise KeyError(f"{self.label}: slice {index} was not processed (processed: {[p.index for p in self.planes]})")

    def plane_at_world(self, world_point) -> PlaneResult:
        """The processed plane under a world point (the only plane in mode "current")."""
        if len(self.planes) == 1:
            return self.planes[0]
        return self.plane(self.frame.index_at(world_point))

    def layer(self, role: str):
        ref = self.layers.get(role)
        return ref() if ref is not None else None

    def dispose(self) -> None:
        """Free the memory-mapped HR features (their temporary files) and drop big arrays."""
        storage = self.pipeline.storage
        for p in self.planes:
            p.hr_features = None
        if storage is not None:
            storage.dispose()


class ViewerState:
    """Results and run activity of one viewer; widgets listen to its signals.

    Signals (emitted on the GUI thread)
    -----------------------------------
    results_changed()
        A result was added or dropped.
    run_started(info: dict)
        ``{"id", "device", "budget", "what"}`` of a run that begins (any widget).
    run_progress(event)
        A :class:`~._pipeline.Progress` event of a running computation.
    run_finished(info: dict)
        The same dict, with ``"status"`` ("done" / "cancelled" / "error") added.
    """

    results_changed = Signal()
    run_started = Signal(object)
    run_progress = Signal(object)
    run_finished = Signal(object)

    def __init__(self, viewer) -> None:
        self._viewer_ref = weakref.ref(viewer)
        self.results: Dict[str, FitResult] = {}
        self.active_runs: Dict[int, dict] = {}
        self._suspend = 0
        self.restoring_active = False  # True while put_layer gives the active layer back (pickers ignore it)
        viewer.layers.events.removed.connect(self._on_layer_removed)

    @property
    def viewer(self):
        return self._viewer_ref()

    # ------------------------------------------------------------------ results
    def new_key(self) -> str:
        return f"r{next(_counter)}"

    def add_result(self, result: FitResult) -> None:
        self.results[result.key] = result
        emit(self.results_changed)

    def drop_result(self, key: str) -> None:
        res = self.results.pop(key, None)
        if res is not None:
            res.dispose()
            emit(self.results_changed)

    def result_for_source(self, source_id: str) -> Optional[FitResult]:
        for r in self.results.values():
            if r.source_id == source_id:
                return r
        return None

    def result_of_layer(self, layer) -> Optional[FitResult]:
        tag = tag_of(layer)
        return self.results.get(tag.get("result")) if tag else None

    @contextlib.contextmanager
    def keep_results(self) -> Iterator[None]:
        """Replace layers inside this block without dropping the results they showed."""
        self._suspend += 1
        try:
            yield
        finally:
            self._suspend -= 1

    def _on_layer_removed(self, event) -> None:
        if self._suspend:
            return
        tag = tag_of(event.value)
        if not tag or tag.get("result") not in self.results:
            return
        key = tag["result"]
        viewer = self.viewer
        remaining = [] if viewer is None else [l for l in viewer.layers if tag_of(l).get("result") == key]
        if not remaining:
            self.drop_result(key)

    # ------------------------------------------------------------------ runs
    def begin_run(self, info: dict) -> None:
        self.active_runs[info["id"]] = info
        emit(self.run_started, info)

    def end_run(self, info: dict) -> None:
        self.active_runs.pop(info["id"], None)
        emit(self.run_finished, info)

    @property
    def running(self) -> bool:
        return bool(self.active_runs)


_STATES: weakref.WeakKeyDictionary[Any, ViewerState] = weakref.WeakKeyDictionary()


#: Result layer names start with at most this many characters of the source's name (the layer list is narrow).
SHORT_NAME_CHARS = 12


def short_name(name: str, limit: int = SHORT_NAME_CHARS) -> str:
    """``'histology (IHC)'`` -> ``'histology'``: bracketed parts dropped, cut at a word to ``limit`` characters."""
    import re

    base = re.sub(r"\s*[\(\[][^\)\]]*[\)\]]", "", name).strip() or name.strip() or "image"
    if len(base) <= limit:
        return base
    head = base[:limit]
    if base[limit] != " " and " " in head.strip():
        head = head.rsplit(" ", 1)[0]
    return head.rstrip(" _-.") + "…"


def unwrap_viewer(viewer):
    """The viewer itself, when napari handed a plugin widget a ``PublicOnlyProxy`` of it.

    napari gives plugin widgets a proxy that warns on private attribute access. The plugin
    only uses public API, but it needs the viewer's and the layers' identity: one registry
    per viewer (every widget gets its own proxy object), and weak references to layers
    (the proxy wraps every object it returns in a new, short-lived proxy).
    """
    for _ in range(8):
        inner = getattr(viewer, "__wrapped__", None)
        if inner is None:
            break
        viewer = inner
    return viewer


def get_state(viewer) -> ViewerState:
    """The :class:`ViewerState` of ``viewer`` (created on first use)."""
    viewer = unwrap_viewer(viewer)
    state = _STATES.get(viewer)
    if state is None:
        state = ViewerState(viewer)
        _STATES[viewer] = state
    return state


# ---------------------------------------------------------------------------------- layers
def tag_of(layer) -> dict:
    """The plugin's tag of a layer (empty for a user's layer)."""
    meta = getattr(layer, "metadata", None) or {}
    tag = meta.get(TAG)
    return tag if isinstance(tag, dict) else {}


def is_own(layer) -> bool:
    return bool(tag_of(layer))


def find_own_layer(viewer, role: str, owner: str):
    for layer in viewer.layers:
        tag = tag_of(layer)
        if tag.get("role") == role and tag.get("owner") == owner:
            return layer
    return None


def put_layer(
    viewer,
    data,
    layer_type: str,
    *,
    name: str,
    role: str,
    owner: str,
    result: Optional[str] = None,
    extra_tag: Optional[dict] = None,
    near=None,
    **kwargs,
):
    """Add a plugin layer, replacing (at the same place in the list) the previous one of ``role``/``owner``.

    Only layers tagged by the plugin are ever replaced. A new layer goes right above ``near``
    (its source layer) when given and still in the viewer, else on top. Returns the new layer.
    """
    from napari.layers import Layer

    tag = {"role": role, "owner": owner}
    if result is not None:
        tag["result"] = result
    if extra_tag:
        tag.update(extra_tag)
    metadata = dict(kwargs.pop("metadata", {}) or {})
    metadata[TAG] = tag
    layer = Layer.create(data, {"name": name, "metadata": metadata, **kwargs}, layer_type)
    old = find_own_layer(viewer, role, owner)
    state = get_state(viewer)
    active = viewer.layers.selection.active
    with state.keep_results():
        if old is not None:
            index = viewer.layers.index(old)
            selected = old in viewer.layers.selection
            viewer.layers.remove(old)
            viewer.layers.insert(index, layer)
            if not selected:
                viewer.layers.selection.discard(layer)
        elif near is not None and near in viewer.layers:
            viewer.layers.insert(viewer.layers.index(near) + 1, layer)
        else:
            viewer.add_layer(layer)
    if not layer.visible and viewer.layers.selection.active is layer:
        # napari activates every added layer; a hidden one would take the user's clicks and keys unseen
        state.restoring_active = True
        try:
            viewer.layers.selection.discard(layer)
            if active is not None and active is not old and active in viewer.layers:
                viewer.layers.selection.active = active
        finally:
            state.restoring_active = False
    return layer


#: Layer arguments that only a new layer takes (everything else is set on an existing one).
_CONSTRUCTION_ONLY = ("ndim", "rgb", "shape_type", "multiscale", "cache")


def update_layer(
    viewer,
    data,
    layer_type: str,
    *,
    name: str,
    role: str,
    owner: str,
    result: Optional[str] = None,
    extra_tag: Optional[dict] = None,
    **kwargs,
):
    """Like :func:`put_layer`, but change the existing layer of ``role``/``owner`` in place when it has
    the same type and dimensions (no removal: napari collects garbage on every removed layer, a
    second or more with torch loaded, too slow for a click). Returns the layer."""
    from ._frame import layer_kind

    old = find_own_layer(viewer, role, owner)
    shape = getattr(data, "shape", ())
    ndim = (shape[-1] if layer_type in ("points", "vectors") else len(shape)) if shape else -1
    if old is None or layer_kind(old) != layer_type or old.ndim != ndim or any(k in kwargs for k in _CONSTRUCTION_ONLY):
        return put_layer(
            viewer, data, layer_type, name=name, role=role, owner=owner, result=result, extra_tag=extra_tag, **kwargs
        )
    tag = {"role": role, "owner": owner}
    if result is not None:
        tag["result"] = result
    if extra_tag:
        tag.update(extra_tag)
    settable = dict(kwargs)
    try:
        for key in ("scale", "translate"):
            if key in settable:
                setattr(old, key, settable.pop(key))
        old.data = data
        if "features" in settable:
            old.features = settable.pop("features")
        for key, value in settable.items():
            setattr(old, key, value)
        old.name = name
        old.metadata = {**dict(old.metadata), TAG: tag}
    except Exception:  # noqa: BLE001 - an attribute napari refuses on a live layer: make a new one
        return put_layer(
            viewer, data, layer_type, name=name, role=role, owner=owner, result=result, extra_tag=extra_tag, **kwargs
        )
    return old


def remove_result_layers(viewer, result_key: str) -> int:
    """Remove every layer of one result (the run's, the inspector's, the explorer's) and drop the result.

    Layers the user made are never touched (only plugin-tagged layers of that result). Returns
    how many layers were removed.
    """
    state = get_state(viewer)
    doomed = [l for l in viewer.layers if tag_of(l).get("result") == result_key]
    with state.keep_results():
        for layer in doomed:
            viewer.layers.remove(layer)
    state.drop_result(result_key)
    return len(doomed)


def remove_own_layer(viewer, role: str, owner: str) -> bool:
    """Remove the plugin's layer of ``role``/``owner`` if there is one."""
    old = find_own_layer(viewer, role, owner)
    if old is None:
        return False
    viewer.layers.remove(old)
    return True


def result_label(result: FitResult) -> str:
    frame = result.frame
    where = ""
    if frame.is_stack:
        where = " (all slices)" if frame.mode == "all" else f" (slice {', '.join(map(str, frame.indices[0]))})"
    return f"{frame.source_name}{where}"
