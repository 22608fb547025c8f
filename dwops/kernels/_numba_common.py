"""Pieces shared by the Numba CUDA kernel factories: dtypes, activations, signatures, budgets.

Every kernel of the ``numba`` backend is produced by a memoized factory keyed on its
specialization (dtypes, kernel size, layout, epilogue flags, staging); tile sizes are compile-time
constants (CAPITALS) of each factory's module. A factory returns a :class:`Kernel`: the launchable
dispatcher, the Python function and its explicit Numba signature, so the same specialization can
be compiled for the kernel report (``compile_ptx``) without a GPU.

Arrays are passed to kernels flattened (1-d, C-contiguous); all index arithmetic is done in
Numba's default 64-bit integers, so tensors past 2**31 elements index correctly.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, types

# Dynamic shared memory a staged kernel may use: the default per-block limit without an opt-in.
SMEM_BUDGET = 48 * 1024
THREADS = 256  # threads per block of every kernel (8 warps)

_NB = {"float16": types.float16, "float32": types.float32, "float64": types.float64,
       "int32": types.int32, "int64": types.int64}


def nb_type(dtype: str):
    """The Numba scalar type of a dtype name (float16, float32, float64; int32, int64 for index
    arrays such as seq_idx)."""
    return _NB[dtype]


def acc_dtype(dtype: str) -> str:
    """Accumulation dtype: float64 for float64, float32 otherwise (16-bit types round once)."""
    return "float64" if dtype == "float64" else "float32"


def itemsize(dtype: str) -> int:
    return np.dtype(dtype).itemsize


def arr(dtype: str):
    """Numba type of a flattened C-contiguous array argument."""
    return types.Array(_NB[dtype], 1, "C")


I64 = types.int64


class Kernel:
    """One specialization: ``fn`` launches it (compiled on first use for the current device, with
    an explicit signature, so no per-call type dispatch), ``py_func``/``sig`` compile it for the
    kernel report without a device."""

    def __init__(self, py_func, sig: tuple, name: str):
        self.py_func, self.sig, self.name = py_func, sig, name
        self._fn = None

    @property
    def fn(self):
        if self._fn is None:
            self._fn = cuda.jit(self.sig)(self.py_func)
        return self._fn

    def __repr__(self):
        return f"Kernel({self.name})"


def make_kernel(py_func, sig, name: str) -> Kernel:
    return Kernel(py_func, sig, name)


def activation(name, acc: str):
    """A device function ``f(v) -> v`` for ``name`` in the accumulation type ``acc``.

    Mirrors dwops.reference.activate, NaN/Inf included: relu(v) = v if v > 0 else 0*v, relu6 adds
    0*v so +-Inf gives NaN as in the reference, silu = v / (1 + exp(-v)), gelu (erf form)
    = v/2 * (1 + erf(v / sqrt(2))), hardswish = v * relu6(v + 3) / 6 and hardsigmoid =
    relu6(v + 3) / 6 (clamped by selects that keep NaN, so hardsigmoid(-inf) = 0 and
    hardswish(-inf) = -inf * 0 = NaN). Constants are typed ``acc`` so float32 math stays float32.
    """
    t = np.dtype(acc).type
    ZERO, ONE, HALF, THREE, SIX = t(0.0), t(1.0), t(0.5), t(3.0), t(6.0)
    RSQRT2 = t(1.0 / math.sqrt(2.0))

    if name is None:
        def act(v):
            return v
    elif name == "relu":
        def act(v):
            return v if v > ZERO else v * ZERO
    elif name == "relu6":
        def act(v):
            return (SIX if v > SIX else (v if v > ZERO else v * ZERO)) + v * ZERO
    elif name == "silu":
        def act(v):
            return v / (ONE + math.exp(-v))
    elif name == "gelu":
        def act(v):
            return HALF * v * (ONE + math.erf(v * RSQRT2))
    elif name == "hardswish":
        def act(v):
            r = v + THREE
            r = ZERO if r < ZERO else r
            return v * (SIX if r > SIX else r) / SIX
    elif name == "hardsigmoid":
        def act(v):
            r = v + THREE
            r = ZERO if r < ZERO else r
            return (SIX if r > SIX else r) / SIX
    else:  # pragma: no cover - validated in _spec
        raise ValueError(name)
    return cuda.jit(device=True, inline=True)(act)


def fits(nbytes: int) -> bool:
    """Whether a staged kernel's dynamic shared memory fits the budget."""
    return nbytes <= SMEM_BUDGET


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def kernel_key(kh: int, kw: int) -> tuple[int, int]:
    """Compile-time kernel size for the fast paths (1, 3, 5, 7 square); (0, 0) = generic path."""
    return (kh, kw) if kh == kw and kh in (1, 3, 5, 7) else (0, 0)
