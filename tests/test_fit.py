"""Test-time optimisation: published loss curve, exact tiled gradient, quality, protocol."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import DATA, rel_err
from reference_gsjbu import reference_render

from napari_upsample_anything.core.engine import native
from napari_upsample_anything.core.engine.blocks import BlockEngine, RenderOptions
from napari_upsample_anything.core.errors import Cancelled, FitDivergedError
from napari_upsample_anything.core.field import KernelField, kernel_coefficients, kernel_coefficients_backward
from napari_upsample_anything.core.fit import (
    Adam,
    CellSampler,
    FusedParameters,
    _ChunkedFit,
    _loss_and_grad,
    _loss_and_grad_fused,
    _TileCache,
    fit_field,
    schedule_gamma,
)
from napari_upsample_anything.core.guide import Guide
from napari_upsample_anything.core.render import bicubic_lr_guide, render_field

CPU = torch.device("cpu")
needs_native = pytest.mark.skipif(not native.available(), reason="no C compiler to build the native fit kernel")


def test_loss_curve_matches_published_implementation():
    d = np.load(DATA / "fit_astronaut112.npz")
    guide = Guide(d["guide_hwc"])
    lr_img = bicubic_lr_guide(guide, (8, 8), CPU)
    assert rel_err(lr_img, d["lr_image"]) < 1e-5  # the fit's input is the published one
    field = fit_field(guide, (8, 8), budget=2**30)
    ours = np.array(field.meta["loss_per_step"])
    ref = d["loss_per_step"]
    assert ours.shape == ref.shape == (51,)
    assert ours[0] == pytest.approx(ref[0], rel=1e-5)  # same loss at the published start
    assert np.abs(ours / ref - 1).max() < 0.02  # the whole curve within 2 %
    assert field.meta["final_loss"] == pytest.approx(float(d["final_loss"]), rel=0.01)


def test_adam_matches_torch_optim():
    gen = torch.Generator().manual_seed(0)
    p1 = torch.randn(4, 3, 5, generator=gen)
    p2 = p1.clone().requires_grad_(True)
    p1.requires_grad_(True)
    ours = Adam(p1, lr=0.1, gamma=schedule_gamma(0.1))
    ref = torch.optim.Adam([p2], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(ref, lambda t: schedule_gamma(0.1) ** t)
    for _ in range(7):
        g = torch.randn(4, 3, 5, generator=gen)
        p1.grad = g.clone()
        p2.grad = g.clone()
        ours.step()
        ref.step()
        sched.step()
        assert torch.allclose(p1, p2, atol=1e-7, rtol=1e-6)


def _our_gradient(guide_hwc, lr_shape, raw, budget, path="eager", sampler=None):
    guide = Guide(guide_hwc, "none")
    engine = BlockEngine(guide, lr_shape, RenderOptions(), CPU)
    h, w = lr_shape
    values = bicubic_lr_guide(guide, lr_shape, CPU).permute(1, 2, 0).reshape(h * w, -1).contiguous()
    per_block = engine.bytes_per_block(guide.channels, 4, training=True)
    tiles = engine.plan(per_block, budget)
    raw = raw.clone().requires_grad_(True)
    n = guide.channels * guide.shape[0] * guide.shape[1]
    if path in ("fused", "inductor", "native"):
        prep = _ChunkedFit(
            engine, tiles, values, n, keep=True, compiled=True, kernel_name={"fused": "fused-eager"}.get(path, path)
        )
        loss, _ = _loss_and_grad_fused(prep, tiles, raw, per_block, None, None, sampler=sampler)
    else:
        cache = _TileCache(engine, path == "eager-range-cache", keep_range=path == "eager-range-cache")
        loss, _ = _loss_and_grad(engine, cache, tiles, raw, values, n, per_block, None, None, sampler=sampler)
    return loss, raw.grad, len(tiles)


@pytest.mark.parametrize(
    "budget,path",
    [
        (2**30, "eager"),
        (2_000_000, "eager"),
        (2_000_000, "eager-range-cache"),
        (2**30, "fused"),  # the compiled kernel's formulas, run eagerly (no compile time)
        (2_000_000, "fused"),
        (2_000_000, "inductor"),  # torch.compile of those formulas (Triton on CUDA)
        pytest.param(2**30, "native", marks=needs_native),  # the CPU C kernel
        pytest.param(2_000_000, "native", marks=needs_native),
    ],
)
def test_tiled_gradient_is_the_full_image_gradient(budget, path):
    """Gradient accumulated over tiles == autograd through the dense float64 reference."""
    gen = torch.Generator().manual_seed(7)
    H, W, h, w = 48, 60, 4, 5  # non-square, scale 12
    guide = torch.rand(H, W, 3, generator=gen)
    raw = KernelField.initial((h, w)).raw()
    raw = raw + 0.3 * torch.randn(raw.shape, generator=gen)  # away from the isotropic start
    loss, grad, n_tiles = _our_gradient(guide.numpy(), (h, w), raw, budget, path)
    if budget < 2**30:
        assert n_tiles > 1

    raw64 = raw.double().requires_grad_(True)
    f = KernelField.from_raw(raw64)
    lr_img = bicubic_lr_guide(Guide(guide.numpy(), "none"), (h, w), CPU).double()
    g64 = guide.double().permute(2, 0, 1)
    pred = reference_render(lr_img, g64, f.sigma_x, f.sigma_y, f.theta, f.sigma_r)
    ref_loss = (pred - g64).abs().mean()
    ref_loss.backward()
    assert loss == pytest.approx(float(ref_loss.detach()), rel=1e-5)
    assert rel_err(grad, raw64.grad) < 1e-3


# ------------------------------------------------------------------ optional stochastic fit
@pytest.mark.parametrize(
    "budget,path",
    [
        (2**30, "eager"),
        (2_000_000, "eager"),
        (2_000_000, "fused"),
        (2**30, "fused-small-chunks"),  # chunks of 3 blocks, padded: rows picked inside chunks
        pytest.param(2**30, "native", marks=needs_native),
        pytest.param(2_000_000, "native", marks=needs_native),
    ],
)
def test_stochastic_gradient_is_the_sampled_float64_gradient(monkeypatch, budget, path):
    """With ``fit_fraction < 1`` each path's loss and gradient are exactly those of the drawn
    cells' pixels, scaled by n / k, against autograd through the dense float64 reference."""
    import napari_upsample_anything.core.fit as fit_mod

    if path == "fused-small-chunks":
        monkeypatch.setattr(fit_mod, "compiled_chunk_blocks", lambda *a: 3)
        path = "fused"
    gen = torch.Generator().manual_seed(11)
    H, W, h, w, s = 48, 60, 4, 5, 12
    guide = torch.rand(H, W, 3, generator=gen)
    raw = KernelField.initial((h, w)).raw() + 0.3 * torch.randn(4, h, w, generator=gen)
    sampler = CellSampler(h, w, 0.4, seed=3, device=CPU)
    sampler.draw()
    assert int(sampler.mask.sum()) == 8 and sampler.weight == pytest.approx(20 / 8)
    loss, grad, _ = _our_gradient(guide.numpy(), (h, w), raw, budget, path, sampler=sampler)

    raw64 = raw.double().requires_grad_(True)
    f = KernelField.from_raw(raw64)
    lr_img = bicubic_lr_guide(Guide(guide.numpy(), "none"), (h, w), CPU).double()
    g64 = guide.double().permute(2, 0, 1)
    pred = reference_render(lr_img, g64, f.sigma_x, f.sigma_y, f.theta, f.sigma_r)
    pixels = sampler.mask.double().repeat_interleave(s, 0).repeat_interleave(s, 1)  # cell -> its pixels
    ref_loss = ((pred - g64).abs() * pixels).sum() / g64.numel() * (20 / 8)
    ref_loss.backward()
    assert loss == pytest.approx(float(ref_loss.detach()), rel=1e-5)
    assert rel_err(grad, raw64.grad) < 1e-3
    full_loss, _, _ = _our_gradient(guide.numpy(), (h, w), raw, budget, path)
    assert abs(loss - full_loss) > 1e-6  # it really is a different (sampled) loss


