"""Test-time optimisation of the kernel field on one guide image (the published recipe).

Target: the guide itself. Input: the guide bicubically resized to the LR grid. Each step
renders that LR image with the current field, guided by the full-resolution guide, and takes
one Adam step on the L1 loss. Learning rate ``lr * gamma^t`` with
``gamma = (1e-9 / 1e-1)^(1 / 5100)``; the published loop performs 51 updates.

Exact full-image gradient with bounded memory: the loss is a sum over pixels, so it is
computed tile by tile, each tile's backward accumulating into the gradient of the (small)
per-cell coefficient maps; one backward through the parameterisation per step then gives
exactly the gradient of the full-image loss. Two interchangeable paths compute a tile's loss
and gradient (``backend=``): the eager one writes the log-weight/softmax backward out by
hand (:class:`~.engine.eager._BlockAttention`) and never keeps more than one tile; the
chunked ones run forward and backward of a chunk of blocks as one fused kernel (the C kernel
of :mod:`.engine.native`, ``torch.compile`` of :mod:`.engine.compiled`, or the Triton kernels
of :mod:`.engine.triton_kernels`). Which one runs is decided in one place,
:func:`.engine.backends.choose_backend`.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from typing import List, Optional, Tuple

import torch

from .checks import check_float
from .engine import footprint, native, triton_kernels
from .engine.backends import choose_backend, fit_kernel_name
from .engine.blocks import CPU_PREFERRED_TILE_BYTES, BlockEngine, RenderOptions, Tile, tile_blocks
from .engine.compiled import (
    compiled_chunk_blocks,
    fit_chunk_mixed,
    kernel,
    pad_blocks,
    spatial_coefficients,
    spatial_coefficients_backward,
    warn_fallback,
)
from .engine.eager import block_attention, gather_values
from .errors import Cancelled, FitDivergedError
from .field import KernelField, kernel_coefficients, kernel_coefficients_backward
from .guide import Guide
from .memory import MemoryLog, TileMeter, TileRecord, halve_tile, is_out_of_memory, release_cached_memory
from .progress import CancelFn, ProgressFn, check_cancel, report
from .published import PUBLISHED_LR, PUBLISHED_STEPS  # noqa: F401  (re-exported)
from .render import area_lr_guide, bicubic_lr_guide
from .threads import engine_call

SCHEDULE_STEPS = 5100
LR_FLOOR = 1e-9


def schedule_gamma(lr: float = PUBLISHED_LR) -> float:
    """Per-step learning-rate factor of the published exponential schedule."""
    return (LR_FLOOR / lr) ** (1.0 / SCHEDULE_STEPS) if lr > LR_FLOOR else 1.0


class Adam:
    """Adam with the published exponential learning-rate schedule, on one parameter tensor.

    Same arithmetic as ``torch.optim.Adam`` (default betas and eps, no weight decay) followed
    by ``LambdaLR(gamma ** t)``; written out because constructing ``torch.optim.Adam`` imports
    ``torch._dynamo`` (seconds on a CPU, longer than a whole 224x224 fit). A test checks
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

    def advance(self) -> Tuple[float, float, float]:
        """Count one step: the schedule's rate for it and Adam's bias corrections
        ``(lr, 1 - beta1^t, 1 - beta2^t)`` (also used by the native step, which updates the
        moments itself: :func:`.engine.native.parameter_step`)."""
        lr = self.lr
        self.t += 1
        return lr, 1 - self.beta1**self.t, 1 - self.beta2**self.t

    @torch.no_grad()
    def step(self) -> None:
        grad = self.param.grad
        lr, bias1, bias2 = self.advance()
        self.exp_avg.lerp_(grad, 1 - self.beta1)
        self.exp_avg_sq.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
        denom = (self.exp_avg_sq.sqrt() / math.sqrt(bias2)).add_(self.eps)
        self.param.addcdiv_(self.exp_avg, denom, value=-lr / bias1)
        self.param.grad = None


