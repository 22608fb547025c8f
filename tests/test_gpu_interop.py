"""GPU interop (``-m gpu``, skipped without an NVIDIA GPU): streams, caller-library outputs, layers.

The stream tests delay the caller's stream with a spinning kernel before producing ``x`` on it: a
dwops kernel that ran on any other stream would read ``x`` before it is written and fail.
"""

from __future__ import annotations

import numpy as np
import pytest

import dwops
import dwops.reference as ref
from tests.conftest import assert_close, gpu, rand

pytestmark = [pytest.mark.gpu, gpu]

BACKENDS = ["auto", "numba", "cupy"]
KW = {"stride": 2, "padding": "same", "activation": "relu"}


def _backend(name):
    if name != "auto" and not dwops.backend_available(name):
        pytest.skip(f"backend {name!r} unavailable")
    return name


def _inputs(rng, dtype="float32"):
    return (rand(rng, (2, 8, 33, 31), dtype), rand(rng, (16, 1, 3, 3), dtype),
            rand(rng, (16,), dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_cuda_on_a_non_default_stream(rng, backend):
    torch = pytest.importorskip("torch")
    backend = _backend(backend)
    x, w, b = _inputs(rng)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        xs = torch.from_numpy(x).cuda(non_blocking=False)
        ws, bs = torch.from_numpy(w).cuda(), torch.from_numpy(b).cuda()
        torch.cuda._sleep(50_000_000)  # the stream is busy for a while ...
        xt = xs * 2 - xs  # ... before x is produced on it
        y = dwops.depthwise_conv2d(xt, ws, bs, backend=backend, **KW)
        y2 = y + 0  # consumed on the same stream
    stream.synchronize()
    assert isinstance(y, torch.Tensor) and y.device == xt.device and y.dtype == torch.float32
    assert_close(y2.cpu().numpy(), ref.depthwise_conv2d(x, w, b, **KW), "float32")


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_cuda_views_and_host_weights(rng, backend):
    torch = pytest.importorskip("torch")
    backend = _backend(backend)
    x = rand(rng, (2, 31, 33, 8), "float32")
    w, b = rand(rng, (16, 1, 3, 3), "float32"), rand(rng, (16,), "float32")
    xt = torch.from_numpy(x).cuda().permute(0, 3, 1, 2)  # non-contiguous NCHW view
    y = dwops.depthwise_conv2d(xt, w, torch.from_numpy(b), backend=backend, **KW)  # host weights
    assert isinstance(y, torch.Tensor) and y.is_cuda
    assert_close(y.cpu().numpy(), ref.depthwise_conv2d(x.transpose(0, 3, 1, 2), w, b, **KW),
                 "float32")


def test_gpu_weight_with_host_x_is_a_value_error(rng):
    torch = pytest.importorskip("torch")
    x, w, _ = _inputs(rng)
    with pytest.raises(ValueError, match="arrays must be on one device"):
        dwops.depthwise_conv2d(x, torch.from_numpy(w).cuda())


@pytest.mark.parametrize("backend", BACKENDS)
def test_cupy_on_a_non_default_stream(rng, backend):
    cupy = pytest.importorskip("cupy")
    backend = _backend(backend)
    x, w, b = _inputs(rng, "float64")
    with cupy.cuda.Stream(non_blocking=True) as stream:
        xc = cupy.asarray(x)
        y = dwops.depthwise_conv2d(xc * 2 - xc, cupy.asarray(w), b, backend=backend, **KW)
        y2 = y + 0
    stream.synchronize()
    assert isinstance(y, cupy.ndarray) and y.dtype == np.float64
    assert_close(cupy.asnumpy(y2), ref.depthwise_conv2d(x, w, b, **KW), "float64")


def test_bare_dlpack_object_on_the_gpu(rng):
    cupy = pytest.importorskip("cupy")

    class Bare:
        def __init__(self, a):
            self._a = a

        def __dlpack__(self, **kw):
            return self._a.__dlpack__(**kw)

        def __dlpack_device__(self):
            return self._a.__dlpack_device__()

    x, w, b = _inputs(rng)
    y = dwops.depthwise_conv2d(Bare(cupy.asarray(x)), Bare(cupy.asarray(w)), b, **KW)
    assert hasattr(y, "__cuda_array_interface__")
    assert_close(cupy.asnumpy(cupy.asarray(y)), ref.depthwise_conv2d(x, w, b, **KW), "float32")


def _jax_gpu():
    jax = pytest.importorskip("jax")
    try:
        jax.devices("gpu")
    except RuntimeError:
        pytest.skip("JAX has no GPU backend here")
    return jax


def test_jax_gpu_round_trip(rng):
    jax = _jax_gpu()
    x, w, b = _inputs(rng)
    dev = jax.devices("gpu")[0]
    xj, wj = jax.device_put(x, dev), jax.device_put(w, dev)
    y = dwops.depthwise_conv2d(xj * 2 - xj, wj, b, **KW)
    assert isinstance(y, jax.Array) and {d.platform for d in y.devices()} == {"gpu"}
    assert_close(np.asarray(y), ref.depthwise_conv2d(x, w, b, **KW), "float32")


def test_dwops_jax_on_gpu_under_jit(rng):
    """The buffer_callback route: XLA's buffers and stream, values and gradients."""
    jax = _jax_gpu()
    import dwops.jax as dj

    x, w, b = _inputs(rng)
    dev = jax.devices("gpu")[0]
    args = [jax.device_put(a, dev) for a in (x, w, b)]
    f = jax.jit(jax.value_and_grad(
        lambda *a: (dj.depthwise_conv2d(*a, stride=2, padding="same", activation="gelu") ** 2)
        .sum(), (0, 1, 2)))
    val, grads = f(*args)
    g = jax.jit(jax.value_and_grad(
        lambda *a: (dj.depthwise_conv2d(*a, stride=2, padding="same", activation="gelu",
                                        backend="numpy") ** 2).sum(), (0, 1, 2)))
    cpu = jax.devices("cpu")[0]
    val_ref, grads_ref = g(*[jax.device_put(a, cpu) for a in (x, w, b)])
    assert abs(float(val) - float(val_ref)) <= 1e-4 * abs(float(val_ref))
    for u, v in zip(grads, grads_ref):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-4,
                                   atol=1e-4 * float(np.abs(np.asarray(v)).max()))


def test_dwops_torch_on_cuda_forward_and_backward(rng):
    torch = pytest.importorskip("torch")
    import dwops.torch as dt

    mod = dt.SeparableConv2d(8, 12, 3, stride=2, padding="same", dw_activation="relu",
                             activation="silu").cuda()
    x = torch.from_numpy(rand(rng, (2, 8, 17, 19), "float32")).cuda().requires_grad_()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        loss = mod(x).square().sum()
        loss.backward()
    stream.synchronize()
    ref_mod = dt.SeparableConv2d(8, 12, 3, stride=2, padding="same", dw_activation="relu",
                                 activation="silu", backend="numpy")
    ref_mod.load_state_dict({k: v.cpu() for k, v in mod.state_dict().items()})
    xc = x.detach().cpu().requires_grad_()
    ref_loss = ref_mod(xc).square().sum()
    ref_loss.backward()
    torch.testing.assert_close(loss.cpu(), ref_loss, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad.cpu(), xc.grad, rtol=1e-4, atol=1e-4)
    for p, q in zip(mod.parameters(), ref_mod.parameters()):
        torch.testing.assert_close(p.grad.cpu(), q.grad, rtol=1e-4, atol=1e-3)
