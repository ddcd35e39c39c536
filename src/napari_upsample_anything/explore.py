"""Feature explorer: point similarity and scribble segmentation on HR features.

Public functions (also exported by the package)::

    import napari_upsample_anything as upa
    from napari_upsample_anything.explore import train_classifier, apply_classifier

    sim = upa.similarity_map(lr_feats, [(120, 80)], image, field)        # (H, W) cosine similarity
    labels, probs = upa.segment_scribbles(lr_feats, scribbles, image, field)
    clf = train_classifier(lr_feats, scribbles, image, field); clf.save("cells.npz")
    labels, probs = apply_classifier("cells.npz", other_feats, other_image, other_field)

This module holds the similarity; the scribble classification lives in
:mod:`.explore_scribbles` and the three forms of features below in :mod:`.explore_inputs`.
Import every name from here.

Features come in one of three forms:

* **HR features** ``(C, H, W)`` (numpy, ``numpy.memmap`` or tensor), no ``field``: used as
  they are, read in bands of rows (a memory-mapped array is never loaded whole).
* **LR features** ``(C, h, w)`` + ``guide`` + ``field`` (``upsampler="kernels"``, default): the
  HR features are the GSJBU render, which is *streamed*: every rendered tile is consumed (its
  similarities or class probabilities computed) and dropped, so the full ``C x H x W`` array
  never exists; memory is the render's ``max_memory`` budget.
* **LR features** + ``guide`` (or ``hr_shape``), ``upsampler="bilinear"``: bilinearly
  upsampled features (``F.interpolate``, ``align_corners=False``), in bands of rows; the
  comparison the paper's similarity figures make.

Batch use: :mod:`napari_upsample_anything.segmentation` trains from many (image, scribbles)
pairs through the pipeline (recording the backbone and feature settings in the classifier
file) and applies a saved classifier to any plane; ``upsample-anything segment`` does it for
files, folders and stacks. By hand::

    clf = ScribbleClassifier.load("classifier.npz")        # refits from stored samples; no pickle
    for path in images:
        image = load_image(path)
        feats, geom = upa.extract_features(image)
        field = upa.fit_kernels(image, lr_shape=geom.lr_shape)
        labels, probs = apply_classifier(clf, feats, image, field)
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from . import api
from .core.feature_queries import (
    ClassifierMismatchError,
    ScribbleClassifier,
    SimilarityAccumulator,
    bilinear_at,
    bilinear_rows,
    cosine,
    hr_band_reader,
    similarity_from_bands,
    weights_mean,
)
from .core.field import KernelField
from .core.progress import CancelFn, ProgressFn
from .explore_inputs import ArrayLike, FeatureSource, checked_band, render_options, staged, stream_render

# The scribble classification lives in explore_scribbles; users import it from here.
from .explore_scribbles import apply_classifier, scribble_samples, segment_scribbles, train_classifier

__all__ = [
    "ClassifierMismatchError",
    "scribble_samples",
    "similarity_map",
    "compare_similarity",
    "segment_scribbles",
    "train_classifier",
    "apply_classifier",
    "ScribbleClassifier",
]

NORMS = ("exact", "bound")


def _points(points, hr_shape: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """Integer (ys, xs) of (N, 2) (y, x) HR pixel coordinates (rounded)."""
    arr = np.asarray(points, dtype=float)
    if arr.ndim == 1 and arr.size == 2:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] == 0:
        raise ValueError(f"points must be one (y, x) pair or an (N, 2) array of (y, x) pixel coordinates, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("points contain NaN or Inf")
    yx = np.rint(arr).astype(np.int64)
    H, W = hr_shape
    bad = (yx[:, 0] < 0) | (yx[:, 0] >= H) | (yx[:, 1] < 0) | (yx[:, 1] >= W)
    if bad.any():
        raise ValueError(f"points {arr[bad].tolist()} are outside the {H} x {W} image; give (y, x) pixel coordinates")
    return yx[:, 0], yx[:, 1]


def _engine(guide, field: KernelField, lr_shape, normalize, options: dict):
    from .core.engine.blocks import BlockEngine, RenderOptions
    from .core.guide import Guide

    g = Guide(guide, normalize, smoothing=api.fitted_smoothing(field))
    return BlockEngine(g, lr_shape, RenderOptions(**options), torch.device("cpu"))


# ---------------------------------------------------------------------------------- similarity
def similarity_map(
    features: ArrayLike,
    points,
    guide: Optional[ArrayLike] = None,
    field: Optional[KernelField] = None,
    *,
    upsampler: str = "kernels",
    norm: str = "exact",
    hr_shape: Optional[Tuple[int, int]] = None,
    normalize="auto",
    device: str | torch.device = "auto",
    precision: str = "fp32",
    max_memory=None,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelFn] = None,
    **options,
) -> np.ndarray:
    """Cosine similarity of every HR pixel's feature with the mean HR feature at ``points``.

    Parameters
    ----------
    features : (C, H, W) HR features, or (C, h, w) LR features with ``field`` (see the module docstring)
    points : (y, x) or (N, 2) array
        HR pixel coordinates (rounded to the nearest pixel). The query is the mean of the
        points' HR feature vectors.
    guide, field :
        The image (H, W[, G]) and its fitted :class:`KernelField`, for LR features.
    upsampler : "kernels" | "bilinear"
        How LR features become HR features: the fitted kernels (default), or bilinear
        interpolation (for comparison; ``field`` is not needed, ``guide`` or ``hr_shape`` gives
        the size).
    norm : "exact" | "bound"
        How ``||F(p)||`` of the GSJBU features is obtained (LR features with a field only):

        * ``"exact"`` (default): all ``C`` channels are rendered and streamed: each tile's
          ``<F(p), q>`` and ``||F(p)||^2`` are accumulated in float64 and the tile is dropped.
          Exact to float32 render rounding (tested: relative error < 1e-4 against the full HR
          computation); costs one render of the features in time, one tile in memory.
        * ``"bound"``: two rendered channels only. The numerator is linear in the map, so it is
          the render of ``q . f_k``; the denominator uses the render of ``||f_k||^2``, which by
          Jensen (the weights ``w_k`` are non-negative and sum to one) is
          ``sum_k w_k ||f_k||^2 = ||F(p)||^2 + sum_k w_k ||f_k - F(p)||^2 >= ||F(p)||^2``. So
          the result has the exact sign and ``|bound| <= |exact|``; it is exact wherever the
          kernel weights sit on cells with equal features (inside uniform regions) and lowest at
          edges where the kernels mix different features. About ``C / 2`` times cheaper.

        HR and bilinear features are always exact.
    hr_shape : (H, W), optional
        The HR size for ``upsampler="bilinear"`` without a guide.
    normalize, device, precision, max_memory, radius, alpha, border, radius_units :
        As in :func:`napari_upsample_anything.render` (``precision`` defaults to fp32 here:
        squared norms in fp16 lose too much).
    progress, cancel :
        ``progress(done, total, {"stage": "similarity"})`` per tile or band; ``cancel()``
        polled before each.

    Returns
    -------
    (H, W) float32 in [-1, 1]; 0 where a feature vector is zero. The similarity at a single
    query point is 1 there.
    """
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r}: use 'exact' (all channels streamed) or 'bound' (two channels, Jensen bound)")
    options = render_options(options)
    src = FeatureSource(features, guide, field, upsampler, hr_shape, normalize)
    ys, xs = _points(points, src.hr_shape)
    H, W = src.hr_shape
    if src.mode == "hr":
        feats = src.features
        samples = np.asarray(
            feats[:, ys, xs] if not isinstance(feats, torch.Tensor) else feats[:, ys, xs].cpu().numpy(), np.float64
        )
        query = samples.mean(axis=1)
        return similarity_from_bands(
            checked_band(hr_band_reader(feats)), query, src.hr_shape, src.channels, progress=progress, cancel=cancel
        )
    if src.mode == "bilinear":
        query = bilinear_at(src.lr, src.hr_shape, ys, xs).double().mean(0).numpy()
        return similarity_from_bands(
            lambda y0, y1: bilinear_rows(src.lr, src.hr_shape, y0, y1),
            query,
            src.hr_shape,
            src.channels,
            progress=progress,
            cancel=cancel,
        )
    # GSJBU kernels: the points' mean HR feature is the LR map weighted by the mean of their
    # effective weight maps (render is linear with weights summing to one).
    engine = _engine(guide, field, src.lr_shape, normalize, options)
    from .core.render import pixel_weight_map

    weights = weights_mean([pixel_weight_map(engine, field, int(y), int(x)) for y, x in zip(ys, xs)])
    lr64 = src.lr.double()
    query = torch.einsum("chw,hw->c", lr64, torch.from_numpy(weights)).numpy()
    kw = dict(device=device, precision=precision, max_memory=max_memory, cancel=cancel, options=options)
    if norm == "exact":
        acc = SimilarityAccumulator(query, src.hr_shape)
        stream_render(src, acc, progress=progress, stage="similarity", **kw)
        return acc.similarity()
    q = torch.from_numpy(query)
    two = torch.stack([torch.einsum("c,chw->hw", q, lr64), (lr64 * lr64).sum(0)]).to(torch.float32)
    out = api.render(
        two.numpy(),
        guide,
        field,
        device=device,
        precision=precision,
        max_memory=max_memory,
        normalize=normalize,
        progress=staged(progress, "similarity"),
        cancel=cancel,
        **options,
    )
    return cosine(out[0].astype(np.float64), out[1].astype(np.float64), float(np.linalg.norm(query)))


def compare_similarity(features: ArrayLike, points, guide: ArrayLike, field: KernelField, **kwargs) -> dict:
    """``{"kernels": ..., "bilinear": ...}``: :func:`similarity_map` of LR features both ways."""
    return {
        "kernels": similarity_map(features, points, guide, field, upsampler="kernels", **kwargs),
        "bilinear": similarity_map(
            features,
            points,
            guide,
            None,
            upsampler="bilinear",
            **{k: v for k, v in kwargs.items() if k in ("progress", "cancel")},
        ),
    }