class FusedParameters:
    """The fused fit's parameters between kernel passes: ``raw [4, h, w]`` with its :class:`Adam`,
    and the coefficient map ``coefficients = (coef [4, h * w] (A, B, C, rho), sigma_eff [h, w])``
    that the chunk kernels read.

    :meth:`update` takes the loss's gradient in the coefficients (what the kernels return) and
    does the chain rule back to ``raw`` (:func:`.field.kernel_coefficients_backward`), the Adam
    step, the divergence check and the next coefficients. With ``use_native`` that is one call
    into the native library (:func:`.engine.native.parameter_step`, float64 per cell): the forty-odd
    torch operations it replaces took 0.45 ms per step at 16 x 16 cells, a tenth of a 224^2 fit
    step at 2 threads. Otherwise the same steps run as torch operations.
    """

    def __init__(self, raw: torch.Tensor, adam: Adam, use_native: bool):
        self.raw, self.adam, self.use_native = raw, adam, use_native
        h, w = raw.shape[1:]
        if use_native:
            self.coefficients = (torch.empty(4, h * w), torch.empty(h, w))
            native.parameter_step(raw.detach(), *self.coefficients)
        else:
            self._refresh()

    def _refresh(self) -> None:
        field = KernelField.from_raw(self.raw.detach())
        coef = kernel_coefficients(field).reshape(4, -1).contiguous()
        self.coefficients = (coef, torch.maximum(field.sigma_x, field.sigma_y))

    def update(self, grad_coef: torch.Tensor, step: int, lr: float) -> None:
        """One optimiser step from ``grad_coef [4, h * w]``; raises :class:`FitDivergedError`
        (naming update ``step + 1`` and the learning rate ``lr``) when it made a parameter
        non-finite or a sigma overflow or underflow float32."""
        raw = self.raw
        if self.use_native:
            bad = native.parameter_step(raw.detach(), *self.coefficients, adam=self.adam, grad_coef=grad_coef)
            if bad:
                raise _diverged(step, lr)
            return
        raw.grad = kernel_coefficients_backward(raw.detach(), grad_coef.view(raw.shape))
        self.adam.step()
        _check_parameters(raw, step, lr)
        self._refresh()


class _TileCache:
    """Per-tile guide-only tensors (pixel features, target, valid mask, and the range term
    ``||I'(p) - J'(q)||^2`` of every pair), kept when they fit.

    The range term is parameter-free (rho multiplies it, but the squared guide difference
    itself depends only on the guide), so with ``keep_range`` it is computed once per tile
    and reused by every step (eager path: 19-24 % of a step otherwise).
    """

    def __init__(self, engine: BlockEngine, keep: bool, keep_range: bool = False):
        self.engine = engine
        self.keep = keep
        self.keep_range = keep and keep_range
        self.store = {}
        self.geometry = {}
        self.ranges = {}
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

    def range_term(self, tile: Tile, phi: torch.Tensor, k: int) -> Optional[torch.Tensor]:
        """``[B, P, k]`` range term of the tile's first ``k`` offsets, or None when not cached."""
        if not self.keep_range:
            return None
        full = self.ranges.get(tile)
        if full is None:
            K = self.engine.K
            geometry = self.neighbours(tile, K)
            zero = torch.zeros(4, *self.engine.lr_shape, device=self.engine.device)
            _, _, jd = self.engine.neighbour_features(zero, tile, geometry)
            g = self.engine.channels
            full = torch.empty(phi.shape[0], phi.shape[1], K, dtype=phi.dtype, device=phi.device)
            for b0 in range(0, full.shape[0], 64):  # bounded temporaries
                b1 = min(full.shape[0], b0 + 64)
                d = phi[b0:b1, :, None, 7 : 7 + g] - jd[b0:b1, None, :, :]
                full[b0:b1] = (d * d).sum(-1)
            self.ranges[tile] = full
        return full[:, :, :k]

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


