"""The guide image: validation, intensity normalisation, and tile access.

The range kernel ``exp(-||I(p) - I_lr(q)||^2 / (2 sigma_r^2))`` starts at ``sigma_r = 0.12``,
which assumes guide values in [0, 1]. The rule that brings an image there (``normalize``):

``"auto"`` (default)
    * uint8: divided by 255, exactly as the published code does;
    * bool: 0 / 1;
    * other integers (uint16 microscopy, int32 ...) and floats outside [0, 1]: per-channel
      robust percentiles, the 0.5th percentile maps to 0 and the 99.5th to 1, then clipped to
      [0, 1] (a 12-bit camera image stored in uint16 would otherwise use 1/16 of the range);
    * floats already inside [0, 1]: used as they are.
``"unit"``: integers divided by their dtype's maximum (uint16 by 65535), floats unchanged.
``"percentile"``: the percentile rule for every dtype.
``"none"``: values cast to float32, unchanged.
``(lo, hi)``: ``(x - lo) / (hi - lo)`` for every channel, not clipped.

A rule that brings the guide far outside [0, 1] (more than :data:`MAX_NORMALIZED` in
magnitude, e.g. ``(0, 1e-30)``) or that has an infinite range is refused: the range kernel
would overflow and the fit would return NaN.

Axes: ``(H, W)`` is gray; a 3-D array is taken as channels-last ``(H, W, G)`` without being
told only when ``G`` is 1, 3 or 4 (gray, RGB, RGBA as napari holds them) and ``H, W > G``.
Any other 3-D layout (``(70, 100, 100)``, ``(5, 64, 64)``, ``(64, 64, 2)``) is ambiguous
between channels and a stack of planes and needs ``channel_axis``.

The original array is kept (not copied to float32): tiles are gathered from it and
normalised on the fly, so a large uint8 image costs no extra full-size float copy.
"""

from __future__ import annotations

import numbers
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .checks import check_float, check_int_pair, check_tensor_usable

Normalize = Union[str, Tuple[float, float]]

_PERCENTILES = (0.5, 99.5)
_SAMPLE_PIXELS = 1 << 20
MAX_NORMALIZED = 1e6  # |normalised guide| beyond this is a degenerate normalisation
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_UNAMBIGUOUS_CHANNELS = (1, 3, 4)


def _as_array(guide, name: str):
    if isinstance(guide, torch.Tensor):
        check_tensor_usable(guide, name)
        return guide.detach()
    if isinstance(guide, np.ndarray):
        return guide
    if hasattr(guide, "__array__"):  # dask / zarr / PIL images and napari layer data
        return np.asarray(guide)
    raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(guide).__name__}")


def channels_last(arr, channel_axis: Optional[int], name: str = "guide"):
    """``(view, axis, guessed)``: the (H, W) or channels-last (H, W, G) view of a 2-D / 3-D
    numpy array or tensor, the channel axis used (None for 2-D) and whether it was inferred.

    Without ``channel_axis`` a 3-D array is accepted only as gray / RGB / RGBA channels-last
    (last axis 1, 3 or 4 and the other two larger than it); anything else raises a ValueError
    asking for ``channel_axis``: channels and planes are never guessed.
    """
    shape = tuple(int(n) for n in arr.shape)
    if arr.ndim not in (2, 3):
        raise ValueError(
            f"{name} must be (H, W) or (H, W, G) channels-last, got shape {shape}; "
            "for a stack, pass one 2D slice at a time (e.g. image[z])"
        )
    if arr.ndim == 2:
        if channel_axis is not None:
            raise ValueError(f"channel_axis={channel_axis!r} was given but {name} is 2D {shape}; leave channel_axis=None")
        return arr, None, False
    if channel_axis is not None:
        if isinstance(channel_axis, bool) or not isinstance(channel_axis, numbers.Integral) or not -3 <= int(channel_axis) <= 2:
            raise ValueError(f"channel_axis={channel_axis!r}: use 0, 1, 2 or -1, -2, -3 for a 3D {name}")
        axis = int(channel_axis) % 3
        if axis == 2:
            return arr, 2, False
        return (arr.movedim(axis, -1) if isinstance(arr, torch.Tensor) else np.moveaxis(arr, axis, -1)), axis, False
    if shape[2] in _UNAMBIGUOUS_CHANNELS and min(shape[0], shape[1]) > shape[2]:
        return arr, 2, True
    raise ValueError(
        f"{name} has shape {shape}, which is ambiguous: channels-last (H, W, C) is only assumed for "
        "gray / RGB / RGBA (last axis 1, 3 or 4, the other two larger). Pass channel_axis=0 for "
        "(C, H, W) channels or channel_axis=-1 for (H, W, C), or process each plane image[z] "
        "separately for a stack"
    )


