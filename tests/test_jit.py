"""The compile notice (one line per kernel's first compile, ``DWOPS_QUIET=1`` hides it) and
``python -m dwops warmup`` (compiles into the disk cache that later processes load)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("numba", reason="the notice and the warm-up are about Numba's compiles")

from dwops import _jit  # noqa: E402
from dwops.__main__ import main  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fake_dwops_kernels(module: str):
    """Two Numba functions whose module is ``module``, the outer calling the inner."""
    from numba import njit

    src = ("def inner(a):\n    return a * 2.0\n"
           "def outer(a):\n    s = 0.0\n    for v in a:\n        s += inner(v)\n    return s\n")
    g = {"__name__": module}
    exec(compile(src, f"<{module}>", "exec"), g)
    inner = njit(g["inner"])
    g["inner"] = inner
    return njit(g["outer"])


def test_compile_notice_is_one_line_per_kernel_and_names_it(capsys, monkeypatch):
    import numpy as np

    monkeypatch.delenv("DWOPS_QUIET", raising=False)
    _jit.install_notice()
    outer = _fake_dwops_kernels("dwops.kernels._notice_probe")
    assert outer(np.arange(4.0)) == 12.0
    err = capsys.readouterr().err.splitlines()
    assert err == ["dwops: compiling notice_probe.outer for float64 arrays (once: later runs "
                   "load it from the disk cache; DWOPS_QUIET=1 hides this)"], err
    outer(np.arange(3.0, dtype=np.float32))  # a new signature of an announced kernel: silent
    assert capsys.readouterr().err == ""


def test_compile_notice_is_silent_when_asked_and_for_other_modules(capsys, monkeypatch):
    import numpy as np

    _jit.install_notice()
    monkeypatch.setenv("DWOPS_QUIET", "1")
    assert _fake_dwops_kernels("dwops.kernels._quiet_probe")(np.arange(4.0)) == 12.0
    monkeypatch.delenv("DWOPS_QUIET")
    assert _fake_dwops_kernels("someone_else.module")(np.arange(4.0)) == 12.0
    assert capsys.readouterr().err == ""


def test_warmup_rejects_unknown_names_before_compiling(capsys):
    assert main(["warmup", "--op", "depthwise_conv3d", "--dtype", "int8", "--backend", "auto"]) == 2
    err = capsys.readouterr().err
    assert "unknown backend 'auto', op 'depthwise_conv3d', dtype 'int8'" in err
    assert "compiling" not in err


def test_warmup_fills_the_cache_that_a_later_process_loads(tmp_path):
    """A cold ``warmup`` of one op compiles (and says so); a later process's first call of that
    op then loads the kernel from the same cache: no compile line."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), PYTHONPATH=ROOT)
    env.pop("DWOPS_QUIET", None)
    run = [sys.executable, "-m", "dwops", "warmup", "--op", "depthwise_conv1d_update",
           "--layout", "NCHW", "--jobs", "1"]
    done = subprocess.run(run, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "dwops: compiling cpu_conv1d." in done.stderr
    assert "[1/1] cpu depthwise_conv1d_update float32 NCHW:" in done.stderr
    assert "1 of 1 jobs compiled" in done.stderr
    call = ("import numpy as np, dwops\n"
            "r = np.random.default_rng(1)\n"
            "x, s = r.random((3, 5), np.float32), r.random((3, 5, 2), np.float32)\n"
            "w, b = r.random((5, 1, 3), np.float32), r.random(5, np.float32)\n"
            "y, s2 = dwops.depthwise_conv1d_update(x, s, w, b, activation='silu', backend='cpu')\n"
            "print(y.shape)\n")
    later = subprocess.run([sys.executable, "-c", call], env=env, capture_output=True, text=True,
                           timeout=600)
    assert later.returncode == 0, later.stderr
    assert later.stdout.strip() == "(3, 5)"
    assert "compiling" not in later.stderr, later.stderr


def test_warmup_says_why_a_gpu_backend_cannot_warm(capsys):
    import dwops

    if dwops.backend_available("cupy"):
        pytest.skip("needs a machine where the cupy backend cannot run")
    assert main(["warmup", "--backend", "cupy"]) == 1
    err = capsys.readouterr().err
    assert "backend 'cupy' is unavailable" in err and "0 of 1 jobs compiled" in err
