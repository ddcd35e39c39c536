"""PCA pictures and the exact HR PCA shortcut."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_field

import napari_upsample_anything as upa


def test_pca_rgb_range_and_shape(gen):
    feats = np.random.default_rng(0).standard_normal((32, 9, 11)).astype(np.float32)
    rgb, basis = upa.pca_rgb(feats)
    assert rgb.shape == (9, 11, 3) and rgb.dtype == np.float32
    assert rgb.min() >= 0 and rgb.max() <= 1 and rgb.std() > 0.05
    assert basis.components.shape == (3, 32)
    assert np.all(np.diff(basis.explained_variance_ratio) <= 1e-6)  # sorted by variance


def test_pca_recovers_a_planted_structure():
    """Features = 3 spatial patterns mixed into 50 channels + small noise: PCA finds them."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:20, 0:20] / 19.0
    patterns = np.stack([xx, yy, xx * yy])
    mix = rng.standard_normal((50, 3))
    feats = np.einsum("ck,khw->chw", mix, patterns) + 1e-3 * rng.standard_normal((50, 20, 20))
    _, basis = upa.pca_rgb(feats)
    assert basis.explained_variance_ratio.sum() > 0.999


def test_hr_pca_shortcut_equals_render_then_project(gen):
    rng = np.random.default_rng(2)
    guide = (rng.random((56, 70, 3)) * 255).astype(np.uint8)
    lr = rng.standard_normal((40, 4, 5)).astype(np.float32) + 3.0  # a mean far from zero
    field = random_field(4, 5, gen)
    fast, basis = upa.render_pca(lr, guide, field)
    full = upa.render(lr, guide, field)
    slow_proj = basis.project(full)
    fast_proj = upa.render(basis.project(lr), guide, field)
    assert np.abs(fast_proj - slow_proj).max() / np.abs(slow_proj).max() < 1e-5
    slow_rgb, _ = upa.pca_rgb(full, basis=basis)
    assert np.abs(fast - slow_rgb).max() < 1e-5


def test_basis_channel_mismatch_is_an_error():
    _, basis = upa.pca_rgb(np.random.rand(8, 4, 4))
    with pytest.raises(ValueError, match="fitted on 8"):
        basis.project(np.random.rand(5, 4, 4))


def test_subsampled_fit_is_seeded():
    feats = np.random.default_rng(3).standard_normal((6, 100, 100)).astype(np.float32)
    _, b1 = upa.pca_rgb(feats, max_samples=500, seed=4)
    _, b2 = upa.pca_rgb(feats, max_samples=500, seed=4)
    assert np.array_equal(b1.components, b2.components)


def test_covariance_pca_equals_the_svd_pca_it_replaced():
    """Components (signs included), mean, variance ratios and the pictures equal scikit-learn's
    full-SVD PCA (the previous implementation) on features with a realistic decaying spectrum."""
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(5)
    c, h, w = 48, 30, 40
    scales = (0.7 ** np.arange(c))[:, None]
    basis_rot = np.linalg.qr(rng.standard_normal((c, c)))[0]
    latent = rng.standard_normal((c, h * w)) * scales
    feats = (basis_rot @ latent + rng.standard_normal((c, 1))).reshape(c, h, w).astype(np.float32)
    rgb, basis = upa.pca_rgb(feats, max_samples=None)
    x = feats.reshape(c, -1).T
    ref = PCA(n_components=3, svd_solver="full").fit(x)
    assert np.abs(basis.components - ref.components_).max() < 1e-4
    assert np.abs(basis.mean - ref.mean_).max() < 1e-5
    assert np.abs(basis.explained_variance_ratio - ref.explained_variance_ratio_).max() < 1e-5
    proj = ref.transform(x)
    lo, hi = np.percentile(proj, 1, axis=0), np.percentile(proj, 99, axis=0)
    ref_rgb = np.clip((proj - lo) / (hi - lo), 0, 1).reshape(h, w, 3)
    assert np.abs(rgb - ref_rgb).max() < 1e-4
