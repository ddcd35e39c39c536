"""Run independent tasks serially or on a Dask cluster: :func:`execute`.

The pipeline lists its work as small picklable task records (one per plane, or one per
fit tile, see :mod:`.tiled_fit`) and a module-level function that runs one of them in
any process. Results that are large (HR features, rendered planes) are written by the task
itself into its own region of a shared store (OME-Zarr), so only a small summary travels
back through the scheduler.

``execute(tasks, fn)`` runs ``fn(task)`` for every task:

* ``client=None``: in this process, one after the other (the reference path; no Dask).
* ``client="local"``: starts a :class:`distributed.LocalCluster` of worker *processes*
  (one torch thread each by default, an optional memory limit per worker), runs the tasks
  there, and closes the cluster when done.
* ``client="tcp://host:8786"``: connects to a running scheduler (for example one started by
  dask-jobqueue on SLURM, see docs/scale.md); an unreachable address fails after
  ``connect_timeout`` seconds with :class:`SchedulerUnreachableError` naming the address.
* ``client=<distributed.Client>``: uses it and leaves it open.

Every task is retried up to ``retries`` times (Dask's ``retries=``; also when its worker
dies, through the scheduler's rescheduling), then reported: the returned list holds one
:class:`TaskOutcome` per task, in task order, failed ones with their error and traceback.
Nothing is dropped. ``progress(done, total, info)`` (the protocol of
:mod:`.core.progress`) is called as tasks finish; :class:`TqdmProgress` turns it into a
tqdm bar.

One client factory, :func:`dask_client`, turns every spelling of ``client`` into a client for a
``with`` block (``execute`` and the pipeline's jobs both use it), and one failure type,
:class:`TaskFailedError` (:class:`TaskInputError` when every failure was bad input), is raised
for tasks that failed after their retries, by :func:`raise_for_failures` and by the pipeline's
jobs (:func:`~.pipeline.run_job`, ``segment``, ``map --dask``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import traceback as tb
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Sequence, Union

from .core.errors import Cancelled, is_input_error
from .core.progress import CancelFn, ProgressFn, check_cancel, report
from .core.units import no_budget, parse_bytes

logger = logging.getLogger(__name__)

ClientSpec = Union[None, str, Any]  # None | "local" | "tcp://host:port" | distributed.Client
DEFAULT_CONNECT_TIMEOUT_S = 5.0


class SchedulerUnreachableError(ConnectionError):
    """No Dask scheduler answered at the given address within the connection timeout."""


@dataclass
class TaskOutcome:
    """What became of one task.

    Attributes
    ----------
    index : int
        Position of the task in the list given to :func:`execute`.
    task : object
        The task record itself.
    ok : bool
        True when the task returned normally (after any retries).
    result : object
        What ``fn(task)`` returned (None when it failed).
    error : str or None
        ``"ExceptionType: message"`` of the last attempt when it failed.
    traceback : str or None
        The formatted traceback of that failure, when Dask or Python could provide it.
    input_error : bool
        True when it failed on bad input (:func:`~.core.errors.is_input_error`: a
        ``ValueError``, ``TypeError`` or ``FileNotFoundError``); such a task is not retried,
        since it would fail the same way again.
    exception : BaseException or None
        The exception itself, for tasks that ran in this process (serial execution); None
        for Dask workers (their errors come back as text).
    """

    index: int
    task: Any
    ok: bool
    result: Any = None
    error: Optional[str] = None
    traceback: Optional[str] = None
    input_error: bool = False
    exception: Optional[BaseException] = None


@dataclass(frozen=True)
class _InputFailure:
    """Returned (not raised) by :func:`_attempt` for bad input, so that Dask does not retry it."""

    error: str
    traceback: str


def _attempt(fn: Callable[[Any], Any], task: Any) -> Any:
    """``fn(task)``, with bad-input errors turned into an :class:`_InputFailure` value: they are
    deterministic, so retrying them (Dask retries any raised exception) only wastes workers."""
    try:
        return fn(task)
    except Exception as exc:
        if is_input_error(exc):
            return _InputFailure(_describe(exc), tb.format_exc())
        raise


class TaskFailedError(RuntimeError):
    """Some tasks failed after their retries; ``.failures`` lists their :class:`TaskOutcome`.

    The one failure type of task execution: :func:`raise_for_failures` raises it, and so do the
    pipeline's jobs (with a message naming the task and plane). ``str(exc)`` is the message.
    """

    def __init__(self, message: str, failures: Sequence[TaskOutcome]):
        super().__init__(message)
        self.failures = list(failures)

    @staticmethod
    def of(message: str, failures: Sequence[TaskOutcome]) -> TaskFailedError:
        """The error for ``failures``: a :class:`TaskInputError` when every one of them failed on
        bad input (:attr:`TaskOutcome.input_error`), else a :class:`TaskFailedError`."""
        failures = list(failures)
        bad_input = bool(failures) and all(o.input_error for o in failures)
        return (TaskInputError if bad_input else TaskFailedError)(message, failures)


class TaskInputError(TaskFailedError, ValueError):
    """Every failed task failed on bad input (a ``ValueError``, ``TypeError`` or
    ``FileNotFoundError`` in the task, e.g. NaN in an image): such tasks are not retried, and
    the CLI exits with code 2 as it does for the same input without Dask."""


def raise_for_failures(outcomes: Sequence[TaskOutcome]) -> None:
    """Raise :class:`TaskFailedError` listing every failed outcome, if any failed."""
    failures = [o for o in outcomes if not o.ok]
    if failures:
        lines = [f"  task {o.index}: {o.error}" for o in failures[:20]]
        more = "" if len(failures) <= 20 else f"\n  ... and {len(failures) - 20} more"
        raise TaskFailedError(f"{len(failures)} task(s) failed after their retries:\n" + "\n".join(lines) + more, failures)


class TqdmProgress:
    """A ``progress(done, total, info)`` callback that draws a tqdm bar over finished tasks.

    Use as a context manager (or call :meth:`close`) so the bar is finished cleanly.
    """

    def __init__(self, desc: str = "tasks", **tqdm_kwargs: Any):
        from tqdm.auto import tqdm

        self._bar = tqdm(desc=desc, unit="task", **tqdm_kwargs)

    def __call__(self, done: int, total: int, info: dict) -> None:
        if self._bar.total != total:
            self._bar.total = total
        self._bar.n = done
        failed = info.get("failed", 0)
        if failed:
            self._bar.set_postfix(failed=failed, refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> TqdmProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def connect(address: str, timeout: float = DEFAULT_CONNECT_TIMEOUT_S):
    """A :class:`distributed.Client` connected to the scheduler at ``address``.

    Raises
    ------
    SchedulerUnreachableError
        When nothing answers within ``timeout`` seconds; the message names the address.
    """
    from distributed import Client

    if not isinstance(address, str) or "://" not in address and ":" not in address:
        raise ValueError(f"client={address!r}: give 'local', a scheduler address such as 'tcp://host:8786', or a Client")
    try:
        return Client(address, timeout=timeout)
    except (OSError, TimeoutError) as exc:
        raise SchedulerUnreachableError(
            f"no Dask scheduler answered at {address} within {timeout:g} s ({type(exc).__name__}: {exc}). "
            "Check the address and that the scheduler is running (e.g. `dask scheduler`), or use "
            "client='local' to start workers on this machine"
        ) from exc


@contextlib.contextmanager
def worker_malloc_defaults():
    """Start Dask workers with glibc's default ``malloc`` settings.

    Dask's nannies set ``MALLOC_TRIM_THRESHOLD_=65536`` in every worker (config
    ``distributed.nanny.pre-spawn-environ``), which also switches off glibc's dynamic mmap
    threshold: every allocation above 128 KiB is then a fresh ``mmap`` whose pages fault in on
    first touch. The fit kernel allocates per-block scratch of that size, and a fit in such a
    worker ran 2.5-3x slower than in a plain process (measured: 84,000 page faults per fit
    step at 448^2 instead of about 700). Workers of clusters started here get the default.
    For a cluster you start yourself, set that config key to null (docs/scale.md).
    """
    import dask

    # None unsets a variable in the nanny's pre-spawn environment (distributed.nanny)
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        yield


def start_local_cluster(
    n_workers: Optional[int] = None,
    threads_per_worker: int = 1,
    memory_limit: Union[int, float, str, None] = None,
):
    """Start a process-based :class:`distributed.LocalCluster` and a client to it.

    Parameters
    ----------
    n_workers : int, optional
        Worker processes; default ``cpu_count // threads_per_worker`` (at least 1).
    threads_per_worker : int
        Dask threads per worker, and torch threads per worker: the workers start with
        ``OMP_NUM_THREADS`` set to it, which torch reads as its intra-op thread count (one
        torch thread per worker lets ``n`` workers share ``n`` cores without oversubscription).
    memory_limit : bytes, "4GB", "512MiB" or None
        Memory limit of *each* worker (Dask pauses a worker at 80% and restarts it at 95%
        of it). None: Dask's default (the machine's memory shared between workers).

    Returns
    -------
    (client, cluster)
    """
    from distributed import Client, LocalCluster

    threads_per_worker = int(threads_per_worker)
    if threads_per_worker < 1:
        raise ValueError(f"threads_per_worker={threads_per_worker!r}: give an int >= 1")
    if n_workers is None:
        n_workers = max(1, (os.cpu_count() or 1) // threads_per_worker)
    if int(n_workers) != n_workers or n_workers < 1:
        raise ValueError(f"n_workers={n_workers!r}: give an int >= 1")
    limit = parse_bytes(memory_limit) if memory_limit is not None else "auto"
    env = {"OMP_NUM_THREADS": str(threads_per_worker), "MKL_NUM_THREADS": str(threads_per_worker)}
    with worker_malloc_defaults(), _sigint_ignored():
        cluster = LocalCluster(
            n_workers=int(n_workers),
            threads_per_worker=threads_per_worker,
            processes=True,
            memory_limit=limit,
            dashboard_address=":0",  # a free port: never collide with another user's dashboard
            # a failed task is reported once, in its TaskOutcome (error and traceback), not
            # also as the worker's "Compute Failed" log with the whole task record
            silence_logs=logging.CRITICAL,
            env=env,
        )
    try:
        client = Client(cluster)
    except BaseException:
        cluster.close()
        raise
    return client, cluster


@contextlib.contextmanager
def _sigint_ignored():
    """SIGINT ignored while the local workers start, so that they inherit it ignored: Ctrl-C
    in a terminal signals the whole process group, and only the main process should act on
    it (stop the cluster, remove the partial output), not every worker with a traceback."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def dask_client(
    client: ClientSpec,
    *,
    n_workers: Optional[int] = None,
    threads_per_worker: int = 1,
    memory_limit: Union[int, float, str, None] = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
) -> Iterator[Any]:
    """A :class:`distributed.Client` for ``client`` inside a ``with`` block: the one place that
    turns ``"local"`` or an address into a client.

    ``"local"`` starts a process :class:`~distributed.LocalCluster` (``n_workers`` workers,
    ``threads_per_worker`` Dask and torch threads each, ``memory_limit`` per worker; see
    :func:`start_local_cluster`) and closes it at the end; an address connects (a
    :class:`SchedulerUnreachableError` naming it after ``connect_timeout`` seconds) and closes
    only the connection; a Client is used as it is and left open. A batch of inputs shares one
    cluster by running its jobs inside one such block.
    """
    if client is None:
        raise ValueError("client=None: give 'local', a scheduler address such as 'tcp://host:8786', or a distributed.Client")
    if isinstance(client, str):
        if client == "local":
            dask_cl, cluster = start_local_cluster(n_workers, threads_per_worker, memory_limit)
            dask_cl.upsample_anything_owns_cluster = True  # Ctrl-C may close it (stop_running_tasks)
            try:
                yield dask_cl
            finally:
                dask_cl.close()
                cluster.close()
        else:
            dask_cl = connect(client, connect_timeout)
            try:
                yield dask_cl
            finally:
                dask_cl.close()
    else:
        yield client


