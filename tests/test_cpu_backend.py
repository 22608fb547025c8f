"""The "cpu" backend against the reference ("numpy" backend), through the public API.

Every op and gradient, both layouts, the four dtypes; geometry cases cover kernel sizes 1, 2, 3,
5, 7, non-square and 13x31, strides 1-3, dilations 1-3, multipliers 1-4, every padding form, odd
and prime sizes down to 1x1; plus non-contiguous inputs, NaN/Inf propagation and the block sizes
where the kernels switch paths (pixel blocks, reduction chunks, GEMM register-block remainders).
Errors are bounded relative to the same computation on |inputs| (a sum of absolute products).
"""

from __future__ import annotations

import numpy as np
import pytest

import dwops
from dwops import reference
from dwops._registry import numpy_dtype
from dwops._spec import ACTIVATIONS

from tests.conftest import DTYPES, assert_close, rand

LAYOUTS = ("NCHW", "NHWC")
ACTS = ACTIVATIONS

# (N, C, H, W, M, KH, KW, stride, padding, dilation)
CASES = [
    (2, 3, 9, 11, 1, 3, 3, 1, "same", 1),
    (1, 2, 1, 1, 1, 1, 1, 1, 0, 1),                        # 1x1 input, 1x1 kernel
    (1, 1, 1, 1, 3, 3, 3, 1, 1, 1),                        # 1x1 input, padding only
    (3, 5, 7, 13, 2, 2, 2, 2, "valid", 1),                 # even kernel, stride 2
    (2, 4, 17, 19, 1, 5, 5, (1, 2), ((2, 1), (0, 3)), 2),  # per-side padding, dilation 2
    (1, 3, 23, 11, 4, 7, 7, 3, "same", 1),                 # multiplier 4, stride 3 "same"
    (2, 2, 13, 29, 3, 3, 5, (3, 1), (1, 2), (1, 3)),       # non-square kernel, dilation 3
    (1, 2, 20, 40, 1, 13, 31, 1, "same", 1),               # large non-square kernel
    (2, 6, 10, 10, 2, 5, 3, 2, "same", (2, 1)),            # "same" with stride and dilation
    (1, 7, 31, 5, 1, 3, 1, (1, 3), ((0, 4), (2, 2)), 1),   # asymmetric, more pad than needed
    # stride 1 (grad_input runs the forward kernel with flipped filters, padding K-1-p):
    (2, 3, 12, 15, 2, 3, 5, 1, ((2, 0), (1, 3)), (2, 1)),  # multiplier 2, asymmetric, dilation
    (1, 4, 9, 8, 1, 3, 3, 1, ((4, 0), (0, 5)), 1),         # padding beyond the kernel extent
    (2, 2, 6, 7, 3, 2, 4, 1, "valid", (3, 2)),             # "valid", even kernel, multiplier 3
]


def _ids(cases):
    return [f"case{i}" for i in range(len(cases))]


def _shape(layout, n, c, h, w):
    return (n, c, h, w) if layout == "NCHW" else (n, h, w, c)


def _absf(a):
    return None if a is None else np.abs(np.asarray(a).astype(np.float64))


