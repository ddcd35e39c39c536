#!/usr/bin/env python
"""One-call GPU check: correctness of every backend on the device, then speed and memory.

Needs only torch, triton, numpy (timm and scikit-learn are not used here, napari / zarr / dask /
bioio are not imported: a test runs it with them blocked). Run it from the repository root::

    PYTHONPATH=src python benchmarks/gpu_check.py                       # CUDA, about 5-8 min
    PYTHONPATH=src python benchmarks/gpu_check.py --device cpu --quick  # smoke run (CI)

It writes ``docs/benchmarks_cuda.md`` (``--out``) and a JSON twin (``--json``):

1. the device (name, compute capability, driver / CUDA / torch / triton versions);
2. first-call times: the Triton kernels' compile (fit and render, float32 and float16), and
   ``torch.compile``'s first fused fit chunk (inductor), measured as first call minus second;
3. correctness on the device against float64 (a dense float64 render from the formulas,
   ``tests/reference_gsjbu.py``): render of every backend in fp32 / fp16 / bf16; the fit's loss
   and gradient of every backend (and the mixed-precision fits) against autograd through the
   float64 render; 5-step loss curves of every backend against the eager path;
4. time and ``torch.cuda.max_memory_allocated`` (above the level before the stage) of a fit
   (51 steps) and a render (C = 384) at 224^2, 448^2, 1024^2, 2048^2, 4096^2 for fp32, fp16 and
   bf16, ``backend="auto"`` (Triton on CUDA);
5. the published method's dense layout (``benchmarks/dense_published_style.py``) at 224^2 in
   the same run, for the ratio.

A wall-clock budget (``--budget-s``, default 360 s from the start) skips the remaining timing rows when it
is spent (they are listed as skipped), so the check ends in under 8 minutes.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))  # reference_gsjbu: the float64 formulas (torch only)
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

import napari_upsample_anything as upa
from napari_upsample_anything.core.engine import backends, native, triton_kernels
from napari_upsample_anything.core.engine.blocks import BlockEngine, RenderOptions
from napari_upsample_anything.core.field import KernelField
from napari_upsample_anything.core.fit import _ChunkedFit, _loss_and_grad, _loss_and_grad_fused, _TileCache
from napari_upsample_anything.core.guide import Guide
from napari_upsample_anything.core.render import bicubic_lr_guide
from napari_upsample_anything.core.units import format_bytes

PRECISIONS = ("fp32", "fp16", "bf16")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 2e-2}
FULL_SIZES = (224, 448, 1024, 2048, 4096)
QUICK_SIZES = (28, 42)


def rel_err(out, ref) -> float:
    out = torch.as_tensor(np.asarray(out) if not isinstance(out, torch.Tensor) else out).double().cpu()
    ref = torch.as_tensor(np.asarray(ref) if not isinstance(ref, torch.Tensor) else ref).double().cpu()
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Peak:
    """``torch.cuda.max_memory_allocated`` above the level before the stage (None on the CPU)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = time.perf_counter() - self.t0
        self.bytes = int(torch.cuda.max_memory_allocated(self.device) - self.base) if self.device.type == "cuda" else None


