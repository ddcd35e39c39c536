"""Hand-written CPU kernel of the fused fit chunk (:func:`.compiled.fit_chunk`), built with the
system C compiler on first use and called through ctypes.

Why a C kernel next to ``torch.compile``: inductor's CPU code for this chunk runs little
faster than the eager path (docs/benchmarks_engine.md), because it splits the
softmax and the two reductions into six passes and keeps ``[B, P, K]`` intermediates. Here,
with OpenMP over blocks, each block of P pixels x K neighbours (a few hundred KiB, L2-resident)
takes three passes:

1. log-weights and their maximum, four pixels at a time (the neighbours' seven coefficient
   vectors and guide values are loaded once for the four), keeping the range term per pair;
2. per pixel: exp, denominator and aggregation, then the loss and the four per-pixel
   factors of the gradient. ``exp`` is inlined (Cody-Waite reduction, degree-7 polynomial,
   relative error about 1e-7, on arguments clamped to [-80, 0]): calling glibc's vector
   ``expf`` cost a third of the kernel, and the clamp keeps dropped pairs from overflowing;
3. the gradient, summed over the block's pixels sixteen neighbours at a time in registers
   (a small matrix product), instead of updating seven ``[K]`` arrays per pixel.

docs/benchmarks_engine.md has its time per pair and per fit step. Same formulas
as :func:`.compiled.fit_chunk`, but it takes the neighbours' (A, B, C, rho) and offsets instead of
``psi`` and applies the chain rule itself; masked pairs get weight 0 instead of a ``-inf``
log-weight (the centre offset is never masked, so the denominator is at least 1). Tests
compare it with the float64 reference and the other paths.

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
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import List, Optional

import torch

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

/* exp(x) for x in [-87, 0] (callers clamp), inlined so that it vectorises with the calling
   loop: x = n ln2 + r with n the nearest integer to x / ln2 (|r| <= ln2 / 2, ln2 split in two
   parts so that r is exact to float rounding), exp(r) by a degree-5 polynomial fitted for
   minimal relative error on [-ln2/2, ln2/2] (8.3e-8 in exact arithmetic, 1.9e-7 evaluated in
   float32; tests/test_native_speedpaths.py checks < 5e-7 against float64 over [-87, 0]), and
   2^n added into the exponent bits. n >= -126 and exp(r) >= 0.7, so the result is a normal
   float or (at the very bottom) an exponent field of 0, which flush-to-zero reads as 0. */
static inline float exp_neg(float x)
{
    /* rint, not (int)(t - 0.5f): inside the kernel's loops GCC converted the latter with the
       rounding mode (vcvtps2dq) instead of truncation, which put r in [0, ln2) and made the
       polynomial's error 1e-4 near r = ln2 (found by tests/test_native_speedpaths.py). */
    const float n = __builtin_rintf(x * 1.44269504088896341f);
    const int32_t ni = (int32_t)n;
    const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
    float y = 0.0013840248575434089f;
    y = y * r + 0.008375746197998524f; y = y * r + 0.04166821762919426f; y = y * r + 0.16666407883167267f;
    y = y * r + 0.49999991059303284f; y = y * r + 1.0f; y = y * r + 1.0f;
    union { float f; int32_t i; } u; u.f = y; u.i += ni << 23;
    return u.f;
}

/* exp_neg on n values (after the same clamp as the kernels), for the error-bound test. */
void exp_values(int64_t n, const float *x, float *out)
{
    #pragma omp simd
    for (int64_t i = 0; i < n; ++i) { const float v = x[i] < -87.0f ? -87.0f : x[i]; out[i] = exp_neg(v); }
}

/* 64-byte aligned scratch of n floats (size rounded up to whole cache lines, as C11 requires). */
static float *falloc(int64_t n) { return (float *)aligned_alloc(64, (size_t)((n + 15) / 16 * 16) * sizeof(float)); }

/* One fit chunk: see napari_upsample_anything/core/engine/compiled.py::fit_chunk for the formulas.
   *failed is set to 1 when scratch memory could not be allocated (the results are then invalid). */
void fit_chunk(int64_t threads, int64_t B, int64_t P, int64_t K, int64_t G,
               const float *phi, const float *coef, const float *d_y, const float *d_x, const float *ic,
               const float *jd, const float *vals, const float *target, const float *weight,
               const int32_t *r2_pix, const int32_t *r2_off, const uint8_t *repeated,
               double *loss_out, double *sq_out, float *grad_coef, int32_t want_grad, int32_t *failed)
{
    double loss_total = 0.0, sq_total = 0.0;
    #pragma omp parallel for schedule(dynamic, 1) reduction(+:loss_total, sq_total) num_threads(threads)
    for (int64_t b = 0; b < B; ++b) {
#if defined(__SSE__)
        /* Flush-to-zero / denormals-are-zero for this block only, restored below: weights of far
           neighbours underflow to subnormals, which are far slower (docs/engine.md), and they
           are below anything the float32 loss can resolve. */
        const unsigned int csr_saved = _mm_getcsr();
        _mm_setcsr(csr_saved | 0x8040u);
#endif
        const int64_t KP = (K + 15) / 16 * 16;
        const int64_t P4 = (P + 3) / 4 * 4;
        /* Scratch per block on purpose: one per-thread scratch reused across blocks measured
           slower (same layout, no page faults; cause not found; docs/engine.md). In Dask workers,
           whose nanny sets MALLOC_TRIM_THRESHOLD_, these allocations became fresh mmaps
           (page faults, slower): distributed.worker_malloc_defaults unsets it. */
        float *E = falloc(P4 * KP);
        float *D = falloc(P4 * KP);
        float *pix = falloc(14 * P4);
        float *jz = falloc(3 * KP);
        float *vz = falloc(3 * KP);
        float *pz = falloc(7 * KP);
        float *kz = falloc(KP);
        if (!E || !D || !pix || !jz || !vz || !pz || !kz) {
            free(E); free(D); free(pix); free(jz); free(vz); free(pz); free(kz);
            *failed = 1;
#if defined(__SSE__)
            _mm_setcsr(csr_saved);
#endif
            continue;
        }
        /* Padded, aligned copies of the per-neighbour inputs; padding lanes are dropped (keep 0). */
        memset(jz, 0, sizeof(float) * 3 * KP); memset(vz, 0, sizeof(float) * 3 * KP);
        memset(pz, 0, sizeof(float) * 7 * KP); memset(kz, 0, sizeof(float) * KP);
        memset(pix, 0, sizeof(float) * 14 * P4);
        const float *jb = jd + b * G * K, *vb = vals + b * G * K, *dyb = d_y + b * K, *dxb = d_x + b * K;
        const float *ph = phi + b * 6 * P, *ib = ic + b * G * P, *tb = target + b * G * P, *wb = weight + b * P;
        const uint8_t *rep = repeated + b * K;
        for (int64_t g = 0; g < G && g < 3; ++g) { memcpy(jz + g * KP, jb + g * K, sizeof(float) * K); memcpy(vz + g * KP, vb + g * K, sizeof(float) * K); }
        /* The neighbours' quadratic forms in the block's local coordinates (compiled.spatial_coefficients)
           from their A, B, C and offsets; rho is the range coefficient. */
        for (int64_t k = 0; k < K; ++k) {
            const float A = coef[b * K + k], Bc = coef[(B + b) * K + k], C = coef[(2 * B + b) * K + k];
            const float dy = dyb[k], dx = dxb[k];
            const float ax = A * dx + Bc * dy, cy = Bc * dx + C * dy;
            pz[k] = -A; pz[KP + k] = -2.0f * Bc; pz[2 * KP + k] = -C;
            pz[3 * KP + k] = 2.0f * ax; pz[4 * KP + k] = 2.0f * cy; pz[5 * KP + k] = -(ax * dx + cy * dy);
            pz[6 * KP + k] = coef[(3 * B + b) * K + k];
        }
        /* Per-pixel inputs, padded to groups of 4 pixels; padding pixels have weight 0. */
        float *F0 = pix, *F1 = pix + P4, *F2 = pix + 2 * P4, *F3 = pix + 3 * P4, *F4 = pix + 4 * P4, *F5 = pix + 5 * P4;
        float *I0 = pix + 6 * P4, *I1 = pix + 7 * P4, *I2 = pix + 8 * P4;
        float *A0 = pix + 9 * P4, *A1 = pix + 10 * P4, *A2 = pix + 11 * P4, *CC = pix + 12 * P4, *MX = pix + 13 * P4;
        for (int64_t j = 0; j < 6; ++j) memcpy(pix + j * P4, ph + j * P, sizeof(float) * P);
        for (int64_t g = 0; g < G && g < 3; ++g) memcpy(pix + (6 + g) * P4, ib + g * P, sizeof(float) * P);
        const float *j0 = jz, *j1 = jz + KP, *j2 = jz + 2 * KP;
        const float *v0 = vz, *v1 = vz + KP, *v2 = vz + 2 * KP;
        const float *p0 = pz, *p1 = pz + KP, *p2 = pz + 2 * KP, *p3 = pz + 3 * KP, *p4 = pz + 4 * KP, *p5 = pz + 5 * KP, *rr = pz + 6 * KP;
        double loss_b = 0.0, sq_b = 0.0;
        int32_t r2_last = -1;
        for (int64_t p = 0; p < P4; p += 4) {
            /* The keep mask depends on the pixel's radius only: the 4 pixels of a group share it
               when their radii agree (the usual case); otherwise they are masked one by one below. */
            const int32_t r2a = r2_pix[b * P + (p < P ? p : P - 1)];
            int same = 1;
            for (int q = 1; q < 4; ++q) same &= r2_pix[b * P + (p + q < P ? p + q : P - 1)] == r2a;
            if (r2a != r2_last) {
                for (int64_t k = 0; k < K; ++k) kz[k] = (r2_off[k] <= r2a && !rep[k]) ? 1.0f : 0.0f;
                r2_last = r2a;
            }
            float m0 = -3.0e38f, m1 = -3.0e38f, m2 = -3.0e38f, m3 = -3.0e38f;
            float *L0 = E + p * KP, *L1 = L0 + KP, *L2 = L1 + KP, *L3 = L2 + KP;
            float *D0 = D + p * KP, *D1 = D0 + KP, *D2 = D1 + KP, *D3 = D2 + KP;
/* STORE_MASKED: store the masked log-weight (-3e38 for a dropped pair, so that pass 2 needs no
   mask and no upper clamp: every stored value is at most the maximum) when the 4 pixels share
   their mask; otherwise the raw one, masked per pixel below. */
#define PIXEL_LOGIT(q, Lq, Dq, mq, STORE_MASKED) { \
                const float t0 = I0[p + q] - j0[k], t1 = I1[p + q] - j1[k], t2 = I2[p + q] - j2[k]; \
                const float d = t0 * t0 + t1 * t1 + t2 * t2; \
                const float l = F0[p + q] * p0[k] + F1[p + q] * p1[k] + F2[p + q] * p2[k] + F3[p + q] * p3[k] \
                              + F4[p + q] * p4[k] + F5[p + q] * p5[k] - rr[k] * d; \
                const float lm = kz[k] > 0.0f ? l : -3.0e38f; \
                Dq[k] = d; Lq[k] = STORE_MASKED ? lm : l; \
                mq = lm > mq ? lm : mq; }
            if (same) {
                #pragma omp simd reduction(max:m0, m1, m2, m3)
                for (int64_t k = 0; k < KP; ++k) {
                    PIXEL_LOGIT(0, L0, D0, m0, 1) PIXEL_LOGIT(1, L1, D1, m1, 1) PIXEL_LOGIT(2, L2, D2, m2, 1) PIXEL_LOGIT(3, L3, D3, m3, 1)
                }
            } else {
                #pragma omp simd reduction(max:m0, m1, m2, m3)
                for (int64_t k = 0; k < KP; ++k) {
                    PIXEL_LOGIT(0, L0, D0, m0, 0) PIXEL_LOGIT(1, L1, D1, m1, 0) PIXEL_LOGIT(2, L2, D2, m2, 0) PIXEL_LOGIT(3, L3, D3, m3, 0)
                }
            }
            MX[p] = m0; MX[p + 1] = m1; MX[p + 2] = m2; MX[p + 3] = m3;
            for (int q = 0; q < 4; ++q) {
                const int64_t pq = p + q;
                float *logit = E + pq * KP;
                if (!same) {  /* rare: this pixel's own radius */
                    const int32_t r2 = r2_pix[b * P + (pq < P ? pq : P - 1)];
                    for (int64_t k = 0; k < K; ++k) kz[k] = (r2_off[k] <= r2 && !rep[k]) ? 1.0f : 0.0f;
                    r2_last = r2;
                    float mm = -3.0e38f;
                    for (int64_t k = 0; k < KP; ++k) { const float lm = kz[k] > 0.0f ? logit[k] : -3.0e38f; logit[k] = lm; mm = lm > mm ? lm : mm; }
                    MX[pq] = mm;
                }
                const float m = MX[pq];
                float s = 0.0f, o0 = 0.0f, o1 = 0.0f, o2 = 0.0f;
                #pragma omp simd reduction(+:s, o0, o1, o2)
                for (int64_t k = 0; k < KP; ++k) {
                    /* Kept pairs have x <= 0 (m is their maximum); dropped pairs were stored as -3e38
                       and come out as exp(-87) = 1.6e-38, nothing next to the centre's
                       weight >= 1, and can neither overflow nor produce inf * 0. */
                    float x = logit[k] - m;
                    x = x < -87.0f ? -87.0f : x;
                    const float e = exp_neg(x);
                    logit[k] = e;
                    s += e;
                    o0 += e * v0[k];
                    o1 += e * v1[k];
                    o2 += e * v2[k];
                }
                const float inv = 1.0f / s;
                const float w = pq < P ? wb[pq] : 0.0f;
                float o[3] = {o0 * inv, o1 * inv, o2 * inv};
                float sg[3] = {0.0f, 0.0f, 0.0f};
                float shift = 0.0f;
                if (pq < P) {
                    for (int64_t g = 0; g < G && g < 3; ++g) {
                        const float diff = o[g] - tb[g * P + pq];
                        loss_b += (double)(fabsf(diff) * w);
                        sq_b += (double)(diff * diff * w);
                        sg[g] = (diff > 0.0f ? 1.0f : (diff < 0.0f ? -1.0f : 0.0f)) * w;
                        shift += sg[g] * o[g];
                    }
                }
                A0[pq] = sg[0] * inv; A1[pq] = sg[1] * inv; A2[pq] = sg[2] * inv; CC[pq] = shift * inv;
            }
            if (!same) r2_last = -1;
        }
#undef PIXEL_LOGIT
        /* Gradients, register-blocked: 16 neighbours at a time, summed over all pixels
           (skipped for a loss-only evaluation: the final loss, or the benchmark's forward). */
        for (int64_t k0 = 0; want_grad && k0 < KP; k0 += 16) {
            float a_0[16], a_1[16], a_2[16], a_3[16], a_4[16], a_5[16], a_r[16];
            #pragma omp simd
            for (int j = 0; j < 16; ++j) { a_0[j] = 0.0f; a_1[j] = 0.0f; a_2[j] = 0.0f; a_3[j] = 0.0f; a_4[j] = 0.0f; a_5[j] = 0.0f; a_r[j] = 0.0f; }
            for (int64_t p = 0; p < P4; ++p) {
                const float f0 = F0[p], f1 = F1[p], f2 = F2[p], f3 = F3[p], f4 = F4[p], f5 = F5[p];
                const float c0 = A0[p], c1 = A1[p], c2 = A2[p], cc = CC[p];
                const float *e = E + p * KP + k0, *d = D + p * KP + k0;
                #pragma omp simd aligned(e, d: 64)
                for (int j = 0; j < 16; ++j) {
                    const float gl = e[j] * (c0 * v0[k0 + j] + c1 * v1[k0 + j] + c2 * v2[k0 + j] - cc);
                    a_0[j] += f0 * gl; a_1[j] += f1 * gl; a_2[j] += f2 * gl;
                    a_3[j] += f3 * gl; a_4[j] += f4 * gl; a_5[j] += f5 * gl;
                    a_r[j] -= d[j] * gl;
                }
            }
            const int64_t n = K - k0 < 16 ? K - k0 : 16;
            for (int j = 0; j < n; ++j) {
                /* Chain rule through the quadratic form (compiled.spatial_coefficients_backward). */
                const int64_t k = k0 + j;
                const float dy = dyb[k], dx = dxb[k];
                grad_coef[b * K + k] = -a_0[j] + 2.0f * a_3[j] * dx - a_5[j] * dx * dx;
                grad_coef[(B + b) * K + k] = -2.0f * a_1[j] + 2.0f * a_3[j] * dy + 2.0f * a_4[j] * dx - 2.0f * a_5[j] * dx * dy;
                grad_coef[(2 * B + b) * K + k] = -a_2[j] + 2.0f * a_4[j] * dy - a_5[j] * dy * dy;
                grad_coef[(3 * B + b) * K + k] = a_r[j];
            }
        }
        free(E); free(D); free(pix); free(jz); free(vz); free(pz); free(kz);
        loss_total += loss_b;
        sq_total += sq_b;
#if defined(__SSE__)
        _mm_setcsr(csr_saved);
#endif
    }
    *loss_out = loss_total;
    *sq_out = sq_total;
}

/* Softmax weights of a render chunk: W[b, p, k] = softmax_k(phi(p) . psi(k) - rho_k ||I(p) - J(k)||^2)
   over the kept pairs (r2_off[k] <= r2_pix[b, p] and not repeated[b, k]; dropped pairs get 0),
   the formulas of attention.render_blocks' eager log-weights and softmax in one pass per pixel
   row, which stays in L1: log-weights and their maximum, exp and sum, then the normalised
   row. phi [B, 6, P], psi [B, 6, K], rho [B, K], ic [B, G, P], jd [B, G, K] (G <= 3),
   r2_pix [B, P], r2_off [K], repeated [B, K] (uint8), W [B, P, K]. */
void render_weights(int64_t threads, int64_t B, int64_t P, int64_t K, int64_t G,
                    const float *phi, const float *psi, const float *rho, const float *ic, const float *jd,
                    const int32_t *r2_pix, const int32_t *r2_off, const uint8_t *repeated, float *W, int32_t *failed)
{
    #pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t b = 0; b < B; ++b) {
#if defined(__SSE__)
        const unsigned int csr_saved = _mm_getcsr();
        _mm_setcsr(csr_saved | 0x8040u);
#endif
        const int64_t KP = (K + 15) / 16 * 16;
        float *pz = falloc(10 * KP), *kz = falloc(KP), *row = falloc(KP);
        if (!pz || !kz || !row) {
            free(pz); free(kz); free(row);
            *failed = 1;
#if defined(__SSE__)
            _mm_setcsr(csr_saved);
#endif
            continue;
        }
        memset(pz, 0, sizeof(float) * 10 * KP); memset(kz, 0, sizeof(float) * KP);
        for (int64_t j = 0; j < 6; ++j) memcpy(pz + j * KP, psi + (b * 6 + j) * K, sizeof(float) * K);
        memcpy(pz + 6 * KP, rho + b * K, sizeof(float) * K);
        for (int64_t g = 0; g < G && g < 3; ++g) memcpy(pz + (7 + g) * KP, jd + (b * G + g) * K, sizeof(float) * K);
        const float *p0 = pz, *p1 = pz + KP, *p2 = pz + 2 * KP, *p3 = pz + 3 * KP, *p4 = pz + 4 * KP, *p5 = pz + 5 * KP;
        const float *rr = pz + 6 * KP, *j0 = pz + 7 * KP, *j1 = pz + 8 * KP, *j2 = pz + 9 * KP;
        const float *ph = phi + b * 6 * P, *ib = ic + b * G * P;
        const uint8_t *rep = repeated + b * K;
        int32_t r2_last = -1;
        for (int64_t p = 0; p < P; ++p) {
            const int32_t r2 = r2_pix[b * P + p];
            if (r2 != r2_last) {
                for (int64_t k = 0; k < K; ++k) kz[k] = (r2_off[k] <= r2 && !rep[k]) ? 1.0f : 0.0f;
                r2_last = r2;
            }
            const float f0 = ph[p], f1 = ph[P + p], f2 = ph[2 * P + p], f3 = ph[3 * P + p], f4 = ph[4 * P + p], f5 = ph[5 * P + p];
            const float i0 = ib[p], i1 = G > 1 ? ib[P + p] : 0.0f, i2 = G > 2 ? ib[2 * P + p] : 0.0f;
            float m = -3.0e38f;
            #pragma omp simd reduction(max:m)
            for (int64_t k = 0; k < KP; ++k) {
                const float t0 = i0 - j0[k], t1 = i1 - j1[k], t2 = i2 - j2[k];
                const float l = f0 * p0[k] + f1 * p1[k] + f2 * p2[k] + f3 * p3[k] + f4 * p4[k] + f5 * p5[k]
                              - rr[k] * (t0 * t0 + t1 * t1 + t2 * t2);
                const float lm = kz[k] > 0.0f ? l : -3.0e38f;
                row[k] = lm;
                m = lm > m ? lm : m;
            }
            float s = 0.0f;
            #pragma omp simd reduction(+:s)
            for (int64_t k = 0; k < KP; ++k) {
                float x = row[k] - m;
                x = x < -87.0f ? -87.0f : x;
                const float e = exp_neg(x) * kz[k];  /* dropped pairs exactly 0, as the eager softmax's -inf */
                row[k] = e;
                s += e;
            }
            const float inv = 1.0f / s;
            float *out = W + (b * P + p) * K;
            #pragma omp simd
            for (int64_t k = 0; k < K; ++k) out[k] = row[k] * inv;
        }
        free(pz); free(kz); free(row);
#if defined(__SSE__)
        _mm_setcsr(csr_saved);
#endif
    }
}

/* Flush-to-zero / denormals-are-zero in every thread of an OpenMP team of `threads` (on = 1),
   or off again (on = 0). torch's CPU thread pool is this OpenMP runtime's pool (one libgomp in
   the process), and torch.set_flush_denormal only changes the calling thread: without this,
   torch's worker threads computed subnormal softmax weights during our renders (several times
   slower; docs/engine.md). "Off" clears the bits rather than
   restoring a saved state: a worker created during an engine call inherits the caller's FTZ,
   and restoring would keep it on for good. The Python side only calls this when the calling
   thread was not flushing before, i.e. when "off" is the user's state. */
void team_flush_denormals(int64_t threads, int32_t on)
{
#if defined(__SSE__)
    #pragma omp parallel num_threads(threads)
    {
        const unsigned int csr = _mm_getcsr();
        _mm_setcsr(on ? (csr | 0x8040u) : (csr & ~0x8040u));
    }
#else
    (void)threads; (void)on;
#endif
}
"""


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


