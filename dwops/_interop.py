"""The array boundary: which library an array comes from, its metadata, and the way in and out.

Nothing here imports a framework: a library is recognised from the module of the array's type
(cached per type, as einops does), so only libraries the caller already imported are ever touched.

* :func:`describe` reads shape, dtype and device without converting anything, so validation runs
  before any allocation or copy.
* :func:`to_host` gives a NumPy view (zero-copy where the library allows) of a CPU array.
* :func:`from_host` turns a NumPy result back into the caller's library.

Accepted: NumPy, CuPy, PyTorch (CPU and CUDA; non-contiguous views; tensors that require grad are
taken as data), JAX arrays, TensorFlow tensors, Numba device arrays, and any object with
``__dlpack__``/``__dlpack_device__`` (a "bare" DLPack object). Host inputs are viewed zero-copy
(PyTorch through ``Tensor.numpy``, JAX and bare objects through DLPack, TensorFlow through its
DLPack export); host results go back zero-copy where the library can wrap NumPy memory (PyTorch,
TensorFlow through DLPack) and by one copy where it cannot (JAX owns its buffers; NumPy results
of bare DLPack inputs are returned as NumPy). GPU arrays are handed to the GPU backends, which view
them through DLPack or ``__cuda_array_interface__`` with the stream handshake of
``dwops/kernels/_gpu.py``.

JAX tracers (a top-level dwops function called inside ``jax.jit``) are refused with a pointer to
:mod:`dwops.jax`, which wraps the ops as JAX primitives.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

# DLPack device types (dlpack.h): kDLCPU=1, kDLCUDA=2, kDLCUDAHost=3, kDLCUDAManaged=13.
_DLPACK_CPU_TYPES = (1, 3)
_DLPACK_CUDA_TYPES = (2, 13)

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


@dataclass(frozen=True)
class ArrayInfo:
    """Metadata of one argument, read without converting it."""

    lib: str  # "numpy", "cupy", "torch", "jax", "tensorflow", "numba", "dlpack"
    shape: tuple
    dtype: str  # canonical NumPy-style name: "float32", "bfloat16", "int64", ...
    device: tuple  # ("cpu", 0) or ("cuda", ordinal)

    @property
    def on_gpu(self) -> bool:
        return self.device[0] == "cuda"


_LIB_BY_TYPE: dict[type, str | None] = {}


def _library_of_type(tp: type) -> str | None:
    """Name of the array library a type belongs to (cached per type), or None if unsupported."""
    try:
        return _LIB_BY_TYPE[tp]
    except KeyError:
        pass
    lib = None
    for base in tp.__mro__:
        root = (base.__module__ or "").split(".")[0]
        if base.__module__ == "numpy" and base.__name__ == "ndarray":
            lib = "numpy"
        elif root == "cupy" and base.__name__ == "ndarray":
            lib = "cupy"
        elif root == "torch" and base.__name__ == "Tensor":
            lib = "torch"
        elif root in ("jax", "jaxlib") and "Array" in base.__name__:
            lib = "jax"
        elif root in ("jax", "jaxlib") and "Tracer" in base.__name__:
            lib = "jax-tracer"
        elif root == "tensorflow" or (root == "keras" and "Variable" in base.__name__):
            lib = "tensorflow"
        elif root == "numba" and "DeviceNDArray" in base.__name__:
            lib = "numba"
        if lib:
            break
    if lib is None and (hasattr(tp, "__dlpack__") or hasattr(tp, "__cuda_array_interface__")):
        lib = "dlpack"
    _LIB_BY_TYPE[tp] = lib
    return lib


def library_of(obj) -> str | None:
    return _library_of_type(type(obj))


def _dtype_name(obj, lib: str) -> str:
    dt = obj.dtype
    if lib == "torch":
        return str(dt).removeprefix("torch.")
    if lib == "tensorflow":
        return dt.name
    return np.dtype(dt).name


def _device(obj, lib: str) -> tuple:
    if lib == "numpy":
        return ("cpu", 0)
    if lib == "tensorflow":
        name = obj.device or ""
        if "GPU" in name.upper():
            return ("cuda", int(name.rsplit(":", 1)[-1]))
        return ("cpu", 0)
    if hasattr(obj, "__dlpack_device__"):
        kind, ordinal = obj.__dlpack_device__()
        kind = int(kind)
        if kind in _DLPACK_CPU_TYPES:
            return ("cpu", 0)
        if kind in _DLPACK_CUDA_TYPES:
            return ("cuda", int(ordinal))
        return (f"dlpack-device-{kind}", int(ordinal))
    if hasattr(obj, "__cuda_array_interface__"):
        return ("cuda", _cai_device(obj))
    return ("cpu", 0)


def _cai_device(obj) -> int:
    try:
        from numba import cuda  # only reached for objects that are already CUDA arrays

        return cuda.get_current_device().id
    except Exception:  # pragma: no cover - no driver
        return 0


def describe(obj, fn: str, arg: str) -> ArrayInfo:
    """Metadata of ``obj``; ``TypeError`` naming ``fn`` and ``arg`` if it is not a supported array."""
    lib = library_of(obj)
    if lib == "jax-tracer":
        raise TypeError(
            f"{fn}: argument '{arg}' is a JAX tracer (a dwops function called inside jax.jit, "
            f"jax.grad or jax.vmap); use dwops.jax.{fn.split('_grad')[0]}, which works under JAX "
            f"transformations"
        )
    if lib is None:
        raise TypeError(
            f"{fn}: argument '{arg}' must be an array (NumPy, CuPy, PyTorch, JAX, TensorFlow or any "
            f"object with __dlpack__), got {type(obj).__module__}.{type(obj).__qualname__}"
        )
    try:
        shape = tuple(int(s) for s in obj.shape)
        dtype = _dtype_name(obj, lib)
    except Exception as exc:  # no or foreign metadata: a DLPack holder is read through DLPack
        if lib == "dlpack" and hasattr(obj, "__dlpack__"):
            # Look through it (zero-copy) to read its metadata.
            from ._errors import BackendUnavailableError

            try:
                view = _view_dlpack(obj)
            except BackendUnavailableError:
                raise
            except Exception as exc2:
                raise TypeError(f"{fn}: cannot read argument '{arg}' through DLPack: {exc2}") \
                    from exc2
            info = describe(view, fn, arg)
            return ArrayInfo("dlpack", info.shape, info.dtype, info.device)
        raise TypeError(f"{fn}: cannot read the shape and dtype of argument '{arg}': {exc}") from exc
    return ArrayInfo(lib, shape, dtype, _device(obj, lib))


def _view_dlpack(obj):
    """A zero-copy NumPy (CPU) or CuPy (CUDA) view of a bare DLPack object."""
    kind = int(obj.__dlpack_device__()[0]) if hasattr(obj, "__dlpack_device__") else 2
    if kind in _DLPACK_CPU_TYPES:
        return np.from_dlpack(obj)
    try:
        import cupy
    except ImportError as exc:
        from ._errors import BackendUnavailableError

        raise BackendUnavailableError(
            "a CUDA DLPack object needs CuPy to be read: pip install 'dwops[cuda13]'"
        ) from exc
    return cupy.from_dlpack(obj)


def to_host(obj, info: ArrayInfo) -> np.ndarray:
    """A NumPy array with the values of the CPU array ``obj`` (zero-copy where possible)."""
    lib = info.lib
    if lib == "numpy":
        return obj
    if lib == "torch":
        t = obj.detach()
        if t.is_conj():
            t = t.resolve_conj()
        if t.is_neg():
            t = t.resolve_neg()
        if info.dtype == "bfloat16":
            import ml_dtypes
            import torch

            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    if lib == "tensorflow":
        return _tf_to_host(obj)
    if lib == "jax":
        return np.asarray(obj)  # zero-copy, read-only view of a CPU jax.Array
    return np.from_dlpack(obj)


class Capsule:
    """A DLPack producer around a legacy capsule (TensorFlow exports capsules, not ``__dlpack__``)
    on ``device``, a ``(device_type, ordinal)`` pair: ``(1, 0)`` the host, ``(2, k)`` CUDA GPU k."""

    def __init__(self, capsule, device):
        self._capsule, self._device = capsule, device

    def __dlpack__(self, stream=None, **kwargs):  # a legacy (unversioned) capsule, whatever is asked
        return self._capsule

    def __dlpack_device__(self):
        return self._device


def _tf_to_host(obj) -> np.ndarray:
    """Zero-copy NumPy view of a CPU TensorFlow tensor through DLPack (a copy where TF refuses)."""
    import tensorflow as tf

    try:
        return np.from_dlpack(Capsule(tf.experimental.dlpack.to_dlpack(obj), (1, 0)))
    except Exception:  # e.g. a Variable or a dtype DLPack cannot carry
        return np.asarray(obj.numpy())


def from_host(arr: np.ndarray, like_info: ArrayInfo, like_obj):
    """Return the NumPy result ``arr`` as an array of the caller's library (that of ``like_obj``)."""
    lib = like_info.lib
    if lib in ("numpy", "dlpack"):
        return arr
    if lib == "torch":
        import torch

        if arr.dtype.name == "bfloat16":
            return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(arr)
    if lib == "jax":
        import jax.numpy as jnp

        return jnp.asarray(arr)
    if lib == "tensorflow":
        import tensorflow as tf

        try:  # zero-copy: TensorFlow adopts the NumPy buffer through a DLPack capsule
            return tf.experimental.dlpack.from_dlpack(arr.__dlpack__())
        except Exception:  # e.g. bfloat16, which NumPy cannot export through DLPack
            return tf.convert_to_tensor(arr)
    return arr


MUTABLE_LIBS = ("numpy", "cupy", "torch", "numba")  # arrays dwops may update in place


def write_back(obj, info: ArrayInfo, new) -> None:
    """Copy ``new`` (an array of ``obj``'s library, same shape and dtype) into ``obj`` in place."""
    if info.lib == "torch":
        import torch

        with torch.no_grad():
            obj.copy_(new)
    elif info.lib == "numba":
        obj.copy_to_device(new)
    else:  # numpy, cupy
        obj[...] = new


def imported(name: str) -> bool:
    """Whether the caller's process already imported library ``name`` (we never import it first)."""
    return name in sys.modules
