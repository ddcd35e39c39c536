"""The Dask executor (:mod:`napari_upsample_anything.distributed`) against its serial path.

One 2-worker process ``LocalCluster`` is shared by the module (starting one costs seconds).
The toy tasks write disjoint row bands of a zarr array, as the pipeline's plane tasks write
their regions of the OME-Zarr output; faults are injected with marker files so that only
the first attempt of a task fails.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
import zarr

from napari_upsample_anything.core.errors import Cancelled
from napari_upsample_anything.distributed import (
    SchedulerUnreachableError,
    TaskFailedError,
    execute,
    raise_for_failures,
)

# The workers cannot import this test module: ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

BAND = 8
N_BANDS = 6
WIDTH = 24


@dataclass(frozen=True)
class BandTask:
    """Write band ``index`` of the zarr array at ``store``; ``fault`` selects an injected failure."""

    store: str
    index: int
    fault: str = ""  # "" | "raise_once" | "exit_once" | "always" | "bad_input"
    marker_dir: str = ""


def band_values(index: int) -> np.ndarray:
    return np.random.default_rng(index).standard_normal((BAND, WIDTH)).astype(np.float32)


def write_band(task: BandTask) -> dict:
    marker = Path(task.marker_dir) / f"attempted-{task.index}" if task.marker_dir else None
    first_attempt = marker is not None and not marker.exists()
    if marker is not None:
        marker.touch()
    if task.fault == "always":
        raise RuntimeError(f"band {task.index} is broken")
    if task.fault == "bad_input":
        (Path(task.marker_dir) / f"attempt-{task.index}-{time.perf_counter_ns()}").touch()  # count the attempts
        raise ValueError(f"band {task.index} has NaN values")
    if task.fault == "raise_once" and first_attempt:
        raise RuntimeError(f"injected fault in band {task.index}")
    if task.fault == "exit_once" and first_attempt:
        # Die only once every other band is written (the other worker takes them; the wait is bounded).
        others = [Path(task.marker_dir) / f"written-{i}" for i in range(N_BANDS) if i != task.index]
        wait_until(lambda: all(p.exists() for p in others))
        os._exit(1)  # the worker process dies mid-run
    arr = zarr.open_array(task.store, mode="r+")
    arr[task.index * BAND : (task.index + 1) * BAND] = band_values(task.index)
    if task.marker_dir:
        (Path(task.marker_dir) / f"written-{task.index}").touch()
    return {"index": task.index, "pid": os.getpid()}


def wait_until(condition, limit: float = 60.0) -> bool:
    """Poll ``condition()`` until true or ``limit`` s (a hang guard; workers cannot import conftest)."""
    deadline = time.monotonic() + limit
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def new_store(path: Path) -> str:
    zarr.open_array(str(path), mode="w", shape=(N_BANDS * BAND, WIDTH), chunks=(BAND, WIDTH), dtype="f4", fill_value=np.nan)
    return str(path)


def read(store: str) -> np.ndarray:
    return np.asarray(zarr.open_array(store, mode="r")[:])


@pytest.fixture(scope="module")
def cluster_client():
    from napari_upsample_anything.distributed import start_local_cluster

    client, cluster = start_local_cluster(n_workers=2, threads_per_worker=1, memory_limit="1GiB")
    yield client
    client.close()
    cluster.close()


@pytest.fixture(scope="module")
def serial_reference(tmp_path_factory) -> np.ndarray:
    store = new_store(tmp_path_factory.mktemp("serial") / "out.zarr")
    outcomes = execute([BandTask(store, i) for i in range(N_BANDS)], write_band)
    assert all(o.ok for o in outcomes)
    return read(store)


def test_serial_path_writes_every_band(serial_reference):
    assert not np.isnan(serial_reference).any()
    for i in range(N_BANDS):
        np.testing.assert_array_equal(serial_reference[i * BAND : (i + 1) * BAND], band_values(i))


def test_cluster_output_is_byte_identical_to_serial(cluster_client, serial_reference, tmp_path):
    store = new_store(tmp_path / "out.zarr")
    seen = []
    outcomes = execute(
        [BandTask(store, i) for i in range(N_BANDS)],
        write_band,
        client=cluster_client,
        progress=lambda d, t, i: seen.append((d, t)),
    )
    assert [o.index for o in outcomes] == list(range(N_BANDS))
    assert all(o.ok for o in outcomes)
    assert read(store).tobytes() == serial_reference.tobytes()
    assert seen[0] == (0, N_BANDS) and seen[-1] == (N_BANDS, N_BANDS)
    assert len({o.result["pid"] for o in outcomes} - {os.getpid()}) >= 1  # ran in worker processes
    # one torch thread per worker (OMP_NUM_THREADS set when the workers started)
    threads = cluster_client.run(lambda: __import__("torch").get_num_threads())
    assert set(threads.values()) == {1}


def test_task_failing_once_is_retried(cluster_client, serial_reference, tmp_path):
    store = new_store(tmp_path / "out.zarr")
    tasks = [BandTask(store, i, "raise_once" if i in (1, 4) else "", str(tmp_path)) for i in range(N_BANDS)]
    outcomes = execute(tasks, write_band, client=cluster_client, retries=2)
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    assert read(store).tobytes() == serial_reference.tobytes()


def test_failing_task_is_reported_not_dropped(cluster_client, tmp_path):
    store = new_store(tmp_path / "out.zarr")
    tasks = [BandTask(store, i, "always" if i == 2 else "") for i in range(N_BANDS)]
    progress = []
    outcomes = execute(tasks, write_band, client=cluster_client, retries=1, progress=lambda d, t, i: progress.append(i["failed"]))
    assert len(outcomes) == N_BANDS
    bad = [o for o in outcomes if not o.ok]
    assert [o.index for o in bad] == [2]
    assert "band 2 is broken" in bad[0].error and bad[0].task is tasks[2]
    assert progress[-1] == 1
    with pytest.raises(TaskFailedError, match="task 2: RuntimeError: band 2 is broken"):
        raise_for_failures(outcomes)
    data = read(store)
    assert np.isnan(data[2 * BAND : 3 * BAND]).all()  # the failed band is visibly missing
    assert not np.isnan(np.delete(data, np.s_[2 * BAND : 3 * BAND], axis=0)).any()


def test_serial_retries_and_reports_the_same_way(tmp_path, serial_reference):
    store = new_store(tmp_path / "out.zarr")
    tasks = [BandTask(store, i, "raise_once" if i == 0 else "", str(tmp_path)) for i in range(N_BANDS)]
    assert all(o.ok for o in execute(tasks, write_band, retries=1))
    assert read(store).tobytes() == serial_reference.tobytes()
    outcomes = execute([BandTask(store, 3, "always")], write_band, retries=2)
    assert not outcomes[0].ok and "band 3 is broken" in outcomes[0].error and "RuntimeError" in outcomes[0].traceback


@pytest.mark.parametrize("where", ["serial", "cluster"])
def test_bad_input_is_reported_once_not_retried(where, cluster_client, tmp_path):
    """A ValueError is deterministic: one attempt, flagged as an input error (CLI exit code 2);
    a RuntimeError is still retried (test_task_failing_once_is_retried)."""
    store = new_store(tmp_path / "out.zarr")
    tasks = [BandTask(store, i, "bad_input" if i == 1 else "", str(tmp_path)) for i in range(3)]
    outcomes = execute(tasks, write_band, client=cluster_client if where == "cluster" else None, retries=2)
    assert [o.ok for o in outcomes] == [True, False, True]
    bad = outcomes[1]
    assert bad.input_error and "ValueError: band 1 has NaN values" in bad.error and "ValueError" in bad.traceback
    assert len(list(tmp_path.glob("attempt-1-*"))) == 1  # not retried
    assert not any(o.input_error for o in outcomes if o.ok)


def _malloc_trim_setting(_=None):
    return os.environ.get("MALLOC_TRIM_THRESHOLD_")


def test_local_cluster_workers_keep_glibc_malloc_defaults(cluster_client):
    """Dask's nanny would set MALLOC_TRIM_THRESHOLD_ (which made fits 2.5-3x slower in workers:
    per-block scratch became fresh mmaps); workers of our clusters start without it, and the
    user's own Dask configuration is left as it was."""
    import dask

    assert set(cluster_client.run(_malloc_trim_setting).values()) == {None}
    assert "MALLOC_TRIM_THRESHOLD_" in dask.config.get("distributed.nanny.pre-spawn-environ")