def compile_flags() -> List[str]:
    """Compiler flags for this CPU.

    ``-march=native`` enables every vector extension the CPU has, but GCC then still *tunes* for
    256-bit vectors on most AVX-512 CPUs (``-mprefer-vector-width=256``, to avoid the clock
    penalty of 512-bit code on older Intel parts). On AVX-512 CPUs the kernel is asked for
    512-bit vectors: half the instructions for the same lanes (measured in
    docs/benchmarks_engine.md). Elsewhere (AVX2, ARM, no /proc/cpuinfo) the compiler's choice stands.
    """
    flags = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC"]
    if "avx512f" in _cpu_flags():
        flags.append("-mprefer-vector-width=512")
    return flags


def vector_width() -> str:
    """The vector width the kernel is built for here: ``"512-bit (AVX-512)"``, ``"256-bit (AVX2)"`` or the compiler's default."""
    cpu = _cpu_flags()
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
    width = vector_width() if "-mprefer-vector-width=512" in flags or "avx512f" not in _cpu_flags() else "256-bit (GCC's tuning)"
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
    for name in ("fit_chunk", "render_weights", "exp_values", "team_flush_denormals"):
        getattr(lib, name).restype = None
    return lib


def plain_build() -> Optional[ctypes.CDLL]:
    """The library built without the CPU-specific tuning flags (only ``-march=native``), to test
    that the tuned build computes the same numbers; None without a compiler."""
    cc = _compiler()
    plain = _flag_choices()[-1]
    path = _build(cc, plain, ["-shared", "-fopenmp"]) if cc else None
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


