"""OME-Zarr output benchmark: HR features of a large image written tile by tile, peak memory.

    python benchmarks/bench_ome_zarr.py                          # 4096 x 4096, C = 384 (24 GiB float32)
    python benchmarks/bench_ome_zarr.py --size 1024 --keep       # smaller, keep the output

Renders C random LR channels on the ViT-S/14 patch grid of an S x S guide (a smooth
synthetic image) with the published initial kernel field (the fit is irrelevant to this
measure: the render cost does not depend on the field's values) into
``features.ome.zarr`` through :class:`~napari_upsample_anything.omezarr.BandWriter`, the path
the CLI uses. Peak memory is the VmHWM of this fresh process (everything included: torch,
inputs, engine tiles, band buffer). Prints a markdown table; the output is deleted unless
``--keep``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np


def vmhwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--channels", type=int, default=384)
    ap.add_argument("--patch", type=int, default=14)
    ap.add_argument("--out", default="/tmp/bench_ome_zarr")
    ap.add_argument("--max-memory", default="256MiB", help="the engine's working-memory budget")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    import torch
    import zarr

    import napari_upsample_anything as upa
    from napari_upsample_anything.core.field import KernelField
    from napari_upsample_anything.core.units import format_bytes
    from napari_upsample_anything.omezarr import BandWriter, create_image

    S, C = args.size, args.channels
    h = w = S // args.patch
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    guide = (0.5 + 0.25 * np.sin(yy / 37.0) * np.cos(xx / 23.0) + 0.1 * np.sin((xx + yy) / 9.0)).astype(np.float32)
    del yy, xx
    lr = np.random.default_rng(0).standard_normal((C, h, w), dtype=np.float32)
    field = KernelField.initial((h, w))
    out_dir = Path(args.out)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    store = out_dir / "features.ome.zarr"
    arr = create_image(store, (C, S, S), "cyx", pixel_sizes={"y": 0.1, "x": 0.1}, unit="micrometer", name="features")
    writer = BandWriter(arr, "cyx", (None, None, None), (C, S, S))
    before = vmhwm()
    t0 = time.perf_counter()
    ticks = {"n": 0}

    def progress(done, total, info):
        ticks["n"] += 1
        if ticks["n"] % 50 == 0:
            print(
                f"  {done}/{total} LR cells, {time.perf_counter() - t0:.0f} s, VmHWM {format_bytes(vmhwm())}",
                file=sys.stderr,
                flush=True,
            )

    upa.render(lr, guide, field, device="cpu", precision="fp32", max_memory=args.max_memory, out=writer, progress=progress)
    writer.close()
    seconds = time.perf_counter() - t0
    peak = vmhwm()
    on_disk = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    check = np.asarray(zarr.open_array(str(store / "0"), mode="r")[:2, S // 2, :8])
    assert np.isfinite(check).all() and np.abs(check).sum() > 0
    nbytes = C * S * S * 4
    print(
        f"Environment: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; zarr {zarr.__version__}"
    )
    print()
    print(
        "| image | LR grid | C | HR features (float32) | on disk | chunks | engine budget | time | peak RSS (VmHWM) | before render |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {S}^2 | {h}^2 | {C} | {format_bytes(nbytes)} | {format_bytes(on_disk)} | {tuple(arr.chunks)} | {args.max_memory} | "
        f"{seconds:.0f} s | {format_bytes(peak)} | {format_bytes(before)} |"
    )
    print(f"\nband writer: {writer.bands_written} bands, {writer.rows_written} rows")
    if not args.keep:
        shutil.rmtree(out_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
