"""Scribble segmentation with GSJBU-upsampled features against bilinear, on synthetic scenes.

Question: when a user segments by example (scribbles + a random forest, as in ilastik or
napari-convpaint), does upsampling the ViT tokens with the fitted kernels give better
full-resolution labels than bilinear upsampling?

Scenes (known labels, ``--size`` square, ``--classes`` classes): Voronoi cells, each cell one
class, every class with its own oriented texture. Two families:

* ``colour``: a class also has its own colour (jittered per cell) -- the image's edges are the
  class boundaries;
* ``texture``: every cell gets a random colour whatever its class -- the image has edges at
  every cell boundary, and the class is told by texture only.

Features (hand-made, *not* DINOv2: pretrained weights cannot be downloaded here): each pixel
carries a fixed random embedding of its class (``--channels``) plus the absolute responses of
a fixed random filter bank to the grey image; the LR "tokens" are these averaged over
``--patch`` x ``--patch`` patches plus Gaussian noise. This reproduces what matters for the
upsampler -- tokens that mix classes where a patch straddles a boundary -- without
pretending to be a ViT.

Scribbles: short strokes inside each class (eroded 4 px), ``--scribble`` of the pixels (1 %).
The same scribbles and the same default random forest (50 trees, ``random_state=0``) for
every method:

* ``gsjbu-hr``: HR features rendered with the kernels fitted on the image (streamed), every
  pixel classified;
* ``bilinear-hr``: bilinearly upsampled features, every pixel classified;
* ``lr+bilinear``: LR tokens classified, class probabilities upsampled bilinearly;
* ``lr+gsjbu``: LR tokens classified, class probabilities upsampled with the kernels.

Usage::

    python benchmarks/bench_segmentation.py            # prints the table, writes docs/quality.md section
    python benchmarks/bench_segmentation.py --scenes 2 --no-write
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import napari_upsample_anything as upa  # noqa: E402
from napari_upsample_anything.explore import segment_scribbles  # noqa: E402

METHODS = (
    ("gsjbu-hr", "hr", "kernels", "GSJBU features, HR pixels classified"),
    ("bilinear-hr", "hr", "bilinear", "bilinear features, HR pixels classified"),
    ("lr+gsjbu", "lr", "kernels", "LR tokens classified, probabilities by GSJBU"),
    ("lr+bilinear", "lr", "bilinear", "LR tokens classified, probabilities bilinear"),
)
START = "<!-- bench_segmentation:start -->"
END = "<!-- bench_segmentation:end -->"


def scene(seed: int, size: int, n_classes: int, family: str):
    """``(image (H, W, 3) float32 in [0, 1], labels (H, W) int64 in 1..n_classes)``."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    H = W = size
    n_cells = max(8, size * size // 900)
    seeds = rng.uniform(0, size, (n_cells, 2))
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    ids = np.argmin((yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2, -1)
    cell_class = rng.integers(1, n_classes + 1, n_cells)
    cell_class[:n_classes] = np.arange(1, n_classes + 1)  # every class present
    labels = cell_class[ids]
    palette = rng.uniform(0.15, 0.85, (n_classes + 1, 3))
    if family == "colour":
        cell_colour = palette[cell_class] + rng.normal(0, 0.04, (n_cells, 3))
    else:
        cell_colour = rng.uniform(0.15, 0.85, (n_cells, 3))
    tex = np.zeros((H, W), np.float32)
    for c in range(1, n_classes + 1):
        ang, period = rng.uniform(0, np.pi), rng.uniform(4.0, 10.0)
        t = np.sin(2 * np.pi * (xx * np.cos(ang) + yy * np.sin(ang)) / period)
        tex[labels == c] = t[labels == c]
    img = cell_colour[ids] + 0.08 * tex[..., None]
    img = np.stack([gaussian_filter(img[..., g], 0.6) for g in range(3)], -1)
    img += rng.normal(0, 0.01, img.shape)
    return np.clip(img, 0, 1).astype(np.float32), labels.astype(np.int64)


def tokens(img: np.ndarray, labels: np.ndarray, n_classes: int, channels: int, patch: int, noise: float, seed: int) -> np.ndarray:
    """``(channels + 16, H/patch, W/patch)`` LR tokens: patch-averaged class embeddings + texture responses + noise."""
    g = torch.Generator().manual_seed(1000 + seed)
    embed = torch.randn(n_classes + 1, channels, generator=g)
    per_pixel = embed[torch.from_numpy(labels)].permute(2, 0, 1)  # (channels, H, W)
    bank = torch.randn(16, 1, 7, 7, generator=torch.Generator().manual_seed(7))
    bank -= bank.mean((2, 3), keepdim=True)
    grey = torch.from_numpy(img.mean(-1))[None, None]
    texture = F.conv2d(grey, bank, padding=3)[0].abs() * 4.0
    lr = F.avg_pool2d(torch.cat([per_pixel, texture])[None], patch)[0]
    return (lr + noise * torch.randn(lr.shape, generator=g)).numpy()


def scribbles_for(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    from scipy.ndimage import binary_erosion

    rng = np.random.default_rng(5000 + seed)
    H, W = labels.shape
    out = np.zeros_like(labels)
    classes = np.unique(labels)
    per_class = max(1, int(fraction * H * W) // len(classes))
    for c in classes:
        inner = binary_erosion(labels == c, iterations=4)
        ys, xs = np.nonzero(inner)
        if len(ys) == 0:
            ys, xs = np.nonzero(labels == c)
        painted, tries = 0, 0
        while painted < per_class and tries < 10_000:
            tries += 1
            k = rng.integers(len(ys))
            y, x0 = ys[k], xs[k]
            for x in range(x0, min(x0 + 12, W)):
                if (inner[y, x] or not inner.any()) and out[y, x] == 0 and painted < per_class:
                    out[y, x] = c
                    painted += 1
    return out


def miou(truth: np.ndarray, pred: np.ndarray) -> float:
    ious = []
    for c in np.unique(truth):
        inter = np.sum((truth == c) & (pred == c))
        union = np.sum((truth == c) | (pred == c))
        ious.append(inter / union)
    return float(np.mean(ious))


def run(args) -> dict:
    import sklearn.ensemble  # noqa: F401 - imported once here, not inside the first timed call

    rows = []
    for family in args.families:
        for s in range(args.scenes):
            seed = 100 * (family == "texture") + s
            img, truth = scene(seed, args.size, args.classes, family)
            lr = tokens(img, truth, args.classes, args.channels, args.patch, args.noise, seed)
            scr = scribbles_for(truth, args.scribble, seed)
            t0 = time.perf_counter()
            field = upa.fit_kernels(img, lr.shape[-2:], steps=args.steps, device=args.device)
            fit_s = time.perf_counter() - t0
            rec = {"family": family, "seed": seed, "fit_s": fit_s, "scribbled": float(np.mean(scr > 0))}
            for name, route, up, _ in METHODS:
                t0 = time.perf_counter()
                labels, _ = segment_scribbles(
                    lr,
                    scr,
                    img,
                    field if up == "kernels" else None,
                    route=route,
                    upsampler=up,
                    device=args.device,
                )
                rec[name] = miou(truth, labels)
                rec[name + "_s"] = time.perf_counter() - t0
            rows.append(rec)
            print(
                f"{family:8s} seed {seed:3d}: fit {fit_s:5.1f} s  "
                + "  ".join(f"{n} {100 * rec[n]:5.1f}% ({rec[n + '_s']:.1f} s)" for n, *_ in METHODS),
                flush=True,
            )
    return {"rows": rows}


def table(res: dict, args) -> str:
    rows = res["rows"]
    lines = [
        "| scenes | " + " | ".join(f"{n} mIoU" for n, *_ in METHODS) + " |",
        "|---" * (len(METHODS) + 1) + "|",
    ]
    for family in args.families:
        sel = [r for r in rows if r["family"] == family]
        vals = [np.mean([r[n] for r in sel]) for n, *_ in METHODS]
        best = int(np.argmax(vals))
        cells = [f"**{100 * v:.1f} %**" if i == best else f"{100 * v:.1f} %" for i, v in enumerate(vals)]
        lines.append(f"| {family} ({len(sel)}) | " + " | ".join(cells) + " |")
    times = [np.mean([r[n + "_s"] for r in rows]) for n, *_ in METHODS]
    lines.append("| time per image (train + classify) | " + " | ".join(f"{t:.1f} s" for t in times) + " |")
    return "\n".join(lines)


def section(res: dict, args, seconds: float) -> str:
    rows = res["rows"]
    fit = np.mean([r["fit_s"] for r in rows])
    frac = 100 * np.mean([r["scribbled"] for r in rows])
    per_image = ["| scene | seed | " + " | ".join(n for n, *_ in METHODS) + " |", "|---|---" + "|---" * len(METHODS) + "|"]
    for r in rows:
        per_image.append(f"| {r['family']} | {r['seed']} | " + " | ".join(f"{100 * r[n]:.1f}" for n, *_ in METHODS) + " |")
    wins = sum(r["gsjbu-hr"] > r["bilinear-hr"] for r in rows)
    wins_lr = sum(r["lr+gsjbu"] > r["lr+bilinear"] for r in rows)
    return "\n".join(
        [
            START,
            "## Scribble segmentation (feature explorer)",
            "",
            f"Generated by `python benchmarks/bench_segmentation.py` ({seconds / 60:.1f} min, {platform.machine()}, "
            f"{os.cpu_count()} CPUs, torch {torch.__version__}). Synthetic Voronoi scenes of {args.size} x {args.size} "
            f"pixels with {args.classes} textured classes; **hand-made features, not DINOv2** (no pretrained weights "
            f"can be downloaded here): per-pixel class embeddings ({args.channels} channels) plus 16 random-filter "
            f"texture responses, averaged over {args.patch} x {args.patch} patches, plus noise (sigma {args.noise}). "
            f"The same scribbles ({frac:.2f} % of the pixels, strokes inside each class) and the same random forest "
            f"(`segment_scribbles` defaults) for every method; kernels fitted with {args.steps} steps "
            f"({fit:.1f} s per image, not included in the times below; load average {os.getloadavg()[0]:.1f} at the "
            f"end: the machine was shared). mIoU over the classes, averaged over scenes.",
            "",
            "- `colour`: each class has its own colour, so the image's edges are the class boundaries.",
            "- `texture`: each cell has a random colour whatever its class: the image has edges at every cell "
            "boundary, not only between classes.",
            "",
            "The tokens are built from the true labels, so inside a patch they are perfectly semantic: the "
            "differences below measure how each method places class boundaries, not how good the features are. "
            "The kernels follow image edges; where two classes meet *without* an edge in the image (same colour, "
            "different texture only) they do worse than bilinear (`tests/test_explore.py`: 88.0 % against 93.6 % "
            "pixel accuracy on such a two-texture image).",
            "",
            table(res, args),
            "",
            f"GSJBU-upsampled features beat bilinear ones on {wins} of {len(rows)} scenes (HR pixels classified) and "
            f"{wins_lr} of {len(rows)} (LR tokens classified, probabilities upsampled).",
            "",
            "Per scene (mIoU %):",
            "",
            *per_image,
            END,
        ]
    )


def write_section(path: Path, text: str) -> None:
    old = path.read_text() if path.exists() else ""
    if START in old and END in old:
        new = old[: old.index(START)] + text + old[old.index(END) + len(END) :]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=str(path.parent))
    with os.fdopen(fd, "w") as fh:
        fh.write(new)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--channels", type=int, default=48)
    p.add_argument("--noise", type=float, default=0.5)
    p.add_argument("--scenes", type=int, default=3, help="scenes per family")
    p.add_argument("--families", nargs="+", default=["colour", "texture"], choices=["colour", "texture"])
    p.add_argument("--scribble", type=float, default=0.01, help="fraction of pixels scribbled")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "quality.md")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    res = run(args)
    seconds = time.perf_counter() - t0
    print()
    print(table(res, args))
    if not args.no_write:
        write_section(args.out, section(res, args, seconds))
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
