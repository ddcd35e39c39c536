#!/usr/bin/env bash
# Set up (idempotently) and run the test suite, GUI tests included, on a virtual display.
#
#   bash scripts/test.sh                 # everything
#   bash scripts/test.sh -m "not gui"    # extra arguments go to pytest unchanged
#   bash scripts/test.sh --stress        # the same with two busy CPU loops running beside it
#                                        # (a loaded machine: no test may depend on timing)
#
# The display: pytest-xvfb (in the `testing` extra) starts one Xvfb for the session and
# sets DISPLAY, so this works on a machine with no screen (CI) and does not pop windows
# up on a desktop. `pytest --no-xvfb` uses the real display instead.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

STRESS=0
if [[ "${1:-}" == --stress ]]; then
    STRESS=1
    shift
fi

T0=$SECONDS
bash scripts/setup.sh
T_SETUP=$((SECONDS - T0))

# napari reaches Qt through qtpy, which prefers PyQt5 if it happens to be installed;
# pin it to the binding pytest-qt uses (qt_api = "pyqt6" in pyproject.toml).
export QT_API="${QT_API:-pyqt6}"
# Offscreen Qt crashes vispy as soon as a layer is drawn: never inherit it.
case "${QT_QPA_PLATFORM:-}" in
    offscreen* | minimal*)
        echo "test.sh: ignoring QT_QPA_PLATFORM=$QT_QPA_PLATFORM (vispy cannot draw there)"
        unset QT_QPA_PLATFORM
        ;;
esac

if ((STRESS)); then
    HOGS=()
    for _ in 1 2; do
        (exec yes >/dev/null) &
        HOGS+=($!)
    done
    trap 'kill "${HOGS[@]}" 2>/dev/null || true' EXIT
    echo "==> [test] --stress: two busy loops running beside the tests (pids ${HOGS[*]})"
fi

printf '\n==> [test] .venv/bin/python -m pytest %s\n' "$*"
T1=$SECONDS
rc=0
.venv/bin/python -m pytest "$@" || rc=$?
printf '\n==> [test] setup %ds, pytest %ds, exit code %d\n' "$T_SETUP" "$((SECONDS - T1))" "$rc"
exit "$rc"
