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
from ._cpu_ir import _dw_rows, _dw_tile, _dw_tile_s, _dw_tile_s1

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


@njit(parallel=True, cache=True, fastmath=_FM)
def _dw_grad_input_nhwc(gy, wt, gx, M, sh, sw, dh, dw, pt, pl):
    """Depthwise grad_input, NHWC: each task owns one input row and gathers the taps that hit it.

    gy:       (N, OH, OW, C*M) output gradient
    wt:       (KH, KW, C*M) filters, channel last
    gx:       (N, H, W, C) input gradient, fully written
    M, sh, sw, dh, dw, pt, pl: as in _dw_forward_nchw
    Input row r receives tap row a from output row i = (r + pt - a*dh) / sh when that is an
    integer in [0, OH); within the row the columns are scattered (vectorized along C).
    """
    N, OH, OW, CO = gy.shape
    KH, KW = wt.shape[0], wt.shape[1]
    H, W, C = gx.shape[1], gx.shape[2], gx.shape[3]
    zero = gy.dtype.type(0.0)
    for t in prange(N * H):
        n = t // H
        r = t - n * H
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


# ------------------------------------------------------------------------- depthwise grad_weight


@njit(parallel=True, cache=True, fastmath=_FM_SUM)
def _dw_grad_weight_nchw(x, gy, part, M, sh, sw, dh, dw, pt, pl):
    """Depthwise grad_weight, NCHW, stage 1: one float64 partial per (n, o) plane.

    x:        (N, C, H, W) input
    gy:       (N, C*M, OH, OW) output gradient
    part:     (N, C*M, KH, KW) float64 partial sums, fully written (stage 2: sum over n)
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


@njit(parallel=True, cache=True, fastmath=_FM)
def _dw_grad_weight_nhwc(x, gy, part, M, sh, sw, dh, dw, pt, pl):
    """Depthwise grad_weight, NHWC, stage 1: one float64 partial per block of output rows.

    x:        (N, H, W, C) input
    gy:       (N, OH, OW, C*M) output gradient
    part:     (T, KH, KW, C*M) float64 partial sums, fully written; task t sums the output rows
              (n, i) with flat index n*OH + i in [t*B, (t+1)*B), B = ceil(N*OH / T)
    M, sh, sw, dh, dw, pt, pl: as in _dw_forward_nchw
    Per (row, tap) the sum over the row's columns is vectorized along C in the input dtype, and
    added into the float64 partial.
    """
    H, W, C = x.shape[1], x.shape[2], x.shape[3]
    N, OH, OW, CO = gy.shape
    T, KH, KW = part.shape[0], part.shape[1], part.shape[2]
    rows = N * OH
    per = (rows + T - 1) // T
    zero = x.dtype.type(0.0)
    for t in prange(T):
        for a in range(KH):
            for bb in range(KW):
                for o in range(CO):
                    part[t, a, bb, o] = 0.0
        acc = np.empty(CO, x.dtype)
        for flat in range(t * per, min(rows, (t + 1) * per)):
            n = flat // OH
            i = flat - n * OH
            for a in range(KH):
                r = i * sh - pt + a * dh
                if r < 0 or r >= H:
                    continue
                for bb in range(KW):
                    off = bb * dw - pl
                    j0, j1 = _span(off, sw, W, OW)
                    for o in range(CO):
                        acc[o] = zero
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
                        part[t, a, bb, o] += acc[o]
