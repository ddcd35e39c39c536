"""What decides a run's numbers and outputs (:class:`PipelineOptions`), and the progress
events every step reports (:class:`Progress`). No torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Optional, Tuple

import numpy as np

from ..core.published import FIT_DOWNSAMPLE, PUBLISHED_STEPS

ProgressCallback = Callable[["Progress"], Any]
CancelFn = Callable[[], bool]
PlaneKey = Tuple[int, int]  # (t, z) in the source

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
FORMATS = ("ome-zarr", "npy")
HR_DTYPES = ("float32", "float16")
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
# One record per concern, each checking its own fields (torch-free: the widgets validate in
# the GUI thread, the CLI before any model loads). Messages name the option and its CLI flag.


def _whole(name: str, flag: str, value, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ValueError(f"{name}={value!r} ({flag}): give a whole number >= {lo}")


@dataclass(frozen=True)
class FeatureOptions:
    """What the backbone computes: ``channels`` are the source channels that form the guide
    (None: all); several ``layer`` blocks have their features concatenated."""

    backbone: str = "dinov2_vits14"
    layer: int | Tuple[int, ...] = -1
    input_size: Optional[int] = None
    weights: Optional[str] = None
    pretrained: bool = True
    channels: Optional[Tuple[int, ...]] = None

    def validate(self) -> None:
        blocks = tuple(self.layer) if isinstance(self.layer, (tuple, list)) else (self.layer,)
        for block in blocks or (None,):  # one block, or several (their features concatenated)
            _whole("layer", "--layer", block, -10_000)
        if len(set(blocks)) != len(blocks):
            raise ValueError(f"layer={self.layer!r} (--layer): give distinct blocks, e.g. -1,-4")
        if self.input_size is not None:
            _whole("input_size", "--input-size", self.input_size, 1)
        if self.weights:
            p = Path(self.weights).expanduser()
            if not p.is_file():
                raise FileNotFoundError(f"weights file {str(p)!r} (--weights) does not exist")
        if self.channels is not None and (
            not self.channels or any(isinstance(c, bool) or int(c) != c or c < 0 for c in self.channels)
        ):
            raise ValueError(f"channels={self.channels!r} (--channels): give channel indices >= 0, or None for all")


#: The fit options whose name differs in :func:`~..api.fit_kernels` (``downsample``).
_FIT_KERNELS_NAMES = {"fit_downsample": "downsample"}
#: The fit options that are not arguments of :func:`~..api.fit_kernels`.
_NOT_FIT_KERNELS_ARGS = ("seed",)


@dataclass(frozen=True)
class KernelFitOptions:
    """How the kernels are fitted (named apart from :class:`~..core.field.FitOptions`, the
    settings a fitted field records). A new field here reaches :func:`~..api.fit_kernels`
    through :meth:`fit_kernels_args` under the same name."""

    steps: int = PUBLISHED_STEPS
    guide_smoothing: float = 0.0
    fit_downsample: str = "bicubic"
    fit_fraction: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        _whole("steps", "--steps", self.steps, 0)
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

    @classmethod
    def fitted_with(cls, field, **overrides) -> KernelFitOptions:
        """The fit options a fitted :class:`~..core.field.KernelField` records (each field of
        this record that its ``options`` has under the :func:`~..api.fit_kernels` name;
        ``fit_fraction`` from its ``meta``; defaults for what it does not say), with
        ``overrides``: a map on another grid is refitted like the image was."""
        values = {}
        for f in fields(cls):
            name = _FIT_KERNELS_NAMES.get(f.name, f.name)
            if field.options is not None and hasattr(field.options, name):
                values[f.name] = getattr(field.options, name)
        # a field saved without options records its smoothing in meta; the fraction is only there
        values.setdefault("guide_smoothing", float(field.meta.get("guide_smoothing", 0.0) or 0.0))
        values["fit_fraction"] = float(field.meta.get("fit_fraction", 1.0))
        values.update(overrides)
        return cls(**values)

    def settings(self) -> dict:
        """The options a saved classifier records (all but the seed), as Python scalars in
        field order (each fit option has a scalar default, whose type it is cast to);
        :meth:`from_settings` reads them back."""
        return {
            f.name: type(f.default)(getattr(self, f.name))
            for f in fields(KernelFitOptions)
            if f.name not in _NOT_FIT_KERNELS_ARGS
        }

    @classmethod
    def from_settings(cls, settings: dict) -> dict:
        """The fit fields of :meth:`settings` (each cast like its default; a missing one gets
        its default), as keyword arguments for :class:`PipelineOptions`."""
        return {
            f.name: type(f.default)(settings.get(f.name, f.default)) for f in fields(cls) if f.name not in _NOT_FIT_KERNELS_ARGS
        }

    def fit_kernels_args(self) -> dict:
        """These options as keyword arguments of :func:`~..api.fit_kernels` (numbers as Python
        int / float, as the callers passed them before)."""
        out = {}
        for f in fields(KernelFitOptions):
            if f.name in _NOT_FIT_KERNELS_ARGS:
                continue
            value = getattr(self, f.name)
            if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
                value = int(value)
            elif isinstance(value, (float, np.floating)):
                value = float(value)
            out[_FIT_KERNELS_NAMES.get(f.name, f.name)] = value
        return out


@dataclass(frozen=True)
class OutputOptions:
    """What is rendered and written: ``hr_features`` renders the ``(C, H, W)`` HR features
    (else only the PCA picture), ``hr_dtype`` is their dtype in files ("float32"/"float16")."""

    precision: str = "auto"
    hr_features: bool = True
    hr_dtype: str = "float32"
    pca_max_samples: int = 100_000
    format: str = "ome-zarr"

    def validate(self) -> None:
        _whole("pca_max_samples", "--pca-samples", self.pca_max_samples, 3)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} (--precision): use one of {PRECISIONS}")
        if self.hr_dtype not in HR_DTYPES:
            raise ValueError(f"hr_dtype={self.hr_dtype!r} (--dtype): use float32 or float16")
        if self.format not in FORMATS:
            raise ValueError(f"format={self.format!r} (--format): use one of {FORMATS}")


@dataclass(frozen=True)
class JobOptions:
    """Where and within how much memory the job runs (``max_memory``: no budget when
    :func:`~..core.units.no_budget`)."""

    device: str = "auto"
    max_memory: Optional[str] = None

    def validate(self) -> None:
        from ..core.units import no_budget, parse_bytes

        if not no_budget(self.max_memory):
            try:
                nbytes = parse_bytes(self.max_memory, "max_memory (--max-memory)")
            except OverflowError:
                nbytes = None
            if nbytes is None or not np.isfinite(float(nbytes)) or nbytes > 2**60:
                raise ValueError(f"max_memory={self.max_memory!r} (--max-memory): give a finite size such as 2GB or 512MiB")
        if not isinstance(self.device, str) or not self.device.strip():
            raise ValueError(f"device={self.device!r} (--device): use auto, cpu, cuda, cuda:N or mps")
        dev = self.device.strip().lower()
        if not (dev in ("auto", "cpu", "cuda", "mps") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise ValueError(f"device={self.device!r} (--device): use auto, cpu, cuda, cuda:N or mps")

    @property
    def budget(self) -> Optional[str]:
        """``max_memory``, or None for no budget."""
        from ..core.units import budget_or_none

        return budget_or_none(self.max_memory)


#: The records :class:`PipelineOptions` is made of, in the order their fields come and are checked.
OPTION_RECORDS = (FeatureOptions, KernelFitOptions, OutputOptions, JobOptions)


@dataclass(frozen=True)
class PipelineOptions(JobOptions, OutputOptions, KernelFitOptions, FeatureOptions):
    """Everything that decides the numbers (and the outputs) of a run: the fields of
    :data:`OPTION_RECORDS`, flat.

    Why flat, by inheritance, rather than one attribute per record: dozens of callers (the
    pipeline, segmentation, the CLI commands, the widgets, the tests) read ``options.steps``
    and build ``PipelineOptions(steps=..., device=...)``; inheriting the records keeps all
    of them working while each field and its check are written once, in its record. A new
    option is a field (and its check) in one record; the CLI's :func:`~..cli_options.options_from_args`
    and the widget's ``RunConfig`` pick it up from the field list. ``options.fit`` (and
    ``features``, ``outputs``, ``job``) give one concern's record.
    """

    def validate(self) -> PipelineOptions:
        """Check every value without importing torch or loading a model; returns self.

        Raises ValueError / TypeError / FileNotFoundError naming the option (CLI flag
        spelling in brackets).
        """
        for record in OPTION_RECORDS:
            record.validate(self)
        return self

    def record(self, cls):
        """The ``cls`` record (one of :data:`OPTION_RECORDS`) of these options."""
        return cls(**{f.name: getattr(self, f.name) for f in fields(cls)})

    @property
    def features(self) -> FeatureOptions:
        return self.record(FeatureOptions)

    @property
    def fit(self) -> KernelFitOptions:
        return self.record(KernelFitOptions)

    @property
    def outputs(self) -> OutputOptions:
        return self.record(OutputOptions)

    @property
    def job(self) -> JobOptions:
        return self.record(JobOptions)

    def to_dict(self) -> dict:
        return asdict(self)
