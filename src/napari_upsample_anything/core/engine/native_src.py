"""C source of the native CPU kernels of :mod:`.native` (built with the system compiler on
first use; :func:`.native._library` writes it to a file and compiles it).

Kept apart from the Python wrappers so that each module stays readable. The string is hashed
into the cached library's name: any change here rebuilds the library.
"""

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif
#if defined(_OPENMP)
#include <omp.h>
#endif

/* 2^x for x in [-126, 115] (callers clamp): the kernels' log-weights are in base 2 (their
   coefficients are multiplied by log2(e) once per block), so the reduction is exact: n = rint(x),
   r = x - n in [-1/2, 1/2] (no Cody-Waite split, no multiplication by 1/ln2), 2^r by a degree-5
   polynomial fitted for minimal relative error on [-1/2, 1/2] (7.5e-8 in exact arithmetic, 2.4e-7
   evaluated in float32; tests/test_native_speedpaths.py checks < 5e-7 against float64), and 2^n
   added into the exponent bits. n >= -126 and 2^r >= 2^-1/2 with r >= 0 at n = -126, so the
   result is a normal float. */
static inline float exp2_neg(float x)
{
    const float n = __builtin_rintf(x);
    const float r = x - n;
    float y = 0.001327647129073739f;
    y = y * r + 0.009675541892647743f; y = y * r + 0.05550713092088699f; y = y * r + 0.24022120237350464f;
    y = y * r + 0.6931469440460205f; y = y * r + 1.0000001192092896f;
    union { float f; int32_t i; } u; u.f = y; u.i += (int32_t)n << 23;
    return u.f;
}

/* exp2_neg(x) where keep is all ones, exactly 0 where keep is 0 (a dropped pair): a bitwise AND
   on the integer pipes instead of a multiplication on the FMA pipes. */
static inline float exp2_kept(float x, uint32_t keep)
{
    union { float f; uint32_t i; } u; u.f = exp2_neg(x); u.i &= keep;
    return u.f;
}

#if defined(__AVX512F__)
#include <immintrin.h>
static const float EXP2_TABLE[32] = {
    1.0f, 1.0218971486541166f, 1.0442737824274138f, 1.0671404006768237f, 1.0905077326652577f, 1.1143867425958924f,
    1.1387886347566916f, 1.1637248587775775f, 1.1892071150027210f, 1.2152473599804690f, 1.2418578120734840f,
    1.2690509571917332f, 1.2968395546510096f, 1.3252366431597413f, 1.3542555469368927f, 1.3839098819638320f,
    1.4142135623730951f, 1.4451808069770467f, 1.4768261459394993f, 1.5091644275934228f, 1.5422108254079407f,
    1.5759808451078865f, 1.6104903319492543f, 1.6457554781539650f, 1.6817928305074290f, 1.7186192981224779f,
    1.7562521603732995f, 1.7947090750031072f, 1.8340080864093424f, 1.8741676341102999f, 1.9152065613971474f,
    1.9571441241754002f};
/* The horizontal sums of four vectors at once (256-bit halves, then pairwise): out[i] = sum of v_i. */
static inline void reduce_add4(__m512 v0, __m512 v1, __m512 v2, __m512 v3, float out[4])
{
    const __m256 h0 = _mm256_add_ps(_mm512_castps512_ps256(v0), _mm512_extractf32x8_ps(v0, 1));
    const __m256 h1 = _mm256_add_ps(_mm512_castps512_ps256(v1), _mm512_extractf32x8_ps(v1, 1));
    const __m256 h2 = _mm256_add_ps(_mm512_castps512_ps256(v2), _mm512_extractf32x8_ps(v2, 1));
    const __m256 h3 = _mm256_add_ps(_mm512_castps512_ps256(v3), _mm512_extractf32x8_ps(v3, 1));
    const __m256 g = _mm256_hadd_ps(_mm256_hadd_ps(h0, h1), _mm256_hadd_ps(h2, h3));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(g), _mm256_extractf128_ps(g, 1)));
}
/* 2^x (AVX-512) into e, for lanes whose bit in keep is set, exactly 0 for the others (dropped
   pairs), for finite x (neither -inf nor NaN: the kernels' coefficients and offsets are finite
   and bounded). x = n + j/32 + r with n + j/32 = x rounded to 1/32 (VRNDSCALEPS) and r in
   [-1/64, 1/64]: 2^(j/32) from a 32-entry table (t_lo, t_hi: EXP2_TABLE's halves; VPERMT2PS,
   indexed by the low bits of x + 1.5 * 2^18, which hold round(32 x)), 2^r = 1 + r (c1 + r c2)
   (minimax for relative error on [-1/64, 1/64], 5.3e-8), and 2^n applied by VSCALEFPS: below
   2^-126 it gives 0 (under the kernels' flush-to-zero), above 2^127 inf (the denominator check
   then redoes the pixel), so no clamp is needed. Relative error < 2e-7 evaluated in float32
   (tests/test_native_speedpaths.py). Three multiply-adds instead of the portable exp2_neg's
   five, no clamps, no integer conversion and no exponent-bit arithmetic. A macro: as an inline
   function, GCC reloaded the table in every iteration of the fit kernel's loops (measured 5 %
   slower). */
#define EXP2_AVX512(x, keep, t_lo, t_hi, e) { \
        const __m512 nf_ = _mm512_roundscale_ps(x, (5 << 4) | _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); \
        const __m512i j_ = _mm512_castps_si512(_mm512_add_ps(x, _mm512_set1_ps(393216.0f))); \
        const __m512 r_ = _mm512_sub_ps(x, nf_); \
        const __m512 t_ = _mm512_permutex2var_ps(t_lo, j_, t_hi); \
        const __m512 p_ = _mm512_mul_ps(r_, _mm512_fmadd_ps(r_, _mm512_set1_ps(0.24022676f), _mm512_set1_ps(0.69315733f))); \
        e = _mm512_maskz_scalef_ps(keep, _mm512_fmadd_ps(t_, p_, t_), nf_); }

/* EXP2_AVX512 on n values (all kept), for the error-bound test. Returns 512 (the vector width). */
int exp2_values_vector(int64_t n, const float *x, float *out)
{
    const __m512 t_lo = _mm512_loadu_ps(EXP2_TABLE), t_hi = _mm512_loadu_ps(EXP2_TABLE + 16);
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 lanes = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1u);
        __m512 e;
        EXP2_AVX512(_mm512_maskz_loadu_ps(lanes, x + i), lanes, t_lo, t_hi, e)
        _mm512_mask_storeu_ps(out + i, lanes, e);
    }
    return 512;
}

/* PIXEL_PASS for AVX-512 (separable blocks), with EXP2_AVX512: one pixel's weights and range
   terms for 16 neighbours into e and d, stored to E + k and D + k. lx, i0, i1, i2: the pixel's
   (broadcast); J0 .. J2, P0, RB, RC, RR: the neighbours' (loaded by the caller). */
#define PIXEL_WEIGHTS_AVX512(lx, i0, i1, i2, E, D, e) { \
        const __m512 t0_ = _mm512_sub_ps(i0, J0), t1_ = _mm512_sub_ps(i1, J1), t2_ = _mm512_sub_ps(i2, J2); \
        const __m512 d_ = _mm512_fmadd_ps(t2_, t2_, _mm512_fmadd_ps(t1_, t1_, _mm512_mul_ps(t0_, t0_))); \
        const __m512 x_ = _mm512_fnmadd_ps(RR, d_, _mm512_fmadd_ps(_mm512_fmadd_ps(lx, P0, RB), lx, RC)); \
        EXP2_AVX512(x_, keep, t_lo, t_hi, e) \
        _mm512_store_ps(D + k, d_); _mm512_store_ps(E + k, e); }

/* The fit kernel's separable one-pass forward (PIXEL_PASS) for AVX-512: n = 1 or 2 pixels of one
   row (the same row coefficients row_b, row_c and the same keep mask) per pass, sharing the
   neighbours' loads. lx[u], ii[u][g]: pixel u's lx and guide values; writes its weights and
   range terms to E[u] and D[u] and its denominator and sums to sums[u]. Neighbours below KF are
   all kept: no mask load there (forward 0.96-0.97x). */
