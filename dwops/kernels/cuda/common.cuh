// dwops CUDA C++ kernels: pieces shared by every kernel file.
//
// Prepended (as text, after the generated ACT_* enum) to each kernel file by
// dwops/kernels/cupy_compile.py (source), so each compiled module is one self-contained source and CuPy's
// binary cache is keyed on everything that went into it.
//
// * Acc<T>::type: the accumulator. float for __half, __nv_bfloat16 and float; double for double.
//   16-bit inputs are converted to float on load and rounded once on the final store.
// * Pack<T, N>: N elements of T as one aligned unit, so a 16-byte Pack is one 128-bit access.
// * activate(v, act): the epilogue activations, NaN/Inf behaviour identical to dwops.reference
//   (relu(x) = x > 0 ? x : 0 * x, so NaN and -Inf give NaN, as np.where(y > 0, y, 0 * y) does).
// * i64: every global offset is computed in 64 bits (tensors may exceed 2**31 elements).
// * cp_async<BYTES>(dst, src, valid), cp_async_commit(), cp_async_wait<N>(): asynchronous
//   global -> shared copies (sm_80+ cp.async, LDGSTS). A copy of BYTES (4, 8 or 16) bytes lands in
//   shared memory only once the issuing thread has waited for its group (wait_group N: all but the
//   N most recently committed groups are complete); valid == false is the zero-fill form (src-size
//   0: nothing is read, BYTES zeros are written). Other threads see the data after a barrier that
//   follows the wait. A host emulation of these kernels defines DWOPS_HOST_CP_ASYNC and provides
//   the three helpers with the same semantics.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

typedef long long i64;

#ifndef DWOPS_HOST_CP_ASYNC
template <int BYTES>
__device__ __forceinline__ void cp_async(void* dst, const void* src, bool valid) {
    static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async copies 4, 8 or 16 bytes");
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    const int n = valid ? BYTES : 0;
    if constexpr (BYTES == 16) {
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(n));
    } else {
        asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(s), "l"(src),
                     "n"(BYTES), "r"(n));
    }
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
#endif

template <typename T> struct Acc { typedef float type; };
template <> struct Acc<double> { typedef double type; };

__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type v);
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }

template <typename T> __device__ __forceinline__ T zero_value() { return from_acc<T>(0); }

template <typename T, int N> struct __align__(sizeof(T) * N) Pack { T v[N]; };

// Activations by their codes ACT_* (an enum generated from the Python table and placed before this
// file). silu, gelu (exp, erf), hardswish and hardsigmoid live in one out-of-line function so the
// unrolled epilogues stay small (the epilogue runs once per output; the call costs nothing next to
// the memory traffic). Inlined, the two hard activations pushed the float 7x7 NCHW depthwise
// forward past its 128-register bound (an 8-byte spill).
template <typename A> __device__ __noinline__ A activate_out_of_line(A v, int act) {
    if (act == ACT_HARDSWISH || act == ACT_HARDSIGMOID) {
        // relu6(v + 3) by selects that keep NaN; hardswish(-inf) = -inf * 0 = NaN as in PyTorch
        A r = v + A(3);
        r = r < A(0) ? A(0) : r;
        r = r > A(6) ? A(6) : r;
        return (act == ACT_HARDSWISH ? v * r : r) / A(6);
    }
    if (act == ACT_SILU) return v / (A(1) + exp(-v));
    return A(0.5) * v * (A(1) + erf(v * A(0.70710678118654752440)));  // ACT_GELU
}

template <typename A> __device__ __forceinline__ A activate(A v, int act) {
    const A zero = 0;
    if (act == ACT_NONE) return v;
    if (act == ACT_RELU) return v > zero ? v : zero * v;
    if (act == ACT_RELU6) return (v > A(6) ? A(6) : (v > zero ? v : zero * v)) + zero * v;
    return activate_out_of_line(v, act);
}

// floor(a / b) and ceil(a / b) for b > 0 and a of any sign (C++ division truncates toward zero).
__device__ __forceinline__ int floor_div(int a, int b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
__device__ __forceinline__ int ceil_div(int a, int b) { return -floor_div(-a, b); }

// Sum over a warp (all 32 lanes active).
template <typename A> __device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(0xffffffffu, v, d);
    return v;
}

// Second stage of the two-stage reductions (weight gradients): out[i] = sum over the splits of
// partial[s * count + i], added in split order (deterministic) and rounded once to T.
//   grid (ceil(count / 256)), block (256)
template <typename T>
__global__ void sum_splits(
    const typename Acc<T>::type* __restrict__ partial,  // (splits, count)
    T* __restrict__ out,                                 // (count,)
    int splits, int count)
{
    typedef typename Acc<T>::type A;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= count) return;
    A s = 0;
    for (int j = 0; j < splits; ++j) s += partial[(i64)j * count + i];
    out[i] = from_acc<T>(s);
}
