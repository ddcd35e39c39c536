"""Writing (and reading back) the pipeline's arrays as OME-Zarr (NGFF 0.5, zarr v3).

* :func:`create_image` makes an OME-Zarr image group with ``[t,] c, [z,] y, x`` axes (NGFF
  order: time, channel, space), units and pixel sizes, and one array per pyramid level.
* :class:`BandWriter` lets the render engine (which writes ``out[:, y0:y1, x0:x1] = tile``
  tile by tile, top to bottom) write one ``(C, H, W)`` plane into a region of a zarr array
  through a bounded row-band buffer: whole chunk rows are written once, and memory holds at
  most one band plus one tile, never the whole plane.
* :func:`build_pyramid` fills levels 1.. of an image from level 0 (2 x 2 means), plane by plane.
* :func:`write_kernels` / :func:`read_kernels` store kernel fields (sigma_x, sigma_y, theta,
  sigma_r on the LR grid) with their fit metadata, so ``map --kernels`` can reuse them.

ome-zarr-py 0.18 writes NGFF 0.5 (zarr v3 ``zarr.json`` with an ``ome`` attribute). Every
store with a channel axis gets a complete ``omero`` block (label, colour, window, active per
channel: :func:`omero_metadata`), LR grids a translation that centres each cell on the HR
pixels it covers (:func:`lr_grid_geometry`), pyramid levels the translation of the pixels
they average; yaozarrs, ome-zarr-models, bioio-ome-zarr and napari-ome-zarr read them
(tests/test_ome_zarr_readers.py, docs/microscopy.md). No Qt and no torch here (except
read_kernels).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

KERNEL_CHANNELS = ("sigma_x", "sigma_y", "theta", "sigma_r")
#: The row-band buffer of a BandWriter holds at most about this many bytes (plus one tile).
BAND_BYTES = 128 * 2**20


def output_axes(n_t: Optional[int], n_z: Optional[int]) -> str:
    """``"czyx"``-style axes of an output: t and z only where the source has them (size > 1)."""
    return ("t" if n_t and n_t > 1 else "") + "c" + ("z" if n_z and n_z > 1 else "") + "yx"


def _axes_meta(axes: str, unit: Optional[str]) -> List[Dict[str, str]]:
    out = []
    for a in axes:
        if a == "t":
            out.append({"name": "t", "type": "time"})
        elif a == "c":
            out.append({"name": "c", "type": "channel"})
        else:
            d = {"name": a, "type": "space"}
            if unit:
                d["unit"] = unit
            out.append(d)
    return out


def feature_chunks(shape: Sequence[int], axes: str, itemsize: int = 4) -> Tuple[int, ...]:
    """Shards (the zarr v3 files) of about 1 MiB and more: up to 16 channels, one t / z plane,
    the full width, rows kept few enough that a band of shard rows over all channels stays
    within :data:`BAND_BYTES` (the :class:`BandWriter` writes whole shards, once each)."""
    sizes = dict(zip(axes, shape))
    C, W = sizes["c"], sizes["x"]
    cc = min(C, 16)
    rows = max(1, BAND_BYTES // max(1, C * W * itemsize))
    yc = max(1, min(sizes["y"], 2 ** int(math.log2(rows)), max(16, (2**20) // max(1, cc * min(W, 512) * itemsize))))
    return tuple({"t": 1, "c": cc, "z": 1, "y": yc, "x": W}[a] for a in axes)


def inner_chunks(shards: Sequence[int], axes: str) -> Tuple[int, ...]:
    """The chunks inside each shard: one channel, the shard's rows, at most 512 columns, so a
    viewer showing one channel decodes that channel only (not the 16 of its shard)."""
    return tuple(1 if a == "c" else min(s, 512) if a == "x" else s for a, s in zip(axes, shards))


def default_colors(n: int) -> List[str]:
    """omero colours (hex RGB) of ``n`` channels: red / green / blue for 3 (a PCA picture or an
    RGB map), white (a gray colormap) otherwise."""
    return ["FF0000", "00FF00", "0000FF"] if n == 3 else ["FFFFFF"] * n


def channel_windows(data: np.ndarray, channel_axis: int = 0) -> List[Tuple[float, float]]:
    """``(min, max)`` of the finite values of each channel (``(0, 1)`` for an empty or constant
    channel widened by 1), the omero display window of a store written from ``data``."""
    data = np.moveaxis(np.asarray(data), channel_axis, 0)
    out = []
    for ch in data:
        v = ch[np.isfinite(ch)] if ch.dtype.kind == "f" else ch
        lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 1.0)
        out.append((lo, hi if hi > lo else lo + 1.0))
    return out


def omero_metadata(
    names: Sequence[str],
    windows: Sequence[Tuple[float, float]],
    colors: Optional[Sequence[str]] = None,
    visible: Optional[Sequence[bool]] = None,
) -> Dict[str, Any]:
    """The NGFF ``omero`` block: per channel a label, a colour, a display window
    (``start``/``end`` and ``min``/``max``, both the given range) and whether it is shown."""
    n = len(names)
    if len(windows) != n:
        raise ValueError(f"{len(windows)} display windows for {n} channels")
    colors = list(colors) if colors is not None else default_colors(n)
    visible = list(visible) if visible is not None else [True] * n
    channels = []
    for name, (lo, hi), color, shown in zip(names, windows, colors, visible):
        lo, hi = float(lo), float(hi)
        channels.append(
            {
                "label": str(name),
                "color": color,
                "window": {"start": lo, "end": hi, "min": lo, "max": hi},
                "active": bool(shown),
                "family": "linear",
                "coefficient": 1.0,
                "inverted": False,
            }
        )
    return {"channels": channels, "rdefs": {"model": "color"}}


def create_image(
    path: str | Path,
    shape: Sequence[int],
    axes: str,
    *,
    dtype="float32",
    pixel_sizes: Optional[Dict[str, Optional[float]]] = None,
    unit: Optional[str] = None,
    name: str = "image",
    levels: int = 1,
    chunks: Optional[Sequence[int]] = None,
    shards: Optional[Sequence[int]] = None,
    channel_names: Optional[Sequence[str]] = None,
    windows: Optional[Sequence[Tuple[float, float]]] = None,
    colors: Optional[Sequence[str]] = None,
    visible: Optional[Sequence[bool]] = None,
    translation: Optional[Dict[str, float]] = None,
    attrs: Optional[Dict[str, Any]] = None,
):
    """Create an OME-Zarr image group at ``path`` and return its level-0 zarr array.

    Parameters
    ----------
    shape : the level-0 shape in ``axes`` order (e.g. ``(C, Z, Y, X)`` for ``"czyx"``).
    pixel_sizes : physical size of one level-0 pixel per spatial axis (``"z"``, ``"y"``,
        ``"x"``), in ``unit`` (e.g. ``"micrometer"``); missing sizes are 1 (pixel units).
    levels : pyramid levels; level k halves y and x k times (filled by :func:`build_pyramid`:
        level-k pixel ``j`` is the mean of level-0 pixels ``j 2^k .. (j + 1) 2^k - 1``, so its
        scale is ``2^k`` level-0 pixels and its translation puts it at their centre).
    chunks, shards : zarr v3 chunks (and shards, the files). Default: shards of
        :func:`feature_chunks` holding one-channel chunks (:func:`inner_chunks`), so that
        tile-by-tile writing writes whole shards and a viewer reads one channel alone.
        Given ``chunks`` alone: plain chunks, no sharding.
    channel_names, windows, colors, visible : the ``omero`` block of a store with a ``c``
        axis (written always): labels (default ``"channel i"``), display windows ``(lo, hi)``
        in data units (default ``(0, 1)``), hex colours (default :func:`default_colors`),
        and which channels a viewer shows at first (default all).
    translation : world position (in ``unit``) of the centre of level-0 pixel 0 per spatial
        axis; an LR grid of scale ``s`` HR pixels over an HR image of pixel size ``p`` is at
        ``(s - 1) / 2 * p``, so that LR cell 0 covers HR pixels ``0 .. s - 1``.
    attrs : extra JSON metadata stored under ``"upsample_anything"``.
    """
    import zarr
    from ome_zarr.writer import write_multiscales_metadata

    axes = axes.lower()
    shape = tuple(int(s) for s in shape)
    if len(axes) != len(shape):
        raise ValueError(f"axes {axes!r} do not match shape {shape}")
    sizes = pixel_sizes or {}
    offsets = {a: float(v) for a, v in (translation or {}).items() if v}
    have_unit = unit if any(sizes.get(a) for a in "zyx" if a in axes) else None
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    if chunks is None and shards is None:
        shards = feature_chunks(shape, axes, np.dtype(dtype).itemsize) if "c" in axes else None
        chunks = inner_chunks(shards, axes) if shards is not None else tuple(min(s, 512) for s in shape)
    elif chunks is None:
        chunks = inner_chunks(shards, axes)
    datasets = []
    level_shape = list(shape)
    first = None
    for k in range(max(1, int(levels))):
        if k:
            for a in "yx":
                i = axes.index(a)
                level_shape[i] = max(1, -(-level_shape[i] // 2))
        outer = tuple(min(c, s) for c, s in zip(shards, level_shape)) if shards is not None else None
        inner = tuple(min(c, s) for c, s in zip(chunks, outer or level_shape))
        if outer is not None:  # a shard holds whole chunks
            outer = tuple(-(-o // i) * i for o, i in zip(outer, inner))
        arr = root.create_array(
            str(k),
            shape=tuple(level_shape),
            chunks=inner,
            shards=outer,
            dtype=dtype,
            fill_value=0,
            dimension_names=list(axes),
        )
        first = arr if first is None else first
        scale, shift = [], []
        for a in axes:
            size = float(sizes.get(a) or 1.0)
            factor = 2**k if a in "yx" else 1
            scale.append(size * factor)
            shift.append(offsets.get(a, 0.0) + (factor - 1) / 2 * size if a in "zyx" else 0.0)
        transforms: List[Dict[str, Any]] = [{"type": "scale", "scale": scale}]
        if any(shift):
            transforms.append({"type": "translation", "translation": shift})
        datasets.append({"path": str(k), "coordinateTransformations": transforms})
    write_multiscales_metadata(root, datasets=datasets, axes=_axes_meta(axes, have_unit), name=name)
    extra = dict(attrs or {})
    if "c" in axes:
        n = shape[axes.index("c")]
        names = [str(c) for c in channel_names] if channel_names is not None else [f"channel {i}" for i in range(n)]
        if len(names) != n:
            raise ValueError(f"{len(names)} channel names for {n} channels")
        extra["channel_names"] = names
        ome = dict(root.attrs["ome"])
        ome["omero"] = omero_metadata(names, windows if windows is not None else [(0.0, 1.0)] * n, colors, visible)
        root.attrs["ome"] = ome
    if extra:
        root.attrs["upsample_anything"] = json.loads(json.dumps(extra, default=_json_default))
    return first


def world_coordinates(path: str | Path, index: Sequence[float], level: int = 0) -> List[float]:
    """World coordinates (``scale * index + translation``, NGFF order) of an index of a level."""
    import zarr

    ms = zarr.open_group(str(path), mode="r").attrs["ome"]["multiscales"][0]
    scale, shift = transforms_of(ms["datasets"][level])
    return [float(s) * float(i) + float(t) for s, i, t in zip(scale, index, shift)]


def transforms_of(dataset: Dict[str, Any]) -> Tuple[List[float], List[float]]:
    """``(scale, translation)`` of one NGFF dataset entry (translation zeros when absent)."""
    scale, shift = None, None
    for t in dataset.get("coordinateTransformations", []):
        if t["type"] == "scale":
            scale = [float(v) for v in t["scale"]]
        elif t["type"] == "translation":
            shift = [float(v) for v in t["translation"]]
    if scale is None:
        raise ValueError("an OME-Zarr dataset without a scale transformation")
    return scale, shift if shift is not None else [0.0] * len(scale)


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def plane_region(axes: str, t: Optional[int], z: Optional[int]) -> Tuple[Any, ...]:
    """Index prefix pattern for plane (t, z) of an array with ``axes``: a tuple with ``None`` at
    the channel, y and x positions (filled by :func:`region_index`)."""
    return tuple(t if a == "t" else z if a == "z" else None for a in axes)


def region_index(
    region: Tuple[Any, ...], axes: str, cs: Any = slice(None), ys: Any = slice(None), xs: Any = slice(None)
) -> Tuple[Any, ...]:
    """The index of channels ``cs``, rows ``ys`` and columns ``xs`` of a plane's ``region``
    (:func:`plane_region`) in an array with ``axes``; by default the whole plane."""
    fill = {"c": cs, "y": ys, "x": xs}
    return tuple(fill[a] if r is None else r for a, r in zip(axes, region))


class BandWriter:
    """A ``(C, H, W)`` write target that stages rows in a bounded buffer before the zarr array.

    The engine writes tiles in row-major order of the LR grid, so when a tile starting at HR
    row ``y0`` arrives, every row above ``y0`` is complete. Complete bands of ``band_rows``
    rows (the array's chunk height) are written to ``array[region]`` in one go. A write above
    the buffered rows (not expected) goes straight to the array, so the result is right in any
    order. Call :meth:`close` at the end to write the last rows.
    """

    def __init__(
        self, array, axes: str, region: Tuple[Any, ...], plane_shape: Tuple[int, int, int], band_rows: Optional[int] = None
    ):
        self.array = array
        self.axes = axes
        self.region = region
        self.shape = tuple(int(s) for s in plane_shape)
        self.dtype = np.dtype(array.dtype)
        self.ndim = 3
        self.band_rows = int(band_rows or array.chunks[axes.index("y")])
        self.base = 0  # first row not yet written to the array
        self.buf: Optional[np.ndarray] = None
        self.rows_written = 0
        self.bands_written = 0

    def _ensure(self, rows: int) -> None:
        C, _, W = self.shape
        if self.buf is None or self.buf.shape[1] < rows:
            cap = -(-rows // self.band_rows) * self.band_rows
            new = np.zeros((C, cap, W), self.dtype)
            if self.buf is not None:
                new[:, : self.buf.shape[1]] = self.buf
            self.buf = new

    def _flush(self, n_rows: int) -> None:
        if n_rows <= 0:
            return
        C, H, W = self.shape
        n_rows = min(n_rows, H - self.base)
        key = region_index(self.region, self.axes, slice(None), slice(self.base, self.base + n_rows), slice(None))
        self.array[key] = self.buf[:, :n_rows]
        rest = self.buf.shape[1] - n_rows
        if rest > 0:
            self.buf[:, :rest] = self.buf[:, n_rows:].copy()
        self.buf[:, rest:] = 0
        self.base += n_rows
        self.rows_written += n_rows
        self.bands_written += 1

    def __setitem__(self, key, value) -> None:
        cs, ys, xs = key
        y0, y1, _ = ys.indices(self.shape[1])
        value = np.asarray(value, self.dtype)
        if y0 < self.base:  # out of order: write through (correct, just slower)
            self.array[region_index(self.region, self.axes, cs, ys, xs)] = value
            return
        while y0 - self.base >= self.band_rows:
            self._ensure(self.band_rows)
            self._flush(self.band_rows)
        self._ensure(y1 - self.base)
        self.buf[cs, y0 - self.base : y1 - self.base, xs] = value

    def close(self) -> None:
        """Write the rows still buffered and free the buffer."""
        if self.buf is not None and self.base < self.shape[1]:
            self._flush(self.shape[1] - self.base)
        self.buf = None


def build_pyramid(path: str | Path) -> int:
    """Fill levels 1.. of the OME-Zarr image at ``path`` from level 0 by 2 x 2 means, one
    Y x X plane at a time. Returns the number of levels."""
    import zarr

    root = zarr.open_group(str(path), mode="r+")
    datasets = root.attrs["ome"]["multiscales"][0]["datasets"]
    axes = [a["name"] for a in root.attrs["ome"]["multiscales"][0]["axes"]]
    lead = [i for i, a in enumerate(axes) if a not in ("y", "x")]
    for k in range(1, len(datasets)):
        src, dst = root[datasets[k - 1]["path"]], root[datasets[k]["path"]]
        for idx in np.ndindex(*[src.shape[i] for i in lead]):
            plane = np.asarray(src[idx], np.float64)
            H, W = plane.shape
            padded = np.pad(plane, ((0, H % 2), (0, W % 2)), mode="edge")
            small = padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2).mean(axis=(1, 3))
            dst[idx] = small.astype(dst.dtype)
    return len(datasets)


def pyramid_levels(shape_yx: Tuple[int, int], smallest: int = 256) -> int:
    """Levels until the longest side is at most ``smallest`` pixels (at least 1)."""
    n, side = 1, max(shape_yx)
    while side > smallest:
        side = -(-side // 2)
        n += 1
    return n


def open_level0(path: str | Path, mode: str = "r"):
    """The level-0 zarr array, the axes string and our metadata of an OME-Zarr image."""
    import zarr

    root = zarr.open_group(str(path), mode=mode)
    ms = root.attrs["ome"]["multiscales"][0]
    axes = "".join(a["name"] for a in ms["axes"])
    return root[ms["datasets"][0]["path"]], axes, dict(root.attrs.get("upsample_anything", {}))


def lr_grid_geometry(
    hr_pixel_sizes: Dict[str, Optional[float]], hr_shape: Tuple[int, int], lr_shape: Tuple[int, int]
) -> Tuple[Dict[str, Optional[float]], Dict[str, float]]:
    """``(pixel_sizes, translation)`` of an LR grid over an HR image: one LR cell is
    ``s = H / h`` HR pixels, and cell 0 is centred on HR pixel ``(s - 1) / 2`` (the centre of
    the HR pixels it covers, the engine's geometry in :mod:`.core.grid`)."""
    sizes: Dict[str, Optional[float]] = {"z": hr_pixel_sizes.get("z")}
    shift: Dict[str, float] = {}
    for a, n_hr, n_lr in (("y", hr_shape[0], lr_shape[0]), ("x", hr_shape[1], lr_shape[1])):
        p = float(hr_pixel_sizes.get(a) or 1.0)
        s = n_hr / n_lr
        sizes[a] = p * s
        shift[a] = (s - 1.0) / 2.0 * p
    return sizes, shift


def write_kernels(
    path: str | Path,
    fields: Dict[Tuple[int, int], Any],
    axes: str,
    plane_index: Dict[Tuple[int, int], Tuple[Optional[int], Optional[int]]],
    lr_shape: Tuple[int, int],
    n_t: int,
    n_z: int,
    pixel_sizes=None,
    unit=None,
    hr_shape=None,
    translation=None,
) -> None:
    """Store kernel fields of planes ``(t, z)`` (source indices) as a 4-channel LR-grid image,
    with each field's metadata and fit options (the record ``kernels.npz`` keeps), so that
    :func:`read_kernels` gives back fields that render exactly as the saved ``.npz`` ones."""
    shape = tuple({"t": n_t, "c": 4, "z": n_z, "y": lr_shape[0], "x": lr_shape[1]}[a] for a in axes)
    meta = {str(list(k)): f.meta for k, f in fields.items()}
    options = {str(list(k)): f.options.to_dict() for k, f in fields.items() if f.options is not None}
    maps = {key: f.numpy() for key, f in fields.items()}
    stacked = {key: np.stack([m[n] for n in KERNEL_CHANNELS]) for key, m in maps.items()}
    windows = channel_windows(np.concatenate([v.reshape(4, -1) for v in stacked.values()], axis=1))
    arr = create_image(
        path,
        shape,
        axes,
        pixel_sizes=pixel_sizes,
        unit=unit,
        name="kernels",
        channel_names=KERNEL_CHANNELS,
        windows=windows,
        colors=["FF00FF", "00FFFF", "FFFF00", "FFFFFF"],
        visible=[True, False, False, False],
        translation=translation,
        chunks=tuple(1 if a in "tz" else s for a, s in zip(axes, shape)),
        attrs={
            "kind": "kernel-field",
            "meta": meta,
            "options": options,
            "planes": {str(list(k)): list(v) for k, v in plane_index.items()},
            "hr_shape": list(hr_shape or ()),
        },
    )
    for key, data in stacked.items():
        region = plane_region(axes, *plane_index[key])
        arr[region_index(region, axes, slice(None), slice(None), slice(None))] = data


def read_kernels(path: str | Path) -> Dict[Tuple[int, int], Any]:
    """``{(t, z): KernelField}`` from a store written by :func:`write_kernels`, with their fit
    options (None for stores written before options were kept)."""
    import torch

    from .core.field import FitOptions, KernelField

    arr, axes, extra = open_level0(path)
    if extra.get("kind") != "kernel-field":
        raise ValueError(f"{path} is not a kernel field store (kernels.ome.zarr written by upsample-anything)")
    out = {}
    for key, pos in extra["planes"].items():
        t, z = json.loads(key)
        region = plane_region(axes, *pos)
        data = np.asarray(arr[region_index(region, axes, slice(None), slice(None), slice(None))], np.float32)
        maps = {n: torch.from_numpy(np.ascontiguousarray(data[i])) for i, n in enumerate(KERNEL_CHANNELS)}
        raw = (extra.get("options") or {}).get(key)
        options = FitOptions.from_dict(raw) if raw is not None else None
        out[(t, z)] = KernelField(**maps, meta=dict(extra["meta"].get(key, {})), options=options)
    return out


def layer_data(path: str | Path, *, rgb_channels: bool = True) -> Tuple[List[Any], Dict[str, Any]]:
    """napari ``add_image`` arguments for an OME-Zarr image, lazily: ``(levels, kwargs)``.

    ``levels`` are dask arrays (one per pyramid level; napari reads only the tiles it shows),
    ``kwargs`` the scale (pixel sizes), ``channel_axis`` and, for a 3-channel PCA picture,
    red / green / blue colormaps with additive blending::

        levels, kw = layer_data("out/stack/pca.ome.zarr")
        viewer.add_image(levels, **kw)
    """
    import dask.array as da
    import zarr

    root = zarr.open_group(str(path), mode="r")
    ms = root.attrs["ome"]["multiscales"][0]
    axes = "".join(a["name"] for a in ms["axes"])
    levels = [da.from_zarr(root[d["path"]]) for d in ms["datasets"]]
    scale, shift = transforms_of(ms["datasets"][0])
    kw: Dict[str, Any] = {"name": ms.get("name") or Path(str(path)).name, "multiscale": len(levels) > 1}
    if "c" in axes:
        c = axes.index("c")
        kw["channel_axis"] = c
        kw["scale"] = [s for i, s in enumerate(scale) if i != c]
        kw["translate"] = [s for i, s in enumerate(shift) if i != c]
        n = int(levels[0].shape[c])
        if rgb_channels and n == 3:
            kw["colormap"] = ["red", "green", "blue"]
            kw["blending"] = "additive"
            kw["contrast_limits"] = [[0.0, 1.0]] * 3
            kw["name"] = [f"{kw['name']} {x}" for x in ("PC1", "PC2", "PC3")]
        elif n > 8:  # features: show one channel at a time, not hundreds of layers
            kw.pop("channel_axis")
            kw["scale"] = scale
            kw["translate"] = shift
    else:
        kw["scale"] = scale
        kw["translate"] = shift
    windows = [(ch["window"]["start"], ch["window"]["end"]) for ch in root.attrs["ome"].get("omero", {}).get("channels", [])]
    if windows and "contrast_limits" not in kw:  # the stores' own windows: nothing to read for them
        if "channel_axis" in kw:
            kw["contrast_limits"] = [list(w) for w in windows]
        else:
            kw["contrast_limits"] = [min(w[0] for w in windows), max(w[1] for w in windows)]
    if not kw["multiscale"]:
        levels = levels[0]
    return levels, kw
