"""ViT backbones for :func:`.features.extract_features`: names, timm models, weights, cache.

:func:`load_backbone` turns a short DINOv2 / DINOv3 name (:data:`BACKBONES`) or any timm ViT
name into a ready-to-run :class:`Backbone` (eval mode, no gradients):

* ``weights=FILE``: a local state dict in timm layout, or an original facebookresearch
  DINOv2 / DINOv3 checkpoint (timm's converters); a file that does not fit the architecture raises
  :class:`WeightsMismatchError`.
* ``pretrained=True``: timm's pretrained weights from the Hugging Face cache, downloaded
  when online; offline with nothing cached, :class:`WeightsUnavailableError` says what to
  download and where.
* ``pretrained=False``: random initialisation with a fixed seed (reproducible, and only
  useful to check the mechanics).

The two most recently used backbones are kept in memory (:func:`clear_model_cache` drops them).

DINOv3 (timm's ``vit_*_patch16_dinov3``, an ``Eva`` model) has 16-pixel patches, one class
token and four register tokens (``num_prefix_tokens = 5``, dropped by the extractor) and rotary
position embeddings, whose tables are non-persistent buffers computed at construction: a
model built on the meta device gets them recomputed after its weights are loaded
(:func:`_materialise_buffers`), so loading a ViT-L file never pays for a random initialisation.
"""

from __future__ import annotations

import difflib
import os
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from .device import resolve_device
from .platform_fixes import preload_triton_safely

__all__ = [
    "BACKBONES",
    "DINOV2_BACKBONES",
    "DINOV3_BACKBONES",
    "Backbone",
    "WeightsMismatchError",
    "WeightsUnavailableError",
    "clear_model_cache",
    "load_backbone",
    "resolve_backbone_name",
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

#: DINOv3 ViTs (patch 16, 4 register tokens, rotary positions) -> timm names with the pretrained tag.
DINOV3_BACKBONES: Dict[str, str] = {
    "dinov3_vits16": "vit_small_patch16_dinov3.lvd1689m",
    "dinov3_vits16plus": "vit_small_plus_patch16_dinov3.lvd1689m",
    "dinov3_vitb16": "vit_base_patch16_dinov3.lvd1689m",
    "dinov3_vitl16": "vit_large_patch16_dinov3.lvd1689m",
}

#: Every short name :func:`load_backbone` accepts.
BACKBONES: Dict[str, str] = {**DINOV2_BACKBONES, **DINOV3_BACKBONES}

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_HF_FILES = ("model.safetensors", "pytorch_model.bin")  # the order timm itself tries
_CACHE_SIZE = 2
_RANDOM_SEED = 0
_WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights are neither in the Hugging Face cache nor downloadable now.

    Attributes ``repo_id``, ``filename`` and ``cache_dir`` say what to download and where it
    is looked for; the message gives the commands.
    """

    def __init__(
        self, message: str, repo_id: Optional[str] = None, filename: Optional[str] = None, cache_dir: Optional[str] = None
    ):
        super().__init__(message)
        self.repo_id = repo_id
        self.filename = filename
        self.cache_dir = cache_dir


class WeightsMismatchError(ValueError):
    """A weights file does not fit the chosen architecture (missing, extra or mis-shaped keys)."""


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
    def from_module(cls, model: torch.nn.Module, name: Optional[str] = None, weights_source: str = "user-model") -> Backbone:
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
    """timm model name (with its pretrained tag) for a short DINOv2 / DINOv3 name or any timm ViT name.

    ``"dinov2_vits14"`` -> ``"vit_small_patch14_dinov2.lvd142m"``, ``"dinov3_vits16"`` ->
    ``"vit_small_patch16_dinov3.lvd1689m"``; an untagged timm name gets
    timm's default pretrained tag. Unknown names raise a ValueError listing the short names.
    """
    preload_triton_safely()  # before timm -> torchvision -> torch._dynamo -> triton
    import timm
    from timm.models import get_pretrained_cfg, split_model_name_tag

    if not isinstance(backbone, str) or not backbone.strip():
        raise TypeError(f"backbone={backbone!r}: give a model name such as 'dinov2_vits14'")
    key = backbone.strip()
    if key.lower() in BACKBONES:
        return BACKBONES[key.lower()]
    arch, tag = split_model_name_tag(key)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(key, list(BACKBONES) + timm.list_models("vit*"), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"backbone={backbone!r} is not a known model.{hint} Use one of "
            f"{', '.join(BACKBONES)}, or a timm ViT name such as "
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
            # Buffers computed at construction (e.g. rotary tables) are not in a state dict;
            # they are recomputed after loading (_materialise_buffers), or, for modules that
            # cannot recompute them, the model is built for real.
            if not _can_materialise(model):
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


_BUFFER_INITS = ("init_non_persistent_buffers", "_init_buffers")


def _meta_buffer_owners(model: torch.nn.Module):
    """Modules that directly own a buffer on the meta device."""
    return [m for m in model.modules() if any(b is not None and b.is_meta for b in m._buffers.values())]


def _can_materialise(model: torch.nn.Module) -> bool:
    """Whether every module owning a (meta) buffer can recompute it (timm's buffer init hooks)."""
    return all(any(callable(getattr(m, n, None)) for n in _BUFFER_INITS) for m in _meta_buffer_owners(model))


def _materialise_buffers(model: torch.nn.Module) -> None:
    """Give the buffers still on the meta device (non-persistent, not in the file) real CPU
    storage and recompute them with the module's own init hook (timm's
    ``init_non_persistent_buffers`` / ``_init_buffers``): the values a real construction gives."""
    for m in _meta_buffer_owners(model):
        for name, b in list(m._buffers.items()):
            if b is not None and b.is_meta:
                m._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device="cpu")
        hook = next(getattr(m, n) for n in _BUFFER_INITS if callable(getattr(m, n, None)))
        with torch.no_grad():
            hook()


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
            f"weights={str(path)!r} does not contain a state dict of tensors; save one with torch.save(model.state_dict(), path)"
        )
    for prefix in ("module.", "backbone."):
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return obj


