"""Device limits of the cupy backend's plans (dwops/kernels/cupy_device.py): the occupancy count
against hand arithmetic, the attribute round trip, every plan within every profile's limits, and
the weight gradient's splits against the wave arithmetic they minimise."""

from __future__ import annotations

import math

import pytest

from dwops.kernels import cupy_plans as plans
from dwops.kernels.cupy_device import KIB, PROFILES, DeviceLimits
from tests.test_cupy_backend import _dw_problem

H200 = PROFILES["h200"]


def test_occupancy_counts_threads_shared_memory_and_registers():
    # 256 threads: 2048 / 256 = 8 blocks; 100 KiB each (+1 KiB reserved): 228 // 101 = 2
    assert H200.occupancy(256, 0) == 8
    assert H200.occupancy(256, 100 * KIB) == 2
    assert H200.occupancy(256, 227 * KIB) == 1
    assert H200.occupancy(256, 227 * KIB + 1) == 0
    # 128 registers a thread: 4096 per warp, 16 warps per SM, 2 blocks of 8 warps
    assert H200.occupancy(256, 0, regs_per_thread=128) == 2
    # 40 registers round up to 1280 per warp: 51 warps, 6 blocks of 8 warps
    assert H200.occupancy(256, 0, regs_per_thread=40) == 6
    assert PROFILES["min"].occupancy(256, 0) == 4            # 1024 threads per SM
    assert PROFILES["min"].occupancy(32, 0) == 16            # at most 16 blocks per SM
    assert PROFILES["rtx4090"].occupancy(1024, 0) == 1
    assert PROFILES["rtx4090"].occupancy(2048, 0) == 0


@pytest.mark.parametrize("name", list(PROFILES))
def test_attributes_round_trip(name):
    prof = PROFILES[name]
    assert DeviceLimits.from_attributes(name, prof.attributes()) == prof


def test_a_device_without_opt_in_gets_its_default():
    attrs = dict(PROFILES["h200"].attributes(), MaxSharedMemoryPerBlockOptin=0)
    assert DeviceLimits.from_attributes("old", attrs).smem_optin == 48 * KIB


def _problem(n, c, h, w, m, k, s, d, pad, layout, dtype):
    return _dw_problem(n=n, c=c, h=h, w=w, m=m, k=k, s=s, d=d, padding=pad, layout=layout,
                       dtype=dtype)


PROBLEMS = [
    (8, 32, 112, 112, 1, (3, 3), 1, 1, 1),
    (8, 96, 56, 56, 1, (3, 3), 2, 1, 1),
    (4, 64, 28, 28, 1, (7, 7), 1, 1, 3),
    (2, 16, 64, 64, 1, (31, 31), 1, 1, 15),
    (1, 8, 120, 120, 2, (13, 13), 1, 2, 12),
    (1, 2, 190, 196, 1, (31, 31), 1, 6, 0),
    (1, 4, 260, 260, 1, (31, 31), 2, 8, 0),
]


@pytest.mark.parametrize("name", list(PROFILES))
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
def test_every_plan_fits_the_device_it_is_made_for(name, layout, dtype):
    """Shared memory within the opt-in limit and at least one block resident per SM, for every
    op's plan on every profile; where the H200 plan exceeds a smaller device, that device gets
    a smaller plan or none (NotImplementedError), never the H200's."""
    dev = PROFILES[name]
    planned = 0
    for case in PROBLEMS:
        p = _problem(*case, layout, dtype)
        makers = {
            "forward": lambda d: [plans.plan_dw_forward(plans.conv_of_forward(p), dtype, layout,
                                                        dev=d)],
            "grad_input": lambda d: [plans.plan_dw_grad_input(p, layout, dev=d)],
            "grad_weight": lambda d: list(plans.plan_dw_grad_weight(p, layout, dev=d)[:2]),
        }
        for op, make in makers.items():
            try:
                launches = make(dev)
            except NotImplementedError:
                continue
            planned += 1
            for L in launches:
                assert L.shared <= dev.smem_optin, (name, case, op, L)
                assert dev.occupancy(math.prod(L.block), L.shared) >= 1, (name, case, op, L)
    assert planned >= (2 * len(PROBLEMS) if name == "h200" else len(PROBLEMS))


@pytest.mark.parametrize("ntiles, other, slots", [
    (100, 64, 264), (1, 5, 264), (7, 1000, 264), (5000, 3, 264), (64, 96, 128), (9, 9, 16),
    (300, 264, 264), (10_000, 1, 2112)])
def test_grad_weight_splits_minimise_waves_times_tiles(ntiles, other, slots):
    """The splits' cost ceil(splits * other / slots) * ceil(ntiles / splits) is the least over
    every split count within GW_MAX_WAVES waves (or one split per block column where the other
    blocks alone fill more waves), the fewest splits on a tie, and every tile is in one split."""
    splits, per = plans._splits(ntiles, other, slots)
    assert (splits - 1) * per < ntiles <= splits * per

    def cost(s):
        return -(-s * other // slots) * -(-ntiles // s)

    waves = max(plans.GW_MAX_WAVES, -(-other // slots))
    allowed = [s for s in range(1, ntiles + 1) if -(-s * other // slots) <= waves]
    best = min(cost(s) for s in allowed)
    assert cost(splits) == best
    assert splits == min(s for s in allowed if cost(s) == best)


def test_grad_weight_splits_fill_one_wave_by_hand():
    # 100 tiles, 64 channel blocks, 264 slots (2 blocks on each of 132 SMs): 4 splits of 25 tiles
    # fill one wave (256 blocks); 5 would need a second wave for 20 tiles each (cost 40)
    assert plans._splits(100, 64, 264) == (4, 25)
