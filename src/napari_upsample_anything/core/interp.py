"""Separable interpolation taps that reproduce ``torch.nn.functional.interpolate``.

The engine never resizes a whole high-resolution image: it needs a few samples per LR cell
(the LR guide) or a band of rows (the dynamic radius map). These helpers give, for a list of
output indices along one axis, the input indices and weights that ``F.interpolate`` with
``align_corners=False`` uses, so any rectangle of the resized image can be computed exactly.
"""

from __future__ import annotations

import torch

_CUBIC_A = -0.75  # PyTorch's bicubic convolution constant


def _source_coords(out_idx: torch.Tensor, in_size: int, out_size: int) -> torch.Tensor:
    scale = in_size / out_size
    return (out_idx.to(torch.float64) + 0.5) * scale - 0.5


def linear_taps(out_idx: torch.Tensor, in_size: int, out_size: int):
    """Bilinear taps along one axis: returns ``(idx [n, 2] long, weight [n, 2] float64)``."""
    src = _source_coords(out_idx, in_size, out_size).clamp_min(0.0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    lam = (src - i0.to(torch.float64)).clamp(0.0, 1.0)
    return torch.stack([i0, i1], 1), torch.stack([1.0 - lam, lam], 1)


def cubic_taps(out_idx: torch.Tensor, in_size: int, out_size: int):
    """Bicubic taps along one axis: returns ``(idx [n, 4] long, weight [n, 4] float64)``."""
    src = _source_coords(out_idx, in_size, out_size)
    base = src.floor()
    t = src - base
    a = _CUBIC_A

    def conv1(x):
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def conv2(x):
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    w = torch.stack([conv2(t + 1), conv1(t), conv1(1 - t), conv2(2 - t)], 1)
    idx = torch.stack([base.long() + k for k in (-1, 0, 1, 2)], 1).clamp(0, in_size - 1)
    return idx, w


def resample(gather, taps_y, taps_x) -> torch.Tensor:
    """Apply separable taps: ``gather(rows, cols)`` returns a ``[G, len(rows), len(cols)]`` block.

    ``taps_y = (idx [ny, ty], weight [ny, ty])``, likewise ``taps_x``. Returns
    ``[G, ny, nx]`` float32, computed in float64 then rounded once (float32 on Apple MPS,
    which has no float64).
    """
    iy, wy = taps_y
    ix, wx = taps_x
    ny, ty = iy.shape
    nx, tx = ix.shape
    block = gather(iy.reshape(-1), ix.reshape(-1))
    block = block.to(_exact_dtype(block.device))
    g = block.shape[0]
    block = block.reshape(g, ny, ty, nx, tx)
    wy = wy.to(block.device, block.dtype)
    wx = wx.to(block.device, block.dtype)
    out = torch.einsum("gaybx,ay,bx->gab", block, wy, wx)
    return out.to(torch.float32)


def resample_blocks(src: torch.Tensor, taps_y, taps_x) -> torch.Tensor:
    """:func:`resample` of one 2-D map ``src [h, w]`` for a batch of blocks, each with its own taps.

    ``taps_y = (idx [k, ny, ty], weight [k, ny, ty])``, likewise ``taps_x``; returns
    ``[k, ny, nx]`` float32, with :func:`resample`'s arithmetic (float64, rounded once).
    """
    iy, wy = taps_y
    ix, wx = taps_x
    k, ny, ty = iy.shape
    nx, tx = ix.shape[1:]
    dev = src.device
    flat = (iy.reshape(k, ny * ty, 1) * src.shape[1] + ix.reshape(k, 1, nx * tx)).to(dev)
    dtype = _exact_dtype(dev)
    vals = src.reshape(-1)[flat].reshape(k, ny, ty, nx, tx).to(dtype)
    out = torch.einsum("kaybx,kay,kbx->kab", vals, wy.to(dev, dtype), wx.to(dev, dtype))
    return out.to(torch.float32)


def _exact_dtype(device: torch.device) -> torch.dtype:
    """float64 for the interpolation sums; float32 on Apple MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64
