"""PyTorch layer: differentiable depthwise, pointwise and separable convolutions, and modules.

Import it explicitly (``import dwops.torch``); it imports PyTorch, never JAX.

Three thin layers per op (as in causal-conv1d):

1. **binding**: ``torch.library`` custom ops ``dwops::<op>`` whose implementation calls the dwops
   public function (any device: host tensors run on the host backends, CUDA tensors on the GPU
   backends on PyTorch's current stream, the result allocated by PyTorch), each with a fake
   implementation that gives the output shape, so ``torch.compile(fullgraph=True)`` traces them
   as opaque nodes. Custom ops take tensors and simple arguments: stride and dilation as
   ``[h, w]``, padding as ``[top, bottom, left, right]`` plus a ``same`` flag (``"same"`` depends
   on the input size, so it is resolved at run time), layout and activation as strings;
2. **autograd**: ``register_autograd`` with the backward derived below, built from the gradient
   custom ops so that it is traceable too;
3. **public functions** with the top-level signatures (:func:`depthwise_conv2d`,
   :func:`pointwise_conv2d`, :func:`separable_conv2d`) and the modules
   :class:`DepthwiseConv2d`, :class:`PointwiseConv2d`, :class:`SeparableConv2d`.

Backward. With ``z = conv(x) + b`` the pre-activation, ``y = act(z) + r`` and ``g = dL/dy``::

    gz = g * act'(z)
        relu   act'(z) = [z > 0]                     read from the saved output: y > 0 <=> z > 0
        relu6  act'(z) = [0 < z < 6]                 likewise from the output
        silu   act'(z) = s (1 + z (1 - s)),  s = sigmoid(z)        z recomputed (one forward)
        gelu   act'(z) = Phi(z) + z phi(z)   (erf form)            z recomputed (one forward)
        hardswish    act'(z) = 0 (z <= -3), z/3 + 1/2 (-3 < z < 3), 1 (z >= 3)  z recomputed
        hardsigmoid  act'(z) = 1/6 on (-3, 3), 0 elsewhere (both ends too)      z recomputed
        (PyTorch autograd's values at the kinks; dwops.reference.activation_derivative is the
        same table in NumPy, and the tests hold the two to it)
        with a residual the output is act(z) + r, so z is recomputed for every activation
    gx = conv_grad_input(gz, w)     gw = conv_grad_weight(x, gz)
    gb = sum over N, H, W of gz     gr = g
    (depthwise: gx, gw and gb from one dwops.depthwise_conv2d_backward call, asking only for
    the gradients of the inputs that require one)

Separable, ``y = act(pw(mid) + b) + r`` with ``mid = dw_act(dw(x) + dw_b)``: the fused forward never
stores ``mid``, so the backward recomputes it with one depthwise forward, then::

    gz2 = g * act'(z2);  gb = sum gz2;  gpw = pw_grad_weight(mid, gz2);  gmid = pw_grad_input(gz2, pw)
    gz1 = gmid * dw_act'(z1);  (gx, gdw, gdw_b) = dw_backward(x, gz1, dw)   (one call)

Recomputing instead of saving the pre-activations keeps the forward fused and its memory at one
output; 16-bit activation derivatives are evaluated in float32. The gradient ops are themselves
differentiable (each is linear in each argument, its gradients are the other ops), so double
backward (``torch.autograd.gradgradcheck``) works too.

Modules follow ``nn.Conv2d``: same initialization (Kaiming-uniform weights with ``a=sqrt(5)``, bias
uniform in ``+-1/sqrt(fan_in)``), parameters ``weight`` ``(C*M, 1, KH, KW)`` and ``bias`` for the
depthwise module and ``weight`` ``(C_out, C_in, 1, 1)`` for the pointwise one, so state dicts of
``nn.Conv2d(C, C*M, k, groups=C)`` and of a 1x1 ``nn.Conv2d`` load unchanged.
"""

import math
from typing import List, Optional

import torch
from torch import Tensor, nn

from . import _api, _spec

__all__ = [
    "ConvertReport", "convert", "DepthwiseConv1d", "DepthwiseConv2d", "PointwiseConv2d", "SeparableConv2d",
    "depthwise_conv1d", "depthwise_conv2d", "pointwise_conv2d", "separable_conv2d",
]

_MASKED = ("relu", "relu6")  # activations whose derivative is read from their output


# ----------------------------------------------------------------------------- helpers


def _padding_arg(pads: List[int], same: bool):
    """The public-API padding for a custom op's encoded padding."""
    return "same" if same else ((pads[0], pads[1]), (pads[2], pads[3]))


def _geometry(fn: str, stride, padding, dilation):
    """Validate and encode stride, padding and dilation as the custom ops take them."""
    sh, sw = _spec._pair(fn, "stride", stride)
    dh, dw = _spec._pair(fn, "dilation", dilation)
    if isinstance(padding, str) and padding.lower() == "same":
        return [sh, sw], [0, 0, 0, 0], True, [dh, dw]
    pads = _spec._padding(fn, padding, None, None, None, None)  # not "same": no sizes needed
    return [sh, sw], list(pads), False, [dh, dw]


def _nchw_dims(layout: str):
    """Positions of (N, C, H, W) in a physical 4-d shape."""
    return (0, 1, 2, 3) if layout == "NCHW" else (0, 3, 1, 2)


def _reduce_dims(layout: str):
    """The N, H, W axes a bias gradient sums over."""
    return [0, 2, 3] if layout == "NCHW" else [0, 1, 2]


def _physical(layout: str, n, c, h, w) -> list:
    return [n, c, h, w] if layout == "NCHW" else [n, h, w, c]


