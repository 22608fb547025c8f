"""Where a benchmark runs: arrays, clocks, cache flushing and the copy bandwidth of one device.

Three implementations share one interface: :class:`HostDevice` (NumPy arrays, ``perf_counter``),
:class:`TorchCudaDevice` (PyTorch CUDA tensors, CUDA events) and :class:`CupyDevice` (CuPy arrays,
CUDA events, used when PyTorch has no CUDA). Every timed call is preceded by a write over twice the
last-level cache (the GPU's L2, the CPU's L3), outside the timed region, so each measurement starts
cold, as a layer does in a network whose activations do not fit in cache.

GPU timing. Each iteration is bracketed by two events on the current stream (the stream dwops and
PyTorch launch on), so only device time is counted. Before a batch of iterations the GPU is held
busy by a spin kernel long enough for the host to enqueue the whole batch; otherwise the host's
per-call work (argument checks, launch) would show up as idle time between the events. If the spin
finished before the host was done enqueueing (the host was slower than the device), it is lengthened
and the batch repeated; a run that still runs dry is reported on stderr.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

from .._registry import numpy_dtype

SPIN_HZ = 2.0e9  # clock64 ticks per second assumed when sizing the spin kernel (H100/H200 boost)
MAX_SPIN_S = 0.2  # longest spin before giving up on a batch running dry


def plan_iterations(estimate_s: float, target_s: float, min_iters: int, max_iters: int) -> int:
    """How many timed iterations fit in ``target_s`` given one call takes ``estimate_s``."""
    n = int(target_s / max(estimate_s, 1e-9))
    return max(min_iters, min(max_iters, n))


def nvidia_smi_query(fields: str) -> list[str] | None:
    """``nvidia-smi --query-gpu=<fields>`` for the first GPU, or None without nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, f"--query-gpu={fields}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    line = out.strip().splitlines()[0] if out.strip() else ""
    return [f.strip() for f in line.split(",")] if line else None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "cpu"


def _llc_bytes() -> int:
    """Size of the largest CPU cache (Linux sysfs), 32 MiB if unknown."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            try:
                with open(os.path.join(base, entry, "size")) as f:
                    txt = f.read().strip()
            except OSError:
                continue
            mult = {"K": 1024, "M": 1024**2}.get(txt[-1:], 1)
            best = max(best, int(txt.rstrip("KM")) * mult)
    except (OSError, ValueError):
        pass
    return best or 32 * 1024**2


class HostDevice:
    """NumPy arrays on the host; wall-clock timing with ``perf_counter``."""

    on_gpu = False
    lib = "numpy"
    driver = None

    def __init__(self):
        self.name = cpu_name()
        self.l2_bytes = _llc_bytes()
        flush = min(max(2 * self.l2_bytes, 8 * 1024**2), 256 * 1024**2)
        self._flush = np.empty(flush // 8)
        self._flush_value = 0.0

    # -- arrays
    def random(self, shape, dtype: str, seed: int):
        """Uniform(-1, 1) values rounded to ``dtype`` (never zeros)."""
        rng = np.random.default_rng(seed)
        return rng.uniform(-1.0, 1.0, size=shape).astype(np.float32).astype(numpy_dtype(dtype))

    def nhwc(self, a):
        """A C-contiguous (N, H, W, C) copy of an (N, C, H, W) array."""
        return np.ascontiguousarray(a.transpose(0, 2, 3, 1))

    def to_host(self, a, dtype: str):
        return np.asarray(a)

    def synchronize(self):
        pass

    def torch_view(self, a):
        """A torch tensor sharing ``a``'s memory (bfloat16 through a 16-bit integer view)."""
        import torch

        if a.dtype == numpy_dtype("bfloat16"):
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)

    def torch_device(self):
        return "cpu"

    # -- clocks
    def flush(self):
        self._flush_value += 1.0
        self._flush.fill(self._flush_value)

    def time(self, fn, *, warmup=1, min_iters=3, max_iters=30, target_s=0.5) -> list[float]:
        """Milliseconds of each timed call of ``fn`` (cache flushed before each, warm-up excluded)."""
        for _ in range(max(warmup, 1)):
            fn()
        self.flush()
        t0 = time.perf_counter()
        fn()
        est = time.perf_counter() - t0
        times = []
        for _ in range(plan_iterations(est, target_s, min_iters, max_iters)):
            self.flush()
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return times

    def copy_bandwidth_gbs(self, nbytes: int = 128 * 1024**2) -> float:
        """Bytes read plus bytes written per second by a large copy (NumPy, and PyTorch's threaded
        copy where installed: the better of the two is the floor)."""
        n = nbytes // 4
        src = np.random.default_rng(0).uniform(-1, 1, n).astype(np.float32)
        dst = np.empty_like(src)
        best = 0.0
        copies = [lambda: np.copyto(dst, src)]
        try:
            import torch

            ts, td = torch.from_numpy(src), torch.from_numpy(dst)
            copies.append(lambda: td.copy_(ts))
        except ImportError:
            pass
        for copy in copies:
            ms = statistics.median(self.time(copy, warmup=1, min_iters=5, max_iters=10,
                                             target_s=0.3))
            best = max(best, 2 * n * 4 / (ms * 1e-3) / 1e9)
        return best


