"""``upsample-anything map``: upsample a low-resolution map onto its image.

:func:`cmd_map` checks the flags and the inputs (before any kernel fit), then runs the job
:func:`map_job` once: directly, or with ``--dask`` as the one task of a Dask worker, which
reads the map and the image plane and writes the output file itself (nothing large goes
through the scheduler). The files are read and written by :mod:`.map_io`.
"""

from __future__ import annotations

from pathlib import Path

from .cli_options import _check_planes_flag, _parse_channels_flag, options_from_args
from .cli_printing import EXIT_OK, Bar, UsageError
from .map_io import load_kernels, read_map, write_map


class MapInputError(UsageError, ValueError):
    """An input of a map job that does not fit: a usage error (exit code 2) in the command,
    and a bad-input failure on a Dask worker (a ``ValueError``: not retried, since it would
    fail the same way again)."""


def cmd_map(args) -> int:
    from .pipeline import map_kind
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
    from .cli_jobs import check_dask_flags, dask_from_args

    check_dask_flags(args)
    # A Dask worker may run in another folder: it gets absolute paths. Serially the paths stay
    # as given (the summary line names them so).
    where = (lambda p: str(Path(p).resolve())) if args.dask else str
    spec = {
        "map": where(args.map),
        "image": where(args.image),
        "axes": args.axes,
        "scene": args.scene,
        "plane": tuple(planes[0]),
        "kernels": None if args.kernels is None else where(args.kernels),
        "kind": kind,
        "options": options,
        "out": where(args.out),
    }
    if args.dask:
        from .distributed import execute
        from .pipeline import JobInputError, JobTaskError, describe_map_task

        with dask_from_args(args) as client:
            bar = Bar(f"{Path(args.map).name}: tasks", args.quiet)
            try:
                [outcome] = execute([spec], map_job, client=client, retries=args.retries, progress=bar)
            finally:
                bar.close()
        if not outcome.ok:
            if outcome.input_error:  # bad input: not retried, exit code 2 as in the serial path
                raise JobInputError(f"{describe_map_task(spec)} failed on bad input (not retried): {outcome.error}", [outcome])
            raise JobTaskError(f"{describe_map_task(spec)} failed after {args.retries} retries: {outcome.error}", [outcome])
        print(outcome.result["summary"] + ", on Dask")
        return EXIT_OK
    bar = Bar(f"{Path(args.map).name}", args.quiet)
    try:
        done = map_job(spec, bar, lr=lr, src=src)
    finally:
        bar.close()
    print(done["summary"])
    return EXIT_OK


def map_job(spec: dict, progress=None, *, lr=None, src=None) -> dict:
    """One ``map`` job in any process (the command's or a Dask worker's): read the map and the
    image plane, upsample, write ``spec["out"]``.

    Parameters
    ----------
    spec : dict
        ``map``, ``image`` (paths), ``axes``, ``scene``, ``plane`` ``(t, z)``, ``kernels`` (a
        path, or None to fit kernels on the map's grid), ``kind`` (``"labels"`` or
        ``"continuous"``), ``options`` (:class:`~.pipeline.PipelineOptions`), ``out`` (a path).
    progress : callable, optional
        The core's ``progress(done, total, info)`` for the fit and the render.
    lr, src : optional
        The map array and the opened image, when the caller has read them already (the command
        reads them to check the flags); read from ``spec`` otherwise.

    Returns
    -------
    dict
        ``summary``: the line the command prints; ``shape``: the shape of the written map.

    Raises
    ------
    MapInputError
        The image plane cannot be read, or the kernels are on another grid than the map.
    """
    from .pipeline import upsample_map
    from .sources import open_image

    lr = read_map(spec["map"]) if lr is None else lr
    src = open_image(spec["image"], axes=spec["axes"], scene=spec["scene"]) if src is None else src
    t, z = spec["plane"]
    options = spec["options"]
    try:
        guide = src.guide(t, z, options.channels)
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - a reader's error on a damaged file comes in any type
        raise MapInputError(f"--image {spec['image']}: cannot read plane t={t} z={z} ({type(exc).__name__}: {exc})") from exc
    field = None
    if spec["kernels"] is not None:
        field = load_kernels(spec["kernels"], (t, z))
        if tuple(field.shape) != tuple(lr.shape[-2:]):
            raise MapInputError(
                f"--kernels {spec['kernels']} are on a {field.shape[0]} x {field.shape[1]} grid but the map is "
                f"{lr.shape[-2]} x {lr.shape[-1]}; leave --kernels out to fit kernels for the map's grid"
            )
    res = upsample_map(lr, guide, field, options, kind=spec["kind"], progress=progress)
    result = res["labels"] if spec["kind"] == "labels" else res["values"]
    if spec["kind"] == "continuous" and lr.ndim == 2:
        result = result[0]
    sizes = {a: src.pixel_sizes.get(a) for a in "yx"}
    out = Path(spec["out"])
    write_map(out, result, sizes, src.unit if any(sizes.values()) else None)
    H, W = guide.shape[:2]
    summary = (
        f"{spec['map']} ({spec['kind']}, {'x'.join(map(str, lr.shape))}) -> {out} ({'x'.join(map(str, result.shape))}, {result.dtype}); "
        f"kernels {'from ' + str(spec['kernels']) if spec['kernels'] else 'fitted'} on {Path(spec['image']).name} plane t={t} z={z} ({H}x{W})"
    )
    return {"summary": summary, "shape": list(result.shape)}
