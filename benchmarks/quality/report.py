"""The pages: tables, the generated text, the figure (quality.md, quality_options.md, quality_crops.png).

Part of the quality benchmark; run it with ``python benchmarks/bench_quality.py`` (see there).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .config import (
    LABELS,
    METHODS,
    OPTION_BASELINES,
    OPTION_COUNT,
    OPTION_FOCUS,
    OPTION_SKIP,
    OPTION_SMOOTHING,
    OPTION_VARIANTS,
    Config,
)
from .metrics import boundaries, mean_of, select
from .scenes import lr_shape_for


def md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def fmt(metric: str, v: float) -> str:
    if v != v:
        return "-"
    if metric in ("miou", "acc", "bf1"):
        return f"{100 * v:.2f}"
    if metric == "ssim":
        return f"{v:.4f}"
    return f"{v:.2f}"


# (task, down, metric, column title)
SUMMARY_COLS = [
    ("T1", "bicubic", "psnr", "T1 PSNR (bicubic LR)"),
    ("T1", "bicubic", "ssim", "T1 SSIM (bicubic LR)"),
    ("T1", "area", "psnr", "T1 PSNR (area LR)"),
    ("T1", "area", "ssim", "T1 SSIM (area LR)"),
    ("T2", "bicubic", "psnr", "T2 PSNR (bicubic LR)"),
    ("T2", "area", "psnr", "T2 PSNR (area LR)"),
    ("T3", "area", "miou", "T3 mIoU %"),
    ("T3", "area", "acc", "T3 acc %"),
    ("T3", "area", "bf1", "T3 BF1@2px %"),
]


def summary_table(records, scale, noise, methods: Sequence[str] = METHODS, labels: Optional[Dict[str, str]] = None) -> str:
    labels = LABELS if labels is None else labels
    rows = []
    for m in methods:
        row = [labels[m]]
        for task, down, metric, _ in SUMMARY_COLS:
            row.append(fmt(metric, mean_of(records, metric, task=task, down=down, method=m, scale=scale, noise=noise)))
        rows.append(row)
    return md_table(["method"] + [c[3] for c in SUMMARY_COLS], _mark_best(rows))


def _mark_best(rows):
    """Bold the best value of each column (higher is better everywhere)."""
    rows = [list(r) for r in rows]
    for j in range(1, len(rows[0])):
        vals = [float(r[j]) if r[j] != "-" else -1e9 for r in rows]
        best = max(vals)
        for r, v in zip(rows, vals):
            if v == best and r[j] != "-":
                r[j] = f"**{r[j]}**"
    return rows


def verdicts(records, cfg: Config, method: str = "gsjbu") -> Tuple[str, List[str]]:
    """Per condition: ``method``'s mean (default GSJBU) vs the better of bilinear / bicubic, and
    per-image losses."""
    rows, losses = [], []
    conds = []
    for noise in (0,) + tuple(cfg.noise):
        scales = cfg.scales if noise == 0 else cfg.noise_scales
        for scale in scales:
            for task, down, metric, title in SUMMARY_COLS:
                if metric in ("ssim", "acc") and noise:
                    continue
                conds.append((task, down, metric, title, scale, noise))
    for task, down, metric, title, scale, noise in conds:
        sel = dict(task=task, down=down, scale=scale, noise=noise)
        images = sorted({r["image"] for r in select(records, **sel)})
        if not images:
            continue
        ours = mean_of(records, metric, method=method, **sel)
        bl = mean_of(records, metric, method="bilinear", **sel)
        bc = mean_of(records, metric, method="bicubic", **sel)
        jb = mean_of(records, metric, method="jbu", **sel)
        lost = []
        for im in images:
            o = mean_of(records, metric, method=method, image=im, **sel)
            b = max(mean_of(records, metric, method="bilinear", image=im, **sel), mean_of(records, metric, method="bicubic", image=im, **sel))
            if o < b:
                lost.append(f"{im} ({fmt(metric, o)} vs {fmt(metric, b)})")
        best_interp = max(bl, bc)
        verdict = "tie" if abs(ours - best_interp) < 1e-12 else ("win" if ours > best_interp else "**loss**")
        rows.append([title, str(scale), str(noise), fmt(metric, ours), fmt(metric, best_interp),
                     f"{(100 if metric in ('miou', 'acc', 'bf1') else 1) * (ours - best_interp):+.{4 if metric == 'ssim' else 2}f}",
                     fmt(metric, jb), verdict, f"{len(images) - len(lost)}/{len(images)}"])  # fmt: skip
        if lost:
            losses.append(f"- {title}, scale {scale}, guide noise {noise}: " + "; ".join(lost))
    table = md_table(
        ["task / metric", "scale", "noise", "GSJBU", "best of bilinear/bicubic", "delta", "JBU", "mean", "images GSJBU >= both"],
        rows,
    )
    return table, losses


def per_image_tables(records, cfg: Config, methods: Sequence[str] = METHODS, labels: Optional[Dict[str, str]] = None) -> List[str]:
    labels = LABELS if labels is None else labels
    out = []
    for noise in (0,) + tuple(cfg.noise):
        scales = cfg.scales if noise == 0 else cfg.noise_scales
        for scale in scales:
            for task, down, metrics in (("T1", "bicubic", ("psnr", "ssim")), ("T1", "area", ("psnr", "ssim")),
                                        ("T2", "bicubic", ("psnr", "ssim")), ("T2", "area", ("psnr", "ssim")),
                                        ("T3", "area", ("miou", "acc", "bf1"))):  # fmt: skip
                sel = dict(task=task, down=down, scale=scale, noise=noise)
                recs = select(records, **sel)
                if not recs:
                    continue
                images = list(dict.fromkeys(r["image"] for r in recs))
                rows = []
                for im in images:
                    r0 = select(recs, image=im)[0]
                    name = im + (f" [{r0['channel']}]" if "channel" in r0 else "")
                    row = [name, r0["lr"]]
                    for m in methods:
                        row.append(" / ".join(fmt(k, mean_of(recs, k, image=im, method=m)) for k in metrics))
                    rows.append(row)
                what = {"T1": "self-reconstruction", "T2": "held-out channel", "T3": "label maps"}[task]
                unit = " / ".join({"psnr": "PSNR dB", "ssim": "SSIM", "miou": "mIoU %", "acc": "acc %", "bf1": "BF1 %"}[k] for k in metrics)
                out.append(f"#### {task} {what}, {down} LR, scale {scale}, guide noise {noise} ({unit})\n\n"
                           + md_table(["image", "LR", *[labels[m] for m in methods]], rows))  # fmt: skip
    return out


def robustness_table(records, cfg: Config) -> str:
    rows = []
    noises = (0,) + tuple(cfg.noise)
    for scale in cfg.noise_scales:
        for task, down, metric, title in SUMMARY_COLS:
            if metric in ("ssim", "acc"):
                continue
            for m in METHODS:
                vals = [mean_of(records, metric, task=task, down=down, method=m, scale=scale, noise=n) for n in noises]
                if all(v != v for v in vals):
                    continue
                rows.append([title, str(scale), LABELS[m]] + [fmt(metric, v) for v in vals])
    return md_table(["task / metric", "scale", "method"] + [f"noise {n}" for n in noises], rows)


def write_markdown(path: Path, cfg: Config, res: dict) -> None:
    rec = res["records"]
    jbu = res["jbu"]
    L: List[str] = []
    a = L.append
    a("# Quality evaluation against baselines")
    a("")
    a(f"Generated by `python benchmarks/bench_quality.py{' --quick' if cfg.name == 'quick' else ''}` "
      f"({cfg.name} mode) in {res['wall_seconds'] / 60:.1f} min of wall time. Do not edit by hand: rerun the script.")  # fmt: skip
    if cfg.name == "quick":
        a("")
        a("> **Quick mode**: small images, few steps, few cases: a smoke test of the pipeline, not a result.")
    a("")
    a("## Setup")
    a("")
    a(f"- **Images** ({cfg.size[0]} x {cfg.size[1]}, float in [0, 1]): scikit-image samples "
      f"{', '.join('`' + n + '`' for n in cfg.real)} (largest centred crop with the target aspect, "
      "antialiased resize; `retina`: its central 64 % first) and synthetic scenes "
      f"{', '.join('`' + n + '`' for n in cfg.synthetic)} with known label maps (5 classes; textured "
      "Voronoi cells of about 37 px, or random polygons, about a third of them thin slivers, on a textured "
      "background; two classes share almost the same colour and differ by texture; fixed seeds).")  # fmt: skip
    lrs = ", ".join(f"scale {s}: LR {lr_shape_for(cfg.size, s)[0]} x {lr_shape_for(cfg.size, s)[1]}"
                    f" (H/h = {cfg.size[0] / lr_shape_for(cfg.size, s)[0]:.3g}, W/w = {cfg.size[1] / lr_shape_for(cfg.size, s)[1]:.3g})"
                    for s in cfg.scales)  # fmt: skip
    a(f"- **Scales**: {lrs}.")
    a("- **Methods**: `nearest` (pixel-centre aligned, torch `nearest-exact`), `bilinear`, `bicubic` "
      "(torch `F.interpolate`, `align_corners=False`), `JBU (fixed)`: classic joint bilateral upsampling "
      "with one global spatial sigma (in LR cells) and one range sigma, window radius ceil(2 sigma_s) LR cells "
      f"(the grid's largest sigma_s, {max(cfg.jbu_sigma_s):g}, gives radius {int(math.ceil(2 * max(cfg.jbu_sigma_s)))}: GSJBU's R_max), "
      f"tuned once (grid below) and frozen at sigma_s = {jbu['best'][0]:g} LR cells, sigma_r = {jbu['best'][1]:g}; "
      f"`GSJBU (ours)`: `upa.fit_kernels(guide, lr_shape, steps={cfg.steps})` + `upa.render`, published "
      "settings (R_max 8, alpha 2, repeated border cells, radius in HR units, lr 0.1 with the published decay), "
      "the same for every image.")  # fmt: skip
    a("- **Task 1, self-reconstruction**: the image is downsampled to the LR grid and upsampled again, "
      "guided by the original. *bicubic LR* = `F.interpolate(bicubic, align_corners=False)` without "
      "antialias: exactly the LR input that GSJBU's test-time fit reconstructs, so this column is the "
      "paper's self-reconstruction protocol and GSJBU's own training objective (it is evaluated on the "
      "image it was fitted on). *area LR* = box average of each LR cell's footprint (like a patch token "
      "summarising its patch): the kernels were not fitted on it.")  # fmt: skip
    a("- **Task 2, held-out channel**: the guide is the image *without* one colour channel (the channel "
      "is listed per image); GSJBU fits its kernels on that two-channel guide, then upsamples the held-out "
      "channel's LR map. Nothing in the fit has seen that channel: a test of the kernels transferring to "
      "another signal, as they must for features.")  # fmt: skip
    a("- **Task 3, label maps** (synthetic scenes): one-hot labels are area-pooled to the LR grid "
      "(class fractions), upsampled by each method, and the argmax is scored: mIoU (classes present in "
      "truth or prediction), pixel accuracy, boundary F1 with 2 px tolerance (boundary pixels matched "
      "within a Euclidean distance of 2 px). GSJBU reuses the field fitted on the scene's RGB guide.")  # fmt: skip
    a(f"- **Task 4, robustness**: tasks 1-3 with Gaussian noise (sigma {', '.join(map(str, cfg.noise))} on the "
      f"0-255 scale, clipped) added to the guide only (at scale {', '.join(map(str, cfg.noise_scales))}); "
      "the LR map and the truth stay clean. GSJBU refits on the noisy guide. nearest / bilinear / bicubic "
      "ignore the guide, so their numbers do not change.")  # fmt: skip
    a(f"- **Task 5, steps**: GSJBU fitted with {', '.join(map(str, cfg.sweep_steps))} Adam steps "
      f"(published schedule) on {', '.join(cfg.sweep_images)} at scale {cfg.sweep_scale}.")  # fmt: skip
    a("- PSNR (`skimage.metrics.peak_signal_noise_ratio`, data range 1) and SSIM "
      "(`structural_similarity`, 7x7 window, per channel) on predictions clipped to [0, 1]; "
      "higher is better everywhere. Means are over all images of a task (real and synthetic).")  # fmt: skip
    a("- Real feature maps: `python benchmarks/bench_features.py --weights dinov2_vits14.pth` compares each "
      "method's 2x upsampling of DINOv2 ViT-S/14 features (224 px input) with the features at 448 px (cosine "
      "similarity, relative L2). It needs real weights, which this offline machine does not have, so it is not part "
      "of this page.")  # fmt: skip
    a("")
    a("## Same computation as the dense float64 reference")
    a("")
    a("GSJBU render of a fitted field against `tests/reference_gsjbu.py` (every pixel, all 289 "
      "offsets, float64, written from ALGORITHM.md), area-downsampled RGB image as the LR map:")  # fmt: skip
    a("")
    a(md_table(["image", "HR", "LR", "scale W/w", "channels", "max abs diff", "min fitted sigma_r", "ours (s)", "reference (s)"],
               [[r["image"], r["size"], r["lr"], f"{r['scale']:.3g}", r["channels"], f"{r['max_abs']:.2e}", f"{r['sigma_r_min']:.3g}",
                 f"{r['ours_s']:.3f}", f"{r['ref_s']:.2f}"] for r in res["reference"]]))  # fmt: skip
    a("")
    for s in cfg.scales:
        a(f"## Mean results, scale {s}, clean guide")
        a("")
        a(summary_table(rec, s, 0))
        a("")
    a("T1 = self-reconstruction (PSNR dB, SSIM), T2 = held-out channel (PSNR dB), T3 = label maps "
      "(percent). Best per column in bold.")  # fmt: skip
    a("")
    a("## Where GSJBU wins and loses (vs the better of bilinear and bicubic)")
    a("")
    table, losses = verdicts(rec, cfg)
    a(table)
    a("")
    if losses:
        a("Images on which GSJBU is below the better of bilinear and bicubic (GSJBU vs best of the two):")
        a("")
        L.extend(losses)
    else:
        a("GSJBU is at least as good as both bilinear and bicubic on every image of every task.")
    a("")
    a(discussion(res, cfg))
    a("")
    a("## Robustness to guide noise (task 4, means)")
    a("")
    a(robustness_table(rec, cfg))
    a("")
    a("## Optimisation steps (task 5): quality against fit time")
    a("")
    rows = []
    for r in res["steps"]:
        rows.append([r["image"], r["steps"], f"{r['seconds']:.1f}", f"{r['fit_psnr']:.2f}", f"{r['psnr_bicubic']:.2f}",
                     f"{r['psnr_area']:.2f}", fmt("miou", r.get("miou", float("nan"))), fmt("bf1", r.get("bf1", float("nan")))])  # fmt: skip
    a(md_table(["image", "steps", "fit (s)", "fit PSNR", "T1 PSNR bicubic LR", "T1 PSNR area LR", "T3 mIoU %", "T3 BF1 %"], rows))
    a("")
    a("Fit PSNR is the engine's own report (`field.meta['psnr']`, the bicubic-LR reconstruction). "
      "The published loop stops after 51 steps.")  # fmt: skip
    a("")
    a(f"## JBU grid search (synthetic scenes, mean T1 PSNR over both LR variants, scale {', '.join(map(str, cfg.jbu_scales))})")
    a("")
    grid = jbu["grid"]
    a(md_table(["sigma_s (LR cells) \\ sigma_r"] + [f"{v:g}" for v in cfg.jbu_sigma_r],
               [[f"{ss:g}"] + [f"{grid[i, j]:.2f}" for j in range(grid.shape[1])] for i, ss in enumerate(cfg.jbu_sigma_s)]))  # fmt: skip
    a("")
    a(f"Frozen: sigma_s = {jbu['best'][0]}, sigma_r = {jbu['best'][1]} (search took {jbu['seconds']:.1f} s). "
      "The tuning scenes are also test scenes of tasks 1-3, which favours JBU there.")  # fmt: skip
    a("")
    a("## Run time")
    a("")
    fits = res["fit_seconds"]
    main_fits = [s for k, s in fits if k[-1] == cfg.steps and k[-2] in [lr_shape_for(cfg.size, sc) for sc in cfg.scales]]
    threads = "1 torch thread per fit, " + (f"{res['workers']} fits side by side" if res["workers"] > 1 else "in-process")
    rows = [["GSJBU fit", f"{np.mean(main_fits):.2f}" if main_fits else "-", str(len(main_fits)),
             f"{cfg.size[0]}x{cfg.size[1]}, {cfg.steps} steps, 1-3 guide channels; {threads}"],
            ["all GSJBU fits (wall)", f"{res['fit_phase_seconds']:.1f}", str(len(fits)), "including the steps sweep"]]  # fmt: skip
    if res["workers"] <= 1:
        rows[0][3] = f"{cfg.size[0]}x{cfg.size[1]}, {cfg.steps} steps, 1-3 guide channels, in-process"
    for m in METHODS:
        s = res["seconds"][m]
        if s:
            rows.append([f"{LABELS[m]} upsample", f"{np.mean(s):.3f}", str(len(s)), "1-5 channels, render only"])
    a(md_table(["step", "mean seconds", "calls", "note"], rows))
    a("")
    a("## Figure")
    a("")
    a("![crops](quality_crops.png)")
    a("")
    a("`quality_crops.png`: crops (the window with the most edge energy in the truth, chosen "
      "automatically) of the truth, the LR input shown with nearest upsampling, bilinear, JBU and GSJBU, "
      "scale 16, clean guide; each panel's title gives the whole-image score.")  # fmt: skip
    a("")
    write_tail(path, L, per_image_tables(rec, cfg), res)


def write_tail(path: Path, L: List[str], tables: Sequence[str], res: dict) -> None:
    """Append a page's per-image tables and environment section to ``L`` and write the page."""
    L += ["## Per-image results", ""]
    for t in tables:
        L += [t, ""]
    L += ["## Environment", ""]
    L.append(md_table(["", ""], [[k, v] for k, v in res["env"].items()] + [
        ["wall time", f"{res['wall_seconds']:.0f} s ({res['wall_seconds'] / 60:.1f} min)"],
        ["load average at start / end", f"{res['load'][0]} / {res['load'][1]}"],
        ["command", "`" + " ".join(res["argv"]) + "`"],
    ]))  # fmt: skip
    L += ["", "Timings are wall-clock on a shared 2-core machine; the load average shows how much other work ran."]
    path.write_text("\n".join(L) + "\n")


