"""DWOPS_REQUIRE_GPU=1 (tests/require_gpu.py), which scripts/gpu_check.sh sets: a skipped GPU test,
or a GPU test module skipped at import, fails the run; other skips stay skips."""

from __future__ import annotations

import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FILES = {
    "test_gpu_tests.py": (
        "import pytest\n"
        "pytestmark = pytest.mark.gpu\n"
        "def test_runs(): pass\n"
        "def test_skips(): pytest.skip('no device here')\n"
        "@pytest.mark.skipif(True, reason='a skip marker')\n"
        "def test_skip_marker(): pass\n"),
    "test_gpu_module.py": (
        "import pytest\n"
        "pytestmark = pytest.mark.gpu\n"
        "pytest.importorskip('dwops_no_such_package', reason='a missing package')\n"
        "def test_never(): pass\n"),
    "test_host.py": (
        "import pytest\n"
        "def test_host_skip(): pytest.skip('an ordinary skip')\n"),
}


def _pytest(tmp_path, require: str):
    for name, text in FILES.items():
        (tmp_path / name).write_text(text)
    env = {k: v for k, v in os.environ.items() if k not in ("DWOPS_REQUIRE_GPU", "DWOPS_CUDAEMU")}
    env.update(DWOPS_REQUIRE_GPU=require, PYTHONPATH=REPO)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
         "-p", "tests.require_gpu", "-W", "ignore::pytest.PytestUnknownMarkWarning",
         "--continue-on-collection-errors", "."],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout + done.stderr


def test_gpu_skips_fail_only_when_required(tmp_path):
    rc, out = _pytest(tmp_path, "0")
    assert rc == 0, out
    assert re.search(r"\b1 passed, 4 skipped\b", out), out
    rc, out = _pytest(tmp_path, "1")
    assert rc != 0, out
    assert "GPU test skipped under DWOPS_REQUIRE_GPU=1: Skipped: no device here" in out, out
    assert "GPU test skipped under DWOPS_REQUIRE_GPU=1: Skipped: a skip marker" in out, out
    assert "GPU test module skipped under DWOPS_REQUIRE_GPU=1: Skipped: a missing package" in out
    assert "an ordinary skip" in out and re.search(r"\b1 passed, 1 skipped\b", out), out


def test_gpu_check_requires_the_gpu_tests():
    with open(os.path.join(REPO, "scripts", "gpu_check.sh")) as f:
        script = f.read()
    stage = script[script.index('stage "pytest -m gpu"'):]
    stage = stage[:stage.index(" tests\n")]
    assert "DWOPS_REQUIRE_GPU=1" in stage and "-m pytest -m gpu" in stage, stage
