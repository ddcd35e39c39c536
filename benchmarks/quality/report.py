"""The pages: tables, the generated text, the figure (quality.md, quality_options.md, quality_crops.png).

Part of the quality benchmark; run it with ``python benchmarks/bench_quality.py`` (see there).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import REPO
from .config import (
    LABELS,
    METHODS,
    OPTION_BASELINES,
    OPTION_COUNT,
    OPTION_SKIP,
    OPTION_VARIANTS,
    Config,
)
from .metrics import boundaries, mean_of, select
from .scenes import lr_shape_for

# The interpretation of the numbers is written by hand, not generated: each page keeps blocks
# between `<!-- written: NAME -->` and `<!-- /written -->` verbatim from the page it replaces (or,
# when the page is written elsewhere, from the repository's docs/ copy), and regenerates the rest.
_WRITTEN = re.compile(r"<!-- written: (?P<name>[a-z0-9-]+) -->\n(?P<text>.*?)<!-- /written -->", re.S)
_NOT_WRITTEN = "*Not written yet: read the tables of this page and write what they show here.*\n"


def written_blocks(path: Path) -> Dict[str, str]:
    """The hand-written blocks of the page ``path``: the repository's docs/ copy, overridden by ``path``'s own."""
    blocks: Dict[str, str] = {}
    for source in (REPO / "docs" / path.name, path):
        if source.is_file():
            blocks.update((m["name"], m["text"]) for m in _WRITTEN.finditer(source.read_text()))
    return blocks


def written(blocks: Dict[str, str], name: str) -> str:
    """Block ``name`` with its markers (a placeholder if nobody has written it yet)."""
    return f"<!-- written: {name} -->\n{blocks.get(name, _NOT_WRITTEN)}<!-- /written -->"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary name next to ``path``, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


_REGENERATE = ("Rerun the script to update it; only the blocks marked `written` in the page source are edited by hand "
               "(the script keeps them).")  # fmt: skip


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
            b = max(
                mean_of(records, metric, method="bilinear", image=im, **sel),
                mean_of(records, metric, method="bicubic", image=im, **sel),
            )
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


def per_image_tables(
    records, cfg: Config, methods: Sequence[str] = METHODS, labels: Optional[Dict[str, str]] = None
) -> List[str]:
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
                unit = " / ".join(
                    {"psnr": "PSNR dB", "ssim": "SSIM", "miou": "mIoU %", "acc": "acc %", "bf1": "BF1 %"}[k] for k in metrics
                )
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
    blocks = written_blocks(path)
    L: List[str] = []
    a = L.append
    a("# Quality evaluation against baselines")
    a("")
    a(f"Generated by `python benchmarks/bench_quality.py{' --quick' if cfg.name == 'quick' else ''}` "
      f"({cfg.name} mode) in {res['wall_seconds'] / 60:.1f} min of wall time. " + _REGENERATE)  # fmt: skip
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
    a("### Reading the results")
    a("")
    a(written(blocks, "reading"))
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
    write_atomic(path, "\n".join(L) + "\n")


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
                    k = sum(
                        mean_of(rec, metric, method=v, image=im, **sel) >= _best_interp(rec, metric, image=im, **sel)
                        for im in images
                    )
                else:
                    d = mean_of(rec, metric, method=v, **sel) - mean_of(rec, metric, method=against, **sel)
                    k = sum(
                        mean_of(rec, metric, method=v, image=im, **sel) > mean_of(rec, metric, method=against, image=im, **sel)
                        for im in images
                    )
                row.append(f"{fmt_delta(metric, d)} ({k}/{len(images)})")
            rows.append(row)
    return md_table(["variant", "noise"] + [c[3] for c in SUMMARY_COLS], rows)


def options_loss_counts(res: dict) -> str:
    """Per variant and guide noise: how many (image, column) pairs of :data:`OPTION_COUNT` are below
    the better of bilinear and bicubic."""
    rec, cfg, lab, plan = res["records"], res["config"], res["labels"], res["plan"]
    scale = cfg.scales[0]
    titles = {(t, d, m): title for t, d, m, title in SUMMARY_COLS}

    def below(v, t, d, m, n):
        sel = dict(task=t, down=d, scale=scale, noise=n)
        ims = sorted({r["image"] for r in select(rec, method=v, **sel)})
        return sum(mean_of(rec, m, method=v, image=im, **sel) < _best_interp(rec, m, image=im, **sel) for im in ims), len(ims)

    rows = []
    for v in OPTION_VARIANTS:
        cells = []
        for n, variants in plan.items():
            if v in variants:
                lost, cases = zip(*(below(v, *c, n) for c in OPTION_COUNT))
                cells.append(f"{sum(lost)} / {sum(cases)}")
            else:
                cells.append("not run")
        rows.append([lab[v]] + cells)
    return ("Image x column pairs below the better of bilinear and bicubic, over the columns "
            f"{', '.join(titles[c] for c in OPTION_COUNT)} (fewer is better):\n\n"
            + md_table(["variant"] + [f"noise {n}" for n in plan], rows))  # fmt: skip


def write_options_markdown(path: Path, cfg: Config, res: dict) -> None:
    rec, jbu = res["records"], res["jbu"]
    lab, plan = res["labels"], res["plan"]
    quick = "quick" in cfg.name
    scale = cfg.scales[0]
    lr = lr_shape_for(cfg.size, scale)
    s = res["smoothing"]
    blocks = written_blocks(path)
    L: List[str] = []
    a = L.append
    a("# Engine options against GSJBU's measured losses")
    a("")
    a(f"Generated by `python benchmarks/bench_quality.py --options{' --quick' if quick else ''}` ({cfg.name} mode) in "
      f"{res['wall_seconds'] / 60:.1f} min of wall time. " + _REGENERATE)  # fmt: skip
    if quick:
        a("")
        a("> **Quick mode**: small images, few steps, few cases: a smoke test of the pipeline, not a result.")
    a("")
    a(written(blocks, "intro"))
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
    pub0 = [m["sigma_r_median"] for m in res["fit_meta"] if m["variant"] == "gsjbu" and m["noise"] == 0]
    a(f"- **Smoothing sigma**: {s:g} HR pixels, chosen before the run (the only value run). Median range sigma "
      f"(`field.sigma_r`) of the published fits on this run's clean guides: {float(np.median(pub0)) if pub0 else float('nan'):.3f}; "
      f"cell size {cfg.size[1] / lr[1]:.3g} px.")  # fmt: skip
    a("- **Tasks** as in quality.md: T1 self-reconstruction, T2 held-out channel (fit on the other two channels), T3 "
      "label maps (area-pooled one-hot labels, argmax), each on *bicubic LR* (non-antialiased, the published fit's "
      "own input) and *area LR* (cell averages, like ViT tokens); T3 is area only. PSNR / SSIM on [0, 1]; mIoU, "
      "pixel accuracy and boundary F1 at 2 px in percent. Higher is better everywhere.")  # fmt: skip
    fm = res["fit_meta"]
    chk = {v: sorted({(m["downsample"], m["normalize"]) for m in fm if m["variant"] == v}) for v in res["variants"]}
    a("- **Fits used the options**: every field's `meta` (downsample; guide normalisation) per variant: "
      + "; ".join(f"{lab[v]}: " + ", ".join(f"{d} / {nz}" for d, nz in c) for v, c in chk.items()) + ".")  # fmt: skip
    a("")
    a(written(blocks, "why-sigma"))
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
    a("## Reading the results")
    a("")
    a(written(blocks, "reading"))
    a("")
    a("## Where each variant still loses")
    a("")
    a(options_loss_counts(res))
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
    rows.append(
        [
            "whole run (wall)",
            f"{res['wall_seconds']:.1f}",
            "1",
            f"load average at start / end: {res['load'][0]} / {res['load'][1]}",
        ]
    )
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
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    tmp.replace(path)
    plt.close(fig)


def write_outputs(res: dict, out: Path) -> Dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    cfg = res["config"]
    if res.get("kind") == "options":
        md_path = out / "quality_options.md"
        write_options_markdown(md_path, cfg, res)
        return {"markdown": md_path}
    if res.get("kind") == "stochastic":
        from .stochastic import write_stochastic_markdown

        md_path = out / "quality_stochastic.md"
        write_stochastic_markdown(md_path, cfg, res)
        return {"markdown": md_path}
    fig_path = out / "quality_crops.png"
    write_figure(fig_path, cfg, res["figure"], res["records"])
    md_path = out / "quality.md"
    write_markdown(md_path, cfg, res)
    return {"markdown": md_path, "figure": fig_path}
