"""Scale benchmark: tiled vs whole-image kernel fits, Dask throughput, an 8192^2 image end to end.

Sections (each writes its results into docs/scale.json and its tables into docs/scale.md,
between ``<!-- bench_scale:NAME -->`` markers; the prose around them is left alone):

    python benchmarks/bench_scale.py halo        # tiled vs whole fit on scikit-image samples, per halo
    python benchmarks/bench_scale.py large       # the same at 1024^2 and 2048^2: time, peak memory per worker
    python benchmarks/bench_scale.py throughput  # planes per minute, 1 and 2 Dask workers
    python benchmarks/bench_scale.py wsi         # 8192 x 8192 synthetic image, tiled fit + render
    python benchmarks/bench_scale.py report      # re-render docs/scale.md from docs/scale.json

Every option (steps, sizes, halos, tile size, workers, memory limits) is a flag; the values
used are recorded with the results, with the load average before and after, because the
machine may be shared. Peak memory is VmHWM of the process that did the work (a fresh Dask
worker process per run: the cluster is started for each measurement).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
JSON_PATH = DOCS / "scale.json"
MD_PATH = DOCS / "scale.md"

import napari_upsample_anything.api as upa  # noqa: E402
from napari_upsample_anything.distributed import execute, raise_for_failures  # noqa: E402
from napari_upsample_anything.tiled_fit import (  # noqa: E402
    field_difference,
    fit_tiled,
    peak_rss_bytes,
)


# ---------------------------------------------------------------------------- helpers
def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "-"


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def sample_image(name: str, size=None) -> np.ndarray:
    """A scikit-image sample as uint8 RGB, optionally resized (antialiased) to ``size``."""
    from skimage import data, transform

    img = getattr(data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    if size is not None:
        img = (transform.resize(img, size, anti_aliasing=True, preserve_range=True)).round().clip(0, 255).astype(np.uint8)
    return img


def lr_shape_for(hr_shape, patch: int):
    return max(1, hr_shape[0] // patch), max(1, hr_shape[1] // patch)


def area_lr(img: np.ndarray, lr_shape) -> np.ndarray:
    """(G, h, w) float32 in [0, 1]: each LR cell's average colour (the map we upsample)."""
    from napari_upsample_anything.core.guide import Guide
    from napari_upsample_anything.core.render import area_lr_guide

    return area_lr_guide(Guide(img), lr_shape, torch.device("cpu")).numpy()


def kmeans_labels(img: np.ndarray, k: int = 4, seed: int = 0) -> np.ndarray:
    """Colour k-means labels of the HR image: the 'label task' ground truth (H, W) int."""
    from sklearn.cluster import KMeans

    x = img.reshape(-1, img.shape[-1]).astype(np.float32) / 255.0
    rng = np.random.default_rng(seed)
    fit_on = x[rng.choice(len(x), min(len(x), 20000), replace=False)]
    km = KMeans(k, n_init=3, random_state=seed).fit(fit_on)
    return km.predict(x).reshape(img.shape[:2])


def one_hot_lr(labels: np.ndarray, k: int, lr_shape) -> np.ndarray:
    """(k, h, w): the per-cell fraction of each label (area average of the one-hot map)."""
    from napari_upsample_anything.core.grid import AxisBlocks

    H, W = labels.shape
    rows, cols = AxisBlocks.build(H, lr_shape[0]), AxisBlocks.build(W, lr_shape[1])
    out = np.zeros((k, *lr_shape), np.float32)
    for i in range(lr_shape[0]):
        r0, r1 = rows.hr_range(i, i + 1)
        for j in range(lr_shape[1]):
            c0, c1 = cols.hr_range(j, j + 1)
            out[:, i, j] = np.bincount(labels[r0:r1, c0:c1].ravel(), minlength=k) / ((r1 - r0) * (c1 - c0))
    return out


def miou(pred: np.ndarray, truth: np.ndarray, k: int) -> float:
    ious = []
    for c in range(k):
        union = np.logical_or(pred == c, truth == c).sum()
        if union:
            ious.append(np.logical_and(pred == c, truth == c).sum() / union)
    return float(np.mean(ious))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def load_results() -> dict:
    return json.loads(JSON_PATH.read_text()) if JSON_PATH.exists() else {}


