"""dwops.depthwise_conv2d_backward: the one-call depthwise backward against the reference's single
gradients (grad_input, grad_weight, and grad_output summed for the bias), on the host backends.

Odd sizes, every parameter form (int and pair stride and dilation, every padding form, multiplier
M > 1), both layouts, the four dtypes, every subset of the ``need_*`` flags; the one call equals
the same backend's single-gradient functions exactly; bad calls raise the contract's errors
before any backend runs; framework arrays in, the same framework out. Errors are relative to the
same gradients of |x|, |grad_output| and |w|.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import dwops
import dwops.reference as R
from dwops import _registry, _spec
from dwops._registry import numpy_dtype
from tests.conftest import DTYPES, assert_close, optional_import, rand

torch, needs_torch = optional_import("torch", "PyTorch tensors in and out")

LAYOUTS = ("NCHW", "NHWC")
BACKENDS = [
    "numpy",
    pytest.param("cpu", marks=pytest.mark.skipif(not dwops.backend_available("cpu"),
                                                 reason="the 'cpu' backend is not built")),
]
NEED_NAMES = ("need_input", "need_weight", "need_bias")
# every non-empty subset of the three gradients
NEEDS = [dict(zip(NEED_NAMES, flags)) for flags in itertools.product((False, True), repeat=3)
         if any(flags)]

# (N, C, H, W, M, KH, KW, stride, padding, dilation)
CASES = [
    (2, 3, 9, 11, 1, 3, 3, 1, "same", 1),
    (1, 2, 1, 1, 1, 1, 1, 1, 0, 1),                        # 1x1 input and kernel
    (3, 5, 7, 13, 2, 2, 2, 2, "valid", 1),                 # even kernel, stride 2, M = 2
    (2, 4, 17, 19, 1, 5, 5, (1, 2), ((2, 1), (0, 3)), 2),  # per-side padding, dilation 2
    (1, 3, 23, 11, 3, 7, 7, 3, "same", 1),                 # multiplier 3, stride 3 "same"
    (2, 2, 13, 15, 2, 3, 5, (3, 1), (1, 2), (1, 3)),       # non-square kernel, pair forms
    (1, 7, 31, 5, 1, 3, 1, (1, 3), ((0, 4), (2, 2)), 1),   # more padding than the kernel needs
    (2, 3, 12, 15, 2, 3, 5, 1, ((2, 0), (1, 3)), (2, 1)),  # stride 1, asymmetric, dilation
    (2, 70, 6, 5, 1, 3, 3, 2, 1, 1),                       # many small planes, a partial group
]


def _geometry(case, layout):
    return dict(stride=case[7], padding=case[8], dilation=case[9], layout=layout)


def _inputs(rng, case, layout, dtype):
    """Fresh random x (in ``layout``), weight and grad_output (the forward output's shape)."""
    n, c, h, w, m, kh, kw = case[:7]
    x = rand(rng, _spec._physical(layout, n, c, h, w), dtype)
    wt = rand(rng, (c * m, 1, kh, kw), dtype)
    p, _ = _spec.depthwise("t", x, wt, None, *case[7:], layout, None)
    return x, rand(rng, p.y_shape, dtype), wt


def _reduce_axes(layout):
    return (0, 2, 3) if layout == "NCHW" else (0, 1, 2)


def _composition(x, gy, w, geo, need):
    """The reference's single gradients in float64 (None where not asked for)."""
    x, gy, w = (np.asarray(a).astype(np.float64) for a in (x, gy, w))
    return (
        R.depthwise_conv2d_grad_input(gy, w, x.shape, **geo) if need["need_input"] else None,
        R.depthwise_conv2d_grad_weight(x, gy, w.shape, **geo) if need["need_weight"] else None,
        gy.sum(axis=_reduce_axes(geo["layout"])) if need["need_bias"] else None,
    )


def _check(got, x, gy, w, geo, need, dtype):
    """``got`` against the reference composition, errors relative to the composition of the
    magnitudes; None exactly where not asked for."""
    assert isinstance(got, tuple) and len(got) == 3
    want = _composition(x, gy, w, geo, need)
    scale = _composition(*(np.abs(np.asarray(a).astype(np.float64)) for a in (x, gy, w)), geo,
                         need)
    shapes = (x.shape, w.shape, (w.shape[0],))
    for name, g, e, s, shape in zip(NEED_NAMES, got, want, scale, shapes):
        assert (g is None) == (not need[name]), name
        if g is None:
            continue
        assert isinstance(g, np.ndarray) and g.dtype == numpy_dtype(dtype), name
        assert g.shape == shape, name
        assert_close(g, e, dtype, scale=np.maximum(s, 1e-3), what=f"{name} {geo}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_matches_reference_composition(rng, case, layout, dtype, backend):
    x, gy, w = _inputs(rng, case, layout, dtype)
    geo = _geometry(case, layout)
    need = dict.fromkeys(NEED_NAMES, True)
    got = dwops.depthwise_conv2d_backward(x, gy, w, **geo, **need, backend=backend)
    _check(got, x, gy, w, geo, need, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("need", NEEDS, ids=lambda n: "+".join(k[5:] for k, v in n.items() if v))
def test_every_need_subset(rng, need, layout, dtype, backend):
    """Each subset gives exactly its gradients, equal to the same backend's single-gradient
    functions (bit for bit) and to the reference."""
    case = CASES[5]
    x, gy, w = _inputs(rng, case, layout, dtype)
    geo = _geometry(case, layout)
    got = dwops.depthwise_conv2d_backward(x, gy, w, **geo, **need, backend=backend)
    _check(got, x, gy, w, geo, need, dtype)
    if need["need_input"]:
        np.testing.assert_array_equal(got[0], dwops.depthwise_conv2d_grad_input(
            gy, w, x.shape, **geo, backend=backend))
    if need["need_weight"]:
        np.testing.assert_array_equal(got[1], dwops.depthwise_conv2d_grad_weight(
            x, gy, w.shape, **geo, backend=backend))


def test_defaults_and_reference_function(rng):
    """need_input and need_weight by default, no bias; dwops.reference has the same function."""
    x, gy, w = _inputs(rng, CASES[2], "NCHW", "float64")
    geo = _geometry(CASES[2], "NCHW")
    gx, gw, gb = R.depthwise_conv2d_backward(x, gy, w, **geo)
    assert gb is None
    _check((gx, gw, gb), x, gy, w, geo, {"need_input": True, "need_weight": True,
                                         "need_bias": False}, "float64")
    for a, b in zip((gx, gw), dwops.depthwise_conv2d_backward(x, gy, w, **geo)):
        assert_close(a, b, "float64")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_default_bias_reduction(rng, layout, dtype, backend):
    """The base Backend's bias gradient (the route of the GPU backends: the pointwise weight
    gradient against ones) on a host backend, against grad_output summed in float64."""
    x, gy, w = _inputs(rng, CASES[4], layout, dtype)
    p, _ = _spec.depthwise_backward("t", x, gy, w, *CASES[4][7:], layout, {"need_bias": True})
    be = _registry.load(backend)
    gb = np.full(p.CO, np.nan, numpy_dtype(dtype))
    _registry.Backend._depthwise_grad_bias(be, p, gy, gb)
    g64 = gy.astype(np.float64)
    assert_close(gb, g64.sum(axis=_reduce_axes(layout)), dtype,
                 scale=np.maximum(np.abs(g64).sum(axis=_reduce_axes(layout)), 1e-3))


def test_non_contiguous_inputs(rng):
    x, gy, w = _inputs(rng, CASES[3], "NCHW", "float32")
    geo = _geometry(CASES[3], "NCHW")
    need = dict.fromkeys(NEED_NAMES, True)
    xt = np.asfortranarray(x)
    gyt = np.ascontiguousarray(gy.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
    assert not (xt.flags.c_contiguous or gyt.flags.c_contiguous)
    for backend in ("numpy", "cpu") if dwops.backend_available("cpu") else ("numpy",):
        got = dwops.depthwise_conv2d_backward(xt, gyt, w, **geo, **need, backend=backend)
        _check(got, x, gy, w, geo, need, "float32")


@needs_torch
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32] if torch else [])
def test_torch_tensors_in_and_out(rng, dtype):
    case = CASES[2]
    x, gy, w = _inputs(rng, case, "NHWC", "float32")
    geo = _geometry(case, "NHWC")
    need = {"need_input": False, "need_weight": True, "need_bias": True}
    tx, tgy, tw = (torch.tensor(a).to(dtype) for a in (x, gy, w))
    got = dwops.depthwise_conv2d_backward(tx, tgy, tw, **geo, **need)
    assert got[0] is None
    for g in got[1:]:
        assert isinstance(g, torch.Tensor) and g.dtype == dtype
    name = str(dtype).removeprefix("torch.")
    host = [None] + [g.float().numpy().astype(numpy_dtype(name)) for g in got[1:]]
    _check(tuple(host), *(t.float().numpy().astype(numpy_dtype(name)) for t in (tx, tgy, tw)),
           geo, need, name)


# ----------------------------------------------------------------------------- errors


@pytest.fixture
def arrays(rng):
    return {"x": rand(rng, (2, 3, 8, 8)), "gy": rand(rng, (2, 6, 6, 6)),
            "w": rand(rng, (6, 1, 3, 3))}


ERRORS = [
    (lambda a: dwops.depthwise_conv2d_backward(a["x"], a["gy"][:, :, :5], a["w"]), ValueError,
     r"depthwise_conv2d_backward: argument 'grad_output' must have shape \(2, 6, 6, 6\) \(the "
     r"NCHW output of x\), got \(2, 6, 5, 6\)"),
    (lambda a: dwops.depthwise_conv2d_backward(a["x"], a["gy"], a["w"], padding=1), ValueError,
     r"argument 'grad_output' must have shape \(2, 6, 8, 8\)"),
    (lambda a: dwops.depthwise_conv2d_backward(a["x"], a["gy"], a["w"], layout="NHWC"),
     ValueError, r"argument 'weight' has 6 output channels, not a multiple of the 8 input"),
    (lambda a: dwops.depthwise_conv2d_backward(a["x"], a["gy"][0], a["w"]), ValueError,
     r"argument 'grad_output' must be 4-d, got shape \(6, 6, 6\)"),
    (lambda a: dwops.depthwise_conv2d_backward(a["x"][0], a["gy"], a["w"]), ValueError,
     r"argument 'x' must be 4-d"),
    (lambda a: dwops.depthwise_conv2d_backward(a["x"], a["gy"], a["w"][:5]), ValueError,
     r"argument 'weight' has 5 output channels, not a multiple of the 3 input channels"),
    (lambda a: dwops.depthwise_conv2d_backward(a["x"], a["gy"], a["w"], need_input=False,
                                               need_weight=False), ValueError,
     r"depthwise_conv2d_backward: nothing to compute: at least one of need_input, need_weight, "
     r"need_bias must be True"),
    (lambda a: dwops.depthwise_conv2d_backward(a["x"], a["gy"], a["w"], need_bias=1), ValueError,
     r"depthwise_conv2d_backward: need_bias must be True or False, got 1"),
    (lambda a: dwops.depthwise_conv2d_backward(a["x"], a["gy"].astype(np.float64), a["w"]),
     TypeError, r"argument 'grad_output' has dtype float64 but 'x' has float32"),
    (lambda a: dwops.depthwise_conv2d_backward(a["x"], a["gy"], a["w"].astype(np.float16)),
     TypeError, r"argument 'weight' has dtype float16 but 'x' has float32"),
    (lambda a: dwops.depthwise_conv2d_backward(a["x"].astype(np.int32), a["gy"], a["w"]),
     TypeError, r"argument 'x' must have a floating dtype"),
    (lambda a: dwops.depthwise_conv2d_backward(a["x"], a["gy"], a["w"], stride=0), ValueError,
     r"depthwise_conv2d_backward: stride must be >= 1, got 0"),
    (lambda a: dwops.depthwise_conv2d_backward(a["x"], a["gy"], a["w"], padding="full"),
     ValueError, r"padding string must be 'same' or 'valid', got 'full'"),
    (lambda a: dwops.depthwise_conv2d_backward(a["x"], a["gy"], a["w"], layout="NHCW"),
     ValueError, r"layout must be 'NCHW' or 'NHWC', got 'NHCW'"),
    (lambda a: dwops.depthwise_conv2d_backward(a["x"], a["gy"], a["w"], backend="cuda"),
     ValueError, r"depthwise_conv2d_backward: backend must be one of"),
]


@pytest.mark.parametrize("call, exc, pattern", ERRORS)
def test_bad_calls_raise_before_any_backend_runs(arrays, monkeypatch, call, exc, pattern):
    """The contract's errors, raised by the validation layer: no backend op runs, nothing is
    written, the inputs are unchanged."""
    def never(*args, **kwargs):
        raise AssertionError("a backend ran on a bad call")

    monkeypatch.setattr(_registry.Backend, "depthwise_backward", never)
    for name in ("numpy", "cpu"):
        if dwops.backend_available(name):
            monkeypatch.setattr(_registry.load(name), "allocate", never)
            monkeypatch.setattr(_registry.load(name), "depthwise_backward", never)
    before = {k: v.copy() for k, v in arrays.items()}
    with pytest.raises(exc, match=pattern):
        call(arrays)
    for k in arrays:
        np.testing.assert_array_equal(arrays[k], before[k])
