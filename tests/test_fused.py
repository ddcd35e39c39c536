"""The fused / compiled engine path (core/engine/compiled.py): same numbers as the eager path and the
float64 reference, one compilation per shape class, backend and thread options."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_field, rel_err
from reference_gsjbu import reference_render

import napari_upsample_anything as upa
from napari_upsample_anything.core.engine import backends, compiled, native
from napari_upsample_anything.core.engine.backends import KernelChoice
from napari_upsample_anything.core.engine.blocks import BlockEngine, RenderOptions
from napari_upsample_anything.core.fit import fit_field
from napari_upsample_anything.core.guide import Guide
from napari_upsample_anything.core.render import render_field
from napari_upsample_anything.core.threads import torch_threads

CPU = torch.device("cpu")
needs_compiler = pytest.mark.skipif(not backends.compiler_available("cpu"), reason="no C++ compiler for torch.compile")


def test_fit_chunk_gradient_equals_autograd(gen):
    """The fused kernel's hand-written backward == autograd through its own forward (float64)."""
    B, P, K, G = 2, 5, 7, 3
    d = dict(dtype=torch.float64)
    phi = torch.randn(B, 6, P, generator=gen, **d)
    psi = (0.1 * torch.randn(B, 6, K, generator=gen, **d)).requires_grad_(True)
    rho = torch.rand(B, K, generator=gen, **d).requires_grad_(True)
    ic, jd = torch.randn(B, G, P, generator=gen, **d), torch.randn(B, G, K, generator=gen, **d)
    vals, target = torch.randn(B, G, K, generator=gen, **d), torch.randn(B, G, P, generator=gen, **d)
    weight = torch.rand(B, P, generator=gen, **d)
    r2_pix = torch.randint(0, 9, (B, P), generator=gen, dtype=torch.int32)
    r2_off = torch.arange(K, dtype=torch.int32)
    repeated = torch.rand(B, K, generator=gen) < 0.3
    repeated[:, 0] = False
    loss, _, grad_psi, grad_rho = compiled.fit_chunk(phi, psi, rho, ic, jd, vals, target, weight, r2_pix, r2_off, repeated)
    logits = compiled.log_weights(phi, psi, rho, compiled.range_term(ic, jd), r2_pix, r2_off, repeated)
    out = torch.einsum("bpk,bgk->bgp", torch.softmax(logits, -1), vals)
    ref = ((out - target).abs() * weight[:, None]).sum()
    ref_psi, ref_rho = torch.autograd.grad(ref, (psi, rho))
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-12)
    assert torch.allclose(grad_psi, ref_psi, atol=1e-12) and torch.allclose(grad_rho, ref_rho, atol=1e-12)


def test_spatial_coefficients_backward_is_the_chain_rule(gen):
    coef = torch.randn(4, 3, 5, dtype=torch.float64, generator=gen).requires_grad_(True)
    d_y, d_x = torch.randn(3, 5, dtype=torch.float64, generator=gen), torch.randn(3, 5, dtype=torch.float64, generator=gen)
    upstream = torch.randn(3, 6, 5, dtype=torch.float64, generator=gen)
    (grad,) = torch.autograd.grad(compiled.spatial_coefficients(coef, d_y, d_x), coef, upstream)
    assert torch.allclose(compiled.spatial_coefficients_backward(upstream, d_y, d_x), grad[:3], atol=1e-12)


