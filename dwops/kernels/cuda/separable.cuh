// Fused depthwise-separable forward. Requires common.cuh before it.
//
// Math (c2 < CI2 = C*M mid channel, o2 < CO2 output channel, p output pixel):
//   d[n,c2,p]  = dw_act( sum_{a,b} dw_w[c2,a,b] * x[n, c2/M, i*sh + a*dh - pt, j*sw + b*dw - pl] + dw_b[c2] )
//   y[n,o2,p]  = act( sum_{c2} pw_w[o2,c2] * d[n,c2,p] + bias[o2] ) + residual[n,o2,p]
// d is never written to device memory: a block owns a tile of TP <= 64 output pixels (TH x TW)
// of one image and keeps d for all CI2 channels of that tile in shared memory (accumulator type,
// no rounding in between, like the float64 reference).
//   phase 1: for chunks of CC mid channels, stage their input channels' tile plus halo
//            (IH x IW) in shared memory, then compute d (one (c2, p) pair per thread step);
//   phase 2: for blocks of 64 output channels, GEMM over c2 with 32-wide chunks of pw_w staged
//            transposed in shared memory; 256 threads x (4 x 4) outputs from registers,
//            interleaved so stores coalesce (NCHW along pixels, NHWC along channels); epilogue
//            bias + act + residual.
// The host uses this kernel when CI2 * 64 accumulators fit (cupy_plans.plan_separable) and otherwise
// runs dw_forward into a temporary, then pw_gemm.
//   grid (tiles_h * tiles_w, min(N, 65535)), block (256), dynamic shared memory
//   (CI2 * 64 + CINMAX * IH * IW + 32 * 65) accumulators, CINMAX = (CC - 1) / M + 2.

#define SEP_TP 64
#define SEP_KC 32
#define SEP_THREADS 256

