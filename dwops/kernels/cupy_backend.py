"""The ``cupy`` backend: CUDA C++ templates (``dwops/kernels/cuda/*.cuh``) compiled by CuPy.

Every op and direction is one kernel template, instantiated by name expression (for example
``dw_forward<float, float, 3, 1, 4, 2, false>``) and compiled by CuPy's ``RawModule`` (NVRTC),
memoized per device and name expression (CuPy also caches the binaries on disk). The math of each kernel is
written at the top of its ``.cuh`` file. The host side has three modules, one job each:

* ``cupy_plans``: the launch plans (problem -> kernel name expression, grid, block, shared memory,
  integer arguments), pure Python, for the limits of the device the arrays are on
  (``cupy_device``: shared memory per block and per SM, SMs, threads; read once per device);
* ``cupy_compile``: sources, NVRTC options, the compile report (no GPU needed), cache warm-up;
* this module: the backend (:class:`CupyBackend`, instance ``BACKEND``): arrays through DLPack, the
  caller's stream, one launcher.

16-bit types are converted inside the kernels (to float on load, rounded once on the final
store); no call makes a whole-array float32 copy of an input or output. The one float32
temporary is the unfused separable forward's depthwise result (``mid``).
"""

from __future__ import annotations

import math

import numpy as np

from .._errors import BackendUnavailableError
from .._registry import Backend, numpy_dtype
from .._spec import ACTIVATION_CODES
from . import cupy_device
from .cupy_compile import _module
from .cupy_plans import (CTYPE, SMEM_DEFAULT, THREADS, Conv, Launch, _cdiv, _I64, conv_of_forward,
                         conv_of_grad_input, plan_conv1d_backward, plan_conv1d_final_state,
                         plan_conv1d_forward, plan_conv1d_update, plan_dw_forward,
                         plan_dw_grad_input, plan_dw_grad_weight, plan_pointwise, plan_separable,
                         mid_dtype, pointwise_chunks)

