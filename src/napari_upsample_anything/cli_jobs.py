"""What the ``run``, ``map``, ``segment`` and ``demo`` commands share: the Dask flags and the
client they ask for, one input through the pipeline's job, and the output folder names of a
batch. Below every command module (they import it; it imports none of them)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .cli_printing import Bar, UsageError


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


def check_dask_flags(args) -> None:
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


def dask_from_args(args):
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
