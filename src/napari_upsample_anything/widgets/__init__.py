"""napari widgets of napari-upsample-anything.

Four dock widgets (contributed in ``napari.yaml``), one module each:

* :mod:`._main` -- **Upsample Anything**: features, kernel fit and HR PCA of an image layer.
* :mod:`._inspector` -- **Kernel inspector**: the fitted kernels as ellipses, and the
  effective upsampling weights of a clicked pixel.
* :mod:`._memory` -- **Memory monitor**: live device memory, and the per-tile memory map.
* :mod:`._upsample_layer` -- **Upsample a layer with fitted kernels**: any LR map
  (probabilities, labels, depth) upsampled with the kernels of a fitted image.

Shared, Qt-free helpers: :mod:`._frame` (how results sit on the source layer),
:mod:`._pipeline` (all computing, through the core; drivable without a GUI),
:mod:`._registry` (per-viewer store of fitted results and the plugin's layers),
:mod:`._kernels` (ellipse / heat-map layer data). Qt helpers: :mod:`._base` (base widgets),
:mod:`._pickers` (layer and result combo boxes), :mod:`._threads` (workers, thread settings),
:mod:`._messages` (error text, toasts).

Nothing here imports torch at import time: napari can list (and even import) the plugin's
contributions without it. torch is imported when a computation first runs (and, in the
background, when the main widget opens, to list the available devices).

From napari's console, the fitted results of a viewer are available as::

    from napari_upsample_anything.widgets import get_results
    result = get_results(viewer)[-1]        # the latest fit
    plane = result.planes[0]
    plane.hr_features                       # (C, H, W) float32 HR features (memory or memmap)
    plane.field                             # the KernelField
"""

from __future__ import annotations

__all__ = ["get_results"]


def get_results(viewer):
    """The fitted results (:class:`._registry.FitResult`) held for ``viewer``, oldest first."""
    from ._registry import get_state

    return list(get_state(viewer).results.values())
