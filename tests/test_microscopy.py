"""Microscopy data end to end: named axes in, OME-Zarr out, the `map` command, batches, the
one orchestration shared by the CLI and the widgets, and the CLI's exit-code conventions."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import torch
from conftest import rel_err

from napari_upsample_anything import cli
from napari_upsample_anything.cli import output_names
from napari_upsample_anything.omezarr import BandWriter, build_pyramid, create_image, open_level0, read_kernels
from napari_upsample_anything.pipeline import PipelineOptions, SourceRef, plan_job
from napari_upsample_anything.sources import from_array, open_image, parse_channels, parse_planes

CLI = [sys.executable, "-m", "napari_upsample_anything.cli"]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")


def run_cli(args, tmp_path, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A ViT-S/14 DINOv2-architecture state dict with random weights, written by the test."""
    import timm

    path = tmp_path_factory.mktemp("weights") / "vits14_random.pth"
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=False, dynamic_img_size=True)
    torch.save(model.state_dict(), path)
    return path


def _stack(n, h, w, seed=0, dtype=np.uint16):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    planes = [np.sin(yy / (4.0 + k)) + np.cos(xx / (5.0 + k)) + 0.3 * rng.random((h, w)) for k in range(n)]
    arr = (np.stack(planes) + 2.5) / 5.0
    return (arr * (1000 if dtype == np.uint16 else 255)).astype(dtype)


def _rgb_png(path, h=56, w=70, seed=0):
    import skimage.io

    rgb = np.moveaxis(_stack(3, h, w, seed, np.uint8), 0, -1)
    skimage.io.imsave(path, rgb, check_contrast=False)
    return rgb


# ---------------------------------------------------------------------------------- reading
def test_planes_and_channels_expressions():
    assert parse_planes("all", 2, 3) == [(t, z) for t in range(2) for z in range(3)]
    assert parse_planes("z=2", 2, 3) == [(0, 2), (1, 2)]
    assert parse_planes("t=0,z=1:3", 2, 3) == [(0, 1), (0, 2)]
    assert parse_planes("t=1:", 3, 1) == [(1, 0), (2, 0)]
    for bad in ("z=3", "q=1", "z=2:1", "z=1,z=2", "z="):
        with pytest.raises(ValueError, match="--planes"):
            parse_planes(bad, 2, 3)
    assert parse_channels("all", 4) == (0, 1, 2, 3) and parse_channels("0,2", 4) == (0, 2)
    for bad in ("5", "0,0", "a"):
        with pytest.raises(ValueError, match="--channels"):
            parse_channels(bad, 4)


def test_named_axes_from_files_and_arrays(tmp_path):
    zyx = _stack(3, 30, 40)
    tifffile.imwrite(
        tmp_path / "s.ome.tif",
        zyx,
        ome=True,
        metadata={"axes": "ZYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5, "PhysicalSizeZ": 2.0},
    )
    src = open_image(tmp_path / "s.ome.tif")
    assert src.sizes == {"T": 1, "C": 1, "Z": 3, "Y": 30, "X": 40}
    assert src.pixel_sizes == {"z": 2.0, "y": 0.5, "x": 0.5}
    assert np.array_equal(src.guide(0, 2), zyx[2])
    # a plain TIFF or .npy stack names no axes: an error asking for them, never a guess
    tifffile.imwrite(tmp_path / "plain.tif", zyx)
    np.save(tmp_path / "plain.npy", zyx)
    for name in ("plain.tif", "plain.npy"):
        with pytest.raises(ValueError, match="ambiguous.*--axes zyx"):
            open_image(tmp_path / name)
        assert np.array_equal(open_image(tmp_path / name, axes="zyx").guide(0, 1), zyx[1])
    cyx = open_image(tmp_path / "plain.npy", axes="cyx")
    assert cyx.guide(0, 0).shape == (30, 40, 3) and np.array_equal(cyx.guide(0, 0, (2,)), zyx[2])
    # arrays: axes required beyond 2-D; every layout lands on TCZYX
    with pytest.raises(ValueError, match="axes="):
        from_array(zyx)
    src = from_array(np.zeros((2, 4, 3, 30, 40), np.float32), "tczyx")
    assert src.sizes == {"T": 2, "C": 4, "Z": 3, "Y": 30, "X": 40}
    with pytest.raises(ValueError, match="names 2 axes"):
        from_array(zyx, "yx")


def test_a_plane_is_read_on_its_own():
    """Only the chunk of the requested plane is read from a (lazy) stack."""
    import dask.array as da

    reads = []
    base = _stack(5, 30, 40)

    def load(block, block_info=None):
        reads.append(block_info[None]["chunk-location"])
        return block

    lazy = da.from_array(base, chunks=(1, 30, 40)).map_blocks(load, dtype=base.dtype)
    src = from_array(lazy, "zyx")
    plane = src.guide(0, 3)
    assert np.array_equal(plane, base[3]) and reads == [(3, 0, 0)]


def test_png_header_claiming_a_huge_image_is_refused_before_decoding(tmp_path):
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path = tmp_path / "huge.png"
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    )
    with pytest.raises(ValueError, match="huge.png.*100000 x 100000"):
        open_image(path)
    res = run_cli(["run", path, "--out", tmp_path / "o", "--quiet"], tmp_path, timeout=300)
    assert res.returncode == 2 and "huge.png" in res.stderr and "Traceback" not in res.stderr
    assert not any((tmp_path / "o").iterdir())  # no empty output folder for the failed input