def _depthwise_out_shape(x_shape, w_shape, stride, padding, same, dilation, layout) -> list:
    """Output shape of a depthwise op (works on symbolic sizes too)."""
    i_n, i_c, i_h, i_w = _nchw_dims(layout)
    n, h, w = x_shape[i_n], x_shape[i_h], x_shape[i_w]
    co, kh, kw = w_shape[0], w_shape[2], w_shape[3]
    if same:
        oh = (h + stride[0] - 1) // stride[0]
        ow = (w + stride[1] - 1) // stride[1]
    else:
        oh = (h + padding[0] + padding[1] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        ow = (w + padding[2] + padding[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return _physical(layout, n, co, oh, ow)


def _act_grad(g: Tensor, activation: Optional[str], out: Optional[Tensor] = None,
              pre: Optional[Tensor] = None) -> Tensor:
    """``g * act'(z)``: from the activation's output ``out`` (relu, relu6) or from ``z`` (``pre``)."""
    if activation is None:
        return g
    if activation in _MASKED:
        v = out if out is not None else pre
        keep = (v > 0) if activation == "relu" else (v > 0) & (v < 6)
        return torch.where(keep, g, torch.zeros((), dtype=g.dtype, device=g.device))
    z = pre
    wide = z.dtype in (torch.float16, torch.bfloat16)
    zf = z.float() if wide else z
    if activation == "silu":
        s = torch.sigmoid(zf)
        d = s * (1 + zf * (1 - s))
    elif activation == "hardswish":  # z/3 + 1/2 on (-3, 3); 0 at -3, 1 at 3 (as PyTorch)
        d = torch.where(zf <= -3, 0.0, torch.where(zf >= 3, 1.0, zf / 3 + 0.5))
    elif activation == "hardsigmoid":  # 1/6 on (-3, 3), 0 at both ends (as PyTorch)
        d = ((zf > -3) & (zf < 3)).to(zf.dtype) / 6
    else:  # gelu, erf form
        d = 0.5 * (1 + torch.erf(zf * (1 / math.sqrt(2)))) + zf * torch.exp(-0.5 * zf * zf) * (
            1 / math.sqrt(2 * math.pi))
    return (g.to(d.dtype) * d).to(g.dtype) if wide else g * d


# ----------------------------------------------------------------------------- custom ops: depthwise


@torch.library.custom_op("dwops::depthwise_conv2d", mutates_args=())
def _depthwise_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: List[int],
                  padding: List[int], same: bool, dilation: List[int], layout: str,
                  activation: Optional[str], backend: str) -> Tensor:
    return _api.depthwise_conv2d(x, weight, bias, stride=tuple(stride),
                                 padding=_padding_arg(padding, same), dilation=tuple(dilation),
                                 layout=layout, activation=activation, backend=backend)


@_depthwise_op.register_fake
def _(x, weight, bias, stride, padding, same, dilation, layout, activation, backend):
    return x.new_empty(_depthwise_out_shape(x.shape, weight.shape, stride, padding, same,
                                            dilation, layout))


@torch.library.custom_op("dwops::depthwise_conv2d_grad_input", mutates_args=())
def _depthwise_grad_input_op(grad_output: Tensor, weight: Tensor, input_shape: List[int],
                             stride: List[int], padding: List[int], same: bool,
                             dilation: List[int], layout: str, backend: str) -> Tensor:
    return _api.depthwise_conv2d_grad_input(
        grad_output, weight, tuple(input_shape), stride=tuple(stride),
        padding=_padding_arg(padding, same), dilation=tuple(dilation), layout=layout,
        backend=backend)


@_depthwise_grad_input_op.register_fake
def _(grad_output, weight, input_shape, stride, padding, same, dilation, layout, backend):
    return grad_output.new_empty(list(input_shape))


@torch.library.custom_op("dwops::depthwise_conv2d_grad_weight", mutates_args=())
def _depthwise_grad_weight_op(x: Tensor, grad_output: Tensor, weight_shape: List[int],
                              stride: List[int], padding: List[int], same: bool,
                              dilation: List[int], layout: str, backend: str) -> Tensor:
    return _api.depthwise_conv2d_grad_weight(
        x, grad_output, tuple(weight_shape), stride=tuple(stride),
        padding=_padding_arg(padding, same), dilation=tuple(dilation), layout=layout,
        backend=backend)


@_depthwise_grad_weight_op.register_fake
def _(x, grad_output, weight_shape, stride, padding, same, dilation, layout, backend):
    return x.new_empty(list(weight_shape))


# The gradient ops are linear in each argument, so their own gradients (double backward) are the
# other ops: for gx = W^T gy, d<c, gx>/dgy = W c (the forward) and d<c, gx>/dW = grad_weight(c, gy);
# for gw = grad_weight(x, gy), d<c, gw>/dx = grad_input(gy, c) and d<c, gw>/dgy = conv(x, c).


def _depthwise_grad_input_setup(ctx, inputs, output):
    grad_output, weight, input_shape, *geometry = inputs
    ctx.geometry = geometry
    ctx.save_for_backward(grad_output, weight)


def _depthwise_grad_input_backward(ctx, c):
    grad_output, weight = ctx.saved_tensors
    stride, padding, same, dilation, layout, backend = ctx.geometry
    g_gy = g_w = None
    if ctx.needs_input_grad[0]:
        g_gy = _depthwise_op(c, weight, None, stride, padding, same, dilation, layout, None,
                             backend)
    if ctx.needs_input_grad[1]:
        g_w = _depthwise_grad_weight_op(c, grad_output, list(weight.shape), stride, padding, same,
                                        dilation, layout, backend)
    return (g_gy, g_w) + (None,) * 7


def _depthwise_grad_weight_setup(ctx, inputs, output):
    x, grad_output, weight_shape, *geometry = inputs
    ctx.geometry = geometry
    ctx.save_for_backward(x, grad_output)


def _depthwise_grad_weight_backward(ctx, c):
    x, grad_output = ctx.saved_tensors
    stride, padding, same, dilation, layout, backend = ctx.geometry
    g_x = g_gy = None
    if ctx.needs_input_grad[0]:
        g_x = _depthwise_grad_input_op(grad_output, c, list(x.shape), stride, padding, same,
                                       dilation, layout, backend)
    if ctx.needs_input_grad[1]:
        g_gy = _depthwise_op(x, c, None, stride, padding, same, dilation, layout, None, backend)
    return (g_x, g_gy) + (None,) * 7


_depthwise_grad_input_op.register_autograd(_depthwise_grad_input_backward,
                                           setup_context=_depthwise_grad_input_setup)
_depthwise_grad_weight_op.register_autograd(_depthwise_grad_weight_backward,
                                            setup_context=_depthwise_grad_weight_setup)


@torch.library.custom_op("dwops::depthwise_conv2d_backward", mutates_args=())
def _depthwise_backward_op(x: Tensor, grad_output: Tensor, weight: Tensor, stride: List[int],
                           padding: List[int], same: bool, dilation: List[int], layout: str,
                           need: List[bool], backend: str) -> List[Tensor]:
    grads = _api.depthwise_conv2d_backward(
        x, grad_output, weight, stride=tuple(stride), padding=_padding_arg(padding, same),
        dilation=tuple(dilation), layout=layout, need_input=need[0], need_weight=need[1],
        need_bias=need[2], backend=backend)
    return [g if g is not None else x.new_empty(0) for g in grads]  # empty: not asked for


@_depthwise_backward_op.register_fake
def _(x, grad_output, weight, stride, padding, same, dilation, layout, need, backend):
    shapes = (x.shape, weight.shape, weight.shape[:1])
    return [x.new_empty(shape if asked else (0,)) for asked, shape in zip(need, shapes)]


# The one-call backward (gx, gw, gb) = (grad_input(gy, w), grad_weight(x, gy), sum gy) is linear
# in gy and in each of x and w; for cotangents (cx, cw, cb): d/dx = grad_input(gy, cw),
# d/dgy = conv(cx, w) + conv(x, cw) + cb (broadcast), d/dw = grad_weight(cx, gy).


def _depthwise_backward_op_setup(ctx, inputs, output):
    x, grad_output, weight, stride, padding, same, dilation, layout, need, backend = inputs
    ctx.geometry = (stride, padding, same, dilation, layout, backend)
    ctx.need = need
    ctx.save_for_backward(x, grad_output, weight)


def _depthwise_backward_op_backward(ctx, cots):
    x, grad_output, weight = ctx.saved_tensors
    stride, padding, same, dilation, layout, backend = ctx.geometry
    geo = (stride, padding, same, dilation, layout)
    cx, cw, cb = (c if asked and c is not None else None for c, asked in zip(cots, ctx.need))
    needs = ctx.needs_input_grad
    g_x = g_gy = g_w = None
    if needs[0] and cw is not None:
        g_x = _depthwise_grad_input_op(grad_output, cw, list(x.shape), *geo, backend)
    if needs[1]:
        terms = []
        if cx is not None:
            terms.append(_depthwise_op(cx, weight, None, *geo, None, backend))
        if cw is not None:
            terms.append(_depthwise_op(x, cw, None, *geo, None, backend))
        if cb is not None:
            terms.append(cb.reshape(_physical(layout, 1, -1, 1, 1)).expand(grad_output.shape))
        g_gy = sum(terms[1:], terms[0]) if terms else None
    if needs[2] and cx is not None:
        g_w = _depthwise_grad_weight_op(cx, grad_output, list(weight.shape), *geo, backend)
    return (g_x, g_gy, g_w) + (None,) * 7


_depthwise_backward_op.register_autograd(_depthwise_backward_op_backward,
                                         setup_context=_depthwise_backward_op_setup)


def _depthwise_setup(ctx, inputs, output):
    x, weight, bias, stride, padding, same, dilation, layout, activation, backend = inputs
    ctx.geometry = (stride, padding, same, dilation, layout, backend)
    ctx.activation = activation
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, bias, output if activation in _MASKED else None)


def _depthwise_backward(ctx, g):
    x, weight, bias, y = ctx.saved_tensors
    stride, padding, same, dilation, layout, backend = ctx.geometry
    act = ctx.activation
    if act in _MASKED:
        gz = _act_grad(g, act, out=y)
    elif act is not None:
        z = _depthwise_op(x, weight, bias, stride, padding, same, dilation, layout, None, backend)
        gz = _act_grad(g, act, pre=z)
    else:
        gz = g
    needs = ctx.needs_input_grad
    gx, gw, gb = _depthwise_grads(x, gz, weight, (stride, padding, same, dilation, layout),
                                  backend, [needs[0], needs[1], ctx.has_bias and needs[2]])
    return gx, gw, gb, None, None, None, None, None, None, None


def _depthwise_grads(x, gz, weight, geo, backend, need):
    """(gx, gw, gb) of a depthwise stage from one backward call, None where ``need`` is False."""
    if not any(need):
        return None, None, None
    out = _depthwise_backward_op(x, gz, weight, *geo, need, backend)
    return tuple(o if asked else None for o, asked in zip(out, need))


_depthwise_op.register_autograd(_depthwise_backward, setup_context=_depthwise_setup)


# ----------------------------------------------------------------------------- custom ops: pointwise


@torch.library.custom_op("dwops::pointwise_conv2d", mutates_args=())
def _pointwise_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                  layout: str, activation: Optional[str], backend: str) -> Tensor:
    return _api.pointwise_conv2d(x, weight, bias, layout=layout, activation=activation,
                                 residual=residual, backend=backend)


