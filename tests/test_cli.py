"""The command line: ``python -m dwops info``, ``bench`` (tiny shapes, host backends), ``kernels``."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types

import pytest

import dwops
from dwops.__main__ import main
from dwops.bench import report, workloads

NUMBA_MOD, CUPY_MOD = "dwops.kernels.numba_cuda", "dwops.kernels.cupy_compile"


def test_import_main_is_light():
    """Parsing the command line imports none of the heavy libraries."""
    code = ("import sys, dwops.__main__ as m; m.build_parser(); "
            "print(sorted(k for k in ('torch', 'jax', 'cupy', 'numba', 'matplotlib') "
            "if k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backends:" in out and "devices:" in out and "versions:" in out
    assert "numpy  available" in out
    for name in ("cpu", "numba", "cupy"):
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(name + " "))
        assert ("available" in line) and (line.split()[1] in ("available", "unavailable:"))
    assert f"dwops          {dwops.__version__}" in out
    assert "cpu: " in out


def test_version_has_one_source(capsys):
    from importlib.metadata import version

    assert dwops.__version__ == version("dwops")
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"dwops {version('dwops')}"


def test_console_entry_runs_info():
    out = subprocess.run([sys.executable, "-m", "dwops", "info"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "backends:" in out.stdout


# ----------------------------------------------------------------------------- kernels


def _row(backend, **kw):
    row = dict(backend=backend, op="depthwise", direction="forward",
               specialization="float32 k3 NCHW", registers=40, shared_bytes=4096, spill_bytes=0,
               error=None)
    row.update(kw)
    return row


SASS_MOD = "dwops.model.sass"


def _facts(file="depthwise", name="dw_forward<float, float, 3, 1, 4, 2, false>", ldl=0, stl=0,
           local=0, registers=40):
    counts = {"HMMA": 0, "LDGSTS": 0, "LDG.128": 3, "LDS": 8, "STS": 4, "FFMA": 72, "LDL": ldl,
              "STL": stl, "total": 200}
    return dict(file=file, name=name, registers=registers, static_smem=0, local_bytes=local,
                spill_stores=0, spill_loads=0, counts=counts, loop_counts=counts)


def _fake(monkeypatch, numba_rows, cupy_rows, sass_rows=()):
    """Install fake backend modules whose compile_report returns the given rows (or raises them),
    and a fake dwops.model.sass.sass_facts that returns ``sass_rows`` (or raises them)."""
    calls = []

    def sass_facts(arch, _rows=sass_rows):
        calls.append((SASS_MOD, arch))
        if isinstance(_rows, Exception):
            raise _rows
        return list(_rows)
    monkeypatch.setattr(f"{SASS_MOD}.sass_facts", sass_facts)
    from dwops.kernels.cupy_compile import source  # the real sources: their __launch_bounds__
    for name, rows in ((NUMBA_MOD, numba_rows), (CUPY_MOD, cupy_rows)):
        if rows is None:
            monkeypatch.setitem(sys.modules, name, None)  # import fails
            continue
        mod = types.ModuleType(name)
        mod.source = source
        if rows != "no-function":
            def compile_report(arch, _rows=rows, _name=name):
                calls.append((_name, arch))
                if isinstance(_rows, Exception):
                    raise _rows
                return _rows
            mod.compile_report = compile_report
        monkeypatch.setitem(sys.modules, name, mod)
    return calls


def test_kernels_all_clean(monkeypatch, capsys):
    calls = _fake(monkeypatch, [_row("numba"), _row("numba", op="pointwise")],
                  [_row("cupy", specialization="__half k7 NHWC", registers=64, file="depthwise",
                        name="dw_forward<__half, __half, 7, 1, 8, 2, true>")],
                  [_facts(name="dw_forward<__half, __half, 7, 1, 8, 2, true>")])
    assert main(["kernels", "--arch", "sm_90"]) == 0
    assert calls == [(NUMBA_MOD, "sm_90"), (CUPY_MOD, "sm_90"), (SASS_MOD, "sm_90")]
    out = capsys.readouterr().out
    assert "3 kernels, 0 problems" in out
    assert "__half k7 NHWC" in out and "pointwise" in out
    header = next(ln for ln in out.splitlines() if ln.startswith("backend"))
    assert header.split() == ["backend", "op", "direction", "specialization", "registers",
                              "shared_bytes", "spill_bytes", "error", "HMMA", "LDGSTS", "LDG.128",
                              "LDS", "STS", "FFMA", "LDL/STL", "threads", "occupancy"]


def test_kernels_machine_code_columns(monkeypatch, capsys):
    """The cupy rows get their machine-code counts (joined on file and name) and the occupancy
    at the __launch_bounds__ block size (dw_forward: 256 threads; 40 registers on an H200: 12
    warps per sub-partition, 6 blocks, 48 of 64 warps); rows without launch bounds get none."""
    dw = "dw_forward<float, float, 3, 1, 4, 2, false>"
    gi = "dw_grad_weight_taps<float, 4, false>"   # no __launch_bounds__
    _fake(monkeypatch, [_row("numba")],
          [_row("cupy", file="depthwise", name=dw), _row("cupy", file="depthwise", name=gi)],
          [_facts(name=dw), _facts(name=gi, registers=255)])
    assert main(["kernels", "--arch", "sm_90"]) == 0
    lines = capsys.readouterr().out.splitlines()
    numba, cupy_dw, cupy_gi = [ln.split() for ln in lines if ln.startswith(("numba", "cupy"))]
    assert numba[-9:] == ["-"] * 9
    assert cupy_dw[-10:] == ["0", "0", "3", "8", "4", "72", "0/0", "256", "0.75", "registers"]
    assert cupy_gi[-9:] == ["0", "0", "3", "8", "4", "72", "0/0", "-", "-"]


def test_kernels_shows_local_memory(monkeypatch, capsys):
    """Local memory without spills (a runtime-indexed array) is shown, not a failure."""
    dw = "dw_forward<float, float, 3, 1, 4, 2, false>"
    _fake(monkeypatch, [_row("numba")], [_row("cupy", file="depthwise", name=dw)],
          [_facts(name=dw, ldl=2, stl=5, local=16)])
    assert main(["kernels", "--arch", "sm_90"]) == 0
    (cupy,) = [ln.split() for ln in capsys.readouterr().out.splitlines() if ln.startswith("cupy")]
    assert cupy[-4] == "2/5"


@pytest.mark.parametrize("facts, message", [
    ([], "no machine code"),
    (RuntimeError("nvdisasm failed"), "sass_facts('sm_90') raised RuntimeError: nvdisasm failed"),
])
def test_kernels_machine_code_problems_fail(monkeypatch, capsys, facts, message):
    _fake(monkeypatch, [_row("numba")],
          [_row("cupy", file="depthwise", name="dw_forward<float, float, 3, 1, 4, 2, false>")],
          facts)
    assert main(["kernels", "--arch", "sm_90"]) == 1
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("bad", [
    dict(spill_bytes=16),
    dict(error="ptxas error: too many resources requested"),
    dict(registers=None, error=None),
])
def test_kernels_bad_row_fails(monkeypatch, capsys, bad):
    _fake(monkeypatch, [_row("numba"), _row("numba", **bad)], [_row("cupy")])
    assert main(["kernels"]) == 1
    err = capsys.readouterr().err
    assert "PROBLEM: numba depthwise forward" in err


@pytest.mark.parametrize("numba_rows, cupy_rows, message", [
    (None, [_row("cupy")], "no dwops.kernels.numba_cuda.compile_report"),
    ([_row("numba")], "no-function", "no dwops.kernels.cupy_compile.compile_report"),
    ([_row("numba")], RuntimeError("nvrtc failed"), "raised RuntimeError: nvrtc failed"),
    ([], [_row("cupy")], "reported no kernels"),
])
def test_kernels_missing_or_raising_report_fails(monkeypatch, capsys, numba_rows, cupy_rows,
                                                 message):
    _fake(monkeypatch, numba_rows, cupy_rows)
    assert main(["kernels", "--arch", "sm_90"]) == 1
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------- bench

TINY = ["--batch", "2", "--max-size", "9", "--target-ms", "5", "--copy-mb", "8", "--quiet"]


def test_bench_default_tiny_numpy(tmp_path, capsys):
    path = tmp_path / "r.json"
    rc = main(["bench", "--backend", "numpy", "--baselines", "torch,dense3x3", "--json",
               str(path), *TINY])
    out = capsys.readouterr().out
    assert rc == 0, out
    result = json.loads(path.read_text())
    assert report.validate(result) == []
    ops = {(r["op"], r["layout"]) for r in result["rows"]}
    assert ops == {(op, lay) for op in ("block", "depthwise") for lay in ("NCHW", "NHWC")}
    assert {r["backend"] for r in result["rows"]} == {"numpy"}
    # The numpy backend is dwops.reference rounded once to float32; the gate compares it with the
    # same computation unrounded (float64 inputs): an error of rounding, no more, and not none.
    assert all(0.0 < r["max_rel_err"] <= 2.0**-24 for r in result["rows"]), result["rows"]
    assert "| default | block | forward | 2x64x9x9 k3 | float32 | NCHW | numpy |" in out


@pytest.mark.skipif(not dwops.backend_available("cpu"), reason="the cpu backend is unavailable")
def test_bench_cpu_suite_tiny(tmp_path, capsys):
    rc = main(["bench", "--suite", "cpu", "--out", str(tmp_path), "--baselines", "torch", *TINY])
    out = capsys.readouterr().out
    assert rc == 0, out
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".md")
    result = json.loads((tmp_path / files[0]).read_text())
    assert report.validate(result) == []
    rows = result["rows"]
    assert {r["backend"] for r in rows} == {"cpu"}
    assert {r["direction"] for r in rows} == {"forward", "grad_input", "grad_weight"}
    assert {r["op"] for r in rows} == {"block", "block_unfused", "depthwise", "pointwise"}
    for r in rows:
        assert r["max_rel_err"] <= workloads.TOLERANCE[r["dtype"]], r
    with_torch = [r for r in rows if "torch" in r["baselines"]]
    if importlib.util.find_spec("torch") is not None:
        assert len(with_torch) == len(rows)
    for r in with_torch:
        assert r["speedup_vs_torch"] == pytest.approx(r["baselines"]["torch"] / r["ms"])


def test_bench_default_picks_the_registry_host_backend(monkeypatch, capsys):
    """Without --backend, a host run uses the registry's host default."""
    from dwops import _registry

    seen = {}
    real_run = __import__("dwops.bench.runner", fromlist=["run"]).run

    def spy(cases, device, opts, **kw):
        seen["backends"] = opts.backends
        return real_run(cases[:1], device, opts, **kw)

    monkeypatch.setattr("dwops.bench.runner.run", spy)
    rc = main(["bench", "--baselines", "none", "--layout", "NCHW", *TINY])
    assert rc == 0
    want = _registry._HOST_DEFAULT if _registry.available(_registry._HOST_DEFAULT) else "numpy"
    assert seen["backends"] == [want]


