"""The tasks, the fits, the JBU grid search, the reference check and the two runs (main, options).

Part of the quality benchmark; run it with ``python benchmarks/bench_quality.py`` (see there).
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

import napari_upsample_anything as upa

from . import REPO
from .baselines import Upsamplers, chw, downsample, field_key, guide_arg, guide_axis, interp_up, jbu_upsample
from .config import (
    CHANNEL_NAMES,
    METHODS,
    OPTION_BASELINES,
    OPTION_LABELS,
    OPTION_SMOOTHING,
    OPTION_VARIANTS,
    Config,
    option_plan,
    variant_of,
)
from .metrics import label_metrics, psnr, select, ssim
from .scenes import Scene, crop_scene, guides_for, held_out_channel, load_scene, lr_shape_for


# ======================================================================================
# the tasks
# ======================================================================================
class Runner:
    def __init__(self, cfg: Config, ups: Upsamplers, log: Callable[[str], None], methods: Sequence[str] = METHODS):
        self.cfg = cfg
        self.ups = ups
        self.log = log
        self.methods = tuple(methods)
        self.records: List[dict] = []
        self.figure: Dict[tuple, dict] = {}

    def _keep_for_figure(self, task, scene, scale, noise, down, truth, preds, lr_up, channel=None):
        key = (task, scene.name, scale, down)
        if noise == 0 and key in set(self.cfg.figure_cases):
            self.figure[key] = {"truth": truth, "preds": preds, "lr": lr_up, "channel": channel}

    def image_tasks(self, scene: Scene, scale: int, noise: int, methods: Optional[Sequence[str]] = None) -> None:
        """Tasks 1 and 2 (and 3 for synthetic scenes) for one scene, scale and guide noise
        (``methods``: default the runner's)."""
        ups = self.ups
        methods = self.methods if methods is None else tuple(methods)
        H, W = scene.image.shape[:2]
        lr = lr_shape_for((H, W), scale)
        guides = guides_for(scene, noise)
        guide = guides["all"]
        base = dict(image=scene.name, kind=scene.kind, scale=scale, noise=noise, lr=f"{lr[0]}x{lr[1]}")
        truth_chw = chw(scene.image)
        key = (scene.name, noise, "all")
        # ---- task 1: self-reconstruction
        for down in ("bicubic", "area"):
            lr_map = downsample(truth_chw, lr, down)
            preds = {}
            for m in methods:
                pred = ups.run(m, lr_map, guide, key).transpose(1, 2, 0)
                preds[m] = pred
                self.records.append(
                    dict(base, task="T1", down=down, method=m, psnr=psnr(scene.image, pred), ssim=ssim(scene.image, pred))
                )
            self._keep_for_figure(
                "T1",
                scene,
                scale,
                noise,
                down,
                scene.image,
                preds,
                interp_up(lr_map, (H, W), "nearest").numpy().transpose(1, 2, 0),
            )
        # ---- task 2: held-out channel
        if scene.channels == 3:
            c = held_out_channel(scene.name)
            key2 = (scene.name, noise, f"without-{CHANNEL_NAMES[c]}")
            guide2 = guides[key2[2]]
            truth = scene.image[:, :, c : c + 1]
            for down in ("bicubic", "area"):
                lr_map = downsample(truth_chw[c : c + 1], lr, down)
                preds = {}
                for m in methods:
                    pred = ups.run(m, lr_map, guide2, key2).transpose(1, 2, 0)
                    preds[m] = pred
                    self.records.append(
                        dict(
                            base,
                            task="T2",
                            down=down,
                            method=m,
                            channel=CHANNEL_NAMES[c],
                            psnr=psnr(truth, pred),
                            ssim=ssim(truth, pred),
                        )
                    )
                self._keep_for_figure(
                    "T2",
                    scene,
                    scale,
                    noise,
                    down,
                    truth,
                    preds,
                    interp_up(lr_map, (H, W), "nearest").numpy().transpose(1, 2, 0),
                    CHANNEL_NAMES[c],
                )
        # ---- task 3: label maps
        if scene.labels is not None:
            onehot = F.one_hot(torch.from_numpy(scene.labels), scene.n_classes).permute(2, 0, 1).float()
            probs = F.interpolate(onehot[None], size=lr, mode="area")[0]
            preds = {}
            for m in methods:
                out = ups.run(m, probs, guide, key)
                pred = out.argmax(0)
                preds[m] = pred
                self.records.append(
                    dict(base, task="T3", down="area", method=m, **label_metrics(scene.labels, pred, scene.n_classes))
                )
            lr_up = interp_up(probs, (H, W), "nearest").numpy().argmax(0)
            self._keep_for_figure("T3", scene, scale, noise, "area", scene.labels, preds, lr_up)

    def steps_sweep(self, scene: Scene) -> List[dict]:
        cfg, ups = self.cfg, self.ups
        H, W = scene.image.shape[:2]
        lr = lr_shape_for((H, W), cfg.sweep_scale)
        truth_chw = chw(scene.image)
        key = (scene.name, 0, "all")
        rows = []
        for steps in cfg.sweep_steps:
            f = ups.field(key, scene.image, lr, steps)
            row = dict(image=scene.name, steps=steps, seconds=float(f.meta["seconds"]), fit_psnr=float(f.meta["psnr"]))
            for down in ("bicubic", "area"):
                pred = ups.run("gsjbu", downsample(truth_chw, lr, down), scene.image, key, steps).transpose(1, 2, 0)
                row[f"psnr_{down}"] = psnr(scene.image, pred)
            if scene.labels is not None:
                onehot = F.one_hot(torch.from_numpy(scene.labels), scene.n_classes).permute(2, 0, 1).float()
                probs = F.interpolate(onehot[None], size=lr, mode="area")[0]
                pred = ups.run("gsjbu", probs, scene.image, key, steps).argmax(0)
                row.update(label_metrics(scene.labels, pred, scene.n_classes))
            rows.append(row)
            self.log(
                f"  steps {steps:4d}: fit {row['seconds']:.1f} s, T1 PSNR {row['psnr_bicubic']:.2f} / {row['psnr_area']:.2f} dB"
            )
        return rows


def plan_fits(cfg: Config, scenes: Sequence[Scene]) -> List[tuple]:
    """Every GSJBU fit the run needs: ``(field key, guide, lr_shape, steps, fit options)``, longest
    first (published options: ``{}``)."""
    jobs = []
    for scene in scenes:
        for scale in cfg.scales:
            lr = lr_shape_for(scene.image.shape[:2], scale)
            for noise in (0,) + (tuple(cfg.noise) if scale in cfg.noise_scales else ()):
                for variant, guide in guides_for(scene, noise).items():
                    jobs.append((field_key((scene.name, noise, variant), lr, cfg.steps), guide, lr, cfg.steps, {}))
        if scene.name in cfg.sweep_images:
            lr = lr_shape_for(scene.image.shape[:2], cfg.sweep_scale)
            guide = guides_for(scene, 0)["all"]
            for steps in cfg.sweep_steps:
                jobs.append((field_key((scene.name, 0, "all"), lr, steps), guide, lr, steps, {}))
    return longest_first(jobs)


def longest_first(jobs: Sequence[tuple]) -> List[tuple]:
    """Unique fit jobs, the most expensive first (steps x pixels x (7 + guide channels))."""
    unique = {j[0]: j for j in jobs}
    return sorted(unique.values(), key=lambda j: -j[3] * j[1].shape[0] * j[1].shape[1] * (7 + j[1].shape[2]))


def fit_all(
    jobs: Sequence[tuple], workers: int, device: str, log, during: Optional[Callable] = None
) -> Dict[tuple, upa.KernelField]:
    """Run the fits ``(key, guide, lr_shape, steps, fit options)``, in ``workers`` processes with
    one torch thread each when ``workers > 1``.

    On a shared 2-core machine two single-threaded fits side by side waste far less CPU than
    one two-threaded fit (OpenMP threads spin while they wait for a busy core). ``during`` (if
    given) is called in this process once the fits are queued, as ``during(wait)``: ``wait(key)``
    returns that job's field as soon as it is fitted (with ``workers <= 1`` it fits it then).
    """
    from napari_upsample_anything.api import fit_kernels

    fields: Dict[tuple, upa.KernelField] = {}
    t0 = time.perf_counter()
    if workers <= 1:
        by_key = {j[0]: j for j in jobs}

        def fit_now(key):
            if key not in fields:
                _, guide, lr, steps, options = by_key[key]
                fields[key] = fit_kernels(
                    guide_arg(guide), lr_shape=lr, steps=steps, device=device, channel_axis=guide_axis(guide), **options
                )
            return fields[key]

        if during is not None:
            during(fit_now)
        for key in by_key:
            fit_now(key)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        ctx = mp.get_context("spawn")  # fork after torch's thread pool started can hang
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=torch.set_num_threads, initargs=(1,)) as ex:
            futures = {
                key: ex.submit(
                    fit_kernels,
                    guide_arg(guide),
                    lr_shape=lr,
                    steps=steps,
                    device=device,
                    channel_axis=guide_axis(guide),
                    **options,
                )
                for key, guide, lr, steps, options in jobs
            }
            if during is not None:

                def wait(key):
                    if key not in fields:
                        fields[key] = futures[key].result()
                    return fields[key]

                during(wait)
            for i, (key, fut) in enumerate(futures.items()):
                fields[key] = fut.result()
                if (i + 1) % 10 == 0 or i + 1 == len(futures):
                    log(f"  fitted {i + 1}/{len(futures)} fields ({time.perf_counter() - t0:.0f} s)")
    return fields


