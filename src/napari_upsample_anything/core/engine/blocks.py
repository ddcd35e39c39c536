"""The block engine of render and fit: exact published formulas, block-structured, bounded memory.

:class:`BlockEngine` holds the geometry of one guide over one LR grid (blocks, tiles, per-pixel
and per-neighbour features, the tile plan for a memory budget) and renders one tile with the
kernel the backend choice picked (:mod:`.backends`). The tile loops are the front ends:
:mod:`..render` (render) and :mod:`..fit` (test-time fit).

Why it is fast and small
------------------------
All HR pixels of one *block* (the pixels whose centre LR cell is the same) share the same
``K`` candidate neighbours. For a block, the log-weight of pixel ``p`` and neighbour ``q`` is

    log w(p, q) = -(A_q dX^2 + 2 B_q dX dY + C_q dY^2) - rho_q ||I(p) - J(q)||^2

with ``dX = lx(p) - Dx(q)`` in coordinates local to the block's centre cell and ``J`` the
bilinear LR guide. The spatial part expands into a dot product of a per-pixel vector
``phi(p) = (lx^2, lx ly, ly^2, lx, ly, 1)`` and a per-neighbour vector ``psi(q)``: for a
whole tile it is one batched matrix product ``[blocks, P, 6] x [blocks, 6, K]``. The range
part is computed as a difference over the G guide channels, like the published code
(expanding it too would cancel catastrophically for fitted ``sigma_r`` near 0.003). Softmax
over neighbours, then one more batched product with the gathered neighbour values
``[blocks, K, C]`` gives the output. Nothing of size ``K * H * W * C`` exists; a tile of
blocks bounds everything else. docs/engine.md has the details and the measured errors.

Published quirks, reproduced by default (``RenderOptions``):

* ``border="repeat"``: near the border the clamped neighbour index repeats a border cell,
  and every copy counts. ``"unique"`` counts each LR cell once.
* ``radius_units="hr"``: the dynamic radius ``ceil(alpha * sigma)`` compares a sigma in HR
  pixels with offsets in LR cells (so it is almost always the full ``radius``).
  ``"lr"`` divides sigma by the scale first.

Only the disk ``dy^2 + dx^2 <= radius^2`` of the published ``(2 radius + 1)^2`` square can
ever be kept by the published mask, so the other offsets are not evaluated. No other offset
is skipped. The published bilinear fallback (used where the softmax denominator is below
1e-6) can never trigger: the centre cell is always kept and the running maximum makes the
denominator at least 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch

from ..errors import MemoryBudgetError
from ..field import KernelField, kernel_coefficients
from ..grid import BlockGrid
from ..guide import Guide
from ..interp import linear_taps, resample, resample_blocks
from ..memory import format_bytes
from . import compiled, native
from .eager import (
    CHUNK_OVERHEAD_BYTES,
    CPU_CHUNK_BYTES,
    Workspace,
    block_attention,
    gather_values,
    render_blocks,
    render_chunk_blocks,
)

Tile = Tuple[int, int, int, int]  # LR cells [i0, i1) x [j0, j1)


def tile_blocks(tile: Tile) -> int:
    """The number of blocks (LR cells) in ``tile``."""
    return (tile[1] - tile[0]) * (tile[3] - tile[2])


# Working-set size per CPU tile: large enough to amortise per-tile Python overhead (docs/engine.md,
# "Design measurements"), small enough to leave RAM alone.
CPU_PREFERRED_TILE_BYTES = 256 * 2**20
#: Renders of at least this many channels on a padded grid are written block by block (one
#: copy per LR cell: its Python cost is paid back by the data it moves; fewer channels keep
#: the tile-image route).
BLOCKWISE_WRITE_MIN_CHANNELS = 16


@dataclass(frozen=True)
class RenderOptions:
    """Method options shared by render and fit (defaults reproduce the published code)."""

    radius: int = 8
    alpha: float = 2.0
    border: str = "repeat"
    radius_units: str = "hr"

    def __post_init__(self) -> None:
        if not isinstance(self.radius, (int, np.integer)) or self.radius < 0:
            raise ValueError(f"radius={self.radius!r}: give a non-negative int (published: 8)")
        if not (self.alpha > 0):
            raise ValueError(f"alpha={self.alpha!r}: must be positive (published: 2)")
        if self.border not in ("repeat", "unique"):
            raise ValueError(f"border={self.border!r}: use 'repeat' (published) or 'unique'")
        if self.radius_units not in ("hr", "lr"):
            raise ValueError(f"radius_units={self.radius_units!r}: use 'hr' (published) or 'lr'")


def lr_guide(guide: Guide, lr_shape: Tuple[int, int], device: torch.device) -> torch.Tensor:
    """``I_lr``: the guide bilinearly resized to (h, w), align_corners=False, no antialias."""
    (H, W), (h, w) = guide.shape, lr_shape
    ty = linear_taps(torch.arange(h), H, h)
    tx = linear_taps(torch.arange(w), W, w)
    return resample(guide.gather_fn(device), ty, tx).to(device)


class BlockEngine:
    """Tiles, features and the per-tile render for one guide over one LR grid.

    Parameters
    ----------
    guide : Guide
        The normalised high-resolution guide, (H, W) with G channels.
    lr_shape : (h, w)
        LR grid of the kernel field and of every map rendered with it. ``h <= H``, ``w <= W``.
    options : RenderOptions
    device : torch.device
    """

    def __init__(self, guide: Guide, lr_shape: Tuple[int, int], options: RenderOptions, device: torch.device):
        self.guide = guide
        self.options = options
        self.device = device
        self.grid = BlockGrid.build(guide.shape, lr_shape, options.radius)
        self.lr_shape = (int(lr_shape[0]), int(lr_shape[1]))
        self.channels = guide.channels
        self.m = 7 + guide.channels
        self.guide_lr = lr_guide(guide, self.lr_shape, device)  # [G, h, w]
        rows, cols = self.grid.rows, self.grid.cols
        h, w = self.lr_shape
        H, W = guide.shape
        self._taps_y = linear_taps(rows.index.reshape(-1), h, H)
        self._taps_x = linear_taps(cols.index.reshape(-1), w, W)
        self._ly = rows.local.to(device)
        self._lx = cols.local.to(device)
        self._dy = self.grid.offsets.dy.to(device)
        self._dx = self.grid.offsets.dx.to(device)
        self._r2 = self.grid.offsets.r2.to(device)
        self.regular = rows.is_regular and cols.is_regular
        self.chunk_bytes = CPU_CHUNK_BYTES  # set by plan() from the budget

    # ------------------------------------------------------------------ geometry
    @property
    def K(self) -> int:
        return len(self.grid.offsets)

    @property
    def P(self) -> int:
        return self.grid.block_pixels

    def tile_hr_rows_cols(self, tile: Tile) -> Tuple[torch.Tensor, torch.Tensor]:
        i0, i1, j0, j1 = tile
        return self.grid.rows.index[i0:i1].reshape(-1), self.grid.cols.index[j0:j1].reshape(-1)

    def tile_valid(self, tile: Tile) -> torch.Tensor:
        """[B, P] bool: which padded block pixels are real HR pixels."""
        i0, i1, j0, j1 = tile
        vy = self.grid.rows.valid[i0:i1].to(self.device)
        vx = self.grid.cols.valid[j0:j1].to(self.device)
        v = vy[:, None, :, None] & vx[None, :, None, :]
        return v.reshape((i1 - i0) * (j1 - j0), self.P)

    def to_blocks(self, img: torch.Tensor, tile: Tile) -> torch.Tensor:
        """``[G, nr*Py, nc*Px]`` (padded tile rows/cols) -> ``[B, P, G]`` block layout."""
        i0, i1, j0, j1 = tile
        nr, nc = i1 - i0, j1 - j0
        py, px = self.grid.rows.pad, self.grid.cols.pad
        g = img.shape[0]
        return img.reshape(g, nr, py, nc, px).permute(1, 3, 2, 4, 0).reshape(nr * nc, py * px, g)

    def from_blocks(self, blocks: torch.Tensor, tile: Tile) -> torch.Tensor:
        """``[B, P, C]`` -> ``[C, rows, cols]`` with padding rows/columns dropped."""
        i0, i1, j0, j1 = tile
        nr, nc = i1 - i0, j1 - j0
        py, px = self.grid.rows.pad, self.grid.cols.pad
        c = blocks.shape[-1]
        img = blocks.reshape(nr, nc, py, px, c).permute(4, 0, 2, 1, 3).reshape(c, nr * py, nc * px)
        if not self.regular:
            vy = self.grid.rows.valid[i0:i1].reshape(-1).to(img.device)
            vx = self.grid.cols.valid[j0:j1].reshape(-1).to(img.device)
            img = img[:, vy][:, :, vx]
        return img

    # ------------------------------------------------------------------ features
    def guide_blocks(self, tile: Tile) -> torch.Tensor:
        """Normalised guide of the tile in block layout ``[B, P, G]``."""
        rows, cols = self.tile_hr_rows_cols(tile)
        return self.to_blocks(self.guide.gather(rows, cols, self.device), tile)

    def _local_coords(self, tile: Tile) -> Tuple[torch.Tensor, torch.Tensor]:
        """``lx, ly [B, P]``: each block pixel's offset from its block's LR cell centre (HR pixels)."""
        i0, i1, j0, j1 = tile
        nr, nc = i1 - i0, j1 - j0
        py, px = self.grid.rows.pad, self.grid.cols.pad
        ly = self._ly[i0:i1][:, None, :, None].expand(nr, nc, py, px).reshape(nr * nc, py * px)
        lx = self._lx[j0:j1][None, :, None, :].expand(nr, nc, py, px).reshape(nr * nc, py * px)
        return lx, ly

    def pixel_features(self, tile: Tile, guide_blocks: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``phi``: ``[B, P, 7 + G]`` = lx^2, lx*ly, ly^2, lx, ly, 1, ||I'||^2, I' (I' = I - J(centre))."""
        i0, i1, j0, j1 = tile
        nr, nc = i1 - i0, j1 - j0
        if guide_blocks is None:
            guide_blocks = self.guide_blocks(tile)
        jc = self.guide_lr[:, i0:i1, j0:j1].permute(1, 2, 0).reshape(nr * nc, 1, self.channels)
        ic = guide_blocks - jc
        lx, ly = self._local_coords(tile)
        cols = [lx * lx, lx * ly, ly * ly, lx, ly, torch.ones_like(lx), (ic * ic).sum(-1)]
        return torch.cat([torch.stack(cols, -1), ic], -1).contiguous()

    def pixel_features_channels_first(self, tile: Tile) -> Tuple[torch.Tensor, torch.Tensor]:
        """The native kernels' layout of :meth:`pixel_features`' columns, built directly:
        ``spatial [B, 6, P]`` (lx^2, lx*ly, ly^2, lx, ly, 1) and ``ic [B, G, P]`` (I - J(centre)),
        the same float32 values. Building ``[B, P, 7 + G]`` and transposing it was a third of a
        3-channel native render at 1024^2."""
        i0, i1, j0, j1 = tile
        nr, nc = i1 - i0, j1 - j0
        py, px = self.grid.rows.pad, self.grid.cols.pad
        g = self.channels
        rows, cols = self.tile_hr_rows_cols(tile)
        img = self.guide.gather(rows, cols, self.device)  # [G, nr * py, nc * px]
        blocks = img.reshape(g, nr, py, nc, px).permute(1, 3, 0, 2, 4).reshape(nr * nc, g, py * px)
        ic = blocks - self.guide_lr[:, i0:i1, j0:j1].permute(1, 2, 0).reshape(nr * nc, g, 1)
        lx, ly = self._local_coords(tile)
        spatial = torch.stack([lx * lx, lx * ly, ly * ly, lx, ly, torch.ones_like(lx)], 1)
        return spatial, ic

    def neighbours(self, tile: Tile, k: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Neighbour geometry of a tile for the first ``k`` offsets.

        Returns ``q [B, k]`` (flat LR index, clamped), ``Dy [B, k]``, ``Dx [B, k]`` (offset of
        the neighbour's centre from the block's centre cell, HR pixels) and, for
        ``border="unique"``, a ``[B, 1, k]`` mask of clamped (repeated) neighbours.
        """
        i0, i1, j0, j1 = tile
        h, w = self.lr_shape
        nr, nc = i1 - i0, j1 - j0
        dev = self.device
        ii = torch.arange(i0, i1, device=dev)
        jj = torch.arange(j0, j1, device=dev)
        qy_raw = ii[:, None] + self._dy[None, :k]
        qx_raw = jj[:, None] + self._dx[None, :k]
        qy = qy_raw.clamp(0, h - 1)
        qx = qx_raw.clamp(0, w - 1)
        q = (qy[:, None, :] * w + qx[None, :, :]).reshape(nr * nc, k)
        d_y = (qy - ii[:, None]).to(torch.float32) * float(self.grid.rows.scale)
        d_x = (qx - jj[:, None]).to(torch.float32) * float(self.grid.cols.scale)
        d_y = d_y[:, None, :].expand(nr, nc, k).reshape(nr * nc, k)
        d_x = d_x[None, :, :].expand(nr, nc, k).reshape(nr * nc, k)
        repeated = None
        if self.options.border == "unique":
            inside = (qy == qy_raw)[:, None, :] & (qx == qx_raw)[None, :, :]
            repeated = (~inside).reshape(nr * nc, 1, k)
        return q, d_y, d_x, repeated

    def neighbour_features(self, coef: torch.Tensor, tile: Tile, geometry):
        """Neighbour side of the log-weights for a tile.

        Returns ``psi [B, 6, k]`` (spatial quadratic form in local coordinates), ``rho [B, k]``
        and ``jd [B, k, G]`` (neighbour LR guide minus the block's own). ``coef`` is
        :func:`kernel_coefficients` ``[4, h, w]``; psi and rho are differentiable in it.
        """
        q, d_y, d_x, _ = geometry
        nb, k = q.shape
        A, B, C, rho = coef.reshape(4, -1)[:, q.reshape(-1)].reshape(4, nb, k)
        jd = self.neighbour_guide(tile, q)
        ax = A * d_x + B * d_y
        cy = B * d_x + C * d_y
        const = -(ax * d_x + cy * d_y)
        psi = torch.stack([-A, -2 * B, -C, 2 * ax, 2 * cy, const], 1)
        return psi, rho, jd

    def neighbour_guide(self, tile: Tile, q: torch.Tensor) -> torch.Tensor:
        """``jd [B, k, G]``: the neighbours' LR guide minus the block's own (guide-only: the fit
        prepares it once, without the coefficient side of :meth:`neighbour_features`)."""
        i0, i1, j0, j1 = tile
        nb, k = q.shape
        g = self.channels
        jq = self.guide_lr.reshape(g, -1)[:, q.reshape(-1)].reshape(g, nb, k)
        jc = self.guide_lr[:, i0:i1, j0:j1].reshape(g, nb, 1)
        return (jq - jc).permute(1, 2, 0).contiguous()

    def radius_sq(
        self, sigma_eff: torch.Tensor, tile: Tile, blocks: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.int64
    ) -> torch.Tensor:
        """Published dynamic radius squared per block pixel, ``[B, P]`` (int64, or ``dtype``).

        ``blocks`` (indices into the tile's row-major blocks): only those blocks' rows,
        ``[len(blocks), P]``; the stochastic fit computes the radius of its drawn blocks only
        (the full tile's bilinear resize is most of a step's fixed cost at small fractions).
        A whole tile on the CPU goes through the native kernel when it is built
        (:func:`.native.radius_sq_blocks`, the same integers in one pass, several times faster:
        docs/engine.md); otherwise, or for some blocks, through torch.
        """
        i0, i1, j0, j1 = tile
        py, px = self.grid.rows.pad, self.grid.cols.pad
        nb = (i1 - i0) * (j1 - j0) if blocks is None else int(blocks.numel())
        units = min(self.grid.rows.scale, self.grid.cols.scale) if self.options.radius_units == "lr" else 1.0
        # Bilinear values are convex combinations, so they are >= the smallest sigma: when
        # that one already gives the full radius (with a margin for rounding), skip the resize.
        if float(self.options.alpha) * float(sigma_eff.min()) / units >= self.options.radius - 1 + 1e-3:
            return torch.full((nb, py * px), self.options.radius**2, dtype=dtype, device=self.device)
        src = sigma_eff.detach()
        if self.options.radius_units == "lr":
            src = src / units
        if blocks is None:
            ty = tuple(t.reshape(self.lr_shape[0], py, -1)[i0:i1].reshape((i1 - i0) * py, -1) for t in self._taps_y)
            tx = tuple(t.reshape(self.lr_shape[1], px, -1)[j0:j1].reshape((j1 - j0) * px, -1) for t in self._taps_x)
            if self.device.type == "cpu" and src.device.type == "cpu":
                r2 = native.radius_sq_blocks(src, ty, tx, py, px, float(self.options.alpha), self.options.radius)
                if r2 is not None:
                    return r2.to(dtype)
            sig = resample(lambda r, c: src[None].index_select(1, r.to(src.device)).index_select(2, c.to(src.device)), ty, tx)
            sig = self.to_blocks(sig.to(self.device), tile)[..., 0]
        else:
            sig = self._block_sigma(src, tile, blocks.to("cpu"))
        r = torch.ceil(float(self.options.alpha) * sig).clamp_(1, self.options.radius)
        return (r * r).to(dtype)

    def _block_sigma(self, src: torch.Tensor, tile: Tile, blocks: torch.Tensor) -> torch.Tensor:
        """Bilinear ``src`` (LR map) at the pixels of some of a tile's blocks, ``[k, P]`` float32."""
        i0, _, j0, j1 = tile
        py, px = self.grid.rows.pad, self.grid.cols.pad
        bi, bj = i0 + blocks // (j1 - j0), j0 + blocks % (j1 - j0)
        taps_y = tuple(t.reshape(self.lr_shape[0], py, -1)[bi] for t in self._taps_y)  # [k, py, ty]
        taps_x = tuple(t.reshape(self.lr_shape[1], px, -1)[bj] for t in self._taps_x)  # [k, px, tx]
        return resample_blocks(src, taps_y, taps_x).reshape(len(blocks), py * px).to(self.device)

    def weights_mask(self, r2_pix: torch.Tensor, repeated: Optional[torch.Tensor], k: int):
        """Bool mask ``[B, P|1, k]`` of dropped (pixel, neighbour) pairs, or None if none is."""
        mask = None
        if int(r2_pix.min()) < int(self.grid.offsets.r2[k - 1]):
            mask = self._r2[None, None, :k] > r2_pix[:, :, None]
        if repeated is not None:
            mask = repeated if mask is None else (mask | repeated)
        return mask

    def tile_k(self, r2_pix: torch.Tensor) -> int:
        """Offsets needed by a tile: those inside the largest dynamic radius of its pixels."""
        return max(1, self.grid.offsets.count_within(int(r2_pix.max())))

    # ------------------------------------------------------------------ planning
    def bytes_per_block(self, channels: int, agg_bytes: int, training: bool) -> int:
        """Working bytes of one block in a tile (upper bound, all offsets).

        Log-weight temporaries live in cache-sized chunks (:data:`CHUNK_OVERHEAD_BYTES` per
        tile, see :func:`chunk_blocks`); per block there are the softmax weights when a backward
        needs them, the mask, gathered values (also transposed), outputs and features.
        """
        P, K, m, g = self.P, self.K, self.m, self.channels
        weights = P * K * 1  # mask
        if training:
            weights += P * K * 4  # softmax weights kept for the backward
        values = K * channels * (2 * agg_bytes + (4 if agg_bytes != 4 else 0))
        outputs = 3 * P * channels * 4
        feats = P * (m + 2 * g + 4) * 4 + 12 * m * K * 4 + 8 * K * 8
        return int(weights + values + outputs + feats)

    def tile_overhead(self) -> int:
        """Bytes every tile needs whatever its size: the four chunk temporaries (CPU)."""
        if self.device.type != "cpu":
            return 0
        return 4 * max(self.chunk_bytes, self.P * self.K * 4)

    def workspace(self) -> Workspace:
        return Workspace(self.device, self.chunk_bytes)

    def tile_block_bytes(self, per_block: int) -> int:
        """Per-block bytes of a tile: on GPUs the whole tile is one chunk, so its log-weight
        temporaries (four ``P x K`` float32 tensors) count per block."""
        return per_block + (4 * self.P * self.K * 4 if self.device.type != "cpu" else 0)

    def plan(self, per_block: int, budget: int, preferred: Optional[int] = None) -> List[Tile]:
        """Split the LR grid into tiles of whole blocks that fit ``budget`` bytes each.

        ``budget`` covers :meth:`tile_overhead` plus ``per_block`` bytes per block.
        """
        h, w = self.lr_shape
        per_block = self.tile_block_bytes(per_block)
        # Cache-sized chunks unless the budget is tight; then one block per chunk.
        self.chunk_bytes = CPU_CHUNK_BYTES if budget >= 8 * CHUNK_OVERHEAD_BYTES else 0
        room = budget - self.tile_overhead()
        if per_block > room:
            need = self.tile_overhead() + per_block
            raise MemoryBudgetError(
                f"max_memory={format_bytes(budget)} is too small: one LR cell ({self.P} HR pixels x "
                f"{self.K} neighbours) needs {format_bytes(need)}; raise max_memory to at least "
                f"{format_bytes(need * 2)} (or lower radius / the number of channels)"
            )
        n = room // per_block
        if preferred is not None:
            n = max(1, min(n, preferred // per_block))
        if n >= w:
            nr = min(h, n // w)
            return [(i, min(i + nr, h), 0, w) for i in range(0, h, nr)]
        return [(i, i + 1, j, min(j + n, w)) for i in range(h) for j in range(0, w, n)]

    # ------------------------------------------------------------------ render
    def write_blocks(self, out, blocks: torch.Tensor, tile: Tile) -> None:
        """Write a tile's ``[B, C, P]`` result into ``out`` ``(C, H, W)``.

        Regular grids with a float32 ``out`` (torch tensor or numpy array/memmap) take one
        copy straight into the final layout, reading contiguous runs of ``P_x`` pixels;
        otherwise the tile image is assembled first (padding dropped) and handed to ``_write``.
        """
        i0, i1, j0, j1 = tile
        nr, nc = i1 - i0, j1 - j0
        py, px = self.grid.rows.pad, self.grid.cols.pad
        c = blocks.shape[1]
        y0, y1, x0, x1 = self._hr_rect(tile)
        view = blocks.reshape(nr, nc, c, py, px).permute(2, 0, 3, 1, 4)  # [C, nr, py, nc, px]
        target = None
        if isinstance(out, torch.Tensor) and out.dtype == blocks.dtype:
            target = out
        elif isinstance(out, np.ndarray) and out.dtype == np.float32 and out.flags.writeable and blocks.device.type == "cpu":
            target = torch.from_numpy(out)
        if target is not None and self.regular:
            dest = target[:, y0:y1, x0:x1].unflatten(1, (nr, py)).unflatten(3, (nc, px))
            dest.copy_(view)
            return
        # on the CPU only: on a GPU each block's copy would be a kernel launch of its own
        cpu = blocks.device.type == "cpu" and target is not None and target.device.type == "cpu"
        if cpu and c >= BLOCKWISE_WRITE_MIN_CHANNELS:
            self._write_blockwise(target, blocks, tile)
            return
        img = view.reshape(c, nr * py, nc * px)
        if not self.regular:
            vy = self.grid.rows.valid[i0:i1].reshape(-1).to(img.device)
            vx = self.grid.cols.valid[j0:j1].reshape(-1).to(img.device)
            img = img[:, vy][:, :, vx]
        _write(out, img, (y0, y1, x0, x1))

    def tile_writer(self, out, tile: Tile, prepare=None):
        """A ``sink(b0, b1, blocks)`` for :meth:`render_tile` that writes the tile into ``out``
        ``(C, H, W)`` as its chunks arrive (``blocks [b1 - b0, C, P]``: blocks ``b0:b1`` of the
        tile, row-major): whole block rows in one :meth:`write_blocks`, the pieces of rows at
        either end as tiles of their own. (Staging the pieces of a row to write it whole was
        slower: at 2048^2, C = 384, 1.7-2.2 s against 1.4 s for the whole image's writes, the
        extra copy costing more than the shorter runs.) ``prepare(blocks)``: applied in place
        to each chunk first (the undo of a normalisation)."""
        i0, _, j0, j1 = tile
        nc = j1 - j0

        def sink(b0: int, b1: int, blocks: torch.Tensor) -> None:
            if prepare is not None:
                prepare(blocks)
            b = b0
            while b < b1:
                r, c = divmod(b, nc)
                if c == 0 and b1 - b >= nc:  # whole block rows
                    n = (b1 - b) // nc * nc
                    sub = (i0 + r, i0 + r + n // nc, j0, j1)
                else:
                    n = min(nc - c, b1 - b)
                    sub = (i0 + r, i0 + r + 1, j0 + c, j0 + c + n)
                self.write_blocks(out, blocks[b - b0 : b - b0 + n], sub)
                b += n

        return sink

    def _write_blockwise(self, target: torch.Tensor, blocks: torch.Tensor, tile: Tile) -> None:
        """:meth:`write_blocks` on a padded grid: each block's valid pixels (a prefix of its
        rows and of its columns) copied straight into place, one pass over the data (assembling
        the tile image and dropping the padding takes four: docs/engine.md)."""
        i0, i1, j0, j1 = tile
        rows, cols = self.grid.rows, self.grid.cols
        b5 = blocks.reshape(i1 - i0, j1 - j0, blocks.shape[1], rows.pad, cols.pad)
        y_start, y_count = rows.start[i0:i1].tolist(), rows.count[i0:i1].tolist()
        x_start, x_count = cols.start[j0:j1].tolist(), cols.count[j0:j1].tolist()
        for a, (ya, na) in enumerate(zip(y_start, y_count)):
            band = target[:, ya : ya + na]
            for b, (xb, nb) in enumerate(zip(x_start, x_count)):
                band[:, :, xb : xb + nb].copy_(b5[a, b, :, :na, :nb])

    def pixel_weights(self, field: KernelField, y: int, x: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Effective upsampling weights of HR pixel ``(y, x)`` over its LR neighbours.

        Returns ``(weights [k], cells [k])``: the softmax weights (they sum to one) and the
        flat LR index ``i * w + j`` of each neighbour. With ``border="repeat"`` a border cell
        can appear several times; :func:`pixel_weight_map` sums them. ``render`` at that
        pixel equals ``weights @ lr_map.reshape(C, -1)[:, cells].T``.
        """
        H, W = self.guide.shape
        if not (0 <= y < H and 0 <= x < W):
            raise ValueError(f"pixel ({y}, {x}) is outside the {H} x {W} guide")
        rows, cols = self.grid.rows, self.grid.cols
        i = int(torch.searchsorted(rows.start, torch.tensor(y), right=True)) - 1
        j = int(torch.searchsorted(cols.start, torch.tensor(x), right=True)) - 1
        tile = (i, i + 1, j, j + 1)
        p = (y - int(rows.start[i])) * cols.pad + (x - int(cols.start[j]))
        coef = kernel_coefficients(field).detach().to(self.device)
        sigma_eff = torch.maximum(field.sigma_x, field.sigma_y).detach().to(self.device)
        with torch.no_grad():
            r2_pix = self.radius_sq(sigma_eff, tile)
            k = self.tile_k(r2_pix)
            geometry = self.neighbours(tile, k)
            phi = self.pixel_features(tile)[:, p : p + 1]
            psi, rho, jd = self.neighbour_features(coef, tile, geometry)
            mask = self.weights_mask(r2_pix[:, p : p + 1], geometry[3], k)
            eye = torch.eye(k, device=self.device)[None]  # values = identity: out = the weights
            weights = block_attention(phi, psi, rho, jd, eye, mask)[0, 0]
        return weights.cpu(), geometry[0][0].cpu()

    def _hr_rect(self, tile: Tile) -> Tuple[int, int, int, int]:
        i0, i1, j0, j1 = tile
        y0, y1 = self.grid.rows.hr_range(i0, i1)
        x0, x1 = self.grid.cols.hr_range(j0, j1)
        return y0, y1, x0, x1

    def render_tile(self, values_flat, coef, sigma_eff, tile: Tile, agg_dtype, sink, workspace=None, weights_kernel=None) -> None:
        """Render one tile, handing its ``[n, C, P]`` results (channels first, see
        :func:`.eager.render_blocks`) to ``sink(b0, b1, out)`` chunk by chunk: blocks ``b0:b1`` of the
        tile in row-major order (:meth:`tile_writer` makes a sink that writes them). ``out`` may be a buffer
        reused for the next chunk: the sink must write or copy it before it returns.

        ``weights_kernel``: None (eager), ``"triton"``, a :class:`.compiled.RenderWeights` or a
        :class:`.native.RenderWeights` (made by :func:`..render.render_field` from the backend
        choice).
        """
        r2_pix = self.radius_sq(sigma_eff, tile)
        nb = tile_blocks(tile)
        if weights_kernel == "triton":
            sink(0, nb, self._render_tile_triton(values_flat, coef, r2_pix, tile, agg_dtype))
            return
        k = self.K if isinstance(weights_kernel, compiled.RenderWeights) else self.tile_k(r2_pix)
        geometry = self.neighbours(tile, k)
        q = geometry[0]
        psi, rho, jd = self.neighbour_features(coef, tile, geometry)
        workspace = workspace if workspace is not None else self.workspace()
        if isinstance(weights_kernel, native.RenderWeights):
            spatial, ic = self.pixel_features_channels_first(tile)
            channels = values_flat.shape[1]
            if weights_kernel.fuses_channels(channels, values_flat.dtype):  # few channels: no weights, no GEMM
                vals = gather_values(values_flat, q)
                sink(0, nb, weights_kernel.render(spatial, ic, psi, rho, jd, vals, r2_pix, geometry[3]))
                return
            cb = render_chunk_blocks(self.device, self.P, k, channels, nb, workspace.chunk_bytes)
            weights_fn = weights_kernel.bind(spatial, ic, psi, rho, jd, r2_pix, geometry[3], workspace, cb)
            # render_blocks reads only the shape of its first argument when given weights_fn
            render_blocks(
                spatial.transpose(1, 2), psi, rho, jd, (values_flat, q), None, agg_dtype, workspace, weights_fn, cb, sink=sink
            )
            return
        phi = self.pixel_features(tile)
        if weights_kernel is not None:
            weights_fn = weights_kernel.bind(phi, psi, rho, jd, r2_pix, geometry[3])
            render_blocks(
                phi, psi, rho, jd, (values_flat, q), None, agg_dtype, workspace, weights_fn, weights_kernel.cb, sink=sink
            )
            return
        mask = self.weights_mask(r2_pix, geometry[3], k)
        render_blocks(phi, psi, rho, jd, (values_flat, q), mask, agg_dtype, workspace, sink=sink)

    def _render_tile_triton(self, values_flat, coef, r2_pix, tile: Tile, agg_dtype) -> torch.Tensor:
        """:meth:`render_tile` through the Triton render kernel (no ``[B, K, C]`` gather)."""
        from . import triton_kernels

        k = self.tile_k(r2_pix)
        q, d_y, d_x, repeated = self.neighbours(tile, k)
        phi = self.pixel_features(tile)
        psi, rho, jd = self.neighbour_features(coef, tile, (q, d_y, d_x, repeated))
        g = self.channels
        return triton_kernels.render_blocks(
            phi[:, :, :6].transpose(1, 2), psi, rho, phi[:, :, 7 : 7 + g].transpose(1, 2), jd.transpose(1, 2), q,
            values_flat, r2_pix, self._r2, None if repeated is None else repeated[:, 0, :], agg_dtype,
        )  # fmt: skip


def _write(out, tile_img: torch.Tensor, rect: Tuple[int, int, int, int]) -> None:
    y0, y1, x0, x1 = rect
    if isinstance(out, torch.Tensor):
        out[:, y0:y1, x0:x1] = tile_img.to(device=out.device, dtype=out.dtype)
    else:
        out[:, y0:y1, x0:x1] = tile_img.to("cpu").numpy().astype(out.dtype, copy=False)
