"""Cost of a run told before it starts: time and memory from a quick measurement on this machine.

No Qt; torch imported lazily (this runs in a widget's background thread).

How
---
:func:`measure_rates` times the engine on a small synthetic crop (112 x 112 pixels, an 8 x 8
LR grid: the published 14-pixel cells) with the run's device, precision and thread count:

* one and four Adam steps of the kernel fit -> seconds per step (the slope) and the fixed
  cost of a fit (the rest); on two crops (8 x 8 and 16 x 16 LR cells), so that a step's cost
  splits into a part per HR pixel and a fixed part per step (the Python, Adam and kernel-launch
  work around the kernel: a quarter of a step on the small crop, nothing on a large image);
* renders of 3 and 384 channels on the large crop into fresh output arrays (after a warm-up
  render; 384: ViT-S's width, so the product runs at the size most runs use; fresh outputs:
  a run's first write into its output touches new pages, at 512^2 a quarter of the render)
  -> seconds per HR pixel, and per HR pixel and channel;
* a matrix product shaped like a ViT block's MLP on 4096 tokens -> the backbone's multiply-adds
  per second (with 1024 tokens the product ran at 40 % of the large images' ViT rate on an
  AMD EPYC);
* one ViT-S block on 16 tokens -> a block's fixed cost, whatever the image (on small planes
  of a stack the backbone's per-block overhead outweighs its arithmetic);
* the PCA basis of 384-channel features (a 384 x 384 eigendecomposition): once per run,
  whatever the image size, and on a busy machine it can cost seconds (numpy's BLAS threads).

Every HR pixel meets the same number of neighbour cells (the published border rule repeats
border cells), so the fit and render work per pixel does not depend on the image size: the
crop's rates scale by pixels. The backbone's work is ``2 x parameters x tokens`` plus the
attention, ``4 x tokens^2 x width`` per block (a ViT block runs at the matrix product's rate
once its attention is counted: docs/benchmarks_estimate.md).

Time on a busy machine: with one CPU thread each try is timed in CPU seconds (what the work
costs, whatever else runs), and the rates carry the ratio of wall-clock to CPU seconds over
the measurement (:attr:`Rates.slowdown`): the share of a core this process got. The estimate
is the CPU cost times that slowdown, so a machine that is busy while the rates are measured
gets a longer estimate (and the text says so). Otherwise (GPU, several threads) tries are
timed by the wall clock, the faster of two.

Memory: the arrays a run keeps (guide, LR features, HR PCA, HR features when kept in memory)
plus the largest working set of one stage, from the engine's own accounting of the crop's
runs (:mod:`..core.engine.footprint`, through the memory log): what a stage keeps across tiles
(the fit's prepared inputs and parameters: per pixel) plus its largest tile (bytes per pixel
times the tile's pixels). Tiles stop growing where the *planner's* bytes reach the tile size
the engine stops at (on the CPU ``core.engine.blocks.CPU_PREFERRED_TILE_BYTES``) or the budget:
the planner sizes tiles by an upper bound (the eager path's), while the fused kernels allocate
much less per tile. Fit and render are not alive at the same time, so the working set is the
larger of the two, not their sum.

The rates are cached per (device, precision, threads) for five minutes (the load changes).
Model loading (and downloading weights) is not included: it happens once per session.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from ..core.published import PUBLISHED_STEPS
from ..core.units import format_bytes

CancelFn = Callable[[], bool]

#: Parameters of the DINOv2 backbones (and timm ViTs of the same sizes), by size letter.
BACKBONE_PARAMS = {"s": 22e6, "b": 86e6, "l": 304e6, "g": 1.1e9}
#: Embedding width by size letter (the channel count of the features).
BACKBONE_DIMS = {"s": 384, "b": 768, "l": 1024, "g": 1536}
#: Transformer blocks by size letter (the attention's cost is per block).
BACKBONE_DEPTHS = {"s": 12, "b": 12, "l": 24, "g": 40}
#: The estimate says the machine is busy when the measured slowdown is above this.
BUSY_SLOWDOWN = 1.3
PATCH = 14
#: Channels of the wide render and of the PCA-basis measurement (ViT-S's width).
WIDE = 384
CROP_CELLS = 8  # the measurement crop is CROP_CELLS x CROP_CELLS LR cells of PATCH pixels
#: A measurement older than this (seconds) is repeated: the machine's load changes.
RATES_MAX_AGE = 300.0

_RATES: Dict[tuple, Rates] = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class Rates:
    """Costs measured on this machine for one (device, precision, threads)."""

    fit_step_per_px: float  # s per Adam step per HR pixel
    fit_fixed: float  # s per fit, whatever the steps
    render_per_px: float  # s per HR pixel (weights), any channel count
    render_per_px_channel: float  # s per HR pixel and channel
    flops: float  # 2 x multiply-adds per second of a ViT-like matrix product
    fit_planned_per_px: float  # planned working bytes of a fit tile per HR pixel (memory planner)
    render_planned_per_px_channel: float  # planned working bytes of a render tile per HR pixel and channel
    measured_in: float  # seconds the measurement took
    measured_at: float = 0.0  # time.monotonic() when measured
    tile_cap_bytes: float = math.inf  # largest tile the engine plans on this device (CPU: preferred tile size)
    slowdown: float = 1.0  # wall-clock / CPU seconds of the measurement (1: rates are wall-clock seconds)
    pca_basis: float = 0.0  # s to fit the PCA basis of 384-channel features (once per run; grows as C^3)
    block_fixed: float = 0.0  # s of one transformer block on a handful of tokens (per block, per plane)
    fit_step_fixed: float = 0.0  # s per Adam step, whatever the pixels
    # the engine's accounting of what the paths really allocate (memory log, core.engine.footprint)
    fit_resident_per_px: float = 0.0  # bytes a fit keeps across steps, per HR pixel of the image
    fit_tile_per_px: float = 0.0  # bytes a fit tile allocates per HR pixel of the tile
    render_resident: float = 0.0  # bytes a render keeps for every tile (workspace), any channel count
    render_resident_per_channel: float = 0.0  # ... and per channel (its chunk buffers of values and products)
    render_tile_per_px: float = 0.0  # bytes a render tile allocates per HR pixel, any channel count
    render_tile_per_px_channel: float = 0.0  # ... and per HR pixel and channel
    render_planned_per_px: float = 0.0  # planned bytes of a render tile per HR pixel, any channel count


@dataclass
class CostEstimate:
    """Estimated cost of a run: seconds per stage and bytes."""

    seconds: Dict[str, float] = field(default_factory=dict)
    working_bytes: int = 0  # the engine's working memory (tiles), at most the budget
    kept_bytes: int = 0  # arrays the run keeps in memory (guide, features, PCA, HR features)
    disk_bytes: int = 0  # HR features memory-mapped to a temporary file
    threads: int = 1
    slowdown: float = 1.0  # the machine's measured slowdown, already in ``seconds``

    @property
    def total_seconds(self) -> float:
        return float(sum(self.seconds.values()))

    @property
    def peak_bytes(self) -> int:
        return int(self.working_bytes + self.kept_bytes)

    def text(self) -> str:
        """One line for the widget, e.g. ``'about 2 min 10 s, 1.2 GiB memory (fit 1 min 50 s, ...)'``."""
        parts = ", ".join(f"{k} {format_seconds(v)}" for k, v in self.seconds.items() if v >= 0.05)
        disk = f", {format_bytes(self.disk_bytes)} on disk" if self.disk_bytes else ""
        busy = f"; the machine is busy: x{self.slowdown:.1f}" if self.slowdown > BUSY_SLOWDOWN else ""
        return f"about {format_seconds(self.total_seconds)}, {format_bytes(self.peak_bytes)} memory{disk} ({parts}{busy})"


def format_seconds(s: float) -> str:
    """``0.4 s``, ``12 s``, ``3 min 5 s``, ``25 min``, ``1 h 15 min``."""
    if s < 1:
        return f"{s:.1f} s"
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        m, sec = divmod(int(round(s)), 60)
        return f"{m} min {sec} s" if m < 10 else f"{m} min"
    h, rest = divmod(int(round(s)), 3600)
    return f"{h} h {rest // 60} min"


def backbone_size(name: str) -> str:
    """Size letter ``s``/``b``/``l``/``g`` of a backbone name (``dinov2_vitb14``, ``vit_large_...``); ``s`` when unknown."""
    n = name.lower()
    for letter, word in (("g", "giant"), ("l", "large"), ("b", "base"), ("s", "small")):
        if f"vit{letter}" in n or word in n:
            return letter
    return "s"


def lr_grid(hr_shape: Tuple[int, int], input_size: Optional[int]) -> Tuple[int, int]:
    """The patch-token grid the backbone gives an ``hr_shape`` image (as ``extract_features`` does)."""
    H, W = hr_shape
    if input_size:
        f = int(input_size) / max(H, W)
        H, W = max(1, math.floor(H * f + 0.5)), max(1, math.floor(W * f + 0.5))
    return max(1, math.floor(H / PATCH + 0.5)), max(1, math.floor(W / PATCH + 0.5))


def _crop_guide(n: int) -> np.ndarray:
    """A deterministic image with edges and smooth parts (the cost hardly depends on the content)."""
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
    img = np.stack([np.sin(7 * xx) * 0.5 + 0.5, (yy > 0.5).astype(np.float32), np.cos(5 * (xx + yy)) * 0.5 + 0.5], -1)
    return (img * 255).astype(np.uint8)


def measure_rates(device: str = "cpu", precision: str = "auto", threads: int = 1, cancel: Optional[CancelFn] = None) -> Rates:
    """Time the engine on a small crop (see the module docstring); cached per (device, precision, threads).

    Call it with torch already limited to ``threads`` (the widgets run it through
    ``call_with_threads``); ``threads`` is the cache key.
    """
    from ..core.platform_fixes import preload_triton_safely

    preload_triton_safely()
    import torch

    from .. import api
    from ..core.device import resolve_device
    from ..core.errors import Cancelled
    from ..core.memory import MemoryLog

    dev = resolve_device(device)
    key = (str(dev), precision, int(threads))
    with _LOCK:
        cached = _RATES.get(key)
        if cached is not None and time.monotonic() - cached.measured_at < RATES_MAX_AGE:
            return cached
    t_start = time.perf_counter()
    # one CPU thread: CPU seconds (the work's cost, whatever else runs) and the slowdown apart
    cpu_clock = dev.type == "cpu" and int(threads) == 1
    spent = {"cpu": 0.0, "wall": 0.0}
    n = CROP_CELLS * PATCH
    guide = _crop_guide(n)
    lr = (CROP_CELLS, CROP_CELLS)
    px = float(n * n)

    def check() -> None:
        if cancel is not None and cancel():
            raise Cancelled("cost estimate cancelled")

    def timed(fn):
        c, t = time.process_time(), time.perf_counter()
        out = fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        cpu, wall = time.process_time() - c, time.perf_counter() - t
        spent["cpu"] += cpu
        spent["wall"] += wall
        return (cpu if cpu_clock else wall), out

    common = dict(device=dev, precision=precision, cancel=cancel)

    def fit_costs(crop_guide, crop_lr):
        """Seconds of one step and of the rest of a fit on a crop (fastest of two tries each:
        other processes only ever make a try slower) and its 3-step field."""
        api.fit_kernels(crop_guide, crop_lr, steps=1, **common)  # warm-up (first-call allocations, kernel caches)
        check()
        t1 = min(timed(lambda: api.fit_kernels(crop_guide, crop_lr, steps=1, **common))[0] for _ in range(3))
        check()
        t4, fitted = timed(lambda: api.fit_kernels(crop_guide, crop_lr, steps=4, memory_log=log, **common))
        check()
        t4 = min([t4] + [timed(lambda: api.fit_kernels(crop_guide, crop_lr, steps=4, **common))[0] for _ in range(2)])
        check()
        one_step = max((t4 - t1) / 3.0, t4 / 8.0)  # a noisy slope never makes a step cheaper than an eighth of a 4-step fit
        return one_step, max(t4 - 4 * one_step, 0.0), fitted

    # the large crop: 4x the pixels, and a padded grid (224 pixels over 17 cells of 13-14), the
    # layout of most images (an HR size that is not a multiple of the LR size)
    big_n, big_lr = 2 * n, (2 * CROP_CELLS + 1, 2 * CROP_CELLS + 1)
    big_guide, big_px = _crop_guide(big_n), float(big_n * big_n)
    log = MemoryLog()
    big_step, _, big_fld = fit_costs(big_guide, big_lr)
    log = MemoryLog()  # the small crop's (read by fit_costs): the fit's bytes per pixel come from it
    step, fixed, _ = fit_costs(guide, lr)
    # a step = a fixed part + a part per pixel: the two crops give both (4x the pixels)
    step_per_px = max((big_step - step) / (big_px - px), step / px / 4.0)
    step_fixed = max(step - step_per_px * px, 0.0)
    rng = np.random.default_rng(0)
    small = rng.random((3,) + big_lr).astype(np.float32)
    wide = rng.random((WIDE,) + big_lr).astype(np.float32)

    def render_into_fresh_output(values, memory_log=None):
        # a new output array each time, as a run's: writing it first touches its pages
        out = np.empty((values.shape[0], big_n, big_n), np.float32)
        api.render(values, big_guide, big_fld, out=out, memory_log=memory_log, **common)

    render_into_fresh_output(small)  # warm-up, as for the fit: first-call costs are not per pixel
    check()
    slog = MemoryLog()
    r3, _ = timed(lambda: render_into_fresh_output(small, slog))
    r3 = min(r3, timed(lambda: render_into_fresh_output(small))[0])
    check()
    rlog = MemoryLog()
    rwide, _ = timed(lambda: render_into_fresh_output(wide, rlog))
    check()
    rwide = min(rwide, timed(lambda: render_into_fresh_output(wide))[0])
    check()
    per_channel = max((rwide - r3) / (WIDE - 3), rwide / WIDE / 4.0)
    per_px = max(r3 - 3 * per_channel, 0.0) / big_px
    from ..core.pca import fit_pca

    block_fixed = _block_overhead(dev, timed)
    check()
    lr_feats = rng.random((WIDE, 16, 16)).astype(np.float32)
    pca_basis = min(timed(lambda: fit_pca(lr_feats, 3))[0] for _ in range(2))
    check()
    # a ViT MLP-like product (tokens x D @ D x 4D) in the run's thread setting
    tokens = 4096
    a = torch.randn(tokens, 384, device=dev)
    b = torch.randn(384, 1536, device=dev)
    a @ b
    reps = 3
    tm = min(timed(lambda: [a @ b for _ in range(reps)])[0] for _ in range(2))
    flops = 2 * tokens * 384 * 1536 * reps / max(tm, 1e-9)
    try:  # the engine's tile cap (CPU): a run's working set stops growing there
        from ..core.engine.blocks import CPU_PREFERRED_TILE_BYTES

        cap = float(CPU_PREFERRED_TILE_BYTES) if dev.type == "cpu" else math.inf
    except ImportError:  # pragma: no cover - the engine moved the constant: no cap rather than a wrong one
        cap = math.inf
    slowdown = max(1.0, spent["wall"] / max(spent["cpu"], 1e-9)) if cpu_clock else 1.0
    # bytes: two channel counts give the per-pixel and per-channel parts (a straight line)
    alloc_slope = (rlog.peak_allocated_bytes - slog.peak_allocated_bytes) / big_px / (WIDE - 3)
    plan_slope = (rlog.peak_planned_bytes - slog.peak_planned_bytes) / big_px / (WIDE - 3)
    resident_slope = (rlog.resident_bytes - slog.resident_bytes) / (WIDE - 3)
    rates = Rates(
        fit_step_per_px=step_per_px,
        fit_fixed=fixed,
        fit_step_fixed=step_fixed,
        render_per_px=per_px,
        render_per_px_channel=per_channel / big_px,
        flops=flops,
        fit_planned_per_px=float(log.peak_planned_bytes) / px,
        render_planned_per_px_channel=plan_slope,
        measured_in=time.perf_counter() - t_start,
        measured_at=time.monotonic(),
        tile_cap_bytes=cap,
        slowdown=slowdown,
        pca_basis=pca_basis,
        block_fixed=block_fixed,
        fit_resident_per_px=float(log.resident_bytes) / px,
        fit_tile_per_px=float(log.peak_allocated_bytes) / px,
        # a straight line through the two renders, as for the tiles: a few channels keep nothing (the
        # kernel aggregates them), many keep chunk buffers of gathered values and products
        render_resident=max(0.0, slog.resident_bytes - 3 * resident_slope),
        render_resident_per_channel=resident_slope,
        render_tile_per_px=max(0.0, slog.peak_allocated_bytes / big_px - 3 * alloc_slope),
        render_tile_per_px_channel=alloc_slope,
        render_planned_per_px=max(0.0, slog.peak_planned_bytes / big_px - 3 * plan_slope),
    )
    with _LOCK:
        _RATES[key] = rates
    return rates


def _block_overhead(dev, timed) -> float:
    """Seconds of one ViT-S block (timm's, random weights) on 16 tokens: the per-block overhead.

    0 when timm's block cannot be built (then only the backbone's arithmetic is counted).
    """
    import torch

    try:
        from timm.models.vision_transformer import Block
    except ImportError:  # pragma: no cover - timm is a dependency
        return 0.0
    torch.manual_seed(0)
    block = Block(WIDE, 6, qkv_bias=True).eval().to(dev)
    x = torch.randn(1, 16, WIDE, device=dev)

    def run():
        with torch.inference_mode():
            block(x)

    run()  # warm-up
    return min(timed(run)[0] for _ in range(3))


def cached_rates(device: str, precision: str, threads: int) -> Optional[Rates]:
    """The rates already measured for this setting, or None (no measurement is started)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None:
        return None
    from ..core.device import resolve_device

    try:
        key = (str(resolve_device(device)), precision, int(threads))
    except (ValueError, TypeError, RuntimeError):
        return None
    with _LOCK:
        cached = _RATES.get(key)
    return cached if cached is not None and time.monotonic() - cached.measured_at < RATES_MAX_AGE else None


