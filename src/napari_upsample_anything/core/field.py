"""The kernel field: one anisotropic Gaussian (plus a range sigma) per LR cell.

Parameterisation (published): ``sigma = exp(raw)``, ``theta = pi * tanh(raw)``.
Initial values: ``sigma_x = sigma_y = 16`` HR pixels (whatever the scale), ``theta = 0``,
``sigma_r = 0.12`` (guide units, guide in [0, 1]).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import torch

INIT_SIGMA = 16.0
INIT_SIGMA_R = 0.12
_FORMAT = "napari-upsample-anything/kernel-field/1"
_NAMES = ("sigma_x", "sigma_y", "theta", "sigma_r")


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
        Provenance (guide shape, steps, loss history ...); saved with the field.
    """

    sigma_x: torch.Tensor
    sigma_y: torch.Tensor
    theta: torch.Tensor
    sigma_r: torch.Tensor
    meta: Dict = field(default_factory=dict, compare=False, repr=False)

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
        device: "str | torch.device" = "cpu",
    ) -> "KernelField":
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

    def equal(self, other: "KernelField") -> bool:
        """True when all four maps are identical (metadata is not compared)."""
        return all(torch.equal(getattr(self, n).cpu(), getattr(other, n).cpu()) for n in _NAMES)

    def to(self, device: "str | torch.device") -> "KernelField":
        """A copy on ``device`` (float32)."""
        maps = {n: getattr(self, n).to(device=device, dtype=torch.float32) for n in _NAMES}
        return KernelField(**maps, meta=dict(self.meta))

    def detach(self) -> "KernelField":
        return KernelField(**{n: getattr(self, n).detach() for n in _NAMES}, meta=dict(self.meta))

    def validate(self, lr_shape: "Tuple[int, int] | None" = None, name: str = "field") -> None:
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
        return torch.stack(
            [torch.log(self.sigma_x), torch.log(self.sigma_y), torch.atanh(th), torch.log(self.sigma_r)]
        )

    @classmethod
    def from_raw(cls, raw: torch.Tensor, meta: "Dict | None" = None) -> "KernelField":
        """Inverse of :meth:`raw` (differentiable)."""
        return cls(
            torch.exp(raw[0]), torch.exp(raw[1]), math.pi * torch.tanh(raw[2]), torch.exp(raw[3]), meta=meta or {}
        )

    # ----------------------------------------------------------------------------------
    def anisotropy(self) -> torch.Tensor:
        """``max(sigma_x, sigma_y) / min(sigma_x, sigma_y)`` per cell (1 = isotropic)."""
        return torch.maximum(self.sigma_x, self.sigma_y) / torch.minimum(self.sigma_x, self.sigma_y)

    def numpy(self) -> Dict[str, np.ndarray]:
        return {n: getattr(self, n).detach().cpu().numpy().astype(np.float32) for n in _NAMES}

    def save(self, path: "str | Path") -> Path:
        """Write an ``.npz`` with the four maps and the metadata (JSON)."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_suffix(path.suffix + ".npz") if path.suffix else path.with_suffix(".npz")
        meta = json.dumps({"format": _FORMAT, **_jsonable(self.meta)})
        np.savez_compressed(path, **self.numpy(), meta=np.array(meta))
        return path

    @classmethod
    def load(cls, path: "str | Path", device: "str | torch.device" = "cpu") -> "KernelField":
        """Read a field written by :meth:`save`."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"kernel field file not found: {path}")
        with np.load(path, allow_pickle=False) as data:
            missing = [n for n in _NAMES if n not in data.files]
            if missing:
                raise ValueError(f"{path} is not a kernel field file: it lacks {', '.join(missing)}")
            maps = {n: torch.from_numpy(np.array(data[n], dtype=np.float32)).to(device) for n in _NAMES}
            meta = json.loads(str(data["meta"])) if "meta" in data.files else {}
        meta.pop("format", None)
        return cls(**maps, meta=meta)


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


def kernel_coefficients(field: "KernelField") -> torch.Tensor:
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