def save_results(res: dict) -> None:
    tmp = JSON_PATH.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=1, default=float))
    tmp.replace(JSON_PATH)


def stamp(args, load_start: str, t0: float) -> dict:
    return {
        "argv": "python benchmarks/bench_scale.py " + " ".join(sys.argv[1:]),
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "wall_seconds": time.perf_counter() - t0,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def fit_options(args) -> dict:
    return dict(steps=args.steps, device="cpu", max_memory=args.max_memory)


# ---------------------------------------------------------------------------- halo study
def compare(img, lr, whole, tiled, labels, k) -> dict:
    """Kernel-parameter, rendered-output and label differences of ``tiled`` vs ``whole``."""
    diff = field_difference(tiled, whole)
    lr_rgb = area_lr(img, lr)
    out_w = upa.render(lr_rgb, img, whole, device="cpu")
    out_t = upa.render(lr_rgb, img, tiled, device="cpu")
    onehot = one_hot_lr(labels, k, lr)
    lab_w = upa.render(onehot, img, whole, device="cpu").argmax(0)
    lab_t = upa.render(onehot, img, tiled, device="cpu").argmax(0)
    diff.update(
        render_max_abs=float(np.abs(out_t - out_w).max()),
        render_psnr_db=psnr(out_t, out_w),
        label_disagree_pct=100.0 * float((lab_t != lab_w).mean()),
        miou_tiled=100 * miou(lab_t, labels, k),
        miou_whole=100 * miou(lab_w, labels, k),
    )
    return diff


def run_halo(args) -> dict:
    """Per image: whole fit, tiled fits for each halo, and (``--floor``) the float-rounding floor.

    The floor is the whole fit run again with a small ``--floor-max-memory``: the same maths
    in other tiles, so only the order of float sums differs. Tiled-vs-whole differences at or
    below the floor are indistinguishable from rounding.
    """
    torch.set_num_threads(1)
    out = {}
    for name in args.images:
        load_start, t0 = load_average(), time.perf_counter()
        img = sample_image(name)
        lr = lr_shape_for(img.shape[:2], args.patch)
        labels = kmeans_labels(img, args.labels)
        t = time.perf_counter()
        whole = upa.fit_kernels(img, lr, **fit_options(args))
        t_whole = time.perf_counter() - t
        print(f"{name} {img.shape[:2]} lr {lr}: whole fit {t_whole:.1f} s", flush=True)
        base = dict(image=name, hr=list(img.shape[:2]), lr=list(lr), tile_cells=args.tile_cells, seconds_whole=t_whole)
        rows = []
        if args.floor:
            t = time.perf_counter()
            again = upa.fit_kernels(img, lr, **dict(fit_options(args), max_memory=args.floor_max_memory))
            row = dict(base, halo="floor", n_tiles=1, seconds_tiled=time.perf_counter() - t)
            row.update(compare(img, lr, whole, again, labels, args.labels))
            rows.append(row)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
        for halo in args.halos:
            t = time.perf_counter()
            tiled = fit_tiled(
                img,
                lr,
                tile_cells=args.tile_cells,
                halo=halo,
                client=args.client,
                execute_options=dict(n_workers=args.workers),
                **fit_options(args),
            )
            row = dict(base, halo=halo, n_tiles=tiled.meta["tiled"]["n_tiles"], seconds_tiled=time.perf_counter() - t)
            row.update(compare(img, lr, whole, tiled, labels, args.labels))
            rows.append(row)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
        out[name] = {
            "rows": rows,
            "steps": args.steps,
            "patch": args.patch,
            "tile_cells": args.tile_cells,
            "labels": args.labels,
            "client": str(args.client),
            "workers": args.workers,
            "floor_max_memory": args.floor_max_memory if args.floor else None,
            "stamp": stamp(args, load_start, t0),
        }
    return out


# ---------------------------------------------------------------------------- large images
@dataclass(frozen=True)
class WholeFitTask:
    size: int
    patch: int
    options: tuple


def whole_fit_task(task: WholeFitTask) -> dict:
    """A whole-image fit in a worker: the fitted maps, seconds and the worker's VmHWM."""
    img = sample_image("astronaut", (task.size, task.size))
    lr = lr_shape_for(img.shape[:2], task.patch)
    t = time.perf_counter()
    field = upa.fit_kernels(img, lr, **dict(task.options))
    return {"maps": field.numpy(), "seconds": time.perf_counter() - t, "peak_rss": peak_rss_bytes()}


def run_large(args) -> dict:
    from napari_upsample_anything.core.field import KernelField

    torch.set_num_threads(1)
    rows = []
    baseline = worker_baseline(args.memory_limit)
    for size in args.sizes:
        img = sample_image("astronaut", (size, size))
        lr = lr_shape_for(img.shape[:2], args.patch)
        labels = kmeans_labels(img, args.labels)
        opts = fit_options(args)
        t = time.perf_counter()
        [whole_out] = execute(
            [WholeFitTask(size, args.patch, tuple(opts.items()))],
            whole_fit_task,
            client="local",
            n_workers=1,
            memory_limit=args.memory_limit,
        )
        raise_for_failures([whole_out])
        t_whole = time.perf_counter() - t
        whole = KernelField(**{n: torch.from_numpy(v) for n, v in whole_out.result["maps"].items()})
        base = dict(
            size=size,
            lr=list(lr),
            steps=args.steps,
            whole_seconds_wall=t_whole,
            whole_seconds_fit=whole_out.result["seconds"],
            whole_peak_rss=whole_out.result["peak_rss"],
        )
        print(f"{size}: whole {t_whole:.1f} s, peak {mib(whole_out.result['peak_rss'])}", flush=True)
        for halo in args.halos:
            t = time.perf_counter()
            tiled = fit_tiled(
                img,
                lr,
                tile_cells=args.tile_cells,
                halo=halo,
                client="local",
                execute_options=dict(n_workers=args.workers, memory_limit=args.memory_limit),
                **opts,
            )
            t_tiled = time.perf_counter() - t
            meta = tiled.meta["tiled"]
            row = dict(
                base,
                halo=halo,
                tile_cells=args.tile_cells,
                n_tiles=meta["n_tiles"],
                workers=args.workers,
                tiled_seconds_wall=t_tiled,
                tiled_seconds_sum=float(sum(meta["seconds_per_tile"])),
                tiled_peak_rss_max=int(max(meta["peak_rss_per_tile"])),
            )
            row.update(compare(img, lr, whole, tiled, labels, args.labels))
            rows.append(row)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    return {
        "rows": rows,
        "steps": args.steps,
        "patch": args.patch,
        "memory_limit": args.memory_limit,
        "max_memory": args.max_memory,
        "worker_baseline_rss": baseline,
    }


# ---------------------------------------------------------------------------- throughput
def plane_guide(index: int, size: int) -> np.ndarray:
    img = sample_image("astronaut", (size, size))
    return np.ascontiguousarray(np.rot90(img, index % 4)[:, ::-1] if index % 8 >= 4 else np.rot90(img, index % 4))


def random_vits14_weights(path: Path) -> Path:
    """A randomly initialised ViT-S/14 (DINOv2 architecture) written as a weights file: the
    pipeline's real loading path, offline (the real weights cannot be downloaded here)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=False, dynamic_img_size=True)
    torch.save(model.state_dict(), path)
    return path


def store_arrays(folder: Path) -> dict:
    """Every zarr array of an output folder (path -> bytes of its data), for identity checks."""
    import zarr

    out = {}
    for meta in sorted(folder.rglob("zarr.json")) + sorted(folder.rglob(".zarray")):
        if meta.name == "zarr.json" and json.loads(meta.read_text()).get("node_type") != "array":
            continue
        arr = zarr.open_array(str(meta.parent), mode="r")
        out[str(meta.parent.relative_to(folder))] = np.asarray(arr[...]).tobytes()
    return out


def run_throughput(args) -> dict:
    """The pipeline itself (``plan_job`` + ``run_job(client=...)``, as ``upsample-anything run
    --dask``) on a stack of ``--planes`` gray planes: features, fit and render per plane, one
    task per plane and stage, on a fresh ``LocalCluster`` per worker count."""
    from napari_upsample_anything.distributed import dask_client
    from napari_upsample_anything.pipeline import PipelineOptions, SourceRef, plan_job, run_job

    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="bench_scale_"))
    try:
        size = args.plane_size
        stack = np.stack([plane_guide(i, size).mean(-1) for i in range(args.planes)]).astype(np.float32) / 255
        np.save(tmp / "stack.npy", stack)
        weights = random_vits14_weights(tmp / "vits14_random.pth")
        options = PipelineOptions(
            weights=str(weights),
            steps=args.steps,
            device="cpu",
            max_memory=args.max_memory,
            hr_features=not args.pca_only,
        )
        reference = None
        for workers in args.workers_list:
            out = tmp / f"out_{workers}"
            t = time.perf_counter()
            with dask_client("local", n_workers=workers, threads_per_worker=1, memory_limit=args.memory_limit) as client:
                report = run_job(plan_job(SourceRef(path=str(tmp / "stack.npy"), axes="zyx"), options, out), client=client)
                wall = time.perf_counter() - t  # includes starting the cluster and loading the backbone per worker
                peaks = client.run(peak_rss_bytes)  # VmHWM of each (fresh) worker process
            arrays = store_arrays(out)
            same = None if reference is None else arrays == reference
            reference = arrays if reference is None else reference
            row = dict(
                workers=workers,
                planes=args.planes,
                size=size,
                lr=list(report["lr_shape"]),
                channels=int(report["channels"]),
                steps=args.steps,
                hr_features=not args.pca_only,
                wall_seconds=wall,
                planes_per_minute=60 * args.planes / wall,
                task_seconds={k: float(v) for k, v in report["seconds"].items()},
                peak_rss_max=int(max(peaks.values())),
                output_bytes=int(sum(f.stat().st_size for f in out.rglob("*") if f.is_file())),
                identical_to_first=same,
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
            if workers != args.workers_list[0]:
                shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"rows": rows, "memory_limit": args.memory_limit, "max_memory": args.max_memory}


def baseline_task(_: int) -> dict:
    """VmHWM of a worker that has imported the library and torch but fitted nothing."""
    import napari_upsample_anything.api  # noqa: F401

    return {"peak_rss": peak_rss_bytes()}


def worker_baseline(memory_limit) -> int:
    [out] = execute([0], baseline_task, client="local", n_workers=1, memory_limit=memory_limit)
    raise_for_failures([out])
    return int(out.result["peak_rss"])


# ---------------------------------------------------------------------------- 8192^2 end to end
def synthetic_wsi(size: int) -> np.ndarray:
    """A size x size uint8 RGB mosaic of flipped/rotated scikit-image samples (structure everywhere)."""
    names = ["astronaut", "coffee", "chelsea", "immunohistochemistry", "rocket"]
    tiles = [sample_image(n, (512, 512)) for n in names]
    out = np.empty((size, size, 3), np.uint8)
    k = 0
    for y in range(0, size, 512):
        for x in range(0, size, 512):
            t = np.rot90(tiles[k % len(tiles)], k % 4)
            out[y : y + 512, x : x + 512] = t[: size - y, : size - x]
            k += 1
    return out


def run_wsi(args) -> dict:
    import zarr

    from napari_upsample_anything.core.units import parse_bytes

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench_wsi_"))
    try:
        size = args.wsi_size
        img = synthetic_wsi(size)
        guide_z = zarr.open_array(str(tmp / "guide.zarr"), mode="w", shape=img.shape, chunks=(1024, 1024, 3), dtype="u1")
        guide_z[:] = img
        np.save(tmp / "guide.npy", img)
        del img
        lr = (size // args.patch, size // args.patch)
        baseline = worker_baseline(args.memory_limit)
        t = time.perf_counter()

        def show(done, total, info):
            print(f"  tiles {done}/{total} after {time.perf_counter() - t:.0f} s, load {load_average()}", flush=True)

        field = fit_tiled(
            guide_z,
            lr,
            tile_cells=args.tile_cells,
            halo=args.wsi_halo,
            client="local",
            progress=show,
            execute_options=dict(n_workers=args.workers, memory_limit=args.memory_limit),
            radius=args.radius,
            **fit_options(args),
        )
        t_fit = time.perf_counter() - t
        meta = field.meta["tiled"]
        print(f"fit: {t_fit:.0f} s, {meta['n_tiles']} tiles, worker peak {mib(max(meta['peak_rss_per_tile']))}", flush=True)
        guide = np.load(tmp / "guide.npy", mmap_mode="r")  # read tile by tile by the render
        lr_map = np.random.default_rng(0).random((args.channels, *lr)).astype(np.float32)
        out = zarr.open_array(
            str(tmp / "out.zarr"), mode="w", shape=(args.channels, size, size), chunks=(args.channels, 512, 2048), dtype="f4"
        )
        with open("/proc/self/clear_refs", "w") as fh:  # VmHWM of the render alone
            fh.write("5")
        t = time.perf_counter()
        upa.render(lr_map, guide, field, radius=args.radius, device="cpu", max_memory=args.max_memory, out=out)
        t_render = time.perf_counter() - t
        sample = np.asarray(out[:, size // 2 : size // 2 + 64, size // 2 : size // 2 + 64])
        return {
            "size": size,
            "lr": list(lr),
            "steps": args.steps,
            "radius": args.radius,
            "halo": args.wsi_halo,
            "tile_cells": args.tile_cells,
            "n_tiles": meta["n_tiles"],
            "workers": args.workers,
            "memory_limit": args.memory_limit,
            "memory_limit_bytes": parse_bytes(args.memory_limit),
            "max_memory": args.max_memory,
            "fit_seconds": t_fit,
            "fit_seconds_sum": float(sum(meta["seconds_per_tile"])),
            "worker_peak_rss_max": int(max(meta["peak_rss_per_tile"])),
            "worker_baseline_rss": baseline,
            "render_seconds": t_render,
            "render_peak_rss": peak_rss_bytes(),
            "channels": args.channels,
            "output_finite": bool(np.isfinite(sample).all()),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------- report
def _f(v, nd=3):
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def table_halo(sec: dict) -> list:
    """``sec``: {image: run}; rows of several runs (images, floor) merged, one run line per image."""
    L = []
    for name, run in sec.items():
        st = run["stamp"]
        L.append(
            f"- `{name}`: `{st['argv']}` finished {st['date_utc']} UTC, **{run['steps']} fit steps**, patch {run['patch']}, tiles of "
            f"{run['tile_cells']} LR cells, tiled fits on {run['client'] if run['client'] != 'None' else 'this process'}"
            f"{' (' + str(run['workers']) + ' workers)' if run['client'] == 'local' else ''}, {st['wall_seconds'] / 60:.1f} min wall; "
            f"load average {st['load_average_start']} at start, {st['load_average_end']} at end."
        )
    L += [
        "",
        "| image | H x W | h x w | halo | tiles | log σx ratio median / p99 | log σr ratio median / p99 | θ median (°) | render max abs | render PSNR (dB) | labels differing (%) | mIoU tiled / whole (%) | time tiled / whole (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in sec.values():
        for r in sorted(run["rows"], key=lambda r: -1 if r["halo"] == "floor" else r["halo"]):
            halo = f"floor ({run.get('floor_max_memory')} whole fit)" if r["halo"] == "floor" else r["halo"]
            L.append(
                f"| {r['image']} | {r['hr'][0]} x {r['hr'][1]} | {r['lr'][0]} x {r['lr'][1]} | {halo} | {r['n_tiles']} | "
                f"{r['sigma_x_log_median']:.4f} / {r['sigma_x_log_p99']:.3f} | {r['sigma_r_log_median']:.4f} / {r['sigma_r_log_p99']:.3f} | "
                f"{r['theta_median_deg']:.2f} | {r['render_max_abs']:.4f} | {r['render_psnr_db']:.1f} | {r['label_disagree_pct']:.3f} | "
                f"{r['miou_tiled']:.2f} / {r['miou_whole']:.2f} | {r['seconds_tiled']:.0f} / {r['seconds_whole']:.0f} |"
            )
    return L


def table_large(sec: dict) -> list:
    L = [
        f"Run: `{sec['stamp']['argv']}` finished {sec['stamp']['date_utc']} UTC, **{sec['steps']} fit steps{'' if sec['steps'] >= 51 else ' (reduced from 51)'}**, patch {sec['patch']}, "
        f"worker memory limit {sec['memory_limit']}, fit budget (max_memory) {sec['max_memory']}, an idle worker (library and torch imported) "
        f"peaks at {mib(sec['worker_baseline_rss'])}, {sec['stamp']['wall_seconds'] / 60:.1f} min wall; "
        f"load average {sec['stamp']['load_average_start']} at start, {sec['stamp']['load_average_end']} at end.",
        "",
        "| size | h x w | halo | tiles | workers | whole: fit s / worker peak | tiled: wall s / sum of tile s / worker peak | log σx ratio median / p99 | render PSNR (dB) | labels differing (%) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sec["rows"]:
        L.append(
            f"| {r['size']}² | {r['lr'][0]} x {r['lr'][1]} | {r['halo']} | {r['n_tiles']} | {r['workers']} | "
            f"{r['whole_seconds_fit']:.0f} / {mib(r['whole_peak_rss'])} | {r['tiled_seconds_wall']:.0f} / {r['tiled_seconds_sum']:.0f} / {mib(r['tiled_peak_rss_max'])} | "
            f"{r['sigma_x_log_median']:.4f} / {r['sigma_x_log_p99']:.3f} | {r['render_psnr_db']:.1f} | {r['label_disagree_pct']:.3f} |"
        )
    return L


def table_throughput(sec: dict) -> list:
    L = [
        f"Run: `{sec['stamp']['argv']}` finished {sec['stamp']['date_utc']} UTC, worker memory limit {sec['memory_limit']}, "
        f"fit / render budget {sec.get('max_memory')}; load average {sec['stamp']['load_average_start']} at start, "
        f"{sec['stamp']['load_average_end']} at end.",
        "",
        "| workers | planes | plane | LR grid | C | fit steps | HR features | wall (s, incl. cluster start) | planes / minute "
        "| sum of task s: features / fit / PCA / render | worker peak (VmHWM) | output | identical to 1 worker |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sec["rows"]:
        ts = r.get("task_seconds", {})
        stages = " / ".join(f"{ts.get(k, 0.0):.0f}" for k in ("features", "fit", "pca", "render"))
        L.append(
            f"| {r['workers']} | {r['planes']} | {r['size']}² | {r['lr'][0]} x {r['lr'][1]} | {r['channels']} | {r['steps']} | "
            f"{_f(r.get('hr_features'))} | {r['wall_seconds']:.0f} | {r['planes_per_minute']:.2f} | {stages} | "
            f"{mib(r['peak_rss_max'])} | {mib(r.get('output_bytes', 0))} | {_f(r['identical_to_first'])} |"
        )
    return L


def _steps_cell(steps: int) -> str:
    return str(steps) if steps >= 51 else f"**{steps} (reduced)**"


def table_wsi(sec: dict) -> list:
    r = sec["result"]
    return [
        f"Run: `{sec['stamp']['argv']}` finished {sec['stamp']['date_utc']} UTC, {sec['stamp']['wall_seconds'] / 60:.1f} min wall; "
        f"load average {sec['stamp']['load_average_start']} at start, {sec['stamp']['load_average_end']} at end.",
        "",
        "| image | LR grid | fit steps, R_max | tiles (cells, halo) | workers | worker memory limit | fit wall / sum of tiles (s) | worker peak (VmHWM) | render (s) | render process peak | output finite |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {r['size']} x {r['size']} RGB uint8 | {r['lr'][0]} x {r['lr'][1]} | {_steps_cell(r['steps'])}, {r.get('radius', 8)}{'' if r.get('radius', 8) == 8 else ' (reduced)'} | {r['n_tiles']} ({r['tile_cells']}, {r['halo']}) | {r['workers']} | "
        f"{r['memory_limit']} | {r['fit_seconds']:.0f} / {r['fit_seconds_sum']:.0f} | {mib(r['worker_peak_rss_max'])} "
        f"({'under' if r['worker_peak_rss_max'] < r['memory_limit_bytes'] else 'OVER'} the limit; idle worker {mib(r['worker_baseline_rss'])}) | {r['render_seconds']:.0f} | {mib(r['render_peak_rss'])} (budget {r['max_memory']}) | {r['output_finite']} |",
    ]


TABLES = {"halo": table_halo, "large": table_large, "throughput": table_throughput, "wsi": table_wsi}


def write_report(res: dict) -> None:
    if not MD_PATH.exists():
        raise SystemExit(f"{MD_PATH} is missing: it holds the prose and the table markers")
    text = MD_PATH.read_text()
    for name, fn in TABLES.items():
        begin, end = f"<!-- bench_scale:{name} -->", f"<!-- /bench_scale:{name} -->"
        if name not in res or begin not in text:
            continue
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + begin + "\n" + "\n".join(fn(res[name])) + "\n" + end + tail
    tmp = MD_PATH.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(MD_PATH)


# ---------------------------------------------------------------------------- main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("section", choices=["halo", "large", "throughput", "wsi", "report"])
    p.add_argument("--steps", type=int, default=20, help="fit steps (published: 51)")
    p.add_argument("--patch", type=int, default=14, help="HR pixels per LR cell (the ViT patch)")
    p.add_argument("--images", nargs="+", default=["astronaut", "coffee", "chelsea"])
    p.add_argument("--halos", nargs="*", type=int, default=[0, 2, 4, 8])
    p.add_argument(
        "--floor", action="store_true", help="halo: also refit the whole image with --floor-max-memory (rounding floor)"
    )
    p.add_argument("--floor-max-memory", default="40MB")
    p.add_argument("--tile-cells", type=int, default=18, help="tile interior in LR cells")
    p.add_argument("--labels", type=int, default=4, help="k-means classes of the label task")
    p.add_argument("--client", default=None, help="None (serial), 'local' or a scheduler address for the halo study")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--workers-list", nargs="+", type=int, default=[1, 2], help="throughput: worker counts")
    p.add_argument("--sizes", nargs="+", type=int, default=[1024, 2048])
    p.add_argument("--memory-limit", default="4GB", help="Dask memory limit per worker")
    p.add_argument("--max-memory", default="1GB", help="working-memory budget of each fit / render")
    p.add_argument("--planes", type=int, default=16)
    p.add_argument("--plane-size", type=int, default=512)
    p.add_argument("--channels", type=int, default=16, help="channels of the rendered LR map")
    p.add_argument("--pca-only", action="store_true", help="throughput: skip the C x H x W HR features (PCA picture only)")
    p.add_argument("--wsi-size", type=int, default=8192)
    p.add_argument("--wsi-halo", type=int, default=8)
    p.add_argument("--radius", type=int, default=8, help="wsi: R_max of fit and render (published: 8)")
    args = p.parse_args(argv)
    if args.client in (None, "None", "none"):
        args.client = None
    if args.section != "report":
        load_start, t0 = load_average(), time.perf_counter()
        runner = {"halo": run_halo, "large": run_large, "throughput": run_throughput, "wsi": lambda a: {"result": run_wsi(a)}}[
            args.section
        ]
        sec = runner(args)
        res = load_results()  # read now: other sections may have been saved while this one ran
        if args.section == "halo":  # one run per image, each stamped: merge with other images' and rows
            merged = res.get("halo", {})
            for name, run in sec.items():
                keep = [r for r in merged.get(name, {}).get("rows", []) if r["halo"] not in {x["halo"] for x in run["rows"]}]
                if keep:
                    run["rows"] = keep + run["rows"]
                    run["stamp"]["argv"] += " (merged with an earlier run's rows for the other halos)"
                merged[name] = run
            sec = merged
        else:
            sec["stamp"] = stamp(args, load_start, t0)
        res[args.section] = sec
        save_results(res)
    write_report(load_results())
    print(f"wrote {JSON_PATH} and {MD_PATH}")


if __name__ == "__main__":
    main()
