"""Building the ``cupy`` backend's kernels: sources, NVRTC options, the compile report and the
cache warm-up.

* :func:`source`: the compilation unit of one ``cuda/<file>.cuh`` (the activation enum generated
  from the Python table, ``common.cuh``, the file); :func:`compile_options` adds the CUDA headers.
* :func:`compile_report`: every instantiation any plan can produce (``cupy_plans.instantiations``),
  compiled through NVRTC for ``compute_90`` and assembled for ``sm_90`` with nvJitLink, with
  registers, shared memory and spills. Works without a GPU.
* :func:`warm_cache`: every instantiation compiled for the current GPU into CuPy's disk cache.
"""

from __future__ import annotations

import functools
import os

from .._spec import ACTIVATION_CODES
from ._ptxas import assemble
from .cupy_plans import instantiations

CUDA_DIR = os.path.join(os.path.dirname(__file__), "cuda")

# ----------------------------------------------------------------------------- sources, includes


@functools.lru_cache(maxsize=None)
def source(file: str) -> str:
    """The compilation unit of cuda/<file>.cuh: the activation codes (generated from the Python
    table), common.cuh, then the file (as text, so CuPy's binary cache is keyed on all of it)."""
    with open(os.path.join(CUDA_DIR, "common.cuh")) as f:
        common = f.read()
    with open(os.path.join(CUDA_DIR, f"{file}.cuh")) as f:
        body = f.read()
    return activation_enum() + "\n" + common + "\n" + body


def activation_enum() -> str:
    """``enum : int { ACT_NONE = 0, ACT_RELU = 1, ... };`` from ``ACTIVATION_CODES``."""
    names = ", ".join(f"ACT_{(a or 'none').upper()} = {c}" for a, c in ACTIVATION_CODES.items())
    return ("// Activation codes, generated from dwops._spec.ACTIVATION_CODES.\n"
            f"enum : int {{ {names} }};\n")


@functools.lru_cache(maxsize=None)
def cuda_include_dir() -> str | None:
    """Directory holding cuda_fp16.h and cuda_bf16.h: the nvidia CUDA runtime wheel
    (``nvidia/cu13/include`` or ``nvidia/cuda_runtime/include``), CuPy's CUDA path, CUDA_PATH, or
    /usr/local/cuda/include."""
    candidates = []
    try:
        from cuda.pathfinder import find_nvidia_header_directory

        for lib in ("cudart", "nvrtc"):
            try:
                d = find_nvidia_header_directory(lib)
            except Exception:
                d = None
            if d:
                candidates.append(d)
    except ImportError:
        pass
    try:
        import importlib.util

        spec = importlib.util.find_spec("nvidia")
        for root in (spec.submodule_search_locations or []) if spec else []:
            for sub in ("cu13", "cu12", "cuda_runtime", "cuda_nvrtc"):
                candidates.append(os.path.join(root, sub, "include"))
    except Exception:
        pass
    try:
        from cupy import _environment

        cp = _environment.get_cuda_path()
        if cp:
            candidates.append(os.path.join(cp, "include"))
    except Exception:
        pass
    for env in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(env):
            candidates.append(os.path.join(os.environ[env], "include"))
    candidates.append("/usr/local/cuda/include")
    for d in candidates:
        if d and os.path.isfile(os.path.join(d, "cuda_fp16.h")) and \
                os.path.isfile(os.path.join(d, "cuda_bf16.h")):
            return d
    return None


def compile_options() -> tuple:
    inc = cuda_include_dir()
    return ("--std=c++17",) + ((f"-I{inc}",) if inc else ())


# ----------------------------------------------------------------------------- kernel report


def _nvrtc_check(result, prog=None, what="nvrtc"):
    from cuda.bindings import nvrtc

    err = result[0]
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        log = ""
        if prog is not None:
            _, n = nvrtc.nvrtcGetProgramLogSize(prog)
            buf = b" " * n
            nvrtc.nvrtcGetProgramLog(prog, buf)
            log = buf.decode(errors="replace")
        raise RuntimeError(f"{what}: {err}\n{log}")
    return result[1:] if len(result) > 1 else None


def compile_ptx(file: str, names: list[str], arch: str = "sm_90") -> tuple[bytes, dict]:
    """PTX of ``names`` instantiated from cuda/<file>.cuh, and name expression -> lowered name."""
    return compile_ptx_source(source(file), names, arch, file)


