"""GPU ceilings and occupancy limits for the kernel model.

Each number is data with its source. ``dram_bw`` is the bandwidth a device-to-device copy reaches
(bytes read plus bytes written per second), the ceiling a memory-bound kernel is judged against; where
no copy has been measured it is the datasheet peak times ``COPY_FRACTION`` and says so. Rates derived
from the SM count and clock (shared-memory wavefronts, instruction issue, FP32 FMA) use the boost
clock: one shared-memory wavefront (128 bytes) per SM per clock, four warp schedulers issuing one
instruction each per clock, 128 FP32 lanes per SM. The launch limits (SMs, shared memory,
registers, threads, L2 size) are the device profiles the ``cupy`` backend plans for
(:data:`dwops.kernels.cupy_device.PROFILES`), so that the model and the plans agree.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..kernels.cupy_device import PROFILES, DeviceLimits

COPY_FRACTION = 0.9  # datasheet DRAM peak -> copy bandwidth, where no copy was measured


@dataclass(frozen=True)
class Device:
    name: str
    arch: str                 # the machine-code target the kernels are assembled for
    limits: DeviceLimits      # SMs, shared memory, registers, threads, L2 size
    clock_hz: float           # boost clock
    dram_bw: float            # bytes/s, copy (read + write)
    l2_bw: float              # bytes/s, L2 hits, whole chip
    fp32_flops: float         # FMA = 2 FLOP
    tensor_bf16_flops: float  # dense, fp32 accumulation
    launch_s: float           # launch and tail cost per kernel, back to back in a stream
    sources: str

    @property
    def sm_count(self) -> int:
        return self.limits.sms

    @property
    def l2_bytes(self) -> int:
        return self.limits.l2_bytes

    @property
    def smem_optin(self) -> int:
        return self.limits.smem_optin

    @property
    def max_warps_per_sm(self) -> int:
        return self.limits.max_warps_per_sm

    @property
    def smem_wavefronts_per_s(self) -> float:
        return self.sm_count * self.clock_hz

    @property
    def issue_per_s(self) -> float:
        """Warp instructions issued per second (four schedulers per SM)."""
        return 4 * self.sm_count * self.clock_hz


DEVICES = {
    "h200": Device(
        name="NVIDIA H200 SXM", arch="sm_90", limits=PROFILES["h200"], clock_hz=1.98e9,
        dram_bw=4.3e12, l2_bw=7.0e12, fp32_flops=66.9e12, tensor_bf16_flops=990e12,
        launch_s=2.5e-6,
        sources=("NVIDIA H200 datasheet (4.8 TB/s HBM3e, 990 TFLOP/s dense bf16, 67 TFLOP/s fp32); "
                 "a PyTorch device-to-device copy at 4.3 TB/s and 132 SMs, 60 MB L2, 1980 MHz "
                 "under load, as reported on an H200; CUDA C Programming Guide, compute "
                 "capability 9.0 limits; L2 bandwidth a lead: about 5.5 TB/s measured on an "
                 "H100 PCIe (114 SMs, 1755 MHz, chipsandcheese.com, 2023) scaled to 132 SMs "
                 "at 1980 MHz"),
    ),
    "a100": Device(
        name="NVIDIA A100 SXM4 80GB", arch="sm_80", limits=PROFILES["a100"], clock_hz=1.41e9,
        dram_bw=COPY_FRACTION * 2.039e12, l2_bw=4.0e12, fp32_flops=19.5e12,
        tensor_bf16_flops=312e12, launch_s=3.0e-6,
        sources=("NVIDIA A100 datasheet (2039 GB/s, 312 TFLOP/s bf16 dense, 19.5 TFLOP/s fp32); "
                 "CUDA C Programming Guide, compute capability 8.0 limits; L2 bandwidth a lead "
                 "(about 2x DRAM, chipsandcheese.com, 2023)"),
    ),
    "rtx4090": Device(
        name="NVIDIA GeForce RTX 4090", arch="sm_89", limits=PROFILES["rtx4090"], clock_hz=2.52e9,
        dram_bw=COPY_FRACTION * 1.008e12, l2_bw=3.5e12, fp32_flops=82.6e12,
        tensor_bf16_flops=82.6e12, launch_s=3.0e-6,
        sources=("NVIDIA Ada GPU architecture whitepaper (1008 GB/s, 82.6 TFLOP/s fp32, 82.6 "
                 "TFLOP/s dense bf16 with fp32 accumulation on GeForce); CUDA C Programming "
                 "Guide, compute capability 8.9 limits; L2 bandwidth a lead"),
    ),
}


def device(name: str) -> Device:
    try:
        return DEVICES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown device {name!r}: one of {', '.join(DEVICES)}") from None
