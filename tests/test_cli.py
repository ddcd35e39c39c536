"""The ``upsample-anything`` command line, end to end in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

CLI = [sys.executable, "-m", "napari_upsample_anything.cli"]


def run_cli(args, tmp_path, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="2")
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


@pytest.fixture
def image_file(tmp_path):
    import skimage.data
    import skimage.io

    path = tmp_path / "cells.png"
    skimage.io.imsave(path, skimage.data.immunohistochemistry()[100:198, 60:172], check_contrast=False)  # 98 x 112
    return path


def test_run_end_to_end(tmp_path, image_file, weights_file):
    out = tmp_path / "out"
    res = run_cli(
        [
            "run",
            image_file,
            "--out",
            out,
            "--weights",
            weights_file,
            "--steps",
            "3",
            "--device",
            "cpu",
            "--format",
            "npy",
            "--quiet",
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr
    d = out / "cells"
    assert {p.name for p in d.iterdir()} == {"features_hr.npy", "pca.png", "kernels.npz", "report.json"}
    feats = np.load(d / "features_hr.npy", mmap_mode="r")
    assert feats.shape == (384, 98, 112) and feats.dtype == np.float32 and np.isfinite(feats).all()
    assert feats.std() > 0
    rep = json.loads((d / "report.json").read_text())
    assert rep["lr_shape"] == [7, 8] and rep["hr_shape"] == [98, 112] and rep["channels"] == 384
    assert rep["weights_source"].startswith("file:")
    assert set(rep["seconds"]) >= {"features", "fit", "render", "pca"}
    assert rep["fit_loss_final"] < rep["fit_loss_first"] and rep["fit_psnr_db"] > 20
    assert rep["memory"]["process_peak_rss_bytes"] > 0
    # the engine's accounting of the fit: what it kept plus its largest tile, per plane and overall
    assert rep["memory"]["fit_working_bytes"] == max(p["working_memory"] for p in rep["planes"]) > 0
    assert rep["memory"]["fit_planned_tile_bytes"] == max(p["memory"] for p in rep["planes"]) > 0
    import skimage.io

    pca = skimage.io.imread(d / "pca.png")
    assert pca.shape == (98, 2 * 112 + 8, 3) and pca.std() > 5
    from napari_upsample_anything import KernelField

    assert KernelField.load(d / "kernels.npz").shape == (7, 8)
    assert "cells.png" in res.stdout  # the summary table


def test_run_pca_only_and_float16(tmp_path, image_file, weights_file):
    out = tmp_path / "out"
    res = run_cli(
        ["run", image_file, "--out", out, "--weights", weights_file, "--steps", "1", "--pca-only", "--format", "npy", "--quiet"],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert not (out / "cells" / "features_hr.npy").exists() and (out / "cells" / "pca.png").exists()
    res = run_cli(
        [
            "run",
            image_file,
            "--out",
            out,
            "--weights",
            weights_file,
            "--steps",
            "1",
            "--dtype",
            "float16",
            "--format",
            "npy",
            "--quiet",
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert np.load(out / "cells" / "features_hr.npy", mmap_mode="r").dtype == np.float16


def test_demo_without_weights_runs_the_model_free_part(tmp_path):
    out = tmp_path / "demo"
    res = run_cli(["demo", "--out", out, "--steps", "2", "--quiet"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert "pretrained weights are not available" in res.stdout
    rep = json.loads((out / "report.json").read_text())
    assert "skipped" in rep["features"]
    psnr = rep["model_free"]["psnr_db"]
    assert set(psnr) == {"nearest", "bilinear", "bicubic", "gsjbu"}
    assert all(np.isfinite(v) for m in psnr.values() for v in m.values())
    assert (out / "model_free_dab.png").exists() and (out / "kernels.npz").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["run", "missing.png", "--out", "o"], "image file not found"),
        (["run", "IMG", "--out", "o", "--max-memory", "lots"], "--max-memory"),
        (["run", "IMG", "--out", "o", "--backbone", "resnet9000"], "backbone"),
        (["run", "IMG", "--out", "o", "--device", "tpu"], "device"),
        (["run", "IMG", "--out", "o", "--steps", "-3"], "--steps"),
        (["run", "IMG"], "required: --out"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_usage_exits_2_with_one_line(tmp_path, image_file, args, message):
    args = [str(image_file) if a == "IMG" else a for a in args]
    res = run_cli(args, tmp_path, timeout=300)
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert message in res.stderr
    assert "Traceback" not in res.stderr


def test_missing_weights_is_a_failure_not_usage(tmp_path, image_file):
    res = run_cli(["run", image_file, "--out", tmp_path / "o", "--quiet"], tmp_path, timeout=300)
    assert res.returncode == 1
    line = res.stderr.strip().splitlines()[-2]  # then "1 of 1 input(s) failed"
    assert line.index("--weights FILE") < line.index("Pretrained weights")  # what to do comes first
    assert "--random-weights" in line
    assert "Traceback" not in res.stderr


def test_help_explains_every_option(tmp_path):
    res = run_cli(["run", "--help"], tmp_path)
    assert res.returncode == 0
    for opt in [
        "--out",
        "--backbone",
        "--layer",
        "--steps",
        "--device",
        "--precision",
        "--max-memory",
        "--weights",
        "--pca-only",
        "--dtype",
        "--input-size",
        "--axes",
        "--scene",
        "--channels",
        "--planes",
        "--format",
        "--skip-existing",
    ]:
        assert opt in res.stdout
