"""Resampling helpers, the baselines (nearest, bilinear, bicubic, fixed JBU) and the GSJBU runner.

Part of the quality benchmark; run it with ``python benchmarks/bench_quality.py`` (see there).
"""

from __future__ import annotations

import math
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

import napari_upsample_anything as upa

from .config import METHODS


# ======================================================================================
# resampling helpers and the baselines
# ======================================================================================
def chw(img_hwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img_hwc.transpose(2, 0, 1))).float()


def downsample(x_chw: torch.Tensor, lr_shape: Tuple[int, int], mode: str) -> torch.Tensor:
    """``bicubic``: F.interpolate bicubic, align_corners=False, no antialias (the fit's own
    LR input); ``area``: box average over each LR cell's footprint (adaptive average pool)."""
    if mode == "bicubic":
        return F.interpolate(x_chw[None], size=lr_shape, mode="bicubic", align_corners=False)[0]
    if mode == "area":
        return F.interpolate(x_chw[None], size=lr_shape, mode="area")[0]
    raise ValueError(mode)


def interp_up(lr_chw: torch.Tensor, size: Tuple[int, int], mode: str) -> torch.Tensor:
    """Guide-free upsampling. ``nearest`` is pixel-centre aligned (torch ``nearest-exact``)."""
    if mode == "nearest":
        return F.interpolate(lr_chw[None], size=size, mode="nearest-exact")[0]
    return F.interpolate(lr_chw[None], size=size, mode=mode, align_corners=False)[0]


