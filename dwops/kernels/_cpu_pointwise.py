"""The ``cpu`` backend's pointwise (1x1) and fused separable kernels: BLAS GEMMs per tile with
the epilogue fused (see ``cpu.py`` for the method)."""

from __future__ import annotations

import numpy as np

from ._cpu_common import (
    _FM,
    GW_ROWS,
    PW_CHANNEL_STEP,
    PW_MIN_CHANNELS,
    PW_NCHW_PIXELS,
    PW_NHWC_PIXELS,
    PW_TASKS,
    _activate,
    _xxgemm,
    njit,
    prange,
)
from ._cpu_depthwise import _dw_plane_nchw, _dw_row_nhwc, _plane_scratch

# ----------------------------------------------------------------------------- BLAS


def pw_tiles(layout: str, images: int, pixels: int, co: int) -> tuple[int, int]:
    """(pixels, output channels) per pointwise tile for ``images`` images of ``pixels`` pixels."""
    if layout == "NCHW":
        nb = -(-pixels // PW_NCHW_PIXELS)
        pb = -(-pixels // nb)
        tasks = images * nb
    else:
        pb = PW_NHWC_PIXELS
        tasks = -(-(images * pixels) // pb)
    return pb, channel_block(co, tasks)


def channel_block(co: int, tasks: int) -> int:
    """Output channels per tile when the other dimensions give ``tasks`` tiles: all of them, or
    blocks (>= PW_MIN_CHANNELS, a multiple of PW_CHANNEL_STEP) making about PW_TASKS tiles."""
    split = max(1, min(-(-PW_TASKS // max(tasks, 1)), co // PW_MIN_CHANNELS))
    per = -(-co // split)
    return min(co, -(-per // PW_CHANNEL_STEP) * PW_CHANNEL_STEP)


@njit(cache=True)
def _gemm(ta, tb, m, n, k, a, lda, b, ldb, c, ldc, acc):
    """Column-major ``C = op(A) op(B)`` (``C += ...`` if acc; m x n, inner size k) by the BLAS
    SciPy links.

    a, b, c:  arrays (usually views) whose first element is the operand's first element
    lda, ldb, ldc: leading dimensions in elements (column-major)
    ta, tb:   True: the operand is stored transposed (k x m for A, n x k for B)
    The call goes through Numba's ``numba_xxgemm`` (``scipy.linalg.cython_blas``: sgemm for
    float32, dgemm for float64), single-threaded here: it runs inside prange tasks, with the BLAS
    thread count held at 1 by the backend (:class:`_SerialBlas`). A row-major (R, L) array is a
    column-major L x R matrix, so the kernels below pass row-major operands in swapped roles.
    """
    ab = np.empty(2, c.dtype)
    ab[0] = 1.0
    ab[1] = 1.0 if acc else 0.0
    _xxgemm(115 if c.itemsize == 4 else 100, 84 if ta else 78, 84 if tb else 78, m, n, k,
            ab.ctypes, a.ctypes, lda, b.ctypes, ldb, ab[1:].ctypes, c.ctypes, ldc)


@njit(cache=True)
def _gemm_warm():
    """One tiny call per dtype outside any parallel region: Numba resolves the BLAS function
    on its first call under the GIL, which a prange worker must not be the one to do."""
    a = np.ones((1, 1), np.float32)
    c = np.empty((1, 1), np.float32)
    _gemm(False, False, 1, 1, 1, a, 1, a, 1, c, 1, False)
    a64 = np.ones((1, 1), np.float64)
    c64 = np.empty((1, 1), np.float64)
    _gemm(False, False, 1, 1, 1, a64, 1, a64, 1, c64, 1, False)


# ----------------------------------------------------------------------------- pointwise


@njit(cache=True, fastmath=_FM)
def _epilogue_row(row, bias, has_bias, act, res, has_res):
    """row = act(row + bias) + res, in place on a 1-d run of one tile (bias a scalar for a
    channel row, ``res`` the matching 1-d run of the residual)."""
    if has_bias:
        for k in range(row.shape[0]):
            row[k] += bias
    _activate(row, act)
    if has_res:
        for k in range(row.shape[0]):
            row[k] += res[k]


@njit(cache=True, fastmath=_FM)
def _epilogue_pixel(row, b, has_bias, act, res, has_res):
    """The same for one NHWC pixel: ``row`` and ``res`` run over channels, ``b`` is a vector."""
    if has_bias:
        for k in range(row.shape[0]):
            row[k] += b[k]
    _activate(row, act)
    if has_res:
        for k in range(row.shape[0]):
            row[k] += res[k]


@njit(parallel=True, cache=True, fastmath=_FM)
def _pw_forward_nchw(x, w, b, res, y, PB, OB, has_bias, has_res, act):
    """y[n, o, k] = act(sum_c w[o, c] x[n, c, k] + b[o]) + res[n, o, k]  (NCHW, k = flat pixel).

    x:        (N, CI, K) input
    w:        (CO, CI) weights
    b:        (CO,) bias (read only if has_bias)
    res:      (N, CO, K) residual (read only if has_res)
    y:        (N, CO, K) output
    PB, OB:   pixels and output channels per tile (pw_tiles);  act: activation code
    One task per tile (image, block of PB pixels, block of OB output channels): one BLAS call
    writes y[n][o-block, k-block] (rows K apart) = w[o-block] x[n][:, k-block] in place
    (column-major: the pixels x channels matrix x[n][:, k-block]^T w[o-block]^T), then bias,
    activation and residual run over the tile while it is in cache.
    """
    N, CI, K = x.shape
    CO = w.shape[0]
    nb = (K + PB - 1) // PB
    ncb = (CO + OB - 1) // OB
    for t in prange(N * nb * ncb):
        n = t // (nb * ncb)
        r = t - n * nb * ncb
        kb = r // ncb
        k0 = kb * PB
        o0 = (r - kb * ncb) * OB
        pb = min(PB, K - k0)
        ob = min(OB, CO - o0)
        _gemm(False, False, pb, ob, CI, x[n, 0, k0:], K, w[o0:], CI, y[n, o0, k0:], K, False)
        if has_bias or has_res or act != 0:
            for o in range(o0, o0 + ob):
                _epilogue_row(y[n, o, k0:k0 + pb], b[o], has_bias, act,
                              res[n, o, k0:k0 + pb] if has_res else res[0, 0, :], has_res)


@njit(parallel=True, cache=True, fastmath=_FM)
def _pw_forward_nhwc(x, wt, b, res, y, PB, OB, has_bias, has_res, act):
    """y[p, o] = act(sum_c x[p, c] wt[c, o] + b[o]) + res[p, o]  (NHWC, p = flat pixel).

    x:        (P, CI) input;  wt: (CI, CO) weights, transposed;  b: (CO,) bias (if has_bias)
    res:      (P, CO) residual (read only if has_res);  y: (P, CO) output;  act: activation code
    PB, OB:   pixels and output channels per tile (pw_tiles)
    One task per tile: one BLAS call writes y[p-block, o-block] (rows CO apart) =
    x[p-block] wt[:, o-block] (column-major: the channels x pixels matrix
    wt[:, o-block]^T x[p-block]^T), then the epilogue per pixel.
    """
    P, CI = x.shape
    CO = wt.shape[1]
    nb = (P + PB - 1) // PB
    ncb = (CO + OB - 1) // OB
    for t in prange(nb * ncb):
        kb = t // ncb
        p0 = kb * PB
        o0 = (t - kb * ncb) * OB
        pb = min(PB, P - p0)
        ob = min(OB, CO - o0)
        _gemm(False, False, ob, pb, CI, wt[0, o0:], CO, x[p0:], CI, y[p0, o0:], CO, False)
        if has_bias or has_res or act != 0:
            for p in range(p0, p0 + pb):
                _epilogue_pixel(y[p, o0:o0 + ob], b[o0:o0 + ob], has_bias, act,
                                res[p, o0:o0 + ob] if has_res else res[0, :], has_res)


@njit(parallel=True, cache=True, fastmath=_FM)
def _pw_grad_weight_nchw(x, gy, part, G, OB):
    """Pointwise grad_weight, NCHW, stage 1: part[t] = sum over a pixel chunk of gy x^T.

    x:        (N, CI, K) input;  gy: (N, CO, K) output gradient
    part:     (chunks, CO, CI) float64 partials (stage 2: their sum)
    G:        images per chunk: K > GW_ROWS: 1 (each image in ceil(K / GW_ROWS) chunks); else
              GW_ROWS // K whole images (at most GW_ROWS pixels)
    OB:       output channels per task
    One task per (chunk, block of OB output channels): one BLAS call per image of the chunk,
    accumulated in the compute dtype (column-major: the CI x OB matrix
    x[n][:, k-run] gy[n][o-block, k-run]^T, the row-major (OB, CI) tile), then stored in float64.
    """
    N, CI, K = x.shape
    T, CO = part.shape[0], part.shape[1]
    nb = (K + GW_ROWS - 1) // GW_ROWS if G == 1 else 1
    ncb = (CO + OB - 1) // OB
    for t in prange(T * ncb):
        c = t // ncb
        o0 = (t - c * ncb) * OB
        ob = min(OB, CO - o0)
        n0 = (c // nb) * G
        k0 = (c - (c // nb) * nb) * GW_ROWS
        kc = min(GW_ROWS, K - k0)
        tile = np.empty((ob, CI), x.dtype)
        for n in range(n0, min(N, n0 + G)):
            _gemm(True, False, CI, ob, kc, x[n, 0, k0:], K, gy[n, o0, k0:], K, tile, CI, n > n0)
        for o in range(ob):
            for ci in range(CI):
                part[c, o0 + o, ci] = tile[o, ci]


@njit(parallel=True, cache=True, fastmath=_FM)
def _pw_grad_weight_nhwc(x, gy, part, OB):
    """Pointwise grad_weight, NHWC, stage 1: part[t] = sum over pixels of chunk t of gy x^T.

    x:        (P, CI) input;  gy: (P, CO) output gradient
    part:     (ceil(P / GW_ROWS), CO, CI) float64 partials (stage 2: their sum)
    OB:       output channels per task
    One BLAS call per (chunk of GW_ROWS pixels, block of OB output channels) (column-major: the
    CI x OB matrix x[chunk]^T gy[chunk, o-block]).
    """
    P, CI = x.shape
    T, CO = part.shape[0], part.shape[1]
    ncb = (CO + OB - 1) // OB
    for t in prange(T * ncb):
        c = t // ncb
        o0 = (t - c * ncb) * OB
        ob = min(OB, CO - o0)
        p0 = c * GW_ROWS
        tile = np.empty((ob, CI), x.dtype)
        _gemm(False, True, CI, ob, min(GW_ROWS, P - p0), x[p0:], CI, gy[p0, o0:], CO, tile, CI,
              False)
        for o in range(ob):
            for ci in range(CI):
                part[c, o0 + o, ci] = tile[o, ci]


# ----------------------------------------------------------------------------- separable


@njit(parallel=True, cache=True, fastmath=_FM)
def _separable_nchw(x, w, db, pw, b, res, y, PB, M, sh, sw, dh, dw, pt, pl,
                    has_db, dact, has_bias, has_res, act):
    """Fused separable forward, NCHW; one task per band of output rows, intermediate in cache.

    x:        (N, C, H, W) input
    w:        (C*M, KH, KW) depthwise filters;  db: (C*M,) depthwise bias (if has_db)
    pw:       (CO, C*M) pointwise weights;      b: (CO,) bias (if has_bias)
    res:      (N, CO, OH, OW) residual (if has_res)
    y:        (N, CO, OH, OW) output
    PB:       pixels per band (SEP_PIXELS): a band is max(1, PB // OW) output rows
    M, sh, sw, dh, dw, pt, pl: depthwise geometry as in _dw_forward_nchw
    dact, act: depthwise and final activation codes
    One task per band of RB output rows of one image. Each channel's band goes through a
    (RB, OW) buffer into mid[c] (mid is (C*M, RB*OW)); then one BLAS call writes the band of
    every output channel, y[n][:, band] (CO x RB*OW, rows OH*OW apart) = pw mid, and bias,
    activation and residual run over it while it is in cache.
    """
    N, CO, OH, OW = y.shape
    CI = w.shape[0]
    RB = max(1, min(OH, PB // OW))
    nb = (OH + RB - 1) // RB
    for t in prange(N * nb):
        n = t // nb
        i0 = (t - n * nb) * RB
        R = min(RB, OH - i0)
        L = R * OW
        band = np.empty((R, OW), x.dtype)
        mid = np.empty((CI, L), x.dtype)
        xp, acc, xoffs, woffs, wrep = _plane_scratch(x, w.shape[1], w.shape[2], R, OW, 1, sh, sw,
                                                     dh, dw)
        for c in range(CI):
            _dw_plane_nchw(x, w, db, n, c // M, c, 1, i0, band, sh, sw, dh, dw, pt, pl, has_db,
                           dact, xp, acc, xoffs, woffs, wrep)
            for ii in range(R):
                for j in range(OW):
                    mid[c, ii * OW + j] = band[ii, j]
        _gemm(False, False, L, CO, CI, mid, L, pw, CI, y[n, 0, i0:], OH * OW, False)
        if has_bias or has_res or act != 0:
            for o in range(CO):
                for ii in range(i0, i0 + R):
                    _epilogue_row(y[n, o, ii], b[o], has_bias, act,
                                  res[n, o, ii] if has_res else res[0, 0, 0], has_res)


@njit(parallel=True, cache=True, fastmath=_FM)
def _separable_nhwc(x, wt, wrep, db, pwt, b, res, y, PB, M, sh, sw, dh, dw, pt, pl,
                    has_db, dact, has_bias, has_res, act):
    """Fused separable forward, NHWC; one task per band of output rows, intermediate in cache.

    x:        (N, H, W, C) input
    wt:       (KH, KW, C*M) depthwise filters, channel last;  db: (C*M,) depthwise bias
    wrep:     tap filters repeated, as in _dw_row_nhwc
    pwt:      (C*M, CO) pointwise weights, transposed;  b: (CO,) bias (if has_bias)
    res:      (N, OH, OW, CO) residual (if has_res);  y: (N, OH, OW, CO) output
    PB:       pixels per band (SEP_PIXELS): a band is max(1, PB // OW) output rows
    M, sh, sw, dh, dw, pt, pl, dact, act: as in _separable_nchw
    mid (R, OW, C*M) = the band's depthwise rows; one BLAS call writes y[n, band] (R*OW x CO,
    contiguous) = mid pwt, then bias, activation, residual per pixel.
    """
    N, OH, OW, CO = y.shape
    CI = wt.shape[2]
    RB = max(1, min(OH, PB // OW))
    nb = (OH + RB - 1) // RB
    for t in prange(N * nb):
        n = t // nb
        i0 = (t - n * nb) * RB
        R = min(RB, OH - i0)
        mid = np.empty((R, OW, CI), x.dtype)
        for ii in range(R):
            _dw_row_nhwc(x, wt, wrep, db, n, i0 + ii, mid, ii, M, sh, sw, dh, dw, pt, pl, has_db,
                         dact)
        _gemm(False, False, CO, R * OW, CI, pwt, CO, mid, CI, y[n, i0], CO, False)
        if has_bias or has_res or act != 0:
            for ii in range(i0, i0 + R):
                for j in range(OW):
                    _epilogue_pixel(y[n, ii, j], b, has_bias, act,
                                    res[n, ii, j] if has_res else res[0, 0, 0], has_res)
