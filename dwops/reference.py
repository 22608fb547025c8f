"""The NumPy reference: the oracle of every test, written to be obviously right, not fast.

Every function has the signature of its ``dwops`` namesake (without ``backend``), accepts any host
array, computes in float64 in (N, C, H, W) order and rounds once to the input dtype. It is also the
``"numpy"`` backend.

The math, with ``M`` the channel multiplier and ``xp`` the zero-padded input::

    depthwise     y[n, o, i, j]  = sum_{a, b} w[o, 0, a, b] * xp[n, o // M, i*sh + a*dh, j*sw + b*dw]
    grad_input    gx[n, c, p, q] = sum over (o, i, j, a, b) with o // M == c and
                                   (i*sh + a*dh, j*sw + b*dw) == (p + pt, q + pl) of w[o,0,a,b] * gy[n,o,i,j]
    grad_weight   gw[o, 0, a, b] = sum_{n, i, j} gy[n, o, i, j] * xp[n, o // M, i*sh + a*dh, j*sw + b*dw]
    grad_bias     gb[o]          = sum_{n, i, j} gy[n, o, i, j]      (backward: the three composed)
    pointwise     y[n, o, h, w]  = sum_c W[o, c] * x[n, c, h, w]
    its grads     gx = W^T gy over channels;  gW[o, c] = sum_{n, h, w} gy[n, o, h, w] * x[n, c, h, w]
    fused op      y = activation(conv + bias) + residual

Depthwise 1-d, ``xp`` the input with ``pl`` values on the left (zeros, or the causal
``initial_state``) and ``pr`` zeros on the right, ``m[n, l, k]`` the sequence mask (1 without
``seq_idx``)::

    y[n, o, l]    = sum_k w[o, 0, k] * xp[n, o // M, l*s + k*d] * m[n, l, k]
    gxp[n, c, q]  = sum over (o, l, k) with o // M == c and l*s + k*d == q of w[o, 0, k] * gy[n, o, l] * m
                    (grad_input = gxp[..., pl:pl+L], grad_initial_state = gxp[..., :pl])
    gw[o, 0, k]   = sum_{n, l} gy[n, o, l] * xp[n, o // M, l*s + k*d] * m[n, l, k]
    final_state   = the last d*(K-1) columns of concat(initial_state or zeros, x)
    update        window = concat(state, x_step); y[n, o, t] = sum_k w[o, 0, k] * window[n, o // M, t + k]
"""

from __future__ import annotations

import math

import numpy as np

from ._registry import HostBackend

__all__ = [
    "depthwise_conv2d", "depthwise_conv2d_grad_input", "depthwise_conv2d_grad_weight",
    "depthwise_conv2d_backward",
    "pointwise_conv2d", "pointwise_conv2d_grad_input", "pointwise_conv2d_grad_weight",
    "separable_conv2d", "depthwise_conv1d", "depthwise_conv1d_backward",
    "depthwise_conv1d_update", "activate", "activation_derivative",
]

_erf = np.vectorize(math.erf, otypes=[np.float64])


def activate(y: np.ndarray, activation: str | None) -> np.ndarray:
    """The activation functions, in float64."""
    if activation is None:
        return y
    if activation == "relu":
        return np.maximum(y, 0.0)  # np.maximum/np.minimum propagate NaN
    if activation == "relu6":
        return np.minimum(np.maximum(y, 0.0), 6.0)
    with np.errstate(over="ignore", invalid="ignore"):
        if activation == "silu":
            return y / (1.0 + np.exp(-y))
        if activation == "gelu":
            return 0.5 * y * (1.0 + _erf(y / math.sqrt(2.0)))
        if activation == "hardswish":  # x * relu6(x + 3) / 6; -inf * 0 is NaN, as in PyTorch
            return y * np.minimum(np.maximum(y + 3.0, 0.0), 6.0) / 6.0
        if activation == "hardsigmoid":  # relu6(x + 3) / 6
            return np.minimum(np.maximum(y + 3.0, 0.0), 6.0) / 6.0
    raise ValueError(activation)


