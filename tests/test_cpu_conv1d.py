"""The "cpu" backend's depthwise 1-d convolution against the reference ("numpy" backend).

Forward, one-pass backward and decode update through the public API: both layouts, the four
dtypes, kernel widths 1-8, 13 and 31, strides 1-3, dilations 1-3, multipliers 1-3, every padding
form, bias and the activations, causal initial_state / return_final_state (chunked calls equal
one call), seq_idx (int32, int64, values beyond int32), every need_* subset of the backward,
decode steps equal to the full causal convolution with the state updated in place (NumPy and
PyTorch). Outputs are allocated NaN-filled (``poisoned``), so an element a kernel does not write
fails. Tiles are shrunk (``small_tiles``) so that odd shapes cross many task and chunk
boundaries; one test runs the default tiles on long rows. Errors are bounded relative to the same
computation on |inputs| (a sum of absolute products).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import dwops
from dwops import reference
from dwops._registry import numpy_dtype
from dwops._spec import ACTIVATIONS

from tests.conftest import DTYPES, assert_close, rand

# Module-level: every test here runs the cpu backend's kernels, which are Numba code.
pytest.importorskip("numba", reason="the cpu backend is compiled by Numba")

from dwops.kernels import _cpu_conv1d, cpu  # noqa: E402

LAYOUTS = ("NCL", "NLC")
ACTS = ACTIVATIONS

# (N, C, L, M, K, stride, padding, dilation)
CASES = [
    (2, 3, 19, 1, 4, 1, "causal", 1),
    (1, 5, 23, 2, 3, 2, "same", 1),
    (3, 2, 17, 1, 5, 3, (2, 4), 2),
    (2, 4, 11, 3, 2, 1, "valid", 3),
    (1, 3, 29, 1, 7, 2, 3, 1),
    (2, 1, 9, 2, 1, 1, 0, 1),                  # K = 1
    (1, 2, 37, 1, 13, 1, "same", 2),
    (1, 3, 40, 1, 31, 3, (30, 1), 1),          # K = 31
    (1, 2, 5, 1, 6, 1, (7, 9), 1),             # padding wider than the input
    (2, 7, 13, 1, 8, 1, "causal", 2),
]


def _ids(cases):
    return [f"case{i}" for i in range(len(cases))]


def _xshape(layout, n, c, length):
    return (n, c, length) if layout == "NCL" else (n, length, c)


def _absf(a):
    """|a| in float64 for float arrays; anything else (seq_idx, shapes) as it is."""
    if isinstance(a, np.ndarray) and a.dtype in _FLOATS:
        return np.abs(a.astype(np.float64))
    return a


_FLOATS = [numpy_dtype(d) for d in DTYPES]
_DEFAULTS = {name: getattr(_cpu_conv1d, name)
             for name in ("NCL_TL", "NLC_TL", "NLC_CB", "NCL_SEQ_CB", "NLC_GROUP",
                          "NLC_MIN_TASKS")}


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Tiles of a few outputs and channels, so small odd shapes cross many task boundaries."""
    monkeypatch.setattr(_cpu_conv1d, "NCL_TL", 7)
    monkeypatch.setattr(_cpu_conv1d, "NLC_TL", 5)
    monkeypatch.setattr(_cpu_conv1d, "NLC_CB", 3)
    monkeypatch.setattr(_cpu_conv1d, "NCL_SEQ_CB", 2)
    monkeypatch.setattr(_cpu_conv1d, "NLC_GROUP", 2)
    monkeypatch.setattr(_cpu_conv1d, "NLC_MIN_TASKS", 1)


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """The cpu backend's outputs start as NaN, so an element no kernel writes fails."""
    allocate = cpu.BACKEND.allocate

    def nan_allocate(shape, dtype, like_obj, like_info):
        out, finish = allocate(shape, dtype, like_obj, like_info)
        out[...] = np.nan
        return out, finish

    monkeypatch.setattr(cpu.BACKEND, "allocate", nan_allocate)


def _as_tuple(r):
    return r if isinstance(r, tuple) else (r,)


