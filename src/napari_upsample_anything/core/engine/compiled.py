"""Fused per-pair work of fit and render, compiled for the CPU and the GPU from one source.

The eager engine (:mod:`.eager`) makes about 16 passes over ``[blocks, P, K]`` weight
tensors per fit step (spatial product, G range passes, softmax, aggregation and their
backward), most of them memory passes. Here the same formulas are written once as plain
tensor expressions over a *chunk* of blocks, and ``torch.compile`` (inductor) fuses them: C++
with OpenMP and vector instructions on the CPU (needs a C++ compiler), Triton on CUDA.

One fit chunk computes, for blocks ``b``, pixels ``p`` and neighbours ``k``::

    log_w = sum_j phi_j(p) psi_j(k) - rho(k) D(p, k)        (masked pairs: -inf)
    w     = softmax_k(log_w);  out_g(p) = sum_k w v_g(k)
    loss  = sum_p,g weight(p) |out_g(p) - target_g(p)|
    dlog_w = w (sum_g s_g(p) v_g(k) - sum_g s_g(p) out_g(p)),   s = weight * sign(out - target)
    dpsi_j(k) = sum_p phi_j(p) dlog_w;   drho(k) = -sum_p D(p, k) dlog_w

with ``D(p, k) = sum_g (I'_g(p) - J'_g(k))^2`` the parameter-free range term (computed as a
difference, never expanded: see docs/engine.md). ``D`` depends only on the guide; inside the
fused kernel recomputing it costs the same as loading a cached copy (docs/engine.md, "Design
measurements"), so the kernel recomputes it and needs no [H W, K] cache (the
eager path caches it, :class:`~..fit._TileCache`). The gradient is exact (not an
approximation): tests compare both paths with the float64 reference and with each other.

Shapes are static per compile (``dynamic=False``): callers pad the last chunk of a tile to
the chunk size (padding blocks have weight 0, so they add nothing to loss or gradients) and
always evaluate all K offsets (the dynamic radius becomes a mask), so one fit or render
compiles once per shape class ``(chunk, P, K, G)``, not once per tile.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Dict

import torch


# ---------------------------------------------------------------------------- formulas
# Per-pixel and per-neighbour inputs come channel-major ("structure of arrays": [B, 6, P],
# [B, G, K], ...): inductor vectorises the pair loops along pixels or neighbours, and a
# channel-last input then costs a strided gather per vector (a much slower fit step;
# docs/engine.md, "Design measurements").
def range_term(ic, jd) -> torch.Tensor:
    """``D [B, P, K] = sum_g (I'_g(p) - J'_g(k))^2`` from ``ic [B, G, P]`` and ``jd [B, G, K]``."""
    d = ic[:, 0, :, None] - jd[:, 0, None, :]
    dist = d * d
    for g in range(1, ic.shape[1]):
        d = ic[:, g, :, None] - jd[:, g, None, :]
        dist = dist + d * d
    return dist


def log_weights(phi, psi, rho, dist, r2_pix, r2_off, repeated) -> torch.Tensor:
    """Masked log-weights ``[B, P, K]``.

    ``phi [B, 6, P]`` (lx^2, lx ly, ly^2, lx, ly, 1), ``psi [B, 6, K]``, ``rho [B, K]``,
    ``dist [B, P, K]``, ``r2_pix [B, P]`` (squared dynamic radius per pixel, LR cells^2),
    ``r2_off [K]`` (squared length of each offset), ``repeated [B, K]`` bool (clamped border
    copies dropped by ``border="unique"``).
    """
    logits = phi[:, 0, :, None] * psi[:, None, 0, :]
    for j in range(1, 6):
        logits = logits + phi[:, j, :, None] * psi[:, None, j, :]
    logits = logits - rho[:, None, :] * dist
    drop = (r2_off[None, None, :] > r2_pix[:, :, None]) | repeated[:, None, :]
    return logits.masked_fill(drop, -math.inf)


def spatial_coefficients(coef, d_y, d_x) -> torch.Tensor:
    """``psi [B, 6, K]`` from the neighbours' ``coef [4, B, K]`` (A, B, C, rho) and offsets
    ``d_y, d_x [B, K]`` (HR pixels): the quadratic form in the block's local coordinates."""
    A, B, C = coef[0], coef[1], coef[2]
    ax = A * d_x + B * d_y
    cy = B * d_x + C * d_y
    return torch.stack([-A, -2 * B, -C, 2 * ax, 2 * cy, -(ax * d_x + cy * d_y)], 1)


def spatial_coefficients_backward(grad_psi, d_y, d_x) -> torch.Tensor:
    """Chain rule through :func:`spatial_coefficients`: ``[B, 6, K]`` -> ``[3, B, K]`` (A, B, C)."""
    g = grad_psi.unbind(1)
    grad_a = -g[0] + 2 * g[3] * d_x - g[5] * d_x * d_x
    grad_b = -2 * g[1] + 2 * g[3] * d_y + 2 * g[4] * d_x - 2 * g[5] * d_x * d_y
    grad_c = -g[2] + 2 * g[4] * d_y - g[5] * d_y * d_y
    return torch.stack([grad_a, grad_b, grad_c])


