"""Asking HR features questions: point similarity and scribble classification (pure torch/numpy/sklearn).

The public entry points (input validation, rendering through the API) are in
:mod:`napari_upsample_anything.explore`; this module holds the computations.

Streaming instead of storing
----------------------------
The render writes its output tile by tile (``out[:, y0:y1, x0:x1] = tile``). A
:class:`TileSink` stands in for that output array: it hands each ``(C, ty, tx)`` tile to a
consumer and forgets it. So a quantity that needs all ``C`` channels of a pixel (the norm of its
feature vector, a classifier's prediction) is computed over the whole image while only one
tile of HR features exists at a time: memory is the render's own budget, never ``C x H x W``.

Bilinear features for comparison are produced the same way, one band of rows at a time
(:func:`bilinear_rows`), with the taps of ``F.interpolate(mode="bilinear",
align_corners=False)``.

Classifier files (no pickles)
-----------------------------
:class:`ScribbleClassifier` saves the *training samples* (feature vectors at the scribbled
pixels, their labels), the estimator's class path and its ``get_params()`` as JSON in an
``.npz`` (``allow_pickle=False``), and refits the estimator on load. Estimators with a fixed
``random_state`` (the default random forest has one) refit to the same model, so a saved
classifier predicts the same labels in a batch job as in the viewer. Only scikit-learn
estimators whose parameters are plain JSON values can be saved; loading imports only
``sklearn.*`` classes.

Since format 2 a file also carries what applying it elsewhere needs (``settings``, JSON):
the backbone and its blocks, input size, feature options, the guide channels, whether image
channels were appended, the kernel fit options and the package version, plus the class
names. :meth:`ScribbleClassifier.check_settings` compares them with the settings of a new run
and raises :class:`ClassifierMismatchError` naming every difference. Format-1 files (no
settings, no names) still load.
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .interp import linear_taps
from .progress import CancelFn, ProgressFn, check_cancel, report

#: Bytes of float32 feature rows processed at once when reading HR or bilinear features in bands.
BAND_BYTES = 64 * 2**20
#: Smallest norm product treated as non-zero in a cosine (a zero feature has similarity 0).
COSINE_EPS = 1e-12
#: Training samples kept per class by default (seeded subsample): keeps retraining in seconds.
DEFAULT_SAMPLES_PER_CLASS = 5000
_FORMAT = "napari-upsample-anything/scribble-classifier/2"
_FORMATS_READ = ("napari-upsample-anything/scribble-classifier/1", _FORMAT)
#: Settings that decide the feature vectors: a classifier applied with other values would
#: silently mis-classify, so :meth:`ScribbleClassifier.check_settings` refuses them.
FEATURE_SETTINGS = ("backbone", "layers", "input_size", "channels", "include_image", "feature_channels")


class ClassifierMismatchError(ValueError):
    """A classifier is applied with features (backbone, blocks, options) other than it was trained on."""


# ---------------------------------------------------------------------------------- streaming
class TileSink:
    """A write-only stand-in for a ``(C, H, W)`` render output that consumes tiles as they come.

    ``consume(y0, y1, x0, x1, tile)`` receives each rendered ``(C, y1 - y0, x1 - x0)``
    float32 tile. ``covered`` counts how many times each pixel was written (tests check it
    is exactly once).
    """

    def __init__(self, shape: Tuple[int, int, int], consume: Callable[[int, int, int, int, np.ndarray], None]):
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(np.float32)
        self.ndim = 3
        self._consume = consume
        self.covered = np.zeros(self.shape[1:], np.uint8)

    def __setitem__(self, key, value) -> None:
        if not (isinstance(key, tuple) and len(key) == 3 and all(isinstance(k, slice) for k in key)):
            raise TypeError("TileSink only accepts out[:, y0:y1, x0:x1] = tile writes")
        _, ys, xs = key
        y0, y1 = ys.start or 0, self.shape[1] if ys.stop is None else ys.stop
        x0, x1 = xs.start or 0, self.shape[2] if xs.stop is None else xs.stop
        self.covered[y0:y1, x0:x1] += 1
        self._consume(y0, y1, x0, x1, np.asarray(value, dtype=np.float32))


def band_rows(channels: int, width: int, budget: Optional[int] = None) -> int:
    """Rows per band so that a ``(channels, rows, width)`` float32 band takes about ``budget`` bytes
    (default :data:`BAND_BYTES`)."""
    budget = BAND_BYTES if budget is None else budget
    return max(1, int(budget // max(1, 4 * channels * width)))


def iter_bands(height: int, rows: int) -> Iterator[Tuple[int, int]]:
    for y0 in range(0, height, rows):
        yield y0, min(y0 + rows, height)


def bilinear_rows(lr: torch.Tensor, hr_shape: Tuple[int, int], y0: int, y1: int) -> torch.Tensor:
    """Rows ``[y0, y1)`` of the bilinear upsampling of ``lr`` ``(C, h, w)`` to ``hr_shape``.

    Equal to ``F.interpolate(lr[None], hr_shape, mode="bilinear", align_corners=False)[0,
    :, y0:y1]`` (same taps), without making the full ``(C, H, W)`` array. float32.
    """
    C, h, w = lr.shape
    H, W = hr_shape
    iy, wy = linear_taps(torch.arange(y0, y1), h, H)
    ix, wx = linear_taps(torch.arange(W), w, W)
    lr = lr.to(torch.float32)
    wy = wy.to(torch.float32)
    wx = wx.to(torch.float32)
    rows = lr[:, iy[:, 0]] * wy[None, :, 0, None] + lr[:, iy[:, 1]] * wy[None, :, 1, None]  # (C, n, w)
    return rows[:, :, ix[:, 0]] * wx[None, None, :, 0] + rows[:, :, ix[:, 1]] * wx[None, None, :, 1]


def bilinear_at(lr: torch.Tensor, hr_shape: Tuple[int, int], ys: np.ndarray, xs: np.ndarray) -> torch.Tensor:
    """``(N, C)`` bilinear features at HR pixels ``(ys[n], xs[n])`` (same taps as :func:`bilinear_rows`)."""
    C, h, w = lr.shape
    H, W = hr_shape
    iy, wy = linear_taps(torch.as_tensor(np.asarray(ys, np.int64)), h, H)
    ix, wx = linear_taps(torch.as_tensor(np.asarray(xs, np.int64)), w, W)
    lr = lr.to(torch.float64)
    out = torch.zeros(len(ys), C, dtype=torch.float64)
    for a in range(2):
        for b in range(2):
            out += (wy[:, a] * wx[:, b])[:, None] * lr[:, iy[:, a], ix[:, b]].T
    return out.to(torch.float32)


# ---------------------------------------------------------------------------------- similarity
def cosine(dot: np.ndarray, norm_sq: np.ndarray, query_norm: float) -> np.ndarray:
    """``dot / (sqrt(norm_sq) * query_norm)`` as float32, 0 where the denominator is ~0 (never NaN)."""
    den = np.sqrt(np.maximum(norm_sq, 0.0)) * float(query_norm)
    out = np.zeros(np.shape(dot), np.float32)
    ok = den > COSINE_EPS
    out[ok] = (np.asarray(dot)[ok] / den[ok]).astype(np.float32)
    return np.clip(out, -1.0, 1.0)


class SimilarityAccumulator:
    """Consumes ``(C, ty, tx)`` feature tiles; accumulates ``<F(p), q>`` and ``||F(p)||^2`` (float64)."""

    def __init__(self, query: np.ndarray, hr_shape: Tuple[int, int]):
        self.query = torch.as_tensor(np.asarray(query, np.float64))
        self.dot = np.zeros(hr_shape, np.float64)
        self.norm_sq = np.zeros(hr_shape, np.float64)

    def __call__(self, y0: int, y1: int, x0: int, x1: int, tile: np.ndarray) -> None:
        t = torch.from_numpy(np.ascontiguousarray(tile)).to(torch.float64)
        self.dot[y0:y1, x0:x1] = torch.einsum("c,cyx->yx", self.query, t).numpy()
        self.norm_sq[y0:y1, x0:x1] = (t * t).sum(0).numpy()

    def similarity(self) -> np.ndarray:
        return cosine(self.dot, self.norm_sq, float(torch.linalg.vector_norm(self.query)))


def similarity_from_bands(
    bands: Callable[[int, int], torch.Tensor],
    query: np.ndarray,
    hr_shape: Tuple[int, int],
    channels: int,
    *,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelFn] = None,
    stage: str = "similarity",
) -> np.ndarray:
    """Cosine similarity with ``query`` of features given band by band: ``bands(y0, y1) -> (C, n, W)``."""
    H, W = hr_shape
    acc = SimilarityAccumulator(query, hr_shape)
    rows = band_rows(channels, W)
    for y0, y1 in iter_bands(H, rows):
        check_cancel(cancel, stage)
        acc(y0, y1, 0, W, np.asarray(bands(y0, y1), np.float32))
        report(progress, y1, H, stage=stage)
    return acc.similarity()


def hr_band_reader(features: np.ndarray | torch.Tensor) -> Callable[[int, int], torch.Tensor]:
    """``bands(y0, y1)`` over an in-memory or memory-mapped ``(C, H, W)`` array."""

    def read(y0: int, y1: int) -> torch.Tensor:
        band = features[:, y0:y1]
        if isinstance(band, torch.Tensor):
            return band.detach().to("cpu", torch.float32)
        return torch.from_numpy(np.ascontiguousarray(band, dtype=np.float32))

    return read


def weights_mean(weight_maps: Sequence[np.ndarray]) -> np.ndarray:
    """Mean of per-point ``(h, w)`` LR weight maps: the weights of the points' mean HR feature."""
    return np.mean(np.stack([np.asarray(m, np.float64) for m in weight_maps]), axis=0)


