"""The memory trace of the CUDA emulator (``dwops.cudaemu.tracing``).

Two parts:

* self-tests on small kernels whose counters are counted by hand: coalescing of vector and
  strided copies, DRAM and L2 bytes of a halo kernel, shared-memory bank conflicts (4-way,
  none, broadcast, 16-byte accesses), cp.async, barriers, shuffles and the loads in flight; and
  the guard (``check_access``) catching an uncoalesced and a bank-conflicting kernel;
* guards on the cupy backend's primary kernels (the backend on the NumPy stand-in for CuPy, as
  in tests/test_cupy_backend.py): depthwise forward, grad_input and grad_weight (3x3, stride 1
  and 2), pointwise, separable (fused), NCHW and NHWC, float32 and bfloat16: global loads and
  stores at least 90% coalesced and shared-memory loads free of bank conflicts, line by line;
  the lines below that bar today are recorded (``KNOWN``) and held where they are (a ratchet:
  no new failing line, none worse, and a fix fails the test until the record is updated).
"""

from __future__ import annotations

import functools
import re
import shutil
import sys

import numpy as np
import pytest

if shutil.which("g++") is None or shutil.which("addr2line") is None:
    pytest.skip("the traced emulator needs g++ and addr2line", allow_module_level=True)

from dwops import _spec, cudaemu  # noqa: E402
from dwops._registry import numpy_dtype  # noqa: E402

SRC = r"""
struct __align__(16) F4 { float v[4]; };
// y = x, one 16-byte vector per thread
__global__ void copy4(const float* __restrict__ x, float* __restrict__ y, int n4) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n4) *reinterpret_cast<F4*>(y + 4 * i) = *reinterpret_cast<const F4*>(x + 4 * i);
}
// y[i] = x[2 i]: every second float of x
__global__ void every_second(const float* __restrict__ x, float* __restrict__ y) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    y[i] = x[2 * i];  // LINE every_second
}
// shared s[t * stride] = x[t]; then reads s[t * stride] or s[0] (broadcast)
__global__ void banks(const float* __restrict__ x, float* __restrict__ y, int stride, int bcast) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    float* s = reinterpret_cast<float*>(smem_raw);
    const int t = threadIdx.x;
    s[t * stride] = x[t];  // LINE banks store
    __syncthreads();
    y[t] = s[bcast ? 0 : t * stride];  // LINE banks load
}
// 16-byte shared loads of consecutive vectors, staged by cp.async
__global__ void vec_shared(const float* __restrict__ x, float* __restrict__ y) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    F4* s = reinterpret_cast<F4*>(smem_raw);
    const int t = threadIdx.x;
    cp_async<16>(s + t, x + 4 * t, true);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    const F4 v = s[(t + 1) % blockDim.x];
    y[t] = v.v[0] + v.v[1] + v.v[2] + v.v[3];
}
// y[i] = x[i - 1] + x[i] + x[i + 1] (inside 0..n-1): blocks re-read their neighbours' edges
__global__ void halo(const float* x, float* y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    float a = x[i];
    if (i > 0) a += x[i - 1];
    if (i + 1 < n) a += x[i + 1];
    y[i] = a;
}
// two loads back to back, a shared store, two barriers, one load, a warp sum, a global store
__global__ void phases(const float* a, const float* b, const float* c, float* y) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    float* s = reinterpret_cast<float*>(smem_raw);
    const int t = threadIdx.x, i = blockIdx.x * blockDim.x + t;
    s[t] = a[i] * b[i];
    __syncthreads();
    float v = c[i] + s[(t + 1) % blockDim.x];
    __syncthreads();
    for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(0xffffffffu, v, d);
    y[i] = v;
}
"""
NAMES = ["copy4", "every_second", "banks", "vec_shared", "halo", "phases"]


def _line(tag):
    """The line of SRC (as the trace numbers it) that carries ``// LINE tag``."""
    return next(i + 1 for i, t in enumerate(SRC.splitlines()) if t.endswith(f"// LINE {tag}"))


@pytest.fixture(scope="module")
def lib():
    return cudaemu.Library(SRC, NAMES)


