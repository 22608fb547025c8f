"""dwops.torch.convert on torchvision and timm networks: values (fp32, bf16), fusion, training,
channels_last, torch.compile, idempotence, the report, state dicts.

Networks are built with random weights (never downloaded), reduced widths and tiny inputs, and
their BatchNorm running statistics randomized so that folding them is tested. Each network is
built once per module.
"""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch", reason="dwops.torch needs PyTorch")
torchvision = pytest.importorskip("torchvision", reason="the network tests need torchvision "
                                  "(pip install -e '.[models]')")
timm = pytest.importorskip("timm", reason="the network tests need timm (pip install -e '.[models]')")
import dwops.torch as dt  # noqa: E402
from torch import nn  # noqa: E402
from torchvision import models as tvm  # noqa: E402

BATCH = 2


def _randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    """Random BatchNorm statistics and affine parameters (fresh ones are 0/1: folding them would
    test nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return model


def _tiny_convnext():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    setting = [CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)]
    return ConvNeXt(setting, stochastic_depth_prob=0.0, num_classes=10)


def _tiny_convmixer():
    from timm.models.convmixer import ConvMixer
    return ConvMixer(dim=32, depth=2, kernel_size=5, patch_size=4, num_classes=10)


# name -> (builder, input size, expected number of fused chains (None: not checked))
NETWORKS = {
    "mobilenet_v2": (lambda: tvm.mobilenet_v2(weights=None, width_mult=0.25, num_classes=10),
                     32, 17),
    "mobilenet_v3_large": (lambda: tvm.mobilenet_v3_large(weights=None, width_mult=0.25,
                                                          num_classes=10), 32, None),
    "efficientnet_b0": (lambda: tvm.efficientnet_b0(weights=None, num_classes=10), 32, 0),
    "mnasnet1_0": (lambda: tvm.mnasnet0_5(weights=None, num_classes=10), 32, 17),
    "convnext_tiny": (_tiny_convnext, 32, 0),
    "timm_mobilenetv2_100": (lambda: timm.create_model("mobilenetv2_100", pretrained=False,
                                                       num_classes=10), 32, 17),
    "convmixer": (_tiny_convmixer, 32, 0),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """PyTorch and Numba on one thread each. The networks are tiny, and in a converted network
    PyTorch and dwops layers alternate: the OpenMP workers of one spin-wait after each parallel
    region while the other's run, which made PyTorch's layers 10-40x slower here."""
    import numba
    n_torch, n_numba = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    yield
    torch.set_num_threads(n_torch)
    numba.set_num_threads(n_numba)


@pytest.fixture(scope="module")
def nets():
    """name -> (original model in eval mode, input), built lazily and shared by the tests."""
    cache = {}

    def get(name):
        if name not in cache:
            build, size, _ = NETWORKS[name]
            torch.manual_seed(sum(map(ord, name)))
            model = _randomize_bn(build(), len(name)).eval()
            x = torch.rand(BATCH, 3, size, size) * 2 - 1
            cache[name] = (model, x)
        return cache[name]
    return get


def _err(y, y64):
    """Largest error relative to the output's magnitude."""
    return ((y.double() - y64).abs().max() / y64.abs().max()).item()


def _check_network(model, x, converted, dtype):
    """``converted`` (already in ``dtype``) agrees with ``model`` run in ``dtype``.

    Whole-network rule. The per-op rule (DESIGN: a 16-bit result within 2x the error of the
    reference computed in that dtype) does not carry over layer by layer, since each layer's
    rounding errors pass through all later layers. Both runs are compared against the float64 run
    of the original network, the closest thing to the exact result: dwops's error may be at most
    4x PyTorch's own error in ``dtype`` (2x per op as in DESIGN, and 2x for the different rounding
    order of the accumulations and for the BatchNorms folded into the weights, which moves the
    rounding of each fused layer), plus 4 units of the dtype's epsilon for outputs where PyTorch
    happens to round almost exactly.
    """
    with torch.no_grad():
        y64 = copy.deepcopy(model).double()(x.double())
        ours = converted(x.to(dtype))
        theirs = copy.deepcopy(model).to(dtype)(x.to(dtype))
    assert ours.shape == y64.shape and ours.dtype == dtype
    eps = torch.finfo(dtype).eps
    e_ours, e_theirs = _err(ours, y64), _err(theirs, y64)
    assert e_ours <= 4 * e_theirs + 4 * eps, (e_ours, e_theirs)


@pytest.mark.parametrize("name", list(NETWORKS))
def test_network_outputs(nets, name):
    model, x = nets(name)
    conv = dt.convert(model)
    rep = conv.dwops_report
    assert rep.converted and not rep.fused and not rep.skipped
    assert not any(type(m) is nn.Conv2d and m.groups == m.in_channels > 1 for m in conv.modules())
    # the original is untouched (inplace=False)
    assert any(type(m) is nn.Conv2d and m.groups == m.in_channels > 1 for m in model.modules())
    _check_network(model, x, conv, torch.float32)
    fused = dt.convert(model, fuse=True)
    expected = NETWORKS[name][2]
    if expected is not None:
        assert len(fused.dwops_report.fused) == expected, fused.dwops_report.fused
    _check_network(model, x, fused, torch.float32)
    if name in ("mobilenet_v2", "convnext_tiny"):  # bf16 on two networks (time)
        bf = copy.deepcopy(model).to(torch.bfloat16)
        _check_network(model, x, dt.convert(bf), torch.bfloat16)
        _check_network(model, x, dt.convert(bf, fuse=True), torch.bfloat16)


