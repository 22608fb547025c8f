"""The ``"cpu"`` backend: Numba CPU kernels (``njit(parallel=True, cache=True)``) and BLAS.

``backend="auto"`` runs this for host arrays. Every op and gradient of the Backend interface is
here, for any kernel size up to 31x31, stride, dilation, channel multiplier, asymmetric padding,
bias, the four activations, residual, both layouts and the four dtypes. The depthwise 1-d
kernels (forward, one-pass backward, decode update) are in ``_cpu_conv1d.py``; the backend class
below calls them.

Dtypes. float32 and float64 compute in their own precision (float32 reductions over many terms
are summed per row in float32 and across rows in float64). float16 and bfloat16 are converted to
float32, computed as float32 and rounded once at the end. Each kernel below is ONE generic
function: Numba specializes it per array dtype (float32 / float64); kernel size, stride, dilation
and padding are runtime integers, so a new geometry never triggers a compile. Compiled code is
cached on disk (``cache=True``), so only a process's very first call of a kernel and dtype pays
the load (and a fresh installation's first call pays the compile).

The math (``M`` = channel multiplier, ``o // M`` the input channel of output channel ``o``,
``x`` zero outside ``[0, H) x [0, W)``)::

    depthwise    y[n, o, i, j]  = act(b[o] + sum_{a, b} w[o, a, b] * x[n, o//M, i*sh - pt + a*dh,
                                                                         j*sw - pl + b*dw])
    grad_input   gx[n, c, r, q] = sum_{m, i, j, a, b : i*sh - pt + a*dh == r, j*sw - pl + b*dw == q}
                                      w[c*M + m, a, b] * gy[n, c*M + m, i, j]
    grad_weight  gw[o, a, b]    = sum_{n, i, j} gy[n, o, i, j] * x[n, o//M, i*sh - pt + a*dh,
                                                                    j*sw - pl + b*dw]
    pointwise    y[n, o, h, w]  = act(b[o] + sum_c W[o, c] x[n, c, h, w]) + residual[n, o, h, w]
                 gx = W^T gy (over channels);  gW[o, c] = sum_{n, h, w} gy[n, o, h, w] x[n, c, h, w]
    separable    y = act(pw(dw_act(dw(x) + dw_b)) + b) + residual

How each is computed:

* Depthwise forward, NCHW (:func:`_dw_plane_nchw`): each task copies its input plane (or a band
  of rows) once, zero-padded and split into stride_h x stride_w phase planes, after which every
  tap is ONE flat multiply-add over the whole plane at a fixed offset; the taps run in register
  tiles, accumulators kept in registers across all taps: :func:`_dw_rows` at stride_h 1 (RT
  output rows, with a sliding window of input rows also in registers: one load and one filter
  broadcast per RT FMAs), :func:`_dw_tile` otherwise. NHWC is a *row* kernel
  (:func:`_dw_row_nhwc`): for one tap ``(a, b)`` the outputs of a row that read a valid input
  column form one contiguous range ``[j0, j1)`` (:func:`_span`), so the tap is a multiply-add
  over that range with no bounds test inside (vectorized along C); with M = 1 and stride_w 1 the
  interior pixels run in register tiles (:func:`_dw_tile`) and the border pixels as flat per-tap
  loops.
* Depthwise grad_input at stride 1 is a forward convolution of gy with the filters flipped
  (``w[o, KH-1-a, KW-1-b]``) and the padding mirrored (``pt' = (KH-1)*dh - pt``, the same for
  the left; it may be negative): NCHW sums the M output channels of input channel c as M source
  planes of one task; NHWC (M = 1) runs the forward row kernel. Otherwise NCHW accumulates in
  the padded phase planes of gx (per tap and output row one contiguous multiply-add) and copies
  them out once; NHWC *scatters* each output row into the input rows it came from. The task
  owning an input plane (NCHW: one ``(n, c)`` plane with its ``M`` output channels) or an input
  row (NHWC: taps ``a`` with ``r + pt - a*dh`` divisible by ``sh``) is the only writer, so there
  are no races and no atomics.
* Depthwise grad_weight is a two-stage reduction: per task (NCHW: one ``(n, o)`` plane, read as
  the forward's phase planes so every row is a contiguous dot product; NHWC: a fixed block of
  output rows) a float64 partial sum, then one sum over the partials. The number of tasks does
  not depend on the thread count, so results are reproducible.
* Pointwise products are BLAS GEMMs (the library SciPy links, called from Numba through
  :func:`_gemm`), one per tile of a block of pixels by a block of output channels
  (:func:`pw_tiles`): each prange task makes one single-threaded BLAS call that writes its tile
  straight into the output (NCHW: y[n][o-block, k-block] = W[o-block] x[n][:, k-block], rows
  H*W apart; NHWC: y[p-block, o-block] = x[p-block] W^T[:, o-block]), then adds bias,
  activation and residual while the tile is in cache. Weight gradients are BLAS calls per chunk
  of at most GW_ROWS pixels and block of output channels (``gy x^T`` on transposed operands, no
  copies), the chunks summed in float64. BLAS threads and Numba threads do not stack: the BLAS
  libraries are held at one thread while these kernels run (:class:`_SerialBlas`), so Numba's
  thread count is the only one, and since the tiles and chunks depend on the shapes only,
  results do not depend on the thread count.
* Separable is one fused kernel: per band of output rows, the depthwise rows of every channel
  (with dw bias and dw activation) go into a cache-resident buffer, then one BLAS call writes
  the band of every output channel and the epilogue runs over it; the intermediate never
  reaches main memory.

Activations match :func:`dwops.reference.activate`, including its NaN rules (relu and relu6 are
``np.maximum`` / ``np.minimum``, which propagate NaN).
"""

from __future__ import annotations

import math
import threading

import numpy as np

try:  # the backend reports itself unavailable instead of breaking ``import dwops``
    import numba
    from numba import njit, prange
    from numba import types as _nbtypes
    from numba import uint64 as _u  # unsigned index cast, see "row kernels"
    from numba.core import cgutils
    from numba.extending import intrinsic
    from llvmlite import ir

    from .._jit import install_notice

    install_notice()  # one line on stderr while a kernel compiles (DWOPS_QUIET=1 hides it)

    # Numba's BLAS entry (the one np.dot uses in nopython code): kind ('s', 'd'), transa, transb,
    # m, n, k, *alpha, *a, lda, *b, ldb, *beta, *c, ldc; column-major like Fortran BLAS.
    _xxgemm = _nbtypes.ExternalFunction("numba_xxgemm", _nbtypes.intc(
        _nbtypes.char, _nbtypes.char, _nbtypes.char, _nbtypes.intp, _nbtypes.intp,
        _nbtypes.intp, _nbtypes.voidptr, _nbtypes.voidptr, _nbtypes.intp, _nbtypes.voidptr,
        _nbtypes.intp, _nbtypes.voidptr, _nbtypes.voidptr, _nbtypes.intp))
    _IMPORT_ERROR = None
except ImportError as exc:  # pragma: no cover - exercised only without numba
    numba = None
    _IMPORT_ERROR = str(exc)

    def njit(*args, **kwargs):
        return lambda f: f

    intrinsic = njit()

    prange = _u = range

from .._registry import HostBackend
from .._spec import ACTIVATION_CODES as ACT_CODES

# Vector width of the LLVM intrinsics below (AVX2 registers).
VEC_BYTES = 32
# NHWC depthwise register tile: JT pixels x 2 vectors of channels per _dw_tile call.
JT = 4
# NCHW depthwise, stride_h 1: RT output rows x 1 vector per _dw_rows call.
RT = 6
# NHWC depthwise, M == 1: PT output pixels x 2 vectors of channels per _dw_tile_s call.
PT = 6
# ... and border pixels one at a time (_dw_tile_s1) when the kernel has at most BORDER_TAPS taps.
BORDER_TAPS = 9
# Pointwise GEMM tiles (:func:`pw_tiles`): a block of pixels by a block of output channels. NCHW:
# runs of at most PW_NCHW_PIXELS pixels of one image (the image split evenly); NHWC: blocks of
# PW_NHWC_PIXELS pixels. When that makes fewer than PW_TASKS tiles, the output channels are split
# too (blocks of at least PW_MIN_CHANNELS, a multiple of PW_CHANNEL_STEP) so small batches still
# give every core work; no further, since each channel block packs the pixels' operand again
# (3072->768 @7 NHWC, N=8: 42 ms in 2 blocks of 384 channels, 60 ms in 8 blocks of 96). The tiling
# depends on the shapes only, never on the thread count.
PW_NCHW_PIXELS = 1024
PW_NHWC_PIXELS = 256
PW_TASKS = 4
PW_MIN_CHANNELS = 32
PW_CHANNEL_STEP = 16
# Separable: about SEP_PIXELS output pixels (whole rows) per band, one GEMM per band.
SEP_PIXELS = 512
# Pointwise grad_weight sums at most GW_ROWS pixels per BLAS call (in the compute dtype) before
# accumulating in float64.
# NCHW depthwise: about PLANE_TASKS tasks (each a run of planes reusing one scratch set).
PLANE_TASKS = 64
# NHWC depthwise flat path: about FLAT_ELEMS values (pixels x channels) per vectorized tap loop.
FLAT_ELEMS = 1024
GW_ROWS = 4096
# NHWC depthwise grad_weight: number of row blocks (partial sums), fixed for reproducibility.
GW_TASKS = 64

# Reductions may be reassociated (vectorized sums); "contract" lets LLVM use FMA. No nnan/ninf:
# NaN and Inf must propagate.
_FM_SUM = {"reassoc", "contract"}
_FM = {"contract"}


# ----------------------------------------------------------------------------- shared helpers


