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

The original array is kept (not copied to float32): tiles are gathered from it and
normalised on the fly, so a large uint8 image costs no extra full-size float copy.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
import torch

Normalize = Union[str, Tuple[float, float]]

_PERCENTILES = (0.5, 99.5)
_SAMPLE_PIXELS = 1 << 20


def _as_array(guide, name: str):
    if isinstance(guide, torch.Tensor):
        return guide.detach()
    if isinstance(guide, np.ndarray):
        return guide
    if hasattr(guide, "__array__"):  # dask / zarr / PIL images and napari layer data
        return np.asarray(guide)
    raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(guide).__name__}")


def validate_image(arr, name: str = "guide") -> None:
    """Shape, size and finiteness checks for a channels-last (H, W[, G]) image."""
    if arr.ndim not in (2, 3):
        raise ValueError(
            f"{name} must be (H, W) or (H, W, G) channels-last, got shape {tuple(arr.shape)}; "
            "for a stack, pass one 2D slice at a time"
        )
    if any(int(n) == 0 for n in arr.shape):
        raise ValueError(f"{name} is empty (shape {tuple(arr.shape)})")
    if arr.ndim == 3 and arr.shape[2] > 64 and arr.shape[0] <= 64:
        raise ValueError(
            f"{name} has shape {tuple(arr.shape)}, which looks channels-first (G, H, W); "
            "pass it channels-last (H, W, G), e.g. np.moveaxis(a, 0, -1) or t.permute(1, 2, 0)"
        )
    dtype_is_float = (
        arr.dtype.is_floating_point if isinstance(arr, torch.Tensor) else np.issubdtype(arr.dtype, np.floating)
    )
    dtype_ok = (
        arr.dtype.is_floating_point or arr.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool, torch.uint16)
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
        lo, hi = float(normalize[0]), float(normalize[1])
        if not hi > lo:
            raise ValueError(f"normalize={normalize!r}: hi must be larger than lo")
        return zeros + lo, ones / (hi - lo), False, f"range({lo:g}, {hi:g})"
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

    def __init__(self, image, normalize: Normalize = "auto", name: str = "guide", smoothing: float = 0.0):
        arr = _as_array(image, name)
        validate_image(arr, name)
        self.data = arr
        self.shape: Tuple[int, int] = (int(arr.shape[0]), int(arr.shape[1]))
        self.channels = 1 if arr.ndim == 2 else int(arr.shape[2])
        offset, scale, clip, rule = normalization_affine(arr, normalize)
        self.offset = torch.as_tensor(offset, dtype=torch.float32)
        self.scale = torch.as_tensor(scale, dtype=torch.float32)
        self.clip = clip
        self.rule = rule
        if not (smoothing >= 0) or smoothing != smoothing:
            raise ValueError(f"guide_smoothing={smoothing!r}: give a Gaussian sigma >= 0 in pixels (0 = off)")
        self.smoothing = float(smoothing)
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


def check_sequence_pair(value: Sequence[int], name: str) -> Tuple[int, int]:
    try:
        a, b = (int(v) for v in value)
    except Exception as exc:
        raise ValueError(f"{name} must be a pair of ints (h, w), got {value!r}") from exc
    return a, b
