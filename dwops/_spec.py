"""The one validation layer: user arguments in, a normalized problem description out.

Every backend receives one of the frozen problem objects below, built here from array *metadata*
only, so every documented error (docs/guide.md, "Errors you may see") is raised before anything
is allocated, copied or written, with the same type and message whatever the backend.

Geometry (cross-correlation, PyTorch/TensorFlow/JAX convention), per spatial axis::

    out = (in + pad_before + pad_after - dilation * (k - 1) - 1) // stride + 1
    y[o, i] = sum_k x[o // M, i * stride - pad_before + k * dilation] * w[o, k]
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from ._interop import FLOAT_DTYPES, ArrayInfo, describe

ACTIVATIONS = (None, "relu", "relu6", "silu", "gelu", "hardswish", "hardsigmoid")
# The integer code of each activation that the kernels take: the one table every backend uses (the
# CUDA C++ sources get it as an enum generated from it, see kernels/cupy_compile.source).
ACTIVATION_CODES = {a: i for i, a in enumerate(ACTIVATIONS)}
LAYOUTS = ("NCHW", "NHWC")
MAX_KERNEL = 31  # largest depthwise kernel side every backend supports


@dataclass(frozen=True)
class DepthwiseProblem:
    """A depthwise convolution: input (N, C, H, W) logical, output (N, C*M, OH, OW) logical."""

    N: int
    C: int
    H: int
    W: int
    M: int  # channel multiplier: output channel o reads input channel o // M
    KH: int
    KW: int
    OH: int
    OW: int
    sh: int  # stride
    sw: int
    dh: int  # dilation
    dw: int
    pt: int  # padding top / bottom / left / right
    pb: int
    pl: int
    pr: int
    layout: str  # "NCHW" or "NHWC": physical order of x and y
    dtype: str  # "float16", "bfloat16", "float32" or "float64"
    activation: str | None = None
    has_bias: bool = False

    @property
    def CO(self) -> int:
        return self.C * self.M

    @property
    def x_shape(self) -> tuple:
        return _physical(self.layout, self.N, self.C, self.H, self.W)

    @property
    def y_shape(self) -> tuple:
        return _physical(self.layout, self.N, self.CO, self.OH, self.OW)

    @property
    def w_shape(self) -> tuple:
        return (self.CO, 1, self.KH, self.KW)


@dataclass(frozen=True)
class PointwiseProblem:
    """A 1x1 convolution: y[n, o, h, w] = sum_c weight[o, c] * x[n, c, h, w]."""

    N: int
    CI: int
    CO: int
    H: int
    W: int
    layout: str
    dtype: str
    activation: str | None = None
    has_bias: bool = False
    has_residual: bool = False

    @property
    def x_shape(self) -> tuple:
        return _physical(self.layout, self.N, self.CI, self.H, self.W)

    @property
    def y_shape(self) -> tuple:
        return _physical(self.layout, self.N, self.CO, self.H, self.W)


@dataclass(frozen=True)
class SeparableProblem:
    """Depthwise (``dw``, with its bias and ``dw.activation``) then pointwise (``pw``) with epilogue."""

    dw: DepthwiseProblem
    pw: PointwiseProblem

    @property
    def x_shape(self) -> tuple:
        return self.dw.x_shape

    @property
    def y_shape(self) -> tuple:
        return self.pw.y_shape


def _physical(layout: str, n: int, c: int, h: int, w: int) -> tuple:
    return (n, c, h, w) if layout == "NCHW" else (n, h, w, c)


def _logical(layout: str, shape: tuple) -> tuple:
    """(N, C, H, W) from a physical 4-d shape."""
    n, a, b, c = shape
    return (n, a, b, c) if layout == "NCHW" else (n, c, a, b)


# ----------------------------------------------------------------------------- scalar arguments


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_layout(fn: str, layout) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"{fn}: layout must be 'NCHW' or 'NHWC', got {layout!r}")
    return layout


# "None, 'relu', ... or 'hardsigmoid'": the allowed values as the error messages list them.
_ALLOWED_ACTIVATIONS = ", ".join(map(repr, ACTIVATIONS[:-1])) + f" or {ACTIVATIONS[-1]!r}"


def check_activation(fn: str, activation, arg: str = "activation") -> str | None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"{fn}: {arg} must be {_ALLOWED_ACTIVATIONS}, got {activation!r}")
    return activation


def _pair(fn: str, arg: str, value) -> tuple[int, int]:
    """A positive int or an (h, w) pair of positive ints."""
    if _is_int(value):
        pair = (int(value), int(value))
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_int(v) for v in value):
        pair = (int(value[0]), int(value[1]))
    else:
        raise ValueError(f"{fn}: {arg} must be a positive int or an (h, w) pair, got {value!r}")
    if min(pair) < 1:
        raise ValueError(f"{fn}: {arg} must be >= 1, got {value!r}")
    return pair


def _same_pad(size: int, k: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow/JAX "same": out = ceil(in / stride), the smaller half of the padding before."""
    out = -(-size // stride)
    total = max((out - 1) * stride + dilation * (k - 1) + 1 - size, 0)
    return total // 2, total - total // 2


def _padding(fn, padding, hw, khw, stride, dilation) -> tuple[int, int, int, int]:
    """Normalize every padding form to (top, bottom, left, right)."""
    if isinstance(padding, str):
        mode = padding.lower()
        if mode == "valid":
            return (0, 0, 0, 0)
        if mode == "same":
            top, bottom = _same_pad(hw[0], khw[0], stride[0], dilation[0])
            left, right = _same_pad(hw[1], khw[1], stride[1], dilation[1])
            return (top, bottom, left, right)
        raise ValueError(f"{fn}: padding string must be 'same' or 'valid', got {padding!r}")
    if _is_int(padding):
        p = int(padding)
        pads = (p, p, p, p)
    elif isinstance(padding, (tuple, list)) and len(padding) == 2:
        if all(_is_int(v) for v in padding):
            pads = (int(padding[0]),) * 2 + (int(padding[1]),) * 2
        elif all(
            isinstance(v, (tuple, list)) and len(v) == 2 and all(_is_int(u) for u in v)
            for v in padding
        ):
            pads = tuple(int(u) for v in padding for u in v)
        else:
            pads = None
    else:
        pads = None
    if pads is None:
        raise ValueError(
            f"{fn}: padding must be an int, (ph, pw), ((top, bottom), (left, right)), 'same' or "
            f"'valid', got {padding!r}"
        )
    if min(pads) < 0:
        raise ValueError(f"{fn}: padding must be >= 0, got {padding!r}")
    return pads


# ----------------------------------------------------------------------------- array arguments


def _describe_all(fn: str, arrays: dict) -> dict[str, ArrayInfo]:
    """Describe every non-None array argument; check float dtypes, one dtype, compatible devices.

    The first entry is the reference argument (``x`` or ``grad_output``): its device is where the
    work runs. Other arrays may live on the host and are moved there (small parameters, residual);
    an array on another GPU, or on a GPU while the reference is on the host, is a ValueError.
    """
    infos = {name: describe(a, fn, name) for name, a in arrays.items() if a is not None}
    names = list(infos)
    ref = names[0]
    for name in names:
        if infos[name].dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{fn}: argument '{name}' must have a floating dtype (float16, bfloat16, float32, "
                f"float64), got {infos[name].dtype}"
            )
    for name in names[1:]:
        if infos[name].dtype != infos[ref].dtype:
            raise TypeError(
                f"{fn}: argument '{name}' has dtype {infos[name].dtype} but '{ref}' has "
                f"{infos[ref].dtype}; all arrays must share one dtype"
            )
    ref_dev = infos[ref].device
    if ref_dev[0] not in ("cpu", "cuda"):
        raise ValueError(f"{fn}: argument '{ref}' is on an unsupported device {ref_dev}")
    for name in names[1:]:
        dev = infos[name].device
        if dev != ref_dev and dev[0] != "cpu":
            raise ValueError(
                f"{fn}: argument '{name}' is on device {dev[0]}:{dev[1]} but '{ref}' is on "
                f"{ref_dev[0]}:{ref_dev[1]}; arrays must be on one device"
            )
    return infos


def _rank4(fn: str, arg: str, shape: tuple) -> None:
    if len(shape) != 4:
        raise ValueError(f"{fn}: argument '{arg}' must be 4-d, got shape {shape}")


def _shape_tuple(fn: str, arg: str, shape) -> tuple:
    if not (isinstance(shape, (tuple, list)) and len(shape) == 4 and all(_is_int(s) for s in shape)):
        raise ValueError(f"{fn}: {arg} must be a tuple of 4 ints, got {shape!r}")
    if min(shape) < 1:
        raise ValueError(f"{fn}: {arg} must have positive sizes, got {tuple(shape)}")
    return tuple(int(s) for s in shape)


def _check_shape(fn: str, arg: str, got: tuple, want: tuple, what: str) -> None:
    if tuple(got) != tuple(want):
        raise ValueError(f"{fn}: argument '{arg}' must have shape {want} ({what}), got {tuple(got)}")


def _nonempty(fn: str, arg: str, shape: tuple) -> None:
    if math.prod(shape) == 0:
        raise ValueError(f"{fn}: argument '{arg}' is empty (shape {shape})")


def _depthwise_geometry(fn, n, c, h, w, w_shape, w_arg, stride, padding, dilation, layout, dtype,
                        activation=None, has_bias=False) -> DepthwiseProblem:
    if len(w_shape) != 4 or w_shape[1] != 1:
        raise ValueError(
            f"{fn}: argument '{w_arg}' must have shape (C*M, 1, KH, KW), got {tuple(w_shape)}"
        )
    co, _, kh, kw = w_shape
    if co == 0 or kh == 0 or kw == 0:
        raise ValueError(f"{fn}: argument '{w_arg}' is empty (shape {tuple(w_shape)})")
    if co % c:
        raise ValueError(
            f"{fn}: argument '{w_arg}' has {co} output channels, not a multiple of the {c} input "
            f"channels (shape {tuple(w_shape)})"
        )
    if kh > MAX_KERNEL or kw > MAX_KERNEL:
        raise ValueError(
            f"{fn}: kernel size {kh}x{kw} of '{w_arg}' exceeds the supported {MAX_KERNEL}x{MAX_KERNEL}"
        )
    sh, sw = _pair(fn, "stride", stride)
    dh, dw = _pair(fn, "dilation", dilation)
    pt, pb, pl, pr = _padding(fn, padding, (h, w), (kh, kw), (sh, sw), (dh, dw))
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    if oh < 1 or ow < 1:
        raise ValueError(
            f"{fn}: empty output: input {h}x{w} with kernel {kh}x{kw}, dilation ({dh}, {dw}) and "
            f"padding ({pt}, {pb}, {pl}, {pr}) gives {max(oh, 0)}x{max(ow, 0)}"
        )
    return DepthwiseProblem(n, c, h, w, co // c, kh, kw, oh, ow, sh, sw, dh, dw, pt, pb, pl, pr,
                            layout, dtype, activation, has_bias)


def _vector(fn, arg, info: ArrayInfo | None, length: int) -> None:
    if info is not None and info.shape != (length,):
        raise ValueError(f"{fn}: argument '{arg}' must have shape ({length},), got {info.shape}")


# ----------------------------------------------------------------------------- per op


def depthwise(fn, x, weight, bias, stride, padding, dilation, layout, activation):
    check_layout(fn, layout)
    check_activation(fn, activation)
    infos = _describe_all(fn, {"x": x, "weight": weight, "bias": bias})
    _rank4(fn, "x", infos["x"].shape)
    _nonempty(fn, "x", infos["x"].shape)
    n, c, h, w = _logical(layout, infos["x"].shape)
    p = _depthwise_geometry(fn, n, c, h, w, infos["weight"].shape, "weight", stride, padding,
                            dilation, layout, infos["x"].dtype, activation, bias is not None)
    _vector(fn, "bias", infos.get("bias"), p.CO)
    return p, infos


def depthwise_grad_input(fn, grad_output, weight, input_shape, stride, padding, dilation, layout):
    check_layout(fn, layout)
    infos = _describe_all(fn, {"grad_output": grad_output, "weight": weight})
    shape = _shape_tuple(fn, "input_shape", input_shape)
    n, c, h, w = _logical(layout, shape)
    p = _depthwise_geometry(fn, n, c, h, w, infos["weight"].shape, "weight", stride, padding,
                            dilation, layout, infos["grad_output"].dtype)
    _rank4(fn, "grad_output", infos["grad_output"].shape)
    _check_shape(fn, "grad_output", infos["grad_output"].shape, p.y_shape,
                 f"the {layout} output of input_shape {shape}")
    return p, infos


def depthwise_grad_weight(fn, x, grad_output, weight_shape, stride, padding, dilation, layout):
    check_layout(fn, layout)
    infos = _describe_all(fn, {"x": x, "grad_output": grad_output})
    _rank4(fn, "x", infos["x"].shape)
    _nonempty(fn, "x", infos["x"].shape)
    wshape = _shape_tuple(fn, "weight_shape", weight_shape)
    n, c, h, w = _logical(layout, infos["x"].shape)
    p = _depthwise_geometry(fn, n, c, h, w, wshape, "weight_shape", stride, padding, dilation,
                            layout, infos["x"].dtype)
    _rank4(fn, "grad_output", infos["grad_output"].shape)
    _check_shape(fn, "grad_output", infos["grad_output"].shape, p.y_shape,
                 f"the {layout} output of x")
    return p, infos


def check_need(fn: str, need: dict, require_any: bool = False) -> None:
    """The ``need_*`` flags of a backward: each True or False; with ``require_any`` at least one
    True."""
    for name, flag in need.items():
        if not isinstance(flag, bool):
            raise ValueError(f"{fn}: {name} must be True or False, got {flag!r}")
    if require_any and not any(need.values()):
        raise ValueError(f"{fn}: nothing to compute: at least one of {', '.join(need)} must be "
                         f"True")


def depthwise_backward(fn, x, grad_output, weight, stride, padding, dilation, layout, need):
    check_layout(fn, layout)
    check_need(fn, need, require_any=True)
    infos = _describe_all(fn, {"x": x, "grad_output": grad_output, "weight": weight})
    _rank4(fn, "x", infos["x"].shape)
    _nonempty(fn, "x", infos["x"].shape)
    n, c, h, w = _logical(layout, infos["x"].shape)
    p = _depthwise_geometry(fn, n, c, h, w, infos["weight"].shape, "weight", stride, padding,
                            dilation, layout, infos["x"].dtype)
    _rank4(fn, "grad_output", infos["grad_output"].shape)
    _check_shape(fn, "grad_output", infos["grad_output"].shape, p.y_shape,
                 f"the {layout} output of x")
    return p, infos


def _pointwise_weight(fn, arg, shape) -> tuple[int, int]:
    if len(shape) == 2 or (len(shape) == 4 and shape[2:] == (1, 1)):
        if shape[0] == 0 or shape[1] == 0:
            raise ValueError(f"{fn}: argument '{arg}' is empty (shape {shape})")
        return shape[0], shape[1]
    raise ValueError(f"{fn}: argument '{arg}' must have shape (C_out, C_in) or (C_out, C_in, 1, 1), "
                     f"got {shape}")


def pointwise(fn, x, weight, bias, layout, activation, residual):
    check_layout(fn, layout)
    check_activation(fn, activation)
    infos = _describe_all(fn, {"x": x, "weight": weight, "bias": bias, "residual": residual})
    _rank4(fn, "x", infos["x"].shape)
    _nonempty(fn, "x", infos["x"].shape)
    n, c, h, w = _logical(layout, infos["x"].shape)
    co, ci = _pointwise_weight(fn, "weight", infos["weight"].shape)
    if ci != c:
        raise ValueError(f"{fn}: argument 'weight' has C_in={ci} but x has {c} channels "
                         f"(weight shape {infos['weight'].shape}, x shape {infos['x'].shape})")
    p = PointwiseProblem(n, c, co, h, w, layout, infos["x"].dtype, activation, bias is not None,
                         residual is not None)
    _vector(fn, "bias", infos.get("bias"), co)
    if residual is not None:
        _check_shape(fn, "residual", infos["residual"].shape, p.y_shape, f"the {layout} output")
    return p, infos


def pointwise_grad_input(fn, grad_output, weight, layout):
    check_layout(fn, layout)
    infos = _describe_all(fn, {"grad_output": grad_output, "weight": weight})
    _rank4(fn, "grad_output", infos["grad_output"].shape)
    _nonempty(fn, "grad_output", infos["grad_output"].shape)
    n, c, h, w = _logical(layout, infos["grad_output"].shape)
    co, ci = _pointwise_weight(fn, "weight", infos["weight"].shape)
    if co != c:
        raise ValueError(f"{fn}: argument 'weight' has C_out={co} but grad_output has {c} channels")
    return PointwiseProblem(n, ci, co, h, w, layout, infos["grad_output"].dtype), infos


def pointwise_grad_weight(fn, x, grad_output, layout):
    check_layout(fn, layout)
    infos = _describe_all(fn, {"x": x, "grad_output": grad_output})
    _rank4(fn, "x", infos["x"].shape)
    _nonempty(fn, "x", infos["x"].shape)
    _rank4(fn, "grad_output", infos["grad_output"].shape)
    n, ci, h, w = _logical(layout, infos["x"].shape)
    gn, co, gh, gw = _logical(layout, infos["grad_output"].shape)
    if (gn, gh, gw) != (n, h, w) or co == 0:
        raise ValueError(f"{fn}: argument 'grad_output' of shape {infos['grad_output'].shape} does "
                         f"not match x of shape {infos['x'].shape} in batch and spatial sizes")
    return PointwiseProblem(n, ci, co, h, w, layout, infos["x"].dtype), infos


def separable(fn, x, dw_weight, pw_weight, bias, dw_bias, stride, padding, dilation, layout,
              dw_activation, activation, residual):
    check_layout(fn, layout)
    check_activation(fn, dw_activation, "dw_activation")
    check_activation(fn, activation)
    infos = _describe_all(fn, {"x": x, "dw_weight": dw_weight, "pw_weight": pw_weight,
                               "bias": bias, "dw_bias": dw_bias, "residual": residual})
    _rank4(fn, "x", infos["x"].shape)
    _nonempty(fn, "x", infos["x"].shape)
    n, c, h, w = _logical(layout, infos["x"].shape)
    dwp = _depthwise_geometry(fn, n, c, h, w, infos["dw_weight"].shape, "dw_weight", stride,
                              padding, dilation, layout, infos["x"].dtype, dw_activation,
                              dw_bias is not None)
    _vector(fn, "dw_bias", infos.get("dw_bias"), dwp.CO)
    co, ci = _pointwise_weight(fn, "pw_weight", infos["pw_weight"].shape)
    if ci != dwp.CO:
        raise ValueError(f"{fn}: argument 'pw_weight' has C_in={ci} but the depthwise stage gives "
                         f"{dwp.CO} channels (pw_weight shape {infos['pw_weight'].shape})")
    pwp = PointwiseProblem(n, dwp.CO, co, dwp.OH, dwp.OW, layout, dwp.dtype, activation,
                           bias is not None, residual is not None)
    _vector(fn, "bias", infos.get("bias"), co)
    if residual is not None:
        _check_shape(fn, "residual", infos["residual"].shape, pwp.y_shape, f"the {layout} output")
    return SeparableProblem(dwp, pwp), infos


# ----------------------------------------------------------------------------- depthwise 1-d

LAYOUTS_1D = ("NCL", "NLC")
INT_DTYPES = ("int32", "int64")


@dataclass(frozen=True)
class Conv1dProblem:
    """A depthwise 1-d convolution: x (N, C, L) logical, y (N, C*M, OL) logical.

    ``y[n, o, l] = sum_k w[o, 0, k] * xp[n, o // M, l * s + k * d]`` where ``xp`` is ``x`` with
    ``pl`` values on the left (zeros, or ``initial_state`` for causal padding) and ``pr`` zeros on
    the right. With ``seq_idx`` (causal, stride 1) a tap that reads position ``src = l - (K-1-k)*d``
    counts only when ``seq_idx[n, src] == seq_idx[n, l]``; state positions (``src < 0``) belong to
    the sequence ``seq_idx[n, 0]``.
    """

    N: int
    C: int
    L: int
    M: int
    K: int
    OL: int
    s: int  # stride
    d: int  # dilation
    pl: int  # padding left / right
    pr: int
    layout: str  # "NCL" or "NLC": physical order of x and y
    dtype: str
    activation: str | None = None
    has_bias: bool = False
    causal: bool = False  # padding="causal": pl == W, pr == 0
    has_state: bool = False  # initial_state given (N, C, W)
    final_state: bool = False  # return_final_state: also write (N, C, W)
    has_seq: bool = False  # seq_idx given (N, L)

    @property
    def CO(self) -> int:
        return self.C * self.M

    @property
    def W(self) -> int:
        """Width of the causal state: the inputs one output reaches back over."""
        return self.d * (self.K - 1)

    @property
    def x_shape(self) -> tuple:
        return (self.N, self.C, self.L) if self.layout == "NCL" else (self.N, self.L, self.C)

    @property
    def y_shape(self) -> tuple:
        return (self.N, self.CO, self.OL) if self.layout == "NCL" else (self.N, self.OL, self.CO)

    @property
    def w_shape(self) -> tuple:
        return (self.CO, 1, self.K)

    @property
    def state_shape(self) -> tuple:
        return (self.N, self.C, self.W)


@dataclass(frozen=True)
class Conv1dUpdateProblem:
    """One decode step (or T steps) of a causal depthwise 1-d convolution with a rolling state.

    ``x`` is ``(N, C, T)`` logical (``(N, C)`` when ``T`` is 1 and ``squeeze``), ``state``
    ``(N, C, K-1)`` holds the last ``K-1`` inputs, oldest first; ``y`` is ``(N, C*M, T)``.
    """

    N: int
    C: int
    M: int
    K: int
    T: int
    dtype: str
    activation: str | None = None
    has_bias: bool = False
    squeeze: bool = False  # x_step was (N, C): y is (N, C*M)

    @property
    def CO(self) -> int:
        return self.C * self.M

    @property
    def x_shape(self) -> tuple:
        return (self.N, self.C) if self.squeeze else (self.N, self.C, self.T)

    @property
    def y_shape(self) -> tuple:
        return (self.N, self.CO) if self.squeeze else (self.N, self.CO, self.T)

    @property
    def state_shape(self) -> tuple:
        return (self.N, self.C, self.K - 1)


def check_layout_1d(fn: str, layout) -> str:
    if layout not in LAYOUTS_1D:
        raise ValueError(f"{fn}: layout must be 'NCL' or 'NLC', got {layout!r}")
    return layout


def _positive_int(fn: str, arg: str, value) -> int:
    if isinstance(value, (tuple, list)) and len(value) == 1:
        value = value[0]
    if not _is_int(value):
        raise ValueError(f"{fn}: {arg} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{fn}: {arg} must be >= 1, got {value!r}")
    return int(value)


def _padding_1d(fn, padding, length, k, stride, dilation) -> tuple[int, int, bool]:
    """Normalize a 1-d padding to (left, right, causal)."""
    if isinstance(padding, str):
        mode = padding.lower()
        if mode == "valid":
            return 0, 0, False
        if mode == "same":
            return (*_same_pad(length, k, stride, dilation), False)
        if mode == "causal":
            return dilation * (k - 1), 0, True
        raise ValueError(f"{fn}: padding string must be 'same', 'valid' or 'causal', "
                         f"got {padding!r}")
    if _is_int(padding):
        pads = (int(padding), int(padding))
    elif (isinstance(padding, (tuple, list)) and len(padding) == 2
          and all(_is_int(v) for v in padding)):
        pads = (int(padding[0]), int(padding[1]))
    else:
        raise ValueError(f"{fn}: padding must be an int, (left, right), 'same', 'valid' or "
                         f"'causal', got {padding!r}")
    if min(pads) < 0:
        raise ValueError(f"{fn}: padding must be >= 0, got {padding!r}")
    return pads[0], pads[1], False


def _rank(fn: str, arg: str, shape: tuple, rank: int) -> None:
    if len(shape) != rank:
        raise ValueError(f"{fn}: argument '{arg}' must be {rank}-d, got shape {shape}")


def _describe_index(fn: str, arg: str, obj, ref: ArrayInfo) -> ArrayInfo:
    """An integer index array (``seq_idx``) on the host or on the reference's device."""
    info = describe(obj, fn, arg)
    if info.dtype not in INT_DTYPES:
        raise TypeError(f"{fn}: argument '{arg}' must have dtype int32 or int64, got {info.dtype}")
    if info.device != ref.device and info.device[0] != "cpu":
        raise ValueError(f"{fn}: argument '{arg}' is on device {info.device[0]}:{info.device[1]} "
                         f"but the input is on {ref.device[0]}:{ref.device[1]}; arrays must be on "
                         f"one device")
    return info


def _conv1d_weight(fn: str, arg: str, shape: tuple, c: int) -> tuple[int, int]:
    """(C*M, K) of a depthwise 1-d weight (C*M, 1, K)."""
    if len(shape) != 3 or shape[1] != 1:
        raise ValueError(f"{fn}: argument '{arg}' must have shape (C*M, 1, K), got {tuple(shape)}")
    co, _, k = shape
    if co == 0 or k == 0:
        raise ValueError(f"{fn}: argument '{arg}' is empty (shape {tuple(shape)})")
    if co % c:
        raise ValueError(f"{fn}: argument '{arg}' has {co} output channels, not a multiple of the "
                         f"{c} input channels (shape {tuple(shape)})")
    if k > MAX_KERNEL:
        raise ValueError(f"{fn}: kernel width {k} of '{arg}' exceeds the supported {MAX_KERNEL}")
    return co, k


def _conv1d_geometry(fn, n, c, length, w_shape, w_arg, stride, padding, dilation, layout, dtype,
                     activation=None, has_bias=False, has_state=False, final_state=False,
                     has_seq=False) -> Conv1dProblem:
    co, k = _conv1d_weight(fn, w_arg, w_shape, c)
    s = _positive_int(fn, "stride", stride)
    d = _positive_int(fn, "dilation", dilation)
    pl, pr, causal = _padding_1d(fn, padding, length, k, s, d)
    if (has_state or final_state) and not causal:
        arg = "initial_state" if has_state else "return_final_state"
        raise ValueError(f"{fn}: {arg} needs padding='causal' (the state stands in for the causal "
                         f"left padding), got padding={padding!r}")
    if (has_state or final_state) and d * (k - 1) == 0:
        arg = "initial_state" if has_state else "return_final_state"
        raise ValueError(f"{fn}: {arg} needs a kernel that reaches back (dilation*(K-1) >= 1), "
                         f"got kernel width {k}")
    if has_seq and not (causal and s == 1):
        raise ValueError(f"{fn}: seq_idx needs padding='causal' and stride=1, got "
                         f"padding={padding!r}, stride={stride!r}")
    ol = (length + pl + pr - d * (k - 1) - 1) // s + 1
    if ol < 1:
        raise ValueError(f"{fn}: empty output: input length {length} with kernel {k}, dilation {d} "
                         f"and padding ({pl}, {pr}) gives {max(ol, 0)}")
    return Conv1dProblem(n, c, length, co // c, k, ol, s, d, pl, pr, layout, dtype, activation,
                         has_bias, causal, has_state, final_state, has_seq)


def _logical_1d(layout: str, shape: tuple) -> tuple:
    n, a, b = shape
    return (n, a, b) if layout == "NCL" else (n, b, a)


def _conv1d_extras(fn, p: Conv1dProblem, infos: dict, seq_idx, ref: str) -> None:
    """Check the shapes of initial_state and seq_idx (seq_idx described into ``infos``)."""
    if "initial_state" in infos:
        _check_shape(fn, "initial_state", infos["initial_state"].shape, p.state_shape,
                     "(N, C, dilation*(K-1))")
    if seq_idx is not None:
        infos["seq_idx"] = _describe_index(fn, "seq_idx", seq_idx, infos[ref])
        _check_shape(fn, "seq_idx", infos["seq_idx"].shape, (p.N, p.L), "(N, L)")


def depthwise_1d(fn, x, weight, bias, stride, padding, dilation, layout, activation,
                 initial_state, return_final_state, seq_idx):
    check_layout_1d(fn, layout)
    check_activation(fn, activation)
    if not isinstance(return_final_state, bool):
        raise ValueError(f"{fn}: return_final_state must be True or False, "
                         f"got {return_final_state!r}")
    infos = _describe_all(fn, {"x": x, "weight": weight, "bias": bias,
                               "initial_state": initial_state})
    _rank(fn, "x", infos["x"].shape, 3)
    _nonempty(fn, "x", infos["x"].shape)
    n, c, length = _logical_1d(layout, infos["x"].shape)
    p = _conv1d_geometry(fn, n, c, length, infos["weight"].shape, "weight", stride, padding,
                         dilation, layout, infos["x"].dtype, activation, bias is not None,
                         initial_state is not None, return_final_state, seq_idx is not None)
    _vector(fn, "bias", infos.get("bias"), p.CO)
    _conv1d_extras(fn, p, infos, seq_idx, "x")
    return p, infos


def depthwise_1d_backward(fn, x, grad_output, weight, stride, padding, dilation, layout,
                          initial_state, seq_idx, need):
    check_layout_1d(fn, layout)
    check_need(fn, need)
    infos = _describe_all(fn, {"x": x, "grad_output": grad_output, "weight": weight,
                               "initial_state": initial_state})
    _rank(fn, "x", infos["x"].shape, 3)
    _nonempty(fn, "x", infos["x"].shape)
    n, c, length = _logical_1d(layout, infos["x"].shape)
    p = _conv1d_geometry(fn, n, c, length, infos["weight"].shape, "weight", stride, padding,
                         dilation, layout, infos["x"].dtype, None, False,
                         initial_state is not None, False, seq_idx is not None)
    if need.get("need_initial_state") and initial_state is None:
        raise ValueError(f"{fn}: need_initial_state=True needs the initial_state the forward used")
    _rank(fn, "grad_output", infos["grad_output"].shape, 3)
    _check_shape(fn, "grad_output", infos["grad_output"].shape, p.y_shape,
                 f"the {layout} output of x")
    _conv1d_extras(fn, p, infos, seq_idx, "x")
    return p, infos


def depthwise_1d_update(fn, x_step, state, weight, bias, activation):
    check_activation(fn, activation)
    infos = _describe_all(fn, {"x_step": x_step, "state": state, "weight": weight, "bias": bias})
    shape = infos["x_step"].shape
    if len(shape) not in (2, 3):
        raise ValueError(f"{fn}: argument 'x_step' must be (N, C) or (N, C, T), got shape {shape}")
    _nonempty(fn, "x_step", shape)
    n, c = shape[:2]
    t = shape[2] if len(shape) == 3 else 1
    co, k = _conv1d_weight(fn, "weight", infos["weight"].shape, c)
    if k < 2:
        raise ValueError(f"{fn}: a decode step needs a kernel width >= 2 (a state of K-1 inputs), "
                         f"got weight shape {infos['weight'].shape}")
    p = Conv1dUpdateProblem(n, c, co // c, k, t, infos["x_step"].dtype, activation,
                            bias is not None, len(shape) == 2)
    _check_shape(fn, "state", infos["state"].shape, p.state_shape, "(N, C, K-1)")
    if infos["state"].device != infos["x_step"].device:
        raise ValueError(f"{fn}: argument 'state' must be on the device of 'x_step' (it is "
                         f"updated there), got {infos['state'].device} and "
                         f"{infos['x_step'].device}")
    _vector(fn, "bias", infos.get("bias"), p.CO)
    return p, infos