static inline void pixel_pass_avx512(int n, int64_t KF, int64_t KQ, const float lx[2], const float ii[2][3], const float *p0,
                                     const float *row_b, const float *row_c, const float *rr, const float *j0,
                                     const float *j1, const float *j2, const uint16_t *keep_bits, const float *v0,
                                     const float *v1, const float *v2, float *E[2], float *D[2], float sums[2][4])
{
    const __m512 t_lo = _mm512_loadu_ps(EXP2_TABLE), t_hi = _mm512_loadu_ps(EXP2_TABLE + 16);
    const __m512 lxa = _mm512_set1_ps(lx[0]);
    const __m512 ia0 = _mm512_set1_ps(ii[0][0]), ia1 = _mm512_set1_ps(ii[0][1]), ia2 = _mm512_set1_ps(ii[0][2]);
    __m512 sa = _mm512_setzero_ps(), aa0 = _mm512_setzero_ps(), aa1 = _mm512_setzero_ps(), aa2 = _mm512_setzero_ps();
    if (n > 1) {
        const __m512 lxb = _mm512_set1_ps(lx[1]);
        const __m512 ib0 = _mm512_set1_ps(ii[1][0]), ib1 = _mm512_set1_ps(ii[1][1]), ib2 = _mm512_set1_ps(ii[1][2]);
        __m512 sb = _mm512_setzero_ps(), ab0 = _mm512_setzero_ps(), ab1 = _mm512_setzero_ps(), ab2 = _mm512_setzero_ps();
#define PAIRS_TWO(KEEP) { \
            const __mmask16 keep = (KEEP); \
            const __m512 J0 = _mm512_load_ps(j0 + k), J1 = _mm512_load_ps(j1 + k), J2 = _mm512_load_ps(j2 + k); \
            const __m512 P0 = _mm512_load_ps(p0 + k), RB = _mm512_load_ps(row_b + k), RC = _mm512_load_ps(row_c + k); \
            const __m512 RR = _mm512_load_ps(rr + k); \
            __m512 ea, eb; \
            PIXEL_WEIGHTS_AVX512(lxa, ia0, ia1, ia2, E[0], D[0], ea) \
            PIXEL_WEIGHTS_AVX512(lxb, ib0, ib1, ib2, E[1], D[1], eb) \
            const __m512 V0 = _mm512_load_ps(v0 + k), V1 = _mm512_load_ps(v1 + k), V2 = _mm512_load_ps(v2 + k); \
            sa = _mm512_add_ps(sa, ea); aa0 = _mm512_fmadd_ps(ea, V0, aa0); aa1 = _mm512_fmadd_ps(ea, V1, aa1); aa2 = _mm512_fmadd_ps(ea, V2, aa2); \
            sb = _mm512_add_ps(sb, eb); ab0 = _mm512_fmadd_ps(eb, V0, ab0); ab1 = _mm512_fmadd_ps(eb, V1, ab1); ab2 = _mm512_fmadd_ps(eb, V2, ab2); }
        int64_t k = 0;
        for (; k < KF; k += 16) PAIRS_TWO(0xFFFF)
        for (; k < KQ; k += 16) PAIRS_TWO((__mmask16)keep_bits[k >> 4])
#undef PAIRS_TWO
        reduce_add4(sb, ab0, ab1, ab2, sums[1]);
    } else {
#define PAIRS_ONE(KEEP) { \
            const __mmask16 keep = (KEEP); \
            const __m512 J0 = _mm512_load_ps(j0 + k), J1 = _mm512_load_ps(j1 + k), J2 = _mm512_load_ps(j2 + k); \
            const __m512 P0 = _mm512_load_ps(p0 + k), RB = _mm512_load_ps(row_b + k), RC = _mm512_load_ps(row_c + k); \
            const __m512 RR = _mm512_load_ps(rr + k); \
            __m512 ea; \
            PIXEL_WEIGHTS_AVX512(lxa, ia0, ia1, ia2, E[0], D[0], ea) \
            sa = _mm512_add_ps(sa, ea); \
            aa0 = _mm512_fmadd_ps(ea, _mm512_load_ps(v0 + k), aa0); \
            aa1 = _mm512_fmadd_ps(ea, _mm512_load_ps(v1 + k), aa1); \
            aa2 = _mm512_fmadd_ps(ea, _mm512_load_ps(v2 + k), aa2); }
        int64_t k = 0;
        for (; k < KF; k += 16) PAIRS_ONE(0xFFFF)
        for (; k < KQ; k += 16) PAIRS_ONE((__mmask16)keep_bits[k >> 4])
#undef PAIRS_ONE
    }
    reduce_add4(sa, aa0, aa1, aa2, sums[0]);
}
#undef PIXEL_WEIGHTS_AVX512
#endif

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
/* 2^(j/8), j = 0 .. 7 (float32) */
static const float EXP2_TABLE8[8] = {1.0f, 1.0905077326652577f, 1.1892071150027210f, 1.2968395546510096f,
                                     1.4142135623730951f, 1.5422108254079407f, 1.6817928305074290f, 1.8340080864093424f};
/* 2^x (AVX2) into e for x clamped to [-126, 115] as exp2_neg (the caller zeroes dropped pairs).
   x = n + j/8 + r with n + j/8 = x rounded to 1/8 by adding and subtracting magic = 1.5 * 2^20 (the
   sum's low mantissa bits hold 2^22 + round(8 x): its low three bits index the table (VPERMPS), and
   shifted down 3 then up 23 they are n in the exponent field, mod 2^9), r in [-1/16, 1/16]:
   2^r = 1 + r (c1 + r (c2 + r c3)) (minimax for relative error, 2.5e-8), 2^n added into the
   exponent bits (normal results: n >= -126 and the mantissa factor >= 2^-1/16 only when n > -126).
   Relative error < 2e-7 in float32 (tests/test_native_speedpaths.py). Four multiply-adds instead
   of exp2_neg's five, no rounding instruction and no conversion. The exponent by two shifts
   rather than a shift and a mask, and magic in one register (EXP2_AVX2_MAGIC): constants that do
   not fit in AVX2's 16 registers are reloaded from the stack in every iteration (17 loads per 8
   pairs before, 14 after; forward 0.93x together with the keep-mask split of pixel_pass_avx2).
   t r is computed beside q, off the dependency chain (forward 0.96x). */
#define EXP2_AVX2(x, table, magic, e) { \
        const __m256 xc_ = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-126.0f)), _mm256_set1_ps(115.0f)); \
        __m256 xs_ = _mm256_add_ps(xc_, magic); \
        __asm__("" : "+x"(xs_));  /* -ffast-math must not fold (xc + m) - m into xc ... */ \
        __m256 nf_ = _mm256_sub_ps(xs_, magic); \
        __asm__("" : "+x"(nf_));  /* ... nor reassociate xc - (xs - m) into (xc - xs) + m, which rounds */ \
        const __m256 r_ = _mm256_sub_ps(xc_, nf_); \
        const __m256i bits_ = _mm256_castps_si256(xs_); \
        const __m256 t_ = _mm256_permutevar8x32_ps(table, bits_); \
        const __m256 q_ = _mm256_fmadd_ps(_mm256_fmadd_ps(r_, _mm256_set1_ps(0.055496220f), _mm256_set1_ps(0.24025762f)), r_, \
                                          _mm256_set1_ps(0.69314724f)); \
        const __m256 y_ = _mm256_fmadd_ps(_mm256_mul_ps(t_, r_), q_, t_);  /* t r beside q: off the chain */ \
        const __m256i n_ = _mm256_slli_epi32(_mm256_srli_epi32(bits_, 3), 23); \
        e = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(y_), n_)); }
/* The magic constant of EXP2_AVX2 (1.5 * 2^20), hidden from the compiler so that it keeps one register
   for both its addition and its subtraction (otherwise it holds 1.5 * 2^20 and -1.5 * 2^20). */
#define EXP2_AVX2_MAGIC(magic) __m256 magic = _mm256_set1_ps(1572864.0f); __asm__("" : "+x"(magic));

/* EXP2_AVX2 on n values (all kept), for the error-bound test. Returns 256 (the vector width). */
int exp2_values_vector(int64_t n, const float *x, float *out)
{
    const __m256 table = _mm256_loadu_ps(EXP2_TABLE8);
    EXP2_AVX2_MAGIC(magic)
    float in[8], res[8];
    for (int64_t i = 0; i < n; i += 8) {
        const int64_t m = n - i < 8 ? n - i : 8;
        memset(in, 0, sizeof(in));
        memcpy(in, x + i, sizeof(float) * m);
        __m256 e;
        EXP2_AVX2(_mm256_loadu_ps(in), table, magic, e)
        _mm256_storeu_ps(res, e);
        memcpy(out + i, res, sizeof(float) * m);
    }
    return 256;
}

/* PIXEL_PASS for AVX2 (separable blocks), with EXP2_AVX2: one pixel's weights and range terms
   into Eq and Dq, its denominator and sums into sums[4]. Written out because GCC's code for the
   pragma loop kept the pixel's broadcast values and two polynomial coefficients on the stack.
   Neighbours below KF are all kept (the mask's all-ones prefix): no mask load nor AND there. */
static inline void pixel_pass_avx2(int64_t KF, int64_t KQ, float lx, float i0, float i1, float i2, const float *p0,
                                   const float *row_b, const float *row_c, const float *rr, const float *j0,
                                   const float *j1, const float *j2, const uint32_t *kq, const float *v0,
                                   const float *v1, const float *v2, float *Eq, float *Dq, float sums[4])
{
    const __m256 table = _mm256_loadu_ps(EXP2_TABLE8);
    EXP2_AVX2_MAGIC(magic)
    const __m256 vlx = _mm256_set1_ps(lx), vi0 = _mm256_set1_ps(i0), vi1 = _mm256_set1_ps(i1), vi2 = _mm256_set1_ps(i2);
    __m256 s = _mm256_setzero_ps(), a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps();
#define AVX2_PAIRS(KEEP) { \
        const __m256 t0 = _mm256_sub_ps(vi0, _mm256_load_ps(j0 + k)); \
        const __m256 t1 = _mm256_sub_ps(vi1, _mm256_load_ps(j1 + k)); \
        const __m256 t2 = _mm256_sub_ps(vi2, _mm256_load_ps(j2 + k)); \
        const __m256 d = _mm256_fmadd_ps(t2, t2, _mm256_fmadd_ps(t1, t1, _mm256_mul_ps(t0, t0))); \
        const __m256 x = _mm256_fnmadd_ps(_mm256_load_ps(rr + k), d, \
                                          _mm256_fmadd_ps(_mm256_fmadd_ps(vlx, _mm256_load_ps(p0 + k), _mm256_load_ps(row_b + k)), \
                                                          vlx, _mm256_load_ps(row_c + k))); \
        __m256 e; \
        EXP2_AVX2(x, table, magic, e) \
        KEEP \
        _mm256_store_ps(Dq + k, d); \
        _mm256_store_ps(Eq + k, e); \
        s = _mm256_add_ps(s, e); \
        a0 = _mm256_fmadd_ps(e, _mm256_load_ps(v0 + k), a0); \
        a1 = _mm256_fmadd_ps(e, _mm256_load_ps(v1 + k), a1); \
        a2 = _mm256_fmadd_ps(e, _mm256_load_ps(v2 + k), a2); }
    int64_t k = 0;
    for (; k < KF; k += 8) AVX2_PAIRS()
    for (; k < KQ; k += 8) AVX2_PAIRS(e = _mm256_and_ps(e, _mm256_load_ps((const float *)kq + k));)
