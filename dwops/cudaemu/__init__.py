"""A CPU emulator for dwops' CUDA C++ kernels, and a NumPy-backed stand-in for the part of CuPy
the ``cupy`` backend uses, so that the backend's own host code (launch plans, argument lists,
temporaries) and the kernel sources run end to end on a machine without a GPU.

How a launch runs (see ``emu.h``): the ``.cuh`` source of the backend, with ``include/`` standing in
for ``cuda_fp16.h`` / ``cuda_bf16.h``, is compiled by the host C++ compiler into a shared library
with one entry point per template name expression. Each CUDA thread is a fiber, blocks run one
after another, ``__syncthreads`` and warp shuffles are real rendezvous points. Every launch runs
twice from the same inputs, threads (and blocks) in forward and in reverse order: results that
differ mean a race. Device arrays live in guarded mappings (a ``PROT_NONE`` page on each side,
canary bytes in the slack), checked after every launch; dynamic shared memory is poisoned with NaN
bytes and ends at a guard page. Launch limits (threads per block, grid y/z, dynamic shared memory
over 48 KiB without the opt-in attribute, the device's opt-in limit) and argument types (count,
pointer or scalar, size) are checked as a CUDA launch would, or stricter.

The device the stand-in reports (``cupy.cuda.Device(i).attributes``, the occupancy query) is a
profile of ``dwops.kernels.cupy_device.PROFILES`` named by ``DWOPS_CUDAEMU_DEVICE``: ``h200``
(the default: 227 KiB of shared memory per block, 132 SMs), ``a100`` (163 KiB, 108 SMs),
``rtx4090`` (99 KiB, 128 SMs) or ``min`` (48 KiB without opt-in, 16 SMs). The backend plans for
that device, and a launch or an opt-in beyond its limits fails, so the plans of each profile run
here. The occupancy it reports counts threads and shared memory, not registers.

Use::

    from dwops import cudaemu
    cudaemu.install()            # sys.modules["cupy"] = the stand-in (before dwops imports cupy)

It serves the tests and the kernel model (``python -m dwops model``); it needs a host C++
compiler, is slow (small shapes), and knows only what dwops' kernels use.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import mmap
import os
import re
import subprocess
import sys
import tempfile
import threading
import types
import weakref

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
INCLUDE = os.path.join(HERE, "include")
CXX = os.environ.get("CXX", "g++")
# compiled with the alignment check (emu.h handles its reports), linked without libubsan
CXXFLAGS = ["-std=c++17", "-O1", "-g0", "-fPIC", "-fvisibility=hidden", "-fsanitize=alignment",
            "-Wno-unknown-pragmas", "-Wno-attributes"]
SMEM_DEFAULT = 48 * 1024
# the traced variant: GCC's ThreadSanitizer instrumentation (its hooks defined in trace.h, no
# libtsan) and line tables for the per-line report
TRACE_FLAGS = ["-g1", "-fno-tree-sra", "-fsanitize=thread", "--param=tsan-instrument-func-entry-exit=0",
               "-DDWEMU_TRACE"]
TRACE_SOURCE = "dwemu-kernel-source"
CACHE = os.environ.get("DWOPS_CUDAEMU_CACHE",
                       os.path.join(tempfile.gettempdir(), f"dwops-cudaemu-{os.getuid()}"))


class EmuError(RuntimeError):
    """A launch that CUDA would reject, or a kernel fault the emulator caught (race, out-of-bounds
    write, barrier misuse)."""


# ----------------------------------------------------------------------------- guarded memory

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
PAGE = mmap.PAGESIZE
CANARY = 0xA5
ALIGN = 256  # cudaMalloc's alignment


class _Allocation:
    """One device allocation: ``[guard page][canary | data | canary][guard page]``, the data
    256-byte aligned and as close to the upper guard page as that allows."""

    live: "weakref.WeakSet[_Allocation]" = weakref.WeakSet()

    def __init__(self, nbytes: int):
        body = -(-(max(nbytes, 1) + ALIGN) // PAGE) * PAGE
        self.mm = mmap.mmap(-1, body + 2 * PAGE)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.mm))
        end = base + PAGE + body
        start = (end - nbytes) // ALIGN * ALIGN
        self.lo, self.hi = PAGE, PAGE + body
        self.start, self.stop = start - base, start - base + nbytes
        raw = np.frombuffer(self.mm, np.uint8)
        raw[self.lo:self.start] = CANARY
        raw[self.stop:self.hi] = CANARY
        self.data = raw[self.start:self.stop]
        self.raw = raw
        for off in (0, PAGE + body):
            if _libc.mprotect(base + off, PAGE, 0) != 0:
                raise OSError(ctypes.get_errno(), "mprotect")
        _Allocation.live.add(self)

    def check(self):
        if not (np.all(self.raw[self.lo:self.start] == CANARY)
                and np.all(self.raw[self.stop:self.hi] == CANARY)):
            bad = np.flatnonzero(np.concatenate([self.raw[self.lo:self.start],
                                                 self.raw[self.stop:self.hi]]) != CANARY)
            raise EmuError(f"out-of-bounds write next to a {self.stop - self.start}-byte "
                           f"allocation ({bad.size} canary bytes changed)")


def _check_allocations(arrays) -> None:
    """Raise EmuError if a launch wrote past any of its device arrays (their canary bytes)."""
    for a in arrays:
        alloc = getattr(a, "_alloc", None)
        if alloc is not None:
            alloc.check()


def _explain(message: str) -> str:
    """Append which allocation an address in ``message`` lies in or next to."""
    m = re.search(r"address 0x([0-9a-f]+)", message)
    if not m:
        return message
    addr = int(m.group(1), 16)
    for a in list(_Allocation.live):
        base = ctypes.addressof(ctypes.c_char.from_buffer(a.mm))
        start, stop = base + a.start, base + a.stop
        if base <= addr < base + a.hi + PAGE:
            where = (f"{addr - stop} bytes past the end" if addr >= stop else
                     f"{start - addr} bytes before the start" if addr < start else
                     f"at byte {addr - start}")
            return f"{message} ({where} of a {a.stop - a.start}-byte allocation)"
    return message


class ndarray(np.ndarray):
    """A NumPy array standing in for a CuPy device array: ``.data.ptr`` and ``.device``."""

    def __array_finalize__(self, obj):
        self._alloc = getattr(obj, "_alloc", None)

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.ctypes.data)

    @property
    def device(self):
        return Device(0)

    def get(self):
        return np.array(self)


def empty(shape, dtype=np.float32, order="C"):
    dtype = np.dtype(dtype)
    shape = (shape,) if np.ndim(shape) == 0 else tuple(shape)
    n = int(np.prod(shape, dtype=np.int64))
    alloc = _Allocation(n * dtype.itemsize)
    a = alloc.data.view(dtype)[:n].reshape(shape).view(ndarray)
    a._alloc = alloc
    return a


def asarray(a, dtype=None):
    if isinstance(a, ndarray) and (dtype is None or a.dtype == dtype) and a.flags.c_contiguous:
        return a
    src = np.asarray(a, dtype=dtype)
    out = empty(src.shape, src.dtype)
    out[...] = src
    return out


def ascontiguousarray(a, dtype=None):
    return asarray(a, dtype)


def full(shape, fill_value, dtype=None):
    out = empty(shape, dtype if dtype is not None else np.asarray(fill_value).dtype)
    out[...] = fill_value
    return out


def asnumpy(a):
    return np.array(a)


def get_array_module(*args):
    return np


def from_dlpack(obj):
    return asarray(np.from_dlpack(obj))


def device_profile():
    """The emulated device's limits: the profile ``DWOPS_CUDAEMU_DEVICE`` names (default h200)."""
    from ..kernels.cupy_device import PROFILES

    name = os.environ.get("DWOPS_CUDAEMU_DEVICE", "h200") or "h200"
    if name not in PROFILES:
        raise EmuError(f"DWOPS_CUDAEMU_DEVICE={name!r}: the profiles are {', '.join(PROFILES)}")
    return PROFILES[name]


