#!/usr/bin/env bash
# Idempotent setup of a development / CI environment from a clean checkout.
#
#   bash scripts/setup.sh
#
# 1. System packages (Debian/Ubuntu, apt-get): the Xvfb virtual display and the runtime
#    libraries that PyQt6's Qt xcb platform plugin and vispy's OpenGL need. Only packages
#    that are missing are installed; with none missing, apt is not touched at all.
# 2. .venv (python3 -m venv) if missing.
# 3. PyTorch first, pinned (see below), then `pip install -e ".[testing]"` (napari, PyQt6,
#    pytest, and the build and lint tools CI uses: build, setuptools-scm, ruff).
#
# Steps that are already done are skipped; a stamp in .venv records the last successful
# pip install, so a second run takes seconds. Environment knobs:
#   PYTHON=python3.11        interpreter used to create .venv (default: python3)
#   UPA_SETUP_FORCE=1        redo the pip steps even if the stamp is current
#   UPA_SKIP_APT=1           do not check/install system packages
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

log() { printf '\n==> [setup %3ds] %s\n' "$SECONDS" "$*"; }
die() { printf '\nsetup.sh: ERROR: %s\n' "$*" >&2; exit 1; }
run() { printf '+ %s\n' "$*"; "$@"; }

PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"
VPY="$VENV/bin/python"
ARCH="$(uname -m)"

# --------------------------------------------------------------------------- apt
# Why each package (checked with ldd on PyQt6-Qt6's plugins/platforms/libqxcb.so,
# lib/libQt6XcbQpa.so.6, libQt6Gui/Widgets/OpenGL*.so.6 and plugins/xcbglintegrations,
# and by napari drawing an image under Xvfb):
#   xvfb                        virtual X server for the GUI tests (started by pytest-xvfb)
#   xauth                       needed by `xvfb-run` (handy for running napari by hand)
#   libxcb-* libx11-* libxkbcommon*
#                               direct dependencies of the Qt xcb platform plugin; without
#                               libxcb-icccm4/libxcb-keysyms1 Qt aborts with a misleading
#                               "xcb-cursor0 is needed" message
#   libgl1 libegl1 libglx-mesa0 libegl-mesa0 libgl1-mesa-dri
#                               OpenGL for vispy: glvnd front ends plus Mesa; the DRI
#                               package holds llvmpipe (software GL), dlopen()ed at run time
#                               so ldd does not show it, but without it napari cannot draw
#   libfontconfig1 libfreetype6 fonts-dejavu-core
#                               Qt text rendering needs fontconfig and at least one font
#   libdbus-1-3 libglib2.0-0    linked by libQt6DBus / libQt6Core
# (libxcb-xinerama0 is not needed: Qt 6 no longer links it.)
APT_PACKAGES=(
    xvfb xauth
    libxcb1 libx11-6 libx11-xcb1 libxcb-cursor0 libxcb-icccm4 libxcb-image0
    libxcb-keysyms1 libxcb-randr0 libxcb-render0 libxcb-render-util0 libxcb-shape0
    libxcb-shm0 libxcb-sync1 libxcb-util1 libxcb-xfixes0 libxcb-xkb1 libxcb-glx0
    libxkbcommon0 libxkbcommon-x11-0
    libgl1 libegl1 libglx-mesa0 libegl-mesa0 libgl1-mesa-dri
    libfontconfig1 libfreetype6 fonts-dejavu-core
    libdbus-1-3 libglib2.0-0
)

apt_missing() {
    local pkg
    for pkg in "$@"; do
        if ! dpkg-query -W -f='${Status}\n' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
            printf '%s\n' "$pkg"
        fi
    done
}

# A Debian system Python needs python3-venv for `python -m venv`.
if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1 && [[ ! -x "$VPY" ]]; then
    APT_PACKAGES+=(python3-venv)
fi

log "system packages"
if [[ "${UPA_SKIP_APT:-0}" == 1 ]]; then
    echo "UPA_SKIP_APT=1: not checking system packages"
elif [[ "$(uname -s)" != Linux ]]; then
    echo "not Linux: no system packages needed (Qt uses the native platform plugin)"
elif ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
    die "no apt-get/dpkg here; install the equivalents of: ${APT_PACKAGES[*]} (or set UPA_SKIP_APT=1)"
