"""The pipeline's jobs on a Dask cluster, and its results as lazy dask arrays.

:func:`run_job_on_dask` is what :func:`.pipeline.run_job` calls when it is given a
``client``: every stage of the :class:`~.pipeline.Job` (fit per plane -> layout -> render
per plane -> finish) goes through :func:`.distributed.execute` with :func:`.pipeline.run_task`,
stage after stage. The workers read their plane from the source themselves and write their
results straight into their own region of the job's temporary output folder (OME-Zarr
stores, ``.npy`` memmaps), so only small summaries travel through the scheduler. A task
that still fails after its retries aborts the job (the temporary folder is removed; an
earlier result in the output folder stays) and :class:`JobTaskError` names the plane.

:func:`dask_client` turns the ``client`` spellings (``"local"``, ``"tcp://host:8786"``, a
:class:`distributed.Client`) into a client for a ``with`` block, so that a batch of inputs
shares one cluster; :func:`open_results` opens a finished output folder as dask arrays
(``dask.array.from_zarr``, nothing read until computed).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Union

from .distributed import DEFAULT_CONNECT_TIMEOUT_S, ClientSpec, TaskOutcome, connect, execute, start_local_cluster


class JobTaskError(RuntimeError):
    """Some tasks of a job failed after their retries; ``.failures`` lists their outcomes."""

    def __init__(self, message: str, failures):
        super().__init__(message)
        self.failures = list(failures)


class JobInputError(JobTaskError, ValueError):
    """Every failed task of a job failed on bad input (a ``ValueError``, ``TypeError`` or
    ``FileNotFoundError`` on the worker, e.g. NaN in an image): such tasks are not retried, and
    the CLI exits with code 2 as it does for the same input without Dask."""


def describe_task(task) -> str:
    """``'fit of plane t=0 z=3'`` / ``'layout'``: what a :class:`~.pipeline.Task` does."""
    if task.plane is None:
        return task.kind
    return f"{task.kind} of plane t={task.plane[0]} z={task.plane[1]}"


@contextlib.contextmanager
def dask_client(
    client: ClientSpec,
    *,
    n_workers: Optional[int] = None,
    threads_per_worker: int = 1,
    memory_limit: Union[int, float, str, None] = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
) -> Iterator[Any]:
    """A :class:`distributed.Client` for ``client`` inside a ``with`` block.

    ``"local"`` starts a process :class:`~distributed.LocalCluster` (``n_workers`` workers,
    ``threads_per_worker`` Dask and torch threads each, ``memory_limit`` per worker) and
    closes it at the end; an address connects (a
    :class:`~.distributed.SchedulerUnreachableError` naming it after ``connect_timeout``
    seconds) and closes only the connection; a Client is used as it is and left open.
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


def run_job_on_dask(
    job,
    progress=None,
    cancel=None,
    *,
    client: ClientSpec = "local",
    retries: int = 2,
    n_workers: Optional[int] = None,
    threads_per_worker: int = 1,
    memory_limit: Union[int, float, str, None] = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
) -> dict:
    """Run ``job`` stage by stage on Dask workers; prepare, commit, or abort on any failure.

    ``progress`` receives :class:`~.pipeline.Progress` events of stage ``"tasks"``: finished
    tasks of the whole job out of all its tasks. Returns the report (the ``finish`` task's).

    Raises
    ------
    JobTaskError
        When a task still fails after ``retries`` extra attempts; the message names the task
        and plane and gives the worker's error. The job is aborted first.
    JobInputError
        (A ``JobTaskError`` and a ``ValueError``.) When every failed task failed on bad input
        (:func:`~.core.errors.is_input_error`): such tasks are not retried.
    """
    from .pipeline import Progress, run_task

    total = len(job.tasks)
    finished_before = 0

    def stage_progress(done: int, _total: int, info: dict) -> None:
        if progress is not None:
            progress(Progress("tasks", finished_before + int(done), total))

    with dask_client(
        client,
        n_workers=n_workers,
        threads_per_worker=threads_per_worker,
        memory_limit=memory_limit,
        connect_timeout=connect_timeout,
    ) as dask_cl:
        # the folder is made only once a scheduler answered: an unreachable address leaves nothing behind
        job.prepare()
        try:
            report: dict = {}
            for stage in job.stages():
                outcomes = execute(stage, run_task, client=dask_cl, retries=retries, progress=stage_progress, cancel=cancel)
                _raise_for_failed(outcomes, retries)
                finished_before += len(stage)
                report = outcomes[-1].result
            job.commit()
            return report
        except BaseException as exc:
            if not isinstance(exc, Exception):  # Ctrl-C: no worker may write after the removal
                from .distributed import stop_running_tasks

                stop_running_tasks(dask_cl)
            job.abort()
            raise


