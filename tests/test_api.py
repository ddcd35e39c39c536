"""Public API: input kinds, output kinds, options and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_field, rel_err

import napari_upsample_anything as upa
from napari_upsample_anything.core.errors import MemoryBudgetError


@pytest.fixture
def small():
    rng = np.random.default_rng(0)
    guide = (rng.random((42, 56, 3)) * 255).astype(np.uint8)
    lr = rng.standard_normal((4, 3, 4)).astype(np.float32)
    return guide, lr


def test_numpy_in_numpy_out_and_torch_in_torch_out(small, gen):
    guide, lr = small
    field = random_field(3, 4, gen)
    out_np = upa.render(lr, guide, field)
    assert isinstance(out_np, np.ndarray) and out_np.dtype == np.float32 and out_np.shape == (4, 42, 56)
    out_t = upa.render(torch.from_numpy(lr), torch.from_numpy(guide), field)
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.float32
    assert rel_err(out_t, out_np) < 1e-6


def test_2d_map_and_gray_guide(small, gen):
    guide, lr = small
    gray = guide[..., 0]
    out = upa.render(lr[0], gray, random_field(3, 4, gen))
    assert out.shape == (1, 42, 56)


def test_uint8_guide_is_divided_by_255(small, gen):
    guide, lr = small
    field = random_field(3, 4, gen)
    a = upa.render(lr, guide, field)
    b = upa.render(lr, guide.astype(np.float32) / 255.0, field)
    assert rel_err(a, b) < 1e-6


def test_uint16_guide_uses_robust_percentiles(gen):
    rng = np.random.default_rng(3)
    img12 = (rng.random((42, 56)) * 4095).astype(np.uint16)  # a 12-bit camera in uint16
    lr = rng.standard_normal((2, 3, 4)).astype(np.float32)
    field = random_field(3, 4, gen)
    lo, hi = np.percentile(img12, [0.5, 99.5])
    manual = np.clip((img12.astype(np.float64) - lo) / (hi - lo), 0, 1).astype(np.float32)
    auto = upa.render(lr, img12, field)
    # float32 rounding of the two normalisation paths differs; sigma_r down to 0.003 amplifies it
    assert rel_err(auto, upa.render(lr, manual, field)) < 1e-4
    unit = upa.render(lr, img12, field, normalize="unit")
    assert rel_err(unit, upa.render(lr, img12 / 65535.0, field)) < 1e-4
    assert rel_err(unit, auto) > 1e-3  # the rule really changes the result


def test_explicit_range_normalisation(small, gen):
    guide, lr = small
    field = random_field(3, 4, gen)
    a = upa.render(lr, guide, field, normalize=(0, 510))
    b = upa.render(lr, guide.astype(np.float32) / 510.0, field, normalize="none")
    assert rel_err(a, b) < 1e-6


def test_out_memmap(tmp_path, small, gen):
    guide, lr = small
    field = random_field(3, 4, gen)
    mm = np.lib.format.open_memmap(tmp_path / "hr.npy", mode="w+", dtype=np.float32, shape=(4, 42, 56))
    ret = upa.render(lr, guide, field, out=mm, max_memory="3MB")
    assert ret is mm
    mm.flush()
    assert rel_err(np.load(tmp_path / "hr.npy"), upa.render(lr, guide, field)) < 1e-6


def test_upsample_returns_field_and_matches_fit_plus_render(small):
    guide, lr = small
    hr, field = upa.upsample(guide, lr, steps=3, return_field=True)
    assert isinstance(field, upa.KernelField) and field.shape == (3, 4)
    assert len(field.meta["loss_per_step"]) == 3
    again = upa.render(lr, guide, upa.fit_kernels(guide, (3, 4), steps=3))
    assert rel_err(hr, again) < 1e-6


def test_progress_stages_of_upsample(small):
    guide, lr = small
    stages = []
    upa.upsample(guide, lr, steps=2, progress=lambda d, t, info: stages.append(info["stage"]))
    assert stages[:2] == ["fit", "fit"] and stages[-1] == "render"


def test_non_integer_scale_and_scale_one(gen):
    rng = np.random.default_rng(5)
    guide = rng.random((1000 // 20, 700 // 20, 3)).astype(np.float32)  # 50 x 35
    lr = rng.standard_normal((3, 4, 3)).astype(np.float32)  # 12.5 x 11.67
    assert upa.render(lr, guide, random_field(4, 3, gen)).shape == (3, 50, 35)
    same = rng.standard_normal((2, 50, 35)).astype(np.float32)
    out = upa.render(same, guide, random_field(50, 35, gen))
    assert out.shape == (2, 50, 35)


BAD = [
    (dict(lr_map=np.full((2, 3, 4), np.nan, np.float32)), ValueError, "lr_map contains NaN"),
    (dict(guide=np.full((42, 56, 3), np.inf, np.float32)), ValueError, "guide contains NaN or Inf"),
    (dict(lr_map=np.zeros((0, 3, 4), np.float32)), ValueError, "lr_map is empty"),
    (dict(guide=np.zeros((0, 56), np.uint8)), ValueError, "guide is empty"),
    (dict(lr_map=np.zeros((1, 2, 3, 4), np.float32)), ValueError, "lr_map must be (C, h, w)"),
    (dict(guide=np.zeros((2, 42, 56, 3), np.uint8)), ValueError, "guide must be (H, W) or (H, W, G)"),
    (dict(lr_map=np.zeros((2, 50, 4), np.float32)), ValueError, "larger than the guide"),
    (dict(device="tpu"), ValueError, "device='tpu'"),
    (dict(max_memory="lots"), ValueError, "max_memory='lots' is not a size"),
    (dict(max_memory="1kB"), MemoryBudgetError, "raise max_memory to at least"),
    (dict(normalize="magic"), ValueError, "normalize='magic'"),
    (dict(radius=-1), ValueError, "radius=-1"),
    (dict(border="wrap"), ValueError, "border='wrap'"),
    (dict(precision="fp8"), ValueError, "precision='fp8'"),
    (dict(guide=np.zeros((3, 42, 100), np.float32)), ValueError, "ambiguous"),
    (dict(guide=np.zeros((3, 42, 100), np.float32)), ValueError, "Pass channel_axis=0 for (C, H, W) channels"),
]


@pytest.mark.parametrize("change,exc,message", BAD)
def test_render_errors_name_the_argument(small, gen, change, exc, message):
    guide, lr = small
    kwargs = dict(lr_map=lr, guide=guide, field=random_field(3, 4, gen))
    kwargs.update(change)
    with pytest.raises(exc, match=message.replace("(", r"\(").replace(")", r"\)")):
        upa.render(**kwargs)


def test_field_shape_mismatch(small, gen):
    guide, lr = small
    with pytest.raises(ValueError, match=r"field has LR shape \(5, 5\) but lr_map has \(3, 4\)"):
        upa.render(lr, guide, random_field(5, 5, gen))


def test_cuda_on_a_machine_without_cuda(small, gen):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the error path cannot be exercised")
    guide, lr = small
    with pytest.raises(ValueError, match="CUDA is not available"):
        upa.render(lr, guide, random_field(3, 4, gen), device="cuda")


def test_fit_argument_errors(small):
    guide, _ = small
    with pytest.raises(ValueError, match="lr_shape"):
        upa.fit_kernels(guide, (100, 4))
    with pytest.raises(ValueError, match="steps=-1"):
        upa.fit_kernels(guide, (3, 4), steps=-1)
    with pytest.raises(ValueError, match="lr=0"):
        upa.fit_kernels(guide, (3, 4), lr=0)
    with pytest.raises(TypeError, match="lr_shape=7: give a pair of ints"):
        upa.fit_kernels(guide, 7)
    with pytest.raises(TypeError, match="guide must be a numpy array or a torch tensor"):
        upa.fit_kernels("image.png", (3, 4))


def test_area_downsample_option_is_the_cell_average():
    from napari_upsample_anything.core.guide import Guide
    from napari_upsample_anything.core.render import area_lr_guide

    rng = np.random.default_rng(7)
    img = rng.random((56, 70, 3)).astype(np.float32)  # scale 14 x 14
    got = area_lr_guide(Guide(img), (4, 5), torch.device("cpu"))
    ref = torch.nn.functional.avg_pool2d(torch.from_numpy(img).permute(2, 0, 1)[None], 14)[0]
    assert rel_err(got, ref) < 1e-6
    odd = area_lr_guide(Guide(img), (3, 4), torch.device("cpu"))  # non-integer: cell blocks
    assert odd.shape == (3, 3, 4) and abs(float(odd.mean()) - float(img.mean())) < 0.02
    f_area = upa.fit_kernels(img, (4, 5), steps=3, downsample="area")
    f_bic = upa.fit_kernels(img, (4, 5), steps=3)
    assert f_area.meta["downsample"] == "area" and not f_area.equal(f_bic)
    with pytest.raises(ValueError, match="downsample='nearest'"):
        upa.fit_kernels(img, (4, 5), steps=1, downsample="nearest")


def test_guide_smoothing_equals_rendering_a_smoothed_guide(small, gen):
    from scipy.ndimage import gaussian_filter

    guide, lr = small
    field = random_field(3, 4, gen)
    smooth = np.stack([gaussian_filter(guide[..., c] / 255.0, 1.5, mode="nearest") for c in range(3)], -1)
    a = upa.render(lr, guide, field, guide_smoothing=1.5)
    b = upa.render(lr, smooth.astype(np.float32), field, normalize="none")
    assert rel_err(a, b) < 1e-4
    assert rel_err(a, upa.render(lr, guide, field)) > 1e-3
    with pytest.raises(ValueError, match="guide_smoothing=-1"):
        upa.render(lr, guide, field, guide_smoothing=-1)


def test_render_reuses_the_smoothing_the_field_was_fitted_with(small, tmp_path):
    guide, lr = small
    field = upa.fit_kernels(guide, (3, 4), steps=2, guide_smoothing=1.5)
    assert field.meta["guide_smoothing"] == 1.5
    hr = upa.render(lr, guide, field)
    assert np.array_equal(hr, upa.render(lr, guide, field, guide_smoothing=1.5))
    assert rel_err(hr, upa.render(lr, guide, field, guide_smoothing=0)) > 1e-3
    # the setting travels with the saved kernels
    field.save(tmp_path / "k.npz")
    assert np.array_equal(upa.render(lr, guide, upa.KernelField.load(tmp_path / "k.npz")), hr)
    # and upsample() fits and renders with the same guide
    assert np.array_equal(upa.upsample(guide, lr, steps=2, guide_smoothing=1.5), hr)
    # published fits record 0: no smoothing at render time
    assert upa.fit_kernels(guide, (3, 4), steps=0).meta["guide_smoothing"] == 0.0
