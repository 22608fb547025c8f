"""``dwops.torch.convert``: swap a PyTorch network's depthwise convolutions for dwops layers.

Two steps, both by module structure (no tracing, so any ``forward`` keeps working):

1. **convert**: every ``nn.Conv2d`` with ``groups == in_channels`` and ``padding_mode="zeros"``
   becomes a :class:`dwops.torch.DepthwiseConv2d` holding the *same* ``weight`` and ``bias``
   Parameter objects (optimizers, state dicts and ``torch.compile`` see the same tensors under
   the same keys). Layers it cannot take are left alone and listed in the report.
2. **fuse** (eval mode only): inside ``nn.Sequential`` containers (nested plain Sequentials such
   as torchvision's ``Conv2dNormActivation`` are read through), the chain
   ``depthwise -> [BatchNorm2d] -> [activation] -> 1x1 conv -> [BatchNorm2d] -> [activation]``
   becomes one :class:`dwops.torch.SeparableConv2d`, the BatchNorms folded into weights and
   biases in float64. In the inverted-residual blocks of torchvision (MobileNetV2/V3, MNASNet)
   whose body ends with the chain and adds its input, the addition is fused as the residual.
   timm's ``InvertedResidual`` and ``DepthwiseSeparableConv`` blocks are read in their forward's
   order, with ``BatchNormAct2d`` (a BatchNorm and its activation) folded like the pair.

Folding a BatchNorm (running statistics, eval mode) into the convolution before it::

    s = gamma / sqrt(var + eps);  W' = W * s (per output channel);  b' = (b - mean) * s + beta
"""

import copy
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
from torch import nn

from . import _spec

# Module types of the activations dwops can fuse, by dwops name. Only names present in
# _spec.ACTIVATIONS are used, so an activation added there is picked up here.
_ACTIVATION_TYPES = {
    "relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU, "gelu": nn.GELU,
    "hardswish": nn.Hardswish, "hardsigmoid": nn.Hardsigmoid,
}
# Residual blocks whose forward is ``x + body(x)`` when ``flag`` is true: class name -> (body
# attribute, flag attribute). Checked with the defining module so a same-named class elsewhere
# is not taken for one of these.
_RESIDUAL_BLOCKS = {
    ("torchvision.models.mobilenetv2", "InvertedResidual"): ("conv", "use_res_connect"),
    ("torchvision.models.mobilenetv3", "InvertedResidual"): ("block", "use_res_connect"),
    ("torchvision.models.mnasnet", "_InvertedResidual"): ("layers", "apply_residual"),
}
# timm's blocks (not Sequentials): class -> the attributes their forward applies in order; the
# input is added at the end when ``has_skip`` (after ``drop_path``, the identity in eval mode).
_TIMM_BLOCKS = {
    ("timm.models._efficientnet_blocks", "InvertedResidual"):
        ("conv_pw", "bn1", "conv_dw", "bn2", "aa", "se", "conv_pwl", "bn3"),
    ("timm.models._efficientnet_blocks", "DepthwiseSeparableConv"):
        ("conv_dw", "bn1", "aa", "se", "conv_pw", "bn2"),
}


@dataclass
class ConvertReport:
    """What :func:`dwops.torch.convert` did: module names (as in ``named_modules``) of the
    depthwise convolutions ``converted``, the chains ``fused`` (``"name[i:j]"``, positions in the
    flattened Sequential, ``+residual`` when the block's addition was fused) and the ``skipped``
    layers with the reason."""

    converted: List[str] = field(default_factory=list)
    fused: List[str] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        s = (f"dwops.torch.convert: {len(self.converted)} depthwise conv(s) converted, "
             f"{len(self.fused)} chain(s) fused, {len(self.skipped)} layer(s) left alone")
        if self.skipped:
            s += " (" + "; ".join(f"{n}: {r}" for n, r in self.skipped) + ")"
        return s


def _activation_name(m: nn.Module) -> Optional[str]:
    """The dwops name of activation module ``m``, or None if dwops cannot fuse it."""
    for name in _spec.ACTIVATIONS:
        t = _ACTIVATION_TYPES.get(name)
        if t is not None and type(m) is t:
            if name == "gelu" and m.approximate != "none":  # dwops's gelu is the erf form
                return None
            return name
    return None


