"""Hand-written Triton kernels of the fit step and the render (``backend="triton"``).

Same formulation as the native C kernel (:mod:`.native`) and the fused formulas
(:func:`.compiled.fit_chunk`): one program per block of ``P`` HR pixels sharing their ``K``
neighbour cells; log-weights (spatial quadratic form in the block's local coordinates +
range term as a difference, never expanded), the dynamic-radius / repeated-border mask,
softmax, aggregation, L1 loss and the exact gradient of the neighbours' ``(A, B, C, rho)``,
including the chain rule through the quadratic form. Nothing of size ``[B, P, K]`` is
written to memory: a program holds a ``[BLOCK_P, BLOCK_K]`` tile of pairs in registers and
loops over its block's pixels.

Render: one program per (block, pixel tile); it computes the tile's softmax weights once and
loops over the map's channels in chunks of ``BLOCK_C``, gathering the neighbours' values
straight from the flat LR map ``[h w, C]`` (no ``[B, K, C]`` gather) and writing the
``[B, C, P]`` channels-first result that :meth:`.blocks.BlockEngine.write_blocks` copies
into the ``(C, H, W)`` output in runs of ``P_x`` pixels.

Precision (``pair_dtype``): float32, or float16 / bfloat16 for the per-pair products after
the log-weights (softmax weights, weights x values, and the seven gradient products per
pair); log-weights, ``exp``, every sum and the parameters stay float32. float16 needs loss
scaling: the per-pixel gradient factor ``weight * sign(out - target)`` is about ``1 / (G H W)``
(6.6e-6 at 224^2, below float16's smallest normal 6.1e-5), so it is multiplied by
``1 / max(weight)`` inside the kernel and the float32 sums are divided by it again.

Testing without a GPU: Triton's interpreter (``TRITON_INTERPRET=1``) runs these kernels on
CPU tensors with numpy. The kernels are plain Python functions turned into Triton kernels on
first use (:func:`_kernels`, sources in :mod:`.triton_src`), per interpreter mode, so the mode is read when a kernel is
first needed, not when ``triton`` was imported (tests switch it on for their own calls only).
"""

from __future__ import annotations

import functools
import math
import os
from typing import Dict, Optional, Tuple

import torch

_DTYPES = ("float32", "float16", "bfloat16")


# A fit program holds about ten [BLOCK_P, BLOCK_K] float32 tiles live; 4096 pairs over 8 warps
# is 16 values per thread per tile (8192 over 4 warps made ptxas emit 0.6 MB of PTX for sm_90,
# most of it spills). Not tuned on a GPU yet: gpu_check.py reports the time.
FIT_PAIRS_PER_STEP = 4096
FIT_WARPS = 8


def available() -> bool:
    """Whether ``triton`` imports here (it does not say whether a GPU is there)."""
    if os.environ.get("UPSAMPLE_ANYTHING_NO_TRITON"):
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means no Triton
        return False
    return True