# ======================================================================================
# JBU tuning and the dense reference
# ======================================================================================
def tune_jbu(cfg: Config, scenes: Sequence[Scene], log) -> dict:
    """Grid search of (sigma_s, sigma_r) on the synthetic scenes' self-reconstruction
    (both LR variants, ``cfg.jbu_scales``): the best mean PSNR is frozen for every task."""
    grid = np.zeros((len(cfg.jbu_sigma_s), len(cfg.jbu_sigma_r)))
    t0 = time.perf_counter()
    for scene in scenes:
        truth_chw = chw(scene.image)
        H, W = scene.image.shape[:2]
        for scale in cfg.jbu_scales:
            lr = lr_shape_for((H, W), scale)
            for down in ("bicubic", "area"):
                lr_map = downsample(truth_chw, lr, down)
                for i, ss in enumerate(cfg.jbu_sigma_s):
                    for j, sr in enumerate(cfg.jbu_sigma_r):
                        pred = jbu_upsample(lr_map, truth_chw, ss, sr).numpy().transpose(1, 2, 0)
                        grid[i, j] += psnr(scene.image, pred)
    grid /= max(1, len(scenes) * len(cfg.jbu_scales) * 2)
    i, j = np.unravel_index(int(np.argmax(grid)), grid.shape)
    best = (float(cfg.jbu_sigma_s[i]), float(cfg.jbu_sigma_r[j]))
    log(
        f"JBU grid search: best sigma_s={best[0]} LR cells, sigma_r={best[1]} ({grid[i, j]:.2f} dB), {time.perf_counter() - t0:.1f} s"
    )
    return {"grid": grid, "best": best, "seconds": time.perf_counter() - t0}


