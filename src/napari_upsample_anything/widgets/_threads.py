"""Work off the GUI thread: torch's thread count, short background tasks, and the run driver.

Every worker a widget starts is owned by it: :class:`BackgroundTask` joins its thread and
:class:`Runner` waits on its own thread pool, so a closing widget stops and joins its work.
"""

from __future__ import annotations

import functools
import sys
import threading
import time
import weakref
from typing import Any, Callable, Optional

from qtpy.QtCore import QObject, QThreadPool, QTimer, Signal
from qtpy.QtWidgets import QSpinBox

from ._pipeline import Outcome, Progress, RunHandle, free_device_memory, guarded
from ._registry import emit, get_state

#: Seconds a closing widget waits for its computation to stop (it stops within one step).
SHUTDOWN_TIMEOUT = 60.0


def threads_spinbox(tooltip: str) -> QSpinBox:
    """The "Threads" field: 1-256, starting at :func:`default_threads`."""
    spin = QSpinBox()
    spin.setRange(1, 256)
    spin.setValue(default_threads())
    spin.setToolTip(tooltip)
    return spin


def default_threads() -> int:
    """Torch threads per run when the user does not choose: half the CPU cores, at least one.

    Measured (docs/plugin.md, "Threads"): on a busy 2-core machine a fit with torch's default
    (all cores) ran up to 10x slower than with one thread, because the cores were shared
    with other processes; half the cores leaves room for napari's own drawing thread.
    """
    import os

    return max(1, (os.cpu_count() or 2) // 2)


def call_with_threads(threads: Optional[int], fn: Callable[..., Any], *args, **kwargs) -> Any:
    """``fn(*args, **kwargs)`` with torch limited to ``threads`` intra-op threads, restored afterwards.

    The one place where the widgets set torch's thread count (``torch.set_num_threads`` is
    process-wide: the setting in force when a computation starts is the one it runs with).
    ``threads`` None or 0 leaves torch's setting alone.
    """
    if not threads:
        return fn(*args, **kwargs)
    from ..core.platform_fixes import preload_triton_safely

    preload_triton_safely()  # before anything imports torch
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(before)


class BackgroundTask(QObject):
    """A short computation (device listing, cost estimate) in a plain Python thread, owned by a widget.

    ``start(fn, *args)`` runs ``fn(*args, cancel=...)`` in a non-daemon thread that touches no
    Qt object; a timer on the GUI thread picks up the result and emits :attr:`done` (value)
    or :attr:`failed` (exception). A ``start`` while one is running cancels it and runs the
    new one afterwards (only the latest request counts). When the owning widget goes away
    the timer goes with it, so a late result is never delivered to deleted objects, and
    :meth:`shutdown` cancels and joins the thread.
    """

    done = Signal(object)
    failed = Signal(object)

    def __init__(self, parent: QObject, poll_ms: int = 50):
        super().__init__(parent)
        self._timer = QTimer(self)
        self._timer.setInterval(poll_ms)
        self._timer.timeout.connect(self._poll)
        self._thread: Optional[threading.Thread] = None
        self._box: dict = {}
        self._cancel = threading.Event()
        self._next: Optional[tuple] = None
        self._closed = False

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self, fn: Callable[..., Any], *args, **kwargs) -> None:
        if self._closed:
            return
        if self._thread is not None:
            self._next = (fn, args, kwargs)
            self._cancel.set()
            return
        box: dict = {}
        cancel = threading.Event()

        def target() -> None:
            try:
                box["value"] = fn(*args, cancel=cancel.is_set, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - handed to the GUI thread
                box["error"] = exc

        self._box, self._cancel = box, cancel
        self._thread = threading.Thread(target=target, name="upsample-anything-background", daemon=False)
        self._thread.start()
        self._timer.start()

    def _poll(self) -> None:
        thread = self._thread
        if thread is None or thread.is_alive():
            return
        self._thread = None
        self._timer.stop()
        box, cancelled = self._box, self._cancel.is_set()
        if self._next is not None:
            fn, args, kwargs = self._next
            self._next = None
            self.start(fn, *args, **kwargs)
            return
        if cancelled or self._closed:
            return
        if "error" in box:
            self.failed.emit(box["error"])
        else:
            self.done.emit(box.get("value"))

    def cancel(self) -> None:
        """Cancel the running job (and a queued one); nothing is delivered for it."""
        self._next = None
        self._cancel.set()

    def shutdown(self, timeout: float = 0.0) -> bool:
        """Cancel; wait up to ``timeout`` seconds for the thread; True when it has ended."""
        self._closed = True
        self._next = None
        self._cancel.set()
        try:
            self._timer.stop()
        except RuntimeError:  # the timer went with its widget
            pass
        thread = self._thread
        if thread is None:
            return True
        if timeout > 0:
            thread.join(timeout)
        return not thread.is_alive()


#: Runners with a computation in flight. napari stops the workers it started itself when the
#: application quits; ours run in their runner's own pool, so the runners are stopped here.
_IN_FLIGHT: weakref.WeakSet[Runner] = weakref.WeakSet()
_QUIT_HOOKED: list = []


def _stop_all_runners() -> None:
    """Cancel and join every runner's computation (the application is quitting)."""
    for runner in list(_IN_FLIGHT):
        runner.shutdown()


def _hook_application_quit() -> None:
    """Connect :func:`_stop_all_runners` to the application's ``aboutToQuit``, once per application."""
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance()
    if app is not None and not any(a is app for a in _QUIT_HOOKED):
        app.aboutToQuit.connect(_stop_all_runners)
        _QUIT_HOOKED.append(app)


class Runner(QObject):
    """Runs one computation at a time in a napari generator ``thread_worker``.

    ``start(fn, *args, **kwargs)`` runs ``fn(*args, progress=..., cancel=..., **kwargs)``
    (the :mod:`._pipeline` convention) through :func:`._pipeline.guarded`: every progress
    event is a yield of the worker (shown in napari's activity dock as a progress bar and
    re-emitted as :attr:`progressed`), and the run ends with :attr:`finished` carrying an
    :class:`~._pipeline.Outcome`. :meth:`cancel` sets the flag the core polls before every
    optimisation step and tile. :meth:`shutdown` cancels and waits (used when a widget closes).

    The worker runs in the runner's own thread pool, so that :meth:`shutdown` can wait until
    the worker has emitted its last signal: a worker still emitting when the interpreter
    tears Qt down aborts the process.
    """

    progressed = Signal(object)
    finished = Signal(object)

    _next_id = 0

    def __init__(self, viewer, what: str, parent: Optional[QObject] = None):
        super().__init__(parent)
        self._viewer_ref = weakref.ref(viewer)
        self.what = what
        self.worker = None
        self.handle: Optional[RunHandle] = None
        self._pbar = None
        self._info: Optional[dict] = None
        self._outcome: Optional[Outcome] = None
        self._stage = None
        self.last_event: Optional[Progress] = None
        self._in_yield = False
        self._finish_pending = False
        self._pool = QThreadPool()
        self._pool.setMaxThreadCount(1)

    @property
    def running(self) -> bool:
        return self.worker is not None

    def start(
        self, fn: Callable, *args, device: str = "", budget=None, desc: str = "", threads: Optional[int] = None, **kwargs
    ) -> None:
        from napari.utils import progress

        if self.running:
            raise RuntimeError("a computation is already running")
        Runner._next_id += 1
        self.handle = RunHandle()
        self._outcome = None
        self._stage = None
        self.last_event = None
        self._finish_pending = False
        if threads:
            fn = functools.partial(call_with_threads, int(threads), fn)
        worker = _cancelling_worker_class()(guarded, fn, self.handle, *args, **kwargs)
        worker.yielded.connect(self._on_yielded)
        worker.returned.connect(self._on_returned)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self._pbar = progress(total=0, desc=desc or self.what)
        self._info = {
            "id": Runner._next_id,
            "what": self.what,
            "device": device,
            "budget": budget,
            "threads": threads,
            "t0": time.time(),
        }
        viewer = self._viewer_ref()
        if viewer is not None:
            get_state(viewer).begin_run(self._info)
        _IN_FLIGHT.add(self)
        _hook_application_quit()
        # the runner's own pool, not Qt's global one (``worker.start()``): shutdown waits for exactly this worker
        self._pool.start(worker)

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()

    def _on_yielded(self, event: Progress) -> None:
        if self.worker is None:  # a late event of a finished run
            return
        self.last_event = event
        self.progressed.emit(event)
        viewer = self._viewer_ref()
        if viewer is not None:
            emit(get_state(viewer).run_progress, event)
        # napari's progress-bar widget calls QApplication.processEvents() when updated, so the
        # next events (even `finished`) can be delivered from inside this slot. Only the
        # outermost call touches the progress bar, always with the latest event, and a
        # `finished` that arrives meanwhile is handled once the bar update has returned.
        if self._in_yield:
            return
        self._in_yield = True
        try:
            shown = None
            while self._pbar is not None and shown is not self.last_event:
                shown = self.last_event
                self._show(shown)
        finally:
            self._in_yield = False
        if self._finish_pending:
            self._finish_pending = False
            self._finalize()

    def _show(self, event: Progress) -> None:
        pbar = self._pbar
        key = (event.stage, event.plane)
        if key != self._stage:
            self._stage = key
            pbar.set_description(
                f"{self.what}: {event.stage}" + (f" {event.plane + 1}/{event.n_planes}" if event.n_planes > 1 else "")
            )
        total = max(int(event.total), 0)
        if pbar.total != total:
            pbar.total = total
        pbar.n = int(event.done)
        pbar.update(0)

    def _on_returned(self, outcome: Outcome) -> None:
        self._outcome = outcome

    def _on_finished(self) -> None:
        if self._in_yield:
            self._finish_pending = True
            return
        self._finalize()

    def _finalize(self) -> None:
        outcome = self._outcome or Outcome("cancelled")
        if self._pbar is not None:
            pbar, self._pbar = self._pbar, None
            pbar.close()
        self.worker = None
        _IN_FLIGHT.discard(self)
        info = dict(self._info or {}, status=outcome.status)
        viewer = self._viewer_ref()
        if viewer is not None and self._info is not None:
            get_state(viewer).end_run(info)
        self._info = None
        self.finished.emit(outcome)

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT) -> bool:
        """Cancel the running computation and wait for it; True when nothing is left running."""
        handle = self.handle
        if handle is None:
            return True
        _IN_FLIGHT.discard(self)
        handle.cancel()
        stopped = handle.join(timeout)
        # ... and the worker, until it has emitted its last signal
        stopped = self._pool.waitForDone(int(timeout * 1000)) and stopped
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        if self._info is not None:
            viewer = self._viewer_ref()
            if viewer is not None:
                get_state(viewer).end_run(dict(self._info, status="cancelled"))
            self._info = None
        return stopped


@functools.lru_cache(maxsize=1)
def _cancelling_worker_class():
    """napari's GeneratorWorker whose ``quit()`` also sets the computation's cancel flag, so that
    whoever asks the worker to quit stops the core within a step."""
    from napari.qt.threading import GeneratorWorker

    class CancellingGeneratorWorker(GeneratorWorker):
        def __init__(self, func, *args, **kwargs):
            super().__init__(func, *args, **kwargs)
            self.run_handle = next((a for a in args if isinstance(a, RunHandle)), None)

        def quit(self) -> None:
            if self.run_handle is not None:
                self.run_handle.cancel()
            super().quit()

    return CancellingGeneratorWorker


def release_memory() -> None:
    """Collect garbage and release cached device memory (no-op without torch)."""
    import gc

    gc.collect()
    free_device_memory(None)


def torch_loaded() -> bool:
    return "torch" in sys.modules