#undef AVX2_PAIRS
    /* the four horizontal sums together */
    const __m256 g = _mm256_hadd_ps(_mm256_hadd_ps(s, a0), _mm256_hadd_ps(a1, a2));
    _mm_storeu_ps(sums, _mm_add_ps(_mm256_castps256_ps128(g), _mm256_extractf128_ps(g, 1)));
}
#endif

/* exp2_neg on n values (after the kernels' clamp to [-126, 115]), for the error-bound test. */
void exp2_values(int64_t n, const float *x, float *out)
{
    #pragma omp simd
    for (int64_t i = 0; i < n; ++i) { const float v = x[i] < -126.0f ? -126.0f : (x[i] > 115.0f ? 115.0f : x[i]); out[i] = exp2_neg(v); }
}

/* The kernels' log-weights are computed in base 2: every coefficient is multiplied by LOG2E when
   a block's inputs are laid out, so that exp(l) = exp2_neg(l log2(e)) costs no multiplication
   and no Cody-Waite split per pair (the gradients stay in natural units: they use the weights
   and the range terms, not the coefficients). */
#define LOG2E 1.44269504088896341f
/* The fit kernel's one-pass softmax holds while a pixel's denominator lies between these (far
   above the K 2^-126 that clamped pairs can add; below 2^115, the upper clamp); outside,
   the pixel is redone with the max-shifted softmax. */
#define FUSED_MIN_DENOMINATOR 1e-25f
#define FUSED_MAX_DENOMINATOR 1e30f

/* The separable spatial term's coefficients for the pixel row ly, per neighbour k: the quadratic
   in lx is (lx p0 + row_b) lx + row_c (fit and render kernels). Recomputed only when ly differs
   from the row they hold (*row_ly, valid once *row_ready). */
static inline void separable_row(int64_t KP, float ly, const float *p1, const float *p2, const float *p3,
                                 const float *p4, const float *p5, float *row_b, float *row_c,
                                 float *row_ly, int *row_ready)
{
    if (*row_ready && ly == *row_ly) return;
    *row_ly = ly;
    *row_ready = 1;
    #pragma omp simd
    for (int64_t k = 0; k < KP; ++k) { row_b[k] = ly * p1[k] + p3[k]; row_c[k] = (ly * p2[k] + p4[k]) * ly + p5[k]; }
}

/* 64-byte aligned scratch of n floats (size rounded up to whole cache lines, as C11 requires). */
static float *falloc(int64_t n) { return (float *)aligned_alloc(64, (size_t)((n + 15) / 16 * 16) * sizeof(float)); }

/* grad_all[c, q[i]] += src[c, i] (c < 4, i < n) in increasing i: torch's index_add_ along dim 1, the
   same float32 sums in the same order, bit for bit (tests/test_native_speedpaths.py), so that the
   gradient does not depend on the thread count. The threads split the destination cells that
   this chunk reaches (its neighbours' range: splitting the whole map instead gave a tile in one
   half of the image to one thread, while the other waited); each walks the whole index list (a
   few hundred KiB per chunk) and adds its own cells only. */
static void scatter_add_ordered(int64_t threads, int64_t n, int64_t N, const int64_t *q, const float *src, float *grad_all)
{
    int64_t q_min = N, q_max = -1;
    for (int64_t i = 0; i < n; ++i) { q_min = q[i] < q_min ? q[i] : q_min; q_max = q[i] > q_max ? q[i] : q_max; }
    const int64_t span = q_max + 1 - q_min;
    if (span <= 0) return;
    #pragma omp parallel num_threads(threads)
    {
#if defined(_OPENMP)
        const int64_t T = omp_get_num_threads(), t = omp_get_thread_num();
#else
        const int64_t T = 1, t = 0;
#endif
        const int64_t lo = q_min + span * t / T, hi = q_min + span * (t + 1) / T;
        for (int64_t i = 0; i < n; ++i) {
            const int64_t d = q[i];
            if (d < lo || d >= hi) continue;
            for (int64_t c = 0; c < 4; ++c) grad_all[c * N + d] += src[c * n + i];
        }
    }
}

/* Keep masks cached per radius within a block (fit_chunk): slot i holds the mask of pixels
   whose squared radius is r2[i]; neighbours k >= kept[i] are all dropped, and k < full[i] all
   kept (both multiples of the round_to given to keep_mask_slot). */
#define MASK_SLOTS 16
struct mask_slots { int32_t r2[MASK_SLOTS]; int64_t kept[MASK_SLOTS], full[MASK_SLOTS]; int n, victim, last; };

/* The slot holding the keep mask of squared radius r2 (kz: MASK_SLOTS x KP uint32, all ones
   where r2_off[k] <= r2 and not repeated[k], else 0; kbits: the same as bits), made if no slot
   holds it. When all slots are taken one is reused, never one of busy[0 .. n_busy - 1] (the
   slots that the other pixels of the current group use). */
static int keep_mask_slot(struct mask_slots *m, int32_t r2, const int *busy, int n_busy, int64_t K, int64_t KP,
                          const int32_t *r2_off, const uint8_t *rep, uint32_t *kz, uint16_t *kbits, int64_t round_to)
{
    if (m->n > 0 && m->r2[m->last] == r2) return m->last;  /* the usual case: the previous pixel's radius */
    for (int i = 0; i < m->n; ++i) if (m->r2[i] == r2) return m->last = i;
    int i = m->n;
    if (i < MASK_SLOTS) {
        m->n += 1;
    } else {
        for (;;) {
            i = m->victim;
            m->victim = (m->victim + 1) % MASK_SLOTS;
            int taken = 0;
            for (int j = 0; j < n_busy; ++j) taken |= busy[j] == i;
            if (!taken) break;
        }
    }
    uint32_t *kq = kz + i * KP;
    uint16_t *bq = kbits + i * (KP / 16);
    memset(kq, 0, sizeof(uint32_t) * KP);
    memset(bq, 0, sizeof(uint16_t) * (KP / 16));
    int64_t last = 0, full = -1;
    for (int64_t k = 0; k < K; ++k) {
        kq[k] = (r2_off[k] <= r2 && !rep[k]) ? 0xFFFFFFFFu : 0u;
        if (!kq[k] && full < 0) full = k;
        if (kq[k]) { last = k + 1; bq[k >> 4] |= (uint16_t)(1u << (k & 15)); }
    }
    m->r2[i] = r2;
    m->kept[i] = (last + round_to - 1) / round_to * round_to;
    m->full[i] = (full < 0 ? K : full) / round_to * round_to;
    m->last = i;
    return i;
}

/* The gradient of neighbours k0 .. k0 + n - 1 of block b in their A, B, C and rho (grad_coef [4, B, K])
   from the sums a_0 .. a_5 (in their six spatial coefficients) and a_r (in rho), indexed from 0:
   the chain rule through the quadratic form (compiled.spatial_coefficients_backward). */
static inline void spatial_chain_rule(int64_t n, int64_t k0, int64_t b, int64_t B, int64_t K, const float *dyb,
                                      const float *dxb, const float *a_0, const float *a_1, const float *a_2,
                                      const float *a_3, const float *a_4, const float *a_5, const float *a_r,
                                      float *grad_coef)
{
    for (int64_t j = 0; j < n; ++j) {
        const int64_t k = k0 + j;
        const float dy = dyb[k], dx = dxb[k];
        grad_coef[b * K + k] = -a_0[j] + 2.0f * a_3[j] * dx - a_5[j] * dx * dx;
        grad_coef[(B + b) * K + k] = -2.0f * a_1[j] + 2.0f * a_3[j] * dy + 2.0f * a_4[j] * dx - 2.0f * a_5[j] * dx * dy;
        grad_coef[(2 * B + b) * K + k] = -a_2[j] + 2.0f * a_4[j] * dy - a_5[j] * dy * dy;
        grad_coef[(3 * B + b) * K + k] = a_r[j];
    }
}
/* One vector register of floats (GCC / clang vector extensions; arithmetic with a scalar operand
   broadcasts it): 16 lanes with AVX-512, 8 otherwise. gradient_rows takes GRADIENT_VECTORS of them
   per pass: 2 with AVX-512's 32 registers, 1 with AVX2's 16 (2 measured the same there; 16-float
   values, two AVX2 registers each, spilled the sums to the stack: 1.9x slower). */
#if defined(__AVX512F__)
#define VECTOR_LANES 16
#define GRADIENT_VECTORS 2
#else
#define VECTOR_LANES 8
#define GRADIENT_VECTORS 1
#endif
typedef float vecf __attribute__((vector_size(4 * VECTOR_LANES), aligned(4 * VECTOR_LANES)));

/* The gradient pass of a separable block, GRADIENT_VECTORS x VECTOR_LANES neighbours at a time over all
   pixel rows: per row the sums S0 = sum gl, S1 = sum lx gl, S2 = sum lx^2 gl with
   gl = e (c0 v0 + c1 v1 + c2 v2 - cc) (registers), folded into the six spatial sums when the row
   ends (a_0 += S2, a_1 += ly S1, a_2 += ly^2 S0, a_3 += S1, a_4 += ly S0, a_5 += S0: three
   multiply-adds per pair instead of six); a_r -= d gl. The pixels' six factors are loaded once per
   pass. E, D: [NL, KP] weights and range terms (64-byte aligned rows); A0, A1, A2, CC the pixels'
   gradient factors, LX, LX2, LY, LY2 their lx, lx^2, ly, ly^2; KB[p] the pixel's kept prefix (its
   E and D are written below it only: the vectors from there are skipped); row r is slots [row_at[r],
   row_at[r + 1]). Writes the gradient of block b's neighbours to grad_coef. Against the loop it
   replaces (16 neighbours at a time, sums in 16-float arrays under omp simd, which GCC kept on
   the stack in the AVX2 build): 0.80-0.83x with AVX-512, 0.93x of the AVX2 build's step. */