# ---------------------------------------------------------------------------------- writing
def test_band_writer_matches_a_direct_render_and_stays_bounded(tmp_path, gen):
    """The render engine writing through a row-band buffer into zarr gives the same array."""
    from conftest import random_field

    import napari_upsample_anything as upa

    C, H, W, h, w = 5, 61, 47, 6, 5
    guide = np.random.default_rng(1).random((H, W)).astype(np.float32)
    lr = np.random.default_rng(2).standard_normal((C, h, w)).astype(np.float32)
    fld = random_field(h, w, gen, sigma=(0.5, 8.0))
    ref = upa.render(lr, guide, fld, device="cpu", max_memory="2MB")
    arr = create_image(tmp_path / "f.ome.zarr", (2, C, H, W), "tcyx", chunks=(1, 2, 8, 16))
    writer = BandWriter(arr, "tcyx", (1, None, None, None), (C, H, W))
    upa.render(lr, guide, fld, device="cpu", max_memory="2MB", out=writer)
    writer.close()
    assert np.array_equal(np.asarray(arr[1]), ref) and not np.asarray(arr[0]).any()
    assert writer.bands_written >= 3  # written band by band, not in one go at the end


def test_pyramid_metadata_and_readers(tmp_path):
    from bioio import BioImage
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    path = tmp_path / "p.ome.zarr"
    arr = create_image(path, (3, 100, 80), "cyx", pixel_sizes={"y": 0.25, "x": 0.5}, unit="micrometer", levels=3, name="pca")
    arr[...] = np.random.default_rng(0).random((3, 100, 80)).astype(np.float32)
    assert build_pyramid(path) == 3
    nodes = list(Reader(parse_url(str(path)))())
    data = nodes[0].data
    assert [tuple(d.shape) for d in data] == [(3, 100, 80), (3, 50, 40), (3, 25, 20)]
    assert np.allclose(np.asarray(data[1][0, 0, 0]), np.asarray(arr[0, :2, :2]).mean(), atol=1e-6)
    img = BioImage(path)
    assert img.physical_pixel_sizes.Y == 0.25 and img.physical_pixel_sizes.X == 0.5


