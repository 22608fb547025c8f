"""The public functions: validate, pick the backend, convert, allocate, launch, return.

Each function is three steps: ``_spec`` validates the arguments from metadata alone (so errors come
before any allocation), ``_registry`` resolves the backend, and :func:`_launch` moves the arrays to
the backend, allocates the output in the caller's library and calls the backend's op.
"""

from __future__ import annotations

from . import _registry, _spec


def _launch(backend, op, problem, infos, arrays, out_shape, ref, reshape=None):
    """Run ``backend.<op>`` on native arrays and return the output as the caller's array.

    ``arrays`` maps argument names (in the op's positional order) to caller objects or None;
    ``ref`` names the array whose library, device and dtype the result takes; ``reshape`` maps an
    argument name to the shape the backend wants (pointwise weights as (C_out, C_in)).
    """
    reshape = reshape or {}
    native = []
    for name, obj in arrays.items():
        if obj is None:
            native.append(None)
            continue
        a = backend.asarray(obj, infos[name])
        if name in reshape:
            a = a.reshape(reshape[name])
        native.append(a)
    out, finish = backend.allocate(out_shape, problem_dtype(problem), arrays[ref], infos[ref])
    stream = backend.stream_for(arrays[ref], infos[ref])
    getattr(backend, op)(problem, *native, out, stream=stream)
    return finish()


def problem_dtype(problem) -> str:
    return problem.dw.dtype if isinstance(problem, _spec.SeparableProblem) else problem.dtype


def depthwise_conv2d(x, weight, bias=None, *, stride=1, padding=0, dilation=1, layout="NCHW",
                     activation=None, backend="auto"):
    """Depthwise 2-d convolution (cross-correlation), one filter per output channel.

    Shapes (``M`` = channel multiplier, ``K`` = output channels = ``C * M``):

    * ``x``: ``(N, C, H, W)`` for ``layout="NCHW"``, ``(N, H, W, C)`` for ``"NHWC"``
    * ``weight``: ``(C*M, 1, KH, KW)`` whatever the layout; output channel ``o`` reads input
      channel ``o // M`` (PyTorch ``groups=C``)
    * ``bias``: ``(C*M,)`` or ``None``
    * returns ``(N, C*M, OH, OW)`` / ``(N, OH, OW, C*M)`` with
      ``OH = (H + pad_top + pad_bottom - dilation_h * (KH - 1) - 1) // stride_h + 1``

    ``stride`` and ``dilation`` are positive ints or ``(h, w)`` pairs; ``padding`` is an int,
    ``(ph, pw)``, ``((top, bottom), (left, right))``, ``"valid"`` or ``"same"`` (TensorFlow/JAX
    semantics for any stride). The result is ``activation(conv(x) + bias)`` with ``activation`` one
    of ``None``, ``"relu"``, ``"relu6"``, ``"silu"``, ``"gelu"``, returned in ``x``'s library, on
    ``x``'s device, in ``x``'s dtype (16-bit types accumulate in float32 and round once).
    ``backend`` is ``"auto"``, ``"numpy"``, ``"cpu"``, ``"numba"`` or ``"cupy"``.
    """
    fn = "depthwise_conv2d"
    p, infos = _spec.depthwise(fn, x, weight, bias, stride, padding, dilation, layout, activation)
    be = _registry.resolve(fn, backend, infos["x"].on_gpu, "depthwise_forward", p)
    return _launch(be, "depthwise_forward", p, infos,
                   {"x": x, "weight": weight, "bias": bias}, p.y_shape, "x")


def depthwise_conv2d_grad_input(grad_output, weight, input_shape, *, stride=1, padding=0,
                                dilation=1, layout="NCHW", backend="auto"):
    """Gradient of :func:`depthwise_conv2d` (without bias and activation) with respect to ``x``.

    Shapes: ``grad_output`` as the forward output (in ``layout``), ``weight`` ``(C*M, 1, KH, KW)``,
    ``input_shape`` the 4-d physical shape of ``x``; returns an array of ``input_shape``.
    """
    fn = "depthwise_conv2d_grad_input"
    p, infos = _spec.depthwise_grad_input(fn, grad_output, weight, input_shape, stride, padding,
                                          dilation, layout)
    be = _registry.resolve(fn, backend, infos["grad_output"].on_gpu, "depthwise_grad_input", p)
    return _launch(be, "depthwise_grad_input", p, infos,
                   {"grad_output": grad_output, "weight": weight}, p.x_shape, "grad_output")


def depthwise_conv2d_grad_weight(x, grad_output, weight_shape, *, stride=1, padding=0, dilation=1,
                                 layout="NCHW", backend="auto"):
    """Gradient of :func:`depthwise_conv2d` with respect to ``weight``.

    Shapes: ``x`` as in the forward, ``grad_output`` as the forward output, ``weight_shape``
    ``(C*M, 1, KH, KW)``; returns an array of ``weight_shape`` (a reduction over N, OH, OW). The
    bias gradient is ``grad_output`` summed over N, H and W.
    """
    fn = "depthwise_conv2d_grad_weight"
    p, infos = _spec.depthwise_grad_weight(fn, x, grad_output, weight_shape, stride, padding,
                                           dilation, layout)
    be = _registry.resolve(fn, backend, infos["x"].on_gpu, "depthwise_grad_weight", p)
    return _launch(be, "depthwise_grad_weight", p, infos,
                   {"x": x, "grad_output": grad_output}, p.w_shape, "grad_output")


