"""The limits of a CUDA device that the ``cupy`` backend's launch plans depend on.

A plan asks for shared memory, threads and a grid; what a device can grant differs between GPUs
(an H100/H200 lets one block opt in to 227 KiB of shared memory, an A100 163 KiB, an RTX 4090
99 KiB, older or smaller parts 48 KiB without opting in) and so does the number of SMs a grid
must fill. :func:`limits` reads them from the device through CuPy (``cudaDeviceGetAttribute``),
once per device; the plans in ``cupy_plans`` take a :class:`DeviceLimits` and never ask for more
than it allows (a problem no plan fits raises ``NotImplementedError``, which makes
``backend="auto"`` choose another backend).

:data:`PROFILES` are named devices: the plans' default (``h200``) and what the CUDA emulator
(``dwops.cudaemu``) reports as its device, chosen by ``DWOPS_CUDAEMU_DEVICE``, so that the plans
and kernels of every profile run on the CPU.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

KIB = 1024

# cudaDeviceAttr names as CuPy's Device.attributes spells them (the "cudaDevAttr" prefix removed)
_ATTRIBUTES = {
    "sms": "MultiProcessorCount",
    "smem_default": "MaxSharedMemoryPerBlock",
    "smem_optin": "MaxSharedMemoryPerBlockOptin",
    "smem_per_sm": "MaxSharedMemoryPerMultiprocessor",
    "max_threads_per_sm": "MaxThreadsPerMultiProcessor",
    "max_blocks_per_sm": "MaxBlocksPerMultiprocessor",
    "regs_per_sm": "MaxRegistersPerMultiprocessor",
    "l2_bytes": "L2CacheSize",
    "smem_per_block_reserved": "ReservedSharedMemoryPerBlock",
}

REG_UNIT = 256          # registers are allocated per warp in units of 256
SMEM_UNIT = 128         # shared memory is allocated per block in units of 128 bytes
SUB_PARTITIONS = 4      # an SM's registers are split among its four schedulers' warps
MAX_THREADS_PER_BLOCK = 1024
LIMITERS = ("threads", "registers", "shared_memory", "blocks")


@dataclass(frozen=True)
class DeviceLimits:
    """What one device grants a kernel launch.

    ``smem_default`` is the dynamic shared memory a block gets without opting in, ``smem_optin``
    the most it can opt in to (``cudaFuncAttributeMaxDynamicSharedMemorySize``; equal to
    ``smem_default`` where the device has no opt-in), ``smem_per_sm`` what all resident blocks of
    one SM share, ``smem_per_block_reserved`` what CUDA keeps per resident block."""

    name: str
    sms: int
    smem_optin: int
    smem_per_sm: int
    max_threads_per_sm: int
    l2_bytes: int
    smem_default: int = 48 * KIB
    max_blocks_per_sm: int = 32
    regs_per_sm: int = 64 * KIB
    max_regs_per_thread: int = 255
    smem_per_block_reserved: int = 1 * KIB

    @property
    def max_warps_per_sm(self) -> int:
        return self.max_threads_per_sm // 32

    def occupancy(self, threads: int, shared: int, regs_per_thread: int = 0) -> int:
        """Resident blocks per SM of ``threads`` threads and ``shared`` bytes of dynamic shared
        memory each (and ``regs_per_thread`` registers, where known) by :func:`occupancy`; 0
        for a launch the device refuses."""
        try:
            return occupancy(self, threads, regs_per_thread, shared)["blocks_per_sm"]
        except ValueError:
            return 0

    def attributes(self) -> dict:
        """The device attributes CuPy would report for this device (the emulator's answer to
        ``cupy.cuda.Device(i).attributes``)."""
        return {attr: getattr(self, field) for field, attr in _ATTRIBUTES.items()}

    @classmethod
    def from_attributes(cls, name: str, attrs: dict) -> "DeviceLimits":
        """Limits from CuPy's ``Device.attributes`` dictionary."""
        got = {field: int(attrs[attr]) for field, attr in _ATTRIBUTES.items() if attr in attrs}
        got["smem_optin"] = max(got.get("smem_optin", 0), got.get("smem_default", 48 * KIB))
        return cls(name=name, **got)


