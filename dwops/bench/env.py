"""What the machine has: package versions, CUDA versions, devices, backends.

Package versions come from installed metadata, so nothing is imported to read them; CUDA and device
details are read from ``nvidia-smi`` or from a library the caller already loaded.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import platform
import sys

# Reported name -> distributions that may provide it (first installed wins).
PACKAGES = {
    "numpy": ("numpy",),
    "ml_dtypes": ("ml_dtypes", "ml-dtypes"),
    "numba": ("numba",),
    "numba-cuda": ("numba-cuda", "numba_cuda"),
    "cupy": ("cupy-cuda13x", "cupy-cuda12x", "cupy"),
    "cuda-bindings": ("cuda-bindings", "cuda_bindings"),
    "torch": ("torch",),
    "jax": ("jax",),
    "jaxlib": ("jaxlib",),
}


def package_version(dists) -> str | None:
    for d in dists:
        try:
            return metadata.version(d)
        except metadata.PackageNotFoundError:
            continue
    return None


def versions() -> dict:
    """Versions of Python, dwops and every optional package present (None-free: absent ones are
    left out), plus CUDA versions where they can be read without importing a GPU library."""
    from .. import __version__

    out = {"python": platform.python_version(), "dwops": __version__}
    for name, dists in PACKAGES.items():
        v = package_version(dists)
        if v:
            out[name] = v
    torch = sys.modules.get("torch")
    if torch is not None and getattr(torch.version, "cuda", None):
        out["torch_cuda"] = torch.version.cuda
        try:
            out["cudnn"] = str(torch.backends.cudnn.version())
        except Exception:  # noqa: BLE001 - informational only
            pass
    cuda = cuda_versions()
    out.update({k: v for k, v in cuda.items() if v})
    return out


def cuda_versions() -> dict:
    """``nvidia_driver`` (the release, from nvidia-smi) and ``cuda_driver`` (the CUDA version the
    driver supports) where a driver is present."""
    from .devices import nvidia_smi_query

    q = nvidia_smi_query("driver_version")
    out = {"nvidia_driver": q[0] if q else None}
    try:
        from cuda.bindings import runtime as cudart  # only when installed; no GPU needed

        err, v = cudart.cudaDriverGetVersion()
        if int(err) == 0 and v:
            out["cuda_driver"] = f"{v // 1000}.{(v % 1000) // 10}"
    except Exception:  # noqa: BLE001 - absent bindings or no driver: nothing to report
        pass
    return out


def backends() -> list[tuple[str, str | None]]:
    """``(name, None)`` for each backend that can run here, ``(name, reason)`` for the others."""
    from .. import _registry
    from .._errors import BackendUnavailableError

    out = []
    for name in _registry.BACKEND_NAMES:
        if name == "auto":
            continue
        try:
            _registry.load(name)
            out.append((name, None))
        except BackendUnavailableError as exc:
            out.append((name, str(exc)))
        except Exception as exc:  # noqa: BLE001 - a broken backend module is reported, not fatal
            out.append((name, f"{type(exc).__name__}: {exc}"))
    return out


def devices() -> list[str]:
    """One line per device: the CPU, then each GPU nvidia-smi lists."""
    from .devices import cpu_name

    lines = [f"cpu: {cpu_name()}, {os.cpu_count()} logical cores"]
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if not exe:
        lines.append("gpu: none found (no nvidia-smi on PATH)")
        return lines
    try:
        out = subprocess.run(
            [exe, "--query-gpu=index,name,memory.total,driver_version,compute_cap",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=20, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        lines.append(f"gpu: nvidia-smi failed: {exc}")
        return lines
    for row in out.splitlines() or ["none listed by nvidia-smi"]:
        lines.append(f"gpu: {row}")
    return lines
