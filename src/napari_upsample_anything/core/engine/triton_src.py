"""Sources of the Triton kernels of :mod:`.triton_kernels` (imported only when one is first needed).

Plain functions, not decorated: :func:`.triton_kernels._kernels` turns them into Triton
kernels with ``triton.jit`` on first use, per interpreter mode (``TRITON_INTERPRET``), so the
mode is read when a kernel is first needed rather than when this module is imported. No
``from __future__ import annotations`` here: Triton reads the ``tl.constexpr`` annotations as
objects.
"""

import triton.language as tl


def to_pair(x, PAIR: tl.constexpr):
    """Round ``x`` to the pair dtype (jitted for the GPU, plain under the interpreter)."""
    return x.to(PAIR)


def to_bfloat16_emulated(x, PAIR: tl.constexpr):
    """``x`` rounded to the nearest bfloat16 (ties to even), kept as float32: the interpreter's
    own bfloat16 conversion truncates and its bfloat16 products multiply raw bits."""
    bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


def fit_kernel(
    phi, coef, d_y, d_x, ic, jd, vals, target, weight, r2_pix, r2_off, rep,
    loss_out, sq_out, grad_out,
    B, P, K, loss_scale,
    G: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, PAIR: tl.constexpr, RND: tl.constexpr,
):  # fmt: skip
    """One block per program: loss, squared error and gradient of (A, B, C, rho) of its K neighbours.

    The quadratic form is evaluated on the pair's own offset ``(ex, ey) = (lx - Dx, ly - Dy)``
    (``A ex^2 + 2 B ex ey + C ey^2``, the same number as the C kernel's expanded
    ``phi . psi``), and the gradient of A, B, C is summed as ``-gl ex^2``, ``-2 gl ex ey``,
    ``-gl ey^2``: three products per pair instead of six plus a chain rule whose terms
    cancel (which cost half precision a 4 % gradient error).
    """
    b = tl.program_id(0).to(tl.int64)  # int64 offsets: B * 6 * P passes 2^31 on large tiles
    ks = tl.arange(0, BLOCK_K)
    km = ks < K
    A = tl.load(coef + b * K + ks, mask=km, other=0.0)
    Bc = tl.load(coef + (B + b) * K + ks, mask=km, other=0.0)
    Cc = tl.load(coef + (2 * B + b) * K + ks, mask=km, other=0.0)
    rho = tl.load(coef + (3 * B + b) * K + ks, mask=km, other=0.0)
    dy = tl.load(d_y + b * K + ks, mask=km, other=0.0)
    dx = tl.load(d_x + b * K + ks, mask=km, other=0.0)
    r2o = tl.load(r2_off + ks, mask=km, other=2147483647)
    repk = tl.load(rep + b * K + ks, mask=km, other=1)
    kept_k = km & (repk == 0)
    acc_a = tl.zeros([BLOCK_K], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_K], dtype=tl.float32)
    acc_c = tl.zeros([BLOCK_K], dtype=tl.float32)
    acc_r = tl.zeros([BLOCK_K], dtype=tl.float32)
    loss_acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    sq_acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for p_start in range(0, P, BLOCK_P):
        ps = p_start + tl.arange(0, BLOCK_P)
        pm = ps < P
        lx = tl.load(phi + (b * 6 + 3) * P + ps, mask=pm, other=0.0)
        ly = tl.load(phi + (b * 6 + 4) * P + ps, mask=pm, other=0.0)
        ex = lx[:, None] - dx[None, :]
        ey = ly[:, None] - dy[None, :]
        dist = tl.zeros([BLOCK_P, BLOCK_K], dtype=tl.float32)
        for g in tl.static_range(G):
            ig = tl.load(ic + (b * G + g) * P + ps, mask=pm, other=0.0)
            jg = tl.load(jd + (b * G + g) * K + ks, mask=km, other=0.0)
            d = ig[:, None] - jg[None, :]
            dist += d * d
        logit = -(A[None, :] * ex * ex + 2.0 * Bc[None, :] * ex * ey + Cc[None, :] * ey * ey) - rho[None, :] * dist
        r2p = tl.load(r2_pix + b * P + ps, mask=pm, other=0)
        keep = (r2o[None, :] <= r2p[:, None]) & kept_k[None, :]
        logit = tl.where(keep, logit, -3.0e38)
        m = tl.max(logit, axis=1)
        e = tl.where(keep, tl.exp(logit - m[:, None]), 0.0)
        inv = 1.0 / tl.sum(e, axis=1)
        w = e * inv[:, None]  # softmax weights, float32
        # Per-pair products in PAIR, sums in float32. RND(x, PAIR) rounds a product to PAIR: a
        # cast on the GPU (the next product is then computed in PAIR); under the interpreter,
        # whose bfloat16 arithmetic is wrong (it multiplies the raw bits and truncates), it rounds
        # to nearest-even bfloat16 but keeps float32 storage: the same numbers, emulated.
        wh = RND(w, PAIR)
        wpix = tl.load(weight + b * P + ps, mask=pm, other=0.0)
        dot = tl.zeros([BLOCK_P, BLOCK_K], dtype=tl.float32)  # sum_g s_g v_g(k): a sum, float32
        shift = tl.zeros([BLOCK_P], dtype=tl.float32)
        for g in tl.static_range(G):
            v = tl.load(vals + (b * G + g) * K + ks, mask=km, other=0.0)
            # The values stay float32: the gradient's signal is v(k) - out(p), a difference
            # of close numbers (rounding v to bfloat16 cost a 44 % gradient error on a random case).
            o = tl.sum(wh.to(tl.float32) * v[None, :], axis=1)
            t = tl.load(target + (b * G + g) * P + ps, mask=pm, other=0.0)
            diff = o - t
            loss_acc += tl.abs(diff) * wpix
            sq_acc += diff * diff * wpix
            sg = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0)) * (wpix * loss_scale)
            dot += sg[:, None] * v[None, :]
            shift += sg * o
        # d loss / d log-weight (times loss_scale)
        gl = RND(wh * RND(dot - shift[:, None], PAIR), PAIR)
        exh = RND(ex, PAIR)
        eyh = RND(ey, PAIR)
        gx = RND(gl * exh, PAIR)
        gy = RND(gl * eyh, PAIR)
        acc_a -= tl.sum(RND(gx * exh, PAIR).to(tl.float32), axis=0)
        acc_b -= 2.0 * tl.sum(RND(gx * eyh, PAIR).to(tl.float32), axis=0)
        acc_c -= tl.sum(RND(gy * eyh, PAIR).to(tl.float32), axis=0)
        acc_r -= tl.sum(RND(RND(dist, PAIR) * gl, PAIR).to(tl.float32), axis=0)
    inv_scale = 1.0 / loss_scale
    tl.store(grad_out + b * K + ks, acc_a * inv_scale, mask=km)
    tl.store(grad_out + (B + b) * K + ks, acc_b * inv_scale, mask=km)
    tl.store(grad_out + (2 * B + b) * K + ks, acc_c * inv_scale, mask=km)
    tl.store(grad_out + (3 * B + b) * K + ks, acc_r * inv_scale, mask=km)
    tl.store(loss_out + b, tl.sum(loss_acc, axis=0))
    tl.store(sq_out + b, tl.sum(sq_acc, axis=0))


