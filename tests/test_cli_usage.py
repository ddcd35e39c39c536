"""The command line's answers to mistakes: one exit code per kind, one line, the flag named,
and nothing loaded or written first (subprocesses; no model is loaded in any of these)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

CLI = [sys.executable, "-m", "napari_upsample_anything.cli"]


def run_cli(args, tmp_path, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=env)


def one_line(res) -> str:
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    return lines[0]


@pytest.fixture
def gray_png(tmp_path):
    import skimage.io

    path = tmp_path / "gray.png"
    skimage.io.imsave(path, (np.random.default_rng(0).random((64, 56)) * 255).astype(np.uint8), check_contrast=False)
    return path


@pytest.mark.parametrize(
    "budget,words",
    [
        ("1KB", ["--max-memory 1KB", "too small", "at least 16.0 MiB"]),
        ("10TB", ["--max-memory 10TB", "more than this machine's memory", "GiB"]),
    ],
)
def test_budgets_out_of_reach_are_refused_before_any_model_loads(tmp_path, gray_png, budget, words):
    res = run_cli(["run", gray_png, "--out", tmp_path / "o", "--max-memory", budget], tmp_path)
    assert res.returncode == 2
    line = one_line(res)  # no model warning, no progress: refused first
    assert line.startswith("upsample-anything: usage error: ") and all(w in line for w in words), line
    assert not (tmp_path / "o").exists()


def test_random_weights_and_a_weights_file_exclude_each_other(tmp_path, gray_png):
    w = tmp_path / "w.pth"
    w.write_bytes(b"x")
    res = run_cli(["run", gray_png, "--out", tmp_path / "o", "--weights", w, "--random-weights"], tmp_path)
    assert res.returncode == 2 and "--random-weights" in one_line(res)


def test_a_map_finer_than_the_image_is_a_usage_mistake(tmp_path, gray_png):
    np.save(tmp_path / "fine.npy", np.zeros((80, 70), np.float32))
    res = run_cli(["map", tmp_path / "fine.npy", "--image", gray_png, "--out", tmp_path / "x.npy"], tmp_path)
    assert res.returncode == 2
    assert "finer than the image" in one_line(res)
    assert not (tmp_path / "x.npy").exists()


@pytest.mark.parametrize(
    "flags,words",
    [(["--workers", "2"], "add --dask"), (["--dask", "nohost"], "give a scheduler address such as tcp://host:8786")],
)
def test_map_refuses_dask_flags_as_run_does(tmp_path, gray_png, flags, words):
    """`map` checks the Dask flags with run's check (in cli.py) from its own module: under
    `python -m ...cli` that is a second copy of cli.py, whose UsageError must still be exit 2."""
    np.save(tmp_path / "lr.npy", np.zeros((4, 4), np.float32))
    res = run_cli(["map", tmp_path / "lr.npy", "--image", gray_png, "--out", tmp_path / "x.npy", *flags], tmp_path)
    assert res.returncode == 2
    line = one_line(res)
    assert line.startswith("upsample-anything: usage error: ") and words in line, line
    assert not (tmp_path / "x.npy").exists()


def test_plane_ranges_clip_like_python_slices(tmp_path):
    import tifffile

    from napari_upsample_anything.sources import parse_planes

    assert parse_planes("z=3:6", 1, 5) == [(0, 3), (0, 4)]
    assert parse_planes("z=:2", 1, 5) == [(0, 0), (0, 1)]
    assert parse_planes("t=0,z=4:", 1, 5) == [(0, 4)]
    for text, why in (("z=7:9", "selects none"), ("z=5", "does not exist"), ("z=3:3", "selects none")):
        with pytest.raises(ValueError, match=why):
            parse_planes(text, 1, 5)
    # the CLI: z=3:9 on a 5-plane stack selects planes 3 and 4 (and map asks for one of them)
    tifffile.imwrite(tmp_path / "s.ome.tif", np.zeros((5, 32, 32), np.uint8), ome=True, metadata={"axes": "ZYX"})
    np.save(tmp_path / "lr.npy", np.zeros((4, 4), np.float32))
    res = run_cli(
        ["map", tmp_path / "lr.npy", "--image", tmp_path / "s.ome.tif", "--planes", "z=3:9", "--out", tmp_path / "x.npy"],
        tmp_path,
    )
    assert res.returncode == 2 and "has 2 planes" in one_line(res)


def test_map_creates_its_output_folder_as_run_does(tmp_path, gray_png):
    import skimage.io

    import napari_upsample_anything as upa

    field = upa.fit_kernels(skimage.io.imread(gray_png), (4, 4), steps=1, device="cpu")
    field.save(tmp_path / "k.npz")
    np.save(tmp_path / "lr.npy", np.random.default_rng(1).random((4, 4)).astype(np.float32))
    out = tmp_path / "new" / "deeper" / "up.npy"
    res = run_cli(
        ["map", tmp_path / "lr.npy", "--image", gray_png, "--kernels", tmp_path / "k.npz", "--out", out, "--quiet"], tmp_path
    )
    assert res.returncode == 0, res.stderr
    assert np.load(out).shape == (64, 56)
    (tmp_path / "file").write_text("")
    res = run_cli(["map", tmp_path / "lr.npy", "--image", gray_png, "--out", tmp_path / "file" / "up.npy"], tmp_path)
    assert res.returncode == 2 and "is not a folder" in one_line(res)


def test_the_map_job_refuses_kernels_on_another_grid_serially_and_as_a_task(tmp_path, gray_png):
    """One map job for `map` and `map --dask`: kernels on another grid than the map are a usage
    error in the command and a bad-input failure (not retried) as a task; nothing is written."""
    import skimage.io

    import napari_upsample_anything as upa
    from napari_upsample_anything.cli_map import map_job
    from napari_upsample_anything.cli_printing import UsageError
    from napari_upsample_anything.distributed import execute
    from napari_upsample_anything.pipeline import PipelineOptions

    field = upa.fit_kernels(skimage.io.imread(gray_png), (4, 4), steps=1, device="cpu")
    field.save(tmp_path / "k.npz")
    np.save(tmp_path / "lr.npy", np.random.default_rng(1).random((3, 3)).astype(np.float32))
    spec = {
        "map": str(tmp_path / "lr.npy"),
        "image": str(gray_png),
        "axes": None,
        "scene": None,
        "plane": (0, 0),
        "kernels": str(tmp_path / "k.npz"),
        "kind": "continuous",
        "options": PipelineOptions(steps=0, device="cpu"),
        "out": str(tmp_path / "up.npy"),
    }
    with pytest.raises(UsageError, match="on a 4 x 4 grid but the map is 3 x 3; leave --kernels out"):
        map_job(spec)
    [outcome] = execute([spec], map_job, retries=2)
    assert not outcome.ok and outcome.input_error, outcome
    assert "on a 4 x 4 grid but the map is 3 x 3" in outcome.error
    assert not (tmp_path / "up.npy").exists()


def test_each_subcommand_lists_only_its_own_flags(tmp_path):
    helps = {cmd: run_cli([cmd, "--help"], tmp_path).stdout for cmd in ("run", "map", "demo")}
    for flag in ("--backbone", "--layer", "--input-size", "--weights", "--random-weights", "--pca-only", "--format"):
        assert flag not in helps["map"], flag  # map loads no backbone and writes one file
    for flag in ("--random-weights", "--weights FILE", "--verbose", "--max-memory", "--dask"):
        assert flag in helps["run"], flag
    for flag in ("--planes", "--dask", "--kernels", "--format"):
        assert flag not in helps["demo"], flag
    assert "--kernels" in helps["map"] and "--planes" in helps["map"]


def test_reader_warnings_are_folded_into_the_one_error_line(tmp_path):
    """A truncated OME-TIFF: the readers log a dozen lines; the error stays one line that
    counts them and quotes the first, and --verbose prints them all."""
    import tifffile

    full = tmp_path / "full.ome.tif"
    tifffile.imwrite(
        full, (np.random.default_rng(0).random((1, 64, 64)) * 255).astype(np.uint8), ome=True, metadata={"axes": "ZYX"}
    )
    cut = tmp_path / "cut.ome.tif"
    cut.write_bytes(full.read_bytes()[:3000])  # the header is there, the pixels are not
    np.save(tmp_path / "lr.npy", np.zeros((4, 4), np.float32))
    args = ["map", tmp_path / "lr.npy", "--image", cut, "--out", tmp_path / "x.npy", "--quiet"]
    res = run_cli(args, tmp_path)
    assert res.returncode == 2
    line = one_line(res)
    assert str(cut) in line and "warning(s) on the way, first: tifffile" in line and "--verbose shows them all" in line
    loud = run_cli(args + ["--verbose"], tmp_path)
    assert loud.returncode == 2
    assert sum("tifffile" in s for s in loud.stderr.splitlines()) >= 2 and "warning(s) on the way" not in loud.stderr


def test_a_guide_with_other_channels_than_the_fit_is_refused_naming_both_counts():
    import napari_upsample_anything as upa

    rgb = np.random.default_rng(0).random((40, 36, 3)).astype(np.float32)
    field = upa.fit_kernels(rgb, (4, 4), steps=1, device="cpu")
    assert field.options.guide_channels == 3
    lr = np.random.default_rng(1).random((2, 4, 4)).astype(np.float32)
    with pytest.raises(
        ValueError, match=r"the guide has 1 channel\(s\) but the kernels were fitted on a guide of 3 channel\(s\)"
    ):
        upa.render(lr, rgb[..., 0], field, device="cpu")
    assert upa.render(lr, rgb, field, device="cpu").shape == (2, 40, 36)  # the fit's own guide renders


def test_missing_weights_on_dask_workers_name_the_flags_in_one_line(tmp_path, gray_png):
    res = run_cli(
        ["run", gray_png, "--out", tmp_path / "o", "--backbone", "test_vit", "--quiet"]
        + ["--dask", "--workers", "1", "--retries", "0"],
        tmp_path,
    )
    assert res.returncode == 1  # the machine lacks the weights: not a usage mistake
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[1] == "upsample-anything: 1 of 1 input(s) failed", res.stderr
    assert "error: pass --weights FILE" in lines[0] and "--random-weights for testing only" in lines[0]
    assert "Traceback" not in res.stderr and "Compute Failed" not in res.stderr
