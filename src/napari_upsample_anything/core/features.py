"""Low-resolution ViT feature maps for the upsampler (DINOv2 and other timm ViTs).

:func:`extract_features` turns a microscopy or photo image into a ``(C, h, w)`` patch-token
feature map whose token grid covers the *original* image exactly, so that
``upsample(image, features)`` puts every feature on the pixels it came from.

How the image is prepared (channels, intensities), where the tokens sit on it (the token
grid, its geometry) and how a large grid is cut into windows is in
:mod:`.feature_geometry`; this module runs the backbone and assembles the map.

Layers
------
``layer`` picks a transformer block (negative counts from the end), or several blocks at once
(``layer=(-1, -4)``, also spelled ``layers=(-1, -4)``): their token maps are concatenated
along the channel axis in the order given (``C = len(layers) x embed_dim``), from one forward
pass. The final LayerNorm is applied to every chosen block's output on its own, as DINOv2's
``get_intermediate_layers(norm=True)`` does (its default), so that each block's part of the
feature vector has comparable per-token scales. Class and register tokens are dropped
(``num_prefix_tokens``: 1 for DINOv2, 5 for the ``_reg`` variants and DINOv3).

Backbones, weights and the model cache live in :mod:`.backbones`, token geometry and windows
in :mod:`.feature_geometry`; their public names are re-exported here.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .backbones import (  # noqa: F401  (re-exported: callers import these from here)
    _CACHE,
    BACKBONES,
    DINOV2_BACKBONES,
    DINOV3_BACKBONES,
    Backbone,
    WeightsMismatchError,
    WeightsUnavailableError,
    clear_model_cache,
    load_backbone,
    resolve_backbone_name,
)
from .feature_geometry import (  # noqa: F401  (re-exported: callers import these from here)
    FeatureGeometry,
    WindowSpec,
    _prepare_rgb,
    _ramps_for,
    _resolve_window,
    _token_grid,
    _working_shape,
    blend_weights,
    plan_windows,
    window_bytes,
)
from .guide import Normalize
from .memory import default_budget, parse_bytes
from .progress import CancelFn, ProgressFn, check_cancel, report

__all__ = [
    "BACKBONES",
    "DINOV2_BACKBONES",
    "DINOV3_BACKBONES",
    "Backbone",
    "FeatureGeometry",
    "FeatureMap",
    "WeightsMismatchError",
    "WeightsUnavailableError",
    "blend_weights",
    "clear_model_cache",
    "extract_features",
    "layer_list",
    "load_backbone",
    "plan_windows",
    "resolve_backbone_name",
    "window_bytes",
]

ImageLike = Union[np.ndarray, torch.Tensor]
Budget = Union[int, float, str, None]


# ----------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------


@dataclass
class FeatureMap:
    """The result of :func:`extract_features`; unpacks as ``features, geometry``.

    Attributes
    ----------
    features : torch.Tensor, (C, h, w) float32 on the CPU
        Patch-token features (C = the backbone's embedding width).
    geometry : FeatureGeometry
    backbone : str
        The timm model name actually used (e.g. ``"vit_small_patch14_dinov2.lvd142m"``).
    weights_source : str
        ``"hf-cache:<repo>"``, ``"file:<path>"``, ``"random-init"`` or ``"user-model"``.
    layer : int
        The (first) block whose output this is, counted from 0.
    num_layers : int
        Number of blocks of the backbone.
    preprocessing : dict
        ``channel_axis`` used, ``channels`` (how they became RGB), ``normalize`` (the rule
        applied), ``mean`` / ``std``.
    layers : tuple of int
        Every block concatenated, counted from 0, in channel order (``(layer,)`` for one).
    """

    features: torch.Tensor
    geometry: FeatureGeometry
    backbone: str
    weights_source: str
    layer: int
    num_layers: int
    preprocessing: Dict[str, Any] = field(default_factory=dict)
    layers: Tuple[int, ...] = ()

    def __iter__(self) -> Iterator[Any]:
        # ``features, geometry = extract_features(...)``
        yield self.features
        yield self.geometry


# ----------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------


def _resolve_layer(layer, depth: int, name: str) -> int:
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
        raise TypeError(f"layer={layer!r}: give an int block index (negative counts from the end, -1 = last)")
    if not -depth <= int(layer) < depth:
        raise ValueError(f"layer={layer} is out of range for {name} ({depth} blocks): use 0..{depth - 1} or -{depth}..-1")
    return int(layer) % depth


def layer_list(layer, layers=None) -> Tuple[int, ...]:
    """The requested blocks as a tuple of ints (not yet resolved against a depth).

    ``layer`` is an int or a sequence of ints; ``layers`` (optional) says the same and must
    agree with ``layer`` when both are given. Checks types and duplicates only.
    """
    if layers is not None:
        if not (isinstance(layer, numbers.Integral) and int(layer) == -1) and tuple(np.atleast_1d(layer)) != tuple(layers):
            raise ValueError(f"layer={layer!r} and layers={layers!r} disagree: give one of them")
        layer = layers
    items = (layer,) if isinstance(layer, numbers.Integral) or isinstance(layer, bool) else layer
    try:
        items = tuple(items)
    except TypeError:
        raise TypeError(f"layer={layer!r}: give an int block index or a sequence of them, e.g. (-1, -4)") from None
    if not items:
        raise ValueError("layers=(): give at least one block index, e.g. (-1,) or (-1, -4)")
    for v in items:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"layer={layer!r}: every block index must be an int (negative counts from the end)")
    return tuple(int(v) for v in items)


def _resolve_layers(layers: Tuple[int, ...], depth: int, name: str) -> Tuple[int, ...]:
    idxs = tuple(_resolve_layer(v, depth, name) for v in layers)
    if len(set(idxs)) != len(idxs):
        raise ValueError(f"layers={layers!r} name the same block twice for {name} ({depth} blocks): give distinct blocks")
    return idxs


def _check_one_patch(image_shape: Tuple[int, int], patch: Optional[Tuple[int, int]], name: str) -> None:
    (H, W), (ph, pw) = image_shape, patch or (1, 1)
    if H < ph or W < pw:
        raise ValueError(
            f"image is {H} x {W} pixels, smaller than one {ph} x {pw} patch of {name}; upsampling needs at least one whole patch"
        )


@contextlib.contextmanager
def _cancel_between_blocks(model: torch.nn.Module, cancel: Optional[CancelFn]) -> Iterator[None]:
    """Poll ``cancel`` before every transformer block of ``model`` while the context is open.

    One window of a large backbone takes seconds to minutes on a CPU; polling between windows
    only made a cancel wait for the whole window. The hooks are removed on exit (the model is
    cached and shared by later calls, which bring their own ``cancel``).
    """
    if cancel is None:
        yield
        return

    def check(_module, _inputs) -> None:
        check_cancel(cancel, "feature extraction")

    hooks = [block.register_forward_pre_hook(check) for block in getattr(model, "blocks", ())]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def extract_features(
    image: ImageLike,
    backbone: str | Backbone | torch.nn.Module = "dinov2_vits14",
    *,
    layer: int | Sequence[int] = -1,
    input_size: int | Tuple[int, int] | None = None,
    weights: str | os.PathLike | None = None,
    pretrained: bool = True,
    device: str | torch.device = "auto",
    max_memory: Budget = None,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelFn] = None,
    normalize: Normalize = "auto",
    channel_axis: Optional[int] = None,
    window: WindowSpec = None,
    overlap: int | float = 0.25,
    layers: Optional[Sequence[int]] = None,
) -> FeatureMap:
    """Patch-token features of a ViT (DINOv2 by default) on a grid that covers ``image`` exactly.

    Parameters
    ----------
    image : array or tensor, (H, W), (H, W, C) or (C, H, W)
        Gray, RGB, RGBA (alpha dropped) or multichannel; any integer, bool or float dtype.
        See the module docstring for the channel-axis heuristic and what happens to 2 or
        more than 3 channels.
    backbone : str, Backbone or timm ViT module
        ``"dinov2_vits14"`` / ``vitb14`` / ``vitl14`` / ``vitg14`` and their ``_reg``
        variants, ``"dinov3_vits16"`` / ``vits16plus`` / ``vitb16`` / ``vitl16``, any timm ViT name, a :class:`Backbone` from :func:`load_backbone`, or a timm
        ViT created with ``dynamic_img_size=True`` (for these two, ``weights``,
        ``pretrained`` and ``device`` are not used: the model runs where it is).
    layer : int or sequence of int
        Block whose output is returned; -1 (default) is the last. Several blocks, e.g.
        ``(-1, -4)``: their maps are concatenated along channels in that order. The final
        norm is applied to every block's output on its own (DINOv2's
        ``get_intermediate_layers(norm=True)``).
    input_size : None, int or (H', W')
        Working resolution in pixels. None: the image's own size (tokens of about p x p
        pixels, p = patch size). An int sets the long side, keeping the aspect ratio.
    weights : path, optional
        A local state dict (timm layout or original DINOv2 checkpoint); see :func:`load_backbone`.
    pretrained : bool
        Without ``weights``: True uses timm's pretrained weights through the Hugging Face
        cache; False uses random weights (and warns: the features are then meaningless).
    device : "auto" | "cpu" | "cuda" | "cuda:N" | "mps"
    max_memory : bytes, "2GB", "512MiB" or None
        Working-memory budget of one forward pass (see :func:`window_bytes`). None: 60% of
        free GPU memory, or 40% of available RAM (at most 8 GiB) on CPU. A grid that does not
        fit is cut into windows.
    progress : callable(done, total, info), optional
        Called once per window with ``info = {"stage": "features", "window": (i0, i1, j0, j1)}``.
    cancel : callable() -> bool, optional
        Polled before every window; True raises :class:`~.errors.Cancelled`.
    normalize : "auto", "unit", "percentile", "none" or (lo, hi)
        Intensity rule bringing each channel to [0, 1] (as for the guide: uint8 / 255,
        uint16 and out-of-range floats by 0.5/99.5 percentiles).
    channel_axis : int, optional
        Channel axis of a 3D image. None: only gray / RGB / RGBA channels-last is accepted;
        any other 3D layout raises a ValueError asking for it (module docstring).
    window : None, int or (th, tw)
        Window size in tokens. None: the largest that fits ``max_memory`` (one pass when the
        whole grid fits). An explicit window is used as given, whatever ``max_memory`` says.
    overlap : float or int
        Overlap of neighbouring windows: a float in [0, 0.5) is a fraction of the window
        side, an int is tokens. Blended with linear ramps.
    layers : sequence of int, optional
        The same as a sequence ``layer`` (``layers=(-1, -4)``); give one of the two.

    Returns
    -------
    FeatureMap
        ``features`` (C, h, w) float32 on the CPU (C = embed_dim x number of blocks), with ``h = max(1, round(H'/p))``,
        ``w = max(1, round(W'/p))``, and token ``(i, j)`` covering original pixels
        ``[i H/h, (i+1) H/h) x [j W/w, (j+1) W/w)``; ``geometry``, ``backbone``,
        ``weights_source``. Unpacks as ``features, geometry``.

    Raises
    ------
    ValueError
        Bad image (wrong ndim, empty, NaN/Inf, smaller than one patch) or arguments.
    WeightsUnavailableError, WeightsMismatchError, FileNotFoundError
        See :func:`load_backbone`.
    MemoryBudgetError
        ``max_memory`` cannot hold even a small window.
    Cancelled
        ``cancel()`` returned True.
    """
    # Image checks first: they are cheap, and loading a large backbone is not.
    requested = layer_list(layer, layers)
    rgb, info = _prepare_rgb(image, normalize, channel_axis)
    H, W = int(rgb.shape[1]), int(rgb.shape[2])
    working = _working_shape((H, W), input_size)
    check_cancel(cancel, "feature extraction")

    if isinstance(backbone, str):
        # Names carry the patch size ("..._patch14_..."): refuse a too-small image before
        # building (or downloading) the model.
        patch = re.search(r"patch(\d+)", resolve_backbone_name(backbone))
        _check_one_patch((H, W), (int(patch.group(1)),) * 2 if patch else None, backbone)
    if not isinstance(backbone, str) and weights is not None:
        raise ValueError(
            "weights= is only used with a backbone name; a Backbone or module already has its "
            "weights (use load_backbone(name, weights=...) to build one from a file)"
        )
    if isinstance(backbone, Backbone):
        bb = backbone
    elif isinstance(backbone, torch.nn.Module):
        bb = Backbone.from_module(backbone)
    else:
        bb = load_backbone(backbone, weights=weights, pretrained=pretrained, device=device)
    if bb.weights_source == "random-init":
        warnings.warn(
            f"{bb.name} has random weights (pretrained=False): its features are meaningless except "
            "for testing. Use pretrained=True or weights='/path/to/file' for real features.",
            UserWarning,
            stacklevel=2,
        )
    dev = bb.device
    depth = bb.depth
    idxs = _resolve_layers(requested, depth, bb.name)
    # forward_intermediates returns blocks in network order; channels follow the given order.
    ascending = sorted(idxs)

    ph, pw = bb.patch_size
    _check_one_patch((H, W), (ph, pw), bb.name)
    h, w = _token_grid(working, (ph, pw))
    if h > H or w > W:
        raise ValueError(
            f"input_size={input_size!r} gives a {h} x {w} token grid, finer than the {H} x {W} image: "
            f"the upsampler needs at most one token per pixel; use input_size <= {max(H, W) * max(ph, pw)}"
        )
    nbytes = parse_bytes(max_memory)
    budget = default_budget(dev) if nbytes is None else nbytes
    (th, tw), o = _resolve_window((h, w), window, overlap, bb, budget)
    windows = plan_windows((h, w), (th, tw), o)

    # Resize the whole image once so that patch (i, j) of the resized image is exactly
    # original pixels [i H/h, (i+1) H/h) x [j W/w, (j+1) W/w): no crop, no pad, no shift.
    target = (h * ph, w * pw)
    x = rgb[None]
    if target != (H, W):
        x = F.interpolate(x, size=target, mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(bb.mean, dtype=torch.float32)[None, :, None, None]
    std = torch.tensor(bb.std, dtype=torch.float32)[None, :, None, None]
    x = (x - mean) / std
    del rgb

    D = bb.embed_dim
    C = D * len(idxs)
    ramps = _ramps_for(windows) if len(windows) > 1 else None
    acc = torch.zeros(C, h, w, dtype=torch.float32)
    den = torch.zeros(h, w, dtype=torch.float64) if ramps is not None else None
    for k, (i0, i1, j0, j1) in enumerate(windows):
        check_cancel(cancel, "feature extraction")
        crop = x[:, :, i0 * ph : i1 * ph, j0 * pw : j1 * pw].to(dev)
        with torch.inference_mode(), _cancel_between_blocks(bb.model, cancel):
            outs = bb.model.forward_intermediates(
                crop,
                indices=list(ascending),
                norm=True,
                stop_early=True,
                output_fmt="NCHW",
                intermediates_only=True,
            )
        if len(outs) != len(idxs):
            raise RuntimeError(f"internal error: {bb.name} returned {len(outs)} block outputs for blocks {idxs}")
        by_block = dict(zip(ascending, outs))
        feats = torch.cat([by_block[i][0].to("cpu", torch.float32) for i in idxs], dim=0)
        if tuple(feats.shape) != (C, i1 - i0, j1 - j0):  # guard against a model that reshapes differently
            raise RuntimeError(f"internal error: {bb.name} returned {tuple(feats.shape)} for a {(i1 - i0, j1 - j0)} window")
        if ramps is None:
            acc = feats.contiguous()
        else:
            wgt = ramps[(i0, i1, j0, j1)]
            acc[:, i0:i1, j0:j1] += feats * wgt.to(torch.float32)
            den[i0:i1, j0:j1] += wgt  # type: ignore[index]
        report(progress, k + 1, len(windows), stage="features", window=(i0, i1, j0, j1))
    if den is not None:
        acc /= den.to(torch.float32)

    geometry = FeatureGeometry(
        image_shape=(H, W),
        working_shape=working,
        input_shape=target,
        patch_size=(ph, pw),
        lr_shape=(h, w),
        scale=(H / h, W / w),
        window_shape=(th, tw),
        overlap=o if len(windows) > 1 else 0,
        windows=tuple(windows),
    )
    info.update(mean=bb.mean, std=bb.std)
    return FeatureMap(
        features=acc,
        geometry=geometry,
        backbone=bb.name,
        weights_source=bb.weights_source,
        layer=idxs[0],
        num_layers=depth,
        preprocessing=info,
        layers=idxs,
    )
