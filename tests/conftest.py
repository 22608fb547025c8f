"""Shared test helpers: fresh random inputs, per-dtype tolerances, GPU detection."""

from __future__ import annotations

import importlib
import os
import zlib

import numpy as np
import pytest

from dwops._registry import numpy_dtype

DTYPES = ("float16", "bfloat16", "float32", "float64")

# Relative to the magnitude of the result (see assert_close). 16-bit types accumulate in float32
# and round once, so they are within ~1 ulp of the float64 result: their epsilon, doubled.
_RTOL = {"float64": 1e-12, "float32": 1e-5, "float16": 2 * 2.0**-10, "bfloat16": 2 * 2.0**-7}


def rand(rng: np.random.Generator, shape, dtype="float32", low=-1.0, high=1.0) -> np.ndarray:
    """Fresh uniform random values (never zeros), rounded to ``dtype``."""
    return rng.uniform(low, high, size=shape).astype(numpy_dtype(dtype))


def tolerance(dtype: str) -> float:
    return _RTOL[dtype]


def assert_close(actual, expected, dtype: str, scale=None, what: str = "") -> None:
    """|actual - expected| <= rtol(dtype) * scale elementwise, NaN where and only where expected.

    ``scale`` is the magnitude the error is relative to: an array broadcastable to the result (for
    a convolution, the same convolution of |x| and |w|, i.e. the sum of absolute products) or a
    scalar; by default max(1, |expected|) elementwise.
    """
    a = np.asarray(actual).astype(np.float64)
    e = np.asarray(expected).astype(np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    nan_a, nan_e = np.isnan(a), np.isnan(e)
    assert np.array_equal(nan_a, nan_e), f"{what}: NaN pattern differs"
    inf_e = np.isinf(e)
    assert np.array_equal(a[inf_e], e[inf_e]) and not np.isinf(a[~inf_e]).any(), \
        f"{what}: infinities differ"
    if scale is None:
        scale = np.maximum(1.0, np.abs(e))
    bound = _RTOL[dtype] * np.asarray(scale, dtype=np.float64) + 1e-300
    bound = np.where(np.isnan(bound), np.inf, bound)  # NaN positions are checked above
    with np.errstate(invalid="ignore"):
        err = np.where(nan_e | (a == e), 0.0, np.abs(a - e))  # a == e covers matching infinities
    with np.errstate(invalid="ignore"):
        worst = np.unravel_index(np.argmax(err / bound), err.shape) if err.size else ()
    assert np.all(err <= bound), (
        f"{what}: max error {err[worst]:.3e} at {worst} exceeds {bound[worst] if np.ndim(bound) else bound:.3e}"
        f" ({dtype}); got {a[worst]!r}, expected {e[worst]!r}")


def conv1d_inputs(rng, layout, dtype, N, C, L, M, K, dilation=1, bias=True, state=False,
                  seq=None):
    """Fresh random depthwise 1-d inputs: x in ``layout``, w (C*M, 1, K), bias (C*M,) or None,
    initial_state (N, C, dilation*(K-1)) or None, seq_idx (N, L) of dtype ``seq`` (sorted random
    sequence ids, boundaries anywhere) or None."""
    x = rand(rng, (N, C, L) if layout == "NCL" else (N, L, C), dtype)
    w = rand(rng, (C * M, 1, K), dtype)
    b = rand(rng, (C * M,), dtype) if bias else None
    st = rand(rng, (N, C, dilation * (K - 1)), dtype) if state else None
    sq = np.sort(rng.integers(0, 4, (N, L)), axis=1).astype(seq) if seq else None
    return x, w, b, st, sq


def assert_conv1d_backward(got: dict, x, gy, w, state, seq, geo: dict, dtype: str) -> None:
    """Compare a backend's depthwise 1-d backward with the reference. ``got`` maps "input",
    "weight", "bias", "initial_state" to the host result, or None where it was not asked for;
    ``geo`` holds stride / padding / dilation / layout. Errors are relative to the same backward
    of |x|, |gy| and |w|."""
    import dwops.reference as R

    def mag(a):
        return None if a is None else np.nan_to_num(np.abs(np.asarray(a).astype(np.float64)))

    flags = {f"need_{k}": v is not None for k, v in got.items()}
    expected = R.depthwise_conv1d_backward(x, gy, w, initial_state=state, seq_idx=seq, **flags,
                                           **geo)
    scale = R.depthwise_conv1d_backward(mag(x), mag(gy), mag(w), initial_state=mag(state),
                                        seq_idx=seq, **flags, **geo)
    for (name, a), e, sc in zip(got.items(), expected, scale):
        assert (a is None) == (e is None), name
        if a is not None:
            assert_close(a, e, dtype, sc, f"grad {name}")


def optional_import(name: str, why: str):
    """(module, skip marker): the module ``name``, or None where it is not installed, and a marker
    for the tests that need it, whose skip reason names the package and ``why`` the test uses it.

    For test modules where only some tests need a package: those tests carry the marker and the
    others run without the package (a module-level ``pytest.importorskip`` would skip them all).
    """
    try:
        module = importlib.import_module(name)
    except ImportError:
        module = None
    return module, pytest.mark.skipif(module is None, reason=f"needs {name}: {why}")


def has_gpu() -> bool:
    try:
        from numba import cuda

        return bool(cuda.is_available())
    except Exception:
        return False


gpu = pytest.mark.skipif(not has_gpu(), reason="needs an NVIDIA GPU")

# DWOPS_CUDAEMU=1: tests/test_gpu_cupy.py runs the cupy backend's kernels in the CPU emulator
# (dwops/cudaemu) instead of on a GPU; tests/test_cupy_emulated.py starts such runs.
EMULATED = os.environ.get("DWOPS_CUDAEMU") == "1"
if EMULATED:
    from dwops import cudaemu

    cudaemu.install()
    cudaemu.prebuild_report()   # one library per (file, dtype); a lookup once the cache is warm
    if os.environ.get("DWOPS_CUDAEMU_NAMES"):
        cudaemu.write_names_at_exit(os.environ["DWOPS_CUDAEMU_NAMES"])


# DWOPS_REQUIRE_GPU=1 (scripts/gpu_check.sh): skipped GPU tests fail (see tests/require_gpu.py).
from tests.require_gpu import (  # noqa: E402,F401
    pytest_make_collect_report,
    pytest_runtest_makereport,
)


@pytest.fixture
def rng(request):
    """A generator seeded per test (by name) so failures reproduce; values are still non-trivial."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)