@needs_compiler
def test_compiled_fit_follows_the_eager_loss_curve_and_compiles_once(monkeypatch):
    """torch.compile path (the native CPU kernel switched off): loss curves within 0.1 % per
    step (they agree to ~1e-6), same fitted field; a second fit of the same shape class
    compiles nothing new."""
    monkeypatch.setattr(native, "available", lambda: False)
    rng = np.random.default_rng(0)
    guide = Guide((rng.random((48, 60, 3)) * 255).astype(np.uint8))
    eager = fit_field(guide, (4, 5), steps=3, budget=2**30, backend="eager")
    before = compiled.compiled_graph_count()
    fitted = fit_field(guide, (4, 5), steps=3, budget=2**30, backend="compiled")
    first = compiled.compiled_graph_count() - before
    assert fitted.meta["backend"] == "compiled" and eager.meta["backend"] == "eager"
    assert fitted.meta["kernel"] == "inductor"
    a, b = np.array(eager.meta["loss_per_step"]), np.array(fitted.meta["loss_per_step"])
    assert np.abs(b / a - 1).max() < 1e-3
    assert fitted.meta["final_loss"] == pytest.approx(eager.meta["final_loss"], rel=1e-3)
    assert rel_err(fitted.sigma_x, eager.sigma_x) < 1e-3
    assert 1 <= first <= 2  # one graph (two if dynamo splits it): not one per tile or step
    before = compiled.compiled_graph_count()
    fit_field(guide, (4, 5), steps=2, budget=2**30, backend="compiled")  # same shapes: no recompile
    assert compiled.compiled_graph_count() == before


@pytest.mark.skipif(not native.available(), reason="no C compiler to build the native fit kernel")
def test_native_fit_follows_the_eager_loss_curve():
    """The default CPU fit kernel: published 51-step loss curve within 0.1 % per step of the
    eager path, on a non-integer scale (padded blocks) with the 'unique' border (masked pairs)."""
    rng = np.random.default_rng(2)
    guide = Guide((rng.random((50, 37, 3)) * 255).astype(np.uint8))
    options = RenderOptions(border="unique")
    eager = fit_field(guide, (7, 5), steps=51, budget=2**30, options=options, backend="eager")
    fast = fit_field(guide, (7, 5), steps=51, budget=2**30, options=options, backend="auto")
    assert fast.meta["kernel"] == "native"  # auto picks it: it builds in seconds
    a, b = np.array(eager.meta["loss_per_step"]), np.array(fast.meta["loss_per_step"])
    assert np.abs(b / a - 1).max() < 1e-3
    assert fast.meta["psnr"] == pytest.approx(eager.meta["psnr"], abs=0.01)