static void gradient_rows(int64_t K, int64_t KP, int64_t kb_max, const float *E, const float *D, const float *A0,
                          const float *A1, const float *A2, const float *CC, const float *LX, const float *LX2,
                          const float *LY, const float *LY2, const int64_t *KB, int64_t n_rows, const int32_t *row_at,
                          const float *v0, const float *v1, const float *v2, int64_t b, int64_t B, const float *dyb,
                          const float *dxb, float *grad_coef)
{
    enum { L = VECTOR_LANES, NS = GRADIENT_VECTORS, W = VECTOR_LANES * GRADIENT_VECTORS };
    for (int64_t k0 = 0; k0 < KP; k0 += W) {
        float a[7][W] __attribute__((aligned(64)));  /* a_0 .. a_5, a_r of these W neighbours */
        memset(a, 0, sizeof(a));
        const int64_t ns = (KP - k0) / L < NS ? (KP - k0) / L : NS;  /* vectors in this pass */
        if (k0 < kb_max) {
            vecf V0[NS], V1[NS], V2[NS], R[NS];
            for (int u = 0; u < NS; ++u) {
                const int64_t k = k0 + L * (u < ns ? u : 0);
                V0[u] = *(const vecf *)(v0 + k); V1[u] = *(const vecf *)(v1 + k); V2[u] = *(const vecf *)(v2 + k);
                R[u] = (vecf){0};
            }
            for (int64_t r = 0; r < n_rows; ++r) {
                vecf S0[NS], S1[NS], S2[NS];
                for (int u = 0; u < NS; ++u) { S0[u] = (vecf){0}; S1[u] = (vecf){0}; S2[u] = (vecf){0}; }
                for (int64_t p = row_at[r]; p < row_at[r + 1]; ++p) {
                    const float c0 = A0[p], c1 = A1[p], c2 = A2[p], cc = CC[p], lx = LX[p], lx2 = LX2[p];
                    for (int u = 0; u < NS; ++u) {
                        if (u >= ns || k0 + L * u >= KB[p]) break;
                        const vecf e = *(const vecf *)(E + p * KP + k0 + L * u), d = *(const vecf *)(D + p * KP + k0 + L * u);
                        const vecf gl = e * (((c0 * V0[u] - cc) + c1 * V1[u]) + c2 * V2[u]);  /* three multiply-adds */
                        S0[u] += gl; S1[u] += lx * gl; S2[u] += lx2 * gl; R[u] -= d * gl;
                    }
                }
                const float ly = LY[row_at[r]], ly2 = LY2[row_at[r]];
                for (int u = 0; u < NS; ++u) {
                    vecf *o = (vecf *)&a[0][L * u];
                    const int64_t row = NS;  /* one row of a, in vectors */
                    o[0] += S2[u]; o[row] += ly * S1[u]; o[2 * row] += ly2 * S0[u];
                    o[3 * row] += S1[u]; o[4 * row] += ly * S0[u]; o[5 * row] += S0[u];
                }
            }
            for (int u = 0; u < NS; ++u) *(vecf *)&a[6][L * u] = R[u];
        }
        const int64_t n = K - k0 < W ? K - k0 : W;
        if (n > 0) spatial_chain_rule(n, k0, b, B, K, dyb, dxb, a[0], a[1], a[2], a[3], a[4], a[5], a[6], grad_coef);
    }
}

/* One fit chunk: see napari_upsample_anything/core/engine/compiled.py::fit_chunk for the formulas.
   coef: the neighbours' (A, B, C, rho) as [4, B, K] when q is NULL; otherwise the whole map
   [4, N] and q [B, K] the neighbours' cells, gathered here (no [4, B, K] copy per step). The
   gradient is written to grad_coef [4, B, K]; with q (and want_grad) it is then also added into
   grad_all [4, N] at the neighbours' cells (scatter_add_ordered).
   *failed is set to 1 when scratch memory could not be allocated (the results are then invalid). */
void fit_chunk(int64_t threads, int64_t B, int64_t P, int64_t K, int64_t G,
               const float *phi, const float *coef, const float *d_y, const float *d_x, const float *ic,
               const float *jd, const float *vals, const float *target, const float *weight,
               const int32_t *r2_pix, const int32_t *r2_off, const uint8_t *repeated,
               double *loss_out, double *sq_out, float *grad_coef, int32_t want_grad, int32_t *failed,
               const int64_t *q, int64_t N, float *grad_all)
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
        /* One allocation, carved into 64-byte aligned arrays (sizes in floats, rounded to 16): E
           [P4, KP] + the row coefficients of the separable spatial term (2 KP), D [P4, KP], pix
           (13 per-pixel float rows, KB (int64, rows 14-15), live (int32), -, target, weight,
           row_at (int32)), jz and vz (3 KP each), pz (7 KP, then 4 KP of gathered coefficients),
           kz (keep masks per radius: all ones or 0) and kbits (the same as bits, 16 per uint16). */
#define ROUND16(n) (((n) + 15) / 16 * 16)
        const int64_t sizes[8] = {ROUND16((P4 + 2) * KP), ROUND16(P4 * KP), ROUND16(23 * P4 + 16), 3 * KP, 3 * KP, 11 * KP,
                                  MASK_SLOTS * KP, ROUND16(MASK_SLOTS * KP / 32 + 1)};
