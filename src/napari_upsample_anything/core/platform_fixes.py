"""Work-arounds for clashes between native libraries that the core loads.

Kept apart from the computing modules so that the reason for each is documented once.
"""

from __future__ import annotations

import os
import threading

_TRITON_LOCK = threading.Lock()


def preload_triton_safely() -> bool:
    """Import triton with ``RTLD_DEEPBIND`` when an LLVM is already loaded in this process.

    timm imports torchvision, which imports ``torch._dynamo``, which imports triton (shipped
    with CUDA builds of torch). triton's ``libtriton.so`` carries its own LLVM; when the
    OpenGL driver already loaded Mesa's ``libLLVM`` (software rendering: llvmpipe, Xvfb,
    VMs, remote desktops), triton's LLVM symbols bind to Mesa's and the import **segfaults**
    -- napari would crash on the first run. Loading ``libtriton.so`` with ``RTLD_DEEPBIND``
    makes it use its own symbols. Linux only; a no-op when triton is absent, already
    imported, or no LLVM is loaded. Returns True when it imported triton.
    """
    import importlib.util
    import sys

    if not sys.platform.startswith("linux") or "triton" in sys.modules or not hasattr(os, "RTLD_DEEPBIND"):
        return False
    with _TRITON_LOCK:
        if "triton" in sys.modules:
            return False
        try:
            if importlib.util.find_spec("triton") is None:
                return False
            with open("/proc/self/maps") as fh:
                if "libLLVM" not in fh.read():
                    return False
        except (OSError, ValueError, ImportError):
            return False
        old = sys.getdlopenflags()
        sys.setdlopenflags(old | os.RTLD_DEEPBIND)
        try:
            import triton  # noqa: F401
        except Exception:  # noqa: BLE001 - then torch will just run without triton
            return False
        finally:
            sys.setdlopenflags(old)
        return True