#: Room for the Python interpreter, torch and the backbone in each worker on top of its working budget.
WORKER_OVERHEAD_BYTES = 1 << 30


def worker_memory_limit(max_memory: str | int | None) -> Optional[int]:
    """Dask's memory limit per worker from the pipeline's working budget (``--max-memory``).

    The budget bounds the fit's and the render's working memory; a worker process also holds
    the interpreter, torch and the backbone, so its limit is the budget plus
    :data:`WORKER_OVERHEAD_BYTES` (Dask pauses a worker at 80% of it and restarts it at 95%).
    None / "auto": Dask's default (the machine's memory shared between the workers).
    """
    if no_budget(max_memory):
        return None
    return int(parse_bytes(max_memory, "max_memory (--max-memory)")) + WORKER_OVERHEAD_BYTES


def stop_running_tasks(client) -> None:
    """After Ctrl-C: end the tasks still running, so that none writes after the caller removes
    their outputs. A local cluster this package started (:func:`dask_client` ``("local")``, the CLI's
    ``--dask``) is closed: its worker processes end. A client given by the caller is left alone.
    On a remote scheduler the futures were cancelled (:func:`_execute_dask`), but a task
    already running on a remote worker is not stopped (it can still write)."""
    cluster = getattr(client, "cluster", None)
    if cluster is None or not getattr(client, "upsample_anything_owns_cluster", False):
        return
    try:
        client.close()
    finally:
        cluster.close()


