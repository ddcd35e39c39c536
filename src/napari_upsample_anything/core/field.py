"""The kernel field: one anisotropic Gaussian (plus a range sigma) per LR cell.

Parameterisation (published): ``sigma = exp(raw)``, ``theta = pi * tanh(raw)``.
Initial values: ``sigma_x = sigma_y = 16`` HR pixels (whatever the scale), ``theta = 0``,
``sigma_r = 0.12`` (guide units, guide in [0, 1]).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch

from .checks import check_choice, check_float, check_int, check_int_pair
from .published import FIT_DOWNSAMPLE, PUBLISHED_STEPS

INIT_SIGMA = 16.0
INIT_SIGMA_R = 0.12
_FORMAT = "napari-upsample-anything/kernel-field/1"
_NAMES = ("sigma_x", "sigma_y", "theta", "sigma_r")
_MEMBERS = {f"{n}.npy" for n in _NAMES} | {"meta.npy", "options.npy"}

# Bounds on what a fit accepts and a loaded file may declare. They are far beyond any sensible
# use and exist so that a corrupt or hostile file cannot make render allocate without limit.
MAX_RADIUS = 256  # LR cells; published 8, render cost grows as radius^2
MAX_SIDE = 1 << 20  # pixels along one axis of the HR image
MAX_LR_CELLS = 1 << 26  # cells of one kernel map (256 MiB of float32)
MAX_STEPS = 10**7
MAX_ALPHA = 1e3
MAX_TEXT_BYTES = 64 << 20  # the JSON metadata / options members of a kernels file
NORMALIZE_RULES = ("auto", "unit", "percentile", "none")


@dataclass(frozen=True)
class FitOptions:
    """How a :class:`KernelField` was fitted; ``render`` uses these unless told otherwise.

    Attributes
    ----------
    radius, alpha, border, radius_units :
        Method options of the fit (see ``RenderOptions``); rendering with others than the
        fit's changes the kernels' footprint, so render defaults to these.
    guide_smoothing : float
        Gaussian sigma (HR pixels) applied to the normalised guide; 0 is off.
    downsample : "bicubic" | "area"
        How the fit's LR input was made from the guide (fit only).
    normalize : "auto" | "unit" | "percentile" | "none" | (lo, hi)
        The guide intensity rule asked for.
    channel_axis : int or None
        The guide's channel axis as given to the fit (None: gray or RGB(A) channels-last).
    hr_shape, lr_shape : (H, W), (h, w) or None
        Guide size and LR grid of the fit; render refuses a guide of another size unless
        ``allow_resized_guide=True``.
    guide_channels : int or None
        Channels of the guide the fit saw (1 gray, 3 RGB, ...); render refuses a guide with
        another number of channels (the range kernels compare colours of that many channels).
    lr : float
        Initial learning rate.
    steps : int
        Adam updates.

    Every value is range-checked on construction (and so on load).
    """

    radius: int = 8
    alpha: float = 2.0
    border: str = "repeat"
    radius_units: str = "hr"
    guide_smoothing: float = 0.0
    downsample: str = "bicubic"
    normalize: Union[str, Tuple[float, float]] = "auto"
    channel_axis: Optional[int] = None
    hr_shape: Optional[Tuple[int, int]] = None
    lr_shape: Optional[Tuple[int, int]] = None
    guide_channels: Optional[int] = None
    lr: float = 0.1
    steps: int = PUBLISHED_STEPS

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        set_("radius", check_int(self.radius, "radius", minimum=0, maximum=MAX_RADIUS, hint="published: 8"))
        set_("alpha", check_float(self.alpha, "alpha", positive=True, maximum=MAX_ALPHA, hint="published: 2"))
        set_("border", check_choice(self.border, "border", ("repeat", "unique")))
        set_("radius_units", check_choice(self.radius_units, "radius_units", ("hr", "lr")))
        set_("downsample", check_choice(self.downsample, "downsample", FIT_DOWNSAMPLE))
        set_("normalize", _check_normalize(self.normalize))
        if self.channel_axis is not None:
            set_("channel_axis", check_int(self.channel_axis, "channel_axis", minimum=-3, maximum=2))
        if self.guide_channels is not None:
            set_("guide_channels", check_int(self.guide_channels, "guide_channels", minimum=1, maximum=1 << 16))
        for name in ("hr_shape", "lr_shape"):
            value = getattr(self, name)
            if value is not None:
                pair = check_int_pair(value, name)
                if max(pair) > MAX_SIDE:
                    raise ValueError(f"{name}={pair}: larger than {MAX_SIDE} pixels along an axis")
                set_(name, pair)
        if self.hr_shape is not None and self.lr_shape is not None:
            if self.lr_shape[0] > self.hr_shape[0] or self.lr_shape[1] > self.hr_shape[1]:
                raise ValueError(f"lr_shape={self.lr_shape} is larger than hr_shape={self.hr_shape}")
        largest = max(self.hr_shape) if self.hr_shape is not None else MAX_SIDE
        set_(
            "guide_smoothing",
            check_float(
                self.guide_smoothing,
                "guide_smoothing",
                minimum=0.0,
                maximum=float(largest),
                hint="Gaussian sigma in pixels, at most the image size",
            ),
        )
        set_("lr", check_float(self.lr, "lr", positive=True, hint="published: 0.1"))
        set_("steps", check_int(self.steps, "steps", minimum=0, maximum=MAX_STEPS, hint=f"published: {PUBLISHED_STEPS}"))

    def render_kwargs(self) -> Dict[str, Any]:
        """``radius, alpha, border, radius_units`` as keyword arguments of ``RenderOptions``."""
        return dict(radius=self.radius, alpha=self.alpha, border=self.border, radius_units=self.radius_units)

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        for key in ("hr_shape", "lr_shape", "normalize"):
            if isinstance(d[key], tuple):
                d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> FitOptions:
        """Options from :meth:`to_dict` output (unknown keys are ignored; all values checked)."""
        if not isinstance(d, dict):
            raise TypeError(f"fit options must be a dict, got {type(d).__name__}")
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d and d[k] is not None}
        for key in ("hr_shape", "lr_shape", "normalize"):
            if isinstance(known.get(key), list):
                known[key] = tuple(known[key])
        return cls(**known)


def _check_normalize(value) -> Union[str, Tuple[float, float]]:
    if isinstance(value, str):
        return check_choice(value, "normalize", NORMALIZE_RULES)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        lo = check_float(value[0], "normalize[0]")
        hi = check_float(value[1], "normalize[1]")
        if not hi > lo:
            raise ValueError(f"normalize={tuple(value)!r}: hi must be larger than lo")
        return (lo, hi)
    raise TypeError(f"normalize={value!r}: use 'auto', 'unit', 'percentile', 'none' or (lo, hi)")


@dataclass(eq=False)
class KernelField:
    """Four ``(h, w)`` float tensors on the LR grid.

    Attributes
    ----------
    sigma_x, sigma_y : torch.Tensor (h, w)
        Spatial standard deviations along the kernel's own axes, in HR pixels.
    theta : torch.Tensor (h, w)
        Rotation of the kernel's x axis, radians, in (-pi, pi).
    sigma_r : torch.Tensor (h, w)
        Range standard deviation, in normalised guide units.
    meta : dict
        Provenance (guide shape, steps, loss history, timing ...); saved with the field.
    options : FitOptions or None
        How the field was fitted (None for fields made by hand); saved with the field and
        used by default by ``render``, ``upsample``, ``render_pca`` and the inspector.
    """

    sigma_x: torch.Tensor
    sigma_y: torch.Tensor
    theta: torch.Tensor
    sigma_r: torch.Tensor
    meta: Dict = field(default_factory=dict, compare=False, repr=False)
    options: Optional[FitOptions] = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in _NAMES:
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor):
                value = torch.as_tensor(np.asarray(value), dtype=torch.float32)
                setattr(self, name, value)
            if value.ndim != 2:
                raise ValueError(f"KernelField.{name} must be a 2D (h, w) map, got shape {tuple(value.shape)}")
        shapes = {tuple(getattr(self, n).shape) for n in _NAMES}
        if len(shapes) != 1:
            raise ValueError(f"KernelField maps must share one (h, w) shape, got {sorted(shapes)}")

    # ----------------------------------------------------------------------------------
    @classmethod
    def initial(
        cls,
        lr_shape: Tuple[int, int],
        sigma: float = INIT_SIGMA,
        sigma_r: float = INIT_SIGMA_R,
        device: str | torch.device = "cpu",
    ) -> KernelField:
        """The published starting point: isotropic ``sigma``, ``theta = 0``, ``sigma_r``."""
        h, w = lr_shape
        full = lambda v: torch.full((h, w), float(v), dtype=torch.float32, device=device)  # noqa: E731
        return cls(full(sigma), full(sigma), full(0.0), full(sigma_r))

    @property
    def shape(self) -> Tuple[int, int]:
        return tuple(self.sigma_x.shape)  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        return self.sigma_x.device

    def equal(self, other: KernelField) -> bool:
        """True when all four maps are identical (metadata is not compared)."""
        return all(torch.equal(getattr(self, n).cpu(), getattr(other, n).cpu()) for n in _NAMES)

    def to(self, device: str | torch.device) -> KernelField:
        """A copy on ``device`` (float32)."""
        maps = {n: getattr(self, n).to(device=device, dtype=torch.float32) for n in _NAMES}
        return KernelField(**maps, meta=dict(self.meta), options=self.options)

    def detach(self) -> KernelField:
        return KernelField(**{n: getattr(self, n).detach() for n in _NAMES}, meta=dict(self.meta), options=self.options)

    def validate(self, lr_shape: Tuple[int, int] | None = None, name: str = "field") -> None:
        """Raise ValueError on a shape mismatch, NaN/Inf, or non-positive sigmas."""
        if lr_shape is not None and tuple(self.shape) != tuple(lr_shape):
            raise ValueError(
                f"{name} has LR shape {self.shape} but lr_map has {tuple(lr_shape)}; "
                "fit the field with fit_kernels(guide, lr_shape=lr_map.shape[-2:])"
            )
        for n in _NAMES:
            v = getattr(self, n)
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"{name}.{n} contains NaN or Inf")
        for n in ("sigma_x", "sigma_y", "sigma_r"):
            if bool((getattr(self, n) <= 0).any()):
                raise ValueError(f"{name}.{n} must be positive everywhere")

    # ----------------------------------------------------------------------------------
    def raw(self) -> torch.Tensor:
        """Unconstrained parameters ``[4, h, w]``: log sigmas and ``atanh(theta / pi)``."""
        th = (self.theta / math.pi).clamp(-1 + 1e-7, 1 - 1e-7)
        return torch.stack([torch.log(self.sigma_x), torch.log(self.sigma_y), torch.atanh(th), torch.log(self.sigma_r)])

    @classmethod
    def from_raw(cls, raw: torch.Tensor, meta: Dict | None = None) -> KernelField:
        """Inverse of :meth:`raw` (differentiable)."""
        return cls(torch.exp(raw[0]), torch.exp(raw[1]), math.pi * torch.tanh(raw[2]), torch.exp(raw[3]), meta=meta or {})

    # ----------------------------------------------------------------------------------
    def anisotropy(self) -> torch.Tensor:
        """``max(sigma_x, sigma_y) / min(sigma_x, sigma_y)`` per cell (1 = isotropic)."""
        return torch.maximum(self.sigma_x, self.sigma_y) / torch.minimum(self.sigma_x, self.sigma_y)

    def numpy(self) -> Dict[str, np.ndarray]:
        return {n: getattr(self, n).detach().cpu().numpy().astype(np.float32) for n in _NAMES}

    def save(self, path: str | Path) -> Path:
        """Write an ``.npz`` with the four maps, the metadata and the fit options (JSON).

        Atomic: written to a temporary name in the same folder, then renamed, so an
        interrupted save never leaves a partial file under ``path`` (nor replaces an older one).
        """
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_suffix(path.suffix + ".npz") if path.suffix else path.with_suffix(".npz")
        members = dict(self.numpy())
        members["meta"] = np.array(json.dumps({"format": _FORMAT, **_jsonable(self.meta)}))
        if self.options is not None:
            members["options"] = np.array(json.dumps(self.options.to_dict()))
        fd, tmp = tempfile.mkstemp(prefix=f"{path.name}.tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez_compressed(fh, **members)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> KernelField:
        """Read a field written by :meth:`save`.

        The archive's member sizes and array headers are checked before anything is inflated;
        pickles are refused. Any unreadable file (truncated, empty, text, a plain ``.npy``,
        wrong members, shapes or values) raises ``ValueError("<path> is not a kernel field
        file: <why>")``; a missing one FileNotFoundError.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"kernel field file not found: {path}")
        try:
            maps, meta, options = _read_field_file(path)
            field_ = cls(**{n: torch.from_numpy(maps[n]) for n in _NAMES}, meta=meta, options=options)
            field_.validate(None, "file")
            if options is not None and options.lr_shape is not None and options.lr_shape != field_.shape:
                raise ValueError(f"its options say lr_shape={options.lr_shape} but the maps are {field_.shape}")
        except Exception as exc:  # noqa: BLE001 - any unreadable file gets the one clear error
            if isinstance(exc, (FileNotFoundError, PermissionError, MemoryError)):
                raise
            raise ValueError(f"{path} is not a kernel field file: {exc}") from None
        return field_.to(device) if torch.device(device).type != "cpu" else field_


def _read_field_file(path: Path):
    """``(maps, meta, options)`` of a kernels file; raises on anything unexpected."""
    if path.is_dir():
        raise ValueError("it is a directory")
    if not zipfile.is_zipfile(path):
        raise ValueError("it is not an .npz (zip) archive (empty, truncated, text or .npy?)")
    with zipfile.ZipFile(path) as zf:
        infos = {info.filename: info for info in zf.infolist()}
        unknown = sorted(set(infos) - _MEMBERS)
        if unknown:
            raise ValueError(f"unexpected members {unknown}")
        missing = [n for n in _NAMES if f"{n}.npy" not in infos]
        if missing:
            raise ValueError(f"it lacks {', '.join(missing)}")
        shape = None
        for n in _NAMES:
            info = infos[f"{n}.npy"]
            with zf.open(info) as fh:  # reads the .npy header only
                version = np.lib.format.read_magic(fh)
                if version == (1, 0):
                    map_shape, _fortran, dtype = np.lib.format.read_array_header_1_0(fh)
                else:
                    map_shape, _fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            if dtype.kind != "f" or dtype.itemsize > 8:
                raise ValueError(f"{n} has dtype {dtype}; a kernel map is float")
            if len(map_shape) != 2 or min(map_shape) < 1:
                raise ValueError(f"{n} has shape {map_shape}; a kernel map is (h, w)")
            if shape is not None and map_shape != shape:
                raise ValueError(f"{n} has shape {map_shape} but sigma_x has {shape}")
            shape = map_shape
            if map_shape[0] * map_shape[1] > MAX_LR_CELLS:
                raise ValueError(f"{n} declares {map_shape[0]} x {map_shape[1]} cells, more than {MAX_LR_CELLS}")
            expected = map_shape[0] * map_shape[1] * dtype.itemsize
            if info.file_size > expected + 4096:
                raise ValueError(f"{n} inflates to {info.file_size} bytes, more than its {map_shape} shape needs")
        for name in ("meta.npy", "options.npy"):
            if name in infos and infos[name].file_size > MAX_TEXT_BYTES:
                raise ValueError(f"{name} inflates to {infos[name].file_size} bytes (limit {MAX_TEXT_BYTES})")
    with np.load(path, allow_pickle=False) as data:
        maps = {}
        for n in _NAMES:
            arr = np.array(data[n], dtype=np.float32)
            if not np.isfinite(arr).all():
                raise ValueError(f"{n} contains NaN or Inf (or values beyond float32 range)")
            maps[n] = arr
        meta = _read_json(data, "meta")
        raw_options = _read_json(data, "options") if "options" in data.files else None
    meta.pop("format", None)
    if raw_options is not None:
        options = FitOptions.from_dict(raw_options)
    else:
        options = _legacy_options(meta)
    return maps, meta, options


def _read_json(data, name: str) -> Dict[str, Any]:
    if name not in data.files:
        return {}
    arr = data[name]
    if arr.dtype.kind != "U" or arr.ndim != 0:
        raise ValueError(f"{name} is not a JSON text")
    try:
        value = json.loads(str(arr))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} is not a JSON object")
    return value