def test_fused_structure(nets):
    """MobileNetV2: every block's dw -> BN -> ReLU6 -> 1x1 -> BN is one SeparableConv2d, the
    residual blocks' addition fused too; MobileNetV3 fuses only the blocks without
    squeeze-excitation between its depthwise and 1x1 layers."""
    model, _ = nets("mobilenet_v2")
    fused = dt.convert(model, fuse=True)
    seps = [m for m in fused.modules() if isinstance(m, dt.SeparableConv2d)]
    assert len(seps) == 17
    assert all(s.dw_activation == "relu6" and s.activation is None for s in seps)
    n_res = sum(1 for m in model.modules() if getattr(m, "use_res_connect", False))
    assert sum(r.endswith("+residual") for r in fused.dwops_report.fused) == n_res >= 10
    assert not any(isinstance(m, dt.DepthwiseConv2d) for m in fused.modules())

    def n_bn(m):
        return sum(isinstance(b, nn.BatchNorm2d) for b in m.modules())
    assert n_bn(fused) == n_bn(model) - 2 * 17  # both BatchNorms of each chain folded
    m3, _ = nets("mobilenet_v3_large")
    f3 = dt.convert(m3, fuse=True)
    from dwops._convert import _activation_name
    # fusable: no squeeze-excitation after the depthwise layer, and its activation (ReLU or
    # Hardswish) one that dwops has
    fusable = [b for b in m3.features[1:-1]
               if not any(type(m).__name__ == "SqueezeExcitation" for m in b.modules())
               and _activation_name(b.block[-2][-1])]
    assert len(f3.dwops_report.fused) == len(fusable) > 0
    acts = {s.dw_activation for s in f3.modules() if isinstance(s, dt.SeparableConv2d)}
    assert {"relu", "hardswish"} <= acts


def test_timm_blocks_fused(nets):
    """timm MobileNetV2: its DepthwiseSeparableConv and every InvertedResidual block fuse, each
    BatchNormAct2d folded together with its ReLU6, the skip additions as the residual; a
    BatchNormAct2d whose activation dwops lacks stops the chain."""
    model, x = nets("timm_mobilenetv2_100")
    fused = dt.convert(model, fuse=True)
    seps = [m for m in fused.modules() if isinstance(m, dt.SeparableConv2d)]
    assert len(seps) == 17
    assert all(s.dw_activation == "relu6" and s.activation is None for s in seps)
    n_skip = sum(1 for m in model.modules() if getattr(m, "has_skip", False))
    assert sum(r.endswith("+residual") for r in fused.dwops_report.fused) == n_skip >= 10
    assert not any(isinstance(m, dt.DepthwiseConv2d) for m in fused.modules())
    block = copy.deepcopy(model.blocks[1][1])
    block.bn2.act = nn.LeakyReLU()
    block.eval()
    assert not dt.convert(block, fuse=True).dwops_report.fused


def test_gelu_tanh_not_fused():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.GELU(approximate="tanh"),
                        nn.Conv2d(4, 6, 1), nn.GELU()).eval()
    fused = dt.convert(seq, fuse=True)
    sep = [m for m in fused.modules() if isinstance(m, dt.SeparableConv2d)]
    assert not sep  # the tanh GELU sits between the two convolutions: no chain
    seq[1] = nn.GELU().eval()
    fused = dt.convert(seq, fuse=True)
    (sep,) = [m for m in fused.modules() if isinstance(m, dt.SeparableConv2d)]
    assert sep.dw_activation == "gelu" and sep.activation == "gelu"
    x = torch.rand(2, 4, 7, 9) - 0.5
    with torch.no_grad():
        torch.testing.assert_close(fused(x), seq(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["mobilenet_v2", "convnext_tiny"])
def test_training_step(nets, name):
    """The converted (unfused) network in train mode: same loss, same gradients, and an optimizer
    step on the converted model moves the same Parameter objects (float64: exact up to
    summation order)."""
    model, x = nets(name)
    ours = copy.deepcopy(model).double().train()
    theirs = copy.deepcopy(model).double().train()
    dt.convert(ours, inplace=True)
    opt = torch.optim.SGD(ours.parameters(), lr=0.1)  # built after: same objects either way
    target = torch.arange(BATCH) % 10
    losses, grads = [], []
    for m in (ours, theirs):
        torch.manual_seed(1)  # dropout masks
        loss = nn.functional.cross_entropy(m(x.double()), target)
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad for n, p in m.named_parameters()})
    assert losses[0] == pytest.approx(losses[1], rel=1e-12)
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-9, atol=1e-12, msg=n)
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    opt.step()
    for n, p in ours.named_parameters():
        torch.testing.assert_close(p.detach(), before[n] - 0.1 * grads[0][n])