def _rand(n, seed=0):
    return cudaemu.asarray(np.random.default_rng(seed).uniform(-1, 1, n).astype(np.float32))


def _one(fn, *args, **kw):
    with cudaemu.tracing() as launches:
        fn(*args, **kw)
    assert len(launches) == 1
    return launches[0]


def _ratio(c, a, b):
    return c[a] / c[b]


def test_vector_copy_is_fully_coalesced(lib):
    x, y = _rand(4096), cudaemu.empty((4096,), np.float32)
    t = _one(lib.function("copy4"), (4,), (256,), (x, y, np.int32(1024)))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
    c = t.counters
    assert (t.name, t.grid, t.block, t.smem, t.blocks, t.threads) == \
        ("copy4", (4, 1, 1), (256, 1, 1), 0, 4, 256)
    assert c["global_load_requests"] == c["global_store_requests"] == 4 * 256 // 32
    assert c["global_load_bytes"] == c["global_store_bytes"] == 4096 * 4
    assert c["global_load_sectors"] == c["global_load_ideal_sectors"] == 4096 * 4 // 32
    assert c["global_store_sectors"] == c["global_store_ideal_sectors"] == 4096 * 4 // 32
    assert c["dram_read_bytes"] == c["dram_write_bytes"] == 4096 * 4
    assert c["l2_read_bytes"] == c["l2_write_bytes"] == 4096 * 4
    assert c["barriers"] == c["shuffles"] == c["shared_load_requests"] == 0
    assert not cudaemu.check_access(t)


def test_every_second_float_is_half_coalesced_and_fails_the_guard(lib):
    x, y = _rand(2048), cudaemu.empty((1024,), np.float32)
    t = _one(lib.function("every_second"), (4,), (256,), (x, y))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x)[::2])
    c = t.counters
    assert c["global_load_requests"] == 32 and c["global_load_bytes"] == 4096
    assert c["global_load_sectors"] == 32 * 8 and c["global_load_ideal_sectors"] == 32 * 4
    assert _ratio(c, "global_load_ideal_sectors", "global_load_sectors") == 0.5
    assert _ratio(c, "global_store_ideal_sectors", "global_store_sectors") == 1.0
    # DRAM: every sector of x is touched (the skipped floats share sectors with the read ones)
    assert c["dram_read_bytes"] == 2048 * 4
    bad = cudaemu.check_access(t)
    assert [(b["file"], b["line"], b["kind"], b["efficiency"]) for b in bad] == \
        [("<source>", _line("every_second"), "global_load", 0.5)]


@pytest.mark.parametrize("stride, bcast, ways", [(4, 0, 4), (1, 0, 1), (1, 1, 1), (2, 0, 2),
                                                 (33, 0, 1)])
def test_shared_bank_conflicts(lib, stride, bcast, ways):
    x, y = _rand(64), cudaemu.empty((64,), np.float32)
    t = _one(lib.function("banks"), (1,), (64,), (x, y, np.int32(stride), np.int32(bcast)),
             shared_mem=64 * stride * 4)
    want = np.asarray(x)[0] if bcast else np.asarray(x)
    np.testing.assert_array_equal(np.asarray(y), np.broadcast_to(want, (64,)))
    c = t.counters
    assert c["shared_store_requests"] == c["shared_load_requests"] == 2
    assert c["shared_store_wavefronts"] == 2 * ways and c["shared_store_ideal_wavefronts"] == 2
    load_ways = 1 if bcast else ways
    assert c["shared_load_wavefronts"] == 2 * load_ways and c["shared_load_ideal_wavefronts"] == 2
    assert c["barriers"] == 1
    bad = {(b["line"], b["kind"], b["ways"]) for b in cudaemu.check_access(t)}
    if ways == 1:
        assert not bad
    else:   # the planted conflict is caught, on its lines
        assert bad == {(_line("banks store"), "shared_store", ways)} | (
            set() if bcast else {(_line("banks load"), "shared_load", ways)})


