"""Plumbing shared by the GPU backends (``numba`` and ``cupy``): streams and output allocation.

The output is allocated by the caller's library where it has a CUDA allocator (PyTorch's caching
allocator for torch tensors, CuPy's pool for CuPy arrays) so the result is that library's array;
otherwise the backend allocates it and :func:`finish` converts it back (to NumPy for host callers,
through DLPack for JAX and others). Work runs on the caller's current stream.
"""

from __future__ import annotations

from .._interop import ArrayInfo
from .._registry import numpy_dtype


def caller_stream(obj, info: ArrayInfo) -> int:
    """The caller's current CUDA stream handle (0, the legacy default stream, when it has none)."""
    if info.lib == "torch" and info.on_gpu:
        import torch

        return torch.cuda.current_stream(obj.device).cuda_stream
    if info.lib == "cupy":
        import cupy

        return cupy.cuda.get_current_stream().ptr
    return 0


def empty_in_caller(shape, dtype: str, obj, info: ArrayInfo):
    """A new uninitialized array in the caller's library on ``obj``'s GPU, or None if the caller's
    library has no CUDA allocator we use (host arrays, JAX, TensorFlow, bare DLPack)."""
    if not info.on_gpu:
        return None
    if info.lib == "torch":
        import torch

        return torch.empty(shape, dtype=getattr(torch, dtype), device=obj.device)
    if info.lib == "cupy":
        import cupy

        with cupy.cuda.Device(info.device[1]):
            return cupy.empty(shape, dtype=numpy_dtype(dtype))
    return None


def finish(native_out, holder, info: ArrayInfo):
    """The result as the caller's array: the caller-allocated ``holder`` if there is one, else the
    backend's ``native_out`` converted (NumPy for host callers, DLPack for the rest)."""
    if holder is not None:
        return holder
    if not info.on_gpu:
        return native_out.copy_to_host() if hasattr(native_out, "copy_to_host") else native_out.get()
    if info.lib == "jax":
        import jax.dlpack

        return jax.dlpack.from_dlpack(native_out)
    if info.lib == "tensorflow":
        import tensorflow as tf

        return tf.experimental.dlpack.from_dlpack(native_out.toDlpack())
    return native_out
