"""Test-time optimisation of the kernel field on one guide image (the published recipe).

Target: the guide itself. Input: the guide bicubically resized to the LR grid. Each step
renders that LR image with the current field, guided by the full-resolution guide, and takes
one Adam step on the L1 loss. Learning rate ``lr * gamma^t`` with
``gamma = (1e-9 / 1e-1)^(1 / 5100)``; the published loop performs 51 updates.

Exact full-image gradient with bounded memory: the loss is a sum over pixels, so it is
computed tile by tile, each tile's backward accumulating into the gradient of the (small)
per-cell coefficient maps; one backward through the parameterisation per step then gives
exactly the gradient of the full-image loss. The log-weight/softmax backward is written out
by hand (:class:`~.render._BlockAttention`) and never keeps more than one tile.
"""

from __future__ import annotations

import math
import time
from typing import List, Optional, Tuple

import torch

from .errors import FitDivergedError, MemoryBudgetError
from .field import KernelField, kernel_coefficients
from .guide import Guide
from .memory import MemoryLog, TileMeter, TileRecord, is_out_of_memory
from .progress import CancelFn, ProgressFn, check_cancel, report
from .render import (
    CPU_PREFERRED_TILE_BYTES,
    BlockEngine,
    RenderOptions,
    Tile,
    area_lr_guide,
    bicubic_lr_guide,
    block_attention,
)

PUBLISHED_STEPS = 51  # optimizer updates in the published loop (steps 0..50, "50 steps")
PUBLISHED_LR = 0.1
SCHEDULE_STEPS = 5100
LR_FLOOR = 1e-9


def schedule_gamma(lr: float = PUBLISHED_LR) -> float:
    """Per-step learning-rate factor of the published exponential schedule."""
    return (LR_FLOOR / lr) ** (1.0 / SCHEDULE_STEPS) if lr > LR_FLOOR else 1.0


