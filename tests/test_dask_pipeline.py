"""The pipeline's jobs on Dask (``run_job(client=...)``, ``upsample-anything run --dask``)
against the serial path: byte-identical outputs, retried faults, aborted jobs, lazy results.

One 2-worker process ``LocalCluster`` is shared by the module. Images are tiny (56 x 56,
a 4 x 4 LR grid) and the fit takes 2 steps; the backbone is a randomly initialised ViT-S/14
written by the test. Faults are injected by a :class:`SourceRef` subclass that fails when
opened in a worker process (the workers receive it by value through cloudpickle).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
import torch
import zarr

from napari_upsample_anything.distributed import SchedulerUnreachableError
from napari_upsample_anything.pipeline import (
    JobTaskError,
    PipelineOptions,
    SourceRef,
    open_results,
    plan_job,
    run_job,
    worker_memory_limit,
)

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this module

CLI = [sys.executable, "-m", "napari_upsample_anything.cli"]
SIZE = 56
STEPS = 2


@dataclass(frozen=True)
class FlakySourceRef(SourceRef):
    """A source that fails when a worker process (not the test's) opens it: once (the first
    open anywhere creates ``marker``), or always."""

    marker: str = ""
    home_pid: int = 0
    always: bool = False
    kill_at_open: int = 0  # > 0: the worker process dies at this worker-side open (once)

    def open(self):
        if os.getpid() != self.home_pid and self.kill_at_open:
            opens = Path(self.marker).parent
            (opens / f"open-{os.getpid()}-{time.perf_counter_ns()}").touch()
            if len(list(opens.glob("open-*"))) >= self.kill_at_open:
                try:
                    fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    pass
                else:
                    os.close(fd)
                    os._exit(1)  # the worker dies mid-run, its task unfinished
            return super().open()
        if os.getpid() != self.home_pid:
            if self.always:
                raise RuntimeError("injected fault: this source is broken")
            try:
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # atomic: exactly one attempt fails
            except FileExistsError:
                pass
            else:
                os.close(fd)
                raise RuntimeError("injected fault on the first attempt")
        return super().open()


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    import timm

    path = tmp_path_factory.mktemp("weights") / "vits14_random.pth"
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=False, dynamic_img_size=True)
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def options(weights_file):
    return PipelineOptions(weights=str(weights_file), steps=STEPS, device="cpu")


@pytest.fixture(scope="module")
def cluster_client():
    from napari_upsample_anything.distributed import start_local_cluster

    client, cluster = start_local_cluster(n_workers=2, threads_per_worker=1, memory_limit="3GiB")
    yield client
    client.close()
    cluster.close()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Four 2 x 56 x 56 images (``cyx``) and a 5-plane 56 x 56 stack (``zyx``) as .npy."""
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    for i, name in enumerate("abcd"):
        base = np.stack([np.sin(6 * xx + i) * np.cos(5 * yy), (xx + yy + 0.2 * i) % 1.0])
        np.save(d / f"{name}.npy", (base + 0.05 * rng.standard_normal(base.shape)).astype(np.float32))
    stack = np.stack([np.sin(7 * xx + z) + (yy > 0.3 + 0.1 * z) for z in range(5)])
    np.save(d / "stack.npy", (stack + 0.05 * rng.standard_normal(stack.shape)).astype(np.float32))
    return d


def serial(job):
    """The reference: the serial path with one torch thread, as each worker runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_job(job)
    finally:
        torch.set_num_threads(threads)


def array_files(folder: Path) -> dict:
    """Every zarr array (by its path in the folder) and every .npy / .npz array, as bytes."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.name == ".zarray" or (p.name == "zarr.json" and json.loads(p.read_text()).get("node_type") == "array"):
            arr = zarr.open_array(str(p.parent), mode="r")
            out[str(p.parent.relative_to(folder))] = (arr.dtype.str, arr.shape, np.asarray(arr[...]).tobytes())
        elif p.suffix == ".npy":
            a = np.load(p)
            out[str(p.relative_to(folder))] = (a.dtype.str, a.shape, a.tobytes())
        elif p.suffix == ".npz":
            with np.load(p) as z:
                for k in z.files:
                    if k == "meta":  # JSON metadata: all but the wall-clock seconds must agree
                        meta = json.loads(str(z[k]))
                        meta.pop("seconds", None)
                        out[f"{p.relative_to(folder)}:meta"] = meta
                    else:
                        out[f"{p.relative_to(folder)}:{k}"] = (z[k].dtype.str, z[k].shape, z[k].tobytes())
    return out