def validate_image(arr, name: str = "guide") -> None:
    """Shape, size and finiteness checks for a channels-last (H, W[, G]) image."""
    if arr.ndim not in (2, 3):
        raise ValueError(
            f"{name} must be (H, W) or (H, W, G) channels-last, got shape {tuple(arr.shape)}; "
            "for a stack, pass one 2D slice at a time"
        )
    if any(int(n) == 0 for n in arr.shape):
        raise ValueError(f"{name} is empty (shape {tuple(arr.shape)})")
    dtype_is_float = arr.dtype.is_floating_point if isinstance(arr, torch.Tensor) else np.issubdtype(arr.dtype, np.floating)
    dtype_ok = (
        arr.dtype.is_floating_point
        or arr.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool, torch.uint16)
        if isinstance(arr, torch.Tensor)
        else (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool) and not np.issubdtype(arr.dtype, np.complexfloating)
    )
    if not dtype_ok:
        raise TypeError(f"{name} has dtype {arr.dtype}; use an integer, bool or float image")
    if dtype_is_float:
        finite = bool(torch.isfinite(arr).all()) if isinstance(arr, torch.Tensor) else bool(np.isfinite(arr).all())
        if not finite:
            raise ValueError(f"{name} contains NaN or Inf values; replace them (e.g. np.nan_to_num) first")


def _sample(arr) -> np.ndarray:
    """A strided subsample of at most ~1M pixels, as float64 (H', W', G)."""
    h, w = arr.shape[:2]
    step = max(1, int(np.ceil(np.sqrt(h * w / _SAMPLE_PIXELS))))
    sub = arr[::step, ::step]
    if isinstance(sub, torch.Tensor):
        sub = sub.cpu().numpy()
    sub = np.asarray(sub, dtype=np.float64)
    return sub.reshape(sub.shape[0], sub.shape[1], -1)


def _percentile_affine(arr) -> Tuple[np.ndarray, np.ndarray]:
    s = _sample(arr)
    flat = s.reshape(-1, s.shape[-1])
    lo = np.percentile(flat, _PERCENTILES[0], axis=0)
    hi = np.percentile(flat, _PERCENTILES[1], axis=0)
    span = hi - lo
    # A flat channel (span 0) maps to 0 rather than dividing by zero.
    scale = np.where(span > 0, 1.0 / np.where(span > 0, span, 1.0), 0.0)
    return lo, scale


def _dtype_info(arr):
    if isinstance(arr, torch.Tensor):
        return arr.dtype.is_floating_point, arr.dtype == torch.bool, arr.dtype == torch.uint8
    return np.issubdtype(arr.dtype, np.floating), arr.dtype == bool, arr.dtype == np.uint8


def _int_max(arr) -> float:
    if isinstance(arr, torch.Tensor):
        return float(torch.iinfo(arr.dtype).max)
    return float(np.iinfo(arr.dtype).max)


