"""The kernel model (dwops.model.predict, ``python -m dwops model``): its scaling premise, its
bounds by hand, its JSON rows, and one row end to end (emulator trace + machine code)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from dwops.bench import cases, report
from dwops.kernels.cupy_plans import Launch
from dwops.model import devices, predict

H200 = devices.device("h200")


# The plan checks run in a fresh process with the emulator's stand-in installed as ``cupy`` before
# dwops imports it (as ``python -m dwops model`` does): a test process may hold the real CuPy.
PLAN_CHECK = r"""
import sys
from dataclasses import replace
from dwops import cudaemu
cudaemu.install()
from dwops.bench import cases
from dwops.model import predict

def plan(c, d, layout):
    return [(lc.name, lc.block, lc.shared) for lc in predict.plan(c, d, layout)]

if sys.argv[1] == "sample":
    # one case per (suite, op, dtype, kernel size, stride), its directions, both layouts
    seen, n = set(), 0
    for s in cases.GPU_SUITES:
        for c in cases.suite(s, on_gpu=True, dtypes=["float32", "bfloat16"]):
            key = (s, c.op, c.dtype, c.K, c.stride)
            if key in seen:
                continue
            seen.add(key)
            for d in c.directions:
                for layout in ("NCHW", "NHWC"):
                    small, factor = predict.scaled_case(c, layout)
                    assert plan(small, d, layout) == plan(c, d, layout), (c, d, layout, small)
                    assert factor >= 1
                    n += 1
    assert n > 40, n
    print("checked", n)
elif sys.argv[1] == "sampling":
    # a traced launch of 98 blocks, whole and sampled (64 blocks): the scaled sums against the
    # whole launch's
    c = cases.suite("mobilenetv2", True, ["float32"])[0]
    small, _ = predict.scaled_case(c, "NHWC")
    (whole,) = predict.trace(small, "forward", "NHWC", max_blocks=None)
    (part,) = predict.trace(small, "forward", "NHWC", max_blocks=64)
    assert (whole.blocks, whole.blocks_run, part.blocks_run) == (98, 98, 64), (whole, part)
    for k in ("global_load_requests", "global_load_sectors", "global_store_requests",
              "shared_load_wavefronts", "l2_read_bytes", "barriers", "dram_write_bytes"):
        err = part.counters[k] / whole.counters[k] - 1
        assert abs(err) <= 0.02, (k, part.counters[k], whole.counters[k])
    # distinct bytes read: each window's two ends carry a halo its neighbours would share
    err = part.counters["dram_read_bytes"] / whole.counters["dram_read_bytes"] - 1
    assert 0 <= err <= 0.12, err
    print("sampled within bounds")
else:
    # NHWC plans pick their block shape from the channel count: fewer channels, another plan
    c = replace(cases.suite("convnext", True, ["bfloat16"])[1], directions=("forward",))
    assert plan(replace(c, N=1, C=96), "forward", "NHWC") != plan(c, "forward", "NHWC")
    print("differs")
