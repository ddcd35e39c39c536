"""A test-only pause point: lets a test interrupt a run while it is known to be inside a stage.

Set ``UPA_TEST_HOLD=<stage>:<path>`` (for example ``render:/tmp/x/held``) in the environment of
a run. When the run reports the first finished unit of ``<stage>`` (a pipeline progress event
with ``done >= 1``), it creates ``<path>`` and then waits there, doing nothing, until it is
interrupted (SIGINT, a killed worker) or ``UPA_TEST_HOLD_S`` seconds (default 120) have passed.
A test waits for ``<path>`` to appear, then sends its signal: the signal is then certain to
arrive while the run is inside that stage, however loaded the machine is. Without the variable
nothing changes (the callback is returned as it was). Never set it outside tests.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Optional

HOLD_ENV = "UPA_TEST_HOLD"
HOLD_SECONDS_ENV = "UPA_TEST_HOLD_S"


def with_test_hold(progress: Optional[Callable], stage: str) -> Optional[Callable]:
    """``progress`` wrapped to hold at the first finished unit of ``stage`` when ``UPA_TEST_HOLD``
    names that stage; ``progress`` itself (possibly None) otherwise."""
    spec = os.environ.get(HOLD_ENV, "")
    held_stage, _, path = spec.partition(":")
    if held_stage != stage or not path:
        return progress
    limit = float(os.environ.get(HOLD_SECONDS_ENV, "120"))

    def held(event) -> None:
        if progress is not None:
            progress(event)
        if event.done >= 1 and not Path(path).exists():
            Path(path).write_text(f"{os.getpid()}\n")
            deadline = time.monotonic() + limit
            while time.monotonic() < deadline:  # an interrupt arrives here, inside the stage
                time.sleep(0.01)

    return held
