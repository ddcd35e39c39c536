"""Per-block attention kernels shared by render and fit (the eager path).

``softmax(log_w) @ values`` over the K candidate neighbours of each block of HR pixels, with
a hand-written backward for the fit (:class:`_BlockAttention`), and a no-gradient variant for
render that writes its result channels-first (:func:`render_blocks`), so the image layout
``(C, H, W)`` is reached by copying contiguous runs of block pixels instead of reading with
stride C. The compiled, fused formulation of the same formulas lives in :mod:`.compiled`.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import torch

# Blocks per cache-sized chunk inside a tile (CPU): the [chunk, P, K] temporaries of the
# log-weights stay in the CPU caches across their seven elementwise passes (docs/engine.md,
# "Design measurements"). GPUs take the whole tile at once.
CPU_CHUNK_BYTES = 5 * 2**19
# Fixed per-tile overhead of the chunk temporaries (log-weights, range, temporary, weights),
# sized for the largest chunk a CPU or a small GPU tile uses.
CHUNK_OVERHEAD_BYTES = 4 * CPU_CHUNK_BYTES
# The most ``[chunk, C, P]`` float32 render output per chunk (CPU): written into the image
# while it is still in the caches (render_chunk_blocks).
CPU_RENDER_CHUNK_BYTES = 2**23


class Workspace:
    """Reusable flat buffers for the per-tile weight tensors.

    Each tile needs a few ``[blocks, P, K]`` float32 tensors (log-weights, which the backward
    reuses for their gradient, range distances, softmax weights). Allocating them afresh for every tile
    makes the C allocator map and unmap tens of MB each time; the page faults cost about as
    much as the arithmetic on a CPU (docs/engine.md, "Design measurements").
    The weights saved for backward live in this workspace, so a tile's backward must run
    before the next tile's forward (the fit loop does exactly that).
    """

    def __init__(self, device: torch.device, chunk_bytes: int = CPU_CHUNK_BYTES):
        self.device = device
        self.chunk_bytes = chunk_bytes  # size of the log-weight chunks (CPU), see chunk_blocks
        self._bufs = {}

    def get(self, name: str, shape: Tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n = int(np.prod(shape))
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = torch.empty(n, dtype=dtype, device=self.device)
            self._bufs[name] = buf
        return buf[:n].view(shape)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._bufs.values())


def chunk_blocks(device: torch.device, p: int, k: int, nb: int, chunk_bytes: int = CPU_CHUNK_BYTES) -> int:
    """Blocks processed together inside a tile."""
    if device.type != "cpu":
        return max(1, nb)
    return max(1, min(nb, chunk_bytes // max(1, p * k * 4)))


class _BlockAttention(torch.autograd.Function):
    """``softmax(log_w) @ values`` per block, with a lean hand-written backward.

    ``log_w[b, p, k] = phi[b, p, :6] . psi[b, :, k] - rho[b, k] * ||I'(b, p) - J'(b, k)||^2``
    (masked pairs set to -inf). Inputs: ``phi [B, P, 7 + G]`` (``lx^2, lx ly, ly^2, lx, ly, 1,
    ||I'||^2, I'``), ``psi [B, 6, K]``, ``rho [B, K]``, ``jd [B, K, G]`` (J'), ``values [B, K, C]``,
    ``mask [B, P|1, K]`` bool or None, ``dist [B, P, K]`` the range term if precomputed.
    Returns ``[B, P, C]`` float32.

    The spatial part is one batched matrix product (its expansion is well conditioned). The
    range part is computed as a difference, like the published code: expanding it too would
    cancel catastrophically once a fitted ``sigma_r`` reaches 0.003 (measured error 3e-3).
    Log-weights and softmax are float32; ``agg_dtype`` is the dtype of the weights-times-values
    product. Gradients flow to ``psi``, ``rho`` and ``values``.

    Blocks are processed in cache-sized chunks (:func:`chunk_blocks`); only the softmax
    weights of the whole tile are kept, and only when a backward will need them. With few
    channels the values are stored column-major (``[B, C, K]`` contiguous): MKL's batched
    product is faster in that layout (docs/engine.md, "Design measurements").
    """

    @staticmethod
    def forward(ctx, phi, psi, rho, jd, values, mask, agg_dtype, workspace, dist=None):  # type: ignore[override]
        nb, p, k = phi.shape[0], phi.shape[1], psi.shape[2]
        g = jd.shape[2]
        ws = workspace if workspace is not None else Workspace(phi.device)
        wd = phi.dtype  # float32 in the engine; float64 in gradient tests
        half = agg_dtype not in (torch.float32, torch.float64)
        needs_grad = any(ctx.needs_input_grad[1:5])
        cb = chunk_blocks(phi.device, p, k, nb, ws.chunk_bytes)
        vmat = values.to(agg_dtype if half else wd)  # [B, K, C]
        if vmat.shape[2] < 32:  # few channels: column-major storage (see the class docstring)
            vmat = vmat.transpose(1, 2).contiguous().transpose(1, 2)
        out = torch.empty(nb, p, vmat.shape[2], dtype=wd, device=phi.device)
        weights_all = ws.get("weights", (nb, p, k), wd) if needs_grad else None
        logits_buf = ws.get("logits", (cb, p, k), wd)
        dist_buf = ws.get("range", (cb, p, k), wd)
        tmp_buf = ws.get("tmp", (cb, p, k), wd) if g > 1 else None
        wchunk_buf = None if needs_grad else ws.get("weights_chunk", (cb, p, k), wd)
        spatial = phi[:, :, :6]
        for b0 in range(0, nb, cb):
            b1 = min(nb, b0 + cb)
            n = b1 - b0
            logits = torch.bmm(spatial[b0:b1], psi[b0:b1], out=logits_buf[:n])
            if dist is not None:  # the fit's cached range term (guide-only, see fit._TileCache)
                chunk_dist = dist[b0:b1]
            else:
                chunk_dist = dist_buf[:n]
                for c in range(g):
                    ic = phi[b0:b1, :, 7 + c, None]
                    jc = jd[b0:b1, None, :, c]
                    if c == 0:
                        torch.sub(ic, jc, out=chunk_dist).square_()
                    else:
                        tmp = torch.sub(ic, jc, out=tmp_buf[:n])
                        chunk_dist.addcmul_(tmp, tmp)
            logits.addcmul_(chunk_dist, rho[b0:b1, None, :], value=-1.0)
            if mask is not None:
                logits.masked_fill_(mask[b0:b1], -math.inf)
            w = torch.softmax(logits, dim=-1, out=weights_all[b0:b1] if needs_grad else wchunk_buf[:n])
            if half:
                out[b0:b1] = torch.bmm(w.to(agg_dtype), vmat[b0:b1]).to(wd)
            else:
                torch.bmm(w, vmat[b0:b1], out=out[b0:b1])
        ctx.workspace = workspace
        ctx.chunk = cb
        ctx.values_dtype = values.dtype
        if needs_grad:
            ctx.save_for_backward(phi, jd, weights_all, vmat, out)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        phi, jd, weights, vmat, out = ctx.saved_tensors
        ws = ctx.workspace if ctx.workspace is not None else Workspace(phi.device)
        nb, p, k = weights.shape
        wd = weights.dtype
        cb = ctx.chunk
        grad_out = grad_out.to(wd)
        vals_t = vmat.to(wd).transpose(1, 2)  # [B, C, K]
        shift = (grad_out * out).sum(-1, keepdim=True)  # [B, P, 1]
        want_psi = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        want_values = ctx.needs_input_grad[4]
        grad_psi = torch.empty(nb, 6, k, dtype=wd, device=phi.device) if want_psi else None
        grad_rho = torch.empty(nb, k, dtype=wd, device=phi.device) if want_psi else None
        grad_values = torch.empty(nb, k, vmat.shape[2], dtype=wd, device=phi.device) if want_values else None
        buf = ws.get("logits", (cb, p, k), wd)
        for b0 in range(0, nb, cb):
            b1 = min(nb, b0 + cb)
            w = weights[b0:b1]
            grad_logits = torch.bmm(grad_out[b0:b1], vals_t[b0:b1], out=buf[: b1 - b0])
            grad_logits.sub_(shift[b0:b1]).mul_(w)
            if want_psi:
                # One product gives the spatial gradient and, through the expanded range term
                # (fine for a gradient: no cancellation against a softmax maximum), rho's.
                sums = torch.bmm(phi[b0:b1].transpose(1, 2), grad_logits)  # [n, 7 + G, K]
                grad_psi[b0:b1] = sums[:, :6]
                jj = jd[b0:b1].transpose(1, 2)  # [n, G, K]
                grad_rho[b0:b1] = -(sums[:, 6] - 2 * (jj * sums[:, 7:]).sum(1) + (jj * jj).sum(1) * sums[:, 5])
            if want_values:
                grad_values[b0:b1] = torch.bmm(w.transpose(1, 2), grad_out[b0:b1])
        if grad_values is not None:
            grad_values = grad_values.to(ctx.values_dtype)
        return None, grad_psi, grad_rho, None, grad_values, None, None, None, None


def block_attention(
    phi, psi, rho, jd, values, mask=None, agg_dtype=torch.float32, workspace: Optional[Workspace] = None, dist=None
):
    """Functional entry to :class:`_BlockAttention` (differentiable in psi, rho and values).

    ``dist [B, P, >=K]``, optional: the range term ``||I'(p) - J'(k)||^2`` precomputed (it
    depends only on the guide; the fit computes it once, then reuses it every step).
    """
    return _BlockAttention.apply(phi, psi, rho, jd, values, mask, agg_dtype, workspace, dist)


def render_chunk_blocks(device: torch.device, p: int, k: int, c: int, nb: int, chunk_bytes: int = CPU_CHUNK_BYTES) -> int:
    """Blocks per render chunk: :func:`chunk_blocks`, and on the CPU also no more than
    :data:`CPU_RENDER_CHUNK_BYTES` of ``[chunk, C, P]`` float32 output (each chunk's output is
    written into the image while it is in the caches)."""
    cb = chunk_blocks(device, p, k, nb, chunk_bytes)
    if device.type != "cpu":
        return cb
    return max(1, min(cb, CPU_RENDER_CHUNK_BYTES // max(1, c * p * 4)))


def gather_values(values_flat: torch.Tensor, q: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[n, k, C]``: the rows ``q [n, k]`` of ``values_flat [h * w, C]`` (the neighbours' values),
    written into ``out`` (any buffer of at least ``n * k * C`` elements) when given."""
    n, k = q.shape
    c = values_flat.shape[1]
    if out is None:
        return values_flat.index_select(0, q.reshape(-1)).reshape(n, k, c)
    dest = out.reshape(-1)[: n * k * c].view(n * k, c)
    torch.index_select(values_flat, 0, q.reshape(-1), out=dest)
    return dest.view(n, k, c)


def render_blocks(
    phi,
    psi,
    rho,
    jd,
    values,
    mask=None,
    agg_dtype=torch.float32,
    workspace: Optional[Workspace] = None,
    weights_fn=None,
    chunk: Optional[int] = None,
    *,
    sink,
) -> None:
    """Render one tile chunk by chunk: ``[n, C, P]`` (channels first) = ``values^T @
    softmax(log_w)^T`` per block, handed to ``sink(b0, b1, out)`` for blocks ``b0:b1``.

    Same formulas as :class:`_BlockAttention` (no gradients). ``values = (values_flat [h * w, C],
    q [B, K])``: the neighbours' values are gathered chunk by chunk into a workspace buffer, and
    ``out`` is a workspace buffer too, reused for the next chunk (the sink writes or copies it),
    so a tile never holds its ``[B, K, C]`` values or ``[B, C, P]`` output: at C = 384 those were
    two fresh 77 MB tensors per 224^2 render, whose page faults and memory traffic took a third
    of the render (docs/engine.md). The output is channels-first so that the image ``(C, H, W)``
    is reached by copying contiguous runs of ``P_x`` pixels (the ``[B, P, C]`` layout had to be
    read with stride C, 32 % of render time at C = 384). ``weights_fn(b0, b1) -> [n, P, K]``
    replaces the eager log-weights and softmax of blocks ``b0:b1`` (the compiled and native
    paths), with ``chunk`` its fixed chunk size.
    """
    nb, p, k = phi.shape[0], phi.shape[1], psi.shape[2]
    g = jd.shape[2]
    ws = workspace if workspace is not None else Workspace(phi.device)
    wd = phi.dtype
    half = agg_dtype not in (torch.float32, torch.float64)
    values_flat, q = values
    c = values_flat.shape[1]
    cb = chunk if chunk is not None else render_chunk_blocks(phi.device, p, k, c, nb, ws.chunk_bytes)
    vals_buf = ws.get("gathered_values", (cb, k, c), values_flat.dtype)
    out_buf = ws.get("rendered_chunk", (cb, c, p), wd)
    if weights_fn is None:
        logits_buf = ws.get("logits", (cb, p, k), wd)
        dist_buf = ws.get("range", (cb, p, k), wd)
        tmp_buf = ws.get("tmp", (cb, p, k), wd) if g > 1 else None
        w_buf = ws.get("weights_chunk", (cb, p, k), wd)
    spatial = phi[:, :, :6]
    for b0 in range(0, nb, cb):
        b1 = min(nb, b0 + cb)
        n = b1 - b0
        if weights_fn is not None:
            w = weights_fn(b0, b1)
        else:
            logits = torch.bmm(spatial[b0:b1], psi[b0:b1], out=logits_buf[:n])
            dist = dist_buf[:n]
            for ch in range(g):
                ic = phi[b0:b1, :, 7 + ch, None]
                jc = jd[b0:b1, None, :, ch]
                if ch == 0:
                    torch.sub(ic, jc, out=dist).square_()
                else:
                    tmp = torch.sub(ic, jc, out=tmp_buf[:n])
                    dist.addcmul_(tmp, tmp)
            logits.addcmul_(dist, rho[b0:b1, None, :], value=-1.0)
            if mask is not None:
                logits.masked_fill_(mask[b0:b1], -math.inf)
            w = torch.softmax(logits, dim=-1, out=w_buf[:n])
        # [n, C, K] (a view of the gathered [n, K, C])
        v = gather_values(values_flat, q[b0:b1], vals_buf).to(agg_dtype if half else wd).transpose(1, 2)
        dest = out_buf[:n]
        if half:
            dest.copy_(torch.bmm(v, w.to(agg_dtype).transpose(1, 2)))
        else:
            torch.bmm(v, w.transpose(1, 2), out=dest)
        sink(b0, b1, dest)
