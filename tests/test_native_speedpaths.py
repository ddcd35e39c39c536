"""The native CPU kernel's speed paths (core/engine/native.py): each checked against float64, and the
roofline benchmark's quick mode (benchmarks/bench_roofline.py; it measures, never asserts time)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import rel_err
from reference_fit64 import float64_fit_losses

from napari_upsample_anything.core.engine import compiled, native
from napari_upsample_anything.core.engine.blocks import RenderOptions
from napari_upsample_anything.core.fit import fit_field
from napari_upsample_anything.core.guide import Guide

needs_native = pytest.mark.skipif(not native.available(), reason="no C compiler to build the native kernel")
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_roofline.py"


def _chunk(gen, B=3, P=29, K=41, G=3):
    """Random fit-chunk inputs in float64 (a decaying, positive definite kernel)."""
    d = dict(dtype=torch.float64)
    phi = torch.randn(B, 6, P, generator=gen, **d)
    abc = 0.5 * torch.randn(3, B, K, generator=gen, **d)
    abc[0], abc[2] = abc[0].abs() + 0.5, abc[2].abs() + 0.5
    abc[1] = abc[1].clamp(-0.4, 0.4)
    rho = 20 * torch.rand(1, B, K, generator=gen, **d)
    d_y, d_x = 2 * torch.randn(B, K, generator=gen, **d), 2 * torch.randn(B, K, generator=gen, **d)
    ic, jd = torch.randn(B, G, P, generator=gen, **d), torch.randn(B, G, K, generator=gen, **d)
    vals, target = torch.randn(B, G, K, generator=gen, **d), torch.randn(B, G, P, generator=gen, **d)
    weight = torch.rand(B, P, generator=gen, **d)
    r2_pix = torch.randint(1, K, (B, P), generator=gen, dtype=torch.int32)
    r2_off = torch.arange(K, dtype=torch.int32)
    repeated = torch.rand(B, K, generator=gen) < 0.2
    repeated[:, 0] = False
    return dict(
        phi=phi, coef=torch.cat([abc, rho]), d_y=d_y, d_x=d_x, ic=ic, jd=jd, vals=vals, target=target,
        weight=weight, r2_pix=r2_pix, r2_off=r2_off, repeated=repeated,
    )  # fmt: skip


def _f32(x: dict):
    names = ("phi", "coef", "d_y", "d_x", "ic", "jd", "vals", "target", "weight")
    return [x[n].float() for n in names] + [x["r2_pix"], x["r2_off"], x["repeated"]]


def _compiled_reference(x: dict):
    """``(loss, grad [4, B, K])`` of a chunk through the compiled-path formulas (A, B, C, rho)."""
    psi = compiled.spatial_coefficients(x["coef"], x["d_y"], x["d_x"])
    loss, _, grad_psi, grad_rho = compiled.fit_chunk(
        x["phi"], psi, x["coef"][3], x["ic"], x["jd"], x["vals"], x["target"], x["weight"],
        x["r2_pix"], x["r2_off"], x["repeated"],
    )  # fmt: skip
    return loss, torch.cat([compiled.spatial_coefficients_backward(grad_psi, x["d_y"], x["d_x"]), grad_rho[None]])


def _separable_chunk(gen, G=3, rho_scale=1.0):
    """Fit-chunk inputs (float32) whose pixel features are the monomials (lx^2, lx ly, ly^2, lx,
    ly, 1) as pixel_features makes them, in rows of 7 pixels sharing ly (3 blocks of 42 pixels,
    45 neighbours): radii that differ per pixel, repeated neighbours, pixel 5 of weight 0;
    block 0's first rho times ``rho_scale``."""
    B, P, K, px = 3, 42, 45, 7
    y, x = torch.arange(P) // px, torch.arange(P) % px
    ly = ((y.double() - 2.5)[None].repeat(B, 1) + 0.1 * torch.randn(B, 1, generator=gen, dtype=torch.float64)).float()
    lx = ((x.double() - 3.0)[None].repeat(B, 1) + 0.1 * torch.randn(B, 1, generator=gen, dtype=torch.float64)).float()
    phi = torch.stack([lx * lx, lx * ly, ly * ly, lx, ly, torch.ones_like(lx)], 1)  # float32 products
    abc = 0.3 * torch.randn(3, B, K, generator=gen)
    abc[0], abc[2] = abc[0].abs() + 0.1, abc[2].abs() + 0.1
    abc[1] = abc[1].clamp(-0.05, 0.05)
    rho = 20 * torch.rand(1, B, K, generator=gen)
    rho[0, 0] *= rho_scale
    d_y, d_x = torch.randint(-3, 4, (2, B, K), generator=gen).float() * 7
    d_y[:, 0] = d_x[:, 0] = 0.0
    ic, jd = 0.3 * torch.randn(B, G, P, generator=gen), 0.3 * torch.randn(B, G, K, generator=gen)
    vals, target = torch.randn(B, G, K, generator=gen), torch.randn(B, G, P, generator=gen)
    weight = torch.rand(B, P, generator=gen)
    weight[:, 5] = 0.0
    r2_pix = torch.randint(4, K, (B, P), generator=gen, dtype=torch.int32)
    repeated = torch.rand(B, K, generator=gen) < 0.1
    repeated[:, 0] = False
    return dict(
        phi=phi, coef=torch.cat([abc, rho]), d_y=d_y, d_x=d_x, ic=ic, jd=jd, vals=vals, target=target,
        weight=weight, r2_pix=r2_pix, r2_off=torch.arange(K, dtype=torch.int32), repeated=repeated,
    )  # fmt: skip