def test_cp_async_and_16_byte_shared_loads(lib):
    x, y = _rand(256), cudaemu.empty((64,), np.float32)
    t = _one(lib.function("vec_shared"), (1,), (64,), (x, y), shared_mem=64 * 16)
    v = np.asarray(x).reshape(64, 4).sum(1)
    np.testing.assert_allclose(np.asarray(y), np.roll(v, -1), rtol=1e-6)
    c = t.counters
    assert c["cp_async_requests"] == c["shared_cp_async_requests"] == 2
    assert c["cp_async_bytes"] == c["global_load_bytes"] == 256 * 4
    assert c["global_load_requests"] == 2
    assert c["global_load_sectors"] == c["global_load_ideal_sectors"] == 32
    assert c["dram_read_bytes"] == 256 * 4
    # 16-byte accesses: four quarter-warp passes of 32 distinct banks each
    assert c["shared_cp_async_wavefronts"] == c["shared_cp_async_ideal_wavefronts"] == 2 * 4
    assert c["shared_load_requests"] == 2
    assert c["shared_load_wavefronts"] == c["shared_load_ideal_wavefronts"] == 2 * 4
    assert not cudaemu.check_access(t)


def test_halo_reads_cross_to_l2_once_per_block(lib):
    blocks = 5
    n = 32 * blocks
    x, y = _rand(n), cudaemu.empty((n,), np.float32)
    t = _one(lib.function("halo"), (blocks,), (32,), (x, y, np.int32(n)))
    xs = np.asarray(x, np.float64)
    want = xs + np.concatenate([[0], xs[:-1]]) + np.concatenate([xs[1:], [0]])
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5)
    c = t.counters
    # block b reads floats 32b-1 .. 32b+32 (inside the array): bytes [128b-4, 128b+132), the
    # sectors 4b-1 .. 4b+4 (6); the first and the last block one fewer
    assert c["l2_read_bytes"] == 32 * (6 * (blocks - 2) + 5 * 2)
    assert c["dram_read_bytes"] == n * 4 and c["dram_write_bytes"] == n * 4
    assert c["l2_write_bytes"] == n * 4
    # x[i - 1] of a warp straddles 5 sectors for 4 sectors of bytes (block 0: 4 of 4, 31 lanes)
    assert c["global_load_requests"] == 3 * blocks


def test_sampled_launch_runs_four_windows_and_scales_its_sums(lib):
    blocks = 64
    n = 32 * blocks
    x, y = _rand(n), cudaemu.empty((n,), np.float32)
    with cudaemu.tracing(max_blocks=8) as launches:
        lib.function("halo")((blocks,), (32,), (x, y, np.int32(n)))
    (t,) = launches
    # four windows of 8 // 4 = 2 blocks starting at i * (64 - 2) // 3: blocks 0-1, 20-21, 41-42,
    # 62-63; the sums of those 8 blocks times 64 / 8
    assert (t.blocks, t.blocks_run) == (64, 8)
    xs = np.asarray(x, np.float64)
    want = xs + np.concatenate([[0], xs[:-1]]) + np.concatenate([xs[1:], [0]])
    ran = np.concatenate([np.arange(32 * b, 32 * b + 32) for b in (0, 1, 20, 21, 41, 42, 62, 63)])
    np.testing.assert_allclose(np.asarray(y)[ran], want[ran], rtol=1e-5)
    c = t.counters
    assert c["global_load_requests"] == 3 * 64 and c["global_store_requests"] == 64
    # block b reads sectors 4b-1 .. 4b+4: 6, the first and last block 5 (see the halo test)
    assert c["l2_read_bytes"] == 32 * (5 + 6 * 6 + 5) * 8
    # distinct sectors per window: 0-8 (9), 79-88 (10), 163-172 (10), 247-255 (9); the halo of
    # each window's ends is counted once per window, an overestimate of 38 * 8 / 256 - 1 = 19%
    assert c["dram_read_bytes"] == 32 * 38 * 8
    assert c["dram_write_bytes"] == n * 4
    with cudaemu.tracing(max_blocks=64) as launches:   # not over the limit: every block
        lib.function("halo")((blocks,), (32,), (x, y, np.int32(n)))
    assert launches[0].blocks_run == 64 and launches[0].counters["dram_read_bytes"] == n * 4


