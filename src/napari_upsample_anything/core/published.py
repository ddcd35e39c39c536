"""The published recipe's fixed numbers, in one torch-free module.

The CLI parser, the widgets' fields and the option records all default to these; they import
this module before (or without) torch, so it must stay free of heavy imports.
"""

from __future__ import annotations

#: Adam updates of the published loop (steps 0..50, described as "50 steps").
PUBLISHED_STEPS = 51
#: Initial learning rate of the published loop (decayed to 1e-9 over 5100 steps).
PUBLISHED_LR = 0.1
#: How the fit's LR input is made from the guide: "bicubic" (published, the default) or "area"
#: (cell averages). The one list the core, the API, the options and the CLI choose from.
FIT_DOWNSAMPLE = ("bicubic", "area")
