"""The benchmark machinery on the host: cases and bytes, checks, timing loops, JSON and tables.

No timing is asserted here (performance lives in the benchmarks, never in tests); what is checked is
that the numbers are computed from the right quantities and the files have the documented schema.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dwops
from dwops.bench import cases, devices, report, runner, workloads
from dwops.bench.cases import Case

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- cases


def test_bytes_and_geometry():
    dw = Case("t", "depthwise", 2, 5, 9, 7, 3, 2, None, "float32", cases.DIRECTIONS)
    assert (dw.OH, dw.OW) == (5, 4)
    assert dw.nbytes("forward") == 4 * (2 * 5 * 9 * 7 + 5 * 9 + 2 * 5 * 5 * 4)
    assert dw.nbytes("grad_weight") == dw.nbytes("forward")
    pw = Case("t", "pointwise", 2, 6, 4, 4, 1, 1, 10, "bfloat16")
    assert pw.nbytes("forward") == 2 * (2 * 6 * 16 + 60 + 2 * 10 * 16)
    blk = Case("t", "block", 3, 64, 8, 8, 3, 1, 64, "float16")
    x = 3 * 64 * 64
    assert blk.nbytes("forward") == 2 * (x + 64 * 9 + 64 * 64 + 64 + x)  # x read once, y written
    assert blk.shape() == {"N": 3, "C": 64, "H": 8, "W": 8, "KH": 3, "KW": 3, "stride": 1,
                           "padding": 1, "C_out": 64}


def test_suites_cover_the_issue():
    gpu = cases.suite("gpu", on_gpu=True)
    assert [c.dtype for c in gpu] == sorted((c.dtype for c in gpu),
                                            key=cases.DTYPES.index)  # float32 first
    f32 = [c for c in gpu if c.dtype == "float32"]
    by = lambda s: [c for c in f32 if c.suite == s]  # noqa: E731
    assert len(by("mobilenetv2")) == 10 and len(by("efficientnet_b0")) == 12
    assert {(c.H, c.K) for c in by("convnext")} == {(56, 7), (28, 7), (14, 7)}
    assert {(c.N, c.C, c.H, c.K) for c in by("replknet")} == {
        (64, 384, r, k) for r in (16, 32) for k in (7, 13, 31)}
    assert {(c.op, c.H) for c in by("block")} == {
        (op, h) for op in ("block", "block_unfused") for h in (112, 56)}
    assert all(c.N == 64 for c in f32 if c.op != "conv1d")
    assert {(c.C, c.L, c.K) for c in by("conv1d")} == {
        (2048, 2048, 4), (4096, 4096, 4), (8192, 8192, 4), (12288, 16384, 4)}
    assert all(c.directions == cases.DIRECTIONS for c in f32 if c.op == "depthwise")
    assert {c.dtype for c in gpu} == set(cases.DTYPES)
    # every shape is a valid problem for the validation layer, with the expected output size
    from dwops import _spec

    for c in f32:
        if c.op == "depthwise":
            x = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), (c.N, c.C, c.H, c.W),
                                                (0, 0, 0, 0))
            w = np.zeros((c.C, 1, c.K, c.K), np.float32)
            p, _ = _spec.depthwise("t", x, w, None, c.stride, c.padding, 1, "NCHW", None)
            assert (p.OH, p.OW) == (c.OH, c.OW)


def test_default_suite_sizes():
    host, gpu = cases.default_suite(False), cases.default_suite(True)
    assert {(c.op, c.N, c.C, c.H) for c in host} == {("block", 16, 64, 56), ("depthwise", 16, 64, 56)}
    assert all(c.N == 64 and c.H == 112 for c in gpu)
    assert cases.suite("default", False, ["float16", "float32"])[0].dtype == "float16"


# ----------------------------------------------------------------------------- checks


def test_rel_err():
    e = np.array([1.0, -2.0, 4.0])
    assert workloads.rel_err(e, e) == 0.0
    assert workloads.rel_err(e + [0, 0, 0.4], e) == pytest.approx(0.1)
    assert workloads.rel_err([np.nan, 1, 1], [1.0, 1, 1]) == np.inf
    assert workloads.rel_err([np.nan, 1, 1], [np.nan, 1, 1]) == 0.0
    with pytest.raises(ValueError):
        workloads.rel_err(e[:2], e)


HOST_BACKENDS = ["numpy"] + (["cpu"] if dwops.backend_available("cpu") else [])


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("case", [
    Case("t", "depthwise", 3, 5, 9, 7, 3, 2, None, "float32", cases.DIRECTIONS),
    Case("t", "depthwise", 2, 4, 6, 6, 5, 1, None, "float64", cases.DIRECTIONS),
    Case("t", "pointwise", 3, 6, 5, 4, 1, 1, 7, "float32"),
    Case("t", "block", 2, 8, 7, 5, 3, 1, 8, "float32"),
    Case("t", "block_unfused", 2, 8, 7, 5, 3, 1, 8, "float32"),
    Case("t", "conv1d", 3, 6, 1, 37, 4, 1, None, "float32", ("forward", "backward")),
    Case("t", "conv1d", 2, 5, 1, 20, 3, 1, None, "bfloat16", ("forward", "backward")),
])
def test_instance_check_passes_on_host_backends(case, backend):
    inst = workloads.Instance(case, devices.HostDevice(), seed=3)
    for d in case.directions:
        for layout in cases.LAYOUTS:
            v = inst.check(d, layout, backend)
            assert v.problem is None and v.max_rel_err <= workloads.TOLERANCE[case.dtype], \
                (d, layout, v)


def test_conv1d_case_bytes_shape_and_suite():
    c = Case("t", "conv1d", 2, 6, 1, 100, 4, 1, None, "bfloat16", ("forward", "backward"))
    assert (c.L, c.OH, c.OW, c.layout_name("NHWC")) == (100, 1, 100, "NLC")
    params = 6 * 4 + 6
    assert c.nbytes("forward") == 2 * (2 * 2 * 6 * 100 + params)  # x, w, b read; y written
    assert c.nbytes("backward") == 2 * (3 * 2 * 6 * 100 + 2 * params)  # x, gy -> gx, gw, gb
    assert c.shape() == {"N": 2, "C": 6, "L": 100, "K": 4, "stride": 1, "padding": "causal",
                         "C_out": 6}
    host = cases.suite("conv1d", on_gpu=False)
    assert {c.dtype for c in host} == {"float32", "bfloat16"}
    assert all(c.directions == ("forward", "backward") for c in host)
    assert c.scaled(max_size=8).L == 64


def test_conv1d_check_catches_a_wrong_gradient(monkeypatch):
    case = Case("t", "conv1d", 3, 4, 1, 16, 4, 1, None, "float32", ("forward", "backward"))
    inst = workloads.Instance(case, devices.HostDevice(), seed=1)
    real = inst.dwops_fn

    def wrong_weight_gradient(direction, layout, backend):
        fn = real(direction, layout, backend)
        if direction != "backward":
            return fn
        return lambda: tuple(g + 0.25 if k == 1 else g for k, g in enumerate(fn()))

    monkeypatch.setattr(inst, "dwops_fn", wrong_weight_gradient)
    bad = inst.check("backward", "NCHW", "numpy")
    assert bad.max_rel_err > workloads.TOLERANCE["float32"]
    assert bad.problem.startswith("grad_weight: 16 of 16 elements outside"), bad.problem
    assert inst.check("forward", "NCHW", "numpy").problem is None


def test_instance_check_catches_a_wrong_result(monkeypatch):
    case = Case("t", "depthwise", 3, 4, 6, 6, 3, 1, None, "float32", cases.DIRECTIONS)
    inst = workloads.Instance(case, devices.HostDevice(), seed=1)
    real = inst.dwops_fn

    def last_image_shifted(direction, layout, backend):
        fn = real(direction, layout, backend)

        def wrong():
            out = np.array(fn())
            out[-1] += 0.25  # an error confined to the last image (or the last weight row)
            return out
        return wrong

    monkeypatch.setattr(inst, "dwops_fn", last_image_shifted)
    for d in cases.DIRECTIONS:
        v = inst.check(d, "NHWC", "numpy")
        assert v.max_rel_err > workloads.TOLERANCE["float32"] and "exceeds" in v.problem, d


def test_check_reference_and_scales_match_the_loop_oracle():
    """The gate's reference (values and per-element scales) is the loop oracle's, on tiny cases."""
    from tests import oracle
    from tests.conftest import assert_close

    dev = devices.HostDevice()
    c = Case("t", "depthwise", 2, 3, 5, 6, 3, 2, None, "float32", cases.DIRECTIONS)
    inst = workloads.Instance(c, dev, seed=5)
    x, w, gy = (inst.host(k).astype(np.float64) for k in ("x", "w", "gy"))
    geo = ((2, 2), (1, 1), (1, 1, 1, 1))
    for d, fn in (("forward", lambda x, w, gy: oracle.depthwise(x, w, None, *geo)),
                  ("grad_input",
                   lambda x, w, gy: oracle.depthwise_grad_input(gy, w, x.shape, *geo)),
                  ("grad_weight",
                   lambda x, w, gy: oracle.depthwise_grad_weight(x, gy, w.shape, *geo))):
        want, scale = inst.reference(d)
        assert_close(want, fn(x, w, gy), "float64", what=d)
        assert_close(scale, fn(abs(x), abs(w), abs(gy)), "float64", what=d)
    c = Case("t", "block", 2, 3, 4, 5, 3, 1, 3, "float32")
    inst = workloads.Instance(c, dev, seed=6)
    x, dw, pw, b = (inst.host(k).astype(np.float64) for k in ("x", "dw_w", "pw_w", "b"))
    want, scale = inst.reference("forward")
    one = ((1, 1), (1, 1), (1, 1, 1, 1))
    assert_close(want, oracle.pointwise(oracle.depthwise(x, dw, None, *one, "relu"), pw, b,
                                        residual=x), "float64")
    assert_close(scale, oracle.pointwise(oracle.depthwise(abs(x), abs(dw), None, *one), abs(pw),
                                         abs(b), residual=abs(x)), "float64")
    c = Case("t", "conv1d", 2, 3, 1, 9, 4, 1, None, "bfloat16", ("forward", "backward"))
    inst = workloads.Instance(c, dev, seed=7)
    x, w, b = (inst.host(k).astype(np.float64) for k in ("x", "w", "b"))
    want, scale = inst.reference("forward")
    assert_close(want, oracle.depthwise_1d(x, w, b, 1, 1, (3, 0), "silu"), "float64")
    assert_close(scale, oracle.depthwise_1d(abs(x), abs(w), abs(b), 1, 1, (3, 0)), "float64")


@pytest.mark.parametrize("direction", cases.DIRECTIONS)
def test_check_catches_one_wrong_element_of_a_large_result(monkeypatch, direction):
    """One element of the timed result off by 3x its bound, in a middle image (or a middle channel
    of the weight gradient), at the element with the smallest scale: the gate names it. For
    forward and grad_input the error is below tolerance x max |reference|, so only the elementwise
    bound sees it."""
    case = Case("t", "depthwise", 8, 16, 24, 24, 3, 1, None, "float32", cases.DIRECTIONS)
    inst = workloads.Instance(case, devices.HostDevice(), seed=2)
    tol = workloads.TOLERANCE["float32"]
    want, scale = inst.reference(direction)
    if direction == "grad_weight":
        plane = (8, 0)  # channel 8 of (C, 1, K, K)
    else:
        plane = (4, 8)  # image 4 of 8, channel 8
    k = np.unravel_index(np.argmin(scale[plane]), scale[plane].shape)
    at = plane + tuple(int(i) for i in k)
    delta = 3 * tol * scale[at]
    if direction != "grad_weight":
        assert delta < tol * np.abs(want).max()  # the normwise bound alone would pass it
    real = inst.dwops_fn

    def one_element_off(d, layout, backend):
        fn = real(d, layout, backend)

        def wrong():
            out = np.array(fn())
            phys = at if d == "grad_weight" else (at[0], at[2], at[3], at[1])  # NHWC
            out[phys] += delta
            return out
        return wrong

    monkeypatch.setattr(inst, "dwops_fn", one_element_off)
    v = inst.check(direction, "NHWC", "numpy")
    assert v.problem is not None, v
    assert v.problem.startswith(f"1 of {want.size} elements outside"), v.problem
    assert f"worst at {at}:" in v.problem, v.problem
    if direction != "grad_weight":
        assert v.max_rel_err <= tol


def test_check_catches_a_weight_gradient_that_drops_an_image(monkeypatch):
    """The weight gradient is checked on the batch it is timed on: one that sums all images but
    the last (right on any two-image copy of the problem) fails."""
    case = Case("t", "depthwise", 6, 4, 7, 7, 3, 1, None, "float32", cases.DIRECTIONS)
    inst = workloads.Instance(case, devices.HostDevice(), seed=4)
    x, gy, w = inst.arrays["x"], inst.arrays["gy"], inst.arrays["w"]
    monkeypatch.setattr(inst, "dwops_fn", lambda d, layout, backend: lambda: (
        dwops.depthwise_conv2d_grad_weight(x[:-1], gy[:-1], w.shape, padding=1,
                                           backend="numpy")))
    v = inst.check("grad_weight", "NCHW", "numpy")
    assert v.problem is not None and "elements outside" in v.problem, v


def test_inputs_are_random_and_shared_across_layouts():
    case = Case("t", "depthwise", 2, 3, 5, 4, 3, 1, None, "bfloat16", cases.DIRECTIONS)
    inst = workloads.Instance(case, devices.HostDevice(), seed=0)
    x = inst.arrays["x"]
    assert str(x.dtype) == "bfloat16" and np.count_nonzero(x.astype(np.float32)) == x.size
    np.testing.assert_array_equal(inst.phys("x", "NHWC"), x.transpose(0, 2, 3, 1))
    assert inst.phys("x", "NHWC").flags.c_contiguous
    assert not np.array_equal(inst.arrays["gy"].astype(np.float32)[..., :4, :4].ravel()[:9],
                              x.astype(np.float32)[..., :3, :3].ravel()[:9])


@pytest.mark.parametrize("layout", cases.LAYOUTS)
def test_baselines_compute_the_same_function(layout):
    """PyTorch baselines and the NumPy dense path are timed on the same problem as dwops."""
    torch = pytest.importorskip("torch")
    case = Case("t", "depthwise", 2, 64, 6, 5, 3, 1, None, "float32", cases.DIRECTIONS)
    inst = workloads.Instance(case, devices.HostDevice(), seed=2)
    to_nchw = (lambda a: a) if layout == "NCHW" else (lambda a: a.transpose(0, 3, 1, 2))
    fwd = inst.baseline_fn("torch", "forward", layout)().numpy()
    np.testing.assert_allclose(fwd, to_nchw(inst.dwops_fn("forward", layout, "numpy")()),
                               rtol=1e-5, atol=1e-5)
    gx = inst.baseline_fn("torch", "grad_input", layout)()[0].numpy()
    np.testing.assert_allclose(gx, to_nchw(inst.dwops_fn("grad_input", layout, "numpy")()),
                               rtol=1e-5, atol=1e-5)
    gw = inst.baseline_fn("torch", "grad_weight", layout)()[1].numpy()
    np.testing.assert_allclose(gw, inst.dwops_fn("grad_weight", layout, "numpy")(), rtol=1e-4,
                               atol=1e-4)
    blk = Case("t", "block", 2, 64, 6, 5, 3, 1, 64, "float32")
    bi = workloads.Instance(blk, devices.HostDevice(), seed=4)
    np.testing.assert_allclose(bi.baseline_fn("torch", "forward", layout)().numpy(),
                               to_nchw(bi.dwops_fn("forward", layout, "numpy")()),
                               rtol=1e-4, atol=1e-4)
    assert inst.baseline_fn("dense3x3", "forward", layout)().shape == (2, 64, 6, 5)
    assert inst.baseline_fn("dense3x3", "grad_input", layout) is None
    assert inst.baseline_fn("torch_compile", "forward", layout) is None  # block cases only
    del torch


def test_numpy_dense_is_a_dense_convolution():
    torch = pytest.importorskip("torch")
    case = Case("t", "depthwise", 2, 4, 7, 6, 3, 2, None, "float64")
    x = np.random.default_rng(0).uniform(-1, 1, (2, 4, 7, 6))
    got = workloads._numpy_dense(x, case)()  # (N, OH, OW, C)
    wd = np.random.default_rng(7).uniform(-1, 1, (4 * 9, 4)).astype(np.float64)
    w = torch.from_numpy(wd.T.reshape(4, 4, 3, 3).copy())
    want = torch.nn.functional.conv2d(torch.from_numpy(x), w, None, 2, 1).numpy()
    np.testing.assert_allclose(got.transpose(0, 3, 1, 2), want, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- timing loops


def test_host_timing_and_copy_bandwidth():
    dev = devices.HostDevice()
    calls = []
    times = dev.time(lambda: calls.append(1), warmup=2, min_iters=4, max_iters=6, target_s=1e-9)
    assert len(times) == 4 and all(t >= 0 for t in times)
    assert len(calls) == 2 + 1 + 4  # warm-up, estimate, timed
    assert devices.plan_iterations(0.01, 1.0, 3, 30) == 30
    assert devices.plan_iterations(1.0, 0.1, 3, 30) == 3
    assert dev.copy_bandwidth_gbs(8 * 1024**2) > 0


class _FakeEvent:
    def __init__(self, clock):
        self.clock, self.t = clock, None


class _FakeCuda(devices._CudaDevice):
    """The GPU timing loop with a host clock standing in for CUDA events."""

    name, lib, l2_bytes = "fake", "fake", 1024

    def __init__(self, dry_batches):
        self.driver, self._dry_warned = None, False
        self.dry_batches, self.spins, self.now = dry_batches, [], 0.0

    def synchronize(self):
        pass

    def flush(self):
        self.now += 1.0

    def _event(self, timing=True):
        return _FakeEvent(self)

    def _record(self, ev):
        ev.t = self.now

    def _done(self, ev):
        if self.dry_batches:
            self.dry_batches -= 1
            return True
        return False

    def _elapsed_ms(self, s, e):
        return e.t - s.t

    def _spin(self, cycles):
        self.spins.append(cycles)


def test_gpu_timing_loop_lengthens_the_spin_when_the_host_falls_behind(capsys):
    dev = _FakeCuda(dry_batches=2)

    def work():
        dev.now += 0.5

    times = dev.time(work, warmup=1, min_iters=3, max_iters=3, target_s=1.0)
    assert times == [0.5, 0.5, 0.5]  # flushes stay outside the events
    cap = int(devices.MAX_SPIN_S * devices.SPIN_HZ)
    assert len(dev.spins) == 3  # two batches ran dry, the third did not
    assert dev.spins[1] == pytest.approx(min(4 * dev.spins[0], cap), rel=1e-6)
    dev = _FakeCuda(dry_batches=100)
    dev.time(work, warmup=1, min_iters=2, max_iters=2, target_s=1.0)
    assert dev.spins[-1] == int(devices.MAX_SPIN_S * devices.SPIN_HZ)
    assert "could not stay ahead of the GPU" in capsys.readouterr().err


# ----------------------------------------------------------------------------- runs and files


def _tiny_run(backends=("numpy",), baselines=("torch",), budget=None):
    cs = [Case("t", "depthwise", 2, 6, 7, 7, 3, 1, None, "float32", cases.DIRECTIONS),
          Case("t", "block", 2, 8, 6, 6, 3, 1, 8, "float32")]
    opts = runner.Options(backends=list(backends), baselines=baselines, budget_s=budget,
                          min_iters=3, max_iters=3, target_s=1e-3, copy_bytes=8 * 1024**2)
    return runner.run(cs, devices.HostDevice(), opts, progress=False)


def test_run_json_schema_and_derived_numbers(tmp_path):
    out = _tiny_run()
    res = out.result
    assert out.failures == [] and out.skipped == 0
    assert report.validate(res) == []
    assert len(res["rows"]) == (3 + 1) * 2
    assert res["driver"] is None and res["versions"]["numpy"] == np.__version__
    bw = res["copy_bandwidth_gbs"]
    for r in res["rows"]:
        assert r["roofline_fraction"] == pytest.approx(r["bytes"] / (bw * 1e9) / (r["ms"] * 1e-3),
                                                       rel=1e-6)
        if "torch" in r["baselines"]:
            assert r["speedup_vs_torch"] == pytest.approx(r["baselines"]["torch"] / r["ms"])
        else:
            assert r["speedup_vs_torch"] is None
    path = tmp_path / (report.file_stem(res) + ".json")
    report.write_json(res, path)
    assert json.loads(path.read_text()) == res
    md = report.markdown(res)
    assert md.count("\n| t |") == len(res["rows"])


def test_schema_validator_rejects_departures():
    res = _tiny_run(baselines=()).result
    bad = json.loads(json.dumps(res))
    bad["rows"][0]["extra"] = 1
    del bad["rows"][1]["max_rel_err"]
    bad["note"] = "x"
    problems = report.validate(bad)
    assert len(problems) == 3


def test_budget_skips_rows_and_says_so():
    out = _tiny_run(budget=0.0)
    assert out.skipped == 8 and out.result["rows"] == []
    assert any("time budget" in n for n in out.notes)


def test_file_stem():
    stem = report.file_stem({"date": "2026-11-28T20:31:05+00:00", "device": "NVIDIA H200"})
    assert stem == "2026-11-28T2031Z-NVIDIA-H200"


def test_progress_lines_when_not_a_terminal():
    import io

    s = io.StringIO()
    p = report.Progress(4, stream=s)
    p.step("a")
    p.step("b")
    p.note("hello")
    lines = s.getvalue().splitlines()
    assert lines[0].startswith("[######" + "." * 18 + "] 1/4") and lines[0].endswith(" a")
    assert lines[1].startswith("[" + "#" * 12) and lines[2] == "hello"


def test_plot_script_writes_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    res = _tiny_run().result
    path = tmp_path / "r.json"
    report.write_json(res, path)
    subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "plot.py"), str(path),
                    "--out", str(tmp_path)], check=True, capture_output=True, text=True)
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["r-roofline.png", "r-speedup.png"]
    assert all((tmp_path / p).stat().st_size > 1000 for p in pngs)


@pytest.mark.parametrize("path", sorted(Path(REPO, "benchmarks", "results").glob("*.json")),
                         ids=lambda p: p.name)
def test_committed_results_validate_and_plot(path, tmp_path):
    """The docs' performance page renders every committed run: the schema holds and both plots draw
    (rows of every op, the 1-d ones included)."""
    pytest.importorskip("matplotlib")
    run = json.loads(path.read_text())
    assert report.validate(run) == []
    assert report.markdown(run)
    done = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "plot.py"), str(path),
                           "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(list(tmp_path.glob("*.png"))) == 2


def test_sanitizer_subset_cases_are_right_on_the_host():
    """The GPU sanitizer script's cases and references agree on a host backend (so a failure on the
    GPU is the GPU backend's)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "sanitize_subset", os.path.join(REPO, "scripts", "sanitize_subset.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    # On the numpy backend (dwops.reference, the script's own reference) this would hold by
    # construction: the cpu backend where it is built.
    for dtype, layout, backend in (("float32", "NHWC", HOST_BACKENDS[-1]),
                                   ("float16", "NCHW", HOST_BACKENDS[-1])):
        ran = 0
        for name, call, want in mod.cases(np.random.default_rng(0), dtype, layout):
            assert mod.rel_err(call(backend), want) <= mod.TOL[dtype], (name, dtype, layout)
            ran += 1
        assert ran == 3 * 3 + 2 * 3 + 2 + (6 + 4 + 6)  # ..., conv1d: causal 6, "same" 4
    assert mod.main(["--backend", "cupy", "--quick"]) == (0 if dwops.backend_available("cupy") else 1)