def test_killed_worker_loses_no_finished_region(cluster_client, serial_reference, tmp_path):
    store = new_store(tmp_path / "out.zarr")
    tasks = [BandTask(store, i, "exit_once" if i == N_BANDS - 1 else "", str(tmp_path)) for i in range(N_BANDS)]
    outcomes = execute(tasks, write_band, client=cluster_client, retries=2)
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    assert (tmp_path / f"attempted-{N_BANDS - 1}").exists()
    assert read(store).tobytes() == serial_reference.tobytes()
    cluster_client.wait_for_workers(2, timeout=30)  # the nanny restarted the killed worker


def test_cancel_stops_the_run(tmp_path):
    store = new_store(tmp_path / "out.zarr")
    calls = []
    with pytest.raises(Cancelled):
        execute([BandTask(store, i) for i in range(N_BANDS)], write_band, cancel=lambda: calls.append(1) or len(calls) > 2)
    assert np.isnan(read(store)[3 * BAND :]).all()


def gated_band(task: BandTask) -> dict:
    """Bands 0 and 1 are written at once; the others wait until the test opens the gate."""
    if task.index >= 2:
        wait_until(lambda: (Path(task.marker_dir) / "gate-open").exists())
    return write_band(task)


def test_cancel_on_the_cluster_stops_waiting_and_cancels_the_rest(cluster_client, tmp_path):
    n_tasks = N_BANDS * 4
    store = str(tmp_path / "out.zarr")
    zarr.open_array(store, mode="w", shape=(n_tasks * BAND, WIDTH), chunks=(BAND, WIDTH), dtype="f4", fill_value=np.nan)
    done = []
    try:
        with pytest.raises(Cancelled):
            execute(
                [BandTask(store, i, marker_dir=str(tmp_path)) for i in range(n_tasks)],
                gated_band,
                client=cluster_client,
                progress=lambda d, t, i: done.append(d),
                cancel=lambda: bool(done) and done[-1] >= 1,
            )
        # execute returned while the gated tasks could not finish: it did not wait for every task
        written = ~np.isnan(read(store)).all(axis=1).reshape(n_tasks, BAND).all(axis=1)
        assert not written[2:].any(), np.flatnonzero(written)
        assert 1 <= done[-1] < n_tasks
    finally:
        (tmp_path / "gate-open").touch()  # let the workers' running tasks end (for the next tests)


def test_tqdm_progress_counts_finished_tasks(tmp_path):
    import io

    from napari_upsample_anything.distributed import TqdmProgress

    store = new_store(tmp_path / "out.zarr")
    stream = io.StringIO()
    with TqdmProgress("bands", file=stream) as bar:
        execute([BandTask(store, i) for i in range(N_BANDS)], write_band, progress=bar)
        assert bar._bar.n == bar._bar.total == N_BANDS
    assert f"{N_BANDS}/{N_BANDS}" in stream.getvalue()


def test_unreachable_scheduler_fails_fast_naming_the_address():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    # "within 2 s": the connection timeout given is the one the client used (no hang, no retries)
    with pytest.raises(SchedulerUnreachableError, match=address.replace(".", r"\.") + " within 2 s"):
        execute([1, 2], abs, client=address, connect_timeout=2)


def test_bad_arguments_are_typed_errors():
    with pytest.raises(ValueError, match="retries"):
        execute([1], abs, retries=-1)
    with pytest.raises(TypeError, match="fn must be callable"):
        execute([1], 3)
    with pytest.raises(ValueError, match="client="):
        execute([1], abs, client="nonsense")
