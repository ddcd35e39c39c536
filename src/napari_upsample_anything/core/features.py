"""Low-resolution ViT feature maps for the upsampler (DINOv2 and other timm ViTs).

:func:`extract_features` turns a microscopy or photo image into a ``(C, h, w)`` patch-token
feature map whose token grid covers the *original* image exactly, so that
``upsample(image, features)`` puts every feature on the pixels it came from.

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
* 3D arrays: the channel axis is ``channel_axis`` when given; otherwise the smaller of the
  first and last axes (a tie goes to the last: napari's RGB convention). A guessed axis
  larger than 16 is refused as probably a z-stack.
* 3 channels: used as R, G, B. 4 channels on a *guessed* last axis: RGBA, alpha dropped.
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

Layers
------
``layer`` picks a transformer block (negative counts from the end). The final LayerNorm is
applied to the chosen block's output for every layer, as DINOv2's
``get_intermediate_layers(norm=True)`` does (its default), so that all layers have comparable
per-token scales. Class and register tokens are dropped (``num_prefix_tokens``).

Large images
------------
When the attention memory of the whole token grid does not fit ``max_memory``, the grid is
cut into overlapping windows (in tokens), each window is a separate forward pass over its
own pixels (positions relative to the window, as for any image of that size), and the
windows are blended with linear ramps across each overlap, which sum to one there.
Attention is global inside a window only, so a windowed map is not the single-pass map.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import numbers
import os
import re
import sys
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .device import resolve_device
from .errors import MemoryBudgetError
from .guide import Normalize, normalization_affine, validate_image
from .memory import default_budget, format_bytes, parse_bytes
from .platform_fixes import preload_triton_safely
from .progress import CancelFn, ProgressFn, check_cancel, report

__all__ = [
    "DINOV2_BACKBONES",
    "Backbone",
    "FeatureGeometry",
    "FeatureMap",
    "WeightsMismatchError",
    "WeightsUnavailableError",
    "blend_weights",
    "clear_model_cache",
    "extract_features",
    "load_backbone",
    "plan_windows",
    "resolve_backbone_name",
    "window_bytes",
]

#: Short names (as in the DINOv2 torch hub) -> timm model names with the pretrained tag.
DINOV2_BACKBONES: Dict[str, str] = {
    "dinov2_vits14": "vit_small_patch14_dinov2.lvd142m",
    "dinov2_vitb14": "vit_base_patch14_dinov2.lvd142m",
    "dinov2_vitl14": "vit_large_patch14_dinov2.lvd142m",
    "dinov2_vitg14": "vit_giant_patch14_dinov2.lvd142m",
    "dinov2_vits14_reg": "vit_small_patch14_reg4_dinov2.lvd142m",
    "dinov2_vitb14_reg": "vit_base_patch14_reg4_dinov2.lvd142m",
    "dinov2_vitl14_reg": "vit_large_patch14_reg4_dinov2.lvd142m",
    "dinov2_vitg14_reg": "vit_giant_patch14_reg4_dinov2.lvd142m",
}

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_MAX_GUESSED_CHANNELS = 16
_MIN_WINDOW = 4  # tokens per side; smaller windows give the ViT too little context to be useful
_HF_FILES = ("model.safetensors", "pytorch_model.bin")  # the order timm itself tries
_CACHE_SIZE = 2
_RANDOM_SEED = 0
_WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")

ImageLike = Union[np.ndarray, torch.Tensor]
Budget = Union[int, float, str, None]
WindowSpec = Union[None, int, Tuple[int, int]]
Box = Tuple[int, int, int, int]


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights are neither in the Hugging Face cache nor downloadable now.

    Attributes ``repo_id``, ``filename`` and ``cache_dir`` say what to download and where it
    is looked for; the message gives the commands.
    """

    def __init__(self, message: str, repo_id: Optional[str] = None, filename: Optional[str] = None, cache_dir: Optional[str] = None):
        super().__init__(message)
        self.repo_id = repo_id
        self.filename = filename
        self.cache_dir = cache_dir


class WeightsMismatchError(ValueError):
    """A weights file does not fit the chosen architecture (missing, extra or mis-shaped keys)."""


