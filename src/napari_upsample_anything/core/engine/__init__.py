"""The block engine and the fit/render kernels.

* :mod:`.blocks`: :class:`~.blocks.BlockEngine`, the block structure of one guide over one LR
  grid (tiles, per-pixel and per-neighbour features, tile plans, one tile's render).
* :mod:`.backends`: the one backend choice (:func:`~.backends.choose_backend`), a table of
  which kernel runs for each backend, device and mode (fit or render).
* Kernels, the same formulas four ways: :mod:`.eager` (tensor operations, hand-written
  backward), :mod:`.compiled` (``torch.compile``, and the mixed-precision formulas),
  :mod:`.native` (a C kernel built on first use, source in :mod:`.native_src`), :mod:`.triton_kernels` with
  :mod:`.triton_src` (hand-written Triton kernels for CUDA).

The tile loops that use the engine are the front ends :mod:`..render` and :mod:`..fit`.
"""
