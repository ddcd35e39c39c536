"""The widgets' computations, through the core only; no Qt, no napari, torch imported lazily.

Everything the dock widgets compute goes through the plain functions here, so tests and
scripts can run them without a GUI:

* :func:`run_pipeline` -- features -> kernel fit -> HR PCA (-> HR features) for one or more
  2D planes, reporting :class:`Progress` events through ``progress(event)`` and polling
  ``cancel()`` (the core's protocol: checked before every optimisation step and tile).
* :func:`upsample_planes` -- any LR map (continuous, or labels as one-hot) rendered with the
  kernels of a fitted result (refitting for another LR grid when needed).
* :func:`iter_events` / :func:`guarded` -- the bridge to napari's generator
  ``thread_worker``: the computation runs in a helper thread and the generator yields its
  progress events (one per optimisation step / tile / window) and returns an
  :class:`Outcome`. The generator never raises: napari's ``GeneratorWorker`` treats any
  ``RuntimeError`` from a generator as "the worker was deleted" and drops it silently, and
  both :class:`~..core.errors.Cancelled` and the missing-weights error are RuntimeErrors.
"""

from __future__ import annotations

import os
import queue
import shutil
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Generator, List, Optional, Sequence, Tuple

import numpy as np

from ..core.errors import Cancelled
from ..core.platform_fixes import preload_triton_safely

Index = Tuple[int, ...]
ProgressCallback = Callable[["Progress"], Any]
CancelFn = Callable[[], bool]

#: HR feature arrays up to this size stay in memory with ``hr_features="auto"``.
AUTO_IN_MEMORY_BYTES = 2 * 2**30
#: Labels layers with more distinct values than this are refused (one-hot would be too large).
MAX_LABEL_CLASSES = 256

HR_FEATURE_MODES = ("auto", "memory", "memmap", "none")
FIT_DOWNSAMPLE = ("bicubic", "area")  # the fit's LR input (core.fit.fit_field)


