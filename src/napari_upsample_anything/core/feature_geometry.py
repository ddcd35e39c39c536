"""Where a ViT's patch tokens sit on the image: input preparation, token grid and windows.

:func:`~.features.extract_features` prepares the image here (:func:`_prepare_rgb`), sizes the
token grid (:func:`_working_shape`, :func:`_token_grid`), plans the forward passes
(:func:`_resolve_window`, :func:`plan_windows`) and blends their maps (:func:`blend_weights`);
:class:`FeatureGeometry` records the result.

Geometry
--------
The working resolution ``(H', W')`` is the image's own size by default (the upsampling factor
is then the patch size, 14 for DINOv2, as in the paper's 14x/16x experiments), or set by
``input_size``. The token grid is ``h = max(1, floor(H'/p + 1/2))``, ``w`` likewise, and the
whole image is resized (antialiased bilinear) to exactly ``(h p, w p)`` pixels. Nothing is
cropped or padded, so token ``(i, j)`` sees original pixels
``[i H/h, (i+1) H/h) x [j W/w, (j+1) W/w)``: the per-axis scales ``H/h`` and ``W/w`` are in
general not integers, which the engine accepts.

Channels
--------
* ``(H, W)``: grayscale, copied into R, G and B.
* 3D arrays: the channel axis is ``channel_axis`` when given. Without it, only gray / RGB /
  RGBA channels-last ``(H, W, 1 | 3 | 4)`` with ``H, W`` larger than the last axis (napari's RGB convention) is
  accepted; any other 3D layout (``(5, H, W)``, ``(H, W, 2)``, a z-stack) is ambiguous
  between channels and planes and raises a ValueError asking for ``channel_axis``.
* 3 channels: used as R, G, B. 4 channels on an inferred last axis: RGBA, alpha dropped.
* 1 channel: gray. 2 or more than 3 channels (and 4 with an explicit ``channel_axis``):
  every channel is normalised on its own, then the channels are averaged to one gray image.
  The ViT was trained on natural RGB photographs; assigning arbitrary fluorescence channels
  to R, G and B makes colour combinations it never saw, and keeping only three would drop
  structures. To choose channels yourself, pass ``image[..., [0, 2, 1]]``.

Intensities
-----------
Each channel is brought to [0, 1] by the guide rule of :mod:`.guide` (``normalize``: uint8
divided by 255, uint16 and out-of-range floats by robust 0.5/99.5 percentiles, floats in
[0, 1] unchanged), then standardised with the backbone's mean and std (ImageNet for DINOv2).

Large images
------------
When the attention memory of the whole token grid does not fit ``max_memory``, the grid is
cut into overlapping windows (in tokens), each window is a separate forward pass over its
own pixels (positions relative to the window, as for any image of that size), and the
windows are blended with linear ramps across each overlap, which sum to one there.
Attention is global inside a window only, so a windowed map is not the single-pass map.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .backbones import Backbone
from .errors import MemoryBudgetError
from .guide import Normalize, channels_last, normalization_affine, validate_image
from .memory import format_bytes

_MIN_WINDOW = 4  # tokens per side; smaller windows give the ViT too little context to be useful

WindowSpec = Union[None, int, Tuple[int, int]]
Box = Tuple[int, int, int, int]


@dataclass(frozen=True)
class FeatureGeometry:
    """How the token grid sits on the original image.

    Attributes
    ----------
    image_shape : (H, W)
        The original image, in pixels.
    working_shape : (H', W')
        The requested working resolution (``input_size``; the image size by default).
    input_shape : (h * ph, w * pw)
        The size, in pixels, of the resized image the network saw.
    patch_size : (ph, pw)
        The backbone's patch size in pixels (``(14, 14)`` for DINOv2).
    lr_shape : (h, w)
        The token grid.
    scale : (H / h, W / w)
        Original pixels per token along each axis; in general not integers.
    window_shape : (th, tw)
        Window size in tokens (equal to ``lr_shape`` for a single pass).
    overlap : int
        Requested overlap of neighbouring windows, in tokens (0 for a single pass).
    windows : tuple of (i0, i1, j0, j1)
        Token boxes ``[i0, i1) x [j0, j1)``, one per forward pass.
    """

    image_shape: Tuple[int, int]
    working_shape: Tuple[int, int]
    input_shape: Tuple[int, int]
    patch_size: Tuple[int, int]
    lr_shape: Tuple[int, int]
    scale: Tuple[float, float]
    window_shape: Tuple[int, int]
    overlap: int
    windows: Tuple[Box, ...]

    @property
    def n_windows(self) -> int:
        return len(self.windows)

    def token_box(self, i: int, j: int) -> Tuple[float, float, float, float]:
        """Original-pixel box ``(y0, y1, x0, x1)`` (half-open, float) seen by token ``(i, j)``."""
        sy, sx = self.scale
        return (i * sy, (i + 1) * sy, j * sx, (j + 1) * sx)

    def to_dict(self) -> dict:
        return {
            "image_shape": list(self.image_shape),
            "working_shape": list(self.working_shape),
            "input_shape": list(self.input_shape),
            "patch_size": list(self.patch_size),
            "lr_shape": list(self.lr_shape),
            "scale": list(self.scale),
            "window_shape": list(self.window_shape),
            "overlap": self.overlap,
            "windows": [list(b) for b in self.windows],
        }


# ----------------------------------------------------------------------------------------
# Image preparation
# ----------------------------------------------------------------------------------------


def _to_numpy(image) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        if image.device.type == "meta":
            raise TypeError("image is a tensor on the 'meta' device, which holds no values; give real data")
        return image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        return image
    if hasattr(image, "__array__"):  # dask / zarr / PIL images and napari layer data
        return np.asarray(image)
    raise TypeError(f"image must be a numpy array or a torch tensor, got {type(image).__name__}")


def _channels_last(arr: np.ndarray, channel_axis: Optional[int]) -> Tuple[np.ndarray, Optional[int], bool]:
    """(H, W) or (H, W, C) view, the channel axis used (None for 2D), and whether it was guessed."""
    if arr.ndim not in (2, 3):
        raise ValueError(
            f"image must be 2D: (H, W) grayscale, (H, W, C) or (C, H, W) with channels; got shape "
            f"{tuple(arr.shape)}. For a stack or time series, pass one plane at a time (e.g. image[z])"
        )
    if any(int(n) == 0 for n in arr.shape):
        raise ValueError(f"image is empty (shape {tuple(arr.shape)})")
    if arr.ndim == 2:
        if channel_axis is not None:
            raise ValueError(
                f"channel_axis={channel_axis!r} was given but the image is 2D {tuple(arr.shape)}; leave channel_axis=None"
            )
        return arr, None, False
    # 3-D: the axis is given, or the layout is unambiguously gray / RGB / RGBA channels-last;
    # channels and planes are never guessed (core.guide.channels_last raises otherwise).
    view, axis, guessed = channels_last(arr, channel_axis, "image")
    return view, axis, guessed


def _prepare_rgb(image, normalize: Normalize, channel_axis: Optional[int]) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """(3, H, W) float32 tensor in ~[0, 1] (before the backbone's mean/std) and what was done."""
    arr = _to_numpy(image)
    arr, axis, guessed = _channels_last(arr, channel_axis)
    if arr.ndim == 3 and arr.shape[2] == 4 and guessed and axis == 2:
        arr = arr[:, :, :3]  # RGBA as napari holds it: the alpha channel is not image content
        mode = "RGBA, alpha dropped"
    elif arr.ndim == 2 or arr.shape[2] == 1:
        mode = "gray"
    elif arr.shape[2] == 3:
        mode = "RGB"
    else:
        mode = f"mean of {arr.shape[2]} normalised channels"
    validate_image(arr, "image")
    offset, scale, clip, rule = normalization_affine(arr, normalize)
    x = torch.from_numpy(np.ascontiguousarray(arr)).to(torch.float32)
    if x.ndim == 2:
        x = x[:, :, None]
    x = (x - torch.as_tensor(offset, dtype=torch.float32)) * torch.as_tensor(scale, dtype=torch.float32)
    if clip:
        x = x.clamp_(0.0, 1.0)
    if not bool(torch.isfinite(x).all()):  # checked after the float32 cast: 1e300 is finite before it
        raise ValueError(
            f"image has values that are not finite after conversion to float32 and normalize={normalize!r} "
            "(beyond +-3.4e38, or a degenerate (lo, hi) range); rescale the image or use normalize='auto'"
        )
    x = x.permute(2, 0, 1)
    if x.shape[0] != 3:
        # Gray, 2 or >3 channels: one gray plane (after per-channel normalisation, so every
        # channel counts equally), copied to R, G and B.
        x = x.mean(dim=0, keepdim=True).expand(3, -1, -1)
    info = {"channel_axis": axis, "channels": mode, "normalize": rule}
    return x.contiguous(), info


def _working_shape(image_shape: Tuple[int, int], input_size) -> Tuple[int, int]:
    H, W = image_shape
    if input_size is None:
        return H, W
    if isinstance(input_size, numbers.Integral) and not isinstance(input_size, bool):
        n = int(input_size)
        if n < 1:
            raise ValueError(f"input_size={input_size!r}: give a positive long-side length in pixels")
        f = n / max(H, W)
        return max(1, int(math.floor(H * f + 0.5))), max(1, int(math.floor(W * f + 0.5)))
    try:
        a, b = (v for v in input_size)
        if (
            isinstance(a, bool)
            or isinstance(b, bool)
            or not (isinstance(a, numbers.Integral) and isinstance(b, numbers.Integral))
        ):
            raise TypeError
        a, b = int(a), int(b)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"input_size={input_size!r}: give None (the image size), an int (long side in pixels) or a pair of ints (H', W')"
        ) from exc
    if a < 1 or b < 1:
        raise ValueError(f"input_size={input_size!r}: both sizes must be positive")
    return a, b