def _check(fn, args, kwargs, dtype, abs_args=None, what=""):
    """fn(*args, backend="cpu") against fn(*args, backend="numpy"), scaled by fn(|args|).

    Non-finite values must match exactly (NaN where NaN, Inf of the same sign where Inf); the
    finite ones within the dtype's tolerance.
    """
    result = got = fn(*args, **kwargs, backend="cpu")
    want = fn(*args, **kwargs, backend="numpy")
    assert got.dtype == want.dtype == numpy_dtype(dtype)
    assert got.shape == want.shape
    g64, w64 = np.asarray(got, np.float64), np.asarray(want, np.float64)
    finite = np.isfinite(w64)
    if not finite.all():
        np.testing.assert_array_equal(np.where(finite, 0.0, g64), np.where(finite, 0.0, w64),
                                      err_msg=f"{what}: non-finite pattern differs")
        got, want = np.where(finite, g64, 0.0), np.where(finite, w64, 0.0)
    scale = None
    if abs_args is not None:
        abs_kwargs = {k: _absf(v) if k in ("residual", "dw_bias") else v for k, v in kwargs.items()}
        scale = np.maximum(np.asarray(fn(*abs_args, **abs_kwargs, backend="numpy")), 1e-3)
    assert_close(got, want, dtype, scale=scale, what=what)
    return result


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_depthwise_forward(rng, case, layout, dtype):
    n, c, h, w, m, kh, kw, stride, padding, dilation = case
    x = rand(rng, _shape(layout, n, c, h, w), dtype)
    wt = rand(rng, (c * m, 1, kh, kw), dtype)
    b = rand(rng, (c * m,), dtype)
    act = ACTS[CASES.index(case) % len(ACTS)]
    kw_ = dict(stride=stride, padding=padding, dilation=dilation, layout=layout)
    _check(dwops.depthwise_conv2d, (x, wt, b), dict(kw_, activation=act), dtype,
           (_absf(x), _absf(wt), _absf(b)) if act is None else None, "forward")
    _check(dwops.depthwise_conv2d, (x, wt), kw_, dtype, (_absf(x), _absf(wt)), "no bias")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_depthwise_grad_input(rng, case, layout, dtype):
    n, c, h, w, m, kh, kw, stride, padding, dilation = case
    xshape = _shape(layout, n, c, h, w)
    wt = rand(rng, (c * m, 1, kh, kw), dtype)
    kw_ = dict(stride=stride, padding=padding, dilation=dilation, layout=layout)
    yshape = reference.depthwise_conv2d(np.zeros(xshape), wt.astype(np.float64), **kw_).shape
    gy = rand(rng, yshape, dtype)
    _check(dwops.depthwise_conv2d_grad_input, (gy, wt, xshape), kw_, dtype,
           (_absf(gy), _absf(wt), xshape), "grad_input")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_depthwise_grad_weight(rng, case, layout, dtype):
    n, c, h, w, m, kh, kw, stride, padding, dilation = case
    x = rand(rng, _shape(layout, n, c, h, w), dtype)
    wshape = (c * m, 1, kh, kw)
    kw_ = dict(stride=stride, padding=padding, dilation=dilation, layout=layout)
    yshape = reference.depthwise_conv2d(x.astype(np.float64), np.zeros(wshape), **kw_).shape
    gy = rand(rng, yshape, dtype)
    _check(dwops.depthwise_conv2d_grad_weight, (x, gy, wshape), kw_, dtype,
           (_absf(x), _absf(gy), wshape), "grad_weight")


# NCHW, multiplier 1, planes of at most cpu.GROUP_PIXELS pixels run in groups of G channels
# computed channel last (_dw_*_nchw_groups): several groups, a partial last group whose channel
# count is not a whole vector, planes that are not whole vectors, strides, dilation, 5x5 and 7x7.
# (N, C, H, W, KH, KW, stride, padding, dilation)
GROUP_CASES = [
    (2, 150, 7, 7, 3, 3, 1, 1, 1),
    (1, 70, 14, 13, 3, 3, 2, 1, 1),
    (2, 33, 9, 10, 5, 5, (2, 1), "same", (1, 2)),
    (1, 20, 28, 28, 7, 7, 1, 3, 1),
    (3, 9, 5, 3, 3, 3, (1, 2), ((0, 2), (3, 1)), 1),
]


