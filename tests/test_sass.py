"""dwops.model.sass: the instruction mix of the machine code, and occupancy.

Hand kernels with known machine code go through the compile report's path (NVRTC, nvJitLink for
sm_90, nvdisasm); each check is also run against a planted misclassification, which it must
catch. The guard compiles every instantiation of the compile report and asserts none uses local
memory. Occupancy is checked against hand arithmetic of the CUDA occupancy rules.
"""

from __future__ import annotations

import importlib.util

import pytest

from dwops.model import sass
from dwops.model.devices import device

H200, A100, RTX4090 = device("h200"), device("a100"), device("rtx4090")


def _tools_missing() -> str | None:
    for mod in ("cuda.bindings.nvrtc", "cuda.bindings.nvjitlink"):
        try:
            if importlib.util.find_spec(mod) is None:
                return f"{mod} is not installed (the cuda13 or cuda12 extra)"
        except ModuleNotFoundError:
            return f"{mod} is not installed (the cuda13 or cuda12 extra)"
    try:
        sass.nvdisasm()
    except FileNotFoundError:
        return "nvdisasm is not installed (the nvidia-cuda-nvdisasm wheel of the cuda13 extra)"
    return None


needs_tools = pytest.mark.skipif(_tools_missing() is not None, reason=str(_tools_missing()))

# ----------------------------------------------------------------------------- hand kernels

HAND = r"""
__global__ void copy4(const float4* __restrict__ x, float4* __restrict__ y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i];
}

__global__ void local_index(const int* __restrict__ idx, float* __restrict__ y, int n) {
    float a[32];   // indexed by loaded values: in local memory
    for (int i = 0; i < 32; ++i) a[i] = 0.0f;
    for (int i = 0; i < n; ++i) a[idx[i] & 31] += 1.0f;
    y[threadIdx.x] = a[threadIdx.x & 31];
}

__global__ void cp_async_copy(const float4* __restrict__ x, float4* __restrict__ y) {
    __shared__ float4 s[256];
    unsigned dst = (unsigned)__cvta_generic_to_shared(&s[threadIdx.x]);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" :: "r"(dst),
                 "l"(x + blockIdx.x * 256 + threadIdx.x));
    asm volatile("cp.async.wait_all;\n" ::: "memory");
    __syncthreads();
    y[blockIdx.x * 256 + threadIdx.x] = s[255 - threadIdx.x];
}

__global__ void smem_reverse(const float* __restrict__ x, float* __restrict__ y) {
    __shared__ float s[256];
    s[threadIdx.x] = x[blockIdx.x * 256 + threadIdx.x];
    __syncthreads();
    y[blockIdx.x * 256 + threadIdx.x] = s[255 - threadIdx.x];
}

__global__ void fma_loop(const float* __restrict__ x, float* __restrict__ y, int n) {
    float a = x[threadIdx.x], acc = 0.0f;
    for (int i = 0; i < n; ++i) acc = fmaf(acc, a, x[i]);
    y[threadIdx.x] = acc;
}
"""
NAMES = ["copy4", "local_index", "cp_async_copy", "smem_reverse", "fma_loop"]


@pytest.fixture(scope="module")
def hand():
    """name -> (ptxas report, parsed function)."""
    return sass.machine_code(HAND, NAMES, "sm_90", "hand")


def _facts(hand, name):
    props, function = hand[name]
    counts, loop_counts = sass.count_instructions(function)
    return props, counts, loop_counts


def check_copy(props, counts, loop_counts):
    assert counts["LDG.128"] == 1 and counts["STG.128"] == 1, counts
    assert sum(counts[f"LDG.{w}"] + counts[f"STG.{w}"] for w in sass.WIDTHS) == 2, counts
    assert counts["LDL"] == counts["STL"] == 0 and props["stack_bytes"] == 0
    assert counts["FFMA"] == counts["HFMA2"] == counts["HMMA"] == 0, counts


def check_local(props, counts, loop_counts):
    assert counts["LDL"] >= 1 and counts["STL"] >= 1, counts
    assert loop_counts["LDL"] >= 1 and loop_counts["STL"] >= 1, loop_counts
    assert props["stack_bytes"] == 128 and props["spill_stores"] == props["spill_loads"] == 0


def check_cp_async(props, counts, loop_counts):
    assert counts["LDGSTS"] == 1, counts
    assert counts["LDS"] >= 1 and counts["BAR"] == 1 and counts["STG.128"] == 1, counts
    assert sum(counts[f"LDG.{w}"] for w in sass.WIDTHS) == 0, counts


def check_smem(props, counts, loop_counts):
    assert counts["LDS"] == 1 and counts["STS"] == 1 and counts["BAR"] == 1, counts
    assert counts["LDG.32"] == 1 and counts["STG.32"] == 1, counts
    assert props["shared_bytes"] == 1024, props


