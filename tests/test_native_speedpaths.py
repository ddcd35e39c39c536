"""The native CPU kernel's speed paths (core/native.py): each checked against float64, and the
roofline benchmark's quick mode (benchmarks/bench_roofline.py; it measures, never asserts time)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from napari_upsample_anything.core import fused, native

needs_native = pytest.mark.skipif(not native.available(), reason="no C compiler to build the native kernel")
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_roofline.py"


def _chunk(gen, B=3, P=29, K=41, G=3):
    """Random fit-chunk inputs in float64 (a decaying, positive definite kernel)."""
    d = dict(dtype=torch.float64)
    phi = torch.randn(B, 6, P, generator=gen, **d)
    abc = 0.5 * torch.randn(3, B, K, generator=gen, **d)
    abc[0], abc[2] = abc[0].abs() + 0.5, abc[2].abs() + 0.5
    abc[1] = abc[1].clamp(-0.4, 0.4)
    rho = 20 * torch.rand(1, B, K, generator=gen, **d)
    d_y, d_x = 2 * torch.randn(B, K, generator=gen, **d), 2 * torch.randn(B, K, generator=gen, **d)
    ic, jd = torch.randn(B, G, P, generator=gen, **d), torch.randn(B, G, K, generator=gen, **d)
    vals, target = torch.randn(B, G, K, generator=gen, **d), torch.randn(B, G, P, generator=gen, **d)
    weight = torch.rand(B, P, generator=gen, **d)
    r2_pix = torch.randint(1, K, (B, P), generator=gen, dtype=torch.int32)
    r2_off = torch.arange(K, dtype=torch.int32)
    repeated = torch.rand(B, K, generator=gen) < 0.2
    repeated[:, 0] = False
    return dict(
        phi=phi, coef=torch.cat([abc, rho]), d_y=d_y, d_x=d_x, ic=ic, jd=jd, vals=vals, target=target,
        weight=weight, r2_pix=r2_pix, r2_off=r2_off, repeated=repeated,
    )  # fmt: skip


def _f32(x: dict):
    names = ("phi", "coef", "d_y", "d_x", "ic", "jd", "vals", "target", "weight")
    return [x[n].float() for n in names] + [x["r2_pix"], x["r2_off"], x["repeated"]]


@needs_native
def test_loss_only_mode_gives_the_same_loss_and_no_gradient(gen):
    """want_grad=False (the final loss, the benchmark's forward) skips the gradient pass only."""
    x = _chunk(gen)
    full = native.fit_chunk(*_f32(x))
    loss_only = native.fit_chunk(*_f32(x), want_grad=False)
    assert float(loss_only[0]) == float(full[0]) and float(loss_only[1]) == float(full[1])
    assert torch.count_nonzero(loss_only[2]) == 0 and torch.count_nonzero(full[2]) > 0
    psi = fused.spatial_coefficients(x["coef"], x["d_y"], x["d_x"])
    ref = fused.fit_chunk(
        x["phi"], psi, x["coef"][3], x["ic"], x["jd"], x["vals"], x["target"], x["weight"],
        x["r2_pix"], x["r2_off"], x["repeated"],
    )  # fmt: skip
    assert float(loss_only[0]) == pytest.approx(float(ref[0]), rel=1e-4)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_roofline", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_roofline"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_roofline", None)


def test_roofline_benchmark_quick_mode_writes_its_table(bench, tmp_path, capsys):
    """--quick runs every part (fit step split, render split, both thread counts) and puts the
    table between its markers, replacing an earlier one and keeping the rest of the page."""
    page = tmp_path / "page.md"
    page.write_text("# Engine\n\nkept text\n")
    assert bench.main(["--quick", "--threads", "1", "--out", str(page)]) == 0
    first = page.read_text()
    assert first.startswith("# Engine\n\nkept text\n") and first.count(bench.MARK_BEGIN) == 1
    rows = [line for line in first.splitlines() if line.startswith("| fit step") or line.startswith("| render")]
    assert len(rows) == 3  # fit at 56^2 and 112^2, render at 56^2
    assert all("forward" in r and "Adam" in r for r in rows[:2]) and "products" in rows[2]
    assert "cores" in first and ("AVX" in first or "SSE" in first)  # names the CPU and its vector unit
    assert bench.main(["--quick", "--threads", "1", "--no-upsample", "--out", str(page)]) == 0
    assert page.read_text().count(bench.MARK_BEGIN) == 1 and "kept text" in page.read_text()