@pytest.mark.parametrize("units", ["hr", "lr"])
def test_radius_of_some_blocks_equals_the_tiles_rows(units):
    """The stochastic fit computes the dynamic radius of its drawn blocks only: the same
    integers as the whole tile's (non-integer scale, padded blocks, several tiles)."""
    gen = torch.Generator().manual_seed(5)
    guide = Guide(torch.rand(83, 61, 3, generator=gen).numpy(), "none")
    engine = BlockEngine(guide, (9, 7), RenderOptions(radius_units=units), CPU)
    raw = KernelField.initial((9, 7)).raw()
    raw[:2] = torch.empty(2, 9, 7).uniform_(-1.5, 2.5, generator=gen)  # sigma 0.2-12 px: radii 1 to 8
    field = KernelField.from_raw(raw)
    sigma = torch.maximum(field.sigma_x, field.sigma_y)
    tiles = engine.plan(engine.bytes_per_block(3, 4, training=True), 600_000)
    assert len(tiles) > 1
    seen = set()
    for tile in tiles:
        full = engine.radius_sq(sigma, tile)
        nb = full.shape[0]
        blocks = torch.randperm(nb, generator=gen)[: max(1, nb // 3)].sort().values
        some = engine.radius_sq(sigma, tile, blocks)
        assert some.dtype == full.dtype and torch.equal(some, full[blocks])
        seen |= set(full.unique().tolist())
    assert len(seen) >= 3  # the radii really vary


def test_cell_sampler_draws_fresh_seeded_cells_independent_of_tiles():
    a, b, c = (CellSampler(6, 7, 0.3, seed, CPU) for seed in (5, 5, 6))
    draws = []
    for _ in range(4):
        for smp in (a, b, c):
            smp.draw()
        assert int(a.mask.sum()) == math.ceil(0.3 * 42) == 13
        assert torch.equal(a.mask, b.mask)  # same seed, same cells
        draws.append(a.mask.clone())
    assert not torch.equal(a.mask, c.mask)  # another seed, other cells
    assert not all(torch.equal(draws[0], d) for d in draws[1:])  # fresh cells every step
    tiles = [(0, 3, 0, 7), (3, 6, 0, 4), (3, 6, 4, 7)]  # blocks of each tile, row-major
    picked = sum(int(a.blocks(t).numel()) for t in tiles)
    assert picked == 13 and a.blocks(tiles[0]).tolist() == a.mask[0:3].reshape(-1).nonzero().squeeze(1).tolist()
    exact = CellSampler(6, 7, 1.0, 0, CPU)
    exact.draw()
    assert exact.blocks(tiles[0]) is None and exact.weight == 1.0
    tiny = CellSampler(6, 7, 1e-9, 0, CPU)
    tiny.draw()
    assert int(tiny.mask.sum()) == 1  # at least one cell


@pytest.mark.parametrize("backend", ["eager", pytest.param("compiled", marks=needs_native)])
def test_stochastic_fit_is_reproducible_tiling_free_and_reports_the_exact_loss(backend):
    img = np.random.default_rng(4).random((64, 72, 3)).astype(np.float32)
    kw = dict(steps=6, backend=backend, fit_fraction=0.3, fit_seed=1)
    one = fit_field(Guide(img), (8, 9), budget=2**30, **kw)
    again = fit_field(Guide(img), (8, 9), budget=2**30, **kw)
    tiled = fit_field(Guide(img), (8, 9), budget=1_500_000, **kw)
    other_seed = fit_field(Guide(img), (8, 9), budget=2**30, **dict(kw, fit_seed=2))
    exact = fit_field(Guide(img), (8, 9), budget=2**30, steps=6, backend=backend)
    assert one.meta["fit_fraction"] == 0.3 and exact.meta["fit_fraction"] == 1.0
    assert one.meta["loss_per_step"] == again.meta["loss_per_step"] and torch.equal(one.sigma_x, again.sigma_x)
    assert np.allclose(tiled.meta["loss_per_step"], one.meta["loss_per_step"], rtol=1e-5)  # same cells however tiled
    assert not np.allclose(other_seed.meta["loss_per_step"], one.meta["loss_per_step"], rtol=1e-5)
    assert one.meta["loss_per_step"][0] != exact.meta["loss_per_step"][0]  # step 0: same field, sampled pixels
    # meta's final loss is the exact (every pixel) loss of the fitted field
    check = fit_field(Guide(img), (8, 9), budget=2**30, steps=0, init=one, backend=backend)
    assert one.meta["final_loss"] == pytest.approx(check.meta["final_loss"], rel=1e-6)
    assert one.meta["final_loss"] < exact.meta["loss_per_step"][0]  # it still learns
    default = fit_field(Guide(img), (8, 9), budget=2**30, steps=3, backend=backend)
    explicit = fit_field(Guide(img), (8, 9), budget=2**30, steps=3, backend=backend, fit_fraction=1.0, fit_seed=9)
    assert default.meta["loss_per_step"] == explicit.meta["loss_per_step"]  # 1.0 is the exact fit, seed unused


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, float("nan"), "half"])
def test_fit_fraction_is_checked(bad):
    img = np.random.default_rng(0).random((24, 24, 3)).astype(np.float32)
    with pytest.raises((ValueError, TypeError), match="fit_fraction"):
        fit_field(Guide(img), (2, 2), steps=1, budget=2**30, fit_fraction=bad)