#undef ROUND16
        int64_t total = 0;
        for (int i = 0; i < 8; ++i) total += sizes[i];
        float *arena = falloc(total);
        if (!arena) {
            *failed = 1;
#if defined(__SSE__)
            _mm_setcsr(csr_saved);
#endif
            continue;
        }
        float *E = arena, *D = E + sizes[0], *pix = D + sizes[1], *jz = pix + sizes[2], *vz = jz + sizes[3], *pz = vz + sizes[4];
        uint32_t *kz = (uint32_t *)(pz + sizes[5]);
        uint16_t *kbits = (uint16_t *)(pz + sizes[5] + sizes[6]);
        const float *jb = jd + b * G * K, *vb = vals + b * G * K, *dyb = d_y + b * K, *dxb = d_x + b * K;
        const float *ph = phi + b * 6 * P, *ib = ic + b * G * P, *tb = target + b * G * P, *wb = weight + b * P;
        const uint8_t *rep = repeated + b * K;
        {
            /* The inputs of the block this thread probably takes next (b + threads: the dynamic
               schedule hands blocks out in turn), fetched into the cache while this one runs: a
               block's inputs (17 KB at 14 x 14 pixels) are read once per step, from memory. */
            const int64_t nb = b + threads;
            if (nb < B) {
#define PREFETCH_ROWS(ptr, bytes) for (int64_t o_ = 0; o_ < (int64_t)(bytes); o_ += 64) __builtin_prefetch((const char *)(ptr) + o_, 0, 3);
                PREFETCH_ROWS(phi + nb * 6 * P, sizeof(float) * 6 * P)
                PREFETCH_ROWS(ic + nb * G * P, sizeof(float) * G * P)
                PREFETCH_ROWS(target + nb * G * P, sizeof(float) * G * P)
                PREFETCH_ROWS(weight + nb * P, sizeof(float) * P)
                PREFETCH_ROWS(r2_pix + nb * P, sizeof(int32_t) * P)
                PREFETCH_ROWS(jd + nb * G * K, sizeof(float) * G * K)
                PREFETCH_ROWS(vals + nb * G * K, sizeof(float) * G * K)
                PREFETCH_ROWS(d_y + nb * K, sizeof(float) * K)
                PREFETCH_ROWS(d_x + nb * K, sizeof(float) * K)
                PREFETCH_ROWS(repeated + nb * K, K)
                if (q) PREFETCH_ROWS(q + nb * K, sizeof(int64_t) * K)
#undef PREFETCH_ROWS
            }
        }
        /* Padded, aligned copies of the per-neighbour inputs; padding lanes (and unused channels)
           are 0, and dropped (keep 0). */
        for (int64_t g = 0; g < 3; ++g) {
            const int64_t n = g < G ? K : 0;
            if (n) { memcpy(jz + g * KP, jb + g * K, sizeof(float) * K); memcpy(vz + g * KP, vb + g * K, sizeof(float) * K); }
            memset(jz + g * KP + n, 0, sizeof(float) * (KP - n)); memset(vz + g * KP + n, 0, sizeof(float) * (KP - n));
        }
        /* The neighbours' quadratic forms in the block's local coordinates (compiled.spatial_coefficients)
           from their A, B, C and offsets; rho is the range coefficient. Their coefficients are
           gathered first (cA .. cR), so that the arithmetic runs vectorised. */
        float *cA = pz + 7 * KP, *cB = pz + 8 * KP, *cC = pz + 9 * KP, *cR = pz + 10 * KP;
        if (q) {
            const int64_t *qb = q + b * K;
            for (int64_t k = 0; k < K; ++k) {
                const int64_t c = qb[k];
                cA[k] = coef[c]; cB[k] = coef[N + c]; cC[k] = coef[2 * N + c]; cR[k] = coef[3 * N + c];
            }
        } else {
            memcpy(cA, coef + b * K, sizeof(float) * K); memcpy(cB, coef + (B + b) * K, sizeof(float) * K);
            memcpy(cC, coef + (2 * B + b) * K, sizeof(float) * K); memcpy(cR, coef + (3 * B + b) * K, sizeof(float) * K);
        }
        #pragma omp simd
        for (int64_t k = 0; k < K; ++k) {
            const float A = cA[k], Bc = cB[k], C = cC[k];
            const float dy = dyb[k], dx = dxb[k];
            const float ax = A * dx + Bc * dy, cy = Bc * dx + C * dy;
            pz[k] = -A * LOG2E; pz[KP + k] = -2.0f * Bc * LOG2E; pz[2 * KP + k] = -C * LOG2E;
            pz[3 * KP + k] = 2.0f * ax * LOG2E; pz[4 * KP + k] = 2.0f * cy * LOG2E; pz[5 * KP + k] = -(ax * dx + cy * dy) * LOG2E;
            pz[6 * KP + k] = cR[k] * LOG2E;
        }
        for (int64_t j = 0; j < 7; ++j) memset(pz + j * KP + K, 0, sizeof(float) * (KP - K));
        /* Per-pixel inputs of the block's live pixels only, in slots 0 .. NL - 1 (live[slot] is the
           pixel), padded to groups of 4 slots. A pixel of weight 0 (the padding of blocks at
           non-integer scales: 12 % of a 4096^2 fit's pixels; pixels outside the image) adds
           exactly 0 to the loss and the gradient, so it gets no slot: no pass over its
           neighbours, and the gradient pass runs over live slots without a check per pixel. */
        int32_t *live = (int32_t *)(pix + 16 * P4);
        int64_t NL = 0;
        int all_live = 1;
        #pragma omp simd reduction(&:all_live)
        for (int64_t p = 0; p < P; ++p) all_live &= wb[p] != 0.0f;
        if (all_live) {
            NL = P;
            #pragma omp simd
            for (int64_t p = 0; p < P; ++p) live[p] = (int32_t)p;
        } else {
            for (int64_t p = 0; p < P; ++p) if (wb[p] != 0.0f) live[NL++] = (int32_t)p;
        }
        const int64_t NL4 = (NL + 3) / 4 * 4;
        /* Zeros in the padding slots NL .. P4 - 1 of the targets and weights (the loss runs over
           groups of 4 slots, and padding must add 0) and, as a safeguard, of the features and guide
           values (only live slots read those); and the rows of unused guide channels (their
           neighbours' values are 0 too: range term 0). */
        for (int64_t row = 0; row < 22; ++row) if (row < 9 || row >= 18) memset(pix + row * P4 + NL, 0, sizeof(float) * (P4 - NL));
        for (int64_t g = G < 3 ? G : 3; g < 3; ++g) { memset(pix + (6 + g) * P4, 0, sizeof(float) * P4); memset(pix + (18 + g) * P4, 0, sizeof(float) * P4); }
        float *F0 = pix, *F1 = pix + P4, *F2 = pix + 2 * P4, *F3 = pix + 3 * P4, *F4 = pix + 4 * P4, *F5 = pix + 5 * P4;
        float *I0 = pix + 6 * P4, *I1 = pix + 7 * P4, *I2 = pix + 8 * P4;
        float *A0 = pix + 9 * P4, *A1 = pix + 10 * P4, *A2 = pix + 11 * P4, *CC = pix + 12 * P4;
        /* the live pixels' targets and weights (rows 18-21; zero in padding slots and unused channels) */
        float *T0 = pix + 18 * P4, *T1 = pix + 19 * P4, *T2 = pix + 20 * P4, *W = pix + 21 * P4;
        if (NL == P) {  /* every pixel live: plain copies */
            for (int64_t j = 0; j < 6; ++j) memcpy(pix + j * P4, ph + j * P, sizeof(float) * P);
            for (int64_t g = 0; g < G && g < 3; ++g) memcpy(pix + (6 + g) * P4, ib + g * P, sizeof(float) * P);
            for (int64_t g = 0; g < G && g < 3; ++g) memcpy(pix + (18 + g) * P4, tb + g * P, sizeof(float) * P);
            memcpy(W, wb, sizeof(float) * P);
        } else {
            for (int64_t g = 0; g < G && g < 3; ++g) for (int64_t i = 0; i < NL; ++i) pix[(18 + g) * P4 + i] = tb[g * P + live[i]];
            for (int64_t i = 0; i < NL; ++i) W[i] = wb[live[i]];
            /* vector gathers: the scalar loop was 5 % of a 1024^2 step */
            for (int64_t j = 0; j < 6; ++j) {
                float *restrict dst = pix + j * P4;
                const float *restrict src = ph + j * P;
                #pragma omp simd
                for (int64_t i = 0; i < NL; ++i) dst[i] = src[live[i]];
            }
            for (int64_t g = 0; g < G && g < 3; ++g) {
                float *restrict dst = pix + (6 + g) * P4;
                const float *restrict src = ib + g * P;
                #pragma omp simd
                for (int64_t i = 0; i < NL; ++i) dst[i] = src[live[i]];
            }
        }
        const float *j0 = jz, *j1 = jz + KP, *j2 = jz + 2 * KP;
        const float *v0 = vz, *v1 = vz + KP, *v2 = vz + 2 * KP;
        const float *p0 = pz, *p1 = pz + KP, *p2 = pz + 2 * KP, *p3 = pz + 3 * KP, *p4 = pz + 4 * KP, *p5 = pz + 5 * KP, *rr = pz + 6 * KP;
        /* The fit's pixel features are monomials (lx^2, lx ly, ly^2, lx, ly, 1) (BlockEngine.
           pixel_features, the same float32 products): then phi . psi = (lx p0 + b) lx + c with
           b = ly p1 + p3 and c = (ly p2 + p4) ly + p5 per neighbour, computed once per pixel row
           (ly). Checked per block, bit for bit; any other features take the general form. */
        int separable = 1;
        #pragma omp simd reduction(&:separable)
        for (int64_t p = 0; p < NL; ++p)
            separable &= (F0[p] == F3[p] * F3[p]) & (F1[p] == F3[p] * F4[p]) & (F2[p] == F4[p] * F4[p]) & (F5[p] == 1.0f);
        float *row_b = E + P4 * KP, *row_c = row_b + KP, row_ly = 0.0f;
        int row_ready = 0;
        double loss_b = 0.0, sq_b = 0.0;
        /* A pixel's keep mask depends on its radius only, and a block holds a few radii (at most
           `radius` values), which alternate along its pixel rows: each mask is made once per block,
           in a slot of kz (and kbits), found by its r2 (keep_mask_slot). kept[slot]: neighbours
           k >= kept[slot] (rounded up to whole vectors: kept_round) are all dropped, so the loops stop there: offsets
           are sorted by distance, and a small dynamic radius keeps a short prefix. KB[p]: the
           same for pixel p, for the gradient pass. */
        struct mask_slots masks = {.n = 0, .victim = 0, .last = 0};
        /* kept prefixes in whole vectors of the passes that read them: 16 neighbours (the AVX-512
           pass, the portable gradient), 8 for separable blocks in AVX2 builds (pixel_pass_avx2 and
           gradient_rows: 0.96x of the step at 448^2 against 16) */
#if defined(__AVX512F__) || !defined(__AVX2__) || !defined(__FMA__)
        const int64_t kept_round = 16;
#else
        const int64_t kept_round = separable ? 8 : 16;