def _check(fn, args, kwargs, dtype, scaled=True, what="", exact=()):
    """fn(backend="cpu") against fn(backend="numpy"), each result scaled by fn(|args|)
    (without the activation); results at the indices in ``exact`` must be equal bit for bit."""
    got = _as_tuple(fn(*args, **kwargs, backend="cpu"))
    want = _as_tuple(fn(*args, **kwargs, backend="numpy"))
    scales = [None] * len(want)
    if scaled:
        abs_kwargs = {k: _absf(v) if k == "initial_state" else v for k, v in kwargs.items()
                      if k != "activation"}
        scales = _as_tuple(fn(*map(_absf, args), **abs_kwargs, backend="numpy"))
    assert len(got) == len(want)
    for i, (g, w, s) in enumerate(zip(got, want, scales)):
        if w is None:
            assert g is None, f"{what}[{i}]: not asked for, got an array"
            continue
        assert g.dtype == w.dtype == numpy_dtype(dtype), f"{what}[{i}]: dtype {g.dtype}"
        assert g.shape == w.shape, f"{what}[{i}]: shape {g.shape} != {w.shape}"
        if i in exact:
            np.testing.assert_array_equal(np.asarray(g, np.float64), np.asarray(w, np.float64),
                                          err_msg=f"{what}[{i}]")
        else:
            scale = None if s is None else np.maximum(np.asarray(s, np.float64), 1e-3)
            assert_close(g, w, dtype, scale=scale, what=f"{what}[{i}]")
    return got


def _seq(rng, n, length, runs=4, dtype=np.int32, base=0):
    """Non-decreasing packed-sequence ids (N, L): a few runs per row, some of length 1."""
    seq = np.zeros((n, length), np.int64)
    for i in range(n):
        cuts = np.sort(rng.choice(np.arange(1, length), size=min(runs, length - 1),
                                  replace=False))
        seq[i] = np.searchsorted(cuts, np.arange(length), side="right") * 3
    return (seq + base).astype(dtype)


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_forward(rng, case, layout, dtype):
    n, c, length, m, k, stride, padding, dilation = case
    x = rand(rng, _xshape(layout, n, c, length), dtype)
    w = rand(rng, (c * m, 1, k), dtype)
    b = rand(rng, (c * m,), dtype)
    act = ACTS[CASES.index(case) % len(ACTS)]
    kw = dict(stride=stride, padding=padding, dilation=dilation, layout=layout)
    _check(dwops.depthwise_conv1d, (x, w, b), dict(kw, activation=act), dtype, act is None,
           "forward")
    _check(dwops.depthwise_conv1d, (x, w), kw, dtype, True, "no bias")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_widths(rng, layout):
    """K = 1..8 with every padding form, strides 1-3 and dilations 1-2."""
    for k, padding, stride, dilation in itertools.product(
            range(1, 9), ("causal", "same", "valid", 2, (3, 1)), (1, 2, 3), (1, 2)):
        c, length = 3, 2 * dilation * (k - 1) + 5
        x = rand(rng, _xshape(layout, 2, c, length))
        w = rand(rng, (c, 1, k))
        kw = dict(stride=stride, padding=padding, dilation=dilation, layout=layout)
        _check(dwops.depthwise_conv1d, (x, w), kw, "float32", True,
               f"K={k} {padding} s={stride} d={dilation}")


@pytest.mark.parametrize("dtype", ("float32", "bfloat16"))
@pytest.mark.parametrize("act", ACTS)
def test_activations(rng, act, dtype):
    for layout in LAYOUTS:
        x = rand(rng, _xshape(layout, 2, 5, 21), dtype, -4.0, 8.0)  # relu6 clips at 6
        w = rand(rng, (10, 1, 4), dtype)
        b = rand(rng, (10,), dtype)
        _check(dwops.depthwise_conv1d, (x, w, b), dict(padding="causal", layout=layout,
                                                       activation=act), dtype, False, act)


