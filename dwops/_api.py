"""The public functions: validate, pick the backend, convert, allocate, launch, return.

Each function is three steps: ``_spec`` validates the arguments from metadata alone (so errors come
before any allocation), ``_registry`` resolves the backend, and :func:`_launch` moves the arrays to
the backend, allocates the output in the caller's library and calls the backend's op.
"""

from __future__ import annotations

from . import _interop, _registry, _spec


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
    with backend.lock:
        getattr(backend, op)(problem, *native, out, stream=stream)
    return finish()


def _natives(backend, infos, arrays, reshape=None):
    """Native (backend) arrays for the caller's arrays, None kept."""
    reshape = reshape or {}
    native = {}
    for name, obj in arrays.items():
        a = None if obj is None else backend.asarray(obj, infos[name])
        if a is not None and name in reshape:
            a = a.reshape(reshape[name])
        native[name] = a
    return native


def _launch_many(backend, op, problem, infos, arrays, out_shapes, ref, native=None):
    """Like :func:`_launch` for ops with several outputs.

    Each entry of ``out_shapes`` is a shape (allocate it), ``None`` (no such output) or a native
    array to write into. Returns the allocated outputs as the caller's arrays (None elsewhere).
    """
    native = _natives(backend, infos, arrays) if native is None else native
    outs, finishes = [], []
    for shape in out_shapes:
        if not isinstance(shape, tuple):
            outs.append(shape)
            finishes.append(None)
            continue
        out, finish = backend.allocate(shape, problem_dtype(problem), arrays[ref], infos[ref])
        outs.append(out)
        finishes.append(finish)
    stream = backend.stream_for(arrays[ref], infos[ref])
    with backend.lock:
        getattr(backend, op)(problem, *native.values(), *outs, stream=stream)
    return tuple(None if f is None else f() for f in finishes)


def _check_seq_idx(fn, backend, native_seq) -> None:
    """seq_idx must be non-decreasing along L (a data check, made before any output exists)."""
    if native_seq is not None and not backend.nondecreasing(native_seq):
        raise ValueError(f"{fn}: argument 'seq_idx' must be non-decreasing along L (one packed "
                         f"sequence after another)")


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
    of ``None``, ``"relu"``, ``"relu6"``, ``"silu"``, ``"gelu"``, ``"hardswish"``,
    ``"hardsigmoid"``, returned in ``x``'s library, on
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


def depthwise_conv2d_backward(x, grad_output, weight, *, stride=1, padding=0, dilation=1,
                              layout="NCHW", need_input=True, need_weight=True, need_bias=False,
                              backend="auto"):
    """Gradients of :func:`depthwise_conv2d` (the convolution, without activation) in one call.

    Takes the forward's ``x`` ``(N, C, H, W)`` / ``(N, H, W, C)``, ``weight`` ``(C*M, 1, KH, KW)``
    and geometry, and ``grad_output`` shaped like its output ``(N, C*M, OH, OW)`` /
    ``(N, OH, OW, C*M)``; returns ``(grad_input, grad_weight, grad_bias)`` shaped like ``x``,
    ``weight`` and ``(C*M,)`` (``grad_output`` summed over N, OH and OW), with ``None`` for each
    one not asked for by the ``need_*`` flags (at least one must be True). Equal to
    :func:`depthwise_conv2d_grad_input` and :func:`depthwise_conv2d_grad_weight` called apart;
    a backend may compute them in fewer passes over ``grad_output``.
    """
    fn = "depthwise_conv2d_backward"
    need = {"need_input": need_input, "need_weight": need_weight, "need_bias": need_bias}
    p, infos = _spec.depthwise_backward(fn, x, grad_output, weight, stride, padding, dilation,
                                        layout, need)
    be = _registry.resolve(fn, backend, infos["x"].on_gpu, "depthwise_backward", p)
    arrays = {"x": x, "grad_output": grad_output, "weight": weight}
    shapes = [p.x_shape if need_input else None, p.w_shape if need_weight else None,
              (p.CO,) if need_bias else None]
    return _launch_many(be, "depthwise_backward", p, infos, arrays, shapes, "grad_output")


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


