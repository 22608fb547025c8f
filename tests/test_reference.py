"""dwops.reference against the literal loop oracle and against PyTorch CPU (where installed)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import dwops.reference as ref
from dwops._spec import ACTIVATIONS
from tests import oracle
from tests.conftest import assert_close, optional_import, rand

torch, requires_torch = optional_import("torch", "PyTorch is the independent second oracle")


def _pads(padding, hw, k, s, d):
    """Expected (top, bottom, left, right) for every padding form, written from the documented padding rules."""
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        out = []
        for size, kk, ss, dd in zip(hw, k, s, d):
            o = math.ceil(size / ss)
            total = max((o - 1) * ss + dd * (kk - 1) + 1 - size, 0)
            out += [total // 2, total - total // 2]
        return tuple(out)
    if isinstance(padding, int):
        return (padding,) * 4
    if isinstance(padding[0], int):
        return (padding[0], padding[0], padding[1], padding[1])
    return (*padding[0], *padding[1])


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _to_layout(a, layout):
    return a if layout == "NCHW" else np.ascontiguousarray(a.transpose(0, 2, 3, 1))


def _from_layout(a, layout):
    a = np.asarray(a).astype(np.float64)
    return a if layout == "NCHW" else a.transpose(0, 3, 1, 2)


CASES = [
    # (N, C, H, W, M, (KH, KW), stride, dilation, padding)
    (2, 3, 7, 6, 1, (3, 3), 1, 1, "same"),
    (1, 2, 5, 8, 2, (3, 3), 2, 1, "same"),
    (2, 1, 9, 7, 3, (5, 3), (2, 3), 1, 1),
    (1, 2, 8, 9, 1, (3, 2), 1, (2, 3), (2, 1)),
    (1, 3, 6, 6, 2, (2, 2), 3, 2, ((1, 2), (0, 3))),
    (1, 2, 1, 1, 1, (1, 1), 1, 1, "valid"),
    (1, 1, 1, 1, 4, (3, 3), 1, 1, 1),
    (2, 2, 7, 5, 1, (7, 7), 1, 1, "same"),
    (1, 2, 11, 4, 1, (3, 3), 3, 2, "same"),
    (1, 1, 10, 10, 1, (4, 4), 2, 1, "valid"),
]


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:5])) + f"-k{c[5]}-s{c[6]}-d{c[7]}-p{c[8]}")
def test_depthwise_forward_and_grads_match_loop_oracle(case, layout, rng):
    n, c, h, w, m, (kh, kw), stride, dilation, padding = case
    x = rand(rng, (n, c, h, w), "float64")
    wt = rand(rng, (c * m, 1, kh, kw), "float64")
    b = rand(rng, (c * m,), "float64")
    s, d = _pair(stride), _pair(dilation)
    pads = _pads(padding, (h, w), (kh, kw), s, d)
    kw_args = dict(stride=stride, padding=padding, dilation=dilation, layout=layout)
    for activation in ACTIVATIONS:
        y = ref.depthwise_conv2d(_to_layout(x, layout), wt, b, activation=activation, **kw_args)
        expected = oracle.depthwise(x, wt, b, s, d, pads, activation)
        assert_close(_from_layout(y, layout), expected, "float64", what=f"forward {activation}")
    gy = rand(rng, expected.shape, "float64")
    gx = ref.depthwise_conv2d_grad_input(_to_layout(gy, layout), wt, _to_layout(x, layout).shape,
                                         **kw_args)
    assert_close(_from_layout(gx, layout), oracle.depthwise_grad_input(gy, wt, x.shape, s, d, pads),
                 "float64", what="grad_input")
    gw = ref.depthwise_conv2d_grad_weight(_to_layout(x, layout), _to_layout(gy, layout), wt.shape,
                                          **kw_args)
    assert_close(gw, oracle.depthwise_grad_weight(x, gy, wt.shape, s, d, pads), "float64",
                 what="grad_weight")


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("activation", [None, "relu", "gelu", "hardswish"])
def test_pointwise_and_grads_match_loop_oracle(layout, activation, rng):
    x = rand(rng, (2, 3, 4, 5), "float64")
    w = rand(rng, (4, 3), "float64")
    b = rand(rng, (4,), "float64")
    r = rand(rng, (2, 4, 4, 5), "float64")
    y = ref.pointwise_conv2d(_to_layout(x, layout), w.reshape(4, 3, 1, 1), b, layout=layout,
                             activation=activation, residual=_to_layout(r, layout))
    assert_close(_from_layout(y, layout), oracle.pointwise(x, w, b, activation, r), "float64")
    gy = rand(rng, (2, 4, 4, 5), "float64")
    gx = ref.pointwise_conv2d_grad_input(_to_layout(gy, layout), w, layout=layout)
    assert_close(_from_layout(gx, layout), oracle.pointwise(gy, w.T), "float64")
    gw = ref.pointwise_conv2d_grad_weight(_to_layout(x, layout), _to_layout(gy, layout),
                                          layout=layout)
    expected = np.einsum("nohw,nchw->oc", gy, x)
    assert gw.shape == (4, 3)
    assert_close(gw, expected, "float64")


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_separable_is_depthwise_then_pointwise(layout, rng):
    x = rand(rng, (2, 4, 9, 7), "float64")
    dw = rand(rng, (8, 1, 3, 3), "float64")
    dwb = rand(rng, (8,), "float64")
    pw = rand(rng, (5, 8), "float64")
    b = rand(rng, (5,), "float64")
    res = rand(rng, (2, 5, 5, 4), "float64")
    y = ref.separable_conv2d(_to_layout(x, layout), dw, pw, b, dw_bias=dwb, stride=2,
                             padding="same", layout=layout, dw_activation="relu6",
                             activation="silu", residual=_to_layout(res, layout))
    pads = _pads("same", (9, 7), (3, 3), (2, 2), (1, 1))
    mid = oracle.depthwise(x, dw, dwb, (2, 2), (1, 1), pads, "relu6")
    assert_close(_from_layout(y, layout), oracle.pointwise(mid, pw, b, "silu", res), "float64")


def test_motivating_block(rng):
    """x + pw(relu(dw(x))) + b, as the README example spells it."""
    x = rand(rng, (1, 4, 6, 6), "float64")
    dw = rand(rng, (4, 1, 3, 3), "float64")
    pw = rand(rng, (4, 4), "float64")
    b = rand(rng, (4,), "float64")
    y = ref.separable_conv2d(x, dw, pw, b, padding="same", dw_activation="relu", residual=x)
    mid = oracle.depthwise(x, dw, None, (1, 1), (1, 1), (1, 1, 1, 1), "relu")
    assert_close(y, x + oracle.pointwise(mid, pw, b), "float64")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_reference_rounds_once_to_the_input_dtype(dtype, rng):
    x = rand(rng, (1, 3, 8, 8), dtype)
    w = rand(rng, (3, 1, 3, 3), dtype)
    y = ref.depthwise_conv2d(x, w, padding=1)
    assert y.dtype == x.dtype
    exact = oracle.depthwise(x.astype(np.float64), w.astype(np.float64), None, (1, 1), (1, 1),
                             (1, 1, 1, 1))
    # Rounded once from float64: within half an ulp of the exact value.
    eps = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-24}[dtype]
    assert np.all(np.abs(y.astype(np.float64) - exact) <= eps * np.abs(exact) + 1e-300)


def _nonfinite_depthwise_case():
    """A 5x5 input of ones per channel, 3x3 filters, padding 1, and where the output must be NaN,
    +inf or -inf (every other element is finite). Channel by channel:

    0. +inf at (2, 2), filter of ones: every window holding it sums to +inf, (1..3, 1..3).
    1. +inf at (2, 1), -inf at (2, 3): windows with only the +inf are +inf (1..3, 0..1), only the
       -inf -inf (1..3, 3..4); column 2 holds both: inf - inf is NaN.
    2. +inf at (2, 2), filter of ones but a zero centre tap: (2, 2) reads the inf through the zero
       tap, inf * 0 is NaN; the other windows holding it read it through a one: +inf.
    3. NaN at (0, 0): every window holding it is NaN, (0..1, 0..1).
    """
    x = np.ones((1, 4, 5, 5))
    w = np.ones((4, 1, 3, 3))
    nan, pos, neg = (np.zeros((1, 4, 5, 5), bool) for _ in range(3))
    x[0, 0, 2, 2] = np.inf
    pos[0, 0, 1:4, 1:4] = True
    x[0, 1, 2, 1], x[0, 1, 2, 3] = np.inf, -np.inf
    pos[0, 1, 1:4, 0:2], nan[0, 1, 1:4, 2], neg[0, 1, 1:4, 3:5] = True, True, True
    x[0, 2, 2, 2] = np.inf
    w[2, 0, 1, 1] = 0.0
    pos[0, 2, 1:4, 1:4], nan[0, 2, 2, 2] = True, True
    pos[0, 2, 2, 2] = False
    x[0, 3, 0, 0] = np.nan
    nan[0, 3, 0:2, 0:2] = True
    return x, w, nan, pos, neg


def _nonfinite_pointwise_case():
    """x (1, 3, 2, 2), W = [[1, 1, 1], [0, 2, -1]]; per pixel, channels (c0, c1, c2):

    (0, 0) = (inf, 1, 1): row 0 sums +inf; row 1 multiplies the inf by 0: NaN.
    (0, 1) = (1, inf, -inf): row 0 is inf - inf: NaN; row 1 is 2*inf - (-inf) = +inf.
    (1, 0) = (1, -inf, 1): both rows weigh the -inf positively: -inf.
    (1, 1) = (1, 1, 1): finite (3 and 1).
    """
    x = np.ones((1, 3, 2, 2))
    x[0, 0, 0, 0] = np.inf
    x[0, 1, 0, 1], x[0, 2, 0, 1] = np.inf, -np.inf
    x[0, 1, 1, 0] = -np.inf
    w = np.array([[1.0, 1.0, 1.0], [0.0, 2.0, -1.0]])
    nan, pos, neg = (np.zeros((1, 2, 2, 2), bool) for _ in range(3))
    pos[0, 0, 0, 0], nan[0, 1, 0, 0] = True, True
    nan[0, 0, 0, 1], pos[0, 1, 0, 1] = True, True
    neg[0, :, 1, 0] = True
    return x, w, nan, pos, neg


def _assert_pattern(y, nan, pos, neg, what):
    y = np.asarray(y, np.float64)
    np.testing.assert_array_equal(np.isnan(y), nan, err_msg=f"{what}: NaN positions")
    np.testing.assert_array_equal(np.isposinf(y), pos, err_msg=f"{what}: +inf positions")
    np.testing.assert_array_equal(np.isneginf(y), neg, err_msg=f"{what}: -inf positions")


def _backends_for_nonfinite():
    import dwops

    return ["numpy"] + [pytest.param("cpu", marks=pytest.mark.skipif(
        not dwops.backend_available("cpu"), reason="the 'cpu' backend is not built"))]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", _backends_for_nonfinite())
def test_nan_and_inf_propagate(backend):
    """IEEE arithmetic, as in PyTorch: inf where a window sums infinities of one sign, NaN where it
    holds a NaN, adds +inf to -inf, or multiplies an inf by a zero weight. The "numpy" backend is
    dwops.reference; every backend must give the reference's pattern and finite values."""
    import dwops

    x, w, nan, pos, neg = _nonfinite_depthwise_case()
    y = dwops.depthwise_conv2d(x, w, padding=1, backend=backend)
    _assert_pattern(y, nan, pos, neg, "depthwise")
    assert_close(y, ref.depthwise_conv2d(x, w, padding=1), "float64", what="depthwise")
    # relu keeps NaN and +inf, and makes -inf 0 (channel 1, columns 3..4)
    y = dwops.depthwise_conv2d(x, w, padding=1, activation="relu", backend=backend)
    _assert_pattern(y, nan, pos, np.zeros_like(neg), "depthwise relu")
    assert np.all(np.asarray(y)[neg] == 0.0)
    assert_close(y, ref.depthwise_conv2d(x, w, padding=1, activation="relu"), "float64")

    x, w, nan, pos, neg = _nonfinite_pointwise_case()
    y = dwops.pointwise_conv2d(x, w, backend=backend)
    _assert_pattern(y, nan, pos, neg, "pointwise")
    assert np.asarray(y)[0, 0, 1, 1] == 3.0 and np.asarray(y)[0, 1, 1, 1] == 1.0
    assert_close(y, ref.pointwise_conv2d(x, w), "float64", what="pointwise")


