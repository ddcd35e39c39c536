"""The hand-written Triton kernels (``backend="triton"``), run on the CPU by Triton's interpreter.

Why a fixture and not a subprocess: the kernels are turned into Triton kernels on first use,
per interpreter mode (``core/engine/triton_kernels.py::_kernels``), and Triton reads
``TRITON_INTERPRET`` when a kernel is decorated, not when it is imported. So the ``interpret``
fixture sets the variable for one test only (``monkeypatch``): these tests get interpreted
kernels whatever was imported before, and every other test runs with the variable unset, as
before. A subprocess per test would cost a torch import (seconds) each.

The cases are small (the interpreter runs each program's tile operations in numpy, about
60 ms per block and step here).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_field, rel_err
from reference_gsjbu import reference_render

import napari_upsample_anything as upa
from napari_upsample_anything.core.engine import backends, compiled, native, triton_kernels
from napari_upsample_anything.core.engine.blocks import BlockEngine, RenderOptions
from napari_upsample_anything.core.field import KernelField
from napari_upsample_anything.core.fit import CellSampler, _ChunkedFit, _loss_and_grad_fused
from napari_upsample_anything.core.guide import Guide
from napari_upsample_anything.core.render import bicubic_lr_guide

pytestmark = pytest.mark.triton
CPU = torch.device("cpu")
RADIUS = 4  # 49 offsets: a quarter of the interpreter's work at the published 8, same code paths


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_kernels.usable(CPU)


def _chunk_inputs(gen, B, P, K, G, s=7.0):
    """Consistent random inputs of one fit chunk (phi from local coordinates, sorted offsets)."""
    lx = (torch.rand(B, P, generator=gen) - 0.5) * s
    ly = (torch.rand(B, P, generator=gen) - 0.5) * s
    phi = torch.stack([lx * lx, lx * ly, ly * ly, lx, ly, torch.ones_like(lx)], 1)
    sig = torch.exp(torch.empty(2, B, K).uniform_(np.log(1.0), np.log(30.0), generator=gen))
    coef = torch.stack(
        [
            0.5 / sig[0] ** 2,
            0.02 * torch.randn(B, K, generator=gen) / sig.prod(0),
            0.5 / sig[1] ** 2,
            1 / (2 * 0.1**2) * torch.rand(B, K, generator=gen),
        ]
    )
    r2_off = torch.sort(torch.randint(0, 30, (K,), generator=gen))[0].to(torch.int32)
    r2_off[0] = 0
    d_y = torch.randint(-4, 5, (B, K), generator=gen).float() * s
    d_x = torch.randint(-4, 5, (B, K), generator=gen).float() * s
    ic = torch.rand(B, G, P, generator=gen) - 0.5
    jd = torch.rand(B, G, K, generator=gen) - 0.5
    vals = torch.rand(B, G, K, generator=gen)
    target = torch.rand(B, G, P, generator=gen)
    weight = torch.full((B, P), 1.0 / (G * B * P))
    weight[-1, -2:] = 0  # padding pixels
    r2_pix = torch.randint(1, 30, (B, P), generator=gen, dtype=torch.int32)
    repeated = torch.rand(B, K, generator=gen) < 0.15
    repeated[:, 0] = False
    return phi, coef, d_y, d_x, ic, jd, vals, target, weight, r2_pix, r2_off, repeated


def _reference_chunk(phi, coef, d_y, d_x, ic, jd, vals, target, weight, r2_pix, r2_off, repeated):
    d = [t.double() for t in (phi, coef, d_y, d_x, ic, jd, vals, target, weight)]
    psi = compiled.spatial_coefficients(d[1], d[2], d[3])
    loss, sq, grad_psi, grad_rho = compiled.fit_chunk(d[0], psi, d[1][3], d[4], d[5], d[6], d[7], d[8], r2_pix, r2_off, repeated)
    grad_abc = compiled.spatial_coefficients_backward(grad_psi, d[2], d[3])
    return float(loss), float(sq), torch.cat([grad_abc, grad_rho[None]])


@pytest.mark.parametrize("B,P,K,G", [(3, 20, 29, 3), (2, 37, 197, 1), (4, 16, 13, 3)])
def test_fit_chunk_equals_float64_formulas(interpret, B, P, K, G):
    """Loss, squared error and gradient of (A, B, C, rho): dynamic radius, repeated border
    copies, padding pixels, P not a multiple of the pixel tile, K not a power of two."""
    gen = torch.Generator().manual_seed(B * 100 + K)
    x = _chunk_inputs(gen, B, P, K, G)
    loss, sq, grad = triton_kernels.fit_chunk(*x)
    ref_loss, ref_sq, ref_grad = _reference_chunk(*x)
    assert float(loss) == pytest.approx(ref_loss, rel=1e-5)
    assert float(sq) == pytest.approx(ref_sq, rel=1e-5)
    assert rel_err(grad, ref_grad) < 1e-4


def _gradient(guide_hwc, lr_shape, raw, budget, kernel_name, sampler=None):
    guide = Guide(guide_hwc, "none")
    engine = BlockEngine(guide, lr_shape, RenderOptions(radius=RADIUS), CPU)
    h, w = lr_shape
    values = bicubic_lr_guide(guide, lr_shape, CPU).permute(1, 2, 0).reshape(h * w, -1).contiguous()
    per_block = engine.bytes_per_block(guide.channels, 4, training=True)
    tiles = engine.plan(per_block, budget)
    raw = raw.clone().requires_grad_(True)
    n = guide.channels * guide.shape[0] * guide.shape[1]
    prep = _ChunkedFit(engine, tiles, values, n, keep=True, compiled=True, kernel_name=kernel_name)
    loss, _ = _loss_and_grad_fused(prep, tiles, raw, per_block, None, None, sampler=sampler)
    return loss, raw.grad, len(tiles)


@pytest.mark.parametrize("budget,fraction", [(600_000, 1.0), (600_000, 0.4)])
def test_tiled_and_sampled_gradient_equals_dense_float64_reference(interpret, budget, fraction):
    """The full-image (or drawn cells') loss and gradient through the Triton kernel, one tile or
    several, against autograd through the dense float64 reference (non-integer scale, G = 3)."""
    gen = torch.Generator().manual_seed(7)
    H, W, h, w = 31, 26, 4, 3  # scales 7.75 x 8.67
    guide = torch.rand(H, W, 3, generator=gen)
    raw = KernelField.initial((h, w)).raw() + 0.3 * torch.randn(4, h, w, generator=gen)
    sampler = None
    if fraction < 1:
        sampler = CellSampler(h, w, fraction, seed=3, device=CPU)
        sampler.draw()
    loss, grad, n_tiles = _gradient(guide.numpy(), (h, w), raw, budget, "triton", sampler)
    if budget < 2**30:
        assert n_tiles > 1
    raw64 = raw.double().requires_grad_(True)
    f = KernelField.from_raw(raw64)
    g = Guide(guide.numpy(), "none")
    lr_img = bicubic_lr_guide(g, (h, w), CPU).double()
    g64 = guide.double().permute(2, 0, 1)
    pred = reference_render(lr_img, g64, f.sigma_x, f.sigma_y, f.theta, f.sigma_r, radius=RADIUS)
    err = (pred - g64).abs()
    if sampler is not None:  # the drawn cells' pixels, scaled by n / k
        engine = BlockEngine(g, (h, w), RenderOptions(radius=RADIUS), CPU)
        rows = engine.grid.rows.index.clone()
        cols = engine.grid.cols.index.clone()
        pix = torch.zeros(H, W, dtype=torch.float64)
        for i in range(h):
            for j in range(w):
                if sampler.mask[i, j]:
                    ry = rows[i][engine.grid.rows.valid[i]]
                    rx = cols[j][engine.grid.cols.valid[j]]
                    pix[ry[:, None], rx[None, :]] = 1.0
        err = err * pix * sampler.weight
    ref_loss = err.sum() / g64.numel()
    ref_loss.backward()
    assert loss == pytest.approx(float(ref_loss.detach()), rel=1e-5)
    assert rel_err(grad, raw64.grad) < 1e-4


@pytest.mark.skipif(not native.available(), reason="needs a C compiler for the native kernel")
@pytest.mark.parametrize("G,fraction", [(3, 1.0), (1, 0.5)])
def test_fit_kernels_loss_curve_equals_native_kernel(interpret, G, fraction):
    """The public API with backend='triton' on CPU tensors: same loss curve as the C kernel
    (0.1 % per step), several tiles, non-integer scale."""
    rng = np.random.default_rng(G)
    guide = rng.random((29, 23, G) if G > 1 else (29, 23)).astype(np.float32)
    kw = dict(steps=4, radius=3, device="cpu", max_memory="300KB", fit_fraction=fraction, seed=1)
    ours = upa.fit_kernels(guide, (4, 3), backend="triton", **kw)
    ref = upa.fit_kernels(guide, (4, 3), backend="auto", **kw)
    assert ours.meta["kernel"] == "triton" and ref.meta["kernel"] == "native"
    a, b = np.array(ours.meta["loss_per_step"]), np.array(ref.meta["loss_per_step"])
    assert np.all(np.abs(a / b - 1) < 1e-3)
    assert ours.meta["final_loss"] == pytest.approx(ref.meta["final_loss"], rel=1e-3)


@pytest.mark.parametrize("G,C,border", [(1, 1, "repeat"), (3, 70, "unique")])
def test_render_and_upsample_equal_float64_reference(interpret, G, C, border, gen):
    """Render kernel (weights x values in channel chunks of 64, [B, C, P] output) through
    ``render`` and ``upsample``: non-integer scales, dynamic radius, both borders."""
    H, W, h, w = 23, 19, 3, 4
    guide = torch.rand(H, W, G, generator=gen)
    lr = torch.randn(C, h, w, generator=gen)
    field = random_field(h, w, gen, sigma=(0.3, 6.0))
    out = upa.render(
        lr, guide[..., 0] if G == 1 else guide, field, device="cpu", backend="triton", normalize="none", radius=4, border=border
    )
    ref = reference_render(
        lr,
        guide.permute(2, 0, 1),
        field.sigma_x,
        field.sigma_y,
        field.theta,
        field.sigma_r,
        radius=4,
        unique_border=border == "unique",
    )
    assert rel_err(out, ref) < 1e-4
    half = upa.render(
        lr,
        guide[..., 0] if G == 1 else guide,
        field,
        device="cpu",
        backend="triton",
        normalize="none",
        radius=4,
        border=border,
        precision="fp16",
    )
    assert rel_err(half, ref) < 2e-2


def test_upsample_runs_the_triton_kernels_end_to_end(interpret):
    rng = np.random.default_rng(0)
    guide = rng.random((20, 24, 3)).astype(np.float32)
    lr = rng.standard_normal((5, 3, 4)).astype(np.float32)
    out, field = upa.upsample(guide, lr, steps=1, radius=2, device="cpu", backend="triton", return_field=True)
    ref = upa.render(lr, guide, field, device="cpu", backend="eager")
    assert field.meta["kernel"] == "triton"
    assert rel_err(out, ref) < 1e-4


def test_triton_backend_without_interpreter_or_gpu_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton'"):
        backends.choose_backend("triton", CPU, "render", guide_channels=3)
    for mode in ("fit", "render"):  # auto never picks the interpreter
        assert backends.choose_backend("auto", CPU, mode, guide_channels=4, pair_evals=0.0).path == "eager"


def test_kernels_compile_to_a_cuda_binary_without_a_gpu():
    """What the interpreter cannot check: the kernels are valid compiled Triton (frontend, LLVM
    and ptxas for an RTX 4090, compute capability 8.9), here with small shapes to stay quick.

    In a fresh process: once the interpreter has run in a process it leaves ``triton.language``
    patched (triton 3.8.0), and compiling there fails."""
    import subprocess
    import sys

    code = (
        "from napari_upsample_anything.core.engine import triton_kernels as tk; "
        "s = tk.compile_for_gpu(arch=89, G=1, P=16, K=16, C=16); "
        "assert s['fit'] > 1000 and s['render'] > 1000, s; print('compiled', s)"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-3000:]
