"""The Feature explorer's computations, without Qt: they run in the explorer's worker thread.

Each ``compute_*`` follows the widgets' convention (``progress=``, ``cancel=`` keywords, see
:mod:`._pipeline`). :class:`FeatureSource` says which transformer blocks the features come
from (the fit's own, or others extracted again from the plane's image); :func:`plane_scribbles`
and :func:`scribble_examples` read the scribbles of one plane, or of every scribbled slice.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ._frame import full_res_data, layer_kind
from ._pipeline import Progress, RunConfig
from ._registry import FitResult

#: How the "Blocks" field is written (shown in its error messages and tooltip).
BLOCKS_HINT = "give transformer block numbers separated by commas, e.g. -1 or -1,-4 (-1 = the last block)"


class ExplorerInputError(ValueError):
    """The chosen layers do not fit the chosen result (the message says why)."""


def _adapter(progress):
    """Core ``progress(done, total, info)`` -> the widgets' :class:`Progress` events."""
    if progress is None:
        return None
    return lambda done, total, info: progress(Progress(str(info.get("stage", "")), int(done), int(total)))


# ---------------------------------------------------------------------------------- blocks
def parse_blocks(text: str) -> Optional[Tuple[int, ...]]:
    """The "Blocks" field: ``""`` -> None (the fitted image's own features), ``"-1,-4"`` -> ``(-1, -4)``.

    Raises :class:`ExplorerInputError` naming the field and the expected form.
    """
    text = str(text).strip()
    if not text:
        return None
    blocks: List[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = int(part)
        except ValueError:
            raise ExplorerInputError(f"Blocks {text!r}: {part!r} is not a whole number; {BLOCKS_HINT}") from None
        if value in blocks:
            raise ExplorerInputError(f"Blocks {text!r}: block {value} is listed twice; {BLOCKS_HINT}")
        blocks.append(value)
    return tuple(blocks)


def fit_blocks(config: RunConfig) -> Tuple[int, ...]:
    """The transformer blocks the fitted image's features came from."""
    layer = config.layer
    return tuple(int(v) for v in layer) if isinstance(layer, (tuple, list)) else (int(layer),)


@dataclasses.dataclass
class FeatureSource:
    """Where the explorer reads a plane's LR features: the fit's own, or other transformer blocks.

    The kernels do not depend on the features (they are fitted on the image), so features of
    other blocks are extracted again from the plane's image with the fit's backbone, weights
    and input size, and rendered with the same kernels. They are kept in :attr:`cache`
    (shared by the widget's runs: the ViT runs once per plane and block choice).
    """

    config: RunConfig
    blocks: Optional[Tuple[int, ...]] = None  # None: the fit's own features (and kept HR features)
    cache: Dict[tuple, np.ndarray] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.blocks is not None and tuple(self.blocks) == fit_blocks(self.config):
            self.blocks = None  # the fit's own blocks: use its features (and HR features) as they are

    @property
    def layers(self) -> List[int]:
        """The blocks as recorded in a classifier file."""
        return list(self.blocks if self.blocks is not None else fit_blocks(self.config))

    def features(self, plane, device: str, *, progress=None, cancel=None) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """``(LR features (C, h, w), HR features (C, H, W) or None)`` of ``plane``."""
        if self.blocks is None:
            return plane.features, plane.hr_features
        key = (tuple(plane.index), self.blocks)
        if key not in self.cache:
            from ..core.features import extract_features

            cfg = self.config
            try:
                fmap = extract_features(
                    plane.guide,
                    cfg.backbone,
                    layer=list(self.blocks) if len(self.blocks) > 1 else self.blocks[0],
                    input_size=cfg.input_size or None,
                    weights=cfg.weights or None,
                    pretrained=bool(cfg.pretrained),
                    device=device,
                    max_memory=cfg.budget,
                    progress=_adapter(progress),
                    cancel=cancel,
                    channel_axis=-1 if np.ndim(plane.guide) == 3 else None,  # the guide is channels-last
                )
            except ValueError as exc:
                if str(exc).startswith("layer="):  # a block the backbone does not have: name the field
                    raise ExplorerInputError(f"Blocks {','.join(map(str, self.blocks))}: {exc}") from None
                raise
            feats = fmap.features.numpy()
            if tuple(feats.shape[-2:]) != tuple(plane.lr_shape):  # pragma: no cover - same image, same geometry
                raise ExplorerInputError(f"blocks {list(self.blocks)} gave a {feats.shape[-2:]} grid, the fit {plane.lr_shape}")
            self.cache[key] = feats
        return self.cache[key], None

    def settings(self, route: str, include_image: bool, channels: int) -> dict:
        """What a classifier trained on these features records (see ``segmentation.feature_settings``)."""
        from ..segmentation import feature_settings

        options = dataclasses.replace(self.config.options(), layer=tuple(self.layers))
        out = feature_settings(options)
        out.update(route=route, include_image=bool(include_image), feature_channels=int(channels))
        return out


def _inputs(plane, lr: np.ndarray, hr: Optional[np.ndarray], route: str, include_image: bool):
    """``(features, guide, field)`` for the explore functions: HR features when kept, else LR + kernels."""
    if route == "hr" and hr is not None:
        return hr, (plane.guide if include_image else None), None
    return lr, plane.guide, plane.field


# ---------------------------------------------------------------------------------- compute
def compute_similarity(
    plane, points: np.ndarray, device: str = "auto", source: Optional[FeatureSource] = None, *, progress=None, cancel=None
) -> dict:
    """``{"kernels": (H, W), "bilinear": (H, W)}`` similarity maps of ``plane`` for ``(N, 2)`` (y, x) points."""
    from ..explore import similarity_map

    cb = _adapter(progress)
    if source is None:
        lr, hr = plane.features, plane.hr_features
    else:
        lr, hr = source.features(plane, device, progress=progress, cancel=cancel)
    if hr is not None:
        sim = similarity_map(hr, points, progress=cb, cancel=cancel)
    else:
        sim = similarity_map(lr, points, plane.guide, plane.field, device=device, progress=cb, cancel=cancel)
    bil = similarity_map(lr, points, hr_shape=plane.hr_shape, upsampler="bilinear", progress=cb, cancel=cancel)
    return {"kernels": sim, "bilinear": bil}


def compute_segmentation(
    plane,
    examples: Sequence[Tuple[object, np.ndarray]],
    route: str = "hr",
    include_image: bool = False,
    device: str = "auto",
    source: Optional[FeatureSource] = None,
    *,
    progress=None,
    cancel=None,
) -> dict:
    """Train one classifier on the scribbles of every ``(plane, scribbles (H, W))`` example and classify ``plane``.

    Returns ``{"labels", "probabilities", "classifier", "examples"}`` (``examples``: the slice
    indices trained on). Each example gives its scribbled pixels' features (seeded subsample
    per class, as :func:`~napari_upsample_anything.explore.train_classifier`); the classes are
    counted over all examples, so one slice may hold one class and another slice the other.
    """
    from ..core.feature_queries import DEFAULT_SAMPLES_PER_CLASS, ScribbleClassifier, subsample_per_class
    from ..explore import apply_classifier, scribble_samples

    if not examples:
        raise ExplorerInputError("no scribbled plane: paint at least two classes")
    xs, ys, used = [], [], []
    for k, (p, scribbles) in enumerate(examples):
        lr, hr = source.features(p, device, progress=progress, cancel=cancel) if source else (p.features, p.hr_features)
        features, guide, field = _inputs(p, lr, hr, route, include_image)
        X, y = scribble_samples(
            features,
            scribbles,
            guide,
            field,
            route=route,
            include_image=include_image,
            seed=k,  # the first example as train_classifier samples it
            device=device,
            progress=_adapter(progress),
            cancel=cancel,
            min_classes=1,
        )
        xs.append(X)
        ys.append(y)
        used.append(tuple(p.index))
    X, y = np.concatenate(xs), np.concatenate(ys)
    if len(np.unique(y)) < 2:
        raise ExplorerInputError(
            f"the scribbles of {len(examples)} plane(s) hold the class(es) {np.unique(y).tolist()}; paint at least two"
        )
    keep = subsample_per_class(y, DEFAULT_SAMPLES_PER_CLASS, 0)
    lr, hr = source.features(plane, device, progress=progress, cancel=cancel) if source else (plane.features, plane.hr_features)
    features, guide, field = _inputs(plane, lr, hr, route, include_image)
    channels = int(lr.shape[0])
    clf = ScribbleClassifier.train(
        X[keep],
        y[keep],
        None,
        route=route,
        include_image=bool(include_image),
        meta={"upsampler": "kernels" if field is not None else "none", "channels": channels, "seed": 0, "examples": len(xs)},
        settings=source.settings(route, include_image, channels) if source else {},
    )
    labels, probs = apply_classifier(
        clf, features, guide, field, route=route, device=device, progress=_adapter(progress), cancel=cancel
    )
    return {"labels": labels, "probabilities": probs, "classifier": clf, "examples": used}


def classifier_source(classifier, source: FeatureSource) -> FeatureSource:
    """The features to apply ``classifier`` to: the blocks it was trained on (when it records them).

    A classifier whose recorded backbone or input size differs from the fitted image's is
    refused (:class:`~napari_upsample_anything.explore.ClassifierMismatchError`) rather than
    applied to features it was not trained on.
    """
    settings = dict(getattr(classifier, "settings", {}) or {})
    if not settings:
        return source  # format 1 / bare arrays: the feature count is still checked when applied
    mine = FeatureSource(source.config, None).settings(classifier.route, classifier.include_image, 0)
    classifier.check_settings(mine, keys=("backbone", "input_size"))
    if "layers" in settings:
        return FeatureSource(source.config, tuple(int(v) for v in settings["layers"]), source.cache)
    return source


def compute_apply(
    planes, classifier, device: str = "auto", source: Optional[FeatureSource] = None, *, progress=None, cancel=None
) -> dict:
    """Apply a trained or loaded classifier to each plane: ``{"labels": [(H, W)], "probabilities": [(K, H, W)]}``.

    The classifier's own route, image-channel setting and (when recorded) blocks are used, as it
    was trained; HR features kept by the main widget are read directly, otherwise rendered tile by tile.
    """
    from ..explore import apply_classifier

    if source is not None:
        source = classifier_source(classifier, source)
    labels, probs = [], []
    for plane in planes:
        if source is None:
            lr, hr = plane.features, plane.hr_features
        else:
            lr, hr = source.features(plane, device, progress=progress, cancel=cancel)
        features, guide, field = _inputs(plane, lr, hr, classifier.route, classifier.include_image)
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


def _per_slice(layer, result: FitResult) -> bool:
    """Whether ``layer`` holds one scribble plane per slice of the fitted stack (else one plane for all)."""
    frame = result.frame
    shape = tuple(int(n) for n in full_res_data(layer).shape)
    return (
        frame.is_stack
        and len(shape) == frame.ndim
        and any(shape[a] == frame.shape[a] and frame.shape[a] > 1 for a in frame.slice_axes)
    )


def scribble_examples(layer, result: FitResult, current) -> Tuple[List[Tuple[object, np.ndarray]], List[tuple]]:
    """The ``(plane, scribbles)`` pairs to train on, and the scribbled slices that were not fitted.

    A scribble layer with one plane per slice of a stack gives every fitted plane whose slice
    has strokes (the current plane first, so one slice trains as before); any other layer
    gives the current plane's scribbles only.
    """
    if not _per_slice(layer, result):
        return [(current, plane_scribbles(layer, result, current))], []
    frame = result.frame
    data = np.asarray(full_res_data(layer))
    strokes = np.argwhere(np.any(data != 0, axis=(-2, -1)))
    scribbled = sorted({tuple(int(idx[a]) for a in frame.slice_axes) for idx in strokes})
    fitted = {tuple(p.index): p for p in result.planes}
    order = [tuple(current.index)] + [i for i in scribbled if i != tuple(current.index)]
    examples = []
    for index in order:
        plane = fitted.get(index)
        if plane is None:
            continue
        scribbles = plane_scribbles(layer, result, plane)
        if np.any(scribbles):
            examples.append((plane, scribbles))
    return examples, [i for i in scribbled if i not in fitted]