class CupyBackend(Backend):
    """CUDA C++ kernels through CuPy; arrays are CuPy arrays on the caller's device and stream."""

    name = "cupy"
    device = "cuda"

    def __init__(self):
        self._modules: dict = {}

    # -- availability and plumbing
    def unavailable_reason(self):
        try:
            import cupy
        except Exception as exc:  # ImportError, or a CUDA library failing to load
            return f"cupy cannot be imported ({exc})"
        try:
            if cupy.cuda.runtime.getDeviceCount() < 1:
                return "no CUDA device is visible"
        except Exception as exc:
            return f"no usable CUDA device ({exc})"
        return None

    def prefers(self, op, problem) -> bool:
        """True (the default GPU backend) unless no launch plan for this problem fits the current
        device (a dilated tile too large for its shared memory), so that "auto" falls back to
        numba."""
        dev = cupy_device.limits()
        try:
            if op == "depthwise_forward":
                plan_dw_forward(conv_of_forward(problem), problem.dtype, problem.layout, dev=dev)
            elif op == "depthwise_grad_input":
                plan_dw_grad_input(problem, problem.layout, dev=dev)
            elif op == "depthwise_grad_weight":
                plan_dw_grad_weight(problem, problem.layout, dev=dev)
            elif op == "depthwise_backward":  # the default composition: both gradients
                plan_dw_grad_input(problem, problem.layout, dev=dev)
                plan_dw_grad_weight(problem, problem.layout, dev=dev)
            elif op == "separable_forward" and \
                    plan_separable(problem, problem.dw.layout, dev) is None:
                plan_dw_forward(conv_of_forward(problem.dw), problem.dw.dtype, problem.dw.layout,
                                out_dtype=mid_dtype(problem.dw.dtype), dev=dev)
            elif op == "depthwise_conv1d_forward":
                plan_conv1d_forward(problem, dev=dev)
            elif op == "depthwise_conv1d_backward":
                plan_conv1d_backward(problem, dev=dev)
        except NotImplementedError:
            return False
        return True

    def stream_for(self, like_obj, like_info):
        from . import _gpu

        return _gpu.caller_stream(like_obj, like_info)

    def asarray(self, obj, info):
        """A C-contiguous CuPy array on the caller's GPU: zero-copy (DLPack with the caller's
        stream, or __cuda_array_interface__) for GPU arrays, a copy for host arrays. bfloat16
        arrives as its uint16 bits (CuPy has no bfloat16 dtype; the kernels read the bits)."""
        import cupy

        from . import _gpu

        if not info.on_gpu:
            from .._interop import to_host

            host = np.ascontiguousarray(to_host(obj, info))
            if info.dtype == "bfloat16":
                host = host.view(np.uint16)
            with cupy.cuda.Device(cupy.cuda.runtime.getDevice()), cupy.cuda.Stream.null:
                return cupy.asarray(host)
        ordinal = info.device[1]
        stream = self.stream_for(obj, info)
        if info.dtype == "bfloat16":
            obj = _bf16_bits(obj, info)
        a = _gpu.device_view(obj, info, stream, ordinal)
        if not a.flags.c_contiguous:
            with cupy.cuda.Device(ordinal), _gpu.cupy_stream(stream):
                a = cupy.ascontiguousarray(a)
        return a

    def allocate(self, shape, dtype, like_obj, like_info):
        import cupy

        from . import _gpu

        holder = None
        if not (dtype == "bfloat16" and like_info.lib == "cupy"):
            holder = _gpu.empty_in_caller(shape, dtype, like_obj, like_info)
        ordinal = like_info.device[1] if like_info.on_gpu else cupy.cuda.runtime.getDevice()
        if holder is None:
            with cupy.cuda.Device(ordinal):
                native = cupy.empty(shape, dtype=_cupy_dtype(dtype))
        elif like_info.lib == "torch" and dtype == "bfloat16":
            import torch

            with cupy.cuda.Device(ordinal):
                native = cupy.from_dlpack(holder.view(torch.int16))
        elif like_info.lib == "cupy":
            native = holder
        else:
            with cupy.cuda.Device(ordinal):
                native = cupy.from_dlpack(holder)

        def finish():
            result = _gpu.finish(native, holder, like_info)
            if dtype == "bfloat16" and holder is None:
                result = _bits_to_bf16(result, like_info)
            return result

        return native, finish

    # -- kernels
    @staticmethod
    def _dev(a) -> cupy_device.DeviceLimits:
        """The limits of the device array ``a`` is on."""
        return cupy_device.limits(a.device.id)

    def _kernel(self, file: str, name: str, shared: int):
        """The compiled kernel ``name`` of ``file`` on the current device (memoized), allowed
        ``shared`` bytes of dynamic shared memory."""
        import cupy

        key = (cupy.cuda.runtime.getDevice(), file, name)
        fn = self._modules.get(key)
        if fn is None:
            fn = _module(file, name).get_function(name)
            self._modules[key] = fn
        if shared > SMEM_DEFAULT and fn.max_dynamic_shared_size_bytes < shared:
            fn.max_dynamic_shared_size_bytes = shared
        return fn

    def _function(self, launch: Launch):
        return self._kernel(launch.file, launch.name, launch.shared)

    def _occupancy(self, a):
        """occupancy(file, name, threads, shared) for plans on the device of ``a``: resident
        blocks per SM from the driver (cudaOccupancyMaxActiveBlocksPerMultiprocessor), which
        counts the compiled kernel's registers as well as threads and shared memory."""
        import cupy

        def occupancy(file, name, threads, shared):
            with a.device:
                fn = self._kernel(file, name, shared)
                return cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(
                    fn.ptr, threads, shared)

        return occupancy

    def _run(self, launch: Launch, pointers: tuple, stream):
        """Launch ``launch`` on ``stream`` with the pointer arguments followed by its integers."""
        from . import _gpu

        with pointers[0].device:
            fn = self._function(launch)
            with _gpu.cupy_stream(stream):
                fn(launch.grid, launch.block, tuple(pointers) + _scalars(launch.ints),
                   shared_mem=launch.shared)

    def _weights_t(self, w, rows: int, kk: int, stream):
        """(rows, kk) -> (kk, rows) contiguous copy (NHWC kernels read taps along channels)."""
        import cupy

        from . import _gpu

        with w.device, _gpu.cupy_stream(stream):
            return cupy.ascontiguousarray(w.reshape(rows, kk).T)

    def depthwise_forward(self, p, x, w, b, out, stream=None):
        self._dw_forward(conv_of_forward(p), p.dtype, p.layout, x, w, b, out, stream)

    def _dw_forward(self, c: Conv, dtype, layout, x, w, b, out, stream, out_dtype=None):
        launch = plan_dw_forward(c, dtype, layout, x.data.ptr, out.data.ptr, out_dtype,
                                 dev=self._dev(x))
        if layout == "NHWC":
            w = self._weights_t(w, c.CO * c.R, c.KH * c.KW, stream)
        self._run(launch, (x, w, _ptr(b), out), stream)

    def depthwise_grad_input(self, p, gy, w, out, stream=None):
        if p.sh == 1 and p.sw == 1:
            self._dw_forward(conv_of_grad_input(p), p.dtype, p.layout, gy, w, None, out, stream)
            return
        launch = plan_dw_grad_input(p, p.layout, gy.data.ptr, out.data.ptr, dev=self._dev(gy))
        if p.layout == "NHWC":
            w = self._weights_t(w, p.CO, p.KH * p.KW, stream)
        self._run(launch, (gy, w, out), stream)

    def depthwise_grad_weight(self, p, x, gy, out, stream=None):
        import cupy

        from . import _gpu

        s1, s2, count = plan_dw_grad_weight(p, p.layout, x.data.ptr, gy.data.ptr, self._dev(x),
                                            self._occupancy(x))
        with x.device, _gpu.cupy_stream(stream):
            part = cupy.empty(count, dtype="float64" if p.dtype == "float64" else "float32")
        self._run(s1, (x, gy, part), stream)
        self._run(s2, (part, out), stream)

    def _pointwise(self, op, p, arrays: dict, bias, residual, stream, x_dtype=None):
        """pw_gemm over images [n0, n1) of each chunk (pointwise_chunks keeps the GEMM's 32-bit
        sizes in range); grad_weight chunks write consecutive splits of one partial buffer that a
        single sum_splits reduces. ``x_dtype``: the forward input's element type when it is not
        ``p.dtype`` (see plan_pointwise)."""
        import dataclasses

        import cupy

        from . import _gpu

        chunks = pointwise_chunks(p)
        out = next(a for k, a in arrays.items() if k in ("y", "gx", "gw"))
        dev = self._dev(out)
        plans = [plan_pointwise(op, dataclasses.replace(p, N=n1 - n0), p.layout, x_dtype, dev)
                 for n0, n1 in chunks]
        operands = plans[0][0].info["operands"]
        partial = plans[0][1] is not None
        part = None
        if partial:
            with out.device, _gpu.cupy_stream(stream):
                part = cupy.empty(sum(c for _, _, c in plans),
                                  dtype="float64" if p.dtype == "float64" else "float32")
        act = ACTIVATION_CODES[p.activation] if op == "forward" else 0
        offset = 0
        for (n0, n1), (gemm, _, count) in zip(chunks, plans):
            # the chunk's images of each batched operand (the weights w and gw are shared)
            a, b_, c = (arrays[k] if k in ("w", "gw") else arrays[k][n0:n1] for k in operands)
            res = None if residual is None else residual[n0:n1]
            # pw_gemm(A, B, C, partial, bias, bias_on_n, res, act, Mdim, ...)
            args = (a, b_, _ptr(None) if partial else c,
                    _ptr(None if part is None else part[offset:offset + count]), _ptr(bias),
                    np.int32(gemm.ints[0]), _ptr(res), np.int32(act)) + _scalars(gemm.ints[1:])
            offset += count
            with out.device:
                fn = self._function(gemm)
                with _gpu.cupy_stream(stream):
                    fn(gemm.grid, gemm.block, args, shared_mem=gemm.shared)
        if partial:
            splits = offset // (p.CO * p.CI)
            red = plans[0][1]
            red = Launch(red.file, red.name, red.grid, red.block, red.shared,
                         (splits, p.CO * p.CI), red.info)
            self._run(red, (part, out), stream)

    def _depthwise_grad_bias(self, p, gy, gb, stream=None):
        """``gb`` (C*M,) = ``gy`` summed over N, OH, OW: the pointwise weight gradient of ``gy``
        against a one-channel input of ones, made on the device in the caller's stream (no host
        copy, no default-stream synchronisation)."""
        import cupy

        from .._spec import PointwiseProblem, _physical
        from . import _gpu

        one = 0x3F80 if p.dtype == "bfloat16" else 1   # bfloat16 travels as its uint16 bits
        with gy.device, _gpu.cupy_stream(stream):
            ones = cupy.full(_physical(p.layout, p.N, 1, p.OH, p.OW), one, dtype=gy.dtype)
        q = PointwiseProblem(p.N, 1, p.CO, p.OH, p.OW, p.layout, p.dtype)
        self.pointwise_grad_weight(q, ones, gy, gb.reshape(p.CO, 1), stream=stream)

    def pointwise_forward(self, p, x, w, b, residual, out, stream=None):
        self._pointwise("forward", p, {"x": x, "w": w, "y": out}, b, residual, stream)

    def pointwise_grad_input(self, p, gy, w, out, stream=None):
        self._pointwise("grad_input", p, {"gy": gy, "w": w, "gx": out}, None, None, stream)

    def pointwise_grad_weight(self, p, x, gy, out, stream=None):
        self._pointwise("grad_weight", p, {"x": x, "gy": gy, "gw": out}, None, None, stream)

    def separable_forward(self, p, x, dw_w, pw_w, b, dw_b, residual, out, stream=None):
        from . import _gpu

        launch = plan_separable(p, p.dw.layout, self._dev(x))
        if launch is not None:
            args = (x, dw_w, _ptr(dw_b), np.int32(ACTIVATION_CODES[p.dw.activation]), pw_w,
                    _ptr(b), _ptr(residual), np.int32(ACTIVATION_CODES[p.pw.activation]), out) + \
                _scalars(launch.ints)
            with x.device:
                fn = self._function(launch)
                with _gpu.cupy_stream(stream):
                    fn(launch.grid, launch.block, args, shared_mem=launch.shared)
            return
        # Unfused: the depthwise result (with dw bias and dw activation) in a temporary, float32
        # for 16-bit types (mid_dtype): dw_forward reads x in its dtype and writes float32,
        # pw_gemm reads that float32 result, x's dtype for the weights, bias and residual, and
        # rounds once into ``out``, as the contract requires.
        import cupy

        mid_dt = mid_dtype(p.dw.dtype)
        with x.device, _gpu.cupy_stream(stream):
            mid = cupy.empty(p.dw.y_shape, dtype=numpy_dtype(mid_dt))
        self._dw_forward(conv_of_forward(p.dw), p.dw.dtype, p.dw.layout, x, dw_w, dw_b, mid,
                         stream, mid_dt)
        self._pointwise("forward", p.pw, {"x": mid, "w": pw_w, "y": out}, b, residual, stream,
                        mid_dt)

    # -- depthwise 1-d
    def nondecreasing(self, seq) -> bool:
        with seq.device:
            return bool((seq[:, 1:] >= seq[:, :-1]).all())

    def aliases(self, native, obj, info) -> bool:
        """True when ``native`` is the caller's own GPU memory (same device pointer, same number
        of elements, the caller's array C-contiguous), so an update may write into it."""
        if not info.on_gpu:
            return False
        try:
            ptr = _device_pointer(obj, info)
        except Exception:
            return False
        return ptr is not None and ptr == native.data.ptr and native.size == math.prod(info.shape)

    def _seq32(self, seq, stream):
        """seq_idx as int32 (N, L): int64 becomes segment numbers (0, 1, ... counting the changes
        along L), which keeps every equality of the non-decreasing original."""
        if seq is None or seq.dtype == np.int32:
            return seq
        import cupy

        from . import _gpu

        with seq.device, _gpu.cupy_stream(stream):
            out = cupy.empty(seq.shape, dtype=np.int32)
            out[:, :1] = 0
            out[:, 1:] = (seq[:, 1:] != seq[:, :-1]).astype(np.int32).cumsum(axis=1)
        return out

    def depthwise_conv1d_forward(self, p, x, w, b, state, seq, out, final_out, stream=None):
        launch = plan_conv1d_forward(p, x.data.ptr, out.data.ptr, dev=self._dev(x))
        self._run(launch, (x, w, _ptr(b), _ptr(state), _ptr(self._seq32(seq, stream)), out),
                  stream)
        if final_out is not None:
            self._run(plan_conv1d_final_state(p), (x, _ptr(state), final_out), stream)

    def depthwise_conv1d_backward(self, p, x, gy, w, state, seq, gx, gw, gb, gstate,
                                  stream=None):
        import cupy

        from . import _gpu

        launch = plan_conv1d_backward(p, x.data.ptr, gy.data.ptr,
                                      0 if gx is None else gx.data.ptr, dev=self._dev(x))
        splits = launch.info["splits"]
        acc = "float64" if p.dtype == "float64" else "float32"
        with x.device, _gpu.cupy_stream(stream):
            part_w = None if gw is None else cupy.empty(splits * p.CO * p.K, dtype=acc)
            part_b = None if gb is None else cupy.empty(splits * p.CO, dtype=acc)
        self._run(launch, (x, gy, w, _ptr(state), _ptr(self._seq32(seq, stream)), _ptr(gx),
                           _ptr(gstate), _ptr(part_w), _ptr(part_b)), stream)
        for part, out, count in ((part_w, gw, p.CO * p.K), (part_b, gb, p.CO)):
            if part is not None:
                red = Launch("conv1d", f"sum_splits<{CTYPE[p.dtype]}>",
                             (_cdiv(count, THREADS), 1, 1), (THREADS, 1, 1), 0, (splits, count))
                self._run(red, (part, out), stream)

    def depthwise_conv1d_update(self, p, x, state, w, b, out, state_out, stream=None):
        self._run(plan_conv1d_update(p), (x, state, w, _ptr(b), out, state_out), stream)


