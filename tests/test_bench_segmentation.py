"""The segmentation benchmark's metrics and data (benchmarks/bench_segmentation.py), on known cases."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_segmentation.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_segmentation", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def halves(split: int) -> np.ndarray:
    a = np.ones((40, 40), np.int64)
    a[:, split:] = 2
    return a


def test_boundary_f1_counts_boundaries_within_the_tolerance(bench):
    truth = halves(20)
    assert bench.boundary_f1(truth, truth, 2.0) == 1.0
    assert bench.boundary_f1(truth, halves(21), 2.0) == 1.0  # 1 px off: within 2 px
    assert bench.boundary_f1(truth, halves(26), 2.0) == 0.0  # 6 px off: no boundary pixel matches
    assert bench.boundary_f1(truth, np.ones_like(truth), 2.0) == 0.0  # no predicted boundary
    # A spurious extra boundary halves the precision: F1 = 2 * 0.5 * 1 / 1.5.
    extra = halves(20)
    extra[:, 32:] = 3
    assert bench.boundary_f1(truth, extra, 0.5) == pytest.approx(2 / 3)


def test_miou_of_known_overlaps(bench):
    truth = halves(20)
    assert bench.miou(truth, truth) == 1.0
    # Class 1: 10 shared columns of 20 (IoU 1/2); class 2: 20 of 30 (2/3).
    assert bench.miou(truth, halves(10)) == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_microscopy_stack_and_filter_bank_shapes(bench):
    stack, labels = bench.microscopy_stack(0, 64, 3)
    assert stack.shape == labels.shape == (3, 64, 64) and stack.dtype == np.float32
    assert set(np.unique(labels).tolist()) == {1, 2, 3}
    assert 0.0 <= stack.min() and stack.max() <= 1.0
    assert not np.array_equal(labels[0], labels[2])  # the cells drift between planes
    bank = bench.filter_bank(stack[0])
    assert bank.ndim == 3 and bank.shape[1:] == (64, 64) and bank.dtype == np.float32
