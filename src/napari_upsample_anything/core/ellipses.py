"""Kernel geometry for pictures: one ellipse per LR cell.

A kernel is ``exp(-x'^2 / (2 sigma_x^2) - y'^2 / (2 sigma_y^2))`` with
``x' = dX cos(theta) + dY sin(theta)``, ``y' = -dX sin(theta) + dY cos(theta)`` and
``(dX, dY)`` the HR-pixel offset from the cell centre ``((i + 0.5) s_y - 0.5, (j + 0.5) s_x - 0.5)``.
Its ``n``-sigma ellipse is ``x'^2 / sigma_x^2 + y'^2 / sigma_y^2 = n^2``, whose points are
``dX = n (sigma_x cos(phi) cos(theta) - sigma_y sin(phi) sin(theta))``,
``dY = n (sigma_x cos(phi) sin(theta) + sigma_y sin(phi) cos(theta))``.

napari's Shapes layer slows down past a few thousand ellipses, so outlines are also given as
line segments for a Vectors layer (fast for hundreds of thousands) and can be rasterised.
Coordinates are (row, column) = (y, x), napari's order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from .field import KernelField


@dataclass
class Ellipses:
    """``N`` kernel ellipses in HR pixel coordinates (row-major over the LR grid)."""

    centres: np.ndarray  # [N, 2] (y, x)
    axis_x: np.ndarray  # [N] semi-axis along the kernel's x' direction (n * sigma_x), HR px
    axis_y: np.ndarray  # [N] semi-axis along y' (n * sigma_y), HR px
    theta: np.ndarray  # [N] radians
    sigma_r: np.ndarray  # [N]
    anisotropy: np.ndarray  # [N] max/min sigma
    cells: np.ndarray  # [N, 2] (i, j) LR cell of each ellipse

    def __len__(self) -> int:
        return int(self.centres.shape[0])

    def outline(self, segments: int = 24) -> np.ndarray:
        """Outline points ``[N, segments, 2]`` (y, x), the polygon of each ellipse."""
        phi = np.linspace(0.0, 2 * np.pi, segments, endpoint=False)
        cp, sp = np.cos(phi)[None, :], np.sin(phi)[None, :]
        ct, st = np.cos(self.theta)[:, None], np.sin(self.theta)[:, None]
        ax, ay = self.axis_x[:, None], self.axis_y[:, None]
        dX = ax * cp * ct - ay * sp * st
        dY = ax * cp * st + ay * sp * ct
        return np.stack([self.centres[:, None, 0] + dY, self.centres[:, None, 1] + dX], -1)

    def vectors(self, segments: int = 24) -> np.ndarray:
        """napari Vectors data ``[N * segments, 2, 2]``: (start point, displacement) per segment."""
        pts = self.outline(segments)
        nxt = np.roll(pts, -1, axis=1)
        return np.stack([pts, nxt - pts], axis=2).reshape(-1, 2, 2)

    def rasterize(self, hr_shape: Tuple[int, int], segments: int = 64, samples_per_segment: int = 4) -> np.ndarray:
        """(H, W) uint8 image with every outline drawn (255) for very many kernels."""
        H, W = hr_shape
        pts = self.outline(segments)
        nxt = np.roll(pts, -1, axis=1)
        t = np.linspace(0.0, 1.0, samples_per_segment, endpoint=False)[None, None, :, None]
        dense = (pts[:, :, None, :] * (1 - t) + nxt[:, :, None, :] * t).reshape(-1, 2)
        yx = np.rint(dense).astype(np.int64)
        ok = (yx[:, 0] >= 0) & (yx[:, 0] < H) & (yx[:, 1] >= 0) & (yx[:, 1] < W)
        img = np.zeros((H, W), np.uint8)
        img[yx[ok, 0], yx[ok, 1]] = 255
        return img

    def subset(self, index: np.ndarray) -> Ellipses:
        return Ellipses(
            *(getattr(self, f)[index] for f in ("centres", "axis_x", "axis_y", "theta", "sigma_r", "anisotropy", "cells"))
        )


def kernel_ellipses(
    field: KernelField, hr_shape: Tuple[int, int], n_sigma: float = 2.0, stride: int = 1, max_count: Optional[int] = None
) -> Ellipses:
    """Ellipses of a field's kernels at ``n_sigma`` standard deviations.

    ``stride`` keeps every ``stride``-th cell along both axes; ``max_count`` raises the
    stride until at most that many ellipses remain (for napari's Shapes layer).
    """
    if n_sigma <= 0:
        raise ValueError(f"n_sigma={n_sigma!r} must be positive")
    maps = field.numpy()
    h, w = field.shape
    H, W = hr_shape
    stride = max(1, int(stride))
    if max_count is not None:
        while ((h + stride - 1) // stride) * ((w + stride - 1) // stride) > max_count:
            stride += 1
    ii, jj = np.meshgrid(np.arange(0, h, stride), np.arange(0, w, stride), indexing="ij")
    ii, jj = ii.reshape(-1), jj.reshape(-1)
    cy = (ii + 0.5) * (H / h) - 0.5
    cx = (jj + 0.5) * (W / w) - 0.5
    sx, sy = maps["sigma_x"][ii, jj], maps["sigma_y"][ii, jj]
    return Ellipses(
        centres=np.stack([cy, cx], -1).astype(np.float64),
        axis_x=(n_sigma * sx).astype(np.float64),
        axis_y=(n_sigma * sy).astype(np.float64),
        theta=maps["theta"][ii, jj].astype(np.float64),
        sigma_r=maps["sigma_r"][ii, jj].astype(np.float64),
        anisotropy=(np.maximum(sx, sy) / np.minimum(sx, sy)).astype(np.float64),
        cells=np.stack([ii, jj], -1),
    )
