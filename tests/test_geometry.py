"""Block geometry and exact interpolation taps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from napari_upsample_anything.core.grid import AxisBlocks, Offsets, centre_cells
from napari_upsample_anything.core.interp import cubic_taps, linear_taps, resample


@pytest.mark.parametrize("n_hr,n_lr", [(224, 16), (100, 7), (37, 5), (5, 5), (1000, 71), (61, 9)])
def test_blocks_cover_every_hr_index_once_in_order(n_hr, n_lr):
    ax = AxisBlocks.build(n_hr, n_lr)
    flat = ax.index[ax.valid]
    assert torch.equal(flat, torch.arange(n_hr))
    assert int(ax.count.sum()) == n_hr and int(ax.count.min()) >= 1
    assert torch.equal(centre_cells(n_hr, n_lr)[flat], torch.repeat_interleave(torch.arange(n_lr), ax.count))
    assert ax.is_regular == (n_hr % n_lr == 0)
    # local coordinates: HR index minus the centre of its LR cell
    s = n_hr / n_lr
    i = torch.arange(n_lr)[:, None].double()
    assert torch.allclose(ax.local.double(), ax.index.double() - ((i + 0.5) * s - 0.5), atol=1e-4)


def test_offsets_are_the_published_disk_sorted_by_radius():
    off = Offsets.build(8)
    assert len(off) == 197  # the (2*8+1)^2 = 289 square restricted to dy^2 + dx^2 <= 64
    assert bool((off.r2[1:] >= off.r2[:-1]).all())
    assert off.count_within(0) == 1 and off.count_within(1) == 5 and off.count_within(64) == 197
    pairs = set(zip(off.dy.tolist(), off.dx.tolist()))
    assert (8, 0) in pairs and (6, 6) not in pairs and len(pairs) == 197


@pytest.mark.parametrize(
    "size_in,size_out", [((16, 16), (224, 224)), ((7, 5), (50, 37)), ((224, 224), (16, 16)), ((50, 61), (6, 9))]
)
def test_linear_taps_reproduce_interpolate(size_in, size_out):
    img = torch.rand(2, *size_in, generator=torch.Generator().manual_seed(0))
    ref = F.interpolate(img[None], size=size_out, mode="bilinear", align_corners=False)[0]
    ty = linear_taps(torch.arange(size_out[0]), size_in[0], size_out[0])
    tx = linear_taps(torch.arange(size_out[1]), size_in[1], size_out[1])
    got = resample(lambda r, c: img[:, r][:, :, c], ty, tx)
    assert torch.allclose(got, ref, atol=1e-6)


@pytest.mark.parametrize(
    "size_in,size_out", [((224, 224), (16, 16)), ((112, 112), (8, 8)), ((50, 61), (6, 9)), ((16, 16), (40, 40))]
)
def test_cubic_taps_reproduce_interpolate(size_in, size_out):
    img = torch.rand(3, *size_in, generator=torch.Generator().manual_seed(1))
    ref = F.interpolate(img[None], size=size_out, mode="bicubic", align_corners=False)[0]
    ty = cubic_taps(torch.arange(size_out[0]), size_in[0], size_out[0])
    tx = cubic_taps(torch.arange(size_out[1]), size_in[1], size_out[1])
    got = resample(lambda r, c: img[:, r][:, :, c], ty, tx)
    assert torch.allclose(got, ref, atol=1e-5)
