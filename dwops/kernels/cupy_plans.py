"""Launch plans of the ``cupy`` backend: pure Python, unit-tested on the CPU.

:func:`plan_dw_forward`, :func:`plan_dw_grad_input`, :func:`plan_dw_grad_weight`,
:func:`plan_pointwise`, :func:`plan_separable`, and for the depthwise 1-d op
:func:`plan_conv1d_forward`, :func:`plan_conv1d_backward`, :func:`plan_conv1d_update`,
:func:`plan_conv1d_final_state`, turn a problem into a :class:`Launch` (kernel name expression, grid,
block, dynamic shared memory, integer arguments): the specialization (kernel size 1/3/5/7 or
generic, unit stride; 1-d widths 2-8 or generic), the vector width allowed by the pointers' and rows'
alignment, the tile. :func:`instantiations` lists every name expression any plan can produce (what
the compile report and the cache warm-up build, see ``cupy_compile``).

Shapes: x ``(N, C, H, W)`` / ``(N, H, W, C)``; depthwise weight ``(C*M, 1, KH, KW)``; pointwise
weight ``(CO, CI)``; 1-d: x ``(N, C, L)`` / ``(N, L, C)``, weight ``(C*M, 1, K)``, states
``(N, C, W)``, seq_idx ``(N, L)``; see ``dwops/_spec.py`` for the problem objects.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

from .._spec import ACTIVATION_CODES
from .cupy_device import H200, DeviceLimits

# ----------------------------------------------------------------------------- constants

CTYPE = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float", "float64": "double"}
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
ACC_ITEMSIZE = {"float16": 4, "bfloat16": 4, "float32": 4, "float64": 8}

SPECIALIZED_K = (1, 3, 5, 7)        # square kernel sizes with compile-time unrolled templates
THREADS = 256                       # threads per block of the tiled kernels
SMEM_DEFAULT = 48 * 1024            # dynamic shared memory without opting in (every device)
SEP_SMEM_MAX = 96 * 1024            # fused separable: up to 2 blocks per SM (where it fits)
SEP_TP = 64                         # fused separable: output pixels per block (separable.cuh)
SEP_KC = 32                         # fused separable: pw_w chunk (separable.cuh)
SEP_CC = 16                         # fused separable: mid channels per phase-1 chunk
PW_TILE = 64                        # pointwise GEMM tile (pointwise.cuh PW_BM = PW_BN)
PW_BK = 16
TAPS_PER_THREAD = 4                 # dw_grad_weight_taps TPT
GW_NHWC_ACC_REGS = 72               # NHWC grad_weight: K*K*VEC accumulators per thread at most
BLOCKS_PER_SM = 4                   # pointwise and 1-d reductions: blocks to aim for per SM
GW_MAX_WAVES = 4                    # weight gradient: the most waves of split blocks considered
MAX_GRID_YZ = 65535

# rows (NCHW) / columns (NHWC) of outputs per thread, by specialization K (0 = generic)
DW_FWD_OPT = {"NCHW": {1: 4, 3: 2, 5: 2, 7: 1, 0: 1}, "NHWC": {1: 4, 3: 4, 5: 2, 7: 2, 0: 1}}
DW_GW_OPT = {"NCHW": 1, "NHWC": 2}   # the tiled weight gradient (NCHW 1x1, 3x3: direct)
GW_DIRECT_K = (1, 3)                # NCHW weight gradients by dw_grad_weight_direct

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


def smem_ways(lane_bytes: list, width: int) -> int:
    """Shared-memory wavefronts of one warp request: lane i reads ``width`` bytes at byte
    ``lane_bytes[i]``. 32 banks of 4 bytes; 4-byte or narrower accesses are served in one pass
    over the warp, 8-byte in two half-warp passes, 16-byte in four quarter-warp passes; a pass
    costs the most distinct words any bank holds (the emulator's trace counts the same way)."""
    per_pass = 32 if width <= 4 else 16 if width <= 8 else 8
    passes: dict = {}
    for lane, a in enumerate(lane_bytes):
        words = passes.setdefault(lane // per_pass, set())
        words.update(range(a // 4, (a + width - 1) // 4 + 1))
    total = 0
    for words in passes.values():
        banks: dict = {}
        for wd in words:
            banks[wd % 32] = banks.get(wd % 32, 0) + 1
        total += max(banks.values())
    return total


def conflict_free_pitch(ip_min: int, vec: int, item: int, bw: int, rows: int) -> int:
    """The row pitch (elements, a multiple of ``vec``, >= ``ip_min``) of a shared tile read by
    warps of ``bw`` lanes per row (lane l: column (l % bw) * vec, row (l // bw) * ``rows``) with
    ``vec``-element vectors: the smallest whose request costs the fewest wavefronts. Only a warp
    that spans several rows within one pass can conflict; otherwise ``ip_min`` is returned."""
    return padded_pitch(ip_min, vec, item,
                        lambda ip: [(l // bw) * rows * ip + (l % bw) * vec for l in range(32)])


def padded_pitch(ip_min: int, vec: int, item: int, offsets) -> int:
    """The pitch (elements, a multiple of ``vec``, >= ``ip_min``) for which a warp whose lanes
    read ``vec`` elements at ``offsets(pitch)`` (32 element offsets) costs the fewest shared
    wavefronts (:func:`smem_ways`); the smallest such pitch."""
    best, best_ways = ip_min, None
    for ip in range(ip_min, ip_min + 32 * max(1, 4 // (vec * item)) + 32, vec):
        ways = smem_ways([o * item for o in offsets(ip)], vec * item)
        if best_ways is None or ways < best_ways:
            best, best_ways = ip, ways
    return best


@functools.lru_cache(maxsize=4096)
def nhwc_pixel_pitch(cp: int, vec: int, item: int, ct: int, twt: int, opt: int, iw: int,
                     sh: int, sw: int, M: int, R: int) -> int:
    """The pixel pitch of an NHWC shared tile of ``cp`` channels per pixel read by blocks of
    (``ct`` channel lanes, pixel threads): thread ty reads tile pixel (ty // twt) * sh rows and
    (ty % twt) * opt * sw columns in, lane tx tile channel (tx * vec // M) * R
    (:func:`padded_pitch`)."""
    def offsets(ip):
        out = []
        for lane in range(32):
            tx, ty = lane % ct, lane // ct
            pixel = (ty // twt) * sh * iw + (ty % twt) * opt * sw
            out.append(pixel * ip + (tx * vec // M) * R)
        return out

    return padded_pitch(cp, vec, item, offsets)


def kernel_size_spec(KH: int, KW: int) -> int:
    """The compile-time kernel size for square 1x1, 3x3, 5x5, 7x7 kernels; 0 (generic) otherwise."""
    return KH if KH == KW and KH in SPECIALIZED_K else 0


DW_FWD_S2_K = (3, 5, 7)              # square kernels with a stride-2 forward specialization (NCHW)


def dw_forward_spec(c, layout: str = "NCHW", vec: int = 1) -> tuple[int, int]:
    """(K, S) of dw_forward: the specialized K with S = 1 for stride 1 and dilation 1; S = 2 for
    stride 2, dilation 1 and K in DW_FWD_S2_K in NCHW when the plan vectorizes (``vec`` > 1)
    and each thread's ``vec`` output columns store as one aligned vector (OW % vec == 0); else
    the generic runtime path (0, 0). Unvectorized (misaligned or odd-width) strided rows keep
    the generic path: its blocks have twice the warps per tile (OPT = 1), which the small maps
    these are need more than register weights (benchmarks/notes/cupy.md)."""
    K = kernel_size_spec(c.KH, c.KW)
    if K and c.sh == c.sw == c.dh == c.dw == 1:
        return K, 1
    if (K in DW_FWD_S2_K and layout == "NCHW" and c.sh == c.sw == 2 and c.dh == c.dw == 1
            and vec > 1 and c.OW % vec == 0):
        return K, 2
    return 0, 0


# ----------------------------------------------------------------------------- launch plans


class _I64(int):
    """An integer kernel argument passed as a 64-bit value (strides in pw_gemm)."""


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
                p.pl, p.M, 1, 0, ACTIVATION_CODES[p.activation])


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


def _fit(sizes, smem_of, dev: DeviceLimits):
    """Fit under 48 KiB by shrinking, else opt in to up to the device's limit (227 KiB on an
    H100/H200) at the default sizes (or shrunk). Raises NotImplementedError when even a
    one-thread tile does not fit."""
    got = _shrink_to_fit(sizes, smem_of, SMEM_DEFAULT)
    if got is not None and math.prod(got) >= 32:
        return got
    got = _shrink_to_fit(sizes, smem_of, dev.smem_optin)
    if got is None:
        raise NotImplementedError(
            "dwops cupy backend: the input tile of this convolution (kernel and dilation) does not "
            "fit in shared memory; use backend='numba'")
    return got


def mid_dtype(dtype: str) -> str:
    """The element type of the unfused separable forward's depthwise result: float32 for 16-bit
    types (both steps in float32, one rounding at the end), else the dtype itself."""
    return "float32" if ITEMSIZE[dtype] == 2 else dtype


def _out_aligned(vec: int, out_dtype: str, y_addr: int) -> int:
    """``vec``, or 1 when a vector of ``vec`` output elements at ``y_addr`` is misaligned."""
    return vec if y_addr % (vec * ITEMSIZE[out_dtype]) == 0 else 1


def plan_dw_forward(c: Conv, dtype: str, layout: str, x_addr: int = 0, y_addr: int = 0,
                    out_dtype: str | None = None, dev: DeviceLimits = H200) -> Launch:
    """dw_forward launch for geometry ``c`` (see depthwise.cuh) on device ``dev``: reads
    ``dtype``, writes ``out_dtype`` (default ``dtype``; float32 for 16-bit inputs, see
    :func:`mid_dtype`)."""
    out = out_dtype or dtype
    item = ITEMSIZE[dtype]
    if layout == "NCHW":
        vec = _out_aligned(pick_vec(dtype, (c.W,), (x_addr,)), out, y_addr)
        K, S = dw_forward_spec(c, layout, vec)
        if not S and vec > 2 and dw_forward_spec(c, layout, vec // 2)[1] == 2:
            # stride 2 with OW a multiple of half a vector only: 8-byte vectors (the x and y
            # alignment of the full vector covers the half)
            vec //= 2
            K, S = dw_forward_spec(c, layout, vec)
        opt = DW_FWD_OPT[layout][K]
        bw = min(32, _np2(_cdiv(c.OW, vec)))
        bh = max(1, min(THREADS // bw, _np2(_cdiv(c.OH, opt))))

        def geometry(s):
            bw_, bh_ = s
            th, tw = bh_ * opt, bw_ * vec
            hp = 0
            if S == 1:
                nwv = _cdiv(vec + K - 1, vec)
                ih, iw = th + K - 1, tw + K - 1
                # thread rows are opt tile rows apart; pad the pitch against bank conflicts
                ip = conflict_free_pitch((bw_ - 1 + nwv) * vec, vec, item, bw_, opt)
            elif S == 2:
                # phase-split rows: the even columns (half pitch hp), then the odd ones; a thread
                # reads vectors tx*vec .. of each half; thread rows are 2*opt tile rows apart
                ih, iw = (th - 1) * 2 + K, (tw - 1) * 2 + K
                hp = (bw_ - 1 + _cdiv(vec + (K + 1) // 2 - 1, vec)) * vec
                odd = (bw_ - 1 + _cdiv(vec + K // 2 - 1, vec)) * vec
                ip = conflict_free_pitch(hp + odd, vec, item, bw_, 2 * opt)
            else:
                ih = (th - 1) * c.sh + (c.KH - 1) * c.dh + 1
                iw = (tw - 1) * c.sw + (c.KW - 1) * c.dw + 1
                ip = _cdiv(iw, vec) * vec
            return th, tw, ih, iw, ip, hp

        bh, bw = _fit([bh, bw], lambda s: (lambda g: g[2] * g[4] * item)(geometry((s[1], s[0]))),
                      dev)
        th, tw, ih, iw, ip, cp = geometry((bw, bh))
        tiles = _cdiv(c.OH, th) * _cdiv(c.OW, tw)
        grid = (tiles, min(c.N * c.CO, MAX_GRID_YZ), 1)
        block = (bw, bh, 1)
        shared = ih * ip * item
    else:
        K, S = dw_forward_spec(c, layout)
        opt = DW_FWD_OPT[layout][K]
        vec = 1
        if c.M == 1 and c.R == 1:
            vec = _out_aligned(pick_vec(dtype, (c.CI, c.CO), (x_addr,)), out, y_addr)
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
            # lane tx reads tile channel (o / M) * R - ci0 with o = tx * vec (o0 = 0)
            ip = nhwc_pixel_pitch(cp, vec, item, ct_, twt_, opt, iw, c.sh, c.sw, c.M, c.R)
            return th_, tw, ih, iw, ip, cp

        th_, twt, ct = _fit([th0, twt, ct], lambda s: (lambda g: g[2] * g[3] * g[4] * item)(
            geometry((s[2], s[0], s[1]))), dev)
        th, tw, ih, iw, ip, cp = geometry((ct, th_, twt))
        tiles = _cdiv(c.OH, th) * _cdiv(c.OW, tw)
        grid = (tiles, _cdiv(c.CO, ct * vec), min(c.N, MAX_GRID_YZ))
        block = (ct, th * twt, 1)
        shared = ih * iw * ip * item
    name = (f"dw_forward<{CTYPE[dtype]}, {CTYPE[out]}, {K}, {S}, {vec}, {opt}, "
            f"{_b(layout == 'NHWC')}>")
    ints = (c.N, c.CI, c.H, c.W, c.CO, c.OH, c.OW, c.KH, c.KW, c.sh, c.sw, c.dh, c.dw, c.pt, c.pl,
            c.M, c.R, c.flip, c.act, th, tw, ih, iw, ip, cp)
    return Launch("depthwise", name, grid, block, shared, ints,
                  {"K": K, "S": S, "vec": vec, "opt": opt, "tile": (th, tw)})


GI_SPECIALIZED_K = (3, 5)             # dw_grad_input S = 2: square kernels with unrolled phase taps


def dw_grad_input_spec(p) -> tuple[int, int]:
    """(K, S) of the strided dw_grad_input: S = 2 for stride 2 x 2 with odd dilations (the taps of
    each phase are the taps of one parity, known at compile time), K = 3 or 5 for those square
    kernels (else 0, runtime loops); otherwise (0, 0), the runtime-stride path."""
    if p.sh == p.sw == 2 and p.dh % 2 == 1 and p.dw % 2 == 1:
        return (p.KH if p.KH == p.KW and p.KH in GI_SPECIALIZED_K else 0), 2
    return 0, 0


@functools.lru_cache(maxsize=4096)
def _gi_nchw_pitch(iw: int, item: int, bw: int) -> int:
    """The row pitch (>= iw) of dw_grad_input's NCHW gy tile: lane l reads column l % bw of row
    l // bw plus a tap offset common to the warp, even or odd (a 16-bit run of a row then starts
    mid-word and spans one word more): the smallest pitch with the fewest wavefronts over both."""
    def ways(ip):
        return sum(smem_ways([((l // bw) * ip + l % bw + shift) * item for l in range(32)], item)
                   for shift in (0, 1))

    return min(range(iw, iw + 65), key=lambda ip: (ways(ip), ip))


def plan_dw_grad_input(p, layout: str, gy_addr: int = 0, gx_addr: int = 0,
                       dev: DeviceLimits = H200) -> Launch:
    """The input gradient: dw_forward (rotated taps) for stride 1, dw_grad_input (polyphase)
    otherwise. With S = 2 a thread owns cells of 2 x 2 gx pixels (one per phase), with S = 0 one
    pixel (NCHW: VEC pixels interleaved along the row, as the generic forward)."""
    if p.sh == 1 and p.sw == 1:
        return plan_dw_forward(conv_of_grad_input(p), p.dtype, layout, gy_addr, gx_addr, dev=dev)
    dtype = p.dtype
    item = ITEMSIZE[dtype]
    K, S = dw_grad_input_spec(p)
    u = 2 if S else 1   # cell side: gx pixels per thread along each axis

    def gy_extent(th, tw):
        ih = (th - 1 + (p.KH - 1) * p.dh) // p.sh + 1
        iw = (tw - 1 + (p.KW - 1) * p.dw) // p.sw + 1
        return ih, iw

    if layout == "NCHW":
        vec = pick_vec(dtype, (p.OW,), (gy_addr,))
        bw = min(32, _np2(_cdiv(_cdiv(p.W, u), vec)))
        bh = max(1, min(THREADS // bw, _np2(_cdiv(p.H, u))))

        def geometry(bw_, bh_):
            th, tw = bh_ * u, bw_ * vec * u
            ih, iw = gy_extent(th, tw)
            iw = _cdiv(iw, vec) * vec   # whole vectors loaded
            return th, tw, ih, iw, _gi_nchw_pitch(iw, item, bw_)

        bh, bw = _fit([bh, bw], lambda s: (lambda g: g[2] * g[4] * item)(geometry(s[1], s[0])),
                      dev)
        th, tw, ih, iw, ip = geometry(bw, bh)
        grid = (_cdiv(p.H, th) * _cdiv(p.W, tw), min(p.N * p.C, MAX_GRID_YZ), 1)
        block = (bw, bh, 1)
        shared = ih * ip * item
        cp = 0
    else:
        vec = pick_vec(dtype, (p.C,), (gy_addr, gx_addr)) if p.M == 1 else 1
        ct = min(32, _np2(_cdiv(p.C, vec)))
        pt_ = THREADS // ct
        th0, twc = _nhwc_tile(pt_, 1, _cdiv(p.H, u), _cdiv(p.W, u))

        def geometry(ct_, thc, twc_):
            th, tw = thc * u, twc_ * u
            ih, iw = gy_extent(th, tw)
            cp = ct_ * vec * p.M
            # thread ty reads tile pixel (ty // twc_) * iw + ty % twc_ (plus a common tap offset),
            # lane tx tile channel tx * vec * M
            ip = nhwc_pixel_pitch(cp, vec, item, ct_, twc_, 1, iw, 1, 1, 1, p.M)
            return th, tw, ih, iw, ip, cp

        thc, twc, ct = _fit([th0, twc, ct], lambda s: (lambda g: g[2] * g[3] * g[4] * item)(
            geometry(s[2], s[0], s[1])), dev)
        th, tw, ih, iw, ip, cp = geometry(ct, thc, twc)
        grid = (_cdiv(p.H, th) * _cdiv(p.W, tw), _cdiv(p.C, ct * vec), min(p.N, MAX_GRID_YZ))
        block = (ct, thc * twc, 1)
        shared = ih * iw * ip * item
    name = f"dw_grad_input<{CTYPE[dtype]}, {K}, {S}, {vec}, {_b(layout == 'NHWC')}>"
    ints = (p.N, p.C, p.H, p.W, p.M, p.OH, p.OW, p.KH, p.KW, p.sh, p.sw, p.dh, p.dw, p.pt, p.pl,
            th, tw, ih, iw, ip, cp)
    return Launch("depthwise", name, grid, block, shared, ints,
                  {"K": K, "S": S, "vec": vec, "tile": (th, tw)})


def _nhwc_tile(pt: int, opt: int, oh: int, ow: int) -> tuple[int, int]:
    """(tile rows, thread columns) for ``pt`` pixel threads of ``opt`` outputs each: as wide as
    the image allows, then narrowed towards a square tile (columns <= 2 x rows) while the image
    has the rows, so the halo re-read from L2 stays small."""
    twt = min(pt, _np2(_cdiv(ow, opt)))
    while twt > 1 and twt * opt > 2 * (pt // twt) and pt // (twt // 2) <= _np2(oh):
        twt //= 2
    return max(1, min(pt // twt, _np2(oh))), twt


def _splits(ntiles: int, other_blocks: int, slots: int) -> tuple[int, int]:
    """(splits, tiles per split) of ``ntiles`` tiles for a grid of splits x ``other_blocks``
    blocks on a device that keeps ``slots`` blocks resident at once (blocks per SM x SMs).

    The time of such a grid is its waves, ceil(splits * other_blocks / slots), times the tiles one
    block walks, ceil(ntiles / splits). The candidates fill k = 1 .. GW_MAX_WAVES waves as far as
    whole splits allow (and the same tiles per block with fewer splits); the cheapest wins, the
    fewest splits on a tie (fewer partial sums to add)."""
    other_blocks, slots = max(1, other_blocks), max(1, slots)
    cands = {1}
    for k in range(1, GW_MAX_WAVES + 1):
        s = min(ntiles, max(1, k * slots // other_blocks))
        cands.update((s, _cdiv(ntiles, _cdiv(ntiles, s))))

    def cost(s):
        return _cdiv(s * other_blocks, slots) * _cdiv(ntiles, s), s

    splits = min(cands, key=cost)
    per = _cdiv(ntiles, splits)
    return _cdiv(ntiles, per), per


def plan_dw_grad_weight(p, layout: str, x_addr: int = 0, gy_addr: int = 0,
                        dev: DeviceLimits = H200, occupancy=None) -> tuple:
    """(stage-1 Launch, stage-2 Launch, partial-buffer element count) for the weight gradient:
    dw_grad_weight_direct for NCHW 1x1 and 3x3 kernels, dw_grad_weight for the other square
    1/3/5/7 kernels (when its tile fits), else dw_grad_weight_taps.

    The stage-1 grid is split over the tiles in whole waves of the device (see :func:`_splits`):
    ``occupancy(file, name, threads, shared)`` gives the blocks of a kernel resident per SM (the
    backend asks the driver, ``cudaOccupancyMaxActiveBlocksPerMultiprocessor``); by default the
    count from threads and shared memory alone (:meth:`DeviceLimits.occupancy`)."""
    if occupancy is None:
        def occupancy(file, name, threads, shared):
            return dev.occupancy(threads, shared)

    def slots(file, name, block, shared):
        return max(1, occupancy(file, name, math.prod(block), shared)) * dev.sms

    stage1 = None
    K = kernel_size_spec(p.KH, p.KW)
    if layout == "NCHW" and K in GW_DIRECT_K:
        stage1 = _plan_gw_direct(p, dev, slots)
    elif K:
        try:
            stage1 = _plan_gw_specialized(p, layout, x_addr, gy_addr, dev, slots)
        except NotImplementedError:
            stage1 = None
    if stage1 is None:
        stage1 = _plan_gw_taps(p, layout, dev, slots)
    count = p.CO * p.KH * p.KW
    stage2 = Launch("depthwise", f"sum_splits<{CTYPE[p.dtype]}>", (_cdiv(count, THREADS), 1, 1),
                    (THREADS, 1, 1), 0, (stage1.grid[0], count))
    return stage1, stage2, stage1.grid[0] * count


def _plan_gw_direct(p, dev: DeviceLimits, slots) -> Launch:
    """dw_grad_weight_direct (NCHW, K = 1, 3): 256 threads per (split, channel), the
    splits over the N*OH*OW output positions in whole blocks' worth (``info['tile']`` is one
    position, ``ints[-1]`` the positions per split)."""
    K = kernel_size_spec(p.KH, p.KW)
    shared = (THREADS // 32) * K * K * ACC_ITEMSIZE[p.dtype]
    chans = min(p.CO, MAX_GRID_YZ)
    name = f"dw_grad_weight_direct<{CTYPE[p.dtype]}, {K}>"
    chunks = _cdiv(p.N * p.OH * p.OW, THREADS)
    splits, per = _splits(chunks, chans, slots("depthwise", name, (THREADS, 1, 1), shared))
    ints = (p.N, p.C, p.H, p.W, p.M, p.OH, p.OW, p.sh, p.sw, p.dh, p.dw, p.pt, p.pl,
            _I64(per * THREADS))
    return Launch("depthwise", name, (splits, chans, 1), (THREADS, 1, 1), shared, ints,
                  {"K": K, "tile": (1, 1), "splits": splits})


def _plan_gw_specialized(p, layout: str, x_addr: int, gy_addr: int, dev: DeviceLimits,
                         slots) -> Launch:
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

        bh, bw = _fit([bh, bw], smem, dev)
        if bh * bw < 32:
            raise NotImplementedError("no whole-warp tile fits in shared memory")
        th, tw, ih, iw, ip = geometry(bw, bh)
        cp = 0
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
            # lane tx reads tile channel o / M - ci0 with o = tx * vec (o0 = 0)
            ip = nhwc_pixel_pitch(cp, vec, item, ct_, twt_, opt, iw, p.sh, p.sw, p.M, 1)
            return th_, tw, ih, iw, ip, cp

        def smem(s):
            g = geometry(s[2], s[0], s[1])
            return max(g[2] * g[3] * g[4] * item, s[0] * s[1] * s[2] * vec * KK * acc)

        th_, twt, ct = _fit([th0, twt, ct], smem, dev)
        th, tw, ih, iw, ip, cp = geometry(ct, th_, twt)
        shared = smem([th_, twt, ct])
        block = (ct, th * twt, 1)
        chans = _cdiv(p.CO, ct * vec)
        other = chans
    ntiles = p.N * _cdiv(p.OH, th) * _cdiv(p.OW, tw)
    name = f"dw_grad_weight<{CTYPE[dtype]}, {K}, {vec}, {opt}, {_b(layout == 'NHWC')}>"
    splits, per = _splits(ntiles, other, slots("depthwise", name, block, shared))
    ints = (p.N, p.C, p.H, p.W, p.M, p.OH, p.OW, p.sh, p.sw, p.dh, p.dw, p.pt, p.pl, th, tw,
            ih, iw, ip, cp, per)
    return Launch("depthwise", name, (splits, chans, 1), block, shared, ints,
                  {"K": K, "vec": vec, "opt": opt, "tile": (th, tw), "splits": splits})


def _plan_gw_taps(p, layout: str, dev: DeviceLimits, slots) -> Launch:
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
            _shrink_to_fit([th0, tw0], smem, dev.smem_optin)
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
    name = f"dw_grad_weight_taps<{CTYPE[p.dtype]}, {TAPS_PER_THREAD}, {_b(layout == 'NHWC')}>"
    splits, per = _splits(ntiles, min(chans, MAX_GRID_YZ) * zt,
                          slots("depthwise", name, (tc, ty, 1), shared))
    ints = (p.N, p.C, p.H, p.W, p.M, p.OH, p.OW, p.KH, p.KW, p.sh, p.sw, p.dh, p.dw, p.pt,
            p.pl, th, tw, ih, iw, per)
    return Launch("depthwise", name, (splits, min(chans, MAX_GRID_YZ), zt), (tc, ty, 1), shared,
                  ints, {"K": 0, "tile": (th, tw), "splits": splits, "tc": tc})


def plan_pointwise(op: str, p, layout: str, x_dtype: str | None = None,
                   dev: DeviceLimits = H200) -> tuple:
    """(gemm Launch, reduce Launch or None, partial element count) for op in forward /
    grad_input / grad_weight. The pointer arguments are bound by the backend in the order of
    pw_gemm (A, B, C, partial, bias, residual); ``info['operands']`` names A, B, C. ``x_dtype``:
    the element type of the forward's input x when it differs from ``p.dtype`` (the float32
    depthwise result of the unfused 16-bit separable forward)."""
    dtype = p.dtype
    if x_dtype is not None and x_dtype != dtype and op != "forward":
        raise ValueError("plan_pointwise: x_dtype applies to the forward only")
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
        want = max(1, min(_cdiv(BLOCKS_PER_SM * dev.sms, tiles), MAX_GRID_YZ))
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
    ta, tb = (CTYPE[x_dtype or dtype] if k == "x" else CTYPE[dtype] for k in operands[:2])
    name = f"pw_gemm<{CTYPE[dtype]}, {ta}, {tb}, {_b(a_kc)}, {_b(b_nc)}, {_b(partial)}>"
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


def plan_separable(p, layout: str, dev: DeviceLimits = H200):
    """The fused sep_forward Launch, or None when the depthwise tile of all C*M channels does not
    fit in SEP_SMEM_MAX or the device's opt-in limit (then the backend runs dw_forward into a
    temporary and pw_gemm)."""
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
    if shared > min(SEP_SMEM_MAX, dev.smem_optin):
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


def _c1_rows_split(rows: int, chunks: int, dev: DeviceLimits) -> tuple[int, int]:
    """NCL: (chunks per block, blocks per row) so that rows * blocks ~ 2 * BLOCKS_PER_SM blocks per
    SM or more,
    each block taking C1_MIN_CHUNKS chunks at least (while one chunk is computed the next one's
    copies are in flight; the first chunk's copies are the only ones nothing overlaps)."""
    want = max(1, min(chunks, _cdiv(BLOCKS_PER_SM * dev.sms * 2, max(1, rows)), MAX_GRID_YZ))
    per = max(min(chunks, C1_MIN_CHUNKS), _cdiv(chunks, want))
    return per, _cdiv(chunks, per)


def _c1_nlc_grid(cv: int, positions: int, n: int, dev: DeviceLimits) -> tuple:
    """NLC: (grid, block, LS) for cv channel vectors and ``positions`` walk positions per image,
    aiming at every thread slot of the device."""
    bx = min(32, _np2(cv))
    by = C1_THREADS // bx
    ls = max(8, _cdiv(cv * positions * n, dev.sms * dev.max_threads_per_sm))
    nseg = _cdiv(positions, ls)
    while _cdiv(nseg, by) > MAX_GRID_YZ:
        ls *= 2
        nseg = _cdiv(positions, ls)
    return (_cdiv(cv, bx), _cdiv(nseg, by), min(n, MAX_GRID_YZ)), (bx, by, 1), ls


def plan_conv1d_forward(p, x_addr: int = 0, y_addr: int = 0, dev: DeviceLimits = H200) -> Launch:
    """c1_forward launch for Conv1dProblem ``p`` (see conv1d.cuh)."""
    K = c1_spec(p.K)
    item = ITEMSIZE[p.dtype]
    if p.layout == "NCL":
        vec = pick_vec(p.dtype, (p.L,), (x_addr,))
        tl = C1_THREADS * vec * C1_OPT
        ip = _cdiv(vec - 1 + (tl - 1) * p.s + p.W + 1, vec) * vec
        shared = 2 * ip * item
        if shared > dev.smem_optin:
            raise NotImplementedError(
                "dwops cupy backend: the input span of this 1-d convolution (stride and dilation) "
                "does not fit in shared memory; use backend='numba'")
        per, splits = _c1_rows_split(p.N * p.C, _cdiv(p.OL, tl), dev)
        grid, block, ls = (p.N * p.C, splits, 1), (C1_THREADS, 1, 1), 0
        info = {"tile": tl, "per": per}
    else:
        vec = pick_vec(p.dtype, (p.C,), (x_addr, y_addr)) if p.M == 1 else 1
        tl = ip = per = shared = 0
        grid, block, ls = _c1_nlc_grid(p.CO // vec, p.OL, p.N, dev)
        info = {"segment": ls}
    name = f"c1_forward<{CTYPE[p.dtype]}, {K}, {vec}, {_b(p.layout == 'NLC')}>"
    ints = (p.N, p.C, p.L, p.M, p.K, p.OL, p.s, p.d, p.pl, ACTIVATION_CODES[p.activation],
            tl, ip, per, ls)
    return Launch("conv1d", name, grid, block, shared, ints, dict(K=K, vec=vec, **info))


def plan_conv1d_backward(p, x_addr: int = 0, gy_addr: int = 0, gx_addr: int = 0,
                         dev: DeviceLimits = H200) -> Launch:
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
        if shared > dev.smem_optin:
            raise NotImplementedError(
                "dwops cupy backend: the spans of this 1-d convolution's backward (stride, "
                "dilation, multiplier) do not fit in shared memory; use backend='numba'")
        qa = (-p.pl // vec) * vec
        chunks = max(_cdiv(p.OL, tl), _cdiv(p.L - qa, tl * p.s))
        per, splits = _c1_rows_split(p.N * p.C, chunks, dev)
        grid, block, ls = (p.N * p.C, splits, 1), (C1_THREADS, 1, 1), 0
        info = {"tile": tl, "per": per, "splits": p.N * splits}
    else:
        vec = 1
        if p.M == 1:
            vec = pick_vec(dtype, (p.C,), (x_addr, gy_addr, gx_addr),
                           c1_vec_limit(p.K, "backward", "NLC"))
        tl = ipx = ipg = per = 0
        positions = max(p.OL, _cdiv(p.pl + p.L, p.s))
        grid, block, ls = _c1_nlc_grid(p.C // vec, positions, p.N, dev)
        shared = block[0] * block[1] * vec * acc
        info = {"segment": ls, "splits": p.N * grid[1]}
    name = f"c1_backward<{CTYPE[dtype]}, {K}, {vec}, {_b(p.layout == 'NLC')}>"
    ints = (p.N, p.C, p.L, p.M, p.K, p.OL, p.s, p.d, p.pl, tl, ipx, ipg, per, ls)
    return Launch("conv1d", name, grid, block, shared, ints, dict(K=K, vec=vec, **info))


def plan_conv1d_update(p) -> Launch:
    """c1_update launch for Conv1dUpdateProblem ``p``: one thread per (n, c)."""
    K = c1_spec(p.K)
    name = f"c1_update<{CTYPE[p.dtype]}, {K}>"
    ints = (p.N, p.C, p.M, p.K, p.T, ACTIVATION_CODES[p.activation])
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
            s2 = [(k, 2) for k in DW_FWD_S2_K] if layout == "NCHW" else []
            for K, S in [(k, 1) for k in SPECIALIZED_K] + s2 + [(0, 0)]:
                vecs = vec_choices(dt)
                if S == 2:   # vectorized rows only: full vectors, and half vectors (OW % VEC != 0)
                    vecs = tuple(v for v in (vecs[0], vecs[0] // 2) if v > 1)
                for v in vecs:
                    for to in dict.fromkeys((dt, mid_dtype(dt))):
                        op = "depthwise" if to == dt else "separable"
                        spec = f"{layout} K={K or 'generic'} S={S} VEC={v}"
                        out.append(("depthwise", op, "forward",
                                    spec if to == dt else f"{spec} unfused, {to} result",
                                    f"dw_forward<{ct}, {CTYPE[to]}, {K}, {S}, {v}, "
                                    f"{DW_FWD_OPT[layout][K]}, {nhwc}>"))
            for K, S in [(k, 2) for k in GI_SPECIALIZED_K] + [(0, 2), (0, 0)]:
                for v in vec_choices(dt):
                    spec = f"K={K or 'generic'} S={S or 'runtime'}"
                    out.append(("depthwise", "depthwise", "grad_input",
                                f"{layout} strided {spec} VEC={v}",
                                f"dw_grad_input<{ct}, {K}, {S}, {v}, {nhwc}>"))
            for K in SPECIALIZED_K:
                if layout == "NCHW" and K in GW_DIRECT_K:
                    out.append(("depthwise", "depthwise", "grad_weight", f"NCHW K={K} direct",
                                f"dw_grad_weight_direct<{ct}, {K}>"))
                    continue
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
                        f"pw_gemm<{ct}, {ct}, {ct}, {_b(akc)}, {_b(bnc)}, {_b(part)}>"))
        if mid_dtype(dt) != dt:   # the unfused separable forward: x operand = the float32 result
            mt = CTYPE[mid_dtype(dt)]
            for layout in ("NCHW", "NHWC"):
                akc, bnc, part = PW_FORMS[("forward", layout)]
                ta, tb = (ct, mt) if layout == "NCHW" else (mt, ct)
                out.append(("pointwise", "separable", "forward",
                            f"{layout} gemm 64x64 unfused, {mid_dtype(dt)} input",
                            f"pw_gemm<{ct}, {ta}, {tb}, {_b(akc)}, {_b(bnc)}, {_b(part)}>"))
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