@torch.no_grad()
def jbu_upsample(
    lr_map: torch.Tensor,
    guide_chw: torch.Tensor,
    sigma_s: float,
    sigma_r: float,
    radius: Optional[int] = None,
) -> torch.Tensor:
    """Classic joint bilateral upsampling (Kopf et al. 2007) with one global kernel.

    ``out(p) = sum_q w(p, q) F(q) / sum_q w(p, q)`` over the LR cells ``q`` in a
    ``(2 radius + 1)^2`` window around ``p``'s centre cell, with
    ``w = exp(-|u(p) - q|^2 / (2 sigma_s^2) - ||I(p) - I(q)||^2 / (2 sigma_r^2))``:
    ``u(p)`` is ``p``'s position in LR-cell units (pixel-centre convention, as GSJBU),
    ``sigma_s`` is in LR cells, ``I(q)`` is the guide sampled at the cell centre (bilinear
    resize to the LR grid, no antialias). Cells outside the LR grid are skipped.

    Computed one LR row of centre cells at a time: the normalised weights of those HR rows
    (``[K, rows, W]``, no channel factor) come from a softmax over the window, then every
    centre cell's pixels take one matrix product with that cell's ``[C, K]`` neighbour values.
    Memory: ``K * (H / h) * W`` weights plus the output; never anything of size ``K * C * H * W``.
    """
    lr_map = lr_map.float()
    guide_chw = guide_chw.float()
    C, h, w = lr_map.shape
    G, H, W = guide_chw.shape
    r = int(radius) if radius is not None else max(1, int(math.ceil(2.0 * sigma_s)))
    g_lr = F.interpolate(guide_chw[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    u = (torch.arange(H, dtype=torch.float32) + 0.5) * (h / H) - 0.5
    v = (torch.arange(W, dtype=torch.float32) + 0.5) * (w / W) - 0.5
    uc = torch.round(u).clamp(0, h - 1).long()
    vc = torch.round(v).clamp(0, w - 1).long()
    inv_s = 1.0 / (2.0 * sigma_s * sigma_s)
    inv_r = 1.0 / (2.0 * sigma_r * sigma_r)
    d = torch.arange(-r, r + 1)
    dy, dx = (t.reshape(-1) for t in torch.meshgrid(d, d, indexing="ij"))  # K offsets
    row_start = torch.searchsorted(uc, torch.arange(h + 1))  # HR rows of centre row i: [row_start[i], row_start[i+1])
    col_start = torch.searchsorted(vc, torch.arange(w + 1))
    qx = vc[None, :] + dx[:, None]  # [K, W] neighbour columns of every HR column
    okx = (qx >= 0) & (qx < w)
    qxc = qx.clamp(0, w - 1)
    sx = (v[None, :] - qx.float()) ** 2
    out = torch.empty(C, H, W)
    for i in range(h):
        y0, y1 = int(row_start[i]), int(row_start[i + 1])
        if y0 == y1:
            continue
        qy = i + dy  # [K]
        oky = (qy >= 0) & (qy < h)
        qyc = qy.clamp(0, h - 1)
        sy = (u[y0:y1, None] - qy.float()[None, :]) ** 2  # [ny, K]
        # range term: ||I(p) - I_lr(q)||^2 for the K neighbours of every pixel of these rows
        g_q = g_lr[:, qyc[:, None], qxc]  # [G, K, W]
        diff = guide_chw[:, None, y0:y1, :] - g_q[:, :, None, :]  # [G, K, ny, W]
        lw = -(diff * diff).sum(0) * inv_r - (sy.t()[:, :, None] + sx[:, None, :]) * inv_s  # [K, ny, W]
        lw = lw.masked_fill(~(oky[:, None, None] & okx[:, None, :]), -math.inf)
        wts = torch.softmax(lw, dim=0)  # the centre cell is always inside: no empty window
        for j in range(w):
            x0, x1 = int(col_start[j]), int(col_start[j + 1])
            vals = lr_map[:, qyc, (j + dx).clamp(0, w - 1)]  # [C, K]; cells outside have weight 0
            out[:, y0:y1, x0:x1] = (vals @ wts[:, :, x0:x1].reshape(len(dy), -1)).reshape(C, y1 - y0, x1 - x0)
    return out


def guide_axis(img_hwc: np.ndarray) -> Optional[int]:
    """``channel_axis`` for :func:`guide_arg`'s array (the API never guesses e.g. 2 channels)."""
    return None if img_hwc.shape[2] == 1 else -1


def guide_arg(img_hwc: np.ndarray) -> np.ndarray:
    """The guide as handed to the public API: (H, W) for one channel, else (H, W, G)."""
    return img_hwc[:, :, 0] if img_hwc.shape[2] == 1 else img_hwc


def field_key(key: tuple, lr_shape, steps: int, options: Optional[dict] = None) -> tuple:
    """Key of a fitted field: ``key + (lr_shape, steps)``, plus the sorted fit options when any
    differ from the published defaults (so the main run's keys carry no options)."""
    k = tuple(key) + (tuple(lr_shape), int(steps))
    return k + (tuple(sorted(options.items())),) if options else k


def split_steps(options: Optional[dict], steps: int) -> Tuple[int, dict]:
    """``(steps, fit options)`` of a variant whose options may set its own ``steps``."""
    options = dict(options or {})
    return int(options.pop("steps", steps)), options


class Upsamplers:
    """All methods behind one call; GSJBU fields are fitted once per (guide, LR shape, steps,
    fit options). ``variants`` maps each GSJBU method name to its engine options (keyword
    arguments of ``upa.fit_kernels``; ``guide_smoothing`` is passed to ``upa.render`` too)."""

    def __init__(
        self, jbu_params: Tuple[float, float], steps: int, device: str = "auto", variants: Optional[Dict[str, dict]] = None
    ):
        self.jbu_params = jbu_params
        self.steps = steps
        self.device = device
        self.variants: Dict[str, dict] = {"gsjbu": {}} if variants is None else dict(variants)
        self.fields: Dict[tuple, upa.KernelField] = {}
        self.seconds: Dict[str, List[float]] = {m: [] for m in (*METHODS, *self.variants)}

    def field(self, key: tuple, guide_hwc: np.ndarray, lr_shape, steps: Optional[int] = None, options: Optional[dict] = None):
        """The fitted field for :func:`field_key` (precomputed by :func:`fit_all`, else fitted now)."""
        steps, options = split_steps(options, self.steps if steps is None else steps)
        k = field_key(key, lr_shape, steps, options)
        if k not in self.fields:
            self.fields[k] = upa.fit_kernels(
                guide_arg(guide_hwc),
                lr_shape=tuple(lr_shape),
                steps=steps,
                device=self.device,
                channel_axis=guide_axis(guide_hwc),
                **options,
            )
        return self.fields[k]

    @property
    def fit_seconds(self) -> List[Tuple[tuple, float]]:
        return [(k, float(f.meta["seconds"])) for k, f in self.fields.items()]

    def run(self, method: str, lr_chw: torch.Tensor, guide_hwc: np.ndarray, key: tuple, steps=None) -> np.ndarray:
        H, W = guide_hwc.shape[:2]
        options = self.variants.get(method)
        if options is not None:
            f = self.field(key, guide_hwc, tuple(lr_chw.shape[-2:]), steps, options)
        t0 = time.perf_counter()
        if method in ("nearest", "bilinear", "bicubic"):
            out = interp_up(lr_chw, (H, W), method).numpy()
        elif method == "jbu":
            out = jbu_upsample(lr_chw, chw(guide_hwc), *self.jbu_params).numpy()
        elif options is not None:
            smoothing = float(options.get("guide_smoothing", 0.0))  # explicit, though render defaults to the field's
            out = upa.render(lr_chw.numpy(), guide_arg(guide_hwc), f, device=self.device, guide_smoothing=smoothing)
        else:
            raise ValueError(method)
        self.seconds[method].append(time.perf_counter() - t0)
        return np.asarray(out, np.float32)
