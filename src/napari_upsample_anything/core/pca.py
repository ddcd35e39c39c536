"""PCA pictures of feature maps (scikit-learn), and the exact low-cost HR PCA.

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
    from sklearn.decomposition import PCA

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
    pca = PCA(n_components=k, random_state=seed, svd_solver="full" if x.shape[0] * c < 5e7 else "randomized")
    proj = pca.fit_transform(x)
    lo = np.percentile(proj, 1, axis=0)
    hi = np.percentile(proj, 99, axis=0)
    return PCABasis(
        components=pca.components_.astype(np.float32),
        mean=pca.mean_.astype(np.float32),
        lo=lo.astype(np.float32),
        hi=hi.astype(np.float32),
        explained_variance_ratio=pca.explained_variance_ratio_.astype(np.float32),
    )


def pca_rgb(features, basis: Optional[PCABasis] = None, max_samples: Optional[int] = 100_000, seed: int = 0) -> Tuple[np.ndarray, PCABasis]:
    """``(C, ...)`` features -> ``(..., 3)`` RGB in [0, 1], and the basis used (fitted if not given)."""
    if basis is None:
        basis = fit_pca(features, 3, max_samples, seed)
    return basis.to_rgb(basis.project(features)), basis
