"""Plumbing shared by the GPU backends (``numba`` and ``cupy``): streams and output allocation.

The output is allocated by the caller's library where it has a CUDA allocator (PyTorch's caching
allocator for torch tensors, CuPy's pool for CuPy arrays) so the result is that library's array;
otherwise the backend allocates it and :func:`finish` converts it back (to NumPy for host callers,
through DLPack for JAX and others).

Streams, per the DLPack standard (the consumer names its stream, the producer makes it wait):

* PyTorch CUDA tensors: the work runs on ``torch.cuda.current_stream(x.device)``; the output comes
  from PyTorch's caching allocator on that stream, so no synchronization is needed.
* CuPy arrays: the work runs on CuPy's current stream; the output comes from CuPy's pool.
* JAX arrays: the work runs on the legacy default stream (handle 0). Inputs are imported through
  ``__dlpack__(stream=1)`` (:func:`device_view`), so JAX makes that stream wait for them; the
  output is exported to JAX through CuPy's ``__dlpack__``, which records an event on the legacy
  stream that JAX's stream waits for. No host synchronization.
* TensorFlow tensors (TF ignores the DLPack ``stream`` argument): TF's devices are synchronized
  before the inputs are read, and the legacy stream before the output is handed back.
* bare DLPack objects and Numba device arrays: the legacy default stream; inputs imported with
  ``stream=1`` so a stream-aware producer orders its work before ours.
"""

from __future__ import annotations

from .._interop import ArrayInfo, Capsule
from .._registry import numpy_dtype


def caller_stream(obj, info: ArrayInfo) -> int:
    """The caller's current CUDA stream handle (0, the legacy default stream, when it has none)."""
    if info.lib == "torch" and info.on_gpu:
        import torch

        return torch.cuda.current_stream(obj.device).cuda_stream
    if info.lib == "cupy":
        import cupy

        return cupy.cuda.get_current_stream().ptr
    if info.lib == "tensorflow" and info.on_gpu:
        _sync_tensorflow()
    return 0


def _sync_tensorflow() -> None:
    """Wait for TensorFlow's queued GPU work: TF ignores the DLPack stream handshake."""
    import tensorflow as tf

    sync = getattr(getattr(tf.test, "experimental", None), "sync_devices", None)
    if sync is not None:
        sync()


def device_view(obj, info: ArrayInfo, stream: int, ordinal: int):
    """A CuPy view of ``obj`` on GPU ``ordinal`` (zero-copy for GPU arrays, a copy for host ones),
    ordered after the producer's pending work on ``stream`` through the DLPack handshake.

    Helper for the GPU backends' ``asarray``; shapes and dtypes are unchanged.
    """
    import cupy

    with cupy.cuda.Device(ordinal), cupy_stream(stream):
        if not info.on_gpu:
            from .._interop import to_host

            return cupy.asarray(to_host(obj, info))
        if info.lib == "cupy":
            return obj
        if info.lib == "tensorflow":
            import tensorflow as tf

            _sync_tensorflow()
            return cupy.from_dlpack(Capsule(tf.experimental.dlpack.to_dlpack(obj), (2, ordinal)))
        if hasattr(obj, "__dlpack__"):
            # cupy.from_dlpack passes the current (here: ``stream``) stream to __dlpack__.
            return cupy.from_dlpack(obj)
        return cupy.asarray(obj)  # __cuda_array_interface__ (Numba), synchronized by CuPy


class _StreamHandle:
    """A raw CUDA stream handle exposed through the CUDA stream protocol (``__cuda_stream__``)."""

    def __init__(self, handle: int):
        self.handle = int(handle)

    def __cuda_stream__(self):
        return (0, self.handle)


def cupy_stream(handle):
    """The CuPy stream object for a raw handle (0 or None: the legacy default stream)."""
    import cupy

    if not handle:
        return cupy.cuda.Stream.null
    return cupy.cuda.Stream.from_external(_StreamHandle(handle))


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
    if info.lib in ("jax", "tensorflow"):
        import cupy

        # Numba arrays have no __dlpack__: view them (zero-copy) as CuPy arrays. The work ran on
        # the legacy stream (caller_stream), which CuPy's export below orders JAX after.
        with cupy.cuda.Device(info.device[1]), cupy.cuda.Stream.null:
            out = native_out if isinstance(native_out, cupy.ndarray) else cupy.asarray(native_out)
            if info.lib == "jax":
                import jax.dlpack

                return jax.dlpack.from_dlpack(out)
            import tensorflow as tf

            cupy.cuda.Stream.null.synchronize()  # TF does not take part in the stream handshake
            return tf.experimental.dlpack.from_dlpack(out.toDlpack())
    return native_out