# ---------------------------------------------------------------------------------- scribbles
def scribble_pixels(scribbles: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ys, xs, labels)`` of the labelled (non-zero) pixels of an ``(H, W)`` labels array."""
    ys, xs = np.nonzero(scribbles)
    return ys, xs, np.asarray(scribbles)[ys, xs].astype(np.int64)


def subsample_per_class(labels: np.ndarray, per_class: Optional[int], seed: int = 0) -> np.ndarray:
    """Indices keeping at most ``per_class`` samples of each label (seeded; all when None)."""
    idx = np.arange(len(labels))
    if per_class is None:
        return idx
    rng = np.random.default_rng(seed)
    keep: List[np.ndarray] = []
    for c in np.unique(labels):
        members = idx[labels == c]
        if len(members) > per_class:
            members = np.sort(rng.choice(members, per_class, replace=False))
        keep.append(members)
    return np.sort(np.concatenate(keep))


def lr_cells(
    ys: np.ndarray, xs: np.ndarray, lr_shape: Tuple[int, int], hr_shape: Tuple[int, int]
) -> Tuple[np.ndarray, np.ndarray]:
    """LR cell ``(i, j)`` whose area contains each HR pixel (the nearest-resize cell rule)."""
    (h, w), (H, W) = lr_shape, hr_shape
    i = np.minimum(((np.asarray(ys) + 0.5) * h / H).astype(np.int64), h - 1)
    j = np.minimum(((np.asarray(xs) + 0.5) * w / W).astype(np.int64), w - 1)
    return i, j


class PixelGatherer:
    """Consumes ``(C, ty, tx)`` feature tiles and keeps the feature vectors of chosen pixels."""

    def __init__(self, ys: np.ndarray, xs: np.ndarray, hr_shape: Tuple[int, int], channels: int):
        self.hr_shape = hr_shape
        H, W = hr_shape
        self._mask = np.full((H, W), -1, np.int64)
        self._mask[ys, xs] = np.arange(len(ys))
        self.samples = np.zeros((len(ys), channels), np.float32)
        self.found = np.zeros(len(ys), bool)

    def __call__(self, y0: int, y1: int, x0: int, x1: int, tile: np.ndarray) -> None:
        sel = self._mask[y0:y1, x0:x1]
        hit = sel >= 0
        if hit.any():
            ids = sel[hit]
            self.samples[ids] = tile[:, hit].T
            self.found[ids] = True


class ProbabilityWriter:
    """Consumes ``(D, ty, tx)`` feature tiles (D = feature channels + image channels appended by
    ``extra``), predicts class probabilities with ``predict_proba`` and writes them to ``out``."""

    def __init__(self, predict_proba, out: np.ndarray, extra: Optional[Callable[[int, int, int, int], np.ndarray]] = None):
        self.predict_proba = predict_proba
        self.out = out
        self.extra = extra

    def __call__(self, y0: int, y1: int, x0: int, x1: int, tile: np.ndarray) -> None:
        if self.extra is not None:
            tile = np.concatenate([tile, self.extra(y0, y1, x0, x1)], axis=0)
        D = tile.shape[0]
        X = tile.reshape(D, -1).T
        proba = np.asarray(self.predict_proba(X), np.float32)
        self.out[:, y0:y1, x0:x1] = proba.T.reshape(-1, y1 - y0, x1 - x0)


def labels_from_probabilities(probabilities: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """``(H, W)`` label values (``classes[argmax]``), in the smallest unsigned dtype that holds them."""
    classes = np.asarray(classes)
    dtype = np.uint8 if classes.max() < 256 else (np.uint16 if classes.max() < 65536 else np.int64)
    return classes[np.argmax(probabilities, axis=0)].astype(dtype)


# ---------------------------------------------------------------------------------- classifier
def default_classifier():
    """Random forest used when none is given: fixed ``random_state``, so refits are reproducible."""
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(n_estimators=50, min_samples_leaf=2, n_jobs=1, random_state=0)


def check_estimator(classifier) -> None:
    for name in ("fit", "predict_proba"):
        if not callable(getattr(classifier, name, None)):
            raise TypeError(
                f"classifier {type(classifier).__name__} has no {name}(): give a scikit-learn style "
                "estimator with fit and predict_proba (e.g. RandomForestClassifier())"
            )


def _estimator_spec(classifier) -> Dict:
    cls = type(classifier)
    path = f"{cls.__module__}:{cls.__qualname__}"
    if not cls.__module__.startswith("sklearn."):
        raise ValueError(
            f"cannot save a {path} classifier: only scikit-learn estimators are saved (their parameters "
            "as JSON, refitted on load); use a sklearn estimator or keep the Python object"
        )
    get_params = getattr(classifier, "get_params", None)
    params = get_params(deep=False) if callable(get_params) else {}
    try:
        text = json.dumps(params)
    except TypeError as exc:
        raise ValueError(
            f"cannot save {path}: a parameter is not a plain value ({exc}); only estimators whose "
            "get_params() are numbers/strings/lists can be saved without pickles"
        ) from exc
    return {"estimator": path, "params": json.loads(text)}


def _estimator_from_spec(spec: Dict):
    path = str(spec.get("estimator", ""))
    module, _, name = path.partition(":")
    if not module.startswith("sklearn.") or not name or "." in name:
        raise ValueError(f"refusing to load estimator {path!r}: only scikit-learn classes are allowed")
    cls = getattr(importlib.import_module(module), name)
    return cls(**dict(spec.get("params", {})))


@dataclass(eq=False)
class ScribbleClassifier:
    """A classifier trained on feature vectors at scribbled pixels.

    Attributes
    ----------
    estimator : fitted scikit-learn style estimator (``fit`` / ``predict_proba``)
    classes : (K,) int64
        Label values, in the order of ``predict_proba``'s columns.
    samples : (N, D) float32
        Training feature vectors (D = feature channels, + image channels if ``include_image``).
    labels : (N,) int64
    route : "hr" or "lr"
        What the samples are: HR pixel features ("hr") or LR tokens ("lr"); applying uses the
        same route by default.
    include_image : bool
        Whether the guide image's own (normalised) channels were appended to the features.
    meta : dict
        Provenance (JSON values).
    class_names : dict int -> str
        Names of the class values (may be empty or partial; :meth:`class_name` fills in).
    settings : dict
        How the features were made (backbone, blocks, input size, channels, fit options,
        package version; JSON values); empty for classifiers trained on bare arrays and for
        format-1 files.
    """

    estimator: object
    classes: np.ndarray
    samples: np.ndarray
    labels: np.ndarray
    route: str = "hr"
    include_image: bool = False
    meta: Dict = field(default_factory=dict)
    class_names: Dict[int, str] = field(default_factory=dict)
    settings: Dict = field(default_factory=dict)

    def class_name(self, value: int) -> str:
        """The name of class ``value`` (``"class <value>"`` when it has none)."""
        return str(self.class_names.get(int(value), f"class {int(value)}"))

    def check_settings(self, settings: Dict, keys: Sequence[str] = FEATURE_SETTINGS) -> None:
        """Raise :class:`ClassifierMismatchError` if ``settings`` differ from the training ones.

        Only ``keys`` present on both sides are compared (a format-1 file has none; its feature
        count is still checked at prediction). Values are compared as JSON (tuples = lists).
        """
        diffs = []
        for k in keys:
            if k in self.settings and k in settings:
                mine, theirs = _jsonable(self.settings[k]), _jsonable(settings[k])
                if mine != theirs:
                    diffs.append(f"{k}: classifier {mine!r}, now {theirs!r}")
        if diffs:
            raise ClassifierMismatchError(
                "the classifier was trained on other features than these ("
                + "; ".join(diffs)
                + "): apply it with the settings it was trained with (leave --backbone / --layer / --input-size / "
                "--channels out to use the classifier's own) or train a new one"
            )

    @property
    def n_features(self) -> int:
        return int(self.samples.shape[1])

    @classmethod
    def train(cls, samples: np.ndarray, labels: np.ndarray, classifier=None, **kwargs) -> ScribbleClassifier:
        estimator = default_classifier() if classifier is None else classifier
        check_estimator(estimator)
        samples = np.ascontiguousarray(samples, np.float32)
        labels = np.asarray(labels, np.int64)
        estimator.fit(samples, labels)
        classes = np.asarray(getattr(estimator, "classes_", np.unique(labels)), np.int64)
        return cls(estimator, classes, samples, labels, **kwargs)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        if X.shape[1] != self.n_features:
            raise ValueError(
                f"the classifier was trained on {self.n_features} feature channels, these features have "
                f"{X.shape[1]}; use features from the same backbone/layer (and the same include_image)"
            )
        return self.estimator.predict_proba(X)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the training samples and the estimator's parameters to ``path`` (``.npz``).

        Written to a temporary file in the same folder and renamed when complete. Loading
        refits the estimator (:meth:`load`).
        """
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        spec = _estimator_spec(self.estimator)
        meta = {
            "format": _FORMAT,
            **spec,
            "route": self.route,
            "include_image": bool(self.include_image),
            "meta": _jsonable(self.meta),
            "classes": [int(c) for c in self.classes],
            "class_names": {str(int(k)): str(v) for k, v in self.class_names.items()},
            "settings": _jsonable(self.settings),
        }
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez_compressed(
                    fh, samples=self.samples, labels=self.labels, classes=self.classes, meta=np.array(json.dumps(meta))
                )
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, expect: Optional[Dict] = None) -> ScribbleClassifier:
        """Read a file written by :meth:`save` and refit its estimator on the stored samples.

        Format-1 files (before class names and settings) load too. ``expect``: settings of
        the run the classifier is for; any difference in :data:`FEATURE_SETTINGS` raises
        :class:`ClassifierMismatchError` (see :meth:`check_settings`).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"classifier file not found: {path}")
        with np.load(path, allow_pickle=False) as data:
            missing = [n for n in ("samples", "labels", "meta") if n not in data.files]
            if missing:
                raise ValueError(f"{path} is not a scribble classifier file: it lacks {', '.join(missing)}")
            samples = np.array(data["samples"], np.float32)
            labels = np.array(data["labels"], np.int64)
            meta = json.loads(str(data["meta"]))
        if meta.get("format") not in _FORMATS_READ:
            raise ValueError(
                f"{path} is not a scribble classifier file this version reads (format {meta.get('format')!r}; "
                f"readable: {', '.join(_FORMATS_READ)})"
            )
        estimator = _estimator_from_spec(meta)
        clf = cls.train(
            samples,
            labels,
            estimator,
            route=meta.get("route", "hr"),
            include_image=bool(meta.get("include_image", False)),
            meta=dict(meta.get("meta", {})),
            class_names={int(k): str(v) for k, v in dict(meta.get("class_names", {})).items()},
            settings=dict(meta.get("settings", {})),
        )
        if expect is not None:
            clf.check_settings(expect)
        return clf


def _jsonable(value):
    """``value`` as plain JSON types (tuples -> lists, numpy scalars -> Python)."""
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else list(o)))
