"""Files of ``upsample-anything map``: the low-resolution map in, the kernels, the result out.

:func:`read_map` reads ``.npy``, TIFF or OME-Zarr maps; :func:`write_map` writes ``.npy``,
OME-TIFF or OME-Zarr under a temporary name and renames it when complete; :func:`load_kernels`
reads the kernels ``run`` saved (``kernels.ome.zarr`` or ``kernels.npz``).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from .cli_printing import UsageError


def read_map(path: str | Path):
    """An LR map from ``.npy``, TIFF or OME-Zarr as ``(h, w)`` or ``(C, h, w)`` numpy (channels
    first; OME-Zarr t / z axes of size 1 are dropped)."""
    import numpy as np

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"map file not found: {p}")
    name = p.name.lower()
    try:
        if name.endswith(".npy"):
            arr = np.load(p, allow_pickle=False)
        elif name.endswith((".tif", ".tiff")):
            import tifffile

            arr = tifffile.imread(p)
        elif name.endswith(".zarr") or p.is_dir():
            from .omezarr import open_level0

            z, axes, _ = open_level0(p)
            arr = np.asarray(z[...])
            drop = tuple(i for i, a in enumerate(axes) if a in "tz" and arr.shape[i] == 1)
            arr = arr.squeeze(drop) if drop else arr
        else:
            raise ValueError(f"{p}: use a .npy, TIFF or OME-Zarr map")
    except (ValueError, FileNotFoundError):
        raise
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"cannot read {p} as a map ({type(exc).__name__}: {exc})") from exc
    if arr.ndim not in (2, 3):
        raise ValueError(f"{p}: the map has shape {arr.shape}; give (h, w) or channels-first (C, h, w)")
    return arr


def write_map(path: Path, arr, pixel_sizes=None, unit=None) -> None:
    """Write ``arr`` to ``path`` (.npy, .tif, .ome.zarr) under a temporary name, then rename."""
    import numpy as np

    name = path.name.lower()
    path.parent.mkdir(parents=True, exist_ok=True)  # as `run --out` does
    tmp = path.parent / f".{path.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        if name.endswith(".npy"):
            with open(tmp, "wb") as f:
                np.save(f, arr)
        elif name.endswith((".tif", ".tiff")):
            import tifffile

            tifffile.imwrite(tmp, arr, ome=True, metadata={"axes": "YX" if arr.ndim == 2 else "CYX"})
        else:
            from .omezarr import channel_windows, create_image

            a = arr if arr.ndim == 3 else arr[None]
            names = ["labels"] if arr.ndim == 2 and arr.dtype.kind in "iub" else [f"map {i}" for i in range(a.shape[0])]
            z = create_image(
                tmp,
                a.shape,
                "cyx",
                dtype=a.dtype,
                pixel_sizes=pixel_sizes,
                unit=unit,
                name="map",
                channel_names=names,
                windows=channel_windows(a),
            )
            z[...] = a
        if path.is_dir():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise


def load_kernels(path: str | Path, plane):
    """The kernels of ``plane`` ``(t, z)`` from ``kernels.ome.zarr`` (that plane's, or its only
    field) or ``kernels.npz``; an unreadable file, or one without that plane, raises
    :class:`UsageError` naming ``--kernels``."""
    from .core.field import KernelField

    p = Path(path)
    try:
        if p.is_dir() or p.name.lower().endswith(".zarr"):
            from .omezarr import read_kernels

            fields = read_kernels(p)
            if plane in fields:
                return fields[plane]
            if len(fields) == 1:
                return next(iter(fields.values()))
            raise ValueError(f"--kernels {p} has no kernels for plane t={plane[0]} z={plane[1]} (it has {sorted(fields)})")
        return KernelField.load(p)
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - unreadable file
        raise UsageError(f"--kernels {p} is not a kernel field file ({type(exc).__name__}: {exc})") from exc
