"""``upsample-anything segment``: apply a saved scribble classifier to files, folders and stacks.

    upsample-anything segment IMAGES... --classifier cells.npz --out DIR [--planes z=0:10]
        [--probabilities] [--skip-existing] [--dask [ADDRESS]] [--weights FILE] [--device cuda]

Each input (a file, or every image file of a folder) goes plane by plane through
:func:`napari_upsample_anything.segmentation.segment_plane` (features + kernels of the one
pipeline, then the classifier) with the options stored in the classifier file. Outputs, in
``DIR/<name>/`` (the same folder names as ``run``, so they sit beside its outputs):

* ``labels.ome.zarr``: an NGFF ``image-label`` (``[t,] [z,] y, x``, the image's pixel sizes,
  a colour and the class name of every class; opens as a Labels layer in napari);
* ``probabilities.ome.zarr`` with ``--probabilities`` (``[t,] c, [z,] y, x`` float32, one
  channel per class, named);
* ``segment.json``: the classifier, classes, planes, seconds.

Written under a temporary name and renamed when complete; ``--skip-existing`` skips inputs
whose ``segment.json`` exists. Planes not selected by ``--planes`` stay 0 (unlabelled).
``--backbone`` / ``--layer`` / ``--input-size`` / ``--channels`` may only repeat the
classifier's own settings: anything else is refused (exit 2) before a model is loaded.
Exit codes as ``run``: 0 ok, 1 failure, 2 usage or bad input, 130 interrupted.

This module is torch-free at import (the parser is built before torch loads).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

from .cli_jobs import check_dask_flags, dask_from_args, output_names
from .cli_options import _check_planes_flag, _output_dir, _parse_channels_flag, _parse_memory
from .cli_printing import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, Bar, UsageError, _one_line, _table, _usage_like
from .pipeline.options import PRECISIONS

#: File suffixes taken from a folder given as input (others are ignored).
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".npy", ".zarr", ".czi", ".nd2", ".lif")
_CLASSIFIERS: Dict[Any, Any] = {}  # per process (a Dask worker): path, mtime -> classifier


def layer_arg(text: str):
    """``--layer`` value: one block (``-1``) or several, comma-separated (``-1,-4``)."""
    import argparse

    try:
        blocks = tuple(int(v) for v in str(text).split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a block index such as -1, or several such as -1,-4") from None
    return blocks[0] if len(blocks) == 1 else blocks


def add_parser(subparsers) -> Any:
    """Add the ``segment`` subcommand to the CLI's subparsers."""
    import argparse

    p = subparsers.add_parser(
        "segment",
        help="apply a saved scribble classifier to images, folders and stacks (labels as OME-Zarr)",
        description="Segment every plane of the inputs with a classifier saved by the feature explorer or "
        "segmentation.train_from_examples: labels.ome.zarr (NGFF image-label with class names and colours), "
        "optionally probabilities.ome.zarr, in one folder per input.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of image files")
    p.add_argument("--classifier", required=True, help="classifier file (.npz) saved by ScribbleClassifier.save")
    p.add_argument("--out", required=True, help="output directory (one sub-directory per image, as for 'run')")
    p.add_argument("--probabilities", action="store_true", help="also write the class probabilities")
    p.add_argument("--route", default=None, choices=["hr", "lr"], help="override the classifier's route (default: its own)")
    p.add_argument("--weights", default=None, help="the backbone's weights file here (default: the path in the classifier)")
    p.add_argument("--backbone", default=None, help="must match the classifier's (default: the classifier's)")
    p.add_argument("--layer", type=layer_arg, default=None, help="must match the classifier's (default: the classifier's)")
    p.add_argument("--input-size", type=int, default=None, help="must match the classifier's (default: the classifier's)")
    p.add_argument("--channels", default=None, help="must match the classifier's (default: the classifier's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="(default: %(default)s)")
    p.add_argument("--max-memory", default=None, help="working-memory budget, e.g. 2GB (default: a safe fraction)")
    p.add_argument("--axes", default=None, help="axes of a plain TIFF / .npy without axes metadata, e.g. zyx")
    p.add_argument("--scene", default=None, help="scene of a multi-scene file (default: the first)")
    p.add_argument("--planes", default="all", help="planes to segment: all, z=3, t=0:10 (default: %(default)s)")
    p.add_argument("--skip-existing", action="store_true", help="skip inputs whose segment.json exists")
    p.add_argument("--dask", nargs="?", const="local", default=None, metavar="ADDRESS", help="run the planes as Dask tasks")
    p.add_argument("--workers", type=int, default=None, help="with --dask: local worker processes")
    p.add_argument("--threads-per-worker", type=int, default=1, help="with --dask: threads per worker (default: %(default)s)")
    p.add_argument("--retries", type=int, default=2, help="with --dask: extra attempts of a failing plane (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_segment)
    return p


def expand_inputs(paths: List[str]) -> List[str]:
    """Files as given; folders (other than ``.zarr`` stores) replaced by their image files, sorted."""
    out: List[str] = []
    for p in paths:
        path = Path(p)
        if path.is_dir() and not path.name.lower().endswith(".zarr"):
            found = sorted(
                str(q) for q in path.iterdir() if not q.name.startswith(".") and q.name.lower().endswith(IMAGE_SUFFIXES)
            )
            if not found:
                raise UsageError(f"folder {p} holds no image file ({', '.join(IMAGE_SUFFIXES)})")
            out.extend(found)
        else:
            out.append(str(p))
    return out


def _classifier(path: str):
    from .core.feature_queries import ScribbleClassifier

    key = (path, Path(path).stat().st_mtime_ns)
    if key not in _CLASSIFIERS:
        _CLASSIFIERS.clear()
        _CLASSIFIERS[key] = ScribbleClassifier.load(path)
    return _CLASSIFIERS[key]


def segment_task(spec: dict) -> dict:
    """One plane in any process (a Dask worker): read, segment, write its region of the stores."""
    import zarr

    from .segmentation import segment_plane
    from .sources import open_image

    clf = _classifier(spec["classifier"])
    options = spec["options"]
    src = open_image(spec["image"], axes=spec["axes"], scene=spec["scene"])
    t, z = spec["plane"]
    guide = src.guide(t, z, options.channels)
    t0 = time.perf_counter()
    labels, probs, fit = segment_plane(clf, guide, options, route=spec["route"], index=(t, z))
    seconds = time.perf_counter() - t0
    lab = zarr.open_array(spec["labels"], mode="r+")
    region = tuple(v for v, a in ((t, "t"), (z, "z")) if a in spec["axes_out"])
    lab[region] = labels.astype(lab.dtype)
    if spec["probabilities"]:
        pr = zarr.open_array(spec["probabilities"], mode="r+")
        preg = ((t,) if "t" in spec["axes_out"] else ()) + (slice(None),) + ((z,) if "z" in spec["axes_out"] else ())
        pr[preg] = probs
    return {
        "plane": [int(t), int(z)],
        "lr_shape": list(fit.lr_shape),
        "seconds": {**{k: round(float(v), 3) for k, v in fit.seconds.items()}, "segment": round(seconds, 3)},
        "counts": {str(int(c)): int((labels == c).sum()) for c in clf.classes},
    }


def _segment_one(path: str, target: Path, clf_path: str, clf, options, args, client) -> dict:
    from .annotations import create_labels, label_colors
    from .distributed import TaskFailedError, execute
    from .omezarr import create_image
    from .pipeline import OutputTransaction
    from .sources import open_image

    src = open_image(path, axes=args.axes, scene=args.scene)
    planes = src.planes(args.planes)
    sizes = src.sizes
    axes_out = ("t" if sizes["T"] > 1 else "") + ("z" if sizes["Z"] > 1 else "") + "yx"
    H, W = src.plane_shape
    shape = tuple({"t": sizes["T"], "z": sizes["Z"], "y": H, "x": W}[a] for a in axes_out)
    # the pipeline's transaction; the entries move into the folder one by one (it may hold the
    # outputs of `run` too), segment.json last: it marks the input complete
    with OutputTransaction(target, entries=("labels.ome.zarr", "probabilities.ome.zarr", "segment.json")) as txn:
        tmp = txn.tmp
        names = {int(c): clf.class_name(c) for c in clf.classes}
        create_labels(
            tmp / "labels.ome.zarr",
            shape,
            axes_out,
            clf.classes,
            class_names=names,
            colors=label_colors(clf.classes),
            pixel_sizes=src.pixel_sizes,
            unit=src.unit,
            name=f"{Path(path).name} labels",
        )
        prob_path = None
        if args.probabilities:
            paxes = ("t" if "t" in axes_out else "") + "c" + ("z" if "z" in axes_out else "") + "yx"
            pshape = tuple({"c": len(clf.classes), "t": sizes["T"], "z": sizes["Z"], "y": H, "x": W}[a] for a in paxes)
            create_image(
                tmp / "probabilities.ome.zarr",
                pshape,
                paxes,
                dtype="float32",
                pixel_sizes=src.pixel_sizes,
                unit=src.unit,
                name=f"{Path(path).name} probabilities",
                channel_names=[names[int(c)] for c in clf.classes],
                attrs={"kind": "class-probabilities", "classes": [int(c) for c in clf.classes]},
            )
            prob_path = str(tmp / "probabilities.ome.zarr" / "0")
        specs = [
            {
                "classifier": clf_path,
                "options": options,
                "image": str(Path(path).resolve()),
                "axes": args.axes,
                "scene": args.scene,
                "plane": (int(t), int(z)),
                "route": args.route,
                "labels": str(tmp / "labels.ome.zarr" / "0"),
                "probabilities": prob_path,
                "axes_out": axes_out,
            }
            for t, z in planes
        ]

        bar = Bar(f"{Path(path).name}: planes", args.quiet)
        try:
            outcomes = execute(specs, segment_task, client=client, retries=args.retries, progress=bar)
        finally:
            bar.close()
        failed = [o for o in outcomes if not o.ok]
        if failed:
            first = failed[0]
            how = "failed on bad input" if all(o.input_error for o in failed) else "failed"
            raise TaskFailedError.of(f"{len(failed)} plane(s) {how}: {first.error}", failed)
        report = {
            "image": str(path),
            "classifier": str(Path(clf_path).resolve()),
            "classes": [int(c) for c in clf.classes],
            "class_names": {str(k): v for k, v in names.items()},
            "route": args.route or clf.route,
            "axes": axes_out,
            "shape": list(shape),
            "planes": [o.result for o in outcomes],
            "settings": clf.settings,
        }
        (tmp / "segment.json").write_text(json.dumps(report, indent=1))
        txn.commit()
        return report


def cmd_segment(args) -> int:
    for p in args.images:
        if not Path(p).exists():
            raise UsageError(f"image file not found: {p}")
    if not Path(args.classifier).is_file():
        raise UsageError(f"--classifier file not found: {args.classifier}")
    _check_planes_flag(args.planes)
    check_dask_flags(args)
    _parse_memory(args.max_memory)
    if args.axes is not None:
        from .sources import normalise_axes

        try:
            normalise_axes(args.axes, len(args.axes), "--axes")
        except (ValueError, TypeError) as exc:
            raise UsageError(str(exc)) from exc
    from .core.feature_queries import ScribbleClassifier
    from .segmentation import options_from_classifier

    try:
        clf = ScribbleClassifier.load(args.classifier)
        if not clf.settings and args.backbone is None:
            raise UsageError(
                f"--classifier {args.classifier} does not record how its features were made (a format-1 file, "
                "or trained on bare arrays): give --backbone, --layer and --weights as it was trained"
            )
        options = options_from_classifier(
            clf,
            backbone=args.backbone,
            layer=args.layer,
            input_size=args.input_size,
            channels=_parse_channels_flag(args.channels) if args.channels is not None else None,
            weights=args.weights,
            device=args.device,
            precision=args.precision,
            max_memory=args.max_memory,
        )
        from .core.device import resolve_device

        resolve_device(options.device)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise UsageError(f"--classifier {args.classifier}: {exc}") from exc
    inputs = expand_inputs(args.images)
    out = _output_dir(args.out)
    names = output_names(inputs)
    rows = [["image", "planes", "shape", "classes", "seconds", "status", "output"]]
    failures: List[BaseException] = []
    with dask_from_args(args) as client:
        for path, name in zip(inputs, names):
            target = out / name
            if args.skip_existing and (target / "segment.json").is_file():
                rows.append([path, "", "", "", "", "skipped (exists)", str(target)])
                continue
            t0 = time.perf_counter()
            try:
                rep = _segment_one(path, target, args.classifier, clf, options, args, client)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:  # noqa: BLE001 - reported; the batch goes on
                if getattr(args, "traceback", False):
                    import traceback

                    traceback.print_exc()
                failures.append(exc)
                kind = "bad input" if _usage_like(exc) else "error"
                print(f"upsample-anything: {path}: {kind}: {_one_line(exc)}", file=sys.stderr)
                rows.append([path, "", "", "", "", "FAILED: " + type(exc).__name__, ""])
                continue
            rows.append(
                [
                    path,
                    str(len(rep["planes"])),
                    "x".join(map(str, rep["shape"])),
                    ",".join(map(str, rep["classes"])),
                    f"{time.perf_counter() - t0:.1f}",
                    "ok",
                    str(target / "labels.ome.zarr"),
                ]
            )
    print(_table(rows))
    if failures:
        print(f"upsample-anything: {len(failures)} of {len(inputs)} input(s) failed", file=sys.stderr)
        return EXIT_USAGE if all(_usage_like(e) for e in failures) else EXIT_FAILURE
    return EXIT_OK
