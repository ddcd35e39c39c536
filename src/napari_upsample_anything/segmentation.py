"""Segment by example: train a classifier on scribbles of many images or planes, apply it anywhere.

The Python entry of the segmentation workflow; the ``segment`` command
(:mod:`.cli_segment`) and Python users call it. Every plane goes through the one pipeline
step :func:`.pipeline.fit_plane` (features of the backbone + the GSJBU kernels fitted on the
plane) and the explorer's classifier (:mod:`.explore`): nothing is orchestrated twice::

    from napari_upsample_anything.pipeline import PipelineOptions
    from napari_upsample_anything.segmentation import train_from_examples, segment_plane

    opts = PipelineOptions(backbone="dinov3_vits16", layer=(-1, -4))
    clf = train_from_examples([(img_a, scr_a), (img_b, scr_b)], opts, class_names={1: "cell", 2: "bg"})
    clf.save("cells.npz")
    labels, probs, fit = segment_plane("cells.npz", other_image)   # options from the file

``examples`` are ``(image, scribbles)`` pairs of one plane each (``(H, W)`` or channels-last
``(H, W, k)`` images, ``(H, W)`` integer scribbles, 0 = unlabelled); a stack's planes with
strokes come from :func:`stack_examples`. A plane may hold strokes of one class only: the
classes are counted over all examples.

The classifier file records the settings of the features (:func:`feature_settings`):
backbone (timm name), blocks, input size, guide channels, image channels appended, feature
channels, kernel fit options, weights, package version. :func:`options_from_classifier`
rebuilds the pipeline options from them; a run asking for other feature settings raises
:class:`~.explore.ClassifierMismatchError` (a ``ValueError``) before any model is loaded.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .pipeline import KernelFitOptions, PipelineOptions, PlaneFit, fit_plane

__all__ = [
    "feature_settings",
    "folder_examples",
    "options_from_classifier",
    "segment_plane",
    "stack_examples",
    "train_from_examples",
]

#: Options that are not feature settings and may differ between training and applying.
RUN_OPTIONS = ("device", "precision", "max_memory", "weights")


def _blocks(layer) -> List[int]:
    return [int(v) for v in layer] if isinstance(layer, (tuple, list)) else [int(layer)]


def feature_settings(options: PipelineOptions) -> Dict[str, Any]:
    """The settings that decide the feature vectors and the kernels of ``options`` (JSON values).

    Keys: ``backbone`` (timm name with tag), ``backbone_name`` (as given), ``layers``,
    ``input_size``, ``channels``, ``weights``, ``pretrained``, ``fit`` (steps, guide smoothing,
    fit downsample, fit fraction), ``package_version``. No model is loaded.
    """
    from . import __version__
    from .core.features import resolve_backbone_name

    return {
        "backbone": resolve_backbone_name(options.backbone),
        "backbone_name": options.backbone,
        "layers": _blocks(options.layer),
        "input_size": None if options.input_size is None else int(options.input_size),
        "channels": None if options.channels is None else [int(c) for c in options.channels],
        "weights": None if not options.weights else str(Path(options.weights).expanduser().resolve()),
        "pretrained": bool(options.pretrained),
        "fit": options.fit.settings(),
        "package_version": __version__,
    }


def stack_examples(stack, scribbles, axis: int = 0) -> List[Tuple[np.ndarray, np.ndarray]]:
    """``(plane, scribble plane)`` pairs of the planes of a stack whose scribbles have strokes.

    ``stack``: ``(Z, H, W)`` or ``(Z, H, W, k)`` (channels last) with the planes along
    ``axis``; ``scribbles``: the matching ``(Z, H, W)`` labels.
    """
    img = np.moveaxis(np.asarray(stack), axis, 0)
    scr = np.moveaxis(np.asarray(scribbles), axis, 0)
    if scr.ndim != 3 or img.shape[:3] != scr.shape:
        raise ValueError(
            f"scribbles of shape {np.shape(scribbles)} do not match the stack {np.shape(stack)} (planes along axis {axis})"
        )
    out = [(img[k], scr[k]) for k in range(scr.shape[0]) if np.any(scr[k])]
    if not out:
        raise ValueError("the scribbles have no stroke on any plane; paint at least two classes")
    return out


#: Annotation files paired with an image ``<stem>.<ext>`` by :func:`folder_examples`.
ANNOTATION_SUFFIXES = ("_labels.ome.zarr", "_labels.tif", "_labels.tiff", "_scribbles.ome.zarr", "_scribbles.tif")
_IMAGE_EXTS = (".ome.tiff", ".ome.tif", ".ome.zarr", ".tiff", ".tif", ".png", ".jpeg", ".jpg", ".npy", ".zarr")


def _stem(name: str) -> Optional[str]:
    low = name.lower()
    for ext in _IMAGE_EXTS:
        if low.endswith(ext):
            return name[: -len(ext)]
    return None


def folder_examples(
    folder, *, axes: Optional[str] = None, channels: Optional[Sequence[int]] = None
) -> List[Tuple[np.ndarray, np.ndarray]]:
    """``(plane, scribble plane)`` pairs of a folder of images with their annotations.

    Every image ``<stem>.<ext>`` with an annotation file ``<stem>_labels.ome.zarr`` /
    ``<stem>_labels.tif`` (or ``_scribbles``; written by :func:`.annotations.save_labels`)
    contributes the planes whose annotation has strokes. The annotation covers the image's
    planes: ``(Y, X)`` for a single plane, ``(Z, Y, X)`` / ``(T, Z, Y, X)`` (its ``axes``) for
    a stack. ``axes``: of plain stacks without metadata; ``channels``: the guide channels.
    """
    from .annotations import load_labels
    from .sources import open_image

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder not found: {folder}")
    out: List[Tuple[np.ndarray, np.ndarray]] = []
    for image in sorted(folder.iterdir()):
        stem = _stem(image.name)
        if stem is None or image.name.startswith(".") or stem.endswith(("_labels", "_scribbles")):
            continue
        ann = next((folder / (stem + suf) for suf in ANNOTATION_SUFFIXES if (folder / (stem + suf)).exists()), None)
        if ann is None:
            continue
        labels, info = load_labels(ann)
        src = open_image(image, axes=axes)
        sizes = src.sizes
        lab_axes = info["axes"]
        if labels.shape[-2:] != src.plane_shape:
            raise ValueError(f"{ann}: labels of {labels.shape[-2:]} do not cover the image {image.name} {src.plane_shape}")
        for t, z in src.planes("all"):
            idx = tuple({"t": t, "z": z}[a] for a in lab_axes[:-2])
            if any(a in lab_axes and n != labels.shape[lab_axes.index(a)] for a, n in (("t", sizes["T"]), ("z", sizes["Z"]))):
                raise ValueError(f"{ann}: labels of shape {labels.shape} ({lab_axes}) do not match {image.name}'s planes")
            plane = np.asarray(labels[idx]) if idx else np.asarray(labels)
            if np.any(plane):
                out.append((src.guide(t, z, channels), plane))
    if not out:
        raise ValueError(f"{folder}: no image with an annotation file ({', '.join(ANNOTATION_SUFFIXES)}) that has strokes")
    return out


def train_from_examples(
    examples: Sequence[Tuple[Any, Any]],
    options: Optional[PipelineOptions] = None,
    *,
    route: str = "hr",
    include_image: bool = False,
    classifier=None,
    class_names: Optional[Dict[int, str]] = None,
    samples_per_class: Optional[int] = None,
    seed: int = 0,
    progress=None,
    cancel=None,
):
    """Train one classifier on the scribbles of several images / planes.

    Parameters
    ----------
    examples : sequence of (image, scribbles)
        One plane each (see the module docstring).
    options : PipelineOptions
        Backbone, blocks, input size, fit options (default: ``PipelineOptions()``).
    route : "hr" | "lr"
        Classify HR pixel features (default) or LR tokens (probabilities upsampled).
    include_image : bool
        Append the image's own normalised channels to the features.
    classifier : scikit-learn estimator, optional (default: 50-tree random forest, seed 0).
    class_names : value -> name, saved with the classifier.
    samples_per_class : int, optional
        At most this many samples per class over all examples (seeded; default
        :data:`~.core.feature_queries.DEFAULT_SAMPLES_PER_CLASS`).

    Returns
    -------
    ScribbleClassifier with ``settings`` (:func:`feature_settings` plus ``route``,
    ``include_image``, ``feature_channels``) and ``class_names``.
    """
    from .core.feature_queries import DEFAULT_SAMPLES_PER_CLASS, ScribbleClassifier, subsample_per_class
    from .explore import scribble_samples

    options = (options or PipelineOptions()).validate()
    if not examples:
        raise ValueError("examples is empty: give a list of (image, scribbles) pairs")
    per_class = DEFAULT_SAMPLES_PER_CLASS if samples_per_class is None else int(samples_per_class)
    settings = feature_settings(options)
    xs, ys = [], []
    channels = None
    n = len(examples)
    for k, pair in enumerate(examples):
        try:
            image, scribbles = pair
        except (TypeError, ValueError):
            raise TypeError(f"examples[{k}] must be an (image, scribbles) pair") from None
        scr = np.asarray(scribbles)
        if scr.ndim != 2 or tuple(scr.shape) != tuple(np.shape(image)[:2]):
            raise ValueError(
                f"examples[{k}]: scribbles of shape {scr.shape} must be (H, W) of the image {np.shape(image)[:2]}; "
                "for a stack, use stack_examples(stack, scribbles)"
            )
        if not np.any(scr):
            continue  # a plane without strokes adds nothing
        fit = fit_plane(np.asarray(image), options, index=(k,), progress=progress, cancel=cancel, plane=k, n_planes=n)
        if channels is not None and fit.features.shape[0] != channels:
            raise ValueError(f"examples[{k}] gave {fit.features.shape[0]} feature channels, the first {channels}")
        channels = int(fit.features.shape[0])
        X, y = scribble_samples(
            fit.features,
            scr,
            fit.guide,
            fit.field,
            route=route,
            include_image=include_image,
            samples_per_class=per_class,
            seed=seed + k,
            device=options.device,
            precision=_precision(options),
            max_memory=options.budget,
            cancel=cancel,
            min_classes=1,
        )
        xs.append(X)
        ys.append(y)
        settings.setdefault("backbone_resolved", fit.backbone)
        settings.setdefault("weights_source", fit.weights_source)
    if not xs:
        raise ValueError("no example has a labelled pixel; paint strokes of at least two classes")
    X = np.concatenate(xs)
    y = np.concatenate(ys)
    if len(np.unique(y)) < 2:
        raise ValueError(
            f"the scribbles of all examples hold {len(np.unique(y))} class(es) {np.unique(y).tolist()}; paint at least two"
        )
    keep = subsample_per_class(y, per_class, seed)
    settings.update(route=route, include_image=bool(include_image), feature_channels=channels)
    return ScribbleClassifier.train(
        X[keep],
        y[keep],
        classifier,
        route=route,
        include_image=bool(include_image),
        meta={"upsampler": "kernels", "channels": channels, "seed": int(seed), "examples": len(xs)},
        class_names={int(k): str(v) for k, v in dict(class_names or {}).items()},
        settings=settings,
    )


def _precision(options: PipelineOptions) -> str:
    return "fp32" if options.precision == "auto" else options.precision


def _load(classifier):
    from .core.feature_queries import ScribbleClassifier

    if isinstance(classifier, ScribbleClassifier):
        return classifier
    return ScribbleClassifier.load(classifier)


def options_from_classifier(classifier, **overrides) -> PipelineOptions:
    """The pipeline options a classifier was trained with, plus run-time ``overrides``.

    ``device``, ``precision``, ``max_memory`` and ``weights`` (a file of the same
    architecture elsewhere) may be overridden freely. ``backbone``, ``layer``,
    ``input_size`` and ``channels`` may be given only with the classifier's own values
    (else :class:`~.explore.ClassifierMismatchError`). A classifier without settings
    (format 1, or trained on bare arrays) takes the overrides as they are.
    """
    from .core.feature_queries import ClassifierMismatchError

    clf = _load(classifier)
    s = dict(clf.settings)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if not s:
        return PipelineOptions(**overrides).validate()
    fit = dict(s.get("fit") or {})
    layers = tuple(s.get("layers") or [-1])
    base = PipelineOptions(
        backbone=str(s.get("backbone_name") or s["backbone"]),
        layer=layers[0] if len(layers) == 1 else layers,
        input_size=s.get("input_size"),
        weights=s.get("weights"),
        pretrained=bool(s.get("pretrained", True)),
        channels=None if s.get("channels") is None else tuple(int(c) for c in s["channels"]),
        **KernelFitOptions.from_settings(fit),
    )
    feature_overrides = {k: v for k, v in overrides.items() if k not in RUN_OPTIONS}
    unknown = [k for k in feature_overrides if k not in PipelineOptions.__dataclass_fields__]
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; see PipelineOptions")
    if feature_overrides:
        asked = feature_settings(replace(base, **feature_overrides))
        mine = feature_settings(base)
        diffs = [
            f"{k}: classifier {mine[k]!r}, asked {asked[k]!r}"
            for k in ("backbone", "layers", "input_size", "channels", "fit")
            if mine[k] != asked[k]
        ]
        if diffs:
            raise ClassifierMismatchError(
                "the classifier was trained with other feature settings (" + "; ".join(diffs) + "): leave them out to "
                "use the classifier's own, or train a new classifier with these"
            )
    run = {k: v for k, v in overrides.items() if k in RUN_OPTIONS}
    opts = replace(base, **run)
    if opts.weights and not Path(opts.weights).expanduser().is_file():
        raise FileNotFoundError(
            f"the classifier's backbone weights {opts.weights!r} are not here; pass the file of the same "
            "architecture with weights=... (--weights)"
        )
    return opts.validate()


def segment_plane(
    classifier,
    image,
    options: Optional[PipelineOptions] = None,
    *,
    route: Optional[str] = None,
    index: Tuple[int, ...] = (),
    progress=None,
    cancel=None,
    plane: int = 0,
    n_planes: int = 1,
) -> Tuple[np.ndarray, np.ndarray, PlaneFit]:
    """Labels and class probabilities of every pixel of one plane.

    ``classifier``: a ScribbleClassifier or its file. ``options``: default
    :func:`options_from_classifier`; given options are checked against the classifier's
    settings (:class:`~.explore.ClassifierMismatchError`). Returns ``(labels (H, W),
    probabilities (K, H, W) float32 in classifier.classes order, the plane's PlaneFit)``.
    """
    from .core.feature_queries import ClassifierMismatchError
    from .explore import apply_classifier

    clf = _load(classifier)
    options = options_from_classifier(clf) if options is None else options.validate()
    if clf.settings:
        clf.check_settings(feature_settings(options), keys=("backbone", "layers", "input_size", "channels"))
    fit = fit_plane(np.asarray(image), options, index=index, progress=progress, cancel=cancel, plane=plane, n_planes=n_planes)
    want = clf.settings.get("feature_channels")
    if want is not None and int(want) != int(fit.features.shape[0]):
        raise ClassifierMismatchError(
            f"the classifier was trained on {want} feature channels, {fit.backbone} gives {fit.features.shape[0]}; "
            "use the backbone and blocks it was trained with"
        )
    labels, probs = apply_classifier(
        clf,
        fit.features,
        fit.guide,
        fit.field,
        route=route,
        device=options.device,
        precision=_precision(options),
        max_memory=options.budget,
        cancel=cancel,
    )
    return labels, probs, fit
