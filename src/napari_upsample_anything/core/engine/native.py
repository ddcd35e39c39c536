"""Hand-written CPU kernel of the fused fit chunk (:func:`.compiled.fit_chunk`), built with the
system C compiler on first use and called through ctypes.

Why a C kernel next to ``torch.compile``: inductor's CPU code for this chunk runs little
faster than the eager path (docs/benchmarks_engine.md), because it splits the
softmax and the two reductions into six passes and keeps ``[B, P, K]`` intermediates. Here,
with OpenMP over blocks, each block of P pixels x K neighbours (a few hundred KiB, L2-resident)
takes two passes:

1. per pixel, one pass over its neighbours: log-weight, exp, denominator and aggregation
   (keeping the weight and the range term per pair for the gradient), then the loss and the
   four per-pixel factors of the gradient. No maximum is subtracted: the fit's log-weights
   are a Gaussian's exponents (<= 0), and their base-2 values are clamped to [-126, 115]; a pixel
   whose denominator falls outside [1e-25, 1e30] (tiny sigmas, or inputs that are no
   Gaussian) is redone with the max-shifted softmax. ``exp`` is inlined and in base 2 (the
   coefficients are scaled by log2(e) per block, so the range reduction is exact; a polynomial,
   relative error below 5e-7, ``test_inlined_exp_error_bound``): calling glibc's vector
   ``expf`` cost a third of the kernel. With the fit's monomial pixel
   features the spatial term is a quadratic in lx per pixel row, and each pixel's loop stops
   after its last kept offset (offsets are sorted by distance);
2. the gradient, summed over the block's pixels sixteen neighbours at a time in registers
   (a small matrix product), instead of updating seven ``[K]`` arrays per pixel.

The neighbours' coefficients are read from the whole coefficient map through their cell
indices, and their gradients added into the map's gradient in index order (the sums of
``index_add_``, whatever the thread count). docs/benchmarks_engine.md has its time per pair
and per fit step. Same formulas as :func:`.compiled.fit_chunk`, but it takes the neighbours'
(A, B, C, rho) and offsets instead of ``psi`` and applies the chain rule itself; masked pairs
get weight 0 instead of a ``-inf`` log-weight. Tests compare it with the float64 reference
and the other paths. The same library holds the render's softmax weights (aggregated in the
kernel for a few channels) and the dynamic radius of a tile's pixels.

Compiled with ``-O3 -march=native -ffast-math -fopenmp`` (fast-math lets GCC vectorise the
reductions and contract the polynomial into FMAs) but *linked* without ``-ffast-math``: linking with it adds GCC's
``crtfastmath.o``, whose constructor turns on flush-to-zero / denormals-are-zero for the
whole process when the library is loaded, silently changing every other computation of the
user's program (a test checks that subnormals survive loading the kernel). The kernel sets
flush-to-zero itself, per block and per thread, and restores the previous state: without it
the weights of far neighbours underflow to subnormals and a fit is several times slower. The library is
cached under the user cache directory, keyed by the source hash, the compiler and this
CPU's model and feature flags (``-march=native`` code from one node of a cluster with a
shared home directory must not be loaded on an older node), written to a temporary name
and renamed when complete.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from .native_src import SOURCE as _SOURCE


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CC", ""), "gcc", "cc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_flags() -> set:
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read: not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line for line in f if line.startswith("flags")), "").split(":", 1)[-1].split())
    except OSError:
        return set()


def _cpu_signature() -> str:
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))][:2]
        return platform.machine() + "".join(lines)
    except OSError:
        return platform.machine() + platform.processor()


WITHOUT_ENV = "UPSAMPLE_ANYTHING_NATIVE_WITHOUT"


def excluded_extensions() -> Tuple[str, ...]:
    """Vector extensions the kernel is told not to use (``UPSAMPLE_ANYTHING_NATIVE_WITHOUT``, e.g.
    ``avx512f``: the AVX2 build on an AVX-512 CPU, to measure here what AVX2 CPUs run; see
    ``benchmarks/bench_roofline.py --isa avx2``). Empty when unset.

    Raises
    ------
    ValueError
        When a name is not a plain extension name (letters, digits, ``.`` or ``_``): it becomes a
        ``-mno-<name>`` compiler flag.
    """
    names = tuple(n for n in os.environ.get(WITHOUT_ENV, "").replace(",", " ").split() if n)
    bad = [n for n in names if not n.replace(".", "").replace("_", "").isalnum()]
    if bad:
        raise ValueError(
            f"{WITHOUT_ENV}={os.environ.get(WITHOUT_ENV)!r}: {bad[0]!r} is not an extension name; "
            "give names such as 'avx512f' or 'avx2', separated by commas"
        )
    return names


def compile_flags() -> List[str]:
    """Compiler flags for this CPU.

    ``-march=native`` enables every vector extension the CPU has, but GCC then still *tunes* for
    256-bit vectors on most AVX-512 CPUs (``-mprefer-vector-width=256``, to avoid the clock
    penalty of 512-bit code on older Intel parts). On AVX-512 CPUs the kernel is asked for
    512-bit vectors: half the instructions for the same lanes (measured in
    docs/benchmarks_engine.md). Elsewhere (AVX2, ARM, no /proc/cpuinfo) the compiler's choice stands.
    Extensions named in ``UPSAMPLE_ANYTHING_NATIVE_WITHOUT`` are turned off (``-mno-<name>``;
    :func:`excluded_extensions`).
    """
    flags = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC"]
    without = excluded_extensions()
    if "avx512f" in _cpu_flags() and "avx512f" not in without:
        flags.append("-mprefer-vector-width=512")
    return flags + [f"-mno-{name}" for name in without]


def vector_width() -> str:
    """The vector width the kernel is built for here: ``"512-bit (AVX-512)"``, ``"256-bit (AVX2)"`` or the compiler's default."""
    without = set(excluded_extensions())
    cpu = _cpu_flags() - without
    if without & {"avx", "avx2"}:  # GCC's -mno-avx2 turns AVX-512 off too, -mno-avx both
        cpu.discard("avx512f")
    if "avx" in without:
        cpu.discard("avx2")
    if "avx512f" in cpu:
        return "512-bit (AVX-512)"
    if "avx2" in cpu:
        return "256-bit (AVX2)"
    return "compiler default"


