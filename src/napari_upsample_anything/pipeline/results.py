"""A finished output folder as lazy dask arrays: :func:`open_results`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict


def open_results(out_dir: str | Path) -> Dict[str, Dict[str, Any]]:
    """The OME-Zarr outputs of a finished run as lazy dask arrays (nothing read yet).

    Parameters
    ----------
    out_dir : path
        An output folder written by ``upsample-anything run`` / :func:`~.pipeline.run_job`
        with ``format="ome-zarr"``.

    Returns
    -------
    dict
        ``{"features" | "pca" | "kernels" | "lr_features": {"data", "levels", "axes",
        "scale", "translation", "unit"}}`` for the stores present: ``data`` the full-resolution dask array
        (axes such as ``"czyx"``; HR features ``(C, H, W)`` per plane), ``levels`` every
        pyramid level (one for all but the PCA), ``scale`` the pixel size per axis of
        ``data`` (1.0 for ``c`` / ``t``), ``translation`` the world position of its first
        pixel's centre (zeros for HR stores; ``(scale - 1) / 2`` HR pixels for the LR grids
        ``kernels`` and ``lr_features``), ``unit`` the spatial unit or None.
    """
    import dask.array as da
    import zarr

    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"out_dir={str(out_dir)!r}: no such output folder")
    results: Dict[str, Dict[str, Any]] = {}
    for name in ("features", "pca", "kernels", "lr_features"):
        path = out_dir / f"{name}.ome.zarr"
        if not path.is_dir():
            continue
        root = zarr.open_group(str(path), mode="r")
        ms = root.attrs["ome"]["multiscales"][0]
        axes = "".join(a["name"] for a in ms["axes"])
        units = [a.get("unit") for a in ms["axes"] if a.get("type") == "space"]
        levels = [da.from_zarr(root[d["path"]]) for d in ms["datasets"]]
        from ..omezarr import transforms_of

        scale, translation = transforms_of(ms["datasets"][0])
        results[name] = {
            "data": levels[0],
            "levels": levels,
            "axes": axes,
            "scale": scale,
            "translation": translation,
            "unit": next((u for u in units if u), None),
        }
    if not results:
        raise ValueError(f"out_dir={str(out_dir)!r} holds no .ome.zarr outputs (was it written with format='npy'?)")
    return results
