"""``upsample-anything demo``: the whole job on scikit-image's immunohistochemistry sample.

With a backbone it runs the feature part through the pipeline (as ``run`` does); with or
without one it runs the model-free evaluation (:func:`model_free_demo`): stain maps of the
sample, downsampled and upsampled again by nearest, bilinear, bicubic and GSJBU, scored
against the full-resolution truth.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

from .cli_options import _output_dir, _parse_memory, options_from_args
from .cli_printing import EXIT_OK, Bar, _table


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
        field = api.fit_kernels(
            image,
            (h, w),
            steps=args.steps,
            device=args.device,
            max_memory=_parse_memory(args.max_memory),
            progress=bar,
            downsample=args.fit_downsample,
            guide_smoothing=args.guide_smoothing,
        )
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


def replace_format(options, fmt: str):
    from dataclasses import replace

    return replace(options, format=fmt)


def cmd_demo(args) -> int:
    import skimage.data

    from .core.features import WeightsUnavailableError

    out = _output_dir(args.out)
    image = skimage.data.immunohistochemistry()
    print(f"demo: scikit-image's immunohistochemistry sample ({image.shape[0]}x{image.shape[1]} RGB) -> {out}")
    report: Dict = {"image": "skimage.data.immunohistochemistry", "image_shape": list(image.shape)}
    field = None
    options = options_from_args(args)
    try:
        from .cli_jobs import process_image
        from .pipeline import SourceRef

        ref = SourceRef(array=image, axes="yxs", name="immunohistochemistry")
        rep = process_image(ref, out / "features", replace_format(options, "npy"), name="immunohistochemistry", quiet=args.quiet)
        report["features"] = rep
        from .core.field import KernelField

        field = KernelField.load(out / "features" / "kernels.npz")
        print(
            f"features: {rep['backbone']} ({rep['weights_source']}), {rep['channels']} channels, "
            f"{rep['lr_shape'][0]}x{rep['lr_shape'][1]} -> {rep['hr_shape'][0]}x{rep['hr_shape'][1]}; features/pca.png, features/features_hr.npy written"
        )
    except WeightsUnavailableError as exc:
        first = str(exc).strip().splitlines()[0]
        print(
            f"pretrained weights are not available here ({first}); running the model-free part of the demo "
            "(pass --weights FILE to run the feature part)"
        )
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
