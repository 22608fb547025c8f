"""dwops.jax: values and gradients under jax.jit against jax.lax.conv_general_dilated."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import dwops
from tests.conftest import assert_close

# Module-level: every test here calls dwops.jax, which imports JAX.
jax = pytest.importorskip("jax", reason="dwops.jax needs JAX")
import dwops.jax as dj  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

# The layer is tested on the reference backend (exact; no JIT compilation per configuration);
# test_default_backend runs the default ("auto") path.
HOST = "numpy"

ACT = {None: lambda v: v, "relu": jax.nn.relu, "relu6": jax.nn.relu6, "silu": jax.nn.silu,
       "gelu": lambda v: jax.nn.gelu(v, approximate=False), "hardswish": jax.nn.hard_swish,
       "hardsigmoid": jax.nn.hard_sigmoid}
# Weight scales that make some pre-activations cross the kinks (relu6: 6; hard*: -3 and 3).
SCALE = {"relu6": 8, "hardswish": 4, "hardsigmoid": 4}


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


@pytest.fixture(params=["pure", "buffer"])
def route(request, monkeypatch):
    """The CPU route (pure_callback) and the CUDA route (buffer_callback), both run on the CPU."""
    monkeypatch.setattr(dj, "_CPU_ROUTE", request.param)
    return request.param


def _a(rng, *shape, dtype=np.float64):
    return jnp.asarray(rng.uniform(-1, 1, size=shape).astype(dtype))


def _shape(layout, n, c, h, w):
    return (n, c, h, w) if layout == "NCHW" else (n, h, w, c)


def _cax(layout):
    return 1 if layout == "NCHW" else 3


def _bias(b, layout):
    return b[None, :, None, None] if layout == "NCHW" else b[None, None, None, :]


def lax_depthwise(x, w, b, stride, padding, dilation, layout, act):
    c = x.shape[_cax(layout)]
    y = lax.conv_general_dilated(x, w, window_strides=stride, padding=padding,
                                 rhs_dilation=dilation, dimension_numbers=(layout, "OIHW", layout),
                                 feature_group_count=c, precision=lax.Precision.HIGHEST)
    return ACT[act](y if b is None else y + _bias(b, layout))


def lax_pointwise(x, w, b, layout, act, r=None):
    w2 = w.reshape(w.shape[0], w.shape[1])
    y = jnp.einsum("oc,nchw->nohw" if layout == "NCHW" else "oc,nhwc->nhwo", w2, x,
                   precision=lax.Precision.HIGHEST)
    y = ACT[act](y if b is None else y + _bias(b, layout))
    return y if r is None else y + r


def _check_grads(f, g, args, cot_shape, rng):
    """Output and every gradient (VJP with a random cotangent) of f (dwops.jax) equal those of g
    (lax), both under one jit."""
    cot = _a(rng, *cot_shape)

    def output_and_grads(fn):
        def h(*a):
            y, vjp = jax.vjp(fn, *a)
            return y, vjp(cot)

        return jax.jit(h)(*args)

    (ya, ga), (yb, gb) = output_and_grads(f), output_and_grads(g)
    assert ya.dtype == jnp.float64 and ya.shape == yb.shape
    assert_close(np.asarray(ya), np.asarray(yb), "float64", what="output")
    for i, (u, v) in enumerate(zip(ga, gb)):
        assert (u is None) == (args[i] is None)
        if u is not None:
            assert u.shape == v.shape and u.dtype == v.dtype
            assert_close(np.asarray(u), np.asarray(v), "float64", what=f"grad {i}")


# (layout, C, M, H, W, K, stride, padding (dwops), padding (lax), dilation, bias, activation)
DW_CASES = [
    ("NCHW", 2, 1, 6, 5, 3, (1, 1), 0, "VALID", (1, 1), False, None),
    ("NCHW", 3, 2, 7, 8, 3, (2, 2), "same", "SAME", (1, 1), True, "relu"),
    ("NHWC", 2, 3, 7, 6, 4, (2, 1), "same", "SAME", (1, 1), True, "gelu"),
    ("NHWC", 3, 1, 8, 7, 3, (1, 2), ((1, 0), (2, 1)), ((1, 0), (2, 1)), (2, 1), True, "silu"),
    ("NCHW", 2, 2, 6, 6, 3, (1, 1), (1, 1), ((1, 1), (1, 1)), (1, 1), True, "relu6"),
    ("NHWC", 3, 1, 6, 7, 3, (1, 1), "same", "SAME", (1, 1), True, "hardswish"),
]


@pytest.mark.parametrize("case", DW_CASES)
def test_depthwise_against_lax(rng, case, route):
    layout, c, m, h, w, k, stride, pad, lax_pad, dil, bias, act = case
    x = _a(rng, *_shape(layout, 2, c, h, w))
    wt = _a(rng, c * m, 1, k, k) * SCALE.get(act, 1)
    b = _a(rng, c * m) if bias else None

    def f(x, wt, b):
        return dj.depthwise_conv2d(x, wt, b, stride=stride, padding=pad, dilation=dil,
                                   layout=layout, activation=act, backend=HOST)

    def g(x, wt, b):
        return lax_depthwise(x, wt, b, stride, lax_pad, dil, layout, act)

    _check_grads(f, g, (x, wt, b), jax.eval_shape(g, x, wt, b).shape, rng)


PW_CASES = [
    ("NCHW", 3, 4, 4, False, None, False),
    ("NHWC", 4, 3, 2, True, "gelu", True),
    ("NCHW", 2, 5, 4, True, "relu", True),
    ("NHWC", 3, 2, 2, True, "silu", False),
    ("NCHW", 4, 3, 4, True, "hardsigmoid", True),
]


@pytest.mark.parametrize("case", PW_CASES)
def test_pointwise_against_lax(rng, case, route):
    layout, ci, co, wdim, bias, act, residual = case
    x = _a(rng, *_shape(layout, 2, ci, 3, 4))
    w = (_a(rng, co, ci, 1, 1) if wdim == 4 else _a(rng, co, ci)) * SCALE.get(act, 1)
    b = _a(rng, co) if bias else None
    r = _a(rng, *_shape(layout, 2, co, 3, 4)) if residual else None

    def f(x, w, b, r):
        return dj.pointwise_conv2d(x, w, b, layout=layout, activation=act, residual=r,
                                   backend=HOST)

    def g(x, w, b, r):
        return lax_pointwise(x, w, b, layout, act, r)

    _check_grads(f, g, (x, w, b, r), _shape(layout, 2, co, 3, 4), rng)


# (layout, C, M, C_out, K, stride, padding, lax padding, dw_bias, dw_act, act, residual)
SEP_CASES = [
    ("NCHW", 2, 1, 3, 3, (1, 1), "same", "SAME", False, "relu", None, True),
    ("NCHW", 2, 2, 3, 3, (2, 2), "same", "SAME", True, "silu", "relu6", False),
    ("NHWC", 3, 1, 4, 2, (2, 1), 0, "VALID", True, "gelu", "relu", True),
    ("NCHW", 3, 1, 4, 3, (1, 1), "same", "SAME", True, "hardswish", "hardswish", False),
]


@pytest.mark.parametrize("case", SEP_CASES)
def test_separable_against_lax(rng, case, route):
    layout, c, m, co, k, stride, pad, lax_pad, has_db, dw_act, act, residual = case
    x = _a(rng, *_shape(layout, 2, c, 6, 5))
    dw_w, pw_w, b = (_a(rng, c * m, 1, k, k) * SCALE.get(dw_act, 1),
                     _a(rng, co, c * m) * SCALE.get(act, 1), _a(rng, co))
    db = _a(rng, c * m) if has_db else None
    mid = jax.eval_shape(lambda: lax_depthwise(x, dw_w, db, stride, lax_pad, (1, 1), layout,
                                               dw_act))
    out_shape = list(mid.shape)
    out_shape[_cax(layout)] = co
    r = _a(rng, *out_shape) if residual else None

    def f(x, dw_w, pw_w, b, db, r):
        return dj.separable_conv2d(x, dw_w, pw_w, b, dw_bias=db, stride=stride, padding=pad,
                                   layout=layout, dw_activation=dw_act, activation=act,
                                   residual=r, backend=HOST)

    def g(x, dw_w, pw_w, b, db, r):
        mid = lax_depthwise(x, dw_w, db, stride, lax_pad, (1, 1), layout, dw_act)
        return lax_pointwise(mid, pw_w, b, layout, act, r)

    _check_grads(f, g, (x, dw_w, pw_w, b, db, r), tuple(out_shape), rng)


@pytest.mark.parametrize("dtype", ["float64", "float16"])
def test_activation_gradient_matches_reference_and_autodiff(dtype):
    """The layer's act'(z) table against dwops.reference.activation_derivative and jax.grad of
    jax.nn's activations on the exact kinks (-3, 0, 3, 6) and beside them (16-bit: in float32)."""
    z = np.array([-7.0, -3.5, -3.0, -2.5, -1.5, -1.0, 0.0, 0.5, 1.0, 2.5, 3.0, 3.5, 5.5, 6.0, 6.5,
                  np.nan], dtype)
    g = np.linspace(-2.0, 3.0, z.size).astype(dtype)
    rtol, atol = (1e-15, 0.0) if dtype == "float64" else (2**-10, 1e-6)  # atol: gelu' at -7
    for act in dwops._spec.ACTIVATIONS:
        if act in dj._MASKED:
            got = dj._act_grad(jnp.asarray(g), act, out=jnp.asarray(ACT[act](z.astype("float64"))))
        else:
            got = dj._act_grad(jnp.asarray(g), act, pre=jnp.asarray(z))
        assert got.dtype == dtype, act
        want = g.astype("float64") * dwops.reference.activation_derivative(act, z)
        np.testing.assert_allclose(np.asarray(got, "float64"), want, rtol=rtol, atol=atol,
                                   err_msg=str(act))
        auto = jax.vmap(jax.grad(ACT[act]))(jnp.asarray(z[:-1], "float64")) * g[:-1]
        # atol: jax.grad of the erf form of gelu far in the tail (-7) differs by ~1e-17
        np.testing.assert_allclose(np.asarray(got, "float64")[:-1], np.asarray(auto), rtol=rtol,
                                   atol=max(atol, 1e-15), err_msg=str(act))


