"""Hand-written CPU kernel of the fused fit chunk (:func:`.fused.fit_chunk`), built with the
system C compiler on first use and called through ctypes.

Why a C kernel next to ``torch.compile``: inductor's CPU code for this chunk runs at about
9 ns per (pixel, neighbour) pair, little better than the eager path, because it splits the
softmax and the two reductions into six passes and keeps ``[B, P, K]`` intermediates. Here each
pixel row of K neighbours makes three vectorised passes over a few L1-resident arrays (log
weights and max; exp, denominator and aggregation; gradient accumulation into per-block
``[7, K]`` sums), with OpenMP over blocks. Same formulas and inputs as
:func:`.fused.fit_chunk`; masked pairs get weight 0 instead of a ``-inf`` log-weight (the
centre offset is never masked, so the denominator is at least 1). Tests compare it with the
float64 reference and the other paths.

Compiled with ``-O3 -march=native -ffast-math -fopenmp`` (fast-math lets GCC call glibc's
vector ``expf``) but *linked* without ``-ffast-math``: linking with it adds GCC's
``crtfastmath.o``, whose constructor turns on flush-to-zero / denormals-are-zero for the
whole process when the library is loaded, silently changing every other computation of the
user's program (a test checks that subnormals survive loading the kernel). The kernel sets
flush-to-zero itself, per block and per thread, and restores the previous state: without it
the weights of far neighbours underflow to subnormals and a 224^2 fit is 4.5x slower. The library is
cached under the user cache directory, keyed by the source hash, the compiler and this
CPU's model and feature flags (``-march=native`` code from one node of a cluster with a
shared home directory must not be loaded on an older node), written to a temporary name
and renamed when complete.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import torch

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

/* One fit chunk: see napari_upsample_anything/core/fused.py::fit_chunk for the formulas. */
void fit_chunk(int64_t threads, int64_t B, int64_t P, int64_t K, int64_t G,
               const float *phi, const float *psi, const float *rho, const float *ic,
               const float *jd, const float *vals, const float *target, const float *weight,
               const int32_t *r2_pix, const int32_t *r2_off, const uint8_t *repeated,
               double *loss_out, double *sq_out, float *grad_psi, float *grad_rho)
{
    double loss_total = 0.0, sq_total = 0.0;
    #pragma omp parallel for schedule(dynamic, 1) reduction(+:loss_total, sq_total) num_threads(threads)
    for (int64_t b = 0; b < B; ++b) {
#if defined(__SSE__)
        /* Flush-to-zero / denormals-are-zero for this block only, restored below: weights of far
           neighbours underflow to subnormals, which are ~100x slower (measured: a 224^2 fit 4.5x
           slower without this), and they are below anything the float32 loss can resolve. */
        const unsigned int csr_saved = _mm_getcsr();
        _mm_setcsr(csr_saved | 0x8040u);
#endif
        float *logit = (float *)aligned_alloc(64, ((K * 4 + 63) / 64) * 64);
        float *dist = (float *)aligned_alloc(64, ((K * 4 + 63) / 64) * 64);
        float *keep = (float *)aligned_alloc(64, ((K * 4 + 63) / 64) * 64);
        float *zeros = (float *)aligned_alloc(64, ((K * 4 + 63) / 64) * 64);
        memset(zeros, 0, sizeof(float) * K);
        const float *ps = psi + b * 6 * K, *rh = rho + b * K, *jb = jd + b * G * K, *vb = vals + b * G * K;
        const float *ph = phi + b * 6 * P, *ib = ic + b * G * P, *tb = target + b * G * P, *wb = weight + b * P;
        const uint8_t *rep = repeated + b * K;
        float *gp = grad_psi + b * 6 * K, *gr = grad_rho + b * K;
        memset(gp, 0, sizeof(float) * 6 * K);
        memset(gr, 0, sizeof(float) * K);
        /* Guide channels beyond G read zeros (they add nothing to the range term). */
        const float *j0 = jb, *j1 = G > 1 ? jb + K : zeros, *j2 = G > 2 ? jb + 2 * K : zeros;
        const float *p0 = ps, *p1 = ps + K, *p2 = ps + 2 * K, *p3 = ps + 3 * K, *p4 = ps + 4 * K, *p5 = ps + 5 * K;
        double loss_b = 0.0, sq_b = 0.0;
        for (int64_t p = 0; p < P; ++p) {
            const float f0 = ph[p], f1 = ph[P + p], f2 = ph[2 * P + p], f3 = ph[3 * P + p], f4 = ph[4 * P + p], f5 = ph[5 * P + p];
            const float i0 = ib[p], i1 = G > 1 ? ib[P + p] : 0.0f, i2 = G > 2 ? ib[2 * P + p] : 0.0f;
            const int32_t r2 = r2_pix[b * P + p];
            float m = -3.0e38f;
            #pragma omp simd reduction(max:m)
            for (int64_t k = 0; k < K; ++k) {
                const float t0 = i0 - j0[k], t1 = i1 - j1[k], t2 = i2 - j2[k];
                const float d = t0 * t0 + t1 * t1 + t2 * t2;
                const float l = f0 * p0[k] + f1 * p1[k] + f2 * p2[k] + f3 * p3[k] + f4 * p4[k] + f5 * p5[k] - rh[k] * d;
                const float kp = (r2_off[k] <= r2 && !rep[k]) ? 1.0f : 0.0f;
                dist[k] = d;
                logit[k] = l;
                keep[k] = kp;
                const float lm = kp > 0.0f ? l : -3.0e38f;
                m = lm > m ? lm : m;
            }
            float s = 0.0f, o0 = 0.0f, o1 = 0.0f, o2 = 0.0f;
            const float *v0 = vb, *v1 = vb + (G > 1 ? K : 0), *v2 = vb + (G > 2 ? 2 * K : 0);
            #pragma omp simd reduction(+:s, o0, o1, o2)
            for (int64_t k = 0; k < K; ++k) {
                /* Clamped: a vector expf with any argument below about -87 takes glibc's scalar
                   slow path (measured: 1.8x slower fit step on a fitted field); exp(-80) is
                   1.8e-35, nothing next to the centre's weight >= 1. */
                const float x = logit[k] - m;
                const float e = expf(x < -80.0f ? -80.0f : x) * keep[k];
                logit[k] = e;
                s += e;
                o0 += e * v0[k];
                o1 += e * v1[k];
                o2 += e * v2[k];
            }
            const float inv = 1.0f / s;
            const float w = wb[p];
            float o[3] = {o0 * inv, o1 * inv, o2 * inv};
            float sg[3] = {0.0f, 0.0f, 0.0f};
            float shift = 0.0f;
            for (int64_t g = 0; g < G && g < 3; ++g) {
                const float diff = o[g] - tb[g * P + p];
                loss_b += (double)(fabsf(diff) * w);
                sq_b += (double)(diff * diff * w);
                sg[g] = (diff > 0.0f ? 1.0f : (diff < 0.0f ? -1.0f : 0.0f)) * w;
                shift += sg[g] * o[g];
            }
            if (w == 0.0f) continue;
            const float a0 = sg[0] * inv, a1 = sg[1] * inv, a2 = sg[2] * inv, c = shift * inv;
            #pragma omp simd
            for (int64_t k = 0; k < K; ++k) {
                const float gl = logit[k] * (a0 * v0[k] + a1 * v1[k] + a2 * v2[k] - c);
                gp[k] += f0 * gl;
                gp[K + k] += f1 * gl;
                gp[2 * K + k] += f2 * gl;
                gp[3 * K + k] += f3 * gl;
                gp[4 * K + k] += f4 * gl;
                gp[5 * K + k] += f5 * gl;
                gr[k] -= dist[k] * gl;
            }
        }
        loss_total += loss_b;
        sq_total += sq_b;
        free(logit); free(dist); free(keep); free(zeros);
#if defined(__SSE__)
        _mm_setcsr(csr_saved);
#endif
    }
    *loss_out = loss_total;
    *sq_out = sq_total;
}
"""


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CC", ""), "gcc", "cc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))][:2]
        return platform.machine() + "".join(lines)
    except OSError:
        return platform.machine() + platform.processor()


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "napari-upsample-anything" / "native"