def execute(
    tasks: Sequence[Any],
    fn: Callable[[Any], Any],
    *,
    client: ClientSpec = None,
    n_workers: Optional[int] = None,
    threads_per_worker: int = 1,
    memory_limit: Union[int, float, str, None] = None,
    retries: int = 2,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelFn] = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
    raise_errors: bool = False,
) -> List[TaskOutcome]:
    """Run ``fn(task)`` for every task, serially or on Dask workers; one outcome per task.

    Parameters
    ----------
    tasks : sequence of picklable records
        One unit of work each (a plane, a fit tile). Tasks must be independent; a task that
        writes output writes only its own region, so tasks may run in any order, twice
        (retries) or concurrently.
    fn : callable(task) -> result
        Picklable (a module-level function). Its result should be small (a summary dict).
    client : None | "local" | "tcp://host:port" | distributed.Client
        Where to run: see the module docstring.
    n_workers, threads_per_worker, memory_limit :
        For ``client="local"`` only (see :func:`start_local_cluster`); ``memory_limit`` is
        per worker.
    retries : int
        Extra attempts of a failing task before it is reported as failed (also when its worker
        died). Bad-input errors (:func:`~.core.errors.is_input_error`) are not retried.
    progress : callable(done, total, info), optional
        Called once at the start (``done=0``) and after every finished task with
        ``info = {"stage": "tasks", "failed": <failed so far>}``.
    cancel : callable() -> bool, optional
        Polled between tasks (serial) or while waiting (Dask); True cancels the tasks not yet
        finished and raises :class:`~.core.errors.Cancelled`.
    connect_timeout : float
        Seconds to wait for a remote scheduler.
    raise_errors : bool
        Serial execution only: a task's exception propagates at once, as from a plain call
        (the pipeline's in-process jobs, whose callers expect the original error); the
        remaining tasks do not run.

    Returns
    -------
    list of TaskOutcome, in the order of ``tasks``. Failed tasks are logged as warnings and
    returned with ``ok=False``; call :func:`raise_for_failures` to turn them into an error.
    """
    tasks = list(tasks)
    if int(retries) != retries or retries < 0:
        raise ValueError(f"retries={retries!r}: give an int >= 0")
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if raise_errors and client is not None:
        raise ValueError("raise_errors=True is for serial execution (client=None) only")
    if client is None:
        outcomes = _execute_serial(tasks, fn, int(retries), progress, cancel, raise_errors)
    else:
        with dask_client(
            client,
            n_workers=n_workers,
            threads_per_worker=threads_per_worker,
            memory_limit=memory_limit,
            connect_timeout=connect_timeout,
        ) as dask_cl:
            outcomes = _execute_dask(tasks, fn, dask_cl, int(retries), progress, cancel)
    failures = [o for o in outcomes if not o.ok]
    if failures:
        logger.warning(
            "%d of %d task(s) failed after %d retries: %s",
            len(failures),
            len(outcomes),
            retries,
            "; ".join(f"task {o.index}: {o.error}" for o in failures[:5]),
        )
    return outcomes


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _execute_serial(tasks, fn, retries, progress, cancel, raise_errors=False) -> List[TaskOutcome]:
    outcomes: List[TaskOutcome] = []
    failed = 0
    report(progress, 0, len(tasks), stage="tasks", failed=0)
    for index, task in enumerate(tasks):
        outcome = None
        for attempt in range(retries + 1):
            check_cancel(cancel, "task execution")
            if raise_errors:
                outcome = TaskOutcome(index, task, True, fn(task))
                break
            try:
                outcome = TaskOutcome(index, task, True, fn(task))
                break
            except Cancelled:
                raise
            except Exception as exc:  # noqa: BLE001 - reported in the outcome, never dropped
                # bad input is deterministic: one attempt (as _attempt does on Dask workers)
                bad_input = is_input_error(exc)
                outcome = TaskOutcome(index, task, False, None, _describe(exc), tb.format_exc(), bad_input, exc)
                if bad_input:
                    break
                logger.info("task %d attempt %d failed: %s", index, attempt + 1, outcome.error)
        failed += not outcome.ok
        outcomes.append(outcome)
        report(progress, index + 1, len(tasks), stage="tasks", failed=failed)
    return outcomes