def fit_chunk(phi, psi, rho, ic, jd, vals, target, weight, r2_pix, r2_off, repeated):
    """Loss and exact gradient of one chunk of blocks (forward and backward fused).

    Parameters
    ----------
    phi : [B, 6, P]
        Pixel features (lx^2, lx ly, ly^2, lx, ly, 1), HR pixels from the block's centre.
    psi, rho : [B, 6, K], [B, K]
        The neighbours' spatial coefficients (:func:`spatial_coefficients`) and ``rho``.
    ic, jd : [B, G, P], [B, G, K]
        Guide of the pixels and LR guide of the neighbours, both minus the block's LR guide.
    vals, target : [B, G, K], [B, G, P]
        The fit's LR input at the neighbours; the guide at the pixels (the target).
    weight : [B, P]
        1 / (number of loss terms) on real pixels, 0 on padding.
    r2_pix, r2_off, repeated
        As in :func:`log_weights`.

    Returns
    -------
    ``(loss_sum, squared_sum, grad_psi [B, 6, K], grad_rho [B, K])``: the weighted L1 and
    squared-error sums and the gradient of ``loss_sum``.
    """
    dist = range_term(ic, jd)
    logits = log_weights(phi, psi, rho, dist, r2_pix, r2_off, repeated)
    w = torch.softmax(logits, dim=-1)
    g_count = vals.shape[1]
    outs = [(w * vals[:, g, None, :]).sum(-1) for g in range(g_count)]  # G x [B, P]
    loss = weight.new_zeros(())
    squared = weight.new_zeros(())
    dot = None  # sum_g s_g v_g(k), [B, P, K]
    shift = None  # sum_g s_g out_g, [B, P]
    for g in range(g_count):
        diff = outs[g] - target[:, g]
        loss = loss + (diff.abs() * weight).sum()
        squared = squared + (diff * diff * weight).sum()
        s = torch.sign(diff) * weight
        term = s[:, :, None] * vals[:, g, None, :]
        dot = term if dot is None else dot + term
        shift = s * outs[g] if shift is None else shift + s * outs[g]
    grad_logits = w * (dot - shift[:, :, None])
    grad_psi = torch.stack([(phi[:, j, :, None] * grad_logits).sum(1) for j in range(6)], 1)
    grad_rho = -(dist * grad_logits).sum(1)
    return loss, squared, grad_psi, grad_rho


def fit_chunk_mixed(phi, coef, d_y, d_x, ic, jd, vals, target, weight, r2_pix, r2_off, repeated, pair_dtype, loss_scale=1.0):
    """Mixed-precision fit chunk in torch operations: the CPU path of ``precision="fp16"/"bf16"``
    and the reference of the Triton kernel's half-precision arithmetic.

    Takes the inputs of :func:`.native.fit_chunk` (``coef [4, B, K]`` = A, B, C, rho and offsets
    ``d_y, d_x``) and computes what :func:`.triton_src.fit_kernel` does: log-weights from the
    pair's own offset ``(ex, ey) = (lx - Dx, ly - Dy)``, ``exp`` and the softmax in float32;
    the softmax weights rounded to ``pair_dtype``; the aggregation and ``sum_g s_g v_g`` with
    float32 values (the gradient's signal is ``v(k) - out(p)``, a difference of close
    numbers); ``d loss / d log-weight`` and the four gradient products per pair in
    ``pair_dtype``; every sum in float32, with ``loss_scale`` multiplying the per-pixel
    gradient factor (float16) and divided out of the sums. Returns
    ``(loss_sum, squared_sum, grad_coef [4, B, K])``.
    """
    f32 = torch.float32
    A, Bc, Cc, rho = coef[0][:, None, :], coef[1][:, None, :], coef[2][:, None, :], coef[3][:, None, :]
    ex = phi[:, 3, :, None] - d_x[:, None, :]
    ey = phi[:, 4, :, None] - d_y[:, None, :]
    dist = range_term(ic, jd)
    logits = -(A * ex * ex + 2 * Bc * ex * ey + Cc * ey * ey) - rho * dist
    drop = (r2_off[None, None, : coef.shape[2]] > r2_pix[:, :, None]) | repeated[:, None, :]
    w = torch.softmax(logits.masked_fill(drop, -math.inf), dim=-1)

    def rnd(x):  # one per-pair product's rounding
        return x.to(pair_dtype)

    wh = rnd(w)
    loss = torch.zeros((), dtype=torch.float64)
    squared = torch.zeros((), dtype=torch.float64)
    dot = torch.zeros_like(w)
    shift = torch.zeros_like(weight)
    for g in range(vals.shape[1]):
        v = vals[:, g, None, :]
        o = (wh.to(f32) * v).sum(-1)
        diff = o - target[:, g]
        loss += (diff.abs() * weight).sum().double()
        squared += (diff * diff * weight).sum().double()
        sg = torch.sign(diff) * weight * loss_scale
        dot += sg[:, :, None] * v
        shift += sg * o
    gl = wh * rnd(dot - shift[:, :, None])
    exh, eyh = rnd(ex), rnd(ey)
    gx, gy = gl * exh, gl * eyh
    grads = [
        -(gx * exh).to(f32).sum(1),
        -2 * (gx * eyh).to(f32).sum(1),
        -(gy * eyh).to(f32).sum(1),
        -(rnd(dist) * gl).to(f32).sum(1),
    ]
    return loss, squared, torch.stack(grads) / loss_scale


