"""Segment by example: classifier files with settings, training on many planes, ``segment`` end to end.

A tiny timm ViT (ViT-Ti/16) with random weights from a file these tests write stands in for
DINOv2/DINOv3 (no downloads here); its features are meaningless, so the tests check
bookkeeping and equality between the command (a new process) and the in-memory path, never
segmentation quality (that is benchmarks/bench_segmentation.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import timm
import torch

from napari_upsample_anything.core.feature_queries import ClassifierMismatchError, ScribbleClassifier
from napari_upsample_anything.pipeline import PipelineOptions
from napari_upsample_anything.segmentation import (
    feature_settings,
    options_from_classifier,
    segment_plane,
    stack_examples,
    train_from_examples,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*random weights.*:UserWarning")
CLI = [sys.executable, "-m", "napari_upsample_anything.cli"]
ARCH = "vit_tiny_patch16_224"
H, W = 40, 56  # 3 x 4 tokens of 16 px (non-square, not multiples of 16)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocesses run with OMP_NUM_THREADS=1 too: same reductions
    yield
    torch.set_num_threads(n)


def run_cli(args, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=600, env=env)


def scene(seed: int):
    """A bright disc on a dark noisy background (uint16) and its true labels (1 = background, 2 = disc)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:H, :W]
    cy, cx = 12 + 16 * rng.random(), 14 + 28 * rng.random()
    truth = np.where((yy - cy) ** 2 + (xx - cx) ** 2 < 11**2, 2, 1).astype(np.uint8)
    img = (np.where(truth == 2, 3000, 800) + rng.normal(0, 150, (H, W))).clip(0, 65535).astype(np.uint16)
    return img, truth


