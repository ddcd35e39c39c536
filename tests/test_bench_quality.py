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


def rerender(bq, res: dict, tmp_path):
    """Pickle ``res`` as ``--save-raw`` would and re-render the pages into ``tmp_path / "docs"``."""
    import pickle

    raw = tmp_path / "raw.pkl"
    with open(raw, "wb") as fh:
        pickle.dump({k: v for k, v in res.items() if k != "paths"}, fh)
    return bq.main(["--from-raw", str(raw), "--out", str(tmp_path / "docs"), "--quiet"])


def test_raw_results_rerender(quick_run, bq, tmp_path):
    res, _ = quick_run
    again = rerender(bq, res, tmp_path)
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


# ---------------------------------------------------------------------------------------
# the engine-options study (--options)
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def options_run(bq, tmp_path_factory):
    out = tmp_path_factory.mktemp("quality_options")
    res = bq.main(["--options", "--quick", "--out", str(out), "--quiet"])
    return res, out


def test_options_quick_writes_page(options_run, bq):
    res, out = options_run
    assert not (out / "quality.md").exists() and not (out / "quality_crops.png").exists()
    md = (out / "quality_options.md").read_text()
    for heading in ("only the blocks marked `written`", "## Setup", "Why sigma 2 px", "## Mean results, scale 16, clean guide",
                    "## Mean results, scale 16, guide noise 20", "## Mean differences", "## Reading the results",
                    "## Where each variant still loses", "## Run time", "## Per-image results", "## Environment"):  # fmt: skip
        assert heading in md, heading
    assert "Quick mode" in md and torch.__version__ in md
    for m in bq.OPTION_BASELINES + tuple(bq.OPTION_VARIANTS):
        label = bq.OPTION_LABELS[m]
        assert f"| {label} |" in md, label
        if m in bq.OPTION_VARIANTS:
            assert f"### {label}" in md, label  # its list of remaining losses
    # every mean-table row of every method carries numbers, no "-" and no nan
    for line in md.splitlines():
        cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
        if cells[0] in bq.OPTION_LABELS.values() and len(cells) == 1 + len(bq.SUMMARY_COLS):
            assert all(math.isfinite(float(c)) for c in cells[1:]), line


def test_options_quick_used_the_options(options_run, bq):
    res, _ = options_run
    rec, plan = res["records"], res["plan"]
    assert res["kind"] == "options" and res["smoothing"] == bq.OPTION_SMOOTHING
    assert {r["method"] for r in rec} == set(bq.OPTION_BASELINES) | set(bq.OPTION_VARIANTS)
    assert set(plan) == {0, 20} and "gsjbu-area-smooth" not in plan[0] and set(plan[20]) == set(bq.OPTION_VARIANTS)
    for r in rec:
        assert r["scale"] == 16 and (r["method"] in bq.OPTION_BASELINES or r["method"] in plan[r["noise"]]), r
        for k in ("psnr", "ssim", "miou", "acc", "bf1"):
            if k in r:
                assert math.isfinite(r[k]), r
    # every (variant, noise) of the plan has T1, T2 and T3 results on every image it applies to
    for noise, variants in plan.items():
        for v in variants:
            assert {r["task"] for r in bq.select(rec, method=v, noise=noise)} == {"T1", "T2", "T3"}
    # the fields were fitted with each variant's options (engine meta), one per guide and variant
    fm = res["fit_meta"]
    for m in fm:
        opts = bq.OPTION_VARIANTS[m["variant"]]
        assert m["downsample"] == opts.get("downsample", "bicubic"), m
        assert ("Gaussian smoothing sigma 2 px" in m["normalize"]) == ("guide_smoothing" in opts), m
    n_guides = len({(m["image"], m["noise"], m["guide"]) for m in fm})
    assert len(fm) == sum(len(vs) for vs in plan.values()) * n_guides // len(plan)
    # and they change the results: every variant differs from the published fit on every T1 / T2 case
    for noise, variants in plan.items():
        pub = {(r["image"], r["task"], r["down"]): r["psnr"] for r in bq.select(rec, method="gsjbu", noise=noise) if "psnr" in r}
        for v in variants:
            if v != "gsjbu":
                other = {
                    (r["image"], r["task"], r["down"]): r["psnr"] for r in bq.select(rec, method=v, noise=noise) if "psnr" in r
                }
                assert other.keys() == pub.keys() and all(other[k] != pub[k] for k in pub), v
    # published options add nothing to the field key: the main run's keys are unchanged
    assert bq.field_key(("x", 0, "all"), (7, 8), 20, {}) == ("x", 0, "all", (7, 8), 20)


def test_options_raw_rerender(options_run, bq, tmp_path):
    res, out = options_run
    again = rerender(bq, res, tmp_path)
    assert (tmp_path / "docs" / "quality_options.md").read_text() == (out / "quality_options.md").read_text()
    assert again["records"] == res["records"]