@pytest.mark.skipif(not native.available(), reason="no C compiler to build the native fit kernel")
@pytest.mark.parametrize("G, P, K", [(3, 25, 37), (1, 7, 13), (2, 196, 197)])
def test_native_chunk_against_float64(gen, G, P, K):
    """The C kernel (float32, inlined exp, pixels in groups of four, register-blocked gradient)
    == the float64 formulas: loss and both gradients within 1e-4, for 1-3 guide channels, pixel
    counts that are not multiples of four, radii that differ inside a group of four, masked and
    repeated neighbours, zero-weight pixels, log-weights far below -80 and dropped pairs whose
    log-weight is far above the kept maximum (they must neither overflow nor give NaN)."""
    B = 3
    d = dict(dtype=torch.float64)
    phi = torch.randn(B, 6, P, generator=gen, **d)
    abc = 0.5 * torch.randn(3, B, K, generator=gen, **d)
    abc[0], abc[2] = abc[0].abs() + 0.5, abc[2].abs() + 0.5  # A, C > 0: a decaying kernel
    abc[1] = abc[1].clamp(-0.4, 0.4)  # |B| < sqrt(AC): positive definite
    d_y, d_x = 2 * torch.randn(B, K, generator=gen, **d), 2 * torch.randn(B, K, generator=gen, **d)
    d_y[1, K - 1] = d_x[1, K - 1] = 0.0
    rho = 20 * torch.rand(B, K, generator=gen, **d)
    rho[0, K // 2 :] = 400.0  # range terms far below exp(-80)
    ic, jd = torch.randn(B, G, P, generator=gen, **d), torch.randn(B, G, K, generator=gen, **d)
    vals, target = torch.randn(B, G, K, generator=gen, **d), torch.randn(B, G, P, generator=gen, **d)
    weight = torch.rand(B, P, generator=gen, **d)
    weight[1, ::3] = 0.0
    r2_off = torch.arange(K, dtype=torch.int32)
    r2_pix = torch.randint(1, K, (B, P), generator=gen, dtype=torch.int32)
    r2_pix[2] = K  # one block where the whole group shares a radius
    repeated = torch.rand(B, K, generator=gen) < 0.2
    repeated[:, 0] = False
    abc[:, 1, K - 1] = torch.tensor([-50.0, 0.0, -50.0], **d)  # an exploding kernel: log-weight far above the max
    rho[1, K - 1] = 0.0
    phi[1, :3] = phi[1, :3].abs() + 1.0  # (lx^2, lx ly, ly^2): -A lx^2 - C ly^2 >> 0
    phi[1, 1] = 0.0
    repeated[1, K - 1] = True  # ... dropped
    coef = torch.cat([abc, rho[None]]).requires_grad_(True)
    psi = compiled.spatial_coefficients(coef, d_y, d_x)
    loss, sq, grad_psi, grad_rho = compiled.fit_chunk(phi, psi, coef[3], ic, jd, vals, target, weight, r2_pix, r2_off, repeated)
    (ref_grad,) = torch.autograd.grad(psi, coef, grad_psi)  # chain rule through the quadratic form
    ref_grad[3] += grad_rho
    f32 = [t.detach().float() for t in (phi, coef, d_y, d_x, ic, jd, vals, target, weight)]
    got = native.fit_chunk(*f32, r2_pix, r2_off, repeated)
    assert all(torch.isfinite(t).all() for t in got)
    assert float(got[0]) == pytest.approx(float(loss.detach()), rel=1e-4)
    assert float(got[1]) == pytest.approx(float(sq.detach()), rel=1e-4)
    assert rel_err(got[2][:3], ref_grad[:3]) < 1e-4
    assert rel_err(got[2][3], ref_grad[3]) < 1e-4


@needs_compiler
def test_compiled_render_against_reference(gen):
    """Compiled softmax weights, published and 'unique' border, small sigmas (dynamic radius as
    a mask): float64 reference within 1e-4, one compilation for both option sets."""
    H, W, h, w = 45, 61, 6, 9  # non-integer scale: padded blocks
    guide = torch.rand(H, W, 3, generator=gen)
    lr = torch.randn(5, h, w, generator=gen)
    field = random_field(h, w, gen, sigma=(0.5, 6.0))
    before = compiled.compiled_graph_count()
    for options in (RenderOptions(), RenderOptions(border="unique", radius_units="lr", alpha=0.5)):
        engine = BlockEngine(Guide(guide.numpy(), "none"), (h, w), options, CPU)
        out = torch.full((5, H, W), float("nan"))
        render_field(engine, lr, field, out, budget=2**30, backend="compiled")
        ref = reference_render(
            lr,
            guide.permute(2, 0, 1),
            field.sigma_x,
            field.sigma_y,
            field.theta,
            field.sigma_r,
            radius=options.radius,
            alpha=options.alpha,
            unique_border=options.border == "unique",
            radius_in_lr_cells=options.radius_units == "lr",
        )
        assert rel_err(out, ref) < 1e-4
    assert compiled.compiled_graph_count() - before <= 2


def test_backend_choice_and_errors(monkeypatch):
    """The table of core/engine/backends.py, for the rows that do not depend on this machine."""

    def fit(backend, channels=4, **kw):  # 4 guide channels: never the C kernel
        return backends.choose_backend(backend, CPU, "fit", guide_channels=channels, **kw)

    assert fit("eager") == KernelChoice("eager", "eager")
    with pytest.raises(ValueError, match="backend='fast'"):
        fit("fast")
    with pytest.raises(ValueError, match="mode='train'"):
        backends.choose_backend("auto", CPU, "train", guide_channels=3)
    monkeypatch.setattr(backends, "compiler_available", lambda device_type: False)
    assert fit("auto") == KernelChoice("eager", "eager")  # no compiler: the eager fallback
    with pytest.raises(ValueError, match="C\\+\\+ compiler"):
        fit("compiled")
    assert fit("eager", mixed=True) == KernelChoice("compiled", "mixed")  # torch operations: no compiler needed
    monkeypatch.setattr(backends, "compiler_available", lambda device_type: True)
    assert fit("auto", pair_evals=1e6) == KernelChoice("eager", "eager")  # too small to repay compiling
    assert fit("auto", pair_evals=1e12) == KernelChoice("compiled", "inductor")
    assert backends.choose_backend("auto", CPU, "render", guide_channels=4) == KernelChoice("eager", "eager")
    assert backends.choose_backend("compiled", CPU, "render", guide_channels=3) == KernelChoice("compiled", "inductor")
    if native.available():  # the C kernel: always worth building for a fit; its weights for an auto render
        assert fit("auto", channels=3, pair_evals=1.0) == KernelChoice("compiled", "native")
        assert fit("compiled", channels=3) == KernelChoice("compiled", "native")
        assert backends.choose_backend("auto", CPU, "render", guide_channels=3) == KernelChoice("eager", "native")
        assert backends.choose_backend("eager", CPU, "render", guide_channels=3) == KernelChoice("eager", "eager")


def test_threads_option_sets_and_restores_torch_threads():
    before = torch.get_num_threads()
    with torch_threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="threads="):
            with torch_threads(bad):
                pass
    seen = []
    rng = np.random.default_rng(1)
    guide = (rng.random((28, 28, 3)) * 255).astype(np.uint8)
    hr = upa.upsample(
        guide,
        rng.random((2, 2, 2)).astype(np.float32),
        steps=1,
        threads=1,
        backend="eager",
        progress=lambda *a, **k: seen.append(torch.get_num_threads()),
    )
    assert hr.shape == (2, 28, 28) and set(seen) == {1}
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads="):
        upa.render(np.zeros((1, 2, 2), np.float32), guide, upa.KernelField.initial((2, 2)), threads=0)