class CellSampler:
    """Which LR cells' pixel blocks enter a step's loss: all of them (the exact, published fit)
    or, for the optional stochastic fit, a fresh random ``fraction`` of them every step.

    Pixels are drawn as whole blocks (the HR pixels of one LR cell) so that the kernels' work
    shrinks in proportion: a block is the unit every fit kernel iterates over. Exactly
    ``k = ceil(fraction * n)`` of the ``n`` cells are drawn without replacement from a
    CPU generator seeded with ``seed``, over the whole grid (the draw does not depend on the
    tiling, the device or the kernel), and the selected pixels' loss is scaled by ``n / k``:
    loss and gradient are unbiased estimates of the full ones.
    """

    def __init__(self, n_rows: int, n_cols: int, fraction: float, seed: int, device: torch.device):
        self.shape = (n_rows, n_cols)
        n = n_rows * n_cols
        self.k = n if fraction >= 1.0 else max(1, math.ceil(float(fraction) * n))
        self.scale = n / self.k
        self.device = device
        self.generator = torch.Generator(device="cpu").manual_seed(int(seed))
        self.mask: Optional[torch.Tensor] = None  # [n_rows, n_cols] bool; None: every cell

    @property
    def exact(self) -> bool:
        return self.k == self.shape[0] * self.shape[1]

    def draw(self) -> None:
        """Pick this step's cells (a no-op for the exact fit)."""
        if self.exact:
            return
        n = self.shape[0] * self.shape[1]
        picked = torch.randperm(n, generator=self.generator)[: self.k]
        mask = torch.zeros(n, dtype=torch.bool)
        mask[picked] = True
        self.mask = mask.reshape(self.shape).to(self.device)

    def everything(self) -> None:
        """Use every cell from now on (the final, exact loss)."""
        self.mask = None

    def blocks(self, tile: Tile) -> Optional[torch.Tensor]:
        """Indices (int64, ascending) of the drawn blocks among ``tile``'s; None: all of them."""
        if self.mask is None:
            return None
        i0, i1, j0, j1 = tile
        return self.mask[i0:i1, j0:j1].reshape(-1).nonzero().squeeze(1)

    @property
    def weight(self) -> float:
        """Factor on the drawn pixels' loss (1 when every cell is used)."""
        return 1.0 if self.mask is None else self.scale