def clear_rates() -> None:
    with _LOCK:
        _RATES.clear()


def estimate_fit(rates: Rates, hr_shape: Tuple[int, int], steps: int, fit_fraction: float = 1.0) -> float:
    """Seconds of one kernel fit of ``steps`` steps on an ``hr_shape`` image.

    A stochastic fit (``fit_fraction < 1``) does that fraction of a step's pixel work and all of its
    fixed part (``fit_step_fixed``: the work around the kernel, whatever the pixels).
    """
    work = rates.fit_step_per_px * float(hr_shape[0] * hr_shape[1]) * int(steps) * float(fit_fraction)
    return rates.fit_fixed + rates.fit_step_fixed * int(steps) + work


def backbone_flops(size: str, tokens: float) -> float:
    """Floating-point operations of one forward pass of a ViT of ``size`` over ``tokens`` tokens:
    ``2 x parameters x tokens`` (the matrix products) plus ``4 x tokens^2 x width`` per block (attention)."""
    return 2.0 * BACKBONE_PARAMS[size] * tokens + BACKBONE_DEPTHS[size] * 4.0 * tokens * tokens * BACKBONE_DIMS[size]


def tile_pixels(planned_per_px: float, px: float, cap_bytes: float) -> float:
    """HR pixels of a stage's largest tile: the whole image, or as many as the planner's bytes
    (``planned_per_px`` each) allow under ``cap_bytes`` (the engine's tile cap or the budget)."""
    if planned_per_px <= 0:
        return px
    return min(px, cap_bytes / planned_per_px)