# ---------------------------------------------------------------------------------- events
@dataclass(frozen=True)
class Progress:
    """One progress event: ``done`` of ``total`` units of ``stage`` on plane ``plane``.

    Stages: ``"features"`` (backbone loading and ViT windows), ``"fit"`` (Adam steps; ``loss``
    set), ``"pca"`` (tiles of the 3-channel HR PCA render), ``"render"`` (tiles of the
    C-channel HR feature render), ``"upsample"`` (tiles of an LR map render), ``"tile"`` is
    never used (tile records go to the memory log).
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


@dataclass
class Outcome:
    """What a guarded computation ended with: ``status`` is "done", "cancelled" or "error"."""

    status: str
    value: Any = None
    error: Optional[BaseException] = None
    seconds: float = 0.0


# ---------------------------------------------------------------------------------- config
@dataclass
class RunConfig:
    """Options of one fit (the main widget's fields)."""

    backbone: str = "dinov2_vits14"
    layer: int = -1
    steps: int = 51
    device: str = "auto"
    precision: str = "auto"
    max_memory: Optional[str] = None  # None / "auto" / "2GB" ...
    pretrained: bool = True
    weights: Optional[str] = None
    input_size: Optional[int] = None
    hr_features: str = "auto"  # "auto" | "memory" | "memmap" | "none"
    memmap_dir: Optional[str] = None  # where memory-mapped HR features go (default: a temp dir)
    guide_smoothing: float = 0.0  # Gaussian sigma (px) on the image before fit and render; 0 = published
    fit_downsample: str = "bicubic"  # the fit's LR input: "bicubic" (published) or "area"

    def validate(self) -> None:
        from ..core.units import (
            parse_bytes,  # torch-free: validation runs in the GUI thread
        )

        if int(self.steps) != self.steps or self.steps < 0:
            raise ValueError(f"steps={self.steps!r}: give a non-negative whole number (published: 51)")
        parse_bytes(None if self.max_memory in (None, "", "auto") else self.max_memory, "memory budget")
        if self.hr_features not in HR_FEATURE_MODES:
            raise ValueError(f"hr_features={self.hr_features!r}: use one of {HR_FEATURE_MODES}")
        if not (float(self.guide_smoothing) >= 0):
            raise ValueError(f"guide smoothing={self.guide_smoothing!r}: give a Gaussian sigma >= 0 in pixels (0 = off)")
        if self.fit_downsample not in FIT_DOWNSAMPLE:
            raise ValueError(f"fit input={self.fit_downsample!r}: use one of {FIT_DOWNSAMPLE}")
        if self.weights:
            p = Path(self.weights).expanduser()
            if not p.is_file():
                raise FileNotFoundError(f"weights file {str(p)!r} does not exist")

    @property
    def budget(self) -> Optional[str]:
        return None if self.max_memory in (None, "", "auto") else self.max_memory

    def to_dict(self) -> dict:
        return dict(self.__dict__)


# ---------------------------------------------------------------------------------- results
@dataclass(eq=False)
class PlaneResult:
    """Everything computed for one 2D plane of the source image.

    ``guide`` is the channels-last image the kernels were fitted on (a view of the layer data
    when possible); ``features`` the ``(C, h, w)`` LR features; ``hr_features`` the
    ``(C, H, W)`` HR features (numpy array, ``numpy.memmap`` in a temporary ``.npy`` file, or
    None when not computed); ``lr_rgb`` / ``hr_rgb`` the PCA pictures.
    """

    index: Index
    guide: np.ndarray
    features: np.ndarray
    geometry: Any  # core.features.FeatureGeometry
    field: Any  # core.field.KernelField on the CPU
    memlog: Any  # core.memory.MemoryLog
    lr_rgb: Optional[np.ndarray] = None
    hr_rgb: Optional[np.ndarray] = None
    hr_features: Optional[np.ndarray] = None
    hr_features_path: Optional[str] = None
    extra_fields: Dict[Tuple[int, int], Any] = field(default_factory=dict)  # LR grid -> refitted field

    @property
    def lr_shape(self) -> Tuple[int, int]:
        return tuple(self.geometry.lr_shape)  # type: ignore[return-value]

    @property
    def hr_shape(self) -> Tuple[int, int]:
        return tuple(self.geometry.image_shape)  # type: ignore[return-value]

    @property
    def factor(self) -> Tuple[float, float]:
        """HR pixels per LR cell ``(H/h, W/w)``."""
        return tuple(float(s) for s in self.geometry.scale)  # type: ignore[return-value]


@dataclass(eq=False)
class PipelineResult:
    """What :func:`run_pipeline` returns: one :class:`PlaneResult` per plane, and the shared PCA basis."""

    planes: List[PlaneResult]
    basis: Any  # core.pca.PCABasis
    config: RunConfig
    device: str
    backbone: str
    weights_source: str
    seconds: Dict[str, float] = field(default_factory=dict)
    storage: Optional["FeatureStorage"] = None


class FeatureStorage:
    """A temporary folder holding memory-mapped HR features; removed when disposed or collected."""

    def __init__(self, parent: Optional[str] = None):
        self.path = Path(tempfile.mkdtemp(prefix="upsample-anything-", dir=parent))
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.path), True)

    def new_array(self, name: str, shape: Tuple[int, ...], dtype=np.float32) -> np.memmap:
        return np.lib.format.open_memmap(self.path / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)

    def dispose(self) -> None:
        self._finalizer()

    @property
    def alive(self) -> bool:
        return self._finalizer.alive


