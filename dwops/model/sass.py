"""The instruction mix of the ``cupy`` backend's kernels from their machine code, and occupancy.

:func:`sass_facts` compiles every instantiation of the compile report
(:func:`dwops.kernels.cupy_compile.groups`) the way the report does (NVRTC to PTX, nvJitLink to a
cubin for ``arch``), disassembles the cubin with ``nvdisasm`` and counts each entry function's
instructions by class (:data:`CLASSES`, :func:`classify`): statically, once per instruction in the
code, and again restricted to the innermost loop bodies (a label and the last later ``BRA`` back to
it; :func:`innermost_loops`), which is where a kernel spends its time. Results are cached on disk per
compilation group, keyed by the compilation unit, the names, the architecture, the tool versions and
this module's own source (a changed classifier recounts).

:func:`occupancy` applies the CUDA occupancy rules to a launch on a :class:`~dwops.model.devices.Device`.

No GPU is needed: NVRTC, nvJitLink and nvdisasm all run on the CPU (the ``cuda13`` extra installs them;
without the ``nvidia-cuda-nvdisasm`` wheel, ``nvdisasm`` is looked for on ``PATH`` and under
``CUDA_PATH``/``CUDA_HOME``).
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile

from ..kernels.cupy_device import occupancy as _occupancy
from .devices import Device

WIDTHS = (8, 16, 32, 64, 128)
CLASSES = (
    tuple(f"LDG.{w}" for w in WIDTHS) + tuple(f"STG.{w}" for w in WIDTHS)
    + ("LDGSTS", "LDS", "STS", "LDSM", "FFMA", "FADD_FMUL", "HFMA2", "HMMA", "SHFL", "BAR", "INT",
       "BRANCH", "LDL", "STL", "OTHER")
)

CACHE = os.environ.get("DWOPS_SASS_CACHE",
                       os.path.join(tempfile.gettempdir(), f"dwops-sass-{os.getuid()}"))

# ----------------------------------------------------------------------------- classification

_FP32_OTHER = {"FADD", "FADD32I", "FMUL", "FMUL32I", "FMNMX", "FSEL", "FSET", "FSETP", "FCHK",
               "FRND", "FSWZADD"}
_HALF2 = {"HFMA2", "HADD2", "HMUL2", "HMNMX2", "HSET2", "HSETP2"}
_TENSOR = {"HMMA", "HGMMA", "IMMA", "IGMMA", "DMMA", "BMMA", "QGMMA"}
_INT = {"IMAD", "IMAD32I", "IMADSP", "IMUL", "IMUL32I", "IADD", "IADD3", "IADD32I", "VIADD",
        "VIADDMNMX", "VIMNMX", "VIMNMX3", "IMNMX", "IABS", "ISCADD", "ISCADD32I", "LOP", "LOP3",
        "LOP32I", "SHF", "SHL", "SHR", "LEA", "ISETP", "ICMP", "MOV", "MOV32I", "SEL", "PRMT",
        "POPC", "FLO", "BREV", "BMSK", "SGXT", "IDP", "IDP4A", "P2R", "R2P", "PLOP3", "PSETP",
        "R2UR"}
_BRANCH = {"BRA", "BRX", "BRXU", "JMP", "JMX", "JMXU", "CALL", "RET", "EXIT", "BSSY", "BSYNC",
           "BREAK", "BMOV", "WARPSYNC", "YIELD", "KILL", "RTT"}
_SAME = {"LDGSTS", "LDS", "STS", "LDSM", "FFMA", "SHFL", "BAR", "LDL", "STL"}
_SKIP = {"NOP"}


def _width(mods: list[str]) -> int:
    if "128" in mods:
        return 128
    if "64" in mods:
        return 64
    if "U8" in mods or "S8" in mods:
        return 8
    if "U16" in mods or "S16" in mods:
        return 16
    return 32


def classify(opcode: str, operands: str = "") -> str | None:
    """The class (one of :data:`CLASSES`) of one SASS instruction, ``opcode`` with its modifiers
    (``LDG.E.128.CONSTANT``) and its operand text; None for padding (``NOP``).

    LDG/STG are split by access width in bits (``.128``/``.64``, ``.U8``/``.S8`` = 8,
    ``.U16``/``.S16`` = 16, else 32); FADD_FMUL is the rest of FP32 (add, multiply, min/max,
    compare, select); HFMA2 is packed half arithmetic, except the ``HFMA2 Rd, -RZ, RZ, a, b``
    idiom that writes a constant (INT, with the moves) and ``HADD2.F32``, a half to float
    conversion (OTHER, with the other conversions); HMMA is every tensor-core instruction;
    INT is integer, logic, predicate, move and address arithmetic, uniform (``U``-prefixed)
    forms included; BRANCH is control flow (branches, calls, exit, convergence barriers);
    BAR is the block barrier. Everything else (constant and special-register reads,
    conversions, MUFU, FP64, atomics, generic LD/ST, memory fences) is OTHER."""
    parts = opcode.split(".")
    base, mods = parts[0], parts[1:]
    if base in _SKIP:
        return None
    if base in ("LDG", "STG"):
        return f"{base}.{_width(mods)}"
    if base in _SAME:
        return base
    if base in ("FFMA32I",):
        return "FFMA"
    if base in _FP32_OTHER:
        return "FADD_FMUL"
    if base in _HALF2:
        srcs = [s.strip() for s in operands.split(",")]
        if base == "HFMA2" and srcs[1:3] == ["-RZ", "RZ"]:
            return "INT"
        if base == "HADD2" and "F32" in mods:    # a half to float conversion
            return "OTHER"
        return "HFMA2"
    if base in _TENSOR:
        return "HMMA"
    if base in _BRANCH:
        return "BRANCH"
    if base == "CS2R":
        return "INT" if operands.rstrip().endswith("SRZ") else "OTHER"
    if base in _INT or (base.startswith("U") and base[1:] in _INT):
        return "INT"
    return "OTHER"


# ----------------------------------------------------------------------------- disassembly

_SECTION = re.compile(r"^\s*\.section\s+\.text\.([^,\s]+)")
_LABEL = re.compile(r"^\s*([.$\w]+):\s*$")
_INSTR = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(?:@!?U?P[T\d]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_TARGET = re.compile(r"`\(([^)]+)\)")
_ADDRESS = re.compile(r"^\s*/\*[0-9a-f]+\*/")


def parse_sass(text: str) -> dict[str, dict]:
    """nvdisasm's text -> per function (section ``.text.<name>``): ``instructions``, a list of
    (address, opcode with modifiers, operands), and ``labels``, label -> address of the next
    instruction. ValueError on an instruction line it cannot read."""
    out, cur, pending = {}, None, []
    for line in text.splitlines():
        m = _SECTION.match(line)
        if m:
            cur = out.setdefault(m.group(1), {"instructions": [], "labels": {}})
            pending = []
            continue
        if cur is None:
            continue
        m = _INSTR.match(line)
        if m:
            addr = int(m.group(1), 16)
            for lab in pending:
                cur["labels"][lab] = addr
            pending = []
            cur["instructions"].append((addr, m.group(2), m.group(3).strip()))
            continue
        if _ADDRESS.match(line):
            raise ValueError(f"unreadable nvdisasm line: {line.strip()}")
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
    return out


def innermost_loops(function: dict) -> list[tuple[int, int]]:
    """The innermost loops of a parsed function: (first, last) instruction addresses, where first
    is a label some later ``BRA`` jumps back to and last the latest such branch; a loop is
    innermost when no other loop lies inside it."""
    back: dict[int, int] = {}
    for addr, op, args in function["instructions"]:
        if op.split(".")[0] != "BRA":
            continue
        m = _TARGET.search(args)
        target = function["labels"].get(m.group(1)) if m else None
        if target is not None and target < addr:
            back[target] = max(back.get(target, addr), addr)
    loops = sorted(back.items())
    return [(a, b) for a, b in loops
            if not any((c, d) != (a, b) and a <= c and d <= b for c, d in loops)]


def count_instructions(function: dict) -> tuple[dict, dict]:
    """(counts, loop_counts) of a parsed function: instructions per class (every class of
    :data:`CLASSES`, and ``total``), over the whole function and over its innermost loop
    bodies."""
    loops = innermost_loops(function)
    counts = dict.fromkeys(CLASSES + ("total",), 0)
    loop_counts = dict.fromkeys(CLASSES + ("total",), 0)
    for addr, op, args in function["instructions"]:
        c = classify(op, args)
        if c is None:
            continue
        counts[c] += 1
        counts["total"] += 1
        if any(a <= addr <= b for a, b in loops):
            loop_counts[c] += 1
            loop_counts["total"] += 1
    return counts, loop_counts


def nvdisasm() -> str:
    """The nvdisasm executable: the ``nvidia-cuda-nvdisasm`` wheel's (through cuda.pathfinder, or
    under the installed ``nvidia`` package), else ``nvdisasm`` on PATH or under CUDA_PATH /
    CUDA_HOME. FileNotFoundError if none is found."""
    try:
        from cuda.pathfinder import find_nvidia_binary_utility

        found = find_nvidia_binary_utility("nvdisasm")
        if found:
            return found
    except Exception:  # noqa: BLE001 - an older cuda-pathfinder, or none: look elsewhere
        pass
    try:
        import importlib.util

        spec = importlib.util.find_spec("nvidia")
        for root in (spec.submodule_search_locations or []) if spec else []:
            for path in sorted(glob.glob(os.path.join(root, "*", "bin", "nvdisasm"))):
                if os.access(path, os.X_OK):
                    return path
    except Exception:  # noqa: BLE001
        pass
    found = shutil.which("nvdisasm")
    if found:
        return found
    for env in ("CUDA_PATH", "CUDA_HOME"):
        path = os.path.join(os.environ.get(env, ""), "bin", "nvdisasm")
        if os.environ.get(env) and os.access(path, os.X_OK):
            return path
    raise FileNotFoundError("nvdisasm not found: install the nvidia-cuda-nvdisasm wheel (the "
                            "cuda13 extra) or put the CUDA toolkit's nvdisasm on PATH")


def disassemble(cubin: bytes) -> str:
    """nvdisasm's text of the code sections of ``cubin`` (without dataflow analysis)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([nvdisasm(), "-c", "-ndf", f.name], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"nvdisasm failed ({res.returncode}): {res.stderr[-3000:]}")
    return res.stdout