def test_fit_lowers_loss_and_beats_bicubic_on_a_sample_image():
    skimage_data = pytest.importorskip("skimage.data")
    img = skimage_data.immunohistochemistry()[96:208, 128:240]  # 112 x 112 histology crop
    guide = Guide(img)
    field = fit_field(guide, (8, 8), budget=2**30)
    losses = field.meta["loss_per_step"]
    assert losses[-1] < 0.8 * losses[0]
    assert field.meta["final_loss"] < losses[-1]

    lr_img = bicubic_lr_guide(guide, (8, 8), CPU)
    engine = BlockEngine(guide, (8, 8), RenderOptions(), CPU)
    recon = torch.empty(3, 112, 112)
    render_field(engine, lr_img, field, recon, budget=2**30)
    truth = guide.full()
    bicubic = torch.nn.functional.interpolate(lr_img[None], size=(112, 112), mode="bicubic", align_corners=False)[0]

    def psnr(x):
        return 10 * math.log10(1.0 / float(((x.clamp(0, 1) - truth) ** 2).mean()))

    assert psnr(recon) > psnr(bicubic) + 1.0
    assert field.meta["psnr"] == pytest.approx(psnr(recon), abs=0.05)


def test_progress_and_cancel_within_one_step():
    img = np.random.default_rng(0).random((28, 28, 3)).astype(np.float32)
    calls = []
    field = fit_field(Guide(img), (2, 2), steps=4, budget=2**30, progress=lambda d, t, i: calls.append((d, t, i["loss"])))
    assert [c[:2] for c in calls] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert calls[0][2] == pytest.approx(field.meta["loss_per_step"][0])

    seen = []
    with pytest.raises(Cancelled):
        fit_field(
            Guide(img), (2, 2), steps=50, budget=2**30, progress=lambda d, t, i: seen.append(d), cancel=lambda: len(seen) >= 2
        )
    assert seen == [1, 2]


