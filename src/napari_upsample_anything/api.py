"""Public API: ``fit_kernels``, ``render``, ``upsample``, ``pca_rgb``, ``render_pca``.

``extract_features`` lives in :mod:`.core.features` (it validates its own inputs) and is
re-exported by the package.

These functions validate and convert inputs (numpy or torch, channels-last guides, 2D or
3D maps), resolve device / precision / memory budget once, and call the core. They hold no
computing logic of their own.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np
import torch

from .core.checks import check_choice, check_finite_array, check_float, check_int, check_int_pair, check_tensor_usable
from .core.device import resolve_device, resolve_precision
from .core.engine.blocks import BlockEngine, RenderOptions
from .core.field import MAX_ALPHA, MAX_RADIUS, MAX_STEPS, FitOptions, KernelField
from .core.fit import PUBLISHED_LR, PUBLISHED_STEPS, fit_field
from .core.guide import Guide, Normalize, _as_array, channels_last
from .core.memory import MemoryLog, default_budget, parse_bytes
from .core.progress import CancelFn, ProgressFn
from .core.published import FIT_DOWNSAMPLE
from .core.render import render_field

ArrayLike = Union[np.ndarray, torch.Tensor]
Budget = Union[int, float, str, None]


def _budget(max_memory: Budget, device: torch.device) -> int:
    nbytes = parse_bytes(max_memory)
    return default_budget(device) if nbytes is None else nbytes


def _lr_map(lr_map, name: str = "lr_map") -> Tuple[torch.Tensor, bool]:
    """(C, h, w) float32 tensor from a (C, h, w) / (h, w) numpy array or tensor; + was-numpy flag."""
    is_numpy = not isinstance(lr_map, torch.Tensor)
    if is_numpy:
        if not hasattr(lr_map, "__array__"):
            raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(lr_map).__name__}")
        arr = np.asarray(lr_map)
        if arr.dtype == bool:
            arr = arr.astype(np.float32)
        if not (np.issubdtype(arr.dtype, np.number)) or np.issubdtype(arr.dtype, np.complexfloating):
            raise TypeError(f"{name} has dtype {arr.dtype}; give a real-valued map")
        with np.errstate(over="ignore"):  # beyond float32 range becomes Inf: refused below
            t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    else:
        check_tensor_usable(lr_map, name)
        t = lr_map.detach().to(torch.float32)
    if t.ndim == 2:
        t = t[None]
    if t.ndim != 3:
        raise ValueError(f"{name} must be (C, h, w) or (h, w), got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    check_finite_array(t, name)  # after the float32 cast: 1e300 is finite before it
    return t, is_numpy


def _check_scale(lr_shape: Tuple[int, int], hr_shape: Tuple[int, int], what: str) -> None:
    h, w = lr_shape
    H, W = hr_shape
    if h < 1 or w < 1:
        raise ValueError(f"{what} (h, w) = {lr_shape} must be at least 1 x 1")
    if h > H or w > W:
        raise ValueError(
            f"{what} (h, w) = {lr_shape} is larger than the guide (H, W) = {hr_shape}: the scale "
            f"H/h, W/w must be >= 1. Maps are channels-first (C, h, w); for a channels-last "
            "(h, w, C) map use np.moveaxis(m, -1, 0)"
        )


def _options(radius: int, alpha: float, border: str, radius_units: str) -> RenderOptions:
    return RenderOptions(
        radius=check_int(radius, "radius", minimum=0, maximum=MAX_RADIUS, hint="published: 8"),
        alpha=check_float(alpha, "alpha", positive=True, maximum=MAX_ALPHA, hint="published: 2"),
        border=check_choice(border, "border", ("repeat", "unique")),
        radius_units=check_choice(radius_units, "radius_units", ("hr", "lr")),
    )


def render_options(
    field: KernelField,
    radius: Optional[int] = None,
    alpha: Optional[float] = None,
    border: Optional[str] = None,
    radius_units: Optional[str] = None,
) -> RenderOptions:
    """The method options to render ``field`` with: those it was fitted with
    (``field.options``; the published defaults for fields without options), each replaced by
    the argument when that is not None."""
    base = field.options.render_kwargs() if field.options is not None else RenderOptions().__dict__.copy()
    given = dict(radius=radius, alpha=alpha, border=border, radius_units=radius_units)
    base.update({k: v for k, v in given.items() if v is not None})
    return _options(**base)


def fitted_guide(
    field: KernelField,
    guide: ArrayLike,
    *,
    normalize: Optional[Normalize] = None,
    guide_smoothing: Optional[float] = None,
    channel_axis: Optional[int] = None,
) -> Guide:
    """``guide`` normalised, smoothed and laid out as for ``field``'s fit (each None
    argument: the field's recorded option; ``"auto"``, 0 and None for fields without options)."""
    fitted = field.options
    if normalize is None:
        normalize = fitted.normalize if fitted is not None else "auto"
    if guide_smoothing is None:
        guide_smoothing = fitted_smoothing(field)
    if channel_axis is None and fitted is not None and getattr(guide, "ndim", None) == 3:
        channel_axis = fitted.channel_axis
    return Guide(guide, normalize, smoothing=guide_smoothing, channel_axis=channel_axis)