def render_kernel(
    phi, psi, rho, ic, jd, q, values, r2_pix, r2_off, rep, out,
    P, K, C,
    G: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, AGG: tl.constexpr,
    IEEE: tl.constexpr, RND: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)  # int64 offsets: B * C * P is 6e9 for a 4096^2 tile at C = 384
    ps = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = ps < P
    ks = tl.arange(0, BLOCK_K)
    km = ks < K
    logit = tl.zeros([BLOCK_P, BLOCK_K], dtype=tl.float32)
    for j in tl.static_range(6):
        fj = tl.load(phi + (b * 6 + j) * P + ps, mask=pm, other=0.0)
        pj = tl.load(psi + (b * 6 + j) * K + ks, mask=km, other=0.0)
        logit += fj[:, None] * pj[None, :]
    dist = tl.zeros([BLOCK_P, BLOCK_K], dtype=tl.float32)
    for g in tl.static_range(G):
        ig = tl.load(ic + (b * G + g) * P + ps, mask=pm, other=0.0)
        jg = tl.load(jd + (b * G + g) * K + ks, mask=km, other=0.0)
        d = ig[:, None] - jg[None, :]
        dist += d * d
    rk = tl.load(rho + b * K + ks, mask=km, other=0.0)
    logit = logit - rk[None, :] * dist
    r2o = tl.load(r2_off + ks, mask=km, other=2147483647)
    repk = tl.load(rep + b * K + ks, mask=km, other=1)
    r2p = tl.load(r2_pix + b * P + ps, mask=pm, other=0)
    keep = (r2o[None, :] <= r2p[:, None]) & (km & (repk == 0))[None, :]
    logit = tl.where(keep, logit, -3.0e38)
    m = tl.max(logit, axis=1)
    e = tl.where(keep, tl.exp(logit - m[:, None]), 0.0)
    w = RND(e * (1.0 / tl.sum(e, axis=1))[:, None], AGG)  # weights x values in AGG, float32 accumulation
    qk = tl.load(q + b * K + ks, mask=km, other=0).to(tl.int64)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        cm = cs < C
        v = tl.load(values + qk[:, None] * C + cs[None, :], mask=km[:, None] & cm[None, :], other=0.0)  # [BK, BC]
        if IEEE:  # float32 (or bfloat16 emulated in float32 under the interpreter): no TF32
            acc = tl.dot(w, RND(v, AGG), input_precision="ieee")
        else:
            acc = tl.dot(w, RND(v, AGG))  # half inputs (tensor cores), float32 accumulation
        dest = out + b * C * P + cs[None, :] * P + ps[:, None]
        tl.store(dest, acc, mask=pm[:, None] & cm[None, :])
