"""Depthwise 1-d convolution kernels of the ``"cpu"`` backend (Numba, ``njit(parallel=True)``).

The math (``xp`` = x with ``pl`` values on the left: zeros or the causal ``initial_state``, and
zeros on the right; ``W = d*(K-1)``; ``kmin[n, l]`` the first tap of output ``l`` that reads its
own packed sequence, 0 without ``seq_idx``)::

    forward      y[n, o, l]  = act(b[o] + sum_{k >= kmin[n, l]} w[o, k] * xp[n, o//M, l*s + k*d])
    grad_input   gxp[n, c, q] = sum_{m, k, l : l*s + k*d == q, k >= kmin[n, l]}
                                  w[cM+m, k] * gy[n, cM+m, l]
                 (grad_input = gxp[..., pl:], grad_initial_state = gxp[..., :pl])
    grad_weight  gw[o, k]    = sum_{n, l : k >= kmin[n, l]} gy[n, o, l] * xp[n, o//M, l*s + k*d]
    grad_bias    gb[o]       = sum_{n, l} gy[n, o, l]
    update       y[n, o, t]  = act(b[o] + sum_k w[o, k] * window[n, o//M, t + k]),
                 window = concat(state, x_step), new state = its last K-1 columns

Because ``seq_idx`` is non-decreasing (and only allowed with causal padding, stride 1), the taps
an output keeps are a suffix ``k >= kmin`` of its taps; ``kmin`` is computed per chunk of
outputs (:func:`_kmin`), once for all channels of a task.

Tasks and tiles. NCL (:func:`_forward`, :func:`_backward`): a task is ``(n, block of CB
channels, chunk of TL outputs)``; per channel it copies the padded input span of its chunk
(zeros, ``initial_state`` and ``x`` in one pass, :func:`_fill`) into a scratch row of the compute
dtype, so the tap loops (:func:`_taps`) have no bounds tests at all: taps run in groups of up to
four, one vectorized pass along L over the chunk per group. The result row gets bias and
activation in place and is stored once (:func:`_store`). NLC (:func:`_forward_nlc`,
:func:`_backward_nlc`): a task is a tile of TL output rows x CB input channels; the padded input
rows of the tile are copied once (:func:`_fill_rows`, one column per output channel) and every
output row is a few vectorized multiply-adds along the channels (:func:`_rowgroup`).

Dtypes. float32 and float64 compute in their own precision; float16 and bfloat16 arrive as their
``uint16`` bit patterns and are widened to float32 when a span is copied into its scratch row and
rounded once (round to nearest even) when a result row is stored (:func:`_widen`,
:func:`_narrow`): the only extra memory of a call is its output and per-task scratch rows.

Backward is one pass: per task and channel the padded ``grad_output`` span of the chunk gives
``grad_input`` / ``grad_initial_state`` (at stride 1 a forward pass over it with the filters
flipped; otherwise one strided scatter per tap into the task's own scratch row), and
``grad_weight`` / ``grad_bias`` as float32 dot products over the chunk, added to a float64
partial of the task. The partials are summed in a fixed order afterwards, so the result does not
depend on the thread count.
"""

from __future__ import annotations

import numpy as np

from ._cpu_common import _FM, _FM_SUM, ACT_CODES, _activate, _as, _compute_dtype, _opt

try:
    from llvmlite import ir
    from numba import njit, prange, types
    from numba import uint64 as _u
    from numba.extending import intrinsic, overload
except ImportError:  # pragma: no cover - cpu.py reports the backend unavailable
    pass

# Outputs per chunk and channels per task, by layout.
NCL_TL = 2048
NLC_TL = 64
NLC_CB = 256
# NCL with seq_idx: channels per task sharing one kmin computation.
NCL_SEQ_CB = 8
# NLC backward: a task runs up to NLC_GROUP chunks (one float64 partial of the weight gradient
# per group, so the partials stay small next to the arrays), as long as there are at least
# NLC_MIN_TASKS tasks. Both depend on the problem only, so the sums do not depend on threads.
NLC_GROUP = 32
NLC_MIN_TASKS = 64

# dtype kind passed to the kernels: 0 native float, 1 float16 bits, 2 bfloat16 bits
_KIND = {"float16": 1, "bfloat16": 2}


# ----------------------------------------------------------------------------- 16-bit conversion


# float16 conversions in integer arithmetic (and one exact float add), not LLVM's ``half`` type:
# without the F16C instructions LLVM lowers ``half`` conversions to compiler-rt calls that Numba's
# JIT cannot link, so this form is what runs on any x86-64 CPU (and vectorizes like the rest).


def _i32(v):
    """An i32 IR constant."""
    return ir.Constant(ir.IntType(32), v)


@intrinsic
def _h2f(typingctx, v):
    """float16 bits (uint16) -> float32 (exact, NaN payload and sign kept)."""
    def codegen(context, builder, signature, args):
        i32, f32 = ir.IntType(32), ir.FloatType()
        c = _i32

        h = builder.zext(args[0], i32)
        sign = builder.shl(builder.and_(h, c(0x8000)), c(16))
        o = builder.shl(builder.and_(h, c(0x7FFF)), c(13))  # exponent and mantissa in place
        exp = builder.and_(o, c(0x0F800000))
        o = builder.add(o, c(112 << 23))  # rebias 15 -> 127
        special = builder.icmp_unsigned("==", exp, c(0x0F800000))  # inf / NaN: exponent 255
        o_special = builder.add(o, c(112 << 23))
        # zero / subnormal: set the implicit bit, then subtract 2**-14 (exact)
        o_sub = builder.fsub(builder.bitcast(builder.add(o, c(1 << 23)), f32),
                             ir.Constant(f32, 2.0 ** -14))
        sub = builder.icmp_unsigned("==", exp, c(0))
        bits = builder.select(special, o_special, o)
        bits = builder.select(sub, builder.bitcast(o_sub, i32), bits)
        return builder.bitcast(builder.or_(bits, sign), f32)

    return types.float32(types.uint16), codegen


