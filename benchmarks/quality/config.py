"""Run configurations (full, quick, options study), method names and labels.

Part of the quality benchmark; run it with ``python benchmarks/bench_quality.py`` (see there).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Tuple

METHODS = ("nearest", "bilinear", "bicubic", "jbu", "gsjbu")
LABELS = {"nearest": "nearest", "bilinear": "bilinear", "bicubic": "bicubic", "jbu": "JBU (fixed)", "gsjbu": "GSJBU (ours)"}
CHANNEL_NAMES = "RGB"


# ======================================================================================
# configuration
# ======================================================================================
@dataclass
class Config:
    name: str
    size: Tuple[int, int]  # (H, W) of every test image
    scales: Tuple[int, ...]
    steps: int  # GSJBU Adam steps of the main runs (published: 51)
    real: Tuple[str, ...]  # scikit-image sample images
    synthetic: Tuple[str, ...]  # "voronoi-<seed>" / "polygons-<seed>"
    noise: Tuple[int, ...]  # guide noise sigmas (0-255 scale) of the robustness task
    noise_scales: Tuple[int, ...]  # scales at which the robustness task runs
    sweep_steps: Tuple[int, ...]
    sweep_images: Tuple[str, ...]
    sweep_scale: int
    reference_cases: Tuple[Tuple[str, Tuple[int, int], int], ...]  # (image, (H, W), scale)
    jbu_sigma_s: Tuple[float, ...]  # grid (LR cells)
    jbu_sigma_r: Tuple[float, ...]  # grid (guide units, [0, 1])
    jbu_scales: Tuple[int, ...]  # scales of the tuning runs (sigma_s is in LR cells: scale-free)
    figure_cases: Tuple[Tuple[str, str, int, str], ...]  # (task, image, scale, down)
    crop: int  # side of the figure crops (HR pixels)


FULL = Config(
    name="full",
    size=(224, 256),
    scales=(14, 16),
    steps=51,
    real=("astronaut", "camera", "coffee", "chelsea", "immunohistochemistry", "retina", "hubble_deep_field", "cell"),
    synthetic=("voronoi-1", "voronoi-2", "polygons-1", "polygons-2"),
    noise=(10, 20),
    noise_scales=(16,),
    sweep_steps=(10, 25, 51, 100, 300),
    sweep_images=("astronaut", "polygons-1"),
    sweep_scale=16,
    reference_cases=(("astronaut", (112, 128), 14), ("polygons-1", (96, 112), 16)),
    jbu_sigma_s=(1.0, 1.4, 2.0, 2.8, 4.0),
    jbu_sigma_r=(0.015, 0.03, 0.06),
    jbu_scales=(16,),
    figure_cases=(
        ("T1", "astronaut", 16, "area"),
        ("T1", "coffee", 16, "area"),
        ("T2", "chelsea", 16, "area"),
        ("T3", "polygons-1", 16, "area"),
    ),
    crop=96,
)

QUICK = Config(
    name="quick",
    size=(112, 128),
    scales=(14, 16),
    steps=20,
    real=("astronaut", "camera"),
    synthetic=("voronoi-1",),
    noise=(20,),
    noise_scales=(16,),
    sweep_steps=(5, 20),
    sweep_images=("astronaut",),
    sweep_scale=16,
    reference_cases=(("astronaut", (56, 64), 14),),
    jbu_sigma_s=(0.7, 1.4),
    jbu_sigma_r=(0.03, 0.1),
    jbu_scales=(16,),
    figure_cases=(("T1", "astronaut", 16, "area"), ("T3", "voronoi-1", 16, "area")),
    crop=48,
)


# ======================================================================================
# options study (--options): the engine options aimed at the losses found above
# ======================================================================================
# Gaussian sigma of the guide smoothing, in HR pixels. Chosen before the run (one value, not
# tuned on these results); the page gives the reasons (see options_sigma_text).
OPTION_SMOOTHING = 2.0
OPTION_VARIANTS: Dict[str, dict] = {  # GSJBU method name -> engine options (fit_kernels; smoothing also render)
    "gsjbu": {},
    "gsjbu-area": {"downsample": "area"},
    "gsjbu-smooth": {"guide_smoothing": OPTION_SMOOTHING},
    "gsjbu-area-smooth": {"downsample": "area", "guide_smoothing": OPTION_SMOOTHING},
}
OPTION_BASELINES = ("bilinear", "bicubic", "jbu")
OPTION_LABELS = {
    "bilinear": "bilinear",
    "bicubic": "bicubic",
    "jbu": "JBU (fixed)",
    "gsjbu": "GSJBU published",
    "gsjbu-area": "GSJBU area fit",
    "gsjbu-smooth": f"GSJBU smoothed {OPTION_SMOOTHING:g} px",
    "gsjbu-area-smooth": f"GSJBU area fit + smoothed {OPTION_SMOOTHING:g} px",
}
# (variant, guide noise) pairs not run, to keep the full run under 15 minutes on 2 cores: both
# options on a clean guide answer no question the other rows leave open, and noise 10 (full run
# only) asks only whether smoothing helps at moderate noise too.
OPTION_SKIP: Tuple[Tuple[str, int], ...] = (("gsjbu-area-smooth", 0), ("gsjbu-area", 10), ("gsjbu-area-smooth", 10))
# (task, down, metric): the mean losses of quality.md the options are aimed at (transfer tasks) ...
OPTION_FOCUS = (("T2", "area", "psnr"), ("T3", "area", "miou"), ("T3", "area", "bf1"))
# ... and the columns over which per-image losses are counted
OPTION_COUNT = (("T1", "bicubic", "psnr"), ("T1", "area", "psnr"), ("T2", "bicubic", "psnr")) + OPTION_FOCUS


def options_config(base: Config) -> Config:
    """The options study's configuration: ``base``'s images, steps and JBU grid at one scale
    (16), clean guide and guide noise 10 (full run only) and 20; no steps sweep, reference
    check or figure."""
    quick = base.name == "quick"
    return replace(base, name="options-quick" if quick else "options", scales=(16,), noise=(20,) if quick else (10, 20),
                   noise_scales=(16,), sweep_steps=(), sweep_images=(), reference_cases=(), figure_cases=())  # fmt: skip


def option_plan(cfg: Config) -> Dict[int, Tuple[str, ...]]:
    """Guide noise -> the GSJBU variants run at that noise."""
    return {n: tuple(v for v in OPTION_VARIANTS if (v, n) not in OPTION_SKIP) for n in (0,) + tuple(cfg.noise)}


def variant_of(key: tuple) -> str:
    """The GSJBU variant whose options a field key (:func:`field_key`) carries."""
    opts = key[5] if len(key) > 5 else ()
    for v, o in OPTION_VARIANTS.items():
        if tuple(sorted(o.items())) == tuple(opts):
            return v
    raise KeyError(opts)
