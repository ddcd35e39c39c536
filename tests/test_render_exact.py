"""The fast render against the float64 dense reference and the published test vectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import DATA, random_field, rel_err
from reference_gsjbu import reference_render

from napari_upsample_anything.core.engine.blocks import BlockEngine, RenderOptions
from napari_upsample_anything.core.field import KernelField
from napari_upsample_anything.core.guide import Guide
from napari_upsample_anything.core.render import render_field

CPU = torch.device("cpu")


def fast_render(lr, guide_hwc, field, options=RenderOptions(), budget=2**30, agg=torch.float32, normalize="none"):
    engine = BlockEngine(Guide(guide_hwc, normalize, channel_axis=-1), tuple(lr.shape[-2:]), options, CPU)
    out = torch.full((lr.shape[0], *engine.guide.shape), float("nan"))
    render_field(engine, lr, field, out, agg_dtype=agg, budget=budget)
    return out


@pytest.mark.parametrize("case", range(5))
def test_published_test_vectors(case):
    d = np.load(DATA / "render_cases.npz")
    get = lambda k: torch.from_numpy(d[f"case{case}_{k}"])  # noqa: E731
    field = KernelField(get("sigma_x"), get("sigma_y"), get("theta"), get("sigma_r"))
    out = fast_render(get("lr_map"), d[f"case{case}_guide_hwc"], field)
    assert rel_err(out, get("expected")) < 1e-4


def test_reference_matches_published_test_vectors():
    """The test oracle itself agrees with the published implementation's outputs."""
    d = np.load(DATA / "render_cases.npz")
    for case in range(5):
        get = lambda k: torch.from_numpy(d[f"case{case}_{k}"])  # noqa: E731
        ref = reference_render(
            get("lr_map"), get("guide_hwc").permute(2, 0, 1), get("sigma_x"), get("sigma_y"), get("theta"), get("sigma_r")
        )
        assert rel_err(ref, get("expected")) < 1e-6