def _device_pointer(obj, info):
    """The device address of the caller's C-contiguous GPU array ``obj``, else None."""
    if info.lib == "torch":
        return obj.data_ptr() if obj.is_contiguous() else None
    if info.lib == "cupy":
        return obj.data.ptr if obj.flags.c_contiguous else None
    iface = getattr(obj, "__cuda_array_interface__", None)
    if iface is None or iface.get("strides") is not None:
        return None
    return iface["data"][0]


def _ptr(a):
    """A kernel pointer argument: the array, or a null pointer for None."""
    return np.uint64(0) if a is None else a


def _scalars(ints) -> tuple:
    return tuple(np.int64(v) if isinstance(v, _I64) else np.int32(v) for v in ints)


def _cupy_dtype(dtype: str):
    return np.dtype(np.uint16) if dtype == "bfloat16" else numpy_dtype(dtype)


def _bf16_bits(obj, info):
    """The bits of a bfloat16 GPU array as a 16-bit integer array of the same library (zero-copy
    for PyTorch), since CuPy has no bfloat16 dtype."""
    if info.lib == "torch":
        import torch

        return obj.detach().view(torch.int16)
    if info.lib == "jax":
        import jax

        return jax.lax.bitcast_convert_type(obj, np.uint16)
    raise BackendUnavailableError(
        "dwops cupy backend: bfloat16 GPU arrays are supported from PyTorch and JAX (CuPy has no "
        "bfloat16 dtype); use backend='numba' or pass float16/float32")


def _bits_to_bf16(result, info):
    """Turn a uint16 result holding bfloat16 bits back into bfloat16 in the caller's library."""
    if isinstance(result, np.ndarray):
        return result.view(numpy_dtype("bfloat16"))
    if info.lib == "jax":
        import jax
        import jax.numpy as jnp

        return jax.lax.bitcast_convert_type(result, jnp.bfloat16)
    return result


BACKEND = CupyBackend()