#endif
        int64_t *KB = (int64_t *)(pix + 14 * P4);
        for (int64_t p = 0; p < NL4; p += 4) {
            int slot[4];
            for (int q = 0; q < 4; ++q)
                slot[q] = keep_mask_slot(&masks, r2_pix[b * P + live[p + q < NL ? p + q : NL - 1]], slot, q, K, KP, r2_off, rep, kz, kbits, kept_round);
            float s_[4], o_[4][3];
/* One pass per group: log-weight, its exp, the denominator and the aggregation, with no
   maximum subtracted (the fit's log-weights are a Gaussian's exponents, <= 0 up to rounding).
   Base-2 arguments are clamped to [-126, 115]: kept pairs below come out as 2^-126 = 1.2e-38,
   dropped pairs as exactly 0 (their keep mask is 0), nothing overflows. The result is the
   softmax's to float32 rounding while the denominator s lies in [FUSED_MIN_DENOMINATOR,
   FUSED_MAX_DENOMINATOR]: then no kept pair reached the upper clamp (2^115 >
   FUSED_MAX_DENOMINATOR) and the pairs under the lower one add < K 2^-126 / s ~ 3e-11 relative. Otherwise (tiny sigmas, or
   inputs that are no Gaussian: tests) the pixel is redone with the max-shifted softmax.
   Saves the second pass over stored log-weights. */
#define PIXEL_PASS(SPATIAL) { \
                _Pragma("omp simd reduction(+:s, a0, a1, a2)") \
                for (int64_t k = 0; k < KQ; ++k) { \
                    const float t0 = i0 - j0[k], t1 = i1 - j1[k], t2 = i2 - j2[k]; \
                    const float d = t0 * t0 + t1 * t1 + t2 * t2; \
                    float x = (SPATIAL) - rr[k] * d; \
                    x = x < -126.0f ? -126.0f : (x > 115.0f ? 115.0f : x); \
                    const float e = exp2_kept(x, kq[k]); \
                    Dq[k] = d; Eq[k] = e; s += e; a0 += e * v0[k]; a1 += e * v1[k]; a2 += e * v2[k]; } }
            /* Portable path: one pixel per loop (with four sharing the neighbours' loads, the sixteen
               sums and the pixels' 36 broadcast features spilled registers; measured (same-process
               A/B, 448^2, 1 thread) one pixel 0.86x the two-pass kernel's time, two pixels 0.89x,
               four 0.93x; docs/engine.md). AVX-512 (separable blocks): two pixels per pass when
               they share a row and a keep mask (0.97x one pixel's time; intrinsics keep the sums
               in registers). */
            for (int q = 0; q < 4; ++q) {
                const int64_t pq = p + q;
#if defined(__AVX512F__)
                if (separable && pq < NL) {
                    const int n = (q & 1) == 0 && pq + 1 < NL && slot[q + 1] == slot[q] && F4[pq + 1] == F4[pq] ? 2 : 1;
                    const int64_t KQ = masks.kept[slot[q]];
                    separable_row(KP, F4[pq], p1, p2, p3, p4, p5, row_b, row_c, &row_ly, &row_ready);
                    const float lx[2] = {F3[pq], F3[pq + n - 1]};
                    const float ii[2][3] = {{I0[pq], I1[pq], I2[pq]}, {I0[pq + n - 1], I1[pq + n - 1], I2[pq + n - 1]}};
                    float *Eu[2] = {E + pq * KP, E + (pq + n - 1) * KP}, *Du[2] = {D + pq * KP, D + (pq + n - 1) * KP};
                    float sums[2][4];
                    pixel_pass_avx512(n, masks.full[slot[q]], KQ, lx, ii, p0, row_b, row_c, rr, j0, j1, j2, kbits + slot[q] * (KP / 16), v0, v1, v2,
                                      Eu, Du, sums);
                    for (int u = 0; u < n; ++u) {
                        KB[pq + u] = KQ;
                        s_[q + u] = sums[u][0]; o_[q + u][0] = sums[u][1]; o_[q + u][1] = sums[u][2]; o_[q + u][2] = sums[u][3];
                    }
                    q += n - 1;
                    continue;
                }
#endif
                if (pq >= NL) {  /* a padding slot */
                    KB[pq] = 0;
                    s_[q] = 1.0f; o_[q][0] = 0.0f; o_[q][1] = 0.0f; o_[q][2] = 0.0f;
                    continue;
                }
                const uint32_t *kq = kz + slot[q] * KP;
                const int64_t KQ = masks.kept[slot[q]];
                KB[pq] = KQ;
                float *Eq = E + pq * KP, *Dq = D + pq * KP;
                const float i0 = I0[pq], i1 = I1[pq], i2 = I2[pq];
                float s = 0.0f, a0 = 0.0f, a1 = 0.0f, a2 = 0.0f;
                if (separable) {
                    /* The spatial term as a quadratic in lx with the row's coefficients (ly):
                       two FMAs per pair instead of six. */
                    const float lx = F3[pq], ly = F4[pq];
                    separable_row(KP, ly, p1, p2, p3, p4, p5, row_b, row_c, &row_ly, &row_ready);
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
                    float sums[4];
                    pixel_pass_avx2(masks.full[slot[q]], KQ, lx, i0, i1, i2, p0, row_b, row_c, rr, j0, j1, j2, kq, v0, v1, v2, Eq, Dq, sums);
                    s = sums[0]; a0 = sums[1]; a1 = sums[2]; a2 = sums[3];
#else
                    PIXEL_PASS((lx * p0[k] + row_b[k]) * lx + row_c[k])
#endif
                } else {
                    const float f0 = F0[pq], f1 = F1[pq], f2 = F2[pq], f3 = F3[pq], f4 = F4[pq], f5 = F5[pq];
                    PIXEL_PASS(f0 * p0[k] + f1 * p1[k] + f2 * p2[k] + f3 * p3[k] + f4 * p4[k] + f5 * p5[k])
                }
                s_[q] = s; o_[q][0] = a0; o_[q][1] = a1; o_[q][2] = a2;
            }
#undef PIXEL_PASS
            for (int q = 0; q < 4; ++q) {
                const int64_t pq = p + q;
                if (!(s_[q] >= FUSED_MIN_DENOMINATOR && s_[q] <= FUSED_MAX_DENOMINATOR)) {
                    /* Rare: the max-shifted softmax for this pixel, from its stored range terms. */
                    float *e_row = E + pq * KP;
                    const float *d_row = D + pq * KP;
                    const uint32_t *kq = kz + slot[q] * KP;
                    const float f0 = F0[pq], f1 = F1[pq], f2 = F2[pq], f3 = F3[pq], f4 = F4[pq], f5 = F5[pq];
                    float m = -3.0e38f;
                    #pragma omp simd reduction(max:m)
                    for (int64_t k = 0; k < KB[pq]; ++k) {
                        const float l = f0 * p0[k] + f1 * p1[k] + f2 * p2[k] + f3 * p3[k] + f4 * p4[k] + f5 * p5[k] - rr[k] * d_row[k];
                        const float lm = kq[k] ? l : -3.0e38f;
                        e_row[k] = lm;
                        m = lm > m ? lm : m;
                    }
                    float s = 0.0f, a0 = 0.0f, a1 = 0.0f, a2 = 0.0f;
                    #pragma omp simd reduction(+:s, a0, a1, a2)
                    for (int64_t k = 0; k < KB[pq]; ++k) {
                        float x = e_row[k] - m;
                        x = x < -126.0f ? -126.0f : x;
                        const float e = exp2_kept(x, kq[k]);
                        e_row[k] = e;
                        s += e; a0 += e * v0[k]; a1 += e * v1[k]; a2 += e * v2[k];
                    }
                    s_[q] = s; o_[q][0] = a0; o_[q][1] = a1; o_[q][2] = a2;
                }
                /* the denominator and the sums, for the loss below */
                CC[pq] = s_[q]; A0[pq] = o_[q][0]; A1[pq] = o_[q][1]; A2[pq] = o_[q][2];
            }
        }
        /* The loss and each pixel's four gradient factors, vectorised over the slots (it was a
           scalar tail after every pixel's pass): o = sums / s, the L1 loss and squared error in
           double, sg = sign(o - target) w, A_g = sg_g / s, CC = (sg . o) / s. Padding slots and
           unused channels have weight, sums and target 0, so they add 0. */
        #pragma omp simd reduction(+:loss_b, sq_b)
        for (int64_t i = 0; i < NL4; ++i) {
            const float inv = 1.0f / CC[i], w = W[i];
            const float o0 = A0[i] * inv, o1 = A1[i] * inv, o2 = A2[i] * inv;
            const float d0 = o0 - T0[i], d1 = o1 - T1[i], d2 = o2 - T2[i];
            loss_b += (double)(fabsf(d0) * w) + (double)(fabsf(d1) * w) + (double)(fabsf(d2) * w);
            sq_b += (double)(d0 * d0 * w) + (double)(d1 * d1 * w) + (double)(d2 * d2 * w);
            const float g0 = (d0 > 0.0f ? 1.0f : (d0 < 0.0f ? -1.0f : 0.0f)) * w;
            const float g1 = (d1 > 0.0f ? 1.0f : (d1 < 0.0f ? -1.0f : 0.0f)) * w;
            const float g2 = (d2 > 0.0f ? 1.0f : (d2 < 0.0f ? -1.0f : 0.0f)) * w;
            A0[i] = g0 * inv; A1[i] = g1 * inv; A2[i] = g2 * inv; CC[i] = (g0 * o0 + g1 * o1 + g2 * o2) * inv;
        }
        /* Gradients, register-blocked: 16 neighbours at a time, summed over all pixels
           (skipped for a loss-only evaluation: the final loss, or the benchmark's forward). */
        /* Pixels' kept prefixes: neighbour groups below kb_min take the plain loop, those from
           kb_max on have weight 0 everywhere (their E and D were not written: skipped), those
           between check each pixel (a check in every group measured 5 % slower at full radius). */
        /* (Looping over a list of the live pixels' indices here instead of compacted slots made
           GCC keep the sixteen-lane sums in memory: 9x slower.) */
        int64_t kb_min = KP, kb_max = 0;
        for (int64_t p = 0; p < NL; ++p) { kb_min = KB[p] < kb_min ? KB[p] : kb_min; kb_max = KB[p] > kb_max ? KB[p] : kb_max; }
#define GRADIENT_PIXEL(p) { \
                const float f0 = F0[p], f1 = F1[p], f2 = F2[p], f3 = F3[p], f4 = F4[p], f5 = F5[p]; \
                const float c0 = A0[p], c1 = A1[p], c2 = A2[p], cc = CC[p]; \
                const float *e = E + (p) * KP + k0, *d = D + (p) * KP + k0; \
                _Pragma("omp simd aligned(e, d: 64)") \
                for (int j = 0; j < 16; ++j) { \
                    const float gl = e[j] * (c0 * v0[k0 + j] + c1 * v1[k0 + j] + c2 * v2[k0 + j] - cc); \
                    a_0[j] += f0 * gl; a_1[j] += f1 * gl; a_2[j] += f2 * gl; \
                    a_3[j] += f3 * gl; a_4[j] += f4 * gl; a_5[j] += f5 * gl; \
                    a_r[j] -= d[j] * gl; } }
        /* the pixel rows (runs of one ly) of a separable block: row r is [row_at[r], row_at[r + 1]) */
        int64_t n_rows = 0;
        int32_t *row_at = (int32_t *)(pix + 22 * P4);  /* up to NL + 1 entries */
        if (separable) {
            for (int64_t p = 0; p < NL; ++p)
                if (p == 0 || F4[p] != F4[p - 1]) row_at[n_rows++] = (int32_t)p;
            row_at[n_rows] = (int32_t)NL;
        }
        /* monomial features: per pixel row, three multiply-adds per pair (gradient_rows) */
        if (separable && want_grad)
            gradient_rows(K, KP, kb_max, E, D, A0, A1, A2, CC, F3, F0, F4, F2, KB, n_rows, row_at, v0, v1, v2, b, B, dyb, dxb, grad_coef);
        for (int64_t k0 = 0; want_grad && !separable && k0 < KP; k0 += 16) {
            float a_0[16], a_1[16], a_2[16], a_3[16], a_4[16], a_5[16], a_r[16];
            #pragma omp simd
            for (int j = 0; j < 16; ++j) { a_0[j] = 0.0f; a_1[j] = 0.0f; a_2[j] = 0.0f; a_3[j] = 0.0f; a_4[j] = 0.0f; a_5[j] = 0.0f; a_r[j] = 0.0f; }
            if (k0 < kb_min) {
                for (int64_t p = 0; p < NL; ++p) GRADIENT_PIXEL(p)
            } else if (k0 < kb_max) {
                for (int64_t p = 0; p < NL; ++p) if (k0 < KB[p]) GRADIENT_PIXEL(p)
            }
            spatial_chain_rule(K - k0 < 16 ? K - k0 : 16, k0, b, B, K, dyb, dxb, a_0, a_1, a_2, a_3, a_4, a_5, a_r, grad_coef);
        }
