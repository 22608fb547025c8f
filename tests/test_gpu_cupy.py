"""The cupy backend on a real GPU (``pytest -m gpu``; skipped without one).

Every op and dtype against the NumPy reference on odd and realistic sizes, both layouts, every
padding form, strides, dilation and multiplier; outputs poisoned with NaN before the launch so an
element a kernel forgets to write fails; non-contiguous inputs; cupy cross-checked against numba;
PyTorch CUDA tensors (bfloat16 included) on a non-default stream.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import dwops
from dwops import _spec
from tests.conftest import EMULATED, assert_close, gpu, rand

# Under DWOPS_CUDAEMU=1 (tests/test_cupy_emulated.py) "cupy" is the CPU emulator of dwops/cudaemu:
# the kernel tests run there; tests that need a real device (other libraries' GPU arrays, numba)
# skip.
pytestmark = [pytest.mark.gpu] + ([] if EMULATED else [gpu])

# Emulator groups: tests/test_cupy_emulated.py runs each group of this file in its own process
# under the emulator, selected by its mark (-m). Every test carries exactly one group mark, or is
# real_gpu (never emulated); tests/test_cupy_emulated.py checks that. The groups have similar
# emulated cost: emu_grads_random (depthwise gradients, seeded random problems),
# emu_forward_pointwise_separable (forward, pointwise, separable, every specialization),
# emu_conv1d (the 1-d op).


def real_gpu(test):
    """Needs a real GPU (other libraries' device arrays, numba): skipped under the emulator, and in
    no emulator group."""
    return pytest.mark.real_gpu(
        pytest.mark.skipif(EMULATED, reason="needs a real GPU (not the emulator)")(test))


# Module-level: every test here launches the cupy backend's kernels (on a GPU, or in the emulator,
# which stands in for the cupy module).
cupy = pytest.importorskip("cupy", reason="the cupy backend needs CuPy")

DTYPES = ("float16", "bfloat16", "float32", "float64")


def _backend():
    from dwops.kernels import cupy_backend

    reason = cupy_backend.BACKEND.unavailable_reason()
    if reason:
        pytest.skip(reason)
    return cupy_backend.BACKEND


def _dev(a, dtype):
    """A CuPy array holding ``a`` (bfloat16 as its uint16 bits, as the backend keeps it)."""
    a = np.ascontiguousarray(a)
    if dtype == "bfloat16":
        a = a.view(np.uint16)
    return cupy.asarray(a)


def _host(a, dtype):
    h = cupy.asnumpy(a)
    return h.view(dwops._registry.numpy_dtype("bfloat16")) if dtype == "bfloat16" else h


def _poisoned(shape, dtype):
    if dtype == "bfloat16":
        return cupy.full(shape, 0x7FC0, dtype=np.uint16)   # bfloat16 NaN
    return cupy.full(shape, np.nan, dtype=dwops._registry.numpy_dtype(dtype))


def _f64(a):
    return None if a is None else np.asarray(a).astype(np.float64)


DW_CASES = [
    # (N, C, H, W, M, (KH, KW), stride, dilation, padding)
    (2, 3, 17, 19, 1, (3, 3), 1, 1, "same"),
    (1, 32, 56, 56, 1, (3, 3), 1, 1, 1),
    (2, 24, 28, 28, 1, (5, 5), 2, 1, "same"),
    (1, 16, 14, 14, 1, (7, 7), 1, 1, 3),
    (3, 5, 13, 11, 2, (3, 3), (2, 3), (1, 2), ((0, 2), (1, 3))),
    (1, 8, 31, 33, 1, (1, 1), 1, 1, 0),
    (1, 4, 40, 37, 1, (9, 9), 1, 1, "same"),
    (1, 2, 45, 47, 1, (31, 31), 1, 1, 15),
    (2, 6, 23, 29, 3, (3, 5), 1, (2, 1), "valid"),
    (1, 64, 9, 129, 1, (3, 3), 3, 2, (1, 2)),
    (1, 3, 5, 7, 1, (3, 3), 2, 1, 0),
    # strided input gradient: every phase path (stride 2 with K = 3 / 5 compile-time taps, odd and
    # even dilation, stride 3 with whole vectors), asymmetric padding, M > 1, odd sizes
    (2, 6, 15, 17, 2, (3, 3), 2, 1, ((1, 0), (0, 1))),
    (1, 5, 19, 22, 1, (5, 5), 2, 3, ((4, 2), (5, 3))),
    (2, 8, 14, 13, 1, (3, 3), 2, 2, ((2, 1), (1, 2))),
    (1, 16, 20, 47, 1, (5, 5), 3, 1, 2),
]


def _dw_problem(case, layout, dtype, activation=None, bias=False, rng=None):
    n, c, h, w, m, k, s, d, pad = case
    x = rand(rng, _spec._physical(layout, n, c, h, w), dtype)
    wt = rand(rng, (c * m, 1, *k), dtype)
    b = rand(rng, (c * m,), dtype) if bias else None
    p, _ = _spec.depthwise("t", x, wt, b, s, pad, d, layout, activation)
    return p, x, wt, b


def _ref_kw(p):
    return dict(stride=(p.sh, p.sw), dilation=(p.dh, p.dw), padding=((p.pt, p.pb), (p.pl, p.pr)),
                layout=p.layout)


def _abs(a):
    return None if a is None else np.abs(_f64(a))


def _check_dw_forward(be, p, x, w, b, act, dtype):
    """The backend's forward (poisoned output) against the reference, error relative to the
    forward of the magnitudes."""
    kw = _ref_kw(p)
    out = _poisoned(p.y_shape, dtype)
    be.depthwise_forward(p, _dev(x, dtype), _dev(w, dtype), None if b is None else _dev(b, dtype),
                         out, stream=0)
    ref = dwops.reference.depthwise_conv2d(x, w, b, activation=act, **kw)
    scale = dwops.reference.depthwise_conv2d(_abs(x), _abs(w), _abs(b), **kw)
    assert_close(_host(out, dtype), ref, dtype, scale=np.maximum(scale, 1e-3),
                 what=f"forward {p}")


def _check_dw_grads(be, p, x, w, gy, dtype):
    """grad_input and grad_weight (poisoned outputs) against the reference."""
    _check_dw_grad_input(be, p, w, gy, dtype)
    _check_dw_grad_weight(be, p, x, gy, dtype)


def _check_dw_grad_input(be, p, w, gy, dtype):
    kw = _ref_kw(p)
    gx = _poisoned(p.x_shape, dtype)
    be.depthwise_grad_input(p, _dev(gy, dtype), _dev(w, dtype), gx, stream=0)
    ref = dwops.reference.depthwise_conv2d_grad_input(gy, w, p.x_shape, **kw)
    scale = dwops.reference.depthwise_conv2d_grad_input(_abs(gy), _abs(w), p.x_shape, **kw)
    assert_close(_host(gx, dtype), ref, dtype, scale=np.maximum(scale, 1e-3),
                 what=f"grad_input {p}")


def _check_dw_grad_weight(be, p, x, gy, dtype):
    kw = _ref_kw(p)
    gw = _poisoned(p.w_shape, dtype)
    be.depthwise_grad_weight(p, _dev(x, dtype), _dev(gy, dtype), gw, stream=0)
    ref = dwops.reference.depthwise_conv2d_grad_weight(x, gy, p.w_shape, **kw)
    scale = dwops.reference.depthwise_conv2d_grad_weight(_abs(x), _abs(gy), p.w_shape, **kw)
    assert_close(_host(gw, dtype), ref, dtype, scale=np.maximum(scale, 1e-3),
                 what=f"grad_weight {p}")


# Tiles whose shared memory fits some device profiles only (dwops.kernels.cupy_device.PROFILES):
# the 31x31 kernel dilated by 6 stages tiles over 181 pixels square (its grad_input 226 KiB at
# the H200's plan, 149 KiB with a smaller block at the A100's; no plan on the RTX 4090 or the
# 48 KiB device); the others shrink their tiles on the small devices and change their
# grad_weight splits with the SM count.
PROFILE_CASES = [
    # (N, C, H, W, M, (KH, KW), stride, dilation, padding), layout, dtype
    ((1, 2, 190, 196, 1, (31, 31), 1, 6, 0), "NCHW", "float32"),
    ((1, 3, 41, 44, 1, (31, 31), 1, 2, 30), "NHWC", "float32"),
    ((2, 5, 29, 33, 2, (13, 13), 2, 1, 6), "NCHW", "bfloat16"),
    ((2, 40, 23, 21, 1, (7, 7), 1, 1, 3), "NHWC", "float16"),
]


@pytest.fixture
def device_profile(monkeypatch):
    """device_profile(name): the backend plans for profile ``name`` from here on. Under the
    emulator the stand-in device becomes that profile (its launch limits included); on a GPU the
    backend reads the profile instead of the device (skipped where the device grants less)."""
    import contextlib

    from dwops.kernels import cupy_device

    stack = contextlib.ExitStack()

    def use(name):
        prof = cupy_device.PROFILES[name]
        if EMULATED:
            from dwops import cudaemu

            stack.enter_context(cudaemu.device(name))
        else:
            real = cupy_device.limits()
            if prof.smem_optin > real.smem_optin:
                pytest.skip(f"{real.name} grants less shared memory than the {name} profile")
            monkeypatch.setattr(cupy_device, "limits", lambda ordinal=None: prof)
        return prof

    with stack:
        yield use


@pytest.mark.emu_forward_pointwise_separable
def test_the_profiling_script_runs_every_kernel_family():
    """scripts/profile_subset.py (what gpu_check.sh hands to Nsight Compute) on tiny shapes: every
    op runs on the cupy backend."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                        "profile_subset.py")
    spec = importlib.util.spec_from_file_location("profile_subset", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    labels = mod.profile(small=True)
    assert len(labels) == len(set(labels)) >= 2 * (5 + 2) + 2, labels


@pytest.mark.emu_grads_random
@pytest.mark.parametrize("profile", ["h200", "a100", "rtx4090", "min"])
@pytest.mark.parametrize("case, layout, dtype", PROFILE_CASES)
def test_plans_of_every_device_profile_run(device_profile, profile, case, layout, dtype):
    """Forward, grad_input and grad_weight planned for each device profile: every launch within
    the profile's shared memory and correct, or, where no plan fits, the backend declines the
    problem (``prefers`` False: ``backend="auto"`` takes another) instead of launching."""
    from dwops.kernels import cupy_plans as plans

    be = _backend()
    dev = device_profile(profile)
    rng = np.random.default_rng(7)
    p, x, w, _ = _dw_problem(case, layout, dtype, rng=rng)
    gy = rand(rng, p.y_shape, dtype)
    ops = {
        "depthwise_forward": lambda: [plans.plan_dw_forward(
            plans.conv_of_forward(p), dtype, layout, dev=dev)],
        "depthwise_grad_input": lambda: [plans.plan_dw_grad_input(p, layout, dev=dev)],
        "depthwise_grad_weight": lambda: list(plans.plan_dw_grad_weight(p, layout, dev=dev)[:2]),
    }
    ran = 0
    for op, plan in ops.items():
        try:
            launches = plan()
        except NotImplementedError:
            assert not be.prefers(op, p), (profile, op)
            continue
        assert be.prefers(op, p), (profile, op)
        for L in launches:
            assert L.shared <= dev.smem_optin and dev.occupancy(math.prod(L.block), L.shared) >= 1
        if op == "depthwise_forward":
            _check_dw_forward(be, p, x, w, None, None, dtype)
        elif op == "depthwise_grad_input":
            _check_dw_grad_input(be, p, w, gy, dtype)
        else:
            _check_dw_grad_weight(be, p, x, gy, dtype)
        ran += 1
    big = case[5] == (31, 31) and case[7] == 6
    assert ran == (3 if not big or profile in ("h200", "a100") else 0), (profile, ran)


def _check_pointwise(be, p, x, w, b, r, act, gy, dtype):
    """Pointwise forward (with its epilogue), grad_input and grad_weight against the reference."""
    lay = p.layout
    out = _poisoned(p.y_shape, dtype)
    be.pointwise_forward(p, _dev(x, dtype), _dev(w, dtype), None if b is None else _dev(b, dtype),
                         None if r is None else _dev(r, dtype), out, stream=0)
    ref = dwops.reference.pointwise_conv2d(x, w, b, layout=lay, activation=act, residual=r)
    scale = dwops.reference.pointwise_conv2d(_abs(x), _abs(w), _abs(b), layout=lay,
                                             residual=_abs(r))
    assert_close(_host(out, dtype), ref, dtype, scale=np.maximum(scale, 1e-3), what="pw forward")
    gx = _poisoned(p.x_shape, dtype)
    be.pointwise_grad_input(p, _dev(gy, dtype), _dev(w, dtype), gx, stream=0)
    ref = dwops.reference.pointwise_conv2d_grad_input(gy, w, layout=lay)
    scale = dwops.reference.pointwise_conv2d_grad_input(_abs(gy), _abs(w), layout=lay)
    assert_close(_host(gx, dtype), ref, dtype, scale=np.maximum(scale, 1e-3), what="pw grad_input")
    gw = _poisoned((p.CO, p.CI), dtype)
    be.pointwise_grad_weight(p, _dev(x, dtype), _dev(gy, dtype), gw, stream=0)
    ref = dwops.reference.pointwise_conv2d_grad_weight(x, gy, layout=lay)
    scale = dwops.reference.pointwise_conv2d_grad_weight(_abs(x), _abs(gy), layout=lay)
    assert_close(_host(gw, dtype), ref, dtype, scale=np.maximum(scale, 1e-3), what="pw grad_weight")


@pytest.mark.emu_forward_pointwise_separable
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(DW_CASES)))
def test_depthwise_forward(case, dtype, layout, rng):
    be = _backend()
    act = (None, "relu", "relu6", "silu", "gelu")[case % 5]
    p, x, w, b = _dw_problem(DW_CASES[case], layout, dtype, act, bias=case % 2 == 0, rng=rng)
    _check_dw_forward(be, p, x, w, b, act, dtype)