def _token_grid(working: Tuple[int, int], patch: Tuple[int, int]) -> Tuple[int, int]:
    # floor(x + 1/2), not Python's round(): ties always go up, whatever the parity.
    return tuple(max(1, int(math.floor(n / p + 0.5))) for n, p in zip(working, patch))  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------
# Windows
# ----------------------------------------------------------------------------------------


def window_bytes(backbone: Backbone, window_shape: Tuple[int, int]) -> int:
    """Estimated peak working bytes of one forward pass over a ``(th, tw)``-token window.

    float32 throughout: the attention scores and probabilities of all heads, assuming they
    are materialised (``2 * heads * N^2``, N = tokens + class/register tokens; fused kernels
    need less, so this is conservative), one block's activations (residual stream, norm
    output, q/k/v, attention output and MLP hidden: ``N * (8 D + 2 D_mlp)``), and the pixel
    crop with its standardised copy. The model's own weights are not counted.
    """
    th, tw = window_shape
    ph, pw = backbone.patch_size
    n = th * tw + backbone.num_prefix_tokens
    attn = 2 * backbone.num_heads * n * n
    act = n * (8 * backbone.embed_dim + 2 * backbone.mlp_hidden)
    pixels = 2 * 3 * th * ph * tw * pw
    return 4 * (attn + act + pixels)


