"""The Feature explorer's results as layers: similarity maps and mask, segmentation, probabilities.

:class:`ExplorerOutputs` is the part of :class:`._explorer.FeatureExplorerWidget` that turns a
finished computation into layers on the fitted image (placed on the computed plane of a
stack) and keeps the threshold mask in step with its slider. It reads the widget's
``viewer``, ``state``, ``outputs``, ``similarity`` / ``segmentation`` (the last results),
``threshold_slider`` / ``threshold_label``, ``prob_check``, ``scribble_picker``,
``_scribbles_ref``, ``_classifier`` and calls ``points_layer`` and ``_set_classifier``.
"""

from __future__ import annotations

import numpy as np

from ._registry import FitResult, find_own_layer, put_layer, remove_own_layer, tag_of


class ExplorerOutputs:
    """Layers of the explorer's results (a part of the explorer widget; see the module docstring)."""

    def _placed(self, result: FitResult, plane, arr: np.ndarray):
        at = plane.index if result.frame.is_stack else None
        return result.frame.stack([arr], at=at), result.frame.transform(at=at)

    def _show_similarity(self, value: dict, pending: dict) -> None:
        result, plane = pending["result"], pending["plane"]
        self.similarity = dict(value, result=result, plane=plane)
        common = {"owner": result.owner, "result": result.key}
        with self.state.keep_results():
            for key, role, suffix, visible in (
                ("bilinear", "explore_similarity_bilinear", " (bilinear)", False),
                ("kernels", "explore_similarity", "", True),
            ):
                data, tf = self._placed(result, plane, value[key])
                self.outputs[key] = put_layer(
                    self.viewer,
                    data,
                    "image",
                    name=f"{result.name} similarity{suffix}",
                    role=role,
                    colormap="viridis",
                    contrast_limits=(0.0, 1.0),
                    visible=visible,
                    extra_tag={"index": list(plane.index)},
                    **tf,
                    **common,
                )
            self._update_mask()
            points = self.points_layer(result)
            if points is not None:  # keep the points on top, so they stay clickable and visible
                self.viewer.layers.move(self.viewer.layers.index(points), len(self.viewer.layers))
                self.viewer.layers.selection.active = points

    def threshold(self) -> float:
        return self.threshold_slider.value() / 100.0

    def _on_threshold(self, value: int) -> None:
        self.threshold_label.setText(f"{value / 100.0:.2f}")
        self._update_mask()

    def _update_mask(self) -> None:
        if self.similarity is None:
            return
        result, plane = self.similarity["result"], self.similarity["plane"]
        mask = (self.similarity["kernels"] >= self.threshold()).astype(np.uint8)
        layer = find_own_layer(self.viewer, "explore_similar", result.owner)
        data, tf = self._placed(result, plane, mask)
        if layer is not None and layer.data.shape == data.shape and tag_of(layer).get("index") == list(plane.index):
            layer.data = data  # the slider: update in place, no new layer
        else:
            with self.state.keep_results():
                layer = put_layer(
                    self.viewer,
                    data,
                    "labels",
                    name=f"{result.name} similar",
                    role="explore_similar",
                    owner=result.owner,
                    result=result.key,
                    opacity=0.4,
                    extra_tag={"index": list(plane.index)},
                    **tf,
                )
        self.outputs["mask"] = layer

    def _show_segmentation(self, value: dict, pending: dict) -> None:
        result, plane = pending["result"], pending["plane"]
        clf = value["classifier"]
        self.segmentation = dict(value, result=result, plane=plane)
        if clf is not self._classifier:
            n = len(value.get("examples", ())) or 1
            self._set_classifier(clf, "trained on the scribbles" + (f" of {n} slices" if n > 1 else ""))
        common = {"owner": result.owner, "result": result.key}
        classes = [int(c) for c in clf.classes]
        wanted = classes if self.prob_check.isChecked() else []  # per-class maps only on request
        with self.state.keep_results():
            for layer in list(self.viewer.layers):  # probability layers of classes no longer painted (or asked for)
                tag = tag_of(layer)
                if tag.get("role", "").startswith("explore_probability_") and tag.get("owner") == result.owner:
                    if int(tag.get("class", -1)) not in wanted:
                        remove_own_layer(self.viewer, tag["role"], result.owner)
            self.outputs["probabilities"] = {}
            for k, c in enumerate(wanted):
                data, tf = self._placed(result, plane, value["probabilities"][k])
                self.outputs["probabilities"][c] = put_layer(
                    self.viewer,
                    data,
                    "image",
                    name=f"{result.name} probability {c}",
                    role=f"explore_probability_{c}",
                    colormap="magma",
                    contrast_limits=(0.0, 1.0),
                    visible=False,
                    extra_tag={"class": c},
                    **tf,
                    **common,
                )
            data, tf = self._placed(result, plane, value["labels"])
            self.outputs["labels"] = put_layer(
                self.viewer,
                data,
                "labels",
                name=f"{result.name} segmentation",
                role="explore_segmentation",
                opacity=0.5,
                extra_tag={"classes": classes, "route": clf.route},
                **tf,
                **common,
            )
            scribbles = self._scribbles_ref() if self._scribbles_ref is not None else None
            if scribbles is not None and scribbles in self.viewer.layers:  # keep painting on top
                self.scribble_picker.set_layer(scribbles)
                self.viewer.layers.move(self.viewer.layers.index(scribbles), len(self.viewer.layers))
                self.viewer.layers.selection.active = scribbles

    def _show_applied(self, value: dict, pending: dict) -> None:
        """The classes of every classified plane, as the segmentation layers (one plane or the whole stack)."""
        result, planes = pending["result"], pending["planes"]
        if len(planes) == 1:
            self._show_segmentation(
                {"labels": value["labels"][0], "probabilities": value["probabilities"][0], "classifier": value["classifier"]},
                {"result": result, "plane": planes[0]},
            )
            return
        frame = result.frame  # every plane of the fit, in the frame's order: the layer spans the stack
        clf = value["classifier"]
        classes = [int(c) for c in clf.classes]
        self.segmentation = dict(classifier=clf, result=result, plane=None)
        common = {"owner": result.owner, "result": result.key}
        with self.state.keep_results():
            self.outputs["labels"] = put_layer(
                self.viewer,
                frame.stack(value["labels"]),
                "labels",
                name=f"{result.name} segmentation",
                role="explore_segmentation",
                opacity=0.5,
                extra_tag={"classes": classes, "route": clf.route, "planes": len(planes)},
                **frame.transform(),
                **common,
            )