def test_barriers_shuffles_and_loads_in_flight(lib):
    n, blocks = 64 * 3, 3
    a, b, cc = _rand(n, 1), _rand(n, 2), _rand(n, 3)
    y = cudaemu.empty((n,), np.float32)
    t = _one(lib.function("phases"), (blocks,), (64,), (a, b, cc, y), shared_mem=64 * 4)
    A, B, C = (np.asarray(v, np.float64) for v in (a, b, cc))
    s = (A * B).reshape(blocks, 64)
    v = (C.reshape(blocks, 64) + np.roll(s, -1, axis=1)).reshape(blocks, 2, 32).sum(2)
    np.testing.assert_allclose(np.asarray(y).reshape(blocks, 2, 32),
                               np.repeat(v[..., None], 32, 2), rtol=1e-5)
    c = t.counters
    warps = blocks * 2
    assert c["barriers"] == 2 * blocks            # per block, not per thread
    assert c["shuffles"] == 5 * warps              # per warp
    # per warp: a and b (2 x 128 bytes) before the shared store, then c (128) before the barrier
    assert c["load_bytes_in_flight_per_warp"] == (256 + 128) / 2
    assert c["shared_store_requests"] == warps and c["shared_load_requests"] == warps


def test_tracing_runs_once_and_leaves_untraced_launches_alone(lib):
    x, y = _rand(2048), cudaemu.empty((1024,), np.float32)
    before = cudaemu.stats["launches"]
    with cudaemu.tracing() as outer:
        lib.function("every_second")((4,), (256,), (x, y))
        with cudaemu.tracing() as inner:
            lib.function("copy4")((1,), (32,), (x, y, np.int32(32)))
    lib.function("every_second")((4,), (256,), (x, y))   # not traced: the forward/reverse run
    assert [t.name for t in outer] == ["every_second"] and [t.name for t in inner] == ["copy4"]
    assert cudaemu.stats["launches"] == before + 3
    with pytest.raises(cudaemu.EmuError, match="invalid memory access"), cudaemu.tracing():
        lib.function("every_second")((5,), (256,), (x, y))   # reads past x: still caught


# ----------------------------------------------------------------------------- primary kernels

# (op, stride): the kernels of the cupy backend's main paths, on small but representative shapes
PRIMARY = [("dw_forward", 1), ("dw_forward", 2), ("dw_grad_input", 1), ("dw_grad_input", 2),
           ("dw_grad_weight", 1), ("dw_grad_weight", 2), ("pointwise", 1), ("separable", 1)]
N, C, CO, H, W = 1, 16, 32, 32, 32


def _dev(rng, shape, dtype):
    a = rng.uniform(-1, 1, shape).astype(np.float32)
    if dtype == "bfloat16":
        return cudaemu.asarray((a.view(np.uint32) >> 16).astype(np.uint16))
    return cudaemu.asarray(a)


def _out(shape, dtype):
    return cudaemu.empty(shape, np.uint16 if dtype == "bfloat16" else np.float32)