def check_guide_channels(field: KernelField, channels: int) -> None:
    """Refuse a guide whose number of channels differs from the one ``field`` was fitted on:
    its range kernels (``sigma_r``) measure colour distances between that many channels."""
    fitted = field.options.guide_channels if field.options is not None else None
    if fitted is not None and int(channels) != int(fitted):
        raise ValueError(
            f"the guide has {channels} channel(s) but the kernels were fitted on a guide of {fitted} channel(s); "
            "render with a guide made of the same channels as the fit's (the same image and --channels / channel_axis), or refit"
        )


def _check_out(out, shape: Tuple[int, int, int], values: torch.Tensor, lr_was_numpy: bool, agg: torch.dtype):
    """Refuse an ``out`` buffer the render would silently wrap, truncate or not fill."""
    if isinstance(out, torch.Tensor):
        if out.device.type == "meta":
            raise TypeError("out is a tensor on the 'meta' device, which holds no values; give a real buffer")
        if out.dtype not in (torch.float16, torch.float32, torch.float64):
            raise TypeError(f"out has dtype {out.dtype}; give a float16, float32 or float64 buffer")
        if not lr_was_numpy and out.device != values.device:
            raise TypeError(f"out is on {out.device} but lr_map is on {values.device}; give out on lr_map's device")
        is_half = out.dtype == torch.float16
    elif isinstance(out, np.ndarray):
        if out.dtype not in (np.float16, np.float32, np.float64):
            raise TypeError(
                f"out has dtype {out.dtype}; give a float16, float32 or float64 array (other dtypes "
                "would wrap or truncate the values)"
            )
        if not out.flags.writeable:
            raise ValueError("out is read-only; give a writable array (e.g. a memmap opened with mode='w+')")
        is_half = out.dtype == np.float16
    elif hasattr(out, "__setitem__") and hasattr(out, "shape") and hasattr(out, "dtype"):
        # Array-like sinks (a zarr array, a writer that consumes tiles as they come): the
        # engine only ever assigns float32 tiles to out[:, y0:y1, x0:x1].
        try:
            dtype = np.dtype(out.dtype)
        except TypeError as exc:
            raise TypeError(f"out has dtype {out.dtype!r}; give a float16, float32 or float64 array") from exc
        if dtype not in (np.float16, np.float32, np.float64):
            raise TypeError(f"out has dtype {dtype}; give a float16, float32 or float64 array")
        is_half = dtype == np.float16
    else:
        raise TypeError(
            "out must be a numpy array (or memmap), a torch tensor, or an array-like sink with shape, dtype "
            f"and out[:, y0:y1, x0:x1] = tile assignment (e.g. a zarr array), got {type(out).__name__}"
        )
    if tuple(out.shape) != shape:
        raise ValueError(f"out has shape {tuple(out.shape)}; it must be (C, H, W) = {shape}")
    if is_half and float(values.abs().max()) > 65504.0:
        raise ValueError(
            "out is float16 but lr_map has values beyond 65504 (float16's largest), which would become Inf; give a float32 out"
        )