def discussion(res: dict, cfg: Config) -> str:
    """The "reading the results" section: data-driven statements plus the causes found."""
    rec = res["records"]
    L: List[str] = ["### Reading the results", ""]
    best = lambda metric, **kw: max(mean_of(rec, metric, method="bilinear", **kw), mean_of(rec, metric, method="bicubic", **kw))  # noqa: E731
    clean_losses, jbu_ahead, gsjbu_ahead = [], [], []
    for scale in cfg.scales:
        for task, down, metric, title in SUMMARY_COLS:
            kw = dict(task=task, down=down, scale=scale, noise=0)
            ours = mean_of(rec, metric, method="gsjbu", **kw)
            if ours != ours:
                continue
            if ours < best(metric, **kw):
                clean_losses.append(f"{title} at scale {scale}")
            jb = mean_of(rec, metric, method="jbu", **kw)
            (jbu_ahead if jb > ours else gsjbu_ahead).append(f"{title} x{scale} ({fmt(metric, abs(jb - ours))})")
    if clean_losses:
        L.append("- **Clean guide, means**: GSJBU is below the better of bilinear and bicubic on " + "; ".join(clean_losses) + ".")
    else:
        L.append("- **Clean guide, means**: GSJBU beats both bilinear and bicubic on the mean of every task and "
                 "metric at both scales (tasks 1-3).")  # fmt: skip
    sc16 = cfg.scales[-1]
    cam = dict(task="T1", image="camera", scale=sc16, noise=0)
    cam_b = mean_of(rec, "psnr", method="gsjbu", down="bicubic", **cam)
    cam_a = mean_of(rec, "psnr", method="gsjbu", down="area", **cam)
    cam_j = mean_of(rec, "psnr", method="jbu", down="area", **cam)
    t1 = [mean_of(rec, "psnr", method="gsjbu", task="T1", down=d, scale=sc, noise=0) - best("psnr", task="T1", down=d, scale=sc, noise=0)
          for d in ("bicubic", "area") for sc in cfg.scales]  # fmt: skip
    L.append(f"- **Task 1 needs two readings.** On *bicubic LR* the margin (+{min(t1[:len(cfg.scales)]):.1f} to "
             f"+{max(t1[:len(cfg.scales)]):.1f} dB) is the fit's own objective, measured on the image it was fitted on: "
             "it shows the optimiser works (the paper reports 35.3 dB self-reconstruction on VOC), not that the "
             f"kernels generalise. On *area LR* the margin is +{min(t1[len(cfg.scales):]):.1f} to +{max(t1[len(cfg.scales):]):.1f} dB. "
             "The published fit reconstructs the guide from its *bicubic, non-antialiased* downsampling, which at "
             "scale 14-16 is nearly a point sample at each cell centre; the kernels learn to trust cells whose centre "
             "colour matches the pixel. An area-averaged map (and a ViT token, which summarises its whole patch) "
             "breaks that correspondence, most on grayscale guides with fine texture"
             + (f" (`camera` at scale {sc16}: {cam_b:.1f} dB on bicubic LR, {cam_a:.1f} dB on area LR, where JBU gets {cam_j:.1f} dB)"
                if cam_b == cam_b else "")
             + ". The engine option `upa.fit_kernels(..., downsample=\"area\")` fits on each cell's average "
             "instead; [quality_options.md](quality_options.md) measures what it gains on area LR and costs on "
             "bicubic LR, on every image and task.")  # fmt: skip
    if jbu_ahead:
        L.append("- **The tuned fixed JBU is a strong baseline.** With the grid's widest window (sigma_s = "
                 f"{res['jbu']['best'][0]:g} LR cells: the same 17 x 17-cell reach as GSJBU) and a sharp range sigma "
                 f"({res['jbu']['best'][1]:g}), it is ahead of GSJBU on these means (margin in dB or points): "
                 f"{', '.join(jbu_ahead)}. GSJBU is ahead on: {', '.join(gsjbu_ahead)}. Per-image kernels buy "
                 "little over one well-chosen global kernel on these images, except on the fit's own objective; JBU was "
                 "tuned on the synthetic scenes, which are also test scenes of task 3.")  # fmt: skip
    real_t2 = sorted({r["image"] for r in select(rec, task="T2", noise=0, method="gsjbu", kind="real")
                      if r["psnr"] < best("psnr", task="T2", down=r["down"], scale=r["scale"], noise=0, image=r["image"])})  # fmt: skip
    L.append("- **Held-out channel (task 2)**: GSJBU wins on the mean, and on every real photograph"
             + (f" except {', '.join(real_t2)} (a smooth image where bicubic is already above 30 dB; by up to 0.5 dB)" if real_t2 else "")
             + ". It loses to bilinear/bicubic on the synthetic `voronoi-*` scenes, by construction of those scenes: each "
             "cell's colour jitter is drawn independently per channel, so the two guide channels carry no information "
             "about the held-out channel's steps between cells of one class. The sharp range kernels then copy a wrong "
             "neighbour with confidence, which costs more than bilinear's blur. JBU fails there in the same way. Real "
             "colour channels are correlated, and there GSJBU transfers.")  # fmt: skip
    noisy = []
    for noise in cfg.noise:
        lost = []
        for task, down, metric, title in SUMMARY_COLS:
            if metric in ("ssim", "acc"):
                continue
            kw = dict(task=task, down=down, scale=cfg.noise_scales[0], noise=noise)
            o = mean_of(rec, metric, method="gsjbu", **kw)
            if o == o and o < best(metric, **kw):
                lost.append(title)
        noisy.append(f"sigma {noise}: " + (", ".join(lost) if lost else "none"))
    L.append("- **Guide noise (task 4) is where GSJBU loses**, as the paper's authors report (noise sigma 20). "
             "Means below the better of bilinear and bicubic at scale "
             f"{cfg.noise_scales[0]}: {'; '.join(noisy)}. JBU degrades about as fast. Cause: the range term compares each *pixel's* noisy colour with the cells' "
             "colours, so the noise picks the neighbour; label maps turn into speckle, and BF1 counts every speckle "
             "edge. The fit cannot learn to ignore the noise because its target is the same noisy guide, so matching "
             "noisy colours lowers its loss (spot check, `voronoi-1` at scale 16, sigma 20: the fitted median sigma_r "
             "moves only from 0.041 to 0.045; the field fitted on the noisy guide but rendered with the clean one gives "
             "98.2 % mIoU instead of 84.3 %). The engine option `guide_smoothing=sigma` (a Gaussian blur of the "
             "guide, sigma in HR pixels, given to `fit_kernels`; `render` reuses the field's) smooths the guide first; "
             f"[quality_options.md](quality_options.md) measures it at {OPTION_SMOOTHING:g} px, alone and with the area "
             "fit, on every image.")  # fmt: skip
    st = res["steps"]
    if st:
        by = {}
        for r in st:
            by.setdefault(r["image"], {})[r["steps"]] = r
        parts, less = [], []
        for im, d in by.items():
            if 51 in d and max(d) > 51:
                parts.append(f"`{im}` {d[51]['fit_psnr']:.2f} -> {d[max(d)]['fit_psnr']:.2f} dB fit PSNR, "
                             f"{d[51]['psnr_area']:.2f} -> {d[max(d)]['psnr_area']:.2f} dB on area LR")  # fmt: skip
            if 51 in d and 25 in d:
                less.append(d[51]["fit_psnr"] - d[25]["fit_psnr"])
        if parts:
            L.append(f"- **Steps (task 5)**: from 51 to {max(cfg.sweep_steps)} steps: " + "; ".join(parts)
                     + ". More steps improve the fit's own objective by under a dB and transfer little to maps the "
                     "kernels were not fitted on"
                     + (f"; 25 steps lose {min(less):.1f}-{max(less):.1f} dB of fit PSNR" if less else "")
                     + ". The published 51 steps is a sound default. (Fit times in that table are single-threaded, "
                     "two fits side by side on the machine's cores.)")  # fmt: skip
    L.append("- **The render is the published computation**: the dense float64 reference differs from ours by "
             f"{max(r['max_abs'] for r in res['reference']):.1e} at most (float32 round-off), with fitted range sigmas "
             "down to 0.007.")  # fmt: skip
    L.append("")
    L.append("The spot check quoted above was run separately with the same images and settings; it is not regenerated "
             "by this script. The engine options are measured by `python benchmarks/bench_quality.py --options`.")  # fmt: skip
    return "\n".join(L)