@pytest.mark.parametrize("activation", ACTIVATIONS[1:])
def test_activations_at_infinities_and_nan(activation):
    v = np.array([-np.inf, np.inf, np.nan, -3.0, 0.5, 7.0])
    got = ref.activate(v, activation)
    want = np.array([oracle.act(float(t), activation) if np.isfinite(t) or np.isnan(t) else np.nan
                     for t in v])
    # As in PyTorch: silu and gelu are x * (something -> 0) at -inf, which is NaN.
    # hardswish likewise (-inf * relu6(-inf) = -inf * 0).
    expected_inf = {"relu": (0.0, np.inf), "relu6": (0.0, 6.0), "silu": (np.nan, np.inf),
                    "gelu": (np.nan, np.inf), "hardswish": (np.nan, np.inf),
                    "hardsigmoid": (0.0, 1.0)}[activation]
    np.testing.assert_array_equal(got[:2], expected_inf)
    assert np.isnan(got[2])
    np.testing.assert_allclose(got[3:], want[3:], rtol=1e-15)


# ----------------------------------------------------------------------------- against PyTorch

# The kinks of every activation, exactly, with values just beside them and on each side.
_KINKS = np.array([-7.5, -6.0, -3.0 - 2.0**-40, -3.0, -3.0 + 2.0**-40, -2.0, -1.5, -1.0,
                   -2.0**-40, 0.0, 2.0**-40, 0.25, 1.0, 3.0 - 2.0**-40, 3.0, 3.0 + 2.0**-40, 4.0,
                   6.0 - 2.0**-40, 6.0, 6.0 + 2.0**-40, 9.0])