def _legacy_options(meta: Dict[str, Any]) -> Optional[FitOptions]:
    """Fit options from the metadata of files written before options were saved (None if it
    does not record the fit)."""
    keys = ("radius", "border", "radius_units", "guide_smoothing", "downsample", "hr_shape", "lr_shape", "lr", "steps")
    if not any(k in meta for k in keys):
        return None
    return FitOptions.from_dict({k: meta[k] for k in keys if k in meta})


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def kernel_coefficients(field: KernelField) -> torch.Tensor:
    """``[4, h, w]``: the quadratic-form coefficients ``A, B, C`` and ``rho`` of every cell.

    ``log w_spatial = -(A dX^2 + 2 B dX dY + C dY^2)`` with
    ``A = a cos^2 + b sin^2``, ``C = a sin^2 + b cos^2``, ``B = (a - b) sin cos``,
    ``a = 1 / (2 sigma_x^2 + 1e-8)``, ``b = 1 / (2 sigma_y^2 + 1e-8)`` (sigmas clamped at
    1e-6, as published), and ``log w_range = -rho ||I(p) - I_lr(q)||^2`` with
    ``rho = 1 / (2 sigma_r^2 + 1e-8)``. Differentiable.
    """
    sx = field.sigma_x.clamp_min(1e-6)
    sy = field.sigma_y.clamp_min(1e-6)
    sr = field.sigma_r.clamp_min(1e-6)
    a = 1.0 / (2 * sx * sx + 1e-8)
    b = 1.0 / (2 * sy * sy + 1e-8)
    c, s = torch.cos(field.theta), torch.sin(field.theta)
    A = a * c * c + b * s * s
    C = a * s * s + b * c * c
    B = (a - b) * s * c
    rho = 1.0 / (2 * sr * sr + 1e-8)
    return torch.stack([A, B, C, rho])


