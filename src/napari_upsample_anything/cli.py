"""``upsample-anything``: the headless main job.

    upsample-anything run IMAGE... --out DIR [--planes z=3] [--channels 0,2] [--format npy] [options]
    upsample-anything map MAP --image IMAGE --out FILE [--kernels kernels.ome.zarr] [options]
    upsample-anything demo [--out DIR]

``run`` processes each input through :mod:`napari_upsample_anything.pipeline` (features ->
kernel fit -> HR PCA and HR features -> OME-Zarr or ``.npy`` files), one input at a time,
each opened lazily; every ``Y x X`` plane of a stack on its own. Output folders are named
from the inputs' paths relative to their common parent (deterministic), written under a
hidden temporary name and renamed when complete; ``--skip-existing`` resumes a batch. A
failing input is reported and the batch goes on. ``--dask`` (after the inputs) runs each
plane as Dask tasks on ``--workers`` local processes, ``--dask tcp://host:8786`` on a running
scheduler (unreachable: exit 1 within seconds); see :func:`napari_upsample_anything.pipeline.run_job`.

Exit codes, one per kind of outcome:

* 0: success.
* 2: a mistake the user can fix in the command line or the input: an unknown or invalid
  flag, a missing or unreadable file, a map that does not fit the image or the kernels, a
  budget too small to work in or larger than the machine's memory, and a batch whose every
  failure was such an input. Checked before any model is loaded wherever the input allows.
* 1: the machine, not the command: pretrained weights not available (the message names
  ``--weights FILE`` and ``--random-weights``), out of memory, a failed Dask worker, a bug.
* 130: Ctrl-C, after removing the partial outputs (an earlier result stays).

Errors print one line (the readers' warnings folded into it; ``--verbose`` prints every
warning and log message as it comes); ``--traceback`` (before or after the subcommand) shows
the Python traceback for bug reports.

This module holds the parser, :func:`main` (errors to exit codes) and the ``run`` command;
the other commands live in :mod:`.cli_map` (files: :mod:`.map_io`), :mod:`.cli_demo` and
:mod:`.cli_segment`; the checks of the shared flags in :mod:`.cli_options`; what the
commands print, the exit codes and :class:`~.cli_printing.UsageError` in :mod:`.cli_printing`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from .cli_demo import cmd_demo
from .cli_jobs import check_dask_flags, dask_from_args, output_names, process_image
from .cli_map import cmd_map

# cli_segment reaches the shared helpers through this module (``cli._table`` etc.), so the
# names it uses are imported here even where this module does not use them itself.
from .cli_options import _check_planes_flag, _output_dir, _parse_channels_flag, options_from_args
from .cli_options import _parse_memory as _parse_memory
from .cli_printing import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    Notes,
    UsageError,
    _table,
    _usage_like,
    describe_error,
)
from .cli_printing import _one_line as _one_line
from .core.published import PUBLISHED_STEPS  # torch-free: the parser is built before torch loads
from .pipeline.options import FIT_DOWNSAMPLE, FORMATS, HR_DTYPES, PRECISIONS  # torch-free too

# ------------------------------------------------------------------------------ run


def cmd_run(args) -> int:
    for p in args.images:
        if not Path(p).exists():
            raise UsageError(f"image file not found: {p}")
    if args.axes is not None:
        from .sources import normalise_axes

        try:
            normalise_axes(args.axes, len(args.axes), "--axes")
        except (ValueError, TypeError) as exc:
            raise UsageError(str(exc)) from exc
    _check_planes_flag(args.planes)
    check_dask_flags(args)
    options = options_from_args(args, _parse_channels_flag(args.channels))
    out = _output_dir(args.out)
    names = output_names(args.images)
    with dask_from_args(args) as client:  # one cluster for the whole batch (a no-op without --dask)
        return _run_batch(args, options, out, names, client)


def _run_batch(args, options, out: Path, names: List[str], client) -> int:
    from .pipeline import SourceRef

    rows = [["image", "planes", "size", "LR grid", "C", "features s", "fit s", "render s", "status", "output"]]
    failures: List[BaseException] = []
    for path, name in zip(args.images, names):
        target = out / name
        if args.skip_existing and (target / "report.json").is_file():
            rows.append([str(path), "", "", "", "", "", "", "", "skipped (exists)", str(target)])
            continue
        ref = SourceRef(path=str(path), axes=args.axes, scene=args.scene)
        try:
            rep = process_image(
                ref,
                target,
                options,
                planes=args.planes,
                name=Path(path).name,
                quiet=args.quiet,
                client=client,
                retries=args.retries,
            )
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - reported; the batch goes on
            if args.traceback:
                import traceback

                traceback.print_exc()
            failures.append(exc)
            print(
                f"upsample-anything: {path}: {'error' if not _usage_like(exc) else 'bad input'}: {describe_error(exc)}"
                + args.notes.fold(),
                file=sys.stderr,
            )
            rows.append([str(path), "", "", "", "", "", "", "", "FAILED: " + type(exc).__name__, ""])
            continue
        args.notes.show()
        s = rep["seconds"]
        rows.append(
            [
                str(path),
                str(len(rep["planes"])),
                "x".join(map(str, rep["hr_shape"])),
                "x".join(map(str, rep["lr_shape"])),
                str(rep["channels"]),
                f"{s['features']:.1f}",
                f"{s['fit']:.1f}",
                f"{s.get('render', 0.0) + s.get('pca', 0.0):.1f}",
                "ok",
                str(target),
            ]
        )
    print(_table(rows))
    if failures:
        print(f"upsample-anything: {len(failures)} of {len(args.images)} input(s) failed", file=sys.stderr)
        return EXIT_USAGE if all(_usage_like(e) for e in failures) else EXIT_FAILURE
    return EXIT_OK


# ------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    ap = argparse.ArgumentParser(
        prog="upsample-anything",
        description="Upsample Anything (GSJBU): fit per-pixel Gaussian kernels on an image by test-time "
        "optimisation and use them to upsample its DINOv2 features (or any low-resolution map) to full resolution.",
    )
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    ap.add_argument(
        "--traceback",
        action="store_true",
        help="show the Python traceback on errors (for bug reports); also accepted after the subcommand",
    )
    from .cli_segment import add_parser as add_segment_parser  # torch-free
    from .cli_segment import layer_arg

    sub = ap.add_subparsers(dest="command", required=True, metavar="{run,map,demo,segment}")

    def backbone_flags(p):
        """The feature backbone (run, demo; map uses no model)."""
        p.add_argument(
            "--backbone",
            default="dinov2_vits14",
            help="feature backbone: dinov2_vits14 / vitb14 / vitl14 / vitg14, their _reg variants, or a timm ViT name (default: %(default)s)",
        )
        p.add_argument(
            "--layer",
            type=layer_arg,
            default=-1,
            help="transformer block whose patch tokens are used; negative counts from the end; several, e.g. --layer=-1,-4, are concatenated (default: %(default)s)",
        )
        p.add_argument(
            "--input-size",
            type=int,
            default=None,
            help="working resolution of the backbone: long side in pixels (default: the image's own size)",
        )
        p.add_argument(
            "--weights",
            default=None,
            metavar="FILE",
            help="local weights file (timm/torch state dict or the original DINOv2 .pth) instead of the Hugging Face cache",
        )
        p.add_argument(
            "--random-weights",
            action="store_true",
            help="testing only: a randomly initialised backbone (no download; the features are meaningless)",
        )

    def fit_flags(p):
        """The kernel fit and render (every subcommand)."""
        p.add_argument(
            "--steps",
            type=int,
            default=PUBLISHED_STEPS,
            help="kernel-fitting Adam steps (default: %(default)s, the published run)",
        )
        p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
        p.add_argument(
            "--precision",
            default="auto",
            choices=PRECISIONS,
            help="dtype of the feature aggregation; auto = fp16 on CUDA, fp32 elsewhere (default: %(default)s)",
        )
        p.add_argument(
            "--max-memory",
            default=None,
            help="working-memory budget, e.g. 2GB or 512MiB (default: a safe fraction of free memory)",
        )
        p.add_argument(
            "--fit-downsample",
            default="bicubic",
            choices=FIT_DOWNSAMPLE,
            help="LR input of the kernel fit: bicubic (published) or area averages, closer to how a ViT token summarises its patch (default: %(default)s)",
        )
        p.add_argument(
            "--fit-fraction",
            type=float,
            default=1.0,
            help="optional stochastic fit: the fraction of pixels (whole LR cells, fresh each step) every fit step uses; "
            "a step costs about that fraction; 1 is the exact, published fit (default: %(default)s; docs/quality_stochastic.md)",
        )
        p.add_argument(
            "--guide-smoothing",
            type=float,
            default=0.0,
            help="Gaussian sigma in pixels applied to the image before fitting and rendering; helps with noisy images (default: %(default)s = off)",
        )
        p.add_argument("--quiet", action="store_true", help="no progress bars and no warnings")
        p.add_argument("--verbose", action="store_true", help="print every warning and log message of the readers as it comes")

    def dask_flags(p):
        p.add_argument(
            "--dask",
            nargs="?",
            const="local",
            default=None,
            metavar="ADDRESS",
            help="run the planes as Dask tasks: alone, on a local cluster of --workers processes; with a scheduler "
            "address (tcp://host:8786), on that cluster (e.g. one started by dask-jobqueue on SLURM)",
        )
        p.add_argument(
            "--workers",
            type=int,
            default=None,
            help="with --dask: local worker processes (default: one per CPU core / --threads-per-worker)",
        )
        p.add_argument(
            "--threads-per-worker",
            type=int,
            default=1,
            help="with --dask: Dask and torch threads per local worker (default: %(default)s)",
        )
        p.add_argument(
            "--retries",
            type=int,
            default=2,
            help="with --dask: extra attempts of a failing task before the input fails (default: %(default)s)",
        )

    def image_options(p):
        p.add_argument(
            "--axes",
            default=None,
            help="axes of a plain TIFF / .npy without axes metadata, e.g. zyx, cyx, tczyx, yxs (RGB); never guessed; OME files name their own",
        )
        p.add_argument("--scene", default=None, help="scene of a multi-scene file: index or name (default: the first)")
        p.add_argument(
            "--channels",
            default="all",
            help="channels that form the guide: 'all' or indices such as 0,2 (3 channels: RGB, 1: gray, others: mean of normalised channels; default: %(default)s)",
        )
        p.add_argument(
            "--planes",
            default="all",
            help="Y x X planes to process: all, z=3, t=0:10, t=0,z=2:4 (Python ranges, end excluded; default: %(default)s)",
        )

    run = sub.add_parser(
        "run",
        help="process image files",
        description="Extract features, fit kernels, write HR features, PCA picture, kernels and a report per image (one folder per input).",
    )
    run.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE",
        help="image files: OME-TIFF, TIFF, OME-Zarr, PNG, JPEG, .npy (CZI/ND2/LIF with the 'formats' extra)",
    )
    run.add_argument(
        "--out",
        required=True,
        help="output directory (one sub-directory per image, named from its path relative to the inputs' common folder)",
    )
    backbone_flags(run)
    fit_flags(run)
    image_options(run)
    run.add_argument(
        "--format",
        default="ome-zarr",
        choices=FORMATS,
        help="array outputs: ome-zarr (features.ome.zarr, pca.ome.zarr with a pyramid, kernels.ome.zarr) or npy (features_hr.npy, kernels.npz) (default: %(default)s)",
    )
    run.add_argument(
        "--pca-only", action="store_true", help="write only the PCA picture, kernels and report (skip the C x H x W features)"
    )
    run.add_argument("--dtype", default="float32", choices=HR_DTYPES, help="dtype of the HR features (default: %(default)s)")
    dask_flags(run)
    run.add_argument(
        "--skip-existing", action="store_true", help="skip inputs whose output folder is complete (resume an interrupted batch)"
    )
    run.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    run.set_defaults(func=cmd_run)

    mp = sub.add_parser(
        "map",
        help="upsample a low-resolution map (probabilities, labels, depth) onto an image",
        description="Upsample an LR map file (.npy, TIFF, OME-Zarr; (h, w) or channels-first (C, h, w)) to the "
        "resolution of IMAGE with kernels saved by 'run' (--kernels) or fitted first. Labels in, labels out "
        "(argmax of the upsampled one-hot); probabilities or other values in, the same out.",
    )
    mp.add_argument("map", metavar="MAP", help="the LR map file")
    mp.add_argument("--image", required=True, help="the high-resolution image (guide)")
    mp.add_argument("--out", required=True, help="output file: .npy, .tif or .ome.zarr")
    mp.add_argument(
        "--kernels", default=None, help="kernels.ome.zarr or kernels.npz from 'run' (default: fit kernels for the map's grid)"
    )
    mp.add_argument(
        "--kind",
        default="auto",
        choices=["auto", "labels", "continuous"],
        help="labels (integer map -> argmax of the upsampled one-hot) or continuous; auto: 2-D integer maps are labels (default: %(default)s)",
    )
    fit_flags(mp)
    image_options(mp)
    dask_flags(mp)
    mp.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    mp.set_defaults(func=cmd_map)

    demo = sub.add_parser(
        "demo",
        help="run the whole job on a bundled sample image",
        description="Runs on scikit-image's immunohistochemistry sample. Without pretrained weights it says so and runs the model-free part.",
    )
    demo.add_argument("--out", default="upa-demo", help="output directory (default: %(default)s)")
    backbone_flags(demo)
    fit_flags(demo)
    demo.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    demo.set_defaults(func=cmd_demo, pca_only=False, dtype="float32")
    add_segment_parser(sub)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with 2 on bad usage
    with Notes(verbose=getattr(args, "verbose", False), quiet=getattr(args, "quiet", False)) as notes:
        args.notes = notes
        try:
            if getattr(args, "steps", 1) < 0:
                raise UsageError(f"--steps {args.steps}: give a non-negative number")
            code = args.func(args)
            notes.show()
            return code
        except KeyboardInterrupt:
            # the job removed its partial outputs on the way out (pipeline.run_job aborts)
            print("upsample-anything: interrupted; partial outputs removed", file=sys.stderr)
            return EXIT_INTERRUPTED
        except Exception as exc:  # noqa: BLE001 - the one place that turns errors into exit codes
            if args.traceback:
                import traceback

                traceback.print_exc()
            usage = isinstance(exc, UsageError) or _usage_like(exc)
            kind = "usage error" if isinstance(exc, UsageError) else "bad input" if usage else "error"
            print(f"upsample-anything: {kind}: {describe_error(exc)}{notes.fold()}", file=sys.stderr)
            return EXIT_USAGE if usage else EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
