"""dwops.torch: values, gradcheck, opcheck, torch.compile, modules, state dicts, a training run."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

import dwops
import dwops.reference as ref
from tests.conftest import assert_close

# Module-level: every test here calls dwops.torch, which imports PyTorch.
torch = pytest.importorskip("torch", reason="dwops.torch needs PyTorch")
import dwops.torch as dt  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

# The layer is tested on the reference backend (exact, and no JIT compilation per configuration);
# test_default_backend runs the default ("auto") path.
HOST = "numpy"
F64 = torch.float64


def _t(rng, *shape, dtype=F64, grad=True):
    return torch.tensor(rng.uniform(-1, 1, size=shape), dtype=dtype).requires_grad_(grad)


def _np(t):
    return t.detach().float().numpy() if t.dtype == torch.bfloat16 else t.detach().numpy()


def _shape(layout, n, c, h, w):
    return (n, c, h, w) if layout == "NCHW" else (n, h, w, c)


# Each config: (layout, C, M, H, W, K, stride, padding, dilation, bias, activation)
DW_CASES = [
    ("NCHW", 2, 1, 5, 6, 3, 1, 0, 1, False, None),
    ("NCHW", 2, 2, 7, 6, 3, 2, "same", 1, True, "relu"),
    ("NHWC", 3, 1, 6, 7, 3, (2, 1), ((1, 0), (2, 1)), (1, 2), True, "silu"),
    ("NCHW", 2, 3, 5, 5, 2, 1, "same", 1, True, "gelu"),
    ("NHWC", 2, 2, 6, 5, 3, 2, (1, 1), 1, True, "relu6"),
    ("NCHW", 3, 1, 6, 5, 3, 1, 1, 1, True, "hardswish"),
    ("NHWC", 2, 2, 5, 6, 3, 1, "same", 1, True, "hardsigmoid"),
]

# Weight scales that make some pre-activations cross the activation's kinks (relu6: 6; hardswish,
# hardsigmoid: -3 and 3).
_SCALE = {"relu6": 8, "hardswish": 4, "hardsigmoid": 4}


def _dw_args(rng, case):
    layout, c, m, h, w, k, stride, padding, dilation, bias, act = case
    x = _t(rng, *_shape(layout, 2, c, h, w))
    wt = _t(rng, c * m, 1, k, k)
    if act in _SCALE:
        wt = (wt.detach() * _SCALE[act]).requires_grad_()
    b = _t(rng, c * m) if bias else None
    kw = {"stride": stride, "padding": padding, "dilation": dilation, "layout": layout,
          "activation": act, "backend": HOST}
    return x, wt, b, kw


PW_CASES = [
    ("NCHW", 3, 4, False, None, False, 4),
    ("NCHW", 3, 5, True, "relu6", False, 4),
    ("NHWC", 4, 3, True, "gelu", True, 4),
    ("NCHW", 2, 3, True, "silu", True, 2),
    ("NHWC", 3, 2, False, "relu", True, 2),
    ("NCHW", 4, 3, True, "hardswish", True, 4),
    ("NHWC", 4, 3, True, "hardsigmoid", False, 2),
]


def _pw_args(rng, case):
    layout, ci, co, bias, act, residual, wdim = case
    x = _t(rng, *_shape(layout, 2, ci, 3, 4))
    w = _t(rng, co, ci, 1, 1) if wdim == 4 else _t(rng, co, ci)
    if act in _SCALE:
        w = (w.detach() * _SCALE[act]).requires_grad_()
    b = _t(rng, co) if bias else None
    r = _t(rng, *_shape(layout, 2, co, 3, 4)) if residual else None
    return x, w, b, {"layout": layout, "activation": act, "residual": r, "backend": HOST}


# (layout, C, M, C_out, K, stride, padding, bias, dw_bias, dw_act, act, residual)
SEP_CASES = [
    ("NCHW", 2, 1, 3, 3, 1, "same", True, False, "relu", None, True),
    ("NCHW", 2, 2, 3, 3, 2, "same", True, True, "silu", "relu6", False),
    ("NHWC", 3, 1, 2, 3, 1, 1, False, True, None, "gelu", False),
    ("NHWC", 2, 1, 4, 2, 2, 0, True, True, "gelu", "relu", True),
    ("NCHW", 3, 1, 4, 3, 1, "same", True, True, "hardswish", "hardsigmoid", False),
]


def _sep_args(rng, case):
    layout, c, m, co, k, stride, padding, bias, dw_bias, dw_act, act, residual = case
    x = _t(rng, *_shape(layout, 2, c, 6, 5))
    dw_w, pw_w = _t(rng, c * m, 1, k, k), _t(rng, co, c * m, 1, 1)
    if dw_act in _SCALE:
        dw_w = (dw_w.detach() * _SCALE[dw_act]).requires_grad_()
    if act in _SCALE:
        pw_w = (pw_w.detach() * _SCALE[act]).requires_grad_()
    b = _t(rng, co) if bias else None
    db = _t(rng, c * m) if dw_bias else None
    # the residual has the output's shape: the depthwise geometry with C_out channels
    y = ref.depthwise_conv2d(np.zeros(_shape(layout, 2, c, 6, 5)), np.zeros((1 * c, 1, k, k)),
                             stride=stride, padding=padding, layout=layout)
    oh, ow = (y.shape[2:] if layout == "NCHW" else y.shape[1:3])
    r = _t(rng, *_shape(layout, 2, co, oh, ow)) if residual else None
    kw = {"dw_bias": db, "stride": stride, "padding": padding, "layout": layout,
          "dw_activation": dw_act, "activation": act, "residual": r, "backend": HOST}
    return x, dw_w, pw_w, b, kw


def _ref_kw(kw):
    return {k: (_np(v) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()
            if k != "backend"}


# ----------------------------------------------------------------------------- forward values


@pytest.mark.parametrize("case", DW_CASES)
def test_depthwise_forward_matches_reference(rng, case):
    x, w, b, kw = _dw_args(rng, case)
    y = dt.depthwise_conv2d(x, w, b, **kw)
    assert y.dtype == F64 and y.requires_grad
    expected = ref.depthwise_conv2d(_np(x), _np(w), None if b is None else _np(b), **_ref_kw(kw))
    assert_close(_np(y), expected, "float64")


@pytest.mark.parametrize("case", PW_CASES)
def test_pointwise_forward_matches_reference(rng, case):
    x, w, b, kw = _pw_args(rng, case)
    y = dt.pointwise_conv2d(x, w, b, **kw)
    expected = ref.pointwise_conv2d(_np(x), _np(w), None if b is None else _np(b), **_ref_kw(kw))
    assert_close(_np(y), expected, "float64")


@pytest.mark.parametrize("case", SEP_CASES)
def test_separable_forward_matches_reference(rng, case):
    x, dw_w, pw_w, b, kw = _sep_args(rng, case)
    y = dt.separable_conv2d(x, dw_w, pw_w, b, **kw)
    expected = ref.separable_conv2d(_np(x), _np(dw_w), _np(pw_w), None if b is None else _np(b),
                                    **_ref_kw(kw))
    assert_close(_np(y), expected, "float64")


def test_forward_matches_torch_conv2d(rng):
    """An independent oracle: F.conv2d(groups=C) and the separable block built from it."""
    x, w, b = _t(rng, 2, 3, 9, 8), _t(rng, 6, 1, 3, 3), _t(rng, 6)
    y = dt.depthwise_conv2d(x, w, b, stride=2, padding=1, activation="silu", backend=HOST)
    expected = torch.nn.functional.silu(torch.nn.functional.conv2d(x, w, b, 2, 1, groups=3))
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("case", DW_CASES)
def test_depthwise_gradcheck(rng, case):
    x, w, b, kw = _dw_args(rng, case)
    inputs = (x, w) if b is None else (x, w, b)
    assert torch.autograd.gradcheck(lambda *a: dt.depthwise_conv2d(*a, **kw), inputs)


@pytest.mark.parametrize("case", PW_CASES)
def test_pointwise_gradcheck(rng, case):
    x, w, b, kw = _pw_args(rng, case)
    r = kw.pop("residual")

    def f(x, w, b, r):
        return dt.pointwise_conv2d(x, w, b, residual=r, **kw)

    assert torch.autograd.gradcheck(f, (x, w, b, r))


@pytest.mark.parametrize("case", SEP_CASES)
def test_separable_gradcheck(rng, case):
    x, dw_w, pw_w, b, kw = _sep_args(rng, case)
    db, r = kw.pop("dw_bias"), kw.pop("residual")

    def f(x, dw_w, pw_w, b, db, r):
        return dt.separable_conv2d(x, dw_w, pw_w, b, dw_bias=db, residual=r, **kw)

    assert torch.autograd.gradcheck(f, (x, dw_w, pw_w, b, db, r))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_activation_gradient_matches_reference_and_autograd(dtype):
    """The layer's act'(z) table against dwops.reference.activation_derivative and PyTorch's
    autograd, on the exact kinks (-3, 0, 3, 6) and beside them; 16-bit: evaluated in float32."""
    z = torch.tensor([-7.0, -3.5, -3.0, -2.5, -1.5, -1.0, 0.0, 0.5, 1.0, 2.5, 3.0, 3.5, 5.5, 6.0,
                      6.5, float("nan")], dtype=dtype)
    g = torch.linspace(-2.0, 3.0, z.numel(), dtype=dtype)
    fns = {"relu": F.relu, "relu6": F.relu6, "silu": F.silu, "gelu": F.gelu,
           "hardswish": F.hardswish, "hardsigmoid": F.hardsigmoid}
    for act in dwops._spec.ACTIVATIONS:
        if act in dt._MASKED:
            got = dt._act_grad(g, act, out=torch.tensor(ref.activate(z.double().numpy(), act)))
        else:
            got = dt._act_grad(g, act, pre=z)
        assert got.dtype == dtype, act
        want = g.double().numpy() * ref.activation_derivative(act, z.double().numpy())
        rtol = {torch.float64: 1e-15, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
        # atol: float32 cancellation in gelu' far in the tail (-7), not a rounding to 16 bits
        atol = 0.0 if dtype == torch.float64 else 1e-6
        np.testing.assert_allclose(got.double().numpy(), want, rtol=rtol, atol=atol,
                                   err_msg=str(act))
        if act is not None:  # autograd, NaN left out (PyTorch's own kernels disagree there)
            zz = z[:-1].double().requires_grad_()
            fns[act](zz).backward(g[:-1].double())
            # (PyTorch's hardsigmoid gradient is a float32 1/6 in every dtype)
            np.testing.assert_allclose(got[:-1].double().numpy(), zz.grad.numpy(),
                                       rtol=max(rtol, 1e-7), atol=atol, err_msg=str(act))


def test_double_backward(rng):
    """The gradient ops are differentiable too (gelu: every path of the backward)."""
    x, w, b = _t(rng, 1, 2, 4, 3), _t(rng, 4, 1, 2, 2), _t(rng, 4)
    kw = {"stride": 2, "padding": "same", "activation": "gelu", "backend": HOST}
    assert torch.autograd.gradgradcheck(lambda *a: dt.depthwise_conv2d(*a, **kw), (x, w, b))
    x, w, b = _t(rng, 1, 2, 2, 3), _t(rng, 3, 2), _t(rng, 3)
    kw = {"activation": "silu", "residual": _t(rng, 1, 3, 2, 3), "backend": HOST}
    assert torch.autograd.gradgradcheck(lambda *a: dt.pointwise_conv2d(*a, **kw), (x, w, b))


def test_double_backward_of_the_one_call_backward(rng):
    """The depthwise backward op with a subset of its outputs (frozen weight, or no bias), NHWC,
    multiplier 2: its own gradients are right too."""
    x, w, b = _t(rng, 1, 4, 3, 2), _t(rng, 4, 1, 2, 3), _t(rng, 4)
    kw = {"stride": (2, 1), "padding": ((1, 0), (1, 1)), "layout": "NHWC", "activation": "silu",
          "backend": HOST}
    wf = w.detach()
    assert torch.autograd.gradgradcheck(lambda x, b: dt.depthwise_conv2d(x, wf, b, **kw), (x, b))
    assert torch.autograd.gradgradcheck(lambda x, w: dt.depthwise_conv2d(x, w, **kw), (x, w))


@pytest.mark.skipif(not dwops.backend_available("cpu"), reason="the 'cpu' backend is not built")
def test_default_backend(rng):
    """backend="auto" (the fast CPU backend): forward and gradients equal the reference's."""
    x, w, b, kw = _dw_args(rng, DW_CASES[1])
    kw["backend"] = "auto"
    y = dt.depthwise_conv2d(x, w, b, **kw)
    grads = torch.autograd.grad(y.square().sum(), (x, w, b))
    kw["backend"] = "numpy"
    y_ref = dt.depthwise_conv2d(x, w, b, **kw)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), (x, w, b))
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


