"""Kernel geometry for pictures and per-pixel effective weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_field

from napari_upsample_anything.core.ellipses import kernel_ellipses
from napari_upsample_anything.core.engine.blocks import BlockEngine, RenderOptions
from napari_upsample_anything.core.field import KernelField, kernel_coefficients
from napari_upsample_anything.core.guide import Guide
from napari_upsample_anything.core.render import pixel_weight_map, render_field


def test_outline_points_lie_on_the_n_sigma_ellipse(gen):
    field = random_field(4, 5, gen, sigma=(1.0, 20.0))
    ell = kernel_ellipses(field, (56, 70), n_sigma=2.0)
    assert len(ell) == 20
    pts = ell.outline(16)  # [N, 16, 2] (y, x)
    A, B, C, _ = (c.reshape(-1).double().numpy()[:, None] for c in kernel_coefficients(field))
    dY = pts[..., 0] - ell.centres[:, None, 0]
    dX = pts[..., 1] - ell.centres[:, None, 1]
    # A dX^2 + 2 B dX dY + C dY^2 = x'^2/(2 sx^2) + y'^2/(2 sy^2) = n^2 / 2 on the outline
    q = A * dX**2 + 2 * B * dX * dY + C * dY**2
    assert np.allclose(q, 2.0, rtol=1e-4)
    assert np.allclose(ell.centres[0], [(0.5) * 14 - 0.5, (0.5) * 14 - 0.5])


def test_vectors_close_each_outline_and_rasterize_draws(gen):
    field = KernelField.initial((3, 3), sigma=4.0)
    ell = kernel_ellipses(field, (45, 45), n_sigma=1.0)  # scale 15: first centre at (7, 7)
    vec = ell.vectors(12)
    assert vec.shape == (9 * 12, 2, 2)
    per = vec.reshape(9, 12, 2, 2)
    assert np.allclose(per[:, :, 1].sum(1), 0, atol=1e-9)  # segments of a closed polygon sum to zero
    img = ell.rasterize((45, 45))
    assert img.dtype == np.uint8 and img[7, 7 + 4] == 255 and img[7, 7 - 4] == 255
    assert img[7, 7] == 0  # on the circle, not at the centre


def test_max_count_subsamples(gen):
    field = random_field(40, 50, gen)
    ell = kernel_ellipses(field, (560, 700), max_count=300)
    assert 0 < len(ell) <= 300
    assert ell.cells[:, 0].max() < 40


def test_pixel_weights_reproduce_the_render(gen):
    H, W, h, w = 45, 61, 6, 9
    guide = torch.rand(H, W, 3, generator=gen)
    field = random_field(h, w, gen)
    lr = torch.randn(5, h, w, generator=gen)
    for options in (RenderOptions(), RenderOptions(border="unique")):
        engine = BlockEngine(Guide(guide.numpy()), (h, w), options, torch.device("cpu"))
        out = torch.empty(5, H, W)
        render_field(engine, lr, field, out, budget=2**30)
        for y, x in [(0, 0), (22, 30), (44, 60), (10, 59)]:
            wmap = pixel_weight_map(engine, field, y, x)
            assert wmap.sum() == pytest.approx(1.0, abs=1e-6) and wmap.min() >= 0
            pred = (lr.double().numpy() * wmap[None]).sum((1, 2))
            assert np.allclose(pred, out[:, y, x].double().numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="outside"):
        engine.pixel_weights(field, H, 0)
