"""``python -m dwops`` (also the ``dwops`` console script): ``bench``, ``info``, ``warmup``,
``kernels``.

* ``bench``: the embedded default (the motivating block ``x + pw(relu(dw3x3(x))) + b`` and the plain
  depthwise forward, on the best available backend, against the memory floor, one dense 3x3
  convolution and PyTorch) or the suites named by ``--suite``; a markdown table on stdout, progress on
  stderr, JSON with ``--json``/``--out``. Exit status 1 if any dwops call failed or any result
  was wrong (max_rel_err over the dtype's tolerance).
* ``info``: backends (available, or why not), devices, versions.
* ``warmup``: compile the kernels ahead of the first call, in parallel processes (disk cache).
* ``kernels --arch sm_90``: the compile report of every GPU kernel (registers, shared memory,
  spills) and, for the cupy kernels, their machine-code instruction mix and occupancy, built
  without a GPU; exit status 1 on any error or spill.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

# (backend, module): each module defines compile_report(arch) -> list of dict rows.
KERNEL_REPORTS = (("numba", "dwops.kernels.numba_cuda"), ("cupy", "dwops.kernels.cupy_compile"))
KERNEL_COLUMNS = ("backend", "op", "direction", "specialization", "registers", "shared_bytes",
                  "spill_bytes", "error")
# (backend, module): each module defines sass_facts(arch) -> rows keyed by file and name, joined
# to that backend's compile-report rows (the machine-code columns below).
KERNEL_SASS = (("cupy", "dwops.model.sass"),)
SASS_COLUMNS = ("HMMA", "LDGSTS", "LDG.128", "LDS", "STS", "FFMA", "LDL/STL", "threads",
                "occupancy")


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


DESCRIPTION = """\
The dwops command line: time the convolutions on this machine (bench), list
what can run here (info), compile the kernels ahead of their first call
(warmup), or check how the GPU kernels compile (kernels). Run
'python -m dwops COMMAND --help' for the options of a command."""

BENCH_DESCRIPTION = """\
Time dwops on this machine. Without options it times the block
    x + pw(relu(dw(x))) + b
(a 3x3 depthwise convolution dw, then a 1x1 convolution pw, 64 channels) and
the 3x3 depthwise convolution on its own, on the fastest backend available
here, next to PyTorch (when installed) and one ordinary 3x3 convolution of the
same input.