@_pointwise_op.register_fake
def _(x, weight, bias, residual, layout, activation, backend):
    i_n, i_c, i_h, i_w = _nchw_dims(layout)
    return x.new_empty(_physical(layout, x.shape[i_n], weight.shape[0], x.shape[i_h],
                                 x.shape[i_w]))


@torch.library.custom_op("dwops::pointwise_conv2d_grad_input", mutates_args=())
def _pointwise_grad_input_op(grad_output: Tensor, weight: Tensor, layout: str,
                             backend: str) -> Tensor:
    return _api.pointwise_conv2d_grad_input(grad_output, weight, layout=layout, backend=backend)


@_pointwise_grad_input_op.register_fake
def _(grad_output, weight, layout, backend):
    i_n, i_c, i_h, i_w = _nchw_dims(layout)
    s = grad_output.shape
    return grad_output.new_empty(_physical(layout, s[i_n], weight.shape[1], s[i_h], s[i_w]))


@torch.library.custom_op("dwops::pointwise_conv2d_grad_weight", mutates_args=())
def _pointwise_grad_weight_op(x: Tensor, grad_output: Tensor, layout: str, backend: str) -> Tensor:
    return _api.pointwise_conv2d_grad_weight(x, grad_output, layout=layout, backend=backend)


@_pointwise_grad_weight_op.register_fake
def _(x, grad_output, layout, backend):
    c = _nchw_dims(layout)[1]
    return x.new_empty([grad_output.shape[c], x.shape[c]])


