"""The worked example of docs/microscopy.md, end to end, and its screenshot.

    xvfb-run -a python docs/make_microscopy_figure.py [--weights FILE] [--work DIR]

1. writes a small synthetic fluorescence stack as OME-TIFF (Z x Y x X = 4 x 224 x 224,
   0.2 um pixels, 1 um z-steps),
2. runs ``upsample-anything run`` on it (OME-Zarr outputs), in this process,
3. opens the HR PCA (``pca.ome.zarr``, lazily, with its pyramid) and the stack in napari
   with the physical pixel sizes, and saves ``docs/img/microscopy_pca.png``.

Without ``--weights`` the backbone has random weights (this machine cannot download DINOv2),
so the PCA colours show the pipeline and the kernels' edges, not semantic parts.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def synthetic_stack(n_z=4, size=224, seed=0) -> np.ndarray:
    """Blurred random blobs ("nuclei") drifting through z, uint16."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    centres = rng.uniform(20, size - 20, (14, 2))
    radii = rng.uniform(8, 20, 14)
    planes = []
    for z in range(n_z):
        img = np.zeros((size, size))
        for (cy, cx), r in zip(centres + z * 3.0, radii * (1 - 0.08 * z)):
            img += ((yy - cy) ** 2 + (xx - cx) ** 2 < r**2) * rng.uniform(0.5, 1.0)
        img = ndimage.gaussian_filter(img, 2.0) + 0.05 * rng.random((size, size))
        planes.append(img)
    stack = np.stack(planes)
    return (stack / stack.max() * 4000).astype(np.uint16)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default=None, help="a DINOv2 ViT-S/14 weights file (default: random weights, written here)")
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default=str(HERE / "img" / "microscopy_pca.png"))
    args = ap.parse_args()
    import tifffile
    import torch

    work = Path(args.work or tempfile.mkdtemp(prefix="upa-microscopy-"))
    work.mkdir(parents=True, exist_ok=True)
    stack_path = work / "nuclei.ome.tif"
    tifffile.imwrite(
        stack_path,
        synthetic_stack(),
        ome=True,
        metadata={"axes": "ZYX", "PhysicalSizeX": 0.2, "PhysicalSizeY": 0.2, "PhysicalSizeZ": 1.0},
    )
    weights = args.weights
    if weights is None:
        import timm

        torch.manual_seed(0)
        weights = str(work / "vits14_random.pth")
        torch.save(
            timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=False, dynamic_img_size=True).state_dict(), weights
        )

    from napari_upsample_anything import cli

    code = cli.main(
        ["run", str(stack_path), "--out", str(work / "out"), "--weights", weights, "--steps", "51", "--device", "cpu", "--quiet"]
    )
    assert code == 0, code

    import napari

    from napari_upsample_anything.omezarr import layer_data
    from napari_upsample_anything.sources import open_image

    src = open_image(stack_path)
    viewer = napari.Viewer(show=True)
    viewer.add_image(
        src.data[0, 0],
        name="nuclei (OME-TIFF)",
        scale=(src.pixel_sizes["z"], src.pixel_sizes["y"], src.pixel_sizes["x"]),
        colormap="gray",
        contrast_limits=(0, 4000),
    )
    levels, kw = layer_data(work / "out" / "nuclei" / "pca.ome.zarr")
    layers = viewer.add_image(levels, **kw)
    for layer in layers:
        layer.translate = (0.0, 0.0, src.plane_shape[1] * src.pixel_sizes["x"] * 1.05)  # side by side
    viewer.dims.set_point(0, 2 * src.pixel_sizes["z"])
    viewer.reset_view()
    viewer.scale_bar.visible = True
    viewer.scale_bar.unit = "um"
    shot = viewer.screenshot(canvas_only=False, flash=False)
    import skimage.io

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    skimage.io.imsave(args.out, shot, check_contrast=False)
    print(f"wrote {args.out} ({shot.shape[1]}x{shot.shape[0]}); outputs in {work / 'out'}")
    viewer.close()


if __name__ == "__main__":
    main()