def _hr_feature_target(mode: str, shape: Tuple[int, ...], storage_box: list, memmap_dir: Optional[str], name: str):
    """Where the HR features of one plane go: a numpy array, a memmap, or None."""
    if mode == "none":
        return None, None
    nbytes = int(np.prod(shape)) * 4
    if mode == "auto":
        try:
            import psutil

            avail = int(psutil.virtual_memory().available)
        except Exception:  # pragma: no cover
            avail = 8 * 2**30
        mode = "memory" if nbytes <= min(AUTO_IN_MEMORY_BYTES, avail // 4) else "memmap"
    if mode == "memory":
        return np.empty(shape, np.float32), None
    if not storage_box:
        storage_box.append(FeatureStorage(memmap_dir))
    arr = storage_box[0].new_array(name, shape)
    return arr, arr.filename


# ---------------------------------------------------------------------------------- pipeline
def _report(progress: Optional[ProgressCallback], event: Progress) -> None:
    if progress is not None:
        progress(event)


def _core_progress(progress: Optional[ProgressCallback], stage: str, plane: int, n_planes: int):
    """A core ``progress(done, total, info)`` callback that emits :class:`Progress` events."""
    if progress is None:
        return None

    def cb(done: int, total: int, info: dict) -> None:
        loss = info.get("loss")
        progress(Progress(stage, int(done), int(total), plane, n_planes, None if loss is None else float(loss)))

    return cb


def run_pipeline(
    planes: Sequence[Tuple[Index, np.ndarray]],
    config: RunConfig,
    *,
    channel_axis: Optional[int] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelFn] = None,
) -> PipelineResult:
    """Features, kernel fit, HR PCA and (optionally) HR features for each plane.

    Parameters
    ----------
    planes : sequence of ``(index, image)``
        2D images in any layout :func:`~..core.features.extract_features` accepts, with the
        slice index they came from (``()`` for a 2D layer).
    config : RunConfig
    channel_axis : int, optional
        Channel axis of every image (``-1`` for channels-last multichannel planes; None for
        gray / RGB, which are recognised on their own).
    progress : callable(Progress), optional
    cancel : callable() -> bool, optional
        Polled before every window, optimisation step and tile; True raises ``Cancelled``.

    One PCA basis is fitted on the LR features of all planes together, so that colours mean
    the same on every slice. Device memory is released (CUDA cache emptied) at the end.
    """
    preload_triton_safely()  # before timm (-> torchvision -> torch._dynamo -> triton) is imported
    import torch  # noqa: F401  (the first run pays the import here, in the worker thread)

    from .. import api
    from ..core.device import resolve_device
    from ..core.features import extract_features
    from ..core.io import guide_from_image
    from ..core.memory import MemoryLog, parse_bytes
    from ..core.pca import fit_pca

    config.validate()
    if not planes:
        raise ValueError("nothing to process: no planes were given")
    device = resolve_device(config.device)
    budget = parse_bytes(config.budget, "memory budget")
    n = len(planes)
    seconds = {"features": 0.0, "fit": 0.0, "pca": 0.0, "render": 0.0}
    results: List[PlaneResult] = []
    backbone_name, weights_source = config.backbone, ""
    storage_box: list = []
    try:
        for k, (index, image) in enumerate(planes):
            _report(progress, Progress("features", 0, 1, k, n))
            t = time.perf_counter()
            fmap = extract_features(
                image,
                config.backbone,
                layer=int(config.layer),
                input_size=config.input_size or None,
                weights=config.weights or None,
                pretrained=bool(config.pretrained),
                device=device,
                max_memory=budget,
                progress=_core_progress(progress, "features", k, n),
                cancel=cancel,
                channel_axis=channel_axis,
            )
            seconds["features"] += time.perf_counter() - t
            backbone_name, weights_source = fmap.backbone, fmap.weights_source
            guide = guide_from_image(image, channel_axis)
            memlog = MemoryLog()
            t = time.perf_counter()
            fitted = api.fit_kernels(
                guide,
                tuple(fmap.geometry.lr_shape),
                steps=int(config.steps),
                guide_smoothing=float(config.guide_smoothing),
                downsample=config.fit_downsample,
                channel_axis=-1 if guide.ndim == 3 else None,  # guide_from_image gives channels-last
                device=device,
                precision=config.precision,
                max_memory=budget,
                progress=_core_progress(progress, "fit", k, n),
                cancel=cancel,
                memory_log=memlog,
            )
            seconds["fit"] += time.perf_counter() - t
            results.append(
                PlaneResult(
                    index=tuple(index),
                    guide=guide,
                    features=fmap.features.numpy(),
                    geometry=fmap.geometry,
                    field=fitted.to("cpu"),
                    memlog=memlog,
                )
            )
            del fmap

        # One basis for all planes (fitted on the LR features, as in the paper's figures).
        t = time.perf_counter()
        lr_all = np.concatenate([r.features.reshape(r.features.shape[0], -1) for r in results], axis=1)
        basis = fit_pca(lr_all, 3, 100_000, 0)
        del lr_all
        for k, r in enumerate(results):
            r.lr_rgb = basis.to_rgb(basis.project(r.features))
            r.hr_rgb, _ = api.render_pca(
                r.features,
                r.guide,
                r.field,
                basis=basis,
                device=device,
                precision=config.precision,
                max_memory=budget,
                progress=_core_progress(progress, "pca", k, n),
                cancel=cancel,
                memory_log=r.memlog,
            )
        seconds["pca"] = time.perf_counter() - t

        t = time.perf_counter()
        for k, r in enumerate(results):
            C = int(r.features.shape[0])
            H, W = r.hr_shape
            name = "hr_features" + "".join(f"_{i}" for i in r.index)
            out, path = _hr_feature_target(config.hr_features, (C, H, W), storage_box, config.memmap_dir, name)
            if out is None:
                continue
            api.render(
                r.features,
                r.guide,
                r.field,
                device=device,
                precision=config.precision,
                max_memory=budget,
                out=out,
                progress=_core_progress(progress, "render", k, n),
                cancel=cancel,
                memory_log=r.memlog,
            )
            if isinstance(out, np.memmap):
                out.flush()
            r.hr_features, r.hr_features_path = out, path
        seconds["render"] = time.perf_counter() - t
    except BaseException:
        if storage_box:
            storage_box[0].dispose()
        raise
    finally:
        free_device_memory(device)
    return PipelineResult(
        planes=results,
        basis=basis,
        config=config,
        device=str(device),
        backbone=backbone_name,
        weights_source=weights_source,
        seconds=seconds,
        storage=storage_box[0] if storage_box else None,
    )