def synthetic_guide(size: int, seed: int = 0) -> np.ndarray:
    """A smooth, edged RGB test image (uint8) without scikit-image: blobs, stripes and a disc."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.stack([np.sin(9 * xx + 4 * yy), np.cos(7 * yy - 3 * xx), np.sin(5 * (xx * yy) * 6)], -1) * 0.3 + 0.5
    img[(xx - 0.6) ** 2 + (yy - 0.4) ** 2 < 0.05] = (0.9, 0.2, 0.1)
    img += 0.02 * rng.standard_normal(img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def available_backends(device: torch.device, quick: bool) -> List[str]:
    out = ["eager"]
    if backends.compiler_available(device.type) and not (quick and device.type == "cpu"):
        out.append("compiled")  # inductor's first CPU compile takes 6-40 s: not in the CPU smoke run
    if triton_kernels.usable(device):
        out.append("triton")
    return out


# ---------------------------------------------------------------------------- 1. device
def device_info(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        info["triton"] = "not importable"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(name=p.name, capability=f"{p.major}.{p.minor}", memory=format_bytes(p.total_memory), cuda=torch.version.cuda)
        try:
            import subprocess

            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
            ).stdout.strip()
        except Exception:  # noqa: BLE001
            info["driver"] = "unknown"
    else:
        info.update(name=platform.processor() or platform.machine(), threads=torch.get_num_threads(), native=native.available())
    return info


# ---------------------------------------------------------------------------- 2. first calls
def first_call_times(device: torch.device, backends: List[str]) -> List[dict]:
    rows = []
    guide = synthetic_guide(112)
    lr = np.random.default_rng(0).standard_normal((384, 8, 8)).astype(np.float32)
    for backend in backends:
        if backend == "eager":
            continue
        for precision in ("fp32", "fp16"):
            times = []
            for _ in range(2):
                with Peak(device) as pk:
                    f = upa.fit_kernels(guide, (8, 8), steps=1, device=device, backend=backend, fit_precision=precision)
                    upa.render(lr, guide, f, device=device, backend=backend, precision=precision)
                times.append(pk.seconds)
            rows.append(
                dict(backend=backend, precision=precision, first_s=times[0], second_s=times[1], compile_s=times[0] - times[1])
            )
    return rows


# ---------------------------------------------------------------------------- 3. correctness
def _random_field(h: int, w: int, gen: torch.Generator) -> KernelField:
    def logu(lo, hi):
        return torch.exp(torch.empty(h, w).uniform_(math.log(lo), math.log(hi), generator=gen))

    theta = torch.empty(h, w).uniform_(-math.pi + 1e-3, math.pi - 1e-3, generator=gen)
    return KernelField(logu(0.5, 40.0), logu(0.5, 40.0), theta, logu(0.003, 0.5))


def check_render(device: torch.device, backends: List[str], quick: bool = False) -> List[dict]:
    from reference_gsjbu import reference_render

    gen = torch.Generator().manual_seed(1)
    rows = []
    cases = ((23, 19, 3, 4, 3, 7), (17, 20, 3, 3, 1, 70)) if quick else ((45, 61, 6, 9, 3, 7), (33, 40, 4, 3, 1, 70))
    for H, W, h, w, G, C in cases:
        guide = torch.rand(H, W, G, generator=gen)
        lr = torch.randn(C, h, w, generator=gen)
        field = _random_field(h, w, gen)
        ref = reference_render(
            lr.double().to(device),
            guide.permute(2, 0, 1).double().to(device),
            *(t.double().to(device) for t in (field.sigma_x, field.sigma_y, field.theta, field.sigma_r)),
        ).cpu()
        g_arg = guide[..., 0] if G == 1 else guide
        for backend in backends:
            for precision in PRECISIONS:
                row = dict(case=f"{H}x{W} -> {h}x{w}, G={G}, C={C}", backend=backend, precision=precision, tol=TOL[precision])
                try:
                    out = upa.render(lr, g_arg, field, device=device, backend=backend, precision=precision, normalize="none")
                    row["rel_err"] = rel_err(out, ref)
                    row["ok"] = bool(row["rel_err"] < TOL[precision])
                except Exception as exc:  # noqa: BLE001 - reported in the table
                    row.update(rel_err=float("nan"), ok=False, error=f"{type(exc).__name__}: {exc}"[:200])
                rows.append(row)
    return rows


def _fit_gradient(guide_hwc, lr_shape, raw, device, kernel_name: str, dtype=torch.float32, budget=2_000_000):
    guide = Guide(guide_hwc, "none")
    engine = BlockEngine(guide, lr_shape, RenderOptions(), device)
    h, w = lr_shape
    values = bicubic_lr_guide(guide, lr_shape, device).permute(1, 2, 0).reshape(h * w, -1).contiguous()
    per_block = engine.bytes_per_block(guide.channels, 4, training=True)
    tiles = engine.plan(per_block, budget)
    raw = raw.clone().to(device).requires_grad_(True)
    n = guide.channels * guide.shape[0] * guide.shape[1]
    if kernel_name == "eager":
        cache = _TileCache(engine, True)
        loss, _ = _loss_and_grad(engine, cache, tiles, raw, values, n, per_block, None, None)
    else:
        prep = _ChunkedFit(engine, tiles, values, n, keep=True, compiled=True, kernel_name=kernel_name, pair_dtype=dtype)
        loss, _ = _loss_and_grad_fused(prep, tiles, raw, per_block, None, None)
    return loss, raw.grad.cpu(), len(tiles)


def check_fit(device: torch.device, backends: List[str], quick: bool = False) -> List[dict]:
    from reference_gsjbu import reference_render

    gen = torch.Generator().manual_seed(7)
    H, W, h, w = (26, 31, 4, 5) if quick else (48, 60, 4, 5)  # non-integer scales in the quick case
    budget = 400_000 if quick else 2_000_000  # several tiles either way
    guide = torch.rand(H, W, 3, generator=gen)
    raw = KernelField.initial((h, w)).raw() + 0.3 * torch.randn(4, h, w, generator=gen)
    raw64 = raw.double().to(device).requires_grad_(True)
    f = KernelField.from_raw(raw64)
    lr_img = bicubic_lr_guide(Guide(guide.numpy(), "none"), (h, w), device).double()
    g64 = guide.double().permute(2, 0, 1).to(device)
    ref_loss = (reference_render(lr_img, g64, f.sigma_x, f.sigma_y, f.theta, f.sigma_r) - g64).abs().mean()
    ref_loss.backward()
    ref_grad = raw64.grad.cpu()
    kernels = [("eager", "eager", "fp32")]
    if device.type == "cpu" and native.available():
        kernels.append(("auto", "native", "fp32"))
    if "compiled" in backends:
        kernels.append(("compiled", "inductor", "fp32"))
    if "triton" in backends:
        kernels += [("triton", "triton", p) for p in PRECISIONS]
    kernels += [("mixed (torch)", "mixed", p) for p in ("fp16", "bf16")]
    rows = []
    for backend, name, precision in kernels:
        row = dict(backend=backend, kernel=name, precision=precision, tol=TOL[precision])
        try:
            loss, grad, n_tiles = _fit_gradient(guide.numpy(), (h, w), raw, device, name, DTYPES[precision], budget)
            row.update(loss_rel_err=abs(loss / float(ref_loss.detach()) - 1), grad_rel_err=rel_err(grad, ref_grad), tiles=n_tiles)
            row["ok"] = bool(row["loss_rel_err"] < TOL[precision] and row["grad_rel_err"] < max(TOL[precision], 1e-3))
        except Exception as exc:  # noqa: BLE001
            row.update(loss_rel_err=float("nan"), grad_rel_err=float("nan"), ok=False, error=f"{type(exc).__name__}: {exc}"[:200])
        rows.append(row)
    return rows


def check_loss_curves(device: torch.device, backends: List[str]) -> List[dict]:
    guide = synthetic_guide(64, seed=3)
    kw = dict(steps=5, device=device, seed=0)
    ref = upa.fit_kernels(guide, (4, 4), backend="eager", **kw).meta["loss_per_step"]
    rows = []
    for backend in backends:
        for precision in PRECISIONS:
            if backend in ("eager", "compiled") and precision != "fp32":
                continue  # fit_precision is the Triton kernel's (or the torch mixed formulas'): not theirs
            row = dict(backend=backend, precision=precision)
            try:
                f = upa.fit_kernels(guide, (4, 4), backend=backend, fit_precision=precision, **kw)
                dev = float(np.max(np.abs(np.array(f.meta["loss_per_step"]) / np.array(ref) - 1)))
                row.update(kernel=f.meta["kernel"], max_rel_dev=dev, ok=bool(dev < (1e-3 if precision == "fp32" else 2e-2)))
            except Exception as exc:  # noqa: BLE001
                row.update(kernel="-", max_rel_dev=float("nan"), ok=False, error=f"{type(exc).__name__}: {exc}"[:200])
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------- 4./5. speed and memory
def time_sizes(device: torch.device, sizes, steps: int, channels: int, deadline: float, log: Callable) -> List[dict]:
    rows = []
    upa.fit_kernels(synthetic_guide(56), (4, 4), steps=1, device=device)  # builds / warms the kernels
    for size in sizes:
        guide = synthetic_guide(size)
        h = w = max(1, size // 14)
        lr = np.random.default_rng(0).standard_normal((channels, h, w)).astype(np.float32)
        for precision in PRECISIONS:
            row = dict(size=size, lr=h, channels=channels, steps=steps, precision=precision)
            if time.perf_counter() > deadline:
                row["skipped"] = "time budget spent"
                rows.append(row)
                continue
            try:
                with Peak(device) as fit_pk:
                    field = upa.fit_kernels(guide, (h, w), steps=steps, device=device, fit_precision=precision)
                out = np.empty((channels, size, size), np.float32)
                with Peak(device) as render_pk:
                    upa.render(lr, guide, field, device=device, precision=precision, out=out)
                row.update(
                    kernel=field.meta["kernel"], fit_s=fit_pk.seconds, fit_peak=fit_pk.bytes, render_s=render_pk.seconds,
                    render_peak=render_pk.bytes, psnr=field.meta["psnr"], output_bytes=out.nbytes,
                )  # fmt: skip
                del out
            except Exception as exc:  # noqa: BLE001
                row["error"] = f"{type(exc).__name__}: {exc}"[:200]
            log(f"  {size}^2 {precision}: {row}")
            rows.append(row)
    return rows


def time_dense(device: torch.device, size: int, steps: int, channels: int) -> dict:
    from dense_published_style import dense_fit, dense_render

    guide_u8 = synthetic_guide(size)
    guide = torch.from_numpy(guide_u8).permute(2, 0, 1).float().div(255).to(device)
    h = w = max(1, size // 14)
    feats = torch.randn(channels, h, w, generator=torch.Generator().manual_seed(0)).to(device)
    row = dict(size=size, lr=h, channels=channels, steps=steps)
    try:
        with Peak(device) as fit_pk:
            raw, _ = dense_fit(guide, (h, w), steps=steps)
        f = KernelField.from_raw(raw.detach())
        with Peak(device) as render_pk, torch.no_grad():
            dense_render(feats, guide, f.sigma_x, f.sigma_y, f.theta, f.sigma_r, n_chunk=49, c_chunk=128)
        row.update(fit_s=fit_pk.seconds, fit_peak=fit_pk.bytes, render_s=render_pk.seconds, render_peak=render_pk.bytes)
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory on a small GPU
        row["error"] = f"{type(exc).__name__}: {exc}"[:200]
    return row


# ---------------------------------------------------------------------------- report
def _b(n: Optional[int]) -> str:
    return "-" if n is None else format_bytes(n)


def _e(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1e}"


def write_markdown(path: Path, res: dict) -> None:
    info, q = res["device"], res["quick"]
    a = [
        "# GPU check" + (" (smoke run)" if q else ""),
        "",
        f"Generated by `{res['command']}` in {res['wall_s']:.0f} s. Device: **{info.get('name')}** ({info['device']}"
        + (
            f", compute capability {info['capability']}, {info['memory']}, driver {info.get('driver')}, CUDA {info.get('cuda')}"
            if "capability" in info
            else ""
        )
        + f"); torch {info['torch']}, triton {info['triton']}.",
        "",
        f"Overall: **{'all checks passed' if res['all_ok'] else 'SOME CHECKS FAILED (see the tables)'}**.",
        "",
        "## Correctness on the device against float64",
        "",
        "Render (max abs error / max abs of a dense float64 render of the published formulas; random fields,",
        "sigma 0.5-40, sigma_r 0.003-0.5, non-integer scales):",
        "",
        "| case | backend | precision | rel. error | tolerance | ok |",
        "|---|---|---|---:|---:|---|",
    ]
    for r in res["render"]:
        a.append(
            f"| {r['case']} | {r['backend']} | {r['precision']} | {_e(r['rel_err'])} | {r['tol']:g} | {'yes' if r['ok'] else 'NO ' + r.get('error', '')} |"
        )
    a += [
        "",
        "Fit: loss and gradient of the four kernel parameters ("
        + ("26x31" if q else "48x60")
        + " guide, 4x5 grid, several tiles) against autograd",
        "through the float64 render:",
        "",
        "| backend | kernel | fit precision | loss rel. error | gradient rel. error | ok |",
        "|---|---|---|---:|---:|---|",
    ]
    for r in res["fit"]:
        a.append(
            f"| {r['backend']} | {r['kernel']} | {r['precision']} | {_e(r['loss_rel_err'])} | {_e(r['grad_rel_err'])} | {'yes' if r['ok'] else 'NO ' + r.get('error', '')} |"
        )
    a += [
        "",
        "5-step loss curves against the eager float32 fit (max relative deviation per step):",
        "",
        "| backend | kernel | fit precision | max deviation | ok |",
        "|---|---|---|---:|---|",
    ]
    for r in res["curves"]:
        a.append(
            f"| {r['backend']} | {r['kernel']} | {r['precision']} | {_e(r['max_rel_dev'])} | {'yes' if r['ok'] else 'NO ' + r.get('error', '')} |"
        )
    a += [
        "",
        "## First-call (compile) times",
        "",
        "A 112^2 fit (1 step) and a C = 384 render, first and second call in this process:",
        "",
    ]
    if res["first_calls"]:
        a += ["| backend | precision | first call | second call | compile (difference) |", "|---|---|---:|---:|---:|"]
        for r in res["first_calls"]:
            a.append(
                f"| {r['backend']} | {r['precision']} | {r['first_s']:.2f} s | {r['second_s']:.2f} s | {r['compile_s']:.2f} s |"
            )
    else:
        a.append("(no compiled backend on this device in this run)")
    a += [
        "",
        '## Time and peak memory (`backend="auto"`)',
        "",
        f"Fit: {res['steps']} Adam steps; render: C = {res['channels']} channels into a host array; LR grid = size / 14. Peak: "
        "`torch.cuda.max_memory_allocated` above the level before the stage (the output array is in host memory).",
        "",
        "| size | LR | fit precision | kernel | fit time | fit peak | render time | render peak | fit PSNR |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in res["sizes"]:
        if "skipped" in r or "error" in r:
            a.append(f"| {r['size']}^2 | {r['lr']} | {r['precision']} | {r.get('skipped') or r.get('error')} | | | | | |")
            continue
        a.append(
            f"| {r['size']}^2 | {r['lr']} | {r['precision']} | {r['kernel']} | {r['fit_s']:.3f} s | {_b(r['fit_peak'])} | "
            f"{r['render_s']:.3f} s | {_b(r['render_peak'])} | {r['psnr']:.2f} |"
        )
    d = res["dense"]
    a += ["", f"## Published dense layout at {d['size']}^2 (same run)", ""]
    if "error" in d:
        a.append(f"Did not run: {d['error']}")
    else:
        ours = next((r for r in res["sizes"] if r["size"] == d["size"] and r["precision"] == "fp32" and "fit_s" in r), None)
        a += ["| | fit time | fit peak | render time | render peak |", "|---|---:|---:|---:|---:|"]
        a.append(
            f"| dense (published layout) | {d['fit_s']:.3f} s | {_b(d['fit_peak'])} | {d['render_s']:.3f} s | {_b(d['render_peak'])} |"
        )
        if ours is not None:
            a.append(
                f"| ours, fp32 | {ours['fit_s']:.3f} s | {_b(ours['fit_peak'])} | {ours['render_s']:.3f} s | {_b(ours['render_peak'])} |"
            )
            ratio = [d["fit_s"] / ours["fit_s"], d["render_s"] / ours["render_s"]]
            a.append(f"| ratio (dense / ours) | {ratio[0]:.1f}x | | {ratio[1]:.1f}x | |")
    a.append("")
    path.write_text("\n".join(a) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="sizes 28 and 42, 2 fit steps, C = 32 (a smoke run)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks_cuda.md")
    p.add_argument("--json", type=Path, default=None, help="also write the raw results (default: --out with .json)")
    p.add_argument("--sizes", type=int, nargs="*", default=None)
    p.add_argument("--budget-s", type=float, default=360.0, help="wall-clock budget after which timing rows are skipped")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available here; use --device cpu", file=sys.stderr)
        return 2
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    backends = available_backends(device, args.quick)
    log(f"gpu_check on {device}: backends {backends}")
    res: Dict = dict(
        quick=args.quick,
        command="PYTHONPATH=src python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    )
    res["device"] = device_info(device)
    steps = 2 if args.quick else 51
    channels = 32 if args.quick else 384
    sizes = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)
    res.update(steps=steps, channels=channels)
    try:
        sections = res["section_s"] = {}

        def section(name, fn):
            log(name)
            t = time.perf_counter()
            res[name] = fn()
            sections[name] = round(time.perf_counter() - t, 2)

        section("render", lambda: check_render(device, backends, args.quick))
        section("fit", lambda: check_fit(device, backends, args.quick))
        section("curves", lambda: check_loss_curves(device, backends))
        section("first_calls", lambda: first_call_times(device, backends) if not args.quick else [])
        section("sizes", lambda: time_sizes(device, sizes, steps, channels, t0 + args.budget_s, log))
        section("dense", lambda: time_dense(device, 16 if args.quick else sizes[0], 1 if args.quick else steps, channels))
    except Exception:  # noqa: BLE001 - write what there is, then fail
        traceback.print_exc()
        res.setdefault("crashed", traceback.format_exc())
    for key in ("render", "fit", "curves", "first_calls", "sizes"):
        res.setdefault(key, [])
    res.setdefault("dense", {"size": 16 if args.quick else sizes[0], "error": "not reached"})
    checks = res["render"] + res["fit"] + res["curves"]
    res["all_ok"] = bool(checks) and all(r["ok"] for r in checks) and "crashed" not in res
    res["wall_s"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".md.tmp")
    write_markdown(tmp, res)
    tmp.replace(args.out)
    json_path = args.json or args.out.with_suffix(".json")
    json_path.write_text(json.dumps(res, indent=1, default=str) + "\n")
    log(f"wrote {args.out} and {json_path}; all checks {'passed' if res['all_ok'] else 'did NOT pass'}")
    return 0 if res["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