# ---------------------------------------------------------------------------------------
# the stochastic-fit study (--stochastic)
# ---------------------------------------------------------------------------------------
def test_stochastic_quick_writes_page_with_speed_and_quality(bq, tmp_path):
    from quality import stochastic

    res = bq.main(["--stochastic", "--quick", "--out", str(tmp_path), "--quiet"])
    md = (tmp_path / "quality_stochastic.md").read_text()
    for heading in ("## Speed", "## Quality", "## Per-image results", "## Environment", "<!-- written: reading -->"):
        assert heading in md, heading
    var, steps = res["variants"], res["config"].steps
    assert res["kind"] == "stochastic" and {r["method"] for r in res["records"]} == set(stochastic.BASELINES) | set(var)
    # every field was fitted with its variant's fraction and steps (engine meta), one per guide and variant
    wanted = sorted((o.get("fit_fraction", 1.0), o.get("steps", steps)) for o in var.values())
    n_guides = len({(m["image"], m["guide"]) for m in res["fit_meta"]})
    got = sorted((m["fit_fraction"], m["steps"]) for m in res["fit_meta"])
    assert got == sorted(wanted * n_guides) and n_guides >= 3
    # the speed table: the exact fit and each fraction (timed by the benchmark, not judged here)
    speed = {r["fit_fraction"]: r for r in res["speed"]}
    assert set(speed) == {1.0, *stochastic.FRACTIONS}
    assert all(r["seconds"] > 0 and math.isfinite(r["psnr"]) for r in res["speed"])
    for label in res["labels"].values():
        assert f"| {label} |" in md, label
    # the variants change the results (another loss per step), the baselines do not depend on them
    pub = {(r["image"], r["task"], r["down"]): r["psnr"] for r in bq.select(res["records"], method="gsjbu") if "psnr" in r}
    for v in var:
        if v != "gsjbu":
            other = {(r["image"], r["task"], r["down"]): r["psnr"] for r in bq.select(res["records"], method=v) if "psnr" in r}
            assert other.keys() == pub.keys() and other != pub, v


def test_upsamplers_pass_options_to_fit_and_render(bq):
    import napari_upsample_anything as upa

    rng = np.random.default_rng(0)
    guide = rng.uniform(0, 1, (32, 40, 3)).astype(np.float32)
    lr_map = torch.from_numpy(rng.uniform(0, 1, (2, 4, 5)).astype(np.float32))
    variants = {"pub": {}, "area": {"downsample": "area"}, "smooth": {"guide_smoothing": 2.0}}
    ups = bq.Upsamplers((1.0, 0.1), 2, "cpu", variants)
    outs = {v: ups.run(v, lr_map, guide, ("g", 0, "all")) for v in variants}
    fields = {v: ups.fields[bq.field_key(("g", 0, "all"), (4, 5), 2, o)] for v, o in variants.items()}
    assert len(ups.fields) == 3
    assert fields["area"].meta["downsample"] == "area" and fields["pub"].meta["downsample"] == "bicubic"
    assert "smoothing sigma 2" in fields["smooth"].meta["guide_normalize"]
    # the smoothed variant's render smooths the guide too (the same as render's default: the field's sigma)
    f = fields["smooth"]
    with_s = upa.render(lr_map.numpy(), guide, f, device="cpu", guide_smoothing=2.0)
    without = upa.render(lr_map.numpy(), guide, f, device="cpu", guide_smoothing=0.0)
    assert np.array_equal(outs["smooth"], with_s) and not np.allclose(outs["smooth"], without)
    assert np.array_equal(upa.render(lr_map.numpy(), guide, f, device="cpu"), with_s)
    assert np.array_equal(outs["pub"], upa.render(lr_map.numpy(), guide, fields["pub"], device="cpu"))


# ---------------------------------------------------------------------------------------
# the interpretation is written by hand, not generated
# ---------------------------------------------------------------------------------------
def _written(text: str) -> dict:
    import re

    return {m[1]: m[2] for m in re.finditer(r"<!-- written: ([a-z0-9-]+) -->\n(.*?)<!-- /written -->", text, re.S)}


@pytest.mark.parametrize("page", ["quality.md", "quality_options.md", "quality_stochastic.md"])
def test_docs_pages_carry_hand_written_interpretation(page):
    """The committed pages have their interpretation in `written` blocks, none of them a placeholder."""
    docs = BENCH.parent / "docs" / page
    blocks = _written(docs.read_text())
    assert "reading" in blocks
    for name, text in blocks.items():
        assert "Not written yet" not in text and len(text) > 200, name


def test_pages_keep_the_written_blocks_and_regenerate_the_rest(quick_run, options_run, bq, tmp_path):
    docs = BENCH.parent / "docs"
    for (res, out), page in ((quick_run, "quality.md"), (options_run, "quality_options.md")):
        text = (out / page).read_text()
        # a page written elsewhere takes the repository's hand-written text, verbatim
        assert _written(text) == _written((docs / page).read_text())
        # an edit inside a block survives a rerun into the same folder; the generated parts come back
        again = tmp_path / page.replace(".md", "")
        again.mkdir()
        edited = text.replace("<!-- written: reading -->\n", "<!-- written: reading -->\nAn edit by hand.\n", 1)
        edited = edited.replace("## Setup", "## Setup (edited outside a block)", 1)
        (again / page).write_text(edited)
        import pickle

        raw = tmp_path / f"{page}.pkl"
        raw.write_bytes(pickle.dumps({k: v for k, v in res.items() if k != "paths"}))
        bq.main(["--from-raw", str(raw), "--out", str(again), "--quiet"])
        rerun = (again / page).read_text()
        assert _written(rerun)["reading"].startswith("An edit by hand.\n")
        assert "## Setup (edited outside a block)" not in rerun and "\n## Setup\n" in rerun
        assert rerun.replace("An edit by hand.\n", "", 1) == text
        assert not list(again.glob(".*.tmp"))  # written to a temporary name, then renamed