def interpreting() -> bool:
    """Whether Triton's interpreter is switched on (``TRITON_INTERPRET=1``): kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


def usable(device: torch.device) -> bool:
    """Whether ``backend="triton"`` can run on ``device``: CUDA with triton, or any CPU tensor under the interpreter."""
    if not available():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreting()


@functools.cache
def _kernels(interpret: bool):
    """The jitted kernels for one interpreter mode (decorated on first use: see the module docstring)."""
    import triton

    from . import triton_src

    jit = (lambda fn: fn) if interpret else triton.jit  # helpers: plain functions under the interpreter
    return {
        "fit": triton.jit(triton_src.fit_kernel),
        "render": triton.jit(triton_src.render_kernel),
        "to_pair": jit(triton_src.to_pair),
        "to_bfloat16_emulated": triton_src.to_bfloat16_emulated,
    }


def _triton_dtype(dtype: torch.dtype):
    import triton.language as language

    return {torch.float32: language.float32, torch.float16: language.float16, torch.bfloat16: language.bfloat16}[dtype]


def _check_device(t: torch.Tensor) -> None:
    if not usable(t.device):
        raise RuntimeError(
            f"the Triton kernels cannot run on {t.device} here: they need a CUDA device with triton installed "
            "(on the CPU only under Triton's interpreter, TRITON_INTERPRET=1, for testing)"
        )


def _block_k(k: int) -> int:
    return max(16, 1 << (max(1, k) - 1).bit_length())


def _block_p(p: int, block_k: int, budget: int = 8192) -> int:
    """Pixels per program step: a ``[BLOCK_P, BLOCK_K]`` tile of about ``budget`` pairs (registers)."""
    return max(16, min(1 << (max(1, p) - 1).bit_length(), budget // block_k))


def fit_chunk(
    phi, coef, d_y, d_x, ic, jd, vals, target, weight, r2_pix, r2_off, repeated, pair_dtype: torch.dtype = torch.float32
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss, squared error and exact gradient of a chunk of blocks through the Triton fit kernel.

    Same inputs and outputs as :func:`.native.fit_chunk`: ``phi [B, 6, P]``, the neighbours'
    ``coef [4, B, K]`` (A, B, C, rho) and offsets ``d_y, d_x [B, K]`` (HR pixels), ``ic [B, G, P]``,
    ``jd, vals [B, G, K]``, ``target [B, G, P]``, ``weight [B, P]``, ``r2_pix [B, P]``, ``r2_off [K]``,
    ``repeated [B, K]``. Returns ``(loss_sum, squared_sum, grad_coef [4, B, K])`` (float64 sums,
    float32 gradient). ``pair_dtype``: float32, or float16 / bfloat16 for the per-pair products
    (module docstring).
    """
    _check_device(phi)
    if pair_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"pair_dtype={pair_dtype}: use torch.float32, torch.float16 or torch.bfloat16")
    B, _, P = phi.shape
    K = coef.shape[2]
    G = ic.shape[1]
    dev = phi.device
    f32 = [t.contiguous().to(torch.float32) for t in (phi, coef, d_y, d_x, ic, jd, vals, target, weight)]
    r2p = r2_pix.contiguous().to(torch.int32)
    r2o = r2_off[:K].contiguous().to(device=dev, dtype=torch.int32)
    rep = repeated.contiguous().to(torch.int8)
    grad = torch.empty(4, B, K, dtype=torch.float32, device=dev)
    loss = torch.empty(B, dtype=torch.float32, device=dev)
    sq = torch.empty(B, dtype=torch.float32, device=dev)
    if B == 0:
        zero = torch.zeros((), dtype=torch.float64, device=dev)
        return zero, zero.clone(), grad
    wmax = float(f32[8].max()) if pair_dtype == torch.float16 else 0.0
    loss_scale = 1.0 / wmax if wmax > 0 else 1.0
    bk = _block_k(K)
    bp = _block_p(P, bk, FIT_PAIRS_PER_STEP)
    kernels = _kernels(interpreting())
    emulated = pair_dtype == torch.bfloat16 and dev.type == "cpu"  # the interpreter: see triton_src
    rnd = kernels["to_bfloat16_emulated" if emulated else "to_pair"]
    kernels["fit"][(B,)](
        *f32, r2p, r2o, rep, loss, sq, grad, B, P, K, loss_scale,
        G=G, BLOCK_P=bp, BLOCK_K=bk, PAIR=_triton_dtype(pair_dtype), RND=rnd, num_warps=FIT_WARPS,
    )  # fmt: skip
    return loss.double().sum(), sq.double().sum(), grad


def render_blocks(
    phi, psi, rho, ic, jd, q, values_flat, r2_pix, r2_off, repeated, agg_dtype: torch.dtype = torch.float32, block_c: int = 64
) -> torch.Tensor:
    """``[B, C, P]`` render of a tile's blocks (channels first) through the Triton render kernel.

    ``phi [B, 6, P]``, ``psi [B, 6, K]``, ``rho [B, K]``, ``ic [B, G, P]``, ``jd [B, G, K]``,
    ``q [B, K]`` (flat LR index of each neighbour), ``values_flat [h w, C]`` (the LR map, any
    float dtype), ``r2_pix [B, P]``, ``r2_off [>= K]``, ``repeated [B, K]`` or None.
    ``agg_dtype``: the dtype of the weights-times-values product (float32 accumulation).
    """
    _check_device(phi)
    B, _, P = phi.shape
    K = psi.shape[2]
    G = ic.shape[1]
    C = values_flat.shape[1]
    dev = phi.device
    f32 = [t.contiguous().to(torch.float32) for t in (phi, psi, rho, ic, jd)]
    rep = (
        torch.zeros(B, K, dtype=torch.int8, device=dev)
        if repeated is None
        else repeated.reshape(B, K).contiguous().to(torch.int8)
    )
    out = torch.empty(B, C, P, dtype=torch.float32, device=dev)
    if B == 0:
        return out
    bk = _block_k(K)
    bp = _block_p(P, bk, 4096)
    bc = max(16, min(block_c, 1 << (max(1, C) - 1).bit_length()))
    kernels = _kernels(interpreting())
    emulated = agg_dtype == torch.bfloat16 and dev.type == "cpu"  # the interpreter: see triton_src
    kernels["render"][(B, math.ceil(P / bp))](
        *f32, q.contiguous().to(torch.int32), values_flat.contiguous(), r2_pix.contiguous().to(torch.int32),
        r2_off[:K].contiguous().to(device=dev, dtype=torch.int32), rep, out, P, K, C,
        G=G, BLOCK_P=bp, BLOCK_K=bk, BLOCK_C=bc, AGG=_triton_dtype(agg_dtype),
        IEEE=agg_dtype == torch.float32 or emulated, RND=kernels["to_bfloat16_emulated" if emulated else "to_pair"], num_warps=4,
    )  # fmt: skip
    return out