def activation_derivative(activation: str | None, z) -> np.ndarray:
    """The derivative ``act'(z)`` of :func:`activate`, in float64.

    At the kinks it takes PyTorch autograd's values: relu 0 at 0; relu6 0 at 0 and 6; hardswish
    ``z/3 + 1/2`` on the open interval (-3, 3), 0 at and below -3, 1 at and above 3; hardsigmoid
    1/6 on (-3, 3), 0 at and beyond both ends. NaN gives 0 for relu, relu6 and hardsigmoid (their
    masks are false) and NaN for silu, gelu and hardswish.
    """
    z = np.asarray(z, dtype=np.float64)
    if activation is None:
        return np.ones_like(z)
    if activation == "relu":
        return np.where(z > 0.0, 1.0, 0.0)
    if activation == "relu6":
        return np.where((z > 0.0) & (z < 6.0), 1.0, 0.0)
    if activation == "hardsigmoid":
        return np.where((z > -3.0) & (z < 3.0), 1.0 / 6.0, 0.0)
    if activation == "hardswish":
        return np.where(z <= -3.0, 0.0, np.where(z >= 3.0, 1.0, z / 3.0 + 0.5))
    with np.errstate(over="ignore", invalid="ignore"):
        if activation == "silu":
            s = 1.0 / (1.0 + np.exp(-z))
            return s * (1.0 + z * (1.0 - s))
        if activation == "gelu":
            return 0.5 * (1.0 + _erf(z / math.sqrt(2.0))) + z * np.exp(-0.5 * z * z) / math.sqrt(
                2.0 * math.pi)
    raise ValueError(activation)


def _nchw(a: np.ndarray, layout: str) -> np.ndarray:
    """float64 copy of a physical array in (N, C, H, W) order."""
    a = np.asarray(a).astype(np.float64)
    return a if layout == "NCHW" else a.transpose(0, 3, 1, 2)


def _physical(a: np.ndarray, layout: str) -> np.ndarray:
    return a if layout == "NCHW" else a.transpose(0, 2, 3, 1)


def _taps(p):
    """For each kernel tap (a, b): the slices of the padded input that meet the outputs."""
    for a in range(p.KH):
        for b in range(p.KW):
            rows = slice(a * p.dh, a * p.dh + p.sh * (p.OH - 1) + 1, p.sh)
            cols = slice(b * p.dw, b * p.dw + p.sw * (p.OW - 1) + 1, p.sw)
            yield a, b, rows, cols


def _padded(p, x64: np.ndarray) -> np.ndarray:
    """Zero-pad (N, C, H, W) and repeat each channel M times, so output channel o reads xp[:, o]."""
    xp = np.pad(x64, ((0, 0), (0, 0), (p.pt, p.pb), (p.pl, p.pr)))
    return np.repeat(xp, p.M, axis=1)


def _depthwise64(p, x64, w64, b64):
    xp = _padded(p, x64)
    y = np.zeros((p.N, p.CO, p.OH, p.OW))
    for a, b, rows, cols in _taps(p):
        y += w64[None, :, 0, a, b, None, None] * xp[:, :, rows, cols]
    if b64 is not None:
        y += b64[None, :, None, None]
    return activate(y, p.activation)


def _depthwise_grad_input64(p, gy64, w64):
    gxp = np.zeros((p.N, p.CO, p.H + p.pt + p.pb, p.W + p.pl + p.pr))
    for a, b, rows, cols in _taps(p):
        gxp[:, :, rows, cols] += w64[None, :, 0, a, b, None, None] * gy64
    gxp = gxp.reshape(p.N, p.C, p.M, *gxp.shape[2:]).sum(axis=2)
    return gxp[:, :, p.pt:p.pt + p.H, p.pl:p.pl + p.W]


def _depthwise_grad_weight64(p, x64, gy64):
    xp = _padded(p, x64)
    gw = np.zeros(p.w_shape)
    for a, b, rows, cols in _taps(p):
        gw[:, 0, a, b] = (gy64 * xp[:, :, rows, cols]).sum(axis=(0, 2, 3))
    return gw


def _pointwise64(p, x64, w64, b64, r64):
    y = np.einsum("oc,nchw->nohw", w64, x64)
    if b64 is not None:
        y = y + b64[None, :, None, None]
    y = activate(y, p.activation)
    return y if r64 is None else y + r64


