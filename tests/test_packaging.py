"""Packaging and the commands a newcomer copies.

* CI (``.ci/run``) runs the README's test command verbatim, so the README cannot drift from CI.
* The extras: the ``test`` extra pins no CUDA wheel (a ``cuda12`` machine must not get CUDA 13
  packages with it); the CUDA packages the tests compile and emulate the GPU kernels with come in
  the ``cuda12`` / ``cuda13`` extras.
* The source distribution holds everything ``pytest`` needs (the tests, the oracle, the emulator
  and its headers, the docs and benchmark results some tests read) and the CUDA C++ sources the
  ``cupy`` backend compiles at run time: it is the whole project (``MANIFEST.in``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None


def _readme_block(heading: str) -> list[str]:
    """The command lines of the first ``bash`` block under the README heading ``heading``."""
    text = (ROOT / "README.md").read_text()
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"^```bash\n(.*?)^```", section, re.S | re.M)
    assert block, f"README.md, '{heading}': no bash block"
    return [ln.strip() for ln in block.group(1).splitlines() if ln.strip()]


def test_ci_runs_the_readme_test_command_verbatim():
    (command,) = _readme_block("Run the tests")
    ci_lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines, f".ci/run does not run the README's test command: {command}"
    assert "pip install" in command and "pytest" in command


def test_readme_try_it_installs_and_benchmarks():
    (command,) = _readme_block("Try it")
    assert command.startswith("pip install .") and command.endswith("python -m dwops bench")


def _pyproject() -> dict:
    if tomllib is None:
        pytest.skip("tomllib needs Python 3.11")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _names(requirements) -> set[str]:
    return {re.split(r"[\s\[<>=!~;]", r, 1)[0].lower() for r in requirements}


def test_test_extra_pins_no_cuda_wheel():
    extras = _pyproject()["project"]["optional-dependencies"]
    cuda_like = {n for n in _names(extras["test"])
                 if n.startswith(("cupy", "numba-cuda", "cuda-", "nvidia-"))}
    assert not cuda_like, f"the test extra installs CUDA packages: {sorted(cuda_like)}"
    # each CUDA extra brings one CuPy build and the tools the kernel reports compile with
    for extra, cupy in (("cuda12", "cupy-cuda12x"), ("cuda13", "cupy-cuda13x")):
        names = _names(extras[extra])
        assert cupy in names and "numba-cuda" in names and "cuda-bindings" in names, extra
        assert not ({"cupy-cuda12x", "cupy-cuda13x"} - {cupy}) & names, extra


def test_numba_and_llvmlite_are_bounded():
    """The cpu backend uses Numba internals (numba.core.cgutils, @intrinsic, llvmlite.ir)."""
    deps = _pyproject()["project"]["dependencies"]
    for name in ("numba", "llvmlite"):
        (req,) = [d for d in deps if _names([d]) == {name}]
        assert ">=" in req and "<" in req.replace("<=", ""), f"{name} needs both bounds: {req}"


# what pytest and the cupy backend need, as paths inside the sdist (after its top folder)
SDIST_MUST_HOLD = (
    "tests/conftest.py",
    "tests/oracle.py",
    "tests/numba_sim_cases.py",
    "dwops/cudaemu/__init__.py",
    "dwops/cudaemu/emu.h",
    "dwops/cudaemu/include/cuda_fp16.h",
    "dwops/cudaemu/include/cuda_bf16.h",
    "dwops/kernels/cuda/common.cuh",
    "dwops/kernels/cuda/depthwise.cuh",
    "dwops/kernels/cuda/pointwise.cuh",
    "dwops/kernels/cuda/separable.cuh",
    "dwops/kernels/cuda/conv1d.cuh",
    "pyproject.toml",
    "README.md",
    "LICENSE",
)


def test_every_listed_file_exists():
    """The list above is the repository's, so a renamed file fails here first."""
    missing = [p for p in SDIST_MUST_HOLD if not (ROOT / p).is_file()]
    assert not missing, missing
    tracked_tests = {str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("*")
                     if p.is_file() and "__pycache__" not in p.parts}
    assert {p for p in SDIST_MUST_HOLD if p.startswith("tests/")} <= tracked_tests


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to copy the tracked files")
def test_sdist_holds_what_the_tests_need(tmp_path):
    """Build the sdist from a copy of the tracked files (so local build outputs do not leak in)."""
    pytest.importorskip("setuptools")
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    src = tmp_path / "src"
    for rel in listed.stdout.decode().split("\0"):
        if rel and (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    code = ("import sys; from setuptools import build_meta as b; "
            "print(b.build_sdist(sys.argv[1]))")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "dist")], cwd=src,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    name = done.stdout.strip().splitlines()[-1]
    with tarfile.open(tmp_path / "dist" / name) as tar:
        members = {m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name}
    missing = [p for p in SDIST_MUST_HOLD if p not in members]
    assert not missing, f"the sdist lacks {missing}"
    # the sdist is the whole project: every tracked file but git's own
    for rel in listed.stdout.decode().split("\0"):
        if rel and rel != ".gitignore":
            assert rel in members, f"the sdist lacks {rel}"


def _min_pins():
    """``.ci/min_pins.py`` loaded as a module (it needs tomllib, i.e. Python 3.11)."""
    if tomllib is None:
        pytest.skip("tomllib needs Python 3.11")
    import importlib.util
    spec = importlib.util.spec_from_file_location("min_pins", ROOT / ".ci" / "min_pins.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_min_pins_cover_every_runtime_lower_bound():
    """The minimum-versions CI job installs one ``==`` pin per ``>=`` runtime dependency, at the
    bound itself, so raising or adding a bound in pyproject.toml changes what CI checks."""
    deps = _pyproject()["project"]["dependencies"]
    bounds = {}
    for dep in deps:
        found = re.search(r">=\s*([^,;\s]+)", dep)
        if found:
            bounds[re.sub(r"[-_.]+", "-", next(iter(_names([dep]))))] = found.group(1)
    assert bounds, "pyproject.toml declares no runtime lower bound"
    pins = dict(p.split("==") for p in _min_pins().pins())
    assert pins == bounds


def test_min_pins_read_the_forms_pyproject_uses():
    lower = _min_pins().lower_bound
    assert lower("numba>=0.60,<0.70") == ("numba", "0.60")
    assert lower("numba-cuda[cu13] >= 0.20 ; python_version >= '3.10'") == ("numba-cuda", "0.20")
    assert lower("jax<0.11,>=0.6.2") == ("jax", "0.6.2")
    assert lower("torch") == ("torch", None)
    assert lower("scipy==1.11.1") == ("scipy", None)


def test_ci_runs_the_minimum_versions_job():
    """After the README's command and the docs build, .ci/run installs the pins (wheels only, in
    their own environment and Numba cache), checks they are coherent and runs the CPU tests."""
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()
             if ln.strip() and not ln.strip().startswith("#")]
    (readme,) = _readme_block("Run the tests")
    text = "\n".join(lines)
    job_at = text.index("venv --clear .ci-min")
    assert text.index(readme) < text.index("sphinx") < job_at
    job = text[job_at:]
    assert ".ci/min_pins.py" in job and "--only-binary :all:" in job
    assert "pip check" in job and "NUMBA_CACHE_DIR" in job
    assert re.search(r"pytest .*tests/test_cpu_backend\.py", job)
