"""Where the feature explorer's HR features come from, in one of three forms.

:class:`FeatureSource` takes HR features ``(C, H, W)`` (read in bands of rows), or LR
features ``(C, h, w)`` with the guide and either the fitted kernels (rendered and streamed
tile by tile by :func:`stream_render`) or bilinear upsampling; see :mod:`.explore`. Used by
the similarity (:mod:`.explore`) and the scribble classification (:mod:`.explore_scribbles`).
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np
import torch

from . import api
from .core.feature_queries import TileSink
from .core.field import KernelField
from .core.progress import ProgressFn

ArrayLike = Union[np.ndarray, torch.Tensor]
UPSAMPLERS = ("kernels", "bilinear")
OPTION_NAMES = ("radius", "alpha", "border", "radius_units")


def check_features(features, name: str = "features"):
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


def lr_tensor(features, name: str = "features") -> torch.Tensor:
    """The (small) LR features as a finite float32 CPU tensor."""
    t = (
        features.detach().to("cpu", torch.float32)
        if isinstance(features, torch.Tensor)
        else torch.from_numpy(np.ascontiguousarray(features, np.float32))
    )
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf values; replace them (e.g. np.nan_to_num) first")
    return t


def checked_band(read):
    def band(y0: int, y1: int) -> torch.Tensor:
        b = read(y0, y1)
        if not bool(torch.isfinite(b).all()):
            raise ValueError(f"features contain NaN or Inf values (rows {y0}-{y1}); replace them first")
        return b

    return band


def render_options(options: dict) -> dict:
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {unknown}; render options are {list(OPTION_NAMES)}")
    return options


class FeatureSource:
    """Where HR features come from: ``mode`` is "hr", "kernels" or "bilinear"."""

    def __init__(self, features, guide, field, upsampler: str, hr_shape=None, normalize="auto"):
        if upsampler not in UPSAMPLERS:
            raise ValueError(f"upsampler={upsampler!r}: use 'kernels' (the fitted GSJBU kernels) or 'bilinear'")
        self.features = check_features(features)
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
            if guide is not None and guide_shape(guide) != (a, b):
                raise ValueError(
                    f"features of shape {tuple(features.shape)} are not full resolution for the guide "
                    f"{guide_shape(guide)}: for low-resolution features pass field=fit_kernels(...) "
                    "(or upsampler='bilinear')"
                )
            if hr_shape is not None and tuple(int(n) for n in hr_shape) != (a, b):
                raise ValueError(f"hr_shape={tuple(hr_shape)} differs from the HR features' (H, W) = {(a, b)}")
            return
        self.mode = upsampler
        self.lr_shape = (a, b)
        self.lr = lr_tensor(features)
        if guide is not None:
            self.hr_shape = guide_shape(guide)
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


def guide_shape(guide) -> Tuple[int, int]:
    shape = tuple(int(n) for n in np.shape(guide))
    if len(shape) not in (2, 3):
        raise ValueError(f"guide must be (H, W) or (H, W, G), got shape {shape}")
    return shape[0], shape[1]


def staged(progress: Optional[ProgressFn], stage: str) -> Optional[ProgressFn]:
    if progress is None:
        return None
    return lambda done, total, info: progress(done, total, dict(info, stage=stage))


def stream_render(src: FeatureSource, consume, *, device, max_memory, precision, progress, cancel, stage, options) -> TileSink:
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
        progress=staged(progress, stage),
        cancel=cancel,
        **options,
    )
    return sink