def _best_interp(rec, metric, **kw) -> float:
    return max(mean_of(rec, metric, method="bilinear", **kw), mean_of(rec, metric, method="bicubic", **kw))


def _pts(metric: str) -> float:
    return 100.0 if metric in ("miou", "acc", "bf1") else 1.0


def fmt_delta(metric: str, d: float) -> str:
    if d != d:
        return "-"
    return f"{_pts(metric) * d:+.{4 if metric == 'ssim' else 2}f}"


def options_delta_table(res: dict, against: str) -> str:
    """Mean difference of each GSJBU variant against ``against`` ("interp": the better of
    bilinear and bicubic, or a method name), per noise and summary column, with the number of
    images at least as good (``interp``) or strictly better (a method)."""
    rec, cfg, labels = res["records"], res["config"], res["labels"]
    scale = cfg.scales[0]
    rows = []
    for noise, variants in res["plan"].items():
        for v in variants:
            if v == against:
                continue
            row = [labels[v], str(noise)]
            for task, down, metric, _ in SUMMARY_COLS:
                sel = dict(task=task, down=down, scale=scale, noise=noise)
                images = sorted({r["image"] for r in select(rec, method=v, **sel)})
                if not images:
                    row.append("-")
                    continue
                if against == "interp":
                    d = mean_of(rec, metric, method=v, **sel) - _best_interp(rec, metric, **sel)
                    k = sum(mean_of(rec, metric, method=v, image=im, **sel) >= _best_interp(rec, metric, image=im, **sel) for im in images)
                else:
                    d = mean_of(rec, metric, method=v, **sel) - mean_of(rec, metric, method=against, **sel)
                    k = sum(mean_of(rec, metric, method=v, image=im, **sel) > mean_of(rec, metric, method=against, image=im, **sel) for im in images)
                row.append(f"{fmt_delta(metric, d)} ({k}/{len(images)})")
            rows.append(row)
    return md_table(["variant", "noise"] + [c[3] for c in SUMMARY_COLS], rows)