Each row gives the time in milliseconds, the speed in GB/s, and the fraction
of the memory floor reached: the floor is the time it takes just to read the
inputs once and write the outputs once, at the memory bandwidth measured in
the same run by a plain copy. Every result is also checked against the NumPy
reference implementation."""

BENCH_EPILOG = """\
examples:
  python -m dwops bench                     the default block (about a minute)
  python -m dwops bench --suite cpu         the CPU backend against PyTorch
  python -m dwops bench --suite conv1d      the 1-d convolution of sequence models
  python -m dwops bench --suite models      torchvision networks, original vs dwops.torch.convert
  python -m dwops bench --suite gpu --out benchmarks/results
                                            every GPU suite, saved as JSON and a table"""


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .bench.cases import GPU_SUITES, SUITE_NAMES

    parser = argparse.ArgumentParser(prog="dwops", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"dwops {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = sub.add_parser("bench", help="time the convolutions on this machine",
                       description=BENCH_DESCRIPTION, epilog=BENCH_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--suite", action="append", default=None,
                   help=f"which sets of shapes to time, comma-separated or repeated: "
                        f"{', '.join(SUITE_NAMES)} (default: default)")
    b.add_argument("--backend", default=None,
                   help="which dwops backends to time, comma-separated: numpy, cpu, numba, cupy "
                        "(default: the fastest one here for the default suite, both GPU backends "
                        "for the GPU suites, cpu on a machine without a GPU)")
    b.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                   help="run on the CPU or on the GPU (default: the GPU when a GPU backend can "
                        "run)")
    b.add_argument("--dtype", default=None,
                   help="data types, comma-separated: float32, bfloat16, float16, float64 "
                        "(default: each suite's own)")
    b.add_argument("--layout", default="NCHW,NHWC",
                   help="memory layouts, comma-separated: NCHW (channels first) and NHWC "
                        "(channels last); the 1-d suite runs them as NCL and NLC (default: both)")
    b.add_argument("--baselines", default=None,
                   help="what to compare with, comma-separated: torch (PyTorch), torch_compile "
                        "(PyTorch's compiler), jax, dense3x3 (one ordinary 3x3 convolution), or "
                        "none (default: all four on a GPU, torch and dense3x3 on a CPU)")
    b.add_argument("--batch", type=int, default=None, help="use this batch size for every shape")
    b.add_argument("--max-size", type=int, default=None,
                   help="limit the height and width of every shape to this many pixels")
    b.add_argument("--budget", type=float, default=None,
                   help="stop after about this many seconds; the rows not reached are listed as "
                        "skipped")
    b.add_argument("--threads", type=int, default=None,
                   help="CPU threads for dwops and PyTorch alike (default: all cores)")
    b.add_argument("--target-ms", type=float, default=None,
                   help="milliseconds spent timing each row (default: 300 on a CPU, 50 on a GPU)")
    b.add_argument("--copy-mb", type=int, default=None,
                   help="size in MiB of the copy that measures the memory bandwidth (default: "
                        "128 on a CPU, 1024 on a GPU)")
    b.add_argument("--no-check", action="store_true",
                   help="do not check the results against the NumPy reference")
    b.add_argument("--json", default=None, help="also write the results as JSON to this file")
    b.add_argument("--model", default=None,
                   help="a JSON file written by `python -m dwops model`: its predictions join "
                        "the matching rows as a model_ms column")
    b.add_argument("--out", default=None,
                   help="write DATE-DEVICE.json and DATE-DEVICE.md into this folder (the "
                        "repository keeps them in benchmarks/results/)")
    b.add_argument("--quiet", action="store_true", help="do not show the progress bar")

    sub.add_parser("info", help="list the backends that can run here, the devices and the "
                                "package versions",
                   description="List the dwops backends and whether each can run here (and if "
                               "not, what is missing), the devices found and the versions of the "
                               "packages involved.")

    w = sub.add_parser("warmup", help="compile the kernels ahead of the first call",
                       description="Compile the CPU kernels (and a GPU backend's, where one runs) "
                                   "in parallel processes, so later runs load them from the disk "
                                   "cache instead of compiling on their first call.")
    w.add_argument("--backend", default="cpu",
                   help="which backends to compile for, comma-separated: cpu, numba, cupy "
                        "(default: cpu)")
    w.add_argument("--op", default=None,
                   help="which functions, comma-separated, e.g. depthwise_conv2d (default: all "
                        "of them)")
    w.add_argument("--dtype", default="float32",
                   help="data types, comma-separated: float32, float64, float16, bfloat16 "
                        "(default: float32)")
    w.add_argument("--layout", default="NCHW,NHWC",
                   help="memory layouts, comma-separated: NCHW and NHWC (NCL and NLC for the "
                        "1-d functions) (default: both)")
    w.add_argument("--jobs", type=int, default=None,
                   help="how many processes compile at once (default: the number of CPU "
                        "cores)")

    k = sub.add_parser("kernels", help="compile every GPU kernel and report its resources (no GPU "
                                       "needed)",
                       description="Compile every GPU kernel of both GPU backends for one GPU "
                                   "architecture and print, per kernel, the registers, the shared "
                                   "memory and the bytes spilled to local memory; for the cupy "
                                   "kernels also the instructions of the machine code by class "
                                   "(tensor-core HMMA, cp.async LDGSTS, 16-byte global loads "
                                   "LDG.128, shared-memory loads and stores LDS/STS, FFMA, "
                                   "local-memory LDL/STL), the block size of the kernel's "
                                   "__launch_bounds__ (threads) and the occupancy at that size "
                                   "on the architecture's GPU from registers and static shared "
                                   "memory (the dynamic shared memory of a launch is not "
                                   "counted). No GPU is needed. The exit status is 1 if a kernel "
                                   "fails to compile or spills.")
    k.add_argument("--arch", default="sm_90",
                   help="the GPU architecture to compile for (default: sm_90, the H100 and H200 "
                        "generation)")
    k.add_argument("--quick", action="store_true",
                   help="compile one kernel per code path instead of every specialization "
                        "(faster)")

    m = sub.add_parser("model", help="predict the GPU kernels' time per bench row (no GPU needed)",
                       description="Predict the time of the cupy backend's kernels on each row "
                                   "of GPU bench suites, without a GPU: the launch plan at full "
                                   "size, the memory trace of a scaled-down run in the CUDA "
                                   "emulator, and the sm_90 machine code, bounded by DRAM, L2, "
                                   "shared memory, instruction issue and FMA throughput. Every "
                                   "number printed is a prediction. Needs a host C++ compiler and "
                                   "the CUDA wheels of the cuda12/cuda13 extras.")
    m.add_argument("--suite", action="append", default=None,
                   help=f"GPU suites, comma-separated or repeated (default: block; one of "
                        f"{', '.join(GPU_SUITES)}, or gpu for all)")
    m.add_argument("--device", default="h200",
                   help="the GPU to model: h200 (default), a100 or rtx4090")
    m.add_argument("--dtype", default=None,
                   help="dtypes, comma-separated (default: the suite's own)")
    m.add_argument("--layout", default="NCHW,NHWC", help="layouts, comma-separated")
    m.add_argument("--limit", type=int, default=None, help="model at most this many rows")
    m.add_argument("--jobs", type=int, default=None,
                   help="processes to plan, compile and trace with (default: the CPUs available)")
    m.add_argument("--json", default=None, help="also write the rows as JSON to this file")
    m.add_argument("--quiet", action="store_true", help="do not show the progress bar")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "info":
        return cmd_info()
    if args.command == "kernels":
        return cmd_kernels(args.arch, quick=args.quick)
    if args.command == "warmup":
        return cmd_warmup(args)
    if args.command == "model":
        return cmd_model(args)
    return cmd_bench(args)


# ----------------------------------------------------------------------------- info


def cmd_info(stream=None) -> int:
    from . import __version__
    from .bench import env

    out = stream or sys.stdout
    print(f"dwops {__version__} ({os.path.dirname(os.path.abspath(__file__))})", file=out)
    print("backends:", file=out)
    for name, why in env.backends():
        print(f"  {name:<6} {'available' if why is None else 'unavailable: ' + why}", file=out)
    from ._registry import _GPU_PREFERENCE, _HOST_DEFAULT

    print(f"  auto   host arrays -> {_HOST_DEFAULT!r}; GPU arrays -> the first available of "
          f"{', '.join(map(repr, _GPU_PREFERENCE))} (or the one a backend prefers)", file=out)
    print("devices:", file=out)
    for line in env.devices():
        print(f"  {line}", file=out)
    print("versions:", file=out)
    for name, v in env.versions().items():
        print(f"  {name:<14} {v}", file=out)
    return 0


# ----------------------------------------------------------------------------- warmup


def cmd_warmup(args, stream=None) -> int:
    """Compile ahead of time; exit status 1 if any job failed or an argument is unknown."""
    import time

    from . import _jit
    from ._registry import BACKEND_NAMES

    out = stream or sys.stderr
    backends, ops = _csv(args.backend), _csv(args.op) if args.op else list(_jit.WARMUP_OPS)
    dtypes, layouts = _csv(args.dtype), _csv(args.layout)
    bad = ([f"backend {b!r}" for b in backends if b not in BACKEND_NAMES or b in ("auto", "numpy")]
           + [f"op {o!r}" for o in ops if o not in _jit.WARMUP_OPS]
           + [f"dtype {d!r}" for d in dtypes
              if d not in ("float32", "float64", "float16", "bfloat16")]
           + [f"layout {lay!r}" for lay in layouts if lay not in ("NCHW", "NHWC")])
    if bad:
        print(f"dwops warmup: unknown {', '.join(bad)}", file=out)
        return 2
    t0 = time.perf_counter()
    done = []
    if "cupy" in backends:  # every instantiation, into CuPy's disk cache (needs a GPU)
        from ._errors import BackendUnavailableError
        from ._registry import load

        try:
            load("cupy")
            why = None
        except BackendUnavailableError as exc:
            why = str(exc)
        if why is None:
            from .kernels.cupy_compile import warm_cache

            print(f"dwops warmup: {warm_cache(args.jobs)} cupy kernels in CuPy's cache", file=out)
        done.append((("cupy",), 0.0, why))
    rest = [b for b in backends if b != "cupy"]
    if rest:
        done += _jit.warmup(ops, dtypes, layouts, rest, jobs=args.jobs, stream=out)
    failed = [job for job, _, err in done if err is not None]
    for job, _, err in done:
        if err is not None and job == ("cupy",):
            print(f"dwops warmup: {err}", file=out)
    print(f"dwops warmup: {len(done) - len(failed)} of {len(done)} jobs compiled in "
          f"{time.perf_counter() - t0:.1f} s" + (f"; {len(failed)} failed" if failed else ""),
          file=out)
    return 1 if failed else 0


# ----------------------------------------------------------------------------- kernels


def kernel_rows(arch: str, quick: bool = False):
    """``(rows, problems)``: every backend's compile-report rows, and what is wrong with them."""
    import inspect
    import time

    rows, problems = [], []
    for backend, module in KERNEL_REPORTS:
        try:
            report = getattr(importlib.import_module(module), "compile_report")
        except (ImportError, AttributeError) as exc:
            problems.append(f"{backend}: no {module}.compile_report ({type(exc).__name__}: {exc})")
            continue
        kwargs = {}
        try:
            if quick and "quick" in inspect.signature(report).parameters:
                kwargs["quick"] = True
        except (TypeError, ValueError):
            pass
        print(f"compiling the {backend} kernels for {arch} ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            got = list(report(arch, **kwargs))
        except Exception as exc:  # noqa: BLE001 - any failure to report is a failure
            problems.append(f"{backend}: {module}.compile_report({arch!r}) raised "
                            f"{type(exc).__name__}: {exc}")
            continue
        print(f"  {len(got)} {backend} kernels in {time.monotonic() - t0:.0f} s", file=sys.stderr,
              flush=True)
        if not got:
            problems.append(f"{backend}: {module}.compile_report({arch!r}) reported no kernels")
        for r in got:
            r = dict(r)
            r.setdefault("backend", backend)
            rows.append(r)
            what = f"{r.get('backend')} {r.get('op')} {r.get('direction')} {r.get('specialization')}"
            if r.get("error"):
                problems.append(f"{what}: {r['error']}")
            elif (r.get("spill_bytes") or 0) > 0:
                problems.append(f"{what}: spills {r['spill_bytes']} bytes")
            elif r.get("registers") is None:
                problems.append(f"{what}: no register count reported")
    return rows, problems


def sass_columns(arch: str, rows: list[dict]) -> list[str]:
    """Add the machine-code columns (:data:`SASS_COLUMNS`) to the rows of the backends in
    :data:`KERNEL_SASS` that name their kernel, joined on (file, name); the problems found: a
    failing report, a row without machine code. ``threads`` is the block size
    of the kernel's ``__launch_bounds__`` and ``occupancy`` the fraction of an SM's warps resident
    at that size on the device of ``arch`` (dwops.model.devices), from the registers and the static
    shared memory (the dynamic shared memory depends on the problem: not counted)."""
    problems = []
    for backend, module in KERNEL_SASS:
        owned = [r for r in rows if r.get("backend") == backend and r.get("name")
                and not r.get("error")]
        if not owned:
            continue
        print(f"disassembling the {backend} kernels for {arch} ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            facts = {(f["file"], f["name"]): f
                     for f in importlib.import_module(module).sass_facts(arch)}
        except Exception as exc:  # noqa: BLE001 - any failure to report is a failure
            problems.append(f"{backend}: {module}.sass_facts({arch!r}) raised "
                            f"{type(exc).__name__}: {exc}")
            continue
        print(f"  {len(facts)} {backend} kernels in {time.monotonic() - t0:.0f} s",
              file=sys.stderr, flush=True)
        for r in owned:
            what = f"{r.get('backend')} {r.get('op')} {r.get('direction')} {r.get('specialization')}"
            f = facts.get((r.get("file"), r.get("name")))
            if f is None:
                problems.append(f"{what}: no machine code")
                continue
            c = f["counts"]
            r.update({k: c[k] for k in SASS_COLUMNS if k in c})
            r["LDL/STL"] = f"{c['LDL']}/{c['STL']}"
            r.update(_occupancy_cells(arch, r.get("file"), r.get("name"), f))
    return problems


def _occupancy_cells(arch: str, file: str, name: str, facts: dict) -> dict:
    from .model import sass
    from .model.devices import DEVICES

    dev = next((d for d in DEVICES.values() if d.arch == arch), None)
    threads = _launch_bounds(file).get(name.split("<")[0].strip())
    if dev is None or threads is None:
        return {}
    occ = sass.occupancy(dev, threads, facts["registers"], 0, facts["static_smem"])
    return {"threads": threads, "occupancy": f"{occ['occupancy']:.2f} {occ['limiter']}"}


def _launch_bounds(file: str) -> dict:
    """Kernel name -> threads of its __launch_bounds__ in cuda/<file>.cuh ({} if unreadable)."""
    from .cudaemu import _launch_bounds as bounds

    try:
        from .kernels.cupy_compile import source

        return bounds(source(file))
    except (ImportError, OSError):
        return {}


def cmd_kernels(arch: str, quick: bool = False, stream=None) -> int:
    out = stream or sys.stdout
    rows, problems = kernel_rows(arch, quick)
    problems += sass_columns(arch, rows)
    columns = KERNEL_COLUMNS + SASS_COLUMNS
    cells = [[("-" if r.get(k) is None else str(r.get(k))) for k in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print(f"GPU kernels compiled for {arch}:", file=out)
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip(), file=out)
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip(), file=out)
    print(f"{len(rows)} kernels, {len(problems)} problems", file=out)
    for p in problems:
        print(f"PROBLEM: {p}", file=sys.stderr)
    return 1 if problems else 0


# ----------------------------------------------------------------------------- bench


def _set_threads(n: int) -> None:
    """The same host thread count for dwops (Numba) and PyTorch."""
    try:
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass
    try:
        import torch

        torch.set_num_threads(n)
    except ImportError:
        pass


def _backends_for(args, device, suites, notes) -> list[str]:
    from . import _registry
    from .bench.devices import gpu_backends

    if args.backend:
        return _csv(args.backend)
    if device.on_gpu:
        gpu = gpu_backends()
        return gpu[:1] if suites == ["default"] else gpu
    host = _registry._HOST_DEFAULT
    if _registry.available(host):
        return [host]
    try:
        _registry.load(host)
    except Exception as exc:  # noqa: BLE001 - say why, then use the reference
        notes.append(f"{exc} Falling back to the 'numpy' reference backend.")
    return ["numpy"]


def _suites(texts, default: str, known, command: str, aliases=None):
    """The suite names of ``--suite`` (comma-separated or repeated; ``aliases`` expand to several),
    or None after printing the unknown one."""
    aliases = aliases or {}
    names = [s for text in (texts or [default]) for s in _csv(text)]
    names = [x for s in names for x in aliases.get(s, (s,))]
    for s in names:
        if s not in known:
            print(f"dwops {command}: unknown suite {s!r}; choose from "
                  f"{', '.join([*aliases, *known])}", file=sys.stderr)
            return None
    return names


def cmd_bench(args) -> int:
    from .bench import cases as cases_mod
    from .bench import devices, report, runner

    suites = _suites(args.suite, "default", cases_mod.SUITE_NAMES, "bench")
    if suites is None:
        return 2
    try:
        device = devices.select(args.device)
    except RuntimeError as exc:
        print(f"dwops bench: {exc}", file=sys.stderr)
        return 2
    if not device.on_gpu:
        _set_threads(args.threads or os.cpu_count() or 1)
    dtypes = _csv(args.dtype) if args.dtype else None
    cases = [c.scaled(args.batch, args.max_size)
             for s in suites for c in cases_mod.suite(s, device.on_gpu, dtypes)]
    notes = []
    backends = _backends_for(args, device, suites, notes)
    if args.baselines is None:
        baselines = (("torch", "torch_compile", "jax", "dense3x3") if device.on_gpu
                     else ("torch", "dense3x3"))
    elif args.baselines == "none":
        baselines = ()
    else:
        baselines = tuple(_csv(args.baselines))
    layouts = tuple(_csv(args.layout))
    opts = runner.Options(backends=backends, layouts=layouts, baselines=baselines,
                          budget_s=args.budget, check=not args.no_check,
                          target_s=None if args.target_ms is None else args.target_ms / 1e3,
                          copy_bytes=None if args.copy_mb is None else args.copy_mb * 1024**2)
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    t_start = time.monotonic()
    outcome = runner.run(cases, device, opts, progress=not args.quiet)
    if "models" in suites:
        from .bench import models

        def remaining():
            return None if args.budget is None else args.budget - (time.monotonic() - t_start)
        models.run(outcome, device, backends, opts.timing(device.on_gpu), remaining,
                   report.Progress(0, enabled=not args.quiet))
    result = outcome.result
    if args.model:
        with open(args.model) as f:
            n = report.attach_model(result, json.load(f))
        notes.append(f"model_ms from {args.model} on {n} of {len(result['rows'])} rows")
    table = report.markdown(result)
    sys.stdout.write(table)
    tail = []
    if "torch" not in baselines or not any("torch" in r["baselines"] for r in result["rows"]):
        tail.append("PyTorch baselines: not measured (PyTorch not installed or not asked for)")
    for n in notes + outcome.notes:
        tail.append(f"note: {n}")
    for f in outcome.failures:
        tail.append(f"FAILED: {f}")
    if tail:
        sys.stdout.write("\n" + "\n".join(tail) + "\n")
    paths = []
    if args.json:
        report.write_json(result, args.json)
        paths.append(args.json)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, report.file_stem(result))
        report.write_json(result, stem + ".json")
        with open(stem + ".md", "w") as f:
            f.write(table + ("\n" + "\n".join(tail) + "\n" if tail else ""))
        paths += [stem + ".json", stem + ".md"]
    for p in paths:
        print(f"wrote {p}", file=sys.stderr)
    if outcome.failures:
        print(f"dwops bench: {len(outcome.failures)} failure(s)", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------- model

def cmd_model(args, stream=None) -> int:
    from .bench import cases as cases_mod
    from .bench import report
    from .model import devices, predict

    out = stream or sys.stdout
    suites = _suites(args.suite, "block", cases_mod.GPU_SUITES, "model",
                     {"gpu": cases_mod.GPU_SUITES})
    if suites is None:
        return 2
    try:
        device = devices.device(args.device)
    except ValueError as exc:
        print(f"dwops model: {exc}", file=sys.stderr)
        return 2
    dtypes = _csv(args.dtype) if args.dtype else None
    result = predict.run(suites, device, dtypes=dtypes, layouts=tuple(_csv(args.layout)),
                         progress=not args.quiet, limit=args.limit, jobs=args.jobs)
    out.write(report.model_markdown(result))
    if args.json:
        report.write_json(result, args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0 if result["rows"] else 1


if __name__ == "__main__":
    sys.exit(main())
