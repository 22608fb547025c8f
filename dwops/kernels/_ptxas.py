"""Assemble PTX for a GPU architecture without a GPU and read its resources (both GPU backends).

nvJitLink (``cuda.bindings.nvjitlink``) assembles PTX for ``sm_XX`` and, with ``-verbose``, writes
ptxas' report per entry function: registers, static shared memory, stack frame and spill bytes.
This feeds ``python -m dwops kernels`` through each backend's ``compile_report``; :func:`link` also
returns the cubin, which ``dwops.model.sass`` disassembles.
"""

from __future__ import annotations

import re

_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def assemble(ptx: bytes | str, arch: str = "sm_90") -> dict:
    """Assemble ``ptx`` for ``arch``; per (lowered) entry name a dict with registers, shared_bytes
    (static), spill_bytes (stores + loads), spill_stores, spill_loads and stack_bytes.
    RuntimeError with nvJitLink's log if the PTX does not assemble."""
    return link(ptx, arch)[0]


def link(ptx: bytes | str, arch: str = "sm_90") -> tuple[dict, bytes]:
    """:func:`assemble`'s report and the cubin (ELF) nvJitLink built."""
    from cuda.bindings import nvjitlink

    data = ptx.encode() if isinstance(ptx, str) else ptx
    h = nvjitlink.create(2, [f"-arch={arch}", "-verbose"])
    try:
        try:
            nvjitlink.add_data(h, nvjitlink.InputType.PTX, data, len(data), "dwops.ptx")
            nvjitlink.complete(h)
        except Exception as exc:
            buf = bytearray(nvjitlink.get_error_log_size(h))
            nvjitlink.get_error_log(h, buf)
            raise RuntimeError(f"nvJitLink: {exc}\n{buf.decode(errors='replace')}") from exc
        buf = bytearray(nvjitlink.get_info_log_size(h))
        nvjitlink.get_info_log(h, buf)
        log = buf.decode(errors="replace")
        cubin = bytearray(nvjitlink.get_linked_cubin_size(h))
        nvjitlink.get_linked_cubin(h, cubin)
    finally:
        nvjitlink.destroy(h)
    out, cur = {}, None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = m.group(1)
            out[cur] = {"registers": None, "shared_bytes": 0, "spill_bytes": 0, "spill_stores": 0,
                        "spill_loads": 0, "stack_bytes": 0}
            continue
        if cur is None:
            continue
        m = _SPILL.search(line)
        if m:
            out[cur]["stack_bytes"] = int(m.group(1))
            out[cur]["spill_stores"] = int(m.group(2))
            out[cur]["spill_loads"] = int(m.group(3))
            out[cur]["spill_bytes"] = int(m.group(2)) + int(m.group(3))
        m = _USED.search(line)
        if m:
            out[cur]["registers"] = int(m.group(1))
            s = _SMEM.search(line)
            out[cur]["shared_bytes"] = int(s.group(1)) if s else 0
    return out, bytes(cubin)
