"""The command-line flags shared by the ``upsample-anything`` commands, turned into checked values.

Every check here runs before any model is loaded and raises :class:`~.cli_printing.UsageError`
naming the flag and the fix: the pipeline's options (:func:`options_from_args`), the memory
budget, ``--channels``, the syntax of ``--planes`` and the output folder.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from .cli_printing import UsageError

#: The smallest ``--max-memory`` a run works in: a backbone window and one render tile of
#: the smallest model need more than this, so a lower budget is refused before any model loads.
MIN_BUDGET_BYTES = 16 * 2**20


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
    from .core.units import format_bytes, no_budget

    if no_budget(text):
        return
    import psutil

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


#: Option fields whose flag is not spelled like the field: ``--random-weights`` (pretrained
#: negated), ``--pca-only`` (hr_features negated), ``--dtype`` (hr_dtype); ``--channels`` is
#: parsed by the caller (:func:`_parse_channels_flag`) and passed in.
_NOT_BY_FIELD_NAME = ("pretrained", "hr_features", "hr_dtype", "channels")


def options_from_args(args, channels=None):
    """The pipeline's options from the parsed flags, validated before any model is loaded
    (a bad value raises :class:`UsageError` naming the flag).

    Every option field that the command has a flag for (a flag whose ``dest`` is the field's
    name) is taken from ``args``; the others keep their defaults. So a new option needs only
    its field in :mod:`.pipeline.options` and its flag in the parser.
    """
    from dataclasses import fields

    from .pipeline import PipelineOptions

    if getattr(args, "random_weights", False) and getattr(args, "weights", None):
        raise UsageError("--random-weights and --weights FILE exclude each other: give one")
    values = {
        f.name: getattr(args, f.name)
        for f in fields(PipelineOptions)
        if f.name not in _NOT_BY_FIELD_NAME and hasattr(args, f.name)
    }
    values.update(
        channels=channels,
        pretrained=not getattr(args, "random_weights", False),
        hr_features=not getattr(args, "pca_only", False),
        hr_dtype=getattr(args, "dtype", "float32"),
    )
    try:
        opts = PipelineOptions(**values).validate()
        from .core.device import resolve_device
        from .core.features import resolve_backbone_name

        resolve_backbone_name(opts.backbone)  # names only: no model is created
        resolve_device(opts.device)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from exc
    check_budget(opts.max_memory)
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
