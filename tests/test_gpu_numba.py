"""The ``numba`` backend on a real GPU (``pytest -m gpu``; skipped without one).

Every op against the reference on real sizes (a few million elements, odd sizes), every dtype the
backend takes and both layouts; outputs poisoned with NaN before the launch; non-contiguous
inputs through the public API; PyTorch CUDA tensors on a non-default stream. Depthwise 1-d: every
width path (specialized, generic, direct), stride, dilation, padding form and multiplier with
bias, activation, initial/final state and seq_idx; the backward with each need_* subset; chunked
calls and decode steps (state updated in place) against one long call.
"""

from __future__ import annotations

import numpy as np
import pytest

import dwops
import dwops.reference as R
from dwops import _spec

from .conftest import assert_close, assert_conv1d_backward, conv1d_inputs, gpu, rand

pytestmark = [pytest.mark.gpu, gpu]

DTYPES = ("float16", "float32", "float64")
LAYOUTS = ("NCHW", "NHWC")


def _be():
    from dwops.kernels.numba_cuda import BACKEND

    return BACKEND


def dev(a):
    from numba import cuda

    return None if a is None else cuda.to_device(np.ascontiguousarray(a))


def poisoned(shape, dtype):
    from numba import cuda

    return cuda.to_device(np.full(shape, np.nan, dtype=dtype))


def absf(a):
    return None if a is None else np.abs(a.astype(np.float64))


def phys(layout, n, c, h, w):
    return (n, c, h, w) if layout == "NCHW" else (n, h, w, c)


# (N, C, H, W, M, KH, KW, stride, padding, dilation, activation): ~2-4 million input elements
DW_CASES = [
    (2, 37, 129, 257, 1, 3, 3, 1, "same", 1, "relu"),
    (3, 24, 151, 199, 2, 5, 5, 2, ((2, 1), (3, 0)), (2, 1), "gelu"),
    (1, 65, 97, 131, 1, 7, 7, 1, 3, 1, "silu"),
    (2, 19, 111, 113, 1, 9, 4, (1, 3), "same", 1, "relu6"),  # generic kernel size
    (1, 33, 113, 117, 1, 3, 3, 1, 0, 50, None),  # dilation 50: direct (unstaged) variant
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", DW_CASES, ids=lambda c: f"k{c[5]}x{c[6]}-s{c[7]}-d{c[9]}")
def test_depthwise_all_directions(case, dtype, layout, rng):
    N, C, H, W, M, KH, KW, stride, padding, dilation, act = case
    be = _be()
    xs = phys(layout, N, C, H, W)
    x = rand(rng, xs, dtype)
    w = rand(rng, (C * M, 1, KH, KW), dtype)
    b = rand(rng, (C * M,), dtype)
    geo = dict(stride=stride, padding=padding, dilation=dilation, layout=layout)
    p, _ = _spec.depthwise("t", x, w, b, stride, padding, dilation, layout, act)
    out = poisoned(p.y_shape, dtype)
    be.depthwise_forward(p, dev(x), dev(w), dev(b), out)
    assert_close(out.copy_to_host(), R.depthwise_conv2d(x, w, b, activation=act, **geo), dtype,
                 R.depthwise_conv2d(absf(x), absf(w), absf(b), **geo), "forward")

    gy = rand(rng, p.y_shape, dtype)
    pg, _ = _spec.depthwise_grad_input("t", gy, w, xs, stride, padding, dilation, layout)
    out = poisoned(xs, dtype)
    be.depthwise_grad_input(pg, dev(gy), dev(w), out)
    assert_close(out.copy_to_host(), R.depthwise_conv2d_grad_input(gy, w, xs, **geo), dtype,
                 R.depthwise_conv2d_grad_input(absf(gy), absf(w), xs, **geo), "grad_input")

    pw, _ = _spec.depthwise_grad_weight("t", x, gy, w.shape, stride, padding, dilation, layout)
    out = poisoned(w.shape, dtype)
    be.depthwise_grad_weight(pw, dev(x), dev(gy), out)
    assert_close(out.copy_to_host(), R.depthwise_conv2d_grad_weight(x, gy, w.shape, **geo), dtype,
                 R.depthwise_conv2d_grad_weight(absf(x), absf(gy), w.shape, **geo), "grad_weight")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,CI,CO,H,W", [(2, 67, 129, 61, 127), (8, 3, 5, 131, 129)])
def test_pointwise_all_directions(N, CI, CO, H, W, dtype, layout, rng):
    be = _be()
    x = rand(rng, phys(layout, N, CI, H, W), dtype)
    w = rand(rng, (CO, CI), dtype)
    b = rand(rng, (CO,), dtype)
    ys = phys(layout, N, CO, H, W)
    r = rand(rng, ys, dtype)
    p, _ = _spec.pointwise("t", x, w, b, layout, "gelu", r)
    out = poisoned(ys, dtype)
    be.pointwise_forward(p, dev(x), dev(w), dev(b), dev(r), out)
    assert_close(out.copy_to_host(),
                 R.pointwise_conv2d(x, w, b, layout=layout, activation="gelu", residual=r), dtype,
                 R.pointwise_conv2d(absf(x), absf(w), absf(b), layout=layout, residual=absf(r)))
    gy = rand(rng, ys, dtype)
    pg, _ = _spec.pointwise_grad_input("t", gy, w, layout)
    out = poisoned(x.shape, dtype)
    be.pointwise_grad_input(pg, dev(gy), dev(w), out)
    assert_close(out.copy_to_host(), R.pointwise_conv2d_grad_input(gy, w, layout=layout), dtype,
                 R.pointwise_conv2d_grad_input(absf(gy), absf(w), layout=layout))
    pw, _ = _spec.pointwise_grad_weight("t", x, gy, layout)
    out = poisoned((CO, CI), dtype)
    be.pointwise_grad_weight(pw, dev(x), dev(gy), out)
    assert_close(out.copy_to_host(), R.pointwise_conv2d_grad_weight(x, gy, layout=layout), dtype,
                 R.pointwise_conv2d_grad_weight(absf(x), absf(gy), layout=layout))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C,M,CO,K,dilation", [(32, 1, 67, 3, 1),  # fused
                                                (64, 1, 64, 5, 1),  # fused, 64 channels
                                                (200, 1, 24, 3, 1),  # unfused: too many channels
                                                (7, 2, 9, 3, 30)])  # unfused: halo too large
