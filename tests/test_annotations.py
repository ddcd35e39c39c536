"""Labels in and out (annotations.py): OME-Zarr image-label and TIFF, with class names and pixel sizes."""

from __future__ import annotations

import numpy as np
import pytest

from napari_upsample_anything.annotations import (
    label_colors,
    labels_dtype,
    labels_layer_kwargs,
    load_labels,
    save_labels,
)


def scribbles() -> np.ndarray:
    a = np.zeros((3, 20, 30), np.uint16)
    a[0, 2:5, 3:20] = 1
    a[2, 10:12, 4:28] = 2
    a[1, 15, 15] = 7
    return a


@pytest.mark.parametrize("suffix", [".ome.zarr", ".tif"])
def test_round_trip_keeps_values_names_colours_and_scale(tmp_path, suffix):
    a = scribbles()
    names = {1: "nucleus", 2: "cytoplasm", 7: "debris"}
    path = save_labels(
        tmp_path / f"scr{suffix}",
        a,
        axes="zyx",
        class_names=names,
        pixel_sizes={"z": 2.0, "y": 0.5, "x": 0.25},
        unit="micrometer",
    )
    assert path.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    back, info = load_labels(path)
    np.testing.assert_array_equal(back, a)
    assert back.dtype == np.uint8  # the smallest dtype holding 0..7
    assert info["class_names"] == names and info["axes"] == "zyx"
    assert info["scale"] == [2.0, 0.5, 0.25] and info["unit"] == "micrometer"
    expect = label_colors([1, 2, 7])
    for v in (1, 2, 7):
        assert np.allclose(info["colors"][v], expect[v], atol=1 / 255)
    kw = labels_layer_kwargs(info, "scribbles")
    assert kw["scale"] == [2.0, 0.5, 0.25]
    assert kw["features"] == {"index": [0, 1, 2, 7], "class": ["unlabelled", "nucleus", "cytoplasm", "debris"]}


def test_unnamed_classes_and_plain_tiffs(tmp_path):
    a = scribbles()[0]
    path = save_labels(tmp_path / "s.ome.zarr", a)
    _, info = load_labels(path)
    assert info["class_names"] == {1: "class 1"} and info["axes"] == "yx"
    import tifffile

    tifffile.imwrite(tmp_path / "plain.tif", a)
    back, info = load_labels(tmp_path / "plain.tif")
    np.testing.assert_array_equal(back, a)
    assert info["class_names"] == {} and info["scale"] == [1.0, 1.0]


def test_labels_open_in_napari_as_labels(tmp_path):
    from napari_ome_zarr import napari_get_reader

    path = save_labels(tmp_path / "seg.ome.zarr", scribbles(), axes="zyx", pixel_sizes={"z": 3.0, "y": 0.5, "x": 0.5})
    data, kwargs, kind = napari_get_reader(str(path))(str(path))[0]
    assert kind == "labels" and list(kwargs["scale"]) == [3.0, 0.5, 0.5]
    np.testing.assert_array_equal(np.asarray(data[0] if isinstance(data, list) else data), scribbles())


def test_bad_labels_are_refused(tmp_path):
    with pytest.raises(TypeError, match="integer"):
        save_labels(tmp_path / "x.ome.zarr", np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="negative"):
        save_labels(tmp_path / "x.ome.zarr", -np.ones((4, 4), np.int16))
    with pytest.raises(ValueError, match="tif"):
        save_labels(tmp_path / "x.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="axes"):
        save_labels(tmp_path / "x.ome.zarr", np.zeros((4, 4), np.uint8), axes="zyx")
    assert labels_dtype([1, 300]) == np.uint16
    with pytest.raises(FileNotFoundError):
        load_labels(tmp_path / "missing.tif")


@pytest.mark.gui
def test_label_image_opens_as_labels_through_the_plugin_reader(make_napari_viewer, tmp_path):
    """segment's kind of labels.ome.zarr through this plugin's reader: a Labels layer with its scale and
    class names (napari's built-in *.zarr reader, first without plugin=, shows an Image)."""
    a = scribbles()
    folder = tmp_path / "img0"
    folder.mkdir()
    path = save_labels(
        folder / "labels.ome.zarr", a, axes="zyx", class_names={1: "nucleus", 2: "cytoplasm", 7: "debris"},
        pixel_sizes={"z": 2.0, "y": 0.5, "x": 0.25},
    )  # fmt: skip
    viewer = make_napari_viewer()
    layers = viewer.open(str(path), plugin="napari-upsample-anything")
    assert len(layers) == 1
    layer = layers[0]
    assert type(layer).__name__ == "Labels" and layer.name == "img0 labels"
    np.testing.assert_array_equal(np.asarray(layer.data), a)
    assert list(layer.scale) == [2.0, 0.5, 0.25]
    assert dict(zip(layer.features["index"], layer.features["class"]))[7] == "debris"