def test_nonfinite(rng):
    """NaN and Inf propagate as in the reference (forward and backward)."""
    for layout in LAYOUTS:
        x = rand(rng, _xshape(layout, 1, 3, 16))
        w = rand(rng, (3, 1, 3))
        xl = x if layout == "NCL" else x.transpose(0, 2, 1)
        xl[0, 0, 4] = np.nan
        xl[0, 1, 9] = np.inf
        xl[0, 2, 12] = -np.inf
        kw = dict(padding="same", layout=layout)
        _check(dwops.depthwise_conv1d, (x, w), kw, "float32", False, "forward")
        gy = rand(rng, x.shape)
        _check(dwops.depthwise_conv1d_backward, (x, gy, w), dict(kw, need_bias=True),
               "float32", False, "backward")


def test_16bit_rounding():
    """16-bit inputs widen exactly and results round once to nearest even: with w = (1, 1),
    y[l] = x[l-1] + x[l] is one float32 addition, so y must equal NumPy's rounding of that
    float32 sum. Every finite float16 and bfloat16 pattern is an input (subnormals, ties,
    sums that overflow to Inf)."""
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    for dtype, bits in (("float16", h), ("bfloat16", h)):
        dt = numpy_dtype(dtype)
        x = bits.view(dt)
        x = x[np.isfinite(x.astype(np.float32))]
        x = np.random.default_rng(5).permutation(x)[None, None, :]
        w = np.ones((1, 1, 2), dt)
        y = dwops.depthwise_conv1d(x, w, padding="causal", backend="cpu")
        x32 = x.astype(np.float32)
        want = (x32 + np.concatenate([np.zeros((1, 1, 1), np.float32), x32[..., :-1]], -1))
        with np.errstate(over="ignore"):  # sums beyond the 16-bit range round to Inf
            want = want.astype(dt)
        np.testing.assert_array_equal(y.astype(np.float64), want.astype(np.float64),
                                      err_msg=dtype)


# ----------------------------------------------------------------------------- causal state


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("m,k,dilation", [(1, 4, 1), (2, 3, 2), (1, 8, 3)])
def test_state_chunks(rng, m, k, dilation, layout, dtype):
    """Chunked calls, each taking the previous final_state, equal one call, and the final
    states equal the reference's exactly (they are copies of inputs); chunks shorter than the
    state included."""
    n, c, length = 2, 5, 31
    W = dilation * (k - 1)
    x = rand(rng, _xshape(layout, n, c, length), dtype)
    w = rand(rng, (c * m, 1, k), dtype)
    b = rand(rng, (c * m,), dtype)
    s0 = rand(rng, (n, c, W), dtype)
    kw = dict(padding="causal", dilation=dilation, layout=layout)
    whole, final = _check(dwops.depthwise_conv1d, (x, w, b),
                          dict(kw, initial_state=s0, return_final_state=True), dtype, True,
                          "one call", exact=(1,))
    _check(dwops.depthwise_conv1d, (x, w, b), dict(kw, return_final_state=True), dtype, True,
           "zero state", exact=(1,))
    axis = 2 if layout == "NCL" else 1
    cuts = sorted({0, 1, min(length - 1, W), 17, length})  # a chunk shorter than W
    state, ys = s0, []
    for a, e in zip(cuts[:-1], cuts[1:]):
        xc = np.ascontiguousarray(np.take(x, np.arange(a, e), axis=axis))
        y, state = dwops.depthwise_conv1d(xc, w, b, initial_state=state, return_final_state=True,
                                          backend="cpu", **kw)
        ys.append(y)
    assert_close(np.concatenate(ys, axis=axis), whole, dtype, what="chunked")
    np.testing.assert_array_equal(np.asarray(state, np.float64), np.asarray(final, np.float64))


# ----------------------------------------------------------------------------- seq_idx


@pytest.mark.parametrize("dtype", ("float32", "bfloat16", "float64"))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("k,dilation,seq_dtype,base", [
    (4, 1, np.int32, 0), (7, 2, np.int64, 0), (3, 1, np.int64, 5 * 10**12), (1, 1, np.int32, 0)])
