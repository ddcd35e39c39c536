"""napari-upsample-anything: exact, memory-bounded Upsample Anything (GSJBU).

The public API is imported lazily so that napari can read the plugin manifest (and list
its widgets) without importing torch::

    import napari_upsample_anything as upa
    field = upa.fit_kernels(image, lr_shape=(h, w))
    hr = upa.render(lr_map, image, field)
    hr = upa.upsample(image, lr_map)
"""

from __future__ import annotations

__version__ = "0.1.0"

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
    "load_backbone": ("core.features", "load_backbone"),
    "FeatureMap": ("core.features", "FeatureMap"),
    "WeightsUnavailableError": ("core.features", "WeightsUnavailableError"),
    "KernelField": ("core.field", "KernelField"),
    "MemoryLog": ("core.memory", "MemoryLog"),
    "Cancelled": ("core.errors", "Cancelled"),
    "MemoryBudgetError": ("core.errors", "MemoryBudgetError"),
}

__all__ = sorted(_LAZY) + ["__version__"]


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
