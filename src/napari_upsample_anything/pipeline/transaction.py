"""The one output transaction: results are written into a hidden temporary folder next to
their destination and moved into place only when complete; on any error or Ctrl-C the
temporary folder (and any parent folders the transaction made) is removed and an earlier
result stays.

Two ways to commit, one transaction:

* ``entries=None`` (a pipeline job, :class:`~.job.Job`): the temporary folder *becomes* the
  output folder; an earlier folder there is replaced only at that moment.
* ``entries=("labels.ome.zarr", ..., "segment.json")`` (``segment``, which writes beside the
  outputs of ``run`` in the same folder): those entries are moved into the output folder one by
  one, in order (the last one marks the output complete); other files there stay.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path
from typing import List, Optional, Sequence


class OutputTransaction:
    """Write into :attr:`tmp`, then :meth:`commit` into :attr:`out`, or :meth:`abort`.

    Parameters
    ----------
    out : path
        The final output folder.
    entries : sequence of str, optional
        None: the whole temporary folder replaces ``out`` on commit. Names: only these entries
        of the temporary folder are moved into ``out`` (created if missing), in this order;
        missing ones are skipped, an existing entry of that name is replaced.

    Use as a context manager (``with OutputTransaction(out) as txn:``): :meth:`prepare` on entry,
    :meth:`abort` when the block raises (Ctrl-C included); :meth:`commit` is called by the block.
    """

    def __init__(self, out: str | Path, entries: Optional[Sequence[str]] = None):
        self.out = Path(out)
        self.entries = None if entries is None else tuple(entries)
        #: the hidden temporary folder next to ``out``
        self.tmp = self.out.parent / f".{self.out.name}.partial-{uuid.uuid4().hex[:8]}"
        self.created_dirs: List[Path] = []

    def prepare(self) -> None:
        """Create the temporary folder (and missing parents, remembered for :meth:`abort`)."""
        missing = []
        p = self.tmp.parent
        while not p.exists():
            missing.append(p)
            p = p.parent
        self.tmp.parent.mkdir(parents=True, exist_ok=True)
        self.created_dirs = list(reversed(missing))
        self.tmp.mkdir()

    def commit(self) -> Path:
        """Move the finished results into place; earlier results there are replaced only now."""
        if self.entries is None:
            old = None
            if self.out.exists():
                old = self.out.parent / f".{self.out.name}.old-{uuid.uuid4().hex[:8]}"
                os.replace(self.out, old)
            os.replace(self.tmp, self.out)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            return self.out
        self.out.mkdir(exist_ok=True)
        for name in self.entries:
            src, dst = self.tmp / name, self.out / name
            if not src.exists():
                continue
            if dst.is_dir():
                shutil.rmtree(dst)
            src.replace(dst)
        shutil.rmtree(self.tmp, ignore_errors=True)
        return self.out

    def abort(self) -> None:
        """Remove the temporary folder and any folders :meth:`prepare` created; earlier results stay."""
        # zarr writes through a background I/O thread: a chunk write in flight when Ctrl-C
        # arrived can land after a first removal, so remove until the folder stays gone.
        for _ in range(50):
            shutil.rmtree(self.tmp, ignore_errors=True)
            if not self.tmp.exists():
                time.sleep(0.05)
                if not self.tmp.exists():
                    break
            time.sleep(0.1)
        for d in reversed(self.created_dirs):
            try:
                d.rmdir()  # only if empty
            except OSError:
                pass

    def __enter__(self) -> OutputTransaction:
        self.prepare()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
