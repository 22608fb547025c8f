"""The ``cpu`` backend's depthwise 2-d kernels: forward, grad_input and grad_weight, NCHW and NHWC
(see ``cpu.py`` for the method)."""

from __future__ import annotations

import numpy as np

from ._cpu_common import (
    _FM,
    _FM_SUM,
    BORDER_TAPS,
    JT,
    PLANE_TASKS,
    PT,
    RT,
    VEC_BYTES,
    _activate,
    _span,
    _u,
    njit,
    prange,
)
from ._cpu_ir import _dot_run, _dw_rows, _dw_tile, _dw_tile_s, _dw_tile_s1, _transpose_tile

# ----------------------------------------------------------------------------- row kernels
# Inner loops index with ``_u(...)`` (an unsigned cast): Numba wraps negative signed indices, and
# that select on a computed index stops LLVM from vectorizing; the spans guarantee the index is
# valid. Leading indices are loop-invariant, so their wrap test is hoisted.


@njit(cache=True)
def _nhwc_taps(xoffs, woffs, n, i, j, H, W, C, CO, KH, KW, sh, sw, dh, dw, pt, pl, check_cols):
    """Fill xoffs[:T] / woffs[:T] with the flat x offset ((n, r, col) * C) and the flat filter
    offset ((a, b) * CO) of each tap of output (row i, column j) whose input row is inside the
    image (and, with check_cols, whose column is too); returns T. With j = 0 and no column
    check the x offsets are relative to the tile's first pixel (add j*sw*C for pixel j)."""
    T = 0
    for a in range(KH):
        r = i * sh - pt + a * dh
        if r < 0 or r >= H:
            continue
        for bb in range(KW):
            col = j * sw - pl + bb * dw
            if check_cols and (col < 0 or col >= W):
                continue
            xoffs[T] = ((n * H + r) * W + col) * C
            woffs[T] = (a * KW + bb) * CO
            T += 1
    return T


