"""What each engine path really allocates: the bytes a tile materialises and what a fit keeps.

The planner (:meth:`.blocks.BlockEngine.bytes_per_block`) sizes tiles by an *upper bound*
written for the eager path, which keeps ``[B, P, K]`` log-weights, softmax weights and masks
per tile. The fused kernels (the native C kernel on the CPU, Triton on CUDA) keep none of
those: a fit tile of the native path holds the dynamic radius and the neighbours'
coefficients and their gradients, a render tile the gathered neighbour values and the output.
Planning stays on the upper bound (tiles, and hence results, do not depend on this module);
these figures are what the memory log reports as *allocated* and what the widget's cost
estimate adds up.

Measured against the process's peak resident set (VmHWM, fresh process per case) by
``benchmarks/bench_estimate.py`` (docs/benchmarks_estimate.md). All figures are bytes;
``P`` is the HR pixels of one block, ``K`` (``k``) the neighbour offsets, ``G`` the guide
channels, ``C`` the rendered channels.
"""

from __future__ import annotations

#: Float32 / int32 and int64 / float64 element sizes.
F32 = 4
F64 = 8

#: Fit kernels whose tiles keep no ``[B, P, K]`` intermediates (see :mod:`.backends`).
FUSED_FIT_KERNELS = ("native", "triton")


def chunked_fit_inputs_per_block(P: int, K: int, G: int) -> int:
    """Bytes per block of the fused fit's guide-only inputs in the kernel's layout.

    Per pixel: 6 spatial features, the guide difference ``I'`` (G) and the target (G), one
    weight; per neighbour: ``dy``, ``dx``, ``J'`` (G), the neighbour values (G), the flat index
    (int64) and the border flag (one byte).
    """
    return int(P * (7 + 2 * G) * F32 + K * ((2 * G + 2) * F32 + 1 + F64))


def fit_resident_bytes(n_cells: int, P: int, K: int, G: int, kept_inputs: bool) -> int:
    """Bytes a fused fit keeps across steps: the prepared inputs of every block (when they fit
    the budget and are kept) plus the kernel parameters, their gradient and Adam's two moments
    (``[4, h, w]`` / ``[5, h, w]`` float32: small next to the inputs)."""
    inputs = n_cells * chunked_fit_inputs_per_block(P, K, G) if kept_inputs else 0
    parameters = n_cells * (4 + 4 + 5 * 3) * F32  # coefficients, their gradient, raw + Adam moments
    return int(inputs + parameters)


def fit_input_build_per_block(P: int, K: int, G: int) -> int:
    """Bytes per block of the temporaries that prepare a tile's fused-fit inputs, at their
    largest: the pixel features ``[P, 7 + G]`` while they are assembled from their columns (two
    copies) and the neighbour geometry (flat index in int64, two offsets). The smaller pieces
    (guide block, target, the neighbours' ``[K, G]``) are freed before or made after that
    peak (measured: docs/benchmarks_estimate.md)."""
    return int(P * 2 * (7 + G) * F32 + K * (F64 + 2 * F32))


def fused_fit_tile_per_block(P: int, K: int, G: int, kept_inputs: bool, kernel: str = "native") -> int:
    """Bytes per block that a step of a fused fit allocates for a tile, at its largest (the step
    that prepares the tile's inputs: the first one when they are kept, every one otherwise).

    The dynamic radius (``kernel="native"``: int32 from the C pass, and a copy; otherwise the
    bilinear sigma in float64, the radius in int64 and its int32 copy), the neighbours'
    coefficients and their gradient (``[4, B, K]`` float32 each; the native kernel gathers and
    scatters them in the coefficient map itself), the temporaries that prepare the inputs
    (:func:`fit_input_build_per_block`) and, when the inputs are not kept, the tile's inputs.
    """
    native = kernel == "native"
    radius = P * 2 * F32 if native else P * (F64 + F64 + F32)
    coefficients = 0 if native else 2 * 4 * K * F32
    inputs = 0 if kept_inputs else chunked_fit_inputs_per_block(P, K, G)
    return int(radius + coefficients + fit_input_build_per_block(P, K, G) + inputs)


def native_render_per_block(P: int, k: int, G: int, C: int, agg_bytes: int = F32, fused: bool = False) -> int:
    """Bytes per block of a render tile through the native weights kernel.

    Per block: pixel features ``[P, 7 + G]`` and their kernel-layout copies (``[6, P]``,
    ``[G, P]``), the radius; neighbour geometry and features (index, offsets, ``psi [6, k]``,
    ``rho``, ``J' [k, G]`` and its copy). With ``fused`` (few channels, aggregated in the
    kernel: :meth:`.native.RenderWeights.render`) also the gathered neighbour values ``[k, C]``
    and the output ``[C, P]`` float32 with its copy in image layout. Otherwise the values are
    gathered and the products written chunk by chunk into the workspace
    (:func:`.eager.render_blocks`), which the memory log counts as kept, not per block.
    """
    pixel = P * ((7 + G) + 6 + G + 2 + 1) * F32
    neighbours = k * (F64 + 2 * F32 + 6 * F32 + F32 + 2 * G * F32)
    if not fused:
        return int(pixel + neighbours)
    values = k * C * (agg_bytes + (F32 if agg_bytes != F32 else 0))
    outputs = P * C * F32 * 2
    return int(pixel + neighbours + values + outputs)