@functools.cache
def _library() -> Optional[ctypes.CDLL]:
    """Build (once) and load the kernel library, or None when no compiler can build it."""
    if os.environ.get("UPSAMPLE_ANYTHING_NO_COMPILE"):
        return None
    cc = _compiler()
    if cc is None:
        return None
    compile_flags = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC"]
    link_flags = ["-shared", "-fopenmp"]  # no -ffast-math here: see the module docstring
    # -march=native: the library is only valid on this kind of CPU, so the CPU is in the key
    # (a home directory shared between machines must not hand one CPU's build to another).
    identity = _SOURCE + cc + " ".join(compile_flags + link_flags) + _cpu_signature()
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
                subprocess.run([cc, *compile_flags, "-c", str(src), "-o", str(obj)], check=True, capture_output=True, timeout=300)
                subprocess.run(
                    [cc, *link_flags, str(obj), "-o", str(tmp_lib), "-lm"], check=True, capture_output=True, timeout=300
                )
                os.replace(tmp_lib, lib_path)  # complete file appears atomically
        except (OSError, subprocess.SubprocessError):
            return None
    try:
        lib = ctypes.CDLL(str(lib_path))
    except OSError:
        return None
    lib.fit_chunk.restype = None
    return lib


def available() -> bool:
    """Whether the native CPU kernel can be built and loaded here."""
    return _library() is not None


def _ptr(t: torch.Tensor):
    return ctypes.c_void_p(t.data_ptr())


def fit_chunk(phi, psi, rho, ic, jd, vals, target, weight, r2_pix, r2_off, repeated):
    """:func:`.fused.fit_chunk` on the CPU through the native kernel (float32, G <= 3)."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the native fit kernel could not be built (no C compiler?)")
    B, _, P = phi.shape
    K = psi.shape[2]
    G = ic.shape[1]
    if G > 3:
        raise ValueError(f"the native fit kernel handles at most 3 guide channels, got {G}")
    f32 = [t.contiguous().to(torch.float32) for t in (phi, psi, rho, ic, jd, vals, target, weight)]
    r2p = r2_pix.contiguous().to(torch.int32)
    r2o = r2_off.contiguous().to(torch.int32)
    rep = repeated.contiguous().to(torch.uint8)
    grad_psi = torch.empty(B, 6, K, dtype=torch.float32)
    grad_rho = torch.empty(B, K, dtype=torch.float32)
    loss = ctypes.c_double()
    squared = ctypes.c_double()
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
        _ptr(grad_psi),
        _ptr(grad_rho),
    )
    return torch.tensor(loss.value), torch.tensor(squared.value), grad_psi, grad_rho
