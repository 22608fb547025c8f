"""Every error of the contract: type, message naming function/argument/value,
raised before any work, identical whichever backend was asked for."""

from __future__ import annotations

import numpy as np
import pytest

import dwops
from dwops import BackendUnavailableError
from tests.conftest import rand

BACKENDS = ["numpy", "cpu", "auto", "numba", "cupy"]


@pytest.fixture
def arrays(rng):
    return {
        "x": rand(rng, (2, 3, 8, 8)),
        "w": rand(rng, (6, 1, 3, 3)),
        "b": rand(rng, (6,)),
        "pw": rand(rng, (4, 6)),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call, exc, pattern", [
    (lambda a, be: dwops.depthwise_conv2d([[1.0]], a["w"], backend=be), TypeError,
     r"depthwise_conv2d: argument 'x' must be an array.*list"),
    (lambda a, be: dwops.depthwise_conv2d(a["x"].astype(np.int32), a["w"], backend=be), TypeError,
     r"depthwise_conv2d: argument 'x' must have a floating dtype.*int32"),
    (lambda a, be: dwops.depthwise_conv2d(a["x"], a["w"].astype(np.float64), backend=be),
     TypeError, r"argument 'weight' has dtype float64 but 'x' has float32"),
    (lambda a, be: dwops.depthwise_conv2d(a["x"], a["w"], a["b"].astype(np.float16), backend=be),
     TypeError, r"argument 'bias' has dtype float16"),
    (lambda a, be: dwops.depthwise_conv2d(a["x"][0], a["w"], backend=be), ValueError,
     r"depthwise_conv2d: argument 'x' must be 4-d, got shape \(3, 8, 8\)"),
    (lambda a, be: dwops.depthwise_conv2d(a["x"], a["w"][:5], backend=be), ValueError,
     r"argument 'weight' has 5 output channels, not a multiple of the 3 input channels"),
    (lambda a, be: dwops.depthwise_conv2d(a["x"], a["w"][:, :, None], backend=be), ValueError,
     r"argument 'weight' must have shape \(C\*M, 1, KH, KW\), got \(6, 1, 1, 3, 3\)"),
    (lambda a, be: dwops.depthwise_conv2d(a["x"], np.ones((3, 2, 3, 3), np.float32), backend=be),
     ValueError, r"argument 'weight' must have shape \(C\*M, 1, KH, KW\)"),
    (lambda a, be: dwops.depthwise_conv2d(a["x"], a["w"], a["b"][:4], backend=be), ValueError,
     r"argument 'bias' must have shape \(6,\), got \(4,\)"),
    (lambda a, be: dwops.depthwise_conv2d(a["x"], a["w"], stride=0, backend=be), ValueError,
     r"depthwise_conv2d: stride must be >= 1, got 0"),
    (lambda a, be: dwops.depthwise_conv2d(a["x"], a["w"], stride=(1, 2, 3), backend=be),
     ValueError, r"stride must be a positive int or an \(h, w\) pair, got \(1, 2, 3\)"),
    (lambda a, be: dwops.depthwise_conv2d(a["x"], a["w"], stride=1.5, backend=be),
     ValueError, r"stride must be a positive int"),
    (lambda a, be: dwops.depthwise_conv2d(a["x"], a["w"], dilation=(1, 0), backend=be),
     ValueError, r"dilation must be >= 1, got \(1, 0\)"),
    (lambda a, be: dwops.depthwise_conv2d(a["x"], a["w"], padding=-1, backend=be), ValueError,
     r"padding must be >= 0, got -1"),
    (lambda a, be: dwops.depthwise_conv2d(a["x"], a["w"], padding=((1, -2), (0, 0)), backend=be),
     ValueError, r"padding must be >= 0"),
    (lambda a, be: dwops.depthwise_conv2d(a["x"], a["w"], padding="full", backend=be), ValueError,
     r"padding string must be 'same' or 'valid', got 'full'"),
    (lambda a, be: dwops.depthwise_conv2d(a["x"], a["w"], padding=(1, 2, 3), backend=be),
     ValueError, r"padding must be an int, \(ph, pw\)"),
    (lambda a, be: dwops.depthwise_conv2d(a["x"], np.ones((3, 1, 9, 9), np.float32), backend=be),
     ValueError, r"empty output: input 8x8 with kernel 9x9"),
    (lambda a, be: dwops.depthwise_conv2d(a["x"], np.ones((3, 1, 33, 1), np.float32), padding=20,
                                          backend=be),
     ValueError, r"kernel size 33x1 of 'weight' exceeds the supported 31x31"),
    (lambda a, be: dwops.depthwise_conv2d(a["x"][:0], a["w"], backend=be), ValueError,
     r"argument 'x' is empty"),
    (lambda a, be: dwops.depthwise_conv2d(a["x"], a["w"], layout="NHCW", backend=be), ValueError,
     r"layout must be 'NCHW' or 'NHWC', got 'NHCW'"),
    (lambda a, be: dwops.depthwise_conv2d(a["x"], a["w"], activation="tanh", backend=be),
     ValueError, r"activation must be None, 'relu', 'relu6', 'silu', 'gelu', 'hardswish' or "
                 r"'hardsigmoid', got 'tanh'"),
    (lambda a, be: dwops.depthwise_conv2d_grad_input(np.ones((2, 6, 8, 8), np.float32), a["w"],
                                                     (2, 3, 8, 8), backend=be),
     ValueError, r"argument 'grad_output' must have shape \(2, 6, 6, 6\)"),
    (lambda a, be: dwops.depthwise_conv2d_grad_input(np.ones((2, 6, 6, 6), np.float32), a["w"],
                                                     (2, 3, 8), backend=be),
     ValueError, r"input_shape must be a tuple of 4 ints, got \(2, 3, 8\)"),
    (lambda a, be: dwops.depthwise_conv2d_grad_weight(a["x"], np.ones((2, 6, 6, 6), np.float32),
                                                      (6, 1, 3), backend=be),
     ValueError, r"depthwise_conv2d_grad_weight: weight_shape must be a tuple of 4 ints"),
    (lambda a, be: dwops.depthwise_conv2d_grad_weight(a["x"], np.ones((2, 6, 5, 6), np.float32),
                                                      (6, 1, 3, 3), backend=be),
     ValueError, r"argument 'grad_output' must have shape \(2, 6, 6, 6\)"),
    (lambda a, be: dwops.depthwise_conv2d_backward(a["x"], np.ones((2, 6, 5, 6), np.float32),
                                                   a["w"], backend=be),
     ValueError, r"depthwise_conv2d_backward: argument 'grad_output' must have shape "
                 r"\(2, 6, 6, 6\)"),
    (lambda a, be: dwops.depthwise_conv2d_backward(a["x"], np.ones((2, 6, 6, 6), np.float32),
                                                   a["w"], need_input=False, need_weight=False,
                                                   backend=be),
     ValueError, r"depthwise_conv2d_backward: nothing to compute: at least one of need_input, "
                 r"need_weight, need_bias must be True"),
    (lambda a, be: dwops.depthwise_conv2d_backward(a["x"], np.ones((2, 6, 6, 6), np.float64),
                                                   a["w"], backend=be),
     TypeError, r"argument 'grad_output' has dtype float64 but 'x' has float32"),
    (lambda a, be: dwops.pointwise_conv2d(a["x"], a["pw"], backend=be), ValueError,
     r"pointwise_conv2d: argument 'weight' has C_in=6 but x has 3 channels"),
    (lambda a, be: dwops.pointwise_conv2d(a["x"], np.ones((4, 3, 3, 3), np.float32), backend=be),
     ValueError, r"argument 'weight' must have shape \(C_out, C_in\) or \(C_out, C_in, 1, 1\)"),
    (lambda a, be: dwops.pointwise_conv2d(a["x"], np.ones((4, 3), np.float32),
                                          residual=np.ones((2, 4, 8, 7), np.float32), backend=be),
     ValueError, r"argument 'residual' must have shape \(2, 4, 8, 8\)"),
    (lambda a, be: dwops.pointwise_conv2d_grad_input(np.ones((2, 5, 8, 8), np.float32),
                                                     np.ones((4, 3), np.float32), backend=be),
     ValueError, r"argument 'weight' has C_out=4 but grad_output has 5 channels"),
    (lambda a, be: dwops.pointwise_conv2d_grad_weight(a["x"], np.ones((2, 5, 8, 7), np.float32),
                                                      backend=be),
     ValueError, r"argument 'grad_output' of shape \(2, 5, 8, 7\) does not match x"),
    (lambda a, be: dwops.separable_conv2d(a["x"], a["w"], np.ones((4, 5), np.float32),
                                          backend=be),
     ValueError, r"separable_conv2d: argument 'pw_weight' has C_in=5 but the depthwise stage "
                 r"gives 6 channels"),
    (lambda a, be: dwops.separable_conv2d(a["x"], a["w"], a["pw"], dw_bias=np.ones(3, np.float32),
                                          backend=be),
     ValueError, r"argument 'dw_bias' must have shape \(6,\), got \(3,\)"),
    (lambda a, be: dwops.separable_conv2d(a["x"], a["w"], a["pw"], dw_activation="swish",
                                          backend=be),
     ValueError, r"dw_activation must be None"),
])
def test_contract_errors(arrays, backend, call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call(arrays, backend)


def test_unknown_backend_name(arrays):
    with pytest.raises(ValueError, match=r"depthwise_conv2d: backend must be one of .* got 'cuda'"):
        dwops.depthwise_conv2d(arrays["x"], arrays["w"], backend="cuda")


def _gpu_backends_absent():
    return not (dwops.backend_available("numba") or dwops.backend_available("cupy"))


@pytest.mark.skipif(not _gpu_backends_absent(), reason="a GPU backend is available here")
@pytest.mark.parametrize("backend", ["numba", "cupy"])
def test_gpu_backend_without_gpu_says_what_to_install(arrays, backend):
    with pytest.raises(BackendUnavailableError, match=rf"backend '{backend}' is unavailable: .*"
                                                      r"pip install 'dwops\[cuda13\]'"):
        dwops.depthwise_conv2d(arrays["x"], arrays["w"], backend=backend)
    assert issubclass(BackendUnavailableError, RuntimeError)


def test_nothing_written_on_error(arrays):
    """Validation precedes allocation: a bad call leaves the inputs untouched and returns nothing."""
    before = {k: v.copy() for k, v in arrays.items()}
    with pytest.raises(ValueError):
        dwops.pointwise_conv2d(arrays["x"], np.ones((4, 3), np.float32),
                               residual=arrays["x"], backend="numpy")
    for k in arrays:
        np.testing.assert_array_equal(arrays[k], before[k])


def test_bool_and_numpy_integer_arguments(arrays):
    with pytest.raises(ValueError, match="stride"):
        dwops.depthwise_conv2d(arrays["x"], arrays["w"], stride=True, backend="numpy")
    y = dwops.depthwise_conv2d(arrays["x"], arrays["w"], stride=np.int64(2),
                               padding=(np.int32(1), 1), backend="numpy")
    assert y.shape == (2, 6, 4, 4)