# ---------------------------------------------------------------------------------- LR maps
def one_hot(labels: np.ndarray, classes: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """``(K, h, w)`` float32 one-hot of an integer ``(h, w)`` labels map, and the ``K`` class values."""
    labels = np.asarray(labels)
    if classes is None:
        classes = np.unique(labels)
    if classes.size > MAX_LABEL_CLASSES:
        raise ValueError(
            f"the labels layer has {classes.size} distinct values; one-hot upsampling is limited to "
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


@dataclass
class UpsampleRequest:
    """One LR map (per plane) to render with the kernels of a fitted result."""

    maps: List[np.ndarray]  # per plane: (C, h, w) float maps, or (h, w) integer labels
    planes: List[PlaneResult]
    labels: bool = False
    device: str = "auto"
    precision: str = "auto"
    max_memory: Optional[str] = None
    refit_steps: int = 51


def upsample_planes(
    request: UpsampleRequest,
    *,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelFn] = None,
) -> List[Dict[str, np.ndarray]]:
    """Render each plane's LR map with that plane's kernels.

    A map whose grid differs from the fitted one gets kernels fitted for its grid on the same
    guide (kept in ``plane.extra_fields`` for the next time). Continuous maps return
    ``{"values": (C, H, W)}``; labels return ``{"labels": (H, W), "probabilities": (K, H, W),
    "classes": (K,)}`` (one-hot rendered, then argmax).
    """
    from .. import api
    from ..core.device import resolve_device
    from ..core.units import parse_bytes

    device = resolve_device(request.device)
    budget = parse_bytes(None if request.max_memory in (None, "", "auto") else request.max_memory, "memory budget")
    n = len(request.planes)
    classes = None
    if request.labels:  # one class list for all planes, so the labels mean the same everywhere
        classes = np.unique(np.concatenate([np.unique(np.asarray(m)) for m in request.maps]))
    out: List[Dict[str, np.ndarray]] = []
    try:
        for k, (lr, plane) in enumerate(zip(request.maps, request.planes)):
            lr = np.asarray(lr)
            grid = tuple(int(s) for s in lr.shape[-2:])
            H, W = plane.hr_shape
            if grid[0] > H or grid[1] > W:
                raise ValueError(
                    f"the map's grid {grid[0]} x {grid[1]} is finer than the image ({H} x {W}): nothing to upsample"
                )
            if grid == plane.lr_shape:
                fld = plane.field
            elif grid in plane.extra_fields:
                fld = plane.extra_fields[grid]
            else:
                fld = api.fit_kernels(
                    plane.guide,
                    grid,
                    steps=int(request.refit_steps),
                    guide_smoothing=api.fitted_smoothing(plane.field),  # same fit options as the image's
                    downsample=plane.field.options.downsample if plane.field.options else "bicubic",
                    channel_axis=-1 if plane.guide.ndim == 3 else None,
                    device=device,
                    precision=request.precision,
                    max_memory=budget,
                    progress=_core_progress(progress, "fit", k, n),
                    cancel=cancel,
                ).to("cpu")
                plane.extra_fields[grid] = fld
            if request.labels:
                values, _ = one_hot(lr, classes)
            else:
                values = lr.astype(np.float32, copy=False)
                if values.ndim == 2:
                    values = values[None]
                if not np.isfinite(values).all():
                    values = np.nan_to_num(values)
            hr = api.render(
                values,
                plane.guide,
                fld,
                device=device,
                precision=request.precision,
                max_memory=budget,
                progress=_core_progress(progress, "upsample", k, n),
                cancel=cancel,
            )
            if request.labels:
                out.append({"labels": argmax_labels(hr, classes, lr.dtype), "probabilities": hr, "classes": classes})
            else:
                out.append({"values": hr})
    finally:
        free_device_memory(device)
    return out


# ---------------------------------------------------------------------------------- saving
def save_hr_features(result: PipelineResult, path: "str | os.PathLike", leading_shape: Tuple[int, ...] = ()) -> Path:
    """Write the HR features as one ``.npy``: ``(C, H, W)`` for one plane, ``leading + (C, H, W)`` for stacks.

    Written plane by plane through a memory map, so it never needs the whole array in RAM.
    """
    path = Path(path)
    if path.suffix != ".npy":
        path = path.with_suffix(".npy")
    planes = result.planes
    if any(p.hr_features is None for p in planes):
        raise ValueError("the HR features were not computed for this result (HR features: 'none'); run again to compute them")
    C, H, W = planes[0].hr_features.shape
    if len(planes) == 1:
        np.save(path, np.asarray(planes[0].hr_features))
        return path
    lead = tuple(leading_shape) if leading_shape else (len(planes),)
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=lead + (C, H, W))
    flat = mm.reshape((-1, C, H, W))
    for k, p in enumerate(planes):
        flat[k] = p.hr_features
    mm.flush()
    del mm
    return path