def test_separable(C, M, CO, K, dilation, dtype, layout, rng):
    be = _be()
    N, H, W = 2, 67, 131
    x = rand(rng, phys(layout, N, C, H, W), dtype)
    dw_w = rand(rng, (C * M, 1, K, K), dtype)
    pw_w = rand(rng, (CO, C * M), dtype)
    dw_b = rand(rng, (C * M,), dtype)
    b = rand(rng, (CO,), dtype)
    ys = phys(layout, N, CO, H, W)
    r = rand(rng, ys, dtype)
    sp, _ = _spec.separable("t", x, dw_w, pw_w, b, dw_b, 1, "same", dilation, layout, "relu",
                            "silu", r)
    out = poisoned(ys, dtype)
    be.separable_forward(sp, dev(x), dev(dw_w), dev(pw_w), dev(b), dev(dw_b), dev(r), out)
    geo = dict(padding="same", dilation=dilation, layout=layout)
    mid = R.depthwise_conv2d(absf(x), absf(dw_w), absf(dw_b), **geo)
    assert_close(out.copy_to_host(),
                 R.separable_conv2d(x, dw_w, pw_w, b, dw_bias=dw_b, dw_activation="relu",
                                    activation="silu", residual=r, **geo), dtype,
                 R.pointwise_conv2d(mid, absf(pw_w), absf(b), layout=layout, residual=absf(r)))


def test_torch_cuda_non_default_stream_non_contiguous(rng):
    torch = pytest.importorskip("torch")
    x = rand(rng, (2, 131, 67, 48))  # NHWC storage, viewed as NCHW below (non-contiguous)
    w = rand(rng, (48, 1, 3, 3))
    pw = rand(rng, (40, 48))
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        xt = torch.from_numpy(x).cuda().permute(0, 3, 1, 2)
        assert not xt.is_contiguous()
        wt = torch.from_numpy(w).cuda()
        y = dwops.depthwise_conv2d(xt, wt, padding=1, activation="relu", backend="numba")
        z = dwops.separable_conv2d(xt, wt, torch.from_numpy(pw).cuda(), padding="same",
                                   dw_activation="relu", backend="numba")
        g = dwops.depthwise_conv2d_grad_weight(xt, y, w.shape, padding=1, backend="numba")
    s.synchronize()
    assert isinstance(y, torch.Tensor) and y.is_cuda
    xn = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    assert_close(y.cpu().numpy(), R.depthwise_conv2d(xn, w, padding=1, activation="relu"),
                 "float32", R.depthwise_conv2d(absf(xn), absf(w), padding=1))
    assert_close(z.cpu().numpy(),
                 R.separable_conv2d(xn, w, pw, padding="same", dw_activation="relu"), "float32",
                 R.pointwise_conv2d(R.depthwise_conv2d(absf(xn), absf(w), padding=1), absf(pw)))
    yn = y.cpu().numpy()
    assert_close(g.cpu().numpy(), R.depthwise_conv2d_grad_weight(xn, yn, w.shape, padding=1),
                 "float32", R.depthwise_conv2d_grad_weight(absf(xn), absf(yn), w.shape, padding=1))