def _execute_dask(tasks, fn, client, retries, progress, cancel) -> List[TaskOutcome]:
    from distributed import as_completed

    total = len(tasks)
    report(progress, 0, total, stage="tasks", failed=0)
    if total == 0:
        return []
    token = uuid.uuid4().hex[:8]
    name = getattr(fn, "__name__", "task")
    futures = [
        client.submit(_attempt, fn, task, key=f"{name}-{index}-{token}", retries=retries, pure=False)
        for index, task in enumerate(tasks)
    ]
    position = {f.key: i for i, f in enumerate(futures)}
    outcomes: List[Optional[TaskOutcome]] = [None] * total
    done = failed = 0
    finished = as_completed(futures)
    try:
        while not finished.is_empty():
            check_cancel(cancel, "task execution")
            if not finished.has_ready():
                time.sleep(0.05)
                continue
            for future in finished.next_batch(block=False):
                index = position[future.key]
                result = future.result() if future.status == "finished" else None
                if isinstance(result, _InputFailure):
                    outcomes[index] = TaskOutcome(
                        index, tasks[index], False, None, result.error, result.traceback, input_error=True
                    )
                    failed += 1
                elif future.status == "finished":
                    outcomes[index] = TaskOutcome(index, tasks[index], True, result)
                else:
                    exc = future.exception()
                    trace = future.traceback()
                    outcomes[index] = TaskOutcome(
                        index,
                        tasks[index],
                        False,
                        None,
                        _describe(exc) if exc is not None else f"task ended with status {future.status!r}",
                        "".join(tb.format_tb(trace)) if trace is not None else None,
                    )
                    failed += 1
                future.release()  # the result is held by the outcome now; free the worker's copy
                done += 1
                report(progress, done, total, stage="tasks", failed=failed)
    except BaseException:
        client.cancel([f for f in futures if not f.done()])
        raise
    return outcomes  # type: ignore[return-value]
