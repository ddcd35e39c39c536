"""The layers a fitted result adds to the viewer: HR PCA, LR PCA (hidden) and memory (hidden).

Shared by the main widget (after a run) and by anything that re-adds a result's layers.
"""

from __future__ import annotations

import weakref

from ._registry import FitResult, put_layer


def add_result_layers(viewer, result: FitResult) -> None:
    """Create or replace the result's layers: HR PCA, LR PCA (hidden) and memory (hidden).

    The kernels are drawn on request only (Kernel inspector, "Draw kernels", about a thousand
    ellipses by default): all of them at once are an unreadable tangle and slow to draw.
    """
    from ._memory import memory_layer_data

    frame, planes, key, name = result.frame, result.planes, result.key, result.name
    owner = result.owner
    factor = planes[0].factor
    source = result.source_ref() if result.source_ref is not None else None
    common = {"owner": owner, "result": key, "near": source}  # results sit right above their source
    hr = put_layer(
        viewer,
        frame.stack([p.lr_rgb for p in planes]),
        "image",
        name=f"{name} LR PCA",
        role="lr_pca",
        rgb=True,
        visible=False,
        **frame.transform(factor),
        **common,
        extra_tag={"lr_shape": list(planes[0].lr_shape), "factor": list(factor)},
    )
    result.layers["lr_pca"] = weakref.ref(hr)
    common["near"] = hr  # each next layer right above the previous: source, LR PCA, HR PCA, memory
    hr = put_layer(
        viewer,
        frame.stack([p.hr_rgb for p in planes]),
        "image",
        name=f"{name} HR PCA",
        role="hr_pca",
        rgb=True,
        **frame.transform(),
        **common,
    )
    result.layers["hr_pca"] = weakref.ref(hr)
    common["near"] = hr
    mem, kind = memory_layer_data(result)
    layer = put_layer(
        viewer,
        mem,
        "image",
        name=f"{name} memory",
        role="memory",
        colormap="inferno",
        visible=False,
        opacity=0.8,
        **frame.transform(factor),
        **common,
        extra_tag={"unit": "MiB", "value": kind, "stage": "all"},
    )
    result.layers["memory"] = weakref.ref(layer)