else
    mapfile -t MISSING < <(apt_missing "${APT_PACKAGES[@]}")
    if ((${#MISSING[@]} == 0)); then
        echo "all ${#APT_PACKAGES[@]} system packages already installed"
    else
        echo "missing: ${MISSING[*]}"
        SUDO=()
        if [[ "$(id -u)" != 0 ]]; then
            command -v sudo >/dev/null 2>&1 || die "not root and no sudo: install ${MISSING[*]} by hand"
            SUDO=(sudo)
        fi
        export DEBIAN_FRONTEND=noninteractive
        APT_OPTS=(-o DPkg::Lock::Timeout=300 -o Dpkg::Use-Pty=0)
        run "${SUDO[@]}" apt-get "${APT_OPTS[@]}" update -q
        run "${SUDO[@]}" apt-get "${APT_OPTS[@]}" install -y -q --no-install-recommends "${MISSING[@]}"
        mapfile -t STILL < <(apt_missing "${MISSING[@]}")
        ((${#STILL[@]} == 0)) || die "apt-get did not install: ${STILL[*]}"
    fi
fi

# --------------------------------------------------------------------------- venv
log "virtual environment ($VENV)"
if [[ -e "$VENV" && ! -x "$VPY" ]]; then
    die "$VENV exists but has no bin/python; remove it and rerun"
fi
if [[ ! -x "$VPY" ]]; then
    command -v "$PYTHON" >/dev/null 2>&1 || die "interpreter '$PYTHON' not found (set PYTHON=...)"
    run "$PYTHON" -m venv "$VENV"
else
    echo ".venv exists"
fi
"$VPY" -c 'import sys; assert sys.version_info >= (3, 10), sys.version' \
    || die ".venv's Python is older than 3.10 (requires-python >= 3.10)"
PYVER="$("$VPY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
echo "venv Python $PYVER ($("$VPY" -c 'import sys; print(sys.executable)')), machine $ARCH"

# --------------------------------------------------------------------------- pip
# Install torch explicitly BEFORE the project: the project only asks for torch>=2.1, and
# pip, asked for that with no torch present, would fetch the newest (multi-GB CUDA) build.
# The pins are the releases this kind of machine serves from local disk for Python 3.11
# (a pip constraint caps them there); on x86_64 the 2.14.1 wheel is a CUDA build that runs
# on the CPU (about 5.5 GB in the venv). Override with TORCH_SPEC="torch==... torchvision==...".
case "$ARCH" in
    x86_64) DEFAULT_TORCH_SPEC="torch==2.14.1 torchvision==0.29.1" ;;
    aarch64 | arm64) DEFAULT_TORCH_SPEC="torch==2.9.1 torchvision==0.24.1" ;;
    *) DEFAULT_TORCH_SPEC="" ;;
esac
TORCH_SPEC="${TORCH_SPEC-$DEFAULT_TORCH_SPEC}"

STAMP="$VENV/.upa-setup-stamp"
WANT_STAMP="$(
    {
        printf 'python=%s arch=%s torch=%s\n' "$PYVER" "$ARCH" "$TORCH_SPEC"
        cat pyproject.toml scripts/setup.sh
    } | sha256sum | cut -d' ' -f1
)"
# Cheap check (no imports of torch/napari) that the stamped environment is still whole.
venv_complete() {
    "$VPY" - <<'EOF' >/dev/null 2>&1
import importlib.util as u, sys
mods = ["torch", "torchvision", "napari", "PyQt6", "pytestqt", "pytest_xvfb", "ruff", "build", "napari_upsample_anything"]
sys.exit(any(u.find_spec(m) is None for m in mods))
EOF
}

if [[ "${UPA_SETUP_FORCE:-0}" != 1 && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT_STAMP" ]] && venv_complete; then
    log "python packages: up to date (stamp matches pyproject.toml/setup.sh; UPA_SETUP_FORCE=1 to redo)"
else
    rm -f "$STAMP"
    export PIP_DISABLE_PIP_VERSION_CHECK=1
    if [[ -n "$TORCH_SPEC" ]]; then
        log "pip: $TORCH_SPEC (first, so the project's torch>=2.1 is already satisfied)"
        # shellcheck disable=SC2086  # TORCH_SPEC is a space-separated list of requirements
        run "$VPY" -m pip install $TORCH_SPEC
    else
        log "pip: no torch pin for $ARCH; the project's torch requirement decides"
    fi
    log "pip: project, editable, with the testing extra"
    run "$VPY" -m pip install -e ".[testing]"
    log "pip check"
    run "$VPY" -m pip check || die "pip check found broken requirements"
    printf '%s\n' "$WANT_STAMP" >"$STAMP"
fi

"$VPY" - <<'EOF'
import importlib.metadata as md
names = ["torch", "torchvision", "napari", "PyQt6", "vispy", "pytest", "pytest-qt", "pytest-xvfb",
         "napari-upsample-anything"]
print("installed: " + ", ".join(f"{n} {md.version(n)}" for n in names))
EOF
log "setup done"