def options_sigma_text(res: dict) -> str:
    """Why the one smoothing sigma: residual noise against the fitted range sigmas, and blur
    against the cell size (numbers from this run's published fields)."""
    cfg, s = res["config"], res["smoothing"]
    # a 2D Gaussian of sigma s px scales white noise's std by 1 / (2 sqrt(pi) s)
    factor = 1.0 / (2.0 * math.sqrt(math.pi) * s)
    noise = max(cfg.noise)
    pub0 = [m["sigma_r_median"] for m in res["fit_meta"] if m["variant"] == "gsjbu" and m["noise"] == 0]
    cell = cfg.size[1] / lr_shape_for(cfg.size, cfg.scales[0])[1]
    med = float(np.median(pub0)) if pub0 else float("nan")
    return (f"**Why sigma {s:g} px** (chosen before the run, the only value run): a Gaussian of sigma s px scales white "
            f"noise's standard deviation by 1 / (2 sqrt(pi) s), {factor:.3f} at {s:g} px, so guide noise of sigma {noise} "
            f"(0-255) drops from {noise / 255:.3f} to {factor * noise / 255:.4f} in guide units; the published fits on the "
            f"clean guides of this run have a median range sigma (`field.sigma_r`) of {med:.3f}, so the residual noise no "
            f"longer decides which cell a pixel trusts (1.5 px would leave {noise / 255 / (2 * math.sqrt(math.pi) * 1.5):.4f}). "
            f"Its blur (about +-{2 * s:g} px across an edge) stays well inside a {cell:.3g} px cell. A spot check before "
            "the option existed (`voronoi-1`, sigma 20) recovered most of the label loss at 2 px.")  # fmt: skip