def test_seq_idx(rng, k, dilation, seq_dtype, base, layout, dtype):
    """Taps never read another packed sequence; the state belongs to the first; backward too."""
    n, c, length, m = 3, 4, 33, 2
    x = rand(rng, _xshape(layout, n, c, length), dtype)
    w = rand(rng, (c * m, 1, k), dtype)
    b = rand(rng, (c * m,), dtype)
    seq = _seq(rng, n, length, dtype=seq_dtype, base=base)
    seq[1] = seq[1, 0]  # one row is a single sequence
    kw = dict(padding="causal", dilation=dilation, layout=layout, seq_idx=seq)
    _check(dwops.depthwise_conv1d, (x, w, b), kw, dtype, True, "forward")
    gy = rand(rng, (n, c * m, length) if layout == "NCL" else (n, length, c * m), dtype)
    _check(dwops.depthwise_conv1d_backward, (x, gy, w), dict(kw, need_bias=True), dtype, True,
           "backward")
    if k > 1:
        s0 = rand(rng, (n, c, dilation * (k - 1)), dtype)
        _check(dwops.depthwise_conv1d, (x, w, b),
               dict(kw, initial_state=s0, return_final_state=True), dtype, True, "state",
               exact=(1,))
        _check(dwops.depthwise_conv1d_backward, (x, gy, w),
               dict(kw, initial_state=s0, need_bias=True, need_initial_state=True), dtype, True,
               "backward with state")