@contextlib.contextmanager
def device(name: str):
    """Emulate the device profile ``name`` inside the block (and forget the limits the backend
    read for the previous one)."""
    from ..kernels import cupy_device

    old = os.environ.get("DWOPS_CUDAEMU_DEVICE")
    os.environ["DWOPS_CUDAEMU_DEVICE"] = name
    cupy_device.clear_cache()
    try:
        device_profile()
        yield
    finally:
        if old is None:
            os.environ.pop("DWOPS_CUDAEMU_DEVICE", None)
        else:
            os.environ["DWOPS_CUDAEMU_DEVICE"] = old
        cupy_device.clear_cache()


class Device:
    def __init__(self, ordinal=0):
        self.id = ordinal

    @property
    def attributes(self) -> dict:
        return device_profile().attributes()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Stream:
    ptr = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @classmethod
    def from_external(cls, _handle):
        return cls()


_Stream.null = _Stream()


# ----------------------------------------------------------------------------- kernel modules

_SMEM_DECL = re.compile(r"extern\s+__shared__\s+__align__\(\d+\)\s+unsigned\s+char\s+smem_raw\[\];")


def _emu_source(code: str) -> str:
    """The kernel source for the host compiler: dynamic shared memory is the emulator's mapping."""
    return _SMEM_DECL.sub("unsigned char* const smem_raw = dwemu::g_smem;", code)


