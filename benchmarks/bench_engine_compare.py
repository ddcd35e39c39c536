"""Old vs new engine paths, interleaved in one process (issue #11's table).

    python benchmarks/bench_engine_compare.py --out docs/benchmarks_engine.md --json docs/benchmarks_engine.json

Measures, with the same inputs and alternating the paths so that machine load hits all alike:

* one fit step (loss + exact gradient over all tiles, no Adam) at 224^2 and 1024^2:
  ``old`` = the eager path as it was (range term recomputed every step), ``eager`` = with the
  guide-only range term cached, ``native`` = the fused C kernel (default on CPU),
  ``inductor`` = the same fused formulas through ``torch.compile``;
* render at 448^2, C = 384: ``old`` = ``[B, P, C]`` blocks + strided ``from_blocks`` copy (as it
  was), ``eager`` = channels-first blocks written straight into the output, ``compiled`` =
  compiled softmax weights + the same GEMM;
* a 224^2 full upsample (C = 384, 51 steps, default options) and the 4096^2 HR PCA
  (fit + 3-channel render + PCA; the 51-step fit is extrapolated from measured steps, and
  the table says so);
* PCA basis: scikit-learn full SVD (as it was) vs covariance ``eigh``;
* build / compile times (fresh caches), and 1 vs 2 threads.

Times are CPU seconds of this process (``time.process_time``: robust to other processes on
a shared machine; with several threads it sums them) and wall seconds; the medians of the
repeats are reported. The load average before and after is recorded.
"""

from __future__ import annotations

import os
import sys
import tempfile

