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
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .core.published import PUBLISHED_STEPS  # torch-free: the parser is built before torch loads

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
#: The smallest ``--max-memory`` a run works in: a backbone window and one render tile of
#: the smallest model need more than this, so a lower budget is refused before any model loads.
MIN_BUDGET_BYTES = 16 * 2**20


class UsageError(Exception):
    """A mistake in how the command was called (exit code 2)."""


# ------------------------------------------------------------------------------ helpers
class Bar:
    """tqdm progress bars driven by the pipeline's :class:`~..pipeline.Progress` events
    (one bar per stage and plane), or by the core's ``progress(done, total, info)`` protocol."""

    def __init__(self, desc: str, quiet: bool = False):
        self.desc = desc
        self.quiet = quiet
        self.bar = None
        self.key = None

    def __call__(self, done, total=None, info=None) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        loss = None
        if total is None:  # a pipeline Progress event
            event = done
            key = (event.stage, event.plane)
            desc = f"{self.desc}: {event.stage}" + (f" {event.plane + 1}/{event.n_planes}" if event.n_planes > 1 else "")
            done, total, loss = event.done, event.total, event.loss
        else:
            key, desc = total, self.desc
            loss = (info or {}).get("loss")
        if self.bar is None or self.key != key or self.bar.total != total:
            self.close()
            self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
            self.key = key
        self.bar.n = done
        if loss is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _table(rows: List[List[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _parse_memory(text: Optional[str]):
    from .core.units import parse_bytes

    if text is None:
        return None
    try:
        return parse_bytes(text, "--max-memory")
    except (ValueError, OverflowError) as exc:
        raise UsageError(f"--max-memory {text}: give a finite size such as 2GB or 512MiB ({exc})") from exc


def check_budget(text: Optional[str]) -> None:
    """Refuse a ``--max-memory`` below :data:`MIN_BUDGET_BYTES` or above the machine's
    memory (UsageError with the figures); warn when it exceeds the memory available now."""
    if text in (None, "", "auto"):
        return
    import psutil

    from .core.units import format_bytes

    nbytes = _parse_memory(text)
    if nbytes < MIN_BUDGET_BYTES:
        raise UsageError(
            f"--max-memory {text} ({format_bytes(nbytes)}) is too small: a run needs at least {format_bytes(MIN_BUDGET_BYTES)} "
            "(one backbone window and one render tile); give e.g. --max-memory 512MB"
        )
    mem = psutil.virtual_memory()
    if nbytes > mem.total:
        raise UsageError(
            f"--max-memory {text} ({format_bytes(nbytes)}) is more than this machine's memory ({format_bytes(mem.total)}, "
            f"{format_bytes(mem.available)} available now); give at most --max-memory {int(mem.available // 2**20)}MiB"
        )
    if nbytes > mem.available:
        print(
            f"upsample-anything: warning: --max-memory {text} ({format_bytes(nbytes)}) is more than the memory available now "
            f"({format_bytes(mem.available)} of {format_bytes(mem.total)}); the run may swap or be killed",
            file=sys.stderr,
        )


def _output_dir(out: str) -> Path:
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    return path


def options_from_args(args, channels=None):
    """The pipeline's options from the parsed flags, validated before any model is loaded
    (a bad value raises :class:`UsageError` naming the flag)."""
    from .pipeline import PipelineOptions

    defaults = PipelineOptions()
    backbone = getattr(args, "backbone", defaults.backbone)
    if getattr(args, "random_weights", False) and getattr(args, "weights", None):
        raise UsageError("--random-weights and --weights FILE exclude each other: give one")
    try:
        opts = PipelineOptions(
            backbone=backbone,
            layer=getattr(args, "layer", defaults.layer),
            input_size=getattr(args, "input_size", defaults.input_size),
            weights=getattr(args, "weights", None),
            pretrained=not getattr(args, "random_weights", False),
            steps=args.steps,
            device=args.device,
            precision=args.precision,
            max_memory=args.max_memory,
            guide_smoothing=args.guide_smoothing,
            fit_downsample=args.fit_downsample,
            fit_fraction=args.fit_fraction,
            channels=channels,
            hr_features=not getattr(args, "pca_only", False),
            hr_dtype=getattr(args, "dtype", "float32"),
            format=getattr(args, "format", "ome-zarr"),
        ).validate()
        from .core.device import resolve_device
        from .core.features import resolve_backbone_name

        resolve_backbone_name(backbone)  # names only: no model is created
        resolve_device(args.device)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from exc
    check_budget(args.max_memory)
    return opts


def _parse_channels_flag(text: Optional[str]):
    if text is None or text.strip().lower() == "all":
        return None
    try:
        chans = tuple(int(c) for c in text.split(","))
    except ValueError:
        raise UsageError(f"--channels {text!r}: give 'all' or channel indices separated by commas, e.g. 0,2") from None
    if any(c < 0 for c in chans) or len(set(chans)) != len(chans):
        raise UsageError(f"--channels {text!r}: give distinct channel indices >= 0")
    return chans


def _check_planes_flag(text: Optional[str]) -> None:
    from .sources import plane_ranges

    try:  # syntax only; ranges are checked against each image
        plane_ranges(text, 2**62, 2**62)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


# ------------------------------------------------------------------------------ run
def process_image(
    source,
    out: Path,
    options,
    *,
    planes: Optional[str] = "all",
    name: str = "",
    quiet: bool = False,
    client=None,
    retries: int = 2,
) -> Dict:
    """One input through the pipeline into the folder ``out`` (written under a temporary name
    and renamed when complete); returns the report. ``source``: a path or a
    :class:`~..pipeline.SourceRef` (an array with axes). ``client``: run the tasks on Dask
    (see :func:`~..pipeline.run_job`)."""
    from .pipeline import SourceRef, plan_job, run_job

    ref = source if isinstance(source, SourceRef) else SourceRef(path=str(source))
    bar = Bar(name or Path(str(ref.path or ref.name)).name, quiet)
    try:
        job = plan_job(ref, options, out, planes=planes)
        return run_job(job, progress=bar, client=client, retries=retries)
    finally:
        bar.close()


def _usage_like(exc: BaseException) -> bool:
    from .core.errors import is_input_error

    return is_input_error(exc)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def describe_error(exc: BaseException) -> str:
    """The one-line message of an error; missing pretrained weights say first what to pass."""
    if type(exc).__name__ == "WeightsUnavailableError":
        first = str(exc).strip().splitlines()[0]
        repo, filename = getattr(exc, "repo_id", None), getattr(exc, "filename", None)
        where = f" (download https://huggingface.co/{repo}/resolve/main/{filename} on a machine with internet)" if repo else ""
        return f"pass --weights FILE, a local weights file{where}, or --random-weights for testing only; {first}"
    failures = getattr(exc, "failures", None)  # a Dask job whose workers had no weights
    if failures and all(str(getattr(o, "error", "")).startswith("WeightsUnavailableError") for o in failures):
        first = str(failures[0].error).split(":", 1)[1].strip().splitlines()[0]
        return f"pass --weights FILE (a local weights file the workers can read) or --random-weights for testing only; on the Dask workers: {first}"
    return _one_line(exc)


class Notes:
    """Warnings of one command: Python warnings and log records (the image readers log
    through ``logging``), collected instead of printed as they come, so that an error stays
    one line. With ``verbose`` nothing is collected: everything prints as it comes.

    :meth:`take` returns (and forgets) the distinct messages so far; :meth:`fold` is the
    parenthesis an error line ends with; :meth:`show` prints the Python warnings of a
    success, one line each, and how many log lines were hidden.
    """

    def __init__(self, verbose: bool = False, quiet: bool = False):
        self.verbose, self.quiet = verbose, quiet
        self._records: List[str] = []
        self._logs: List[str] = []

    def __enter__(self) -> Notes:
        import logging
        import warnings

        if self.verbose:
            logging.basicConfig(level=logging.INFO, format="%(name)s: %(levelname)s: %(message)s")
            return self
        self._warnings = warnings.catch_warnings(record=True)
        caught = self._warnings.__enter__()
        self._caught = caught
        notes = self

        class _Collect(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                notes._logs.append(f"{record.name}: {record.getMessage()}")

        self._handler = _Collect(level=logging.WARNING)
        logging.getLogger().addHandler(self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self.verbose:
            return
        import logging

        logging.getLogger().removeHandler(self._handler)
        self._warnings.__exit__(*exc)

    def _drain(self) -> None:
        if not self.verbose:
            self._records.extend(f"{w.category.__name__}: {w.message}" for w in self._caught)
            self._caught.clear()

    def take(self) -> Dict[str, List[str]]:
        self._drain()
        out = {"warnings": list(dict.fromkeys(self._records)), "logs": list(dict.fromkeys(self._logs))}
        self._records.clear()
        self._logs.clear()
        return out

    def fold(self) -> str:
        notes = self.take()
        every = notes["warnings"] + notes["logs"]
        if not every:
            return ""
        first = " ".join(every[0].split())
        first = first if len(first) <= 160 else first[:157] + "..."
        return f" ({len(every)} warning(s) on the way, first: {first}; --verbose shows them all)"

    def show(self) -> None:
        notes = self.take()
        if self.quiet:
            return
        for w in notes["warnings"]:
            print(f"upsample-anything: warning: {_one_line(Exception(w))}", file=sys.stderr)
        if notes["logs"]:
            print(f"upsample-anything: {len(notes['logs'])} reader message(s) hidden; --verbose shows them", file=sys.stderr)


def _check_dask_flags(args) -> None:
    for flag, value, lo in (
        ("--workers", args.workers, 1),
        ("--threads-per-worker", args.threads_per_worker, 1),
        ("--retries", args.retries, 0),
    ):
        if value is not None and value < lo:
            raise UsageError(f"{flag} {value}: give a whole number >= {lo}")
    if not args.dask and (args.workers is not None or args.threads_per_worker != 1):
        raise UsageError("--workers / --threads-per-worker start local Dask workers: add --dask")
    if args.dask and args.dask != "local" and ":" not in args.dask:
        raise UsageError(
            f"--dask {args.dask}: give a scheduler address such as tcp://host:8786, or --dask alone for local workers"
        )


def output_names(paths: Sequence[str | Path]) -> List[str]:
    """Deterministic output folder names: each input's path relative to the inputs' common
    parent, without its image suffix (``a/x.tif``, ``b/x.tif`` -> ``a/x``, ``b/x``); inputs
    that would still collide keep their suffix (``x.tif`` -> ``x_tif``)."""
    resolved = [Path(p).resolve() for p in paths]
    if not resolved:
        return []
    parent = Path(os.path.commonpath([str(p.parent) for p in resolved]))
    rels = [p.relative_to(parent) for p in resolved]

    def strip(rel: Path) -> str:
        name = rel.name
        for suf in (".ome.tiff", ".ome.tif", ".ome.zarr"):
            if name.lower().endswith(suf):
                return str(rel.parent / name[: -len(suf)])
        return str(rel.with_suffix("")) if rel.suffix else str(rel)

    names = [strip(r) for r in rels]
    out = []
    for r, n in zip(rels, names):
        out.append(n if names.count(n) == 1 else str(r.parent / r.name.replace(".", "_")))
    return [n.replace(os.sep, "/") for n in out]


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
    _check_dask_flags(args)
    options = options_from_args(args, _parse_channels_flag(args.channels))
    out = _output_dir(args.out)
    names = output_names(args.images)
    with _dask_from_args(args) as client:  # one cluster for the whole batch (a no-op without --dask)
        return _run_batch(args, options, out, names, client)


def _dask_from_args(args):
    """The Dask client of ``--dask`` for a ``with`` block (None without the flag)."""
    import contextlib

    if not getattr(args, "dask", None):
        return contextlib.nullcontext(None)
    from .distributed import dask_client, worker_memory_limit

    return dask_client(
        args.dask,
        n_workers=args.workers,
        threads_per_worker=args.threads_per_worker,
        memory_limit=worker_memory_limit(args.max_memory),
    )


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


# ------------------------------------------------------------------------------ map
def read_map(path: str | Path):
    """An LR map from ``.npy``, TIFF or OME-Zarr as ``(h, w)`` or ``(C, h, w)`` numpy (channels
    first; OME-Zarr t / z axes of size 1 are dropped)."""
    import numpy as np

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"map file not found: {p}")
    name = p.name.lower()
    try:
        if name.endswith(".npy"):
            arr = np.load(p, allow_pickle=False)
        elif name.endswith((".tif", ".tiff")):
            import tifffile

            arr = tifffile.imread(p)
        elif name.endswith(".zarr") or p.is_dir():
            from .omezarr import open_level0

            z, axes, _ = open_level0(p)
            arr = np.asarray(z[...])
            drop = tuple(i for i, a in enumerate(axes) if a in "tz" and arr.shape[i] == 1)
            arr = arr.squeeze(drop) if drop else arr
        else:
            raise ValueError(f"{p}: use a .npy, TIFF or OME-Zarr map")
    except (ValueError, FileNotFoundError):
        raise
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"cannot read {p} as a map ({type(exc).__name__}: {exc})") from exc
    if arr.ndim not in (2, 3):
        raise ValueError(f"{p}: the map has shape {arr.shape}; give (h, w) or channels-first (C, h, w)")
    return arr


def _write_map(path: Path, arr, pixel_sizes=None, unit=None) -> None:
    """Write ``arr`` to ``path`` (.npy, .tif, .ome.zarr) under a temporary name, then rename."""
    import numpy as np

    name = path.name.lower()
    path.parent.mkdir(parents=True, exist_ok=True)  # as `run --out` does
    tmp = path.parent / f".{path.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        if name.endswith(".npy"):
            with open(tmp, "wb") as f:
                np.save(f, arr)
        elif name.endswith((".tif", ".tiff")):
            import tifffile

            tifffile.imwrite(tmp, arr, ome=True, metadata={"axes": "YX" if arr.ndim == 2 else "CYX"})
        else:
            from .omezarr import channel_windows, create_image

            a = arr if arr.ndim == 3 else arr[None]
            names = ["labels"] if arr.ndim == 2 and arr.dtype.kind in "iub" else [f"map {i}" for i in range(a.shape[0])]
            z = create_image(
                tmp,
                a.shape,
                "cyx",
                dtype=a.dtype,
                pixel_sizes=pixel_sizes,
                unit=unit,
                name="map",
                channel_names=names,
                windows=channel_windows(a),
            )
            z[...] = a
        if path.is_dir():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise


def cmd_map(args) -> int:
    from .pipeline import map_kind, upsample_map
    from .sources import open_image

    for p, flag in ((args.map, "MAP"), (args.image, "--image")):
        if not Path(p).exists():
            raise UsageError(f"{flag} file not found: {p}")
    if args.kernels is not None and not Path(args.kernels).exists():
        raise UsageError(f"--kernels file not found: {args.kernels}")
    out = Path(args.out)
    if not out.name.lower().endswith((".npy", ".tif", ".tiff", ".zarr")):
        raise UsageError(f"--out {args.out}: name a .npy, .tif or .ome.zarr file")
    for parent in (out.parent, *out.parent.parents):
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"--out {args.out}: {parent} exists and is not a folder")
            break
    _check_planes_flag(args.planes)
    if args.kind not in ("auto", "labels", "continuous"):
        raise UsageError(f"--kind {args.kind}: use auto, labels or continuous")
    options = options_from_args(args, _parse_channels_flag(args.channels))
    try:
        lr = read_map(args.map)
        kind = map_kind(lr, args.kind)
        src = open_image(args.image, axes=args.axes, scene=args.scene)
        planes = src.planes(args.planes)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from exc
    if len(planes) != 1:
        raise UsageError(f"{args.image} has {len(planes)} planes; pick the one the map belongs to with --planes (e.g. z=3)")
    _check_dask_flags(args)
    if args.dask:
        return _map_on_dask(args, options, kind, planes[0])
    t, z = planes[0]
    try:
        guide = src.guide(t, z, options.channels)
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - a reader's error on a damaged file comes in any type
        raise UsageError(f"--image {args.image}: cannot read plane t={t} z={z} ({type(exc).__name__}: {exc})") from exc
    field = None
    if args.kernels is not None:
        field = _load_kernels(args.kernels, (t, z))
        if tuple(field.shape) != tuple(lr.shape[-2:]):
            raise UsageError(
                f"--kernels {args.kernels} are on a {field.shape[0]} x {field.shape[1]} grid but the map is "
                f"{lr.shape[-2]} x {lr.shape[-1]}; leave --kernels out to fit kernels for the map's grid"
            )
    bar = Bar(f"{Path(args.map).name}", args.quiet)
    try:
        res = upsample_map(lr, guide, field, options, kind=kind, progress=bar)
    finally:
        bar.close()
    result = res["labels"] if kind == "labels" else res["values"]
    if kind == "continuous" and lr.ndim == 2:
        result = result[0]
    sizes = {a: src.pixel_sizes.get(a) for a in "yx"}
    _write_map(out, result, sizes, src.unit if any(sizes.values()) else None)
    H, W = guide.shape[:2]
    print(
        f"{args.map} ({kind}, {'x'.join(map(str, lr.shape))}) -> {out} ({'x'.join(map(str, result.shape))}, {result.dtype}); "
        f"kernels {'from ' + str(args.kernels) if args.kernels else 'fitted'} on {Path(args.image).name} plane t={t} z={z} ({H}x{W})"
    )
    return EXIT_OK


def _map_on_dask(args, options, kind: str, plane) -> int:
    """``map --dask``: the whole map job as one task on a Dask worker, which reads the map and
    the image plane and writes the output file itself (nothing large through the scheduler)."""
    from .distributed import execute
    from .pipeline import JobInputError, JobTaskError, describe_map_task

    spec = {
        "map": str(Path(args.map).resolve()),
        "image": str(Path(args.image).resolve()),
        "axes": args.axes,
        "scene": args.scene,
        "plane": tuple(plane),
        "kernels": str(Path(args.kernels).resolve()) if args.kernels else None,
        "kind": kind,
        "options": options,
        "out": str(Path(args.out).resolve()),
    }
    with _dask_from_args(args) as client:
        bar = Bar(f"{Path(args.map).name}: tasks", args.quiet)
        try:
            [outcome] = execute([spec], map_task, client=client, retries=args.retries, progress=bar)
        finally:
            bar.close()
    if not outcome.ok:
        if outcome.input_error:  # bad input: not retried, exit code 2 as in the serial path
            raise JobInputError(f"{describe_map_task(spec)} failed on bad input (not retried): {outcome.error}", [outcome])
        raise JobTaskError(f"{describe_map_task(spec)} failed after {args.retries} retries: {outcome.error}", [outcome])
    print(outcome.result["summary"])
    return EXIT_OK


def map_task(spec: dict) -> dict:
    """One ``map`` job in any process (a Dask worker): read, upsample, write ``spec["out"]``."""
    from .pipeline import upsample_map
    from .sources import open_image

    lr = read_map(spec["map"])
    src = open_image(spec["image"], axes=spec["axes"], scene=spec["scene"])
    t, z = spec["plane"]
    options = spec["options"]
    guide = src.guide(t, z, options.channels)
    field = _load_kernels(spec["kernels"], (t, z)) if spec["kernels"] else None
    res = upsample_map(lr, guide, field, options, kind=spec["kind"])
    result = res["labels"] if spec["kind"] == "labels" else res["values"]
    if spec["kind"] == "continuous" and lr.ndim == 2:
        result = result[0]
    sizes = {a: src.pixel_sizes.get(a) for a in "yx"}
    out = Path(spec["out"])
    _write_map(out, result, sizes, src.unit if any(sizes.values()) else None)
    H, W = guide.shape[:2]
    summary = (
        f"{spec['map']} ({spec['kind']}, {'x'.join(map(str, lr.shape))}) -> {out} ({'x'.join(map(str, result.shape))}, {result.dtype}); "
        f"kernels {'from ' + str(spec['kernels']) if spec['kernels'] else 'fitted'} on {Path(spec['image']).name} plane t={t} z={z} ({H}x{W}), on Dask"
    )
    return {"summary": summary, "shape": list(result.shape)}


def _load_kernels(path: str | Path, plane):
    from .core.field import KernelField

    p = Path(path)
    try:
        if p.is_dir() or p.name.lower().endswith(".zarr"):
            from .omezarr import read_kernels

            fields = read_kernels(p)
            if plane in fields:
                return fields[plane]
            if len(fields) == 1:
                return next(iter(fields.values()))
            raise ValueError(f"--kernels {p} has no kernels for plane t={plane[0]} z={plane[1]} (it has {sorted(fields)})")
        return KernelField.load(p)
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - unreadable file
        raise UsageError(f"--kernels {p} is not a kernel field file ({type(exc).__name__}: {exc})") from exc


# ------------------------------------------------------------------------------ demo
def model_free_demo(image, outdir: Path, args, field=None, quiet: bool = False) -> Dict:
    """Upsample downsampled stain maps of the sample, guided by the image, scored against truth.

    Truth: the haematoxylin and DAB densities of the RGB histology image (colour
    deconvolution, skimage.color.rgb2hed), scaled to [0, 1], plus a soft "DAB-positive"
    probability map. They are area-averaged to the ViT patch grid (patch 14), then upsampled
    by nearest, bilinear, bicubic and GSJBU (kernels fitted on the RGB image); PSNR against
    the full-resolution truth.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F
    from skimage.color import rgb2hed

    from . import api
    from .core.io import save_png, side_by_side

    H, W = image.shape[:2]
    h, w = max(1, round(H / 14)), max(1, round(W / 14))
    hed = rgb2hed(image)
    maps = []
    for c in (0, 2):
        lo, hi = np.percentile(hed[..., c], [1, 99])
        maps.append(np.clip((hed[..., c] - lo) / (hi - lo), 0, 1))
    maps.append(1.0 / (1.0 + np.exp(-(maps[1] - 0.5) * 12.0)))
    truth = torch.from_numpy(np.stack(maps).astype(np.float32))
    lr = F.adaptive_avg_pool2d(truth[None], (h, w))[0]
    if field is None:
        bar = Bar("demo: fit", quiet)
        field = api.fit_kernels(
            image,
            (h, w),
            steps=args.steps,
            device=args.device,
            max_memory=_parse_memory(args.max_memory),
            progress=bar,
            downsample=args.fit_downsample,
            guide_smoothing=args.guide_smoothing,
        )
        bar.close()
    results = {
        "nearest": F.interpolate(lr[None], size=(H, W), mode="nearest")[0],
        "bilinear": F.interpolate(lr[None], size=(H, W), mode="bilinear", align_corners=False)[0],
        "bicubic": F.interpolate(lr[None], size=(H, W), mode="bicubic", align_corners=False)[0].clamp(0, 1),
        "gsjbu": torch.from_numpy(api.render(lr.numpy(), image, field, device=args.device, guide_smoothing=args.guide_smoothing)),
    }
    names = ["haematoxylin", "DAB", "DAB probability"]
    psnr = {}
    for method, up in results.items():
        mse = ((up - truth) ** 2).mean(dim=(1, 2))
        psnr[method] = {n: float(10 * torch.log10(1.0 / m)) for n, m in zip(names, mse)}
    gray = lambda t: np.repeat(t.numpy()[..., None], 3, -1)  # noqa: E731
    save_png(outdir / "model_free_dab.png", side_by_side(gray(truth[1]), gray(results["bilinear"][1]), gray(results["gsjbu"][1])))
    return {"lr_shape": [h, w], "hr_shape": [H, W], "maps": names, "psnr_db": psnr, "files": ["model_free_dab.png"]}, field


def replace_format(options, fmt: str):
    from dataclasses import replace

    return replace(options, format=fmt)


def cmd_demo(args) -> int:
    import skimage.data

    from .core.features import WeightsUnavailableError

    out = _output_dir(args.out)
    image = skimage.data.immunohistochemistry()
    print(f"demo: scikit-image's immunohistochemistry sample ({image.shape[0]}x{image.shape[1]} RGB) -> {out}")
    report: Dict = {"image": "skimage.data.immunohistochemistry", "image_shape": list(image.shape)}
    field = None
    options = options_from_args(args)
    try:
        from .pipeline import SourceRef

        ref = SourceRef(array=image, axes="yxs", name="immunohistochemistry")
        rep = process_image(ref, out / "features", replace_format(options, "npy"), name="immunohistochemistry", quiet=args.quiet)
        report["features"] = rep
        from .core.field import KernelField

        field = KernelField.load(out / "features" / "kernels.npz")
        print(
            f"features: {rep['backbone']} ({rep['weights_source']}), {rep['channels']} channels, "
            f"{rep['lr_shape'][0]}x{rep['lr_shape'][1]} -> {rep['hr_shape'][0]}x{rep['hr_shape'][1]}; features/pca.png, features/features_hr.npy written"
        )
    except WeightsUnavailableError as exc:
        first = str(exc).strip().splitlines()[0]
        print(
            f"pretrained weights are not available here ({first}); running the model-free part of the demo "
            "(pass --weights FILE to run the feature part)"
        )
        report["features"] = {"skipped": str(exc)}
    free, field = model_free_demo(image, out, args, field, quiet=args.quiet)
    report["model_free"] = free
    field.save(out / "kernels.npz")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    rows = [["map (PSNR dB)"] + list(free["psnr_db"])]
    for name in free["maps"]:
        rows.append([name] + [f"{free['psnr_db'][m][name]:.2f}" for m in free["psnr_db"]])
    print(_table(rows))
    print(f"outputs in {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))
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
            choices=["auto", "fp32", "fp16", "bf16"],
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
            choices=["bicubic", "area"],
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
        choices=["ome-zarr", "npy"],
        help="array outputs: ome-zarr (features.ome.zarr, pca.ome.zarr with a pyramid, kernels.ome.zarr) or npy (features_hr.npy, kernels.npz) (default: %(default)s)",
    )
    run.add_argument(
        "--pca-only", action="store_true", help="write only the PCA picture, kernels and report (skip the C x H x W features)"
    )
    run.add_argument(
        "--dtype", default="float32", choices=["float32", "float16"], help="dtype of the HR features (default: %(default)s)"
    )
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