@pytest.mark.parametrize("dtype", ("float32", "float64"))
@pytest.mark.parametrize("case", GROUP_CASES, ids=_ids(GROUP_CASES))
def test_depthwise_nchw_channel_groups(rng, case, dtype):
    from dwops.kernels import cpu

    n, c, h, w, kh, kw, stride, padding, dilation = case
    assert max(h * w, 1) <= cpu.GROUP_PIXELS
    full = (n, c, h, w, 1, kh, kw, stride, padding, dilation)
    x = rand(rng, (n, c, h, w), dtype)
    wt = rand(rng, (c, 1, kh, kw), dtype)
    b = rand(rng, (c,), dtype)
    kw_ = dict(stride=stride, padding=padding, dilation=dilation, layout="NCHW")
    _check(dwops.depthwise_conv2d, (x, wt, b), dict(kw_, activation="relu6"), dtype,
           None, "forward")
    _check(dwops.depthwise_conv2d, (x, wt, b), kw_, dtype, (_absf(x), _absf(wt), _absf(b)),
           "forward")
    test_depthwise_grad_input(rng, full, "NCHW", dtype)
    test_depthwise_grad_weight(rng, full, "NCHW", dtype)


@pytest.mark.parametrize("case", [c for c in CASES if c[4] == 1], ids=lambda c: f"{c[:4]}")
def test_depthwise_nchw_plane_path_on_small_planes(rng, monkeypatch, case):
    """The per-plane NCHW kernels (the path for planes above GROUP_PIXELS) on every geometry."""
    from dwops.kernels import cpu

    monkeypatch.setattr(cpu, "GROUP_PIXELS", 0)
    for fn in (test_depthwise_forward, test_depthwise_grad_input, test_depthwise_grad_weight):
        fn(rng, case, "NCHW", "float32")


# NHWC register-tiled interior (channel multiples of 16 float32 / 8 float64 values, M 1):
# (N, C, H, W, KH, KW, stride, padding, dilation)
TILE_CASES = [
    (2, 32, 7, 13, 3, 3, 1, "same", 1),
    (1, 48, 9, 22, 5, 5, (2, 1), ((1, 3), (2, 0)), (1, 2)),
    (1, 24, 6, 17, 3, 7, 1, "valid", 1),
    (1, 16, 4, 9, 1, 1, 1, 0, 1),
    (1, 32, 5, 6, 3, 5, 1, ((0, 0), (4, 4)), 1),  # narrow input, wide padding: no interior
    # stride_w > 1 and dilation in the PT-pixel tiles (_dw_tile_s); the last tile of a row
    # overlaps the previous one when the interior is not a multiple of PT pixels
    (2, 32, 7, 29, 3, 3, 2, 1, 1),
    (1, 16, 6, 40, 5, 5, (1, 3), ((2, 2), (1, 3)), (1, 2)),
    (1, 48, 9, 31, 7, 7, 2, "valid", 1),
    (1, 16, 5, 23, 3, 3, (2, 2), ((0, 2), (3, 1)), (2, 3)),
    (3, 16, 4, 15, 2, 4, 1, "same", 1),  # even kernel, asymmetric "same"
    (1, 16, 4, 20, 3, 3, 1, ((1, 1), (4, 0)), 1),  # border pixels with no valid tap
]