class Adam:
    """Adam with the published exponential learning-rate schedule, on one parameter tensor.

    Same arithmetic as ``torch.optim.Adam`` (default betas and eps, no weight decay) followed
    by ``LambdaLR(gamma ** t)``; written out because constructing ``torch.optim.Adam`` imports
    ``torch._dynamo`` (over 2 s on a laptop CPU, longer than a whole 224x224 fit). A test checks
    it step by step against ``torch.optim.Adam`` + ``LambdaLR``.
    """

    def __init__(self, param: torch.Tensor, lr: float, gamma: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.param = param
        self.lr0 = lr
        self.gamma = gamma
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.t = 0
        self.exp_avg = torch.zeros_like(param)
        self.exp_avg_sq = torch.zeros_like(param)

    @property
    def lr(self) -> float:
        return self.lr0 * self.gamma**self.t

    @torch.no_grad()
    def step(self) -> None:
        grad = self.param.grad
        lr = self.lr
        self.t += 1
        self.exp_avg.lerp_(grad, 1 - self.beta1)
        self.exp_avg_sq.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
        bias1 = 1 - self.beta1**self.t
        bias2 = 1 - self.beta2**self.t
        denom = (self.exp_avg_sq.sqrt() / math.sqrt(bias2)).add_(self.eps)
        self.param.addcdiv_(self.exp_avg, denom, value=-lr / bias1)
        self.param.grad = None


class _TileCache:
    """Per-tile guide-only tensors (pixel features, target, valid mask), kept when they fit."""

    def __init__(self, engine: BlockEngine, keep: bool):
        self.engine = engine
        self.keep = keep
        self.store = {}
        self.geometry = {}
        self.workspace = engine.workspace()
        self.agg_dtype = torch.float32

    def neighbours(self, tile: Tile, k: int):
        """Neighbour geometry of a tile (kept, like the features, only when the cache fits)."""
        key = (tile, k)
        if key in self.geometry:
            return self.geometry[key]
        geometry = self.engine.neighbours(tile, k)
        if self.keep:
            self.geometry[key] = geometry
        return geometry

    def get(self, tile: Tile):
        if tile in self.store:
            return self.store[tile]
        target = self.engine.guide_blocks(tile)
        phi = self.engine.pixel_features(tile, target)
        valid = None if self.engine.regular else self.engine.tile_valid(tile)[..., None].to(phi.dtype)
        item = (phi, target, valid)
        if self.keep:
            self.store[tile] = item
        return item


def fit_field(
    guide: Guide,
    lr_shape: Tuple[int, int],
    *,
    steps: int = PUBLISHED_STEPS,
    lr: float = PUBLISHED_LR,
    options: RenderOptions = RenderOptions(),
    device: torch.device = torch.device("cpu"),
    budget: int,
    init: Optional[KernelField] = None,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelFn] = None,
    memlog: Optional[MemoryLog] = None,
    final_loss: bool = True,
    agg_dtype: torch.dtype = torch.float32,
    downsample: str = "bicubic",
) -> KernelField:
    """Fit a :class:`KernelField` on ``guide`` for an LR grid of ``lr_shape``.

    Returns the fitted field; ``field.meta`` holds ``loss_per_step`` (the L1 loss before each
    update, as the published loop sees it), ``final_loss`` (after the last update, if
    ``final_loss``), ``psnr`` of the final reconstruction and ``seconds``.

    ``downsample`` makes the fit's LR input: ``"bicubic"`` (published: non-antialiased
    bicubic, close to sampling each cell's centre) or ``"area"`` (each cell's average, like a
    ViT token; docs/quality_options.md measures when it transfers better).
    """
    t_start = time.perf_counter()
    engine = BlockEngine(guide, lr_shape, options, device)
    h, w = engine.lr_shape
    H, W = guide.shape
    G = guide.channels
    if downsample == "bicubic":
        values = bicubic_lr_guide(guide, lr_shape, device)  # [G, h, w]
    elif downsample == "area":
        values = area_lr_guide(guide, lr_shape, device)
    else:
        raise ValueError(f"downsample={downsample!r}: use 'bicubic' (published) or 'area'")
    values_flat = values.permute(1, 2, 0).reshape(h * w, G).contiguous()
    field0 = (init if init is not None else KernelField.initial(lr_shape)).to(device)
    raw = field0.raw().detach().clone().requires_grad_(True)
    adam = Adam(raw, lr=lr, gamma=schedule_gamma(lr))

    agg_bytes = torch.empty((), dtype=agg_dtype).element_size()
    per_block = engine.bytes_per_block(G, agg_bytes, training=True)
    cache_bytes = H * W * (engine.m + 2 * G + 1) * 4
    keep_cache = cache_bytes <= budget // 2
    work_budget = budget - cache_bytes if keep_cache else budget
    preferred = CPU_PREFERRED_TILE_BYTES if device.type == "cpu" else None
    tiles = engine.plan(per_block, work_budget, preferred)
    cache = _TileCache(engine, keep_cache)
    cache.agg_dtype = agg_dtype
    n_values = G * H * W
    if memlog is not None:
        memlog.budget_bytes = budget
        memlog.device = str(device)

    losses: List[float] = []
    step = 0
    while step < steps:
        check_cancel(cancel, "kernel fitting")
        try:
            loss, _ = _loss_and_grad(engine, cache, tiles, raw, values_flat, n_values, per_block, memlog, cancel)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is retried
            if not is_out_of_memory(exc):
                raise
            tiles = _halve(tiles, exc)
            cache = _TileCache(engine, False)
            cache.agg_dtype = agg_dtype
            raw.grad = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue  # redo this step with smaller tiles: the gradient stays exact
        _check_loss(loss, step, lr, guide)
        losses.append(loss)
        adam.step()
        _check_parameters(raw, step, lr)
        step += 1
        report(progress, step, steps, stage="fit", loss=loss)

    fitted = KernelField.from_raw(raw.detach())
    meta = {
        "lr_shape": [h, w],
        "hr_shape": [H, W],
        "guide_channels": G,
        "guide_normalize": guide.rule,
        "guide_smoothing": guide.smoothing,  # render() reuses it unless told otherwise
        "downsample": downsample,
        "steps": steps,
        "lr": lr,
        "radius": options.radius,
        "border": options.border,
        "radius_units": options.radius_units,
        "loss_per_step": losses,
    }
    if final_loss:
        with torch.no_grad():
            last, mse = _loss_and_grad(engine, cache, tiles, None, values_flat, n_values, per_block, None, cancel, fitted)
        _check_loss(last, step, lr, guide)
        meta["final_loss"] = last
        meta["psnr"] = 10.0 * math.log10(1.0 / max(mse, 1e-20))
    meta["seconds"] = time.perf_counter() - t_start
    fitted.meta = meta
    return fitted


