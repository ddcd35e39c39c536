"""Reading images and writing pictures (numpy / scikit-image only, no GUI)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as a numpy array.

    ``.npy`` files are loaded memory-mapped; TIFF through tifffile when installed; other
    formats (PNG, JPEG, BMP ...) through scikit-image / imageio. Raises FileNotFoundError or
    ValueError with the path in the message.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"image file not found: {p}")
    if p.is_dir():
        raise ValueError(f"{p} is a directory; give image files")
    suffix = p.suffix.lower()
    try:
        if suffix == ".npy":
            return np.load(p, mmap_mode="r")
        if suffix in (".tif", ".tiff"):
            try:
                import tifffile

                return tifffile.imread(p)
            except ImportError:
                pass
        import skimage.io

        return skimage.io.imread(p)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {p} as an image ({exc})") from exc


def guide_from_image(image, channel_axis: Optional[int] = None) -> np.ndarray:
    """The channels-last (H, W[, G]) guide for an image in any of the layouts
    :func:`~.features.extract_features` accepts (same channel-axis rule; RGBA loses alpha)."""
    from .feature_geometry import _channels_last, _to_numpy

    arr, axis, guessed = _channels_last(_to_numpy(image), channel_axis)
    if arr.ndim == 3 and arr.shape[2] == 4 and guessed and axis == 2:
        arr = arr[:, :, :3]
    return arr


def save_png(path: str | Path, rgb: np.ndarray) -> Path:
    """Write an (H, W, 3) float image in [0, 1] (or uint8) as PNG."""
    import skimage.io

    arr = np.asarray(rgb)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    path = Path(path)
    skimage.io.imsave(path, arr, check_contrast=False)
    return path


def side_by_side(*images: np.ndarray, gap: int = 8) -> np.ndarray:
    """Concatenate (H, W, 3) float images horizontally with a white gap (heights must match)."""
    h = images[0].shape[0]
    parts = []
    for i, im in enumerate(images):
        if im.shape[0] != h:
            raise ValueError("side_by_side needs images of equal height")
        if i:
            parts.append(np.ones((h, gap, 3), np.float32))
        parts.append(np.asarray(im, np.float32))
    return np.concatenate(parts, axis=1)


def nearest_resize(img: np.ndarray, shape) -> np.ndarray:
    """Nearest-neighbour resize of (h, w, ...) to (H, W, ...) with the engine's cell rule."""
    h, w = img.shape[:2]
    H, W = shape
    ys = np.minimum(((np.arange(H) + 0.5) * h / H).astype(int), h - 1)
    xs = np.minimum(((np.arange(W) + 0.5) * w / W).astype(int), w - 1)
    return img[ys][:, xs]
