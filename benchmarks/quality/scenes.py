"""Test images: scikit-image samples and synthetic scenes with known labels; guide noise.

Part of the quality benchmark; run it with ``python benchmarks/bench_quality.py`` (see there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np

from .config import CHANNEL_NAMES

# ======================================================================================
# data
# ======================================================================================
# Crop boxes (fractions top, bottom, left, right) before the aspect crop and resize.
_CROPS = {"retina": (0.18, 0.82, 0.18, 0.82)}


def _aspect_crop(img: np.ndarray, aspect: float) -> np.ndarray:
    """Largest centred crop with width / height = ``aspect``."""
    H, W = img.shape[:2]
    if W / H > aspect:
        w = int(round(H * aspect))
        x0 = (W - w) // 2
        return img[:, x0 : x0 + w]
    h = int(round(W / aspect))
    y0 = (H - h) // 2
    return img[y0 : y0 + h]


def load_real(name: str, size: Tuple[int, int]) -> np.ndarray:
    """A scikit-image sample image as float32 (H, W, G) in [0, 1], G = 3 or 1."""
    import skimage.data
    from skimage.transform import resize

    arr = getattr(skimage.data, name)()
    if name in _CROPS:
        t, b, l, r = _CROPS[name]
        H, W = arr.shape[:2]
        arr = arr[int(t * H) : int(b * H), int(l * W) : int(r * W)]
    arr = arr.astype(np.float32) / 255.0
    arr = _aspect_crop(arr, size[1] / size[0])
    out = resize(arr, size, order=1, anti_aliasing=True, preserve_range=True).astype(np.float32)
    if out.ndim == 2:
        out = out[:, :, None]
    return np.clip(out, 0.0, 1.0)


_PALETTE = np.array(
    [
        [0.80, 0.32, 0.25],
        [0.25, 0.50, 0.82],
        [0.36, 0.70, 0.34],
        [0.86, 0.76, 0.34],
        [0.78, 0.40, 0.30],  # close to class 0: the classes differ mostly by texture there
    ],
    np.float32,
)


def _class_textures(rng: np.random.Generator, H: int, W: int, n: int) -> np.ndarray:
    """``[n, H, W]`` zero-mean textures: oriented stripes plus smoothed noise, one per class."""
    from scipy.ndimage import gaussian_filter

    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    out = np.empty((n, H, W), np.float32)
    for c in range(n):
        ang = rng.uniform(0, np.pi)
        period = rng.uniform(4.0, 11.0)
        stripes = np.sin(2 * np.pi * (xx * np.cos(ang) + yy * np.sin(ang)) / period)
        noise = gaussian_filter(rng.normal(size=(H, W)).astype(np.float32), rng.uniform(0.8, 2.5))
        noise /= noise.std() + 1e-8
        out[c] = rng.uniform(0.3, 0.7) * stripes + 0.5 * noise
    return out


def _finish_scene(rng, ids: np.ndarray, id_class: np.ndarray, H: int, W: int, n_classes: int):
    from scipy.ndimage import gaussian_filter

    id_color = _PALETTE[id_class] + rng.normal(0.0, 0.05, (len(id_class), 3)).astype(np.float32)
    tex = _class_textures(rng, H, W, n_classes)
    labels = id_class[ids]
    amp = 0.07
    img = id_color[ids] + amp * np.take_along_axis(tex, labels[None], 0)[0][:, :, None]
    img = np.stack([gaussian_filter(img[:, :, g], 0.6) for g in range(3)], -1)  # optics
    return np.clip(img, 0.0, 1.0).astype(np.float32), labels.astype(np.int64)


def voronoi_scene(seed: int, size: Tuple[int, int], n_classes: int = 5):
    """Textured Voronoi cells; each cell carries one of ``n_classes`` labels."""
    rng = np.random.default_rng(1000 + seed)
    H, W = size
    n_cells = max(6, int(round(H * W / 1400)))  # cells of about 37 x 37 px
    seeds = rng.uniform((0, 0), (H, W), (n_cells, 2)).astype(np.float32)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    d = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
    ids = np.argmin(d, -1)
    id_class = rng.integers(0, n_classes, n_cells)
    return _finish_scene(rng, ids, id_class, H, W, n_classes)


def polygons_scene(seed: int, size: Tuple[int, int], n_classes: int = 5):
    """Random polygons (some thin and elongated) on a textured background (class 0)."""
    from skimage.draw import polygon

    rng = np.random.default_rng(2000 + seed)
    H, W = size
    n_poly = max(8, int(round(H * W / 2500)))
    ids = np.zeros((H, W), np.int64)
    id_class = [0]
    for i in range(n_poly):
        cy, cx = rng.uniform(0, H), rng.uniform(0, W)
        radius = rng.uniform(0.1, 0.3) * min(H, W)
        nv = int(rng.integers(3, 8))
        ang = np.sort(rng.uniform(0, 2 * np.pi, nv))
        rad = radius * rng.uniform(0.6, 1.0, nv)
        py, px = rad * np.sin(ang), rad * np.cos(ang)
        if rng.uniform() < 0.35:  # thin structure: squash one axis, then rotate
            py = py * rng.uniform(0.12, 0.3)
        rot = rng.uniform(0, np.pi)
        ry = py * np.cos(rot) + px * np.sin(rot) + cy
        rx = -py * np.sin(rot) + px * np.cos(rot) + cx
        rr, cc = polygon(ry, rx, shape=(H, W))
        ids[rr, cc] = i + 1
        id_class.append(int(rng.integers(1, n_classes)))
    return _finish_scene(rng, ids, np.array(id_class), H, W, n_classes)


@dataclass
class Scene:
    name: str
    image: np.ndarray  # (H, W, G) float32 [0, 1]
    labels: Optional[np.ndarray] = None  # (H, W) int64 for synthetic scenes
    n_classes: int = 0

    @property
    def kind(self) -> str:
        return "synthetic" if self.labels is not None else "real"

    @property
    def channels(self) -> int:
        return int(self.image.shape[2])


def load_scene(name: str, size: Tuple[int, int]) -> Scene:
    if name.startswith("voronoi-") or name.startswith("polygons-"):
        kind, seed = name.split("-")
        make = voronoi_scene if kind == "voronoi" else polygons_scene
        img, labels = make(int(seed), size)
        return Scene(name, img, labels, 5)
    return Scene(name, load_real(name, size))


def crop_scene(scene: Scene, size: Tuple[int, int]) -> Scene:
    H, W = size
    y0 = (scene.image.shape[0] - H) // 2
    x0 = (scene.image.shape[1] - W) // 2
    lab = None if scene.labels is None else scene.labels[y0 : y0 + H, x0 : x0 + W]
    return Scene(scene.name, np.ascontiguousarray(scene.image[y0 : y0 + H, x0 : x0 + W]), lab, scene.n_classes)


def add_noise(img: np.ndarray, sigma255: float, seed: int) -> np.ndarray:
    if sigma255 <= 0:
        return img
    rng = np.random.default_rng(seed)
    noisy = img + rng.normal(0.0, sigma255 / 255.0, img.shape).astype(np.float32)
    return np.clip(noisy, 0.0, 1.0).astype(np.float32)


def lr_shape_for(size: Tuple[int, int], scale: float) -> Tuple[int, int]:
    return max(1, int(round(size[0] / scale))), max(1, int(round(size[1] / scale)))


def guides_for(scene: Scene, noise: int) -> Dict[str, np.ndarray]:
    """The guides a scene's tasks use at one noise level: ``"all"`` channels (tasks 1, 3) and,
    for RGB scenes, ``"without-X"`` (task 2: the other two channels)."""
    guide = add_noise(scene.image, noise, seed=hash_seed(scene.name, noise))
    out = {"all": guide}
    if scene.channels == 3:
        c = held_out_channel(scene.name)
        out[f"without-{CHANNEL_NAMES[c]}"] = np.ascontiguousarray(guide[:, :, [g for g in range(3) if g != c]])
    return out


def hash_seed(name: str, noise: int) -> int:
    return (sum((i + 1) * ord(ch) for i, ch in enumerate(name)) * 131 + int(noise)) % (2**31)


def held_out_channel(name: str) -> int:
    """The channel task 2 holds out: fixed per image (R, G, B in turn over the image list)."""
    order = {
        "astronaut": 0, "coffee": 1, "chelsea": 2, "immunohistochemistry": 0, "retina": 1,
        "hubble_deep_field": 2, "voronoi-1": 0, "voronoi-2": 1, "polygons-1": 2, "polygons-2": 0,
    }  # fmt: skip
    return order.get(name, hash_seed(name, 0) % 3)