def assert_identical(a: Path, b: Path, expect: tuple) -> None:
    fa, fb = array_files(a), array_files(b)
    assert fa, f"no arrays found in {a}"
    assert sorted(fa) == sorted(fb)
    for name in expect:
        assert any(k.startswith(name) for k in fa), (name, sorted(fa))
    for k in fa:
        assert fa[k] == fb[k], f"{k} differs between {a} and {b}"
    assert {p.name for p in a.iterdir()} == {p.name for p in b.iterdir()}


def test_stack_on_dask_is_byte_identical_to_serial(cluster_client, data_dir, options, tmp_path):
    opts = options
    ref = SourceRef(path=str(data_dir / "stack.npy"), axes="zyx")
    serial_rep = serial(plan_job(ref, opts, tmp_path / "serial"))
    events = []
    dask_rep = run_job(plan_job(ref, opts, tmp_path / "dask"), progress=events.append, client=cluster_client)
    expect = ("features.ome.zarr", "pca.ome.zarr", "kernels.ome.zarr", "lr_features.ome.zarr")
    assert_identical(tmp_path / "serial", tmp_path / "dask", expect)
    assert len(dask_rep["planes"]) == 5 == len(serial_rep["planes"])
    assert dask_rep["files"] == serial_rep["files"]
    total = 5 + 1 + 5 + 1  # fit per plane, layout, render per plane, finish
    assert [e.stage for e in events] == ["tasks"] * len(events)
    assert events[-1].done == total == events[-1].total
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
    res = open_results(tmp_path / "dask")  # lazy dask arrays over the stores
    feats = res["features"]
    assert feats["axes"] == "czyx" and feats["data"].shape == (384, 5, SIZE, SIZE)
    np.testing.assert_array_equal(
        feats["data"][:, 3].compute(), zarr.open_array(str(tmp_path / "serial" / "features.ome.zarr" / "0"))[:, 3]
    )
    assert len(res["pca"]["levels"]) >= 1 and res["pca"]["data"].shape == (3, 5, SIZE, SIZE)
    assert res["kernels"]["data"].shape == (4, 5, 4, 4)
    assert res["lr_features"]["scale"][-2:] == [SIZE / 4, SIZE / 4]  # LR cells of 14 HR pixels
    assert res["lr_features"]["translation"][-2:] == [(SIZE / 4 - 1) / 2] * 2  # centred on the 14 HR pixels they cover
    assert res["features"]["translation"] == [0.0] * 4


def test_task_failing_once_is_retried_and_output_complete(cluster_client, data_dir, options, tmp_path):
    ref = SourceRef(path=str(data_dir / "b.npy"), axes="cyx")
    serial(plan_job(ref, options, tmp_path / "serial"))
    marker = tmp_path / "fault-fired"
    flaky = FlakySourceRef(path=ref.path, axes="cyx", marker=str(marker), home_pid=os.getpid())
    run_job(plan_job(flaky, options, tmp_path / "dask"), client=cluster_client, retries=2)
    assert marker.exists()  # the fault did fire in a worker
    assert_identical(tmp_path / "serial", tmp_path / "dask", ("features.ome.zarr", "pca.ome.zarr"))


def test_worker_killed_mid_run_loses_no_finished_plane(cluster_client, data_dir, options, tmp_path):
    """A worker process dies in the render stage of a 5-plane stack (at the 8th time a worker
    opens the source: after the 5 fits): its task is rerun elsewhere and the output equals the
    serial path byte for byte."""
    ref = SourceRef(path=str(data_dir / "stack.npy"), axes="zyx")
    serial(plan_job(ref, options, tmp_path / "serial"))
    (tmp_path / "opens").mkdir()
    marker = tmp_path / "opens" / "killed"
    dying = FlakySourceRef(path=ref.path, axes="zyx", marker=str(marker), home_pid=os.getpid(), kill_at_open=8)
    run_job(plan_job(dying, options, tmp_path / "dask"), client=cluster_client, retries=2)
    assert marker.exists()  # a worker did die
    assert_identical(tmp_path / "serial", tmp_path / "dask", ("features.ome.zarr", "pca.ome.zarr", "kernels.ome.zarr"))
    cluster_client.wait_for_workers(2, timeout=60)  # the nanny restarted it, for the next tests


