"""Images with named axes: files (OME-TIFF, TIFF, OME-Zarr, PNG, JPEG, .npy, ...) and arrays.

Every source is seen as a ``TCZYX`` stack of ``Y x X`` planes with physical pixel sizes, read
lazily one plane at a time:

* OME-TIFF, OME-Zarr and the formats of installed bioio readers (CZI / ND2 / LIF with the
  ``formats`` extra) through :class:`bioio.BioImage`: axes, scenes and pixel sizes come from
  the file's metadata; planes come from ``get_image_dask_data`` chunked per plane.
* ImageJ TIFFs name their axes too (read by tifffile, memory-mapped where possible).
* Plain TIFF and ``.npy``: a 2-D array is ``YX``, an ``(H, W, 3|4)`` array is RGB(A); any
  other layout is ambiguous and needs an explicit axes string (CLI ``--axes``): it is never
  guessed.
* PNG / JPEG / BMP: gray or RGB(A); the size is read from the header first, so a file that
  claims 100000 x 100000 pixels is refused before anything is decoded.
* numpy / dask / zarr arrays (and anything with ``shape``, ``dtype`` and slicing) with an
  axes string such as ``"zyx"``, ``"cyx"``, ``"tczyx"`` or ``"yxs"`` (RGB samples).

The guide of a plane is formed from the chosen channels (``channels="all"`` or indices):
one channel gives a gray ``(H, W)`` guide, several give a channels-last ``(H, W, k)`` guide
(3 are RGB, other counts are the mean of the per-channel normalised images; see
:func:`~.core.features.extract_features`).

No Qt and no torch here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

AXES = "TCZYX"
#: Decoded images larger than this many pixels per plane are refused before decoding.
MAX_PLANE_PIXELS = 2**31
PLANE_RE = re.compile(r"^\s*([tz])\s*=\s*(\d+)?\s*(?::\s*(\d+)?)?\s*$", re.IGNORECASE)

PlaneIndex = Tuple[int, int]  # (t, z)


# ---------------------------------------------------------------------------------- options
def parse_channels(text: str | Sequence[int] | None, n_channels: int, arg: str = "--channels") -> Tuple[int, ...]:
    """``"all"`` / None -> every channel; ``"0,2"`` or a sequence -> those channels (checked)."""
    if text is None or (isinstance(text, str) and text.strip().lower() in ("", "all")):
        return tuple(range(n_channels))
    if isinstance(text, str):
        try:
            picked = tuple(int(p) for p in text.split(","))
        except ValueError:
            raise ValueError(f"{arg} {text!r}: give 'all' or channel indices separated by commas, e.g. 0,2") from None
    else:
        picked = tuple(int(p) for p in text)
    if not picked:
        raise ValueError(f"{arg}: no channel given; use 'all' or e.g. 0,2")
    bad = [c for c in picked if not 0 <= c < n_channels]
    if bad:
        raise ValueError(
            f"{arg} {text!r}: channel {bad[0]} does not exist; the image has {n_channels} channel(s) (0..{n_channels - 1})"
        )
    if len(set(picked)) != len(picked):
        raise ValueError(f"{arg} {text!r}: a channel is listed twice")
    return picked


def parse_planes(text: Optional[str], n_t: int, n_z: int, arg: str = "--planes") -> List[PlaneIndex]:
    """``"all"``, ``"z=3"``, ``"t=0:10"``, ``"t=0,z=2:4"`` -> the (t, z) planes, in t-major order.

    Ranges are Python slices (end excluded; clipped to the planes there are, so ``z=3:6`` on
    5 planes is ``z=3:5``; a range that selects nothing is an error); an index must exist; an
    axis not named keeps all its indices.
    """
    ranges = plane_ranges(text, n_t, n_z, arg)
    return [(t, z) for t in ranges["t"] for z in ranges["z"]]


def plane_ranges(text: Optional[str], n_t: int, n_z: int, arg: str = "--planes") -> Dict[str, range]:
    """The t and z ranges a ``--planes`` expression selects (checked against the sizes)."""
    ranges = {"t": range(n_t), "z": range(n_z)}
    if text is not None and text.strip().lower() not in ("", "all"):
        seen = set()
        for part in text.split(","):
            m = PLANE_RE.match(part)
            if not m:
                raise ValueError(
                    f"{arg} {text!r}: use 'all' or axis=index / axis=start:stop for t and z, e.g. z=3, t=0:10, t=0,z=2:4"
                )
            ax, a, b = m.group(1).lower(), m.group(2), m.group(3)
            if ax in seen:
                raise ValueError(f"{arg} {text!r}: axis {ax} is given twice")
            seen.add(ax)
            n = n_t if ax == "t" else n_z
            colon = ":" in part
            if a is None and not colon:
                raise ValueError(f"{arg} {text!r}: give an index after {ax}=")
            if colon:  # a range clips to the planes there are, like a Python slice
                picked = range(n)[slice(int(a) if a is not None else None, int(b) if b is not None else None)]
            else:  # an index must exist
                picked = range(int(a), int(a) + 1) if 0 <= int(a) < n else range(0)
            if not len(picked):
                raise ValueError(
                    f"{arg} {text!r}: {ax} has {n} plane(s) (0..{n - 1}); {part.strip()} selects "
                    + ("none" if colon else "a plane that does not exist")
                )
            ranges[ax] = picked
    return ranges


def normalise_axes(axes: str, ndim: int, arg: str = "axes") -> str:
    """Upper-case, checked axes string: letters from TCZYXS, each once, Y and X present."""
    if not isinstance(axes, str):
        raise TypeError(f"{arg} must be a string such as 'zyx' or 'cyx', got {type(axes).__name__}")
    up = axes.strip().upper()
    if len(up) != ndim:
        raise ValueError(
            f"{arg}={axes!r} names {len(up)} axes but the array has {ndim} (shape); give one letter per axis from t, c, z, y, x (s for RGB samples)"
        )
    bad = sorted(set(up) - set("TCZYXS"))
    if bad:
        raise ValueError(f"{arg}={axes!r}: unknown axis {bad[0]!r}; use letters from t, c, z, y, x (s = RGB samples)")
    if len(set(up)) != len(up):
        raise ValueError(f"{arg}={axes!r}: an axis is named twice")
    if "Y" not in up or "X" not in up:
        raise ValueError(f"{arg}={axes!r}: y and x (the plane) must both be named")
    if "S" in up and "C" in up:
        raise ValueError(f"{arg}={axes!r}: use either c (channels) or s (RGB samples), not both")
    return up


# ---------------------------------------------------------------------------------- source
@dataclass
class ImageSource:
    """An opened image: a lazy ``TCZYX`` array (``data``; dask, zarr, memmap or numpy), its
    pixel sizes and where it came from.

    ``pixel_sizes`` maps ``"z"``, ``"y"``, ``"x"`` to the physical size of one pixel (None when
    the file does not say); ``unit`` is their unit (micrometer for OME files).
    """

    data: Any  # (T, C, Z, Y, X), sliceable; one plane read by data[t, :, z]
    name: str
    pixel_sizes: Dict[str, Optional[float]] = field(default_factory=dict)
    unit: Optional[str] = None
    channel_names: Tuple[str, ...] = ()
    scene: Optional[str] = None
    path: Optional[str] = None
    rgb: bool = False  # channels are RGB samples of one colour image

    @property
    def sizes(self) -> Dict[str, int]:
        return dict(zip(AXES, (int(s) for s in self.data.shape)))

    @property
    def plane_shape(self) -> Tuple[int, int]:
        return int(self.data.shape[3]), int(self.data.shape[4])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.data.dtype)

    def planes(self, selection: Optional[str] = "all") -> List[PlaneIndex]:
        s = self.sizes
        return parse_planes(selection, s["T"], s["Z"])

    def read(self, t: int, z: int, channels: Optional[Sequence[int]] = None) -> np.ndarray:
        """One plane as ``(k, Y, X)`` numpy (only that plane is read)."""
        chans = list(range(self.sizes["C"])) if channels is None else list(channels)
        plane = self.data[int(t), :, int(z)] if len(chans) == self.sizes["C"] else self.data[int(t), chans, int(z)]
        if hasattr(plane, "compute"):
            plane = plane.compute()
        return np.asarray(plane)

    def guide(self, t: int, z: int, channels: Optional[Sequence[int]] = None) -> np.ndarray:
        """The guide of plane (t, z): ``(Y, X)`` for one channel, ``(Y, X, k)`` channels-last otherwise."""
        p = self.read(t, z, channels)
        return p[0] if p.shape[0] == 1 else np.moveaxis(p, 0, -1)


def _to_tczyx(arr, axes: str):
    """A lazy TCZYX view of ``arr`` with the given (checked, upper-case) axes."""
    import dask.array as da

    a = arr if isinstance(arr, da.Array) else None
    if a is None:
        # one dask chunk per Y x X plane, so that each plane is read on its own
        chunks = tuple(int(s) if ax in "YXSC" else 1 for ax, s in zip(axes, arr.shape))
        a = da.from_array(arr, chunks=chunks)
    axes = axes.replace("S", "C")
    for ax in AXES:
        if ax not in axes:
            a = a[..., None]
            axes += ax
    order = [axes.index(ax) for ax in AXES]
    return a.transpose(order)


def from_array(
    array,
    axes: Optional[str] = None,
    name: str = "array",
    pixel_sizes: Optional[Dict[str, float]] = None,
    unit: Optional[str] = None,
) -> ImageSource:
    """An :class:`ImageSource` over a numpy / dask / zarr array with an explicit axes string.

    2-D arrays may omit ``axes`` (``"yx"``); any other layout must name its axes (``"zyx"``,
    ``"cyx"``, ``"yxs"`` for channels-last RGB, ``"tczyx"`` ...): nothing is guessed.
    """
    shape = getattr(array, "shape", None)
    if shape is None or not hasattr(array, "dtype"):
        raise TypeError(f"image must be an array (numpy, dask, zarr), got {type(array).__name__}")
    if axes is None:
        if len(shape) != 2:
            raise ValueError(
                f"image has shape {tuple(shape)}: give axes= (e.g. 'zyx' for a stack, 'cyx' for channels, "
                "'yxs' for channels-last RGB); the layout of a 3-D or larger array is never guessed"
            )
        axes = "YX"
    axes = normalise_axes(axes, len(shape))
    if np.dtype(array.dtype).kind not in "biuf":
        raise TypeError(f"image has dtype {array.dtype}; give a real-valued or integer image")
    if any(int(s) == 0 for s in shape):
        raise ValueError(f"image is empty (shape {tuple(shape)})")
    data = _to_tczyx(array, axes)
    sizes = pixel_sizes or {}
    return ImageSource(data, name, {k: sizes.get(k) for k in "zyx"}, unit, rgb="S" in axes and data.shape[1] in (3, 4))


def _header_size(path: Path) -> Optional[Tuple[int, int]]:
    """(width, height) from a raster file's header without decoding the pixels (PIL), or None."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow comes with scikit-image
        return None
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # we check the size ourselves, with the file's name
    try:
        with Image.open(path) as im:
            return tuple(int(v) for v in im.size)  # type: ignore[return-value]
    except Exception:  # noqa: BLE001 - not something PIL reads: the reader will say why
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _check_plane_size(path: Path, height: int, width: int) -> None:
    if height * width > MAX_PLANE_PIXELS:
        raise ValueError(
            f"{path}: its header says {width} x {height} pixels ({height * width / 1e9:.1f} Gpixel per plane); "
            f"planes larger than {MAX_PLANE_PIXELS / 1e9:.1f} Gpixel are refused (convert it to OME-Zarr or crop it)"
        )


