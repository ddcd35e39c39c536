"""Quality metrics (PSNR, SSIM, mIoU, accuracy, boundary F1) and record selection.

Part of the quality benchmark; run it with ``python benchmarks/bench_quality.py`` (see there).
"""

from __future__ import annotations

from typing import Dict

import numpy as np


# ======================================================================================
# metrics
# ======================================================================================
def psnr(truth: np.ndarray, pred: np.ndarray) -> float:
    from skimage.metrics import peak_signal_noise_ratio

    return float(peak_signal_noise_ratio(truth, np.clip(pred, 0, 1), data_range=1.0))


def ssim(truth_hwc: np.ndarray, pred_hwc: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    t, p = truth_hwc, np.clip(pred_hwc, 0, 1)
    if t.shape[2] == 1:
        return float(structural_similarity(t[:, :, 0], p[:, :, 0], data_range=1.0))
    return float(structural_similarity(t, p, data_range=1.0, channel_axis=2))


def boundaries(labels: np.ndarray) -> np.ndarray:
    """Pixels whose right or lower neighbour carries another label (and those neighbours)."""
    b = np.zeros(labels.shape, bool)
    dx = labels[:, 1:] != labels[:, :-1]
    dy = labels[1:, :] != labels[:-1, :]
    b[:, 1:] |= dx
    b[:, :-1] |= dx
    b[1:, :] |= dy
    b[:-1, :] |= dy
    return b


def boundary_f1(truth: np.ndarray, pred: np.ndarray, tol: float = 2.0) -> float:
    """F1 of boundary pixels matched within ``tol`` px (Euclidean) in both directions."""
    from scipy.ndimage import distance_transform_edt

    bt, bp = boundaries(truth), boundaries(pred)
    if not bt.any() and not bp.any():
        return 1.0
    if not bt.any() or not bp.any():
        return 0.0
    dt = distance_transform_edt(~bt)
    dp = distance_transform_edt(~bp)
    precision = float((dt[bp] <= tol).mean())
    recall = float((dp[bt] <= tol).mean())
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def label_metrics(truth: np.ndarray, pred: np.ndarray, n_classes: int) -> Dict[str, float]:
    ious = []
    for c in range(n_classes):
        t, p = truth == c, pred == c
        union = np.logical_or(t, p).sum()
        if union:
            ious.append(np.logical_and(t, p).sum() / union)
    return {
        "miou": float(np.mean(ious)),
        "acc": float((truth == pred).mean()),
        "bf1": boundary_f1(truth, pred, 2.0),
    }


def select(records, **kw):
    return [r for r in records if all(r.get(k) == v for k, v in kw.items())]


def mean_of(records, metric, **kw) -> float:
    vals = [r[metric] for r in select(records, **kw) if metric in r]
    return float(np.mean(vals)) if vals else float("nan")
