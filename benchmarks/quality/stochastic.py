"""The stochastic-fit study (``--stochastic``): ``fit_fraction < 1`` against the exact fit.

Quality: tasks 1-3 of quality.md at scale 16 on clean guides, for the exact (published) fit
and for fits whose every step uses a random fraction of the pixels (plus one variant that
spends the saved work on more steps). Speed: one exact and one stochastic fit per fraction on
a larger image, timed in this process with one torch thread. Writes ``quality_stochastic.md``.

Part of the quality benchmark; run it with ``python benchmarks/bench_quality.py --stochastic``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

import napari_upsample_anything as upa

from .baselines import Upsamplers, field_key, guide_arg, guide_axis, split_steps
from .config import Config
from .metrics import mean_of, select
from .report import (
    SUMMARY_COLS,
    _mark_best,
    fmt,
    fmt_delta,
    md_table,
    page_head,
    per_image_tables,
    write_tail,
    written,
    written_blocks,
)
from .run import Runner, fit_all, load_average, run_stamp
from .scenes import guides_for, load_scene, lr_shape_for

FRACTIONS = (0.5, 0.25, 0.1)
# One variant spends the work a fraction saves on more steps: 0.25 of the pixels for 4x the
# steps is about the exact fit's pixel work.
EQUAL_WORK = (0.25, 4)
BASELINES = ("bilinear", "bicubic")
SPEED_SIDE = {"full": 1024, "quick": 192}  # side of the square image of the speed table


def variants(steps: int) -> Dict[str, dict]:
    """GSJBU variant name -> ``fit_kernels`` options (``steps`` where it is not ``steps``)."""
    out: Dict[str, dict] = {"gsjbu": {}}
    for f in FRACTIONS:
        out[f"gsjbu-f{round(100 * f)}"] = {"fit_fraction": f}
    f, k = EQUAL_WORK
    out[f"gsjbu-f{round(100 * f)}-x{k}"] = {"fit_fraction": f, "steps": k * steps}
    return out


def labels(variant_options: Dict[str, dict], steps: int) -> Dict[str, str]:
    out = {"bilinear": "bilinear", "bicubic": "bicubic"}
    for v, o in variant_options.items():
        f = o.get("fit_fraction", 1.0)
        s = o.get("steps", steps)
        out[v] = f"GSJBU exact, {s} steps" if f == 1.0 else f"GSJBU {round(100 * f)} % pixels, {s} steps"
    return out


def run_stochastic(cfg: Config, args, log) -> dict:
    """Raw results of the study (no files written)."""
    t_start = time.perf_counter()
    load0 = load_average()
    scenes = [load_scene(n, cfg.size) for n in cfg.real + cfg.synthetic]
    scale = cfg.scales[-1]
    var = variants(cfg.steps)
    ups = Upsamplers((float("nan"), float("nan")), cfg.steps, args.device, var)
    runner = Runner(cfg, ups, log, BASELINES + tuple(var))
    jobs: Dict[str, List[tuple]] = {}
    for scene in scenes:
        lr = lr_shape_for(scene.image.shape[:2], scale)
        for gname, guide in guides_for(scene, 0).items():
            for opts in var.values():
                steps, fit_opts = split_steps(opts, cfg.steps)
                k = field_key((scene.name, 0, gname), lr, steps, fit_opts)
                jobs.setdefault(scene.name, []).append((k, guide, lr, steps, fit_opts))

    def evaluate(wait) -> None:
        for scene in scenes:
            runner.image_tasks(scene, scale, 0, BASELINES)
            for job in jobs[scene.name]:
                ups.fields[job[0]] = wait(job[0])
            runner.image_tasks(scene, scale, 0, tuple(var))
            r = select(runner.records, image=scene.name, task="T1", down="area")
            log(f"{scene.name:22s} T1 PSNR (area LR): " + ", ".join(f"{x['method']} {x['psnr']:.2f}" for x in r))

    all_jobs = [j for js in jobs.values() for j in js]
    log(f"stochastic study: fitting {len(all_jobs)} kernel fields with {args.workers} worker(s)")
    ups.fields.update(fit_all(all_jobs, args.workers, args.device, log, during=evaluate))
    fit_meta = [
        dict(image=k[0], guide=k[2], steps=int(f.meta["steps"]), fit_fraction=float(f.meta["fit_fraction"]),
             seconds=float(f.meta["seconds"]), fit_psnr=float(f.meta["psnr"]))
        for k, f in ups.fields.items()
    ]  # fmt: skip
    speed = speed_table(SPEED_SIDE["quick" if "quick" in cfg.name else "full"], cfg.steps, args.device, log)
    return {
        "kind": "stochastic",
        "config": cfg,
        "scale": scale,
        "records": runner.records,
        "variants": var,
        "labels": labels(var, cfg.steps),
        "fit_meta": fit_meta,
        "speed": speed,
        **run_stamp(args, load0, t_start),
    }


def speed_table(side: int, steps: int, device: str, log, rounds: int = 2) -> List[dict]:
    """Exact and stochastic fits of one ``side`` x ``side`` image at scale 16, in this process
    with one torch thread (after a small warm-up fit). The fractions take turns for ``rounds``
    rounds and each keeps its fastest time: this machine's speed drifts by 20 % between minutes."""
    image = load_scene("astronaut", (side, side)).image
    lr = lr_shape_for(image.shape[:2], 16)
    kw = dict(lr_shape=lr, steps=steps, device=device, channel_axis=guide_axis(image), threads=1)
    upa.fit_kernels(guide_arg(image)[:64, :64], lr_shape=(4, 4), steps=2, device=device, threads=1)  # builds, warms
    rows: Dict[float, dict] = {}
    for _ in range(rounds):
        for f in (1.0,) + FRACTIONS:
            t0 = time.perf_counter()
            field = upa.fit_kernels(guide_arg(image), fit_fraction=f, **kw)
            seconds = time.perf_counter() - t0
            log(f"speed {side}x{side}, fraction {f:g}: {seconds:.2f} s, fit PSNR {field.meta['psnr']:.2f} dB")
            row = rows.setdefault(f, dict(side=side, lr=list(lr), steps=steps, fit_fraction=f, runs=[],
                                          final_loss=float(field.meta["final_loss"]), psnr=float(field.meta["psnr"]),
                                          kernel=field.meta.get("kernel"), threads=torch.get_num_threads()))  # fmt: skip
            row["runs"].append(seconds)
            row["seconds"] = min(row["runs"])
    return list(rows.values())


