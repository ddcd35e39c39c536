"""Labels in and out: scribbles and segmentations as OME-Zarr labels or TIFF, with class names.

* :func:`create_labels` makes an NGFF 0.5 ``image-label`` (zarr v3) with ``[t,] [z,] y, x``
  axes, pixel sizes, a colour per class (``colors``) and the class names
  (``properties``: ``{"label-value": v, "class": name}``), and returns its level-0 array
  (written plane by plane by ``segment``, so a stack never has to fit in memory).
* :func:`save_labels` writes a whole labels array (``.ome.zarr`` folder, or ``.tif`` /
  ``.tiff`` with the class names and pixel sizes in the TIFF's JSON description).
* :func:`load_labels` reads either back as ``(array, info)``; ``info`` has ``class_names``
  (value -> name), ``colors`` (value -> RGBA in [0, 1]), ``axes`` and ``scale`` (pixel sizes
  per axis), which is what a napari Labels layer needs (:func:`labels_layer_kwargs`).

A label image written here opens in napari as a Labels layer, with its scale and class names,
through this plugin's reader (``viewer.open(path, plugin="napari-upsample-anything")``;
``widgets/_reader.py`` claims NGFF label images) and through napari-ome-zarr
(``plugin="napari-ome-zarr"``); napari's built-in reader, first in line for ``*.zarr`` when
no plugin is named, shows it as a plain Image.
Everything is written under a temporary name and renamed when complete. No Qt, no torch.
"""

from __future__ import annotations

import colorsys
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

__all__ = ["create_labels", "label_colors", "labels_dtype", "labels_layer_kwargs", "load_labels", "save_labels"]

_TIFF_KEY = "upsample_anything_labels"


def labels_dtype(classes: Sequence[int]) -> np.dtype:
    """The smallest unsigned dtype holding every class value (and 0, unlabelled)."""
    top = max([0] + [int(c) for c in classes])
    if min([0] + [int(c) for c in classes]) < 0:
        raise ValueError(
            f"negative class values {sorted(int(c) for c in classes if int(c) < 0)}: use 0 for unlabelled and positive classes"
        )
    return np.dtype(np.uint8 if top < 256 else np.uint16 if top < 65536 else np.uint32)


def label_colors(classes: Sequence[int]) -> Dict[int, Tuple[float, float, float, float]]:
    """A distinct, deterministic RGBA colour (floats in [0, 1]) for each class value (golden-ratio hues)."""
    out = {}
    for v in classes:
        v = int(v)
        if v == 0:
            out[0] = (0.0, 0.0, 0.0, 0.0)
            continue
        hue = (0.61803398875 * v) % 1.0
        r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.95)
        out[v] = (round(r, 4), round(g, 4), round(b, 4), 1.0)
    return out


def _label_meta(classes, class_names, colors) -> Dict[str, Any]:
    classes = [int(c) for c in classes if int(c) != 0]
    colors = dict(colors or label_colors(classes))
    names = {int(k): str(v) for k, v in dict(class_names or {}).items()}
    return {
        "version": "0.5",
        "colors": [
            {"label-value": v, "rgba": [int(round(255 * float(x))) for x in colors.get(v, label_colors([v])[v])]} for v in classes
        ],
        "properties": [{"label-value": v, "class": names.get(v, f"class {v}")} for v in classes],
    }


def _scale(axes: str, pixel_sizes: Optional[Dict[str, Optional[float]]]) -> list:
    sizes = pixel_sizes or {}
    return [float(sizes.get(a) or 1.0) if a in "zyx" else 1.0 for a in axes]