def _up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def occupancy(dev: DeviceLimits, threads_per_block: int, registers: int, dynamic_smem: int,
              static_smem: int = 0) -> dict:
    """Resident blocks of one launch per SM of ``dev``, by the CUDA occupancy rules: warps per
    block = threads rounded up to 32; registers per warp = per-thread registers rounded up to 8,
    times 32 (a multiple of 256), allocated within each of the SM's four sub-partitions (a
    quarter of the register file each; ``registers`` 0 = not counted); shared memory per block =
    static + dynamic rounded up to 128 bytes, plus ``dev.smem_per_block_reserved``, out of
    ``dev.smem_per_sm``; at most ``dev.max_warps_per_sm`` warps and ``dev.max_blocks_per_sm``
    blocks.

    Returns ``blocks_per_sm``, ``warps_per_sm``, ``occupancy`` (warps over the device's maximum),
    ``limiter`` (the first of :data:`LIMITERS` allowing the fewest blocks) and ``limits`` (blocks
    each resource allows). ValueError for a launch the device refuses (more than 1024 threads or
    the SM's threads, registers beyond the per-thread maximum or the register file, shared memory
    beyond the opt-in maximum)."""
    if not 1 <= threads_per_block <= min(MAX_THREADS_PER_BLOCK, dev.max_threads_per_sm):
        raise ValueError(f"threads_per_block={threads_per_block}: 1 to "
                         f"{min(MAX_THREADS_PER_BLOCK, dev.max_threads_per_sm)}")
    if not 0 <= registers <= dev.max_regs_per_thread:
        raise ValueError(f"registers={registers}: at most {dev.max_regs_per_thread} per thread")
    smem = static_smem + dynamic_smem
    if dynamic_smem < 0 or static_smem < 0 or smem > dev.smem_optin:
        raise ValueError(f"shared memory {smem} bytes: at most {dev.smem_optin} per block on "
                         f"{dev.name}")
    warps = -(-threads_per_block // 32)
    limits = {"threads": dev.max_warps_per_sm // warps}
    if registers:
        regs_warp = _up(registers, 8) * 32
        if regs_warp * _up(warps, SUB_PARTITIONS) > dev.regs_per_sm:
            raise ValueError(f"{threads_per_block} threads x {registers} registers: more than "
                             f"the {dev.regs_per_sm} registers of an SM")
        limits["registers"] = (dev.regs_per_sm // SUB_PARTITIONS // regs_warp) * \
            SUB_PARTITIONS // warps
    else:
        limits["registers"] = limits["threads"]
    limits["shared_memory"] = dev.smem_per_sm // (_up(smem, SMEM_UNIT) +
                                                  dev.smem_per_block_reserved)
    limits["blocks"] = dev.max_blocks_per_sm
    blocks = min(limits.values())
    limiter = next(k for k in LIMITERS if limits[k] == blocks)
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * warps,
            "occupancy": blocks * warps / dev.max_warps_per_sm, "limiter": limiter,
            "limits": limits}


PROFILES = {
    "h200": DeviceLimits("h200", sms=132, smem_optin=227 * KIB, smem_per_sm=228 * KIB,
                         max_threads_per_sm=2048, l2_bytes=60 * KIB * KIB),
    "a100": DeviceLimits("a100", sms=108, smem_optin=163 * KIB, smem_per_sm=164 * KIB,
                         max_threads_per_sm=2048, l2_bytes=40 * KIB * KIB),
    "rtx4090": DeviceLimits("rtx4090", sms=128, smem_optin=99 * KIB, smem_per_sm=100 * KIB,
                            max_threads_per_sm=1536, l2_bytes=72 * KIB * KIB, max_blocks_per_sm=24),
    # a small device without the opt-in: 48 KiB per block, 16 SMs
    "min": DeviceLimits("min", sms=16, smem_optin=48 * KIB, smem_per_sm=64 * KIB,
                        max_threads_per_sm=1024, l2_bytes=2 * KIB * KIB, max_blocks_per_sm=16),
}
H200 = PROFILES["h200"]

_cache: dict = {}
_lock = threading.Lock()


def limits(ordinal: int | None = None) -> DeviceLimits:
    """The limits of CUDA device ``ordinal`` (default: the current device), read once per device."""
    import cupy

    if ordinal is None:
        ordinal = cupy.cuda.runtime.getDevice()
    got = _cache.get(ordinal)
    if got is None:
        dev = cupy.cuda.Device(ordinal)
        got = DeviceLimits.from_attributes(f"device {ordinal}", dev.attributes)
        with _lock:
            got = _cache.setdefault(ordinal, got)
    return got


def clear_cache() -> None:
    """Forget the limits read so far (the emulator's profile changed)."""
    with _lock:
        _cache.clear()