# ----------------------------------------------------------------------------- backward


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_backward(rng, case, layout, dtype):
    n, c, length, m, k, stride, padding, dilation = case
    x = rand(rng, _xshape(layout, n, c, length), dtype)
    w = rand(rng, (c * m, 1, k), dtype)
    kw = dict(stride=stride, padding=padding, dilation=dilation, layout=layout)
    y = reference.depthwise_conv1d(x.astype(np.float64), w.astype(np.float64), **kw)
    gy = rand(rng, y.shape, dtype)
    _check(dwops.depthwise_conv1d_backward, (x, gy, w), dict(kw, need_bias=True), dtype, True,
           "backward")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_widths(rng, layout):
    """K = 1..8, strides 1-3, dilations 1-2, every padding form (float32)."""
    for k, padding, stride, dilation in itertools.product(
            range(1, 9), ("causal", "same", "valid", (1, 4)), (1, 2, 3), (1, 2)):
        c, length = 2, 2 * dilation * (k - 1) + 6
        x = rand(rng, _xshape(layout, 2, c, length))
        w = rand(rng, (2 * c, 1, k))
        kw = dict(stride=stride, padding=padding, dilation=dilation, layout=layout)
        y = reference.depthwise_conv1d(x.astype(np.float64), w.astype(np.float64), **kw)
        _check(dwops.depthwise_conv1d_backward, (x, rand(rng, y.shape), w),
               dict(kw, need_bias=True), "float32", True,
               f"K={k} {padding} s={stride} d={dilation}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_need_subsets(rng, layout, dtype):
    """Every subset of the four gradients: the others are None, the asked ones are right."""
    n, c, m, length, k, dilation = 2, 5, 2, 23, 4, 2
    x = rand(rng, _xshape(layout, n, c, length), dtype)
    w = rand(rng, (c * m, 1, k), dtype)
    s0 = rand(rng, (n, c, dilation * (k - 1)), dtype)
    gy = rand(rng, (n, c * m, length) if layout == "NCL" else (n, length, c * m), dtype)
    for need in itertools.product((False, True), repeat=4):
        flags = dict(zip(("need_input", "need_weight", "need_bias", "need_initial_state"), need))
        kw = dict(padding="causal", dilation=dilation, layout=layout, initial_state=s0, **flags)
        got = _check(dwops.depthwise_conv1d_backward, (x, gy, w), kw, dtype, True, str(need))
        assert [g is not None for g in got] == list(need)


# ----------------------------------------------------------------------------- update


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,steps", [(1, 4, 1), (2, 3, 3), (1, 8, 2), (3, 2, 1)])
def test_update_equals_full(rng, m, k, steps, dtype):
    """Decode steps (T = 1 squeezed, or T = steps) equal the full causal convolution with
    initial_state; the NumPy state is updated in place and returned."""
    n, c, length = 2, 5, 12
    x = rand(rng, (n, c, length), dtype)
    w = rand(rng, (c * m, 1, k), dtype)
    b = rand(rng, (c * m,), dtype)
    s0 = rand(rng, (n, c, k - 1), dtype)
    act = ACTS[(k + m) % len(ACTS)]
    want, final = reference.depthwise_conv1d(x, w, b, padding="causal", initial_state=s0,
                                             return_final_state=True, activation=act)
    state = s0.copy()
    ys = []
    for t in range(0, length, steps):
        xt = x[:, :, t] if steps == 1 else np.ascontiguousarray(x[:, :, t:t + steps])
        y, new = dwops.depthwise_conv1d_update(xt, state, w, b, activation=act, backend="cpu")
        assert new is state
        ys.append(y[:, :, None] if steps == 1 else y)
    assert_close(np.concatenate(ys, axis=2), want, dtype, what="decode")
    np.testing.assert_array_equal(state.astype(np.float64), final.astype(np.float64))
    # one call against the reference's update of the same state
    xt = np.ascontiguousarray(x[:, :, :steps])
    state = s0.copy()
    y, _ = dwops.depthwise_conv1d_update(xt, state, w, b, activation=act, backend="cpu")
    want_y, want_s = reference.depthwise_conv1d_update(xt, s0, w, b, activation=act)
    assert_close(y, want_y, dtype, what="update")
    np.testing.assert_array_equal(state.astype(np.float64), want_s.astype(np.float64))


def test_update_not_aliased(rng):
    """A state the backend cannot update in place (non-contiguous) is written back."""
    x = rand(rng, (2, 3))
    w = rand(rng, (3, 1, 4))
    big = rand(rng, (2, 3, 6))
    state = big[:, :, ::2]
    s0 = state.copy()
    y, new = dwops.depthwise_conv1d_update(x, state, w, backend="cpu")
    assert new is state
    want_y, want_s = reference.depthwise_conv1d_update(x, s0, w)
    assert_close(y, want_y, "float32", what="y")
    np.testing.assert_array_equal(state, want_s)


@pytest.mark.parametrize("dtype", ("float32", "bfloat16", "float16"))
def test_update_torch_in_place(rng, dtype):
    torch = pytest.importorskip("torch")
    tdt = getattr(torch, dtype)
    n, c, k = 2, 6, 4
    x = torch.from_numpy(rand(rng, (n, c, 7), "float32")).to(tdt)
    w = torch.from_numpy(rand(rng, (c, 1, k), "float32")).to(tdt)
    s0 = torch.from_numpy(rand(rng, (n, c, k - 1), "float32")).to(tdt)
    state = s0.clone()
    ptr = state.data_ptr()
    ys = []
    for t in range(7):
        y, new = dwops.depthwise_conv1d_update(x[:, :, t], state, w, activation="silu",
                                               backend="cpu")
        assert new is state and state.data_ptr() == ptr
        ys.append(y)
    f32 = [a.float().numpy() for a in (x, w, s0)]
    want, final = reference.depthwise_conv1d(*f32[:2], padding="causal", initial_state=f32[2],
                                             return_final_state=True, activation="silu")
    assert_close(torch.stack(ys, -1).float().numpy(), want, dtype, what="torch decode")
    np.testing.assert_array_equal(state.float().numpy(), final)


# ----------------------------------------------------------------------------- default tiles


def test_default_tiles_long_rows(rng, monkeypatch):
    """Rows longer than the default chunks (NCL 2048, NLC 256 outputs) and more channels than
    an NLC block, with state and seq_idx, forward and backward."""
    for name, value in _DEFAULTS.items():
        monkeypatch.setattr(_cpu_conv1d, name, value)
    n, c, length, k = 1, 19, 2 * 2048 + 37, 4
    for layout in LAYOUTS:
        x = rand(rng, _xshape(layout, n, c, length))
        w = rand(rng, (c, 1, k))
        s0 = rand(rng, (n, c, k - 1))
        seq = _seq(rng, n, length, runs=6)
        kw = dict(padding="causal", layout=layout, initial_state=s0, seq_idx=seq)
        _check(dwops.depthwise_conv1d, (x, w), dict(kw, return_final_state=True), "float32",
               True, "forward", exact=(1,))
        _check(dwops.depthwise_conv1d_backward, (x, rand(rng, x.shape), w),
               dict(kw, need_bias=True, need_initial_state=True), "float32", True, "backward")
        kw3 = dict(stride=3, padding=(5, 2), layout=layout)
        y = reference.depthwise_conv1d(x, w, **kw3)
        _check(dwops.depthwise_conv1d_backward, (x, rand(rng, y.shape), w),
               dict(kw3, need_bias=True), "float32", True, "backward stride 3")



def test_float16_conversions_match_numpy_bit_for_bit():
    """The integer-arithmetic float16 conversions: every pattern widens as NumPy does, and
    float32 values (ties, subnormals, overflow, specials) narrow as NumPy rounds them."""
    from numba import njit

    from dwops.kernels._cpu_conv1d import _f2h, _h2f

    @njit
    def widen(h, out):
        for i in range(h.size):
            out[i] = _h2f(h[i])

    @njit
    def narrow(f, out):
        for i in range(f.size):
            out[i] = _f2h(f[i])

    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    got = np.empty(h.size, np.float32)
    widen(h, got)
    want = h.view(np.float16).astype(np.float32)
    finite = np.isfinite(want)
    np.testing.assert_array_equal(got.view(np.uint32)[finite | np.isinf(want)],
                                  want.view(np.uint32)[finite | np.isinf(want)])
    assert np.isnan(got[np.isnan(want)]).all()

    rng = np.random.default_rng(0)
    f = np.concatenate([
        rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32).view(np.float32),
        want[finite],                                   # exact halves
        (want[finite][:-1] + want[finite][1:]) / 2,     # ties and near-ties between neighbours
        np.float32([65504, 65519.996, 65520, 65536, 1e-8, 2.0 ** -25, 2.0 ** -24 * 1.5, np.inf,
                    -np.inf, 0.0, -0.0]),
    ]).astype(np.float32)
    out = np.empty(f.size, np.uint16)
    narrow(f, out)
    with np.errstate(over="ignore", invalid="ignore"):
        want16 = f.astype(np.float16)
    ok = ~np.isnan(f)
    np.testing.assert_array_equal(out[ok], want16.view(np.uint16)[ok])
    assert np.isnan(out[~ok].view(np.float16)).all()


