"""Property-based fuzzing of the public entry points (issue #9).

Over dtypes, shapes, values and options of ``fit_kernels``, ``render``, ``upsample`` and
``KernelField.load``: every case either returns a finite result of the right shape or raises
a typed error (ValueError / TypeError / FileNotFoundError, which FitDivergedError is) whose
message names an argument. Never a bare RuntimeError / IndexError / ZeroDivisionError, never
NaN, never a hang (hypothesis ``deadline`` per case, tiny images, at most 2 fit steps).
Deterministic (``derandomize=True``) so CI sees the same cases every run.
"""

from __future__ import annotations

import re
from datetime import timedelta

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import napari_upsample_anything as upa
from napari_upsample_anything.core.field import KernelField

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

FUZZ = settings(
    max_examples=60,
    derandomize=True,
    deadline=timedelta(seconds=20),  # a generous per-case limit on a loaded 2-core CI machine
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)

ALLOWED = (ValueError, TypeError, FileNotFoundError)
ARGUMENTS = (
    "guide",
    "lr_shape",
    "steps",
    "lr",
    "radius",
    "alpha",
    "border",
    "guide_smoothing",
    "precision",
    "normalize",
    "lr_map",
    "out",
    "field",
    "channel_axis",
    "device",
    "max_memory",
    "seed",
    "file",
)
NAMES = re.compile(r"\b(" + "|".join(ARGUMENTS) + r")\b")

DTYPES = [np.uint8, np.uint16, np.int32, np.float16, np.float32, np.float64, np.bool_, np.complex64]
GUIDE_SHAPES = [(0, 5), (1, 1), (2, 3), (7, 9), (9, 7, 3), (12, 10, 3), (10, 12, 4), (10, 12, 1), (5, 8, 8), (8, 8, 2), (1, 1, 3)]
VALUES = ["random", "nan", "inf", "huge", "constant"]


