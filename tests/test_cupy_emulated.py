"""The cupy backend's CUDA C++ kernels executed on the CPU by the emulator in ``dwops/cudaemu``.

Two parts:

* the emulator itself: a correct kernel gives the right answer; a race, an out-of-bounds write,
  an uninitialised shared-memory read, a misaligned vector access, a shuffle in a partial warp, a
  shuffle/barrier deadlock, wrong argument types and launches CUDA would refuse are all caught
  (so a pass means something);
* ``tests/test_gpu_cupy.py`` (the GPU tests: every op, dtype and layout on odd and
  realistic sizes, every specialization with and without vectors, seeded random problems) run
  under ``DWOPS_CUDAEMU=1`` in three subprocesses side by side, one per group mark; every test
  there is in one group or marked real_gpu; together they execute every instantiation the NVRTC
  kernel report compiles, and nothing else.

The emulator runs the kernels' source with CUDA's block/warp semantics, not the GPU's timing or
floating-point units (no FMA contraction, host expf/erf): it checks indexing, tiling, barriers
and launch plans, not speed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if shutil.which(os.environ.get("CXX", "g++")) is None:
    pytest.skip("the CUDA emulator needs a host C++ compiler (g++)", allow_module_level=True)

from dwops import cudaemu  # noqa: E402

SELF_TEST = r"""
#include <cuda_fp16.h>
template <typename A> __device__ A warp_total(A v) {
    for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(0xffffffffu, v, d);
    return v;
}
// block sums of x through shared memory, warp shuffles and barriers: correct
__global__ void block_sum(const float* __restrict__ x, float* __restrict__ out, int n) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    float* part = reinterpret_cast<float*>(smem_raw);
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    float v = i < n ? x[i] : 0.0f;
    v = warp_total(v);
    if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        float s = 0;
        for (int w = 0; w < (int)blockDim.x / 32; ++w) s += part[w];
        out[blockIdx.x] = s;
    }
}
// reads a neighbour's shared value with no barrier in between: a race
__global__ void racy(float* out) {
    __shared__ float s[64];
    s[threadIdx.x] = (float)threadIdx.x;
    out[threadIdx.x] = s[(threadIdx.x + 1) % 64];
}
// writes one element past the end (i <= n)
__global__ void off_by_one(float* out, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) out[i] = 1.0f;
}
// reads shared memory nobody wrote
__global__ void uninitialised(float* out) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    out[threadIdx.x] = reinterpret_cast<float*>(smem_raw)[threadIdx.x];
}
// full-mask shuffle in a block of 16 threads
__global__ void partial_warp(float* out) {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}
// lane 0 shuffles while the other lanes wait at a barrier
__global__ void shuffle_deadlock(float* out) {
    float v = 1.0f;
    if (threadIdx.x == 0) v = __shfl_xor_sync(0xffffffffu, v, 1);
    __syncthreads();
    out[threadIdx.x] = v;
}
// a 16-byte vector load from an address that is only 4-byte aligned
struct __align__(16) F4 { float v[4]; };
__global__ void misaligned_vector(const float* x, float* out) {
    const F4 p = *reinterpret_cast<const F4*>(x + 1);
    out[threadIdx.x] = p.v[0];
}
// reads past the end of its array (into the guard page)
__global__ void overrun(const float* x, float* out) {
    out[threadIdx.x] = x[threadIdx.x + 64];
}
// every block writes its index to the same element: a race between blocks
__global__ void last_block_wins(float* out) {
    if (threadIdx.x == 0) out[0] = (float)blockIdx.x;
}
__global__ void __launch_bounds__(128) bounded(float* out) { out[threadIdx.x] = 0.0f; }
template <typename T> __global__ void to_half(const float* x, T* y, long long n) {
    for (long long i = threadIdx.x; i < n; i += blockDim.x) y[i] = __float2half_rn(x[i]);
}
// cp.async (the helpers of common.cuh): each thread stages BYTES from x (the zero-fill form past
// n floats), optionally waits, and after a barrier reads its neighbour's staged bytes
template <int BYTES>
__global__ void staged(const float* __restrict__ x, float* __restrict__ out, int n, int wait) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    float* s = reinterpret_cast<float*>(smem_raw);
    constexpr int F = BYTES / 4;
    const int t = threadIdx.x, u = (threadIdx.x + 1) % blockDim.x;
    cp_async<BYTES>(s + F * t, x + F * t, F * t < n);
    cp_async_commit();
    if (wait) cp_async_wait<0>();
    __syncthreads();
    for (int e = 0; e < F; ++e) out[F * t + e] = s[F * u + e];
}
// two committed groups, wait_group 1: only the older group (first half of s) has landed
__global__ void two_groups(const float* __restrict__ x, float* __restrict__ out, int second) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    float* s = reinterpret_cast<float*>(smem_raw);
    const int t = threadIdx.x, n = blockDim.x;
    cp_async<4>(s + t, x + t, true);
    cp_async_commit();
    cp_async<4>(s + n + t, x + n + t, true);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    out[t] = s[(second ? n : 0) + (t + 1) % n];
    cp_async_wait<0>();
}
// restages s[t] while the neighbour may not have read it yet (no barrier between the read of
// the old contents and the new copy)
__global__ void restage_early(const float* __restrict__ x, float* __restrict__ out) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    float* s = reinterpret_cast<float*>(smem_raw);
    const int t = threadIdx.x, n = blockDim.x;
    cp_async<4>(s + t, x + t, true);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    const float a = s[(t + 1) % n];
    cp_async<4>(s + t, x + n + t, true);
    cp_async_commit();
    __syncthreads();
    cp_async_wait<0>();
    __syncthreads();
    out[t] = a + s[(t + 1) % n];
}
__global__ void misaligned_async(const float* __restrict__ x, float* __restrict__ out) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    float* s = reinterpret_cast<float*>(smem_raw);
    cp_async<16>(s + 4 * threadIdx.x, x + 4 * threadIdx.x + 1, true);
    cp_async_commit();
    cp_async_wait<0>();
    out[threadIdx.x] = s[4 * threadIdx.x];
}
"""

NAMES = ["block_sum", "racy", "off_by_one", "uninitialised", "partial_warp", "shuffle_deadlock",
         "bounded", "to_half<__half>", "misaligned_vector",
         "overrun", "last_block_wins", "staged<4>", "staged<8>", "staged<16>", "two_groups",
         "restage_early", "misaligned_async"]


@pytest.fixture(scope="module")
def lib():
    return cudaemu.Library(SELF_TEST, NAMES)


def test_a_correct_kernel_gives_the_right_answer(lib):
    rng = np.random.default_rng(7)
    x = cudaemu.asarray(rng.uniform(-1, 1, 1000).astype(np.float32))
    out = cudaemu.full((4,), np.nan, np.float32)
    lib.function("block_sum")((4,), (256,), (x, out, np.int32(1000)), shared_mem=8 * 4)
    want = [np.sum(np.asarray(x)[i * 256:(i + 1) * 256], dtype=np.float64) for i in range(4)]
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5)
    h = cudaemu.empty((1000,), np.float16)
    lib.function("to_half<__half>")((1,), (64,), (x, h, np.int64(1000)))
    np.testing.assert_array_equal(np.asarray(h), np.asarray(x).astype(np.float16))


def test_a_race_is_caught(lib):
    out = cudaemu.empty((64,), np.float32)
    with pytest.raises(cudaemu.EmuError, match="race"):
        lib.function("racy")((1,), (64,), (out,))


def test_a_race_between_blocks_is_caught(lib):
    out = cudaemu.empty((1,), np.float32)
    with pytest.raises(cudaemu.EmuError, match="race"):
        lib.function("last_block_wins")((3,), (32,), (out,))


def test_an_out_of_bounds_write_is_caught(lib):
    out = cudaemu.empty((100,), np.float32)
    with pytest.raises(cudaemu.EmuError, match="out-of-bounds write"):
        lib.function("off_by_one")((1,), (128,), (out, np.int32(100)))


def test_shared_memory_starts_poisoned(lib):
    out = cudaemu.full((32,), 0.0, np.float32)
    lib.function("uninitialised")((1,), (32,), (out,), shared_mem=32 * 4)
    assert np.isnan(np.asarray(out)).all()


@pytest.mark.parametrize("name, block, match", [
    ("partial_warp", 16, "partial warp"),
    ("shuffle_deadlock", 64, "deadlock"),
])
def test_warp_misuse_is_caught(lib, name, block, match):
    out = cudaemu.empty((block,), np.float32)
    with pytest.raises(cudaemu.EmuError, match=match):
        lib.function(name)((1,), (block,), (out,))


def test_a_misaligned_vector_access_is_caught(lib):
    x = cudaemu.asarray(np.ones(64, np.float32))
    out = cudaemu.empty((32,), np.float32)
    with pytest.raises(cudaemu.EmuError, match=r"misaligned .*\(needs 16-byte alignment\)"):
        lib.function("misaligned_vector")((1,), (32,), (x, out))


def test_an_invalid_read_ends_the_launch_with_an_error(lib):
    x = cudaemu.asarray(np.ones(64, np.float32))
    out = cudaemu.empty((32,), np.float32)
    with pytest.raises(cudaemu.EmuError, match=r"invalid memory access .* past the end of a "
                                               r"256-byte allocation"):
        lib.function("overrun")((1,), (32,), (x, out))
    test_a_correct_kernel_gives_the_right_answer(lib)       # and the process carries on


def test_launches_cuda_would_refuse(lib):
    x = cudaemu.empty((256,), np.float32)
    out = cudaemu.empty((4,), np.float32)
    fn = lib.function("block_sum")
    with pytest.raises(cudaemu.EmuError, match="is int64, the parameter is a 4-byte int"):
        fn((1,), (256,), (x, out, np.int64(256)))
    with pytest.raises(cudaemu.EmuError, match="2 arguments for 3"):
        fn((1,), (256,), (x, out))
    with pytest.raises(cudaemu.EmuError, match="should be a pointer"):
        fn((1,), (256,), (np.float32(0), out, np.int32(1)))
    with pytest.raises(cudaemu.EmuError, match="non-contiguous"):
        fn((1,), (32,), (cudaemu.empty((64,), np.float32)[::2], out, np.int32(1)))
    with pytest.raises(cudaemu.EmuError, match="dynamic shared memory"):
        fn((1,), (256,), (x, out, np.int32(256)), shared_mem=64 * 1024)
    fn.max_dynamic_shared_size_bytes = 64 * 1024      # the opt-in CUDA requires above 48 KiB
    fn((1,), (256,), (x, out, np.int32(256)), shared_mem=64 * 1024)
    with pytest.raises(cudaemu.EmuError, match="__launch_bounds__ allows 128"):
        lib.function("bounded")((1,), (256,), (cudaemu.empty((256,), np.float32),))
    with pytest.raises(cudaemu.EmuError, match="beyond CUDA's limits"):
        lib.function("bounded")((1, 70000), (32,), (cudaemu.empty((32,), np.float32),))


def test_device_profiles_set_the_limits_the_stand_in_reports_and_enforces(lib):
    """DWOPS_CUDAEMU_DEVICE (cudaemu.device): the attributes CuPy would report, the opt-in limit
    (cudaFuncSetAttribute past it fails, so does a launch), the occupancy query, and the limits
    the backend reads (cupy_device.limits)."""
    from dwops.kernels import cupy_device

    cp = cudaemu.module()
    x = cudaemu.asarray(np.ones(256, np.float32))
    out = cudaemu.full((1,), np.nan, np.float32)
    for name, prof in cupy_device.PROFILES.items():
        with cudaemu.device(name):
            attrs = cp.cuda.Device(0).attributes
            assert attrs["MaxSharedMemoryPerBlockOptin"] == prof.smem_optin
            assert attrs["MultiProcessorCount"] == prof.sms
            assert cupy_device.DeviceLimits.from_attributes(name, attrs) == prof
            fn = lib.function("block_sum")
            fn.max_dynamic_shared_size_bytes = prof.smem_optin
            fn((1,), (256,), (x, out, np.int32(256)), shared_mem=prof.smem_optin)
            with pytest.raises(cudaemu.EmuError, match="dynamic shared memory"):
                fn((1,), (256,), (x, out, np.int32(256)), shared_mem=prof.smem_optin + 16)
            with pytest.raises(cudaemu.EmuError, match=f"the {name} profile allows"):
                fn.max_dynamic_shared_size_bytes = prof.smem_optin + 1024
            occ = cp.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor
            assert occ(fn.ptr, 256, 0) == min(prof.max_blocks_per_sm,
                                              prof.max_threads_per_sm // 256)
            assert occ(fn.ptr, 256, prof.smem_optin) == 1
            assert occ(lib.function("bounded").ptr, 256, 0) == 0   # past __launch_bounds__(128)
    with pytest.raises(cudaemu.EmuError, match="the profiles are"):
        with cudaemu.device("gtx480"):
            pass


def test_launch_bounds_are_read_with_their_parenthesised_arguments():
    """``__launch_bounds__(256, sizeof(T) == 8 ? 1 : 2)``: the kernels' bounds, macros resolved."""
    from dwops.kernels.cupy_compile import source

    assert cudaemu._launch_bounds(source("depthwise")) == {
        "dw_forward": 256, "dw_grad_input": 256, "dw_grad_weight_direct": 256,
        "dw_grad_weight": 256}
    assert cudaemu._launch_bounds(source("pointwise")) == {"pw_gemm": 256}
    assert cudaemu._launch_bounds(source("conv1d"))["c1_forward"] == 128
    assert cudaemu._launch_bounds("__global__ void __launch_bounds__(64, (2)) f(int a) {}") == {"f": 64}