def test_16bit_kernels_run_on_a_cpu_without_f16c_or_avx(tmp_path):
    """NUMBA_CPU_NAME=generic (baseline x86-64): the 16-bit paths compile and give the same
    results as the reference (no half-precision instructions or runtime calls needed)."""
    import os
    import subprocess
    import sys

    code = """
import numpy as np, dwops
from tests.conftest import assert_close
rng = np.random.default_rng(1)
for dt in ("float16", "bfloat16"):
    dtype = dwops._registry.numpy_dtype(dt)
    x = rng.uniform(-1, 1, (2, 3, 40)).astype(np.float32).astype(dtype)
    w = rng.uniform(-1, 1, (3, 1, 4)).astype(np.float32).astype(dtype)
    for layout, xx in (("NCL", x), ("NLC", np.ascontiguousarray(x.transpose(0, 2, 1)))):
        y = dwops.depthwise_conv1d(xx, w, padding="causal", layout=layout, backend="cpu")
        r = dwops.depthwise_conv1d(xx, w, padding="causal", layout=layout, backend="numpy")
        assert_close(y, r, dt)
        g = dwops.depthwise_conv1d_backward(xx, y, w, padding="causal", layout=layout,
                                            backend="cpu")
        gr = dwops.depthwise_conv1d_backward(xx, y, w, padding="causal", layout=layout,
                                             backend="numpy")
        assert_close(g[0], gr[0], dt, scale=4)
print("generic ok")
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, NUMBA_CPU_NAME="generic", NUMBA_CACHE_DIR=str(tmp_path),
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0 and "generic ok" in run.stdout, run.stdout[-2000:] + run.stderr[-3000:]
