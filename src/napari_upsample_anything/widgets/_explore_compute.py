"""The Feature explorer's computations, without Qt: they run in the explorer's worker thread.

Each ``compute_*`` follows the widgets' convention (``progress=``, ``cancel=`` keywords, see
:mod:`._pipeline`); :func:`plane_scribbles` reads one plane of a scribble layer.
"""

from __future__ import annotations

import numpy as np

from ._frame import full_res_data, layer_kind
from ._pipeline import Progress
from ._registry import FitResult


class ExplorerInputError(ValueError):
    """The chosen layers do not fit the chosen result (the message says why)."""


def _adapter(progress):
    """Core ``progress(done, total, info)`` -> the widgets' :class:`Progress` events."""
    if progress is None:
        return None
    return lambda done, total, info: progress(Progress(str(info.get("stage", "")), int(done), int(total)))


def compute_similarity(plane, points: np.ndarray, device: str = "auto", *, progress=None, cancel=None) -> dict:
    """``{"kernels": (H, W), "bilinear": (H, W)}`` similarity maps of ``plane`` for ``(N, 2)`` (y, x) points."""
    from ..explore import similarity_map

    cb = _adapter(progress)
    if plane.hr_features is not None:
        sim = similarity_map(plane.hr_features, points, progress=cb, cancel=cancel)
    else:
        sim = similarity_map(plane.features, points, plane.guide, plane.field, device=device, progress=cb, cancel=cancel)
    bil = similarity_map(plane.features, points, hr_shape=plane.hr_shape, upsampler="bilinear", progress=cb, cancel=cancel)
    return {"kernels": sim, "bilinear": bil}


def compute_segmentation(
    plane,
    scribbles: np.ndarray,
    route: str = "hr",
    include_image: bool = False,
    device: str = "auto",
    *,
    progress=None,
    cancel=None,
) -> dict:
    """Train on ``scribbles`` (H, W) and classify ``plane``; ``{"labels", "probabilities", "classifier"}``."""
    from ..explore import segment_scribbles

    if route == "hr" and plane.hr_features is not None:
        features, guide, field = plane.hr_features, (plane.guide if include_image else None), None
    else:
        features, guide, field = plane.features, plane.guide, plane.field
    labels, probs, clf = segment_scribbles(
        features,
        scribbles,
        guide,
        field,
        route=route,
        include_image=include_image,
        return_classifier=True,
        device=device,
        progress=_adapter(progress),
        cancel=cancel,
    )
    return {"labels": labels, "probabilities": probs, "classifier": clf}


def compute_apply(planes, classifier, device: str = "auto", *, progress=None, cancel=None) -> dict:
    """Apply a trained or loaded classifier to each plane: ``{"labels": [(H, W)], "probabilities": [(K, H, W)]}``.

    The classifier's own route and image-channel setting are used (as it was trained); HR
    features kept by the main widget are read directly, otherwise rendered tile by tile.
    """
    from ..explore import apply_classifier

    labels, probs = [], []
    for plane in planes:
        route = classifier.route
        if route == "hr" and plane.hr_features is not None:
            features, guide, field = plane.hr_features, (plane.guide if classifier.include_image else None), None
        else:
            features, guide, field = plane.features, plane.guide, plane.field
        lab, prob = apply_classifier(
            classifier, features, guide, field, device=device, progress=_adapter(progress), cancel=cancel
        )
        labels.append(lab)
        probs.append(prob)
    return {"labels": labels, "probabilities": probs, "classifier": classifier}


def plane_scribbles(layer, result: FitResult, plane) -> np.ndarray:
    """A copy of the ``(H, W)`` scribbles of ``plane`` from a Labels layer (never a view of it).

    Accepted shapes: ``(H, W)``; the result frame's own layout (leading axes of size 1 or the
    slice axes, as the plugin's layers); or the source image's shape (without RGB).
    """
    if layer_kind(layer) != "labels":
        raise ExplorerInputError(f"Layer '{layer.name}' is a {layer_kind(layer)} layer; paint scribbles into a Labels layer.")
    data = full_res_data(layer)
    shape = tuple(int(n) for n in data.shape)
    H, W = plane.hr_shape
    frame = result.frame
    if shape[-2:] != (H, W):
        raise ExplorerInputError(
            f"Labels layer '{layer.name}' has shape {shape}; its last two axes must be the fitted image's (H, W) = {(H, W)}."
        )
    if len(shape) == 2:
        return np.array(data, copy=True)
    if len(shape) != frame.ndim:
        raise ExplorerInputError(
            f"Labels layer '{layer.name}' has shape {shape}; give (H, W) or one axis per image axis ({frame.ndim})."
        )
    key = []
    for a in range(frame.ndim - 2):
        if shape[a] == 1:
            key.append(0)
        elif a in frame.slice_axes and shape[a] == frame.shape[a]:
            key.append(int(plane.index[frame.slice_axes.index(a)]))
        elif a == frame.channel_axis:
            key.append(0)
        else:
            raise ExplorerInputError(
                f"Labels layer '{layer.name}' has shape {shape}, which does not match the image {frame.shape}."
            )
    return np.array(data[tuple(key)], copy=True)