def options_discussion(res: dict) -> str:
    """The "reading the results" section of the options page, every number from ``res``."""
    rec, cfg, lab, plan = res["records"], res["config"], res["labels"], res["plan"]
    scale = cfg.scales[0]
    noisy = max(cfg.noise)
    titles = {(t, d, m): title for t, d, m, title in SUMMARY_COLS}
    M = lambda v, t, d, m, n: mean_of(rec, m, method=v, task=t, down=d, scale=scale, noise=n)  # noqa: E731
    B = lambda t, d, m, n: _best_interp(rec, m, task=t, down=d, scale=scale, noise=n)  # noqa: E731

    def unit(m):
        return " points" if m in ("miou", "acc", "bf1") else (" dB" if m == "psnr" else "")

    def change(v, t, d, m, n, ref="gsjbu"):
        a, b = M(ref, t, d, m, n), M(v, t, d, m, n)
        return f"{fmt(m, a)} -> {fmt(m, b)} ({fmt_delta(m, b - a)}{unit(m)})"

    def below(v, t, d, m, n):
        """Images on which variant v is below the better of bilinear and bicubic."""
        sel = dict(task=t, down=d, scale=scale, noise=n)
        ims = sorted({r["image"] for r in select(rec, method=v, **sel)})
        return [im for im in ims if mean_of(rec, m, method=v, image=im, **sel) < _best_interp(rec, m, image=im, **sel)], len(ims)

    def mean_losses(v, n):
        return [titles[c] for c in OPTION_FOCUS if M(v, *c, n) == M(v, *c, n) and M(v, *c, n) < B(*c, n)]

    L = ["## Reading the results", ""]
    # (a) the area fit on maps made by averaging, clean guide
    if "gsjbu-area" in plan.get(0, ()):
        lost_p, n_im = below("gsjbu", "T2", "area", "psnr", 0)
        lost_a, _ = below("gsjbu-area", "T2", "area", "psnr", 0)
        gain = M("gsjbu-area", "T2", "area", "psnr", 0) > M("gsjbu", "T2", "area", "psnr", 0)
        price = M("gsjbu-area", "T2", "bicubic", "psnr", 0) < M("gsjbu", "T2", "bicubic", "psnr", 0)
        if gain and price:
            verdict = ("So the fit's downsampling should match how the LR map was made: the area fit for maps made by "
                       "averaging (the closer model of a ViT token), the published fit for point-sampled (bicubic) maps.")  # fmt: skip
        elif gain:
            verdict = "The area fit is ahead on area LR without a loss on bicubic LR on these means."
        else:
            verdict = "On these means the area fit does not improve maps made by averaging."
        worse = [t for m, t in (("miou", "mIoU"), ("bf1", "BF1")) if M("gsjbu-area", "T3", "area", m, 0) < M("gsjbu", "T3", "area", m, 0)]
        if gain and worse:
            verdict += f" The label maps, though area-pooled, do not gain from it ({' and '.join(worse)} lower)."
        L.append(
            "- **Area fit, clean guide (maps made by averaging).** Held-out channel on area LR (the loss the option "
            f"targets): {change('gsjbu-area', 'T2', 'area', 'psnr', 0)} against {fmt('psnr', B('T2', 'area', 'psnr', 0))} dB "
            f"for the better of bilinear and bicubic; images below that: {len(lost_p)}/{n_im} published"
            + (f" ({', '.join(lost_p)})" if lost_p else "") + f", {len(lost_a)}/{n_im} with the area fit"
            + (f" ({', '.join(lost_a)})" if lost_a else "") + ". "
            f"Labels (area-pooled, so also averaged): mIoU {change('gsjbu-area', 'T3', 'area', 'miou', 0)}, BF1 "
            f"{change('gsjbu-area', 'T3', 'area', 'bf1', 0)}. Held-out channel on bicubic LR (point-sampled maps): "
            f"{change('gsjbu-area', 'T2', 'bicubic', 'psnr', 0)}. Self-reconstruction follows the objective (each "
            f"LR kind is one fit's own training input, so these are not transfer results): area LR "
            f"{change('gsjbu-area', 'T1', 'area', 'psnr', 0)}, bicubic LR {change('gsjbu-area', 'T1', 'bicubic', 'psnr', 0)}. "
            + verdict
        )  # fmt: skip
    # (b) smoothing on the noisy guides
    for nz in sorted(n for n in plan if n and "gsjbu-smooth" in plan[n]):
        parts = []
        for c in OPTION_FOCUS:
            parts.append(f"{titles[c]} {fmt(c[2], M('gsjbu', *c, nz))} -> {fmt(c[2], M('gsjbu-smooth', *c, nz))} "
                         f"(better of bilinear and bicubic: {fmt(c[2], B(*c, nz))})")  # fmt: skip
        left = {v: mean_losses(v, nz) for v in plan[nz]}
        L.append(
            f"- **Guide smoothing, guide noise {nz}.** Published -> smoothed {res['smoothing']:g} px: " + "; ".join(parts) + ". "
            f"Means of {', '.join(titles[c] for c in OPTION_FOCUS)} still below the better of bilinear and bicubic at "
            f"noise {nz}: " + "; ".join(f"{lab[v]}: {', '.join(x) if x else 'none'}" for v, x in left.items()) + "."
        )  # fmt: skip
    # (c) what smoothing costs on a clean guide
    if "gsjbu-smooth" in plan.get(0, ()):
        cost = [f"{titles[c]} {fmt_delta(c[2], M('gsjbu-smooth', *c, 0) - M('gsjbu', *c, 0))}" for c in OPTION_COUNT]
        clean_loss = mean_losses("gsjbu-smooth", 0)
        why = (" On bicubic LR the fit now rebuilds a blurred guide while the score is taken against the sharp image."
               if M("gsjbu-smooth", "T1", "bicubic", "psnr", 0) < M("gsjbu", "T1", "bicubic", "psnr", 0) else "")  # fmt: skip
        n_worse = sum(M("gsjbu-smooth", *c, 0) < M("gsjbu", *c, 0) for c in OPTION_COUNT)
        L.append(
            "- **Smoothing on a clean guide** (the cost when the guide was not noisy), smoothed minus published: "
            + ", ".join(cost) + " (dB or points)." + why + " Means of "
            + ", ".join(titles[c] for c in OPTION_FOCUS) + " below the better of bilinear and bicubic: "
            + (", ".join(clean_loss) if clean_loss else "none") + "."
            + (f" Worse than published on {n_worse} of these {len(OPTION_COUNT)} means: smoothing is a remedy for noisy "
               "guides, not a default." if 2 * n_worse > len(OPTION_COUNT) else "")
        )  # fmt: skip
    # (d) both options on the noisy guide
    if "gsjbu-area-smooth" in plan.get(noisy, ()):
        best_v = {}
        for c in OPTION_FOCUS:
            vals = {v: M(v, *c, noisy) for v in plan[noisy]}
            best_v[titles[c]] = max(vals, key=lambda v: vals[v])
        L.append(
            f"- **Both options, guide noise {noisy}**: area fit + smoothing vs smoothing alone: "
            + "; ".join(f"{titles[c]} {fmt_delta(c[2], M('gsjbu-area-smooth', *c, noisy) - M('gsjbu-smooth', *c, noisy))}" for c in OPTION_FOCUS)
            + f". Best GSJBU variant per column at noise {noisy}: "
            + "; ".join(f"{t}: {lab[v]}" for t, v in best_v.items()) + "."
        )  # fmt: skip
    # (e) the fixed JBU
    jbu_ahead = []
    for n, variants in plan.items():
        for c in OPTION_FOCUS:
            best_g = max(variants, key=lambda v: M(v, *c, n))
            if M("jbu", *c, n) > M(best_g, *c, n):
                jbu_ahead.append(f"{titles[c]} at noise {n} ({fmt(c[2], M('jbu', *c, n))} vs {fmt(c[2], M(best_g, *c, n))}, {lab[best_g]})")
    L.append("- **The tuned fixed JBU** is still ahead of the best GSJBU variant on: "
             + ("; ".join(jbu_ahead) if jbu_ahead else "none of these columns") + ".")  # fmt: skip
    # (f) per-image losses, all variants
    counts = []
    for n, variants in plan.items():
        per = []
        for v in variants:
            k = sum(len(below(v, *c, n)[0]) for c in OPTION_COUNT)
            per.append(f"{lab[v]} {k}")
        counts.append(f"noise {n}: " + ", ".join(per))
    n_cases = {n: sum(below("gsjbu", *c, n)[1] for c in OPTION_COUNT) for n in plan}
    L.append(f"- **Per-image losses** (image x column pairs below the better of bilinear and bicubic, over the "
             f"{', '.join(titles[c] for c in OPTION_COUNT)} columns; {n_cases[0]} pairs per noise level): "
             + "; ".join(counts) + ". The lists are below.")  # fmt: skip
    L.append("")
    L.append(f"Limits: one scale ({scale}), one smoothing sigma, guide noise {', '.join(map(str, plan))} only, and not every "
             "variant at every noise (see Setup); the JBU was tuned on the synthetic scenes, which are also test scenes here.")  # fmt: skip
    return "\n".join(L)


