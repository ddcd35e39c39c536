"""Ctrl-C during ``run --dask``: the partial output is removed, the earlier result stays, and
no process prints a traceback. The run is interrupted at a known point (a render task on a
worker has started and announced it through a named pipe; see
``pipeline.TEST_PAUSE_ENV``), with SIGINT sent to the whole process group, as a terminal's
Ctrl-C does; the paused task is still running when the main process handles the interrupt."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

CLI = [sys.executable, "-m", "napari_upsample_anything.cli"]


@pytest.mark.skipif(sys.platform == "win32", reason="process groups and named pipes are POSIX")
def test_ctrl_c_during_a_dask_run_leaves_only_the_earlier_result(tmp_path):
    import skimage.io

    from napari_upsample_anything.pipeline import TEST_PAUSE_ENV

    image = tmp_path / "cells.png"
    skimage.io.imsave(image, (np.random.default_rng(0).random((48, 40, 3)) * 255).astype(np.uint8), check_contrast=False)
    out = tmp_path / "out"
    earlier = out / "cells"
    earlier.mkdir(parents=True)
    (earlier / "report.json").write_text('{"earlier": true}')
    fifo = tmp_path / "paused"
    os.mkfifo(fifo)
    os.mkfifo(f"{fifo}.go")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")
    env[TEST_PAUSE_ENV] = f"render:{fifo}"
    args = ["run", image, "--out", out, "--backbone", "test_vit", "--random-weights", "--steps", "1", "--device", "cpu"]
    args += ["--quiet", "--dask", "--workers", "1"]
    proc = subprocess.Popen(
        CLI + [str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        with open(fifo) as f:  # returns once the worker's render task has started and written
            assert f.readline() == "render started\n"
        partial = [p.name for p in out.iterdir() if p.name.startswith(".cells.partial-")]
        assert len(partial) == 1  # the run is inside its render stage, writing its partial folder
        assert proc.poll() is None  # and still running when Ctrl-C arrives
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the main process and its workers
        # The render task stays paused, holding its part of the partial folder, until the main
        # process closes the local cluster. (Releasing it here raced with the interrupt on a
        # loaded machine: the job could finish before the main thread ran its handler.)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert "interrupted; partial outputs removed" in stderr  # the signal reached the main process
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert sorted(p.name for p in out.iterdir()) == ["cells"]  # no partial folder left
    assert sorted(p.name for p in earlier.iterdir()) == ["report.json"]
    assert (earlier / "report.json").read_text() == '{"earlier": true}'
