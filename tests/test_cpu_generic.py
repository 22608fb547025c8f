"""The 2-d ``cpu`` kernels on a baseline x86-64 CPU: ``NUMBA_CPU_NAME=generic`` compiles them without
AVX, AVX2, FMA or F16C (the vector tiles' ``llvm.fma`` and 256-bit vectors then lower to baseline
code), and every op, direction and layout must still agree with the reference. The 1-d kernels have
the same check in ``test_cpu_conv1d.py``."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytest.importorskip("numba", reason="the cpu backend is Numba-compiled")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CODE = """
import numpy as np, dwops
from tests.conftest import assert_close
rng = np.random.default_rng(7)
def r(*s):
    return rng.uniform(-1, 1, s).astype(np.float32)
checked = 0
for layout in ("NCHW", "NHWC"):
    x = r(2, 5, 11, 13) if layout == "NCHW" else r(2, 11, 13, 5)
    w, b, pw, pb = r(5, 1, 3, 3), r(5), r(7, 5), r(7)
    for stride in (1, 2):
        kw = dict(stride=stride, padding=1, layout=layout)
        def both(fn, *a, **k):
            return [getattr(dwops, fn)(*a, **k, backend=be) for be in ("cpu", "numpy")]
        y, yr = both("depthwise_conv2d", x, w, b, activation="relu6", **kw)
        assert_close(y, yr, "float32")
        gx, gxr = both("depthwise_conv2d_grad_input", yr, w, x.shape, **kw)
        assert_close(gx, gxr, "float32")
        gw, gwr = both("depthwise_conv2d_grad_weight", x, yr, w.shape, **kw)
        mag = dwops.depthwise_conv2d_grad_weight(abs(x), abs(yr), w.shape, backend="numpy", **kw)
        assert_close(gw, gwr, "float32", scale=mag)  # relative to the sum of |products|
        s, sr = both("separable_conv2d", x, w, pw, pb, dw_activation="relu", activation="silu", **kw)
        assert_close(s, sr, "float32")
        checked += 4
    p, pr = [dwops.pointwise_conv2d(x, pw, pb, activation="gelu", layout=layout, backend=be)
             for be in ("cpu", "numpy")]
    assert_close(p, pr, "float32")
    checked += 1
print("generic ok", checked)
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                    reason="NUMBA_CPU_NAME=generic means baseline x86-64 only on x86-64 CPUs")
def test_2d_kernels_run_on_a_baseline_x86_64_cpu(tmp_path):
    env = dict(os.environ, NUMBA_CPU_NAME="generic", NUMBA_CACHE_DIR=str(tmp_path),
               DWOPS_QUIET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-c", CODE], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=1500)
    assert run.returncode == 0 and "generic ok 18" in run.stdout, \
        run.stdout[-2000:] + run.stderr[-3000:]