def check_loop(props, counts, loop_counts):
    assert loop_counts["FFMA"] >= 1, loop_counts
    assert loop_counts["FFMA"] <= counts["FFMA"] and loop_counts["LDG.32"] >= 1, loop_counts
    assert 0 < loop_counts["total"] < counts["total"], (loop_counts, counts)
    # the store of the result and the exit follow the loop
    assert loop_counts["STG.32"] == 0 and counts["STG.32"] == 1


CHECKS = {"copy4": check_copy, "local_index": check_local, "cp_async_copy": check_cp_async,
          "smem_reverse": check_smem, "fma_loop": check_loop}


@needs_tools
@pytest.mark.parametrize("name", NAMES)
def test_hand_kernel(hand, name):
    CHECKS[name](*_facts(hand, name))


def _wrong_width(opcode, operands=""):
    c = _real_classify(opcode, operands)
    return "LDG.32" if c and c.startswith("LDG.") else c


def _reclass(src, dst):
    def classify(opcode, operands=""):
        c = _real_classify(opcode, operands)
        return dst if c == src else c
    return classify


_real_classify = sass.classify
PLANTED = {
    "copy4": ("classify", _wrong_width),                    # LDG width lost
    "local_index": ("classify", _reclass("LDL", "OTHER")),  # local loads missed
    "cp_async_copy": ("classify", _reclass("LDGSTS", "OTHER")),
    "smem_reverse": ("classify", _reclass("BAR", "BRANCH")),
    "fma_loop": ("innermost_loops", lambda function: []),   # loops not found
}


@needs_tools
@pytest.mark.parametrize("name", NAMES)
def test_hand_kernel_check_catches_a_planted_mistake(hand, name, monkeypatch):
    attr, wrong = PLANTED[name]
    monkeypatch.setattr(sass, attr, wrong)
    with pytest.raises(AssertionError):
        CHECKS[name](*_facts(hand, name))


@needs_tools
def test_source_facts_matches_machine_code(hand):
    facts = sass.source_facts(HAND, ["copy4", "local_index"], "sm_90", "hand")
    props, counts, loop_counts = _facts(hand, "local_index")
    f = facts["local_index"]
    assert f["counts"] == counts and f["loop_counts"] == loop_counts
    assert f["local_bytes"] == props["stack_bytes"] > 0
    assert (f["spill_stores"], f["spill_loads"]) == (props["spill_stores"], props["spill_loads"])
    assert facts["copy4"]["registers"] == hand["copy4"][0]["registers"] > 0
    assert sum(v for k, v in f["counts"].items() if k != "total") == f["counts"]["total"]


# ----------------------------------------------------------------------------- the classifier


@pytest.mark.parametrize("opcode, operands, want", [
    ("LDG.E.128.CONSTANT", "R4, desc[UR36][R8.64]", "LDG.128"),
    ("LDG.E.LTC128B", "R4, desc[UR36][R8.64]", "LDG.32"),   # a cache hint, not a width
    ("LDG.E.64", "R4, desc[UR4][R2.64]", "LDG.64"),
    ("LDG.E.U16.CONSTANT", "R4, desc[UR4][R2.64]", "LDG.16"),
    ("STG.E.U8", "desc[UR4][R2.64], R5", "STG.8"),
    ("STG.E", "desc[UR4][R2.64], R5", "STG.32"),
    ("LDGSTS.E.BYPASS.128", "[R3], desc[UR4][R4.64]", "LDGSTS"),
    ("LDS.128", "R4, [R2]", "LDS"), ("STS.64", "[R2], R4", "STS"), ("LDSM.16.M88.4", "R4, [R2]", "LDSM"),
    ("FFMA.FTZ", "R1, R2, R3, R4", "FFMA"), ("FMUL", "R1, R2, R3", "FADD_FMUL"),
    ("FMNMX", "R1, R2, RZ, !PT", "FADD_FMUL"), ("HFMA2", "R1, R2, R3, R4", "HFMA2"),
    ("HFMA2.MMA", "R2, -RZ, RZ, 0, 0", "INT"),               # a constant into a register
    ("HADD2.F32", "R3, -RZ, R0.H0_H0", "OTHER"),             # half to float
    ("HADD2", "R3, R4, R5", "HFMA2"), ("F2FP.F16.F32.PACK_AB", "R0, R3, R2", "OTHER"),
    ("HMMA.16816.F32.BF16", "R4, R8, R12, R4", "HMMA"), ("SHFL.BFLY", "PT, R3, R2, 0x1, 0x1f", "SHFL"),
    ("BAR.SYNC.DEFER_BLOCKING", "0x0", "BAR"), ("IMAD.WIDE.U32", "R2, R3, 0x4, R4", "INT"),
    ("UIADD3", "UR4, UR4, UR5, URZ", "INT"), ("ULDC.64", "UR4, c[0x0][0x208]", "OTHER"),
    ("CS2R", "R4, SRZ", "INT"), ("CS2R", "R4, SR_CLOCKLO", "OTHER"),
    ("BRA", "`(.L_x_3)", "BRANCH"), ("EXIT", "", "BRANCH"), ("LDL.64", "R2, [R1]", "LDL"),
    ("STL", "[R1+0x4], R3", "STL"), ("MUFU.RCP", "R4, R4", "OTHER"), ("DFMA", "R2, R4, R6, R2", "OTHER"),
    ("NOP", "", None),
])
def test_classify(opcode, operands, want):
    assert sass.classify(opcode, operands) == want
    assert want is None or want in sass.CLASSES


