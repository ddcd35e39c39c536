"""Layer data for the kernel views: ellipses, parameter maps, effective weights (no Qt).

Drawing styles (napari's Shapes layer slows down past a few thousand ellipses):

* ``"vectors"`` -- every kernel's outline as line segments of one Vectors layer (fast for
  hundreds of thousands of segments); each segment carries its kernel's ``sigma_r``,
  ``anisotropy``, ``sigma_x``, ``sigma_y``, ``theta`` and LR cell as features;
* ``"shapes"`` -- a subsample (at most :data:`MAX_SHAPES` kernels, on a regular stride) as
  selectable Shapes polygons;
* ``"raster"`` -- the outlines drawn into an HR image whose pixels hold the colour value.

Coordinates are HR-pixel data coordinates of the result frame (see :mod:`._frame`), with
the leading (slice / channel) axes first, so the layers share the HR layers' transform.

Outlines are clipped to the image (``[-1/2, H - 1/2] x [-1/2, W - 1/2]``): a kernel only
weighs pixels of the image, and fitted kernels are often wider than the border margin, which
would otherwise make napari's "reset view" zoom out far beyond the image.
"""

from __future__ import annotations

import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ._frame import Frame, Index
from ._pipeline import PlaneResult

STYLES = ("vectors", "shapes", "raster")
COLOR_BY = ("sigma_r", "anisotropy", "sigma_x", "sigma_y", "theta")
PARAMETER_MAPS = ("sigma_x", "sigma_y", "theta", "sigma_r", "anisotropy")
MAX_SHAPES = 2000
#: Total kernels drawn as vectors before a stride is applied (over all planes).
MAX_VECTOR_KERNELS = 200_000


def ellipses_of(plane: PlaneResult, n_sigma: float = 2.0, stride: int = 1, max_count: Optional[int] = None):
    """:class:`~..core.ellipses.Ellipses` of one plane's kernels."""
    from ..core.ellipses import kernel_ellipses

    return kernel_ellipses(plane.field, plane.hr_shape, n_sigma=n_sigma, stride=stride, max_count=max_count)


def _features(ell, repeat: int, n_sigma: float) -> Dict[str, np.ndarray]:
    """Per-kernel values (repeated per segment): sigmas in HR pixels, theta in radians."""
    feats = {
        "sigma_r": ell.sigma_r,
        "anisotropy": ell.anisotropy,
        "sigma_x": ell.axis_x / n_sigma,
        "sigma_y": ell.axis_y / n_sigma,
        "theta": ell.theta,
        "cell_i": ell.cells[:, 0].astype(np.int64),
        "cell_j": ell.cells[:, 1].astype(np.int64),
    }
    return {k: np.repeat(v, repeat) for k, v in feats.items()}


def lift(points: np.ndarray, lead: Sequence[int]) -> np.ndarray:
    """Prepend leading-axis coordinates to ``[..., 2]`` (y, x) points."""
    if not len(lead):
        return points
    pre = np.broadcast_to(np.asarray(lead, dtype=points.dtype), points.shape[:-1] + (len(lead),))
    return np.concatenate([pre, points], axis=-1)