def _check_loss(loss: float, step: int, lr: float, guide: Guide) -> None:
    """Raise :class:`FitDivergedError` for a NaN / Inf loss, naming the likely cause."""
    if math.isfinite(loss):
        return
    if step == 0:
        raise FitDivergedError(
            f"the fit's loss is {loss} before any update: the normalised guide is degenerate "
            f"(normalisation rule: {guide.rule}); check normalize= (use 'auto' or a (lo, hi) that "
            "spans the image's values) and precision= (fp16 cannot hold values beyond 65504)"
        )
    raise FitDivergedError(
        f"the fit diverged: the loss became {loss} after {step} updates; the learning rate lr={lr:g} "
        "is too large for this image (published: 0.1)"
    )


def _check_parameters(raw: torch.Tensor, step: int, lr: float) -> None:
    """Raise :class:`FitDivergedError` when an update made a kernel parameter NaN / Inf or a
    sigma overflow or underflow float32 (``sigma = exp(raw)``)."""
    with torch.no_grad():
        sigmas = torch.exp(raw[[0, 1, 3]])
        ok = bool(torch.isfinite(raw).all()) and bool(torch.isfinite(sigmas).all()) and bool((sigmas > 0).all())
    if not ok:
        raise FitDivergedError(
            f"the fit diverged at update {step + 1}: kernel parameters became NaN, Inf or a zero sigma; "
            f"the learning rate lr={lr:g} is too large for this image (published: 0.1)"
        )


def _loss_and_grad(engine, cache, tiles, raw, values_flat, n_values, per_block, memlog, cancel, field=None):
    """``(L1, MSE)`` of the current field over all tiles; accumulates ``raw.grad`` when ``raw`` is given.

    The MSE is only computed without gradients (it is reported, not optimised).
    """
    training = raw is not None
    if training:
        field = KernelField.from_raw(raw)
    coef = kernel_coefficients(field)
    coef_leaf = coef.detach().requires_grad_(training)
    sigma_eff = torch.maximum(field.sigma_x, field.sigma_y).detach()
    total, squared = 0.0, 0.0
    for tile in tiles:
        check_cancel(cancel, "kernel fitting")
        t0 = time.perf_counter()
        with TileMeter(engine.device) as meter:
            phi, target, valid = cache.get(tile)
            r2 = engine.radius_sq(sigma_eff, tile)
            k = engine.tile_k(r2)
            geometry = cache.neighbours(tile, k)
            q = geometry[0]
            psi, rho, jd = engine.neighbour_features(coef_leaf, tile, geometry)
            mask = engine.weights_mask(r2, geometry[3], k)
            vals = values_flat.index_select(0, q.reshape(-1)).reshape(q.shape[0], k, -1)
            out = block_attention(phi, psi, rho, jd, vals, mask, cache.agg_dtype, cache.workspace)
            diff = (out - target).abs_()
            if valid is not None:
                diff = diff * valid
            tile_loss = diff.sum() / n_values
            if training:
                tile_loss.backward()
            else:
                squared += float((diff * diff).sum()) / n_values
            total += float(tile_loss.detach())
            del out, diff, psi, phi
        if memlog is not None:
            nb = (tile[1] - tile[0]) * (tile[3] - tile[2])
            memlog.add(TileRecord("fit", *tile, per_block * nb, meter.peak, time.perf_counter() - t0))
    if training:
        coef.backward(coef_leaf.grad)
    return total, squared


def _halve(tiles: List[Tile], exc: BaseException) -> List[Tile]:
    out: List[Tile] = []
    for i0, i1, j0, j1 in tiles:
        if i1 - i0 > 1:
            mid = (i0 + i1) // 2
            out += [(i0, mid, j0, j1), (mid, i1, j0, j1)]
        elif j1 - j0 > 1:
            mid = (j0 + j1) // 2
            out += [(i0, i1, j0, mid), (i0, i1, mid, j1)]
        else:
            raise MemoryBudgetError(f"out of memory while fitting even with one LR cell per tile ({exc})") from exc
    return out