def _depthwise_refusal(conv: nn.Conv2d) -> Optional[str]:
    """Why a grouped ``conv`` (groups > 1) cannot become a DepthwiseConv2d, or None if it can."""
    if conv.groups != conv.in_channels:
        return f"grouped convolution (groups={conv.groups}, in_channels={conv.in_channels})"
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} (a Conv2d subclass with its own forward)"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (dwops pads with zeros)"
    return None


def _to_depthwise(conv: nn.Conv2d, backend: str) -> nn.Module:
    from .torch import DepthwiseConv2d
    padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
    m = DepthwiseConv2d(conv.in_channels, conv.kernel_size, conv.stride, padding, conv.dilation,
                        conv.out_channels // conv.in_channels, bias=False, backend=backend,
                        device="meta")
    m.weight = conv.weight  # the same Parameter objects
    m.bias = conv.bias
    m.train(conv.training)
    return m


def _convert_depthwise(model: nn.Module, backend: str, report: ConvertReport) -> nn.Module:
    if isinstance(model, nn.Conv2d) and model.groups > 1:
        why = _depthwise_refusal(model)
        if why:
            report.skipped.append(("", why))
            return model
        report.converted.append("")
        return _to_depthwise(model, backend)
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if not (isinstance(child, nn.Conv2d) and child.groups > 1):
                continue
            full = f"{parent_name}.{name}" if parent_name else name
            why = _depthwise_refusal(child)
            if why:
                report.skipped.append((full, why))
            else:
                setattr(parent, name, _to_depthwise(child, backend))
                report.converted.append(full)
    return model


# ----------------------------------------------------------------------------- fusion