def _pointwise_grad_input_setup(ctx, inputs, output):
    grad_output, weight, layout, backend = inputs
    ctx.config = (layout, backend)
    ctx.save_for_backward(grad_output, weight)


def _pointwise_grad_input_backward(ctx, c):
    grad_output, weight = ctx.saved_tensors
    layout, backend = ctx.config
    g_gy = g_w = None
    if ctx.needs_input_grad[0]:
        g_gy = _pointwise_op(c, weight, None, None, layout, None, backend)
    if ctx.needs_input_grad[1]:
        g_w = _pointwise_grad_weight_op(c, grad_output, layout, backend).reshape(weight.shape)
    return g_gy, g_w, None, None


def _pointwise_grad_weight_setup(ctx, inputs, output):
    x, grad_output, layout, backend = inputs
    ctx.config = (layout, backend)
    ctx.save_for_backward(x, grad_output)


def _pointwise_grad_weight_backward(ctx, c):
    x, grad_output = ctx.saved_tensors
    layout, backend = ctx.config
    g_x = g_gy = None
    if ctx.needs_input_grad[0]:
        g_x = _pointwise_grad_input_op(grad_output, c, layout, backend)
    if ctx.needs_input_grad[1]:
        g_gy = _pointwise_op(x, c, None, None, layout, None, backend)
    return g_x, g_gy, None, None


_pointwise_grad_input_op.register_autograd(_pointwise_grad_input_backward,
                                           setup_context=_pointwise_grad_input_setup)
_pointwise_grad_weight_op.register_autograd(_pointwise_grad_weight_backward,
                                            setup_context=_pointwise_grad_weight_setup)


def _pointwise_setup(ctx, inputs, output):
    x, weight, bias, residual, layout, activation, backend = inputs
    ctx.config = (layout, activation, backend)
    ctx.has_bias = bias is not None
    ctx.has_residual = residual is not None
    keep_out = activation in _MASKED and residual is None
    ctx.save_for_backward(x, weight, bias, output if keep_out else None)


def _pointwise_backward(ctx, g):
    x, weight, bias, y = ctx.saved_tensors
    layout, act, backend = ctx.config
    if act in _MASKED and not ctx.has_residual:
        gz = _act_grad(g, act, out=y)
    elif act is not None:
        gz = _act_grad(g, act, pre=_pointwise_op(x, weight, bias, None, layout, None, backend))
    else:
        gz = g
    gx = gw = gb = gr = None
    if ctx.needs_input_grad[0]:
        gx = _pointwise_grad_input_op(gz, weight, layout, backend)
    if ctx.needs_input_grad[1]:
        gw = _pointwise_grad_weight_op(x, gz, layout, backend).reshape(weight.shape)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        gb = gz.sum(_reduce_dims(layout))
    if ctx.has_residual and ctx.needs_input_grad[3]:
        gr = g
    return gx, gw, gb, gr, None, None, None


_pointwise_op.register_autograd(_pointwise_backward, setup_context=_pointwise_setup)


# ----------------------------------------------------------------------------- custom op: separable


@torch.library.custom_op("dwops::separable_conv2d", mutates_args=())
def _separable_op(x: Tensor, dw_weight: Tensor, pw_weight: Tensor, bias: Optional[Tensor],
                  dw_bias: Optional[Tensor], residual: Optional[Tensor], stride: List[int],
                  padding: List[int], same: bool, dilation: List[int], layout: str,
                  dw_activation: Optional[str], activation: Optional[str], backend: str) -> Tensor:
    return _api.separable_conv2d(x, dw_weight, pw_weight, bias, dw_bias=dw_bias,
                                 stride=tuple(stride), padding=_padding_arg(padding, same),
                                 dilation=tuple(dilation), layout=layout,
                                 dw_activation=dw_activation, activation=activation,
                                 residual=residual, backend=backend)


@_separable_op.register_fake
def _(x, dw_weight, pw_weight, bias, dw_bias, residual, stride, padding, same, dilation, layout,
      dw_activation, activation, backend):
    shape = _depthwise_out_shape(x.shape, dw_weight.shape, stride, padding, same, dilation, layout)
    shape[_nchw_dims(layout)[1]] = pw_weight.shape[0]
    return x.new_empty(shape)


def _separable_setup(ctx, inputs, output):
    (x, dw_weight, pw_weight, bias, dw_bias, residual, stride, padding, same, dilation, layout,
     dw_activation, activation, backend) = inputs
    ctx.geometry = (stride, padding, same, dilation, layout, backend)
    ctx.acts = (dw_activation, activation)
    ctx.has = (bias is not None, dw_bias is not None, residual is not None)
    keep_out = activation in _MASKED and residual is None
    ctx.save_for_backward(x, dw_weight, pw_weight, bias, dw_bias, output if keep_out else None)