def depthwise_conv1d(x, weight, bias=None, *, stride=1, padding=0, dilation=1, layout="NCL",
                     activation=None, initial_state=None, return_final_state=False, seq_idx=None,
                     backend="auto"):
    """Depthwise 1-d convolution (cross-correlation), e.g. the short causal convolution of a
    sequence model.

    Shapes (``M`` = channel multiplier, ``W = dilation * (K - 1)``):

    * ``x``: ``(N, C, L)`` for ``layout="NCL"``, ``(N, L, C)`` for ``"NLC"``
    * ``weight``: ``(C*M, 1, K)`` (PyTorch ``nn.Conv1d(C, C*M, K, groups=C)``); ``bias`` ``(C*M,)``
    * ``initial_state``: ``(N, C, W)`` (whatever the layout), the previous chunk's last ``W``
      inputs, oldest first; it replaces the zeros of ``padding="causal"``
    * ``seq_idx``: ``(N, L)`` int32/int64, non-decreasing: the packed sequence each position
      belongs to; an output never reads an input of another sequence (causal, stride 1 only;
      ``initial_state`` belongs to the sequence of position 0)
    * returns ``y`` ``(N, C*M, OL)`` / ``(N, OL, C*M)`` with
      ``OL = (L + pad_left + pad_right - W - 1) // stride + 1``, and with
      ``return_final_state=True`` the tuple ``(y, final_state)``, ``final_state`` ``(N, C, W)``
      the last ``W`` inputs (of ``initial_state`` followed by ``x``), ready for the next chunk.

    ``padding`` is an int, ``(left, right)``, ``"valid"``, ``"same"`` (TensorFlow/JAX semantics)
    or ``"causal"`` (``W`` zeros on the left, so ``y[l]`` depends on ``x[:l+1]`` only);
    ``initial_state`` and ``return_final_state`` need ``"causal"``. The result is
    ``activation(conv(x) + bias)``, in ``x``'s library, device and dtype.
    """
    fn = "depthwise_conv1d"
    p, infos = _spec.depthwise_1d(fn, x, weight, bias, stride, padding, dilation, layout,
                                  activation, initial_state, return_final_state, seq_idx)
    be = _registry.resolve(fn, backend, infos["x"].on_gpu, "depthwise_conv1d_forward", p)
    arrays = {"x": x, "weight": weight, "bias": bias, "initial_state": initial_state,
              "seq_idx": seq_idx}
    native = _natives(be, infos, arrays)
    _check_seq_idx(fn, be, native["seq_idx"])
    y, final = _launch_many(be, "depthwise_conv1d_forward", p, infos, arrays,
                            [p.y_shape, p.state_shape if p.final_state else None], "x", native)
    return (y, final) if return_final_state else y


def depthwise_conv1d_backward(x, grad_output, weight, *, stride=1, padding=0, dilation=1,
                              layout="NCL", initial_state=None, seq_idx=None, need_input=True,
                              need_weight=True, need_bias=False, need_initial_state=False,
                              backend="auto"):
    """Gradients of :func:`depthwise_conv1d` (the linear convolution, without activation) in one
    pass over ``x`` and ``grad_output``.

    Takes the forward's ``x``, ``weight``, geometry, ``initial_state`` and ``seq_idx`` and
    ``grad_output`` shaped like its output; returns ``(grad_input, grad_weight, grad_bias,
    grad_initial_state)`` shaped like ``x``, ``weight`` ``(C*M, 1, K)``, ``(C*M,)`` and
    ``initial_state`` ``(N, C, W)``, with ``None`` for each one not asked for by the ``need_*``
    flags. ``need_initial_state=True`` needs ``initial_state``.
    """
    fn = "depthwise_conv1d_backward"
    need = {"need_input": need_input, "need_weight": need_weight, "need_bias": need_bias,
            "need_initial_state": need_initial_state}
    p, infos = _spec.depthwise_1d_backward(fn, x, grad_output, weight, stride, padding, dilation,
                                           layout, initial_state, seq_idx, need)
    be = _registry.resolve(fn, backend, infos["x"].on_gpu, "depthwise_conv1d_backward", p)
    arrays = {"x": x, "grad_output": grad_output, "weight": weight,
              "initial_state": initial_state, "seq_idx": seq_idx}
    native = _natives(be, infos, arrays)
    _check_seq_idx(fn, be, native["seq_idx"])
    shapes = [p.x_shape if need_input else None, p.w_shape if need_weight else None,
              (p.CO,) if need_bias else None, p.state_shape if need_initial_state else None]
    if not any(shapes):
        return (None, None, None, None)
    return _launch_many(be, "depthwise_conv1d_backward", p, infos, arrays, shapes, "grad_output",
                        native)


def depthwise_conv1d_update(x_step, state, weight, bias=None, *, activation=None, backend="auto"):
    """One token (or ``T`` tokens) of a causal depthwise 1-d convolution, for streaming decode.

    Shapes: ``x_step`` ``(N, C)`` or ``(N, C, T)``; ``state`` ``(N, C, K-1)``, the last ``K-1``
    inputs, oldest first (the ``final_state`` of :func:`depthwise_conv1d` with dilation 1);
    ``weight`` ``(C*M, 1, K)``; ``bias`` ``(C*M,)``. Returns ``(y, new_state)``: ``y``
    ``(N, C*M)`` or ``(N, C*M, T)``, equal to the matching outputs of
    ``depthwise_conv1d(concat(state, x), weight, bias, padding="valid")``.

    ``state`` is updated in place when its library's arrays are mutable (NumPy, CuPy, PyTorch,
    Numba), and ``new_state`` is then ``state`` itself; for immutable arrays (JAX, TensorFlow)
    ``new_state`` is a new array and ``state`` is left as it was.
    """
    fn = "depthwise_conv1d_update"
    p, infos = _spec.depthwise_1d_update(fn, x_step, state, weight, bias, activation)
    be = _registry.resolve(fn, backend, infos["x_step"].on_gpu, "depthwise_conv1d_update", p)
    arrays = {"x_step": x_step, "state": state, "weight": weight, "bias": bias}
    native = _natives(be, infos, arrays)
    info = infos["state"]
    mutable = info.lib in _interop.MUTABLE_LIBS
    if mutable and be.aliases(native["state"], state, info):  # update the caller's memory
        y, _ = _launch_many(be, "depthwise_conv1d_update", p, infos, arrays,
                            [p.y_shape, native["state"]], "x_step", native)
        return y, state
    y, new_state = _launch_many(be, "depthwise_conv1d_update", p, infos, arrays,
                                [p.y_shape, p.state_shape], "x_step", native)
    if mutable:
        _interop.write_back(state, info, new_state)
        return y, state
    return y, new_state
