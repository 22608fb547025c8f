// Depthwise convolution kernels: forward (also the stride-1 input gradient), strided input
// gradient, weight gradient (two stages). Requires common.cuh before it.
//
// Math (cross-correlation; n batch, o output channel, (i, j) output pixel, (a, b) kernel tap):
//
//   forward      y[n,o,i,j] = act( sum_{m<R} sum_{a,b} w[o*R+m, a', b'] *
//                                  x[n, (o/M)*R + m, i*sh + a*dh - pt, j*sw + b*dw - pl] + bias[o] )
//                with (a', b') = (a, b), or (KH-1-a, KW-1-b) when `flip`. The user's forward is
//                M = multiplier, R = 1, flip = 0.
//   grad_input   gx[n,c,p,q] = sum_{m<M} sum_{a,b} w[c*M+m,a,b] * gy[n, c*M+m, (p+pt-a*dh)/sh, (q+pl-b*dw)/sw]
//                over the taps where both divisions are exact and in range. For stride 1 this is
//                the forward kernel run on gy with M' = 1, R = M, flip = 1 and padding
//                ((KH-1)*dh - pt, (KW-1)*dw - pl) (which may be negative); for stride > 1 the
//                polyphase kernel dw_grad_input below (per phase, only the taps that reach it).
//   grad_weight  gw[o,a,b] = sum_{n,i,j} gy[n,o,i,j] * x[n, o/M, i*sh + a*dh - pt, j*sw + b*dw - pl]:
//                stage 1 (dw_grad_weight_direct for NCHW 1x1 and 3x3, dw_grad_weight for the
//                other compile-time sizes, dw_grad_weight_taps for any size) writes one partial sum per block split, stage 2
//                (sum_splits, common.cuh) adds the splits. No atomics: the result is
//                deterministic.
//
// Tiling: a block owns an output tile and first stages the input tile plus halo in shared memory
// (zero-filled outside the image, so padding needs no branches in the inner loop), 16-byte
// vectors where the host found the rows aligned (VEC elements: NCHW along W, NHWC along C).
// Template parameters:
//   T    element type (__half, __nv_bfloat16, float, double); accumulation in Acc<T>::type
//   TO   dw_forward's output element type: T, or float for 16-bit T (the unfused separable
//        forward keeps its depthwise result in float32, rounded once after the pointwise step)
//   K    kernel side for square KxK kernels known at compile time (1, 3, 5, 7), 0 = runtime KHxKW
//   S    1: stride 1 and dilation 1 known at compile time (register sliding window); 2: stride 2,
//        dilation 1, NCHW, VEC > 1 with OW % VEC == 0 (K = 3, 5, 7; phase-split tile,
//        load_tile_nchw_split); 0: runtime (other strides, dilations and unvectorized stride-2
//        rows take K = 0; NHWC launches S = 2 never)
//   VEC  elements per vector access (16 bytes / sizeof(T), or smaller when rows are misaligned)
//   OPT  outputs per thread along the second spatial axis (NCHW: rows; NHWC: columns)
//   NHWC layout of x and y
// dw_forward and dw_grad_weight ask for two 256-thread blocks per SM (<= 128 registers; ptxas
// reports no spills) except in double precision, where 7x7 accumulators need more registers.

// ------------------------------------------------------------------------------ tile loaders

// Shared tile s[r * IP + c] = xp[(iy0 + r) * W + ix0 + c] for r < IH, c < IW; 0 outside the image.
// IP >= IW is the row pitch (padded so that the rows one shared request reads fall in distinct
// banks; columns IW .. IP - 1 are not written). xp is one (H, W) plane. VEC > 1 requires
// W % VEC == 0 and xp aligned to VEC elements: every aligned global vector is then wholly inside
// or wholly outside a row. The tile row's alignment differs from the global vectors' (the halo),
// so the copies go through registers, not cp.async. (Four loads in flight per thread before
// their shared stores cost the weight-gradient kernels about 12 registers and one resident block
// per SM, which the model priced higher than the loads' overlap: dropped.)
template <typename T, int VEC>
__device__ __forceinline__ void load_tile_nchw(T* __restrict__ s, const T* __restrict__ xp, int H,
                                               int W, int iy0, int ix0, int IH, int IW, int IP,
                                               int tid, int nthr) {
    if (VEC == 1) {
        for (int idx = tid; idx < IH * IW; idx += nthr) {
            const int r = idx / IW, c = idx - r * IW;
            const int gy = iy0 + r, gx = ix0 + c;
            s[r * IP + c] = (gy >= 0 && gy < H && gx >= 0 && gx < W) ? xp[(i64)gy * W + gx] : zero_value<T>();
        }
        return;
    }
    const int gv0 = floor_div(ix0, VEC);                     // first aligned global vector
    const int nv = floor_div(ix0 + IW - 1, VEC) - gv0 + 1;   // vectors per tile row
    for (int idx = tid; idx < IH * nv; idx += nthr) {
        const int r = idx / nv;
        const int gx = (gv0 + idx - r * nv) * VEC;
        const int gy = iy0 + r;
        Pack<T, VEC> p;
        if (gy >= 0 && gy < H && gx >= 0 && gx < W) {
            p = *reinterpret_cast<const Pack<T, VEC>*>(xp + (i64)gy * W + gx);
        } else {
#pragma unroll
            for (int e = 0; e < VEC; ++e) p.v[e] = zero_value<T>();
        }
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
            const int c = gx + e - ix0;
            if (c >= 0 && c < IW) s[r * IP + c] = p.v[e];
        }
    }
}

// The same tile staged phase-split for the stride-2 forward: tile column c of row r goes to
// s[r * IP + (c % 2) * HP + c / 2] (even columns, then the odd ones from the half pitch HP), so
// lanes that read input columns 2 * VEC apart read consecutive vectors of each half. Columns
// past IW of either half are not written. VEC as load_tile_nchw.
template <typename T, int VEC>
__device__ __forceinline__ void load_tile_nchw_split(T* __restrict__ s, const T* __restrict__ xp,
                                                     int H, int W, int iy0, int ix0, int IH, int IW,
                                                     int IP, int HP, int tid, int nthr) {
    // Every lane loads (outside the image from the clamped, in-image address, then zero), so a
    // warp's load is one request over consecutive addresses rather than a divergent one.
    const int gv0 = floor_div(ix0, VEC);
    const int nv = floor_div(ix0 + IW - 1, VEC) - gv0 + 1;   // vectors per tile row
    for (int idx = tid; idx < IH * nv; idx += nthr) {
        const int r = idx / nv;
        const int gx = (gv0 + idx - r * nv) * VEC;
        const int gy = iy0 + r;
        const bool inside = gy >= 0 && gy < H && gx >= 0 && gx < W;
        const int cy = min(max(gy, 0), H - 1), cx = min(max(gx, 0), W - VEC);
        Pack<T, VEC> p = *reinterpret_cast<const Pack<T, VEC>*>(xp + (i64)cy * W + cx);
        if (!inside) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) p.v[e] = zero_value<T>();
        }
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
            const int c = gx + e - ix0;
            if (c >= 0 && c < IW) s[r * IP + (c & 1) * HP + (c >> 1)] = p.v[e];
        }
    }
}