def test_partial_gradients(rng):
    """Only the inputs that require grad get one; frozen weights stay frozen."""
    x, w, b = _t(rng, 2, 2, 5, 5), _t(rng, 2, 1, 3, 3, grad=False), _t(rng, 2)
    dt.depthwise_conv2d(x, w, b, padding=1, activation="gelu", backend=HOST).sum().backward()
    assert x.grad is not None and b.grad is not None and w.grad is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_forward_and_backward(rng, dtype):
    x, w, b = (_t(rng, 2, 3, 6, 5, dtype=dtype), _t(rng, 3, 1, 3, 3, dtype=dtype),
               _t(rng, 3, dtype=dtype))
    y = dt.depthwise_conv2d(x, w, b, padding="same", activation="silu", backend=HOST)
    name = str(dtype).removeprefix("torch.")
    expected = ref.depthwise_conv2d(_np(x).astype(np.float64), _np(w).astype(np.float64),
                                    _np(b).astype(np.float64), padding="same", activation="silu")
    assert y.dtype == dtype
    assert_close(_np(y), expected, name, scale=1 + np.abs(expected))
    y.sum().backward()
    assert x.grad.dtype == dtype and w.grad.dtype == dtype and b.grad.dtype == dtype
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    y64 = torch.nn.functional.silu(torch.nn.functional.conv2d(x64, w64, b64, padding=1, groups=3))
    y64.sum().backward()
    eps = {torch.float16: 2**-10, torch.bfloat16: 2**-7, torch.float32: 2**-23}[dtype]
    for lo, hi in ((x, x64), (w, w64), (b, b64)):  # rounding of z, gz and the sums: a few eps
        err = (lo.grad.double() - hi.grad).abs().max().item()
        assert err <= 32 * eps * max(1.0, hi.grad.abs().max().item()), (name, err)