def exp_values(x: torch.Tensor) -> torch.Tensor:
    """The kernels' inlined ``exp`` on float32 ``x`` (clamped below at -87 as in the kernels; for
    arguments <= 0), to test its error bound."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the native library could not be built (no C compiler?)")
    x = x.contiguous().to(torch.float32)
    out = torch.empty_like(x)
    lib.exp_values(ctypes.c_int64(x.numel()), _ptr(x), _ptr(out))
    return out


def render_weights(phi, psi, rho, ic, jd, r2_pix, r2_off, repeated, out=None) -> torch.Tensor:
    """Softmax weights ``[B, P, K]`` of render blocks through the native kernel (float32, G <= 3).

    ``phi [B, 6, P]`` (the spatial pixel features), ``psi [B, 6, K]``, ``rho [B, K]``,
    ``ic [B, G, P]`` (centred guide), ``jd [B, G, K]``, ``r2_pix [B, P]``, ``r2_off [K]`` and
    ``repeated [B, K]`` as in :func:`.compiled.render_weights`; ``out``: an optional contiguous
    float32 ``[B, P, K]`` buffer to write into. Dropped pairs get weight 0.
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
    if out is None:
        out = torch.empty(B, P, K, dtype=torch.float32)
    failed = ctypes.c_int32(0)
    lib.render_weights(
        ctypes.c_int64(max(1, min(torch.get_num_threads(), B))),
        *[ctypes.c_int64(v) for v in (B, P, K, G)],
        *[_ptr(t) for t in f32],
        _ptr(r2p),
        _ptr(r2o),
        _ptr(rep),
        _ptr(out),
        ctypes.byref(failed),
    )
    if failed.value:
        raise MemoryError(f"the native render kernel could not allocate its scratch memory ({B} blocks x {K} neighbours)")
    return out


