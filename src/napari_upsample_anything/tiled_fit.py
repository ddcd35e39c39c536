"""Kernel fits of images too large for one fit: overlapping tiles, fitted independently, stitched.

The fit costs time linear in the pixel count (about 27 s per Adam step at 2048^2 on one CPU
core), so a whole-slide image or a large mosaic is fitted as many small, independent fits
that can run on different workers (:func:`napari_upsample_anything.distributed.execute`):

1. :func:`plan_fit_tiles` splits the LR grid into tiles of ``tile_cells`` x ``tile_cells``
   LR cells. Each tile is extended by ``halo`` LR cells on every side (clipped at the image
   border); the tile's HR region is the union of the HR blocks of its extended cells, taken
   from the whole image's block geometry (:class:`~.core.grid.AxisBlocks`), so tile edges always
   fall on LR-cell edges, for integer and non-integer scales alike.
2. :func:`fit_tile` fits the kernel field of one extended tile with
   :func:`napari_upsample_anything.api.fit_kernels` on that HR region and keeps the interior
   cells. The guide is normalised with the *whole* image's rule (computed once by the
   planner), so a tile sees the same pixel values as the whole-image fit.
3. :func:`stitch` assembles the interiors into one :class:`~.core.field.KernelField` of the whole
   LR grid, refusing gaps and overlaps.

Why this is an approximation, and when it is exact: in one Adam step the gradient of a
kernel depends on the HR pixels within its render radius (``R_max`` LR cells), whose values
depend on the kernels within ``R_max`` cells of them; after ``t`` steps a kernel depends on
pixels up to ``2 R_max t`` cells away, i.e. on the whole image for the published 51 steps.
A halo only truncates that far, weak dependence. With a halo that covers the whole grid every
tile *is* the whole-image problem, so the tiled fit equals the whole fit bit for bit (same
inputs, same arithmetic). Also approximate: with a non-integer scale a tile's own scale
(HR pixels / LR cells of the tile) differs from the image's by less than one HR pixel per
tile, so its cell centres move by a fraction of a pixel; the halo absorbs the border effects
of the fit's LR input (bicubic) and of the guide smoothing. docs/scale.md measures the
difference for several halos and gives the reason for :data:`DEFAULT_HALO`.

Render is exact given the field: render the whole image with the stitched field.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .core.field import KernelField
from .core.grid import AxisBlocks
from .core.guide import Normalize, normalization_affine, validate_image
from .core.progress import CancelFn, ProgressFn

DEFAULT_HALO = 8  # LR cells; chosen from the measurement in docs/scale.md
_NAMES = ("sigma_x", "sigma_y", "theta", "sigma_r")

Rect = Tuple[int, int, int, int]  # [r0, r1) x [c0, c1)


@dataclass(frozen=True)
class FitTile:
    """One tile of a tiled fit (all ranges half-open).

    Attributes
    ----------
    index : int
        Row-major position of the tile.
    cells : (i0, i1, j0, j1)
        The LR cells whose kernels this tile provides (its interior).
    ext : (a0, a1, b0, b1)
        The LR cells it fits: ``cells`` grown by the halo, clipped to the grid.
    hr : (y0, y1, x0, x1)
        The HR pixels of the blocks of ``ext`` (the guide region the tile reads).
    """

    index: int
    cells: Rect
    ext: Rect
    hr: Rect

    @property
    def ext_shape(self) -> Tuple[int, int]:
        return self.ext[1] - self.ext[0], self.ext[3] - self.ext[2]

    @property
    def hr_shape(self) -> Tuple[int, int]:
        return self.hr[1] - self.hr[0], self.hr[3] - self.hr[2]


def plan_fit_tiles(
    hr_shape: Tuple[int, int], lr_shape: Tuple[int, int], tile_cells: int, halo: int = DEFAULT_HALO
) -> List[FitTile]:
    """Split an ``(h, w)`` LR grid over an ``(H, W)`` image into overlapping fit tiles.

    Parameters
    ----------
    hr_shape : (H, W)
        Guide size in pixels.
    lr_shape : (h, w)
        LR grid of the field, ``h <= H``, ``w <= W``.
    tile_cells : int
        Interior size of a tile in LR cells (edge tiles may be smaller).
    halo : int
        Extra LR cells fitted on every side of a tile and then dropped (clipped at borders).

    Returns
    -------
    list of FitTile, row-major.
    """
    (H, W), (h, w) = (int(hr_shape[0]), int(hr_shape[1])), (int(lr_shape[0]), int(lr_shape[1]))
    if h < 1 or w < 1 or h > H or w > W:
        raise ValueError(f"lr_shape={lr_shape} must be between (1, 1) and hr_shape={hr_shape}")
    if int(tile_cells) != tile_cells or tile_cells < 1:
        raise ValueError(f"tile_cells={tile_cells!r}: give the tile size as an int >= 1 (LR cells)")
    if int(halo) != halo or halo < 0:
        raise ValueError(f"halo={halo!r}: give the halo as an int >= 0 (LR cells)")
    rows, cols = AxisBlocks.build(H, h), AxisBlocks.build(W, w)
    tiles: List[FitTile] = []
    for i0 in range(0, h, tile_cells):
        i1 = min(i0 + tile_cells, h)
        a0, a1 = max(0, i0 - halo), min(h, i1 + halo)
        y0, y1 = rows.hr_range(a0, a1)
        for j0 in range(0, w, tile_cells):
            j1 = min(j0 + tile_cells, w)
            b0, b1 = max(0, j0 - halo), min(w, j1 + halo)
            x0, x1 = cols.hr_range(b0, b1)
            tiles.append(FitTile(len(tiles), (i0, i1, j0, j1), (a0, a1, b0, b1), (y0, y1, x0, x1)))
    return tiles


@dataclass(frozen=True)
class TileFitTask:
    """Everything one worker needs to fit one tile (picklable).

    ``guide`` is the whole channels-last image: a numpy array for serial runs, or a
    file-backed array that pickles by reference (a zarr array) so that each worker reads only
    its region. ``offset``/``scale``/``clip`` are the whole image's normalisation
    (:func:`~.core.guide.normalization_affine`); ``fit_options`` go to ``api.fit_kernels``.
    """

    tile: FitTile
    guide: Any
    offset: Tuple[float, ...]
    scale: Tuple[float, ...]
    clip: bool
    rule: str = ""  # the normalisation rule's name, for the stitched field's metadata
    fit_options: Dict[str, Any] = field(default_factory=dict)


def normalized_region(task: TileFitTask) -> np.ndarray:
    """The tile's HR region, normalised like the whole image: float32 ``(h, w, G)``.

    Same float32 arithmetic as :meth:`~.core.guide.Guide.gather` (cast, subtract the offset,
    multiply by the scale, clip), so a tile's pixels equal the whole fit's pixels bit for bit.
    """
    y0, y1, x0, x1 = task.tile.hr
    region = task.guide[y0:y1, x0:x1]
    block = (
        region.detach().cpu() if isinstance(region, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(np.asarray(region)))
    )
    block = block.to(torch.float32)
    if block.ndim == 2:
        block = block[:, :, None]
    block = (block - torch.tensor(task.offset, dtype=torch.float32)) * torch.tensor(task.scale, dtype=torch.float32)
    if task.clip:
        block = block.clamp_(0.0, 1.0)
    return block.numpy()


def fit_tile(task: TileFitTask, progress: Optional[ProgressFn] = None, cancel: Optional[CancelFn] = None) -> Dict[str, Any]:
    """Fit one tile (runs in any process); returns its interior kernel maps and a summary.

    Returns
    -------
    dict with ``tile`` (the FitTile), ``maps`` ({name: float32 (i1-i0, j1-j0)}),
    ``final_loss``, ``seconds``, ``peak_rss`` (bytes, VmHWM of the process so far) and ``pid``.
    """
    from .api import fit_kernels  # the public entry point validates options the same way for every tile

    t0 = time.perf_counter()
    tile = task.tile
    region = normalized_region(task)
    fitted = fit_kernels(region, tile.ext_shape, normalize="none", progress=progress, cancel=cancel, **task.fit_options)
    i0, i1, j0, j1 = tile.cells
    a0, _, b0, _ = tile.ext
    maps = {n: getattr(fitted, n)[i0 - a0 : i1 - a0, j0 - b0 : j1 - b0].detach().cpu().numpy().astype(np.float32) for n in _NAMES}
    return {
        "tile": tile,
        "maps": maps,
        "final_loss": fitted.meta.get("final_loss"),
        "seconds": time.perf_counter() - t0,
        "peak_rss": peak_rss_bytes(),
        "pid": os.getpid(),
    }


def peak_rss_bytes() -> int:
    """VmHWM (peak resident set size) of this process in bytes; 0 where /proc is missing."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def stitch(lr_shape: Tuple[int, int], results: Sequence[Dict[str, Any]], meta: Optional[Dict] = None) -> KernelField:
    """One :class:`KernelField` of the whole ``(h, w)`` grid from the tiles' interior maps.

    Raises ValueError when a cell is covered by no tile (a failed or missing tile) or by two.
    """
    h, w = int(lr_shape[0]), int(lr_shape[1])
    out = {n: np.full((h, w), np.nan, np.float32) for n in _NAMES}
    count = np.zeros((h, w), np.int32)
    for res in results:
        i0, i1, j0, j1 = res["tile"].cells
        count[i0:i1, j0:j1] += 1
        for n in _NAMES:
            out[n][i0:i1, j0:j1] = res["maps"][n]
    if (count != 1).any():
        missing, twice = int((count == 0).sum()), int((count > 1).sum())
        raise ValueError(
            f"tiles do not cover the LR grid {lr_shape} exactly once: {missing} cell(s) missing, "
            f"{twice} covered more than once; give the results of every tile of one plan_fit_tiles() plan"
        )
    return KernelField(**{n: torch.from_numpy(out[n]) for n in _NAMES}, meta=dict(meta or {}))