# ----------------------------------------------------------------------------- opcheck


def _opcheck_samples(rng):
    """One sample per custom op (tiny: opcheck traces each op several ways)."""
    x, w, b = _t(rng, 1, 2, 5, 4), _t(rng, 4, 1, 3, 3), _t(rng, 4)
    gy = _t(rng, 1, 4, 3, 2)
    xn = _t(rng, 1, 3, 4, 2)  # NHWC
    xp, wp, bp, rp = _t(rng, 1, 3, 2, 3), _t(rng, 5, 3, 1, 1), _t(rng, 5), _t(rng, 1, 5, 2, 3)
    geo = ([2, 2], [0, 0, 0, 0], True, [1, 1])
    ops = torch.ops.dwops
    return [
        (ops.depthwise_conv2d, (x, w, b, *geo, "NCHW", "gelu", HOST)),
        (ops.depthwise_conv2d_grad_input, (gy, w, [1, 2, 5, 4], *geo, "NCHW", HOST)),
        (ops.depthwise_conv2d_grad_weight, (x, gy, [4, 1, 3, 3], *geo, "NCHW", HOST)),
        (ops.depthwise_conv2d_backward, (x, gy, w, *geo, "NCHW", [True, True, True], HOST)),
        (ops.depthwise_conv2d_backward, (xn, _t(rng, 1, 1, 2, 4), _t(rng, 4, 1, 3, 2), [2, 2],
                                         [1, 0, 0, 1], False, [1, 1], "NHWC",
                                         [False, True, True], HOST)),
        (ops.pointwise_conv2d, (xp, wp, bp, rp, "NCHW", "silu", HOST)),
        (ops.pointwise_conv2d_grad_input, (rp, wp.detach().reshape(5, 3).requires_grad_(),
                                           "NCHW", HOST)),
        (ops.pointwise_conv2d_grad_weight, (xn, _t(rng, 1, 3, 4, 5), "NHWC", HOST)),
        (ops.separable_conv2d, (xn, _t(rng, 2, 1, 2, 2), _t(rng, 3, 2), None, _t(rng, 2),
                                _t(rng, 1, 3, 3, 3), [1, 2], [1, 0, 1, 1], False, [1, 1],
                                "NHWC", "relu", "relu6", HOST)),
    ]


