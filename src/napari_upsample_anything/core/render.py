"""Render: the tile loop that writes an HR map with a fitted kernel field.

:func:`render_field` plans tiles of whole blocks for the memory budget
(:meth:`.engine.blocks.BlockEngine.plan`), asks the backend choice
(:func:`.engine.backends.choose_backend`) which kernel computes the softmax weights, renders
tile by tile through the block engine and writes each tile into the output, splitting and
retrying tiles that run out of memory. The formulas, the block structure and the published
quirks are described in :mod:`.engine.blocks`; docs/engine.md has the details.

Also here: the LR versions of the guide used as the fit's input (:func:`bicubic_lr_guide`,
:func:`area_lr_guide`) and the per-pixel weight map of the kernel inspector
(:func:`pixel_weight_map`).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Optional, Tuple

import numpy as np
import torch

from .engine import compiled, footprint, native
from .engine.backends import choose_backend
from .engine.blocks import CPU_PREFERRED_TILE_BYTES, BlockEngine, tile_blocks
from .field import KernelField, kernel_coefficients
from .grid import AxisBlocks
from .guide import Guide
from .interp import cubic_taps, resample
from .memory import MemoryLog, TileMeter, TileRecord, halve_tile, is_out_of_memory, release_cached_memory
from .progress import CancelFn, ProgressFn, check_cancel, report
from .threads import engine_call


@engine_call
def render_field(
    engine: BlockEngine,
    values: torch.Tensor,
    field: KernelField,
    out,
    *,
    agg_dtype: torch.dtype = torch.float32,
    budget: int,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelFn] = None,
    memlog: Optional[MemoryLog] = None,
    stage: str = "render",
    affine: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    backend: str = "eager",
    threads: Optional[int] = None,
) -> None:
    """Render ``values`` ``[C, h, w]`` with ``field`` into ``out`` ``(C, H, W)`` through ``engine``.

    ``out`` is a torch tensor (any device) or a numpy array / memmap; it is written
    tile by tile. Tiles that run out of memory are split and retried. ``affine``
    ``(scale [C], shift [C])`` is applied to every tile as it is written (the caller's
    undo of a per-channel normalisation; the render commutes with it). ``backend``:
    ``"eager"``, ``"compiled"`` (log-weights and softmax as one fused kernel,
    :mod:`.engine.compiled`; the aggregation is a GEMM either way), ``"triton"`` or
    ``"auto"``: the table of :mod:`.engine.backends` says which kernel runs. ``threads``:
    CPU threads for this call (None: torch's setting).
    """
    C = int(values.shape[0])
    h, w = engine.lr_shape
    agg_bytes = torch.empty((), dtype=agg_dtype).element_size()
    values_flat = values.to(engine.device).permute(1, 2, 0).reshape(h * w, C).to(agg_dtype).contiguous()
    coef = kernel_coefficients(field).detach().to(engine.device)
    sigma_eff = torch.maximum(field.sigma_x, field.sigma_y).detach().to(engine.device)
    per_block = engine.bytes_per_block(C, agg_bytes, training=False)
    preferred = CPU_PREFERRED_TILE_BYTES if engine.device.type == "cpu" else None
    queue = engine.plan(per_block, budget, preferred)
    total, done = h * w, 0
    if memlog is not None:
        memlog.budget_bytes = budget
        memlog.device = str(engine.device)
    workspace = engine.workspace()
    # "auto" never compiles a render: the GEMM dominates and the compiled softmax gains little
    # (docs/benchmarks_engine.md); "compiled" is there to be asked for.
    choice = choose_backend(backend, engine.device, "render", guide_channels=engine.channels)
    weights_kernel = None  # eager
    if choice.kernel == "inductor":
        weights_kernel = compiled.RenderWeights(engine, max(tile_blocks(t) for t in queue))
    elif choice.kernel == "triton":
        weights_kernel = "triton"  # the Triton render kernel (weights and aggregation, :mod:`.engine.triton_kernels`)
    elif choice.kernel == "native":  # CPU: the C kernel's weights (same formulas)
        weights_kernel = native.RenderWeights(engine)
    # what a tile really allocates (the planner's bound is the eager path's own figure); what the
    # render keeps across tiles (its workspace's chunk buffers) is read from the workspace
    allocated_per_block = per_block
    if choice.kernel == "native":
        allocated_per_block = footprint.native_render_per_block(
            engine.P, engine.K, engine.channels, C, agg_bytes, native.RenderWeights.fuses_channels(C, agg_dtype)
        )
    if memlog is not None:
        memlog.keep(stage, 0)
    undo = None
    if affine is not None:
        scale, shift = affine[0][None, :, None], affine[1][None, :, None]

        def undo(rendered: torch.Tensor) -> None:  # in place: the engine's own float32 buffer
            rendered.mul_(scale).add_(shift)

    while queue:
        tile = queue.pop(0)
        check_cancel(cancel, stage)
        t0 = time.perf_counter()

        try:
            # the meter reads the process's RSS (psutil, a system call): only when a memory log wants it
            with torch.no_grad(), TileMeter(engine.device) if memlog is not None else nullcontext() as meter:
                write = engine.tile_writer(out, tile, undo)
                engine.render_tile(values_flat, coef, sigma_eff, tile, agg_dtype, write, workspace, weights_kernel)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is retried
            if not is_out_of_memory(exc):
                raise
            queue[0:0] = halve_tile(tile, exc, "rendering")
            workspace = engine.workspace()
            release_cached_memory(engine.device)
            continue
        nblocks = tile_blocks(tile)
        done += nblocks
        if memlog is not None:
            seconds = time.perf_counter() - t0
            memlog.keep(stage, workspace.nbytes)
            memlog.add(TileRecord(stage, *tile, per_block * nblocks, meter.peak, seconds, allocated_per_block * nblocks))
        report(progress, done, total, stage=stage)


def area_lr_guide(guide: Guide, lr_shape: Tuple[int, int], device: torch.device) -> torch.Tensor:
    """The guide averaged over each LR cell's block of HR pixels (a box average; for an
    integer scale exactly ``avg_pool2d``), the way a ViT token summarises its patch."""
    (H, W), (h, w) = guide.shape, lr_shape
    rows, cols = AxisBlocks.build(H, h), AxisBlocks.build(W, w)
    col_cell = torch.repeat_interleave(torch.arange(w), cols.count).to(device)
    out = torch.zeros(guide.channels, h, w, dtype=torch.float64, device=device)
    all_cols = torch.arange(W)
    for i in range(h):
        r0, n = int(rows.start[i]), int(rows.count[i])
        band = guide.gather(torch.arange(r0, r0 + n), all_cols, device).to(torch.float64).sum(1)  # [G, W]
        out[:, i].index_add_(1, col_cell, band)
    out /= (rows.count[:, None] * cols.count[None, :]).to(device, torch.float64)
    return out.to(torch.float32)


def bicubic_lr_guide(guide: Guide, lr_shape: Tuple[int, int], device: torch.device) -> torch.Tensor:
    """The fit's input: the guide bicubically resized to (h, w), align_corners=False."""
    (H, W), (h, w) = guide.shape, lr_shape
    ty = cubic_taps(torch.arange(h), H, h)
    tx = cubic_taps(torch.arange(w), W, w)
    return resample(guide.gather_fn(device), ty, tx).to(device)


def pixel_weight_map(engine: BlockEngine, field: KernelField, y: int, x: int) -> np.ndarray:
    """``(h, w)`` float64 map of HR pixel ``(y, x)``'s weights over the LR grid (sums to one)."""
    weights, cells = engine.pixel_weights(field, y, x)
    h, w = engine.lr_shape
    out = np.zeros(h * w, np.float64)
    np.add.at(out, cells.numpy(), weights.double().numpy())
    return out.reshape(h, w)