def _half_precision_affine(values: torch.Tensor, agg: torch.dtype):
    """``(normalised values, (scale [C], shift [C]))`` for a half-precision render, else ``(values, None)``.

    The render is affine-equivariant (every pixel's weights sum to one), so centring and
    scaling each channel to [-1, 1] before the float16 / bfloat16 product and undoing it on
    the output is exact up to rounding, and keeps any finite map (uint16 values up to 65535,
    depth in millimetres) inside the half-precision range.
    """
    if agg in (torch.float32, torch.float64):
        return values, None
    v = values.to(torch.float64)
    lo = v.amin(dim=(1, 2))
    hi = v.amax(dim=(1, 2))
    shift = (lo + hi) / 2
    scale = (hi - lo) / 2
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    normalised = ((v - shift[:, None, None]) / scale[:, None, None]).to(torch.float32)
    return normalised, (scale.to(torch.float32), shift.to(torch.float32))


def fit_kernels(
    guide: ArrayLike,
    lr_shape: Tuple[int, int],
    *,
    steps: int = PUBLISHED_STEPS,
    lr: float = PUBLISHED_LR,
    radius: int = 8,
    alpha: float = 2.0,
    border: str = "repeat",
    radius_units: str = "hr",
    device: str | torch.device = "auto",
    precision: str | torch.dtype = "auto",
    max_memory: Budget = None,
    normalize: Normalize = "auto",
    guide_smoothing: float = 0.0,
    downsample: str = "bicubic",
    channel_axis: Optional[int] = None,
    init: Optional[KernelField] = None,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelFn] = None,
    seed: Optional[int] = None,
    memory_log: Optional[MemoryLog] = None,
    threads: Optional[int] = None,
    backend: str = "auto",
    fit_fraction: float = 1.0,
    fit_precision: str | torch.dtype = "fp32",
) -> KernelField:
    """Fit the GSJBU kernel field on ``guide`` for an LR grid of ``lr_shape`` (test-time optimisation).

    Parameters
    ----------
    guide : (H, W) or (H, W, G) array or tensor
        The high-resolution image, channels-last. Normalised by ``normalize`` (uint8 / 255 by
        default; see :mod:`napari_upsample_anything.core.guide`). A 3-D guide other than gray /
        RGB / RGBA channels-last (last axis 1, 3 or 4) needs ``channel_axis``.
    lr_shape : (h, w)
        Size of the low-resolution maps the field will upsample (e.g. the ViT patch grid).
        Any ``H/h, W/w >= 1``, integer or not.
    steps : int
        Adam updates. The default (51) reproduces the published loop ("50 steps").
    lr : float
        Initial learning rate (published: 0.1), decayed by ``(1e-9/lr)^(t/5100)``.
    radius, alpha, border, radius_units :
        Method options; defaults reproduce the published code (see ``RenderOptions``).
    device : "auto" | "cpu" | "cuda" | "cuda:N" | "mps"
    precision : "auto" | "fp32" | "fp16" | "bf16"
        Dtype of the eager path's weights-times-values products (the render's choice, which
        callers pass on). Log-weights, softmax and gradients are float32 always; the fit's
        own half precision is ``fit_precision``.
    max_memory : bytes, "2GB", "512MiB" or None
        Working-memory budget (inputs and outputs not counted). None: 60% of free GPU memory,
        or 40% of available RAM (at most 8 GiB) on CPU.
    guide_smoothing : float
        Gaussian sigma (HR pixels) applied to the normalised guide before fitting; recorded in
        ``field.meta``, so :func:`render` smooths the same way. 0 (default, published) is off. For noisy
        guides, the method's known weakness: at noise sigma 20/255, 2 px raised label-map mIoU
        from 79.3 to 90.0 %; on clean guides it costs (-3.4 points), so leave it off there
        (docs/quality_options.md).
    downsample : "bicubic" | "area"
        How the fit's LR input is made from the guide: published non-antialiased bicubic
        (default), or the average of each cell's pixels (closer to how a ViT token summarises
        its patch). Measured on clean guides: +1.9 dB on maps made by averaging, -2.3 dB on
        point-sampled maps (docs/quality_options.md).
    channel_axis : int, optional
        Channel axis of a 3-D guide (0 for (C, H, W), -1 for (H, W, C)). Needed whenever the
        layout is ambiguous (anything but gray / RGB / RGBA channels-last); never guessed.
    init : KernelField, optional
        Start from this field instead of the published initial one.
    progress : callable(done, total, info), optional
        Called after every step with ``info = {"stage": "fit", "loss": ...}``.
    cancel : callable() -> bool, optional
        Polled before every step and tile; True raises :class:`Cancelled`.
    seed : int, optional
        Seeds torch's RNG. The fit itself is deterministic; this is for reproducible callers.
    memory_log : MemoryLog, optional
        Receives one record per processed tile (bytes and time).
    threads : int, optional
        CPU threads for this call (None: torch's setting, ``OMP_NUM_THREADS``; docs/benchmarks.md).
    backend : "auto" | "triton" | "compiled" | "eager"
        Hand-written Triton kernels (CUDA; "auto" picks them there, docs/gpu.md), fused
        ``torch.compile`` kernels or plain tensor operations (same results; docs/engine.md).
    fit_fraction : float in (0, 1]
        Optional stochastic fit: each step uses a fresh random fraction of the pixels (whole
        LR cells; drawn with ``seed``, 0 when None), so a step costs about that fraction.
        1 (default) is the exact, published fit. Measured speed and quality:
        docs/quality_stochastic.md.
    fit_precision : "fp32" | "fp16" | "bf16" | "auto"
        Mixed-precision fit: "fp16" / "bf16" compute the per-pair products after the
        log-weights (softmax weights, d loss / d log-weight, gradient products) in half
        precision; log-weights, exp, every sum, the loss and the parameters stay float32; fp16
        uses loss scaling. Triton kernel with ``backend="triton"`` (CUDA), torch operations
        otherwise (on the CPU 6-70x slower than the float32 C kernel: for measurement).
        "fp32" (default) and "auto": the float32 fit (auto stays float32 until a GPU
        measures the mixed fit equal; docs/mixed_precision.md). Separate from ``precision``
        because pipelines pass the render's precision to the fit too.

    Returns
    -------
    KernelField
        ``(h, w)`` maps; ``field.options`` (:class:`FitOptions`) records how it was fitted
        (render uses the same options by default); ``field.meta`` holds the loss per step,
        final loss, PSNR and time.

    Raises
    ------
    TypeError, ValueError
        A bad argument (the message names it).
    FitDivergedError
        The loss or the kernel parameters became NaN / Inf (learning rate too large, or a
        degenerate guide normalisation); never a field full of NaN.
    """
    # Cheap argument checks first, then the guide (which may be large).
    lr_shape = check_int_pair(lr_shape, "lr_shape")
    steps = check_int(steps, "steps", minimum=0, maximum=MAX_STEPS, hint="published: 51")
    lr = check_float(lr, "lr", positive=True, hint="the learning rate; published: 0.1")
    if seed is not None:
        seed = check_int(seed, "seed", minimum=-(2**63), maximum=2**64 - 1)
    fit_fraction = check_float(fit_fraction, "fit_fraction", positive=True, maximum=1.0, hint="1 is the exact fit")
    options = _options(radius, alpha, border, radius_units)
    downsample = check_choice(downsample, "downsample", FIT_DOWNSAMPLE)
    if init is not None and not isinstance(init, KernelField):
        raise TypeError(f"init must be a KernelField, got {type(init).__name__}")
    dev = resolve_device(device)
    agg = resolve_precision(precision, dev)
    fit_dtype = _fit_dtype(fit_precision, dev)
    budget = _budget(max_memory, dev)
    g = Guide(guide, normalize, smoothing=guide_smoothing, channel_axis=channel_axis)
    _check_scale(lr_shape, g.shape, "lr_shape")
    fit_options = FitOptions(
        **options.__dict__,
        guide_smoothing=g.smoothing,
        downsample=downsample,
        normalize=tuple(normalize) if isinstance(normalize, (tuple, list)) else normalize,
        channel_axis=channel_axis,
        hr_shape=g.shape,
        lr_shape=lr_shape,
        guide_channels=g.channels,
        lr=lr,
        steps=steps,
    )
    if init is not None:
        init.validate(lr_shape, "init")
    if seed is not None:
        torch.manual_seed(seed)
    field = fit_field(
        g,
        lr_shape,
        steps=steps,
        lr=lr,
        options=options,
        device=dev,
        budget=budget,
        init=init,
        progress=progress,
        cancel=cancel,
        memlog=memory_log,
        agg_dtype=agg,
        downsample=downsample,
        backend=backend,
        threads=threads,
        fit_fraction=fit_fraction,
        fit_seed=0 if seed is None else seed,
        fit_dtype=fit_dtype,
    )
    field.options = fit_options
    return field