class _CudaDevice:
    """Shared GPU timing: events around each call, a spin kernel to keep the host ahead."""

    on_gpu = True

    def _init_common(self):
        q = nvidia_smi_query("name,driver_version")
        self.driver = q[1] if q and len(q) > 1 else None
        self._dry_warned = False

    def time(self, fn, *, warmup=2, min_iters=10, max_iters=50, target_s=0.1) -> list[float]:
        for _ in range(max(warmup, 1)):
            fn()
        self.synchronize()
        self.flush()
        self.synchronize()
        t0 = time.perf_counter()
        fn()
        host = time.perf_counter() - t0
        self.synchronize()
        est = time.perf_counter() - t0
        n = plan_iterations(est, target_s, min_iters, max_iters)
        t0 = time.perf_counter()
        self.flush()
        flush_host = time.perf_counter() - t0
        spin_s = min(MAX_SPIN_S, 2.0 * n * (host + flush_host) + 1e-3)
        while True:
            starts = [self._event() for _ in range(n)]
            ends = [self._event() for _ in range(n)]
            mark = self._event(timing=False)
            self._spin(int(spin_s * SPIN_HZ))
            self._record(mark)
            for i in range(n):
                self.flush()
                self._record(starts[i])
                fn()
                self._record(ends[i])
            ran_dry = self._done(mark)
            self.synchronize()
            if not ran_dry:
                break
            if spin_s >= MAX_SPIN_S:
                if not self._dry_warned:
                    print("dwops bench: the host could not stay ahead of the GPU (a call "
                          "synchronizes or its host work outlasts a 0.2 s spin); GPU times may "
                          "include idle gaps", file=sys.stderr)
                    self._dry_warned = True
                break
            spin_s = min(MAX_SPIN_S, spin_s * 4)
        return [self._elapsed_ms(s, e) for s, e in zip(starts, ends)]

    def copy_bandwidth_gbs(self, nbytes: int = 1024**3) -> float:
        """Bytes read plus bytes written per second by a device-to-device copy of ``nbytes``."""
        src = self.random((nbytes // 4,), "float32", 0)
        dst = self._empty_like(src)
        ms = statistics.median(self.time(lambda: self._copy(dst, src), warmup=2, min_iters=10,
                                         max_iters=20, target_s=0.05))
        return 2 * nbytes / (ms * 1e-3) / 1e9


class TorchCudaDevice(_CudaDevice):
    """PyTorch CUDA tensors on the current device; events on torch's current stream."""

    lib = "torch"

    def __init__(self):
        import torch

        self.torch = torch
        self.dev = torch.device("cuda", torch.cuda.current_device())
        self.name = torch.cuda.get_device_name(self.dev)
        props = torch.cuda.get_device_properties(self.dev)
        l2 = self.l2_bytes = int(getattr(props, "L2_cache_size", 0) or 64 * 1024**2)
        self._flush_buf = torch.empty(2 * l2 // 4, dtype=torch.float32, device=self.dev)
        self._init_common()

    def random(self, shape, dtype, seed):
        t = self.torch
        g = t.Generator(device=self.dev)
        g.manual_seed(seed)
        a = t.empty(shape, dtype=t.float32, device=self.dev).uniform_(-1.0, 1.0, generator=g)
        return a.to(getattr(t, dtype))

    def nhwc(self, a):
        return a.permute(0, 2, 3, 1).contiguous()

    def to_host(self, a, dtype):
        return a.float().cpu().numpy().astype(numpy_dtype(dtype))

    def synchronize(self):
        self.torch.cuda.synchronize(self.dev)

    def torch_view(self, a):
        return a

    def torch_device(self):
        return self.dev

    def flush(self):
        self._flush_buf.zero_()

    def _event(self, timing=True):
        return self.torch.cuda.Event(enable_timing=timing)

    def _record(self, ev):
        ev.record()

    def _done(self, ev):
        return ev.query()

    def _elapsed_ms(self, s, e):
        return s.elapsed_time(e)

    def _spin(self, cycles):
        sleep = getattr(self.torch.cuda, "_sleep", None)
        if sleep is not None:
            sleep(cycles)

    def _empty_like(self, a):
        return self.torch.empty_like(a)

    def _copy(self, dst, src):
        dst.copy_(src)


_SPIN_SOURCE = r"""
extern "C" __global__ void dwops_bench_spin(long long cycles)  // cycles: clock64 ticks to wait
{
    long long start = clock64();
    while (clock64() - start < cycles) { }
}
"""


class CupyDevice(_CudaDevice):
    """CuPy arrays on the current device; events on CuPy's current stream."""

    lib = "cupy"

    def __init__(self):
        import cupy

        self.cupy = cupy
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        name = props["name"]
        self.name = name.decode() if isinstance(name, bytes) else str(name)
        l2 = self.l2_bytes = int(props.get("l2CacheSize", 0) or 64 * 1024**2)
        self._flush_buf = cupy.empty(2 * l2 // 4, dtype=cupy.float32)
        self._spin_kernel = cupy.RawKernel(_SPIN_SOURCE, "dwops_bench_spin")
        self._init_common()

    def random(self, shape, dtype, seed):
        cp = self.cupy
        a = cp.random.RandomState(seed).uniform(-1.0, 1.0, size=shape, dtype=cp.float32)
        return a.astype(numpy_dtype(dtype))

    def nhwc(self, a):
        return self.cupy.ascontiguousarray(a.transpose(0, 2, 3, 1))

    def to_host(self, a, dtype):
        return self.cupy.asnumpy(a).astype(numpy_dtype(dtype))

    def synchronize(self):
        self.cupy.cuda.get_current_stream().synchronize()

    def torch_view(self, a):
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("PyTorch has no CUDA here")
        return torch.from_dlpack(a)

    def torch_device(self):
        import torch

        return torch.device("cuda", self.cupy.cuda.Device().id)

    def flush(self):
        self._flush_buf.fill(0)

    def _event(self, timing=True):
        return self.cupy.cuda.Event(disable_timing=not timing)

    def _record(self, ev):
        ev.record()

    def _done(self, ev):
        return ev.done

    def _elapsed_ms(self, s, e):
        return self.cupy.cuda.get_elapsed_time(s, e)

    def _spin(self, cycles):
        self._spin_kernel((1,), (1,), (self.cupy.int64(cycles),))

    def _empty_like(self, a):
        return self.cupy.empty_like(a)

    def _copy(self, dst, src):
        dst[...] = src


def gpu_backends() -> list[str]:
    """GPU backends that can run here, in the registry's order of preference."""
    from .. import _registry

    return [n for n in _registry._GPU_PREFERENCE if _registry.available(n)]


def select(want: str = "auto"):
    """The device to benchmark on: a GPU when a GPU backend can run (``want`` = ``auto`` or
    ``gpu``), else the host. Arrays on the GPU are PyTorch tensors when PyTorch has CUDA (so
    PyTorch baselines share them), else CuPy arrays."""
    if want in ("auto", "gpu") and gpu_backends():
        try:
            import torch

            if torch.cuda.is_available():
                return TorchCudaDevice()
        except ImportError:
            pass
        return CupyDevice()
    if want == "gpu":
        raise RuntimeError("no GPU backend can run here (see `python -m dwops info`)")
    return HostDevice()