SASS_TEXT = """
        .section        .text.kern,"ax",@progbits
.text.kern:
        /*0000*/                   LDC R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   FFMA R2, R3, R4, R2 ;
.L_x_1:
        /*0020*/                   LDS R5, [R6] ;
        /*0030*/                   FFMA R2, R5, R4, R2 ;
        /*0040*/               @P0 BRA `(.L_x_1) ;
        /*0050*/                   IADD3 R6, R6, 0x4, RZ ;
        /*0060*/              @!P1 BRA `(.L_x_0) ;
.L_x_2:
        /*0070*/                   LDS R7, [R6] ;
        /*0080*/               @P2 BRA `(.L_x_2) ;
        /*0090*/                   FFMA R9, R9, R9, R9 ;
        /*00a0*/              @P3 BRA `(.L_x_2) ;
        /*00b0*/                   EXIT ;
.L_x_3:
        /*00c0*/                   BRA `(.L_x_3);
        /*00d0*/                   NOP;
"""


def test_innermost_loops_and_loop_counts():
    (name, f), = sass.parse_sass(SASS_TEXT).items()
    assert name == "kern" and len(f["instructions"]) == 14
    assert f["labels"] == {".text.kern": 0, ".L_x_0": 0x10, ".L_x_1": 0x20, ".L_x_2": 0x70, ".L_x_3": 0xc0}
    # (0x20, 0x40) lies inside (0x10, 0x60); two branches back to 0x70 make one loop to 0xa0;
    # the branch to itself at 0xc0 is no loop
    assert sass.innermost_loops(f) == [(0x20, 0x40), (0x70, 0xa0)]
    counts, loop_counts = sass.count_instructions(f)
    assert counts["FFMA"] == 3 and counts["total"] == 13 and counts["BRANCH"] == 6
    assert loop_counts["FFMA"] == 2 and loop_counts["LDS"] == 2 and loop_counts["BRANCH"] == 3
    assert loop_counts["INT"] == 0 and loop_counts["total"] == 7


def test_parse_sass_refuses_an_unreadable_instruction():
    with pytest.raises(ValueError, match="unreadable nvdisasm line"):
        sass.parse_sass(SASS_TEXT.replace("IADD3 R6, R6, 0x4, RZ ;", "iadd3 R6 ;"))


# ----------------------------------------------------------------------------- occupancy


@pytest.mark.parametrize("dev, threads, regs, dyn, static, blocks, warps, limiter", [
    (H200, 256, 32, 0, 0, 8, 64, "threads"),
    (H200, 256, 128, 0, 0, 2, 16, "registers"),
    (H200, 256, 32, 100 * 1024, 0, 2, 16, "shared_memory"),
    (H200, 1024, 64, 0, 0, 1, 32, "registers"),
    (H200, 64, 16, 0, 0, 32, 64, "threads"),          # 32 blocks: threads and blocks tie
    (H200, 32, 16, 0, 0, 32, 32, "blocks"),
    (H200, 128, 40, 0, 0, 12, 48, "registers"),       # 40 regs: 12 warps per sub-partition
    (H200, 256, 33, 0, 0, 6, 48, "registers"),        # 33 -> 40 registers per thread
    (H200, 128, 32, 45 * 1024, 3 * 1024, 4, 16, "shared_memory"),
    (A100, 256, 32, 80 * 1024, 0, 2, 16, "shared_memory"),   # 164 KiB / (80 KiB + 1 KiB)
    (A100, 256, 64, 0, 0, 4, 32, "registers"),
    (RTX4090, 256, 32, 0, 0, 6, 48, "threads"),       # 48 warps per SM
    (RTX4090, 128, 32, 0, 0, 12, 48, "threads"),
    (RTX4090, 64, 32, 0, 0, 24, 48, "threads"),       # 24 blocks: threads and blocks tie
    (RTX4090, 256, 32, 48 * 1024, 0, 2, 16, "shared_memory"),  # 100 KiB / 49 KiB
])
def test_occupancy_by_hand(dev, threads, regs, dyn, static, blocks, warps, limiter):
    got = sass.occupancy(dev, threads, regs, dyn, static)
    assert (got["blocks_per_sm"], got["warps_per_sm"], got["limiter"]) == (blocks, warps, limiter)
    assert got["occupancy"] == warps / dev.max_warps_per_sm
    assert min(got["limits"].values()) == blocks


