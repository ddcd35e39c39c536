"""Reliability of the library (issue #9): numerical guards, half-precision range, out buffers,
fit options recorded on the field, bounds, kernels-file hardening, axes, argument checks."""

from __future__ import annotations

import dataclasses
import os
import zipfile

import numpy as np
import pytest
import torch
from conftest import random_field, rel_err
from reference_gsjbu import reference_render

import napari_upsample_anything as upa
from napari_upsample_anything.core.checks import check_float, check_int
from napari_upsample_anything.core.errors import FitDivergedError
from napari_upsample_anything.core.field import FitOptions, KernelField


@pytest.fixture
def small():
    rng = np.random.default_rng(0)
    guide = (rng.random((42, 56, 3)) * 255).astype(np.uint8)
    lr = rng.standard_normal((4, 3, 4)).astype(np.float32)
    return guide, lr


def _reference(lr, guide_u8, field, **options):
    g = torch.from_numpy(guide_u8).double().permute(2, 0, 1) / 255.0
    return reference_render(
        torch.as_tensor(np.asarray(lr, np.float64)),
        g,
        field.sigma_x.double(),
        field.sigma_y.double(),
        field.theta.double(),
        field.sigma_r.double(),
        **options,
    )


# ------------------------------------------------------------------ numerical guards
@pytest.mark.parametrize(
    "kwargs,exc,message",
    [
        (dict(lr=float("inf")), ValueError, r"lr=inf: must be a finite number"),
        (dict(lr=float("nan")), ValueError, r"lr=nan: must be a finite number"),
        (dict(lr=-0.1), ValueError, r"lr=-0.1: must be positive"),
        (dict(lr=1e3), FitDivergedError, r"diverged.*lr=1000 is too large"),
        (dict(normalize=(0, float("inf"))), ValueError, r"normalize\[1\]=inf"),
        (dict(normalize=(0, 1e-30)), ValueError, r"normalize=\(0, 1e-30\) is a degenerate normalisation"),
        (dict(normalize=(0, 1e300)), ValueError, r"degenerate normalisation"),
    ],
)
def test_fit_never_returns_nan(small, kwargs, exc, message):
    guide, _ = small
    with pytest.raises(exc, match=message):
        upa.fit_kernels(guide, (3, 4), steps=3, **kwargs)


def test_diverged_fit_error_is_a_value_and_floating_point_error():
    assert issubclass(FitDivergedError, ValueError) and issubclass(FitDivergedError, FloatingPointError)


@pytest.mark.parametrize(("backend", "loss_fn"), [("eager", "_loss_and_grad"), ("compiled", "_fused_pass")])
def test_loss_not_finite_before_any_update_blames_the_normalisation(small, monkeypatch, backend, loss_fn):
    from napari_upsample_anything.core import fit
    from napari_upsample_anything.core.engine import native

    if backend == "compiled" and not native.available():
        pytest.skip("no C compiler here for the native fit kernel (the eager case still runs)")
    guide, _ = small
    real = getattr(fit, loss_fn)
    monkeypatch.setattr(fit, loss_fn, lambda *a, **k: (float("nan"), *real(*a, **k)[1:]))
    with pytest.raises(FitDivergedError, match="before any update: the normalised guide is degenerate"):
        upa.fit_kernels(guide, (3, 4), steps=2, backend=backend)


def test_finiteness_is_checked_after_the_float32_cast(small, gen):
    guide, lr = small
    big = guide.astype(np.float64) * 1e300  # finite in float64, Inf in float32
    assert np.isfinite(big).all()
    with pytest.raises(ValueError, match="beyond the float32 range"):
        upa.fit_kernels(big, (3, 4), steps=1)
    with pytest.raises(ValueError, match="lr_map contains NaN or Inf values \\(after conversion to float32"):
        upa.render(lr.astype(np.float64) * 1e300, guide, random_field(3, 4, gen))


# ------------------------------------------------------------------ half precision
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("kind", ["uint16_full_range", "depth_1e6"])
def test_half_precision_render_of_any_finite_map(small, gen, precision, kind):
    guide, _ = small
    rng = np.random.default_rng(1)
    if kind == "uint16_full_range":
        lr = rng.integers(0, 65536, size=(2, 3, 4)).astype(np.uint16)
        lr[0, 0, 0], lr[1, 0, 0] = 65535, 0
    else:
        lr = (1e6 + rng.random((2, 3, 4)) * 5e5).astype(np.float64)  # depth in mm, far beyond fp16
    field = random_field(3, 4, gen)
    ref = _reference(lr.astype(np.float64), guide, field)
    out = upa.render(lr, guide, field, precision=precision)
    assert np.isfinite(out).all()
    assert rel_err(out, ref) < 2e-2
    # and the scaled map really went through the half-precision product (it is not fp32)
    assert rel_err(out, upa.render(lr, guide, field, precision="fp32")) > 1e-7