def test_eager_vmap_and_dtypes(rng, route):
    x, w, b = _a(rng, 3, 2, 2, 5, 5), _a(rng, 2, 1, 3, 3), _a(rng, 2)
    kw = {"padding": 1, "activation": "silu", "backend": HOST}
    y = dj.depthwise_conv2d(x[0], w, b, **kw)  # eager, no jit
    assert isinstance(y, jax.Array)
    assert_close(np.asarray(y), np.asarray(lax_depthwise(x[0], w, b, (1, 1), "SAME", (1, 1),
                                                         "NCHW", "silu")), "float64")
    batched = jax.jit(jax.vmap(lambda v: dj.depthwise_conv2d(v, w, b, **kw)))(x)
    for i in range(3):
        assert_close(np.asarray(batched[i]), np.asarray(dj.depthwise_conv2d(x[i], w, b, **kw)),
                     "float64")
    for dtype in ("float16", "bfloat16", "float32"):
        xd, wd = x[0].astype(dtype), w.astype(dtype)
        y = jax.jit(lambda a, c: dj.depthwise_conv2d(a, c, padding="same", backend=HOST))(xd, wd)
        assert y.dtype == dtype and y.shape == (2, 2, 5, 5)
        expected = dwops.reference.depthwise_conv2d(np.asarray(xd), np.asarray(wd), padding="same")
        assert_close(np.asarray(y), expected, dtype)