@pytest.mark.emu_grads_random
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(DW_CASES)))
def test_depthwise_grads(case, dtype, layout, rng):
    be = _backend()
    p, x, w, _ = _dw_problem(DW_CASES[case], layout, dtype, rng=rng)
    _check_dw_grads(be, p, x, w, rand(rng, p.y_shape, dtype), dtype)


PW_CASES = [(2, 3, 5, 7, 9), (1, 64, 128, 28, 28), (4, 130, 33, 5, 3), (1, 1, 1, 1, 1),
            (2, 256, 256, 14, 14)]


@pytest.mark.emu_forward_pointwise_separable
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(PW_CASES)))
def test_pointwise_all_directions(case, dtype, layout, rng):
    be = _backend()
    n, ci, co, h, w_ = PW_CASES[case]
    act = (None, "relu", "gelu", "silu", "relu6")[case]
    x = rand(rng, _spec._physical(layout, n, ci, h, w_), dtype)
    w = rand(rng, (co, ci), dtype)
    b = rand(rng, (co,), dtype)
    r = rand(rng, _spec._physical(layout, n, co, h, w_), dtype)
    p, _ = _spec.pointwise("t", x, w, b, layout, act, r)
    _check_pointwise(be, p, x, w, b, r, act, rand(rng, p.y_shape, dtype), dtype)