def save_kernels(result: PipelineResult, path: "str | os.PathLike") -> List[Path]:
    """Save each plane's :class:`KernelField` (``.npz``); stacks get ``<stem>_<index>.npz`` files."""
    path = Path(path)
    if len(result.planes) == 1:
        return [result.planes[0].field.save(path)]
    stem = path.with_suffix("") if path.suffix == ".npz" else path
    return [p.field.save(Path(f"{stem}_" + "_".join(map(str, p.index)) + ".npz")) for p in result.planes]


# ---------------------------------------------------------------------------------- device
def free_device_memory(device=None) -> None:
    """Release cached device memory (CUDA caching allocator); a no-op without torch loaded."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None:
        return
    try:
        if torch.cuda.is_available() and (device is None or getattr(device, "type", str(device)).startswith("cuda")):
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover - never fail on cleanup
        pass


def available_devices() -> List[str]:
    """Device names this machine offers (imports torch): ``auto``, ``cpu``, ``cuda:N``..., ``mps``."""
    preload_triton_safely()
    import torch

    out = ["auto", "cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out


# ---------------------------------------------------------------------------------- bridge
class RunHandle:
    """Cancel flag and compute thread of one run, shared by the GUI and the worker thread."""

    def __init__(self) -> None:
        self.cancel_event = threading.Event()
        self.thread: Optional[threading.Thread] = None

    def cancel(self) -> None:
        self.cancel_event.set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait for the compute thread; True when it is finished (or never started)."""
        t = self.thread
        if t is None:
            return True
        t.join(timeout)
        return not t.is_alive()


_END = object()


def iter_events(fn: Callable[..., Any], handle: RunHandle, *args, **kwargs) -> Generator[Progress, None, Any]:
    """Run ``fn(*args, progress=..., cancel=..., **kwargs)`` in a helper thread; yield its events.

    The core reports progress through callbacks from inside its loops, where a generator
    cannot yield; so the computation runs in its own thread and this generator (run by
    napari's worker thread) passes each event on as it arrives. Returns ``fn``'s result or
    raises its exception. Closing the generator early cancels the computation and waits for it.
    """
    q: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
    box: Dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args, progress=q.put, cancel=handle.cancel_event.is_set, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            box["error"] = exc
        finally:
            q.put(_END)

    thread = threading.Thread(target=target, name="upsample-anything-compute", daemon=True)
    handle.thread = thread
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                break
            yield item
    finally:
        if thread.is_alive():  # closed early: stop the computation
            handle.cancel()
            thread.join()
    if "error" in box:
        raise box.pop("error")
    return box.get("value")


def guarded(fn: Callable[..., Any], handle: RunHandle, *args, **kwargs) -> Generator[Progress, None, Outcome]:
    """:func:`iter_events` that never raises: returns an :class:`Outcome` instead."""
    t0 = time.perf_counter()
    try:
        value = yield from iter_events(fn, handle, *args, **kwargs)
    except Cancelled:
        return Outcome("cancelled", seconds=time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - shown to the user as a notification
        return Outcome("error", error=exc, seconds=time.perf_counter() - t0)
    if handle.cancelled and value is None:
        return Outcome("cancelled", seconds=time.perf_counter() - t0)
    return Outcome("done", value=value, seconds=time.perf_counter() - t0)


def error_message(exc: BaseException) -> str:
    """The text shown to the user for an exception from a run (no traceback)."""
    from ..core.errors import MemoryBudgetError

    name = type(exc).__name__
    text = str(exc).strip() or name
    if name == "WeightsUnavailableError":
        return (
            text
            + "\nIn the widget: choose a local weights file under 'Weights file', or tick "
            "'Random weights' to try the plugin without real features."
        )
    if isinstance(exc, MemoryBudgetError):
        return text + "\nRaise the memory budget, or leave it at 'auto'."
    if isinstance(exc, (ValueError, TypeError, FileNotFoundError)):
        return text
    return f"{name}: {text}"
