"""The benchmark loop: cases x directions x layouts x backends, with baselines, checks and a budget.

For each row: the dwops call is checked, its whole result element by element, against the reference
of the same problem (this first call also compiles; see :mod:`dwops.bench.workloads`),
timed (median of the device's timer; see :mod:`dwops.bench.devices`), then each baseline of the same
case, direction and layout is timed once and shared by every backend's row. A time budget, when
given, is checked before each row; rows past it are skipped and counted.
"""

from __future__ import annotations

import datetime
import gc
import statistics
import time
import traceback
from dataclasses import dataclass, field

from . import env
from .report import Progress
from .workloads import Instance, jax_ready, jax_time

# torch.compile needs tens of seconds per shape: with a budget, start one only if this much is left.
COMPILE_RESERVE_S = 120.0


@dataclass
class Options:
    backends: list
    layouts: tuple = ("NCHW", "NHWC")
    baselines: tuple = ("torch",)
    budget_s: float | None = None
    check: bool = True
    warmup: int | None = None
    min_iters: int | None = None
    max_iters: int | None = None
    target_s: float | None = None
    copy_bytes: int | None = None  # size of the bandwidth-measuring copy (device default if None)

    def timing(self, on_gpu: bool) -> dict:
        base = (dict(warmup=2, min_iters=10, max_iters=50, target_s=0.05) if on_gpu
                else dict(warmup=1, min_iters=3, max_iters=30, target_s=0.3))
        for k in base:
            v = getattr(self, k)
            if v is not None:
                base[k] = v
        return base


@dataclass
class Outcome:
    result: dict
    failures: list = field(default_factory=list)  # dwops errors and wrong results: fail the run
    notes: list = field(default_factory=list)  # baseline errors, skips: reported, not fatal
    skipped: int = 0


def row_label(case, direction, layout, backend) -> str:
    return (f"{case.suite}/{case.op} {direction} {case.shape_str()} {case.dtype} "
            f"{case.layout_name(layout)} "
            f"{backend}")


def run(cases, device, opts: Options, progress: bool = True, stream=None) -> Outcome:
    """Measure every row of ``cases`` on ``device``; a progress bar on ``stream`` (stderr)."""
    t_start = time.monotonic()
    plan = [(c, d, lay, be) for c in cases for d in c.directions for lay in opts.layouts
            for be in opts.backends]
    progress = Progress(len(plan), stream=stream, enabled=progress)
    progress.note(f"measuring {device.name} copy bandwidth ...")
    copy = device.copy_bandwidth_gbs(opts.copy_bytes) if opts.copy_bytes else \
        device.copy_bandwidth_gbs()
    bw = round(copy, 2)  # as recorded, so the JSON's numbers agree
    result = {
        "device": device.name,
        "driver": device.driver,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": env.versions(),
        "copy_bandwidth_gbs": bw,
        "rows": [],
    }
    out = Outcome(result)
    timing = opts.timing(device.on_gpu)
    use_jax = "jax" in opts.baselines and jax_ready(device)
    if "jax" in opts.baselines and not use_jax:
        out.notes.append("jax baseline skipped: JAX has no GPU here" if device.on_gpu
                         else "jax baseline skipped: measured on GPUs only")
    baseline_cache: dict = {}

    def remaining():
        return None if opts.budget_s is None else opts.budget_s - (time.monotonic() - t_start)

    done = 0
    for case in cases:
        rows_of_case = [p for p in plan if p[0] is case]
        if remaining() is not None and remaining() <= 0:
            break
        try:
            inst = Instance(case, device, seed=done + 1)
        except Exception as exc:  # noqa: BLE001 - report and go on to the next case
            for _, d, lay, be in rows_of_case:
                out.failures.append(f"{row_label(case, d, lay, be)}: inputs: {exc!r}")
                progress.step(row_label(case, d, lay, be))
                done += 1
            continue
        for _, direction, layout, backend in rows_of_case:
            if remaining() is not None and remaining() <= 0:
                break
            label = row_label(case, direction, layout, backend)
            row = _measure(inst, direction, layout, backend, bw, timing, opts, baseline_cache,
                           use_jax, remaining, out, label)
            if row is not None:
                result["rows"].append(row)
            progress.step(label)
            done += 1
        del inst
        gc.collect()
    out.skipped = len(plan) - done
    if out.skipped:
        out.notes.append(f"time budget of {opts.budget_s:.0f} s reached: {out.skipped} of "
                         f"{len(plan)} rows skipped")
    progress.close()
    return out


def _measure(inst, direction, layout, backend, bw, timing, opts, cache, use_jax, remaining, out,
             label):
    case, dev = inst.case, inst.dev
    verdict = None
    try:
        if opts.check:
            verdict = inst.check(direction, layout, backend)
        fn = inst.dwops_fn(direction, layout, backend)
        ms = statistics.median(dev.time(fn, **timing))
    except Exception as exc:  # noqa: BLE001 - a dwops error fails the run, with its traceback
        tb = traceback.format_exc(limit=-3).strip().replace("\n", "\n    ")
        out.failures.append(f"{label}: {type(exc).__name__}: {exc}\n    {tb}")
        return None
    if verdict is not None and verdict.problem:
        out.failures.append(f"{label}: {verdict.problem}")
    baselines = {}
    family = "block" if case.op.startswith("block") else case.op
    for name in opts.baselines:
        if name == "jax" and (not use_jax or direction != "forward"):
            continue
        key = (family, case.shape_str(), case.dtype, direction, layout, name)
        if key not in cache:
            cache[key] = _baseline(inst, name, direction, layout, timing, remaining, out, label)
        if cache[key] is not None:
            baselines[name] = cache[key]
    nbytes = case.nbytes(direction)
    torch_ms = baselines.get("torch")
    return {
        "op": case.op,
        "direction": direction,
        "suite": case.suite,
        "shape": case.shape(),
        "dtype": case.dtype,
        "layout": case.layout_name(layout),
        "backend": backend,
        "ms": float(ms),
        "bytes": int(nbytes),
        "roofline_fraction": float(nbytes / (bw * 1e9) / (ms * 1e-3)) if bw > 0 else None,
        "baselines": baselines,
        "speedup_vs_torch": float(torch_ms / ms) if torch_ms else None,
        "max_rel_err": None if verdict is None else float(verdict.max_rel_err),
        "model_ms": None,
    }


def _baseline(inst, name, direction, layout, timing, remaining, out, label):
    """Median ms of baseline ``name`` for this row, or None (not applicable, unavailable, failed)."""
    dev = inst.dev
    try:
        if name == "jax":
            if inst.case.op == "conv1d":
                return None
            return float(jax_time(inst, layout, dev.l2_bytes))
        if name == "torch_compile":
            left = remaining()
            if inst.case.op not in ("block", "block_unfused"):
                return None
            if left is not None and left < COMPILE_RESERVE_S:
                out.notes.append(f"{label}: torch_compile skipped ({left:.0f} s of budget left)")
                return None
        fn = inst.baseline_fn(name, direction, layout)
        if fn is None:
            return None
        return float(statistics.median(dev.time(fn, **timing)))
    except ImportError as exc:
        note = f"{name} baseline unavailable: {exc}"
        if note not in out.notes:
            out.notes.append(note)
        return None
    except Exception as exc:  # noqa: BLE001 - a baseline failing is reported, never fatal
        out.notes.append(f"{label}: {name} baseline failed: {type(exc).__name__}: {exc}")
        return None