def test_cupy_arrays_round_trip(rng):
    cupy = pytest.importorskip("cupy")
    x = rand(rng, (1, 7, 33, 65), "float16")
    w = rand(rng, (7, 1, 5, 5), "float16")
    y = dwops.depthwise_conv2d(cupy.asarray(x)[:, :, :, ::2], cupy.asarray(w), padding=2,
                               backend="numba")
    assert isinstance(y, cupy.ndarray)
    xs = np.ascontiguousarray(x[:, :, :, ::2])
    assert_close(cupy.asnumpy(y), R.depthwise_conv2d(xs, w, padding=2), "float16",
                 R.depthwise_conv2d(absf(xs), absf(w), padding=2))


def test_bfloat16_refused(rng):
    torch = pytest.importorskip("torch")
    x = torch.ones((1, 2, 5, 5), dtype=torch.bfloat16, device="cuda")
    with pytest.raises(TypeError, match="bfloat16"):
        dwops.depthwise_conv2d(x, x[:, :1, :3, :3].reshape(1, 1, 3, 3).repeat(2, 1, 1, 1),
                               backend="numba")


# ----------------------------------------------------------------------------- depthwise 1-d

LAYOUTS_1D = ("NCL", "NLC")

# (N, C, L, M, K, stride, padding, dilation, activation): odd sizes, 1-3 million inputs
C1D_CASES = [
    (2, 769, 1999, 1, 4, 1, "causal", 1, "silu"),  # Mamba-like: window (NLC), state, seq_idx
    (3, 257, 1031, 2, 3, 2, "same", 2, "gelu"),  # multiplier 2, stride 2, dilation 2
    (1, 129, 4097, 1, 7, 3, (5, 2), 1, "relu6"),  # stride 3, (left, right) padding
    (2, 65, 2049, 1, 31, 1, "causal", 2, None),  # generic width, dilated state
    (1, 33, 3001, 3, 1, 1, 4, 1, "relu"),  # width 1 (generic), multiplier 3, int padding
    (1, 17, 13501, 1, 2, 1, "valid", 13000, None),  # NCL span past the budget: direct variant
    (2, 131, 1501, 1, 5, 1, "causal", 1, "silu"),  # width 5 window
    (1, 67, 2999, 2, 6, 2, (0, 5), 1, "gelu"),  # width 6, stride 2, right padding only
    (2, 45, 1203, 1, 8, 1, "causal", 3, None),  # width 8, dilated causal state
]


def _c1d_backward(be, p, x, gy, w, st, sq, geo, dtype, needs):
    """The backward with the outputs in ``needs`` (letters of "xwbs"), poisoned, against the
    reference."""
    shapes = {"input": ("x", p.x_shape), "weight": ("w", p.w_shape), "bias": ("b", (p.CO,)),
              "initial_state": ("s", p.state_shape)}
    outs = {k: poisoned(shape, dtype) if letter in needs else None
            for k, (letter, shape) in shapes.items()}
    be.depthwise_conv1d_backward(p, dev(x), dev(gy), dev(w), dev(st), dev(sq), *outs.values())
    got = {k: None if v is None else v.copy_to_host() for k, v in outs.items()}
    assert_conv1d_backward(got, x, gy, w, st, sq, geo, dtype)


@pytest.mark.parametrize("layout", LAYOUTS_1D)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", C1D_CASES, ids=lambda c: f"k{c[4]}-s{c[5]}-d{c[7]}-m{c[3]}")
def test_conv1d_forward_and_backward(case, dtype, layout, rng):
    N, C, L, M, K, stride, padding, dilation, act = case
    be = _be()
    causal = padding == "causal"
    seq_dt = ("int64" if dtype == "float64" else "int32") if causal else None
    x, w, b, st, sq = conv1d_inputs(rng, layout, dtype, N, C, L, M, K, dilation, True, causal,
                                    seq_dt)
    p, _ = _spec.depthwise_1d("t", x, w, b, stride, padding, dilation, layout, act, st, causal, sq)
    out = poisoned(p.y_shape, dtype)
    final = poisoned(p.state_shape, dtype) if causal else None
    be.depthwise_conv1d_forward(p, dev(x), dev(w), dev(b), dev(st), dev(sq), out, final)
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
    _c1d_backward(be, pb, x, gy, w, st, sq, geo, dtype, "xwbs" if causal else "xwb")