def _axis_windows(n: int, t: int, o: int) -> List[Tuple[int, int]]:
    """Windows of length ``t`` covering ``[0, n)``, neighbours overlapping by at least ``o``."""
    if t >= n:
        return [(0, n)]
    stride = t - o
    k = -(-(n - t) // stride) + 1
    # Starts spread evenly between 0 and n - t: every gap is <= stride, so overlaps are >= o.
    return [((i * (n - t) + (k - 1) // 2) // (k - 1), (i * (n - t) + (k - 1) // 2) // (k - 1) + t) for i in range(k)]


def plan_windows(lr_shape: Tuple[int, int], window_shape: Tuple[int, int], overlap: int) -> List[Box]:
    """Token boxes ``(i0, i1, j0, j1)`` of size ``window_shape`` that tile ``lr_shape``.

    Row-major order. Along an axis the grid fits in, there is one window; otherwise windows
    overlap their neighbours by at least ``overlap`` tokens (more where the grid does not
    divide evenly: starts are spread uniformly).
    """
    (h, w), (th, tw) = lr_shape, window_shape
    o = int(overlap)
    for n, t, axis in ((h, th, "rows"), (w, tw, "columns")):
        if t < 1:
            raise ValueError(f"window must be at least 1 token; got {window_shape} ({axis})")
        if t < n and not 0 <= o < t:
            raise ValueError(f"overlap={overlap} tokens must be >= 0 and smaller than the window ({t} tokens along {axis})")
    rows = _axis_windows(h, min(th, h), o)
    cols = _axis_windows(w, min(tw, w), o)
    return [(i0, i1, j0, j1) for i0, i1 in rows for j0, j1 in cols]


def _axis_ramps(spans: List[Tuple[int, int]]) -> List[torch.Tensor]:
    """Linear blend weight of every token of every window along one axis (1 away from overlaps).

    Over the overlap ``[a_next, b)`` of two neighbours the weights are ``(b - x - 1/2) / L``
    and ``(x - a_next + 1/2) / L`` with ``L = b - a_next``: they sum to exactly one.
    """
    out = []
    for k, (a, b) in enumerate(spans):
        x = torch.arange(a, b, dtype=torch.float64) + 0.5
        wgt = torch.ones(b - a, dtype=torch.float64)
        if k > 0:
            left = spans[k - 1][1] - a
            if left > 0:
                wgt = torch.minimum(wgt, (x - a) / left)
        if k + 1 < len(spans):
            right = b - spans[k + 1][0]
            if right > 0:
                wgt = torch.minimum(wgt, (b - x) / right)
        out.append(wgt)
    return out


def _ramps_for(windows: Sequence[Box]) -> Dict[Box, torch.Tensor]:
    rows = sorted({(b[0], b[1]) for b in windows})
    cols = sorted({(b[2], b[3]) for b in windows})
    wr = dict(zip(rows, _axis_ramps(rows)))
    wc = dict(zip(cols, _axis_ramps(cols)))
    return {b: wr[(b[0], b[1])][:, None] * wc[(b[2], b[3])][None, :] for b in windows}


def blend_weights(lr_shape: Tuple[int, int], windows: Sequence[Box], normalize: bool = True) -> torch.Tensor:
    """Blend weight of every window at every token, ``(K, h, w)`` float64.

    Zero outside each window. With ``normalize`` (what the extractor applies) they sum to one
    at every token; the raw ramps already do wherever no more than two windows overlap along
    an axis.
    """
    h, w = lr_shape
    ramps = _ramps_for(windows)
    out = torch.zeros(len(windows), h, w, dtype=torch.float64)
    for k, b in enumerate(windows):
        out[k, b[0] : b[1], b[2] : b[3]] = ramps[b]
    if normalize:
        total = out.sum(0)
        if bool((total <= 0).any()):
            raise ValueError("windows do not cover the whole token grid")
        out = out / total
    return out


def _resolve_window(
    lr_shape: Tuple[int, int], window: WindowSpec, overlap, backbone: Backbone, budget: int
) -> Tuple[Tuple[int, int], int]:
    h, w = lr_shape
    if window is not None:
        if isinstance(window, numbers.Integral) and not isinstance(window, bool):
            th = tw = int(window)
        else:
            try:
                th, tw = (int(v) for v in window)  # type: ignore[union-attr]
            except (TypeError, ValueError) as exc:
                raise ValueError(f"window={window!r}: give None (automatic), an int or a (rows, cols) pair of tokens") from exc
        if th < 1 or tw < 1:
            raise ValueError(f"window={window!r}: the window must be at least 1 x 1 tokens")
        th, tw = min(th, h), min(tw, w)
    elif window_bytes(backbone, (h, w)) <= budget:
        th, tw = h, w
    else:
        fits = lambda a, b: window_bytes(backbone, (a, b)) <= budget  # noqa: E731
        lo, hi = 0, max(h, w)  # largest square side t with the (clipped) window fitting
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(min(mid, h), min(mid, w)):
                lo = mid
            else:
                hi = mid - 1
        if lo < min(_MIN_WINDOW, h, w):
            need = window_bytes(backbone, (min(_MIN_WINDOW, h), min(_MIN_WINDOW, w)))
            raise MemoryBudgetError(
                f"max_memory={format_bytes(budget)} cannot hold even a {_MIN_WINDOW} x {_MIN_WINDOW}-token "
                f"window of {backbone.name} (about {format_bytes(need)}); raise max_memory or lower input_size"
            )
        # Past the shorter side the window is clipped to it, so the same search also finds the
        # longest full-height (or full-width) strip.
        th, tw = min(lo, h), min(lo, w)
    split = [t for t, n in ((th, h), (tw, w)) if t < n]
    if isinstance(overlap, bool) or not isinstance(overlap, numbers.Real):
        raise ValueError(f"overlap={overlap!r}: give a fraction of the window in [0, 0.5) or an int number of tokens")
    if isinstance(overlap, numbers.Integral):
        o = int(overlap)
        if o < 0:
            raise ValueError(f"overlap={overlap!r}: must be >= 0 tokens")
    else:
        if not 0.0 <= float(overlap) < 0.5:
            raise ValueError(f"overlap={overlap!r}: a fraction of the window must be in [0, 0.5); give an int for tokens")
        o = int(math.floor(float(overlap) * min(split) + 0.5)) if split else 0
    if not split:
        o = 0
    return (th, tw), o
