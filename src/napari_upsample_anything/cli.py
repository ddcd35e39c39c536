"""``upsample-anything``: the headless main job.

    upsample-anything run IMAGE... --out DIR [options]
    upsample-anything demo [--out DIR]

Exit codes: 0 success, 1 failure (missing weights, out of memory, cancelled, ...),
2 bad usage (unknown option, unreadable file, invalid value). Errors print one line;
``--traceback`` shows the Python traceback for bug reports.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A mistake in how the command was called (exit code 2)."""


# ------------------------------------------------------------------------------ helpers
class Bar:
    """A tqdm progress bar driven by the core's ``progress(done, total, info)`` protocol."""

    def __init__(self, desc: str, quiet: bool = False):
        self.desc = desc
        self.quiet = quiet
        self.bar = None

    def __call__(self, done: int, total: int, info: dict) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        if self.bar is None or self.bar.total != total:
            self.close()
            self.bar = tqdm(total=total, desc=self.desc, leave=False, dynamic_ncols=True, file=sys.stderr)
        self.bar.n = done
        if "loss" in info:
            self.bar.set_postfix(loss=f"{info['loss']:.4f}", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _peak_memory(device) -> Dict[str, int]:
    import resource

    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = {"process_peak_rss_bytes": int(rss * (1 if sys.platform == "darwin" else 1024))}
    if device.type == "cuda":
        peak["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return peak


def _table(rows: List[List[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _parse_memory(text: Optional[str]):
    from .core.units import parse_bytes

    if text is None:
        return None
    try:
        return parse_bytes(text, "--max-memory")
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def _output_dir(out: str) -> Path:
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    return path


# ------------------------------------------------------------------------------ run
def process_image(image, name: str, outdir: Path, args, quiet: bool = False) -> Dict:
    """Features -> fit -> HR PCA (+ HR features) for one image; writes files, returns the report."""
    import numpy as np

    from . import api
    from .core.device import resolve_device
    from .core.features import extract_features
    from .core.io import guide_from_image, nearest_resize, save_png, side_by_side
    from .core.memory import MemoryLog

    device = resolve_device(args.device)
    budget = _parse_memory(args.max_memory)
    times: Dict[str, float] = {}
    outdir.mkdir(parents=True, exist_ok=True)

    t = time.perf_counter()
    bar = Bar(f"{name}: features", quiet)
    fmap = extract_features(
        image,
        args.backbone,
        layer=args.layer,
        input_size=args.input_size,
        weights=args.weights,
        device=device,
        max_memory=budget,
        progress=bar,
    )
    bar.close()
    feats, geom = fmap.features, fmap.geometry
    times["features"] = time.perf_counter() - t

    guide = guide_from_image(image)
    memlog = MemoryLog()
    t = time.perf_counter()
    bar = Bar(f"{name}: fit", quiet)
    smooth = dict(guide_smoothing=args.guide_smoothing)
    field = api.fit_kernels(
        guide, tuple(geom.lr_shape), steps=args.steps, device=device, precision=args.precision,
        max_memory=budget, progress=bar, memory_log=memlog, downsample=args.fit_downsample, **smooth,
    )
    bar.close()
    times["fit"] = time.perf_counter() - t
    field.save(outdir / "kernels.npz")

    t = time.perf_counter()
    bar = Bar(f"{name}: HR PCA", quiet)
    hr_rgb, basis = api.render_pca(feats, guide, field, device=device, precision=args.precision, max_memory=budget, progress=bar, **smooth)
    bar.close()
    lr_rgb, _ = api.pca_rgb(feats, basis=basis)
    save_png(outdir / "pca.png", side_by_side(nearest_resize(lr_rgb, hr_rgb.shape[:2]), hr_rgb))
    times["pca"] = time.perf_counter() - t

    files = ["kernels.npz", "pca.png"]
    if not args.pca_only:
        t = time.perf_counter()
        C = int(feats.shape[0])
        H, W = guide.shape[:2]
        mm = np.lib.format.open_memmap(outdir / "features_hr.npy", mode="w+", dtype=np.dtype(args.dtype), shape=(C, H, W))
        bar = Bar(f"{name}: HR features", quiet)
        api.render(feats, guide, field, device=device, precision=args.precision, max_memory=budget, out=mm, progress=bar, memory_log=memlog, **smooth)
        bar.close()
        mm.flush()
        del mm
        times["render"] = time.perf_counter() - t
        files.append("features_hr.npy")

    report = {
        "image": name,
        "image_shape": list(np.shape(image)),
        "image_dtype": str(getattr(image, "dtype", "")),
        "backbone": fmap.backbone,
        "weights_source": fmap.weights_source,
        "layer": args.layer,
        "geometry": geom.to_dict(),
        "lr_shape": list(geom.lr_shape),
        "hr_shape": list(guide.shape[:2]),
        "channels": int(feats.shape[0]),
        "output_dtype": None if args.pca_only else args.dtype,
        "steps": args.steps,
        "fit_downsample": args.fit_downsample,
        "guide_smoothing": args.guide_smoothing,
        "device": str(device),
        "precision": args.precision,
        "seconds": times,
        "fit_loss_first": field.meta["loss_per_step"][0] if field.meta["loss_per_step"] else None,
        "fit_loss_final": field.meta.get("final_loss"),
        "fit_psnr_db": field.meta.get("psnr"),
        "pca_explained_variance": [float(v) for v in basis.explained_variance_ratio],
        "memory": {**_peak_memory(device), "budget_bytes": memlog.budget_bytes, "peak_tile_planned_bytes": memlog.peak_planned_bytes},
        "files": files,
    }
    (outdir / "report.json").write_text(json.dumps(report, indent=2))
    return report


def cmd_run(args) -> int:
    from .core.io import load_image

    images = []
    for p in args.images:
        try:
            images.append((Path(p), load_image(p)))
        except (FileNotFoundError, ValueError) as exc:
            raise UsageError(str(exc)) from exc
    out = _output_dir(args.out)
    stems = [p.stem for p, _ in images]
    rows = [["image", "size", "LR grid", "C", "features s", "fit s", "render s", "PSNR dB", "outputs"]]
    for (path, image), stem in zip(images, stems):
        sub = out / (stem if stems.count(stem) == 1 else f"{stem}_{abs(hash(str(path))) % 10000}")
        rep = process_image(image, path.name, sub, args, quiet=args.quiet)
        s = rep["seconds"]
        rows.append([
            path.name, "x".join(map(str, rep["hr_shape"])), "x".join(map(str, rep["lr_shape"])), str(rep["channels"]),
            f"{s['features']:.1f}", f"{s['fit']:.1f}", f"{s.get('render', 0.0) + s['pca']:.1f}",
            f"{rep['fit_psnr_db']:.2f}", str(sub),
        ])
    print(_table(rows))
    return EXIT_OK


# ------------------------------------------------------------------------------ demo
def model_free_demo(image, outdir: Path, args, field=None, quiet: bool = False) -> Dict:
    """Upsample downsampled stain maps of the sample, guided by the image, scored against truth.

    Truth: the haematoxylin and DAB densities of the RGB histology image (colour
    deconvolution, skimage.color.rgb2hed), scaled to [0, 1], plus a soft "DAB-positive"
    probability map. They are area-averaged to the ViT patch grid (patch 14), then upsampled
    by nearest, bilinear, bicubic and GSJBU (kernels fitted on the RGB image); PSNR against
    the full-resolution truth.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F
    from skimage.color import rgb2hed

    from . import api
    from .core.io import save_png, side_by_side

    H, W = image.shape[:2]
    h, w = max(1, round(H / 14)), max(1, round(W / 14))
    hed = rgb2hed(image)
    maps = []
    for c in (0, 2):
        lo, hi = np.percentile(hed[..., c], [1, 99])
        maps.append(np.clip((hed[..., c] - lo) / (hi - lo), 0, 1))
    maps.append(1.0 / (1.0 + np.exp(-(maps[1] - 0.5) * 12.0)))
    truth = torch.from_numpy(np.stack(maps).astype(np.float32))
    lr = F.adaptive_avg_pool2d(truth[None], (h, w))[0]
    if field is None:
        bar = Bar("demo: fit", quiet)
        field = api.fit_kernels(image, (h, w), steps=args.steps, device=args.device, max_memory=_parse_memory(args.max_memory),
                                progress=bar, downsample=args.fit_downsample, guide_smoothing=args.guide_smoothing)
        bar.close()
    results = {
        "nearest": F.interpolate(lr[None], size=(H, W), mode="nearest")[0],
        "bilinear": F.interpolate(lr[None], size=(H, W), mode="bilinear", align_corners=False)[0],
        "bicubic": F.interpolate(lr[None], size=(H, W), mode="bicubic", align_corners=False)[0].clamp(0, 1),
        "gsjbu": torch.from_numpy(api.render(lr.numpy(), image, field, device=args.device, guide_smoothing=args.guide_smoothing)),
    }
    names = ["haematoxylin", "DAB", "DAB probability"]
    psnr = {}
    for method, up in results.items():
        mse = ((up - truth) ** 2).mean(dim=(1, 2))
        psnr[method] = {n: float(10 * torch.log10(1.0 / m)) for n, m in zip(names, mse)}
    gray = lambda t: np.repeat(t.numpy()[..., None], 3, -1)  # noqa: E731
    save_png(outdir / "model_free_dab.png", side_by_side(gray(truth[1]), gray(results["bilinear"][1]), gray(results["gsjbu"][1])))
    return {"lr_shape": [h, w], "hr_shape": [H, W], "maps": names, "psnr_db": psnr, "files": ["model_free_dab.png"]}, field


def cmd_demo(args) -> int:
    import skimage.data

    from .core.features import WeightsUnavailableError

    out = _output_dir(args.out)
    image = skimage.data.immunohistochemistry()
    print(f"demo: scikit-image's immunohistochemistry sample ({image.shape[0]}x{image.shape[1]} RGB) -> {out}")
    report: Dict = {"image": "skimage.data.immunohistochemistry", "image_shape": list(image.shape)}
    field = None
    try:
        rep = process_image(image, "immunohistochemistry", out, args, quiet=args.quiet)
        report["features"] = rep
        from .core.field import KernelField

        field = KernelField.load(out / "kernels.npz")
        print(f"features: {rep['backbone']} ({rep['weights_source']}), {rep['channels']} channels, "
              f"{rep['lr_shape'][0]}x{rep['lr_shape'][1]} -> {rep['hr_shape'][0]}x{rep['hr_shape'][1]}; pca.png, features_hr.npy written")
    except WeightsUnavailableError as exc:
        first = str(exc).strip().splitlines()[0]
        print(f"pretrained weights are not available here ({first}); running the model-free part of the demo "
              "(pass --weights FILE to run the feature part)")
        report["features"] = {"skipped": str(exc)}
    free, field = model_free_demo(image, out, args, field, quiet=args.quiet)
    report["model_free"] = free
    field.save(out / "kernels.npz")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    rows = [["map (PSNR dB)"] + list(free["psnr_db"])]
    for name in free["maps"]:
        rows.append([name] + [f"{free['psnr_db'][m][name]:.2f}" for m in free["psnr_db"]])
    print(_table(rows))
    print(f"outputs in {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))
    return EXIT_OK


# ------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="upsample-anything",
        description="Upsample Anything (GSJBU): fit per-pixel Gaussian kernels on an image by test-time "
        "optimisation and use them to upsample its DINOv2 features to full resolution.",
    )
    ap.add_argument("--traceback", action="store_true", help="show the Python traceback on errors (for bug reports)")
    sub = ap.add_subparsers(dest="command", required=True, metavar="{run,demo}")

    def common(p):
        p.add_argument("--backbone", default="dinov2_vits14",
                       help="feature backbone: dinov2_vits14 / vitb14 / vitl14 / vitg14, their _reg variants, or a timm ViT name (default: %(default)s)")
        p.add_argument("--layer", type=int, default=-1, help="transformer block whose patch tokens are used; negative counts from the end (default: %(default)s)")
        p.add_argument("--input-size", type=int, default=None, help="working resolution of the backbone: long side in pixels (default: the image's own size)")
        p.add_argument("--weights", default=None, help="local weights file (timm/torch state dict or the original DINOv2 .pth) instead of the Hugging Face cache")
        p.add_argument("--steps", type=int, default=51, help="kernel-fitting Adam steps (default: %(default)s, the published run)")
        p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
        p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                       help="dtype of the feature aggregation; auto = fp16 on CUDA, fp32 elsewhere (default: %(default)s)")
        p.add_argument("--max-memory", default=None, help="working-memory budget, e.g. 2GB or 512MiB (default: a safe fraction of free memory)")
        p.add_argument("--fit-downsample", default="bicubic", choices=["bicubic", "area"],
                       help="LR input of the kernel fit: bicubic (published) or area averages, closer to how a ViT token summarises its patch (default: %(default)s)")
        p.add_argument("--guide-smoothing", type=float, default=0.0,
                       help="Gaussian sigma in pixels applied to the image before fitting and rendering; helps with noisy images (default: %(default)s = off)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    run = sub.add_parser("run", help="process image files", description="Extract features, fit kernels, write HR features, PCA picture, kernels and a report per image.")
    run.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, TIFF, .npy)")
    run.add_argument("--out", required=True, help="output directory (one sub-directory per image)")
    common(run)
    run.add_argument("--pca-only", action="store_true", help="write only the PCA picture, kernels and report (skip the C x H x W features)")
    run.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="dtype of features_hr.npy (default: %(default)s)")
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="run the whole job on a bundled sample image",
                          description="Runs on scikit-image's immunohistochemistry sample. Without pretrained weights it says so and runs the model-free part.")
    demo.add_argument("--out", default="upa-demo", help="output directory (default: %(default)s)")
    common(demo)
    demo.set_defaults(func=cmd_demo, pca_only=False, dtype="float32")
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with 2 on bad usage
    try:
        if getattr(args, "steps", 1) < 0:
            raise UsageError(f"--steps {args.steps}: give a non-negative number")
        return args.func(args)
    except KeyboardInterrupt:
        print("upsample-anything: interrupted", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as exc:  # noqa: BLE001 - the one place that turns errors into exit codes
        from .core.errors import Cancelled, MemoryBudgetError

        if args.traceback:
            import traceback

            traceback.print_exc()
        usage = isinstance(exc, (UsageError, ValueError, TypeError, FileNotFoundError)) and not isinstance(exc, (MemoryBudgetError, Cancelled))
        kind = "usage error" if usage else "error"
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"upsample-anything: {kind}: {message}", file=sys.stderr)
        return EXIT_USAGE if usage else EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