# ---------------------------------------------------------------------------------- CLI
def test_ome_tiff_stacks_to_ome_zarr_with_axes_and_pixel_sizes(tmp_path, weights_file):
    """A ZYX and a CYX OME-TIFF through the CLI: OME-Zarr outputs with the right axes, shapes
    and pixel sizes, read back by bioio and ome-zarr."""
    from bioio import BioImage

    d = tmp_path / "in"
    d.mkdir()
    tifffile.imwrite(
        d / "stack.ome.tif",
        _stack(3, 56, 56),
        ome=True,
        metadata={"axes": "ZYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5, "PhysicalSizeZ": 2.0},
    )
    tifffile.imwrite(
        d / "chans.ome.tif",
        _stack(3, 56, 56, 1),
        ome=True,
        metadata={"axes": "CYX", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25},
    )
    out = tmp_path / "out"
    res = run_cli(
        [
            "run",
            d / "stack.ome.tif",
            d / "chans.ome.tif",
            "--out",
            out,
            "--weights",
            weights_file,
            "--steps",
            "2",
            "--device",
            "cpu",
            "--quiet",
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert {p.name for p in out.iterdir()} == {"stack", "chans"}  # no temporary folders left
    stack = out / "stack"
    assert {p.name for p in stack.iterdir()} == {
        "features.ome.zarr",
        "lr_features.ome.zarr",
        "kernels.ome.zarr",
        "pca.ome.zarr",
        "report.json",
    }
    feats, axes, _ = open_level0(stack / "features.ome.zarr")
    assert axes == "czyx" and feats.shape == (384, 3, 56, 56)
    img = BioImage(stack / "features.ome.zarr")
    assert img.dims.C == 384 and img.dims.Z == 3 and img.dims.Y == 56
    assert (img.physical_pixel_sizes.Z, img.physical_pixel_sizes.Y, img.physical_pixel_sizes.X) == (2.0, 0.5, 0.5)
    kern = BioImage(stack / "kernels.ome.zarr")
    assert kern.dims.C == 4 and (kern.dims.Y, kern.dims.X) == (4, 4)
    assert kern.physical_pixel_sizes.Y == pytest.approx(0.5 * 56 / 4)  # the LR grid's pixel size
    fields = read_kernels(stack / "kernels.ome.zarr")
    assert sorted(fields) == [(0, 0), (0, 1), (0, 2)] and fields[(0, 1)].shape == (4, 4)
    pca = BioImage(stack / "pca.ome.zarr")
    assert pca.dims.C == 3 and pca.dims.Z == 3
    rep = json.loads((stack / "report.json").read_text())
    assert rep["output_axes"] == "czyx" and len(rep["planes"]) == 3 and rep["pixel_sizes"]["z"] == 2.0
    # every plane was processed on its own: different planes, different features
    f = np.asarray(feats[:8])
    assert np.isfinite(f).all() and not np.allclose(f[:, 0], f[:, 1])

    chans = out / "chans"
    feats, axes, _ = open_level0(chans / "features.ome.zarr")
    assert axes == "cyx" and feats.shape == (384, 56, 56)
    img = BioImage(chans / "features.ome.zarr")
    assert (img.physical_pixel_sizes.Y, img.physical_pixel_sizes.X) == (0.25, 0.25)
    assert (chans / "pca.png").exists()


def test_batch_names_failures_and_resume(tmp_path, weights_file):
    """Same file names in different folders get deterministic names; a broken input is
    reported, the others complete, the exit code is non-zero; --skip-existing resumes."""
    for sub in ("a", "b", "c"):
        (tmp_path / sub).mkdir()
    _rgb_png(tmp_path / "a" / "x.png", seed=0)
    _rgb_png(tmp_path / "b" / "x.png", seed=1)
    (tmp_path / "c" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    inputs = [tmp_path / s / "x.png" for s in ("a", "b", "c")]
    assert output_names(inputs) == ["a/x", "b/x", "c/x"] == output_names(list(reversed(inputs)))[::-1]
    out = tmp_path / "out"
    args = ["run", *inputs, "--out", out, "--weights", weights_file, "--steps", "2", "--device", "cpu", "--pca-only", "--quiet"]
    res = run_cli(args, tmp_path)
    assert res.returncode != 0 and "c/x.png" in res.stderr and "1 of 3 input(s) failed" in res.stderr
    assert "FAILED" in res.stdout
    for sub in ("a", "b"):
        assert (out / sub / "x" / "report.json").is_file() and (out / sub / "x" / "pca.ome.zarr").is_dir()
    assert not (out / "c").exists()  # no empty folder for the failed input
    first = (out / "a" / "x" / "report.json").read_text()
    (tmp_path / "c" / "x.png").unlink()
    _rgb_png(tmp_path / "c" / "x.png", seed=2)
    res = run_cli(args + ["--skip-existing"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("skipped (exists)") == 2 and (out / "c" / "x" / "report.json").is_file()
    assert (out / "a" / "x" / "report.json").read_text() == first
    assert sorted(str(p.relative_to(out)) for p in out.rglob("report.json")) == [
        "a/x/report.json",
        "b/x/report.json",
        "c/x/report.json",
    ]


@pytest.mark.filterwarnings("ignore")
def test_cli_and_widget_paths_give_identical_arrays(tmp_path, weights_file, monkeypatch):
    """One orchestration: the CLI's files equal the widget pipeline's arrays, bit for bit."""
    from napari_upsample_anything.widgets._pipeline import RunConfig, run_pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rgb = _rgb_png(tmp_path / "cells.png")
    out = tmp_path / "out"
    options = ["--weights", str(weights_file), "--steps", "2", "--device", "cpu", "--guide-smoothing", "1.0"]
    options += ["--fit-fraction", "0.5", "--quiet"]
    code = cli.main(["run", str(tmp_path / "cells.png"), "--out", str(out), *options])
    assert code == 0
    cfg = RunConfig(weights=str(weights_file), steps=2, device="cpu", hr_features="memory", guide_smoothing=1.0, fit_fraction=0.5)
    res = run_pipeline([((), rgb)], cfg)
    plane = res.planes[0]
    feats, axes, _ = open_level0(out / "cells" / "features.ome.zarr")
    assert axes == "cyx" and np.array_equal(np.asarray(feats), plane.hr_features)
    pca, _, _ = open_level0(out / "cells" / "pca.ome.zarr")
    assert np.array_equal(np.asarray(pca), np.moveaxis(plane.hr_rgb, -1, 0))
    field = read_kernels(out / "cells" / "kernels.ome.zarr")[(0, 0)]
    assert field.equal(plane.field) and field.meta["guide_smoothing"] == 1.0
    assert field.meta["fit_fraction"] == plane.field.meta["fit_fraction"] == 0.5  # the stochastic fit, seeded
    # --format npy keeps today's files, with the same numbers
    code = cli.main(["run", str(tmp_path / "cells.png"), "--out", str(tmp_path / "npy"), *options, "--format", "npy"])
    assert code == 0
    d = tmp_path / "npy" / "cells"
    assert {p.name for p in d.iterdir()} == {"features_hr.npy", "pca.png", "kernels.npz", "report.json"}
    assert np.array_equal(np.load(d / "features_hr.npy"), plane.hr_features)


def test_tasks_are_picklable_and_stage_ordered(tmp_path):
    tifffile.imwrite(tmp_path / "s.ome.tif", _stack(2, 30, 30), ome=True, metadata={"axes": "ZYX"})
    job = plan_job(SourceRef(path=str(tmp_path / "s.ome.tif")), PipelineOptions(device="cpu"), tmp_path / "out", planes="all")
    assert [t.kind for t in job.tasks] == ["fit", "fit", "layout", "render", "render", "finish"]
    assert [len(s) for s in job.stages()] == [2, 1, 2, 1]
    back = pickle.loads(pickle.dumps(job.tasks))
    assert back[4].plane == (0, 1) and back[4].store == job.tasks[4].store
    assert not job.tmp.exists() and not (tmp_path / "out").exists()  # planning writes nothing


def test_map_command_equals_upsample(tmp_path, weights_file, monkeypatch):
    """`map` on a probability map equals upa.upsample on the same arrays; labels give labels;
    saved kernels are reused."""
    import skimage.io

    import napari_upsample_anything as upa

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _rgb_png(tmp_path / "img.png", 56, 70)
    guide = skimage.io.imread(tmp_path / "img.png")
    rng = np.random.default_rng(0)
    prob = rng.random((2, 4, 5)).astype(np.float32)
    prob /= prob.sum(0, keepdims=True)
    np.save(tmp_path / "prob.npy", prob)
    common = ["--image", str(tmp_path / "img.png"), "--steps", "2", "--device", "cpu", "--quiet"]
    assert cli.main(["map", str(tmp_path / "prob.npy"), "--out", str(tmp_path / "hr.npy"), *common]) == 0
    expected = upa.upsample(guide, prob, steps=2, device="cpu")
    got = np.load(tmp_path / "hr.npy")
    assert got.shape == (2, 56, 70) and np.array_equal(got, expected)

    labels = (prob[1] > prob[0]).astype(np.int16) * 7
    np.save(tmp_path / "lab.npy", labels)
    assert cli.main(["map", str(tmp_path / "lab.npy"), "--out", str(tmp_path / "lab_hr.ome.zarr"), *common]) == 0
    arr, axes, _ = open_level0(tmp_path / "lab_hr.ome.zarr")
    lab_hr = np.asarray(arr)[0]
    assert lab_hr.dtype == np.int16 and set(np.unique(lab_hr)) <= {0, 7} and lab_hr.shape == (56, 70)

    # kernels saved by `run` are reused as they are (no fit): same as render with that field
    out = tmp_path / "run"
    assert (
        cli.main(
            [
                "run",
                str(tmp_path / "img.png"),
                "--out",
                str(out),
                "--weights",
                str(weights_file),
                "--steps",
                "2",
                "--device",
                "cpu",
                "--pca-only",
                "--quiet",
            ]
        )
        == 0
    )
    fld = read_kernels(out / "img" / "kernels.ome.zarr")[(0, 0)]
    lr = rng.random(fld.shape).astype(np.float32)
    np.save(tmp_path / "depth.npy", lr)
    assert (
        cli.main(
            [
                "map",
                str(tmp_path / "depth.npy"),
                "--out",
                str(tmp_path / "depth.tif"),
                "--kernels",
                str(out / "img" / "kernels.ome.zarr"),
                "--image",
                str(tmp_path / "img.png"),
                "--device",
                "cpu",
                "--steps",
                "0",
                "--quiet",
            ]
        )
        == 0
    )
    assert rel_err(tifffile.imread(tmp_path / "depth.tif"), upa.render(lr, guide, fld, device="cpu")[0]) < 1e-6
    # a map on another grid than the kernels is refused, naming the fix
    np.save(tmp_path / "coarse.npy", rng.random((3, 3)).astype(np.float32))
    assert (
        cli.main(
            [
                "map",
                str(tmp_path / "coarse.npy"),
                "--out",
                str(tmp_path / "x.npy"),
                "--kernels",
                str(out / "img" / "kernels.ome.zarr"),
                "--image",
                str(tmp_path / "img.png"),
                "--quiet",
            ]
        )
        == 2
    )
    assert not (tmp_path / "x.npy").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--guide-smoothing", "inf"], "--guide-smoothing"),
        (["--guide-smoothing", "nan"], "--guide-smoothing"),
        (["--guide-smoothing", "abc"], "--guide-smoothing"),
        (["--fit-fraction", "0"], "--fit-fraction"),
        (["--max-memory", "1e400"], "--max-memory"),
        (["--planes", "q=1"], "--planes"),
        (["--channels", "x"], "--channels"),
        (["--axes", "qq"], "--axes"),
        (["--weights", "/does/not/exist.pth"], "--weights"),
    ],
)
def test_flags_are_validated_before_any_model_loads(tmp_path, args, message):
    img = tmp_path / "i.png"
    _rgb_png(img)
    res = run_cli(["run", img, "--out", tmp_path / "o", *args], tmp_path, timeout=300)
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert message in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()


def test_version_and_traceback_after_the_subcommand(tmp_path):
    from napari_upsample_anything import __version__

    res = run_cli(["--version"], tmp_path)
    assert res.returncode == 0 and __version__ in res.stdout
    res = run_cli(["run", tmp_path / "missing.png", "--out", tmp_path / "o", "--traceback"], tmp_path)
    assert res.returncode == 2 and "Traceback" in res.stderr and "image file not found" in res.stderr


def test_ctrl_c_during_render_leaves_no_result_and_keeps_the_earlier_one(tmp_path, weights_file):
    """SIGINT in the render stage: exit 130, no partial folder, the earlier run's files intact."""
    import skimage.io

    yy, xx = np.mgrid[0:336, 0:336]
    img = np.stack([np.sin(yy / 9.0), np.cos(xx / 7.0), np.sin((xx + yy) / 13.0)], -1)
    skimage.io.imsave(tmp_path / "big.png", ((img + 1) * 127).astype(np.uint8), check_contrast=False)
    out = tmp_path / "out"
    base = ["run", tmp_path / "big.png", "--out", out, "--weights", weights_file, "--steps", "1", "--device", "cpu"]
    res = run_cli(base + ["--pca-only", "--quiet"], tmp_path)
    assert res.returncode == 0, res.stderr
    earlier = {p.name: p.stat().st_mtime_ns for p in (out / "big").iterdir()}
    report = (out / "big" / "report.json").read_text()

    from napari_upsample_anything.pipeline import TEST_PAUSE_ENV

    fifo = tmp_path / "paused"
    os.mkfifo(fifo)
    os.mkfifo(f"{fifo}.go")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")
    env[TEST_PAUSE_ENV] = f"render:{fifo}"  # the run pauses when its render task starts
    log = tmp_path / "stderr.txt"  # a file, not a pipe: a full pipe would stall the run
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            CLI + [str(a) for a in base + ["--max-memory", "64MB"]], stdout=subprocess.DEVNULL, stderr=err, env=env
        )
        try:
            with open(fifo) as f:  # returns once the render task has started and said so
                assert f.readline() == "render started\n", log.read_text()[-2000:]
            assert proc.poll() is None  # inside its render stage when Ctrl-C arrives
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log.read_text(errors="replace")
    assert proc.returncode == 130, text[-2000:]
    assert "interrupted" in text
    assert [p.name for p in out.iterdir()] == ["big"]  # no temporary folder left
    assert {p.name: p.stat().st_mtime_ns for p in (out / "big").iterdir()} == earlier
    assert (out / "big" / "report.json").read_text() == report and not (out / "big" / "features.ome.zarr").exists()