// Shared tile s[(r * IW + c) * PITCH + k] = x[n, iy0 + r, ix0 + c, ci0 + k] for k < CP; 0 outside
// the image or past channel CI. PITCH >= CP is the pixel pitch (padded so that the pixels one
// shared request reads fall in distinct banks; elements CP .. PITCH - 1 are not written).
// VEC > 1 requires CI % VEC == 0, CP % VEC == 0, PITCH % VEC == 0, ci0 % VEC == 0. Vectors of 4,
// 8 or 16 bytes are copied with cp.async (LDGSTS; the zero-filling form outside the image), every
// copy of the thread in flight at once, waited for before returning (the caller's barrier then
// publishes the tile); 2-byte elements go through registers.
template <typename T, int VEC>
__device__ __forceinline__ void load_tile_nhwc(T* __restrict__ s, const T* __restrict__ xn, int H,
                                               int W, int CI, int iy0, int ix0, int ci0, int IH,
                                               int IW, int CP, int PITCH, int tid, int nthr) {
    const int cv = CP / VEC;  // vectors per pixel
    const int total = IH * IW * cv;
    constexpr int BYTES = (int)sizeof(T) * VEC;
    if constexpr (BYTES == 4 || BYTES == 8 || BYTES == 16) {
        for (int idx = tid; idx < total; idx += nthr) {
            const int pix = idx / cv, k = (idx - pix * cv) * VEC;
            const int r = pix / IW, c = pix - r * IW;
            const int gy = iy0 + r, gx = ix0 + c, ch = ci0 + k;
            const bool valid = gy >= 0 && gy < H && gx >= 0 && gx < W && ch < CI;
            cp_async<BYTES>(s + (i64)pix * PITCH + k,
                            valid ? xn + ((i64)gy * W + gx) * CI + ch : xn, valid);
        }
        cp_async_commit();
        cp_async_wait<0>();
    } else {
        for (int idx = tid; idx < total; idx += nthr) {
            const int pix = idx / cv, k = (idx - pix * cv) * VEC;
            const int r = pix / IW, c = pix - r * IW;
            const int gy = iy0 + r, gx = ix0 + c, ch = ci0 + k;
            Pack<T, VEC> p;
            if (gy >= 0 && gy < H && gx >= 0 && gx < W && ch < CI) {
                p = *reinterpret_cast<const Pack<T, VEC>*>(xn + ((i64)gy * W + gx) * CI + ch);
            } else {
#pragma unroll
                for (int e = 0; e < VEC; ++e) p.v[e] = zero_value<T>();
            }
            *reinterpret_cast<Pack<T, VEC>*>(s + (i64)pix * PITCH + k) = p;
        }
    }
}

// ------------------------------------------------------------------------------ forward