@needs_native
def test_cancel_in_the_first_compiled_step_is_not_a_compiler_failure():
    """A cancel inside step 0 of the compiled path used to trigger the eager fallback and its
    'compiled kernels unavailable' warning (seen in CI): it must just cancel."""
    import warnings

    img = np.random.default_rng(3).random((40, 40, 3)).astype(np.float32)
    polls = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(Cancelled):  # the loop's own poll passes, the first tile's cancels
            fit_field(Guide(img), (4, 4), steps=5, budget=2**30, backend="auto", cancel=lambda: polls.append(1) or len(polls) > 1)
    assert len(polls) == 2


@pytest.mark.parametrize("backend", ["eager", pytest.param("compiled", marks=needs_native)])
def test_out_of_memory_in_a_tile_is_retried_with_smaller_tiles(monkeypatch, backend):
    import napari_upsample_anything.core.fit as fit_mod

    img = np.random.default_rng(1).random((56, 56, 3)).astype(np.float32)
    expected = fit_field(Guide(img), (4, 4), steps=3, budget=2**30, backend=backend)
    owner, name = (fit_mod, "block_attention") if backend == "eager" else (native, "fit_chunk")
    real = getattr(owner, name)
    seen = []

    def flaky(phi, *args, **kwargs):
        seen.append(phi.shape[0])
        if phi.shape[0] > 4:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real(phi, *args, **kwargs)

    monkeypatch.setattr(owner, name, flaky)
    got = fit_field(Guide(img), (4, 4), steps=3, budget=2**30, backend=backend)
    assert got.meta["backend"] == backend
    assert max(seen) > 4 and seen[-1] <= 4  # it failed big, then succeeded small
    assert np.allclose(got.meta["loss_per_step"], expected.meta["loss_per_step"], rtol=1e-5)
    assert torch.allclose(got.sigma_x, expected.sigma_x, rtol=1e-4)