def _ncl(a: np.ndarray, layout: str) -> np.ndarray:
    """float64 copy of a physical 1-d array in (N, C, L) order."""
    a = np.asarray(a).astype(np.float64)
    return a if layout == "NCL" else a.transpose(0, 2, 1)


def _physical_1d(a: np.ndarray, layout: str) -> np.ndarray:
    return a if layout == "NCL" else a.transpose(0, 2, 1)


def _conv1d_left(p, x64, s64):
    """(N, C, pl + L) input with its left padding: zeros, or the causal initial state."""
    left = s64 if s64 is not None else np.zeros((p.N, p.C, p.pl))
    return np.concatenate([left, x64], axis=2)


def _conv1d_taps(p, seq):
    """For each tap k: the slice of the padded input that meets the outputs, and its mask."""
    for k in range(p.K):
        cols = slice(k * p.d, k * p.d + p.s * (p.OL - 1) + 1, p.s)
        mask = None
        if seq is not None:  # causal, stride 1: output l reads input l - (K-1-k)*d
            src = np.arange(p.OL) - (p.K - 1 - k) * p.d
            seq_src = seq[:, np.maximum(src, 0)]
            seq_src[:, src < 0] = seq[:, :1]
            mask = (seq_src == seq[:, :p.OL])[:, None, :].astype(np.float64)
        yield k, cols, mask


def _conv1d64(p, x64, w64, b64, s64, seq):
    xl = _conv1d_left(p, x64, s64)
    xp = np.repeat(np.pad(xl, ((0, 0), (0, 0), (0, p.pr))), p.M, axis=1)
    y = np.zeros((p.N, p.CO, p.OL))
    for k, cols, mask in _conv1d_taps(p, seq):
        term = w64[None, :, 0, k, None] * xp[:, :, cols]
        y += term if mask is None else term * mask
    if b64 is not None:
        y += b64[None, :, None]
    final = xl[:, :, xl.shape[2] - p.W:] if p.final_state else None
    return activate(y, p.activation), final


def _conv1d_backward64(p, x64, gy64, w64, s64, seq):
    """(grad_input, grad_weight, grad_bias, grad_initial_state), all in float64."""
    xl = _conv1d_left(p, x64, s64)
    xp = np.repeat(np.pad(xl, ((0, 0), (0, 0), (0, p.pr))), p.M, axis=1)
    gxp = np.zeros((p.N, p.CO, xp.shape[2]))
    gw = np.zeros(p.w_shape)
    for k, cols, mask in _conv1d_taps(p, seq):
        g = gy64 if mask is None else gy64 * mask
        gxp[:, :, cols] += w64[None, :, 0, k, None] * g
        gw[:, 0, k] = (g * xp[:, :, cols]).sum(axis=(0, 2))
    gxp = gxp.reshape(p.N, p.C, p.M, -1).sum(axis=2)
    return gxp[:, :, p.pl:p.pl + p.L], gw, gy64.sum(axis=(0, 2)), gxp[:, :, :p.pl]


def _conv1d_update64(p, x64, s64, w64, b64):
    """(y, new_state) of a decode step; x64 (N, C, T), s64 (N, C, K-1)."""
    window = np.repeat(np.concatenate([s64, x64], axis=2), p.M, axis=1)
    y = np.zeros((p.N, p.CO, p.T))
    for k in range(p.K):
        y += w64[None, :, 0, k, None] * window[:, :, k:k + p.T]
    if b64 is not None:
        y += b64[None, :, None]
    new_state = np.concatenate([s64, x64], axis=2)[:, :, p.T:]
    return activate(y, p.activation), new_state


# ----------------------------------------------------------------------------- the numpy backend


def _f64(a):
    return None if a is None else np.asarray(a).astype(np.float64)