def _float64(x: dict) -> dict:
    return {k: v.double() if v.is_floating_point() else v for k, v in x.items()}


@needs_native
def test_loss_only_mode_gives_the_same_loss_and_no_gradient(gen):
    """want_grad=False (the final loss, the benchmark's forward) skips the gradient pass only."""
    x = _chunk(gen)
    full = native.fit_chunk(*_f32(x))
    loss_only = native.fit_chunk(*_f32(x), want_grad=False)
    assert float(loss_only[0]) == float(full[0]) and float(loss_only[1]) == float(full[1])
    assert torch.count_nonzero(loss_only[2]) == 0 and torch.count_nonzero(full[2]) > 0
    ref_loss, _ = _compiled_reference(x)
    assert float(loss_only[0]) == pytest.approx(float(ref_loss), rel=1e-4)


@needs_native
@pytest.mark.parametrize("G", [1, 3])
def test_one_pass_softmax_agrees_with_its_max_shifted_fallback(gen, G):
    """The fit kernel's one-pass softmax (no maximum subtracted) and the max-shifted one it falls
    back to when a pixel's denominator is out of range compute the same chunk: a range term that
    is the same for every pair (ic = c, jd = 0, one rho) shifts every log-weight by -80, which
    sends every pixel to the fallback and changes neither the softmax nor the gradients of A, B
    and C. Real pixel features (a Gaussian's exponents)."""
    B, P, K = 3, 37, 45
    ly, lx = 6 * torch.rand(2, B, P, generator=gen, dtype=torch.float64) - 3
    phi = torch.stack([lx * lx, lx * ly, ly * ly, lx, ly, torch.ones_like(lx)], 1)
    abc = 0.5 * torch.randn(3, B, K, generator=gen, dtype=torch.float64)
    abc[0], abc[2] = abc[0].abs() + 0.3, abc[2].abs() + 0.3
    abc[1] = abc[1].clamp(-0.25, 0.25)
    rho = torch.full((1, B, K), 20.0, dtype=torch.float64)
    d_y, d_x = (torch.randint(-3, 4, (2, B, K), generator=gen) * 2.0).double()
    d_y[:, 0] = d_x[:, 0] = 0.0  # the centre cell
    vals, target = torch.randn(B, G, K, generator=gen), torch.randn(B, G, P, generator=gen)
    weight = torch.rand(B, P, generator=gen)
    r2_pix = torch.randint(4, K, (B, P), generator=gen, dtype=torch.int32)
    r2_off, repeated = torch.arange(K, dtype=torch.int32), torch.zeros(B, K, dtype=torch.bool)
    coef = torch.cat([abc, rho]).float()
    jd = torch.zeros(B, G, K)

    def run(shift: float):
        ic = torch.full((B, G, P), (shift / (20.0 * G)) ** 0.5)
        return native.fit_chunk(
            phi.float(), coef, d_y.float(), d_x.float(), ic, jd, vals, target, weight, r2_pix, r2_off, repeated
        )  # fmt: skip

    fast, fallback = run(0.0), run(80.0)
    assert float(fast[0]) == pytest.approx(float(fallback[0]), rel=1e-5)
    assert float(fast[1]) == pytest.approx(float(fallback[1]), rel=1e-5)
    assert all(rel_err(fast[2][i], fallback[2][i]) < 1e-5 for i in range(3))
    # rho's gradient is 0 without the shift and 4 x (a sum that is 0) with it: only rounding to
    # compare, so the float64 tests (test_fused.py) check it on both paths instead


