"""Jobs: :func:`plan_job` lists the tasks that turn one source into one output folder, and
:func:`run_job` runs them inside the job's transaction (:class:`~.transaction.OutputTransaction`:
prepare, commit, or abort on any error or Ctrl-C), each stage through the one
:func:`~..distributed.execute`, serially in this process or on a Dask client made by the one
client factory (:func:`~..distributed.dask_client`). A task that still fails on Dask after its
retries aborts the job with the one failure type, :class:`~..distributed.TaskFailedError`."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..distributed import DEFAULT_CONNECT_TIMEOUT_S, TaskFailedError, TaskOutcome, dask_client, execute, stop_running_tasks
from .options import CancelFn, PipelineOptions, Progress, ProgressCallback
from .tasks import SourceRef, Task, describe_task, run_task
from .transaction import OutputTransaction


@dataclass
class Job:
    """The tasks that turn one source into one finished output folder (see :mod:`.pipeline`)."""

    source: SourceRef
    options: PipelineOptions
    tasks: List[Task]
    transaction: OutputTransaction

    @property
    def out(self) -> Path:
        """The final folder."""
        return self.transaction.out

    @property
    def tmp(self) -> Path:
        """The hidden temporary folder next to it, where the tasks write."""
        return self.transaction.tmp

    def stages(self) -> List[List[Task]]:
        out: Dict[int, List[Task]] = {}
        for t in self.tasks:
            out.setdefault(t.stage, []).append(t)
        return [out[k] for k in sorted(out)]

    def prepare(self) -> None:
        """Create the temporary folder (and missing parents, remembered for :meth:`abort`)."""
        self.transaction.prepare()

    def commit(self) -> Path:
        """Move the finished folder into place; an earlier result there is replaced only now."""
        return self.transaction.commit()

    def abort(self) -> None:
        """Remove the temporary folder and any folders :meth:`prepare` created; earlier results stay."""
        self.transaction.abort()


def plan_job(source: SourceRef | str | Path, options: PipelineOptions, out: str | Path, *, planes: Optional[str] = "all") -> Job:
    """Plan the tasks of one source into the output folder ``out`` (opens the source lazily to
    list its planes; reads no pixels)."""
    if not isinstance(source, SourceRef):
        source = SourceRef(path=str(source))
    options.validate()
    src = source.open()
    if options.channels is not None:
        from ..sources import parse_channels

        parse_channels(list(options.channels), src.sizes["C"], "channels (--channels)")
    keys = src.planes(planes)
    transaction = OutputTransaction(out)
    ks = tuple(keys)
    base = dict(source=source, options=options, store=str(transaction.tmp), planes=ks)
    tasks = [Task("fit", 0, plane=k, number=i, **base) for i, k in enumerate(ks)]
    tasks.append(Task("layout", 1, **base))
    tasks += [Task("render", 2, plane=k, number=i, **base) for i, k in enumerate(ks)]
    tasks.append(Task("finish", 3, **base))
    return Job(source, options, tasks, transaction)


def run_job(
    job: Job,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelFn] = None,
    *,
    client: Any = None,
    retries: int = 2,
    n_workers: Optional[int] = None,
    threads_per_worker: int = 1,
    memory_limit: int | float | str | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
) -> dict:
    """Run a job: prepare, every stage, commit (abort on any error or Ctrl-C); returns the report.

    ``client=None``: serially in this process; ``progress`` receives every step's
    :class:`~.options.Progress` events and a task's error propagates as it is. ``client="local"``
    (a process LocalCluster of ``n_workers`` workers, ``threads_per_worker`` threads each,
    ``memory_limit`` per worker), ``"tcp://host:8786"`` (a running scheduler; ``connect_timeout``)
    or a ``distributed.Client``: each stage's tasks run on Dask workers (the workers read their
    plane and write their region of the stores themselves); ``progress`` receives events of
    stage ``"tasks"`` (finished tasks of the whole job). Outputs are byte-identical to the
    serial path.

    Raises
    ------
    TaskFailedError
        On Dask, when a task still fails after ``retries`` extra attempts; the message names the
        task and plane and gives the worker's error. The job is aborted first.
    TaskInputError
        (A ``TaskFailedError`` and a ``ValueError``.) When every failed task failed on bad
        input (:func:`~..core.errors.is_input_error`): such tasks are not retried.
    """
    if client is None:
        return _run_stages(job, None, progress, cancel, retries)
    with dask_client(
        client,
        n_workers=n_workers,
        threads_per_worker=threads_per_worker,
        memory_limit=memory_limit,
        connect_timeout=connect_timeout,
    ) as dask_cl:
        # the folder is made only once a scheduler answered: an unreachable address leaves nothing behind
        return _run_stages(job, dask_cl, progress, cancel, retries)


def _run_stages(job: Job, dask_cl: Any, progress, cancel, retries: int) -> dict:
    """The job's transaction around its stages, each run by :func:`~..distributed.execute`."""
    total = len(job.tasks)
    finished_before = 0

    def stage_progress(done: int, _total: int, info: dict) -> None:
        if progress is not None:
            progress(Progress("tasks", finished_before + int(done), total))

    job.prepare()
    try:
        report: dict = {}
        for stage in job.stages():
            if dask_cl is None:
                # in this process: the tasks report their own progress and poll ``cancel``; an
                # error propagates at once, as it is (no retries: it would fail the same way)
                fn = functools.partial(run_task, progress=progress, cancel=cancel)
                outcomes = execute(stage, fn, retries=0, raise_errors=True)
            else:
                outcomes = execute(stage, run_task, client=dask_cl, retries=retries, progress=stage_progress, cancel=cancel)
                _raise_for_failed(outcomes, retries)
            finished_before += len(stage)
            report = outcomes[-1].result
        job.commit()
        return report
    except BaseException as exc:
        if dask_cl is not None and not isinstance(exc, Exception):  # Ctrl-C: no worker may write after the removal
            stop_running_tasks(dask_cl)
        job.abort()
        raise


def _raise_for_failed(outcomes: Sequence[TaskOutcome], retries: int) -> None:
    failures = [o for o in outcomes if not o.ok]
    if not failures:
        return
    first = failures[0]
    names = ", ".join(describe_task(o.task) for o in failures[:10]) + (" ..." if len(failures) > 10 else "")
    bad_input = all(o.input_error for o in failures)
    how = "on bad input (not retried)" if bad_input else f"after {retries} retries"
    raise TaskFailedError.of(
        f"{len(failures)} task(s) failed {how} ({names}); first: {describe_task(first.task)}: {first.error}. "
        "The partial output was removed",
        failures,
    )