def pointwise_conv2d(x, weight, bias=None, *, layout="NCHW", activation=None, residual=None,
                     backend="auto"):
    """Pointwise (1x1) convolution with a fused epilogue: ``activation(W x + bias) + residual``.

    Shapes: ``x`` ``(N, C_in, H, W)`` / ``(N, H, W, C_in)``; ``weight`` ``(C_out, C_in)`` or
    ``(C_out, C_in, 1, 1)``; ``bias`` ``(C_out,)``; ``residual`` shaped like the output
    ``(N, C_out, H, W)`` / ``(N, H, W, C_out)``.
    """
    fn = "pointwise_conv2d"
    p, infos = _spec.pointwise(fn, x, weight, bias, layout, activation, residual)
    be = _registry.resolve(fn, backend, infos["x"].on_gpu, "pointwise_forward", p)
    return _launch(be, "pointwise_forward", p, infos,
                   {"x": x, "weight": weight, "bias": bias, "residual": residual}, p.y_shape, "x",
                   reshape={"weight": (p.CO, p.CI)})


def pointwise_conv2d_grad_input(grad_output, weight, *, layout="NCHW", backend="auto"):
    """Gradient of :func:`pointwise_conv2d` (linear part) with respect to ``x``.

    Shapes: ``grad_output`` ``(N, C_out, H, W)`` / ``(N, H, W, C_out)``; ``weight`` ``(C_out, C_in)``
    or ``(C_out, C_in, 1, 1)``; returns ``(N, C_in, H, W)`` / ``(N, H, W, C_in)``.
    """
    fn = "pointwise_conv2d_grad_input"
    p, infos = _spec.pointwise_grad_input(fn, grad_output, weight, layout)
    be = _registry.resolve(fn, backend, infos["grad_output"].on_gpu, "pointwise_grad_input", p)
    return _launch(be, "pointwise_grad_input", p, infos,
                   {"grad_output": grad_output, "weight": weight}, p.x_shape, "grad_output",
                   reshape={"weight": (p.CO, p.CI)})


def pointwise_conv2d_grad_weight(x, grad_output, *, layout="NCHW", backend="auto"):
    """Gradient of :func:`pointwise_conv2d` with respect to ``weight``.

    Shapes: ``x`` ``(N, C_in, H, W)``, ``grad_output`` ``(N, C_out, H, W)`` (or NHWC); returns
    ``(C_out, C_in)`` (reshape to ``(C_out, C_in, 1, 1)`` for a 4-d weight).
    """
    fn = "pointwise_conv2d_grad_weight"
    p, infos = _spec.pointwise_grad_weight(fn, x, grad_output, layout)
    be = _registry.resolve(fn, backend, infos["x"].on_gpu, "pointwise_grad_weight", p)
    return _launch(be, "pointwise_grad_weight", p, infos,
                   {"x": x, "grad_output": grad_output}, (p.CO, p.CI), "grad_output")


def separable_conv2d(x, dw_weight, pw_weight, bias=None, *, dw_bias=None, stride=1, padding=0,
                     dilation=1, layout="NCHW", dw_activation=None, activation=None,
                     residual=None, backend="auto"):
    """Depthwise-separable convolution, fused where the backend can:

    ``y = activation(pw(dw_activation(dw(x) + dw_bias)) + bias) + residual``

    Shapes: ``x`` ``(N, C, H, W)`` / ``(N, H, W, C)``; ``dw_weight`` ``(C*M, 1, KH, KW)``;
    ``pw_weight`` ``(C_out, C*M)`` or ``(C_out, C*M, 1, 1)``; ``dw_bias`` ``(C*M,)``; ``bias``
    ``(C_out,)``; ``residual`` and the result ``(N, C_out, OH, OW)`` / ``(N, OH, OW, C_out)``.
    The block ``x + pw(relu(dw(x))) + b`` is
    ``separable_conv2d(x, dw_w, pw_w, b, padding="same", dw_activation="relu", residual=x)``.
    """
    fn = "separable_conv2d"
    p, infos = _spec.separable(fn, x, dw_weight, pw_weight, bias, dw_bias, stride, padding,
                               dilation, layout, dw_activation, activation, residual)
    be = _registry.resolve(fn, backend, infos["x"].on_gpu, "separable_forward", p)
    return _launch(be, "separable_forward", p, infos,
                   {"x": x, "dw_weight": dw_weight, "pw_weight": pw_weight, "bias": bias,
                    "dw_bias": dw_bias, "residual": residual}, p.y_shape, "x",
                   reshape={"pw_weight": (p.pw.CO, p.pw.CI)})