def write_options_markdown(path: Path, cfg: Config, res: dict) -> None:
    rec, jbu = res["records"], res["jbu"]
    lab, plan = res["labels"], res["plan"]
    quick = "quick" in cfg.name
    scale = cfg.scales[0]
    lr = lr_shape_for(cfg.size, scale)
    s = res["smoothing"]
    L: List[str] = []
    a = L.append
    a("# Engine options against GSJBU's measured losses")
    a("")
    a(f"Generated by `python benchmarks/bench_quality.py --options{' --quick' if quick else ''}` ({cfg.name} mode) in "
      f"{res['wall_seconds'] / 60:.1f} min of wall time. Do not edit by hand: rerun the script.")  # fmt: skip
    if quick:
        a("")
        a("> **Quick mode**: small images, few steps, few cases: a smoke test of the pipeline, not a result.")
    a("")
    a("[quality.md](quality.md) finds two conditions in which the published GSJBU loses to plain bicubic: maps made by "
      "*area averaging* (the published fit reconstructs the guide from its non-antialiased bicubic downsampling, "
      "close to a point sample of each cell), and *noisy guides* (the range term follows the noise). The engine has "
      "an option for each; this page measures both, alone and together, on the same images, tasks and metrics.")  # fmt: skip
    a("")
    a("## Setup")
    a("")
    a(f"- **Images** ({cfg.size[0]} x {cfg.size[1]}): the {len(cfg.real) + len(cfg.synthetic)} images of quality.md, "
      f"{', '.join('`' + n + '`' for n in cfg.real + cfg.synthetic)}.")  # fmt: skip
    nz = [str(n) for n in plan]
    a(f"- **Scale {scale}**: LR {lr[0]} x {lr[1]}. **Guide noise** {', '.join(nz[:-1])} and {nz[-1]} (sigma on the 0-255 "
      "scale, on the guide only, same seeds as quality.md); GSJBU refits on the noisy guide.")  # fmt: skip
    a(f"- **Methods**: `bilinear`, `bicubic`; `JBU (fixed)`: tuned by quality.md's grid search (rerun here), frozen at "
      f"sigma_s = {jbu['best'][0]:g} LR cells, sigma_r = {jbu['best'][1]:g}; and GSJBU, {cfg.steps} steps, in four "
      "variants:")  # fmt: skip
    a(f"  - `{lab['gsjbu']}`: `upa.fit_kernels(guide, lr_shape, steps={cfg.steps})` + `upa.render(lr_map, guide, field)` "
      "(refitted in this run, not copied from quality.md: its numbers can differ slightly from quality.md's when the "
      "two pages come from different engine revisions, float sums in another order amplified over the fit's steps);")  # fmt: skip
    a(f"  - `{lab['gsjbu-area']}`: `fit_kernels(..., downsample=\"area\")`: the fit's LR input is the average of each "
      "cell's pixels instead of the bicubic resize; render unchanged;")  # fmt: skip
    a(f"  - `{lab['gsjbu-smooth']}`: `fit_kernels(..., guide_smoothing={s:g})` and `render(..., guide_smoothing={s:g})`: "
      f"a Gaussian of sigma {s:g} HR pixels on the normalised guide before both (the field records it, and render reuses it);")  # fmt: skip
    a(f"  - `{lab['gsjbu-area-smooth']}`: both options.")
    skipped = [f"{lab[v]} at noise {n}" for v, n in OPTION_SKIP if n in plan]
    if skipped:
        a(f"- **Not run**, to keep the full run under 15 minutes on 2 CPU cores: {', '.join(skipped)}.")
    a("- " + options_sigma_text(res))
    a("- **Tasks** as in quality.md: T1 self-reconstruction, T2 held-out channel (fit on the other two channels), T3 "
      "label maps (area-pooled one-hot labels, argmax), each on *bicubic LR* (non-antialiased, the published fit's "
      "own input) and *area LR* (cell averages, like ViT tokens); T3 is area only. PSNR / SSIM on [0, 1]; mIoU, "
      "pixel accuracy and boundary F1 at 2 px in percent. Higher is better everywhere.")  # fmt: skip
    fm = res["fit_meta"]
    chk = {v: sorted({(m["downsample"], m["normalize"]) for m in fm if m["variant"] == v}) for v in res["variants"]}
    a("- **Fits used the options**: every field's `meta` (downsample; guide normalisation) per variant: "
      + "; ".join(f"{lab[v]}: " + ", ".join(f"{d} / {nz}" for d, nz in c) for v, c in chk.items()) + ".")  # fmt: skip
    a("")
    for n, variants in plan.items():
        a(f"## Mean results, scale {scale}, {'clean guide' if n == 0 else f'guide noise {n}'}")
        a("")
        a(summary_table(rec, scale, n, OPTION_BASELINES + variants, lab))
        a("")
    n_t2 = len({r["image"] for r in select(rec, task="T2")})
    a(f"Means over all images of a task (T2: the {n_t2} colour images; T3: the {len(cfg.synthetic)} synthetic scenes). "
      "Best per column in bold. T1 on a fit's own LR input (bicubic LR for the published fit, area LR for the area "
      "fit; the smoothed fits rebuild the smoothed guide) is that fit's training objective, evaluated on the image it "
      "was fitted on: it shows the optimiser works, not that the kernels transfer; T2 and T3 do.")  # fmt: skip
    a("")
    a("## Mean differences")
    a("")
    a("Against the better of bilinear and bicubic (the criterion of quality.md's losses); in brackets the images on "
      "which the variant is at least as good as both:")  # fmt: skip
    a("")
    a(options_delta_table(res, "interp"))
    a("")
    a("Against GSJBU published at the same noise; in brackets the images on which the variant is strictly better:")
    a("")
    a(options_delta_table(res, "gsjbu"))
    a("")
    a("PSNR in dB, SSIM in SSIM units, label metrics in percentage points.")
    a("")
    a(options_discussion(res))
    a("")
    a("## Where each variant still loses")
    a("")
    a("Images on which the variant is below the better of bilinear and bicubic (variant vs best of the two); "
      "SSIM and accuracy are left out at noise > 0, as in quality.md:")  # fmt: skip
    a("")
    for v in OPTION_VARIANTS:
        noises = [n for n, vs in plan.items() if v in vs]
        _, losses = verdicts([r for r in rec if r["noise"] in noises], cfg, method=v)
        a(f"### {lab[v]}")
        a("")
        if losses:
            L.extend(losses)
        else:
            a("At least as good as both on every image of every task.")
        a("")
    a("## Run time")
    a("")
    threads = "1 torch thread per fit, " + (f"{res['workers']} fits side by side" if res["workers"] > 1 else "in-process")
    rows = []
    for v in OPTION_VARIANTS:
        secs = [m["seconds"] for m in fm if m["variant"] == v]
        if secs:
            rows.append([f"fit, {lab[v]}", f"{np.mean(secs):.2f}", str(len(secs)),
                         f"{cfg.size[0]}x{cfg.size[1]}, {cfg.steps} steps, 1-3 guide channels; {threads}"])  # fmt: skip
    rows.append(["fits and renders (wall)", f"{res['fit_phase_seconds']:.1f}", str(len(fm)),
                 "the fits in the workers; JBU tuning, the baselines and each scene's renders in the main process "
                 "meanwhile (so fit times include that competition)"])  # fmt: skip
    for m in OPTION_BASELINES + tuple(OPTION_VARIANTS):
        sec = res["seconds"].get(m, [])
        if sec:
            rows.append([f"{lab[m]} upsample", f"{np.mean(sec):.3f}", str(len(sec)), "1-5 channels, render only"])
    rows.append(["whole run (wall)", f"{res['wall_seconds']:.1f}", "1", f"load average at start / end: {res['load'][0]} / {res['load'][1]}"])
    a(md_table(["step", "mean seconds", "calls", "note"], rows))
    a("")
    a(f"JBU grid search: {jbu['seconds']:.1f} s (while the fits ran).")
    a("")
    write_tail(path, L, per_image_tables(rec, cfg, OPTION_BASELINES + tuple(OPTION_VARIANTS), lab), res)


