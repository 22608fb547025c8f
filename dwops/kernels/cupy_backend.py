"""The ``cupy`` backend: CUDA C++ templates (``dwops/kernels/cuda/*.cuh``) compiled by CuPy.

Every op and direction is one kernel template, instantiated by name expression (for example
``dw_forward<float, 3, 1, 4, 2, false>``) and compiled by CuPy's ``RawModule`` (NVRTC), memoized per
device and name expression (CuPy also caches the binaries on disk). The math of each kernel is
written at the top of its ``.cuh`` file; this module holds the host side, in three layers:

* **launch plans** (pure Python, unit-tested on the CPU): :func:`plan_dw_forward`,
  :func:`plan_dw_grad_input`, :func:`plan_dw_grad_weight`, :func:`plan_pointwise`,
  :func:`plan_separable`, and for the depthwise 1-d op :func:`plan_conv1d_forward`,
  :func:`plan_conv1d_backward`, :func:`plan_conv1d_update`, :func:`plan_conv1d_final_state`, turn
  a problem into a :class:`Launch` (kernel name expression, grid, block, dynamic shared memory,
  integer arguments): the specialization (kernel size 1/3/5/7 or generic, unit stride; 1-d widths
  2-8 or generic), the vector width allowed by the pointers' and rows' alignment, the tile;
* **the backend** (:class:`CupyBackend`, instance ``BACKEND``): arrays through DLPack, the caller's
  stream, one launcher;
* **the kernel report** (:func:`compile_report`): every instantiation any plan can produce,
  compiled through NVRTC for ``compute_90`` and assembled for ``sm_90`` with nvJitLink, with
  registers, shared memory and spills. Works without a GPU.

Shapes: x ``(N, C, H, W)`` / ``(N, H, W, C)``; depthwise weight ``(C*M, 1, KH, KW)``; pointwise
weight ``(CO, CI)``; 1-d: x ``(N, C, L)`` / ``(N, L, C)``, weight ``(C*M, 1, K)``, states
``(N, C, W)``, seq_idx ``(N, L)``; see ``dwops/_spec.py`` for the problem objects.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field

import numpy as np

from .._errors import BackendUnavailableError
from .._registry import Backend, numpy_dtype
from ._ptxas import assemble

# ----------------------------------------------------------------------------- constants

CUDA_DIR = os.path.join(os.path.dirname(__file__), "cuda")
CTYPE = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float", "float64": "double"}
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
ACC_ITEMSIZE = {"float16": 4, "bfloat16": 4, "float32": 4, "float64": 8}
ACTIVATION_CODE = {None: 0, "relu": 1, "relu6": 2, "silu": 3, "gelu": 4}

SPECIALIZED_K = (1, 3, 5, 7)        # square kernel sizes with compile-time unrolled templates
THREADS = 256                       # threads per block of the tiled kernels
SMEM_DEFAULT = 48 * 1024            # dynamic shared memory without opting in
SMEM_OPTIN = 227 * 1024             # sm_90 opt-in limit per block (cudaFuncSetAttribute)
SEP_SMEM_MAX = 96 * 1024            # fused separable: up to 2 blocks per SM
SEP_TP = 64                         # fused separable: output pixels per block (separable.cuh)
SEP_KC = 32                         # fused separable: pw_w chunk (separable.cuh)
SEP_CC = 16                         # fused separable: mid channels per phase-1 chunk
PW_TILE = 64                        # pointwise GEMM tile (pointwise.cuh PW_BM = PW_BN)
PW_BK = 16
TAPS_PER_THREAD = 4                 # dw_grad_weight_taps TPT
GW_NHWC_ACC_REGS = 72               # NHWC grad_weight: K*K*VEC accumulators per thread at most
TARGET_BLOCKS = 4 * 132             # reduction kernels: ~4 blocks per SM of an H100/H200
MAX_GRID_YZ = 65535

# rows (NCHW) / columns (NHWC) of outputs per thread, by specialization K (0 = generic)
DW_FWD_OPT = {"NCHW": {1: 4, 3: 2, 5: 2, 7: 1, 0: 1}, "NHWC": {1: 4, 3: 4, 5: 2, 7: 2, 0: 1}}
DW_GI_OPT = {"NCHW": {1: 2, 3: 2, 5: 2, 7: 1, 0: 1}, "NHWC": {1: 2, 3: 2, 5: 2, 7: 2, 0: 1}}
DW_GW_OPT = {"NCHW": 1, "NHWC": 2}

# pointwise GEMM operand layouts (A_KC, B_NC, PARTIAL), see pointwise.cuh
PW_FORMS = {
    ("forward", "NCHW"): (True, True, False),
    ("forward", "NHWC"): (True, False, False),
    ("grad_input", "NCHW"): (False, True, False),
    ("grad_input", "NHWC"): (True, True, False),
    ("grad_weight", "NCHW"): (True, False, True),
    ("grad_weight", "NHWC"): (False, True, True),
}


def _np2(n: int) -> int:
    """Smallest power of two >= n (>= 1)."""
    return 1 << max(0, int(n - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _b(flag: bool) -> str:
    return "true" if flag else "false"


def max_vec(dtype: str) -> int:
    """Elements per 16-byte vector."""
    return 16 // ITEMSIZE[dtype]


def vec_choices(dtype: str, limit: int | None = None) -> tuple:
    """The vector widths a plan may pick: a full 16-byte vector (capped at ``limit`` elements,
    rounded down to a power of two) or 1. Intermediate widths are not instantiated, to keep the
    number of template instances (and the compile time of the kernel report) small."""
    v = max_vec(dtype) if limit is None else min(max_vec(dtype), 1 << (max(1, limit).bit_length() - 1))
    return (v, 1) if v > 1 else (1,)


def pick_vec(dtype: str, divisible: tuple, addresses: tuple, limit: int | None = None) -> int:
    """The vector width (elements) for these operands: vec_choices(dtype, limit)[0] when every size
    in ``divisible`` is a multiple of it and every byte address in ``addresses`` a multiple of its
    byte size (16-byte accesses need 16-byte alignment), else 1."""
    v = vec_choices(dtype, limit)[0]
    item = ITEMSIZE[dtype]
    if v > 1 and all(d % v == 0 for d in divisible) and all(a % (v * item) == 0 for a in addresses):
        return v
    return 1


def kernel_size_spec(KH: int, KW: int) -> int:
    """The compile-time kernel size for square 1x1, 3x3, 5x5, 7x7 kernels; 0 (generic) otherwise."""
    return KH if KH == KW and KH in SPECIALIZED_K else 0


def dw_forward_spec(c) -> tuple[int, int]:
    """(K, S) of dw_forward: the specialized K with S = 1 for stride 1 and dilation 1, else the
    generic runtime path (0, 0)."""
    K = kernel_size_spec(c.KH, c.KW)
    if K and c.sh == c.sw == c.dh == c.dw == 1:
        return K, 1
    return 0, 0


# ----------------------------------------------------------------------------- launch plans


@dataclass(frozen=True)
class Launch:
    """One kernel launch: ``file`` (cuda/<file>.cuh), template name expression, grid, block,
    dynamic shared memory in bytes, and the integer arguments that follow the pointers."""

    file: str
    name: str
    grid: tuple
    block: tuple
    shared: int
    ints: tuple = ()
    info: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Conv:
    """The geometry dw_forward computes (the user's forward, or a stride-1 input gradient):
    output channel o of CO reads input channels (o // M) * R + m, m < R, of CI."""

    N: int
    CI: int
    H: int
    W: int
    CO: int
    OH: int
    OW: int
    KH: int
    KW: int
    sh: int
    sw: int
    dh: int
    dw: int
    pt: int
    pl: int
    M: int = 1
    R: int = 1
    flip: int = 0
    act: int = 0


def conv_of_forward(p) -> Conv:
    return Conv(p.N, p.C, p.H, p.W, p.CO, p.OH, p.OW, p.KH, p.KW, p.sh, p.sw, p.dh, p.dw, p.pt,
                p.pl, p.M, 1, 0, ACTIVATION_CODE[p.activation])


def conv_of_grad_input(p) -> Conv:
    """Stride-1 input gradient as a forward convolution of gy with the taps rotated by 180
    degrees and padding ((KH-1)*dh - pt, (KW-1)*dw - pl): output channel c sums gy channels
    c*M + m (M' = 1, R = M)."""
    return Conv(p.N, p.CO, p.OH, p.OW, p.C, p.H, p.W, p.KH, p.KW, 1, 1, p.dh, p.dw,
                (p.KH - 1) * p.dh - p.pt, (p.KW - 1) * p.dw - p.pl, 1, p.M, 1, 0)


def _shrink_to_fit(sizes, smem_of, limit):
    """Halve the block dimensions in ``sizes`` (a list, in the order given) until smem_of(sizes)
    <= limit; returns the sizes, or None if even 1-sized blocks do not fit."""
    sizes = list(sizes)
    for i in range(len(sizes)):
        while smem_of(sizes) > limit and sizes[i] > 1:
            sizes[i] //= 2
    return sizes if smem_of(sizes) <= limit else None


def _fit(sizes, smem_of):
    """Fit under 48 KiB by shrinking, else opt in to up to 227 KiB at the default sizes (or
    shrunk). Raises NotImplementedError when even a one-thread tile does not fit."""
    got = _shrink_to_fit(sizes, smem_of, SMEM_DEFAULT)
    if got is not None and math.prod(got) >= 32:
        return got
    got = _shrink_to_fit(sizes, smem_of, SMEM_OPTIN)
    if got is None:
        raise NotImplementedError(
            "dwops cupy backend: the input tile of this convolution (kernel and dilation) does not "
            "fit in shared memory; use backend='numba'")
    return got


def plan_dw_forward(c: Conv, dtype: str, layout: str, x_addr: int = 0, y_addr: int = 0) -> Launch:
    """dw_forward launch for geometry ``c`` (see depthwise.cuh)."""
    K, S = dw_forward_spec(c)
    item = ITEMSIZE[dtype]
    opt = DW_FWD_OPT[layout][K]
    if layout == "NCHW":
        vec = pick_vec(dtype, (c.W,), (x_addr, y_addr))
        bw = min(32, _np2(_cdiv(c.OW, vec)))
        bh = max(1, min(THREADS // bw, _np2(_cdiv(c.OH, opt))))

        def geometry(s):
            bw_, bh_ = s
            th, tw = bh_ * opt, bw_ * vec
            if S:
                nwv = _cdiv(vec + K - 1, vec)
                ih, iw, ip = th + K - 1, tw + K - 1, (bw_ - 1 + nwv) * vec
            else:
                ih = (th - 1) * c.sh + (c.KH - 1) * c.dh + 1
                iw = (tw - 1) * c.sw + (c.KW - 1) * c.dw + 1
                ip = _cdiv(iw, vec) * vec
            return th, tw, ih, iw, ip

        bh, bw = _fit([bh, bw], lambda s: (lambda g: g[2] * g[4] * item)(geometry((s[1], s[0]))))
        th, tw, ih, iw, ip = geometry((bw, bh))
        tiles = _cdiv(c.OH, th) * _cdiv(c.OW, tw)
        grid = (tiles, min(c.N * c.CO, MAX_GRID_YZ), 1)
        block = (bw, bh, 1)
        shared = ih * ip * item
    else:
        vec = pick_vec(dtype, (c.CI, c.CO), (x_addr, y_addr)) if c.M == 1 and c.R == 1 else 1
        ct = min(32, _np2(_cdiv(c.CO, vec)))
        pt_ = THREADS // ct
        th0, twt = _nhwc_tile(pt_, opt, c.OH, c.OW)

        def geometry(s):
            ct_, th_, twt_ = s
            tc = ct_ * vec
            tw = twt_ * opt
            ih = (th_ - 1) * c.sh + (c.KH - 1) * c.dh + 1
            iw = (tw - 1) * c.sw + (c.KW - 1) * c.dw + 1
            cp = tc * c.R if c.M == 1 else ((tc - 1) // c.M + 2) * c.R
            return th_, tw, ih, iw, cp

        th_, twt, ct = _fit([th0, twt, ct], lambda s: (lambda g: g[2] * g[3] * g[4] * item)(
            geometry((s[2], s[0], s[1]))))
        th, tw, ih, iw, ip = geometry((ct, th_, twt))
        tiles = _cdiv(c.OH, th) * _cdiv(c.OW, tw)
        grid = (tiles, _cdiv(c.CO, ct * vec), min(c.N, MAX_GRID_YZ))
        block = (ct, th * twt, 1)
        shared = ih * iw * ip * item
    name = f"dw_forward<{CTYPE[dtype]}, {K}, {S}, {vec}, {opt}, {_b(layout == 'NHWC')}>"
    ints = (c.N, c.CI, c.H, c.W, c.CO, c.OH, c.OW, c.KH, c.KW, c.sh, c.sw, c.dh, c.dw, c.pt, c.pl,
            c.M, c.R, c.flip, c.act, th, tw, ih, iw, ip)
    return Launch("depthwise", name, grid, block, shared, ints,
                  {"K": K, "S": S, "vec": vec, "opt": opt, "tile": (th, tw)})


def plan_dw_grad_input(p, layout: str, gy_addr: int = 0, gx_addr: int = 0) -> Launch:
    """The input gradient: dw_forward (rotated taps) for stride 1, dw_grad_input otherwise."""
    if p.sh == 1 and p.sw == 1:
        return plan_dw_forward(conv_of_grad_input(p), p.dtype, layout, gy_addr, gx_addr)
    dtype = p.dtype
    item = ITEMSIZE[dtype]
    K = 0  # the strided gather tests divisibility per tap at run time
    opt = DW_GI_OPT[layout][K]

    def gy_extent(th, tw):
        ih = (th - 1 + (p.KH - 1) * p.dh) // p.sh + 1
        iw = (tw - 1 + (p.KW - 1) * p.dw) // p.sw + 1
        return ih, iw

    if layout == "NCHW":
        vec = pick_vec(dtype, (p.OW,), (gy_addr,))
        bw = min(32, _np2(_cdiv(p.W, vec)))
        bh = max(1, min(THREADS // bw, _np2(_cdiv(p.H, opt))))

        def geometry(bw_, bh_):
            th, tw = bh_ * opt, bw_ * vec
            ih, iw = gy_extent(th, tw)
            return th, tw, ih, iw, _cdiv(iw, vec) * vec

        bh, bw = _fit([bh, bw], lambda s: (lambda g: g[2] * g[4] * item)(geometry(s[1], s[0])))
        th, tw, ih, iw, ip = geometry(bw, bh)
        grid = (_cdiv(p.H, th) * _cdiv(p.W, tw), min(p.N * p.C, MAX_GRID_YZ), 1)
        block = (bw, bh, 1)
        shared = ih * ip * item
    else:
        vec = pick_vec(dtype, (p.C,), (gy_addr, gx_addr)) if p.M == 1 else 1
        ct = min(32, _np2(_cdiv(p.C, vec)))
        pt_ = THREADS // ct
        th0, twt = _nhwc_tile(pt_, opt, p.H, p.W)

        def geometry(ct_, th_, twt_):
            tw = twt_ * opt
            ih, iw = gy_extent(th_, tw)
            return th_, tw, ih, iw, ct_ * vec * p.M

        th_, twt, ct = _fit([th0, twt, ct], lambda s: (lambda g: g[2] * g[3] * g[4] * item)(
            geometry(s[2], s[0], s[1])))
        th, tw, ih, iw, ip = geometry(ct, th_, twt)
        grid = (_cdiv(p.H, th) * _cdiv(p.W, tw), _cdiv(p.C, ct * vec), min(p.N, MAX_GRID_YZ))
        block = (ct, th * twt, 1)
        shared = ih * iw * ip * item
    name = f"dw_grad_input<{CTYPE[dtype]}, {K}, {vec}, {opt}, {_b(layout == 'NHWC')}>"
    ints = (p.N, p.C, p.H, p.W, p.M, p.OH, p.OW, p.KH, p.KW, p.sh, p.sw, p.dh, p.dw, p.pt, p.pl,
            th, tw, ih, iw, ip)
    return Launch("depthwise", name, grid, block, shared, ints,
                  {"K": K, "vec": vec, "opt": opt, "tile": (th, tw)})


def _nhwc_tile(pt: int, opt: int, oh: int, ow: int) -> tuple[int, int]:
    """(tile rows, thread columns) for ``pt`` pixel threads of ``opt`` outputs each: as wide as
    the image allows, then narrowed towards a square tile (columns <= 2 x rows) while the image
    has the rows, so the halo re-read from L2 stays small."""
    twt = min(pt, _np2(_cdiv(ow, opt)))
    while twt > 1 and twt * opt > 2 * (pt // twt) and pt // (twt // 2) <= _np2(oh):
        twt //= 2
    return max(1, min(pt // twt, _np2(oh))), twt


def _splits(ntiles: int, other_blocks: int) -> tuple[int, int]:
    """(splits, tiles per split) so that splits * other_blocks ~ TARGET_BLOCKS."""
    want = max(1, min(ntiles, _cdiv(TARGET_BLOCKS, max(1, other_blocks))))
    per = _cdiv(ntiles, want)
    return _cdiv(ntiles, per), per


def plan_dw_grad_weight(p, layout: str, x_addr: int = 0, gy_addr: int = 0) -> tuple:
    """(stage-1 Launch, stage-2 Launch, partial-buffer element count) for the weight gradient:
    dw_grad_weight for square 1/3/5/7 kernels (when its tile fits), else dw_grad_weight_taps."""
    stage1 = None
    if kernel_size_spec(p.KH, p.KW):
        try:
            stage1 = _plan_gw_specialized(p, layout, x_addr, gy_addr)
        except NotImplementedError:
            stage1 = None
    if stage1 is None:
        stage1 = _plan_gw_taps(p, layout)
    count = p.CO * p.KH * p.KW
    stage2 = Launch("depthwise", f"sum_splits<{CTYPE[p.dtype]}>", (_cdiv(count, THREADS), 1, 1),
                    (THREADS, 1, 1), 0, (stage1.grid[0], count))
    return stage1, stage2, stage1.grid[0] * count


def _plan_gw_specialized(p, layout: str, x_addr: int, gy_addr: int) -> Launch:
    """dw_grad_weight (K = 1, 3, 5, 7). NCHW reduces with warp shuffles, so its block is a
    multiple of 32 threads (rows past the image idle); NotImplementedError when no tile fits."""
    dtype = p.dtype
    item, acc = ITEMSIZE[dtype], ACC_ITEMSIZE[dtype]
    K = kernel_size_spec(p.KH, p.KW)
    KK = K * K
    opt = DW_GW_OPT[layout]
    if layout == "NCHW":
        vec = pick_vec(dtype, (p.W,), (x_addr,))
        bw = min(32, _np2(_cdiv(p.OW, vec)))
        bh = max(32 // bw, min(THREADS // bw, _np2(p.OH)))

        def geometry(bw_, bh_):
            th, tw = bh_, bw_ * vec
            ih = (th - 1) * p.sh + (K - 1) * p.dh + 1
            iw = (tw - 1) * p.sw + (K - 1) * p.dw + 1
            return th, tw, ih, iw, _cdiv(iw, vec) * vec

        def smem(s):
            g = geometry(s[1], s[0])
            return max(g[2] * g[4] * item, (s[0] * s[1] // 32) * KK * acc)

        bh, bw = _fit([bh, bw], smem)
        if bh * bw < 32:
            raise NotImplementedError("no whole-warp tile fits in shared memory")
        th, tw, ih, iw, ip = geometry(bw, bh)
        shared = smem([bh, bw])
        block = (bw, bh, 1)
        other = min(p.CO, MAX_GRID_YZ)
        chans = other
    else:
        vec = 1
        if p.M == 1:
            vec = pick_vec(dtype, (p.C,), (x_addr, gy_addr), limit=max(1, GW_NHWC_ACC_REGS // KK))
        ct = min(32, _np2(_cdiv(p.CO, vec)))
        pt_ = THREADS // ct
        th0, twt = _nhwc_tile(pt_, opt, p.OH, p.OW)

        def geometry(ct_, th_, twt_):
            tc, tw = ct_ * vec, twt_ * opt
            ih = (th_ - 1) * p.sh + (K - 1) * p.dh + 1
            iw = (tw - 1) * p.sw + (K - 1) * p.dw + 1
            cp = tc if p.M == 1 else (tc - 1) // p.M + 2
            return th_, tw, ih, iw, cp

        def smem(s):
            g = geometry(s[2], s[0], s[1])
            return max(g[2] * g[3] * g[4] * item, s[0] * s[1] * s[2] * vec * acc)

        th_, twt, ct = _fit([th0, twt, ct], smem)
        th, tw, ih, iw, ip = geometry(ct, th_, twt)
        shared = smem([th_, twt, ct])
        block = (ct, th * twt, 1)
        chans = _cdiv(p.CO, ct * vec)
        other = chans
    ntiles = p.N * _cdiv(p.OH, th) * _cdiv(p.OW, tw)
    splits, per = _splits(ntiles, other)
    name = f"dw_grad_weight<{CTYPE[dtype]}, {K}, {vec}, {opt}, {_b(layout == 'NHWC')}>"
    ints = (p.N, p.C, p.H, p.W, p.M, p.OH, p.OW, p.sh, p.sw, p.dh, p.dw, p.pt, p.pl, th, tw,
            ih, iw, ip, per)
    return Launch("depthwise", name, (splits, chans, 1), block, shared, ints,
                  {"K": K, "vec": vec, "opt": opt, "tile": (th, tw), "splits": splits})


def _plan_gw_taps(p, layout: str) -> Launch:
    """dw_grad_weight_taps (any kernel): TC channels per block (NCHW 1, NHWC 32, halved while the
    tile does not fit), 256 threads; NotImplementedError when a one-pixel tile does not fit."""
    acc = ACC_ITEMSIZE[p.dtype]
    KK = p.KH * p.KW

    def geometry(th_, tw_):
        ih = (th_ - 1) * p.sh + (p.KH - 1) * p.dh + 1
        iw = (tw_ - 1) * p.sw + (p.KW - 1) * p.dw + 1
        return ih, iw

    tc, got = (1 if layout == "NCHW" else 32), None
    th0, tw0 = (16, 16) if layout == "NCHW" else (8, 8)
    th0, tw0 = min(th0, _np2(p.OH)), min(tw0, _np2(p.OW))
    while got is None and tc >= 1:
        def smem(s, tc=tc):
            ih, iw = geometry(s[0], s[1])
            return (ih * iw + s[0] * s[1]) * tc * acc

        got = _shrink_to_fit([th0, tw0], smem, SMEM_DEFAULT) or \
            _shrink_to_fit([th0, tw0], smem, SMEM_OPTIN)
        if got is None:
            tc //= 2
    if got is None:
        raise NotImplementedError(
            "dwops cupy backend: the input tile of this weight gradient (kernel and dilation) "
            "does not fit in shared memory; use backend='numba'")
    th, tw = got
    ih, iw = geometry(th, tw)
    shared = smem([th, tw])
    ty = THREADS // tc
    taps = ty * TAPS_PER_THREAD
    chans = _cdiv(p.CO, tc)
    ntiles = p.N * _cdiv(p.OH, th) * _cdiv(p.OW, tw)
    zt = _cdiv(KK, taps)
    splits, per = _splits(ntiles, min(chans, MAX_GRID_YZ) * zt)
    name = f"dw_grad_weight_taps<{CTYPE[p.dtype]}, {TAPS_PER_THREAD}, {_b(layout == 'NHWC')}>"
    ints = (p.N, p.C, p.H, p.W, p.M, p.OH, p.OW, p.KH, p.KW, p.sh, p.sw, p.dh, p.dw, p.pt,
            p.pl, th, tw, ih, iw, per)
    return Launch("depthwise", name, (splits, min(chans, MAX_GRID_YZ), zt), (tc, ty, 1), shared,
                  ints, {"K": 0, "tile": (th, tw), "splits": splits, "tc": tc})


def plan_pointwise(op: str, p, layout: str) -> tuple:
    """(gemm Launch, reduce Launch or None, partial element count) for op in forward /
    grad_input / grad_weight. The pointer arguments are bound by the backend in the order of
    pw_gemm (A, B, C, partial, bias, residual); ``info['operands']`` names A, B, C."""
    dtype = p.dtype
    HW, P = p.H * p.W, p.N * p.H * p.W
    a_kc, b_nc, partial = PW_FORMS[(op, layout)]
    nchw = layout == "NCHW"
    if op == "forward":
        if nchw:   # y_n = W . x_n
            Md, Nd, Kd, lda, ldb, ldc = p.CO, HW, p.CI, p.CI, HW, HW
            sA, sB, sC, batches, bias_on_n = 0, p.CI * HW, p.CO * HW, p.N, 0
        else:      # y = x . W^T
            Md, Nd, Kd, lda, ldb, ldc = P, p.CO, p.CI, p.CI, p.CI, p.CO
            sA, sB, sC, batches, bias_on_n = 0, 0, 0, 1, 1
        operands = ("w", "x", "y") if nchw else ("x", "w", "y")
    elif op == "grad_input":
        if nchw:   # gx_n = W^T . gy_n
            Md, Nd, Kd, lda, ldb, ldc = p.CI, HW, p.CO, p.CI, HW, HW
            sA, sB, sC, batches = 0, p.CO * HW, p.CI * HW, p.N
        else:      # gx = gy . W
            Md, Nd, Kd, lda, ldb, ldc = P, p.CI, p.CO, p.CO, p.CI, p.CI
            sA, sB, sC, batches = 0, 0, 0, 1
        bias_on_n = 0
        operands = ("w", "gy", "gx") if nchw else ("gy", "w", "gx")
    else:
        if nchw:   # gW = sum_n gy_n . x_n^T
            Md, Nd, Kd, lda, ldb, ldc = p.CO, p.CI, HW, HW, HW, p.CI
            sA, sB, sC, batches = p.CO * HW, p.CI * HW, 0, p.N
        else:      # gW = gy^T . x
            Md, Nd, Kd, lda, ldb, ldc = p.CO, p.CI, P, p.CO, p.CI, p.CI
            sA, sB, sC, batches = 0, 0, 0, 1
        bias_on_n = 0
        operands = ("gy", "x", "gw")
    tiles = _cdiv(Md, PW_TILE) * _cdiv(Nd, PW_TILE)
    if partial:
        want = max(1, min(_cdiv(TARGET_BLOCKS, tiles), MAX_GRID_YZ))
        if batches >= want:
            per_batch, k_splits = _cdiv(batches, want), 1
        else:
            per_batch = 1
            k_splits = max(1, min(_cdiv(want, batches), _cdiv(Kd, 4 * PW_BK)))
        groups = _cdiv(batches, per_batch)
        splits = groups * k_splits
        z = splits
    else:
        per_batch, k_splits, splits = 1, 1, 0
        z = min(batches, MAX_GRID_YZ)
    name = f"pw_gemm<{CTYPE[dtype]}, {_b(a_kc)}, {_b(b_nc)}, {_b(partial)}>"
    ints = (bias_on_n, Md, Nd, Kd) + tuple(_I64(v) for v in (lda, ldb, ldc, sA, sB, sC)) + \
        (batches, per_batch, k_splits)
    gemm = Launch("pointwise", name, (tiles, 1, z), (THREADS, 1, 1), 0, ints,
                  {"operands": operands, "splits": splits})
    if not partial:
        return gemm, None, 0
    count = Md * Nd
    red = Launch("pointwise", f"sum_splits<{CTYPE[dtype]}>", (_cdiv(count, THREADS), 1, 1),
                 (THREADS, 1, 1), 0, (splits, count))
    return gemm, red, splits * count


GEMM_MAX_ROWS = 2**30   # pw_gemm takes 32-bit sizes: at most this many pixels per launch


def pointwise_chunks(p) -> list[tuple[int, int]]:
    """Image ranges [n0, n1) of the pointwise launches: one launch unless N*H*W pixels exceed
    GEMM_MAX_ROWS, then as many whole images per launch as fit (one image at least)."""
    per = max(1, GEMM_MAX_ROWS // (p.H * p.W))
    return [(n0, min(p.N, n0 + per)) for n0 in range(0, p.N, per)]


def plan_separable(p, layout: str):
    """The fused sep_forward Launch, or None when the depthwise tile of all C*M channels does not
    fit in SEP_SMEM_MAX (then the backend runs dw_forward into a temporary and pw_gemm)."""
    d = p.dw
    dtype = d.dtype
    acc = ACC_ITEMSIZE[dtype]
    ci2 = d.CO
    K = 3 if (d.KH, d.KW) == (3, 3) else 0   # 3x3 unrolled; the GEMM phase dominates otherwise
    if layout == "NCHW":
        tw = min(SEP_TP, _np2(d.OW))
        th = SEP_TP // tw
    else:
        tw = min(8, _np2(d.OW))
        th = SEP_TP // tw
    ih = (th - 1) * d.sh + (d.KH - 1) * d.dh + 1
    iw = (tw - 1) * d.sw + (d.KW - 1) * d.dw + 1
    cinmax = (SEP_CC - 1) // d.M + 2
    shared = (ci2 * SEP_TP + cinmax * ih * iw + SEP_KC * (SEP_TP + 1)) * acc
    if shared > SEP_SMEM_MAX:
        return None
    name = f"sep_forward<{CTYPE[dtype]}, {K}, {_b(layout == 'NHWC')}>"
    ints = (d.N, d.C, d.H, d.W, d.M, d.OH, d.OW, d.KH, d.KW, d.sh, d.sw, d.dh, d.dw, d.pt, d.pl,
            p.pw.CO, th, tw, ih, iw, SEP_CC)
    grid = (_cdiv(d.OH, th) * _cdiv(d.OW, tw), min(d.N, MAX_GRID_YZ), 1)
    return Launch("separable", name, grid, (THREADS, 1, 1), shared, ints,
                  {"K": K, "tile": (th, tw)})


# ----------------------------------------------------------------------------- depthwise 1-d

C1_THREADS = 128                    # threads per block of the conv1d kernels (conv1d.cuh)
C1_OPT = 2                          # NCL: outputs per thread and chunk, in vectors (conv1d.cuh)
C1_SPECIALIZED_K = tuple(range(2, 9))   # widths with compile-time unrolled taps; others generic
C1_TARGET_THREADS = 132 * 2048      # NLC: threads to aim for (~ every thread slot of an H100/H200)
C1_NLC_BWD_REGS = 32                # NLC backward: K * VEC window values per thread at most
C1_MIN_CHUNKS = 3                   # NCL: chunks per block at least (when the row has them)


def c1_spec(K: int) -> int:
    """The compile-time width of a conv1d kernel: K for 2..8, 0 (runtime width) otherwise."""
    return K if K in C1_SPECIALIZED_K else 0


def c1_vec_limit(K: int, direction: str, layout: str):
    """The largest vector width a conv1d instantiation may use (None: a full 16-byte vector)."""
    if direction == "backward" and layout == "NLC" and c1_spec(K):
        return max(1, C1_NLC_BWD_REGS // K)
    return None


def _c1_rows_split(rows: int, chunks: int) -> tuple[int, int]:
    """NCL: (chunks per block, blocks per row) so that rows * blocks ~ 2 * TARGET_BLOCKS or more,
    each block taking C1_MIN_CHUNKS chunks at least (while one chunk is computed the next one's
    copies are in flight; the first chunk's copies are the only ones nothing overlaps)."""
    want = max(1, min(chunks, _cdiv(TARGET_BLOCKS * 2, max(1, rows)), MAX_GRID_YZ))
    per = max(min(chunks, C1_MIN_CHUNKS), _cdiv(chunks, want))
    return per, _cdiv(chunks, per)


def _c1_nlc_grid(cv: int, positions: int, n: int) -> tuple:
    """NLC: (grid, block, LS) for cv channel vectors and ``positions`` walk positions per image."""
    bx = min(32, _np2(cv))
    by = C1_THREADS // bx
    ls = max(8, _cdiv(cv * positions * n, C1_TARGET_THREADS))
    nseg = _cdiv(positions, ls)
    while _cdiv(nseg, by) > MAX_GRID_YZ:
        ls *= 2
        nseg = _cdiv(positions, ls)
    return (_cdiv(cv, bx), _cdiv(nseg, by), min(n, MAX_GRID_YZ)), (bx, by, 1), ls


def plan_conv1d_forward(p, x_addr: int = 0, y_addr: int = 0) -> Launch:
    """c1_forward launch for Conv1dProblem ``p`` (see conv1d.cuh)."""
    K = c1_spec(p.K)
    item = ITEMSIZE[p.dtype]
    if p.layout == "NCL":
        vec = pick_vec(p.dtype, (p.L,), (x_addr,))
        tl = C1_THREADS * vec * C1_OPT
        ip = _cdiv(vec - 1 + (tl - 1) * p.s + p.W + 1, vec) * vec
        shared = 2 * ip * item
        if shared > SMEM_OPTIN:
            raise NotImplementedError(
                "dwops cupy backend: the input span of this 1-d convolution (stride and dilation) "
                "does not fit in shared memory; use backend='numba'")
        per, splits = _c1_rows_split(p.N * p.C, _cdiv(p.OL, tl))
        grid, block, ls = (p.N * p.C, splits, 1), (C1_THREADS, 1, 1), 0
        info = {"tile": tl, "per": per}
    else:
        vec = pick_vec(p.dtype, (p.C,), (x_addr, y_addr)) if p.M == 1 else 1
        tl = ip = per = shared = 0
        grid, block, ls = _c1_nlc_grid(p.CO // vec, p.OL, p.N)
        info = {"segment": ls}
    name = f"c1_forward<{CTYPE[p.dtype]}, {K}, {vec}, {_b(p.layout == 'NLC')}>"
    ints = (p.N, p.C, p.L, p.M, p.K, p.OL, p.s, p.d, p.pl, ACTIVATION_CODE[p.activation],
            tl, ip, per, ls)
    return Launch("conv1d", name, grid, block, shared, ints, dict(K=K, vec=vec, **info))


def plan_conv1d_backward(p, x_addr: int = 0, gy_addr: int = 0, gx_addr: int = 0) -> Launch:
    """c1_backward launch (one pass: grad_input, grad_initial_state, and the per-split partial
    sums of grad_weight and grad_bias); ``info['splits']`` is the number of partial rows."""
    K = c1_spec(p.K)
    dtype = p.dtype
    item, acc = ITEMSIZE[dtype], ACC_ITEMSIZE[dtype]
    if p.layout == "NCL":
        vec = pick_vec(dtype, (p.L, p.OL), (x_addr, gy_addr, gx_addr))
        tl = C1_THREADS * vec * C1_OPT
        ipx = _cdiv(vec - 1 + (tl - 1) * p.s + p.W + 1, vec) * vec
        ipg = _cdiv(tl + (p.W + vec - 1) // p.s + vec - 1, vec) * vec
        stage = _cdiv(2 * (ipx + p.M * ipg) * item, 16) * 16
        kb = p.K + 1
        shared = stage + (p.M * p.K + (C1_THREADS // 32) * kb + p.M * kb) * acc
        if shared > SMEM_OPTIN:
            raise NotImplementedError(
                "dwops cupy backend: the spans of this 1-d convolution's backward (stride, "
                "dilation, multiplier) do not fit in shared memory; use backend='numba'")
        qa = (-p.pl // vec) * vec
        chunks = max(_cdiv(p.OL, tl), _cdiv(p.L - qa, tl * p.s))
        per, splits = _c1_rows_split(p.N * p.C, chunks)
        grid, block, ls = (p.N * p.C, splits, 1), (C1_THREADS, 1, 1), 0
        info = {"tile": tl, "per": per, "splits": p.N * splits}
    else:
        vec = 1
        if p.M == 1:
            vec = pick_vec(dtype, (p.C,), (x_addr, gy_addr, gx_addr),
                           c1_vec_limit(p.K, "backward", "NLC"))
        tl = ipx = ipg = per = 0
        positions = max(p.OL, _cdiv(p.pl + p.L, p.s))
        grid, block, ls = _c1_nlc_grid(p.C // vec, positions, p.N)
        shared = block[0] * block[1] * vec * acc
        info = {"segment": ls, "splits": p.N * grid[1]}
    name = f"c1_backward<{CTYPE[dtype]}, {K}, {vec}, {_b(p.layout == 'NLC')}>"
    ints = (p.N, p.C, p.L, p.M, p.K, p.OL, p.s, p.d, p.pl, tl, ipx, ipg, per, ls)
    return Launch("conv1d", name, grid, block, shared, ints, dict(K=K, vec=vec, **info))


def plan_conv1d_update(p) -> Launch:
    """c1_update launch for Conv1dUpdateProblem ``p``: one thread per (n, c)."""
    K = c1_spec(p.K)
    name = f"c1_update<{CTYPE[p.dtype]}, {K}>"
    ints = (p.N, p.C, p.M, p.K, p.T, ACTIVATION_CODE[p.activation])
    return Launch("conv1d", name, (_cdiv(p.N * p.C, C1_THREADS), 1, 1), (C1_THREADS, 1, 1), 0,
                  ints, {"K": K})


def plan_conv1d_final_state(p) -> Launch:
    """c1_final_state launch: the last W inputs of concat(initial_state or zeros, x)."""
    name = f"c1_final_state<{CTYPE[p.dtype]}, {_b(p.layout == 'NLC')}>"
    return Launch("conv1d", name, (_cdiv(p.N * p.C * p.W, C1_THREADS), 1, 1), (C1_THREADS, 1, 1),
                  0, (p.N, p.C, p.L, p.W))


# ----------------------------------------------------------------------------- instantiations


def instantiations() -> list[tuple]:
    """Every (file, op, direction, specialization, name expression) a plan can launch."""
    out = []
    for dt in CTYPE:
        ct = CTYPE[dt]
        for layout in ("NCHW", "NHWC"):
            nhwc = _b(layout == "NHWC")
            for K, S in [(k, 1) for k in SPECIALIZED_K] + [(0, 0)]:
                for v in vec_choices(dt):
                    out.append(("depthwise", "depthwise", "forward",
                                f"{layout} K={K or 'generic'} S={S} VEC={v}",
                                f"dw_forward<{ct}, {K}, {S}, {v}, {DW_FWD_OPT[layout][K]}, {nhwc}>"))
            for v in vec_choices(dt):
                out.append(("depthwise", "depthwise", "grad_input", f"{layout} strided VEC={v}",
                            f"dw_grad_input<{ct}, 0, {v}, {DW_GI_OPT[layout][0]}, {nhwc}>"))
            for K in SPECIALIZED_K:
                limit = max(1, GW_NHWC_ACC_REGS // (K * K)) if layout == "NHWC" else None
                for v in vec_choices(dt, limit):
                    out.append(("depthwise", "depthwise", "grad_weight", f"{layout} K={K} VEC={v}",
                                f"dw_grad_weight<{ct}, {K}, {v}, {DW_GW_OPT[layout]}, {nhwc}>"))
            out.append(("depthwise", "depthwise", "grad_weight", f"{layout} generic (taps)",
                        f"dw_grad_weight_taps<{ct}, {TAPS_PER_THREAD}, {nhwc}>"))
            for K in (3, 0):
                out.append(("separable", "separable", "forward", f"{layout} K={K or 'generic'} fused",
                            f"sep_forward<{ct}, {K}, {nhwc}>"))
        out.append(("depthwise", "depthwise", "grad_weight", "sum_splits", f"sum_splits<{ct}>"))
        for (direction, layout), (akc, bnc, part) in PW_FORMS.items():
            out.append(("pointwise", "pointwise", direction, f"{layout} gemm 64x64",
                        f"pw_gemm<{ct}, {_b(akc)}, {_b(bnc)}, {_b(part)}>"))
        out.append(("pointwise", "pointwise", "grad_weight", "sum_splits", f"sum_splits<{ct}>"))
        for layout in ("NCL", "NLC"):
            nlc = _b(layout == "NLC")
            for K in (0,) + C1_SPECIALIZED_K:
                spec = f"{layout} K={K or 'generic'}"
                for v in vec_choices(dt):
                    out.append(("conv1d", "depthwise_conv1d", "forward", f"{spec} VEC={v}",
                                f"c1_forward<{ct}, {K}, {v}, {nlc}>"))
                for v in vec_choices(dt, c1_vec_limit(K, "backward", layout)):
                    out.append(("conv1d", "depthwise_conv1d", "backward", f"{spec} VEC={v}",
                                f"c1_backward<{ct}, {K}, {v}, {nlc}>"))
            out.append(("conv1d", "depthwise_conv1d", "forward", f"{layout} final state",
                        f"c1_final_state<{ct}, {nlc}>"))
        for K in (0,) + C1_SPECIALIZED_K:
            out.append(("conv1d", "depthwise_conv1d", "update", f"K={K or 'generic'}",
                        f"c1_update<{ct}, {K}>"))
        out.append(("conv1d", "depthwise_conv1d", "backward", "sum_splits", f"sum_splits<{ct}>"))
    return out


# ----------------------------------------------------------------------------- sources, includes


@functools.lru_cache(maxsize=None)
def source(file: str) -> str:
    """The compilation unit of cuda/<file>.cuh: common.cuh followed by the file (as text, so
    CuPy's binary cache is keyed on all of it)."""
    with open(os.path.join(CUDA_DIR, "common.cuh")) as f:
        common = f.read()
    with open(os.path.join(CUDA_DIR, f"{file}.cuh")) as f:
        body = f.read()
    return common + "\n" + body


@functools.lru_cache(maxsize=None)
def cuda_include_dir() -> str | None:
    """Directory holding cuda_fp16.h and cuda_bf16.h: the nvidia CUDA runtime wheel
    (``nvidia/cu13/include`` or ``nvidia/cuda_runtime/include``), CuPy's CUDA path, CUDA_PATH, or
    /usr/local/cuda/include."""
    candidates = []
    try:
        from cuda.pathfinder import find_nvidia_header_directory

        for lib in ("cudart", "nvrtc"):
            try:
                d = find_nvidia_header_directory(lib)
            except Exception:
                d = None
            if d:
                candidates.append(d)
    except ImportError:
        pass
    try:
        import importlib.util

        spec = importlib.util.find_spec("nvidia")
        for root in (spec.submodule_search_locations or []) if spec else []:
            for sub in ("cu13", "cu12", "cuda_runtime", "cuda_nvrtc"):
                candidates.append(os.path.join(root, sub, "include"))
    except Exception:
        pass
    try:
        from cupy import _environment

        cp = _environment.get_cuda_path()
        if cp:
            candidates.append(os.path.join(cp, "include"))
    except Exception:
        pass
    for env in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(env):
            candidates.append(os.path.join(os.environ[env], "include"))
    candidates.append("/usr/local/cuda/include")
    for d in candidates:
        if d and os.path.isfile(os.path.join(d, "cuda_fp16.h")) and \
                os.path.isfile(os.path.join(d, "cuda_bf16.h")):
            return d
    return None


def compile_options() -> tuple:
    inc = cuda_include_dir()
    return ("--std=c++17",) + ((f"-I{inc}",) if inc else ())


# ----------------------------------------------------------------------------- kernel report


def _nvrtc_check(result, prog=None, what="nvrtc"):
    from cuda.bindings import nvrtc

    err = result[0]
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        log = ""
        if prog is not None:
            _, n = nvrtc.nvrtcGetProgramLogSize(prog)
            buf = b" " * n
            nvrtc.nvrtcGetProgramLog(prog, buf)
            log = buf.decode(errors="replace")
        raise RuntimeError(f"{what}: {err}\n{log}")
    return result[1:] if len(result) > 1 else None


def compile_ptx(file: str, names: list[str], arch: str = "sm_90") -> tuple[bytes, dict]:
    """PTX of ``names`` instantiated from cuda/<file>.cuh, and name expression -> lowered name."""
    from cuda.bindings import nvrtc

    cc = arch.split("_", 1)[1]
    (prog,) = _nvrtc_check(nvrtc.nvrtcCreateProgram(source(file).encode(), f"{file}.cu".encode(),
                                                    0, [], []))
    try:
        for n in names:
            _nvrtc_check(nvrtc.nvrtcAddNameExpression(prog, n.encode()))
        opts = [f"--gpu-architecture=compute_{cc}".encode()] + [o.encode() for o in compile_options()]
        _nvrtc_check(nvrtc.nvrtcCompileProgram(prog, len(opts), opts), prog, f"compiling {file}.cuh")
        (size,) = _nvrtc_check(nvrtc.nvrtcGetPTXSize(prog))
        ptx = b" " * size
        _nvrtc_check(nvrtc.nvrtcGetPTX(prog, ptx))
        lowered = {}
        for n in names:
            (low,) = _nvrtc_check(nvrtc.nvrtcGetLoweredName(prog, n.encode()))
            lowered[n] = low.decode()
        return ptx, lowered
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def _compile_group(args):
    """Worker: compile and assemble one (file, names) group; (props per name, error or None)."""
    file, names, arch = args
    try:
        ptx, lowered = compile_ptx(file, names, arch)
        props = assemble(ptx, arch)
        return {n: props.get(lowered[n]) for n in names}, None
    except Exception as exc:  # one broken group: reported on each of its rows
        return {}, str(exc)


def compile_report(arch: str = "sm_90", workers: int | None = None) -> list[dict]:
    """Compile every instantiation (:func:`instantiations`) through NVRTC for compute_XX and
    assemble for ``arch`` with nvJitLink, one compilation per (file, dtype) group, groups in
    parallel processes (``workers``, default: the CPUs available). One row per instantiation:
    backend, op, direction, specialization, registers, shared_bytes (static), spill_bytes, error
    (None or a message)."""
    insts = instantiations()
    groups: dict = {}
    for file, op, direction, spec, name in insts:
        key = (file, name[name.index("<") + 1:].split(",")[0].rstrip(">"))
        groups.setdefault(key, [])
        if name not in groups[key]:
            groups[key].append(name)
    jobs = [(file, names, arch) for (file, _), names in groups.items()]
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = max(1, min(workers or 1, len(jobs)))
    if workers > 1:
        import concurrent.futures
        import multiprocessing

        ctx = multiprocessing.get_context("fork" if hasattr(os, "fork") else "spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            outcomes = list(pool.map(_compile_group, jobs))
    else:
        outcomes = [_compile_group(j) for j in jobs]
    results, errors = {}, {}
    for (file, names, _), (props, err) in zip(jobs, outcomes):
        for n in names:
            if err is not None:
                errors[(file, n)] = err
            else:
                results[(file, n)] = props.get(n)
    rows, seen = [], set()
    for file, op, direction, spec, name in insts:
        if (file, name) in seen:
            continue
        seen.add((file, name))
        r = results.get((file, name))
        err = errors.get((file, name))
        if r is None and err is None:
            err = "no ptxas report for this entry"
        rows.append({
            "backend": "cupy", "op": op, "direction": direction,
            "specialization": f"{name} [{spec}]",
            "registers": r["registers"] if r else None,
            "shared_bytes": r["shared_bytes"] if r else None,
            "spill_bytes": r["spill_bytes"] if r else None,
            "error": err,
        })
    return rows


# ----------------------------------------------------------------------------- the backend


def _module(file: str, name: str):
    """The CuPy module of one name expression, exactly as the backend builds it (so the disk
    cache entry :func:`warm_cache` writes is the one a later launch reads)."""
    import cupy

    return cupy.RawModule(code=source(file), options=compile_options(), name_expressions=[name])


def _warm_one(item) -> str:
    file, name = item
    _module(file, name).get_function(name)
    return name


def warm_cache(workers: int | None = None) -> int:
    """Compile every instantiation (:func:`instantiations`) for the current GPU into CuPy's
    on-disk kernel cache, ``workers`` processes at a time (default: the CPUs available), so that
    later launches load binaries instead of running NVRTC one name expression at a time. Needs a
    GPU. Returns the number of name expressions compiled."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    items = sorted({(row[0], row[-1]) for row in instantiations()})
    workers = workers or len(os.sched_getaffinity(0))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        done = list(pool.map(_warm_one, items, chunksize=4))
    return len(done)


class CupyBackend(Backend):
    """CUDA C++ kernels through CuPy; arrays are CuPy arrays on the caller's device and stream."""

    name = "cupy"
    device = "cuda"

    def __init__(self):
        self._modules: dict = {}

    # -- availability and plumbing
    def unavailable_reason(self):
        try:
            import cupy
        except Exception as exc:  # ImportError, or a CUDA library failing to load
            return f"cupy cannot be imported ({exc})"
        try:
            if cupy.cuda.runtime.getDeviceCount() < 1:
                return "no CUDA device is visible"
        except Exception as exc:
            return f"no usable CUDA device ({exc})"
        return None

    def prefers(self, op, problem) -> bool:
        """True (the default GPU backend) unless no launch plan exists for this problem (a
        dilated tile too large for shared memory), so that "auto" falls back to numba."""
        try:
            if op == "depthwise_forward":
                plan_dw_forward(conv_of_forward(problem), problem.dtype, problem.layout)
            elif op == "depthwise_grad_input":
                plan_dw_grad_input(problem, problem.layout)
            elif op == "depthwise_grad_weight":
                plan_dw_grad_weight(problem, problem.layout)
            elif op == "separable_forward" and plan_separable(problem, problem.dw.layout) is None:
                plan_dw_forward(conv_of_forward(problem.dw), problem.dw.dtype, problem.dw.layout)
            elif op == "depthwise_conv1d_forward":
                plan_conv1d_forward(problem)
            elif op == "depthwise_conv1d_backward":
                plan_conv1d_backward(problem)
        except NotImplementedError:
            return False
        return True

    def stream_for(self, like_obj, like_info):
        from . import _gpu

        return _gpu.caller_stream(like_obj, like_info)

    def asarray(self, obj, info):
        """A C-contiguous CuPy array on the caller's GPU: zero-copy (DLPack with the caller's
        stream, or __cuda_array_interface__) for GPU arrays, a copy for host arrays. bfloat16
        arrives as its uint16 bits (CuPy has no bfloat16 dtype; the kernels read the bits)."""
        import cupy

        from . import _gpu

        if not info.on_gpu:
            from .._interop import to_host

            host = np.ascontiguousarray(to_host(obj, info))
            if info.dtype == "bfloat16":
                host = host.view(np.uint16)
            with cupy.cuda.Device(cupy.cuda.runtime.getDevice()), cupy.cuda.Stream.null:
                return cupy.asarray(host)
        ordinal = info.device[1]
        stream = self.stream_for(obj, info)
        if info.dtype == "bfloat16":
            obj = _bf16_bits(obj, info)
        a = _gpu.device_view(obj, info, stream, ordinal)
        if not a.flags.c_contiguous:
            with cupy.cuda.Device(ordinal), _gpu.cupy_stream(stream):
                a = cupy.ascontiguousarray(a)
        return a

    def allocate(self, shape, dtype, like_obj, like_info):
        import cupy

        from . import _gpu

        holder = None
        if not (dtype == "bfloat16" and like_info.lib == "cupy"):
            holder = _gpu.empty_in_caller(shape, dtype, like_obj, like_info)
        ordinal = like_info.device[1] if like_info.on_gpu else cupy.cuda.runtime.getDevice()
        if holder is None:
            with cupy.cuda.Device(ordinal):
                native = cupy.empty(shape, dtype=_cupy_dtype(dtype))
        elif like_info.lib == "torch" and dtype == "bfloat16":
            import torch

            with cupy.cuda.Device(ordinal):
                native = cupy.from_dlpack(holder.view(torch.int16))
        elif like_info.lib == "cupy":
            native = holder
        else:
            with cupy.cuda.Device(ordinal):
                native = cupy.from_dlpack(holder)

        def finish():
            result = _gpu.finish(native, holder, like_info)
            if dtype == "bfloat16" and holder is None:
                result = _bits_to_bf16(result, like_info)
            return result

        return native, finish

    # -- kernels
    def _function(self, launch: Launch):
        """The compiled kernel for ``launch.name`` on the current device (memoized)."""
        import cupy

        dev = cupy.cuda.runtime.getDevice()
        key = (dev, launch.file, launch.name)
        fn = self._modules.get(key)
        if fn is None:
            fn = _module(launch.file, launch.name).get_function(launch.name)
            self._modules[key] = fn
        if launch.shared > SMEM_DEFAULT and fn.max_dynamic_shared_size_bytes < launch.shared:
            fn.max_dynamic_shared_size_bytes = launch.shared
        return fn

    def _run(self, launch: Launch, pointers: tuple, stream):
        """Launch ``launch`` on ``stream`` with the pointer arguments followed by its integers."""
        from . import _gpu

        with pointers[0].device:
            fn = self._function(launch)
            with _gpu.cupy_stream(stream):
                fn(launch.grid, launch.block, tuple(pointers) + _scalars(launch.ints),
                   shared_mem=launch.shared)

    def _weights_t(self, w, rows: int, kk: int, stream):
        """(rows, kk) -> (kk, rows) contiguous copy (NHWC kernels read taps along channels)."""
        import cupy

        from . import _gpu

        with w.device, _gpu.cupy_stream(stream):
            return cupy.ascontiguousarray(w.reshape(rows, kk).T)

    def depthwise_forward(self, p, x, w, b, out, stream=None):
        self._dw_forward(conv_of_forward(p), p.dtype, p.layout, x, w, b, out, stream)

    def _dw_forward(self, c: Conv, dtype, layout, x, w, b, out, stream):
        launch = plan_dw_forward(c, dtype, layout, x.data.ptr, out.data.ptr)
        if layout == "NHWC":
            w = self._weights_t(w, c.CO * c.R, c.KH * c.KW, stream)
        self._run(launch, (x, w, _ptr(b), out), stream)

    def depthwise_grad_input(self, p, gy, w, out, stream=None):
        if p.sh == 1 and p.sw == 1:
            self._dw_forward(conv_of_grad_input(p), p.dtype, p.layout, gy, w, None, out, stream)
            return
        launch = plan_dw_grad_input(p, p.layout, gy.data.ptr, out.data.ptr)
        if p.layout == "NHWC":
            w = self._weights_t(w, p.CO, p.KH * p.KW, stream)
        self._run(launch, (gy, w, out), stream)

    def depthwise_grad_weight(self, p, x, gy, out, stream=None):
        import cupy

        from . import _gpu

        s1, s2, count = plan_dw_grad_weight(p, p.layout, x.data.ptr, gy.data.ptr)
        with x.device, _gpu.cupy_stream(stream):
            part = cupy.empty(count, dtype="float64" if p.dtype == "float64" else "float32")
        self._run(s1, (x, gy, part), stream)
        self._run(s2, (part, out), stream)

    def _pointwise(self, op, p, arrays: dict, bias, residual, stream):
        """pw_gemm over images [n0, n1) of each chunk (pointwise_chunks keeps the GEMM's 32-bit
        sizes in range); grad_weight chunks write consecutive splits of one partial buffer that a
        single sum_splits reduces."""
        import dataclasses

        import cupy

        from . import _gpu

        chunks = pointwise_chunks(p)
        plans = [plan_pointwise(op, dataclasses.replace(p, N=n1 - n0), p.layout)
                 for n0, n1 in chunks]
        operands = plans[0][0].info["operands"]
        out = arrays[operands[2]]
        partial = plans[0][1] is not None
        part = None
        if partial:
            with out.device, _gpu.cupy_stream(stream):
                part = cupy.empty(sum(c for _, _, c in plans),
                                  dtype="float64" if p.dtype == "float64" else "float32")
        act = ACTIVATION_CODE[p.activation] if op == "forward" else 0
        offset = 0
        for (n0, n1), (gemm, _, count) in zip(chunks, plans):
            # the chunk's images of each batched operand (the weights w and gw are shared)
            a, b_, c = (arrays[k] if k in ("w", "gw") else arrays[k][n0:n1] for k in operands)
            res = None if residual is None else residual[n0:n1]
            # pw_gemm(A, B, C, partial, bias, bias_on_n, res, act, Mdim, ...)
            args = (a, b_, _ptr(None) if partial else c,
                    _ptr(None if part is None else part[offset:offset + count]), _ptr(bias),
                    np.int32(gemm.ints[0]), _ptr(res), np.int32(act)) + _scalars(gemm.ints[1:])
            offset += count
            with out.device:
                fn = self._function(gemm)
                with _gpu.cupy_stream(stream):
                    fn(gemm.grid, gemm.block, args, shared_mem=gemm.shared)
        if partial:
            splits = offset // (p.CO * p.CI)
            red = plans[0][1]
            red = Launch(red.file, red.name, red.grid, red.block, red.shared,
                         (splits, p.CO * p.CI), red.info)
            self._run(red, (part, out), stream)

    def pointwise_forward(self, p, x, w, b, residual, out, stream=None):
        self._pointwise("forward", p, {"x": x, "w": w, "y": out}, b, residual, stream)

    def pointwise_grad_input(self, p, gy, w, out, stream=None):
        self._pointwise("grad_input", p, {"gy": gy, "w": w, "gx": out}, None, None, stream)

    def pointwise_grad_weight(self, p, x, gy, out, stream=None):
        self._pointwise("grad_weight", p, {"x": x, "gy": gy, "gw": out}, None, None, stream)

    def separable_forward(self, p, x, dw_w, pw_w, b, dw_b, residual, out, stream=None):
        from . import _gpu

        launch = plan_separable(p, p.dw.layout)
        if launch is not None:
            args = (x, dw_w, _ptr(dw_b), np.int32(ACTIVATION_CODE[p.dw.activation]), pw_w,
                    _ptr(b), _ptr(residual), np.int32(ACTIVATION_CODE[p.pw.activation]), out) + \
                _scalars(launch.ints)
            with x.device:
                fn = self._function(launch)
                with _gpu.cupy_stream(stream):
                    fn(launch.grid, launch.block, args, shared_mem=launch.shared)
            return
        # Unfused: the depthwise result (with dw bias and dw activation) in a temporary. 16-bit
        # types run both stages in float32 and round once at the end, as the contract requires
        # (the extra casting passes only concern channel counts too large to fuse).
        import dataclasses

        import cupy

        dt = p.dw.dtype
        with x.device, _gpu.cupy_stream(stream):
            if dt in ("float16", "bfloat16"):
                f32 = [None if a is None else _to_float32(a, dt)
                       for a in (x, dw_w, pw_w, b, dw_b, residual)]
                x32, dww32, pww32, b32, dwb32, r32 = f32
                pdw = dataclasses.replace(p.dw, dtype="float32")
                ppw = dataclasses.replace(p.pw, dtype="float32")
                mid = cupy.empty(p.dw.y_shape, dtype=np.float32)
                out32 = cupy.empty(p.pw.y_shape, dtype=np.float32)
            else:
                x32, dww32, pww32, b32, dwb32, r32 = x, dw_w, pw_w, b, dw_b, residual
                pdw, ppw = p.dw, p.pw
                mid, out32 = cupy.empty(p.dw.y_shape, dtype=x.dtype), out
        self.depthwise_forward(pdw, x32, dww32, dwb32, mid, stream)
        self.pointwise_forward(ppw, mid, pww32, b32, r32, out32, stream)
        if out32 is not out:
            with x.device, _gpu.cupy_stream(stream):
                _from_float32(out32, dt, out)

    # -- depthwise 1-d
    def nondecreasing(self, seq) -> bool:
        with seq.device:
            return bool((seq[:, 1:] >= seq[:, :-1]).all())

    def aliases(self, native, obj, info) -> bool:
        """True when ``native`` is the caller's own GPU memory (same device pointer, same number
        of elements, the caller's array C-contiguous), so an update may write into it."""
        if not info.on_gpu:
            return False
        try:
            ptr = _device_pointer(obj, info)
        except Exception:
            return False
        return ptr is not None and ptr == native.data.ptr and native.size == math.prod(info.shape)

    def _seq32(self, seq, stream):
        """seq_idx as int32 (N, L): int64 becomes segment numbers (0, 1, ... counting the changes
        along L), which keeps every equality of the non-decreasing original."""
        if seq is None or seq.dtype == np.int32:
            return seq
        import cupy

        from . import _gpu

        with seq.device, _gpu.cupy_stream(stream):
            out = cupy.empty(seq.shape, dtype=np.int32)
            out[:, :1] = 0
            out[:, 1:] = (seq[:, 1:] != seq[:, :-1]).astype(np.int32).cumsum(axis=1)
        return out

    def depthwise_conv1d_forward(self, p, x, w, b, state, seq, out, final_out, stream=None):
        launch = plan_conv1d_forward(p, x.data.ptr, out.data.ptr)
        self._run(launch, (x, w, _ptr(b), _ptr(state), _ptr(self._seq32(seq, stream)), out),
                  stream)
        if final_out is not None:
            self._run(plan_conv1d_final_state(p), (x, _ptr(state), final_out), stream)

    def depthwise_conv1d_backward(self, p, x, gy, w, state, seq, gx, gw, gb, gstate,
                                  stream=None):
        import cupy

        from . import _gpu

        launch = plan_conv1d_backward(p, x.data.ptr, gy.data.ptr,
                                      0 if gx is None else gx.data.ptr)
        splits = launch.info["splits"]
        acc = "float64" if p.dtype == "float64" else "float32"
        with x.device, _gpu.cupy_stream(stream):
            part_w = None if gw is None else cupy.empty(splits * p.CO * p.K, dtype=acc)
            part_b = None if gb is None else cupy.empty(splits * p.CO, dtype=acc)
        self._run(launch, (x, gy, w, _ptr(state), _ptr(self._seq32(seq, stream)), _ptr(gx),
                           _ptr(gstate), _ptr(part_w), _ptr(part_b)), stream)
        for part, out, count in ((part_w, gw, p.CO * p.K), (part_b, gb, p.CO)):
            if part is not None:
                red = Launch("conv1d", f"sum_splits<{CTYPE[p.dtype]}>",
                             (_cdiv(count, THREADS), 1, 1), (THREADS, 1, 1), 0, (splits, count))
                self._run(red, (part, out), stream)

    def depthwise_conv1d_update(self, p, x, state, w, b, out, state_out, stream=None):
        self._run(plan_conv1d_update(p), (x, state, w, _ptr(b), out, state_out), stream)


def _device_pointer(obj, info):
    """The device address of the caller's C-contiguous GPU array ``obj``, else None."""
    if info.lib == "torch":
        return obj.data_ptr() if obj.is_contiguous() else None
    if info.lib == "cupy":
        return obj.data.ptr if obj.flags.c_contiguous else None
    iface = getattr(obj, "__cuda_array_interface__", None)
    if iface is None or iface.get("strides") is not None:
        return None
    return iface["data"][0]


def _to_float32(a, dtype: str):
    """float32 copy of a 16-bit CuPy array (bfloat16 given as its uint16 bits)."""
    if dtype == "bfloat16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)


def _from_float32(a32, dtype: str, out) -> None:
    """Round a float32 CuPy (or NumPy) array once, to nearest even, into the 16-bit ``out``
    (bfloat16 as uint16 bits; NaN becomes the quiet NaN 0x7FC0)."""
    import cupy

    xp = cupy.get_array_module(a32)
    if dtype == "float16":
        out[...] = a32.astype(np.float16)
        return
    bits = a32.view(np.uint32)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))) >> 16
    out[...] = xp.where(xp.isnan(a32), np.uint32(0x7FC0), rounded).astype(np.uint16)


class _I64(int):
    """An integer kernel argument passed as a 64-bit value (strides in pw_gemm)."""


def _ptr(a):
    """A kernel pointer argument: the array, or a null pointer for None."""
    return np.uint64(0) if a is None else a


def _scalars(ints) -> tuple:
    return tuple(np.int64(v) if isinstance(v, _I64) else np.int32(v) for v in ints)


def _cupy_dtype(dtype: str):
    return np.dtype(np.uint16) if dtype == "bfloat16" else numpy_dtype(dtype)


def _bf16_bits(obj, info):
    """The bits of a bfloat16 GPU array as a 16-bit integer array of the same library (zero-copy
    for PyTorch), since CuPy has no bfloat16 dtype."""
    if info.lib == "torch":
        import torch

        return obj.detach().view(torch.int16)
    if info.lib == "jax":
        import jax

        return jax.lax.bitcast_convert_type(obj, np.uint16)
    raise BackendUnavailableError(
        "dwops cupy backend: bfloat16 GPU arrays are supported from PyTorch and JAX (CuPy has no "
        "bfloat16 dtype); use backend='numba' or pass float16/float32")


def _bits_to_bf16(result, info):
    """Turn a uint16 result holding bfloat16 bits back into bfloat16 in the caller's library."""
    if isinstance(result, np.ndarray):
        return result.view(numpy_dtype("bfloat16"))
    if info.lib == "jax":
        import jax
        import jax.numpy as jnp

        return jax.lax.bitcast_convert_type(result, jnp.bfloat16)
    return result


BACKEND = CupyBackend()
