"""Smoke tests of the quality benchmarks (benchmarks/bench_quality.py, bench_features.py).

The quick benchmark runs end to end into a temporary folder (a few small images, few steps)
and its numbers are checked for sanity, not for the published quality: GSJBU must beat nearest
on its own self-reconstruction task and match the dense float64 reference. The JBU baseline
is checked against a brute-force loop, and bench_features runs on a tiny randomly
initialised ViT (mechanics only).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    if str(BENCH) not in sys.path:  # bench_features imports bench_quality
        sys.path.insert(0, str(BENCH))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bq():
    return _load("bench_quality")


@pytest.fixture(scope="module")
def quick_run(bq, tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    res = bq.main(["--quick", "--out", str(out), "--quiet"])
    return res, out


def test_quick_benchmark_writes_docs(quick_run):
    res, out = quick_run
    md = (out / "quality.md").read_text()
    png = out / "quality_crops.png"
    assert png.exists() and png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for heading in ("## Setup", "dense float64 reference", "## Mean results, scale 14", "## Mean results, scale 16",
                    "## Where GSJBU wins and loses", "## Robustness to guide noise", "## Optimisation steps",
                    "## JBU grid search", "## Run time", "## Per-image results", "## Environment"):  # fmt: skip
        assert heading in md, heading
    assert "torch" in md and torch.__version__ in md
    assert "Quick mode" in md


def test_quick_benchmark_numbers_are_sane(quick_run, bq):
    res, _ = quick_run
    rec = res["records"]
    cfg = res["config"]
    assert {r["task"] for r in rec} == {"T1", "T2", "T3"}
    assert {r["method"] for r in rec} == set(bq.METHODS)
    for r in rec:
        for k in ("psnr", "ssim", "miou", "acc", "bf1"):
            if k in r:
                assert math.isfinite(r[k]), r
                if k != "psnr":
                    assert -1.0 <= r[k] <= 1.0, r
    for scale in cfg.scales:
        sel = dict(task="T1", down="bicubic", scale=scale, noise=0)
        ours = bq.mean_of(rec, "psnr", method="gsjbu", **sel)
        assert ours > bq.mean_of(rec, "psnr", method="nearest", **sel) + 3.0
        assert ours > bq.mean_of(rec, "psnr", method="bilinear", **sel)
        # guided methods keep label boundaries better than nearest
        sel3 = dict(task="T3", down="area", scale=scale, noise=0)
        assert bq.mean_of(rec, "miou", method="gsjbu", **sel3) > bq.mean_of(rec, "miou", method="nearest", **sel3)
    # the render is the dense float64 computation
    assert res["reference"] and all(r["max_abs"] < 1e-4 for r in res["reference"])
    # guide-free baselines do not depend on the guide noise
    for m in ("nearest", "bilinear", "bicubic"):
        a = bq.mean_of(rec, "psnr", task="T1", down="area", method=m, scale=16, noise=0)
        b = bq.mean_of(rec, "psnr", task="T1", down="area", method=m, scale=16, noise=cfg.noise[-1])
        assert a == pytest.approx(b)
    # JBU's frozen setting comes from the grid; the steps sweep has one row per step count
    assert res["jbu"]["best"][0] in cfg.jbu_sigma_s and res["jbu"]["best"][1] in cfg.jbu_sigma_r
    assert [r["steps"] for r in res["steps"]] == list(cfg.sweep_steps) * len(cfg.sweep_images)


def test_raw_results_rerender(quick_run, bq, tmp_path):
    import pickle

    res, _ = quick_run
    raw = tmp_path / "raw.pkl"
    with open(raw, "wb") as fh:
        pickle.dump({k: v for k, v in res.items() if k != "paths"}, fh)
    again = bq.main(["--from-raw", str(raw), "--out", str(tmp_path / "docs"), "--quiet"])
    assert (tmp_path / "docs" / "quality.md").read_text().count("| GSJBU (ours) |") >= 2
    assert again["records"] == res["records"]


def test_jbu_matches_brute_force(bq):
    torch.manual_seed(0)
    C, h, w, H, W = 2, 5, 6, 29, 33
    sigma_s, sigma_r = 0.8, 0.2
    f = torch.rand(C, h, w)
    guide = torch.rand(3, H, W)
    out = bq.jbu_upsample(f, guide, sigma_s, sigma_r)
    g_lr = torch.nn.functional.interpolate(guide[None].double(), size=(h, w), mode="bilinear", align_corners=False)[0]
    r = math.ceil(2 * sigma_s)
    ref = np.zeros((C, H, W))
    for y in range(H):
        for x in range(W):
            u, v = (y + 0.5) * h / H - 0.5, (x + 0.5) * w / W - 0.5
            uc, vc = min(max(round(u), 0), h - 1), min(max(round(v), 0), w - 1)
            num, den = np.zeros(C), 0.0
            for qy in range(max(0, uc - r), min(h, uc + r + 1)):
                for qx in range(max(0, vc - r), min(w, vc + r + 1)):
                    d2 = float(((guide[:, y, x].double() - g_lr[:, qy, qx]) ** 2).sum())
                    wt = math.exp(-((u - qy) ** 2 + (v - qx) ** 2) / (2 * sigma_s**2) - d2 / (2 * sigma_r**2))
                    num += wt * f[:, qy, qx].double().numpy()
                    den += wt
            ref[:, y, x] = num / den
    assert np.abs(out.numpy() - ref).max() < 1e-5


def test_label_metrics(bq):
    truth = np.zeros((40, 40), np.int64)
    truth[:, 20:] = 1
    assert bq.label_metrics(truth, truth, 2) == {"miou": 1.0, "acc": 1.0, "bf1": 1.0}
    shifted = np.zeros_like(truth)
    shifted[:, 22:] = 1  # boundary 2 px off: within tolerance
    m = bq.label_metrics(truth, shifted, 2)
    assert m["bf1"] == 1.0 and m["acc"] == pytest.approx(0.95)
    far = np.zeros_like(truth)
    far[:, 30:] = 1
    assert bq.label_metrics(truth, far, 2)["bf1"] == 0.0


def test_bench_features_mechanics(tmp_path):
    bf = _load("bench_features")
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny forwards: one thread is faster on a shared CPU
    try:
        with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
            res = bf.main(["--size", "28", "--steps", "2", "--image", "astronaut", "--device", "cpu",
                           "--out", str(tmp_path / "features.md")])  # fmt: skip
    finally:
        torch.set_num_threads(n)
    assert res["random_init"] and res["weights_source"] == "random-init"
    rows = [r for r in res["rows"] if r["method"] != "_fit"]
    assert {r["route"] for r in rows} == {"tokens", "pixels"}
    assert {r["method"] for r in rows} == set(bf.METHODS)
    for r in rows:
        assert -1.0 <= r["cos"] <= 1.0 and math.isfinite(r["rel_l2"]) and r["rel_l2"] >= 0
    text = (tmp_path / "features.md").read_text()
    assert "meaningless" in text and "2x2 -> 4x4 tokens" in text
