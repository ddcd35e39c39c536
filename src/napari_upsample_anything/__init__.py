"""napari-upsample-anything: exact, memory-bounded Upsample Anything (GSJBU).

The public API is imported lazily so that napari can read the plugin manifest (and list
its widgets) without importing torch::

    import napari_upsample_anything as upa
    field = upa.fit_kernels(image, lr_shape=(h, w))
    hr = upa.render(lr_map, image, field)
    hr = upa.upsample(image, lr_map)
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

try:
    # Set by setuptools-scm from the git tag at build/install time (pyproject.toml).
    __version__ = version("napari-upsample-anything")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

if TYPE_CHECKING:
    # The same names as _LAZY below, imported eagerly only for type checkers and IDEs
    # (tests/test_packaging.py checks that the two lists agree).
    from .api import fit_kernels, pca_rgb, render, render_pca, upsample
    from .core.backbones import WeightsUnavailableError, load_backbone
    from .core.errors import Cancelled, FitDivergedError, MemoryBudgetError
    from .core.features import FeatureMap, extract_features
    from .core.field import FitOptions, KernelField
    from .core.memory import MemoryLog
    from .core.pca import PCABasis
    from .explore import segment_scribbles, similarity_map

_LAZY = {
    "fit_kernels": ("api", "fit_kernels"),
    "render": ("api", "render"),
    "upsample": ("api", "upsample"),
    "pca_rgb": ("api", "pca_rgb"),
    "render_pca": ("api", "render_pca"),
    "similarity_map": ("explore", "similarity_map"),
    "segment_scribbles": ("explore", "segment_scribbles"),
    "PCABasis": ("core.pca", "PCABasis"),
    "extract_features": ("core.features", "extract_features"),
    "load_backbone": ("core.backbones", "load_backbone"),
    "FeatureMap": ("core.features", "FeatureMap"),
    "WeightsUnavailableError": ("core.backbones", "WeightsUnavailableError"),
    "KernelField": ("core.field", "KernelField"),
    "MemoryLog": ("core.memory", "MemoryLog"),
    "Cancelled": ("core.errors", "Cancelled"),
    "MemoryBudgetError": ("core.errors", "MemoryBudgetError"),
    "FitDivergedError": ("core.errors", "FitDivergedError"),
    "FitOptions": ("core.field", "FitOptions"),
}

# Written out (not computed from _LAZY) so that linters and type checkers can read it.
__all__ = [
    "Cancelled",
    "FeatureMap",
    "FitDivergedError",
    "FitOptions",
    "KernelField",
    "MemoryBudgetError",
    "MemoryLog",
    "PCABasis",
    "WeightsUnavailableError",
    "__version__",
    "extract_features",
    "fit_kernels",
    "load_backbone",
    "pca_rgb",
    "render",
    "render_pca",
    "segment_scribbles",
    "similarity_map",
    "upsample",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