def _plain_array_axes(path: Path, shape: Tuple[int, ...], axes: Optional[str], what: str) -> str:
    if axes is not None:
        return normalise_axes(axes, len(shape), "--axes")
    if len(shape) == 2:
        return "YX"
    if len(shape) == 3 and shape[2] in (3, 4) and min(shape[:2]) > 4:
        return "YXS"
    raise ValueError(
        f"{path}: a {what} of shape {tuple(shape)} without axes metadata is ambiguous (stack, channels or time?); "
        "give its axes, e.g. --axes zyx (Python: axes='zyx'), or save it as OME-TIFF"
    )


def open_image(
    path: str | Path,
    *,
    axes: Optional[str] = None,
    scene: int | str | None = None,
) -> ImageSource:
    """Open an image file lazily as an :class:`ImageSource` (see the module docstring).

    Raises FileNotFoundError, or ValueError naming the file and the fix (ambiguous axes,
    unknown scene, header too large, unreadable file).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"image file not found: {p}")
    suffix = (
        "".join(p.suffixes[-2:]).lower() if p.name.lower().endswith((".ome.tif", ".ome.tiff", ".ome.zarr")) else p.suffix.lower()
    )
    if p.is_dir() and not suffix.endswith(".zarr") and not (p / "zarr.json").exists() and not (p / ".zattrs").exists():
        raise ValueError(f"{p} is a directory; give image files (or an OME-Zarr folder)")
    name = p.name
    try:
        if suffix == ".npy":
            arr = np.load(p, mmap_mode="r")
            ax = _plain_array_axes(p, arr.shape, axes, ".npy array")
            src = from_array(arr, ax, name)
        elif suffix in (".tif", ".tiff"):
            src = _open_tiff(p, axes, scene)
        elif suffix in (".ome.tif", ".ome.tiff") or suffix.endswith(".zarr") or p.is_dir():
            if axes is not None:
                raise ValueError(f"--axes {axes!r}: {p} names its own axes; leave --axes out")
            src = _open_bioio(p, scene)
        elif suffix in (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"):
            size = _header_size(p)
            if size is not None:
                _check_plane_size(p, size[1], size[0])
            import skimage.io

            arr = skimage.io.imread(p)
            if arr.ndim == 3 and arr.shape[2] == 4:
                arr = arr[:, :, :3]  # alpha is not image content
            if arr.ndim == 3 and arr.shape[2] == 2:
                arr = arr[:, :, 0]  # gray + alpha
            src = from_array(arr, "YX" if arr.ndim == 2 else "YXS", name)
        else:
            if axes is not None:
                raise ValueError(f"--axes {axes!r}: {p} names its own axes; leave --axes out")
            src = _open_bioio(p, scene)
    except (FileNotFoundError, ValueError, TypeError):
        raise
    except Exception as exc:  # noqa: BLE001 - reader errors come in many types
        raise ValueError(f"cannot read {p} as an image ({type(exc).__name__}: {exc})") from exc
    src.path = str(p)
    if scene is not None and src.scene is None and scene not in (0, "0"):
        raise ValueError(f"--scene {scene!r}: {p} has a single scene (0)")
    return src


def _open_tiff(p: Path, axes: Optional[str], scene) -> ImageSource:
    import tifffile

    with tifffile.TiffFile(p) as tf:
        is_ome, is_imagej = tf.is_ome, tf.is_imagej
        series = tf.series[0]
        shape, file_axes = tuple(series.shape), series.axes
        res = None
        page = series.pages[0] if series.pages else None
        if page is not None and "XResolution" in page.tags and is_imagej:
            xr = page.tags["XResolution"].value
            yr = page.tags["YResolution"].value
            res = (yr[1] / yr[0] if yr[0] else None, xr[1] / xr[0] if xr[0] else None)
        ij = tf.imagej_metadata or {}
    if len(shape) >= 2:
        _check_plane_size(
            p,
            int(shape[-2]) if file_axes[-1] != "S" else int(shape[-3]),
            int(shape[-1]) if file_axes[-1] != "S" else int(shape[-2]),
        )
    if is_ome and axes is None:
        return _open_bioio(p, scene)
    if is_imagej and axes is None:
        ax = file_axes.upper()
        if set(ax) <= set("TCZYXS"):
            store = tifffile.imread(p, aszarr=True)
            import zarr

            arr = zarr.open(store, mode="r")
            sizes = {"z": ij.get("spacing"), "y": res[0] if res else None, "x": res[1] if res else None}
            src = from_array(arr, ax, p.name, sizes, ij.get("unit"))
            return src
    if axes is not None:
        ax = normalise_axes(axes, len(shape), "--axes")
    elif file_axes in ("YX", "YXS"):
        ax = file_axes
    else:  # a plain TIFF whose pages tifffile stacked: not named by the file, so not guessed
        raise ValueError(
            f"{p}: a TIFF of shape {shape} without axes metadata is ambiguous (stack, channels or time?); "
            "give its axes, e.g. --axes zyx (Python: axes='zyx'), or save it as OME-TIFF"
        )
    try:
        arr = tifffile.memmap(p, mode="r")
    except (ValueError, OSError):  # compressed or tiled: read through a zarr store, still lazily
        import zarr

        arr = zarr.open(tifffile.imread(p, aszarr=True), mode="r")
    return from_array(arr, ax, p.name)


def _open_bioio(p: Path, scene) -> ImageSource:
    import warnings

    from bioio import BioImage

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            img = BioImage(p, chunk_dims=["Y", "X"])
        except TypeError:  # readers without chunk_dims
            img = BioImage(p)
    scenes = tuple(img.scenes)
    scene_name = None
    if scene is not None:
        if isinstance(scene, str) and not scene.isdigit():
            if scene not in scenes:
                raise ValueError(f"--scene {scene!r}: {p} has scenes {', '.join(scenes)}")
            img.set_scene(scene)
        else:
            k = int(scene)
            if not 0 <= k < len(scenes):
                raise ValueError(f"--scene {scene}: {p} has {len(scenes)} scene(s) (0..{len(scenes) - 1}: {', '.join(scenes)})")
            img.set_scene(k)
        scene_name = img.current_scene
    dims = img.dims.order
    if "S" in dims and img.dims.S > 1:
        if img.dims.C > 1:
            raise ValueError(f"{p} has both channels and RGB samples; not supported (export one channel's RGB)")
        data = img.get_image_dask_data("TSZYX")
        rgb = True
    else:
        data = img.get_image_dask_data("TCZYX")
        rgb = False
    pps = img.physical_pixel_sizes
    sizes = {"z": pps.Z, "y": pps.Y, "x": pps.X}
    names = tuple(str(c) for c in (img.channel_names or ()))
    return ImageSource(data, p.name, sizes, "micrometer", names, scene_name or (scenes[0] if len(scenes) > 1 else None), rgb=rgb)


def open_source(image: Union[str, Path, Any], *, axes: Optional[str] = None, scene: int | str | None = None) -> ImageSource:
    """A file path or an array (with ``axes``) -> :class:`ImageSource`; a source is returned as is."""
    if isinstance(image, ImageSource):
        return image
    if isinstance(image, (str, Path)):
        return open_image(image, axes=axes, scene=scene)
    return from_array(image, axes)
