"""A dense implementation in the style of the published code, for the engine benchmark.

It follows the published data flow (ALGORITHM.md): every HR pixel and every one of the
(2 R + 1)^2 = 289 candidate offsets as a full [289, H, W] tensor, autograd through all of
them during the fit, and, for the render, neighbour features gathered as
[offsets_chunk * H * W, channel_chunk] tensors (chunks of 49 offsets and 128 channels, as
the published evaluation mode uses, all channels gathered before the channel chunk is cut). It computes the same numbers as the engine; it exists
only to measure what that layout costs in time and memory. Written for this project from
the formulas, not copied.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

R_MAX = 8


def _geometry(H, W, h, w, device):
    s_y, s_x = H / h, W / w
    y = torch.arange(H, device=device, dtype=torch.float32)[:, None].expand(H, W)
    x = torch.arange(W, device=device, dtype=torch.float32)[None, :].expand(H, W)
    uc = torch.round((y + 0.5) / s_y - 0.5).clamp(0, h - 1).long()
    vc = torch.round((x + 0.5) / s_x - 0.5).clamp(0, w - 1).long()
    r = torch.arange(-R_MAX, R_MAX + 1, device=device)
    dy, dx = torch.meshgrid(r, r, indexing="ij")
    return s_y, s_x, y, x, uc, vc, dy.reshape(-1), dx.reshape(-1)


def dense_render(feat, guide, sx, sy, th, sr, *, n_chunk=289, c_chunk=None):
    """feat [C, h, w], guide [G, H, W] in [0, 1], maps [h, w] -> [C, H, W] (float32)."""
    C, h, w = feat.shape
    G, H, W = guide.shape
    dev = feat.device
    s_y, s_x, y, x, uc, vc, dy_all, dx_all = _geometry(H, W, h, w, dev)
    sig_eff = F.interpolate(torch.maximum(sx, sy)[None, None], size=(H, W), mode="bilinear", align_corners=False)[0, 0]
    r_map = torch.ceil(2.0 * sig_eff).clamp(1, R_MAX)
    g_lr = F.interpolate(guide[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    feat_flat = feat.permute(1, 2, 0).reshape(h * w, C)
    c_chunk = c_chunk or C
    num = torch.zeros(C, H, W, device=dev)
    den = torch.zeros(H, W, device=dev)
    m = torch.full((H, W), -math.inf, device=dev)
    K = dy_all.numel()
    for n0 in range(0, K, n_chunk):
        dy = dy_all[n0 : n0 + n_chunk].view(-1, 1, 1)
        dx = dx_all[n0 : n0 + n_chunk].view(-1, 1, 1)
        qy = (uc[None] + dy).clamp(0, h - 1)
        qx = (vc[None] + dx).clamp(0, w - 1)
        keep = (dy * dy + dx * dx) <= r_map[None] ** 2
        q = qy * w + qx
        cy = (qy.float() + 0.5) * s_y - 0.5
        cx = (qx.float() + 0.5) * s_x - 0.5
        dX = x[None] - cx
        dY = y[None] - cy
        t = th.reshape(-1)[q]
        a = sx.reshape(-1)[q].clamp_min(1e-6)
        b = sy.reshape(-1)[q].clamp_min(1e-6)
        xr = dX * torch.cos(t) + dY * torch.sin(t)
        yr = -dX * torch.sin(t) + dY * torch.cos(t)
        logw = -(xr**2) / (2 * a**2 + 1e-8) - (yr**2) / (2 * b**2 + 1e-8)
        diff2 = sum((guide[g][None] - g_lr[g].reshape(-1)[q]) ** 2 for g in range(G))
        logw = logw - diff2 / (2 * sr.reshape(-1)[q].clamp_min(1e-6) ** 2 + 1e-8)
        logw = torch.where(keep, logw, torch.full_like(logw, -math.inf))
        m_new = torch.maximum(m, logw.max(0).values)
        # A chunk can have every offset masked for a pixel (all outside its dynamic radius):
        # keep the running maximum finite there so that exp() gives 0, not NaN.
        ref = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        scale_old = torch.exp(m - ref)
        num = num * scale_old
        den = den * scale_old
        wts = torch.exp(logw - ref)
        den = den + wts.sum(0)
        for c0 in range(0, C, c_chunk):
            # As published: gather every channel of every neighbour, then keep the chunk
            # ([n * H * W, C], the 20.74 GiB allocation at 224^2 with all 289 offsets).
            gathered = feat_flat.index_select(0, q.reshape(-1))[:, c0 : c0 + c_chunk]
            gathered = gathered.reshape(*q.shape, -1)
            num[c0 : c0 + c_chunk] = num[c0 : c0 + c_chunk] + (gathered * wts[..., None]).sum(0).permute(2, 0, 1)
        m = m_new
    return num / den.clamp_min(1e-8)


def dense_fit(guide, lr_shape, steps=51, lr=0.1):
    """Published-style fit: autograd through the full [289, H, W] render; returns raw [4, h, w]."""
    G, H, W = guide.shape
    h, w = lr_shape
    lr_img = F.interpolate(guide[None], size=(h, w), mode="bicubic", align_corners=False)[0]
    raw = torch.stack(
        [
            torch.full((h, w), math.log(16.0)),
            torch.full((h, w), math.log(16.0)),
            torch.zeros(h, w),
            torch.full((h, w), math.log(0.12)),
        ]
    ).to(guide.device)
    raw.requires_grad_(True)
    opt = torch.optim.Adam([raw], lr=lr)
    gamma = (1e-9 / lr) ** (1 / 5100)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: gamma**t)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        sx, sy, th, sr = torch.exp(raw[0]), torch.exp(raw[1]), math.pi * torch.tanh(raw[2]), torch.exp(raw[3])
        pred = dense_render(lr_img, guide, sx, sy, th, sr)
        loss = (pred - guide).abs().mean()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return raw.detach(), losses
