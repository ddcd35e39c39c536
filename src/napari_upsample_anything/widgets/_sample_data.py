"""Sample images for napari's File > Open Sample menu (bundled with scikit-image: no download)."""

from __future__ import annotations


def histology():
    """Immunohistochemistry (IHC) RGB section, 512 x 512 (scikit-image ``immunohistochemistry``)."""
    import skimage.data

    return [(skimage.data.immunohistochemistry(), {"name": "histology (IHC)", "rgb": True}, "image")]


def cells():
    """Grayscale cells, 660 x 550 (scikit-image ``cell``)."""
    import skimage.data

    return [(skimage.data.cell(), {"name": "cells", "colormap": "gray"}, "image")]


def retina():
    """Large RGB fundus image, 1411 x 1411 (scikit-image ``retina``): the engine works in tiles."""
    import skimage.data

    return [(skimage.data.retina(), {"name": "retina (large)", "rgb": True}, "image")]
