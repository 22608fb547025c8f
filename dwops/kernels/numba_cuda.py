"""The ``numba`` backend: every op and gradient as ``numba.cuda.jit`` kernels with tiled
shared-memory loads.

The kernels and their math live in ``_numba_depthwise.py`` (depthwise forward, grad_input,
grad_weight stage 1), ``_numba_gemm.py`` (pointwise GEMM with fused epilogue, split reduction,
fused separable kernel) and ``_numba_conv1d.py`` (depthwise 1-d forward, one-pass backward, final
state, decode update, seq_idx order check); this module is the launcher (pick the
specialization, allocate scratch, launch on the caller's stream), the array plumbing and the
kernel report.

Specializations: kernel sizes 1, 3, 5 and 7 (square) and 1-d widths 2 to 8 are compile-time
constants, every other size (2-d: up to 31x31) runs the generic path; dtypes float16 (float32
accumulation), float32, float64. bfloat16 is refused with a TypeError: Numba cannot type a
bfloat16 array argument (NumPy has no bfloat16 dtype of its own and PyTorch exports none through
``__cuda_array_interface__``).
"""

from __future__ import annotations

import numpy as np

from .. import _spec
from .._registry import Backend
from . import _gpu

THREADS = 256
# Blocks a split reduction aims at (grad_weight of both ops): enough to fill every SM a few times.
TARGET_BLOCKS = 1024


def _cuda():
    from numba import cuda

    from .._jit import install_notice

    install_notice()  # one line on stderr while a kernel compiles (DWOPS_QUIET=1 hides it)
    return cuda


# ----------------------------------------------------------------------------- launch helpers


def _flat(a):
    """1-d view of a C-contiguous device array."""
    return a.reshape(a.size) if a.ndim != 1 else a


_DUMMIES: dict = {}


def _dummy(dtype: str):
    """A 1-element device array standing in for an absent bias / residual of ``dtype``."""
    if dtype not in _DUMMIES:
        _DUMMIES[dtype] = _cuda().device_array(1, np.dtype(dtype))
    return _DUMMIES[dtype]


def _or_dummy(a, dtype):
    return _dummy(dtype) if a is None else _flat(a)


def _launch(kernel, blocks, smem, stream, *args):
    kernel.fn[int(blocks), THREADS, stream or 0, int(smem)](*args)


def _scratch(n, dtype):
    return _cuda().device_array(int(n), np.dtype(dtype))


def _dw_args(p):
    return (p.N, p.C, p.H, p.W, p.M, p.OH, p.OW, p.sh, p.sw, p.dh, p.dw, p.pt, p.pl, p.KH, p.KW)


def _run_depthwise_forward(p, x, w, b, out, stream, out_dt=None):
    from . import _numba_depthwise as D
    from ._numba_common import fits, kernel_key

    smem = D.forward_smem(p)
    staged = fits(smem)
    kh, kw = kernel_key(p.KH, p.KW)
    k = D.forward_kernel(p.layout, kh, kw, p.dtype, out_dt or p.dtype, p.activation, p.has_bias,
                         staged)
    _launch(k, D.forward_grid(p), smem if staged else 0, stream, _flat(x), _flat(w),
            _or_dummy(b, p.dtype), _flat(out), *_dw_args(p))


