"""The ``numba`` backend without a GPU.

* Every kernel and parameter path under the Numba CUDA simulator against the reference: the cases
  live in ``tests/numba_sim_cases.py`` and run in a separate process with
  ``NUMBA_ENABLE_CUDASIM=1`` (the simulator must be chosen before ``numba.cuda`` is imported).
* The kernel report: kernels compiled for sm_90 with ``numba.cuda.compile_ptx`` and assembled by
  nvJitLink, no compile error and zero spill bytes (the depthwise 1-d kernels: no local memory
  either).
* Plumbing that needs no device: memoized factories, availability without a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_kernel_under_the_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu",
         str(ROOT / "tests" / "numba_sim_cases.py")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    assert " passed" in out and "skipped" not in out.splitlines()[-1], out[-2000:]


def test_kernel_report_compiles_without_spills():
    """One kernel per code path (layouts, staged/direct, specialized/generic, every factory) and
    the heaviest dtypes; ``python -m dwops kernels`` compiles the whole representative set."""
    pytest.importorskip("cuda.bindings.nvjitlink")
    from dwops.kernels.numba_cuda import compile_report

    rows = compile_report("sm_90", quick=True)
    assert {(r["op"], r["direction"]) for r in rows} >= {
        ("depthwise", "forward"), ("depthwise", "grad_input"), ("depthwise", "grad_weight"),
        ("pointwise", "forward"), ("separable", "forward"), ("reduce", "grad_weight")}
    for r in rows:
        assert set(r) == {"backend", "op", "direction", "specialization", "registers",
                          "shared_bytes", "spill_bytes", "error"}
        assert r["backend"] == "numba"
        assert r["error"] is None, r
        assert r["spill_bytes"] == 0, r
        assert 0 < r["registers"] <= 255, r


def test_conv1d_kernels_compile_for_sm90_without_spills_or_local_memory():
    """One depthwise 1-d kernel per code path (layouts, specialized/generic width, staged/direct,
    window/taps, backward, final state, update, seq_idx check), every epilogue flag on: compiled
    for sm_90, assembled by nvJitLink, no spill bytes and no stack frame (local memory)."""
    pytest.importorskip("cuda.bindings.nvjitlink")
    from numba import cuda

    from dwops.kernels._ptxas import assemble
    from dwops.kernels.numba_cuda import _conv1d_specs, _report_specs

    quick = list(_conv1d_specs(True))
    assert {d for _, d, _, _ in quick} == {"forward", "backward", "final_state", "update",
                                           "seq_idx check"}
    full = {k.name for op, *_, k in _report_specs() if op == "depthwise_conv1d"}
    assert {k.name for *_, k in quick} <= full  # the report lists every kernel tested here
    for _, direction, spec, k in quick:
        ptx, _ = cuda.compile_ptx(k.py_func, k.sig, cc=(9, 0))
        (props,) = assemble(ptx, "sm_90").values()
        assert props["spill_bytes"] == 0 and props["stack_bytes"] == 0, (direction, spec, props)
        assert 0 < props["registers"] <= 128, (direction, spec, props)


def test_report_set_covers_every_specialization_family():
    from dwops.kernels.numba_cuda import _report_specs

    specs = list(_report_specs())
    names = {k.name for *_, k in specs}
    assert len(names) == len(specs)  # no kernel listed twice
    text = " ".join(s for _, _, s, _ in specs)
    for needle in ("k=1x1", "k=3x3", "k=5x5", "k=7x7", "k=generic", "staged", "direct", "fused",
                   "unfused", "float16", "float64", "NHWC", "silu", "relu6", "hardswish",
                   "hardsigmoid"):
        assert needle in text, needle


def test_factories_are_memoized_per_specialization():
    from dwops.kernels import _numba_depthwise as D
    from dwops.kernels import _numba_gemm as G

    a = D.forward_kernel("NCHW", 3, 3, "float32", "float32", "relu", True, True)
    assert a is D.forward_kernel("NCHW", 3, 3, "float32", "float32", "relu", True, True)
    assert a is not D.forward_kernel("NCHW", 3, 3, "float16", "float16", "relu", True, True)
    g = G.gemm_kernel("float32", "float32", "float32", None, False, True, False)
    assert g is G.gemm_kernel("float32", "float32", "float32", None, False, True, False)


def test_unavailable_without_a_gpu_names_the_reason():
    from dwops.kernels.numba_cuda import BACKEND

    from .conftest import has_gpu

    reason = BACKEND.unavailable_reason()
    assert (reason is None) == has_gpu()
    if reason is not None:
        assert "GPU" in reason or "driver" in reason