def _fit_dtype(fit_precision, device: torch.device) -> torch.dtype:
    """Dtype of the fit's per-pair products (``fit_precision``): "auto" is float32 on every
    device until a GPU measurement shows the mixed-precision fit equal (docs/mixed_precision.md)."""
    if isinstance(fit_precision, str) and fit_precision.strip().lower() == "auto":
        return torch.float32
    try:
        return resolve_precision(fit_precision, device)
    except (TypeError, ValueError) as exc:
        raise type(exc)(str(exc).replace("precision=", "fit_precision=", 1)) from None


def fitted_smoothing(field: KernelField) -> float:
    """The guide smoothing sigma (HR pixels) ``field`` was fitted with; 0 if it does not say."""
    if field.options is not None:
        return field.options.guide_smoothing
    return check_float(field.meta.get("guide_smoothing", 0.0) or 0.0, "field.meta['guide_smoothing']", minimum=0.0)


def render(
    lr_map: ArrayLike,
    guide: ArrayLike,
    field: KernelField,
    *,
    radius: Optional[int] = None,
    alpha: Optional[float] = None,
    border: Optional[str] = None,
    radius_units: Optional[str] = None,
    device: str | torch.device = "auto",
    precision: str | torch.dtype = "auto",
    max_memory: Budget = None,
    normalize: Optional[Normalize] = None,
    guide_smoothing: Optional[float] = None,
    channel_axis: Optional[int] = None,
    allow_resized_guide: bool = False,
    out: Optional[ArrayLike] = None,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelFn] = None,
    memory_log: Optional[MemoryLog] = None,
    threads: Optional[int] = None,
    backend: str = "auto",
) -> ArrayLike:
    """Upsample ``lr_map`` to the guide's resolution with a fitted kernel field.

    Parameters
    ----------
    lr_map : (C, h, w) or (h, w) array or tensor
        Any low-resolution map on the field's grid: features, probabilities, depth.
    guide : (H, W) or (H, W, G) array or tensor
        The image the field was fitted on (same normalisation rule).
    field : KernelField
        From :func:`fit_kernels` (or :meth:`KernelField.load`), shape ``(h, w)``.
    radius, alpha, border, radius_units, normalize, guide_smoothing, channel_axis :
        None (default): what the field was fitted with (``field.options``; the published
        defaults, ``"auto"`` and 0 for fields without options), so kernels always meet the
        guide and footprint they were fitted with. A value overrides it.
    allow_resized_guide : bool
        The guide must have the (H, W) the field was fitted on (``field.options.hr_shape``);
        True renders on a guide of another size anyway (the kernels' sigmas are in the fit's
        HR pixels).
    out : float16/32/64 array or tensor (C, H, W), optional
        Written in place (e.g. a ``numpy.memmap`` for outputs larger than RAM) and returned.
        A torch ``out`` must be on ``lr_map``'s device (when ``lr_map`` is a tensor).
    precision : "auto" | "fp32" | "fp16" | "bf16"
        Half precisions centre and scale every channel to [-1, 1] before the product and undo
        it on the output (exact up to rounding: the weights sum to one), so any finite map works.
    Other parameters: as in :func:`fit_kernels`. ``progress`` is called once per tile with
    ``done``/``total`` counted in LR cells.

    Returns
    -------
    (C, H, W) float32, numpy if ``lr_map`` was numpy, else a torch tensor on ``lr_map``'s
    device (2D maps come back as ``(1, H, W)``).
    """
    values, was_numpy = _lr_map(lr_map)
    if not isinstance(field, KernelField):
        raise TypeError(f"field must be a KernelField, got {type(field).__name__}")
    if not isinstance(allow_resized_guide, (bool, np.bool_)):
        raise TypeError(f"allow_resized_guide={allow_resized_guide!r}: give True or False")
    options = render_options(field, radius, alpha, border, radius_units)
    dev = resolve_device(device)
    agg = resolve_precision(precision, dev)
    budget = _budget(max_memory, dev)
    g = fitted_guide(field, guide, normalize=normalize, guide_smoothing=guide_smoothing, channel_axis=channel_axis)
    C, h, w = values.shape
    _check_scale((h, w), g.shape, "lr_map")
    field.validate((h, w), "field")
    check_guide_channels(field, g.channels)
    fitted_hr = field.options.hr_shape if field.options is not None else None
    if fitted_hr is not None and tuple(g.shape) != tuple(fitted_hr) and not allow_resized_guide:
        raise ValueError(
            f"guide is {g.shape[0]} x {g.shape[1]} but the field was fitted on a {fitted_hr[0]} x {fitted_hr[1]} "
            "guide; render with the image the field was fitted on, refit, or pass allow_resized_guide=True"
        )
    H, W = g.shape
    if out is None:
        out = np.empty((C, H, W), np.float32) if was_numpy else torch.empty((C, H, W), dtype=torch.float32, device=values.device)
    else:
        _check_out(out, (C, H, W), values, was_numpy, agg)
    values, affine = _half_precision_affine(values, agg)
    engine = BlockEngine(g, (h, w), options, dev)
    render_field(
        engine,
        values.to(dev),
        field.to(dev),
        out,
        agg_dtype=agg,
        budget=budget,
        progress=progress,
        cancel=cancel,
        memlog=memory_log,
        affine=None if affine is None else tuple(a.to(dev) for a in affine),
        backend=backend,
        threads=threads,
    )
    return out