SEP_CASES = [
    # (N, C, M, CO, H, W, K, stride, padding)
    (2, 8, 1, 16, 17, 19, 3, 1, "same"),      # fused
    (1, 32, 1, 32, 28, 28, 3, 1, "same"),     # the motivating block shape, fused
    (1, 6, 2, 5, 13, 9, 5, 2, 1),             # multiplier, stride, fused
    (1, 4, 1, 70, 9, 11, 7, 1, 3),            # two output-channel blocks
    (1, 3, 1, 4, 10, 12, 4, 1, "valid"),      # generic kernel size
    (1, 512, 1, 8, 6, 7, 3, 1, "same"),       # too many channels to fuse: unfused path
]


@pytest.mark.emu_forward_pointwise_separable
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(SEP_CASES)))
def test_separable(case, dtype, layout, rng):
    be = _backend()
    n, c, m, co, h, w_, k, s, pad = SEP_CASES[case]
    x = rand(rng, _spec._physical(layout, n, c, h, w_), dtype)
    dww = rand(rng, (c * m, 1, k, k), dtype)
    pww = rand(rng, (co, c * m), dtype)
    b = rand(rng, (co,), dtype)
    dwb = rand(rng, (c * m,), dtype)
    p, _ = _spec.separable("t", x, dww, pww, b, dwb, s, pad, 1, layout, "relu", "gelu", None)
    r = rand(rng, p.y_shape, dtype)
    p, _ = _spec.separable("t", x, dww, pww, b, dwb, s, pad, 1, layout, "relu", "gelu", r)
    out = _poisoned(p.y_shape, dtype)
    be.separable_forward(p, _dev(x, dtype), _dev(dww, dtype), _dev(pww, dtype), _dev(b, dtype),
                         _dev(dwb, dtype), _dev(r, dtype), out, stream=0)
    kw = _ref_kw(p.dw)
    ref = dwops.reference.separable_conv2d(x, dww, pww, b, dw_bias=dwb, dw_activation="relu",
                                           activation="gelu", residual=r, **kw)
    scale = dwops.reference.separable_conv2d(
        np.abs(_f64(x)), np.abs(_f64(dww)), np.abs(_f64(pww)), np.abs(_f64(b)),
        dw_bias=np.abs(_f64(dwb)), residual=np.abs(_f64(r)), **kw)
    assert_close(_host(out, dtype), ref, dtype, scale=scale, what="separable")


