"""The ``"cpu"`` backend: Numba CPU kernels (``njit(parallel=True, cache=True)``) and BLAS.

``backend="auto"`` runs this for host arrays. Every op and gradient of the Backend interface is
here, for any kernel size up to 31x31, stride, dilation, channel multiplier, asymmetric padding,
bias, the four activations, residual, both layouts and the four dtypes. This module is the
backend (array preparation and the choice of kernel); the kernels live in one file per family:
``_cpu_depthwise.py`` (depthwise 2-d), ``_cpu_pointwise.py`` (pointwise and fused separable, BLAS),
``_cpu_conv1d.py`` (depthwise 1-d: forward, one-pass backward, decode update), ``_cpu_ir.py`` (the
register tiles, as LLVM vector IR) and ``_cpu_common.py`` (constants, activations, helpers).

Dtypes. float32 and float64 compute in their own precision (float32 reductions over many terms
are summed per row in float32 and across rows in float64). float16 and bfloat16 compute in float32
and are rounded once at the end, one *slab* at a time (:func:`_dw_slabs`, :func:`_pw_slabs`,
:func:`_sep_slabs`): a block of images and channels (depthwise), of pixels (pointwise) or of
output rows with their input halo (separable) whose largest operand has about SLAB_ELEMS
elements is widened into float32 scratch, run through the float32 kernels and rounded into the
output; weight gradients sum the slabs' float64 partials and round once. So a 16-bit call needs
a bounded scratch on top of its output (two or three float32 slabs of about SLAB_ELEMS elements,
or one channel plane and its output plane when a plane is larger), never float32 copies of whole
arrays. Each kernel below is ONE generic
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
* Small planes, NCHW (multiplier 1, planes of at most GROUP_PIXELS pixels): per-plane setup
  (the padded copy, rows rounded to whole vectors and register tiles) outweighs the taps of a
  7x7 or 14x14 plane, so each task takes one image's group of G channels instead, transposes
  it (W x W register transposes, :func:`_transpose_tile`) into a channel-last scratch image in
  cache, runs the NHWC row kernels on it (forward, grad_input at any stride, grad_weight), and
  transposes the result back (:func:`_dw_forward_nchw_groups` and its two gradients).
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
  not depend on the thread count, so results are reproducible. Asked for with it (the one-call
  backward), the bias gradient is summed by the same tasks from the gy they read for the taps.
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

import dataclasses
import threading

import numpy as np

from .._registry import HostBackend
from ._cpu_common import (
    _IMPORT_ERROR,
    ACT_CODES,
    FLAT_ELEMS,
    GW_ROWS,
    GW_TASKS,
    SEP_PIXELS,
    VEC_BYTES,
    _as,
    _compute_dtype,
    _opt,
)
from ._cpu_depthwise import (
    _dw_forward_nchw,
    _dw_forward_nchw_groups,
    _dw_forward_nhwc,
    _dw_grad_input_nchw,
    _dw_grad_input_nchw_groups,
    _dw_grad_input_nhwc,
    _dw_grad_weight_nchw,
    _dw_grad_weight_nchw_groups,
    _dw_grad_weight_nhwc,
)
from ._cpu_pointwise import (
    _gemm_warm,
    _pw_forward_nchw,
    _pw_forward_nhwc,
    _pw_grad_weight_nchw,
    _pw_grad_weight_nhwc,
    _separable_nchw,
    _separable_nhwc,
    channel_block,
    pw_tiles,
)

# ----------------------------------------------------------------------------- the backend


# ----------------------------------------------------------------------------- 16-bit slabs

NARROW = ("float16", "bfloat16")
# Elements in the largest float32 operand of one 16-bit slab (4 MiB): big enough that a slab is
# many kernel tasks (one parallel region per slab), small enough to stay a scratch buffer.
SLAB_ELEMS = 1 << 20
_F32 = np.dtype(np.float32)


def _nc(layout, n0, n1, c0, c1):
    """Index of images n0:n1 and channels c0:c1 of a 4-d array in ``layout``."""
    if layout == "NCHW":
        return slice(n0, n1), slice(c0, c1)
    return slice(n0, n1), slice(None), slice(None), slice(c0, c1)


def _dw_slabs(p):
    """The slabs of a 16-bit depthwise problem: blocks of images x input channels whose input
    and output blocks have about SLAB_ELEMS elements or fewer (at least one channel plane).
    Yields (q, xs, ys, ws): the float32 sub-problem, the block's index in x (and gx), in y
    (and gy), and its slice of output channels (filters, bias, weight gradient)."""
    k = max(1, SLAB_ELEMS // max(1, p.H * p.W, p.M * p.OH * p.OW))
    cc, nn = (p.C, max(1, k // max(1, p.C))) if k >= p.C else (k, 1)
    for n0 in range(0, p.N, nn):
        n1 = min(p.N, n0 + nn)
        for c0 in range(0, p.C, cc):
            c1 = min(p.C, c0 + cc)
            q = dataclasses.replace(p, N=n1 - n0, C=c1 - c0, dtype="float32")
            yield (q, _nc(p.layout, n0, n1, c0, c1), _nc(p.layout, n0, n1, c0 * p.M, c1 * p.M),
                   slice(c0 * p.M, c1 * p.M))


def _pw_slabs(p):
    """The slabs of a 16-bit pointwise problem: runs of pixels with about SLAB_ELEMS elements
    in the larger of their input and output blocks (at least one pixel). Yields (q, view): the
    float32 sub-problem and a function giving an array's block as q's physical shape (a view
    of x, gy, y, gx or the residual; NCHW: whole images when they fit, else pixels k0:k1 of one
    image as an (1, C, 1, k1-k0) problem; NHWC: rows of the (N*H*W, C) pixel matrix)."""
    K = p.H * p.W
    px = max(1, SLAB_ELEMS // max(1, p.CI, p.CO))
    if p.layout == "NCHW" and px >= K:
        nn = max(1, px // max(1, K))
        for n0 in range(0, p.N, nn):
            n1 = min(p.N, n0 + nn)
            yield dataclasses.replace(p, N=n1 - n0, dtype="float32"), \
                (lambda a, n0=n0, n1=n1: a[n0:n1])
        return
    if p.layout == "NCHW":
        for n in range(p.N):
            for k0 in range(0, K, px):
                k1 = min(K, k0 + px)
                yield dataclasses.replace(p, N=1, H=1, W=k1 - k0, dtype="float32"), \
                    (lambda a, n=n, k0=k0, k1=k1: a.reshape(p.N, a.shape[1], K)[n:n + 1, :, None,
                                                                               k0:k1])
        return
    rows = p.N * K
    for r0 in range(0, rows, px):
        r1 = min(rows, r0 + px)
        yield dataclasses.replace(p, N=1, H=1, W=r1 - r0, dtype="float32"), \
            (lambda a, r0=r0, r1=r1: a.reshape(rows, a.shape[-1])[None, None, r0:r1])


def _sep_slabs(p):
    """The slabs of a 16-bit separable problem: images, or bands of output rows of one image
    with the input rows they read (the halo), with about SLAB_ELEMS elements in the largest of
    the input, output and residual blocks. Yields (q, xs, ys): the float32 sub-problem (the
    band's input rows as its whole input, its top padding shifted to match) and the band's
    index in x and in y (and the residual)."""
    d = p.dw
    per_row = max(1, d.C * d.W * d.sh, p.pw.CO * d.OW)
    rb = max(1, SLAB_ELEMS // per_row)
    if rb >= d.OH:
        nn = max(1, rb // max(1, d.OH))
        for n0 in range(0, d.N, nn):
            n1 = min(d.N, n0 + nn)
            q = dataclasses.replace(p, dw=dataclasses.replace(d, N=n1 - n0, dtype="float32"),
                                    pw=dataclasses.replace(p.pw, N=n1 - n0, dtype="float32"))
            yield q, (slice(n0, n1),), (slice(n0, n1),)
        return
    for n in range(d.N):
        for i0 in range(0, d.OH, rb):
            i1 = min(d.OH, i0 + rb)
            first = i0 * d.sh - d.pt  # input row of the band's first tap
            r0 = max(0, first)
            r1 = min(d.H, (i1 - 1) * d.sh - d.pt + (d.KH - 1) * d.dh + 1)
            r1 = max(r1, r0)
            pt = r0 - first  # the band's rows above its input, zero padding
            pb = (i1 - i0 - 1) * d.sh + (d.KH - 1) * d.dh + 1 - (r1 - r0) - pt
            q = dataclasses.replace(
                p, dw=dataclasses.replace(d, N=1, H=r1 - r0, OH=i1 - i0, pt=pt, pb=pb,
                                          dtype="float32"),
                pw=dataclasses.replace(p.pw, N=1, H=i1 - i0, dtype="float32"))
            lead = (slice(n, n + 1),) + ((slice(None),) if d.layout == "NCHW" else ())
            yield q, lead + (slice(r0, r1),), lead + (slice(i0, i1),)


def _f32(a):
    """A float32 C-contiguous copy of a (16-bit) block, or None."""
    return None if a is None else np.ascontiguousarray(a, dtype=_F32)


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


# NCHW depthwise with multiplier 1 on planes of at most GROUP_PIXELS pixels (input and output)
# runs channel last in groups of G channels (_dw_forward_nchw_groups): G a multiple of two
# vectors, about GROUP_ELEMS // (H*W) within [GROUP_MIN, GROUP_MAX], and no more than the
# channels need. Measured (8x960x7x7, 8x576x14x14, 8x192x28x28, 3x3, float32, 2 threads):
# 32 channels per group leave the row kernel's fixed cost per row visible (0.46 vs 0.31 ms at
# 14x14); 128 at 28x28 overflows the cache (0.93 vs 0.66 ms with 64).
GROUP_PIXELS = 1024
GROUP_ELEMS = 1 << 16
GROUP_MIN = 64
GROUP_MAX = 128


def _grouped(p, H, W, OH, OW):
    """Whether an NCHW depthwise pass over (H, W) planes into (OH, OW) planes, multiplier 1,
    runs in channel groups."""
    return p.layout == "NCHW" and p.M == 1 and max(H * W, OH * OW) <= GROUP_PIXELS


def _group_size(C, dt, P):
    """Channels per group for C channels of dtype dt on planes of P pixels (see GROUP_PIXELS)."""
    nrc = 2 * VEC_BYTES // dt.itemsize
    G = max(GROUP_MIN, min(GROUP_MAX, GROUP_ELEMS // max(1, P)))
    return min(G, -(-C // nrc) * nrc) // nrc * nrc


def _channel_groups(w3, b, dt, P):
    """Filters (C, KH, KW) and bias (C,) or None as the arguments (wg, bg) of
    _dw_forward_nchw_groups for planes of P pixels: groups of G channels, (NG, KH, KW, G) and
    (NG, G), zero past the last channel."""
    C, KH, KW = w3.shape
    G = _group_size(C, dt, P)
    NG = -(-C // G)
    wz = np.zeros((NG * G, KH, KW), dt)
    wz[:C] = w3
    wg = np.ascontiguousarray(wz.reshape(NG, G, KH, KW).transpose(0, 2, 3, 1))
    bg = np.zeros(NG * G, dt)
    if b is not None:
        bg[:C] = b
    return wg, bg.reshape(NG, G)


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
        if p.dtype in NARROW:
            for q, xs, ys, ws in _dw_slabs(p):
                y = np.empty(q.y_shape, _F32)
                self.depthwise_forward(q, _f32(x[xs]), _f32(w[ws]), None if b is None else
                                       _f32(b[ws]), y)
                out[ys] = y
            return
        dt = _compute_dtype(p.dtype)
        args = (_as(x, dt), _dw_weights(p, w, dt), _opt(b, dt, (p.CO,)))
        if _grouped(p, p.H, p.W, p.OH, p.OW):
            x_, w3, b_ = args
            _dw_forward_nchw_groups(x_, *_channel_groups(w3, b_ if b is not None else None, dt,
                                                         max(p.H * p.W, p.OH * p.OW)),
                                    out, *_geometry(p)[1:], b is not None,
                                    ACT_CODES[p.activation])
        elif p.layout == "NCHW":
            _dw_forward_nchw(*args, out, p.M, 1, *_geometry(p)[1:], b is not None,
                             ACT_CODES[p.activation])
        else:
            x_, wt, b_ = args
            _dw_forward_nhwc(x_, wt, _repeated_taps(p, wt), b_, out.reshape(-1, p.OW, p.CO),
                             *_geometry(p),
                             b is not None, ACT_CODES[p.activation])

    def depthwise_grad_input(self, p, gy, w, out, stream=None):
        """gy: p.y_shape, w: (C*M, 1, KH, KW), out: p.x_shape."""
        if p.dtype in NARROW:
            self._dw_backward_slabs(p, None, gy, w, out, None, None)
            return
        dt = _compute_dtype(p.dtype)
        gy = _as(gy, dt)
        nchw = p.layout == "NCHW"
        if p.sh == 1 and p.sw == 1 and (nchw or p.M == 1):
            # stride 1: the forward kernel on gy with flipped filters and mirrored padding
            wf = np.ascontiguousarray(_as(w, dt).reshape(p.CO, p.KH, p.KW)[:, ::-1, ::-1])
            ptf, plf = (p.KH - 1) * p.dh - p.pt, (p.KW - 1) * p.dw - p.pl
            nob = np.zeros(1, dt)
            if _grouped(p, p.OH, p.OW, p.H, p.W):
                _dw_forward_nchw_groups(gy, *_channel_groups(wf, None, dt, p.H * p.W),
                                        out, 1, 1, p.dh, p.dw, ptf, plf, False, 0)
            elif nchw:
                _dw_forward_nchw(gy, wf, nob, out, 1, p.M, 1, 1, p.dh, p.dw, ptf, plf, False,
                                 0)
            else:
                wt = np.ascontiguousarray(wf.transpose(1, 2, 0))
                _dw_forward_nhwc(gy, wt, _repeated_taps(p, wt), nob, out.reshape(-1, p.W, p.C),
                                 1, 1, 1, p.dh, p.dw, ptf, plf, False, 0)
        elif _grouped(p, p.H, p.W, p.OH, p.OW):
            wg, _ = _channel_groups(_dw_weights(p, w, dt), None, dt, max(p.H * p.W, p.OH * p.OW))
            _dw_grad_input_nchw_groups(gy, wg, out, *_geometry(p)[1:])
        else:
            kernel = _dw_grad_input_nchw if nchw else _dw_grad_input_nhwc
            kernel(gy, _dw_weights(p, w, dt), out, *_geometry(p))

    def depthwise_grad_weight(self, p, x, gy, out, stream=None):
        """x: p.x_shape, gy: p.y_shape, out: (C*M, 1, KH, KW)."""
        self.depthwise_backward(p, x, gy, None, None, out, None)

    def depthwise_backward(self, p, x, gy, w, gx, gw, gb, stream=None):
        """x: p.x_shape, gy: p.y_shape, w: (C*M, 1, KH, KW); outputs, None when not asked for:
        gx p.x_shape, gw (C*M, 1, KH, KW), gb (C*M,).

        The bias gradient comes with the weight gradient: each task of the weight-gradient
        kernels also sums the block of gy it reads for the taps (_dw_weight_bias), so gy is not
        read again for it. 16-bit: one pass over the slabs, each block of gy widened once for
        every gradient asked for (_dw_backward_slabs)."""
        if p.dtype in NARROW:
            self._dw_backward_slabs(p, x, gy, w, gx, gw, gb)
            return
        if gx is not None:
            self.depthwise_grad_input(p, gy, w, gx)
        if gw is not None or gb is not None:
            self._store_sums(gw, gb, *self._dw_weight_bias(p, x, gy, gw is not None,
                                                           gb is not None))

    def _dw_backward_slabs(self, p, x, gy, w, gx, gw, gb):
        """The 16-bit depthwise gradients asked for (the others None), slab by slab (_dw_slabs):
        a slab's block of gy is widened to float32 once and serves grad_input, grad_weight and
        grad_bias; the weight and bias gradients are float64 sums over the slabs, rounded once."""
        sum_w = None if gw is None else np.zeros((p.CO, p.KH, p.KW), np.float64)
        sum_b = None if gb is None else np.zeros(p.CO, np.float64)
        for q, xs, ys, ws in _dw_slabs(p):
            g = _f32(gy[ys])
            if gx is not None:
                part = np.empty(q.x_shape, _F32)
                self.depthwise_grad_input(q, g, _f32(w[ws]), part)
                gx[xs] = part
            if gw is not None or gb is not None:
                sw, sb = self._dw_weight_bias(q, None if gw is None else _f32(x[xs]), g,
                                              gw is not None, gb is not None)
                if sw is not None:
                    sum_w[ws] += sw
                if sb is not None:
                    sum_b[ws] += sb
        self._store_sums(gw, gb, sum_w, sum_b)

    @staticmethod
    def _store_sums(gw, gb, sum_w, sum_b):
        """The float64 weight and bias sums, rounded once into the outputs asked for."""
        if gw is not None:
            gw[...] = sum_w.reshape(gw.shape)
        if gb is not None:
            gb[...] = sum_b

    def _dw_weight_bias(self, p, x, gy, want_w, want_b):
        """(weight gradient (C*M, KH, KW), bias gradient (C*M,)) as float64 sums, None where not
        wanted; p is float32 or float64. The bias alone is a float64 sum of gy."""
        if want_w:
            return self._dw_grad_weight(p, x, gy, want_b)
        return None, self._bias_sums(p, gy) if want_b else None

    @staticmethod
    def _dw_grad_weight(p, x, gy, bias=False):
        """(weight gradient (C*M, KH, KW), bias gradient (C*M,) or None without ``bias``) as
        float64 sums of the kernels' per-task partials; p is float32 or float64."""
        dt = _compute_dtype(p.dtype)
        x, gy = _as(x, dt), _as(gy, dt)

        def partials(*shape):  # the bias partials, or the kernels' stand-in for none
            return np.empty(shape if bias else (0,) * len(shape), np.float64)

        if _grouped(p, p.H, p.W, p.OH, p.OW):
            G = _group_size(p.C, dt, max(p.H * p.W, p.OH * p.OW))
            NG = -(-p.C // G)
            part, partb = np.empty((p.N, NG, p.KH, p.KW, G), np.float64), partials(p.N, NG, G)
            _dw_grad_weight_nchw_groups(x, gy, part, partb, *_geometry(p)[1:])
            gw = part.sum(axis=0).transpose(0, 3, 1, 2).reshape(-1, p.KH, p.KW)
            return gw[:p.C], partb.sum(axis=0).reshape(-1)[:p.C] if bias else None
        if p.layout == "NCHW":
            part, partb = np.empty((p.N, p.CO, p.KH, p.KW), np.float64), partials(p.N, p.CO)
            _dw_grad_weight_nchw(x, gy, part, partb, *_geometry(p))
        else:
            T = min(GW_TASKS, p.N * p.OH)
            part, partb = np.empty((T, p.KH, p.KW, p.CO), np.float64), partials(T, p.CO)
            _dw_grad_weight_nhwc(x, gy, part, partb, *_geometry(p))
            part = part.transpose(0, 3, 1, 2)
        return part.sum(axis=0), partb.sum(axis=0) if bias else None

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
        if p.dtype in NARROW:
            w, b = _f32(w), _f32(b)
            for q, view in _pw_slabs(p):
                y = np.empty(q.y_shape, _F32)
                self.pointwise_forward(q, _f32(view(x)), w, b,
                                       None if residual is None else _f32(view(residual)), y)
                view(out)[...] = y
            return
        dt = _compute_dtype(p.dtype)
        res = None if residual is None else _flat(p, _as(residual, dt))
        self._pw(p, _flat(p, _as(x, dt)), _as(w, dt), b if b is None else _as(b, dt), res,
                 _flat(p, out), ACT_CODES[p.activation])

    def pointwise_grad_input(self, p, gy, w, out, stream=None):
        """gy: p.y_shape, w: (CO, CI), out: p.x_shape;  gx = W^T gy over channels."""
        if p.dtype in NARROW:
            w = _f32(w)
            for q, view in _pw_slabs(p):
                gx = np.empty(q.x_shape, _F32)
                self.pointwise_grad_input(q, _f32(view(gy)), w, gx)
                view(out)[...] = gx
            return
        dt = _compute_dtype(p.dtype)
        wt = np.ascontiguousarray(_as(w, dt).T)  # (CI, CO): the forward kernel with W^T
        self._pw(p, _flat(p, _as(gy, dt)), wt, None, None, _flat(p, out), 0)

    def pointwise_grad_weight(self, p, x, gy, out, stream=None):
        """x: p.x_shape, gy: p.y_shape, out: (CO, CI);  gW = sum over pixels of gy x^T."""
        if p.dtype in NARROW:
            gw = np.zeros((p.CO, p.CI), np.float64)
            for q, view in _pw_slabs(p):
                gw += self._pw_grad_weight(q, _f32(view(x)), _f32(view(gy)))
        else:
            gw = self._pw_grad_weight(p, x, gy)
        out[...] = gw  # float64 sums, rounded once

    @staticmethod
    def _pw_grad_weight(p, x, gy):
        """The weight gradient as float64 sums, (CO, CI); p is float32 or float64.

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
        return part.sum(axis=0)

    # -- separable

    def separable_forward(self, p, x, dw_w, pw_w, b, dw_b, residual, out, stream=None):
        """x: p.x_shape, dw_w: (C*M, 1, KH, KW), pw_w: (CO, C*M), b: (CO,) or None,
        dw_b: (C*M,) or None, residual: p.y_shape or None, out: p.y_shape.

        One fused kernel: per output row, depthwise into a cache-resident row, GEMM, epilogue.
        """
        if p.dw.dtype in NARROW:
            w = [_f32(a) for a in (dw_w, pw_w, b, dw_b)]
            for q, xs, ys in _sep_slabs(p):
                y = np.empty(q.y_shape, _F32)
                self.separable_forward(q, _f32(x[xs]), *w[:3], w[3],
                                       None if residual is None else _f32(residual[ys]), y)
                out[ys] = y
            return
        d, q = p.dw, p.pw
        dt = _compute_dtype(d.dtype)
        wk = _dw_weights(d, dw_w, dt)
        pw = _as(pw_w, dt)
        rest = (_opt(b, dt, (q.CO,)), _opt(residual, dt, q.y_shape), out,
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