def _is_plain_sequential(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _flatten(seq: nn.Sequential) -> list:
    """The leaf modules of ``seq``, reading through nested plain Sequentials, Identities dropped."""
    out = []
    for m in seq:
        if _is_plain_sequential(m):
            out.extend(_flatten(m))
        elif not isinstance(m, nn.Identity):
            out.append(m)
    return out


def _is_timm_bn_act(m: nn.Module) -> bool:
    """A timm ``BatchNormAct2d`` (BatchNorm2d, then an activation module ``act``) with no dropout."""
    return (type(m).__name__ == "BatchNormAct2d" and type(m).__module__.startswith("timm.")
            and isinstance(getattr(m, "drop", None), nn.Identity))


def _foldable_bn(m: nn.Module, channels: int) -> bool:
    return ((type(m) is nn.BatchNorm2d or _is_timm_bn_act(m)) and m.track_running_stats
            and m.running_mean is not None and m.num_features == channels)


def _bn_act(bn: nn.Module):
    """The activation applied inside ``bn`` (a timm BatchNormAct2d): None when there is none,
    False when dwops cannot fuse it."""
    act = getattr(bn, "act", None) if _is_timm_bn_act(bn) else None
    if act is None or isinstance(act, nn.Identity):
        return None
    return act if _activation_name(act) else False


def _norm_act(atoms: list, j: int, channels: int):
    """The optional ``[BatchNorm] [activation]`` at ``atoms[j]``: (bn, act, next j), or None if
    a BatchNorm there carries an activation dwops cannot fuse."""
    bn = act = None
    if j < len(atoms) and _foldable_bn(atoms[j], channels):
        bn, j = atoms[j], j + 1
        act = _bn_act(bn)
        if act is False:
            return None
    if act is None and j < len(atoms) and _activation_name(atoms[j]):
        act, j = atoms[j], j + 1
    return bn, act, j


def _match_chain(atoms: list, i: int):
    """The chain starting at ``atoms[i]``: (end, dw, bn1, act1, pw, bn2, act2) or None."""
    from .torch import DepthwiseConv2d
    dw = atoms[i]
    if not (type(dw) is DepthwiseConv2d and dw.activation is None and dw.layout == "NCHW"):
        return None
    mid = dw.weight.shape[0]
    first = _norm_act(atoms, i + 1, mid)
    if first is None:
        return None
    bn1, act1, j = first
    if j >= len(atoms):
        return None
    pw = atoms[j]
    if not (type(pw) is nn.Conv2d and pw.kernel_size == (1, 1) and pw.stride == (1, 1)
            and pw.groups == 1 and pw.in_channels == mid
            and (pw.padding in ("valid", "same") or tuple(pw.padding) == (0, 0))):
        return None
    second = _norm_act(atoms, j + 1, pw.out_channels)
    if second is None:
        return None
    bn2, act2, j = second
    return j, dw, bn1, act1, pw, bn2, act2


def _fold(weight: torch.Tensor, bias: Optional[torch.Tensor], bn: Optional[nn.BatchNorm2d]):
    """``(weight, bias)`` with ``bn`` folded in, computed in float64 and cast back."""
    dtype = weight.dtype
    w = weight.detach().double()
    b = bias.detach().double() if bias is not None else None
    if bn is not None:
        s = torch.rsqrt(bn.running_var.double() + bn.eps)
        shift = -bn.running_mean.double() * s
        if bn.affine:
            s, shift = s * bn.weight.detach().double(), shift * bn.weight.detach().double()
            shift = shift + bn.bias.detach().double()
        b = shift if b is None else b * s + shift
        w = w * s.reshape(-1, *([1] * (w.dim() - 1)))
    return w.to(dtype), (b.to(dtype) if b is not None else None)


def _separable(chain, backend: str) -> nn.Module:
    from .torch import SeparableConv2d
    _, dw, bn1, act1, pw, bn2, act2 = chain
    dw_w, dw_b = _fold(dw.weight, dw.bias, bn1)
    pw_w, pw_b = _fold(pw.weight, pw.bias, bn2)
    m = SeparableConv2d(dw.channels, pw.out_channels, dw.kernel_size, dw.stride, dw.padding,
                        dw.dilation, bias=False, dw_activation=_activation_name(act1) if act1 else None,
                        activation=_activation_name(act2) if act2 else None,
                        multiplier=dw.multiplier, backend=backend, device="meta")
    m.dw_weight = nn.Parameter(dw_w)
    m.pw_weight = nn.Parameter(pw_w)
    m.bias = nn.Parameter(pw_b) if pw_b is not None else None
    m.dw_bias = nn.Parameter(dw_b) if dw_b is not None else None
    return m.eval()


def _fuse_atoms(atoms: list, backend: str):
    """``atoms`` with each chain replaced; also the list of (start, end) of the chains."""
    out, spans, i = [], [], 0
    while i < len(atoms):
        chain = _match_chain(atoms, i)
        if chain is None:
            out.append(atoms[i])
            i += 1
        else:
            out.append(_separable(chain, backend))
            spans.append((i, chain[0]))
            i = chain[0]
    return out, spans


def _refill(seq: nn.Sequential, modules: list) -> None:
    """Make ``seq`` hold ``modules`` (keys "0", "1", ...)."""
    seq._modules.clear()
    for k, m in enumerate(modules):
        seq.add_module(str(k), m)


class _FusedResidualBlock(nn.Module):
    """An inverted-residual block whose last chain is fused with the block's addition:
    ``sep(head(x), residual=x)``."""

    def __init__(self, head: nn.Sequential, sep: nn.Module):
        super().__init__()
        self.head, self.sep = head, sep

    def forward(self, x):
        return self.sep(self.head(x), residual=x)


def _fuse_timm_block(module: nn.Module, name: str, parts, backend: str,
                     report: ConvertReport) -> Optional[nn.Module]:
    """The replacement of a timm block whose chain can fuse (with the input addition as the
    residual when the block has one and ends with the chain), or None."""
    if getattr(module, "conv_s2d", None) is not None:
        return None
    atoms = [getattr(module, p) for p in parts]
    atoms = [a for a in atoms if not isinstance(a, nn.Identity)]
    fused, spans = _fuse_atoms(atoms, backend)
    if not spans:
        return None
    where = name or "<model>"
    if getattr(module, "has_skip", False):
        if spans[-1][1] != len(atoms):
            return None
        report.fused.extend(f"{where}[{a}:{b}]" for a, b in spans[:-1])
        report.fused.append(f"{where}[{spans[-1][0]}:{spans[-1][1]}]+residual")
        return _FusedResidualBlock(nn.Sequential(*fused[:-1]), fused[-1]).eval()
    report.fused.extend(f"{where}[{a}:{b}]" for a, b in spans)
    return nn.Sequential(*fused).eval()


def _fuse(module: nn.Module, name: str, backend: str, report: ConvertReport) -> nn.Module:
    """``module`` with its chains fused (possibly a new module that replaces it)."""
    parts = _TIMM_BLOCKS.get((type(module).__module__, type(module).__name__))
    if parts is not None:
        new = _fuse_timm_block(module, name, parts, backend, report)
        if new is not None:
            return new
    kind = _RESIDUAL_BLOCKS.get((type(module).__module__, type(module).__name__))
    if kind is not None:
        body = getattr(module, kind[0], None)
        if _is_plain_sequential(body) and getattr(module, kind[1], False):
            atoms = _flatten(body)
            fused, spans = _fuse_atoms(atoms, backend)
            if spans and spans[-1][1] == len(atoms):  # the body ends with a chain
                where = f"{name}.{kind[0]}" if name else kind[0]
                report.fused.extend(f"{where}[{a}:{b}]" for a, b in spans[:-1])
                report.fused.append(f"{where}[{spans[-1][0]}:{spans[-1][1]}]+residual")
                block = _FusedResidualBlock(nn.Sequential(*fused[:-1]), fused[-1]).eval()
                return _fuse(block, name, backend, report)
    if _is_plain_sequential(module):
        fused, spans = _fuse_atoms(_flatten(module), backend)
        if spans:
            report.fused.extend(f"{name}[{a}:{b}]" for a, b in spans)
            _refill(module, fused)
    for child_name, child in list(module.named_children()):
        full = f"{name}.{child_name}" if name else child_name
        new = _fuse(child, full, backend, report)
        if new is not child:
            setattr(module, child_name, new)
    return module


def convert(model: nn.Module, *, fuse: bool = False, inplace: bool = False, backend: str = "auto",
            verbose: bool = False) -> nn.Module:
    """Replace the depthwise convolutions of a PyTorch ``model`` by dwops layers.

    Every ``nn.Conv2d`` with ``groups == in_channels`` (any multiplier, kernel size, stride,
    padding including ``"same"``, dilation, bias) and ``padding_mode="zeros"`` becomes a
    :class:`DepthwiseConv2d` that holds the same ``weight``/``bias`` Parameter objects, so the
    state dict keys, optimizers and ``torch.compile`` keep working and training gives the same
    results. Other grouped convolutions, other padding modes and ``Conv2d`` subclasses are left
    alone and listed in the report.

    ``fuse=True`` (the model must be in eval mode) also replaces each chain ``depthwise ->
    [BatchNorm2d] -> [activation] -> 1x1 conv -> [BatchNorm2d] -> [activation]`` found in an
    ``nn.Sequential`` (through nested plain Sequentials such as ``Conv2dNormActivation``) by one
    :class:`SeparableConv2d` with the BatchNorms folded in, and fuses the input addition of
    torchvision's inverted-residual blocks (MobileNetV2/V3, MNASNet) as its residual; timm's
    ``InvertedResidual`` and ``DepthwiseSeparableConv`` blocks (``BatchNormAct2d`` included)
    likewise. Activations
    fuse when dwops has them (:data:`dwops._spec.ACTIVATIONS`; ``nn.GELU`` only with
    ``approximate="none"``); the fused model is for inference (its state dict keys differ).

    ``inplace=False`` converts a deep copy. Converting a converted model changes nothing. The
    :class:`ConvertReport` is attached as ``model.dwops_report``; ``verbose=True`` prints its
    one-line summary. Returns the converted model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be a torch.nn.Module, got {type(model).__name__}")
    if fuse and any(m.training for m in model.modules()):
        raise ValueError("convert: fuse=True folds BatchNorm running statistics and needs the "
                         "model in eval mode; call model.eval() first (or convert without fuse "
                         "for training)")
    if not inplace:
        model = copy.deepcopy(model)
    report = ConvertReport()
    model = _convert_depthwise(model, backend, report)
    if fuse:
        model = _fuse(model, "", backend, report)
    model.dwops_report = report
    if verbose:
        print(report.summary())
    return model
