"""The widget's cost estimate against the run it estimates: seconds and memory, five cases.

Question: when the main widget says "about 20 s, 700 MiB memory" before a run, how close is
that to the run? Each case runs in a fresh process (so the memory figure is that process's
own peak, VmHWM), on the CPU, with a randomly initialised ViT-S/14 (pretrained weights cannot
be downloaded here; the cost does not depend on the weights' values):

1. the backbone is built and warmed up on a small image (the estimate leaves model loading out:
   it happens once per session);
2. the run itself (:func:`widgets._pipeline.run_pipeline`, what the widget's Run starts),
   timed by the wall clock and in CPU seconds (``time.process_time``); memory = VmHWM at the
   end (reset just before the run) minus the resident size just before the run;
3. the quick measurement of this machine (:func:`widgets._estimate.measure_rates`) and the
   estimate for the case (:func:`widgets._estimate.estimate_run`), as the widget makes them.
   After the run, not before as in the widget: the heap the measurement leaves behind would
   serve the run, and its VmHWM would miss memory the run needs.

With one thread the estimate is CPU seconds times the slowdown measured with the rates
(wall / CPU seconds: the share of a core the process got). The table gives both ratios: the
wall-clock one (what a user sees, only meaningful on an idle machine) and measured CPU seconds
over the estimate's CPU seconds (the model itself; it holds on a loaded machine too).

Cases (issue #19): 512^2 RGB; 1411^2 RGB; a stack of 5 x 256^2 gray planes (all slices);
one 512^2 image of two channels; 512^2 RGB without HR features (PCA only). The published 51
fit steps unless ``--steps``. ``--quick`` shrinks every image 4x per side and uses 2 steps:
it proves the script works, its numbers mean nothing (the fixed costs dominate).

Timing is only meaningful on an otherwise idle machine.

Usage::

    python benchmarks/bench_estimate.py                  # full: writes docs/benchmarks_estimate.md
    python benchmarks/bench_estimate.py --quick --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

OUT = ROOT / "docs" / "benchmarks_estimate.md"

#: name -> (plane shape, number of planes, channels per plane ("rgb", 1 or C), HR features mode)
CASES = {
    "512^2 RGB": ((512, 512), 1, "rgb", "memory"),
    "1411^2 RGB": ((1411, 1411), 1, "rgb", "memory"),
    "5 x 256^2 stack": ((256, 256), 5, 1, "memory"),
    "512^2 two-channel": ((512, 512), 1, 2, "memory"),
    "512^2 RGB, HR features off": ((512, 512), 1, "rgb", "none"),
}


def _vm(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _image(shape, channels, seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    H, W = shape
    yy, xx = np.mgrid[0:H, 0:W]
    base = (np.sin(yy / 9.0) * np.cos(xx / 13.0) + 1) / 2
    if channels == "rgb":
        img = np.stack([base, base[::-1], rng.random((H, W))], -1)
        return (img * 255).astype(np.uint8)
    return np.stack([base + 0.1 * rng.random((H, W)) for _ in range(int(channels))], -1).astype(np.float32)


def child(args) -> dict:
    """One case in this (fresh) process; returns the row as a dict."""
    import torch

    from napari_upsample_anything.widgets._estimate import estimate_run, measure_rates
    from napari_upsample_anything.widgets._pipeline import AUTO_IN_MEMORY_BYTES, RunConfig, run_pipeline

    shape, n_planes, channels, hr = CASES[args.case]
    if args.quick:
        shape = (max(56, shape[0] // 4), max(56, shape[1] // 4))
    torch.set_num_threads(args.threads)
    config = RunConfig(steps=args.steps, device="cpu", precision="fp32", pretrained=False, hr_features=hr)
    channel_axis = None if channels in ("rgb", 1) else -1

    def planes(seed0):
        out = []
        for k in range(n_planes):
            img = _image(shape, channels, seed0 + k)
            out.append(((k,) if n_planes > 1 else (), img[..., 0] if channels == 1 else img))
        return out

    warm = [((), _image((112, 112), channels, 99)[..., 0] if channels == 1 else _image((112, 112), channels, 99))]
    run_pipeline(warm, RunConfig(steps=1, device="cpu", precision="fp32", pretrained=False), channel_axis=channel_axis)
    inputs = planes(0)
    stage_time: dict = {}  # CPU seconds per stage: from a stage's first progress event to the next stage's
    last = {"stage": None, "t": 0.0}

    def progress(event):
        now = time.process_time()
        if last["stage"] is not None:
            stage_time[last["stage"]] = stage_time.get(last["stage"], 0.0) + now - last["t"]
        last["stage"], last["t"] = event.stage, now

    # the high-water mark from here on (model loading, the rates and the warm-up are not the run's)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    rss0 = _vm("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    last["t"] = c0
    result = run_pipeline(inputs, config, channel_axis=channel_axis, progress=progress)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    if last["stage"] is not None:
        stage_time[last["stage"]] = stage_time.get(last["stage"], 0.0) + time.process_time() - last["t"]
    peak = _vm("VmHWM") - rss0
    del result
    # the rates after the run: what they allocate would otherwise sit in the heap and serve the
    # run (its VmHWM would then miss the memory it needs)
    t0 = time.perf_counter()
    rates = measure_rates("cpu", "fp32", args.threads)
    measure_s = time.perf_counter() - t0
    est = estimate_run(
        rates,
        shape,
        n_planes=n_planes,
        backbone=config.backbone,
        steps=config.steps,
        hr_features=hr,
        auto_in_memory_bytes=AUTO_IN_MEMORY_BYTES,
        threads=args.threads,
    )
    return {
        "case": args.case,
        "shape": list(shape),
        "planes": n_planes,
        "est_seconds": est.total_seconds,
        "est_stages": est.seconds,
        "stages": stage_time,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "slowdown": est.slowdown,
        "est_bytes": est.peak_bytes,
        "bytes": peak,
        "measure_s": measure_s,
    }


def _cpu_ratio(row: dict) -> float:
    """Measured CPU seconds over the estimate's CPU seconds (the estimate without the slowdown)."""
    est_cpu = row["est_seconds"] / max(row["slowdown"], 1e-9)
    return row["cpu_seconds"] / est_cpu if est_cpu > 0 else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="images 4x smaller per side, 2 steps: proves the script runs")
    p.add_argument("--steps", type=int, default=None, help="fit steps (default: published 51; 2 with --quick)")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    p.add_argument("--cases", nargs="*", default=list(CASES), help="a subset of the case names")
    p.add_argument("--no-write", action="store_true", help="print only (--quick never writes)")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = p.parse_args()
    if args.steps is None:
        from napari_upsample_anything.core.published import PUBLISHED_STEPS

        args.steps = 2 if args.quick else PUBLISHED_STEPS
    if args.case:
        print("ROW " + json.dumps(child(args)), flush=True)
        return
    from napari_upsample_anything.widgets._estimate import format_seconds

    rows = []
    for name in args.cases:
        cmd = [sys.executable, __file__, "--case", name, "--steps", str(args.steps), "--threads", str(args.threads)]
        if args.quick:
            cmd.append("--quick")
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1")
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("ROW ")), None)
        if line is None:
            sys.exit(f"case {name!r} failed:\n{out.stderr[-3000:]}")
        row = json.loads(line[4:])
        rows.append(row)
        print(
            f"{name:28s} estimate {row['est_seconds']:8.2f} s  measured {row['seconds']:8.2f} s  "
            f"x{row['seconds'] / row['est_seconds']:.2f}  CPU x{_cpu_ratio(row):.2f}   "
            f"memory est {row['est_bytes'] / 2**20:7.0f} MiB  "
            f"measured {row['bytes'] / 2**20:7.0f} MiB",
            flush=True,
        )

    def ratio(a, b):
        return f"{a / b:.2f}" if b > 0 else "-"

    lines = [
        "# The widget's cost estimate against the run",
        "",
        "Written by `python benchmarks/bench_estimate.py` (see its docstring). CPU, "
        f"{args.threads} thread(s), random-init ViT-S/14, {args.steps} fit steps; one fresh process per case; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}."
        + (" **Quick mode: images 4x smaller per side; the numbers mean nothing.**" if args.quick else ""),
        "",
        "Time: the run without model loading (as the estimate). Memory: VmHWM at the end of the run (reset just before it) minus "
        "the resident size before it (the estimate: engine working memory + the arrays the run keeps). "
        "Ratio = measured / estimated; the goal is 0.77 .. 1.3 (within 30 %). CPU ratio: the run's CPU seconds "
        "over the estimate's (the estimate divided by the slowdown measured with the rates; with one thread).",
        "",
        "| case | HR pixels x planes | estimated | measured | ratio | CPU ratio | slowdown | memory estimated "
        "| memory measured | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['shape'][0]} x {r['shape'][1]} x {r['planes']} | {format_seconds(r['est_seconds'])} | "
            f"{format_seconds(r['seconds'])} | {ratio(r['seconds'], r['est_seconds'])} | {_cpu_ratio(r):.2f} | "
            f"{r['slowdown']:.2f} | {r['est_bytes'] / 2**20:.0f} MiB | "
            f"{r['bytes'] / 2**20:.0f} MiB | {ratio(r['bytes'], r['est_bytes'])} |"
        )
    lines += [
        "",
        "Seconds per stage, estimated / measured CPU seconds (estimated: without the slowdown; measured: between "
        "the stages' first progress events, so the first fit step counts as features):",
        "",
    ]
    for r in rows:
        names = list(dict.fromkeys(list(r["est_stages"]) + list(r["stages"])))
        slow = max(r["slowdown"], 1e-9)
        stages = ", ".join(f"{k} {r['est_stages'].get(k, 0.0) / slow:.2f} / {r['stages'].get(k, 0.0):.2f}" for k in names)
        lines.append(f"- {r['case']}: {stages} (the machine was measured in {r['measure_s']:.1f} s)")
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    if not args.quick and not args.no_write:
        tmp = OUT.with_suffix(".md.tmp")
        tmp.write_text(text)
        tmp.replace(OUT)
        print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
