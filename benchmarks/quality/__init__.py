"""The quality benchmark as a package; ``benchmarks/bench_quality.py`` is its command line.

Modules: :mod:`.config` (runs, methods), :mod:`.scenes` (test images), :mod:`.baselines`
(the upsamplers compared), :mod:`.metrics`, :mod:`.run` (the tasks and both runs) and
:mod:`.report` (the pages and the figure).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "src") not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO / "src"))
