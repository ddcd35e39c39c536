"""The fixed run behind ``tests/test_reference_checksums.py`` and the script that stores its
reference checksums.

The run: CLI ``run`` (in-process, ``cli.main``, random weights, OME-Zarr outputs) on a
two-plane OME-TIFF, CLI ``map`` on a small continuous map and a small label map (kernels fitted
for the map's grid), and the Python ``upsample``. Every output array is hashed (SHA-256 of
dtype, shape and bytes). Byte identity depends on the CPU's vector kernels and on the thread
count, so the run uses one torch thread and the checksums are stored under a fingerprint of the
machine (:func:`fingerprint`).

Regenerate (only when a behaviour change is intended, and say so in the commit)::

    PYTHONPATH=src python tests/reference_run.py

which adds this machine's fingerprint to ``tests/data/reference_checksums.json`` and rewrites
``tests/data/reference_arrays.npz`` (the arrays themselves, compared within a tolerance on
machines whose fingerprint is not stored).
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Dict

import numpy as np

DATA = Path(__file__).resolve().parent / "data"
CHECKSUMS = DATA / "reference_checksums.json"
ARRAYS = DATA / "reference_arrays.npz"

#: a small random-weight ViT (192 channels) keeps the stored arrays well under 1 MB
BACKBONE = "vit_tiny_patch16_224"
STEPS = "2"


def digest(arr: np.ndarray) -> str:
    """SHA-256 of an array's dtype, shape and C-ordered bytes."""
    arr = np.ascontiguousarray(arr)
    h = hashlib.sha256()
    h.update(str(arr.dtype.str).encode())
    h.update(str(tuple(arr.shape)).encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def fingerprint() -> str:
    """What byte identity depends on: torch, its CPU kernels' vector capability, the native
    kernel's build (compiler, flags, vector width) and numpy."""
    import torch

    from napari_upsample_anything.core.engine import native

    return " | ".join(
        [
            f"torch {torch.__version__}",
            f"cpu {torch.backends.cpu.get_cpu_capability()}",
            native.build_description(),
            f"numpy {np.__version__}",
        ]
    )


def _plane_image(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth uint16 picture with two regions and a disc, plus a little noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.where(xx < w / 2, 0.25, 0.7) + 0.2 * np.exp(-((yy - h / 2) ** 2 + (xx - 0.7 * w) ** 2) / (h / 4) ** 2)
    img = img + 0.02 * rng.standard_normal((h, w))
    return (np.clip(img, 0, 1) * 60000).astype(np.uint16)


def _zarr_arrays(store: Path) -> Dict[str, np.ndarray]:
    """Every array in an OME-Zarr store (all pyramid levels), by its path inside the store."""
    import zarr

    out = {}
    root = zarr.open_group(str(store), mode="r")
    for name, arr in sorted(root.arrays()):
        out[name] = np.asarray(arr[...])
    for gname in sorted(name for name, _ in root.groups()):
        for name, arr in _zarr_arrays(Path(store) / gname).items():
            out[f"{gname}/{name}"] = arr
    return out


def reference_run(workdir: Path) -> Dict[str, np.ndarray]:
    """Run the fixed job in ``workdir`` and return every output array by a stable name."""
    import tifffile
    import torch

    from napari_upsample_anything import upsample
    from napari_upsample_anything.cli import main

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        workdir = Path(workdir)
        stack = np.stack([_plane_image(20, 24, 0), _plane_image(20, 24, 1)])
        tif = workdir / "two.ome.tif"
        tifffile.imwrite(tif, stack, ome=True, metadata={"axes": "ZYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
        out = workdir / "run"
        common = ["--steps", STEPS, "--device", "cpu", "--quiet"]
        code = main(
            ["run", str(tif), "--out", str(out), "--backbone", BACKBONE, "--random-weights", "--input-size", "64", *common]
        )
        assert code == 0, f"cli run exited with {code}"
        arrays: Dict[str, np.ndarray] = {}
        for store in sorted((out / "two").glob("*.zarr")):
            for name, arr in _zarr_arrays(store).items():
                arrays[f"run/{store.name}/{name}"] = arr

        guide = workdir / "guide.npy"
        np.save(guide, _plane_image(20, 24, 2))
        rng = np.random.default_rng(3)
        continuous = workdir / "values.npy"
        np.save(continuous, rng.random((2, 5, 6)).astype(np.float32))
        labels = workdir / "labels.npy"
        np.save(labels, (np.arange(30).reshape(5, 6) // 7 % 3).astype(np.int32))
        for name, path in (("continuous", continuous), ("labels", labels)):
            result = workdir / f"{name}_hr.npy"
            code = main(["map", str(path), "--image", str(guide), "--axes", "yx", "--out", str(result), *common])
            assert code == 0, f"cli map ({name}) exited with {code}"
            arrays[f"map/{name}"] = np.load(result)

        rgb = np.stack([_plane_image(20, 24, s) for s in (4, 5, 6)], axis=-1).astype(np.float32) / 60000
        lr = np.random.default_rng(7).standard_normal((3, 5, 6)).astype(np.float32)
        arrays["upsample"] = np.asarray(upsample(rgb, lr, steps=int(STEPS), device="cpu"))
        return arrays
    finally:
        torch.set_num_threads(previous)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        arrays = reference_run(Path(tmp))
    stored = json.loads(CHECKSUMS.read_text()) if CHECKSUMS.exists() else {}
    stored[fingerprint()] = {name: digest(arr) for name, arr in sorted(arrays.items())}
    CHECKSUMS.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
    np.savez_compressed(ARRAYS, **{name.replace("/", "|"): arr for name, arr in arrays.items()})
    print(f"{len(arrays)} arrays, {ARRAYS.stat().st_size} bytes in {ARRAYS.name}; fingerprint: {fingerprint()}", file=sys.stderr)


if __name__ == "__main__":
    main()