def upsample(
    guide: ArrayLike,
    lr_map: ArrayLike,
    *,
    steps: int = PUBLISHED_STEPS,
    lr: float = PUBLISHED_LR,
    radius: int = 8,
    alpha: float = 2.0,
    border: str = "repeat",
    radius_units: str = "hr",
    device: str | torch.device = "auto",
    precision: str | torch.dtype = "auto",
    max_memory: Budget = None,
    normalize: Normalize = "auto",
    guide_smoothing: float = 0.0,
    downsample: str = "bicubic",
    channel_axis: Optional[int] = None,
    out: Optional[ArrayLike] = None,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelFn] = None,
    seed: Optional[int] = None,
    memory_log: Optional[MemoryLog] = None,
    return_field: bool = False,
    threads: Optional[int] = None,
    backend: str = "auto",
    fit_fraction: float = 1.0,
    fit_precision: str | torch.dtype = "fp32",
):
    """Fit the kernels on ``guide`` and upsample ``lr_map`` with them, in one call.

    ``hr = upsample(image, features)`` is to GSJBU what ``cv2.resize`` is to bilinear.
    Parameters as in :func:`fit_kernels` and :func:`render`; ``progress`` receives
    ``info["stage"]`` = ``"fit"`` then ``"render"``. With ``return_field=True`` returns
    ``(hr, field)``.
    """
    values, was_numpy = _lr_map(lr_map)
    if out is not None:  # refuse a bad buffer before the fit, not after it
        layout, _, _ = channels_last(_as_array(guide, "guide"), channel_axis)
        H, W = int(layout.shape[0]), int(layout.shape[1])
        _check_out(out, (int(values.shape[0]), H, W), values, was_numpy, torch.float32)
    field = fit_kernels(
        guide,
        tuple(values.shape[-2:]),
        steps=steps,
        lr=lr,
        radius=radius,
        alpha=alpha,
        border=border,
        radius_units=radius_units,
        device=device,
        precision=precision,
        max_memory=max_memory,
        normalize=normalize,
        guide_smoothing=guide_smoothing,
        downsample=downsample,
        channel_axis=channel_axis,
        progress=progress,
        cancel=cancel,
        seed=seed,
        memory_log=memory_log,
        threads=threads,
        backend=backend,
        fit_fraction=fit_fraction,
        fit_precision=fit_precision,
    )
    hr = render(
        lr_map,
        guide,
        field,
        radius=radius,
        alpha=alpha,
        border=border,
        radius_units=radius_units,
        device=device,
        precision=precision,
        max_memory=max_memory,
        normalize=normalize,
        guide_smoothing=guide_smoothing,
        channel_axis=channel_axis,
        out=out,
        progress=progress,
        cancel=cancel,
        memory_log=memory_log,
        threads=threads,
        backend=backend,
    )
    return (hr, field) if return_field else hr