template <typename T, int K, bool NHWC>
__global__ void __launch_bounds__(SEP_THREADS) sep_forward(
    const T* __restrict__ x,     // input: (N, C, H, W) or (N, H, W, C)
    const T* __restrict__ dw_w,  // depthwise weights (CI2, KH*KW)
    const T* __restrict__ dw_b,  // (CI2,) or nullptr
    int dw_act,                  // depthwise activation code
    const T* __restrict__ pw_w,  // pointwise weights (CO2, CI2)
    const T* __restrict__ bias,  // (CO2,) or nullptr
    const T* __restrict__ res,   // residual, shaped like y, or nullptr
    int act,                     // final activation code
    T* __restrict__ y,           // output: (N, CO2, OH, OW) or (N, OH, OW, CO2)
    int N, int C, int H, int W, int M, int OH, int OW,
    int KH, int KW, int sh, int sw, int dh, int dw, int pt, int pl,
    int CO2,                     // output channels
    int TH, int TW,              // pixel tile (TH * TW <= 64)
    int IH, int IW,              // input tile rows and columns
    int CC)                      // mid channels per phase-1 chunk
{
    typedef typename Acc<T>::type A;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const int CI2 = C * M;
    const int kh = K > 0 ? K : KH, kw = K > 0 ? K : KW;
    const int KK = kh * kw;
    const int CINMAX = (CC - 1) / M + 2;
    A* D = reinterpret_cast<A*>(smem_raw);            // [CI2][SEP_TP]
    A* xs = D + CI2 * SEP_TP;                         // [CINMAX][IH * IW]
    A* ws = xs + CINMAX * IH * IW;                    // [SEP_KC][SEP_TP + 1]
    const int tid = threadIdx.x;
    const int tiles_w = (OW + TW - 1) / TW;
    const int oy0 = (blockIdx.x / tiles_w) * TH, ox0 = (blockIdx.x % tiles_w) * TW;
    const int iy0 = oy0 * sh - pt, ix0 = ox0 * sw - pl;
    const int TP = TH * TW;
    const int tx = tid % 16, ty = tid / 16;
    const int IHW = IH * IW;

    for (int n = blockIdx.y; n < N; n += gridDim.y) {
        // ---- phase 1: the depthwise tile, all mid channels, into D
        for (int c2lo = 0; c2lo < CI2; c2lo += CC) {
            const int c2hi = min(CI2, c2lo + CC);
            const int cin_lo = c2lo / M, cin_n = (c2hi - 1) / M - cin_lo + 1;
            __syncthreads();
            for (int idx = tid; idx < cin_n * IHW; idx += SEP_THREADS) {
                int cc, pix;
                if (NHWC) { cc = idx % cin_n; pix = idx / cin_n; } else { pix = idx % IHW; cc = idx / IHW; }
                const int r = pix / IW, c = pix - r * IW;
                const int gy = iy0 + r, gx = ix0 + c, ci = cin_lo + cc;
                A v = 0;
                if (gy >= 0 && gy < H && gx >= 0 && gx < W) {
                    const i64 off = NHWC ? (((i64)n * H + gy) * W + gx) * C + ci
                                         : (((i64)n * C + ci) * H + gy) * W + gx;
                    v = to_acc(x[off]);
                }
                xs[cc * IHW + pix] = v;
            }
            __syncthreads();
#pragma unroll 1
            for (int idx = tid; idx < (c2hi - c2lo) * SEP_TP; idx += SEP_THREADS) {
                const int c2 = c2lo + idx / SEP_TP, p = idx % SEP_TP;
                A s = 0;
                if (p < TP) {
                    const int py = p / TW, px = p - py * TW;
                    const A* xc = xs + (c2 / M - cin_lo) * IHW;
                    const T* wr = dw_w + (i64)c2 * KK;
                    for (int a = 0; a < kh; ++a)      // fully unrolled when K > 0
                        for (int b = 0; b < kw; ++b)
                            s += to_acc(wr[a * kw + b]) * xc[(py * sh + a * dh) * IW + px * sw + b * dw];
                    if (dw_b != nullptr) s += to_acc(dw_b[c2]);
                    s = activate(s, dw_act);
                }
                D[c2 * SEP_TP + p] = s;
            }
        }
        // ---- phase 2: y tile = pw_w . D with the epilogue
        for (int o2lo = 0; o2lo < CO2; o2lo += 64) {
            A acc[4][4];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = 0;
            for (int k0 = 0; k0 < CI2; k0 += SEP_KC) {
                __syncthreads();
                for (int idx = tid; idx < SEP_KC * 64; idx += SEP_THREADS) {
                    const int kk = idx % SEP_KC, oo = idx / SEP_KC;
                    const int o2 = o2lo + oo, c2 = k0 + kk;
                    ws[kk * (SEP_TP + 1) + oo] = (o2 < CO2 && c2 < CI2) ? to_acc(pw_w[(i64)o2 * CI2 + c2]) : A(0);
                }
                __syncthreads();
                const int kn = min(SEP_KC, CI2 - k0);
#pragma unroll 2
                for (int kk = 0; kk < kn; ++kk) {
                    A wv[4], dv[4];
#pragma unroll
                    for (int i = 0; i < 4; ++i) wv[i] = ws[kk * (SEP_TP + 1) + (NHWC ? tx : ty) + 16 * i];
#pragma unroll
                    for (int j = 0; j < 4; ++j) dv[j] = D[(k0 + kk) * SEP_TP + (NHWC ? ty : tx) + 16 * j];
#pragma unroll
                    for (int i = 0; i < 4; ++i)
#pragma unroll
                        for (int j = 0; j < 4; ++j) acc[i][j] += wv[i] * dv[j];
                }
            }
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int p = (NHWC ? ty : tx) + 16 * j;
                const int oy = oy0 + p / TW, ox = ox0 + p % TW;
                if (p >= TP || oy >= OH || ox >= OW) continue;
                const i64 pix = NHWC ? (((i64)n * OH + oy) * OW + ox) * CO2 : ((i64)n * CO2 * OH + oy) * OW + ox;
                const i64 ostride = NHWC ? 1 : (i64)OH * OW;   // distance between output channels
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int o2 = o2lo + (NHWC ? tx : ty) + 16 * i;
                    if (o2 >= CO2) continue;
                    const i64 off = pix + o2 * ostride;
                    A v = activate(acc[i][j] + (bias != nullptr ? to_acc(bias[o2]) : A(0)), act);
                    if (res != nullptr) v += to_acc(res[off]);
                    y[off] = from_acc<T>(v);
                }
            }
        }
    }
}