def test_opcheck_every_op(rng):
    """Every op: schema, autograd registration, fake tensors. The forward ops also under AOT
    dispatch with dynamic shapes, which traces their backward and so the gradient ops' fakes."""
    cheap = ("test_schema", "test_autograd_registration", "test_faketensor")
    for op, args in _opcheck_samples(rng):
        forward = "_grad_" not in str(op) and "_backward" not in str(op)
        torch.library.opcheck(op, args, test_utils=cheap + ("test_aot_dispatch_dynamic",)
                              if forward else cheap)


# ----------------------------------------------------------------------------- torch.compile


def test_compile_fullgraph_every_op_with_backward(rng):
    """Every op and its backward traced into one graph (aot_eager: the fake impls and autograd)."""
    x, w, b, kwd = _dw_args(rng, DW_CASES[1])
    xp, wp, bp, kwp = _pw_args(rng, PW_CASES[2])
    xs, dws, pws, bs, kws = _sep_args(rng, SEP_CASES[1])

    def f(x, w, b, xp, wp, bp, xs, dws, pws, bs):
        return (dt.depthwise_conv2d(x, w, b, **kwd).square().sum()
                + dt.pointwise_conv2d(xp, wp, bp, **kwp).square().sum()
                + dt.separable_conv2d(xs, dws, pws, bs, **kws).square().sum())

    args = (x, w, b, xp, wp, bp, xs, dws, pws, bs)
    loss = f(*args)
    grads = torch.autograd.grad(loss, args)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss_c = compiled(*args)
    grads_c = torch.autograd.grad(loss_c, args)
    torch.testing.assert_close(loss_c, loss, rtol=1e-12, atol=0)
    for g, gc in zip(grads, grads_c):
        torch.testing.assert_close(gc, g, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- modules


def test_depthwise_module_loads_conv2d_state_dict_and_matches_init(rng):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, stride=2, padding=1, groups=3, dtype=F64)
    torch.manual_seed(0)
    mod = dt.DepthwiseConv2d(3, 3, stride=2, padding=1, multiplier=2, backend=HOST, dtype=F64)
    assert torch.equal(mod.weight, conv.weight) and torch.equal(mod.bias, conv.bias)  # same init
    mod2 = dt.DepthwiseConv2d(3, 3, stride=2, padding=1, multiplier=2, backend=HOST, dtype=F64)
    mod2.load_state_dict(conv.state_dict())
    assert set(mod2.state_dict()) == {"weight", "bias"}
    x = _t(rng, 2, 3, 9, 7)
    torch.testing.assert_close(mod2(x), conv(x), rtol=1e-12, atol=1e-12)


