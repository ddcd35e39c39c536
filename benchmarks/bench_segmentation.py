"""Segment by example at full resolution: routes compared on synthetic scenes and a microscopy-like stack.

Question: when a user segments by example (scribbles + a random forest, as in ilastik or
napari-convpaint), which route gives the best full-resolution labels, and what does it cost?

Routes (the same scribbles; the same default random forest, 50 trees, ``random_state=0``,
except the convpaint routes, which bring convpaint's own classifiers):

* ``hr-kernels``: HR features rendered with the GSJBU kernels fitted on the image (streamed),
  every pixel classified (``route="hr"``);
* ``lr-kernels``: LR tokens classified, class probabilities upsampled with the kernels
  (``route="lr"``);
* ``hr-bilinear``: bilinearly upsampled features, every pixel classified;
* ``lr-bilinear``: LR tokens classified, probabilities upsampled bilinearly;
* ``filter-bank``: a classic filter bank, scikit-image's ``multiscale_basic_features``
  (intensity, gradient and Hessian eigenvalues at sigma 0.5..16: ilastik-style filters),
  every pixel classified;
* ``convpaint`` and ``convpaint-rf`` (only where ``import napari_convpaint`` works; not a
  dependency of this project): napari-convpaint's own offline feature set (alias
  ``"gaussian"``) and its own classifier (CatBoost by default; its random-forest option for
  ``convpaint-rf``) through its Python API, on the same scribbles; see
  ``_seg_convpaint.py`` for what exactly runs and why its other extractors cannot here.
  The script prints, and the generated section says, whether this route ran.

Data (known labels): ``colour`` and ``texture`` Voronoi scenes (every class with its own
oriented texture; ``colour``: also its own colour, so image edges are class boundaries;
``texture``: random colour per cell) and ``microscopy``: a fluorescence-like stack of cells
(background / cytoplasm / nucleus) drifting between planes, blurred, with Poisson noise;
its scribbles are on two planes and the classifier is applied to every plane.

Features (hand-made, *not* DINOv2/DINOv3: pretrained weights cannot be downloaded here):
each pixel carries a fixed random embedding of its class (``--channels``) plus the absolute
responses of a fixed random filter bank to the grey image; the LR "tokens" are these averaged
over ``--patch`` x ``--patch`` patches plus Gaussian noise. This reproduces what matters for
the upsampler (tokens that mix classes where a patch straddles a boundary) without pretending
to be a ViT; because the tokens are built from the true labels they favour the token routes
over the filter bank, which sees only the image: compare the token routes with each other,
and read the filter bank as the "no ViT" baseline.

Metrics: mIoU over the classes and boundary F1 (boundary pixels of the prediction within
``--tolerance`` pixels of a true boundary and vice versa). Times: train (features at the
scribbles + classifier fit) and predict (every pixel), at ``--timing-sizes`` (512 and 2048 by
default) and on a ``--stack-planes`` x ``--stack-size``^2 stack (10 x 512^2), the kernel fit
reported on its own, with the same settings (``--steps``) as the quality table; each case
runs ``--timing-repeats`` times (3) and the table gives the medians. Times depend on the
machine's load (recorded at the start, per run and at the end); mIoU and boundary F1 do not.

Usage::

    python benchmarks/bench_segmentation.py                 # full run, writes docs/segmentation.md
    python benchmarks/bench_segmentation.py --quick         # minutes: small sizes, proves it works
    /work/cp-venv/bin/python benchmarks/bench_segmentation.py   # with the napari-convpaint route
                                                                # (venv recipe: _seg_convpaint.py)
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _seg_convpaint  # noqa: E402 - the optional napari-convpaint baseline

import napari_upsample_anything as upa  # noqa: E402
from napari_upsample_anything.core.feature_queries import ScribbleClassifier  # noqa: E402
from napari_upsample_anything.explore import apply_classifier, scribble_samples  # noqa: E402

#: name, route, upsampler ("kernels" / "bilinear" / "bank"), description
METHODS = (
    ("hr-kernels", "hr", "kernels", "GSJBU-upsampled features, HR pixels classified"),
    ("lr-kernels", "lr", "kernels", "LR tokens classified, probabilities upsampled by GSJBU"),
    ("hr-bilinear", "hr", "bilinear", "bilinear-upsampled features, HR pixels classified"),
    ("lr-bilinear", "lr", "bilinear", "LR tokens classified, probabilities upsampled bilinearly"),
    ("filter-bank", "hr", "bank", "scikit-image multiscale basic features (ilastik-style), HR pixels classified"),
)
#: napari-convpaint's version where it imports (then the ``convpaint`` route runs), else None
CONVPAINT = _seg_convpaint.version()
if CONVPAINT:
    METHODS += (
        ("convpaint", "hr", "convpaint", "napari-convpaint's own offline features + its default CatBoost, through its API"),
        ("convpaint-rf", "hr", "convpaint-rf", "the same features + convpaint's random-forest option (use_rf=True)"),
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
    grey = torch.from_numpy(np.ascontiguousarray(img if img.ndim == 2 else img.mean(-1), np.float32))[None, None]
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


def microscopy_stack(seed: int, size: int, planes: int):
    """``(stack (Z, H, W) float32 in [0, 1], labels (Z, H, W) int64)``: 1 background, 2 cytoplasm, 3 nucleus."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(7000 + seed)
    n = max(4, size * size // 2500)
    centres = rng.uniform(0.1 * size, 0.9 * size, (n, 2))
    radii = rng.uniform(0.05, 0.09, n) * size
    drift = rng.normal(0, 0.01 * size, (n, 2))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    stack, labels = [], []
    for z in range(planes):
        lab = np.ones((size, size), np.int64)
        img = np.full((size, size), 0.08, np.float32)
        for (cy, cx), r, (dy, dx) in zip(centres, radii, drift):
            cy, cx = cy + z * dy, cx + z * dx
            d2 = (yy - cy) ** 2 + (xx - cx) ** 2
            cell = d2 < r**2
            nucleus = d2 < (0.45 * r) ** 2
            lab[cell] = 2
            lab[nucleus] = 3
            img[cell] = 0.35 + 0.05 * np.sin(xx[cell] / 3.0)
            img[nucleus] = 0.8
        img = gaussian_filter(img, 1.2)
        img = rng.poisson(img * 200) / 200.0
        stack.append(np.clip(img, 0, 1).astype(np.float32))
        labels.append(lab)
    return np.stack(stack), np.stack(labels)


def boundaries(labels: np.ndarray) -> np.ndarray:
    b = np.zeros(labels.shape, bool)
    b[:-1] |= labels[:-1] != labels[1:]
    b[1:] |= labels[:-1] != labels[1:]
    b[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    b[:, 1:] |= labels[:, :-1] != labels[:, 1:]
    return b


def boundary_f1(truth: np.ndarray, pred: np.ndarray, tolerance: float) -> float:
    """F1 of boundary pixels matched within ``tolerance`` pixels (Euclidean)."""
    from scipy.ndimage import distance_transform_edt

    bt, bp = boundaries(truth), boundaries(pred)
    if not bt.any() and not bp.any():
        return 1.0
    if not bt.any() or not bp.any():
        return 0.0
    precision = float(np.mean(distance_transform_edt(~bt)[bp] <= tolerance))
    recall = float(np.mean(distance_transform_edt(~bp)[bt] <= tolerance))
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def miou(truth: np.ndarray, pred: np.ndarray) -> float:
    ious = []
    for c in np.unique(truth):
        inter = np.sum((truth == c) & (pred == c))
        union = np.sum((truth == c) | (pred == c))
        ious.append(inter / union)
    return float(np.mean(ious))


def filter_bank(img: np.ndarray) -> np.ndarray:
    """``(F, H, W)`` float32 scikit-image multiscale basic features of a gray or RGB image."""
    from skimage.feature import multiscale_basic_features

    f = multiscale_basic_features(img, channel_axis=-1 if img.ndim == 3 else None, sigma_max=16)
    return np.ascontiguousarray(np.moveaxis(f, -1, 0), np.float32)


def run_method(method, lr, img, field, scr_pairs, targets, device):
    """Train on ``scr_pairs`` [(plane index, scribbles)], predict every plane of ``targets``.

    Returns (predictions, train seconds, predict seconds). ``lr``, ``img``, ``field``: lists per plane.
    """
    name, route, up, _ = method
    if up in ("convpaint", "convpaint-rf"):
        return _seg_convpaint.run(img, scr_pairs, targets, use_rf=up == "convpaint-rf")
    t0 = time.perf_counter()
    X, y = [], []
    banks = {}
    for k, scr in scr_pairs:
        if up == "bank":
            banks[k] = filter_bank(img[k])
            xs, ys = scribble_samples(banks[k], scr, min_classes=1)
        else:
            xs, ys = scribble_samples(
                lr[k],
                scr,
                img[k],
                field[k] if up == "kernels" else None,
                route=route,
                upsampler=up,
                device=device,
                min_classes=1,
            )
        X.append(xs)
        y.append(ys)
    clf = ScribbleClassifier.train(np.concatenate(X), np.concatenate(y), route=route)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    preds = []
    for k in targets:
        if up == "bank":
            feats = banks.get(k)
            feats = filter_bank(img[k]) if feats is None else feats
            labels, _ = apply_classifier(clf, feats)
        else:
            labels, _ = apply_classifier(
                clf, lr[k], img[k], field[k] if up == "kernels" else None, route=route, upsampler=up, device=device
            )
        preds.append(labels)
    return preds, train_s, time.perf_counter() - t0


def _prepare(img_planes, label_planes, args, seed):
    lr = [
        tokens(im, lab, args.classes_max, args.channels, args.patch, args.noise, seed)
        for im, lab in zip(img_planes, label_planes)
    ]
    t0 = time.perf_counter()
    field = [
        upa.fit_kernels(im, l.shape[-2:], steps=args.steps, device=args.device, channel_axis=-1 if im.ndim == 3 else None)
        for im, l in zip(img_planes, lr)
    ]
    return lr, field, time.perf_counter() - t0


def quality(args) -> list:
    import sklearn.ensemble  # noqa: F401 - imported once here, not inside the first timed call

    rows = []
    for family in args.families:
        for s in range(args.scenes):
            seed = 100 * (family == "texture") + s
            if family == "microscopy":
                stack, truth = microscopy_stack(seed, args.size, args.planes)
                imgs, truths = list(stack), list(truth)
                scr = [
                    (0, scribbles_for(truths[0], args.scribble, seed)),
                    (len(imgs) - 1, scribbles_for(truths[-1], args.scribble, seed + 1)),
                ]
            else:
                img, lab = scene(seed, args.size, args.classes, family)
                imgs, truths = [img], [lab]
                scr = [(0, scribbles_for(lab, args.scribble, seed))]
            lr, field, fit_s = _prepare(imgs, truths, args, seed)
            rec = {"family": family, "seed": seed, "fit_s": fit_s / len(imgs), "planes": len(imgs)}
            for method in METHODS:
                preds, tr, pr = run_method(method, lr, imgs, field, scr, range(len(imgs)), args.device)
                n = method[0]
                rec[n] = float(np.mean([miou(t, p) for t, p in zip(truths, preds)]))
                rec[n + "_bf1"] = float(np.mean([boundary_f1(t, p, args.tolerance) for t, p in zip(truths, preds)]))
                rec[n + "_s"] = (tr + pr) / len(imgs)
            rows.append(rec)
            print(
                f"{family:10s} seed {seed:3d}: fit {rec['fit_s']:5.1f} s/plane  "
                + "  ".join(f"{n} {100 * rec[n]:5.1f}%/{100 * rec[n + '_bf1']:4.1f}" for n, *_ in METHODS),
                flush=True,
            )
    return rows


def timing(args) -> list:
    """Per case, ``--timing-repeats`` runs of the kernel fit and every route; the table gives their medians."""
    rows = []
    cases = [(f"{n}^2", n, 1) for n in args.timing_sizes]
    if args.stack_planes:
        cases.append((f"{args.stack_planes} x {args.stack_size}^2 stack", args.stack_size, args.stack_planes))
    for label, size, planes in cases:
        stack, truth = microscopy_stack(1, size, planes)
        imgs, truths = list(stack), list(truth)
        scr = [(0, scribbles_for(truths[0], args.scribble, 1))]
        loads, fits, lines, runs = [], [], [], {n: [] for n, *_ in METHODS}
        for _ in range(args.timing_repeats):
            loads.append(os.getloadavg()[0])
            lr, field, fit_s = _prepare(imgs, truths, args, 1)
            fits.append(fit_s)
            for method in METHODS:
                _, tr, pr = run_method(method, lr, imgs, field, scr, range(planes), args.device)
                runs[method[0]].append((tr, pr))
            lines.append(
                f"{label}: load {loads[-1]:.1f}  fit {fit_s:.1f} s  "
                + "  ".join(f"{n} {t[-1][0]:.2f}+{t[-1][1]:.2f} s" for n, t in runs.items())
            )
            print(lines[-1], flush=True)
        rec = {"case": label, "fit_s": float(np.median(fits)), "load": (min(loads), max(loads)), "lines": lines}
        rec.update({n: tuple(np.median(np.array(t), 0)) for n, t in runs.items()})
        rows.append(rec)
    return rows


def quality_table(rows, args) -> str:
    names = [n for n, *_ in METHODS]
    lines = ["| data | " + " | ".join(f"{n} mIoU / BF1" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for family in args.families:
        sel = [r for r in rows if r["family"] == family]
        if not sel:
            continue
        vals = [np.mean([r[n] for r in sel]) for n in names]
        bf1 = [np.mean([r[n + "_bf1"] for r in sel]) for n in names]
        best = int(np.argmax(vals))
        cells = [
            (f"**{100 * v:.1f}**" if i == best else f"{100 * v:.1f}") + f" / {100 * b:.1f}"
            for i, (v, b) in enumerate(zip(vals, bf1))
        ]
        lines.append(f"| {family} ({len(sel)} x {sel[0]['planes']} plane(s)) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _s(seconds: float) -> str:
    """Seconds with two decimals below 1 s (the small cases), one above."""
    return f"{seconds:.2f}" if seconds < 1 else f"{seconds:.1f}"


def timing_table(rows) -> str:
    names = [n for n, *_ in METHODS]
    lines = [
        "| case | load | kernel fit | " + " | ".join(f"{n} train + predict" for n in names) + " |",
        "|---|---|---" + "|---" * len(names) + "|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['load'][0]:.1f}-{r['load'][1]:.1f} | {_s(r['fit_s'])} s | "
            + " | ".join(f"{_s(r[n][0])} + {_s(r[n][1])} s" for n in names)
            + " |"
        )
    return "\n".join(lines)


def baseline_line() -> str:
    """Which classic baselines ran: the scikit-image filter bank always, napari-convpaint where it imports."""
    if CONVPAINT:
        return f"Baselines: `filter-bank` (scikit-image) and `convpaint`: {_seg_convpaint.describe()}."
    return (
        "Baseline: `filter-bank` (scikit-image) only; **napari-convpaint was not importable** in this "
        "environment, so its route did not run."
    )


def section(qrows, trows, args, seconds: float) -> str:
    flags = " ".join(sys.argv[1:]) if sys.argv[1:] and Path(sys.argv[0]).name == "bench_segmentation.py" else ""
    quick = f" {flags}" if flags else ""
    return "\n".join(
        [
            START,
            f"Generated by `python benchmarks/bench_segmentation.py{quick}` ({seconds / 60:.1f} min, {platform.machine()}, "
            f"{os.cpu_count()} CPUs, torch {torch.__version__}, device {args.device}; 1-minute load average "
            f"{args.load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end: the times depend on it, "
            f"mIoU and BF1 do not). {baseline_line()} **Hand-made token features, not DINOv2/DINOv3** (see the "
            f"script's docstring): {args.channels} class-embedding channels + 16 texture responses averaged over "
            f"{args.patch} x {args.patch} patches, noise sigma {args.noise}. Scenes {args.size}^2, {args.classes} classes; "
            f"microscopy stack {args.planes} planes of {args.size}^2, 3 classes, scribbles on its first and last plane; "
            f"scribbles {100 * args.scribble:.1f} % of the pixels; kernels fitted with {args.steps} steps; boundary F1 "
            f"within {args.tolerance:g} px. mIoU / boundary F1 in %, mean over scenes (best mIoU in bold).",
            "",
            quality_table(qrows, args),
            "",
            "Train (features at the scribbles + classifier fit: the random forest; convpaint's own for its routes) and "
            "predict (every pixel of every plane) times, microscopy-like data, scribbles on one plane; the kernel "
            f"fit (all planes) on its own; medians of {args.timing_repeats} runs per case; load: the 1-minute load "
            "average at the start of each run (lowest-highest):",
            "",
            timing_table(trows),
            "",
            "<details><summary>Every timing run (the lines the script prints: load, fit, train+predict seconds)</summary>",
            "",
            "```",
            *[line for r in trows for line in r["lines"]],
            "```",
            "</details>",
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
    p.add_argument("--size", type=int, default=256, help="scene / stack plane size for the quality table")
    p.add_argument("--patch", type=int, default=14)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--channels", type=int, default=48)
    p.add_argument("--noise", type=float, default=0.5)
    p.add_argument("--scenes", type=int, default=3, help="scenes per family")
    p.add_argument("--planes", type=int, default=5, help="planes of the microscopy stack in the quality table")
    p.add_argument(
        "--families", nargs="+", default=["colour", "texture", "microscopy"], choices=["colour", "texture", "microscopy"]
    )
    p.add_argument("--scribble", type=float, default=0.01, help="fraction of pixels scribbled")
    p.add_argument("--tolerance", type=float, default=2.0, help="boundary F1 tolerance in pixels")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--timing-sizes", type=int, nargs="*", default=[512, 2048])
    p.add_argument("--stack-planes", type=int, default=10)
    p.add_argument("--stack-size", type=int, default=512)
    p.add_argument("--timing-repeats", type=int, default=3, help="runs per timing case; the table gives the medians")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="small sizes: proves the script works in minutes")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "segmentation.md")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.scenes, args.planes, args.steps = 96, 1, 3, 10
        args.timing_sizes, args.stack_planes, args.stack_size, args.timing_repeats = [128], 2, 96, 1
    args.classes_max = max(args.classes, 3)  # the microscopy stack has 3 classes
    args.load_start = os.getloadavg()[0]
    print(baseline_line(), flush=True)
    print(f"load average at the start: {args.load_start:.1f}", flush=True)
    t0 = time.perf_counter()
    qrows = quality(args)
    trows = timing(args)
    seconds = time.perf_counter() - t0
    print()
    print(quality_table(qrows, args))
    print()
    print(timing_table(trows))
    if not args.no_write:
        write_section(args.out, section(qrows, trows, args, seconds))
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