def _subnormals_flushed_in_parallel() -> float:
    """Fraction of a 2M-element product (split over torch's threads) that came out as 0 where
    the exact result is a float32 subnormal (1e-40): 0 when no thread flushes, 1 when all do."""
    x = torch.full((2_000_000,), 1e-20)
    return float(((x * 1e-20) == 0).float().mean())


@pytest.mark.skipif(not native.available(), reason="no C compiler to build the native library")
def test_engine_flushes_denormals_in_torch_worker_threads_too():
    """With 2 threads, torch's worker threads flush during an engine call (their subnormal
    softmax weights made a render 5x slower) and are restored after it."""
    import napari_upsample_anything as upa

    img = np.random.default_rng(0).random((56, 56, 3)).astype(np.float32)
    inside = []
    with torch_threads(2):
        assert _subnormals_flushed_in_parallel() == 0.0
        upa.fit_kernels(img, (4, 4), steps=2, device="cpu", progress=lambda *a: inside.append(_subnormals_flushed_in_parallel()))
        assert inside and min(inside) == 1.0  # every thread flushed during the call
        assert _subnormals_flushed_in_parallel() == 0.0  # and none after it


def test_engine_flushes_denormals_only_during_its_own_calls(gen):
    """The render/fit flush subnormals for speed and leave the caller's FP state as it was."""
    import napari_upsample_anything as upa
    from napari_upsample_anything.core.threads import _flushing_denormals, flushed_denormals

    assert not _flushing_denormals()
    with flushed_denormals():
        assert _flushing_denormals()
    assert not _flushing_denormals()
    img = np.random.default_rng(0).random((28, 28, 3)).astype(np.float32)
    field = upa.fit_kernels(img, (2, 2), steps=2, device="cpu")
    upa.render(np.ones((1, 2, 2), np.float32), img, field, device="cpu")
    assert not _flushing_denormals()