def _short(items: Sequence[str], n: int = 6) -> str:
    items = list(items)
    return ", ".join(items[:n]) + (f" ... (+{len(items) - n} more)" if len(items) > n else "")


_ARCH_HINT = (
    "Choose the backbone the file was trained for (e.g. a ViT-B file needs 'dinov2_vitb14', "
    "a file with register tokens needs a '_reg' backbone, a DINOv3 file a 'dinov3_' one)."
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
                f"({type(exc).__name__}: {exc}); is it a checkpoint of this architecture? " + _ARCH_HINT
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
            f"weights={str(path)!r} does not match the architecture {timm_name}: " + "; ".join(parts) + ". " + _ARCH_HINT
        )
    state = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()}
    is_meta = any(p.is_meta for p in model.parameters())
    model.load_state_dict(state, strict=True, assign=is_meta)
    if is_meta:
        _materialise_buffers(model)
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


def _unavailable(
    display: str, timm_name: str, repo_id: str, filename: str, cache_dir: str, reason: str
) -> WeightsUnavailableError:
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

    huggingface_hub retries an unreachable hub for many seconds before giving up; one quick
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
            + (
                f"; download {url} and pass it with weights='/path/to/file'"
                if url
                else "; pass a file with weights='/path/to/file'"
            )
        )
    repo_id, _, revision = hub_id.partition("@")
    names = (cfg.hf_hub_filename,) if getattr(cfg, "hf_hub_filename", None) else _HF_FILES
    cache_dir = _hf_cache_dir()
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    # The cache first: no network round trip (an unreachable hub costs many seconds of retries).
    for name in names:
        hit = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir, revision=revision or None)
        if isinstance(hit, str) and os.path.isfile(hit):
            return Path(hit), repo_id
    if _hf_offline():
        raise _unavailable(
            display, timm_name, repo_id, names[0], cache_dir, f"offline mode (HF_HUB_OFFLINE) and not in the cache {cache_dir}"
        )
    host = _hub_unreachable()
    if host:
        raise _unavailable(
            display,
            timm_name,
            repo_id,
            names[0],
            cache_dir,
            f"{host} cannot be reached (no network?) and the file is not in the cache {cache_dir}",
        )
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


_CACHE: OrderedDict[tuple, Backbone] = OrderedDict()
_CACHE_LOCK = threading.Lock()


def clear_model_cache() -> None:
    """Forget the cached models (frees their memory once nothing else holds them)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def load_backbone(
    backbone: str = "dinov2_vits14",
    *,
    weights: str | os.PathLike | None = None,
    pretrained: bool = True,
    device: str | torch.device = "auto",
) -> Backbone:
    """Create (or fetch from the cache) a backbone ready for :func:`extract_features`.

    Parameters
    ----------
    backbone : str
        A short DINOv2 / DINOv3 name (:data:`BACKBONES`) or any timm ViT name.
    weights : path, optional
        A local ``.pth`` / ``.pt`` / ``.bin`` / ``.safetensors`` state dict in timm layout, or
        an original facebookresearch DINOv2 / DINOv3 checkpoint (converted by timm). Always used when
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