def working_bytes(rates: Rates, px: float, channels: int, budget_bytes: Optional[int] = None) -> float:
    """The engine's largest working set of a run on ``px`` HR pixels, rendering up to ``channels`` channels.

    Per stage: what it keeps across tiles plus its largest tile, by the engine's accounting
    (see the module docstring); tiles are as large as the planner makes them (up to the tile cap
    and the budget). Fit and render are never alive together: the larger of the two.
    """
    budget = float(budget_bytes) if budget_bytes else math.inf
    cap = min(float(rates.tile_cap_bytes), budget)
    # the fit keeps its prepared inputs only while they take at most half the budget
    fit_kept = min(rates.fit_resident_per_px * px, budget / 2)
    fit = fit_kept + rates.fit_tile_per_px * tile_pixels(rates.fit_planned_per_px, px, cap)
    render_planned = rates.render_planned_per_px + rates.render_planned_per_px_channel * channels
    render_tile = tile_pixels(render_planned, px, cap)
    render_kept = rates.render_resident + rates.render_resident_per_channel * channels
    render = render_kept + (rates.render_tile_per_px + rates.render_tile_per_px_channel * channels) * render_tile
    return min(max(fit, render), budget)


def estimate_run(
    rates: Rates,
    hr_shape: Tuple[int, int],
    *,
    n_planes: int = 1,
    backbone: str = "dinov2_vits14",
    input_size: Optional[int] = None,
    steps: int = PUBLISHED_STEPS,
    fit_fraction: float = 1.0,
    hr_features: str = "auto",
    budget_bytes: Optional[int] = None,
    auto_in_memory_bytes: int = 2 * 2**30,
    threads: int = 1,
) -> CostEstimate:
    """Estimated seconds per stage and memory of a main-widget run (see the module docstring)."""
    H, W = (int(v) for v in hr_shape)
    px = float(H * W)
    h, w = lr_grid((H, W), input_size)
    size = backbone_size(backbone)
    C = BACKBONE_DIMS[size]
    tokens = float(h * w)
    features = backbone_flops(size, tokens) / max(rates.flops, 1.0) + BACKBONE_DEPTHS[size] * rates.block_fixed
    fit = estimate_fit(rates, (H, W), steps, fit_fraction)
    pca = px * (rates.render_per_px + 3 * rates.render_per_px_channel)
    keep = hr_features != "none"
    render = px * (rates.render_per_px + C * rates.render_per_px_channel) if keep else 0.0
    slow = max(1.0, float(rates.slowdown))
    est = CostEstimate(threads=threads, slowdown=slow)
    stages = (("features", features), ("fit", fit), ("pca", pca), ("render", render))
    est.seconds = {k: v * n_planes * slow for k, v in stages}
    est.seconds["pca"] += rates.pca_basis * (C / WIDE) ** 3 * slow  # one basis for all planes
    est.working_bytes = int(working_bytes(rates, px, C if keep else 3, budget_bytes))
    hr_bytes = 4 * C * px * n_planes
    in_memory = hr_features == "memory" or (hr_features == "auto" and hr_bytes <= auto_in_memory_bytes)
    kept = n_planes * (4 * 3 * px + 4 * C * tokens + 4 * 3 * px)  # guide, LR features, HR PCA
    est.kept_bytes = int(kept + (hr_bytes if keep and in_memory else 0))
    est.disk_bytes = int(hr_bytes if keep and not in_memory else 0)
    return est