@intrinsic
def _f2h(typingctx, v):
    """float32 -> float16 bits (uint16), rounded to nearest even (IEEE, as NumPy's astype);
    overflow gives infinity, NaN a quiet NaN."""
    def codegen(context, builder, signature, args):
        i32, f32 = ir.IntType(32), ir.FloatType()
        c = _i32

        u = builder.bitcast(args[0], i32)
        sign = builder.lshr(builder.and_(u, c(0x80000000)), c(16))
        a = builder.and_(u, c(0x7FFFFFFF))
        # |f| >= 65536 (after rounding, inf), inf, NaN
        big = builder.icmp_unsigned(">=", a, c(0x47800000))
        o_big = builder.select(builder.icmp_unsigned(">", a, c(0x7F800000)), c(0x7E00), c(0x7C00))
        # |f| < 2**-14: subnormal half; adding 0.5 rounds the mantissa in place (to nearest even)
        small = builder.icmp_unsigned("<", a, c(113 << 23))
        o_small = builder.sub(builder.bitcast(builder.fadd(builder.bitcast(a, f32),
                                                           ir.Constant(f32, 0.5)), i32),
                              c(126 << 23))
        # normal: rebias 127 -> 15 and round the 13 dropped bits to nearest even
        odd = builder.and_(builder.lshr(a, c(13)), c(1))
        o_norm = builder.lshr(builder.add(builder.add(a, c(((15 - 127) << 23) + 0xFFF)), odd),
                              c(13))
        o = builder.select(big, o_big, builder.select(small, o_small, o_norm))
        return builder.trunc(builder.or_(o, sign), ir.IntType(16))

    return types.uint16(types.float32), codegen


