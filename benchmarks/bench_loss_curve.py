#!/usr/bin/env python
"""Fit loss curves of the float32 paths against the same fit in float64, and against other commits.

    python benchmarks/bench_loss_curve.py                                   # this tree: auto + eager
    python benchmarks/bench_loss_curve.py --rev 9546d7d --out docs/benchmarks_engine.md

Fits the astronaut image at ``--size``^2 (LR grid size / 14) for ``--steps`` published steps with
each ``--backends`` path (``auto``: the native kernel on a CPU with a C compiler; ``eager``: tensor
operations), in this working tree and in each ``--rev`` (``git archive`` of its ``src/`` into a
temporary folder), each in a child process, and computes the same fit in float64
(``tests/reference_fit64.py``). It prints, for every pair of curves, the largest relative
difference of the loss before a step, in percent: a kernel change should move the curve by no
more than float32 rounding does (issue #26: within 0.1 % per step). The float32 fits drift from
the float64 one by a few hundredths of a percent in the middle of the fit, where the loss is
flattest and the L1 gradient's signs flip; two float32 paths that sum in different orders drift
apart by about as much.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # markdown_section, when run or imported from elsewhere
from markdown_section import write_marked_section

MARK_BEGIN = "<!-- bench_loss_curve:begin -->"
MARK_END = "<!-- bench_loss_curve:end -->"

# Run in a child process with the tree's src/ (its last argument) first on sys.path: the fit's loss before each step,
# on the guide the parent saved (one image for every curve and the float64 fit).
CHILD = """
import json, sys
sys.path.insert(0, sys.argv[5])
import numpy as np, torch
from napari_upsample_anything.core.fit import fit_field
from napari_upsample_anything.core.guide import Guide
guide_file, steps, backend, threads = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
torch.set_num_threads(threads)
guide = Guide(np.load(guide_file))
size = guide.shape[0]
field = fit_field(guide, (size // 14, size // 14), steps=steps, budget=2**31, backend=backend, threads=threads)
print(json.dumps({"loss": field.meta["loss_per_step"], "kernel": field.meta.get("kernel", backend)}))
"""


def curve(src: Path, guide_file: Path, steps: int, backend: str, threads: int) -> dict:
    """``{"loss": [...], "kernel": name}`` of one fit of the (H, W, 3) uint8 guide in ``guide_file``
    (.npy), run by the package under ``src``."""
    run = subprocess.run(
        [sys.executable, "-c", CHILD, str(guide_file), str(steps), backend, str(threads), str(src)],
        capture_output=True,
        text=True,
    )
    if run.returncode != 0:
        raise RuntimeError(f"the fit under {src} (backend {backend}) failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def max_rel_percent(a: np.ndarray, b: np.ndarray) -> float:
    """Largest relative difference per step, in percent, relative to the smaller of the two losses
    (symmetric, and never below either curve's difference relative to the other)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float((np.abs(a - b) / np.minimum(np.abs(a), np.abs(b))).max() * 100)


def tree_revision() -> str:
    """This tree's commit (``git describe --always --dirty``), or "unknown" outside a git checkout."""
    run = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return run.stdout.strip() if run.returncode == 0 and run.stdout.strip() else "unknown"


def table(curves: Dict[str, np.ndarray], command: str, size: int, steps: int) -> str:
    names = list(curves)
    lines = [
        "## Fit loss curves against float64 (`benchmarks/bench_loss_curve.py`)",
        "",
        f"Command: `{command}` (this tree: {tree_revision()})",
        "",
        f"Astronaut {size}^2, LR {size // 14}^2, {steps} published steps. Each cell: the largest relative",
        "difference of the loss before a step between the row's and the column's curve (relative to the",
        "smaller of the two), in percent.",
        "",
        "| curve | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for a in names:
        lines.append(f"| {a} | " + " | ".join(f"{max_rel_percent(curves[a], curves[b]):.3f}" for b in names) + " |")
    return "\n".join(lines)


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=224, help="guide side in pixels (LR side: size // 14)")
    ap.add_argument("--steps", type=int, default=51)
    ap.add_argument("--backends", nargs="+", default=["auto", "eager"])
    ap.add_argument("--rev", nargs="*", default=[], help="git revisions to compare with (their src/)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="markdown file to put the table into (between markers)")
    args = ap.parse_args(argv)
    if args.size < 14:
        ap.error(f"--size {args.size}: needs at least 14 pixels (one LR cell)")
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT / "src"))
    from bench_roofline import _guide  # the astronaut at size^2, as the roofline's fits use it
    from reference_fit64 import float64_fit_losses

    from napari_upsample_anything.core.guide import Guide

    image = _guide(args.size)
    curves: Dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        guide_file = Path(tmp) / "guide.npy"
        np.save(guide_file, image)
        trees = [("this tree", ROOT / "src")]
        for rev in args.rev:
            folder = Path(tmp) / rev
            folder.mkdir()
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
            trees.append((rev, folder / "src"))
        for name, src in trees:
            for backend in args.backends:
                got = curve(src, guide_file, args.steps, backend, args.threads)
                curves[f"{name}, {backend} ({got['kernel']})"] = np.asarray(got["loss"])
                print(f"{name}, {backend}: kernel {got['kernel']}, final loss {got['loss'][-1]:.6f}", flush=True)
    curves["float64"] = float64_fit_losses(Guide(image), (args.size // 14, args.size // 14), args.steps)
    command = "python benchmarks/bench_loss_curve.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = table(curves, command.strip(), args.size, args.steps)
    print(text)
    if args.out is not None:
        write_marked_section(args.out, text, MARK_BEGIN, MARK_END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