@njit(cache=True, fastmath=_FM)
def _dw_row_nhwc(x, wt, wrep, b, n, i, dst, d, M, sh, sw, dh, dw, pt, pl, has_bias, act):
    """dst[d, j, o] = act(b[o] + sum_{a,b} wt[a,b,o] x[n, i*sh-pt+a*dh, j*sw-pl+b*dw, o//M]), NHWC.

    x:        (N, H, W, C) input
    wt:       (KH, KW, C*M) filters, channel last
    wrep:     (KH, KW, JB*C) each tap's filters repeated for JB pixels, or a (1, 1, 1) stand-in
              when the flat path does not apply (M > 1 or sw > 1)
    b:        (C*M,) bias (read only if has_bias)
    n, i:     image, output row
    dst, d:   (rows, OW, C*M) destination and its row
    M, sh, sw, dh, dw, pt, pl, act: as in _dw_forward_nchw
    With M == 1 and C a multiple of two vectors: interior pixels (all taps inside the input) in
    register tiles of PT pixels (_dw_tile_s, any stride and dilation; on rows with fewer than PT
    interior pixels, _dw_tile when the flat path applies), and for kernels of at most
    BORDER_TAPS taps the border pixels as 1-pixel tiles (_dw_tile_s1). Remaining pixels: per tap,
    a flat multiply-add over JB pixels x C channels (a tap's valid columns are one contiguous
    run of pixels in both x and dst) on the flat path, else one multiply-add along C per valid
    output column.
    """
    H, W, C = x.shape[1], x.shape[2], x.shape[3]
    KH, KW, CO = wt.shape
    OW = dst.shape[1]
    JB = wrep.shape[2] // CO
    flat = wrep.shape[0] == KH and wrep.shape[1] == KW and JB > 0
    zero = x.dtype.type(0.0)
    dflat = dst[d].reshape(OW * CO)
    xf = x.reshape(x.size)
    wf = wt.reshape(KH * KW * CO)
    # interior pixels [jt0, jt1) (every tap column inside the input): M == 1 and C a multiple
    # of two vectors: _dw_tile_s tiles of PT pixels (any stride, dilation), storing bias + sum
    jt0 = jt1 = 0
    NRc = 2 * (VEC_BYTES // x.itemsize)
    win = False
    if M == 1 and C % NRc == 0:
        jw0 = min(max(0, (pl + sw - 1) // sw), OW)
        jw1 = min(OW, (W - 1 - (KW - 1) * dw + pl) // sw + 1)
        if jw1 - jw0 >= PT:
            xoffs = np.empty(KH * KW, np.int64)
            woffs = np.empty(KH * KW, np.int64)
            T = _nhwc_taps(xoffs, woffs, n, i, 0, H, W, C, CO, KH, KW, sh, sw, dh, dw, pt, pl,
                           False)
            if T > 0:
                win = True
                jt0, jt1 = jw0, jw1
                bz = np.empty(CO, x.dtype)
                for o in range(CO):
                    bz[o] = b[o] if has_bias else zero
                last = jt1 - PT
                for j in range(jt0, jt1, PT):
                    jj = min(j, last)
                    for c0 in range(0, C, NRc):
                        _dw_tile_s(xf, xoffs, T, wf, woffs, jj * sw * C + c0, c0, sw * C, bz,
                                   dflat, jj * CO + c0, CO)
                # few taps: the border pixels one at a time, each with its own list of valid
                # taps (with many taps the 2 FMA chains of a 1-pixel tile are latency-bound and
                # the per-tap loops below are faster)
                for j in range(OW if KH * KW <= BORDER_TAPS else 0):
                    if j >= jt0 and j < jt1:
                        continue
                    T = _nhwc_taps(xoffs, woffs, n, i, j, H, W, C, CO, KH, KW, sh, sw, dh, dw,
                                   pt, pl, True)
                    if T == 0:
                        for o in range(CO):
                            dflat[j * CO + o] = bz[o]
                        continue
                    for c0 in range(0, C, NRc):
                        _dw_tile_s1(xf, xoffs, T, wf, woffs, c0, c0, 0, bz, dflat, j * CO + c0, CO)
    if win and KH * KW <= BORDER_TAPS:
        _activate(dflat, act)
        return
    for j in range(OW):
        if j >= jt0 and j < jt1:
            continue
        for o in range(CO):
            dst[d, j, o] = b[o] if has_bias else zero
    # flat path, interior: pixels [jt0, jt1) where every tap column is inside the input, in
    # register tiles of JT pixels x 2 channel vectors (needs C a multiple of that width)
    if flat and not win and C % NRc == 0:
        jt0 = min(max(0, pl), OW)
        jt1 = jt0 + max(0, min(OW, W + pl - (KW - 1) * dw) - jt0) // JT * JT
    if jt1 > jt0 and not win:
        xoffs = np.empty(KH * KW, np.int64)
        woffs = np.empty(KH * KW, np.int64)
        T = _nhwc_taps(xoffs, woffs, n, i, 0, H, W, C, CO, KH, KW, sh, sw, dh, dw, pt, pl, False)
        for j in range(jt0, jt1, JT):
            for c0 in range(0, C, NRc):
                _dw_tile(xf, xoffs, T, wf, woffs, j * C + c0, c0, dflat, j * CO + c0, C)
    for a in range(KH):
        r = i * sh - pt + a * dh
        if r < 0 or r >= H:
            continue
        xflat = x[n, r].reshape(W * C)
        for bb in range(KW):
            off = bb * dw - pl
            j0, j1 = _span(off, sw, W, OW)
            if flat:
                # the pixels left of and right of the register-tiled interior
                for lo, hi in ((j0, min(j1, jt0)), (max(j0, jt1), j1)):
                    for jb in range(lo, hi, JB):
                        L = (min(hi, jb + JB) - jb) * CO
                        f0 = jb * CO
                        x0 = (jb + off) * C
                        for f in range(L):
                            dflat[_u(f0 + f)] += wrep[a, bb, f] * xflat[_u(x0 + f)]
                continue
            for j in range(j0, j1):
                if j >= jt0 and j < jt1:
                    continue
                col = j * sw + off
                if M == 1:
                    for o in range(CO):
                        dst[d, j, o] += wt[a, bb, o] * x[n, r, col, o]
                else:
                    for c in range(C):
                        xv = x[n, r, col, c]
                        for m in range(M):
                            dst[d, j, c * M + m] += wt[a, bb, c * M + m] * xv
    _activate(dflat, act)


# ----------------------------------------------------------------------------- depthwise forward


@njit(cache=True, fastmath=_FM)
def _phase_copy(x, n, c, S, i0, sh, sw, pt, pl, Hq, Wq, xp):
    """Copy channels c .. c+S-1 of image n, zero-padded, into sh*sw phase planes of (Hq, Wq)
    each: xp[((s*sh + u)*sw + v)*Hq*Wq + ii*Wq + jj] = x[n, c+s, (i0+ii)*sh + u - pt,
    jj*sw + v - pl] (zero outside the input).

    x:        (N, CX, H, W) source;  i0: first output row of the band
    sh, sw:   stride;  pt, pl: top/left padding (may be negative);  xp: flat destination
    """
    H, W = x.shape[2], x.shape[3]
    PQ = Hq * Wq
    zero = x.dtype.type(0.0)
    for s in range(S):
        for u in range(sh):
            for v in range(sw):
                off = v - pl  # input column of phase column jj: jj*sw + off
                j0, j1 = _span(off, sw, W, Wq)
                for ii in range(Hq):
                    r = (i0 + ii) * sh + u - pt
                    base = ((s * sh + u) * sw + v) * PQ + ii * Wq
                    if r < 0 or r >= H:
                        for jj in range(Wq):
                            xp[base + jj] = zero
                        continue
                    for jj in range(j0):
                        xp[base + jj] = zero
                    q0 = j0 * sw + off
                    if sw == 1:
                        for k in range(j1 - j0):
                            xp[_u(base + j0 + k)] = x[n, c + s, r, _u(q0 + k)]
                    else:
                        for k in range(j1 - j0):
                            xp[_u(base + j0 + k)] = x[n, c + s, r, _u(q0 + k * sw)]
                    for jj in range(j1, Wq):
                        xp[base + jj] = zero


@njit(cache=True, fastmath=_FM)
def _dw_plane_nchw(x, w, b, n, c, o, S, i0, dst, sh, sw, dh, dw, pt, pl, has_bias, act, xp,
                   acc, xoffs, woffs, wrep):
    """dst[i, j] = act(b[o] + sum_{s<S, a, b} w[o+s, a, b] x[n, c+s, (i0+i)*sh - pt + a*dh,
    j*sw - pl + b*dw]) for the output rows i0 .. i0+OH-1 of one plane, NCHW (x zero outside).

    x:        (N, CX, H, W) source;  its channels c .. c+S-1 are read
    w:        (CW, KH, KW) filters;  rows o .. o+S-1 are used (filter o+s with channel c+s)
    b:        bias, b[o] is read only if has_bias
    n:        image;  i0: first output row
    dst:      (OH, OW) destination (a plane, or a band of one)
    sh, sw:   stride;  dh, dw: dilation;  pt, pl: top/left padding (may be negative)
    act:      activation code (ACT_CODES)
    xp, acc, xoffs, woffs, wrep: scratch from _plane_scratch (reused across a task's planes)
    Forward: S = 1, c = o // M. grad_input (stride 1): x = gy, S = M, flipped filters.
    Each source plane is copied once, zero-padded, into sh*sw phase planes of (Hq, Wq),
    Hq = OH + (KH-1)*dh // sh, Wq = OW + (KW-1)*dw // sw: phase (u, v) element (ii, jj) is the
    padded element ((i0+ii)*sh + u, jj*sw + v). Tap (a, b) of output (i, j) then reads phase
    (a*dh % sh, b*dw % sw) at (i + a*dh // sh, j + b*dw // sw): with the outputs laid out at
    pitch Wq, every tap is ONE flat multiply-add over L = (OH-1)*Wq + OW elements at a fixed
    offset (columns j >= OW are scratch, never stored). With stride_h 1 the taps run in
    _dw_rows (RT rows x 1 vector of accumulators and a sliding window of input rows in
    registers); otherwise all S*KH*KW taps run in register tiles of JT x 2 vectors (_dw_tile,
    its "pixels" being consecutive vectors, each filter value repeated across a vector). The
    accumulator is rounded up to whole tiles (scratch again, see _plane_dims).
    """
    KH, KW = w.shape[1], w.shape[2]
    OH, OW = dst.shape
    Hq, Wq, Lc, slack = _plane_dims(x, KH, KW, OH, OW, sh, sw, dh, dw)
    PQ = Hq * Wq
    zero = x.dtype.type(0.0)
    NRc = 2 * (VEC_BYTES // x.itemsize)
    L = (OH - 1) * Wq + OW
    for f in range(S * sh * sw * PQ, S * sh * sw * PQ + slack):
        xp[f] = zero
    _phase_copy(x, n, c, S, i0, sh, sw, pt, pl, Hq, Wq, xp)
    bias = b[o] if has_bias else zero
    for f in range(Lc):
        acc[f] = bias
    if sh == 1:
        # RT rows (spaced dh apart) x 1 vector per _dw_rows call; rows >= OH are scratch
        V = VEC_BYTES // x.itemsize
        wf = w.reshape(w.size)
        for s in range(S):
            for bb in range(KW):
                xoffs[bb] = (s * sw + (bb * dw) % sw) * PQ + (bb * dw) // sw
            for g in range(0, Lc // Wq, RT * dh):
                for rr in range(dh):
                    i = g + rr
                    for j0 in range(0, OW, V):
                        _dw_rows(xp, xoffs, KW, KH, dh * Wq, i * Wq + j0, wf, (o + s) * KH * KW,
                                 acc, i * Wq + j0)
    else:
        T = S * KH * KW
        t = 0
        for s in range(S):
            for a in range(KH):
                for bb in range(KW):
                    u, ro = (a * dh) % sh, (a * dh) // sh
                    v, co = (bb * dw) % sw, (bb * dw) // sw
                    xoffs[t] = ((s * sh + u) * sw + v) * PQ + ro * Wq + co
                    woffs[t] = t * NRc
                    wv = w[o + s, a, bb]
                    for l in range(NRc):
                        wrep[t * NRc + l] = wv
                    t += 1
        for f in range(0, Lc, JT * NRc):
            _dw_tile(xp, xoffs, T, wrep, woffs, f, 0, acc, f, NRc)
    if act != 0:
        _activate(acc[:L], act)
    for i in range(OH):
        for j in range(OW):
            dst[i, _u(j)] = acc[_u(i * Wq + j)]


@njit(cache=True)
def _plane_dims(x, KH, KW, OH, OW, sh, sw, dh, dw):
    """(Hq, Wq, Lc, slack) of _dw_plane_nchw: phase-plane shape, accumulator length (pitch Wq)
    and zeroed elements after the planes for reads past the last plane's end.

    sh == 1 (_dw_rows): whole vectors per row (Wq >= OW rounded up to a vector) and whole groups
    of RT*dh rows (Lc = OHc*Wq, OHc = OH rounded up); otherwise (_dw_tile) the flat length
    (OH-1)*Wq + OW rounded up to whole JT x 2-vector tiles.
    """
    V = VEC_BYTES // x.itemsize
    Wq = OW + (KW - 1) * dw // sw
    if sh == 1:
        Wq = max(Wq, (OW + V - 1) // V * V)
        OHc = (OH + RT * dh - 1) // (RT * dh) * (RT * dh)
        return OHc + (KH - 1) * dh, Wq, OHc * Wq, (KW - 1) * dw // sw + V
    Hq = OH + (KH - 1) * dh // sh
    BLK = JT * 2 * V
    L = (OH - 1) * Wq + OW
    Lc = (L + BLK - 1) // BLK * BLK
    return Hq, Wq, Lc, Lc - L


@njit(cache=True)
def _plane_scratch(x, KH, KW, OH, OW, S, sh, sw, dh, dw):
    """Scratch for _dw_plane_nchw on (OH, OW) outputs: (xp, acc, xoffs, woffs, wrep)."""
    NRc = 2 * (VEC_BYTES // x.itemsize)
    Hq, Wq, Lc, slack = _plane_dims(x, KH, KW, OH, OW, sh, sw, dh, dw)
    T = S * KH * KW
    return (np.empty(S * sh * sw * Hq * Wq + slack, x.dtype), np.empty(Lc, x.dtype),
            np.empty(T, np.int64), np.empty(T, np.int64), np.empty(T * NRc, x.dtype))


@njit(parallel=True, cache=True, fastmath=_FM)
def _dw_forward_nchw(x, w, b, out, M, S, sh, sw, dh, dw, pt, pl, has_bias, act):
    """Depthwise forward, NCHW; one task per (n, p) output plane (_dw_plane_nchw).

    x:        (N, CX, H, W) input
    w:        (CW, KH, KW) filters
    b:        bias (read only if has_bias)
    out:      (N, P, OH, OW) result
    M:        channel multiplier;  S: source planes summed per output plane
    sh, sw, dh, dw, pt, pl, act: as in _dw_plane_nchw
    Output plane p reads channels (p // M)*S .. +S-1 with filters p*S .. p*S+S-1: the forward is
    S = 1; grad_input at stride 1 is M = 1, S = multiplier, x = gy, flipped filters.
    """
    N, P, OH, OW = out.shape
    KH, KW = w.shape[1], w.shape[2]
    NP = N * P
    per = max(1, NP // PLANE_TASKS)
    for t in prange((NP + per - 1) // per):
        xp, acc, xoffs, woffs, wrep = _plane_scratch(x, KH, KW, OH, OW, S, sh, sw, dh, dw)
        for q in range(t * per, min(NP, (t + 1) * per)):
            n = q // P
            p = q - n * P
            _dw_plane_nchw(x, w, b, n, (p // M) * S, p * S, S, 0, out[n, p], sh, sw, dh, dw, pt,
                           pl, has_bias, act, xp, acc, xoffs, woffs, wrep)


@njit(parallel=True, cache=True, fastmath=_FM)
def _dw_forward_nhwc(x, wt, wrep, b, out, M, sh, sw, dh, dw, pt, pl, has_bias, act):
    """Depthwise forward, NHWC; one task per (n, output row).

    x:        (N, H, W, C) input
    wt:       (KH, KW, C*M) filters, channel last;  wrep: as in _dw_row_nhwc
    b:        (C*M,) bias (read only if has_bias)
    out:      (N*OH, OW, C*M) result, the (N, OH, OW, C*M) output viewed as rows
    M, sh, sw, dh, dw, pt, pl, act: as in _dw_forward_nchw
    """
    N = x.shape[0]
    OH = out.shape[0] // N
    for t in prange(N * OH):
        n = t // OH
        _dw_row_nhwc(x, wt, wrep, b, n, t - n * OH, out, t, M, sh, sw, dh, dw, pt, pl, has_bias,
                     act)


# ------------------------------------------------------------ NCHW small planes: channel groups


@njit(cache=True)
def _group_to_nhwc(x, n, c0, xs):
    """xs[0, r, q, g] = x[n, c0+g, r, q] for the channels c0 .. that exist, zero past the last.

    x:        (N, C, H, W) source
    xs:       (1, H, W, G) destination (one image of G channels, channel last; G a multiple of
              one vector)
    Whole vectors of channels x vectors of pixels move as register transposes
    (_transpose_tile), the rest one element at a time.
    """
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    G = xs.shape[3]
    P = H * W
    V = VEC_BYTES // x.itemsize
    cn = min(G, C - c0)
    xf = xs.reshape(P * G)
    src = x.reshape(x.size)
    base = (n * C + c0) * P
    cv = cn // V * V
    pv = P // V * V
    for g in range(0, cv, V):
        for q in range(0, pv, V):
            _transpose_tile(src, base + g * P + q, P, xf, q * G + g, G)
    for g in range(cn):
        for q in range(pv if g < cv else 0, P):
            xf[_u(q * G + g)] = src[_u(base + g * P + q)]
    if cn < G:
        zero = x.dtype.type(0.0)
        for q in range(P):
            for g in range(cn, G):
                xf[q * G + g] = zero


@njit(cache=True)
def _group_from_nhwc(ys, out, n, c0):
    """out[n, c0+g, i, j] = ys[i, j, g] for the channels c0 .. that exist.

    ys:       (OH, OW, G) source (channel last)
    out:      (N, C, OH, OW) destination
    """
    C, OH, OW = out.shape[1], out.shape[2], out.shape[3]
    G = ys.shape[2]
    P = OH * OW
    V = VEC_BYTES // out.itemsize
    cn = min(G, C - c0)
    yf = ys.reshape(P * G)
    dst = out.reshape(out.size)
    base = (n * C + c0) * P
    cv = cn // V * V
    pv = P // V * V
    for g in range(0, cv, V):
        for q in range(0, pv, V):
            _transpose_tile(yf, q * G + g, G, dst, base + g * P + q, P)
    for g in range(cn):
        for q in range(pv if g < cv else 0, P):
            dst[_u(base + g * P + q)] = yf[_u(q * G + g)]


@njit(parallel=True, cache=True, fastmath=_FM)
def _dw_forward_nchw_groups(x, wg, bg, out, sh, sw, dh, dw, pt, pl, has_bias, act):
    """Depthwise forward, NCHW, multiplier 1, for small planes: one task per (image, group of
    G channels), computed channel last.

    x:        (N, C, H, W) input
    wg:       (NG, KH, KW, G) each group's filters, channel last, zero past channel C
    bg:       (NG, G) each group's bias (read only if has_bias)
    out:      (N, C, OH, OW) result
    sh, sw, dh, dw, pt, pl, act: as in _dw_forward_nchw
    A plane of a few hundred pixels is too small for the plane kernel (_dw_plane_nchw): its
    fixed cost per plane (the zero-padded copy, rows rounded up to whole vectors and whole
    register tiles) outweighs the taps. Here the group's planes are transposed into a
    (1, H, W, G) scratch image in cache (_group_to_nhwc, register transposes), each output row
    runs in the NHWC row kernel (_dw_row_nhwc, vectorized along the G channels), and the
    (OH, OW, G) result is transposed back. (Copying the scratch into a zero-padded image so that
    every pixel is an interior one was slower: 0.64 vs 0.52 ms at 8x576x14x14.)
    """
    N, C, H, W = x.shape
    OH, OW = out.shape[2], out.shape[3]
    NG, G = bg.shape
    nowrep = np.zeros((1, 1, 0), x.dtype)  # the row kernel's flat path off (G is wide)
    for t in prange(N * NG):
        n = t // NG
        g = t - n * NG
        xs = np.empty((1, H, W, G), x.dtype)
        ys = np.empty((OH, OW, G), x.dtype)
        _group_to_nhwc(x, n, g * G, xs)
        for i in range(OH):
            _dw_row_nhwc(xs, wg[g], nowrep, bg[g], 0, i, ys, i, 1, sh, sw, dh, dw, pt, pl,
                         has_bias, act)
        _group_from_nhwc(ys, out, n, g * G)


@njit(parallel=True, cache=True, fastmath=_FM)
def _dw_grad_input_nchw_groups(gy, wg, gx, sh, sw, dh, dw, pt, pl):
    """Depthwise grad_input, NCHW, multiplier 1, small planes (any stride): one task per
    (image, group of G channels), computed channel last (_dw_gi_row_nhwc on the transposed
    group, as _dw_forward_nchw_groups).

    gy:       (N, C, OH, OW) output gradient
    wg:       (NG, KH, KW, G) each group's filters, channel last, zero past channel C
    gx:       (N, C, H, W) input gradient, fully written
    sh, sw, dh, dw, pt, pl: as in _dw_forward_nchw
    """
    N, C, OH, OW = gy.shape
    H, W = gx.shape[2], gx.shape[3]
    NG, G = wg.shape[0], wg.shape[3]
    for t in prange(N * NG):
        n = t // NG
        g = t - n * NG
        gys = np.empty((1, OH, OW, G), gy.dtype)
        gxs = np.empty((H, W, G), gy.dtype)
        _group_to_nhwc(gy, n, g * G, gys)
        gx4 = gxs.reshape(1, H, W, G)
        for r in range(H):
            _dw_gi_row_nhwc(gys, wg[g], gx4, 0, r, 1, sh, sw, dh, dw, pt, pl)
        _group_from_nhwc(gxs, gx, n, g * G)


@njit(parallel=True, cache=True, fastmath=_FM)
def _dw_grad_weight_nchw_groups(x, gy, part, partb, sh, sw, dh, dw, pt, pl):
    """Depthwise grad_weight, NCHW, multiplier 1, small planes, stage 1: one float64 partial per
    (image, group of G channels), computed channel last (_dw_gw_row_nhwc on the transposed
    groups of x and gy).

    x:        (N, C, H, W) input;  gy: (N, C, OH, OW) output gradient
    part:     (N, NG, KH, KW, G) float64 partial sums, fully written (zero past channel C;
              stage 2: sum over n)
    partb:    (N, NG, G) float64 partial sums of gy (the bias gradient), fully written, from the
              same transposed group; or (0, 0, 0): no bias gradient
    sh, sw, dh, dw, pt, pl: as in _dw_forward_nchw
    """
    N, C, H, W = x.shape
    OH, OW = gy.shape[2], gy.shape[3]
    NG, G = part.shape[1], part.shape[4]
    for t in prange(N * NG):
        n = t // NG
        g = t - n * NG
        xs = np.empty((1, H, W, G), x.dtype)
        gys = np.empty((1, OH, OW, G), x.dtype)
        acc = np.empty(G, x.dtype)
        _group_to_nhwc(x, n, g * G, xs)
        _group_to_nhwc(gy, n, g * G, gys)
        part[n, g] = 0.0
        for i in range(OH):
            _dw_gw_row_nhwc(xs, gys, 0, i, acc, part[n, g], 1, sh, sw, dh, dw, pt, pl)
        if partb.shape[0] > 0:
            partb[n, g] = 0.0
            for i in range(OH):
                _gb_row_nhwc(gys, 0, i, acc, partb[n, g])


# ----------------------------------------------------------------------------- depthwise grad_input


@njit(parallel=True, cache=True, fastmath=_FM)
def _dw_grad_input_nchw(gy, w, gx, M, sh, sw, dh, dw, pt, pl):
    """Depthwise grad_input, NCHW (used for stride > 1): accumulate in padded phase planes.

    gy:       (N, C*M, OH, OW) output gradient
    w:        (C*M, KH, KW) filters
    gx:       (N, C, H, W) input gradient, fully written
    M, sh, sw, dh, dw, pt, pl: as in _dw_forward_nchw
    One task per run of (n, c) input planes (each owns all M output channels reading it): no
    races. In the forward's phase-plane coordinates (_dw_plane_nchw) tap (a, b) of output
    (i, j) is element (i + a*dh // sh, j + b*dw // sw) of phase (a*dh % sh, b*dw % sw), so
    gx's zero-padded phase planes G receive, per tap and output row, ONE contiguous
    multiply-add of OW values (vectorized; the old scatter stored with stride sw). Then
    gx[r, q] = G[phase of (r + pt, q + pl)] (zero where no tap reaches), one pass.
    """
    N, CO, OH, OW = gy.shape
    KH, KW = w.shape[1], w.shape[2]
    C, H, W = gx.shape[1], gx.shape[2], gx.shape[3]
    Wq = OW + (KW - 1) * dw // sw
    Hq = OH + (KH - 1) * dh // sh
    PQ = Hq * Wq
    zero = gy.dtype.type(0.0)
    NP = N * C
    per = max(1, NP // PLANE_TASKS)
    for t in prange((NP + per - 1) // per):
        G = np.empty(sh * sw * PQ, gy.dtype)
        for q in range(t * per, min(NP, (t + 1) * per)):
            n = q // C
            c = q - n * C
            for f in range(sh * sw * PQ):
                G[f] = zero
            for m in range(M):
                o = c * M + m
                for a in range(KH):
                    for bb in range(KW):
                        base = (((a * dh) % sh) * sw + (bb * dw) % sw) * PQ
                        base += (a * dh) // sh * Wq + (bb * dw) // sw
                        wv = w[o, a, bb]
                        for i in range(OH):
                            ri = base + i * Wq
                            for k in range(OW):
                                G[_u(ri + k)] += wv * gy[n, o, i, _u(k)]
            for r in range(H):
                for k in range(W):
                    gx[n, c, r, k] = zero
                R = r + pt
                if R < 0 or R // sh >= Hq:
                    continue
                rb = (R % sh) * sw * PQ + (R // sh) * Wq
                for v in range(sw):
                    off = v - pl  # gx column of phase column jj: jj*sw + off
                    j0, j1 = _span(off, sw, W, Wq)
                    gb = rb + v * PQ
                    q0 = j0 * sw + off
                    for k in range(j1 - j0):
                        gx[n, c, r, _u(q0 + k * sw)] = G[_u(gb + j0 + k)]


@njit(cache=True, fastmath=_FM)
def _dw_gi_row_nhwc(gy, wt, gx, n, r, M, sh, sw, dh, dw, pt, pl):
    """gx[n, r] = the taps of the output rows that read input row r, NHWC (one input row).

    gy:       (N, OH, OW, C*M) output gradient
    wt:       (KH, KW, C*M) filters, channel last
    gx:       (N, H, W, C) input gradient;  row (n, r) is fully written
    M, sh, sw, dh, dw, pt, pl: as in _dw_forward_nchw
    Input row r receives tap row a from output row i = (r + pt - a*dh) / sh when that is an
    integer in [0, OH); within the row the columns are scattered (vectorized along C).
    """
    OH, OW = gy.shape[1], gy.shape[2]
    KH, KW = wt.shape[0], wt.shape[1]
    W, C = gx.shape[2], gx.shape[3]
    zero = gy.dtype.type(0.0)
    for q in range(W):
        for c in range(C):
            gx[n, r, q, c] = zero
    for a in range(KH):
        num = r + pt - a * dh
        if num < 0 or num % sh != 0:
            continue
        i = num // sh
        if i >= OH:
            continue
        for bb in range(KW):
            off = bb * dw - pl
            j0, j1 = _span(off, sw, W, OW)
            for j in range(j0, j1):
                q = j * sw + off
                if M == 1:
                    for c in range(C):
                        gx[n, r, q, c] += wt[a, bb, c] * gy[n, i, j, c]
                else:
                    for c in range(C):
                        s = zero
                        for m in range(M):
                            s += wt[a, bb, c * M + m] * gy[n, i, j, c * M + m]
                        gx[n, r, q, c] += s


@njit(parallel=True, cache=True, fastmath=_FM)
def _dw_grad_input_nhwc(gy, wt, gx, M, sh, sw, dh, dw, pt, pl):
    """Depthwise grad_input, NHWC: each task owns one input row and gathers the taps that hit it
    (_dw_gi_row_nhwc).

    gy:       (N, OH, OW, C*M) output gradient
    wt:       (KH, KW, C*M) filters, channel last
    gx:       (N, H, W, C) input gradient, fully written
    M, sh, sw, dh, dw, pt, pl: as in _dw_forward_nchw
    """
    N, H = gx.shape[0], gx.shape[1]
    for t in prange(N * H):
        n = t // H
        _dw_gi_row_nhwc(gy, wt, gx, n, t - n * H, M, sh, sw, dh, dw, pt, pl)


# ------------------------------------------------------------------------- depthwise grad_weight


@njit(parallel=True, cache=True, fastmath=_FM_SUM)
def _dw_grad_weight_nchw(x, gy, part, partb, M, sh, sw, dh, dw, pt, pl):
    """Depthwise grad_weight, NCHW, stage 1: one float64 partial per (n, o) plane.

    x:        (N, C, H, W) input
    gy:       (N, C*M, OH, OW) output gradient
    part:     (N, C*M, KH, KW) float64 partial sums, fully written (stage 2: sum over n)
    partb:    (N, C*M) float64 sums of each gy plane (the bias gradient's partials), fully
              written by the task that reads the plane for the taps; or (0, 0): no bias gradient
    M, sh, sw, dh, dw, pt, pl: as in _dw_forward_nchw
    The input plane is copied once into zero-padded phase planes (_phase_copy, as the forward),
    so for every tap output row i reads one contiguous run of OW values (no strided gather):
    part[n, o, a, b] = sum_i dot(gy[n, o, i, :], xp[tap offset + i*Wq : ... + OW]). Each row's
    dot product is summed in the input dtype (vectorized), rows in float64. Tasks are runs of
    planes sharing one scratch buffer.
    """
    N, CO, OH, OW = gy.shape
    KH, KW = part.shape[2], part.shape[3]
    Wq = OW + (KW - 1) * dw // sw
    Hq = OH + (KH - 1) * dh // sh
    PQ = Hq * Wq
    zero = x.dtype.type(0.0)
    NP = N * CO
    per = max(1, NP // PLANE_TASKS)
    for t in prange((NP + per - 1) // per):
        xp = np.empty(sh * sw * PQ, x.dtype)
        for q in range(t * per, min(NP, (t + 1) * per)):
            n = q // CO
            o = q - n * CO
            _phase_copy(x, n, o // M, 1, 0, sh, sw, pt, pl, Hq, Wq, xp)
            for a in range(KH):
                for bb in range(KW):
                    base = (((a * dh) % sh) * sw + (bb * dw) % sw) * PQ
                    base += (a * dh) // sh * Wq + (bb * dw) // sw
                    total = 0.0
                    for i in range(OH):
                        s = zero
                        ri = base + i * Wq
                        for k in range(OW):
                            s += gy[n, o, i, _u(k)] * xp[_u(ri + k)]
                        total += s
                    part[n, o, a, bb] = total
            if partb.shape[0] > 0:
                total = 0.0
                for i in range(OH):
                    s = zero
                    for k in range(OW):
                        s += gy[n, o, i, _u(k)]
                    total += s
                partb[n, o] = total


@njit(cache=True, fastmath=_FM)
def _dw_gw_row_nhwc(x, gy, n, i, acc, dst, M, sh, sw, dh, dw, pt, pl):
    """dst[a, b, o] += sum_j gy[n, i, j, o] x[n, i*sh - pt + a*dh, j*sw - pl + b*dw, o // M]
    over the valid columns j of output row (n, i), NHWC.

    x:        (N, H, W, C) input;  gy: (N, OH, OW, C*M) output gradient
    acc:      (C*M,) scratch in the input dtype;  dst: (KH, KW, C*M) float64 sums
    M, sh, sw, dh, dw, pt, pl: as in _dw_forward_nchw
    Per tap the sum over the row's columns is vectorized along C in the input dtype (with M = 1
    and C a multiple of two vectors in registers, _dot_run), then added into the float64 sum.
    """
    H, W, C = x.shape[1], x.shape[2], x.shape[3]
    OH, OW, CO = gy.shape[1], gy.shape[2], gy.shape[3]
    KH, KW = dst.shape[0], dst.shape[1]
    zero = x.dtype.type(0.0)
    NRc = 2 * (VEC_BYTES // x.itemsize)
    tiles = M == 1 and C % NRc == 0
    xf = x.reshape(x.size)
    gyf = gy.reshape(gy.size)
    for a in range(KH):
        r = i * sh - pt + a * dh
        if r < 0 or r >= H:
            continue
        for bb in range(KW):
            off = bb * dw - pl
            j0, j1 = _span(off, sw, W, OW)
            for o in range(CO):
                acc[o] = zero
            if tiles:
                if j1 > j0:
                    g0 = ((n * OH + i) * OW + j0) * CO
                    x0 = ((n * H + r) * W + j0 * sw + off) * C
                    for c0 in range(0, C, NRc):
                        _dot_run(gyf, g0 + c0, CO, xf, x0 + c0, sw * C, j1 - j0, acc, c0)
                for o in range(CO):
                    dst[a, bb, o] += acc[o]
                continue
            for j in range(j0, j1):
                col = j * sw + off
                if M == 1:
                    for o in range(CO):
                        acc[o] += gy[n, i, j, o] * x[n, r, col, o]
                else:
                    for c in range(C):
                        xv = x[n, r, col, c]
                        for m in range(M):
                            acc[c * M + m] += gy[n, i, j, c * M + m] * xv
            for o in range(CO):
                dst[a, bb, o] += acc[o]


@njit(cache=True, fastmath=_FM)
def _gb_row_nhwc(gy, n, i, acc, dst):
    """dst[o] += sum_j gy[n, i, j, o] (a bias gradient's partial sum over output row (n, i)),
    NHWC; acc: (C*M,) scratch in the input dtype (the row's sum, vectorized along C), dst float64."""
    OW, CO = gy.shape[2], gy.shape[3]
    zero = gy.dtype.type(0.0)
    for o in range(CO):
        acc[o] = zero
    for j in range(OW):
        for o in range(CO):
            acc[o] += gy[n, i, j, o]
    for o in range(CO):
        dst[o] += acc[o]


@njit(parallel=True, cache=True, fastmath=_FM)
def _dw_grad_weight_nhwc(x, gy, part, partb, M, sh, sw, dh, dw, pt, pl):
    """Depthwise grad_weight, NHWC, stage 1: one float64 partial per block of output rows.

    x:        (N, H, W, C) input
    gy:       (N, OH, OW, C*M) output gradient
    part:     (T, KH, KW, C*M) float64 partial sums, fully written; task t sums the output rows
              (n, i) with flat index n*OH + i in [t*B, (t+1)*B), B = ceil(N*OH / T)
    partb:    (T, C*M) float64 sums of the same rows of gy (the bias gradient's partials), each
              row summed right after its taps read it; or (0, 0): no bias gradient
    M, sh, sw, dh, dw, pt, pl: as in _dw_forward_nchw
    """
    N, OH, OW, CO = gy.shape
    T = part.shape[0]
    rows = N * OH
    per = (rows + T - 1) // T
    bias = partb.shape[0] > 0
    for t in prange(T):
        part[t] = 0.0
        if bias:
            partb[t] = 0.0
        acc = np.empty(CO, x.dtype)
        for flat in range(t * per, min(rows, (t + 1) * per)):
            n = flat // OH
            _dw_gw_row_nhwc(x, gy, n, flat - n * OH, acc, part[t], M, sh, sw, dh, dw, pt, pl)
            if bias:
                _gb_row_nhwc(gy, n, flat - n * OH, acc, partb[t])