def _separable_backward(ctx, g):
    x, dw_weight, pw_weight, bias, dw_bias, y = ctx.saved_tensors
    stride, padding, same, dilation, layout, backend = ctx.geometry
    dw_act, act = ctx.acts
    has_bias, has_dw_bias, has_residual = ctx.has
    need = ctx.needs_input_grad
    geo = (stride, padding, same, dilation, layout)
    mid = _depthwise_op(x, dw_weight, dw_bias, *geo, dw_act, backend)
    if act in _MASKED and not has_residual:
        gz2 = _act_grad(g, act, out=y)
    elif act is not None:
        gz2 = _act_grad(g, act, pre=_pointwise_op(mid, pw_weight, bias, None, layout, None, backend))
    else:
        gz2 = g
    gx = gdw = gpw = gb = gdb = gr = None
    if has_bias and need[3]:
        gb = gz2.sum(_reduce_dims(layout))
    if need[2]:
        gpw = _pointwise_grad_weight_op(mid, gz2, layout, backend).reshape(pw_weight.shape)
    if need[0] or need[1] or (has_dw_bias and need[4]):
        gmid = _pointwise_grad_input_op(gz2, pw_weight, layout, backend)
        if dw_act in _MASKED:
            gz1 = _act_grad(gmid, dw_act, out=mid)
        elif dw_act is not None:
            gz1 = _act_grad(gmid, dw_act,
                            pre=_depthwise_op(x, dw_weight, dw_bias, *geo, None, backend))
        else:
            gz1 = gmid
        gx, gdw, gdb = _depthwise_grads(x, gz1, dw_weight, geo, backend,
                                        [need[0], need[1], has_dw_bias and need[4]])
    if has_residual and need[5]:
        gr = g
    return (gx, gdw, gpw, gb, gdb, gr) + (None,) * 8


_separable_op.register_autograd(_separable_backward, setup_context=_separable_setup)


# ----------------------------------------------------------------------------- custom ops: depthwise 1-d
# Padding travels as [left, right] plus a mode: "" (explicit), "same" or "causal" ("same" depends on
# the length, so it is resolved at run time). The final state is a slice of the input (taken in
# PyTorch, outside the op), so autograd and torch.compile see it directly.


def _padding_1d_arg(pads: List[int], mode: str):
    return mode if mode else (pads[0], pads[1])


def _conv1d_out_len(length, k, stride: int, pads: List[int], mode: str, dilation: int):
    if mode == "same":
        return (length + stride - 1) // stride
    if mode == "causal":
        return (length - 1) // stride + 1
    return (length + pads[0] + pads[1] - dilation * (k - 1) - 1) // stride + 1


@torch.library.custom_op("dwops::depthwise_conv1d", mutates_args=())
def _conv1d_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], initial_state: Optional[Tensor],
               seq_idx: Optional[Tensor], stride: int, pads: List[int], mode: str, dilation: int,
               layout: str, activation: Optional[str], backend: str) -> Tensor:
    return _api.depthwise_conv1d(x, weight, bias, stride=stride, padding=_padding_1d_arg(pads, mode),
                                 dilation=dilation, layout=layout, activation=activation,
                                 initial_state=initial_state, seq_idx=seq_idx, backend=backend)


@_conv1d_op.register_fake
def _(x, weight, bias, initial_state, seq_idx, stride, pads, mode, dilation, layout, activation,
      backend):
    n, length = x.shape[0], x.shape[2] if layout == "NCL" else x.shape[1]
    ol = _conv1d_out_len(length, weight.shape[2], stride, pads, mode, dilation)
    co = weight.shape[0]
    return x.new_empty([n, co, ol] if layout == "NCL" else [n, ol, co])


@torch.library.custom_op("dwops::depthwise_conv1d_backward", mutates_args=())
def _conv1d_backward_op(x: Tensor, grad_output: Tensor, weight: Tensor,
                        initial_state: Optional[Tensor], seq_idx: Optional[Tensor], stride: int,
                        pads: List[int], mode: str, dilation: int, layout: str,
                        need: List[bool], backend: str) -> List[Tensor]:
    grads = _api.depthwise_conv1d_backward(
        x, grad_output, weight, stride=stride, padding=_padding_1d_arg(pads, mode),
        dilation=dilation, layout=layout, initial_state=initial_state, seq_idx=seq_idx,
        need_input=need[0], need_weight=need[1], need_bias=need[2], need_initial_state=need[3],
        backend=backend)
    return [g if g is not None else x.new_empty(0) for g in grads]  # empty: not asked for


@_conv1d_backward_op.register_fake
def _(x, grad_output, weight, initial_state, seq_idx, stride, pads, mode, dilation, layout, need,
      backend):
    shapes = (x.shape, weight.shape, weight.shape[:1],
              initial_state.shape if initial_state is not None else (0,))
    return [x.new_empty(shape if asked else (0,)) for asked, shape in zip(need, shapes)]


def _conv1d_setup(ctx, inputs, output):
    (x, weight, bias, initial_state, seq_idx, stride, pads, mode, dilation, layout, activation,
     backend) = inputs
    ctx.geometry = (stride, pads, mode, dilation, layout, backend)
    ctx.activation = activation
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, bias, initial_state, seq_idx,
                          output if activation in _MASKED else None)


def _conv1d_backward(ctx, g):
    x, weight, bias, initial_state, seq_idx, y = ctx.saved_tensors
    stride, pads, mode, dilation, layout, backend = ctx.geometry
    act = ctx.activation
    if act in _MASKED:
        gz = _act_grad(g, act, out=y)
    elif act is not None:
        z = _conv1d_op(x, weight, bias, initial_state, seq_idx, stride, pads, mode, dilation,
                       layout, None, backend)
        gz = _act_grad(g, act, pre=z)
    else:
        gz = g
    needs = ctx.needs_input_grad
    need = [needs[0], needs[1], ctx.has_bias and needs[2], initial_state is not None and needs[3]]
    grads = [None] * 4
    if any(need):
        out = _conv1d_backward_op(x, gz.contiguous(), weight, initial_state, seq_idx, stride, pads,
                                  mode, dilation, layout, need, backend)
        grads = [o if asked else None for o, asked in zip(out, need)]
    return (*grads,) + (None,) * 8