def color_limits(values: np.ndarray) -> Tuple[float, float]:
    """1st..99th percentile range (never empty) for a colour scale robust to outliers."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (0.0, 1.0)
    lo, hi = np.percentile(v, [1, 99])
    if not hi > lo:
        lo, hi = float(v.min()), float(v.max())
        if not hi > lo:
            hi = lo + 1e-6
    return (float(lo), float(hi))


def kernel_stride(planes: Sequence[PlaneResult], limit: int) -> int:
    """Smallest stride keeping the number of drawn kernels over all planes under ``limit``."""
    total = sum(p.lr_shape[0] * p.lr_shape[1] for p in planes)
    stride = 1
    while total / (stride * stride) > limit:
        stride += 1
    return stride


def clip_segments(vec: np.ndarray, hr_shape: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """Clip ``[N, 2, 2]`` (start, displacement) segments to the image; returns them and the kept mask.

    Segments with both ends outside the image are dropped; the others have their ends
    clamped to the image rectangle.
    """
    H, W = hr_shape
    lo = np.array([-0.5, -0.5])
    hi = np.array([H - 0.5, W - 0.5])
    p0 = vec[:, 0, :]
    p1 = p0 + vec[:, 1, :]
    inside0 = np.all((p0 >= lo) & (p0 <= hi), axis=1)
    inside1 = np.all((p1 >= lo) & (p1 <= hi), axis=1)
    keep = inside0 | inside1
    q0 = np.clip(p0[keep], lo, hi)
    q1 = np.clip(p1[keep], lo, hi)
    return np.stack([q0, q1 - q0], axis=1), keep


def clip_points(points: np.ndarray, hr_shape: Tuple[int, int]) -> np.ndarray:
    """Clamp ``[..., 2]`` (y, x) outline points to the image rectangle."""
    H, W = hr_shape
    return np.clip(points, [-0.5, -0.5], [H - 0.5, W - 0.5])


def vectors_data(
    frame: Frame,
    planes: Sequence[Tuple[PlaneResult, Tuple[int, ...]]],
    *,
    n_sigma: float = 2.0,
    stride: int = 1,
    segments: int = 24,
) -> Tuple[np.ndarray, Dict[str, np.ndarray], int]:
    """Vectors data ``[N * segments, 2, ndim]``, per-segment features, and the kernel count.

    ``planes`` pairs each plane with its leading-axis position in the result array.
    """
    datas, feats, count = [], [], 0
    for plane, lead in planes:
        ell = ellipses_of(plane, n_sigma, stride)
        vec, keep = clip_segments(ell.vectors(segments), plane.hr_shape)  # [n, 2, 2]: start, displacement
        pos = lift(vec[:, 0, :], lead)
        disp = lift(vec[:, 1, :], [0] * len(lead))
        datas.append(np.stack([pos, disp], axis=1))
        feats.append({k: v[keep] for k, v in _features(ell, segments, n_sigma).items()})
        count += len(ell)
    data = np.concatenate(datas, axis=0) if datas else np.zeros((0, 2, frame.ndim))
    features = {k: np.concatenate([f[k] for f in feats]) for k in feats[0]} if feats else {}
    return data, features, count


def shapes_data(
    frame: Frame,
    planes: Sequence[Tuple[PlaneResult, Tuple[int, ...]]],
    *,
    n_sigma: float = 2.0,
    max_count: int = MAX_SHAPES,
    segments: int = 24,
) -> Tuple[List[np.ndarray], Dict[str, np.ndarray]]:
    """Polygons (one ``[segments, ndim]`` array per kernel) of a subsample, and their features."""
    per_plane = max(1, max_count // max(1, len(planes)))
    polys: List[np.ndarray] = []
    feats = []
    for plane, lead in planes:
        ell = ellipses_of(plane, n_sigma, 1, per_plane)
        pts = clip_points(ell.outline(segments), plane.hr_shape)
        polys.extend(lift(pts, lead))
        feats.append(_features(ell, 1, n_sigma))
    features = {k: np.concatenate([f[k] for f in feats]) for k in feats[0]} if feats else {}
    return polys, features


def raster_plane(plane: PlaneResult, color_by: str, n_sigma: float = 2.0, stride: int = 1, segments: int = 64) -> np.ndarray:
    """``(H, W)`` float32 image: 0 off the outlines, the kernel's ``color_by`` value on them."""
    ell = ellipses_of(plane, n_sigma, stride)
    H, W = plane.hr_shape
    values = _features(ell, 1, n_sigma)[color_by].astype(np.float32)
    pts = ell.outline(segments)
    nxt = np.roll(pts, -1, axis=1)
    t = np.linspace(0.0, 1.0, 4, endpoint=False)[None, None, :, None]
    dense = pts[:, :, None, :] * (1 - t) + nxt[:, :, None, :] * t  # [N, seg, 4, 2]
    yx = np.rint(dense.reshape(len(ell), -1, 2)).astype(np.int64)
    vals = np.broadcast_to(values[:, None], yx.shape[:2]).reshape(-1)
    yx = yx.reshape(-1, 2)
    ok = (yx[:, 0] >= 0) & (yx[:, 0] < H) & (yx[:, 1] >= 0) & (yx[:, 1] < W)
    img = np.zeros((H, W), np.float32)
    img[yx[ok, 0], yx[ok, 1]] = vals[ok]
    return img


