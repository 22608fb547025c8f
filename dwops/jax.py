"""JAX layer: differentiable depthwise, pointwise and separable convolutions, usable under ``jax.jit``.

Import it explicitly (``import dwops.jax``); it imports JAX, never PyTorch.

:func:`depthwise_conv2d`, :func:`pointwise_conv2d` and :func:`separable_conv2d` have the top-level
signatures, take ``jax.Array`` (or anything ``jnp.asarray`` accepts) and return ``jax.Array``. They
work eagerly and under ``jax.jit``, ``jax.grad`` (``jax.custom_vjp``) and ``jax.vmap`` (the op is
called once per mapped element). Arguments are validated at trace time by the same validation layer
as the top-level functions (from shapes and dtypes only), so errors are the same.

How the kernels are reached from a JAX program (chosen per lowering platform with
``jax.lax.platform_dependent``):

* **CPU** (and any platform other than CUDA): ``jax.pure_callback``. The callback receives NumPy
  views of JAX's host buffers and runs the host backend (``backend="auto"``: ``"cpu"``) through the
  public function; JAX copies the NumPy result into its output buffer (one host copy of the output).
* **CUDA**: ``jax.experimental.buffer_callback.buffer_callback``, present in jax 0.10. Its callback
  receives XLA's device buffers (``__cuda_array_interface__``) and XLA's compute stream
  (``ctx.stream``). They are viewed zero-copy as CuPy arrays, the GPU backend is called with the
  *output buffer itself* as ``out`` and with XLA's stream, so nothing is copied, nothing leaves the
  device, and the kernel is ordered with the rest of the XLA program without a host
  synchronization. ``pure_callback`` would instead move every input and output through host memory;
  ``jax.ffi`` would need a compiled C++ handler per op, which a pure-Python package cannot ship. If
  a backend ever hands back a view that is not the output buffer, the result is copied into it on
  the same stream (checked by data pointer). bfloat16 crosses the callback as its uint16 bits
  (free bitcasts in XLA), the representation the CuPy backend's kernels read, so bfloat16 on the
  GPU needs ``backend="cupy"`` (or ``"auto"`` choosing it).

Backward, with ``z = conv(x) + b``, ``y = act(z) + r`` and ``g`` the cotangent of ``y``::

    gz = g * act'(z)   (relu, relu6: from the saved output when there is no residual;
                        silu, gelu, hardswish, hardsigmoid, or with a residual: z recomputed
                        by one forward call; act' as dwops.reference.activation_derivative,
                        PyTorch autograd's values at the kinks)
    gx = conv_grad_input(gz, w);  gw = conv_grad_weight(x, gz);  gb = sum_{N,H,W} gz;  gr = g
    (depthwise: gx, gw and gb from one dwops.depthwise_conv2d_backward call)

The separable op recomputes its intermediate ``mid = dw_act(dw(x) + dw_b)`` (the fused forward
never stores it) and chains the pointwise and depthwise gradients through it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import _api, _registry, _spec
from ._interop import describe

__all__ = ["depthwise_conv1d", "depthwise_conv2d", "pointwise_conv2d", "separable_conv2d"]

_MASKED = ("relu", "relu6")  # activations whose derivative is read from their output

# How the CPU lowering reaches the kernels: "pure" (jax.pure_callback) or "buffer"
# (buffer_callback, the CUDA route; selectable on CPU so the tests exercise that route too).
_CPU_ROUTE = "pure"


# ----------------------------------------------------------------------------- the op table


@dataclass(frozen=True)
class _Op:
    """How one dwops function is reached: its validation, backend method and argument order."""

    problem: Callable  # (fn, arrays: dict, kw: dict) -> (problem, infos), from _spec
    method: str  # Backend method name
    args: tuple  # array argument names, in the method's positional order
    out_shape: Callable  # problem -> physical output shape
    reshape: Callable  # problem -> {argument name: shape the backend wants}


def _no_reshape(p):
    return {}


_OPS = {
    "depthwise_conv2d": _Op(
        lambda fn, a, k: _spec.depthwise(fn, a["x"], a["weight"], a.get("bias"), k["stride"],
                                         k["padding"], k["dilation"], k["layout"], k["activation"]),
        "depthwise_forward", ("x", "weight", "bias"), lambda p: p.y_shape, _no_reshape),
    "depthwise_conv2d_grad_input": _Op(
        lambda fn, a, k: _spec.depthwise_grad_input(fn, a["grad_output"], a["weight"],
                                                    k["input_shape"], k["stride"], k["padding"],
                                                    k["dilation"], k["layout"]),
        "depthwise_grad_input", ("grad_output", "weight"), lambda p: p.x_shape, _no_reshape),
    "depthwise_conv2d_grad_weight": _Op(
        lambda fn, a, k: _spec.depthwise_grad_weight(fn, a["x"], a["grad_output"],
                                                     k["weight_shape"], k["stride"], k["padding"],
                                                     k["dilation"], k["layout"]),
        "depthwise_grad_weight", ("x", "grad_output"), lambda p: p.w_shape, _no_reshape),
    "depthwise_conv2d_backward": _Op(
        lambda fn, a, k: _spec.depthwise_backward(fn, a["x"], a["grad_output"], a["weight"],
                                                  k["stride"], k["padding"], k["dilation"],
                                                  k["layout"], {n: k[n] for n in _NEED[:3]}),
        "depthwise_backward", ("x", "grad_output", "weight"),
        lambda p: [p.x_shape, p.w_shape, (p.CO,)], _no_reshape),
    "pointwise_conv2d": _Op(
        lambda fn, a, k: _spec.pointwise(fn, a["x"], a["weight"], a.get("bias"), k["layout"],
                                         k["activation"], a.get("residual")),
        "pointwise_forward", ("x", "weight", "bias", "residual"), lambda p: p.y_shape,
        lambda p: {"weight": (p.CO, p.CI)}),
    "pointwise_conv2d_grad_input": _Op(
        lambda fn, a, k: _spec.pointwise_grad_input(fn, a["grad_output"], a["weight"],
                                                    k["layout"]),
        "pointwise_grad_input", ("grad_output", "weight"), lambda p: p.x_shape,
        lambda p: {"weight": (p.CO, p.CI)}),
    "pointwise_conv2d_grad_weight": _Op(
        lambda fn, a, k: _spec.pointwise_grad_weight(fn, a["x"], a["grad_output"], k["layout"]),
        "pointwise_grad_weight", ("x", "grad_output"), lambda p: (p.CO, p.CI), _no_reshape),
    "separable_conv2d": _Op(
        lambda fn, a, k: _spec.separable(fn, a["x"], a["dw_weight"], a["pw_weight"], a.get("bias"),
                                         a.get("dw_bias"), k["stride"], k["padding"],
                                         k["dilation"], k["layout"], k["dw_activation"],
                                         k["activation"], a.get("residual")),
        "separable_forward", ("x", "dw_weight", "pw_weight", "bias", "dw_bias", "residual"),
        lambda p: p.y_shape, lambda p: {"pw_weight": (p.pw.CO, p.pw.CI)}),
    "depthwise_conv1d": _Op(
        lambda fn, a, k: _spec.depthwise_1d(fn, a["x"], a["weight"], a.get("bias"), k["stride"],
                                            k["padding"], k["dilation"], k["layout"],
                                            k["activation"], a.get("initial_state"), False,
                                            a.get("seq_idx")),
        "depthwise_conv1d_forward", ("x", "weight", "bias", "initial_state", "seq_idx"),
        lambda p: [p.y_shape, None], _no_reshape),
    "depthwise_conv1d_backward": _Op(
        lambda fn, a, k: _spec.depthwise_1d_backward(
            fn, a["x"], a["grad_output"], a["weight"], k["stride"], k["padding"], k["dilation"],
            k["layout"], a.get("initial_state"), a.get("seq_idx"),
            {n: k[n] for n in _NEED}),
        "depthwise_conv1d_backward",
        ("x", "grad_output", "weight", "initial_state", "seq_idx"),
        lambda p: [p.x_shape, p.w_shape, (p.CO,), p.state_shape if p.has_state else None],
        _no_reshape),
}
_NEED = ("need_input", "need_weight", "need_bias", "need_initial_state")
# dwops.jax's backward asks for every gradient (custom_vjp returns one per input; the bias
# gradient comes from the same call): need_initial_state follows whether a state was given.


def _meta(a):
    """A zero-size-in-memory NumPy stand-in with ``a``'s shape and dtype, for the validation layer
    (which reads metadata only); works for tracers."""
    if a is None:
        return None
    return np.broadcast_to(np.zeros((), np.dtype(a.dtype)), tuple(a.shape))


def _problem(name: str, arrays: dict, kw: dict):
    return _OPS[name].problem(name, {k: _meta(v) for k, v in arrays.items()}, kw)[0]


def _check_backend(fn: str, backend) -> None:
    if backend not in _registry.BACKEND_NAMES:
        raise ValueError(f"{fn}: backend must be one of "
                         f"{', '.join(map(repr, _registry.BACKEND_NAMES))}, got {backend!r}")


# ----------------------------------------------------------------------------- calling a kernel


def _invoke(name: str, arrays: dict, kw: dict, backend: str, p=None):
    """``dwops.<name>(**arrays, **kw)`` as a JAX operation (traceable, lowered per platform).

    An op whose ``out_shape`` is a list has several outputs (None entries: not computed); it
    returns a tuple of the computed ones."""
    op = _OPS[name]
    p = p if p is not None else _problem(name, arrays, kw)
    present = tuple(k for k in op.args if arrays.get(k) is not None)
    values = [arrays[k] for k in present]
    shapes = op.out_shape(p)
    multi = isinstance(shapes, list)
    shapes = [tuple(s) for s in (shapes if multi else [shapes]) if s is not None]
    dtype = jnp.dtype(_registry.numpy_dtype(_api.problem_dtype(p)))
    result = tuple(jax.ShapeDtypeStruct(s, dtype) for s in shapes)

    def host(*vals):
        out = getattr(_api, name)(**dict(zip(present, vals)), **kw, backend=backend)
        outs = [o for o in out if o is not None] if isinstance(out, tuple) else [out]
        return tuple(np.asarray(o) for o in outs)

    def device(ctx, out, *bufs):
        _run_into(name, op, p, dict(zip(present, bufs)), list(out), ctx, backend)

    def pure(*vals):
        return jax.pure_callback(host, result, *vals, vmap_method="sequential")

    def buffered(*vals):
        from jax.experimental.buffer_callback import buffer_callback

        if dtype != jnp.bfloat16:
            return buffer_callback(device, result, vmap_method="sequential")(*vals)
        # bfloat16 crosses as its uint16 bits (free bitcasts in XLA): CuPy has no bfloat16 dtype,
        # and the CuPy backend's native bfloat16 arrays are exactly these bits.
        bits = tuple(jax.ShapeDtypeStruct(r.shape, jnp.uint16) for r in result)
        vals = [jax.lax.bitcast_convert_type(v, jnp.uint16) if v.dtype == jnp.bfloat16 else v
                for v in vals]
        outs = buffer_callback(device, bits, vmap_method="sequential")(*vals)
        return tuple(jax.lax.bitcast_convert_type(o, jnp.bfloat16) for o in outs)

    cpu = buffered if _CPU_ROUTE == "buffer" else pure
    outs = jax.lax.platform_dependent(*values, cpu=cpu, cuda=buffered, default=pure)
    return tuple(outs) if multi else outs[0]


def _data_ptr(a) -> int:
    if hasattr(a, "__cuda_array_interface__"):
        return a.__cuda_array_interface__["data"][0]
    return a.__array_interface__["data"][0]


def _run_into(name, op: _Op, p, buffers: dict, outs: list, ctx, backend: str) -> None:
    """Run the backend on XLA's buffers, writing straight into XLA's output buffers ``outs``."""
    kind, ordinal = outs[0].__dlpack_device__()
    if int(kind) in (2, 13):  # CUDA: zero-copy CuPy views, XLA's stream
        import cupy

        from .kernels._gpu import cupy_stream

        with cupy.cuda.Device(int(ordinal)), cupy_stream(ctx.stream):
            views = {k: cupy.asarray(b) for k, b in buffers.items()}
            _launch_into(name, op, p, views, [cupy.asarray(o) for o in outs], True, backend)
            return
    views = {k: np.from_dlpack(b) for k, b in buffers.items()}
    out_views = [np.from_dlpack(o) for o in outs]
    if _api.problem_dtype(p) == "bfloat16":  # uint16 bits (see _invoke) viewed as bfloat16
        bf16 = _registry.numpy_dtype("bfloat16")
        views = {k: v.view(bf16) if v.dtype == np.uint16 else v for k, v in views.items()}
        out_views = [o.view(bf16) for o in out_views]
    _launch_into(name, op, p, views, out_views, False, backend)


def _launch_into(name, op: _Op, p, views: dict, out_views: list, on_gpu: bool, backend) -> None:
    """Run ``op`` on the views (NumPy on the host; CuPy on the GPU, inside XLA's stream as CuPy's
    current stream, which the backend's ``stream_for`` therefore returns in its own form)."""
    be = _registry.resolve(name, backend, on_gpu, op.method, p)
    stream = be.stream_for(out_views[0], describe(out_views[0], name, "out"))
    reshape = op.reshape(p)
    bits = on_gpu and _api.problem_dtype(p) == "bfloat16"  # CuPy views of uint16 bits
    if bits and be.name != "cupy":
        raise TypeError(f"{name}: bfloat16 on the GPU under dwops.jax needs backend 'cupy' "
                        f"(backend {be.name!r} has no bfloat16 kernels)")

    def native_view(v, k):
        # The CuPy backend's native bfloat16 array is a C-contiguous uint16 CuPy array: the views.
        return v if bits else be.asarray(v, describe(v, name, k))

    native = []
    for k in op.args:
        v = views.get(k)
        if v is None:
            native.append(None)
            continue
        a = native_view(v, k)
        native.append(a.reshape(reshape[k]) if k in reshape else a)
    shapes = op.out_shape(p)
    pending = iter(out_views)
    targets = [next(pending) if s is not None else None
               for s in (shapes if isinstance(shapes, list) else [shapes])]
    out_natives = [None if t is None else native_view(t, "out") for t in targets]
    with be.lock:
        getattr(be, op.method)(p, *native, *out_natives, stream=stream)
    for target, out_native in zip(targets, out_natives):
        if target is None or _data_ptr(out_native) == _data_ptr(target):
            continue
        # the backend worked on a copy of the buffer
        if on_gpu:
            import cupy

            target[...] = cupy.asarray(out_native)
        else:
            target[...] = np.asarray(out_native)


# ----------------------------------------------------------------------------- autograd helpers


def _reduce_axes(layout: str) -> tuple:
    """The N, H, W axes a bias gradient sums over."""
    return (0, 2, 3) if layout == "NCHW" else (0, 1, 2)


def _act_grad(g, activation, out=None, pre=None):
    """``g * act'(z)``: from the activation's output ``out`` (relu, relu6) or from ``z`` (``pre``)."""
    if activation is None:
        return g
    if activation in _MASKED:
        v = out if out is not None else pre
        keep = (v > 0) if activation == "relu" else (v > 0) & (v < 6)
        return jnp.where(keep, g, jnp.zeros_like(g))
    wide = pre.dtype in (jnp.float16, jnp.bfloat16)
    z = pre.astype(jnp.float32) if wide else pre
    if activation == "silu":
        s = jax.nn.sigmoid(z)
        d = s * (1 + z * (1 - s))
    elif activation == "hardswish":  # z/3 + 1/2 on (-3, 3); 0 at -3, 1 at 3 (as PyTorch)
        d = jnp.where(z <= -3, 0.0, jnp.where(z >= 3, 1.0, z / 3 + 0.5))
    elif activation == "hardsigmoid":  # 1/6 on (-3, 3), 0 at both ends (as PyTorch)
        d = ((z > -3) & (z < 3)).astype(z.dtype) / 6
    else:  # gelu, erf form
        d = 0.5 * (1 + jax.scipy.special.erf(z * (1 / math.sqrt(2)))) + z * jnp.exp(-0.5 * z * z) * (
            1 / math.sqrt(2 * math.pi))
    return (g.astype(d.dtype) * d).astype(g.dtype)


def _as_array(a):
    return None if a is None else jnp.asarray(a)


# ----------------------------------------------------------------------------- depthwise


def _depthwise_vjp(geo, activation, backend, x, w, b, y, g):
    """Cotangents of ``(x, w, b)`` for the depthwise op with output ``y`` (only read for relu and
    relu6; may be None otherwise) and output cotangent ``g``."""
    if activation in _MASKED:
        gz = _act_grad(g, activation, out=y)
    elif activation is not None:
        z = _invoke("depthwise_conv2d", {"x": x, "weight": w, "bias": b},
                    dict(geo, activation=None), backend)
        gz = _act_grad(g, activation, pre=z)
    else:
        gz = g
    gx, gw, gb = _invoke("depthwise_conv2d_backward", {"x": x, "grad_output": gz, "weight": w},
                         dict(geo, need_input=True, need_weight=True, need_bias=True), backend)
    return gx, gw, None if b is None else gb


@functools.lru_cache(maxsize=None)
def _depthwise_fn(stride, padding, dilation, layout, activation, backend):
    """The differentiable depthwise op for one static configuration (memoized)."""
    geo = {"stride": stride, "padding": padding, "dilation": dilation, "layout": layout}

    def forward(x, w, b):
        return _invoke("depthwise_conv2d", {"x": x, "weight": w, "bias": b},
                       dict(geo, activation=activation), backend)

    @jax.custom_vjp
    def f(x, w, b):
        return forward(x, w, b)

    def f_fwd(x, w, b):
        y = forward(x, w, b)
        return y, (x, w, b, y if activation in _MASKED else None)

    def f_bwd(res, g):
        return _depthwise_vjp(geo, activation, backend, *res, g)

    f.defvjp(f_fwd, f_bwd)
    return f


def _static_geometry(p):
    """Hashable normalized geometry of a depthwise problem ("same" already resolved)."""
    return (p.sh, p.sw), ((p.pt, p.pb), (p.pl, p.pr)), (p.dh, p.dw)


def depthwise_conv2d(x, weight, bias=None, *, stride=1, padding=0, dilation=1, layout="NCHW",
                     activation=None, backend="auto"):
    """Differentiable :func:`dwops.depthwise_conv2d` for JAX (works under ``jax.jit``).

    Shapes: ``x`` ``(N, C, H, W)`` / ``(N, H, W, C)``, ``weight`` ``(C*M, 1, KH, KW)``, ``bias``
    ``(C*M,)``; returns ``(N, C*M, OH, OW)`` / ``(N, OH, OW, C*M)``.
    """
    fn = "depthwise_conv2d"
    _check_backend(fn, backend)
    x, weight, bias = _as_array(x), _as_array(weight), _as_array(bias)
    p, _ = _spec.depthwise(fn, _meta(x), _meta(weight), _meta(bias), stride, padding, dilation,
                           layout, activation)
    return _depthwise_fn(*_static_geometry(p), layout, activation, backend)(x, weight, bias)


# ----------------------------------------------------------------------------- depthwise 1-d


def _conv1d_vjp(geo, activation, backend, x, w, b, state, seq, y, g):
    """Cotangents of ``(x, w, b, state)`` of the 1-d op (``y`` read for relu and relu6 only)."""
    arrays = {"x": x, "weight": w, "bias": b, "initial_state": state, "seq_idx": seq}
    if activation in _MASKED:
        gz = _act_grad(g, activation, out=y)
    elif activation is not None:
        z, = _invoke("depthwise_conv1d", arrays, dict(geo, activation=None), backend)
        gz = _act_grad(g, activation, pre=z)
    else:
        gz = g
    need = dict(need_input=True, need_weight=True, need_bias=True,
                need_initial_state=state is not None)
    grads = _invoke("depthwise_conv1d_backward",
                    {"x": x, "grad_output": gz, "weight": w, "initial_state": state,
                     "seq_idx": seq}, dict(geo, **need), backend)
    gx, gw, gb = grads[:3]
    gs = grads[3] if state is not None else None
    return gx, gw, None if b is None else gb, gs


@functools.lru_cache(maxsize=None)
def _conv1d_fn(stride, padding, dilation, layout, activation, backend):
    """The differentiable 1-d op for one static configuration (memoized); ``seq`` is not
    differentiable (its cotangent is None)."""
    geo = {"stride": stride, "padding": padding, "dilation": dilation, "layout": layout}

    def forward(x, w, b, state, seq):
        y, = _invoke("depthwise_conv1d", {"x": x, "weight": w, "bias": b, "initial_state": state,
                                          "seq_idx": seq}, dict(geo, activation=activation),
                     backend)
        return y

    @jax.custom_vjp
    def f(x, w, b, state, seq):
        return forward(x, w, b, state, seq)

    def f_fwd(x, w, b, state, seq):
        y = forward(x, w, b, state, seq)
        return y, (x, w, b, state, seq, y if activation in _MASKED else None)

    def f_bwd(res, g):
        x, w, b, state, seq, y = res
        gx, gw, gb, gs = _conv1d_vjp(geo, activation, backend, x, w, b, state, seq, y, g)
        gseq = None if seq is None else np.zeros(seq.shape, jax.dtypes.float0)
        return gx, gw, gb, gs, gseq

    f.defvjp(f_fwd, f_bwd)
    return f


def depthwise_conv1d(x, weight, bias=None, *, stride=1, padding=0, dilation=1, layout="NCL",
                     activation=None, initial_state=None, return_final_state=False, seq_idx=None,
                     backend="auto"):
    """Differentiable :func:`dwops.depthwise_conv1d` for JAX (works under ``jax.jit``).

    Shapes: ``x`` ``(N, C, L)`` / ``(N, L, C)``, ``weight`` ``(C*M, 1, K)``, ``bias`` ``(C*M,)``,
    ``initial_state`` ``(N, C, dilation*(K-1))``, ``seq_idx`` ``(N, L)`` integer (non-decreasing;
    under ``jax.jit`` its values are checked when the kernel runs); returns ``y`` ``(N, C*M, OL)``
    / ``(N, OL, C*M)``, or ``(y, final_state)`` with ``return_final_state``. Gradients flow to
    ``x``, ``weight``, ``bias`` and ``initial_state`` (also through the final state, a slice of the
    inputs).
    """
    fn = "depthwise_conv1d"
    _check_backend(fn, backend)
    x, weight, bias = _as_array(x), _as_array(weight), _as_array(bias)
    state, seq = _as_array(initial_state), _as_array(seq_idx)
    p, _ = _spec.depthwise_1d(fn, _meta(x), _meta(weight), _meta(bias), stride, padding, dilation,
                              layout, activation, _meta(state), return_final_state, _meta(seq))
    geometry = (p.s, (p.pl, p.pr) if not p.causal else "causal", p.d)
    y = _conv1d_fn(*geometry, layout, activation, backend)(x, weight, bias, state, seq)
    if not return_final_state:
        return y
    xc = x if layout == "NCL" else jnp.swapaxes(x, 1, 2)
    left = state if state is not None else jnp.zeros((p.N, p.C, p.W), x.dtype)
    return y, jnp.concatenate([left, xc], axis=2)[:, :, -p.W:]


# ----------------------------------------------------------------------------- pointwise


@functools.lru_cache(maxsize=None)
def _pointwise_fn(layout, activation, backend):
    """The differentiable pointwise op for one static configuration (memoized)."""

    def forward(x, w, b, r, act):
        return _invoke("pointwise_conv2d", {"x": x, "weight": w, "bias": b, "residual": r},
                       {"layout": layout, "activation": act}, backend)

    @jax.custom_vjp
    def f(x, w, b, r):
        return forward(x, w, b, r, activation)

    def f_fwd(x, w, b, r):
        y = forward(x, w, b, r, activation)
        keep = activation in _MASKED and r is None
        return y, (x, w, b, r is not None, y if keep else None)

    def f_bwd(res, g):
        x, w, b, has_r, y = res
        if activation in _MASKED and not has_r:
            gz = _act_grad(g, activation, out=y)
        elif activation is not None:
            gz = _act_grad(g, activation, pre=forward(x, w, b, None, None))
        else:
            gz = g
        gx = _invoke("pointwise_conv2d_grad_input", {"grad_output": gz, "weight": w},
                     {"layout": layout}, backend)
        gw = _invoke("pointwise_conv2d_grad_weight", {"x": x, "grad_output": gz},
                     {"layout": layout}, backend).reshape(w.shape)
        gb = None if b is None else gz.sum(axis=_reduce_axes(layout)).astype(b.dtype)
        return gx, gw, gb, (g if has_r else None)

    f.defvjp(f_fwd, f_bwd)
    return f


def pointwise_conv2d(x, weight, bias=None, *, layout="NCHW", activation=None, residual=None,
                     backend="auto"):
    """Differentiable :func:`dwops.pointwise_conv2d` for JAX: ``activation(W x + bias) + residual``.

    Shapes: ``x`` ``(N, C_in, H, W)`` / ``(N, H, W, C_in)``, ``weight`` ``(C_out, C_in)`` or
    ``(C_out, C_in, 1, 1)``, ``bias`` ``(C_out,)``, ``residual`` and the result
    ``(N, C_out, H, W)`` / ``(N, H, W, C_out)``.
    """
    fn = "pointwise_conv2d"
    _check_backend(fn, backend)
    x, weight, bias, residual = map(_as_array, (x, weight, bias, residual))
    _spec.pointwise(fn, _meta(x), _meta(weight), _meta(bias), layout, activation, _meta(residual))
    return _pointwise_fn(layout, activation, backend)(x, weight, bias, residual)


# ----------------------------------------------------------------------------- separable


@functools.lru_cache(maxsize=None)
def _separable_fn(stride, padding, dilation, layout, dw_activation, activation, backend):
    """The differentiable separable op for one static configuration (memoized)."""
    geo = {"stride": stride, "padding": padding, "dilation": dilation, "layout": layout}

    def forward(x, dw_w, pw_w, b, dw_b, r):
        return _invoke("separable_conv2d",
                       {"x": x, "dw_weight": dw_w, "pw_weight": pw_w, "bias": b, "dw_bias": dw_b,
                        "residual": r},
                       dict(geo, dw_activation=dw_activation, activation=activation), backend)

    @jax.custom_vjp
    def f(x, dw_w, pw_w, b, dw_b, r):
        return forward(x, dw_w, pw_w, b, dw_b, r)

    def f_fwd(x, dw_w, pw_w, b, dw_b, r):
        y = forward(x, dw_w, pw_w, b, dw_b, r)
        keep = activation in _MASKED and r is None
        return y, (x, dw_w, pw_w, b, dw_b, r is not None, y if keep else None)

    def f_bwd(res, g):
        x, dw_w, pw_w, b, dw_b, has_r, y = res
        mid = _invoke("depthwise_conv2d", {"x": x, "weight": dw_w, "bias": dw_b},
                      dict(geo, activation=dw_activation), backend)
        if activation in _MASKED and not has_r:
            gz2 = _act_grad(g, activation, out=y)
        elif activation is not None:
            z2 = _invoke("pointwise_conv2d", {"x": mid, "weight": pw_w, "bias": b},
                         {"layout": layout, "activation": None}, backend)
            gz2 = _act_grad(g, activation, pre=z2)
        else:
            gz2 = g
        gb = None if b is None else gz2.sum(axis=_reduce_axes(layout)).astype(b.dtype)
        gpw = _invoke("pointwise_conv2d_grad_weight", {"x": mid, "grad_output": gz2},
                      {"layout": layout}, backend).reshape(pw_w.shape)
        gmid = _invoke("pointwise_conv2d_grad_input", {"grad_output": gz2, "weight": pw_w},
                       {"layout": layout}, backend)
        gx, gdw, gdb = _depthwise_vjp(geo, dw_activation, backend, x, dw_w, dw_b,
                                      mid if dw_activation in _MASKED else None, gmid)
        return gx, gdw, gpw, gb, gdb, (g if has_r else None)

    f.defvjp(f_fwd, f_bwd)
    return f


def separable_conv2d(x, dw_weight, pw_weight, bias=None, *, dw_bias=None, stride=1, padding=0,
                     dilation=1, layout="NCHW", dw_activation=None, activation=None,
                     residual=None, backend="auto"):
    """Differentiable :func:`dwops.separable_conv2d` for JAX:
    ``activation(pw(dw_activation(dw(x) + dw_bias)) + bias) + residual``.

    Shapes: ``x`` ``(N, C, H, W)`` / ``(N, H, W, C)``, ``dw_weight`` ``(C*M, 1, KH, KW)``,
    ``pw_weight`` ``(C_out, C*M)`` or ``(C_out, C*M, 1, 1)``, ``dw_bias`` ``(C*M,)``, ``bias``
    ``(C_out,)``, ``residual`` and the result ``(N, C_out, OH, OW)`` / ``(N, OH, OW, C_out)``.
    """
    fn = "separable_conv2d"
    _check_backend(fn, backend)
    x, dw_weight, pw_weight, bias, dw_bias, residual = map(
        _as_array, (x, dw_weight, pw_weight, bias, dw_bias, residual))
    p, _ = _spec.separable(fn, _meta(x), _meta(dw_weight), _meta(pw_weight), _meta(bias),
                           _meta(dw_bias), stride, padding, dilation, layout, dw_activation,
                           activation, _meta(residual))
    f = _separable_fn(*_static_geometry(p.dw), layout, dw_activation, activation, backend)
    return f(x, dw_weight, pw_weight, bias, dw_bias, residual)
