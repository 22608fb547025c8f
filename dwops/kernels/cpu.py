"""The ``"cpu"`` backend: Numba CPU kernels (``njit(parallel=True, cache=True)``) plus BLAS GEMMs.

``backend="auto"`` runs this for host arrays. Every op and gradient of the Backend interface is
here, for any kernel size up to 31x31, stride, dilation, channel multiplier, asymmetric padding,
bias, the four activations, residual, both layouts and the four dtypes.

Dtypes. float32 and float64 compute in their own precision (float32 reductions over many terms
are summed per row in float32 and across rows in float64). float16 and bfloat16 are converted to
float32, computed as float32 and rounded once at the end. Each kernel below is ONE generic
function: Numba specializes it per array dtype (float32 / float64); kernel size, stride, dilation
and padding are runtime integers, so a new geometry never triggers a compile. Compiled code is
cached on disk (``cache=True``), so only a process's very first call of a kernel and dtype pays
the load (and a fresh installation's first call pays the compile).

The math (``M`` = channel multiplier, ``o // M`` the input channel of output channel ``o``,
``x`` zero outside ``[0, H) x [0, W)``)::

    depthwise    y[n, o, i, j]  = act(b[o] + sum_{a, b} w[o, a, b] * x[n, o//M, i*sh - pt + a*dh,
                                                                         j*sw - pl + b*dw])
    grad_input   gx[n, c, r, q] = sum_{m, i, j, a, b : i*sh - pt + a*dh == r, j*sw - pl + b*dw == q}
                                      w[c*M + m, a, b] * gy[n, c*M + m, i, j]
    grad_weight  gw[o, a, b]    = sum_{n, i, j} gy[n, o, i, j] * x[n, o//M, i*sh - pt + a*dh,
                                                                    j*sw - pl + b*dw]
    pointwise    y[n, o, h, w]  = act(b[o] + sum_c W[o, c] x[n, c, h, w]) + residual[n, o, h, w]
                 gx = W^T gy (over channels);  gW[o, c] = sum_{n, h, w} gy[n, o, h, w] x[n, c, h, w]
    separable    y = act(pw(dw_act(dw(x) + dw_b)) + b) + residual

How each is computed:

* Depthwise forward and grad_input are *row* kernels. For one kernel tap ``(a, b)`` the outputs of
  an output row that read a valid input column form one contiguous range ``[j0, j1)`` (see
  :func:`_span`), so the tap is a multiply-add over that range with no bounds test inside; LLVM
  vectorizes it along W (NCHW) or along C (NHWC). grad_input *scatters* each output row into the
  input rows it came from: the task owning an input plane (NCHW: one ``(n, c)`` plane with its
  ``M`` output channels) or an input row (NHWC: taps ``a`` with ``r + pt - a*dh`` divisible by
  ``sh``) is the only writer, so there are no races and no atomics.
* Depthwise grad_weight is a two-stage reduction: per task (NCHW: one ``(n, o)`` plane; NHWC: a
  fixed block of output rows) a float64 partial sum, then one sum over the partials. The number
  of tasks does not depend on the thread count, so results are reproducible.
* Pointwise products are BLAS GEMMs (``np.matmul``, float32/float64) over
  ``(C_out, C_in) x (C_in, H*W)`` per image (NCHW) or ``(N*H*W, C_in) x (C_in, C_out)`` (NHWC);
  bias, activation and residual are one fused Numba epilogue pass.
* Separable: the depthwise stage (with dw bias and dw activation) is computed one chunk of output
  rows at a time into a cache-sized temporary, then that chunk's GEMM and the fused epilogue write
  the output, so the intermediate never makes a round trip through main memory.

Activations match :func:`dwops.reference.activate` exactly, including its NaN rules
(``relu(y) = y if y > 0 else 0 * y``, so NaN stays NaN).
"""

from __future__ import annotations

import math

import numpy as np

try:  # the backend reports itself unavailable instead of breaking ``import dwops``
    import numba
    from numba import njit, prange

    _IMPORT_ERROR = None
except ImportError as exc:  # pragma: no cover - exercised only without numba
    numba = None
    _IMPORT_ERROR = str(exc)

    def njit(*args, **kwargs):
        return lambda f: f

    prange = range

