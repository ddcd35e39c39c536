"""The steps on planes in memory, shared by every caller: :func:`fit_plane`, :func:`fit_basis`,
:func:`render_plane_pca`, :func:`render_plane_features`, :func:`run_planes` (what the widgets
call) and :func:`upsample_map` with its label helpers. See :mod:`.pipeline` for the overview."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .options import MAX_LABEL_CLASSES, CancelFn, PipelineOptions, Progress, ProgressCallback, _report, core_progress


# ---------------------------------------------------------------------------------- steps
@dataclass(eq=False)
class PlaneFit:
    """What the pipeline knows about one ``Y x X`` plane after the fit (and later renders).

    ``index`` is where the plane came from (``(t, z)`` for files, the layer's slice index in
    napari); ``guide`` the channels-last image the kernels were fitted on; ``features`` the
    ``(C, h, w)`` LR features; ``field`` the kernels (CPU); ``lr_rgb`` / ``hr_rgb`` the PCA
    pictures and ``hr_features`` the ``(C, H, W)`` HR features once rendered.
    """

    index: Tuple[int, ...]
    guide: np.ndarray
    features: np.ndarray
    geometry: Any  # core.features.FeatureGeometry
    field: Any  # core.field.KernelField on the CPU
    memlog: Any  # core.memory.MemoryLog
    backbone: str = ""
    weights_source: str = ""
    seconds: Dict[str, float] = field(default_factory=dict)
    lr_rgb: Optional[np.ndarray] = None
    hr_rgb: Optional[np.ndarray] = None
    hr_features: Optional[np.ndarray] = None
    hr_features_path: Optional[str] = None
    extra_fields: Dict[Tuple[int, int], Any] = field(default_factory=dict)  # LR grid -> refitted field

    @property
    def lr_shape(self) -> Tuple[int, int]:
        return tuple(int(s) for s in self.geometry.lr_shape)  # type: ignore[return-value]

    @property
    def hr_shape(self) -> Tuple[int, int]:
        return tuple(int(s) for s in self.geometry.image_shape)  # type: ignore[return-value]

    @property
    def factor(self) -> Tuple[float, float]:
        """HR pixels per LR cell ``(H/h, W/w)``."""
        return tuple(float(s) for s in self.geometry.scale)  # type: ignore[return-value]


def _channel_axis(guide: np.ndarray) -> Optional[int]:
    return -1 if np.ndim(guide) == 3 else None


def fit_plane(
    guide: np.ndarray,
    options: PipelineOptions,
    *,
    index: Tuple[int, ...] = (),
    channel_axis: int | None | str = "auto",
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelFn] = None,
    plane: int = 0,
    n_planes: int = 1,
) -> PlaneFit:
    """Features and fitted kernels of one plane.

    ``guide``: ``(H, W)`` or channels-last ``(H, W, k)`` (``channel_axis="auto"``), or any
    layout :func:`~.core.features.extract_features` accepts with an explicit ``channel_axis``.
    """
    from .. import api
    from ..core.device import resolve_device
    from ..core.features import extract_features
    from ..core.io import guide_from_image
    from ..core.memory import MemoryLog
    from ..core.platform_fixes import preload_triton_safely
    from ..core.units import parse_bytes

    preload_triton_safely()  # before timm (-> torchvision -> torch._dynamo -> triton) is imported
    axis = _channel_axis(guide) if channel_axis == "auto" else channel_axis
    device = resolve_device(options.device)
    budget = parse_bytes(options.budget, "max_memory")
    seconds = {}
    _report(progress, Progress("features", 0, 1, plane, n_planes))
    t = time.perf_counter()
    fmap = extract_features(
        guide,
        options.backbone,
        layer=options.layer if isinstance(options.layer, (tuple, list)) else int(options.layer),
        input_size=options.input_size or None,
        weights=options.weights or None,
        pretrained=bool(options.pretrained),
        device=device,
        max_memory=budget,
        progress=core_progress(progress, "features", plane, n_planes),
        cancel=cancel,
        channel_axis=axis,
    )
    seconds["features"] = time.perf_counter() - t
    g = guide_from_image(guide, axis)
    memlog = MemoryLog()
    t = time.perf_counter()
    fitted = api.fit_kernels(
        g,
        tuple(fmap.geometry.lr_shape),
        **options.fit.fit_kernels_args(),
        device=device,
        precision=options.precision,
        max_memory=budget,
        progress=core_progress(progress, "fit", plane, n_planes),
        cancel=cancel,
        memory_log=memlog,
        channel_axis=_channel_axis(g),  # guide_from_image gives channels-last; the API never guesses
    )
    seconds["fit"] = time.perf_counter() - t
    return PlaneFit(
        index=tuple(index),
        guide=g,
        features=fmap.features.numpy(),
        geometry=fmap.geometry,
        field=fitted.to("cpu"),
        memlog=memlog,
        backbone=fmap.backbone,
        weights_source=fmap.weights_source,
        seconds=seconds,
    )


def fit_basis(lr_features: Sequence[np.ndarray], options: PipelineOptions):
    """The PCA policy: one basis on the pooled LR features of all planes (seeded subsample)."""
    from ..core.pca import fit_pca

    pooled = np.concatenate([np.asarray(f).reshape(np.shape(f)[0], -1) for f in lr_features], axis=1)
    return fit_pca(pooled, 3, int(options.pca_max_samples), int(options.seed))


def render_plane_pca(fit: PlaneFit, basis, options: PipelineOptions, *, progress=None, cancel=None, plane=0, n_planes=1):
    """``(lr_rgb (h, w, 3), hr_rgb (H, W, 3))`` PCA pictures of a plane with ``basis``; also stored on ``fit``."""
    from .. import api

    t = time.perf_counter()
    fit.lr_rgb = basis.to_rgb(basis.project(fit.features))
    fit.hr_rgb, _ = api.render_pca(
        fit.features,
        fit.guide,
        fit.field,
        basis=basis,
        device=options.device,
        precision=options.precision,
        max_memory=options.budget,
        progress=core_progress(progress, "pca", plane, n_planes),
        cancel=cancel,
        memory_log=fit.memlog,
    )
    fit.seconds["pca"] = time.perf_counter() - t
    return fit.lr_rgb, fit.hr_rgb


def render_plane_features(fit: PlaneFit, out, options: PipelineOptions, *, progress=None, cancel=None, plane=0, n_planes=1):
    """Render the ``(C, H, W)`` HR features of a plane into ``out`` (written tile by tile)."""
    from .. import api

    t = time.perf_counter()
    api.render(
        fit.features,
        fit.guide,
        fit.field,
        device=options.device,
        precision=options.precision,
        max_memory=options.budget,
        out=out,
        progress=core_progress(progress, "render", plane, n_planes),
        cancel=cancel,
        memory_log=fit.memlog,
    )
    if hasattr(out, "close"):
        out.close()
    elif isinstance(out, np.memmap):
        out.flush()
    fit.seconds["render"] = time.perf_counter() - t
    return out


def run_planes(
    planes: Sequence[Tuple[Tuple[int, ...], np.ndarray]],
    options: PipelineOptions,
    *,
    hr_target: Optional[Callable[[int, PlaneFit, Tuple[int, int, int]], Any]] = None,
    channel_axis: int | None | str = "auto",
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelFn] = None,
) -> Tuple[List[PlaneFit], Any]:
    """Fit every plane, then one PCA basis, then the HR PCA (and HR features) of each plane.

    ``hr_target(k, fit, (C, H, W))`` returns where plane k's HR features go (None: skip);
    without it they are not rendered. Returns ``(fits, basis)``.
    """
    options.validate()
    if not planes:
        raise ValueError("nothing to process: no planes were given")
    n = len(planes)
    fits = [
        fit_plane(img, options, index=idx, channel_axis=channel_axis, progress=progress, cancel=cancel, plane=k, n_planes=n)
        for k, (idx, img) in enumerate(planes)
    ]
    basis = fit_basis([f.features for f in fits], options)
    for k, f in enumerate(fits):
        render_plane_pca(f, basis, options, progress=progress, cancel=cancel, plane=k, n_planes=n)
    if hr_target is not None and options.hr_features:
        for k, f in enumerate(fits):
            shape = (int(f.features.shape[0]),) + f.hr_shape
            out = hr_target(k, f, shape)
            if out is None:
                continue
            render_plane_features(f, out, options, progress=progress, cancel=cancel, plane=k, n_planes=n)
            f.hr_features = out
    return fits, basis


# ---------------------------------------------------------------------------------- LR maps
def one_hot(labels: np.ndarray, classes: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """``(K, h, w)`` float32 one-hot of an integer ``(h, w)`` labels map, and the ``K`` class values."""
    labels = np.asarray(labels)
    if classes is None:
        classes = np.unique(labels)
    if classes.size > MAX_LABEL_CLASSES:
        raise ValueError(
            f"the labels map has {classes.size} distinct values; one-hot upsampling is limited to "
            f"{MAX_LABEL_CLASSES} classes (it renders one channel per class)"
        )
    pos = np.searchsorted(classes, labels)
    out = np.zeros((classes.size,) + labels.shape, np.float32)
    np.put_along_axis(out, pos[None], 1.0, axis=0)
    return out, classes


def argmax_labels(probabilities: np.ndarray, classes: np.ndarray, dtype=None) -> np.ndarray:
    """Labels ``(H, W)`` from ``(K, H, W)`` class probabilities (ties: the lower class)."""
    idx = np.argmax(probabilities, axis=0)
    out = classes[idx]
    return out.astype(dtype) if dtype is not None else out


def map_kind(lr_map: np.ndarray, kind: str = "auto") -> str:
    """``"labels"`` or ``"continuous"``: ``auto`` takes 2-D integer / bool maps as labels."""
    if kind not in ("auto", "labels", "continuous"):
        raise ValueError(f"kind={kind!r} (--kind): use auto, labels or continuous")
    arr = np.asarray(lr_map)
    if kind == "auto":
        return "labels" if arr.ndim == 2 and arr.dtype.kind in "biu" else "continuous"
    if kind == "labels" and (arr.ndim != 2 or arr.dtype.kind not in "biu"):
        raise ValueError(f"kind='labels' (--kind) needs a 2-D integer map (h, w); got {arr.dtype} of shape {arr.shape}")
    return kind


def upsample_map(
    lr_map: np.ndarray,
    guide: np.ndarray,
    field,
    options: PipelineOptions,
    *,
    kind: str = "auto",
    classes: Optional[np.ndarray] = None,
    progress=None,
    cancel=None,
    plane: int = 0,
    n_planes: int = 1,
) -> Dict[str, np.ndarray]:
    """Render one LR map with a plane's kernels (``field``; None: fit them for the map's grid).

    Continuous maps (``(C, h, w)`` or ``(h, w)``) return ``{"values": (C, H, W)}``; labels
    return ``{"labels": (H, W), "probabilities": (K, H, W), "classes": (K,)}`` (one-hot
    rendered, then argmax), with the input's integer dtype.
    """
    from .. import api

    lr = np.asarray(lr_map)
    kind = map_kind(lr, kind)
    grid = tuple(int(s) for s in lr.shape[-2:])
    H, W = np.shape(guide)[:2]
    if grid[0] > H or grid[1] > W:
        raise ValueError(f"the map's grid {grid[0]} x {grid[1]} is finer than the image ({H} x {W}): nothing to upsample")
    if field is None:
        field = api.fit_kernels(
            guide,
            grid,
            **options.fit.fit_kernels_args(),
            device=options.device,
            precision=options.precision,
            max_memory=options.budget,
            progress=core_progress(progress, "fit", plane, n_planes),
            cancel=cancel,
            channel_axis=_channel_axis(guide),
        ).to("cpu")
    elif tuple(field.shape) != grid:
        raise ValueError(
            f"the kernels are on a {field.shape[0]} x {field.shape[1]} grid but the map is {grid[0]} x {grid[1]}; fit kernels for the map's grid (leave --kernels out)"
        )
    if kind == "labels":
        values, classes = one_hot(lr, classes)
    else:
        values = lr.astype(np.float32, copy=False)
        if not np.isfinite(values).all():
            raise ValueError("the map contains NaN or Inf values; replace them (e.g. np.nan_to_num) first")
    hr = api.render(
        values,
        guide,
        field,
        device=options.device,
        precision=options.precision,
        max_memory=options.budget,
        progress=core_progress(progress, "upsample", plane, n_planes),
        cancel=cancel,
    )
    if kind == "labels":
        return {"labels": argmax_labels(hr, classes, lr.dtype), "probabilities": hr, "classes": classes, "field": field}
    return {"values": hr, "field": field}
