"""What the ``upsample-anything`` commands print, and the exit codes they end with.

Progress bars (:class:`Bar`), the result table (:func:`_table`), one-line error messages
(:func:`describe_error`) and the warnings of a command folded into them (:class:`Notes`).
:class:`UsageError` is the one error class of a mistake in the command line (exit code 2);
it lives here, not in the ``cli`` module, so that ``python -m napari_upsample_anything.cli``
(which runs that module as ``__main__``) and the command modules raise and catch the same class.
"""

from __future__ import annotations

import sys
from typing import Dict, List

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """A mistake in how the command was called (exit code 2)."""


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