def test_occupancy_rounds_shared_memory():
    # 233472 bytes per SM: (x + 1024) <= 233472 / 4 = 58368 holds up to x = 57344 exactly, and
    # 57345 bytes round up to 57472 and allow 3 blocks
    assert sass.occupancy(H200, 32, 16, 57344)["limits"]["shared_memory"] == 4
    assert sass.occupancy(H200, 32, 16, 57345)["limits"]["shared_memory"] == 3
    assert sass.occupancy(H200, 32, 16, 57344 - 100, 100)["limits"]["shared_memory"] == 4


@pytest.mark.parametrize("threads, regs, dyn", [
    (1025, 32, 0), (0, 32, 0), (256, 256, 0), (1024, 72, 0), (256, 32, 228 * 1024),
])
def test_occupancy_refuses_impossible_launches(threads, regs, dyn):
    with pytest.raises(ValueError):
        sass.occupancy(H200, threads, regs, dyn)


# ----------------------------------------------------------------------------- the kernels


@pytest.fixture(scope="module")
def facts():
    return sass.sass_facts("sm_90", workers=2)


def _local_memory(row):
    return (row["counts"]["LDL"], row["counts"]["STL"], row["local_bytes"])


# instantiations that use local memory today: name -> (LDL, STL, local_bytes). The generic-width
# c1_update keeps its window, weights and state in runtime-indexed arrays of 32 (conv1d.cuh: "or
# local storage"), by design; no spills.
LOCAL_MEMORY_KNOWN = {
    "c1_update<__half, 0>": (24, 127, 128),
    "c1_update<__nv_bfloat16, 0>": (24, 127, 128),
    "c1_update<float, 0>": (24, 127, 128),
    "c1_update<double, 0>": (48, 127, 256),
}


@needs_tools
def test_facts_cover_the_compile_report(facts):
    from dwops.kernels.cupy_compile import groups

    want = [(file, n) for file, names in groups() for n in names]
    assert [(r["file"], r["name"]) for r in facts] == want
    for r in facts:
        c = r["counts"]
        assert r["registers"] > 0 and c["total"] > 0, r["name"]
        assert sum(v for k, v in c.items() if k != "total") == c["total"], r["name"]
        assert all(r["loop_counts"][k] <= c[k] for k in c), r["name"]
        assert c["HMMA"] == 0 or r["name"].startswith("pw_gemm"), r["name"]


def _guard_params():
    from dwops.kernels.cupy_compile import groups

    out = []
    for file, names in groups():
        for n in names:
            marks = ()
            if n in LOCAL_MEMORY_KNOWN:
                ldl, stl, local = LOCAL_MEMORY_KNOWN[n]
                marks = pytest.mark.xfail(strict=True, reason=f"uses local memory: {ldl} LDL, "
                                                              f"{stl} STL, {local} bytes of stack")
            out.append(pytest.param(file, n, marks=marks, id=f"{file}:{n}"))
    return out


@needs_tools
@pytest.mark.parametrize("file, name", _guard_params())
def test_no_local_memory(facts, file, name):
    (row,) = [r for r in facts if (r["file"], r["name"]) == (file, name)]
    assert _local_memory(row) == (0, 0, 0)


def _ldgsts_expected(name: str) -> bool:
    """Whether an NHWC depthwise forward or weight-gradient kernel stages its tile with cp.async
    (load_tile_nhwc): when its vector (VEC elements) is 4, 8 or 16 bytes."""
    import re

    item = {"__half": 2, "__nv_bfloat16": 2, "float": 4, "double": 8}
    fwd = re.fullmatch(r"dw_forward<([\w]+), [\w]+, \d+, \d+, (\d+), \d+, true>", name)
    gw = re.fullmatch(r"dw_grad_weight<([\w]+), \d+, (\d+), \d+, true>", name)
    m = fwd or gw
    assert m, name
    return item[m.group(1)] * int(m.group(2)) >= 4


@needs_tools
def test_staged_nhwc_loaders_copy_with_ldgsts(facts):
    """load_tile_nhwc copies 4-16-byte vectors with cp.async: LDGSTS in every NHWC forward and
    weight-gradient kernel whose vector allows it, none in the 2-byte ones (registers)."""
    rows = [r for r in facts if r["name"].startswith(("dw_forward<", "dw_grad_weight<"))
            and r["name"].endswith("true>")]
    assert rows
    for r in rows:
        assert (r["counts"]["LDGSTS"] > 0) == _ldgsts_expected(r["name"]), (r["name"], r["counts"])
