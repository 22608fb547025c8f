"""Calls from several Python threads at once are safe on every Numba threading layer.

Numba's ``workqueue`` layer (what a machine without OpenMP or TBB gets) aborts the process when two
threads launch parallel kernels at once; the ``cpu`` backend serializes its kernel calls, so a data
loader or a server calling dwops from many threads gets correct results on any layer.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import threading

    import numba
    import numpy as np

    import dwops

    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 16, 40, 40)).astype(np.float32)
    w = rng.standard_normal((16, 1, 3, 3)).astype(np.float32)
    s = rng.standard_normal((2, 64, 300)).astype(np.float32)
    w1 = rng.standard_normal((64, 1, 4)).astype(np.float32)
    want = dwops.depthwise_conv2d(x, w, padding=1, backend="numpy")
    want1 = dwops.depthwise_conv1d(s, w1, padding="causal", backend="numpy")
    errors = []

    def work(k):
        for _ in range(15):
            if k % 2:
                ok = np.allclose(dwops.depthwise_conv2d(x, w, padding=1), want, atol=1e-4)
            else:
                ok = np.allclose(dwops.depthwise_conv1d(s, w1, padding="causal"), want1, atol=1e-4)
            if not ok:
                errors.append(k)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("layer", numba.threading_layer(), "errors", errors)
""")


@pytest.mark.parametrize("layer", ["workqueue", "default"])
def test_concurrent_calls_from_threads(layer):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if layer != "default":
        env["NUMBA_THREADING_LAYER"] = layer
    run = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert "errors []" in run.stdout, run.stdout
    if layer != "default":
        assert f"layer {layer}" in run.stdout