#undef GRADIENT_PIXEL
        free(arena);
        loss_total += loss_b;
        sq_total += sq_b;
#if defined(__SSE__)
        _mm_setcsr(csr_saved);
#endif
    }
    *loss_out = loss_total;
    *sq_out = sq_total;
    if (q && want_grad && !*failed) scatter_add_ordered(threads, B * K, N, q, grad_coef, grad_all);
}

/* Softmax weights of a render chunk: W[b, p, k] = softmax_k(phi(p) . psi(k) - rho_k ||I(p) - J(k)||^2)
   over the kept pairs (r2_off[k] <= r2_pix[b, p] and not repeated[b, k]; dropped pairs get 0),
   the formulas of attention.render_blocks' eager log-weights and softmax, per pixel row (in L1):
   log-weight, exp and sum in one pass (no maximum subtracted; the fit kernel's fallback to the
   max-shifted softmax when the sum is out of range), then the normalised row. phi [B, 6, P], psi [B, 6, K], rho [B, K], ic [B, G, P], jd [B, G, K] (G <= 3),
   r2_pix [B, P], r2_off [K], repeated [B, K] (uint8), W [B, P, K].
   With vals [B, C, K] (not NULL) the row is aggregated here instead, agg[b, c, p] =
   sum_k W[b, p, k] vals[b, c, k], and W is not written: for a few channels (the HR PCA picture,
   class probabilities) the [B, P, K] weights and a GEMM with C = 3 cost far more than the
   products themselves (docs/benchmarks_engine.md). */
void render_weights(int64_t threads, int64_t B, int64_t P, int64_t K, int64_t G,
                    const float *phi, const float *psi, const float *rho, const float *ic, const float *jd,
                    const int32_t *r2_pix, const int32_t *r2_off, const uint8_t *repeated, float *W, int32_t *failed,
                    int64_t C, const float *vals, float *agg)
{
    #pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t b = 0; b < B; ++b) {
#if defined(__SSE__)
        const unsigned int csr_saved = _mm_getcsr();
        _mm_setcsr(csr_saved | 0x8040u);
#endif
        const int64_t KP = (K + 15) / 16 * 16;
        float *pz = falloc(10 * KP), *kz = falloc(KP), *row = falloc(3 * KP);  /* row + the separable row coefficients */
        const int64_t C4 = (C + 3) / 4 * 4;
        float *vz = vals ? falloc(C4 * KP) : NULL;
        if (!pz || !kz || !row || (vals && !vz)) {
            free(pz); free(kz); free(row); free(vz);
            *failed = 1;
#if defined(__SSE__)
            _mm_setcsr(csr_saved);
#endif
            continue;
        }
        memset(pz, 0, sizeof(float) * 10 * KP); memset(kz, 0, sizeof(float) * KP);
        /* base-2 log-weights (exp2_neg) */
        for (int64_t j = 0; j < 6; ++j) for (int64_t k = 0; k < K; ++k) pz[j * KP + k] = psi[(b * 6 + j) * K + k] * LOG2E;
        for (int64_t k = 0; k < K; ++k) pz[6 * KP + k] = rho[b * K + k] * LOG2E;
        for (int64_t g = 0; g < G && g < 3; ++g) memcpy(pz + (7 + g) * KP, jd + (b * G + g) * K, sizeof(float) * K);
        if (vals) {  /* padded copies: the padding lanes have weight 0 and value 0 */
            memset(vz, 0, sizeof(float) * C4 * KP);
            for (int64_t c = 0; c < C; ++c) memcpy(vz + c * KP, vals + (b * C + c) * K, sizeof(float) * K);
        }
        const float *p0 = pz, *p1 = pz + KP, *p2 = pz + 2 * KP, *p3 = pz + 3 * KP, *p4 = pz + 4 * KP, *p5 = pz + 5 * KP;
        const float *rr = pz + 6 * KP, *j0 = pz + 7 * KP, *j1 = pz + 8 * KP, *j2 = pz + 9 * KP;
        const float *ph = phi + b * 6 * P, *ib = ic + b * G * P;
        const uint8_t *rep = repeated + b * K;
        /* As in fit_chunk: the spatial term as a quadratic in lx per pixel row when the pixel
           features are the monomials (checked bit for bit), a one-pass softmax with the
           max-shifted one as the fallback, and loops that stop after the last kept offset. */
        const float *F0 = ph, *F1 = ph + P, *F2 = ph + 2 * P, *F3 = ph + 3 * P, *F4 = ph + 4 * P, *F5 = ph + 5 * P;
        int separable = 1;
        for (int64_t p = 0; p < P && separable; ++p)
            separable = F0[p] == F3[p] * F3[p] && F1[p] == F3[p] * F4[p] && F2[p] == F4[p] * F4[p] && F5[p] == 1.0f;
        float *row_b = row + KP, *row_c = row + 2 * KP, row_ly = 0.0f;
        int row_ready = 0;
        int32_t r2_last = -1;
        int64_t KQ = KP;
        for (int64_t p = 0; p < P; ++p) {
            const int32_t r2 = r2_pix[b * P + p];
            if (r2 != r2_last) {
                int64_t last = 0;
                for (int64_t k = 0; k < K; ++k) {
                    kz[k] = (r2_off[k] <= r2 && !rep[k]) ? 1.0f : 0.0f;
                    if (kz[k] > 0.0f) last = k + 1;
                }
                KQ = (last + 15) / 16 * 16;
                r2_last = r2;
            }
            const float i0 = ib[p], i1 = G > 1 ? ib[P + p] : 0.0f, i2 = G > 2 ? ib[2 * P + p] : 0.0f;
            float s = 0.0f;
#define RENDER_PASS(SPATIAL) { \
            _Pragma("omp simd reduction(+:s)") \
            for (int64_t k = 0; k < KQ; ++k) { \
                const float t0 = i0 - j0[k], t1 = i1 - j1[k], t2 = i2 - j2[k]; \
                float x = (SPATIAL) - rr[k] * (t0 * t0 + t1 * t1 + t2 * t2); \
                x = x < -126.0f ? -126.0f : (x > 115.0f ? 115.0f : x); \
                const float e = exp2_neg(x) * kz[k]; \
                row[k] = e; s += e; } }
            if (separable) {
                const float lx = F3[p], ly = F4[p];
                separable_row(KP, ly, p1, p2, p3, p4, p5, row_b, row_c, &row_ly, &row_ready);
                RENDER_PASS((lx * p0[k] + row_b[k]) * lx + row_c[k])
            } else {
                const float f0 = F0[p], f1 = F1[p], f2 = F2[p], f3 = F3[p], f4 = F4[p], f5 = F5[p];
                RENDER_PASS(f0 * p0[k] + f1 * p1[k] + f2 * p2[k] + f3 * p3[k] + f4 * p4[k] + f5 * p5[k])
            }
#undef RENDER_PASS
            if (!(s >= FUSED_MIN_DENOMINATOR && s <= FUSED_MAX_DENOMINATOR)) {
                /* Rare (tiny sigmas, or no Gaussian): the max-shifted softmax for this pixel. */
                const float f0 = F0[p], f1 = F1[p], f2 = F2[p], f3 = F3[p], f4 = F4[p], f5 = F5[p];
                float m = -3.0e38f;
                #pragma omp simd reduction(max:m)
                for (int64_t k = 0; k < KQ; ++k) {
                    const float t0 = i0 - j0[k], t1 = i1 - j1[k], t2 = i2 - j2[k];
                    const float l = f0 * p0[k] + f1 * p1[k] + f2 * p2[k] + f3 * p3[k] + f4 * p4[k] + f5 * p5[k]
                                  - rr[k] * (t0 * t0 + t1 * t1 + t2 * t2);
                    const float lm = kz[k] > 0.0f ? l : -3.0e38f;
                    row[k] = lm;
                    m = lm > m ? lm : m;
                }
                s = 0.0f;
                #pragma omp simd reduction(+:s)
                for (int64_t k = 0; k < KQ; ++k) {
                    float x = row[k] - m;
                    x = x < -126.0f ? -126.0f : x;
                    const float e = exp2_neg(x) * kz[k];  /* dropped pairs exactly 0, as the eager softmax's -inf */
                    row[k] = e;
                    s += e;
                }
            }
            const float inv = 1.0f / s;
            if (vals) {  /* four channels per pass over the row (the last group reads zero rows past C) */
                for (int64_t c = 0; c < C; c += 4) {
                    const float *v0 = vz + c * KP, *v1 = v0 + KP, *v2 = v1 + KP, *v3 = v2 + KP;
                    float o0 = 0.0f, o1 = 0.0f, o2 = 0.0f, o3 = 0.0f;
                    #pragma omp simd reduction(+:o0, o1, o2, o3)
                    for (int64_t k = 0; k < KQ; ++k) {
                        /* normalised weights first: a convex combination cannot overflow for
                           values near the float32 limit (tests/test_reliability.py) */
                        const float w = row[k] * inv;
                        o0 += w * v0[k]; o1 += w * v1[k]; o2 += w * v2[k]; o3 += w * v3[k];
                    }
                    const float o[4] = {o0, o1, o2, o3};
                    for (int64_t j = 0; j < 4 && c + j < C; ++j) agg[(b * C + c + j) * P + p] = o[j];
                }
                continue;
            }
            float *out = W + (b * P + p) * K;
            const int64_t KW = KQ < K ? KQ : K;
            #pragma omp simd
            for (int64_t k = 0; k < KW; ++k) out[k] = row[k] * inv;
            for (int64_t k = KW; k < K; ++k) out[k] = 0.0f;  /* beyond the last kept offset */
        }
        free(pz); free(kz); free(row); free(vz);