def _torch_activation(activation):
    F = torch.nn.functional
    return {None: lambda t: t, "relu": F.relu, "relu6": F.relu6, "silu": F.silu, "gelu": F.gelu,
            "hardswish": F.hardswish, "hardsigmoid": F.hardsigmoid}[activation]


@requires_torch
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_and_derivative_match_torch_autograd_at_kinks(activation, rng):
    """activate and activation_derivative against torch.nn.functional and its autograd, in float64
    on the exact kink points (-3, 0, 3, 6) and their neighbours, plus random values."""
    z = np.concatenate([_KINKS, rand(rng, (64,), "float64", -8.0, 8.0)])
    tz = torch.tensor(z, requires_grad=True)
    ty = _torch_activation(activation)(tz)
    ty.backward(torch.ones_like(ty))
    np.testing.assert_allclose(ref.activate(z, activation), ty.detach().numpy(), rtol=1e-15,
                               atol=1e-300)
    d = ref.activation_derivative(activation, z)
    assert d.dtype == np.float64 and d.shape == z.shape
    # PyTorch's hardsigmoid gradient is a float32 1/6 in every dtype; zeros are checked exactly
    rtol = 1e-7 if activation == "hardsigmoid" else 1e-14
    np.testing.assert_allclose(d, tz.grad.numpy(), rtol=rtol, atol=1e-300)