def _launch_bounds(code: str) -> dict:
    """Template name -> the max threads per block of its __launch_bounds__ (macros resolved)."""
    macros = dict(re.findall(r"#define\s+(\w+)\s+(\d+)", code))
    out = {}
    # the arguments may hold parentheses one level deep: (256, sizeof(T) == 8 ? 1 : 2)
    for bound, name in re.findall(r"__launch_bounds__\((\w+)(?:[^()]|\([^()]*\))*\)\s*(\w+)\s*\(",
                                  code):
        out[name] = int(macros.get(bound, bound))
    return out


_build_lock = threading.Lock()


def build(code: str, names: list[str], trace: bool = False) -> str:
    """Compile ``names`` (template name expressions) of ``code`` into a shared library (cached on
    disk by content) and return its path. ``trace``: the traced variant (see :func:`tracing`),
    a separate library compiled with ``TRACE_FLAGS``."""
    with open(os.path.join(HERE, "emu.h")) as f:
        emu = f.read()
    headers = "".join(open(os.path.join(INCLUDE, h)).read() for h in sorted(os.listdir(INCLUDE)))
    flags = CXXFLAGS
    if trace:
        with open(os.path.join(HERE, "trace.h")) as f:
            emu += f.read()
        flags = [f for f in CXXFLAGS if f != "-g0"] + TRACE_FLAGS
    # traced: line numbers of the kernel source as given (the per-line report maps them)
    lines = ['#include "emu.h"', f'#line 1 "{TRACE_SOURCE}"' if trace else None,
             _emu_source(code), ""]
    lines = [ln for ln in lines if ln is not None]
    for i, n in enumerate(names):
        lines.append(f"DWEMU_EXPORT int dwemu_launch_{i}(void** a, dim3 g, dim3 b, size_t s, "
                     f"int o, char* e, int n) {{ return dwemu::launch(&{n}, a, g, b, s, o, e, n); }}")
        lines.append(f"DWEMU_EXPORT int dwemu_params_{i}(int* s, int* k, int cap) "
                     f"{{ return dwemu::params(&{n}, s, k, cap); }}")
    unit = "\n".join(lines) + "\n"
    key = hashlib.sha256("\0".join([emu, headers, unit, " ".join(flags), CXX]).encode())
    os.makedirs(CACHE, exist_ok=True)
    lib = os.path.join(CACHE, key.hexdigest()[:24] + ".so")
    with _build_lock:
        if not os.path.exists(lib):
            src = lib[:-3] + ".cpp"
            with open(src, "w") as f:
                f.write(unit)
            tmp = f"{lib}.{os.getpid()}.tmp"
            obj = tmp + ".o"
            for cmd in ([CXX, *flags, f"-I{HERE}", f"-I{INCLUDE}", "-c", src, "-o", obj],
                        [CXX, "-shared", obj, "-o", tmp]):
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode != 0:
                    raise EmuError(f"host compile failed ({' '.join(cmd)}):\n{res.stderr[-6000:]}")
            os.remove(obj)
            os.replace(tmp, lib)
    return lib


class _dim3(ctypes.Structure):
    _fields_ = [("x", ctypes.c_uint), ("y", ctypes.c_uint), ("z", ctypes.c_uint)]


class Library:
    """A built shared library of kernels: name expression -> :class:`Function`."""

    _prebuilt: dict = {}   # (code, name) -> Library, filled by :func:`prebuild`

    def __init__(self, code: str, names: list[str]):
        self.code = code
        self.names = list(names)
        self._lib = None
        self.bounds = _launch_bounds(code)
        self.index = {n: i for i, n in enumerate(names)}
        self._traced = None

    @property
    def lib(self):
        """The untraced build (compiled on first use: a library only traced never needs it)."""
        if self._lib is None:
            self._lib = ctypes.CDLL(build(self.code, self.names))
        return self._lib

    def handle(self):
        """A loaded build that has the entry points: the untraced one, or while tracing (and
        the untraced one is not built) the traced one."""
        if self._lib is None and _tracing is not None:
            return self.traced().lib
        return self.lib

    def function(self, name: str) -> "Function":
        return Function(self, name, self.index[name])

    def traced(self) -> "_TracedLibrary":
        """The traced variant of this library (built on first use)."""
        if self._traced is None:
            self._traced = _TracedLibrary(self.code, self.names)
        return self._traced