def fit_cache_bytes(hr_shape: Tuple[int, int], guide_channels: int) -> int:
    """Bytes the fit keeps per image to run fast (its per-pixel feature cache, float32)."""
    H, W = hr_shape
    m = 7 + guide_channels
    return int(H) * int(W) * (m + 2 * guide_channels + 1) * 4


def choose_tile_cells(
    hr_shape: Tuple[int, int], lr_shape: Tuple[int, int], guide_channels: int, budget: int, halo: int = DEFAULT_HALO
) -> Optional[int]:
    """The tile size (LR cells) for a fit within ``budget`` bytes, or None for a whole-image fit.

    The whole image is fitted at once when its fit cache plus a float32 copy of the guide fit
    in half the budget (the fit itself keeps the other half for its working tiles); otherwise
    the largest square tile whose extended region (tile + 2 halo) does.
    """
    H, W = hr_shape
    h, w = lr_shape
    per_pixel = fit_cache_bytes((1, 1), guide_channels) + 4 * guide_channels
    if H * W * per_pixel <= budget // 2:
        return None
    pixels_per_cell = (H / h) * (W / w)
    side = math.isqrt(max(1, int(budget // 2 / per_pixel / pixels_per_cell)))  # extended tile side, cells
    return max(1, side - 2 * halo)


def plan_tile_tasks(
    guide: Any,
    lr_shape: Tuple[int, int],
    tile_cells: int,
    halo: int = DEFAULT_HALO,
    normalize: Normalize = "auto",
    **fit_options: Any,
) -> List[TileFitTask]:
    """The picklable per-tile fit tasks of a tiled fit (see :func:`fit_tiled`)."""
    if not hasattr(guide, "shape") or not hasattr(guide, "dtype") or not hasattr(guide, "__getitem__"):
        raise TypeError(f"guide must be an array (numpy, torch, zarr, dask), got {type(guide).__name__}")
    if len(guide.shape) not in (2, 3):
        raise ValueError(f"guide must be (H, W) or (H, W, G) channels-last, got shape {tuple(guide.shape)}")
    probe = guide if isinstance(guide, (np.ndarray, torch.Tensor)) else None
    if probe is None:
        # Only the uint8 / bool / 'unit' / (lo, hi) rules can be decided from the dtype alone;
        # the others need the values (read once here).
        dtype = np.dtype(guide.dtype)
        from_dtype = (
            isinstance(normalize, (tuple, list))
            or normalize in ("none", "unit")
            or (normalize == "auto" and dtype in (np.uint8, np.bool_))
        )
        probe = np.empty((1,) * len(guide.shape), dtype) if from_dtype else np.asarray(guide)
        if from_dtype and len(guide.shape) == 3:
            probe = np.empty((1, 1, guide.shape[2]), dtype)
    else:
        validate_image(probe, "guide")
    offset, scale, clip, rule = normalization_affine(probe, normalize)
    hr_shape = (int(guide.shape[0]), int(guide.shape[1]))
    tiles = plan_fit_tiles(hr_shape, lr_shape, tile_cells, halo)
    offset_t = tuple(float(v) for v in np.asarray(offset, np.float32))
    scale_t = tuple(float(v) for v in np.asarray(scale, np.float32))
    return [TileFitTask(t, guide, offset_t, scale_t, bool(clip), rule, dict(fit_options)) for t in tiles]


def check_fit_options(guide_channels: int, fit_options: Dict[str, Any]) -> None:
    """Raise the error ``api.fit_kernels`` would raise for these options, before any tile runs.

    Bad options are the same for every tile: without this check each tile would fail (and be
    retried) on its own. Runs a zero-step fit of a 4 x 4 blank guide (milliseconds).
    """
    from .api import fit_kernels

    options = dict(fit_options)
    steps = options.pop("steps", 0)
    if not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps={steps!r}: give a non-negative int (published: 51)")
    for reserved in ("normalize", "init", "progress", "cancel"):
        if reserved in options:
            raise TypeError(f"{reserved}= cannot be given per tile; fit_tiled sets it (normalize= is fit_tiled's own argument)")
    fit_kernels(np.zeros((4, 4, guide_channels), np.float32), (1, 1), steps=0, normalize="none", **options)


def fit_tiled(
    guide: Any,
    lr_shape: Tuple[int, int],
    *,
    tile_cells: Optional[int] = None,
    halo: int = DEFAULT_HALO,
    normalize: Normalize = "auto",
    client: Any = None,
    retries: int = 2,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelFn] = None,
    execute_options: Optional[Dict[str, Any]] = None,
    **fit_options: Any,
) -> KernelField:
    """Fit the kernel field of ``guide`` tile by tile and stitch it (an approximation, see above).

    Parameters
    ----------
    guide : (H, W) or (H, W, G) array
        numpy / torch, or a zarr array (each worker then reads only its tiles' regions).
    lr_shape : (h, w)
        The LR grid.
    tile_cells : int or None
        Tile interior size in LR cells (:func:`plan_fit_tiles`). None: :func:`choose_tile_cells`
        for the fit's ``max_memory`` (default budget if not given), which keeps the whole-image
        fit (one tile) whenever it fits.
    halo : int
        Halo width in LR cells.
    normalize : the guide normalisation rule, applied with the whole image's statistics.
    client : None | "local" | "tcp://host:port" | distributed.Client
        Where the tiles run (:func:`napari_upsample_anything.distributed.execute`); None: here,
        one after the other.
    retries, progress, cancel :
        As in ``execute``: ``progress(done, total, info)`` counts finished tiles.
    execute_options : dict, optional
        More ``execute`` arguments (``n_workers``, ``memory_limit`` ...).
    **fit_options :
        ``api.fit_kernels`` options (steps, lr, radius, device, max_memory, guide_smoothing ...).

    Returns
    -------
    KernelField on the whole ``(h, w)`` grid; ``meta["tiled"]`` records the tiling, and
    ``meta["guide_smoothing"]`` the smoothing so that ``api.render`` uses the same.

    Raises
    ------
    RuntimeError (``TaskFailedError``) when a tile still fails after its retries.
    """
    from .distributed import execute, raise_for_failures

    lr_shape = (int(lr_shape[0]), int(lr_shape[1]))
    channels = 1 if len(getattr(guide, "shape", ())) != 3 else int(guide.shape[2])
    check_fit_options(channels, fit_options)
    if tile_cells is None:
        from .core.device import resolve_device
        from .core.memory import default_budget, parse_bytes

        budget = parse_bytes(fit_options.get("max_memory"))
        if budget is None:
            budget = default_budget(resolve_device(fit_options.get("device", "auto")))
        tile_cells = choose_tile_cells((int(guide.shape[0]), int(guide.shape[1])), lr_shape, channels, budget, halo)
        if tile_cells is None:  # the whole image fits: one tile, the whole-image fit
            tile_cells = max(lr_shape)
    tasks = plan_tile_tasks(guide, lr_shape, tile_cells, halo, normalize, **fit_options)
    outcomes = execute(
        tasks, fit_tile, client=client, retries=retries, progress=progress, cancel=cancel, **(execute_options or {})
    )
    raise_for_failures(outcomes)
    results = [o.result for o in outcomes]
    hr_shape = (int(guide.shape[0]), int(guide.shape[1]))
    meta = {
        "lr_shape": list(lr_shape),
        "hr_shape": list(hr_shape),
        "guide_channels": 1 if len(guide.shape) == 2 else int(guide.shape[2]),
        "guide_normalize": tasks[0].rule,
        "guide_smoothing": float(fit_options.get("guide_smoothing", 0.0) or 0.0),
        "downsample": fit_options.get("downsample", "bicubic"),
        "fit_fraction": float(fit_options.get("fit_fraction", 1.0)),
        "steps": fit_options.get("steps"),
        "tiled": {
            "tile_cells": int(tile_cells),
            "halo": int(halo),
            "n_tiles": len(tasks),
            "final_loss_per_tile": [r["final_loss"] for r in results],
            "seconds_per_tile": [r["seconds"] for r in results],
            "peak_rss_per_tile": [r["peak_rss"] for r in results],
            "pids": sorted({r["pid"] for r in results}),
        },
    }
    return stitch(lr_shape, results, meta)


def field_difference(a: KernelField, b: KernelField) -> Dict[str, float]:
    """How field ``a`` differs from the reference ``b``, cell by cell.

    Sigmas are compared as ``|log(a / b)|`` (0.01 is a 1% difference), median and 99th
    percentile over the cells. ``theta`` is an axis angle, compared modulo pi, and only where
    ``b`` is anisotropic (ratio > 1.2): the angle of a nearly round kernel means nothing.
    """
    out: Dict[str, float] = {}
    for n in ("sigma_x", "sigma_y", "sigma_r"):
        d = torch.log(getattr(a, n).double() / getattr(b, n).double()).abs()
        out[f"{n}_log_median"] = float(d.median())
        out[f"{n}_log_p99"] = float(torch.quantile(d.flatten(), 0.99))
    dth = torch.remainder(a.theta.double() - b.theta.double() + math.pi / 2, math.pi) - math.pi / 2
    aniso = b.anisotropy() > 1.2
    vals = dth.abs()[aniso]
    out["theta_median_deg"] = float(torch.rad2deg(vals.median())) if vals.numel() else 0.0
    return out


__all__ = [
    "DEFAULT_HALO",
    "FitTile",
    "TileFitTask",
    "choose_tile_cells",
    "field_difference",
    "fit_tile",
    "fit_tiled",
    "plan_fit_tiles",
    "plan_tile_tasks",
    "stitch",
]