SHAPES = [
    # (H, W, h, w): square / non-square, integer / non-integer / per-axis scales
    (56, 56, 4, 4),  # 14 x 14
    (48, 80, 3, 5),  # 16 x 16, non-square
    (50, 37, 7, 5),  # 7.14 x 7.4
    (45, 61, 6, 9),  # 7.5 x 6.78
    (33, 40, 4, 3),  # 8.25 x 13.3
    (20, 20, 20, 20),  # scale 1
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("G,C", [(1, 1), (3, 7), (5, 384)])
def test_random_fields_against_reference(shape, G, C, gen):
    H, W, h, w = shape
    guide = torch.rand(H, W, G, generator=gen)
    lr = torch.randn(C, h, w, generator=gen)
    field = random_field(h, w, gen)
    out = fast_render(lr, guide, field)
    ref = reference_render(lr, guide.permute(2, 0, 1), field.sigma_x, field.sigma_y, field.theta, field.sigma_r)
    assert rel_err(out, ref) < 1e-4


@pytest.mark.parametrize(
    "options",
    [
        RenderOptions(border="unique"),
        RenderOptions(radius_units="lr"),
        RenderOptions(radius=3),
        RenderOptions(radius=0),
        RenderOptions(alpha=0.5, border="unique", radius_units="lr"),
    ],
)
def test_options_against_reference(options, gen):
    H, W, h, w = 45, 61, 6, 9
    guide = torch.rand(H, W, 3, generator=gen)
    lr = torch.randn(4, h, w, generator=gen)
    field = random_field(h, w, gen, sigma=(0.5, 6.0))  # small sigmas: the dynamic radius matters
    out = fast_render(lr, guide, field, options)
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


def test_published_initial_field_against_reference(gen):
    H, W, h, w = 64, 64, 4, 4
    guide = torch.rand(H, W, 3, generator=gen)
    lr = torch.randn(3, h, w, generator=gen)
    field = KernelField.initial((h, w))
    out = fast_render(lr, guide, field)
    ref = reference_render(lr, guide.permute(2, 0, 1), field.sigma_x, field.sigma_y, field.theta, field.sigma_r)
    assert rel_err(out, ref) < 1e-4


@pytest.mark.parametrize("agg", [torch.float16, torch.bfloat16])
def test_half_precision_aggregation(agg, gen):
    H, W, h, w = 56, 70, 4, 5
    guide = torch.rand(H, W, 3, generator=gen)
    lr = torch.randn(16, h, w, generator=gen)
    field = random_field(h, w, gen)
    out = fast_render(lr, guide, field, agg=agg)
    ref = reference_render(lr, guide.permute(2, 0, 1), field.sigma_x, field.sigma_y, field.theta, field.sigma_r)
    err = rel_err(out, ref)
    assert err < 2e-2
    assert err > 1e-6  # it really ran in reduced precision


@pytest.mark.parametrize("budget", [1_600_000, 5_000_000])
def test_tiled_render_equals_single_tile(budget, gen):
    """Small budgets force many tiles (two cells per tile at 1.6 MB); the result must not change."""
    H, W, h, w = 70, 84, 5, 6
    guide = torch.rand(H, W, 3, generator=gen)
    lr = torch.randn(5, h, w, generator=gen)
    field = random_field(h, w, gen)
    one = fast_render(lr, guide, field, budget=2**30)
    tiled = fast_render(lr, guide, field, budget=budget)
    assert not torch.isnan(tiled).any()
    # Tiles change only the order of float32 sums (each tile's neighbour count and GEMM blocking):
    # about 1e-6 on AVX-512 CPUs, where oneDNN / MKL block differently (float32 rounding, not a seam).
    assert rel_err(tiled, one) < 1e-5


def test_linear_in_lr_map(gen):
    H, W, h, w = 45, 61, 6, 9
    guide = torch.rand(H, W, 3, generator=gen)
    field = random_field(h, w, gen)
    f = torch.randn(4, h, w, generator=gen)
    g = torch.randn(4, h, w, generator=gen)
    a, b = 2.5, -0.75
    lhs = fast_render(a * f + b * g, guide, field)
    rhs = a * fast_render(f, guide, field) + b * fast_render(g, guide, field)
    assert rel_err(lhs, rhs) < 1e-5


def test_constant_map_stays_constant(gen):
    guide = torch.rand(50, 37, 3, generator=gen)
    field = random_field(7, 5, gen)
    lr = torch.full((2, 7, 5), 3.25)
    lr[1] = -1.5
    out = fast_render(lr, guide, field)
    assert torch.allclose(out[0], torch.full_like(out[0], 3.25), atol=1e-5)
    assert torch.allclose(out[1], torch.full_like(out[1], -1.5), atol=1e-5)


def test_output_within_channel_range(gen):
    guide = torch.rand(45, 61, 3, generator=gen)
    field = random_field(6, 9, gen)
    lr = torch.randn(6, 6, 9, generator=gen) * torch.arange(1, 7).view(6, 1, 1)
    out = fast_render(lr, guide, field)
    lo = lr.amin((1, 2)).view(6, 1, 1)
    hi = lr.amax((1, 2)).view(6, 1, 1)
    assert bool((out >= lo - 1e-5).all()) and bool((out <= hi + 1e-5).all())


def test_block_attention_gradients(gen):
    """The hand-written backward agrees with autograd through the plain formula (float64)."""
    from napari_upsample_anything.core.engine.eager import block_attention

    nb, P, K, G, C = 3, 5, 7, 2, 4
    phi = torch.randn(nb, P, 7 + G, dtype=torch.float64, generator=gen)
    phi[:, :, 5] = 1.0  # the layout the engine builds: ..., 1, ||I'||^2, I'
    phi[:, :, 6] = (phi[:, :, 7:] ** 2).sum(-1)
    psi = torch.randn(nb, 6, K, dtype=torch.float64, generator=gen, requires_grad=True)
    rho = torch.rand(nb, K, dtype=torch.float64, generator=gen).requires_grad_(True)
    jd = torch.randn(nb, K, G, dtype=torch.float64, generator=gen)
    vals = torch.randn(nb, K, C, dtype=torch.float64, generator=gen, requires_grad=True)
    mask = torch.rand(nb, P, K, generator=gen) < 0.3
    mask[..., 0] = False

    def plain(psi, rho, vals):
        logits = torch.bmm(phi[:, :, :6], psi)
        dist = ((phi[:, :, None, 7:] - jd[:, None, :, :]) ** 2).sum(-1)
        logits = (logits - rho[:, None, :] * dist).masked_fill(mask, float("-inf"))
        return torch.bmm(torch.softmax(logits, -1), vals)

    out = block_attention(phi, psi, rho, jd, vals, mask, torch.float64)
    ref = plain(psi, rho, vals)
    assert torch.allclose(out, ref, atol=1e-12)
    grad = torch.randn_like(out)
    g_fast = torch.autograd.grad(out, (psi, rho, vals), grad)
    g_ref = torch.autograd.grad(ref, (psi, rho, vals), grad)
    for a, b in zip(g_fast, g_ref):
        assert torch.allclose(a, b, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("out_kind", ["numpy", "memmap", "torch"])
def test_blockwise_write_on_a_padded_grid_equals_the_tile_image_route(out_kind, tmp_path, monkeypatch):
    """A padded grid (HR size not a multiple of the LR size) with many channels is written block
    by block; the result is the same bytes as assembling the tile image and dropping the padding."""
    import napari_upsample_anything as upa
    from napari_upsample_anything.core.engine import blocks as engine_blocks

    rng = np.random.default_rng(5)
    guide = rng.random((97, 83, 3)).astype(np.float32)  # 7 x 6 cells of 13-14 x 13-14 pixels
    fld = upa.fit_kernels(guide, (7, 6), steps=2)
    values = rng.standard_normal((40, 7, 6)).astype(np.float32)

    def render(min_channels):
        monkeypatch.setattr(engine_blocks, "BLOCKWISE_WRITE_MIN_CHANNELS", min_channels)
        if out_kind == "memmap":
            out = np.lib.format.open_memmap(tmp_path / f"out{min_channels}.npy", "w+", np.float32, (40, 97, 83))
        elif out_kind == "torch":
            out = torch.full((40, 97, 83), float("nan"))
        else:
            out = np.full((40, 97, 83), np.nan, np.float32)
        upa.render(values, guide, fld, out=out, max_memory="4MB")  # several tiles
        return np.asarray(out)

    blockwise, tile_image = render(16), render(10**9)
    assert np.isfinite(blockwise).all()  # every pixel written
    assert np.array_equal(blockwise, tile_image)


@pytest.mark.parametrize("hr, lr, channels", [((97, 83), (7, 6), 3), ((56, 70), (4, 5), 1), ((40, 48), (5, 6), 4)])
def test_channels_first_pixel_features_are_the_pixel_features(hr, lr, channels):
    """The native renderer's channels-first pixel features (built directly) hold the same float32
    values as pixel_features' columns, bit for bit, on padded and regular grids, for every tile."""
    rng = np.random.default_rng(11)
    guide = Guide(rng.random((*hr, channels)).astype(np.float32))
    engine = BlockEngine(guide, lr, RenderOptions(), torch.device("cpu"))
    h, w = lr
    for tile in [(0, h, 0, w), (1, h, 2, w), (0, 2, 1, 3)]:
        phi = engine.pixel_features(tile)
        spatial, ic = engine.pixel_features_channels_first(tile)
        assert spatial.shape == (phi.shape[0], 6, engine.P) and ic.shape == (phi.shape[0], channels, engine.P)
        assert torch.equal(spatial, phi[:, :, :6].transpose(1, 2))
        assert torch.equal(ic, phi[:, :, 7 : 7 + channels].transpose(1, 2))


@pytest.mark.parametrize("backend", ["auto", "eager"])
@pytest.mark.parametrize("hr, lr", [((97, 83), (7, 6)), ((56, 70), (4, 5))])
def test_render_chunks_that_split_block_rows_write_every_pixel_once(backend, hr, lr, monkeypatch):
    """Each render chunk is written into the image as soon as it is computed
    (:meth:`BlockEngine.tile_writer`); chunks of 1, 4 or 5 blocks start and end inside
    block rows. The image must not change, normalised (the undo applied in place per chunk) or not."""
    from napari_upsample_anything.core.engine import eager

    gen = torch.Generator().manual_seed(11)
    (H, W), (h, w) = hr, lr
    guide = torch.rand(H, W, 3, generator=gen)
    lr_map = torch.randn(40, h, w, generator=gen) * 3 + 5  # not zero-mean: the undo matters
    field = random_field(h, w, gen)
    ref = reference_render(lr_map, guide.permute(2, 0, 1), field.sigma_x, field.sigma_y, field.theta, field.sigma_r)

    def render(out_bytes):
        monkeypatch.setattr(eager, "CPU_RENDER_CHUNK_BYTES", out_bytes)
        engine = BlockEngine(Guide(guide, "none", channel_axis=-1), (h, w), RenderOptions(), CPU)
        out = torch.full((40, H, W), float("nan"))
        scale, shift = torch.full((40,), 2.0), torch.arange(40.0)
        render_field(engine, (lr_map - shift[:, None, None]) / scale[:, None, None], field, out, budget=2**30,
                     affine=(scale, shift), backend=backend)  # fmt: skip
        return out

    block = 40 * 14 * 14 * 4  # one block's [C, P] float32 output (at most 14 x 14 pixels)
    whole = render(2**30)
    assert rel_err(whole, ref) < 1e-4
    for blocks_per_chunk in (1, 4, 5):
        chunked = render(blocks_per_chunk * block)
        assert not torch.isnan(chunked).any()  # every pixel written
        assert torch.equal(chunked, whole)