def _ptr(t: torch.Tensor):
    return ctypes.c_void_p(t.data_ptr())


def fit_chunk(phi, coef, d_y, d_x, ic, jd, vals, target, weight, r2_pix, r2_off, repeated, want_grad: bool = True, lib=None):
    """:func:`.compiled.fit_chunk` on the CPU through the native kernel (float32, G <= 3), with the
    spatial coefficients and their chain rule done inside the kernel.

    Takes the neighbours' ``coef [4, B, K]`` (A, B, C, rho) and offsets ``d_y, d_x [B, K]``
    instead of ``psi`` and ``rho`` (``psi = compiled.spatial_coefficients(coef, d_y, d_x)``);
    the other inputs are those of :func:`.compiled.fit_chunk`. Returns ``(loss_sum, squared_sum,
    grad_coef [4, B, K])``; with ``want_grad=False`` the kernel skips its gradient pass and
    ``grad_coef`` is zero. ``lib``: another build of the library (tests), default this one.
    """
    lib = lib if lib is not None else _library()
    if lib is None:
        raise RuntimeError("the native fit kernel could not be built (no C compiler?)")
    B, _, P = phi.shape
    K = coef.shape[2]
    G = ic.shape[1]
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
    )
    if failed.value:
        raise MemoryError(
            f"the native fit kernel could not allocate its scratch memory ({B} blocks of {P} pixels x {K} neighbours)"
        )
    return torch.tensor(loss.value), torch.tensor(squared.value), grad_coef


class RenderWeights:
    """Softmax weights of render chunks through the native CPU kernel
    (:func:`render_weights`): the eager path's log-weights, range term, mask and softmax
    (seven passes over ``[chunk, P, K]``) in one pass per pixel; the products stay a GEMM.
    ``engine``: the :class:`.blocks.BlockEngine`; usable where :func:`.backends.native_usable`."""

    def __init__(self, engine):
        self.r2_off = engine.grid.offsets.r2.to(torch.int32)
        self.channels = engine.channels
        self.P = engine.P

    def bind(self, phi, psi, rho, jd, r2_pix, repeated, workspace, chunk: int):
        g, nb, k = self.channels, phi.shape[0], psi.shape[2]
        rep = repeated[:, 0, :] if repeated is not None else torch.zeros(nb, k, dtype=torch.bool)
        spatial = phi[:, :, :6].transpose(1, 2).contiguous()  # [B, 6, P]
        ic = phi[:, :, 7 : 7 + g].transpose(1, 2).contiguous()  # [B, G, P]
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
