"""Roofline benchmark of the CPU engine: how far the fit and the render are from the machine's peak.

    python benchmarks/bench_roofline.py --out docs/benchmarks_engine.md     # full (minutes)
    python benchmarks/bench_roofline.py --quick                             # small sizes (a test runs it)
    python benchmarks/bench_roofline.py --isa avx2 --fit-sizes 448 --threads 1   # AVX2 code on an AVX-512 CPU

For the fit step and the render at 224^2, 1024^2 and 4096^2 (``--fit-sizes``, ``--render-sizes``),
with 1 thread and with all threads, it reports pairs/s (pixel-neighbour pairs), exps/s, the
achieved GFLOP/s and the ratio of the time to a 2048^2 float32 matmul measured in the same
process at the same thread count (the yardstick: it runs at close to the CPU's peak, so the
ratio survives a different or a loaded machine better than seconds do), and where the time goes:

* fit: ``forward`` (the native kernel's loss-only pass: log-weights, exp, aggregation, loss),
  ``backward`` (the kernel's gradient pass: its full time minus the forward; the native kernel
  also gathers the neighbours' coefficients and scatters their gradients itself), ``other``
  (per-step work around the kernel: the dynamic radius and the tile loop, and for the other
  kernels the gather and scatter) and ``update`` (the parameter update of the fit's loop,
  :meth:`.fit.FusedParameters.update`: chain rule back to the raw parameters, Adam, the
  divergence check and the next coefficients; one native call with the native kernel);
* render: ``prep`` (neighbour geometry, coefficient and value gathers), ``weights``
  (log-weights + softmax, timed with a 1-channel product), ``products`` (weights x C channels, a batched GEMM) and ``write``
  (blocks into the ``(C, H, W)`` output); for at most ``native.FUSED_RENDER_MAX_CHANNELS``
  channels the kernel aggregates itself and ``weights + products`` is timed as one.

Every time is the fastest of ``--repeats`` runs, interleaved with the matmul yardstick so that
the load of a shared machine hits both alike; the load average before and after is printed.
Flop counts are nominal per pair (FMA = 2 flops; the exp counted as the operations of its
inlined polynomial; see ``FLOPS``), so GFLOP/s compares kernels, not a hardware counter.
The table names the CPU model, its widest vector unit and the native kernel's build.

``--isa avx2`` measures, on an AVX-512 CPU, the code that AVX2 CPUs run: the script reruns itself
in a child process with the kernel built without AVX-512 (``UPSAMPLE_ANYTHING_NATIVE_WITHOUT=avx512f``)
and torch and MKL told to use their AVX2 kernels (``ATEN_CPU_CAPABILITY=avx2``,
``MKL_ENABLE_INSTRUCTIONS=AVX2``), so that the matmul yardstick is AVX2 code as well. It is an
emulation: the core's AVX-512 machinery runs 256-bit code, which a real AVX2 CPU may run faster
or slower. Its table goes between markers of its own.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Tuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # markdown_section, when run or imported from elsewhere
from markdown_section import write_marked_section

import napari_upsample_anything as upa
from napari_upsample_anything.core.engine import native
from napari_upsample_anything.core.engine.backends import fit_kernel_name, native_usable
from napari_upsample_anything.core.engine.blocks import CPU_PREFERRED_TILE_BYTES, BlockEngine, RenderOptions
from napari_upsample_anything.core.engine.eager import gather_values, render_blocks, render_chunk_blocks
from napari_upsample_anything.core.field import KernelField, kernel_coefficients
from napari_upsample_anything.core.fit import (
    Adam,
    FusedParameters,
    _ChunkedFit,
    _fused_pass,
    _loss_and_grad_fused,
    schedule_gamma,
)
from napari_upsample_anything.core.guide import Guide
from napari_upsample_anything.core.render import bicubic_lr_guide, render_field
from napari_upsample_anything.core.threads import flushed_denormals

CPU = torch.device("cpu")
MARK_BEGIN = "<!-- bench_roofline:begin -->"
MARK_END = "<!-- bench_roofline:end -->"
# --isa avx2: the environment of the child process (read by torch and MKL when they load)
AVX2_ENV = {native.WITHOUT_ENV: "avx512f", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
# Nominal flops per (pixel, neighbour) pair with a 3-channel guide (FMA = 2):
# log-weight: range term 3 sub + 3 mul/add (8), spatial 6 FMA (12), minus rho * d (2), max (1);
# exp: 20 (a vectorised exp: reduction, a degree-6 polynomial, scaling); aggregation: sum +
# 3 FMA (7); gradient: per-pair factor (8) + 7 FMA into the coefficients' sums (14); render:
# normalise (1) + 2 C for the products. Fixed counts, independent of the implementation, so
# that GFLOP/s of two kernel versions compare like their speeds.
FLOPS = dict(logit=23, exp=20, aggregate=7, gradient=22, normalise=1)


def cpu_description() -> str:
    """``model, N cores, vector unit, native kernel build`` of this machine."""
    model, flags = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = line
    except OSError:
        pass
    words = set(flags.split())
    unit = "AVX-512" if "avx512f" in words else "AVX2" if "avx2" in words else "SSE or other"
    build = native.build_description() if hasattr(native, "build_description") else "native kernel (gcc -O3 -march=native)"
    if not native.available():
        build = "native kernel unavailable (eager / compiled fallback)"
    return f"{model}, {os.cpu_count()} cores, {unit}; {build}"


def _load() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def _guide(size: int) -> np.ndarray:
    import skimage.data
    import skimage.transform

    img = skimage.transform.resize(skimage.data.astronaut(), (size, size), order=3, anti_aliasing=True)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def fastest(fns: dict, repeats: int) -> dict:
    """{name: fastest wall seconds}, running the functions round-robin ``repeats`` times."""
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


class Matmul:
    """The yardstick: an ``n x n`` float32 matmul (2 n^3 flops)."""

    def __init__(self, n: int):
        g = torch.Generator().manual_seed(0)
        self.a, self.b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
        self.out = torch.empty(n, n)
        self.flops = 2.0 * n**3

    def __call__(self):
        torch.mm(self.a, self.b, out=self.out)


class FitCase:
    """One fit step (loss + exact gradient + Adam) at ``size^2`` on a perturbed field, split into parts."""

    def __init__(self, size: int, patch: int):
        guide = Guide(_guide(size))
        h = w = max(1, size // patch)
        self.engine = engine = BlockEngine(guide, (h, w), RenderOptions(), CPU)
        values = bicubic_lr_guide(guide, (h, w), CPU)
        values_flat = values.permute(1, 2, 0).reshape(h * w, -1).contiguous()
        self.per_block = engine.bytes_per_block(3, 4, training=True)
        self.tiles = engine.plan(self.per_block, 2**31, CPU_PREFERRED_TILE_BYTES)
        self.kernel = fit_kernel_name(CPU, 3)
        self.prep = _ChunkedFit(engine, self.tiles, values_flat, 3 * size * size, keep=True, compiled=True)
        raw = KernelField.initial((h, w)).raw()
        self.raw = (raw + 0.2 * torch.randn(raw.shape, generator=torch.Generator().manual_seed(0))).requires_grad_(True)
        self.adam = Adam(self.raw, lr=0.1, gamma=schedule_gamma(0.1))
        self.raw0 = self.raw.detach().clone()
        self.params = FusedParameters(self.raw, self.adam, use_native=self.kernel == "native")  # as the fit's loop
        self.zero_grad = torch.zeros(4, h * w)
        # every chunk evaluates all K offsets (the dynamic radius is a mask inside the kernel)
        self.pairs = sum(n * engine.P * engine.K for t in self.tiles for _, n, _, _ in self.prep.chunks(t))
        self.name = f"fit step {size}^2 ({h}^2 LR, {self.kernel})"
        self.size = size

    def step(self):
        """The kernel pass of one step of the fit's loop (loss and gradient in the coefficients)."""
        _fused_pass(self.prep, self.tiles, *self.params.coefficients, self.per_block, None, None)

    def forward(self):
        with torch.no_grad():
            _loss_and_grad_fused(self.prep, self.tiles, None, self.per_block, None, None, KernelField.from_raw(self.raw))

    def kernel_only(self, want_grad: bool):
        """The chunk kernel's calls of one step, with their inputs gathered beforehand."""
        field = KernelField.from_raw(self.raw.detach())
        coef = kernel_coefficients(field).reshape(4, -1)
        sigma_eff = torch.maximum(field.sigma_x, field.sigma_y)
        coef = coef.contiguous()
        grad = torch.zeros_like(coef)
        calls = []
        for tile in self.tiles:
            r2 = self.engine.radius_sq(sigma_eff, tile).to(torch.int32)
            for b0, n, q, x in self.prep.chunks(tile):
                c = coef.index_select(1, q).reshape(4, n, self.engine.K) if self.kernel != "native" else coef
                calls.append((c, x, r2[b0 : b0 + n], n, q))
        from napari_upsample_anything.core.fit import _fit_chunk

        def run():  # the native kernel gathers the coefficients and scatters their gradients itself
            for c, x, r2, n, q in calls:
                if self.kernel == "native":
                    _fit_chunk(self.prep, c, x, r2, n, want_grad, q, grad)
                else:
                    _fit_chunk(self.prep, c, x, r2, n)

        return run

    def update(self):
        """The parameter update of one step of the fit's loop (a zero gradient: the field stays)."""
        self.params.update(self.zero_grad, 0, 0.1)
        with torch.no_grad():
            self.raw.copy_(self.raw0)  # keep measuring the same field