def write_stochastic_markdown(path: Path, cfg: Config, res: dict) -> None:
    rec, lab, var, scale = res["records"], res["labels"], res["variants"], res["scale"]
    lr = lr_shape_for(cfg.size, scale)
    blocks = written_blocks(path)
    L: List[str] = page_head("Stochastic fit: speed and quality", " --stochastic", cfg, res)
    a = L.append
    a(
        "`fit_fraction` (API), `--fit-fraction` (CLI), *Pixels per step* (widget): every Adam step of the kernel fit "
        "uses a fresh random fraction of the LR cells' pixel blocks, drawn with a seeded generator, and scales their "
        "loss by n / k so that loss and gradient are unbiased estimates of the exact ones. The default, 1, is the exact "
        "published fit and is unchanged. The reported final loss and PSNR of a field are always exact."
    )
    a("")
    a(written(blocks, "reading"))
    a("")
    a("## Speed")
    a("")
    sp = res["speed"]
    exact = next(r for r in sp if r["fit_fraction"] == 1.0)
    a(f"One {sp[0]['side']} x {sp[0]['side']} image (astronaut, resized), scale 16 (LR {sp[0]['lr'][0]} x {sp[0]['lr'][1]}), "
      f"{sp[0]['steps']} steps, one torch thread, fit kernel `{exact['kernel']}`, fits run one after another in one "
      f"process, the fractions in turn, {len(exact['runs'])} rounds; fit s is each fraction's fastest run (all runs: "
      "last column). Fit PSNR: the exact reconstruction of the guide by its own fitted field (the fit's objective).")  # fmt: skip
    a("")
    rows = [[f"{r['fit_fraction']:g}", f"{r['seconds']:.2f}", f"{r['seconds'] / r['steps'] * 1000:.0f}",
             f"{exact['seconds'] / r['seconds']:.2f}x", f"{r['psnr']:.2f}", f"{r['psnr'] - exact['psnr']:+.2f}",
             ", ".join(f"{t:.2f}" for t in r["runs"])]
            for r in sp]  # fmt: skip
    a(md_table(["fit_fraction", "fit s", "ms / step", "speed-up", "fit PSNR dB", "vs exact dB", "runs s"], rows))
    a("")
    a("## Quality")
    a("")
    a(f"The {len(cfg.real) + len(cfg.synthetic)} images of quality.md ({cfg.size[0]} x {cfg.size[1]}), scale {scale} "
      f"(LR {lr[0]} x {lr[1]}), clean guides; tasks T1 (self-reconstruction), T2 (held-out channel) and T3 (label "
      "maps) as there. Seeds: the API default (0) for every fit.")  # fmt: skip
    a("")
    methods = BASELINES + tuple(var)
    rows = []
    for m in methods:
        row = [lab[m]]
        for task, down, metric, _ in SUMMARY_COLS:
            row.append(fmt(metric, mean_of(rec, metric, task=task, down=down, method=m, scale=scale, noise=0)))
        rows.append(row)
    a(md_table(["method"] + [c[3] for c in SUMMARY_COLS], _mark_best(rows)))
    a("")
    a("Mean difference to the exact fit (images where the variant is better, of all images):")
    a("")
    rows = []
    for v in var:
        if v == "gsjbu":
            continue
        row = [lab[v]]
        for task, down, metric, _ in SUMMARY_COLS:
            sel = dict(task=task, down=down, scale=scale, noise=0)
            images = sorted({r["image"] for r in select(rec, method=v, **sel)})
            d = mean_of(rec, metric, method=v, **sel) - mean_of(rec, metric, method="gsjbu", **sel)
            k = sum(mean_of(rec, metric, method=v, image=im, **sel) > mean_of(rec, metric, method="gsjbu", image=im, **sel)
                    for im in images)  # fmt: skip
            row.append(f"{fmt_delta(metric, d)} ({k}/{len(images)})")
        rows.append(row)
    a(md_table(["variant"] + [c[3] for c in SUMMARY_COLS], rows))
    a("")
    a(
        "Fit time of these fields (mean over all fits of the variant; the fits ran in "
        f"{res['workers']} worker process(es) with one torch thread each):"
    )
    a("")
    rows = []
    for v, o in var.items():
        steps, opts = split_steps(o, cfg.steps)
        f = opts.get("fit_fraction", 1.0)
        sel = [m for m in res["fit_meta"] if m["fit_fraction"] == f and m["steps"] == steps]
        rows.append([lab[v], str(len(sel)), f"{np.mean([m['seconds'] for m in sel]):.2f}",
                     f"{np.mean([m['fit_psnr'] for m in sel]):.2f}"])  # fmt: skip
    a(md_table(["variant", "fits", "mean fit s", "mean fit PSNR dB"], rows))
    a("")
    write_tail(path, L, per_image_tables(rec, cfg, methods, lab), res)
