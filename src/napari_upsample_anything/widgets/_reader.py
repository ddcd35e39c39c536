"""npe2 reader: OME-Zarr results written by this plugin open as lazy napari layers.

``get_reader`` claims a ``*.ome.zarr`` folder when its metadata say this plugin wrote it
(an ``upsample_anything`` attribute next to the NGFF ``ome.multiscales``), and NGFF label images
(``ome["image-label"]``, e.g. ``segment``'s ``labels.ome.zarr``), which open as a Labels layer
with their scale and class names; for any other store it returns None, so napari's other readers (napari-ome-zarr ...) handle it. The layer data
come from :func:`napari_upsample_anything.omezarr.layer_data`: dask arrays, one per pyramid
level, so napari reads only the tiles it shows. No Qt and no torch here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

PathLike = Union[str, Path]
LayerData = Tuple[Any, dict, str]
#: Levels up to this many elements are read once to set contrast limits (a kernel field, LR features).
SMALL_LEVEL_ELEMENTS = 4_000_000


def _single_path(path: Union[PathLike, Sequence[PathLike]]) -> Optional[Path]:
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    return Path(str(path))


def is_plugin_store(path: PathLike) -> bool:
    """True when ``path`` is an OME-Zarr image folder written by this plugin."""
    p = Path(str(path))
    if not p.is_dir() or not p.name.lower().endswith(".ome.zarr"):
        return False
    try:
        import zarr

        attrs = zarr.open_group(str(p), mode="r").attrs
        ome = attrs.get("ome") or {}
        return "upsample_anything" in attrs and bool(ome.get("multiscales"))
    except Exception:  # noqa: BLE001 - not a readable zarr group: not ours
        return False


def is_label_store(path: PathLike) -> bool:
    """True when ``path`` is an NGFF label image (``ome["image-label"]``), e.g. ``labels.ome.zarr``
    written by ``segment`` or :func:`napari_upsample_anything.annotations.save_labels`."""
    p = Path(str(path))
    if not p.is_dir() or not p.name.lower().endswith(".ome.zarr"):
        return False
    try:
        import zarr

        ome = zarr.open_group(str(p), mode="r").attrs.get("ome") or {}
        return "image-label" in ome and bool(ome.get("multiscales"))
    except Exception:  # noqa: BLE001 - not a readable zarr group
        return False


def get_reader(path: Union[PathLike, Sequence[PathLike]]) -> Optional[Callable[[Any], List[LayerData]]]:
    """The reader function for one of our OME-Zarr results or an NGFF label image, or None."""
    p = _single_path(path)
    if p is None:
        return None
    if is_label_store(p):
        return read_labels
    if not is_plugin_store(p):
        return None
    return read_result


def read_labels(path: Union[PathLike, Sequence[PathLike]]) -> List[LayerData]:
    """``[(labels, kwargs, "labels")]``: a label image with its pixel sizes as scale and its class
    names as the layer's features (read by :func:`~napari_upsample_anything.annotations.load_labels`)."""
    from ..annotations import labels_layer_kwargs, load_labels

    p = _single_path(path)
    if p is None:
        raise ValueError(f"path={path!r}: give one OME-Zarr label image")
    labels, info = load_labels(p)
    name = p.name[: -len(".ome.zarr")] if p.name.lower().endswith(".ome.zarr") else p.name
    if p.parent.name:
        name = f"{p.parent.name} {name}"  # "img0 labels": which image the labels belong to
    return [(labels, labels_layer_kwargs(info, name=name), "labels")]


def read_result(path: Union[PathLike, Sequence[PathLike]]) -> List[LayerData]:
    """``[(data, kwargs, "image")]``: lazy (dask) levels with the store's pixel sizes as scale."""
    from ..omezarr import layer_data

    p = _single_path(path)
    if p is None:
        raise ValueError(f"path={path!r}: give one OME-Zarr folder written by napari-upsample-anything")
    levels, kwargs = layer_data(p)
    if "contrast_limits" not in kwargs:
        limits = _contrast_limits(levels[-1] if isinstance(levels, list) else levels, kwargs.get("channel_axis"))
        if limits is not None:
            kwargs["contrast_limits"] = limits
    return [(levels, kwargs, "image")]


def _contrast_limits(smallest, channel_axis: Optional[int]):
    """Per-channel ``[lo, hi]`` from the smallest level when it is small (kernel fields, LR
    features), with a constant channel widened to ``[v, v + 1]``: napari loops forever on a
    lazy channel whose range is empty. None when the level is too big to read here."""
    import numpy as np

    if int(np.prod(smallest.shape)) > SMALL_LEVEL_ELEMENTS:
        return None
    values = np.asarray(smallest, dtype=np.float64)

    def one(arr):
        finite = arr[np.isfinite(arr)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        return [lo, hi if hi > lo else lo + 1.0]

    if channel_axis is None:
        return one(values)
    return [one(np.take(values, c, axis=channel_axis)) for c in range(values.shape[channel_axis])]
