"""``python -m dwops`` (also the ``dwops`` console script): ``bench``, ``info``, ``warmup`` and ``kernels``.

* ``bench``: the embedded default (the motivating block ``x + pw(relu(dw3x3(x))) + b`` and the plain
  depthwise forward, on the best available backend, against the memory floor, one dense 3x3
  convolution and PyTorch) or the suites named by ``--suite``; a markdown table on stdout, progress on
  stderr, JSON with ``--json``/``--out``. Exit status 1 if any dwops call failed or any result
  was wrong (an element, or max_rel_err, over the dtype's tolerance).
* ``info``: backends (available, or why not), devices, versions.
* ``warmup``: compile the kernels ahead of the first call, in parallel processes (disk cache).
* ``kernels --arch sm_90``: the compile report of every GPU kernel (registers, shared memory,
  spills), built without a GPU; exit status 1 on any error or spill.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# (backend, module): each module defines compile_report(arch) -> list of dict rows.
KERNEL_REPORTS = (("numba", "dwops.kernels.numba_cuda"), ("cupy", "dwops.kernels.cupy_compile"))
KERNEL_COLUMNS = ("backend", "op", "direction", "specialization", "registers", "shared_bytes",
                  "spill_bytes", "error")


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .bench.cases import SUITE_NAMES

    parser = argparse.ArgumentParser(prog="dwops", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"dwops {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="run the embedded default benchmark or named suites",
                       description="Benchmark dwops against the memory floor and the frameworks.")
    b.add_argument("--suite", action="append", default=None,
                   help=f"suite(s) to run, repeatable or comma-separated: {', '.join(SUITE_NAMES)} "
                        "(default: default)")
    b.add_argument("--backend", default=None,
                   help="dwops backend(s), comma-separated (default: the best available for the "
                        "default suite, every GPU backend for GPU suites, 'cpu' on a host)")
    b.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                   help="where to run (default: a GPU when a GPU backend can run)")
    b.add_argument("--dtype", default=None, help="dtype(s), comma-separated (default: the suite's)")
    b.add_argument("--layout", default="NCHW,NHWC", help="layout(s), comma-separated")
    b.add_argument("--baselines", default=None,
                   help="comma-separated from torch, torch_compile, jax, dense3x3, or 'none' "
                        "(default: all four on a GPU, torch and dense3x3 on a host)")
    b.add_argument("--batch", type=int, default=None, help="override every case's batch size")
    b.add_argument("--max-size", type=int, default=None, help="cap every case's H and W")
    b.add_argument("--budget", type=float, default=None,
                   help="seconds; rows left when it runs out are skipped (and reported)")
    b.add_argument("--threads", type=int, default=None,
                   help="host threads for dwops (Numba) and PyTorch alike (default: all cores)")
    b.add_argument("--target-ms", type=float, default=None,
                   help="timed milliseconds per measurement (default 300 on a host, 50 on a GPU)")
    b.add_argument("--copy-mb", type=int, default=None,
                   help="MiB copied to measure the bandwidth (default 128 on a host, 1024 on a GPU)")
    b.add_argument("--no-check", action="store_true", help="skip the reference check")
    b.add_argument("--json", default=None, help="write the JSON results to this path")
    b.add_argument("--out", default=None,
                   help="write DATE-DEVICE.json and DATE-DEVICE.md into this directory "
                        "(benchmarks/results/ in the repository)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")

    sub.add_parser("info", help="backends, devices and versions")

    w = sub.add_parser("warmup", help="compile the kernels ahead of the first call",
                       description="Compile the CPU kernels (and a GPU backend's, where one runs) "
                                   "in parallel processes, so later runs load them from the disk "
                                   "cache instead of compiling on their first call.")
    w.add_argument("--backend", default="cpu",
                   help="backend(s), comma-separated: cpu, numba, cupy (default: cpu)")
    w.add_argument("--op", default=None,
                   help="op(s), comma-separated (default: every public op)")
    w.add_argument("--dtype", default="float32",
                   help="dtype(s), comma-separated from float32, float64, float16, bfloat16 "
                        "(default: float32)")
    w.add_argument("--layout", default="NCHW,NHWC",
                   help="layout(s), comma-separated: NCHW (NCL for 1-d ops), NHWC (NLC)")
    w.add_argument("--jobs", type=int, default=None,
                   help="worker processes (default: the number of CPU cores)")

    k = sub.add_parser("kernels", help="compile report of every GPU kernel (no GPU needed)")
    k.add_argument("--arch", default="sm_90", help="target architecture (default sm_90)")
    k.add_argument("--quick", action="store_true",
                   help="one kernel per code path, where a backend's report offers that")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "info":
        return cmd_info()
    if args.command == "kernels":
        return cmd_kernels(args.arch, quick=args.quick)
    if args.command == "warmup":
        return cmd_warmup(args)
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


def cmd_kernels(arch: str, quick: bool = False, stream=None) -> int:
    out = stream or sys.stdout
    rows, problems = kernel_rows(arch, quick)
    cells = [[("-" if r.get(k) is None else str(r.get(k))) for k in KERNEL_COLUMNS] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(KERNEL_COLUMNS)]
    print(f"GPU kernels compiled for {arch}:", file=out)
    print("  ".join(c.ljust(w) for c, w in zip(KERNEL_COLUMNS, widths)).rstrip(), file=out)
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


def cmd_bench(args) -> int:
    from .bench import cases as cases_mod
    from .bench import devices, report, runner

    suites = [s for text in (args.suite or ["default"]) for s in _csv(text)]
    for s in suites:
        if s not in cases_mod.SUITE_NAMES:
            print(f"dwops bench: unknown suite {s!r}; choose from "
                  f"{', '.join(cases_mod.SUITE_NAMES)}", file=sys.stderr)
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
    outcome = runner.run(cases, device, opts, progress=not args.quiet)
    result = outcome.result
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


if __name__ == "__main__":
    sys.exit(main())
