"""Engine benchmark: time and peak memory of fit and render, ours vs a dense published-style run.

    python benchmarks/bench_engine.py                      # CPU, 224 448 1024 2048, C=384
    python benchmarks/bench_engine.py --device cuda        # same on a GPU
    python benchmarks/bench_engine.py --sizes 224 --dense-sizes 224 --out docs/benchmarks.md

For each square size S the guide is scikit-image's astronaut resized to S x S, the LR map has
C random channels on the ViT patch grid (S // patch)^2, and the scale is S / (S // patch)
(non-integer for 1024 and 2048 with patch 14). Stages: ``fit`` (51 Adam steps, published
schedule) and ``render`` (C channels). Peak memory: on CPU the process's peak resident set
(VmHWM, reset before each stage through /proc/self/clear_refs) above the level before the
stage, so inputs loaded earlier are not counted but the output array is; on CUDA
``torch.cuda.max_memory_allocated``. The dense implementation (benchmarks/dense_published_style.py)
runs where its estimated memory fits. Prints a markdown table and writes it to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import napari_upsample_anything as upa  # noqa: E402
from napari_upsample_anything.core.units import format_bytes  # noqa: E402

# Measured for the published code on this project's 2-core CPU at 224x224, C=384 (issue #2):
# 8.6 GB peak; memory of the dense layout grows with H * W.
DENSE_BYTES_AT_224 = 8.6e9


class PeakMeter:
    """Peak memory of a stage: CUDA allocator statistics, or VmHWM on Linux."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = _status_kib("VmRSS:") * 1024

    def stop(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated() - self.base)
        return int(_status_kib("VmHWM:") * 1024 - self.base)


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _guide(size: int) -> np.ndarray:
    import skimage.data
    import skimage.transform

    img = skimage.transform.resize(skimage.data.astronaut(), (size, size), order=3, anti_aliasing=True)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _timed(device, fn):
    meter = PeakMeter(device)
    meter.start()
    t0 = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - t0, meter.stop()


def run_ours(size, channels, patch, steps, device, max_memory, backend="auto"):
    guide = _guide(size)
    h = w = size // patch
    lr_map = torch.randn(channels, h, w, generator=torch.Generator().manual_seed(0)).numpy()
    field, t_fit, m_fit = _timed(
        device, lambda: upa.fit_kernels(guide, (h, w), steps=steps, device=device, max_memory=max_memory, backend=backend)
    )
    out = np.empty((channels, size, size), np.float32)  # untouched until the render writes it
    _, t_render, m_render = _timed(
        device, lambda: upa.render(lr_map, guide, field, device=device, max_memory=max_memory, out=out, backend=backend)
    )
    return dict(
        size=size,
        lr=h,
        channels=channels,
        fit_s=t_fit,
        fit_peak=m_fit,
        render_s=t_render,
        render_peak=m_render,
        output_bytes=out.nbytes,
        psnr=field.meta.get("psnr"),
        final_loss=field.meta.get("final_loss"),
    ), (guide, lr_map, field, out)


def run_dense(size, channels, patch, steps, device, ours_state):
    from dense_published_style import dense_fit, dense_render

    guide_u8, lr_map, field, out_ours = ours_state
    guide = torch.from_numpy(guide_u8).permute(2, 0, 1).float().div(255).to(device)
    h = w = size // patch
    (raw, losses), t_fit, m_fit = _timed(device, lambda: dense_fit(guide, (h, w), steps=steps))
    f = upa.KernelField.from_raw(raw.cpu())
    with torch.no_grad():
        feats = torch.from_numpy(lr_map).to(device)
        maps = [m.to(device) for m in (f.sigma_x, f.sigma_y, f.theta, f.sigma_r)]
        hr, t_render, m_render = _timed(device, lambda: dense_render(feats, guide, *maps, n_chunk=49, c_chunk=128))
    # Same computation: our render of the dense fit's field against the dense render.
    ours_on_dense_field = upa.render(lr_map, guide_u8, f, device=device)
    diff = float(np.abs(ours_on_dense_field - hr.cpu().numpy()).max() / np.abs(hr.cpu().numpy()).max())
    loss_diff = max(abs(a / b - 1) for a, b in zip(losses, field.meta["loss_per_step"]))
    return dict(
        fit_s=t_fit, fit_peak=m_fit, render_s=t_render, render_peak=m_render, render_rel_diff=diff, loss_curve_rel_diff=loss_diff
    )


