"""A job's units of work: :class:`SourceRef` (a picklable image source), :class:`Task`, and
:func:`run_task`, which runs one task in any process (a Dask worker included): fit a plane,
lay out the output stores, render a plane, finish (pyramid, report). See :mod:`.pipeline`."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np

from ..core.progress import check_cancel
from .options import CancelFn, PipelineOptions, PlaneKey, ProgressCallback
from .planes import PlaneFit, fit_basis, fit_plane, render_plane_features, render_plane_pca


@dataclass(frozen=True)
class SourceRef:
    """A picklable reference to an image source: a file path (axes from the file or ``axes``)
    or an in-memory array with ``axes``; ``scene`` picks the scene of multi-scene files."""

    path: Optional[str] = None
    array: Any = None
    axes: Optional[str] = None
    scene: int | str | None = None
    name: Optional[str] = None

    def open(self):
        from ..sources import from_array, open_image

        if self.path is not None:
            key = (self.path, self.axes, self.scene)
            src = _OPEN.get(key)
            if src is None:
                src = open_image(self.path, axes=self.axes, scene=self.scene)
                _OPEN.clear()  # one source open per process: inputs are opened one at a time
                _OPEN[key] = src
            return src
        return from_array(self.array, self.axes, self.name or "array")


_OPEN: Dict[Any, Any] = {}


@dataclass(frozen=True)
class Task:
    """One unit of work of a job (see the module docstring); picklable."""

    kind: str  # "fit" | "layout" | "render" | "finish"
    stage: int
    source: SourceRef
    options: PipelineOptions
    store: str  # the job's temporary output folder
    plane: Optional[PlaneKey] = None  # (t, z) for "fit" / "render"
    planes: Tuple[PlaneKey, ...] = ()  # every plane of the job
    number: int = 0  # position of the plane in ``planes``


def _plane_dir(store: Path, key: PlaneKey) -> Path:
    return store / ".work" / f"t{key[0]}_z{key[1]}"


def _guide(task: Task, key: PlaneKey) -> np.ndarray:
    src = task.source.open()
    return src.guide(key[0], key[1], task.options.channels)


def _layout(task: Task) -> dict:
    return json.loads((Path(task.store) / ".work" / "layout.json").read_text())


#: Tests only: ``"KIND:FIFO"`` makes every task of that kind (in any process, Dask workers
#: included) write one line to the named pipe ``FIFO``, then wait for a line on the named pipe
#: ``FIFO.go`` before it goes on, so that a test can interrupt a run at a known point (and let
#: the task go on writing while the interruption is handled) without timing guesses.
TEST_PAUSE_ENV = "UPSAMPLE_ANYTHING_TEST_PAUSE"


def _test_pause(task: Task) -> None:
    spec = os.environ.get(TEST_PAUSE_ENV, "")
    kind, _, fifo = spec.partition(":")
    if kind != task.kind or not fifo:
        return
    with open(fifo, "w") as f:  # blocks until the test opens the pipe for reading
        f.write(f"{task.kind} started\n")
    # Wait for the test's line by polling, not by a blocking open or read: a signal that the
    # kernel delivers to another thread of this process does not interrupt a blocked system
    # call of the main thread, while the sleep below returns to Python, which runs the handler.
    fd = os.open(fifo + ".go", os.O_RDONLY | os.O_NONBLOCK)
    try:
        while b"\n" not in _read_available(fd):
            time.sleep(0.01)
    finally:
        os.close(fd)


def _read_available(fd: int) -> bytes:
    try:
        return os.read(fd, 64)
    except BlockingIOError:  # a writer is there but has written nothing yet
        return b""


def run_task(task: Task, progress: Optional[ProgressCallback] = None, cancel: Optional[CancelFn] = None) -> dict:
    """Run one task in this process; returns a small JSON-able summary."""
    check_cancel(cancel, task.kind)
    _test_pause(task)
    fn = {"fit": _task_fit, "layout": _task_layout, "render": _task_render, "finish": _task_finish}[task.kind]
    return fn(task, progress, cancel)


def _task_fit(task: Task, progress, cancel) -> dict:
    key = task.plane
    n = len(task.planes)
    fit = fit_plane(_guide(task, key), task.options, index=key, progress=progress, cancel=cancel, plane=task.number, n_planes=n)
    d = _plane_dir(Path(task.store), key)
    d.mkdir(parents=True, exist_ok=True)
    np.save(d / "lr_features.npy", fit.features)
    fit.field.save(d / "kernels.npz")
    info = {
        "geometry": fit.geometry.to_dict(),
        "backbone": fit.backbone,
        "weights_source": fit.weights_source,
        "seconds": fit.seconds,
        "loss_first": (fit.field.meta.get("loss_per_step") or [None])[0],
        "loss_final": fit.field.meta.get("final_loss"),
        "psnr_db": fit.field.meta.get("psnr"),
        # the fit's largest tile as planned, and its working set by the engine's accounting
        "memory": fit.memlog.peak_planned_bytes if hasattr(fit.memlog, "peak_planned_bytes") else None,
        "working_memory": fit.memlog.working_bytes if hasattr(fit.memlog, "working_bytes") else None,
    }
    (d / "fit.json").write_text(json.dumps(info))
    return {"plane": list(key), **info}


def _task_layout(task: Task, progress, cancel) -> dict:
    from .. import omezarr
    from ..core.field import KernelField
    from ..core.pca import PCABasis

    store = Path(task.store)
    src = task.source.open()
    feats = [np.load(_plane_dir(store, k) / "lr_features.npy", mmap_mode="r") for k in task.planes]
    t0 = time.perf_counter()
    basis = fit_basis(feats, task.options)
    np.savez(store / ".work" / "basis.npz", **{k: getattr(basis, k) for k in PCABasis.__dataclass_fields__})
    info0 = json.loads((_plane_dir(store, task.planes[0]) / "fit.json").read_text())
    C = int(feats[0].shape[0])
    h, w = info0["geometry"]["lr_shape"]
    H, W = src.plane_shape
    ts = sorted({k[0] for k in task.planes})
    zs = sorted({k[1] for k in task.planes})
    sizes = src.sizes
    axes = omezarr.output_axes(sizes["T"], sizes["Z"])
    pos = {k: (ts.index(k[0]) if "t" in axes else None, zs.index(k[1]) if "z" in axes else None) for k in task.planes}
    if len(task.planes) != len(ts) * len(zs) and task.options.format == "ome-zarr":
        raise ValueError("the selected planes do not form a t x z grid")  # parse_planes always gives a grid
    hr_sizes = {a: src.pixel_sizes.get(a) for a in "zyx"}
    lr_sizes, lr_shift = omezarr.lr_grid_geometry(hr_sizes, (H, W), (h, w))
    layout = {
        "axes": axes,
        "C": C,
        "lr_shape": [h, w],
        "hr_shape": [H, W],
        "ts": ts,
        "zs": zs,
        "positions": {f"{k[0]},{k[1]}": list(v) for k, v in pos.items()},
    }
    opts = task.options
    dims = {"t": len(ts), "z": len(zs), "y": H, "x": W}
    fit_opts = {
        "guide_smoothing": opts.guide_smoothing,
        "fit_downsample": opts.fit_downsample,
        "fit_fraction": opts.fit_fraction,
        "steps": opts.steps,
    }
    if opts.format == "ome-zarr":
        unit = src.unit if any(hr_sizes.values()) else None
        # Display windows of the features: the range of the LR features, which bounds the HR
        # ones (every HR value is a weighted mean of LR values), known before any render.
        lo = np.min([np.min(np.asarray(f).reshape(C, -1), axis=1) for f in feats], axis=0)
        hi = np.max([np.max(np.asarray(f).reshape(C, -1), axis=1) for f in feats], axis=0)
        windows = [(float(a), float(b) if b > a else float(a) + 1.0) for a, b in zip(lo, hi)]
        feature_channels = dict(
            channel_names=[f"feature {i}" for i in range(C)],
            windows=windows,
            visible=[i == 0 for i in range(C)],  # one channel shown at first, not hundreds
        )
        if opts.hr_features:
            shape = tuple(C if a == "c" else dims[a] for a in axes)
            omezarr.create_image(
                store / "features.ome.zarr",
                shape,
                axes,
                dtype=opts.hr_dtype,
                pixel_sizes=hr_sizes,
                unit=unit,
                name="features",
                attrs={"kind": "hr-features", "backbone": info0["backbone"], "layer": opts.layer},
                **feature_channels,
            )
        lr_dims = dict(dims, y=h, x=w)
        lr_arr = omezarr.create_image(
            store / "lr_features.ome.zarr",
            tuple(C if a == "c" else lr_dims[a] for a in axes),
            axes,
            pixel_sizes=lr_sizes,
            translation=lr_shift,
            unit=unit,
            name="lr_features",
            attrs={"kind": "lr-features", "backbone": info0["backbone"], "layer": opts.layer},
            **feature_channels,
        )
        for k, f in zip(task.planes, feats):
            lr_arr[omezarr.region_index(omezarr.plane_region(axes, *pos[k]), axes)] = np.asarray(f)
        fields = {k: KernelField.load(_plane_dir(store, k) / "kernels.npz") for k in task.planes}
        omezarr.write_kernels(
            store / "kernels.ome.zarr", fields, axes, pos, (h, w), len(ts), len(zs), lr_sizes, unit, (H, W), translation=lr_shift
        )
        levels = omezarr.pyramid_levels((H, W))
        omezarr.create_image(
            store / "pca.ome.zarr",
            tuple(3 if a == "c" else dims[a] for a in axes),
            axes,
            pixel_sizes=hr_sizes,
            unit=unit,
            name="pca",
            levels=levels,
            channel_names=("PC1", "PC2", "PC3"),
            windows=[(0.0, 1.0)] * 3,
            chunks=tuple({"t": 1, "c": 1, "z": 1, "y": 256, "x": 256}[a] for a in axes),
            attrs={"kind": "pca", "explained_variance_ratio": basis.explained_variance_ratio.tolist(), "fit": fit_opts},
        )
        layout["pca_levels"] = levels
    else:
        lead = (len(task.planes),) if len(task.planes) > 1 else ()
        if opts.hr_features:
            mm = np.lib.format.open_memmap(
                store / "features_hr.npy", mode="w+", dtype=np.dtype(opts.hr_dtype), shape=lead + (C, H, W)
            )
            del mm
        for k in task.planes:
            name = "kernels.npz" if len(task.planes) == 1 else f"kernels_t{k[0]}_z{k[1]}.npz"
            shutil.copyfile(_plane_dir(store, k) / "kernels.npz", store / name)
    (store / ".work" / "layout.json").write_text(json.dumps(layout))
    return {"layout": layout, "seconds": time.perf_counter() - t0}


def _load_plane_fit(task: Task, key: PlaneKey) -> PlaneFit:
    from ..core.features import FeatureGeometry
    from ..core.field import KernelField
    from ..core.memory import MemoryLog

    d = _plane_dir(Path(task.store), key)
    info = json.loads((d / "fit.json").read_text())
    geo = info["geometry"]
    geometry = FeatureGeometry(
        **{k: (tuple(tuple(b) for b in v) if k == "windows" else tuple(v) if isinstance(v, list) else v) for k, v in geo.items()}
    )
    return PlaneFit(
        index=key,
        guide=_guide(task, key),
        features=np.load(d / "lr_features.npy"),
        geometry=geometry,
        field=KernelField.load(d / "kernels.npz"),
        memlog=MemoryLog(),
        backbone=info["backbone"],
        weights_source=info["weights_source"],
        seconds=dict(info["seconds"]),
    )


def _load_basis(store: Path):
    from ..core.pca import PCABasis

    with np.load(store / ".work" / "basis.npz") as z:
        return PCABasis(**{k: z[k] for k in z.files})


def _task_render(task: Task, progress, cancel) -> dict:
    from .. import omezarr

    store = Path(task.store)
    key, n, opts = task.plane, len(task.planes), task.options
    layout = _layout(task)
    fit = _load_plane_fit(task, key)
    basis = _load_basis(store)
    lr_rgb, hr_rgb = render_plane_pca(fit, basis, opts, progress=progress, cancel=cancel, plane=task.number, n_planes=n)
    from ..core.io import nearest_resize, save_png, side_by_side

    axes = layout["axes"]
    pos = layout["positions"][f"{key[0]},{key[1]}"]
    region = omezarr.plane_region(axes, *pos)
    picture = side_by_side(nearest_resize(lr_rgb, hr_rgb.shape[:2]), hr_rgb)
    png = store / ("pca.png" if n == 1 else f"pca_t{key[0]}_z{key[1]}.png")
    if opts.format == "ome-zarr":
        arr, _, _ = omezarr.open_level0(store / "pca.ome.zarr", mode="r+")
        arr[omezarr.region_index(region, axes)] = np.moveaxis(hr_rgb, -1, 0)
        if n == 1:
            save_png(png, picture)
    else:
        save_png(png, picture)
    if opts.hr_features:
        C = int(fit.features.shape[0])
        H, W = fit.hr_shape
        if opts.format == "ome-zarr":
            import zarr

            arr = zarr.open_array(str(store / "features.ome.zarr" / "0"), mode="r+")
            out = omezarr.BandWriter(arr, axes, region, (C, H, W))
        else:
            mm = np.load(store / "features_hr.npy", mmap_mode="r+")
            out = mm if mm.ndim == 3 else mm[task.number]
        render_plane_features(fit, out, opts, progress=progress, cancel=cancel, plane=task.number, n_planes=n)
        if isinstance(out, np.memmap) or opts.format == "npy":
            mm.flush()
            del mm, out
    (_plane_dir(store, key) / "render.json").write_text(json.dumps({"seconds": fit.seconds}))
    return {"plane": list(key), "seconds": fit.seconds}


def _task_finish(task: Task, progress, cancel) -> dict:
    from .. import omezarr

    store = Path(task.store)
    opts = task.options
    layout = _layout(task)
    if opts.format == "ome-zarr":
        omezarr.build_pyramid(store / "pca.ome.zarr")
    src = task.source.open()
    planes = []
    for k in task.planes:
        d = _plane_dir(store, k)
        info = json.loads((d / "fit.json").read_text())
        info["seconds"].update(json.loads((d / "render.json").read_text())["seconds"])
        keys = ("loss_first", "loss_final", "psnr_db", "seconds", "memory", "working_memory")
        planes.append({"t": k[0], "z": k[1], **{a: info.get(a) for a in keys}})
    info0 = json.loads((_plane_dir(store, task.planes[0]) / "fit.json").read_text())
    basis = _load_basis(store)
    total = {s: float(sum(p["seconds"].get(s, 0.0) for p in planes)) for s in ("features", "fit", "pca", "render")}
    shutil.rmtree(store / ".work")
    files = sorted(p.name for p in store.iterdir())
    report = {
        "image": src.name,
        "source": src.path,
        "scene": src.scene,
        "source_sizes": src.sizes,
        "pixel_sizes": src.pixel_sizes,
        "unit": src.unit,
        "dtype": str(src.dtype),
        "channels_used": list(opts.channels) if opts.channels is not None else "all",
        "planes": planes,
        "output_axes": layout["axes"],
        "hr_shape": layout["hr_shape"],
        "lr_shape": layout["lr_shape"],
        "channels": layout["C"],
        "geometry": info0["geometry"],
        "backbone": info0["backbone"],
        "weights_source": info0["weights_source"],
        "fit_loss_first": planes[0]["loss_first"],
        "fit_loss_final": planes[0]["loss_final"],
        "fit_psnr_db": planes[0]["psnr_db"],
        "options": opts.to_dict(),
        "seconds": total,
        "pca_explained_variance": [float(v) for v in basis.explained_variance_ratio],
        "memory": {
            "process_peak_rss_bytes": _peak_rss(),
            # the engine's own accounting (core.engine.footprint), the largest over the planes
            "fit_working_bytes": max((p.get("working_memory") or 0 for p in planes), default=0),
            "fit_planned_tile_bytes": max((p.get("memory") or 0 for p in planes), default=0),
        },
        "files": files + ["report.json"],
    }
    tmp = store / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, store / "report.json")
    return report


def _peak_rss() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss * (1 if sys.platform == "darwin" else 1024))


def describe_task(task: Task) -> str:
    """``'fit of plane t=0 z=3'`` / ``'layout'``: what a :class:`Task` does (for error messages)."""
    if task.plane is None:
        return task.kind
    return f"{task.kind} of plane t={task.plane[0]} z={task.plane[1]}"


def describe_map_task(spec: dict) -> str:
    """``'map of lr.npy onto image.tif plane t=0 z=3'``: what a ``map --dask`` task does."""
    t, z = spec["plane"]
    return f"map of {Path(spec['map']).name} onto {Path(spec['image']).name} plane t={t} z={z}"
