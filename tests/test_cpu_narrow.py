"""float16 / bfloat16 on the "cpu" backend: slabs and their memory.

A 16-bit call is computed one slab at a time (a block of images and channels, a run of pixels, or
a band of output rows with its input halo), each widened to float32, computed and rounded into
the output. These tests shrink the slab size so that every case splits (down to one channel,
one pixel or one output row per slab) and hold the results to the reference with the same
tolerances as the unsplit calls; they check that the slabs cover every output exactly once,
and that a call's extra memory is its output plus bounded scratch, not float32 copies of whole
arrays.
"""

from __future__ import annotations

import dataclasses
import tracemalloc

import numpy as np
import pytest

import dwops
from dwops import _spec
from dwops.kernels import cpu

from tests import test_cpu_backend as T
from tests.conftest import rand

NARROW = ("float16", "bfloat16")
LAYOUTS = ("NCHW", "NHWC")
SLABS = (1, 40)  # elements per slab: one channel plane / pixel / row per slab, and a few


@pytest.fixture(params=SLABS, ids=lambda s: f"slab{s}")
def slab(request, monkeypatch):
    monkeypatch.setattr(cpu, "SLAB_ELEMS", request.param)
    return request.param


@pytest.mark.parametrize("dtype", NARROW)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", T.CASES, ids=T._ids(T.CASES))
def test_depthwise_in_slabs(rng, case, layout, dtype, slab):
    T.test_depthwise_forward(rng, case, layout, dtype)
    T.test_depthwise_grad_input(rng, case, layout, dtype)
    T.test_depthwise_grad_weight(rng, case, layout, dtype)


@pytest.mark.parametrize("dtype", NARROW)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", T.PW_CASES, ids=T._ids(T.PW_CASES))
def test_pointwise_in_slabs(rng, case, layout, dtype, slab):
    T.test_pointwise(rng, case, layout, dtype)


@pytest.mark.parametrize("dtype", NARROW)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("sep", T.SEP_CASES, ids=T._ids(T.SEP_CASES))
def test_separable_in_slabs(rng, sep, layout, dtype, slab):
    T.test_separable(rng, sep, layout, dtype)


def _dw_problem(case, layout, dtype="float16"):
    n, c, h, w, m, kh, kw, stride, padding, dilation = case
    x = np.zeros(T._shape(layout, n, c, h, w), np.float16)
    wt = np.zeros((c * m, 1, kh, kw), np.float16)
    p, _ = _spec.depthwise("depthwise_conv2d", x, wt, None, stride, padding, dilation, layout,
                        None)
    return dataclasses.replace(p, dtype=dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("size", (1, 7, 40, 1000))
@pytest.mark.parametrize("case", T.CASES, ids=T._ids(T.CASES))
def test_slabs_cover_every_output_once(monkeypatch, case, layout, size):
    """Each slab's sub-problem has the shapes of its blocks, and the output blocks of the
    depthwise, pointwise and separable slabs tile the output exactly once; a separable band's
    input block holds exactly the rows its outputs read."""
    monkeypatch.setattr(cpu, "SLAB_ELEMS", size)
    p = _dw_problem(case, layout)
    seen = np.zeros(p.y_shape, np.int64)
    xs_seen = np.zeros(p.x_shape, np.int64)
    for q, xs, ys, ws in cpu._dw_slabs(p):
        assert q.dtype == "float32"
        assert seen[ys].shape == q.y_shape and xs_seen[xs].shape == q.x_shape
        assert ws.stop - ws.start == q.CO
        seen[ys] += 1
        xs_seen[xs] += 1
    assert (seen == 1).all() and (xs_seen == 1).all()

    pw = _spec.PointwiseProblem(N=p.N, CI=p.CO, CO=p.C + 2, H=p.OH, W=p.OW, layout=layout,
                                dtype="bfloat16")
    x_seen, y_seen = np.zeros(pw.x_shape, np.int64), np.zeros(pw.y_shape, np.int64)
    for q, view in cpu._pw_slabs(pw):
        assert view(x_seen).shape == q.x_shape and view(y_seen).shape == q.y_shape
        view(x_seen)[...] += 1
        view(y_seen)[...] += 1
    assert (x_seen == 1).all() and (y_seen == 1).all()

    sp = _spec.SeparableProblem(dw=p, pw=pw)
    y_seen = np.zeros(sp.y_shape, np.int64)
    for q, xs, ys in cpu._sep_slabs(sp):
        assert y_seen[ys].shape == q.y_shape
        assert xs_seen[xs].shape == q.x_shape
        d = q.dw
        # the band's geometry gives its own output height from its input rows
        assert (d.H + d.pt + d.pb - d.dh * (d.KH - 1) - 1) // d.sh + 1 == d.OH
        y_seen[ys] += 1
    assert (y_seen == 1).all()


def _extra_bytes(fn):
    """Peak bytes allocated (traced: NumPy arrays) while fn runs, above what was held before."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        result = fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak - before, result


@pytest.mark.parametrize("dtype", NARROW)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_extra_memory_is_output_plus_slabs(rng, monkeypatch, layout, dtype):
    """Every 2-d op in 16 bits: peak extra memory <= the output + 4 float32 slabs + 64 KiB.

    Whole-array float32 copies (the inputs and the output widened) would need about 4x the
    output on top of it; the slab size is lowered so the arrays span many slabs.
    """
    slab = 1 << 14
    monkeypatch.setattr(cpu, "SLAB_ELEMS", slab)
    n, c, h, w = 2, 32, 48, 40
    x = rand(rng, T._shape(layout, n, c, h, w), dtype)
    wt = rand(rng, (c, 1, 3, 3), dtype)
    pw = rand(rng, (c, c), dtype)
    b = rand(rng, (c,), dtype)
    geo = dict(padding="same", layout=layout, backend="cpu")
    calls = {
        "depthwise": lambda: dwops.depthwise_conv2d(x, wt, b, activation="relu", **geo),
        "depthwise grad_input": lambda: dwops.depthwise_conv2d_grad_input(x, wt, x.shape, **geo),
        "depthwise grad_weight": lambda: dwops.depthwise_conv2d_grad_weight(x, x, wt.shape,
                                                                             **geo),
        "pointwise": lambda: dwops.pointwise_conv2d(x, pw, b, residual=x, layout=layout,
                                                    backend="cpu"),
        "pointwise grad_input": lambda: dwops.pointwise_conv2d_grad_input(
            x, pw, layout=layout, backend="cpu"),
        "pointwise grad_weight": lambda: dwops.pointwise_conv2d_grad_weight(
            x, x, layout=layout, backend="cpu"),
        "separable": lambda: dwops.separable_conv2d(x, wt, pw, b, dw_bias=b, residual=x,
                                                    dw_activation="relu", **geo),
    }
    for what, call in calls.items():
        call()  # compiled and loaded before measuring
        extra, out = _extra_bytes(call)
        bound = out.nbytes + 4 * slab * 4 + (64 << 10)
        assert extra <= bound, f"{what}: {extra} bytes extra, bound {bound}"
        assert x.size >= 4 * slab  # the arrays span several slabs