def build_description() -> str:
    """One line naming the native build (compiler, flags, vector width), for benchmark tables."""
    cc = _compiler()
    if cc is None or not available():
        return "native kernel unavailable (eager / compiled fallback)"
    flags = _BUILT.get("flags") or tuple(compile_flags())
    tuned = "-mprefer-vector-width=512" in flags or "avx512f" not in _cpu_flags() or "-mno-avx512f" in flags
    width = vector_width() if tuned else "256-bit (GCC's tuning)"
    return f"native kernel: {Path(cc).name} {' '.join(flags)}, {width} vectors"


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "napari-upsample-anything" / "native"


def _flag_choices() -> List[List[str]]:
    tuned = compile_flags()
    plain = [f for f in tuned if not f.startswith("-mprefer-vector-width")]
    return [tuned] if plain == tuned else [tuned, plain]


_BUILT: dict = {}


def _build(cc: str, cflags: List[str], link_flags: List[str]) -> Optional[Path]:
    """Path of the cached library built with ``cflags`` (built now if absent), or None when the
    compiler fails."""
    # -march=native: the library is only valid on this kind of CPU, so the CPU is in the key
    # (a home directory shared between machines must not hand one CPU's build to another).
    identity = _SOURCE + cc + " ".join(cflags + link_flags) + _cpu_signature()
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    folder = _cache_dir()
    lib_path = folder / f"fit_chunk_{key}.so"
    if not lib_path.exists():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder) as tmp:
                src = Path(tmp) / "fit_chunk.c"
                src.write_text(_SOURCE)
                obj = Path(tmp) / "fit_chunk.o"
                tmp_lib = Path(tmp) / "fit_chunk.so"
                subprocess.run([cc, *cflags, "-c", str(src), "-o", str(obj)], check=True, capture_output=True, timeout=300)
                subprocess.run(
                    [cc, *link_flags, str(obj), "-o", str(tmp_lib), "-lm"], check=True, capture_output=True, timeout=300
                )
                os.replace(tmp_lib, lib_path)  # complete file appears atomically
        except (OSError, subprocess.SubprocessError):
            return None
    return lib_path