def machine_code(code: str, names: list[str], arch: str = "sm_90",
                 unit: str = "kernels") -> dict:
    """Name expression -> (ptxas report, parsed function of :func:`parse_sass`) of ``names``
    instantiated from the CUDA C++ ``code``, compiled the compile report's way (NVRTC to PTX,
    nvJitLink for ``arch``) and disassembled with nvdisasm."""
    from ..kernels._ptxas import link
    from ..kernels.cupy_compile import compile_ptx_source

    ptx, lowered = compile_ptx_source(code, names, arch, unit)
    props, cubin = link(ptx, arch)
    functions = parse_sass(disassemble(cubin))
    out = {}
    for n in names:
        low = lowered[n]
        p, f = props.get(low), functions.get(low)
        if p is None or f is None:
            raise RuntimeError(f"{n}: no {'ptxas report' if p is None else 'machine code'} for "
                               f"{low} in the {arch} cubin")
        out[n] = (p, f)
    return out


def source_facts(code: str, names: list[str], arch: str = "sm_90", unit: str = "kernels") -> dict:
    """Name expression -> facts (registers, static_smem, local_bytes, spill_stores, spill_loads,
    counts, loop_counts) of ``names`` instantiated from the CUDA C++ ``code``
    (:func:`machine_code`)."""
    out = {}
    for n, (p, f) in machine_code(code, names, arch, unit).items():
        counts, loop_counts = count_instructions(f)
        out[n] = {"registers": p["registers"], "static_smem": p["shared_bytes"],
                  "local_bytes": p["stack_bytes"], "spill_stores": p["spill_stores"],
                  "spill_loads": p["spill_loads"], "counts": counts, "loop_counts": loop_counts}
    return out


