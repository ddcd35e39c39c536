"""The one orchestration: planes in -> features -> kernel fit -> PCA / HR render -> outputs.

Used by the command line (:mod:`.cli`), the napari widgets (``widgets/_pipeline.py`` keeps
only the thread bridge and layer translation) and Python users. No Qt, no napari; torch is
imported lazily.

Steps (each a plain function, shared by every caller)
------------------------------------------------------
:func:`fit_plane`
    features of one ``Y x X`` plane (a ViT, DINOv2 by default) and the GSJBU kernel field
    fitted on it (the plane's image is the guide).
:func:`fit_basis`
    the one PCA policy: a 3-component basis fitted on the **LR features** of all planes of
    an image pooled together (so colours mean the same on every slice), on a seeded random
    subsample of at most ``options.pca_max_samples`` positions (default 100,000, seed 0).
:func:`render_plane_pca` / :func:`render_plane_features`
    the HR PCA picture (3 rendered projections: exact and cheap) and the ``(C, H, W)`` HR
    features, written tile by tile into any target supporting ``out[:, y0:y1, x0:x1] = tile``
    (numpy array, memmap, :class:`~.omezarr.BandWriter` over a zarr array).
:func:`upsample_map`
    any LR map (probabilities, one-hot labels, depth) rendered with a plane's kernels.

In memory: :func:`run_planes` (what the widgets call) runs the steps over a list of planes
and returns :class:`PlaneFit` objects and the basis.

Files: tasks, for any executor
------------------------------
A job over one image source (file or array with named axes, :mod:`.sources`) writing into
one output folder is planned as picklable, frozen :class:`Task` objects::

    job = plan_job(source_ref, options, out_dir)     # nothing computed yet
    job.prepare()                                     # makes the hidden temporary folder
    for stage in job.stages():                        # tasks of a stage are independent
        for task in stage:
            run_task(task, progress=None, cancel=None)    # -> dict summary; any process
    job.commit()                                      # renames the folder into place
    # on any error or Ctrl-C: job.abort() removes the temporary folder

or simply ``run_job(job)`` (``run_job(job, client="local" | address | Client)`` runs the
stages on Dask workers: :mod:`.pipeline_dask`). A task names its source (:class:`SourceRef`: path / array, axes,
scene), its plane ``(t, z)``, the options and the temporary output folder; :func:`run_task`
opens the source lazily, reads only its plane and writes its results straight into its region
of the output stores. Stages: 0 = ``"fit"`` per plane (features + kernels, small files);
1 = ``"layout"`` (one task: PCA basis, creates the OME-Zarr stores with their final shapes);
2 = ``"render"`` per plane (HR features and PCA into the plane's region); 3 = ``"finish"``
(one task: pyramid, report). A Dask executor runs the tasks of a stage in parallel and the
stages in order (``task.stage``); the serial path is ``for t in job.tasks: run_task(t)``.

Outputs (``format="ome-zarr"``, the default): ``features.ome.zarr`` (HR features,
``[t,] c, [z,] y, x``, chunked), ``pca.ome.zarr`` (the HR PCA as 3 channels with a
multiscale pyramid), ``kernels.ome.zarr`` (sigma_x, sigma_y, theta, sigma_r on the LR grid,
with the fit metadata), ``lr_features.ome.zarr``, ``pca.png`` (one plane: LR | HR) and
``report.json``. Pixel sizes: HR the image's, LR scaled by ``H/h``, ``W/w``.
``format="npy"``: ``features_hr.npy`` (``(C, H, W)``, or ``(planes, C, H, W)``), ``pca.png``,
``kernels.npz`` (``kernels_t{t}_z{z}.npz`` for stacks) and ``report.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .core.progress import check_cancel
from .core.published import PUBLISHED_STEPS

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
        from .core.units import parse_bytes

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


# ---------------------------------------------------------------------------------- steps
@dataclass(eq=False)
class PlaneFit:
    """What the pipeline knows about one ``Y x X`` plane after the fit (and later renders).

    ``index`` is where the plane came from (``(t, z)`` for files, the layer's slice index in
    napari); ``guide`` the channels-last image the kernels were fitted on; ``features`` the
    ``(C, h, w)`` LR features; ``field`` the kernels (CPU); ``lr_rgb`` / ``hr_rgb`` the PCA
    pictures and ``hr_features`` the ``(C, H, W)`` HR features once rendered.
    """

    index: Tuple[int, ...]
    guide: np.ndarray
    features: np.ndarray
    geometry: Any  # core.features.FeatureGeometry
    field: Any  # core.field.KernelField on the CPU
    memlog: Any  # core.memory.MemoryLog
    backbone: str = ""
    weights_source: str = ""
    seconds: Dict[str, float] = field(default_factory=dict)
    lr_rgb: Optional[np.ndarray] = None
    hr_rgb: Optional[np.ndarray] = None
    hr_features: Optional[np.ndarray] = None
    hr_features_path: Optional[str] = None
    extra_fields: Dict[Tuple[int, int], Any] = field(default_factory=dict)  # LR grid -> refitted field

    @property
    def lr_shape(self) -> Tuple[int, int]:
        return tuple(int(s) for s in self.geometry.lr_shape)  # type: ignore[return-value]

    @property
    def hr_shape(self) -> Tuple[int, int]:
        return tuple(int(s) for s in self.geometry.image_shape)  # type: ignore[return-value]

    @property
    def factor(self) -> Tuple[float, float]:
        """HR pixels per LR cell ``(H/h, W/w)``."""
        return tuple(float(s) for s in self.geometry.scale)  # type: ignore[return-value]


def _channel_axis(guide: np.ndarray) -> Optional[int]:
    return -1 if np.ndim(guide) == 3 else None


def fit_plane(
    guide: np.ndarray,
    options: PipelineOptions,
    *,
    index: Tuple[int, ...] = (),
    channel_axis: int | None | str = "auto",
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelFn] = None,
    plane: int = 0,
    n_planes: int = 1,
) -> PlaneFit:
    """Features and fitted kernels of one plane.

    ``guide``: ``(H, W)`` or channels-last ``(H, W, k)`` (``channel_axis="auto"``), or any
    layout :func:`~.core.features.extract_features` accepts with an explicit ``channel_axis``.
    """
    from . import api
    from .core.device import resolve_device
    from .core.features import extract_features
    from .core.io import guide_from_image
    from .core.memory import MemoryLog
    from .core.platform_fixes import preload_triton_safely
    from .core.units import parse_bytes

    preload_triton_safely()  # before timm (-> torchvision -> torch._dynamo -> triton) is imported
    axis = _channel_axis(guide) if channel_axis == "auto" else channel_axis
    device = resolve_device(options.device)
    budget = parse_bytes(options.budget, "max_memory")
    seconds = {}
    _report(progress, Progress("features", 0, 1, plane, n_planes))
    t = time.perf_counter()
    fmap = extract_features(
        guide,
        options.backbone,
        layer=options.layer if isinstance(options.layer, (tuple, list)) else int(options.layer),
        input_size=options.input_size or None,
        weights=options.weights or None,
        pretrained=bool(options.pretrained),
        device=device,
        max_memory=budget,
        progress=core_progress(progress, "features", plane, n_planes),
        cancel=cancel,
        channel_axis=axis,
    )
    seconds["features"] = time.perf_counter() - t
    g = guide_from_image(guide, axis)
    memlog = MemoryLog()
    t = time.perf_counter()
    fitted = api.fit_kernels(
        g,
        tuple(fmap.geometry.lr_shape),
        steps=int(options.steps),
        guide_smoothing=float(options.guide_smoothing),
        downsample=options.fit_downsample,
        fit_fraction=float(options.fit_fraction),
        device=device,
        precision=options.precision,
        max_memory=budget,
        progress=core_progress(progress, "fit", plane, n_planes),
        cancel=cancel,
        memory_log=memlog,
        channel_axis=_channel_axis(g),  # guide_from_image gives channels-last; the API never guesses
    )
    seconds["fit"] = time.perf_counter() - t
    return PlaneFit(
        index=tuple(index),
        guide=g,
        features=fmap.features.numpy(),
        geometry=fmap.geometry,
        field=fitted.to("cpu"),
        memlog=memlog,
        backbone=fmap.backbone,
        weights_source=fmap.weights_source,
        seconds=seconds,
    )


def fit_basis(lr_features: Sequence[np.ndarray], options: PipelineOptions):
    """The PCA policy: one basis on the pooled LR features of all planes (seeded subsample)."""
    from .core.pca import fit_pca

    pooled = np.concatenate([np.asarray(f).reshape(np.shape(f)[0], -1) for f in lr_features], axis=1)
    return fit_pca(pooled, 3, int(options.pca_max_samples), int(options.seed))


def render_plane_pca(fit: PlaneFit, basis, options: PipelineOptions, *, progress=None, cancel=None, plane=0, n_planes=1):
    """``(lr_rgb (h, w, 3), hr_rgb (H, W, 3))`` PCA pictures of a plane with ``basis``; also stored on ``fit``."""
    from . import api

    t = time.perf_counter()
    fit.lr_rgb = basis.to_rgb(basis.project(fit.features))
    fit.hr_rgb, _ = api.render_pca(
        fit.features,
        fit.guide,
        fit.field,
        basis=basis,
        device=options.device,
        precision=options.precision,
        max_memory=options.budget,
        progress=core_progress(progress, "pca", plane, n_planes),
        cancel=cancel,
        memory_log=fit.memlog,
    )
    fit.seconds["pca"] = time.perf_counter() - t
    return fit.lr_rgb, fit.hr_rgb


def render_plane_features(fit: PlaneFit, out, options: PipelineOptions, *, progress=None, cancel=None, plane=0, n_planes=1):
    """Render the ``(C, H, W)`` HR features of a plane into ``out`` (written tile by tile)."""
    from . import api

    t = time.perf_counter()
    api.render(
        fit.features,
        fit.guide,
        fit.field,
        device=options.device,
        precision=options.precision,
        max_memory=options.budget,
        out=out,
        progress=core_progress(progress, "render", plane, n_planes),
        cancel=cancel,
        memory_log=fit.memlog,
    )
    if hasattr(out, "close"):
        out.close()
    elif isinstance(out, np.memmap):
        out.flush()
    fit.seconds["render"] = time.perf_counter() - t
    return out


def run_planes(
    planes: Sequence[Tuple[Tuple[int, ...], np.ndarray]],
    options: PipelineOptions,
    *,
    hr_target: Optional[Callable[[int, PlaneFit, Tuple[int, int, int]], Any]] = None,
    channel_axis: int | None | str = "auto",
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelFn] = None,
) -> Tuple[List[PlaneFit], Any]:
    """Fit every plane, then one PCA basis, then the HR PCA (and HR features) of each plane.

    ``hr_target(k, fit, (C, H, W))`` returns where plane k's HR features go (None: skip);
    without it they are not rendered. Returns ``(fits, basis)``.
    """
    options.validate()
    if not planes:
        raise ValueError("nothing to process: no planes were given")
    n = len(planes)
    fits = [
        fit_plane(img, options, index=idx, channel_axis=channel_axis, progress=progress, cancel=cancel, plane=k, n_planes=n)
        for k, (idx, img) in enumerate(planes)
    ]
    basis = fit_basis([f.features for f in fits], options)
    for k, f in enumerate(fits):
        render_plane_pca(f, basis, options, progress=progress, cancel=cancel, plane=k, n_planes=n)
    if hr_target is not None and options.hr_features:
        for k, f in enumerate(fits):
            shape = (int(f.features.shape[0]),) + f.hr_shape
            out = hr_target(k, f, shape)
            if out is None:
                continue
            render_plane_features(f, out, options, progress=progress, cancel=cancel, plane=k, n_planes=n)
            f.hr_features = out
    return fits, basis


# ---------------------------------------------------------------------------------- LR maps
def one_hot(labels: np.ndarray, classes: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """``(K, h, w)`` float32 one-hot of an integer ``(h, w)`` labels map, and the ``K`` class values."""
    labels = np.asarray(labels)
    if classes is None:
        classes = np.unique(labels)
    if classes.size > MAX_LABEL_CLASSES:
        raise ValueError(
            f"the labels map has {classes.size} distinct values; one-hot upsampling is limited to "
            f"{MAX_LABEL_CLASSES} classes (it renders one channel per class)"
        )
    pos = np.searchsorted(classes, labels)
    out = np.zeros((classes.size,) + labels.shape, np.float32)
    np.put_along_axis(out, pos[None], 1.0, axis=0)
    return out, classes


def argmax_labels(probabilities: np.ndarray, classes: np.ndarray, dtype=None) -> np.ndarray:
    """Labels ``(H, W)`` from ``(K, H, W)`` class probabilities (ties: the lower class)."""
    idx = np.argmax(probabilities, axis=0)
    out = classes[idx]
    return out.astype(dtype) if dtype is not None else out


def map_kind(lr_map: np.ndarray, kind: str = "auto") -> str:
    """``"labels"`` or ``"continuous"``: ``auto`` takes 2-D integer / bool maps as labels."""
    if kind not in ("auto", "labels", "continuous"):
        raise ValueError(f"kind={kind!r} (--kind): use auto, labels or continuous")
    arr = np.asarray(lr_map)
    if kind == "auto":
        return "labels" if arr.ndim == 2 and arr.dtype.kind in "biu" else "continuous"
    if kind == "labels" and (arr.ndim != 2 or arr.dtype.kind not in "biu"):
        raise ValueError(f"kind='labels' (--kind) needs a 2-D integer map (h, w); got {arr.dtype} of shape {arr.shape}")
    return kind


def upsample_map(
    lr_map: np.ndarray,
    guide: np.ndarray,
    field,
    options: PipelineOptions,
    *,
    kind: str = "auto",
    classes: Optional[np.ndarray] = None,
    progress=None,
    cancel=None,
    plane: int = 0,
    n_planes: int = 1,
) -> Dict[str, np.ndarray]:
    """Render one LR map with a plane's kernels (``field``; None: fit them for the map's grid).

    Continuous maps (``(C, h, w)`` or ``(h, w)``) return ``{"values": (C, H, W)}``; labels
    return ``{"labels": (H, W), "probabilities": (K, H, W), "classes": (K,)}`` (one-hot
    rendered, then argmax), with the input's integer dtype.
    """
    from . import api

    lr = np.asarray(lr_map)
    kind = map_kind(lr, kind)
    grid = tuple(int(s) for s in lr.shape[-2:])
    H, W = np.shape(guide)[:2]
    if grid[0] > H or grid[1] > W:
        raise ValueError(f"the map's grid {grid[0]} x {grid[1]} is finer than the image ({H} x {W}): nothing to upsample")
    if field is None:
        field = api.fit_kernels(
            guide,
            grid,
            steps=int(options.steps),
            guide_smoothing=float(options.guide_smoothing),
            downsample=options.fit_downsample,
            fit_fraction=float(options.fit_fraction),
            device=options.device,
            precision=options.precision,
            max_memory=options.budget,
            progress=core_progress(progress, "fit", plane, n_planes),
            cancel=cancel,
            channel_axis=_channel_axis(guide),
        ).to("cpu")
    elif tuple(field.shape) != grid:
        raise ValueError(
            f"the kernels are on a {field.shape[0]} x {field.shape[1]} grid but the map is {grid[0]} x {grid[1]}; fit kernels for the map's grid (leave --kernels out)"
        )
    if kind == "labels":
        values, classes = one_hot(lr, classes)
    else:
        values = lr.astype(np.float32, copy=False)
        if not np.isfinite(values).all():
            raise ValueError("the map contains NaN or Inf values; replace them (e.g. np.nan_to_num) first")
    hr = api.render(
        values,
        guide,
        field,
        device=options.device,
        precision=options.precision,
        max_memory=options.budget,
        progress=core_progress(progress, "upsample", plane, n_planes),
        cancel=cancel,
    )
    if kind == "labels":
        return {"labels": argmax_labels(hr, classes, lr.dtype), "probabilities": hr, "classes": classes, "field": field}
    return {"values": hr, "field": field}


# ---------------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class SourceRef:
    """A picklable reference to an image source: a file path (axes from the file or ``axes``)
    or an in-memory array with ``axes``; ``scene`` picks the scene of multi-scene files."""

    path: Optional[str] = None
    array: Any = None
    axes: Optional[str] = None
    scene: int | str | None = None
    name: Optional[str] = None

    def open(self):
        from .sources import from_array, open_image

        if self.path is not None:
            key = (self.path, self.axes, self.scene)
            src = _OPEN.get(key)
            if src is None:
                src = open_image(self.path, axes=self.axes, scene=self.scene)
                _OPEN.clear()  # one source open per process: inputs are opened one at a time
                _OPEN[key] = src
            return src
        return from_array(self.array, self.axes, self.name or "array")


_OPEN: Dict[Any, Any] = {}


@dataclass(frozen=True)
class Task:
    """One unit of work of a job (see the module docstring); picklable."""

    kind: str  # "fit" | "layout" | "render" | "finish"
    stage: int
    source: SourceRef
    options: PipelineOptions
    store: str  # the job's temporary output folder
    plane: Optional[PlaneKey] = None  # (t, z) for "fit" / "render"
    planes: Tuple[PlaneKey, ...] = ()  # every plane of the job
    number: int = 0  # position of the plane in ``planes``


def _plane_dir(store: Path, key: PlaneKey) -> Path:
    return store / ".work" / f"t{key[0]}_z{key[1]}"


def _guide(task: Task, key: PlaneKey) -> np.ndarray:
    src = task.source.open()
    return src.guide(key[0], key[1], task.options.channels)


def _layout(task: Task) -> dict:
    return json.loads((Path(task.store) / ".work" / "layout.json").read_text())


#: Tests only: ``"KIND:FIFO"`` makes every task of that kind (in any process, Dask workers
#: included) write one line to the named pipe ``FIFO``, then wait for a line on the named pipe
#: ``FIFO.go`` before it goes on, so that a test can interrupt a run at a known point (and let
#: the task go on writing while the interruption is handled) without timing guesses.
TEST_PAUSE_ENV = "UPSAMPLE_ANYTHING_TEST_PAUSE"


def _test_pause(task: Task) -> None:
    spec = os.environ.get(TEST_PAUSE_ENV, "")
    kind, _, fifo = spec.partition(":")
    if kind != task.kind or not fifo:
        return
    with open(fifo, "w") as f:  # blocks until the test opens the pipe for reading
        f.write(f"{task.kind} started\n")
    # Wait for the test's line by polling, not by a blocking open or read: a signal that the
    # kernel delivers to another thread of this process does not interrupt a blocked system
    # call of the main thread, while the sleep below returns to Python, which runs the handler.
    fd = os.open(fifo + ".go", os.O_RDONLY | os.O_NONBLOCK)
    try:
        while b"\n" not in _read_available(fd):
            time.sleep(0.01)
    finally:
        os.close(fd)


def _read_available(fd: int) -> bytes:
    try:
        return os.read(fd, 64)
    except BlockingIOError:  # a writer is there but has written nothing yet
        return b""


def run_task(task: Task, progress: Optional[ProgressCallback] = None, cancel: Optional[CancelFn] = None) -> dict:
    """Run one task in this process; returns a small JSON-able summary."""
    check_cancel(cancel, task.kind)
    _test_pause(task)
    fn = {"fit": _task_fit, "layout": _task_layout, "render": _task_render, "finish": _task_finish}[task.kind]
    return fn(task, progress, cancel)


def _task_fit(task: Task, progress, cancel) -> dict:
    key = task.plane
    n = len(task.planes)
    fit = fit_plane(_guide(task, key), task.options, index=key, progress=progress, cancel=cancel, plane=task.number, n_planes=n)
    d = _plane_dir(Path(task.store), key)
    d.mkdir(parents=True, exist_ok=True)
    np.save(d / "lr_features.npy", fit.features)
    fit.field.save(d / "kernels.npz")
    info = {
        "geometry": fit.geometry.to_dict(),
        "backbone": fit.backbone,
        "weights_source": fit.weights_source,
        "seconds": fit.seconds,
        "loss_first": (fit.field.meta.get("loss_per_step") or [None])[0],
        "loss_final": fit.field.meta.get("final_loss"),
        "psnr_db": fit.field.meta.get("psnr"),
        "memory": fit.memlog.peak_planned_bytes if hasattr(fit.memlog, "peak_planned_bytes") else None,
    }
    (d / "fit.json").write_text(json.dumps(info))
    return {"plane": list(key), **info}


def _task_layout(task: Task, progress, cancel) -> dict:
    from . import omezarr
    from .core.field import KernelField
    from .core.pca import PCABasis

    store = Path(task.store)
    src = task.source.open()
    feats = [np.load(_plane_dir(store, k) / "lr_features.npy", mmap_mode="r") for k in task.planes]
    t0 = time.perf_counter()
    basis = fit_basis(feats, task.options)
    np.savez(store / ".work" / "basis.npz", **{k: getattr(basis, k) for k in PCABasis.__dataclass_fields__})
    info0 = json.loads((_plane_dir(store, task.planes[0]) / "fit.json").read_text())
    C = int(feats[0].shape[0])
    h, w = info0["geometry"]["lr_shape"]
    H, W = src.plane_shape
    ts = sorted({k[0] for k in task.planes})
    zs = sorted({k[1] for k in task.planes})
    sizes = src.sizes
    axes = omezarr.output_axes(sizes["T"], sizes["Z"])
    pos = {k: (ts.index(k[0]) if "t" in axes else None, zs.index(k[1]) if "z" in axes else None) for k in task.planes}
    if len(task.planes) != len(ts) * len(zs) and task.options.format == "ome-zarr":
        raise ValueError("the selected planes do not form a t x z grid")  # parse_planes always gives a grid
    hr_sizes = {a: src.pixel_sizes.get(a) for a in "zyx"}
    lr_sizes, lr_shift = omezarr.lr_grid_geometry(hr_sizes, (H, W), (h, w))
    layout = {
        "axes": axes,
        "C": C,
        "lr_shape": [h, w],
        "hr_shape": [H, W],
        "ts": ts,
        "zs": zs,
        "positions": {f"{k[0]},{k[1]}": list(v) for k, v in pos.items()},
    }
    opts = task.options
    dims = {"t": len(ts), "z": len(zs), "y": H, "x": W}
    fit_opts = {
        "guide_smoothing": opts.guide_smoothing,
        "fit_downsample": opts.fit_downsample,
        "fit_fraction": opts.fit_fraction,
        "steps": opts.steps,
    }
    if opts.format == "ome-zarr":
        unit = src.unit if any(hr_sizes.values()) else None
        # Display windows of the features: the range of the LR features, which bounds the HR
        # ones (every HR value is a weighted mean of LR values), known before any render.
        lo = np.min([np.min(np.asarray(f).reshape(C, -1), axis=1) for f in feats], axis=0)
        hi = np.max([np.max(np.asarray(f).reshape(C, -1), axis=1) for f in feats], axis=0)
        windows = [(float(a), float(b) if b > a else float(a) + 1.0) for a, b in zip(lo, hi)]
        feature_channels = dict(
            channel_names=[f"feature {i}" for i in range(C)],
            windows=windows,
            visible=[i == 0 for i in range(C)],  # one channel shown at first, not hundreds
        )
        if opts.hr_features:
            shape = tuple(C if a == "c" else dims[a] for a in axes)
            omezarr.create_image(
                store / "features.ome.zarr",
                shape,
                axes,
                dtype=opts.hr_dtype,
                pixel_sizes=hr_sizes,
                unit=unit,
                name="features",
                attrs={"kind": "hr-features", "backbone": info0["backbone"], "layer": opts.layer},
                **feature_channels,
            )
        lr_dims = dict(dims, y=h, x=w)
        lr_arr = omezarr.create_image(
            store / "lr_features.ome.zarr",
            tuple(C if a == "c" else lr_dims[a] for a in axes),
            axes,
            pixel_sizes=lr_sizes,
            translation=lr_shift,
            unit=unit,
            name="lr_features",
            attrs={"kind": "lr-features", "backbone": info0["backbone"], "layer": opts.layer},
            **feature_channels,
        )
        for k, f in zip(task.planes, feats):
            lr_arr[omezarr._index(omezarr.plane_region(axes, *pos[k]), axes, slice(None), slice(None), slice(None))] = np.asarray(
                f
            )
        fields = {k: KernelField.load(_plane_dir(store, k) / "kernels.npz") for k in task.planes}
        omezarr.write_kernels(
            store / "kernels.ome.zarr", fields, axes, pos, (h, w), len(ts), len(zs), lr_sizes, unit, (H, W), translation=lr_shift
        )
        levels = omezarr.pyramid_levels((H, W))
        omezarr.create_image(
            store / "pca.ome.zarr",
            tuple(3 if a == "c" else dims[a] for a in axes),
            axes,
            pixel_sizes=hr_sizes,
            unit=unit,
            name="pca",
            levels=levels,
            channel_names=("PC1", "PC2", "PC3"),
            windows=[(0.0, 1.0)] * 3,
            chunks=tuple({"t": 1, "c": 1, "z": 1, "y": 256, "x": 256}[a] for a in axes),
            attrs={"kind": "pca", "explained_variance_ratio": basis.explained_variance_ratio.tolist(), "fit": fit_opts},
        )
        layout["pca_levels"] = levels
    else:
        lead = (len(task.planes),) if len(task.planes) > 1 else ()
        if opts.hr_features:
            mm = np.lib.format.open_memmap(
                store / "features_hr.npy", mode="w+", dtype=np.dtype(opts.hr_dtype), shape=lead + (C, H, W)
            )
            del mm
        for k in task.planes:
            name = "kernels.npz" if len(task.planes) == 1 else f"kernels_t{k[0]}_z{k[1]}.npz"
            shutil.copyfile(_plane_dir(store, k) / "kernels.npz", store / name)
    (store / ".work" / "layout.json").write_text(json.dumps(layout))
    return {"layout": layout, "seconds": time.perf_counter() - t0}


def _load_plane_fit(task: Task, key: PlaneKey) -> PlaneFit:
    from .core.features import FeatureGeometry
    from .core.field import KernelField
    from .core.memory import MemoryLog

    d = _plane_dir(Path(task.store), key)
    info = json.loads((d / "fit.json").read_text())
    geo = info["geometry"]
    geometry = FeatureGeometry(
        **{k: (tuple(tuple(b) for b in v) if k == "windows" else tuple(v) if isinstance(v, list) else v) for k, v in geo.items()}
    )
    return PlaneFit(
        index=key,
        guide=_guide(task, key),
        features=np.load(d / "lr_features.npy"),
        geometry=geometry,
        field=KernelField.load(d / "kernels.npz"),
        memlog=MemoryLog(),
        backbone=info["backbone"],
        weights_source=info["weights_source"],
        seconds=dict(info["seconds"]),
    )


def _load_basis(store: Path):
    from .core.pca import PCABasis

    with np.load(store / ".work" / "basis.npz") as z:
        return PCABasis(**{k: z[k] for k in z.files})


def _task_render(task: Task, progress, cancel) -> dict:
    from . import omezarr

    store = Path(task.store)
    key, n, opts = task.plane, len(task.planes), task.options
    layout = _layout(task)
    fit = _load_plane_fit(task, key)
    basis = _load_basis(store)
    lr_rgb, hr_rgb = render_plane_pca(fit, basis, opts, progress=progress, cancel=cancel, plane=task.number, n_planes=n)
    from .core.io import nearest_resize, save_png, side_by_side

    axes = layout["axes"]
    pos = layout["positions"][f"{key[0]},{key[1]}"]
    region = omezarr.plane_region(axes, *pos)
    picture = side_by_side(nearest_resize(lr_rgb, hr_rgb.shape[:2]), hr_rgb)
    png = store / ("pca.png" if n == 1 else f"pca_t{key[0]}_z{key[1]}.png")
    if opts.format == "ome-zarr":
        arr, _, _ = omezarr.open_level0(store / "pca.ome.zarr", mode="r+")
        arr[omezarr._index(region, axes, slice(None), slice(None), slice(None))] = np.moveaxis(hr_rgb, -1, 0)
        if n == 1:
            save_png(png, picture)
    else:
        save_png(png, picture)
    if opts.hr_features:
        C = int(fit.features.shape[0])
        H, W = fit.hr_shape
        if opts.format == "ome-zarr":
            import zarr

            arr = zarr.open_array(str(store / "features.ome.zarr" / "0"), mode="r+")
            out = omezarr.BandWriter(arr, axes, region, (C, H, W))
        else:
            mm = np.load(store / "features_hr.npy", mmap_mode="r+")
            out = mm if mm.ndim == 3 else mm[task.number]
        render_plane_features(fit, out, opts, progress=progress, cancel=cancel, plane=task.number, n_planes=n)
        if isinstance(out, np.memmap) or opts.format == "npy":
            mm.flush()
            del mm, out
    (_plane_dir(store, key) / "render.json").write_text(json.dumps({"seconds": fit.seconds}))
    return {"plane": list(key), "seconds": fit.seconds}


def _task_finish(task: Task, progress, cancel) -> dict:
    from . import omezarr

    store = Path(task.store)
    opts = task.options
    layout = _layout(task)
    if opts.format == "ome-zarr":
        omezarr.build_pyramid(store / "pca.ome.zarr")
    src = task.source.open()
    planes = []
    for k in task.planes:
        d = _plane_dir(store, k)
        info = json.loads((d / "fit.json").read_text())
        info["seconds"].update(json.loads((d / "render.json").read_text())["seconds"])
        planes.append({"t": k[0], "z": k[1], **{a: info[a] for a in ("loss_first", "loss_final", "psnr_db", "seconds")}})
    info0 = json.loads((_plane_dir(store, task.planes[0]) / "fit.json").read_text())
    basis = _load_basis(store)
    total = {s: float(sum(p["seconds"].get(s, 0.0) for p in planes)) for s in ("features", "fit", "pca", "render")}
    shutil.rmtree(store / ".work")
    files = sorted(p.name for p in store.iterdir())
    report = {
        "image": src.name,
        "source": src.path,
        "scene": src.scene,
        "source_sizes": src.sizes,
        "pixel_sizes": src.pixel_sizes,
        "unit": src.unit,
        "dtype": str(src.dtype),
        "channels_used": list(opts.channels) if opts.channels is not None else "all",
        "planes": planes,
        "output_axes": layout["axes"],
        "hr_shape": layout["hr_shape"],
        "lr_shape": layout["lr_shape"],
        "channels": layout["C"],
        "geometry": info0["geometry"],
        "backbone": info0["backbone"],
        "weights_source": info0["weights_source"],
        "fit_loss_first": planes[0]["loss_first"],
        "fit_loss_final": planes[0]["loss_final"],
        "fit_psnr_db": planes[0]["psnr_db"],
        "options": opts.to_dict(),
        "seconds": total,
        "pca_explained_variance": [float(v) for v in basis.explained_variance_ratio],
        "memory": {"process_peak_rss_bytes": _peak_rss()},
        "files": files + ["report.json"],
    }
    tmp = store / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, store / "report.json")
    return report


def _peak_rss() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss * (1 if sys.platform == "darwin" else 1024))


# ---------------------------------------------------------------------------------- jobs
@dataclass
class Job:
    """The tasks that turn one source into one finished output folder (see the module docstring)."""

    source: SourceRef
    options: PipelineOptions
    out: Path  # the final folder
    tmp: Path  # the hidden temporary folder next to it
    tasks: List[Task]
    created_dirs: List[Path] = field(default_factory=list)

    def stages(self) -> List[List[Task]]:
        out: Dict[int, List[Task]] = {}
        for t in self.tasks:
            out.setdefault(t.stage, []).append(t)
        return [out[k] for k in sorted(out)]

    def prepare(self) -> None:
        """Create the temporary folder (and missing parents, remembered for :meth:`abort`)."""
        missing = []
        p = self.tmp.parent
        while not p.exists():
            missing.append(p)
            p = p.parent
        self.tmp.parent.mkdir(parents=True, exist_ok=True)
        self.created_dirs = list(reversed(missing))
        self.tmp.mkdir()

    def commit(self) -> Path:
        """Move the finished folder into place; an earlier result there is replaced only now."""
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out

    def abort(self) -> None:
        """Remove the temporary folder and any folders :meth:`prepare` created; earlier results stay."""
        # zarr writes through a background I/O thread: a chunk write in flight when Ctrl-C
        # arrived can land after a first removal, so remove until the folder stays gone.
        for _ in range(50):
            shutil.rmtree(self.tmp, ignore_errors=True)
            if not self.tmp.exists():
                time.sleep(0.05)
                if not self.tmp.exists():
                    break
            time.sleep(0.1)
        for d in reversed(self.created_dirs):
            try:
                d.rmdir()  # only if empty
            except OSError:
                pass


def plan_job(source: SourceRef | str | Path, options: PipelineOptions, out: str | Path, *, planes: Optional[str] = "all") -> Job:
    """Plan the tasks of one source into the output folder ``out`` (opens the source lazily to
    list its planes; reads no pixels)."""
    if not isinstance(source, SourceRef):
        source = SourceRef(path=str(source))
    options.validate()
    src = source.open()
    if options.channels is not None:
        from .sources import parse_channels

        parse_channels(list(options.channels), src.sizes["C"], "channels (--channels)")
    keys = src.planes(planes)
    out = Path(out)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    ks = tuple(keys)
    base = dict(source=source, options=options, store=str(tmp), planes=ks)
    tasks = [Task("fit", 0, plane=k, number=i, **base) for i, k in enumerate(ks)]
    tasks.append(Task("layout", 1, **base))
    tasks += [Task("render", 2, plane=k, number=i, **base) for i, k in enumerate(ks)]
    tasks.append(Task("finish", 3, **base))
    return Job(source, options, out, tmp, tasks)


def run_job(
    job: Job,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelFn] = None,
    *,
    client: Any = None,
    retries: int = 2,
    **dask_options: Any,
) -> dict:
    """Run a job: prepare, every task, commit (abort on any error or Ctrl-C); returns the report.

    ``client=None``: serially in this process. ``client="local"`` (a process LocalCluster;
    ``dask_options``: ``n_workers``, ``threads_per_worker``, ``memory_limit`` per worker),
    ``"tcp://host:8786"`` (a running scheduler; ``connect_timeout``) or a
    ``distributed.Client``: each stage's tasks run on Dask workers, a failing task is retried
    ``retries`` times and then aborts the job with an error naming its plane
    (:func:`.pipeline_dask.run_job_on_dask`). Outputs are byte-identical to the serial path.
    """
    if client is not None:
        from .pipeline_dask import run_job_on_dask

        return run_job_on_dask(job, progress, cancel, client=client, retries=retries, **dask_options)
    job.prepare()
    try:
        report = {}
        for task in job.tasks:
            report = run_task(task, progress, cancel)
        job.commit()
        return report
    except BaseException:
        job.abort()
        raise


def output_names(paths: Sequence[str | Path]) -> List[str]:
    """Deterministic output folder names: each input's path relative to the inputs' common
    parent, without its image suffix (``a/x.tif``, ``b/x.tif`` -> ``a/x``, ``b/x``); inputs
    that would still collide keep their suffix (``x.tif`` -> ``x_tif``)."""
    resolved = [Path(p).resolve() for p in paths]
    if not resolved:
        return []
    parent = Path(os.path.commonpath([str(p.parent) for p in resolved]))
    rels = [p.relative_to(parent) for p in resolved]

    def strip(rel: Path) -> str:
        name = rel.name
        for suf in (".ome.tiff", ".ome.tif", ".ome.zarr"):
            if name.lower().endswith(suf):
                return str(rel.parent / name[: -len(suf)])
        return str(rel.with_suffix("")) if rel.suffix else str(rel)

    names = [strip(r) for r in rels]
    out = []
    for r, n in zip(rels, names):
        out.append(n if names.count(n) == 1 else str(r.parent / r.name.replace(".", "_")))
    return [n.replace(os.sep, "/") for n in out]