def run_primary(case, layout, dtype):
    """Trace the backend's launches for one primary case; the LaunchTraces."""
    from dwops.kernels import cupy_backend as cb
    from dwops.kernels import cupy_plans as plans

    be = cb.BACKEND
    op, s = case
    rng = np.random.default_rng(hash((op, s, layout, dtype)) % 2 ** 32)
    xs = _spec._physical(layout, N, C, H, W)
    zero = functools.partial(np.zeros, dtype=numpy_dtype(dtype))   # the problem's dtype
    zx, zdw, zpw = zero(xs), zero((C, 1, 3, 3)), zero((CO, C))
    x, dww = _dev(rng, xs, dtype), _dev(rng, (C, 1, 3, 3), dtype)
    p, _ = _spec.depthwise("t", zx, zdw, None, s, 1, 1, layout, "relu")
    with cudaemu.tracing() as launches:
        if op == "dw_forward":
            be.depthwise_forward(p, x, dww, _dev(rng, (C,), dtype), _out(p.y_shape, dtype), 0)
        elif op == "dw_grad_input":
            be.depthwise_grad_input(p, _dev(rng, p.y_shape, dtype), dww, _out(p.x_shape, dtype), 0)
        elif op == "dw_grad_weight":
            be.depthwise_grad_weight(p, x, _dev(rng, p.y_shape, dtype), _out(p.w_shape, dtype), 0)
        elif op == "pointwise":
            pp, _ = _spec.pointwise("t", zx, zpw, zero(CO), layout, "relu", None)
            be.pointwise_forward(pp, x, _dev(rng, (CO, C), dtype), _dev(rng, (CO,), dtype), None,
                                 _out(pp.y_shape, dtype), 0)
        else:
            sp, _ = _spec.separable("t", zx, zdw, zpw, zero(CO),
                                    zero(C), s, 1, 1, layout, "relu", None, None)
            assert plans.plan_separable(sp, layout) is not None   # the fused kernel
            be.separable_forward(sp, x, dww, _dev(rng, (CO, C), dtype), _dev(rng, (CO,), dtype),
                                 _dev(rng, (C,), dtype), None, _out(sp.y_shape, dtype), 0)
    assert launches
    return launches


def summary(t):
    """Coalescing (ideal / sectors) of global loads and stores, conflict ways (wavefronts /
    ideal) of shared loads, stores and cp.async of one launch."""
    c = t.counters

    def r(a, b):
        return round(c[a] / c[b], 3) if c[b] else None

    return {"name": t.name, "load": r("global_load_ideal_sectors", "global_load_sectors"),
            "store": r("global_store_ideal_sectors", "global_store_sectors"),
            "shared_load_ways": r("shared_load_wavefronts", "shared_load_ideal_wavefronts"),
            "shared_store_ways": r("shared_store_wavefronts", "shared_store_ideal_wavefronts"),
            "cp_async_ways": r("shared_cp_async_wavefronts", "shared_cp_async_ideal_wavefronts")}


# (op, stride, layout, dtype) -> the lines below the bar today, as measured (N=1, C=16, 32x32).
# The guard is a ratchet on them: per (kind, file) the worst line may be neither worse than
# recorded nor better (a fix updates this table); every other line must meet the bar.
KNOWN: dict = {
    ('dw_forward', 1, 'NHWC', 'float32'):
        'global_load coalescing 0.500 at depthwise.cuh:404',
    ('dw_forward', 1, 'NHWC', 'bfloat16'):
        'shared_load 2.00-way conflicts at depthwise.cuh:367',
    ('dw_forward', 2, 'NCHW', 'bfloat16'):
        'shared_load 2.00-way conflicts at depthwise.cuh:267',
    ('dw_forward', 2, 'NHWC', 'float32'):
        'global_load coalescing 0.500 at depthwise.cuh:404',
    ('dw_grad_input', 1, 'NHWC', 'bfloat16'):
        'shared_load 2.00-way conflicts at depthwise.cuh:367',
    ('dw_grad_input', 2, 'NCHW', 'bfloat16'):
        'global_load coalescing 0.810 at depthwise.cuh:69; '
        'global_store coalescing 0.250 at depthwise.cuh:568',
    ('dw_grad_weight', 1, 'NCHW', 'float32'):
        'global_load coalescing 0.860 at depthwise.cuh:777',
    ('dw_grad_weight', 1, 'NCHW', 'bfloat16'):
        'global_load coalescing 0.754 at depthwise.cuh:777',
    ('dw_grad_weight', 2, 'NCHW', 'float32'):
        'global_load coalescing 0.463 at depthwise.cuh:777',
    ('dw_grad_weight', 2, 'NCHW', 'bfloat16'):
        'global_load coalescing 0.431 at depthwise.cuh:777',
    ('dw_grad_weight', 2, 'NHWC', 'bfloat16'):
        'shared_load 2.00-way conflicts at depthwise.cuh:873',
    ('separable', 1, 'NCHW', 'float32'):
        'global_load coalescing 0.620 at separable.cuh:74',
    ('separable', 1, 'NCHW', 'bfloat16'):
        'global_load coalescing 0.425 at separable.cuh:74',
    ('separable', 1, 'NHWC', 'float32'):
        'shared_load 2.00-way conflicts at separable.cuh:89',
    ('separable', 1, 'NHWC', 'bfloat16'):
        'shared_load 2.00-way conflicts at separable.cuh:89',
}


