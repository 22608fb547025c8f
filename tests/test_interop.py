"""The DLPack boundary on the host: every library in, the same library out, mixed-library arguments.

Every result is checked for its type, dtype, device and values (against dwops.reference computed on
NumPy copies of the same inputs).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import dwops
import dwops.reference as ref
from dwops._registry import numpy_dtype
from tests.conftest import assert_close, optional_import, rand

# Only the tests that pass torch tensors need PyTorch; NumPy, JAX, TensorFlow and bare DLPack tests
# run without it.
torch, requires_torch = optional_import("torch", "the test passes torch tensors")

# The boundary is the same for every host backend: tested on the reference (no JIT compilation per
# dtype); test_default_backend_round_trip runs the default ("auto") path for each library.
HOST = "numpy"


class BareDLPack:
    """An array known only through the DLPack protocol (no shape, no dtype, no library)."""

    def __init__(self, a: np.ndarray):
        self._a = a

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        kw = {} if max_version is None else {"max_version": max_version}
        return self._a.__dlpack__(stream=stream, **kw)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


class LegacyDLPack:
    """A pre-2023 DLPack producer: ``__dlpack__(stream=None)`` only, unversioned capsules."""

    def __init__(self, a: np.ndarray):
        self._a = a

    def __dlpack__(self, stream=None):
        return self._a.__dlpack__()

    def __dlpack_device__(self):
        return (1, 0)


class ForeignMetaDLPack(BareDLPack):
    """A DLPack producer whose own ``shape``/``dtype`` are not NumPy's: read through DLPack."""

    @property
    def shape(self):
        return "a foreign shape object"

    dtype = object()


def _np(a) -> np.ndarray:
    """NumPy copy of any host array (the test's own conversion, independent of dwops._interop)."""
    if torch is not None and isinstance(a, torch.Tensor):
        t = a.detach()
        if t.dtype == torch.bfloat16:
            return t.float().numpy().astype(numpy_dtype("bfloat16"))
        return t.numpy().copy()
    if isinstance(a, (BareDLPack, LegacyDLPack)):  # ForeignMetaDLPack too
        return a._a.copy()
    return np.array(a)


def _torch(a: np.ndarray, requires_grad=False):
    if a.dtype == numpy_dtype("bfloat16"):
        t = torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
    else:
        t = torch.from_numpy(a.copy())
    return t.requires_grad_(requires_grad)


def _inputs(rng, dtype, layout="NCHW", n=2, c=3, h=7, w=6, m=2, k=3):
    shape = (n, c, h, w) if layout == "NCHW" else (n, h, w, c)
    return rand(rng, shape, dtype), rand(rng, (c * m, 1, k, k), dtype), rand(rng, (c * m,), dtype)


DW_KW = {"stride": 2, "padding": "same", "activation": "relu"}


def _check_depthwise(y, x, w, b, dtype, layout="NCHW"):
    expected = ref.depthwise_conv2d(_np(x), _np(w), None if b is None else _np(b), layout=layout,
                                    **DW_KW)
    assert_close(_np(y), expected, dtype, what="depthwise")


# ----------------------------------------------------------------------------- one library


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_numpy_round_trip(rng, dtype):
    x, w, b = _inputs(rng, dtype)
    y = dwops.depthwise_conv2d(x, w, b, backend=HOST, **DW_KW)
    assert type(y) is np.ndarray and y.dtype == numpy_dtype(dtype)
    _check_depthwise(y, x, w, b, dtype)


@requires_torch
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_torch_round_trip(rng, dtype):
    x, w, b = (_torch(a) for a in _inputs(rng, dtype))
    y = dwops.depthwise_conv2d(x, w, b, backend=HOST, **DW_KW)
    assert isinstance(y, torch.Tensor)
    assert y.dtype == getattr(torch, dtype) and y.device.type == "cpu"
    assert y.shape == (2, 6, 4, 3) and not y.requires_grad
    _check_depthwise(y, x, w, b, dtype)


@pytest.mark.skipif(not dwops.backend_available("cpu"), reason="the 'cpu' backend is not built")
@pytest.mark.parametrize("lib", ["numpy", pytest.param("torch", marks=requires_torch), "jax",
                                 "bare"])
def test_default_backend_round_trip(rng, lib):
    x, w, b = _inputs(rng, "float32")
    if lib == "jax":
        jnp = pytest.importorskip("jax").numpy
        conv, kind = jnp.asarray, type(jnp.asarray(x))
    elif lib == "torch":
        conv, kind = _torch, torch.Tensor
    else:
        conv, kind = {"numpy": (np.asarray, np.ndarray), "bare": (BareDLPack, np.ndarray)}[lib]
    y = dwops.depthwise_conv2d(conv(x), conv(w), conv(b), **DW_KW)  # backend="auto"
    assert isinstance(y, kind) and str(y.dtype).endswith("float32")
    _check_depthwise(y, x, w, b, "float32")


