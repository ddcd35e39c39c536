"""The napari-convpaint baseline of ``bench_segmentation.py``: convpaint's own features and classifier.

napari-convpaint is not a dependency of this project. Where ``import napari_convpaint`` works,
``bench_segmentation.py`` adds the route ``convpaint``: a ``ConvpaintModel`` made from the
``"gaussian"`` alias (feature extractor ``gaussian_features``: a Gaussian filter, sigma 3,
of each input channel, at the alias's default scalings ``[1]``; convpaint's only feature
extractor that needs no download here) trained and applied through its Python API
(``ConvpaintModel.train`` / ``ConvpaintModel.segment``) with its own classifier, CatBoost
with the model's defaults (100 iterations, learning rate 0.1, depth 5, ``random_seed=0``),
its own normalisation (``normalize=2``) and annotation tiling, on the same scribbles as the
other routes; and ``convpaint-rf``: the same with convpaint's alternative classifier
(``train(..., use_rf=True)``: a 100-tree random forest), which tells the features' share of
the result from the classifier's. Its other extractors are out of reach offline: ``vgg16`` / ``efficient_netb0``
/ ``convnext`` and the DINOv2 / DINOv3 (+ JAFAR) ones download their weights at first use,
and ``ilastik_2d`` needs ilastik's ``fastfilters`` package, which PyPI does not have.

A separate environment that sees the project's packages without changing them (see
``docs/segmentation.md``)::

    python3.11 -m venv /work/cp-venv
    echo /path/to/project/.venv/lib/python3.11/site-packages \\
        > /work/cp-venv/lib/python3.11/site-packages/_main_venv.pth
    /work/cp-venv/bin/pip install --no-deps napari-convpaint==1.2.0 catboost einops omegaconf \\
        napari-annotation-project napari-guitils natsort
"""

from __future__ import annotations

import contextlib
import io
import time
import warnings

import numpy as np

#: the ``ConvpaintModel`` alias used: convpaint's offline feature set
ALIAS = "gaussian"


def version() -> str | None:
    """napari-convpaint's version where it imports, else ``None``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from importlib.metadata import version as _v

            import napari_convpaint  # noqa: F401

            return _v("napari-convpaint")
    except Exception:  # noqa: BLE001 - any failure means the baseline is not there
        return None


@contextlib.contextmanager
def _quiet():
    """CatBoost prints a line per iteration; convpaint warns about extractors it cannot load."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def describe() -> str:
    """One line: what the route runs (from the model itself, not hard-coded)."""
    with _quiet():
        from napari_convpaint.convpaint_model import ConvpaintModel

        p = ConvpaintModel(alias=ALIAS).get_params()
    return (
        f"napari-convpaint {version()} alias '{ALIAS}' (fe_name {p.fe_name}, fe_scalings {p.fe_scalings}, "
        f"normalize {p.normalize}) + its default classifier, CatBoost ({p.clf_iterations} iterations, learning rate "
        f"{p.clf_learning_rate}, depth {p.clf_depth}); `convpaint-rf`: the same features + its `use_rf=True` "
        f"classifier (random forest, 100 trees)"
    )


def run(img: list, scr_pairs: list, targets, use_rf: bool = False) -> tuple:
    """Train convpaint on ``scr_pairs`` [(plane index, scribbles)] of ``img`` and segment the planes ``targets``.

    ``img``: list of ``(H, W)`` grey or ``(H, W, 3)`` RGB planes. ``use_rf``: convpaint's own
    alternative classifier (``train(..., use_rf=True)``: scikit-learn's random forest, 100
    trees, ``random_state=0``) instead of its default CatBoost. Returns
    ``(predictions, train seconds, predict seconds)`` like ``bench_segmentation.run_method``;
    the train time includes building the model (no weights to load) and convpaint's feature
    extraction under the annotations, the predict time its features of every target plane.
    """
    rgb = img[0].ndim == 3

    def plane(k):
        return np.ascontiguousarray(np.moveaxis(img[k], -1, 0)) if rgb else img[k]

    t0 = time.perf_counter()
    with _quiet():
        from napari_convpaint.convpaint_model import ConvpaintModel

        model = ConvpaintModel(alias=ALIAS)
        if rgb:
            model.set_params(channel_mode="rgb", ignore_warnings=True)
        model.train([plane(k) for k, _ in scr_pairs], [scr.astype(np.uint8) for _, scr in scr_pairs], use_rf=use_rf)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with _quiet():
        segs = model.segment([plane(k) for k in targets])
    preds = [np.asarray(s).astype(np.int64) for s in segs]
    return preds, train_s, time.perf_counter() - t0