@functools.cache
def _library() -> Optional[ctypes.CDLL]:
    """Build (once) and load the kernel library, or None when no compiler can build it."""
    if os.environ.get("UPSAMPLE_ANYTHING_NO_COMPILE"):
        return None
    cc = _compiler()
    if cc is None:
        return None
    link_flags = ["-shared", "-fopenmp"]  # no -ffast-math here: see the module docstring
    lib_path = None
    for cflags in _flag_choices():  # the tuned flags first; the plain ones if this compiler rejects them
        lib_path = _build(cc, cflags, link_flags)
        if lib_path is not None:
            _BUILT["flags"] = tuple(cflags)
            break
    if lib_path is None:
        return None
    return _load(lib_path)


def _load(lib_path: Path) -> Optional[ctypes.CDLL]:
    try:
        lib = ctypes.CDLL(str(lib_path))
    except OSError:
        return None
    for name in ("fit_chunk", "render_weights", "exp2_values", "team_flush_denormals", "radius_sq_blocks"):
        getattr(lib, name).restype = None
    lib.parameter_step.restype = ctypes.c_int64
    return lib


def plain_build() -> Optional[ctypes.CDLL]:
    """The library built without the CPU-specific tuning flags (only ``-march=native``), to test
    that the tuned build computes the same numbers; None without a compiler."""
    cc = _compiler()
    plain = _flag_choices()[-1]
    path = _build(cc, plain, ["-shared", "-fopenmp"]) if cc else None
    return _load(path) if path is not None else None


def build_without(*extensions: str) -> Optional[ctypes.CDLL]:
    """The library built without some of this CPU's vector extensions (``"avx512f"``,
    ``"avx2"``: ``-mno-avx512f`` ...), to test on this CPU the paths that other CPUs take: the
    fit kernel has AVX-512 and AVX2 paths for separable blocks and portable loops otherwise.
    None without a compiler."""
    cc = _compiler()
    flags = _flag_choices()[-1] + [f"-mno-{name}" for name in extensions]
    path = _build(cc, flags, ["-shared", "-fopenmp"]) if cc else None
    return _load(path) if path is not None else None


def available() -> bool:
    """Whether the native CPU kernel can be built and loaded here."""
    return _library() is not None


def team_flush_denormals(on: bool) -> bool:
    """Set (``on``) or restore flush-to-zero in all of torch's CPU worker threads; False when the
    native library is not available (then only the calling thread is flushed)."""
    lib = _library()
    threads = torch.get_num_threads()
    if lib is None or threads < 2:
        return False
    lib.team_flush_denormals(ctypes.c_int64(threads), ctypes.c_int32(1 if on else 0))
    return True


