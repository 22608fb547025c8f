"""The cupy backend on a real GPU (``pytest -m gpu``; skipped without one).

Every op and dtype against the NumPy reference on odd and realistic sizes, both layouts, every
padding form, strides, dilation and multiplier; outputs poisoned with NaN before the launch so an
element a kernel forgets to write fails; non-contiguous inputs; cupy cross-checked against numba;
PyTorch CUDA tensors (bfloat16 included) on a non-default stream.
"""

from __future__ import annotations

import numpy as np
import pytest

import dwops
from dwops import _spec
from tests.conftest import EMULATED, assert_close, gpu, rand

# Under DWOPS_CUDAEMU=1 (tests/test_cupy_emulated.py) "cupy" is the CPU emulator of tests/cudaemu:
# the kernel tests run there; tests that need a real device (other libraries' GPU arrays, numba)
# skip.
pytestmark = [pytest.mark.gpu] + ([] if EMULATED else [gpu])
real_gpu = pytest.mark.skipif(EMULATED, reason="needs a real GPU (not the emulator)")

cupy = pytest.importorskip("cupy")

DTYPES = ("float16", "bfloat16", "float32", "float64")


def _backend():
    from dwops.kernels import cupy_backend

    reason = cupy_backend.BACKEND.unavailable_reason()
    if reason:
        pytest.skip(reason)
    return cupy_backend.BACKEND


def _dev(a, dtype):
    """A CuPy array holding ``a`` (bfloat16 as its uint16 bits, as the backend keeps it)."""
    a = np.ascontiguousarray(a)
    if dtype == "bfloat16":
        a = a.view(np.uint16)
    return cupy.asarray(a)


def _host(a, dtype):
    h = cupy.asnumpy(a)
    return h.view(dwops._registry.numpy_dtype("bfloat16")) if dtype == "bfloat16" else h


def _poisoned(shape, dtype):
    if dtype == "bfloat16":
        return cupy.full(shape, 0x7FC0, dtype=np.uint16)   # bfloat16 NaN
    return cupy.full(shape, np.nan, dtype=dwops._registry.numpy_dtype(dtype))


def _f64(a):
    return None if a is None else np.asarray(a).astype(np.float64)


DW_CASES = [
    # (N, C, H, W, M, (KH, KW), stride, dilation, padding)
    (2, 3, 17, 19, 1, (3, 3), 1, 1, "same"),
    (1, 32, 56, 56, 1, (3, 3), 1, 1, 1),
    (2, 24, 28, 28, 1, (5, 5), 2, 1, "same"),
    (1, 16, 14, 14, 1, (7, 7), 1, 1, 3),
    (3, 5, 13, 11, 2, (3, 3), (2, 3), (1, 2), ((0, 2), (1, 3))),
    (1, 8, 31, 33, 1, (1, 1), 1, 1, 0),
    (1, 4, 40, 37, 1, (9, 9), 1, 1, "same"),
    (1, 2, 45, 47, 1, (31, 31), 1, 1, 15),
    (2, 6, 23, 29, 3, (3, 5), 1, (2, 1), "valid"),
    (1, 64, 9, 129, 1, (3, 3), 3, 2, (1, 2)),
    (1, 3, 5, 7, 1, (3, 3), 2, 1, 0),
]


def _dw_problem(case, layout, dtype, activation=None, bias=False, rng=None):
    n, c, h, w, m, k, s, d, pad = case
    x = rand(rng, _spec._physical(layout, n, c, h, w), dtype)
    wt = rand(rng, (c * m, 1, *k), dtype)
    b = rand(rng, (c * m,), dtype) if bias else None
    p, _ = _spec.depthwise("t", x, wt, b, s, pad, d, layout, activation)
    return p, x, wt, b


def _ref_kw(p):
    return dict(stride=(p.sh, p.sw), dilation=(p.dh, p.dw), padding=((p.pt, p.pb), (p.pl, p.pr)),
                layout=p.layout)


def _abs(a):
    return None if a is None else np.abs(_f64(a))


def _check_dw_forward(be, p, x, w, b, act, dtype):
    """The backend's forward (poisoned output) against the reference, error relative to the
    forward of the magnitudes."""
    kw = _ref_kw(p)
    out = _poisoned(p.y_shape, dtype)
    be.depthwise_forward(p, _dev(x, dtype), _dev(w, dtype), None if b is None else _dev(b, dtype),
                         out, stream=0)
    ref = dwops.reference.depthwise_conv2d(x, w, b, activation=act, **kw)
    scale = dwops.reference.depthwise_conv2d(_abs(x), _abs(w), _abs(b), **kw)
    assert_close(_host(out, dtype), ref, dtype, scale=np.maximum(scale, 1e-3),
                 what=f"forward {p}")