@pytest.mark.parametrize("dtype", ("float32", "float64", "bfloat16", "float16"))
@pytest.mark.parametrize("case", TILE_CASES, ids=_ids(TILE_CASES))
def test_depthwise_nhwc_register_tiles(rng, case, dtype):
    n, c, h, w, kh, kw, stride, padding, dilation = case
    x = rand(rng, (n, h, w, c), dtype)
    wt = rand(rng, (c, 1, kh, kw), dtype)
    b = rand(rng, (c,), dtype)
    kw_ = dict(stride=stride, padding=padding, dilation=dilation, layout="NHWC")
    _check(dwops.depthwise_conv2d, (x, wt, b), kw_, dtype, (_absf(x), _absf(wt), _absf(b)))
    _check(dwops.depthwise_conv2d, (x, wt), dict(kw_, activation="gelu"), dtype)
    pw = rand(rng, (c + 3, c), dtype)
    _check(dwops.separable_conv2d, (x, wt, pw), dict(kw_, dw_bias=b, dw_activation="relu6"),
           dtype)
    y = dwops.depthwise_conv2d(x, wt, **kw_, backend="numpy")
    gy = rand(rng, y.shape, dtype)
    _check(dwops.depthwise_conv2d_grad_input, (gy, wt, x.shape), kw_, dtype,
           (_absf(gy), _absf(wt), x.shape), "grad_input")
    _check(dwops.depthwise_conv2d_grad_weight, (x, gy, wt.shape), kw_, dtype,
           (_absf(x), _absf(gy), wt.shape), "grad_weight")


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", ("float32", "float64"))
def test_depthwise_activations(rng, act, layout, dtype):
    x = rand(rng, _shape(layout, 2, 4, 9, 8), dtype, -4.0, 4.0)  # reaches the clips at -3, 3, 6
    wt = rand(rng, (8, 1, 3, 3), dtype)
    b = rand(rng, (8,), dtype)
    _check(dwops.depthwise_conv2d, (x, wt, b),
           dict(padding="same", layout=layout, activation=act), dtype, what=str(act))