# ----------------------------------------------------------------------------- the report


@functools.lru_cache(maxsize=None)
def _tools() -> str:
    """What else the facts depend on: the tool versions, this module and _ptxas (the parsers)."""
    from cuda.bindings import nvjitlink, nvrtc

    from ..kernels import _ptxas
    from ..kernels.cupy_compile import compile_options

    tool = nvdisasm()
    parts = [f"nvrtc {nvrtc.nvrtcVersion()[1:]}", f"nvjitlink {nvjitlink.version()}",
             f"{tool} {os.stat(tool).st_size}", " ".join(compile_options())]
    for path in (__file__, _ptxas.__file__):
        with open(path) as f:
            parts.append(f.read())
    return "\0".join(parts)


def _cache_path(code: str, names: list[str], arch: str) -> str:
    key = hashlib.sha256("\0".join([code, "\n".join(names), arch, _tools()]).encode())
    return os.path.join(CACHE, key.hexdigest()[:24] + ".json")


def _group_facts(job) -> dict:
    """Worker: the facts of one compilation group (file, names, arch), from the disk cache or
    compiled."""
    from ..kernels.cupy_compile import source

    file, names, arch = job
    code = source(file)
    path = _cache_path(code, names, arch)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        pass
    facts = source_facts(code, names, arch, file)
    os.makedirs(CACHE, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(facts, f)
    os.replace(tmp, path)
    return facts


def sass_facts(arch: str = "sm_90", workers: int | None = None) -> list[dict]:
    """One dict per instantiation of the compile report, in its order: ``file``, ``name`` (the
    template name expression), ``registers``, ``static_smem``, ``local_bytes`` (stack frame),
    ``spill_stores``, ``spill_loads`` (bytes), ``counts`` and ``loop_counts`` (instructions per
    class of :data:`CLASSES`, and ``total``; see :func:`count_instructions`). Compilation groups
    run in ``workers`` processes (default: the CPUs available); RuntimeError if one fails."""
    from ..kernels.cupy_compile import groups, map_groups

    jobs = [(file, names, arch) for file, names in groups()]
    rows = []
    for (file, names, _), facts in zip(jobs, map_groups(_group_facts, jobs, workers)):
        for n in names:
            rows.append({"file": file, "name": n, **facts[n]})
    return rows


# ----------------------------------------------------------------------------- occupancy


def occupancy(device: Device, threads_per_block: int, registers: int, dynamic_smem: int,
              static_smem: int = 0) -> dict:
    """The CUDA occupancy rules (:func:`dwops.kernels.cupy_device.occupancy`) for a launch on
    the model's ``device``: its launch limits are the backend's device profile."""
    return _occupancy(device.limits, threads_per_block, registers, dynamic_smem, static_smem)