#if defined(__SSE__)
        _mm_setcsr(csr_saved);
#endif
    }
}

/* Squared dynamic radius of every pixel of a tile's blocks (BlockEngine.radius_sq): the LR sigma map
   src [h, w] (float32, already in the radius' units) resized bilinearly to the pixels in float64 and
   rounded once to float32, then r = ceil(alpha * sigma) clamped to [1, radius], out = r * r. Taps
   (interp.linear_taps) of the tile's padded rows iy, wy [ny, 2] and columns ix, wx [nx, 2];
   out [B, P] in block layout (blocks row-major, ny / py rows of nx / px blocks, P = py * px).
   The same operations in the same order as the torch path (interp.resample's einsum contracts
   the row taps first, then the column taps; no fused multiply-adds), hence the same float32
   sigma bit for bit and the same radii (tests/test_native_speedpaths.py); hence fp-contract off. */
#if defined(__clang__)
#define NO_CONTRACT
#else
#define NO_CONTRACT __attribute__((optimize("no-fast-math", "fp-contract=off")))
#endif
NO_CONTRACT void radius_sq_blocks(int64_t threads, int64_t w, const float *src,
                                  int64_t ny, const int64_t *iy, const double *wy, int64_t nx, const int64_t *ix, const double *wx,
                                  int64_t py, int64_t px, float alpha, int32_t radius, int32_t *out)
{
#if defined(__clang__)
    #pragma clang fp contract(off)
#endif
    const int64_t nr = ny / py, nc = nx / px, P = py * px;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t row = 0; row < ny; ++row) {
        const float *s0 = src + iy[2 * row] * w, *s1 = src + iy[2 * row + 1] * w;
        const double a0 = wy[2 * row], a1 = wy[2 * row + 1];
        const int64_t bi = row / py, y = row % py;
        for (int64_t col = 0; col < nx; ++col) {
            const int64_t c0 = ix[2 * col], c1 = ix[2 * col + 1];
            const double t0 = (double)s0[c0] * a0 + (double)s1[c0] * a1;
            const double t1 = (double)s0[c1] * a0 + (double)s1[c1] * a1;
            const float sigma = (float)(t0 * wx[2 * col] + t1 * wx[2 * col + 1]);
            float r = ceilf(alpha * sigma);
            r = r < 1.0f ? 1.0f : (r > (float)radius ? (float)radius : r);
            out[(bi * nc + col / px) * P + y * px + col % px] = (int32_t)(r * r);
        }
    }
    (void)nr;
}

/* float32 bits that are not a finite number (exponent all ones). Tested on the bits: -ffast-math
   lets the compiler assume that isfinite() is always true. */
static inline int not_finite(float x)
{
    union { float f; uint32_t i; } u; u.f = x;
    return (u.i & 0x7F800000u) == 0x7F800000u;
}

/* The fused fit's parameter work between two kernel passes, per LR cell, in double precision
   (rounded once to float32; torch's float32 operations, which it replaces, round at every step):
   with grad (the gradient in A, B, C, rho, [4, N]):
   1. the chain rule back to raw = (log sigma_x, log sigma_y, atanh(theta / pi), log sigma_r)
      (field.kernel_coefficients_backward: no gradient through a sigma clamped at 1e-6);
   2. one Adam step (fit.Adam: m = lerp(m, g, 1 - beta1), v = beta2 v + (1 - beta2) g^2,
      raw -= step_size m / (sqrt(v) / bias2_sqrt + eps), step_size = lr_t / (1 - beta1^t));
   then, with or without grad, the coefficients of raw (field.kernel_coefficients: coef [4, N],
   A, B, C, rho) and the effective sigma max(sigma_x, sigma_y) [N] that the kernels read. Returns
   the number of cells whose raw parameters or sigmas are not finite float32 numbers or whose
   sigma underflowed to 0 (fit._check_parameters). Replaces about forty torch operations per
   step (0.45 ms at 16 x 16 cells, a tenth of a 224^2 fit step at 2 threads). */
int64_t parameter_step(int64_t threads, int64_t N, float *raw, const float *grad, float *m, float *v, double beta1,
                       double beta2, double step_size, double bias2_sqrt, double eps, float *coef, float *sigma_eff)
{
    const double pi = 3.14159265358979323846;
    int64_t bad = 0;
    /* one thread for small maps (a team costs more than their cells; an if() clause on the
       pragma instead made GCC run a scalar copy of the loop, 7x slower) */
    const int64_t team = N >= 16384 ? threads : 1;
    /* One Adam step of raw parameter j of cell i from its gradient gj (float32 in the torch path). */
#define ADAM(j, gj) { \
        const int64_t at = (j) * N + i; \
        const double g_ = (double)(float)(gj); \
        m[at] = (float)((double)m[at] + (1.0 - beta1) * (g_ - (double)m[at])); \
        v[at] = (float)(beta2 * (double)v[at] + (1.0 - beta2) * g_ * g_); \
        raw[at] = (float)((double)raw[at] - step_size * (double)m[at] / (sqrt((double)v[at]) / bias2_sqrt + eps)); }
    /* Vectorised (glibc's vector exp / tanh / sin / cos under -ffast-math) and split between the
       threads: at 292 x 292 cells (4096^2) the scalar loop took 12 ms per step, torch 9 ms. */
    if (grad) {
        #pragma omp parallel for simd schedule(static) num_threads(team)
        for (int64_t i = 0; i < N; ++i) {
            const double sx = exp((double)raw[i]), sy = exp((double)raw[N + i]), sr = exp((double)raw[3 * N + i]);
            const double t = tanh((double)raw[2 * N + i]);
            const double sxc = sx < 1e-6 ? 1e-6 : sx, syc = sy < 1e-6 ? 1e-6 : sy, src = sr < 1e-6 ? 1e-6 : sr;
            const double a = 1.0 / (2.0 * sxc * sxc + 1e-8), b = 1.0 / (2.0 * syc * syc + 1e-8);
            const double rho = 1.0 / (2.0 * src * src + 1e-8);
            const double c = cos(pi * t), s = cos(pi * t - 0.5 * pi);  /* sin: see below */
            const double cc = c * c, ss = s * s, sc = s * c;
            const double gA = grad[i], gB = grad[N + i], gC = grad[2 * N + i], grho = grad[3 * N + i];
            const double g_a = gA * cc + gB * sc + gC * ss;
            const double g_b = gA * ss - gB * sc + gC * cc;
            const double g_theta = 2.0 * sc * (b - a) * (gA - gC) + gB * (a - b) * (cc - ss);
            ADAM(0, sx >= 1e-6 ? g_a * (-4.0 * sxc * a * a) * sx : 0.0)
            ADAM(1, sy >= 1e-6 ? g_b * (-4.0 * syc * b * b) * sy : 0.0)
            ADAM(2, g_theta * (pi * (1.0 - t * t)))
            ADAM(3, sr >= 1e-6 ? grho * (-4.0 * src * rho * rho) * sr : 0.0)
        }
    }
    #pragma omp parallel for simd schedule(static) reduction(+:bad) num_threads(team)
    for (int64_t i = 0; i < N; ++i) {
        const double sx = exp((double)raw[i]), sy = exp((double)raw[N + i]), sr = exp((double)raw[3 * N + i]);
        const double theta = pi * tanh((double)raw[2 * N + i]);
        const float sxf = (float)sx, syf = (float)sy, srf = (float)sr;
        bad += not_finite(raw[i]) | not_finite(raw[N + i]) | not_finite(raw[2 * N + i]) | not_finite(raw[3 * N + i])
               | not_finite(sxf) | not_finite(syf) | not_finite(srf) | (sxf == 0.0f) | (syf == 0.0f) | (srf == 0.0f);
        const double sxc = sx < 1e-6 ? 1e-6 : sx, syc = sy < 1e-6 ? 1e-6 : sy, src = sr < 1e-6 ? 1e-6 : sr;
        const double a = 1.0 / (2.0 * sxc * sxc + 1e-8), b = 1.0 / (2.0 * syc * syc + 1e-8);
        /* sin as a shifted cos: GCC would merge sin and cos of one angle into sincos, which has no
           vector version, and the loop would stay scalar */
        const double c = cos(theta), s = cos(theta - 0.5 * pi);
        coef[i] = (float)(a * c * c + b * s * s);
        coef[N + i] = (float)((a - b) * s * c);
        coef[2 * N + i] = (float)(a * s * s + b * c * c);
        coef[3 * N + i] = (float)(1.0 / (2.0 * src * src + 1e-8));
        sigma_eff[i] = sxf > syf ? sxf : syf;
    }
#undef ADAM
    return bad;
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
