"""Every Numba CUDA kernel and parameter path under the Numba CUDA simulator, against the reference.

Not collected by the normal test run (the name does not start with ``test_``):
``tests/test_numba_cuda.py`` runs this module in a separate process with
``NUMBA_ENABLE_CUDASIM=1``, which must be set before ``numba.cuda`` is first imported.

Shapes are tiny (the simulator runs every CUDA thread as a Python thread) and chosen to hit the
tile edges of each kernel: sizes 1, tile - 1, tile and tile + 1 (depthwise NCHW tiles are 16 x 32
outputs, NHWC tiles 4 x 8 pixels x 32 channels, GEMM tiles 64 x 64 with 16-deep k slices, fused
separable tiles 64 pixels). Every output is poisoned with NaN before the kernel runs, so an
element the kernel fails to write fails the comparison. Each case states which kernel variant it
reaches (specialized or generic kernel size, staged or direct, fused or unfused, split or not),
and asserts it.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
    pytest.skip("runs under NUMBA_ENABLE_CUDASIM=1 only (tests/test_numba_cuda.py starts it)",
                allow_module_level=True)

from numba import cuda  # noqa: E402

import dwops  # noqa: E402
import dwops.reference as R  # noqa: E402
from dwops import _spec  # noqa: E402
from dwops.kernels import _numba_conv1d as D1  # noqa: E402
from dwops.kernels import _numba_depthwise as D  # noqa: E402
from dwops.kernels import _numba_gemm as G  # noqa: E402
from dwops.kernels import numba_cuda as NB  # noqa: E402
from dwops.kernels._numba_common import fits, kernel_key  # noqa: E402
from tests.conftest import (assert_close, assert_conv1d_backward, conv1d_inputs,  # noqa: E402
                            rand)

BE = NB.BACKEND


def dev(a):
    return None if a is None else cuda.to_device(np.ascontiguousarray(a))


def poisoned(shape, dtype):
    return cuda.to_device(np.full(shape, np.nan, dtype=dtype))


def absf(a):
    """|a| with NaN replaced by 0: the magnitude a tolerance is relative to."""
    return None if a is None else np.nan_to_num(np.abs(a.astype(np.float64)))


def physical(layout, n, c, h, w):
    return (n, c, h, w) if layout == "NCHW" else (n, h, w, c)


# ----------------------------------------------------------------------------- depthwise

# (id, layout, dtype, N, C, H, W, M, KH, KW, stride, padding, dilation, activation, bias, variant)
# variant: "staged" or "direct" (shared-memory footprint past the budget), asserted per op.
DEPTHWISE = [
    # NCHW: 3x3 fast path, H and W one past the 16 x 32 tile, bias + relu6, NaN in the input
    ("nchw-3x3-tile+1", "NCHW", "float32", 1, 2, 17, 33, 1, 3, 3, 1, 1, 1, "relu6", True, "staged"),
    # 5x5 fast path, multiplier 3, stride 2, dilation (1, 2), explicit 4-sided padding, float16
    ("nchw-5x5-m3-s2-d12", "NCHW", "float16", 1, 1, 31, 20, 3, 5, 5, 2, ((2, 1), (0, 3)), (1, 2),
     "silu", True, "staged"),
    # generic rectangular 4x2, stride (1, 3), "same" padding, float64, tile-exact 16 x 32 input
    ("nchw-4x2-same", "NCHW", "float64", 2, 1, 16, 32, 1, 4, 2, (1, 3), "same", 1, "gelu", True,
     "staged"),
    # 7x7 fast path, tile - 1 sizes, multiplier 2, no bias
    ("nchw-7x7-tile-1", "NCHW", "float32", 1, 1, 15, 31, 2, 7, 7, 1, 3, 1, None, False, "staged"),
    # 1x1 fast path on a 1x1 image, stride 2, "valid"
    ("nchw-1x1-size1", "NCHW", "float32", 2, 3, 1, 1, 1, 1, 1, 2, "valid", 1, "relu", True,
     "staged"),
    # 31x31, the largest kernel (generic path), one output
    ("nchw-31x31", "NCHW", "float32", 1, 1, 31, 31, 1, 31, 31, 1, 0, 1, None, True, "staged"),
    # 3x3 with dilation 30 in float64: the halo exceeds the budget, direct variant
    ("nchw-direct", "NCHW", "float64", 1, 1, 62, 62, 1, 3, 3, 1, 0, 30, "relu", True, "direct"),
    # NHWC: 3x3, 33 output channels (channel tile + 1) from 11 inputs x multiplier 3, pixel tile + 1
    ("nhwc-3x3-m3", "NHWC", "float32", 1, 11, 5, 9, 3, 3, 3, 1, 1, 1, "relu", True, "staged"),
    # 5x5 fast path, 32 channels (one full tile), stride 2, dilation (2, 1), "same", float16
    ("nhwc-5x5-same-s2", "NHWC", "float16", 1, 32, 7, 15, 1, 5, 5, 2, "same", (2, 1), "silu", False,
     "staged"),
    # generic 2x3, 31 channels (tile - 1), stride (3, 1), asymmetric padding, float64
    ("nhwc-2x3", "NHWC", "float64", 2, 31, 4, 8, 1, 2, 3, (3, 1), ((0, 2), (1, 0)), 1, "gelu", True,
     "staged"),
    # 7x7 on a 1x1 image (size 1), padding 3
    ("nhwc-7x7-size1", "NHWC", "float32", 1, 3, 1, 1, 1, 7, 7, 1, 3, 1, None, True, "staged"),
    # 1x1 fast path, multiplier 2, float16
    ("nhwc-1x1-m2", "NHWC", "float16", 1, 3, 3, 2, 2, 1, 1, 1, 0, 1, "relu6", True, "staged"),
    # dilation 7: the 32-channel halo exceeds the budget, direct variant
    ("nhwc-direct", "NHWC", "float32", 1, 5, 16, 16, 1, 3, 3, 1, 0, 7, "relu", True, "direct"),
]


@pytest.mark.parametrize("case", DEPTHWISE, ids=[c[0] for c in DEPTHWISE])
def test_depthwise(case, rng):
    (_, layout, dtype, N, C, H, W, M, KH, KW, stride, padding, dilation, act, has_bias,
     variant) = case
    xs = physical(layout, N, C, H, W)
    x = rand(rng, xs, dtype)
    w = rand(rng, (C * M, 1, KH, KW), dtype)
    b = rand(rng, (C * M,), dtype) if has_bias else None
    if case[0] in ("nchw-3x3-tile+1", "nhwc-3x3-m3"):
        x.flat[rng.integers(x.size)] = np.nan  # NaN propagates to the outputs that read it
    geo = dict(stride=stride, padding=padding, dilation=dilation, layout=layout)
    p, _ = _spec.depthwise("t", x, w, b, stride, padding, dilation, layout, act)
    assert fits(D.forward_smem(p)) == (variant == "staged")
    assert kernel_key(KH, KW) == ((KH, KW) if KH in (1, 3, 5, 7) and KH == KW else (0, 0))

    out = poisoned(p.y_shape, dtype)
    BE.depthwise_forward(p, dev(x), dev(w), dev(b), out)
    expected = R.depthwise_conv2d(x, w, b, activation=act, **geo)
    scale = R.depthwise_conv2d(absf(x), absf(w), absf(b), **geo)
    assert_close(out.copy_to_host(), expected, dtype, scale, "forward")

    gy = rand(rng, p.y_shape, dtype)
    pg, _ = _spec.depthwise_grad_input("t", gy, w, xs, stride, padding, dilation, layout)
    assert fits(D.grad_input_smem(pg)) == (variant == "staged")
    out = poisoned(xs, dtype)
    BE.depthwise_grad_input(pg, dev(gy), dev(w), out)
    expected = R.depthwise_conv2d_grad_input(gy, w, xs, **geo)
    scale = R.depthwise_conv2d_grad_input(absf(gy), absf(w), xs, **geo)
    assert_close(out.copy_to_host(), expected, dtype, scale, "grad_input")

    pw, _ = _spec.depthwise_grad_weight("t", x, gy, w.shape, stride, padding, dilation, layout)
    assert fits(D.grad_weight_smem(pw)) == (variant == "staged")
    out = poisoned(w.shape, dtype)
    BE.depthwise_grad_weight(pw, dev(x), dev(gy), out)
    expected = R.depthwise_conv2d_grad_weight(x, gy, w.shape, **geo)
    scale = R.depthwise_conv2d_grad_weight(absf(x), absf(gy), w.shape, **geo)
    assert_close(out.copy_to_host(), expected, dtype, scale, "grad_weight")


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("target", [1, 3])
def test_depthwise_grad_weight_splits(layout, target, rng, monkeypatch):
    """The two-stage reduction with one split (target 1 block) and with uneven splits."""
    monkeypatch.setattr(NB, "TARGET_BLOCKS", target)
    N, C, H, W = 3, 2, 5, 9
    xs = physical(layout, N, C, H, W)
    x = rand(rng, xs, "float32")
    p, _ = _spec.depthwise("t", x, rand(rng, (C, 1, 3, 3)), None, 1, 1, 1, layout, None)
    gy = rand(rng, p.y_shape, "float32")
    _, splits, per = D.grad_weight_plan(p, target)
    assert (splits == 1) == (target == 1) and (target == 1 or splits * per >= N)
    out = poisoned(p.w_shape, "float32")
    BE.depthwise_grad_weight(p, dev(x), dev(gy), out)
    geo = dict(stride=1, padding=1, layout=layout)
    assert_close(out.copy_to_host(), R.depthwise_conv2d_grad_weight(x, gy, p.w_shape, **geo),
                 "float32", R.depthwise_conv2d_grad_weight(absf(x), absf(gy), p.w_shape, **geo))


# ----------------------------------------------------------------------------- pointwise

# (id, layout, dtype, N, CI, CO, H, W, activation, bias, residual)
POINTWISE = [
    # CI = BK + 1, CO = BM + 1, H*W = BN - 1
    ("nchw-edges", "NCHW", "float32", 1, 17, 65, 3, 21, "gelu", True, True),
    # NHWC: N*H*W = BM + 1, CI = BK, CO = BN, float16
    ("nhwc-edges", "NHWC", "float16", 1, 16, 64, 5, 13, "relu", False, True),
    # everything of size 1, float64
    ("nchw-size1", "NCHW", "float64", 1, 1, 1, 1, 1, "relu6", True, False),
    # NHWC, CI = 2 BK + 1, silu
    ("nhwc-ci33", "NHWC", "float32", 2, 33, 3, 2, 3, "silu", True, False),
]


@pytest.mark.parametrize("case", POINTWISE, ids=[c[0] for c in POINTWISE])
def test_pointwise(case, rng):
    _, layout, dtype, N, CI, CO, H, W, act, has_bias, has_res = case
    x = rand(rng, physical(layout, N, CI, H, W), dtype)
    w = rand(rng, (CO, CI), dtype)
    b = rand(rng, (CO,), dtype) if has_bias else None
    ys = physical(layout, N, CO, H, W)
    r = rand(rng, ys, dtype) if has_res else None
    p, _ = _spec.pointwise("t", x, w, b, layout, act, r)
    out = poisoned(ys, dtype)
    BE.pointwise_forward(p, dev(x), dev(w), dev(b), dev(r), out)
    expected = R.pointwise_conv2d(x, w, b, layout=layout, activation=act, residual=r)
    scale = R.pointwise_conv2d(absf(x), absf(w), absf(b), layout=layout, residual=absf(r))
    assert_close(out.copy_to_host(), expected, dtype, scale, "forward")

    gy = rand(rng, ys, dtype)
    pg, _ = _spec.pointwise_grad_input("t", gy, w, layout)
    out = poisoned(x.shape, dtype)
    BE.pointwise_grad_input(pg, dev(gy), dev(w), out)
    assert_close(out.copy_to_host(), R.pointwise_conv2d_grad_input(gy, w, layout=layout), dtype,
                 R.pointwise_conv2d_grad_input(absf(gy), absf(w), layout=layout), "grad_input")

    pw, _ = _spec.pointwise_grad_weight("t", x, gy, layout)
    out = poisoned((CO, CI), dtype)
    BE.pointwise_grad_weight(pw, dev(x), dev(gy), out)
    assert_close(out.copy_to_host(), R.pointwise_conv2d_grad_weight(x, gy, layout=layout), dtype,
                 R.pointwise_conv2d_grad_weight(absf(x), absf(gy), layout=layout), "grad_weight")


@pytest.mark.parametrize("layout,target,N", [("NCHW", 1, 3), ("NCHW", 2, 5), ("NHWC", 3, 2)])
def test_pointwise_grad_weight_splits(layout, target, N, rng, monkeypatch):
    """One split (direct store), batch groups (bpg > 1, NCHW), and k splits of the NHW rows."""
    monkeypatch.setattr(NB, "TARGET_BLOCKS", target)
    CI, CO, H, W = 5, 7, 3, 11
    x = rand(rng, physical(layout, N, CI, H, W))
    gy = rand(rng, physical(layout, N, CO, H, W))
    p, _ = _spec.pointwise_grad_weight("t", x, gy, layout)
    nbr, K = (N, H * W) if layout == "NCHW" else (1, N * H * W)
    bpg, ks, _ = NB._gemm_splits(1, nbr, K)
    assert {1: (bpg, ks) == (N, 1), 2: bpg == 3 and ks == 1, 3: ks == 3}[target]
    out = poisoned((CO, CI), "float32")
    BE.pointwise_grad_weight(p, dev(x), dev(gy), out)
    assert_close(out.copy_to_host(), R.pointwise_conv2d_grad_weight(x, gy, layout=layout),
                 "float32", R.pointwise_conv2d_grad_weight(absf(x), absf(gy), layout=layout))


# ----------------------------------------------------------------------------- separable

# (id, layout, dtype, N, C, M, CO, H, W, KH, KW, stride, padding, dilation, dw_act, act, dw_bias,
#  bias, residual, fused)
SEPARABLE = [
    # fused 3x3 "same", dilation 2: 6 intermediate channels, CO = BM + 1 (two CO slices), W = 33
    ("nchw-fused-3x3", "NCHW", "float32", 1, 3, 2, 65, 3, 33, 3, 3, 1, "same", 2, "relu", None,
     True, True, True, True),
    # fused generic 2x2 stride 2, 17 intermediate channels (BK + 1), float16, NHWC 8x8 tile + 1
    ("nhwc-fused-2x2", "NHWC", "float16", 2, 17, 1, 5, 9, 17, 2, 2, 2, 0, 1, "silu", "gelu", False,
     True, False, True),
    # unfused: dilation 25 makes the float64 input halo too large for the fused tile
    ("nchw-unfused-f64", "NCHW", "float64", 1, 2, 2, 3, 51, 3, 3, 3, 1, 0, (25, 1), "relu6",
     "relu", True, True, True, False),
    # unfused NHWC float16 (float32 intermediate): 180 channels do not fit the fused tile
    ("nhwc-unfused-f16", "NHWC", "float16", 1, 180, 1, 3, 1, 2, 1, 1, 1, 0, 1, None, "silu", True,
     False, True, False),
    # unfused NCHW float16: dilation 45, halo too large
    ("nchw-unfused-f16", "NCHW", "float16", 1, 2, 1, 2, 91, 3, 3, 3, 1, 0, (45, 1), "gelu", None,
     False, True, False, False),
]


@pytest.mark.parametrize("case", SEPARABLE, ids=[c[0] for c in SEPARABLE])
def test_separable(case, rng):
    (_, layout, dtype, N, C, M, CO, H, W, KH, KW, stride, padding, dilation, dw_act, act,
     has_dw_bias, has_bias, has_res, fused) = case
    CM = C * M
    x = rand(rng, physical(layout, N, C, H, W), dtype)
    dw_w = rand(rng, (CM, 1, KH, KW), dtype)
    pw_w = rand(rng, (CO, CM), dtype)
    dw_b = rand(rng, (CM,), dtype) if has_dw_bias else None
    b = rand(rng, (CO,), dtype) if has_bias else None
    dp, _ = _spec.depthwise("t", x, dw_w, None, stride, padding, dilation, layout, None)
    ys = physical(layout, N, CO, dp.OH, dp.OW)
    r = rand(rng, ys, dtype) if has_res else None
    sp, _ = _spec.separable("t", x, dw_w, pw_w, b, dw_b, stride, padding, dilation, layout,
                            dw_act, act, r)
    assert fits(G.separable_smem(sp)) == fused
    out = poisoned(ys, dtype)
    BE.separable_forward(sp, dev(x), dev(dw_w), dev(pw_w), dev(b), dev(dw_b), dev(r), out)
    geo = dict(stride=stride, padding=padding, dilation=dilation, layout=layout)
    expected = R.separable_conv2d(x, dw_w, pw_w, b, dw_bias=dw_b, dw_activation=dw_act,
                                  activation=act, residual=r, **geo)
    mid = R.depthwise_conv2d(absf(x), absf(dw_w), absf(dw_b), **geo)
    scale = R.pointwise_conv2d(mid, absf(pw_w), absf(b), layout=layout, residual=absf(r))
    assert_close(out.copy_to_host(), expected, dtype, scale, "separable")


@pytest.mark.parametrize("act,dtype", [("hardswish", "float32"), ("hardsigmoid", "float16")])
def test_hard_activations(act, dtype, rng):
    """hardswish / hardsigmoid epilogues with pre-activations across -3 and 3 (inputs in [-4, 4]),
    a NaN and a -inf in the input: depthwise (NCHW 3x3 fast path) and the fused separable (NHWC,
    depthwise and pointwise epilogues)."""
    x = rand(rng, (1, 2, 5, 7), dtype, -4.0, 4.0)
    x[0, 0, 1, 2], x[0, 1, 3, 4] = np.nan, -np.inf
    w = rand(rng, (2, 1, 3, 3), dtype)
    b = rand(rng, (2,), dtype)
    p, _ = _spec.depthwise("t", x, w, b, 1, 1, 1, "NCHW", act)
    out = poisoned(p.y_shape, dtype)
    BE.depthwise_forward(p, dev(x), dev(w), dev(b), out)
    expected = R.depthwise_conv2d(x, w, b, padding=1, activation=act)
    assert np.isnan(expected).any() and (np.abs(expected) > 0).any()
    assert_close(out.copy_to_host(), expected, dtype,
                 R.depthwise_conv2d(absf(x), absf(w), absf(b), padding=1), "depthwise")

    xs = np.ascontiguousarray(rand(rng, (1, 3, 4, 3), dtype, -4.0, 4.0))  # NHWC
    dw_w, pw_w = rand(rng, (3, 1, 2, 2), dtype), rand(rng, (4, 3), dtype, -2.0, 2.0)
    dw_b, pb = rand(rng, (3,), dtype), rand(rng, (4,), dtype)
    sp, _ = _spec.separable("t", xs, dw_w, pw_w, pb, dw_b, 1, "same", 1, "NHWC", act, act, None)
    assert fits(G.separable_smem(sp))
    out = poisoned((1, 3, 4, 4), dtype)
    BE.separable_forward(sp, dev(xs), dev(dw_w), dev(pw_w), dev(pb), dev(dw_b), None, out)
    geo = dict(padding="same", layout="NHWC")
    expected = R.separable_conv2d(xs, dw_w, pw_w, pb, dw_bias=dw_b, dw_activation=act,
                                  activation=act, **geo)
    mid = R.depthwise_conv2d(absf(xs), absf(dw_w), absf(dw_b), **geo)
    assert_close(out.copy_to_host(), expected, dtype,
                 R.pointwise_conv2d(mid, absf(pw_w), absf(pb), layout="NHWC"), "separable")


# ----------------------------------------------------------------------------- depthwise 1-d

# (id, layout, dtype, N, C, L, M, K, stride, padding, dilation, activation, bias, state, seq,
#  variant): variant is "staged" / "direct" (NCL shared-memory tile or not), "window" (NLC
#  register window: specialized width, stride 1, dilation 1) or "taps" (NLC, one load per tap).
CONV1D = [
    # Mamba-like: width 4, causal, initial_state, packed sequences (int64), silu, multiplier 2
    ("ncl-k4-causal-state-seq", "NCL", "float32", 2, 1, 37, 2, 4, 1, "causal", 1, "silu", True,
     True, "int64", "staged"),
    # NLC: 33 channels (one past the 32 lanes), float16, the register window with state and seq
    ("nlc-k4-window-state-seq", "NLC", "float16", 1, 33, 21, 1, 4, 1, "causal", 1, "silu", True,
     True, "int32", "window"),
    # generic width 11, stride 3, "same", float64, gelu
    ("ncl-k11-same-s3", "NCL", "float64", 1, 2, 29, 1, 11, 3, "same", 1, "gelu", True, False,
     None, "staged"),
    # specialized width 5 off the window path: stride 2, dilation 2, (left, right) padding, M=3
    ("nlc-k5-s2-d2-m3", "NLC", "float32", 1, 5, 23, 3, 5, 2, (2, 3), 2, "relu6", False, False,
     None, "taps"),
    # width 1 (generic path), "valid", float16, multiplier 2, int padding 2
    ("ncl-k1-m2-pad2", "NCL", "float16", 1, 2, 9, 2, 1, 1, 2, 1, "relu", True, False, None,
     "staged"),
    # width 8, dilation 3, causal state longer than the sequence (final state reads the state)
    ("nlc-k8-d3-short", "NLC", "float64", 1, 3, 10, 1, 8, 1, "causal", 3, None, False, True, None,
     "taps"),
    # width 31 (generic, 4 reduction rounds of the weight gradient), causal, state and seq
    ("ncl-k31-state-seq", "NCL", "float32", 1, 1, 40, 1, 31, 1, "causal", 1, None, True, True,
     "int32", "staged"),
    # width 2 with dilation 6200 in float64: the span exceeds the shared-memory budget
    ("ncl-direct", "NCL", "float64", 1, 1, 6207, 1, 2, 1, "valid", 6200, "silu", True, False,
     None, "direct"),
    # NLC width 7, causal state without seq, float64 window path
    ("nlc-k7-window-state", "NLC", "float64", 2, 2, 13, 2, 7, 1, "causal", 1, "gelu", True, True,
     None, "window"),
]


def _conv1d_backward(p, x, gy, w, st, sq, geo, dtype, needs):
    """Run the backward with the outputs in ``needs`` (letters of "xwbs"), poisoned, against the
    reference."""
    shapes = {"input": ("x", p.x_shape), "weight": ("w", p.w_shape), "bias": ("b", (p.CO,)),
              "initial_state": ("s", p.state_shape)}
    outs = {k: poisoned(shape, dtype) if letter in needs else None
            for k, (letter, shape) in shapes.items()}
    BE.depthwise_conv1d_backward(p, dev(x), dev(gy), dev(w), dev(st), dev(sq), *outs.values())
    got = {k: None if v is None else v.copy_to_host() for k, v in outs.items()}
    assert_conv1d_backward(got, x, gy, w, st, sq, geo, dtype)


@pytest.mark.parametrize("case", CONV1D, ids=[c[0] for c in CONV1D])
def test_conv1d(case, rng):
    """Forward (with the final state when causal) and the one-pass backward with every output."""
    (_, layout, dtype, N, C, L, M, K, stride, padding, dilation, act, bias, state, seq,
     variant) = case
    x, w, b, st, sq = conv1d_inputs(rng, layout, dtype, N, C, L, M, K, dilation, bias, state,
                                     seq)
    causal = padding == "causal"
    p, _ = _spec.depthwise_1d("t", x, w, b, stride, padding, dilation, layout, act, st, causal,
                              sq)
    if layout == "NCL":
        assert D1.ncl_plan(p, lambda tl: D1.forward_smem(p, tl))[1] == (variant == "staged")
    else:
        assert (D1.kernel_key(K) != 0 and stride == 1 and dilation == 1) == (variant == "window")
    assert D1.kernel_key(K) == (K if 2 <= K <= 8 else 0)
    out = poisoned(p.y_shape, dtype)
    final = poisoned(p.state_shape, dtype) if causal else None
    BE.depthwise_conv1d_forward(p, dev(x), dev(w), dev(b), dev(st), dev(sq), out, final)
    geo = dict(stride=stride, padding=padding, dilation=dilation, layout=layout)
    expected = R.depthwise_conv1d(x, w, b, activation=act, initial_state=st, seq_idx=sq,
                                  return_final_state=causal, **geo)
    scale = R.depthwise_conv1d(absf(x), absf(w), absf(b), initial_state=absf(st), seq_idx=sq,
                               **geo)
    if causal:
        expected, expected_final = expected
        assert_close(final.copy_to_host(), expected_final, dtype, None, "final_state")
    assert_close(out.copy_to_host(), expected, dtype, scale, "forward")

    gy = rand(rng, p.y_shape, dtype)
    pb, _ = _spec.depthwise_1d_backward("t", x, gy, w, stride, padding, dilation, layout, st, sq,
                                        {})
    if layout == "NCL":
        staged = D1.ncl_plan(pb, lambda tl: D1.backward_smem(pb, tl, True))[1]
        assert staged == (variant == "staged")
    _conv1d_backward(pb, x, gy, w, st, sq, geo, dtype, "xwbs" if state else "xwb")


@pytest.mark.parametrize("K,L", [(4, 23), (3, 37)])
def test_conv1d_nlc_window_groups(K, L, rng, monkeypatch):
    """The NLC register window over chunks of 16 outputs: several groups of 4 per chunk, then a
    short chunk ending in a partial group; with state and seq_idx."""
    monkeypatch.setattr(D1, "MIN_CHUNK", 16)
    x, w, b, st, sq = conv1d_inputs(rng, "NLC", "float32", 1, 3, L, 1, K, 1, True, True, "int32")
    p, _ = _spec.depthwise_1d("t", x, w, b, 1, "causal", 1, "NLC", "silu", st, False, sq)
    assert D1.nlc_plan(p, p.CO)[0] == 16
    out = poisoned(p.y_shape, "float32")
    BE.depthwise_conv1d_forward(p, dev(x), dev(w), dev(b), dev(st), dev(sq), out, None)
    geo = dict(padding="causal", layout="NLC", seq_idx=sq)
    expected = R.depthwise_conv1d(x, w, b, activation="silu", initial_state=st, **geo)
    scale = R.depthwise_conv1d(absf(x), absf(w), absf(b), initial_state=absf(st), **geo)
    assert_close(out.copy_to_host(), expected, "float32", scale, "forward")


@pytest.mark.parametrize("layout", ["NCL", "NLC"])
def test_conv1d_backward_each_output_and_tiles(layout, rng, monkeypatch):
    """Each need_* output alone over several L tiles (64-output NCL tiles, 4-output NLC warp
    chunks, 32 outputs per block): the weight and bias partials of every tile meet in the
    reduction; with "valid" padding the inputs past the last output belong to the last tile."""
    monkeypatch.setattr(D1, "MAX_TILE", 64)
    N, C, L, M, K = 1, 1, 70, 2, 3
    x, w, _, st, sq = conv1d_inputs(rng, layout, "float32", N, C, L, M, K, 2, False, True,
                                     "int64")
    pf, _ = _spec.depthwise_1d("t", x, w, None, 1, "causal", 2, layout, None, st, False, sq)
    gy = rand(rng, pf.y_shape)
    p, _ = _spec.depthwise_1d_backward("t", x, gy, w, 1, "causal", 2, layout, st, sq, {})
    if layout == "NCL":
        assert D1.ncl_plan(p, lambda tl: D1.backward_smem(p, tl, True))[0] == 64
    else:
        ch, _, tiles_l = D1.nlc_plan(p, p.C)
        assert ch == D1.MIN_CHUNK and tiles_l > 1
    geo = dict(stride=1, padding="causal", dilation=2, layout=layout)
    for needs in ("x", "w", "b", "s"):
        _conv1d_backward(p, x, gy, w, st, sq, geo, "float32", needs)
    # "valid", dilation 3: 64 outputs end a tile exactly, inputs 64..69 follow the last output
    pf, _ = _spec.depthwise_1d("t", x, w, None, 1, "valid", 3, layout, None, None, False, None)
    assert pf.OL == 64
    gy = rand(rng, pf.y_shape)
    p, _ = _spec.depthwise_1d_backward("t", x, gy, w, 1, "valid", 3, layout, None, None, {})
    geo = dict(padding="valid", dilation=3, layout=layout)
    _conv1d_backward(p, x, gy, w, None, None, geo, "float32", "xwb")


@pytest.mark.parametrize("dtype,K,M", [("float32", 4, 1), ("float16", 3, 2), ("float64", 10, 1)])
def test_conv1d_update_decode_equals_full_causal_conv(dtype, K, M, rng):
    """Chunked forward (final state -> initial state) and decode steps (T = 1, then T = 3) from a
    state equal the full causal convolution; the state is updated in place."""
    N, C, L0, T = 2, 3, 9, 3
    total = L0 + 1 + T
    x = rand(rng, (N, C, total), dtype)
    w = rand(rng, (C * M, 1, K), dtype)
    b = rand(rng, (C * M,), dtype)
    full = R.depthwise_conv1d(x, w, b, padding="causal", activation="silu")
    scale = R.depthwise_conv1d(absf(x), absf(w), absf(b), padding="causal")
    # chunk 1: zeros on the left; its final state is the decode state
    x0 = x[:, :, :L0]
    p, _ = _spec.depthwise_1d("t", x0, w, b, 1, "causal", 1, "NCL", "silu", None, True, None)
    y0, state = poisoned(p.y_shape, dtype), poisoned(p.state_shape, dtype)
    BE.depthwise_conv1d_forward(p, dev(x0), dev(w), dev(b), None, None, y0, state)
    assert_close(y0.copy_to_host(), full[:, :, :L0], dtype, scale[:, :, :L0], "chunk")
    d_w, d_b = dev(w), dev(b)
    for start, steps in ((L0, 1), (L0 + 1, T)):
        xs = x[:, :, start:start + steps]
        xs = xs[:, :, 0] if steps == 1 else xs  # (N, C) for a single token
        pu, _ = _spec.depthwise_1d_update("t", xs, state.copy_to_host(), w, b, "silu")
        y = poisoned(pu.y_shape, dtype)
        BE.depthwise_conv1d_update(pu, dev(xs), state, d_w, d_b, y, state)  # in place
        got = y.copy_to_host().reshape(N, C * M, steps)
        sl = slice(start, start + steps)
        assert_close(got, full[:, :, sl], dtype, scale[:, :, sl], f"decode at {start}")
    expected_state = x[:, :, total - (K - 1):]
    assert_close(state.copy_to_host(), expected_state, dtype, None, "state after decode")


def test_conv1d_public_api_and_seq_idx_order(rng):
    """backend='numba' through the public functions with host arrays; the seq_idx order check runs
    on the device; bfloat16 is refused with a hint."""
    x = rand(rng, (2, 7, 3))  # NLC
    w = rand(rng, (3, 1, 4))
    st = rand(rng, (2, 3, 3))
    seq = np.array([[0, 0, 1, 1, 1, 2, 2], [5, 5, 5, 5, 6, 6, 6]], np.int64)
    y, final = dwops.depthwise_conv1d(x, w, padding="causal", layout="NLC", initial_state=st,
                                      return_final_state=True, seq_idx=seq, backend="numba")
    ey, ef = R.depthwise_conv1d(x, w, padding="causal", layout="NLC", initial_state=st,
                                return_final_state=True, seq_idx=seq)
    assert isinstance(y, np.ndarray)
    scale = R.depthwise_conv1d(absf(x), absf(w), padding="causal", layout="NLC",
                               initial_state=absf(st), seq_idx=seq)
    assert_close(y, ey, "float32", scale)
    assert_close(final, ef, "float32")
    assert BE.nondecreasing(dev(seq)) and BE.nondecreasing(dev(seq.astype(np.int32)))
    bad = seq.copy()
    bad[1, 6] = 4
    assert not BE.nondecreasing(dev(bad))
    with pytest.raises(ValueError, match="non-decreasing"):
        dwops.depthwise_conv1d(x, w, padding="causal", layout="NLC", seq_idx=bad, backend="numba")
    import ml_dtypes

    xb = np.ones((1, 2, 5), ml_dtypes.bfloat16)
    with pytest.raises(TypeError, match=r"bfloat16.*backend='cupy'"):
        dwops.depthwise_conv1d(xb, np.ones((2, 1, 3), ml_dtypes.bfloat16), backend="numba")


# ----------------------------------------------------------------------------- public API, plumbing


def test_public_api_numpy_and_torch_cpu(rng):
    """backend='numba' through the public functions: host arrays in, the caller's type out."""
    x = rand(rng, (1, 2, 3, 4))
    w = rand(rng, (2, 1, 3, 3))
    y = dwops.depthwise_conv2d(x, w, padding=1, backend="numba")
    assert isinstance(y, np.ndarray) and y.dtype == np.float32
    assert_close(y, R.depthwise_conv2d(x, w, padding=1), "float32",
                 R.depthwise_conv2d(absf(x), absf(w), padding=1))
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(x).permute(0, 2, 3, 1)  # non-contiguous NHWC view
    pw = rand(rng, (3, 2))
    yt = dwops.pointwise_conv2d(t, torch.from_numpy(pw), layout="NHWC", backend="numba")
    assert isinstance(yt, torch.Tensor) and yt.shape == (1, 3, 4, 3)
    xn = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    assert_close(yt.numpy(), R.pointwise_conv2d(xn, pw, layout="NHWC"), "float32",
                 R.pointwise_conv2d(absf(xn), absf(pw), layout="NHWC"))


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_public_depthwise_backward(layout, rng):
    """backend='numba' through dwops.depthwise_conv2d_backward (the single gradients and the
    bias reduction composed), against the reference."""
    x = rand(rng, physical(layout, 2, 3, 5, 4))
    w = rand(rng, (6, 1, 3, 2))
    geo = dict(stride=(2, 1), padding=((1, 0), (0, 1)), dilation=(1, 2), layout=layout)
    gy = rand(rng, R.depthwise_conv2d(x, w, **geo).shape)
    need = dict(need_input=True, need_weight=True, need_bias=True)
    got = dwops.depthwise_conv2d_backward(x, gy, w, **geo, **need, backend="numba")
    want = R.depthwise_conv2d_backward(x, gy, w, **geo, **need)
    scale = R.depthwise_conv2d_backward(absf(x), absf(gy), absf(w), **geo, **need)
    for g, e, sc in zip(got, want, scale):
        assert isinstance(g, np.ndarray) and g.dtype == np.float32
        assert_close(g, e, "float32", np.maximum(sc, 1e-3))


def test_bfloat16_refused_with_a_hint():
    import ml_dtypes

    x = np.ones((1, 1, 3, 3), ml_dtypes.bfloat16)
    with pytest.raises(TypeError, match=r"bfloat16.*backend='cupy'"):
        dwops.depthwise_conv2d(x, x[:, :, :1, :1], backend="numba")


def test_simulator_backend_is_available():
    assert BE.unavailable_reason() is None and dwops.backend_available("numba")