def test_errors_at_trace_time(rng):
    x, w = _a(rng, 1, 2, 5, 5), _a(rng, 3, 1, 3, 3)
    with pytest.raises(ValueError, match=r"depthwise_conv2d: argument 'weight' has 3 output"):
        jax.jit(lambda x, w: dj.depthwise_conv2d(x, w, backend=HOST))(x, w)
    with pytest.raises(TypeError, match=r"'weight' has dtype float32 but 'x' has float64"):
        dj.pointwise_conv2d(x, _a(rng, 4, 2).astype(jnp.float32), backend=HOST)
    with pytest.raises(ValueError, match=r"separable_conv2d: backend must be one of"):
        dj.separable_conv2d(x, _a(rng, 2, 1, 3, 3), _a(rng, 4, 2), backend="tpu")


@pytest.mark.skipif(not dwops.backend_available("cpu"), reason="the 'cpu' backend is not built")
def test_default_backend(rng):
    """backend="auto" (the fast CPU backend) under jit: values and gradients of the reference."""
    x, w, b = _a(rng, 2, 3, 7, 6), _a(rng, 6, 1, 3, 3), _a(rng, 6)
    kw = {"stride": 2, "padding": "same", "activation": "gelu"}

    def loss(be):
        return jax.jit(jax.value_and_grad(
            lambda *a: jnp.sum(dj.depthwise_conv2d(*a, backend=be, **kw) ** 2), (0, 1, 2)))

    (va, ga), (vb, gb) = loss("auto")(x, w, b), loss(HOST)(x, w, b)
    assert_close(np.asarray(va), np.asarray(vb), "float64")
    for u, v in zip(ga, gb):
        assert_close(np.asarray(u), np.asarray(v), "float64")


def test_dwops_jax_does_not_import_torch():
    code = (
        "import sys, dwops, dwops.jax, jax, jax.numpy as jnp\n"
        "f = jax.jit(jax.grad(lambda x: dwops.jax.depthwise_conv2d(x, jnp.ones((2, 1, 3, 3)),"
        f" backend={HOST!r}).sum()))\n"
        "f(jnp.ones((1, 2, 5, 5))).block_until_ready()\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'tensorflow'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