def reference_check(cfg: Config, steps: int, device: str, log) -> List[dict]:
    """Our render vs the dense float64 reference (tests/reference_gsjbu.py) with one fitted field."""
    sys.path.insert(0, str(REPO / "tests"))
    try:
        from reference_gsjbu import reference_render
    finally:
        sys.path.pop(0)
    rows = []
    for name, size, scale in cfg.reference_cases:
        scene = crop_scene(load_scene(name, cfg.size), size)
        lr = lr_shape_for(size, scale)
        guide = scene.image
        lr_map = downsample(chw(guide), lr, "area")
        f = upa.fit_kernels(guide_arg(guide), lr_shape=lr, steps=steps, device=device, channel_axis=guide_axis(guide))
        t0 = time.perf_counter()
        ours = upa.render(lr_map.numpy(), guide_arg(guide), f, device=device)
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = reference_render(lr_map, chw(guide), f.sigma_x.cpu(), f.sigma_y.cpu(), f.theta.cpu(), f.sigma_r.cpu())
        t_ref = time.perf_counter() - t0
        diff = float(np.abs(ours.astype(np.float64) - ref.numpy()).max())
        rows.append(dict(image=name, size=f"{size[0]}x{size[1]}", lr=f"{lr[0]}x{lr[1]}", scale=size[1] / lr[1],
                         channels=int(lr_map.shape[0]), max_abs=diff, ours_s=t_ours, ref_s=t_ref,
                         sigma_r_min=float(f.sigma_r.min())))  # fmt: skip
        log(f"reference {name} {size} -> lr {lr}: max |ours - float64 reference| = {diff:.2e} (ref {t_ref:.1f} s)")
    return rows


