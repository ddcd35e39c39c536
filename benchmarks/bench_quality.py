#!/usr/bin/env python
"""Quality benchmark: GSJBU (this package) against nearest / bilinear / bicubic / a fixed JBU.

Writes ``quality.md`` (tables) and ``quality_crops.png`` (figure) into ``--out`` (default
``docs/``). Everything runs on the CPU from data that ships with scikit-image plus synthetic
scenes with known label maps; nothing is downloaded.

Tasks (see ``docs/quality.md`` for the protocol in words):

1. self-reconstruction: downsample the image (bicubic, the fit's own protocol, and area),
   upsample it guided by the full-resolution original; PSNR / SSIM against the original.
2. held-out channel: fit the kernels on a guide made of the *other* colour channels, then
   upsample the downsampled held-out channel; PSNR / SSIM against the true channel.
3. label maps (synthetic scenes): area-pool the one-hot labels by the scale, upsample,
   argmax; mIoU, pixel accuracy, boundary F1 at 2 px tolerance.
4. robustness: tasks 1-3 with Gaussian noise (sigma 10, 20 on the 0-255 scale) on the guide.
5. optimisation steps: 10 / 25 / 51 / 100 / 300 Adam steps, quality against fit time.

Usage::

    python benchmarks/bench_quality.py            # full run (about 10-15 min on 2 CPU cores)
    python benchmarks/bench_quality.py --quick    # smoke run (under 2 min)
    python benchmarks/bench_quality.py --save-raw /tmp/q.pkl   # keep raw results
    python benchmarks/bench_quality.py --from-raw /tmp/q.pkl   # re-render the docs only
    python benchmarks/bench_quality.py --options  # engine options study -> quality_options.md
    python benchmarks/bench_quality.py --options --quick        # its smoke run
    python benchmarks/bench_quality.py --stochastic  # stochastic fit study -> quality_stochastic.md

The options study (``--options``, about 12 min on 2 CPU cores) runs tasks 1-3 at scale 16 on a
clean guide and at guide noise 10 and 20 with GSJBU published, with ``downsample="area"``, with
``guide_smoothing`` and with both (see :data:`OPTION_VARIANTS`; :data:`OPTION_SKIP` lists the
pairs left out), against bilinear, bicubic and the tuned JBU.

The pages are generated except their interpretation: the text between ``<!-- written: NAME -->``
and ``<!-- /written -->`` is written by hand in ``docs/`` and kept verbatim on every rerun
(check it against the new tables when they change).

The code lives in the package ``benchmarks/quality/`` (config, scenes, baselines, metrics,
run, report); this script is its command line and re-exports the names other scripts and
the tests use.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import torch

if str(Path(__file__).resolve().parent) not in sys.path:  # imported from elsewhere (tests)
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import REPO
from quality.baselines import Upsamplers, field_key, jbu_upsample
from quality.config import (
    FULL,
    LABELS,
    METHODS,
    OPTION_BASELINES,
    OPTION_LABELS,
    OPTION_SMOOTHING,
    OPTION_VARIANTS,
    QUICK,
    Config,
    options_config,
)
from quality.metrics import label_metrics, mean_of, select
from quality.report import SUMMARY_COLS, write_outputs
from quality.run import run, run_options
from quality.stochastic import run_stochastic

__all__ = [
    "LABELS",
    "METHODS",
    "OPTION_BASELINES",
    "OPTION_LABELS",
    "OPTION_SMOOTHING",
    "OPTION_VARIANTS",
    "SUMMARY_COLS",
    "Config",
    "Upsamplers",
    "field_key",
    "jbu_upsample",
    "label_metrics",
    "main",
    "mean_of",
    "select",
]


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small smoke run (under 2 minutes)")
    p.add_argument("--options", action="store_true",
                   help="the engine-options study (downsample='area', guide_smoothing) instead: writes quality_options.md")  # fmt: skip
    p.add_argument("--stochastic", action="store_true",
                   help="the stochastic-fit study (fit_fraction < 1 against the exact fit) instead: writes quality_stochastic.md")  # fmt: skip
    p.add_argument(
        "--out", type=Path, default=REPO / "docs", help="folder for quality.md and quality_crops.png (or quality_options.md)"
    )
    p.add_argument("--steps", type=int, default=None, help="GSJBU steps of the main runs (default: 51; quick: 20)")
    p.add_argument("--device", default="cpu", help="device for GSJBU (default cpu: the documented setting)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads of the main process (default 1: its renders are small, and on a "
                        "shared CPU extra threads mostly spin)")  # fmt: skip
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="processes for the GSJBU fits, one torch thread each (default: 2; 1 = in-process)")  # fmt: skip
    p.add_argument("--save-raw", type=Path, default=None, help="also pickle the raw results (to re-render the docs later)")
    p.add_argument("--from-raw", type=Path, default=None,
                   help="re-render quality.md / the figure (or quality_options.md) from a --save-raw pickle")  # fmt: skip
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    if args.from_raw is not None:
        import pickle

        with open(args.from_raw, "rb") as fh:
            res = pickle.load(fh)
    else:
        cfg = QUICK if args.quick else FULL
        if args.steps is not None:
            cfg = replace(cfg, steps=int(args.steps))
        if args.threads:
            torch.set_num_threads(int(args.threads))
        if args.options:
            res = run_options(options_config(cfg), args, log)
        elif args.stochastic:
            res = run_stochastic(cfg, args, log)
        else:
            res = run(cfg, args, log)
        if args.save_raw is not None:
            import pickle

            args.save_raw.parent.mkdir(parents=True, exist_ok=True)
            with open(args.save_raw, "wb") as fh:
                pickle.dump(res, fh)
    res["paths"] = write_outputs(res, Path(args.out))
    log(f"wrote {' and '.join(str(v) for v in res['paths'].values())} ({res['wall_seconds']:.0f} s of computing)")
    return res


if __name__ == "__main__":
    main()