def test_pointwise_module_loads_1x1_conv2d_state_dict(rng):
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 5, 1, dtype=F64)
    torch.manual_seed(1)
    mod = dt.PointwiseConv2d(4, 5, activation="relu", backend=HOST, dtype=F64)
    assert torch.equal(mod.weight, conv.weight) and mod.weight.shape == (5, 4, 1, 1)
    mod.load_state_dict(conv.state_dict())
    x, r = _t(rng, 2, 4, 3, 5), _t(rng, 2, 5, 3, 5)
    torch.testing.assert_close(mod(x, residual=r), torch.relu(conv(x)) + r, rtol=1e-12,
                               atol=1e-12)


def test_separable_module_matches_two_conv2d(rng):
    torch.manual_seed(2)
    dw = nn.Conv2d(3, 3, 3, padding=1, groups=3, bias=False, dtype=F64)
    pw = nn.Conv2d(3, 4, 1, dtype=F64)
    torch.manual_seed(2)
    mod = dt.SeparableConv2d(3, 4, 3, padding=1, dw_activation="relu", backend=HOST, dtype=F64)
    assert torch.equal(mod.dw_weight, dw.weight) and torch.equal(mod.pw_weight, pw.weight)
    assert torch.equal(mod.bias, pw.bias)
    assert set(mod.state_dict()) == {"dw_weight", "pw_weight", "bias"}
    x, r = _t(rng, 2, 3, 6, 5), _t(rng, 2, 4, 6, 5)
    torch.testing.assert_close(mod(x, residual=r), pw(torch.relu(dw(x))) + r, rtol=1e-12,
                               atol=1e-12)


def test_nhwc_module(rng):
    mod = dt.DepthwiseConv2d(3, (3, 5), padding="same", activation="relu6", layout="NHWC",
                             backend=HOST, dtype=F64)
    x = _t(rng, 2, 6, 7, 3)
    y = mod(x)
    expected = torch.nn.functional.relu6(torch.nn.functional.conv2d(
        x.permute(0, 3, 1, 2), mod.weight, mod.bias, padding=(1, 2), groups=3)).permute(0, 2, 3, 1)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    assert "layout='NHWC'" in repr(mod)