def _check_dw_grads(be, p, x, w, gy, dtype):
    """grad_input and grad_weight (poisoned outputs) against the reference."""
    kw = _ref_kw(p)
    gx = _poisoned(p.x_shape, dtype)
    be.depthwise_grad_input(p, _dev(gy, dtype), _dev(w, dtype), gx, stream=0)
    ref = dwops.reference.depthwise_conv2d_grad_input(gy, w, p.x_shape, **kw)
    scale = dwops.reference.depthwise_conv2d_grad_input(_abs(gy), _abs(w), p.x_shape, **kw)
    assert_close(_host(gx, dtype), ref, dtype, scale=np.maximum(scale, 1e-3),
                 what=f"grad_input {p}")
    gw = _poisoned(p.w_shape, dtype)
    be.depthwise_grad_weight(p, _dev(x, dtype), _dev(gy, dtype), gw, stream=0)
    ref = dwops.reference.depthwise_conv2d_grad_weight(x, gy, p.w_shape, **kw)
    scale = dwops.reference.depthwise_conv2d_grad_weight(_abs(x), _abs(gy), p.w_shape, **kw)
    assert_close(_host(gw, dtype), ref, dtype, scale=np.maximum(scale, 1e-3),
                 what=f"grad_weight {p}")


def _check_pointwise(be, p, x, w, b, r, act, gy, dtype):
    """Pointwise forward (with its epilogue), grad_input and grad_weight against the reference."""
    lay = p.layout
    out = _poisoned(p.y_shape, dtype)
    be.pointwise_forward(p, _dev(x, dtype), _dev(w, dtype), None if b is None else _dev(b, dtype),
                         None if r is None else _dev(r, dtype), out, stream=0)
    ref = dwops.reference.pointwise_conv2d(x, w, b, layout=lay, activation=act, residual=r)
    scale = dwops.reference.pointwise_conv2d(_abs(x), _abs(w), _abs(b), layout=lay,
                                             residual=_abs(r))
    assert_close(_host(out, dtype), ref, dtype, scale=np.maximum(scale, 1e-3), what="pw forward")
    gx = _poisoned(p.x_shape, dtype)
    be.pointwise_grad_input(p, _dev(gy, dtype), _dev(w, dtype), gx, stream=0)
    ref = dwops.reference.pointwise_conv2d_grad_input(gy, w, layout=lay)
    scale = dwops.reference.pointwise_conv2d_grad_input(_abs(gy), _abs(w), layout=lay)
    assert_close(_host(gx, dtype), ref, dtype, scale=np.maximum(scale, 1e-3), what="pw grad_input")
    gw = _poisoned((p.CO, p.CI), dtype)
    be.pointwise_grad_weight(p, _dev(x, dtype), _dev(gy, dtype), gw, stream=0)
    ref = dwops.reference.pointwise_conv2d_grad_weight(x, gy, layout=lay)
    scale = dwops.reference.pointwise_conv2d_grad_weight(_abs(x), _abs(gy), layout=lay)
    assert_close(_host(gw, dtype), ref, dtype, scale=np.maximum(scale, 1e-3), what="pw grad_weight")


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(DW_CASES)))
def test_depthwise_forward(case, dtype, layout, rng):
    be = _backend()
    act = (None, "relu", "relu6", "silu", "gelu")[case % 5]
    p, x, w, b = _dw_problem(DW_CASES[case], layout, dtype, act, bias=case % 2 == 0, rng=rng)
    _check_dw_forward(be, p, x, w, b, act, dtype)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(DW_CASES)))
def test_depthwise_grads(case, dtype, layout, rng):
    be = _backend()
    p, x, w, _ = _dw_problem(DW_CASES[case], layout, dtype, rng=rng)
    _check_dw_grads(be, p, x, w, rand(rng, p.y_shape, dtype), dtype)