def environment(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    dev = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    )
    return f"{dev}; torch {torch.__version__}; Python {platform.python_version()}; {datetime.date.today().isoformat()}"


def table(rows) -> str:
    lines = [
        "| size | LR grid | C | stage | ours time | ours peak | dense time | dense peak | speed-up | output array |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d = r.get("dense")
        for stage in ("fit", "render", "total"):
            if stage == "total":
                t_o = r["fit_s"] + r["render_s"]
                p_o = max(r["fit_peak"], r["render_peak"])
                t_d = d and d["fit_s"] + d["render_s"]
                p_d = d and max(d["fit_peak"], d["render_peak"])
            else:
                t_o, p_o = r[f"{stage}_s"], r[f"{stage}_peak"]
                t_d, p_d = (d[f"{stage}_s"], d[f"{stage}_peak"]) if d else (None, None)
            dense_t = f"{t_d:.2f} s" if d else r.get("dense_note", "not run")
            dense_p = format_bytes(p_d) if d else ""
            speed = f"{t_d / t_o:.0f}x" if d else ""
            lines.append(
                f"| {r['size']}^2 | {r['lr']}^2 | {r['channels']} | {stage} | {t_o:.2f} s | {format_bytes(p_o)} | "
                f"{dense_t} | {dense_p} | {speed} | {format_bytes(r['output_bytes']) if stage != 'fit' else ''} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 448, 1024, 2048])
    ap.add_argument("--channels", type=int, default=384)
    ap.add_argument("--patch", type=int, default=14)
    ap.add_argument("--steps", type=int, default=51)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="auto", choices=["auto", "compiled", "eager"], help="engine path (docs/engine.md)")
    ap.add_argument("--max-memory", default=None, help="working-memory budget for ours (default: automatic)")
    ap.add_argument("--dense-sizes", type=int, nargs="*", default=[224], help="sizes at which to run the dense version")
    ap.add_argument("--out", default=None, help="markdown file to write (e.g. docs/benchmarks.md)")
    ap.add_argument("--json", default=None, help="also write the raw numbers as JSON")
    args = ap.parse_args(argv)

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    # Warm-up (library loading, first-call costs), not measured.
    upa.upsample(_guide(56), np.zeros((2, 4, 4), np.float32), steps=2, device=device)

    rows = []
    for size in args.sizes:
        row, state = run_ours(size, args.channels, args.patch, args.steps, device, args.max_memory, args.backend)
        print(
            f"ours {size}: fit {row['fit_s']:.2f} s / {format_bytes(row['fit_peak'])}, "
            f"render {row['render_s']:.2f} s / {format_bytes(row['render_peak'])}",
            flush=True,
        )
        if size in args.dense_sizes:
            if device.type == "cuda":
                free = torch.cuda.mem_get_info()[0]
            else:
                import psutil

                free = psutil.virtual_memory().available
            need = DENSE_BYTES_AT_224 * (size / 224) ** 2
            if need > 0.8 * free:
                row["dense_note"] = f"does not fit (needs ~{format_bytes(need)})"
            else:
                row["dense"] = run_dense(size, args.channels, args.patch, args.steps, device, state)
                d = row["dense"]
                print(
                    f"dense {size}: fit {d['fit_s']:.2f} s / {format_bytes(d['fit_peak'])}, render {d['render_s']:.2f} s / "
                    f"{format_bytes(d['render_peak'])}; render diff {d['render_rel_diff']:.1e}, loss-curve diff {d['loss_curve_rel_diff']:.1e}",
                    flush=True,
                )
        else:
            row["dense_note"] = "not run"
        del state
        gc.collect()
        rows.append(row)

    md = [
        f"Environment: {environment(device)}.",
        f"Command: `python benchmarks/bench_engine.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "",
        table(rows),
        "",
    ]
    for r in rows:
        if r.get("dense"):
            d = r["dense"]
            md.append(
                f"- {r['size']}^2: our render of the dense run's fitted field differs from the dense render by "
                f"{d['render_rel_diff']:.1e} (max abs / max abs); the two loss curves differ by at most "
                f"{100 * d['loss_curve_rel_diff']:.2f} % per step."
            )
        md.append(f"- {r['size']}^2: fit PSNR {r['psnr']:.2f} dB (reconstruction of the guide from its bicubic downsampling).")
    text = "\n".join(md)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