def render_weights(phi, psi, rho, ic, jd, r2_pix, r2_off, repeated) -> torch.Tensor:
    """Softmax weights ``[B, P, K]`` of a render chunk (the aggregation stays a GEMM)."""
    return torch.softmax(log_weights(phi, psi, rho, range_term(ic, jd), r2_pix, r2_off, repeated), dim=-1)


# ---------------------------------------------------------------------------- compiled entry points
_COMPILED: Dict[str, Callable] = {}
_EAGER = {"fit": fit_chunk, "render": render_weights}


def kernel(name: str, compiled: bool) -> Callable:
    """The chunk function ``name`` (``fit``, ``render``), compiled or not.

    Compiled once per process with ``dynamic=False`` (torch recompiles per new input shape:
    callers keep shapes to a few classes). Run it under ``torch.no_grad()``.
    """
    fn = _EAGER[name]
    if not compiled:
        return fn
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, dynamic=False, fullgraph=True)
    return _COMPILED[name]


def pad_blocks(t: torch.Tensor, n: int, value: float = 0.0) -> torch.Tensor:
    """Pad dimension 0 of ``t`` to ``n`` rows with ``value`` (no copy when it already has ``n``)."""
    extra = n - t.shape[0]
    if extra <= 0:
        return t
    return torch.cat([t, t.new_full((extra,) + tuple(t.shape[1:]), value)], 0)


def compiled_chunk_blocks(device: torch.device, p: int, k: int, tile_blocks: int) -> int:
    """Blocks per compiled chunk: cache-sized on the CPU (as the eager path), the largest tile on
    a GPU (one launch per tile). Fixed for a run, so one shape class per run."""
    from .eager import CPU_CHUNK_BYTES

    if device.type != "cpu":
        return max(1, tile_blocks)
    return max(1, min(tile_blocks, CPU_CHUNK_BYTES // max(1, p * k * 4)))


def compiled_graph_count() -> int:
    """Graphs dynamo has compiled so far in this process (tests bound recompilation with it)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def warn_fallback(exc: BaseException) -> None:
    warnings.warn(
        f"compiled kernels unavailable ({type(exc).__name__}: {exc}); using the eager path", RuntimeWarning, stacklevel=3
    )


class RenderWeights:
    """Compiled softmax weights of render chunks (:func:`render_weights`), padded to a
    fixed chunk size so that a render compiles once. ``engine``: the :class:`.blocks.BlockEngine`."""

    def __init__(self, engine, tile_blocks: int):
        self.cb = compiled_chunk_blocks(engine.device, engine.P, engine.K, tile_blocks)
        self.fn = kernel("render", True)
        self.r2_off = engine.grid.offsets.r2.to(engine.device, torch.int32)
        self.channels = engine.channels

    def bind(self, phi, psi, rho, jd, r2_pix, repeated):
        g, cb = self.channels, self.cb
        nb = phi.shape[0]
        rep = repeated[:, 0, :] if repeated is not None else torch.zeros(nb, psi.shape[2], dtype=torch.bool, device=phi.device)
        pieces = {
            "phi": phi[:, :, :6].transpose(1, 2),
            "psi": psi,
            "rho": rho,
            "ic": phi[:, :, 7 : 7 + g].transpose(1, 2),
            "jd": jd.transpose(1, 2),
            "r2": r2_pix.to(torch.int32),
            "rep": rep,
        }

        def weights(b0: int, b1: int) -> torch.Tensor:
            x = {name: pad_blocks(t[b0:b1], cb).contiguous() for name, t in pieces.items()}
            w = self.fn(x["phi"], x["psi"], x["rho"], x["ic"], x["jd"], x["r2"], self.r2_off, x["rep"])
            return w[: b1 - b0]

        return weights


__all__ = [
    "range_term",
    "log_weights",
    "fit_chunk",
    "spatial_coefficients",
    "spatial_coefficients_backward",
    "render_weights",
    "fit_chunk_mixed",
    "kernel",
    "pad_blocks",
    "compiled_chunk_blocks",
    "compiled_graph_count",
    "RenderWeights",
]
