"""Feature explorer: point similarity and scribble segmentation on HR features.

Public functions (also exported by the package)::

    import napari_upsample_anything as upa
    from napari_upsample_anything.explore import train_classifier, apply_classifier

    sim = upa.similarity_map(lr_feats, [(120, 80)], image, field)        # (H, W) cosine similarity
    labels, probs = upa.segment_scribbles(lr_feats, scribbles, image, field)
    clf = train_classifier(lr_feats, scribbles, image, field); clf.save("cells.npz")
    labels, probs = apply_classifier("cells.npz", other_feats, other_image, other_field)

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

import os
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch

from . import api
from .core.feature_queries import (
    DEFAULT_SAMPLES_PER_CLASS,
    ClassifierMismatchError,
    PixelGatherer,
    ProbabilityWriter,
    ScribbleClassifier,
    SimilarityAccumulator,
    TileSink,
    band_rows,
    bilinear_at,
    bilinear_rows,
    cosine,
    hr_band_reader,
    iter_bands,
    labels_from_probabilities,
    lr_cells,
    scribble_pixels,
    similarity_from_bands,
    subsample_per_class,
    weights_mean,
)
from .core.field import KernelField
from .core.progress import CancelFn, ProgressFn, check_cancel, report

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

ArrayLike = Union[np.ndarray, torch.Tensor]
UPSAMPLERS = ("kernels", "bilinear")
ROUTES = ("hr", "lr")
NORMS = ("exact", "bound")
_OPTION_NAMES = ("radius", "alpha", "border", "radius_units")


# ---------------------------------------------------------------------------------- inputs
def _check_features(features, name: str = "features"):
    """Validate a (C, ., .) feature array without copying it (it may be a large memmap)."""
    if isinstance(features, torch.Tensor):
        if features.is_complex() or not (
            features.is_floating_point() or features.dtype in (torch.int32, torch.int64, torch.uint8)
        ):
            raise TypeError(f"{name} has dtype {features.dtype}; give real-valued features")
    else:
        if not hasattr(features, "shape") or not hasattr(features, "dtype"):
            raise TypeError(f"{name} must be a numpy array (or memmap) or a torch tensor, got {type(features).__name__}")
        dt = np.dtype(features.dtype)
        if not np.issubdtype(dt, np.number) or np.issubdtype(dt, np.complexfloating):
            raise TypeError(f"{name} has dtype {dt}; give real-valued features")
    if len(features.shape) != 3:
        raise ValueError(
            f"{name} must be channels-first (C, H, W) or (C, h, w), got shape {tuple(features.shape)}; "
            "for channels-last arrays use np.moveaxis(f, -1, 0)"
        )
    if min(int(n) for n in features.shape) < 1:
        raise ValueError(f"{name} is empty (shape {tuple(features.shape)})")
    return features


def _lr_tensor(features, name: str = "features") -> torch.Tensor:
    """The (small) LR features as a finite float32 CPU tensor."""
    t = (
        features.detach().to("cpu", torch.float32)
        if isinstance(features, torch.Tensor)
        else torch.from_numpy(np.ascontiguousarray(features, np.float32))
    )
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf values; replace them (e.g. np.nan_to_num) first")
    return t


def _checked_band(read):
    def band(y0: int, y1: int) -> torch.Tensor:
        b = read(y0, y1)
        if not bool(torch.isfinite(b).all()):
            raise ValueError(f"features contain NaN or Inf values (rows {y0}-{y1}); replace them first")
        return b

    return band


def _options(options: dict) -> dict:
    unknown = sorted(set(options) - set(_OPTION_NAMES))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {unknown}; render options are {list(_OPTION_NAMES)}")
    return options


class _Source:
    """Where HR features come from: ``mode`` is "hr", "kernels" or "bilinear"."""

    def __init__(self, features, guide, field, upsampler: str, hr_shape=None, normalize="auto"):
        if upsampler not in UPSAMPLERS:
            raise ValueError(f"upsampler={upsampler!r}: use 'kernels' (the fitted GSJBU kernels) or 'bilinear'")
        self.features = _check_features(features)
        self.guide = guide
        self.field = field
        self.normalize = normalize
        C, a, b = (int(n) for n in features.shape)
        self.channels = C
        if field is not None and not isinstance(field, KernelField):
            raise TypeError(f"field must be a KernelField (from fit_kernels), got {type(field).__name__}")
        if upsampler == "kernels" and field is None:
            self.mode = "hr"
            self.hr_shape = (a, b)
            self.lr_shape = None
            if guide is not None and _guide_shape(guide) != (a, b):
                raise ValueError(
                    f"features of shape {tuple(features.shape)} are not full resolution for the guide "
                    f"{_guide_shape(guide)}: for low-resolution features pass field=fit_kernels(...) "
                    "(or upsampler='bilinear')"
                )
            if hr_shape is not None and tuple(int(n) for n in hr_shape) != (a, b):
                raise ValueError(f"hr_shape={tuple(hr_shape)} differs from the HR features' (H, W) = {(a, b)}")
            return
        self.mode = upsampler
        self.lr_shape = (a, b)
        self.lr = _lr_tensor(features)
        if guide is not None:
            self.hr_shape = _guide_shape(guide)
        elif hr_shape is not None and upsampler == "bilinear":
            self.hr_shape = tuple(int(n) for n in hr_shape)
        else:
            need = "guide" if upsampler == "kernels" else "guide or hr_shape"
            raise ValueError(f"low-resolution features with upsampler={upsampler!r} need the {need} (the image)")
        H, W = self.hr_shape
        if a > H or b > W:
            raise ValueError(f"features (h, w) = {(a, b)} are larger than the image {self.hr_shape}")
        if upsampler == "kernels":
            field.validate((a, b), "field")

    @property
    def is_lr(self) -> bool:
        return self.mode != "hr"


def _guide_shape(guide) -> Tuple[int, int]:
    shape = tuple(int(n) for n in np.shape(guide))
    if len(shape) not in (2, 3):
        raise ValueError(f"guide must be (H, W) or (H, W, G), got shape {shape}")
    return shape[0], shape[1]


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


def _stage(progress: Optional[ProgressFn], stage: str) -> Optional[ProgressFn]:
    if progress is None:
        return None
    return lambda done, total, info: progress(done, total, dict(info, stage=stage))


def _engine(guide, field: KernelField, lr_shape, normalize, options: dict):
    from .core.engine.blocks import BlockEngine, RenderOptions
    from .core.guide import Guide

    g = Guide(guide, normalize, smoothing=api.fitted_smoothing(field))
    return BlockEngine(g, lr_shape, RenderOptions(**options), torch.device("cpu"))


def _stream(src: _Source, consume, *, device, max_memory, precision, progress, cancel, stage, options) -> TileSink:
    """Render ``src``'s LR features with its field, handing each tile to ``consume``."""
    sink = TileSink((src.channels,) + tuple(src.hr_shape), consume)
    api.render(
        src.lr,
        src.guide,
        src.field,
        out=sink,
        device=device,
        precision=precision,
        max_memory=max_memory,
        normalize=src.normalize,
        progress=_stage(progress, stage),
        cancel=cancel,
        **options,
    )
    return sink


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
    options = _options(options)
    src = _Source(features, guide, field, upsampler, hr_shape, normalize)
    ys, xs = _points(points, src.hr_shape)
    H, W = src.hr_shape
    if src.mode == "hr":
        feats = src.features
        samples = np.asarray(
            feats[:, ys, xs] if not isinstance(feats, torch.Tensor) else feats[:, ys, xs].cpu().numpy(), np.float64
        )
        query = samples.mean(axis=1)
        return similarity_from_bands(
            _checked_band(hr_band_reader(feats)), query, src.hr_shape, src.channels, progress=progress, cancel=cancel
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
        _stream(src, acc, progress=progress, stage="similarity", **kw)
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
        progress=_stage(progress, "similarity"),
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


# ---------------------------------------------------------------------------------- scribbles
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
    options = _options(options)
    src = _Source(features, guide, field, upsampler, None, normalize)
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
            _stream(
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
    src_is_lr = not (upsampler == "kernels" and field is None)  # as _Source decides
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
    options = _options(options)
    src = _Source(features, guide, field, upsampler, None, normalize)
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
                progress=_stage(progress, "classification"),
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
            _stream(
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
                bands = _checked_band(hr_band_reader(src.features))
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