def create_labels(
    path: str | Path,
    shape: Sequence[int],
    axes: str,
    classes: Sequence[int],
    *,
    class_names: Optional[Dict[int, str]] = None,
    colors: Optional[Dict[int, Sequence[float]]] = None,
    pixel_sizes: Optional[Dict[str, Optional[float]]] = None,
    unit: Optional[str] = None,
    name: str = "labels",
    dtype=None,
    source_image: Optional[str] = None,
):
    """Create an OME-Zarr label image at ``path`` (written in place: callers rename the folder)
    and return its level-0 zarr array (zeros = unlabelled).

    Parameters
    ----------
    shape, axes : level-0 shape and its axes, a subsequence of ``"tzyx"`` ending in ``"yx"``.
    classes : the class values (0, unlabelled, needs no entry).
    class_names : value -> name; missing names become ``"class <value>"``.
    colors : value -> RGBA floats in [0, 1] (default :func:`label_colors`).
    pixel_sizes : physical size of a pixel per spatial axis, in ``unit``.
    source_image : relative path of the image the labels belong to (NGFF ``source``).
    """
    import zarr
    from ome_zarr.writer import write_multiscales_metadata

    axes = axes.lower()
    shape = tuple(int(s) for s in shape)
    if len(axes) != len(shape) or not axes.endswith("yx") or any(a not in "tzyx" for a in axes):
        raise ValueError(f"axes={axes!r} for shape {shape}: give [t][z]yx, one letter per dimension")
    dtype = labels_dtype(classes) if dtype is None else np.dtype(dtype)
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    chunks = tuple(1 if a in "tz" else min(s, 1024) for a, s in zip(axes, shape))
    arr = root.create_array("0", shape=shape, chunks=chunks, dtype=dtype, fill_value=0, dimension_names=list(axes))
    axes_meta = []
    sizes = pixel_sizes or {}
    have_unit = unit if any(sizes.get(a) for a in "zyx" if a in axes) else None
    for a in axes:
        d = {"name": a, "type": "time" if a == "t" else "space"}
        if a != "t" and have_unit:
            d["unit"] = have_unit
        axes_meta.append(d)
    datasets = [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": _scale(axes, pixel_sizes)}]}]
    write_multiscales_metadata(root, datasets=datasets, axes=axes_meta, name=name)
    ome = dict(root.attrs["ome"])
    label = _label_meta(classes, class_names, colors)
    if source_image:
        label["source"] = {"image": str(source_image)}
    ome["image-label"] = label
    root.attrs["ome"] = ome
    return arr


def _tmp_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def _replace(tmp: Path, path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    os.replace(tmp, path)


def save_labels(
    path: str | Path,
    labels: np.ndarray,
    *,
    axes: Optional[str] = None,
    class_names: Optional[Dict[int, str]] = None,
    colors: Optional[Dict[int, Sequence[float]]] = None,
    pixel_sizes: Optional[Dict[str, Optional[float]]] = None,
    unit: Optional[str] = None,
    name: Optional[str] = None,
) -> Path:
    """Write a labels array (scribbles or a segmentation) to ``.ome.zarr`` or ``.tif`` / ``.tiff``.

    ``labels``: integer ``(Y, X)``, ``(Z, Y, X)`` ... with ``axes`` (default the last
    ``ndim`` letters of ``"tzyx"``). Class values are the array's non-zero values plus the
    keys of ``class_names``. Written to a temporary name, renamed when complete.
    """
    path = Path(path)
    arr = np.asarray(labels)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"labels have dtype {arr.dtype}; give integer labels (0 = unlabelled)")
    if not 2 <= arr.ndim <= 4:
        raise ValueError(f"labels must be (Y, X) up to (T, Z, Y, X), got shape {arr.shape}")
    axes = (axes or "tzyx"[-arr.ndim :]).lower()
    if len(axes) != arr.ndim:
        raise ValueError(f"axes={axes!r} do not match the labels' shape {arr.shape}")
    values = sorted({int(v) for v in np.unique(arr) if v != 0} | {int(k) for k in (class_names or {})})
    dtype = labels_dtype(values)
    tmp = _tmp_beside(path)
    lower = path.name.lower()
    try:
        if lower.endswith(".zarr"):
            out = create_labels(
                tmp,
                arr.shape,
                axes,
                values,
                class_names=class_names,
                colors=colors,
                pixel_sizes=pixel_sizes,
                unit=unit,
                name=name or path.name.split(".")[0],
                dtype=dtype,
            )
            out[...] = arr.astype(dtype)
        elif lower.endswith((".tif", ".tiff")):
            import tifffile

            meta = _label_meta(values, class_names, colors)
            info = {
                "axes": axes,
                "class_names": {str(p["label-value"]): p["class"] for p in meta["properties"]},
                "colors": {str(c["label-value"]): c["rgba"] for c in meta["colors"]},
                "pixel_sizes": {a: (pixel_sizes or {}).get(a) for a in "zyx"},
                "unit": unit,
            }
            tifffile.imwrite(
                tmp, arr.astype(dtype), description=json.dumps({_TIFF_KEY: info}), metadata=None, photometric="minisblack"
            )
        else:
            raise ValueError(f"{path}: name a .ome.zarr folder or a .tif / .tiff file")
        _replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise
    return path


def load_labels(path: str | Path) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Read labels written by :func:`save_labels` / ``segment`` (or any NGFF label image).

    Returns ``(labels, info)``: ``labels`` numpy, ``info`` with ``axes``, ``scale`` (one
    value per axis), ``class_names`` (value -> name), ``colors`` (value -> RGBA floats) and ``unit``.
    A plain TIFF without this module's description loads with empty names.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"labels file not found: {path}")
    if path.is_dir() or path.name.lower().endswith(".zarr"):
        import zarr

        root = zarr.open_group(str(path), mode="r")
        ome = root.attrs.get("ome") or {}
        if "image-label" not in ome:
            if "labels" in ome and ome["labels"]:  # an image with a labels group: its first label image
                return load_labels(path / "labels" / ome["labels"][0])
            raise ValueError(f"{path} is not an OME-Zarr label image (no 'image-label' metadata)")
        ms = ome["multiscales"][0]
        axes = "".join(a["name"] for a in ms["axes"])
        ds = ms["datasets"][0]
        scale = next((t["scale"] for t in ds.get("coordinateTransformations", []) if t["type"] == "scale"), [1.0] * len(axes))
        arr = np.asarray(root[ds["path"]][...])
        lab = ome["image-label"]
        names = {int(p["label-value"]): str(p.get("class", "")) for p in lab.get("properties", []) if "label-value" in p}
        colors = {int(c["label-value"]): tuple(float(x) / 255.0 for x in c["rgba"]) for c in lab.get("colors", [])}
        unit = next((a.get("unit") for a in ms["axes"] if a.get("unit")), None)
        return arr, {"axes": axes, "scale": [float(s) for s in scale], "class_names": names, "colors": colors, "unit": unit}
    import tifffile

    with tifffile.TiffFile(str(path)) as tf:
        arr = tf.asarray()
        desc = tf.pages[0].description or ""
    try:
        info = json.loads(desc).get(_TIFF_KEY) if desc.startswith("{") else None
    except json.JSONDecodeError:
        info = None
    if not info:
        axes = "tzyx"[-arr.ndim :]
        return arr, {"axes": axes, "scale": [1.0] * arr.ndim, "class_names": {}, "colors": {}, "unit": None}
    axes = info.get("axes") or "tzyx"[-arr.ndim :]
    sizes = info.get("pixel_sizes") or {}
    return arr, {
        "axes": axes,
        "scale": [float(sizes.get(a) or 1.0) if a in "zyx" else 1.0 for a in axes],
        "class_names": {int(k): str(v) for k, v in (info.get("class_names") or {}).items()},
        "colors": {int(k): tuple(float(x) / 255.0 for x in v) for k, v in (info.get("colors") or {}).items()},
        "unit": info.get("unit"),
    }


def labels_layer_kwargs(info: Dict[str, Any], name: str = "labels") -> Dict[str, Any]:
    """``viewer.add_labels(labels, **labels_layer_kwargs(info))``: scale, colours and class names
    (as the layer's ``features`` table, one row per class value) from :func:`load_labels`'s ``info``."""
    names = dict(info.get("class_names") or {})
    kw: Dict[str, Any] = {"name": name, "scale": list(info.get("scale") or [])}
    if names:
        values = [0] + sorted(names)
        kw["features"] = {"index": values, "class": ["unlabelled"] + [names[v] for v in values[1:]]}
    return kw