@pytest.mark.parametrize("nbytes", [4, 8, 16])
def test_cp_async_lands_at_the_wait_and_zero_fills(lib, nbytes):
    """Staged copies of 4, 8 and 16 bytes arrive after cp_async_wait; the zero-fill form (a
    source past n) writes zeros."""
    f = nbytes // 4
    x = cudaemu.asarray(np.arange(1, 32 * f + 1, dtype=np.float32))
    out = cudaemu.full((32 * f,), np.nan, np.float32)
    n = 20 * f   # threads 20..31 take the zero-fill form
    lib.function(f"staged<{nbytes}>")((1,), (32,), (x, out, np.int32(n), np.int32(1)),
                                        shared_mem=32 * nbytes)
    want = np.where(np.arange(32 * f) < n, np.arange(1, 32 * f + 1), 0).reshape(32, f)
    np.testing.assert_array_equal(np.asarray(out).reshape(32, f), np.roll(want, -1, axis=0))


def test_cp_async_without_its_wait_is_caught(lib):
    """A kernel reading staged data without cp_async_wait reads poisoned shared memory (the
    copies land at the wait in the forward run, at once in the reverse run): a race."""
    x = cudaemu.asarray(np.arange(1, 129, dtype=np.float32))
    out = cudaemu.full((128,), 0.0, np.float32)
    with pytest.raises(cudaemu.EmuError, match="race"):
        lib.function("staged<16>")((1,), (32,), (x, out, np.int32(128), np.int32(0)),
                                   shared_mem=32 * 16)


