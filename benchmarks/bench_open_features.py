"""Open-and-show time of an HR features store in napari: napari-ome-zarr and our reader, for
the store layout written before issue 20 (chunks of 16 channels, no omero block) and now
(shards of 16 channels holding one-channel chunks, omero windows, one channel shown).

    xvfb-run -a -s "-screen 0 1280x1024x24" python benchmarks/bench_open_features.py --channels 384 --size 1024

Each case runs in a fresh process (a new napari viewer): write the store (random values, not
timed), then time ``viewer.open(path, plugin=...)`` plus the first draw (a canvas screenshot).
Prints a Markdown table (and, with ``--write``, replaces the table in docs/microscopy.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def write_store(path: Path, layout: str, C: int, S: int) -> None:
    import numpy as np

    from napari_upsample_anything.omezarr import BandWriter, create_image, feature_chunks

    rng = np.random.default_rng(0)
    if layout == "before":  # chunks = today's shards, no sharding, no omero (what issue 20 measured)
        chunks = feature_chunks((C, S, S), "cyx")
        chunks = (chunks[0], chunks[1], min(S, 512))
        arr = create_image(path, (C, S, S), "cyx", name="features", chunks=chunks)
        import zarr

        root = zarr.open_group(str(path), mode="r+")
        ome = dict(root.attrs["ome"])
        ome.pop("omero", None)
        root.attrs["ome"] = ome
    else:
        windows = [(-4.0, 4.0)] * C
        arr = create_image(
            path, (C, S, S), "cyx", name="features", channel_names=[f"feature {i}" for i in range(C)], windows=windows,
            visible=[i == 0 for i in range(C)],
        )  # fmt: skip
    writer = BandWriter(arr, "cyx", (None, None, None), (C, S, S))
    step = 64
    for y in range(0, S, step):
        writer[:, y : y + step, :] = rng.standard_normal((C, min(step, S - y), S)).astype(np.float32)
    writer.close()


def one_case(path: str, plugin: str) -> dict:
    import napari
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(show=True)
    QApplication.processEvents()
    t0 = time.perf_counter()
    layers = viewer.open(path, plugin=plugin)
    viewer.screenshot(canvas_only=True)  # the first draw of what is shown
    seconds = time.perf_counter() - t0
    viewer.close()
    return {"seconds": seconds, "layers": len(layers)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--channels", type=int, default=384)
    ap.add_argument("--size", type=int, default=1024, help="side of the square plane in pixels")
    ap.add_argument("--work", default="/tmp/bench_open_features")
    ap.add_argument("--case", nargs=2, metavar=("PATH", "PLUGIN"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(one_case(*args.case)))
        return
    import importlib.metadata as md

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for layout in ("before", "after"):
        path = work / f"{layout}.ome.zarr"
        write_store(path, layout, args.channels, args.size)
        for plugin in ("napari-ome-zarr", "napari-upsample-anything"):
            cmd = [sys.executable, __file__, "--case", str(path), plugin]
            res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
            if res.returncode != 0:
                rows.append((layout, plugin, "failed: " + res.stderr.strip().splitlines()[-1], ""))
                continue
            out = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append((layout, plugin, f"{out['seconds']:.1f}", str(out["layers"])))
    versions = ", ".join(f"{p} {md.version(p)}" for p in ("napari", "napari-ome-zarr", "zarr"))
    print(f"features store {args.channels} x {args.size} x {args.size} float32 ({versions}); load: {os.getloadavg()}")
    print("| store layout | reader | open + first draw (s) | layers |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
