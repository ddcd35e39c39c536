"""How the plugin's result layers sit on the source image layer (no Qt, no torch).

Axes
----
The image plane is always the **last two axes** of the source layer (napari's default
display), ``(H, W)``; an RGB(A) layer carries its colour axis after them, as napari does.
Every other axis is either

* the **channel axis** (optional, chosen by the user, must be a leading axis): its entries
  are the channels of one image (fluorescence channels ...), or
* a **slice axis** (z, t, ...): one independent 2D image per index.

Result layers have the same number of dimensions as the source (colour axis excluded), so
that napari aligns them axis by axis:

* the spatial axes hold the result's own grid: the HR grid ``(H, W)`` or the LR grid
  ``(h, w)`` of the patch tokens;
* a slice axis holds every slice (mode ``"all"``) or only the processed one (mode
  ``"current"``: size 1, translated to that slice, so napari shows it on that slice only);
* the channel axis has size 1 and is stretched over the whole channel range, so the result
  shows whatever channel the slider is on.

Alignment
---------
HR layers get the source's scale and translate. An LR layer (one cell per patch token, of
``f = (H/h, W/w)`` HR pixels) gets ``scale_lr = scale * f`` and
``translate_lr = translate + scale * (f / 2 - 1/2)``, so that the centre of LR cell ``i``,
which covers HR pixels ``[i f, (i + 1) f)``, lands on HR coordinate ``(i + 1/2) f - 1/2``:
exactly where the engine puts it (napari pixel centres are at integer coordinates).
Rotation, shear and affine of the source layer are not carried over (results use the
source's scale and translate only).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np

Index = Tuple[int, ...]

MODES = ("current", "all")


class SelectionError(ValueError):
    """A selection the widgets cannot work on (the message says why and what to do)."""


def layer_kind(layer) -> str:
    """``"image"``, ``"labels"``, ... (napari's lower-case layer type name)."""
    return type(layer).__name__.lower()


def full_res_data(layer):
    """The layer's data at full resolution (level 0 of a multiscale pyramid), unread.

    The array is returned as it is (numpy, dask, zarr ...): callers take its ``shape`` or
    index one plane with :meth:`Frame.plane`, so a lazy level is never read whole.
    """
    data = layer.data
    if getattr(layer, "multiscale", False):
        data = data[0]
    return data


@dataclass(frozen=True)
class Frame:
    """Axes of a source layer and the geometry of the plugin's result layers on it.

    Build it with :meth:`from_layer`. ``indices`` are the slice-axis positions processed:
    one (the current slice) in mode ``"current"``, all of them in mode ``"all"`` (a 2D layer
    has one, the empty tuple).
    """

    source_name: str
    shape: Tuple[int, ...]  # the layer's dims (the RGB colour axis excluded)
    rgb: bool
    channel_axis: Optional[int]
    scale: Tuple[float, ...]
    translate: Tuple[float, ...]
    mode: str = "current"
    indices: Tuple[Index, ...] = ((),)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_layer(
        cls,
        layer,
        *,
        channel_axis: Optional[int] = None,
        mode: str = "current",
        current: Optional[Sequence[float]] = None,
    ) -> Frame:
        """Frame of an Image layer.

        Parameters
        ----------
        layer : napari.layers.Image
        channel_axis : int, optional
            Layer axis holding channels; must be a leading axis (not one of the last two).
        mode : "current" or "all"
            Process the slice at ``current`` or every slice.
        current : world point of the viewer (``viewer.dims.point``), used in mode
            ``"current"`` to find the slice; None takes index 0 on every slice axis.
        """
        kind = layer_kind(layer)
        if kind != "image":
            hint = (
                " Labels are upsampled with the 'Upsample a layer with fitted kernels' widget; "
                "the kernels are fitted on an image."
                if kind == "labels"
                else ""
            )
            raise SelectionError(
                f"Layer '{layer.name}' is a {kind.capitalize()} layer; pick an Image layer (gray, RGB, "
                f"multichannel or a stack) as the guide image.{hint}"
            )
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: use 'current' or 'all'")
        data = full_res_data(layer)
        rgb = bool(getattr(layer, "rgb", False))
        shape = tuple(int(n) for n in (data.shape[:-1] if rgb else data.shape))
        ndim = len(shape)
        if ndim < 2:
            raise SelectionError(f"Layer '{layer.name}' has {ndim} dimension(s); an image needs at least 2 (rows, columns).")
        if channel_axis is not None:
            channel_axis = int(channel_axis)
            if channel_axis < 0:
                channel_axis += ndim
            if rgb:
                raise SelectionError(
                    f"Layer '{layer.name}' is RGB: its colours are the channels; set the channel axis to 'none'."
                )
            if not 0 <= channel_axis < ndim - 2:
                raise SelectionError(
                    f"channel axis {channel_axis} of layer '{layer.name}' (shape {shape}) must be a leading axis, "
                    "not one of the last two (the image plane)."
                )
        scale = tuple(float(s) for s in layer.scale)
        translate = tuple(float(t) for t in layer.translate)
        frame = cls(layer.name, shape, rgb, channel_axis, scale, translate, mode, ((),))
        if mode == "all":
            idx = tuple(itertools.product(*(range(shape[a]) for a in frame.slice_axes)))
        else:
            idx = (frame.index_at(current) if current is not None else tuple(0 for _ in frame.slice_axes),)
        return cls(layer.name, shape, rgb, channel_axis, scale, translate, mode, idx)

    # ------------------------------------------------------------------ axes
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def spatial_axes(self) -> Tuple[int, int]:
        return (self.ndim - 2, self.ndim - 1)

    @property
    def plane_shape(self) -> Tuple[int, int]:
        return (self.shape[-2], self.shape[-1])

    @property
    def slice_axes(self) -> Tuple[int, ...]:
        return tuple(a for a in range(self.ndim - 2) if a != self.channel_axis)

    @property
    def slice_shape(self) -> Tuple[int, ...]:
        return tuple(self.shape[a] for a in self.slice_axes)

    @property
    def n_channels(self) -> int:
        return 1 if self.channel_axis is None else self.shape[self.channel_axis]

    @property
    def is_stack(self) -> bool:
        return bool(self.slice_axes)

    def describe(self) -> str:
        """One line for the GUI, e.g. ``'stack of 5 planes of 64 x 80, 3 channels'``."""
        H, W = self.plane_shape
        parts = [f"{H} x {W}"]
        if self.rgb:
            parts.append("RGB")
        elif self.channel_axis is not None:
            parts.append(f"{self.n_channels} channels (axis {self.channel_axis})")
        else:
            parts.append("gray")
        if self.is_stack:
            n = int(np.prod(self.slice_shape))
            parts.append(f"{n} slices (axes {', '.join(map(str, self.slice_axes))})")
        return ", ".join(parts)

    # ------------------------------------------------------------------ data
    def plane(self, data, index: Index) -> np.ndarray:
        """Channels-last 2D image ``(H, W)``, ``(H, W, 3|4)`` (RGB) or ``(H, W, C)`` at ``index``."""
        if len(index) != len(self.slice_axes):
            raise ValueError(f"index {index} does not match the slice axes {self.slice_axes}")
        key: List = [slice(None)] * self.ndim
        for a, i in zip(self.slice_axes, index):
            key[a] = int(i)
        # Index first, then convert: a dask / zarr level then reads this plane only.
        arr = np.asarray(data[tuple(key)])
        if self.channel_axis is not None:
            arr = np.moveaxis(arr, 0, -1)  # the channel axis is the only leading axis left
        return arr

    @property
    def feature_channel_axis(self) -> Optional[int]:
        """``channel_axis`` to give ``extract_features`` / ``guide_from_image`` for a :meth:`plane`."""
        return -1 if self.channel_axis is not None else None

    # ------------------------------------------------------------------ world <-> data
    def _tail(self, world_point: Sequence[float]) -> np.ndarray:
        p = np.asarray(world_point, dtype=float)
        if p.size < self.ndim:  # fewer world dims than the layer: pad leading with zeros
            p = np.concatenate([np.zeros(self.ndim - p.size), p])
        return p[-self.ndim :]

    def data_coords(self, world_point: Sequence[float]) -> np.ndarray:
        """Continuous data coordinates of the source layer for a viewer world point."""
        p = self._tail(world_point)
        return (p - np.asarray(self.translate)) / np.asarray(self.scale)

    def index_at(self, world_point: Sequence[float]) -> Index:
        """Slice index (clipped to the layer) under a world point."""
        d = self.data_coords(world_point)
        return tuple(int(np.clip(np.rint(d[a]), 0, self.shape[a] - 1)) for a in self.slice_axes)

    def pixel_at(self, world_point: Sequence[float]) -> Tuple[Index, int, int, bool]:
        """``(slice index, y, x, inside)`` of the HR pixel under a world point."""
        d = self.data_coords(world_point)
        H, W = self.plane_shape
        y, x = int(np.rint(d[-2])), int(np.rint(d[-1]))
        inside = 0 <= y < H and 0 <= x < W
        return self.index_at(world_point), int(np.clip(y, 0, H - 1)), int(np.clip(x, 0, W - 1)), inside

    # ------------------------------------------------------------------ result layers
    def _placed(self, at: Optional[Index]) -> Optional[Index]:
        if at is not None:
            return tuple(at)
        return self.indices[0] if self.mode == "current" else None

    def leading_shape(self, at: Optional[Index] = None) -> Tuple[int, ...]:
        """Shape of a result's leading (non-spatial) axes; ``at`` places it on one slice."""
        placed = self._placed(at)
        out = []
        for a in range(self.ndim - 2):
            if a == self.channel_axis or placed is not None:
                out.append(1)
            else:
                out.append(self.shape[a])
        return tuple(out)

    def position(self, index: Index, at: Optional[Index] = None) -> Tuple[int, ...]:
        """Leading-axis data coordinates of plane ``index`` inside a result array."""
        placed = self._placed(at)
        pos = [0] * (self.ndim - 2)
        if placed is None:
            for a, i in zip(self.slice_axes, index):
                pos[a] = int(i)
        return tuple(pos)

    def transform(self, factor: Sequence[float] = (1.0, 1.0), at: Optional[Index] = None) -> dict:
        """``scale`` and ``translate`` of a result layer.

        ``factor = (H/h, W/w)`` for an LR-grid layer, ``(1, 1)`` for an HR layer; ``at``
        places the layer on one slice (default: the processed slice in mode "current", all
        slices in mode "all").
        """
        s = list(self.scale)
        t = list(self.translate)
        placed = self._placed(at)
        if placed is not None:
            for a, i in zip(self.slice_axes, placed):
                t[a] = self.translate[a] + int(i) * self.scale[a]
        if self.channel_axis is not None:
            c = self.channel_axis
            n = self.shape[c]
            s[c] = self.scale[c] * n
            t[c] = self.translate[c] + (n - 1) / 2.0 * self.scale[c]
        for k, a in enumerate(self.spatial_axes):
            f = float(factor[k])
            s[a] = self.scale[a] * f
            t[a] = self.translate[a] + self.scale[a] * (f / 2.0 - 0.5)
        return {"scale": tuple(s), "translate": tuple(t)}

    def stack(self, planes: Iterable[np.ndarray], at: Optional[Index] = None) -> np.ndarray:
        """Assemble per-plane arrays ``(H, W, ...)`` (in :attr:`indices` order) into one result array."""
        planes = list(planes)
        if not planes:
            raise ValueError("no planes to stack")
        lead = self.leading_shape(at)
        if int(np.prod(lead)) == 1:
            return planes[0].reshape(lead + planes[0].shape)
        out = np.zeros(lead + planes[0].shape, dtype=planes[0].dtype)
        for index, arr in zip(self.indices, planes):
            out[self.position(index)] = arr
        return out

    def to_dict(self) -> dict:
        return {
            "source": self.source_name,
            "shape": list(self.shape),
            "rgb": self.rgb,
            "channel_axis": self.channel_axis,
            "scale": list(self.scale),
            "translate": list(self.translate),
            "mode": self.mode,
            "indices": [list(i) for i in self.indices],
        }