def test_activation_derivative_matches_finite_differences(rng):
    """Away from the kinks, activation_derivative is the slope of activate."""
    z = rand(rng, (200,), "float64", -8.0, 8.0)
    z = z[np.min(np.abs(z[:, None] - np.array([-3.0, 0.0, 3.0, 6.0])), axis=1) > 1e-3]
    h = 1e-6
    for activation in ACTIVATIONS:
        fd = (ref.activate(z + h, activation) - ref.activate(z - h, activation)) / (2 * h)
        np.testing.assert_allclose(ref.activation_derivative(activation, z), fd, rtol=1e-6,
                                   atol=1e-8, err_msg=str(activation))
    with pytest.raises(ValueError):
        ref.activation_derivative("tanh", z)


@requires_torch
@pytest.mark.parametrize("case", CASES[:6] + CASES[8:], ids=lambda c: "x".join(map(str, c[:5])))
def test_depthwise_matches_torch_forward_and_autograd(case, rng):
    F = torch.nn.functional
    n, c, h, w, m, (kh, kw), stride, dilation, padding = case
    s, d = _pair(stride), _pair(dilation)
    pads = _pads(padding, (h, w), (kh, kw), s, d)
    x = rand(rng, (n, c, h, w), "float64")
    wt = rand(rng, (c * m, 1, kh, kw), "float64")
    b = rand(rng, (c * m,), "float64")
    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(wt, requires_grad=True)
    xp = F.pad(tx, (pads[2], pads[3], pads[0], pads[1]))
    ty = F.conv2d(xp, tw, torch.tensor(b), stride=s, dilation=d, groups=c)
    y = ref.depthwise_conv2d(x, wt, b, stride=stride, padding=padding, dilation=dilation)
    assert_close(y, ty.detach().numpy(), "float64")
    gy = rand(rng, y.shape, "float64")
    ty.backward(torch.tensor(gy))
    kw_args = dict(stride=stride, padding=padding, dilation=dilation)
    assert_close(ref.depthwise_conv2d_grad_input(gy, wt, x.shape, **kw_args), tx.grad.numpy(),
                 "float64")
    assert_close(ref.depthwise_conv2d_grad_weight(x, gy, wt.shape, **kw_args), tw.grad.numpy(),
                 "float64")


@requires_torch
def test_pointwise_matches_torch(rng):
    F = torch.nn.functional
    x = rand(rng, (2, 6, 5, 3), "float64")
    w = rand(rng, (4, 6, 1, 1), "float64")
    b = rand(rng, (4,), "float64")
    ty = F.gelu(F.conv2d(torch.tensor(x), torch.tensor(w), torch.tensor(b)))
    assert_close(ref.pointwise_conv2d(x, w, b, activation="gelu"), ty.numpy(), "float64")
    assert_close(ref.pointwise_conv2d(x, w, b, activation="silu"),
                 F.silu(F.conv2d(torch.tensor(x), torch.tensor(w), torch.tensor(b))).numpy(),
                 "float64")
    assert_close(ref.pointwise_conv2d(x, w, b, activation="relu6"),
                 F.relu6(F.conv2d(torch.tensor(x), torch.tensor(w), torch.tensor(b))).numpy(),
                 "float64")
    for act in ("hardswish", "hardsigmoid"):
        assert_close(ref.pointwise_conv2d(4 * x, w, b, activation=act),
                     _torch_activation(act)(F.conv2d(torch.tensor(4 * x), torch.tensor(w),
                                                     torch.tensor(b))).numpy(), "float64", what=act)