def _params():
    return [pytest.param(case, layout, dtype, id=f"{case[0]}-s{case[1]}-{layout}-{dtype}")
            for case in PRIMARY for layout in ("NCHW", "NHWC") for dtype in ("float32", "bfloat16")]


_KNOWN_LINE = re.compile(r"(\w+) (?:coalescing ([\d.]+)|([\d.]+)-way conflicts) at ([\w.]+):\d+")


def _worst(items) -> dict:
    """(kind, file) -> the worst value of (kind, file, value) items: the lowest coalescing of
    global lines, the most conflict ways of shared lines."""
    out: dict = {}
    for kind, file, v in items:
        key = (kind, file)
        pick = min if kind.startswith("global") else max
        out[key] = pick(out.get(key, v), v)
    return out


def ratchet(bad: list, known: str) -> tuple[dict, dict]:
    """(worse, better) of the guard's failing lines ``bad`` against the record ``known`` (a KNOWN
    entry): worse, a (kind, file) that is new or below its record; better, one above its record
    or gone. Values compare to 0.005."""
    got = _worst((b["kind"], b["file"].rsplit("/", 1)[-1], b.get("efficiency", b.get("ways")))
                 for b in bad)
    rec = _worst((k, f, float(e or w)) for k, e, w, f in _KNOWN_LINE.findall(known))

    def below(kind, a, b):   # a is worse than b
        return a < b - 0.005 if kind.startswith("global") else a > b + 0.005

    worse = {k: (v, rec.get(k)) for k, v in got.items() if k not in rec or below(k[0], v, rec[k])}
    better = {k: (got.get(k), v) for k, v in rec.items() if k not in got or below(k[0], v, got[k])}
    return worse, better


def test_the_ratchet_catches_a_regression_and_asks_for_an_update_on_a_fix():
    known = ("shared_load 2.00-way conflicts at depthwise.cuh:264; "
             "global_load coalescing 0.500 at depthwise.cuh:301")
    same = [{"kind": "shared_load", "file": "dwops/kernels/cuda/depthwise.cuh", "ways": 2.0},
            {"kind": "global_load", "file": "dwops/kernels/cuda/depthwise.cuh", "efficiency": 0.5}]
    assert ratchet(same, known) == ({}, {})
    four = [dict(same[0], ways=4.0), same[1]]
    assert ratchet(four, known)[0] == {("shared_load", "depthwise.cuh"): (4.0, 2.0)}
    new = same + [{"kind": "global_store", "file": "x/separable.cuh", "efficiency": 0.8}]
    assert ratchet(new, known)[0] == {("global_store", "separable.cuh"): (0.8, None)}
    fixed = [same[1]]
    assert ratchet(fixed, known) == ({}, {("shared_load", "depthwise.cuh"): (None, 2.0)})
    assert ratchet([dict(same[1], efficiency=0.75)], known)[1] != {}


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", cudaemu.module())


@pytest.mark.parametrize("case, layout, dtype", _params())
def test_primary_kernels_coalesce_and_read_shared_memory_without_conflicts(case, layout, dtype,
                                                                           stand_in):
    launches = run_primary(case, layout, dtype)
    bad = cudaemu.check_access(launches, min_coalescing=0.9, max_conflict_ways=1.0,
                               kinds=("global_load", "global_store", "shared_load"))
    worse, better = ratchet(bad, KNOWN.get((*case, layout, dtype), ""))
    lines = [(b["name"], b["kind"], b["file"], b["line"],
              round(b.get("efficiency", b.get("ways", 0)), 3)) for b in bad]
    assert not worse, f"below the bar or worse than recorded (measured, recorded): {worse}; {lines}"
    assert not better, f"better than recorded: update KNOWN (measured, recorded): {better}; {lines}"