@requires_torch
def test_torch_requires_grad_taken_as_data(rng):
    x, w, b = (_torch(a, requires_grad=True) for a in _inputs(rng, "float32"))
    y = dwops.depthwise_conv2d(x, w, b, backend=HOST, **DW_KW)
    assert isinstance(y, torch.Tensor) and not y.requires_grad and y.grad_fn is None
    _check_depthwise(y, x, w, b, "float32")


@requires_torch
@pytest.mark.parametrize("view", ["permuted", "sliced", "nhwc_of_nchw", "expanded_weight"])
def test_torch_non_contiguous_views(rng, view):
    if view == "permuted":  # an NCHW view of NHWC memory
        x = _torch(rand(rng, (2, 7, 6, 3), "float32")).permute(0, 3, 1, 2)
        layout = "NCHW"
    elif view == "sliced":  # strides, storage offset
        x = _torch(rand(rng, (3, 5, 15, 9), "float32"))[1:, 1:4, ::2, 2:8]
        layout = "NCHW"
    else:  # an NHWC view of NCHW memory
        x = _torch(rand(rng, (2, 3, 7, 6), "float32")).permute(0, 2, 3, 1)
        layout = "NHWC"
    assert not x.is_contiguous()
    w = _torch(rand(rng, (6, 1, 3, 3), "float32"))
    if view == "expanded_weight":  # stride-0 weight: one filter shared by every channel
        w = _torch(rand(rng, (1, 1, 3, 3), "float32")).expand(6, 1, 3, 3)
    b = _torch(rand(rng, (6,), "float32"))[None].expand(2, 6)[1]
    x_before = x.clone()
    y = dwops.depthwise_conv2d(x, w, b, layout=layout, backend=HOST, **DW_KW)
    assert isinstance(y, torch.Tensor) and y.is_contiguous()
    assert torch.equal(x, x_before)  # inputs are never written
    _check_depthwise(y, x, w, b, "float32", layout)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_jax_round_trip(rng, dtype):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    x, w, b = (jnp.asarray(a) for a in _inputs(rng, dtype))
    y = dwops.depthwise_conv2d(x, w, b, backend=HOST, **DW_KW)
    assert isinstance(y, jax.Array) and y.dtype == numpy_dtype(dtype)
    assert {d.platform for d in y.devices()} == {"cpu"}
    _check_depthwise(y, x, w, b, dtype)


def test_jax_tracer_points_to_dwops_jax(rng):
    jax = pytest.importorskip("jax")
    x, w, _ = (jax.numpy.asarray(a) for a in _inputs(rng, "float32"))
    with pytest.raises(TypeError, match=r"dwops\.jax\.depthwise_conv2d"):
        jax.jit(lambda x, w: dwops.depthwise_conv2d(x, w, backend=HOST))(x, w)


@pytest.mark.parametrize("kind", [BareDLPack, LegacyDLPack, ForeignMetaDLPack])
def test_bare_dlpack_objects(rng, kind):
    x, w, b = _inputs(rng, "float32")
    y = dwops.depthwise_conv2d(kind(x), kind(w), kind(b), backend=HOST, **DW_KW)
    assert type(y) is np.ndarray and y.dtype == np.float32  # no library to return: NumPy
    _check_depthwise(y, x, w, b, "float32")
    # the gradients take them too
    gy = rand(rng, y.shape, "float32")
    gx = dwops.depthwise_conv2d_grad_input(kind(gy), kind(w), x.shape, stride=2, padding="same",
                                           backend=HOST)
    assert_close(gx, ref.depthwise_conv2d_grad_input(gy, w, x.shape, stride=2, padding="same"),
                 "float32", what="grad_input")


def test_bare_dlpack_on_a_gpu_with_host_x_is_a_value_error(rng):
    """A weight that says it lives on CUDA while x is on the host: ValueError, nothing read."""

    class CudaClaim:
        shape, dtype = (6, 1, 3, 3), np.dtype("float32")

        def __dlpack__(self, **kw):
            raise AssertionError("must not be read")

        def __dlpack_device__(self):
            return (2, 0)

    x, _, _ = _inputs(rng, "float32")
    with pytest.raises(ValueError, match=r"'weight' is on device cuda:0 but 'x' is on cpu:0"):
        dwops.depthwise_conv2d(x, CudaClaim(), backend=HOST)


def test_unsupported_type_is_a_type_error():
    with pytest.raises(TypeError, match=r"depthwise_conv2d: argument 'x' must be an array"):
        dwops.depthwise_conv2d([[[[1.0]]]], np.ones((1, 1, 1, 1)), backend=HOST)


# ----------------------------------------------------------------------------- mixed libraries