PW_CASES = [(2, 3, 5, 7, 9), (1, 64, 128, 28, 28), (4, 130, 33, 5, 3), (1, 1, 1, 1, 1),
            (2, 256, 256, 14, 14)]


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(PW_CASES)))
def test_pointwise_all_directions(case, dtype, layout, rng):
    be = _backend()
    n, ci, co, h, w_ = PW_CASES[case]
    act = (None, "relu", "gelu", "silu", "relu6")[case]
    x = rand(rng, _spec._physical(layout, n, ci, h, w_), dtype)
    w = rand(rng, (co, ci), dtype)
    b = rand(rng, (co,), dtype)
    r = rand(rng, _spec._physical(layout, n, co, h, w_), dtype)
    p, _ = _spec.pointwise("t", x, w, b, layout, act, r)
    _check_pointwise(be, p, x, w, b, r, act, rand(rng, p.y_shape, dtype), dtype)


SEP_CASES = [
    # (N, C, M, CO, H, W, K, stride, padding)
    (2, 8, 1, 16, 17, 19, 3, 1, "same"),      # fused
    (1, 32, 1, 32, 28, 28, 3, 1, "same"),     # the motivating block shape, fused
    (1, 6, 2, 5, 13, 9, 5, 2, 1),             # multiplier, stride, fused
    (1, 4, 1, 70, 9, 11, 7, 1, 3),            # two output-channel blocks
    (1, 3, 1, 4, 10, 12, 4, 1, "valid"),      # generic kernel size
    (1, 512, 1, 8, 6, 7, 3, 1, "same"),       # too many channels to fuse: unfused path
]


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(SEP_CASES)))
def test_separable(case, dtype, layout, rng):
    be = _backend()
    n, c, m, co, h, w_, k, s, pad = SEP_CASES[case]
    x = rand(rng, _spec._physical(layout, n, c, h, w_), dtype)
    dww = rand(rng, (c * m, 1, k, k), dtype)
    pww = rand(rng, (co, c * m), dtype)
    b = rand(rng, (co,), dtype)
    dwb = rand(rng, (c * m,), dtype)
    p, _ = _spec.separable("t", x, dww, pww, b, dwb, s, pad, 1, layout, "relu", "gelu", None)
    r = rand(rng, p.y_shape, dtype)
    p, _ = _spec.separable("t", x, dww, pww, b, dwb, s, pad, 1, layout, "relu", "gelu", r)
    out = _poisoned(p.y_shape, dtype)
    be.separable_forward(p, _dev(x, dtype), _dev(dww, dtype), _dev(pww, dtype), _dev(b, dtype),
                         _dev(dwb, dtype), _dev(r, dtype), out, stream=0)
    kw = _ref_kw(p.dw)
    ref = dwops.reference.separable_conv2d(x, dww, pww, b, dw_bias=dwb, dw_activation="relu",
                                           activation="gelu", residual=r, **kw)
    scale = dwops.reference.separable_conv2d(
        np.abs(_f64(x)), np.abs(_f64(dww)), np.abs(_f64(pww)), np.abs(_f64(b)),
        dw_bias=np.abs(_f64(dwb)), residual=np.abs(_f64(r)), **kw)
    assert_close(_host(out, dtype), ref, dtype, scale=scale, what="separable")