@njit(cache=True, inline="always")
def _span(off, s, n_in, n_out):
    """Outputs ``j`` in ``[j0, j1)`` with ``0 <= j*s + off < n_in`` (s >= 1), clipped to n_out."""
    j0 = max(0, -(off // s))
    j1 = min(n_out, (n_in - 1 - off) // s + 1)
    return j0, max(j0, j1)


@njit(cache=True)
def _activate(v, act):
    """Apply activation code ``act`` (ACT_CODES) in place to the 1-d contiguous array ``v``.

    Constants are cast to ``v``'s dtype, so float32 stays float32. As the reference
    (``np.maximum`` / ``np.minimum``), NaN propagates: a comparison with NaN is false, so NaN falls
    through to "keep y". relu = max(y, 0); relu6 = min(max(y, 0), 6); silu = y / (1 + exp(-y));
    gelu = y/2 * (1 + erf(y / sqrt 2)).
    """
    t = v.dtype.type
    zero = t(0.0)
    one = t(1.0)
    if act == 1:
        for k in range(v.shape[0]):
            y = v[k]
            v[k] = zero if y < zero else y
    elif act == 2:
        six = t(6.0)
        for k in range(v.shape[0]):
            y = v[k]
            r = zero if y < zero else y
            v[k] = six if r > six else r
    elif act == 3:
        for k in range(v.shape[0]):
            y = v[k]
            v[k] = y / (one + np.exp(-y))
    elif act == 4:
        half = t(0.5)
        rsqrt2 = t(0.7071067811865476)
        for k in range(v.shape[0]):
            y = v[k]
            v[k] = half * y * (one + math.erf(y * rsqrt2))


# ----------------------------------------------------------------------------- BLAS


def pw_tiles(layout: str, images: int, pixels: int, co: int) -> tuple[int, int]:
    """(pixels, output channels) per pointwise tile for ``images`` images of ``pixels`` pixels."""
    if layout == "NCHW":
        nb = -(-pixels // PW_NCHW_PIXELS)
        pb = -(-pixels // nb)
        tasks = images * nb
    else:
        pb = PW_NHWC_PIXELS
        tasks = -(-(images * pixels) // pb)
    return pb, channel_block(co, tasks)


def channel_block(co: int, tasks: int) -> int:
    """Output channels per tile when the other dimensions give ``tasks`` tiles: all of them, or
    blocks (>= PW_MIN_CHANNELS, a multiple of PW_CHANNEL_STEP) making about PW_TASKS tiles."""
    split = max(1, min(-(-PW_TASKS // max(tasks, 1)), co // PW_MIN_CHANNELS))
    per = -(-co // split)
    return min(co, -(-per // PW_CHANNEL_STEP) * PW_CHANNEL_STEP)


@njit(cache=True)
def _gemm(ta, tb, m, n, k, a, lda, b, ldb, c, ldc, acc):
    """Column-major ``C = op(A) op(B)`` (``C += ...`` if acc; m x n, inner size k) by the BLAS
    SciPy links.

    a, b, c:  arrays (usually views) whose first element is the operand's first element
    lda, ldb, ldc: leading dimensions in elements (column-major)
    ta, tb:   True: the operand is stored transposed (k x m for A, n x k for B)
    The call goes through Numba's ``numba_xxgemm`` (``scipy.linalg.cython_blas``: sgemm for
    float32, dgemm for float64), single-threaded here: it runs inside prange tasks, with the BLAS
    thread count held at 1 by the backend (:class:`_SerialBlas`). A row-major (R, L) array is a
    column-major L x R matrix, so the kernels below pass row-major operands in swapped roles.
    """
    ab = np.empty(2, c.dtype)
    ab[0] = 1.0
    ab[1] = 1.0 if acc else 0.0
    _xxgemm(115 if c.itemsize == 4 else 100, 84 if ta else 78, 84 if tb else 78, m, n, k,
            ab.ctypes, a.ctypes, lda, b.ctypes, ldb, ab[1:].ctypes, c.ctypes, ldc)


@njit(cache=True)
def _gemm_warm():
    """One tiny call per dtype outside any parallel region: Numba resolves the BLAS function
    on its first call under the GIL, which a prange worker must not be the one to do."""
    a = np.ones((1, 1), np.float32)
    c = np.empty((1, 1), np.float32)
    _gemm(False, False, 1, 1, 1, a, 1, a, 1, c, 1, False)
    a64 = np.ones((1, 1), np.float64)
    c64 = np.empty((1, 1), np.float64)
    _gemm(False, False, 1, 1, 1, a64, 1, a64, 1, c64, 1, False)


# ----------------------------------------------------------------------------- vector IR


def _vector_ir(context, builder, dtype):
    """The LLVM pieces every vector intrinsic below starts from, for element type ``dtype``:
    (W lanes of one VEC_BYTES vector, the vector type, intp, the element alignment in bytes,
    llvm.fma on the vector type, c(v): an intp constant, vptr(base, off): base + off as a
    vector pointer)."""
    W = VEC_BYTES // (dtype.bitwidth // 8)
    vty = ir.VectorType(context.get_value_type(dtype), W)
    intp = context.get_value_type(_nbtypes.intp)
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty] * 3),
                                         f"llvm.fma.v{W}f{dtype.bitwidth}")

    def c(v):
        return ir.Constant(intp, v)

    def vptr(base_ptr, off):
        return builder.bitcast(builder.gep(base_ptr, [off]), vty.as_pointer())

    return W, vty, intp, dtype.bitwidth // 8, fma, c, vptr



@intrinsic
def _dw_tile(typingctx, xf, xoffs, T, wf, woffs, xbase, c0, acc, abase, pix):
    """acc[abase + p*pix + l] += sum_t wf[woffs[t] + c0 + l] * xf[xoffs[t] + xbase + p*pix + l]
    for p < JT pixels and l < 2 vectors of channels (NHWC depthwise, interior pixels).

    xf:       flat input;  xoffs: (T,) int64 offset of each valid tap's input pixel run
    T:        number of valid taps;  wf: flat (KH, KW, C) filters;  woffs: (T,) tap offsets in wf
    xbase:    added to every x offset (j*C + c0);  c0: first channel
    acc:      flat destination row;  abase: offset of (pixel j, channel c0);  pix: pixel stride
    The JT x 2 vector accumulators stay in registers across all taps: per tap 2 weight loads,
    2*JT input loads and 2*JT vector FMAs (the flat per-tap loops need 3 loads and a store per
    FMA).
    """
    sig = _nbtypes.void(xf, xoffs, T, wf, woffs, xbase, c0, acc, abase, pix)

    def codegen(context, builder, signature, args):
        xty, oty, _, wty, _, _, _, aty, _, _ = signature.args
        W, vty, intp, al, fma, c, vptr = _vector_ir(context, builder, xty.dtype)
        X = context.make_array(xty)(context, builder, args[0])
        XO = context.make_array(oty)(context, builder, args[1])
        Tn = args[2]
        Wf = context.make_array(wty)(context, builder, args[3])
        WO = context.make_array(oty)(context, builder, args[4])
        xbase, c0, abase, pix = args[5], args[6], args[8], args[9]
        A = context.make_array(aty)(context, builder, args[7])

        offs = [builder.add(builder.mul(c(p), pix), c(h * W)) for p in range(JT) for h in range(2)]
        init = [builder.load(vptr(A.data, builder.add(abase, o)), align=al) for o in offs]
        entry = builder.basic_block
        loop = builder.append_basic_block("dt.loop")
        done = builder.append_basic_block("dt.done")
        builder.cbranch(builder.icmp_signed(">", Tn, c(0)), loop, done)
        builder.position_at_end(loop)
        t = builder.phi(intp)
        t.add_incoming(c(0), entry)
        accs = []
        for v in init:
            ph = builder.phi(vty)
            ph.add_incoming(v, entry)
            accs.append(ph)
        xo = builder.add(builder.load(builder.gep(XO.data, [t])), xbase)
        wo = builder.add(builder.load(builder.gep(WO.data, [t])), c0)
        wv = [builder.load(vptr(Wf.data, builder.add(wo, c(h * W))), align=al) for h in range(2)]
        new = []
        for k, o in enumerate(offs):
            xv = builder.load(vptr(X.data, builder.add(xo, o)), align=al)
            new.append(builder.call(fma, [wv[k % 2], xv, accs[k]]))
        t1 = builder.add(t, c(1))
        t.add_incoming(t1, loop)
        for ph, v in zip(accs, new):
            ph.add_incoming(v, loop)
        builder.cbranch(builder.icmp_signed("<", t1, Tn), loop, done)
        builder.position_at_end(done)
        res = []
        for v0, v1 in zip(init, new):
            ph = builder.phi(vty)
            ph.add_incoming(v0, entry)
            ph.add_incoming(v1, loop)
            res.append(ph)
        for v, o in zip(res, offs):
            builder.store(v, vptr(A.data, builder.add(abase, o)), align=al)
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def _dw_rows(typingctx, xp, coffs, KW, KH, rstep, xb, wf, wb, acc, ab):
    """acc[ab + r*rstep + l] += sum_{b<KW, a<KH} wf[wb + a*KW + b] * xp[coffs[b] + xb +
    (r + a)*rstep + l]  for r < RT output rows and l < one vector (NCHW depthwise, stride_h 1).

    xp:       flat padded phase planes;  coffs: (KW,) int64 offset of each tap column
    KW, KH:   kernel size;  rstep: flat distance between consecutive rows (and taps a)
    xb:       flat offset of the tile's first output row and column in xp
    wf:       flat (.., KH, KW) filters;  wb: offset of this plane's filter
    acc:      flat accumulator;  ab: offset of the tile's first output in acc (pitch rstep)
    The RT vector accumulators stay in registers across all taps, and so does a sliding window
    of RT input rows: for tap row a the rows a .. a+RT-1 are needed, a+1 needs one new row, so
    per tap one input load and one filter broadcast feed RT vector FMAs (vs _dw_tile's one
    input load per FMA).
    """
    sig = _nbtypes.void(xp, coffs, KW, KH, rstep, xb, wf, wb, acc, ab)

    def codegen(context, builder, signature, args):
        # IR: entry -> outer (b, acc phis) -> preload RT-1 window rows -> inner (a, acc and
        # window phis) -> outer latch -> done: store
        xty, oty = signature.args[0], signature.args[1]
        W, vty, intp, al, fma, c, vptr = _vector_ir(context, builder, xty.dtype)
        X = context.make_array(xty)(context, builder, args[0])
        CO = context.make_array(oty)(context, builder, args[1])
        KWv, KHv, rs, xb, wb, ab = args[2], args[3], args[4], args[5], args[7], args[9]
        Wf = context.make_array(signature.args[6])(context, builder, args[6])
        A = context.make_array(signature.args[8])(context, builder, args[8])
        i32 = ir.IntType(32)
        mask = ir.Constant(ir.VectorType(i32, W), [0] * W)
        undef = ir.Constant(vty, ir.Undefined)

        def vload(base_ptr, off):
            return builder.load(vptr(base_ptr, off), align=al)

        init = [vload(A.data, builder.add(ab, builder.mul(c(r), rs))) for r in range(RT)]
        entry = builder.basic_block
        outer = builder.append_basic_block("dr.outer")
        inner = builder.append_basic_block("dr.inner")
        latch = builder.append_basic_block("dr.latch")
        done = builder.append_basic_block("dr.done")
        builder.branch(outer)
        builder.position_at_end(outer)
        b = builder.phi(intp)
        b.add_incoming(c(0), entry)
        oacc = []
        for v in init:
            ph = builder.phi(vty)
            ph.add_incoming(v, entry)
            oacc.append(ph)
        colb = builder.add(builder.load(builder.gep(CO.data, [b])), xb)
        win0 = [vload(X.data, builder.add(colb, builder.mul(c(r), rs))) for r in range(RT - 1)]
        outer_end = builder.basic_block
        builder.branch(inner)
        builder.position_at_end(inner)
        a = builder.phi(intp)
        a.add_incoming(c(0), outer_end)
        iacc = []
        for v in oacc:
            ph = builder.phi(vty)
            ph.add_incoming(v, outer_end)
            iacc.append(ph)
        iwin = []
        for v in win0:
            ph = builder.phi(vty)
            ph.add_incoming(v, outer_end)
            iwin.append(ph)
        xnew = vload(X.data, builder.add(colb, builder.mul(builder.add(a, c(RT - 1)), rs)))
        window = iwin + [xnew]
        wsc = builder.load(builder.gep(Wf.data, [builder.add(builder.add(wb, builder.mul(a, KWv)),
                                                             b)]))
        wvec = builder.shuffle_vector(builder.insert_element(undef, wsc, ir.Constant(i32, 0)),
                                      undef, mask)
        nacc = [builder.call(fma, [wvec, window[r], iacc[r]]) for r in range(RT)]
        a1 = builder.add(a, c(1))
        a.add_incoming(a1, inner)
        for ph, v in zip(iacc, nacc):
            ph.add_incoming(v, inner)
        for ph, v in zip(iwin, window[1:]):
            ph.add_incoming(v, inner)
        builder.cbranch(builder.icmp_signed("<", a1, KHv), inner, latch)
        builder.position_at_end(latch)
        b1 = builder.add(b, c(1))
        b.add_incoming(b1, latch)
        for ph, v in zip(oacc, nacc):
            ph.add_incoming(v, latch)
        builder.cbranch(builder.icmp_signed("<", b1, KWv), outer, done)
        builder.position_at_end(done)
        for r in range(RT):
            p = builder.bitcast(builder.gep(A.data, [builder.add(ab, builder.mul(c(r), rs))]),
                                vty.as_pointer())
            builder.store(nacc[r], p, align=al)
        return context.get_dummy_value()
    return sig, codegen


def _make_dw_tile_s(P):
    """The NHWC tile intrinsic for P pixels (the codegen unrolls over P)."""

    def _dw_tile_s(typingctx, xf, xoffs, T, wf, woffs, xbase, c0, xpix, bz, acc, abase, apix):
        """acc[abase + p*apix + l] = bz[c0 + l] + sum_t wf[woffs[t] + c0 + l]
        * xf[xoffs[t] + xbase + p*xpix + l]  for p < P pixels and l < 2 vectors of channels
        (NHWC depthwise, M == 1, any stride and dilation).

        xf:       flat input;  xoffs: (T,) int64 offset of each valid tap's input pixel
        T:        number of valid taps (>= 1);  wf: flat (KH, KW, C) filters;  woffs: (T,) offsets
        xbase:    added to every x offset (j*sw*C + c0);  c0: first channel;  xpix: sw*C
        bz:       (C,) bias (zeros when there is none)
        acc:      flat destination row;  abase: offset of (pixel j, channel c0);  apix: pixel stride
        2*P vector accumulators in registers across all taps (P = PT: 12 independent FMA
        chains, enough to hide the FMA latency; _dw_tile's 8 are not; P = 1 for single border
        pixels), the input operands straight from memory.
        Stores bias + sum without reading acc, so overlapping tiles are harmless.
        """
        sig = _nbtypes.void(xf, xoffs, T, wf, woffs, xbase, c0, xpix, bz, acc, abase, apix)

        def codegen(context, builder, signature, args):
            xty, oty = signature.args[0], signature.args[1]
            W, vty, intp, al, fma, c, vptr = _vector_ir(context, builder, xty.dtype)
            X = context.make_array(xty)(context, builder, args[0])
            XO = context.make_array(oty)(context, builder, args[1])
            Tn = args[2]
            Wf = context.make_array(signature.args[3])(context, builder, args[3])
            WO = context.make_array(oty)(context, builder, args[4])
            xbase, c0, xpix, abase, apix = args[5], args[6], args[7], args[10], args[11]
            B = context.make_array(signature.args[8])(context, builder, args[8])
            A = context.make_array(signature.args[9])(context, builder, args[9])

            pv = [(p, h) for p in range(P) for h in range(2)]
            xo_ = [builder.add(builder.mul(c(p), xpix), c(h * W)) for p, h in pv]
            ao_ = [builder.add(builder.mul(c(p), apix), c(h * W)) for p, h in pv]
            bias = [builder.load(vptr(B.data, builder.add(c0, c(h * W))), align=al)
                    for h in range(2)]
            entry = builder.basic_block
            loop = builder.append_basic_block("ds.loop")
            done = builder.append_basic_block("ds.done")
            builder.branch(loop)
            builder.position_at_end(loop)
            t = builder.phi(intp)
            t.add_incoming(c(0), entry)
            accs = []
            for k in range(2 * P):
                ph = builder.phi(vty)
                ph.add_incoming(bias[k % 2], entry)
                accs.append(ph)
            xo = builder.add(builder.load(builder.gep(XO.data, [t])), xbase)
            wo = builder.add(builder.load(builder.gep(WO.data, [t])), c0)
            wv = [builder.load(vptr(Wf.data, builder.add(wo, c(h * W))), align=al)
                  for h in range(2)]
            new = []
            for k, o in enumerate(xo_):
                xv = builder.load(vptr(X.data, builder.add(xo, o)), align=al)
                new.append(builder.call(fma, [wv[k % 2], xv, accs[k]]))
            t1 = builder.add(t, c(1))
            t.add_incoming(t1, loop)
            for ph, v in zip(accs, new):
                ph.add_incoming(v, loop)
            builder.cbranch(builder.icmp_signed("<", t1, Tn), loop, done)
            builder.position_at_end(done)
            for v, o in zip(new, ao_):
                builder.store(v, vptr(A.data, builder.add(abase, o)), align=al)
            return context.get_dummy_value()
        return sig, codegen

    return intrinsic(_dw_tile_s)


_dw_tile_s = _make_dw_tile_s(PT)
_dw_tile_s1 = _make_dw_tile_s(1)

# ----------------------------------------------------------------------------- row kernels
# Inner loops index with ``_u(...)`` (an unsigned cast): Numba wraps negative signed indices, and
# that select on a computed index stops LLVM from vectorizing; the spans guarantee the index is
# valid. Leading indices are loop-invariant, so their wrap test is hoisted.


@njit(cache=True)
def _nhwc_taps(xoffs, woffs, n, i, j, H, W, C, CO, KH, KW, sh, sw, dh, dw, pt, pl, check_cols):
    """Fill xoffs[:T] / woffs[:T] with the flat x offset ((n, r, col) * C) and the flat filter
    offset ((a, b) * CO) of each tap of output (row i, column j) whose input row is inside the
    image (and, with check_cols, whose column is too); returns T. With j = 0 and no column
    check the x offsets are relative to the tile's first pixel (add j*sw*C for pixel j)."""
    T = 0
    for a in range(KH):
        r = i * sh - pt + a * dh
        if r < 0 or r >= H:
            continue
        for bb in range(KW):
            col = j * sw - pl + bb * dw
            if check_cols and (col < 0 or col >= W):
                continue
            xoffs[T] = ((n * H + r) * W + col) * C
            woffs[T] = (a * KW + bb) * CO
            T += 1
    return T


@njit(cache=True, fastmath=_FM)
def _dw_row_nhwc(x, wt, wrep, b, n, i, dst, d, M, sh, sw, dh, dw, pt, pl, has_bias, act):
    """dst[d, j, o] = act(b[o] + sum_{a,b} wt[a,b,o] x[n, i*sh-pt+a*dh, j*sw-pl+b*dw, o//M]), NHWC.

    x:        (N, H, W, C) input
    wt:       (KH, KW, C*M) filters, channel last
    wrep:     (KH, KW, JB*C) each tap's filters repeated for JB pixels, or a (1, 1, 1) stand-in
              when the flat path does not apply (M > 1 or sw > 1)
    b:        (C*M,) bias (read only if has_bias)
    n, i:     image, output row
    dst, d:   (rows, OW, C*M) destination and its row
    M, sh, sw, dh, dw, pt, pl, act: as in _dw_forward_nchw
    With M == 1 and C a multiple of two vectors: interior pixels (all taps inside the input) in
    register tiles of PT pixels (_dw_tile_s, any stride and dilation; on rows with fewer than PT
    interior pixels, _dw_tile when the flat path applies), and for kernels of at most
    BORDER_TAPS taps the border pixels as 1-pixel tiles (_dw_tile_s1). Remaining pixels: per tap,
    a flat multiply-add over JB pixels x C channels (a tap's valid columns are one contiguous
    run of pixels in both x and dst) on the flat path, else one multiply-add along C per valid
    output column.
    """
    H, W, C = x.shape[1], x.shape[2], x.shape[3]
    KH, KW, CO = wt.shape
    OW = dst.shape[1]
    JB = wrep.shape[2] // CO
    flat = wrep.shape[0] == KH and wrep.shape[1] == KW and JB > 0
    zero = x.dtype.type(0.0)
    dflat = dst[d].reshape(OW * CO)
    xf = x.reshape(x.size)
    wf = wt.reshape(KH * KW * CO)
    # interior pixels [jt0, jt1) (every tap column inside the input): M == 1 and C a multiple
    # of two vectors: _dw_tile_s tiles of PT pixels (any stride, dilation), storing bias + sum
    jt0 = jt1 = 0
    NRc = 2 * (VEC_BYTES // x.itemsize)
    win = False
    if M == 1 and C % NRc == 0:
        jw0 = min(max(0, (pl + sw - 1) // sw), OW)
        jw1 = min(OW, (W - 1 - (KW - 1) * dw + pl) // sw + 1)
        if jw1 - jw0 >= PT:
            xoffs = np.empty(KH * KW, np.int64)
            woffs = np.empty(KH * KW, np.int64)
            T = _nhwc_taps(xoffs, woffs, n, i, 0, H, W, C, CO, KH, KW, sh, sw, dh, dw, pt, pl,
                           False)
            if T > 0:
                win = True
                jt0, jt1 = jw0, jw1
                bz = np.empty(CO, x.dtype)
                for o in range(CO):
                    bz[o] = b[o] if has_bias else zero
                last = jt1 - PT
                for j in range(jt0, jt1, PT):
                    jj = min(j, last)
                    for c0 in range(0, C, NRc):
                        _dw_tile_s(xf, xoffs, T, wf, woffs, jj * sw * C + c0, c0, sw * C, bz,
                                   dflat, jj * CO + c0, CO)
                # few taps: the border pixels one at a time, each with its own list of valid
                # taps (with many taps the 2 FMA chains of a 1-pixel tile are latency-bound and
                # the per-tap loops below are faster)
                for j in range(OW if KH * KW <= BORDER_TAPS else 0):
                    if j >= jt0 and j < jt1:
                        continue
                    T = _nhwc_taps(xoffs, woffs, n, i, j, H, W, C, CO, KH, KW, sh, sw, dh, dw,
                                   pt, pl, True)
                    if T == 0:
                        for o in range(CO):
                            dflat[j * CO + o] = bz[o]
                        continue
                    for c0 in range(0, C, NRc):
                        _dw_tile_s1(xf, xoffs, T, wf, woffs, c0, c0, 0, bz, dflat, j * CO + c0, CO)
    if win and KH * KW <= BORDER_TAPS:
        _activate(dflat, act)
        return
    for j in range(OW):
        if j >= jt0 and j < jt1:
            continue
        for o in range(CO):
            dst[d, j, o] = b[o] if has_bias else zero
    # flat path, interior: pixels [jt0, jt1) where every tap column is inside the input, in
    # register tiles of JT pixels x 2 channel vectors (needs C a multiple of that width)
    if flat and not win and C % NRc == 0:
        jt0 = min(max(0, pl), OW)
        jt1 = jt0 + max(0, min(OW, W + pl - (KW - 1) * dw) - jt0) // JT * JT
    if jt1 > jt0 and not win:
        xoffs = np.empty(KH * KW, np.int64)
        woffs = np.empty(KH * KW, np.int64)
        T = _nhwc_taps(xoffs, woffs, n, i, 0, H, W, C, CO, KH, KW, sh, sw, dh, dw, pt, pl, False)
        for j in range(jt0, jt1, JT):
            for c0 in range(0, C, NRc):
                _dw_tile(xf, xoffs, T, wf, woffs, j * C + c0, c0, dflat, j * CO + c0, C)
    for a in range(KH):
        r = i * sh - pt + a * dh
        if r < 0 or r >= H:
            continue
        xflat = x[n, r].reshape(W * C)
        for bb in range(KW):
            off = bb * dw - pl
            j0, j1 = _span(off, sw, W, OW)
            if flat:
                # the pixels left of and right of the register-tiled interior
                for lo, hi in ((j0, min(j1, jt0)), (max(j0, jt1), j1)):
                    for jb in range(lo, hi, JB):
                        L = (min(hi, jb + JB) - jb) * CO
                        f0 = jb * CO
                        x0 = (jb + off) * C
                        for f in range(L):
                            dflat[_u(f0 + f)] += wrep[a, bb, f] * xflat[_u(x0 + f)]
                continue
            for j in range(j0, j1):
                if j >= jt0 and j < jt1:
                    continue
                col = j * sw + off
                if M == 1:
                    for o in range(CO):
                        dst[d, j, o] += wt[a, bb, o] * x[n, r, col, o]
                else:
                    for c in range(C):
                        xv = x[n, r, col, c]
                        for m in range(M):
                            dst[d, j, c * M + m] += wt[a, bb, c * M + m] * xv
    _activate(dflat, act)


# ----------------------------------------------------------------------------- depthwise forward


@njit(cache=True, fastmath=_FM)
def _phase_copy(x, n, c, S, i0, sh, sw, pt, pl, Hq, Wq, xp):
    """Copy channels c .. c+S-1 of image n, zero-padded, into sh*sw phase planes of (Hq, Wq)
    each: xp[((s*sh + u)*sw + v)*Hq*Wq + ii*Wq + jj] = x[n, c+s, (i0+ii)*sh + u - pt,
    jj*sw + v - pl] (zero outside the input).

    x:        (N, CX, H, W) source;  i0: first output row of the band
    sh, sw:   stride;  pt, pl: top/left padding (may be negative);  xp: flat destination
    """
    H, W = x.shape[2], x.shape[3]
    PQ = Hq * Wq
    zero = x.dtype.type(0.0)
    for s in range(S):
        for u in range(sh):
            for v in range(sw):
                off = v - pl  # input column of phase column jj: jj*sw + off
                j0, j1 = _span(off, sw, W, Wq)
                for ii in range(Hq):
                    r = (i0 + ii) * sh + u - pt
                    base = ((s * sh + u) * sw + v) * PQ + ii * Wq
                    if r < 0 or r >= H:
                        for jj in range(Wq):
                            xp[base + jj] = zero
                        continue
                    for jj in range(j0):
                        xp[base + jj] = zero
                    q0 = j0 * sw + off
                    if sw == 1:
                        for k in range(j1 - j0):
                            xp[_u(base + j0 + k)] = x[n, c + s, r, _u(q0 + k)]
                    else:
                        for k in range(j1 - j0):
                            xp[_u(base + j0 + k)] = x[n, c + s, r, _u(q0 + k * sw)]
                    for jj in range(j1, Wq):
                        xp[base + jj] = zero


@njit(cache=True, fastmath=_FM)
def _dw_plane_nchw(x, w, b, n, c, o, S, i0, dst, sh, sw, dh, dw, pt, pl, has_bias, act, xp,
                   acc, xoffs, woffs, wrep):
    """dst[i, j] = act(b[o] + sum_{s<S, a, b} w[o+s, a, b] x[n, c+s, (i0+i)*sh - pt + a*dh,
    j*sw - pl + b*dw]) for the output rows i0 .. i0+OH-1 of one plane, NCHW (x zero outside).

    x:        (N, CX, H, W) source;  its channels c .. c+S-1 are read
    w:        (CW, KH, KW) filters;  rows o .. o+S-1 are used (filter o+s with channel c+s)
    b:        bias, b[o] is read only if has_bias
    n:        image;  i0: first output row
    dst:      (OH, OW) destination (a plane, or a band of one)
    sh, sw:   stride;  dh, dw: dilation;  pt, pl: top/left padding (may be negative)
    act:      activation code (ACT_CODES)
    xp, acc, xoffs, woffs, wrep: scratch from _plane_scratch (reused across a task's planes)
    Forward: S = 1, c = o // M. grad_input (stride 1): x = gy, S = M, flipped filters.
    Each source plane is copied once, zero-padded, into sh*sw phase planes of (Hq, Wq),
    Hq = OH + (KH-1)*dh // sh, Wq = OW + (KW-1)*dw // sw: phase (u, v) element (ii, jj) is the
    padded element ((i0+ii)*sh + u, jj*sw + v). Tap (a, b) of output (i, j) then reads phase
    (a*dh % sh, b*dw % sw) at (i + a*dh // sh, j + b*dw // sw): with the outputs laid out at
    pitch Wq, every tap is ONE flat multiply-add over L = (OH-1)*Wq + OW elements at a fixed
    offset (columns j >= OW are scratch, never stored). With stride_h 1 the taps run in
    _dw_rows (RT rows x 1 vector of accumulators and a sliding window of input rows in
    registers); otherwise all S*KH*KW taps run in register tiles of JT x 2 vectors (_dw_tile,
    its "pixels" being consecutive vectors, each filter value repeated across a vector). The
    accumulator is rounded up to whole tiles (scratch again, see _plane_dims).
    """
    KH, KW = w.shape[1], w.shape[2]
    OH, OW = dst.shape
    Hq, Wq, Lc, slack = _plane_dims(x, KH, KW, OH, OW, sh, sw, dh, dw)
    PQ = Hq * Wq
    zero = x.dtype.type(0.0)
    NRc = 2 * (VEC_BYTES // x.itemsize)
    L = (OH - 1) * Wq + OW
    for f in range(S * sh * sw * PQ, S * sh * sw * PQ + slack):
        xp[f] = zero
    _phase_copy(x, n, c, S, i0, sh, sw, pt, pl, Hq, Wq, xp)
    bias = b[o] if has_bias else zero
    for f in range(Lc):
        acc[f] = bias
    if sh == 1:
        # RT rows (spaced dh apart) x 1 vector per _dw_rows call; rows >= OH are scratch
        V = VEC_BYTES // x.itemsize
        wf = w.reshape(w.size)
        for s in range(S):
            for bb in range(KW):
                xoffs[bb] = (s * sw + (bb * dw) % sw) * PQ + (bb * dw) // sw
            for g in range(0, Lc // Wq, RT * dh):
                for rr in range(dh):
                    i = g + rr
                    for j0 in range(0, OW, V):
                        _dw_rows(xp, xoffs, KW, KH, dh * Wq, i * Wq + j0, wf, (o + s) * KH * KW,
                                 acc, i * Wq + j0)
    else:
        T = S * KH * KW
        t = 0
        for s in range(S):
            for a in range(KH):
                for bb in range(KW):
                    u, ro = (a * dh) % sh, (a * dh) // sh
                    v, co = (bb * dw) % sw, (bb * dw) // sw
                    xoffs[t] = ((s * sh + u) * sw + v) * PQ + ro * Wq + co
                    woffs[t] = t * NRc
                    wv = w[o + s, a, bb]
                    for l in range(NRc):
                        wrep[t * NRc + l] = wv
                    t += 1
        for f in range(0, Lc, JT * NRc):
            _dw_tile(xp, xoffs, T, wrep, woffs, f, 0, acc, f, NRc)
    if act != 0:
        _activate(acc[:L], act)
    for i in range(OH):
        for j in range(OW):
            dst[i, _u(j)] = acc[_u(i * Wq + j)]


@njit(cache=True)
def _plane_dims(x, KH, KW, OH, OW, sh, sw, dh, dw):
    """(Hq, Wq, Lc, slack) of _dw_plane_nchw: phase-plane shape, accumulator length (pitch Wq)
    and zeroed elements after the planes for reads past the last plane's end.

    sh == 1 (_dw_rows): whole vectors per row (Wq >= OW rounded up to a vector) and whole groups
    of RT*dh rows (Lc = OHc*Wq, OHc = OH rounded up); otherwise (_dw_tile) the flat length
    (OH-1)*Wq + OW rounded up to whole JT x 2-vector tiles.
    """
    V = VEC_BYTES // x.itemsize
    Wq = OW + (KW - 1) * dw // sw
    if sh == 1:
        Wq = max(Wq, (OW + V - 1) // V * V)
        OHc = (OH + RT * dh - 1) // (RT * dh) * (RT * dh)
        return OHc + (KH - 1) * dh, Wq, OHc * Wq, (KW - 1) * dw // sw + V
    Hq = OH + (KH - 1) * dh // sh
    BLK = JT * 2 * V
    L = (OH - 1) * Wq + OW
    Lc = (L + BLK - 1) // BLK * BLK
    return Hq, Wq, Lc, Lc - L


@njit(cache=True)
def _plane_scratch(x, KH, KW, OH, OW, S, sh, sw, dh, dw):
    """Scratch for _dw_plane_nchw on (OH, OW) outputs: (xp, acc, xoffs, woffs, wrep)."""
    NRc = 2 * (VEC_BYTES // x.itemsize)
    Hq, Wq, Lc, slack = _plane_dims(x, KH, KW, OH, OW, sh, sw, dh, dw)
    T = S * KH * KW
    return (np.empty(S * sh * sw * Hq * Wq + slack, x.dtype), np.empty(Lc, x.dtype),
            np.empty(T, np.int64), np.empty(T, np.int64), np.empty(T * NRc, x.dtype))


@njit(parallel=True, cache=True, fastmath=_FM)
def _dw_forward_nchw(x, w, b, out, M, S, sh, sw, dh, dw, pt, pl, has_bias, act):
    """Depthwise forward, NCHW; one task per (n, p) output plane (_dw_plane_nchw).

    x:        (N, CX, H, W) input
    w:        (CW, KH, KW) filters
    b:        bias (read only if has_bias)
    out:      (N, P, OH, OW) result
    M:        channel multiplier;  S: source planes summed per output plane
    sh, sw, dh, dw, pt, pl, act: as in _dw_plane_nchw
    Output plane p reads channels (p // M)*S .. +S-1 with filters p*S .. p*S+S-1: the forward is
    S = 1; grad_input at stride 1 is M = 1, S = multiplier, x = gy, flipped filters.
    """
    N, P, OH, OW = out.shape
    KH, KW = w.shape[1], w.shape[2]
    NP = N * P
    per = max(1, NP // PLANE_TASKS)
    for t in prange((NP + per - 1) // per):
        xp, acc, xoffs, woffs, wrep = _plane_scratch(x, KH, KW, OH, OW, S, sh, sw, dh, dw)
        for q in range(t * per, min(NP, (t + 1) * per)):
            n = q // P
            p = q - n * P
            _dw_plane_nchw(x, w, b, n, (p // M) * S, p * S, S, 0, out[n, p], sh, sw, dh, dw, pt,
                           pl, has_bias, act, xp, acc, xoffs, woffs, wrep)


@njit(parallel=True, cache=True, fastmath=_FM)
def _dw_forward_nhwc(x, wt, wrep, b, out, M, sh, sw, dh, dw, pt, pl, has_bias, act):
    """Depthwise forward, NHWC; one task per (n, output row).

    x:        (N, H, W, C) input
    wt:       (KH, KW, C*M) filters, channel last;  wrep: as in _dw_row_nhwc
    b:        (C*M,) bias (read only if has_bias)
    out:      (N*OH, OW, C*M) result, the (N, OH, OW, C*M) output viewed as rows
    M, sh, sw, dh, dw, pt, pl, act: as in _dw_forward_nchw
    """
    N = x.shape[0]
    OH = out.shape[0] // N
    for t in prange(N * OH):
        n = t // OH
        _dw_row_nhwc(x, wt, wrep, b, n, t - n * OH, out, t, M, sh, sw, dh, dw, pt, pl, has_bias,
                     act)


# ----------------------------------------------------------------------------- depthwise grad_input


@njit(parallel=True, cache=True, fastmath=_FM)
def _dw_grad_input_nchw(gy, w, gx, M, sh, sw, dh, dw, pt, pl):
    """Depthwise grad_input, NCHW (used for stride > 1): accumulate in padded phase planes.

    gy:       (N, C*M, OH, OW) output gradient
    w:        (C*M, KH, KW) filters
    gx:       (N, C, H, W) input gradient, fully written
    M, sh, sw, dh, dw, pt, pl: as in _dw_forward_nchw
    One task per run of (n, c) input planes (each owns all M output channels reading it): no
    races. In the forward's phase-plane coordinates (_dw_plane_nchw) tap (a, b) of output
    (i, j) is element (i + a*dh // sh, j + b*dw // sw) of phase (a*dh % sh, b*dw % sw), so
    gx's zero-padded phase planes G receive, per tap and output row, ONE contiguous
    multiply-add of OW values (vectorized; the old scatter stored with stride sw). Then
    gx[r, q] = G[phase of (r + pt, q + pl)] (zero where no tap reaches), one pass.
    """
    N, CO, OH, OW = gy.shape
    KH, KW = w.shape[1], w.shape[2]
    C, H, W = gx.shape[1], gx.shape[2], gx.shape[3]
    Wq = OW + (KW - 1) * dw // sw
    Hq = OH + (KH - 1) * dh // sh
    PQ = Hq * Wq
    zero = gy.dtype.type(0.0)
    NP = N * C
    per = max(1, NP // PLANE_TASKS)
    for t in prange((NP + per - 1) // per):
        G = np.empty(sh * sw * PQ, gy.dtype)
        for q in range(t * per, min(NP, (t + 1) * per)):
            n = q // C
            c = q - n * C
            for f in range(sh * sw * PQ):
                G[f] = zero
            for m in range(M):
                o = c * M + m
                for a in range(KH):
                    for bb in range(KW):
                        base = (((a * dh) % sh) * sw + (bb * dw) % sw) * PQ
                        base += (a * dh) // sh * Wq + (bb * dw) // sw
                        wv = w[o, a, bb]
                        for i in range(OH):
                            ri = base + i * Wq
                            for k in range(OW):
                                G[_u(ri + k)] += wv * gy[n, o, i, _u(k)]
            for r in range(H):
                for k in range(W):
                    gx[n, c, r, k] = zero
                R = r + pt
                if R < 0 or R // sh >= Hq:
                    continue
                rb = (R % sh) * sw * PQ + (R // sh) * Wq
                for v in range(sw):
                    off = v - pl  # gx column of phase column jj: jj*sw + off
                    j0, j1 = _span(off, sw, W, Wq)
                    gb = rb + v * PQ
                    q0 = j0 * sw + off
                    for k in range(j1 - j0):
                        gx[n, c, r, _u(q0 + k * sw)] = G[_u(gb + j0 + k)]


@njit(parallel=True, cache=True, fastmath=_FM)
def _dw_grad_input_nhwc(gy, wt, gx, M, sh, sw, dh, dw, pt, pl):
    """Depthwise grad_input, NHWC: each task owns one input row and gathers the taps that hit it.

    gy:       (N, OH, OW, C*M) output gradient
    wt:       (KH, KW, C*M) filters, channel last
    gx:       (N, H, W, C) input gradient, fully written
    M, sh, sw, dh, dw, pt, pl: as in _dw_forward_nchw
    Input row r receives tap row a from output row i = (r + pt - a*dh) / sh when that is an
    integer in [0, OH); within the row the columns are scattered (vectorized along C).
    """
    N, OH, OW, CO = gy.shape
    KH, KW = wt.shape[0], wt.shape[1]
    H, W, C = gx.shape[1], gx.shape[2], gx.shape[3]
    zero = gy.dtype.type(0.0)
    for t in prange(N * H):
        n = t // H
        r = t - n * H
        for q in range(W):
            for c in range(C):
                gx[n, r, q, c] = zero
        for a in range(KH):
            num = r + pt - a * dh
            if num < 0 or num % sh != 0:
                continue
            i = num // sh
            if i >= OH:
                continue
            for bb in range(KW):
                off = bb * dw - pl
                j0, j1 = _span(off, sw, W, OW)
                for j in range(j0, j1):
                    q = j * sw + off
                    if M == 1:
                        for c in range(C):
                            gx[n, r, q, c] += wt[a, bb, c] * gy[n, i, j, c]
                    else:
                        for c in range(C):
                            s = zero
                            for m in range(M):
                                s += wt[a, bb, c * M + m] * gy[n, i, j, c * M + m]
                            gx[n, r, q, c] += s


# ------------------------------------------------------------------------- depthwise grad_weight


@njit(parallel=True, cache=True, fastmath=_FM_SUM)
def _dw_grad_weight_nchw(x, gy, part, M, sh, sw, dh, dw, pt, pl):
    """Depthwise grad_weight, NCHW, stage 1: one float64 partial per (n, o) plane.

    x:        (N, C, H, W) input
    gy:       (N, C*M, OH, OW) output gradient
    part:     (N, C*M, KH, KW) float64 partial sums, fully written (stage 2: sum over n)
    M, sh, sw, dh, dw, pt, pl: as in _dw_forward_nchw
    The input plane is copied once into zero-padded phase planes (_phase_copy, as the forward),
    so for every tap output row i reads one contiguous run of OW values (no strided gather):
    part[n, o, a, b] = sum_i dot(gy[n, o, i, :], xp[tap offset + i*Wq : ... + OW]). Each row's
    dot product is summed in the input dtype (vectorized), rows in float64. Tasks are runs of
    planes sharing one scratch buffer.
    """
    N, CO, OH, OW = gy.shape
    KH, KW = part.shape[2], part.shape[3]
    Wq = OW + (KW - 1) * dw // sw
    Hq = OH + (KH - 1) * dh // sh
    PQ = Hq * Wq
    zero = x.dtype.type(0.0)
    NP = N * CO
    per = max(1, NP // PLANE_TASKS)
    for t in prange((NP + per - 1) // per):
        xp = np.empty(sh * sw * PQ, x.dtype)
        for q in range(t * per, min(NP, (t + 1) * per)):
            n = q // CO
            o = q - n * CO
            _phase_copy(x, n, o // M, 1, 0, sh, sw, pt, pl, Hq, Wq, xp)
            for a in range(KH):
                for bb in range(KW):
                    base = (((a * dh) % sh) * sw + (bb * dw) % sw) * PQ
                    base += (a * dh) // sh * Wq + (bb * dw) // sw
                    total = 0.0
                    for i in range(OH):
                        s = zero
                        ri = base + i * Wq
                        for k in range(OW):
                            s += gy[n, o, i, _u(k)] * xp[_u(ri + k)]
                        total += s
                    part[n, o, a, bb] = total


@njit(parallel=True, cache=True, fastmath=_FM)
def _dw_grad_weight_nhwc(x, gy, part, M, sh, sw, dh, dw, pt, pl):
    """Depthwise grad_weight, NHWC, stage 1: one float64 partial per block of output rows.

    x:        (N, H, W, C) input
    gy:       (N, OH, OW, C*M) output gradient
    part:     (T, KH, KW, C*M) float64 partial sums, fully written; task t sums the output rows
              (n, i) with flat index n*OH + i in [t*B, (t+1)*B), B = ceil(N*OH / T)
    M, sh, sw, dh, dw, pt, pl: as in _dw_forward_nchw
    Per (row, tap) the sum over the row's columns is vectorized along C in the input dtype, and
    added into the float64 partial.
    """
    H, W, C = x.shape[1], x.shape[2], x.shape[3]
    N, OH, OW, CO = gy.shape
    T, KH, KW = part.shape[0], part.shape[1], part.shape[2]
    rows = N * OH
    per = (rows + T - 1) // T
    zero = x.dtype.type(0.0)
    for t in prange(T):
        for a in range(KH):
            for bb in range(KW):
                for o in range(CO):
                    part[t, a, bb, o] = 0.0
        acc = np.empty(CO, x.dtype)
        for flat in range(t * per, min(rows, (t + 1) * per)):
            n = flat // OH
            i = flat - n * OH
            for a in range(KH):
                r = i * sh - pt + a * dh
                if r < 0 or r >= H:
                    continue
                for bb in range(KW):
                    off = bb * dw - pl
                    j0, j1 = _span(off, sw, W, OW)
                    for o in range(CO):
                        acc[o] = zero
                    for j in range(j0, j1):
                        col = j * sw + off
                        if M == 1:
                            for o in range(CO):
                                acc[o] += gy[n, i, j, o] * x[n, r, col, o]
                        else:
                            for c in range(C):
                                xv = x[n, r, col, c]
                                for m in range(M):
                                    acc[c * M + m] += gy[n, i, j, c * M + m] * xv
                    for o in range(CO):
                        part[t, a, bb, o] += acc[o]


# ----------------------------------------------------------------------------- pointwise


@njit(cache=True, fastmath=_FM)
def _epilogue_row(row, bias, has_bias, act, res, has_res):
    """row = act(row + bias) + res, in place on a 1-d run of one tile (bias a scalar for a
    channel row, ``res`` the matching 1-d run of the residual)."""
    if has_bias:
        for k in range(row.shape[0]):
            row[k] += bias
    _activate(row, act)
    if has_res:
        for k in range(row.shape[0]):
            row[k] += res[k]


@njit(cache=True, fastmath=_FM)
def _epilogue_pixel(row, b, has_bias, act, res, has_res):
    """The same for one NHWC pixel: ``row`` and ``res`` run over channels, ``b`` is a vector."""
    if has_bias:
        for k in range(row.shape[0]):
            row[k] += b[k]
    _activate(row, act)
    if has_res:
        for k in range(row.shape[0]):
            row[k] += res[k]


@njit(parallel=True, cache=True, fastmath=_FM)
def _pw_forward_nchw(x, w, b, res, y, PB, OB, has_bias, has_res, act):
    """y[n, o, k] = act(sum_c w[o, c] x[n, c, k] + b[o]) + res[n, o, k]  (NCHW, k = flat pixel).

    x:        (N, CI, K) input
    w:        (CO, CI) weights
    b:        (CO,) bias (read only if has_bias)
    res:      (N, CO, K) residual (read only if has_res)
    y:        (N, CO, K) output
    PB, OB:   pixels and output channels per tile (pw_tiles);  act: activation code
    One task per tile (image, block of PB pixels, block of OB output channels): one BLAS call
    writes y[n][o-block, k-block] (rows K apart) = w[o-block] x[n][:, k-block] in place
    (column-major: the pixels x channels matrix x[n][:, k-block]^T w[o-block]^T), then bias,
    activation and residual run over the tile while it is in cache.
    """
    N, CI, K = x.shape
    CO = w.shape[0]
    nb = (K + PB - 1) // PB
    ncb = (CO + OB - 1) // OB
    for t in prange(N * nb * ncb):
        n = t // (nb * ncb)
        r = t - n * nb * ncb
        kb = r // ncb
        k0 = kb * PB
        o0 = (r - kb * ncb) * OB
        pb = min(PB, K - k0)
        ob = min(OB, CO - o0)
        _gemm(False, False, pb, ob, CI, x[n, 0, k0:], K, w[o0:], CI, y[n, o0, k0:], K, False)
        if has_bias or has_res or act != 0:
            for o in range(o0, o0 + ob):
                _epilogue_row(y[n, o, k0:k0 + pb], b[o], has_bias, act,
                              res[n, o, k0:k0 + pb] if has_res else res[0, 0, :], has_res)


@njit(parallel=True, cache=True, fastmath=_FM)
def _pw_forward_nhwc(x, wt, b, res, y, PB, OB, has_bias, has_res, act):
    """y[p, o] = act(sum_c x[p, c] wt[c, o] + b[o]) + res[p, o]  (NHWC, p = flat pixel).

    x:        (P, CI) input;  wt: (CI, CO) weights, transposed;  b: (CO,) bias (if has_bias)
    res:      (P, CO) residual (read only if has_res);  y: (P, CO) output;  act: activation code
    PB, OB:   pixels and output channels per tile (pw_tiles)
    One task per tile: one BLAS call writes y[p-block, o-block] (rows CO apart) =
    x[p-block] wt[:, o-block] (column-major: the channels x pixels matrix
    wt[:, o-block]^T x[p-block]^T), then the epilogue per pixel.
    """
    P, CI = x.shape
    CO = wt.shape[1]
    nb = (P + PB - 1) // PB
    ncb = (CO + OB - 1) // OB
    for t in prange(nb * ncb):
        kb = t // ncb
        p0 = kb * PB
        o0 = (t - kb * ncb) * OB
        pb = min(PB, P - p0)
        ob = min(OB, CO - o0)
        _gemm(False, False, ob, pb, CI, wt[0, o0:], CO, x[p0:], CI, y[p0, o0:], CO, False)
        if has_bias or has_res or act != 0:
            for p in range(p0, p0 + pb):
                _epilogue_pixel(y[p, o0:o0 + ob], b[o0:o0 + ob], has_bias, act,
                                res[p, o0:o0 + ob] if has_res else res[0, :], has_res)


@njit(parallel=True, cache=True, fastmath=_FM)
def _pw_grad_weight_nchw(x, gy, part, G, OB):
    """Pointwise grad_weight, NCHW, stage 1: part[t] = sum over a pixel chunk of gy x^T.

    x:        (N, CI, K) input;  gy: (N, CO, K) output gradient
    part:     (chunks, CO, CI) float64 partials (stage 2: their sum)
    G:        images per chunk: K > GW_ROWS: 1 (each image in ceil(K / GW_ROWS) chunks); else
              GW_ROWS // K whole images (at most GW_ROWS pixels)
    OB:       output channels per task
    One task per (chunk, block of OB output channels): one BLAS call per image of the chunk,
    accumulated in the compute dtype (column-major: the CI x OB matrix
    x[n][:, k-run] gy[n][o-block, k-run]^T, the row-major (OB, CI) tile), then stored in float64.
    """
    N, CI, K = x.shape
    T, CO = part.shape[0], part.shape[1]
    nb = (K + GW_ROWS - 1) // GW_ROWS if G == 1 else 1
    ncb = (CO + OB - 1) // OB
    for t in prange(T * ncb):
        c = t // ncb
        o0 = (t - c * ncb) * OB
        ob = min(OB, CO - o0)
        n0 = (c // nb) * G
        k0 = (c - (c // nb) * nb) * GW_ROWS
        kc = min(GW_ROWS, K - k0)
        tile = np.empty((ob, CI), x.dtype)
        for n in range(n0, min(N, n0 + G)):
            _gemm(True, False, CI, ob, kc, x[n, 0, k0:], K, gy[n, o0, k0:], K, tile, CI, n > n0)
        for o in range(ob):
            for ci in range(CI):
                part[c, o0 + o, ci] = tile[o, ci]


@njit(parallel=True, cache=True, fastmath=_FM)
def _pw_grad_weight_nhwc(x, gy, part, OB):
    """Pointwise grad_weight, NHWC, stage 1: part[t] = sum over pixels of chunk t of gy x^T.

    x:        (P, CI) input;  gy: (P, CO) output gradient
    part:     (ceil(P / GW_ROWS), CO, CI) float64 partials (stage 2: their sum)
    OB:       output channels per task
    One BLAS call per (chunk of GW_ROWS pixels, block of OB output channels) (column-major: the
    CI x OB matrix x[chunk]^T gy[chunk, o-block]).
    """
    P, CI = x.shape
    T, CO = part.shape[0], part.shape[1]
    ncb = (CO + OB - 1) // OB
    for t in prange(T * ncb):
        c = t // ncb
        o0 = (t - c * ncb) * OB
        ob = min(OB, CO - o0)
        p0 = c * GW_ROWS
        tile = np.empty((ob, CI), x.dtype)
        _gemm(False, True, CI, ob, min(GW_ROWS, P - p0), x[p0:], CI, gy[p0, o0:], CO, tile, CI,
              False)
        for o in range(ob):
            for ci in range(CI):
                part[c, o0 + o, ci] = tile[o, ci]


# ----------------------------------------------------------------------------- separable


@njit(parallel=True, cache=True, fastmath=_FM)
def _separable_nchw(x, w, db, pw, b, res, y, PB, M, sh, sw, dh, dw, pt, pl,
                    has_db, dact, has_bias, has_res, act):
    """Fused separable forward, NCHW; one task per band of output rows, intermediate in cache.

    x:        (N, C, H, W) input
    w:        (C*M, KH, KW) depthwise filters;  db: (C*M,) depthwise bias (if has_db)
    pw:       (CO, C*M) pointwise weights;      b: (CO,) bias (if has_bias)
    res:      (N, CO, OH, OW) residual (if has_res)
    y:        (N, CO, OH, OW) output
    PB:       pixels per band (SEP_PIXELS): a band is max(1, PB // OW) output rows
    M, sh, sw, dh, dw, pt, pl: depthwise geometry as in _dw_forward_nchw
    dact, act: depthwise and final activation codes
    One task per band of RB output rows of one image. Each channel's band goes through a
    (RB, OW) buffer into mid[c] (mid is (C*M, RB*OW)); then one BLAS call writes the band of
    every output channel, y[n][:, band] (CO x RB*OW, rows OH*OW apart) = pw mid, and bias,
    activation and residual run over it while it is in cache.
    """
    N, CO, OH, OW = y.shape
    CI = w.shape[0]
    RB = max(1, min(OH, PB // OW))
    nb = (OH + RB - 1) // RB
    for t in prange(N * nb):
        n = t // nb
        i0 = (t - n * nb) * RB
        R = min(RB, OH - i0)
        L = R * OW
        band = np.empty((R, OW), x.dtype)
        mid = np.empty((CI, L), x.dtype)
        xp, acc, xoffs, woffs, wrep = _plane_scratch(x, w.shape[1], w.shape[2], R, OW, 1, sh, sw,
                                                     dh, dw)
        for c in range(CI):
            _dw_plane_nchw(x, w, db, n, c // M, c, 1, i0, band, sh, sw, dh, dw, pt, pl, has_db,
                           dact, xp, acc, xoffs, woffs, wrep)
            for ii in range(R):
                for j in range(OW):
                    mid[c, ii * OW + j] = band[ii, j]
        _gemm(False, False, L, CO, CI, mid, L, pw, CI, y[n, 0, i0:], OH * OW, False)
        if has_bias or has_res or act != 0:
            for o in range(CO):
                for ii in range(i0, i0 + R):
                    _epilogue_row(y[n, o, ii], b[o], has_bias, act,
                                  res[n, o, ii] if has_res else res[0, 0, 0], has_res)


@njit(parallel=True, cache=True, fastmath=_FM)
def _separable_nhwc(x, wt, wrep, db, pwt, b, res, y, PB, M, sh, sw, dh, dw, pt, pl,
                    has_db, dact, has_bias, has_res, act):
    """Fused separable forward, NHWC; one task per band of output rows, intermediate in cache.

    x:        (N, H, W, C) input
    wt:       (KH, KW, C*M) depthwise filters, channel last;  db: (C*M,) depthwise bias
    wrep:     tap filters repeated, as in _dw_row_nhwc
    pwt:      (C*M, CO) pointwise weights, transposed;  b: (CO,) bias (if has_bias)
    res:      (N, OH, OW, CO) residual (if has_res);  y: (N, OH, OW, CO) output
    PB:       pixels per band (SEP_PIXELS): a band is max(1, PB // OW) output rows
    M, sh, sw, dh, dw, pt, pl, dact, act: as in _separable_nchw
    mid (R, OW, C*M) = the band's depthwise rows; one BLAS call writes y[n, band] (R*OW x CO,
    contiguous) = mid pwt, then bias, activation, residual per pixel.
    """
    N, OH, OW, CO = y.shape
    CI = wt.shape[2]
    RB = max(1, min(OH, PB // OW))
    nb = (OH + RB - 1) // RB
    for t in prange(N * nb):
        n = t // nb
        i0 = (t - n * nb) * RB
        R = min(RB, OH - i0)
        mid = np.empty((R, OW, CI), x.dtype)
        for ii in range(R):
            _dw_row_nhwc(x, wt, wrep, db, n, i0 + ii, mid, ii, M, sh, sw, dh, dw, pt, pl, has_db,
                         dact)
        _gemm(False, False, CO, R * OW, CI, pwt, CO, mid, CI, y[n, i0], CO, False)
        if has_bias or has_res or act != 0:
            for ii in range(i0, i0 + R):
                for j in range(OW):
                    _epilogue_pixel(y[n, ii, j], b, has_bias, act,
                                    res[n, ii, j] if has_res else res[0, 0, 0], has_res)


# ----------------------------------------------------------------------------- the backend


def _compute_dtype(dtype: str):
    """float64 stays float64; float32, float16 and bfloat16 compute in float32."""
    return np.dtype(np.float64) if dtype == "float64" else np.dtype(np.float32)


def _as(a, dt):
    """``a`` as a C-contiguous array of dtype ``dt`` (no copy when it already is one)."""
    return None if a is None else np.ascontiguousarray(a, dtype=dt)


def _target(out, dt):
    """The array a kernel writes: ``out`` itself, or a ``dt`` temporary for 16-bit outputs."""
    return out if out.dtype == dt else np.empty(out.shape, dt)


def _finish(out, target):
    """Round the float32 temporary once into a 16-bit ``out``."""
    if target is not out:
        out[...] = target


def _opt(a, dt, shape):
    """An optional operand, or a 1-element stand-in of the same rank (flag tells it is absent)."""
    return np.zeros((1,) * len(shape), dt) if a is None else _as(a, dt).reshape(shape)


def _dw_weights(p, w, dt):
    """(C*M, 1, KH, KW) -> (C*M, KH, KW) for NCHW kernels, (KH, KW, C*M) for NHWC kernels."""
    w3 = _as(w, dt).reshape(p.CO, p.KH, p.KW)
    return w3 if p.layout == "NCHW" else np.ascontiguousarray(w3.transpose(1, 2, 0))


def _repeated_taps(p, wt):
    """(KH, KW, JB*C) filters repeated for JB pixels (NHWC flat path), or a stand-in that turns
    the flat path off when it does not apply (M > 1 or stride along W > 1)."""
    if p.M != 1 or p.sw != 1:
        return np.zeros((1, 1, 0), wt.dtype)
    jb = max(1, min(p.OW, FLAT_ELEMS // p.CO))
    return np.tile(wt, (1, 1, jb))


def _geometry(p):
    return (p.M, p.sh, p.sw, p.dh, p.dw, p.pt, p.pl)


def _flat(p, a):
    """Physical (N, C, H, W) -> (N, C, H*W); (N, H, W, C) -> (N*H*W, C). Views."""
    if p.layout == "NCHW":
        return a.reshape(a.shape[0], a.shape[1], -1)
    return a.reshape(-1, a.shape[-1])


class _SerialBlas:
    """Context: every BLAS library in the process single-threaded while a kernel calls BLAS from
    its prange tasks (Numba's threads are the parallelism; a multi-threaded BLAS under them
    would run threads x threads on the cores, and OpenBLAS inside an OpenMP loop can hang).
    The thread counts that were set are restored on exit. The first use resolves Numba's BLAS
    function and finds the BLAS libraries (threadpoolctl)."""

    def __init__(self):
        self._libs = None
        self._saved = []

    def __enter__(self):
        if self._libs is None:
            import scipy.linalg.cython_blas  # noqa: F401 - the library Numba's BLAS calls use
            from threadpoolctl import ThreadpoolController

            _gemm_warm()
            self._libs = [c for c in ThreadpoolController().lib_controllers
                          if c.user_api == "blas"]
        self._saved = [(c, c.num_threads) for c in self._libs]
        for c, n in self._saved:
            if n != 1:
                c.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        for c, n in self._saved:
            if n != 1:
                c.set_num_threads(n)
        self._saved = []


_serial_blas = _SerialBlas()


class _CpuBackend(HostBackend):
    """Numba CPU kernels; arrays arrive C-contiguous in the problem's layout (see Backend)."""

    name = "cpu"
    # One kernel launch at a time: the kernels use every core already, and Numba's workqueue
    # threading layer aborts the process when two threads launch parallel kernels at once.
    lock = threading.RLock()

    def unavailable_reason(self):
        return None if _IMPORT_ERROR is None else f"numba cannot be imported ({_IMPORT_ERROR})"

    # -- depthwise

    def depthwise_forward(self, p, x, w, b, out, stream=None):
        """x: p.x_shape, w: (C*M, 1, KH, KW), b: (C*M,) or None, out: p.y_shape."""
        dt = _compute_dtype(p.dtype)
        target = _target(out, dt)
        args = (_as(x, dt), _dw_weights(p, w, dt), _opt(b, dt, (p.CO,)))
        if p.layout == "NCHW":
            _dw_forward_nchw(*args, target, p.M, 1, *_geometry(p)[1:], b is not None,
                             ACT_CODES[p.activation])
        else:
            x_, wt, b_ = args
            _dw_forward_nhwc(x_, wt, _repeated_taps(p, wt), b_, target.reshape(-1, p.OW, p.CO),
                             *_geometry(p),
                             b is not None, ACT_CODES[p.activation])
        _finish(out, target)

    def depthwise_grad_input(self, p, gy, w, out, stream=None):
        """gy: p.y_shape, w: (C*M, 1, KH, KW), out: p.x_shape."""
        dt = _compute_dtype(p.dtype)
        target = _target(out, dt)
        gy = _as(gy, dt)
        nchw = p.layout == "NCHW"
        if p.sh == 1 and p.sw == 1 and (nchw or p.M == 1):
            # stride 1: the forward kernel on gy with flipped filters and mirrored padding
            wf = np.ascontiguousarray(_as(w, dt).reshape(p.CO, p.KH, p.KW)[:, ::-1, ::-1])
            ptf, plf = (p.KH - 1) * p.dh - p.pt, (p.KW - 1) * p.dw - p.pl
            nob = np.zeros(1, dt)
            if nchw:
                _dw_forward_nchw(gy, wf, nob, target, 1, p.M, 1, 1, p.dh, p.dw, ptf, plf, False,
                                 0)
            else:
                wt = np.ascontiguousarray(wf.transpose(1, 2, 0))
                _dw_forward_nhwc(gy, wt, _repeated_taps(p, wt), nob, target.reshape(-1, p.W, p.C),
                                 1, 1, 1, p.dh, p.dw, ptf, plf, False, 0)
        else:
            kernel = _dw_grad_input_nchw if nchw else _dw_grad_input_nhwc
            kernel(gy, _dw_weights(p, w, dt), target, *_geometry(p))
        _finish(out, target)

    def depthwise_grad_weight(self, p, x, gy, out, stream=None):
        """x: p.x_shape, gy: p.y_shape, out: (C*M, 1, KH, KW)."""
        dt = _compute_dtype(p.dtype)
        x, gy = _as(x, dt), _as(gy, dt)
        if p.layout == "NCHW":
            part = np.empty((p.N, p.CO, p.KH, p.KW), np.float64)
            _dw_grad_weight_nchw(x, gy, part, *_geometry(p))
            gw = part.sum(axis=0)
        else:
            part = np.empty((min(GW_TASKS, p.N * p.OH), p.KH, p.KW, p.CO), np.float64)
            _dw_grad_weight_nhwc(x, gy, part, *_geometry(p))
            gw = part.sum(axis=0).transpose(2, 0, 1)
        out[...] = gw.reshape(out.shape)  # float64 sums, rounded once

    # -- pointwise

    @staticmethod
    def _pw(p, x, w, b, residual, y, act):
        """y = act(w x + b) + residual over channels; w is (out channels, in channels);
        x, w, b, residual, y in the compute dtype, x and y flat (_flat)."""
        dt = y.dtype
        bias = _opt(b, dt, (w.shape[0],))
        res = _opt(residual, dt, y.shape)
        pb, ob = pw_tiles(p.layout, p.N, p.H * p.W, w.shape[0])
        with _serial_blas:
            if p.layout == "NCHW":
                _pw_forward_nchw(x, w, bias, res, y, pb, ob, b is not None, residual is not None,
                                 act)
            else:
                _pw_forward_nhwc(x, np.ascontiguousarray(w.T), bias, res, y, pb, ob,
                                 b is not None, residual is not None, act)

    def pointwise_forward(self, p, x, w, b, residual, out, stream=None):
        """x: p.x_shape, w: (CO, CI), b: (CO,) or None, residual: p.y_shape or None."""
        dt = _compute_dtype(p.dtype)
        target = _target(out, dt)
        res = None if residual is None else _flat(p, _as(residual, dt))
        self._pw(p, _flat(p, _as(x, dt)), _as(w, dt), b if b is None else _as(b, dt), res,
                 _flat(p, target), ACT_CODES[p.activation])
        _finish(out, target)

    def pointwise_grad_input(self, p, gy, w, out, stream=None):
        """gy: p.y_shape, w: (CO, CI), out: p.x_shape;  gx = W^T gy over channels."""
        dt = _compute_dtype(p.dtype)
        target = _target(out, dt)
        wt = np.ascontiguousarray(_as(w, dt).T)  # (CI, CO): the forward kernel with W^T
        self._pw(p, _flat(p, _as(gy, dt)), wt, None, None, _flat(p, target), 0)
        _finish(out, target)

    def pointwise_grad_weight(self, p, x, gy, out, stream=None):
        """x: p.x_shape, gy: p.y_shape, out: (CO, CI);  gW = sum over pixels of gy x^T.

        Chunks of at most GW_ROWS pixels (NCHW: of one image, or of whole images when an image
        has fewer) are summed in the compute dtype, chunks in float64; the output channels are
        split into blocks when there are fewer than PW_TASKS chunks.
        """
        dt = _compute_dtype(p.dtype)
        xf, gf = _flat(p, _as(x, dt)), _flat(p, _as(gy, dt))
        K = p.H * p.W
        if p.layout == "NCHW":
            g = 1 if K > GW_ROWS else max(1, GW_ROWS // max(K, 1))
            chunks = p.N * -(-K // GW_ROWS) if g == 1 else -(-p.N // g)
        else:
            chunks = -(-(p.N * K) // GW_ROWS)
        ob = channel_block(p.CO, chunks)
        part = np.empty((chunks, p.CO, p.CI), np.float64)
        with _serial_blas:
            if p.layout == "NCHW":
                _pw_grad_weight_nchw(xf, gf, part, g, ob)
            else:
                _pw_grad_weight_nhwc(xf, gf, part, ob)
        out[...] = part.sum(axis=0)  # float64 sums, rounded once

    # -- separable

    def separable_forward(self, p, x, dw_w, pw_w, b, dw_b, residual, out, stream=None):
        """x: p.x_shape, dw_w: (C*M, 1, KH, KW), pw_w: (CO, C*M), b: (CO,) or None,
        dw_b: (C*M,) or None, residual: p.y_shape or None, out: p.y_shape.

        One fused kernel: per output row, depthwise into a cache-resident row, GEMM, epilogue.
        """
        d, q = p.dw, p.pw
        dt = _compute_dtype(d.dtype)
        target = _target(out, dt)
        wk = _dw_weights(d, dw_w, dt)
        pw = _as(pw_w, dt)
        rest = (_opt(b, dt, (q.CO,)), _opt(residual, dt, q.y_shape), target,
                SEP_PIXELS, *_geometry(d),
                dw_b is not None, ACT_CODES[d.activation], b is not None, residual is not None,
                ACT_CODES[q.activation])
        dwb = _opt(dw_b, dt, (d.CO,))
        with _serial_blas:
            if d.layout == "NCHW":
                _separable_nchw(_as(x, dt), wk, dwb, pw, *rest)
            else:
                _separable_nhwc(_as(x, dt), wk, _repeated_taps(d, wk), dwb,
                                np.ascontiguousarray(pw.T), *rest)
        _finish(out, target)

    # -- depthwise 1-d (kernels in _cpu_conv1d.py)

    def depthwise_conv1d_forward(self, p, x, w, b, state, seq, out, final_out, stream=None):
        """x: p.x_shape, w: (C*M, 1, K), b: (C*M,) or None, state: (N, C, W) or None,
        seq: (N, L) int32/int64 or None, out: p.y_shape, final_out: (N, C, W) or None."""
        from . import _cpu_conv1d

        _cpu_conv1d.forward(p, x, w, b, state, seq, out, final_out)

    def depthwise_conv1d_backward(self, p, x, gy, w, state, seq, gx, gw, gb, gstate,
                                  stream=None):
        """x: p.x_shape, gy: p.y_shape, w: (C*M, 1, K), state: (N, C, W) or None, seq: (N, L)
        or None; outputs, None when not asked for: gx p.x_shape, gw (C*M, 1, K), gb (C*M,),
        gstate (N, C, W)."""
        from . import _cpu_conv1d

        _cpu_conv1d.backward(p, x, gy, w, state, seq, gx, gw, gb, gstate)

    def depthwise_conv1d_update(self, p, x, state, w, b, out, state_out, stream=None):
        """x: (N, C) or (N, C, T), state: (N, C, K-1), w: (C*M, 1, K), b: (C*M,) or None,
        out: p.y_shape, state_out: (N, C, K-1), may be ``state`` itself (in place)."""
        from . import _cpu_conv1d

        _cpu_conv1d.update(p, x, state, w, b, out, state_out)


BACKEND = _CpuBackend()