# ======================================================================================
# figure
# ======================================================================================
def best_window(truth: np.ndarray, crop: int) -> Tuple[int, int]:
    """Top-left corner of the ``crop`` window with the largest gradient energy of the truth."""
    t = truth.astype(np.float32)
    if t.ndim == 3:
        t = t.mean(2)
    gy, gx = np.gradient(t)
    e = np.hypot(gy, gx)
    ii = np.pad(e.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    H, W = e.shape
    c = min(crop, H, W)
    s = ii[c:, c:] - ii[:-c, c:] - ii[c:, :-c] + ii[:-c, :-c]
    y, x = np.unravel_index(int(np.argmax(s)), s.shape)
    return int(y), int(x)


def write_figure(path: Path, cfg: Config, figure: Dict[tuple, dict], records) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in cfg.figure_cases if c in figure]
    cols = ["truth", "LR input", "bilinear", "jbu", "gsjbu"]
    fig, axes = plt.subplots(len(cases), len(cols), figsize=(2.3 * len(cols), 2.5 * len(cases)), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for i, case in enumerate(cases):
        task, name, scale, down = case
        item = figure[case]
        truth = item["truth"]
        label_task = task == "T3"
        y, x = best_window(truth if not label_task else boundaries(truth).astype(np.float32), cfg.crop)
        c = min(cfg.crop, truth.shape[0], truth.shape[1])
        panels = [truth, item["lr"], item["preds"]["bilinear"], item["preds"]["jbu"], item["preds"]["gsjbu"]]
        for j, (col, img) in enumerate(zip(cols, panels)):
            ax = axes[i, j]
            crop = img[y : y + c, x : x + c]
            if label_task:
                ax.imshow(cmap(crop % 10)[..., :3], interpolation="nearest")
            elif crop.shape[-1] == 1:
                ax.imshow(np.clip(crop[..., 0], 0, 1), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            else:
                ax.imshow(np.clip(crop, 0, 1), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            title = {"truth": "truth", "LR input": "LR input"}.get(col, LABELS.get(col, col))
            if col in METHODS:
                metric = "miou" if label_task else "psnr"
                v = mean_of(records, metric, task=task, image=name, scale=scale, down=down, noise=0, method=col)
                title += f"\n{fmt(metric, v)}{' mIoU' if label_task else ' dB'}"
            ax.set_title(title, fontsize=8)
            if j == 0:
                what = {"T1": "self-rec.", "T2": f"held-out {item['channel']}", "T3": "labels"}[task]
                ax.set_ylabel(f"{name}\n{what}, x{scale}\n{down} LR", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(res: dict, out: Path) -> Dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    cfg = res["config"]
    if res.get("kind") == "options":
        md_path = out / "quality_options.md"
        write_options_markdown(md_path, cfg, res)
        return {"markdown": md_path}
    fig_path = out / "quality_crops.png"
    write_figure(fig_path, cfg, res["figure"], res["records"])
    md_path = out / "quality.md"
    write_markdown(md_path, cfg, res)
    return {"markdown": md_path, "figure": fig_path}
