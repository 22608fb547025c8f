"""Property tests over random problems: the reference against the loop oracle, and the fast "cpu"
backend against the reference, for the forward op and both gradients, in both layouts."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dwops
from tests import oracle
from tests.conftest import assert_close
from tests.test_reference import _from_layout, _pads, _to_layout

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def problems(draw, max_hw=9):
    kh, kw = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    form = draw(st.sampled_from(["int", "pair", "sides", "same", "valid"]))
    if form == "int":
        padding = draw(st.integers(0, 3))
    elif form == "pair":
        padding = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    elif form == "sides":
        padding = tuple((draw(st.integers(0, 3)), draw(st.integers(0, 3))) for _ in range(2))
    else:
        padding = form
    # "same" never gives an empty output; otherwise the input covers one dilated kernel.
    min_h = 1 if form == "same" else dh * (kh - 1) + 1
    min_w = 1 if form == "same" else dw * (kw - 1) + 1
    h = draw(st.integers(min_h, max_hw + dh * (kh - 1)))
    w = draw(st.integers(min_w, max_hw + dw * (kw - 1)))
    n, c, m = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    layout = draw(st.sampled_from(["NCHW", "NHWC"]))
    seed = draw(st.integers(0, 2**32 - 1))
    return dict(n=n, c=c, m=m, h=h, w=w, k=(kh, kw), s=(sh, sw), d=(dh, dw), padding=padding,
                layout=layout, seed=seed)


def _arrays(p, dtype="float64"):
    rng = np.random.default_rng(p["seed"])
    x = rng.uniform(-1, 1, (p["n"], p["c"], p["h"], p["w"]))
    wt = rng.uniform(-1, 1, (p["c"] * p["m"], 1, *p["k"]))
    b = rng.uniform(-1, 1, (p["c"] * p["m"],))
    return x, wt, b, rng


def _kw(p):
    return dict(stride=p["s"], dilation=p["d"], padding=p["padding"], layout=p["layout"])


@SETTINGS
@given(problems(max_hw=6))
def test_reference_matches_oracle(p):
    x, wt, b, rng = _arrays(p)
    pads = _pads(p["padding"], (p["h"], p["w"]), p["k"], p["s"], p["d"])
    lay = p["layout"]
    y = dwops.reference.depthwise_conv2d(_to_layout(x, lay), wt, b, **_kw(p))
    expected = oracle.depthwise(x, wt, b, p["s"], p["d"], pads)
    assert_close(_from_layout(y, lay), expected, "float64")
    gy = rng.uniform(-1, 1, expected.shape)
    gx = dwops.reference.depthwise_conv2d_grad_input(_to_layout(gy, lay), wt,
                                                     _to_layout(x, lay).shape, **_kw(p))
    assert_close(_from_layout(gx, lay), oracle.depthwise_grad_input(gy, wt, x.shape, p["s"],
                                                                    p["d"], pads), "float64")
    gw = dwops.reference.depthwise_conv2d_grad_weight(_to_layout(x, lay), _to_layout(gy, lay),
                                                      wt.shape, **_kw(p))
    assert_close(gw, oracle.depthwise_grad_weight(x, gy, wt.shape, p["s"], p["d"], pads), "float64")


def _cpu_available():
    return dwops.backend_available("cpu")


@pytest.mark.skipif(not _cpu_available(), reason="cpu backend not importable")
@SETTINGS
@given(problems(), st.sampled_from(["float32", "float64"]),
       st.sampled_from([None, "relu", "relu6", "silu", "gelu"]))
def test_cpu_backend_matches_reference(p, dtype, activation):
    x, wt, b, rng = _arrays(p)
    lay = p["layout"]
    x, wt, b = (a.astype(dtype) for a in (_to_layout(x, lay), wt, b))
    kw = _kw(p)
    y = dwops.depthwise_conv2d(x, wt, b, activation=activation, backend="cpu", **kw)
    y_ref = dwops.depthwise_conv2d(x, wt, b, activation=activation, backend="numpy", **kw)
    # Error relative to the sum of |products| (the conv of |x| and |w|) plus |bias|.
    scale = dwops.depthwise_conv2d(np.abs(x), np.abs(wt), np.abs(b), backend="numpy", **kw)
    assert_close(y, y_ref, dtype, scale=np.maximum(scale, 1.0))
    gy = rng.uniform(-1, 1, y.shape).astype(dtype)
    gx = dwops.depthwise_conv2d_grad_input(gy, wt, x.shape, backend="cpu", **kw)
    gx_ref = dwops.depthwise_conv2d_grad_input(gy, wt, x.shape, backend="numpy", **kw)
    assert_close(gx, gx_ref, dtype, scale=np.maximum(
        dwops.depthwise_conv2d_grad_input(np.abs(gy), np.abs(wt), x.shape, backend="numpy", **kw), 1.0))
    gw = dwops.depthwise_conv2d_grad_weight(x, gy, wt.shape, backend="cpu", **kw)
    gw_ref = dwops.depthwise_conv2d_grad_weight(x, gy, wt.shape, backend="numpy", **kw)
    assert_close(gw, gw_ref, dtype, scale=np.maximum(
        dwops.depthwise_conv2d_grad_weight(np.abs(x), np.abs(gy), wt.shape, backend="numpy", **kw), 1.0))


@pytest.mark.skipif(not _cpu_available(), reason="cpu backend not importable")
@SETTINGS
@given(problems(max_hw=7), st.integers(1, 9), st.sampled_from([None, "relu", "gelu"]),
       st.booleans(), st.booleans())
def test_cpu_separable_matches_reference(p, cout, activation, with_bias, with_residual):
    x, wt, b, rng = _arrays(p)
    lay = p["layout"]
    x = _to_layout(x, lay)
    pw = rng.uniform(-1, 1, (cout, wt.shape[0]))
    bias = rng.uniform(-1, 1, (cout,)) if with_bias else None
    y_ref = dwops.separable_conv2d(x, wt, pw, bias, dw_bias=b, dw_activation="relu",
                                   activation=activation, backend="numpy", **_kw(p))
    res = rng.uniform(-1, 1, y_ref.shape) if with_residual else None
    y_ref = dwops.separable_conv2d(x, wt, pw, bias, dw_bias=b, dw_activation="relu",
                                   activation=activation, residual=res, backend="numpy", **_kw(p))
    y = dwops.separable_conv2d(x, wt, pw, bias, dw_bias=b, dw_activation="relu",
                               activation=activation, residual=res, backend="cpu", **_kw(p))
    assert_close(y, y_ref, "float64")