def normalization_affine(arr, normalize: Normalize = "auto") -> Tuple[np.ndarray, np.ndarray, bool, str]:
    """``(offset [G], scale [G], clip, rule)``: the guide is ``(x - offset) * scale``, clipped if ``clip``."""
    g = 1 if arr.ndim == 2 else int(arr.shape[2])
    ones, zeros = np.ones(g), np.zeros(g)
    is_float, is_bool, is_u8 = _dtype_info(arr)
    if isinstance(normalize, (tuple, list)):
        if len(normalize) != 2:
            raise ValueError(f"normalize={normalize!r}: give a (lo, hi) pair")
        lo = check_float(normalize[0], "normalize[0]", hint="the value that maps to 0")
        hi = check_float(normalize[1], "normalize[1]", hint="the value that maps to 1")
        if not hi > lo:
            raise ValueError(f"normalize={normalize!r}: hi must be larger than lo")
        scale = 1.0 / (hi - lo)
        if not (np.isfinite(hi - lo) and 0 < np.float32(scale) < np.inf):
            raise ValueError(
                f"normalize={normalize!r}: degenerate normalisation, the range hi - lo = {hi - lo:g} "
                "cannot be represented in float32; give a (lo, hi) that spans the image's values"
            )
        return zeros + lo, ones * scale, False, f"range({lo:g}, {hi:g})"
    if not isinstance(normalize, str):
        raise ValueError(f"normalize={normalize!r}: use 'auto', 'unit', 'percentile', 'none' or (lo, hi)")
    rule = normalize.lower()
    if rule == "none":
        return zeros, ones, False, "none"
    if rule == "unit":
        if is_float:
            return zeros, ones, False, "unit"
        if is_bool:
            return zeros, ones, False, "unit"
        return zeros, ones / _int_max(arr), False, "unit"
    if rule == "percentile":
        lo, scale = _percentile_affine(arr)
        return lo, scale, True, "percentile"
    if rule != "auto":
        raise ValueError(f"normalize={normalize!r}: use 'auto', 'unit', 'percentile', 'none' or (lo, hi)")
    if is_u8:
        return zeros, ones / 255.0, False, "uint8/255"
    if is_bool:
        return zeros, ones, False, "bool"
    if is_float:
        lo_v = float(arr.min())
        hi_v = float(arr.max())
        if lo_v >= 0.0 and hi_v <= 1.0:
            return zeros, ones, False, "float in [0, 1]"
    lo, scale = _percentile_affine(arr)
    return lo, scale, True, "percentile"