_FIT_SIGNATURE = {
    **{n: "*fp32" for n in ("phi", "coef", "d_y", "d_x", "ic", "jd", "vals", "target", "weight")},
    "r2_pix": "*i32", "r2_off": "*i32", "rep": "*i8", "loss_out": "*fp32", "sq_out": "*fp32", "grad_out": "*fp32",
    "B": "i32", "P": "i32", "K": "i32", "loss_scale": "fp32",
}  # fmt: skip
_RENDER_SIGNATURE = {
    **{n: "*fp32" for n in ("phi", "psi", "rho", "ic", "jd")},
    "q": "*i32", "values": "*fp32", "r2_pix": "*i32", "r2_off": "*i32", "rep": "*i8", "out": "*fp32",
    "P": "i32", "K": "i32", "C": "i32",
}  # fmt: skip


def compile_for_gpu(
    arch: int = 89, G: int = 3, P: int = 196, K: int = 197, C: int = 384, dtype: torch.dtype = torch.float32
) -> Dict[str, int]:
    """Compile both kernels to a CUDA binary for compute capability ``arch`` (89: RTX 4090,
    90: H100 / H200) *without a GPU* (Triton's frontend, LLVM and the ptxas it ships with).

    Checks what the interpreter cannot: that the kernels are valid compiled Triton for the
    shapes of a real fit / render (``G`` guide channels, ``P`` pixels per block, ``K`` offsets,
    ``C`` map channels, ``dtype`` the pair / aggregation dtype). Returns the PTX size of each
    kernel in characters.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import triton_src

    pair = _triton_dtype(dtype)
    rnd = triton.jit(triton_src.to_pair)
    bk = _block_k(K)
    target = GPUTarget("cuda", int(arch), 32)
    sizes = {}
    fit_consts = {"G": G, "BLOCK_P": _block_p(P, bk, FIT_PAIRS_PER_STEP), "BLOCK_K": bk, "PAIR": pair, "RND": rnd}
    render_consts = {
        "G": G, "BLOCK_P": _block_p(P, bk, 4096), "BLOCK_K": bk, "BLOCK_C": max(16, min(64, _block_k(C))),
        "AGG": pair, "IEEE": dtype == torch.float32, "RND": rnd,
    }  # fmt: skip
    for name, fn, signature, consts, warps in (
        ("fit", triton_src.fit_kernel, _FIT_SIGNATURE, fit_consts, FIT_WARPS),
        ("render", triton_src.render_kernel, _RENDER_SIGNATURE, render_consts, 4),
    ):
        sig = {**signature, **{c: "constexpr" for c in consts}}
        src = ASTSource(fn=triton.jit(fn), signature=sig, constexprs=consts)
        compiled = triton.compile(src, target=target, options={"num_warps": warps})
        sizes[name] = len(compiled.asm["ptx"])
    return sizes


def warmup_seconds(device: Optional[torch.device] = None) -> float:  # pragma: no cover - GPU only
    """Seconds to compile both kernels for one small shape on ``device`` (gpu_check's first-call time)."""
    import time

    dev = device or torch.device("cuda")
    t0 = time.perf_counter()
    B, P, K, G = 2, 16, 16, 3
    z = torch.zeros
    fit_chunk(
        z(B, 6, P, device=dev), z(4, B, K, device=dev), z(B, K, device=dev), z(B, K, device=dev), z(B, G, P, device=dev),
        z(B, G, K, device=dev), z(B, G, K, device=dev), z(B, G, P, device=dev), z(B, P, device=dev),
        z(B, P, dtype=torch.int32, device=dev), z(K, dtype=torch.int32, device=dev), z(B, K, dtype=torch.bool, device=dev),
    )  # fmt: skip
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t0


__all__ = ["available", "interpreting", "usable", "fit_chunk", "render_blocks"]
