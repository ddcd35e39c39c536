"""The published fit computed in float64: the reference for the loss curves of the float32 paths.

Used by ``tests/test_native_speedpaths.py`` and ``benchmarks/bench_loss_curve.py``. Torch and the
package only (no pytest).
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
import torch

from napari_upsample_anything.core.engine import compiled
from napari_upsample_anything.core.engine.blocks import BlockEngine, RenderOptions
from napari_upsample_anything.core.field import KernelField, kernel_coefficients
from napari_upsample_anything.core.fit import Adam, _ChunkedFit, schedule_gamma
from napari_upsample_anything.core.guide import Guide
from napari_upsample_anything.core.render import bicubic_lr_guide


def float64_fit_losses(guide: Guide, lr_shape: Tuple[int, int], steps: int) -> np.ndarray:
    """Loss before each of ``steps`` published Adam steps (lr 0.1, the published schedule), in float64.

    The fused formulas (:func:`.compiled.fit_chunk`, checked against autograd at 1e-12) over
    every chunk of blocks, the chain rule through the parameterisation by autograd, the same Adam.

    Parameters
    ----------
    guide : Guide
        The HR guide image (H, W, G).
    lr_shape : (h, w)
        The LR grid, in cells.
    steps : int
        Number of optimisation steps.

    Returns
    -------
    numpy.ndarray, shape (steps,)
        The L1 loss before each step, as ``fit_field``'s ``meta["loss_per_step"]``.
    """
    cpu = torch.device("cpu")
    engine = BlockEngine(guide, lr_shape, RenderOptions(), cpu)
    h, w = lr_shape
    values = bicubic_lr_guide(guide, lr_shape, cpu)
    values_flat = values.permute(1, 2, 0).reshape(h * w, -1).contiguous()
    tile = (0, h, 0, w)
    n_values = guide.channels * guide.shape[0] * guide.shape[1]
    prep = _ChunkedFit(engine, [tile], values_flat, n_values, keep=True, compiled=True, kernel_name="fused-eager")
    chunks = [
        (b0, n, q, {k: (v[:n].double() if v.is_floating_point() else v[:n]) for k, v in x.items()})
        for b0, n, q, x in prep.chunks(tile)
    ]
    raw = KernelField.initial(lr_shape).raw().double().requires_grad_(True)
    adam = Adam(raw, lr=0.1, gamma=schedule_gamma(0.1))
    losses = []
    for _ in range(steps):
        field = KernelField.from_raw(raw)
        coef = kernel_coefficients(field)
        sigma_eff = torch.maximum(field.sigma_x, field.sigma_y).detach().float()
        r2 = engine.radius_sq(sigma_eff, tile).to(torch.int32)
        grad = torch.zeros_like(coef).reshape(4, -1)
        total = 0.0
        for b0, n, q, x64 in chunks:
            c = coef.detach().reshape(4, -1).index_select(1, q).reshape(4, n, engine.K)
            psi = compiled.spatial_coefficients(c, x64["d_y"], x64["d_x"])
            loss, _, grad_psi, grad_rho = compiled.fit_chunk(
                x64["phi"], psi, c[3], x64["ic"], x64["jd"], x64["vals"], x64["target"], x64["weight"],
                r2[b0 : b0 + n], prep.r2_off, x64["repeated"],
            )  # fmt: skip
            grad_c = torch.cat([compiled.spatial_coefficients_backward(grad_psi, x64["d_y"], x64["d_x"]), grad_rho[None]])
            grad.index_add_(1, q, grad_c.reshape(4, -1))
            total += float(loss)
        raw.grad = None
        coef.backward(grad.view_as(coef))
        losses.append(total)
        adam.step()
    return np.array(losses)