def test_cp_async_wait_group_counts_groups(lib):
    """wait_group 1 completes every committed group but the newest: the first group's data is
    there, reading the second group's is caught."""
    x = cudaemu.asarray(np.arange(1, 65, dtype=np.float32))
    out = cudaemu.full((32,), np.nan, np.float32)
    fn = lib.function("two_groups")
    fn((1,), (32,), (x, out, np.int32(0)), shared_mem=64 * 4)
    np.testing.assert_array_equal(np.asarray(out), np.roll(np.arange(1, 33), -1))
    with pytest.raises(cudaemu.EmuError, match="race"):
        fn((1,), (32,), (x, out, np.int32(1)), shared_mem=64 * 4)


def test_cp_async_restaging_before_a_barrier_is_caught(lib):
    """A copy into a buffer another thread may still read (no barrier between that read and the
    copy) is caught, although a wait and a barrier follow before the new data is used."""
    x = cudaemu.asarray(np.arange(1, 65, dtype=np.float32))
    out = cudaemu.empty((32,), np.float32)
    with pytest.raises(cudaemu.EmuError, match="race"):
        lib.function("restage_early")((1,), (32,), (x, out), shared_mem=32 * 4)


def test_misaligned_cp_async_is_caught(lib):
    x = cudaemu.asarray(np.ones(256, np.float32))
    out = cudaemu.empty((32,), np.float32)
    with pytest.raises(cudaemu.EmuError, match="misaligned cp.async"):
        lib.function("misaligned_async")((1,), (32,), (x, out), shared_mem=32 * 16)