def _random_depthwise(rng):
    """A random valid depthwise problem: small sizes (the emulator runs these too), every kernel
    size 1-7 square or not, stride and dilation 1-3, multiplier 1-3, explicit asymmetric or
    named padding, both layouts, every dtype."""
    while True:
        n, c, m = (int(v) for v in rng.integers(1, (4, 10, 4)))
        h, w = (int(v) for v in rng.integers(1, 24, 2))
        kh = int(rng.integers(1, 8))
        kw = kh if rng.random() < 0.6 else int(rng.integers(1, 8))
        s = tuple(int(v) for v in rng.integers(1, 4, 2)) if rng.random() < 0.5 else 1
        d = tuple(int(v) for v in rng.integers(1, 4, 2)) if rng.random() < 0.3 else 1
        pad = ["same", "valid", tuple((int(a), int(b)) for a, b in rng.integers(0, 4, (2, 2))),
               int(rng.integers(0, 4))][int(rng.integers(0, 4))]
        if pad == "same" and s != 1:
            pad = 1
        layout = ("NCHW", "NHWC")[int(rng.integers(0, 2))]
        dtype = DTYPES[int(rng.integers(0, 4))]
        try:
            x = rand(rng, _spec._physical(layout, n, c, h, w), dtype)
            wt = rand(rng, (c * m, 1, kh, kw), dtype)
            p, _ = _spec.depthwise("t", x, wt, None, s, pad, d, layout, None)
        except ValueError:      # output would be empty: draw again
            continue
        return p, x, wt, dtype


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 3, 5, 7])
def test_every_specialization(k, dtype, layout, aligned, rng):
    """Each compile-time kernel size with and without 16-byte vectors (rows / channels a multiple
    of 8 or not): forward with bias and activation, stride-1 and stride-2 grad_input, grad_weight,
    and the stride-2 forward (generic path). With the tests above, every instantiation of the
    kernel report runs (tests/test_cupy_emulated.py checks that under the emulator)."""
    be = _backend()
    c, w_ = (16, 32) if aligned else (7, 13)
    for stride in (1, 2):
        case = (1, c, 11, w_, 1, (k, k), stride, 1, k // 2)
        p, x, w, b = _dw_problem(case, layout, dtype, "relu6", bias=True, rng=rng)
        _check_dw_forward(be, p, x, w, b, "relu6", dtype)
        _check_dw_grads(be, p, x, w, rand(rng, p.y_shape, dtype), dtype)


@pytest.mark.parametrize("seed", range(48))
def test_random_depthwise_problems(seed):
    """Forward (random activation and bias), grad_input and grad_weight of random problems."""
    be = _backend()
    rng = np.random.default_rng(1000 + seed)
    p, x, w, dtype = _random_depthwise(rng)
    act = (None, "relu", "relu6", "silu", "gelu")[seed % 5]
    b = rand(rng, (p.CO,), dtype) if seed % 2 else None
    p, _ = _spec.depthwise("t", x, w, b, (p.sh, p.sw), ((p.pt, p.pb), (p.pl, p.pr)), (p.dh, p.dw),
                           p.layout, act)
    _check_dw_forward(be, p, x, w, b, act, dtype)
    _check_dw_grads(be, p, x, w, rand(rng, p.y_shape, dtype), dtype)


@pytest.mark.parametrize("seed", range(24))
def test_random_separable_problems(seed):
    """The fused (or unfused) separable forward of random problems, every epilogue."""
    be = _backend()
    rng = np.random.default_rng(2000 + seed)
    p0, x, dww, dtype = _random_depthwise(rng)
    co = int(rng.integers(1, 80))
    pww = rand(rng, (co, p0.CO), dtype)
    b, dwb = rand(rng, (co,), dtype), rand(rng, (p0.CO,), dtype)
    acts = (None, "relu", "relu6", "silu", "gelu")
    dact, act = acts[seed % 5], acts[(seed // 2) % 5]
    args = ((p0.sh, p0.sw), ((p0.pt, p0.pb), (p0.pl, p0.pr)), (p0.dh, p0.dw), p0.layout, dact, act)
    p, _ = _spec.separable("t", x, dww, pww, b, dwb, *args, None)
    r = rand(rng, p.y_shape, dtype) if seed % 2 else None
    p, _ = _spec.separable("t", x, dww, pww, b, dwb, *args, r)
    out = _poisoned(p.y_shape, dtype)
    be.separable_forward(p, _dev(x, dtype), _dev(dww, dtype), _dev(pww, dtype), _dev(b, dtype),
                         _dev(dwb, dtype), None if r is None else _dev(r, dtype), out, stream=0)
    kw = _ref_kw(p.dw)
    ref = dwops.reference.separable_conv2d(x, dww, pww, b, dw_bias=dwb, dw_activation=dact,
                                           activation=act, residual=r, **kw)
    scale = dwops.reference.separable_conv2d(
        np.abs(_f64(x)), np.abs(_f64(dww)), np.abs(_f64(pww)), np.abs(_f64(b)),
        dw_bias=np.abs(_f64(dwb)), residual=None if r is None else np.abs(_f64(r)), **kw)
    assert_close(_host(out, dtype), ref, dtype, scale=np.maximum(scale, 1e-3),
                 what=f"separable {p}")


@pytest.mark.parametrize("seed", range(16))
def test_random_pointwise_problems(seed):
    """Pointwise forward (optional bias, residual, any activation) and both gradients of random
    sizes around the 64 x 64 x 16 GEMM tile edges."""
    be = _backend()
    rng = np.random.default_rng(3000 + seed)
    n, ci, co = int(rng.integers(1, 4)), int(rng.integers(1, 140)), int(rng.integers(1, 140))
    h, w_ = (int(v) for v in rng.integers(1, 12, 2))
    layout = ("NCHW", "NHWC")[seed % 2]
    dtype = DTYPES[(seed // 2) % 4]
    act = (None, "relu", "relu6", "silu", "gelu")[seed % 5]
    x = rand(rng, _spec._physical(layout, n, ci, h, w_), dtype)
    w = rand(rng, (co, ci), dtype)
    b = rand(rng, (co,), dtype) if seed % 3 else None
    r = rand(rng, _spec._physical(layout, n, co, h, w_), dtype) if seed % 4 < 2 else None
    p, _ = _spec.pointwise("t", x, w, b, layout, act, r)
    _check_pointwise(be, p, x, w, b, r, act, rand(rng, p.y_shape, dtype), dtype)


@real_gpu
def test_public_api_cupy_arrays_non_contiguous(rng):
    _backend()
    x = cupy.asarray(rand(rng, (2, 8, 20, 30), "float32"))[:, :, :, ::2]   # non-contiguous
    w = cupy.asarray(rand(rng, (8, 1, 3, 3), "float32"))
    y = dwops.depthwise_conv2d(x, w, padding=1, backend="cupy")
    assert isinstance(y, cupy.ndarray)
    ref = dwops.reference.depthwise_conv2d(cupy.asnumpy(x), cupy.asnumpy(w), padding=1)
    assert_close(cupy.asnumpy(y), ref, "float32")


def test_numpy_inputs_come_back_as_numpy(rng):
    _backend()
    x, w = rand(rng, (1, 4, 9, 9), "bfloat16"), rand(rng, (4, 1, 3, 3), "bfloat16")
    y = dwops.depthwise_conv2d(x, w, padding="same", backend="cupy")
    assert isinstance(y, np.ndarray) and y.dtype == x.dtype
    assert_close(y, dwops.reference.depthwise_conv2d(x, w, padding="same"), "bfloat16",
                 scale=dwops.reference.depthwise_conv2d(np.abs(_f64(x)), np.abs(_f64(w)),
                                                        padding="same"))


@real_gpu
def test_cupy_matches_numba(rng):
    _backend()
    if not dwops.backend_available("numba"):
        pytest.skip("numba backend unavailable")
    x = cupy.asarray(rand(rng, (2, 16, 33, 35), "float32"))
    w = cupy.asarray(rand(rng, (32, 1, 5, 5), "float32"))
    for layout_x, lay in ((x, "NCHW"), (cupy.ascontiguousarray(x.transpose(0, 2, 3, 1)), "NHWC")):
        kw = dict(stride=2, padding="same", dilation=1, layout=lay)
        a = dwops.depthwise_conv2d(layout_x, w, activation="silu", backend="cupy", **kw)
        b = dwops.depthwise_conv2d(layout_x, w, activation="silu", backend="numba", **kw)
        assert_close(cupy.asnumpy(a), cupy.asnumpy(b), "float32")
        gy = cupy.asarray(rand(rng, a.shape, "float32"))
        a = dwops.depthwise_conv2d_grad_weight(layout_x, gy, w.shape, backend="cupy", **kw)
        b = dwops.depthwise_conv2d_grad_weight(layout_x, gy, w.shape, backend="numba", **kw)
        assert_close(cupy.asnumpy(a), cupy.asnumpy(b), "float32", scale=float(abs(b).max().get()))


@real_gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_torch_tensors_on_a_side_stream(dtype, rng):
    torch = pytest.importorskip("torch")
    _backend()
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    tdt = getattr(torch, dtype)
    x = torch.randn(2, 64, 28, 28, device="cuda", dtype=torch.float32).to(tdt)
    w = torch.randn(64, 1, 3, 3, device="cuda", dtype=torch.float32).to(tdt)
    pw = torch.randn(32, 64, device="cuda", dtype=torch.float32).to(tdt)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        x2 = x * 1  # produced on the side stream: dwops must order after it
        y = dwops.depthwise_conv2d(x2, w, padding=1, activation="relu", backend="cupy")
        z = dwops.separable_conv2d(x2, w, pw, padding="same", dw_activation="relu",
                                   backend="cupy")
    side.synchronize()
    assert isinstance(y, torch.Tensor) and y.dtype == tdt and y.is_cuda
    ref = torch.nn.functional.conv2d(x.float(), w.float(), padding=1, groups=64).relu()
    tol = {"bfloat16": 2e-2, "float16": 4e-3, "float32": 1e-4}[dtype]
    assert torch.allclose(y.float(), ref, atol=tol * 10, rtol=tol)
    ref_z = torch.nn.functional.conv2d(
        torch.nn.functional.conv2d(x.float(), w.float(), padding=1, groups=64).relu(),
        pw.float()[:, :, None, None])
    assert torch.allclose(z.float(), ref_z, atol=tol * 50, rtol=tol * 5)
