// Pointwise (1x1) convolution as a tiled GEMM, forward with fused epilogue and both gradients.
// Requires common.cuh before it.
//
// Math (o output channel, c input channel, p pixel = (h, w)):
//   forward      y[n,o,p] = act( sum_c W[o,c] x[n,c,p] + bias[o] ) + residual[n,o,p]
//   grad_input   gx[n,c,p] = sum_o W[o,c] gy[n,o,p]
//   grad_weight  gW[o,c]   = sum_{n,p} gy[n,o,p] x[n,c,p]
// each written as C[m, j] = sum_k A[m, k] B[k, j] over a batch:
//   op / layout          A (M x K)          B (K x N)            C (M x N)       batch
//   forward NCHW         W       (k contig)  x_n   (n contig)     y_n (CO x HW)   n
//   forward NHWC         x       (k contig)  W^T   (k contig)     y (NHW x CO)    1
//   grad_input NCHW      W^T     (m contig)  gy_n  (n contig)     gx_n            n
//   grad_input NHWC      gy      (k contig)  W     (n contig)     gx              1
//   grad_weight NCHW     gy_n    (k contig)  x_n^T (k contig)     gW, summed over n
//   grad_weight NHWC     gy^T    (m contig)  x     (n contig)     gW
// "k contig" means the element (m, k) is at A[m * lda + k]; "m contig" at A[k * lda + m]
// (likewise for B with n). C always has j contiguous: C[m * ldc + j].
//
// Launch: grid (ceil(Mdim / 64) * ceil(Ndim / 64), 1, min(batches, 65535) or splits), block (256).
// Tiling: a block computes a BM x BN = 64 x 64 tile of C with 256 threads, each 4 x 4 outputs
// from registers, interleaved (rows ty + 16*i, columns tx + 16*j) so shared reads are conflict
// free and stores coalesced along j. A and B tiles (64 x BK) are staged in shared memory in the
// accumulator type, loaded with the contiguous index fastest (coalesced).
// Element types: T for C, bias, residual and the accumulator (Acc<T>::type); TA and TB for the
// operands, T or float (the unfused 16-bit separable forward multiplies its float32 depthwise
// result: each element is converted as its tile is staged, the output rounded once to T).
// PARTIAL (grad_weight): blockIdx.z = split s of the reduction range (batches x k chunks); the
// block writes its raw sums to partial[s][m][j]; sum_splits (common.cuh) adds the splits and
// rounds once.

#define PW_BM 64
#define PW_BN 64
#define PW_BK 16
#define PW_THREADS 256   // 2 blocks per SM (<= 128 registers) except for double