@needs_native
def test_loading_the_native_kernel_keeps_subnormal_floats():
    """Linking with -ffast-math would switch flush-to-zero on for the whole process."""
    import subprocess
    import sys

    code = (
        "import numpy as np\n"
        "from napari_upsample_anything.core.engine import native\n"
        "assert native.available()\n"
        "x = np.array([1e-39], np.float32)\n"
        "print(float((x * np.float32(1.0))[0]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip()) > 0.0, "subnormal float32 flushed to zero after loading the kernel"


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_written_out_parameterisation_backward_equals_autograd(dtype, tol):
    """kernel_coefficients_backward (the fused fit's chain rule from (A, B, C, rho) back to the raw
    parameters) equals autograd through KernelField.from_raw and kernel_coefficients, including
    sigmas below the 1e-6 clamp (no gradient) and saturated angles."""
    g = torch.Generator().manual_seed(5)
    raw = torch.randn(4, 9, 11, generator=g, dtype=dtype) * 3
    raw[0, 0, :3] = -20.0  # sigma_x = 2e-9 < 1e-6: clamped
    raw[3, 1, :3] = -20.0  # sigma_r clamped
    raw[2, 2, :3] = torch.tensor([8.0, -8.0, 0.0], dtype=dtype)  # tanh saturated, and theta = 0
    raw.requires_grad_(True)
    grad_coef = torch.randn(4, 9, 11, generator=g, dtype=dtype)
    kernel_coefficients(KernelField.from_raw(raw)).backward(grad_coef)
    written = kernel_coefficients_backward(raw.detach(), grad_coef)
    assert written.dtype == dtype and written.shape == raw.shape
    assert float((written - raw.grad).abs().max() / raw.grad.abs().max()) < tol
    assert float(written[0, 0, :3].abs().max()) == 0.0 and float(written[3, 1, :3].abs().max()) == 0.0


@needs_native
def test_native_parameter_step_equals_the_torch_steps_in_float64():
    """FusedParameters' native update (chain rule, Adam, next coefficients in one call, float64 per
    cell, rounded to float32) follows the same torch steps run in float64 over seven steps, clamped
    sigmas and saturated angles included: raw parameters, Adam's moments, coefficients and sigma_eff
    within 1e-6 (measured 2e-7). The torch steps in float32 are 1e-4 off at the saturated angles,
    where 1 - tanh^2 cancels; elsewhere both agree to float32 rounding."""
    g = torch.Generator().manual_seed(8)
    raw0 = torch.randn(4, 6, 7, generator=g) * 2
    raw0[0, 0, :3] = -20.0  # sigma_x = 2e-9 < 1e-6: clamped, no gradient
    raw0[3, 1, :3] = -20.0  # sigma_r clamped
    raw0[2, 2, :3] = torch.tensor([8.0, -8.0, 0.0])  # tanh saturated, and theta = 0
    fused, exact = raw0.clone().requires_grad_(True), raw0.double().requires_grad_(True)
    by_c = FusedParameters(fused, Adam(fused, lr=0.1, gamma=schedule_gamma(0.1)), use_native=True)
    by_torch = FusedParameters(exact, Adam(exact, lr=0.1, gamma=schedule_gamma(0.1)), use_native=False)

    def close(a, b):
        return float((a.double() - b).abs().max()) <= 1e-6 * float(b.abs().max())

    for step in range(7):
        for mine, ref in zip(by_c.coefficients, by_torch.coefficients):
            assert mine.dtype == torch.float32 and close(mine, ref)
        grad_coef = torch.randn(4, 42, generator=g) * 10 ** torch.empty(4, 42).uniform_(-3, 3, generator=g)
        by_c.update(grad_coef.clone(), step, 0.1)
        by_torch.update(grad_coef.double(), step, 0.1)
        assert close(fused.detach(), exact.detach())
        assert close(by_c.adam.exp_avg, by_torch.adam.exp_avg) and close(by_c.adam.exp_avg_sq, by_torch.adam.exp_avg_sq)
        assert by_c.adam.t == by_torch.adam.t == step + 1
    assert float(fused.detach()[0, 0, :3].sub(-20.0).abs().max()) == 0.0  # clamped: no gradient, no step


@needs_native
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 200.0, -200.0])
def test_native_parameter_step_reports_a_diverged_update(bad):
    """A raw parameter that is NaN / Inf, or a sigma that overflows (exp(200)) or underflows
    (exp(-200) = 0) float32 after the update, makes the native step report the cell, and the fit
    raise FitDivergedError naming the update and the learning rate."""
    raw = KernelField.initial((3, 4)).raw().clone().requires_grad_(True)
    params = FusedParameters(raw, Adam(raw, lr=0.1, gamma=schedule_gamma(0.1)), use_native=True)
    params.update(torch.zeros(4, 12), 0, 0.1)  # a sound step
    with torch.no_grad():
        raw[1, 2, 3] = bad  # sigma_y of one cell
    with pytest.raises(FitDivergedError, match=r"diverged at update 2: .* lr=0.1 is too large"):
        params.update(torch.zeros(4, 12), 1, 0.1)
