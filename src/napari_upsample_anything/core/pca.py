"""PCA pictures of feature maps (covariance eigendecomposition), and the exact low-cost HR PCA.

The basis is fitted on the LR features (``h * w`` samples of ``C`` channels), as the paper's
figures do, or on a random subsample of any (C, ...) map. Three components become RGB in
[0, 1] by mapping each component's 1st..99th percentile (of the fitting samples) to 0..1.

Exact shortcut: the render is a per-pixel convex combination of LR values (weights sum to
one), so it commutes with any affine map, in particular ``(F - mean) @ components.T``.
Projecting the LR map first and rendering 3 channels gives the same HR PCA as rendering all
C channels and projecting afterwards, at 3/C of the cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch


@dataclass
class PCABasis:
    """A fitted projection: ``rgb = clip((x - mean) @ components.T - lo) / (hi - lo), 0, 1)``.

    ``components [k, C]``, ``mean [C]``, ``lo``/``hi [k]`` (percentiles of the projections
    of the fitting samples), ``explained_variance_ratio [k]``.
    """

    components: np.ndarray
    mean: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    explained_variance_ratio: np.ndarray

    @property
    def n_components(self) -> int:
        return int(self.components.shape[0])

    def project(self, features) -> np.ndarray:
        """``(C, ...)`` -> ``(k, ...)`` projections (float32, no scaling)."""
        f = _as_numpy(features)
        c = f.shape[0]
        if c != self.components.shape[1]:
            raise ValueError(f"features have {c} channels but the PCA basis was fitted on {self.components.shape[1]}")
        flat = f.reshape(c, -1).astype(np.float32, copy=False)
        proj = self.components.astype(np.float32) @ (flat - self.mean.astype(np.float32)[:, None])
        return proj.reshape((self.n_components,) + f.shape[1:])

    def lr_map(self, features) -> np.ndarray:
        """The LR map to render for the exact HR PCA shortcut: ``(k, h, w)`` projections."""
        return self.project(features)

    def to_rgb(self, projections) -> np.ndarray:
        """``(k, ...)`` projections -> ``(..., 3)`` float32 in [0, 1] (k < 3 pads with zeros)."""
        p = _as_numpy(projections).astype(np.float32, copy=False)
        span = np.where(self.hi > self.lo, self.hi - self.lo, 1.0).astype(np.float32)
        scaled = (p - self.lo.reshape((-1,) + (1,) * (p.ndim - 1))) / span.reshape((-1,) + (1,) * (p.ndim - 1))
        rgb = np.clip(np.moveaxis(scaled, 0, -1), 0.0, 1.0)
        if rgb.shape[-1] < 3:
            pad = np.zeros(rgb.shape[:-1] + (3 - rgb.shape[-1],), np.float32)
            rgb = np.concatenate([rgb, pad], -1)
        return rgb.astype(np.float32, copy=False)


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def fit_pca(features, n_components: int = 3, max_samples: Optional[int] = 100_000, seed: int = 0) -> PCABasis:
    """Fit a PCA basis on a ``(C, ...)`` map (every position is a sample of C channels).

    Parameters
    ----------
    features : (C, h, w) or (C, H, W) array or tensor
    n_components : int
        At most ``min(C, number of samples)``.
    max_samples : int or None
        Fit on a random subsample of this many positions (seeded) when the map has more.
    """
    f = _as_numpy(features)
    if f.ndim < 2:
        raise ValueError(f"features must be (C, ...) with at least one spatial axis, got shape {f.shape}")
    c = f.shape[0]
    x = f.reshape(c, -1).T.astype(np.float32, copy=False)
    if x.shape[0] == 0 or c == 0:
        raise ValueError("features are empty")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or Inf")
    if max_samples is not None and x.shape[0] > max_samples:
        idx = np.random.default_rng(seed).choice(x.shape[0], size=max_samples, replace=False)
        x = x[np.sort(idx)]
    k = int(min(n_components, c, x.shape[0]))
    components, mean, ratio = _covariance_pca(x, k)
    proj = (x - mean.astype(np.float32)) @ components.T.astype(np.float32)
    lo = np.percentile(proj, 1, axis=0)
    hi = np.percentile(proj, 99, axis=0)
    return PCABasis(
        components=components.astype(np.float32),
        mean=mean.astype(np.float32),
        lo=lo.astype(np.float32),
        hi=hi.astype(np.float32),
        explained_variance_ratio=ratio.astype(np.float32),
    )


def _covariance_pca(x: np.ndarray, k: int, rows_per_chunk: int = 16384) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``k`` principal axes of ``x [n, C]`` from its C x C covariance (float64, ``eigh``).

    Same result as scikit-learn's ``PCA`` (full SVD) up to rounding, with the same sign
    convention (each component's largest-magnitude entry is positive), at a fraction of the
    cost when ``n >> C``: one pass accumulating ``X^T X`` in chunks (no n x C float64 copy)
    and a C x C eigendecomposition, instead of an SVD of the n x C matrix (seconds for a
    large PCA picture; docs/engine.md, "Design measurements"). Returns ``(components [k, C], mean [C], explained_variance_ratio [k])``.
    """
    n, c = x.shape
    mean = x.mean(0, dtype=np.float64)
    cov = np.zeros((c, c), np.float64)
    for r0 in range(0, n, rows_per_chunk):
        centred = x[r0 : r0 + rows_per_chunk].astype(np.float64) - mean
        cov += centred.T @ centred
    cov /= max(n - 1, 1)
    eigval, eigvec = np.linalg.eigh(cov)  # ascending
    order = np.argsort(eigval)[::-1][:k]
    components = eigvec[:, order].T.copy()  # [k, C]
    biggest = np.argmax(np.abs(components), axis=1)
    components *= np.sign(components[np.arange(k), biggest])[:, None]
    total = float(np.clip(eigval, 0, None).sum())
    ratio = np.clip(eigval[order], 0, None) / total if total > 0 else np.zeros(k)
    return components, mean, ratio


def pca_rgb(
    features, basis: Optional[PCABasis] = None, max_samples: Optional[int] = 100_000, seed: int = 0
) -> Tuple[np.ndarray, PCABasis]:
    """``(C, ...)`` features -> ``(..., 3)`` RGB in [0, 1], and the basis used (fitted if not given)."""
    if basis is None:
        basis = fit_pca(features, 3, max_samples, seed)
    return basis.to_rgb(basis.project(features)), basis