class _ChunkedFit:
    """Inputs of the chunked fit kernels (:func:`_fit_chunk`), per tile and chunk.

    Everything except the kernel coefficients is guide-only, so it is prepared once (when
    ``keep``) in the kernel's channel-major layout, padded to the fixed chunk size: one shape
    class per fit, hence one compilation.
    """

    def __init__(
        self,
        engine: BlockEngine,
        tiles: List[Tile],
        values_flat: torch.Tensor,
        n_values: int,
        keep: bool,
        compiled: bool,
        kernel_name: Optional[str] = None,
        pair_dtype: torch.dtype = torch.float32,
    ):
        self.engine = engine
        self.values_flat = values_flat
        self.n_values = n_values
        self.keep = keep
        self.compiled = compiled
        # CPU: the hand-written C kernel (faster than inductor's code for this chunk, built in
        # seconds; docs/benchmarks_engine.md); CUDA, or no C compiler: torch.compile (Triton /
        # inductor C++). The choice is engine.backends.choose_backend's.
        if kernel_name is None:
            kernel_name = fit_kernel_name(engine.device, engine.channels) if compiled else "fused-eager"
        # "native", "triton", "inductor", "fused-eager" (uncompiled formulas) or "mixed" (the
        # mixed-precision formulas in torch operations, compiled.fit_chunk_mixed)
        self.kernel_name = kernel_name
        self.pair_dtype = pair_dtype
        direct = kernel_name in ("native", "triton", "mixed")
        self.fn = None if direct else kernel("fit", kernel_name == "inductor")  # direct: called by _fit_chunk
        largest = max(tile_blocks(t) for t in tiles)
        # The native kernel keeps no [B, P, K] intermediates and takes any B: whole tiles, no
        # padding. Compiled kernels: cache-sized chunks of one fixed size (one compilation).
        whole = self.kernel_name in ("native", "triton")  # no [B, P, K] intermediates: whole tiles, no padding
        self.cb = largest if whole else compiled_chunk_blocks(engine.device, engine.P, engine.K, largest)
        self.r2_off = engine.grid.offsets.r2.to(engine.device, torch.int32)
        self.store = {}

    @staticmethod
    def bytes_per_block(engine: BlockEngine) -> int:
        return footprint.chunked_fit_inputs_per_block(engine.P, engine.K, engine.channels)

    def allocated_per_block(self, planned: int) -> int:
        """Bytes per block a step allocates for a tile (:mod:`.engine.footprint`); ``planned``
        (the planner's upper bound) for the kernels that keep ``[B, P, K]`` intermediates."""
        if self.kernel_name not in footprint.FUSED_FIT_KERNELS:
            return planned
        engine = self.engine
        return footprint.fused_fit_tile_per_block(engine.P, engine.K, engine.channels, self.keep, self.kernel_name)

    def chunks(self, tile: Tile):
        if tile in self.store:
            return self.store[tile]
        eng, cb, K = self.engine, self.cb, self.engine.K
        target = eng.guide_blocks(tile)
        phi = eng.pixel_features(tile, target)
        q, d_y, d_x, repeated = eng.neighbours(tile, K)
        jd = eng.neighbour_guide(tile, q)
        nb = q.shape[0]
        weight = torch.full((nb, eng.P), 1.0 / self.n_values, device=eng.device)
        if not eng.regular:
            weight = weight * eng.tile_valid(tile)
        rep = repeated[:, 0, :] if repeated is not None else torch.zeros(nb, K, dtype=torch.bool, device=eng.device)
        vals = gather_values(self.values_flat, q)
        g = eng.channels
        channel_major = {
            "phi": phi[:, :, :6].transpose(1, 2),
            "d_y": d_y,
            "d_x": d_x,
            "ic": phi[:, :, 7 : 7 + g].transpose(1, 2),
            "jd": jd.transpose(1, 2),
            "vals": vals.transpose(1, 2),
            "target": target.transpose(1, 2),
            "weight": weight,
            "repeated": rep,
        }
        out = []
        for b0 in range(0, nb, cb):
            b1 = min(nb, b0 + cb)
            item = {name: self.pad(t[b0:b1]).contiguous() for name, t in channel_major.items()}
            out.append((b0, b1 - b0, q[b0:b1].reshape(-1), item))
        if self.keep:
            self.store[tile] = out
        return out

    def pad(self, t: torch.Tensor) -> torch.Tensor:
        """Pad a chunk to the fixed chunk size of a compiled kernel (the native one takes any)."""
        return t if self.kernel_name in ("native", "triton") else pad_blocks(t, self.cb)

    def subset(self, x: dict, q: torch.Tensor, rows: torch.Tensor, weight: float):
        """The chunk's blocks ``rows`` only (stochastic fit), their loss weighted by ``weight``:
        ``(x, q, n)`` of a smaller chunk (padded again for a compiled kernel)."""
        K = self.engine.K
        sub = {name: self.pad(t.index_select(0, rows)).contiguous() for name, t in x.items()}
        sub["weight"] = sub["weight"] * weight
        return sub, q.reshape(-1, K).index_select(0, rows).reshape(-1), int(rows.numel())


def _cache_bytes(engine: BlockEngine, fused: bool) -> Tuple[int, int]:
    """Bytes of the fit's guide-only cache and (eager path) of its cached range terms."""
    n_cells = engine.grid.rows.n_lr * engine.grid.cols.n_lr
    if fused:
        return n_cells * _ChunkedFit.bytes_per_block(engine), 0
    H, W = engine.guide.shape
    return H * W * (engine.m + 2 * engine.channels + 1) * 4, n_cells * engine.P * engine.K * 4