def test_shares_parameters_and_state_dict(nets):
    model, x = nets("mobilenet_v2")
    orig = copy.deepcopy(model)
    ids = {n: id(p) for n, p in orig.named_parameters()}
    conv = dt.convert(orig, inplace=True)
    assert conv is orig
    assert {n: id(p) for n, p in conv.named_parameters()} == ids
    sd = conv.state_dict()
    assert list(sd) == list(model.state_dict())
    fresh = tvm.mobilenet_v2(weights=None, width_mult=0.25, num_classes=10).eval()
    fresh.load_state_dict(sd)  # a converted model's state dict loads into the original
    back = dt.convert(tvm.mobilenet_v2(weights=None, width_mult=0.25, num_classes=10).eval())
    back.load_state_dict(model.state_dict())  # and the other way
    with torch.no_grad():
        torch.testing.assert_close(back(x), fresh(x), rtol=1e-5, atol=1e-5)


def test_idempotent(nets):
    model, _ = nets("mobilenet_v2")
    once = dt.convert(model)
    twice = dt.convert(once)
    assert twice.dwops_report.converted == [] and repr(twice) == repr(once)
    fused = dt.convert(once, fuse=True)  # fusing a converted model works
    assert len(fused.dwops_report.fused) == 17
    again = dt.convert(fused, fuse=True)
    rep = again.dwops_report
    assert rep.converted == [] and rep.fused == [] and repr(again) == repr(fused)


def test_unsupported_layers_reported(capsys):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1, groups=2),                              # grouped
        nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="reflect"),      # reflect padding
        nn.Conv2d(8, 16, 3, padding="same", dilation=2, groups=8, bias=False),  # taken, M=2
        nn.Conv2d(16, 16, (3, 5), stride=2, padding=(0, 2), groups=16),        # taken
    ).eval()
    conv = dt.convert(model, verbose=True)
    rep = conv.dwops_report
    assert rep.converted == ["2", "3"]
    assert [n for n, _ in rep.skipped] == ["0", "1"]
    assert "groups=2" in rep.skipped[0][1] and "reflect" in rep.skipped[1][1]
    assert type(conv[0]) is nn.Conv2d and type(conv[1]) is nn.Conv2d
    assert conv[2].multiplier == 2 and conv[2].bias is None
    out = capsys.readouterr().out
    assert "2 depthwise conv(s) converted" in out and "reflect" in out
    x = torch.rand(2, 4, 11, 13) - 0.5
    with torch.no_grad():
        torch.testing.assert_close(conv(x), model(x), rtol=1e-5, atol=1e-6)


def test_fuse_needs_eval_mode(nets):
    model, _ = nets("mobilenet_v2")
    with pytest.raises(ValueError, match="eval"):
        dt.convert(copy.deepcopy(model).train(), fuse=True)
    with pytest.raises(TypeError):
        dt.convert("not a module")


def test_channels_last(nets, monkeypatch):
    """A channels_last model and input run the ops on the NHWC view: no transposes, and the
    output stays channels_last."""
    import dwops._api as api
    model, x = nets("mobilenet_v2")
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    xc = x.to(memory_format=torch.channels_last)
    seen = []
    for fn in ("depthwise_conv2d", "separable_conv2d"):
        real = getattr(api, fn)

        def spy(x, *args, _real=real, **kw):
            # a 1x1 plane is NCHW- and NHWC-contiguous alike: it runs as NCHW, no copy either way
            seen.append(("NHWC or 1x1" if kw["layout"] == "NHWC" or x.shape[2:] == (1, 1)
                         else "NCHW", x.is_contiguous()))
            return _real(x, *args, **kw)
        monkeypatch.setattr(api, fn, spy)
    for fuse in (False, True):
        seen.clear()
        conv = dt.convert(cl, fuse=fuse)
        with torch.no_grad():
            feats = conv.features(xc)
            y = conv(xc)
        assert feats.is_contiguous(memory_format=torch.channels_last)
        assert len(seen) == 2 * 17 and set(seen) == {("NHWC or 1x1", True)}
        _check_network(model, x, lambda t: conv(t.to(memory_format=torch.channels_last)),
                       torch.float32)
        del y
    # training through the NHWC path: gradients match the NCHW path
    a = dt.convert(copy.deepcopy(model).double().train())
    b = copy.deepcopy(a).to(memory_format=torch.channels_last)
    xa = x.double().requires_grad_()
    xb = x.double().to(memory_format=torch.channels_last).requires_grad_()
    torch.manual_seed(2)  # the same dropout masks
    a(xa).square().sum().backward()
    torch.manual_seed(2)
    b(xb).square().sum().backward()
    # float64; the BatchNorms sum their batch statistics in another order for channels_last
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-9, atol=1e-10)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-9, atol=1e-10, msg=n)


def test_torch_compile(nets):
    model, x = nets("convmixer")
    conv = dt.convert(model)
    compiled = torch.compile(conv, fullgraph=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), conv(x), rtol=1e-5, atol=1e-5)