def environment() -> Dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import scipy
    import skimage

    return {
        "date (UTC)": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "CPU": f"{cpu}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scikit-image": skimage.__version__,
        "scipy": scipy.__version__,
        "napari-upsample-anything": getattr(upa, "__version__", "?"),
        "platform": platform.platform(),
    }


def load_average() -> str:
    """The 1/5/15-minute load averages as text ("-" where the OS has none)."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "-"


def run_stamp(args, load_at_start: str, t_start: float) -> dict:
    """What every page says about its run: workers, environment, load, command, wall time."""
    return {
        "workers": args.workers,
        "env": environment(),
        "load": (load_at_start, load_average()),
        "argv": ["python", "benchmarks/bench_quality.py"] + _shown_args(args.argv),
        "wall_seconds": time.perf_counter() - t_start,
    }


def run_options(cfg: Config, args, log) -> dict:
    """The options study: every variant of :data:`OPTION_VARIANTS` on tasks 1-3; raw results."""
    t_start = time.perf_counter()
    load0 = load_average()
    scenes = [load_scene(n, cfg.size) for n in cfg.real + cfg.synthetic]
    synth = [s for s in scenes if s.kind == "synthetic"]
    scale = cfg.scales[0]
    plan = option_plan(cfg)
    ups = Upsamplers((float("nan"), float("nan")), cfg.steps, args.device, OPTION_VARIANTS)
    runner = Runner(cfg, ups, log, OPTION_BASELINES + tuple(OPTION_VARIANTS))
    # scene by scene (not longest first), so that each scene's renders can start while later scenes fit
    jobs: Dict[Tuple[str, int], List[tuple]] = {}
    for scene in scenes:
        lr = lr_shape_for(scene.image.shape[:2], scale)
        for noise, variants in plan.items():
            for gname, guide in guides_for(scene, noise).items():
                for v in variants:
                    opts = OPTION_VARIANTS[v]
                    k = field_key((scene.name, noise, gname), lr, cfg.steps, opts)
                    jobs.setdefault((scene.name, noise), []).append((k, guide, lr, cfg.steps, opts))
    jbu: dict = {}
    t_run = time.perf_counter()

    def evaluate(wait) -> None:
        """In this process while the workers fit: JBU tuning and the baselines, then each scene's
        GSJBU variants as soon as its fields are ready."""
        jbu.update(tune_jbu(cfg, synth, log))
        ups.jbu_params = jbu["best"]
        t0 = time.perf_counter()
        for scene in scenes:
            for noise in plan:
                runner.image_tasks(scene, scale, noise, OPTION_BASELINES)
        log(f"baselines (bilinear, bicubic, JBU) on every image and noise: {time.perf_counter() - t0:.1f} s")
        for scene in scenes:
            for noise, variants in plan.items():
                for job in jobs[(scene.name, noise)]:
                    ups.fields[job[0]] = wait(job[0])
                t0 = time.perf_counter()
                runner.image_tasks(scene, scale, noise, variants)
                r = select(runner.records, image=scene.name, scale=scale, noise=noise, task="T1", down="area")
                score = ", ".join(f"{OPTION_LABELS[x['method']]} {x['psnr']:.2f}" for x in r)
                log(f"{scene.name:22s} x{scale} noise {noise:2d}: T1 PSNR (area LR) {score} dB "
                    f"(renders {time.perf_counter() - t0:.1f} s; {time.perf_counter() - t_run:.0f} s since the start)")  # fmt: skip

    all_jobs = [j for js in jobs.values() for j in js]
    log(f"options study: fitting {len(all_jobs)} kernel fields with {args.workers} worker(s)")
    t_fit = time.perf_counter()
    ups.fields.update(fit_all(all_jobs, args.workers, args.device, log, during=evaluate))
    t_fit = time.perf_counter() - t_fit
    fit_meta = [dict(image=k[0], noise=k[1], guide=k[2], variant=variant_of(k), downsample=f.meta["downsample"],
                     normalize=f.meta["guide_normalize"], seconds=float(f.meta["seconds"]), fit_psnr=float(f.meta["psnr"]),
                     sigma_r_median=float(f.sigma_r.median()))
                for k, f in ups.fields.items()]  # fmt: skip
    return {
        "kind": "options",
        "config": cfg,
        "records": runner.records,
        "jbu": jbu,
        "variants": {v: dict(o) for v, o in OPTION_VARIANTS.items()},
        "labels": dict(OPTION_LABELS),
        "smoothing": OPTION_SMOOTHING,
        "plan": plan,
        "fit_meta": fit_meta,
        "fit_phase_seconds": t_fit,
        "seconds": ups.seconds,
        **run_stamp(args, load0, t_start),
    }


# ======================================================================================
# the main run and the command-line bookkeeping
# ======================================================================================
def run(cfg: Config, args, log) -> dict:
    """Compute everything; returns the raw results (no files written)."""
    t_start = time.perf_counter()
    load0 = load_average()
    scenes = [load_scene(n, cfg.size) for n in cfg.real + cfg.synthetic]
    synth = [s for s in scenes if s.kind == "synthetic"]
    jbu = tune_jbu(cfg, synth, log)
    reference = reference_check(cfg, cfg.steps, args.device, log)

    ups = Upsamplers(jbu["best"], cfg.steps, args.device)
    jobs = plan_fits(cfg, scenes)
    log(f"fitting {len(jobs)} kernel fields with {args.workers} worker(s)")
    t_fit = time.perf_counter()
    ups.fields.update(fit_all(jobs, args.workers, args.device, log))
    t_fit = time.perf_counter() - t_fit
    runner = Runner(cfg, ups, log)
    for scene in scenes:
        for scale in cfg.scales:
            for noise in (0,) + (tuple(cfg.noise) if scale in cfg.noise_scales else ()):
                t0 = time.perf_counter()
                runner.image_tasks(scene, scale, noise)
                r = select(runner.records, image=scene.name, scale=scale, noise=noise, task="T1", down="area")
                score = {x["method"]: x["psnr"] for x in r}
                log(f"{scene.name:22s} x{scale} noise {noise:2d}: T1 PSNR (area LR) bilinear {score['bilinear']:.2f}, "
                    f"bicubic {score['bicubic']:.2f}, JBU {score['jbu']:.2f}, GSJBU {score['gsjbu']:.2f} dB "
                    f"({time.perf_counter() - t0:.1f} s)")  # fmt: skip
    steps_rows = []
    for name in cfg.sweep_images:
        log(f"steps sweep: {name}")
        steps_rows += runner.steps_sweep(next(s for s in scenes if s.name == name))
    return {
        "config": cfg,
        "records": runner.records,
        "figure": runner.figure,
        "reference": reference,
        "jbu": jbu,
        "steps": steps_rows,
        "fit_seconds": ups.fit_seconds,
        "fit_phase_seconds": t_fit,
        "seconds": ups.seconds,
        **run_stamp(args, load0, t_start),
    }


def _shown_args(argv: Sequence[str]) -> List[str]:
    """The command-line arguments that change results (not --quiet / --save-raw FILE / --out DIR)."""
    shown, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--save-raw", "--out"):
            skip = True
        elif a != "--quiet" and not a.startswith(("--save-raw=", "--out=")):
            shown.append(a)
    return shown
