"""Shared fixtures and helpers for the test suite."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

# Triton jits its own standard library (tl.zeros, ...) when triton.language is first imported,
# and only an import under TRITON_INTERPRET=1 gives functions that its CPU interpreter can run
# (tests/test_triton.py). torch, timm or the engine may import triton before those tests, so the
# variable is set for the whole session, before torch. The product's backend="auto" still picks
# Triton on CUDA only; tests that need it off remove it (monkeypatch, subprocess environments).
os.environ.setdefault("TRITON_INTERPRET", "1")

# A shell without job control starts background commands (`cmd &`, nohup, some CI runners) with
# SIGINT ignored, Python then installs no KeyboardInterrupt handler, and every subprocess the
# tests start inherits the ignored signal: the Ctrl-C tests (test_microscopy, test_interrupt_dask)
# would then test nothing but a process that cannot be interrupted, and fail. A handled signal is
# reset to its default on exec, so restoring Python's handler here gives each CLI subprocess the
# disposition a terminal gives it. (The product keeps an ignored SIGINT ignored, as nohup wants.)
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

TESTS = Path(__file__).resolve().parent
DATA = TESTS / "data"
sys.path.insert(0, str(TESTS))  # so tests can import reference_gsjbu


def rel_err(out, ref) -> float:
    """max |out - ref| / max |ref| (the tolerance measure used throughout the tests)."""
    out = torch.as_tensor(np.asarray(out) if not isinstance(out, torch.Tensor) else out).double()
    ref = torch.as_tensor(np.asarray(ref) if not isinstance(ref, torch.Tensor) else ref).double()
    return float((out - ref).detach().abs().max() / ref.detach().abs().max().clamp_min(1e-30))


def two_region_picture(h: int = 70, w: int = 84, seed: int = 0) -> np.ndarray:
    """Left half dark and smooth, right half bright with a red disc: uint8 RGB (H, W, 3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.full((h, w, 3), 0.2, np.float32)
    img[:, w // 2 :] = 0.75
    img[(yy - h / 2) ** 2 + (xx - 0.75 * w) ** 2 < (h / 5) ** 2] = (0.9, 0.1, 0.1)
    img += 0.03 * rng.standard_normal(img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def hub_offline(monkeypatch, home) -> None:
    """Hugging Face offline with an empty cache under ``home`` (nothing can be downloaded or found)."""
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def random_field(h: int, w: int, gen: torch.Generator, sigma=(0.5, 40.0), sigma_r=(0.003, 0.5)):
    """A random kernel field (log-uniform sigmas, any angle), as KernelField."""
    from napari_upsample_anything.core.field import KernelField

    def logu(lo, hi):
        return torch.exp(torch.empty(h, w).uniform_(np.log(lo), np.log(hi), generator=gen))

    theta = torch.empty(h, w).uniform_(-np.pi + 1e-3, np.pi - 1e-3, generator=gen)
    return KernelField(logu(*sigma), logu(*sigma), theta, logu(*sigma_r))


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def offline(monkeypatch):
    """No Hugging Face downloads (the machines that run the tests have no internet): a model
    that is not cached fails at once instead of after network timeouts."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def records():
    """napari notifications dispatched during the test."""
    from napari.utils.notifications import notification_manager

    start = len(notification_manager.records)
    return lambda: notification_manager.records[start:]


def _display_problem() -> str | None:
    """Why napari cannot draw here, or None. (pytest-xvfb normally provides a display.)"""
    platform = os.environ.get("QT_QPA_PLATFORM", "")
    if platform.split(":")[0] in {"offscreen", "minimal"}:
        return f"QT_QPA_PLATFORM={platform!r}: vispy cannot draw there; unset it and run under Xvfb (bash scripts/test.sh)"
    if sys.platform.startswith("linux") and not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        return "no DISPLAY: run the GUI tests under Xvfb (bash scripts/test.sh, or install xvfb for pytest-xvfb)"
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Fail GUI tests with a message before pytest-qt's session QApplication would abort the
    whole process on a machine without a display."""
    if item.get_closest_marker("gui") is not None:
        problem = _display_problem()
        if problem:
            pytest.fail(problem, pytrace=False)
