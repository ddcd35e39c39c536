"""Slow float64 dense reference of the GSJBU render, written from ALGORITHM.md.

It follows the published formulas literally: every HR pixel, every one of the
(2 R_max + 1)^2 candidate offsets, a [K, H, W] log-weight tensor and a softmax.
Only for tests on small images: memory is K * H * W * 8 bytes plus K * H * W * C * 8.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def reference_render(
    lr_map: torch.Tensor,
    guide_chw: torch.Tensor,
    sigma_x: torch.Tensor,
    sigma_y: torch.Tensor,
    theta: torch.Tensor,
    sigma_r: torch.Tensor,
    *,
    radius: int = 8,
    alpha: float = 2.0,
    unique_border: bool = False,
    radius_in_lr_cells: bool = False,
) -> torch.Tensor:
    """Dense float64 GSJBU render.

    lr_map (C, h, w); guide_chw (G, H, W) floats; kernel maps (h, w).
    Scales are H/h and W/w (any positive ratio). Returns (C, H, W) float64.
    ``unique_border`` and ``radius_in_lr_cells`` switch on the two cleaned-up variants.
    """
    f = lr_map.to(torch.float64)
    g = guide_chw.to(torch.float64)
    C, h, w = f.shape
    G, H, W = g.shape
    sy_scale, sx_scale = H / h, W / w
    y = torch.arange(H, dtype=torch.float64)[:, None].expand(H, W)
    x = torch.arange(W, dtype=torch.float64)[None, :].expand(H, W)
    uc = torch.round((y + 0.5) / sy_scale - 0.5).clamp(0, h - 1).long()
    vc = torch.round((x + 0.5) / sx_scale - 0.5).clamp(0, w - 1).long()

    sx = sigma_x.to(torch.float64).clamp_min(1e-6)
    sy = sigma_y.to(torch.float64).clamp_min(1e-6)
    th = theta.to(torch.float64)
    sr = sigma_r.to(torch.float64).clamp_min(1e-6)
    sig_eff = torch.maximum(sigma_x, sigma_y).to(torch.float64)[None, None]
    sig_eff_hr = F.interpolate(sig_eff, size=(H, W), mode="bilinear", align_corners=False)[0, 0]
    if radius_in_lr_cells:
        sig_eff_hr = sig_eff_hr / min(sy_scale, sx_scale)
    r_map = torch.ceil(alpha * sig_eff_hr).clamp(1, radius)
    g_lr = F.interpolate(g[None], size=(h, w), mode="bilinear", align_corners=False)[0]

    logs, qidx = [], []
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            qy_raw, qx_raw = uc + dy, vc + dx
            qy = qy_raw.clamp(0, h - 1)
            qx = qx_raw.clamp(0, w - 1)
            keep = (dy * dy + dx * dx) <= r_map**2
            if unique_border:
                keep = keep & (qy == qy_raw) & (qx == qx_raw)
            cy = (qy.double() + 0.5) * sy_scale - 0.5
            cx = (qx.double() + 0.5) * sx_scale - 0.5
            dX = x - cx
            dY = y - cy
            t = th[qy, qx]
            xr = dX * torch.cos(t) + dY * torch.sin(t)
            yr = -dX * torch.sin(t) + dY * torch.cos(t)
            lw = -(xr**2) / (2 * sx[qy, qx] ** 2 + 1e-8) - (yr**2) / (2 * sy[qy, qx] ** 2 + 1e-8)
            diff2 = ((g - g_lr[:, qy, qx]) ** 2).sum(0)
            lw = lw - diff2 / (2 * sr[qy, qx] ** 2 + 1e-8)
            logs.append(torch.where(keep, lw, torch.full_like(lw, -math.inf)))
            qidx.append(qy * w + qx)
    logw = torch.stack(logs)  # [K, H, W]
    wts = torch.softmax(logw, dim=0)
    qidx = torch.stack(qidx)  # [K, H, W]
    f_flat = f.reshape(C, h * w)
    out = torch.zeros(C, H, W, dtype=torch.float64)
    for k in range(qidx.shape[0]):
        out += wts[k] * f_flat[:, qidx[k]]
    return out