class Guide:
    """A validated, normalised view of a channels-last guide image.

    Parameters
    ----------
    image : array or tensor, (H, W) or (H, W, G)
        Any numeric dtype; kept as given (no full-size copy).
    normalize : see the module docstring.
    """

    def __init__(
        self,
        image,
        normalize: Normalize = "auto",
        name: str = "guide",
        smoothing: float = 0.0,
        channel_axis: Optional[int] = None,
    ):
        arr = _as_array(image, name)
        arr, self.channel_axis, _ = channels_last(arr, channel_axis, name)
        validate_image(arr, name)
        self.data = arr
        self.shape: Tuple[int, int] = (int(arr.shape[0]), int(arr.shape[1]))
        self.channels = 1 if arr.ndim == 2 else int(arr.shape[2])
        # Checked before the (possibly costly) normalisation statistics and smoothing.
        self.smoothing = check_float(
            smoothing,
            "guide_smoothing",
            minimum=0.0,
            maximum=float(max(self.shape)),
            hint=f"a Gaussian sigma >= 0 in pixels (0 = off), at most the {name}'s size {max(self.shape)}",
        )
        offset, scale, clip, rule = normalization_affine(arr, normalize)
        _check_normalized_range(arr, offset, scale, clip, normalize, name)
        self.offset = torch.as_tensor(offset, dtype=torch.float32)
        self.scale = torch.as_tensor(scale, dtype=torch.float32)
        self.clip = clip
        self.rule = rule
        if self.smoothing > 0:
            self._smooth()

    def _smooth(self) -> None:
        """Replace the data by its normalised, Gaussian-smoothed float32 copy (H, W, G).

        Noisy guides are the method's known weakness: the range term compares each pixel's
        noisy value with the LR cells, so noise chooses the neighbour. Smoothing the guide
        (for the fit and the render alike) trades a little edge sharpness for robustness.
        This is the one place where a full-size float copy of the guide is made.
        """
        from scipy.ndimage import gaussian_filter

        full = self.full().permute(1, 2, 0).cpu().numpy()
        for g in range(full.shape[2]):
            full[:, :, g] = gaussian_filter(full[:, :, g], self.smoothing, mode="nearest")
        self.data = full
        self.offset = torch.zeros(self.channels)
        self.scale = torch.ones(self.channels)
        self.clip = False
        self.rule = f"{self.rule}, Gaussian smoothing sigma {self.smoothing:g} px"

    @property
    def device(self) -> torch.device:
        return self.data.device if isinstance(self.data, torch.Tensor) else torch.device("cpu")

    def gather(self, rows: torch.Tensor, cols: torch.Tensor, device: Optional[torch.device] = None) -> torch.Tensor:
        """Normalised float32 ``[G, len(rows), len(cols)]`` at the given HR rows and columns."""
        if isinstance(self.data, torch.Tensor):
            r = rows.to(self.data.device)
            c = cols.to(self.data.device)
            block = self.data.index_select(0, r).index_select(1, c)
        else:
            r = rows.cpu().numpy()
            c = cols.cpu().numpy()
            block = torch.from_numpy(np.ascontiguousarray(self.data[r][:, c]))
        if device is not None:
            block = block.to(device)
        block = block.to(torch.float32)
        if block.ndim == 2:
            block = block[:, :, None]
        block = block.permute(2, 0, 1)
        dev = block.device
        block = (block - self.offset.to(dev)[:, None, None]) * self.scale.to(dev)[:, None, None]
        if self.clip:
            block = block.clamp_(0.0, 1.0)
        return block.contiguous()

    def gather_fn(self, device: Optional[torch.device] = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return lambda rows, cols: self.gather(rows, cols, device)

    def full(self, device: Optional[torch.device] = None) -> torch.Tensor:
        """The whole normalised guide ``[G, H, W]`` (for small images and tests)."""
        H, W = self.shape
        return self.gather(torch.arange(H), torch.arange(W), device)


def _check_normalized_range(arr, offset, scale, clip: bool, normalize, name: str) -> None:
    """Refuse a guide whose float32 conversion or normalisation is not finite or degenerate.

    Checks what the engine will see: values cast to float32 (a float64 image beyond float32
    range is finite before the cast, Inf after), then ``(x - offset) * scale``.
    """
    is_float, is_bool, is_u8 = _dtype_info(arr)
    if is_bool or (is_u8 and not clip and float(np.max(np.abs(scale))) <= 1.0):
        return  # bounded by construction
    g = 1 if arr.ndim == 2 else int(arr.shape[2])
    if isinstance(arr, torch.Tensor):
        flat = arr.reshape(-1, g)
        lo_v = flat.amin(0).double().cpu().numpy()
        hi_v = flat.amax(0).double().cpu().numpy()
    else:
        flat = np.asarray(arr).reshape(-1, g)
        lo_v = flat.min(0).astype(np.float64)
        hi_v = flat.max(0).astype(np.float64)
    if is_float and max(np.abs(lo_v).max(), np.abs(hi_v).max()) > _FLOAT32_MAX:
        raise ValueError(
            f"{name} has values beyond the float32 range (+-3.4e38), which become Inf when the guide is "
            "converted to float32; rescale it first"
        )
    if clip:
        return  # clipped to [0, 1] after the affine
    with np.errstate(over="ignore", invalid="ignore"):
        ends = (np.stack([lo_v, hi_v]).astype(np.float32) - offset.astype(np.float32)) * scale.astype(np.float32)
    largest = float(np.abs(ends).max())
    if not np.isfinite(largest) or largest > MAX_NORMALIZED:
        raise ValueError(
            f"normalize={normalize!r} is a degenerate normalisation of {name}: it maps the values to "
            f"magnitudes up to {largest:g}, while the range kernel expects about [0, 1] (the fit would "
            "overflow to NaN); use normalize='auto' or a (lo, hi) that spans the image's values"
        )


def check_sequence_pair(value: Sequence[int], name: str) -> Tuple[int, int]:
    """``(h, w)`` ints; TypeError / ValueError naming ``name`` otherwise (no truncation of 8.5)."""
    return check_int_pair(value, name)