# ----------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------


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
        The block whose output this is, counted from 0.
    num_layers : int
        Number of blocks of the backbone.
    preprocessing : dict
        ``channel_axis`` used, ``channels`` (how they became RGB), ``normalize`` (the rule
        applied), ``mean`` / ``std``.
    """

    features: torch.Tensor
    geometry: FeatureGeometry
    backbone: str
    weights_source: str
    layer: int
    num_layers: int
    preprocessing: Dict[str, Any] = field(default_factory=dict)

    def __iter__(self) -> Iterator[Any]:
        # ``features, geometry = extract_features(...)``
        yield self.features
        yield self.geometry


# ----------------------------------------------------------------------------------------
# Backbones: names, weights, cache
# ----------------------------------------------------------------------------------------


@dataclass(eq=False)
class Backbone:
    """A ready-to-run ViT (eval mode, no gradients) and what the extractor needs to know about it."""

    model: torch.nn.Module
    name: str
    weights_source: str
    device: torch.device
    patch_size: Tuple[int, int]
    embed_dim: int
    depth: int
    num_heads: int
    mlp_hidden: int
    num_prefix_tokens: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]

    @classmethod
    def from_module(cls, model: torch.nn.Module, name: Optional[str] = None, weights_source: str = "user-model") -> "Backbone":
        """Wrap a timm ViT created with ``dynamic_img_size=True`` (it is put in eval mode)."""
        missing = [a for a in ("patch_embed", "blocks", "forward_intermediates", "num_prefix_tokens") if not hasattr(model, a)]
        if missing:
            raise ValueError(
                f"backbone {type(model).__name__} is not a timm Vision Transformer (it has no "
                f"{', '.join(missing)}); use a timm ViT such as 'vit_small_patch14_dinov2.lvd142m'"
            )
        if not getattr(model, "dynamic_img_size", False):
            raise ValueError(
                "backbone was created without dynamic image size support; create it with "
                "timm.create_model(name, dynamic_img_size=True) so that any input size works"
            )
        ps = model.patch_embed.patch_size
        patch = (int(ps[0]), int(ps[1])) if isinstance(ps, (tuple, list)) else (int(ps), int(ps))
        blocks = list(model.blocks)
        attn = getattr(blocks[0], "attn", None)
        num_heads = int(getattr(attn, "num_heads", 1))
        fc1 = getattr(getattr(blocks[0], "mlp", None), "fc1", None)
        embed_dim = int(getattr(model, "embed_dim", getattr(model, "num_features", 0)))
        mlp_hidden = int(getattr(fc1, "out_features", 4 * embed_dim))
        cfg = getattr(model, "pretrained_cfg", None) or {}
        if name is None:
            arch, tag = cfg.get("architecture"), cfg.get("tag")
            name = (f"{arch}.{tag}" if tag else arch) if arch else type(model).__name__
        mean = tuple(float(v) for v in cfg.get("mean", _IMAGENET_MEAN))
        std = tuple(float(v) for v in cfg.get("std", _IMAGENET_STD))
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        model.eval()
        return cls(
            model=model,
            name=str(name),
            weights_source=weights_source,
            device=device,
            patch_size=patch,
            embed_dim=embed_dim,
            depth=len(blocks),
            num_heads=num_heads,
            mlp_hidden=mlp_hidden,
            num_prefix_tokens=int(model.num_prefix_tokens),
            mean=mean,  # type: ignore[arg-type]
            std=std,  # type: ignore[arg-type]
        )


def resolve_backbone_name(backbone: str) -> str:
    """timm model name (with its pretrained tag) for a short DINOv2 name or any timm ViT name.

    ``"dinov2_vits14"`` -> ``"vit_small_patch14_dinov2.lvd142m"``; an untagged timm name gets
    timm's default pretrained tag. Unknown names raise a ValueError listing the short names.
    """
    preload_triton_safely()  # before timm -> torchvision -> torch._dynamo -> triton
    import timm
    from timm.models import get_pretrained_cfg, split_model_name_tag

    if not isinstance(backbone, str) or not backbone.strip():
        raise TypeError(f"backbone={backbone!r}: give a model name such as 'dinov2_vits14'")
    key = backbone.strip()
    if key.lower() in DINOV2_BACKBONES:
        return DINOV2_BACKBONES[key.lower()]
    arch, tag = split_model_name_tag(key)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(key, list(DINOV2_BACKBONES) + timm.list_models("vit*"), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"backbone={backbone!r} is not a known model.{hint} Use one of "
            f"{', '.join(DINOV2_BACKBONES)}, or a timm ViT name such as "
            "'vit_small_patch14_dinov2.lvd142m' (see timm.list_models('vit_*', pretrained=True))"
        )
    try:
        cfg = get_pretrained_cfg(key)
    except RuntimeError as exc:  # an unknown tag
        raise ValueError(f"backbone={backbone!r}: {exc}") from exc
    if not tag and cfg is not None and getattr(cfg, "tag", None):
        return f"{arch}.{cfg.tag}"
    return key


def _create(timm_name: str, on_meta: bool) -> torch.nn.Module:
    """The bare architecture: on the meta device (free, weights come next) or randomly initialised."""
    preload_triton_safely()  # before timm -> torchvision -> torch._dynamo -> triton
    import timm

    kwargs = dict(pretrained=False, num_classes=0, dynamic_img_size=True)
    try:
        if on_meta:
            with torch.device("meta"):
                model = timm.create_model(timm_name, **kwargs)
            # Buffers that are computed at construction (e.g. rotary tables) are not in a state
            # dict; such models must be built for real.
            if any(True for _ in model.buffers()):
                model = timm.create_model(timm_name, **kwargs)
        else:
            # A fixed seed, without touching the caller's RNG, so random-init features are
            # reproducible from run to run.
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(_RANDOM_SEED)
                model = timm.create_model(timm_name, **kwargs)
    except TypeError as exc:
        if "dynamic_img_size" in str(exc):
            raise ValueError(
                f"backbone {timm_name!r} is not a Vision Transformer with dynamic input size "
                "support; use a timm ViT such as 'vit_small_patch14_dinov2.lvd142m'"
            ) from exc
        raise
    return model


def _filter_fn(model: torch.nn.Module):
    """timm's converter for the architecture (handles original DINOv2 / CLIP / ... layouts)."""
    module = sys.modules.get(type(model).__module__)
    return getattr(module, "checkpoint_filter_fn", None)