def prebuild(code: str, names: list[str]) -> None:
    """Compile ``names`` of ``code`` in one library, used by every later RawModule asking for any
    of them (one compiler run instead of one per name)."""
    lib = Library(code, list(names))
    for n in names:
        Library._prebuilt[(code, n)] = lib


def prebuild_report(workers: int = 2) -> int:
    """Build every instantiation of the cupy backend's kernel report, one library per (file,
    element type), ``workers`` compilers at a time, and register them for later RawModules (a
    warm disk cache makes this a lookup). Returns the number of name expressions."""
    from concurrent.futures import ThreadPoolExecutor

    from dwops.kernels import cupy_compile as cc
    from dwops.kernels import cupy_plans as plans

    groups: dict = {}
    for row in plans.instantiations():
        file, name = row[0], row[-1]
        ctype = name.split("<", 1)[1].split(",")[0].split(">")[0].strip()
        group = groups.setdefault((file, ctype), [])
        if name not in group:
            group.append(name)
    with ThreadPoolExecutor(max(1, workers)) as pool:   # g++ runs as subprocesses
        list(pool.map(lambda fn: build(cc.source(fn[0]), fn[1]),
                      [(f, names) for (f, _), names in groups.items()]))
    for (file, _), names in groups.items():
        prebuild(cc.source(file), names)
    return sum(len(v) for v in groups.values())


class RawModule:
    """CuPy's RawModule: ``code`` compiled with one library per module (or a prebuilt one)."""

    def __init__(self, code: str, options=(), name_expressions=()):
        self.code = code
        self.names = list(name_expressions)
        self._lib = None

    def get_function(self, name: str) -> "Function":
        lib = Library._prebuilt.get((self.code, name))
        if lib is None:
            if self._lib is None:
                self._lib = Library(self.code, self.names)
            lib = self._lib
        return lib.function(name)


stats = {"launches": 0, "names": set()}   # launches run, template name expressions launched
_functions: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()   # ptr -> Function


def occupancy_max_active_blocks_per_multiprocessor(ptr: int, threads: int, shared: int) -> int:
    """cudaOccupancyMaxActiveBlocksPerMultiprocessor for the emulated device profile: blocks of
    ``threads`` threads and ``shared`` bytes of dynamic shared memory resident per SM, from
    threads and shared memory (registers are not modelled); 0 past the kernel's launch bounds."""
    fn = _functions.get(ptr)
    if fn is None:
        raise EmuError(f"occupancy query for an unknown function handle {ptr:#x}")
    if threads > fn.max_threads:
        return 0
    return device_profile().occupancy(threads, shared)