@intrinsic
def _b2f(typingctx, v):
    """bfloat16 bits (uint16) -> float32 (exact: the high half of the float32 pattern)."""
    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        u = builder.shl(builder.zext(args[0], i32), ir.Constant(i32, 16))
        return builder.bitcast(u, ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _f2b(typingctx, v):
    """float32 -> bfloat16 bits (uint16), rounded to nearest even; NaN stays a (quiet) NaN."""
    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        f = args[0]
        u = builder.bitcast(f, i32)
        hi = builder.lshr(u, ir.Constant(i32, 16))
        odd = builder.and_(hi, ir.Constant(i32, 1))
        r = builder.lshr(builder.add(builder.add(u, ir.Constant(i32, 0x7FFF)), odd),
                         ir.Constant(i32, 16))
        nan = builder.or_(hi, ir.Constant(i32, 0x40))
        isnan = builder.fcmp_unordered("uno", f, f)
        return builder.trunc(builder.select(isnan, nan, r), ir.IntType(16))

    return types.uint16(types.float32), codegen


def _widen(v, kind):
    """An element of an input array as the compute dtype (float arrays: itself)."""


def _narrow(v, arr, kind):
    """A compute-dtype value as an element of ``arr``'s dtype (16-bit: rounded bits)."""


@overload(_widen)
def _widen_impl(v, kind):
    if isinstance(v, types.Float):
        return lambda v, kind: v

    def impl(v, kind):
        if kind == 1:
            return _h2f(v)
        return _b2f(v)

    return impl


@overload(_narrow)
def _narrow_impl(v, arr, kind):
    if isinstance(arr.dtype, types.Float):
        return lambda v, arr, kind: v

    def impl(v, arr, kind):
        if kind == 1:
            return _f2h(np.float32(v))
        return _f2b(np.float32(v))

    return impl


# ----------------------------------------------------------------------------- row helpers


@njit(cache=True, inline="always")
def _fill(x, st, row, base, sbase, q0, span, pl, L, has_state, kind):
    """row[i] = xp[q0 + i] for i < span: the padded input of one (n, c) row.

    x:      flat input; the row's element l is x[base + l]
    st:     flat initial state; its element q < pl is st[sbase + q] (read if has_state)
    """
    zero = row.dtype.type(0.0)
    a = min(span, max(0, pl - q0))          # [0, a): left padding
    e = min(span, max(0, pl + L - q0))      # [a, e): x;  [e, span): right padding
    for i in range(a):
        row[i] = _widen(st[_u(sbase + q0 + i)], kind) if has_state else zero
    if e > a:  # 0-based loop over views: LLVM vectorizes it (not one from a with an offset)
        xv = x[base + q0 - pl + a:base + q0 - pl + e]
        rv = row[a:e]
        for i in range(e - a):
            rv[i] = _widen(xv[i], kind)
    for i in range(e, span):
        row[i] = zero


@njit(cache=True, inline="always")
def _store(acc, n, out, base, ostride, kind):
    """out[base + i*ostride] = acc[i] for i < n, rounded to out's dtype."""
    if ostride == 1:
        ov = out[base:base + n]
        for i in range(n):
            ov[i] = _narrow(acc[i], out, kind)
    else:
        for i in range(n):
            out[_u(base + i * ostride)] = _narrow(acc[i], out, kind)


@njit(cache=True, fastmath=_FM)
def _taps(src, s, d, w, o, n, acc):
    """acc[i] += sum_k w[o, k] * src[i*s + k*d] for i < n (groups of up to 4 taps per pass)."""
    K = w.shape[1]
    k = 0
    while k < K:
        g = min(4, K - k)
        a0 = k * d
        if g == 4:
            w0, w1, w2, w3 = w[o, k], w[o, k + 1], w[o, k + 2], w[o, k + 3]
            a1, a2, a3 = a0 + d, a0 + 2 * d, a0 + 3 * d
            if s == 1:
                r0, r1, r2, r3 = src[a0:a0 + n], src[a1:a1 + n], src[a2:a2 + n], src[a3:a3 + n]
                for i in range(n):
                    acc[i] += w0 * r0[i] + w1 * r1[i] + w2 * r2[i] + w3 * r3[i]
            else:
                for i in range(n):
                    j = i * s
                    acc[i] += (w0 * src[_u(a0 + j)] + w1 * src[_u(a1 + j)]
                               + w2 * src[_u(a2 + j)] + w3 * src[_u(a3 + j)])
        elif g == 3:
            w0, w1, w2 = w[o, k], w[o, k + 1], w[o, k + 2]
            a1, a2 = a0 + d, a0 + 2 * d
            if s == 1:
                r0, r1, r2 = src[a0:a0 + n], src[a1:a1 + n], src[a2:a2 + n]
                for i in range(n):
                    acc[i] += w0 * r0[i] + w1 * r1[i] + w2 * r2[i]
            else:
                for i in range(n):
                    j = i * s
                    acc[i] += w0 * src[_u(a0 + j)] + w1 * src[_u(a1 + j)] + w2 * src[_u(a2 + j)]
        elif g == 2:
            w0, w1 = w[o, k], w[o, k + 1]
            a1 = a0 + d
            if s == 1:
                r0, r1 = src[a0:a0 + n], src[a1:a1 + n]
                for i in range(n):
                    acc[i] += w0 * r0[i] + w1 * r1[i]
            else:
                for i in range(n):
                    j = i * s
                    acc[i] += w0 * src[_u(a0 + j)] + w1 * src[_u(a1 + j)]
        else:
            w0 = w[o, k]
            for i in range(n):
                acc[i] += w0 * src[_u(a0 + i * s)]
        k += g


@njit(cache=True, fastmath=_FM)
def _taps_masked(src, d, w, o, n, kmin, acc):
    """acc[i] += sum_{k >= kmin[i]} w[o, k] * src[i + k*d] for i < n (stride 1)."""
    K = w.shape[1]
    for k in range(K):
        wk = w[o, k]
        a = k * d
        for i in range(n):
            if kmin[i] <= k:
                acc[i] += wk * src[_u(a + i)]


@njit(cache=True)
def _kmin(seq, n, l0, nl, K, d, kmin):
    """kmin[i] = the first tap k of output l = l0 + i whose source l - (K-1-k)*d is in l's
    packed sequence (sources before 0 belong to seq[n, 0]); 0 outside [0, L)."""
    L = seq.shape[1]
    s0 = seq[n, 0]
    for i in range(nl):
        l = l0 + i
        if l < 0 or l >= L:
            kmin[i] = 0
            continue
        sl = seq[n, l]
        k = 0
        while k < K - 1:
            src = l - (K - 1 - k) * d
            if (s0 if src < 0 else seq[n, src]) == sl:
                break
            k += 1
        kmin[i] = k


def _tasks(N, C, OL, layout, has_seq):
    """(CB, TL, number of channel blocks, number of chunks)."""
    if layout == "NCL":
        cb, tl = (min(C, NCL_SEQ_CB) if has_seq else 1), NCL_TL
    else:
        cb, tl = min(C, NLC_CB), NLC_TL
    return cb, tl, -(-C // cb), -(-OL // tl)


# ----------------------------------------------------------------------------- forward


@njit(cache=True, fastmath=_FM)
def _scratch_outputs(x, st, w, b, kmin, out, n, c, C, L, M, OL, s, d, pl, la, cnt, has_state,
                     has_bias, has_seq, act, kind, row, acc):
    """Outputs [la, la + cnt) of every output channel of input channel c, NCL, through the
    padded scratch row (kmin: the chunk's first taps, read if has_seq)."""
    K = w.shape[1]
    span = (cnt - 1) * s + d * (K - 1) + 1
    _fill(x, st, row, (n * C + c) * L, (n * C + c) * pl, la * s, span, pl, L, has_state, kind)
    a = acc[:cnt]
    for m in range(M):
        o = c * M + m
        bias = b[o] if has_bias else w.dtype.type(0.0)
        for i in range(cnt):
            a[i] = bias
        if has_seq:
            _taps_masked(row, d, w, o, cnt, kmin, a)
        else:
            _taps(row, s, d, w, o, cnt, a)
        if act != 0:
            _activate(a, act)
        _store(a, cnt, out, (n * C * M + o) * OL + la, 1, kind)


@njit(parallel=True, cache=True, fastmath=_FM)
def _forward(x, st, w, b, seq, out, C, L, M, OL, s, d, pl, has_state, has_bias, has_seq, act,
             kind, CB, TL, nCB, nLC):
    """Depthwise 1-d forward, NCL (see the module docstring).

    x:        flat (N, C, L) input
    st:       flat (N, C, pl) initial state (read if has_state)
    w:        (C*M, K) filters, compute dtype;  b: (C*M,) bias (read if has_bias)
    seq:      (N, L) int32 seq_idx (read if has_seq)
    out:      flat (N, C*M, OL) result
    kind:     0 float arrays, 1 float16 bits, 2 bfloat16 bits
    CB, TL:   channels and outputs per task; nCB, nLC: their counts (tasks: N * nCB * nLC)
    Float arrays without seq_idx: the interior outputs, whose taps all read x, are computed in
    place in ``out`` straight from x; the border outputs (and everything for 16-bit arrays or
    seq_idx) through the padded scratch row (_scratch_outputs).
    """
    K = w.shape[1]
    W = d * (K - 1)
    CO = C * M
    N = out.shape[0] // (CO * OL)
    direct = kind == 0 and not has_seq
    ia = -((-pl) // s)                 # first output whose first tap reads x[0] or later
    ib = (L - 1 + pl - W) // s + 1     # first output whose last tap reads past x[L-1]
    for t in prange(N * nCB * nLC):
        n = t // (nCB * nLC)
        r = t - n * nCB * nLC
        cb = r // nLC
        j = r - cb * nLC
        l0 = j * TL
        le = min(OL, l0 + TL)
        nl = le - l0
        la, lb = le, le                # [l0, la) and [lb, le) via scratch, [la, lb) direct
        if direct:
            la = min(max(ia, l0), le)
            lb = min(max(ib, la), le)
        row = np.empty((nl - 1) * s + W + 1, w.dtype)
        acc = np.empty(nl, w.dtype)
        kmin = np.empty(nl, np.int32)
        if has_seq:
            _kmin(seq, n, l0, nl, K, d, kmin)
        for c in range(cb * CB, min(C, (cb + 1) * CB)):
            if la > l0:
                _scratch_outputs(x, st, w, b, kmin, out, n, c, C, L, M, OL, s, d, pl, l0,
                                 la - l0, has_state, has_bias, has_seq, act, kind, row, acc)
            if le > lb:
                _scratch_outputs(x, st, w, b, kmin, out, n, c, C, L, M, OL, s, d, pl, lb,
                                 le - lb, has_state, has_bias, has_seq, act, kind, row, acc)
            if lb > la:
                xv = x[(n * C + c) * L + la * s - pl:]
                for m in range(M):
                    o = c * M + m
                    ob = (n * CO + o) * OL
                    y = out[ob + la:ob + lb]
                    bias = b[o] if has_bias else w.dtype.type(0.0)
                    for i in range(lb - la):
                        y[i] = bias
                    _taps(xv, s, d, w, o, lb - la, y)
                    if act != 0:
                        _activate(y, act)


# ----------------------------------------------------------------------------- backward


@njit(cache=True, fastmath=_FM_SUM)
def _dots(gs, g_off, row, s, d, K, nl, kmin, k_off, has_seq, part):
    """part[k] += sum_i gs[g_off + i] * row[i*s + k*d] (i < nl, masked by kmin[k_off + i] <= k);
    part[K] += sum_i gs[g_off + i]. Sums in the compute dtype per chunk, float64 across; at
    stride 1 without seq_idx four taps share one pass."""
    zero = gs.dtype.type(0.0)
    acc = zero
    for i in range(nl):
        acc += gs[_u(g_off + i)]
    part[K] += acc
    k = 0
    while k < K:
        a = k * d
        if s == 1 and not has_seq and k + 4 <= K:
            gv = gs[g_off:g_off + nl]
            r0, r1 = row[a:a + nl], row[a + d:a + d + nl]
            r2, r3 = row[a + 2 * d:a + 2 * d + nl], row[a + 3 * d:a + 3 * d + nl]
            s0 = s1 = s2 = s3 = zero
            for i in range(nl):
                g = gv[i]
                s0 += g * r0[i]
                s1 += g * r1[i]
                s2 += g * r2[i]
                s3 += g * r3[i]
            part[k] += s0
            part[k + 1] += s1
            part[k + 2] += s2
            part[k + 3] += s3
            k += 4
            continue
        acc = zero
        if has_seq:
            for i in range(nl):
                if kmin[_u(k_off + i)] <= k:
                    acc += gs[_u(g_off + i)] * row[_u(a + i)]
        else:
            for i in range(nl):
                acc += gs[_u(g_off + i)] * row[_u(a + i * s)]
        part[k] += acc
        k += 1


@njit(cache=True, fastmath=_FM)
def _scatter(gs, g0, g1, s, d, w, o, q0, q1, gacc):
    """gacc[l*s + k*d - q0] += w[o, k] * gs[l - g0] for every tap k and output l in [g0, g1)
    with l*s + k*d in [q0, q1) (stride > 1)."""
    K = w.shape[1]
    for k in range(K):
        a = k * d
        la = max(g0, -((a - q0) // s))
        lb = min(g1, -((a - q1) // s))
        wk = w[o, k]
        for l in range(la, lb):
            gacc[_u(l * s + a - q0)] += wk * gs[_u(l - g0)]


@njit(cache=True, fastmath=_FM)
def _gx_masked(gs, d, w, o, nq, W, kmin, gacc):
    """gacc[i] += sum_k w[o, k] * gs[i + W - k*d] where kmin[i + W - k*d] <= k (stride 1)."""
    K = w.shape[1]
    for k in range(K):
        wk = w[o, k]
        a = W - k * d
        for i in range(nq):
            if kmin[_u(a + i)] <= k:
                gacc[i] += wk * gs[_u(a + i)]


@njit(parallel=True, cache=True, fastmath=_FM)
def _backward(x, st, gy, w, wf, seq, gx, gst, part, C, L, M, OL, s, d, pl, has_state, has_seq,
              need_gx, need_gst, need_gw, kind, CB, TL, nCB, nLC):
    """Depthwise 1-d backward in one pass, NCL (see the module docstring).

    x, st, seq, w, kind, CB, TL, nCB, nLC: as in _forward (tasks: N * nCB * nLC)
    gy:       flat (N, C*M, OL) grad_output
    wf:       (C*M, K) filters flipped along K (the stride-1 grad_input is a forward pass)
    gx:       flat (N, C, L) grad_input (written if need_gx)
    gst:      flat (N, C, pl) grad_initial_state (written if need_gst)
    part:     (N * nLC, C*M, K + 1) float64: per (n, chunk) the partial grad_weight (k < K) and
              grad_bias (K) of its outputs (written if need_gw)
    Chunk j owns the outputs [j*TL, (j+1)*TL) for grad_weight and the padded input positions
    [j*TL*s, (j+1)*TL*s) for grad_input (the last chunk: up to pl + L).
    """
    K = w.shape[1]
    W = d * (K - 1)
    CO = C * M
    N = gy.shape[0] // (CO * OL)
    QE = pl + L
    for t in prange(N * nCB * nLC):
        n = t // (nCB * nLC)
        r = t - n * nCB * nLC
        cb = r // nLC
        j = r - cb * nLC
        l0 = j * TL
        nl = max(0, min(TL, OL - l0))
        q0 = min(j * TL * s, QE)
        q1 = QE if j == nLC - 1 else min((j + 1) * TL * s, QE)
        nq = q1 - q0
        do_gx = (need_gx and q1 > pl) or (need_gst and q0 < pl)
        # grad_output span [g0, g1) (zeros outside [0, OL)): grad_input needs l in
        # [(q0 - W) / s, q1 / s), grad_weight [l0, l0 + nl)
        g0 = l0 - W // s
        g1 = max(l0 + nl, (q1 - 1) // s + 1) if nq > 0 else l0 + nl
        ng = max(0, g1 - g0)
        gs = np.empty(ng, w.dtype)
        kmin = np.empty(ng, np.int32)
        if has_seq:
            _kmin(seq, n, g0, ng, K, d, kmin)
        span = (nl - 1) * s + W + 1 if nl > 0 else 0
        row = np.empty(span, w.dtype)
        gacc = np.empty(nq, w.dtype)
        zero = w.dtype.type(0.0)
        p = n * nLC + j
        for c in range(cb * CB, min(C, (cb + 1) * CB)):
            if need_gw and nl > 0:
                _fill(x, st, row, (n * C + c) * L, (n * C + c) * pl, l0 * s, span, pl,
                      L, has_state, kind)
            for i in range(nq):
                gacc[i] = zero
            for m in range(M):
                o = c * M + m
                # the padded grad_output span: gs[i] = gy[n, o, g0 + i]
                a = min(ng, max(0, -g0))
                e = min(ng, max(0, OL - g0))
                for i in range(a):
                    gs[i] = zero
                if e > a:
                    gv = gy[(n * CO + o) * OL + g0 + a:(n * CO + o) * OL + g0 + e]
                    sv = gs[a:e]
                    for i in range(e - a):
                        sv[i] = _widen(gv[i], kind)
                for i in range(e, ng):
                    gs[i] = zero
                if do_gx and nq > 0:
                    if has_seq:
                        _gx_masked(gs, d, w, o, nq, W, kmin, gacc)
                    elif s == 1:
                        _taps(gs, 1, d, wf, o, nq, gacc)
                    else:
                        _scatter(gs, g0, g1, s, d, w, o, q0, q1, gacc)
                if need_gw:
                    for k in range(K + 1):
                        part[p, o, k] = 0.0
                    if nl > 0:
                        _dots(gs, l0 - g0, row, s, d, K, nl, kmin, l0 - g0, has_seq, part[p, o])
            if do_gx and nq > 0:
                if need_gst and q0 < pl:
                    e = min(q1, pl)
                    _store(gacc, e - q0, gst, (n * C + c) * pl + q0, 1, kind)
                if need_gx and q1 > pl:
                    a = max(q0, pl)
                    _store(gacc[a - q0:], q1 - a, gx, (n * C + c) * L + a - pl, 1, kind)


# ----------------------------------------------------------------------------- NLC tiles


@njit(cache=True, fastmath=_FM)
def _fill_rows(x, st, xs, n, q0, c0, C, L, M, pl, has_state, kind):
    """xs[r, j] = xp[n, c0 + j // M, q0 + r]: the padded input rows of a tile, one column per
    output channel (channel o0 + j, o0 = c0*M).

    x:   flat (N, L, C) input;  st: flat (N, C, pl) initial state (read if has_state)
    """
    span, nO = xs.shape
    zero = xs.dtype.type(0.0)
    for r in range(span):
        q = q0 + r
        if q < pl and has_state:
            for j in range(nO):
                xs[r, j] = _widen(st[_u((n * C + c0 + j // M) * pl + q)], kind)
        elif pl <= q < pl + L:
            base = (n * L + q - pl) * C + c0
            if M == 1:
                for j in range(nO):
                    xs[r, j] = _widen(x[_u(base + j)], kind)
            else:
                for j in range(nO):
                    xs[r, j] = _widen(x[_u(base + j // M)], kind)
        else:
            for j in range(nO):
                xs[r, j] = zero


@njit(cache=True, fastmath=_FM)
def _rowgroup(acc, src, wt, o0, k, g, ra, rb, rc, rd):
    """acc[j] += sum over the g <= 4 taps k, k+1, ... of wt[tap, o0 + j] * src[row, j], the
    taps' rows being ra, rb, rc, rd (one vectorized pass along the channels)."""
    n = acc.shape[0]
    x0 = src[ra, :n]
    v0 = wt[k, o0:o0 + n]
    if g == 1:
        for j in range(n):
            acc[j] += v0[j] * x0[j]
        return
    x1 = src[rb, :n]
    v1 = wt[k + 1, o0:o0 + n]
    if g == 2:
        for j in range(n):
            acc[j] += v0[j] * x0[j] + v1[j] * x1[j]
        return
    x2 = src[rc, :n]
    v2 = wt[k + 2, o0:o0 + n]
    if g == 3:
        for j in range(n):
            acc[j] += v0[j] * x0[j] + v1[j] * x1[j] + v2[j] * x2[j]
        return
    x3 = src[rd, :n]
    v3 = wt[k + 3, o0:o0 + n]
    for j in range(n):
        acc[j] += v0[j] * x0[j] + v1[j] * x1[j] + v2[j] * x2[j] + v3[j] * x3[j]


@njit(parallel=True, cache=True, fastmath=_FM)
def _forward_nlc(x, st, wt, b, seq, out, C, L, M, OL, s, d, pl, has_state, has_bias, has_seq,
                 act, kind, CB, TL, nCB, nLC):
    """Depthwise 1-d forward, NLC: tiles of TL outputs x CB input channels (CB*M columns), the
    taps vectorized along the channels.

    x:        flat (N, L, C) input;  st: flat (N, C, pl) initial state (read if has_state)
    wt:       (K, C*M) filters, channel last, compute dtype;  b: (C*M,) (read if has_bias)
    seq:      (N, L) int32 seq_idx (read if has_seq)
    out:      flat (N, OL, C*M) result
    kind, act, tasks (N * nLC * nCB): as in _forward
    """
    K = wt.shape[0]
    W = d * (K - 1)
    CO = C * M
    N = out.shape[0] // (CO * OL)
    for t in prange(N * nLC * nCB):
        n = t // (nLC * nCB)
        r = t - n * nLC * nCB
        j = r // nCB
        cb = r - j * nCB
        l0 = j * TL
        nl = min(TL, OL - l0)
        c0 = cb * CB
        o0 = c0 * M
        nO = (min(C, c0 + CB) - c0) * M
        xs = np.empty(((nl - 1) * s + W + 1, nO), wt.dtype)
        _fill_rows(x, st, xs, n, l0 * s, c0, C, L, M, pl, has_state, kind)
        kmin = np.zeros(nl, np.int32)
        if has_seq:
            _kmin(seq, n, l0, nl, K, d, kmin)
        acc = np.empty(nO, wt.dtype)
        for i in range(nl):
            for jj in range(nO):
                acc[jj] = b[o0 + jj] if has_bias else wt.dtype.type(0.0)
            k = kmin[i]
            while k < K:
                g = min(4, K - k)
                ra = i * s + k * d
                _rowgroup(acc, xs, wt, o0, k, g, ra, ra + d, ra + 2 * d, ra + 3 * d)
                k += g
            if act != 0:
                _activate(acc, act)
            _store(acc, nO, out, (n * OL + l0 + i) * CO + o0, 1, kind)


@njit(parallel=True, cache=True, fastmath=_FM)
def _backward_nlc(x, st, gy, wt, seq, gx, gst, part, C, L, M, OL, s, d, pl, has_state, has_seq,
                  need_gx, need_gst, need_gw, kind, CB, TL, nCB, nLC, GC):
    """Depthwise 1-d backward, NLC, in one pass: tiles as in _forward_nlc.

    gy:       flat (N, OL, C*M) grad_output;  gx: flat (N, L, C) (written if need_gx)
    gst, chunks: as in _backward
    part:     (N * ceil(nLC / GC), C*M, K + 1) float64: per (n, group of GC chunks) the partial
              grad_weight and grad_bias; a task runs the GC chunks of a group one after another
    Per tile: the padded grad_output rows gs (zeros outside [0, OL)); grad_input rows are
    vectorized multiply-adds of gs rows (stride 1: gx row i reads gs rows i + W - k*d; otherwise
    each gs row is scattered to the rows l*s + k*d of the task's own scratch); grad_weight and
    grad_bias accumulate per channel column in the compute dtype, then into the float64 partial.
    """
    K = wt.shape[0]
    W = d * (K - 1)
    CO = C * M
    N = gy.shape[0] // (CO * OL)
    QE = pl + L
    zero = wt.dtype.type(0.0)
    nG = -(-nLC // GC)
    for t in prange(N * nG * nCB):
        n = t // (nG * nCB)
        r = t - n * nG * nCB
        grp = r // nCB
        cb = r - grp * nCB
        c0 = cb * CB
        nc = min(C, c0 + CB) - c0
        o0 = c0 * M
        nO = nc * M
        gw = np.empty((K + 1, nO), wt.dtype)
        gw64 = np.zeros((K + 1, nO), np.float64)
        for j in range(grp * GC, min(nLC, (grp + 1) * GC)):
            l0 = j * TL
            nl = max(0, min(TL, OL - l0))
            q0 = min(j * TL * s, QE)
            q1 = QE if j == nLC - 1 else min((j + 1) * TL * s, QE)
            nq = q1 - q0
            do_gx = nq > 0 and ((need_gx and q1 > pl) or (need_gst and q0 < pl))
            g0 = l0 - W // s
            g1 = max(l0 + nl, (q1 - 1) // s + 1) if nq > 0 else l0 + nl
            ng = max(0, g1 - g0)
            gs = np.empty((ng, nO), wt.dtype)
            for rr in range(ng):
                lg = g0 + rr
                if 0 <= lg < OL:
                    base = (n * OL + lg) * CO + o0
                    for jj in range(nO):
                        gs[rr, jj] = _widen(gy[_u(base + jj)], kind)
                else:
                    for jj in range(nO):
                        gs[rr, jj] = zero
            kmin = np.zeros(ng, np.int32)
            if has_seq:
                _kmin(seq, n, g0, ng, K, d, kmin)
            if do_gx:
                gacc = np.zeros((nq, nO), wt.dtype)
                if s == 1:
                    for i in range(nq):
                        row = gacc[i]
                        k = 0
                        while k < K:
                            ra = i + W - k * d
                            if has_seq:
                                if kmin[ra] <= k:
                                    _rowgroup(row, gs, wt, o0, k, 1, ra, 0, 0, 0)
                                k += 1
                            else:
                                g = min(4, K - k)
                                _rowgroup(row, gs, wt, o0, k, g, ra, ra - d, ra - 2 * d,
                                          ra - 3 * d)
                                k += g
                else:
                    for rr in range(ng):
                        for k in range(K):
                            q = (g0 + rr) * s + k * d
                            if q0 <= q < q1:
                                _rowgroup(gacc[q - q0], gs, wt, o0, k, 1, rr, 0, 0, 0)
                for i in range(nq):
                    q = q0 + i
                    if q < pl and not need_gst or q >= pl and not need_gx:
                        continue
                    for cc in range(nc):
                        v = gacc[i, cc * M]
                        for m in range(1, M):
                            v += gacc[i, cc * M + m]
                        if q < pl:
                            gst[_u((n * C + c0 + cc) * pl + q)] = _narrow(v, gst, kind)
                        else:
                            gx[_u((n * L + q - pl) * C + c0 + cc)] = _narrow(v, gx, kind)
            if need_gw and nl > 0:
                for k in range(K + 1):
                    for jj in range(nO):
                        gw[k, jj] = zero
                xs = np.empty(((nl - 1) * s + W + 1, nO), wt.dtype)
                _fill_rows(x, st, xs, n, l0 * s, c0, C, L, M, pl, has_state, kind)
                for i in range(nl):
                    rr = l0 - g0 + i
                    for k in range(K):
                        if kmin[rr] <= k:
                            xr = i * s + k * d
                            for jj in range(nO):
                                gw[k, jj] += gs[rr, jj] * xs[xr, jj]
                    for jj in range(nO):
                        gw[K, jj] += gs[rr, jj]
                for k in range(K + 1):
                    for jj in range(nO):
                        gw64[k, jj] += gw[k, jj]
        if need_gw:
            p = n * nG + grp
            for jj in range(nO):
                for k in range(K + 1):
                    part[p, o0 + jj, k] = gw64[k, jj]


# ----------------------------------------------------------------------------- update


@njit(parallel=True, cache=True, fastmath=_FM)
def _update(x, state, w, b, out, state_out, M, has_bias, act, kind):
    """One decode step (or T steps), in-place safe (state_out may be state).

    x:         (N, C, T) step inputs;  state: (N, C, K-1) last inputs, oldest first
    w:         (C*M, K) filters, compute dtype;  b: (C*M,) bias (read if has_bias)
    out:       (N, C*M, T) result;  state_out: (N, C, K-1) new state (the last K-1 of
               concat(state, x))
    One task per (n, c); it reads its state row before writing it.
    """
    N, C, T = x.shape
    K = w.shape[1]
    for t in prange(N * C):
        n = t // C
        c = t - n * C
        win = np.empty(K - 1 + T, w.dtype)
        raw = np.empty(K - 1 + T, x.dtype)
        for i in range(K - 1):
            raw[i] = state[n, c, i]
        for i in range(T):
            raw[K - 1 + i] = x[n, c, i]
        for i in range(K - 1 + T):
            win[i] = _widen(raw[i], kind)
        acc = np.empty(T, w.dtype)
        for m in range(M):
            o = c * M + m
            bias = b[o] if has_bias else w.dtype.type(0.0)
            for i in range(T):
                acc[i] = bias
            _taps(win, 1, 1, w, o, T, acc)
            if act != 0:
                _activate(acc, act)
            for i in range(T):
                out[n, o, i] = _narrow(acc[i], out, kind)
        for i in range(K - 1):
            state_out[n, c, i] = raw[T + i]


# ----------------------------------------------------------------------------- entry points


def _bits(a):
    """A native array as the kernels take it: float32/float64 as is, 16-bit types as uint16."""
    if a is None:
        return None
    return a.view(np.uint16) if a.dtype.itemsize == 2 else a


def _seq32(seq):
    """seq_idx as int32 with the same equalities and order (run numbers beyond int32)."""
    if seq.dtype == np.int32:
        return seq
    info = np.iinfo(np.int32)
    if seq.size and info.min <= seq.min() and seq.max() <= info.max:
        return seq.astype(np.int32)
    runs = np.zeros(seq.shape, np.int32)
    np.cumsum(np.diff(seq, axis=1) != 0, axis=1, out=runs[:, 1:])
    return runs


def _common(p, w, state, seq):
    dt = _compute_dtype(p.dtype)
    kind = _KIND.get(p.dtype, 0)
    w2 = _as(w, dt).reshape(p.CO, p.K)
    st = _bits(state).reshape(-1) if state is not None else np.zeros(1, _bits_dtype(p))
    sq = _seq32(seq) if seq is not None else np.zeros((1, 1), np.int32)
    return dt, kind, w2, st, sq


def _bits_dtype(p):
    return np.dtype(np.uint16) if p.dtype in _KIND else np.dtype(p.dtype)


def forward(p, x, w, b, state, seq, out, final_out):
    """x: p.x_shape, w: (C*M, 1, K), b: (C*M,) or None, state: (N, C, W) or None,
    seq: (N, L) int or None, out: p.y_shape, final_out: (N, C, W) or None."""
    dt, kind, w2, st, sq = _common(p, w, state, seq)
    cb, tl, ncb, nlc = _tasks(p.N, p.C, p.OL, p.layout, p.has_seq)
    if p.layout == "NLC":
        _forward_nlc(_bits(x).reshape(-1), st, np.ascontiguousarray(w2.T), _opt(b, dt, (p.CO,)),
                     sq, _bits(out).reshape(-1), p.C, p.L, p.M, p.OL, p.s, p.d, p.pl,
                     state is not None, b is not None, seq is not None, ACT_CODES[p.activation],
                     kind, cb, tl, ncb, nlc)
    else:
            _forward(_bits(x).reshape(-1), st, w2, _opt(b, dt, (p.CO,)), sq, _bits(out).reshape(-1),
                 p.C, p.L, p.M, p.OL, p.s, p.d, p.pl, state is not None,
                 b is not None, seq is not None, ACT_CODES[p.activation], kind, cb, tl, ncb,
                 nlc)
    if final_out is not None:
        _final_state(p, x, state, final_out)


def _final_state(p, x, state, final_out):
    """final_out = the last W columns of concat(state or zeros, x) (a copy of input values)."""
    W, L = p.W, p.L
    n = min(W, L)
    xs = x[:, :, L - n:] if p.layout == "NCL" else x[:, L - n:, :].transpose(0, 2, 1)
    final_out[:, :, W - n:] = xs
    if n < W:
        if state is None:
            final_out[:, :, :W - n] = 0
        else:
            final_out[:, :, :W - n] = state[:, :, n:]


def backward(p, x, gy, w, state, seq, gx, gw, gb, gstate):
    """x: p.x_shape, gy: p.y_shape, w: (C*M, 1, K), state: (N, C, W) or None, seq: (N, L) or
    None; outputs (each None when not asked for): gx p.x_shape, gw (C*M, 1, K), gb (C*M,),
    gstate (N, C, W)."""
    dt, kind, w2, st, sq = _common(p, w, state, seq)
    wf = np.ascontiguousarray(w2[:, ::-1])
    cb, tl, ncb, _ = _tasks(p.N, p.C, p.OL, p.layout, p.has_seq)
    nlc = max(-(-p.OL // tl), -(-(p.pl + p.L) // (tl * p.s)))
    need_gw = gw is not None or gb is not None
    rows = p.N * nlc  # partial sums: one per (n, chunk); NLC: per (n, group of gc chunks)
    gc = 1
    if p.layout == "NLC":
        gc = max(1, min(NLC_GROUP, p.N * nlc * ncb // NLC_MIN_TASKS))
        rows = p.N * -(-nlc // gc)
    part = np.empty((rows, p.CO, p.K + 1) if need_gw else (1, 1, 1), np.float64)
    stub = np.zeros(1, _bits_dtype(p))
    gx_ = stub if gx is None else _bits(gx).reshape(-1)
    gst_ = stub if gstate is None else _bits(gstate).reshape(-1)
    flags = (state is not None, seq is not None, gx is not None, gstate is not None, need_gw,
             kind, cb, tl, ncb, nlc)
    if p.layout == "NLC":
        _backward_nlc(_bits(x).reshape(-1), st, _bits(gy).reshape(-1),
                      np.ascontiguousarray(w2.T), sq, gx_, gst_, part, p.C, p.L, p.M, p.OL, p.s,
                      p.d, p.pl, *flags, gc)
    else:
        _backward(_bits(x).reshape(-1), st, _bits(gy).reshape(-1), w2, wf, sq, gx_, gst_, part,
                  p.C, p.L, p.M, p.OL, p.s, p.d, p.pl, *flags)
    if need_gw:
        total = part.sum(axis=0)  # fixed order: float64 partials, rounded once
        if gw is not None:
            gw[...] = total[:, :p.K].reshape(gw.shape)
        if gb is not None:
            gb[...] = total[:, p.K]


def update(p, x, state, w, b, out, state_out):
    """x: (N, C) or (N, C, T), state: (N, C, K-1), w: (C*M, 1, K), b: (C*M,) or None,
    out: p.y_shape, state_out: (N, C, K-1), may be state itself."""
    dt = _compute_dtype(p.dtype)
    kind = _KIND.get(p.dtype, 0)
    _update(_bits(x).reshape(p.N, p.C, p.T), _bits(state), _as(w, dt).reshape(p.CO, p.K),
            _opt(b, dt, (p.CO,)), _bits(out).reshape(p.N, p.CO, p.T), _bits(state_out), p.M,
            b is not None, ACT_CODES[p.activation], kind)
