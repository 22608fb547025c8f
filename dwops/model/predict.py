"""Predicted time of each benchmark row of the ``cupy`` backend, without a GPU.

For one row (a :class:`dwops.bench.cases.Case`, a direction, a layout):

1. **The plan at full size.** The backend's host code runs on the emulator's stand-in for CuPy with
   its launches recorded, not run: kernel, grid, block and dynamic shared memory of every launch the
   call makes at the benchmark's shape.
2. **The trace of a scaled-down problem.** The same call on a smaller problem (batch 1, fewer
   channels or pixels; :func:`scaled_case`) runs in the emulator with its memory trace on
   (:func:`dwops.cudaemu.tracing`). Its launches must be the plan's kernels, in the same order, with
   the same block and shared memory: the same tile plan with fewer tiles. A launch of more than
   ``TRACE_BLOCKS`` blocks runs four windows of consecutive blocks spread over its grid, its sums
   scaled by blocks / blocks run (tiles of a plan do nearly the same work; edge tiles and
   halo-sharing neighbours are in the sample; tests/test_model.py bounds the error). Every counter of a launch
   (requests, sectors, wavefronts, unique bytes, barriers) is multiplied by the ratio of work
   (images x channels, or pixels, of the row over the scaled problem). This is exact for kernels
   whose grid tiles the scaled dimensions independently (every kernel here but the weight gradient's
   cross-block reduction, whose split count follows the problem size: its partial sums are a small
   share of the traffic, and the model says so in the row's ``model_note``).
3. **The machine code.** Registers and the instruction mix of each kernel come from its sm_90 code
   (:mod:`dwops.model.sass`); occupancy from the CUDA rules for the plan's block and shared memory.

A launch's predicted time is the largest of these bounds, plus the launch cost:

* ``dram``: (unique bytes read + written) / copy bandwidth;
* ``latency``: bytes read / (bytes in flight / DRAM latency), bytes in flight = resident warps x the
  trace's bytes a warp has in flight (Little's law: too few loads in flight cannot fill the memory
  system however many bytes are needed);
* ``l2``: bytes crossing between the SMs and L2 (each block's distinct sectors) / L2 bandwidth;
* ``smem``: shared-memory wavefronts / (one per SM per clock), over the SMs the grid keeps busy;
* ``issue``: warp instructions / (four per SM per clock): the trace's dynamic memory instructions
  times the ratio of all instructions to memory instructions in the kernel's innermost loop;
* ``fma``: FP32 FLOPs / FMA peak.

Throughput bounds of the SMs (smem, issue, fma) are divided by the share of the SMs the grid keeps
working (a grid of fewer blocks than SMs leaves the rest idle). A kernel's FLOPs are the op's,
shared among its convolution launches by the bytes they move; a reduction of partial sums does one
add per element read. The row's time is the sum over its launches; its floor is
the bytes the op must move (:meth:`Case.nbytes`) at copy bandwidth. Every number here is a model.
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass, field, replace

import numpy as np

from .devices import Device

TRACE_BLOCKS = 64  # blocks traced per launch at most: four windows of 16 consecutive blocks
DRAM_LATENCY_S = 600e-9  # a lead: HBM load latency under load on Hopper, 500-700 ns reported


# ----------------------------------------------------------------------------- problems


def scaled_case(case, layout: str):
    """``(small, factor)``: the problem traced in the emulator for ``case`` and the ratio of the
    row's work to its work. The launch plans choose block shapes and shared memory from the plane
    (NCHW) or from the channels and the plane (NHWC), so the small problem keeps exactly what the
    plan reads: batch 1 everywhere; depthwise and conv1d in NCHW also take at most 4 channels
    (planes are independent); conv1d in NHWC takes at most 256 positions of the sequence;
    pointwise at most 32 rows of the image (its tiles run over pixels). ``tests/test_model.py``
    checks that every bench row's small problem runs the row's kernels with the same blocks and
    shared memory."""
    c = case
    if c.op in ("depthwise", "conv1d") and layout == "NCHW":
        small = replace(c, N=1, C=min(c.C, 4), C_out=None)
        return small, (c.N * c.C) / small.C
    if c.op == "conv1d":
        small = replace(c, N=1, W=min(c.W, 256))
        return small, (c.N * c.W) / small.W
    if c.op == "pointwise":
        small = replace(c, N=1, H=min(c.H, 32))
        return small, (c.N * c.H) / small.H
    return replace(c, N=1), float(c.N)


class _EmuDevice:
    """What :class:`dwops.bench.workloads.Instance` needs of a device, on the emulator's arrays:
    random values for traced runs, untouched memory (never read) for planning runs."""

    def __init__(self, cupy, fill: bool):
        self.cp, self.fill = cupy, fill

    def random(self, shape, dtype, seed):
        from .._registry import numpy_dtype

        a = self.cp.empty(shape, numpy_dtype(dtype))
        if self.fill:
            rng = np.random.default_rng(seed)
            a[...] = rng.uniform(-1, 1, shape).astype(np.float32).astype(a.dtype)
        return a

    def nhwc(self, a):
        if not self.fill:   # planning: the shape is what counts
            return self.cp.empty(a.transpose(0, 2, 3, 1).shape, a.dtype)
        return self.cp.ascontiguousarray(a.transpose(0, 2, 3, 1))


@contextlib.contextmanager
def _planning(launches: list, facts: dict | None):
    """Record the cupy backend's launches instead of running them. The occupancy a plan asks
    for (the weight gradient's splits) is the device's, by its threads, shared memory and, where
    ``facts`` ({(file, name): machine-code facts}) has them, its registers: what the driver
    answers on the device."""
    from ..kernels import cupy_backend as cb
    from ..kernels import cupy_device

    real = cb.CupyBackend._function, cb.CupyBackend._occupancy

    def record(self, launch):
        return lambda grid, block, args, shared_mem=0, **kw: launches.append(launch)

    def occupancy(self, a):
        dev = cupy_device.limits()

        def occ(file, name, threads, shared):
            f = (facts or {}).get((file, name)) or {}
            return dev.occupancy(threads, shared + (f.get("static_smem") or 0),
                                 f.get("registers") or 0)

        return occ

    cb.CupyBackend._function, cb.CupyBackend._occupancy = record, occupancy
    try:
        yield launches
    finally:
        cb.CupyBackend._function, cb.CupyBackend._occupancy = real


def plan(case, direction: str, layout: str, facts: dict | None = None) -> list:
    """The :class:`~dwops.kernels.cupy_plans.Launch` list of one row at its full size, for the
    emulated device (``DWOPS_CUDAEMU_DEVICE``); ``facts`` as :func:`_planning` takes them."""
    from .. import cudaemu
    from ..bench.workloads import Instance

    launches = []
    inst = Instance(replace(case, directions=(direction,)), _EmuDevice(cudaemu, fill=False))
    fn = inst.dwops_fn(direction, layout, "cupy")
    with _planning(launches, facts):
        fn()
    return launches


def trace(case, direction: str, layout: str, max_blocks: int | None = TRACE_BLOCKS) -> list:
    """The :class:`dwops.cudaemu.LaunchTrace` list of one (small) problem, executed; a launch of
    more than ``max_blocks`` blocks runs a sample of them, its counters scaled to the grid
    (:func:`dwops.cudaemu.tracing`)."""
    from .. import cudaemu
    from ..bench.workloads import Instance

    inst = Instance(replace(case, directions=(direction,)), _EmuDevice(cudaemu, fill=True))
    fn = inst.dwops_fn(direction, layout, "cupy")
    with cudaemu.tracing(max_blocks=max_blocks) as launches:
        fn()
    return list(launches)


# ----------------------------------------------------------------------------- the model


MEMORY_CLASSES = ("LDG", "STG", "LDGSTS", "LDS", "STS", "LDSM", "SHFL")
USEFUL_CLASSES = MEMORY_CLASSES + ("FFMA", "HFMA2", "HMMA")
COUNTER_KEYS_MEMORY = ("global_load_requests", "global_store_requests", "shared_load_requests",
                       "shared_store_requests", "cp_async_requests", "shuffles")
DEFAULT_OVERHEAD = 1.5  # a lead: index and loop instructions per useful one, where no loop says


def _class_total(counts: dict, prefix: str) -> int:
    return sum(v for k, v in counts.items() if k == prefix or k.startswith(prefix + "."))


def instruction_ratio(facts: dict | None) -> float:
    """Instructions issued per useful one (memory, FMA, MMA): the mix of the kernel's innermost
    loop when that loop computes (holds FMA or MMA instructions); otherwise
    :data:`DEFAULT_OVERHEAD` (a loop that only stages data, or no machine code known, says nothing
    about the compute)."""
    counts = (facts or {}).get("loop_counts") or {}
    if any(counts.get(k) for k in ("FFMA", "HFMA2", "HMMA")) and counts.get("total"):
        return max(1.0, counts["total"] / sum(_class_total(counts, c) for c in USEFUL_CLASSES))
    return DEFAULT_OVERHEAD


def kernel_facts(launch, arch: str, cache: dict) -> dict | None:
    """The machine-code facts of one launch's kernel (:mod:`dwops.model.sass`, cached on disk),
    or None where the CUDA tools are missing."""
    key = (launch.file, launch.name)
    if key not in cache:
        from .sass import _group_facts

        try:
            cache[key] = _group_facts((launch.file, [launch.name], arch))[launch.name]
        except (FileNotFoundError, ImportError) as exc:
            print(f"model: no machine code for {launch.name} ({exc})", file=sys.stderr)
            cache[key] = None
    return cache[key]


@dataclass
class LaunchModel:
    name: str
    grid: tuple
    block: tuple
    smem: int
    blocks: int
    blocks_per_sm: int
    busy_fraction: float
    bounds: dict            # seconds per bound
    seconds: float
    bound: str
    counters: dict = field(repr=False, default_factory=dict)


def model_launch(dev: Device, launch, counters: dict, facts: dict | None,
                 flops: float = 0.0) -> LaunchModel:
    """One launch at full size: ``launch`` from :func:`plan`, ``counters`` already scaled to the
    full problem, ``facts`` the kernel's machine-code facts (or None)."""
    from .sass import occupancy

    threads = int(np.prod(launch.block))
    blocks = int(np.prod(launch.grid))
    regs = (facts or {}).get("registers") or 32
    occ = occupancy(dev, threads, regs, launch.shared, (facts or {}).get("static_smem") or 0)
    per_wave = max(1, occ["blocks_per_sm"]) * dev.sm_count
    waves = math.ceil(blocks / per_wave)
    busy = min(1.0, blocks / (waves * dev.sm_count))  # share of the SMs the grid keeps working
    resident_warps = min(blocks, per_wave) * math.ceil(threads / 32)

    c = counters
    read = c.get("dram_read_bytes", 0.0)
    write = c.get("dram_write_bytes", 0.0)
    in_flight = resident_warps * c.get("load_bytes_in_flight_per_warp", 0.0)
    wavefronts = (c.get("shared_load_wavefronts", 0) + c.get("shared_store_wavefronts", 0)
                  + c.get("shared_cp_async_wavefronts", 0))
    mem_instr = sum(c.get(k, 0) for k in COUNTER_KEYS_MEMORY)
    fma_instr = flops / 64  # warp FMA instructions (32 lanes, 2 FLOP each)
    bounds = {
        "dram": (read + write) / dev.dram_bw,
        "latency": read * DRAM_LATENCY_S / in_flight if in_flight > 0 and read > 0 else 0.0,
        "l2": (c.get("l2_read_bytes", 0.0) + c.get("l2_write_bytes", 0.0)) / dev.l2_bw,
        "smem": wavefronts / dev.smem_wavefronts_per_s / busy,
        "issue": (mem_instr + fma_instr) * instruction_ratio(facts) / dev.issue_per_s / busy,
        "fma": flops / dev.fp32_flops / busy,
    }
    bound = max(bounds, key=bounds.get)
    return LaunchModel(launch.name, tuple(launch.grid), tuple(launch.block), launch.shared, blocks,
                       occ["blocks_per_sm"], busy, bounds, bounds[bound] + dev.launch_s, bound, c)


@dataclass
class RowModel:
    case: object
    direction: str
    layout: str
    launches: list
    seconds: float
    floor_seconds: float
    bound: str
    coalescing: float | None
    smem_conflict_ways: float | None
    note: str = ""

    @property
    def floor_fraction(self) -> float:
        return self.floor_seconds / self.seconds


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den else None


def model_row(dev: Device, case, direction: str, layout: str, facts_cache: dict) -> RowModel:
    """Plan at full size, trace scaled down, scale, and bound each launch."""
    full = plan(case, direction, layout, facts_cache)
    small, factor = scaled_case(case, layout)
    traced = trace(small, direction, layout)
    notes = []
    names_full = [(lc.name, tuple(lc.block), lc.shared) for lc in full]
    names_small = [(t.name, tuple(t.block), t.smem) for t in traced]
    if names_full != names_small:
        raise RuntimeError(
            f"{case.op} {direction} {layout}: the scaled problem does not run the row's plan "
            f"({names_small} vs {names_full})")
    for lc in full:
        if lc.shared > dev.smem_optin:
            notes.append(f"{lc.name} asks {lc.shared} B of shared memory, over this device's "
                         f"{dev.smem_optin} B: the launch fails here")
    if case.op == "depthwise" and direction == "grad_weight" and len(full) > 1:
        notes.append("weight-gradient split sized from the problem: partial sums scaled linearly")
    flops_total = case.flops(direction)
    launches, totals = [], {}
    # the op's FLOPs go to its convolution kernels in proportion to the bytes they move; a
    # reduction of partial sums (sum_splits) does one add per element it reads
    def moved(t):
        return t.counters.get("global_load_bytes", 0) + t.counters.get("global_store_bytes", 0)

    conv = [t for t in traced if not t.name.startswith("sum_splits")]
    work = sum(moved(t) for t in conv) or 1
    item = 2 if case.dtype in ("float16", "bfloat16") else 4
    for lc, t in zip(full, traced):
        scaled = {k: v * factor if k != "load_bytes_in_flight_per_warp" else v
                  for k, v in t.counters.items()}
        if t in conv:
            flops = flops_total * moved(t) / work
        else:
            flops = scaled.get("global_load_bytes", 0) / item
        lm = model_launch(dev, lc, scaled, kernel_facts(lc, dev.arch, facts_cache), flops)
        launches.append(lm)
        for k, v in scaled.items():
            totals[k] = totals.get(k, 0) + v
    seconds = sum(lm.seconds for lm in launches)
    main = max(launches, key=lambda lm: lm.seconds)
    floor = case.nbytes(direction) / dev.dram_bw
    ideal = totals.get("global_load_ideal_sectors", 0) + totals.get("global_store_ideal_sectors", 0)
    sectors = totals.get("global_load_sectors", 0) + totals.get("global_store_sectors", 0)
    return RowModel(case, direction, layout, launches, seconds, floor, main.bound,
                    _ratio(ideal, sectors),
                    _ratio(totals.get("shared_load_wavefronts", 0),
                           totals.get("shared_load_ideal_wavefronts", 0)),
                    "; ".join(notes))


# ----------------------------------------------------------------------------- rows and reports


MODEL_KEYS = ("model_floor_fraction", "model_bound", "coalescing", "smem_conflict_ways",
              "model_note")


def row_json(dev: Device, r: RowModel) -> dict:
    """A bench-schema row (measured fields empty) with the model's columns."""
    from ..bench.report import ROW_KEYS

    c = r.case
    row = dict.fromkeys(ROW_KEYS)
    row.update(op=c.op, direction=r.direction, suite=c.suite, shape=c.shape(),
               dtype=c.dtype, layout=c.layout_name(r.layout), backend="cupy", ms=None,
               bytes=int(c.nbytes(r.direction)), baselines={},
               model_ms=r.seconds * 1e3)
    row.update(model_floor_fraction=r.floor_fraction, model_bound=r.bound,
               coalescing=r.coalescing, smem_conflict_ways=r.smem_conflict_ways,
               model_note=r.note or None)
    return row


def _plan_names(job) -> list:
    """Worker: the (file, name) of each kernel one row launches ([] where it cannot plan)."""
    c, d, layout = job
    try:
        return [(lc.file, lc.name) for lc in plan(c, d, layout)]
    except Exception:  # noqa: BLE001 - the row itself reports it in step 3
        return []


def _prepare(job):
    """Worker: one (file, element type) group of kernels: its traced emulator library (on disk)
    and its sm_90 facts (None without the CUDA tools)."""
    from .. import cudaemu
    from ..kernels.cupy_compile import source
    from .sass import _group_facts

    file, names, arch = job
    cudaemu.build(source(file), names, trace=True)
    try:
        return _group_facts((file, names, arch))
    except (FileNotFoundError, ImportError) as exc:
        print(f"model: no machine code for {file} ({exc})", file=sys.stderr)
        return None


_ROW_STATE: dict = {}   # what the row workers inherit: device and kernel facts


def _model_row_job(job):
    """Worker: one row's bench-schema dict, or the message of why the model cannot take it."""
    c, d, layout = job
    dev, facts = _ROW_STATE["device"], _ROW_STATE["facts"]
    try:
        return row_json(dev, model_row(dev, c, d, layout, facts))
    except Exception as exc:  # noqa: BLE001 - a row the model cannot take is reported, not hidden
        return f"model: {c.suite} {c.op} {d} {layout}: {type(exc).__name__}: {exc}"


def run(suites, device: Device, dtypes=None, layouts=("NCHW", "NHWC"), progress=True,
        limit: int | None = None, jobs: int | None = None) -> dict:
    """Model every row of ``suites``; the result in the bench JSON schema (``ms`` empty).

    Three steps, each in ``jobs`` processes (default: the CPUs available): the launch plan of
    every row (host code only); the compilation of the kernels the plans name, one traced
    emulator library and one sm_90 cubin per (file, element type); then the trace and bounds
    of every row. Compiled libraries and facts are cached on disk: a second run only traces.
    The emulator stands in for ``device`` (its profile of launch limits) throughout."""
    from .. import cudaemu

    cudaemu.install()
    with cudaemu.device(device.limits.name):   # the plans and the occupancy of this device
        return _run(suites, device, dtypes, layouts, progress, limit, jobs)


def _run(suites, device: Device, dtypes, layouts, progress, limit, jobs) -> dict:
    import datetime

    from .. import cudaemu
    from ..bench import cases as bench_cases
    from ..bench.env import versions
    from ..bench.report import Progress
    from ..kernels.cupy_compile import map_groups, source

    todo = []
    for s in suites:
        for c in bench_cases.suite(s, on_gpu=True, dtypes=dtypes):
            for d in c.directions:
                for layout in layouts:
                    todo.append((c, d, layout))
    if limit is not None:
        todo = todo[:limit]

    def label(job):
        c, d, layout = job
        return f"{c.suite} {c.op} {d} {layout} {c.dtype}"

    note = Progress(0, enabled=progress)
    note.note(f"model: planning {len(todo)} rows")
    groups: dict = {}
    for names in map_groups(_plan_names, todo, jobs):
        for file, name in names:
            ctype = name.split("<", 1)[1].split(",")[0].split(">")[0].strip()
            group = groups.setdefault((file, ctype), [])
            if name not in group:
                group.append(name)
    note.note(f"model: compiling {sum(map(len, groups.values()))} kernels in {len(groups)} "
              f"groups (cached on disk)")
    prep = [(file, names, device.arch) for (file, _), names in groups.items()]
    facts = {}
    for (file, names, _), got in zip(prep, map_groups(_prepare, prep, jobs)):
        cudaemu.prebuild(source(file), names)   # the row workers' modules take these libraries
        for n in names:
            facts[(file, n)] = (got or {}).get(n)
    _ROW_STATE.update(device=device, facts=facts)
    bar = Progress(len(todo), enabled=progress)
    rows = []
    for got in map_groups(_model_row_job, todo, jobs, bar, label):
        if isinstance(got, str):
            print(got, file=sys.stderr)
        else:
            rows.append(got)
    bar.close()
    return {"device": f"model: {device.name}", "driver": None,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%MZ"),
            "versions": versions(), "copy_bandwidth_gbs": device.dram_bw / 1e9, "rows": rows}