def test_half_precision_render_pca(small, gen):
    guide, _ = small
    rng = np.random.default_rng(2)
    lr = rng.integers(0, 65536, size=(6, 3, 4)).astype(np.uint16)
    field = random_field(3, 4, gen)
    rgb16, basis = upa.render_pca(lr, guide, field, precision="fp16")
    rgb32, _ = upa.render_pca(lr, guide, field, basis=basis, precision="fp32")
    assert np.isfinite(rgb16).all() and rel_err(rgb16, rgb32) < 2e-2


def test_half_precision_into_a_memmap(tmp_path, small, gen):
    guide, _ = small
    lr = np.full((2, 3, 4), 60000.0) + np.random.default_rng(3).random((2, 3, 4)) * 5000
    field = random_field(3, 4, gen)
    mm = np.lib.format.open_memmap(tmp_path / "hr.npy", mode="w+", dtype=np.float32, shape=(2, 42, 56))
    assert upa.render(lr, guide, field, precision="fp16", out=mm, max_memory="3MB") is mm
    assert rel_err(mm, _reference(lr, guide, field)) < 2e-2


# ------------------------------------------------------------------ out buffers and guide size
@pytest.mark.parametrize(
    "out,exc,message",
    [
        (np.zeros((4, 42, 56), np.uint8), TypeError, "out has dtype uint8; give a float16, float32 or float64"),
        (np.zeros((4, 42, 56), np.int32), TypeError, "out has dtype int32"),
        (np.zeros((4, 42, 56), bool), TypeError, "out has dtype bool"),
        (np.zeros((4, 42, 56), np.complex64), TypeError, "out has dtype complex64"),
        (torch.zeros((4, 42, 56), dtype=torch.int64), TypeError, "out has dtype torch.int64"),
        (torch.empty((4, 42, 56), device="meta"), TypeError, "out is a tensor on the 'meta' device"),
        ([[0.0]], TypeError, "out must be a numpy array"),
        (np.zeros((4, 42, 55), np.float32), ValueError, "out has shape"),
    ],
)
def test_out_must_be_a_float_buffer(small, gen, out, exc, message):
    guide, lr = small
    with pytest.raises(exc, match=message):
        upa.render(lr, guide, random_field(3, 4, gen), out=out)