def _read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            # weights_only: a checkpoint is data; never execute pickled code from a file.
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"weights={str(path)!r} could not be read as a state dict ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); give a timm/torch state dict saved "
            f"with torch.save(model.state_dict(), ...) or a .safetensors file ({', '.join(_WEIGHT_SUFFIXES)})"
        ) from exc
    # Training checkpoints wrap the weights: {"model": ...}, {"state_dict": ...}, DINOv2's
    # {"teacher": {"backbone.<key>": ...}}.
    for wrapper in ("state_dict", "model", "teacher"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"weights={str(path)!r} does not contain a state dict of tensors; save one with "
            "torch.save(model.state_dict(), path)"
        )
    for prefix in ("module.", "backbone."):
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def _short(items: Sequence[str], n: int = 6) -> str:
    items = list(items)
    return ", ".join(items[:n]) + (f" ... (+{len(items) - n} more)" if len(items) > n else "")


_ARCH_HINT = (
    "Choose the backbone the file was trained for (e.g. a ViT-B file needs 'dinov2_vitb14', "
    "a file with register tokens needs a '_reg' backbone)."
)


def _load_into(model: torch.nn.Module, path: Path, timm_name: str) -> torch.nn.Module:
    """Load the file at ``path`` into ``model`` (possibly on the meta device); strict except classifier heads."""
    state = _read_state_dict(path)
    fn = _filter_fn(model)
    if fn is not None:
        try:
            state = fn(state, model)
        except Exception as exc:
            raise WeightsMismatchError(
                f"weights={str(path)!r} could not be converted for {timm_name} "
                f"({type(exc).__name__}: {exc}); is it a checkpoint of this architecture? "
                + _ARCH_HINT
            ) from exc
    expected = model.state_dict()
    # The model is built without a classifier (num_classes=0); heads in the file are not needed.
    state = {k: v for k, v in state.items() if k in expected or not k.startswith(("head.", "fc_norm."))}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mis_shaped = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mis_shaped:
        parts = []
        if mis_shaped:
            parts.append(f"{len(mis_shaped)} shape mismatch(es): {_short(mis_shaped, 3)}")
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_short(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_short(unexpected)}")
        raise WeightsMismatchError(
            f"weights={str(path)!r} does not match the architecture {timm_name}: "
            + "; ".join(parts)
            + ". "
            + _ARCH_HINT
        )
    state = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()}
    is_meta = any(p.is_meta for p in model.parameters())
    model.load_state_dict(state, strict=True, assign=is_meta)
    return model


