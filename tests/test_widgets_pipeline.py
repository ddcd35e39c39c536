"""The plugin's Qt-free parts: layer frames and alignment, the pipeline, the thread bridge,
the manifest, sample data, and import hygiene (no torch until a widget computes)."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import rel_err

from napari_upsample_anything.core.errors import Cancelled
from napari_upsample_anything.widgets._frame import Frame, SelectionError
from napari_upsample_anything.widgets._pipeline import (
    RunConfig,
    RunHandle,
    UpsampleRequest,
    argmax_labels,
    guarded,
    iter_events,
    one_hot,
    run_pipeline,
    upsample_planes,
)

ROOT = Path(__file__).resolve().parents[1]


class Image:
    """Stand-in for napari.layers.Image (the frame only reads these attributes)."""

    def __init__(self, data, name="src", rgb=False, scale=None, translate=None):
        self.data = data
        self.name = name
        self.rgb = rgb
        nd = data.ndim - (1 if rgb else 0)
        self.scale = tuple(scale or (1.0,) * nd)
        self.translate = tuple(translate or (0.0,) * nd)
        self.multiscale = False


class Labels(Image):
    pass


def _world(scale, translate, data_coords):
    return np.asarray(translate) + np.asarray(scale) * np.asarray(data_coords)


# ---------------------------------------------------------------------------------- frame
def test_lr_transform_puts_cell_centres_on_hr_cell_centres():
    layer = Image(np.zeros((100, 73)), scale=(0.7, 1.3), translate=(5.0, -2.0))
    frame = Frame.from_layer(layer)
    h, w = 7, 5
    f = (100 / h, 73 / w)  # not integers
    hr = frame.transform()
    lr = frame.transform(f)
    assert np.allclose(hr["scale"], layer.scale) and np.allclose(hr["translate"], layer.translate)
    for i, j in [(0, 0), (6, 4), (3, 2)]:
        centre_hr = ((i + 0.5) * f[0] - 0.5, (j + 0.5) * f[1] - 0.5)
        assert np.allclose(_world(lr["scale"], lr["translate"], (i, j)), _world(hr["scale"], hr["translate"], centre_hr))
    # The LR grid's outer edges coincide with the image's outer pixel edges.
    assert np.allclose(_world(lr["scale"], lr["translate"], (-0.5, -0.5)), _world(layer.scale, layer.translate, (-0.5, -0.5)))
    assert np.allclose(
        _world(lr["scale"], lr["translate"], (h - 0.5, w - 0.5)), _world(layer.scale, layer.translate, (99.5, 72.5))
    )


def test_stack_frames_current_and_all():
    data = np.arange(2 * 3 * 20 * 30, dtype=np.float32).reshape(2, 3, 20, 30)  # (t, z, y, x)
    layer = Image(data, scale=(1.0, 2.0, 0.5, 0.5), translate=(0.0, 10.0, 0.0, 0.0))
    world = _world(layer.scale, layer.translate, (1, 2, 5, 5))
    cur = Frame.from_layer(layer, mode="current", current=world)
    assert cur.indices == ((1, 2),) and cur.slice_axes == (0, 1)
    assert cur.leading_shape() == (1, 1)
    t = cur.transform()
    assert np.allclose(t["translate"][:2], (1.0, 10.0 + 2 * 2.0)) and np.allclose(t["scale"][:2], (1.0, 2.0))
    assert np.array_equal(cur.plane(data, (1, 2)), data[1, 2])
    allf = Frame.from_layer(layer, mode="all")
    assert len(allf.indices) == 6 and allf.leading_shape() == (2, 3)
    stacked = allf.stack([np.full((20, 30), k, np.float32) for k in range(6)])
    assert stacked.shape == (2, 3, 20, 30) and stacked[1, 2, 0, 0] == 5
    assert np.allclose(allf.transform()["translate"], layer.translate)
    # Placing one plane of an "all" result (the pixel-weights layer does this).
    at = allf.transform(at=(0, 1))
    assert np.allclose(at["translate"][:2], (0.0, 12.0))
    idx, y, x, inside = allf.pixel_at(_world(layer.scale, layer.translate, (1, 1, 19, 3)))
    assert (idx, y, x, inside) == ((1, 1), 19, 3, True)
    assert not allf.pixel_at(_world(layer.scale, layer.translate, (0, 0, 25, 3)))[3]


def test_channel_axis_is_stretched_over_all_channels():
    data = np.zeros((4, 5, 16, 16), np.uint16)  # (c, z, y, x)
    layer = Image(data, scale=(1.0, 3.0, 1.0, 1.0))
    frame = Frame.from_layer(layer, channel_axis=0, mode="all")
    assert frame.slice_axes == (1,) and frame.n_channels == 4 and frame.leading_shape() == (1, 5)
    t = frame.transform()
    # napari maps world c to data round((c - translate) / scale): 0 for every channel 0..3.
    for c in range(4):
        assert np.rint((c - t["translate"][0]) / t["scale"][0]) == 0
    plane = frame.plane(np.arange(data.size).reshape(data.shape), (2,))
    assert plane.shape == (16, 16, 4) and frame.feature_channel_axis == -1
    with pytest.raises(SelectionError, match="leading axis"):
        Frame.from_layer(layer, channel_axis=3)


def test_frame_refuses_labels_and_rgb_channel_axis():
    with pytest.raises(SelectionError, match="Labels layer.*Image layer"):
        Frame.from_layer(Labels(np.zeros((20, 20), np.int32)))
    rgb = Image(np.zeros((20, 20, 3), np.uint8), rgb=True)
    f = Frame.from_layer(rgb)
    assert f.shape == (20, 20) and f.plane(rgb.data, ()).shape == (20, 20, 3)
    with pytest.raises(SelectionError, match="RGB"):
        Frame.from_layer(Image(np.zeros((2, 20, 20, 3), np.uint8), rgb=True), channel_axis=0)


def test_outlines_are_clipped_to_the_image():
    from napari_upsample_anything.widgets._kernels import clip_points, clip_segments

    vec = np.array(
        [
            [[5.0, 5.0], [1.0, 1.0]],  # inside: unchanged
            [[-10.0, 5.0], [-3.0, 0.0]],  # outside: dropped
            [[1.0, 1.0], [-4.0, 0.0]],  # leaves the image: end clamped to y = -0.5
        ]
    )
    out, keep = clip_segments(vec, (20, 30))
    assert keep.tolist() == [True, False, True]
    assert np.allclose(out[0], vec[0]) and np.allclose(out[1, 0] + out[1, 1], [-0.5, 1.0])
    assert np.allclose(clip_points(np.array([[-3.0, 40.0]]), (20, 30)), [[-0.5, 29.5]])


# ---------------------------------------------------------------------------------- labels
def test_one_hot_and_argmax_round_trip():
    lab = np.array([[0, 5, 5], [17, 0, 17]], np.int32)
    oh, classes = one_hot(lab)
    assert oh.shape == (3, 2, 3) and list(classes) == [0, 5, 17]
    assert np.array_equal(oh.sum(0), np.ones((2, 3)))
    back = argmax_labels(oh, classes, lab.dtype)
    assert np.array_equal(back, lab) and back.dtype == np.int32
    with pytest.raises(ValueError, match="classes"):
        one_hot(np.arange(300).reshape(15, 20))


# ---------------------------------------------------------------------------------- bridge
def _counting(n, *, progress=None, cancel=None, fail_at=None, delay=0.0, log=None):
    """A fake workload of ``n`` steps (each ``delay`` s of pretend work); ``log`` records, per event
    emitted, whether the cancel flag was set by then."""
    from napari_upsample_anything.core.progress import check_cancel
    from napari_upsample_anything.widgets._pipeline import Progress

    for k in range(n):
        check_cancel(cancel, "counting")
        if fail_at == k:
            raise RuntimeError("boom")  # a RuntimeError, as napari's GeneratorWorker would swallow
        time.sleep(delay)  # the step's work (it orders nothing)
        if log is not None:
            log.append(bool(cancel and cancel()))
        progress(Progress("fit", k + 1, n))
    return "result"


def test_guarded_yields_every_event_and_returns_an_outcome():
    gen = guarded(_counting, RunHandle(), 5)
    events = []
    try:
        while True:
            events.append(next(gen))
    except StopIteration as stop:
        outcome = stop.value
    assert [e.done for e in events] == [1, 2, 3, 4, 5]
    assert outcome.status == "done" and outcome.value == "result"


def test_guarded_turns_errors_and_cancel_into_outcomes():
    gen = guarded(_counting, RunHandle(), 5, fail_at=2)
    with pytest.raises(StopIteration) as stop:
        while True:
            next(gen)
    assert stop.value.value.status == "error" and str(stop.value.value.error) == "boom"

    handle = RunHandle()
    log = []
    gen = guarded(_counting, handle, 10_000, delay=0.001, log=log)
    seen = 0
    with pytest.raises(StopIteration) as stop:
        while True:
            next(gen)
            seen += 1
            if seen == 3:
                handle.cancel()
    assert stop.value.value.status == "cancelled" and seen == len(log) < 10_000
    # the workload stopped at its next check: at most the step in flight reported after the cancel
    assert sum(log) <= 1, f"{sum(log)} steps reported after the cancel"


def test_closing_the_generator_cancels_and_joins():
    handle = RunHandle()
    gen = iter_events(_counting, handle, 10_000, delay=0.001)
    next(gen)
    gen.close()
    assert handle.cancelled and not handle.thread.is_alive()


def test_shutdown_before_the_compute_thread_starts():
    """A widget closed right after Run (CI: "cannot join thread before it is started")."""
    calls = []
    handle = RunHandle()
    handle.cancel()
    assert handle.join(1.0)  # nothing started: nothing to wait for
    gen = guarded(lambda **kw: calls.append(1), handle)
    with pytest.raises(StopIteration) as stop:
        next(gen)
    assert stop.value.value.status == "cancelled" and calls == [] and handle.thread is None


def test_join_racing_start_never_sees_an_unstarted_thread():
    errors = []
    for _ in range(200):
        handle = RunHandle()
        gen = iter_events(_counting, handle, 1)

        def close():
            handle.cancel()
            try:
                handle.join(5.0)
            except RuntimeError as exc:  # pragma: no cover - the bug this guards against
                errors.append(exc)

        closer = threading.Thread(target=close)
        closer.start()
        try:
            list(gen)
        except Cancelled:
            pass
        closer.join()
        assert handle.thread is None or not handle.thread.is_alive()
    assert errors == []


def test_fit_estimate_scales_with_the_fit_fraction():
    from napari_upsample_anything.widgets._estimate import Rates, estimate_fit, estimate_run

    rates = Rates(2e-8, 0.5, 0.0, 0.0, 1e9, 0.0, 0.0, 0.0)  # 20 ns per pixel and step, 0.5 s fixed
    assert estimate_fit(rates, (1000, 1000), 51) == pytest.approx(0.5 + 0.02 * 51)
    quarter = estimate_fit(rates, (1000, 1000), 51, fit_fraction=0.25)
    assert quarter == pytest.approx(0.5 + 0.02 * 51 * 0.25)
    assert estimate_run(rates, (1000, 1000), steps=51, fit_fraction=0.25).seconds["fit"] == pytest.approx(quarter)


def _rates(**kw):
    from napari_upsample_anything.widgets._estimate import Rates

    base = dict(
        fit_step_per_px=2e-8,
        fit_fixed=0.5,
        render_per_px=1e-7,
        render_per_px_channel=1e-9,
        flops=1e10,
        fit_planned_per_px=400.0,
        render_planned_per_px_channel=8.0,
        measured_in=1.0,
        fit_resident_per_px=40.0,
        fit_tile_per_px=20.0,
        render_resident=1e6,
        render_tile_per_px=30.0,
        render_tile_per_px_channel=2.0,
        render_planned_per_px=100.0,
    )
    return Rates(**{**base, **kw})


def test_memory_map_labels_never_overlap():
    from napari_upsample_anything.widgets._memory import label_positions

    def rect(i0, i1, j0, j1, lead=()):
        return np.array([list(lead) + [y, x] for y, x in ((i0, j0), (i0, j1), (i1, j1), (i1, j0))], float)

    # two tiles sharing (almost) a centre, e.g. a render tile and its halo: only the larger is labelled
    rects = [rect(0, 8, 0, 8), rect(0.5, 7.5, 0.5, 7.5), rect(0, 8, 8, 16), rect(0, 8, 8, 16, lead=(1,))]
    keep = label_positions(rects, np.array([100.0, 120.0, 50.0, 50.0]))
    assert keep.tolist() == [False, True, True, True]  # the other plane's tile is elsewhere: labelled too
    centres = [r[:, -2:].mean(0) for r, k in zip(rects[:3], keep[:3]) if k]
    assert np.abs(centres[0] - centres[1]).max() >= 2


def test_estimate_arithmetic_from_given_rates():
    """Each stage's seconds and the memory, computed by hand from recorded rates (no clock involved)."""
    from napari_upsample_anything.widgets._estimate import estimate_run, format_seconds, lr_grid

    rates = _rates()
    H, W = 980, 700
    px = H * W
    h, w = lr_grid((H, W), None)
    assert (h, w) == (70, 50)
    est = estimate_run(rates, (H, W), backbone="dinov2_vits14", steps=50, hr_features="memory")
    C, N = 384, h * w
    # ViT-S: the matrix products (2 x 22e6 parameters per token) and 12 blocks of attention (4 N^2 x width)
    assert est.seconds["features"] == pytest.approx((2 * 22e6 * N + 12 * 4 * N * N * C) / 1e10)
    assert est.seconds["fit"] == pytest.approx(0.5 + 2e-8 * px * 50)
    assert est.seconds["pca"] == pytest.approx(px * (1e-7 + 3 * 1e-9))
    assert est.seconds["render"] == pytest.approx(px * (1e-7 + C * 1e-9))
    assert est.total_seconds == pytest.approx(sum(est.seconds.values()))
    # memory: the fit keeps 40 B/px and its one tile (the whole image) allocates 20 B/px; the
    # 384-channel render keeps 1 MB and allocates 30 + 2 C B/px: the larger of the two
    assert est.working_bytes == int(max(60.0 * px, 1e6 + (30 + 2 * C) * px))
    # what a render keeps grows with its channels when the rates say so (chunk buffers of values
    # and products): 1 MB + 5 kB per channel
    per_channel = estimate_run(_rates(render_resident_per_channel=5e3), (H, W), steps=50, hr_features="memory")
    assert per_channel.working_bytes == int(max(60.0 * px, 1e6 + 5e3 * C + (30 + 2 * C) * px))
    kept = 4 * 3 * px + 4 * C * h * w + 4 * 3 * px  # guide, LR features, HR PCA
    assert est.kept_bytes == int(kept + 4 * C * px) and est.disk_bytes == 0
    assert est.text().startswith(f"about {format_seconds(est.total_seconds)}") and "busy" not in est.text()

    # a stack: every plane costs the same again; a budget caps the working memory
    stack = estimate_run(rates, (H, W), n_planes=5, steps=50, hr_features="memory", budget_bytes=2**28)
    for stage, seconds in est.seconds.items():
        assert stack.seconds[stage] == pytest.approx(5 * seconds)
    # with a 256 MiB budget, tiles hold as many pixels as the planner's bytes allow
    # (fit 400 B/px, render 100 + 8 C B/px planned), the pixels' allocations are counted
    fit_tile, render_tile = min(px, 2**28 / 400), min(px, 2**28 / (100 + 8 * C))
    assert render_tile < fit_tile < px
    assert stack.working_bytes == int(max(40 * px + 20 * fit_tile, 1e6 + (30 + 2 * C) * render_tile))
    # a budget smaller than what the fit would keep: at most half of it is kept
    tight = estimate_run(rates, (H, W), steps=50, hr_features="none", budget_bytes=2**24)
    assert tight.working_bytes == int(min(2**23 + 20 * 2**24 / 400, 2**24))
    # HR features memory-mapped: on disk, not in memory; not computed: no render stage
    mapped = estimate_run(rates, (H, W), steps=50, hr_features="memmap")
    assert mapped.disk_bytes == 4 * C * px and mapped.kept_bytes == int(kept)
    off = estimate_run(rates, (H, W), steps=50, hr_features="none")
    assert off.seconds["render"] == 0 and off.disk_bytes == 0 and off.kept_bytes == int(kept)
    assert off.working_bytes == int(max(60.0 * px, 1e6 + (30 + 2 * 3) * px))  # only the 3-channel PCA is rendered
    # a bigger backbone: its parameters and channel count
    base = estimate_run(rates, (H, W), backbone="dinov2_vitb14", steps=50, hr_features="memory")
    assert base.seconds["features"] == pytest.approx((2 * 86e6 * N + 12 * 4 * N * N * 768) / 1e10)
    assert base.seconds["render"] == pytest.approx(px * (1e-7 + 768 * 1e-9))
    # the input size sets the token grid
    small = estimate_run(rates, (H, W), input_size=490, steps=50)
    n = 35 * 25
    assert small.seconds["features"] == pytest.approx((2 * 22e6 * n + 12 * 4 * n * n * C) / 1e10)

    # the engine's tile cap: the working set stops growing there (the fit's and the render's alike)
    # (a tile's planned bytes stop at the cap; what the fit keeps does not)
    capped = estimate_run(_rates(tile_cap_bytes=2**27), (H, W), steps=50, hr_features="memory")
    render_tile = 2**27 / (100 + 8 * C)
    assert capped.working_bytes == int(max(40 * px + 20 * 2**27 / 400, 1e6 + (30 + 2 * C) * render_tile))
    assert capped.kept_bytes == est.kept_bytes
    tiny = estimate_run(_rates(tile_cap_bytes=2**27), (50, 50), steps=50)
    assert tiny.working_bytes == int(1e6 + (30 + 2 * C) * 2500)

    # a busy machine: CPU-second rates times the measured slowdown, and the text says so
    busy = estimate_run(_rates(slowdown=2.5), (H, W), steps=50, hr_features="memory")
    for stage, seconds in est.seconds.items():
        assert busy.seconds[stage] == pytest.approx(2.5 * seconds)
    assert "the machine is busy: x2.5" in busy.text() and busy.working_bytes == est.working_bytes

    # a block's fixed cost: per block of the backbone (12 for ViT-S, 24 for ViT-L), per plane
    for backbone, depth in (("dinov2_vits14", 12), ("dinov2_vitl14", 24)):
        for n_planes in (1, 3):
            fixed = estimate_run(_rates(block_fixed=0.002), (H, W), n_planes=n_planes, backbone=backbone, steps=50)
            plain = estimate_run(rates, (H, W), n_planes=n_planes, backbone=backbone, steps=50)
            assert fixed.seconds["features"] == pytest.approx(plain.seconds["features"] + 0.002 * depth * n_planes)

    # the PCA basis: once per run (a C x C eigendecomposition), growing as C^3, whatever the planes
    pca = _rates(pca_basis=0.3)
    for n_planes, backbone, width in ((1, "dinov2_vits14", 384), (5, "dinov2_vits14", 384), (1, "dinov2_vitb14", 768)):
        with_basis = estimate_run(pca, (H, W), n_planes=n_planes, backbone=backbone, steps=50)
        without = estimate_run(rates, (H, W), n_planes=n_planes, backbone=backbone, steps=50)
        assert with_basis.seconds["pca"] == pytest.approx(without.seconds["pca"] + 0.3 * (width / 384) ** 3)