if "--keep-caches" not in sys.argv:  # fresh compile caches, so that build times are real
    _tmp = tempfile.mkdtemp(prefix="bench_engine_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(_tmp, "inductor")
    os.environ["XDG_CACHE_HOME"] = os.path.join(_tmp, "xdg")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import napari_upsample_anything as upa  # noqa: E402
from napari_upsample_anything.core.engine import native  # noqa: E402
from napari_upsample_anything.core.engine.blocks import CPU_PREFERRED_TILE_BYTES, BlockEngine, RenderOptions, _write  # noqa: E402
from napari_upsample_anything.core.engine.eager import block_attention  # noqa: E402
from napari_upsample_anything.core.field import KernelField, kernel_coefficients  # noqa: E402
from napari_upsample_anything.core.fit import (  # noqa: E402
    _ChunkedFit,
    _loss_and_grad,
    _loss_and_grad_fused,
    _TileCache,
)
from napari_upsample_anything.core.guide import Guide  # noqa: E402
from napari_upsample_anything.core.render import bicubic_lr_guide, render_field  # noqa: E402
from napari_upsample_anything.core.threads import flushed_denormals  # noqa: E402

CPU = torch.device("cpu")


def _guide(size: int) -> np.ndarray:
    import skimage.data
    import skimage.transform

    img = skimage.transform.resize(skimage.data.astronaut(), (size, size), order=1, anti_aliasing=size < 512)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _clock(fn):
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c0, time.perf_counter() - w0


def _load() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


class FitStep:
    """One fit step (loss + gradient) on a fixed perturbed field, for one path."""

    def __init__(self, size: int, patch: int, path: str, budget: int = 2**31, flush: bool = False):
        self.flush = flush  # flush subnormals to zero, as the engine's own calls do
        guide = Guide(_guide(size))
        h = w = size // patch
        self.engine = engine = BlockEngine(guide, (h, w), RenderOptions(), CPU)
        values = bicubic_lr_guide(guide, (h, w), CPU)
        self.values = values.permute(1, 2, 0).reshape(h * w, -1).contiguous()
        self.per_block = engine.bytes_per_block(3, 4, training=True)
        self.tiles = engine.plan(self.per_block, budget // 2, CPU_PREFERRED_TILE_BYTES)
        self.n = 3 * size * size
        raw = KernelField.initial((h, w)).raw()
        self.raw0 = raw + 0.2 * torch.randn(raw.shape, generator=torch.Generator().manual_seed(0))
        self.path = path
        if path in ("native", "inductor"):
            self.cache = _ChunkedFit(engine, self.tiles, self.values, self.n, keep=True, compiled=True, kernel_name=path)
        else:
            self.cache = _TileCache(engine, True, keep_range=path == "eager")

    def __call__(self) -> float:
        if self.flush:
            with flushed_denormals():
                return self._step()
        return self._step()

    def _step(self) -> float:
        raw = self.raw0.clone().requires_grad_(True)
        if self.path in ("native", "inductor"):
            loss, _ = _loss_and_grad_fused(self.cache, self.tiles, raw, self.per_block, None, None)
        else:
            loss, _ = _loss_and_grad(self.engine, self.cache, self.tiles, raw, self.values, self.n, self.per_block, None, None)
        return loss


def old_render(engine: BlockEngine, values: torch.Tensor, field: KernelField, out: np.ndarray) -> None:
    """The render loop as it was before channels-first blocks: [B, P, C] + from_blocks + _write."""
    C = values.shape[0]
    h, w = engine.lr_shape
    values_flat = values.permute(1, 2, 0).reshape(h * w, C).contiguous()
    coef = kernel_coefficients(field).detach()
    sigma_eff = torch.maximum(field.sigma_x, field.sigma_y).detach()
    per_block = engine.bytes_per_block(C, 4, training=False)
    ws = engine.workspace()
    with torch.no_grad():
        for tile in engine.plan(per_block, 2**31, CPU_PREFERRED_TILE_BYTES):
            r2 = engine.radius_sq(sigma_eff, tile)
            k = engine.tile_k(r2)
            geometry = engine.neighbours(tile, k)
            phi = engine.pixel_features(tile)
            psi, rho, jd = engine.neighbour_features(coef, tile, geometry)
            mask = engine.weights_mask(r2, geometry[3], k)
            vals = values_flat.index_select(0, geometry[0].reshape(-1)).reshape(-1, k, C)
            blocks = block_attention(phi, psi, rho, jd, vals, mask, torch.float32, ws)
            _write(out, engine.from_blocks(blocks, tile), engine._hr_rect(tile))


def _pair(what: str, old: tuple, new: tuple) -> dict:
    """A table row from (CPU s, wall s) of the old and the new path."""
    return dict(what=what, old_cpu=old[0], old_wall=old[1], new_cpu=new[0], new_wall=new[1])


def interleaved(fns: dict, repeats: int) -> dict:
    """{name: (median cpu s, median wall s)} running the functions round-robin."""
    cpu = {k: [] for k in fns}
    wall = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _, c, w = _clock(fn)
            cpu[name].append(c)
            wall[name].append(w)
    return {k: (statistics.median(cpu[k]), statistics.median(wall[k])) for k in fns}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fit-sizes", type=int, nargs="+", default=[224, 1024])
    ap.add_argument("--render-size", type=int, default=448)
    ap.add_argument("--channels", type=int, default=384)
    ap.add_argument("--patch", type=int, default=14)
    ap.add_argument("--hr-pca-size", type=int, default=4096, help="0 skips the HR PCA row")
    ap.add_argument(
        "--hr-pca-steps",
        type=int,
        default=3,
        help="fit steps measured at that size; below 51 the 51-step total is extrapolated, 51 or more runs it end to end",
    )
    ap.add_argument(
        "--hr-pca-fit-fraction",
        type=float,
        default=1.0,
        help="fit_fraction of the HR PCA row's fit (default 1: the exact fit; below 1 the optional stochastic fit)",
    )
    ap.add_argument(
        "--parts",
        nargs="+",
        default=["build", "fit", "render", "upsample", "pca", "threads", "hrpca"],
        help="which rows to measure (default: all)",
    )
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for everything but the threads row")
    ap.add_argument("--keep-caches", action="store_true", help="reuse compile caches (build times then not measured)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, notes = [], []
    load_before = _load()
    log = lambda *a: print(*a, flush=True)  # noqa: E731

    parts = set(args.parts)
    hp = max(1, args.hr_pca_size // args.patch) if args.hr_pca_size else 146
    feats = np.random.default_rng(3).standard_normal((args.channels, hp, hp)).astype(np.float32)
    # ---------------------------------------------------------------- build / compile times
    _, c, w = _clock(native.available)
    rows.append(dict(what="native fit kernel: build (gcc, once per machine; cached)", new_cpu=c, new_wall=w))
    log(rows[-1])

    # ---------------------------------------------------------------- fit step
    for size in args.fit_sizes if "fit" in parts else []:
        paths = {p: FitStep(size, args.patch, p) for p in ("old", "eager", "native", "inductor")}
        # the old path as the engine runs it now (subnormals flushed): the fair baseline for the kernel
        paths["old+ftz"] = FitStep(size, args.patch, "old", flush=True)
        for p, f in paths.items():  # first calls: caches filled, kernels compiled
            _, c, w = _clock(f)
            if p == "inductor":
                rows.append(dict(what=f"inductor fit kernel: first step at {size}^2 (compile + run)", new_cpu=c, new_wall=w))
        losses = {p: f() for p, f in paths.items()}
        spread = max(abs(v / losses["old"] - 1) for v in losses.values())
        reps = args.repeats if size <= 512 else max(2, args.repeats // 2)
        t = interleaved(paths, reps)
        for p in ("eager", "native", "inductor"):
            rows.append(_pair(f"fit step {size}^2 ({size // args.patch}^2 LR): {p}", t["old"], t[p]))
        rows.append(
            _pair(
                f"fit step {size}^2 ({size // args.patch}^2 LR): native vs old with subnormals flushed", t["old+ftz"], t["native"]
            )
        )
        notes.append(f"fit step {size}^2: the four paths' losses agree within {spread:.1e} (relative)")
        log(rows[-4:])
        del paths

    S, C = args.render_size, args.channels
    if "render" in parts:
        render_rows(args, S, C, rows, notes, log)
    if "upsample" in parts:
        upsample_rows(args, C, rows, log)
    if "pca" in parts:
        pca_rows(args, C, feats, hp, rows, log)
    if "threads" in parts:
        thread_rows(args, rows, log)
    if "hrpca" in parts and args.hr_pca_size:
        hr_pca_rows(args, feats, hp, rows, log)
    finish(args, rows, notes, load_before, argv)
    return 0


def render_rows(args, S, C, rows, notes, log):
    # ---------------------------------------------------------------- render
    guide_u8 = _guide(S)
    h = S // args.patch
    gen = torch.Generator().manual_seed(1)
    lr = torch.randn(C, h, h, generator=gen)
    field = KernelField.initial((h, h))
    field = KernelField(field.sigma_x * 0.8, field.sigma_y * 1.2, field.theta + 0.3, field.sigma_r)
    engine = BlockEngine(Guide(guide_u8), (h, h), RenderOptions(), CPU)
    outs = {k: np.empty((C, S, S), np.float32) for k in ("old", "eager", "compiled")}
    fns = {
        "old": lambda: old_render(engine, lr, field, outs["old"]),
        "eager": lambda: render_field(engine, lr, field, outs["eager"], budget=2**31, backend="eager"),
        "compiled": lambda: render_field(engine, lr, field, outs["compiled"], budget=2**31, backend="compiled"),
    }
    _, c, w = _clock(fns["compiled"])
    rows.append(dict(what=f"compiled render weights: first render at {S}^2 (compile + run)", new_cpu=c, new_wall=w))
    t = interleaved(fns, max(2, args.repeats // 2))
    diff = max(float(np.abs(outs[k] - outs["old"]).max() / np.abs(outs["old"]).max()) for k in outs)
    for p in ("eager", "compiled"):
        rows.append(_pair(f"render {S}^2, C = {C}: {p}", t["old"], t[p]))
    notes.append(f"render {S}^2: outputs of the three paths agree within {diff:.1e} (max abs / max abs)")
    log(rows[-2:])


def upsample_rows(args, C, rows, log):
    # ---------------------------------------------------------------- 224^2 full upsample
    guide_u8 = _guide(224)
    lr = np.random.default_rng(2).standard_normal((C, 16, 16)).astype(np.float32)
    full = {
        "old": lambda: upa.upsample(guide_u8, lr, backend="eager", device="cpu"),
        "new": lambda: upa.upsample(guide_u8, lr, device="cpu"),
    }
    t = interleaved(full, 2)
    rows.append(_pair(f"224^2 full upsample, C = {C}, 51 steps (old = backend='eager')", t["old"], t["new"]))
    log(rows[-1])


def pca_rows(args, C, feats, hp, rows, log):
    # ---------------------------------------------------------------- PCA basis
    from sklearn.decomposition import PCA

    from napari_upsample_anything.core.pca import fit_pca

    x = feats.reshape(C, -1).T
    t = interleaved({"old": lambda: PCA(3, svd_solver="full").fit(x), "new": lambda: fit_pca(feats, 3, None)}, 2)
    rows.append(_pair(f"PCA basis of a {hp}^2 x {C} LR map: SVD (old) vs covariance eigh", t["old"], t["new"]))
    log(rows[-1])


def thread_rows(args, rows, log):
    # ---------------------------------------------------------------- threads
    step = FitStep(224, args.patch, "native")
    step_eager = FitStep(224, args.patch, "eager")
    step(), step_eager()

    def with_threads(n, fn):
        def run():
            torch.set_num_threads(n)
            try:
                return fn()
            finally:
                torch.set_num_threads(args.threads)

        return run

    t = interleaved(
        {
            "n1": with_threads(1, step),
            "n2": with_threads(2, step),
            "e1": with_threads(1, step_eager),
            "e2": with_threads(2, step_eager),
        },
        args.repeats,
    )
    rows.append(_pair("fit step 224^2 native: 1 thread (old) vs 2 threads (new)", t["n1"], t["n2"]))
    rows.append(_pair("fit step 224^2 eager: 1 thread (old) vs 2 threads (new)", t["e1"], t["e2"]))
    log(rows[-2:])
    del step, step_eager


def hr_pca_rows(args, feats, hp, rows, log):
    # ---------------------------------------------------------------- HR PCA at 4096^2
    S = args.hr_pca_size
    guide_u8 = _guide(S)
    budget = "4GB"  # room to keep the fit's guide-only kernel inputs across steps
    fraction = float(args.hr_pca_fit_fraction)
    if args.hr_pca_steps >= 51:  # measured end to end, nothing extrapolated
        field, cf, wf = _clock(
            lambda: upa.fit_kernels(
                guide_u8, (hp, hp), steps=args.hr_pca_steps, device="cpu", max_memory=budget, fit_fraction=fraction
            )
        )
        (rgb, _), c_r, w_r = _clock(lambda: upa.render_pca(feats, guide_u8, field, device="cpu", max_memory=budget))
        threads = torch.get_num_threads()
        kind = ", exact fit" if fraction == 1.0 else f", stochastic fit_fraction {fraction:g}"
        kind += f" (fit PSNR {field.meta['psnr']:.2f} dB)"
        rows.append(
            dict(
                what=f"{S}^2 HR PCA: fit, {args.hr_pca_steps} steps, {threads} thread(s){kind} (measured)",
                new_cpu=cf,
                new_wall=wf,
            )
        )
        rows.append(dict(what=f"{S}^2 HR PCA: 3-channel render + PCA, {threads} thread(s)", new_cpu=c_r, new_wall=w_r))
        rows.append(dict(what=f"{S}^2 HR PCA: total (measured)", new_cpu=cf + c_r, new_wall=wf + w_r))
        log(rows[-3:])
        return
    if fraction != 1.0:
        raise SystemExit("--hr-pca-fit-fraction below 1 needs --hr-pca-steps 51 or more (measured end to end)")
    n = max(2, args.hr_pca_steps)
    field, c1, w1 = _clock(lambda: upa.fit_kernels(guide_u8, (hp, hp), steps=1, device="cpu", max_memory=budget))
    field, cn, wn = _clock(lambda: upa.fit_kernels(guide_u8, (hp, hp), steps=n, device="cpu", max_memory=budget))
    step_cpu, step_wall = (cn - c1) / (n - 1), (wn - w1) / (n - 1)
    setup_cpu, setup_wall = c1 - step_cpu, w1 - step_wall  # guide, LR input, kernel inputs, final loss
    (rgb, _), c_r, w_r = _clock(lambda: upa.render_pca(feats, guide_u8, field, device="cpu", max_memory=budget))
    rows.append(dict(what=f"{S}^2 HR PCA: one fit step (from fits of 1 and {n} steps)", new_cpu=step_cpu, new_wall=step_wall))
    rows.append(dict(what=f"{S}^2 HR PCA: fit setup + final loss", new_cpu=setup_cpu, new_wall=setup_wall))
    rows.append(dict(what=f"{S}^2 HR PCA: 3-channel render + PCA", new_cpu=c_r, new_wall=w_r))
    rows.append(
        dict(
            what=f"{S}^2 HR PCA: total with 51 steps, EXTRAPOLATED (setup + 51 x step + render)",
            new_cpu=setup_cpu + 51 * step_cpu + c_r,
            new_wall=setup_wall + 51 * step_wall + w_r,
        )
    )
    log(rows[-4:])


def finish(args, rows, notes, load_before, argv):
    load_after = _load()
    env = (
        f"CPU: {_cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}, {args.threads} torch thread(s) unless noted; "
        f"Python {platform.python_version()}; {datetime.date.today().isoformat()}; load average (1/5/15 min) "
        f"{load_before} before, {load_after} after"
    )
    text = render_table(rows, notes, env, argv)
    print(text)
    if args.out:
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, args.out)
    if args.json:
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(dict(rows=rows, notes=notes, environment=env), indent=1))
        os.replace(tmp, args.json)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def render_table(rows, notes, env, argv) -> str:
    cmd = "python benchmarks/bench_engine_compare.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"Environment: {env}.",
        f"Command: `{cmd.strip()}`",
        "",
        "| measurement | old CPU s | old wall s | new CPU s | new wall s | speed-up (CPU) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        oc, ow = r.get("old_cpu"), r.get("old_wall")
        nc, nw = r["new_cpu"], r["new_wall"]
        f = lambda v: "" if v is None else f"{v:.3f}"  # noqa: E731
        speed = f"{oc / nc:.2f}x" if oc else ""
        lines.append(f"| {r['what']} | {f(oc)} | {f(ow)} | {f(nc)} | {f(nw)} | {speed} |")
    lines.append("")
    lines += [f"- {n}." for n in notes]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