class _NumpyBackend(HostBackend):
    """The reference as a backend: arrays are NumPy, C-contiguous, in the problem's layout."""

    name = "numpy"

    def _store(self, out, y64, layout=None):
        out[...] = (y64 if layout is None else _physical(y64, layout)).astype(out.dtype)

    def depthwise_forward(self, p, x, w, b, out, stream=None):
        self._store(out, _depthwise64(p, _nchw(x, p.layout), _f64(w), _f64(b)), p.layout)

    def depthwise_grad_input(self, p, gy, w, out, stream=None):
        self._store(out, _depthwise_grad_input64(p, _nchw(gy, p.layout), _f64(w)), p.layout)

    def depthwise_grad_weight(self, p, x, gy, out, stream=None):
        self._store(out, _depthwise_grad_weight64(p, _nchw(x, p.layout), _nchw(gy, p.layout)))

    def pointwise_forward(self, p, x, w, b, residual, out, stream=None):
        r64 = None if residual is None else _nchw(residual, p.layout)
        self._store(out, _pointwise64(p, _nchw(x, p.layout), _f64(w), _f64(b), r64), p.layout)

    def pointwise_grad_input(self, p, gy, w, out, stream=None):
        gx = np.einsum("oc,nohw->nchw", _f64(w), _nchw(gy, p.layout))
        self._store(out, gx, p.layout)

    def pointwise_grad_weight(self, p, x, gy, out, stream=None):
        self._store(out, np.einsum("nohw,nchw->oc", _nchw(gy, p.layout), _nchw(x, p.layout)))

    def separable_forward(self, p, x, dw_w, pw_w, b, dw_b, residual, out, stream=None):
        mid = _depthwise64(p.dw, _nchw(x, p.dw.layout), _f64(dw_w), _f64(dw_b))
        r64 = None if residual is None else _nchw(residual, p.pw.layout)
        self._store(out, _pointwise64(p.pw, mid, _f64(pw_w), _f64(b), r64), p.pw.layout)


    def depthwise_conv1d_forward(self, p, x, w, b, state, seq, out, final_out, stream=None):
        seq64 = None if seq is None else np.asarray(seq).astype(np.int64)
        y, final = _conv1d64(p, _ncl(x, p.layout), _f64(w), _f64(b), _f64(state), seq64)
        self._store(out, _physical_1d(y, p.layout))
        if final_out is not None:
            self._store(final_out, final)

    def depthwise_conv1d_backward(self, p, x, gy, w, state, seq, gx, gw, gb, gstate, stream=None):
        seq64 = None if seq is None else np.asarray(seq).astype(np.int64)
        grads = _conv1d_backward64(p, _ncl(x, p.layout), _ncl(gy, p.layout), _f64(w),
                                   _f64(state), seq64)
        for out, g, physical in zip((gx, gw, gb, gstate), grads, (True, False, False, False)):
            if out is not None:
                self._store(out, _physical_1d(g, p.layout) if physical else g)

    def depthwise_conv1d_update(self, p, x, state, w, b, out, state_out, stream=None):
        x64 = _f64(x).reshape(p.N, p.C, p.T)
        y, new_state = _conv1d_update64(p, x64, _f64(state), _f64(w), _f64(b))
        self._store(out, y.reshape(p.y_shape))
        self._store(state_out, new_state)


BACKEND = _NumpyBackend()


# ----------------------------------------------------------------------------- public functions
# Same signatures as the top-level API; they run the "numpy" backend through the same validation.


def depthwise_conv2d(x, weight, bias=None, *, stride=1, padding=0, dilation=1, layout="NCHW",
                     activation=None):
    """Reference depthwise convolution; see :func:`dwops.depthwise_conv2d`."""
    from . import _api

    return _api.depthwise_conv2d(x, weight, bias, stride=stride, padding=padding,
                                 dilation=dilation, layout=layout, activation=activation,
                                 backend="numpy")


def depthwise_conv2d_grad_input(grad_output, weight, input_shape, *, stride=1, padding=0,
                                dilation=1, layout="NCHW"):
    """Reference depthwise input gradient; see :func:`dwops.depthwise_conv2d_grad_input`."""
    from . import _api

    return _api.depthwise_conv2d_grad_input(grad_output, weight, input_shape, stride=stride,
                                            padding=padding, dilation=dilation, layout=layout,
                                            backend="numpy")