"""


def _plan_check(which: str) -> str:
    proc = subprocess.run([sys.executable, "-c", PLAN_CHECK, which], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_sampled_trace_matches_the_whole_launch():
    """Block sampling (four windows of 16 blocks of a 98-block launch): requests, sectors,
    wavefronts, L2 bytes and barriers within 2% of the whole launch's, distinct DRAM reads
    over by at most 12% (the halo at each window's ends; 8.7% here)."""
    assert "sampled within bounds" in _plan_check("sampling")


def test_scaled_problem_runs_the_rows_plan():
    """The premise of the extrapolation: the small problem traced for a row launches the row's
    kernels in the same order with the same blocks and shared memory (the same tile plan, fewer
    tiles). Checked on every kernel family, size and stride of the suites."""
    assert "checked" in _plan_check("sample")


def test_a_plan_that_depends_on_the_channels_is_caught():
    """The check above can fail: NHWC plans pick their block shape from the channel count, so a
    small problem with fewer channels runs another plan."""
    assert "differs" in _plan_check("channels")


def _launch(blocks=1056, threads=256, shared=0):
    return Launch("depthwise", "k", (blocks, 1, 1), (threads, 1, 1), shared)


def test_launch_bounds_by_hand():
    """Each bound from counters chosen by hand, on the H200's table."""
    c = {"dram_read_bytes": 2.15e9, "dram_write_bytes": 2.15e9, "l2_read_bytes": 7e9,
         "shared_load_wavefronts": 0, "load_bytes_in_flight_per_warp": 64.0,
         "global_load_requests": 1e6}
    facts = {"registers": 32, "static_smem": 0, "loop_counts": {"FFMA": 2, "LDS.32": 2,
                                                                 "INT": 4, "total": 8}}
    m = predict.model_launch(H200, _launch(), c, facts, flops=0.0)
    assert m.blocks_per_sm == 8 and m.busy_fraction == 1.0
    assert m.bounds["dram"] == pytest.approx(1e-3)            # 4.3 GB at 4.3 TB/s
    assert m.bounds["l2"] == pytest.approx(1e-3)              # 7 GB at 7 TB/s
    # 132 SMs x 8 blocks x 8 warps x 64 B in flight, 600 ns latency: 2.4 ms, over the 1 ms of dram
    assert m.bounds["latency"] == pytest.approx(2.15e9 * 600e-9 / (132 * 64 * 64))
    assert m.bounds["issue"] == pytest.approx(1e6 * 2 / H200.issue_per_s)  # 8 / 4 per useful
    assert m.bound == "latency" and m.seconds == pytest.approx(m.bounds["latency"] + H200.launch_s)
    # a grid of 13 blocks keeps a tenth of the SMs working: throughput bounds grow tenfold
    small = predict.model_launch(H200, _launch(blocks=13), {"shared_load_wavefronts": 1e6},
                                 facts)
    assert small.bounds["smem"] == pytest.approx(1e6 / H200.smem_wavefronts_per_s * 132 / 13)
    assert small.bound == "smem"


def test_instruction_ratio():
    assert predict.instruction_ratio(None) == predict.DEFAULT_OVERHEAD
    staging = {"loop_counts": {"LDG.128": 1, "STS": 4, "INT": 20, "total": 25}}
    assert predict.instruction_ratio(staging) == predict.DEFAULT_OVERHEAD
    compute = {"loop_counts": {"FFMA": 8, "LDS": 4, "INT": 12, "total": 24}}
    assert predict.instruction_ratio(compute) == 2.0


def _row(case, model_ms):
    r = dict.fromkeys(report.ROW_KEYS + report.MODEL_KEYS)
    r.update(op=case.op, direction="forward", suite=case.suite, shape=case.shape(),
             dtype=case.dtype, layout="NCHW", backend="cupy", bytes=case.nbytes("forward"),
             baselines={}, model_ms=model_ms, model_floor_fraction=0.5, model_bound="dram")
    return r


def test_model_rows_validate_and_join_bench_rows():
    c = cases.suite("block", True, ["float32"])[0]
    model = {"device": "model: x", "driver": None, "date": "2026", "versions": {},
             "copy_bandwidth_gbs": 4300.0, "rows": [_row(c, 0.25)]}
    assert report.validate(model) == []
    bad = json.loads(json.dumps(model))
    bad["rows"][0]["ms"] = 0.2   # a model row must not carry a measurement
    assert report.validate(bad) != []
    bench_row = {k: v for k, v in _row(c, None).items() if k in report.ROW_KEYS}
    bench_row.update(ms=0.5, roofline_fraction=0.4)
    other = dict(bench_row, dtype="bfloat16")
    bench = dict(model, device="gpu", rows=[bench_row, other])
    assert report.attach_model(bench, model) == 1
    assert bench["rows"][0]["model_ms"] == 0.25 and bench["rows"][1]["model_ms"] is None
    assert report.validate(bench) == []
    assert "model ms" in report.markdown(bench)


def test_model_summary_groups_rows_and_counts_bounds():
    c = cases.suite("block", True, ["float32"])[0]
    rows = [dict(_row(c, 0.25), model_floor_fraction=f, model_bound=b)
            for f, b in ((0.5, "dram"), (0.2, "issue"), (0.9, "dram"))]
    rows.append(dict(_row(c, 0.25), layout="NHWC", model_floor_fraction=0.3, model_bound="smem"))
    text = report.model_summary_markdown({"device": "model: x", "date": "2026", "rows": rows})
    table = [ln for ln in text.splitlines() if ln.startswith(f"| {c.suite} ")]
    assert len(table) == 2
    assert table[0].endswith("| 3 | 50% (20%-90%) | dram 2, issue 1 |")
    assert table[1].endswith("| NHWC | 1 | 30% (30%-30%) | smem 1 |")
    assert "4 rows" in text and "prediction" in text


@pytest.mark.skipif(shutil.which("g++") is None, reason="the CUDA emulator needs g++")
def test_model_cli_end_to_end(tmp_path):
    """Two rows through the whole model in a fresh process: trace, machine code, bounds."""
    pytest.importorskip("cuda.bindings", reason="the machine code needs the cuda13 extra")
    from dwops.model.sass import nvdisasm

    try:
        nvdisasm()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    out = tmp_path / "m.json"
    proc = subprocess.run([sys.executable, "-m", "dwops", "model", "--suite", "mobilenetv2",
                           "--dtype", "float32", "--layout", "NCHW", "--limit", "2", "--quiet",
                           "--json", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert report.validate(result) == []
    assert [r["direction"] for r in result["rows"]] == ["forward", "grad_input"]
    for r in result["rows"]:
        assert 0 < r["model_floor_fraction"] <= 1.0
        assert r["model_bound"] in ("dram", "latency", "l2", "smem", "issue", "fma")
        assert r["coalescing"] > 0.9
    assert "model floor" in proc.stdout