@needs_native
@pytest.mark.parametrize("G", [1, 3])
def test_separable_spatial_term_agrees_with_the_general_form_and_float64(gen, G):
    """Pixel features that are the monomials (lx^2, lx ly, ly^2, lx, ly, 1) (as pixel_features
    makes them, rows of pixels sharing ly) take the row-wise quadratic in lx; a block where one
    feature is off by one ulp takes the general six-term form. Both agree with each other within
    1e-5 and with float64 within 1e-4. Pixels of weight 0 are skipped entirely."""
    x = _separable_chunk(gen, G)
    phi, coef, ic = x["phi"], x["coef"], x["ic"]
    rest = tuple(x[name] for name in ("d_y", "d_x", "ic", "jd", "vals", "target", "weight", "r2_pix", "r2_off", "repeated"))
    d_y, d_x = x["d_y"], x["d_x"]
    separable = native.fit_chunk(phi, coef, *rest)
    general_phi = phi.clone()
    general_phi[:, 1, 6] = torch.nextafter(general_phi[:, 1, 6], torch.tensor(1e9))
    general = native.fit_chunk(general_phi, coef, *rest)
    # pixel 5 has weight 0: it takes no part at all (not even in the separability check), so
    # garbage there changes nothing, bit for bit
    skipped_phi, skipped_ic = phi.clone(), ic.clone()
    skipped_phi[:, :, 5], skipped_ic[:, :, 5] = float("nan"), float("inf")
    skipped = native.fit_chunk(skipped_phi, coef, d_y, d_x, skipped_ic, *rest[3:])
    assert float(skipped[0]) == float(separable[0]) and torch.equal(skipped[2], separable[2])
    assert float(separable[0]) == pytest.approx(float(general[0]), rel=1e-5)
    assert all(rel_err(separable[2][i], general[2][i]) < 1e-5 for i in range(4))
    assert not torch.equal(separable[2], general[2])  # the two forms really ran (they round differently)
    loss, ref = _compiled_reference(_float64(x))
    assert float(separable[0]) == pytest.approx(float(loss), rel=1e-4)
    assert all(rel_err(separable[2][i], ref[i]) < 1e-4 for i in range(4))