template <typename T, typename TA, typename TB, bool A_KC, bool B_NC, bool PARTIAL>
__global__ void __launch_bounds__(PW_THREADS, sizeof(T) == 8 ? 1 : 2) pw_gemm(
    const TA* __restrict__ A_,   // A matrix of batch 0 (layout per A_KC)
    const TB* __restrict__ B_,   // B matrix of batch 0 (layout per B_NC)
    T* __restrict__ C_,          // C matrix of batch 0, (Mdim, Ndim) with row stride ldc (unless PARTIAL)
    typename Acc<T>::type* __restrict__ partial,  // PARTIAL: (splits, Mdim, Ndim); else unused
    const T* __restrict__ bias,  // bias (length Mdim if bias_on_n == 0 else Ndim) or nullptr
    int bias_on_n,               // 1: bias indexed by the column j (NHWC forward), 0: by the row m
    const T* __restrict__ res,   // residual laid out like C, or nullptr
    int act,                     // activation code
    int Mdim, int Ndim, int Kdim,  // GEMM sizes
    i64 lda, i64 ldb, i64 ldc,   // leading strides (elements) of A, B, C
    i64 sA, i64 sB, i64 sC,      // batch strides (elements)
    int batches,                 // number of batches
    int batch_per_split,         // PARTIAL: batches per split (consecutive)
    int k_splits)                // PARTIAL: splits of the k range per batch group
{
    typedef typename Acc<T>::type Ac;
    __shared__ Ac As[PW_BK][PW_BM + 1];
    __shared__ Ac Bs[PW_BK][PW_BN + 1];
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16, tid = threadIdx.x;
    const int tiles_n = (Ndim + PW_BN - 1) / PW_BN;   // blockIdx.x = m tile * tiles_n + n tile
    const int m0 = (blockIdx.x / tiles_n) * PW_BM, j0 = (blockIdx.x % tiles_n) * PW_BN;

    int b_lo, b_hi, k_lo, k_hi;
    if (PARTIAL) {
        const int group = blockIdx.z / k_splits, ks = blockIdx.z - group * k_splits;
        b_lo = group * batch_per_split;
        b_hi = min(batches, b_lo + batch_per_split);
        const int chunk = ((Kdim + k_splits - 1) / k_splits + PW_BK - 1) / PW_BK * PW_BK;
        k_lo = ks * chunk;
        k_hi = min(Kdim, k_lo + chunk);
    } else {
        b_lo = blockIdx.z; b_hi = batches; k_lo = 0; k_hi = Kdim;
    }
    Ac acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0;

    for (int bt = b_lo; bt < b_hi; bt += (PARTIAL ? 1 : gridDim.z)) {
        const TA* Ab = A_ + (i64)bt * sA;
        const TB* Bb = B_ + (i64)bt * sB;
        if (!PARTIAL) {
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = 0;
        }
        for (int k0 = k_lo; k0 < k_hi; k0 += PW_BK) {
            __syncthreads();
            // A tile: 64 x 16 elements, 4 per thread.
#pragma unroll
            for (int e = 0; e < (PW_BM * PW_BK) / PW_THREADS; ++e) {
                const int idx = tid + e * PW_THREADS;
                int mm, kk;
                if (A_KC) { kk = idx % PW_BK; mm = idx / PW_BK; } else { mm = idx % PW_BM; kk = idx / PW_BM; }
                const int gm = m0 + mm, gk = k0 + kk;
                Ac v = 0;
                if (gm < Mdim && gk < k_hi) v = to_acc(A_KC ? Ab[(i64)gm * lda + gk] : Ab[(i64)gk * lda + gm]);
                As[kk][mm] = v;
            }
#pragma unroll
            for (int e = 0; e < (PW_BN * PW_BK) / PW_THREADS; ++e) {
                const int idx = tid + e * PW_THREADS;
                int nn, kk;
                if (B_NC) { nn = idx % PW_BN; kk = idx / PW_BN; } else { kk = idx % PW_BK; nn = idx / PW_BK; }
                const int gn = j0 + nn, gk = k0 + kk;
                Ac v = 0;
                if (gn < Ndim && gk < k_hi) v = to_acc(B_NC ? Bb[(i64)gk * ldb + gn] : Bb[(i64)gn * ldb + gk]);
                Bs[kk][nn] = v;
            }
            __syncthreads();
#pragma unroll
            for (int kk = 0; kk < PW_BK; ++kk) {
                Ac av[4], bv[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) av[i] = As[kk][ty + 16 * i];
#pragma unroll
                for (int j = 0; j < 4; ++j) bv[j] = Bs[kk][tx + 16 * j];
#pragma unroll
                for (int i = 0; i < 4; ++i)
#pragma unroll
                    for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
            }
        }
        if (!PARTIAL) {
            T* Cb = C_ + (i64)bt * sC;
            const T* Rb = res != nullptr ? res + (i64)bt * sC : nullptr;
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int gm = m0 + ty + 16 * i;
                if (gm >= Mdim) continue;
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int gn = j0 + tx + 16 * j;
                    if (gn >= Ndim) continue;
                    Ac v = acc[i][j];
                    if (bias != nullptr) v += to_acc(bias[bias_on_n ? gn : gm]);
                    v = activate(v, act);
                    const i64 off = (i64)gm * ldc + gn;
                    if (Rb != nullptr) v += to_acc(Rb[off]);
                    Cb[off] = from_acc<T>(v);
                }
            }
        }
    }
    if (PARTIAL) {
        Ac* P = partial + (i64)blockIdx.z * Mdim * Ndim;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int gm = m0 + ty + 16 * i;
            if (gm >= Mdim) continue;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int gn = j0 + tx + 16 * j;
                if (gn < Ndim) P[(i64)gm * Ndim + gn] = acc[i][j];
            }
        }
    }
}