def test_module_and_function_errors():
    with pytest.raises(ValueError, match=r"DepthwiseConv2d: stride must be >= 1"):
        dt.DepthwiseConv2d(3, 3, stride=0)
    with pytest.raises(ValueError, match=r"PointwiseConv2d: activation must be None"):
        dt.PointwiseConv2d(3, 4, activation="tanh")
    with pytest.raises(ValueError, match=r"SeparableConv2d: layout must be 'NCHW' or 'NHWC'"):
        dt.SeparableConv2d(3, 4, 3, layout="CHWN")
    x, w = torch.ones(1, 2, 5, 5), torch.ones(3, 1, 3, 3)
    with pytest.raises(ValueError, match=r"depthwise_conv2d: argument 'weight' has 3 output"):
        dt.depthwise_conv2d(x, w, backend=HOST)
    with pytest.raises(ValueError, match=r"depthwise_conv2d: padding must be >= 0"):
        dt.depthwise_conv2d(x, torch.ones(2, 1, 3, 3), padding=-1, backend=HOST)


# ----------------------------------------------------------------------------- a training run


def _block(dwops_modules: bool, c: int, expand: int, stride: int):
    """MobileNetV2 inverted residual: 1x1 expand + ReLU6, 3x3 depthwise + ReLU6, BN, 1x1 project
    (+ x when stride 1), built from dwops.torch modules or from torch.nn."""
    hidden = c * expand

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            if dwops_modules:
                self.expand = dt.PointwiseConv2d(c, hidden, activation="relu6", backend=HOST)
                self.dw = dt.DepthwiseConv2d(hidden, 3, stride, padding=1, activation="relu6",
                                             backend=HOST)
                self.project = dt.PointwiseConv2d(hidden, c, backend=HOST)
            else:
                self.expand = nn.Sequential(nn.Conv2d(c, hidden, 1), nn.ReLU6())
                self.dw = nn.Sequential(nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden),
                                        nn.ReLU6())
                self.project = nn.Conv2d(hidden, c, 1)
            self.bn = nn.BatchNorm2d(hidden)

        def forward(self, x):
            h = self.bn(self.dw(self.expand(x)))
            if stride == 1:
                return self.project(h, residual=x) if dwops_modules else self.project(h) + x
            return self.project(h)

    return Block().double()


@pytest.mark.parametrize("stride", [1, 2])
def test_inverted_residual_block_trains_like_torch_nn(rng, stride):
    torch.manual_seed(3)
    ours, theirs = _block(True, 4, 3, stride), _block(False, 4, 3, stride)
    state = {k.replace(".0.", "."): v for k, v in theirs.state_dict().items()}
    ours.load_state_dict(state)
    opt_a = torch.optim.SGD(ours.parameters(), lr=0.05, momentum=0.9)
    opt_b = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=0.9)
    x = torch.tensor(rng.standard_normal((4, 4, 9, 9)))
    out = (9 - 1) // stride + 1
    target = torch.tensor(rng.standard_normal((4, 4, out, out)))
    losses = []
    for _ in range(4):
        for model, opt in ((ours, opt_a), (theirs, opt_b)):
            opt.zero_grad()
            loss = (model(x) - target).square().mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    la, lb = np.array(losses[0::2]), np.array(losses[1::2])
    np.testing.assert_allclose(la, lb, rtol=1e-11, atol=0)
    assert la[-1] < la[0]  # it learns
    theirs_after = {k.replace(".0.", "."): v for k, v in theirs.state_dict().items()}
    for name, pa in ours.state_dict().items():
        torch.testing.assert_close(pa, theirs_after[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                    reason="Inductor's CPU code generation needs a C++ compiler")
def test_inductor_compiles_the_block(rng):
    """torch.compile's default backend (Inductor) around the custom ops, forward and backward."""
    torch.manual_seed(4)
    model = _block(True, 3, 2, 1)
    x = torch.tensor(rng.standard_normal((2, 3, 6, 6)))
    loss = model(x).square().sum()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    loss_c = compiled(x).square().sum()
    grads_c = torch.autograd.grad(loss_c, list(model.parameters()))
    torch.testing.assert_close(loss_c, loss, rtol=1e-12, atol=0)
    for g, gc in zip(grads, grads_c):
        torch.testing.assert_close(gc, g, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- imports


def test_dwops_torch_does_not_import_jax():
    code = (
        "import sys, dwops, dwops.torch, torch\n"
        f"x = torch.ones(1, 2, 5, 5, requires_grad=True)\n"
        f"dwops.torch.depthwise_conv2d(x, torch.ones(2, 1, 3, 3), backend={HOST!r}).sum()"
        ".backward()\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('jax', 'jaxlib', 'tensorflow'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