def _mostly(valid: list, invalid: list):
    """Valid values three times as often as invalid ones, so that both paths get exercised."""
    return st.sampled_from(valid * max(1, 3 * len(invalid) // len(valid)) + invalid)


def _array(shape, dtype, values: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        a = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
        if values == "constant":
            a[...] = info.max
        return a
    if dtype.kind == "b":
        return rng.random(shape) > (0.5 if values != "constant" else 2.0)
    a = rng.standard_normal(shape)
    if dtype.kind == "c":
        a = a + 1j * rng.standard_normal(shape)
    if values == "nan" and a.size:
        a.flat[0] = np.nan
    elif values == "inf" and a.size:
        a.flat[-1] = np.inf
    elif values == "huge":
        a = a * (float(np.finfo(dtype).max) / 8 if dtype != np.float16 else 8000.0)
    elif values == "constant":
        a[...] = 3.0
    return a.astype(dtype)


def _check_outcome(call, expected_shape):
    """Run ``call``: a finite result of ``expected_shape`` or an allowed error naming an argument."""
    try:
        result = call()
    except ALLOWED as exc:
        assert NAMES.search(str(exc)), f"{type(exc).__name__} does not name an argument: {exc}"
        event(f"refused: {type(exc).__name__}")
        return None
    except Exception as exc:  # noqa: BLE001 - the point of the test
        raise AssertionError(f"untyped error {type(exc).__name__}: {exc}") from exc
    arr = result.detach().cpu().numpy() if isinstance(result, torch.Tensor) else np.asarray(result)
    assert arr.shape == tuple(expected_shape), (arr.shape, expected_shape)
    assert np.isfinite(arr).all(), "NaN or Inf returned"
    event("returned a finite result")
    return result


guides = st.builds(
    _array,
    _mostly(
        [(1, 1), (2, 3), (7, 9), (9, 7, 3), (12, 10, 3), (10, 12, 4), (10, 12, 1)], [(0, 5), (5, 8, 8), (8, 8, 2), (1, 1, 3)]
    ),
    _mostly([np.uint8, np.uint16, np.int32, np.float16, np.float32, np.float64, np.bool_], [np.complex64]),
    _mostly(["random", "huge", "constant"], ["nan", "inf"]),
    st.integers(0, 3),
)
fit_options = st.fixed_dictionaries(
    {},
    optional={
        "steps": _mostly([0, 1, 2, 2.0], [True, -1, None, 2.5, "2"]),
        "lr": _mostly([0.1, 10.0, 1e3], [float("inf"), float("nan"), 0, -1, "0.1", None]),
        "radius": _mostly([0, 1, 8], [True, -1, 300, 2.5, None]),
        "alpha": _mostly([2.0, 0.5], [0, float("nan"), 1e9, "2"]),
        "guide_smoothing": _mostly([0.0, 0.7, 1], [1e6, float("nan"), -1.0, float("inf")]),
        "precision": _mostly(["fp32", "fp16", "bf16", "FP32"], ["fp8", 3]),
        "normalize": _mostly(["auto", "unit", "percentile", "none", (0, 255)], [(0, 1e-30), (0, float("inf")), (5, 1), "x"]),
        "seed": _mostly([0, 7], ["abc", 1.5, True]),
    },
)
lr_shapes = _mostly([(1, 1), (2, 2), (3, 2), (2, 2.0)], [(0, 1), (20, 20), (2, 2.5), (2,), "ab"])


@FUZZ
@given(guide=guides, lr_shape=lr_shapes, options=fit_options)
def test_fuzz_fit_kernels(guide, lr_shape, options):
    options.setdefault("steps", 2)
    field = _check_outcome(lambda: _fit_maps(guide, lr_shape, options), (4, *_pair(lr_shape)))
    if field is not None:
        assert _pair(lr_shape)[0] <= guide.shape[0]


def _pair(lr_shape):
    return tuple(int(v) for v in lr_shape) if isinstance(lr_shape, tuple) and len(lr_shape) == 2 else (0, 0)


def _fit_maps(guide, lr_shape, options):
    field = upa.fit_kernels(guide, lr_shape, max_memory="256MB", **options)
    return torch.stack([field.sigma_x, field.sigma_y, field.theta, field.sigma_r])


OUT_KINDS = [
    None,
    "float32",
    "float16",
    "float64",
    "uint8",
    "int32",
    "bool",
    "complex64",
    "torch32",
    "torch_int",
    "meta",
    "wrong_shape",
]


def _out(kind, shape):
    if kind is None:
        return None
    if kind == "torch32":
        return torch.empty(shape)
    if kind == "torch_int":
        return torch.empty(shape, dtype=torch.int32)
    if kind == "meta":
        return torch.empty(shape, device="meta")
    if kind == "wrong_shape":
        return np.empty((shape[0], shape[1] + 1, shape[2]), np.float32)
    return np.empty(shape, np.dtype(kind))


@FUZZ
@given(
    lr_shape=_mostly([(2, 2), (1, 3, 4), (3, 3, 3), (3, 4)], [(2, 20, 20), (0, 3, 4), (1, 1, 3, 4)]),
    lr_dtype=_mostly([np.uint8, np.uint16, np.int32, np.float16, np.float32, np.float64, np.bool_], [np.complex64]),
    lr_values=_mostly(["random", "huge", "constant"], ["nan", "inf"]),
    guide_shape=_mostly([(10, 12), (10, 12, 3)], [(5, 10, 12), (3, 4)]),
    guide_dtype=st.sampled_from([np.uint8, np.uint16, np.float32, np.float64]),
    out_kind=_mostly(
        [None, "float32", "float64", "torch32", "float16"],
        ["uint8", "int32", "bool", "complex64", "torch_int", "meta", "wrong_shape"],
    ),
    options=st.fixed_dictionaries(
        {},
        optional={
            "precision": st.sampled_from(["fp32", "fp16", "bf16"]),
            "radius": _mostly([0, 1, 8], [True, -2]),
            "alpha": _mostly([2.0, 0.1], [-1.0]),
            "guide_smoothing": _mostly([None, 0.0, 1.0], [1e6]),
            "channel_axis": _mostly([None], [0, -1, 5]),
            "border": _mostly(["repeat", "unique"], ["wrap"]),
        },
    ),
    seed=st.integers(0, 3),
)
def test_fuzz_render(lr_shape, lr_dtype, lr_values, guide_shape, guide_dtype, out_kind, options, seed):
    lr = _array(lr_shape, lr_dtype, lr_values, seed)
    guide = _array(guide_shape, guide_dtype, "random", seed)
    h, w = lr_shape[-2:] if len(lr_shape) >= 2 else (1, 1)
    gen = torch.Generator().manual_seed(seed)
    field = KernelField(
        torch.rand(max(h, 1), max(w, 1), generator=gen) * 20 + 0.5,
        torch.rand(max(h, 1), max(w, 1), generator=gen) * 20 + 0.5,
        torch.rand(max(h, 1), max(w, 1), generator=gen) * 6 - 3,
        torch.rand(max(h, 1), max(w, 1), generator=gen) * 0.3 + 0.003,
    )
    H, W = guide_shape[-2:] if len(guide_shape) == 3 and options.get("channel_axis") == 0 else guide_shape[:2]
    C = lr_shape[0] if len(lr_shape) == 3 else 1
    out = _out(out_kind, (C, H, W))
    result = _check_outcome(lambda: upa.render(lr, guide, field, out=out, max_memory="256MB", **options), (C, H, W))
    if result is not None and out is not None:
        assert result is out


@FUZZ
@given(
    guide=guides,
    lr_shape=_mostly([(1, 1), (1, 1, 1), (2, 1, 1)], [(0, 2, 2), (2, 30, 30)]),
    lr_dtype=_mostly([np.uint8, np.uint16, np.float16, np.float32, np.float64, np.bool_], [np.complex64]),
    lr_values=_mostly(["random", "huge", "constant"], ["nan", "inf"]),
    options=fit_options,
)
def test_fuzz_upsample(guide, lr_shape, lr_dtype, lr_values, options):
    options.setdefault("steps", 1)
    lr = _array(lr_shape, lr_dtype, lr_values, 0)
    C = lr_shape[0] if len(lr_shape) == 3 else 1
    _check_outcome(lambda: upa.upsample(guide, lr, max_memory="256MB", **options), (C, *guide.shape[:2]))


@pytest.fixture(scope="module")
def kernels_bytes(tmp_path_factory) -> bytes:
    rng = np.random.default_rng(0)
    guide = (rng.random((20, 24, 3)) * 255).astype(np.uint8)
    path = upa.fit_kernels(guide, (3, 4), steps=2).save(tmp_path_factory.mktemp("k") / "k.npz")
    return path.read_bytes()


@FUZZ
@given(
    mode=st.sampled_from(["random", "truncate", "flip", "empty", "append"]),
    data=st.binary(min_size=0, max_size=2000),
    where=st.floats(0, 1),
)
def test_fuzz_load(kernels_bytes, tmp_path_factory, mode, data, where):
    good = kernels_bytes
    cut = int(where * len(good))
    content = {
        "random": data,
        "truncate": good[:cut],
        "flip": good[:cut] + bytes([good[cut] ^ 0xFF]) + good[cut + 1 :] if cut < len(good) else good[:-1],
        "empty": b"",
        "append": good + data,
    }[mode]
    path = tmp_path_factory.mktemp("fuzz") / "k.npz"
    path.write_bytes(content)
    try:
        field = KernelField.load(path)
    except ValueError as exc:
        assert str(exc).startswith(f"{path} is not a kernel field file: "), exc
        event("refused")
        return
    except Exception as exc:  # noqa: BLE001
        raise AssertionError(f"untyped error {type(exc).__name__}: {exc}") from exc
    event("loaded")
    field.validate()  # a file that loads is a valid field
    assert field.shape == (3, 4)