def _gemm_splits(tiles, nbr, K, target_blocks=None):
    """``(bpg, ks, kc_len)`` splitting an ``nbr x K`` reduction over about ``target_blocks``."""
    from ._numba_common import cdiv
    from ._numba_gemm import BK

    want = max(1, (target_blocks or TARGET_BLOCKS) // max(tiles, 1))
    if nbr >= want:
        return cdiv(nbr, want), 1, K
    ks = cdiv(want, nbr)
    kc_len = cdiv(cdiv(K, ks), BK) * BK
    return 1, cdiv(K, kc_len), kc_len


def _run_gemm(A, B, C, bias, R, Mr, Nc, K, a, b, c, nz, dts, act=None, bias_on_m=True,
              nbr=1, bpg=1, ks=1, kc_len=None, stream=None):
    """Launch the GEMM: ``a = (a_bo, a_br, a_sm, a_sk)``, ``b = (b_bo, b_br, b_sk, b_sn)``,
    ``c = (c_bz, c_sm, c_sn)``, ``dts = (a_dt, b_dt, c_dt)``, ``nz`` output slices."""
    from ._numba_common import cdiv
    from ._numba_gemm import BM, BN, gemm_kernel

    a_dt, b_dt, c_dt = dts
    k = gemm_kernel(a_dt, b_dt, c_dt, act, bias is not None, bias_on_m, R is not None)
    blocks = cdiv(Mr, BM) * cdiv(Nc, BN) * nz
    _launch(k, blocks, 0, stream, _flat(A), _flat(B), _flat(C), _or_dummy(bias, c_dt),
            _or_dummy(R, c_dt), Mr, Nc, K, *a, *b, *c, nbr, bpg, ks, kc_len or K)


def _run_reduce(part, out, L, S, part_dt, out_dt, stream):
    from ._numba_common import cdiv
    from ._numba_gemm import reduce_kernel

    _launch(reduce_kernel(part_dt, out_dt), min(cdiv(L, THREADS), 4096), 0, stream, part,
            _flat(out), L, S)


# ----------------------------------------------------------------------------- the backend


class NumbaBackend(Backend):
    """Numba CUDA kernels; arrays are Numba device arrays (views of the caller's memory)."""

    name = "numba"
    device = "cuda"

    def unavailable_reason(self):
        try:
            from numba import cuda
        except ImportError as exc:  # pragma: no cover - numba is a dependency
            return f"numba.cuda cannot be imported ({exc})"
        try:
            ok = cuda.is_available()
        except Exception as exc:  # pragma: no cover - broken driver
            return f"numba.cuda cannot reach a GPU ({exc})"
        return None if ok else ("numba.cuda finds no CUDA GPU or driver "
                                "(cuda.is_available() is False)")

    # -- plumbing
    def asarray(self, obj, info):
        """A C-contiguous Numba device array viewing ``obj`` (zero-copy when it is a contiguous
        GPU array; host arrays are copied to the device)."""
        if info.dtype == "bfloat16":
            raise TypeError(
                "backend 'numba' does not support dtype bfloat16 (Numba CUDA kernels cannot take "
                "bfloat16 arrays); use backend='cupy' or another dtype")
        cuda = _cuda()
        if not info.on_gpu:
            from .._interop import to_host

            return cuda.to_device(np.ascontiguousarray(to_host(obj, info)))
        if info.lib == "numba":
            if obj.is_c_contiguous():
                return obj
            try:
                import cupy

                return cuda.as_cuda_array(cupy.ascontiguousarray(cupy.asarray(obj)), sync=False)
            except ImportError:
                return cuda.to_device(np.ascontiguousarray(obj.copy_to_host()))
        if info.lib == "torch":
            t = obj.detach()
            if t.is_conj():
                t = t.resolve_conj()
            if t.is_neg():
                t = t.resolve_neg()
            return cuda.as_cuda_array(t.contiguous(), sync=False)
        if info.lib == "cupy":
            import cupy

            return cuda.as_cuda_array(cupy.ascontiguousarray(obj), sync=False)
        import cupy

        view = _gpu.device_view(obj, info, _gpu.caller_stream(obj, info), info.device[1])
        return cuda.as_cuda_array(cupy.ascontiguousarray(view), sync=False)

    def allocate(self, shape, dtype, like_obj, like_info):
        cuda = _cuda()
        if not like_info.on_gpu:  # host caller: copy back into the caller's library
            from .._interop import from_host

            native = cuda.device_array(tuple(shape), np.dtype(dtype))
            return native, lambda: from_host(native.copy_to_host(), like_info, like_obj)
        holder = _gpu.empty_in_caller(shape, dtype, like_obj, like_info)
        if holder is not None:
            native = cuda.as_cuda_array(holder, sync=False)
        else:
            native = cuda.device_array(tuple(shape), np.dtype(dtype))
        return native, lambda: _gpu.finish(native, holder, like_info)

    def stream_for(self, like_obj, like_info):
        handle = _gpu.caller_stream(like_obj, like_info)
        return _cuda().external_stream(handle) if handle else 0

    # -- depthwise
    def depthwise_forward(self, p, x, w, b, out, stream=None):
        _run_depthwise_forward(p, x, w, b, out, stream)

    def depthwise_grad_input(self, p, gy, w, out, stream=None):
        from . import _numba_depthwise as D
        from ._numba_common import fits, kernel_key

        smem = D.grad_input_smem(p)
        staged = fits(smem)
        k = D.grad_input_kernel(p.layout, *kernel_key(p.KH, p.KW), p.dtype, staged)
        _launch(k, D.grad_input_grid(p), smem if staged else 0, stream, _flat(gy), _flat(w),
                _flat(out), *_dw_args(p))

    def depthwise_grad_weight(self, p, x, gy, out, stream=None):
        from . import _numba_depthwise as D
        from ._numba_common import acc_dtype, fits, itemsize, kernel_key

        acc = acc_dtype(p.dtype)
        smem = D.grad_weight_smem(p)
        staged = fits(smem)
        if not staged:
            smem = THREADS * itemsize(acc) if p.layout == "NCHW" else 0
        blocks, splits, per = D.grad_weight_plan(p, TARGET_BLOCKS)
        L = p.CO * p.KH * p.KW
        part = _scratch(splits * L, acc)
        k = D.grad_weight_kernel(p.layout, *kernel_key(p.KH, p.KW), p.dtype, staged)
        _launch(k, blocks, smem, stream, _flat(x), _flat(gy), part, *_dw_args(p), splits, per)
        _run_reduce(part, out, L, splits, acc, p.dtype, stream)

    # -- pointwise
    def pointwise_forward(self, p, x, w, b, residual, out, stream=None):
        HW = p.H * p.W
        dts = (p.dtype, p.dtype, p.dtype)
        if p.layout == "NCHW":  # y[n] (CO x HW) = W (CO x CI) @ x[n] (CI x HW)
            _run_gemm(w, x, out, b, residual, p.CO, HW, p.CI, (0, 0, p.CI, 1),
                      (p.CI * HW, 0, HW, 1), (p.CO * HW, HW, 1), p.N, dts, p.activation, True,
                      stream=stream)
        else:  # y (NHW x CO) = x (NHW x CI) @ W^T (CI x CO)
            _run_gemm(x, w, out, b, residual, p.N * HW, p.CO, p.CI, (0, 0, p.CI, 1),
                      (0, 0, 1, p.CI), (0, p.CO, 1), 1, dts, p.activation, False, stream=stream)

    def pointwise_grad_input(self, p, gy, w, out, stream=None):
        HW = p.H * p.W
        dts = (p.dtype, p.dtype, p.dtype)
        if p.layout == "NCHW":  # gx[n] (CI x HW) = W^T (CI x CO) @ gy[n] (CO x HW)
            _run_gemm(w, gy, out, None, None, p.CI, HW, p.CO, (0, 0, 1, p.CI),
                      (p.CO * HW, 0, HW, 1), (p.CI * HW, HW, 1), p.N, dts, stream=stream)
        else:  # gx (NHW x CI) = gy (NHW x CO) @ W (CO x CI)
            _run_gemm(gy, w, out, None, None, p.N * HW, p.CI, p.CO, (0, 0, p.CO, 1),
                      (0, 0, p.CI, 1), (0, p.CI, 1), 1, dts, stream=stream)

    def pointwise_grad_weight(self, p, x, gy, out, stream=None):
        from ._numba_common import acc_dtype, cdiv
        from ._numba_gemm import BM, BN

        HW = p.H * p.W
        if p.layout == "NCHW":  # gW = sum_n gy[n] (CO x HW) @ x[n]^T (HW x CI)
            nbr, K = p.N, HW
            a, b = (0, p.CO * HW, HW, 1), (0, p.CI * HW, 1, HW)
        else:  # gW = gy^T (CO x NHW) @ x (NHW x CI)
            nbr, K = 1, p.N * HW
            a, b = (0, 0, 1, p.CO), (0, 0, p.CI, 1)
        bpg, ks, kc_len = _gemm_splits(cdiv(p.CO, BM) * cdiv(p.CI, BN), nbr, K)
        splits = cdiv(nbr, bpg) * ks
        if splits == 1:
            _run_gemm(gy, x, out, None, None, p.CO, p.CI, K, a, b, (0, p.CI, 1), 1,
                      (p.dtype, p.dtype, p.dtype), nbr=nbr, bpg=bpg, ks=ks, kc_len=kc_len,
                      stream=stream)
            return
        acc = acc_dtype(p.dtype)
        L = p.CO * p.CI
        part = _scratch(splits * L, acc)
        _run_gemm(gy, x, part, None, None, p.CO, p.CI, K, a, b, (L, p.CI, 1), splits,
                  (p.dtype, p.dtype, acc), nbr=nbr, bpg=bpg, ks=ks, kc_len=kc_len, stream=stream)
        _run_reduce(part, out, L, splits, acc, p.dtype, stream)

    # -- separable
    def separable_forward(self, p, x, dw_w, pw_w, b, dw_b, residual, out, stream=None):
        from . import _numba_gemm as G
        from ._numba_common import acc_dtype, fits, kernel_key

        d, q = p.dw, p.pw
        smem = G.separable_smem(p)
        if fits(smem):  # fused: the intermediate stays in shared memory
            k = G.separable_kernel(d.layout, *kernel_key(d.KH, d.KW), d.dtype, d.activation,
                                   q.activation, d.has_bias, q.has_bias, q.has_residual)
            _launch(k, G.separable_grid(p), smem, stream, _flat(x), _flat(dw_w), _flat(pw_w),
                    _or_dummy(b, d.dtype), _or_dummy(dw_b, d.dtype),
                    _or_dummy(residual, d.dtype), _flat(out), d.N, d.C, d.H, d.W, d.M, d.OH,
                    d.OW, q.CO, d.sh, d.sw, d.dh, d.dw, d.pt, d.pl, d.KH, d.KW)
            return
        # unfused: depthwise into an accumulation-dtype temporary, then the GEMM with epilogue
        acc = acc_dtype(d.dtype)
        mid = _scratch(d.N * d.CO * d.OH * d.OW, acc)
        _run_depthwise_forward(d, x, dw_w, dw_b, mid, stream, out_dt=acc)
        HW = q.H * q.W
        if d.layout == "NCHW":
            _run_gemm(pw_w, mid, out, b, residual, q.CO, HW, q.CI, (0, 0, q.CI, 1),
                      (q.CI * HW, 0, HW, 1), (q.CO * HW, HW, 1), q.N, (d.dtype, acc, d.dtype),
                      q.activation, True, stream=stream)
        else:
            _run_gemm(mid, pw_w, out, b, residual, q.N * HW, q.CO, q.CI, (0, 0, q.CI, 1),
                      (0, 0, 1, q.CI), (0, q.CO, 1), 1, (acc, d.dtype, d.dtype), q.activation,
                      False, stream=stream)

    # -- depthwise 1-d
    def nondecreasing(self, seq) -> bool:
        from . import _numba_conv1d as D1
        from ._numba_common import cdiv

        cuda = _cuda()
        # the interface carries no stream: wait for every stream (seq may have been written on
        # the caller's), the answer needs a round trip to the host anyway
        cuda.synchronize()
        flag = cuda.to_device(np.zeros(1, np.int32))
        n, length = seq.shape
        _launch(D1.decreasing_kernel(str(seq.dtype)), min(cdiv(seq.size, THREADS), 4096), 0, 0,
                _flat(seq), flag, n, length)
        return int(flag.copy_to_host()[0]) == 0

    def aliases(self, native, obj, info) -> bool:
        """True when ``native`` is ``obj`` or a view of the same device memory (same pointer,
        size and dtype); host arrays are copied by :meth:`asarray`, so never."""
        if not info.on_gpu:
            return False
        if native is obj:
            return True
        try:
            theirs = obj.__cuda_array_interface__
            ours = native.__cuda_array_interface__
        except AttributeError:
            return False
        return (theirs["data"][0] == ours["data"][0] and tuple(theirs["shape"]) == native.shape
                and theirs.get("strides") in (None, ours.get("strides"))
                and np.dtype(theirs["typestr"]) == native.dtype)

    def depthwise_conv1d_forward(self, p, x, w, b, state, seq, out, final_out, stream=None):
        from . import _numba_conv1d as D1
        from ._numba_common import cdiv

        seq_dt = None if seq is None else str(seq.dtype)
        if p.layout == "NCL":
            tile, staged, blocks = D1.ncl_plan(p, lambda tl: D1.forward_smem(p, tl))
            smem = D1.forward_smem(p, tile) if staged else 0
        else:
            tile, blocks, _ = D1.nlc_plan(p, p.CO)
            staged, smem = False, 0
        k = D1.forward_kernel(p.layout, D1.kernel_key(p.K), p.dtype, p.activation, p.has_bias,
                              p.has_state, seq_dt, staged)
        _launch(k, blocks, smem, stream, _flat(x), _flat(w), _or_dummy(b, p.dtype),
                _or_dummy(state, p.dtype), _or_dummy(seq, "int32"), _flat(out), p.N, p.C, p.L,
                p.M, p.OL, p.s, p.d, p.pl, p.K, tile)
        if final_out is not None:
            n = p.N * p.C * p.W
            _launch(D1.final_state_kernel(p.layout, p.dtype, p.has_state),
                    min(cdiv(n, THREADS), 4096), 0, stream, _flat(x), _or_dummy(state, p.dtype),
                    _flat(final_out), p.N, p.C, p.L, p.W)

    def depthwise_conv1d_backward(self, p, x, gy, w, state, seq, gx, gw, gb, gstate,
                                  stream=None):
        from . import _numba_conv1d as D1
        from ._numba_common import acc_dtype

        acc = acc_dtype(p.dtype)
        seq_dt = None if seq is None else str(seq.dtype)
        need_w = gw is not None
        if p.layout == "NCL":
            tile, staged, blocks = D1.ncl_plan(p, lambda tl: D1.backward_smem(p, tl, need_w))
            smem = D1.backward_smem(p, tile, need_w) if staged else D1.reduce_smem(p)
            splits = blocks // (p.N * p.C) * p.N
        else:
            tile, blocks, tiles_l = D1.nlc_plan(p, p.C)
            staged, smem, splits = False, D1.reduce_smem(p), p.N * tiles_l
        part_w = _scratch(splits * p.CO * p.K, acc) if need_w else _dummy(acc)
        part_b = _scratch(splits * p.CO, acc) if gb is not None else _dummy(acc)
        k = D1.backward_kernel(p.layout, D1.kernel_key(p.K), p.dtype, p.has_state, seq_dt,
                               gx is not None, need_w, gb is not None, gstate is not None, staged)
        _launch(k, blocks, smem, stream, _flat(x), _flat(gy), _flat(w),
                _or_dummy(state, p.dtype), _or_dummy(seq, "int32"), _or_dummy(gx, p.dtype),
                part_w, part_b, _or_dummy(gstate, p.dtype), p.N, p.C, p.L, p.M, p.OL, p.s, p.d,
                p.pl, p.K, tile)
        if need_w:
            _run_reduce(part_w, gw, p.CO * p.K, splits, acc, p.dtype, stream)
        if gb is not None:
            _run_reduce(part_b, gb, p.CO, splits, acc, p.dtype, stream)

    def depthwise_conv1d_update(self, p, x, state, w, b, out, state_out, stream=None):
        from . import _numba_conv1d as D1
        from ._numba_common import cdiv

        k = D1.update_kernel(D1.kernel_key(p.K), p.dtype, p.activation, p.has_bias)
        _launch(k, min(cdiv(p.N * p.C, THREADS), 4096), 0, stream, _flat(x), _flat(state),
                _flat(w), _or_dummy(b, p.dtype), _flat(out), _flat(state_out), p.N, p.C, p.M,
                p.T, p.K)


BACKEND = NumbaBackend()


# ----------------------------------------------------------------------------- kernel report


def _report_specs(quick: bool = False):
    """``(op, direction, specialization, Kernel)`` for the kernels the launcher picks over a
    representative set: both layouts; float32 with every kernel-size specialization (1, 3, 5, 7,
    generic), float16 and float64 with 3x3 and generic; the staged and the direct (footprint past
    the shared-memory budget) variants of 3x3 and generic; every activation and bias flag; the
    fused separable kernel and every GEMM role; the depthwise 1-d kernels (:func:`_conv1d_specs`).
    ``quick`` keeps one 2-d kernel per factory branch (layout, staged/direct, specialized/generic)
    and the heaviest dtype, for the unit test (the 1-d quick set has its own test)."""
    if quick:
        yield from _quick_specs()
        return
    from . import _numba_depthwise as D
    from . import _numba_gemm as G
    from ._numba_common import acc_dtype

    def name(k):
        return f"{k[0]}x{k[1]}" if k[0] else "generic"

    for layout in ("NCHW", "NHWC"):
        for dt in ("float16", "float32", "float64"):
            sizes = ((3, 3), (0, 0)) if dt != "float32" else ((1, 1), (3, 3), (5, 5), (7, 7),
                                                               (0, 0))
            for kh, kw in sizes:
                for staged in (True, False) if kh in (0, 3) else (True,):
                    tag = f"{layout} {dt} k={name((kh, kw))} {'staged' if staged else 'direct'}"
                    yield ("depthwise", "forward", tag,
                           D.forward_kernel(layout, kh, kw, dt, dt, None, False, staged))
                    yield ("depthwise", "grad_input", tag,
                           D.grad_input_kernel(layout, kh, kw, dt, staged))
                    yield ("depthwise", "grad_weight", tag,
                           D.grad_weight_kernel(layout, kh, kw, dt, staged))
                if kh == 3:
                    yield ("separable", "forward", f"{layout} {dt} k=3x3 fused",
                           G.separable_kernel(layout, 3, 3, dt, None, None, False, False, False))
            acc = acc_dtype(dt)
            if dt != "float32":  # the unfused separable intermediate (16-bit: float32)
                yield ("depthwise", "forward", f"{layout} {dt} k=3x3 bias relu -> {acc}",
                       D.forward_kernel(layout, 3, 3, dt, acc, "relu", True, True))
            yield ("separable", "forward", f"{layout} {dt} k=generic fused relu/gelu bias res",
                   G.separable_kernel(layout, 0, 0, dt, "relu", "gelu", True, True, True))
        for act in _spec.ACTIVATIONS[1:]:
            yield ("depthwise", "forward", f"{layout} float32 k=3x3 bias {act}",
                   D.forward_kernel(layout, 3, 3, "float32", "float32", act, True, True))
    for dt in ("float16", "float32", "float64"):
        acc = acc_dtype(dt)
        for bias_on_m in (True, False):
            for act in _spec.ACTIVATIONS[1:] if dt == "float32" else ("gelu",):
                yield ("pointwise", "forward",
                       f"{dt} bias on {'m (NCHW)' if bias_on_m else 'n (NHWC)'} {act} res",
                       G.gemm_kernel(dt, dt, dt, act, True, bias_on_m, True))
        # grad_input and grad_weight (partials in ``acc``, equal to ``dt`` unless 16-bit)
        yield ("pointwise", "grad_input+grad_weight", f"{dt}",
               G.gemm_kernel(dt, dt, dt, None, False, True, False))
        if acc != dt:
            yield ("pointwise", "grad_weight", f"{dt} split -> {acc}",
                   G.gemm_kernel(dt, dt, acc, None, False, True, False))
        if dt != "float32":
            yield ("separable", "forward", f"{dt} unfused pointwise NCHW",
                   G.gemm_kernel(dt, acc, dt, "relu", True, True, True))
            yield ("separable", "forward", f"{dt} unfused pointwise NHWC",
                   G.gemm_kernel(acc, dt, dt, "relu", True, False, True))
        yield ("reduce", "grad_weight", f"{acc} -> {dt}", G.reduce_kernel(acc, dt))
    yield from _conv1d_specs(False)


def _conv1d_specs(quick: bool):
    """The depthwise 1-d kernels: both layouts, every dtype, widths 4 (and 2, 8 in float32) and
    generic, staged and direct NCL variants, bare and full-featured epilogues (bias, silu,
    initial_state, seq_idx), the backward with every output and with single outputs, the final
    state, the decode update and the seq_idx order check. ``quick``: one per code path."""
    from . import _numba_conv1d as D1

    op = "depthwise_conv1d"

    def k_name(k):
        return f"k={k}" if k else "k=generic"

    if quick:
        for layout, k, dt, staged in (("NCL", 4, "float16", True), ("NCL", 0, "float64", False),
                                      ("NLC", 4, "float32", False), ("NLC", 0, "float64", False)):
            tag = f"{layout} {dt} {k_name(k)} {'staged' if staged else 'direct'}"
            yield (op, "forward", tag + " bias silu state seq",
                   D1.forward_kernel(layout, k, dt, "silu", True, True, "int64", staged))
            yield (op, "backward", tag + " all outputs state seq",
                   D1.backward_kernel(layout, k, dt, True, "int32", True, True, True, True,
                                      staged))
        yield (op, "final_state", "NLC float64 state", D1.final_state_kernel("NLC", "float64",
                                                                            True))
        yield (op, "update", "float16 k=4 bias silu", D1.update_kernel(4, "float16", "silu", True))
        yield (op, "update", "float64 k=generic", D1.update_kernel(0, "float64", None, False))
        yield (op, "seq_idx check", "int64", D1.decreasing_kernel("int64"))
        return
    for layout in ("NCL", "NLC"):
        for dt in ("float16", "float32", "float64"):
            for k in ((2, 4, 8, 0) if dt == "float32" else (4, 0)):
                every = dt == "float32" and k in (4, 0)  # also the bare and single-output kernels
                for staged in ((True, False) if layout == "NCL" else (False,)):
                    tag = f"{layout} {dt} {k_name(k)} {'staged' if staged else 'direct'}"
                    yield (op, "forward", tag + " bias silu state seq",
                           D1.forward_kernel(layout, k, dt, "silu", True, True, "int64", staged))
                    yield (op, "backward", tag + " all outputs state seq",
                           D1.backward_kernel(layout, k, dt, True, "int32", True, True, True,
                                              True, staged))
                    if not every:
                        continue
                    yield (op, "forward", tag,
                           D1.forward_kernel(layout, k, dt, None, False, False, None, staged))
                    yield (op, "backward", tag + " grad_input",
                           D1.backward_kernel(layout, k, dt, False, None, True, False, False,
                                              False, staged))
                    yield (op, "backward", tag + " grad_weight grad_bias",
                           D1.backward_kernel(layout, k, dt, False, None, False, True, True,
                                              False, staged))
            yield (op, "final_state", f"{layout} {dt} state",
                   D1.final_state_kernel(layout, dt, True))
    for dt in ("float16", "float32", "float64"):
        for k in (4, 0):
            yield (op, "update", f"{dt} {k_name(k)} bias silu",
                   D1.update_kernel(k, dt, "silu", True))
        yield (op, "update", f"{dt} k=generic", D1.update_kernel(0, dt, None, False))
    for act in ("relu", "relu6", "gelu"):
        yield (op, "forward", f"NCL float32 k=4 staged bias {act}",
               D1.forward_kernel("NCL", 4, "float32", act, True, False, None, True))
    for seq_dt in ("int32", "int64"):
        yield (op, "seq_idx check", seq_dt, D1.decreasing_kernel(seq_dt))


def _quick_specs():
    from . import _numba_depthwise as D
    from . import _numba_gemm as G

    for layout in ("NCHW", "NHWC"):
        for kh, dt, staged in ((3, "float16", True), (0, "float64", True), (0, "float32", False)):
            tag = f"{layout} {dt} k={f'{kh}x{kh}' if kh else 'generic'} " \
                  f"{'staged' if staged else 'direct'}"
            yield ("depthwise", "forward", tag + " bias gelu",
                   D.forward_kernel(layout, kh, kh, dt, dt, "gelu", True, staged))
            yield ("depthwise", "grad_input", tag, D.grad_input_kernel(layout, kh, kh, dt, staged))
            yield ("depthwise", "grad_weight", tag,
                   D.grad_weight_kernel(layout, kh, kh, dt, staged))
        yield ("separable", "forward", f"{layout} float64 k=generic fused silu/gelu bias res",
               G.separable_kernel(layout, 0, 0, "float64", "silu", "gelu", True, True, True))
    yield ("pointwise", "forward", "float64 bias on m relu6 res",
           G.gemm_kernel("float64", "float64", "float64", "relu6", True, True, True))
    yield ("pointwise", "forward", "float16 -> float32 unfused NHWC bias on n gelu res",
           G.gemm_kernel("float32", "float16", "float16", "gelu", True, False, True))
    yield ("reduce", "grad_weight", "float32 -> float16", G.reduce_kernel("float32", "float16"))


def _ptxas_info(ptx: str, arch: str):
    """(registers, shared bytes, spill bytes) of a one-kernel PTX module assembled by nvJitLink."""
    from ._ptxas import assemble

    (props,) = assemble(ptx, arch).values()
    if props["registers"] is None:
        raise RuntimeError("no register count in the nvJitLink log")
    return props["registers"], props["shared_bytes"], props["spill_bytes"]


def _report_row(index: int, quick: bool, arch: str) -> dict:
    """Compile and assemble the ``index``-th kernel of :func:`_report_specs` (one report row)."""
    from numba import cuda

    op, direction, spec, k = list(_report_specs(quick))[index]
    row = {"backend": "numba", "op": op, "direction": direction, "specialization": spec,
           "registers": None, "shared_bytes": None, "spill_bytes": None, "error": None}
    digits = arch.removeprefix("sm_").rstrip("a")
    try:
        ptx, _ = cuda.compile_ptx(k.py_func, k.sig, cc=(int(digits[:-1]), int(digits[-1])))
        row["registers"], row["shared_bytes"], row["spill_bytes"] = _ptxas_info(ptx, arch)
    except Exception as exc:  # reported, not raised: the report lists every failure
        row["error"] = f"{type(exc).__name__}: {exc}"
    return row


def compile_report(arch: str = "sm_90", quick: bool = False, jobs: int | None = None) -> list[dict]:
    """Compile every kernel specialization (see :func:`_report_specs`) to PTX for ``arch`` with
    ``numba.cuda.compile_ptx`` (no GPU needed; not under the simulator) and assemble it with
    nvJitLink. One row per kernel: backend, op, direction, specialization, registers,
    shared_bytes (static; the tiles' dynamic shared memory is sized at launch, at most
    48 KiB), spill_bytes (stores + loads), error (None or the message). ``quick``: one kernel
    per code path instead of the whole representative set. ``jobs``: compiler processes
    (default: the CPU count, at most 8)."""
    import os

    from numba import config

    if config.ENABLE_CUDASIM:
        raise RuntimeError("compile_report needs the real CUDA target: unset NUMBA_ENABLE_CUDASIM")
    n = len(list(_report_specs(quick)))
    jobs = max(1, min(jobs or min(os.cpu_count() or 1, 8), n))
    if jobs == 1:
        return [_report_row(i, quick, arch) for i in range(n)]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_report_row, range(n), [quick] * n, [arch] * n))
