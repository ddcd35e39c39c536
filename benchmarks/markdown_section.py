"""A benchmark's table in a markdown page, between its own markers: the rest of the page is kept."""

from __future__ import annotations

import os
from pathlib import Path


def write_marked_section(path: Path, text: str, begin: str, end: str) -> None:
    """Put ``text`` between ``begin`` and ``end`` in ``path``, replacing what was there, or append
    the marked block when the page has no such markers; written to a temporary name and renamed."""
    old = path.read_text() if path.exists() else ""
    block = f"{begin}\n{text}\n{end}"
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + block + rest.split(end, 1)[1]
    else:
        new = old.rstrip("\n") + ("\n\n" if old else "") + block + "\n"
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(new)
    os.replace(tmp, path)