@requires_torch
def test_torch_x_numpy_weights(rng):
    x, w, b = _inputs(rng, "float32")
    y = dwops.depthwise_conv2d(_torch(x), w, b, backend=HOST, **DW_KW)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32
    _check_depthwise(y, x, w, b, "float32")


@requires_torch
def test_numpy_x_torch_parameters(rng):
    x, w, b = _inputs(rng, "float64")
    y = dwops.depthwise_conv2d(x, torch.nn.Parameter(_torch(w)), _torch(b, True), backend=HOST,
                               **DW_KW)
    assert type(y) is np.ndarray and y.dtype == np.float64
    _check_depthwise(y, x, w, b, "float64")


@requires_torch
def test_jax_x_torch_weight_bare_bias(rng):
    jax = pytest.importorskip("jax")
    x, w, b = _inputs(rng, "float32")
    y = dwops.depthwise_conv2d(jax.numpy.asarray(x), _torch(w), BareDLPack(b), backend=HOST,
                               **DW_KW)
    assert isinstance(y, jax.Array) and y.dtype == np.float32
    _check_depthwise(y, x, w, b, "float32")


@requires_torch
def test_pointwise_mixed_residual(rng):
    x = rand(rng, (2, 5, 4, 3), "float32")
    w = rand(rng, (7, 5, 1, 1), "float32")
    b = rand(rng, (7,), "float32")
    r = rand(rng, (2, 7, 4, 3), "float32")
    y = dwops.pointwise_conv2d(_torch(x)[:, :, :, :], _torch(w), b, activation="silu",
                               residual=BareDLPack(r), backend=HOST)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 7, 4, 3)
    assert_close(y.numpy(), ref.pointwise_conv2d(x, w, b, activation="silu", residual=r),
                 "float32", what="pointwise")


@requires_torch
def test_separable_mixed(rng):
    jax = pytest.importorskip("jax")
    x = rand(rng, (2, 4, 6, 5, 3), "float32")[0]  # (4, 6, 5, 3) NHWC
    dw_w = rand(rng, (6, 1, 3, 3), "float32")
    pw_w = rand(rng, (5, 6), "float32")
    b, db = rand(rng, (5,), "float32"), rand(rng, (6,), "float32")
    kw = {"padding": 1, "layout": "NHWC", "dw_activation": "relu6", "activation": "gelu"}
    y = dwops.separable_conv2d(_torch(x), jax.numpy.asarray(dw_w), pw_w, _torch(b), dw_bias=db,
                               backend=HOST, **kw)
    assert isinstance(y, torch.Tensor) and y.shape == (4, 6, 5, 5)
    assert_close(y.numpy(), ref.separable_conv2d(x, dw_w, pw_w, b, dw_bias=db, **kw), "float32",
                 what="separable")


@requires_torch
def test_gradients_return_grad_output_library(rng):
    x, w, _ = _inputs(rng, "float32")
    gy = rand(rng, (2, 6, 4, 3), "float32")
    gx = dwops.depthwise_conv2d_grad_input(_torch(gy), w, x.shape, stride=2, padding="same",
                                           backend=HOST)
    gw = dwops.depthwise_conv2d_grad_weight(x, _torch(gy), w.shape, stride=2, padding="same",
                                            backend=HOST)
    assert isinstance(gx, torch.Tensor) and isinstance(gw, torch.Tensor)
    assert_close(gx.numpy(), ref.depthwise_conv2d_grad_input(gy, w, x.shape, stride=2,
                                                             padding="same"), "float32")
    assert_close(gw.numpy(), ref.depthwise_conv2d_grad_weight(x, gy, w.shape, stride=2,
                                                              padding="same"), "float32")


@requires_torch
def test_mixed_dtypes_across_libraries_is_a_type_error(rng):
    x, w, _ = _inputs(rng, "float32")
    with pytest.raises(TypeError, match=r"'weight' has dtype float64 but 'x' has float32"):
        dwops.depthwise_conv2d(_torch(x), w.astype(np.float64), backend=HOST)


# ----------------------------------------------------------------------------- TensorFlow