def kernel_coefficients_backward(raw: torch.Tensor, grad_coef: torch.Tensor) -> torch.Tensor:
    """Gradient ``[4, h, w]`` with respect to ``raw`` (:meth:`KernelField.raw`) of
    ``sum(grad_coef * kernel_coefficients(KernelField.from_raw(raw)))``, written out.

    The fit's C kernel returns the gradient of the loss in the coefficients (A, B, C, rho);
    autograd's engine took about 0.8 ms per step to carry it through the parameterisation of a
    16 x 16 grid (a tenth of a 224^2 step at 2 threads), these few element-wise operations take
    a fraction of that. ``grad_coef [4, h, w]``: gradient in A, B, C, rho. The clamps of
    :func:`kernel_coefficients` pass no gradient where a sigma is below 1e-6, as autograd's.
    Tested against autograd (``tests/test_fit.py``).
    """
    with torch.no_grad():
        gA, gB, gC, grho = grad_coef.unbind(0)
        sx, sy, sr = torch.exp(raw[0]), torch.exp(raw[1]), torch.exp(raw[3])
        t = torch.tanh(raw[2])
        theta = math.pi * t
        sxc, syc, src = sx.clamp_min(1e-6), sy.clamp_min(1e-6), sr.clamp_min(1e-6)
        a = 1.0 / (2 * sxc * sxc + 1e-8)
        b = 1.0 / (2 * syc * syc + 1e-8)
        rho = 1.0 / (2 * src * src + 1e-8)
        c, s = torch.cos(theta), torch.sin(theta)
        cc, ss, sc = c * c, s * s, s * c
        # A = a c^2 + b s^2, C = a s^2 + b c^2, B = (a - b) s c
        g_a = gA * cc + gB * sc + gC * ss
        g_b = gA * ss - gB * sc + gC * cc
        g_theta = 2 * sc * (b - a) * (gA - gC) + gB * (a - b) * (cc - ss)
        # d(1 / (2 x^2 + 1e-8)) / dx = -4 x (1 / (2 x^2 + 1e-8))^2; d exp(r) / dr = exp(r)
        g0 = torch.where(sx >= 1e-6, g_a * (-4.0 * sxc * a * a) * sx, 0.0)
        g1 = torch.where(sy >= 1e-6, g_b * (-4.0 * syc * b * b) * sy, 0.0)
        g2 = g_theta * (math.pi * (1 - t * t))
        g3 = torch.where(sr >= 1e-6, grho * (-4.0 * src * rho * rho) * sr, 0.0)
        return torch.stack([g0, g1, g2, g3])
