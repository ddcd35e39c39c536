#!/usr/bin/env python
"""Feature upsampling against the backbone's own finer features (for users with real weights).

For each image, DINOv2 ViT-S/14 features are extracted twice: at ``--size`` (224: a 16 x 16
token grid, the *coarse* map) and at twice that size (448: 32 x 32, the *fine* map). The coarse
map is upsampled 2x by each method and compared with the fine map: cosine similarity (mean
over tokens) and relative L2 error ``||up - fine|| / ||fine||``. Two routes:

* ``tokens``: straight onto the 32 x 32 token grid; the guide for JBU / GSJBU is the image
  resized (antialiased) to 32 x 32 pixels (scale 2).
* ``pixels``: onto the 448 x 448 pixels the fine map saw (scale 28, guide = that image), as the
  method is meant to be used, then each fine token's 14 x 14 patch is averaged (area pooling
  to 32 x 32).

The fine map is not ground truth for the upsampled coarse one (a ViT at a higher input
resolution sees every object at a different scale); it is the closest thing to it that needs
no labels. Without ``--weights`` (or ``--pretrained`` with a Hugging Face cache) the ViT is
randomly initialised and the numbers are meaningless: that mode only checks the mechanics.

Usage::

    python benchmarks/bench_features.py --weights dinov2_vits14_pretrain.pth
    python benchmarks/bench_features.py --pretrained            # timm weights from the HF cache
    python benchmarks/bench_features.py --image my.png --out docs/feature_fidelity.md
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
for p in (REPO / "src", REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench_quality import LABELS, METHODS, jbu_upsample  # noqa: E402

import napari_upsample_anything as upa  # noqa: E402

# The JBU setting frozen by bench_quality's grid search (sigma_s in LR cells, sigma_r).
DEFAULT_JBU = (4.0, 0.03)
DEFAULT_IMAGES = ("astronaut", "chelsea", "coffee")


def load_image(spec: str) -> np.ndarray:
    """A scikit-image sample name or an image file, as a centred square uint8/float RGB crop."""
    import skimage.data

    if Path(spec).is_file():
        from skimage.io import imread

        img = imread(spec)
    else:
        img = getattr(skimage.data, spec)()
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    img = img[..., :3]
    H, W = img.shape[:2]
    n = min(H, W)
    y0, x0 = (H - n) // 2, (W - n) // 2
    return np.ascontiguousarray(img[y0 : y0 + n, x0 : x0 + n])


def resize_image(img: np.ndarray, size: int) -> np.ndarray:
    """(size, size, 3) float32 in [0, 1], antialiased bilinear (as the feature extractor resizes)."""
    x = torch.from_numpy(img.astype(np.float32) / (255.0 if img.dtype == np.uint8 else 1.0)).permute(2, 0, 1)[None]
    y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return y[0].permute(1, 2, 0).clamp(0, 1).numpy().copy()


def compare(up: torch.Tensor, fine: torch.Tensor) -> Dict[str, float]:
    cos = F.cosine_similarity(up.reshape(up.shape[0], -1), fine.reshape(fine.shape[0], -1), dim=0)
    return {"cos": float(cos.mean()), "rel_l2": float((up - fine).norm() / fine.norm())}


def upsample_all(coarse: torch.Tensor, guide: np.ndarray, steps: int, jbu: tuple, device: str) -> Dict[str, torch.Tensor]:
    """Every method's upsampling of ``coarse`` (C, h, w) to the guide's (H, W)."""
    H, W = guide.shape[:2]
    out, seconds = {}, {}
    for m in ("nearest", "bilinear", "bicubic"):
        mode = "nearest-exact" if m == "nearest" else m
        kw = {} if m == "nearest" else {"align_corners": False}
        t0 = time.perf_counter()
        out[m] = F.interpolate(coarse[None], size=(H, W), mode=mode, **kw)[0]
        seconds[m] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out["jbu"] = jbu_upsample(coarse, torch.from_numpy(guide).permute(2, 0, 1), *jbu)
    seconds["jbu"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    field = upa.fit_kernels(guide, lr_shape=tuple(coarse.shape[-2:]), steps=steps, device=device)
    out["gsjbu"] = torch.as_tensor(upa.render(coarse, guide, field, device=device)).cpu()
    seconds["gsjbu"] = time.perf_counter() - t0  # fit + render
    seconds["gsjbu_fit"] = float(field.meta["seconds"])
    out["_seconds"] = seconds
    return out


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=None, help="DINOv2 ViT-S/14 weights file (timm or original layout)")
    p.add_argument("--pretrained", action="store_true", help="use timm's pretrained weights from the Hugging Face cache")
    p.add_argument("--backbone", default="dinov2_vits14")
    p.add_argument("--image", action="append", default=None, help="image file or scikit-image sample name (repeatable)")
    p.add_argument("--size", type=int, default=224, help="coarse input size in pixels (fine: twice that)")
    p.add_argument("--steps", type=int, default=51, help="GSJBU fit steps (published: 51)")
    p.add_argument("--routes", default="tokens,pixels", help="comma-separated: tokens, pixels")
    p.add_argument("--jbu", type=float, nargs=2, default=DEFAULT_JBU, metavar=("SIGMA_S", "SIGMA_R"))
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    args = p.parse_args(argv)

    from napari_upsample_anything.core.features import (
        WeightsUnavailableError,
        extract_features,
    )

    random_init = args.weights is None and not args.pretrained
    if random_init:
        msg = ("no --weights given: the ViT is RANDOMLY INITIALISED and every number below is "
               "meaningless (this run only checks the mechanics)")  # fmt: skip
        warnings.warn(msg, UserWarning, stacklevel=2)
        print("WARNING: " + msg, file=sys.stderr)
    routes = [r.strip() for r in args.routes.split(",") if r.strip()]
    bad = set(routes) - {"tokens", "pixels"}
    if bad:
        p.error(f"unknown route(s) {sorted(bad)}; use tokens, pixels")
    images = args.image or list(DEFAULT_IMAGES)
    size, fine_size = int(args.size), 2 * int(args.size)
    t_start = time.perf_counter()
    rows: List[dict] = []
    source = None
    for spec in images:
        img = load_image(spec)
        feats = {}
        for n in (size, fine_size):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*random weights.*")
                try:
                    fm = extract_features(resize_image(img, n), args.backbone, weights=args.weights,
                                          pretrained=not random_init, device=args.device)  # fmt: skip
                except WeightsUnavailableError as exc:
                    raise SystemExit(f"{exc}\n(bench_features: give a local weights file with --weights FILE)") from exc
            feats[n] = fm.features.float()
            source = fm.weights_source
        coarse, fine = feats[size], feats[fine_size]
        C, fh, fw = fine.shape
        for route in routes:
            if route == "tokens":
                guide = resize_image(img, fh)  # one guide pixel per fine token
                ups = upsample_all(coarse, guide, args.steps, tuple(args.jbu), args.device)
                pooled = {m: ups[m] for m in METHODS}
            else:
                guide = resize_image(img, fine_size)
                ups = upsample_all(coarse, guide, args.steps, tuple(args.jbu), args.device)
                pooled = {m: F.adaptive_avg_pool2d(ups[m][None], (fh, fw))[0] for m in METHODS}
            sec = ups["_seconds"]
            for m in METHODS:
                rows.append(dict(image=spec, route=route, method=m, seconds=sec[m], **compare(pooled[m], fine)))
            rows.append(dict(image=spec, route=route, method="_fit", seconds=sec["gsjbu_fit"]))
            done = rows[-len(METHODS) - 1 : -1]
            print(f"{spec} [{route}]: " + ", ".join(f"{r['method']} cos {r['cos']:.4f}" for r in done), flush=True)

    lines = [
        f"# Feature upsampling vs finer features ({args.backbone}, {size} -> {fine_size} px input, "
        f"{coarse.shape[-2]}x{coarse.shape[-1]} -> {fh}x{fw} tokens)",
        "",
        f"Weights: {source}." + (" **Random initialisation: the numbers are meaningless.**" if random_init else ""),
        f"GSJBU: {args.steps} steps; JBU: sigma_s = {args.jbu[0]} LR cells, sigma_r = {args.jbu[1]}. "
        f"Run time {time.perf_counter() - t_start:.0f} s.",
        "",
        "| route | image | " + " | ".join(f"{LABELS[m]} cos / rel L2" for m in METHODS) + " |",
        "|---|---|" + "---|" * len(METHODS),
    ]
    for route in routes:
        for spec in images + ["mean"]:
            cells = []
            for m in METHODS:
                sel = [r for r in rows if r["route"] == route and r["method"] == m and (spec == "mean" or r["image"] == spec)]
                cells.append(f"{np.mean([r['cos'] for r in sel]):.4f} / {np.mean([r['rel_l2'] for r in sel]):.4f}")
            lines.append(f"| {route} | {'**mean**' if spec == 'mean' else spec} | " + " | ".join(cells) + " |")
    lines += ["", "Mean seconds per image (GSJBU: fit + render; its fit alone in brackets):", "",
              "| route | " + " | ".join(LABELS[m] for m in METHODS) + " |", "|---|" + "---|" * len(METHODS)]  # fmt: skip
    for route in routes:
        cells = []
        for m in METHODS:
            t = np.mean([r["seconds"] for r in rows if r["route"] == route and r["method"] == m])
            if m == "gsjbu":
                fit = np.mean([r["seconds"] for r in rows if r["route"] == route and r["method"] == "_fit"])
                cells.append(f"{t:.2f} ({fit:.2f})")
            else:
                cells.append(f"{t:.2f}")
        lines.append(f"| {route} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return {"rows": rows, "markdown": text, "random_init": random_init, "weights_source": source}


if __name__ == "__main__":
    main()
