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
over 48 KiB without the opt-in attribute, 227 KiB) and argument types (count, pointer or scalar,
size) are checked as a CUDA launch would, or stricter.

Use::

    from dwops import cudaemu
    cudaemu.install()            # sys.modules["cupy"] = the stand-in (before dwops imports cupy)

It serves the tests and the kernel model (``python -m dwops model``); it needs a host C++
compiler, is slow (small shapes), and knows only what dwops' kernels use.
"""

from __future__ import annotations

import ctypes
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
SMEM_OPTIN = 227 * 1024
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


class Device:
    def __init__(self, ordinal=0):
        self.id = ordinal

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


def build(code: str, names: list[str]) -> str:
    """Compile ``names`` (template name expressions) of ``code`` into a shared library (cached on
    disk by content) and return its path."""
    with open(os.path.join(HERE, "emu.h")) as f:
        emu = f.read()
    headers = "".join(open(os.path.join(INCLUDE, h)).read() for h in sorted(os.listdir(INCLUDE)))
    lines = ['#include "emu.h"', _emu_source(code), ""]
    for i, n in enumerate(names):
        lines.append(f"DWEMU_EXPORT int dwemu_launch_{i}(void** a, dim3 g, dim3 b, size_t s, "
                     f"int o, char* e, int n) {{ return dwemu::launch(&{n}, a, g, b, s, o, e, n); }}")
        lines.append(f"DWEMU_EXPORT int dwemu_params_{i}(int* s, int* k, int cap) "
                     f"{{ return dwemu::params(&{n}, s, k, cap); }}")
    unit = "\n".join(lines) + "\n"
    key = hashlib.sha256("\0".join([emu, headers, unit, " ".join(CXXFLAGS), CXX]).encode())
    os.makedirs(CACHE, exist_ok=True)
    lib = os.path.join(CACHE, key.hexdigest()[:24] + ".so")
    with _build_lock:
        if not os.path.exists(lib):
            src = lib[:-3] + ".cpp"
            with open(src, "w") as f:
                f.write(unit)
            tmp = f"{lib}.{os.getpid()}.tmp"
            obj = tmp + ".o"
            for cmd in ([CXX, *CXXFLAGS, f"-I{HERE}", f"-I{INCLUDE}", "-c", src, "-o", obj],
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
        self.lib = ctypes.CDLL(build(code, names))
        self.bounds = _launch_bounds(code)
        self.index = {n: i for i, n in enumerate(names)}

    def function(self, name: str) -> "Function":
        return Function(self, name, self.index[name])


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


class Function:
    """A kernel: ``fn(grid, block, args, shared_mem=...)`` as CuPy's RawKernel call."""

    def __init__(self, lib: Library, name: str, index: int):
        self.name = name
        self._launch = getattr(lib.lib, f"dwemu_launch_{index}")
        self._launch.restype = ctypes.c_int
        self._launch.argtypes = [ctypes.POINTER(ctypes.c_void_p), _dim3, _dim3, ctypes.c_size_t,
                                 ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        sizes, kinds = (ctypes.c_int * 64)(), (ctypes.c_int * 64)()
        n = getattr(lib.lib, f"dwemu_params_{index}")(sizes, kinds, 64)
        self.params = [(sizes[i], kinds[i]) for i in range(n)]
        template = name.split("<", 1)[0].strip()
        self.max_threads = lib.bounds.get(template, 1024)
        self.max_dynamic_shared_size_bytes = SMEM_DEFAULT

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
        if shared_mem > min(self.max_dynamic_shared_size_bytes, SMEM_OPTIN):
            raise EmuError(f"{self.name}: {shared_mem} bytes of dynamic shared memory, the "
                           f"function allows {self.max_dynamic_shared_size_bytes}")
        keep, argv, arrays = self._pack(args)
        # the bytes each pointer may touch: its whole allocation, or the array itself
        regions = []
        for a in arrays:
            alloc = getattr(a, "_alloc", None)
            regions.append(alloc.data if alloc is not None else a.view(np.uint8).reshape(-1))
        before = [r.copy() for r in regions]
        err = ctypes.create_string_buffer(1024)
        results = []
        for order in (0, 1):
            if order:
                for r, b in zip(regions, before):
                    r[...] = b
            rc = self._launch(argv, _dim3(*grid), _dim3(*block), shared_mem, order, err, 1024)
            if rc:
                raise EmuError(f"{self.name}: {_explain(err.value.decode())}")
            for a in arrays:
                alloc = getattr(a, "_alloc", None)
                if alloc is not None:
                    alloc.check()
            results.append([r.copy() for r in regions])
        stats["launches"] += 1
        stats["names"].add(self.name)
        for i, (r0, r1) in enumerate(zip(*results)):
            if not np.array_equal(r0, r1):
                at = int(np.flatnonzero(r0 != r1)[0])
                raise EmuError(f"{self.name}: race: argument array {i} differs at byte {at} "
                               "between forward and reverse thread/block order")
        del keep


# ----------------------------------------------------------------------------- the cupy stand-in


def module() -> types.ModuleType:
    """A module object with the CuPy API the dwops cupy backend and its GPU tests use."""
    m = types.ModuleType("cupy")
    m.__dict__.update(
        ndarray=ndarray, empty=empty, asarray=asarray, ascontiguousarray=ascontiguousarray,
        full=full, asnumpy=asnumpy, get_array_module=get_array_module, from_dlpack=from_dlpack,
        RawModule=RawModule, __version__="emulated", __dwops_emulator__=True)
    runtime = types.SimpleNamespace(getDevice=lambda: 0, getDeviceCount=lambda: 1)
    m.cuda = types.SimpleNamespace(runtime=runtime, Device=Device, Stream=_Stream,
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