def test_task_failing_every_time_aborts_the_job_and_names_the_plane(cluster_client, data_dir, options, tmp_path):
    broken = FlakySourceRef(path=str(data_dir / "c.npy"), axes="cyx", home_pid=os.getpid(), always=True)
    job = plan_job(broken, options, tmp_path / "out" / "c")
    with pytest.raises(
        JobTaskError, match=r"1 task\(s\) failed after 1 retries \(fit of plane t=0 z=0\).*injected fault: this source is broken"
    ) as info:
        run_job(job, client=cluster_client, retries=1)
    assert len(info.value.failures) == 1 and all(not o.ok for o in info.value.failures)
    assert not (tmp_path / "out").exists()  # no half-written output folder, not even its parent


def test_unreachable_scheduler_fails_fast_from_python(data_dir, options, tmp_path, closed_port):
    address = f"tcp://127.0.0.1:{closed_port}"
    job = plan_job(SourceRef(path=str(data_dir / "a.npy"), axes="cyx"), options, tmp_path / "out")
    with pytest.raises(SchedulerUnreachableError, match=address + " within 2 s"):  # the timeout given is used
        run_job(job, client=address, connect_timeout=2)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


def run_cli(args, tmp_path, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=env)


def test_cli_batch_with_local_dask_is_byte_identical_to_serial(data_dir, options, weights_file, tmp_path):
    from dataclasses import replace

    images = [data_dir / f"{n}.npy" for n in "abcd"]
    for img in images:
        serial(plan_job(SourceRef(path=str(img), axes="cyx"), replace(options, format="npy"), tmp_path / "serial" / img.stem))
    res = run_cli(
        [
            "run",
            *images,
            "--axes",
            "cyx",
            "--out",
            tmp_path / "dask",
            "--weights",
            weights_file,
            "--steps",
            STEPS,
            "--device",
            "cpu",
            "--format",
            "npy",
            "--dask",
            "--workers",
            "2",
            "--max-memory",
            "1GiB",
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert "tasks" in res.stderr  # the tqdm bar over finished tasks
    for img in images:
        assert_identical(tmp_path / "serial" / img.stem, tmp_path / "dask" / img.stem, ("features_hr.npy", "kernels.npz"))


#: How far a serial run (torch's default thread count) and a --dask run (one thread per worker)
#: may differ, as max |a - b| / max |a| per array (docs/scale.md): the ViT's matmuls may sum in
#: another order at another thread count. The fitted kernels do not depend on the thread count.
THREADS_TOLERANCE = 1e-5


def test_cli_serial_and_dask_batch_agree_within_the_documented_tolerance(cluster_client, data_dir, weights_file, tmp_path):
    images = [data_dir / f"{n}.npy" for n in "abc"]
    common = ["run", *images, "--axes", "cyx", "--weights", weights_file, "--steps", STEPS, "--device", "cpu"]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    dask = ["--dask", cluster_client.scheduler.address]  # the module's workers: one thread each
    for name, extra in (("serial", []), ("dask", dask)):  # serial: torch's default, all cores
        res = subprocess.run(
            CLI + [str(a) for a in common + ["--out", tmp_path / name, "--quiet", *extra]],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
        assert res.returncode == 0, res.stderr
    for img in images:
        a, b = tmp_path / "serial" / img.stem, tmp_path / "dask" / img.stem
        for store in ("features.ome.zarr", "lr_features.ome.zarr", "kernels.ome.zarr"):
            x = np.asarray(zarr.open_array(str(a / store / "0"), mode="r")[...], dtype=np.float64)
            y = np.asarray(zarr.open_array(str(b / store / "0"), mode="r")[...], dtype=np.float64)
            assert x.shape == y.shape and np.isfinite(x).all()
            err = np.abs(x - y).max() / np.abs(x).max()
            limit = 0.0 if store == "kernels.ome.zarr" else THREADS_TOLERANCE
            assert err <= limit, f"{img.stem}/{store}: serial vs dask differ by {err:.3g} (documented: {limit:g})"


def test_cli_unreachable_scheduler_fails_in_seconds(data_dir, weights_file, tmp_path, closed_port):
    address = f"tcp://127.0.0.1:{closed_port}"
    res = run_cli(
        [
            "run",
            data_dir / "a.npy",
            "--axes",
            "cyx",
            "--out",
            tmp_path / "out",
            "--weights",
            weights_file,
            "--steps",
            STEPS,
            "--dask",
            address,
        ],
        tmp_path,
        timeout=120,
    )
    assert res.returncode == 1, res.stderr
    assert f"no Dask scheduler answered at {address} within 5 s" in res.stderr  # the CLI's connection timeout
    assert len(res.stderr.strip().splitlines()) == 1
    assert not any((tmp_path / "out").iterdir())


def test_cli_bad_input_on_dask_is_exit_2_like_serial(cluster_client, data_dir, weights_file, tmp_path):
    """An image with NaN fails in the worker's fit task: reported as bad input (exit 2, as
    without --dask), not retried, and no output folder is left."""
    img = np.load(data_dir / "a.npy").astype(np.float32)
    img[0, 3, 3] = np.nan
    np.save(tmp_path / "nan.npy", img)
    common = ["run", tmp_path / "nan.npy", "--axes", "cyx", "--weights", weights_file, "--steps", STEPS, "--device", "cpu"]
    serial_res = run_cli([*common, "--out", tmp_path / "serial"], tmp_path, timeout=120)
    dask_res = run_cli([*common, "--out", tmp_path / "dask", "--dask", cluster_client.scheduler.address], tmp_path, timeout=180)
    assert serial_res.returncode == 2 and "NaN" in serial_res.stderr, serial_res.stderr
    assert dask_res.returncode == 2, dask_res.stderr
    assert "bad input" in dask_res.stderr and "not retried" in dask_res.stderr and "NaN" in dask_res.stderr
    assert not (tmp_path / "dask" / "nan").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workers", "2"], "add --dask"),
        (["--dask", "--workers", "0"], "--workers 0"),
        (["--dask", "--retries", "-1"], "--retries -1"),
        (["--dask", "nonsense"], "--dask nonsense"),
    ],
)
def test_cli_bad_dask_flags_are_usage_errors(data_dir, tmp_path, args, message):
    res = run_cli(["run", data_dir / "a.npy", "--axes", "cyx", "--out", tmp_path / "out", *args], tmp_path, timeout=120)
    assert res.returncode == 2 and message in res.stderr, res.stderr


def test_worker_memory_limit_is_the_budget_plus_the_process_overhead():
    assert worker_memory_limit(None) is None and worker_memory_limit("auto") is None
    assert worker_memory_limit("1GiB") == 2 * 2**30


@pytest.mark.parametrize("kind", ["labels", "continuous"])
def test_cli_map_on_a_running_scheduler_is_byte_identical_to_serial(cluster_client, data_dir, tmp_path, kind, capsys):
    from napari_upsample_anything.cli import main

    rng = np.random.default_rng(1)
    lr = rng.integers(0, 3, (4, 4)).astype(np.uint8) if kind == "labels" else rng.standard_normal((2, 4, 4)).astype(np.float32)
    np.save(tmp_path / "lr.npy", lr)
    common = [
        "map",
        tmp_path / "lr.npy",
        "--image",
        data_dir / "a.npy",
        "--axes",
        "cyx",
        "--steps",
        STEPS,
        "--device",
        "cpu",
        "--quiet",
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers
    try:
        assert main([str(a) for a in common + ["--out", tmp_path / "serial.npy"]]) == 0
    finally:
        torch.set_num_threads(threads)
    address = cluster_client.scheduler.address  # connect by address, as to a cluster started elsewhere
    assert main([str(a) for a in common + ["--out", tmp_path / "dask.npy", "--dask", address]]) == 0
    assert "on Dask" in capsys.readouterr().out
    a, b = np.load(tmp_path / "serial.npy"), np.load(tmp_path / "dask.npy")
    assert a.shape == b.shape == ((SIZE, SIZE) if kind == "labels" else (2, SIZE, SIZE)) and a.dtype == b.dtype == lr.dtype
    assert a.tobytes() == b.tobytes()


def test_open_results_refuses_folders_without_ome_zarr_outputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="out_dir="):
        open_results(tmp_path / "missing")
    (tmp_path / "npy_run").mkdir()
    np.save(tmp_path / "npy_run" / "features_hr.npy", np.zeros((2, 3, 3), np.float32))
    with pytest.raises(ValueError, match="no .ome.zarr outputs"):
        open_results(tmp_path / "npy_run")