def exp2_values(x: torch.Tensor) -> torch.Tensor:
    """The kernels' inlined ``2^x`` on float32 ``x`` (clamped to [-126, 115] as in the kernels,
    whose log-weights are in base 2), to test its error bound."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the native library could not be built (no C compiler?)")
    x = x.contiguous().to(torch.float32)
    out = torch.empty_like(x)
    lib.exp2_values(ctypes.c_int64(x.numel()), _ptr(x), _ptr(out))
    return out


def exp2_values_vector(x: torch.Tensor, lib=None) -> Tuple[Optional[torch.Tensor], int]:
    """The ``2^x`` of the fit kernel's vector path for separable blocks on float32 ``x``, to test its
    error bound: ``(values, 512)`` from an AVX-512 build (table, degree-2 polynomial and
    VSCALEFPS, no clamp), ``(values, 256)`` from an AVX2 build (table, degree-3 polynomial, clamped
    to [-126, 115]), ``(None, 0)`` from a build with neither (``lib``: another build, default
    this one)."""
    lib = lib if lib is not None else _library()
    if lib is None:
        raise RuntimeError("the native library could not be built (no C compiler?)")
    if not hasattr(lib, "exp2_values_vector"):
        return None, 0
    x = x.contiguous().to(torch.float32)
    out = torch.empty_like(x)
    lib.exp2_values_vector.restype = ctypes.c_int
    width = lib.exp2_values_vector(ctypes.c_int64(x.numel()), _ptr(x), _ptr(out))
    return out, int(width)


def render_weights(phi, psi, rho, ic, jd, r2_pix, r2_off, repeated, out=None, vals=None) -> torch.Tensor:
    """Softmax weights ``[B, P, K]`` of render blocks through the native kernel (float32, G <= 3).

    ``phi [B, 6, P]`` (the spatial pixel features), ``psi [B, 6, K]``, ``rho [B, K]``,
    ``ic [B, G, P]`` (centred guide), ``jd [B, G, K]``, ``r2_pix [B, P]``, ``r2_off [K]`` and
    ``repeated [B, K]`` as in :func:`.compiled.render_weights`; ``out``: an optional contiguous
    float32 ``[B, P, K]`` buffer to write into. Dropped pairs get weight 0.

    With ``vals [B, C, K]`` (the neighbours' values) the kernel aggregates them itself and
    returns the render ``[B, C, P]`` (``out``: an optional ``[B, C, P]`` buffer) without
    writing the weights: :data:`FUSED_RENDER_MAX_CHANNELS`.
    """
    lib = _library()
    if lib is None:
        raise RuntimeError("the native render kernel could not be built (no C compiler?)")
    B, _, P = phi.shape
    K = psi.shape[2]
    G = ic.shape[1]
    if G > 3:
        raise ValueError(f"the native render kernel handles at most 3 guide channels, got {G}")
    f32 = [t.contiguous().to(torch.float32) for t in (phi, psi, rho, ic, jd)]
    r2p = r2_pix.contiguous().to(torch.int32)
    r2o = r2_off.contiguous().to(torch.int32)
    rep = repeated.contiguous().to(torch.uint8)
    C = 0 if vals is None else vals.shape[1]
    if vals is not None:
        vals = vals.contiguous().to(torch.float32)
    if out is None:
        out = torch.empty((B, P, K) if vals is None else (B, C, P), dtype=torch.float32)
    failed = ctypes.c_int32(0)
    lib.render_weights(
        ctypes.c_int64(max(1, min(torch.get_num_threads(), B))),
        *[ctypes.c_int64(v) for v in (B, P, K, G)],
        *[_ptr(t) for t in f32],
        _ptr(r2p),
        _ptr(r2o),
        _ptr(rep),
        _ptr(out) if vals is None else None,
        ctypes.byref(failed),
        ctypes.c_int64(C),
        _ptr(vals) if vals is not None else None,
        _ptr(out) if vals is not None else None,
    )
    if failed.value:
        raise MemoryError(f"the native render kernel could not allocate its scratch memory ({B} blocks x {K} neighbours)")
    return out


def radius_sq_blocks(src, taps_y, taps_x, py: int, px: int, alpha: float, radius: int) -> Optional[torch.Tensor]:
    """Squared dynamic radius ``[B, P]`` (int32) of a tile's block pixels through the native
    kernel, or None when the library is not available (then the caller's torch path runs).

    ``src [h, w]``: the LR sigma map (float32, in the radius' units); ``taps_y = (idx [ny, 2],
    weight [ny, 2])`` of the tile's padded HR rows and ``taps_x`` of its columns
    (:func:`..interp.linear_taps`); ``py, px``: block size. Computes what
    :meth:`.blocks.BlockEngine.radius_sq`'s torch path computes (float64 bilinear values rounded
    once, ``ceil(alpha * sigma)`` in float32 clamped to ``[1, radius]``), bit for bit, in one pass
    without the ``[ny, 2, nx, 2]`` float64 gather.
    """
    lib = _library()
    if lib is None:
        return None
    (iy, wy), (ix, wx) = taps_y, taps_x
    ny, nx = iy.shape[0], ix.shape[0]
    src = src.contiguous().to(torch.float32)
    iy, ix = iy.contiguous().to(torch.int64), ix.contiguous().to(torch.int64)
    wy, wx = wy.contiguous().to(torch.float64), wx.contiguous().to(torch.float64)
    out = torch.empty((ny // py) * (nx // px), py * px, dtype=torch.int32)
    lib.radius_sq_blocks(
        ctypes.c_int64(max(1, torch.get_num_threads())), ctypes.c_int64(src.shape[1]), _ptr(src),
        ctypes.c_int64(ny), _ptr(iy), _ptr(wy), ctypes.c_int64(nx), _ptr(ix), _ptr(wx),
        ctypes.c_int64(py), ctypes.c_int64(px), ctypes.c_float(alpha), ctypes.c_int32(radius), _ptr(out),
    )  # fmt: skip
    return out


def parameter_step(raw, coef_out, sigma_eff_out, adam=None, grad_coef=None) -> int:
    """The fused fit's parameter work between two kernel passes, in one call (float32 tensors,
    contiguous, updated in place; :class:`..fit.FusedParameters` calls it).

    With ``grad_coef [4, N]`` (the loss's gradient in A, B, C, rho) and ``adam`` (an
    :class:`..fit.Adam` on ``raw``, whose moments and step count are updated here): the chain rule
    back to ``raw [4, N]`` and one Adam step of ``raw``. Then, in any case, the coefficients of
    ``raw`` into ``coef_out [4, N]`` and ``max(sigma_x, sigma_y)`` into ``sigma_eff_out [N]``.
    The same formulas as :func:`..field.kernel_coefficients_backward`, :meth:`..fit.Adam.step`
    and :func:`..field.kernel_coefficients`, computed in float64 per cell and rounded once
    (tested against them). Returns how many cells have non-finite parameters or a sigma that
    overflowed or underflowed float32 (0 when the step is sound).
    """
    lib = _library()
    if lib is None:
        raise RuntimeError("the native library could not be built (no C compiler?)")
    for name, t in (("raw", raw), ("coef_out", coef_out), ("sigma_eff_out", sigma_eff_out), ("grad_coef", grad_coef)):
        if t is not None and (t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu"):
            raise ValueError(f"parameter_step: {name} must be a contiguous float32 CPU tensor")
    n = raw.numel() // 4
    threads = ctypes.c_int64(max(1, torch.get_num_threads()))
    if grad_coef is None:
        return int(lib.parameter_step(threads, ctypes.c_int64(n), _ptr(raw), None, None, None, *[ctypes.c_double(0.0)] * 5,
                                      _ptr(coef_out), _ptr(sigma_eff_out)))  # fmt: skip
    lr, bias1, bias2 = adam.advance()
    step_size, bias2_sqrt = lr / bias1, math.sqrt(bias2)
    return int(
        lib.parameter_step(
            threads, ctypes.c_int64(n), _ptr(raw), _ptr(grad_coef), _ptr(adam.exp_avg), _ptr(adam.exp_avg_sq),
            ctypes.c_double(adam.beta1), ctypes.c_double(adam.beta2), ctypes.c_double(step_size),
            ctypes.c_double(bias2_sqrt), ctypes.c_double(adam.eps), _ptr(coef_out), _ptr(sigma_eff_out),
        )
    )  # fmt: skip


def _ptr(t: torch.Tensor):
    return ctypes.c_void_p(t.data_ptr())


def fit_chunk(
    phi, coef, d_y, d_x, ic, jd, vals, target, weight, r2_pix, r2_off, repeated, want_grad: bool = True, lib=None,
    q=None, grad_out=None,
):  # fmt: skip
    """:func:`.compiled.fit_chunk` on the CPU through the native kernel (float32, G <= 3), with the
    spatial coefficients and their chain rule done inside the kernel.

    Takes the neighbours' ``coef [4, B, K]`` (A, B, C, rho) and offsets ``d_y, d_x [B, K]``
    instead of ``psi`` and ``rho`` (``psi = compiled.spatial_coefficients(coef, d_y, d_x)``);
    the other inputs are those of :func:`.compiled.fit_chunk`. Returns ``(loss_sum, squared_sum,
    grad_coef [4, B, K])``; with ``want_grad=False`` the kernel skips its gradient pass and
    ``grad_coef`` is zero. ``lib``: another build of the library (tests), default this one.

    With ``q`` (int64 ``[B * K]``, the neighbours' cells), ``coef`` is the whole map ``[4, N]``
    and the kernel gathers the neighbours' coefficients itself; with ``want_grad`` their
    gradients are also added into ``grad_out [4, N]`` (float32, contiguous) at those cells,
    in place, with the sums of ``grad_out.index_add_(1, q, grad_coef.reshape(4, -1))`` in the
    same order (bit for bit). Saves the per-step ``[4, B, K]`` gather and scatter of the fit.
    """
    lib = lib if lib is not None else _library()
    if lib is None:
        raise RuntimeError("the native fit kernel could not be built (no C compiler?)")
    B, _, P = phi.shape
    K = d_y.shape[1]
    G = ic.shape[1]
    N = coef.shape[1] if q is not None else 0
    if q is not None:
        q = q.contiguous().to(torch.int64)
        if coef.dim() != 2 or q.numel() != B * K:
            raise ValueError(f"with q, coef is [4, N] and q has B * K = {B * K} cells, got {tuple(coef.shape)}, {q.numel()}")
        if want_grad and (grad_out is None or not grad_out.is_contiguous() or grad_out.dtype != torch.float32):
            raise ValueError("with q and want_grad, grad_out must be a contiguous float32 [4, N] tensor")
    if G > 3:
        raise ValueError(f"the native fit kernel handles at most 3 guide channels, got {G}")
    f32 = [t.contiguous().to(torch.float32) for t in (phi, coef, d_y, d_x, ic, jd, vals, target, weight)]
    r2p = r2_pix.contiguous().to(torch.int32)
    r2o = r2_off.contiguous().to(torch.int32)
    rep = repeated.contiguous().to(torch.uint8)
    grad_coef = (torch.empty if want_grad else torch.zeros)(4, B, K, dtype=torch.float32)
    loss = ctypes.c_double()
    squared = ctypes.c_double()
    failed = ctypes.c_int32(0)
    lib.fit_chunk(
        ctypes.c_int64(max(1, min(torch.get_num_threads(), B))),
        ctypes.c_int64(B),
        ctypes.c_int64(P),
        ctypes.c_int64(K),
        ctypes.c_int64(G),
        *[_ptr(t) for t in f32],
        _ptr(r2p),
        _ptr(r2o),
        _ptr(rep),
        ctypes.byref(loss),
        ctypes.byref(squared),
        _ptr(grad_coef),
        ctypes.c_int32(1 if want_grad else 0),
        ctypes.byref(failed),
        _ptr(q) if q is not None else None,
        ctypes.c_int64(N),
        _ptr(grad_out) if q is not None and want_grad else None,
    )
    if failed.value:
        raise MemoryError(
            f"the native fit kernel could not allocate its scratch memory ({B} blocks of {P} pixels x {K} neighbours)"
        )
    return torch.tensor(loss.value), torch.tensor(squared.value), grad_coef


# Renders of at most this many channels are aggregated inside the native weights kernel
# (render_weights(vals=...)): no [B, P, K] weights written and read back by a GEMM. Same-process
# A/B at 1024^2, 1 thread (docs/engine.md): fused / GEMM time 0.58 at C = 3, 0.86 at 8, 0.72 at
# 16, 0.93 at 32; the GEMM wins at large C (its products run near the matmul's peak).
FUSED_RENDER_MAX_CHANNELS = 16


class RenderWeights:
    """Softmax weights of render chunks through the native CPU kernel
    (:func:`render_weights`): the eager path's log-weights, range term, mask and softmax
    (seven passes over ``[chunk, P, K]``) in one pass per pixel; the products stay a GEMM, except
    for at most :data:`FUSED_RENDER_MAX_CHANNELS` float32 channels, aggregated in the kernel
    (:meth:`render`).
    ``engine``: the :class:`.blocks.BlockEngine`; usable where :func:`.backends.native_usable`."""

    def __init__(self, engine):
        self.r2_off = engine.grid.offsets.r2.to(torch.int32)
        self.channels = engine.channels
        self.P = engine.P

    def bind(self, spatial, ic, psi, rho, jd, r2_pix, repeated, workspace, chunk: int):
        """``weights(b0, b1)``: the ``[n, P, K]`` softmax weights of blocks ``b0:b1``, written into a
        workspace buffer. ``spatial [B, 6, P]`` and ``ic [B, G, P]``:
        :meth:`.blocks.BlockEngine.pixel_features_channels_first`; the rest as
        :meth:`.blocks.BlockEngine.neighbour_features` and :meth:`.blocks.BlockEngine.neighbours` give them."""
        nb, k = spatial.shape[0], psi.shape[2]
        rep = repeated[:, 0, :] if repeated is not None else torch.zeros(nb, k, dtype=torch.bool)
        spatial, ic = spatial.contiguous(), ic.contiguous()
        jd_t = jd.transpose(1, 2).contiguous()  # [B, G, K]
        psi, rho = psi.contiguous(), rho.contiguous()
        r2, r2_off = r2_pix.to(torch.int32).contiguous(), self.r2_off[:k].contiguous()
        buf = workspace.get("native_weights", (chunk, self.P, k), torch.float32)

        def weights(b0: int, b1: int) -> torch.Tensor:
            return render_weights(
                spatial[b0:b1], psi[b0:b1], rho[b0:b1], ic[b0:b1], jd_t[b0:b1], r2[b0:b1], r2_off, rep[b0:b1],
                out=buf[: b1 - b0],
            )  # fmt: skip

        return weights

    @staticmethod
    def fuses_channels(channels: int, dtype: torch.dtype) -> bool:
        """Whether :meth:`render` takes ``channels`` gathered values of ``dtype`` (few float32 channels)."""
        return dtype == torch.float32 and channels <= FUSED_RENDER_MAX_CHANNELS

    def render(self, spatial, ic, psi, rho, jd, vals, r2_pix, repeated) -> torch.Tensor:
        """``[B, C, P]`` render of a tile's blocks, weights and products in the kernel
        (``vals [B, K, C]``, the other inputs those of :meth:`bind`)."""
        nb, k = spatial.shape[0], psi.shape[2]
        rep = repeated[:, 0, :] if repeated is not None else torch.zeros(nb, k, dtype=torch.bool)
        return render_weights(
            spatial, psi, rho, ic, jd.transpose(1, 2), r2_pix.to(torch.int32), self.r2_off[:k], rep, vals=vals.transpose(1, 2),
        )  # fmt: skip
