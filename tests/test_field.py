"""KernelField: construction, parameterisation, save/load."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import random_field

from napari_upsample_anything.core.field import KernelField, kernel_coefficients


def test_initial_is_the_published_start():
    f = KernelField.initial((3, 5))
    assert f.shape == (3, 5)
    assert torch.all(f.sigma_x == 16) and torch.all(f.sigma_y == 16)
    assert torch.all(f.theta == 0) and torch.allclose(f.sigma_r, torch.full((3, 5), 0.12))


def test_raw_roundtrip(gen):
    f = random_field(4, 6, gen)
    g = KernelField.from_raw(f.raw())
    for name in ("sigma_x", "sigma_y", "theta", "sigma_r"):
        assert torch.allclose(getattr(f, name), getattr(g, name), rtol=1e-5, atol=1e-5)


def test_save_load_roundtrip(tmp_path, gen):
    f = random_field(4, 6, gen)
    f.meta = {"steps": 51, "loss_per_step": [0.1, 0.05]}
    path = f.save(tmp_path / "kernels")
    assert path.suffix == ".npz" and path.exists()
    g = KernelField.load(path)
    assert g.equal(f)
    assert g.meta["steps"] == 51 and g.meta["loss_per_step"] == [0.1, 0.05]


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="kernel field file not found"):
        KernelField.load(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not a kernel field file"):
        KernelField.load(tmp_path / "other.npz")


def test_shape_errors():
    with pytest.raises(ValueError, match="share one"):
        KernelField(torch.ones(2, 3), torch.ones(2, 3), torch.zeros(2, 3), torch.ones(3, 2))
    with pytest.raises(ValueError, match="2D"):
        KernelField(torch.ones(2), torch.ones(2), torch.zeros(2), torch.ones(2))


def test_validate_catches_bad_values():
    f = KernelField.initial((2, 2))
    f.sigma_r[0, 0] = float("nan")
    with pytest.raises(ValueError, match="sigma_r contains NaN"):
        f.validate()
    f = KernelField.initial((2, 2))
    f.sigma_x[1, 1] = -1
    with pytest.raises(ValueError, match="sigma_x must be positive"):
        f.validate()


def test_coefficients_are_the_rotated_quadratic_form(gen):
    f = random_field(3, 3, gen)
    A, B, C, rho = kernel_coefficients(f)
    dX, dY = 3.0, -2.0
    c, s = torch.cos(f.theta), torch.sin(f.theta)
    xr = dX * c + dY * s
    yr = -dX * s + dY * c
    direct = xr**2 / (2 * f.sigma_x**2 + 1e-8) + yr**2 / (2 * f.sigma_y**2 + 1e-8)
    assert torch.allclose(A * dX**2 + 2 * B * dX * dY + C * dY**2, direct, rtol=1e-5)
    assert torch.allclose(rho, 1 / (2 * f.sigma_r**2 + 1e-8))
    assert float(f.anisotropy().min()) >= 1.0
    assert math.isclose(float(KernelField.initial((1, 1)).anisotropy()), 1.0)
