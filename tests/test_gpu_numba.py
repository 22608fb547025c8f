"""The ``numba`` backend on a real GPU (``pytest -m gpu``; skipped without one).

Every op against the reference on real sizes (a few million elements, odd sizes), every dtype the
backend takes and both layouts; outputs poisoned with NaN before the launch; non-contiguous
inputs through the public API; PyTorch CUDA tensors on a non-default stream.
"""

from __future__ import annotations

import numpy as np
import pytest

import dwops
import dwops.reference as R
from dwops import _spec

from .conftest import assert_close, gpu, rand

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