def _raise_for_failed(outcomes, retries: int) -> None:
    failures = [o for o in outcomes if not o.ok]
    if not failures:
        return
    first: TaskOutcome = failures[0]
    names = ", ".join(describe_task(o.task) for o in failures[:10]) + (" ..." if len(failures) > 10 else "")
    bad_input = all(o.input_error for o in failures)
    how = "on bad input (not retried)" if bad_input else f"after {retries} retries"
    raise (JobInputError if bad_input else JobTaskError)(
        f"{len(failures)} task(s) failed {how} ({names}); first: {describe_task(first.task)}: {first.error}. "
        "The partial output was removed",
        failures,
    )


def open_results(out_dir: str | Path) -> Dict[str, Dict[str, Any]]:
    """The OME-Zarr outputs of a finished run as lazy dask arrays (nothing read yet).

    Parameters
    ----------
    out_dir : path
        An output folder written by ``upsample-anything run`` / :func:`~.pipeline.run_job`
        with ``format="ome-zarr"``.

    Returns
    -------
    dict
        ``{"features" | "pca" | "kernels" | "lr_features": {"data", "levels", "axes",
        "scale", "translation", "unit"}}`` for the stores present: ``data`` the full-resolution dask array
        (axes such as ``"czyx"``; HR features ``(C, H, W)`` per plane), ``levels`` every
        pyramid level (one for all but the PCA), ``scale`` the pixel size per axis of
        ``data`` (1.0 for ``c`` / ``t``), ``translation`` the world position of its first
        pixel's centre (zeros for HR stores; ``(scale - 1) / 2`` HR pixels for the LR grids
        ``kernels`` and ``lr_features``), ``unit`` the spatial unit or None.
    """
    import dask.array as da
    import zarr

    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"out_dir={str(out_dir)!r}: no such output folder")
    results: Dict[str, Dict[str, Any]] = {}
    for name in ("features", "pca", "kernels", "lr_features"):
        path = out_dir / f"{name}.ome.zarr"
        if not path.is_dir():
            continue
        root = zarr.open_group(str(path), mode="r")
        ms = root.attrs["ome"]["multiscales"][0]
        axes = "".join(a["name"] for a in ms["axes"])
        units = [a.get("unit") for a in ms["axes"] if a.get("type") == "space"]
        levels = [da.from_zarr(root[d["path"]]) for d in ms["datasets"]]
        from .omezarr import transforms_of

        scale, translation = transforms_of(ms["datasets"][0])
        results[name] = {
            "data": levels[0],
            "levels": levels,
            "axes": axes,
            "scale": scale,
            "translation": translation,
            "unit": next((u for u in units if u), None),
        }
    if not results:
        raise ValueError(f"out_dir={str(out_dir)!r} holds no .ome.zarr outputs (was it written with format='npy'?)")
    return results


#: Room for the Python interpreter, torch and the backbone in each worker on top of its working budget.
WORKER_OVERHEAD_BYTES = 1 << 30


def worker_memory_limit(max_memory: str | int | None) -> Optional[int]:
    """Dask's memory limit per worker from the pipeline's working budget (``--max-memory``).

    The budget bounds the fit's and the render's working memory; a worker process also holds
    the interpreter, torch and the backbone, so its limit is the budget plus
    :data:`WORKER_OVERHEAD_BYTES` (Dask pauses a worker at 80% of it and restarts it at 95%).
    None / "auto": Dask's default (the machine's memory shared between the workers).
    """
    from .core.units import parse_bytes

    if max_memory in (None, "", "auto"):
        return None
    return int(parse_bytes(max_memory, "max_memory (--max-memory)")) + WORKER_OVERHEAD_BYTES


def describe_map_task(spec: dict) -> str:
    """``'map of lr.npy onto image.tif plane t=0 z=3'``: what a ``map --dask`` task does."""
    t, z = spec["plane"]
    return f"map of {Path(spec['map']).name} onto {Path(spec['image']).name} plane t={t} z={z}"