def test_bench_wrong_result_fails(monkeypatch, capsys):
    real = workloads.Instance.reference

    def off_by_half(self, direction):
        want, scale = real(self, direction)
        return want + 0.5, scale

    monkeypatch.setattr(workloads.Instance, "reference", off_by_half)
    rc = main(["bench", "--backend", "numpy", "--baselines", "none", "--layout", "NCHW", *TINY])
    out = capsys.readouterr().out
    assert rc == 1
    assert "FAILED: default/block forward" in out and "exceeds the float32 tolerance" in out


def test_bench_backend_error_fails(capsys):
    rc = main(["bench", "--backend", "nosuch", "--baselines", "none", "--layout", "NCHW", *TINY])
    out = capsys.readouterr().out
    assert rc == 1
    assert "ValueError" in out and "backend must be one of" in out


def test_bench_unknown_suite(capsys):
    assert main(["bench", "--suite", "nosuch"]) == 2
    assert "unknown suite 'nosuch'" in capsys.readouterr().err


def test_kernels_quick_is_passed_where_offered(monkeypatch, capsys):
    seen = {}
    _fake(monkeypatch, [], [])  # the fake sass module; the report modules follow
    for name in (NUMBA_MOD, CUPY_MOD):
        mod = types.ModuleType(name)
        if name == NUMBA_MOD:
            def compile_report(arch, quick=False):
                seen["numba"] = quick
                return [_row("numba")]
        else:
            def compile_report(arch):
                seen["cupy"] = "called"
                return [_row("cupy")]
        mod.compile_report = compile_report
        monkeypatch.setitem(sys.modules, name, mod)
    assert main(["kernels", "--quick"]) == 0
    assert seen == {"numba": True, "cupy": "called"}
