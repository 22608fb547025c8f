"""Shared by the ``cpu`` backend's kernel modules: the Numba imports (with stand-ins when Numba is
missing, so ``import dwops`` never breaks), the tiling constants, the fastmath flags, the
activation epilogue, and the host-side array helpers. See ``cpu.py`` for how the kernels work."""

from __future__ import annotations

import math

import numpy as np

try:  # the backend reports itself unavailable instead of breaking ``import dwops``
    import numba
    from llvmlite import ir  # noqa: F401  (the vector IR of _cpu_ir)
    from numba import njit, prange
    from numba import types as _nbtypes
    from numba import uint64 as _u  # unsigned index cast, see "row kernels"
    from numba.core import cgutils  # noqa: F401  (the vector IR of _cpu_ir)
    from numba.extending import intrinsic

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

from .._spec import ACTIVATION_CODES as ACT_CODES  # noqa: F401  (the kernels' activation codes)


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
    gelu = y/2 * (1 + erf(y / sqrt 2)); hardswish = y * relu6(y + 3) / 6; hardsigmoid =
    relu6(y + 3) / 6 (so hardswish(-inf) = -inf * 0 = NaN, as in the reference).
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
    elif act == 5 or act == 6:
        three = t(3.0)
        six = t(6.0)
        for k in range(v.shape[0]):
            y = v[k]
            r = y + three
            r = zero if r < zero else r
            r = six if r > six else r
            v[k] = (y * r if act == 5 else r) / six


# ----------------------------------------------------------------------------- host-side helpers


def _compute_dtype(dtype: str):
    """float64 stays float64; float32 (and float16 / bfloat16, in slabs) compute in float32."""
    return np.dtype(np.float64) if dtype == "float64" else np.dtype(np.float32)


def _as(a, dt):
    """``a`` as a C-contiguous array of dtype ``dt`` (no copy when it already is one)."""
    return None if a is None else np.ascontiguousarray(a, dtype=dt)


def _opt(a, dt, shape):
    """An optional operand, or a 1-element stand-in of the same rank (flag tells it is absent)."""
    return np.zeros((1,) * len(shape), dt) if a is None else _as(a, dt).reshape(shape)
