"""Literal nested-loop oracles, independent of dwops: the definition of each op, element by element.

Deliberately the slowest, plainest form (Python loops over logical NCHW float64 arrays) so the
vectorized reference in dwops.reference can be checked against the definition itself.
"""

from __future__ import annotations

import math

import numpy as np


def act(v: float, activation):
    if activation is None:
        return v
    if activation == "relu":
        return max(v, 0.0) if not math.isnan(v) else v
    if activation == "relu6":
        return min(max(v, 0.0), 6.0) if not math.isnan(v) else v
    if activation == "silu":
        return v / (1.0 + math.exp(-v)) if v > -700 else 0.0 * v
    if activation == "gelu":
        return 0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0)))
    if activation == "hardswish":
        if math.isnan(v) or v == -math.inf:
            return math.nan
        return 0.0 if v <= -3.0 else (v if v >= 3.0 else v * (v + 3.0) / 6.0)
    if activation == "hardsigmoid":
        if math.isnan(v):
            return v
        return 0.0 if v <= -3.0 else (1.0 if v >= 3.0 else (v + 3.0) / 6.0)
    raise ValueError(activation)


def out_size(n, k, s, d, p0, p1):
    return (n + p0 + p1 - d * (k - 1) - 1) // s + 1


def depthwise(x, w, b, stride, dilation, pads, activation=None):
    """x (N, C, H, W), w (C*M, 1, KH, KW), pads (top, bottom, left, right)."""
    n_, c_, h_, w_ = x.shape
    co, _, kh, kw = w.shape
    m = co // c_
    (sh, sw), (dh, dw) = stride, dilation
    pt, pb, pl, pr = pads
    oh, ow = out_size(h_, kh, sh, dh, pt, pb), out_size(w_, kw, sw, dw, pl, pr)
    y = np.zeros((n_, co, oh, ow))
    for n in range(n_):
        for o in range(co):
            for i in range(oh):
                for j in range(ow):
                    s = 0.0
                    for a in range(kh):
                        for bb in range(kw):
                            r, q = i * sh - pt + a * dh, j * sw - pl + bb * dw
                            if 0 <= r < h_ and 0 <= q < w_:
                                s += float(w[o, 0, a, bb]) * float(x[n, o // m, r, q])
                    if b is not None:
                        s += float(b[o])
                    y[n, o, i, j] = act(s, activation)
    return y


def depthwise_grad_input(gy, w, input_shape, stride, dilation, pads):
    """d/dx of sum(gy * depthwise(x, w)): scatter each output's gradient back to its taps."""
    n_, c_, h_, w_ = input_shape
    co, _, kh, kw = w.shape
    m = co // c_
    (sh, sw), (dh, dw) = stride, dilation
    pt, _, pl, _ = pads
    gx = np.zeros(input_shape)
    for n in range(n_):
        for o in range(co):
            for i in range(gy.shape[2]):
                for j in range(gy.shape[3]):
                    for a in range(kh):
                        for bb in range(kw):
                            r, q = i * sh - pt + a * dh, j * sw - pl + bb * dw
                            if 0 <= r < h_ and 0 <= q < w_:
                                gx[n, o // m, r, q] += float(w[o, 0, a, bb]) * float(gy[n, o, i, j])
    return gx


def depthwise_grad_weight(x, gy, weight_shape, stride, dilation, pads):
    n_, c_, h_, w_ = x.shape
    co, _, kh, kw = weight_shape
    m = co // c_
    (sh, sw), (dh, dw) = stride, dilation
    pt, _, pl, _ = pads
    gw = np.zeros(weight_shape)
    for o in range(co):
        for a in range(kh):
            for bb in range(kw):
                s = 0.0
                for n in range(n_):
                    for i in range(gy.shape[2]):
                        for j in range(gy.shape[3]):
                            r, q = i * sh - pt + a * dh, j * sw - pl + bb * dw
                            if 0 <= r < h_ and 0 <= q < w_:
                                s += float(gy[n, o, i, j]) * float(x[n, o // m, r, q])
                gw[o, 0, a, bb] = s
    return gw


def pointwise(x, w, b=None, activation=None, residual=None):
    """x (N, CI, H, W), w (CO, CI)."""
    n_, ci, h_, w_ = x.shape
    co = w.shape[0]
    y = np.zeros((n_, co, h_, w_))
    for n in range(n_):
        for o in range(co):
            for i in range(h_):
                for j in range(w_):
                    s = sum(float(w[o, c]) * float(x[n, c, i, j]) for c in range(ci))
                    if b is not None:
                        s += float(b[o])
                    s = act(s, activation)
                    if residual is not None:
                        s += float(residual[n, o, i, j])
                    y[n, o, i, j] = s
    return y


def depthwise_1d(x, w, b, stride, dilation, pads, activation=None, state=None, seq=None):
    """x (N, C, L), w (C*M, 1, K), pads (left, right); ``state`` (N, C, left) replaces the left
    zeros; ``seq`` (N, L): a tap counts only if its input is in the output's sequence (inputs left
    of position 0 belong to seq[n, 0])."""
    n_, c_, l_ = x.shape
    co, _, k_ = w.shape
    m = co // c_
    pl, pr = pads
    ol = out_size(l_, k_, stride, dilation, pl, pr)
    y = np.zeros((n_, co, ol))
    for n in range(n_):
        for o in range(co):
            c = o // m
            for i in range(ol):
                s = 0.0
                for k in range(k_):
                    pos = i * stride + k * dilation - pl
                    if pos >= l_:
                        continue
                    if pos < 0:
                        v = state[n, c, pos + pl] if state is not None else 0.0
                    else:
                        v = x[n, c, pos]
                    if seq is not None and seq[n, max(pos, 0)] != seq[n, i]:
                        continue
                    s += float(w[o, 0, k]) * float(v)
                if b is not None:
                    s += float(b[o])
                y[n, o, i] = act(s, activation)
    return y