def _hf_cache_dir() -> str:
    # Read the environment at call time (huggingface_hub reads it once, at import), so that
    # HF_HOME / HF_HUB_CACHE set by the GUI or a test after import take effect.
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return str(constants.HF_HUB_CACHE)


def _hf_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return env in ("1", "ON", "YES", "TRUE") or bool(constants.HF_HUB_OFFLINE)


def _unavailable(display: str, timm_name: str, repo_id: str, filename: str, cache_dir: str, reason: str) -> WeightsUnavailableError:
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(timm_name)
    url = getattr(cfg, "url", None) or ""
    folder = "models--" + repo_id.replace("/", "--")
    lines = [
        f"Pretrained weights for backbone {display!r} (timm model {timm_name!r}) are not available: {reason}.",
        "Get them in one of these ways:",
        f"  1. On a machine with internet, download Hugging Face repo '{repo_id}', file '{filename}':",
        f"         hf download {repo_id} {filename}",
        f"     (or: huggingface-cli download {repo_id} {filename}). It lands in the Hugging Face cache,",
        f"     here {cache_dir} ; set HF_HOME (or HF_HUB_CACHE) to use another folder, and to move it",
        f"     to an offline machine copy the folder '{folder}' into that machine's cache.",
        f"  2. Or download https://huggingface.co/{repo_id}/resolve/main/{filename} anywhere and pass it:",
        f"         extract_features(image, {display!r}, weights='/path/to/{filename}')",
    ]
    if url.endswith(".pth"):
        lines.append(f"     The original checkpoint works too: weights='/path/to/{url.rsplit('/', 1)[-1]}' ({url}).")
    lines.append("  3. For testing only: pretrained=False gives random weights (the features are then meaningless).")
    return WeightsUnavailableError("\n".join(lines), repo_id=repo_id, filename=filename, cache_dir=cache_dir)