# ------------------------------------------------------------------------- the activation table

ACTIVATION_KERNEL = r"""
template <typename A>
__global__ void apply_activation(const A* __restrict__ x, A* __restrict__ out, int n, int act) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = activate(x[i], act);
}
"""


def test_cuda_activations_match_the_reference():
    """common.cuh's ``activate`` for every code of dwops._spec.ACTIVATIONS (the generated enum)
    against dwops.reference.activate, float32 and float64, on the kinks (-3, 0, 3, 6), beside
    them, random values and NaN; hardswish and hardsigmoid also at +-inf (the older epilogues
    give NaN there, see the reference's test_activations_at_infinities_and_nan)."""
    from dwops import _spec, reference
    from dwops.kernels import cupy_compile as cuc

    with open(os.path.join(cuc.CUDA_DIR, "common.cuh")) as f:
        code = cuc.activation_enum() + f.read() + ACTIVATION_KERNEL
    lib = cudaemu.Library(code, ["apply_activation<float>", "apply_activation<double>"])
    z = np.concatenate([[-7.5, -3.0 - 2.0**-20, -3.0, -3.0 + 2.0**-20, -1.5, -0.0, 0.0, 2.0**-20,
                         3.0 - 2.0**-20, 3.0, 3.0 + 2.0**-20, 6.0, 6.5, np.nan],
                        np.random.default_rng(11).uniform(-8, 8, 50)])
    for act in _spec.ACTIVATIONS:
        zz = np.concatenate([z, [-np.inf, np.inf]]) if act in ("hardswish", "hardsigmoid") else z
        for name, dt, rtol in (("float", np.float32, 1e-6), ("double", np.float64, 1e-14)):
            x = cudaemu.asarray(zz.astype(dt))
            out = cudaemu.full(zz.shape, 123.0, dt)
            lib.function(f"apply_activation<{name}>")(
                (1,), (128,), (x, out, np.int32(zz.size), np.int32(_spec.ACTIVATION_CODES[act])))
            zd = zz.astype(dt).astype(np.float64)
            want, got = reference.activate(zd, act), np.asarray(out, np.float64)
            # errors relative to 1 + |z| (silu and gelu lose relative accuracy in their tails)
            assert np.array_equal(np.isnan(got), np.isnan(want)), (act, name, got, want)
            with np.errstate(invalid="ignore"):  # inf - inf
                err = np.abs(got - want)
            ok = np.isnan(want) | (got == want) | (err <= rtol * (1 + np.abs(zd)))
            assert ok.all(), (act, name, zd[~ok], got[~ok], want[~ok])


