"""The widgets' side of the computations: no Qt, no napari, torch imported lazily.

The computing itself is :mod:`napari_upsample_anything.pipeline` (shared with the command
line); this module only adapts it to the widgets (options from the widget fields, where the
HR features are kept, the thread bridge), so tests and scripts can run it without a GUI:

* :func:`run_pipeline` -- :func:`~..pipeline.run_planes` (features -> kernel fit -> HR PCA
  -> HR features) for one or more 2D planes, with the HR features kept in memory or in a
  temporary memory-mapped file; :class:`Progress` events through ``progress(event)``,
  ``cancel()`` polled before every optimisation step and tile.
* :func:`upsample_planes` -- :func:`~..pipeline.upsample_map` for each plane of a fitted
  result (refitting for another LR grid when needed, kept for the next time).
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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, Generator, List, Optional, Sequence, Tuple

import numpy as np

from ..core.errors import Cancelled
from ..core.platform_fixes import preload_triton_safely
from ..core.published import PUBLISHED_STEPS
from ..core.units import budget_or_none
from ..pipeline import (  # noqa: F401  (re-exported: the widgets import them from here)
    FIT_DOWNSAMPLE,
    MAX_LABEL_CLASSES,
    PRECISIONS,
    KernelFitOptions,
    PipelineOptions,
    Progress,
    argmax_labels,
    one_hot,
)
from ..pipeline import PlaneFit as PlaneResult

Index = Tuple[int, ...]
ProgressCallback = Callable[["Progress"], Any]
CancelFn = Callable[[], bool]

#: HR feature arrays up to this size stay in memory with ``hr_features="auto"``.
AUTO_IN_MEMORY_BYTES = 2 * 2**30

HR_FEATURE_MODES = ("auto", "memory", "memmap", "none")


# ---------------------------------------------------------------------------------- events
@dataclass
class Outcome:
    """What a guarded computation ended with: ``status`` is "done", "cancelled" or "error"."""

    status: str
    value: Any = None
    error: Optional[BaseException] = None
    seconds: float = 0.0


# ---------------------------------------------------------------------------------- config
#: The settings of a widget run that are not pipeline options: where the HR features are kept.
_WIDGET_ONLY = ("hr_features", "memmap_dir")


class RunConfig:
    """Options of one fit (the main widget's fields): the pipeline's :class:`PipelineOptions`
    plus the widget-only settings, where the HR features are kept.

    ``hr_features``: "auto" | "memory" | "memmap" | "none" (here a storage mode; the
    pipeline's ``hr_features`` is its ``!= "none"``); ``memmap_dir``: where memory-mapped HR
    features go (default: a temporary folder). Every other keyword is a :class:`PipelineOptions`
    field, read and set as a flat attribute (``config.steps``) and checked by the options'
    records: a new option needs no change here.
    """

    def __init__(self, *, hr_features: str = "auto", memmap_dir: Optional[str] = None, **options: Any):
        object.__setattr__(self, "pipeline_options", PipelineOptions(**options))
        self.hr_features = hr_features
        self.memmap_dir = memmap_dir

    def __getattr__(self, name: str) -> Any:
        opts = self.__dict__.get("pipeline_options")  # absent while copy/pickle rebuild the object
        if opts is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(opts, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _WIDGET_ONLY:
            object.__setattr__(self, name, value)
            if name == "hr_features":  # the pipeline renders them unless the mode is "none"
                object.__setattr__(self, "pipeline_options", replace(self.pipeline_options, hr_features=value != "none"))
        elif name in PipelineOptions.__dataclass_fields__:
            object.__setattr__(self, "pipeline_options", replace(self.pipeline_options, **{name: value}))
        else:
            raise AttributeError(f"RunConfig has no option {name!r}")

    def __repr__(self) -> str:
        return f"RunConfig(hr_features={self.hr_features!r}, memmap_dir={self.memmap_dir!r}, {self.pipeline_options!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunConfig) and self.to_dict() == other.to_dict()

    def validate(self) -> None:
        """Check every value (torch-free: this runs in the GUI thread)."""
        if self.hr_features not in HR_FEATURE_MODES:
            raise ValueError(f"hr_features={self.hr_features!r}: use one of {HR_FEATURE_MODES}")
        self.options().validate()

    def to_dict(self) -> dict:
        return {**self.pipeline_options.to_dict(), "hr_features": self.hr_features, "memmap_dir": self.memmap_dir}

    def options(self) -> PipelineOptions:
        """The pipeline's options for these widget fields (the HR-feature storage stays here)."""
        opts = self.pipeline_options
        return replace(
            opts,
            input_size=opts.input_size or None,
            weights=opts.weights or None,
            max_memory=opts.budget,
        )


# ---------------------------------------------------------------------------------- results
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
    storage: Optional[FeatureStorage] = None


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

    The work is :func:`~..pipeline.run_planes` (one PCA basis fitted on the LR features of
    all planes, so that colours mean the same on every slice); this function only decides
    where the HR features are kept (``config.hr_features``). Device memory is released (CUDA
    cache emptied) at the end.
    """
    preload_triton_safely()  # before timm (-> torchvision -> torch._dynamo -> triton) is imported
    import torch  # noqa: F401  (the first run pays the import here, in the worker thread)

    from ..core.device import resolve_device
    from ..pipeline import run_planes

    config.validate()
    options = config.options()
    device = resolve_device(config.device)
    storage_box: list = []
    paths: Dict[int, Optional[str]] = {}

    def hr_target(k: int, fit: PlaneResult, shape: Tuple[int, int, int]):
        name = "hr_features" + "".join(f"_{i}" for i in fit.index)
        out, paths[k] = _hr_feature_target(config.hr_features, shape, storage_box, config.memmap_dir, name)
        return out

    try:
        fits, basis = run_planes(
            planes, options, hr_target=hr_target, channel_axis=channel_axis, progress=progress, cancel=cancel
        )
    except BaseException:
        if storage_box:
            storage_box[0].dispose()
        raise
    finally:
        free_device_memory(device)
    for k, f in enumerate(fits):
        f.hr_features_path = paths.get(k)
    seconds = {s: float(sum(f.seconds.get(s, 0.0) for f in fits)) for s in ("features", "fit", "pca", "render")}
    return PipelineResult(
        planes=fits,
        basis=basis,
        config=config,
        device=str(device),
        backbone=fits[0].backbone if fits else config.backbone,
        weights_source=fits[0].weights_source if fits else "",
        seconds=seconds,
        storage=storage_box[0] if storage_box else None,
    )


# ---------------------------------------------------------------------------------- LR maps
@dataclass
class UpsampleRequest:
    """One LR map (per plane) to render with the kernels of a fitted result."""

    maps: List[np.ndarray]  # per plane: (C, h, w) float maps, or (h, w) integer labels
    planes: List[PlaneResult]
    labels: bool = False
    device: str = "auto"
    precision: str = "auto"
    max_memory: Optional[str] = None
    refit_steps: int = PUBLISHED_STEPS


def upsample_planes(
    request: UpsampleRequest,
    *,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelFn] = None,
) -> List[Dict[str, np.ndarray]]:
    """Render each plane's LR map with that plane's kernels (:func:`~..pipeline.upsample_map`).

    A map whose grid differs from the fitted one gets kernels fitted for its grid on the same
    guide with the image's fit options (kept in ``plane.extra_fields`` for the next time).
    Continuous maps return ``{"values": (C, H, W)}``; labels return ``{"labels": (H, W),
    "probabilities": (K, H, W), "classes": (K,)}`` (one-hot rendered, then argmax).
    """
    from ..core.device import resolve_device
    from ..pipeline import upsample_map

    device = resolve_device(request.device)
    n = len(request.planes)
    classes = None
    if request.labels:  # one class list for all planes, so the labels mean the same everywhere
        classes = np.unique(np.concatenate([np.unique(np.asarray(m)) for m in request.maps]))
    out: List[Dict[str, np.ndarray]] = []
    try:
        for k, (lr, plane) in enumerate(zip(request.maps, request.planes)):
            lr = np.asarray(lr)
            grid = tuple(int(s) for s in lr.shape[-2:])
            fld = plane.field if grid == plane.lr_shape else plane.extra_fields.get(grid)
            fit = KernelFitOptions.fitted_with(plane.field, steps=int(request.refit_steps))  # as the image's
            options = PipelineOptions(
                **asdict(fit),
                device=str(device),
                precision=request.precision,
                max_memory=budget_or_none(request.max_memory),
            )
            res = upsample_map(
                lr,
                plane.guide,
                fld,
                options,
                kind="labels" if request.labels else "continuous",
                classes=classes,
                progress=progress,
                cancel=cancel,
                plane=k,
                n_planes=n,
            )
            if fld is None:
                plane.extra_fields[grid] = res["field"]
            res.pop("field")
            out.append(res)
    finally:
        free_device_memory(device)
    return out


# ---------------------------------------------------------------------------------- saving
def save_hr_features(result: PipelineResult, path: str | os.PathLike, leading_shape: Tuple[int, ...] = ()) -> Path:
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


def save_kernels(result: PipelineResult, path: str | os.PathLike) -> List[Path]:
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
        # Starting and joining share a lock: a shutdown that comes while the worker is about
        # to start either sees the started thread or stops it from starting (a thread that
        # is set but not yet started cannot be joined; seen in CI).
        self._lock = threading.Lock()

    def start(self, thread: threading.Thread) -> bool:
        """Start ``thread`` as this run's compute thread; False (not started) when cancelled."""
        with self._lock:
            if self.cancelled:
                return False
            thread.start()
            self.thread = thread
            return True

    def cancel(self) -> None:
        self.cancel_event.set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait for the compute thread; True when it is finished (or never started)."""
        with self._lock:
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
    q: queue.SimpleQueue[Any] = queue.SimpleQueue()
    box: Dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args, progress=q.put, cancel=handle.cancel_event.is_set, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            box["error"] = exc
        finally:
            q.put(_END)

    thread = threading.Thread(target=target, name="upsample-anything-compute", daemon=True)
    if not handle.start(thread):
        raise Cancelled("cancelled before the computation started")
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
    # The first line is what the status line and the toast show: it says what to do.
    if name == "WeightsUnavailableError":
        return (
            "No backbone weights on this machine: choose a weights file under 'Weights file', or tick "
            "'Random weights (testing only)' to try the plugin without real features.\n" + text
        )
    if isinstance(exc, MemoryBudgetError):
        return "Raise the memory budget, or leave it at 'auto': " + text
    if isinstance(exc, (ValueError, TypeError, FileNotFoundError)):
        return text
    return f"{name}: {text}"