class Function:
    """A kernel: ``fn(grid, block, args, shared_mem=...)`` as CuPy's RawKernel call."""

    def __init__(self, lib: Library, name: str, index: int):
        self.name = name
        self._lib, self._index = lib, index
        self._entry = None
        sizes, kinds = (ctypes.c_int * 64)(), (ctypes.c_int * 64)()
        n = getattr(lib.handle(), f"dwemu_params_{index}")(sizes, kinds, 64)
        self.params = [(sizes[i], kinds[i]) for i in range(n)]
        template = name.split("<", 1)[0].strip()
        self.max_threads = lib.bounds.get(template, 1024)
        self._max_shared = SMEM_DEFAULT
        _functions[id(self)] = self

    @property
    def ptr(self) -> int:
        """A handle standing in for the CUfunction (what the occupancy query takes)."""
        return id(self)

    @property
    def max_dynamic_shared_size_bytes(self) -> int:
        return self._max_shared

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, value: int) -> None:
        limit = device_profile().smem_optin
        if value > limit:   # cudaFuncSetAttribute fails with cudaErrorInvalidValue
            raise EmuError(f"{self.name}: opting in to {value} bytes of dynamic shared memory, "
                           f"the {device_profile().name} profile allows {limit}")
        self._max_shared = int(value)

    def _untraced(self):
        if self._entry is None:
            f = getattr(self._lib.lib, f"dwemu_launch_{self._index}")
            f.restype = ctypes.c_int
            f.argtypes = [ctypes.POINTER(ctypes.c_void_p), _dim3, _dim3, ctypes.c_size_t,
                          ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
            self._entry = f
        return self._entry

    def _pack(self, args):
        if len(args) != len(self.params):
            raise EmuError(f"{self.name}: {len(args)} arguments for {len(self.params)} parameters")
        keep, slots, arrays = [], [], []
        for i, (a, (size, kind)) in enumerate(zip(args, self.params)):
            if kind == 0:
                if isinstance(a, np.ndarray):
                    if not a.flags.c_contiguous:
                        raise EmuError(f"{self.name}: argument {i} is a non-contiguous array")
                    c = ctypes.c_void_p(a.ctypes.data)
                    arrays.append(a)
                elif isinstance(a, np.uint64) and int(a) == 0:
                    c = ctypes.c_void_p(None)
                else:
                    raise EmuError(f"{self.name}: argument {i} should be a pointer, got {a!r}")
            else:
                if not isinstance(a, np.generic):
                    raise EmuError(f"{self.name}: argument {i} should be a NumPy scalar of "
                                   f"{size} bytes, got {type(a).__name__}")
                want = {1: "i", 2: "u", 3: "f"}[kind]
                if a.dtype.itemsize != size or a.dtype.kind != want:
                    what = {1: "int", 2: "uint", 3: "float"}[kind]
                    raise EmuError(f"{self.name}: argument {i} is {a.dtype}, the parameter is a "
                                   f"{size}-byte {what}")
                c = np.ctypeslib.as_ctypes(np.array(a))
            keep.append(c)
            slots.append(ctypes.cast(ctypes.pointer(c), ctypes.c_void_p))
        return keep, (ctypes.c_void_p * len(slots))(*slots), arrays

    def __call__(self, grid, block, args, shared_mem=0, stream=None):
        grid = tuple(grid) + (1,) * (3 - len(grid))
        block = tuple(block) + (1,) * (3 - len(block))
        nthreads = block[0] * block[1] * block[2]
        if min(grid) < 1 or min(block) < 1:
            raise EmuError(f"{self.name}: empty grid {grid} or block {block}")
        if nthreads > self.max_threads:
            raise EmuError(f"{self.name}: {nthreads} threads per block, __launch_bounds__ allows "
                           f"{self.max_threads}")
        if grid[0] >= 2 ** 31 or grid[1] > 65535 or grid[2] > 65535 or block[2] > 64:
            raise EmuError(f"{self.name}: grid {grid} / block {block} beyond CUDA's limits")
        if shared_mem > min(self.max_dynamic_shared_size_bytes, device_profile().smem_optin):
            raise EmuError(f"{self.name}: {shared_mem} bytes of dynamic shared memory, the "
                           f"function allows {self.max_dynamic_shared_size_bytes}")
        keep, argv, arrays = self._pack(args)
        # the bytes each pointer may touch: its whole allocation, or the array itself
        regions = []
        for a in arrays:
            alloc = getattr(a, "_alloc", None)
            regions.append(alloc.data if alloc is not None else a.view(np.uint8).reshape(-1))
        err = ctypes.create_string_buffer(1024)
        if _tracing is not None:   # one forward run of the traced build
            traced = self._lib.traced()
            run = traced.launcher(self._index)
            traced.begin(regions, _sample)
            rc = run(argv, _dim3(*grid), _dim3(*block), shared_mem, 0, err, 1024)
            counters, lines = traced.end()
            if rc:
                raise EmuError(f"{self.name}: {_explain(err.value.decode())}")
            _check_allocations(arrays)
            blocks = grid[0] * grid[1] * grid[2]
            ran = int(traced.lib.dwemu_trace_blocks_run())
            if 0 < ran < blocks:   # sampled: sums over the blocks run, scaled to the grid
                counters = {k: v if k == "load_bytes_in_flight_per_warp" else v * blocks / ran
                            for k, v in counters.items()}
            _tracing.append(LaunchTrace(self.name, grid, block, int(shared_mem), blocks,
                                        nthreads, counters, lines, ran))
            stats["launches"] += 1
            stats["names"].add(self.name)
            del keep
            return
        before = [r.copy() for r in regions]
        results = []
        for order in (0, 1):
            if order:
                for r, b in zip(regions, before):
                    r[...] = b
            rc = self._untraced()(argv, _dim3(*grid), _dim3(*block), shared_mem, order, err,
                                  1024)
            if rc:
                raise EmuError(f"{self.name}: {_explain(err.value.decode())}")
            _check_allocations(arrays)
            results.append([r.copy() for r in regions])
        stats["launches"] += 1
        stats["names"].add(self.name)
        for i, (r0, r1) in enumerate(zip(*results)):
            if not np.array_equal(r0, r1):
                at = int(np.flatnonzero(r0 != r1)[0])
                raise EmuError(f"{self.name}: race: argument array {i} differs at byte {at} "
                               "between forward and reverse thread/block order")
        del keep


# ----------------------------------------------------------------------------- memory trace

KINDS = ("global_load", "global_store", "shared_load", "shared_store", "shared_cp_async")
_tracing: "list | None" = None   # the list of the innermost tracing() block, or None
_sample = 0                      # its max_blocks (0: every block)


@dataclasses.dataclass
class LaunchTrace:
    """The memory accesses of one traced launch (see :func:`tracing`).

    ``counters`` (sums over the launch; ``requests`` are warp-level: one per warp per dynamic
    instruction with at least one active lane):

    * ``global_{load,store}_requests``, ``_bytes`` (what the lanes asked for), ``_sectors``
      (distinct 32-byte sectors per request, summed), ``_ideal_sectors`` (ceil(distinct bytes /
      32) per request, summed); coalescing efficiency = ideal / sectors;
    * ``dram_{read,write}_bytes``: 32 x the launch's distinct sectors (L2 holds the working set);
      ``l2_{read,write}_bytes``: 32 x each block's distinct sectors, summed over blocks (the L1
      absorbs re-reads inside a block);
    * ``shared_{load,store,cp_async}_requests``, ``_wavefronts``, ``_ideal_wavefronts``: 32 banks
      of 4 bytes; a request of <= 4-byte accesses is one pass over the warp, 8-byte accesses two
      half-warp passes, 16-byte accesses four quarter-warp passes; a pass costs the maximum over
      banks of the distinct 4-byte words addressed in it (one word is a broadcast), at least 1
      when it has active lanes; ideal = ceil(distinct words / 32), at least 1; conflict ways =
      wavefronts / ideal. ``shared_cp_async_*`` is the shared side of cp.async;
    * ``cp_async_requests`` (warp-level cp.async instructions), ``cp_async_bytes`` (global bytes
      they read; the zero-fill form reads none): the global side is also in ``global_load_*``
      and in the DRAM / L2 read bytes;
    * ``barriers``: ``__syncthreads`` per block, summed over blocks; ``shuffles``: warp shuffle
      instructions (per warp);
    * ``load_bytes_in_flight_per_warp``: the mean, over every warp's load batches, of the global
      load bytes (cp.async included) the warp issued back to back before an access that may
      consume them (a shared or global store, a barrier, a cp.async wait, a shuffle).

    ``lines``: per source line and kind (``KINDS``), ``{file, line, kind, requests, sectors``
    (global) or ``wavefronts`` (shared)``, ideal}``; ``file`` is ``dwops/kernels/cuda/<f>.cuh``
    for the backend's kernels, ``<source>`` for other code (lines of the code as given).

    What is traced is the host compiler's code (GCC -O1 with ThreadSanitizer instrumentation,
    see ``trace.h``): which values it keeps in registers, which loads it merges or hoists, and
    the order of the accesses (hence the batches in flight) approximate nvcc's schedule; they
    are not nvcc's SASS.
    """

    name: str
    grid: tuple
    block: tuple
    smem: int
    blocks: int
    threads: int
    counters: dict
    lines: list
    blocks_run: int = 0


@contextlib.contextmanager
def tracing(max_blocks: int | None = None):
    """Trace every emulated launch in the block: ``with tracing() as launches:`` appends one
    :class:`LaunchTrace` per launch. While tracing, a launch runs once (forward thread order)
    from the traced build of its library (a separate cached variant; the untraced build is
    unchanged), with the same launch checks and guard-page / canary checks.

    ``max_blocks``: a launch of more blocks runs only a sample of them (four windows of
    ``max_blocks // 4`` consecutive blocks in linear order, x fastest, spread evenly from the
    first block to the last: edge tiles, interior tiles and neighbours that share halos) and its
    counters are the sample's sums times blocks / blocks run (``LaunchTrace.blocks_run``); the
    per-line rows are the sample's, unscaled. The outputs of a sampled launch are incomplete:
    for measurement only."""
    global _tracing, _sample
    prev, prev_sample, launches = _tracing, _sample, []
    _tracing, _sample = launches, int(max_blocks or 0)
    try:
        yield launches
    finally:
        _tracing, _sample = prev, prev_sample


def _symbols(path: str) -> dict:
    """name -> (value, size) of the defined symbols of a built library (``nm``)."""
    out = subprocess.run(["nm", "-S", "--defined-only", path], capture_output=True, text=True,
                         check=True).stdout
    syms = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 4:
            syms[parts[3]] = (int(parts[0], 16), int(parts[1], 16))
        elif len(parts) == 3:
            syms[parts[2]] = (int(parts[0], 16), 0)
    return syms


_STATIC_SHARED = re.compile(r"^\s*__shared__\s+[^;(]*?(\w+)\s*\[", re.M)


def _source_map(code: str) -> list:
    """(first line, line count, file) of each of the backend's .cuh files inside ``code``."""
    cuda = os.path.join(os.path.dirname(HERE), "kernels", "cuda")
    spans = []
    if os.path.isdir(cuda):
        for f in sorted(os.listdir(cuda)):
            if f.endswith(".cuh"):
                with open(os.path.join(cuda, f)) as fh:
                    text = fh.read()
                pos = code.find(text)
                if pos >= 0:
                    spans.append((code.count("\n", 0, pos) + 1, text.count("\n"),
                                  f"dwops/kernels/cuda/{f}"))
    return spans


class _TracedLibrary:
    """The traced build of a :class:`Library`: its launch entry points, the trace interface of
    ``trace.h``, the static ``__shared__`` arrays (from the symbol table) and pc -> source line."""

    def __init__(self, code: str, names: list[str]):
        self.path = build(code, names, trace=True)
        self.lib = lib = ctypes.CDLL(self.path)
        lib.dwemu_trace_names.restype = ctypes.c_char_p
        self.counter_names = lib.dwemu_trace_names().decode().split()
        lib.dwemu_trace_begin.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_int,
                                          ctypes.c_int, ctypes.c_longlong]
        lib.dwemu_trace_blocks_run.restype = ctypes.c_longlong
        lib.dwemu_trace_end.restype = ctypes.c_int
        lib.dwemu_trace_end.argtypes = [ctypes.POINTER(ctypes.c_double)]
        lib.dwemu_trace_lines.argtypes = [ctypes.POINTER(ctypes.c_uint64),
                                          ctypes.POINTER(ctypes.c_int),
                                          ctypes.POINTER(ctypes.c_double)]
        syms = _symbols(self.path)
        anchor = ctypes.cast(lib.dwemu_trace_names, ctypes.c_void_p).value
        self.base = anchor - syms["dwemu_trace_names"][0]
        shared = set(_STATIC_SHARED.findall(code))
        self.static_shared = []
        for sym, (value, size) in syms.items():
            m = re.match(r"_ZZ.*E(\d+)(\w+?)(_\w*)?$", sym)
            if m and m.group(2) in shared and int(m.group(1)) == len(m.group(2)) and size:
                self.static_shared.append((self.base + value, self.base + value + size))
        self.spans = _source_map(code)
        self.where: dict = {}   # pc offset -> (file, line)
        self.funcs: dict = {}

    def launcher(self, index: int):
        f = self.funcs.get(index)
        if f is None:
            f = getattr(self.lib, f"dwemu_launch_{index}")
            f.restype = ctypes.c_int
            f.argtypes = [ctypes.POINTER(ctypes.c_void_p), _dim3, _dim3, ctypes.c_size_t,
                          ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
            self.funcs[index] = f
        return f

    def begin(self, regions, sample: int = 0) -> None:
        ranges = []
        for r in regions:
            ranges += [r.ctypes.data, r.ctypes.data + r.size]
        for lo, hi in self.static_shared:
            ranges += [lo, hi]
        arr = (ctypes.c_uint64 * max(1, len(ranges)))(*ranges)
        self.lib.dwemu_trace_begin(arr, len(regions), len(self.static_shared), int(sample))

    def end(self):
        vals = (ctypes.c_double * len(self.counter_names))()
        n = self.lib.dwemu_trace_end(vals)
        pcs, kinds, rows = (ctypes.c_uint64 * n)(), (ctypes.c_int * n)(), (ctypes.c_double * (3 * n))()
        self.lib.dwemu_trace_lines(pcs, kinds, rows)
        counters = {}
        for k, v in zip(self.counter_names, vals):
            counters[k] = v if k == "load_bytes_in_flight_per_warp" else int(round(v))
        self._locate([pc - self.base for pc in pcs])
        merged: dict = {}
        for i in range(n):
            file, line = self.where[pcs[i] - self.base]
            kind = KINDS[kinds[i]]
            row = merged.setdefault((file, line, kind), [0.0, 0.0, 0.0])
            for j in range(3):
                row[j] += rows[3 * i + j]
        lines = []
        for (file, line, kind), (req, cost, ideal) in sorted(merged.items()):
            what = "sectors" if kind.startswith("global") else "wavefronts"
            lines.append({"file": file, "line": line, "kind": kind, "requests": int(req),
                          what: int(cost), "ideal": int(ideal)})
        return counters, lines

    def _locate(self, offsets) -> None:
        """pc offsets (return addresses) -> (file, line) with addr2line on the call instruction."""
        todo = sorted({o for o in offsets if o not in self.where})
        if not todo:
            return
        out = subprocess.run(["addr2line", "-e", self.path, *[hex(o - 1) for o in todo]],
                             capture_output=True, text=True, check=True).stdout.splitlines()
        for o, text in zip(todo, out):
            file, _, rest = text.partition(" (")[0].rpartition(":")
            line = int(rest) if rest.isdigit() else 0
            if os.path.basename(file) == TRACE_SOURCE:
                file = "<source>"
                for first, count, name in self.spans:
                    if first <= line < first + count:
                        file, line = name, line - first + 1
                        break
            self.where[o] = (file, line)


def check_access(traces, min_coalescing: float = 0.9, max_conflict_ways: float = 1.0,
                 kinds=("global_load", "global_store", "shared_load", "shared_store",
                        "shared_cp_async")) -> list:
    """The source lines of ``traces`` (a :class:`LaunchTrace` or several) that break the guard:
    global lines whose coalescing efficiency (ideal / sectors) is below ``min_coalescing``,
    shared lines whose conflict ways (wavefronts / ideal) exceed ``max_conflict_ways``; only the
    ``kinds`` given. Each row is the line's dict plus ``name`` (the kernel) and ``efficiency`` or
    ``ways``; an empty list passes."""
    if isinstance(traces, LaunchTrace):
        traces = [traces]
    bad = []
    for t in traces:
        for row in t.lines:
            if row["kind"] not in kinds:
                continue
            if row["kind"].startswith("global"):
                eff = row["ideal"] / row["sectors"] if row["sectors"] else 1.0
                if eff < min_coalescing:
                    bad.append({**row, "name": t.name, "efficiency": eff})
            else:
                ways = row["wavefronts"] / row["ideal"] if row["ideal"] else 1.0
                if ways > max_conflict_ways:
                    bad.append({**row, "name": t.name, "ways": ways})
    return bad


# ----------------------------------------------------------------------------- the cupy stand-in


def module() -> types.ModuleType:
    """A module object with the CuPy API the dwops cupy backend and its GPU tests use."""
    m = types.ModuleType("cupy")
    m.__dict__.update(
        ndarray=ndarray, empty=empty, asarray=asarray, ascontiguousarray=ascontiguousarray,
        full=full, asnumpy=asnumpy, get_array_module=get_array_module, from_dlpack=from_dlpack,
        RawModule=RawModule, __version__="emulated", __dwops_emulator__=True)
    runtime = types.SimpleNamespace(getDevice=lambda: 0, getDeviceCount=lambda: 1,
                                    deviceSynchronize=lambda: None)
    profiler = types.SimpleNamespace(start=lambda: None, stop=lambda: None)
    driver = types.SimpleNamespace(
        occupancyMaxActiveBlocksPerMultiprocessor=occupancy_max_active_blocks_per_multiprocessor)
    m.cuda = types.SimpleNamespace(runtime=runtime, driver=driver, profiler=profiler,
                                   Device=Device, Stream=_Stream,
                                   get_current_stream=lambda: _Stream.null)
    return m


def write_names_at_exit(path: str) -> None:
    """At interpreter exit, write the name expressions launched (one per line) to ``path``."""
    import atexit

    def dump():
        with open(path, "w") as f:
            f.write("".join(n + "\n" for n in sorted(stats["names"])))

    atexit.register(dump)


def install() -> types.ModuleType:
    """Put the stand-in at ``sys.modules["cupy"]`` (before anything imports the real CuPy)."""
    if "cupy" in sys.modules and not getattr(sys.modules["cupy"], "__dwops_emulator__", False):
        raise RuntimeError("the real cupy is already imported in this process")
    sys.modules["cupy"] = m = sys.modules.get("cupy") or module()
    return m