def test_out_read_only_and_float16_overflow(small, gen):
    guide, lr = small
    field = random_field(3, 4, gen)
    ro = np.zeros((4, 42, 56), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only"):
        upa.render(lr, guide, field, out=ro)
    with pytest.raises(ValueError, match="out is float16 but lr_map has values beyond 65504"):
        upa.render(lr * 1e5, guide, field, out=np.zeros((4, 42, 56), np.float16))
    half = np.zeros((4, 42, 56), np.float16)
    upa.render(lr, guide, field, out=half)
    assert rel_err(half, upa.render(lr, guide, field)) < 1e-3


def test_torch_out_must_be_on_the_maps_device(small, gen):
    guide, lr = small
    field = random_field(3, 4, gen)
    out = torch.empty((4, 42, 56), dtype=torch.float64)
    got = upa.render(torch.from_numpy(lr), guide, field, out=out)
    assert got is out and rel_err(out, upa.render(lr, guide, field)) < 1e-6
    if torch.cuda.is_available():
        with pytest.raises(TypeError, match="give out on lr_map's device"):
            upa.render(torch.from_numpy(lr), guide, field, out=out.cuda())


def test_guide_of_another_size_needs_an_explicit_opt_in(small):
    guide, lr = small
    field = upa.fit_kernels(guide, (3, 4), steps=1)
    assert field.options.hr_shape == (42, 56)
    bigger = np.repeat(np.repeat(guide, 2, axis=0), 2, axis=1)  # 84 x 112
    with pytest.raises(
        ValueError, match=r"guide is 84 x 112 but the field was fitted on a 42 x 56 guide.*allow_resized_guide=True"
    ):
        upa.render(lr, bigger, field)
    assert upa.render(lr, bigger, field, allow_resized_guide=True).shape == (4, 84, 112)
    with pytest.raises(TypeError, match="allow_resized_guide"):
        upa.render(lr, guide, field, allow_resized_guide="yes")


# ------------------------------------------------------------------ fit options
def test_fit_options_recorded_saved_and_used_by_default(small, tmp_path):
    guide, lr = small
    field = upa.fit_kernels(guide, (3, 4), steps=2, radius=1, alpha=1.5, border="unique", guide_smoothing=1.0)
    opts = field.options
    assert isinstance(opts, FitOptions)
    assert (opts.radius, opts.alpha, opts.border, opts.radius_units) == (1, 1.5, "unique", "hr")
    assert (opts.guide_smoothing, opts.hr_shape, opts.lr_shape, opts.steps, opts.lr) == (1.0, (42, 56), (3, 4), 2, 0.1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.radius = 3  # frozen
    loaded = KernelField.load(field.save(tmp_path / "k.npz"))
    assert loaded.options == opts and loaded.meta["loss_per_step"] == field.meta["loss_per_step"]
    default = upa.render(lr, guide, loaded)
    explicit = upa.render(lr, guide, loaded, radius=1, alpha=1.5, border="unique", guide_smoothing=1.0)
    assert np.array_equal(default, explicit)
    assert rel_err(upa.render(lr, guide, loaded, radius=8), default) > 1e-4
    assert upa.api.fitted_smoothing(loaded) == 1.0
    # render_pca and upsample use them too
    rgb, basis = upa.render_pca(lr, guide, loaded)
    assert np.array_equal(rgb, upa.render_pca(lr, guide, loaded, basis=basis, radius=1, alpha=1.5, border="unique")[0])
    assert np.array_equal(upa.upsample(guide, lr, steps=2, radius=1, alpha=1.5, border="unique", guide_smoothing=1.0), default)


def test_radius_5_field_renders_with_radius_5_after_a_round_trip(small, tmp_path, gen):
    guide, lr = small
    field = upa.fit_kernels(guide, (3, 4), steps=2, radius=5)
    loaded = KernelField.load(field.save(tmp_path / "k.npz"))
    with_5 = upa.render(lr, guide, loaded)
    assert np.array_equal(with_5, upa.render(lr, guide, field, radius=5))
    assert rel_err(with_5, _reference(lr, guide, field, radius=5)) < 1e-4
    assert rel_err(upa.render(lr, guide, loaded, radius=8), with_5) > 1e-4


def test_normalisation_is_recorded_and_reused(small):
    guide, lr = small
    field = upa.fit_kernels(guide, (3, 4), steps=1, normalize=(0, 510))
    assert field.options.normalize == (0.0, 510.0)
    a = upa.render(lr, guide, field)
    assert np.array_equal(a, upa.render(lr, guide, field, normalize=(0, 510)))
    assert rel_err(a, upa.render(lr, guide, field, normalize="auto")) > 1e-4


def test_inspector_weights_use_the_fit_options(small):
    from napari_upsample_anything.api import fitted_guide, render_options
    from napari_upsample_anything.core.engine.blocks import BlockEngine
    from napari_upsample_anything.core.render import pixel_weight_map

    guide, lr = small
    field = upa.fit_kernels(guide, (3, 4), steps=1, radius=1, border="unique")
    engine = BlockEngine(fitted_guide(field, guide), (3, 4), render_options(field), torch.device("cpu"))
    weights = pixel_weight_map(engine, field, 20, 30)
    hr = upa.render(lr, guide, field)
    assert np.allclose((lr * weights).sum((1, 2)), hr[:, 20, 30], atol=1e-5)


def test_legacy_file_with_meta_only_loads_with_options(tmp_path, gen):
    f = random_field(3, 4, gen)
    meta = {
        "format": "napari-upsample-anything/kernel-field/1",
        "radius": 6,
        "border": "repeat",
        "radius_units": "hr",
        "guide_smoothing": 0.5,
        "hr_shape": [42, 56],
        "lr_shape": [3, 4],
        "steps": 51,
        "lr": 0.1,
    }
    import json

    np.savez_compressed(tmp_path / "old.npz", **f.numpy(), meta=np.array(json.dumps(meta)))
    g = KernelField.load(tmp_path / "old.npz")
    assert g.equal(f) and g.options.radius == 6 and g.options.guide_smoothing == 0.5 and g.options.hr_shape == (42, 56)
    np.savez_compressed(tmp_path / "bare.npz", **f.numpy())
    assert KernelField.load(tmp_path / "bare.npz").options is None


# ------------------------------------------------------------------ bounds
def test_guide_smoothing_bounds(small, gen):
    guide, lr = small
    for bad, exc in [
        (1e6, ValueError),
        (57, ValueError),
        (float("inf"), ValueError),
        (float("nan"), ValueError),
        (-1, ValueError),
        ("2", TypeError),
        (True, TypeError),
    ]:
        with pytest.raises(exc, match="guide_smoothing"):
            upa.fit_kernels(guide, (3, 4), steps=1, guide_smoothing=bad)
    assert upa.render(lr, guide, random_field(3, 4, gen), guide_smoothing=56).shape == (4, 42, 56)


@pytest.mark.parametrize(
    "key,value",
    [
        ("guide_smoothing", 1e9),
        ("radius", 10**6),
        ("radius", -1),
        ("alpha", float("nan")),
        ("hr_shape", [1, 2]),
        ("border", "wrap"),
        ("lr", 0),
        ("steps", 2.5),
        ("normalize", [1, 0]),
        ("hr_shape", [10**9, 4]),
    ],
)
def test_loaded_options_are_range_checked(tmp_path, small, key, value):
    import json

    guide, _ = small
    field = upa.fit_kernels(guide, (3, 4), steps=1)
    opts = field.options.to_dict()
    opts[key] = value
    np.savez_compressed(tmp_path / "k.npz", **field.numpy(), meta=np.array("{}"), options=np.array(json.dumps(opts)))
    with pytest.raises(ValueError, match=f"k.npz is not a kernel field file: .*{key.split('_')[0]}"):
        KernelField.load(tmp_path / "k.npz")


def test_save_is_atomic(tmp_path, gen, monkeypatch):
    f = random_field(3, 4, gen)
    path = f.save(tmp_path / "k.npz")
    before = path.read_bytes()

    def broken(fh, **members):
        fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez_compressed", broken)
    with pytest.raises(KeyboardInterrupt):
        random_field(3, 4, gen).save(path)
    assert path.read_bytes() == before  # the older file is untouched
    assert sorted(os.listdir(tmp_path)) == ["k.npz"]  # and no temporary is left behind


def _write_zip(path, members):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def _npy_bytes(arr):
    import io

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def test_load_refuses_any_unreadable_file(tmp_path, gen):
    good = random_field(3, 4, gen).save(tmp_path / "good.npz")
    data = good.read_bytes()
    maps = random_field(3, 4, gen).numpy()
    cases = {
        "empty.npz": b"",
        "text.npz": b"hello, I am not a kernel field\n",
        "truncated.npz": data[: len(data) // 2],
        "random.npz": np.random.default_rng(0).bytes(3000),
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    np.save(tmp_path / "plain.npy", np.zeros((3, 4), np.float32))
    nan = dict(maps, sigma_x=np.full((3, 4), np.nan, np.float32))
    np.savez(tmp_path / "nan.npz", **nan)
    np.savez(tmp_path / "shapes.npz", **dict(maps, theta=np.zeros((4, 3), np.float32)))
    np.savez(tmp_path / "three_d.npz", **{k: v[None] for k, v in maps.items()})
    np.savez(tmp_path / "ints.npz", **{k: v.astype(np.int32) for k, v in maps.items()})
    np.savez(tmp_path / "extra.npz", **maps, payload=np.zeros(3))
    _write_zip(
        tmp_path / "pickle.npz",
        {**{f"{k}.npy": _npy_bytes(v) for k, v in maps.items()}, "meta.npy": _npy_bytes(np.array([{"a": 1}], dtype=object))},
    )
    _write_zip(
        tmp_path / "metajunk.npz",
        {**{f"{k}.npy": _npy_bytes(v) for k, v in maps.items()}, "meta.npy": _npy_bytes(np.array("{not json"))},
    )
    expected = list(cases) + [
        "plain.npy",
        "nan.npz",
        "shapes.npz",
        "three_d.npz",
        "ints.npz",
        "extra.npz",
        "pickle.npz",
        "metajunk.npz",
    ]
    for name in expected:
        with pytest.raises(ValueError, match=f"{name} is not a kernel field file: "):
            KernelField.load(tmp_path / name)
    with pytest.raises(ValueError, match="is not a kernel field file: it is a directory"):
        KernelField.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        KernelField.load(tmp_path / "missing.npz")


def test_load_checks_sizes_before_inflating(tmp_path, gen, monkeypatch):
    """A small compressed member that declares a small shape but inflates to much more, or a
    huge declared shape, is refused from the archive headers alone (np.load is never reached)."""
    maps = random_field(3, 4, gen).numpy()
    header = _npy_bytes(np.zeros((3, 4), np.float32))[:128]
    bomb = header + b"\0" * (50 << 20)  # 50 MB of zeros: compresses to ~50 kB
    _write_zip(tmp_path / "bomb.npz", {**{f"{k}.npy": _npy_bytes(v) for k, v in maps.items() if k != "theta"}, "theta.npy": bomb})
    assert (tmp_path / "bomb.npz").stat().st_size < 1 << 20
    huge = _npy_bytes(np.zeros((1, 1), np.float32)).replace(b"(1, 1)", b"(99999, 99999)")
    _write_zip(tmp_path / "huge.npz", {f"{k}.npy": huge for k in maps})
    _write_zip(tmp_path / "bigmeta.npz", {**{f"{k}.npy": _npy_bytes(v) for k, v in maps.items()}, "meta.npy": b"\0" * (65 << 20)})

    def no_inflate(*args, **kwargs):
        raise AssertionError("np.load must not be reached")

    monkeypatch.setattr(np, "load", no_inflate)
    for name, why in [("bomb.npz", "inflates to"), ("huge.npz", "more than"), ("bigmeta.npz", "inflates to")]:
        with pytest.raises(ValueError, match=f"{name} is not a kernel field file: .*{why}"):
            KernelField.load(tmp_path / name)


# ------------------------------------------------------------------ axes
@pytest.mark.parametrize("shape", [(70, 100, 100), (5, 64, 64), (64, 64, 2), (3, 42, 56), (42, 56, 5), (3, 3, 3), (4, 9, 4)])
def test_ambiguous_guides_need_channel_axis(shape):
    guide = np.random.default_rng(0).random(shape).astype(np.float32)
    with pytest.raises(ValueError, match=r"ambiguous.*Pass channel_axis=0 for \(C, H, W\) channels.*image\[z\] separately"):
        upa.fit_kernels(guide, (2, 2), steps=1)
    with pytest.raises(ValueError, match="ambiguous"):
        upa.render(np.zeros((1, 2, 2), np.float32), guide, KernelField.initial((2, 2)))
    with pytest.raises(ValueError, match="ambiguous"):
        upa.upsample(guide, np.zeros((1, 2, 2), np.float32), steps=1)


def test_channel_axis_makes_the_layout_explicit(gen):
    rng = np.random.default_rng(4)
    hwc = rng.random((42, 56, 5)).astype(np.float32)
    chw = np.ascontiguousarray(np.moveaxis(hwc, -1, 0))
    lr = rng.standard_normal((2, 3, 4)).astype(np.float32)
    f_last = upa.fit_kernels(hwc, (3, 4), steps=2, channel_axis=-1)
    f_first = upa.fit_kernels(chw, (3, 4), steps=2, channel_axis=0)
    assert f_last.equal(f_first) and f_first.options.channel_axis == 0
    # render reuses the fit's channel axis by default; explicitly too
    a = upa.render(lr, chw, f_first)
    assert np.array_equal(a, upa.render(lr, hwc, f_first, channel_axis=2))
    assert np.array_equal(a, upa.render(lr, torch.from_numpy(chw), f_first))
    with pytest.raises(ValueError, match="channel_axis=0 was given but guide is 2D"):
        upa.fit_kernels(hwc[..., 0], (3, 4), steps=1, channel_axis=0)
    with pytest.raises(ValueError, match="channel_axis=3"):
        upa.fit_kernels(hwc, (3, 4), steps=1, channel_axis=3)
    rgb = (rng.random((42, 56, 3)) * 255).astype(np.uint8)
    assert upa.fit_kernels(rgb, (3, 4), steps=1).options.channel_axis is None  # RGB: unambiguous


def test_guide_from_image_does_not_guess():
    from napari_upsample_anything.core.io import guide_from_image

    stack = np.zeros((5, 64, 64), np.uint16)  # a 3-D TIFF stack
    with pytest.raises(ValueError, match="ambiguous"):
        guide_from_image(stack)
    assert guide_from_image(stack, channel_axis=0).shape == (64, 64, 5)
    assert guide_from_image(np.zeros((64, 64, 4), np.uint8)).shape == (64, 64, 3)  # RGBA: alpha dropped


# ------------------------------------------------------------------ argument checks
@pytest.mark.parametrize(
    "kwargs,exc,message",
    [
        (dict(steps=True), TypeError, "steps=True: give an int"),
        (dict(radius=True), TypeError, "radius=True: give an int"),
        (dict(steps=None), TypeError, "steps=None: give an int"),
        (dict(steps=2.5), ValueError, "steps=2.5: give a whole number"),
        (dict(steps=10**9), ValueError, "steps=1000000000: must be <="),
        (dict(lr="0.1"), TypeError, "lr='0.1': give a number"),
        (dict(lr=None), TypeError, "lr=None: give a number"),
        (dict(seed="abc"), TypeError, "seed='abc': give an int"),
        (dict(seed=1.5), ValueError, "seed=1.5"),
        (dict(lr_shape=(8.5, 8)), ValueError, r"lr_shape\[0\]=8.5: give a whole number"),
        (dict(lr_shape=(3, None)), TypeError, r"lr_shape\[1\]=None"),
        (dict(lr_shape="34"), TypeError, "lr_shape='34': give a pair"),
        (dict(lr_shape=(3, 4, 5)), ValueError, "lr_shape=.*got 3 values"),
        (dict(lr_shape=(0, 4)), ValueError, r"lr_shape\[0\]=0: must be >= 1"),
        (dict(alpha="2"), TypeError, "alpha='2'"),
        (dict(alpha=float("inf")), ValueError, "alpha=inf"),
        (dict(radius=2.0**40), ValueError, "radius=.*must be <= 256"),
        (dict(border=None), TypeError, "border=None"),
        (dict(downsample="AREA"), None, None),
        (dict(device="CPU"), None, None),
        (dict(device="Cpu", precision="FP32"), None, None),
        (dict(device=1.5), TypeError, "device=1.5"),
        (dict(precision=True), TypeError, "precision=True"),
        (dict(init="field"), TypeError, "init must be a KernelField"),
        (dict(max_memory="1e400"), ValueError, "max_memory='1e400'"),
        (dict(guide=torch.empty((42, 56, 3), device="meta")), TypeError, "guide is a tensor on the 'meta' device"),
    ],
)
def test_fit_argument_checks_name_the_argument(small, kwargs, exc, message):
    guide, _ = small
    call = dict(guide=guide, lr_shape=(3, 4), steps=1)
    call.update(kwargs)
    if exc is None:
        assert upa.fit_kernels(**call).shape == (3, 4)
        return
    with pytest.raises(exc, match=message):
        upa.fit_kernels(**call)


def test_render_refuses_meta_tensors(small, gen):
    guide, lr = small
    with pytest.raises(TypeError, match="lr_map is a tensor on the 'meta' device"):
        upa.render(torch.empty((4, 3, 4), device="meta"), guide, random_field(3, 4, gen))
    with pytest.raises(TypeError, match="image is a tensor on the 'meta' device"):
        upa.extract_features(torch.empty((64, 64, 3), device="meta"), "dinov2_vits14", pretrained=False)


def test_check_helpers():
    assert check_int(np.int64(3), "n") == 3 and check_int(4.0, "n") == 4 and check_int(torch.tensor(5), "n") == 5
    assert check_float(np.float32(0.5), "x") == 0.5 and check_float(2, "x") == 2.0
    for bad, exc in [
        (True, TypeError),
        (np.bool_(False), TypeError),
        ("1", TypeError),
        (None, TypeError),
        (1 + 2j, TypeError),
        (float("nan"), ValueError),
    ]:
        with pytest.raises(exc, match="n="):
            check_int(bad, "n")
    with pytest.raises(ValueError, match="x=-1: must be >= 0"):
        check_float(-1, "x", minimum=0)


def test_extract_features_checks_finiteness_after_the_cast():
    image = np.random.default_rng(0).random((64, 64)) * 1e300  # finite float64, Inf in float32
    with pytest.raises(ValueError, match="image has values that are not finite after conversion to float32"):
        upa.extract_features(image, "dinov2_vits14", pretrained=False)


def test_float32_render_of_a_map_near_the_float32_limit(small, gen):
    guide, _ = small
    lr = np.random.default_rng(5).uniform(-3e38, 3e38, size=(2, 3, 4)).astype(np.float32)
    lr[0, 0, 0], lr[1, 0, 0] = 3.4e38, -3.4e38
    field = random_field(3, 4, gen)
    out = upa.render(lr, guide, field)
    assert np.isfinite(out).all()
    assert rel_err(out, _reference(lr.astype(np.float64), guide, field)) < 1e-4
