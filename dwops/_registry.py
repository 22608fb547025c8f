"""The one place that knows the backends.

A backend is an object with the interface of :class:`Backend`; it lives in its own module, imported
only when first asked for, so ``import dwops`` stays light. ``"auto"`` picks ``"cpu"`` for host
arrays and, for GPU arrays, the first available GPU backend in ``_GPU_PREFERENCE`` unless the
backend itself reports a measured preference through ``prefers(op, problem)``.
"""

from __future__ import annotations

import contextlib
import importlib

from ._errors import BackendUnavailableError

# name -> (module, attribute of the backend instance, install hint)
_BACKENDS = {
    "numpy": ("dwops.reference", "BACKEND", "numpy"),
    "cpu": ("dwops.kernels.cpu", "BACKEND", "pip install numba"),
    "numba": ("dwops.kernels.numba_cuda", "BACKEND",
              "an NVIDIA GPU with its driver and pip install 'dwops[cuda13]' (or 'dwops[cuda12]')"),
    "cupy": ("dwops.kernels.cupy_backend", "BACKEND",
             "an NVIDIA GPU with its driver and pip install 'dwops[cuda13]' (or 'dwops[cuda12]')"),
}
BACKEND_NAMES = tuple(_BACKENDS) + ("auto",)
_GPU_PREFERENCE = ("cupy", "numba")
_HOST_DEFAULT = "cpu"

_loaded: dict[str, object] = {}
_unavailable: dict[str, str] = {}


class Backend:
    """Interface every backend implements (documentation; backends subclass it).

    Arrays handed to the op methods are *native* (NumPy for host backends, the backend's device
    array type for GPU backends), C-contiguous in the problem's layout, of the problem's dtype, and
    ``out`` is a preallocated C-contiguous native array that the method fills completely. Depthwise
    weights are ``(C*M, 1, KH, KW)``; pointwise weights ``(C_out, C_in)``. ``stream`` is the
    caller's stream handle from :meth:`stream_for` (``None`` on the host).
    """

    name = "?"
    device = "cpu"  # "cpu" or "cuda"
    # Held around every op call: a backend whose kernels must not run from two threads at once
    # (Numba's workqueue threading layer aborts the process) replaces it with a real lock.
    lock = contextlib.nullcontext()

    # -- plumbing
    def asarray(self, obj, info):
        """Native C-contiguous view or copy of a caller array (host arrays are moved to the device)."""
        raise NotImplementedError

    def allocate(self, shape, dtype, like_obj, like_info):
        """``(native_out, finish)``: ``finish()`` returns the result as the caller's array type."""
        raise NotImplementedError

    def stream_for(self, like_obj, like_info):
        return None

    def prefers(self, op, problem) -> bool:
        return True

    def nondecreasing(self, seq) -> bool:
        """Whether the native integer array ``seq`` (N, L) is non-decreasing along L."""
        raise NotImplementedError

    def aliases(self, native, obj, info) -> bool:
        """Whether ``native`` (from :meth:`asarray`) is the memory of the caller's ``obj``."""
        return False

    # -- ops (see dwops/_spec.py for the problem objects)
    def depthwise_forward(self, p, x, w, b, out, stream=None): raise NotImplementedError
    def depthwise_grad_input(self, p, gy, w, out, stream=None): raise NotImplementedError
    def depthwise_grad_weight(self, p, x, gy, out, stream=None): raise NotImplementedError
    def pointwise_forward(self, p, x, w, b, residual, out, stream=None): raise NotImplementedError
    def pointwise_grad_input(self, p, gy, w, out, stream=None): raise NotImplementedError
    def pointwise_grad_weight(self, p, x, gy, out, stream=None): raise NotImplementedError
    def separable_forward(self, p, x, dw_w, pw_w, b, dw_b, residual, out, stream=None):
        raise NotImplementedError

    def depthwise_backward(self, p, x, gy, w, gx, gw, gb, stream=None):
        """The gradients of a depthwise problem (without bias and activation) that are asked for:
        ``gx`` p.x_shape, ``gw`` (C*M, 1, KH, KW), ``gb`` (C*M,) = ``gy`` summed over N, OH, OW;
        an output that is not asked for is None. This default composes the single gradients (a
        backend with a one-pass kernel overrides it)."""
        if gx is not None:
            self.depthwise_grad_input(p, gy, w, gx, stream=stream)
        if gw is not None:
            self.depthwise_grad_weight(p, x, gy, gw, stream=stream)
        if gb is not None:
            self._depthwise_grad_bias(p, gy, gb, stream=stream)

    def _depthwise_grad_bias(self, p, gy, gb, stream=None):
        """``gb`` (C*M,) = ``gy`` summed over N, OH, OW, as the pointwise weight gradient of
        ``gy`` against a one-channel input of ones (so the backend's own GEMM and rounding)."""
        import numpy as np

        from ._interop import describe
        from ._spec import PointwiseProblem, _physical

        ones = np.ones(_physical(p.layout, p.N, 1, p.OH, p.OW), numpy_dtype(p.dtype))
        q = PointwiseProblem(p.N, 1, p.CO, p.OH, p.OW, p.layout, p.dtype)
        self.pointwise_grad_weight(q, self.asarray(ones, describe(ones, "depthwise_backward",
                                                                  "ones")),
                                   gy, gb.reshape(p.CO, 1), stream=stream)

    # depthwise 1-d (dwops/_spec.py Conv1dProblem, Conv1dUpdateProblem). ``state`` (N, C, W),
    # ``seq`` (N, L) int32/int64 and every output but ``out`` may be None (not given / not asked
    # for). x, gy, out and gx are in the problem's layout ("NCL" or "NLC"), states always (N, C, W).
    def depthwise_conv1d_forward(self, p, x, w, b, state, seq, out, final_out, stream=None):
        raise NotImplementedError

    def depthwise_conv1d_backward(self, p, x, gy, w, state, seq, gx, gw, gb, gstate, stream=None):
        raise NotImplementedError

    def depthwise_conv1d_update(self, p, x, state, w, b, out, state_out, stream=None):
        """x (N, C) or (N, C, T); ``state_out`` may be ``state`` itself (update in place)."""
        raise NotImplementedError