# ------------------------------------------------------------------------- the GPU tests, emulated

# Groups of tests/test_gpu_cupy.py, of similar cost, run concurrently, each selected by its mark
# (every test there carries exactly one of these marks or real_gpu; see
# test_every_gpu_test_is_in_one_group).
GROUPS = {
    "grads_random": "emu_grads_random",
    "forward_pointwise_separable_specializations": "emu_forward_pointwise_separable",
    "conv1d": "emu_conv1d",
}
NOT_EMULATED = "real_gpu"  # needs a real device (other libraries' GPU arrays, numba)
GPU_TESTS = os.path.join(ROOT, "tests", "test_gpu_cupy.py")


@pytest.fixture(scope="module")
def emulated_runs(tmp_path_factory):
    """Build every kernel (both cores), then start every group at once; {group: (returncode,
    output, names file)} once all finish."""
    cudaemu.prebuild_report(workers=2)
    tmp = tmp_path_factory.mktemp("cudaemu")
    procs = {}
    for group, mark in GROUPS.items():
        env = dict(os.environ, DWOPS_CUDAEMU="1", DWOPS_CUDAEMU_NAMES=str(tmp / f"{group}.txt"),
                   PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [sys.executable, "-m", "pytest", GPU_TESTS, "-m", mark, "-q", "-p",
               "no:cacheprovider", "--no-header", "-rfEs"]
        procs[group] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
    out = {}
    for group, proc in procs.items():
        text, _ = proc.communicate(timeout=1500)
        out[group] = (proc.returncode, text, tmp / f"{group}.txt")
    return out


@pytest.mark.parametrize("group", list(GROUPS))
def test_gpu_tests_pass_in_the_emulator(emulated_runs, group):
    rc, text, _ = emulated_runs[group]
    print(text[-4000:])
    assert rc == 0, f"test_gpu_cupy.py -m {GROUPS[group]} under the emulator:\n{text[-8000:]}"
    assert " passed" in text and " skipped" not in text.splitlines()[-1], text[-2000:]


def test_every_kernel_of_the_report_runs_and_nothing_else(emulated_runs):
    """The emulated GPU tests execute every instantiation the NVRTC kernel report compiles, and
    launch nothing it does not compile."""
    from dwops.kernels.cupy_plans import instantiations

    launched = set()
    for _, _, names in emulated_runs.values():
        launched |= {n for n in names.read_text().splitlines() if n}
    report = {row[-1] for row in instantiations()}
    assert launched <= report, f"launched but never compiled by the report: {launched - report}"
    assert launched == report, f"compiled but never executed: {sorted(report - launched)}"


MARKS_PLUGIN = """
import json, os
def pytest_collection_finish(session):
    with open(os.environ["DWOPS_TEST_MARKS"], "w") as f:
        json.dump({i.nodeid: sorted({m.name for m in i.iter_markers()}) for i in session.items}, f)
"""


def test_every_gpu_test_is_in_one_group(tmp_path):
    """Each test of tests/test_gpu_cupy.py carries exactly one group mark or real_gpu, so a new GPU
    test cannot be left out of the emulated runs unnoticed: one ``--collect-only -q`` in the
    emulator's environment, with a plugin that records every collected test's marks."""
    import json

    cudaemu.prebuild_report(workers=2)  # a lookup when warm; the collection looks it up too
    (tmp_path / "record_marks.py").write_text(MARKS_PLUGIN)
    env = dict(os.environ, DWOPS_CUDAEMU="1", DWOPS_TEST_MARKS=str(tmp_path / "marks.json"),
               PYTHONPATH=os.pathsep.join([ROOT, str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "pytest", GPU_TESTS, "--collect-only", "-q",
                           "-p", "no:cacheprovider", "-p", "record_marks"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    listed = [line for line in done.stdout.splitlines() if "::" in line]
    marks = json.loads((tmp_path / "marks.json").read_text())
    assert sorted(listed) == sorted(marks) and len(listed) > 0
    groups = {*GROUPS.values(), NOT_EMULATED}
    wrong = {t: sorted(groups.intersection(m)) for t, m in marks.items()
             if len(groups.intersection(m)) != 1}
    assert not wrong, f"not in exactly one of {sorted(groups)}: {dict(list(wrong.items())[:10])}"
    for g in groups:  # the groups' selections together cover every test
        assert any(g in m for m in marks.values()), f"no test carries {g}"