def strokes(truth: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.zeros_like(truth)
    for c in (1, 2):
        ys, xs = np.nonzero(truth == c)
        pick = rng.choice(len(ys), 12, replace=False)
        out[ys[pick], xs[pick]] = c
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("segment")
    with torch.device("meta"):
        m = timm.create_model(ARCH, pretrained=False, num_classes=0, dynamic_img_size=True)
    g = torch.Generator().manual_seed(0)
    state = {
        k: torch.ones(v.shape) if "norm" in k and k.endswith("weight") else 0.05 * torch.randn(v.shape, generator=g)
        for k, v in m.state_dict().items()
    }
    weights = root / "tiny.pth"
    torch.save(state, weights)
    options = PipelineOptions(backbone=ARCH, layer=(-1, -4), weights=str(weights), steps=3, device="cpu", precision="fp32")

    planes = [scene(s) for s in range(3)]
    stack = np.stack([p[0] for p in planes])
    scribbles = np.zeros(stack.shape, np.uint8)
    scribbles[0] = strokes(planes[0][1], 0)
    scribbles[2] = strokes(planes[2][1], 2)  # two planes of the stack have strokes, plane 1 none
    examples = stack_examples(stack, scribbles)
    assert len(examples) == 2
    clf = train_from_examples(examples, options, include_image=True, class_names={1: "background", 2: "cell"})
    clf_path = clf.save(root / "cells.npz")

    stack_path = root / "stack.ome.tif"
    tifffile.imwrite(
        stack_path, stack, ome=True, metadata={"axes": "ZYX", "PhysicalSizeZ": 2.0, "PhysicalSizeY": 0.5, "PhysicalSizeX": 0.25}
    )
    folder = root / "folder"
    folder.mkdir()
    singles = [scene(10 + k)[0] for k in range(2)]
    for k, img in enumerate(singles):
        tifffile.imwrite(folder / f"img{k}.tif", img)
    return dict(
        root=root, options=options, clf=clf, clf_path=clf_path, stack=stack, stack_path=stack_path, folder=folder, singles=singles
    )


def test_classifier_file_carries_its_settings_and_names(setup):
    clf = setup["clf"]
    assert clf.classes.tolist() == [1, 2] and clf.meta["examples"] == 2
    loaded = ScribbleClassifier.load(setup["clf_path"])
    assert loaded.class_names == {1: "background", 2: "cell"} and loaded.class_name(2) == "cell"
    s = loaded.settings
    assert s["backbone"] == "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    assert s["layers"] == [-1, -4] and s["input_size"] is None and s["channels"] is None
    assert s["include_image"] is True and s["route"] == "hr"
    assert s["feature_channels"] == 2 * 192  # two blocks of 192 channels
    assert s["fit"] == {"steps": 3, "guide_smoothing": 0.0, "fit_downsample": "bicubic", "fit_fraction": 1.0}
    assert s["weights"] == str(setup["options"].weights) and s["package_version"]
    assert loaded.n_features == 2 * 192 + 1  # + the gray image channel
    np.testing.assert_array_equal(loaded.samples, clf.samples)
    # No pickles in the file.
    with np.load(setup["clf_path"], allow_pickle=False) as data:
        assert all(data[k].dtype != object for k in data.files)
    # The options come back from the file.
    opts = options_from_classifier(loaded)
    assert (opts.backbone, opts.layer, opts.steps, opts.weights) == (ARCH, (-1, -4), 3, setup["options"].weights)


def test_mismatched_settings_are_refused(setup, tmp_path):
    clf = setup["clf"]
    img = setup["singles"][0]
    with pytest.raises(ClassifierMismatchError, match="backbone"):
        options_from_classifier(clf, backbone="dinov2_vits14")
    with pytest.raises(ClassifierMismatchError, match="layers"):
        options_from_classifier(clf, layer=-1)
    # Options the classifier was not trained with, given directly: refused before a model loads.
    other = PipelineOptions(backbone="dinov3_vits16", weights=setup["options"].weights, steps=3)
    with pytest.raises(ClassifierMismatchError, match="dinov3"):
        segment_plane(clf, img, other)
    with pytest.raises(ClassifierMismatchError, match="input_size"):
        ScribbleClassifier.load(setup["clf_path"], expect={**clf.settings, "input_size": 224})
    # Run-time options may differ.
    assert options_from_classifier(clf, device="cpu", max_memory="1GB").max_memory == "1GB"


def test_format_1_files_still_load(setup, tmp_path):
    clf = setup["clf"]
    old = tmp_path / "old.npz"
    meta = {
        "format": "napari-upsample-anything/scribble-classifier/1",
        "estimator": "sklearn.ensemble._forest:RandomForestClassifier",
        "params": clf.estimator.get_params(deep=False),
        "route": "hr",
        "include_image": True,
        "meta": {"upsampler": "kernels", "channels": 384, "seed": 0},
    }
    np.savez_compressed(old, samples=clf.samples, labels=clf.labels, classes=clf.classes, meta=np.array(json.dumps(meta)))
    loaded = ScribbleClassifier.load(old)
    assert loaded.settings == {} and loaded.class_names == {} and loaded.class_name(1) == "class 1"
    X = clf.samples[:50]
    np.testing.assert_array_equal(loaded.predict_proba(X), clf.predict_proba(X))


def test_training_needs_two_classes_over_all_examples(setup):
    img, truth = scene(0)
    only_one = np.where(strokes(truth, 0) == 1, 1, 0).astype(np.uint8)
    with pytest.raises(ValueError, match="at least two"):
        train_from_examples([(img, only_one)], setup["options"])
    with pytest.raises(ValueError, match="stack_examples"):
        train_from_examples([(img, only_one[:10])], setup["options"])


def test_segment_command_matches_in_memory_and_writes_ngff_labels(setup, tmp_path):
    out = tmp_path / "out"
    res = run_cli(
        ["segment", setup["folder"], setup["stack_path"], "--classifier", setup["clf_path"], "--out", out, "--probabilities"],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr
    import zarr

    clf = setup["clf"]
    opts = setup["options"]
    cases = [(out / "folder" / "img0", setup["singles"][0:1]), (out / "folder" / "img1", setup["singles"][1:2])]
    cases.append((out / "stack", list(setup["stack"])))
    n_classes_seen = set()
    for folder, planes in cases:
        root = zarr.open_group(str(folder / "labels.ome.zarr"), mode="r")
        got = np.asarray(root["0"][...])
        probs = np.asarray(zarr.open_group(str(folder / "probabilities.ome.zarr"), mode="r")["0"][...])
        if len(planes) == 1:
            got, probs = got[None], probs[:, None]
        else:
            probs = np.moveaxis(probs, 1, 0)  # czyx -> zcyx
        for k, plane in enumerate(planes):
            labels, p, _ = segment_plane(clf, plane, opts)  # the in-memory path, same classifier object
            np.testing.assert_array_equal(got[k], labels)
            np.testing.assert_allclose(probs[k] if len(planes) > 1 else probs[:, 0], p, rtol=0, atol=1e-6)
            n_classes_seen |= set(np.unique(labels).tolist())
        ome = root.attrs["ome"]
        label = ome["image-label"]
        assert label["properties"] == [{"label-value": 1, "class": "background"}, {"label-value": 2, "class": "cell"}]
        assert [c["label-value"] for c in label["colors"]] == [1, 2]
        report = json.loads((folder / "segment.json").read_text())
        assert report["classes"] == [1, 2] and len(report["planes"]) == len(planes)
    assert n_classes_seen == {1, 2}  # not a degenerate all-one-class output
    # Both stores are valid NGFF 0.5 for the ecosystem's validators (as run's and map's are).
    import ome_zarr_models
    import yaozarrs

    for folder, _ in cases:
        for store in ("labels.ome.zarr", "probabilities.ome.zarr"):
            yaozarrs.validate_zarr_store(str(folder / store))  # raises on any invalid field
            ome_zarr_models.open_ome_zarr(zarr.open_group(str(folder / store), mode="r"))
    stack_root = zarr.open_group(str(out / "stack" / "labels.ome.zarr"), mode="r")
    ms = stack_root.attrs["ome"]["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [2.0, 0.5, 0.25]

    # napari-ome-zarr opens it as a Labels layer with the image's pixel sizes.
    from napari_ome_zarr import napari_get_reader

    layers = napari_get_reader(str(out / "stack" / "labels.ome.zarr"))(str(out / "stack" / "labels.ome.zarr"))
    data, kwargs, kind = layers[0]
    assert kind == "labels"
    assert list(kwargs["scale"]) == [2.0, 0.5, 0.25]

    # --skip-existing leaves complete outputs alone.
    from napari_upsample_anything.cli import main

    stamp = (out / "stack" / "segment.json").stat().st_mtime_ns
    argv = ["segment", str(setup["stack_path"]), "--classifier", str(setup["clf_path"]), "--out", str(out)]
    assert main(argv + ["--skip-existing", "--quiet"]) == 0
    assert (out / "stack" / "segment.json").stat().st_mtime_ns == stamp


def test_segment_command_refuses_a_mismatched_classifier(setup, tmp_path, capsys):
    from napari_upsample_anything.cli import main

    # In this process: the new-process path is test_segment_command_matches_in_memory_and_writes_ngff_labels.
    argv = ["segment", str(setup["folder"]), "--classifier", str(setup["clf_path"]), "--out", str(tmp_path / "o")]
    assert main(argv + ["--backbone", "dinov2_vits14"]) == 2
    err = capsys.readouterr().err
    assert "other feature settings" in err and "dinov2" in err
    assert not (tmp_path / "o").exists()  # refused before anything was written
    # A classifier file whose recorded backbone is another architecture than its weights file.
    clf = ScribbleClassifier.load(setup["clf_path"])
    clf.settings = {**clf.settings, "backbone": "vit_small_patch14_dinov2.lvd142m", "backbone_name": "dinov2_vits14"}
    bad = clf.save(tmp_path / "bad.npz")
    argv = ["segment", str(setup["folder"]), "--classifier", str(bad), "--out", str(tmp_path / "o2"), "--quiet"]
    assert main(argv) == 2
    assert "does not match the architecture" in capsys.readouterr().err
    assert list((tmp_path / "o2").iterdir()) == []  # failed inputs leave no folder behind


def test_layer_flag_takes_several_blocks():
    from napari_upsample_anything.cli import build_parser

    # "--layer=-1,-4" (with "="): argparse reads a separate "-1,-4" as an option name.
    args = build_parser().parse_args(["run", "x.tif", "--out", "o", "--layer=-1,-4"])
    assert args.layer == (-1, -4)
    assert build_parser().parse_args(["run", "x.tif", "--out", "o", "--layer", "3"]).layer == 3
    assert PipelineOptions(layer=(-1, -4)).validate().layer == (-1, -4)
    with pytest.raises(ValueError, match="distinct"):
        PipelineOptions(layer=(-1, -1)).validate()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "x.tif", "--out", "o", "--layer", "a,b"])
    assert feature_settings(PipelineOptions(layer=(-1, -4)))["layers"] == [-1, -4]


def test_run_command_concatenates_several_blocks(setup, tmp_path):
    from napari_upsample_anything.cli import main

    img = setup["folder"] / "img0.tif"
    args = ["run", img, "--out", tmp_path, "--backbone", ARCH, "--weights", setup["options"].weights]
    args += ["--layer=-1,-4", "--steps", "2", "--pca-only", "--quiet", "--device", "cpu"]
    assert main([str(a) for a in args]) == 0
    report = json.loads((tmp_path / "img0" / "report.json").read_text())
    assert report["channels"] == 2 * 192


def test_segment_usage_errors_exit_2_before_any_work(setup, tmp_path, capsys):
    from napari_upsample_anything.cli import main

    clf = str(setup["clf_path"])
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (
            ["segment", str(setup["folder"]), "--classifier", str(tmp_path / "none.npz"), "--out", str(tmp_path / "o")],
            "not found",
        ),
        (["segment", str(tmp_path / "nope.tif"), "--classifier", clf, "--out", str(tmp_path / "o")], "not found"),
        (["segment", str(empty), "--classifier", clf, "--out", str(tmp_path / "o")], "no image file"),
        (["segment", str(setup["folder"]), "--classifier", clf, "--out", str(tmp_path / "o"), "--planes", "q=1"], "planes"),
        (["segment", str(setup["folder"]), "--classifier", clf, "--out", str(tmp_path / "o"), "--layer=-1"], "layers"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    # A classifier that does not record its features needs them on the command line.
    bare = ScribbleClassifier.load(setup["clf_path"])
    bare.settings = {}
    path = bare.save(tmp_path / "bare.npz")
    assert main(["segment", str(setup["folder"]), "--classifier", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "--backbone" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_folder_of_images_with_annotations_gives_examples(setup, tmp_path):
    from napari_upsample_anything.annotations import save_labels
    from napari_upsample_anything.segmentation import folder_examples

    img, truth = scene(20)
    tifffile.imwrite(tmp_path / "a.tif", img)
    save_labels(tmp_path / "a_labels.tif", strokes(truth, 1), class_names={1: "background", 2: "cell"})
    scr = np.zeros(setup["stack"].shape, np.uint8)
    scr[1] = strokes(scene(1)[1], 3)
    tifffile.imwrite(tmp_path / "s.ome.tif", setup["stack"], ome=True, metadata={"axes": "ZYX"})
    save_labels(tmp_path / "s_labels.ome.zarr", scr, axes="zyx")
    tifffile.imwrite(tmp_path / "unannotated.tif", img)
    pairs = folder_examples(tmp_path)
    assert len(pairs) == 2  # a.tif, and plane 1 of the stack (the others have no strokes)
    np.testing.assert_array_equal(pairs[0][0], img)
    np.testing.assert_array_equal(pairs[1][0], setup["stack"][1])
    np.testing.assert_array_equal(pairs[1][1], scr[1])
    with pytest.raises(ValueError, match="no image with an annotation"):
        folder_examples(setup["folder"])


def test_segment_time_lapse_with_planes_selection(setup, tmp_path):
    """A (T, Z, Y, X) .npy with --axes tzyx and --planes t=1: only that time point is segmented,
    into its own region; the others stay 0 (unlabelled)."""
    from napari_upsample_anything.cli import main

    stack = setup["stack"]
    tl = np.stack([stack[:2], stack[1:]])  # (2, 2, H, W)
    np.save(tmp_path / "tl.npy", tl)
    out = tmp_path / "out"
    argv = ["segment", str(tmp_path / "tl.npy"), "--axes", "tzyx", "--planes", "t=1", "--route", "lr"]
    assert main(argv + ["--classifier", str(setup["clf_path"]), "--out", str(out), "--quiet"]) == 0
    import zarr

    root = zarr.open_group(str(out / "tl" / "labels.ome.zarr"), mode="r")
    got = np.asarray(root["0"][...])
    assert got.shape == (2, 2, H, W)
    assert [a["name"] for a in root.attrs["ome"]["multiscales"][0]["axes"]] == ["t", "z", "y", "x"]
    assert not got[0].any()
    for z in range(2):
        labels, _, _ = segment_plane(setup["clf"], tl[1, z], setup["options"], route="lr")
        np.testing.assert_array_equal(got[1, z], labels)