# (N, CI, CO, H, W): odd/prime sizes, 1x1, pixel counts around the tiles (NHWC blocks of 256
# pixels, NCHW runs of at most 1024 pixels per image), output channels split into blocks when
# there are few tiles (64 -> 2 x 32; 100 -> 64 + 36), one case over the 4096-pixel reduction
# chunk.
PW_CASES = [(1, 1, 1, 1, 1), (2, 3, 5, 7, 9), (1, 8, 7, 8, 8), (3, 5, 4, 1, 67),
            (1, 16, 9, 70, 70), (2, 64, 64, 5, 13), (2, 3, 20, 3, 7), (1, 17, 33, 2, 31),
            (1, 24, 100, 33, 35)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", PW_CASES, ids=_ids(PW_CASES))
def test_pointwise(rng, case, layout, dtype):
    n, ci, co, h, w = case
    x = rand(rng, _shape(layout, n, ci, h, w), dtype)
    wt = rand(rng, (co, ci), dtype)
    b = rand(rng, (co,), dtype)
    r = rand(rng, _shape(layout, n, co, h, w), dtype)
    gy = rand(rng, _shape(layout, n, co, h, w), dtype)
    act = ACTS[PW_CASES.index(case) % len(ACTS)]
    lay = dict(layout=layout)
    _check(dwops.pointwise_conv2d, (x, wt, b), dict(lay, residual=r), dtype,
           (_absf(x), _absf(wt), _absf(b)), "bias+residual")
    _check(dwops.pointwise_conv2d, (x, wt.reshape(co, ci, 1, 1)), dict(lay, activation=act),
           dtype, what=f"4-d weight, {act}")
    _check(dwops.pointwise_conv2d, (x, wt, b), dict(lay, activation=act, residual=r), dtype,
           what=f"{act}+residual")
    _check(dwops.pointwise_conv2d_grad_input, (gy, wt), lay, dtype, (_absf(gy), _absf(wt)),
           "grad_input")
    _check(dwops.pointwise_conv2d_grad_weight, (x, gy), lay, dtype, (_absf(x), _absf(gy)),
           "grad_weight")


# depthwise case index, C_out of the pointwise stage
SEP_CASES = [(0, 5), (1, 1), (3, 4), (4, 9), (5, 3), (6, 7), (8, 12), (0, 20), (7, 17)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("sep", SEP_CASES, ids=_ids(SEP_CASES))
def test_separable(rng, sep, layout, dtype):
    k, co = sep
    n, c, h, w, m, kh, kw, stride, padding, dilation = CASES[k]
    x = rand(rng, _shape(layout, n, c, h, w), dtype)
    dw_w = rand(rng, (c * m, 1, kh, kw), dtype)
    pw_w = rand(rng, (co, c * m), dtype)
    dw_b = rand(rng, (c * m,), dtype)
    b = rand(rng, (co,), dtype)
    geo = dict(stride=stride, padding=padding, dilation=dilation, layout=layout)
    plain = _check(dwops.separable_conv2d, (x, dw_w, pw_w, b), dict(geo, dw_bias=dw_b), dtype,
                   (_absf(x), _absf(dw_w), _absf(pw_w), _absf(b)), "linear")
    r = rand(rng, plain.shape, dtype)
    acts = ACTS[k % len(ACTS)], ACTS[(k + 2) % len(ACTS)]
    _check(dwops.separable_conv2d, (x, dw_w, pw_w.reshape(co, c * m, 1, 1), b),
           dict(geo, dw_bias=dw_b, dw_activation=acts[0], activation=acts[1], residual=r), dtype,
           what=f"{acts} + residual")
    _check(dwops.separable_conv2d, (x, dw_w, pw_w), dict(geo, dw_activation=acts[1]), dtype,
           what="no biases")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_motivating_block(rng, layout, dtype):
    """x + pw(relu(dw(x))) + b with C=64, 3x3 "same" (the benchmark's block, smaller N, H, W)."""
    x = rand(rng, _shape(layout, 2, 64, 12, 9), dtype)
    dw_w = rand(rng, (64, 1, 3, 3), dtype)
    pw_w = rand(rng, (64, 64), dtype)
    b = rand(rng, (64,), dtype)
    _check(dwops.separable_conv2d, (x, dw_w, pw_w, b),
           dict(padding="same", dw_activation="relu", residual=x, layout=layout), dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reduction_chunks(rng, layout):
    """Depthwise grad_weight over more output rows than the NHWC partial-sum tasks (64) and
    pointwise grad_weight over several 4096-pixel chunks, float32."""
    x = rand(rng, _shape(layout, 3, 4, 70, 33), "float32")
    kw_ = dict(padding="same", layout=layout)
    gy = rand(rng, x.shape, "float32")
    _check(dwops.depthwise_conv2d_grad_weight, (x, gy, (4, 1, 3, 3)), kw_, "float32",
           (_absf(x), _absf(gy), (4, 1, 3, 3)))
    _check(dwops.pointwise_conv2d_grad_weight, (x, gy), dict(layout=layout), "float32",
           (_absf(x), _absf(gy)))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_thread_count_invariance(rng, layout):
    """Pointwise forward and gradients and the separable block give the same bits on one thread
    and on two: tiles and reduction chunks depend on the shapes only, each BLAS call runs on one
    thread."""
    numba = pytest.importorskip("numba")
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one Numba thread only")
    x = rand(rng, _shape(layout, 2, 40, 70, 70), "float32")
    gy = rand(rng, _shape(layout, 2, 72, 70, 70), "float32")
    w = rand(rng, (72, 40), "float32")
    dw_w = rand(rng, (40, 1, 3, 3), "float32")
    b = rand(rng, (72,), "float32")
    kw = dict(layout=layout, backend="cpu")

    def run():
        return (dwops.pointwise_conv2d(x, w, b, activation="relu", **kw),
                dwops.pointwise_conv2d(x[:1, ...], w, **kw),
                dwops.pointwise_conv2d_grad_input(gy, w, **kw),
                dwops.pointwise_conv2d_grad_weight(x, gy, **kw),
                dwops.separable_conv2d(x, dw_w, w, b, padding="same", dw_activation="relu",
                                       **kw))

    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = run()
        numba.set_num_threads(2)
        two = run()
    finally:
        numba.set_num_threads(before)
    for a, c in zip(one, two):
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_contiguous(rng, layout):
    """Transposed, sliced and negatively strided views give the same result as copies."""
    big = rand(rng, (2, 6, 15, 14), "float32")
    x = big[:, ::2, 1:12, ::-1]  # NCHW view
    if layout == "NHWC":
        x = rand(rng, (2, 14, 11, 3), "float32").transpose(0, 2, 1, 3)  # (2, 11, 14, 3) view
    assert not x.flags.c_contiguous
    w = rand(rng, (3, 3, 1, 6), "float32").transpose(3, 2, 0, 1)[::2]  # (3, 1, 3, 3) view
    pw = rand(rng, (3, 5), "float32").T  # (5, 3) view
    b = rand(rng, (10,), "float32")[::2]
    kw_ = dict(padding="same", layout=layout)
    y = _check(dwops.depthwise_conv2d, (x, w, b[:3]), dict(kw_, activation="silu"), "float32")
    np.testing.assert_array_equal(
        y, dwops.depthwise_conv2d(np.ascontiguousarray(x), np.ascontiguousarray(w),
                                  np.ascontiguousarray(b[:3]), activation="silu", **kw_,
                                  backend="cpu"))
    gy = rand(rng, y.shape[::-1], "float32").transpose(3, 2, 1, 0)
    _check(dwops.depthwise_conv2d_grad_input, (gy, w, x.shape), kw_, "float32")
    _check(dwops.depthwise_conv2d_grad_weight, (x, gy, w.shape), kw_, "float32")
    r = rand(rng, _shape(layout, 2, 5, 11, 14)[::-1], "float32").transpose(3, 2, 1, 0)
    _check(dwops.pointwise_conv2d, (x, pw, b), dict(layout=layout, residual=r), "float32")
    _check(dwops.separable_conv2d, (x, w, pw, b), dict(kw_, residual=r, dw_activation="relu"),
           "float32")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", ("float32", "bfloat16", "float64"))
def test_nan_inf_propagate(rng, layout, dtype):
    """A NaN or Inf input reaches exactly the outputs the reference says it reaches."""
    shape = _shape(layout, 2, 3, 8, 9)
    x = rand(rng, shape, dtype).astype(np.float64)
    x[(0, 1, 2, 3) if layout == "NCHW" else (0, 2, 3, 1)] = np.nan
    x[(1, 2, 7, 0) if layout == "NCHW" else (1, 7, 0, 2)] = np.inf
    x = x.astype(numpy_dtype(dtype))
    w = rand(rng, (3, 1, 3, 3), dtype)
    pw = rand(rng, (4, 3), dtype)
    kw_ = dict(padding="same", layout=layout)
    for act in ACTS:
        y = _check(dwops.depthwise_conv2d, (x, w), dict(kw_, activation=act), dtype, what=str(act))
        assert np.isnan(np.asarray(y, np.float64)).any()
        _check(dwops.separable_conv2d, (x, w, pw), dict(kw_, dw_activation=act), dtype,
               what=str(act))
        _check(dwops.pointwise_conv2d, (x, pw), dict(layout=layout, activation=act), dtype,
               what=str(act))
    # x doubles as the output gradient of this stride-1 "same" convolution
    _check(dwops.depthwise_conv2d_grad_input, (x, w, shape), kw_, dtype)
    _check(dwops.depthwise_conv2d_grad_weight, (x, rand(rng, shape, dtype), w.shape), kw_, dtype)
    _check(dwops.pointwise_conv2d_grad_input, (x, pw.T), dict(layout=layout), dtype)
    _check(dwops.pointwise_conv2d_grad_weight, (x, rand(rng, shape, dtype)),
           dict(layout=layout), dtype)


def test_auto_uses_cpu_for_host_arrays(rng):
    from dwops import _registry

    p = dwops._spec.depthwise("f", rand(rng, (1, 2, 3, 3)), rand(rng, (2, 1, 3, 3)), None, 1, 0,
                              1, "NCHW", None)[0]
    assert _registry.resolve("f", "auto", False, "depthwise_forward", p).name == "cpu"