from .._registry import HostBackend

ACT_CODES = {None: 0, "relu": 1, "relu6": 2, "silu": 3, "gelu": 4}

# Separable: output rows per chunk are chosen so the depthwise temporary of one chunk holds about
# CHUNK_BYTES (fits in L2 with the GEMM's output chunk); pointwise grad_weight sums BLAS products
# over at most GW_ROWS pixels in float32 before accumulating in float64.
CHUNK_BYTES = 1 << 20
GW_ROWS = 4096
# NHWC depthwise grad_weight: number of row blocks (partial sums), fixed for reproducibility.
GW_TASKS = 64

# Reductions may be reassociated (vectorized sums); "contract" lets LLVM use FMA. No nnan/ninf:
# NaN and Inf must propagate.
_FM_SUM = {"reassoc", "contract"}
_FM = {"contract"}


# ----------------------------------------------------------------------------- shared helpers


@njit(cache=True, inline="always")
def _span(off, s, n_in, n_out):
    """Outputs ``j`` in ``[j0, j1)`` with ``0 <= j*s + off < n_in`` (``s >= 1``), clipped to n_out."""
    j0 = max(0, -(off // s))
    j1 = min(n_out, (n_in - 1 - off) // s + 1)
    return j0, max(j0, j1)


@njit(cache=True)
def _activate(v, act):
    """Apply activation code ``act`` (ACT_CODES) in place to the 1-d contiguous array ``v``.

    Constants are cast to ``v``'s dtype, so float32 stays float32. NaN propagates as in the
    reference: relu(y) = y if y > 0 else 0*y; relu6 adds 0*y; silu = y / (1 + exp(-y));
    gelu = y/2 * (1 + erf(y / sqrt 2)).
    """
    t = v.dtype.type
    zero = t(0.0)
    one = t(1.0)
    if act == 1:
        for k in range(v.shape[0]):
            y = v[k]
            v[k] = y if y > zero else y * zero
    elif act == 2:
        six = t(6.0)
        for k in range(v.shape[0]):
            y = v[k]
            r = six if y > six else (y if y > zero else y * zero)
            v[k] = r + y * zero
    elif act == 3:
        for k in range(v.shape[0]):
            y = v[k]
            v[k] = y / (one + np.exp(-y))
    elif act == 4:
        half = t(0.5)
        rsqrt2 = t(0.7071067811865476)
        for k in range(v.shape[0]):
            y = v[k]
            v[k] = half * y * (one + math.erf(y * rsqrt2))


# ----------------------------------------------------------------------------- depthwise forward


@njit(parallel=True, cache=True, fastmath=_FM)
def _dw_forward_nchw(x, w, b, out, M, sh, sw, dh, dw, pt, pl, i0, has_bias, act):
    """Depthwise forward, NCHW, output rows ``[i0, i0 + R)``.

    x:        (N, C, H, W) input, C-contiguous
    w:        (C*M, KH, KW) filters
    b:        (C*M,) bias (read only if has_bias)
    out:      (N, C*M, R, OW) result rows i0 .. i0+R-1, fully written
    M:        channel multiplier; output channel o reads input channel o // M
    sh, sw:   stride;  dh, dw: dilation;  pt, pl: top / left padding
    act:      activation code (ACT_CODES)
    One task per (n, o) plane; per output row an accumulator of OW values, one vectorized
    multiply-add over the valid column range per tap.
    """
    N, C, H, W = x.shape
    CO, KH, KW = w.shape
    R, OW = out.shape[2], out.shape[3]
    zero = x.dtype.type(0.0)
    for t in prange(N * CO):
        n = t // CO
        o = t - n * CO
        c = o // M
        bias = b[o] if has_bias else zero
        acc = np.empty(OW, x.dtype)
        for ii in range(R):
            i = i0 + ii
            for j in range(OW):
                acc[j] = bias
            for a in range(KH):
                r = i * sh - pt + a * dh
                if r < 0 or r >= H:
                    continue
                xr = x[n, c, r]
                for bb in range(KW):
                    off = bb * dw - pl
                    j0, j1 = _span(off, sw, W, OW)
                    wv = w[o, a, bb]
                    if sw == 1:
                        xs = xr[j0 + off:j1 + off]
                    else:
                        xs = xr[j0 * sw + off:(j1 - 1) * sw + off + 1:sw]
                    accs = acc[j0:j1]
                    for k in range(j1 - j0):
                        accs[k] += wv * xs[k]
            _activate(acc, act)
            orow = out[n, o, ii]
            for j in range(OW):
                orow[j] = acc[j]


@njit(parallel=True, cache=True, fastmath=_FM)
def _dw_forward_nhwc(x, wt, b, out, M, sh, sw, dh, dw, pt, pl, i0, has_bias, act):
    """Depthwise forward, NHWC, output rows ``[i0, i0 + R)``.

    x:        (N, H, W, C) input, C-contiguous
    wt:       (KH, KW, C*M) filters, channel last (transposed from (C*M, 1, KH, KW))
    b:        (C*M,) bias (read only if has_bias)
    out:      (N, R, OW, C*M) result rows i0 .. i0+R-1, fully written
    M, sh, sw, dh, dw, pt, pl, act: as in _dw_forward_nchw
    One task per (n, output row); an (OW, C*M) accumulator (L1-sized for typical C); each tap is a
    vectorized multiply-add along C for every valid output column.
    """
    N, H, W, C = x.shape
    KH, KW, CO = wt.shape
    R, OW = out.shape[1], out.shape[2]
    zero = x.dtype.type(0.0)
    for t in prange(N * R):
        n = t // R
        ii = t - n * R
        i = i0 + ii
        acc = np.empty((OW, CO), x.dtype)
        for j in range(OW):
            aj = acc[j]
            for o in range(CO):
                aj[o] = b[o] if has_bias else zero
        for a in range(KH):
            r = i * sh - pt + a * dh
            if r < 0 or r >= H:
                continue
            for bb in range(KW):
                off = bb * dw - pl
                j0, j1 = _span(off, sw, W, OW)
                wr = wt[a, bb]
                for j in range(j0, j1):
                    xp = x[n, r, j * sw + off]
                    aj = acc[j]
                    if M == 1:
                        for o in range(CO):
                            aj[o] += wr[o] * xp[o]
                    else:
                        for c in range(C):
                            xv = xp[c]
                            for m in range(M):
                                aj[c * M + m] += wr[c * M + m] * xv
        flat = acc.reshape(OW * CO)
        _activate(flat, act)
        orow = out[n, ii].reshape(OW * CO)
        for k in range(OW * CO):
            orow[k] = flat[k]


# ----------------------------------------------------------------------------- depthwise grad_input


@njit(parallel=True, cache=True, fastmath=_FM)
def _dw_grad_input_nchw(gy, w, gx, M, sh, sw, dh, dw, pt, pl):
    """Depthwise grad_input, NCHW: scatter each output row into the input rows it read.

    gy:       (N, C*M, OH, OW) output gradient
    w:        (C*M, KH, KW) filters
    gx:       (N, C, H, W) input gradient, fully written
    M, sh, sw, dh, dw, pt, pl: as in _dw_forward_nchw
    One task per (n, c) input plane (it owns all M output channels reading it): no races.
    """
    N, CO, OH, OW = gy.shape
    _, KH, KW = w.shape
    _, C, H, W = gx.shape
    zero = gy.dtype.type(0.0)
    for t in prange(N * C):
        n = t // C
        c = t - n * C
        g = gx[n, c]
        for r in range(H):
            for q in range(W):
                g[r, q] = zero
        for m in range(M):
            o = c * M + m
            for i in range(OH):
                gyr = gy[n, o, i]
                for a in range(KH):
                    r = i * sh - pt + a * dh
                    if r < 0 or r >= H:
                        continue
                    grow = g[r]
                    for bb in range(KW):
                        off = bb * dw - pl
                        j0, j1 = _span(off, sw, W, OW)
                        wv = w[o, a, bb]
                        if sw == 1:
                            gs = grow[j0 + off:j1 + off]
                        else:
                            gs = grow[j0 * sw + off:(j1 - 1) * sw + off + 1:sw]
                        ys = gyr[j0:j1]
                        for k in range(j1 - j0):
                            gs[k] += wv * ys[k]


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
    KH, KW, _ = wt.shape
    _, H, W, C = gx.shape
    zero = gy.dtype.type(0.0)
    for t in prange(N * H):
        n = t // H
        r = t - n * H
        g = gx[n, r]
        for q in range(W):
            gq = g[q]
            for c in range(C):
                gq[c] = zero
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
                wr = wt[a, bb]
                for j in range(j0, j1):
                    gq = g[j * sw + off]
                    yp = gy[n, i, j]
                    if M == 1:
                        for c in range(C):
                            gq[c] += wr[c] * yp[c]
                    else:
                        for c in range(C):
                            s = zero
                            for m in range(M):
                                s += wr[c * M + m] * yp[c * M + m]
                            gq[c] += s


# ----------------------------------------------------------------------------- depthwise grad_weight


@njit(parallel=True, cache=True, fastmath=_FM_SUM)
def _dw_grad_weight_nchw(x, gy, part, M, sh, sw, dh, dw, pt, pl):
    """Depthwise grad_weight, NCHW, stage 1: one float64 partial per (n, o) plane.

    x:        (N, C, H, W) input
    gy:       (N, C*M, OH, OW) output gradient
    part:     (N, C*M, KH, KW) float64 partial sums, fully written (stage 2: sum over n)
    M, sh, sw, dh, dw, pt, pl: as in _dw_forward_nchw
    Each output row's dot product is summed in the input dtype (vectorized), rows in float64.
    """
    N, C, H, W = x.shape
    _, CO, OH, OW = gy.shape
    KH, KW = part.shape[2], part.shape[3]
    zero = x.dtype.type(0.0)
    for t in prange(N * CO):
        n = t // CO
        o = t - n * CO
        c = o // M
        for a in range(KH):
            for bb in range(KW):
                off = bb * dw - pl
                j0, j1 = _span(off, sw, W, OW)
                total = 0.0
                for i in range(OH):
                    r = i * sh - pt + a * dh
                    if r < 0 or r >= H:
                        continue
                    xr = x[n, c, r]
                    if sw == 1:
                        xs = xr[j0 + off:j1 + off]
                    else:
                        xs = xr[j0 * sw + off:(j1 - 1) * sw + off + 1:sw]
                    ys = gy[n, o, i, j0:j1]
                    s = zero
                    for k in range(j1 - j0):
                        s += ys[k] * xs[k]
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
    N, H, W, C = x.shape
    _, OH, OW, CO = gy.shape
    T, KH, KW = part.shape[0], part.shape[1], part.shape[2]
    rows = N * OH
    per = (rows + T - 1) // T
    zero = x.dtype.type(0.0)
    for t in prange(T):
        p = part[t]
        for a in range(KH):
            for bb in range(KW):
                for o in range(CO):
                    p[a, bb, o] = 0.0
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
                        xp = x[n, r, j * sw + off]
                        yp = gy[n, i, j]
                        if M == 1:
                            for o in range(CO):
                                acc[o] += yp[o] * xp[o]
                        else:
                            for c in range(C):
                                xv = xp[c]
                                for m in range(M):
                                    acc[c * M + m] += yp[c * M + m] * xv
                    pab = p[a, bb]
                    for o in range(CO):
                        pab[o] += acc[o]


# ----------------------------------------------------------------------------- pointwise epilogues


@njit(parallel=True, cache=True, fastmath=_FM)
def _epilogue_nchw(t, b, res, y, n0, k0, has_bias, has_res, act):
    """y[n0 + n, o, k0 + k] = act(t[n, o, k] + b[o]) + res[n0 + n, o, k0 + k]  (NCHW, flat H*W).

    t:        (Nc, CO, K) GEMM result of a chunk (may be ``y`` itself when n0 = k0 = 0)
    b:        (CO,) bias (read only if has_bias)
    res:      (N, CO, HW) residual (read only if has_res)
    y:        (N, CO, HW) output
    n0, k0:   where the chunk starts in y (image, flat pixel)
    act:      activation code
    """
    Nc, CO, K = t.shape
    zero = t.dtype.type(0.0)
    for task in prange(Nc * CO):
        n = task // CO
        o = task - n * CO
        tr = t[n, o]
        yr = y[n0 + n, o, k0:k0 + K]
        bias = b[o] if has_bias else zero
        buf = np.empty(K, t.dtype)
        for k in range(K):
            buf[k] = tr[k] + bias
        _activate(buf, act)
        if has_res:
            rr = res[n0 + n, o, k0:k0 + K]
            for k in range(K):
                yr[k] = buf[k] + rr[k]
        else:
            for k in range(K):
                yr[k] = buf[k]


@njit(parallel=True, cache=True, fastmath=_FM)
def _epilogue_nhwc(t, b, res, y, p0, has_bias, has_res, act):
    """y[p0 + p, o] = act(t[p, o] + b[o]) + res[p0 + p, o]  (NHWC, pixels flattened).

    t:        (P, CO) GEMM result of a chunk of pixels (may be ``y`` itself when p0 = 0)
    b:        (CO,) bias (read only if has_bias)
    res:      (NHW, CO) residual (read only if has_res)
    y:        (NHW, CO) output
    p0:       first pixel of the chunk in y
    act:      activation code
    Tasks are blocks of BLOCK pixels so each task's rows are contiguous.
    """
    P, CO = t.shape
    BLOCK = 64
    nblk = (P + BLOCK - 1) // BLOCK
    for blk in prange(nblk):
        s = blk * BLOCK
        e = min(P, s + BLOCK)
        buf = t[s:e].reshape((e - s) * CO)
        tmp = np.empty((e - s) * CO, t.dtype)
        for p in range(e - s):
            for o in range(CO):
                tmp[p * CO + o] = buf[p * CO + o] + b[o] if has_bias else buf[p * CO + o]
        _activate(tmp, act)
        yr = y[p0 + s:p0 + e].reshape((e - s) * CO)
        if has_res:
            rr = res[p0 + s:p0 + e].reshape((e - s) * CO)
            for k in range((e - s) * CO):
                yr[k] = tmp[k] + rr[k]
        else:
            for k in range((e - s) * CO):
                yr[k] = tmp[k]


# ----------------------------------------------------------------------------- the backend


def _compute_dtype(dtype: str):
    """float64 stays float64; float32, float16 and bfloat16 compute in float32."""
    return np.dtype(np.float64) if dtype == "float64" else np.dtype(np.float32)


def _as(a, dt):
    """``a`` as a C-contiguous array of dtype ``dt`` (no copy when it already is one)."""
    return None if a is None else np.ascontiguousarray(a, dtype=dt)


def _target(out, dt):
    """The array a kernel writes: ``out`` itself, or a ``dt`` temporary for 16-bit outputs."""
    return out if out.dtype == dt else np.empty(out.shape, dt)


def _finish(out, target):
    """Round the float32 temporary once into a 16-bit ``out``."""
    if target is not out:
        out[...] = target


def _dummy(dt, ndim=1):
    return np.zeros((1,) * ndim, dt)


def _dw_weights(p, w, dt):
    """(C*M, 1, KH, KW) -> (C*M, KH, KW) for NCHW kernels, (KH, KW, C*M) for NHWC kernels."""
    w3 = _as(w, dt).reshape(p.CO, p.KH, p.KW)
    return w3 if p.layout == "NCHW" else np.ascontiguousarray(w3.transpose(1, 2, 0))


def _geometry(p):
    return (p.M, p.sh, p.sw, p.dh, p.dw, p.pt, p.pl)


def _depthwise_rows(p, x, wk, b, out, i0):
    """Depthwise forward of output rows [i0, i0 + R) into ``out`` (R rows), dtype of ``x``."""
    bias = b if b is not None else _dummy(x.dtype)
    kernel = _dw_forward_nchw if p.layout == "NCHW" else _dw_forward_nhwc
    kernel(x, wk, bias, out, *_geometry(p), i0, b is not None, ACT_CODES[p.activation])


class _CpuBackend(HostBackend):
    """Numba CPU kernels; arrays arrive C-contiguous in the problem's layout (see Backend)."""

    name = "cpu"

    def unavailable_reason(self):
        return None if _IMPORT_ERROR is None else f"numba cannot be imported ({_IMPORT_ERROR})"

    # -- depthwise

    def depthwise_forward(self, p, x, w, b, out, stream=None):
        """x: p.x_shape, w: (C*M, 1, KH, KW), b: (C*M,) or None, out: p.y_shape."""
        dt = _compute_dtype(p.dtype)
        target = _target(out, dt)
        _depthwise_rows(p, _as(x, dt), _dw_weights(p, w, dt), _as(b, dt), target, 0)
        _finish(out, target)

    def depthwise_grad_input(self, p, gy, w, out, stream=None):
        """gy: p.y_shape, w: (C*M, 1, KH, KW), out: p.x_shape."""
        dt = _compute_dtype(p.dtype)
        target = _target(out, dt)
        kernel = _dw_grad_input_nchw if p.layout == "NCHW" else _dw_grad_input_nhwc
        kernel(_as(gy, dt), _dw_weights(p, w, dt), target, *_geometry(p))
        _finish(out, target)

    def depthwise_grad_weight(self, p, x, gy, out, stream=None):
        """x: p.x_shape, gy: p.y_shape, out: (C*M, 1, KH, KW)."""
        dt = _compute_dtype(p.dtype)
        x, gy = _as(x, dt), _as(gy, dt)
        if p.layout == "NCHW":
            part = np.empty((p.N, p.CO, p.KH, p.KW), np.float64)
            _dw_grad_weight_nchw(x, gy, part, *_geometry(p))
            gw = part.sum(axis=0)
        else:
            part = np.empty((min(GW_TASKS, p.N * p.OH), p.KH, p.KW, p.CO), np.float64)
            _dw_grad_weight_nhwc(x, gy, part, *_geometry(p))
            gw = part.sum(axis=0).transpose(2, 0, 1)
        out[...] = gw.reshape(out.shape)  # float64 partial sums, rounded once

    # -- pointwise

    def _pointwise(self, p, x, w, b, residual, y, n0=0, k0=0):
        """GEMM then fused epilogue for images or a chunk; x, w, y in the compute dtype.

        NCHW: x (Nc, CI, K) -> y3[n0:n0+Nc, :, k0:k0+K];  NHWC: x (P, CI) -> y2[k0:k0+P].
        """
        dt = x.dtype
        bias = b if b is not None else _dummy(dt)
        act = ACT_CODES[p.activation]
        if p.layout == "NCHW":
            Nc, _, K = x.shape
            full = n0 == 0 and k0 == 0 and Nc == y.shape[0] and K == y.shape[2]
            t = y if full else np.empty((Nc, p.CO, K), dt)
            np.matmul(w, x, out=t)
            if p.has_bias or p.has_residual or act:
                res = residual if residual is not None else _dummy(dt, 3)
                _epilogue_nchw(t, bias, res, y, n0, k0, b is not None, residual is not None, act)
            elif not full:
                y[n0:n0 + Nc, :, k0:k0 + K] = t
        else:
            P = x.shape[0]
            full = k0 == 0 and P == y.shape[0]
            t = y if full else np.empty((P, p.CO), dt)
            np.matmul(x, w.T, out=t)
            if p.has_bias or p.has_residual or act:
                res = residual if residual is not None else _dummy(dt, 2)
                _epilogue_nhwc(t, bias, res, y, k0, b is not None, residual is not None, act)
            elif not full:
                y[k0:k0 + P] = t

    def _flat(self, p, a):
        """Physical (N, C, H, W) -> (N, C, H*W); (N, H, W, C) -> (N*H*W, C). Views."""
        if p.layout == "NCHW":
            return a.reshape(a.shape[0], a.shape[1], -1)
        return a.reshape(-1, a.shape[-1])

    def pointwise_forward(self, p, x, w, b, residual, out, stream=None):
        """x: p.x_shape, w: (CO, CI), b: (CO,) or None, residual: p.y_shape or None."""
        dt = _compute_dtype(p.dtype)
        target = _target(out, dt)
        res = None if residual is None else self._flat(p, _as(residual, dt))
        self._pointwise(p, self._flat(p, _as(x, dt)), _as(w, dt), _as(b, dt), res,
                        self._flat(p, target))
        _finish(out, target)

    def pointwise_grad_input(self, p, gy, w, out, stream=None):
        """gy: p.y_shape, w: (CO, CI), out: p.x_shape;  gx = W^T gy over channels."""
        dt = _compute_dtype(p.dtype)
        target = _target(out, dt)
        g, w2, t = self._flat(p, _as(gy, dt)), _as(w, dt), self._flat(p, target)
        if p.layout == "NCHW":
            np.matmul(w2.T, g, out=t)
        else:
            np.matmul(g, w2, out=t)
        _finish(out, target)

    def pointwise_grad_weight(self, p, x, gy, out, stream=None):
        """x: p.x_shape, gy: p.y_shape, out: (CO, CI);  gW = sum over pixels of gy x^T.

        Products over at most GW_ROWS pixels are summed by BLAS in the compute dtype, the chunk
        results in float64.
        """
        dt = _compute_dtype(p.dtype)
        xf, gf = self._flat(p, _as(x, dt)), self._flat(p, _as(gy, dt))
        total = np.zeros((p.CO, p.CI), np.float64)
        if p.layout == "NCHW":
            for n in range(p.N):
                for k in range(0, xf.shape[2], GW_ROWS):
                    total += gf[n, :, k:k + GW_ROWS] @ xf[n, :, k:k + GW_ROWS].T
        else:
            for k in range(0, xf.shape[0], GW_ROWS):
                total += gf[k:k + GW_ROWS].T @ xf[k:k + GW_ROWS]
        out[...] = total  # rounded once from float64

    # -- separable

    def separable_forward(self, p, x, dw_w, pw_w, b, dw_b, residual, out, stream=None):
        """x: p.x_shape, dw_w: (C*M, 1, KH, KW), pw_w: (CO, C*M), b: (CO,), dw_b: (C*M,),
        residual: p.y_shape or None, out: p.y_shape.

        Chunks of output rows of one image (NCHW) or of consecutive pixels (NHWC): depthwise
        into a temporary of about CHUNK_BYTES, then GEMM and fused epilogue into ``out``.
        """
        d, q = p.dw, p.pw
        dt = _compute_dtype(d.dtype)
        target = _target(out, dt)
        x = _as(x, dt)
        wk = _dw_weights(d, dw_w, dt)
        dwb = _as(dw_b, dt)
        pw = _as(pw_w, dt)
        bias = _as(b, dt)
        res = None if residual is None else self._flat(q, _as(residual, dt))
        y = self._flat(q, target)
        row_bytes = d.CO * d.OW * dt.itemsize
        rows = max(1, min(d.OH, CHUNK_BYTES // row_bytes))
        if d.layout == "NCHW":
            # chunks: rows of one image; or whole images when an image is smaller than a chunk
            imgs = max(1, CHUNK_BYTES // (row_bytes * d.OH)) if rows == d.OH else 1
            for n0 in range(0, d.N, imgs):
                nc = min(imgs, d.N - n0)
                for i0 in range(0, d.OH, rows):
                    r = min(rows, d.OH - i0)
                    mid = np.empty((nc, d.CO, r, d.OW), dt)
                    _depthwise_rows(d, x[n0:n0 + nc], wk, dwb, mid, i0)
                    self._pointwise(q, mid.reshape(nc, d.CO, r * d.OW), pw, bias, res, y,
                                    n0, i0 * d.OW)
        else:
            imgs = max(1, CHUNK_BYTES // (row_bytes * d.OH)) if rows == d.OH else 1
            for n0 in range(0, d.N, imgs):
                nc = min(imgs, d.N - n0)
                for i0 in range(0, d.OH, rows):
                    r = min(rows, d.OH - i0)
                    mid = np.empty((nc, r, d.OW, d.CO), dt)
                    _depthwise_rows(d, x[n0:n0 + nc], wk, dwb, mid, i0)
                    # pixels of a chunk are contiguous in y when it covers whole images or rows
                    # of one image
                    self._pointwise(q, mid.reshape(-1, d.CO), pw, bias, res, y,
                                    0, (n0 * d.OH + i0) * d.OW)
        _finish(out, target)


BACKEND = _CpuBackend()