def compile_ptx_source(code: str, names: list[str], arch: str = "sm_90",
                       unit: str = "kernels") -> tuple[bytes, dict]:
    """PTX of ``names`` instantiated from the CUDA C++ ``code`` (compiled as ``<unit>.cu`` with
    :func:`compile_options`), and name expression -> lowered name."""
    from cuda.bindings import nvrtc

    cc = arch.split("_", 1)[1]
    (prog,) = _nvrtc_check(nvrtc.nvrtcCreateProgram(code.encode(), f"{unit}.cu".encode(),
                                                    0, [], []))
    try:
        for n in names:
            _nvrtc_check(nvrtc.nvrtcAddNameExpression(prog, n.encode()))
        opts = [f"--gpu-architecture=compute_{cc}".encode()] + [o.encode() for o in compile_options()]
        _nvrtc_check(nvrtc.nvrtcCompileProgram(prog, len(opts), opts), prog, f"compiling {unit}.cu")
        (size,) = _nvrtc_check(nvrtc.nvrtcGetPTXSize(prog))
        ptx = b" " * size
        _nvrtc_check(nvrtc.nvrtcGetPTX(prog, ptx))
        lowered = {}
        for n in names:
            (low,) = _nvrtc_check(nvrtc.nvrtcGetLoweredName(prog, n.encode()))
            lowered[n] = low.decode()
        return ptx, lowered
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def _compile_group(args):
    """Worker: compile and assemble one (file, names) group; (props per name, error or None)."""
    file, names, arch = args
    try:
        ptx, lowered = compile_ptx(file, names, arch)
        props = assemble(ptx, arch)
        return {n: props.get(lowered[n]) for n in names}, None
    except Exception as exc:  # one broken group: reported on each of its rows
        return {}, str(exc)


def groups() -> list[tuple[str, list[str]]]:
    """The instantiations (:func:`instantiations`) as compilation groups: ``(file, names)``, one
    per (file, element type), each name expression once."""
    out: dict = {}
    for file, op, direction, spec, name in instantiations():
        key = (file, name[name.index("<") + 1:].split(",")[0].rstrip(">"))
        out.setdefault(key, [])
        if name not in out[key]:
            out[key].append(name)
    return [(file, names) for (file, _), names in out.items()]


def map_groups(fn, jobs: list, workers: int | None = None, bar=None, label=None) -> list:
    """``[fn(job) for job in jobs]`` in ``workers`` forked processes (default: the CPUs
    available), results in order; ``bar`` (a :class:`dwops.bench.report.Progress`) steps with
    ``label(job)`` as each job finishes."""
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = max(1, min(workers or 1, len(jobs)))

    def step(job):
        if bar is not None:
            bar.step(label(job) if label else "")

    if workers == 1:
        out = []
        for j in jobs:
            out.append(fn(j))
            step(j)
        return out
    import concurrent.futures
    import multiprocessing

    ctx = multiprocessing.get_context("fork" if hasattr(os, "fork") else "spawn")
    out = [None] * len(jobs)
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        futures = {pool.submit(fn, j): i for i, j in enumerate(jobs)}
        for fut in concurrent.futures.as_completed(futures):
            out[futures[fut]] = fut.result()
            step(jobs[futures[fut]])
    return out


def compile_report(arch: str = "sm_90", workers: int | None = None) -> list[dict]:
    """Compile every instantiation (:func:`instantiations`) through NVRTC for compute_XX and
    assemble for ``arch`` with nvJitLink, one compilation per (file, dtype) group, groups in
    parallel processes (``workers``, default: the CPUs available). One row per instantiation:
    backend, op, direction, specialization, registers, shared_bytes (static), spill_bytes, error
    (None or a message), file and name (the template name expression)."""
    insts = instantiations()
    jobs = [(file, names, arch) for file, names in groups()]
    outcomes = map_groups(_compile_group, jobs, workers)
    results, errors = {}, {}
    for (file, names, _), (props, err) in zip(jobs, outcomes):
        for n in names:
            if err is not None:
                errors[(file, n)] = err
            else:
                results[(file, n)] = props.get(n)
    rows, seen = [], set()
    for file, op, direction, spec, name in insts:
        if (file, name) in seen:
            continue
        seen.add((file, name))
        r = results.get((file, name))
        err = errors.get((file, name))
        if r is None and err is None:
            err = "no ptxas report for this entry"
        rows.append({
            "backend": "cupy", "op": op, "direction": direction,
            "specialization": f"{name} [{spec}]",
            "registers": r["registers"] if r else None,
            "shared_bytes": r["shared_bytes"] if r else None,
            "spill_bytes": r["spill_bytes"] if r else None,
            "error": err, "file": file, "name": name,
        })
    return rows




def _module(file: str, name: str):
    """The CuPy module of one name expression, exactly as the backend builds it (so the disk
    cache entry :func:`warm_cache` writes is the one a later launch reads)."""
    import cupy

    return cupy.RawModule(code=source(file), options=compile_options(), name_expressions=[name])


def _warm_one(item) -> str:
    file, name = item
    _module(file, name).get_function(name)
    return name


def warm_cache(workers: int | None = None) -> int:
    """Compile every instantiation (:func:`instantiations`) for the current GPU into CuPy's
    on-disk kernel cache, ``workers`` processes at a time (default: the CPUs available), so that
    later launches load binaries instead of running NVRTC one name expression at a time. Needs a
    GPU. Returns the number of name expressions compiled."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    items = sorted({(row[0], row[-1]) for row in instantiations()})
    workers = workers or len(os.sched_getaffinity(0))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        done = list(pool.map(_warm_one, items, chunksize=4))
    return len(done)