def _resident_bytes(engine: BlockEngine, fused: bool, kept: bool, keep_range: bool) -> int:
    """Bytes the fit keeps across steps: the guide-only cache (when kept) and the parameters."""
    h, w = engine.lr_shape
    parameters_and_inputs = footprint.fit_resident_bytes(h * w, engine.P, engine.K, engine.channels, fused and kept)
    if fused or not kept:
        return parameters_and_inputs
    cache, ranges = _cache_bytes(engine, False)
    return parameters_and_inputs + cache + (ranges if keep_range else 0)


@engine_call
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
    backend: str = "auto",
    threads: Optional[int] = None,
    fit_fraction: float = 1.0,
    fit_seed: int = 0,
    fit_dtype: torch.dtype = torch.float32,
) -> KernelField:
    """Fit a :class:`KernelField` on ``guide`` for an LR grid of ``lr_shape``.

    Returns the fitted field; ``field.meta`` holds ``loss_per_step`` (the L1 loss before each
    update, as the published loop sees it), ``final_loss`` (after the last update, if
    ``final_loss``), ``psnr`` of the final reconstruction and ``seconds``.

    ``downsample`` makes the fit's LR input: ``"bicubic"`` (published: non-antialiased
    bicubic, close to sampling each cell's centre) or ``"area"`` (each cell's average, like a
    ViT token; docs/quality_options.md measures when it transfers better).

    ``backend``: ``"eager"`` (tensor operations, hand-written backward), ``"compiled"`` (one
    fused kernel per chunk of blocks: the C kernel of :mod:`.engine.native` on the CPU when it
    builds, else :mod:`.engine.compiled` through ``torch.compile``; needs a C++ compiler on the
    CPU, Triton on CUDA), ``"triton"`` or ``"auto"``: the table of :mod:`.engine.backends` says
    which kernel runs. All compute the same loss and exact gradient. The compiled
    path aggregates in float32 whatever ``agg_dtype`` says (the fit's values have 3 channels).
    ``threads``: CPU threads for this call (None: torch's setting; :mod:`.threads`).

    ``fit_fraction`` (optional stochastic fit, default 1: exact): each step's loss and gradient
    use a fresh random ``fit_fraction`` of the LR cells' pixel blocks (:class:`CellSampler`,
    seeded with ``fit_seed``), so a step costs about that fraction of an exact one. The final
    loss and PSNR in ``meta`` are always exact (every pixel). docs/quality_stochastic.md
    measures its speed and quality.

    ``fit_dtype`` (mixed-precision fit): float32 (default), or float16 / bfloat16 for the
    per-pair products after the log-weights (float32 log-weights, ``exp``, sums and
    parameters; loss scaling for float16): the Triton kernel with ``backend="triton"``, the
    same arithmetic in torch operations (:func:`.engine.compiled.fit_chunk_mixed`) otherwise.
    docs/mixed_precision.md measures it.
    """
    fit_fraction = check_float(
        fit_fraction, "fit_fraction", positive=True, maximum=1.0, hint="pixels per step; 1 is the exact fit"
    )
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
    mixed = fit_dtype != torch.float32
    choice = choose_backend(
        backend, device, "fit", guide_channels=G, pair_evals=float(H * W * engine.K * max(1, steps)), mixed=mixed
    )
    path = choice.path
    fused_path = path in ("compiled", "triton")
    cache_bytes, range_bytes = _cache_bytes(engine, fused_path)
    keep_cache = cache_bytes <= budget // 2
    keep_range = keep_cache and cache_bytes + range_bytes <= budget // 2
    work_budget = budget - (cache_bytes + (range_bytes if keep_range else 0) if keep_cache else 0)
    preferred = CPU_PREFERRED_TILE_BYTES if device.type == "cpu" else None
    tiles = engine.plan(per_block, work_budget, preferred)
    n_values = G * H * W

    def make_cache(keep: bool):
        if fused_path:
            return _ChunkedFit(
                engine, tiles, values_flat, n_values, keep, compiled=True, kernel_name=choice.kernel, pair_dtype=fit_dtype
            )
        made = _TileCache(engine, keep, keep_range)
        made.agg_dtype = agg_dtype
        return made

    cache = make_cache(keep_cache)
    sampler = CellSampler(engine.grid.rows.n_lr, engine.grid.cols.n_lr, fit_fraction, fit_seed, device)
    if memlog is not None:
        memlog.budget_bytes = budget
        memlog.device = str(device)
        memlog.keep("fit", _resident_bytes(engine, fused_path, keep_cache, keep_range))

    losses: List[float] = []
    params: Optional[FusedParameters] = None  # the fused path's parameter work (made on its first step)
    step = 0
    while step < steps:
        check_cancel(cancel, "kernel fitting")
        if len(losses) == step:  # a new step (not a retry of this one): draw its pixels
            sampler.draw()
            losses.append(math.nan)
        try:
            if fused_path:
                if params is None:
                    native_update = cache.kernel_name == "native" and raw.dtype == torch.float32
                    params = FusedParameters(raw, adam, use_native=native_update)
                loss, _, grad_coef = _fused_pass(cache, tiles, *params.coefficients, per_block, memlog, cancel, sampler)
            else:
                loss, _ = _loss_and_grad(
                    engine, cache, tiles, raw, values_flat, n_values, per_block, memlog, cancel, sampler=sampler
                )
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is retried
            if isinstance(exc, Cancelled):  # the user's, not a compiler's failure: no eager fallback
                raise
            if fused_path and backend == "auto" and step == 0 and not mixed and not is_out_of_memory(exc):
                warn_fallback(exc)  # no working compiler after all: the eager path computes the same
                path = "eager"
                fused_path = False
                cache = make_cache(keep_cache)
                if memlog is not None:  # the eager path keeps other tensors
                    memlog.resident["fit"] = _resident_bytes(engine, False, keep_cache, keep_range)
                raw.grad = None
                continue
            if not is_out_of_memory(exc):
                raise
            tiles = [half for tile in tiles for half in halve_tile(tile, exc, "fitting")]
            cache = make_cache(False)
            raw.grad = None
            release_cached_memory(device)
            continue  # redo this step with smaller tiles: the gradient stays exact
        _check_loss(loss, step, lr, guide)
        losses[step] = loss
        if fused_path:
            params.update(grad_coef, step, lr)
        else:
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
        "fit_fraction": float(fit_fraction),
        "fit_seed": int(fit_seed),
        "backend": path,
        "kernel": cache.kernel_name if fused_path else "eager",
        "fit_precision": str(fit_dtype).replace("torch.", ""),
    }
    if final_loss:
        sampler.everything()
        with torch.no_grad():
            if fused_path:
                last, mse = _loss_and_grad_fused(cache, tiles, None, per_block, None, cancel, fitted)
            else:
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
        raise _diverged(step, lr)