_conv1d_op.register_autograd(_conv1d_backward, setup_context=_conv1d_setup)


# ----------------------------------------------------------------------------- public functions


def depthwise_conv2d(x, weight, bias=None, *, stride=1, padding=0, dilation=1, layout="NCHW",
                     activation=None, backend="auto"):
    """Differentiable :func:`dwops.depthwise_conv2d` on torch tensors (any device).

    Shapes: ``x`` ``(N, C, H, W)`` / ``(N, H, W, C)``, ``weight`` ``(C*M, 1, KH, KW)``, ``bias``
    ``(C*M,)``; returns ``(N, C*M, OH, OW)`` / ``(N, OH, OW, C*M)``. Gradients flow to ``x``,
    ``weight`` and ``bias``.
    """
    fn = "depthwise_conv2d"
    _spec.check_layout(fn, layout)
    _spec.check_activation(fn, activation)
    stride, pads, same, dilation = _geometry(fn, stride, padding, dilation)
    return _depthwise_op(x, weight, bias, stride, pads, same, dilation, layout, activation,
                         backend)


def pointwise_conv2d(x, weight, bias=None, *, layout="NCHW", activation=None, residual=None,
                     backend="auto"):
    """Differentiable :func:`dwops.pointwise_conv2d`: ``activation(W x + bias) + residual``.

    Shapes: ``x`` ``(N, C_in, H, W)`` / ``(N, H, W, C_in)``, ``weight`` ``(C_out, C_in)`` or
    ``(C_out, C_in, 1, 1)``, ``bias`` ``(C_out,)``, ``residual`` and the result
    ``(N, C_out, H, W)`` / ``(N, H, W, C_out)``. Gradients flow to every tensor argument.
    """
    fn = "pointwise_conv2d"
    _spec.check_layout(fn, layout)
    _spec.check_activation(fn, activation)
    return _pointwise_op(x, weight, bias, residual, layout, activation, backend)


def separable_conv2d(x, dw_weight, pw_weight, bias=None, *, dw_bias=None, stride=1, padding=0,
                     dilation=1, layout="NCHW", dw_activation=None, activation=None,
                     residual=None, backend="auto"):
    """Differentiable :func:`dwops.separable_conv2d`:
    ``activation(pw(dw_activation(dw(x) + dw_bias)) + bias) + residual``.

    Shapes: ``x`` ``(N, C, H, W)`` / ``(N, H, W, C)``, ``dw_weight`` ``(C*M, 1, KH, KW)``,
    ``pw_weight`` ``(C_out, C*M)`` or ``(C_out, C*M, 1, 1)``, ``dw_bias`` ``(C*M,)``, ``bias``
    ``(C_out,)``, ``residual`` and the result ``(N, C_out, OH, OW)`` / ``(N, OH, OW, C_out)``.
    """
    fn = "separable_conv2d"
    _spec.check_layout(fn, layout)
    _spec.check_activation(fn, dw_activation, "dw_activation")
    _spec.check_activation(fn, activation)
    stride, pads, same, dilation = _geometry(fn, stride, padding, dilation)
    return _separable_op(x, dw_weight, pw_weight, bias, dw_bias, residual, stride, pads, same,
                         dilation, layout, dw_activation, activation, backend)


def _final_state(x: Tensor, initial_state: Optional[Tensor], width: int, layout: str) -> Tensor:
    """The last ``width`` inputs of ``concat(initial_state or zeros, x)``, as ``(N, C, width)``."""
    xc = x if layout == "NCL" else x.transpose(1, 2)
    if initial_state is None:
        initial_state = xc.new_zeros(xc.shape[0], xc.shape[1], width)
    return torch.cat([initial_state, xc], dim=2)[:, :, -width:].contiguous()


def depthwise_conv1d(x, weight, bias=None, *, stride=1, padding=0, dilation=1, layout="NCL",
                     activation=None, initial_state=None, return_final_state=False, seq_idx=None,
                     backend="auto"):
    """Differentiable :func:`dwops.depthwise_conv1d` on torch tensors (any device).

    Shapes: ``x`` ``(N, C, L)`` / ``(N, L, C)``, ``weight`` ``(C*M, 1, K)``, ``bias`` ``(C*M,)``,
    ``initial_state`` ``(N, C, dilation*(K-1))``, ``seq_idx`` ``(N, L)`` integer; returns ``y``
    ``(N, C*M, OL)`` / ``(N, OL, C*M)``, or ``(y, final_state)`` with ``return_final_state``.
    Gradients flow to ``x``, ``weight``, ``bias`` and ``initial_state`` (and through the final
    state, which is a slice of the inputs, back to them).
    """
    fn = "depthwise_conv1d"
    _spec.check_layout_1d(fn, layout)
    _spec.check_activation(fn, activation)
    stride = _spec._positive_int(fn, "stride", stride)
    dilation = _spec._positive_int(fn, "dilation", dilation)
    mode = padding.lower() if isinstance(padding, str) else ""
    if mode == "valid":
        mode, pads = "", [0, 0]
    elif mode:
        pads = [0, 0]
        _spec._padding_1d(fn, padding, 1, 1, 1, 1)  # an unknown string raises here
    else:
        pads = list(_spec._padding_1d(fn, padding, 1, 1, 1, 1)[:2])
    y = _conv1d_op(x, weight, bias, initial_state, seq_idx, stride, pads, mode, dilation, layout,
                   activation, backend)
    if not return_final_state:
        return y
    if mode != "causal":
        raise ValueError(f"{fn}: return_final_state needs padding='causal' (the state stands in "
                         f"for the causal left padding), got padding={padding!r}")
    return y, _final_state(x, initial_state, dilation * (weight.shape[2] - 1), layout)