def _hub_unreachable(timeout: float = 3.0) -> Optional[str]:
    """The hub's host name if a TCP connection to it fails within ``timeout`` seconds, else None.

    huggingface_hub retries an unreachable hub for about 25 s before giving up; one quick
    connection attempt turns that into an immediate, clear error for offline users.
    """
    import socket
    from urllib.parse import urlparse

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (443 if parsed.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError:
        return host


def _hf_weights(display: str, timm_name: str) -> Tuple[Path, str]:
    """Path of the pretrained file in the HF cache (downloading it if online) and its repo id."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(timm_name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        url = getattr(cfg, "url", None) if cfg is not None else None
        raise WeightsUnavailableError(
            f"timm has no Hugging Face weights for {timm_name!r}"
            + (f"; download {url} and pass it with weights='/path/to/file'" if url else "; pass a file with weights='/path/to/file'")
        )
    repo_id, _, revision = hub_id.partition("@")
    names = (cfg.hf_hub_filename,) if getattr(cfg, "hf_hub_filename", None) else _HF_FILES
    cache_dir = _hf_cache_dir()
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    # The cache first: no network round trip (an unreachable hub costs ~25 s of retries).
    for name in names:
        hit = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir, revision=revision or None)
        if isinstance(hit, str) and os.path.isfile(hit):
            return Path(hit), repo_id
    if _hf_offline():
        raise _unavailable(display, timm_name, repo_id, names[0], cache_dir, f"offline mode (HF_HUB_OFFLINE) and not in the cache {cache_dir}")
    host = _hub_unreachable()
    if host:
        raise _unavailable(display, timm_name, repo_id, names[0], cache_dir, f"{host} cannot be reached (no network?) and the file is not in the cache {cache_dir}")
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    last: Optional[BaseException] = None
    for name in names:
        try:
            got = hf_hub_download(repo_id, name, cache_dir=cache_dir, revision=revision or None)
            return Path(got), repo_id
        except LocalEntryNotFoundError as exc:  # no connection, not cached
            last = exc
            break
        except EntryNotFoundError as exc:  # the repo has no file of this name: try the next
            last = exc
            continue
        except Exception as exc:  # HTTP errors, gated repos, disk full ...
            last = exc
            break
    reason = f"the download failed ({type(last).__name__}: {str(last).splitlines()[0] if last and str(last) else ''})"
    raise _unavailable(display, timm_name, repo_id, names[0], cache_dir, reason) from last


_CACHE: "OrderedDict[tuple, Backbone]" = OrderedDict()
_CACHE_LOCK = threading.Lock()


def clear_model_cache() -> None:
    """Forget the cached models (frees their memory once nothing else holds them)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def load_backbone(
    backbone: str = "dinov2_vits14",
    *,
    weights: "str | os.PathLike | None" = None,
    pretrained: bool = True,
    device: "str | torch.device" = "auto",
) -> Backbone:
    """Create (or fetch from the cache) a backbone ready for :func:`extract_features`.

    Parameters
    ----------
    backbone : str
        A short DINOv2 name (:data:`DINOV2_BACKBONES`) or any timm ViT name.
    weights : path, optional
        A local ``.pth`` / ``.pt`` / ``.bin`` / ``.safetensors`` state dict in timm layout, or
        an original facebookresearch DINOv2 checkpoint (converted by timm). Always used when
        given, whatever ``pretrained`` says.
    pretrained : bool
        Without ``weights``: True takes timm's pretrained weights from the Hugging Face cache
        (downloading them when online), False gives a randomly initialised model (seed 0).
    device : "auto" | "cpu" | "cuda" | "cuda:N" | "mps"

    Returns
    -------
    Backbone
        The two most recently used backbones are cached, keyed by name, weights (path, size
        and modification time) and device.

    Raises
    ------
    WeightsUnavailableError
        Pretrained weights are neither cached nor downloadable; the message says what to do.
    FileNotFoundError
        ``weights`` does not exist.
    WeightsMismatchError
        The file does not fit the architecture.
    """
    dev = resolve_device(device)
    timm_name = resolve_backbone_name(backbone)
    if weights is not None:
        path = Path(os.fspath(weights)).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"weights={str(weights)!r}: no such file"
                + (" (it is a folder; give the weights file inside it)" if path.is_dir() else "")
            )
        path = path.resolve()
        st = path.stat()
        source = f"file:{path}"
        key = (timm_name, source, st.st_size, st.st_mtime_ns, str(dev))
    elif pretrained:
        path, repo_id = _hf_weights(backbone, timm_name)
        st = path.stat()
        source = f"hf-cache:{repo_id}"
        key = (timm_name, str(path), st.st_size, st.st_mtime_ns, str(dev))
    else:
        path = None
        source = "random-init"
        key = (timm_name, source, str(dev))
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
        if path is None:
            model = _create(timm_name, on_meta=False)
        else:
            model = _load_into(_create(timm_name, on_meta=True), path, timm_name)
        model = model.to(dev).eval().requires_grad_(False)
        bb = Backbone.from_module(model, name=timm_name, weights_source=source)
        _CACHE[key] = bb
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
        return bb


# ----------------------------------------------------------------------------------------
# Image preparation
# ----------------------------------------------------------------------------------------


