"""benchmarks/bench_scale.py: its comparison measures and its page writer (no benchmark run)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

import napari_upsample_anything.api as upa

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_scale.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_scale", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_scale"] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_scale", None)


def small_case(bench):
    img = bench.sample_image("chelsea")[:56, :70]
    lr = bench.lr_shape_for(img.shape[:2], 14)
    field = upa.fit_kernels(img, lr, steps=1, device="cpu")
    labels = np.random.default_rng(0).integers(0, 3, img.shape[:2])
    return img, lr, field, labels


def test_compare_is_zero_for_the_same_field_and_not_for_another(bench):
    img, lr, field, labels = small_case(bench)
    same = bench.compare(img, lr, field, field, labels, 3)
    assert same["sigma_x_log_p99"] == 0 and same["render_max_abs"] == 0
    assert same["render_psnr_db"] == float("inf") and same["label_disagree_pct"] == 0
    assert same["miou_tiled"] == same["miou_whole"]
    other = upa.fit_kernels(img, lr, steps=3, device="cpu")
    diff = bench.compare(img, lr, other, field, labels, 3)
    assert diff["sigma_x_log_p99"] > 0 and diff["render_max_abs"] > 0 and np.isfinite(diff["render_psnr_db"])


def test_one_hot_lr_sums_to_one_per_cell(bench):
    labels = np.random.default_rng(1).integers(0, 4, (45, 31))
    onehot = bench.one_hot_lr(labels, 4, (7, 5))  # non-integer scale
    np.testing.assert_allclose(onehot.sum(0), 1.0, rtol=1e-6)
    assert onehot[:, 0, 0] @ np.arange(4) == pytest.approx(labels[:6, :6].mean(), rel=1e-6)  # block of cell (0, 0): 6 x 6 pixels


def test_report_rewrites_only_between_markers(bench, tmp_path, monkeypatch):
    md = tmp_path / "scale.md"
    md.write_text("intro\n<!-- bench_scale:throughput -->\nold table\n<!-- /bench_scale:throughput -->\noutro\n")
    monkeypatch.setattr(bench, "MD_PATH", md)
    row = dict(
        workers=2,
        planes=16,
        size=512,
        lr=[36, 36],
        channels=384,
        steps=51,
        hr_features=True,
        wall_seconds=120.0,
        planes_per_minute=8.0,
        task_seconds={"features": 10.0, "fit": 60.0, "pca": 5.0, "render": 45.0},
        peak_rss_max=2**30,
        output_bytes=3 * 2**30,
        identical_to_first=True,
    )
    stamp = dict(
        argv="python benchmarks/bench_scale.py throughput",
        date_utc="2026-12-01 15:00",
        load_average_start="1 1 1",
        load_average_end="2 2 2",
        wall_seconds=120.0,
    )
    bench.write_report({"throughput": {"rows": [row], "memory_limit": "4GB", "stamp": stamp}})
    text = md.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old table" not in text
    assert "| 2 | 16 | 512² | 36 x 36 | 384 | 51 | True | 120 | 8.00 | 10 / 60 / 5 / 45 | 1024 MiB | 3072 MiB | True |" in text