def _diverged(step: int, lr: float) -> FitDivergedError:
    return FitDivergedError(
        f"the fit diverged at update {step + 1}: kernel parameters became NaN, Inf or a zero sigma; "
        f"the learning rate lr={lr:g} is too large for this image (published: 0.1)"
    )


def _loss_and_grad(engine, cache, tiles, raw, values_flat, n_values, per_block, memlog, cancel, field=None, sampler=None):
    """``(L1, MSE)`` of the current field over all tiles; accumulates ``raw.grad`` when ``raw`` is given.

    The MSE is only computed without gradients (it is reported, not optimised). ``sampler``
    (:class:`CellSampler`): only its drawn blocks count, scaled by its weight.
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
            picked = sampler.blocks(tile) if sampler is not None else None
            r2 = engine.radius_sq(sigma_eff, tile, picked)  # picked blocks' rows only
            if picked is not None and picked.numel() == 0:
                continue
            k = engine.tile_k(r2)
            geometry = cache.neighbours(tile, k)
            psi, rho, jd = engine.neighbour_features(coef_leaf, tile, geometry)
            dist = cache.range_term(tile, phi, k)
            if picked is not None:  # stochastic fit: this step's blocks only
                phi, target, valid, psi, rho, jd, dist = _rows(picked, phi, target, valid, psi, rho, jd, dist)
                geometry = _rows(picked, *geometry)
            q = geometry[0]
            mask = engine.weights_mask(r2, geometry[3], k)
            vals = gather_values(values_flat, q)
            out = block_attention(phi, psi, rho, jd, vals, mask, cache.agg_dtype, cache.workspace, dist)
            diff = (out - target).abs_()
            if valid is not None:
                diff = diff * valid
            tile_loss = diff.sum() * ((sampler.weight if sampler is not None else 1.0) / n_values)
            if training:
                tile_loss.backward()
            else:
                squared += float((diff * diff).sum()) / n_values
            total += float(tile_loss.detach())
            del out, diff, psi, phi
        if memlog is not None:
            nb = (tile[1] - tile[0]) * (tile[3] - tile[2])
            memlog.add(TileRecord("fit", *tile, per_block * nb, meter.peak, time.perf_counter() - t0, per_block * nb))
    if training:
        coef.backward(coef_leaf.grad)
    return total, squared


def _rows(rows: torch.Tensor, *tensors: Optional[torch.Tensor]) -> tuple:
    """The blocks ``rows`` (first axis) of each tensor; None stays None."""
    return tuple(None if t is None else t.index_select(0, rows) for t in tensors)


def _fit_chunk(
    prep: _ChunkedFit, c: torch.Tensor, x: dict, r2: torch.Tensor, n: int, want_grad: bool = True, q=None, grad=None
):  # fmt: skip
    """Loss, squared error and gradient ``[4, n, K]`` (A, B, C, rho) of one chunk of ``n`` blocks
    from the neighbours' coefficients ``c [4, n, K]``, through the chunk kernel.

    Native kernel only: with ``q`` (the chunk's neighbour cells), ``c`` is the whole coefficient
    map ``[4, N]`` and the gradient is also added into ``grad [4, N]`` at those cells
    (:func:`.engine.native.fit_chunk`)."""
    if prep.kernel_name == "native":  # spatial coefficients and their chain rule inside the C kernel
        return native.fit_chunk(
            x["phi"], c, x["d_y"], x["d_x"], x["ic"], x["jd"], x["vals"], x["target"], x["weight"], r2, prep.r2_off, x["repeated"],
            want_grad, q=q, grad_out=grad,
        )  # fmt: skip
    if prep.kernel_name == "triton":
        return triton_kernels.fit_chunk(
            x["phi"], c, x["d_y"], x["d_x"], x["ic"], x["jd"], x["vals"], x["target"], x["weight"], r2, prep.r2_off,
            x["repeated"], pair_dtype=prep.pair_dtype,
        )  # fmt: skip
    if prep.kernel_name == "mixed":
        wmax = float(x["weight"].max()) if prep.pair_dtype == torch.float16 else 0.0
        loss, sq, grad = fit_chunk_mixed(
            x["phi"], prep.pad(c.transpose(0, 1)).transpose(0, 1), x["d_y"], x["d_x"], x["ic"], x["jd"], x["vals"],
            x["target"], x["weight"], prep.pad(r2), prep.r2_off, x["repeated"], prep.pair_dtype, 1.0 / wmax if wmax > 0 else 1.0,
        )  # fmt: skip
        return loss, sq, grad[:, :n]
    psi = spatial_coefficients(c, x["d_y"][:n], x["d_x"][:n])
    loss, sq, grad_psi, grad_rho = prep.fn(
        x["phi"], prep.pad(psi), prep.pad(c[3]), x["ic"], x["jd"], x["vals"], x["target"], x["weight"],
        prep.pad(r2), prep.r2_off, x["repeated"],
    )  # fmt: skip
    grad_abc = spatial_coefficients_backward(grad_psi[:n], x["d_y"][:n], x["d_x"][:n])
    return loss, sq, torch.cat([grad_abc, grad_rho[None, :n]])


def _loss_and_grad_fused(prep: _ChunkedFit, tiles, raw, per_block, memlog, cancel, field=None, sampler=None):
    """:func:`_loss_and_grad` through the fused chunk kernel; also returns the MSE when training.

    The fit's loop calls :func:`_fused_pass` with a :class:`FusedParameters` instead (one native
    call for the parameter work); this composes the same steps with torch operations."""
    training = raw is not None
    if training:
        field = KernelField.from_raw(raw.detach())  # the chain rule back to raw is written out below
    coef = kernel_coefficients(field)
    coef_flat = coef.detach().reshape(4, -1).contiguous()
    sigma_eff = torch.maximum(field.sigma_x, field.sigma_y).detach()
    total, squared, grad = _fused_pass(prep, tiles, coef_flat, sigma_eff, per_block, memlog, cancel, sampler, training)
    if training:
        grad_raw = kernel_coefficients_backward(raw.detach(), grad.view_as(coef))
        raw.grad = grad_raw if raw.grad is None else raw.grad + grad_raw
    return total, squared


def _fused_pass(prep: _ChunkedFit, tiles, coef_flat, sigma_eff, per_block, memlog, cancel, sampler=None, want_grad=True):
    """``(L1, MSE, gradient)`` of the field whose coefficient map is ``coef_flat [4, h * w]``
    (A, B, C, rho) and effective sigma ``sigma_eff [h, w]``, over all tiles through the fused
    chunk kernel. The gradient ``[4, h * w]`` is in the coefficients (None without ``want_grad``)."""
    engine = prep.engine
    grad = torch.zeros_like(coef_flat) if want_grad else None
    total = torch.zeros((), device=engine.device)
    squared = torch.zeros((), device=engine.device)
    K = engine.K
    with torch.no_grad():
        for tile in tiles:
            check_cancel(cancel, "kernel fitting")
            t0 = time.perf_counter()
            # the meter reads the process's RSS (psutil, a system call): only when a memory log wants it
            with TileMeter(engine.device) if memlog is not None else nullcontext() as meter:
                picked = sampler.blocks(tile) if sampler is not None else None
                r2 = engine.radius_sq(sigma_eff, tile, picked, torch.int32)  # picked blocks' rows only
                for b0, n, q, x in prep.chunks(tile):
                    r2_chunk = r2[b0 : b0 + n]
                    if picked is not None:  # stochastic fit: this step's blocks of the chunk only
                        inside = (picked >= b0) & (picked < b0 + n)
                        rows = picked[inside] - b0
                        if rows.numel() == 0:
                            continue
                        r2_chunk = r2[inside]
                        x, q, n = prep.subset(x, q, rows, sampler.weight)
                    if prep.kernel_name == "native":  # gathers and scatters the coefficients itself
                        loss, sq, _ = _fit_chunk(prep, coef_flat, x, r2_chunk, n, want_grad, q, grad)
                    else:
                        c = coef_flat.index_select(1, q).reshape(4, n, K)  # A, B, C, rho of the neighbours
                        loss, sq, grad_coef = _fit_chunk(prep, c, x, r2_chunk, n, want_grad)
                        if want_grad:
                            grad.index_add_(1, q, grad_coef.reshape(4, -1))
                    total += loss
                    squared += sq
            if memlog is not None:
                nb = tile_blocks(tile)
                seconds = time.perf_counter() - t0
                memlog.add(
                    TileRecord("fit", *tile, per_block * nb, meter.peak, seconds, prep.allocated_per_block(per_block) * nb)
                )
    return float(total), float(squared), grad