def test_tensorflow_round_trip(rng):
    tf = pytest.importorskip("tensorflow")
    x, w, b = _inputs(rng, "float32")
    y = dwops.depthwise_conv2d(tf.constant(x), tf.constant(w), b, backend=HOST, **DW_KW)
    assert isinstance(y, tf.Tensor) and y.dtype == tf.float32
    _check_depthwise(y.numpy(), x, w, b, "float32")


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_tensorflow_every_op(dtype, backend, rng):
    """Every op with TensorFlow tensors (a tf.Variable weight, a NumPy bias, NHWC): TensorFlow
    tensors of the same dtype come back, with the reference's values."""
    tf = pytest.importorskip("tensorflow")
    x = rand(rng, (2, 9, 11, 6), dtype)                      # NHWC
    w = rand(rng, (12, 1, 3, 3), dtype)                      # multiplier 2
    b = rand(rng, (12,), dtype)
    pw = rand(rng, (5, 12), dtype)
    kw = dict(stride=(1, 2), padding=((1, 0), (2, 1)), layout="NHWC")
    tx, tw = tf.constant(x), tf.Variable(w)

    def check(got, want, scale=None):
        assert isinstance(got, tf.Tensor) and got.dtype.name == dtype, type(got)
        assert_close(np.asarray(got.numpy()), want, dtype, scale=scale)

    def mag(*a):
        return [np.abs(np.asarray(v, np.float64)) for v in a]

    y = dwops.depthwise_conv2d(tx, tw, b, activation="relu", backend=backend, **kw)
    check(y, ref.depthwise_conv2d(x, w, b, activation="relu", **kw),
          ref.depthwise_conv2d(*mag(x, w, b), **kw))
    gy = rand(rng, tuple(y.shape), dtype)
    check(dwops.depthwise_conv2d_grad_input(tf.constant(gy), tw, x.shape, backend=backend, **kw),
          ref.depthwise_conv2d_grad_input(gy, w, x.shape, **kw),
          ref.depthwise_conv2d_grad_input(*mag(gy, w), x.shape, **kw))
    check(dwops.depthwise_conv2d_grad_weight(tx, tf.constant(gy), w.shape, backend=backend, **kw),
          ref.depthwise_conv2d_grad_weight(x, gy, w.shape, **kw),
          ref.depthwise_conv2d_grad_weight(*mag(x, gy), w.shape, **kw))
    x12 = rand(rng, (2, 4, 5, 12), dtype)
    check(dwops.pointwise_conv2d(tf.constant(x12), tf.constant(pw), layout="NHWC", backend=backend),
          ref.pointwise_conv2d(x12, pw, layout="NHWC"),
          ref.pointwise_conv2d(*mag(x12, pw), layout="NHWC"))
    g5 = rand(rng, (2, 4, 5, 5), dtype)
    check(dwops.pointwise_conv2d_grad_input(tf.constant(g5), tf.constant(pw), layout="NHWC",
                                            backend=backend),
          ref.pointwise_conv2d_grad_input(g5, pw, layout="NHWC"),
          ref.pointwise_conv2d_grad_input(*mag(g5, pw), layout="NHWC"))
    check(dwops.pointwise_conv2d_grad_weight(tf.constant(x12), tf.constant(g5), layout="NHWC",
                                             backend=backend),
          ref.pointwise_conv2d_grad_weight(x12, g5, layout="NHWC"),
          ref.pointwise_conv2d_grad_weight(*mag(x12, g5), layout="NHWC"))
    check(dwops.separable_conv2d(tx, tw, tf.constant(pw), dw_activation="relu", backend=backend,
                                 **kw),
          ref.separable_conv2d(x, w, pw, dw_activation="relu", **kw),
          ref.separable_conv2d(*mag(x, w, pw), **kw))


# ----------------------------------------------------------------------------- GPU plumbing


def test_gpu_stream_plumbing_without_a_gpu():
    """The parts of dwops/kernels/_gpu.py that need no device: stream objects and host callers."""
    cupy = pytest.importorskip("cupy")
    from dwops._interop import describe
    from dwops.kernels import _gpu

    assert _gpu.cupy_stream(0) is cupy.cuda.Stream.null
    assert _gpu.cupy_stream(0x1234).ptr == 0x1234  # an external stream wraps the caller's handle
    x = np.ones((1, 1, 2, 2), np.float32)
    info = describe(x, "f", "x")
    assert _gpu.caller_stream(x, info) == 0  # host arrays: the legacy default stream
    assert _gpu.empty_in_caller((2,), "float32", x, info) is None
    assert _gpu.finish(None, x, info) is x  # a caller-allocated holder is the result


# ----------------------------------------------------------------------------- no imports


def test_library_detection_imports_nothing():
    """Bare DLPack objects and NumPy through every op: torch, jax, tensorflow stay unimported."""
    code = (
        "import sys, numpy as np, dwops\n"
        "class B:\n"
        "    def __init__(s, a): s.a = a\n"
        "    def __dlpack__(s, stream=None): return s.a.__dlpack__()\n"
        "    def __dlpack_device__(s): return (1, 0)\n"
        "x = np.ones((1, 2, 5, 5), np.float32)\n"
        f"dwops.depthwise_conv2d(B(x), B(np.ones((2, 1, 3, 3), np.float32)), backend={HOST!r})\n"
        f"dwops.pointwise_conv2d(x, B(np.ones((3, 2), np.float32)), backend={HOST!r})\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'jax', 'jaxlib', 'tensorflow', 'cupy'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
