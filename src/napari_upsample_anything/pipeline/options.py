"""What decides a run's numbers and outputs (:class:`PipelineOptions`), and the progress
events every step reports (:class:`Progress`). No torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Tuple

import numpy as np

from ..core.published import PUBLISHED_STEPS

ProgressCallback = Callable[["Progress"], Any]
CancelFn = Callable[[], bool]
PlaneKey = Tuple[int, int]  # (t, z) in the source

FIT_DOWNSAMPLE = ("bicubic", "area")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
FORMATS = ("ome-zarr", "npy")
#: Labels maps with more distinct values than this are refused (one-hot would be too large).
MAX_LABEL_CLASSES = 256
#: The guide smoothing sigma is capped (pixels): larger values make the fit run for minutes.
MAX_GUIDE_SMOOTHING = 256.0


# ---------------------------------------------------------------------------------- events
@dataclass(frozen=True)
class Progress:
    """One progress event: ``done`` of ``total`` units of ``stage`` on plane ``plane``.

    Stages: ``"features"`` (backbone loading and ViT windows), ``"fit"`` (Adam steps; ``loss``
    set), ``"pca"`` (tiles of the 3-channel HR PCA render), ``"render"`` (tiles of the
    C-channel HR feature render), ``"upsample"`` (tiles of an LR map render).
    """

    stage: str
    done: int
    total: int
    plane: int = 0
    n_planes: int = 1
    loss: Optional[float] = None

    def text(self) -> str:
        """Short status line, e.g. ``'fit 12/51, loss 0.0123 (plane 2/5)'``."""
        s = f"{self.stage} {self.done}/{self.total}" if self.total else self.stage
        if self.loss is not None:
            s += f", loss {self.loss:.4g}"
        if self.n_planes > 1:
            s += f" (plane {self.plane + 1}/{self.n_planes})"
        return s


def _report(progress: Optional[ProgressCallback], event: Progress) -> None:
    if progress is not None:
        progress(event)


def core_progress(progress: Optional[ProgressCallback], stage: str, plane: int, n_planes: int):
    """A core ``progress(done, total, info)`` callback that emits :class:`Progress` events."""
    if progress is None:
        return None

    def cb(done: int, total: int, info: dict) -> None:
        loss = info.get("loss")
        progress(Progress(stage, int(done), int(total), plane, n_planes, None if loss is None else float(loss)))

    return cb


# ---------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class PipelineOptions:
    """Everything that decides the numbers (and the outputs) of a run.

    ``channels``: indices of the source channels that form the guide (None: all).
    ``hr_features``: render the ``(C, H, W)`` HR features (else only the PCA picture).
    ``hr_dtype``: their dtype in files ("float32" or "float16").
    """

    backbone: str = "dinov2_vits14"
    layer: int | Tuple[int, ...] = -1  # several blocks: their features are concatenated
    input_size: Optional[int] = None
    weights: Optional[str] = None
    pretrained: bool = True
    steps: int = PUBLISHED_STEPS
    device: str = "auto"
    precision: str = "auto"
    max_memory: Optional[str] = None
    guide_smoothing: float = 0.0
    fit_downsample: str = "bicubic"
    fit_fraction: float = 1.0
    channels: Optional[Tuple[int, ...]] = None
    hr_features: bool = True
    hr_dtype: str = "float32"
    pca_max_samples: int = 100_000
    seed: int = 0
    format: str = "ome-zarr"

    def validate(self) -> PipelineOptions:
        """Check every value without importing torch or loading a model; returns self.

        Raises ValueError / TypeError naming the option (CLI flag spelling in brackets).
        """
        from ..core.units import parse_bytes

        def whole(name, flag, value, lo):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
                raise ValueError(f"{name}={value!r} ({flag}): give a whole number >= {lo}")

        whole("steps", "--steps", self.steps, 0)
        blocks = tuple(self.layer) if isinstance(self.layer, (tuple, list)) else (self.layer,)
        for block in blocks or (None,):  # one block, or several (their features concatenated)
            whole("layer", "--layer", block, -10_000)
        if len(set(blocks)) != len(blocks):
            raise ValueError(f"layer={self.layer!r} (--layer): give distinct blocks, e.g. -1,-4")
        whole("pca_max_samples", "--pca-samples", self.pca_max_samples, 3)
        if self.input_size is not None:
            whole("input_size", "--input-size", self.input_size, 1)
        if self.max_memory not in (None, "", "auto"):
            try:
                nbytes = parse_bytes(self.max_memory, "max_memory (--max-memory)")
            except OverflowError:
                nbytes = None
            if nbytes is None or not np.isfinite(float(nbytes)) or nbytes > 2**60:
                raise ValueError(f"max_memory={self.max_memory!r} (--max-memory): give a finite size such as 2GB or 512MiB")
        try:
            sigma = float(self.guide_smoothing)
        except (TypeError, ValueError):
            raise ValueError(
                f"guide_smoothing={self.guide_smoothing!r} (--guide-smoothing): give a Gaussian sigma in pixels, a number >= 0"
            ) from None
        if not (0.0 <= sigma <= MAX_GUIDE_SMOOTHING):
            raise ValueError(
                f"guide_smoothing={self.guide_smoothing!r} (--guide-smoothing): give a finite Gaussian sigma between 0 "
                f"(off) and {MAX_GUIDE_SMOOTHING:g} pixels (2 helps noisy images)"
            )
        if self.fit_downsample not in FIT_DOWNSAMPLE:
            raise ValueError(f"fit_downsample={self.fit_downsample!r} (--fit-downsample): use one of {FIT_DOWNSAMPLE}")
        fraction = self.fit_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.number)) or not 0 < float(fraction) <= 1:
            raise ValueError(
                f"fit_fraction={fraction!r} (--fit-fraction): give the fraction of pixels per fit step, "
                "in (0, 1]; 1 is the exact, published fit"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} (--precision): use one of {PRECISIONS}")
        if self.hr_dtype not in ("float32", "float16"):
            raise ValueError(f"hr_dtype={self.hr_dtype!r} (--dtype): use float32 or float16")
        if self.format not in FORMATS:
            raise ValueError(f"format={self.format!r} (--format): use one of {FORMATS}")
        if not isinstance(self.device, str) or not self.device.strip():
            raise ValueError(f"device={self.device!r} (--device): use auto, cpu, cuda, cuda:N or mps")
        dev = self.device.strip().lower()
        if not (dev in ("auto", "cpu", "cuda", "mps") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise ValueError(f"device={self.device!r} (--device): use auto, cpu, cuda, cuda:N or mps")
        if self.weights:
            p = Path(self.weights).expanduser()
            if not p.is_file():
                raise FileNotFoundError(f"weights file {str(p)!r} (--weights) does not exist")
        if self.channels is not None and (
            not self.channels or any(isinstance(c, bool) or int(c) != c or c < 0 for c in self.channels)
        ):
            raise ValueError(f"channels={self.channels!r} (--channels): give channel indices >= 0, or None for all")
        return self

    @property
    def budget(self) -> Optional[str]:
        return None if self.max_memory in (None, "", "auto") else self.max_memory

    def to_dict(self) -> dict:
        return asdict(self)