@pytest.mark.emu_forward_pointwise_separable
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("k", [1, 3, 5, 7])
def test_separable_unfused_16_bit(k, dtype, layout, aligned, rng, monkeypatch):
    """The unfused 16-bit separable forward (the fused tile limit set to 0, so small problems take
    it): dw_forward reads 16-bit x and writes its float32 result, pw_gemm reads that result and
    rounds once into the output. Every compile-time kernel size at stride 1, the generic path
    (stride 2, odd kernel) and the stride-2 path (square kernels, 16- and 8-byte vectors), with
    and without 16-byte vectors; bias, residual and activations
    varied. With test_separable's 512-channel case, every unfused instantiation runs."""
    from dwops.kernels import cupy_plans

    be = _backend()
    monkeypatch.setattr(cupy_plans, "SEP_SMEM_MAX", 0)
    c, w_, co = (16, 24, 9) if aligned else (7, 13, 5)
    acts = (None, "relu", "relu6", "silu", "gelu")
    forms = [((k, k), 1, k // 2, w_), ((k, 3 if k == 1 else k - 2), 2, "valid", w_)]
    if aligned and k > 1:   # the stride-2 forward with 16-byte (OW 16) and 8-byte (OW 12) vectors
        forms += [((k, k), 2, k // 2, 32), ((k, k), 2, k // 2, 24)]
    for i, (kk, stride, pad, w_) in enumerate(forms):
        x = rand(rng, _spec._physical(layout, 2, c, 9, w_), dtype)
        dww = rand(rng, (c, 1, *kk), dtype)
        pww = rand(rng, (co, c), dtype)
        b = rand(rng, (co,), dtype) if (k + i) % 2 else None
        dwb = rand(rng, (c,), dtype) if i == 0 else None
        dact, act = acts[(k + i) % 5], acts[(2 * k + i + 1) % 5]
        args = (stride, pad, 1, layout, dact, act)
        p, _ = _spec.separable("t", x, dww, pww, b, dwb, *args, None)
        r = rand(rng, p.y_shape, dtype) if (k + i + int(aligned)) % 2 else None
        p, _ = _spec.separable("t", x, dww, pww, b, dwb, *args, r)
        assert cupy_plans.plan_separable(p, layout) is None
        out = _poisoned(p.y_shape, dtype)
        be.separable_forward(p, _dev(x, dtype), _dev(dww, dtype), _dev(pww, dtype),
                             None if b is None else _dev(b, dtype),
                             None if dwb is None else _dev(dwb, dtype),
                             None if r is None else _dev(r, dtype), out, stream=0)
        kw = _ref_kw(p.dw)
        ref = dwops.reference.separable_conv2d(x, dww, pww, b, dw_bias=dwb, dw_activation=dact,
                                               activation=act, residual=r, **kw)
        scale = dwops.reference.separable_conv2d(_abs(x), _abs(dww), _abs(pww), _abs(b),
                                                 dw_bias=_abs(dwb), residual=_abs(r), **kw)
        assert_close(_host(out, dtype), ref, dtype, scale=np.maximum(scale, 1e-3),
                     what=f"unfused separable {p}")


@pytest.mark.emu_forward_pointwise_separable
@pytest.mark.parametrize("act,dtype,layout", [("hardswish", "float32", "NCHW"),
                                              ("hardsigmoid", "bfloat16", "NHWC"),
                                              ("hardswish", "float16", "NHWC")])
def test_hard_activations(act, dtype, layout, rng):
    """hardswish / hardsigmoid epilogues with pre-activations across -3 and 3 (inputs in [-4, 4]),
    a NaN and a -inf in the input: depthwise 3x3 forward, pointwise forward and the separable
    forward (both epilogues)."""
    be = _backend()
    x = rand(rng, _spec._physical(layout, 2, 5, 9, 11), dtype, -4.0, 4.0)
    x.flat[7], x.flat[50] = np.nan, -np.inf
    w, b = rand(rng, (5, 1, 3, 3), dtype), rand(rng, (5,), dtype)
    p, _ = _spec.depthwise("t", x, w, b, 1, "same", 1, layout, act)
    _check_dw_forward(be, p, x, w, b, act, dtype)
    pw, pb = rand(rng, (6, 5), dtype, -2.0, 2.0), rand(rng, (6,), dtype)
    p, _ = _spec.pointwise("t", x, pw, pb, layout, act, None)
    _check_pointwise(be, p, x, pw, pb, None, act, rand(rng, p.y_shape, dtype), dtype)
    x = rand(rng, x.shape, dtype, -4.0, 4.0)
    p, _ = _spec.separable("t", x, w, pw, pb, b, 1, "same", 1, layout, act, act, None)
    out = _poisoned(p.y_shape, dtype)
    be.separable_forward(p, _dev(x, dtype), _dev(w, dtype), _dev(pw, dtype), _dev(pb, dtype),
                         _dev(b, dtype), None, out, stream=0)
    kw = _ref_kw(p.dw)
    ref = dwops.reference.separable_conv2d(x, w, pw, pb, dw_bias=b, dw_activation=act,
                                           activation=act, **kw)
    assert np.min(ref) < 0.5 < np.max(ref)
    scale = dwops.reference.separable_conv2d(_abs(x), _abs(w), _abs(pw), _abs(pb), dw_bias=_abs(b),
                                             **kw)
    assert_close(_host(out, dtype), ref, dtype, scale=np.maximum(scale, 1e-3), what="separable")


def _random_depthwise(rng):
    """A random valid depthwise problem: small sizes (the emulator runs these too), every kernel
    size 1-7 square or not, stride and dilation 1-3, multiplier 1-3, explicit asymmetric or
    named padding, both layouts, every dtype."""
    while True:
        n, c, m = (int(v) for v in rng.integers(1, (4, 10, 4)))
        h, w = (int(v) for v in rng.integers(1, 24, 2))
        kh = int(rng.integers(1, 8))
        kw = kh if rng.random() < 0.6 else int(rng.integers(1, 8))
        s = tuple(int(v) for v in rng.integers(1, 4, 2)) if rng.random() < 0.5 else 1
        d = tuple(int(v) for v in rng.integers(1, 4, 2)) if rng.random() < 0.3 else 1
        pad = ["same", "valid", tuple((int(a), int(b)) for a, b in rng.integers(0, 4, (2, 2))),
               int(rng.integers(0, 4))][int(rng.integers(0, 4))]
        if pad == "same" and s != 1:
            pad = 1
        layout = ("NCHW", "NHWC")[int(rng.integers(0, 2))]
        dtype = DTYPES[int(rng.integers(0, 4))]
        try:
            x = rand(rng, _spec._physical(layout, n, c, h, w), dtype)
            wt = rand(rng, (c * m, 1, kh, kw), dtype)
            p, _ = _spec.depthwise("t", x, wt, None, s, pad, d, layout, None)
        except ValueError:      # output would be empty: draw again
            continue
        return p, x, wt, dtype


@pytest.mark.emu_forward_pointwise_separable
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 3, 5, 7])
def test_every_specialization(k, dtype, layout, aligned, rng):
    """Each compile-time kernel size with and without 16-byte vectors (rows / channels a multiple
    of 8 or not): forward with bias and activation, stride-1 and stride-2 grad_input, grad_weight,
    and the stride-2 forward (generic path). With the tests above, every instantiation of the
    kernel report runs (tests/test_cupy_emulated.py checks that under the emulator)."""
    be = _backend()
    c, w_ = (16, 32) if aligned else (7, 13)
    for stride in (1, 2):
        case = (1, c, 11, w_, 1, (k, k), stride, 1, k // 2)
        p, x, w, b = _dw_problem(case, layout, dtype, "relu6", bias=True, rng=rng)
        _check_dw_forward(be, p, x, w, b, "relu6", dtype)
        _check_dw_grads(be, p, x, w, rand(rng, p.y_shape, dtype), dtype)


def _at(d, offset):
    """A copy of the CuPy array ``d``, ``offset`` elements into a fresh buffer (a misaligned
    pointer for offsets that are not a multiple of the 16-byte vector)."""
    buf = cupy.empty(d.size + offset, dtype=d.dtype)
    out = buf[offset:].reshape(d.shape)
    out[...] = d
    return out


@pytest.mark.emu_forward_pointwise_separable
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [3, 5, 7])
def test_stride2_forward_widths_and_alignment(k, dtype, rng):
    """The NCHW stride-2 forward (the compile-time K = 3/5/7 path, phase-split tile) against the
    reference with bias and activation: two tiles per output row, asymmetric padding (both
    parities of the first input column), OW a multiple of half the vector only (8-byte
    vectors); and the rows that keep the generic path: odd OW with W a multiple of the vector,
    odd W, x or y at a misaligned pointer."""
    from dwops.kernels import cupy_plans

    be = _backend()
    v = cupy_plans.max_vec(dtype)
    h = k // 2
    cases = [((1, 2, 7, 80 * v, h), ((0, 0),)),                              # OW = 40 v
             ((2, 3, 11, 16 * v, ((0, k - 1), (k - 1, 0))), ((0, 0), (1, 0), (0, 1))),
             ((1, 2, 9, 16 * v, ((h, h), (h + 1, h - 1))), ((0, 0),)),     # odd first column
             ((1, 2, 9, 3 * v, h), ((0, 0),)),                              # OW = 1.5 v
             ((1, 2, 9, 4 * v, ((h, h), (h, h + 1))), ((0, 0),)),           # OW = 2 v + 1
             ((1, 3, 11, 23, h), ((0, 0),))]
    for (n, c, hh, ww, pad), offsets in cases:
        for xo, yo in offsets:
            p, x, w, b = _dw_problem((n, c, hh, ww, 1, (k, k), 2, 1, pad), "NCHW", dtype, "silu",
                                     bias=True, rng=rng)
            out = _at(_poisoned(p.y_shape, dtype), yo)
            be.depthwise_forward(p, _at(_dev(x, dtype), xo), _dev(w, dtype), _dev(b, dtype), out,
                                 stream=0)
            kw = _ref_kw(p)
            ref = dwops.reference.depthwise_conv2d(x, w, b, activation="silu", **kw)
            scale = dwops.reference.depthwise_conv2d(_abs(x), _abs(w), _abs(b), **kw)
            assert_close(_host(out, dtype), ref, dtype, scale=np.maximum(scale, 1e-3),
                         what=f"forward {p} x+{xo} y+{yo}")


@pytest.mark.emu_grads_random
@pytest.mark.parametrize("seed", range(48))
def test_random_depthwise_problems(seed):
    """Forward (random activation and bias), grad_input and grad_weight of random problems."""
    be = _backend()
    rng = np.random.default_rng(1000 + seed)
    p, x, w, dtype = _random_depthwise(rng)
    act = (None, "relu", "relu6", "silu", "gelu")[seed % 5]
    b = rand(rng, (p.CO,), dtype) if seed % 2 else None
    p, _ = _spec.depthwise("t", x, w, b, (p.sh, p.sw), ((p.pt, p.pb), (p.pl, p.pr)), (p.dh, p.dw),
                           p.layout, act)
    _check_dw_forward(be, p, x, w, b, act, dtype)
    _check_dw_grads(be, p, x, w, rand(rng, p.y_shape, dtype), dtype)


@pytest.mark.emu_grads_random
@pytest.mark.parametrize("seed", range(8))
def test_random_depthwise_backward(seed):
    """Backend.depthwise_backward (the single gradients and the bias reduction composed) with a
    random non-empty subset of outputs, poisoned, on random problems, against the reference."""
    be = _backend()
    rng = np.random.default_rng(5000 + seed)
    p, x, w, dtype = _random_depthwise(rng)
    gy = rand(rng, p.y_shape, dtype)
    flags = rng.random(3) < 0.5
    flags[seed % 3] = True
    shapes = (p.x_shape, p.w_shape, (p.CO,))
    outs = [_poisoned(s, dtype) if f else None for s, f in zip(shapes, flags)]
    be.depthwise_backward(p, _dev(x, dtype), _dev(gy, dtype), _dev(w, dtype), *outs, stream=0)
    need = dict(zip(("need_input", "need_weight", "need_bias"), (bool(f) for f in flags)))
    kw = _ref_kw(p)
    ref = dwops.reference.depthwise_conv2d_backward(x, gy, w, **kw, **need)
    scale = dwops.reference.depthwise_conv2d_backward(_abs(x), _abs(gy), _abs(w), **kw, **need)
    for name, got, r, sc in zip(need, outs, ref, scale):
        assert (got is None) == (r is None), name
        if got is not None:
            assert_close(_host(got, dtype), r, dtype, scale=np.maximum(sc, 1e-3),
                         what=f"{name} {p}")


@pytest.mark.emu_grads_random
@pytest.mark.parametrize("seed", range(24))
def test_random_separable_problems(seed):
    """The fused (or unfused) separable forward of random problems, every epilogue."""
    be = _backend()
    rng = np.random.default_rng(2000 + seed)
    p0, x, dww, dtype = _random_depthwise(rng)
    co = int(rng.integers(1, 80))
    pww = rand(rng, (co, p0.CO), dtype)
    b, dwb = rand(rng, (co,), dtype), rand(rng, (p0.CO,), dtype)
    acts = (None, "relu", "relu6", "silu", "gelu")
    dact, act = acts[seed % 5], acts[(seed // 2) % 5]
    args = ((p0.sh, p0.sw), ((p0.pt, p0.pb), (p0.pl, p0.pr)), (p0.dh, p0.dw), p0.layout, dact, act)
    p, _ = _spec.separable("t", x, dww, pww, b, dwb, *args, None)
    r = rand(rng, p.y_shape, dtype) if seed % 2 else None
    p, _ = _spec.separable("t", x, dww, pww, b, dwb, *args, r)
    out = _poisoned(p.y_shape, dtype)
    be.separable_forward(p, _dev(x, dtype), _dev(dww, dtype), _dev(pww, dtype), _dev(b, dtype),
                         _dev(dwb, dtype), None if r is None else _dev(r, dtype), out, stream=0)
    kw = _ref_kw(p.dw)
    ref = dwops.reference.separable_conv2d(x, dww, pww, b, dw_bias=dwb, dw_activation=dact,
                                           activation=act, residual=r, **kw)
    scale = dwops.reference.separable_conv2d(
        np.abs(_f64(x)), np.abs(_f64(dww)), np.abs(_f64(pww)), np.abs(_f64(b)),
        dw_bias=np.abs(_f64(dwb)), residual=None if r is None else np.abs(_f64(r)), **kw)
    assert_close(_host(out, dtype), ref, dtype, scale=np.maximum(scale, 1e-3),
                 what=f"separable {p}")


@pytest.mark.emu_grads_random
@pytest.mark.parametrize("seed", range(16))
def test_random_pointwise_problems(seed):
    """Pointwise forward (optional bias, residual, any activation) and both gradients of random
    sizes around the 64 x 64 x 16 GEMM tile edges."""
    be = _backend()
    rng = np.random.default_rng(3000 + seed)
    n, ci, co = int(rng.integers(1, 4)), int(rng.integers(1, 140)), int(rng.integers(1, 140))
    h, w_ = (int(v) for v in rng.integers(1, 12, 2))
    layout = ("NCHW", "NHWC")[seed % 2]
    dtype = DTYPES[(seed // 2) % 4]
    act = (None, "relu", "relu6", "silu", "gelu")[seed % 5]
    x = rand(rng, _spec._physical(layout, n, ci, h, w_), dtype)
    w = rand(rng, (co, ci), dtype)
    b = rand(rng, (co,), dtype) if seed % 3 else None
    r = rand(rng, _spec._physical(layout, n, co, h, w_), dtype) if seed % 4 < 2 else None
    p, _ = _spec.pointwise("t", x, w, b, layout, act, r)
    _check_pointwise(be, p, x, w, b, r, act, rand(rng, p.y_shape, dtype), dtype)


@real_gpu
def test_public_api_cupy_arrays_non_contiguous(rng):
    _backend()
    x = cupy.asarray(rand(rng, (2, 8, 20, 30), "float32"))[:, :, :, ::2]   # non-contiguous
    w = cupy.asarray(rand(rng, (8, 1, 3, 3), "float32"))
    y = dwops.depthwise_conv2d(x, w, padding=1, backend="cupy")
    assert isinstance(y, cupy.ndarray)
    ref = dwops.reference.depthwise_conv2d(cupy.asnumpy(x), cupy.asnumpy(w), padding=1)
    assert_close(cupy.asnumpy(y), ref, "float32")


@pytest.mark.emu_forward_pointwise_separable
def test_numpy_inputs_come_back_as_numpy(rng):
    _backend()
    x, w = rand(rng, (1, 4, 9, 9), "bfloat16"), rand(rng, (4, 1, 3, 3), "bfloat16")
    y = dwops.depthwise_conv2d(x, w, padding="same", backend="cupy")
    assert isinstance(y, np.ndarray) and y.dtype == x.dtype
    assert_close(y, dwops.reference.depthwise_conv2d(x, w, padding="same"), "bfloat16",
                 scale=dwops.reference.depthwise_conv2d(np.abs(_f64(x)), np.abs(_f64(w)),
                                                        padding="same"))


@real_gpu
def test_cupy_matches_numba(rng):
    _backend()
    if not dwops.backend_available("numba"):
        pytest.skip("numba backend unavailable")
    x = cupy.asarray(rand(rng, (2, 16, 33, 35), "float32"))
    w = cupy.asarray(rand(rng, (32, 1, 5, 5), "float32"))
    for layout_x, lay in ((x, "NCHW"), (cupy.ascontiguousarray(x.transpose(0, 2, 3, 1)), "NHWC")):
        kw = dict(stride=2, padding="same", dilation=1, layout=lay)
        a = dwops.depthwise_conv2d(layout_x, w, activation="silu", backend="cupy", **kw)
        b = dwops.depthwise_conv2d(layout_x, w, activation="silu", backend="numba", **kw)
        assert_close(cupy.asnumpy(a), cupy.asnumpy(b), "float32")
        gy = cupy.asarray(rand(rng, a.shape, "float32"))
        a = dwops.depthwise_conv2d_grad_weight(layout_x, gy, w.shape, backend="cupy", **kw)
        b = dwops.depthwise_conv2d_grad_weight(layout_x, gy, w.shape, backend="numba", **kw)
        assert_close(cupy.asnumpy(a), cupy.asnumpy(b), "float32", scale=float(abs(b).max().get()))


@real_gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_torch_tensors_on_a_side_stream(dtype, rng):
    torch = pytest.importorskip("torch")
    _backend()
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    tdt = getattr(torch, dtype)
    x = torch.randn(2, 64, 28, 28, device="cuda", dtype=torch.float32).to(tdt)
    w = torch.randn(64, 1, 3, 3, device="cuda", dtype=torch.float32).to(tdt)
    pw = torch.randn(32, 64, device="cuda", dtype=torch.float32).to(tdt)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        x2 = x * 1  # produced on the side stream: dwops must order after it
        y = dwops.depthwise_conv2d(x2, w, padding=1, activation="relu", backend="cupy")
        z = dwops.separable_conv2d(x2, w, pw, padding="same", dw_activation="relu",
                                   backend="cupy")
    side.synchronize()
    assert isinstance(y, torch.Tensor) and y.dtype == tdt and y.is_cuda
    ref = torch.nn.functional.conv2d(x.float(), w.float(), padding=1, groups=64).relu()
    tol = {"bfloat16": 2e-2, "float16": 4e-3, "float32": 1e-4}[dtype]
    assert torch.allclose(y.float(), ref, atol=tol * 10, rtol=tol)
    ref_z = torch.nn.functional.conv2d(
        torch.nn.functional.conv2d(x.float(), w.float(), padding=1, groups=64).relu(),
        pw.float()[:, :, None, None])
    assert torch.allclose(z.float(), ref_z, atol=tol * 50, rtol=tol * 5)


# ----------------------------------------------------------------------------- depthwise 1-d


def _seq_idx(rng, n, length, dtype="int32", big=False):
    """Random packed-sequence ids (N, L): non-decreasing, each row starting anywhere; with
    ``big`` the ids jump by more than 2**32 (int64 only)."""
    steps = (rng.random((n, length)) < 0.3).astype(np.int64)
    steps[:, 0] = rng.integers(0, 3, n)
    ids = np.cumsum(steps, axis=1)
    if big:
        ids = ids * (2**33 + 7)
    return ids.astype(dtype)


def _c1_args(rng, n, c, length, m, k, layout, dtype, *, bias=False, state=False, seq=None,
             dilation=1):
    """x, weight, bias, initial_state (host arrays of ``dtype``) and seq_idx of a 1-d problem."""
    x = rand(rng, (n, c, length) if layout == "NCL" else (n, length, c), dtype)
    w = rand(rng, (c * m, 1, k), dtype)
    b = rand(rng, (c * m,), dtype) if bias else None
    st = rand(rng, (n, c, dilation * (k - 1)), dtype) if state else None
    sq = None if seq is None else _seq_idx(rng, n, length, seq)
    return x, w, b, st, sq


def _dev_opt(a, dtype):
    return None if a is None else _dev(a, dtype)


def _check_c1_forward(be, x, w, b, st, sq, dtype, *, stride=1, padding="causal", dilation=1,
                      layout="NCL", act=None, final=False):
    """c1_forward (and c1_final_state) with poisoned outputs against dwops.reference."""
    p, _ = _spec.depthwise_1d("t", x, w, b, stride, padding, dilation, layout, act, st, final, sq)
    out = _poisoned(p.y_shape, dtype)
    fin = _poisoned(p.state_shape, dtype) if final else None
    be.depthwise_conv1d_forward(p, _dev(x, dtype), _dev(w, dtype), _dev_opt(b, dtype),
                                _dev_opt(st, dtype), None if sq is None else cupy.asarray(sq),
                                out, fin, stream=0)
    kw = dict(stride=stride, padding=padding, dilation=dilation, layout=layout, seq_idx=sq)
    ref = dwops.reference.depthwise_conv1d(x, w, b, activation=act, initial_state=st,
                                           return_final_state=final, **kw)
    scale = dwops.reference.depthwise_conv1d(_abs(x), _abs(w), _abs(b), initial_state=_abs(st),
                                             **kw)
    y_ref = ref[0] if final else ref
    assert_close(_host(out, dtype), y_ref, dtype, scale=np.maximum(scale, 1e-3),
                 what=f"conv1d forward {p}")
    if final:
        assert_close(_host(fin, dtype), ref[1], dtype, what=f"conv1d final state {p}")
    return p


NEEDS = ("need_input", "need_weight", "need_bias", "need_initial_state")


def _check_c1_backward(be, x, w, st, sq, gy, dtype, need, *, stride=1, padding="causal",
                       dilation=1, layout="NCL"):
    """c1_backward (+ sum_splits) for the outputs ``need`` asks for (poisoned) against the
    reference; outputs not asked for are passed as None."""
    p, _ = _spec.depthwise_1d_backward("t", x, gy, w, stride, padding, dilation, layout, st, sq,
                                       need)
    shapes = (p.x_shape, p.w_shape, (p.CO,), p.state_shape)
    outs = [_poisoned(s, dtype) if need[k] else None for k, s in zip(NEEDS, shapes)]
    be.depthwise_conv1d_backward(p, _dev(x, dtype), _dev(gy, dtype), _dev(w, dtype),
                                 _dev_opt(st, dtype), None if sq is None else cupy.asarray(sq),
                                 *outs, stream=0)
    kw = dict(stride=stride, padding=padding, dilation=dilation, layout=layout, seq_idx=sq,
              need_input=True, need_weight=True, need_bias=True,
              need_initial_state=st is not None)
    ref = dwops.reference.depthwise_conv1d_backward(x, gy, w, initial_state=st, **kw)
    scale = dwops.reference.depthwise_conv1d_backward(_abs(x), _abs(gy), _abs(w),
                                                      initial_state=_abs(st), **kw)
    for name, got, r, sc in zip(NEEDS, outs, ref, scale):
        if got is not None:
            assert_close(_host(got, dtype), r, dtype, scale=np.maximum(sc, 1e-3),
                         what=f"conv1d backward {name} {p}")
    return p


def _check_c1_update(be, rng, n, c, m, k, t, dtype, act, squeeze=False, in_place=True):
    """c1_update against the reference: y poisoned, the state updated in place (or into a
    poisoned new array)."""
    x = rand(rng, (n, c) if squeeze else (n, c, t), dtype)
    st = rand(rng, (n, c, k - 1), dtype)
    w = rand(rng, (c * m, 1, k), dtype)
    b = rand(rng, (c * m,), dtype)
    p, _ = _spec.depthwise_1d_update("t", x, st, w, b, act)
    out = _poisoned(p.y_shape, dtype)
    state = _dev(st, dtype)
    state_out = state if in_place else _poisoned(p.state_shape, dtype)
    be.depthwise_conv1d_update(p, _dev(x, dtype), state, _dev(w, dtype), _dev(b, dtype), out,
                               state_out, stream=0)
    y_ref, s_ref = dwops.reference.depthwise_conv1d_update(x, st.copy(), w, b, activation=act)
    scale, _ = dwops.reference.depthwise_conv1d_update(_abs(x), _abs(st), _abs(w), _abs(b))
    assert_close(_host(out, dtype), y_ref, dtype, scale=np.maximum(scale, 1e-3),
                 what=f"conv1d update {p}")
    assert_close(_host(state_out, dtype), s_ref, dtype, what=f"conv1d update state {p}")
    if not in_place:
        assert_close(_host(state, dtype), st, dtype, what="conv1d update: the old state is kept")


@pytest.mark.emu_conv1d
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("layout", ["NCL", "NLC"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", range(1, 9))
def test_conv1d_every_width(k, dtype, layout, aligned, rng):
    """Each compile-time width (2-8; 1 takes the runtime path) with and without 16-byte vectors
    (channels and length a multiple of 8 or not): causal forward with initial/final state,
    seq_idx, bias and activation; a strided, dilated explicit-padding forward; the backward with
    every output; and (K >= 2) decode updates in place."""
    be = _backend()
    c, length = (16, 40) if aligned else (5, 13)
    act = (None, "relu", "relu6", "silu", "gelu")[k % 5]
    x, w, b, st, sq = _c1_args(rng, 2, c, length, 1, k, layout, dtype, bias=True, state=k > 1,
                               seq="int32")
    _check_c1_forward(be, x, w, b, st, sq, dtype, layout=layout, act=act, final=k > 1)
    x2, w2, b2, _, _ = _c1_args(rng, 1, c, length, 1, k, layout, dtype, bias=True)
    _check_c1_forward(be, x2, w2, b2, None, None, dtype, stride=2, padding=(k // 2, 1),
                      dilation=2, layout=layout, act="silu")
    p, _ = _spec.depthwise_1d("t", x, w, None, 1, "causal", 1, layout, None, None, False, sq)
    gy = rand(rng, p.y_shape, dtype)
    need = dict(zip(NEEDS, (True, True, True, k > 1)))
    _check_c1_backward(be, x, w, st, sq, gy, dtype, need, layout=layout)
    if k > 1:
        _check_c1_update(be, rng, 2, c, 1, k, 3, dtype, act)


@pytest.mark.emu_conv1d
@pytest.mark.parametrize("act,layout", [("hardswish", "NCL"), ("hardsigmoid", "NLC")])
def test_conv1d_hard_activations(act, layout, rng):
    """hardswish / hardsigmoid in the 1-d forward (inputs in [-4, 4], across -3 and 3) and in the
    decode update."""
    be = _backend()
    x, w, b, st, sq = _c1_args(rng, 2, 5, 13, 1, 4, layout, "float32", bias=True, state=True)
    x = (4 * x).astype(np.float32)
    _check_c1_forward(be, x, w, b, st, sq, "float32", layout=layout, act=act, final=True)
    _check_c1_update(be, rng, 2, 5, 1, 4, 3, "float32", act)


@pytest.mark.emu_conv1d
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("layout", ["NCL", "NLC"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_conv1d_long_rows(dtype, layout, aligned, rng):
    """Rows of four NCL chunks (blocks of three chunks, whose two-stage cp.async pipeline
    restages a buffer, and of one) and many NLC segments (halos carried across segment ends), at
    stride 1 (causal, state, seq_idx) and stride 2."""
    be = _backend()
    vec = 16 // np.dtype(dwops._registry.numpy_dtype(dtype)).itemsize if aligned else 1
    length = 128 * 2 * vec * 4 - (0 if aligned else 83)   # TL = 128 threads x 2 x VEC
    x, w, b, st, sq = _c1_args(rng, 1, 2, length, 1, 4, layout, dtype, bias=True, state=True,
                               seq="int32")
    p = _check_c1_forward(be, x, w, b, st, sq, dtype, layout=layout, act="silu", final=True)
    need = dict(zip(NEEDS, (True,) * 4))
    _check_c1_backward(be, x, w, st, sq, rand(rng, p.y_shape, dtype), dtype, need, layout=layout)
    p = _check_c1_forward(be, x, w, b, None, None, dtype, stride=2, padding=(2, 1),
                          layout=layout)
    need["need_initial_state"] = False
    _check_c1_backward(be, x, w, None, None, rand(rng, p.y_shape, dtype), dtype, need, stride=2,
                       padding=(2, 1), layout=layout)


@pytest.mark.emu_conv1d
@pytest.mark.parametrize("k", [9, 17, 31])
def test_conv1d_generic_widths(k, rng):
    """Runtime widths up to 31 in both layouts: forward, backward, decode update."""
    be = _backend()
    for layout, dtype in (("NCL", "float32"), ("NLC", "bfloat16")):
        x, w, b, st, sq = _c1_args(rng, 2, 6, 45, 1, k, layout, dtype, bias=True, state=True,
                                   seq="int64")
        _check_c1_forward(be, x, w, b, st, sq, dtype, layout=layout, act="silu", final=True)
        p, _ = _spec.depthwise_1d("t", x, w, None, 1, "causal", 1, layout, None, None, False, sq)
        need = dict(zip(NEEDS, (True,) * 4))
        _check_c1_backward(be, x, w, st, sq, rand(rng, p.y_shape, dtype), dtype, need,
                           layout=layout)
        _check_c1_update(be, rng, 2, 5, 1, k, 2, dtype, "gelu", in_place=layout == "NCL")
    for dtype in DTYPES:
        _check_c1_update(be, rng, 3, 4, 2, k, 1, dtype, None, squeeze=True)


@pytest.mark.emu_conv1d
@pytest.mark.parametrize("layout", ["NCL", "NLC"])
@pytest.mark.parametrize("subset", range(1, 16))
def test_conv1d_backward_every_need_subset(subset, layout, rng):
    """Each non-empty subset of (grad_input, grad_weight, grad_bias, grad_initial_state): the
    outputs asked for are right, the others are not written (passed as None)."""
    be = _backend()
    need = {k: bool(subset >> i & 1) for i, k in enumerate(NEEDS)}
    x, w, _, st, sq = _c1_args(rng, 2, 8, 37, 2, 3, layout, "float32", state=True, seq="int32")
    p, _ = _spec.depthwise_1d("t", x, w, None, 1, "causal", 1, layout, None, st, False, sq)
    _check_c1_backward(be, x, w, st, sq, rand(rng, p.y_shape, "float32"), "float32", need,
                       layout=layout)


def _random_conv1d(rng):
    """A random valid 1-d problem: widths 1-12 (and sometimes up to 31), stride and dilation
    1-3, multiplier 1-3, every padding form, both layouts, every dtype; causal problems get an
    initial state and seq_idx at random."""
    while True:
        n, c, m = (int(v) for v in rng.integers(1, (4, 10, 4)))
        length = int(rng.integers(1, 60))
        k = int(rng.integers(1, 13)) if rng.random() < 0.85 else int(rng.integers(13, 32))
        s = int(rng.integers(1, 4)) if rng.random() < 0.5 else 1
        d = int(rng.integers(1, 4)) if rng.random() < 0.3 else 1
        pad = ["same", "valid", "causal", (int(rng.integers(0, 5)), int(rng.integers(0, 5))),
               int(rng.integers(0, 4))][int(rng.integers(0, 5))]
        layout = ("NCL", "NLC")[int(rng.integers(0, 2))]
        dtype = DTYPES[int(rng.integers(0, 4))]
        causal = pad == "causal"
        state = causal and d * (k - 1) > 0 and rng.random() < 0.5
        seq = ("int32", "int64")[int(rng.integers(0, 2))] if causal and s == 1 and \
            rng.random() < 0.5 else None
        args = _c1_args(rng, n, c, length, m, k, layout, dtype, bias=True, state=state, seq=seq,
                        dilation=d)
        try:
            _spec.depthwise_1d("t", *args[:3], s, pad, d, layout, None, args[3], False, args[4])
        except ValueError:      # empty output: draw again
            continue
        return args, dict(stride=s, padding=pad, dilation=d, layout=layout), dtype


@pytest.mark.emu_grads_random
@pytest.mark.parametrize("seed", range(32))
def test_random_conv1d_problems(seed):
    """Forward (random activation, final state when causal with a state) and the backward with
    a random subset of outputs, on random problems."""
    be = _backend()
    rng = np.random.default_rng(4000 + seed)
    (x, w, b, st, sq), kw, dtype = _random_conv1d(rng)
    act = (None, "relu", "relu6", "silu", "gelu")[seed % 5]
    p = _check_c1_forward(be, x, w, b if seed % 2 else None, st, sq, dtype, act=act,
                          final=st is not None, **kw)
    flags = rng.random(4) < 0.6
    flags[int(rng.integers(0, 3))] = True
    need = dict(zip(NEEDS, (bool(f) for f in flags)))
    need["need_initial_state"] = bool(need["need_initial_state"] and st is not None)
    _check_c1_backward(be, x, w, st, sq, rand(rng, p.y_shape, dtype), dtype, need, **kw)


@pytest.mark.emu_conv1d
@pytest.mark.parametrize("layout", ["NCL", "NLC"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_conv1d_chunked_calls_equal_one_call(layout, dtype, rng):
    """Causal chunks carried by initial_state / return_final_state give the one-call result, and
    decode updates from the final state continue it (public API, backend="cupy")."""
    _backend()
    n, c, length, k = 2, 16, 48, 4
    x = rand(rng, (n, c, length) if layout == "NCL" else (n, length, c), dtype)
    w = rand(rng, (c, 1, k), dtype)
    b = rand(rng, (c,), dtype)
    kw = dict(padding="causal", layout=layout, activation="silu")
    whole = dwops.depthwise_conv1d(x, w, b, backend="cupy", **kw)
    axis = 2 if layout == "NCL" else 1
    parts, state = [], None
    for lo, hi in ((0, 16), (16, 19), (19, 48)):
        piece = np.take(x, np.arange(lo, hi), axis=axis)
        y, state = dwops.depthwise_conv1d(piece, w, b, initial_state=state,
                                          return_final_state=True, backend="cupy", **kw)
        parts.append(y)
    assert_close(np.concatenate(parts, axis=axis), whole, dtype,
                 scale=np.maximum(np.abs(_f64(whole)), 1.0), what="chunked")
    ref = dwops.reference.depthwise_conv1d(x, w, b, **kw)
    scale = dwops.reference.depthwise_conv1d(_abs(x), _abs(w), _abs(b), padding="causal",
                                             layout=layout)
    assert_close(whole, ref, dtype, scale=np.maximum(scale, 1e-3), what="one call")
    # decode: three more tokens, one at a time, from the final state (updated in place)
    x_more = rand(rng, (n, c, 3), dtype)
    state = np.ascontiguousarray(state)
    outs = []
    for t in range(3):
        y_t, state2 = dwops.depthwise_conv1d_update(x_more[:, :, t], state, w, b,
                                                    activation="silu", backend="cupy")
        assert state2 is state
        outs.append(y_t)
    full = np.concatenate([x if layout == "NCL" else x.transpose(0, 2, 1), x_more], axis=2)
    ref = dwops.reference.depthwise_conv1d(full, w, b, padding="causal", activation="silu")
    scale = dwops.reference.depthwise_conv1d(_abs(full), _abs(w), _abs(b), padding="causal")
    assert_close(np.stack(outs, axis=2), ref[:, :, length:], dtype,
                 scale=np.maximum(scale[:, :, length:], 1e-3), what="decode steps")


@pytest.mark.emu_conv1d
def test_conv1d_int64_seq_idx_with_large_ids(rng):
    """int64 seq_idx ids beyond 32 bits (their equalities survive the int32 conversion), and the
    non-decreasing check on the device."""
    be = _backend()
    x, w, b, st, _ = _c1_args(rng, 2, 3, 30, 2, 4, "NCL", "float32", bias=True, state=True)
    sq = _seq_idx(rng, 2, 30, "int64", big=True)
    _check_c1_forward(be, x, w, b, st, sq, "float32", final=True)
    assert be.nondecreasing(cupy.asarray(sq))
    bad = sq.copy()
    bad[1, 7] = bad[1, 6] - 1
    assert not be.nondecreasing(cupy.asarray(bad))
    with pytest.raises(ValueError, match="non-decreasing"):
        dwops.depthwise_conv1d(x, w, padding="causal", seq_idx=bad, backend="cupy")


@pytest.mark.emu_conv1d
def test_conv1d_plans_respect_launch_limits():
    """Mamba-sized rows: grid y/z within 65535, NCL shared memory within the default 48 KiB,
    partial buffers sized by the grid."""
    from dwops.kernels import cupy_plans as plans

    for layout in ("NCL", "NLC"):
        for n, c, length in ((1, 2048, 2048), (8, 12288, 16384), (70000, 2, 5)):
            for dtype in ("bfloat16", "float32"):
                p = _spec.Conv1dProblem(n, c, length, 1, 4, length, 1, 1, 3, 0, layout, dtype,
                                        causal=True)
                for launch in (plans.plan_conv1d_forward(p), plans.plan_conv1d_backward(p)):
                    assert launch.grid[1] <= 65535 and launch.grid[2] <= 65535
                    assert launch.shared <= plans.SMEM_DEFAULT
                    assert math.prod(launch.block) <= plans.C1_THREADS
                    if "splits" in launch.info:
                        assert launch.info["splits"] == n * launch.grid[1]


@real_gpu
@pytest.mark.parametrize("layout", ["NCL", "NLC"])
def test_depthwise_1d_mamba_sizes(layout, rng):
    """A Mamba-like row (bf16, C=1536, L=2048, K=4, causal, SiLU) forward and backward."""
    be = _backend()
    x, w, b, st, _ = _c1_args(rng, 2, 1536, 2048, 1, 4, layout, "bfloat16", bias=True,
                              state=True)
    p = _check_c1_forward(be, x, w, b, st, None, "bfloat16", layout=layout, act="silu",
                          final=True)
    need = dict(zip(NEEDS, (True,) * 4))
    _check_c1_backward(be, x, w, st, None, rand(rng, p.y_shape, "bfloat16"), "bfloat16", need,
                       layout=layout)


@real_gpu
def test_depthwise_1d_update_writes_a_cupy_state_in_place(rng):
    """A CuPy state is the caller's memory (aliases): updated in place and returned as is; a
    non-contiguous one is written back instead."""
    be = _backend()
    st = cupy.asarray(rand(rng, (2, 8, 3), "float32"))
    w = cupy.asarray(rand(rng, (8, 1, 4), "float32"))
    x = cupy.asarray(rand(rng, (2, 8), "float32"))
    before = cupy.asnumpy(st)
    info = dwops._interop.describe(st, "t", "state")
    assert be.aliases(be.asarray(st, info), st, info)
    y, new = dwops.depthwise_conv1d_update(x, st, w, backend="cupy")
    assert new is st
    y_ref, s_ref = dwops.reference.depthwise_conv1d_update(cupy.asnumpy(x), before,
                                                           cupy.asnumpy(w))
    assert_close(cupy.asnumpy(y), y_ref, "float32")
    assert_close(cupy.asnumpy(st), s_ref, "float32")
    wide = cupy.asarray(rand(rng, (2, 8, 6), "float32"))
    view = wide[:, :, ::2]                                   # non-contiguous
    info = dwops._interop.describe(view, "t", "state")
    assert not be.aliases(be.asarray(view, info), view, info)
    expect = dwops.reference.depthwise_conv1d_update(cupy.asnumpy(x), cupy.asnumpy(view),
                                                     cupy.asnumpy(w))[1]
    _, new = dwops.depthwise_conv1d_update(x, view, w, backend="cupy")
    assert new is view
    assert_close(cupy.asnumpy(view), expect, "float32")


@real_gpu
def test_depthwise_1d_torch_bfloat16_on_a_side_stream(rng):
    """PyTorch bf16 CUDA tensors on a side stream: forward with state against F.conv1d, and a
    decode step updating the torch state in place."""
    torch = pytest.importorskip("torch")
    _backend()
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    x = torch.randn(2, 64, 300, device="cuda").to(torch.bfloat16)
    w = torch.randn(64, 1, 4, device="cuda").to(torch.bfloat16)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        x2 = x * 1
        y, fs = dwops.depthwise_conv1d(x2, w, padding="causal", activation="silu",
                                       return_final_state=True, backend="cupy")
        state = fs.clone()
        step = torch.randn(2, 64, device="cuda").to(torch.bfloat16)
        y1, new = dwops.depthwise_conv1d_update(step, state, w, activation="silu",
                                                backend="cupy")
    side.synchronize()
    assert new is state and y.dtype == torch.bfloat16
    ref = torch.nn.functional.silu(torch.nn.functional.conv1d(
        torch.nn.functional.pad(x.float(), (3, 0)), w.float(), groups=64))
    assert torch.allclose(y.float(), ref, atol=5e-2, rtol=2e-2)
    assert torch.equal(fs, x[:, :, -3:])
    assert torch.equal(state[:, :, :2], x[:, :, -2:]) and torch.equal(state[:, :, 2], step)