# ---------------------------------------------------------------------------------- pipeline
def _img(h, w, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.sin(yy / 5.0) + np.cos(xx / 7.0)
    return np.stack([base, base.T[:h, :w] if h == w else base, rng.random((h, w))], -1).astype(np.float32) / 3 + 0.3


@pytest.mark.filterwarnings("ignore:.*random weights:UserWarning")
def test_run_pipeline_two_planes_shared_basis_and_cancel():
    events = []
    cfg = RunConfig(steps=2, pretrained=False, device="cpu", hr_features="none")
    res = run_pipeline([((0,), _img(42, 56, 0)), ((1,), _img(42, 56, 1))], cfg, progress=events.append)
    assert [p.index for p in res.planes] == [(0,), (1,)]
    assert all(p.hr_features is None and p.hr_rgb.shape == (42, 56, 3) for p in res.planes)
    assert res.weights_source == "random-init" and res.basis.n_components == 3
    assert [e.done for e in events if e.stage == "fit" and e.plane == 1] == [1, 2]
    assert {e.stage for e in events} == {"features", "fit", "pca"}
    assert all(len(p.memlog.tiles) > 0 for p in res.planes)

    # cancel() is polled before every step: a cancel during step 3 stops before step 4.
    calls = []

    def cancel():
        return len([e for e in calls if e.stage == "fit"]) >= 3

    with pytest.raises(Cancelled):
        run_pipeline(
            [((), _img(42, 42))], RunConfig(steps=500, pretrained=False, device="cpu"), progress=calls.append, cancel=cancel
        )
    assert max(e.done for e in calls if e.stage == "fit") == 3


@pytest.mark.filterwarnings("ignore:.*random weights:UserWarning")
def test_upsample_planes_labels_and_values():
    res = run_pipeline([((), _img(42, 42))], RunConfig(steps=1, pretrained=False, device="cpu", hr_features="none"))
    plane = res.planes[0]
    lab = np.zeros((3, 3), np.int16)
    lab[1:, 1:] = 4
    (out,) = upsample_planes(UpsampleRequest([lab], [plane], labels=True, device="cpu"))
    assert out["labels"].shape == (42, 42) and out["labels"].dtype == np.int16
    assert set(np.unique(out["labels"])) <= {0, 4} and np.allclose(out["probabilities"].sum(0), 1, atol=1e-5)
    (vals,) = upsample_planes(UpsampleRequest([np.ones((2, 3, 3), np.float32)], [plane], device="cpu"))
    assert np.allclose(vals["values"], 1.0, atol=1e-6)


@pytest.mark.filterwarnings("ignore:.*random weights:UserWarning")
def test_fit_options_reach_the_fit_the_render_and_refits():
    import napari_upsample_anything as upa

    cfg = RunConfig(
        steps=1,
        pretrained=False,
        device="cpu",
        hr_features="memory",
        guide_smoothing=2.0,
        fit_downsample="area",
        fit_fraction=0.5,
    )
    plane = run_pipeline([((), _img(42, 42))], cfg).planes[0]
    assert plane.field.meta["guide_smoothing"] == 2.0 and plane.field.meta["downsample"] == "area"
    assert plane.field.meta["fit_fraction"] == 0.5
    expected = upa.render(plane.features, plane.guide, plane.field, guide_smoothing=2.0, device="cpu")
    assert rel_err(plane.hr_features, expected) < 1e-5
    # the kernel inspector's per-pixel weights use the same smoothed guide
    from napari_upsample_anything.widgets._kernels import (
        clear_engine_cache,
        pixel_weights,
    )

    clear_engine_cache()
    w = pixel_weights(plane, 20, 17)
    assert rel_err((plane.features * w).sum((1, 2)), plane.hr_features[:, 20, 17]) < 1e-4
    # a map on another grid refits the kernels with the image's options
    (vals,) = upsample_planes(UpsampleRequest([np.random.default_rng(0).random((2, 2), np.float32)], [plane], device="cpu"))
    refit = plane.extra_fields[(2, 2)]
    assert refit.meta["guide_smoothing"] == 2.0 and refit.meta["downsample"] == "area" and refit.meta["fit_fraction"] == 0.5
    for bad, match in (
        ({"guide_smoothing": -1.0}, "guide_smoothing"),
        ({"fit_downsample": "nearest"}, "fit_downsample"),
        ({"fit_fraction": 0.0}, "fit_fraction"),
    ):
        with pytest.raises(ValueError, match=match):
            RunConfig(**bad).validate()


# ---------------------------------------------------------------------------------- manifest
def test_manifest_validates_and_is_packaged():
    import importlib.resources

    from npe2 import PluginManifest

    mf = PluginManifest.from_file(ROOT / "napari.yaml")
    assert mf.name == "napari-upsample-anything"
    assert {w.display_name for w in mf.contributions.widgets} == {
        "Upsample Anything",
        "Kernel inspector",
        "Memory monitor",
        "Upsample a layer with fitted kernels",
        "Feature explorer",
    }
    assert {s.key for s in mf.contributions.sample_data} == {"histology", "cells", "retina"}
    (reader,) = mf.contributions.readers  # our OME-Zarr results, opened lazily
    assert reader.command == "napari-upsample-anything.get_reader"
    assert reader.filename_patterns == ["*.ome.zarr"] and reader.accepts_directories
    commands = {c.id for c in mf.contributions.commands}
    for items in mf.contributions.menus.values():
        assert all(i.command in commands for i in items)
    # The installed distribution exposes the same file through its entry point.
    installed = PluginManifest.from_distribution("napari-upsample-anything")
    assert installed.contributions.widgets == mf.contributions.widgets
    packaged = importlib.resources.files("napari_upsample_anything") / "napari.yaml"
    assert packaged.read_text() == (ROOT / "napari.yaml").read_text()
    # Every python_name resolves (imports the widget modules: still no torch, see below).
    mf.validate_imports()


def test_sample_data():
    from napari_upsample_anything.widgets import _sample_data as sd

    ((data, meta, kind),) = sd.histology()
    assert data.shape == (512, 512, 3) and meta["rgb"] and kind == "image"
    ((data, meta, kind),) = sd.cells()
    assert data.ndim == 2 and kind == "image"
    ((data, meta, kind),) = sd.retina()
    assert data.shape == (1411, 1411, 3)


def test_listing_and_importing_the_plugin_does_not_import_torch():
    code = r"""
import sys
import threading
from npe2 import PluginManager
pm = PluginManager.instance()
pm.discover()
mf = pm.get_manifest("napari-upsample-anything")
widgets = [w.display_name for w in pm.iter_widgets() if w.plugin_name == mf.name]
assert len(widgets) == 5, widgets
assert len(list(mf.contributions.sample_data)) == 3
assert len(list(mf.contributions.readers)) == 1
assert "torch" not in sys.modules, "listing contributions imported torch"
mf.validate_imports()  # imports every python_name target (widget and sample modules)
import napari_upsample_anything as upa, napari_upsample_anything.widgets
assert "torch" not in sys.modules, "importing the widget modules imported torch"
print("OK", widgets)
"""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout


_LLVM = sorted(glob.glob("/usr/lib/*/libLLVM*.so*"))


@pytest.mark.skipif(not _LLVM or not sys.platform.startswith("linux"), reason="needs a system libLLVM (Mesa)")
def test_timm_imports_after_mesa_llvm_is_loaded():
    """With Mesa's libLLVM loaded (software OpenGL), importing triton crashes unless preloaded."""
    pytest.importorskip("triton")
    code = rf"""
import ctypes, os
ctypes.CDLL({_LLVM[-1]!r}, mode=os.RTLD_NOW | ctypes.RTLD_GLOBAL)  # what the GL driver does
from napari_upsample_anything.core.platform_fixes import preload_triton_safely
assert preload_triton_safely()
import timm  # -> torchvision -> torch._dynamo -> triton
print("OK")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, (out.returncode, out.stderr[-2000:])