# ----------------------------------------------------------------------------- modules


def _channels_last(x: Tensor, layout: str) -> bool:
    """Whether an ``NCHW`` module's input is a ``torch.channels_last`` tensor: NCHW shape, NHWC
    strides. Its ``permute(0, 2, 3, 1)`` is then a contiguous NHWC array, run with
    ``layout="NHWC"`` and permuted back, so the result is channels_last too (no transposes)."""
    return (layout == "NCHW" and x.dim() == 4 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last))


def _nhwc(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.permute(0, 2, 3, 1)


def _positive(cls: str, arg: str, value) -> int:
    if not _spec._is_int(value) or value < 1:
        raise ValueError(f"{cls}: {arg} must be a positive int, got {value!r}")
    return int(value)


def _init_conv(weight: Tensor, bias: Optional[Tensor]) -> None:
    """``nn.Conv2d.reset_parameters``: Kaiming-uniform weight, bias uniform in +-1/sqrt(fan_in)."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in = math.prod(weight.shape[1:])
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        nn.init.uniform_(bias, -bound, bound)


def _depthwise_parameters(module: nn.Module, shape, bias: bool, device, dtype) -> None:
    """``weight`` of ``shape`` (``(C*M, 1, ...)``) and ``bias`` ``(C*M,)`` (or None), initialized."""
    factory = {"device": device, "dtype": dtype}
    module.weight = nn.Parameter(torch.empty(*shape, **factory))
    if bias:
        module.bias = nn.Parameter(torch.empty(shape[0], **factory))
    else:
        module.register_parameter("bias", None)
    module.reset_parameters()


class DepthwiseConv2d(nn.Module):
    """Depthwise convolution, ``nn.Conv2d(channels, channels * multiplier, kernel_size,
    groups=channels)`` with a fused activation.

    Parameters: ``weight`` ``(channels * multiplier, 1, KH, KW)``, ``bias``
    ``(channels * multiplier,)`` (absent when ``bias=False``). Input ``(N, C, H, W)`` (``layout
    "NCHW"``) or ``(N, H, W, C)`` (``"NHWC"``); ``padding`` takes every form of
    :func:`dwops.depthwise_conv2d`, ``"same"`` for any stride.
    """

    def __init__(self, channels, kernel_size, stride=1, padding=0, dilation=1, multiplier=1,
                 bias=True, activation=None, layout="NCHW", *, backend="auto", device=None,
                 dtype=None):
        super().__init__()
        cls = type(self).__name__
        channels = _positive(cls, "channels", channels)
        multiplier = _positive(cls, "multiplier", multiplier)
        kh, kw = _spec._pair(cls, "kernel_size", kernel_size)
        _geometry(cls, stride, padding, dilation)  # validate now, not at the first call
        self.channels, self.multiplier, self.kernel_size = channels, multiplier, (kh, kw)
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.activation = _spec.check_activation(cls, activation)
        self.layout = _spec.check_layout(cls, layout)
        self.backend = backend
        _depthwise_parameters(self, (channels * multiplier, 1, kh, kw), bias, device, dtype)

    def reset_parameters(self) -> None:
        _init_conv(self.weight, self.bias)

    def forward(self, x: Tensor) -> Tensor:
        if _channels_last(x, self.layout):
            return depthwise_conv2d(_nhwc(x), self.weight, self.bias, stride=self.stride,
                                    padding=self.padding, dilation=self.dilation, layout="NHWC",
                                    activation=self.activation,
                                    backend=self.backend).permute(0, 3, 1, 2)
        return depthwise_conv2d(x, self.weight, self.bias, stride=self.stride,
                                padding=self.padding, dilation=self.dilation, layout=self.layout,
                                activation=self.activation, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"{self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding!r}, dilation={self.dilation}, "
                f"multiplier={self.multiplier}, bias={self.bias is not None}, "
                f"activation={self.activation!r}, layout={self.layout!r}")


class PointwiseConv2d(nn.Module):
    """1x1 convolution ``nn.Conv2d(in_channels, out_channels, 1)`` with a fused activation and an
    optional residual (``forward(x, residual=None)`` returns ``act(W x + b) + residual``).

    Parameters: ``weight`` ``(out_channels, in_channels, 1, 1)``, ``bias`` ``(out_channels,)``.
    """

    def __init__(self, in_channels, out_channels, bias=True, activation=None, layout="NCHW", *,
                 backend="auto", device=None, dtype=None):
        super().__init__()
        cls = type(self).__name__
        self.in_channels = _positive(cls, "in_channels", in_channels)
        self.out_channels = _positive(cls, "out_channels", out_channels)
        self.activation = _spec.check_activation(cls, activation)
        self.layout = _spec.check_layout(cls, layout)
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(self.out_channels, self.in_channels, 1, 1, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_conv(self.weight, self.bias)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        return pointwise_conv2d(x, self.weight, self.bias, layout=self.layout,
                                activation=self.activation, residual=residual,
                                backend=self.backend)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, bias={self.bias is not None}, "
                f"activation={self.activation!r}, layout={self.layout!r}")


class SeparableConv2d(nn.Module):
    """Depthwise-separable convolution, fused: ``act(pw(dw_act(dw(x) + dw_bias)) + bias) + residual``.

    Parameters: ``dw_weight`` ``(in_channels * multiplier, 1, KH, KW)``, ``pw_weight``
    ``(out_channels, in_channels * multiplier, 1, 1)``, ``bias`` ``(out_channels,)``, and
    ``dw_bias`` ``(in_channels * multiplier,)`` only when ``dw_bias=True``. ``forward(x,
    residual=None)``.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 bias=True, dw_activation=None, activation=None, layout="NCHW", *, multiplier=1,
                 dw_bias=False, backend="auto", device=None, dtype=None):
        super().__init__()
        cls = type(self).__name__
        self.in_channels = _positive(cls, "in_channels", in_channels)
        self.out_channels = _positive(cls, "out_channels", out_channels)
        self.multiplier = _positive(cls, "multiplier", multiplier)
        kh, kw = _spec._pair(cls, "kernel_size", kernel_size)
        _geometry(cls, stride, padding, dilation)
        self.kernel_size, self.stride, self.padding, self.dilation = (kh, kw), stride, padding, dilation
        self.dw_activation = _spec.check_activation(cls, dw_activation, "dw_activation")
        self.activation = _spec.check_activation(cls, activation)
        self.layout = _spec.check_layout(cls, layout)
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        mid = self.in_channels * self.multiplier
        self.dw_weight = nn.Parameter(torch.empty(mid, 1, kh, kw, **factory))
        self.pw_weight = nn.Parameter(torch.empty(self.out_channels, mid, 1, 1, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        if dw_bias:
            self.dw_bias = nn.Parameter(torch.empty(mid, **factory))
        else:
            self.register_parameter("dw_bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_conv(self.dw_weight, self.dw_bias)
        _init_conv(self.pw_weight, self.bias)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if _channels_last(x, self.layout):
            return separable_conv2d(_nhwc(x), self.dw_weight, self.pw_weight, self.bias,
                                    dw_bias=self.dw_bias, stride=self.stride,
                                    padding=self.padding, dilation=self.dilation, layout="NHWC",
                                    dw_activation=self.dw_activation, activation=self.activation,
                                    residual=_nhwc(residual),
                                    backend=self.backend).permute(0, 3, 1, 2)
        return separable_conv2d(x, self.dw_weight, self.pw_weight, self.bias, dw_bias=self.dw_bias,
                                stride=self.stride, padding=self.padding, dilation=self.dilation,
                                layout=self.layout, dw_activation=self.dw_activation,
                                activation=self.activation, residual=residual,
                                backend=self.backend)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding!r}, "
                f"dilation={self.dilation}, multiplier={self.multiplier}, "
                f"bias={self.bias is not None}, dw_bias={self.dw_bias is not None}, "
                f"dw_activation={self.dw_activation!r}, activation={self.activation!r}, "
                f"layout={self.layout!r}")


class DepthwiseConv1d(nn.Module):
    """Depthwise 1-d convolution, ``nn.Conv1d(channels, channels * multiplier, kernel_size,
    groups=channels)`` with a fused activation, causal streaming and decode steps.

    Parameters: ``weight`` ``(channels * multiplier, 1, K)``, ``bias`` ``(channels * multiplier,)``
    (absent when ``bias=False``), so an ``nn.Conv1d(groups=channels)`` state dict loads unchanged.
    ``causal=True`` means ``padding="causal"``: ``W = dilation * (K - 1)`` zeros (or the
    ``initial_state``) on the left, none on the right. Input ``(N, C, L)`` (``layout "NCL"``) or
    ``(N, L, C)`` (``"NLC"``); :meth:`forward` takes ``initial_state``, ``return_final_state`` and
    ``seq_idx`` as :func:`dwops.depthwise_conv1d` does; :meth:`step` runs decode steps on a state
    ``(N, C, K-1)`` in place (dilation 1).
    """

    def __init__(self, channels, kernel_size, stride=1, padding=0, dilation=1, multiplier=1,
                 bias=True, activation=None, layout="NCL", causal=False, *, backend="auto",
                 device=None, dtype=None):
        super().__init__()
        cls = type(self).__name__
        channels = _positive(cls, "channels", channels)
        multiplier = _positive(cls, "multiplier", multiplier)
        k = _spec._positive_int(cls, "kernel_size", kernel_size)
        if causal:
            if padding not in (0, "causal"):
                raise ValueError(f"{cls}: causal=True sets the padding; got padding={padding!r}")
            padding = "causal"
        _spec._positive_int(cls, "stride", stride)
        _spec._positive_int(cls, "dilation", dilation)
        _spec._padding_1d(cls, padding, 1, 1, 1, 1)  # validate the form now
        self.channels, self.multiplier, self.kernel_size = channels, multiplier, k
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.activation = _spec.check_activation(cls, activation)
        self.layout = _spec.check_layout_1d(cls, layout)
        self.backend = backend
        _depthwise_parameters(self, (channels * multiplier, 1, k), bias, device, dtype)

    def reset_parameters(self) -> None:
        _init_conv(self.weight, self.bias)

    def forward(self, x: Tensor, initial_state: Optional[Tensor] = None,
                return_final_state: bool = False, seq_idx: Optional[Tensor] = None):
        return depthwise_conv1d(x, self.weight, self.bias, stride=self.stride,
                                padding=self.padding, dilation=self.dilation, layout=self.layout,
                                activation=self.activation, initial_state=initial_state,
                                return_final_state=return_final_state, seq_idx=seq_idx,
                                backend=self.backend)

    def step(self, x_step: Tensor, state: Tensor):
        """Decode ``x_step`` ``(N, C)`` or ``(N, C, T)`` against ``state`` ``(N, C, K-1)`` (updated
        in place); returns ``(y, state)``."""
        with torch.no_grad():
            return _api.depthwise_conv1d_update(x_step, state, self.weight, self.bias,
                                                activation=self.activation, backend=self.backend)

    def extra_repr(self) -> str:
        s = f"{self.channels}, {self.channels * self.multiplier}, kernel_size={self.kernel_size}"
        if self.stride != 1:
            s += f", stride={self.stride}"
        s += f", padding={self.padding!r}"
        if self.dilation != 1:
            s += f", dilation={self.dilation}"
        if self.bias is None:
            s += ", bias=False"
        if self.activation:
            s += f", activation={self.activation!r}"
        return s + f", layout={self.layout!r}"


from ._convert import ConvertReport, convert  # noqa: E402  (it builds the modules above)