class RenderCase:
    """One render of a C-channel map at ``size^2`` with a perturbed field, split into parts."""

    def __init__(self, size: int, patch: int, channels: int):
        guide = Guide(_guide(size))
        h = w = max(1, size // patch)
        self.engine = engine = BlockEngine(guide, (h, w), RenderOptions(), CPU)
        raw = KernelField.initial((h, w)).raw()
        self.field = KernelField.from_raw(raw + 0.2 * torch.randn(raw.shape, generator=torch.Generator().manual_seed(1)))
        self.values = torch.randn(channels, h, w, generator=torch.Generator().manual_seed(2))
        self.out = torch.empty(channels, size, size)
        self.channels = channels
        per_block = engine.bytes_per_block(channels, 4, training=False)
        self.tiles = engine.plan(per_block, 2**31, CPU_PREFERRED_TILE_BYTES)
        self.native = native.RenderWeights(engine) if native_usable(engine.device, engine.channels) else None
        self.fused = self.native is not None and channels <= native.FUSED_RENDER_MAX_CHANNELS
        kind = "native, fused products" if self.fused else "native weights" if self.native is not None else "eager weights"
        self.name = f"render {size}^2, C = {channels} ({kind})"
        self.size = size
        coef = kernel_coefficients(self.field).detach()
        sigma_eff = torch.maximum(self.field.sigma_x, self.field.sigma_y).detach()
        self.values_flat = self.values.permute(1, 2, 0).reshape(h * w, channels).contiguous()
        self.prepared = [self._prepare(coef, sigma_eff, t) for t in self.tiles]
        self.pairs = sum(p["phi"].shape[0] * p["phi"].shape[1] * p["psi"].shape[2] for p in self.prepared)
        self.workspace = engine.workspace()
        self.blocks = [torch.full((p["phi"].shape[0], channels, p["phi"].shape[1]), 0.5) for p in self.prepared]

    def _prepare(self, coef, sigma_eff, tile):
        eng = self.engine
        r2 = eng.radius_sq(sigma_eff, tile)
        k = eng.tile_k(r2)
        geometry = eng.neighbours(tile, k)
        q = geometry[0]
        if self.native is not None:  # as render_tile: the kernel's channels-first layout
            spatial, ic = eng.pixel_features_channels_first(tile)
            phi = spatial.transpose(1, 2)  # its shape is all render_blocks reads with a weights kernel
        else:
            phi = eng.pixel_features(tile)
            spatial = ic = None
        psi, rho, jd = eng.neighbour_features(coef, tile, geometry)
        vals = gather_values(self.values_flat, q)
        return dict(
            tile=tile, phi=phi, spatial=spatial, ic=ic, psi=psi, rho=rho, jd=jd, vals=vals, q=q,
            mask=eng.weights_mask(r2, geometry[3], k), r2=r2, repeated=geometry[3],
        )  # fmt: skip

    def full(self):
        render_field(self.engine, self.values, self.field, self.out, budget=2**31, backend="auto")  # as upa.render

    def prep(self):
        coef = kernel_coefficients(self.field).detach()
        sigma_eff = torch.maximum(self.field.sigma_x, self.field.sigma_y).detach()
        for t in self.tiles:
            self._prepare(coef, sigma_eff, t)

    def weights_and_products(self, with_products: bool):
        """The weights, and with ``with_products`` the products, as :meth:`.BlockEngine.render_tile`
        computes them: neighbour values gathered and products made chunk by chunk (the chunks'
        writing into the image is :meth:`write`)."""
        discard = lambda b0, b1, chunk: None  # noqa: E731
        ones_flat = self.values_flat[:, :1].contiguous()

        def run():
            for p in self.prepared:
                # without products: the same weights, aggregated into one channel only
                vals = (self.values_flat if with_products else ones_flat, p["q"])
                if self.native is None:  # eager log-weights and softmax
                    render_blocks(
                        p["phi"], p["psi"], p["rho"], p["jd"], vals, p["mask"], torch.float32, self.workspace, sink=discard
                    )
                    continue
                if with_products and self.fused:  # few channels: weights and products in the kernel
                    self.native.render(p["spatial"], p["ic"], p["psi"], p["rho"], p["jd"], p["vals"], p["r2"], p["repeated"])
                    continue
                nb, k = p["phi"].shape[0], p["psi"].shape[2]
                c = self.channels if with_products else 1
                cb = render_chunk_blocks(CPU, self.engine.P, k, c, nb, self.workspace.chunk_bytes)
                fn = self.native.bind(
                    p["spatial"], p["ic"], p["psi"], p["rho"], p["jd"], p["r2"], p["repeated"], self.workspace, cb
                )
                render_blocks(
                    p["phi"], p["psi"], p["rho"], p["jd"], vals, None, torch.float32, self.workspace, fn, cb, sink=discard
                )

        return run

    def write(self):
        for p, blocks in zip(self.prepared, self.blocks):
            self.engine.write_blocks(self.out, blocks, p["tile"])


def measure(args, threads: int, yard: Matmul, rows: list, log) -> None:
    torch.set_num_threads(threads)
    flops_fit = FLOPS["logit"] + FLOPS["exp"] + FLOPS["aggregate"] + FLOPS["gradient"]
    flops_fwd = FLOPS["logit"] + FLOPS["exp"] + FLOPS["aggregate"]
    for size in args.fit_sizes:
        case = FitCase(size, args.patch)
        case.step()  # warm: builds caches and the kernel's inputs
        fns = {"matmul": yard, "step": case.step, "update": case.update}
        if case.kernel == "native":
            fns["kernel"] = case.kernel_only(True)
            fns["forward"] = case.kernel_only(False)
        else:
            fns["kernel"] = case.kernel_only(True)
        t = fastest(fns, args.repeats)
        mm = t["matmul"]
        kernel = t["kernel"]
        forward = t.get("forward", float("nan"))
        step = t["step"] + t["update"]
        parts = (
            f"forward {forward * 1e3:.1f} ms, backward {(kernel - forward) * 1e3:.1f} ms, "
            f"other {(t['step'] - kernel) * 1e3:.1f} ms, update {t['update'] * 1e3:.2f} ms"
        )
        rows.append(
            dict(
                what=case.name,
                threads=threads,
                seconds=step,
                matmul_ratio=step / mm,
                pairs_per_s=case.pairs / step,
                exps_per_s=case.pairs / step,
                gflops=case.pairs * flops_fit / step / 1e9,
                kernel_gflops=case.pairs * flops_fit / kernel / 1e9,
                forward_gflops=case.pairs * flops_fwd / forward / 1e9 if forward == forward else float("nan"),
                matmul_gflops=yard.flops / mm / 1e9,
                parts=parts,
            )
        )
        log(rows[-1])
        del case
    for size, channels in zip(args.render_sizes, args.render_channels):
        case = RenderCase(size, args.patch, channels)
        case.full()
        fns = {
            "matmul": yard,
            "full": case.full,
            "prep": case.prep,
            "weights": case.weights_and_products(False),
            "weights+products": case.weights_and_products(True),
            "write": case.write,
        }
        t = fastest(fns, args.repeats)
        mm = t["matmul"]
        flops = case.pairs * (FLOPS["logit"] + FLOPS["exp"] + FLOPS["normalise"] + 2 * channels)
        if case.fused:  # "weights" alone would time the other kernel (weights written for a GEMM)
            middle = f"weights + products (fused) {t['weights+products'] * 1e3:.1f} ms"
        else:
            middle = f"weights {t['weights'] * 1e3:.1f} ms, products {(t['weights+products'] - t['weights']) * 1e3:.1f} ms"
        parts = f"prep {t['prep'] * 1e3:.1f} ms, {middle}, write {t['write'] * 1e3:.1f} ms"
        rows.append(
            dict(
                what=case.name,
                threads=threads,
                seconds=t["full"],
                matmul_ratio=t["full"] / mm,
                pairs_per_s=case.pairs / t["full"],
                exps_per_s=case.pairs / t["full"],
                gflops=flops / t["full"] / 1e9,
                kernel_gflops=float("nan"),
                forward_gflops=float("nan"),
                matmul_gflops=yard.flops / mm / 1e9,
                parts=parts,
            )
        )
        log(rows[-1])
        del case
    if args.upsample:
        guide_u8 = _guide(224)
        lr = np.random.default_rng(2).standard_normal((384, 16, 16)).astype(np.float32)
        upa.upsample(guide_u8, lr, device="cpu", threads=threads)
        t = fastest({"matmul": yard, "up": lambda: upa.upsample(guide_u8, lr, device="cpu", threads=threads)}, args.repeats)
        rows.append(
            dict(
                what="224^2 full upsample, C = 384, 51 steps + render",
                threads=threads,
                seconds=t["up"],
                matmul_ratio=t["up"] / t["matmul"],
                matmul_gflops=yard.flops / t["matmul"] / 1e9,
                parts="",
            )
        )
        log(rows[-1])


def table(rows, env: str, command: str, matmul: int = 2048) -> str:
    def f(v, fmt):
        return "" if v is None or v != v else format(v, fmt)

    lines = [
        "## Roofline: the CPU engine against a same-run matmul (`benchmarks/bench_roofline.py`)",
        "",
        f"Machine: {env}.",
        f"Command: `{command}`",
        "",
        f"Ratio = time / ({matmul}^2 float32 matmul, same process, same threads); fastest of the repeats,",
        "interleaved. GFLOP/s are nominal (bench_roofline.FLOPS): *kernel* counts the fit kernel's own time.",
        "",
        "| measurement | threads | ms | x matmul | pairs/s (= exps/s) | GFLOP/s | kernel GFLOP/s | matmul GFLOP/s | where the time goes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['what']} | {r['threads']} | {r['seconds'] * 1e3:.1f} | {r['matmul_ratio']:.3f} | "
            f"{f(r.get('pairs_per_s'), '.3g')} | {f(r.get('gflops'), '.1f')} | {f(r.get('kernel_gflops'), '.1f')} | "
            f"{r['matmul_gflops']:.1f} | {r['parts']} |"
        )
    return "\n".join(lines)


def markers(isa: str = "native") -> Tuple[str, str]:
    """The begin and end markers of the table for ``--isa``."""
    if isa == "native":
        return MARK_BEGIN, MARK_END
    return f"<!-- bench_roofline {isa}:begin -->", f"<!-- bench_roofline {isa}:end -->"


def write_section(path: Path, text: str, isa: str = "native") -> None:
    """Put ``text`` between the markers of ``path`` for ``isa`` (appended when absent), atomically."""
    write_marked_section(path, text, *markers(isa))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fit-sizes", type=int, nargs="+", default=[224, 448, 1024, 4096])
    ap.add_argument("--render-sizes", type=int, nargs="+", default=[224, 1024, 4096])
    ap.add_argument("--render-channels", type=int, nargs="+", default=[384, 64, 3])
    ap.add_argument("--patch", type=int, default=14)
    ap.add_argument("--threads", type=int, nargs="+", default=None, help="default: 1 and all cores")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--matmul", type=int, default=2048)
    ap.add_argument("--no-upsample", dest="upsample", action="store_false", help="skip the 224^2 full upsample row")
    ap.add_argument("--quick", action="store_true", help="small sizes, 2 repeats (for a test)")
    ap.add_argument("--out", type=Path, default=None, help="markdown file to put the table into (between markers)")
    ap.add_argument(
        "--isa",
        choices=("native", "avx2"),
        default="native",
        help="avx2: AVX2 code on an AVX-512 CPU (the kernel, torch and MKL; a child process)",
    )
    args = ap.parse_args(argv)
    argv = list(argv if argv is not None else sys.argv[1:])
    if args.isa == "avx2" and any(os.environ.get(k) != v for k, v in AVX2_ENV.items()):
        if "avx2" not in native._cpu_flags():
            ap.error("--isa avx2: this CPU has no AVX2")
        # torch picks its kernels when it is imported: only a new process can be told
        child = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv], env={**os.environ, **AVX2_ENV})
        return child.returncode
    if args.quick:
        args.fit_sizes, args.render_sizes, args.render_channels = [56, 112], [56], [8]
        args.repeats, args.matmul, args.upsample = 2, 256, False
    if len(args.render_channels) != len(args.render_sizes):
        ap.error("--render-channels needs one value per --render-sizes")
    threads = args.threads or sorted({1, os.cpu_count() or 1})
    load_before = _load()
    yard = Matmul(args.matmul)
    rows: list = []

    def log(row):
        print(
            f"{row['what']} [{row['threads']} thr]: {row['seconds'] * 1e3:.1f} ms = {row['matmul_ratio']:.3f}x matmul; {row['parts']}",
            flush=True,
        )

    previous = torch.get_num_threads()
    try:
        with flushed_denormals():  # as the engine's own calls run
            for n in threads:
                measure(args, n, yard, rows, log)
    finally:
        torch.set_num_threads(previous)
    emulated = "; AVX2 code on this CPU (--isa avx2: " + ", ".join(f"{k}={v}" for k, v in AVX2_ENV.items()) + ")"
    env = (
        f"{cpu_description()}{emulated if args.isa == 'avx2' else ''}; torch {torch.__version__} "
        f"({torch.backends.cpu.get_cpu_capability()} kernels); {datetime.date.today().isoformat()}; load average "
        f"(1/5/15 min) {load_before} before, {_load()} after"
    )
    command = "python benchmarks/bench_roofline.py " + " ".join(argv)
    text = table(rows, env, command.strip(), args.matmul)
    print(text)
    if args.out is not None:
        write_section(args.out, text, args.isa)
    return 0


if __name__ == "__main__":
    sys.exit(main())
