"""Scribble segmentation: train a pixel classifier on scribbled pixels, classify every pixel.

:func:`train_classifier` takes samples (:func:`scribble_samples`) of the features at the
scribbles, on HR pixels (``route="hr"``) or LR tokens (``route="lr"``); :func:`apply_classifier`
predicts every HR pixel tile by tile (or the LR tokens, then upsamples the probabilities);
:func:`segment_scribbles` does both. Features come as in :mod:`.explore` (HR, or LR with the
guide and the kernels or bilinear upsampling); all names are exported by :mod:`.explore`.
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from . import api
from .core.feature_queries import (
    DEFAULT_SAMPLES_PER_CLASS,
    PixelGatherer,
    ProbabilityWriter,
    ScribbleClassifier,
    band_rows,
    bilinear_at,
    bilinear_rows,
    hr_band_reader,
    iter_bands,
    labels_from_probabilities,
    lr_cells,
    scribble_pixels,
    subsample_per_class,
)
from .core.field import KernelField
from .core.progress import CancelFn, ProgressFn, check_cancel, report
from .explore_inputs import ArrayLike, FeatureSource, checked_band, render_options, staged, stream_render

ROUTES = ("hr", "lr")


def _scribbles(scribbles, hr_shape: Tuple[int, int], min_classes: int = 2) -> np.ndarray:
    arr = np.asarray(scribbles)
    if arr.ndim != 2:
        raise ValueError(f"scribbles must be a 2D (H, W) labels array (0 = unlabelled), got shape {arr.shape}")
    if tuple(arr.shape) != tuple(hr_shape):
        raise ValueError(f"scribbles have shape {arr.shape}; they must cover the image, (H, W) = {tuple(hr_shape)}")
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"scribbles have dtype {arr.dtype}; give integer labels (0 = unlabelled, 1, 2, ... = classes)")
    if (arr < 0).any():
        raise ValueError("scribbles contain negative labels; use 0 for unlabelled and positive class values")
    classes = np.unique(arr[arr > 0])
    if len(classes) < min_classes:
        if min_classes == 1:
            raise ValueError("scribbles contain no labelled pixel; paint at least one stroke (labels 1, 2, ...)")
        raise ValueError(
            f"scribbles contain {len(classes)} class(es) {classes.tolist()}; paint at least two classes "
            "(labels 1, 2, ...) to train a classifier"
        )
    return arr


def _image_channels(guide, normalize, field: Optional[KernelField]):
    """The normalised guide ``(G, H, W)`` float32 (smoothed like the fit), appended to features."""
    from .core.guide import Guide

    if guide is None:
        raise ValueError("include_image=True needs the guide (the image)")
    smoothing = api.fitted_smoothing(field) if field is not None else 0.0
    return Guide(guide, normalize, smoothing=smoothing).full().numpy()


def _lr_image_channels(guide, normalize, field, lr_shape) -> np.ndarray:
    from .core.guide import Guide
    from .core.render import area_lr_guide

    if guide is None:
        raise ValueError("include_image=True needs the guide (the image)")
    smoothing = api.fitted_smoothing(field) if field is not None else 0.0
    return area_lr_guide(Guide(guide, normalize, smoothing=smoothing), lr_shape, torch.device("cpu")).numpy()


def scribble_samples(
    features: ArrayLike,
    scribbles: np.ndarray,
    guide: Optional[ArrayLike] = None,
    field: Optional[KernelField] = None,
    *,
    route: str = "hr",
    upsampler: str = "kernels",
    include_image: bool = False,
    samples_per_class: Optional[int] = DEFAULT_SAMPLES_PER_CLASS,
    seed: int = 0,
    normalize="auto",
    device: str | torch.device = "auto",
    precision: str = "fp32",
    max_memory=None,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelFn] = None,
    min_classes: int = 2,
    **options,
) -> Tuple[np.ndarray, np.ndarray]:
    """The training samples of one image: ``(X (N, D) float32, labels (N,) int64)``.

    Arguments as in :func:`train_classifier`. ``min_classes``: how many classes the scribbles
    must hold (1 for one example among many: the classes are counted over all of them).
    """
    if route not in ROUTES:
        raise ValueError(f"route={route!r}: use 'hr' (classify HR pixels) or 'lr' (classify LR tokens, upsample probabilities)")
    options = render_options(options)
    src = FeatureSource(features, guide, field, upsampler, None, normalize)
    arr = _scribbles(scribbles, src.hr_shape, min_classes)
    ys, xs, labels = scribble_pixels(arr)
    keep = subsample_per_class(labels, samples_per_class, seed)
    ys, xs, labels = ys[keep], xs[keep], labels[keep]
    check_cancel(cancel, "training")
    if route == "lr":
        if not src.is_lr:
            raise ValueError("route='lr' classifies LR tokens: give LR features (C, h, w) with the guide (and field)")
        i, j = lr_cells(ys, xs, src.lr_shape, src.hr_shape)
        X = src.lr[:, torch.as_tensor(i), torch.as_tensor(j)].T.numpy()
        if include_image:
            X = np.concatenate([X, _lr_image_channels(guide, normalize, field, src.lr_shape)[:, i, j].T], 1)
    else:
        if src.mode == "hr":
            f = src.features
            X = np.asarray(f[:, ys, xs].cpu().numpy() if isinstance(f, torch.Tensor) else f[:, ys, xs], np.float32).T
            if not np.isfinite(X).all():
                raise ValueError("features contain NaN or Inf values at the scribbled pixels; replace them first")
        elif src.mode == "bilinear":
            X = bilinear_at(src.lr, src.hr_shape, ys, xs).numpy()
        else:
            gather = PixelGatherer(ys, xs, src.hr_shape, src.channels)
            stream_render(
                src,
                gather,
                device=device,
                max_memory=max_memory,
                precision=precision,
                progress=progress,
                cancel=cancel,
                stage="training",
                options=options,
            )
            X = gather.samples
        if include_image:
            X = np.concatenate([X, _image_channels(guide, normalize, field)[:, ys, xs].T], 1)
    check_cancel(cancel, "training")
    return np.ascontiguousarray(X, np.float32), np.asarray(labels, np.int64)


def train_classifier(
    features: ArrayLike,
    scribbles: np.ndarray,
    guide: Optional[ArrayLike] = None,
    field: Optional[KernelField] = None,
    *,
    classifier=None,
    route: str = "hr",
    upsampler: str = "kernels",
    include_image: bool = False,
    samples_per_class: Optional[int] = DEFAULT_SAMPLES_PER_CLASS,
    seed: int = 0,
    normalize="auto",
    device: str | torch.device = "auto",
    precision: str = "fp32",
    max_memory=None,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelFn] = None,
    class_names: Optional[Dict[int, str]] = None,
    settings: Optional[Dict] = None,
    **options,
) -> ScribbleClassifier:
    """Train a classifier on the features at the scribbled pixels.

    Parameters
    ----------
    features, guide, field, upsampler :
        As in :func:`similarity_map` (HR features, or LR features + guide + field).
    scribbles : (H, W) int
        0 = unlabelled; every other value is a class.
    classifier : estimator, optional
        Any object with ``fit(X, y)`` and ``predict_proba(X)`` (scikit-learn style). Default: a
        50-tree random forest with ``random_state=0``. Only scikit-learn estimators can be saved.
    route : "hr" | "lr"
        ``"hr"``: samples are the HR features at the scribbled pixels (for LR features with a
        field, gathered from a streamed render). ``"lr"``: samples are the LR tokens of the cells
        the scribbled pixels fall in (LR features only).
    include_image : bool
        Append the image's own normalised channels to the features (``"lr"``: cell averages).
    samples_per_class : int or None
        Seeded subsample of at most this many scribbled pixels per class (None: all), so
        retraining on large scribbles stays in seconds.
    class_names : dict int -> str, optional
        Names of the class values, saved with the classifier.
    settings : dict, optional
        How the features were made (saved; see :meth:`ScribbleClassifier.check_settings`).
        :func:`napari_upsample_anything.segmentation.train_from_examples` fills it in.

    Returns
    -------
    ScribbleClassifier (save it with ``.save(path)``; apply with :func:`apply_classifier`).
    For many images or planes, see :func:`napari_upsample_anything.segmentation.train_from_examples`.
    """
    X, labels = scribble_samples(
        features,
        scribbles,
        guide,
        field,
        route=route,
        upsampler=upsampler,
        include_image=include_image,
        samples_per_class=samples_per_class,
        seed=seed,
        normalize=normalize,
        device=device,
        precision=precision,
        max_memory=max_memory,
        progress=progress,
        cancel=cancel,
        **options,
    )
    src_is_lr = not (upsampler == "kernels" and field is None)  # as FeatureSource decides
    channels = int(features.shape[0])
    clf = ScribbleClassifier.train(
        X,
        labels,
        classifier,
        route=route,
        include_image=bool(include_image),
        meta={"upsampler": upsampler if src_is_lr else "none", "channels": channels, "seed": int(seed)},
        class_names=dict(class_names or {}),
        settings=dict(settings or {}),
    )
    report(progress, 1, 1, stage="training")
    return clf


def apply_classifier(
    classifier: ScribbleClassifier | str | os.PathLike,
    features: ArrayLike,
    guide: Optional[ArrayLike] = None,
    field: Optional[KernelField] = None,
    *,
    route: Optional[str] = None,
    upsampler: str = "kernels",
    normalize="auto",
    device: str | torch.device = "auto",
    precision: str = "fp32",
    max_memory=None,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelFn] = None,
    **options,
) -> Tuple[np.ndarray, np.ndarray]:
    """Class probabilities and labels of every HR pixel with a trained (or saved) classifier.

    Parameters
    ----------
    classifier : ScribbleClassifier or path of a file written by ``ScribbleClassifier.save``
    features, guide, field, upsampler : as in :func:`train_classifier`
    route : "hr" | "lr" | None
        None: the route the classifier was trained for. ``"hr"`` predicts every HR pixel from
        its HR feature, tile by tile or band by band (never ``C x H x W`` at once); ``"lr"``
        predicts the ``h x w`` LR tokens and upsamples the ``K`` class probabilities with the
        kernels (or bilinearly): about ``(H W) / (h w)`` times fewer predictions and a
        ``K``-channel render instead of a ``C``-channel one.

    Returns
    -------
    labels : (H, W) unsigned int, the class values (``classifier.classes``)
    probabilities : (K, H, W) float32, one map per class in ``classifier.classes`` order; each
        pixel's probabilities sum to 1.
    """
    if not isinstance(classifier, ScribbleClassifier):
        if isinstance(classifier, (str, os.PathLike)):
            classifier = ScribbleClassifier.load(classifier)
        else:
            raise TypeError(f"classifier must be a ScribbleClassifier or a file path, got {type(classifier).__name__}")
    route = classifier.route if route is None else route
    if route not in ROUTES:
        raise ValueError(f"route={route!r}: use 'hr' or 'lr'")
    options = render_options(options)
    src = FeatureSource(features, guide, field, upsampler, None, normalize)
    H, W = src.hr_shape
    K = len(classifier.classes)
    include = classifier.include_image
    if route == "lr":
        if not src.is_lr:
            raise ValueError("route='lr' classifies LR tokens: give LR features (C, h, w) with the guide (and field)")
        h, w = src.lr_shape
        X = src.lr.reshape(src.channels, -1).T.numpy()
        if include:
            X = np.concatenate([X, _lr_image_channels(guide, normalize, field, src.lr_shape).reshape(-1, h * w).T], 1)
        check_cancel(cancel, "classification")
        lr_prob = np.asarray(classifier.predict_proba(X), np.float32).T.reshape(K, h, w)
        if src.mode == "kernels":
            probs = api.render(
                lr_prob,
                guide,
                field,
                device=device,
                precision=precision,
                max_memory=max_memory,
                normalize=normalize,
                progress=staged(progress, "classification"),
                cancel=cancel,
                **options,
            )
        else:
            probs = torch.nn.functional.interpolate(
                torch.from_numpy(lr_prob)[None], (H, W), mode="bilinear", align_corners=False
            )[0].numpy()
    else:
        probs = np.zeros((K, H, W), np.float32)
        image = _image_channels(guide, normalize, field) if include else None
        extra = (lambda y0, y1, x0, x1: image[:, y0:y1, x0:x1]) if include else None
        writer = ProbabilityWriter(classifier.predict_proba, probs, extra)
        if src.mode == "kernels":
            stream_render(
                src,
                writer,
                device=device,
                max_memory=max_memory,
                precision=precision,
                progress=progress,
                cancel=cancel,
                stage="classification",
                options=options,
            )
        else:
            if src.mode == "hr":
                bands = checked_band(hr_band_reader(src.features))
            else:
                bands = lambda y0, y1: bilinear_rows(src.lr, src.hr_shape, y0, y1)  # noqa: E731
            # Bands a few times smaller than the read bands: predict_proba makes (n, K) copies.
            rows = max(1, band_rows(src.channels, W) // 4)
            for y0, y1 in iter_bands(H, rows):
                check_cancel(cancel, "classification")
                writer(y0, y1, 0, W, np.asarray(bands(y0, y1), np.float32))
                report(progress, y1, H, stage="classification")
    return labels_from_probabilities(probs, classifier.classes), probs


def segment_scribbles(
    features: ArrayLike,
    scribbles: np.ndarray,
    guide: Optional[ArrayLike] = None,
    field: Optional[KernelField] = None,
    *,
    classifier=None,
    route: str = "hr",
    upsampler: str = "kernels",
    include_image: bool = False,
    samples_per_class: Optional[int] = DEFAULT_SAMPLES_PER_CLASS,
    return_classifier: bool = False,
    seed: int = 0,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelFn] = None,
    **kwargs,
):
    """Scribble segmentation: train on the scribbled pixels, classify every pixel.

    :func:`train_classifier` then :func:`apply_classifier` with the same arguments (see them).
    Returns ``(labels (H, W), probabilities (K, H, W))``, plus the :class:`ScribbleClassifier`
    when ``return_classifier`` (its ``classes`` give the label value of each probability map).
    """
    clf = train_classifier(
        features,
        scribbles,
        guide,
        field,
        classifier=classifier,
        route=route,
        upsampler=upsampler,
        include_image=include_image,
        samples_per_class=samples_per_class,
        seed=seed,
        progress=progress,
        cancel=cancel,
        **kwargs,
    )
    labels, probs = apply_classifier(
        clf,
        features,
        guide,
        field,
        route=route,
        upsampler=upsampler,
        progress=progress,
        cancel=cancel,
        **kwargs,
    )
    return (labels, probs, clf) if return_classifier else (labels, probs)