// One block: an output tile TH x TW of one (n, o) plane (NCHW) or of TC = blockDim.x * VEC
// channels of one image (NHWC). Launch (cupy_plans.plan_dw_forward):
//   NCHW  grid (tiles_h * tiles_w, min(N * CO, 65535)), block (BW, BH), TW = BW * VEC, TH = BH * OPT
//   NHWC  grid (tiles_h * tiles_w, ceil(CO / TC), min(N, 65535)), block (CT, PT),
//         TW = (PT / TH) * OPT
//   dynamic shared memory: IH * IP elements of T (NCHW) or IH * IW * IP (NHWC).
//   NCHW, S = 2: CP is the half pitch of the phase-split tile (odd columns from CP on).
template <typename T, typename TO, int K, int S, int VEC, int OPT, bool NHWC>
__global__ void __launch_bounds__(256, sizeof(T) == 8 ? 1 : 2) dw_forward(
    const T* __restrict__ x,     // input: (N, CI, H, W) or (N, H, W, CI)
    const T* __restrict__ w,     // NCHW: (CO*R, KH*KW); NHWC: transposed, (KH*KW, CO*R)
    const T* __restrict__ bias,  // (CO,) or nullptr
    TO* __restrict__ y,          // output: (N, CO, OH, OW) or (N, OH, OW, CO)
    int N, int CI, int H, int W,  // input sizes (CI = input channels)
    int CO, int OH, int OW,       // output channels and size
    int KH, int KW,               // kernel size (equal to K when K > 0)
    int sh, int sw, int dh, int dw,  // stride and dilation (1 when S == 1; 2 and 1 when S == 2)
    int pt, int pl,               // padding before (top, left); may be negative (grad_input)
    int M, int R,                 // output channel o reads input channels (o/M)*R + m, m < R
    int flip,                     // 1: taps rotated by 180 degrees (stride-1 grad_input)
    int act,                      // activation code (common.cuh)
    int TH, int TW,               // output tile rows and columns per block
    int IH, int IW, int IP,       // shared tile rows, columns, and pitch (NCHW: elements per
                                  // row; NHWC: elements per pixel)
    int CP)                       // NHWC: channels per pixel in the tile (<= IP); NCHW, S = 2:
                                  // half pitch of the phase-split tile; else unused
{
    typedef typename Acc<T>::type A;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* tile = reinterpret_cast<T*>(smem_raw);
    const int kh = K > 0 ? K : KH, kw = K > 0 ? K : KW;
    const int KK = kh * kw;
    const int tiles_w = (OW + TW - 1) / TW;
    const int oy0 = (blockIdx.x / tiles_w) * TH, ox0 = (blockIdx.x % tiles_w) * TW;
    const int iy0 = oy0 * sh - pt, ix0 = ox0 * sw - pl;
    const int tid = threadIdx.y * blockDim.x + threadIdx.x, nthr = blockDim.x * blockDim.y;
    const int tx = threadIdx.x, ty = threadIdx.y;

    if constexpr (!NHWC) {
        const int BW = blockDim.x;
        for (i64 plane = blockIdx.y; plane < (i64)N * CO; plane += gridDim.y) {
            const int o = (int)(plane % CO);
            const i64 n = plane / CO;
            A acc[OPT][VEC];
#pragma unroll
            for (int r = 0; r < OPT; ++r)
#pragma unroll
                for (int c = 0; c < VEC; ++c) acc[r][c] = 0;
            for (int m = 0; m < R; ++m) {
                const int ci = (o / M) * R + m;
                const T* wr = w + (i64)(o * R + m) * KK;
                __syncthreads();  // the previous plane's reads of `tile` are done
                if constexpr (K > 0 && S == 2)
                    load_tile_nchw_split<T, VEC>(tile, x + (n * CI + ci) * (i64)H * W, H, W, iy0,
                                                 ix0, IH, IW, IP, CP, tid, nthr);
                else
                    load_tile_nchw<T, VEC>(tile, x + (n * CI + ci) * (i64)H * W, H, W, iy0, ix0, IH,
                                           (K > 0 && S == 1) ? IW : IP, IP, tid, nthr);  // pitch padded only on the sliding-window path
                __syncthreads();
                if constexpr (K > 0 && S == 1) {
                    // Register sliding window: thread outputs rows ty*OPT + r, columns tx*VEC + c.
                    constexpr int WIN = VEC + K - 1;
                    constexpr int NWV = (WIN + VEC - 1) / VEC;
                    A wk[K][K];
#pragma unroll
                    for (int a = 0; a < K; ++a)
#pragma unroll
                        for (int b = 0; b < K; ++b)
                            wk[a][b] = to_acc(wr[flip ? (K - 1 - a) * K + (K - 1 - b) : a * K + b]);
#pragma unroll
                    for (int i = 0; i < OPT + K - 1; ++i) {
                        const T* srow = tile + (ty * OPT + i) * IP + tx * VEC;
                        A win[NWV * VEC];
#pragma unroll
                        for (int v = 0; v < NWV; ++v) {
                            const Pack<T, VEC> p = *reinterpret_cast<const Pack<T, VEC>*>(srow + v * VEC);
#pragma unroll
                            for (int e = 0; e < VEC; ++e) win[v * VEC + e] = to_acc(p.v[e]);
                        }
#pragma unroll
                        for (int r = 0; r < OPT; ++r) {
                            const int a = i - r;
                            if (a >= 0 && a < K) {
#pragma unroll
                                for (int b = 0; b < K; ++b)
#pragma unroll
                                    for (int c = 0; c < VEC; ++c) acc[r][c] += wk[a][b] * win[c + b];
                            }
                        }
                    }
                } else if constexpr (K > 0 && S == 2) {
                    // Stride 2 on the phase-split tile (CP = half pitch): thread outputs rows
                    // ty*OPT + r, columns tx*VEC + c; tap (a, b) reads tile row (ty*OPT + r)*2 + a
                    // and half b % 2 at tx*VEC + c + b / 2. Each tile row i feeds the outputs
                    // r with 0 <= i - 2r < K.
                    constexpr int HE = (K + 1) / 2, HO = K / 2;  // even and odd taps per row
                    constexpr int NWE = (VEC + HE - 1 + VEC - 1) / VEC;
                    constexpr int NWO = (VEC + HO - 1 + VEC - 1) / VEC;
                    A wk[K][K];
#pragma unroll
                    for (int a = 0; a < K; ++a)
#pragma unroll
                        for (int b = 0; b < K; ++b)
                            wk[a][b] = to_acc(wr[flip ? (K - 1 - a) * K + (K - 1 - b) : a * K + b]);
#pragma unroll
                    for (int i = 0; i < 2 * (OPT - 1) + K; ++i) {
                        const T* srow = tile + (ty * OPT * 2 + i) * IP + tx * VEC;
                        A ev[NWE * VEC], od[NWO * VEC];
#pragma unroll
                        for (int v = 0; v < NWE; ++v) {
                            const Pack<T, VEC> p = *reinterpret_cast<const Pack<T, VEC>*>(srow + v * VEC);
#pragma unroll
                            for (int e = 0; e < VEC; ++e) ev[v * VEC + e] = to_acc(p.v[e]);
                        }
#pragma unroll
                        for (int v = 0; v < NWO; ++v) {
                            const Pack<T, VEC> p = *reinterpret_cast<const Pack<T, VEC>*>(srow + CP + v * VEC);
#pragma unroll
                            for (int e = 0; e < VEC; ++e) od[v * VEC + e] = to_acc(p.v[e]);
                        }
#pragma unroll
                        for (int r = 0; r < OPT; ++r) {
                            const int a = i - 2 * r;
                            if (a >= 0 && a < K) {
#pragma unroll
                                for (int b = 0; b < K; ++b)
#pragma unroll
                                    for (int c = 0; c < VEC; ++c)
                                        acc[r][c] += wk[a][b] * ((b & 1) ? od[c + b / 2] : ev[c + b / 2]);
                            }
                        }
                    }
                } else {
                    // Runtime stride/dilation or kernel size: columns interleaved tx + c*BW, so a
                    // warp reads consecutive shared words for each tap.
                    for (int a = 0; a < kh; ++a) {
                        for (int b = 0; b < kw; ++b) {
                            const int t = flip ? (kh - 1 - a) * kw + (kw - 1 - b) : a * kw + b;
                            const A wv = to_acc(wr[t]);
#pragma unroll
                            for (int r = 0; r < OPT; ++r)
#pragma unroll
                                for (int c = 0; c < VEC; ++c)
                                    acc[r][c] += wv * to_acc(tile[((ty * OPT + r) * sh + a * dh) * IP +
                                                                  (tx + c * BW) * sw + b * dw]);
                        }
                    }
                }
            }
            const A bv = bias != nullptr ? to_acc(bias[o]) : A(0);
            TO* yp = y + plane * (i64)OH * OW;
#pragma unroll
            for (int r = 0; r < OPT; ++r) {
                const int oy = oy0 + ty * OPT + r;
                if (oy >= OH) continue;
                if constexpr (K > 0 && S > 0 && VEC > 1) {
                    const int ox = ox0 + tx * VEC;
                    if (OW % VEC == 0) {
                        if (ox < OW) {
                            Pack<TO, VEC> p;
#pragma unroll
                            for (int c = 0; c < VEC; ++c) p.v[c] = from_acc<TO>(activate(acc[r][c] + bv, act));
                            *reinterpret_cast<Pack<TO, VEC>*>(yp + (i64)oy * OW + ox) = p;
                        }
                    } else {
#pragma unroll
                        for (int c = 0; c < VEC; ++c)
                            if (ox + c < OW) yp[(i64)oy * OW + ox + c] = from_acc<TO>(activate(acc[r][c] + bv, act));
                    }
                } else {
#pragma unroll
                    for (int c = 0; c < VEC; ++c) {
                        const int ox = ox0 + ((K > 0 && S > 0) ? tx * VEC + c : tx + c * BW);
                        if (ox < OW) yp[(i64)oy * OW + ox] = from_acc<TO>(activate(acc[r][c] + bv, act));
                    }
                }
            }
        }
    } else {
        // NHWC: lanes tx own channels o0 + tx*VEC + v; pixel thread ty owns output row py and
        // columns px*OPT + c of the tile.
        const int TC = blockDim.x * VEC;
        const int o0 = blockIdx.y * TC;
        const int o = o0 + tx * VEC;
        const bool active = o < CO;
        const int twt = TW / OPT;
        const int py = ty / twt, px = ty - py * twt;
        const int ci0 = (o0 / M) * R;                                  // first channel in the tile
        const int cl0 = active ? (o / M) * R - ci0 : 0;               // this lane's tile channel (m = 0)
        const int COR = CO * R;
        for (int n = blockIdx.z; n < N; n += gridDim.z) {
            A acc[OPT][VEC];
#pragma unroll
            for (int c = 0; c < OPT; ++c)
#pragma unroll
                for (int v = 0; v < VEC; ++v) acc[c][v] = 0;
            __syncthreads();
            load_tile_nhwc<T, VEC>(tile, x + (i64)n * H * W * CI, H, W, CI, iy0, ix0, ci0, IH, IW,
                                   CP, IP, tid, nthr);
            __syncthreads();
            if (active && py < TH) {
                for (int m = 0; m < R; ++m) {
                    const int cl = cl0 + m;
                    if constexpr (K > 0 && S == 1) {
                        constexpr int WIN = OPT + K - 1;
#pragma unroll 1
                        for (int a = 0; a < K; ++a) {  // not unrolled: bounds registers and code
                            A win[WIN][VEC];
#pragma unroll
                            for (int j = 0; j < WIN; ++j) {
                                const Pack<T, VEC> p = *reinterpret_cast<const Pack<T, VEC>*>(
                                    tile + ((py + a) * IW + px * OPT + j) * IP + cl);
#pragma unroll
                                for (int v = 0; v < VEC; ++v) win[j][v] = to_acc(p.v[v]);
                            }
#pragma unroll
                            for (int b = 0; b < K; ++b) {
                                const int t = flip ? (K - 1 - a) * K + (K - 1 - b) : a * K + b;
                                const Pack<T, VEC> wp =
                                    *reinterpret_cast<const Pack<T, VEC>*>(w + (i64)t * COR + o * R + m);
#pragma unroll
                                for (int c = 0; c < OPT; ++c)
#pragma unroll
                                    for (int v = 0; v < VEC; ++v) acc[c][v] += to_acc(wp.v[v]) * win[c + b][v];
                            }
                        }
                    } else {
                        for (int a = 0; a < kh; ++a) {
                            for (int b = 0; b < kw; ++b) {
                                const int t = flip ? (kh - 1 - a) * kw + (kw - 1 - b) : a * kw + b;
                                const Pack<T, VEC> wp =
                                    *reinterpret_cast<const Pack<T, VEC>*>(w + (i64)t * COR + o * R + m);
#pragma unroll
                                for (int c = 0; c < OPT; ++c) {
                                    const Pack<T, VEC> p = *reinterpret_cast<const Pack<T, VEC>*>(
                                        tile + ((py * sh + a * dh) * IW + (px * OPT + c) * sw + b * dw) * IP + cl);
#pragma unroll
                                    for (int v = 0; v < VEC; ++v) acc[c][v] += to_acc(wp.v[v]) * to_acc(p.v[v]);
                                }
                            }
                        }
                    }
                }
                const int oy = oy0 + py;
                if (oy < OH) {
                    A bv[VEC];
#pragma unroll
                    for (int v = 0; v < VEC; ++v) bv[v] = bias != nullptr ? to_acc(bias[o + v]) : A(0);
#pragma unroll
                    for (int c = 0; c < OPT; ++c) {
                        const int ox = ox0 + px * OPT + c;
                        if (ox >= OW) continue;
                        Pack<TO, VEC> p;
#pragma unroll
                        for (int v = 0; v < VEC; ++v) p.v[v] = from_acc<TO>(activate(acc[c][v] + bv[v], act));
                        *reinterpret_cast<Pack<TO, VEC>*>(y + (((i64)n * OH + oy) * OW + ox) * CO + o) = p;
                    }
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------ grad_input, stride > 1

// Polyphase form. With u = p + pt the padded coordinate of gx row p, the taps a that reach p are
// those with u - a*dh a multiple of sh, and which ones depends only on the phase u mod sh: gx
// pixels of one phase (rows and columns) form a stride-1 correlation of gy with a sub-kernel.
//
// S = 2 (sh = sw = 2, dh and dw odd): a thread owns cells of 2 x 2 adjacent gx pixels, rows
// p0 + 2i + r, columns q0 + 2j + c (r, c < 2), one pixel of each phase. Phase rho (rows) takes the
// taps a = rho, rho + 2, ... (a*dh = rho mod 2 since dh is odd), compile-time for K = 3, 5; its
// pixel is the row r = rho ^ (pt & 1) of the cell and gy row (u - rho*dh)/2 - k*dh for tap
// a = rho + 2k, exact by construction. So the inner loops hold no divisibility test and no
// division: per gx pixel, KH*KW/4 shared loads and FMAs on average (3x3: 9 per cell of 4), the
// tile staging (a quarter of a gy element per pixel) and half a store (the two columns of a cell
// row are one 2-element vector: a warp writes a contiguous run).
// S = 0 (any other stride or dilation): a thread owns gx pixels (NCHW: row p0 + ty, columns
// q0 + tx + e*BW; NHWC: one pixel); the first tap of each pixel's phase, the tap step
// s / gcd(s, d) and the gy step d / gcd(s, d) are found once per pixel before the tap loops
// (phase_of), so those loops walk only the taps of the phase, again without a test per tap.
//
// One block: a gx tile TH x TW of one (n, c) plane (NCHW) or TC channels of one image (NHWC); the
// gy tile it reads is staged in shared memory (zero-filled outside gy):
//   rows iy0 = ceil((p0 + pt - (KH-1)*dh) / sh) .. + IH, columns likewise (IW loaded, pitch IP).
//   NCHW  grid (tiles, min(N * C, 65535)), block (BW, BH); S = 2: TH = 2 BH, TW = 2 BW VEC (cell
//         columns tx + e*BW); S = 0: TH = BH, TW = BW VEC
//   NHWC  grid (tiles, ceil(C / TC), min(N, 65535)), block (CT, PT), TC = CT * VEC; PT threads own
//         the cells (S = 2) or pixels (S = 0) of the tile, TW / (2 or 1) per tile row.

// The taps of one phase along one axis: for a gx coordinate whose padded coordinate is u, the taps
// a < k with u - a*d a multiple of s are a0, a0 + step, ...; tap a0 + j*step reads gy coordinate
// g0 - j*gstep. a0 = k when the phase has no tap.
struct GiPhase { int a0, step, g0, gstep; };

__device__ __forceinline__ GiPhase gi_phase_of(int u, int s, int d, int k) {
    GiPhase ph;
    ph.a0 = k;
    for (int a = 0; a < s && a < k; ++a)   // a solution, if any, lies below s / gcd(s, d) <= s
        if ((u - a * d) % s == 0) { ph.a0 = a; break; }
    int st = 1;
    while ((st * d) % s != 0) ++st;       // s / gcd(s, d)
    ph.step = st;
    ph.gstep = st * d / s;
    ph.g0 = ph.a0 < k ? (u - ph.a0 * d) / s : 0;   // exact
    return ph;
}

template <typename T, int K, int S, int VEC, bool NHWC>
__global__ void __launch_bounds__(256, sizeof(T) == 8 || K * VEC > 32 ? 1 : 2) dw_grad_input(
    const T* __restrict__ gy,    // output gradient: (N, CO, OH, OW) or (N, OH, OW, CO), CO = C*M
    const T* __restrict__ w,     // NCHW: (CO, KH*KW); NHWC: transposed, (KH*KW, CO)
    T* __restrict__ gx,          // input gradient: (N, C, H, W) or (N, H, W, C)
    int N, int C, int H, int W, int M, int OH, int OW,
    int KH, int KW, int sh, int sw, int dh, int dw, int pt, int pl,
    int TH, int TW,              // gx tile per block
    int IH, int IW, int IP,      // gy tile rows, columns, pitch (NCHW: per row; NHWC: per pixel)
    int CP)                      // NHWC: channels per pixel in the tile (<= IP); NCHW: unused
{
    static_assert(S == 0 || S == 2, "dw_grad_input: S is 2 or 0 (runtime stride)");
    static_assert(K == 0 || S == 2, "dw_grad_input: compile-time K needs S = 2");
    typedef typename Acc<T>::type A;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* tile = reinterpret_cast<T*>(smem_raw);
    const int kh = K > 0 ? K : KH, kw = K > 0 ? K : KW;
    const int KK = kh * kw;
    const int CO = C * M;
    const int tiles_w = (W + TW - 1) / TW;
    const int p0 = (blockIdx.x / tiles_w) * TH, q0 = (blockIdx.x % tiles_w) * TW;
    const int iy0 = ceil_div(p0 + pt - (kh - 1) * dh, sh), ix0 = ceil_div(q0 + pl - (kw - 1) * dw, sw);
    const int tid = threadIdx.y * blockDim.x + threadIdx.x, nthr = blockDim.x * blockDim.y;
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int fh = pt & 1, fw = pl & 1;   // S = 2: cell row r holds phase r ^ fh, column c phase c ^ fw

    if constexpr (!NHWC) {
        const int BW = blockDim.x;
        if constexpr (S == 2) {
            // tile row / column of tap k = 0 of each phase for cell (ty, tx); cell column e adds e*BW
            int rb[2], cb[2];
#pragma unroll
            for (int rho = 0; rho < 2; ++rho) {
                rb[rho] = (p0 + 2 * ty + (rho ^ fh) + pt - rho * dh) / 2 - iy0;
                cb[rho] = (q0 + 2 * tx + (rho ^ fw) + pl - rho * dw) / 2 - ix0;
            }
            const bool pairs = (W % 2 == 0) && ((size_t)gx % (2 * sizeof(T)) == 0);
            for (i64 plane = blockIdx.y; plane < (i64)N * C; plane += gridDim.y) {
                const int c = (int)(plane % C);
                const i64 n = plane / C;
                A acc[2][2][VEC];   // by phase (rows, columns)
#pragma unroll
                for (int ph = 0; ph < 2; ++ph)
#pragma unroll
                    for (int pw = 0; pw < 2; ++pw)
#pragma unroll
                        for (int e = 0; e < VEC; ++e) acc[ph][pw][e] = 0;
                for (int m = 0; m < M; ++m) {
                    const int o = c * M + m;
                    const T* wr = w + (i64)o * KK;
                    __syncthreads();
                    load_tile_nchw<T, VEC>(tile, gy + (n * CO + o) * (i64)OH * OW, OH, OW, iy0, ix0,
                                           IH, IW, IP, tid, nthr);
                    __syncthreads();
                    if constexpr (K > 0) {
                        A wk[K][K];
#pragma unroll
                        for (int a = 0; a < K; ++a)
#pragma unroll
                            for (int b = 0; b < K; ++b) wk[a][b] = to_acc(wr[a * K + b]);
#pragma unroll
                        for (int ph = 0; ph < 2; ++ph)
#pragma unroll
                            for (int pw = 0; pw < 2; ++pw)
#pragma unroll
                                for (int a = ph; a < K; a += 2)
#pragma unroll
                                    for (int b = pw; b < K; b += 2) {
                                        const T* s = tile + (rb[ph] - (a >> 1) * dh) * IP + cb[pw] - (b >> 1) * dw;
#pragma unroll
                                        for (int e = 0; e < VEC; ++e) acc[ph][pw][e] += wk[a][b] * to_acc(s[e * BW]);
                                    }
                    } else {
#pragma unroll
                        for (int ph = 0; ph < 2; ++ph)
#pragma unroll
                            for (int pw = 0; pw < 2; ++pw)
                                for (int a = ph, i = rb[ph]; a < kh; a += 2, i -= dh)
                                    for (int b = pw, j = cb[pw]; b < kw; b += 2, j -= dw) {
                                        const A wv = to_acc(wr[a * kw + b]);
                                        const T* s = tile + i * IP + j;
#pragma unroll
                                        for (int e = 0; e < VEC; ++e) acc[ph][pw][e] += wv * to_acc(s[e * BW]);
                                    }
                    }
                }
                T* gp = gx + plane * (i64)H * W;
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const int p = p0 + 2 * ty + r;
                    if (p >= H) continue;
#pragma unroll
                    for (int e = 0; e < VEC; ++e) {
                        const int q = q0 + 2 * (tx + e * BW);
                        const A v0 = fh ? (fw ? acc[r ^ 1][1][e] : acc[r ^ 1][0][e])
                                        : (fw ? acc[r][1][e] : acc[r][0][e]);
                        const A v1 = fh ? (fw ? acc[r ^ 1][0][e] : acc[r ^ 1][1][e])
                                        : (fw ? acc[r][0][e] : acc[r][1][e]);
                        if (pairs) {
                            if (q < W) {
                                Pack<T, 2> out;
                                out.v[0] = from_acc<T>(v0);
                                out.v[1] = from_acc<T>(v1);
                                *reinterpret_cast<Pack<T, 2>*>(gp + (i64)p * W + q) = out;
                            }
                        } else {
                            if (q < W) gp[(i64)p * W + q] = from_acc<T>(v0);
                            if (q + 1 < W) gp[(i64)p * W + q + 1] = from_acc<T>(v1);
                        }
                    }
                }
            }
        } else {
            const int p = p0 + ty;
            const GiPhase prow = gi_phase_of(p + pt, sh, dh, kh);
            GiPhase pcol[VEC];
#pragma unroll
            for (int e = 0; e < VEC; ++e) pcol[e] = gi_phase_of(q0 + tx + e * BW + pl, sw, dw, kw);
            for (i64 plane = blockIdx.y; plane < (i64)N * C; plane += gridDim.y) {
                const int c = (int)(plane % C);
                const i64 n = plane / C;
                A acc[VEC];
#pragma unroll
                for (int e = 0; e < VEC; ++e) acc[e] = 0;
                for (int m = 0; m < M; ++m) {
                    const int o = c * M + m;
                    const T* wr = w + (i64)o * KK;
                    __syncthreads();
                    load_tile_nchw<T, VEC>(tile, gy + (n * CO + o) * (i64)OH * OW, OH, OW, iy0, ix0,
                                           IH, IW, IP, tid, nthr);
                    __syncthreads();
#pragma unroll
                    for (int e = 0; e < VEC; ++e)
                        for (int a = prow.a0, i = prow.g0 - iy0; a < kh; a += prow.step, i -= prow.gstep)
                            for (int b = pcol[e].a0, j = pcol[e].g0 - ix0; b < kw; b += pcol[e].step, j -= pcol[e].gstep)
                                acc[e] += to_acc(wr[a * kw + b]) * to_acc(tile[i * IP + j]);
                }
                T* gp = gx + plane * (i64)H * W;
#pragma unroll
                for (int e = 0; e < VEC; ++e) {
                    const int q = q0 + tx + e * BW;
                    if (p < H && q < W) gp[(i64)p * W + q] = from_acc<T>(acc[e]);
                }
            }
        }
    } else {
        // lanes: gx channels c0 + tx*VEC + v (VEC > 1 only when M == 1); gy tile channels
        // [c0*M, (c0 + TC)*M).
        const int TC = blockDim.x * VEC;
        const int c0 = blockIdx.y * TC;
        const int c = c0 + tx * VEC;
        const bool active = c < C;
        const int U = S == 2 ? 2 : 1;           // cell side
        const int twc = TW / U;                 // cells per tile row
        const int cy = ty / twc, cx = ty - cy * twc;
        const bool owner = active && cy * U < TH;
        if constexpr (S == 2) {
            int rb[2], cb[2];
#pragma unroll
            for (int rho = 0; rho < 2; ++rho) {
                rb[rho] = (p0 + 2 * cy + (rho ^ fh) + pt - rho * dh) / 2 - iy0;
                cb[rho] = (q0 + 2 * cx + (rho ^ fw) + pl - rho * dw) / 2 - ix0;
            }
            for (int n = blockIdx.z; n < N; n += gridDim.z) {
                A acc[2][2][VEC];
#pragma unroll
                for (int ph = 0; ph < 2; ++ph)
#pragma unroll
                    for (int pw = 0; pw < 2; ++pw)
#pragma unroll
                        for (int v = 0; v < VEC; ++v) acc[ph][pw][v] = 0;
                __syncthreads();
                load_tile_nhwc<T, VEC>(tile, gy + (i64)n * OH * OW * CO, OH, OW, CO, iy0, ix0, c0 * M,
                                       IH, IW, CP, IP, tid, nthr);
                __syncthreads();
                if (!owner) continue;
                for (int m = 0; m < M; ++m) {
                    const int cl = (c - c0) * M + m;   // tile channel of gy channel c*M + m
                    const T* wm = w + c * M + m;
#pragma unroll
                    for (int ph = 0; ph < 2; ++ph)
#pragma unroll
                        for (int pw = 0; pw < 2; ++pw) {
                            if constexpr (K > 0) {
#pragma unroll
                                for (int a = ph; a < K; a += 2)
#pragma unroll
                                    for (int b = pw; b < K; b += 2) {
                                        const Pack<T, VEC> wp =
                                            *reinterpret_cast<const Pack<T, VEC>*>(wm + (i64)(a * K + b) * CO);
                                        const Pack<T, VEC> g = *reinterpret_cast<const Pack<T, VEC>*>(
                                            tile + ((rb[ph] - (a >> 1) * dh) * IW + cb[pw] - (b >> 1) * dw) * IP + cl);
#pragma unroll
                                        for (int v = 0; v < VEC; ++v) acc[ph][pw][v] += to_acc(wp.v[v]) * to_acc(g.v[v]);
                                    }
                            } else {
                                for (int a = ph, i = rb[ph]; a < kh; a += 2, i -= dh)
                                    for (int b = pw, j = cb[pw]; b < kw; b += 2, j -= dw) {
                                        const Pack<T, VEC> wp =
                                            *reinterpret_cast<const Pack<T, VEC>*>(wm + (i64)(a * kw + b) * CO);
                                        const Pack<T, VEC> g = *reinterpret_cast<const Pack<T, VEC>*>(
                                            tile + (i * IW + j) * IP + cl);
#pragma unroll
                                        for (int v = 0; v < VEC; ++v) acc[ph][pw][v] += to_acc(wp.v[v]) * to_acc(g.v[v]);
                                    }
                            }
                        }
                }
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const int p = p0 + 2 * cy + r;
                    if (p >= H) continue;
#pragma unroll
                    for (int cc = 0; cc < 2; ++cc) {
                        const int q = q0 + 2 * cx + cc;
                        if (q >= W) continue;
                        Pack<T, VEC> out;
#pragma unroll
                        for (int v = 0; v < VEC; ++v)
                            out.v[v] = from_acc<T>(fh ? (fw ? acc[r ^ 1][cc ^ 1][v] : acc[r ^ 1][cc][v])
                                                      : (fw ? acc[r][cc ^ 1][v] : acc[r][cc][v]));
                        *reinterpret_cast<Pack<T, VEC>*>(gx + (((i64)n * H + p) * W + q) * C + c) = out;
                    }
                }
            }
        } else {
            const int p = p0 + cy, q = q0 + cx;
            const GiPhase prow = gi_phase_of(p + pt, sh, dh, kh);
            const GiPhase pcol = gi_phase_of(q + pl, sw, dw, kw);
            for (int n = blockIdx.z; n < N; n += gridDim.z) {
                A acc[VEC];
#pragma unroll
                for (int v = 0; v < VEC; ++v) acc[v] = 0;
                __syncthreads();
                load_tile_nhwc<T, VEC>(tile, gy + (i64)n * OH * OW * CO, OH, OW, CO, iy0, ix0, c0 * M,
                                       IH, IW, CP, IP, tid, nthr);
                __syncthreads();
                if (!owner || p >= H || q >= W) continue;
                for (int m = 0; m < M; ++m) {
                    const int cl = (c - c0) * M + m;
                    const T* wm = w + c * M + m;
                    for (int a = prow.a0, i = prow.g0 - iy0; a < kh; a += prow.step, i -= prow.gstep)
                        for (int b = pcol.a0, j = pcol.g0 - ix0; b < kw; b += pcol.step, j -= pcol.gstep) {
                            const Pack<T, VEC> wp =
                                *reinterpret_cast<const Pack<T, VEC>*>(wm + (i64)(a * kw + b) * CO);
                            const Pack<T, VEC> g =
                                *reinterpret_cast<const Pack<T, VEC>*>(tile + (i * IW + j) * IP + cl);
#pragma unroll
                            for (int v = 0; v < VEC; ++v) acc[v] += to_acc(wp.v[v]) * to_acc(g.v[v]);
                        }
                }
                Pack<T, VEC> out;
#pragma unroll
                for (int v = 0; v < VEC; ++v) out.v[v] = from_acc<T>(acc[v]);
                *reinterpret_cast<Pack<T, VEC>*>(gx + (((i64)n * H + p) * W + q) * C + c) = out;
            }
        }
    }
}

// ------------------------------------------------------------------------------ grad_weight

// The block's K*K sums of one channel (the NCHW weight gradients): warp shuffles, one shared row
// of KK per warp in `red`, then threads t < KK add the rows in a fixed order and store out[t].
// The caller's last reads of `red` (or of what it aliases) must be behind a barrier.
template <int KK, typename A>
__device__ __forceinline__ void block_sum_taps(const A (&acc)[KK], A* red, A* __restrict__ out,
                                               int tid, int nthr) {
    const int lane = tid % 32, warp = tid / 32, nwarps = nthr / 32;
#pragma unroll
    for (int t = 0; t < KK; ++t) {
        const A v = warp_sum(acc[t]);
        if (lane == 0) red[warp * KK + t] = v;
    }
    __syncthreads();
    for (int t = tid; t < KK; t += nthr) {
        A s = 0;
        for (int j = 0; j < nwarps; ++j) s += red[j * KK + t];
        out[t] = s;
    }
}

// Stage 1, NCHW, kernel sizes 1 and 3 known at compile time, direct (no shared tile): a
// block owns output channel o (blockIdx.y, then every gridDim.y-th) and the output positions
// [split * per_split, (split + 1) * per_split) of its N * OH * OW, walked linearly with
// consecutive threads on consecutive positions: gy loads coalesced, each tap's x loads coalesced
// along a row and the neighbouring taps' re-reads served by L1/L2. Every thread keeps the K*K
// sums and has K*K + 1 independent loads in flight per position; there is no barrier until the
// block's reduction (warp shuffles, one shared row per warp), which writes
//   partial[(split * CO + o) * K*K + tap].
// Grid (splits, min(CO, 65535)), block (256); dynamic shared memory: warps x K*K accumulators.
// (The tiled form before it, one x tile staged per barrier, kept few loads in flight: the small
// planes of late network layers ran at a few percent of the floor in the model.)
template <typename T, int K>
__global__ void __launch_bounds__(256) dw_grad_weight_direct(
    const T* __restrict__ x,     // input: (N, C, H, W)
    const T* __restrict__ gy,    // output gradient: (N, CO, OH, OW), CO = C*M
    typename Acc<T>::type* __restrict__ partial,  // (splits, CO, K*K)
    int N, int C, int H, int W, int M, int OH, int OW,
    int sh, int sw, int dh, int dw, int pt, int pl,
    i64 per_split)               // output positions per split (blockIdx.x)
{
    typedef typename Acc<T>::type A;
    constexpr int KK = K * K;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    A* red = reinterpret_cast<A*>(smem_raw);
    const int CO = C * M;
    const int plane = OH * OW;
    const i64 p0 = (i64)blockIdx.x * per_split;
    const i64 p1 = min((i64)N * plane, p0 + per_split);
    const int tid = threadIdx.x, nthr = blockDim.x;
    for (int o = blockIdx.y; o < CO; o += gridDim.y) {
        const int c = o / M;
        A acc[KK];
#pragma unroll
        for (int t = 0; t < KK; ++t) acc[t] = 0;
        i64 p = p0 + tid;
        int n = (int)(p / plane);           // then kept up to date without dividing
        int q = (int)(p - (i64)n * plane);  // position in the plane
        for (; p < p1; p += nthr) {
            const int oy = q / OW, ox = q - oy * OW;
            const A g = to_acc(gy[((i64)n * CO + o) * plane + q]);
            const T* xp = x + ((i64)n * C + c) * H * W;
            const int iy0 = oy * sh - pt, ix0 = ox * sw - pl;
#pragma unroll
            for (int a = 0; a < K; ++a) {
                const int iy = iy0 + a * dh;
                const bool row = iy >= 0 && iy < H;
#pragma unroll
                for (int b = 0; b < K; ++b) {
                    const int ix = ix0 + b * dw;
                    if (row && ix >= 0 && ix < W) acc[a * K + b] += g * to_acc(xp[(i64)iy * W + ix]);
                }
            }
            q += nthr;
            while (q >= plane) {
                q -= plane;
                ++n;
            }
        }
        __syncthreads();  // the previous channel's reads of `red` are done
        block_sum_taps<KK>(acc, red, partial + ((i64)blockIdx.x * CO + o) * KK, tid, nthr);
    }
}

// Stage 1, tiled, kernels known at compile time (NHWC: K in 1, 3, 5, 7; NCHW: K in 5, 7, where
// the direct kernel's K*K loads per position make it issue-bound): every thread keeps the K*K
// (times VEC channels, NHWC) partial sums of the outputs it visits in registers; the block then
// reduces them in shared memory and writes one partial per (split, channel, tap):
//   partial[(split * CO + o) * K*K + tap]
// Work: the tiles t = (n, tile_h, tile_w) in [split * per_split, (split + 1) * per_split).
//   NCHW  grid (splits, min(CO, 65535)), block (BW, BH); tile TH = BH rows, TW = BW * VEC columns
//         (columns interleaved tx + e*BW); x tile in shared memory, gy read directly (coalesced).
//   NHWC  grid (splits, ceil(CO / TC)), block (CT, PT); tile TH x TW pixels, TW = (PT / TH) * OPT.
// Dynamic shared memory: max(x tile, reduction scratch: NCHW warps x K*K, NHWC threads x VEC x
// K*K accumulators), sized by the host.
template <typename T, int K, int VEC, int OPT, bool NHWC>
__global__ void __launch_bounds__(256, sizeof(T) == 8 ? 1 : 2) dw_grad_weight(
    const T* __restrict__ x,     // input: (N, C, H, W) or (N, H, W, C)
    const T* __restrict__ gy,    // output gradient: (N, CO, OH, OW) or (N, OH, OW, CO), CO = C*M
    typename Acc<T>::type* __restrict__ partial,  // (splits, CO, K*K)
    int N, int C, int H, int W, int M, int OH, int OW,
    int sh, int sw, int dh, int dw, int pt, int pl,
    int TH, int TW,              // output tile per step
    int IH, int IW, int IP,      // x tile rows, columns, pitch (NCHW: per row; NHWC: per pixel)
    int CP,                      // NHWC: channels per pixel in the tile (<= IP); NCHW: unused
    int per_split)               // tiles per split (blockIdx.x)
{
    typedef typename Acc<T>::type A;
    constexpr int KK = K * K;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* tile = reinterpret_cast<T*>(smem_raw);
    A* red = reinterpret_cast<A*>(smem_raw);
    const int CO = C * M;
    const int tiles_w = (OW + TW - 1) / TW, tiles_h = (OH + TH - 1) / TH;
    const i64 ntiles = (i64)N * tiles_h * tiles_w;
    const i64 t_begin = (i64)blockIdx.x * per_split;
    const i64 t_end = min(ntiles, t_begin + per_split);
    const int tid = threadIdx.y * blockDim.x + threadIdx.x, nthr = blockDim.x * blockDim.y;
    const int tx = threadIdx.x, ty = threadIdx.y;

    if constexpr (!NHWC) {
        const int BW = blockDim.x;
        for (int o = blockIdx.y; o < CO; o += gridDim.y) {
            A acc[KK];
#pragma unroll
            for (int t = 0; t < KK; ++t) acc[t] = 0;
            for (i64 t = t_begin; t < t_end; ++t) {
                const i64 n = t / (tiles_h * tiles_w);
                const int rem = (int)(t - n * tiles_h * tiles_w);
                const int oy0 = (rem / tiles_w) * TH, ox0 = (rem % tiles_w) * TW;
                __syncthreads();
                load_tile_nchw<T, VEC>(tile, x + (n * C + o / M) * (i64)H * W, H, W, oy0 * sh - pt,
                                       ox0 * sw - pl, IH, IP, IP, tid, nthr);
                __syncthreads();
                const int oy = oy0 + ty;
                if (oy >= OH) continue;
                const T* gp = gy + ((n * CO + o) * (i64)OH + oy) * OW;
#pragma unroll
                for (int e = 0; e < VEC; ++e) {
                    const int oxl = tx + e * BW;
                    if (ox0 + oxl >= OW) continue;
                    const A g = to_acc(gp[ox0 + oxl]);
#pragma unroll
                    for (int a = 0; a < K; ++a)
#pragma unroll
                        for (int b = 0; b < K; ++b)
                            acc[a * K + b] += g * to_acc(tile[(ty * sh + a * dh) * IP + oxl * sw + b * dw]);
                }
            }
            __syncthreads();  // `red` aliases `tile`
            block_sum_taps<KK>(acc, red, partial + ((i64)blockIdx.x * CO + o) * KK, tid, nthr);
        }
    } else {
        const int TC = blockDim.x * VEC, PT = blockDim.y;
        const int o0 = blockIdx.y * TC;
        const int o = o0 + tx * VEC;
        const bool active = o < CO;
        const int twt = TW / OPT;
        const int py = ty / twt, px = ty - py * twt;
        const int ci0 = o0 / M;
        const int cl = active ? o / M - ci0 : 0;  // VEC > 1 only when M == 1
        A acc[KK][VEC];
#pragma unroll
        for (int t = 0; t < KK; ++t)
#pragma unroll
            for (int v = 0; v < VEC; ++v) acc[t][v] = 0;
        for (i64 t = t_begin; t < t_end; ++t) {
            const i64 n = t / (tiles_h * tiles_w);
            const int rem = (int)(t - n * tiles_h * tiles_w);
            const int oy0 = (rem / tiles_w) * TH, ox0 = (rem % tiles_w) * TW;
            __syncthreads();
            load_tile_nhwc<T, VEC>(tile, x + n * H * W * (i64)C, H, W, C, oy0 * sh - pt,
                                   ox0 * sw - pl, ci0, IH, IW, CP, IP, tid, nthr);
            __syncthreads();
            const int oy = oy0 + py;
            if (!active || py >= TH || oy >= OH) continue;
#pragma unroll
            for (int j = 0; j < OPT; ++j) {
                const int ox = ox0 + px * OPT + j;
                if (ox >= OW) continue;
                const Pack<T, VEC> g = *reinterpret_cast<const Pack<T, VEC>*>(
                    gy + (((i64)n * OH + oy) * OW + ox) * CO + o);
#pragma unroll
                for (int a = 0; a < K; ++a)
#pragma unroll
                    for (int b = 0; b < K; ++b) {
                        if (VEC == 1) {
                            acc[a * K + b][0] += to_acc(g.v[0]) *
                                to_acc(tile[((py * sh + a * dh) * IW + (px * OPT + j) * sw + b * dw) * IP + cl]);
                        } else {
                            const Pack<T, VEC> xv = *reinterpret_cast<const Pack<T, VEC>*>(
                                tile + ((py * sh + a * dh) * IW + (px * OPT + j) * sw + b * dw) * IP + cl);
#pragma unroll
                            for (int v = 0; v < VEC; ++v) acc[a * K + b][v] += to_acc(g.v[v]) * to_acc(xv.v[v]);
                        }
                    }
            }
        }
        // Reduce over the PT pixel threads, all taps at once, through red[(ty * TC + c) * KK + t]
        // (c: channel in the block), the layout of the block's slice of `partial`. Each thread's
        // VEC * KK sums are one contiguous run, stored as 16-byte vectors where the run allows it
        // (conflict-free when the run is 36 words; a scalar run of odd length is conflict-free
        // too); then thread i sums entry i of the PT rows (consecutive words: conflict-free) and
        // stores it (consecutive addresses: coalesced). Two barriers in all, not two per tap.
        __syncthreads();  // `red` aliases `tile`
        {
            A* own = red + (ty * TC + tx * VEC) * KK;
            constexpr int NV = 16 / sizeof(A);
            if constexpr ((VEC * KK) % NV == 0) {
#pragma unroll
                for (int k = 0; k < VEC * KK / NV; ++k) {
                    Pack<A, NV> p;
#pragma unroll
                    for (int e = 0; e < NV; ++e) p.v[e] = acc[(k * NV + e) % KK][(k * NV + e) / KK];
                    *reinterpret_cast<Pack<A, NV>*>(own + k * NV) = p;
                }
            } else {
#pragma unroll
                for (int v = 0; v < VEC; ++v)
#pragma unroll
                    for (int t = 0; t < KK; ++t) own[v * KK + t] = acc[t][v];
            }
        }
        __syncthreads();
        const int nout = min(TC, CO - o0) * KK;
        A* dst = partial + ((i64)blockIdx.x * CO + o0) * KK;
        for (int i = tid; i < nout; i += nthr) {
            A s = 0;
            for (int j = 0; j < PT; ++j) s += red[j * TC * KK + i];
            dst[i] = s;
        }
    }
}

// Stage 1 for any KHxKW (up to 31x31), tap-parallel: a block owns TAPS = blockDim.y * TPT taps
// (blockIdx.z selects which) of TC = blockDim.x channels; each thread keeps TPT partial sums.
// Per tile, x (IH x IW pixels x TC channels) and gy (TH x TW pixels x TC channels) are staged in
// shared memory as [pixel][channel]; every thread then walks the tile's outputs for its taps.
//   grid (splits, min(ceil(CO / TC), 65535), ceil(KH*KW / TAPS)); NCHW uses TC = 1, NHWC TC = 32.
template <typename T, int TPT, bool NHWC>
__global__ void dw_grad_weight_taps(
    const T* __restrict__ x,     // input: (N, C, H, W) or (N, H, W, C)
    const T* __restrict__ gy,    // output gradient: (N, CO, OH, OW) or (N, OH, OW, CO)
    typename Acc<T>::type* __restrict__ partial,  // (splits, CO, KH*KW)
    int N, int C, int H, int W, int M, int OH, int OW,
    int KH, int KW, int sh, int sw, int dh, int dw, int pt, int pl,
    int TH, int TW,              // output tile per step
    int IH, int IW,              // x tile rows and columns
    int per_split)               // tiles per split
{
    typedef typename Acc<T>::type A;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    A* xs = reinterpret_cast<A*>(smem_raw);                 // [IH*IW][TC]
    const int TC = blockDim.x;
    A* gs = xs + IH * IW * TC;                               // [TH*TW][TC]
    const int CO = C * M, KK = KH * KW;
    const int tiles_w = (OW + TW - 1) / TW, tiles_h = (OH + TH - 1) / TH;
    const i64 ntiles = (i64)N * tiles_h * tiles_w;
    const i64 t_begin = (i64)blockIdx.x * per_split;
    const i64 t_end = min(ntiles, t_begin + per_split);
    const int tid = threadIdx.y * blockDim.x + threadIdx.x, nthr = blockDim.x * blockDim.y;
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int tap0 = blockIdx.z * blockDim.y * TPT;
    for (int o0 = blockIdx.y * TC; o0 < CO; o0 += gridDim.y * TC) {  // channel groups
        A acc[TPT];
#pragma unroll
        for (int j = 0; j < TPT; ++j) acc[j] = 0;
        for (i64 t = t_begin; t < t_end; ++t) {
            const i64 n = t / (tiles_h * tiles_w);
            const int rem = (int)(t - n * tiles_h * tiles_w);
            const int oy0 = (rem / tiles_w) * TH, ox0 = (rem % tiles_w) * TW;
            const int iy0 = oy0 * sh - pt, ix0 = ox0 * sw - pl;
            __syncthreads();
            // Channel-fastest staging: coalesced along C for NHWC; TC = 1 for NCHW (along W).
            for (int idx = tid; idx < IH * IW * TC; idx += nthr) {
                const int k = idx % TC, pix = idx / TC;
                const int r = pix / IW, c = pix - r * IW;
                const int gyy = iy0 + r, gxx = ix0 + c, o = o0 + k;
                A v = 0;
                if (o < CO && gyy >= 0 && gyy < H && gxx >= 0 && gxx < W) {
                    const i64 off = NHWC ? ((n * H + gyy) * (i64)W + gxx) * C + o / M
                                         : ((n * C + o / M) * (i64)H + gyy) * W + gxx;
                    v = to_acc(x[off]);
                }
                xs[idx] = v;
            }
            for (int idx = tid; idx < TH * TW * TC; idx += nthr) {
                const int k = idx % TC, pix = idx / TC;
                const int r = pix / TW, c = pix - r * TW;
                const int oy = oy0 + r, ox = ox0 + c, o = o0 + k;
                A v = 0;
                if (o < CO && oy < OH && ox < OW) {
                    const i64 off = NHWC ? ((n * OH + oy) * (i64)OW + ox) * CO + o
                                         : ((n * CO + o) * (i64)OH + oy) * OW + ox;
                    v = to_acc(gy[off]);
                }
                gs[idx] = v;
            }
            __syncthreads();
#pragma unroll
            for (int j = 0; j < TPT; ++j) {
                const int tap = tap0 + ty + j * blockDim.y;
                if (tap >= KK) continue;
                const int a = tap / KW, b = tap - a * KW;
                A s = 0;
                for (int r = 0; r < TH; ++r)
                    for (int c = 0; c < TW; ++c)
                        s += gs[(r * TW + c) * TC + tx] * xs[((r * sh + a * dh) * IW + c * sw + b * dw) * TC + tx];
                acc[j] += s;
            }
        }
        const int o = o0 + tx;
        if (o < CO) {
#pragma unroll
            for (int j = 0; j < TPT; ++j) {
                const int tap = tap0 + ty + j * blockDim.y;
                if (tap < KK) partial[((i64)blockIdx.x * CO + o) * KK + tap] = acc[j];
            }
        }
    }
}
