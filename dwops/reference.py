"""The NumPy reference: the oracle of every test, written to be obviously right, not fast.

Every function has the signature of its ``dwops`` namesake (without ``backend``), accepts any host
array, computes in float64 in (N, C, H, W) order and rounds once to the input dtype. It is also the
``"numpy"`` backend.

The math, with ``M`` the channel multiplier and ``xp`` the zero-padded input::

    depthwise     y[n, o, i, j]  = sum_{a, b} w[o, 0, a, b] * xp[n, o // M, i*sh + a*dh, j*sw + b*dw]
    grad_input    gx[n, c, p, q] = sum over (o, i, j, a, b) with o // M == c and
                                   (i*sh + a*dh, j*sw + b*dw) == (p + pt, q + pl) of w[o,0,a,b] * gy[n,o,i,j]
    grad_weight   gw[o, 0, a, b] = sum_{n, i, j} gy[n, o, i, j] * xp[n, o // M, i*sh + a*dh, j*sw + b*dw]
    pointwise     y[n, o, h, w]  = sum_c W[o, c] * x[n, c, h, w]
    its grads     gx = W^T gy over channels;  gW[o, c] = sum_{n, h, w} gy[n, o, h, w] * x[n, c, h, w]
    fused op      y = activation(conv + bias) + residual
"""

from __future__ import annotations

import math

import numpy as np

from ._registry import HostBackend

__all__ = [
    "depthwise_conv2d", "depthwise_conv2d_grad_input", "depthwise_conv2d_grad_weight",
    "pointwise_conv2d", "pointwise_conv2d_grad_input", "pointwise_conv2d_grad_weight",
    "separable_conv2d", "activate",
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