def load(name: str):
    """The backend instance called ``name``; BackendUnavailableError if it cannot run here."""
    if name in _loaded:
        return _loaded[name]
    if name in _unavailable:
        raise BackendUnavailableError(_unavailable[name])
    module, attr, hint = _BACKENDS[name]
    try:
        backend = getattr(importlib.import_module(module), attr)
        reason = backend.unavailable_reason() if hasattr(backend, "unavailable_reason") else None
    except ImportError as exc:
        reason = f"cannot import {module}: {exc}"
    if reason:
        _unavailable[name] = f"backend {name!r} is unavailable: {reason}. It needs {hint}."
        raise BackendUnavailableError(_unavailable[name])
    _loaded[name] = backend
    return backend


def available(name: str) -> bool:
    """Whether backend ``name`` ("numpy", "cpu", "numba", "cupy") can run here.

    ``False`` for names that are not backends (including ``"auto"``, which is a choice, not a
    backend); :func:`load` gives the reason a backend is unavailable.
    """
    if name not in _BACKENDS:
        return False
    try:
        load(name)
    except BackendUnavailableError:
        return False
    return True


def resolve(fn: str, name, on_gpu: bool, op: str, problem):
    """The backend to run ``op`` on: by name, or ``"auto"``'s choice for where the data lives."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"{fn}: backend must be one of {', '.join(map(repr, BACKEND_NAMES))}, "
                         f"got {name!r}")
    if name == "auto":
        if not on_gpu:
            return load(_HOST_DEFAULT)
        usable = [n for n in _GPU_PREFERENCE if available(n)]
        if not usable:
            raise BackendUnavailableError(
                f"{fn}: the arrays are on a GPU but no GPU backend can run: "
                + "; ".join(_unavailable.get(n, n) for n in _GPU_PREFERENCE))
        for n in usable:
            if load(n).prefers(op, problem):
                return load(n)
        return load(usable[0])
    backend = load(name)
    if on_gpu and backend.device != "cuda":
        raise ValueError(f"{fn}: the arrays are on a GPU but backend {name!r} runs on the host; "
                         f"use backend='auto', 'cupy' or 'numba', or move the arrays to the host")
    return backend


def numpy_dtype(name: str):
    """NumPy dtype for a canonical dtype name (bfloat16 through ml_dtypes)."""
    import numpy as np

    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


class HostBackend(Backend):
    """Plumbing shared by the host backends: NumPy arrays in, the caller's library out."""

    device = "cpu"

    def asarray(self, obj, info):
        import numpy as np

        from ._interop import to_host

        return np.ascontiguousarray(to_host(obj, info))

    def nondecreasing(self, seq) -> bool:
        import numpy as np

        return bool(np.all(np.diff(seq, axis=-1) >= 0))

    def aliases(self, native, obj, info) -> bool:
        import numpy as np

        from ._interop import to_host

        return info.lib in ("numpy", "torch") and np.shares_memory(native, to_host(obj, info))

    @staticmethod
    def _bias_sums(p, gy):
        """``gy`` (a depthwise problem's output gradient) summed over N, OH, OW in float64."""
        import numpy as np

        return gy.sum(axis=(0, 2, 3) if p.layout == "NCHW" else (0, 1, 2), dtype=np.float64)

    def _depthwise_grad_bias(self, p, gy, gb, stream=None):
        """``gb`` = ``gy`` summed over N, OH, OW in float64, rounded once."""
        gb[...] = self._bias_sums(p, gy).astype(gb.dtype)

    def allocate(self, shape, dtype, like_obj, like_info):
        import numpy as np

        from ._interop import from_host

        out = np.empty(shape, numpy_dtype(dtype))
        return out, lambda: from_host(out, like_info, like_obj)