@pytest.mark.parametrize("layout", LAYOUTS_1D)
@pytest.mark.parametrize("needs", ["x", "w", "b", "s", "xw", "wbs"])
def test_conv1d_backward_need_subsets(needs, layout, rng):
    be = _be()
    N, C, L, M, K = 3, 515, 1777, 2, 4
    x, w, _, st, sq = conv1d_inputs(rng, layout, "float32", N, C, L, M, K, 1, False, True,
                                    "int32")
    gy = rand(rng, (N, C * M, L) if layout == "NCL" else (N, L, C * M))
    p, _ = _spec.depthwise_1d_backward("t", x, gy, w, 1, "causal", 1, layout, st, sq, {})
    _c1d_backward(be, p, x, gy, w, st, sq, dict(padding="causal", layout=layout), "float32",
                  needs)


@pytest.mark.parametrize("layout", LAYOUTS_1D)
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv1d_chunks_and_decode_equal_one_call(dtype, layout, rng):
    """Three chunks (final state -> initial state), then single-token decode steps and a T=5
    step with the state updated in place: every output equals the one long causal call."""
    be = _be()
    N, C, M, K = 2, 1029, 2, 4
    chunks, steps = (701, 999, 333), (1, 1, 5)
    total = sum(chunks) + sum(steps)
    x = rand(rng, (N, C, total), dtype)  # logical NCL
    w = rand(rng, (C * M, 1, K), dtype)
    b = rand(rng, (C * M,), dtype)
    full = R.depthwise_conv1d(x, w, b, padding="causal", activation="silu")
    scale = R.depthwise_conv1d(absf(x), absf(w), absf(b), padding="causal")
    state, start = None, 0
    for n in chunks:
        xc = x[:, :, start:start + n]
        xc = xc if layout == "NCL" else np.ascontiguousarray(xc.transpose(0, 2, 1))
        p, _ = _spec.depthwise_1d("t", xc, w, b, 1, "causal", 1, layout, "silu",
                                  None if state is None else state.copy_to_host(), True, None)
        y, final = poisoned(p.y_shape, dtype), poisoned(p.state_shape, dtype)
        be.depthwise_conv1d_forward(p, dev(xc), dev(w), dev(b), state, None, y, final)
        got = y.copy_to_host()
        got = got if layout == "NCL" else got.transpose(0, 2, 1)
        sl = slice(start, start + n)
        assert_close(got, full[:, :, sl], dtype, scale[:, :, sl], f"chunk at {start}")
        state, start = final, start + n
    d_w, d_b = dev(w), dev(b)
    for t in steps:
        xs = x[:, :, start:start + t]
        xs = xs[:, :, 0] if t == 1 else xs
        pu, _ = _spec.depthwise_1d_update("t", xs, state.copy_to_host(), w, b, "silu")
        y = poisoned(pu.y_shape, dtype)
        be.depthwise_conv1d_update(pu, dev(xs), state, d_w, d_b, y, state)
        sl = slice(start, start + t)
        assert_close(y.copy_to_host().reshape(N, C * M, t), full[:, :, sl], dtype,
                     scale[:, :, sl], f"decode at {start}")
        start += t
    assert_close(state.copy_to_host(), x[:, :, total - (K - 1):], dtype, None, "state")


def test_conv1d_torch_in_place_update_and_seq_check(rng):
    """PyTorch CUDA tensors on a non-default stream: the decode state is updated in the caller's
    memory; a decreasing seq_idx is refused."""
    torch = pytest.importorskip("torch")
    N, C, K = 3, 1031, 4
    x = rand(rng, (N, C))
    st = rand(rng, (N, C, K - 1))
    w = rand(rng, (C, 1, K))
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        state = torch.from_numpy(st).cuda()
        ptr = state.data_ptr()
        y, new = dwops.depthwise_conv1d_update(torch.from_numpy(x).cuda(), state,
                                               torch.from_numpy(w).cuda(), activation="silu",
                                               backend="numba")
    s.synchronize()
    assert new is state and state.data_ptr() == ptr
    ey, es = R.depthwise_conv1d_update(x, st.copy(), w, activation="silu")
    assert_close(y.cpu().numpy(), ey, "float32")
    assert_close(state.cpu().numpy(), es, "float32")
    seq = torch.zeros((N, 50), dtype=torch.int64, device="cuda")
    seq[1, 20] = 1  # 0 .. 1 0 ..: decreasing after position 20
    xt = torch.ones((N, C, 50), device="cuda")
    with pytest.raises(ValueError, match="non-decreasing"):
        dwops.depthwise_conv1d(xt, torch.from_numpy(w).cuda(), padding="causal", seq_idx=seq,
                               backend="numba")