def _to_numpy(image) -> np.ndarray:
    if isinstance(image, torch.Tensor):
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
            raise ValueError(f"channel_axis={channel_axis!r} was given but the image is 2D {tuple(arr.shape)}; leave channel_axis=None")
        return arr, None, False
    if channel_axis is not None:
        if not isinstance(channel_axis, numbers.Integral) or not -3 <= int(channel_axis) <= 2:
            raise ValueError(f"channel_axis={channel_axis!r}: use 0, 1, 2 or -1, -2, -3 for a 3D image")
        axis = int(channel_axis) % 3
        return np.moveaxis(arr, axis, -1), axis, False
    first, last = int(arr.shape[0]), int(arr.shape[2])
    axis = 2 if last <= first else 0
    n = arr.shape[axis]
    if n > _MAX_GUESSED_CHANNELS:
        raise ValueError(
            f"image has shape {tuple(arr.shape)}: no axis looks like channels (the smaller of the first "
            f"and last axes has {n} > {_MAX_GUESSED_CHANNELS} entries), so it is probably a z-stack or a "
            "time series; pass one 2D plane (e.g. image[z]), or set channel_axis= if it really is a "
            "multichannel image"
        )
    return (arr if axis == 2 else np.moveaxis(arr, 0, -1)), axis, True


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
        if isinstance(a, bool) or isinstance(b, bool) or not (isinstance(a, numbers.Integral) and isinstance(b, numbers.Integral)):
            raise TypeError
        a, b = int(a), int(b)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"input_size={input_size!r}: give None (the image size), an int (long side in pixels) "
            "or a pair of ints (H', W')"
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
            raise ValueError(
                f"overlap={overlap} tokens must be >= 0 and smaller than the window ({t} tokens along {axis})"
            )
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


# ----------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------


def _resolve_layer(layer, depth: int, name: str) -> int:
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
        raise TypeError(f"layer={layer!r}: give an int block index (negative counts from the end, -1 = last)")
    if not -depth <= int(layer) < depth:
        raise ValueError(f"layer={layer} is out of range for {name} ({depth} blocks): use 0..{depth - 1} or -{depth}..-1")
    return int(layer) % depth


def _check_one_patch(image_shape: Tuple[int, int], patch: Optional[Tuple[int, int]], name: str) -> None:
    (H, W), (ph, pw) = image_shape, patch or (1, 1)
    if H < ph or W < pw:
        raise ValueError(
            f"image is {H} x {W} pixels, smaller than one {ph} x {pw} patch of {name}; "
            "upsampling needs at least one whole patch"
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
    backbone: "str | Backbone | torch.nn.Module" = "dinov2_vits14",
    *,
    layer: int = -1,
    input_size: "int | Tuple[int, int] | None" = None,
    weights: "str | os.PathLike | None" = None,
    pretrained: bool = True,
    device: "str | torch.device" = "auto",
    max_memory: Budget = None,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelFn] = None,
    normalize: Normalize = "auto",
    channel_axis: Optional[int] = None,
    window: WindowSpec = None,
    overlap: "int | float" = 0.25,
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
        variants, any timm ViT name, a :class:`Backbone` from :func:`load_backbone`, or a timm
        ViT created with ``dynamic_img_size=True`` (for these two, ``weights``,
        ``pretrained`` and ``device`` are not used: the model runs where it is).
    layer : int
        Block whose output is returned; -1 (default) is the last. The final norm is applied
        to every layer (DINOv2's ``get_intermediate_layers(norm=True)``).
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
        Channel axis of a 3D image; None guesses it (module docstring).
    window : None, int or (th, tw)
        Window size in tokens. None: the largest that fits ``max_memory`` (one pass when the
        whole grid fits). An explicit window is used as given, whatever ``max_memory`` says.
    overlap : float or int
        Overlap of neighbouring windows: a float in [0, 0.5) is a fraction of the window
        side, an int is tokens. Blended with linear ramps.

    Returns
    -------
    FeatureMap
        ``features`` (C, h, w) float32 on the CPU, with ``h = max(1, round(H'/p))``,
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
    idx = _resolve_layer(layer, depth, bb.name)

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

    C = bb.embed_dim
    ramps = _ramps_for(windows) if len(windows) > 1 else None
    acc = torch.zeros(C, h, w, dtype=torch.float32)
    den = torch.zeros(h, w, dtype=torch.float64) if ramps is not None else None
    for k, (i0, i1, j0, j1) in enumerate(windows):
        check_cancel(cancel, "feature extraction")
        crop = x[:, :, i0 * ph : i1 * ph, j0 * pw : j1 * pw].to(dev)
        with torch.inference_mode(), _cancel_between_blocks(bb.model, cancel):
            out = bb.model.forward_intermediates(
                crop,
                indices=[idx],
                norm=True,
                stop_early=True,
                output_fmt="NCHW",
                intermediates_only=True,
            )[0]
        feats = out[0].to("cpu", torch.float32)
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
        layer=idx,
        num_layers=depth,
        preprocessing=info,
    )