def depthwise_conv2d_grad_weight(x, grad_output, weight_shape, *, stride=1, padding=0, dilation=1,
                                 layout="NCHW"):
    """Reference depthwise weight gradient; see :func:`dwops.depthwise_conv2d_grad_weight`."""
    from . import _api

    return _api.depthwise_conv2d_grad_weight(x, grad_output, weight_shape, stride=stride,
                                             padding=padding, dilation=dilation, layout=layout,
                                             backend="numpy")


def depthwise_conv2d_backward(x, grad_output, weight, *, stride=1, padding=0, dilation=1,
                              layout="NCHW", need_input=True, need_weight=True, need_bias=False):
    """Reference depthwise backward (the single gradients composed); see
    :func:`dwops.depthwise_conv2d_backward`."""
    from . import _api

    return _api.depthwise_conv2d_backward(
        x, grad_output, weight, stride=stride, padding=padding, dilation=dilation, layout=layout,
        need_input=need_input, need_weight=need_weight, need_bias=need_bias, backend="numpy")


def pointwise_conv2d(x, weight, bias=None, *, layout="NCHW", activation=None, residual=None):
    """Reference 1x1 convolution; see :func:`dwops.pointwise_conv2d`."""
    from . import _api

    return _api.pointwise_conv2d(x, weight, bias, layout=layout, activation=activation,
                                 residual=residual, backend="numpy")


def pointwise_conv2d_grad_input(grad_output, weight, *, layout="NCHW"):
    """Reference 1x1 input gradient; see :func:`dwops.pointwise_conv2d_grad_input`."""
    from . import _api

    return _api.pointwise_conv2d_grad_input(grad_output, weight, layout=layout, backend="numpy")


def pointwise_conv2d_grad_weight(x, grad_output, *, layout="NCHW"):
    """Reference 1x1 weight gradient; see :func:`dwops.pointwise_conv2d_grad_weight`."""
    from . import _api

    return _api.pointwise_conv2d_grad_weight(x, grad_output, layout=layout, backend="numpy")


def separable_conv2d(x, dw_weight, pw_weight, bias=None, *, dw_bias=None, stride=1, padding=0,
                     dilation=1, layout="NCHW", dw_activation=None, activation=None,
                     residual=None):
    """Reference depthwise-separable convolution; see :func:`dwops.separable_conv2d`."""
    from . import _api

    return _api.separable_conv2d(x, dw_weight, pw_weight, bias, dw_bias=dw_bias, stride=stride,
                                 padding=padding, dilation=dilation, layout=layout,
                                 dw_activation=dw_activation, activation=activation,
                                 residual=residual, backend="numpy")



def depthwise_conv1d(x, weight, bias=None, *, stride=1, padding=0, dilation=1, layout="NCL",
                     activation=None, initial_state=None, return_final_state=False, seq_idx=None):
    """Reference depthwise 1-d convolution; see :func:`dwops.depthwise_conv1d`."""
    from . import _api

    return _api.depthwise_conv1d(x, weight, bias, stride=stride, padding=padding,
                                 dilation=dilation, layout=layout, activation=activation,
                                 initial_state=initial_state,
                                 return_final_state=return_final_state, seq_idx=seq_idx,
                                 backend="numpy")


def depthwise_conv1d_backward(x, grad_output, weight, *, stride=1, padding=0, dilation=1,
                              layout="NCL", initial_state=None, seq_idx=None, need_input=True,
                              need_weight=True, need_bias=False, need_initial_state=False):
    """Reference depthwise 1-d backward; see :func:`dwops.depthwise_conv1d_backward`."""
    from . import _api

    return _api.depthwise_conv1d_backward(
        x, grad_output, weight, stride=stride, padding=padding, dilation=dilation, layout=layout,
        initial_state=initial_state, seq_idx=seq_idx, need_input=need_input,
        need_weight=need_weight, need_bias=need_bias, need_initial_state=need_initial_state,
        backend="numpy")


def depthwise_conv1d_update(x_step, state, weight, bias=None, *, activation=None):
    """Reference decode step; see :func:`dwops.depthwise_conv1d_update`."""
    from . import _api

    return _api.depthwise_conv1d_update(x_step, state, weight, bias, activation=activation,
                                        backend="numpy")