@needs_native
def test_skipping_the_dropped_tail_of_the_offsets_changes_nothing(gen):
    """Offsets come sorted by distance, so a small dynamic radius keeps a prefix and the kernel
    stops each pixel's loops (and the gradient's neighbour groups) after it. The same chunk
    with its neighbours in reverse order (the kept ones at the end: nothing skipped) gives the
    same loss and, per neighbour, the same gradient; both agree with float64. Blocks with one
    small radius, blocks with mixed radii, and a block at full radius."""
    B, P, K = 4, 30, 61
    x = _chunk(gen, B=B, P=P, K=K)
    x["r2_off"] = torch.arange(K, dtype=torch.int32) // 3  # non-decreasing, like Offsets.r2
    x["r2_pix"][0] = 3  # one small radius: a short kept prefix
    x["r2_pix"][1] = torch.randint(1, 8, (P,), generator=gen, dtype=torch.int32)  # mixed small radii
    x["r2_pix"][3] = K  # everything kept
    x["repeated"][:] = False
    rev = torch.arange(K - 1, -1, -1)
    flipped = dict(x)
    for name in ("coef", "d_y", "d_x", "jd", "vals", "repeated"):
        flipped[name] = x[name].index_select(x[name].dim() - 1, rev)
    flipped["r2_off"] = x["r2_off"].index_select(0, rev)
    prefix = native.fit_chunk(*_f32(x))
    whole = native.fit_chunk(*_f32(flipped))
    assert float(prefix[0]) == pytest.approx(float(whole[0]), rel=1e-5)
    assert all(rel_err(prefix[2][i], whole[2][i].index_select(1, rev)) < 1e-5 for i in range(4))
    loss, ref = _compiled_reference(x)
    assert float(prefix[0]) == pytest.approx(float(loss), rel=1e-4)
    assert all(rel_err(prefix[2][i], ref[i]) < 1e-4 for i in range(4))


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
def test_gather_and_scatter_inside_the_kernel_equal_index_select_and_index_add(gen, threads):
    """With the neighbour cells ``q``, the kernel reads the coefficient map itself and adds the
    gradients into the map's gradient: the same loss, the same per-neighbour gradients and
    bit for bit the sums of ``index_add_`` (same order; cells repeated within and across blocks),
    whatever the thread count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        args = _f32(_chunk(gen, B=7, P=29, K=41))
        B, K, N = 7, 41, 23
        q = torch.randint(0, N, (B * K,), generator=gen)
        cmap = torch.randn(4, N, generator=gen)
        cmap[[0, 2]] = cmap[[0, 2]].abs() + 0.5
        cmap[1] = cmap[1].clamp(-0.4, 0.4)
        cmap[3] = 20 * torch.rand(N, generator=gen)
        gathered = args[:1] + [cmap.index_select(1, q).reshape(4, B, K).contiguous()] + args[2:]
        loss, sq, grad_coef = native.fit_chunk(*gathered)
        start = torch.randn(4, N, generator=gen)
        inside = start.clone()
        loss_q, sq_q, grad_coef_q = native.fit_chunk(*args[:1], cmap, *args[2:], q=q, grad_out=inside)
        assert float(loss_q) == float(loss) and float(sq_q) == float(sq) and torch.equal(grad_coef_q, grad_coef)
        assert torch.equal(inside, start.clone().index_add_(1, q, grad_coef.reshape(4, -1)))
        untouched = start.clone()
        native.fit_chunk(*args[:1], cmap, *args[2:], want_grad=False, q=q, grad_out=untouched)
        assert torch.equal(untouched, start)
    finally:
        torch.set_num_threads(previous)


@needs_native
@pytest.mark.parametrize(
    "hr, lr, options",
    [
        ((224, 224), (16, 16), RenderOptions()),
        ((100, 77), (7, 5), RenderOptions()),  # non-integer scale: padded blocks
        ((333, 517), (41, 23), RenderOptions(alpha=1.7, radius=6)),  # alpha not a float32 integer
        ((150, 130), (11, 9), RenderOptions(radius_units="lr", radius=3, alpha=2.3)),
    ],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_native_dynamic_radius_equals_the_torch_path(hr, lr, options, threads, monkeypatch):
    """BlockEngine.radius_sq through the C kernel gives exactly the torch path's integers (the
    same float64 bilinear sums, rounded once, the same float32 ceil): which pairs are dropped
    must not change. Random sigma maps spanning every radius, several tiles."""
    from napari_upsample_anything.core.engine.blocks import BlockEngine
    from napari_upsample_anything.core.field import KernelField

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(sum(hr) + threads)
    engine = BlockEngine(Guide(np.zeros((*hr, 3), np.float32), "none"), lr, options, torch.device("cpu"))
    seen, compared = set(), 0
    try:
        for _ in range(3):
            raw = KernelField.initial(lr).raw()
            lo, hi = (-1.5, 3.5) if options.radius_units == "hr" else (0.5, 4.5)
            raw[:2] = torch.empty(2, *lr).uniform_(lo, hi, generator=gen)
            field = KernelField.from_raw(raw)
            sigma = torch.maximum(field.sigma_x, field.sigma_y)
            for tile in engine.plan(engine.bytes_per_block(3, 4, training=True), 3_000_000)[:4]:
                fast = engine.radius_sq(sigma, tile)
                with monkeypatch.context() as m:
                    m.setattr(native, "_library", lambda: None)  # the torch path
                    slow = engine.radius_sq(sigma, tile)
                assert fast.dtype == slow.dtype == torch.int64 and torch.equal(fast, slow)
                assert torch.equal(engine.radius_sq(sigma, tile, dtype=torch.int32), slow.to(torch.int32))
                seen |= set(slow.unique().tolist())
                compared += slow.numel()
    finally:
        torch.set_num_threads(previous)
    assert len(seen) >= 3 and compared > 10_000  # the radii really vary


@needs_native
@pytest.mark.parametrize(
    "shape, G, C, options",
    [
        ((50, 37, 7, 5), 3, 3, RenderOptions()),  # non-integer scale: padded blocks
        ((48, 80, 3, 5), 1, 2, RenderOptions(border="unique")),  # masked (unique border) pairs
        ((45, 61, 6, 9), 2, 5, RenderOptions(radius_units="lr", radius=3)),  # per-pixel dynamic radii
        ((40, 44, 5, 6), 3, native.FUSED_RENDER_MAX_CHANNELS, RenderOptions()),
        ((33, 40, 4, 3), 3, 1, RenderOptions(radius=0)),
    ],
)
def test_fused_render_of_few_channels_against_float64_and_the_gemm_path(shape, G, C, options, gen, monkeypatch):
    """Up to FUSED_RENDER_MAX_CHANNELS channels the native kernel aggregates the values itself
    (no weights written, no GEMM): the dense float64 reference within 1e-4, and the
    weights-then-GEMM path (its fallback above the threshold) within 1e-5."""
    from conftest import random_field
    from reference_gsjbu import reference_render

    from napari_upsample_anything.core.engine.blocks import BlockEngine
    from napari_upsample_anything.core.render import render_field

    H, W, h, w = shape
    guide = torch.rand(H, W, G, generator=gen)
    lr = torch.randn(C, h, w, generator=gen)
    field = random_field(h, w, gen, sigma=(0.5, 6.0) if options.radius_units == "lr" else (0.5, 40.0))
    engine = BlockEngine(Guide(guide.numpy(), "none", channel_axis=-1), (h, w), options, torch.device("cpu"))
    fused_calls = []
    kernel = native.render_weights
    monkeypatch.setattr(
        native, "render_weights", lambda *a, **k: fused_calls.append(k.get("vals") is not None) or kernel(*a, **k)
    )
    fused = torch.full((C, H, W), float("nan"))
    render_field(engine, lr, field, fused, budget=2**30, backend="auto")
    assert fused_calls and all(fused_calls)
    monkeypatch.setattr(native, "FUSED_RENDER_MAX_CHANNELS", 0)
    fused_calls.clear()
    gemm = torch.full((C, H, W), float("nan"))
    render_field(engine, lr, field, gemm, budget=2**30, backend="auto")
    assert fused_calls and not any(fused_calls)
    ref = reference_render(
        lr, guide.permute(2, 0, 1), field.sigma_x, field.sigma_y, field.theta, field.sigma_r,
        radius=options.radius, alpha=options.alpha, unique_border=options.border == "unique",
        radius_in_lr_cells=options.radius_units == "lr",
    )  # fmt: skip
    assert rel_err(fused, ref) < 1e-4 and rel_err(fused, gemm) < 1e-5


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_roofline", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_roofline"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_roofline", None)


def test_roofline_benchmark_quick_mode_writes_its_table(bench, tmp_path, capsys):
    """--quick runs every part (fit step split, render split, both thread counts) and puts the
    table between its markers, replacing an earlier one and keeping the rest of the page."""
    page = tmp_path / "page.md"
    page.write_text("# Engine\n\nkept text\n")
    assert bench.main(["--quick", "--threads", "1", "--out", str(page)]) == 0
    first = page.read_text()
    assert first.startswith("# Engine\n\nkept text\n") and first.count(bench.MARK_BEGIN) == 1
    rows = [line for line in first.splitlines() if line.startswith("| fit step") or line.startswith("| render")]
    assert len(rows) == 3  # fit at 56^2 and 112^2, render at 56^2
    assert all("forward" in r and "update" in r for r in rows[:2]) and "products" in rows[2]
    assert "cores" in first and ("AVX" in first or "SSE" in first)  # names the CPU and its vector unit
    assert bench.main(["--quick", "--threads", "1", "--no-upsample", "--out", str(page)]) == 0
    assert page.read_text().count(bench.MARK_BEGIN) == 1 and "kept text" in page.read_text()


def test_native_without_extensions_from_the_environment(monkeypatch):
    """UPSAMPLE_ANYTHING_NATIVE_WITHOUT=avx512f builds the kernel with -mno-avx512f and no 512-bit
    tuning, and says so; a name that is no extension is refused with the variable named."""
    monkeypatch.setenv(native.WITHOUT_ENV, "avx512f")
    flags = native.compile_flags()
    assert "-mno-avx512f" in flags and "-mprefer-vector-width=512" not in flags
    assert native.vector_width() != "512-bit (AVX-512)"
    if "avx2" in native._cpu_flags():
        assert native.vector_width() == "256-bit (AVX2)"
    monkeypatch.setenv(native.WITHOUT_ENV, "avx2, avx512f")
    assert native.compile_flags()[-2:] == ["-mno-avx2", "-mno-avx512f"] and "AVX" not in native.vector_width()
    monkeypatch.setenv(native.WITHOUT_ENV, "avx")  # -mno-avx: no AVX2 nor AVX-512 either
    assert "AVX" not in native.vector_width()
    monkeypatch.setenv(native.WITHOUT_ENV, "avx512f -O0;rm")
    with pytest.raises(ValueError, match="UPSAMPLE_ANYTHING_NATIVE_WITHOUT.*'-O0;rm'"):
        native.compile_flags()


@needs_native
def test_roofline_benchmark_isa_avx2_runs_avx2_code_in_a_child(tmp_path):
    """--isa avx2 reruns the benchmark with the kernel built without AVX-512 and torch on its AVX2
    kernels, says so in its table, and writes the table between markers of its own."""
    page = tmp_path / "page.md"
    page.write_text("# Engine\n")
    run = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--threads", "1", "--isa", "avx2", "--no-upsample", "--out", str(page)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if "avx2" not in native._cpu_flags():
        assert run.returncode == 2 and "this CPU has no AVX2" in run.stderr
        return
    assert run.returncode == 0, run.stderr[-2000:]
    text = page.read_text()
    assert "<!-- bench_roofline avx2:begin -->" in text and "<!-- bench_roofline:begin -->" not in text
    machine = next(line for line in text.splitlines() if line.startswith("Machine:"))
    assert "-mno-avx512f" in machine and "256-bit (AVX2) vectors" in machine and "(AVX2 kernels)" in machine
    assert len([line for line in text.splitlines() if line.startswith("| fit step")]) == 2


@needs_native
def test_inlined_exp_error_bound():
    """The kernels' exp, in base 2 (exact range reduction + degree-5 polynomial): relative error
    < 5e-7 against float64 on a dense grid of the clamped range [-126, 115] (measured 2.4e-7),
    clamped outside it to values that cannot overflow or go negative, and exactly 2^n at integers."""
    x = torch.linspace(-126.0, 115.0, 4_000_001, dtype=torch.float32)
    x = torch.cat([x, -torch.rand(100_000, generator=torch.Generator().manual_seed(0)) * 2.0])
    got = native.exp2_values(x).double()
    ref = torch.exp2(x.double())
    assert float(((got - ref).abs() / ref).max()) < 5e-7
    low = native.exp2_values(torch.tensor([-127.0, -1e4, -3e38]))
    assert bool(((low >= 0) & (low < 1.2e-38)).all())  # 2^-126 = 1.18e-38
    high = native.exp2_values(torch.tensor([116.0, 1e4, 3e38]))
    assert bool((torch.isfinite(high) & (high > 4e34)).all())  # 2^115 = 4.2e34
    n = torch.arange(-126, 116, dtype=torch.float32)
    assert float(((native.exp2_values(n).double() - torch.exp2(n.double())).abs() / torch.exp2(n.double())).max()) < 2e-7


@needs_native
@pytest.mark.parametrize("without", [(), ("avx512f",), ("avx512f", "avx2")])
def test_vector_exp_error_bound(without):
    """The 2^x of the fit kernel's vector paths, in each build this CPU can run: AVX-512 (32-entry
    table, degree-2 polynomial, VSCALEFPS: no clamp, 0 below 2^-150, inf from 2^128) and AVX2
    (8-entry table, degree-3 polynomial, clamped to [-126, 115] like the portable exp). Relative
    error < 2e-7 against float64 on a dense grid (measured 1.6e-7 and 1.1e-7), exactly 2^n at
    integers. A build has the path its flags allow, and the portable loops only otherwise."""
    from napari_upsample_anything.core.threads import flushed_denormals

    lib = native.build_without(*without)
    assert lib is not None
    cpu = native._cpu_flags() - {name for name in without}
    expected = 512 if "avx512f" in cpu else 256 if {"avx2", "fma"} <= cpu else 0
    x = torch.linspace(-126.0, 115.0, 4_000_001, dtype=torch.float32)
    x = torch.cat([x, -torch.rand(100_003, generator=torch.Generator().manual_seed(0)) * 2.0])  # odd length: a tail
    with flushed_denormals():
        got, width = native.exp2_values_vector(x, lib)
        assert width == expected
        if width == 0:
            assert got is None
            return
        ref = torch.exp2(x.double())
        assert float(((got.double() - ref).abs() / ref).max()) < 2e-7
        n = torch.arange(-126, 116, dtype=torch.float32)
        assert torch.equal(native.exp2_values_vector(n, lib)[0].double(), torch.exp2(n.double()))
        low, _ = native.exp2_values_vector(torch.tensor([-151.0, -1e4, -3e38]), lib)
        high, _ = native.exp2_values_vector(torch.tensor([128.0, 1e4, 3e38]), lib)
        if width == 512:
            assert torch.equal(low, torch.zeros(3)) and bool(torch.isinf(high).all())
        else:  # clamped: 2^-126 and 2^115
            assert torch.equal(low, torch.full((3,), 2.0**-126)) and torch.equal(high, torch.full((3,), 2.0**115))


@needs_native
@pytest.mark.parametrize("rho_scale", [1.0, 300.0])  # 300: most pixels of block 0 take the max-shifted fallback
@pytest.mark.parametrize("without", [("avx512f",), ("avx512f", "avx2")])
@pytest.mark.parametrize("form", ["separable", "general"])
def test_vector_fit_paths_agree_with_narrower_builds_and_float64(gen, rho_scale, without, form):
    """On separable blocks the AVX-512 build runs its own forward (two pixels of a row per pass,
    the table exp), the AVX2 build its own (one pixel, another table exp; kept prefixes in
    vectors of 8), and a build with neither the portable loops; blocks of the general form take
    the portable loops in every build (kept prefixes in vectors of 16). Each computes what this
    CPU's build computes within 1e-5 and float64 within 1e-4: rows of 7 pixels (pairs and a
    pixel alone), radii that differ per pixel (more keep masks than the kernel caches), repeated
    neighbours, a pixel of weight 0, and denominators out of range (the fallback)."""
    x = _separable_chunk(gen, 3, rho_scale)
    if form == "general":  # one feature off by one ulp in every block: no row-wise quadratic
        x["phi"] = x["phi"].clone()
        x["phi"][:, 1, 6] = torch.nextafter(x["phi"][:, 1, 6], torch.tensor(1e9))
    args = _f32(x)
    narrower = native.build_without(*without)
    assert narrower is not None
    fast = native.fit_chunk(*args)
    slow = native.fit_chunk(*args, lib=narrower)
    assert float(fast[0]) == pytest.approx(float(slow[0]), rel=1e-5)
    assert all(rel_err(fast[2][i], slow[2][i]) < 1e-5 for i in range(4))
    loss, ref = _compiled_reference(_float64(x))
    for got in (fast, slow):
        assert float(got[0]) == pytest.approx(float(loss), rel=1e-4)
        assert all(rel_err(got[2][i], ref[i]) < 1e-4 for i in range(4))


@needs_native
def test_tuned_build_agrees_with_the_plain_build_and_float64(gen):
    """The library built with this CPU's tuning flags (native.compile_flags: 512-bit vectors on
    AVX-512) builds here and computes what the plain -march=native build and the float64
    formulas compute."""
    assert native.available()
    plain = native.plain_build()
    assert plain is not None
    x = _chunk(gen, B=4, P=37, K=53)
    tuned = native.fit_chunk(*_f32(x))
    other = native.fit_chunk(*_f32(x), lib=plain)
    assert float(tuned[0]) == pytest.approx(float(other[0]), rel=1e-6)
    assert rel_err(tuned[2], other[2]) < 1e-6
    loss, ref = _compiled_reference(x)
    assert float(tuned[0]) == pytest.approx(float(loss), rel=1e-4)
    assert all(rel_err(tuned[2][i], ref[i]) < 1e-4 for i in range(4))


@needs_native
def test_native_fit_loss_curve_follows_the_float64_reference():
    """51 published steps with the native kernel: the loss before every step within 0.1 % of
    the same fit computed in float64 (:func:`reference_fit64.float64_fit_losses`)."""
    rng = np.random.default_rng(3)
    guide = Guide((rng.random((50, 37, 3)) * 255).astype(np.uint8))  # non-integer scale: padded blocks
    fast = fit_field(guide, (7, 5), steps=51, budget=2**30, backend="auto")
    assert fast.meta["kernel"] == "native"
    ref = float64_fit_losses(guide, (7, 5), 51)
    assert np.abs(np.array(fast.meta["loss_per_step"]) / ref - 1).max() < 1e-3


@needs_native
@pytest.mark.parametrize(
    "shape, G, C, options",
    [
        ((50, 37, 7, 5), 3, 7, RenderOptions()),  # non-integer scale: padded blocks
        ((48, 80, 3, 5), 1, 40, RenderOptions(border="unique")),  # masked (unique border) pairs
        ((45, 61, 6, 9), 2, 4, RenderOptions(radius_units="lr", radius=3)),  # per-pixel dynamic radii
        ((33, 40, 4, 3), 3, 1, RenderOptions(radius=0)),
    ],
)
def test_native_render_weights_against_float64(shape, G, C, options, gen, monkeypatch):
    """render(backend='auto') on the CPU takes its softmax weights from the C kernel; the result
    equals the dense float64 reference within 1e-4 (and the eager path's)."""
    from conftest import random_field
    from reference_gsjbu import reference_render

    from napari_upsample_anything.core.engine.blocks import BlockEngine
    from napari_upsample_anything.core.render import render_field

    H, W, h, w = shape
    guide = torch.rand(H, W, G, generator=gen)
    lr = torch.randn(C, h, w, generator=gen)
    field = random_field(h, w, gen, sigma=(0.5, 6.0) if options.radius_units == "lr" else (0.5, 40.0))
    engine = BlockEngine(Guide(guide.numpy(), "none", channel_axis=-1), (h, w), options, torch.device("cpu"))
    calls = []
    kernel = native.render_weights
    monkeypatch.setattr(native, "render_weights", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    out = torch.full((C, H, W), float("nan"))
    render_field(engine, lr, field, out, budget=2**30, backend="auto")
    assert calls  # the native weights ran
    eager = torch.full((C, H, W), float("nan"))
    render_field(engine, lr, field, eager, budget=2**30, backend="eager")
    ref = reference_render(
        lr, guide.permute(2, 0, 1), field.sigma_x, field.sigma_y, field.theta, field.sigma_r,
        radius=options.radius, alpha=options.alpha, unique_border=options.border == "unique",
        radius_in_lr_cells=options.radius_units == "lr",
    )  # fmt: skip
    assert rel_err(out, ref) < 1e-4 and rel_err(out, eager) < 1e-4


def test_loss_curve_benchmark_compares_trees_backends_and_float64(tmp_path):
    """bench_loss_curve.py fits in child processes (this tree and a git revision, two backends)
    and puts the pairwise table, float64 included, between its markers; the float32 curves of
    a tiny fit stay within 0.1 % of float64 and a curve is 0 from itself."""
    spec = importlib.util.spec_from_file_location("bench_loss_curve", BENCH.parent / "bench_loss_curve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    page = tmp_path / "page.md"
    args = ["--size", "42", "--steps", "4", "--backends", "eager", "auto", "--rev", "HEAD", "--threads", "1"]
    assert module.main([*args, "--out", str(page)]) == 0
    text = page.read_text()
    assert text.count(module.MARK_BEGIN) == 1 and "(this tree: " in text
    rows = [
        line.split("|")[1:-1]
        for line in text.splitlines()
        if line.startswith("| this tree") or line.startswith("| HEAD") or line.startswith("| float64")
    ]
    assert len(rows) == 5 and rows[-1][0].strip() == "float64"
    values = np.array([[float(v) for v in row[1:]] for row in rows])
    assert np.all(np.diag(values) == 0.0) and np.all(values[:, -1] < 0.1)
    assert np.array_equal(values, values.T)
