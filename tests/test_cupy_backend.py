"""The cupy backend without a GPU: every kernel instantiation compiled for sm_90 (NVRTC +
nvJitLink) with its register / shared-memory / spill report, and the host-side launch logic.

The launch plans are checked two ways: by their invariants (tile covers the output, shared memory
within the limit the launch assumes, vector width only where sizes and addresses allow), and by
replaying the kernels' index arithmetic in NumPy (`_emulate_*`: the thread/tile loops of
depthwise.cuh and pointwise.cuh transliterated) against the reference, which catches a tile that is
too small, a wrong halo or a wrong operand stride without a GPU. The kernels themselves run in
tests/test_gpu_cupy.py: on a GPU, or on the CPU emulator (tests/test_cupy_emulated.py).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

import dwops
from dwops import _spec
from dwops.kernels import cupy_backend as cb
from dwops.kernels import cupy_compile as cuc
from dwops.kernels import cupy_plans as plans
from tests.conftest import assert_close, rand


@pytest.fixture(autouse=True)
def _h200_limits(monkeypatch):
    """The backend's plans here are made for the H200's limits (no device is read; the plans of
    the other device profiles are checked in tests/test_cupy_device.py)."""
    monkeypatch.setattr(cb.cupy_device, "limits", lambda ordinal=None: plans.H200)


# ----------------------------------------------------------------------------- the kernel report


@pytest.fixture(scope="module")
def report():
    """Compile every instantiation once per session (a few minutes of NVRTC + ptxas)."""
    pytest.importorskip("cuda.bindings")
    return cuc.compile_report("sm_90")


def test_include_dir_has_16_bit_headers():
    inc = cuc.cuda_include_dir()
    assert inc is not None
    assert os.path.isfile(os.path.join(inc, "cuda_fp16.h"))
    assert os.path.isfile(os.path.join(inc, "cuda_bf16.h"))


def test_every_instantiation_compiles_without_spills(report):
    assert len(report) == len({(f, n) for f, _, _, _, n in plans.instantiations()})
    bad = [r for r in report if r["error"] is not None]
    assert not bad, bad[0]["error"][:2000]
    spills = [r for r in report if r["spill_bytes"]]
    assert not spills, spills
    for r in report:
        assert r["backend"] == "cupy"
        assert set(r) == {"backend", "op", "direction", "specialization", "registers",
                          "shared_bytes", "spill_bytes", "error", "file", "name"}
        assert r["specialization"].startswith(r["name"] + " [")


@pytest.mark.parametrize("file, name, loads, stores", [
    ("depthwise", "dw_forward<float, float, 3, 1, 4, 2, false>", "ld.global.nc.v4.f32",
     "st.global.v4.f32"),
    ("depthwise", "dw_forward<__half, __half, 3, 1, 8, 4, true>", "ld.global.nc.v4.u32",
     "st.global.v4.u32"),
    # 16-bit input, float32 result (unfused separable): 8 floats per vector, two 16-byte stores
    ("depthwise", "dw_forward<__half, float, 3, 1, 8, 4, true>", "ld.global.nc.v4.u32",
     "st.global.v4.f32"),
    ("depthwise", "dw_forward<__nv_bfloat16, float, 3, 1, 8, 2, false>", "ld.global.nc.v4.u32",
     "st.global.v4.f32"),
    ("depthwise", "dw_forward<float, float, 0, 0, 4, 1, false>", "ld.global.nc.v4.f32", None),
    ("depthwise", "dw_forward<float, float, 3, 2, 4, 2, false>", "ld.global.nc.v4.f32",
     "st.global.v4.f32"),
    # strided input gradient: a cell row's two columns are one 8-byte store
    ("depthwise", "dw_grad_input<float, 3, 2, 4, false>", "ld.global.nc.v4.f32", "st.global.v2.f32"),
    ("depthwise", "dw_grad_input<float, 0, 0, 4, false>", "ld.global.nc.v4.f32", None),
    ("depthwise", "dw_grad_weight<float, 3, 4, 2, true>", "ld.global.nc.v4.f32", None),
])
def test_vector_instantiations_use_16_byte_global_accesses(file, name, loads, stores):
    """VEC > 1 instantiations compile to 128-bit global loads (read-only path) and, where the
    kernel writes whole vectors, 128-bit stores: the 16-byte access the plans pay alignment for."""
    pytest.importorskip("cuda.bindings")
    import re

    assert name in {row[-1] for row in plans.instantiations()}
    ptx, lowered = cuc.compile_ptx(file, [name])
    body = ptx.decode().split(lowered[name], 1)[1]
    found = set(re.findall(r"(?:ld|st)\.global(?:\.nc)?\.v\d\.\w+", body))
    assert loads in found, found
    assert stores is None or stores in found, found


def test_registers_and_static_shared_fit_the_launch(report):
    for r in report:
        # 256-thread blocks: at most 255 registers per thread (65536 per SM); pw_gemm asks for two
        # blocks per SM (<= 128 registers) except in double precision
        assert 0 < r["registers"] <= 255, r
        two_blocks = ("pw_gemm<", "dw_forward<", "dw_grad_weight<")
        if r["specialization"].startswith(two_blocks) and "<double" not in r["specialization"]:
            assert r["registers"] <= 128, r
        # static shared memory (pw_gemm tiles) stays under the 48 KiB that needs no opt-in
        assert r["shared_bytes"] <= plans.SMEM_DEFAULT, r


def test_report_covers_every_op_and_dtype(report):
    seen = {(r["op"], r["direction"]) for r in report}
    assert seen >= {("depthwise", "forward"), ("depthwise", "grad_input"),
                    ("depthwise", "grad_weight"), ("pointwise", "forward"),
                    ("pointwise", "grad_input"), ("pointwise", "grad_weight"),
                    ("separable", "forward")}
    for ctype in plans.CTYPE.values():
        assert any(f"<{ctype}," in r["specialization"] or f"<{ctype}>" in r["specialization"]
                   for r in report)


# ----------------------------------------------------------------------------- plan invariants

NAMES = {n for _, _, _, _, n in plans.instantiations()}


def _meta(shape, dtype="float64"):
    """An array with this shape and dtype and no memory (validation reads metadata only)."""
    return np.broadcast_to(np.zeros((), dwops._registry.numpy_dtype(dtype)), shape)


def _dw_problem(n=2, c=3, h=9, w=11, m=1, k=(3, 3), s=1, d=1, padding=1, layout="NCHW",
                dtype="float32", activation=None, bias=False):
    x = _meta(_spec._physical(layout, n, c, h, w), dtype)
    wt = _meta((c * m, 1, *k), dtype)
    b = _meta((c * m,), dtype) if bias else None
    p, _ = _spec.depthwise("t", x, wt, b, s, padding, d, layout, activation)
    return p


def test_pick_vec_alignment_and_divisibility():
    assert plans.pick_vec("float32", (64,), (0, 256)) == 4
    assert plans.pick_vec("float16", (64,), (0, 256)) == 8
    assert plans.pick_vec("float64", (64,), (0,)) == 2
    assert plans.pick_vec("float32", (66,), (0,)) == 1          # 66 % 4
    assert plans.pick_vec("float32", (64,), (8,)) == 1          # 8-byte aligned only
    assert plans.pick_vec("bfloat16", (64,), (16, 32)) == 8
    assert plans.pick_vec("float32", (64,), (0,), limit=2) == 2  # capped (NHWC grad_weight)
    assert plans.pick_vec("float16", (64,), (0,), limit=9) == 8
    assert plans.vec_choices("float16") == (8, 1)
    assert plans.vec_choices("float64") == (2, 1)


def test_specialization_choice():
    assert plans.kernel_size_spec(3, 3) == 3 and plans.kernel_size_spec(7, 7) == 7
    assert plans.kernel_size_spec(3, 5) == 0 and plans.kernel_size_spec(9, 9) == 0
    assert plans.dw_forward_spec(plans.conv_of_forward(_dw_problem(k=(5, 5)))) == (5, 1)
    s2 = plans.conv_of_forward(_dw_problem(k=(5, 5), s=2, w=16, padding=2))   # OW = 8
    assert plans.dw_forward_spec(s2, "NCHW", 8) == (5, 2)
    assert plans.dw_forward_spec(s2, "NCHW", 2) == (5, 2)
    assert plans.dw_forward_spec(s2, "NCHW", 16) == (0, 0)             # OW % VEC: no vector store
    # OW a multiple of half the vector: 8-byte vectors (bfloat16 W = 56, OW = 28)
    half = plans.conv_of_forward(_dw_problem(k=(3, 3), s=2, w=56, h=8, dtype="bfloat16"))
    L = plans.plan_dw_forward(half, "bfloat16", "NCHW", 0, 0)
    assert (L.info["K"], L.info["S"], L.info["vec"]) == (3, 2, 4) and L.name in NAMES
    L = plans.plan_dw_forward(half, "bfloat16", "NCHW", 0, 8)                   # y 8-byte aligned
    assert (L.info["S"], L.info["vec"]) == (0, 1)
    half = plans.conv_of_forward(_dw_problem(k=(3, 3), s=2, w=12, h=8))         # OW = 6
    assert plans.plan_dw_forward(half, "float32", "NCHW", 0, 0).info["vec"] == 2
    assert plans.dw_forward_spec(s2, "NCHW", 1) == (0, 0)              # unvectorized: generic
    assert plans.dw_forward_spec(s2, "NHWC", 8) == (0, 0)              # NCHW only
    for kw in (dict(k=(1, 1), padding=0), dict(k=(3, 3), s=(2, 1)), dict(k=(3, 3), s=3),
               dict(k=(3, 3), d=2, padding=2), dict(k=(3, 5), padding=(1, 2))):
        kw.setdefault("s", 2)
        c = plans.conv_of_forward(_dw_problem(w=16, **kw))
        assert plans.dw_forward_spec(c, "NCHW", 2) == (0, 0), kw
    assert plans.dw_forward_spec(plans.conv_of_forward(_dw_problem(k=(3, 3), d=2, padding=2))) == (0, 0)
    assert plans.dw_forward_spec(plans.conv_of_forward(_dw_problem(k=(1, 7), padding=0))) == (0, 0)


CASES = [
    dict(),
    dict(k=(1, 1), padding=0),
    dict(k=(5, 5), padding="same", h=13, w=17),
    dict(k=(7, 7), padding=3, w=64, h=8),
    dict(k=(3, 3), s=2, padding="same", w=32, h=15),
    dict(k=(3, 3), s=(2, 3), d=(1, 2), padding=((0, 2), (1, 3)), w=20, h=14),
    dict(k=(3, 5), padding=(1, 2), m=2),
    dict(k=(9, 9), padding=4, h=20, w=24),
    dict(k=(31, 31), padding="same", h=33, w=40, c=2),
    dict(k=(3, 3), d=3, padding=3, m=3, c=2),
    dict(k=(3, 3), padding=0, h=3, w=3, n=1, c=1),
    dict(k=(7, 7), padding=3, c=40, m=1, w=12, h=6),
    dict(k=(3, 3), padding=1, c=64, w=16, h=16, n=1),
    dict(k=(31, 31), padding=15, d=(3, 2), h=100, w=70, n=1, c=1),
]


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_dw_forward_plan_invariants(case, dtype, layout):
    p = _dw_problem(layout=layout, dtype=dtype, **CASES[case])
    c = plans.conv_of_forward(p)
    L = plans.plan_dw_forward(c, dtype, layout, 0, 0)
    assert L.name in NAMES
    (N, CI, H, W, CO, OH, OW, KH, KW, sh, sw, dh, dw, pt, pl, M, R, flip, act,
     TH, TW, IH, IW, IP, CP) = L.ints
    K, S, vec, opt = L.info["K"], L.info["S"], L.info["vec"], L.info["opt"]
    bx, by, bz = L.block
    assert bx * by * bz <= plans.THREADS and bx * by >= 1
    assert L.shared <= plans.H200.smem_optin
    if bx * by >= 32:
        assert L.shared <= plans.SMEM_DEFAULT or L.info["tile"] == (TH, TW)
    assert L.grid[0] == math.ceil(OH / TH) * math.ceil(OW / TW)
    if layout == "NCHW":
        assert TW == bx * vec and TH == by * opt
        assert L.grid[1] == min(N * CO, 65535)
        assert L.shared == IH * IP * plans.ITEMSIZE[dtype]
        assert IP % vec == 0
        if vec > 1:
            assert W % vec == 0
    else:
        assert L.grid[1] * bx * vec >= CO and L.grid[2] == min(N, 65535)
        assert TW % opt == 0 and by == TH * (TW // opt)
        assert L.shared == IH * IW * IP * plans.ITEMSIZE[dtype]
        assert CP <= IP and CP % vec == 0 and IP % vec == 0   # IP: CP padded against conflicts
        if vec > 1:
            assert M == 1 and CI % vec == 0 and CO % vec == 0
    if K and S == 1:
        assert KH == KW == K and sh == sw == dh == dw == 1
    elif K:
        assert S == 2 and layout == "NCHW" and K in plans.DW_FWD_S2_K and KH == KW == K
        assert sh == sw == 2 and dh == dw == 1 and vec > 1 and OW % vec == 0
        # phase-split rows: both halves hold every column a thread's vectors read
        assert IH == (TH - 1) * 2 + K and IW == (TW - 1) * 2 + K
        assert CP % vec == 0 and CP >= (bx - 1) * vec + math.ceil((vec + (K + 1) // 2 - 1) / vec) * vec
        assert IP - CP >= (bx - 1) * vec + math.ceil((vec + K // 2 - 1) / vec) * vec
    else:
        assert S == 0


def test_shared_pitch_keeps_the_rows_of_one_request_in_distinct_banks():
    # by hand: 32 lanes of 4 bytes at consecutive words: 1 wavefront; two lanes per bank: 2
    assert plans.smem_ways([4 * i for i in range(32)], 4) == 1
    assert plans.smem_ways([8 * i for i in range(32)], 4) == 2
    assert plans.smem_ways([0] * 32, 4) == 1                       # a broadcast
    assert plans.smem_ways([16 * i for i in range(32)], 16) == 4   # four quarter-warp passes
    # bfloat16, 16-byte vectors, 4 lanes per row, rows 2 tile rows apart: a quarter-warp pass
    # holds 2 rows of 64 bytes; pitch 40 puts them 160 bytes apart (banks 8-23 twice: 2-way),
    # pitch 48 192 bytes apart (banks 16-31 after 0-15)
    assert plans.conflict_free_pitch(40, 8, 2, 4, 2) == 48
    # bfloat16, 8-byte vectors, 8 lanes per row: a half-warp pass holds 2 rows; 4 * pitch bytes
    # apart must be 64 mod 128: pitch 48
    assert plans.conflict_free_pitch(36, 4, 2, 8, 2) == 48
    # one row per pass (float32, 16-byte vectors, 8 lanes per row): nothing to pad
    assert plans.conflict_free_pitch(36, 4, 4, 8, 2) == 36
    assert plans.conflict_free_pitch(24, 4, 4, 32, 2) == 24
    for ip_min, vec, item, bw, rows in [(40, 8, 2, 4, 2), (18, 2, 4, 8, 2), (12, 4, 4, 2, 1)]:
        ip = plans.conflict_free_pitch(ip_min, vec, item, bw, rows)
        assert ip >= ip_min and ip % vec == 0
        ways = plans.smem_ways([((l // bw) * rows * ip + (l % bw) * vec) * item
                                for l in range(32)], vec * item)
        assert ways == max(1, 32 * vec * item // 128)   # the ideal: distinct words / 32


def test_vector_width_follows_alignment():
    p = _dw_problem(w=64, h=8, c=8, layout="NCHW")
    c = plans.conv_of_forward(p)
    assert plans.plan_dw_forward(c, "float32", "NCHW", 1024, 2048).info["vec"] == 4
    assert plans.plan_dw_forward(c, "float32", "NCHW", 1028, 2048).info["vec"] == 1
    p = _dw_problem(w=63, h=8, c=8, layout="NCHW")
    assert plans.plan_dw_forward(plans.conv_of_forward(p), "float32", "NCHW", 0, 0).info["vec"] == 1
    p = _dw_problem(w=9, h=8, c=16, layout="NHWC", dtype="float16")
    assert plans.plan_dw_forward(plans.conv_of_forward(p), "float16", "NHWC", 0, 0).info["vec"] == 8
    p = _dw_problem(w=9, h=8, c=16, m=2, layout="NHWC", dtype="float16")
    assert plans.plan_dw_forward(plans.conv_of_forward(p), "float16", "NHWC", 0, 0).info["vec"] == 1


def test_tile_shrinks_then_opts_in_for_large_kernels():
    p = _dw_problem(k=(31, 31), padding=15, d=(3, 3), h=200, w=200, n=1, c=1)
    L = plans.plan_dw_forward(plans.conv_of_forward(p), "float32", "NCHW", 0, 0)
    assert plans.SMEM_DEFAULT < L.shared <= plans.H200.smem_optin
    p = _dw_problem(k=(31, 31), padding=15, h=200, w=200, n=1, c=1)
    L = plans.plan_dw_forward(plans.conv_of_forward(p), "float32", "NCHW", 0, 0)
    assert L.shared <= plans.SMEM_DEFAULT
    p = _dw_problem(k=(31, 31), padding=0, d=(40, 40), h=1300, w=1300, n=1, c=1)
    with pytest.raises(NotImplementedError):
        plans.plan_dw_forward(plans.conv_of_forward(p), "float32", "NCHW", 0, 0)


def test_prefers_unless_no_plan_fits():
    be = cb.BACKEND
    p = _dw_problem(k=(3, 3), padding=1)
    for op in ("depthwise_forward", "depthwise_grad_input", "depthwise_grad_weight",
               "depthwise_backward"):
        assert be.prefers(op, p)
    huge = _dw_problem(k=(31, 31), padding=0, d=(40, 40), h=1300, w=1300, n=1, c=1)
    assert not be.prefers("depthwise_forward", huge)
    assert not be.prefers("depthwise_grad_weight", huge)
    assert not be.prefers("depthwise_backward", huge)
    assert be.prefers("pointwise_forward", _pw_problem())


def test_stride1_grad_input_is_a_rotated_forward():
    p = _dw_problem(k=(3, 5), padding=((0, 2), (1, 3)), m=2)
    c = plans.conv_of_grad_input(p)
    assert (c.CI, c.CO, c.M, c.R, c.flip) == (p.CO, p.C, 1, p.M, 1)
    assert (c.H, c.W, c.OH, c.OW) == (p.OH, p.OW, p.H, p.W)
    assert (c.pt, c.pl) == ((p.KH - 1) * p.dh - p.pt, (p.KW - 1) * p.dw - p.pl)
    L = plans.plan_dw_grad_input(p, "NCHW")
    assert L.name.startswith("dw_forward<")
    ps = _dw_problem(k=(3, 3), s=2, padding=1)
    assert plans.plan_dw_grad_input(ps, "NCHW").name.startswith("dw_grad_input<")


# ----------------------------------------------------------------------------- kernel replays


def _ref_layout(a, layout):
    return a if layout == "NCHW" else a.transpose(0, 2, 3, 1)


def _emulate_dw_forward(L, x, w, bias, layout):
    """dw_forward's tile loop (depthwise.cuh) in NumPy: the input tile of (IH, IP) / (IH, IW, CP)
    staged with zeros outside the image, then each thread's outputs from the tile only."""
    (N, CI, H, W, CO, OH, OW, KH, KW, sh, sw, dh, dw, pt, pl, M, R, flip, act,
     TH, TW, IH, IW, IP, CP) = L.ints
    K, S, vec, opt = L.info["K"], L.info["S"], L.info["vec"], L.info["opt"]
    bx, by, _ = L.block
    xl = x if layout == "NCHW" else x.transpose(0, 3, 1, 2)          # logical view
    y = np.full((N, CO, OH, OW), np.nan)
    wk = w.reshape(CO * R, KH, KW)
    if flip:
        wk = wk[:, ::-1, ::-1]
    tiles_w = math.ceil(OW / TW)
    for blk in range(L.grid[0]):
        oy0, ox0 = (blk // tiles_w) * TH, (blk % tiles_w) * TW
        iy0, ix0 = oy0 * sh - pt, ox0 * sw - pl
        for n in range(N):
            for o in range(CO):
                acc = np.zeros((by, bx, opt, vec)) if layout == "NCHW" else np.zeros((by, opt))
                for m in range(R):
                    ci = (o // M) * R + m
                    width = IP if layout == "NCHW" else IW
                    tile = np.zeros((IH, width))
                    if K and S == 2:       # phase-split rows, NaN where nothing is staged
                        tile[:] = np.nan
                    for r in range(IH):
                        for cc in range(IW if K and S == 2 else width):
                            gy, gx = iy0 + r, ix0 + cc
                            v = xl[n, ci, gy, gx] if 0 <= gy < H and 0 <= gx < W else 0.0
                            if K and S == 2:
                                tile[r, (cc % 2) * CP + cc // 2] = v
                            else:
                                tile[r, cc] = v
                    if layout == "NHWC":
                        # the lane's channel must lie inside the staged channel range
                        TC = bx * vec
                        o0 = (o // TC) * TC
                        assert 0 <= ci - (o0 // M) * R < IP
                    ty = np.arange(by)[:, None, None, None]
                    tx = np.arange(bx)[None, :, None, None]
                    r_ = np.arange(opt)[None, None, :, None]
                    c_ = np.arange(vec)[None, None, None, :]
                    for a in range(KH):
                        for b in range(KW):
                            if layout == "NCHW":
                                if K and S == 2:
                                    rows = (ty * opt + r_) * 2 + a
                                    cols = (b % 2) * CP + tx * vec + c_ + b // 2
                                    assert (b % 2) * CP + (bx - 1) * vec + vec + b // 2 <= IP
                                elif K and S:
                                    nwv = -(-(vec + K - 1) // vec)
                                    assert (bx - 1) * vec + nwv * vec <= IP  # window vector reads
                                    rows, cols = ty * opt + r_ + a, tx * vec + c_ + b
                                else:
                                    rows = (ty * opt + r_) * sh + a * dh
                                    cols = (tx + c_ * bx) * sw + b * dw
                                acc += wk[o * R + m, a, b] * tile[rows, cols]
                            else:
                                twt = TW // opt
                                t = np.arange(by)
                                py, px = t // twt, t % twt
                                rows = (py[:, None] * sh + a * dh)
                                cols = (px[:, None] * opt + np.arange(opt)[None, :]) * sw + b * dw
                                ok = py < TH
                                acc[ok] += wk[o * R + m, a, b] * tile[rows[ok], cols[ok]]
                bv = bias[o] if bias is not None else 0.0
                if layout == "NCHW":
                    for t_y in range(by):
                        for t_x in range(bx):
                            for r in range(opt):
                                for cc in range(vec):
                                    oy = oy0 + t_y * opt + r
                                    ox = ox0 + (t_x * vec + cc if K and S else t_x + cc * bx)
                                    if oy < OH and ox < OW:
                                        y[n, o, oy, ox] = acc[t_y, t_x, r, cc] + bv
                else:
                    twt = TW // opt
                    for t in range(by):
                        py, px = t // twt, t % twt
                        for cc in range(opt):
                            oy, ox = oy0 + py, ox0 + px * opt + cc
                            if py < TH and oy < OH and ox < OW:
                                y[n, o, oy, ox] = acc[t, cc] + bv
    return dwops.reference.activate(y, {v: k for k, v in _spec.ACTIVATION_CODES.items()}[act])


SMALL = [
    dict(n=1, c=2, h=7, w=9),
    dict(n=1, c=2, h=6, w=8, k=(1, 1), padding=0, activation="relu"),
    dict(n=1, c=1, h=9, w=13, k=(5, 5), padding="same", bias=True),
    dict(n=1, c=1, h=8, w=16, k=(7, 7), padding=3, activation="gelu"),
    dict(n=2, c=1, h=9, w=10, k=(3, 3), s=2, padding="same"),
    dict(n=1, c=1, h=11, w=12, k=(3, 3), s=(2, 3), d=(1, 2), padding=((0, 2), (1, 3))),
    dict(n=1, c=2, h=6, w=7, k=(3, 5), padding=(1, 2), m=2, bias=True),
    dict(n=1, c=2, h=7, w=8, k=(3, 3), d=3, padding=3, m=3),
    dict(n=1, c=1, h=3, w=3, k=(3, 3), padding=0),
    dict(n=1, c=1, h=12, w=10, k=(9, 9), padding=4),
    dict(n=1, c=2, h=11, w=16, k=(3, 3), s=2, padding=1, bias=True),
    dict(n=1, c=1, h=13, w=24, k=(5, 5), s=2, padding=((1, 2), (2, 1)), activation="relu"),
    dict(n=1, c=1, h=15, w=36, k=(7, 7), s=2, padding=3),
]


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("case", range(len(SMALL)))
def test_dw_forward_replay_matches_reference(case, layout, rng):
    kw = dict(SMALL[case])
    p = _dw_problem(layout=layout, dtype="float64", **kw)
    x = rng.uniform(-1, 1, p.x_shape)
    w = rng.uniform(-1, 1, p.w_shape)
    b = rng.uniform(-1, 1, (p.CO,)) if p.has_bias else None
    for addr in (0, 8):   # aligned (vectorized) and misaligned (scalar) plans
        L = plans.plan_dw_forward(plans.conv_of_forward(p), "float64", layout, addr, 0)
        got = _emulate_dw_forward(L, x, w, b, layout)
        ref = dwops.reference.depthwise_conv2d(x, w, b, stride=(p.sh, p.sw), dilation=(p.dh, p.dw),
                                               padding=((p.pt, p.pb), (p.pl, p.pr)), layout=layout,
                                               activation=p.activation)
        assert_close(_ref_layout(got, layout), ref, "float64", what=L.name)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("case", [0, 2, 6, 7, 9])
def test_stride1_grad_input_replay(case, layout, rng):
    kw = dict(SMALL[case])
    kw.pop("activation", None)
    kw.pop("bias", None)
    p = _dw_problem(layout=layout, dtype="float64", **kw)
    gy = rng.uniform(-1, 1, p.y_shape)
    w = rng.uniform(-1, 1, p.w_shape)
    L = plans.plan_dw_grad_input(p, layout)
    got = _emulate_dw_forward(L, gy, w, None, layout)
    ref = dwops.reference.depthwise_conv2d_grad_input(
        gy, w, p.x_shape, stride=(p.sh, p.sw), dilation=(p.dh, p.dw),
        padding=((p.pt, p.pb), (p.pl, p.pr)), layout=layout)
    assert_close(_ref_layout(got, layout), ref, "float64", what=L.name)


def _emulate_dw_grad_input(L, gy, w, layout):
    """dw_grad_input in NumPy: the gy tile from (iy0, ix0) of IH x IW, and for every gx pixel of
    the tile the taps with exact division (those the kernel's phases enumerate): the plan's tile
    and staged extent must hold every tap the pixel reads."""
    (N, C, H, W, M, OH, OW, KH, KW, sh, sw, dh, dw, pt, pl, TH, TW, IH, IW, IP, CP) = L.ints
    CO = C * M
    g = gy if layout == "NCHW" else gy.transpose(0, 3, 1, 2)
    wk = w.reshape(CO, KH, KW)
    gx = np.full((N, C, H, W), np.nan)
    tiles_w = math.ceil(W / TW)
    for blk in range(L.grid[0]):
        p0, q0 = (blk // tiles_w) * TH, (blk % tiles_w) * TW
        iy0 = -((-(p0 + pt - (KH - 1) * dh)) // sh)
        ix0 = -((-(q0 + pl - (KW - 1) * dw)) // sw)
        for n in range(N):
            for c in range(C):
                acc = np.zeros((TH, TW))
                for m in range(M):
                    o = c * M + m
                    tile = np.zeros((IH, IW))
                    for r in range(IH):
                        for cc in range(IW):
                            i, j = iy0 + r, ix0 + cc
                            if 0 <= i < OH and 0 <= j < OW:
                                tile[r, cc] = g[n, o, i, j]
                    for pp in range(TH):
                        for qq in range(TW):
                            for a in range(KH):
                                nh = p0 + pp + pt - a * dh
                                if nh % sh:
                                    continue
                                for b in range(KW):
                                    nw = q0 + qq + pl - b * dw
                                    if nw % sw:
                                        continue
                                    acc[pp, qq] += wk[o, a, b] * tile[nh // sh - iy0, nw // sw - ix0]
                hh, ww = min(TH, H - p0), min(TW, W - q0)
                gx[n, c, p0:p0 + hh, q0:q0 + ww] = acc[:hh, :ww]
    return gx


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("case", [4, 5])
def test_strided_grad_input_replay(case, layout, rng):
    kw = dict(SMALL[case])
    p = _dw_problem(layout=layout, dtype="float64", **kw)
    gy = rng.uniform(-1, 1, p.y_shape)
    w = rng.uniform(-1, 1, p.w_shape)
    L = plans.plan_dw_grad_input(p, layout)
    assert L.name.startswith("dw_grad_input<") and L.name in NAMES
    got = _emulate_dw_grad_input(L, gy, w, layout)
    ref = dwops.reference.depthwise_conv2d_grad_input(
        gy, w, p.x_shape, stride=(p.sh, p.sw), dilation=(p.dh, p.dw),
        padding=((p.pt, p.pb), (p.pl, p.pr)), layout=layout)
    assert_close(_ref_layout(got, layout), ref, "float64", what=L.name)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("case", range(len(SMALL)))
def test_dw_grad_weight_plan_covers_every_tile(case, layout):
    kw = dict(SMALL[case])
    p = _dw_problem(layout=layout, dtype="float32", **kw)
    s1, s2, count = plans.plan_dw_grad_weight(p, layout, 0, 0)
    assert s1.name in NAMES and s2.name in NAMES
    th, tw = s1.info["tile"]
    ntiles = p.N * math.ceil(p.OH / th) * math.ceil(p.OW / tw)
    per = s1.ints[-1]
    splits = s1.grid[0]
    assert (splits - 1) * per < ntiles <= splits * per       # every tile in exactly one split
    assert count == splits * p.CO * p.KH * p.KW
    assert s2.ints == (splits, p.CO * p.KH * p.KW)
    assert s1.shared <= plans.H200.smem_optin
    acc = plans.ACC_ITEMSIZE["float32"]
    nthr = s1.block[0] * s1.block[1]
    if s1.name.startswith("dw_grad_weight_direct<"):
        K = s1.info["K"]
        assert K == p.KH == p.KW and layout == "NCHW" and s1.info["tile"] == (1, 1)
        assert s1.shared >= math.ceil(nthr / 32) * K * K * acc          # warp partials
        assert s1.grid[1] == min(p.CO, 65535) and per % nthr == 0
    elif s1.name.startswith("dw_grad_weight<"):
        K = s1.info["K"]
        assert K == p.KH == p.KW
        if layout == "NCHW":
            assert K not in plans.GW_DIRECT_K
            assert s1.shared >= math.ceil(nthr / 32) * K * K * acc      # warp partials
            assert s1.grid[1] == min(p.CO, 65535)
        else:
            assert s1.shared >= nthr * s1.info["vec"] * K * K * acc     # per-thread partials
            assert K * K * s1.info["vec"] <= max(plans.GW_NHWC_ACC_REGS, K * K)
    else:
        taps = s1.block[1] * plans.TAPS_PER_THREAD
        assert s1.grid[2] * taps >= p.KH * p.KW


# ----------------------------------------------------------------------------- pointwise


def _pw_problem(n=2, ci=5, co=7, h=3, w=4, layout="NCHW", activation=None, bias=False,
                residual=False):
    x = _meta(_spec._physical(layout, n, ci, h, w))
    wt = _meta((co, ci))
    b = _meta((co,)) if bias else None
    r = _meta(_spec._physical(layout, n, co, h, w)) if residual else None
    p, _ = _spec.pointwise("t", x, wt, b, layout, activation, r)
    return p


def _emulate_gemm(L, A, B):
    """pw_gemm's operand addressing and split-K bookkeeping in NumPy: returns C per batch (or,
    for PARTIAL, the sum of the split partials)."""
    (bias_on_n, Md, Nd, Kd, lda, ldb, ldc, sA, sB, sC, batches, per_batch, k_splits) = L.ints
    a_kc, b_nc, partial = (t.strip() == "true" for t in L.name[:-1].split(",")[-3:])
    m, k = np.arange(Md)[:, None], np.arange(Kd)[None, :]
    kk, j = np.arange(Kd)[:, None], np.arange(Nd)[None, :]
    A, B = A.ravel(), B.ravel()

    def mats(bt, k_lo, k_hi):
        Am = A[bt * sA + (m * lda + k if a_kc else k * lda + m)][:, k_lo:k_hi]
        Bm = B[bt * sB + (kk * ldb + j if b_nc else j * ldb + kk)][k_lo:k_hi]
        return Am @ Bm

    if not partial:
        return [mats(bt, 0, Kd) for bt in range(batches)], ldc, sC
    total = np.zeros((Md, Nd))
    chunk = -(-(-(-Kd // k_splits)) // plans.PW_BK) * plans.PW_BK
    seen = np.zeros((batches, Kd), int)
    for z in range(L.grid[2]):
        g, ks = divmod(z, k_splits)
        for bt in range(g * per_batch, min(batches, (g + 1) * per_batch)):
            lo, hi = ks * chunk, min(Kd, ks * chunk + chunk)
            if lo < hi:
                total += mats(bt, lo, hi)
                seen[bt, lo:hi] += 1
    assert (seen == 1).all()   # every (batch, k) exactly once over the splits
    return total


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("shape", [dict(), dict(n=1, ci=70, co=3, h=9, w=9),
                                   dict(n=3, ci=1, co=130, h=1, w=67),
                                   dict(n=40, ci=3, co=2, h=2, w=2)])
def test_pointwise_operands_replay(layout, shape, rng):
    p = _pw_problem(layout=layout, **shape)
    x = rng.uniform(-1, 1, p.x_shape)
    w = rng.uniform(-1, 1, (p.CO, p.CI))
    gy = rng.uniform(-1, 1, p.y_shape)
    arrays = {"x": x, "w": w, "gy": gy}
    refs = {
        "forward": dwops.reference.pointwise_conv2d(x, w, layout=layout),
        "grad_input": dwops.reference.pointwise_conv2d_grad_input(gy, w, layout=layout),
        "grad_weight": dwops.reference.pointwise_conv2d_grad_weight(x, gy, layout=layout),
    }
    for op, ref in refs.items():
        L, red, count = plans.plan_pointwise(op, p, layout)
        assert L.name in NAMES
        Md, Nd = L.ints[1], L.ints[2]
        assert L.grid[0] == math.ceil(Md / 64) * math.ceil(Nd / 64)
        assert L.grid[2] <= 65535
        a, b, c = L.info["operands"]
        if red is None:
            mats, ldc, sC = _emulate_gemm(L, arrays[a], arrays[b])
            out = np.full(ref.size, np.nan)
            mm, jj = np.arange(Md)[:, None], np.arange(Nd)[None, :]
            for bt, C in enumerate(mats):
                out[bt * sC + mm * ldc + jj] = C
            assert_close(out.reshape(ref.shape), ref, "float64", what=f"{op} {L.name}")
        else:
            assert red.name in NAMES and count == L.grid[2] * p.CO * p.CI
            total = _emulate_gemm(L, arrays[a], arrays[b])
            assert_close(total, ref, "float64", what=f"{op} {L.name}")


def test_gemm_strides_are_64_bit():
    p = _pw_problem(n=64, ci=64, co=64, h=512, w=512, layout="NCHW")
    L, _, _ = plans.plan_pointwise("forward", p, "NCHW")
    assert all(isinstance(v, plans._I64) for v in L.ints[4:10])
    assert L.ints[8] == 64 * 512 * 512   # sB = CI * H * W
    assert cb._scalars(L.ints)[8].dtype == np.int64


# ----------------------------------------------------------------------------- separable


def _sep_problem(c=8, m=1, co=16, k=3, layout="NCHW", h=10, w=12, dtype="float32"):
    x = _meta(_spec._physical(layout, 2, c, h, w), dtype)
    dww = _meta((c * m, 1, k, k), dtype)
    pww = _meta((co, c * m), dtype)
    p, _ = _spec.separable("t", x, dww, pww, None, None, 1, "same", 1, layout, "relu", None, None)
    return p


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_separable_fuses_when_the_tile_fits(layout):
    p = _sep_problem(layout=layout)
    L = plans.plan_separable(p, layout)
    assert L is not None and L.name in NAMES
    th, tw = L.info["tile"]
    assert th * tw <= plans.SEP_TP
    assert L.grid[0] == math.ceil(p.dw.OH / th) * math.ceil(p.dw.OW / tw)
    assert L.shared <= plans.SEP_SMEM_MAX
    assert plans.plan_separable(_sep_problem(c=512, co=64, layout=layout), layout) is None
    assert plans.plan_separable(_sep_problem(c=64, k=5, layout=layout, dtype="float64"), layout)


# ----------------------------------------------------------------------------- 16-bit: no casts


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_unfused_16_bit_plans_read_16_bit_and_write_float32(dtype, layout):
    """The unfused separable forward's two launches: dw_forward reads the 16-bit x and writes
    float32 (vectors only where the float32 output is aligned for them), pw_gemm reads that
    float32 result as its x operand and the 16-bit weights; both are in the kernel report."""
    ct = plans.CTYPE[dtype]
    assert plans.mid_dtype(dtype) == "float32"
    assert plans.mid_dtype("float32") == "float32" and plans.mid_dtype("float64") == "float64"
    p = _sep_problem(c=16, co=24, layout=layout, h=8, w=16, dtype=dtype)
    c = plans.conv_of_forward(p.dw)
    L = plans.plan_dw_forward(c, dtype, layout, 0, 0, "float32")
    assert L.name.startswith(f"dw_forward<{ct}, float, 3, 1, 8,") and L.name in NAMES
    same = plans.plan_dw_forward(c, dtype, layout, 0, 0)
    assert same.name == L.name.replace(", float,", f", {ct},", 1) and same.name in NAMES
    assert (L.grid, L.block, L.shared, L.ints) == (same.grid, same.block, same.shared, same.ints)
    # 16 bytes: aligned for 8 halves, not for 8 floats (32 bytes)
    assert plans.plan_dw_forward(c, dtype, layout, 0, 16).info["vec"] == 8
    assert plans.plan_dw_forward(c, dtype, layout, 0, 16, "float32").info["vec"] == 1
    assert plans.plan_dw_forward(c, dtype, layout, 0, 32, "float32").info["vec"] == 8
    gemm, red, _ = plans.plan_pointwise("forward", p.pw, layout, "float32")
    x_first = layout == "NHWC"   # NHWC: A = x; NCHW: B = x
    ops = "float, " + ct if x_first else ct + ", float"
    assert red is None and gemm.name.startswith(f"pw_gemm<{ct}, {ops}, ") and gemm.name in NAMES
    plain, _, _ = plans.plan_pointwise("forward", p.pw, layout)
    assert plain.name.startswith(f"pw_gemm<{ct}, {ct}, {ct}, ") and plain.ints == gemm.ints
    with pytest.raises(ValueError):
        plans.plan_pointwise("grad_input", p.pw, layout, "float32")


def _recorded_backend(monkeypatch):
    """The backend on the NumPy stand-in for CuPy (dwops/cudaemu), its launches recorded instead
    of run: (launches, allocations) lists filled as the backend works. Allocations are the
    stand-in's device arrays (bytes each); NumPy-level temporaries show in tracemalloc."""
    import sys

    from dwops import cudaemu

    launches, allocations = [], []
    real_init = cudaemu._Allocation.__init__

    def counting_init(self, nbytes):
        allocations.append(nbytes)
        real_init(self, nbytes)

    monkeypatch.setattr(cudaemu._Allocation, "__init__", counting_init)
    monkeypatch.setitem(sys.modules, "cupy", cudaemu.module())
    monkeypatch.setattr(cb.CupyBackend, "_function", lambda self, launch: (
        lambda grid, block, args, shared_mem=0: launches.append((launch.name, args))))
    return cudaemu, launches, allocations


def _extra_bytes(call, allocations):
    """Device bytes a call allocates plus the peak of host (NumPy) memory it allocates (a second
    call: the first one's imports are not the call's memory)."""
    import tracemalloc

    call()
    del allocations[:]
    tracemalloc.start()
    try:
        call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return sum(allocations) + peak


def _same_memory(a, b):
    """The kernel argument ``a`` is the whole of array ``b`` (the same address and size)."""
    return a.ctypes.data == b.ctypes.data and a.nbytes == b.nbytes


SLACK = 16 * 1024   # Python objects of a call (plans, argument tuples), no array data


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_16_bit_forward_paths_make_no_whole_array_copies(dtype, layout, rng, monkeypatch):
    """Extra memory of a 16-bit call <= tile scratch (plus the float32 depthwise result of the
    unfused separable forward): the kernels convert per tile, no call casts a whole input or
    output to float32. The kernels read the caller's arrays and write the caller's output."""
    emu, launches, allocations = _recorded_backend(monkeypatch)
    monkeypatch.setattr(plans, "SEP_SMEM_MAX", 0)    # the unfused separable path at any size
    be = cb.BACKEND
    n, c, co, h, w = 2, 40, 24, 33, 31

    def dev(a):
        return emu.asarray(a.view(np.uint16) if dtype == "bfloat16" else a)

    def wide(shape):
        return emu.empty(shape, np.uint16 if dtype == "bfloat16" else np.float16)

    x = rand(rng, _spec._physical(layout, n, c, h, w), dtype)
    dww, pww = rand(rng, (c, 1, 3, 3), dtype), rand(rng, (co, c), dtype)
    b, dwb = rand(rng, (co,), dtype), rand(rng, (c,), dtype)
    r = rand(rng, _spec._physical(layout, n, co, h, w), dtype)
    p, _ = _spec.separable("t", x, dww, pww, b, dwb, 1, "same", 1, layout, "relu", "gelu", r)
    assert plans.plan_separable(p, layout) is None
    X, DWW, PWW, B, DWB, R = (dev(a) for a in (x, dww, pww, b, dwb, r))
    OUT = wide(p.y_shape)
    mid_bytes = math.prod(p.dw.y_shape) * 4
    weights_t = c * 9 * 2     # NHWC: the depthwise taps transposed (KH*KW, C)
    extra = _extra_bytes(lambda: be.separable_forward(p, X, DWW, PWW, B, DWB, R, OUT, 0),
                         allocations)
    assert mid_bytes > 4 * SLACK and extra <= mid_bytes + weights_t + SLACK, (extra, mid_bytes)
    (dname, dargs), (pname, pargs) = launches[-2:]
    ct = plans.CTYPE[dtype]
    assert dname.startswith(f"dw_forward<{ct}, float,") and dargs[0] is X and dargs[2] is DWB
    mid = dargs[3]
    assert mid.dtype == np.float32 and mid.shape == p.dw.y_shape
    assert pname.startswith(f"pw_gemm<{ct}, ")
    same = _same_memory
    want = (mid, PWW) if layout == "NHWC" else (PWW, mid)
    assert same(pargs[0], want[0]) and same(pargs[1], want[1])
    assert same(pargs[2], OUT) and same(pargs[4], B) and same(pargs[6], R)

    # pointwise and depthwise forward: no scratch at all (NHWC depthwise: the transposed taps)
    launches.clear()
    pp, _ = _spec.pointwise("t", x, pww, b, layout, "silu", r)
    extra = _extra_bytes(lambda: be.pointwise_forward(pp, X, PWW, B, R, OUT, 0), allocations)
    assert extra <= SLACK and _same_memory(launches[0][1][2], OUT), extra
    pd, _ = _spec.depthwise("t", x, dww, dwb, 1, "same", 1, layout, "relu6")
    Y = wide(pd.y_shape)
    extra = _extra_bytes(lambda: be.depthwise_forward(pd, X, DWW, DWB, Y, 0), allocations)
    assert extra <= weights_t + SLACK and launches[-1][1][3] is Y, extra


# ----------------------------------------------------------------------------- backend plumbing


def test_backend_interface_and_availability():
    be = cb.BACKEND
    assert be.name == "cupy" and be.device == "cuda"
    assert isinstance(be, dwops._registry.Backend)
    reason = be.unavailable_reason()
    from tests.conftest import has_gpu

    if has_gpu():
        assert reason is None
    else:
        assert isinstance(reason, str) and reason
        x = np.ones((1, 1, 3, 3), np.float32)
        with pytest.raises(dwops.BackendUnavailableError):
            dwops.depthwise_conv2d(x, np.ones((1, 1, 3, 3), np.float32), backend="cupy")


def _emulate_dw_grad_weight(s1, x, gy, p, layout):
    """Stage 1 of the weight gradient in NumPy (either kernel): every split walks its tiles,
    stages the x tile of the plan's size and accumulates gy * tile over the tile's outputs; stage
    2 adds the splits."""
    th, tw = s1.info["tile"]
    if s1.name.startswith("dw_grad_weight_direct<"):   # positions walked linearly per split
        per = s1.ints[-1]
        plane = p.OH * p.OW
        partial = np.zeros((s1.grid[0], p.CO, p.KH, p.KW))
        for split in range(s1.grid[0]):
            for pos in range(split * per, min(p.N * plane, (split + 1) * per)):
                n, q = divmod(pos, plane)
                oy, ox = divmod(q, p.OW)
                for o in range(p.CO):
                    for a in range(p.KH):
                        for b in range(p.KW):
                            iy, ix = oy * p.sh + a * p.dh - p.pt, ox * p.sw + b * p.dw - p.pl
                            if 0 <= iy < p.H and 0 <= ix < p.W:
                                partial[split, o, a, b] += gy[n, o, oy, ox] * x[n, o // p.M, iy, ix]
        return partial.sum(axis=0)[:, None]
    if s1.name.startswith("dw_grad_weight<"):
        IH, IW, IP, per = s1.ints[15], s1.ints[16], s1.ints[17], s1.ints[19]
        width = IP if layout == "NCHW" else IW
    else:
        IH, IW, per = s1.ints[17], s1.ints[18], s1.ints[19]
        width = IW
    xl = x if layout == "NCHW" else x.transpose(0, 3, 1, 2)
    gl = gy if layout == "NCHW" else gy.transpose(0, 3, 1, 2)
    tiles_h, tiles_w = math.ceil(p.OH / th), math.ceil(p.OW / tw)
    ntiles = p.N * tiles_h * tiles_w
    partial = np.zeros((s1.grid[0], p.CO, p.KH, p.KW))
    for split in range(s1.grid[0]):
        for t in range(split * per, min(ntiles, (split + 1) * per)):
            n, rem = divmod(t, tiles_h * tiles_w)
            oy0, ox0 = (rem // tiles_w) * th, (rem % tiles_w) * tw
            iy0, ix0 = oy0 * p.sh - p.pt, ox0 * p.sw - p.pl
            for o in range(p.CO):
                tile = np.zeros((IH, width))
                for r in range(IH):
                    for c in range(width):
                        if 0 <= iy0 + r < p.H and 0 <= ix0 + c < p.W:
                            tile[r, c] = xl[n, o // p.M, iy0 + r, ix0 + c]
                for oyl in range(th):
                    for oxl in range(tw):
                        if oy0 + oyl >= p.OH or ox0 + oxl >= p.OW:
                            continue
                        g = gl[n, o, oy0 + oyl, ox0 + oxl]
                        for a in range(p.KH):
                            for b in range(p.KW):
                                partial[split, o, a, b] += g * tile[oyl * p.sh + a * p.dh,
                                                                    oxl * p.sw + b * p.dw]
    return partial.sum(axis=0)[:, None]


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("case", [0, 2, 4, 6, 7])
def test_dw_grad_weight_replay(case, layout, rng):
    kw = dict(SMALL[case])
    kw.pop("activation", None)
    kw.pop("bias", None)
    p = _dw_problem(layout=layout, dtype="float64", **kw)
    x = rng.uniform(-1, 1, p.x_shape)
    gy = rng.uniform(-1, 1, p.y_shape)
    s1, _, _ = plans.plan_dw_grad_weight(p, layout, 0, 0)
    got = _emulate_dw_grad_weight(s1, x, gy, p, layout)
    ref = dwops.reference.depthwise_conv2d_grad_weight(
        x, gy, p.w_shape, stride=(p.sh, p.sw), dilation=(p.dh, p.dw),
        padding=((p.pt, p.pb), (p.pl, p.pr)), layout=layout)
    assert_close(got, ref, "float64", what=s1.name)


def _emulate_separable(L, x, dww, dwb, pww, b, r, p, layout):
    """sep_forward in NumPy: per pixel tile, phase 1 stages CC-channel chunks of the input tile
    (CINMAX x IH x IW) and fills D (CI2 x 64), phase 2 multiplies by pw_w with the epilogue."""
    (N, C, H, W, M, OH, OW, KH, KW, sh, sw, dh, dw, pt, pl, CO2, TH, TW, IH, IW, CC) = L.ints
    CI2 = C * M
    cinmax = (CC - 1) // M + 2
    xl = x if layout == "NCHW" else x.transpose(0, 3, 1, 2)
    y = np.full((N, CO2, OH, OW), np.nan)
    tiles_w = math.ceil(OW / TW)
    for blk in range(L.grid[0]):
        oy0, ox0 = (blk // tiles_w) * TH, (blk % tiles_w) * TW
        iy0, ix0 = oy0 * sh - pt, ox0 * sw - pl
        for n in range(N):
            D = np.zeros((CI2, plans.SEP_TP))
            for c2lo in range(0, CI2, CC):
                c2hi = min(CI2, c2lo + CC)
                cin_lo, cin_n = c2lo // M, (c2hi - 1) // M - c2lo // M + 1
                assert cin_n <= cinmax
                xs = np.zeros((cin_n, IH, IW))
                for cc in range(cin_n):
                    for rr in range(IH):
                        for q in range(IW):
                            if 0 <= iy0 + rr < H and 0 <= ix0 + q < W:
                                xs[cc, rr, q] = xl[n, cin_lo + cc, iy0 + rr, ix0 + q]
                for c2 in range(c2lo, c2hi):
                    for pix in range(TH * TW):
                        py, px = divmod(pix, TW)
                        s = sum(dww[c2, 0, a, bb] * xs[c2 // M - cin_lo, py * sh + a * dh,
                                                       px * sw + bb * dw]
                                for a in range(KH) for bb in range(KW))
                        D[c2, pix] = s + dwb[c2]
            D = dwops.reference.activate(D, p.dw.activation)
            Y = pww @ D + b[:, None]
            Y = dwops.reference.activate(Y, p.pw.activation)
            for pix in range(TH * TW):
                py, px = divmod(pix, TW)
                if oy0 + py < OH and ox0 + px < OW:
                    y[n, :, oy0 + py, ox0 + px] = Y[:, pix]
    rl = r if layout == "NCHW" else r.transpose(0, 3, 1, 2)
    return y + rl


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("shape", [dict(c=3, m=1, co=5, k=3, h=9, w=10),
                                   dict(c=20, m=1, co=4, k=3, h=5, w=6),
                                   dict(c=3, m=2, co=3, k=5, h=7, w=17)])
def test_separable_replay(layout, shape, rng):
    c, m, co, k, h, w = (shape[s] for s in ("c", "m", "co", "k", "h", "w"))
    x = rng.uniform(-1, 1, _spec._physical(layout, 1, c, h, w))
    dww = rng.uniform(-1, 1, (c * m, 1, k, k))
    pww = rng.uniform(-1, 1, (co, c * m))
    b, dwb = rng.uniform(-1, 1, (co,)), rng.uniform(-1, 1, (c * m,))
    r = rng.uniform(-1, 1, _spec._physical(layout, 1, co, h, w))
    p, _ = _spec.separable("t", x, dww, pww, b, dwb, 1, "same", 1, layout, "relu", "silu", r)
    L = plans.plan_separable(p, layout)
    got = _emulate_separable(L, x, dww, dwb, pww, b, r, p, layout)
    ref = dwops.reference.separable_conv2d(x, dww, pww, b, dw_bias=dwb, padding="same",
                                           layout=layout, dw_activation="relu",
                                           activation="silu", residual=r)
    assert_close(_ref_layout(got, layout), ref, "float64", what=L.name)


@pytest.mark.parametrize("file,name", [("depthwise",
                                        "dw_forward<__nv_bfloat16, float, 3, 1, 8, 4, true>"),
                                       ("pointwise",
                                        "pw_gemm<__half, float, __half, true, false, false>"),
                                       ("separable", "sep_forward<float, 0, false>")])
def test_cupy_nvrtc_wrapper_accepts_the_sources(file, name):
    """CuPy's own NVRTC wrapper (what RawModule runs, with CuPy's extra options and include
    directory) compiles the sources with our options and maps the name expressions. LTO-IR
    output, so no device is needed to pick the architecture."""
    cupy = pytest.importorskip("cupy")
    from cupy.cuda import compiler

    inc = os.path.join(os.path.dirname(cupy.__file__), "_core", "include")
    code, mapping = compiler.compile_using_nvrtc(
        cuc.source(file), options=cuc.compile_options() + (f"-I{inc}", "-dlto"), arch="90",
        method="lto", name_expressions=[name])
    assert len(code) > 0 and mapping[name].startswith("_Z")


# ----------------------------------------------------------------------------- random plans

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def _random_problem(draw):
    kh, kw = draw(st.sampled_from([1, 3, 5, 7, 2, 4, 9, 31])), draw(st.sampled_from([1, 3, 5, 7, 6]))
    sh, sw, dh, dw = (draw(st.integers(1, 3)) for _ in range(4))
    h = draw(st.integers(dh * (kh - 1) + 1, dh * (kh - 1) + 300))
    w = draw(st.integers(dw * (kw - 1) + 1, dw * (kw - 1) + 300))
    pads = tuple((draw(st.integers(0, 3)), draw(st.integers(0, 3))) for _ in range(2))
    return dict(n=draw(st.integers(1, 70000)), c=draw(st.integers(1, 600)), h=h, w=w,
                m=draw(st.integers(1, 3)), k=(kh, kw), s=(sh, sw), d=(dh, dw), padding=pads,
                layout=draw(st.sampled_from(["NCHW", "NHWC"])),
                dtype=draw(st.sampled_from(list(plans.CTYPE))))


def _check_launch(L):
    assert L.name in NAMES, L.name
    assert 1 <= L.grid[0] < 2**31 and 1 <= L.grid[1] <= 65535 and 1 <= L.grid[2] <= 65535
    assert 1 <= L.block[0] * L.block[1] * L.block[2] <= plans.THREADS
    assert 0 <= L.shared <= plans.H200.smem_optin
    assert all(-(2**31) <= v < 2**31 or isinstance(v, plans._I64) for v in L.ints)


@settings(max_examples=150, deadline=None)
@given(_random_problem(), st.sampled_from([0, 2, 8, 16]))
def test_every_plan_is_launchable(q, addr):
    """Random problems (huge N, odd sizes, every kernel shape): every plan names an instantiated
    kernel, stays within the grid, block and shared-memory limits, and 32-bit arguments fit."""
    dtype = q.pop("dtype")
    p = _dw_problem(dtype=dtype, **q)
    try:
        _check_launch(plans.plan_dw_forward(plans.conv_of_forward(p), dtype, p.layout, addr, 0))
        _check_launch(plans.plan_dw_forward(plans.conv_of_forward(p), dtype, p.layout, 0, addr,
                                            plans.mid_dtype(dtype)))
        _check_launch(plans.plan_dw_grad_input(p, p.layout, addr, 0))
        s1, s2, _ = plans.plan_dw_grad_weight(p, p.layout, addr, 0)
        _check_launch(s1)
        _check_launch(s2)
    except NotImplementedError:
        assert not cb.BACKEND.prefers("depthwise_forward", p) or \
            not cb.BACKEND.prefers("depthwise_grad_weight", p) or \
            not cb.BACKEND.prefers("depthwise_grad_input", p)
    import dataclasses

    pw = _pw_problem(n=p.N, ci=p.C, co=p.CO, h=p.H, w=p.W, layout=p.layout)
    for n0, n1 in plans.pointwise_chunks(pw):
        for op in ("forward", "grad_input", "grad_weight"):
            L, red, _ = plans.plan_pointwise(op, dataclasses.replace(pw, N=n1 - n0), p.layout)
            _check_launch(L)
            if op == "forward":
                q = dataclasses.replace(pw, N=n1 - n0, dtype=dtype)
                _check_launch(plans.plan_pointwise(op, q, p.layout, plans.mid_dtype(dtype))[0])
            if red is not None:
                _check_launch(red)


def test_pointwise_chunks_keep_gemm_sizes_32_bit():
    p = _pw_problem(n=70000, ci=8, co=8, h=300, w=300, layout="NHWC")   # 6.3e9 pixels
    chunks = plans.pointwise_chunks(p)
    assert chunks[0][0] == 0 and chunks[-1][1] == p.N
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    import dataclasses

    for n0, n1 in chunks:
        assert (n1 - n0) * p.H * p.W <= plans.GEMM_MAX_ROWS
        for op in ("forward", "grad_input", "grad_weight"):
            L, red, _ = plans.plan_pointwise(op, dataclasses.replace(p, N=n1 - n0), "NHWC")
            _check_launch(L)
    assert plans.pointwise_chunks(_pw_problem(n=3)) == [(0, 3)]
    one = _pw_problem(n=5, h=2**16, w=2**15)           # one image over the limit: one per launch
    assert plans.pointwise_chunks(one) == [(i, i + 1) for i in range(5)]


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_chunked_pointwise_replay(layout, rng, monkeypatch):
    """The backend's chunk loop (images [n0, n1) per launch; grad_weight partials of all chunks
    in one buffer, reduced once) replayed with a tiny row limit."""
    import dataclasses

    monkeypatch.setattr(plans, "GEMM_MAX_ROWS", 20)
    p = _pw_problem(n=7, ci=5, co=6, h=2, w=3, layout=layout)
    chunks = plans.pointwise_chunks(p)
    assert len(chunks) == 3
    x = rng.uniform(-1, 1, p.x_shape)
    w = rng.uniform(-1, 1, (p.CO, p.CI))
    gy = rng.uniform(-1, 1, p.y_shape)
    y = np.concatenate([
        _pw_out(plans.plan_pointwise("forward", dataclasses.replace(p, N=n1 - n0), layout)[0],
                {"x": x[n0:n1], "w": w}, p.y_shape[1:], n1 - n0) for n0, n1 in chunks])
    assert_close(y, dwops.reference.pointwise_conv2d(x, w, layout=layout), "float64")
    total = sum(_emulate_gemm(plans.plan_pointwise("grad_weight", dataclasses.replace(p, N=n1 - n0),
                                                layout)[0], gy[n0:n1], x[n0:n1])
                for n0, n1 in chunks)
    assert_close(total, dwops.reference.pointwise_conv2d_grad_weight(x, gy, layout=layout),
                 "float64")


def _pw_out(L, arrays, tail, n):
    mats, ldc, sC = _emulate_gemm(L, *(arrays[k] for k in L.info["operands"][:2]))
    out = np.full(n * math.prod(tail), np.nan)
    mm, jj = np.arange(L.ints[1])[:, None], np.arange(L.ints[2])[None, :]
    for bt, C in enumerate(mats):
        out[bt * sC + mm * ldc + jj] = C
    return out.reshape((n,) + tuple(tail))


def test_warm_cache_builds_the_modules_the_backend_launches(monkeypatch):
    """warm_cache's workers and the backend's launcher build each module the same way (same
    source, options and name expression), so CuPy's disk cache entry written by the first is
    the one the second reads."""
    import sys
    import types

    built = []

    class RawModule:
        def __init__(self, code, options, name_expressions):
            built.append((code, tuple(options), tuple(name_expressions)))

        def get_function(self, name):
            return types.SimpleNamespace(max_dynamic_shared_size_bytes=48 * 1024)

    fake = types.SimpleNamespace(RawModule=RawModule,
                                 cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(
                                     getDevice=lambda: 0)))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    launch = plans.plan_dw_forward(plans.Conv(1, 4, 9, 9, 4, 9, 9, 3, 3, 1, 1, 1, 1, 1, 1), "float32",
                                "NCHW")
    assert cuc._warm_one((launch.file, launch.name)) == launch.name
    cb.CupyBackend()._function(launch)
    assert built[0] == built[1] == (cuc.source("depthwise"), cuc.compile_options(), (launch.name,))
    assert (launch.file, launch.name) in {(row[0], row[-1]) for row in plans.instantiations()}


# ----------------------------------------------------------------------------- depthwise 1-d

C1_STAGED = ["c1_forward<float, 4, 4, false>", "c1_forward<__nv_bfloat16, 0, 8, false>",
             "c1_backward<__nv_bfloat16, 4, 8, false>", "c1_backward<double, 8, 2, false>"]


def test_conv1d_instantiations_compile_for_sm90_without_spills(report):
    """Every conv1d instantiation (each op, dtype, layout, width 2-8 and generic, vector width)
    assembles for sm_90 with no spills and fits a 128-thread block."""
    rows = [r for r in report if r["op"] == "depthwise_conv1d"]
    want = {n for f, op, _, _, n in plans.instantiations() if op == "depthwise_conv1d"}
    assert {r["specialization"].split(" [")[0] for r in rows} == want
    # per dtype: (forward + backward) x 2 layouts x 8 widths x 2 vector widths, 2 final-state
    # copies, 8 updates, sum_splits
    assert len(want) == 4 * (2 * 2 * 8 * 2 + 2 + 8 + 1), len(want)
    for r in rows:
        assert r["error"] is None, r["error"][:2000]
        assert r["spill_bytes"] == 0, r
        assert 0 < r["registers"] <= 255, r
    directions = {(r["direction"], r["specialization"].split("<")[0]) for r in rows}
    assert directions >= {("forward", "c1_forward"), ("backward", "c1_backward"),
                          ("update", "c1_update"), ("forward", "c1_final_state"),
                          ("backward", "sum_splits")}


def _nvdisasm():
    """The nvdisasm executable: on PATH, or in the nvidia-cuda-nvdisasm wheel; None if absent."""
    import shutil

    found = shutil.which("nvdisasm")
    if found:
        return found
    try:
        import importlib.util

        spec = importlib.util.find_spec("nvidia")
    except Exception:
        return None
    for root in (spec.submodule_search_locations or []) if spec else []:
        for sub in ("cu13", "cu12", "cuda_nvdisasm"):
            path = os.path.join(root, sub, "bin", "nvdisasm")
            if os.path.isfile(path):
                return path
    return None


def _cubin(ptx: bytes, arch: str = "sm_90") -> bytes:
    from cuda.bindings import nvjitlink

    h = nvjitlink.create(1, [f"-arch={arch}"])
    try:
        nvjitlink.add_data(h, nvjitlink.InputType.PTX, ptx, len(ptx), "dwops.ptx")
        nvjitlink.complete(h)
        buf = bytearray(nvjitlink.get_linked_cubin_size(h))
        nvjitlink.get_linked_cubin(h, buf)
    finally:
        nvjitlink.destroy(h)
    return bytes(buf)


@pytest.mark.parametrize("name", C1_STAGED)
def test_conv1d_staged_loader_is_cp_async(name, tmp_path):
    """The NCL kernels stage their spans with 16-byte cp.async (commit / wait_group pipeline) in
    the PTX, and (when nvdisasm is available) LDGSTS in the sm_90 SASS."""
    pytest.importorskip("cuda.bindings")
    import re
    import subprocess

    assert name in NAMES
    ptx, lowered = cuc.compile_ptx("conv1d", [name])
    body = ptx.decode().split(".entry " + lowered[name], 1)[1]
    assert re.search(r"cp\.async\.cg\.shared\.global \[[^]]+\], \[[^]]+\], 16", body), name
    assert "cp.async.commit_group" in body and "cp.async.wait_group 1" in body
    tool = _nvdisasm()
    if tool is None:
        return
    path = tmp_path / "k.cubin"
    path.write_bytes(_cubin(ptx))
    sass = subprocess.run([tool, "-c", str(path)], capture_output=True, text=True, check=True)
    assert "LDGSTS" in sass.stdout and "LDGDEPBAR" in sass.stdout and "DEPBAR" in sass.stdout


def test_conv1d_unvectorized_staging_uses_the_smaller_cp_async_forms():
    """Rows that are not 16-byte aligned stage element by element: cp.async of 4 or 8 bytes for
    float and double (the .ca form), plain loads for 16-bit types."""
    pytest.importorskip("cuda.bindings")
    for name, form in (("c1_forward<float, 3, 1, false>", "4"),
                       ("c1_forward<double, 3, 1, false>", "8"),
                       ("c1_forward<__half, 3, 1, false>", None)):
        ptx, lowered = cuc.compile_ptx("conv1d", [name])
        body = ptx.decode().split(".entry " + lowered[name], 1)[1]
        if form is None:
            assert "cp.async.ca." not in body and "cp.async.cg." not in body
        else:
            assert "cp.async.ca.shared.global" in body and f"], {form}, " in body


def _c1(n=2, c=3, length=50, m=1, k=4, s=1, d=1, padding="causal", layout="NCL",
        dtype="float32", state=False, seq=False):
    x = _meta((n, c, length) if layout == "NCL" else (n, length, c), dtype)
    w = _meta((c * m, 1, k), dtype)
    st = _meta((n, c, d * (k - 1)), dtype) if state else None
    sq = np.broadcast_to(np.zeros((), np.int32), (n, length)) if seq else None
    p, _ = _spec.depthwise_1d("t", x, w, None, s, padding, d, layout, None, st, False, sq)
    return p


def test_conv1d_specialization_and_vector_choice():
    assert [plans.c1_spec(k) for k in range(1, 12)] == [0, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0]
    p = _c1(length=64, c=16, dtype="bfloat16")
    assert plans.plan_conv1d_forward(p).info["vec"] == 8
    assert plans.plan_conv1d_forward(p, x_addr=2).info["vec"] == 1          # misaligned x
    assert plans.plan_conv1d_forward(_c1(length=63, dtype="bfloat16")).info["vec"] == 1
    q = _c1(length=63, c=16, layout="NLC", dtype="bfloat16")
    assert plans.plan_conv1d_forward(q).info["vec"] == 8                    # NLC: along C
    assert plans.plan_conv1d_backward(q).info["vec"] == 8
    q8 = _c1(length=63, c=16, k=8, layout="NLC", dtype="bfloat16")
    assert plans.plan_conv1d_backward(q8).info["vec"] == 4                  # window registers
    assert plans.plan_conv1d_forward(_c1(c=16, m=2, layout="NLC")).info["vec"] == 1


def test_conv1d_prefers_unless_the_span_does_not_fit():
    p = _c1(length=40000, k=31, d=1000, padding="valid")
    assert not cb.BACKEND.prefers("depthwise_conv1d_forward", p)
    assert not cb.BACKEND.prefers("depthwise_conv1d_backward", p)
    q = _c1()
    assert cb.BACKEND.prefers("depthwise_conv1d_forward", q)
    assert cb.BACKEND.prefers("depthwise_conv1d_backward", q)


@st.composite
def _random_conv1d(draw):
    k = draw(st.sampled_from([1, 2, 3, 4, 5, 8, 9, 31]))
    s, d = draw(st.integers(1, 3)), draw(st.integers(1, 40))
    length = draw(st.integers(d * (k - 1) + 1, d * (k - 1) + 20000))
    padding = draw(st.sampled_from(["causal", "same", "valid", (3, 0), 2]))
    return dict(n=draw(st.integers(1, 70000)), c=draw(st.integers(1, 13000)), length=length,
                m=draw(st.integers(1, 4)), k=k, s=s, d=d, padding=padding,
                layout=draw(st.sampled_from(["NCL", "NLC"])),
                dtype=draw(st.sampled_from(list(plans.CTYPE))))


@settings(max_examples=200, deadline=None)
@given(_random_conv1d(), st.sampled_from([0, 2, 16]))
def test_every_conv1d_plan_is_launchable(q, addr):
    """Random 1-d problems up to Mamba sizes and beyond (N up to 70000, C up to 13000, L up to
    20000, widths to 31, dilation to 40): every plan names an instantiated kernel and stays within
    the grid, block and shared-memory limits; NCL chunk ranges cover the row."""
    try:
        p = _c1(**q)
    except ValueError:
        return
    try:
        fwd = plans.plan_conv1d_forward(p, addr, 0)
        bwd = plans.plan_conv1d_backward(p, addr, 0, 0)
    except NotImplementedError:
        assert not cb.BACKEND.prefers("depthwise_conv1d_forward", p) or \
            not cb.BACKEND.prefers("depthwise_conv1d_backward", p)
        return
    for launch in (fwd, bwd):
        _check_launch(launch)
        assert launch.block[0] * launch.block[1] <= plans.C1_THREADS
    if p.layout == "NCL":
        tl, per = fwd.info["tile"], fwd.info["per"]
        assert fwd.grid[1] * per >= math.ceil(p.OL / tl) > (fwd.grid[1] - 1) * per
        assert fwd.shared == 2 * fwd.ints[11] * plans.ITEMSIZE[p.dtype]
    if p.causal and p.W:
        _check_launch(plans.plan_conv1d_final_state(p))
    if p.K >= 2:
        u = _spec.Conv1dUpdateProblem(min(p.N, 64), p.C, p.M, p.K, 1, p.dtype)
        _check_launch(plans.plan_conv1d_update(u))


def test_activation_codes_are_one_table():
    """The kernels of every backend take the codes of ``_spec.ACTIVATION_CODES``: the CPU backend
    uses that dict, and the CUDA C++ sources name the codes only through the ``ACT_*`` enum
    generated from it (no bare numbers), with one branch of ``activate`` per activation."""
    import re

    from dwops.kernels import cpu

    assert cpu.ACT_CODES is _spec.ACTIVATION_CODES
    assert list(_spec.ACTIVATION_CODES) == list(_spec.ACTIVATIONS)
    enum = cuc.activation_enum()
    declared = dict((n, int(v)) for n, v in re.findall(r"\b(ACT_\w+) = (\d+)", enum))
    assert declared == {f"ACT_{(a or 'none').upper()}": c
                        for a, c in _spec.ACTIVATION_CODES.items()}
    texts = {f: open(os.path.join(cuc.CUDA_DIR, f)).read() for f in os.listdir(cuc.CUDA_DIR)}
    for f, text in texts.items():
        assert set(re.findall(r"\bACT_\w+", text)) <= set(declared), f
        assert not re.search(r"\b\w*act\s*[=!]=\s*\d", text), f"{f} compares a code to a number"
    common = texts["common.cuh"]
    assert all(f"act == {n}" in common for n in declared if n != "ACT_GELU")  # gelu: the rest
    assert cuc.source("depthwise").startswith(enum)