def pca_rgb(
    features: ArrayLike, *, basis=None, fit_on: Optional[ArrayLike] = None, max_samples: Optional[int] = 100_000, seed: int = 0
):
    """3-component PCA of a ``(C, ...)`` feature map as an RGB image in [0, 1].

    Parameters
    ----------
    features : (C, h, w) or (C, H, W)
        The map to colour.
    basis : PCABasis, optional
        Reuse a basis (e.g. the LR one, so LR and HR pictures share colours).
    fit_on : (C, ...), optional
        Fit the basis on this map instead (the paper fits on the LR features).
    max_samples : int or None
        Fit on a seeded random subsample of at most this many positions.

    Returns
    -------
    rgb : (..., 3) float32 in [0, 1]
    basis : PCABasis
    """
    from .core.pca import fit_pca

    if basis is None:
        basis = fit_pca(features if fit_on is None else fit_on, 3, max_samples, seed)
    return basis.to_rgb(basis.project(features)), basis


def render_pca(lr_map: ArrayLike, guide: ArrayLike, field: KernelField, *, basis=None, seed: int = 0, **render_kwargs):
    """HR PCA picture without rendering all channels (exact shortcut).

    Projects ``lr_map`` on the PCA basis (fitted on ``lr_map`` itself unless given), renders
    the 3 projections, and colours them: the same image as ``pca_rgb(render(lr_map, ...),
    basis=basis)`` to float precision, because the render commutes with affine maps.

    Returns ``(rgb (H, W, 3) float32, basis)``. ``render_kwargs`` go to :func:`render`.
    """
    from .core.pca import fit_pca

    values, _ = _lr_map(lr_map)
    if basis is None:
        basis = fit_pca(values, 3, None, seed)
    hr_proj = render(basis.project(values), guide, field, **render_kwargs)
    return basis.to_rgb(hr_proj), basis