def parameter_map(plane: PlaneResult, name: str) -> np.ndarray:
    """``(h, w)`` float32 map of one kernel parameter (``anisotropy`` = max/min sigma)."""
    maps = plane.field.numpy()
    if name == "anisotropy":
        sx, sy = maps["sigma_x"], maps["sigma_y"]
        return (np.maximum(sx, sy) / np.minimum(sx, sy)).astype(np.float32)
    if name not in maps:
        raise ValueError(f"unknown kernel parameter {name!r}; use one of {PARAMETER_MAPS}")
    return maps[name]


# ---------------------------------------------------------------------------------- weights
_ENGINE: Dict[str, object] = {}  # the last (plane, engine) pair: the engine holds per-guide tables


def pixel_weights(plane: PlaneResult, y: int, x: int) -> np.ndarray:
    """``(h, w)`` effective upsampling weights of HR pixel ``(y, x)`` over the LR grid (sum 1).

    ``render(lr_map)[:, y, x] == (lr_map * weights).sum((1, 2))`` for any LR map.
    """
    import torch

    from ..api import fitted_guide, render_options
    from ..core.engine.blocks import BlockEngine
    from ..core.render import pixel_weight_map

    ref = _ENGINE.get("plane")
    if ref is None or ref() is not plane:
        _ENGINE.clear()
        # The guide and options the kernels were fitted with (guide_from_image: channels-last).
        guide = fitted_guide(plane.field, plane.guide, channel_axis=-1 if plane.guide.ndim == 3 else None)
        _ENGINE["engine"] = BlockEngine(guide, plane.lr_shape, render_options(plane.field), torch.device("cpu"))
        _ENGINE["plane"] = weakref.ref(plane)
    return pixel_weight_map(_ENGINE["engine"], plane.field, int(y), int(x))


def clear_engine_cache() -> None:
    _ENGINE.clear()


def contributing_cells(weights: np.ndarray, mass: float = 0.99, max_cells: int = 400) -> np.ndarray:
    """``[k, 2]`` (i, j) cells carrying ``mass`` of the total weight, heaviest first."""
    flat = weights.reshape(-1)
    order = np.argsort(flat)[::-1]
    csum = np.cumsum(flat[order])
    total = csum[-1] if csum.size else 0.0
    if total <= 0:
        return np.zeros((0, 2), np.int64)
    k = int(np.searchsorted(csum, mass * total) + 1)
    k = max(1, min(k, max_cells, int((flat > 0).sum())))
    idx = order[:k]
    w = weights.shape[1]
    return np.stack([idx // w, idx % w], axis=1)


def cell_outlines(plane: PlaneResult, cells: np.ndarray, n_sigma: float = 2.0, segments: int = 32) -> np.ndarray:
    """``[k, segments, 2]`` HR outlines (clamped to the image) of the kernels of the given LR cells.

    Clamping makes vertices collapse and double back at the image edge: fine for a raster or
    a table, but not a valid polygon to triangulate (use :func:`cell_segments` to draw them).
    """
    ell = ellipses_of(plane, n_sigma)
    w = plane.lr_shape[1]
    flat = cells[:, 0] * w + cells[:, 1]
    return clip_points(ell.subset(flat).outline(segments), plane.hr_shape)


def cell_segments(
    plane: PlaneResult, cells: np.ndarray, n_sigma: float = 2.0, segments: int = 32
) -> Tuple[np.ndarray, np.ndarray]:
    """Outlines of the kernels of the given LR cells as Vectors segments, clipped to the image.

    Returns ``[n, 2, 2]`` (start, displacement) segments and, per segment, the row of ``cells``
    it belongs to. Segments need no triangulation, so a kernel cut by the image edge (or lying
    mostly outside it) draws as well as any other.
    """
    ell = ellipses_of(plane, n_sigma)
    w = plane.lr_shape[1]
    flat = cells[:, 0] * w + cells[:, 1]
    vec, keep = clip_segments(ell.subset(flat).vectors(segments), plane.hr_shape)
    owner = np.repeat(np.arange(len(cells)), segments)[keep]
    return vec, owner


def plane_positions(
    frame: Frame, planes: Sequence[PlaneResult], at: Optional[Index] = None
) -> List[Tuple[PlaneResult, Tuple[int, ...]]]:
    """Pair planes with their leading-axis position inside the result arrays."""
    return [(p, frame.position(p.index, at)) for p in planes]
