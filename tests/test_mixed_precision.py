"""Mixed-precision fit (``fit_precision="fp16"/"bf16"`` in ``fit_kernels``): half-precision per-pair
products, float32 log-weights, sums and parameters, loss scaling for fp16; within 2e-2 of the
float64 reference (docs/mixed_precision.md measures the fit PSNR)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import rel_err
from test_triton import _chunk_inputs, _reference_chunk

import napari_upsample_anything as upa
from napari_upsample_anything.core.engine import compiled, triton_kernels

HALF = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("B,P,K,G", [(3, 20, 29, 3), (4, 144, 197, 3), (2, 37, 197, 1)])
def test_mixed_chunk_within_2e2_of_float64(dtype, B, P, K, G):
    """The torch mixed-precision formulas (the CPU path): loss and gradient of (A, B, C, rho)."""
    gen = torch.Generator().manual_seed(5 + K)
    x = _chunk_inputs(gen, B, P, K, G)
    ref_loss, ref_sq, ref_grad = _reference_chunk(*x)
    scale = 1.0 / float(x[8].max()) if dtype == torch.float16 else 1.0
    loss, sq, grad = compiled.fit_chunk_mixed(*x, dtype, scale)
    assert float(loss) == pytest.approx(ref_loss, rel=2e-2)
    assert float(sq) == pytest.approx(ref_sq, rel=2e-2)
    assert rel_err(grad, ref_grad) < 2e-2
    loss32, _, grad32 = compiled.fit_chunk_mixed(*x, torch.float32)  # the same formulas in float32: exact
    assert rel_err(grad32, ref_grad) < 1e-5 and float(loss32) == pytest.approx(ref_loss, rel=1e-6)


def test_fp16_needs_and_gets_loss_scaling():
    """At 224^2 a pixel's loss weight 1 / (3 H W) = 6.6e-6 is below float16's smallest normal:
    without the scale the gradient products lose most of their bits."""
    gen = torch.Generator().manual_seed(3)
    x = list(_chunk_inputs(gen, 4, 144, 197, 3))
    x[8] = torch.full_like(x[8], 1.0 / (3 * 224 * 224))
    _, _, ref_grad = _reference_chunk(*x)
    _, _, scaled = compiled.fit_chunk_mixed(*x, torch.float16, 1.0 / float(x[8].max()))
    _, _, unscaled = compiled.fit_chunk_mixed(*x, torch.float16, 1.0)
    assert rel_err(scaled, ref_grad) < 2e-3
    assert rel_err(unscaled, ref_grad) > 5 * rel_err(scaled, ref_grad)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", HALF)
def test_triton_half_kernel_within_2e2_of_float64_and_equal_to_torch_formulas(monkeypatch, dtype):
    """The Triton kernel in half precision (interpreter; bfloat16 rounding emulated exactly)
    against the float64 reference, and against the torch mixed formulas it mirrors."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    gen = torch.Generator().manual_seed(9)
    x = _chunk_inputs(gen, 3, 40, 49, 3)
    ref_loss, _, ref_grad = _reference_chunk(*x)
    loss, _, grad = triton_kernels.fit_chunk(*x, pair_dtype=dtype)
    assert float(loss) == pytest.approx(ref_loss, rel=2e-2)
    assert rel_err(grad, ref_grad) < 2e-2
    scale = 1.0 / float(x[8].max()) if dtype == torch.float16 else 1.0
    _, _, torch_grad = compiled.fit_chunk_mixed(*x, dtype, scale)
    assert rel_err(grad, torch_grad) < 2e-3  # same roundings up to summation order


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_fit_on_cpu_matches_float32_fit(precision):
    """fit_kernels(fit_precision=...) on the CPU: the loss curve and the fitted reconstruction stay
    within 2e-2 of the float32 fit (the float32 fit is checked against float64 elsewhere)."""
    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[0:40, 0:48] / 40.0
    guide = np.stack([np.sin(6 * yy + 3 * xx), np.cos(4 * xx), yy * xx], -1) * 0.4 + 0.5
    guide = (guide + 0.05 * rng.standard_normal(guide.shape)).clip(0, 1).astype(np.float32)
    kw = dict(steps=6, device="cpu", seed=0)
    ref = upa.fit_kernels(guide, (5, 6), fit_precision="fp32", **kw)
    half = upa.fit_kernels(guide, (5, 6), fit_precision=precision, **kw)
    assert half.meta["kernel"] == "mixed" and half.meta["fit_precision"] == {"bf16": "bfloat16", "fp16": "float16"}[precision]
    assert ref.meta["fit_precision"] == "float32"
    a, b = np.array(half.meta["loss_per_step"]), np.array(ref.meta["loss_per_step"])
    assert np.all(np.abs(a / b - 1) < 2e-2)
    lr = np.random.default_rng(1).standard_normal((4, 5, 6)).astype(np.float32)
    out_half = upa.render(lr, guide, half, device="cpu", precision="fp32")
    out_ref = upa.render(lr, guide, ref, device="cpu", precision="fp32")
    assert rel_err(out_half, out_ref) < 2e-2


def test_the_fit_is_float32_unless_fit_precision_says_otherwise():
    """fit_precision='auto' (and the default) fit in float32 until a GPU measures the mixed fit
    equal; the render's ``precision`` (which pipelines pass to the fit too) does not change it."""
    guide = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    for kw in ({}, {"fit_precision": "auto"}, {"precision": "fp16"}, {"precision": "bf16"}):
        f = upa.fit_kernels(guide, (2, 2), steps=1, device="cpu", **kw)
        assert f.meta["fit_precision"] == "float32" and f.meta["kernel"] != "mixed", kw
    with pytest.raises(ValueError, match="fit_precision='fp8'"):
        upa.fit_kernels(guide, (2, 2), steps=1, device="cpu", fit_precision="fp8")
    out, f = upa.upsample(guide, np.ones((2, 2, 2), np.float32), steps=1, device="cpu", fit_precision="bf16", return_field=True)
    assert f.meta["fit_precision"] == "bfloat16" and np.allclose(out, 1.0, atol=1e-5)
