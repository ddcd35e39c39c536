"""Geometry shared by render and fit: which HR pixels belong to which LR cell.

The published method gives every HR pixel a *centre cell* ``round((y + 0.5)/s - 0.5)``
(clamped). All HR pixels with the same centre cell share the same candidate neighbours,
so the engine works on *blocks*: one block per LR cell, holding that cell's HR pixels.
With an integer scale a block is an ``s x s`` square; with a non-integer or per-axis scale
blocks differ by at most one row/column, and are padded to the largest size (padding
pixels repeat the block's last row/column and are dropped from outputs and losses).

Offsets are the published ``(2 R + 1)^2`` square restricted to the disk ``dy^2 + dx^2 <= R^2``
(the dynamic radius mask never keeps anything outside that disk), sorted by ``dy^2 + dx^2``
so that a tile whose pixels all have a smaller dynamic radius can use a prefix of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def centre_cells(n_hr: int, n_lr: int) -> torch.Tensor:
    """Centre LR index of every HR index along one axis (published formula, float64)."""
    s = n_hr / n_lr
    u = (torch.arange(n_hr, dtype=torch.float64) + 0.5) / s - 0.5
    return torch.round(u).clamp(0, n_lr - 1).long()


@dataclass
class AxisBlocks:
    """Blocks along one axis: HR index table ``index [n_lr, pad]`` and ``valid [n_lr, pad]``."""

    n_hr: int
    n_lr: int
    scale: float
    start: torch.Tensor  # [n_lr] first HR index of each block
    count: torch.Tensor  # [n_lr] number of HR indices in each block
    pad: int  # largest block size
    index: torch.Tensor  # [n_lr, pad] HR index (padding repeats the last valid one)
    valid: torch.Tensor  # [n_lr, pad] bool
    local: torch.Tensor  # [n_lr, pad] float32: HR coordinate minus the LR cell's centre

    @classmethod
    def build(cls, n_hr: int, n_lr: int) -> AxisBlocks:
        cells = centre_cells(n_hr, n_lr)
        count = torch.bincount(cells, minlength=n_lr)
        if bool((count == 0).any()):  # cannot happen for n_hr >= n_lr; guard the invariant
            raise ValueError(f"internal error: empty block for {n_hr} -> {n_lr}")
        start = torch.cumsum(count, 0) - count
        pad = int(count.max())
        a = torch.arange(pad)
        index = start[:, None] + torch.minimum(a[None, :], count[:, None] - 1)
        valid = a[None, :] < count[:, None]
        scale = n_hr / n_lr
        centre = (torch.arange(n_lr, dtype=torch.float64) + 0.5) * scale - 0.5
        local = (index.to(torch.float64) - centre[:, None]).to(torch.float32)
        return cls(n_hr, n_lr, scale, start, count, pad, index, valid, local)

    @property
    def is_regular(self) -> bool:
        """All blocks have the same size (integer scale): no padding anywhere."""
        return bool((self.count == self.pad).all())

    def hr_range(self, i0: int, i1: int) -> tuple[int, int]:
        """HR index range [start, stop) covered by LR blocks [i0, i1)."""
        return int(self.start[i0]), int(self.start[i1 - 1] + self.count[i1 - 1])


@dataclass
class Offsets:
    """Neighbour offsets (dy, dx) in LR cells inside the disk of radius ``radius``."""

    radius: int
    dy: torch.Tensor  # [K] long
    dx: torch.Tensor  # [K] long
    r2: torch.Tensor  # [K] long, dy^2 + dx^2, non-decreasing

    @classmethod
    def build(cls, radius: int) -> Offsets:
        r = torch.arange(-radius, radius + 1)
        dy, dx = torch.meshgrid(r, r, indexing="ij")
        dy, dx = dy.reshape(-1), dx.reshape(-1)
        r2 = dy * dy + dx * dx
        keep = r2 <= radius * radius
        dy, dx, r2 = dy[keep], dx[keep], r2[keep]
        order = torch.argsort(r2 * (4 * radius * radius + 1) + (dy + radius) * (2 * radius + 1) + (dx + radius))
        return cls(radius, dy[order], dx[order], r2[order])

    def __len__(self) -> int:
        return int(self.dy.numel())

    def count_within(self, r2_max: int) -> int:
        """Number of leading offsets with ``dy^2 + dx^2 <= r2_max``."""
        return int(torch.searchsorted(self.r2, torch.tensor(int(r2_max)), right=True))


@dataclass
class BlockGrid:
    """The HR-to-LR geometry of one (H, W) image over an (h, w) LR grid."""

    rows: AxisBlocks
    cols: AxisBlocks
    offsets: Offsets

    @classmethod
    def build(cls, hr_shape: tuple[int, int], lr_shape: tuple[int, int], radius: int) -> BlockGrid:
        (H, W), (h, w) = hr_shape, lr_shape
        return cls(AxisBlocks.build(H, h), AxisBlocks.build(W, w), Offsets.build(radius))

    @property
    def hr_shape(self) -> tuple[int, int]:
        return self.rows.n_hr, self.cols.n_hr

    @property
    def lr_shape(self) -> tuple[int, int]:
        return self.rows.n_lr, self.cols.n_lr

    @property
    def block_pixels(self) -> int:
        return self.rows.pad * self.cols.pad
